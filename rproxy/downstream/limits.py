"""
What a client may send and how long it may take: the limits of every client connection, both protocols,
and the clock of each request that enforces its minimum body rate and its total time (L{RequestClock}).

docs/limits.md describes every limit, its answer and its default.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from rproxy import deadline


@dataclass(frozen=True)
class ClientLimits:
    """
    What a client may send and how long it may take (bytes, counts, seconds).

    @ivar maxRequestLine: longest request line (longer: 414).
    @ivar maxHeaderBytes: largest header section, request line included (larger: 431).
    @ivar maxHeaders: most header fields (more: 431).
    @ivar maxBodySize: largest request body, 0 for no limit (larger: 413, enforced while streaming).
    @ivar headerTimeout: how long the request head may take to arrive (slower: 408).
    @ivar idleTimeout: how long an idle keep-alive connection is kept.
    @ivar maxConnections: client connections at once, per listener group (more: 503 and close).
    @ivar maxClientConnections: client connections at once from one address (an IPv6 one by its /64), 0 for
        no limit (more: 503 and close).
    @ivar minBodyRate: the slowest a request body may arrive, in bytes per second averaged over
        C{bodyRateWindow}, once C{bodyRateGrace} has passed, 0 for no minimum (slower: 408).
    @ivar bodyRateGrace: seconds a request body may take before its rate is measured.
    @ivar bodyRateWindow: seconds over which the rate of a request body is averaged.
    @ivar writeTimeout: seconds a client may leave the proxy's send buffer full without reading from it
        (then its connection, or HTTP/2 connection, is aborted), 0 for no limit.
    @ivar requestTimeout: seconds from a request's head to the end of its response, tunnels excepted,
        0 for no limit (then 408 while its body arrives, 504 while its response is awaited, a reset once
        the response has begun).
    @ivar maxInFlight: requests being proxied at once, 0 for no limit (more: 503, see L{rproxy.downstream.overload}).
    @ivar maxMemory: the resident memory above which new requests are shed, 0 for no limit (then 503).
    @ivar h2MaxConcurrentStreams: HTTP/2 streams a client may have open at once
        (C{SETTINGS_MAX_CONCURRENT_STREAMS}; a client that opens more gets GOAWAY).
    @ivar h2MaxHeaderListSize: largest HTTP/2 header list, as RFC 9113 counts it
        (C{SETTINGS_MAX_HEADER_LIST_SIZE}; a larger one gets GOAWAY).
    @ivar h2ResetBurst: HTTP/2 streams a client may reset in a burst (Rapid Reset, CVE-2023-44487) ...
    @ivar h2ResetRate: ... and per second after it; beyond, GOAWAY(ENHANCE_YOUR_CALM) and close.
    """

    maxRequestLine: int = 8192
    maxHeaderBytes: int = 32768
    maxHeaders: int = 100
    maxBodySize: int = 0
    headerTimeout: float = 10.0
    idleTimeout: float = 60.0
    maxConnections: int = 10000
    maxClientConnections: int = 1000
    minBodyRate: int = 512
    bodyRateGrace: float = 10.0
    bodyRateWindow: float = 10.0
    writeTimeout: float = 60.0
    requestTimeout: float = 0.0
    maxInFlight: int = 10000
    maxMemory: int = 0
    h2MaxConcurrentStreams: int = 100
    h2MaxHeaderListSize: int = 65536
    h2ResetBurst: int = 200
    h2ResetRate: int = 33


#: How much of an IPv6 client address is its key by default: a /64 is one subscriber's (RFC 6177), and a host
#: may take any of its addresses, each a fresh count if counted one by one.
IPV6_PREFIX = 64


@functools.lru_cache(maxsize=4096)  # a client opens many connections and sends many requests
def addressKey(client: str, ipv6Prefix: int = IPV6_PREFIX) -> bytes:
    """
    The key of client address C{client}: an IPv4 address itself, an IPv6 one its network of C{ipv6Prefix}
    bits (C{2001:db8:1:2::/64}), or the IPv4 address an IPv4-mapped one stands for (a dual-stack socket's
    C{::ffff:192.0.2.7} is C{192.0.2.7}).
    """
    try:
        address = ipaddress.IPv6Address(client)
    except ValueError:
        return client.encode("ascii", "replace")
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped).encode("ascii")
    if ipv6Prefix >= 128:
        return str(address).encode("ascii")
    network = ipaddress.IPv6Network((int(address) >> (128 - ipv6Prefix) << (128 - ipv6Prefix), ipv6Prefix))
    return str(network).encode("ascii")


class TimedRequest(Protocol):
    """What a L{RequestClock} watches: a request, its body and its end."""

    def bodyProgress(self) -> tuple[int, int, bool] | None:
        """
        The body bytes received so far, how many times the proxy held the body back or let it go again
        (paused or resumed its client), and whether it holds it back now (or has not sent the ``100 Continue``
        the client waits for); C{None} once no more body is expected.
        """

    def bodyTooSlow(self, received: int, seconds: float) -> None:
        """Only C{received} bytes of the body arrived in the last C{seconds}: refuse it."""

    def tookTooLong(self, seconds: float) -> None:
        """The request and its response took longer than C{seconds}: answer or cut it."""


class RequestClock:
    """
    The deadlines of one request, on one re-aimed L{deadline.Deadline}: the end of its total time, and the
    next measure of its body's rate.  The rate is measured over windows of the limits' C{bodyRateWindow}
    seconds, the first starting C{bodyRateGrace} seconds after the head; a window in which the proxy held
    the body back (its upstream was slow, or a ``100 Continue`` was not sent) does not count.
    """

    _rateFrom = 0  # the body bytes received when the current window began
    _heldFrom = 0  # how many times the body was held back, then

    def __init__(self, reactor: IReactorTime, limits: ClientLimits, request: TimedRequest, hasBody: bool) -> None:
        self._reactor = reactor
        self._limits = limits
        self._request = request
        now = reactor.seconds()
        self._end = now + limits.requestTimeout if limits.requestTimeout else math.inf
        self._measure = now + limits.bodyRateGrace if hasBody and limits.minBodyRate else math.inf
        self._windowStarted = False
        self._deadline = deadline.Deadline(reactor, self._passed)
        self._aim(now)

    @classmethod
    def of(
        cls, reactor: IReactorTime, limits: ClientLimits, request: TimedRequest, hasBody: bool
    ) -> RequestClock | None:
        """The clock of C{request}, or C{None} when no limit of C{limits} needs one (no timer is made then)."""
        if limits.requestTimeout or (hasBody and limits.minBodyRate):
            return cls(reactor, limits, request, hasBody)
        return None

    def stop(self) -> None:
        """The request is over (or became a tunnel): nothing more is measured."""
        self._end = self._measure = math.inf
        self._deadline.stop()

    def _aim(self, now: float) -> None:
        at = min(self._end, self._measure)
        if at == math.inf:
            self._deadline.stop()
        else:
            self._deadline.arm(deadline.REQUEST, max(0.0, at - now))

    def _passed(self, mode: int) -> None:
        now = self._reactor.seconds()
        if now >= self._end:
            self.stop()
            self._request.tookTooLong(self._limits.requestTimeout)
            return
        if now >= self._measure:
            self._measureBody(now)
        self._aim(now)

    def _measureBody(self, now: float) -> None:
        progress = self._request.bodyProgress()
        limits = self._limits
        if progress is None:
            self._measure = math.inf
            return
        received, held, holding = progress
        window = limits.bodyRateWindow
        if self._windowStarted and held == self._heldFrom and not holding:
            arrived = received - self._rateFrom
            if arrived < limits.minBodyRate * window:
                self.stop()
                self._request.bodyTooSlow(arrived, window)
                return
        self._windowStarted = True
        self._rateFrom, self._heldFrom = received, held
        self._measure = now + window
