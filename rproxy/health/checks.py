"""
Active health checks: probe each upstream over HTTP on a fresh connection, and mark it down or up.

L{HTTPHealthCheck} runs one probe: a new connection (never a pooled one), C{Connection: close}, a
C{User-Agent} of C{rproxy-health/<version>}, one deadline over connect, response and body, TLS verified
as for proxied requests.  Every failure becomes a L{HealthResult} with a one-line reason.

L{HealthChecker} is the service that runs probes for every upstream of the services it is given,
every C{interval} seconds (with jitter), and feeds the verdicts to each upstream's
L{rproxy.health.state.UpstreamHealth}, which marks the upstream down after C{fall} failures in a row and up
after C{rise} passes.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from rproxy._version import __version__
from rproxy.health.shared import Verdict
from rproxy.interfaces import HealthResult, IHealthCheck, IRegistry
from rproxy.upstream.upstreams import Upstream

if TYPE_CHECKING:  # twisted.web.client (Agent) is imported when a check is made: active checks are optional
    from twisted.web.client import URI, HTTPConnectionPool

__all__ = ["BODY_LIMIT", "USER_AGENT", "HTTPHealthCheck", "HealthCheckSettings", "HealthChecker"]

#: The C{User-Agent} of every check, so that upstream logs can tell checks from clients.
USER_AGENT = f"rproxy-health/{__version__}"

#: The most response body bytes a check reads; a C{body} expectation must be met within them.
BODY_LIMIT = 64 * 1024

#: Each interval between two checks of an upstream is stretched or shrunk by up to this share, at random,
#: so that the checks of many upstreams do not align; the first check waits up to this share of one interval.
_JITTER = 0.1

_METHODS = ("GET", "HEAD")
_STATUS_ITEM = re.compile(r"(\d{3})(?:-(\d{3}))?")


def _parseStatuses(spec: str) -> tuple[tuple[int, int], ...]:
    """C{"200-299,304"} as inclusive ranges; raise C{ValueError} naming the bad item."""
    ranges = []
    for item in spec.split(","):
        item = item.strip().replace(" ", "")
        match = _STATUS_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(
                f"health check status {spec!r}: {item!r} is not a status or a range of statuses like 200-399"
            )
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if not 100 <= low <= high <= 599:
            raise ValueError(
                f"health check status {spec!r}: {item!r} must be statuses from 100 to 599, the lower one first"
            )
        ranges.append((low, high))
    return tuple(ranges)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"health check {name} must be a positive number of seconds, not {value!r}")


def _count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"health check {name} must be a whole number of at least 1, not {value!r}")


@dataclass(frozen=True)
class HealthCheckSettings:
    """
    How one service's upstreams are checked.  Invalid values raise C{ValueError} naming the setting.

    @ivar path: the request target, after the upstream's base path (C{/api} + C{/health} = C{/api/health});
        it may carry a query.
    @ivar method: C{GET} or C{HEAD}.
    @ivar status: the statuses that pass: comma-separated statuses and inclusive ranges (C{200-299,304}).
    @ivar body: text the response body must contain (a plain substring, matched against the body's first
        L{BODY_LIMIT} bytes after encoding it as UTF-8), or C{None} not to look at the body.
    @ivar interval: seconds from the end of one check of an upstream to the start of the next (with jitter).
    @ivar timeout: seconds one check may take in all: connecting, TLS, the response head and the body.
    @ivar rise: passed checks in a row that bring a down upstream back up.
    @ivar fall: failed checks in a row that mark an up upstream down.
    @ivar host: the C{Host} to send, or C{None} for the upstream's own (C{host:port}, as in its URL).
    """

    path: str = "/"
    method: str = "GET"
    status: str = "200-399"
    body: str | None = None
    interval: float = 10.0
    timeout: float = 5.0
    rise: int = 2
    fall: int = 3
    host: str | None = None
    _statuses: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or any(not "!" <= c <= "~" or c == "#" for c in self.path):
            raise ValueError(
                f"health check path {self.path!r} must start with '/' and be printable ASCII without spaces "
                "or '#' (percent-encode the rest)"
            )
        method = self.method.upper()
        if method not in _METHODS:
            raise ValueError(f"health check method must be GET or HEAD, not {self.method!r}")
        object.__setattr__(self, "method", method)
        statuses = _parseStatuses(self.status)
        object.__setattr__(self, "_statuses", statuses)
        object.__setattr__(self, "status", ",".join(f"{a}-{b}" if a != b else str(a) for a, b in statuses))
        if self.body is not None:
            if method == "HEAD":
                raise ValueError("health check body: a HEAD response has no body to match; use GET")
            if not self.body:
                raise ValueError("health check body must not be empty (leave it unset not to check the body)")
            if len(self.body.encode("utf-8")) > BODY_LIMIT:
                raise ValueError(f"health check body must be at most {BODY_LIMIT} bytes long")
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)
        _count("rise", self.rise)
        _count("fall", self.fall)
        if self.host is not None and (not self.host or any(not "!" <= c <= "~" for c in self.host)):
            raise ValueError(
                f"health check host {self.host!r} must be non-empty printable ASCII without spaces "
                "(punycode for international names)"
            )

    def expects(self, status: int) -> bool:
        """Whether a response of C{status} passes."""
        return any(low <= status <= high for low, high in self._statuses)


class _TrackingProtocol(ProtocolWrapper):
    """Tells its attempt when the connection is made and when it is gone."""

    factory: _TrackingFactory

    def makeConnection(self, transport: ITCPTransport) -> None:
        self.factory.attempt.connected(transport)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        # First, so that the attempt does not abort a transport that is already gone when the agent's
        # request fails with this loss.
        self.factory.attempt.disconnected()
        super().connectionLost(reason)


class _TrackingFactory(WrappingFactory):
    noisy = False
    protocol = _TrackingProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, attempt: _Attempt) -> None:
        super().__init__(wrappedFactory)
        self.attempt = attempt
        if isinstance(wrappedFactory, Factory):
            wrappedFactory.noisy = False  # the pool makes one per connection: no "Starting factory" per check


@implementer(IAgentEndpointFactory, IStreamClientEndpoint)
class _AttemptEndpoint:
    """The upstream's own endpoint (as proxied requests use it, TLS included), its connection watched."""

    def __init__(self, endpoint: IStreamClientEndpoint, attempt: _Attempt) -> None:
        self._endpoint = endpoint
        self._attempt = attempt

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self._endpoint.connect(_TrackingFactory(protocolFactory, self._attempt))
        return connecting.addCallback(_unwrapped)


def _unwrapped(wrapper: IProtocol) -> IProtocol:
    """The protocol the agent asked for (it talks to that one, not to the wrapper)."""
    wrapped: IProtocol = cast(ProtocolWrapper, wrapper).wrappedProtocol
    return wrapped


class _BodyReader(Protocol):
    """Collects a response body up to a limit; C{done} fires with it (then C{complete} tells if it was all)."""

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred()
        self.complete = False
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._limit:
            self.done.callback(b"".join(self._chunks)[: self._limit])

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        from twisted.web.client import ResponseDone

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.complete = True
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class _Attempt:
    """
    One check of one upstream: one connection, one request, one verdict.

    The verdict is delivered once the connection is closed: after a complete response the client side
    closes it as C{Connection: close} says; otherwise (a failure, a wrong status, more body than is read)
    it is aborted.  The deadline bounds all of it, closing included.
    """

    def __init__(self, reactor: IReactorTime, settings: HealthCheckSettings, pool: HTTPConnectionPool) -> None:
        self._reactor = reactor
        self._settings = settings
        self._pool = pool
        self._phase = "connecting"
        self._awaiting: Deferred[Any] | None = None
        self._transport: ITCPTransport | None = None
        self._lost: Deferred[None] | None = None
        self._aborted = False
        self._timedOut = False
        self._cancelled = False
        self._complete = False

    # -- the connection, as _TrackingProtocol reports it

    def connected(self, transport: ITCPTransport) -> None:
        self._transport = transport
        self._lost = Deferred()
        self._phase = "waiting for the response"

    def disconnected(self) -> None:
        lost, self._lost = self._lost, None
        self._transport = None
        if lost is not None:
            lost.callback(None)

    # -- running

    def run(self, upstream: Upstream) -> tuple[Deferred[HealthResult], Deferred[None]]:
        """Start; return the verdict's Deferred (cancellable) and one that fires when the attempt is over."""
        deadline = self._reactor.callLater(self._settings.timeout, self._expire)
        verdict: Deferred[HealthResult] = Deferred(lambda _: self._cancel())
        over = Deferred.fromCoroutine(self._probe(upstream))

        def deliver(result: HealthResult) -> None:
            if deadline.active():
                deadline.cancel()
            if not self._cancelled:
                verdict.callback(result)

        return verdict, over.addCallback(deliver)

    async def _probe(self, upstream: Upstream) -> HealthResult:
        try:
            result = await self._exchange(upstream)
        except Exception:
            result = HealthResult(False, self._describe(Failure(), upstream))
        if self._lost is not None:
            if not (self._complete or self._aborted):
                self._abortConnection()
            await self._lost
        return result

    async def _exchange(self, upstream: Upstream) -> HealthResult:
        from twisted.web.client import Agent

        settings = self._settings
        url = upstream.url
        endpoint = _AttemptEndpoint(url.endpoint(self._reactor, settings.timeout), self)
        agent = Agent.usingEndpointFactory(self._reactor, endpoint, self._pool)
        base = url.basePath[:-1] if url.basePath.endswith(b"/") else url.basePath
        target = base + settings.path.encode("ascii")
        host = upstream.hostHeader if settings.host is None else settings.host.encode("ascii")
        headers = Headers({b"host": [host], b"user-agent": [USER_AGENT.encode("ascii")]})
        # The agent connects through the endpoint above and sends the Host given: the URI only frames the target.
        uri = url.scheme.encode("ascii") + b"://" + upstream.hostHeader + target
        response: IResponse = await self._wait(agent.request(settings.method.encode("ascii"), uri, headers))
        if not settings.expects(response.code):
            return HealthResult(False, f"status {response.code}, expected {settings.status}")
        self._phase = "reading the body"
        reader = _BodyReader(BODY_LIMIT)
        response.deliverBody(reader)
        body = await self._wait(reader.done)
        self._complete = reader.complete
        expected = settings.body
        if expected is not None and expected.encode("utf-8") not in body:
            within = "" if reader.complete else f" within its first {BODY_LIMIT} bytes"
            return HealthResult(False, f"body does not contain {_abbreviate(expected)}{within}")
        return HealthResult(True)

    def _wait(self, d: Deferred[Any]) -> Deferred[Any]:
        self._awaiting = d
        return d

    def _expire(self) -> None:
        self._timedOut = True
        self._interrupt()

    def _cancel(self) -> None:
        self._cancelled = True
        self._interrupt()

    def _interrupt(self) -> None:
        """Stop at once: cancel what is awaited, abort the connection."""
        self._aborted = True
        awaiting = self._awaiting
        if awaiting is not None and not awaiting.called:
            awaiting.cancel()
        self._abortConnection()

    def _abortConnection(self) -> None:
        self._aborted = True
        if self._transport is not None:
            self._transport.abortConnection()

    def _describe(self, failure: Failure, upstream: Upstream) -> str:
        """One line saying why the check failed."""
        if self._timedOut:
            return f"timed out after {self._settings.timeout:g}s {self._phase}"
        for reason in _causes(failure):
            if reason.check(error.ConnectionRefusedError):
                return "connection refused"
            if reason.check(error.DNSLookupError):
                return f"DNS lookup of {upstream.url.host} failed"
            if reason.check(error.TimeoutError):
                return f"timed out after {self._settings.timeout:g}s connecting"
            if reason.check(SSL.Error):
                return f"TLS handshake failed: {_sslMessage(reason.getErrorMessage(), reason.value)}"
            if reason.check(VerificationError):
                return f"TLS certificate is not valid for {upstream.url.host}"
            # What Agent raises for a response that is not HTTP; twisted.web does not export its class.
            if type(reason.value).__name__ == "ParseError":
                return f"invalid HTTP response: {_oneLine(str(reason.value.args[0]))}"  # type: ignore[union-attr]
            if reason.check(error.ConnectionLost, error.ConnectionDone, PotentialDataLoss):
                if self._phase == "reading the body":
                    return "connection closed mid-response"
                return "connection closed before the response"
        last = _causes(failure)[-1]
        text = _oneLine(last.getErrorMessage())
        return f"{last.type.__name__}: {text}" if text else last.type.__name__  # type: ignore[union-attr]


def _causes(failure: Failure) -> list[Failure]:
    """The failures an Agent error wraps (ResponseFailed and the like carry a list), or the failure itself."""
    reasons = getattr(failure.value, "reasons", None)
    if not reasons:
        return [failure]
    return [inner for reason in reasons for inner in _causes(reason)]


def _sslMessage(message: str, exception: object) -> str:
    """OpenSSL's reasons (C{certificate verify failed}), without the library and function names."""
    args = getattr(exception, "args", ())
    details = args[0] if args else None
    if isinstance(details, list):
        texts = [item[-1] for item in details if isinstance(item, tuple) and item and item[-1]]
        if texts:
            return "; ".join(texts)
    return _oneLine(message) or "unknown error"


def _oneLine(text: str) -> str:
    return " ".join(text.split())[:200]


def _abbreviate(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@implementer(IHealthCheck)
class HTTPHealthCheck:
    """
    An HTTP check with the same settings for every upstream it probes.

    Each check opens its own connection and closes it before its verdict is delivered; its Deferred
    never fails (a failure is a L{HealthResult} with a reason) unless it is cancelled.
    """

    def __init__(self, reactor: IReactorTime, settings: HealthCheckSettings) -> None:
        self._reactor = reactor
        self.settings = settings
        from twisted.web.client import HTTPConnectionPool

        self._pool: HTTPConnectionPool = HTTPConnectionPool(reactor, persistent=False)
        self._running: dict[Deferred[HealthResult], Deferred[None]] = {}

    def check(self, upstream: Upstream) -> Deferred[HealthResult]:
        """
        Probe C{upstream} on a fresh connection.

        Cancelling the Deferred aborts the check; L{abortAll} tells when its connection is closed.
        """
        verdict, over = _Attempt(self._reactor, self.settings, self._pool).run(upstream)
        if not over.called:
            self._running[verdict] = over
            over.addBoth(self._over, verdict)
        return verdict

    def _over(self, _: None, verdict: Deferred[HealthResult]) -> None:
        del self._running[verdict]

    def abortAll(self) -> Deferred[None]:
        """Cancel every check in flight; fires once all their connections are closed."""
        running = list(self._running.items())
        for verdict, _ in running:
            verdict.cancel()
        return _allDone(over for _, over in running)


def _allDone(deferreds: Iterable[Deferred[Any]]) -> Deferred[None]:
    return gatherResults(list(deferreds)).addCallback(lambda _: None)


@dataclass(eq=False)
class _Probe:
    """The checking of one upstream of one service: its next check, or the one in flight."""

    service: str
    upstream: Upstream
    check: HTTPHealthCheck
    call: IDelayedCall | None = None
    inFlight: Deferred[HealthResult] | None = None
    stopped: bool = False
    lastReason: str = ""
    reported: str | None = None  # the verdict last reported: "up", or why it is down (None: none yet)

    def stop(self) -> None:
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        if self.inFlight is not None:
            self.inFlight.cancel()


class HealthChecker(Service):
    """
    Checks every upstream of the given services periodically, and marks them down and up.

    The upstreams come from C{registry}, watched for changes: an added upstream gets its first check
    within a tenth of an interval, a removed one stops being checked (its check in flight is aborted).
    One check of an upstream at most is in flight; the next starts C{interval} seconds (give or take a
    tenth, at random) after one ends.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        registry: IRegistry,
        settings: Mapping[str, HealthCheckSettings],
        report: Callable[[Verdict], None] | None = None,
    ) -> None:
        """
        @param settings: the check of each service to check, by service name; others are not checked.
        @param report: what is told each upstream's verdict after its first check and whenever it changes,
            and a verdict of C{None} when an upstream is no longer checked (L{rproxy.health.shared}).
        """
        self._reactor = reactor
        self._report = report
        self._registry = registry
        self._checks = {service: HTTPHealthCheck(reactor, each) for service, each in settings.items()}
        self._probes: dict[tuple[str, Upstream], _Probe] = {}
        self._unwatch: Callable[[], None] | None = None

    def startService(self) -> None:
        """Check the current upstreams soon, and watch the registry for changes."""
        super().startService()
        self._unwatch = self._registry.watch(self._reconcile)
        for service in self._checks:
            self._reconcile(service)

    def stopService(self) -> Deferred[None]:
        """Stop watching and checking; fires once the connections of the checks in flight are closed."""
        super().stopService()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            probe.stop()
        return _allDone(check.abortAll() for check in self._checks.values())

    def _reconcile(self, service: str) -> None:
        check = self._checks.get(service)
        if check is None or not self.running:
            return
        members = set(self._registry.members(service))
        for key, probe in list(self._probes.items()):
            if key[0] == service and probe.upstream not in members:
                del self._probes[key]
                probe.stop()
                if self._report is not None and probe.reported is not None:
                    self._report(Verdict(service, probe.upstream.key, None))
        for upstream in members:
            if (service, upstream) not in self._probes:
                probe = _Probe(service, upstream, check)
                self._probes[service, upstream] = probe
                self._schedule(probe, random.uniform(0, _JITTER) * check.settings.interval)

    def _schedule(self, probe: _Probe, delay: float) -> None:
        probe.call = self._reactor.callLater(delay, self._run, probe)

    def _run(self, probe: _Probe) -> None:
        probe.call = None
        d = probe.inFlight = probe.check.check(probe.upstream)
        d.addCallback(self._checked, probe)
        d.addErrback(self._unexpected, probe)
        d.addBoth(self._next, probe)

    def _next(self, _: object, probe: _Probe) -> None:
        probe.inFlight = None
        if not probe.stopped:
            interval = probe.check.settings.interval
            self._schedule(probe, interval * random.uniform(1 - _JITTER, 1 + _JITTER))

    def _unexpected(self, failure: Failure, probe: _Probe) -> None:
        if not failure.check(CancelledError):  # cancelled: the probe was stopped
            self._log.failure("health check of {upstream} went wrong", failure, upstream=probe.upstream.key)

    def _checked(self, result: HealthResult, probe: _Probe) -> None:
        settings = probe.check.settings
        health = probe.upstream.health
        wasUp = health.activeUp
        changed = health.checked(result, settings.rise, settings.fall)
        fields = {"service": probe.service, "upstream": probe.upstream.key, "reason": result.reason}
        if changed and not result.healthy:
            self._log.warn(
                "service {service}: upstream {upstream} is down after {fall} failed health checks: {reason}",
                fall=settings.fall,
                **fields,
            )
        elif changed:
            self._log.info(
                "service {service}: upstream {upstream} is up again after {rise} passed health checks",
                rise=settings.rise,
                **fields,
            )
        elif not result.healthy:
            # While up, every failure counts towards marking it down; while down, only a new reason is news.
            level = self._log.info if wasUp or result.reason != probe.lastReason else self._log.debug
            level("service {service}: health check of upstream {upstream} failed: {reason}", **fields)
        probe.lastReason = result.reason if not result.healthy else ""
        if self._report is not None:
            # Down for the check's reason (health.reason may be a passive ejection's); while a down upstream
            # passes checks on its way up, for the reason last reported.
            if health.activeUp:
                reason = ""
            elif not result.healthy:
                reason = result.reason
            else:
                reason = probe.reported if probe.reported not in (None, "up") else health.reason
            verdict = "up" if health.activeUp else reason
            if verdict != probe.reported:  # the first, a change, or a new reason
                probe.reported = verdict
                self._report(Verdict(probe.service, probe.upstream.key, health.activeUp, reason))
