"""
prefer_local: an rproxy balancer that keeps traffic on local upstreams while any is left.

"Local" is up to the operator: upstreams whose host starts with one of the prefixes of the C{local} option
(say C{10.1.} for this data centre), by default this machine (C{127.}, C{localhost}, C{::1}).  Requests go
round robin to the local upstreams that are available and untried, and to the others, round robin too,
only when none is.

    twist rproxy --upstream http://10.1.0.5:8080 --upstream http://10.2.0.5:8080 \\
        --balancer prefer_local --balancer-option local=10.1.

This module is a Twisted plugin: rproxy finds the module-level C{preferLocal} object because it provides
L{IBalancerFactory} and this file is installed in an C{rproxy/plugins/} directory on C{sys.path}.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from urllib.parse import urlsplit

from twisted.plugin import IPlugin
from zope.interface import implementer

from rproxy import BalancerOptions, InboundRequest, RoundRobin, Upstream
from rproxy.interfaces import IBalancer, IBalancerFactory, Outcome

#: The hosts that count as local when the C{local} option is not given: this machine.
DEFAULT_LOCAL = ("127.", "localhost", "::1")


@implementer(IBalancer)
class PreferLocal:
    """Round robin over the local upstreams; the other upstreams only when no local one is left to try."""

    def __init__(self, prefixes: tuple[str, ...] = DEFAULT_LOCAL) -> None:
        self.prefixes = prefixes
        self._local = RoundRobin()
        self._remote = RoundRobin()
        self._isLocal: dict[str, bool] = {}  # upstream key -> local?  (keys are stable: parse each once)

    def local(self, upstream: Upstream) -> bool:
        """Whether C{upstream}'s host starts with one of the local prefixes."""
        known = self._isLocal.get(upstream.key)
        if known is None:
            host = urlsplit(upstream.key).hostname or ""
            known = self._isLocal[upstream.key] = host.startswith(self.prefixes)
        return known

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        local = [upstream for upstream in upstreams if self.local(upstream)]
        if local:
            chosen = self._local.pick(local, request, tried)
            if chosen is not None:
                return chosen
        remote = [upstream for upstream in upstreams if not self.local(upstream)]
        return self._remote.pick(remote, request, tried) if remote else None

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Nothing to learn: health checks and ejection take failing upstreams out of the set."""


@implementer(IPlugin, IBalancerFactory)
class PreferLocalFactory:
    """Builds L{PreferLocal} from its one option, C{local}: comma-separated host prefixes."""

    name = "prefer_local"
    description = "round robin over local upstreams (option local=HOST-PREFIX,...), the others when none is left"

    def build(self, options: Mapping[str, object]) -> IBalancer:
        reader = BalancerOptions(self.name, options)
        local = reader.text("local")
        reader.finish()
        if local is None:
            return PreferLocal()
        prefixes = tuple(prefix.strip() for prefix in local.split(",") if prefix.strip())
        if not prefixes:
            raise reader.error("local", f"expected host prefixes separated by commas, got {local!r}")
        return PreferLocal(prefixes)


preferLocal = PreferLocalFactory()
