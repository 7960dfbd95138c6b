"""
How filter kinds are made and found: L{FilterFactory} for the built-in ones, L{filterFactories} for all.

A factory reads its options through a L{PluginOptions}, which rejects any option it did not read.  A built-in
factory names its build function by module (L{builtBy}), so that finding the filter kinds imports none of them:
a kind's module, and the libraries it needs (bcrypt, PyJWT, brotli, ...), are imported when a filter of that kind
is first built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from rproxy.interfaces import FilterEnvironment, IFilterFactory, IRequestFilter, IResponseFilter
from rproxy.options import PluginOptions


@implementer(IPlugin, IFilterFactory)
class FilterFactory:
    """A filter kind: C{build} reads the options through a L{PluginOptions}; an option it did not read is an error."""

    def __init__(
        self,
        name: str,
        description: str,
        build: BuildFilter,
    ) -> None:
        self.name = name
        self.description = description
        self._build = build

    def build(self, options: Mapping[str, object], environment: FilterEnvironment) -> IRequestFilter | IResponseFilter:
        reader = PluginOptions("filter", self.name, options)
        built = self._build(reader, environment)
        reader.finish()
        return built


#: What builds a filter from its options, read through a L{PluginOptions}.
BuildFilter = Callable[[PluginOptions, FilterEnvironment], IRequestFilter | IResponseFilter]


def builtBy(qualifiedName: str) -> BuildFilter:
    """
    The build function called C{qualifiedName} (C{package.module.function}), imported on the first call.

    @param qualifiedName: where the function is; its module is not imported before a filter is built.
    """

    def build(options: PluginOptions, environment: FilterEnvironment) -> IRequestFilter | IResponseFilter:
        function: BuildFilter = namedAny(qualifiedName)
        return function(options, environment)

    return build


def filterFactories() -> dict[str, IFilterFactory]:
    """Every installed filter kind by name: the built-in ones and third parties' plugins."""
    from twisted.plugin import getPlugins

    import rproxy.plugins

    return {factory.name: factory for factory in getPlugins(IFilterFactory, rproxy.plugins)}
