"""The built-in balancers: their maths, their options, their contract, and their discovery as plugins."""

from __future__ import annotations

import random
from collections import Counter

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from rproxy.errors import upstreamError
from rproxy.health.state import PassivePolicy
from rproxy.interfaces import IBalancer, IBalancerFactory, IResponseFilter, Outcome
from rproxy.proxy.balancers import (
    BalancerOptions,
    FirstAvailable,
    LeastConnections,
    PeakEWMA,
    PowerOfTwoChoices,
    RendezvousHash,
    RoundRobin,
    SmoothWeightedRoundRobin,
    StickySessions,
    WeightedRandom,
    balancerFactories,
    hashKey,
)
from rproxy.proxy.message import InboundRequest
from rproxy.testing import (
    Clock,
    Simulation,
    assertSpread,
    countPicks,
    filterResponse,
    inboundRequest,
    makeUpstreams,
    verifyBalancer,
)
from rproxy.upstream.upstreams import Upstream

REQUEST = inboundRequest()
BUILTIN = {
    "round_robin",
    "weighted_round_robin",
    "random",
    "least_conn",
    "p2c",
    "ewma",
    "first",
    "hash",
    "sticky",
}


def build(name: str, **options: object) -> IBalancer:
    return balancerFactories()[name].build(options)


class RoundRobinTests(unittest.TestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IBalancer, RoundRobin()))

    def test_even(self) -> None:
        """Each upstream in turn: within 5% of even (exactly even over a multiple of the count)."""
        hosts = makeUpstreams(3)
        picks = countPicks(RoundRobin(), hosts, 3000)
        assertSpread(picks, hosts, 0.05)
        self.assertEqual(sorted(picks.values()), [1000, 1000, 1000])

    def test_ignoresWeights(self) -> None:
        hosts = makeUpstreams([5, 1])
        self.assertEqual(sorted(countPicks(RoundRobin(), hosts, 100).values()), [50, 50])

    def test_skipsTried(self) -> None:
        """A retry never goes back to a host already tried while others remain; none left: None."""
        hosts = makeUpstreams(3)
        balancer = RoundRobin()
        tried: list[Upstream] = []
        for _ in range(3):
            chosen = balancer.pick(hosts, REQUEST, tried)
            assert chosen is not None
            tried.append(chosen)
        self.assertEqual(set(tried), set(hosts))
        self.assertIsNone(balancer.pick(hosts, REQUEST, tried))

    def test_retryTakesNext(self) -> None:
        """A retry takes the next host in turn, and the turn goes on after it."""
        a, b, c = hosts = makeUpstreams(3)
        balancer = RoundRobin()
        self.assertIs(balancer.pick(hosts, REQUEST, ()), a)
        self.assertIs(balancer.pick(hosts, REQUEST, [b]), c)
        self.assertIs(balancer.pick(hosts, REQUEST, ()), a)

    def test_setShrinks(self) -> None:
        """The turn survives the set shrinking under it."""
        hosts = makeUpstreams(4)
        balancer = RoundRobin()
        for _ in range(3):
            balancer.pick(hosts, REQUEST, ())
        picks = countPicks(balancer, hosts[:2], 100)
        self.assertEqual(sorted(picks.values()), [50, 50])


class SmoothWeightedRoundRobinTests(unittest.TestCase):
    def test_weights(self) -> None:
        """Shares follow the weights within 5%."""
        for weights in ([5, 1, 1], [3, 2], [1, 1, 1, 1], [7, 3, 10, 1]):
            hosts = makeUpstreams(weights)
            assertSpread(countPicks(SmoothWeightedRoundRobin(), hosts, 10_000), hosts, 0.05)

    def test_smooth(self) -> None:
        """
        Weights 5, 1, 1: every 7 consecutive picks hold exactly 5, 1, 1, and the heavy host never gets 5 in
        a row (naive weighted round robin gives a a a a a b c).
        """
        hosts = makeUpstreams([5, 1, 1])
        balancer = SmoothWeightedRoundRobin()
        sequence = [balancer.pick(hosts, REQUEST, ()) for _ in range(70)]
        for start in range(len(sequence) - 7):
            window = Counter(sequence[start : start + 7])
            self.assertEqual(sorted(window.values()), [1, 1, 5], start)
        longest = run = 0
        for previous, current in zip(sequence, sequence[1:], strict=False):
            run = run + 1 if current is previous else 0
            longest = max(longest, run + 1)
        self.assertLess(longest, 5)
        self.assertEqual(["abc"[hosts.index(u)] for u in sequence[:7]], list("aabacaa"))

    def test_skipsTried(self) -> None:
        """A retry goes to the best-scored host not tried; with all tried, None."""
        a, b, c = hosts = makeUpstreams([5, 1, 1])
        balancer = SmoothWeightedRoundRobin()
        self.assertIs(balancer.pick(hosts, REQUEST, [a]), b)
        self.assertIsNone(balancer.pick(hosts, REQUEST, hosts))
        assertSpread(countPicks(balancer, hosts, 7000), hosts, 0.05)

    def test_slowStart(self) -> None:
        """A host slow-starting at 30% of its weight gets 30% of its share, then its full share."""
        clock = Clock()
        hosts = makeUpstreams([1, 1], clock, PassivePolicy(baseEjection=1.0, slowStart=10.0))
        hosts[1].health.eject("test")
        clock.advance(4.0)  # 3 s into a 10 s slow start
        balancer = SmoothWeightedRoundRobin()
        assertSpread(countPicks(balancer, hosts, 13_000), hosts, 0.05, {hosts[0]: 1.0, hosts[1]: 0.3})
        clock.advance(10.0)
        assertSpread(countPicks(balancer, hosts, 10_000), hosts, 0.05)

    def test_forgetsLeftHosts(self) -> None:
        """Hosts that left the set do not keep their scores forever."""
        balancer = SmoothWeightedRoundRobin()
        for _ in range(50):
            hosts = makeUpstreams(3)
            countPicks(balancer, hosts, 3)
        self.assertLessEqual(len(balancer._scores), 6)


class WeightedRandomTests(unittest.TestCase):
    def test_weights(self) -> None:
        """Shares follow the weights within 5%."""
        for weights in ([5, 1, 1], [1, 1, 1], [2, 3]):
            hosts = makeUpstreams(weights)
            balancer = WeightedRandom(random.Random(1))
            assertSpread(countPicks(balancer, hosts, 100_000), hosts, 0.05)

    def test_skipsTried(self) -> None:
        a, b, c = hosts = makeUpstreams([5, 1, 1])
        balancer = WeightedRandom(random.Random(2))
        picks = Counter(balancer.pick(hosts, REQUEST, [a]) for _ in range(2000))
        self.assertEqual(set(picks), {b, c})
        self.assertIsNone(balancer.pick(hosts, REQUEST, hosts))


def slowHostSimulation(balancer: IBalancer, slowLatency: float = 2.0) -> tuple[Simulation, list[Upstream]]:
    """Three hosts; the first answers after C{slowLatency} seconds, the others in 20 ms."""
    clock = Clock()
    hosts = makeUpstreams(3, clock)
    simulation = Simulation(balancer, hosts, clock, latency=0.02)
    simulation.setLatency(hosts[0], slowLatency)
    return simulation, hosts


class LeastConnectionsTests(unittest.TestCase):
    def test_prefersIdleHost(self) -> None:
        """
        A host holding slow requests gets few new ones: under round robin it would take a third of 3000
        requests; under least connections it takes under 5%, and never holds more than a few at once.
        """
        simulation, (slow, fast1, fast2) = slowHostSimulation(LeastConnections(random.Random(3)))
        result = simulation.run(3000, interval=0.01)
        self.assertEqual(result.failed, [])
        self.assertLess(result.served[slow], 150)
        self.assertLessEqual(result.maxInFlight[slow], 3)

        baseline, (slow, _, _) = slowHostSimulation(RoundRobin())
        self.assertEqual(baseline.run(3000, interval=0.01).served[slow], 1000)

    def test_tiesFair(self) -> None:
        """Equally loaded hosts share by weight: not always the first."""
        for weights in ([1, 1, 1], [3, 1]):
            hosts = makeUpstreams(weights)
            assertSpread(countPicks(LeastConnections(random.Random(4)), hosts, 30_000), hosts, 0.05)

    def test_fewestForWeight(self) -> None:
        """In-flight counts are weighed: 3 on a weight-4 host is less than 1 on a weight-1 host."""
        heavy, light = hosts = makeUpstreams([4, 1])
        heavy.inFlight, light.inFlight = 3, 1
        self.assertIs(LeastConnections().pick(hosts, REQUEST, ()), heavy)
        heavy.inFlight = 5
        self.assertIs(LeastConnections().pick(hosts, REQUEST, ()), light)
        self.assertIs(LeastConnections().pick(hosts, REQUEST, [light]), heavy)


class PowerOfTwoChoicesTests(unittest.TestCase):
    def test_prefersIdleHost(self) -> None:
        """A host holding slow requests gets a small share (a third under round robin)."""
        simulation, (slow, _, _) = slowHostSimulation(PowerOfTwoChoices(random.Random(5)))
        result = simulation.run(3000, interval=0.01)
        self.assertEqual(result.failed, [])
        self.assertLess(result.served[slow], 150)

    def test_idleSpreadFollowsWeights(self) -> None:
        for weights in ([1, 1, 1, 1], [3, 1, 1]):
            hosts = makeUpstreams(weights)
            assertSpread(countPicks(PowerOfTwoChoices(random.Random(6)), hosts, 50_000), hosts, 0.05)

    def test_lessLoadedOfTwo(self) -> None:
        a, b = hosts = makeUpstreams(2)
        a.inFlight = 2
        balancer = PowerOfTwoChoices(random.Random(7))
        self.assertEqual({balancer.pick(hosts, REQUEST, ()) for _ in range(100)}, {b})
        self.assertIs(balancer.pick(hosts, REQUEST, [b]), a)


class PeakEWMATests(unittest.TestCase):
    def ewma(self, clock: Clock, seed: int = 8) -> PeakEWMA:
        return PeakEWMA(decay=5.0, penalty=1.0, now=clock.seconds, rng=random.Random(seed))

    def test_movesAwayFromSlowHost(self) -> None:
        """A host answering in 300 ms, against two in 20 ms, gets under a tenth of the traffic."""
        clock = Clock()
        hosts = makeUpstreams(3, clock)
        simulation = Simulation(self.ewma(clock), hosts, clock, latency=0.02)
        simulation.setLatency(hosts[0], 0.3)
        result = simulation.run(3000, interval=0.01)
        self.assertEqual(result.failed, [])
        self.assertLess(result.served[hosts[0]], 300)

    def test_recovers(self) -> None:
        """Once the slow host is fast again, its share comes back within the decay time."""
        clock = Clock()
        hosts = makeUpstreams(3, clock)
        simulation = Simulation(self.ewma(clock), hosts, clock, latency=0.02)
        simulation.setLatency(hosts[0], 0.3)
        simulation.run(1000, interval=0.01)
        simulation.setLatency(hosts[0], 0.02)
        simulation.run(1000, interval=0.01)  # the decay (5 s) passes
        before = len(simulation.result().requests)
        result = simulation.run(3000, interval=0.01)
        later = Counter(r.servedBy for r in result.requests[before:])
        assertSpread(later, hosts, 0.25)

    def test_decaysWhileUnused(self) -> None:
        """A shunned host's latency decays with time, so it is tried again rather than starved."""
        clock = Clock()
        slow, fast = hosts = makeUpstreams(2, clock)
        balancer = self.ewma(clock)
        balancer.report(slow, Outcome(200, 2.0))
        balancer.report(fast, Outcome(200, 0.02))
        self.assertEqual({balancer.pick(hosts, REQUEST, ()) for _ in range(50)}, {fast})
        high = balancer.cost(slow)
        clock.advance(30.0)
        self.assertLess(balancer.cost(slow), high / 100)
        balancer.report(fast, Outcome(200, 0.02))
        self.assertIn(slow, {balancer.pick(hosts, REQUEST, ()) for _ in range(50)})

    def test_peak(self) -> None:
        """A slower sample replaces the average at once; a faster one pulls it down gradually."""
        clock = Clock()
        (host,) = makeUpstreams(1, clock)
        balancer = self.ewma(clock)
        balancer.report(host, Outcome(200, 0.01))
        clock.advance(0.1)
        balancer.report(host, Outcome(200, 0.5))
        self.assertAlmostEqual(balancer.cost(host), 0.5 + 1e-4)
        clock.advance(0.1)
        balancer.report(host, Outcome(200, 0.01))
        self.assertGreater(balancer.cost(host), 0.4)

    def test_inFlightCounts(self) -> None:
        clock = Clock()
        (host,) = makeUpstreams(1, clock)
        balancer = self.ewma(clock)
        balancer.report(host, Outcome(200, 0.1))
        idle = balancer.cost(host)
        host.inFlight = 3
        self.assertAlmostEqual(balancer.cost(host), idle * 4)

    def test_failuresPenalised(self) -> None:
        """
        A host that refuses at once (failing in 1 ms) does not look fast: it gets few attempts, and every
        request is still served by the others.
        """
        clock = Clock()
        hosts = makeUpstreams(3, clock)
        simulation = Simulation(self.ewma(clock), hosts, clock, latency=0.02)
        simulation.setLatency(hosts[0], 0.001)
        simulation.setFailing(hosts[0])
        result = simulation.run(3000, interval=0.01)
        self.assertEqual(result.failed, [])
        self.assertLess(result.attempts[hosts[0]], 200)
        balancer = self.ewma(clock)
        balancer.report(hosts[1], Outcome(503, 0.001))
        self.assertGreaterEqual(balancer.cost(hosts[1]), 1.0)
        failure = upstreamError(502, "refused", "connection_refused")
        balancer.report(hosts[2], Outcome(None, 0.001, failure))
        self.assertGreaterEqual(balancer.cost(hosts[2]), 1.0)

    def test_newHostNotStarved(self) -> None:
        """A host added to a running service gets its share at once, valued at the service's average."""
        clock = Clock()
        hosts = makeUpstreams(3, clock)
        simulation = Simulation(self.ewma(clock), hosts[:2], clock, latency=0.05)
        simulation.run(1000, interval=0.01)
        simulation.add(hosts[2])
        before = len(simulation.result().requests)
        result = simulation.run(1500, interval=0.01)
        later = Counter(r.servedBy for r in result.requests[before:])
        self.assertGreater(later[hosts[2]], 1500 * 0.25)
        self.assertLess(result.maxInFlight.get(hosts[2], 0), 10)


class FirstAvailableTests(unittest.TestCase):
    def test_order(self) -> None:
        """Everything goes to the first host; retries fail over in configured order."""
        a, b, c = hosts = makeUpstreams(3)
        balancer = FirstAvailable()
        self.assertEqual(countPicks(balancer, hosts, 100), Counter({a: 100}))
        self.assertIs(balancer.pick(hosts, REQUEST, [a]), b)
        self.assertIs(balancer.pick(hosts, REQUEST, [a, b]), c)
        self.assertIs(balancer.pick(hosts, REQUEST, [b]), a)
        self.assertIsNone(balancer.pick(hosts, REQUEST, hosts))

    def test_failsOver(self) -> None:
        """The first host dies mid-run: its requests in flight and all later ones go to the second."""
        clock = Clock()
        a, b, c = hosts = makeUpstreams(3, clock)
        simulation = Simulation(FirstAvailable(), hosts, clock, latency=0.5)
        simulation.killAt(a, 1.005)  # between two arrivals, 10 ms apart
        result = simulation.run(200, interval=0.01)
        self.assertEqual(result.failed, [])
        self.assertEqual(set(result.served), {a, b})
        self.assertEqual(result.served[a], 51)  # sent by 0.5 s: answered before it died
        rescued = [r for r in result.requests if r.attempts == [a, b]]
        self.assertEqual(len(rescued), 50)  # in flight on it when it died
        self.assertNotIn(c, result.attempts)


def hashed(spec: str) -> RendezvousHash:
    return RendezvousHash(hashKey(spec), random.Random(9))


def keyed(i: int) -> InboundRequest:
    return inboundRequest(b"/k/%d" % i)


class RendezvousHashTests(unittest.TestCase):
    def test_sameKeySameHost(self) -> None:
        hosts = makeUpstreams(5)
        balancer = hashed("client_ip")
        for i in range(200):
            request = inboundRequest(b"/%d" % i, f"203.0.113.{i % 50}")
            first = balancer.pick(hosts, request, ())
            self.assertIs(balancer.pick(hosts, inboundRequest(b"/other", f"203.0.113.{i % 50}"), ()), first)

    def test_even(self) -> None:
        """Distinct keys spread within 5% of even, and of the weights."""
        for weights in ([1, 1, 1], [3, 1], [1, 2, 3, 4]):
            hosts = makeUpstreams(weights)
            assertSpread(countPicks(hashed("uri"), hosts, 30_000, keyed), hosts, 0.05)

    def test_addingHostMovesFewKeys(self) -> None:
        """
        Adding one host to N moves at most 1/(N+1) + 5% of 10,000 keys, and only onto the new host;
        removing it moves them back.
        """
        balancer = hashed("uri")
        keys = [keyed(i) for i in range(10_000)]
        for size in (2, 3, 5, 10):
            hosts = makeUpstreams(size + 1)
            before = [balancer.pick(hosts[:size], request, ()) for request in keys]
            after = [balancer.pick(hosts, request, ()) for request in keys]
            moved = [new for old, new in zip(before, after, strict=True) if old is not new]
            self.assertLessEqual(len(moved) / len(keys), 1 / (size + 1) + 0.05, size)
            self.assertGreater(len(moved) / len(keys), 1 / (size + 1) - 0.05, size)
            self.assertEqual(set(moved), {hosts[size]})
            self.assertEqual([balancer.pick(hosts[:size], request, ()) for request in keys], before)

    def test_removingHostMovesOnlyItsKeys(self) -> None:
        balancer = hashed("uri")
        hosts = makeUpstreams(4)
        keys = [keyed(i) for i in range(2000)]
        before = [balancer.pick(hosts, request, ()) for request in keys]
        remaining = hosts[:1] + hosts[2:]
        after = [balancer.pick(remaining, request, ()) for request in keys]
        for old, new in zip(before, after, strict=True):
            if old is not hosts[1]:
                self.assertIs(new, old)

    def test_retryTakesNextInOrder(self) -> None:
        """A retry goes where the key would go without the hosts tried, the next in its rendezvous order."""
        hosts = makeUpstreams(5)
        balancer = hashed("uri")
        for i in range(100):
            request = keyed(i)
            tried: list[Upstream] = []
            for _ in range(5):
                chosen = balancer.pick(hosts, request, tried)
                remaining = [h for h in hosts if h not in tried]
                self.assertIs(chosen, balancer.pick(remaining, request, ()))
                assert chosen is not None
                tried.append(chosen)
            self.assertIsNone(balancer.pick(hosts, request, tried))

    def test_keys(self) -> None:
        """Each kind of key reads its part of the request."""
        request = inboundRequest(
            b"/path?q=1", "192.0.2.7", [(b"cookie", b"a=1; session=abc"), (b"x-user", b"u1"), (b"x-user", b"u2")]
        )
        self.assertEqual(hashKey("client_ip")(request), b"192.0.2.7")
        self.assertEqual(hashKey("uri")(request), b"/path?q=1")
        self.assertEqual(hashKey("header:X-User")(request), b"u1\nu2")
        self.assertEqual(hashKey("cookie:session")(request), b"abc")
        self.assertIsNone(hashKey("cookie:other")(request))
        self.assertIsNone(hashKey("header:x-none")(request))
        self.assertIsNone(hashKey("client_ip")(inboundRequest(clientHost=None)))
        for bad in ("ip", "header:", "cookie", "uri:x", ""):
            self.assertRaises(ValueError, hashKey, bad)

    def test_headerAndCookieKeys(self) -> None:
        """Requests from different clients with the same header or cookie go to the same host."""
        hosts = makeUpstreams(7)
        for spec, field in (("header:x-tenant", b"x-tenant"), ("cookie:sid", b"cookie")):
            balancer = hashed(spec)
            for tenant in range(50):
                value = b"t%d" % tenant if field != b"cookie" else b"other=1; sid=t%d" % tenant
                chosen = {
                    balancer.pick(hosts, inboundRequest(b"/%d" % i, f"198.51.100.{i}", [(field, value)]), ())
                    for i in range(10)
                }
                self.assertEqual(len(chosen), 1)

    def test_missingKeyFair(self) -> None:
        """A request without the key goes to a weighted random host."""
        hosts = makeUpstreams([2, 1, 1])
        balancer = hashed("header:x-tenant")
        assertSpread(countPicks(balancer, hosts, 40_000), hosts, 0.05)
        self.assertIsNone(balancer.pick(hosts, REQUEST, hosts))


SECRET = "0123456789abcdef-test-secret"


def sticky(**options: object) -> StickySessions:
    balancer = build("sticky", secret=SECRET, **options)
    assert isinstance(balancer, StickySessions)
    return balancer


def cookieOf(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The cookie pair of the one Set-Cookie in C{headers}."""
    values = [value for name, value in headers if name == b"Set-Cookie"]
    assert len(values) == 1, headers
    return values[0].split(b";")[0]


class StickySessionsTests(unittest.TestCase):
    def test_setsCookie(self) -> None:
        """The response of a request without a cookie sets one: HttpOnly, SameSite=Lax, Path=/."""
        hosts = makeUpstreams(3)
        balancer = sticky()
        self.assertTrue(verifyObject(IResponseFilter, balancer))
        chosen = balancer.pick(hosts, REQUEST, ())
        assert chosen is not None
        headers = filterResponse(balancer, REQUEST, chosen)
        self.assertEqual(len(headers), 1)
        name, value = headers[0]
        self.assertEqual(name, b"Set-Cookie")
        attributes = value.split(b"; ")
        self.assertTrue(attributes[0].startswith(b"rproxy_sticky="))
        self.assertEqual(set(attributes[1:]), {b"Path=/", b"HttpOnly", b"SameSite=Lax"})

    def test_cookieHidesUpstream(self) -> None:
        """The cookie says nothing about the upstream's address."""
        (host,) = makeUpstreams(1)
        value = sticky().token(host)
        for part in (b"10.0.0.1", b"8080", b"http", b"MTAuMC4wLjE"):
            self.assertNotIn(part, value)
        self.assertGreaterEqual(len(value), 40)  # a whole HMAC-SHA256

    def test_validCookiePins(self) -> None:
        """A request with a valid cookie goes to its host every time, and gets no new cookie."""
        hosts = makeUpstreams(4)
        balancer = sticky()
        for host in hosts:
            token = balancer.token(host)
            request = inboundRequest(headers=[(b"cookie", b"theme=dark; rproxy_sticky=" + token)])
            self.assertEqual({balancer.pick(hosts, request, ()) for _ in range(20)}, {host})
            self.assertEqual(filterResponse(balancer, request, host), [])

    def test_forgedCookieIgnored(self) -> None:
        """A tampered or forged cookie is ignored: the inner balancer picks, and a good cookie is set."""
        hosts = makeUpstreams(3)
        balancer = sticky()
        good = balancer.token(hosts[1])
        otherSecret = StickySessions(RoundRobin(), b"another secret of sixteen+", b"rproxy_sticky")
        forgeries = [
            good[:-1] + (b"A" if good[-1:] != b"A" else b"B"),
            otherSecret.token(hosts[1]),
            b"",
            b"http://10.0.0.2:8080",
            good + good,
        ]
        for forged in forgeries:
            request = inboundRequest(headers=[(b"cookie", b"rproxy_sticky=" + forged)])
            picks = Counter(balancer.pick(hosts, request, ()) for _ in range(30))
            self.assertEqual(sorted(picks.values()), [10, 10, 10], forged)  # round robin, not pinned
            headers = filterResponse(balancer, request, hosts[0])
            self.assertEqual(cookieOf(headers), b"rproxy_sticky=" + balancer.token(hosts[0]))

    def test_sameSecretSameCookie(self) -> None:
        """Two proxies with the same secret agree on cookies; with different secrets they do not."""
        (host,) = makeUpstreams(1)
        self.assertEqual(sticky().token(host), sticky().token(host))
        self.assertNotEqual(build("sticky").token(host), build("sticky").token(host))  # type: ignore[attr-defined]

    def test_triedOrGoneFallsBack(self) -> None:
        """
        When the pinned host was tried (a retry) or is no longer available, the inner balancer picks, and
        the response moves the cookie to the host that answered.
        """
        a, b, c = hosts = makeUpstreams(3)
        balancer = sticky(inner="first")
        request = inboundRequest(headers=[(b"cookie", b"rproxy_sticky=" + balancer.token(a))])
        self.assertIs(balancer.pick(hosts, request, ()), a)
        self.assertIs(balancer.pick(hosts, request, [a]), b)
        self.assertIs(balancer.pick([b, c], request, ()), b)
        self.assertIsNone(balancer.pick(hosts, request, hosts))
        self.assertEqual(cookieOf(filterResponse(balancer, request, b)), b"rproxy_sticky=" + balancer.token(b))

    def test_options(self) -> None:
        """cookie names the cookie; max_age sets Max-Age; an https client gets Secure."""
        (host,) = makeUpstreams(1)
        balancer = sticky(cookie="lb", max_age="3600")
        headers = filterResponse(balancer, inboundRequest(scheme=b"https"), host)
        value = headers[0][1]
        self.assertTrue(value.startswith(b"lb=" + balancer.token(host) + b"; "))
        self.assertIn(b"; Max-Age=3600", value)
        self.assertIn(b"; Secure", value)
        self.assertEqual(sticky(max_age=60).maxAge, 60)

    def test_innerOptions(self) -> None:
        """inner names the balancer that picks for new clients; inner.* options go to it."""
        balancer = sticky(inner="hash", **{"inner.key": "uri"})
        self.assertIsInstance(balancer.inner, RendezvousHash)
        hosts = makeUpstreams(5)
        self.assertEqual(
            len({balancer.pick(hosts, inboundRequest(b"/same", f"192.0.2.{i}"), ()) for i in range(30)}), 1
        )
        self.assertIsInstance(sticky().inner, RoundRobin)

    def test_reportsReachInner(self) -> None:
        clock = Clock()
        (host,) = makeUpstreams(1, clock)
        inner = PeakEWMA(now=clock.seconds)
        balancer = StickySessions(inner, b"sixteen bytes at least")
        balancer.report(host, Outcome(200, 0.25))
        self.assertAlmostEqual(inner.cost(host), 0.25 + 1e-4)

    def test_stickyThroughSimulation(self) -> None:
        """Every first response sets a cookie; clients that send it back stay on their host."""
        clock = Clock()
        hosts = makeUpstreams(3, clock)
        balancer = sticky(inner="least_conn")
        simulation = Simulation(balancer, hosts, clock)
        first = simulation.run(30, interval=0.001)
        cookies = {r.servedBy: cookieOf(r.responseHeaders) for r in first.requests}
        self.assertEqual(len(cookies), 3)
        for host, cookie in cookies.items():
            returning = simulation.send(inboundRequest(headers=[(b"cookie", cookie)]))
            simulation.settle()
            self.assertIs(returning.servedBy, host)
            self.assertEqual(returning.responseHeaders, [])


class OptionTests(unittest.TestCase):
    """Factories read strings and typed values alike; errors name the balancer and the option."""

    def assertOptionError(self, name: str, options: dict[str, object], *words: str) -> None:
        with self.assertRaises(ValueError) as raised:
            balancerFactories()[name].build(options)
        message = str(raised.exception)
        self.assertIn(f"balancer {name}", message)
        for word in words:
            self.assertIn(word, message)

    def test_unknownOptionNamed(self) -> None:
        for name in BUILTIN:
            self.assertOptionError(name, {"bogus": "1"}, "'bogus'")

    def test_ewma(self) -> None:
        for value in ("5", 5, 5.0, "0.5"):
            balancer = build("ewma", decay=value, penalty=value)
            assert isinstance(balancer, PeakEWMA)
            self.assertEqual(balancer.decay, float(value))
            self.assertEqual(balancer.penalty, float(value))
        self.assertEqual(build("ewma", penalty="0").penalty, 0.0)  # type: ignore[attr-defined]
        for bad in ("0", "-1", "soon", True, "nan", [1]):
            self.assertOptionError("ewma", {"decay": bad}, "option decay")
        self.assertOptionError("ewma", {"penalty": "-1"}, "option penalty", "at least 0")

    def test_hash(self) -> None:
        self.assertIsInstance(build("hash"), RendezvousHash)
        self.assertIsInstance(build("hash", key="header:X-Tenant"), RendezvousHash)
        self.assertOptionError("hash", {"key": "ip"}, "option key", "client_ip", "'ip'")
        self.assertOptionError("hash", {"key": 3}, "option key", "string")

    def test_sticky(self) -> None:
        self.assertOptionError("sticky", {"inner": "nope"}, "option inner", "'nope'", "round_robin")
        self.assertOptionError("sticky", {"inner": "sticky"}, "option inner")
        self.assertOptionError("sticky", {"inner": "hash", "inner.key": "nope"}, "inner.", "option key")
        self.assertOptionError("sticky", {"inner": "round_robin", "inner.x": "1"}, "inner.", "'x'")
        self.assertOptionError("sticky", {"cookie": "a b"}, "option cookie")
        self.assertOptionError("sticky", {"secret": "short"}, "option secret", "16")
        self.assertOptionError("sticky", {"max_age": "-1"}, "option max_age")
        self.assertOptionError("sticky", {"max_age": "an hour"}, "option max_age", "whole number")
        self.assertOptionError("sticky", {"max_age": 1.5}, "option max_age")

    def test_reader(self) -> None:
        """L{BalancerOptions}, for third parties too: what was read, what was not."""
        options = BalancerOptions("mine", {"a": "2", "b": 3, "inner.c": "x"})
        self.assertEqual(options.integer("a", None, minimum=1), 2)
        self.assertEqual(options.number("b", 1.0), 3.0)
        self.assertIsNone(options.text("absent"))
        self.assertEqual(options.prefixed("inner."), {"c": "x"})
        options.finish()
        unread = BalancerOptions("mine", {"a": "1", "z": "2"})
        unread.text("a")
        with self.assertRaises(ValueError) as raised:
            unread.finish()
        self.assertEqual(str(raised.exception), "balancer mine: unknown option 'z' (its options: a)")


class ContractTests(unittest.TestCase):
    """Every built-in balancer keeps the IBalancer contract (rproxy.testing.verifyBalancer)."""

    def test_everyBuiltin(self) -> None:
        factories = balancerFactories()
        for name in sorted(BUILTIN):
            verifyBalancer(factories[name])

    def test_withOptions(self) -> None:
        factories = balancerFactories()
        verifyBalancer(factories["hash"], {"key": "cookie:session"})
        verifyBalancer(factories["hash"], {"key": "header:x-user"})
        verifyBalancer(factories["sticky"], {"inner": "ewma", "inner.decay": "2", "max_age": 10})
        clock = Clock()
        verifyBalancer(lambda: PeakEWMA(now=clock.seconds))


class PluginTests(unittest.TestCase):
    def test_builtinsFoundAsPlugins(self) -> None:
        """Each built-in is found through getPlugins(IBalancerFactory, rproxy.plugins), like a third party's."""
        factories = balancerFactories()
        self.assertLessEqual(BUILTIN, set(factories))
        for name in BUILTIN:
            factory = factories[name]
            self.assertTrue(verifyObject(IBalancerFactory, factory))
            self.assertEqual(factory.name, name)
            self.assertTrue(factory.description)
        self.assertIsInstance(factories["round_robin"].build({}), RoundRobin)
        self.assertIsInstance(factories["weighted_round_robin"].build({}), SmoothWeightedRoundRobin)
        self.assertIsInstance(factories["random"].build({}), WeightedRandom)
        self.assertIsInstance(factories["least_conn"].build({}), LeastConnections)
        self.assertIsInstance(factories["p2c"].build({}), PowerOfTwoChoices)
        self.assertIsInstance(factories["ewma"].build({}), PeakEWMA)
        self.assertIsInstance(factories["first"].build({}), FirstAvailable)

    def test_eachBuildIsNew(self) -> None:
        """A factory builds a new balancer for each service: no state shared between services."""
        for name in BUILTIN:
            factory = balancerFactories()[name]
            self.assertIsNot(factory.build({}), factory.build({}))
