"""
The client side: a C{Site} whose HTTP/1.1 channel answers bad input precisely, and which knows its
connections so that shutdown can drain them.

Twisted's C{HTTPChannel} answers every malformed request with a bare 400.  L{ProxyHTTPChannel}
says what was wrong and uses the right status (414 for a long request line, 431 for oversize or too
many header fields, 408 for a head that arrives too slowly), applies the strict framing rules a proxy
needs against request smuggling, and never lets a broken body look complete to the upstream.

It replaces C{HTTPChannel.headerReceived}, reads a request head that arrives whole without the
line-by-line path, and relies on private parts of C{HTTPChannel} (C{_transferDecoder},
C{_finishRequestBody}, C{_receivedHeaderSize}, C{_receivedHeaderCount}, C{__first_line},
C{_respondToBadRequestAndDisconnect}) and of C{LineReceiver} (C{_buffer}, C{_busyReceiving}), and
subclasses C{_GenericHTTPChannelProtocol};
L{rproxy.test.test_twisted_contract} fails if a Twisted release changes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import (
    HTTPChannel,
    INonQueuedRequestFactory,
    Request,
    _GenericHTTPChannelProtocol,
    _IdentityTransferDecoder,
    _parseRequestLine,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from rproxy.downstream.http2 import PREFACE, ProxyH2Connection
from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.request import ProxyRequest
from rproxy.errors import ProxyError, clientError, proxyError
from rproxy.framing import ChunkedDecoder, MalformedBodyError, contentLength
from rproxy.headers import Pairs, allowedTrailers, connectionListed, hasControl, isToken

_log = Logger()


class ProxyHTTPChannel(HTTPChannel):
    """An HTTP/1.1 server channel with strict framing and precise errors."""

    site: ProxySite
    transport: Any
    # One timer per connection, re-aimed with reset() for each request head (cheaper than a new
    # DelayedCall per request); it only counts while _awaitingHead.
    _headerTimer: IDelayedCall | None = None
    _awaitingHead = False
    # The idle timeout's timer.  HTTPChannel turns the timeout off while it handles each request and on
    # again after it; TimeoutMixin would cancel its timer and schedule a new one every time.  Here the
    # timer stays scheduled while a request turns it off (it lapses unused if the request takes long),
    # and is re-aimed when the timeout comes back on.
    _idleTimer: IDelayedCall | None = None
    _handingOver = False  # in allContentReceived: the request is being handed over
    _lengths: tuple[bytes, ...] = ()  # the values of the request's Content-Length fields
    _host: Any = None
    _peer: Any = None
    _secure: bool | None = None

    def getHost(self) -> Any:
        """The local address, asked of the socket once (Twisted asks it for every request)."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        """The client's address, built once (Twisted builds a new one for every request)."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def isSecure(self) -> bool:
        """Whether the connection is TLS, asked of the transport once (Twisted adapts it every time)."""
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """Write a response head as one piece (Twisted hands the transport two pieces per field)."""
        lines = [version + b" " + code + b" " + reason]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value)
        lines.append(b"\r\n")
        self.transport.write(b"\r\n".join(lines))

    def dataReceived(self, data: bytes) -> None:
        """
        Take a request head that arrived whole in one go (the usual case) without Twisted's line-by-line
        path; anything else (a partial or folded head, one over a limit, a bad request line) takes it.
        """
        if not (
            self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and self._HTTPChannel__first_line == 1
            and self.persistent
        ):
            self._slowPath(data)
            return
        end = data.find(b"\r\n\r\n")
        if end <= 0:
            self._slowPath(data)
            return
        head = data[:end]
        lines = head.split(b"\r\n")
        limits = self.site.limits
        size = end - 2 * (len(lines) - 1)  # what Twisted counts: the lines without their CRLF
        if (
            size > limits.maxHeaderBytes
            or len(lines[0]) > limits.maxRequestLine
            or b"\r\n " in head
            or b"\r\n\t" in head
        ):
            self._slowPath(data)
            return
        try:
            command, path, version = _parseRequestLine(lines[0])
        except ValueError:
            self._slowPath(data)
            return
        self.resetTimeout()
        self._busyReceiving = True  # what arrives meanwhile (a response ending at once) waits, as in Twisted
        try:
            self._wholeHead(size, command, path, version, lines)
        finally:
            self._busyReceiving = False
        rest, self._buffer = data[end + 4 :] + self._buffer, b""
        if rest:
            if self.transport.disconnecting:
                self._buffer = rest
            else:
                LineReceiver.dataReceived(self, rest)

    def _slowPath(self, data: bytes) -> None:
        """Twisted's line-by-line path; a request head that begins here must end within the header timeout."""
        if data and self.line_mode:
            self.headStarted()
        super().dataReceived(data)

    def headStarted(self) -> None:
        """
        The first bytes of a request head arrived: the whole head, request line included, must follow
        within the header timeout (408), however slowly its bytes trickle in.
        """
        if self._awaitingHead:
            return
        self._awaitingHead = True
        timeout = self.site.limits.headerTimeout
        timer = self._headerTimer
        if timer is not None and timer.active():
            timer.reset(timeout)
        else:
            self._headerTimer = self.callLater(timeout, self._headerTimedOut)

    def _wholeHead(self, size: int, command: bytes, path: bytes, version: bytes, lines: list[bytes]) -> None:
        """What HTTPChannel.lineReceived does for each line of a head, for all of them at once."""
        self._lengths = ()
        self._receivedHeaderSize = size
        factory = self.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            self.requests.append(factory(self))
        else:
            self.requests.append(factory(self, len(self.requests)))
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = command, path, version
        for line in lines[1:]:
            if not self.headerReceived(line):
                return
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()

    def lineReceived(self, line: bytes) -> None:
        limits = self.site.limits
        if self._receivedHeaderSize == 0 and line:  # a request line
            if len(line) > limits.maxRequestLine:
                self._reject(clientError(414, f"the request line exceeds {limits.maxRequestLine} bytes"))
                return
            try:
                _parseRequestLine(line)
            except ValueError as e:
                self._reject(clientError(400, f"malformed request line ({e})"))
                return
            self._lengths = ()
            self.headStarted()
        elif self._receivedHeaderSize + len(line) > limits.maxHeaderBytes:
            self._reject(clientError(431, f"the request header section exceeds {limits.maxHeaderBytes} bytes"))
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._receivedHeaderSize == 0:
            self._reject(clientError(414, f"the request line exceeds {self.site.limits.maxRequestLine} bytes"))
        else:
            self._reject(clientError(431, f"a request header line exceeds {self.MAX_LENGTH} bytes"))

    def headerReceived(self, line: bytes) -> bool:
        """Validate and store one field (replacing Twisted's, which this must not call twice)."""
        if self._receivedHeaderCount >= self.site.limits.maxHeaders:
            self._reject(clientError(431, f"the request has more than {self.site.limits.maxHeaders} header fields"))
            return False
        name, sep, value = line.partition(b":")
        if not sep:
            self._reject(clientError(400, "a request header line has no colon"))
            return False
        if not isToken(name):
            self._reject(clientError(400, f"invalid request header name {name[:64]!r}"))
            return False
        value = value.strip(b" \t")
        if hasControl(value):
            self._reject(clientError(400, f"invalid character in request header {name.decode()!r}"))
            return False
        lowered = name.lower()
        if (lowered == b"content-length" or lowered == b"transfer-encoding") and not self._chooseFraming(
            lowered, value
        ):
            return False
        self.requests[-1].requestHeaders.addRawHeader(name, value)
        self._receivedHeaderCount += 1
        return True

    def _chooseFraming(self, header: bytes, data: bytes) -> bool:
        """Pick the body framing, refusing anything two parsers could read differently (RFC 9112 6.3)."""
        if header == b"content-length":
            self._lengths += (data,)
            try:
                length = contentLength(self._lengths)
            except MalformedBodyError as e:
                return self._framingError(str(e))
            if isinstance(self._transferDecoder, _ChunkedRequestBody):
                return self._framingError("both Content-Length and Transfer-Encoding")
            self.length = length
            self._transferDecoder = _IdentityTransferDecoder(
                self.length, self.requests[-1].handleContentChunk, self._finishRequestBody
            )
            return True
        if self._lengths:
            return self._framingError("both Content-Length and Transfer-Encoding")
        if self._transferDecoder is not None or data.strip().lower() != b"chunked":
            return self._framingError(f"unsupported Transfer-Encoding {data[:64].decode('latin-1')!r} (only chunked)")
        if self._version != b"HTTP/1.1":
            return self._framingError("Transfer-Encoding in an HTTP/1.0 request")
        self.length = None
        self._transferDecoder = _ChunkedRequestBody(self, self.requests[-1])
        return True

    def _finishChunkedBody(self, trailers: Pairs, rest: bytes) -> None:
        """The last chunk is in: give the request its trailers (those a trailer may carry)."""
        if self.requests:  # else answered (and removed) before its body ended
            request: ProxyRequest = self.requests[-1]
            request.requestTrailers = allowedTrailers(trailers)
        self._finishRequestBody(rest)

    def _framingError(self, reason: str) -> bool:
        self._reject(clientError(400, reason))
        self.length = None
        return False

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        """Keep-alive unless HTTP/1.0 or ``close`` is among all the Connection tokens (Twisted reads one)."""
        if version == b"HTTP/1.1" and b"close" not in connectionListed(
            request.requestHeaders.getRawHeaders(b"connection")
        ):
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def allHeadersReceived(self) -> None:
        """
        Twisted's, except that ``Expect: 100-continue`` is answered here only if the request says so
        (L{ProxyRequest.continueAutomatically}): a proxied one waits for the upstream's 100.
        """
        self._awaitingHead = False
        request: ProxyRequest = self.requests[-1]
        request.parseCookies()
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        if self._version == b"HTTP/1.1" and request.continueAutomatically():
            self._send100Continue()

    def allContentReceived(self) -> None:
        if self.requests:  # else the body belonged to a request answered (and closed) early
            self._handingOver = True
            try:
                super().allContentReceived()
            finally:
                self._handingOver = False

    def setTimeout(self, period: int | None) -> int | None:
        """TimeoutMixin's, except that turning the timeout off for a request keeps the timer."""
        previous, self.timeOut = self.timeOut, period
        timer = self._idleTimer
        if period is None:
            if timer is not None and not self._handingOver:
                self._idleTimer = None
                timer.cancel()
        elif timer is not None:
            timer.reset(period)
        else:
            self._idleTimer = self.callLater(period, self._idleTimedOut)
        return previous

    def resetTimeout(self) -> None:
        timer = self._idleTimer
        if timer is not None and self.timeOut is not None:
            timer.reset(self.timeOut)

    def _idleTimedOut(self) -> None:
        self._idleTimer = None
        if self.timeOut is not None:  # else a request turned the timeout off: it lapses unused
            self.timeoutConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's own checks end up here."""
        self._reject(clientError(400, "malformed request"))

    def _headerTimedOut(self) -> None:
        self._headerTimer = None
        if not self._awaitingHead:
            return  # the head arrived; the timer lapsed unused
        self._reject(clientError(408, f"the request head did not arrive within {self.site.limits.headerTimeout:g}s"))

    def cancelHeaderTimer(self) -> None:
        """The head is in, or the connection is gone (or no longer HTTP/1.1): no deadline is left."""
        if self._headerTimer is not None:
            if self._headerTimer.active():
                self._headerTimer.cancel()
            self._headerTimer = None

    def _reject(self, error: ProxyError) -> None:
        """Answer a malformed request with C{error} and close the connection."""
        self.cancelHeaderTimer()
        request = self.requests[-1] if self.requests else None
        if isinstance(request, ProxyRequest) and request.headReceived:
            request.refuseBody(error)  # the head was accepted: fail its streaming body
        else:
            _log.warn(
                "client {client} -> {status} ({fault} fault, {errorType}): {reason}",
                client=self.transport.getPeer(),
                status=error.status,
                fault=error.fault.value,
                errorType=error.errorType,
                reason=error.reason,
            )
            self.transport.write(error.responseBytes())
        self.persistent = False
        self.loseConnection()

    def drain(self) -> None:
        """Shutdown: close after the response in flight (now if there is none), keeping no connection alive."""
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if not self.requests:
            self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.cancelHeaderTimer()
        super().connectionLost(reason)


class _ChunkedRequestBody:
    """The transfer decoder of a chunked request body: L{ChunkedDecoder}, a malformed body refused with 400."""

    def __init__(self, channel: ProxyHTTPChannel, request: ProxyRequest) -> None:
        self._channel = channel
        self._decoder = ChunkedDecoder(request.handleContentChunk, channel._finishChunkedBody)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._decoder.feed(data)
        except MalformedBodyError as e:
            self._channel._reject(clientError(400, f"malformed chunked request body: {e}"))


class _ProxyChannelProtocol(_GenericHTTPChannelProtocol):
    """
    Registers each connection with its site, so shutdown can find and drain it, and chooses its
    protocol: HTTP/2 after ALPN ``h2`` (as Twisted does) or, on a connection without ALPN, when the
    client opens with the HTTP/2 preface (h2c with prior knowledge); HTTP/1.1 otherwise.
    """

    _site: ProxySite
    _negotiatedProtocol: bytes | None = None  # type: ignore[assignment]
    _sniffed = b""  # the start of what might be the HTTP/2 preface, until there is enough to decide

    @property
    def transport(self) -> Any:
        """The connection's transport (the wrapper forwards only IProtocol's attributes)."""
        return self._channel.transport

    def makeConnection(self, transport: Any) -> None:
        # Not connectionMade: the wrapper forwards makeConnection straight to its channel.
        self._site.connections.add(self)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """Twisted's protocol switch, which also recognises the HTTP/2 preface (however it is split)."""
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated is None:
                data = self._sniffed + data
                if len(data) < len(PREFACE) and PREFACE.startswith(data):
                    self._sniffed = data
                    cast(ProxyHTTPChannel, self._channel).headStarted()  # it may be an HTTP/1.1 head
                    return
                self._sniffed = b""
                negotiated = b"h2" if data.startswith(PREFACE) else b"http/1.1"
            if negotiated == b"h2":
                self._switchToHTTP2()
            self._negotiatedProtocol = negotiated
        self._channel.dataReceived(data)

    def _switchToHTTP2(self) -> None:
        """Replace the HTTP/1.1 channel with a L{ProxyH2Connection} on the same transport."""
        old: Any = self._channel
        networkProducer = old._networkProducer
        networkProducer.unregisterProducer()
        old.setTimeout(None)
        old.cancelHeaderTimer()
        channel = ProxyH2Connection(self._site.limits, self._site.reactor)
        channel.requestFactory = self._requestFactory
        channel.site = self._site
        channel.factory = self._factory
        channel.timeOut = self._timeOut
        channel.callLater = self._callLater  # type: ignore[method-assign,assignment]
        self._channel = channel
        channel.makeConnection(old.transport)
        networkProducer.registerProducer(channel, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._site.connections.discard(self)
        super().connectionLost(reason)

    def drain(self) -> None:
        """Close once idle: now if no request is in flight, else after the current responses."""
        channel: ProxyHTTPChannel | ProxyH2Connection = self._channel  # type: ignore[assignment]
        channel.drain()


class _Refuse(Protocol):
    """Answers a connection over the limit with 503 and closes it."""

    transport: Any

    def __init__(self, error: ProxyError) -> None:
        self.error = error

    def connectionMade(self) -> None:
        self.transport.write(self.error.responseBytes())
        self.transport.loseConnection()


class ProxySite(server.Site):
    """
    The HTTP site of a proxy listener group: streaming requests, client limits, connection tracking.

    @ivar connections: the open client connections.
    """

    def __init__(
        self,
        resource: IResource,
        limits: ClientLimits = ClientLimits(),
        reactor: IReactorTime | None = None,
        accessLog: str | None = None,
    ) -> None:
        super().__init__(resource, requestFactory=ProxyRequest, timeout=limits.idleTimeout, reactor=reactor)
        self.limits = limits
        self.connections: set[_ProxyChannelProtocol] = set()
        # None: no access log; "-": the Twisted log; otherwise a file path.
        self.logPath = None if accessLog in (None, "-") else os.path.abspath(accessLog)
        self._accessLog = accessLog is not None

    def protocol(self) -> _ProxyChannelProtocol:  # type: ignore[override]
        channel = ProxyHTTPChannel()
        channel.MAX_LENGTH = max(self.limits.maxRequestLine, self.limits.maxHeaderBytes)
        channel.maxHeaders = self.limits.maxHeaders
        channel.totalHeadersSize = self.limits.maxHeaderBytes
        return _ProxyChannelProtocol(channel)

    def buildProtocol(self, addr: object) -> Protocol | None:  # type: ignore[override]
        if len(self.connections) >= self.limits.maxConnections:
            _log.warn("refusing {addr}: {count} client connections open", addr=addr, count=len(self.connections))
            return _Refuse(
                proxyError(
                    503,
                    f"the proxy is at its limit of {self.limits.maxConnections} connections",
                    "connection_limit_reached",
                )
            )
        protocol = super().buildProtocol(addr)
        protocol._site = self
        return protocol

    def startFactory(self) -> None:
        if self._accessLog:
            super().startFactory()

    def log(self, request: Request) -> None:
        if self._accessLog:
            super().log(request)

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
    connections within C{grace} seconds and closes the upstreams' idle connections.
    """

    def __init__(self, sites: list[ProxySite], grace: float, reactor: IReactorTime, onStop: Callable[[], None]) -> None:
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
