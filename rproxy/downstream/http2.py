"""
The HTTP/2 server protocol of a client connection: the connection's frames and stream states
(L{rproxy.downstream.h2connection}), a stream object per request that twisted.web's request writes to, and a
send loop that serves the streams in turn under flow control.

Each stream's request head is checked before it becomes an HTTP/1.1 request upstream
(L{rproxy.downstream.h2request}); its body streams to the request with flow control as backpressure (the
client's window is given back only as the upstream takes the body); its response goes out as one HEADERS
frame and DATA frames, the last of which ends the stream (or a trailer HEADERS frame does; a response
without a body is a single HEADERS frame, as gRPC's trailers-only responses must be).  Per connection:

 - C{SETTINGS_MAX_CONCURRENT_STREAMS}: a stream beyond it is refused with REFUSED_STREAM, which a client
   may retry, while the others go on;
 - C{SETTINGS_MAX_HEADER_LIST_SIZE} and the HTTP/1.1 head limits: 431 on the stream; a header list past
   four times the limits is not decoded further (GOAWAY(ENHANCE_YOUR_CALM));
 - Rapid Reset (CVE-2023-44487): a token bucket of the streams a client resets; beyond it,
   GOAWAY(ENHANCE_YOUR_CALM);
 - priorities for more streams than the priority tree holds (CVE-2019-9513): GOAWAY(ENHANCE_YOUR_CALM);
 - response bytes held per stream and per connection bounded by L{STREAM_BUFFER} and L{CONNECTION_BUFFER}
   whatever window the client advertises, and control frames a client makes us queue while it does not
   read bounded by L{CONTROL_BUFFER} (beyond: GOAWAY(ENHANCE_YOUR_CALM));
 - a client that leaves the send buffer full for the write timeout: the connection is aborted; one that
   keeps a stream's flow-control window (or the connection's) shut that long while a response waits: the
   stream is reset (CANCEL), and the other streams go on;
 - floods of frames that carry nothing (L{rproxy.downstream.h2connection.H2FloodError}): a header block of
   more than 32 CONTINUATION frames (CVE-2024-27316), more than 1000 empty DATA frames (CVE-2019-9518):
   GOAWAY(ENHANCE_YOUR_CALM);
 - deadlines: the header timeout for any incomplete frame but DATA and any header block
   (L{rproxy.downstream.h2connection.ServerConnection.pending}), and the idle timeout only while no stream
   is open;
 - connection errors sent with the code the RFCs name, and a close that a client cannot hold off
   (L{CLOSE_GRACE}); a graceful shutdown that lets the streams in flight finish;
 - streams served in turn, a DATA frame each, until a client sends RFC 7540 priorities: then by the
   C{priority} library's tree.

An extended CONNECT (RFC 8441) is answered with 200 and its stream handed to a tunnel
(L{rproxy.tunnel.h2connect}) as a L{rproxy.tunnel.sides.TunnelSide}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import priority
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy import deadline
from rproxy.downstream import h2connection
from rproxy.downstream.h2connection import H2ConnectionError, H2FloodError, ServerConnection
from rproxy.downstream.h2request import H2RequestHead, HeadLimits, requestHead, trailerProblem
from rproxy.errors import ProxyError, clientError
from rproxy.headers import Pairs, allowedTrailers, hasControl, isToken

if TYPE_CHECKING:
    from rproxy.downstream.connection import ClientConnection
    from rproxy.downstream.contract import Producer
    from rproxy.downstream.request import ProxyRequest
    from rproxy.tunnel.sides import TunnelReceiver

_log = Logger()

#: DATA bytes the send loop writes in one reactor turn before letting other work run.
SEND_BUDGET = 262144

#: Response bytes held for one stream, and for all the streams of a connection, before the streams'
#: producers (their upstreams) are paused, whatever flow-control window the client advertises: a client
#: that opens a huge window and then stops reading costs at most this much.
STREAM_BUFFER = 65536
CONNECTION_BUFFER = 1048576

#: Control frames (SETTINGS and PING acknowledgements, WINDOW_UPDATE, RST_STREAM) held for a client that
#: does not read, before its connection is ended (the ping and settings floods of CVE-2019-9512/9515).
CONTROL_BUFFER = 65536

#: Seconds a client has to let a connection close after rproxy's GOAWAY before it is reset (a TLS
#: connection otherwise waits for the client's close_notify, which a hostile client never sends).
CLOSE_GRACE = 3.0

#: How many times the advertised header list size a client may send before its connection is ended
#: (below it, a larger head is refused with 431).
HEADER_LIST_HARD_CAP = 4

#: The method and target a refused request is logged with, when its own cannot be trusted.
_REFUSED = (b"-", b"-")

#: Fields that describe an HTTP/1.1 connection: never sent on HTTP/2 (RFC 9113 section 8.2.2).
_CONNECTION_FIELDS = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"]
)
#: Fields HPACK must never index (what h2's own normalisation does: RFC 7541 section 7.1.3).
_SECRET_FIELDS = frozenset([b"authorization", b"proxy-authorization"])
#: Fields whose every value is new (rproxy's request ids): indexing them would only evict the fields that do
#: repeat (content-type, server, ...) from the client's dynamic table, and cost a table insertion each time.
_UNIQUE_FIELDS = frozenset([b"x-request-id", b"traceparent"])


def responseFields(status: int, fields: Sequence[tuple[bytes, bytes]]) -> list[Any] | None:
    """
    The HEADERS field list of a response head: C{:status}, then C{fields} as RFC 9113 section 8.2 wants
    them (names lowercased, values stripped, connection-specific fields dropped, credentials
    never indexed), in the order given; C{None} when a field is not valid (a name that is not a token, a
    value with NUL, CR or LF).
    """
    head: list[Any] = [(b":status", b"%d" % status)]
    if not fields:
        return head
    names = [name for name, _ in fields]
    if not all(names) or not isToken(b"".join(names)) or hasControl(b"".join([v for _, v in fields])):
        return None
    for name, value in fields:
        name = name.lower()
        if name in _CONNECTION_FIELDS:
            continue
        value = value.strip(b" \t")
        if name in _SECRET_FIELDS or name in _UNIQUE_FIELDS or (name == b"cookie" and len(value) < 20):
            head.append(NeverIndexedHeaderTuple(name, value))
        else:
            head.append((name, value))
    return head


class _RoundRobin:
    """
    The streams of a connection with something to send, served in turn: the scheduler until a client
    sends RFC 7540 priorities (which RFC 9113 deprecated, and that most clients no longer send), when it
    hands its state to a C{priority.PriorityTree}, whose interface it has.
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


@implementer(IPushProducer)
class HTTP2Server:
    """
    The HTTP/2 protocol of one client connection (see the module); the
    L{rproxy.downstream.h2connection.FrameReceiver} of its frames.

    @ivar conn: the connection's frames and stream states.
    @ivar streams: the open streams, by ID.
    @ivar priority: the scheduler of the streams' DATA.
    """

    _paused = False  # the transport's buffer is full: send nothing more until it drains
    _sendScheduled = False  # the send loop runs at the next turn
    _queuedTotal = 0  # response bytes queued, all streams together
    _connectionFull = False  # streams were paused because the connection holds CONNECTION_BUFFER
    _heldControl = b""  # control frames written while the transport is paused
    _headStarted = -1  # which incomplete frame or header block (ServerConnection.started) the deadline is for
    _closing = False  # GOAWAY sent after an error: the connection ends
    _draining = False  # GOAWAY sent for shutdown: close once the last stream ends
    _closer: Any = None  # resets the connection if the client does not let it close
    _idleSince = 0.0  # when the last stream ended (or the connection began)
    _lastBlock: list[Any] | None = None  # the latest request field block, and what it asks for
    _lastHead: H2RequestHead | ProxyError

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        site = connection.site
        self.site = site
        self.transport = connection.transport
        limits = site.limits
        self._limits = limits
        self._reactor = site.reactor
        self.headLimits = HeadLimits(limits.maxHeaders, limits.maxHeaderBytes, limits.h2MaxHeaderListSize)
        self.streams: dict[int, H2Stream] = {}
        self.priority: Any = _RoundRobin()
        self._heads: list[tuple[H2Stream, list[Any], bool]] = []
        self._resetTokens = float(limits.h2ResetBurst)
        self._resetAt = self._reactor.seconds()
        # Announced, and enforced by this protocol: more streams are refused one by one, larger header lists
        # with 431 (beyond HEADER_LIST_HARD_CAP times the limits, the decoder stops).
        conn = self.conn = ServerConnection(
            self,
            {
                h2connection.MAX_CONCURRENT_STREAMS: limits.h2MaxConcurrentStreams,
                h2connection.MAX_HEADER_LIST_SIZE: limits.h2MaxHeaderListSize,
                h2connection.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441: WebSocket (rproxy.tunnel.h2connect)
            },
        )
        conn.decoder.max_header_list_size = HEADER_LIST_HARD_CAP * max(
            limits.h2MaxHeaderListSize, limits.maxHeaderBytes
        )
        self._headDeadline = deadline.Deadline(self._reactor, self._headTimedOut)
        self._idleDeadline = deadline.Deadline(self._reactor, self._idleTimedOut)
        self._idleSince = self._reactor.seconds()
        self._idleDeadline.arm(deadline.IDLE, limits.idleTimeout)
        self._writeDeadline = deadline.Deadline(self._reactor, self._writeTimedOut)
        self.transport.registerProducer(self, True)
        self._flush()

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        conn = self.conn
        try:
            conn.receive(data)
        except H2FloodError as flood:
            _log.warn(
                "client {client} sent {flood}: closed with ENHANCE_YOUR_CALM",
                client=self.connection.peer,
                flood=flood.reason,
            )
            self._goAwayAndClose(ErrorCodes.ENHANCE_YOUR_CALM, flood.reason)
            return
        except H2ConnectionError as error:
            self._connectionError(error)
            return
        if self._closing:
            return
        if conn.pending:
            if conn.started != self._headStarted:
                self._headStarted = conn.started
                self._headDeadline.arm(deadline.HEAD, self._limits.headerTimeout)
        else:
            self._headDeadline.disarm()
        self._flush()

    def requestReceived(self, streamID: int, fields: list[Any], ended: bool) -> None:
        # The streams open count, this one included, and those only the client has still to end (a tunnel's,
        # after its upstream closed): half-closed streams count too (RFC 9113 section 5.1.2).
        if self._draining or self.conn.openStreams > self._limits.h2MaxConcurrentStreams:
            # Beyond the limit, or after the GOAWAY of a shutdown: refused, so the client may send it again.
            self._reset(streamID, ErrorCodes.REFUSED_STREAM)
            return
        try:
            self.priority.insert_stream(streamID)
        except priority.DuplicateStreamError:
            pass  # a PRIORITY frame came first, and priorityReceived inserted it
        except priority.TooManyStreamsError:
            self._treeFull()
            return
        stream = H2Stream(self, streamID)
        self.streams[streamID] = stream
        self.priority.block(streamID)
        stream.headReceived(fields, ended)

    def requestHead(self, block: list[Any]) -> H2RequestHead | ProxyError:
        """
        The request C{block} asks for (L{rproxy.downstream.h2request.requestHead}): the latest one again when
        the decoder gave the very same block again (a repeated request's, see
        L{rproxy.hpackcoding.FieldDecoder.decode}).
        """
        if block is self._lastBlock:
            return self._lastHead
        head = requestHead(block, self.headLimits)
        self._lastBlock, self._lastHead = block, head
        return head

    def bodyReceived(self, streamID: int, data: bytes, size: int) -> None:
        stream = self.streams.get(streamID)
        if stream is None:  # answered already: drop the data, but give the connection's window back
            self._acknowledge(size, streamID)
            return
        stream.dataReceived(data, size)

    def trailersReceived(self, streamID: int, fields: list[Any]) -> None:
        stream = self.streams.get(streamID)
        if stream is not None:
            stream.trailersReceived(fields)

    def streamEnded(self, streamID: int) -> None:
        stream = self.streams.get(streamID)
        if stream is not None:
            stream.clientEnded()

    def streamReset(self, streamID: int, code: int) -> None:
        """A client reset a stream: it ends, and spends a token of the Rapid Reset bucket."""
        stream = self.streams.get(streamID)
        if stream is not None:
            stream.lost(Failure(ConnectionLost(f"Stream reset with code {_codeName(code)}")))
        self._spendResetToken()

    def streamError(self, streamID: int, code: int, reason: str) -> None:
        """
        The connection reset a stream for a frame the client sent on it: as a reset of the client's, it spends
        a token (MadeYouReset, CVE-2025-8671: resets a client provokes are Rapid Reset by other means).
        """
        _log.info(
            "client {client}, stream {stream}: {reason}; reset with {code}",
            client=self.connection.peer,
            stream=streamID,
            reason=reason,
            code=_codeName(code),
        )
        stream = self.streams.get(streamID)
        if stream is not None:
            stream.lost(Failure(ConnectionLost(f"{reason}: stream reset with {_codeName(code)}")))
        self._spendResetToken()

    def _spendResetToken(self) -> None:
        """A stream was reset, by the client or for what it sent: beyond the Rapid Reset budget, GOAWAY."""
        now = self._reactor.seconds()
        limits = self._limits
        self._resetTokens = min(
            limits.h2ResetBurst, self._resetTokens + max(0.0, now - self._resetAt) * limits.h2ResetRate
        )
        self._resetAt = now
        if self._resetTokens < 1:
            _log.warn(
                "client {client} reset streams faster than {rate}/s (burst {burst}): closed with ENHANCE_YOUR_CALM",
                client=self.connection.peer,
                rate=limits.h2ResetRate,
                burst=limits.h2ResetBurst,
            )
            self._goAwayAndClose(ErrorCodes.ENHANCE_YOUR_CALM, "too many stream resets")
        else:
            self._resetTokens -= 1

    def windowOpened(self, streamID: int) -> None:
        """The client opened a window (or changed the initial one): streams set aside on a shut one may send again."""
        if streamID:
            stream = self.streams.get(streamID)
            if stream is not None:
                stream.windowOpened()
        else:
            for stream in list(self.streams.values()):
                stream.windowOpened()
        self.scheduleSend()

    def priorityReceived(self, streamID: int, dependsOn: int, weight: int, exclusive: bool) -> None:
        """The client sends RFC 7540 priorities: from now on, the priority tree weighs them."""
        if isinstance(self.priority, _RoundRobin):
            self.priority = self.priority.tree()
        try:
            try:
                self.priority.reprioritize(
                    stream_id=streamID, depends_on=dependsOn or None, weight=weight, exclusive=exclusive
                )
            except priority.MissingStreamError:
                # A PRIORITY frame before its stream's HEADERS: the stream waits in the tree, blocked.
                self.priority.insert_stream(
                    stream_id=streamID, depends_on=dependsOn or None, weight=weight, exclusive=exclusive
                )
                self.priority.block(streamID)
        except priority.TooManyStreamsError:
            self._treeFull()

    def _treeFull(self) -> None:
        """PRIORITY frames for streams that never open, each kept in the tree (CVE-2019-9513's churn)."""
        _log.warn(
            "client {client} sent priorities for more streams than the priority tree holds: closed with "
            "ENHANCE_YOUR_CALM",
            client=self.connection.peer,
        )
        self._goAwayAndClose(ErrorCodes.ENHANCE_YOUR_CALM, "too many streams in the priority tree")

    def goAwayReceived(self, code: int) -> None:
        """
        The client ends the connection: at once for an error, else (NO_ERROR) once the streams it opened are
        answered (RFC 9113 section 6.8: its GOAWAY names the last stream rproxy opened, and rproxy opens none);
        a stream it opens after its GOAWAY is refused.
        """
        if code == ErrorCodes.NO_ERROR:
            if not self._draining:
                self._draining = True
                if not self.streams:
                    self._drained()
            return
        self._closing = True
        self._fail(Failure(ConnectionLost(f"the client sent GOAWAY({_codeName(code)})")))
        self._close()

    # -- writing

    def _flush(self) -> None:
        """Write the connection's frames, or hold them while the client does not read (within CONTROL_BUFFER)."""
        data = self.conn.take()
        if not data:
            return
        if not self._paused:
            self.transport.write(data)
            return
        self._heldControl += data
        if len(self._heldControl) > CONTROL_BUFFER and not self._closing:
            why = f"the client made the proxy queue {len(self._heldControl)} bytes of frames it does not read"
            _log.warn("client {client}: {reason}; GOAWAY(ENHANCE_YOUR_CALM)", client=self.connection.peer, reason=why)
            self._goAwayAndClose(ErrorCodes.ENHANCE_YOUR_CALM, why)

    def scheduleSend(self) -> None:
        """
        Run the send loop at the next turn, once for everything queued until then: what a response's
        head, body and end queue together then goes out as frames of one write, and the last DATA frame
        ends the stream.
        """
        if not self._sendScheduled and not self._closing:
            self._sendScheduled = True
            self._reactor.callLater(0, self._send)

    def sendHeaders(self, stream: H2Stream, head: list[Any], end: bool) -> None:
        """Queue a HEADERS frame of C{stream} (C{end}: it ends the stream) for the next send."""
        self._heads.append((stream, head, end))
        self.scheduleSend()

    def _send(self) -> None:
        """
        Send the queued HEADERS frames, then DATA from the streams that have some, in turn, as their windows
        allow, until L{SEND_BUDGET} bytes went out (the rest at the next turn), in one write.
        """
        self._sendScheduled = False
        if self._closing:
            return
        conn = self.conn
        heads, self._heads = self._heads, []
        for stream, head, end in heads:
            stream.sendHead(conn, head, end)
        budget = SEND_BUDGET
        scheduler = self.priority
        while budget > 0 and not self._paused and not self._closing:
            try:
                streamID = next(scheduler)
            except priority.DeadlockError:
                break
            budget -= self.streams[streamID].sendFrame(conn)
        else:
            if budget <= 0:
                self.scheduleSend()
        self._flush()

    def queued(self, stream: H2Stream, size: int) -> None:
        """C{size} bytes joined C{stream}'s queue (negative: left it)."""
        self._queuedTotal += size
        if size > 0:
            if self._queuedTotal >= CONNECTION_BUFFER:
                self._connectionFull = True
        elif self._connectionFull and self._queuedTotal <= CONNECTION_BUFFER // 2:
            self._connectionFull = False
            for each in list(self.streams.values()):
                each.windowOpened()

    # -- IPushProducer: the transport's buffer paces the send loop

    def pauseProducing(self) -> None:
        self._paused = True
        timeout = self._limits.writeTimeout
        if timeout and self._writeDeadline.mode != deadline.WRITE:
            self._writeDeadline.arm(deadline.WRITE, timeout)

    def resumeProducing(self) -> None:
        self._paused = False
        self._writeDeadline.disarm()
        held, self._heldControl = self._heldControl, b""
        if held:
            self.transport.write(held)
        self.scheduleSend()

    def stopProducing(self) -> None:
        self._paused = True

    # -- streams ending

    def streamDone(self, stream: H2Stream) -> None:
        """C{stream} is over (answered, reset, or its connection lost): forget it."""
        streamID = stream.streamID
        if self.streams.pop(streamID, None) is None:
            return
        try:
            self.priority.remove_stream(streamID)
        except priority.MissingStreamError:
            pass
        if not self.streams and not self._closing:
            if self._draining:
                self._drained()
            else:
                self._idleSince = self._reactor.seconds()

    def _reset(self, streamID: int, code: int) -> None:
        self.conn.resetStream(streamID, code)  # nothing if it closed meanwhile

    def _acknowledge(self, size: int, streamID: int) -> None:
        """Give the client back C{size} bytes of window (the connection's, and the stream's if open)."""
        self.conn.acknowledge(size, streamID)

    # -- the connection's life: deadlines, errors, closing

    def _headTimedOut(self, mode: int) -> None:
        _log.warn(
            "client {client}: an HTTP/2 frame or header block did not arrive within {timeout:g}s; closing",
            client=self.connection.peer,
            timeout=self._limits.headerTimeout,
        )
        self._goAwayAndClose(ErrorCodes.ENHANCE_YOUR_CALM, "the client was too slow to send a frame", 408)

    def _writeTimedOut(self, mode: int) -> None:
        """The client left the send buffer full for the write timeout: its connection is aborted."""
        error = clientError(408, f"the client read nothing for {self._limits.writeTimeout:g}s")
        _log.warn("client {client}: {reason}; connection aborted", client=self.connection.peer, reason=error.reason)
        self._cutOff(error, answered=False)
        self._closing = True
        self._fail(Failure(ConnectionLost(error.reason)))
        self.transport.abortConnection()

    def _cutOff(self, error: ProxyError, answered: bool) -> None:
        """
        The connection is cut for C{error}: the records of its streams say why, or, without a stream, one of
        its own (C{answered}: the client was told, by a GOAWAY).
        """
        if not self.streams:
            self.site.refused(self.connection.peer, error, answered=answered)
        for stream in self.streams.values():
            stream.request.cutOff(error)

    def _idleTimedOut(self, mode: int) -> None:
        """
        The idle timer ran out: if the connection had no stream for the idle timeout, GOAWAY and close;
        else wait again.  (The timer is not moved at each stream's start and end, which would cost timer
        operations per request: it only ever fires late, and looks.)
        """
        timeout = self._limits.idleTimeout
        idle = self._reactor.seconds() - self._idleSince
        if self.streams or idle < timeout:
            self._idleDeadline.arm(deadline.IDLE, timeout if self.streams else timeout - idle)
            return
        _log.info(
            "client {client}: HTTP/2 connection idle for {timeout:g}s; closing",
            client=self.connection.peer,
            timeout=timeout,
        )
        self._goAwayAndClose(ErrorCodes.NO_ERROR, "idle timeout")

    def _connectionError(self, error: H2ConnectionError) -> None:
        """A broken frame: GOAWAY with the code the RFCs name, then close."""
        code = error.code
        _log.warn(
            "client {client}: HTTP/2 connection error {code}: {error}",
            client=self.connection.peer,
            code=code.name,
            error=error.reason,
        )
        self._closing = True
        self._record(code, error.reason, 429 if code == ErrorCodes.ENHANCE_YOUR_CALM else 400)
        self.conn.goAway(code)
        self._writeLast(self.conn.take())
        self._fail(Failure(error))
        self._close()

    def _goAwayAndClose(self, code: int, why: str, status: int = 429) -> None:
        """
        End the connection with GOAWAY(C{code}); unless it is a clean close, record the refusal as C{status}
        (429 for a flood, 408 for a client too slow, as HTTP/1.1 answers one).
        """
        self._closing = True
        if code != ErrorCodes.NO_ERROR:
            self._record(code, why, status)
        self.conn.goAway(code)
        self._writeLast(self.conn.take())
        self._fail(Failure(ConnectionLost(why)))
        self._close()

    def _record(self, code: int, why: str, status: int) -> None:
        """
        The connection is refused for what the client did (a GOAWAY with an error code): the records of its
        streams say why, or, without a stream, a record of its own, for the access log and the metrics, with
        C{status} for its kind (400 a protocol error, 408 too slow, 429 a flood).
        """
        self._cutOff(clientError(status, f"HTTP/2 connection closed with GOAWAY {_codeName(code)}: {why}"), True)

    def _writeLast(self, data: bytes) -> None:
        """Write what is held and C{data}, the connection's last frames, whether the client reads or not."""
        held, self._heldControl = self._heldControl, b""
        if held or data:
            self.transport.write(held + data)

    def _fail(self, reason: Failure) -> None:
        """Every stream is over: their requests hear why."""
        for stream in list(self.streams.values()):
            stream.lost(reason)

    def _close(self, grace: float | None = CLOSE_GRACE) -> None:
        """
        Close once what is written is sent; reset after C{grace} seconds if still open (C{None}: wait, as
        a shutdown does, which has its own grace period).
        """
        self.conn.stopReading()
        self._headDeadline.stop()
        self._idleDeadline.stop()
        transport = self.transport
        transport.unregisterProducer()  # else TLS would wait for this producer before its close_notify
        transport.loseConnection()
        if grace is not None and self._closer is None:
            self._closer = self._reactor.callLater(grace, transport.abortConnection)

    def drain(self) -> None:
        """
        Shutdown: GOAWAY now, so the client opens no new stream, and close once the streams in flight
        have ended.
        """
        if self._draining or self._closing:
            return
        self._draining = True
        self.conn.goAway(ErrorCodes.NO_ERROR)
        self._flush()
        if not self.streams:
            self._drained()

    def _drained(self) -> None:
        """The last stream of a draining connection ended: close it."""
        self._closing = True
        self._writeLast(self.conn.take())
        self._close(None)

    def connectionLost(self, reason: Failure) -> None:
        self._closing = True
        self._headDeadline.stop()
        self._idleDeadline.stop()
        self._writeDeadline.stop()
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        self._fail(reason)


def _codeName(code: int) -> str:
    """An HTTP/2 error code's name, or its number if it has none."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


@implementer(IPushProducer)
class H2Stream:
    """
    One request and its response on an HTTP/2 connection: the channel twisted.web's request writes to
    (and the L{RequestChannel} of L{ProxyRequest}), and, after an extended CONNECT, a tunnel's side.

    @ivar trailers: the trailer fields the client sent after its body.
    """

    upgradable = False
    trailers: Pairs = []
    extendedConnect: bytes | None = None
    _producer: Producer | None = None
    _producerPaused = False
    _paused = False  # the request's body pipe paused it: the client's DATA waits, unacknowledged
    _held: deque[tuple[bytes, int]] | None = None  # DATA received while paused, with its flow-controlled size
    _heldEnd = False  # the client ended the stream while it was paused
    _headPending: list[Any] | None = None  # a bodiless response's head, sent with END_STREAM at the end
    _ending = False  # the response is complete: END_STREAM once the queue is sent
    _endTrailers: Any = None  # the trailers that end the response
    _clientDone = False  # the client ended its side
    _done = False
    _tunnel: TunnelReceiver | None = None
    _stall: deadline.Deadline | None = None  # made when the client first shuts its window on a response
    #: The code of the RST_STREAM that ends the response instead of END_STREAM: PROTOCOL_ERROR after the
    #: 400 that answers a malformed request (RFC 9113 section 8.1.1 makes it a stream error, and lets a
    #: response go first).
    _resetCode: int | None = None

    def __init__(self, server: HTTP2Server, streamID: int) -> None:
        self.server = server
        self.streamID = streamID
        self.site = self.factory = server.site
        self.transport = server.transport
        self.bodySource = self
        self._queue: deque[bytes] = deque()
        self._queuedBytes = 0
        self.request = cast("ProxyRequest", server.site.requestFactory(self))

    # -- the request's head and body, from the client

    def headReceived(self, block: list[tuple[bytes, bytes]], ended: bool) -> None:
        """Give the request its head (routing it), or the reason it is refused; C{ended}: there is no body."""
        request = self.request
        request.clientproto = b"HTTP/2"
        head = self.server.requestHead(block)
        if not isinstance(head, ProxyError) and ended and head.length:
            # RFC 9113 section 8.1.1: no DATA will come to make up the declared length.
            head = clientError(400, f"content-length {head.length} on a request that ended with its HEADERS")
        if isinstance(head, ProxyError):
            request.method, request.uri = _REFUSED
            self._malformed(head)
            request.gotLength(0, head)
            return
        request.method, request.uri = head.method, head.target
        add = request.requestHeaders.addRawHeader
        for name, value in head.fields:
            add(name, value)
        length = head.length
        if length is not None:
            self.server.conn.expect(self.streamID, length)  # a body of another length is a connection error
        if head.protocol is not None:
            # Its DATA is a tunnel's (rproxy.tunnel.h2connect), not a body: held, unacknowledged, until it opens.
            self.extendedConnect = head.protocol
            length = 0
            self.pauseProducing()
        elif length is None and (ended or head.method in (b"GET", b"HEAD")):
            length = 0
        request.parseCookies()
        request.gotLength(length)  # (a HEADERS frame that ends the stream is followed by its StreamEnded)

    def _malformed(self, error: ProxyError) -> None:
        """The request is malformed (a 400, not a limit's 431): its response ends with RST_STREAM(PROTOCOL_ERROR)."""
        if error.status == 400:
            self._resetCode = ErrorCodes.PROTOCOL_ERROR

    def dataReceived(self, data: bytes, size: int) -> None:
        if self._paused:
            if self._held is None:
                self._held = deque()
            self._held.append((data, size))
            return
        self._deliver(data)
        self.server._acknowledge(size, self.streamID)

    def _deliver(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.dataReceived(data)
        elif data:
            self.request.handleContentChunk(data)

    def trailersReceived(self, block: list[tuple[bytes, bytes]]) -> None:
        """The client's trailers: kept for the end of the body, or, malformed, the body is refused."""
        problem = trailerProblem(block)
        if problem is not None:
            error = clientError(400, problem)
            self._malformed(error)
            self.request.refuseBody(error)
            return
        self.trailers = allowedTrailers(block)

    def clientEnded(self) -> None:
        """The client sent END_STREAM (after its trailers, if any)."""
        self._clientDone = True
        if self._paused:
            self._heldEnd = True
            return
        self._endOfBody()

    def _endOfBody(self) -> None:
        if self._tunnel is not None:
            self._tunnel.readConnectionLost()
            return
        request = self.request
        if not self._done and not request.finished:
            request.requestTrailers = self.trailers
            request.requestReceived(request.method, request.uri, b"HTTP/2")

    # -- IPushProducer: what the request body's pipe (or a tunnel) pauses

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        held, self._held = self._held, None
        size = 0
        while held:
            data, length = held.popleft()
            size += length
            self._deliver(data)
            if self._paused:  # paused again: keep the rest
                self._held = held
                break
        self.server._acknowledge(size, self.streamID)
        if self._heldEnd and not self._paused:
            self._heldEnd = False
            self._endOfBody()
        self.server._flush()

    def stopProducing(self) -> None:
        """The body's reader (or the tunnel's other side) is gone."""
        if self._tunnel is not None:
            self.abortConnection()
        else:
            self.resumeProducing()  # read and drop what the client still sends

    # -- the response, from twisted.web's request

    @property
    def connection(self) -> ClientConnection:
        """The client connection the stream is on."""
        return self.server.connection

    def getPeer(self) -> Any:
        return self.server.connection.peer

    def getHost(self) -> Any:
        return self.server.connection.host

    def isSecure(self) -> bool:
        return self.server.connection.secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """The head twisted.web's request writes (a local resource's, or the proxy's when writeHead declined)."""
        fields = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
        head = responseFields(int(code), fields)
        self._sendHeaders(head if head is not None else [(b":status", code)], False)

    def _sendHeaders(self, head: list[Any], end: bool) -> None:
        """Send a HEADERS frame with the connection's next send (in order with the stream's DATA)."""
        if not self._done:
            self.server.sendHeaders(self, head, end)

    def write(self, data: bytes) -> None:
        if self._done or not data or self._ending:
            return
        self._queue.append(data)
        size = len(data)
        self._queuedBytes += size
        server = self.server
        server.queued(self, size)
        if self._window() > 0:
            server.priority.unblock(self.streamID)
            server.scheduleSend()
        else:
            self._windowShut()
        if self._producer is not None and not self._producerPaused and self._mayQueue() <= 0:
            self._producerPaused = True
            self._producer.pauseProducing()

    def writeSequence(self, data: Sequence[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def _mayQueue(self) -> int:
        """What the stream may still queue before its producer is paused."""
        server = self.server
        return min(
            self._window() - self._queuedBytes,
            STREAM_BUFFER - self._queuedBytes,
            CONNECTION_BUFFER - server._queuedTotal,
        )

    def _window(self) -> int:
        """
        What the client's flow control lets the stream send now: 0 once h2 has closed the stream, as when a
        RST_STREAM was read with the HEADERS in one read and the request is answered before the reset's event.
        """
        return max(0, self.server.conn.window(self.streamID) or 0)

    def windowOpened(self) -> None:
        """A window opened, or the connection's buffer drained: the producer may go on, and DATA may go."""
        stall = self._stall
        if stall is not None and (self.server.conn.window(self.streamID) or 0) > 0:
            stall.disarm()
        if self._queue or self._ending:
            self.server.priority.unblock(self.streamID)
        if self._producerPaused and self._mayQueue() > 0:
            self._producerPaused = False
            if self._producer is not None:
                self._producer.resumeProducing()

    def sendHead(self, conn: ServerConnection, head: list[Any], end: bool) -> None:
        """Send a HEADERS frame the stream queued (C{end}: it is the whole response)."""
        if self._done:
            return
        if not conn.sendHeaders(self.streamID, head, end and self._resetCode is None):
            self._abandon()  # the client reset the stream meanwhile
            return
        if end:
            self._ended()

    def sendFrame(self, conn: ServerConnection) -> int:
        """Send one DATA frame from the queue (the last ends the stream); return what it cost the budget."""
        streamID = self.streamID
        queue = self._queue
        if not queue:
            self.server.priority.block(streamID)
            if self._ending:
                self._end(conn)
            return 1
        window = conn.window(streamID)
        if window is None:
            self._abandon()  # the client reset it
            return 1
        window = min(conn.maxFrameSize, window)
        if window <= 0:
            # The client's window is shut: the stream waits for its WINDOW_UPDATE (windowOpened).
            self.server.priority.block(streamID)
            self._windowShut()
            return 1
        data = queue.popleft()
        if len(data) > window:
            queue.appendleft(data[window:])
            data = data[:window]
        size = len(data)
        self._queuedBytes -= size
        last = not queue and self._ending and self._endTrailers is None
        if not conn.sendData(streamID, data, last and self._resetCode is None):
            self._abandon()
            return 1
        self.server.queued(self, -size)
        if last:
            self._ended()
        elif not queue:
            self.server.priority.block(streamID)
            if self._ending:
                self._end(conn)
        if self._producerPaused and self._queuedBytes <= STREAM_BUFFER // 2 and self._mayQueue() > 0:
            self._producerPaused = False
            if self._producer is not None:
                self._producer.resumeProducing()
        return size

    def _end(self, conn: ServerConnection) -> None:
        """The queue is sent: end the stream, with trailers if there are some."""
        if self._endTrailers is not None:
            sent = conn.sendHeaders(self.streamID, self._endTrailers, True)
        else:
            sent = self._resetCode is not None or conn.sendData(self.streamID, b"", True)
        if not sent:
            self._abandon()
            return
        self._ended()

    def _ended(self) -> None:
        """The response is out: stop the client sending a body nobody reads, and forget the stream."""
        if self._resetCode is not None:
            # A malformed request's reset spends a token of the Rapid Reset budget, as the client's own
            # would (MadeYouReset: malformed trailers would otherwise start and cancel upstream requests
            # without bound).
            self.server._reset(self.streamID, self._resetCode)
            self.server._spendResetToken()
        elif not self._clientDone and self._tunnel is None:
            self.server._reset(self.streamID, ErrorCodes.NO_ERROR)  # RFC 9113 section 8.1
        self._finish(Failure(ConnectionDone("the stream ended")))

    def registerProducer(self, producer: Producer, streaming: bool) -> None:
        self._producer = producer
        self._producerPaused = False
        if self._mayQueue() <= 0:
            self._producerPaused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producerPaused = False

    def requestDone(self, request: Any) -> None:
        """The response is complete: END_STREAM once the queue is sent."""
        self._endResponse()

    def loseConnection(self) -> None:
        """What twisted.web's request means by it: the response ends here."""
        self._endResponse()

    def _endResponse(self) -> None:
        if self._done or self._ending:
            return
        self._ending = True
        head, self._headPending = self._headPending, None
        if head is not None:
            if self._endTrailers is None and not self._queue:
                self._sendHeaders(head, True)  # one HEADERS frame is the whole response
                return
            self._sendHeaders(head, False)
        self.server.priority.unblock(self.streamID)
        self.server.scheduleSend()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """What twisted.web's request calls when a form body does not parse."""
        self.abort()

    # -- RequestChannel

    def writeHead(
        self, request: Any, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool
    ) -> bool:
        """
        Send the response head as one HEADERS frame built from C{fields} directly; without a body, the
        head waits for the end of the response, so that one HEADERS frame ends the stream.  C{False} when
        twisted.web's path must do it (cookies, Last-Modified or ETag set on the request, or fields that are
        not valid).
        """
        if request.cookies or (request.lastModified or request.etag) is not None:
            return False
        own = [(name, value) for name, values in request.responseHeaders.getAllRawHeaders() for value in values]
        head = responseFields(status, [*own, *fields] if own else fields)
        if head is None:
            return False
        request.setResponseCode(status, reason)
        request.startedWriting = 1
        if hasBody:
            self._sendHeaders(head, False)
        else:
            self._headPending = head
        return True

    def writeInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Send an informational (1xx) response: a HEADERS frame without END_STREAM."""
        head = responseFields(status, fields)
        if head is not None:
            self._sendHeaders(head, False)

    def writeTrailers(self, request: Any, trailers: Sequence[tuple[bytes, bytes]]) -> bool:
        """End the response with C{trailers}: a HEADERS frame with END_STREAM, after the last DATA."""
        fields = responseFields(0, trailers)
        if fields is None:
            return False
        self._endTrailers = fields[1:]
        return True

    def abort(self) -> None:
        """Reset the stream."""
        self.abortConnection()

    def stopKeepAlive(self, request: Any) -> None:
        """Nothing: other streams go on, and a stream answered before its body ended is reset anyway."""

    def sendContinue(self) -> None:
        self._sendHeaders([(b":status", b"100")], False)

    def switchProtocols(self, request: Any, status: int, fields: Sequence[tuple[bytes, bytes]]) -> H2Stream:
        """Answer the extended CONNECT with C{status} (no END_STREAM), and hand the stream to a tunnel."""
        head = responseFields(status, fields) or [(b":status", b"%d" % status)]
        self._sendHeaders(head, False)
        return self

    # -- TunnelSide (after an extended CONNECT)

    halfCloses = True

    def attach(self, receiver: TunnelReceiver) -> bytes:
        """Deliver the client's DATA to C{receiver}; what it sent early waits, unacknowledged, in the stream."""
        self._tunnel = receiver
        if self._clientDone and not self._paused:
            receiver.readConnectionLost()
        return b""

    def loseWriteConnection(self) -> None:
        """End the stream (END_STREAM) once what is written is sent."""
        self.unregisterProducer()  # a paused producer would hold the end back
        self._endResponse()

    def abortConnection(self) -> None:
        """Reset the stream (CONNECT_ERROR for a tunnel, RFC 9113 section 8.5; CANCEL otherwise)."""
        if self._done:
            return
        code = ErrorCodes.CONNECT_ERROR if self._tunnel is not None else ErrorCodes.CANCEL
        self.server._reset(self.streamID, code)
        self.server._flush()
        self._finish(Failure(ConnectionLost("the stream was reset")))

    # -- the end

    def lost(self, reason: Failure) -> None:
        """The client reset the stream, or the connection is gone."""
        self._finish(reason)

    def _abandon(self) -> None:
        self._finish(Failure(ConnectionLost("the stream was closed")))

    def _windowShut(self) -> None:
        """The client's window is shut while the response waits: it has the write timeout to open it."""
        server = self.server
        timeout = server._limits.writeTimeout
        if not timeout:
            return
        stall = self._stall
        if stall is None:
            stall = self._stall = deadline.Deadline(server._reactor, self._stalled)
        if stall.mode != deadline.WRITE:
            stall.arm(deadline.WRITE, timeout)

    def _stalled(self, mode: int) -> None:
        timeout = self.server._limits.writeTimeout
        error = clientError(408, f"the client kept its flow-control window shut for {timeout:g}s")
        _log.warn(
            "client {client}, stream {stream}: {reason}; stream reset",
            client=self.server.connection.peer,
            stream=self.streamID,
            reason=error.reason,
        )
        self.request.cutOff(error)
        self.abortConnection()

    def _finish(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        if self._stall is not None:
            self._stall.stop()
        held, self._held = self._held, None
        if held:  # DATA nobody will read: the connection's window gets it back (the stream's is gone)
            self.server._acknowledge(sum(size for _, size in held), self.streamID)
        if self._queuedBytes:
            self.server.queued(self, -self._queuedBytes)
            self._queuedBytes = 0
        self._queue.clear()
        self.server.streamDone(self)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.connectionLost(reason)
        request = self.request
        if not request.finished:
            request.connectionLost(reason)
