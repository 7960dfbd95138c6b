"""
How filter kinds are made and found: L{FilterFactory} for the built-in ones, L{filterFactories} for all.

A factory reads its options through a L{PluginOptions}, which rejects any option it did not read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.plugin import IPlugin
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
        build: Callable[[PluginOptions, FilterEnvironment], IRequestFilter | IResponseFilter],
    ) -> None:
        self.name = name
        self.description = description
        self._build = build

    def build(self, options: Mapping[str, object], environment: FilterEnvironment) -> IRequestFilter | IResponseFilter:
        reader = PluginOptions("filter", self.name, options)
        built = self._build(reader, environment)
        reader.finish()
        return built


def filterFactories() -> dict[str, IFilterFactory]:
    """Every installed filter kind by name: the built-in ones and third parties' plugins."""
    from twisted.plugin import getPlugins

    import rproxy.plugins

    return {factory.name: factory for factory in getPlugins(IFilterFactory, rproxy.plugins)}
