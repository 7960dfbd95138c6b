"""
The HTTP/2 client side of exchanges: one connection to an upstream carrying many streams, on the C{h2}
library.

An L{HTTP2Connection} is the protocol of one TCP (or TLS) connection.  The pool asks it for
L{HTTP2Stream}s, each the L{rproxy.upstream.connection.UpstreamConnection} of one exchange, up to the
server's C{SETTINGS_MAX_CONCURRENT_STREAMS}.

Flow control follows the client on both sides.  The request body is sent as the stream's and the
connection's send windows allow, its pipe paused while they are exhausted.  Response bytes are
acknowledged (and so the server allowed to send more) only as they are handed to the client; a paused
stream keeps what already arrived, at most its receive window, and acknowledges it on resume.  The
connection's receive window is the largest HTTP/2 allows, so that paused streams, each bounded by its own
window, never stall the others: one slow client slows its own stream only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from zope.interface import implementer

from rproxy import deadline
from rproxy.errors import ProxyError, clientError, upstreamError
from rproxy.framing import MalformedBodyError, contentLength
from rproxy.headers import Pairs
from rproxy.hpackcoding import FieldDecoder, FieldEncoder
from rproxy.upstream.connection import Delivery, RequestHead, ResponseReceiver
from rproxy.upstream.settings import timeoutError

if TYPE_CHECKING:
    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.upstream.pool import UpstreamPool

#: The receive window of each stream: what a paused stream may hold, unacknowledged, at most.
STREAM_WINDOW = 1 << 20
#: The connection's receive window: the largest there is, so that paused streams never stall the others.
CONNECTION_WINDOW = (1 << 31) - 1
#: The window every connection starts with (RFC 9113 6.9.2).
_INITIAL_WINDOW = 65535
#: Stream ids are never reused: a connection this close to the last one takes no new streams.
_LAST_STREAM_ID = (1 << 31) - 1 - 2 * 1024
#: Fields HTTP/2 forbids or frames itself (RFC 9113 8.2.2): never copied from a request head.
_NOT_FORWARDED = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host", b"te"}
)

# What a stream's one timer currently stands for.


def _codeName(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code:#x}"


class _Connection(H2Connection):
    """
    h2's client connection, remembering how the last 1024 closed streams ended rather than 65536: one
    upstream connection carries every request to its upstream, and h2's default held about 8 MiB for each
    (as on the client side, L{rproxy.downstream.http2}).
    """

    MAX_CLOSED_STREAMS = 1024


@implementer(IPushProducer)
class HTTP2Connection(TwistedProtocol):
    """
    One HTTP/2 connection to an upstream, multiplexing the streams of many exchanges.

    It is the IPushProducer its transport pauses when the socket's buffer fills: it then pauses every
    stream's request body.

    @ivar used: streams started on it so far.
    """

    transport: Any
    multiplexes = True  # many exchanges at once, as streams (see rproxy.upstream.pool.Pooled)
    _readyTimer: IDelayedCall | None = None
    _pingTimer: IDelayedCall | None = None
    _pingDeadline: IDelayedCall | None = None
    _log = Logger()

    def __init__(self, pool: UpstreamPool, reactor: IReactorTime) -> None:
        self._pool = pool
        self._reactor = reactor
        self._h2 = _Connection(
            config=H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        )
        self._h2.encoder, self._h2.decoder = FieldEncoder(), FieldDecoder()  # h2's public attributes, as downstream
        self._h2.local_settings = Settings(
            client=True,
            initial_values={SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW},
        )
        self._streams: dict[int, HTTP2Stream] = {}
        self._reserved = 0
        self.used = 0
        self._ready: Deferred[HTTP2Connection] | None = Deferred()
        self._closed = False
        self._goingAway = False
        self._closeWhenIdle = False
        self.transportPaused = False
        self._heard = False  # frames arrived since the last keepalive tick
        self._idle = deadline.Deadline(reactor, lambda mode: self.close())  # re-aimed as streams come and go

    # -- the pool's side

    def whenReady(self) -> Deferred[HTTP2Connection]:
        """Fires once the server's SETTINGS arrived (so its stream limit is known), or fails."""
        assert self._ready is not None
        return self._ready

    @property
    def capacity(self) -> int:
        """How many more streams it may carry now."""
        if self._closed or self._goingAway or self._ready is not None:
            return 0
        limit = self._h2.remote_settings.max_concurrent_streams
        return limit - len(self._streams) - self._reserved

    @property
    def isIdle(self) -> bool:
        """Whether no exchange uses it."""
        return not self._streams and not self._reserved

    def newStream(self) -> HTTP2Stream:
        """Reserve a stream for one exchange (only while L{capacity} is positive)."""
        self._reserved += 1
        self._cancelIdle()
        return HTTP2Stream(self, self.used > 0)

    def close(self) -> None:
        """Close now if no exchange uses it, else once the last one ends; it takes no new streams."""
        self._goingAway = True
        self._closeWhenIdle = True
        if self.isIdle:
            self._closeGracefully()

    def _closeGracefully(self) -> None:
        if self._closed:
            return
        self._h2.close_connection()
        self.flush()
        self.transport.unregisterProducer()  # a TLS transport waits for its producer to go before closing
        self.transport.loseConnection()

    # -- the streams' side

    @property
    def h2(self) -> H2Connection:
        """The h2 state machine (for this module's streams)."""
        return self._h2

    @property
    def label(self) -> str:
        """The upstream's name in errors."""
        return self._pool.label

    @property
    def settings(self) -> Any:
        """The pool's settings (timeouts)."""
        return self._pool.settings

    @property
    def reactor(self) -> IReactorTime:
        """The reactor, for the streams' timers."""
        return self._reactor

    @property
    def usable(self) -> bool:
        """Whether a reserved stream may still start here."""
        return not self._closed and not self._goingAway

    def startStream(self, stream: HTTP2Stream) -> int:
        """Give a reserved stream its id."""
        streamId: int = self._h2.get_next_available_stream_id()
        self._reserved -= 1
        self._streams[streamId] = stream
        self.used += 1
        if streamId >= _LAST_STREAM_ID:
            self._goAway()
        return streamId

    def streamDone(self, stream: HTTP2Stream) -> None:
        """A stream ended or was given back: free its slot."""
        if stream.streamId:
            self._streams.pop(stream.streamId, None)
        else:
            self._reserved -= 1
        if self._closed:
            return
        if self.isIdle and self._closeWhenIdle:
            self._closeGracefully()
            return
        if not self._goingAway:
            self._pool.streamFreed(self)
        if self.isIdle and not self._closed:
            self._becameIdle()

    def flush(self) -> None:
        """Write what h2 has queued."""
        data = self._h2.data_to_send()
        if data and not self._closed:
            self.transport.write(data)

    # -- Protocol

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _INITIAL_WINDOW)
        self.flush()
        timeout = self._pool.settings.connectTimeout
        self._readyTimer = self._reactor.callLater(timeout, self._notReady, timeout)

    def _notReady(self, timeout: float) -> None:
        self._readyTimer = None
        self._failReady(
            upstreamError(
                504, f"upstream {self.label} sent no HTTP/2 SETTINGS within {timeout:g}s", "connection_timeout"
            )
        )
        self.transport.abortConnection()

    def _failReady(self, error: ProxyError) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.errback(error)

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as e:
            self._protocolError(f"{type(e).__name__}: {e}")
            return
        for event in events:
            if self._closed:
                return
            self._handle(event)
        self.flush()

    def _handle(self, event: object) -> None:
        streamId = getattr(event, "stream_id", 0)
        if streamId:
            stream = self._streams.get(streamId)
            if stream is None:
                if isinstance(event, DataReceived):  # a stream already given up: return its window
                    self._h2.acknowledge_received_data(event.flow_controlled_length, streamId)
                return
            if isinstance(event, DataReceived):
                stream.dataReceived(event.data, event.flow_controlled_length)
            elif isinstance(event, ResponseReceived):
                stream.headReceived(event.headers, event.stream_ended is not None)
            elif isinstance(event, InformationalResponseReceived):
                stream.interimReceived(event.headers)
            elif isinstance(event, TrailersReceived):
                stream.trailersReceived(event.headers)
            elif isinstance(event, StreamEnded):
                stream.ended()
            elif isinstance(event, StreamReset):
                stream.reset(event.error_code)
            elif isinstance(event, WindowUpdated):
                stream.windowOpened()
        elif isinstance(event, WindowUpdated):
            for stream in list(self._streams.values()):
                stream.windowOpened()
        elif isinstance(event, RemoteSettingsChanged):
            self._settingsChanged(event)
        elif isinstance(event, PingAckReceived):
            self._pingAnswered()
        elif isinstance(event, ConnectionTerminated):
            self._goAwayReceived(event.last_stream_id, event.error_code or 0)

    def _settingsChanged(self, event: RemoteSettingsChanged) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            if self._readyTimer is not None and self._readyTimer.active():
                self._readyTimer.cancel()
            self._readyTimer = None
            self._startKeepalive()
            ready.callback(self)
            return
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in list(self._streams.values()):
                stream.windowOpened()
        if SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings and self.capacity > 0:
            self._pool.streamFreed(self)

    def _goAway(self) -> None:
        """Take no new streams here (the pool opens another connection for them)."""
        if not self._goingAway:
            self._goingAway = True
            self._pool.connectionUnusable(self)

    def _goAwayReceived(self, lastStreamId: int | None, code: int) -> None:
        self._log.info(
            "upstream {upstream} is closing an HTTP/2 connection (GOAWAY {code}, last stream {lastStreamId})",
            upstream=self.label,
            code=_codeName(code),
            lastStreamId=lastStreamId,
        )
        self._goAway()
        self._closeWhenIdle = True
        last = lastStreamId if lastStreamId is not None else 0
        for streamId, stream in sorted(self._streams.items()):
            if streamId > last:
                stream.refused("is closing the connection (GOAWAY) and never processed the request")
        if self._closed:
            return
        if self.isIdle:
            self._closeGracefully()
        else:
            # h2 closes its state machine on GOAWAY, but the streams the server did accept go on until
            # they end (RFC 9113 6.8): let them.
            self._h2.state_machine.state = ConnectionState.CLIENT_OPEN

    def _protocolError(self, detail: str) -> None:
        self.flush()  # h2's GOAWAY, if it queued one
        self.failAll(
            upstreamError(502, f"upstream {self.label} broke the HTTP/2 protocol: {detail}", "http_protocol_error")
        )
        self.transport.abortConnection()

    def failAll(self, error: ProxyError) -> None:
        """Fail every stream with C{error} (the connection is going down)."""
        self._goAway()
        for stream in list(self._streams.values()):
            stream.failed(error, Delivery.MAYBE)

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self._closed = True
        for timer in (self._readyTimer, self._pingTimer, self._pingDeadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._readyTimer = self._pingTimer = self._pingDeadline = None
        self._idle.stop()
        if self._ready is not None:
            how = "reset" if reason.check(ierror.ConnectionLost) else "closed"
            self._failReady(
                upstreamError(
                    502,
                    f"upstream {self.label} {how} the connection before its HTTP/2 SETTINGS",
                    "connection_terminated",
                )
            )
            return
        self._pool.connectionLost(self)
        how = "reset" if reason.check(ierror.ConnectionLost) else "closed"
        for stream in list(self._streams.values()):
            stream.connectionLost(how)

    # -- IPushProducer: the transport's buffer paces the request bodies

    def pauseProducing(self) -> None:
        self.transportPaused = True
        for stream in list(self._streams.values()):
            stream.pauseBody()

    def resumeProducing(self) -> None:
        self.transportPaused = False
        for stream in list(self._streams.values()):
            stream.windowOpened()

    def stopProducing(self) -> None:
        self.transport.abortConnection()

    # -- idleness and keepalive

    def _becameIdle(self) -> None:
        if self._pool.settings.maxIdle == 0:
            self.close()
            return
        self._idle.arm(deadline.IDLE, self._pool.settings.idleTimeout)

    def _cancelIdle(self) -> None:
        self._idle.disarm()

    def _startKeepalive(self) -> None:
        interval = self._pool.settings.pingInterval
        if interval:
            self._pingTimer = self._reactor.callLater(interval, self._keepaliveTick)

    def _keepaliveTick(self) -> None:
        """Every interval: a PING when nothing was heard during the last one."""
        settings = self._pool.settings
        self._pingTimer = self._reactor.callLater(settings.pingInterval, self._keepaliveTick)
        if self._heard or self._pingDeadline is not None:
            self._heard = False
            return
        self._h2.ping(b"rproxy\x00\x00")
        self.flush()
        self._pingDeadline = self._reactor.callLater(settings.pingTimeout, self._pingUnanswered)

    def _pingAnswered(self) -> None:
        if self._pingDeadline is not None and self._pingDeadline.active():
            self._pingDeadline.cancel()
        self._pingDeadline = None

    def _pingUnanswered(self) -> None:
        self._pingDeadline = None
        timeout = self._pool.settings.pingTimeout
        self._log.warn(
            "upstream {upstream} did not answer an HTTP/2 PING within {timeout}s; closing the connection",
            upstream=self.label,
            timeout=timeout,
        )
        self.failAll(
            upstreamError(504, f"upstream {self.label} did not answer a PING within {timeout:g}s", "connection_timeout")
        )
        self.transport.abortConnection()


class HTTP2Stream:
    """
    One exchange's stream on an L{HTTP2Connection}: its L{UpstreamConnection}, the consumer of its request
    body and the IPushProducer of its response body.

    @ivar streamId: its id once the request started (0 before).
    @ivar reused: whether the connection carried streams before this one.
    """

    streamId = 0
    _receiver: ResponseReceiver | None = None
    _body: RequestBodyPipe | None = None
    _bodyProducer: IPushProducer | None = None
    _finishWith: Pairs | None = None  # trailers to send once the pending body bytes are sent

    def __init__(self, connection: HTTP2Connection, reused: bool) -> None:
        self._connection = connection
        self.reused = reused
        self._deadline = deadline.Deadline(connection.reactor, self._deadlinePassed)
        self.reportsUnprocessed = True
        self._done = False  # the slot is freed
        self._requestDone = False
        self._headSeen = False
        self._hasBody = False
        self._expectBody = True
        self._ended = False  # END_STREAM arrived
        self._paused = False
        self._received = 0
        self._pending: list[bytes] = []
        self._held: list[tuple[bytes, int]] = []
        self._trailers: Pairs = []

    @property
    def isOpen(self) -> bool:
        """Whether it may still carry its exchange."""
        return not self._done and self._connection.usable

    # -- the exchange's side

    def sendRequest(self, head: RequestHead, body: RequestBodyPipe | None, receiver: ResponseReceiver) -> None:
        """Open the stream with C{head}, stream C{body} as DATA frames, report the response to C{receiver}."""
        self._receiver = receiver
        connection = self._connection
        if not connection.usable:
            self.refused("closed the connection before the request was sent")
            return
        if head.upgrade:
            self.failed(
                upstreamError(
                    502,
                    f"upstream {connection.label} speaks HTTP/2, which cannot carry a protocol upgrade"
                    f" ({b', '.join(head.upgrade).decode('latin-1')})",
                    "http_protocol_error",
                ),
                Delivery.MAYBE,
            )
            return
        self._expectBody = head.expectsResponseBody
        headers = [
            (b":method", head.method),
            (b":scheme", head.scheme),
            (b":authority", head.authority),
            (b":path", head.target),
        ]
        for name, value in head.fields:
            lowered = name.lower()
            if lowered not in _NOT_FORWARDED:
                headers.append((lowered, value))
        if head.acceptsTrailers:
            headers.append((b"te", b"trailers"))
        if head.bodyLength is not None:
            headers.append((b"content-length", b"%d" % head.bodyLength))
        self.streamId = connection.startStream(self)
        try:
            connection.h2.send_headers(self.streamId, headers, end_stream=body is None)
        except ProtocolError as e:
            self._resetQuietly()
            self._finish()
            self._report(clientError(400, f"the request cannot be sent over HTTP/2: {e}"), Delivery.MAYBE)
            return
        connection.flush()
        if body is None:
            self._requestWritten()
        else:
            self._body = body
            body.attach(self)

    def giveBack(self) -> None:
        """Return the reserved stream, unused."""
        if not self._done:
            self._finish()

    def abort(self) -> None:
        """Drop the exchange: RST_STREAM(CANCEL), and the slot is free."""
        self._receiver = None
        body, self._body = self._body, None
        if body is not None:
            body.detach()
        if not self._done:
            self._resetQuietly()
            self._finish()

    # -- the request body (a BodyConsumer)

    def writeBody(self, data: bytes) -> None:
        """Send body bytes as the flow-control windows allow; keep the rest and pause the body."""
        if self._done:
            return
        if self._pending:
            self._pending.append(data)
            return
        self._send(data)
        if self._pending or self._connection.transportPaused:
            self.pauseBody()

    def finishBody(self, trailers: Pairs) -> None:
        """The body is complete: end the stream, with a HEADERS frame of C{trailers} if there are any."""
        self._body = None
        if self._done:
            return
        if self._pending:
            self._finishWith = trailers
        else:
            self._endRequest(trailers)

    def failBody(self, error: ProxyError) -> None:
        """The client's body broke off: reset the stream, so the upstream never sees it complete."""
        self._body = None
        if not self._done:
            self._resetQuietly()
        self.failed(error, Delivery.MAYBE)

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        """The body's pipe: paused while the windows are exhausted."""
        self._bodyProducer = producer
        if self._pending or self._connection.transportPaused:
            producer.pauseProducing()

    def unregisterBodyProducer(self) -> None:
        """The body's pipe is finished or gone."""
        self._bodyProducer = None

    def pauseBody(self) -> None:
        """Pause the request body (no window, or the socket's buffer is full)."""
        if self._bodyProducer is not None:
            self._bodyProducer.pauseProducing()

    def windowOpened(self) -> None:
        """The send window grew, or the socket drained: send what is pending, then take more of the body."""
        if self._done or not self.streamId:
            return
        pending = self._pending
        while pending:
            self._pending = []
            self._send(b"".join(pending))
            if self._pending:
                return
            pending = self._pending
        if self._finishWith is not None:
            trailers, self._finishWith = self._finishWith, None
            self._endRequest(trailers)
        elif self._bodyProducer is not None and not self._connection.transportPaused:
            self._bodyProducer.resumeProducing()

    def _send(self, data: bytes) -> None:
        connection = self._connection
        h2 = connection.h2
        streamId = self.streamId
        try:
            while data:
                window = min(h2.local_flow_control_window(streamId), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                h2.send_data(streamId, data[:window])
                data = data[window:]
        except ProtocolError:  # the stream was closed by the server meanwhile
            data = b""
        if data:
            self._pending.append(data)
        connection.flush()

    def _endRequest(self, trailers: Pairs) -> None:
        connection = self._connection
        try:
            if trailers:
                connection.h2.send_headers(
                    self.streamId, [(name.lower(), value) for name, value in trailers], end_stream=True
                )
            else:
                connection.h2.end_stream(self.streamId)
        except ProtocolError as e:
            self._resetQuietly()
            self.failed(clientError(400, f"the request trailers cannot be sent over HTTP/2: {e}"), Delivery.MAYBE)
            return
        connection.flush()
        self._requestWritten()

    def _requestWritten(self) -> None:
        self._requestDone = True
        if self._ended and not self._held:
            self._complete()
        elif not self._headSeen:
            self._deadline.arm(deadline.RESPONSE, self._connection.settings.responseTimeout)

    # -- IPushProducer for the response body: acknowledgements follow the client

    def pauseProducing(self) -> None:
        self._paused = True
        self._deadline.disarm()  # a slow client is not the upstream's fault

    def resumeProducing(self) -> None:
        self._paused = False
        held = self._held
        while held and not self._paused and self._receiver is not None:
            data, size = held.pop(0)
            self._deliver(data, size)
        self._connection.flush()
        if self._paused or self._receiver is None:
            return
        if self._ended:
            self._complete()
        elif self._headSeen:
            self._deadline.arm(deadline.READ, self._connection.settings.readTimeout)

    def stopProducing(self) -> None:
        self.abort()

    # -- the response, from the connection

    def interimReceived(self, headers: Pairs) -> None:
        """A 1xx response."""
        status = _status(headers)
        if self._receiver is not None and status is not None and status != 101:
            self._receiver.responseInterim(status, _fields(headers))

    def headReceived(self, headers: Pairs, endStream: bool) -> None:
        """The final response head."""
        status = _status(headers)
        receiver = self._receiver
        if receiver is None:
            return
        if status is None:
            self._resetQuietly()
            self.failed(
                upstreamError(
                    502, f"upstream {self._connection.label} sent a response without a status", "http_protocol_error"
                ),
                Delivery.MAYBE,
            )
            return
        lengths = [value for name, value in headers if name == b"content-length"]
        if lengths:
            try:
                contentLength(lengths)  # relayed to HTTP/1.1 clients: never one they could read differently
            except MalformedBodyError as e:
                self._resetQuietly()
                self.failed(
                    upstreamError(
                        502,
                        f"upstream {self._connection.label} sent a bad response: {e}",
                        "http_response_content_length",
                    ),
                    Delivery.MAYBE,
                )
                return
        self._headSeen = True
        self._hasBody = not endStream and self._expectBody and status not in NO_BODY_CODES
        if self._hasBody and self._requestDone:
            self._deadline.arm(deadline.READ, self._connection.settings.readTimeout)
        else:
            self._deadline.disarm()
        receiver.responseHead(b"2", status, b"", _fields(headers), self._hasBody)

    def dataReceived(self, data: bytes, size: int) -> None:
        """Body bytes (C{size}: their flow-controlled length, padding included)."""
        self._received += size
        if not self._hasBody or self._receiver is None:
            self._connection.h2.acknowledge_received_data(size, self.streamId)
            return
        if self._paused or self._held:
            self._held.append((data, size))
            return
        self._deadline.postpone(deadline.READ, self._connection.settings.readTimeout)
        self._deliver(data, size)

    def _deliver(self, data: bytes, size: int) -> None:
        receiver = self._receiver
        assert receiver is not None
        receiver.responseData(data)
        if not self._done:
            self._connection.h2.acknowledge_received_data(size, self.streamId)

    def trailersReceived(self, headers: Pairs) -> None:
        """Trailer fields: passed on when the stream ends."""
        self._trailers = _fields(headers)

    def ended(self) -> None:
        """END_STREAM: the response is complete (once what is held is delivered)."""
        self._ended = True
        if not self._held and not self._paused:
            self._complete()

    def reset(self, code: int) -> None:
        """The server reset the stream."""
        label = self._connection.label
        if code == ErrorCodes.REFUSED_STREAM:
            self.refused("refused the stream (REFUSED_STREAM)")
            return
        if self._headSeen:
            error = upstreamError(
                502, f"upstream {label} reset the stream ({_codeName(code)}) mid-response", "http_response_incomplete"
            )
        else:
            error = upstreamError(
                502, f"upstream {label} reset the stream ({_codeName(code)}) before responding", "connection_terminated"
            )
        self.failed(error, Delivery.MAYBE)

    def refused(self, why: str) -> None:
        """The server provably did not process the request: it may be sent again."""
        error = upstreamError(502, f"upstream {self._connection.label} {why}", "connection_terminated")
        self.failed(error, Delivery.UNPROCESSED)

    def connectionLost(self, how: str) -> None:
        """The connection went down under this stream."""
        label = self._connection.label
        if self._headSeen:
            error = upstreamError(
                502, f"upstream {label} {how} the connection mid-response", "http_response_incomplete"
            )
            self.failed(error, Delivery.MAYBE)
        else:
            error = upstreamError(
                502, f"upstream {label} {how} the connection before responding", "connection_terminated"
            )
            self.failed(error, Delivery.STALE if self.reused and self._received == 0 else Delivery.MAYBE)

    # -- endings

    def _complete(self) -> None:
        receiver = self._receiver
        self._receiver = None
        self._deadline.disarm()
        if not self._requestDone:
            # The upstream answered before the whole request body was sent: stop sending it.
            body, self._body = self._body, None
            if body is not None:
                body.stopProducing()
            self._resetQuietly()
        if not self._done:
            self._finish()
        if receiver is not None:
            receiver.responseDone(self._trailers)

    def failed(self, error: ProxyError, delivery: Delivery) -> None:
        """The exchange on this stream failed (the stream is already reset, or needs no reset)."""
        body, self._body = self._body, None
        if body is not None:
            body.detach()  # the exchange decides whether it is sent again or dropped
        if not self._done:
            self._finish()
        self._report(error, delivery)

    def _report(self, error: ProxyError, delivery: Delivery) -> None:
        receiver = self._receiver
        self._receiver = None
        if receiver is not None:
            receiver.responseFailed(error, delivery)

    def _finish(self) -> None:
        self._done = True
        self._deadline.stop()
        self._held = []
        self._pending = []
        self._connection.streamDone(self)

    def _resetQuietly(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        if not self.streamId:
            return
        try:
            self._connection.h2.reset_stream(self.streamId, code)
        except ProtocolError:  # already closed on h2's side
            return
        self._connection.flush()

    def _deadlinePassed(self, mode: int) -> None:
        if self._done:
            return
        self._resetQuietly()
        self.failed(timeoutError(mode, self._connection.label, self._connection.settings), Delivery.MAYBE)


def _status(headers: Pairs) -> int | None:
    for name, value in headers:
        if name == b":status":
            return int(value) if value.isdigit() and len(value) == 3 else None
    return None


def _fields(headers: Pairs) -> Pairs:
    """The fields of a head, without its pseudo-header fields."""
    return [(name, value) for name, value in headers if not name.startswith(b":")]
