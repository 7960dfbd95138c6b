"""
HTTP/2 on the client side, over real sockets: h2c with prior knowledge, TLS with ALPN, streaming and
flow control both ways, cancellation, and the per-connection limits (rproxy/downstream/http2.py,
rproxy/downstream/site.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import priority
from hpack import NeverIndexedHeaderTuple
from twisted.internet import protocol, reactor, task
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest
from twisted.web.http_headers import InvalidHeaderName

from rproxy.app.demo import demoSite
from rproxy.downstream.connection import PREFACE
from rproxy.downstream.http1 import HTTP11Server
from rproxy.downstream.http2 import HTTP2Server, _RoundRobin, responseFields
from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.site import ProxySite
from rproxy.test.certs import listenSiteTLS
from rproxy.test.h2client import H2Client
from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    curl,
    rawRequest,
    responseStatus,
    sleep,
    startProxy,
    startUpstream,
    waitFor,
)
from rproxy.test.test_streaming import MiB, _LargeUpstream, serve

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _hangOn(path: bytes) -> Callable[[Any, ReceivedRequest], bytes]:
    """An upstream script: requests for C{path} are never answered, others get 200 ok."""

    def respond(proto: Any, request: ReceivedRequest) -> bytes:
        return b"" if request.requestLine.split(b" ")[1] == path else _OK

    return respond


async def h2Connect(testCase: unittest.TestCase, port: int, **kwargs: object) -> H2Client:
    """An L{H2Client} connection, closed when the test ends."""
    client = await H2Client.connect(port, **kwargs)  # type: ignore[arg-type]
    testCase.addCleanup(client.close)
    return client


class PriorKnowledgeTests(unittest.TestCase):
    """A plain listener speaks HTTP/2 to a client that opens with the preface, HTTP/1.1 to others."""

    def setUp(self) -> None:
        self.upstream = startUpstream(self, demoSite())
        self.proxy = startProxy(self, [self.upstream.url])

    async def test_curl(self) -> None:
        """curl --http2-prior-knowledge gets HTTP/2, its body reaches the upstream whole; plain curl gets 1.1."""
        for flags, version, via in ((["--http2-prior-knowledge"], b"2", "2 rproxy"), ([], b"1.1", "1.1 rproxy")):
            code, out, err = await curl(
                ["-s", *flags, "-w", "\n%{http_version}", "--data-binary", "hello", self.proxy.url + "/echo"]
            )
            self.assertEqual(code, 0, err)
            body, _, seen = out.rpartition(b"\n")
            self.assertEqual(seen, version)
            echoed = json.loads(body)
            self.assertEqual((echoed["method"], echoed["bodyLength"]), ("POST", 5))
            self.assertIn(["Via", via], echoed["headers"])

    async def test_prefaceInPieces(self) -> None:
        """The preface split over several reads (one byte, then the rest) is still recognised."""
        state = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        state.initiate_connection()
        state.send_headers(
            1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")], end_stream=True
        )
        opening = state.data_to_send()
        client = _RawClient()
        await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.proxy.port)
        self.addCleanup(client.transport.abortConnection)
        for piece in (opening[:1], opening[1:9], opening[9:30], opening[30:]):
            client.transport.write(piece)
            await sleep(0.05)
        events: list[Any] = []

        def ended() -> bool:
            events.extend(state.receive_data(bytes(client.received)))
            client.received.clear()
            return any(isinstance(e, h2.events.StreamEnded) for e in events)

        self.assertTrue(await waitFor(ended, 5))
        statuses = [dict(e.headers)[b":status"] for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertEqual(statuses, [b"200"])

    def test_decision(self) -> None:
        """
        Bytes that could still be the preface are held; the first byte that cannot be goes to HTTP/1.1,
        with what was held (``P`` of ``PUT``); the whole preface switches to HTTP/2.
        """
        site = ProxySite(demoSite().resource, ClientLimits(), reactor=task.Clock())
        for opening, expected in (
            ([b"P", b"UT / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"], HTTP11Server),
            ([PREFACE[:5], PREFACE[5:]], HTTP2Server),
        ):
            wrapper = site.buildProtocol(None)
            transport = StringTransport()
            wrapper.makeConnection(transport)
            wrapper.dataReceived(opening[0])
            self.assertEqual(transport.value(), b"", "nothing is decided on a prefix of the preface")
            wrapper.dataReceived(opening[1])
            self.assertIsInstance(wrapper.handler, expected)
            if expected is HTTP11Server:
                self.assertTrue(transport.value().startswith(b"HTTP/1.1 501 "), transport.value())  # PUT /: no such
            else:
                self.assertEqual(transport.value()[3:4], b"\x04", "the server's SETTINGS frame")
            wrapper.connectionLost(protocol.connectionDone)

    async def test_upgradeH2cIgnored(self) -> None:
        """``Upgrade: h2c`` is not supported: answered over HTTP/1.1, and never forwarded."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url])
        data = await rawRequest(
            proxy.port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        self.assertEqual(responseStatus(data), 200)
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
        received = upstream.requests[0]
        self.assertEqual((received.headers(b"upgrade"), received.headers(b"http2-settings")), ([], []))


class BodilessResponseTests(unittest.TestCase):
    async def test_oneHeadersFrame(self) -> None:
        """
        A response without a body (204, or gRPC's trailers-only answer) is one HEADERS frame ending the
        stream, not HEADERS and an empty DATA; a response with one keeps its DATA.
        """
        upstream = ScriptedUpstream(
            self,
            lambda proto, request: (
                b"HTTP/1.1 204 No Content\r\nGrpc-Status: 5\r\n\r\n"
                if request.requestLine.startswith(b"GET /none")
                else _OK
            ),
        )
        proxy = startProxy(self, [upstream.url])
        client = await h2Connect(self, proxy.port)
        bodiless = await client.response(client.request(b"GET", b"/none"))
        self.assertEqual(
            (bodiless.status, bodiless.header(b"grpc-status"), bodiless.endedWithHead), (204, [b"5"], True)
        )
        full = await client.response(client.request(b"GET", b"/some"))
        self.assertEqual((full.status, full.data, full.endedWithHead, full.ended), (200, b"ok", False, True))


class _RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class TLSTests(unittest.TestCase):
    """HTTP/2 over TLS comes from ALPN on any TLS listener of the proxy's site."""

    async def test_alpn(self) -> None:
        upstream = startUpstream(self, demoSite())
        proxy = startProxy(self, [upstream.url])
        port = listenSiteTLS(self, proxy.site)
        url = f"https://127.0.0.1:{port}/echo"
        for flag, version in (("--http2", b"2"), ("--http1.1", b"1.1")):
            code, out, err = await curl(["-sk", flag, "-o", "/dev/null", "-w", "%{http_version}", url])
            self.assertEqual((code, out), (0, version), err)
        client = await h2Connect(self, port, tls=True)
        self.assertEqual(client.negotiatedProtocol, b"h2")
        response = await client.response(client.request(b"GET", b"/echo"))
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.data)["method"], "GET")


class DrainTests(unittest.TestCase):
    """
    Shutdown of an HTTP/2 connection: GOAWAY at once, the streams in flight finish, then the connection
    closes (over TLS too, where a registered producer used to hold the close until the grace ended).

    The client of the stream in flight is curl: h2, on which the test client is built, treats any
    GOAWAY as the end of the connection (python-hyper/h2#1181) and so cannot take a graceful one.
    """

    async def drained(self, tls: bool) -> None:
        calls: list[Any] = []

        def respond(proto: Any, request: ReceivedRequest) -> bytes:
            calls.append(reactor.callLater(0.5, proto.transport.write, _OK))
            return b""

        self.addCleanup(lambda: [call.cancel() for call in calls if call.active()])
        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url])
        if tls:
            port = listenSiteTLS(self, proxy.site)
            url, flags = f"https://127.0.0.1:{port}/slow", ["-k", "--http2"]
        else:
            url, flags, port = f"{proxy.url}/slow", ["--http2-prior-knowledge"], proxy.port
        idle = await h2Connect(self, port, tls=tls)
        busy = curl(["-s", *flags, "-w", " %{http_version}", url])
        self.assertTrue(await waitFor(lambda: upstream.requests))
        started = reactor.seconds()
        drained = proxy.site.drain(10, reactor)
        await idle.waitUntil(lambda: idle.closed.called, timeout=2)
        assert idle.goAway is not None
        self.assertEqual(idle.goAway.error_code, h2.errors.ErrorCodes.NO_ERROR)
        code, out, err = await busy
        self.assertEqual((code, out), (0, b"ok 2"), err)
        await drained
        self.assertLess(reactor.seconds() - started, 3, "the drain waited for the grace period")

    async def test_h2c(self) -> None:
        await self.drained(tls=False)

    async def test_tls(self) -> None:
        await self.drained(tls=True)

    async def test_streamAfterGoAwayRefused(self) -> None:
        """A stream that crosses the shutdown's GOAWAY is refused (REFUSED_STREAM: safe to send again)."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url])
        client = await h2Connect(self, proxy.port, gracefulGoAway=True)
        [connection] = [c.handler for c in proxy.site.connections]
        busy = client.request(b"POST", b"/held", endStream=False)  # keeps the connection draining
        self.assertTrue(await waitFor(lambda: connection.streams))
        connection.drain()
        # What a client sends before the GOAWAY reaches it (h2 would not send it after).
        late = client.request(b"GET", b"/late")
        response = await client.response(late)
        self.assertEqual(response.resetCode, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.assertEqual([r.requestLine for r in upstream.requests], [])
        assert client.goAway is not None
        self.assertEqual((client.goAway.error_code, client.goAway.last_stream_id), (0, busy))
        client.send(busy, b"body", endStream=True)  # the stream below the GOAWAY goes on, and ends it all
        response = await client.response(busy)
        self.assertEqual((response.status, response.data), (200, b"ok"))
        await client.waitUntil(lambda: client.closed.called)


class StreamingTests(unittest.TestCase):
    """Request and response bodies stream through HTTP/2 streams with flow control as backpressure."""

    async def test_requestBodyStreams(self) -> None:
        """The first part of a body reaches the upstream before the client has sent the rest."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url])
        client = await h2Connect(self, proxy.port)
        stream = client.request(b"POST", b"/up", [(b"content-type", b"text/plain")], endStream=False)
        client.send(stream, b"first-part;")
        self.assertTrue(
            await waitFor(lambda: upstream.connections and b"first-part;" in upstream.connections[0].buffer)
        )
        self.assertFalse(upstream.requests, "the request is not complete yet")
        client.send(stream, b"second-part", endStream=True)
        response = await client.response(stream)
        self.assertEqual((response.status, response.data), (200, b"ok"))
        received = upstream.requests[0]
        self.assertEqual(received.requestLine, b"POST /up HTTP/1.1")
        self.assertEqual(received.headers(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(received.body, b"first-part;second-part")

    async def test_closedWindowPausesUpstream(self) -> None:
        """
        A client whose stream window is exhausted (and never reopened) pauses the upstream: the upstream
        stops writing, and the proxy holds little for it; another stream of the same connection is
        served meanwhile; once the window reopens, the upstream writes again.
        """
        sizes = iter([64 * MiB, 1000])
        listening, built = serve(self, lambda: _LargeUpstream(next(sizes)))
        proxy = startProxy(self, [listening.url])
        client = await h2Connect(self, proxy.port, initialWindow=16384, autoAcknowledge=False)
        stream = client.request(b"GET", b"/large")
        await client.waitUntil(lambda: len(client.streams[stream].data) >= 16384)
        large = built[0]
        # The upstream writes until the sockets' buffers between it and the paused proxy are full (the
        # kernel grows them for a while), then stays paused.
        sent = -1
        for _ in range(20):
            if large.sent == sent and large.paused:
                break
            sent = large.sent
            await sleep(0.25)
        await sleep(0.5)
        self.assertTrue(large.paused, "the upstream was not paused")
        self.assertEqual(large.sent, sent, "the upstream kept writing")
        self.assertLess(sent, 16 * MiB)
        connection = next(iter(proxy.site.connections)).handler
        held = connection.streams[stream]._queuedBytes
        self.assertLess(held, MiB, "the proxy buffers what the client cannot take")

        other = await client.response(client.request(b"GET", b"/small"))
        self.assertEqual((other.status, other.data, other.ended), (200, bytes(1000), True))
        self.assertFalse(client.streams[stream].finished)

        client.autoAcknowledge = True  # the client reads on: the proxy's queue and the sockets drain
        client.acknowledge(stream, len(client.streams[stream].data))
        self.assertTrue(await waitFor(lambda: large.sent > sent, 5), "the upstream was not resumed")

    async def test_resetCancelsPausedUpstream(self) -> None:
        """RST_STREAM on a stream whose response is paused by flow control closes its upstream connection."""
        listening, built = serve(self, lambda: _LargeUpstream(64 * MiB))
        proxy = startProxy(self, [listening.url])
        client = await h2Connect(self, proxy.port, initialWindow=16384, autoAcknowledge=False)
        stream = client.request(b"GET", b"/large")
        self.assertTrue(await waitFor(lambda: built and built[0].paused, 5))
        client.reset(stream)
        self.assertTrue(await waitFor(lambda: built[0].lostAt is not None, 1.0), "the upstream connection stayed open")


class CancellationTests(unittest.TestCase):
    """A client that resets a stream or goes away cancels the upstream request within a second."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, _hangOn(b"/hang"))
        self.proxy = startProxy(self, [self.upstream.url])

    async def test_resetStream(self) -> None:
        """RST_STREAM closes the upstream connection; the client's connection serves the next stream."""
        client = await h2Connect(self, self.proxy.port)
        stream = client.request(b"GET", b"/hang")
        self.assertTrue(await waitFor(lambda: self.upstream.requests, 5))
        client.reset(stream)
        self.assertTrue(await waitFor(lambda: self.upstream.lost, 1.0), "the upstream request was not cancelled")
        response = await client.response(client.request(b"GET", b"/next"))
        self.assertEqual((response.status, response.data), (200, b"ok"))

    async def test_disconnect(self) -> None:
        """Closing the connection cancels every upstream request in flight on it."""
        client = await h2Connect(self, self.proxy.port)
        client.request(b"GET", b"/hang")
        client.request(b"POST", b"/hang", endStream=True)
        self.assertTrue(await waitFor(lambda: len(self.upstream.requests) == 2, 5))
        client.close()
        self.assertTrue(await waitFor(lambda: len(self.upstream.lost) == 2, 1.0), "upstream requests left running")


class LimitTests(unittest.TestCase):
    """SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_MAX_HEADER_LIST_SIZE and the Rapid Reset bound."""

    async def test_concurrentStreams(self) -> None:
        """
        The limit is announced; a stream beyond it is refused (REFUSED_STREAM, never sent upstream)
        while the others go on, and once one ends a new one is accepted.
        """
        upstream = ScriptedUpstream(self, _hangOn(b"/hang"))
        proxy = startProxy(self, [upstream.url], "--h2-max-concurrent-streams", "2")
        client = await h2Connect(self, proxy.port)
        assert client.remoteSettings is not None
        self.assertEqual(client.remoteSettings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS], 2)
        first = client.request(b"GET", b"/hang")
        client.request(b"GET", b"/hang")
        self.assertTrue(await waitFor(lambda: len(upstream.requests) == 2, 5))
        # Make the client's h2 ignore the announced limit, to see the proxy enforce it.
        client.conn.remote_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
        )
        refused = await client.response(client.request(b"GET", b"/ok"))
        self.assertEqual(refused.resetCode, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.assertIsNone(client.goAway)
        client.reset(first)
        self.assertTrue(await waitFor(lambda: upstream.lost, 1.0))
        accepted = await client.response(client.request(b"GET", b"/ok"))
        self.assertEqual((accepted.status, accepted.data), (200, b"ok"))
        self.assertEqual(len(upstream.requests), 3)

    async def test_headerListSize(self) -> None:
        """
        The limit is announced; a larger header list is refused with 431 and goes nowhere, and the
        connection goes on; one beyond four times the limits ends the connection (ENHANCE_YOUR_CALM).
        """
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url], "--h2-max-header-list-size", "4096")
        client = await h2Connect(self, proxy.port)
        assert client.remoteSettings is not None
        self.assertEqual(client.remoteSettings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE], 4096)
        fine = await client.response(client.request(b"GET", b"/", [(b"x-small", b"a" * 1000)]))
        self.assertEqual(fine.status, 200)
        client.conn.remote_settings = h2.settings.Settings(client=False)  # send it anyway
        big = await client.response(client.request(b"GET", b"/", [(b"x-big", b"a" * 8000)]))
        self.assertEqual(big.status, 431)
        self.assertIn(b"the request header list exceeds 4096 bytes", big.data)
        after = await client.response(client.request(b"GET", b"/"))
        self.assertEqual(after.status, 200)
        client.request(b"GET", b"/", [(b"x-huge", b"a" * 140000)])
        await client.waitUntil(lambda: client.closed.called)
        assert client.goAway is not None
        self.assertEqual(client.goAway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(len(upstream.requests), 2)

    async def test_rapidReset(self) -> None:
        """
        A client that opens and resets streams faster than the bound gets GOAWAY(ENHANCE_YOUR_CALM) and
        is disconnected; one that resets a few is served as usual.
        """
        upstream = ScriptedUpstream(self, _hangOn(b"/hang"))
        proxy = startProxy(self, [upstream.url], "--h2-reset-burst", "10", "--h2-reset-rate", "1")
        polite = await h2Connect(self, proxy.port)
        for _ in range(5):
            polite.reset(polite.request(b"GET", b"/hang"))
        response = await polite.response(polite.request(b"GET", b"/ok"))
        self.assertEqual(response.status, 200)
        self.assertIsNone(polite.goAway)

        flood = await h2Connect(self, proxy.port)
        for _ in range(30):
            flood.reset(flood.request(b"GET", b"/hang"))
        await flood.waitUntil(lambda: flood.closed.called)
        assert flood.goAway is not None
        self.assertEqual(flood.goAway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertFalse(polite.closed.called, "another client's connection is unaffected")


def _openStream(testCase: unittest.TestCase) -> tuple[Any, StringTransport, h2.connection.H2Connection]:
    """
    An L{HTTP2Server} on a memory transport with stream 1 open (a POST whose body has not come, so that
    nothing answers it), the stream's request, and the client's h2 state.  The transport's C{clock} runs
    the send loop.
    """
    clock = task.Clock()
    site = ProxySite(demoSite().resource, ClientLimits(), reactor=clock)
    wrapper = site.buildProtocol(None)
    transport = StringTransport()
    wrapper.makeConnection(transport)
    testCase.addCleanup(wrapper.connectionLost, protocol.connectionDone)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"POST"), (b":path", b"/echo"), (b":scheme", b"http"), (b":authority", b"x")])
    wrapper.dataReceived(client.data_to_send())
    clock.advance(0)  # the send loop sends the server's first frames
    channel = wrapper.handler
    testCase.assertIsInstance(channel, HTTP2Server)
    transport.clear()
    transport.clock = clock  # type: ignore[attr-defined]
    return channel.streams[1].request, transport, client


def _sent(transport: StringTransport) -> bytes:
    """What the server wrote, once its send loop has run."""
    transport.clock.advance(0)  # type: ignore[attr-defined]
    return transport.value()


def _responseHead(client: h2.connection.H2Connection, transport: StringTransport) -> list[tuple[bytes, bytes]]:
    events = client.receive_data(_sent(transport))
    (head,) = [event.headers for event in events if isinstance(event, h2.events.ResponseReceived)]
    return list(head)


def _grouped(fields: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """The fields by name, each name's values in order (the order of different names carries no meaning)."""
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        grouped.setdefault(name, []).append(value)
    return grouped


class HeadFastPathTests(unittest.TestCase):
    """
    The HTTP/2 stream's C{writeHead} builds the HEADERS frame from the field list, as Twisted's
    C{Headers} path and h2's normalisation would, and leaves what must be checked to them.
    """

    fields = [
        (b"Content-Type", b"text/plain"),
        (b"X-Multi", b"a"),
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"x-multi", b"b"),
        (b"Connection", b"close"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"close"),
        (b"Upgrade", b"websocket"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"2"),
        (b"X-Empty", b""),
        (b"X-Padded", b" padded\t"),
        (b"Set-Cookie", b"b=2"),
    ]

    def test_sameAsTwistedPath(self) -> None:
        """The fast path's fields are the slow path's: lowercased, stripped, connection fields dropped."""
        heads = []
        for fast in (True, False):
            request, transport, client = _openStream(self)
            request.responseHeaders.addRawHeader(b"X-Own", b"set by the proxy")
            if fast:
                self.assertTrue(request.channel.writeHead(request, 200, b"OK", self.fields, True))
            else:  # ProxyRequest.sendHead's way when writeHead declines
                request.setResponseCode(200, b"OK")
                for name, value in self.fields:
                    request.responseHeaders.addRawHeader(name, value)
                request.write(b"")
            self.assertTrue(request.startedWriting)
            self.assertEqual(request.code, 200)
            heads.append(_responseHead(client, transport))
        fast, slow = heads
        self.assertEqual((fast[0], slow[0]), ((b":status", b"200"), (b":status", b"200")))
        self.assertEqual(_grouped(fast), _grouped(slow))
        self.assertEqual(
            _grouped(fast),
            {
                b":status": [b"200"],
                b"x-own": [b"set by the proxy"],
                b"content-type": [b"text/plain"],
                b"x-multi": [b"a", b"b"],
                b"set-cookie": [b"a=1; Path=/", b"b=2"],
                b"content-length": [b"2"],
                b"x-empty": [b""],
                b"x-padded": [b"padded"],
            },
        )

    def test_noFields(self) -> None:
        """A head without fields is just its status."""
        request, transport, client = _openStream(self)
        self.assertTrue(request.channel.writeHead(request, 404, None, [], True))
        self.assertEqual(_responseHead(client, transport), [(b":status", b"404")])

    def test_invalidLeftToTwisted(self) -> None:
        """
        Fields that are not valid are not sent by the fast path: Twisted's path refuses a bad name (as on
        HTTP/1) and sanitises a value holding CR or LF.
        """
        for name in (b"Bad Name", b"x:y", b"", b"caf\xe9", b"x\r\ny"):
            self.assertIsNone(responseFields(200, [(b"ok", b"1"), (name, b"v")]), name)
            request, transport, client = _openStream(self)
            self.assertFalse(request.channel.writeHead(request, 200, None, [(b"ok", b"1"), (name, b"v")], True))
            self.assertEqual(_sent(transport), b"", "nothing sent")
            self.assertFalse(request.startedWriting)
            with self.assertRaises(InvalidHeaderName):
                request.sendHead(200, None, [(name, b"v")], True)
            self.assertEqual(_sent(transport), b"")
        for value in (b"a\r\nb", b"a\nb", b"a\x00b"):
            self.assertIsNone(responseFields(200, [(b"x-bad", value)]), value)
        request, transport, client = _openStream(self)
        request.sendHead(200, None, [(b"x-bad", b"a\r\nb")], True)
        self.assertEqual(_grouped(_responseHead(client, transport))[b"x-bad"], [b"a b"])

    def test_secretsNeverIndexed(self) -> None:
        """
        Credentials and short cookies are sent as HPACK never-indexed fields (what h2's normalisation
        does, RFC 7541 section 7.1.3); ``TE`` is connection-specific and dropped.
        """
        request, transport, client = _openStream(self)
        fields = [(b"Authorization", b"secret"), (b"proxy-authorization", b"p"), (b"Cookie", b"a=1"), (b"TE", b"x")]
        request.sendHead(200, None, [*fields, (b"x-plain", b"v")], True)
        head = _responseHead(client, transport)
        grouped = _grouped(head)
        self.assertEqual(grouped[b"authorization"], [b"secret"])
        self.assertNotIn(b"te", grouped)
        kinds = {field[0]: type(field) for field in head}
        self.assertEqual(kinds[b"authorization"], NeverIndexedHeaderTuple)
        self.assertEqual(kinds[b"proxy-authorization"], NeverIndexedHeaderTuple)
        self.assertEqual(kinds[b"cookie"], NeverIndexedHeaderTuple)
        self.assertNotEqual(kinds[b"x-plain"], NeverIndexedHeaderTuple)

    def test_plainLiteralsAndUniqueIdsNotIndexed(self) -> None:
        """
        Literals go without Huffman coding (the CPU it costs is the proxy's limit, not the bytes), and the
        request id, new for every response, is never indexed: it would only evict the fields that repeat.
        """
        request, transport, client = _openStream(self)
        identifier = b"0123456789abcdef0123456789abcdef"
        request.sendHead(200, None, [(b"x-request-id", identifier), (b"x-plain", b"some value")], True)
        data = _sent(transport)
        self.assertIn(identifier, data, "not Huffman-coded")
        self.assertIn(b"some value", data)
        head = _responseHead(client, transport)
        kinds = {field[0]: type(field) for field in head}
        self.assertEqual(kinds[b"x-request-id"], NeverIndexedHeaderTuple)
        self.assertNotEqual(kinds[b"x-plain"], NeverIndexedHeaderTuple)

    def test_bodilessWaitsForFinish(self) -> None:
        """Without a body the head still waits for C{finish}, to go as one HEADERS frame ending the stream."""
        request, transport, client = _openStream(self)
        request.sendHead(204, None, [(b"grpc-status", b"5")], False)
        self.assertEqual(_sent(transport), b"")
        request.finish()
        events = client.receive_data(_sent(transport))
        (head,) = [event for event in events if isinstance(event, h2.events.ResponseReceived)]
        self.assertIsNotNone(head.stream_ended)
        self.assertEqual(_grouped(list(head.headers))[b"grpc-status"], [b"5"])


class SchedulerTests(unittest.TestCase):
    """L{_RoundRobin}: the streams with something to send take turns; priorities hand over to the tree."""

    def test_turns(self) -> None:
        streams = _RoundRobin()
        for streamID in (1, 3, 5):
            streams.insert_stream(streamID)
        streams.block(3)
        self.assertEqual([next(streams) for _ in range(4)], [1, 5, 1, 5])
        streams.unblock(3)
        streams.unblock(3)  # twice: no matter
        self.assertEqual([next(streams) for _ in range(3)], [1, 5, 3])
        for streamID in (1, 5):
            streams.block(streamID)
        streams.remove_stream(3)
        self.assertRaises(priority.DeadlockError, next, streams)
        self.assertRaises(priority.DuplicateStreamError, streams.insert_stream, 1)
        self.assertRaises(KeyError, streams.block, 3)

    def test_tree(self) -> None:
        """The tree holds the same streams, blocked or not alike."""
        streams = _RoundRobin()
        for streamID in (1, 3):
            streams.insert_stream(streamID)
        streams.block(1)
        tree = streams.tree()
        self.assertEqual([next(tree) for _ in range(2)], [3, 3])
        tree.unblock(1)
        self.assertEqual(sorted(next(tree) for _ in range(2)), [1, 3])

    def test_prioritiesUseTheTree(self) -> None:
        """A client sending RFC 7540 priorities gets Twisted's priority tree, with its streams in it."""
        request, transport, client = _openStream(self)
        connection = request.channel.server
        self.assertIsInstance(connection.priority, _RoundRobin)
        client.prioritize(1, weight=32)
        connection.dataReceived(client.data_to_send())
        self.assertIsInstance(connection.priority, priority.PriorityTree)
        request.channel.writeHead(request, 200, None, [(b"content-length", b"2")], True)
        request.write(b"ok")
        request.finish()
        events = client.receive_data(_sent(transport))
        data = b"".join(event.data for event in events if isinstance(event, h2.events.DataReceived))
        self.assertEqual(data, b"ok")
        self.assertTrue(any(isinstance(event, h2.events.StreamEnded) for event in events))

    def test_hostAsked(self) -> None:
        """The connection's addresses are asked of the transport once, not per request."""
        request, transport, client = _openStream(self)
        self.assertIs(request.getHost(), request.getHost())
        self.assertEqual(request.getHost(), transport.getHost())
        self.assertFalse(request.isSecure())
