"""
Persistent connections to one upstream: reuse, an idle cap and timeout, and a hard cap on concurrency.

A request takes an idle connection if there is one, opens a new one while fewer than
C{maxConnections} exist, and otherwise waits in a bounded queue for a connection to come back.
A full queue or a wait longer than C{queueTimeout} answers 503 at once instead of piling requests up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.errors import ProxyError, proxyError, upstreamError
from rproxy.upstream.connection import UpstreamConnection
from rproxy.upstream.http1 import HTTP11Connection


@dataclass(frozen=True)
class PoolSettings:
    """
    Limits and timeouts for the connections to one upstream (seconds, counts).

    @ivar connectTimeout: how long a TCP connect may take.
    @ivar responseTimeout: how long, once the request is written, the response head may take.
    @ivar readTimeout: how long the upstream may stay silent in the middle of a response.
    @ivar maxConnections: connections open or opening at once.
    @ivar maxIdle: idle connections kept for reuse.
    @ivar idleTimeout: how long an idle connection is kept (below the upstream's keep-alive timeout).
    @ivar maxQueue: requests that may wait for a connection when all are busy.
    @ivar queueTimeout: how long a request may wait for a connection.
    """

    connectTimeout: float = 5.0
    responseTimeout: float = 60.0
    readTimeout: float = 60.0
    maxConnections: int = 512
    maxIdle: int = 64
    idleTimeout: float = 30.0
    maxQueue: int = 1024
    queueTimeout: float = 10.0


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: object) -> HTTP11Connection:
        return HTTP11Connection(self.pool, self.pool.reactor)


class UpstreamPool:
    """
    The connections to one upstream address.

    @ivar label: how errors and logs name the upstream (C{host:port}).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        label: str,
        settings: PoolSettings,
    ) -> None:
        self.reactor = reactor
        self.label = label
        self.settings = settings
        self._endpoint = endpoint
        self._factory = _ConnectionFactory(self)
        self._idle: list[HTTP11Connection] = []
        self._open = 0  # connections open or opening
        self._waiters: deque[Deferred[UpstreamConnection]] = deque()
        self._waitTimers: dict[Deferred[UpstreamConnection], IDelayedCall] = {}
        self._closedBecause: str | None = None  # set once the pool takes no new exchanges

    @property
    def idleCount(self) -> int:
        """Connections waiting in the pool."""
        return len(self._idle)

    @property
    def openCount(self) -> int:
        """Connections open or being opened."""
        return self._open

    def takeIdle(self) -> UpstreamConnection | None:
        """An idle connection for one exchange, if there is one now (L{acquire} without a Deferred)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.isOpen:
                return connection
        return None

    def acquire(self) -> Deferred[UpstreamConnection]:
        """
        A connection for one exchange; give it back with L{release} or by closing it.

        Fails with a L{ProxyError}: 502/504 when connecting fails, 503 when the pool is saturated.
        """
        connection = self.takeIdle()
        if connection is not None:
            return succeed(connection)
        if self._closedBecause is not None:
            return fail(proxyError(503, f"upstream {self.label} {self._closedBecause}", "destination_unavailable"))
        if self._open < self.settings.maxConnections:
            return self._connect()
        if len(self._waiters) >= self.settings.maxQueue:
            return fail(self._saturated("queue is full"))
        waiter: Deferred[UpstreamConnection] = Deferred(self._cancelWait)
        self._waiters.append(waiter)
        self._waitTimers[waiter] = self.reactor.callLater(self.settings.queueTimeout, self._waitTimedOut, waiter)
        return waiter

    def release(self, connection: HTTP11Connection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        waiter = self._nextWaiter()
        if waiter is not None:
            connection.recycle()
            waiter.callback(connection)
        elif len(self._idle) < self.settings.maxIdle and self._closedBecause is None:
            connection.idle(self.settings.idleTimeout)
            self._idle.append(connection)
        else:
            connection.close()

    def connectionLost(self, connection: HTTP11Connection) -> None:
        """A connection closed: forget it, and let a waiting request open a replacement."""
        self._open -= 1
        if connection in self._idle:
            self._idle.remove(connection)
        waiter = self._nextWaiter()
        if waiter is not None:
            self._connect(waiter)

    def drain(self, why: str = "was removed from its service") -> None:
        """Take no new exchanges (saying C{why}), close idle connections; busy ones close as they finish."""
        self._closedBecause = why
        for connection in list(self._idle):
            connection.close()

    def _connect(self, result: Deferred[UpstreamConnection] | None = None) -> Deferred[UpstreamConnection]:
        """Open a connection for C{result} (a new Deferred unless a waiter is given)."""
        self._open += 1
        if result is None:
            result = Deferred()
        attempt = self._endpoint.connect(self._factory)

        def connected(connection: HTTP11Connection) -> None:
            if result.called:  # the requester went away while we connected: keep it for the next one
                self.release(connection)
            else:
                result.callback(connection)

        def failed(reason: Failure) -> None:
            self._open -= 1
            if not result.called:
                result.errback(self._connectError(reason))

        attempt.addCallbacks(connected, failed)
        return result

    def _connectError(self, reason: Failure) -> ProxyError:
        label = self.label
        if reason.check(ierror.ConnectionRefusedError):
            return upstreamError(502, f"upstream {label} refused the connection", "connection_refused")
        if reason.check(ierror.DNSLookupError):
            return upstreamError(502, f"upstream host of {label} could not be resolved", "dns_error")
        if reason.check(ierror.TimeoutError, CancelledError):
            return upstreamError(
                504,
                f"upstream {label} did not accept the connection within {self.settings.connectTimeout:g}s",
                "connection_timeout",
            )
        detail = reason.getErrorMessage()
        return upstreamError(502, f"cannot connect to upstream {label}: {detail}", "destination_unavailable")

    def _saturated(self, why: str) -> ProxyError:
        return proxyError(
            503,
            f"upstream {self.label} is at its limit of {self.settings.maxConnections} connections and its wait {why}",
            "connection_limit_reached",
            retryAfter=1,
        )

    def _nextWaiter(self) -> Deferred[UpstreamConnection] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            timer = self._waitTimers.pop(waiter, None)
            if timer is not None and timer.active():
                timer.cancel()
            if not waiter.called:
                return waiter
        return None

    def _cancelWait(self, waiter: Deferred[UpstreamConnection]) -> None:
        timer = self._waitTimers.pop(waiter, None)
        if timer is not None and timer.active():
            timer.cancel()
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _waitTimedOut(self, waiter: Deferred[UpstreamConnection]) -> None:
        self._waitTimers.pop(waiter, None)
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        waiter.errback(self._saturated(f"timed out after {self.settings.queueTimeout:g}s"))
