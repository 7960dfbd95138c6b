"""
rproxy: a streaming HTTP reverse proxy and edge gateway on Twisted.

The public API: L{ReverseProxyResource} (a drop-in for C{twisted.web.proxy}'s), the L{Proxy} it
mounts, the interfaces of the pluggable parts, and the version.
"""

from typing import TYPE_CHECKING

from rproxy._version import __version__
from rproxy.interfaces import (
    HealthResult,
    IBalancer,
    IBalancerFactory,
    IDirector,
    IHealthCheck,
    IRegistry,
    IRequestFilter,
    IResponseFilter,
    IStreamingResource,
    Outcome,
)
from rproxy.proxy.exchange import Exchange, Proxy

if TYPE_CHECKING:
    from rproxy.proxy.resource import ReverseProxyResource

__all__ = [
    "Exchange",
    "HealthResult",
    "IBalancer",
    "IBalancerFactory",
    "IDirector",
    "IHealthCheck",
    "IRegistry",
    "IRequestFilter",
    "IResponseFilter",
    "IStreamingResource",
    "Outcome",
    "Proxy",
    "ReverseProxyResource",
    "__version__",
]


def __getattr__(name: str) -> object:
    # ReverseProxyResource is imported on first use: twisted.web.proxy, which it subclasses, imports the
    # global reactor, and importing rproxy (rproxy.app.reactor, the rproxy plugin) must not install one.
    if name == "ReverseProxyResource":
        from rproxy.proxy.resource import ReverseProxyResource

        return ReverseProxyResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
