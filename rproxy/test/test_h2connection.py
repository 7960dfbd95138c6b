"""
L{rproxy.downstream.h2connection}, frame by frame and without a socket:

 - the preface and the client's first SETTINGS, and rproxy's own SETTINGS, sent first;
 - the frames a client sends read the same however its bytes are split (a property, with hypothesis);
 - L{ServerConnection.pending} and L{ServerConnection.started}, for the header deadline;
 - each connection error with the code RFC 9113 and RFC 7541 name, the floods refused at a frame's header,
   the stream errors, and frames on closed streams (RFC 9113 sections 5.1, 5.4 and 6);
 - flow control both ways (section 5.2 and 6.9), PING and GOAWAY.

What rproxy sends is read by the h2 library's client, or by L{parse}, apart from the module.  h2spec and the
HTTP/2 tests over sockets (test_http2_server, test_h2_abuse) run the module with real clients.
"""

from __future__ import annotations

import struct
from datetime import timedelta
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rproxy.downstream.h2connection import (
    MAX_CLOSED_STREAMS,
    MAX_CONTINUATIONS,
    MAX_EMPTY_DATA,
    H2ConnectionError,
    H2FloodError,
    ServerConnection,
    frame,
)

#: The numbers of RFC 9113 (sections 3.4, 6 and 6.5.2) and RFC 8441, written here apart from the module's.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = range(1, 5)
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x5, 0x6
ENABLE_CONNECT_PROTOCOL = 0x8
MAX_WINDOW = 2**31 - 1

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/")]
RESPONSE = [(b":status", b"200"), (b"server", b"rproxy")]
#: A header block any decoder reads, whatever its table holds: a first block refers to no dynamic entry.
BLOCK = hpack.Encoder().encode(REQUEST)


def word(value: int) -> bytes:
    return struct.pack(">I", value)


def settingsFrame(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", key, value) for key, value in pairs))


def request(streamID: int, flags: int = END_HEADERS | END_STREAM, block: bytes = BLOCK) -> bytes:
    return frame(HEADERS, flags, streamID, block)


def priority(dependsOn: int, weight: int) -> bytes:
    return struct.pack(">IB", dependsOn, weight)


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Frames as (type, flags, stream, payload), read apart from the module."""
    frames, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        streamID = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((data[pos + 3], data[pos + 4], streamID, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


def h2Client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


class Recorder:
    """A L{FrameReceiver} that records its calls; with C{conn}, it consumes each body as it arrives."""

    conn: ServerConnection | None = None

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def requestReceived(self, streamID: int, fields: list[Any], ended: bool) -> None:
        self.calls.append(("request", streamID, [(bytes(n), bytes(v)) for n, v in fields], ended))

    def bodyReceived(self, streamID: int, data: bytes, size: int) -> None:
        self.calls.append(("body", streamID, data, size))
        if self.conn is not None:
            self.conn.acknowledge(size, streamID)

    def trailersReceived(self, streamID: int, fields: list[Any]) -> None:
        self.calls.append(("trailers", streamID, [(bytes(n), bytes(v)) for n, v in fields]))

    def streamEnded(self, streamID: int) -> None:
        self.calls.append(("ended", streamID))

    def streamReset(self, streamID: int, code: int) -> None:
        self.calls.append(("reset", streamID, code))

    def streamError(self, streamID: int, code: int, reason: str) -> None:
        self.calls.append(("error", streamID, code))

    def windowOpened(self, streamID: int) -> None:
        self.calls.append(("window", streamID))

    def priorityReceived(self, streamID: int, dependsOn: int, weight: int, exclusive: bool) -> None:
        self.calls.append(("priority", streamID, dependsOn, weight, exclusive))

    def goAwayReceived(self, code: int) -> None:
        self.calls.append(("goaway", code))


class ConnectionTestCase(unittest.SynchronousTestCase):
    """A connection past its preface and the client's SETTINGS, with what it sent first taken."""

    def setUp(self) -> None:
        self.connect()

    def connect(self, *streams: int) -> ServerConnection:
        """A new connection, with C{streams} opened (not ended)."""
        self.receiver = Recorder()
        self.conn = ServerConnection(self.receiver, {})
        self.conn.receive(PREFACE + settingsFrame() + b"".join(request(s, END_HEADERS) for s in streams))
        self.conn.take()
        self.receiver.calls.clear()
        return self.conn

    def assertConnectionError(self, code: ErrorCodes, data: bytes, case: str = "") -> H2ConnectionError:
        error = self.assertRaises(H2ConnectionError, self.conn.receive, data)
        self.assertEqual(error.code, code, f"{case}: {error.reason}")
        return error

    def assertCases(self, code: ErrorCodes, *cases: tuple[str, tuple[int, ...], bytes]) -> None:
        """Each case, on a new connection with its streams open, is a connection error of C{code}."""
        for case, streams, data in cases:
            self.connect(*streams)
            self.assertConnectionError(code, data, case)

    def sent(self) -> list[tuple[int, int, int, bytes]]:
        return parse(self.conn.take())

    def heard(self, client: h2.connection.H2Connection, data: bytes | None = None) -> list[Any]:
        """What h2's client makes of what rproxy sent: C{data}, or what it has to send."""
        return client.receive_data(self.conn.take() if data is None else data)

    def handshake(self) -> h2.connection.H2Connection:
        """A new connection to h2's client, past both SETTINGS and their acknowledgements."""
        self.receiver = Recorder()
        self.conn = ServerConnection(self.receiver, {})
        client = h2Client()
        self.conn.receive(client.data_to_send())
        self.heard(client)
        self.conn.receive(client.data_to_send())
        self.receiver.calls.clear()
        return client


class PrefaceTests(ConnectionTestCase):
    """The preface, then SETTINGS first; rproxy's SETTINGS is the first thing it sends."""

    def test_ownSettings(self) -> None:
        """rproxy's SETTINGS, with the settings given, is sent before anything is received."""
        ours = {MAX_CONCURRENT_STREAMS: 100, MAX_HEADER_LIST_SIZE: 8192, ENABLE_CONNECT_PROTOCOL: 1}
        conn = ServerConnection(Recorder(), ours)
        data = conn.take()
        self.assertEqual(parse(data)[0][:3], (SETTINGS, 0, 0))
        events = self.heard(h2Client(), data)
        self.assertIsInstance(events[0], h2.events.RemoteSettingsChanged)
        changed = {int(key): value.new_value for key, value in events[0].changed_settings.items()}
        self.assertEqual(changed, ours)
        self.assertEqual(conn.take(), b"")

    def test_prefaceInPieces(self) -> None:
        """The preface, SETTINGS and a PING read a byte at a time as whole: both acknowledged."""
        data = PREFACE + settingsFrame((INITIAL_WINDOW_SIZE, 1000)) + frame(PING, 0, 0, b"pingpong")
        whole, pieces = ServerConnection(Recorder(), {}), ServerConnection(Recorder(), {})
        whole.receive(data)
        ends = {len(PREFACE), len(PREFACE) + 15, len(data)}
        for index in range(len(data)):
            pieces.receive(data[index : index + 1])
            self.assertEqual(pieces.pending, index + 1 not in ends, index)
        self.assertEqual(parse(whole.take())[1:], [(SETTINGS, ACK, 0, b""), (PING, ACK, 0, b"pingpong")])
        self.assertEqual(parse(pieces.take())[1:], [(SETTINGS, ACK, 0, b""), (PING, ACK, 0, b"pingpong")])

    def test_prefaceInvalid(self) -> None:
        """Bytes that are not the preface are refused as soon as they differ from it."""
        for data in [b"GET / HTTP/1.1\r\n\r\n", b"X", b"PRI * HTTP/1.1", PREFACE[:-1] + b"X" + settingsFrame()]:
            self.conn = ServerConnection(Recorder(), {})
            self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, data, repr(data))
        self.conn = ServerConnection(Recorder(), {})
        self.conn.receive(PREFACE[:10])
        self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, b"X")

    def test_settingsFirst(self) -> None:
        """The preface must be followed by SETTINGS, not its ACK nor another frame: refused at its header."""
        for first in [frame(PING, 0, 0, bytes(8)), frame(SETTINGS, ACK, 0), request(1)]:
            self.conn = ServerConnection(Recorder(), {})
            self.conn.receive(PREFACE + first[:8])
            self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, first[8:9])


#: A client's script: opening a stream (END_STREAM?, split by a CONTINUATION?, a value), or a frame on one
#: of the streams it may still send on (chosen by index), or on the connection.
actions = st.one_of(
    st.tuples(st.just("open"), st.booleans(), st.booleans(), st.sampled_from([b"", b"x", b"v" * 300])),
    st.tuples(
        st.just("data"),
        st.integers(0, 7),
        st.sampled_from([0, 1, 100, 5000, 16000]),
        st.one_of(st.none(), st.integers(0, 255)),
        st.booleans(),
    ),
    st.tuples(st.just("reset"), st.integers(0, 7)),
    st.tuples(st.just("window"), st.integers(0, 7), st.integers(1, 100000)),
    st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("priority"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("settings"), st.integers(0, 100000), st.sampled_from([0, 256, 4096])),
)
#: Where to split the bytes: anywhere (an offset of None), or a few bytes around the start of a frame.
cuts = st.lists(st.tuples(st.integers(min_value=0), st.one_of(st.none(), st.integers(-2, 11))), max_size=24)


def script(steps: list[Any]) -> tuple[list[bytes], list[tuple[Any, ...]], list[bytes]]:
    """The frames of C{steps}, the receiver calls they must make, and the PING payloads."""
    encoder = hpack.Encoder()
    frames, calls, pings = [PREFACE + settingsFrame()], list[tuple[Any, ...]](), list[bytes]()
    sending: list[int] = []  # streams the client has not ended
    live: list[int] = []  # streams the client has not reset
    new = 1
    for step in steps:
        kind = step[0]
        if kind == "open":
            _, ended, split, value = step
            fields = [*REQUEST, (b"x-value", value)]
            block, flags = encoder.encode(fields), END_STREAM if ended else 0
            if split:
                frames += [frame(HEADERS, flags, new, block[:3]), frame(CONTINUATION, END_HEADERS, new, block[3:])]
            else:
                frames.append(frame(HEADERS, flags | END_HEADERS, new, block))
            calls += [("request", new, fields, ended)] + ([("ended", new)] if ended else [])
            live.append(new)
            if not ended:
                sending.append(new)
            new += 2
        elif kind == "data" and sending:
            _, index, size, pad, end = step
            streamID = sending[index % len(sending)]
            body = bytes([streamID]) * size
            payload = body if pad is None else bytes([pad]) + body + bytes(pad)
            flags = (END_STREAM if end else 0) | (0 if pad is None else PADDED)
            frames.append(frame(DATA, flags, streamID, payload))
            calls += [("body", streamID, body, len(payload))] + ([("ended", streamID)] if end else [])
            if end:
                sending.remove(streamID)
        elif kind == "reset" and live:
            streamID = live.pop(step[1] % len(live))
            if streamID in sending:
                sending.remove(streamID)
            frames.append(frame(RST_STREAM, 0, streamID, word(ErrorCodes.CANCEL)))
            calls.append(("reset", streamID, ErrorCodes.CANCEL))
        elif kind == "window":
            streamID = live[step[1] % len(live)] if step[1] and live else 0
            frames.append(frame(WINDOW_UPDATE, 0, streamID, word(step[2])))
            calls.append(("window", streamID))
        elif kind == "ping":
            frames.append(frame(PING, 0, 0, step[1]))
            pings.append(step[1])
        elif kind == "priority" and live:
            streamID = live[step[1] % len(live)]
            frames.append(frame(PRIORITY, 0, streamID, priority(0, step[2])))
            calls.append(("priority", streamID, 0, step[2] + 1, False))
        elif kind == "settings":
            frames.append(settingsFrame((INITIAL_WINDOW_SIZE, step[1]), (HEADER_TABLE_SIZE, step[2])))
            calls.append(("window", 0))
    return frames, calls, pings


class ChunkingTests(unittest.SynchronousTestCase):
    """However a client's bytes are split, the receiver hears the same, and rproxy sends the same."""

    def feed(self, chunks: list[bytes]) -> tuple[list[tuple[Any, ...]], bytes]:
        receiver = Recorder()
        conn = receiver.conn = ServerConnection(receiver, {})
        for chunk in chunks:
            conn.receive(chunk)
        self.assertFalse(conn.pending)
        return receiver.calls, conn.take()

    @settings(max_examples=200, derandomize=True, database=None, deadline=timedelta(seconds=5))
    @given(st.lists(actions, max_size=40), cuts)
    def test_chunking(self, steps: list[Any], where: list[tuple[int, int | None]]) -> None:
        """A valid script fed whole and fed in pieces: the calls it must make, and the same bytes sent."""
        frames, expected, pings = script(steps)
        data = b"".join(frames)
        starts = [sum(map(len, frames[:index])) for index in range(len(frames))]
        points = {0, len(data)}
        for n, offset in where:
            point = n % (len(data) + 1) if offset is None else starts[n % len(starts)] + offset
            points.add(min(max(point, 0), len(data)))
        ordered = sorted(points)
        calls, sent = self.feed([data])
        self.assertEqual(calls, expected)
        self.assertEqual(self.feed([data[a:b] for a, b in zip(ordered, ordered[1:], strict=False)]), (calls, sent))
        self.assertEqual([payload for kind, flags, _, payload in parse(sent) if kind == PING and flags & ACK], pings)


class PendingTests(ConnectionTestCase):
    """L{ServerConnection.pending} and L{ServerConnection.started}, for the header deadline."""

    def test_frame(self) -> None:
        """A frame other than DATA is pending until complete; C{started} changed once for it."""
        ping = frame(PING, 0, 0, bytes(8))
        before = self.conn.started
        self.conn.receive(ping[:12])
        self.assertTrue(self.conn.pending)
        started = self.conn.started
        self.assertNotEqual(started, before)
        self.conn.receive(ping[12:])
        self.assertEqual((self.conn.pending, self.conn.started), (False, started))

    def test_startedAtFirstByte(self) -> None:
        """A frame begins with its first byte: C{started} changes then, not when its header is complete."""
        ping = frame(PING, 0, 0, bytes(8))
        self.conn.receive(ping[:12])
        self.conn.receive(ping[12:])
        before = self.conn.started
        self.conn.receive(ping[:1])
        self.assertEqual((self.conn.pending, self.conn.started != before), (True, True))

    def test_data(self) -> None:
        """A partial DATA frame is not pending (body is for the body's timeouts)."""
        self.connect(1)
        self.conn.receive(frame(DATA, 0, 1, b"x" * 100)[:50])
        self.assertFalse(self.conn.pending)
        self.conn.receive(b"x" * 59)
        self.assertFalse(self.conn.pending)

    def test_headerBlock(self) -> None:
        """A header block is pending until its END_HEADERS; its CONTINUATION frames do not change C{started}."""
        before = self.conn.started
        self.conn.receive(frame(HEADERS, END_STREAM, 1, BLOCK[:2]))
        self.assertTrue(self.conn.pending)
        started = self.conn.started
        self.assertNotEqual(started, before)
        continuation = frame(CONTINUATION, END_HEADERS, 1, BLOCK[2:])
        self.conn.receive(continuation[:10])
        self.assertTrue(self.conn.pending)
        self.conn.receive(continuation[10:])
        self.assertFalse(self.conn.pending)
        self.assertEqual(self.conn.started, started)
        self.assertEqual(self.receiver.calls, [("request", 1, REQUEST, True), ("ended", 1)])


class ConnectionErrorTests(ConnectionTestCase):
    """Each broken frame is a connection error with the code RFC 9113 or RFC 7541 names."""

    def test_frameTooLarge(self) -> None:
        """A frame over 16384 bytes is refused at its header; 16384 bytes is allowed."""
        self.connect(1)
        self.conn.receive(frame(DATA, 0, 1, bytes(16384)))
        self.assertConnectionError(ErrorCodes.FRAME_SIZE_ERROR, frame(DATA, 0, 1, bytes(16385))[:9])

    def test_wrongStream(self) -> None:
        """Frames on stream 0 that belong on a stream, and the reverse, and on idle streams."""
        self.assertCases(
            ErrorCodes.PROTOCOL_ERROR,
            ("HEADERS on 0", (), request(0)),
            ("DATA on 0", (1,), frame(DATA, 0, 0, b"x")),
            ("DATA on idle", (1,), frame(DATA, 0, 3, b"x")),
            ("RST_STREAM on 0", (1,), frame(RST_STREAM, 0, 0, word(8))),
            ("RST_STREAM on idle", (1,), frame(RST_STREAM, 0, 3, word(8))),
            ("WINDOW_UPDATE on idle", (1,), frame(WINDOW_UPDATE, 0, 3, word(1))),
            ("WINDOW_UPDATE on even", (1,), frame(WINDOW_UPDATE, 0, 2, word(1))),
            ("PRIORITY on 0", (), frame(PRIORITY, 0, 0, priority(0, 15))),
            ("SETTINGS on 1", (1,), frame(SETTINGS, 0, 1)),
            ("PING on 1", (1,), frame(PING, 0, 1, bytes(8))),
            ("GOAWAY on 1", (1,), frame(GOAWAY, 0, 1, bytes(8))),
        )

    def test_wrongLength(self) -> None:
        """Frames of a length their type does not allow."""
        self.assertCases(
            ErrorCodes.FRAME_SIZE_ERROR,
            ("RST_STREAM of 3", (1,), frame(RST_STREAM, 0, 1, bytes(3))),
            ("WINDOW_UPDATE of 3", (), frame(WINDOW_UPDATE, 0, 0, bytes(2) + b"\x01")),
            ("WINDOW_UPDATE of 5", (1,), frame(WINDOW_UPDATE, 0, 1, word(1) + b"\0")),
            ("PRIORITY of 4", (1,), frame(PRIORITY, 0, 1, bytes(4))),
            ("SETTINGS of 5", (), frame(SETTINGS, 0, 0, bytes(5))),
            ("SETTINGS ACK with a payload", (), frame(SETTINGS, ACK, 0, bytes(6))),
            ("PING of 7", (), frame(PING, 0, 0, bytes(7))),
            ("PING of 9", (), frame(PING, 0, 0, bytes(9))),
            ("GOAWAY of 7", (), frame(GOAWAY, 0, 0, bytes(7))),
            ("HEADERS too short for its priority", (), request(1, END_HEADERS | PRIORITY_FLAG, bytes(4))),
            ("padded DATA without its pad length", (1,), frame(DATA, PADDED, 1)),
            ("padded HEADERS without its pad length", (), request(1, END_HEADERS | PADDED, b"")),
        )

    def test_padding(self) -> None:
        """Padding as long as the frame or longer; a byte shorter is allowed, and takes the windows."""
        self.assertCases(
            ErrorCodes.PROTOCOL_ERROR,
            ("DATA", (1,), frame(DATA, PADDED, 1, b"\x01")),
            ("DATA", (1,), frame(DATA, PADDED, 1, b"\x05abcd")),
            ("HEADERS", (), request(1, END_HEADERS | PADDED, bytes([len(BLOCK) + 1]) + BLOCK)),
        )
        self.connect(1)
        self.conn.receive(frame(DATA, PADDED, 1, b"\x04abcd") + frame(DATA, PADDED, 1, b"\x01ab"))
        self.assertEqual(self.receiver.calls, [("body", 1, b"", 5), ("body", 1, b"a", 3)])

    def test_headersPaddingIntoPriority(self) -> None:
        """
        HEADERS with PRIORITY whose padding leaves less than nothing for the field block: PROTOCOL_ERROR (RFC
        9113 section 6.2), the frame being long enough for its mandatory fields.
        """
        payload = b"\x05" + priority(0, 15) + bytes(4)
        self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, request(1, END_HEADERS | PADDED | PRIORITY_FLAG, payload))

    def test_protocolErrors(self) -> None:
        """Even stream IDs and lower ones (RFC 9113 section 5.1.1), self-dependency, PUSH_PROMISE."""
        self.assertCases(
            ErrorCodes.PROTOCOL_ERROR,
            ("even", (), request(2)),
            ("lower", (5,), request(3)),
            ("lower and even", (5,), request(4)),
            ("depends on itself", (1,), frame(PRIORITY, 0, 1, priority(1, 15))),
            ("HEADERS depends on itself", (), request(1, END_HEADERS | PRIORITY_FLAG, priority(1, 15) + BLOCK)),
            ("PUSH_PROMISE", (1,), frame(PUSH_PROMISE, END_HEADERS, 1, word(2) + BLOCK)),
        )

    def test_continuation(self) -> None:
        """CONTINUATION without a header block or on another stream; any other frame within a block."""
        opened = frame(HEADERS, END_STREAM, 3, BLOCK[:2])
        self.assertCases(
            ErrorCodes.PROTOCOL_ERROR,
            ("no block", (1,), frame(CONTINUATION, END_HEADERS, 1, BLOCK)),
            ("after the block", (), request(3) + frame(CONTINUATION, END_HEADERS, 3, b"")),
            ("another stream", (1,), opened + frame(CONTINUATION, END_HEADERS, 5, BLOCK[2:])),
            ("HEADERS", (), opened + request(5)),
            ("DATA", (1,), opened + frame(DATA, 0, 1, b"x")),
            ("PING", (), opened + frame(PING, 0, 0, bytes(8))),
            ("an extension frame", (), opened + frame(0xFA, 0, 3, b"x")),
        )
        self.connect()
        self.conn.receive(frame(0xFA, 0, 0, b"x") + frame(0xFA, 0, 3, b"x"))  # outside a block: ignored
        self.assertEqual((self.receiver.calls, self.conn.take()), ([], b""))

    def test_settingsValues(self) -> None:
        """Settings out of their range; the bounds themselves and unknown settings are accepted."""
        self.assertConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, settingsFrame((INITIAL_WINDOW_SIZE, 2**31)))
        for key, value in [
            (MAX_FRAME_SIZE, 16383),
            (MAX_FRAME_SIZE, 2**24),
            (ENABLE_PUSH, 2),
            (ENABLE_CONNECT_PROTOCOL, 2),
        ]:
            self.connect()
            self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, settingsFrame((key, value)), f"{key}={value}")
        self.connect()
        good = [(INITIAL_WINDOW_SIZE, MAX_WINDOW), (MAX_FRAME_SIZE, 2**24 - 1), (ENABLE_PUSH, 1), (0xFF, 2**32 - 1)]
        self.conn.receive(settingsFrame(*good))
        self.assertEqual(self.sent(), [(SETTINGS, ACK, 0, b"")])
        self.assertEqual(self.conn.maxFrameSize, 2**24 - 1)

    def test_windowOverflow(self) -> None:
        """The connection's window past 2^31-1, by WINDOW_UPDATE or a stream's by SETTINGS; an increment of 0."""
        self.conn.receive(frame(WINDOW_UPDATE, 0, 0, word(MAX_WINDOW - 65535)))
        self.assertConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, frame(WINDOW_UPDATE, 0, 0, word(1)))
        self.connect(1)
        self.conn.receive(frame(WINDOW_UPDATE, 0, 1, word(MAX_WINDOW - 65535)))
        self.assertConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, settingsFrame((INITIAL_WINDOW_SIZE, 65536)))
        self.assertCases(
            ErrorCodes.PROTOCOL_ERROR,
            ("0 on 0", (), frame(WINDOW_UPDATE, 0, 0, word(0))),
            ("0 on 1", (1,), frame(WINDOW_UPDATE, 0, 1, word(0))),
        )

    def test_receiveWindows(self) -> None:
        """DATA beyond the connection's window; beyond a stream's, the connection's open (another stream's)."""
        self.connect(1, 3)
        self.conn.receive(frame(DATA, 0, 1, bytes(16384)) * 3 + frame(DATA, 0, 3, bytes(16383)))
        self.assertConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, frame(DATA, 0, 3, b"x"))
        self.connect(1, 3)
        self.conn.receive(frame(DATA, 0, 1, bytes(16384)) * 3 + frame(DATA, END_STREAM, 3, b"x"))
        self.conn.acknowledge(32766, 1)
        self.conn.acknowledge(1, 3)
        self.assertEqual(self.sent(), [(WINDOW_UPDATE, 0, 0, word(32767))])
        self.conn.receive(frame(DATA, 0, 1, bytes(16383)))
        self.assertConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, frame(DATA, 0, 1, b"x"))

    def test_bodyLength(self) -> None:
        """A body longer or shorter than its content-length; padding does not count."""
        for body in [frame(DATA, 0, 1, b"abc") + frame(DATA, 0, 1, b"def"), frame(DATA, END_STREAM, 1, b"abcd")]:
            self.connect(1)
            self.conn.expect(1, 5)
            self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, body)
        self.connect(1)
        self.conn.expect(1, 5)
        self.conn.receive(frame(DATA, PADDED, 1, b"\x09abcde" + bytes(9)) + frame(DATA, END_STREAM, 1))
        self.assertEqual(self.receiver.calls, [("body", 1, b"abcde", 15), ("body", 1, b"", 0), ("ended", 1)])

    def test_bodyShorterWithTrailers(self) -> None:
        """A body shorter than its content-length ended by trailers is refused too (RFC 9113 section 8.1.1)."""
        self.connect(1)
        self.conn.expect(1, 5)
        self.conn.receive(frame(DATA, 0, 1, b"abc"))
        trailers = hpack.Encoder().encode([(b"x-checksum", b"1")])
        self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, request(1, END_HEADERS | END_STREAM, trailers))

    def test_headerBlocks(self) -> None:
        """Blocks that do not decode (even on a stream rproxy reset), trailers without END_STREAM, a list too large."""
        for block in [b"\x80", b"\xff\x00", b"\x40\x05ab", b"\x3f\xe1\x7f", b"\x82\x20"]:
            self.connect(1)
            self.conn.resetStream(1, ErrorCodes.CANCEL)
            self.assertConnectionError(ErrorCodes.COMPRESSION_ERROR, request(1, END_HEADERS, block), repr(block))
        self.connect(1)
        self.assertConnectionError(ErrorCodes.PROTOCOL_ERROR, request(1, END_HEADERS))
        self.connect()
        self.conn.decoder.max_header_list_size = 200
        large = hpack.Encoder().encode([*REQUEST, (b"x-large", b"v" * 200)])
        self.assertConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, request(1, block=large))


class FloodTests(ConnectionTestCase):
    """Floods of frames that carry nothing are refused at the header of the first frame too many."""

    def test_continuationFlood(self) -> None:
        """A block of MAX_CONTINUATIONS CONTINUATION frames is read; one more is refused before its payload."""

        def unfinished(streamID: int) -> bytes:
            empty = frame(CONTINUATION, 0, streamID) * (MAX_CONTINUATIONS - 1)
            return frame(HEADERS, END_STREAM, streamID, BLOCK[:1]) + empty

        self.conn.receive(unfinished(1) + frame(CONTINUATION, END_HEADERS, 1, BLOCK[1:]))
        self.assertEqual(self.receiver.calls, [("request", 1, REQUEST, True), ("ended", 1)])
        self.conn.receive(unfinished(3) + frame(CONTINUATION, 0, 3))
        self.conn.receive(frame(CONTINUATION, END_HEADERS, 3, BLOCK[1:])[:8])
        error = self.assertRaises(H2FloodError, self.conn.receive, b"\x03")
        self.assertEqual(error.code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_emptyDataFlood(self) -> None:
        """MAX_EMPTY_DATA empty DATA frames are read (those that end a stream do not count); one more is not."""
        self.connect(*range(1, 10, 2))
        empty = frame(DATA, 0, 1) * MAX_EMPTY_DATA + b"".join(frame(DATA, END_STREAM, s) for s in range(3, 10, 2))
        self.conn.receive(empty)
        self.assertEqual(len(self.receiver.calls), MAX_EMPTY_DATA + 8)
        self.conn.receive(frame(DATA, 0, 1)[:8])
        error = self.assertRaises(H2FloodError, self.conn.receive, b"\x01")
        self.assertEqual(error.code, ErrorCodes.ENHANCE_YOUR_CALM)


class StreamErrorTests(ConnectionTestCase):
    """Stream errors: RST_STREAM, the receiver told, the connection goes on."""

    def assertStreamError(self, data: bytes, code: ErrorCodes) -> None:
        self.conn.receive(data)
        self.assertEqual(self.receiver.calls[-1], ("error", 1, code))
        self.assertEqual(self.sent(), [(RST_STREAM, 0, 1, word(code))])
        self.assertIsNone(self.conn.window(1))
        self.receiver.calls.clear()
        self.conn.receive(data + frame(PING, 0, 0, bytes(8)))  # ignored on the stream rproxy reset
        self.assertEqual((self.receiver.calls, self.sent()), ([], [(PING, ACK, 0, bytes(8))]))

    def test_afterEnd(self) -> None:
        """DATA or HEADERS on a stream the client ended: STREAM_CLOSED."""
        for data in [frame(DATA, 0, 1, b"abc"), request(1)]:
            self.connect()
            self.conn.receive(request(1))
            self.assertStreamError(data, ErrorCodes.STREAM_CLOSED)

    def test_streamWindowOverflow(self) -> None:
        """A WINDOW_UPDATE taking a stream's window past 2^31-1: FLOW_CONTROL_ERROR; up to it is allowed."""
        self.connect(1)
        self.conn.receive(frame(WINDOW_UPDATE, 0, 1, word(MAX_WINDOW - 65535)))
        self.assertEqual(self.receiver.calls, [("window", 1)])
        self.assertStreamError(frame(WINDOW_UPDATE, 0, 1, word(1)), ErrorCodes.FLOW_CONTROL_ERROR)


class ClosedStreamTests(ConnectionTestCase):
    """Frames on closed streams: ignored after rproxy's reset, refused after a normal close, or forgotten."""

    def test_resetByUs(self) -> None:
        """Frames in flight on a stream rproxy reset are ignored, their DATA given back to the connection."""
        self.connect(1)
        self.conn.resetStream(1, ErrorCodes.CANCEL)
        self.assertEqual(self.sent(), [(RST_STREAM, 0, 1, word(ErrorCodes.CANCEL))])
        encoder = hpack.Encoder()
        encoder.encode(REQUEST)  # the connection's decoder saw BLOCK
        self.conn.receive(frame(DATA, PADDED, 1, b"\x10" + bytes(16383)))
        self.assertEqual(self.sent(), [])
        trailers = request(1, END_HEADERS | END_STREAM, encoder.encode([(b"x-new", b"1")]))
        others = (
            frame(WINDOW_UPDATE, 0, 1, word(1)) + frame(PRIORITY, 0, 1, bytes(5)) + frame(RST_STREAM, 0, 1, word(0))
        )
        self.conn.receive(frame(DATA, END_STREAM, 1, bytes(16384)) + trailers + others)
        self.assertEqual(self.receiver.calls, [])
        self.assertEqual(self.sent(), [(WINDOW_UPDATE, 0, 0, word(32768))])
        self.conn.receive(request(3, block=encoder.encode([*REQUEST, (b"x-new", b"1")])))  # trailers decoded
        self.assertEqual(self.receiver.calls, [("request", 3, [*REQUEST, (b"x-new", b"1")], True), ("ended", 3)])

    def test_resetByUsThenByClient(self) -> None:
        """
        Once the client's own RST_STREAM arrives for a stream rproxy reset, what follows on it was sent after
        that reset, never in flight (h2spec's "closed: Sends a HEADERS frame after sending RST_STREAM
        frame" when rproxy answered first): STREAM_CLOSED.
        """
        self.connect(1)
        self.conn.resetStream(1, ErrorCodes.NO_ERROR)
        self.conn.receive(frame(RST_STREAM, 0, 1, word(ErrorCodes.CANCEL)))
        self.assertConnectionError(ErrorCodes.STREAM_CLOSED, request(1))

    def test_closedNormally(self) -> None:
        """DATA or HEADERS on a stream closed by both ends, or reset by the client: STREAM_CLOSED."""
        for data in [frame(DATA, 0, 1, b"x"), request(1)]:
            for reset in [False, True]:
                self.connect()
                self.conn.receive(request(1, END_HEADERS | (0 if reset else END_STREAM)))
                if reset:
                    self.conn.receive(frame(RST_STREAM, 0, 1, word(ErrorCodes.CANCEL)))
                else:
                    self.assertTrue(self.conn.sendHeaders(1, RESPONSE, True))
                self.assertConnectionError(ErrorCodes.STREAM_CLOSED, data, f"reset: {reset}")

    def test_forgotten(self) -> None:
        """Beyond MAX_CLOSED_STREAMS, the oldest closed stream is forgotten: DATA on it gets RST_STREAM."""
        for streamID in range(1, 2 * MAX_CLOSED_STREAMS + 3, 2):
            self.conn.receive(request(streamID))
            self.conn.sendHeaders(streamID, RESPONSE, True)
        self.conn.take()
        self.receiver.calls.clear()
        self.conn.receive(frame(DATA, 0, 1, b"x"))
        self.assertEqual((self.receiver.calls, self.sent()), ([], [(RST_STREAM, 0, 1, word(ErrorCodes.STREAM_CLOSED))]))
        self.assertConnectionError(ErrorCodes.STREAM_CLOSED, frame(DATA, 0, 3, b"x"))


class SendTests(ConnectionTestCase):
    """What rproxy sends, and the client's flow control of it."""

    def test_response(self) -> None:
        """A response, read by h2's client; nothing more once the stream is closed."""
        client = self.handshake()
        client.send_headers(1, REQUEST, end_stream=True)
        self.conn.receive(client.data_to_send())
        self.assertEqual(self.receiver.calls, [("request", 1, REQUEST, True), ("ended", 1)])
        self.assertTrue(self.conn.sendHeaders(1, RESPONSE, False))
        self.assertTrue(self.conn.sendData(1, b"hello", True))
        events = self.heard(client)
        self.assertEqual(
            [type(event) for event in events],
            [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded],
        )
        self.assertEqual([tuple(field) for field in events[0].headers], RESPONSE)
        self.assertEqual(events[1].data, b"hello")
        self.assertIsNone(self.conn.window(1))
        self.assertFalse(self.conn.sendHeaders(1, RESPONSE, True))
        self.assertFalse(self.conn.sendData(1, b"", True))
        self.assertIsNone(self.conn.window(7))

    def test_window(self) -> None:
        """The window follows WINDOW_UPDATE, SETTINGS_INITIAL_WINDOW_SIZE (even below 0) and what is sent."""
        self.connect(1)
        window = self.conn.window
        self.assertEqual(window(1), 65535)
        self.conn.receive(frame(WINDOW_UPDATE, 0, 1, word(1000)))
        self.assertEqual(window(1), 65535)  # the connection's window
        self.conn.receive(frame(WINDOW_UPDATE, 0, 0, word(5000)))
        self.assertEqual(window(1), 66535)
        self.conn.receive(settingsFrame((INITIAL_WINDOW_SIZE, 100)))
        self.assertEqual(window(1), 1100)
        self.conn.receive(request(3, END_HEADERS))
        self.assertEqual(window(3), 100)
        self.assertTrue(self.conn.sendData(1, bytes(1100), False))
        self.assertEqual((window(1), window(3)), (0, 100))
        self.conn.receive(settingsFrame((INITIAL_WINDOW_SIZE, 0)))
        self.assertEqual((window(1), window(3)), (-100, 0))
        self.conn.receive(settingsFrame((INITIAL_WINDOW_SIZE, 70000)))
        self.assertTrue(self.conn.sendData(3, bytes(60000), False))
        self.assertEqual((window(1), window(3)), (9435, 9435))  # the connection's
        self.conn.receive(frame(WINDOW_UPDATE, 0, 0, word(100000)))
        self.assertEqual((window(1), window(3)), (69900, 10000))
        calls = [("window", 1), ("window", 0), ("window", 0), ("request", 3, REQUEST, False)]
        self.assertEqual(self.receiver.calls, [*calls, ("window", 0), ("window", 0), ("window", 0)])

    def test_headersContinuation(self) -> None:
        """A block over the client's SETTINGS_MAX_FRAME_SIZE is split into HEADERS and CONTINUATION frames."""
        client = self.handshake()
        client.send_headers(1, REQUEST, end_stream=True)
        self.conn.receive(client.data_to_send())
        large = [(b":status", b"200"), (b"x-large", b"v" * 40000)]
        self.conn.sendHeaders(1, large, True)
        data = self.conn.take()
        self.assertEqual(
            [(kind, flags, len(p)) for kind, flags, _, p in parse(data)][:2],
            [(HEADERS, END_STREAM, 16384), (CONTINUATION, 0, 16384)],
        )
        self.assertEqual(parse(data)[2][:2], (CONTINUATION, END_HEADERS))
        self.assertEqual([tuple(field) for field in self.heard(client, data)[0].headers], large)
        client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 65536})
        client.send_headers(3, REQUEST, end_stream=True)
        self.conn.receive(client.data_to_send())
        self.conn.take()
        self.conn.sendHeaders(3, large, True)
        self.assertEqual([kind for kind, _, _, _ in parse(self.conn.take())], [HEADERS])

    def test_headerTableSize(self) -> None:
        """The client's SETTINGS_HEADER_TABLE_SIZE reaches the encoder: a size update, then nothing indexed."""
        client = self.handshake()
        client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        client.send_headers(1, REQUEST, end_stream=True)
        client.send_headers(3, REQUEST, end_stream=True)
        self.conn.receive(client.data_to_send())
        self.heard(client)
        fields = [(b":status", b"200"), (b"x-custom", b"value")]
        self.conn.sendHeaders(1, fields, True)
        self.conn.sendHeaders(3, fields, True)
        data = self.conn.take()
        first, second = (payload for _, _, _, payload in parse(data))
        self.assertEqual((first[0], first[1:]), (0x20, second))  # RFC 7541 section 6.3
        self.assertEqual([[tuple(f) for f in event.headers] for event in self.heard(client, data)[::2]], [fields] * 2)


class ReceiveWindowTests(ConnectionTestCase):
    """What the client sends is given back to its windows as the protocol consumes it."""

    def test_acknowledge(self) -> None:
        """Half a default window consumed: a WINDOW_UPDATE for the connection and one for the stream."""
        client = self.handshake()
        client.send_headers(1, REQUEST)
        client.send_data(1, bytes(16384))
        client.send_data(1, bytes(16384))
        self.conn.receive(client.data_to_send())
        self.assertEqual(client.local_flow_control_window(1), 65535 - 32768)
        self.conn.acknowledge(32766, 1)
        self.assertEqual(self.conn.take(), b"")
        self.conn.acknowledge(1, 1)
        events = self.heard(client)
        self.assertEqual([(e.stream_id, e.delta) for e in events], [(0, 32767), (1, 32767)])
        self.assertEqual(client.local_flow_control_window(1), 65534)

    def test_noStreamUpdateAfterEnd(self) -> None:
        """Once the client ended the stream, only the connection's window is given back."""
        self.conn.receive(
            request(1, END_HEADERS) + frame(DATA, 0, 1, bytes(16384)) + frame(DATA, END_STREAM, 1, bytes(16383))
        )
        self.conn.acknowledge(32767, 1)
        self.assertEqual(self.sent(), [(WINDOW_UPDATE, 0, 0, word(32767))])


class ControlTests(ConnectionTestCase):
    """PING, PRIORITY and GOAWAY."""

    def test_ping(self) -> None:
        """A PING is answered with its payload, a PING ACK is not; the client's GOAWAY is heard."""
        client = self.handshake()
        client.ping(b"12345678")
        self.conn.receive(client.data_to_send())
        events = self.heard(client)
        self.assertEqual([(type(e), e.ping_data) for e in events], [(h2.events.PingAckReceived, b"12345678")])
        self.conn.receive(frame(PING, ACK, 0, b"12345678"))
        self.assertEqual(self.conn.take(), b"")
        self.conn.receive(frame(GOAWAY, 0, 0, word(0) + word(ErrorCodes.INTERNAL_ERROR) + b"debug"))
        self.assertEqual(self.receiver.calls, [("goaway", ErrorCodes.INTERNAL_ERROR)])

    def test_priority(self) -> None:
        """Priority for open and idle streams (in HEADERS: after the request), not for closed ones."""
        block = priority(0x80000000, 255) + BLOCK  # split: the priority is the HEADERS frame's
        self.conn.receive(frame(HEADERS, END_STREAM | PRIORITY_FLAG, 1, block[:7]))
        self.conn.receive(frame(CONTINUATION, END_HEADERS, 1, block[7:]))
        self.conn.receive(frame(PRIORITY, 0, 1, priority(3, 0)) + frame(PRIORITY, 0, 5, priority(1, 9)))
        self.conn.sendHeaders(1, RESPONSE, True)
        self.conn.receive(frame(PRIORITY, 0, 1, priority(0, 0)))
        expected = [("request", 1, REQUEST, True), ("priority", 1, 0, 256, True), ("ended", 1)]
        self.assertEqual(self.receiver.calls, [*expected, ("priority", 1, 3, 1, False), ("priority", 5, 1, 10, False)])

    def test_goAway(self) -> None:
        """GOAWAY names the last stream the client opened; after NO_ERROR, frames are still read."""
        client = self.handshake()
        client.send_headers(1, REQUEST, end_stream=True)
        client.send_headers(3, REQUEST, end_stream=True)
        self.conn.receive(client.data_to_send())
        self.conn.goAway(ErrorCodes.NO_ERROR)
        (event,) = self.heard(client)
        assert isinstance(event, h2.events.ConnectionTerminated)
        self.assertEqual((event.error_code, event.last_stream_id), (ErrorCodes.NO_ERROR, 3))
        self.conn.receive(frame(PING, 0, 0, bytes(8)))
        self.assertEqual(self.sent(), [(PING, ACK, 0, bytes(8))])

    def test_goAwayError(self) -> None:
        """After GOAWAY with an error, nothing more is read, even what the same read holds."""
        self.conn.receive(request(1))
        self.receiver.calls.clear()
        self.conn.goAway(ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(self.sent(), [(GOAWAY, 0, 0, word(1) + word(ErrorCodes.PROTOCOL_ERROR))])
        self.conn.receive(frame(PING, 0, 0, bytes(8)) + request(3))
        self.assertEqual((self.receiver.calls, self.conn.take()), ([], b""))

        class GoingAway(Recorder):
            def requestReceived(self, streamID: int, fields: list[Any], ended: bool) -> None:
                assert self.conn is not None
                self.conn.goAway(ErrorCodes.REFUSED_STREAM)

        receiver = GoingAway()
        self.conn = receiver.conn = ServerConnection(receiver, {})
        self.conn.receive(PREFACE + settingsFrame() + request(1) + frame(PING, 0, 0, bytes(8)))
        self.assertEqual([kind for kind, _, _, _ in self.sent()], [SETTINGS, SETTINGS, GOAWAY])
