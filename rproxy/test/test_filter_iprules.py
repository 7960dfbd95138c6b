"""
The C{ip-rules} filter (L{rproxy.filters.iprules}): allow and deny lists of IPv4 and IPv6 networks on the
client's address after the trusted-proxy rules; the bisection set behind it; and through a real proxy, with
C{X-Forwarded-For} from a trusted proxy and forged by an untrusted client.
"""

from __future__ import annotations

import ipaddress
import random

from twisted.trial import unittest

from rproxy.errors import ProxyError
from rproxy.filters.iprules import IPRules, NetworkSet
from rproxy.headers import ForwardingPolicy, parseNetworks
from rproxy.interfaces import FilterEnvironment
from rproxy.plugins.filters import ipRules
from rproxy.test.support import ScriptedUpstream, rawRequest, responseStatus, startProxy, useFilters
from rproxy.test.test_conformance import answer, deferredTest, get
from rproxy.testing import Clock, FilterResult, inboundRequest, runFilters, verifyFilterFactory

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def rules(**options: object) -> IPRules:
    built = ipRules.build(options, FilterEnvironment(Clock()))
    assert isinstance(built, IPRules)
    return built


class IPRulesTests(unittest.TestCase):
    """Deny wins; a non-empty allow list lets only its networks through."""

    def check(
        self, filter: IPRules, client: str | None, forwarding: ForwardingPolicy = ForwardingPolicy()
    ) -> FilterResult:
        return self.successResultOf(runFilters([filter], inboundRequest(clientHost=client), forwarding=forwarding))

    def assertPasses(self, filter: IPRules, *clients: str | None) -> None:
        for client in clients:
            self.assertIsNone(self.check(filter, client).verdict, client)

    def assertRefused(self, filter: IPRules, client: str | None, reason: str) -> None:
        verdict = self.check(filter, client).verdict
        self.assertIsInstance(verdict, ProxyError, client)
        assert isinstance(verdict, ProxyError)
        self.assertEqual((verdict.status, verdict.reason), (403, reason))

    def test_denyOnly(self) -> None:
        filter = rules(deny=["203.0.113.0/24", "2001:db8:bad::/48"])
        self.assertRefused(filter, "203.0.113.9", "client address 203.0.113.9 is denied by filter rules")
        self.assertRefused(filter, "2001:db8:bad::1", "client address 2001:db8:bad::1 is denied by filter rules")
        self.assertPasses(filter, "203.0.114.1", "198.51.100.1", "2001:db8:bad0::1", "::1", None)

    def test_allowOnly(self) -> None:
        filter = rules(allow=["10.0.0.0/8", "192.168.1.7", "fd00::/8"])
        self.assertPasses(filter, "10.1.2.3", "192.168.1.7", "fd12:3456::1")
        self.assertRefused(filter, "192.168.1.8", "client address 192.168.1.8 is not in the allowed networks")
        self.assertRefused(filter, "fe80::1", "client address fe80::1 is not in the allowed networks")

    def test_denyWins(self) -> None:
        filter = rules(allow=["10.0.0.0/8"], deny=["10.6.6.0/24"])
        self.assertPasses(filter, "10.6.5.255", "10.6.7.0")
        self.assertRefused(filter, "10.6.6.6", "client address 10.6.6.6 is denied by filter rules")

    def test_noAddress(self) -> None:
        """A client on a UNIX socket has no address: refused when only allowed networks may pass."""
        self.assertRefused(
            rules(allow=["10.0.0.0/8"]),
            None,
            "the client has no IP address (a UNIX socket) and only allowed networks pass",
        )
        self.assertPasses(rules(deny=["0.0.0.0/0", "::/0"]), None)

    def test_notAnAddress(self) -> None:
        """Whatever the client field holds, a filter never lets through what it cannot read."""
        self.assertRefused(
            rules(deny=["10.0.0.0/8"]), "unix:/run/x", "client address 'unix:/run/x' is not an IP address"
        )

    def test_ipv4Mapped(self) -> None:
        """An IPv4 client on a dual-stack socket is checked against the IPv4 networks too."""
        filter = rules(allow=["192.0.2.0/24"], deny=["192.0.2.66"])
        self.assertPasses(filter, "::ffff:192.0.2.1")
        self.assertRefused(filter, "::ffff:192.0.2.66", "client address ::ffff:192.0.2.66 is denied by filter rules")
        self.assertRefused(
            filter, "::ffff:198.51.100.1", "client address ::ffff:198.51.100.1 is not in the allowed networks"
        )

    def test_scopedIPv6(self) -> None:
        self.assertRefused(
            rules(deny=["fe80::/10"]), "fe80::1%eth0", "client address fe80::1%eth0 is denied by filter rules"
        )

    def test_clientAfterTrustedProxies(self) -> None:
        """The rules read the client's address after the trusted-proxy rules, not the peer's."""
        filter = rules(deny=["203.0.113.0/24"])
        trusting = ForwardingPolicy(trustedProxies=parseNetworks(["192.0.2.1"]))
        forwarded = inboundRequest(clientHost="192.0.2.1", headers=[(b"x-forwarded-for", b"203.0.113.9")])
        result = self.successResultOf(runFilters([filter], forwarded, forwarding=trusting))
        self.assertEqual(result.verdict.status, 403)  # type: ignore[union-attr]
        result = self.successResultOf(runFilters([filter], forwarded))
        self.assertIsNone(result.verdict)

    def test_commaSeparated(self) -> None:
        """A string is a comma-separated list, as on a command line."""
        filter = rules(allow="10.0.0.0/8, 2001:db8::/32")
        self.assertPasses(filter, "10.0.0.1", "2001:db8::1")
        self.assertEqual(self.check(filter, "11.0.0.1").status, 403)

    def test_invalid(self) -> None:
        for option, value in (("allow", "10.0.0.0/33"), ("deny", "not-a-network"), ("deny", "2001:db8::/129")):
            error = self.assertRaises(ValueError, rules, **{option: ["10.0.0.0/8", value]})
            self.assertIn(f"option {option}", str(error))
            self.assertIn(repr(value), str(error))
        error = self.assertRaises(ValueError, rules, allow=[1, 2])
        self.assertIn("option allow", str(error))

    def test_nothingToDo(self) -> None:
        error = self.assertRaises(ValueError, rules)
        self.assertIn("give allow or deny", str(error))

    def test_factory(self) -> None:
        built = verifyFilterFactory(ipRules, {"allow": ["127.0.0.0/8"], "deny": ["::1"]})
        self.assertEqual(built.consumes, frozenset())  # type: ignore[attr-defined]


class NetworkSetTests(unittest.TestCase):
    """Membership by bisection over the merged ranges, against the obvious linear scan."""

    def test_merged(self) -> None:
        networks = NetworkSet(parseNetworks(["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "::/0", "10.0.0.5"]))
        self.assertEqual([str(n) for n in networks.networks], ["10.0.0.0/23", "::/0"])

    def test_edges(self) -> None:
        networks = NetworkSet(parseNetworks(["10.0.0.0/24", "10.0.2.0/24", "2001:db8::/127"]))
        inside = ["10.0.0.0", "10.0.0.255", "10.0.2.0", "10.0.2.255", "2001:db8::", "2001:db8::1"]
        outside = ["9.255.255.255", "10.0.1.0", "10.0.1.255", "10.0.3.0", "0.0.0.0", "255.255.255.255", "2001:db8::2"]
        for address in inside:
            self.assertIn(ipaddress.ip_address(address), networks)
        for address in outside:
            self.assertNotIn(ipaddress.ip_address(address), networks)
        self.assertNotIn(ipaddress.ip_address("10.0.0.1"), NetworkSet([]))

    def test_largeList(self) -> None:
        """Thousands of random networks of both versions: the same answers as a linear scan."""
        generator = random.Random(7)
        given = [
            ipaddress.ip_network((generator.getrandbits(32), generator.randint(8, 32)), strict=False)
            for _ in range(3000)
        ] + [
            ipaddress.ip_network(
                (generator.getrandbits(128) & ~((1 << 96) - 1), generator.randint(16, 64)), strict=False
            )
            for _ in range(1000)
        ]
        networks = NetworkSet(given)
        probes = [ipaddress.ip_address(generator.getrandbits(32)) for _ in range(1000)]
        probes += [n.network_address for n in given[::7]] + [n.broadcast_address for n in given[::11]]
        probes += [ipaddress.ip_address(int(n.broadcast_address) + 1) for n in given[:3000:13] if n.prefixlen]
        probes += [ipaddress.ip_address(generator.getrandbits(128) & ~((1 << 100) - 1)) for _ in range(300)]
        found = 0
        for address in probes:
            expected = any(address in n for n in given)
            self.assertEqual(address in networks, expected, address)
            found += expected
        self.assertGreater(found, 100)
        self.assertGreater(len(probes) - found, 100)


class RealProxyTests(unittest.TestCase):
    """Requests through a real rproxy with ip-rules, from 127.0.0.1, with and without a trusted proxy."""

    timeout = 20

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, answer(OK))

    async def status(self, port: int, forwardedFor: bytes | None = None) -> tuple[int, bytes]:
        extra = b"" if forwardedFor is None else b"X-Forwarded-For: " + forwardedFor + b"\r\n"
        response = await rawRequest(port, get(b"/", extra))
        return responseStatus(response), response

    @deferredTest
    async def test_peerAddress(self) -> None:
        proxy = startProxy(self, [self.upstream.url])
        useFilters(proxy, rules(deny=["127.0.0.0/8"]))
        status, response = await self.status(proxy.port)
        self.assertEqual(status, 403)
        self.assertIn(b"client address 127.0.0.1 is denied by filter rules", response)
        useFilters(proxy, rules(allow=["127.0.0.1", "::1"]))
        self.assertEqual((await self.status(proxy.port))[0], 200)
        self.assertEqual(len(self.upstream.requests), 1)

    @deferredTest
    async def test_trustedProxy(self) -> None:
        """Behind a trusted proxy (127.0.0.1), the client is the last address it vouches for, IPv4 or IPv6."""
        proxy = startProxy(self, [self.upstream.url], "--trusted-proxy", "127.0.0.1")
        useFilters(proxy, rules(allow=["203.0.113.0/24", "2001:db8::/32"], deny=["203.0.113.66", "2001:db8:bad::/48"]))
        cases = [
            (b"203.0.113.9", 200),
            (b"2001:db8::9", 200),
            (b"203.0.113.66", 403),
            (b"2001:db8:bad::1", 403),
            (b"198.51.100.7", 403),
            (b"203.0.113.66, 203.0.113.9", 200),  # what the client said is no better than who said it
            (b"203.0.113.9, 198.51.100.7", 403),
        ]
        for forwardedFor, expected in cases:
            status, response = await self.status(proxy.port, forwardedFor)
            self.assertEqual(status, expected, (forwardedFor, response))
        self.assertEqual(len(self.upstream.requests), 3)
        self.assertEqual(self.upstream.requests[0].headers(b"x-forwarded-for"), [b"203.0.113.9, 127.0.0.1"])

    @deferredTest
    async def test_forgedForwardedFor(self) -> None:
        """From a peer that is not a trusted proxy, X-Forwarded-For does not change who the client is."""
        proxy = startProxy(self, [self.upstream.url], "--trusted-proxy", "192.0.2.1")
        useFilters(proxy, rules(allow=["203.0.113.0/24"]))
        status, response = await self.status(proxy.port, b"203.0.113.9")
        self.assertEqual(status, 403)
        self.assertIn(b"client address 127.0.0.1 is not in the allowed networks", response)
        useFilters(proxy, rules(deny=["127.0.0.1"]))
        status, response = await self.status(proxy.port, b"203.0.113.9")
        self.assertEqual(status, 403)
        self.assertIn(b"client address 127.0.0.1 is denied by filter rules", response)
        self.assertEqual(self.upstream.requests, [])
