"""Where balancer plugins live: any installed package may add modules to C{rproxy/plugins/}."""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
