"""
The client side of HTTP/2: Twisted's C{H2Connection} and C{H2Stream} with what a proxy needs added.

Twisted (C{twisted.web._http2}) serves HTTP/2 once TLS negotiates it with ALPN; L{rproxy.server} also
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
   the C{Headers} round trip nor h2's normalisation when the fields need none.

It relies on private parts of C{twisted.web._http2} (C{H2Connection._requestReceived},
C{_handleWindowUpdate}, C{_requestDataReceived}, C{_requestEnded}, C{_requestAborted}, C{_requestDone},
C{_sendPrioritisedData}, C{_outboundStreamQueues}, C{_streamCleanupCallbacks}, C{_tryToWriteControlData},
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
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection, H2Stream

from rproxy.headers import allowedTrailers, hasControl, isToken

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from rproxy.server import ClientLimits

_log = Logger()

#: What opens an HTTP/2 connection with prior knowledge (RFC 9113 section 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: DATA bytes the send loop writes in one reactor turn before letting other work run.
SEND_BUDGET = 262144

Fields = list[tuple[bytes, bytes]]

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
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441: WebSocket (rproxy.h2tunnel)
            },
        )
        self.decoder.max_header_list_size = limits.h2MaxHeaderListSize
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

    def _convertHeaders(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Keep the fields for L{headersReceived}: the stream is not registered yet."""
        self._headers = headers

    def headersReceived(self, ended: bool) -> None:
        """
        Give the request its fields, then its length (routing it); C{ended}: the HEADERS frame ended
        the stream, so there is no body.
        """
        request = self._request
        add = request.requestHeaders.addRawHeader
        length: int | None = None
        for name, value in self._headers:
            if name[:1] != b":":
                add(name, value)
                if name == b"content-length":
                    length = int(value)  # h2 has checked it is a number, and will check the DATA against it
            elif name == b":method":
                self.command = value
            elif name == b":path":
                self.path = value
            elif name == b":authority":
                add(b"host", value)
            elif name == b":protocol":
                self.connectProtocol = value
        del self._headers
        if self.connectProtocol is not None:
            # Its DATA is a tunnel's (rproxy.h2tunnel), not a body: held, unacknowledged, until it opens.
            length = 0
            self.pauseProducing()
        if length is None and (ended or self.command in (b"GET", b"HEAD")):
            length = 0
        request.parseCookies()
        request.gotLength(length)
        if request.continueAutomatically():
            self._send100Continue()

    def requestComplete(self) -> None:
        """The client ended its request, perhaps with trailers: hand them to the request first."""
        trailers = self._conn.conn.receivedTrailers.pop(self.streamID, None)
        if trailers is not None:
            self._request.requestTrailers = allowedTrailers(trailers)
        super().requestComplete()

    def writeInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Send an informational (1xx) response: a HEADERS frame without END_STREAM."""
        self._conn.sendHeadersNow(self.streamID, [(b":status", b"%d" % status), *fields])

    def endWithHead(self) -> None:
        """
        The response has no body and no trailers: its HEADERS frame ends the stream, one frame instead of
        HEADERS and an empty DATA (what gRPC requires of a trailers-only response).
        """
        self._endWithHead = True

    def writeHead(self, code: int, fields: Sequence[tuple[bytes, bytes]]) -> bool:
        """
        Send the response head now as one HEADERS frame built from C{fields} directly (see
        L{responseFields}); C{False}, and nothing sent, when h2's checks must see the fields.
        """
        head = responseFields(code, fields)
        if head is None:
            return False
        self._conn.sendHeadersNow(self.streamID, head, normalised=True)
        return True

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

    def setTrailers(self, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """End the response with C{fields} as a trailer HEADERS frame, after the last DATA."""
        self._conn.conn.pendingTrailers[self.streamID] = fields


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
    _host: Any = None
    _peer: Any = None
    _secure: bool | None = None

    def __init__(self, limits: ClientLimits, reactor: IReactorTime | None = None) -> None:
        super().__init__(reactor)
        self.conn = _H2State(limits)
        self.priority: Any = _RoundRobin()
        self._resetTokenBurst = self._resetTokens = limits.h2ResetBurst
        self._resetTokenRate = limits.h2ResetRate

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        """Twisted's, with the stream registered before its request is routed."""
        if not self._stillProducing:
            return  # closed by an earlier event of the same read (a reset flood)
        streamID = event.stream_id
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
        super()._requestDone(streamID)

    def _handleWindowUpdate(self, event: h2.events.WindowUpdated) -> None:
        """Twisted's, and wake the send loop: a stream it set aside on a shut window may go on."""
        super()._handleWindowUpdate(event)
        self._wake()

    def _handlePriorityUpdate(self, event: h2.events.PriorityUpdated) -> None:
        """The client sends RFC 7540 priorities: from now on, Twisted's priority tree weighs them."""
        if isinstance(self.priority, _RoundRobin):
            self.priority = self.priority.tree()
        super()._handlePriorityUpdate(event)

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        """Twisted's: queue C{data}, and wake the send loop if the client's window lets it go."""
        self._outboundStreamQueues[streamID].append(data)
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
        self.resetTimeout()
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
        if frameData:
            self.conn.send_data(streamID, frameData)
        if not queue:
            self.priority.block(streamID)
        if self.remainingOutboundWindow(streamID) <= 0:
            self.streams[streamID].flowControlBlocked()
        return len(frameData) or 1
