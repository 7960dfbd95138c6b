"""
Persistent connections to one upstream: reuse, an idle cap and timeout, and a hard cap on concurrency.

Over HTTP/1.1 a request takes an idle connection if there is one, opens a new one while fewer than
C{maxConnections} exist, and otherwise waits in a bounded queue for a connection to come back.  Over
HTTP/2 a request takes a stream on an open connection with a free stream slot, waits for a connection
being opened, or opens one; C{maxConnections} still counts connections, and a request finding every
stream of every connection busy waits in the same queue for a slot.  A full queue or a wait longer than
C{queueTimeout} answers 503 at once instead of piling requests up.

Over TLS, the protocol is the one the server chooses by ALPN among those offered, so a pool learns it
from its connections.
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.errors import ProxyError, proxyError, upstreamError
from rproxy.upstream.connection import UpstreamConnection
from rproxy.upstream.http1 import HTTP11Connection
from rproxy.upstream.http2 import HTTP2Connection
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.tls import describeFailure

#: The protocols a pool speaks: HTTP/1.1, HTTP/2, or the one ALPN selects (TLS only).
HTTP1 = "http/1.1"
HTTP2 = "h2"
NEGOTIATED = "alpn"

#: Streams a connection being opened is expected to carry, until a server says how many it takes.
_STREAMS_EXPECTED = 100


class Opening(TypingProtocol):
    """
    What a pool asks of a connection it opened, whatever its protocol: when it can be used.  An
    HTTP/1.1 connection can at once; an HTTP/2 one once the server's SETTINGS came; a TLS connection
    once its handshake chose one of those by ALPN.

    The connection it gives says whether it C{multiplexes}: an HTTP/2 connection carries many exchanges
    at once, and the pool hands out its streams; an HTTP/1.1 one carries one at a time, and the pool hands
    out the connection itself, keeping it idle between exchanges.
    """

    def whenReady(self) -> Deferred[HTTP11Connection | HTTP2Connection]:
        """Fires with the connection once it can be used."""


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool, protocol: str, tls: bool) -> None:
        self.pool = pool
        self.upstreamProtocol = protocol
        self.tls = tls

    def buildProtocol(self, addr: object) -> Protocol:
        pool = self.pool
        if self.tls:
            return _Negotiating(pool, self.upstreamProtocol)
        if self.upstreamProtocol == HTTP2:
            return HTTP2Connection(pool, pool.reactor)
        return HTTP11Connection(pool, pool.reactor)


@implementer(IHandshakeListener)
class _Negotiating(Protocol):
    """
    A TLS connection until its handshake is done: then the protocol ALPN selected takes it over.

    With C{required} set to HTTP/2, a server that does not select it is refused.
    """

    transport: Any
    _chosen: Protocol | None = None
    _timer: IDelayedCall | None = None

    def __init__(self, pool: UpstreamPool, required: str) -> None:
        self._pool = pool
        self._required = required
        self._ready: Deferred[Protocol] | None = Deferred()

    def whenReady(self) -> Deferred[Protocol]:
        """Fires with the connection once the handshake (and, for HTTP/2, its SETTINGS) are done."""
        assert self._ready is not None
        return self._ready

    def connectionMade(self) -> None:
        timeout = self._pool.settings.connectTimeout
        self._timer = self._pool.reactor.callLater(timeout, self._timedOut, timeout)

    def _timedOut(self, timeout: float) -> None:
        self._timer = None
        self._fail(
            upstreamError(
                504,
                f"upstream {self._pool.label} did not complete the TLS handshake within {timeout:g}s",
                "tls_protocol_error",
            )
        )
        self.transport.abortConnection()

    def _fail(self, error: ProxyError | Failure) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.errback(error)

    def handshakeCompleted(self) -> None:
        if self.transport.disconnecting:
            # Twisted before 26 checks the certificate's name once the handshake is done, and reports a
            # mismatch by aborting the connection just before this: connectionLost gives the reason.
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pool = self._pool
        ready, self._ready = self._ready, None
        if ready is None:
            return
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            multiplexed = HTTP2Connection(pool, pool.reactor)
            self._chosen = multiplexed
            multiplexed.makeConnection(self.transport)
            multiplexed.whenReady().chainDeferred(ready)  # type: ignore[arg-type]
        elif self._required == HTTP2:
            ready.errback(
                upstreamError(
                    502,
                    f"upstream {pool.label} did not agree to HTTP/2 by ALPN (it chose {negotiated!r})",
                    "tls_protocol_error",
                )
            )
            self.transport.abortConnection()
        else:
            connection = HTTP11Connection(pool, pool.reactor)
            self._chosen = connection
            connection.makeConnection(self.transport)
            ready.callback(connection)

    def dataReceived(self, data: bytes) -> None:
        if self._chosen is not None:
            self._chosen.dataReceived(data)

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._chosen is not None:
            self._chosen.connectionLost(reason)
        else:
            self._fail(reason)


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
        protocol: str = HTTP1,
        tls: bool = False,
    ) -> None:
        """
        @param protocol: L{HTTP1}, L{HTTP2} (with prior knowledge, or required by ALPN over TLS), or
            L{NEGOTIATED} (what the TLS server selects by ALPN).
        @param tls: whether C{endpoint} is a TLS one (its connections are ready after the handshake).
        """
        self.reactor = reactor
        self.label = label
        self.settings = settings
        self._endpoint = endpoint
        self._factory = _ConnectionFactory(self, protocol, tls)
        self._idle: list[HTTP11Connection] = []
        self._multiplexed: list[HTTP2Connection] = []  # open HTTP/2 connections that take new streams
        # Whether the connections carry streams: known for h1 and h2c, learned from ALPN otherwise.
        self._multiplexing: bool | None = {HTTP1: False, HTTP2: True}.get(protocol)
        self._streamsExpected = _STREAMS_EXPECTED
        self._open = 0  # connections open or opening
        self._connecting = 0
        self._waiters: deque[Deferred[UpstreamConnection]] = deque()
        self._waitTimers: dict[Deferred[UpstreamConnection], IDelayedCall] = {}
        self._closedBecause: str | None = None  # set once the pool takes no new exchanges

    @property
    def idleCount(self) -> int:
        """Connections waiting in the pool, with no exchange."""
        return len(self._idle) + sum(1 for connection in self._multiplexed if connection.isIdle)

    @property
    def openCount(self) -> int:
        """Connections open or being opened."""
        return self._open

    def takeIdle(self) -> UpstreamConnection | None:
        """
        An idle HTTP/1.1 connection, or a stream on an HTTP/2 connection with a free slot, for one
        exchange, if there is one now (L{acquire} without a Deferred).
        """
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.isOpen:
                return connection
        for multiplexed in self._multiplexed:
            if multiplexed.capacity > 0:
                return multiplexed.newStream()
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
        if self._multiplexing is False:
            if self._open < self.settings.maxConnections:
                result: Deferred[UpstreamConnection] = Deferred()
                self._connect(result)
                return result
        elif self._open < self.settings.maxConnections or len(self._waiters) < self._promised():
            waiter = self._wait()
            self._maybeConnect()
            return waiter
        if len(self._waiters) >= self.settings.maxQueue:
            return fail(self._saturated("queue is full"))
        return self._wait()

    def release(self, connection: HTTP11Connection) -> None:
        """Take back an HTTP/1.1 connection whose exchange ended cleanly."""
        waiter = self._nextWaiter()
        if waiter is not None:
            connection.recycle()
            waiter.callback(connection)
        elif len(self._idle) < self.settings.maxIdle and self._closedBecause is None:
            connection.idle(self.settings.idleTimeout)
            self._idle.append(connection)
        else:
            connection.close()

    def streamFreed(self, connection: HTTP2Connection) -> None:
        """A stream slot of C{connection} is free: it goes to a waiting request, if any."""
        if self._waiters:
            self._serveWaiters()

    def connectionUnusable(self, connection: HTTP2Connection) -> None:
        """C{connection} takes no new streams (GOAWAY, or its stream ids are spent): open another if needed."""
        if connection in self._multiplexed:
            self._multiplexed.remove(connection)
        self._maybeConnect()

    def connectionLost(self, connection: HTTP11Connection | HTTP2Connection) -> None:
        """A connection closed: forget it, and let a waiting request open a replacement."""
        self._open -= 1
        if connection.multiplexes:
            if connection in self._multiplexed:
                self._multiplexed.remove(connection)  # type: ignore[arg-type]
        elif connection in self._idle:
            self._idle.remove(connection)
        if self._multiplexing is False:
            waiter = self._nextWaiter()
            if waiter is not None:
                self._connect(waiter)
        else:
            self._maybeConnect()

    def drain(self, why: str = "was removed from its service") -> None:
        """Take no new exchanges (saying C{why}), close idle connections; busy ones close as they finish."""
        self._closedBecause = why
        for connection in list(self._idle):
            connection.close()
        multiplexed, self._multiplexed = self._multiplexed, []
        for each in multiplexed:
            each.close()

    def _wait(self) -> Deferred[UpstreamConnection]:
        waiter: Deferred[UpstreamConnection] = Deferred(self._cancelWait)
        self._waiters.append(waiter)
        self._waitTimers[waiter] = self.reactor.callLater(self.settings.queueTimeout, self._waitTimedOut, waiter)
        return waiter

    def _promised(self) -> int:
        """Exchanges the connections being opened are expected to take."""
        return self._connecting * (1 if self._multiplexing is False else self._streamsExpected)

    def _maybeConnect(self) -> None:
        """Open connections for the waiting requests that those being opened will not take, within the limit."""
        while (
            self._closedBecause is None
            and len(self._waiters) > self._promised()
            and self._open < self.settings.maxConnections
        ):
            self._connect(None)

    def _serveWaiters(self) -> None:
        for connection in list(self._multiplexed):
            while connection.capacity > 0:
                waiter = self._nextWaiter()
                if waiter is None:
                    return
                waiter.callback(connection.newStream())

    def _connect(self, result: Deferred[UpstreamConnection] | None) -> None:
        """Open a connection for C{result}, or (C{None}) for the waiting requests."""
        self._open += 1
        self._connecting += 1
        attempt = self._endpoint.connect(self._factory)

        def connected(protocol: Opening) -> None:
            protocol.whenReady().addCallbacks(ready, failed)

        def ready(connection: HTTP11Connection | HTTP2Connection) -> None:
            self._connecting -= 1
            if connection.multiplexes:
                multiplexed = cast(HTTP2Connection, connection)
                self._multiplexing = True
                self._streamsExpected = max(1, multiplexed.capacity)
                if result is not None and not result.called:
                    result.callback(multiplexed.newStream())
                if self._closedBecause is not None:
                    multiplexed.close()
                    return
                self._multiplexed.append(multiplexed)
                self._serveWaiters()
            else:
                single = cast(HTTP11Connection, connection)
                self._multiplexing = False
                if result is not None and not result.called:
                    result.callback(single)
                else:  # the requester went away while we connected: keep it for the next one
                    self.release(single)
            self._maybeConnect()

        def failed(reason: Failure) -> None:
            self._open -= 1
            self._connecting -= 1
            error = self._connectError(reason)
            if result is not None:
                if not result.called:
                    result.errback(error)
                return
            if self._open == self._connecting:  # no open connection the waiting requests could have
                while len(self._waiters) > self._promised():
                    waiter = self._nextWaiter()
                    if waiter is None:
                        break
                    waiter.errback(error)

        attempt.addCallbacks(connected, failed)

    def _connectError(self, reason: Failure) -> ProxyError:
        label = self.label
        if isinstance(reason.value, ProxyError):
            return reason.value
        tls = describeFailure(reason)
        if tls is not None:
            detail, errorType = tls
            return upstreamError(502, f"upstream {label} {detail}", errorType)
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
