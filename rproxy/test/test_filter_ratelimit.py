"""
The C{rate-limit} and C{concurrency-limit} filters: unit tests through L{runFilters} on a L{Clock} (rates,
bursts, refills, keys, the bounded key table, the RateLimit fields, option errors), and real-socket tests
through a proxy in front of twisted.web upstreams, with curl and raw client sockets as clients.
"""

from __future__ import annotations

import gc
import ipaddress
import re
import tracemalloc
from collections.abc import Iterable

import jwt
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from rproxy.errors import ProxyError, clientError
from rproxy.filters.ratelimit import ConcurrencyLimit, KeyRule, RateLimit, parseRate
from rproxy.headers import ForwardingPolicy
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.plugins.filters import concurrencyLimit, jwtAuth, rateLimit
from rproxy.proxy.message import FilterVerdict, InboundRequest, OutboundRequest, RequestContext
from rproxy.test.support import (
    LogCapture,
    curl,
    freePort,
    headerValues,
    rawRequest,
    responseStatus,
    startProxy,
    startUpstream,
    useFilters,
    waitFor,
)
from rproxy.test.test_conformance import deferredTest
from rproxy.testing import FilterResult, inboundRequest, runFilters, verifyFilterFactory

#: One item of a structured-field list with integer parameters, as the RateLimit fields hold.
SF_ITEM = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"(?:;[a-z*][a-z0-9_.*-]*=\d+)+')


def fields(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of C{name} (case-insensitive) among C{headers}."""
    return [value for key, value in headers if key.lower() == name.lower()]


def request(client: str | None = "192.0.2.1", headers: Iterable[tuple[bytes, bytes]] = ()) -> InboundRequest:
    """A request from C{client} with C{headers}."""
    return inboundRequest(clientHost=client, headers=headers)


def exchange(client: str | None = "192.0.2.1", headers: Iterable[tuple[bytes, bytes]] = ()) -> RequestContext:
    """The context of an exchange of a request from C{client}, as a request filter gets it."""
    inbound = request(client, headers)
    return RequestContext(inbound, OutboundRequest.fromInbound(inbound, ForwardingPolicy()), client)


@implementer(IRequestFilter)
class ClaimsFrom:
    """Stands for an authenticating filter: sets C{context.claims} from the C{x-test-claims} field (k=v;k=v)."""

    consumes = frozenset({b"x-test-claims"})

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        values = context.inbound.headers.getRawHeaders(b"x-test-claims")
        if values:
            claims: dict[str, object] = {}
            for pair in values[0].decode().split(";"):
                name, _, value = pair.partition("=")
                claims[name] = [value] if name == "roles" else value
            context.claims = claims
        return None


@implementer(IRequestFilter)
class Refuse:
    """A filter after the limit that refuses everything (as an authentication failure would)."""

    consumes: frozenset[bytes] = frozenset()

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        return clientError(401, "no credentials")


class RateLimitTests(unittest.TestCase):
    """The token buckets, on a simulated clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # a clock reading like the reactor's: large floats round

    def limit(self, **options: object) -> RateLimit:
        built = rateLimit.build(options, FilterEnvironment(self.clock))
        assert isinstance(built, RateLimit)
        return built

    def send(
        self,
        filters: list[object],
        inbound: InboundRequest | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        forwarding: ForwardingPolicy = ForwardingPolicy(),
    ) -> FilterResult:
        """Run C{filters} on C{inbound}, with C{headers} as the upstream's response fields."""
        return self.successResultOf(runFilters(filters, inbound, headers=headers, forwarding=forwarding))

    def allowed(self, limit: object, count: int, inbound: InboundRequest | None = None) -> int:
        """How many of C{count} requests sent now C{limit} lets through."""
        return sum(self.send([limit], inbound).verdict is None for _ in range(count))

    def test_burst(self) -> None:
        """A full bucket lets C{burst} requests through at once, and refuses the next."""
        limit = self.limit(rate="1/m", burst=5)
        self.assertEqual(self.allowed(limit, 8), 5)

    def test_defaultBurst(self) -> None:
        """Without C{burst}, a bucket holds a second's worth of requests (at least one)."""
        self.assertEqual(self.limit(rate="100/s").burst, 100)
        self.assertEqual(self.limit(rate="2.5/s").burst, 3)
        self.assertEqual(self.limit(rate="600/m").burst, 10)
        self.assertEqual(self.limit(rate="1/h").burst, 1)
        self.assertEqual(self.allowed(self.limit(rate="10/s"), 15), 10)

    def test_steadyRate(self) -> None:
        """
        Once the burst is spent, requests get through at the rate: of 200 sent at 20/s over 10 seconds,
        exactly the 100 a rate of 10/s allows.
        """
        limit = self.limit(rate="10/s")
        self.assertEqual(self.allowed(limit, 10), 10)
        passed = 0
        for _ in range(200):
            self.clock.advance(0.05)
            passed += self.send([limit]).verdict is None
        self.assertEqual(passed, 100)

    def test_refill(self) -> None:
        """An empty bucket gains a token per 1/rate seconds, and never more than C{burst}."""
        limit = self.limit(rate="1/m", burst=5)
        self.assertEqual(self.allowed(limit, 5), 5)
        self.clock.advance(59)
        self.assertEqual(self.allowed(limit, 1), 0)
        self.clock.advance(1)
        self.assertEqual(self.allowed(limit, 2), 1)
        self.clock.advance(3600)
        self.assertEqual(self.allowed(limit, 10), 5)

    def test_deniedRequestsTakeNothing(self) -> None:
        """A refused request takes no token: hammering an empty bucket does not push its refill back."""
        limit = self.limit(rate="1/m", burst=1)
        self.assertEqual(self.allowed(limit, 1), 1)
        for _ in range(59):
            self.clock.advance(1)
            self.assertEqual(self.allowed(limit, 1), 0)
        self.clock.advance(1)
        self.assertEqual(self.allowed(limit, 1), 1)

    def test_refusal(self) -> None:
        """
        Past the limit: 429, C{Retry-After} in whole seconds rounded up, the RateLimit fields with nothing
        left, and a reason naming the limit and the client.
        """
        limit = self.limit(rate="1/m", burst=2)
        self.allowed(limit, 2, request("203.0.113.9"))
        result = self.send([limit], request("203.0.113.9"))
        self.assertIsInstance(result.verdict, ProxyError)
        self.assertEqual(result.status, 429)
        assert isinstance(result.verdict, ProxyError)
        self.assertEqual(result.verdict.reason, "rate limit 1/m (burst 2) exceeded for client 203.0.113.9")
        head = dict(result.verdict.responseHead())
        self.assertEqual(head[b"Retry-After"], b"60")
        self.assertEqual(head[b"RateLimit"], b'"1/m burst 2 per client";r=0;t=60')
        self.assertEqual(head[b"RateLimit-Policy"], b'"1/m burst 2 per client";q=1;w=60')
        self.assertIn(b"rate limit 1/m (burst 2) exceeded for client 203.0.113.9", result.body)
        self.clock.advance(45.5)
        result = self.send([limit], request("203.0.113.9"))
        assert isinstance(result.verdict, ProxyError)
        self.assertEqual(result.verdict.retryAfter, 15)  # 14.5 s, rounded up
        self.assertEqual(fields(result.headers, b"RateLimit"), [b'"1/m burst 2 per client";r=0;t=15'])
        self.clock.advance(14.4)
        result = self.send([limit], request("203.0.113.9"))
        assert isinstance(result.verdict, ProxyError)
        self.assertEqual(result.verdict.retryAfter, 1)  # 0.1 s: at least 1

    def test_retryAfterAtLeastOne(self) -> None:
        """At 100/s the next token is 10 ms away: C{Retry-After} says 1, never 0."""
        limit = self.limit(rate="100/s")
        self.allowed(limit, 100)
        result = self.send([limit])
        assert isinstance(result.verdict, ProxyError)
        self.assertEqual(result.verdict.retryAfter, 1)
        self.assertEqual(fields(result.headers, b"RateLimit"), [b'"100/s burst 100 per client";r=0;t=1'])

    def test_fieldsOnAllowedResponses(self) -> None:
        """
        A response to a request let through carries the policy and what is left: C{r} whole requests, and
        C{t} seconds until one more (0 for a full bucket); the upstream's own RateLimit fields stay.
        """
        limit = self.limit(rate="600/m", burst=3, **{"policy-name": "api"})
        upstream = [(b"RateLimit-Policy", b'"origin";q=5;w=1'), (b"RateLimit", b'"origin";r=4;t=1')]
        result = self.send([limit], headers=upstream)
        self.assertIsNone(result.verdict)
        self.assertEqual(fields(result.headers, b"RateLimit-Policy"), [b'"origin";q=5;w=1', b'"api";q=600;w=60'])
        self.assertEqual(fields(result.headers, b"RateLimit"), [b'"origin";r=4;t=1', b'"api";r=2;t=1'])
        self.assertEqual(result.context.notes, {"rate-limit api": '"api";r=2;t=1'})  # for the access log too
        for value in fields(result.headers, b"RateLimit") + fields(result.headers, b"RateLimit-Policy"):
            self.assertRegex(value, SF_ITEM)
        self.assertEqual(fields(self.send([limit]).headers, b"RateLimit"), [b'"api";r=1;t=1'])
        self.clock.advance(0.05)  # 1.5 tokens: none left after this one, the next in 0.05 s
        self.assertEqual(fields(self.send([limit]).headers, b"RateLimit"), [b'"api";r=0;t=1'])
        self.clock.advance(10)  # full again: 3 tokens
        self.assertEqual(fields(self.send([limit]).headers, b"RateLimit"), [b'"api";r=2;t=1'])
        self.clock.advance(60)
        limit = self.limit(rate="1/h", burst=3)
        self.assertEqual(fields(self.send([limit]).headers, b"RateLimit"), [b'"1/h burst 3 per client";r=2;t=3600'])

    def test_policyNameQuoted(self) -> None:
        """A policy name with quotes and backslashes is a valid structured-field String."""
        limit = self.limit(rate=5, **{"policy-name": 'say "hi" \\ there'})
        (value,) = fields(self.send([limit]).headers, b"RateLimit-Policy")
        self.assertEqual(value, b'"say \\"hi\\" \\\\ there";q=5;w=1')
        self.assertRegex(value, SF_ITEM)

    def test_fieldsOnLaterRefusals(self) -> None:
        """A later filter's refusal of a request the limit let through carries the limit's fields too."""
        limit = self.limit(rate="1/m", burst=2)
        result = self.send([limit, Refuse()])
        self.assertEqual(result.status, 401)
        self.assertEqual(fields(result.headers, b"RateLimit"), [b'"1/m burst 2 per client";r=1;t=60'])

    def test_keyClient(self) -> None:
        """C{key = "client"} (the default): each client address has a bucket of its own."""
        limit = self.limit(rate="1/m", burst=2)
        self.assertEqual(self.allowed(limit, 3, request("192.0.2.1")), 2)
        self.assertEqual(self.allowed(limit, 3, request("192.0.2.2")), 2)
        self.assertEqual(self.allowed(limit, 3, request("2001:db8::1")), 2)
        self.assertEqual(limit.keyCount, 3)

    def test_keyClientBehindTrustedProxy(self) -> None:
        """
        The client is C{context.client}: the address a trusted proxy forwarded for, but only a trusted
        proxy's C{X-Forwarded-For} counts (a client cannot dodge its bucket by forging one).
        """
        forwarding = ForwardingPolicy(trustedProxies=(ipaddress.ip_network("10.0.0.0/8"),))
        limit = self.limit(rate="1/m", burst=1)

        def via(peer: str, forwardedFor: bytes) -> FilterResult:
            inbound = request(peer, [(b"x-forwarded-for", forwardedFor)])
            return self.send([limit], inbound, forwarding=forwarding)

        self.assertIsNone(via("10.0.0.1", b"203.0.113.9").verdict)
        self.assertIsNone(via("10.0.0.2", b"203.0.113.10").verdict)  # another client, same proxy farm
        refused = via("10.0.0.3", b"198.51.100.1, 203.0.113.9").verdict
        assert isinstance(refused, ProxyError)
        self.assertIn("client 203.0.113.9", refused.reason)
        self.assertIsNone(via("192.0.2.7", b"203.0.113.11").verdict)
        forged = via("192.0.2.7", b"203.0.113.12").verdict  # not a trusted peer: its own address counts
        assert isinstance(forged, ProxyError)
        self.assertIn("client 192.0.2.7", forged.reason)

    def test_keyClientIPv6(self) -> None:
        """
        An IPv6 client is counted by its /64 (a host picks any address of it: one bucket each would be no
        limit), or by the C{ipv6-prefix} bits; an IPv4-mapped address (a dual-stack socket's) is its IPv4 one.
        """
        limit = self.limit(rate="1/m", burst=1)
        self.assertIsNone(self.send([limit], request("2001:db8:1:2::1")).verdict)
        for sameNetwork in ("2001:db8:1:2::2", "2001:DB8:1:2:ffff:ffff:ffff:ffff"):
            refused = self.send([limit], request(sameNetwork)).verdict
            assert isinstance(refused, ProxyError)
            self.assertIn("client 2001:db8:1:2::/64", refused.reason)
        self.assertIsNone(self.send([limit], request("2001:db8:1:3::1")).verdict)
        self.assertIsNone(self.send([limit], request("192.0.2.9")).verdict)
        self.assertIsNotNone(self.send([limit], request("::ffff:192.0.2.9")).verdict)
        perAddress = self.limit(rate="1/m", burst=1, **{"ipv6-prefix": 128})
        self.assertEqual(self.allowed(perAddress, 2, request("2001:db8::1")), 1)
        self.assertEqual(self.allowed(perAddress, 2, request("2001:db8::2")), 1)
        wider = self.limit(rate="1/m", burst=1, **{"ipv6-prefix": 48})
        self.assertEqual(self.allowed(wider, 1, request("2001:db8:1:2::1")), 1)
        self.assertEqual(self.allowed(wider, 1, request("2001:db8:1:3::1")), 0)

    def test_keyHeader(self) -> None:
        """
        C{key = "header:NAME"}: a bucket per value of the field; a refusal names the field, not its
        value (it may be a credential), and the table keeps a fixed-size digest of it.
        """
        limit = self.limit(rate="1/m", burst=1, key="header:X-Api-Key")
        secret = b"sk_live_" + b"9" * 4000

        def withKey(value: bytes, client: str) -> FilterResult:
            return self.send([limit], request(client, [(b"x-api-key", value)]))

        self.assertIsNone(withKey(secret, "192.0.2.1").verdict)
        self.assertIsNone(withKey(b"other", "192.0.2.1").verdict)
        refused = withKey(secret, "192.0.2.2")  # the key follows the field, not the address
        assert isinstance(refused.verdict, ProxyError)
        self.assertEqual(refused.verdict.reason, "rate limit 1/m (burst 1) exceeded for header X-Api-Key")
        self.assertNotIn(b"sk_live", refused.body + b"".join(v for _, v in refused.headers))
        self.assertTrue(all(key is not None and len(key) == 16 for key in limit._buckets))

    def test_keyRoute(self) -> None:
        """C{key = "route"}: one bucket for every request through the filter."""
        limit = self.limit(rate="1/m", burst=3, key="route")
        passed = [self.send([limit], request(f"192.0.2.{i}")).verdict is None for i in range(1, 6)]
        self.assertEqual(passed, [True, True, True, False, False])
        refused = self.send([limit]).verdict
        assert isinstance(refused, ProxyError)
        self.assertEqual(
            refused.reason, "rate limit 1/m (burst 3) exceeded for this route (one count for all requests)"
        )
        self.assertEqual(limit.keyCount, 1)

    def test_keyClaim(self) -> None:
        """C{key = "claim:NAME"}: a bucket per value of a claim an earlier filter verified."""
        limit = self.limit(rate="1/m", burst=1, key="claim:sub")

        def asUser(claims: bytes, client: str = "192.0.2.1") -> FilterVerdict:
            return self.send([ClaimsFrom(), limit], request(client, [(b"x-test-claims", claims)])).verdict

        self.assertIsNone(asUser(b"sub=alice"))
        self.assertIsNone(asUser(b"sub=bob"))
        refused = asUser(b"sub=alice", "192.0.2.99")
        assert isinstance(refused, ProxyError)
        self.assertEqual(refused.reason, "rate limit 1/m (burst 1) exceeded for claim sub")
        self.assertNotIn("alice", refused.reason)

    def test_keyClaimOfTheJwtFilter(self) -> None:
        """C{claim:sub} after the C{jwt} filter: one bucket per verified subject, whatever the token."""
        secret = "s" * 32
        bearer = jwtAuth.build({"algorithms": ["HS256"], "secret": secret}, FilterEnvironment(self.clock))
        limit = self.limit(rate="1/m", burst=2, key="claim:sub")

        def asUser(subject: str, issuedAt: int) -> FilterResult:
            claims = {"sub": subject, "iat": issuedAt, "exp": int(self.clock.seconds()) + 3600}
            token = jwt.encode(claims, secret, algorithm="HS256").encode("ascii")
            return self.send([bearer, limit], request(headers=[(b"authorization", b"Bearer " + token)]))

        passed = [asUser("alice", i).verdict is None for i in range(3)]  # three different tokens
        self.assertEqual(passed, [True, True, False])
        self.assertIsNone(asUser("bob", 0).verdict)
        refused = asUser("alice", 9).verdict
        assert isinstance(refused, ProxyError)
        self.assertEqual(refused.reason, "rate limit 1/m (burst 2) exceeded for claim sub")

    def test_missingKeyShared(self) -> None:
        """
        C{missing-key = "shared"} (the default): requests without a key share one bucket, a claim that is
        not a string or a number is no key, and a UNIX-socket client has no address.
        """
        limit = self.limit(rate="1/m", burst=2, key="claim:roles")
        self.assertIsNone(self.send([ClaimsFrom(), limit]).verdict)
        self.assertIsNone(self.send([ClaimsFrom(), limit], request(headers=[(b"x-test-claims", b"roles=a")])).verdict)
        refused = self.send([ClaimsFrom(), limit], request("192.0.2.8")).verdict
        assert isinstance(refused, ProxyError)
        self.assertEqual(
            refused.reason,
            "rate limit 1/m (burst 2) exceeded for requests without claim roles (one count for them all)",
        )
        byClient = self.limit(rate="1/m", burst=1)
        self.assertEqual(self.allowed(byClient, 3, request(None)), 1)
        self.assertEqual(self.allowed(byClient, 1, request("192.0.2.1")), 1)

    def test_missingKeyDeny(self) -> None:
        """C{missing-key = "deny"}: a request without a key is refused with 429, whatever is left."""
        limit = self.limit(rate="100/s", key="header:X-Api-Key", **{"missing-key": "deny"})
        result = self.send([limit])
        assert isinstance(result.verdict, ProxyError)
        self.assertEqual((result.status, result.verdict.reason), (429, "no header X-Api-Key to rate-limit on"))
        self.assertIsNone(result.verdict.retryAfter)  # waiting will not give it a key
        empty = self.send([limit], request(headers=[(b"x-api-key", b"")])).verdict
        self.assertIsInstance(empty, ProxyError)
        self.assertIsNone(self.send([limit], request(headers=[(b"x-api-key", b"k")])).verdict)
        unix = self.send([self.limit(rate="100/s", **{"missing-key": "deny"})], request(None)).verdict
        assert isinstance(unix, ProxyError)
        self.assertEqual(unix.reason, "no client address to rate-limit on")

    def test_fractionalRates(self) -> None:
        """
        Rates below one a second and fractional ones: the policy's quota and window are the whole numbers
        of the same ratio, and the buckets refill at the exact rate.
        """
        half = self.limit(rate="0.5/s")
        self.assertEqual((half.burst, half.rate.quota, half.rate.window), (1, 1, 2))
        self.assertIsNone(self.send([half]).verdict)
        refused = self.send([half]).verdict
        assert isinstance(refused, ProxyError)
        self.assertEqual(refused.retryAfter, 2)
        self.clock.advance(1.9)
        self.assertIsInstance(self.send([half]).verdict, ProxyError)
        self.clock.advance(0.1)
        self.assertIsNone(self.send([half]).verdict)
        self.assertEqual(parseRate("1.5/m"), parseRate("1.5 / m"))
        self.assertEqual((parseRate("1.5/m").quota, parseRate("1.5/m").window), (3, 120))
        self.assertEqual((parseRate(2.5).quota, parseRate(2.5).window, parseRate(2.5).text), (5, 2, "2.5/s"))
        self.assertEqual((parseRate("10/h").quota, parseRate("10/h").window), (10, 3600))
        self.assertEqual(parseRate("7").text, "7/s")
        fast = self.limit(rate=2.5)
        (policy,) = fields(self.send([fast]).headers, b"RateLimit-Policy")
        self.assertEqual(policy, b'"2.5/s burst 3 per client";q=5;w=2')

    def test_boundedTable(self) -> None:
        """
        10,000 distinct clients in one simulated second keep the table at C{max-keys} and its memory flat,
        while a client active all along keeps its bucket: it gets exactly its burst, as without the flood.
        """
        limit = self.limit(rate="1/m", burst=5, **{"max-keys": 1000})
        active = request("198.51.100.1")
        passed = {"flood": 0, "active": 0}
        largest = 0
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        memory = 0
        for i in range(10_000):
            if i == 2000:
                gc.collect()
                memory = tracemalloc.get_traced_memory()[0]
            self.clock.advance(0.0001)
            passed["flood"] += self.send([limit], request(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")).verdict is None
            if i % 10 == 0:
                passed["active"] += self.send([limit], active).verdict is None
            largest = max(largest, limit.keyCount)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - memory
        self.assertEqual(passed, {"flood": 10_000, "active": 5})
        self.assertEqual(largest, 1000)
        self.assertLess(grown, 100_000)  # 8000 more keys without the bound: well over 1 MB
        self.assertEqual(limit.forgotten, 9001)  # every flood bucket was part-used: each eviction forgot one
        refused = self.send([limit], active).verdict
        assert isinstance(refused, ProxyError)
        self.assertIn("client 198.51.100.1", refused.reason)

    def test_fullBucketsDropped(self) -> None:
        """Buckets that refilled are dropped as new keys come (two per new key), so the table shrinks back."""
        limit = self.limit(rate="1/s", burst=1, **{"max-keys": 1000})
        for i in range(1000):
            self.send([limit], request(f"10.0.{i >> 8}.{i & 255}"))
        self.assertEqual(limit.keyCount, 1000)
        self.clock.advance(1)
        for i in range(100):
            self.send([limit], request(f"10.1.0.{i}"))
        self.assertEqual(limit.keyCount, 900)
        self.assertEqual(limit.forgotten, 0)

    def test_forgettingIsLogged(self) -> None:
        """Forgetting buckets that were not full is worth a warning, at most one a minute."""
        logs = LogCapture(self)
        limit = self.limit(rate="1/h", **{"max-keys": 2})
        for i in range(10):
            self.send([limit], request(f"10.0.0.{i}"))
        self.clock.advance(61)
        self.send([limit], request("10.0.1.1"))
        self.send([limit], request("10.0.1.2"))
        warnings = [text for text in logs.formatted() if "forgot buckets" in text]
        self.assertEqual(len(warnings), 2)
        self.assertIn("2 keys in use", warnings[0])

    def test_clockBackwards(self) -> None:
        """A clock set back neither refills nor empties a bucket."""
        limit = self.limit(rate="1/m", burst=2)
        self.allowed(limit, 1)
        self.clock.rightNow -= 3600
        self.assertEqual(self.allowed(limit, 2), 1)
        self.clock.advance(60)
        self.assertEqual(self.allowed(limit, 2), 1)

    def test_optionErrors(self) -> None:
        """Each bad option is a C{ValueError} naming it."""
        bad: list[tuple[dict[str, object], str]] = [
            ({}, "option rate: required"),
            ({"rate": "fast"}, "option rate: not a rate: 'fast'"),
            ({"rate": "0/s"}, "option rate: must be above zero"),
            ({"rate": -1}, "option rate: must be greater than 0"),
            ({"rate": True}, "option rate: expected a number"),
            ({"rate": "10/d"}, "option rate: not a rate"),
            ({"rate": "1e3/s"}, "option rate: not a rate"),
            ({"rate": "5/s", "burst": 0}, "option burst: must be at least 1"),
            ({"rate": "5/s", "burst": 2.5}, "option burst: expected a whole number"),
            ({"rate": "5/s", "key": "ip"}, "option key: not a key: 'ip'"),
            ({"rate": "5/s", "key": "header:"}, "option key: not a key"),
            ({"rate": "5/s", "key": "header:X Api"}, "option key: not a key"),
            ({"rate": "5/s", "key": "claim:"}, "option key: not a key"),
            ({"rate": "5/s", "key": "route:x"}, "option key: not a key"),
            ({"rate": "5/s", "key": 3}, "option key: expected a string"),
            ({"rate": "5/s", "missing-key": "allow"}, "option missing-key: expected shared or deny"),
            ({"rate": "5/s", "max-keys": 0}, "option max-keys: must be at least 1"),
            ({"rate": "5/s", "ipv6-prefix": 0}, "option ipv6-prefix: must be at least 1"),
            ({"rate": "5/s", "ipv6-prefix": 129}, "option ipv6-prefix: must be at most 128"),
            ({"rate": "5/s", "policy-name": "caf\u00e9"}, "option policy-name: expected 1 to 100 printable"),
            ({"rate": "5/s", "policy-name": "x" * 101}, "option policy-name: expected 1 to 100 printable"),
            ({"rate": "5/s", "polcy-name": "x"}, "unknown option 'polcy-name'"),
        ]
        for options, message in bad:
            with self.subTest(options=options):
                error = self.assertRaises(ValueError, rateLimit.build, options, FilterEnvironment(self.clock))
                self.assertIn(message, str(error))
                self.assertIn("filter rate-limit", str(error))

    def test_keyRuleParsing(self) -> None:
        """Key options are case-insensitive in their kind and keep the name as written."""
        self.assertEqual(KeyRule.parse(" Header: X-Api-Key "), KeyRule("header", "X-Api-Key"))
        self.assertEqual(KeyRule.parse("claim:https://example.com/tenant").name, "https://example.com/tenant")
        self.assertEqual(KeyRule.parse("ROUTE", deny=True), KeyRule("route", deny=True))

    def test_verifyFilterFactory(self) -> None:
        """C{rate-limit} keeps the filter-factory contract."""
        built = verifyFilterFactory(rateLimit, {"rate": "10/s", "key": "header:X-Api-Key"})
        self.assertIsInstance(built, RateLimit)
        self.assertEqual(rateLimit.name, "rate-limit")


class ConcurrencyLimitUnitTests(unittest.TestCase):
    """The counts of requests in flight, driven as the chain drives them."""

    def limit(self, **options: object) -> ConcurrencyLimit:
        built = concurrencyLimit.build(options, FilterEnvironment(Clock()))
        assert isinstance(built, ConcurrencyLimit)
        return built

    def test_limit(self) -> None:
        """C{max} requests of a key are let through; the next gets 429 and C{Retry-After: 1}."""
        limit = self.limit(max=2)
        contexts = [exchange() for _ in range(3)]
        self.assertIsNone(limit.onRequest(contexts[0]))
        self.assertIsNone(limit.onRequest(contexts[1]))
        refused = limit.onRequest(contexts[2])
        assert isinstance(refused, ProxyError)
        self.assertEqual((refused.status, refused.retryAfter), (429, 1))
        self.assertEqual(refused.reason, "concurrency limit 2 reached for client 192.0.2.1")
        other = exchange("192.0.2.2")
        self.assertIsNone(limit.onRequest(other))
        self.assertEqual((limit.inFlight(b"192.0.2.1"), limit.total, limit.keyCount), (2, 3, 2))

    def test_releasedWhenTheExchangeEnds(self) -> None:
        """A slot is held until the exchange ends, and given back then."""
        limit = self.limit(max=1)
        context = exchange()
        self.assertIsNone(limit.onRequest(context))
        self.assertIsInstance(limit.onRequest(exchange()), ProxyError)
        context.end()
        self.assertEqual((limit.total, limit.keyCount), (0, 0))
        again = exchange()
        self.assertIsNone(limit.onRequest(again))
        self.assertEqual(limit.total, 1)

    def test_releasedThroughRunFilters(self) -> None:
        """Through a whole chain run (an upstream response; a later filter's refusal), nothing stays counted."""
        limit = self.limit(max=1)
        result = self.successResultOf(runFilters([limit], body=[b"a", b"b"]))
        self.assertEqual(result.body, b"ab")
        refused = self.successResultOf(runFilters([limit, Refuse()]))
        self.assertEqual(refused.status, 401)
        self.assertEqual(limit.total, 0)

    def test_twoInOneChain(self) -> None:
        """Two limits in one chain (a route's and its service's) each count the request, and each lets it go."""
        first, second = self.limit(max=1), self.limit(max=1)
        context = exchange()
        self.assertIsNone(first.onRequest(context))
        self.assertIsNone(second.onRequest(context))
        self.assertEqual((first.total, second.total), (1, 1))
        context.end()
        self.assertEqual((first.total, second.total), (0, 0))

    def test_keys(self) -> None:
        """The keys and C{missing-key} work as for C{rate-limit}."""
        limit = self.limit(max=1, key="header:X-Api-Key", **{"missing-key": "deny"})
        held = [exchange(headers=[(b"x-api-key", value)]) for value in (b"a", b"b")]
        for context in held:
            self.assertIsNone(limit.onRequest(context))
        busy = limit.onRequest(exchange("192.0.2.9", [(b"x-api-key", b"a")]))
        assert isinstance(busy, ProxyError)
        self.assertEqual(busy.reason, "concurrency limit 1 reached for header X-Api-Key")
        missing = limit.onRequest(exchange())
        assert isinstance(missing, ProxyError)
        self.assertEqual((missing.status, missing.reason), (429, "no header X-Api-Key to limit concurrency on"))
        route = self.limit(max=2, key="route")
        held = [exchange("192.0.2.1"), exchange("192.0.2.2")]
        for context in held:
            self.assertIsNone(route.onRequest(context))
        self.assertIsInstance(route.onRequest(exchange("192.0.2.3")), ProxyError)
        self.assertEqual(route.inFlight(), 2)

    def test_boundedTable(self) -> None:
        """Only keys with requests in flight are kept, at most C{max-keys}: a new key beyond gets 503."""
        limit = self.limit(max=1, **{"max-keys": 100})
        held = [exchange(f"10.0.0.{i}") for i in range(100)]
        for context in held:
            self.assertIsNone(limit.onRequest(context))
        full = limit.onRequest(exchange("10.0.1.1"))
        assert isinstance(full, ProxyError)
        self.assertEqual((full.status, full.retryAfter), (503, 1))
        self.assertIn("100 keys have requests in flight", full.reason)
        held[0].end()
        self.assertEqual(limit.keyCount, 99)
        self.assertIsNone(limit.onRequest(exchange("10.0.1.1")))

    def test_optionErrors(self) -> None:
        """Each bad option is a C{ValueError} naming it."""
        bad: list[tuple[dict[str, object], str]] = [
            ({}, "option max: required"),
            ({"max": 0}, "option max: must be at least 1"),
            ({"max": "two"}, "option max: expected a whole number"),
            ({"max": 2, "key": "user"}, "option key: not a key"),
            ({"max": 2, "missing-key": "no"}, "option missing-key"),
            ({"max": 2, "max-keys": -1}, "option max-keys: must be at least 1"),
            ({"max": 2, "rate": "1/s"}, "unknown option 'rate'"),
        ]
        for options, message in bad:
            with self.subTest(options=options):
                error = self.assertRaises(ValueError, concurrencyLimit.build, options, FilterEnvironment(Clock()))
                self.assertIn(message, str(error))

    def test_verifyFilterFactory(self) -> None:
        """C{concurrency-limit} keeps the filter-factory contract."""
        self.assertIsInstance(verifyFilterFactory(concurrencyLimit, {"max": 4}), ConcurrencyLimit)


class Held(resource.Resource):
    """
    A twisted.web upstream that holds each request until the test lets it go: C{/hold} sends nothing,
    C{/partial} sends its head and part of its body first.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[server.Request] = []

    def render_GET(self, request: server.Request) -> object:
        if request.path == b"/partial":
            request.setHeader(b"content-length", b"100")
            request.write(b"x" * 10)
        self.waiting.append(request)
        return server.NOT_DONE_YET

    def finishAll(self) -> None:
        waiting, self.waiting = self.waiting, []
        for each in waiting:
            if not each.finished and not each._disconnected:
                each.write(b"x" * 90 if each.path == b"/partial" else b"done")
                each.finish()

    def failAll(self) -> None:
        waiting, self.waiting = self.waiting, []
        for each in waiting:
            each.transport.abortConnection()


class Client(protocol.Protocol):
    """A raw client: sends its request, keeps what arrives, and lets the test hang up."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed = True


class RealSocketTests(unittest.TestCase):
    """The filters in a running proxy, with real clients and upstreams on 127.0.0.1."""

    timeout = 20

    @deferredTest
    async def test_rateLimitBurst(self) -> None:
        """
        30 requests from curl through rate 1/m, burst 10 (on the real clock, too slow for timing to
        matter): exactly 10 pass with the RateLimit fields, 20 get 429 with C{Retry-After}.
        """
        upstream = startUpstream(self, server.Site(resource.NoResource()))
        proxy = startProxy(self, [upstream.url])
        useFilters(proxy, rateLimit.build({"rate": "1/m", "burst": 10}, FilterEnvironment(reactor)))
        arguments = ["-s", "-w", "%{http_code} %header{retry-after} %header{ratelimit}\\n"]
        for i in range(30):
            arguments += ["-o", "/dev/null", f"{proxy.url}/{i}"]
        code, out, err = await curl(arguments)
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), 30)
        passed = [line for line in lines if line.startswith("404 ")]  # the upstream's answer: let through
        refused = [line for line in lines if line.startswith("429 ")]
        self.assertEqual((len(passed), len(refused)), (10, 20), lines)
        self.assertEqual(passed[0], '404  "1/m burst 10 per client";r=9;t=60')
        self.assertEqual(passed[-1], '404  "1/m burst 10 per client";r=0;t=60')
        for line in refused:
            status, retryAfter, state = line.split(" ", 2)
            self.assertTrue(55 <= int(retryAfter) <= 60, line)
            self.assertEqual(state, f'"1/m burst 10 per client";r=0;t={retryAfter}')

    async def start(self, maximum: int) -> tuple[Held, ConcurrencyLimit, int]:
        held = Held()
        upstream = startUpstream(self, server.Site(held))
        proxy = startProxy(self, [upstream.url])
        limit = concurrencyLimit.build({"max": maximum}, FilterEnvironment(reactor))
        assert isinstance(limit, ConcurrencyLimit)
        useFilters(proxy, limit)
        self.addCleanup(held.finishAll)
        return held, limit, proxy.port

    async def connect(self, port: int, target: bytes) -> Client:
        client = Client(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    async def released(self, limit: ConcurrencyLimit) -> None:
        """Wait for every slot to come back (the proxy learns that a client left when its socket says so)."""
        self.assertTrue(await waitFor(lambda: limit.total == 0), f"{limit.total} still in flight")

    @deferredTest
    async def test_concurrencyLimit(self) -> None:
        """
        With C{max = 2} and two requests held by the upstream, a third gets 429 with C{Retry-After: 1};
        once the upstream answers, the count is back to 0 and requests pass again.
        """
        held, limit, port = await self.start(2)
        first = await self.connect(port, b"/hold")
        second = await self.connect(port, b"/partial")
        self.assertTrue(await waitFor(lambda: b"x" * 10 in second.received))  # its head and part of its body
        self.assertTrue(await waitFor(lambda: len(held.waiting) == 2))
        self.assertEqual(limit.total, 2)
        third = await rawRequest(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(responseStatus(third), 429)
        self.assertEqual(headerValues(third, b"retry-after"), [b"1"])
        self.assertIn(b"concurrency limit 2 reached for client 127.0.0.1", third)
        held.finishAll()
        self.assertTrue(await waitFor(lambda: first.closed and second.closed))
        self.assertTrue(first.received.endswith(b"4\r\ndone\r\n0\r\n\r\n"), first.received)
        self.assertTrue(second.received.endswith(b"x" * 100))
        self.assertEqual(limit.total, 0)
        again = await self.connect(port, b"/hold")
        self.assertTrue(await waitFor(lambda: len(held.waiting) == 1))
        held.finishAll()
        self.assertTrue(await waitFor(lambda: again.closed))
        self.assertEqual(limit.total, 0)

    @deferredTest
    async def test_clientGoneMidResponse(self) -> None:
        """A client that hangs up after the head and part of the body gives its slot back."""
        held, limit, port = await self.start(1)
        client = await self.connect(port, b"/partial")
        self.assertTrue(await waitFor(lambda: b"x" * 10 in client.received))
        self.assertEqual(limit.total, 1)
        client.transport.abortConnection()
        await self.released(limit)

    @deferredTest
    async def test_clientGoneBeforeResponse(self) -> None:
        """A client that hangs up while the upstream has not answered yet gives its slot back."""
        held, limit, port = await self.start(1)
        client = await self.connect(port, b"/hold")
        self.assertTrue(await waitFor(lambda: len(held.waiting) == 1))
        client.transport.abortConnection()
        await self.released(limit)

    @deferredTest
    async def test_upstreamFailsMidResponse(self) -> None:
        """An upstream that breaks off in the middle of the body: the slot comes back."""
        held, limit, port = await self.start(1)
        client = await self.connect(port, b"/partial")
        self.assertTrue(await waitFor(lambda: b"x" * 10 in client.received))
        held.failAll()
        self.assertTrue(await waitFor(lambda: client.closed))
        await self.released(limit)

    @deferredTest
    async def test_upstreamFailsBeforeResponse(self) -> None:
        """An upstream that fails before any head (the proxy's 502 instead): the slot comes back at once."""
        held, limit, port = await self.start(1)
        client = await self.connect(port, b"/hold")
        self.assertTrue(await waitFor(lambda: len(held.waiting) == 1))
        held.failAll()
        self.assertTrue(await waitFor(lambda: client.closed))
        self.assertEqual(responseStatus(client.received), 502)
        self.assertEqual(limit.total, 0)

    @deferredTest
    async def test_upstreamDown(self) -> None:
        """Requests to an upstream nobody listens on: 502 each time, never 429, and nothing stays counted."""
        proxy = startProxy(self, [f"http://127.0.0.1:{freePort()}"])
        limit = concurrencyLimit.build({"max": 1}, FilterEnvironment(reactor))
        assert isinstance(limit, ConcurrencyLimit)
        useFilters(proxy, limit)
        for _ in range(3):
            answer = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertEqual(responseStatus(answer), 502)
        self.assertEqual(limit.total, 0)
