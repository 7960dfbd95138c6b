"""
The client side of HTTP/2: Twisted's C{H2Connection} and C{H2Stream} with what a proxy needs added.

Twisted (C{twisted.web._http2}) serves HTTP/2 once TLS negotiates it with ALPN; L{rproxy.downstream.site} also
switches to it on a plain connection that opens with the HTTP/2 preface (h2c with prior knowledge).
L{ProxyH2Connection} adds, per connection:

 - limits: C{SETTINGS_MAX_CONCURRENT_STREAMS} (a stream beyond it is refused with REFUSED_STREAM, where
   h2 would end the whole connection), C{SETTINGS_MAX_HEADER_LIST_SIZE}, and the Rapid Reset
   bound (CVE-2023-44487) as Twisted's reset token bucket, sized from L{ClientLimits};
 - trailers both ways: those a client sends after its body reach the request (C{requestTrailers}),
   and a response ends with a trailer HEADERS frame (END_STREAM) instead of an empty DATA frame when
   the request has trailers to send;
 - informational (1xx) responses on a stream, and ``Expect: 100-continue`` left to the request;
 - a request routed only once its whole head is in (Twisted calls C{gotLength} from inside the header
   loop, before C{Host} may be set, and before the stream is registered so a response written at once
   would fail), and frames for a stream already answered ignored instead of raising C{KeyError};
 - a stream answered before its request body ended is reset with C{NO_ERROR} (RFC 9113 section 8.1),
   so the client stops sending it;
 - a response without body or trailers sent as one HEADERS frame with END_STREAM (Twisted adds an
   empty DATA frame, which gRPC clients do not accept for a trailers-only response);
 - a send loop that writes several DATA frames per reactor turn (Twisted writes one), serving the
   streams in turn until a client signals RFC 7540 priorities (then through Twisted's priority tree),
   and woken without a Deferred;
 - a response head built from the proxy's field list directly (L{ProxyH2Stream.writeHead}), without
   the C{Headers} round trip nor h2's normalisation when the fields need none;
 - request heads checked before they become HTTP/1.1 requests (L{rproxy.downstream.h2request}), with the
   HTTP/1.1 head limits (431 on the stream);
 - response bytes held per stream and per connection bounded by L{STREAM_BUFFER} and
   L{CONNECTION_BUFFER}, whatever window the client advertises;
 - deadlines: the header timeout for any incomplete frame but DATA and any header block
   (L{rproxy.downstream.h2frames.FrameWatch}), and the idle timeout only while no stream is open;
 - connection errors sent with the code the RFCs name, and a close that a client cannot hold off
   (L{CLOSE_GRACE}); a graceful shutdown that lets the streams in flight finish.

It relies on private parts of C{twisted.web._http2} (C{H2Connection._requestReceived},
C{_handleWindowUpdate}, C{_requestDataReceived}, C{_requestEnded}, C{_requestAborted}, C{_requestDone},
C{_sendPrioritisedData}, C{_outboundStreamQueues}, C{_streamCleanupCallbacks}, C{_tryToWriteControlData},
C{_terminate}, C{_bufferedControlFrames}, the C{_cancelTimeouts} argument of C{connectionLost},
C{_resetTokenBurst}/C{_resetTokenRate}/C{_resetTokens}, C{_consumerBlocked}, C{_stillProducing},
C{_sendingDeferred}, C{_handlePriorityUpdate}, C{_isSecure}, C{priority}, C{_END_STREAM_SENTINEL};
C{H2Stream._request}, C{_conn}, C{_convertHeaders}, C{_send100Continue}), and of h2
(C{H2Connection._receive_headers_frame}, C{_closed_streams}, C{h2.connection._decode_headers}, the
C{H2Configuration} of its streams read at each C{send_headers}); L{rproxy.test.test_twisted_contract}
fails if a Twisted or h2 release changes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import priority
from h2.connection import _decode_headers
from h2.stream import StreamClosedBy
from h2.utilities import CONNECTION_HEADERS
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection, H2Stream

from rproxy.downstream.h2frames import FrameWatch, connectionErrorCode, withGoAwayCode
from rproxy.downstream.h2request import HeadLimits, requestHead
from rproxy.errors import ProxyError
from rproxy.headers import allowedTrailers, hasControl, isToken

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from rproxy.downstream.limits import ClientLimits

_log = Logger()

#: DATA bytes the send loop writes in one reactor turn before letting other work run.
SEND_BUDGET = 262144

#: Response bytes held for one stream, and for all the streams of a connection, before the streams'
#: producers (their upstreams) are paused, whatever flow-control window the client advertises: a client
#: that opens a huge window and then stops reading costs at most this much.
STREAM_BUFFER = 65536
CONNECTION_BUFFER = 1048576

#: Seconds a client has to let a connection close after rproxy's GOAWAY before it is reset (a TLS
#: connection otherwise waits for the client's close_notify, which a hostile client never sends).
CLOSE_GRACE = 3.0

Fields = list[tuple[bytes, bytes]]

#: How many times the advertised header list size a client may send before its connection is ended
#: (below it, a larger head is refused with 431).
HEADER_LIST_HARD_CAP = 4

#: The method and target a refused request is logged with, when its own cannot be trusted.
_REFUSED = (b"-", b"-")

#: Response fields h2 would rewrite (never-indexed in HPACK) or refuse (C{te}): left to its normalisation.
_H2_NORMALISED = frozenset([b"authorization", b"proxy-authorization", b"cookie", b"te"])


def responseFields(code: int, fields: Sequence[tuple[bytes, bytes]]) -> Fields | None:
    """
    The HEADERS field list of a response head: C{:status}, then C{fields} as h2's outbound normalisation
    would make them (names lowercased, values stripped, connection-specific fields dropped), in the
    order given; C{None} when a field is not valid (a name that is not a token, a value with NUL, CR or
    LF) or is one h2 treats specially, so that the caller takes the checked path instead.
    """
    if not fields:
        return [(b":status", b"%d" % code)]
    names = b"".join([name for name, _ in fields])
    if not all([name for name, _ in fields]) or not isToken(names) or hasControl(b"".join([v for _, v in fields])):
        return None
    head = [(b":status", b"%d" % code)]
    for name, value in fields:
        name = name.lower()
        if name in CONNECTION_HEADERS:
            continue
        if name in _H2_NORMALISED:
            return None
        head.append((name, value.strip()))
    return head


class _RoundRobin:
    """
    The streams of a connection with something to send, served in turn: the scheduler in place of
    Twisted's C{priority.PriorityTree}, whose every pick walks the whole tree (it weighs RFC 7540
    priorities, which RFC 9113 deprecated, and that most clients no longer send).  It has the tree's
    interface, for Twisted's code, and hands its state to a tree when a client does send priorities.
    """

    def __init__(self) -> None:
        self.streams: dict[int, bool] = {}  # every stream, and whether it may send (not blocked)
        self._ready: dict[int, None] = {}  # the streams that may send, the next one first

    def insert_stream(
        self, stream_id: int, depends_on: int | None = None, weight: int = 16, exclusive: bool = False
    ) -> None:
        if stream_id in self.streams:
            raise priority.DuplicateStreamError(stream_id)
        self.streams[stream_id] = True
        self._ready[stream_id] = None

    def remove_stream(self, stream_id: int) -> None:
        del self.streams[stream_id]
        self._ready.pop(stream_id, None)

    def block(self, stream_id: int) -> None:
        if self.streams[stream_id]:
            self.streams[stream_id] = False
            del self._ready[stream_id]

    def unblock(self, stream_id: int) -> None:
        if not self.streams[stream_id]:
            self.streams[stream_id] = True
            self._ready[stream_id] = None

    def __iter__(self) -> _RoundRobin:
        return self

    def __next__(self) -> int:
        ready = self._ready
        for streamID in ready:
            del ready[streamID]
            ready[streamID] = None  # to the back of the line: streams take turns, a frame each
            return streamID
        raise priority.DeadlockError("no stream has anything to send")

    def tree(self) -> priority.PriorityTree:
        """A priority tree holding these streams, each blocked or not as here (all of equal weight)."""
        tree = priority.PriorityTree()
        for streamID, sending in self.streams.items():
            tree.insert_stream(streamID)
            if not sending:
                tree.block(streamID)
        return tree


class _H2State(h2.connection.H2Connection):
    """
    h2's connection state machine, which ends a stream with trailers when some are pending and
    remembers the trailers a client sent, until the stream's end is handled.
    """

    def __init__(self, limits: ClientLimits) -> None:
        super().__init__(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.h2MaxConcurrentStreams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.h2MaxHeaderListSize,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441: WebSocket (rproxy.tunnel.h2connect)
            },
        )
        # Decode header lists larger than the advertised limit (up to a hard cap, beyond which the
        # connection ends), so that the request is refused with 431 and the connection goes on.
        self.decoder.max_header_list_size = HEADER_LIST_HARD_CAP * max(
            limits.h2MaxHeaderListSize, limits.maxHeaderBytes
        )
        self.pendingTrailers: dict[int, Sequence[tuple[bytes, bytes]]] = {}
        self.receivedTrailers: dict[int, Fields] = {}

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        """
        Refuse a stream beyond C{SETTINGS_MAX_CONCURRENT_STREAMS} with RST_STREAM(REFUSED_STREAM), which a
        client may retry, instead of h2's connection error that would end every stream of the connection.
        """
        streamID = frame.stream_id
        if (
            streamID not in self.streams
            and streamID % 2 == 1
            and streamID > self.highest_inbound_stream_id
            and self.open_inbound_streams >= self.local_settings.max_concurrent_streams
        ):
            _decode_headers(self.decoder, frame.data)  # keeps the HPACK state in step with the client's
            self.highest_inbound_stream_id = streamID
            self._closed_streams[streamID] = StreamClosedBy.SEND_RST_STREAM  # its later frames: ignored
            refusal = RstStreamFrame(streamID)
            refusal.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
            return [refusal], []
        return super()._receive_headers_frame(frame)

    def end_stream(self, stream_id: int) -> None:
        trailers = self.pendingTrailers.pop(stream_id, None)
        if trailers:
            self.send_headers(stream_id, list(trailers), end_stream=True)
        else:
            super().end_stream(stream_id)

    def receive_data(self, data: Buffer) -> list[h2.events.Event]:
        events = super().receive_data(data)
        for event in events:
            if isinstance(event, h2.events.TrailersReceived):
                self.receivedTrailers[event.stream_id] = list(event.headers)
        return events


class ProxyH2Stream(H2Stream):
    """
    One HTTP/2 request/response exchange, routed once the connection has registered it.

    @ivar connectProtocol: the ``:protocol`` of an extended CONNECT (RFC 8441), C{None} for any other.
    """

    _conn: ProxyH2Connection
    connectProtocol: bytes | None = None
    _request: Any  # a ProxyRequest
    _headers: list[tuple[bytes, bytes]] = []
    _endWithHead = False
    blocked = False  # whether its producer is paused

    def _convertHeaders(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Keep the fields for L{headersReceived}: the stream is not registered yet."""
        self._headers = headers

    def headersReceived(self, ended: bool) -> None:
        """
        Give the request its fields, then its length (routing it), or the reason its head is refused;
        C{ended}: the HEADERS frame ended the stream, so there is no body.
        """
        request = self._request
        head = requestHead(self._headers, self._conn.headLimits)
        del self._headers
        request.clientproto = b"HTTP/2"
        if isinstance(head, ProxyError):
            request.method, request.uri = _REFUSED
            request.gotLength(0, head)
            return
        request.method, request.uri = head.method, head.target
        add = request.requestHeaders.addRawHeader
        for name, value in head.fields:
            add(name, value)
        length = head.length
        self.connectProtocol = head.protocol
        if self.connectProtocol is not None:
            # Its DATA is a tunnel's (rproxy.tunnel.h2connect), not a body: held, unacknowledged, until it opens.
            length = 0
            self.pauseProducing()
        if length is None and (ended or head.method in (b"GET", b"HEAD")):
            length = 0
        request.parseCookies()
        request.gotLength(length)

    def flowControlBlocked(self) -> None:
        """Twisted's: the producer is paused (the window is shut, or the proxy's buffers are full)."""
        self.blocked = True
        super().flowControlBlocked()

    def windowUpdated(self) -> None:
        """Twisted's: the producer resumes if the stream may queue more."""
        if self.blocked and self._conn.remainingOutboundWindow(self.streamID) > 0:
            self.blocked = False
            super().windowUpdated()

    def requestComplete(self) -> None:
        """The client ended its request, perhaps with trailers: hand them to the request first."""
        trailers = self._conn.conn.receivedTrailers.pop(self.streamID, None)
        if trailers is not None:
            self._request.requestTrailers = allowedTrailers(trailers)
        super().requestComplete()

    # -- RequestChannel

    upgradable = False

    @property
    def extendedConnect(self) -> bytes | None:
        return self.connectProtocol

    @property
    def bodySource(self) -> ProxyH2Stream:
        """The stream itself: paused, it holds back the client's flow-control window."""
        return self

    def writeInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Send an informational (1xx) response: a HEADERS frame without END_STREAM."""
        self._conn.sendHeadersNow(self.streamID, [(b":status", b"%d" % status), *fields])

    def writeHead(
        self, request: Any, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool
    ) -> bool:
        """
        Send the response head now as one HEADERS frame built from C{fields} directly (see
        L{responseFields}); C{False}, and nothing sent, when h2's checks must see the fields.  Without a
        body, the head waits for the end of the response, so that one HEADERS frame ends the stream
        (instead of HEADERS and an empty DATA, which gRPC clients do not accept for trailers-only).
        """
        if not hasBody:
            self._endWithHead = True
            return False
        if request.cookies or (request.lastModified or request.etag) is not None:
            return False
        own = [(name, value) for name, values in request.responseHeaders.getAllRawHeaders() for value in values]
        head = responseFields(status, [*own, *fields] if own else fields)
        if head is None:
            return False
        request.setResponseCode(status, reason)
        self._conn.sendHeadersNow(self.streamID, head, normalised=True)
        request.startedWriting = 1
        return True

    def writeTrailers(self, request: Any, trailers: Sequence[tuple[bytes, bytes]]) -> bool:
        """End the response with C{trailers} as a trailer HEADERS frame, after the last DATA."""
        self._endWithHead = False
        self._conn.conn.pendingTrailers[self.streamID] = trailers
        return True

    def abort(self) -> None:
        """Reset the stream."""
        self.abortConnection()

    def stopKeepAlive(self, request: Any) -> None:
        """Nothing: other streams go on, and a stream answered before its body ended is reset anyway."""

    def sendContinue(self) -> None:
        self._send100Continue()

    def switchProtocols(self, request: Any, status: int, fields: Sequence[tuple[bytes, bytes]]) -> StreamTransport:
        """Answer the extended CONNECT with C{status} (no END_STREAM), and hand the stream to a tunnel."""
        self._conn.sendHeadersNow(self.streamID, [(b":status", b"%d" % status), *fields])
        return StreamTransport(self)

    # -- what twisted.web's request writes

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not self._endWithHead:
            super().writeHeaders(version, code, reason, headers)
            return
        fields = [(b":status", code), *((name, v) for name, values in headers.getAllRawHeaders() for v in values)]
        self._conn.sendHeadersNow(self.streamID, fields, endStream=True)

    def requestDone(self, request: object) -> None:
        if not self._endWithHead:
            super().requestDone(request)
        elif self.streamID in self._conn.streams:  # else the client reset it meanwhile
            self._conn._requestDone(self.streamID)


class ProxyH2Connection(H2Connection):
    """An HTTP/2 server connection with rproxy's limits, trailers, 1xx and send loop (see the module)."""

    conn: _H2State
    transport: Any
    streams: dict[int, ProxyH2Stream]
    # Set by the channel protocol that switches to HTTP/2, as Twisted's does.
    requestFactory: Any
    site: Any
    factory: Any

    _idle = False  # whether the send loop waits for a stream to have something to send
    _queuedTotal = 0  # response bytes queued, all streams together
    _connectionFull = False  # streams were paused because the connection holds CONNECTION_BUFFER
    _idleTimeout: float | None = None  # the idle timeout, which runs only while no stream is open
    _idleSince = 0.0  # when the last stream ended (or the connection began)
    _headTimer: IDelayedCall | None = None  # the deadline of an incomplete frame or header block
    _headStarted = -1  # which one (FrameWatch.started) the deadline is for
    _closer: IDelayedCall | None = None  # resets the connection if the client does not let it close
    _draining = False  # GOAWAY sent for shutdown: close once the last stream ends
    _host: Any = None
    _peer: Any = None
    _secure: bool | None = None

    def __init__(self, limits: ClientLimits, reactor: IReactorTime | None = None) -> None:
        super().__init__(reactor)
        self.conn = _H2State(limits)
        self.headLimits = HeadLimits(limits.maxHeaders, limits.maxHeaderBytes, limits.h2MaxHeaderListSize)
        self._headerTimeout = limits.headerTimeout
        self._watch = FrameWatch()
        self._queued: dict[int, int] = {}  # response bytes queued per stream
        self.priority: Any = _RoundRobin()
        self._resetTokenBurst = self._resetTokens = limits.h2ResetBurst
        self._resetTokenRate = limits.h2ResetRate

    # -- the connection's life: deadlines, errors, closing

    def connectionMade(self) -> None:
        """Twisted's; the idle timeout is kept aside, to run only while no stream is open."""
        self._idleTimeout = self.timeOut
        self._idleSince = self._reactor.seconds()
        super().connectionMade()

    def resetTimeout(self) -> None:
        """
        Nothing: traffic does not postpone the idle timeout (a client that sends PING frames or a byte
        at a time is not busy); it runs only while the connection has no stream.
        """

    def dataReceived(self, data: bytes) -> None:
        """
        Twisted's, with a deadline for whatever is incomplete besides request body data (the preface, a
        frame, a header block): it must arrive within the header timeout of its first byte.
        """
        watch = self._watch
        watch.feed(data)
        timer = self._headTimer
        if watch.pending:
            if timer is None:
                self._headTimer = self.callLater(self._headerTimeout, self._headTimedOut)
            elif watch.started != self._headStarted:
                timer.reset(self._headerTimeout)
            self._headStarted = watch.started
        elif timer is not None:
            self._headTimer = None
            timer.cancel()
        super().dataReceived(data)
        if not self._stillProducing:  # Twisted ended the connection (the client's GOAWAY, say)
            self._closeTransport()

    def _headTimedOut(self) -> None:
        self._headTimer = None
        _log.warn(
            "client {client}: an HTTP/2 frame or header block did not arrive within {timeout:g}s; closing",
            client=self.getPeer(),
            timeout=self._headerTimeout,
        )
        self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._terminate(Failure(ConnectionLost("the client was too slow to send a frame")))

    def timeoutConnection(self) -> None:
        """
        The idle timer ran out: if the connection had no stream for the idle timeout, GOAWAY and close;
        else wait again.  (The timer is not moved at each stream's start and end, which would cost two
        timer operations per request: it only ever fires late, and looks.)
        """
        timeout = self._idleTimeout
        if timeout is None:
            return
        idle = self._reactor.seconds() - self._idleSince
        if self.streams or idle < timeout:
            self.setTimeout(timeout if self.streams else timeout - idle)
            return
        _log.info(
            "client {client}: HTTP/2 connection idle for {timeout:g}s; closing",
            client=self.getPeer(),
            timeout=self._idleTimeout,
        )
        self.conn.close_connection()
        self._terminate(Failure(ConnectionDone("idle timeout")))

    def _terminate(self, reason: Failure) -> None:
        """
        End the connection after an error or a timeout: send what h2 queued (ending with its GOAWAY, whose
        error code is made the one RFC 9113 and RFC 7541 name), close, and reset the connection if the
        client does not let it close within L{CLOSE_GRACE} seconds.
        """
        pending = self.conn.data_to_send()
        if reason.check(h2.exceptions.ProtocolError):
            error: Any = reason.value
            code = connectionErrorCode(error, self._watch)
            pending = withGoAwayCode(pending, code)
            _log.warn(
                "client {client}: HTTP/2 connection error {code}: {error}",
                client=self.getPeer(),
                code=code.name,
                error=str(error),
            )
        transport = self.transport
        for control in self._bufferedControlFrames:
            transport.write(control)
        self._bufferedControlFrames.clear()
        transport.write(pending)
        self.connectionLost(reason)
        self._closeTransport()

    def drain(self) -> None:
        """
        Shutdown: GOAWAY now, so the client opens no new stream, and close once the streams in flight
        have ended.  The GOAWAY is written here, not by h2, whose state machine would then send no more
        frames at all, so that the streams in flight could not finish.
        """
        if self._draining or not self._stillProducing:
            return
        self._draining = True
        self._tryToWriteControlData()
        goAway = GoAwayFrame(0)
        goAway.last_stream_id = self.conn.highest_inbound_stream_id
        goAway.error_code = h2.errors.ErrorCodes.NO_ERROR
        self.transport.write(goAway.serialize())
        if not self.streams:
            self._drained()

    def _drained(self) -> None:
        """The last stream of a draining connection ended: close it."""
        self.conn.close_connection(last_stream_id=self.conn.highest_inbound_stream_id)
        self._tryToWriteControlData()
        self._closeTransport(None)

    def _closeTransport(self, grace: float | None = CLOSE_GRACE) -> None:
        """
        Close once what is written is sent; reset after C{grace} seconds if still open (C{None}: wait, as
        a shutdown does, which has its own grace period).
        """
        transport = self.transport
        if self._closer is not None:
            return
        transport.unregisterProducer()  # else TLS would wait for this producer before its close_notify
        transport.loseConnection()
        if grace is not None:
            self._closer = self.callLater(grace, transport.abortConnection)

    def connectionLost(self, reason: Failure = connectionDone, _cancelTimeouts: bool = True) -> None:
        if self._headTimer is not None:
            self._headTimer.cancel()
            self._headTimer = None
        if _cancelTimeouts and self._closer is not None and self._closer.active():
            self._closer.cancel()
        super().connectionLost(reason, _cancelTimeouts)

    # -- streams

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        """Twisted's, with the stream registered before its request is routed."""
        if not self._stillProducing:
            return  # closed by an earlier event of the same read (a reset flood)
        streamID = event.stream_id
        if self._draining:
            # It crossed the GOAWAY of a shutdown: refused, so the client may send it again elsewhere.
            self.conn.reset_stream(streamID, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._queued[streamID] = 0
        stream = ProxyH2Stream(streamID, self, event.headers, self.requestFactory, self.site, self.factory)
        self.streams[streamID] = stream
        self._streamCleanupCallbacks[streamID] = Deferred()
        self._outboundStreamQueues[streamID] = deque()
        try:
            self.priority.insert_stream(streamID)
        except priority.DuplicateStreamError:
            pass  # a PRIORITY frame came first, and _handlePriorityUpdate inserted it
        else:
            self.priority.block(streamID)
        stream.headersReceived(event.stream_ended is not None)

    def _requestDataReceived(self, event: h2.events.DataReceived) -> None:
        if event.stream_id in self.streams:
            super()._requestDataReceived(event)
        else:  # answered already: drop the data, but give the connection's window back
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _requestEnded(self, event: h2.events.StreamEnded) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)
        else:
            self.conn.receivedTrailers.pop(event.stream_id, None)

    def _requestAborted(self, event: h2.events.StreamReset) -> None:
        """A client reset a stream: Twisted cancels it and spends a token of the Rapid Reset bucket."""
        if event.stream_id not in self.streams:
            return
        super()._requestAborted(event)
        if not self._stillProducing:  # the bucket was empty: Twisted sent GOAWAY and closed
            _log.warn(
                "client {client} reset streams faster than {rate}/s (burst {burst}): closed with ENHANCE_YOUR_CALM",
                client=self.transport.getPeer(),
                rate=self._resetTokenRate,
                burst=self._resetTokenBurst,
            )

    def _requestDone(self, streamID: int) -> None:
        """The response is sent (or the stream reset): stop the client sending a body nobody reads."""
        stream = self.conn.streams.get(streamID)
        if self._stillProducing and stream is not None and not stream.closed:
            try:
                self.conn.reset_stream(streamID, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing
            else:
                self._tryToWriteControlData()
        self.conn.pendingTrailers.pop(streamID, None)
        self._queuedTotal -= self._queued.pop(streamID, 0)
        super()._requestDone(streamID)
        if not self.streams and self._stillProducing:
            if self._draining:
                self._drained()
            else:
                self._idleSince = self._reactor.seconds()

    def _handleWindowUpdate(self, event: h2.events.WindowUpdated) -> None:
        """Twisted's, and wake the send loop: a stream it set aside on a shut window may go on."""
        super()._handleWindowUpdate(event)
        self._wake()

    def _handlePriorityUpdate(self, event: h2.events.PriorityUpdated) -> None:
        """The client sends RFC 7540 priorities: from now on, Twisted's priority tree weighs them."""
        if isinstance(self.priority, _RoundRobin):
            self.priority = self.priority.tree()
        super()._handlePriorityUpdate(event)

    def remainingOutboundWindow(self, streamID: int) -> int:
        """
        What a stream may still queue before its producer is paused: the client's window for it, but
        never more than L{STREAM_BUFFER} for the stream and L{CONNECTION_BUFFER} for the connection.
        """
        queued = self._queued.get(streamID, 0)
        return min(
            self.conn.local_flow_control_window(streamID) - queued,
            STREAM_BUFFER - queued,
            CONNECTION_BUFFER - self._queuedTotal,
        )

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        """Twisted's: queue C{data}, and wake the send loop if the client's window lets it go."""
        self._outboundStreamQueues[streamID].append(data)
        self._queued[streamID] += len(data)
        self._queuedTotal += len(data)
        if self._queuedTotal >= CONNECTION_BUFFER:
            self._connectionFull = True
        if self.conn.local_flow_control_window(streamID) > 0:
            self.priority.unblock(streamID)
            self._wake()
        if self.remainingOutboundWindow(streamID) <= 0:
            self.streams[streamID].flowControlBlocked()

    def endRequest(self, streamID: int) -> None:
        """Twisted's: the response is complete once the send loop reaches the end of its queue."""
        self._outboundStreamQueues[streamID].append(_END_STREAM_SENTINEL)
        self.priority.unblock(streamID)
        self._wake()

    def _wake(self) -> None:
        """Run the send loop now if it was waiting for something to send (what Twisted's Deferred did)."""
        if self._idle:
            self._idle = False
            self._sendPrioritisedData()

    def getHost(self) -> Any:
        """The transport's, asked once: every request asks (a C{getsockname} call each time)."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def _isSecure(self) -> bool:
        if self._secure is None:
            self._secure = bool(super()._isSecure())
        return self._secure

    def sendHeadersNow(self, streamID: int, fields: Fields, endStream: bool = False, normalised: bool = False) -> None:
        """
        Send a HEADERS frame now (it is not flow-controlled): an interim, a response head, or a whole
        bodiless response.  C{normalised}: the fields are as h2's normalisation would leave them and
        valid (L{responseFields} made them), so h2 skips its own pass over them.
        """
        config = self.conn.config
        if normalised:
            config.normalize_outbound_headers = config.validate_outbound_headers = False
        try:
            self.conn.send_headers(streamID, fields, end_stream=endStream)
        except h2.exceptions.StreamClosedError:
            return  # the client reset the stream meanwhile
        finally:
            if normalised:
                config.normalize_outbound_headers = config.validate_outbound_headers = True
        self._tryToWriteControlData()

    def _sendPrioritisedData(self, *args: object) -> None:
        """
        Twisted's send loop, writing DATA frames until L{SEND_BUDGET} bytes are out in one reactor turn
        instead of one frame per turn (which held a fast client to about a third of HTTP/1.1's rate).
        """
        budget = SEND_BUDGET
        try:
            while self._stillProducing:
                try:
                    streamID = next(self.priority)
                except priority.DeadlockError:
                    # Every stream is blocked or idle: wait until one has something to send (_wake).
                    self._idle = True
                    return
                if self._consumerBlocked is not None:  # behind the transport
                    self._consumerBlocked.addCallback(self._sendPrioritisedData)
                    return
                if budget <= 0:
                    self._reactor.callLater(0, self._sendPrioritisedData)
                    return
                budget -= self._sendFrame(streamID)
        finally:
            pending = self.conn.data_to_send()  # the DATA frames of this turn, in one write
            if pending and self._stillProducing:
                self.transport.write(pending)

    def _sendFrame(self, streamID: int) -> int:
        """Send one frame from C{streamID}'s queue; return its DATA size."""
        queue = self._outboundStreamQueues[streamID]
        frameData = queue.popleft()
        if frameData is _END_STREAM_SENTINEL:
            self.conn.end_stream(streamID)
            self.transport.write(self.conn.data_to_send())  # before _requestDone's control frames
            self._requestDone(streamID)
            return 1
        maxFrameSize = min(self.conn.max_outbound_frame_size, self.conn.local_flow_control_window(streamID))
        if maxFrameSize <= 0:
            # The client's window is shut: set the stream aside until its WINDOW_UPDATE
            # (_handleWindowUpdate), rather than coming back to it every turn as Twisted's loop does.
            queue.appendleft(frameData)
            self.priority.block(streamID)
            return 1
        if len(frameData) > maxFrameSize:
            queue.appendleft(frameData[maxFrameSize:])
            frameData = frameData[:maxFrameSize]
        sent = len(frameData)
        if sent:
            self.conn.send_data(streamID, frameData)
            self._dequeued(streamID, sent)
        if not queue:
            self.priority.block(streamID)
        if self.remainingOutboundWindow(streamID) <= 0:
            self.streams[streamID].flowControlBlocked()
        return sent or 1

    def _dequeued(self, streamID: int, size: int) -> None:
        """C{size} bytes of a stream went out: resume its producer, or every stream's, once below half."""
        queued = self._queued[streamID] = self._queued[streamID] - size
        self._queuedTotal -= size
        if self._connectionFull and self._queuedTotal <= CONNECTION_BUFFER // 2:
            self._connectionFull = False
            for stream in list(self.streams.values()):
                if stream.blocked:
                    stream.windowUpdated()
        elif queued <= STREAM_BUFFER // 2:
            stream = self.streams[streamID]
            if stream.blocked:
                stream.windowUpdated()


class StreamTransport:
    """
    An HTTP/2 stream as a tunnel's side (L{rproxy.tunnel.sides.TunnelSide}, RFC 8441): it takes the place
    of the stream's request, so that the stream hands it the client's DATA, END_STREAM and reset, which
    it passes to the tunnel, and tells the request when the stream is over.

    A client's END_STREAM becomes the tunnel's half-close; the end of the stream that an upstream FIN
    causes ends the tunnel (the stream is then reset with NO_ERROR if the client had not ended its side):
    HTTP/2 keeps no answered stream open for the client's DATA, so a half-open tunnel holds only in the
    client's direction.
    """

    halfCloses = True

    def __init__(self, stream: ProxyH2Stream) -> None:
        self.stream = stream
        self._request: Any = stream._request
        self.protocol: Any = None  # the tunnel's end, once attached
        stream._request = self
        self._ending = False  # END_STREAM is queued
        self._lost = False
        self._reason: Failure = Failure(ConnectionDone("the stream ended"))
        cleanup = stream._conn._streamCleanupCallbacks.get(stream.streamID)
        if cleanup is None:  # the client reset the stream meanwhile
            self._lost = True
        else:
            cleanup.addCallback(lambda _: self.connectionLost(self._reason))

    def attach(self, receiver: Any) -> bytes:
        """Deliver the client's DATA to C{receiver}; what it sent early waits, unacknowledged, in the stream."""
        self.protocol = receiver
        return b""

    # -- the stream's side (what it would tell its request)

    def handleContentChunk(self, data: bytes) -> None:
        """Client DATA (acknowledged by the stream once this returns, or when it resumes)."""
        self.protocol.dataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The client ended its side of the stream (END_STREAM)."""
        self.readConnectionLost(self._reason)

    def connectionLost(self, reason: Failure) -> None:
        """The stream is over: reset by the client, its connection lost, or both ends ended."""
        if self._lost:
            return
        self._lost = True
        if self.protocol is not None:
            self.protocol.connectionLost(reason)
        self._request.connectionLost(reason)

    def readConnectionLost(self, reason: Failure) -> None:
        """The client will send nothing more."""
        if not self._lost:
            self.protocol.readConnectionLost()

    # -- the transport, as the tunnel uses it

    def write(self, data: bytes) -> None:
        """Send C{data} in DATA frames, as the stream's window allows."""
        if not (self._lost or self._ending):
            self.stream.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        """Send each of C{data}."""
        for chunk in data:
            self.write(chunk)

    def loseWriteConnection(self) -> None:
        """End the stream (END_STREAM) once what is written is sent."""
        if not (self._lost or self._ending):
            self._ending = True
            self.stream.unregisterProducer()  # a paused producer would hold the end back
            self.stream.loseConnection()

    def loseConnection(self) -> None:
        """End the stream once what is written is sent (HTTP/2 resets the client's side then)."""
        self.loseWriteConnection()

    def abortConnection(self) -> None:
        """Reset the stream with CONNECT_ERROR (RFC 9113 section 8.5: the upstream connection failed)."""
        if self._lost:
            return
        self._reason = Failure(ConnectionLost("the stream was reset"))
        connection = self.stream._conn
        try:
            connection.conn.reset_stream(self.stream.streamID, h2.errors.ErrorCodes.CONNECT_ERROR)
        except h2.exceptions.StreamClosedError:
            pass  # it ended meanwhile; its state is cleaned up all the same
        if connection._tryToWriteControlData():
            connection._requestDone(self.stream.streamID)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """C{producer} is paused while the stream's window is shut."""
        if not self._lost:
            self.stream.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.stream.unregisterProducer()

    def getPeer(self) -> Any:
        return self.stream.getPeer()

    def getHost(self) -> Any:
        return self.stream.getHost()

    # -- IPushProducer: the client's DATA, paused by holding back its acknowledgement

    def pauseProducing(self) -> None:
        self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._lost:
            self.stream.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()


def http2Server(connection: Any) -> ProxyH2Connection:
    """The HTTP/2 protocol of a client connection, on its transport (see L{rproxy.downstream.connection})."""
    site = connection.site
    protocol = ProxyH2Connection(site.limits, site.reactor)
    protocol.requestFactory = site.requestFactory
    protocol.site = protocol.factory = site
    protocol.timeOut = site.limits.idleTimeout
    protocol.callLater = site.reactor.callLater  # type: ignore[method-assign]
    transport = connection.transport
    protocol.makeConnection(transport)
    transport.registerProducer(protocol, True)
    return protocol
