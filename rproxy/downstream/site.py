"""
The client side's site: a twisted.web C{Site} whose connections speak rproxy's own HTTP/1.1 and HTTP/2
protocols, hand their requests to the resource tree, obey the client limits, and are known, so that
shutdown can drain them (L{DrainingService}).  A connection over the limit of connections at once, or of
connections from its client's address, is answered with 503 and closed before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import server
from twisted.web.http import Request
from twisted.web.resource import IResource

from rproxy.downstream.connection import ClientConnection
from rproxy.downstream.http1 import HTTP11Server
from rproxy.downstream.http2 import HTTP2Server
from rproxy.downstream.limits import ClientLimits, addressKey
from rproxy.downstream.overload import Overload
from rproxy.downstream.request import ProxyRequest
from rproxy.errors import ProxyError, proxyError
from rproxy.observe.record import ABORTED, ExchangeRecord, IExchangeObserver
from rproxy.observe.requestid import RequestIds

_log = Logger()


class _Refuse(Protocol):
    """Answers a connection over the limit with 503 and closes it."""

    transport: Any

    def __init__(self, site: ProxySite, error: ProxyError) -> None:
        self.site = site
        self.error = error

    def connectionMade(self) -> None:
        self.site.refused(self.transport.getPeer(), self.error)
        self.transport.write(self.error.responseBytes())
        self.transport.loseConnection()


class ProxySite(server.Site):
    """
    The HTTP site of a proxy listener group: streaming requests, client limits, connection tracking.

    @ivar limits: what a client may send and how long it may take.
    @ivar connections: the open client connections.
    @ivar overload: the proxied requests in flight, and whether one more may start.
    """

    def __init__(
        self,
        resource: IResource,
        limits: ClientLimits = ClientLimits(),
        reactor: IReactorTime | None = None,
    ) -> None:
        super().__init__(resource, requestFactory=ProxyRequest, timeout=limits.idleTimeout, reactor=reactor)
        self.limits = limits
        self.connections: set[ClientConnection] = set()
        #: The open client connections by client address key (L{addressKey}), when that is limited.
        self.perClient: dict[bytes, int] = {}
        self.overload = Overload(self.reactor, limits.maxInFlight, limits.maxMemory)
        #: What sees each request's record when it ends (the access log, the metrics).
        self.observers: list[IExchangeObserver] = []
        #: Where each request's id comes from.
        self.requestIds = RequestIds()

    def buildProtocol(self, addr: object) -> Protocol | None:  # type: ignore[override]
        limits = self.limits
        if len(self.connections) >= limits.maxConnections:
            _log.warn("refusing {addr}: {count} client connections open", addr=addr, count=len(self.connections))
            return _Refuse(
                self,
                proxyError(
                    503, f"the proxy is at its limit of {limits.maxConnections} connections", "connection_limit_reached"
                ),
            )
        host = getattr(addr, "host", None)
        key = addressKey(host) if host is not None and limits.maxClientConnections else None
        if key is not None and self.perClient.get(key, 0) >= limits.maxClientConnections:
            _log.warn(
                "refusing {addr}: {count} connections open from {client}",
                addr=addr,
                count=self.perClient[key],
                client=key.decode("ascii", "replace"),
            )
            return _Refuse(
                self,
                proxyError(
                    503,
                    f"the client is at its limit of {limits.maxClientConnections} connections",
                    "connection_limit_reached",
                ),
            )
        return ClientConnection(self, key)

    def opened(self, connection: ClientConnection) -> None:
        """C{connection} is open: it counts against the limits of connections."""
        self.connections.add(connection)
        key = connection.clientKey
        if key is not None:
            self.perClient[key] = self.perClient.get(key, 0) + 1

    def closed(self, connection: ClientConnection) -> None:
        """C{connection} is closed."""
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        key = connection.clientKey
        if key is not None:
            left = self.perClient[key] - 1
            if left:
                self.perClient[key] = left
            else:
                del self.perClient[key]

    def http1(self, connection: ClientConnection) -> HTTP11Server:
        """The HTTP/1.1 protocol of C{connection}."""
        return HTTP11Server(connection)

    def http2(self, connection: ClientConnection) -> HTTP2Server:
        """The HTTP/2 protocol of C{connection} (after ALPN h2, or the h2c preface)."""
        return HTTP2Server(connection)

    def startFactory(self) -> None:
        """Nothing to open: the access log is an observer (L{rproxy.observe.accesslog}), not twisted.web's."""

    def log(self, request: Request) -> None:
        """twisted.web's call as a response is finished: the request's record ends (a local resource's too)."""
        self.exchangeEnded(request)

    def exchangeEnded(self, request: Request) -> None:
        """Complete C{request}'s record (status, bytes, duration) and hand it to the observers."""
        ended = getattr(request, "ended", None)  # a ProxyRequest's (a plain twisted.web request has none)
        if ended is not None:
            ended()
        record = getattr(request, "record", None)
        if record is None or not self.observers:
            return
        record.duration = self.reactor.seconds() - record.started
        if request.startedWriting:
            record.status = request.code
        record.bytesOut = request.sentLength + record.splicedOut
        record.bytesIn = getattr(request, "bodyBytes", 0) + record.splicedIn
        for observer in self.observers:
            observer.exchangeEnded(record)

    def refused(
        self, peer: IAddress, error: ProxyError, method: bytes = b"-", target: bytes = b"-", answered: bool = True
    ) -> None:
        """
        A request refused before it became a request (a malformed or slow head, a connection over the
        limit), or a connection cut for a limit (C{answered} false: no response could be sent, as when an
        HTTP/2 client that does not read gets GOAWAY): a record of its own, with what is known, for the observers.
        """
        if not self.observers:
            return
        record = ExchangeRecord(self.reactor.seconds(), method, target, None, b"-", getattr(peer, "host", None))
        record.status, record.fault, record.errorType, record.reason = (
            error.status if answered else None,
            error.fault.value,
            error.errorType,
            error.reason,
        )
        if not answered:
            record.outcome = ABORTED
        for observer in self.observers:
            observer.exchangeEnded(record)

    def drain(self, grace: float, reactor: IReactorTime) -> defer.Deferred[None]:
        """
        Let every connection finish its exchange in flight, then close; reset what is left after
        C{grace} seconds.
        """
        for connection in list(self.connections):
            connection.drain()
        return _waitUntil(lambda: not self.connections, grace, reactor, self._abortAll)

    def _abortAll(self) -> None:
        if self.connections:
            _log.warn("grace period over: resetting {count} connections", count=len(self.connections))
        for connection in list(self.connections):
            connection.transport.abortConnection()


def _waitUntil(
    done: Callable[[], bool], timeout: float, reactor: IReactorTime, onTimeout: Callable[[], None]
) -> defer.Deferred[None]:
    """Poll C{done} every 50 ms; after C{timeout} seconds call C{onTimeout} and stop waiting."""
    deadline = reactor.seconds() + timeout
    result: defer.Deferred[None] = defer.Deferred()

    def check() -> None:
        if done():
            poll.stop()
        elif reactor.seconds() >= deadline:
            onTimeout()
            poll.stop()

    poll = task.LoopingCall(check)
    poll.clock = reactor
    # One more turn after the last check, so that aborts run (a reset, not a clean-looking close).
    poll.start(0.05, now=True).addCallback(lambda _: task.deferLater(reactor, 0.05, lambda: None)).addCallback(
        lambda _: result.callback(None)
    )
    return result


class DrainingService(service.Service):
    """
    Stops a proxy gracefully: the listeners stop first (siblings), then this drains the sites'
    connections within C{grace} seconds and calls C{onStop} (which closes the upstreams' idle connections and
    the filters' resources; the stop waits for a Deferred it returns).
    """

    def __init__(
        self,
        sites: list[ProxySite],
        grace: float,
        reactor: IReactorTime,
        onStop: Callable[[], defer.Deferred[None] | None],
    ) -> None:
        self.sites = sites
        self.grace = grace
        self.reactor = reactor
        self.onStop = onStop

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        _log.info(
            "draining {count} connections (grace {grace:g}s)",
            count=sum(len(s.connections) for s in self.sites),
            grace=self.grace,
        )
        drained = defer.gatherResults([site.drain(self.grace, self.reactor) for site in self.sites])
        return drained.addCallback(lambda _: self.onStop())
