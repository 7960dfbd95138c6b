"""rproxy.testing, the kit for balancer authors: it must catch broken balancers, not only pass good ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from twisted.trial import reporter, unittest
from zope.interface import implementer

from rproxy.errors import Fault
from rproxy.health.state import PassivePolicy
from rproxy.interfaces import FilterEnvironment, IBalancer, IBalancerFactory, IRequestFilter, IResponseFilter, Outcome
from rproxy.plugins.filters import buffer
from rproxy.proxy.balancers import FirstAvailable, RoundRobin, balancerFactories
from rproxy.proxy.message import InboundRequest, RequestContext
from rproxy.test.test_filter_chain import ReadWhole
from rproxy.testing import (
    BalancerContractTests,
    Clock,
    Simulation,
    assertSpread,
    countPicks,
    filterResponse,
    inboundRequest,
    makeUpstreams,
    runFilters,
    shares,
    verifyBalancer,
)
from rproxy.upstream.upstreams import Upstream

REQUEST = inboundRequest()


class FakeUpstreamTests(unittest.TestCase):
    def test_upstreams(self) -> None:
        """Real upstreams with distinct keys and the given weights, and no connection opened."""
        hosts = makeUpstreams([3, 1, 2])
        self.assertTrue(all(isinstance(h, Upstream) for h in hosts))
        self.assertEqual([h.configuredWeight for h in hosts], [3, 1, 2])
        self.assertEqual([h.weight for h in hosts], [3.0, 1.0, 2.0])
        self.assertEqual(hosts[0].key, "http://10.0.0.1:8080")
        self.assertEqual(len({h.key for h in makeUpstreams(600)}), 600)
        self.assertEqual([h.pool.openCount for h in hosts], [0, 0, 0])
        self.assertEqual([h.inFlight for h in hosts], [0, 0, 0])
        self.assertEqual(len(makeUpstreams(4)), 4)
        self.assertRaises(ValueError, makeUpstreams, 70_000)

    def test_clockDrivesHealth(self) -> None:
        """The clock given runs the upstreams' ejection and slow start."""
        clock = Clock()
        (host,) = makeUpstreams([2], clock, PassivePolicy(baseEjection=5.0, slowStart=10.0))
        host.health.eject("test")
        self.assertFalse(host.health.available)
        clock.advance(10.0)
        self.assertTrue(host.health.available)
        self.assertAlmostEqual(host.weight, 2 * 0.5)

    def test_inboundRequest(self) -> None:
        request = inboundRequest(b"/x?y", "2001:db8::2", [(b"cookie", b"a=1"), (b"cookie", b"b=2")], b"POST", b"https")
        self.assertEqual(request.target, b"/x?y")
        self.assertEqual(request.clientHost, "2001:db8::2")
        self.assertEqual(request.headers.getRawHeaders(b"cookie"), [b"a=1", b"b=2"])
        self.assertEqual((request.method, request.scheme, request.version), (b"POST", b"https", b"HTTP/1.1"))


class SpreadTests(unittest.TestCase):
    def test_countPicks(self) -> None:
        hosts = makeUpstreams(4)
        self.assertEqual(countPicks(RoundRobin(), hosts, 8), Counter({h: 2 for h in hosts}))

    def test_countPicksRejectsStrangers(self) -> None:
        hosts = makeUpstreams(2)
        stranger = makeUpstreams(1)[0]
        with self.assertRaises(AssertionError):
            countPicks(Fixed(stranger), hosts, 1)
        with self.assertRaises(AssertionError):
            countPicks(Fixed(None), hosts, 1)

    def test_shares(self) -> None:
        a, b = makeUpstreams(2)
        self.assertEqual(shares({a: 3, b: 1}), {a: 0.75, b: 0.25})

    def test_assertSpreadPasses(self) -> None:
        a, b, c = hosts = makeUpstreams([2, 1, 1])
        assertSpread({a: 500, b: 250, c: 250}, hosts)
        assertSpread({a: 520, b: 240, c: 240}, hosts, 0.05)  # 2% and 4% off
        assertSpread({a: 100, b: 100, c: 100}, hosts, weights={a: 1, b: 1, c: 1})

    def test_assertSpreadFails(self) -> None:
        """Off by more than the tolerance of a share, a host missing, a stranger, nothing at all: each fails."""
        a, b, c = hosts = makeUpstreams([2, 1, 1])
        stranger = makeUpstreams(1)[0]
        for counts in ({a: 540, b: 230, c: 230}, {a: 500, b: 500}, {a: 2, b: 1, c: 1, stranger: 1}, {}):
            with self.assertRaises(AssertionError) as raised:
                assertSpread(counts, hosts, 0.05)
            self.assertIn("http://10.0.0.", str(raised.exception))
        with self.assertRaises(AssertionError) as raised:
            assertSpread({a: 540, b: 230, c: 230}, hosts, 0.05)
        self.assertIn("http://10.0.0.3:8080: 230 (23.00%, expected 25.00%)  <-- off", str(raised.exception))


@implementer(IBalancer)
class Fixed:
    """Always the same answer."""

    def __init__(self, answer: Upstream | None) -> None:
        self.answer = answer

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        return self.answer

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        pass


@implementer(IBalancer)
class Recording(RoundRobin):
    """Round robin that records every call, with the in-flight counts it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.picks: list[tuple[tuple[Upstream, ...], tuple[Upstream, ...]]] = []
        self.reports: list[tuple[Upstream, Outcome, int]] = []

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        self.picks.append((tuple(upstreams), tuple(tried)))
        return super().pick(upstreams, request, tried)

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        self.reports.append((upstream, outcome, upstream.inFlight))


class SimulationTests(unittest.TestCase):
    def test_inFlightAndReports(self) -> None:
        """
        inFlight rises while attempts run and falls before each report, as in the exchange; each attempt is
        reported once, with its latency.
        """
        clock = Clock()
        (host,) = makeUpstreams(1, clock)
        balancer = Recording()
        simulation = Simulation(balancer, [host], clock, latency=1.0)
        result = simulation.run(10, interval=0.1)
        self.assertEqual(result.maxInFlight[host], 10)
        self.assertEqual(host.inFlight, 0)
        self.assertEqual(len(balancer.reports), 10)
        self.assertEqual([inFlight for _, _, inFlight in balancer.reports], list(range(9, -1, -1)))
        self.assertEqual({(o.status, o.error) for _, o, _ in balancer.reports}, {(200, None)})
        for _, outcome, _ in balancer.reports:
            self.assertAlmostEqual(outcome.latency, 1.0)
        self.assertEqual(result.reports, [(u, o) for u, o, _ in balancer.reports])
        self.assertEqual(result.served, Counter({host: 10}))
        self.assertAlmostEqual(clock.seconds(), 1.9)

    def test_latencyCallable(self) -> None:
        clock = Clock()
        (host,) = makeUpstreams(1, clock)
        latencies = iter([0.5, 0.25])
        simulation = Simulation(RoundRobin(), [host], clock)
        simulation.setLatency(host, lambda: next(latencies))
        result = simulation.run(2)
        self.assertEqual([outcome.latency for _, outcome in result.reports], [0.25, 0.5])

    def test_dieMidRequest(self) -> None:
        """
        A host that dies fails its attempts in flight at once (reported as errors); they are retried with the
        dead host in C{tried}, and it is offered no more.
        """
        clock = Clock()
        a, b = hosts = makeUpstreams(2, clock)
        balancer = Recording()
        simulation = Simulation(balancer, hosts, clock, latency=1.0)
        simulation.setLatency(b, 0.1)
        simulation.killAt(a, 0.5)
        first = simulation.send(REQUEST)
        second = simulation.send(REQUEST)
        simulation.settle()
        self.assertEqual((first.attempts, first.servedBy), ([a, b], b))
        self.assertAlmostEqual(first.finishedAt or 0, 0.6)
        self.assertEqual((second.attempts, second.servedBy), ([b], b))
        upstream, outcome, inFlight = balancer.reports[1]
        self.assertIs(upstream, a)
        self.assertEqual((outcome.status, inFlight), (None, 0))
        assert outcome.error is not None
        self.assertIs(outcome.error.fault, Fault.UPSTREAM)
        self.assertAlmostEqual(outcome.latency, 0.5)
        self.assertEqual(balancer.picks[2], ((b,), (a,)))
        self.assertEqual(simulation.available, (b,))
        later = simulation.send(REQUEST)
        simulation.settle()
        self.assertEqual(later.attempts, [b])

    def test_failingHost(self) -> None:
        """A refusing host's attempts fail after its latency and go elsewhere, even with no retries left."""
        clock = Clock()
        a, b = hosts = makeUpstreams(2, clock)
        simulation = Simulation(FirstAvailable(), hosts, clock, latency=0.1, retries=0)
        simulation.setFailing(a)
        result = simulation.run(5, interval=1.0)
        self.assertEqual([r.attempts for r in result.requests], [[a, b]] * 5)
        self.assertEqual(result.served, Counter({b: 5}))
        errors = [o.error for u, o in result.reports if u is a]
        self.assertEqual([e.errorType for e in errors if e is not None], ["connection_refused"] * 5)
        simulation.setFailing(a, False)
        self.assertEqual(simulation.run(1).requests[-1].attempts, [a])

    def test_retriesBounded(self) -> None:
        """Attempts that died are retried C{retries} times, then the request fails."""
        clock = Clock()
        a, b, c = hosts = makeUpstreams(3, clock)
        simulation = Simulation(FirstAvailable(), hosts, clock, latency=1.0, retries=1)
        simulation.killAt(a, 0.2)
        simulation.killAt(b, 0.4)
        request = simulation.send(REQUEST)
        simulation.settle()
        self.assertEqual((request.attempts, request.servedBy), ([a, b], None))
        self.assertEqual(simulation.result().failed, [request])

    def test_noneAvailable(self) -> None:
        clock = Clock()
        (a,) = hosts = makeUpstreams(1, clock)
        simulation = Simulation(RoundRobin(), hosts, clock)
        simulation.kill(a)
        request = simulation.send(REQUEST)
        self.assertEqual((request.attempts, request.servedBy, request.finishedAt), ([], None, 0.0))

    def test_addedHostOffered(self) -> None:
        clock = Clock()
        a, b = makeUpstreams(2, clock)
        simulation = Simulation(RoundRobin(), [a], clock)
        simulation.add(b)
        self.assertEqual(simulation.available, (a, b))
        self.assertEqual(simulation.run(4).served, Counter({a: 2, b: 2}))

    def test_catchesBadPicks(self) -> None:
        """A pick outside the available set, of a tried host, or None while hosts remain, fails the run."""
        clock = Clock()
        a, b = hosts = makeUpstreams(2, clock)
        stranger = makeUpstreams(1, clock)[0]
        for balancer, message in ((Fixed(stranger), "not one of the available"), (Fixed(None), "untried")):
            with self.assertRaises(AssertionError) as raised:
                Simulation(balancer, hosts, clock).run(1)
            self.assertIn(message, str(raised.exception))
        simulation = Simulation(Fixed(a), hosts, clock)
        simulation.setFailing(a)
        with self.assertRaises(AssertionError) as raised:
            simulation.run(1)
        self.assertIn("already tried", str(raised.exception))

    def test_responseFilter(self) -> None:
        """A balancer that filters responses sees each answered request, with its chosen upstream."""
        clock = Clock()
        hosts = makeUpstreams(2, clock)

        @implementer(IBalancer, IResponseFilter)
        class Tagging(RoundRobin):
            def onResponse(self, exchange: object, status: int, headers: list[tuple[bytes, bytes]]) -> None:
                upstream = exchange.upstream  # type: ignore[attr-defined]
                target = exchange.inbound.target  # type: ignore[attr-defined]
                headers.append((b"x-served-by", upstream.key.encode() + b" " + target + b" %d" % status))

        result = Simulation(Tagging(), hosts, clock).run(2)
        self.assertEqual(
            [r.responseHeaders for r in result.requests],
            [
                [(b"x-served-by", b"http://10.0.0.1:8080 /item/0 200")],
                [(b"x-served-by", b"http://10.0.0.2:8080 /item/1 200")],
            ],
        )
        self.assertEqual(
            filterResponse(Tagging(), inboundRequest(b"/z"), hosts[1], 404),
            [(b"x-served-by", b"http://10.0.0.2:8080 /z 404")],
        )


# -- broken balancers the contract check must catch


@implementer(IBalancer)
class IgnoresTried(RoundRobin):
    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        return super().pick(upstreams, request, ())


@implementer(IBalancer)
class NeverNone(RoundRobin):
    """Goes back to a tried host when all were tried, instead of None."""

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        return super().pick(upstreams, request, tried) or upstreams[0]


@implementer(IBalancer)
class GivesUpEarly(RoundRobin):
    """None on any retry, although hosts remain."""

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        return None if tried else super().pick(upstreams, request, tried)


@implementer(IBalancer)
class RemembersFirstSet:
    """Keeps the first set it saw: wrong once the set changes."""

    hosts: Sequence[Upstream] = ()

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        self.hosts = self.hosts or upstreams
        return next((h for h in self.hosts if h not in tried), None)

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        pass


@implementer(IBalancer)
class CountsItself(RoundRobin):
    """Raises inFlight itself (the exchange does that)."""

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        chosen = super().pick(upstreams, request, tried)
        if chosen is not None:
            chosen.inFlight += 1
        return chosen


@implementer(IBalancer)
class FailsOnErrors(RoundRobin):
    """Cannot take a failed outcome."""

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        assert outcome.status is not None
        self.last = outcome.status + 1


class NotABalancer:
    """Has pick but declares nothing and has no report."""

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        return upstreams[0]


@implementer(IBalancer)
class MissingReport:
    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        return upstreams[0]


@implementer(IBalancer)
class KeyedByPosition(RoundRobin):
    """Crashes when C{tried} names an upstream no longer offered."""

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        for host in tried:
            upstreams.index(host)
        return super().pick(upstreams, request, tried)


@implementer(IBalancerFactory)
class BadlyNamedFactory:
    name = " spaced "
    description = "a factory whose name cannot be typed after --balancer"

    def build(self, options: object) -> IBalancer:
        return RoundRobin()


class ContractTests(unittest.TestCase):
    def test_goodBalancersPass(self) -> None:
        verifyBalancer(RoundRobin())
        verifyBalancer(FirstAvailable)
        verifyBalancer(balancerFactories()["least_conn"])

    def assertBroken(self, subject: object, *words: str) -> None:
        with self.assertRaises(AssertionError) as raised:
            verifyBalancer(subject)  # type: ignore[arg-type]
        message = str(raised.exception)
        self.assertTrue(message.startswith("balancer contract"), message)
        for word in words:
            self.assertIn(word, message)

    def test_brokenBalancersFail(self) -> None:
        """Each way of breaking the contract is caught, and the message says which rule broke."""
        self.assertBroken(IgnoresTried(), "None when all are tried", "already tried")
        self.assertBroken(NeverNone(), "already tried")
        self.assertBroken(GivesUpEarly(), "returned None although")
        self.assertBroken(RemembersFirstSet, "not one of the upstreams offered")
        self.assertBroken(CountsItself(), "inFlight")
        self.assertBroken(FailsOnErrors(), "checkReports", "AssertionError")
        self.assertBroken(MissingReport(), "interface", "report")
        self.assertBroken(NotABalancer(), "interface")
        self.assertBroken(KeyedByPosition(), "checkSetChanges", "ValueError")
        self.assertBroken(BadlyNamedFactory(), "factory", "' spaced '")
        self.assertBroken(42, "neither an IBalancer")

    def test_factoryBuiltWithOptions(self) -> None:
        """A factory is built with the options given, for every check."""
        built: list[object] = []

        @implementer(IBalancerFactory)
        class Factory:
            name = "recorded"
            description = "records its options"

            def build(self, options: object) -> IBalancer:
                built.append(options)
                return RoundRobin()

        verifyBalancer(Factory(), {"a": "1"})
        self.assertGreaterEqual(len(built), 7)
        self.assertEqual(built[0], {"a": "1"})


class GoodContract(BalancerContractTests, unittest.TestCase):
    """The mixin, as an author uses it, on a good balancer: these run as tests of this module."""

    def makeBalancer(self) -> IBalancer:
        return RoundRobin()


class MixinTests(unittest.TestCase):
    def test_mixinFailsBrokenBalancer(self) -> None:
        """The mixin's tests fail for a broken balancer, one failure per rule it breaks."""

        class BrokenContract(BalancerContractTests, unittest.TestCase):
            def makeBalancer(self) -> IBalancer:
                return IgnoresTried()

        result = reporter.TestResult()
        suite = unittest.TestSuite(
            BrokenContract(name) for name in dir(BalancerContractTests) if name.startswith("test_contract")
        )
        suite.run(result)
        self.assertEqual(result.testsRun, 7)
        failed = sorted(test.id().rsplit(".", 1)[1] for test, _ in result.failures)
        self.assertEqual(
            failed,
            [
                "test_contractHonoursTried",
                "test_contractLoadAndWeights",
                "test_contractSetChanges",
                "test_contractSingleUpstream",
            ],
        )
        self.assertEqual(result.errors, [])

    def test_mixinNeedsMakeBalancer(self) -> None:
        class Forgotten(BalancerContractTests, unittest.TestCase):
            pass

        result = reporter.TestResult()
        Forgotten("test_contractInterface").run(result)
        self.assertEqual(len(result.errors), 1)
        self.assertIn("must define makeBalancer", str(result.errors[0][1].value))


@implementer(IRequestFilter)
class Passing:
    """A request filter that lets everything through untouched."""

    consumes = ()

    def onRequest(self, context: RequestContext) -> None:
        return None


class RunFiltersBodyTests(unittest.TestCase):
    """runFilters gives filters a request body, and says what body the upstream would get."""

    def test_noBody(self) -> None:
        """Without C{requestBody} the request has none, and none is sent."""
        result = self.successResultOf(runFilters([Passing()]))
        self.assertIsNone(result.context.body)
        self.assertIsNone(result.sent)

    def test_untouchedBody(self) -> None:
        """A body no filter reads reaches the upstream as given: its parts joined, its length declared or not."""
        declared = self.successResultOf(runFilters([Passing()], requestBody=[b"ab", b"", b"cd"]))
        self.assertEqual(declared.sent, (b"abcd", 4))
        chunked = self.successResultOf(runFilters([Passing()], requestBody=b"abcd", declareLength=False))
        self.assertEqual(chunked.sent, (b"abcd", None))

    def test_filterReadsBody(self) -> None:
        """A filter that reads the whole body and replaces it: the replacement is what the upstream gets."""
        result = self.successResultOf(runFilters([ReadWhole()], requestBody=[b"he", b"llo"], declareLength=False))
        self.assertIsNone(result.verdict)
        self.assertEqual(result.sent, (b"HELLO", 5))

    def test_refusedBodySendsNothing(self) -> None:
        """A filter that refuses the body answers; no body is sent."""
        small = buffer.build({"max-size": 4}, FilterEnvironment(Clock()))
        result = self.successResultOf(runFilters([small], requestBody=[b"abc", b"de"], declareLength=False))
        self.assertEqual(result.status, 413)
        self.assertIsNone(result.sent)
