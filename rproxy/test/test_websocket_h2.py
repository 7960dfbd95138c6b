"""
WebSocket over HTTP/2 (RFC 8441, L{rproxy.tunnel.h2connect}): an h2-library client (L{H2Client}) opens WebSockets
with extended CONNECT, over h2c and over TLS with ALPN, through rproxy to a C{websockets} server that
speaks HTTP/1.1; the client frames its messages with wsproto's frame layer.
"""

from __future__ import annotations

import h2.settings
from twisted.internet import reactor
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

from rproxy.test.certs import listenSiteTLS
from rproxy.test.h2client import H2Client
from rproxy.test.support import RunningProxy, ScriptedUpstream, startProxy, waitFor
from rproxy.test.test_config import writeConfig
from rproxy.test.test_upgrade import tunnelsOf
from rproxy.test.test_websocket import WebSocketTestCase

#: The head of an extended CONNECT for a WebSocket, after ``:method``, ``:path``, ``:scheme``, ``:authority``.
WEBSOCKET = [(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")]


class WebSocketStream:
    """
    One WebSocket on a stream of an L{H2Client}: masked frames out, frames in as they parse.

    @ivar streamID: its stream.
    """

    def __init__(self, client: H2Client, streamID: int) -> None:
        self.client = client
        self.streamID = streamID
        self.writer = FrameProtocol(client=True, extensions=[])
        self.parser = FrameProtocol(client=True, extensions=[])
        self.frames: list[Frame] = []
        self._parsed = 0

    @classmethod
    async def open(cls, client: H2Client, path: bytes = b"/socket") -> WebSocketStream:
        """Send the extended CONNECT and wait for its answer's head."""
        streamID = client.request(b"CONNECT", path, WEBSOCKET, endStream=False)
        record = client.streams[streamID]
        await client.waitUntil(lambda: record.headers is not None or record.finished)
        return cls(client, streamID)

    def sendText(self, text: str) -> None:
        self.client.send(self.streamID, bytes(self.writer.send_data(text, True)))

    def sendBinary(self, data: bytes) -> None:
        self.client.send(self.streamID, bytes(self.writer.send_data(data, True)))

    def sendClose(self, code: int, reason: str) -> None:
        self.client.send(self.streamID, bytes(self.writer.close(code, reason)))

    def _parse(self) -> int:
        data = self.client.streams[self.streamID].data
        if len(data) > self._parsed:
            self.parser.receive_bytes(data[self._parsed :])
            self._parsed = len(data)
            self.frames.extend(self.parser.received_frames())
        return len(self.frames)

    async def frame(self, timeout: float = 10.0) -> Frame:
        """The next message from the server, as one frame (its fragments joined), or a control frame."""
        parts: list[Frame] = []
        record = self.client.streams[self.streamID]
        for _ in range(10000):  # fragments, each awaited with the timeout
            await self.client.waitUntil(lambda: self._parse() > 0 or record.finished, timeout)
            parts.append(self.frames.pop(0))
            if parts[-1].message_finished:
                break
        first, last = parts[0], parts[-1]
        if len(parts) == 1:
            return first
        payload = type(first.payload)().join(part.payload for part in parts)  # type: ignore[attr-defined]
        return Frame(first.opcode, payload, last.frame_finished, last.message_finished)


class ExtendedConnectTests(WebSocketTestCase):
    """RFC 8441 WebSockets through the proxy to an HTTP/1.1 WebSocket server."""

    async def connect(self, proxy: RunningProxy) -> H2Client:
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        return client

    async def test_settings(self) -> None:
        """The proxy's SETTINGS enable extended CONNECT."""
        client = await self.connect(await self.proxy())
        assert client.remoteSettings is not None
        self.assertEqual(client.remoteSettings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL), 1)

    async def test_echo(self) -> None:
        """The CONNECT gets 200 (the stream open), a text and a binary message echo back, counted as a tunnel."""
        proxy = await self.proxy()
        client = await self.connect(proxy)
        ws = await WebSocketStream.open(client)
        record = client.streams[ws.streamID]
        self.assertEqual(record.status, 200)
        self.assertFalse(record.finished)
        self.assertEqual(record.header(b"sec-websocket-accept"), [])
        self.assertEqual(record.header(b"via"), [b"1.1 rproxy"])
        ws.sendText("héllo")
        frame = await ws.frame()
        self.assertEqual((frame.opcode, frame.payload), (Opcode.TEXT, "héllo"))
        ws.sendBinary(b"\x00\x01\xff")
        frame = await ws.frame()
        self.assertEqual((frame.opcode, frame.payload), (Opcode.BINARY, b"\x00\x01\xff"))
        tunnels = tunnelsOf(proxy)
        self.assertEqual((len(tunnels.open), tunnels.counts.opened), (1, 1))
        ws.sendClose(1000, "bye")
        await client.response(ws.streamID)
        self.assertTrue(await waitFor(lambda: not tunnels.open))

    async def test_tls(self) -> None:
        """The same over TLS, with HTTP/2 from ALPN."""
        proxy = await self.proxy()
        client = await H2Client.connect(listenSiteTLS(self, proxy.site), tls=True)
        self.addCleanup(client.close)
        self.assertEqual(client.negotiatedProtocol, b"h2")
        ws = await WebSocketStream.open(client)
        self.assertEqual(client.streams[ws.streamID].status, 200)
        ws.sendText("over TLS")
        frame = await ws.frame()
        self.assertEqual(frame.payload, "over TLS")

    async def test_megabyteWithBackpressure(self) -> None:
        """
        A 1 MB binary message echoes back whole; while the client does not open its window, the proxy
        sends no more than the window's 65,535 bytes, and the rest follows as the client acknowledges.
        """
        proxy = await self.proxy()
        client = await H2Client.connect(proxy.port, autoAcknowledge=False)
        self.addCleanup(client.close)
        ws = await WebSocketStream.open(client)
        payload = bytes(range(256)) * 4096
        ws.sendBinary(payload)
        record = client.streams[ws.streamID]
        self.assertTrue(await waitFor(lambda: len(record.data) >= 65535))
        await waitFor(lambda: False, timeout=0.3)  # what more could come, if the window did not hold
        self.assertEqual(len(record.data), 65535)
        acknowledged = 0
        for _ in range(200):  # 1 MB in 64 KiB steps, bounded
            if len(record.data) > 1 << 20:
                break
            client.acknowledge(ws.streamID, len(record.data) - acknowledged)
            acknowledged = size = len(record.data)
            self.assertTrue(await waitFor(lambda size=size: len(record.data) > size))
        frame = await ws.frame()
        self.assertEqual((frame.opcode, frame.payload), (Opcode.BINARY, payload))

    async def test_clientCloses(self) -> None:
        """The client's close code and reason reach the upstream, whose close ends the stream."""
        client = await self.connect(await self.proxy())
        ws = await WebSocketStream.open(client)
        ws.sendClose(4001, "client leaves")
        frame = await ws.frame()
        self.assertEqual((frame.opcode, frame.payload), (Opcode.CLOSE, (4001, "client leaves")))
        record = await client.response(ws.streamID)
        self.assertTrue(record.ended)
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertEqual(self.server.closes[0], (4001, "client leaves"))

    async def test_upstreamCloses(self) -> None:
        """The upstream's close code and reason reach the client."""
        client = await self.connect(await self.proxy())
        ws = await WebSocketStream.open(client)
        ws.sendText("close 4002")
        frame = await ws.frame()
        self.assertEqual((frame.opcode, frame.payload), (Opcode.CLOSE, (4002, "asked to")))
        ws.sendClose(4002, "")
        record = await client.response(ws.streamID)
        self.assertTrue(record.ended)

    async def test_clientResets(self) -> None:
        """A client's RST_STREAM closes the upstream's connection within 1 s, and the tunnel."""
        proxy = await self.proxy()
        client = await self.connect(proxy)
        ws = await WebSocketStream.open(client)
        ws.sendText("hi")
        await ws.frame()
        client.reset(ws.streamID)
        started = reactor.seconds()
        self.assertTrue(await waitFor(lambda: self.server.closes, timeout=1.0))
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(self.server.closes[0][0], 1006)  # no close frame: abnormal closure
        self.assertTrue(await waitFor(lambda: not tunnelsOf(proxy).open))

    async def test_otherStreams(self) -> None:
        """Other streams of the connection are answered while a tunnel is open, which goes on working."""
        client = await self.connect(await self.proxy())
        ws = await WebSocketStream.open(client)
        ws.sendText("first")
        self.assertEqual((await ws.frame()).payload, "first")
        other = await client.response(client.request(b"GET", b"/plain"))
        self.assertEqual(other.status, 426)  # the websockets server's answer to a GET without Upgrade
        ws.sendText("second")
        self.assertEqual((await ws.frame()).payload, "second")

    async def test_plainConnect(self) -> None:
        """A CONNECT without :protocol is refused with 405, as on HTTP/1.1."""
        proxy = await self.proxy()
        client = await H2Client.connect(proxy.port, strict=False)  # older h2s refuse to send it
        self.addCleanup(client.close)
        record = await client.response(client.requestHead([(b":method", b"CONNECT"), (b":authority", b"example:443")]))
        self.assertEqual(record.status, 405)

    async def test_otherProtocol(self) -> None:
        """An extended CONNECT of another protocol than websocket is answered 501, and nothing goes upstream."""
        upstream = ScriptedUpstream(self, lambda proto, request: b"")
        proxy = startProxy(self, [upstream.url])
        client = await self.connect(proxy)
        streamID = client.request(b"CONNECT", b"/chat", [(b":protocol", b"rawproto")], endStream=False)
        record = await client.response(streamID)
        self.assertEqual(record.status, 501)
        self.assertIn(b"only websocket", record.data)
        self.assertEqual(upstream.requests, [])

    async def test_upstreamRefuses(self) -> None:
        """An upstream's 403 to the handshake is relayed as a response; the request it got was an Upgrade."""
        refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"
        upstream = ScriptedUpstream(self, lambda proto, request: refusal)
        proxy = startProxy(self, [upstream.url])
        client = await self.connect(proxy)
        streamID = client.request(b"CONNECT", b"/socket?x=1", WEBSOCKET, endStream=False)
        record = await client.response(streamID)
        self.assertEqual((record.status, record.data), (403, b"nope"))
        [request] = upstream.requests
        self.assertEqual(request.requestLine, b"GET /socket?x=1 HTTP/1.1")
        self.assertEqual(request.headers(b"upgrade"), [b"websocket"])
        self.assertEqual(request.headers(b"sec-websocket-version"), [b"13"])
        self.assertEqual(len(request.headers(b"sec-websocket-key")), 1)

    async def test_wrongAccept(self) -> None:
        """A 101 whose Sec-WebSocket-Accept is not that of the proxy's key is a 502."""
        switched = (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        upstream = ScriptedUpstream(self, lambda proto, request: switched)
        proxy = startProxy(self, [upstream.url])
        client = await self.connect(proxy)
        record = await client.response(client.request(b"CONNECT", b"/socket", WEBSOCKET, endStream=False))
        self.assertEqual(record.status, 502)
        self.assertIn(b"Sec-WebSocket-Accept", record.data)

    async def test_upstreamAnswers200(self) -> None:
        """A 2xx that is no switch would look like an open tunnel to the client: 502 instead."""
        upstream = ScriptedUpstream(self, lambda proto, request: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        proxy = startProxy(self, [upstream.url])
        client = await self.connect(proxy)
        record = await client.response(client.request(b"CONNECT", b"/socket", WEBSOCKET, endStream=False))
        self.assertEqual(record.status, 502)

    async def test_clientEndsStream(self) -> None:
        """The client's END_STREAM is a FIN to the upstream, which closes; the stream then ends."""
        proxy = await self.proxy()
        client = await self.connect(proxy)
        ws = await WebSocketStream.open(client)
        client.send(ws.streamID, b"", endStream=True)
        record = await client.response(ws.streamID)
        self.assertTrue(record.ended)
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertTrue(await waitFor(lambda: not tunnelsOf(proxy).open))

    async def test_messageAware(self) -> None:
        """On a route with message limits, the frames of an RFC 8441 WebSocket are parsed too: 1009 past the size."""
        url = await self.server.url()
        path = writeConfig(
            self,
            f'[services.chat]\nupstreams = ["{url}"]\n[[routes]]\nservice = "chat"\n'
            'websocket = { max-message-size = "64KiB" }\n',
        )
        proxy = startProxy(self, [], "--config", path)
        client = await self.connect(proxy)
        ws = await WebSocketStream.open(client)
        ws.sendBinary(b"x" * 65536)
        self.assertEqual(len((await ws.frame()).payload), 65536)
        ws.sendBinary(b"x" * 65537)
        frame = await ws.frame()
        self.assertEqual((frame.opcode, frame.payload[0]), (Opcode.CLOSE, 1009))
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertEqual(self.server.closes[0][0], 1009)
        counts = tunnelsOf(proxy).counts
        self.assertEqual((counts.closedByLimits, counts.messagesFromClients), (1, 1))
