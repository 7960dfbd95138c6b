"""
Allow and deny lists of client networks: the C{ip-rules} filter.

The client is C{context.client}, the address after the trusted-proxy rules, so a C{X-Forwarded-For} only
counts when a trusted proxy sent it.  A denied network always loses; when there is an allow list, only its
networks pass (and a client without an address, on a UNIX socket, does not).

The lists may be long (a country's networks, a blocklist of thousands): each is kept as the sorted,
non-overlapping ranges of its networks merged, per IP version, and an address is looked up by bisection,
so a request costs O(log n) whatever the lists' length.  An IPv4 client seen as an IPv4-mapped IPv6 address
(C{::ffff:203.0.113.9}, from a dual-stack socket) is checked against the IPv4 networks too.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable

from zope.interface import implementer

from rproxy.errors import ProxyError, clientError
from rproxy.headers import Network, parseNetworks
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import RequestContext

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetworkSet:
    """
    A set of IP networks that answers C{address in networks} by bisection on the merged ranges.

    @ivar networks: the networks, merged (overlapping and adjacent ones collapsed), IPv4 first.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        given = list(networks)
        # collapse_addresses sorts and merges: the ranges it gives do not overlap, as bisection needs.
        v4 = list(ipaddress.collapse_addresses(n for n in given if isinstance(n, ipaddress.IPv4Network)))
        v6 = list(ipaddress.collapse_addresses(n for n in given if isinstance(n, ipaddress.IPv6Network)))
        self.networks: tuple[Network, ...] = (*v4, *v6)
        self._starts = {4: [int(n.network_address) for n in v4], 6: [int(n.network_address) for n in v6]}
        self._ends = {4: [int(n.broadcast_address) for n in v4], 6: [int(n.broadcast_address) for n in v6]}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __contains__(self, address: Address) -> bool:
        value = int(address)
        starts = self._starts[address.version]
        at = bisect_right(starts, value) - 1
        if at >= 0 and value <= self._ends[address.version][at]:
            return True
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return mapped is not None and mapped in self


@implementer(IRequestFilter)
class IPRules:
    """
    The C{ip-rules} filter: refuses (403) the clients in C{deny}, and those not in C{allow} when it is not empty.

    @ivar allow: the networks that may pass (all, when empty).
    @ivar deny: the networks that may not, whatever C{allow} says.
    """

    consumes: frozenset[bytes] = frozenset()

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        self.allow = NetworkSet(allow)
        self.deny = NetworkSet(deny)

    def __repr__(self) -> str:
        return f"<IPRules allow={len(self.allow)} deny={len(self.deny)} networks>"

    def onRequest(self, context: RequestContext) -> ProxyError | None:
        client = context.client
        if client is None:
            if self.allow:
                return clientError(403, "the client has no IP address (a UNIX socket) and only allowed networks pass")
            return None
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return clientError(403, f"client address {client[:64]!r} is not an IP address")
        if address in self.deny:
            return clientError(403, f"client address {client} is denied by filter rules")
        if self.allow and address not in self.allow:
            return clientError(403, f"client address {client} is not in the allowed networks")
        return None


def _networks(options: PluginOptions, name: str) -> tuple[Network, ...]:
    try:
        return parseNetworks(options.strings(name))
    except ValueError as e:
        raise options.error(name, str(e)) from None


def buildIPRules(options: PluginOptions, environment: FilterEnvironment) -> IPRules:
    """A L{IPRules} from the options of a C{[filters.X]} table with C{type = "ip-rules"}."""
    allow = _networks(options, "allow")
    deny = _networks(options, "deny")
    if not allow and not deny:
        raise options.error("allow", "give allow or deny networks (or both): without either the filter does nothing")
    return IPRules(allow, deny)
