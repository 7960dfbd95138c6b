"""
The HTTP/2 connection of a client, as the server side sees it: the frames the client sends, read and checked
(RFC 9113 sections 4 to 6), each stream's state (section 5.1), flow control both ways (section 5.2), and the
frames rproxy sends, built as bytes.  L{rproxy.downstream.http2} is the protocol that uses it: it calls the
C{send} methods, and this module calls its L{FrameReceiver} methods as frames arrive.

Why not the h2 library, which the upstream side still uses: h2 makes objects of every frame, runs an event
through a state machine per stream for each, and returns a list of event objects; measured in isolation, that
was 55 to 65 us of one request and its response, the largest part of what HTTP/2 cost over HTTP/1.1.  A
server's side of the protocol is smaller than what h2 covers (no push, no stream of its own, no settings to
synchronise: rproxy's settings are the defaults but three, which apply at once), and this module reads a frame
header with one C{struct} call and calls the receiver directly.  HPACK is L{rproxy.hpackcoding}'s.

What a client gets for a broken frame, with the code the RFCs name: a stream error, RST_STREAM, for DATA or
HEADERS on a stream the client had ended (STREAM_CLOSED) and a WINDOW_UPDATE that takes a stream's window past
2^31-1 (FLOW_CONTROL_ERROR), which the protocol hears of (L{FrameReceiver.streamError}: such resets count
against the client's reset budget, MadeYouReset, CVE-2025-8671); RST_STREAM(STREAM_CLOSED) too for a frame
on a stream closed so long ago that its end is forgotten; otherwise a connection error (L{H2ConnectionError}),
which the protocol answers with GOAWAY and a close.  Where RFC 9113 lets a receiver choose a stream error or
a connection error for anything else, this module chooses the connection error: only a client that breaks
the protocol meets one.  Frames a client may still send on a stream that rproxy reset are ignored (section
5.4.2), their DATA given back to the connection's window.

What a protocol needs besides the frames, as the frames are read (nothing is parsed twice):
 - L{ServerConnection.pending} and L{ServerConnection.started}: whether something other than request body
   is incomplete (the preface, a frame that is not DATA, a header block waiting for its CONTINUATION), and a
   count that changes when such a thing begins, for a deadline that runs from its first byte;
 - floods of frames that carry nothing, refused before they are buffered (L{H2FloodError}): a header block of
   more than L{MAX_CONTINUATIONS} CONTINUATION frames (CVE-2024-27316), more than L{MAX_EMPTY_DATA} empty DATA
   frames that do not end their stream (CVE-2019-9518).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Protocol

import hpack
from h2.errors import ErrorCodes

from rproxy.hpackcoding import FieldDecoder, FieldEncoder

#: What opens a client's byte stream before its first frame (RFC 9113 section 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
#: Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

#: Settings (RFC 9113 section 6.5.2, RFC 8441 section 3).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
ENABLE_CONNECT_PROTOCOL = 0x8

#: The flow-control window of a stream and of a connection before any WINDOW_UPDATE or SETTINGS, and the
#: largest a window may be (RFC 9113 section 6.9).
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
#: The largest frame payload a client may send (rproxy keeps SETTINGS_MAX_FRAME_SIZE's initial value), and
#: the bounds of what it may allow rproxy to send.
FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

#: CONTINUATION frames a header block may have: a block of the largest allowed size needs a handful; more is
#: the CONTINUATION flood of CVE-2024-27316, refused before the frames are buffered.
MAX_CONTINUATIONS = 32
#: DATA frames that carry nothing and end nothing a connection may send: no client needs them, and a flood of
#: them costs the proxy a frame's work each for nothing (the empty frames flood of CVE-2019-9518).
MAX_EMPTY_DATA = 1000
#: Closed streams whose end is remembered, to tell the frames in flight when rproxy reset one (ignored) from
#: a client's frames on a stream it ended (a connection error).  Frames in flight arrive within a round trip.
MAX_CLOSED_STREAMS = 1024

#: A frame header: length and type in one word, flags, stream ID (whose top bit is reserved).
_HEADER = struct.Struct(">IBI")
_STREAM_MASK = 0x7FFFFFFF
_SETTING = struct.Struct(">HI")
_PRIORITY = struct.Struct(">IB")
_GOAWAY = struct.Struct(">II")
_WORD = struct.Struct(">I")

#: How a remembered stream closed.
_ENDED, _RESET_BY_US, _RESET_BY_CLIENT = range(3)


class H2ConnectionError(Exception):
    """
    A client broke the protocol: its connection ends with GOAWAY(C{code}).

    @ivar code: the error code RFC 9113 or RFC 7541 names.
    @ivar reason: what the client did, in a line for the log.
    """

    def __init__(self, code: ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class H2FloodError(H2ConnectionError):
    """A client sent a flood of frames that carry nothing: its connection ends with ENHANCE_YOUR_CALM."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCodes.ENHANCE_YOUR_CALM, reason)


class FrameReceiver(Protocol):
    """What a L{ServerConnection} tells its protocol, in the order of the client's frames."""

    def requestReceived(self, streamID: int, fields: list[Any], ended: bool) -> None:
        """A new stream's request head (C{ended}: the HEADERS frame ended the stream; L{streamEnded} follows)."""

    def bodyReceived(self, streamID: int, data: bytes, size: int) -> None:
        """Body C{data} of an open stream; C{size} is what it took of the windows (padding included)."""

    def trailersReceived(self, streamID: int, fields: list[Any]) -> None:
        """The trailer fields that end a stream (L{streamEnded} follows)."""

    def streamEnded(self, streamID: int) -> None:
        """The client ended its side of the stream (END_STREAM)."""

    def streamReset(self, streamID: int, code: int) -> None:
        """The client reset an open stream."""

    def streamError(self, streamID: int, code: int, reason: str) -> None:
        """The connection reset an open stream (RST_STREAM(C{code})) for a frame the client sent on it."""

    def windowOpened(self, streamID: int) -> None:
        """A stream's send window grew (0: the connection's, or every stream's, by SETTINGS)."""

    def priorityReceived(self, streamID: int, dependsOn: int, weight: int, exclusive: bool) -> None:
        """RFC 7540 priority for an open or idle stream (weight 1 to 256)."""

    def goAwayReceived(self, code: int) -> None:
        """The client sent GOAWAY (an error code but NO_ERROR: nothing more is read)."""


class _Stream:
    """One open stream's state: each side open or ended, and both directions' windows."""

    __slots__ = ("sendWindow", "receiveWindow", "unacknowledged", "remoteOpen", "localOpen", "expected", "received")

    def __init__(self, sendWindow: int) -> None:
        self.sendWindow = sendWindow
        self.receiveWindow = DEFAULT_WINDOW
        self.unacknowledged = 0  # bytes the protocol consumed that the client has not been given back
        self.remoteOpen = True
        self.localOpen = True
        self.expected: int | None = None  # the body length content-length declares
        self.received = 0


def frame(kind: int, flags: int, streamID: int, payload: bytes = b"") -> bytes:
    """One frame, as bytes."""
    return _HEADER.pack(len(payload) << 8 | kind, flags, streamID) + payload


def _giveBack(processed: int, window: int) -> int:
    """
    How much of C{processed} bytes, consumed and not yet given back, a WINDOW_UPDATE gives back now, when the
    client has C{window} left: all of it once it is half a default window (one WINDOW_UPDATE per 32 KiB, as
    h2 and nginx send), or once it is 1 KiB and the window is nearly shut; else none yet.
    """
    if processed >= DEFAULT_WINDOW // 2 or (window < 1024 and processed >= 1024):
        return processed
    return 0


class ServerConnection:
    """
    The server side of one HTTP/2 connection (see the module).

    @ivar encoder: the HPACK encoder of the fields rproxy sends.
    @ivar decoder: the HPACK decoder of the fields the client sends.
    @ivar highestStreamID: the highest stream the client has opened.
    @ivar maxFrameSize: the largest frame payload the client allows rproxy to send.
    @ivar pending: see the module.
    @ivar started: see the module.
    """

    highestStreamID = 0
    maxFrameSize = FRAME_SIZE
    pending = True
    started = 0
    _stopped = False  # GOAWAY sent: the frames still buffered are not read
    _prefaceDone = False
    _settingsDone = False  # the client's first frame, its SETTINGS, arrived
    _counted = False  # the frame at the start of the buffer was counted when its header arrived
    _headerBegun = False  # the buffer holds the first bytes of a frame header, counted in started
    _buffered = -1  # the type of the frame at the start of the buffer (-1: none, or its header is incomplete)
    _emptyData = 0
    _continuations = 0
    _blockStream = 0  # the stream whose header block is open, or 0
    _blockEnded = False  # that block's HEADERS frame ended the stream
    _blockPriority: tuple[int, int, bool] | None = None

    def __init__(self, receiver: FrameReceiver, settings: dict[int, int]) -> None:
        """
        @param settings: what rproxy's SETTINGS frame announces beyond the defaults (the values are not
            enforced here: the concurrent streams, against L{openStreams}, and the header list sizes are the
            protocol's).
        """
        self.receiver = receiver
        self.encoder = FieldEncoder()
        self.decoder = FieldDecoder()
        self._streams: dict[int, _Stream] = {}
        self._closed: dict[int, int] = {}
        self._out: list[bytes] = []
        self._buffer = b""
        self._block: list[bytes] = []
        self._initialWindow = DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self._sendWindow = DEFAULT_WINDOW  # the connection's, for what rproxy sends
        self._receiveWindow = DEFAULT_WINDOW
        self._unacknowledged = 0
        payload = b"".join(_SETTING.pack(key, value) for key, value in settings.items())
        self._out.append(frame(SETTINGS, 0, 0, payload))

    # -- reading

    def receive(self, data: bytes) -> None:
        """
        Read C{data}, the next bytes from the client, calling the receiver for each complete frame.

        @raise H2ConnectionError: the client broke the protocol; nothing more is read.
        """
        if self._stopped:
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos, end = 0, len(data)
        if not self._prefaceDone:
            if end < len(PREFACE):
                if not PREFACE.startswith(data):
                    raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
                self._buffer = data
                return
            if not data.startswith(PREFACE):
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
            self._prefaceDone = True
            pos = len(PREFACE)
        unpack = _HEADER.unpack_from
        while end - pos >= 9:
            word, flags, streamID = unpack(data, pos)
            length = word >> 8
            kind = word & 0xFF
            if not self._counted:
                self._frameBegins(length, kind, flags)
            if end - pos - 9 < length:
                self._counted = True
                self._buffered = kind
                break
            self._headerBegun = False
            self._counted = False
            self._buffered = -1
            payload = data[pos + 9 : pos + 9 + length]
            pos += 9 + length
            streamID &= _STREAM_MASK
            if self._blockStream:
                if kind != CONTINUATION:
                    raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "another frame within a header block")
                self._continuation(flags, streamID, payload)
            elif kind == HEADERS:
                self._headers(flags, streamID, payload)
            elif kind == DATA:
                self._data(flags, streamID, payload)
            elif kind == WINDOW_UPDATE:
                self._windowUpdate(streamID, payload)
            elif kind == SETTINGS:
                self._settings(flags, streamID, payload)
            elif kind == RST_STREAM:
                self._rstStream(streamID, payload)
            elif kind == PING:
                self._ping(flags, streamID, payload)
            elif kind == PRIORITY:
                self._priority(streamID, payload)
            elif kind == GOAWAY:
                self._goAway(streamID, payload)
            elif kind == CONTINUATION:
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without a header block")
            elif kind == PUSH_PROMISE:
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "a client cannot push (PUSH_PROMISE)")
            # other types are extensions, ignored (RFC 9113 section 5.5)
            if self._stopped:
                return
        if pos < end:
            self._buffer = data[pos:]
            if end - pos < 9 and not self._headerBegun and not self._blockStream:
                # the first bytes of a frame header: something begins here (unless within a header block,
                # whose deadline runs from its HEADERS), even if it turns out to be DATA
                self._headerBegun = True
                self.started += 1
        self.pending = (
            (bool(self._buffer) and self._buffered != DATA) or bool(self._blockStream) or not self._prefaceDone
        )

    def _frameBegins(self, length: int, kind: int, flags: int) -> None:
        """A frame's header arrived: its size, what it starts, and the floods, checked before its payload."""
        if length > FRAME_SIZE:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, f"a frame of {length} bytes, over {FRAME_SIZE}")
        if not self._settingsDone:
            if kind != SETTINGS or flags & ACK:
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "the preface was not followed by SETTINGS")
            self._settingsDone = True
        if kind == CONTINUATION:
            self._continuations += 1
            if self._continuations > MAX_CONTINUATIONS:
                raise H2FloodError(f"a header block of more than {MAX_CONTINUATIONS} CONTINUATION frames")
            return
        if not self._headerBegun:
            self.started += 1
        if kind == HEADERS:
            self._continuations = 0
        elif kind == DATA and not length and not flags & END_STREAM:
            self._emptyData += 1
            if self._emptyData > MAX_EMPTY_DATA:
                raise H2FloodError(f"more than {MAX_EMPTY_DATA} empty DATA frames")

    def _headers(self, flags: int, streamID: int, payload: bytes) -> None:
        if not streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")
        priority = None
        if flags & PRIORITY_FLAG:
            start = 1 if flags & PADDED else 0  # the pad length comes first, then the priority (section 6.2)
            if len(payload) < start + 5:
                raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            priority = self._readPriority(streamID, payload[start : start + 5])
            payload = payload[:start] + payload[start + 5 :]
        if flags & PADDED:
            payload = _unpadded(payload)
        if flags & END_HEADERS:
            self._headerBlock(streamID, bool(flags & END_STREAM), payload, priority)
            return
        self._blockStream = streamID
        self._blockEnded = bool(flags & END_STREAM)
        self._blockPriority = priority
        self._block = [payload]

    def _continuation(self, flags: int, streamID: int, payload: bytes) -> None:
        if streamID != self._blockStream:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION on another stream than its HEADERS")
        self._block.append(payload)
        if flags & END_HEADERS:
            block, self._block = b"".join(self._block), []
            self._blockStream = 0
            self._headerBlock(streamID, self._blockEnded, block, self._blockPriority)

    def _headerBlock(self, streamID: int, ended: bool, block: bytes, priority: tuple[int, int, bool] | None) -> None:
        """A complete header block: decoded whatever its stream (HPACK's tables are the connection's), then read."""
        try:
            fields = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as error:
            why = f"a header list beyond every limit: {error}"
            raise H2ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, why) from None
        except hpack.HPACKError as error:
            why = f"a field block that does not decode: {error}"
            raise H2ConnectionError(ErrorCodes.COMPRESSION_ERROR, why) from None
        receiver = self.receiver
        stream = self._streams.get(streamID)
        if stream is not None:
            if not stream.remoteOpen:
                self._streamError(streamID, ErrorCodes.STREAM_CLOSED, "HEADERS on a stream the client had ended")
                return
            if not ended:
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "trailers (a second HEADERS) without END_STREAM")
            self._checkLength(streamID, stream)
            self._remoteEnded(streamID, stream)
            receiver.trailersReceived(streamID, fields)
            receiver.streamEnded(streamID)
            return
        if streamID <= self.highestStreamID:
            how = self._closed.get(streamID)
            if how == _RESET_BY_US:
                return  # in flight as rproxy reset the stream
            if how is None:  # never opened, or forgotten: a new stream cannot have a lower ID (section 5.1.1)
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"HEADERS opening stream {streamID}, below another")
            raise H2ConnectionError(ErrorCodes.STREAM_CLOSED, f"HEADERS on stream {streamID}, which was closed")
        if not streamID & 1:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"a client opened stream {streamID}, an even number")
        self.highestStreamID = streamID
        stream = self._streams[streamID] = _Stream(self._initialWindow)
        if ended:
            stream.remoteOpen = False
        receiver.requestReceived(streamID, fields, ended)
        if streamID not in self._streams:
            return  # refused
        if priority is not None:
            receiver.priorityReceived(streamID, *priority)
        if ended:
            self._checkLength(streamID, stream)
            receiver.streamEnded(streamID)

    def _data(self, flags: int, streamID: int, payload: bytes) -> None:
        if not streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        if size > self._receiveWindow:
            raise H2ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self._receiveWindow -= size
        data = _unpadded(payload) if flags & PADDED else payload
        stream = self._streams.get(streamID)
        if stream is None or not stream.remoteOpen:
            self._consumed(size)  # nobody reads it: the connection's window is given back at once
            if stream is not None:
                self._streamError(streamID, ErrorCodes.STREAM_CLOSED, "DATA on a stream the client had ended")
            else:
                self._dataOnClosed(streamID)
            return
        if size > stream.receiveWindow:
            raise H2ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, f"DATA beyond stream {streamID}'s window")
        stream.receiveWindow -= size
        ended = flags & END_STREAM
        if stream.expected is not None:
            stream.received += len(data)
            if stream.received > stream.expected or ended:
                self._checkLength(streamID, stream)
        if ended:
            self._remoteEnded(streamID, stream)
        self.receiver.bodyReceived(streamID, data, size)
        if ended:
            self.receiver.streamEnded(streamID)

    def _windowUpdate(self, streamID: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE not of 4 bytes")
        increment = _WORD.unpack(payload)[0] & _STREAM_MASK
        if not streamID:
            if not increment:
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._sendWindow += increment
            if self._sendWindow > MAX_WINDOW:
                raise H2ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "the connection's window beyond 2^31-1")
            self.receiver.windowOpened(0)
            return
        stream = self._streams.get(streamID)
        if stream is None:
            if self._idle(streamID):
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {streamID}")
            return  # closed: it may have crossed the stream's end
        if not increment:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE of 0 on stream {streamID}")
        stream.sendWindow += increment
        if stream.sendWindow > MAX_WINDOW:
            self._streamError(streamID, ErrorCodes.FLOW_CONTROL_ERROR, "WINDOW_UPDATE past a window of 2^31-1")
            return
        self.receiver.windowOpened(streamID)

    def _settings(self, flags: int, streamID: int, payload: bytes) -> None:
        if streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
            return  # rproxy's settings applied when sent
        if len(payload) % 6:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        windowChanged = False
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE beyond 2^31-1")
                delta = value - self._initialWindow
                self._initialWindow = value
                for stream in self._streams.values():
                    stream.sendWindow += delta
                    if stream.sendWindow > MAX_WINDOW:
                        raise H2ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "a stream's window beyond 2^31-1")
                windowChanged = True
            elif key == MAX_FRAME_SIZE:
                if not FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE of {value}")
                self.maxFrameSize = value
            elif key in (ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL) and value > 1:
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"setting {key} of {value}, neither 0 nor 1")
        self._out.append(_SETTINGS_ACK)
        if windowChanged:
            self.receiver.windowOpened(0)

    def _rstStream(self, streamID: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM not of 4 bytes")
        if not streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if self._streams.pop(streamID, None) is None:
            if self._idle(streamID):
                raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"RST_STREAM on idle stream {streamID}")
            if streamID in self._closed:
                # Closed already, maybe reset by rproxy: what the client sends on it after its own reset was
                # not in flight, whatever crossed it (TCP keeps the client's order).
                self._closed[streamID] = _RESET_BY_CLIENT
            return
        self._remember(streamID, _RESET_BY_CLIENT)
        self.receiver.streamReset(streamID, _WORD.unpack(payload)[0])

    def _ping(self, flags: int, streamID: int, payload: bytes) -> None:
        if len(payload) != 8:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "PING not of 8 bytes")
        if streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
        if not flags & ACK:
            self._out.append(frame(PING, ACK, 0, payload))

    def _priority(self, streamID: int, payload: bytes) -> None:
        if len(payload) != 5:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "PRIORITY not of 5 bytes")
        if not streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
        priority = self._readPriority(streamID, payload)
        if streamID in self._streams or self._idle(streamID):  # a closed stream's priority does not matter
            self.receiver.priorityReceived(streamID, *priority)

    def _readPriority(self, streamID: int, payload: bytes) -> tuple[int, int, bool]:
        word, weight = _PRIORITY.unpack_from(payload)
        dependsOn = word & _STREAM_MASK
        if dependsOn == streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"stream {streamID} depends on itself")
        return dependsOn, weight + 1, bool(word >> 31)

    def _goAway(self, streamID: int, payload: bytes) -> None:
        if streamID:
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        code = _GOAWAY.unpack_from(payload)[1]
        if code != ErrorCodes.NO_ERROR:
            self._stopped = True  # the connection ends: what the client sent after its GOAWAY is not read
        self.receiver.goAwayReceived(code)

    # -- streams

    def _idle(self, streamID: int) -> bool:
        """Whether C{streamID} was never opened by the client."""
        return streamID > self.highestStreamID or not streamID & 1

    def _dataOnClosed(self, streamID: int) -> None:
        """DATA on C{streamID}, which is not open."""
        if self._idle(streamID):
            raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, f"DATA on idle stream {streamID}")
        how = self._closed.get(streamID)
        if how == _RESET_BY_US:
            return  # in flight as rproxy reset the stream (RFC 9113 section 5.4.2)
        if how is None:  # closed too long ago to know how: refused on its own
            self._out.append(frame(RST_STREAM, 0, streamID, _WORD.pack(ErrorCodes.STREAM_CLOSED)))
            return
        raise H2ConnectionError(ErrorCodes.STREAM_CLOSED, f"DATA on stream {streamID}, which was closed")

    def _streamError(self, streamID: int, code: ErrorCodes, reason: str) -> None:
        """Reset open stream C{streamID} for what the client sent on it, and say so."""
        self.resetStream(streamID, code)
        self.receiver.streamError(streamID, code, reason)

    def _remember(self, streamID: int, how: int) -> None:
        closed = self._closed
        closed[streamID] = how
        if len(closed) > MAX_CLOSED_STREAMS:
            del closed[next(iter(closed))]

    def _remoteEnded(self, streamID: int, stream: _Stream) -> None:
        stream.remoteOpen = False
        self._closeIfEnded(streamID, stream)

    def _closeIfEnded(self, streamID: int, stream: _Stream) -> None:
        """The stream closes once both sides ended it."""
        if not stream.localOpen and not stream.remoteOpen:
            del self._streams[streamID]
            self._remember(streamID, _ENDED)

    def _checkLength(self, streamID: int, stream: _Stream) -> None:
        """The body so far is not longer than C{content-length} says, nor shorter once the stream ends."""
        expected = stream.expected
        if expected is not None and stream.received != expected:
            raise H2ConnectionError(
                ErrorCodes.PROTOCOL_ERROR,
                f"stream {streamID}'s body is not the {expected} bytes its content-length says",
            )

    def expect(self, streamID: int, length: int) -> None:
        """The request on C{streamID} declares a body of C{length} bytes: a client that sends another is refused."""
        stream = self._streams.get(streamID)
        if stream is not None:
            stream.expected = length

    # -- flow control of what the client sends

    def acknowledge(self, size: int, streamID: int) -> None:
        """The protocol consumed C{size} bytes of C{streamID}'s DATA: give them back to the client's windows."""
        if not size:
            return
        self._consumed(size)
        stream = self._streams.get(streamID)
        if stream is None or not stream.remoteOpen:
            return
        stream.unacknowledged += size
        increment = _giveBack(stream.unacknowledged, stream.receiveWindow)
        if increment:
            stream.unacknowledged = 0
            stream.receiveWindow += increment
            self._out.append(frame(WINDOW_UPDATE, 0, streamID, _WORD.pack(increment)))

    def _consumed(self, size: int) -> None:
        self._unacknowledged += size
        increment = _giveBack(self._unacknowledged, self._receiveWindow)
        if increment:
            self._unacknowledged = 0
            self._receiveWindow += increment
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _WORD.pack(increment)))

    # -- writing

    @property
    def openStreams(self) -> int:
        """Streams open or half-closed, which count against SETTINGS_MAX_CONCURRENT_STREAMS (section 5.1.2)."""
        return len(self._streams)

    def window(self, streamID: int) -> int | None:
        """
        What C{streamID} may send now under the client's flow control (negative after the client shrank its
        initial window, RFC 9113 section 6.9.2); C{None} if it may send nothing more.
        """
        stream = self._streams.get(streamID)
        if stream is None or not stream.localOpen:
            return None
        return min(stream.sendWindow, self._sendWindow)

    def sendHeaders(self, streamID: int, fields: Sequence[Any], end: bool) -> bool:
        """Send a header block on C{streamID} (C{end}: ending the stream); C{False} if it is closed."""
        stream = self._streams.get(streamID)
        if stream is None or not stream.localOpen:
            return False
        block = self.encoder.encode(fields)
        flags = END_STREAM if end else 0
        size = self.maxFrameSize
        if len(block) <= size:
            self._out.append(_HEADER.pack(len(block) << 8 | HEADERS, flags | END_HEADERS, streamID) + block)
        else:
            chunks = [block[start : start + size] for start in range(0, len(block), size)]
            self._out.append(frame(HEADERS, flags, streamID, chunks[0]))
            for chunk in chunks[1:-1]:
                self._out.append(frame(CONTINUATION, 0, streamID, chunk))
            self._out.append(frame(CONTINUATION, END_HEADERS, streamID, chunks[-1]))
        if end:
            stream.localOpen = False
            self._closeIfEnded(streamID, stream)
        return True

    def sendData(self, streamID: int, data: bytes, end: bool) -> bool:
        """
        Send C{data} on C{streamID} as one DATA frame (C{end}: ending the stream); the caller keeps it within
        L{window} and L{maxFrameSize}.  C{False} if the stream is closed.
        """
        stream = self._streams.get(streamID)
        if stream is None or not stream.localOpen:
            return False
        size = len(data)
        stream.sendWindow -= size
        self._sendWindow -= size
        out = self._out
        out.append(_HEADER.pack(size << 8 | DATA, END_STREAM if end else 0, streamID))
        if size:
            out.append(data)
        if end:
            stream.localOpen = False
            self._closeIfEnded(streamID, stream)
        return True

    def resetStream(self, streamID: int, code: int) -> None:
        """Reset C{streamID} with C{code}, unless it is closed already."""
        if self._streams.pop(streamID, None) is None:
            return
        self._out.append(frame(RST_STREAM, 0, streamID, _WORD.pack(code)))
        self._remember(streamID, _RESET_BY_US)

    def stopReading(self) -> None:
        """The protocol closes the connection: frames still buffered, or read later, are not read."""
        self._stopped = True

    def goAway(self, code: int) -> None:
        """Send GOAWAY(C{code}) naming the last stream the client opened; frames still buffered are not read."""
        self._out.append(frame(GOAWAY, 0, 0, _GOAWAY.pack(self.highestStreamID, code)))
        if code != ErrorCodes.NO_ERROR:
            self._stopped = True

    def take(self) -> bytes:
        """What is to be sent, from the oldest frame on."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data


_SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def _unpadded(payload: bytes) -> bytes:
    """A padded frame's payload without its padding (RFC 9113 section 6.1)."""
    if not payload:
        raise H2ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "a padded frame without its pad length")
    padding = payload[0]
    if padding >= len(payload):
        raise H2ConnectionError(ErrorCodes.PROTOCOL_ERROR, "padding as long as the frame")
    return payload[1 : len(payload) - padding]
