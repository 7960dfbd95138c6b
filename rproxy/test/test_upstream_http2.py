"""
HTTP/2 upstreams (C{h2c://}, prior knowledge) through the proxy, with real sockets: a scripted h2 server
behind (L{rproxy.test.h2upstream}), HTTP/1.1 clients in front.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from rproxy.test.h2upstream import H2Upstream, ServerStream, echo
from rproxy.test.support import headerValues, rawRequest, responseStatus, sleep, splitResponses, startProxy, waitFor


def get(port: int, path: bytes, fields: bytes = b"", timeout: float = 10.0) -> defer.Deferred[bytes]:
    """One GET through the proxy on its own connection; the raw response."""
    return rawRequest(
        port, b"GET " + path + b" HTTP/1.1\r\nHost: app\r\nConnection: close\r\n" + fields + b"\r\n", timeout
    )


def post(port: int, path: bytes, body: bytes) -> defer.Deferred[bytes]:
    """One POST of C{body} through the proxy on its own connection; the raw response."""
    return rawRequest(
        port,
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body,
    )


def refusingFirstStream(testCase: unittest.TestCase) -> H2Upstream:
    """An HTTP/2 upstream that refuses its first stream (REFUSED_STREAM) and echoes the others."""

    def handler(stream: ServerStream) -> None:
        if len(server.streams) == 1:
            stream.reset(ErrorCodes.REFUSED_STREAM)
        else:
            echo(stream)

    server = H2Upstream(testCase, handler)
    return server


def splitResponse(response: bytes) -> tuple[bytes, bytes]:
    """The head and the (de-chunked) body of one raw response."""
    head, _, rest = response.partition(b"\r\n\r\n")
    if b"chunked" not in b",".join(headerValues(head, b"transfer-encoding")).lower():
        return splitResponses(response)[0]
    body = b""
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return head, body


def held(streams: list[ServerStream]) -> object:
    """A handler that keeps every stream unanswered, in C{streams}."""
    return streams.append


class _SlowReader(protocol.Protocol):
    """A client that sends a request, then reads only when told to."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.done: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


class BasicTests(unittest.TestCase):
    """Requests and responses over h2c, and what the server sees of them."""

    async def test_get(self) -> None:
        """A GET reaches the server as HTTP/2 with its pseudo-header fields; the answer comes back."""
        server = H2Upstream(self)
        proxy = startProxy(self, [server.url])
        head, body = splitResponse(await get(proxy.port, b"/x?y=1", b"X-Custom: A\r\n"))
        self.assertEqual((responseStatus(head), body), (200, b"GET /x?y=1 "))
        self.assertIn(b"2 rproxy", b",".join(headerValues(head, b"via")))
        stream = server.streams[0]
        self.assertEqual(
            (stream.header(b":scheme"), stream.header(b":authority"), stream.header(b"x-custom")),
            (b"http", b"app", b"A"),
        )
        self.assertIsNone(stream.header(b"connection"))

    async def test_post(self) -> None:
        """A body with a length is sent as DATA with content-length."""
        server = H2Upstream(self)
        proxy = startProxy(self, [server.url])
        response = await post(proxy.port, b"/p", b"hello")
        head, body = splitResponse(response)
        self.assertEqual((responseStatus(head), body), (200, b"POST /p hello"))
        self.assertEqual(server.streams[0].header(b"content-length"), b"5")

    async def test_largePostFlowControl(self) -> None:
        """A body larger than the server's windows waits for WINDOW_UPDATEs and arrives whole."""
        server = H2Upstream(self, initialWindow=1000)
        proxy = startProxy(self, [server.url])
        payload = bytes(range(256)) * 4096  # 1 MiB: many times the 1000-byte stream window
        response = await rawRequest(
            proxy.port,
            b"PUT /big HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(payload)
            + payload,
            timeout=20,
        )
        head, body = splitResponse(response)
        self.assertEqual(responseStatus(head), 200)
        self.assertEqual(server.streams[0].body, payload)

    async def test_requestTrailers(self) -> None:
        """A chunked request's trailers reach the server as a HEADERS frame that ends the stream."""
        server = H2Upstream(self)
        proxy = startProxy(self, [server.url])
        response = await rawRequest(
            proxy.port,
            b"POST /t HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n",
        )
        self.assertEqual(responseStatus(response), 200)
        self.assertEqual(server.streams[0].body, b"hello")
        self.assertEqual(server.streams[0].trailers, [(b"x-checksum", b"abc")])
        self.assertEqual(server.streams[0].header(b"te"), b"trailers")
        self.assertIsNone(server.streams[0].header(b"content-length"))

    async def test_responseTrailers(self) -> None:
        """Response trailers reach an HTTP/1.1 client that accepts them, after the chunked body."""

        def handler(stream: ServerStream) -> None:
            stream.respond(200, [(b"content-type", b"text/plain")], b"body", trailers=[(b"grpc-status", b"0")])

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        response = await get(proxy.port, b"/", b"TE: trailers\r\n")
        self.assertEqual(responseStatus(response), 200)
        self.assertIn(b"\r\n\r\n4\r\nbody\r\n0\r\ngrpc-status: 0\r\n\r\n", response)

    async def test_interim(self) -> None:
        """A 103 from the upstream reaches the client before the final response."""

        def handler(stream: ServerStream) -> None:
            stream.interim(103, [(b"link", b"</a.css>; rel=preload")])
            stream.respond(200, [], b"ok")

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        response = await get(proxy.port, b"/")
        self.assertTrue(response.startswith(b"HTTP/1.1 103 "), response[:80])
        self.assertIn(b"HTTP/1.1 200 ", response)

    async def test_headHasNoBody(self) -> None:
        """A HEAD response ends at its head."""

        def handler(stream: ServerStream) -> None:
            stream.respond(200, [(b"content-length", b"10")], b"")

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        response = await rawRequest(proxy.port, b"HEAD / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        self.assertEqual(responseStatus(response), 200)
        self.assertTrue(response.endswith(b"\r\n\r\n"))

    async def test_contentLengthPast63Bits(self) -> None:
        """
        An HTTP/2 upstream's content-length that an HTTP/1.1 client keeping lengths in 64 bits would wrap
        (reading 5 bytes, then the rest as another response): 502, never relayed, the stream reset.
        """

        def handler(stream: ServerStream) -> None:
            stream.respond(200, [(b"content-length", b"18446744073709551621")])
            stream.send(b"helloHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake")

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        head, body = splitResponses(await get(proxy.port, b"/x"))[0]
        self.assertEqual(responseStatus(head), 502)
        self.assertIn(b"sent a bad response: Content-Length 18446744073709551621 exceeds", body)
        self.assertTrue(await waitFor(lambda: server.streams[0].resetCode is not None, 2))


class MultiplexingTests(unittest.TestCase):
    """Streams share connections up to the server's limit."""

    async def test_concurrentRequestsShareOneConnection(self) -> None:
        """20 requests at once travel as 20 streams of one connection."""
        streams: list[ServerStream] = []
        server = H2Upstream(self, held(streams))  # type: ignore[arg-type]
        proxy = startProxy(self, [server.url])
        responses = [get(proxy.port, b"/%d" % i) for i in range(20)]
        self.assertTrue(await waitFor(lambda: len(streams) == 20))
        for stream in streams:
            stream.respond(200, [], stream.path)
        results = await defer.gatherResults(responses)
        self.assertEqual(sorted(splitResponse(r)[1] for r in results), sorted(b"/%d" % i for i in range(20)))
        self.assertEqual(len(server.connections), 1)
        self.assertEqual(proxy.upstreams[0].pool.openCount, 1)

    async def test_maxConcurrentStreamsWaits(self) -> None:
        """With one connection allowed, streams beyond the server's limit wait for a free slot."""
        streams: list[ServerStream] = []
        server = H2Upstream(self, held(streams), maxConcurrentStreams=2)  # type: ignore[arg-type]
        proxy = startProxy(self, [server.url], "--upstream-max-connections", "1")
        responses = [get(proxy.port, b"/%d" % i) for i in range(5)]
        self.assertTrue(await waitFor(lambda: len(streams) == 2))
        await sleep(0.2)
        self.assertEqual(len(streams), 2)  # the other three wait
        for answered in range(5):
            self.assertTrue(await waitFor(lambda answered=answered: len(streams) > answered))  # type: ignore[misc]
            self.assertLessEqual(len(streams) - answered, 2)  # never more than two unanswered at the server
            streams[answered].respond(200, [], b"ok")
        results = await defer.gatherResults(responses)
        self.assertEqual([responseStatus(r) for r in results], [200] * 5)
        self.assertEqual(len(server.connections), 1)

    async def test_maxConcurrentStreamsSecondConnection(self) -> None:
        """With two connections allowed, streams beyond the first one's limit open a second."""
        streams: list[ServerStream] = []
        server = H2Upstream(self, held(streams), maxConcurrentStreams=2)  # type: ignore[arg-type]
        proxy = startProxy(self, [server.url], "--upstream-max-connections", "2")
        responses = [get(proxy.port, b"/%d" % i) for i in range(4)]
        self.assertTrue(await waitFor(lambda: len(streams) == 4))
        self.assertEqual(len(server.connections), 2)
        for stream in streams:
            stream.respond(200, [], b"ok")
        results = await defer.gatherResults(responses)
        self.assertEqual([responseStatus(r) for r in results], [200] * 4)

    async def test_slowReaderDoesNotStallOtherStreams(self) -> None:
        """
        A client that stops reading pauses its own stream (its window closes), while another stream on the
        same connection carries a larger body to the end; the slow one then gets all of its body.
        """
        size = 8 * 1024 * 1024

        def handler(stream: ServerStream) -> None:
            stream.respond(200, [(b"content-length", b"%d" % size)], b"x" * size)

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        slow = _SlowReader(b"GET /slow HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        await protocol.ClientCreator(reactor, lambda: slow).connectTCP("127.0.0.1", proxy.port)
        self.assertTrue(await waitFor(lambda: len(server.streams) == 1))
        await sleep(0.3)  # the slow stream's window fills up
        fast = await get(proxy.port, b"/fast", timeout=20)
        head, body = splitResponse(fast)
        self.assertEqual((responseStatus(head), len(body)), (200, size))
        self.assertEqual(len(server.connections), 1)
        self.assertFalse(slow.done.called)
        self.assertLess(slow.received, size)
        slow.transport.resumeProducing()  # type: ignore[attr-defined]
        received = await slow.done
        self.assertGreater(received, size)


class CancelTests(unittest.TestCase):
    """Streams given up are reset with CANCEL."""

    async def test_clientGoneResetsStream(self) -> None:
        """A client that disconnects mid-request makes the proxy send RST_STREAM(CANCEL)."""
        streams: list[ServerStream] = []
        server = H2Upstream(self, held(streams))  # type: ignore[arg-type]
        proxy = startProxy(self, [server.url])
        client = await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP("127.0.0.1", proxy.port)
        client.transport.write(b"GET /wait HTTP/1.1\r\nHost: app\r\n\r\n")
        self.assertTrue(await waitFor(lambda: len(streams) == 1))
        client.transport.abortConnection()
        code = await streams[0].wasReset
        self.assertEqual(code, ErrorCodes.CANCEL)
        # The slot is free and the connection still serves.
        server.handler = echo
        self.assertEqual(responseStatus(await get(proxy.port, b"/next")), 200)
        self.assertEqual(len(server.connections), 1)

    async def test_responseTimeout(self) -> None:
        """No response head in time: 504 for the client, RST_STREAM(CANCEL) for the server."""
        streams: list[ServerStream] = []
        server = H2Upstream(self, held(streams))  # type: ignore[arg-type]
        proxy = startProxy(self, [server.url], "--response-timeout", "0.3", "--retries", "0")
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 504)
        self.assertIn(b"error=http_response_timeout", response)
        self.assertEqual(await streams[0].wasReset, ErrorCodes.CANCEL)


class ResetAndGoAwayTests(unittest.TestCase):
    """What the server's RST_STREAM and GOAWAY do to the exchanges."""

    async def test_refusedStreamIsRetried(self) -> None:
        """REFUSED_STREAM means the request was not processed: it is sent again, and the client sees 200."""
        server = refusingFirstStream(self)
        proxy = startProxy(self, [server.url], "--retries", "0")
        head, body = splitResponse(await get(proxy.port, b"/r"))
        self.assertEqual((responseStatus(head), body), (200, b"GET /r "))
        self.assertEqual(len(server.streams), 2)

    async def test_refusedPostIsRetriedWithItsBody(self) -> None:
        """
        A refused stream was provably not processed, so even a POST is sent again (on HTTP/1.1 a POST is
        never repeated once sent), with its body kept for it.
        """
        server = refusingFirstStream(self)
        proxy = startProxy(self, [server.url], "--retries", "0")
        response = await post(proxy.port, b"/r", b"hello")
        head, body = splitResponse(response)
        self.assertEqual((responseStatus(head), body), (200, b"POST /r hello"))
        self.assertEqual(len(server.streams), 2)

    async def test_postResetOtherwiseIsNotRetried(self) -> None:
        """A POST whose stream is reset with another code may have been processed: 502, not sent again."""

        def handler(stream: ServerStream) -> None:
            stream.reset(ErrorCodes.INTERNAL_ERROR)

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url], "--retries", "2")
        response = await post(proxy.port, b"/r", b"hello")
        self.assertEqual(responseStatus(response), 502)
        self.assertEqual(len(server.streams), 1)

    async def test_resetBeforeResponse(self) -> None:
        """Another reset before the head: a 502 naming it."""
        server = H2Upstream(self, lambda stream: stream.reset(ErrorCodes.INTERNAL_ERROR))
        proxy = startProxy(self, [server.url], "--retries", "0")
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"reset the stream (INTERNAL_ERROR) before responding", response)

    async def test_resetMidBody(self) -> None:
        """A reset after part of the body: the client's response is cut off, never complete-looking."""

        def handler(stream: ServerStream) -> None:
            stream.respond(200, [(b"content-type", b"text/plain")])
            stream.send(b"partial")
            reactor.callLater(0.1, stream.reset, ErrorCodes.INTERNAL_ERROR)

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 200)
        self.assertIn(b"partial", response)
        self.assertFalse(response.endswith(b"0\r\n\r\n"), response)

    async def test_goAwayRetriesUnprocessedStreams(self) -> None:
        """
        GOAWAY with a last stream id: the stream at or below it completes on the old connection, the one
        above it is sent again on a new connection, and both clients get 200.
        """
        streams: list[ServerStream] = []
        server = H2Upstream(self, held(streams))  # type: ignore[arg-type]
        proxy = startProxy(self, [server.url], "--retries", "0")
        first = get(proxy.port, b"/first")
        self.assertTrue(await waitFor(lambda: len(streams) == 1))
        second = get(proxy.port, b"/second")
        self.assertTrue(await waitFor(lambda: len(streams) == 2))
        server.handler = echo
        connection = server.connections[0]
        connection.goAway(lastStreamId=streams[0].streamId)
        await sleep(0.1)
        streams[0].respond(200, [], b"first done")
        head, body = splitResponse(await first)
        self.assertEqual((responseStatus(head), body), (200, b"first done"))
        head, body = splitResponse(await second)
        self.assertEqual((responseStatus(head), body), (200, b"GET /second "))
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(server.streams[-1].connection, server.connections[1])

    async def test_goAwayNewRequestsUseNewConnection(self) -> None:
        """After GOAWAY on an idle connection, the next request opens a new one."""
        server = H2Upstream(self)
        proxy = startProxy(self, [server.url])
        self.assertEqual(responseStatus(await get(proxy.port, b"/1")), 200)
        server.connections[0].goAway()
        await server.connections[0].closed
        self.assertEqual(responseStatus(await get(proxy.port, b"/2")), 200)
        self.assertEqual(len(server.connections), 2)

    async def test_idleTimeout(self) -> None:
        """
        A connection without streams is closed after --upstream-idle-timeout; one that got a stream in
        time stays open (the timer is re-aimed when its streams come and go).
        """
        server = H2Upstream(self)
        proxy = startProxy(self, [server.url], "--upstream-idle-timeout", "0.3")
        for path in (b"/1", b"/2", b"/3"):
            self.assertEqual(responseStatus(await get(proxy.port, path)), 200)
            await sleep(0.15)
        self.assertEqual(len(server.connections), 1)
        self.assertFalse(server.connections[0].closed.called)
        started = reactor.seconds()
        await server.connections[0].closed
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(responseStatus(await get(proxy.port, b"/4")), 200)
        self.assertEqual(len(server.connections), 2)


class KeepaliveTests(unittest.TestCase):
    """PINGs on silent connections."""

    async def test_pingWhileIdle(self) -> None:
        """A silent connection is pinged every interval; answered, it stays open."""
        server = H2Upstream(self)
        proxy = startProxy(self, [server.url], "--upstream-ping-interval", "0.1", "--upstream-ping-timeout", "1")
        self.assertEqual(responseStatus(await get(proxy.port, b"/")), 200)
        self.assertTrue(await waitFor(lambda: server.pings >= 2))
        self.assertFalse(server.connections[0].closed.called)

    async def test_unansweredPingCloses(self) -> None:
        """A PING without an answer in time closes the connection; the next request opens a new one."""
        server = H2Upstream(self)
        server.answerPings = False
        proxy = startProxy(self, [server.url], "--upstream-ping-interval", "0.1", "--upstream-ping-timeout", "0.2")
        self.assertEqual(responseStatus(await get(proxy.port, b"/")), 200)
        await server.connections[0].closed
        self.assertEqual(proxy.upstreams[0].pool.openCount, 0)
        server.answerPings = True
        self.assertEqual(responseStatus(await get(proxy.port, b"/")), 200)
        self.assertEqual(len(server.connections), 2)
