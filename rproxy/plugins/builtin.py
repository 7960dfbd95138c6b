"""The built-in balancers, registered as plugins so they are found like anyone else's."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.plugin import IPlugin
from zope.interface import implementer

from rproxy.balancers import RoundRobin
from rproxy.interfaces import IBalancer, IBalancerFactory


@implementer(IPlugin, IBalancerFactory)
class BalancerFactory:
    """A balancer kind built by a class that takes no options."""

    def __init__(self, name: str, description: str, build: Callable[[], IBalancer]) -> None:
        self.name = name
        self.description = description
        self._build = build

    def build(self, options: Mapping[str, object]) -> IBalancer:
        if options:
            raise ValueError(f"balancer {self.name} takes no options, got {sorted(options)}")
        return self._build()


roundRobin = BalancerFactory("round_robin", "each upstream in turn", RoundRobin)
