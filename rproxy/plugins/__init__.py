"""
Where balancer and filter plugins live: any installed package may add modules to C{rproxy/plugins/}.

Twisted finds them in every C{rproxy/plugins} directory on C{sys.path} (C{pluginPackagePaths}).  An
editable install (C{pip install -e .}, setuptools' default mode) puts no directory on C{sys.path}: it maps
the package to its source directory through a path entry finder of its own, so that directory is asked
for too, through the import system's public C{PathFinder}.
"""

import os
import sys
from importlib.machinery import PathFinder

from twisted.plugin import pluginPackagePaths


def _editablePaths(name: str) -> list[str]:
    """The directories that path entry finders other than plain directories map package C{name} to."""
    found: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str) or os.path.isdir(entry):
            continue  # a plain directory: pluginPackagePaths looked there
        try:
            spec = PathFinder.find_spec(name, [entry])
        except (ImportError, ValueError, OSError):
            continue
        if spec is not None and spec.loader is None:  # a namespace portion: its directories hold plugins
            found += [path for path in spec.submodule_search_locations or () if os.path.isdir(path)]
    return found


__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__path__.extend(path for path in _editablePaths(__name__) if path not in __path__)  # type: ignore[name-defined]
__all__: list[str] = []
