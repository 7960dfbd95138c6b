"""
HTTP/2 clients that try to exhaust the proxy (rproxy/downstream/http2.py, rproxy/downstream/h2connection.py),
over h2c and TLS:

 - a client that opens a huge flow-control window and stops reading holds a bounded amount of memory,
   and the upstream is paused;
 - a broken frame ends the connection with the error code RFC 9113 and RFC 7541 name, and the connection
   closes even over TLS, where a client that does not answer the close would otherwise hold it open;
 - a frame or header block trickled a byte at a time gets the header timeout, and PING frames do not
   keep an idle connection open;
 - what a client leaves behind is accounted for: the DATA a refused tunnel held goes back to the
   connection's window, tunnels the upstream closed count against SETTINGS_MAX_CONCURRENT_STREAMS while
   the client keeps its side open, and nothing sent after the client's GOAWAY is read.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.errors
import h2.settings
import hpack
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.trial import unittest
from wsproto.utilities import generate_accept_token

from rproxy.downstream.http2 import CLOSE_GRACE, CONNECTION_BUFFER, STREAM_BUFFER
from rproxy.test.certs import listenSiteTLS
from rproxy.test.h2client import H2Client
from rproxy.test.support import LogCapture, ReceivedRequest, ScriptedUpstream, sleep, startProxy, trickle, waitFor
from rproxy.test.test_observe_record import Recorder
from rproxy.test.test_streaming import MiB, _LargeUpstream, serve
from rproxy.test.test_websocket_h2 import WEBSOCKET

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ErrorCodes = h2.errors.ErrorCodes


def frame(kind: int, flags: int, streamID: int, payload: bytes) -> bytes:
    """One raw HTTP/2 frame (RFC 9113 section 4.1), whatever its contents."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", streamID) + payload


_HEADERS, _PRIORITY, _RST, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 1, 2, 3, 4, 6, 7, 8, 9
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1


class ResponseMemoryTests(unittest.TestCase):
    """
    A client that advertises the largest windows (2**31 - 1) and then stops reading: the proxy holds at
    most its own buffers for it, and the upstream waits.
    """

    async def unreadResponse(self, tls: bool) -> None:
        listening, built = serve(self, lambda: _LargeUpstream(256 * MiB))
        proxy = startProxy(self, [listening.url])
        port = listenSiteTLS(self, proxy.site) if tls else proxy.port
        client = await H2Client.connect(port, tls=tls, initialWindow=2**31 - 1)
        self.addCleanup(client.close)
        client.conn.increment_flow_control_window(2**31 - 1 - 65535)  # the connection's window too
        stream = client.request(b"GET", b"/large")
        await client.waitUntil(lambda: len(client.streams[stream].data) > 0)
        client.stopReading()
        large = built[0]
        sent = -1
        for _ in range(40):  # until the upstream has been paused for a while
            if large.sent == sent and large.paused:
                break
            sent = large.sent
            await sleep(0.25)
        self.assertTrue(large.paused, "the upstream was not paused")
        self.assertLess(large.sent, 48 * MiB, "the upstream wrote far more than the sockets hold")
        [connection] = [c.handler for c in proxy.site.connections]
        held = connection.streams[stream]._queuedBytes
        self.assertLessEqual(held, STREAM_BUFFER + 65536, "the proxy buffers what the client does not read")
        self.assertLessEqual(connection._queuedTotal, CONNECTION_BUFFER)

    async def test_h2c(self) -> None:
        await self.unreadResponse(tls=False)

    async def test_tls(self) -> None:
        await self.unreadResponse(tls=True)

    async def test_manyStreams(self) -> None:
        """Twenty unread streams of one connection: the connection's buffer bounds them together."""
        listening, built = serve(self, lambda: _LargeUpstream(64 * MiB))
        proxy = startProxy(self, [listening.url])
        client = await H2Client.connect(proxy.port, initialWindow=2**31 - 1)
        self.addCleanup(client.close)
        client.conn.increment_flow_control_window(2**31 - 1 - 65535)
        streams = [client.request(b"GET", b"/large/%d" % i) for i in range(20)]
        await client.waitUntil(lambda: all(client.streams[s].data for s in streams))
        client.stopReading()
        total = -1
        for _ in range(40):
            now = sum(u.sent for u in built)
            if now == total:
                break
            total = now
            await sleep(0.25)
        [connection] = [c.handler for c in proxy.site.connections]
        self.assertLessEqual(connection._queuedTotal, CONNECTION_BUFFER + 20 * 65536)
        self.assertLess(total, 20 * 48 * MiB)
        self.assertTrue(all(u.paused for u in built))


class ConnectionErrorTests(unittest.TestCase):
    """A broken frame: GOAWAY with the code the RFCs name, then the connection closes."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        self.proxy = startProxy(self, [self.upstream.url])
        self.logs = LogCapture(self)

    async def goAway(self, payload: bytes, port: int | None = None, tls: bool = False) -> tuple[int, float]:
        """Send C{payload} after the preface and SETTINGS; the GOAWAY's code, and how soon it closed."""
        client = await H2Client.connect(port or self.proxy.port, tls=tls)
        self.addCleanup(client.close)
        started = reactor.seconds()
        client.writeRaw(payload)
        await client.waitUntil(lambda: client.closed.called, timeout=CLOSE_GRACE + 5)
        assert client.goAway is not None
        return client.goAway.error_code, reactor.seconds() - started

    async def test_codes(self) -> None:
        good = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")])
        cases = {
            "an HPACK index past the table": (frame(_HEADERS, 5, 1, b"\xff\xff\xff\x7f"), ErrorCodes.COMPRESSION_ERROR),
            "a Huffman string that does not decode": (
                frame(_HEADERS, 5, 1, b"\x82\x84\x86\x41\x8f" + b"\xff" * 15),
                ErrorCodes.COMPRESSION_ERROR,
            ),
            "a table size update past the setting": (
                frame(_HEADERS, 5, 1, b"\x3f\xe1\xff\x03" + good),
                ErrorCodes.COMPRESSION_ERROR,
            ),
            "a field block cut short": (frame(_HEADERS, 5, 1, good + b"\x41"), ErrorCodes.COMPRESSION_ERROR),
            "a SETTINGS acknowledgement with a payload": (
                frame(_SETTINGS, _ACK, 0, bytes(6)),
                ErrorCodes.FRAME_SIZE_ERROR,
            ),
            "a PING of 7 bytes": (frame(_PING, 0, 0, bytes(7)), ErrorCodes.FRAME_SIZE_ERROR),
            "a SETTINGS of 5 bytes": (frame(_SETTINGS, 0, 0, bytes(5)), ErrorCodes.FRAME_SIZE_ERROR),
            "a WINDOW_UPDATE of 3 bytes": (frame(_WINDOW_UPDATE, 0, 0, bytes(3)), ErrorCodes.FRAME_SIZE_ERROR),
            "a frame over SETTINGS_MAX_FRAME_SIZE": (frame(0, 0, 1, bytes(20000)), ErrorCodes.FRAME_SIZE_ERROR),
            "a WINDOW_UPDATE of 0": (frame(_WINDOW_UPDATE, 0, 0, bytes(4)), ErrorCodes.PROTOCOL_ERROR),
            "a window past 2**31 - 1": (
                frame(_WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"),
                ErrorCodes.FLOW_CONTROL_ERROR,
            ),
            "HEADERS on stream 0": (frame(_HEADERS, 5, 0, good), ErrorCodes.PROTOCOL_ERROR),
            "a CONTINUATION without HEADERS": (frame(_CONTINUATION, 4, 1, good), ErrorCodes.PROTOCOL_ERROR),
        }
        recorder = Recorder()
        self.proxy.site.observers.append(recorder)
        for name, (payload, code) in cases.items():
            got, elapsed = await self.goAway(payload)
            self.assertEqual(ErrorCodes(got), code, name)
            self.assertLess(elapsed, 2, name)
            record = recorder.records[-1]  # each refused connection has its record
            self.assertEqual((record.status, record.fault), (400, "client"), name)
            self.assertIn(f"HTTP/2 connection closed with GOAWAY {code.name}: ", record.reason, name)
        self.assertEqual(len(recorder.records), len(cases))
        self.assertEqual(self.upstream.connections, [])
        logged = "\n".join(self.logs.formatted())
        self.assertIn("HTTP/2 connection error COMPRESSION_ERROR", logged)
        self.assertIn("HTTP/2 connection error FRAME_SIZE_ERROR", logged)

    async def test_tlsClosesAfterGoAway(self) -> None:
        """
        Over TLS, a client that neither reads nor answers the close: reset after the grace period
        (it used to stay open over a minute).
        """
        port = listenSiteTLS(self, self.proxy.site)
        client = await H2Client.connect(port, tls=True)
        self.addCleanup(client.close)
        started = reactor.seconds()
        client.writeRaw(frame(_PING, 0, 0, bytes(7)))
        await client.waitUntil(lambda: client.goAway is not None)
        client.stopReading()  # it never reads the close_notify, nor answers it
        await client.waitUntil(lambda: client.closed.called, timeout=CLOSE_GRACE + 5)
        self.assertEqual(ErrorCodes(client.goAway.error_code), ErrorCodes.FRAME_SIZE_ERROR)
        self.assertLess(reactor.seconds() - started, CLOSE_GRACE + 1.5)
        self.assertTrue(await waitFor(lambda: not self.proxy.site.connections, 1))

    async def test_tlsCodes(self) -> None:
        """The codes are the same over TLS, and the close is as quick for a client that reads."""
        port = listenSiteTLS(self, self.proxy.site)
        code, elapsed = await self.goAway(frame(_HEADERS, 5, 1, b"\xff\xff\xff\x7f"), port, tls=True)
        self.assertEqual(ErrorCodes(code), ErrorCodes.COMPRESSION_ERROR)
        self.assertLess(elapsed, CLOSE_GRACE + 1)

    async def test_otherConnectionsUnaffected(self) -> None:
        """A connection ended for its errors takes no other with it."""
        polite = await H2Client.connect(self.proxy.port)
        self.addCleanup(polite.close)
        await self.goAway(frame(_HEADERS, 5, 1, b"\xff\xff\xff\x7f"))
        response = await polite.response(polite.request(b"GET", b"/"))
        self.assertEqual((response.status, response.data), (200, b"ok"))


class SlowClientTests(unittest.TestCase):
    """Frames trickled a byte at a time get the header timeout (1 s here); PINGs do not hold idle connections."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        self.proxy = startProxy(self, [self.upstream.url], "--header-timeout", "1", "--client-timeout", "2")

    async def trickled(self, payload: bytes, interval: float = 0.2) -> tuple[Any, float]:
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        started = reactor.seconds()
        for byte in payload:
            if client.closed.called:
                break
            client.writeRaw(bytes([byte]))
            await sleep(interval)
        await client.waitUntil(lambda: client.closed.called, timeout=5)
        return client.goAway, reactor.seconds() - started

    async def test_headersTrickled(self) -> None:
        """A HEADERS frame whose bytes keep coming, too slowly: GOAWAY(ENHANCE_YOUR_CALM) after 1 s."""
        block = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/" + b"a" * 50), (b":scheme", b"http")])
        recorder = Recorder()
        self.proxy.site.observers.append(recorder)
        goAway, elapsed = await self.trickled(frame(_HEADERS, 5, 1, block + b"\x40"))
        assert goAway is not None
        [record] = recorder.records
        self.assertEqual((record.status, record.fault), (408, "client"), "too slow, as on HTTP/1.1")
        self.assertEqual(
            record.reason,
            "HTTP/2 connection closed with GOAWAY ENHANCE_YOUR_CALM: the client was too slow to send a frame",
        )
        self.assertEqual(ErrorCodes(goAway.error_code), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLess(elapsed, 3)
        self.assertEqual(self.upstream.connections, [])

    async def test_continuationsTrickled(self) -> None:
        """Each CONTINUATION arriving in time does not extend the header block's deadline."""
        block = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")])
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        started = reactor.seconds()
        client.writeRaw(frame(_HEADERS, 0, 1, block[:2]))
        for byte in block[2:] + b"\x40\x01a\x01b" * 5:
            if client.closed.called:
                break
            await sleep(0.3)
            client.writeRaw(frame(_CONTINUATION, 0, 1, bytes([byte])))
        await client.waitUntil(lambda: client.closed.called, timeout=5)
        assert client.goAway is not None
        self.assertEqual(ErrorCodes(client.goAway.error_code), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLess(reactor.seconds() - started, 3)

    async def test_prefaceTrickled(self) -> None:
        """A TLS client's preface trickled (no sniffing on the way): the same deadline."""
        port = listenSiteTLS(self, self.proxy.site)
        client = await H2Client.connect(port, tls=True)
        self.addCleanup(client.close)
        # The client sent its preface and SETTINGS already; a PING trickled after them.
        started = reactor.seconds()
        for byte in frame(_PING, 0, 0, bytes(8)):
            if client.closed.called:
                break
            client.writeRaw(bytes([byte]))
            await sleep(0.2)
        await client.waitUntil(lambda: client.closed.called, timeout=5)
        self.assertLess(reactor.seconds() - started, 3)

    async def test_tlsHandshakeTrickled(self) -> None:
        """A TLS ClientHello sent a byte at a time does not postpone the client timeout (2 s)."""
        port = listenSiteTLS(self, self.proxy.site)
        hello = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        hello.set_connect_state()
        with self.assertRaises(SSL.WantReadError):
            hello.do_handshake()
        data, elapsed = await trickle(port, hello.bio_read(65536), 0.1, timeout=10)
        self.assertEqual(data, b"")
        self.assertLess(elapsed, 4)

    async def test_pingsDoNotHoldIdle(self) -> None:
        """A connection without streams closes after the idle timeout (2 s), PINGs or not."""
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        started = reactor.seconds()
        for _ in range(20):
            if client.closed.called:
                break
            client.conn.ping(b"12345678")
            client.writeRaw(b"")
            await sleep(0.25)
        await client.waitUntil(lambda: client.closed.called, timeout=5)
        assert client.goAway is not None
        self.assertEqual(ErrorCodes(client.goAway.error_code), ErrorCodes.NO_ERROR)
        self.assertLess(reactor.seconds() - started, 4)

    async def test_quietStreamKeepsConnection(self) -> None:
        """A stream whose response takes longer than the idle timeout keeps its connection."""
        slow = ScriptedUpstream(self, lambda proto, request: b"")
        proxy = startProxy(self, [slow.url], "--client-timeout", "1")
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        stream = client.request(b"GET", b"/slow")
        await sleep(2.5)
        self.assertFalse(client.closed.called, "the idle timeout closed a busy connection")
        slow.connections[0].transport.write(_OK)
        response = await client.response(stream)
        self.assertEqual((response.status, response.data), (200, b"ok"))


def _switchAndClose(proto: Any, request: ReceivedRequest) -> bytes:
    """An upstream that completes a WebSocket handshake (101) and closes its connection at once."""
    [key] = request.headers(b"sec-websocket-key")
    proto.transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
    )
    proto.transport.loseConnection()
    return b""


class LeftoverTests(unittest.TestCase):
    """What a client's streams leave behind when they end: windows, stream slots, frames after a GOAWAY."""

    async def test_refusedTunnelGivesWindowBack(self) -> None:
        """
        An extended CONNECT's DATA waits, unacknowledged, until its tunnel opens.  When the upstream refuses
        it, the 48 KiB it held are given back to the connection's window (the stream's is gone with it), so
        that a 40 KiB upload sent next, within flow control, goes through whole.  They used to be kept: the
        connection had 16 KiB of window left for ever, and the upload stalled.
        """
        refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"
        upstream = ScriptedUpstream(self, lambda proto, request: refusal if request.headers(b"upgrade") else _OK)
        proxy = startProxy(self, [upstream.url])
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        tunnel = client.request(b"CONNECT", b"/socket", WEBSOCKET, endStream=False)
        client.send(tunnel, b"x" * 3 * 16384)  # with the HEADERS: within both windows of 65,535
        self.assertEqual(client.conn.outbound_flow_control_window, 65535 - 3 * 16384)
        refused = await client.response(tunnel)
        self.assertEqual((refused.status, refused.data), (403, b"nope"))
        await client.waitUntil(lambda: client.conn.outbound_flow_control_window == 65535, timeout=5)
        body = bytes(range(256)) * 160
        upload = client.request(b"POST", b"/upload", [(b"content-length", b"%d" % len(body))], endStream=False)
        client.send(upload, body, endStream=True)
        response = await client.response(upload, timeout=5)
        self.assertEqual((response.status, response.data), (200, b"ok"))
        self.assertEqual(
            [request.requestLine for request in upstream.requests], [b"GET /socket HTTP/1.1", b"POST /upload HTTP/1.1"]
        )
        self.assertEqual(upstream.requests[1].body, body)

    async def test_halfClosedTunnelsCount(self) -> None:
        """
        Tunnels the upstream closed at once (101, then its close: END_STREAM to the client), whose client
        never ends its side: each stream stays half-closed, and counts against
        SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 section 5.1.2), so that past the limit new streams are
        refused (REFUSED_STREAM, never sent upstream).  They used to be forgotten once the proxy's side
        ended, and a client could hold any number of streams open.
        """
        limit = 3
        upstream = ScriptedUpstream(self, _switchAndClose)
        proxy = startProxy(self, [upstream.url], "--h2-max-concurrent-streams", str(limit))
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        assert client.remoteSettings is not None
        self.assertEqual(client.remoteSettings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS], limit)
        # Make the client's h2 ignore the announced limit, to see the proxy enforce it.
        client.conn.remote_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            },
        )
        outcomes = []
        for _ in range(3 * limit):
            record = await client.response(client.request(b"CONNECT", b"/ws", WEBSOCKET, endStream=False), timeout=5)
            outcomes.append((record.status, record.ended, record.resetCode))
        accepted, refused = (200, True, None), (None, False, ErrorCodes.REFUSED_STREAM)
        self.assertEqual(outcomes, [accepted] * limit + [refused] * 2 * limit)
        self.assertEqual(len(upstream.requests), limit)
        self.assertIsNone(client.goAway)

    async def test_gracefulGoAway(self) -> None:
        """
        A client's GOAWAY(NO_ERROR) after its request: the request is still answered (RFC 9113 section 6.8:
        the GOAWAY names the last stream rproxy opened, none), then the connection closes; a stream the
        client opens after its GOAWAY is refused (REFUSED_STREAM), never routed; a GOAWAY with an error code
        ends the connection and its streams at once.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: b"" if b" /hang " in request.requestLine else _OK)
        proxy = startProxy(self, [upstream.url])
        goAway = frame(_GOAWAY, 0, 0, struct.pack(">II", 0, 0))
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        answered = client.request(b"GET", b"/before")
        client.writeRaw(goAway)
        response = await client.response(answered)
        self.assertEqual((response.status, response.data), (200, b"ok"))
        await client.waitUntil(lambda: client.closed.called, timeout=5)

        other = await H2Client.connect(proxy.port)
        self.addCleanup(other.close)
        slow = other.request(b"GET", b"/hang")
        self.assertTrue(await waitFor(lambda: len(upstream.requests) == 2))
        other.writeRaw(goAway)
        late = other.request(b"GET", b"/late")
        self.assertEqual((await other.response(late)).resetCode, ErrorCodes.REFUSED_STREAM)
        self.assertFalse(other.closed.called, "the stream in flight keeps the connection")
        other.writeRaw(frame(_GOAWAY, 0, 0, struct.pack(">II", 0, ErrorCodes.INTERNAL_ERROR)))
        await other.waitUntil(lambda: other.closed.called, timeout=5)
        self.assertFalse(other.streams[slow].ended)
        lines = [request.requestLine for request in upstream.requests]
        self.assertEqual(lines, [b"GET /before HTTP/1.1", b"GET /hang HTTP/1.1"])

    async def test_headersAfterGoAway(self) -> None:
        """
        A client's GOAWAY, and a HEADERS frame after it in the same write: the connection ends, and what
        followed the GOAWAY is not read, so the request is never routed: no record of it, nothing upstream
        (where an idle connection waits in the pool, to which a request routed would be handed at once).  It
        used to be read and routed on the closing connection, its exchange begun, then cancelled as the
        connection went.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url])
        records = Recorder()
        proxy.site.observers.append(records)
        logs = LogCapture(self)
        other = await H2Client.connect(proxy.port)
        self.addCleanup(other.close)
        first = await other.response(other.request(b"GET", b"/first"))
        self.assertEqual(first.status, 200)
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        block = hpack.Encoder().encode(
            [(b":method", b"GET"), (b":path", b"/after-goaway"), (b":scheme", b"http"), (b":authority", b"x")]
        )
        client.writeRaw(frame(_GOAWAY, 0, 0, struct.pack(">II", 0, 0)) + frame(_HEADERS, 5, 1, block))
        await client.waitUntil(lambda: client.closed.called, timeout=5)
        await sleep(0.2)
        self.assertEqual([record.target for record in records.records], [b"/first"])
        self.assertNotIn("after-goaway", "\n".join(logs.formatted()))
        self.assertEqual([request.requestLine for request in upstream.requests], [b"GET /first HTTP/1.1"])
        self.assertNotIn(b"/after-goaway", b"".join(upstream.received))
        self.assertEqual(len(upstream.connections), 1)
