"""Built-in balancers (each an L{IBalancer}, registered as a plugin in L{rproxy.plugins.builtin})."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from zope.interface import implementer

from rproxy.interfaces import IBalancer, IBalancerFactory, Outcome
from rproxy.message import InboundRequest
from rproxy.upstream import Upstream


@implementer(IBalancer)
class RoundRobin:
    """Each upstream in turn; a retry takes the next one not tried yet."""

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        count = len(upstreams)
        for _ in range(count):
            upstream = upstreams[self._next % count]
            self._next += 1
            if upstream not in tried:
                return upstream
        return None

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Round robin does not learn."""


def balancerFactories() -> dict[str, IBalancerFactory]:
    """Every installed balancer kind by name: the built-in ones and third parties' plugins."""
    from twisted.plugin import getPlugins

    import rproxy.plugins

    return {factory.name: factory for factory in getPlugins(IBalancerFactory, rproxy.plugins)}
