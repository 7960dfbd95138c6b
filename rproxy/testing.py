"""
Test a balancer or a filter without sockets: fake upstreams, a clock, a simulator, contract checks.

For example::

    from rproxy.testing import Clock, Simulation, assertSpread, countPicks, makeUpstreams, verifyBalancer

    clock = Clock()
    upstreams = makeUpstreams([3, 1], clock)             # real Upstreams, weights 3 and 1; no socket opens
    verifyBalancer(MyBalancerFactory())                  # the IBalancer contract, or an AssertionError
    assertSpread(countPicks(MyBalancer(), upstreams, 10_000), upstreams)   # shares follow the weights

    simulation = Simulation(MyBalancer(), upstreams, clock)
    simulation.setLatency(upstreams[0], 2.0)             # a slow host
    simulation.killAt(upstreams[1], 5.0)                 # dies: its requests in flight fail and are retried
    result = simulation.run(1000, interval=0.01)         # arrivals every 10 ms of simulated time
    result.served                                        # Counter: upstream -> requests it answered

The L{Simulation} drives a balancer the way L{rproxy.proxy.exchange.Exchange} does: C{pick} with the available
set and the upstreams already tried, C{inFlight} raised while an attempt runs and lowered before
C{report}, retries on another upstream, and C{onResponse} for a balancer that is also an
L{IResponseFilter}.  L{BalancerContractTests} is the contract check as a C{TestCase} mixin.

A filter goes through L{runFilters} as an exchange runs a route's chain, the upstream's response given::

    from rproxy.testing import inboundRequest, runFilters, verifyFilterFactory

    verifyFilterFactory(MyFilterFactory(), {"realm": "x"})      # the IFilterFactory contract
    result = self.successResultOf(runFilters([MyFilter()], inboundRequest(headers=[(b"x-key", b"k")])))
    result.verdict                 # None: it went on; else the LocalResponse or ProxyError it answered with
    result.forwarded               # the outbound fields as the upstream would get them (consumed ones removed)
    result.status, result.headers, result.body    # what the client gets

A filter that reads the request body (L{RequestContext.body}) is given one with C{requestBody}, whole or in
the parts it arrives in, with its length declared or not (chunked); C{result.sent} is then the body the
upstream would get, as the filters left it::

    result = self.successResultOf(runFilters([MyFilter()], requestBody=[b"par", b"ts"], declareLength=False))
    result.sent                    # (b"parts", None): the body and the length it declares (None: chunked)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rproxy.downstream.body import RequestBodyPipe
from rproxy.errors import ProxyError, upstreamError
from rproxy.filters.chain import FilterChain
from rproxy.headers import ForwardingPolicy
from rproxy.health.state import PassivePolicy
from rproxy.interfaces import (
    FilterEnvironment,
    IBalancer,
    IBalancerFactory,
    IFilterFactory,
    IRequestFilter,
    IResponseFilter,
    Outcome,
)
from rproxy.proxy.message import FilterVerdict, InboundRequest, LocalResponse, OutboundRequest, RequestContext
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import Upstream

__all__ = [
    "CONTRACT_CHECKS",
    "BalancerContractError",
    "BalancerContractTests",
    "Clock",
    "Simulation",
    "SimulationResult",
    "SimulatedRequest",
    "assertSpread",
    "checkHonoursTried",
    "checkInterface",
    "checkLoadAndWeights",
    "checkPicksMember",
    "checkReports",
    "checkSetChanges",
    "checkSingleUpstream",
    "countPicks",
    "FilterResult",
    "filterResponse",
    "inboundRequest",
    "makeUpstreams",
    "runFilters",
    "shares",
    "verifyBalancer",
    "verifyFilterFactory",
]

#: The most fake upstreams L{makeUpstreams} makes (their addresses are 10.0.X.Y:8080).
MAX_UPSTREAMS = 250 * 256


def makeUpstreams(
    weights: int | Sequence[int], clock: Clock | None = None, passive: PassivePolicy | None = None
) -> list[Upstream]:
    """
    Real L{Upstream} objects that open no socket (nothing connects until their pool is asked to).

    @param weights: how many upstreams of weight 1, or the configured weight of each (1 to 1000).
    @param clock: the clock their health (ejection, slow start) runs on; give the L{Simulation} the same.
    @param passive: their passive health policy (C{slowStart} makes returning hosts ramp up).
    @return: upstreams with keys C{http://10.0.0.1:8080}, C{http://10.0.0.2:8080}, ... in that order.
    """
    counts = [1] * weights if isinstance(weights, int) else list(weights)
    if len(counts) > MAX_UPSTREAMS:
        raise ValueError(f"at most {MAX_UPSTREAMS} fake upstreams, not {len(counts)}")
    reactor = clock if clock is not None else Clock()
    settings = PoolSettings()
    return [
        Upstream.fromURL(f"http://10.0.{i // 250}.{i % 250 + 1}:8080#weight={weight}", reactor, settings, passive)
        for i, weight in enumerate(counts)
    ]


def inboundRequest(
    target: bytes = b"/",
    clientHost: str | None = "192.0.2.1",
    headers: Iterable[tuple[bytes, bytes]] = (),
    method: bytes = b"GET",
    scheme: bytes = b"http",
) -> InboundRequest:
    """
    A request as a balancer or a filter sees it.

    @param headers: (name, value) fields, e.g. C{[(b"cookie", b"session=abc")]}.
    @param clientHost: the client's address (C{None}: a UNIX socket).
    """
    fields = Headers()
    for name, value in headers:
        fields.addRawHeader(name, value)
    return InboundRequest(method, target, fields, clientHost, scheme, b"HTTP/1.1")


def _defaultRequest(index: int) -> InboundRequest:
    """The C{index}th request of a run: a client and a target of its own."""
    client = f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"
    return inboundRequest(b"/item/%d" % index, client)


def countPicks(
    balancer: IBalancer,
    upstreams: Sequence[Upstream],
    count: int,
    requestFor: Callable[[int], InboundRequest] = _defaultRequest,
) -> Counter[Upstream]:
    """
    Pick C{count} times, one request after the other, nothing in flight and nothing reported.

    For the maths of a balancer (shares, hashing); use a L{Simulation} for load and latency.
    """
    picks: Counter[Upstream] = Counter()
    offered = tuple(upstreams)
    for i in range(count):
        upstream = balancer.pick(offered, requestFor(i), ())
        if upstream is None or upstream not in offered:
            raise AssertionError(f"pick {i} returned {upstream!r}, not one of {list(offered)}")
        picks[upstream] += 1
    return picks


def shares(counts: Mapping[Upstream, int]) -> dict[Upstream, float]:
    """Each upstream's share of the total count."""
    total = sum(counts.values())
    return {upstream: count / total if total else 0.0 for upstream, count in counts.items()}


def assertSpread(
    counts: Mapping[Upstream, int],
    upstreams: Sequence[Upstream],
    tolerance: float = 0.05,
    weights: Mapping[Upstream, float] | None = None,
) -> None:
    """
    Raise C{AssertionError} unless each upstream's share of C{counts} is its expected share, within
    C{tolerance} of that share (0.05: a host expected to get 30% gets 28.5% to 31.5%).

    @param weights: the expected proportions; by default each upstream's configured weight.
    """
    expectedWeights = weights if weights is not None else {u: float(u.configuredWeight) for u in upstreams}
    strangers = [u for u in counts if u not in expectedWeights and counts[u]]
    totalWeight = sum(expectedWeights.values())
    total = sum(counts.values())
    lines = []
    wrong = bool(strangers) or total == 0
    for upstream in upstreams:
        expected = expectedWeights[upstream] / totalWeight
        actual = counts.get(upstream, 0) / total if total else 0.0
        off = abs(actual - expected) > tolerance * expected
        wrong = wrong or off
        mark = "  <-- off" if off else ""
        lines.append(f"  {upstream.key}: {counts.get(upstream, 0)} ({actual:.2%}, expected {expected:.2%}){mark}")
    if wrong:
        lines += [f"  {u.key}: {counts[u]} (not one of the upstreams)" for u in strangers]
        raise AssertionError(
            f"spread of {total} picks is not within {tolerance:.0%} of the expected:\n" + "\n".join(lines)
        )


# -- the simulator


@dataclass
class SimulatedRequest:
    """
    One request of a simulation and what became of it.

    @ivar attempts: the upstreams it was sent to, in order.
    @ivar servedBy: the upstream that answered it, or C{None} if it failed.
    @ivar responseHeaders: what the balancer's C{onResponse} added (for balancers that filter responses).
    @ivar retried: how many of its attempts after the first count against the simulation's C{retries}.
    """

    request: InboundRequest
    arrivedAt: float
    attempts: list[Upstream] = field(default_factory=list)
    servedBy: Upstream | None = None
    finishedAt: float | None = None
    responseHeaders: list[tuple[bytes, bytes]] = field(default_factory=list)
    retried: int = 0


@dataclass
class SimulationResult:
    """
    What a L{Simulation.run} did.

    @ivar requests: every request, in arrival order.
    @ivar reports: every C{report} call, in order.
    @ivar maxInFlight: the highest C{inFlight} each upstream reached.
    """

    requests: list[SimulatedRequest]
    reports: list[tuple[Upstream, Outcome]]
    maxInFlight: dict[Upstream, int]

    @property
    def attempts(self) -> Counter[Upstream]:
        """How many attempts each upstream got."""
        return Counter(upstream for request in self.requests for upstream in request.attempts)

    @property
    def served(self) -> Counter[Upstream]:
        """How many requests each upstream answered."""
        return Counter(request.servedBy for request in self.requests if request.servedBy is not None)

    @property
    def failed(self) -> list[SimulatedRequest]:
        """The requests that got no answer."""
        return [request for request in self.requests if request.servedBy is None]


def _context(request: InboundRequest, upstream: Upstream | None = None) -> RequestContext:
    """The context an exchange gives filters for C{request} (the outbound request its plain copy)."""
    context = RequestContext(request, OutboundRequest.fromInbound(request, ForwardingPolicy()), request.clientHost)
    context.upstream = upstream
    return context


def filterResponse(
    balancer: IResponseFilter, request: InboundRequest, upstream: Upstream, status: int = 200
) -> list[tuple[bytes, bytes]]:
    """Call C{balancer.onResponse} as an exchange would for C{upstream}'s response; return the fields it added."""
    headers: list[tuple[bytes, bytes]] = []
    balancer.onResponse(_context(request, upstream), status, headers)
    return headers


@dataclass
class _Attempt:
    request: SimulatedRequest
    upstream: Upstream
    sentAt: float
    call: IDelayedCall | None = None


Latency = float | Callable[[], float]


class Simulation:
    """
    Requests through a balancer over simulated time, as the exchange sends them.

    Each upstream answers after its latency (seconds, or a callable drawing one), unless it refuses
    connections (L{setFailing}: the attempt fails after the latency and is always tried on another
    upstream) or dies (L{kill}: it leaves the available set, its attempts in flight fail at once and are
    retried within C{retries}).  A pick that is not an available, untried upstream raises
    C{AssertionError}.

    @ivar clock: the simulated time; give L{makeUpstreams} the same one.
    @ivar upstreams: every upstream, in configured order (L{add} appends).
    """

    def __init__(
        self,
        balancer: IBalancer,
        upstreams: Sequence[Upstream],
        clock: Clock | None = None,
        latency: Latency = 0.01,
        retries: int = 2,
    ) -> None:
        self.balancer = balancer
        self.upstreams = list(upstreams)
        self.clock = clock if clock is not None else Clock()
        self.retries = retries
        self._filter = IResponseFilter(balancer, None)
        self._defaultLatency = latency
        self._latency: dict[Upstream, Latency] = {}
        self._refusing: set[Upstream] = set()
        self._dead: set[Upstream] = set()
        self._inFlight: dict[Upstream, list[_Attempt]] = {}
        self._requests: list[SimulatedRequest] = []
        self._reports: list[tuple[Upstream, Outcome]] = []
        self._maxInFlight: dict[Upstream, int] = {}

    # -- the upstreams

    @property
    def available(self) -> tuple[Upstream, ...]:
        """The upstreams offered to the balancer now (alive), in configured order."""
        return tuple(upstream for upstream in self.upstreams if upstream not in self._dead)

    def setLatency(self, upstream: Upstream, latency: Latency) -> None:
        """C{upstream} answers (or refuses) after C{latency} seconds, or what C{latency()} returns each time."""
        self._latency[upstream] = latency

    def setFailing(self, upstream: Upstream, failing: bool = True) -> None:
        """C{upstream} refuses connections (or takes them again): its attempts fail and are retried elsewhere."""
        if failing:
            self._refusing.add(upstream)
        else:
            self._refusing.discard(upstream)

    def add(self, upstream: Upstream) -> None:
        """C{upstream} joins the service (at the end of the configured order), or comes back after L{kill}."""
        if upstream not in self.upstreams:
            self.upstreams.append(upstream)
        self._dead.discard(upstream)

    def kill(self, upstream: Upstream) -> None:
        """C{upstream} dies now: it leaves the available set, and its attempts in flight fail."""
        self._dead.add(upstream)
        for attempt in self._inFlight.pop(upstream, []):
            assert attempt.call is not None
            attempt.call.cancel()
            error = upstreamError(502, f"upstream {upstream.key} closed the connection", "connection_terminated")
            self._finish(attempt, None, error)

    def killAt(self, upstream: Upstream, when: float) -> IDelayedCall:
        """C{upstream} dies at clock time C{when}."""
        return self.clock.callLater(max(0.0, when - self.clock.seconds()), self.kill, upstream)

    # -- the requests

    def send(self, request: InboundRequest) -> SimulatedRequest:
        """Send one request now; it completes as the clock advances."""
        simulated = SimulatedRequest(request, self.clock.seconds())
        self._requests.append(simulated)
        self._attempt(simulated)
        return simulated

    def run(
        self,
        count: int,
        interval: float = 0.0,
        requestFor: Callable[[int], InboundRequest] = _defaultRequest,
    ) -> SimulationResult:
        """
        Send C{count} requests, one every C{interval} seconds, then let everything in flight finish.

        @param requestFor: the C{i}th request (by default each from a client and for a target of its own).
        @return: every request of the simulation so far, with every report.
        """
        for i in range(count):
            self.send(requestFor(i))
            if interval:
                self.clock.advance(interval)
        self.settle()
        return self.result()

    def settle(self) -> None:
        """Advance the clock until nothing is pending (attempts in flight, scheduled deaths)."""
        clock = self.clock
        for _ in range(len(clock.getDelayedCalls()) * (self.retries + len(self.upstreams) + 2) + 1):
            calls = clock.getDelayedCalls()
            if not calls:
                return
            clock.advance(max(0.0, min(call.getTime() for call in calls) - clock.seconds()))
        raise AssertionError("the simulation does not settle: attempts keep being scheduled")

    def result(self) -> SimulationResult:
        """Every request of the simulation so far, with every report."""
        return SimulationResult(list(self._requests), list(self._reports), dict(self._maxInFlight))

    def _attempt(self, simulated: SimulatedRequest) -> None:
        available = self.available
        if not available:
            simulated.finishedAt = self.clock.seconds()
            return
        tried = tuple(simulated.attempts)
        upstream = self.balancer.pick(available, simulated.request, tried)
        if upstream is None:
            untried = [u for u in available if u not in tried]
            if untried:
                raise AssertionError(f"pick returned None while {untried} were untried")
            simulated.finishedAt = self.clock.seconds()
            return
        if upstream not in available:
            raise AssertionError(f"pick returned {upstream!r}, not one of the available {list(available)}")
        if upstream in tried:
            raise AssertionError(f"pick returned {upstream!r}, already tried by this request")
        simulated.attempts.append(upstream)
        upstream.inFlight += 1
        self._maxInFlight[upstream] = max(self._maxInFlight.get(upstream, 0), upstream.inFlight)
        latency = self._latency.get(upstream, self._defaultLatency)
        delay = latency() if callable(latency) else latency
        attempt = _Attempt(simulated, upstream, self.clock.seconds())
        self._inFlight.setdefault(upstream, []).append(attempt)
        attempt.call = self.clock.callLater(delay, self._answer, attempt)

    def _answer(self, attempt: _Attempt) -> None:
        self._inFlight[attempt.upstream].remove(attempt)
        if attempt.upstream in self._refusing:
            error = upstreamError(502, f"upstream {attempt.upstream.key} refused the connection", "connection_refused")
            self._finish(attempt, None, error, refused=True)
        else:
            self._finish(attempt, 200, None)

    def _finish(self, attempt: _Attempt, status: int | None, error: ProxyError | None, refused: bool = False) -> None:
        simulated, upstream = attempt.request, attempt.upstream
        if status is not None and self._filter is not None:
            self._filter.onResponse(_context(simulated.request, upstream), status, simulated.responseHeaders)
        upstream.inFlight -= 1
        outcome = Outcome(status, self.clock.seconds() - attempt.sentAt, error)
        self._reports.append((upstream, outcome))
        self.balancer.report(upstream, outcome)
        if error is None:
            simulated.servedBy = upstream
            simulated.finishedAt = self.clock.seconds()
            return
        if not refused:
            if simulated.retried >= self.retries:
                simulated.finishedAt = self.clock.seconds()
                return
            simulated.retried += 1
        self._attempt(simulated)


# -- the contract


Maker = Callable[[], IBalancer]


def _contractRequests() -> list[InboundRequest]:
    """Requests that differ in every way a balancer might key on."""
    requests = [inboundRequest(), inboundRequest(clientHost=None), inboundRequest(b"/a?b=c", "2001:db8::1")]
    for i in range(12):
        requests.append(
            inboundRequest(
                b"/p/%d" % i,
                f"198.51.100.{i}",
                [(b"cookie", b"session=s%d; rproxy_sticky=forged%d" % (i, i)), (b"x-user", b"u%d" % i)],
            )
        )
    return requests


class BalancerContractError(AssertionError):
    """A balancer broke the L{IBalancer} contract; the message says which rule, and how."""


def _fail(check: str, problem: str) -> BalancerContractError:
    return BalancerContractError(f"balancer contract, {check}: {problem}")


def _pick(
    balancer: IBalancer, check: str, upstreams: Sequence[Upstream], request: InboundRequest, tried: Sequence[Upstream]
) -> Upstream | None:
    """Pick as the exchange does, and fail if the answer breaks the rules."""
    before = [upstream.inFlight for upstream in upstreams]
    chosen = balancer.pick(tuple(upstreams), request, tuple(tried))
    if [upstream.inFlight for upstream in upstreams] != before:
        raise _fail(check, "pick changed inFlight, which only the exchange may change")
    untried = [upstream for upstream in upstreams if upstream not in tried]
    if chosen is None:
        if untried:
            raise _fail(check, f"pick returned None although {len(untried)} of {len(upstreams)} upstreams were untried")
        return None
    if not any(chosen is upstream for upstream in upstreams):
        raise _fail(check, f"pick returned {chosen!r}, not one of the upstreams offered")
    if chosen in tried:
        raise _fail(check, f"pick returned {chosen!r}, which the request had already tried")
    return chosen


def checkInterface(make: Maker) -> None:
    """The balancer provides L{IBalancer} (and L{IResponseFilter} correctly, if it claims to)."""
    balancer = make()
    try:
        verifyObject(IBalancer, balancer)
        if IResponseFilter.providedBy(balancer):
            verifyObject(IResponseFilter, balancer)
    except Exception as e:
        raise _fail("interface", str(e)) from None


def checkPicksMember(make: Maker) -> None:
    """With nothing tried, every pick is one of the upstreams offered, whatever their number and weights."""
    balancer = make()
    for weights in ([1], [1, 1], [3, 1, 2], [1] * 7, [5, 1, 1, 1, 10]):
        upstreams = makeUpstreams(weights)
        for _ in range(3):
            for request in _contractRequests():
                _pick(balancer, "pick returns a member", upstreams, request, ())


def checkHonoursTried(make: Maker) -> None:
    """Retries never go back to a tried upstream; once every one was tried, pick returns None."""
    balancer = make()
    rng = random.Random(4)
    for size in (2, 3, 5):
        upstreams = makeUpstreams(size)
        for request in _contractRequests():
            tried: list[Upstream] = []
            for _ in range(size):
                chosen = _pick(balancer, "retries honour tried", upstreams, request, tried)
                assert chosen is not None
                tried.append(chosen)
            if _pick(balancer, "None when all are tried", upstreams, request, tried) is not None:
                raise _fail("None when all are tried", "pick returned an upstream")
            # tried sets the balancer did not build itself, in any order
            for k in range(size + 1):
                _pick(balancer, "retries honour tried", upstreams, request, rng.sample(upstreams, k))


def checkSingleUpstream(make: Maker) -> None:
    """One upstream: it is picked; once tried, None."""
    balancer = make()
    (only,) = upstreams = makeUpstreams(1)
    for request in _contractRequests():
        if _pick(balancer, "single upstream", upstreams, request, ()) is not only:
            raise _fail("single upstream", "pick did not return the only upstream")
        _pick(balancer, "single upstream", upstreams, request, (only,))


def checkSetChanges(make: Maker) -> None:
    """
    The set may change between picks (hosts join, leave, get ejected), and C{tried} may name upstreams no
    longer offered; reports may come for upstreams that left.
    """
    balancer = make()
    first = makeUpstreams([1, 2, 3, 1])
    later = makeUpstreams(3)
    sets = [first, first[1:], first[1:] + later, later, [first[0]], first + later, first[::-1]]
    requests = _contractRequests()
    for upstreams in sets:
        for request in requests:
            chosen = _pick(balancer, "set changes", upstreams, request, (first[0], later[0]))
            if chosen is not None:
                balancer.report(chosen, Outcome(200, 0.01))
        balancer.report(first[0], Outcome(200, 0.01))


def checkReports(make: Maker) -> None:
    """Reports of every kind (success, error status, failure, zero latency) are taken, and picks go on."""
    balancer = make()
    upstreams = makeUpstreams([2, 1, 1])
    failure = upstreamError(502, "upstream refused the connection", "connection_refused")
    outcomes = [Outcome(200, 0.005), Outcome(503, 0.2), Outcome(None, 1.5, failure), Outcome(204, 0.0)]
    requests = _contractRequests()
    for i in range(40):
        request = requests[i % len(requests)]
        chosen = _pick(balancer, "reports", upstreams, request, ())
        assert chosen is not None
        balancer.report(chosen, outcomes[i % len(outcomes)])


def checkLoadAndWeights(make: Maker) -> None:
    """Picks stay valid with exchanges in flight and with fractional (slow-starting) weights."""
    balancer = make()
    clock = Clock()
    upstreams = makeUpstreams([1, 4, 2], clock, PassivePolicy(baseEjection=1.0, slowStart=10.0))
    upstreams[1].health.eject("contract check")
    clock.advance(4.0)  # back for 3 of its 10 slow-start seconds: weight 4 * 0.3
    upstreams[0].inFlight = 7
    try:
        if not 0 < upstreams[1].weight < upstreams[1].configuredWeight:
            raise _fail("load and weights", "the slow-start set-up did not give a fractional weight")
        for request in _contractRequests() * 3:
            _pick(balancer, "load and weights", upstreams, request, ())
            _pick(balancer, "load and weights", upstreams, request, upstreams[:1])
    finally:
        upstreams[0].inFlight = 0


#: The checks L{verifyBalancer} runs, in order.
CONTRACT_CHECKS: tuple[Callable[[Maker], None], ...] = (
    checkInterface,
    checkPicksMember,
    checkHonoursTried,
    checkSingleUpstream,
    checkSetChanges,
    checkReports,
    checkLoadAndWeights,
)


def _maker(subject: IBalancer | IBalancerFactory | Maker, options: Mapping[str, object]) -> Maker:
    if IBalancerFactory.providedBy(subject):
        factory = cast(IBalancerFactory, subject)
        try:
            verifyObject(IBalancerFactory, factory)
        except Exception as e:
            raise _fail("factory", str(e)) from None
        if not isinstance(factory.name, str) or not factory.name or factory.name != factory.name.strip():
            raise _fail("factory", f"its name must be a non-empty string without spaces around, got {factory.name!r}")
        if not isinstance(factory.description, str):
            raise _fail("factory", f"its description must be a string, got {factory.description!r}")
        return lambda: factory.build(dict(options))
    if IBalancer.providedBy(subject):
        balancer = cast(IBalancer, subject)
        return lambda: balancer
    if callable(subject):
        return cast(Maker, subject)
    raise _fail("interface", f"{subject!r} is neither an IBalancer, an IBalancerFactory nor a callable making one")


def verifyBalancer(subject: IBalancer | IBalancerFactory | Maker, options: Mapping[str, object] | None = None) -> None:
    """
    Check that a balancer keeps the L{IBalancer} contract; raise L{BalancerContractError} (an
    C{AssertionError}) saying what it breaks, also when the balancer raises an exception.

    The balancer must provide the interface; with nothing tried, pick one of the upstreams offered (any
    number of them, any weights, any load); never pick an upstream in C{tried}, and return C{None} only when
    all were tried; cope with the set changing between picks and with C{tried} naming upstreams no longer
    offered; take every kind of report; and leave C{inFlight} alone.

    @param subject: a factory (built anew with C{options} for each check), a balancer, or a callable
        returning a new balancer.
    """
    make = _maker(subject, options or {})
    for check in CONTRACT_CHECKS:
        try:
            check(make)
        except BalancerContractError:
            raise
        except Exception as e:
            raise _fail(check.__name__, f"the balancer raised {e!r}") from e


class BalancerContractTests:
    """
    The contract check as tests: mix into a C{TestCase} and define L{makeBalancer}::

        class MyBalancerContractTests(BalancerContractTests, unittest.TestCase):
            def makeBalancer(self):
                return MyBalancer()
    """

    #: Defined by the test case: a new balancer to check.
    makeBalancer: Callable[[], IBalancer]

    def _contract(self, check: Callable[[Maker], None]) -> None:
        """Run C{check}, its violations raised as the test framework's failures (trial's C{FailTest})."""
        maker = getattr(self, "makeBalancer", None)
        if maker is None:
            raise TypeError(f"{type(self).__name__} must define makeBalancer()")
        try:
            check(maker)
        except BalancerContractError as e:
            failure: type[BaseException] = getattr(self, "failureException", AssertionError)
            if isinstance(e, failure):
                raise
            raise failure(str(e)) from None

    def test_contractInterface(self) -> None:
        self._contract(checkInterface)

    def test_contractPicksMember(self) -> None:
        self._contract(checkPicksMember)

    def test_contractHonoursTried(self) -> None:
        self._contract(checkHonoursTried)

    def test_contractSingleUpstream(self) -> None:
        self._contract(checkSingleUpstream)

    def test_contractSetChanges(self) -> None:
        self._contract(checkSetChanges)

    def test_contractReports(self) -> None:
        self._contract(checkReports)

    def test_contractLoadAndWeights(self) -> None:
        self._contract(checkLoadAndWeights)


# -- directors: route requests without sockets

if TYPE_CHECKING:
    from rproxy.interfaces import IDirector
    from rproxy.proxy.message import OutboundRequest
    from rproxy.proxy.service import Service

__all__ += ["countServices", "directRequest", "makeService"]


def makeService(name: str = "default", upstreams: int | Sequence[int] = 1, clock: Clock | None = None) -> Service:
    """
    A L{Service} named C{name}, of fake upstreams (L{makeUpstreams}: weights, or how many) in a registry
    of its own, balanced round robin: something for a director to choose, with no socket.
    """
    from rproxy.proxy.balancers import RoundRobin
    from rproxy.proxy.registry import MemoryRegistry
    from rproxy.proxy.service import Service

    registry = MemoryRegistry()
    for upstream in makeUpstreams(upstreams, clock):
        registry.add(name, upstream)
    return Service(name, registry, RoundRobin())


def directRequest(director: IDirector, request: InboundRequest) -> tuple[Service | None, OutboundRequest]:
    """
    Route C{request} as an exchange does: build the outbound copy (its target and ``Host``, its end-to-end
    fields and the default forwarding fields), then call C{director.direct}::

        service, outbound = directRequest(director, inboundRequest(b"/api/x", headers=[(b"host", b"a.example")]))

    @return: the service chosen (C{None}: the client would get 404) and the outbound request as the
        director left it.
    """
    from rproxy.headers import ForwardingPolicy
    from rproxy.proxy.message import OutboundRequest

    outbound = OutboundRequest.fromInbound(request, ForwardingPolicy())
    return director.direct(request, outbound), outbound


def countServices(
    director: IDirector, count: int, requestFor: Callable[[int], InboundRequest] = _defaultRequest
) -> Counter[Service | None]:
    """
    Route C{count} requests and count where they went (C{None}: no route matched); the C{i}th request is
    C{requestFor(i)}, by default from a client of its own (for splits sticky on C{client_ip}).
    """
    return Counter(directRequest(director, requestFor(i))[0] for i in range(count))


# -- filters


@dataclass
class FilterResult:
    """
    How a request went through filters (L{runFilters}).

    @ivar verdict: C{None} when every request filter let it through, else the answer that stopped it.
    @ivar context: what the filters saw and noted (C{user}, C{claims}, C{notes}).
    @ivar forwarded: the fields the upstream would get (C{[]} when the request was answered).
    @ivar status: the status the client gets.
    @ivar headers: the fields the client gets, after the response filters (an error's: those added to it).
    @ivar body: the body the client gets (an error's: its one-line text), after any body transform.
    @ivar sent: the request body the upstream would get, with its declared length (C{None}: chunked), when
        the request went through with one; else C{None}.
    """

    verdict: FilterVerdict
    context: RequestContext
    forwarded: list[tuple[bytes, bytes]]
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    sent: tuple[bytes, int | None] | None = None


@implementer(IPushProducer)
class _GivenBody:
    """The client's side of a request body given by a test, not read from a socket: nothing to pause."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collected:
    """Reads a body pipe to its end, as an upstream connection would."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.complete = False

    def writeBody(self, data: bytes) -> None:
        self.parts.append(data)

    def finishBody(self, trailers: object) -> None:
        self.complete = True

    def failBody(self, error: ProxyError) -> None:
        raise AssertionError(f"the request body the filters left failed: {error.reason}")

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        pass

    def unregisterBodyProducer(self) -> None:
        pass


def _givenBody(parts: Sequence[bytes], declareLength: bool) -> RequestBodyPipe:
    """A body pipe that has received C{parts}, then the end of the body."""
    pipe = RequestBodyPipe(_GivenBody(), sum(map(len, parts)) if declareLength else None)
    for part in parts:
        pipe.dataReceived(part)
    pipe.finish()
    return pipe


def _sentBody(pipe: RequestBodyPipe) -> tuple[bytes, int | None]:
    collected = _Collected()
    pipe.attach(collected)
    if not collected.complete:
        raise AssertionError("the request body the filters left did not end once read")
    return b"".join(collected.parts), pipe.length


def runFilters(
    filters: Sequence[object],
    request: InboundRequest | None = None,
    *,
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes | Sequence[bytes] = b"",
    forwarding: ForwardingPolicy = ForwardingPolicy(),
    requestBody: bytes | Sequence[bytes] | None = None,
    declareLength: bool = True,
) -> Deferred[FilterResult]:
    """
    Run C{filters} (named C{filter0}, C{filter1}, ...) on C{request} as an exchange runs a chain, with
    C{status}, C{headers} and C{body} (bytes, or the parts it arrives in) as the upstream's response when
    every filter lets the request through.  The Deferred fires when the filters have decided (at once
    unless one waits for I/O), after the exchange has ended (L{RequestContext.whenEnded} callbacks ran).

    @param requestBody: the request body (bytes, or the parts it arrives in), all received before the
        filters run; C{None}: the request has none.
    @param declareLength: whether the client declared the body's length (else it came chunked).
    """
    request = inboundRequest() if request is None else request
    chain = FilterChain((f"filter{i}", each) for i, each in enumerate(filters))
    outbound = OutboundRequest.fromInbound(request, forwarding)
    context = RequestContext(request, outbound, forwarding.client(request.clientHost, request.headers))
    if requestBody is not None:
        context.body = _givenBody([requestBody] if isinstance(requestBody, bytes) else requestBody, declareLength)
    run = chain.start(context)
    decided: Deferred[FilterVerdict] = Deferred()
    run.request(decided.callback)

    def respond(verdict: FilterVerdict) -> FilterResult:
        try:
            return answer(verdict)
        finally:
            context.end()

    def answer(verdict: FilterVerdict) -> FilterResult:
        if isinstance(verdict, LocalResponse):
            answer = run.localAnswer(verdict)
            return FilterResult(verdict, context, [], answer.status, answer.headers, answer.body)
        if verdict is not None:
            run.errorFields(verdict)
            return FilterResult(verdict, context, [], verdict.status, verdict.headers, verdict.body())
        fields = list(headers)
        transform = run.response(status, fields)
        parts = [body] if isinstance(body, bytes) else list(body)
        if transform is None:
            sent = b"".join(parts)
        else:
            sent = b"".join(transform.transform(part) for part in parts if part) + transform.finish()
        upstreamBody = _sentBody(context.body) if context.body is not None else None
        return FilterResult(None, context, list(outbound.fields()), status, fields, sent, upstreamBody)

    return decided.addCallback(respond)


def verifyFilterFactory(factory: IFilterFactory, options: Mapping[str, object], reactor: object = None) -> object:
    """
    Check C{factory} against the L{IFilterFactory} contract (a name, a description, C{build} giving a
    filter that provides L{IRequestFilter} or L{IResponseFilter} correctly, and C{ValueError} naming an
    unknown option); return the filter it built from C{options}.
    """
    verifyObject(IFilterFactory, factory)
    if not isinstance(factory.name, str) or not factory.name:
        raise AssertionError(f"filter factory {factory!r}: its name must be a non-empty string")
    if not isinstance(factory.description, str) or not factory.description:
        raise AssertionError(f"filter factory {factory.name!r}: its description must be a non-empty string")
    environment = FilterEnvironment(Clock() if reactor is None else reactor)
    built = factory.build(options, environment)
    provided = False
    for interface in (IRequestFilter, IResponseFilter):
        if interface.providedBy(built):
            verifyObject(interface, built)
            provided = True
    if not provided:
        raise AssertionError(f"filter {factory.name!r}: {built!r} provides neither IRequestFilter nor IResponseFilter")
    if IRequestFilter.providedBy(built):
        for name in getattr(built, "consumes", ()):
            if not isinstance(name, bytes) or name != name.lower():
                raise AssertionError(f"filter {factory.name!r}: consumes {name!r}, not a lower-case bytes field name")
    try:
        factory.build({**options, "no-such-option-xyz": "1"}, environment)
    except ValueError as e:
        if "no-such-option-xyz" not in str(e):
            raise AssertionError(f"filter {factory.name!r}: an unknown option's error does not name it: {e}") from None
    else:
        raise AssertionError(f"filter {factory.name!r}: an unknown option was accepted")
    return built
