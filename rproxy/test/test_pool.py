"""
Upstream connection pooling and client connection handling, over real sockets.

Upstream connections are persistent and reused, the idle cap and idle timeout are applied, the
concurrency cap queues a bounded number of requests and refuses the rest with 503, a pooled
connection the upstream closed is not a client-visible failure, and clients get keep-alive,
pipelining and HTTP/1.0 right.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.trial import unittest

from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    headerValues,
    rawRequest,
    responseStatus,
    sleep,
    splitResponses,
    startProxy,
    waitFor,
)


def ok(body: bytes, *fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A 200 response with a Content-Length framed C{body} and extra header C{fields}."""
    head = [version + b" 200 OK", b"Content-Length: %d" % len(body), *fields]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def get(path: bytes, *fields: bytes, close: bool = True) -> bytes:
    """A GET request for C{path} (asking the proxy to close afterwards unless C{close} is false)."""
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: test.example", *fields]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def target(request: ReceivedRequest) -> bytes:
    """The request-target of a request the upstream received."""
    return request.requestLine.split(b" ")[1]


def echoTarget(proto: object, request: ReceivedRequest) -> bytes:
    """An upstream that answers every request with its target as the body."""
    return ok(target(request))


def single(testCase: unittest.TestCase, data: bytes) -> tuple[bytes, bytes]:
    """The one response in C{data}."""
    responses = splitResponses(data)
    testCase.assertEqual(len(responses), 1, f"expected one response, got {data!r}")
    return responses[0]


class Held:
    """
    An upstream responder that holds every request until the test answers it.

    @ivar requests: (connection, request) pairs, in arrival order.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[protocol.Protocol, ReceivedRequest]] = []

    def __call__(self, proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
        self.requests.append((proto, request))
        return b""

    def answer(self, index: int, response: bytes | None = None) -> None:
        proto, request = self.requests[index]
        proto.transport.write(ok(target(request)) if response is None else response)


class Client(protocol.Protocol):
    """A raw client connection that keeps everything it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed = True


async def connect(testCase: unittest.TestCase, port: int) -> Client:
    """A raw client connection to 127.0.0.1:C{port}, closed when the test ends."""
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

    def close() -> None:
        if not client.closed:
            client.transport.abortConnection()

    testCase.addCleanup(close)
    return client


def later(testCase: unittest.TestCase, seconds: float, f: Callable[[], object]) -> None:
    """Call C{f} in C{seconds}, unless the test has ended by then."""
    call: IDelayedCall = reactor.callLater(seconds, f)
    testCase.addCleanup(lambda: call.cancel() if call.active() else None)


class PersistentUpstreamConnectionTests(unittest.TestCase):
    """Upstream connections are kept, reused, capped, and expire."""

    timeout = 20

    async def test_sequentialRequestsReuseOneConnection(self) -> None:
        """Ten requests, each from a new client connection, travel over one upstream connection."""
        upstream = ScriptedUpstream(self, echoTarget)
        proxy = startProxy(self, [upstream.url])
        for i in range(10):
            head, body = single(self, await rawRequest(proxy.port, get(b"/r%d" % i)))
            self.assertEqual(responseStatus(head), 200)
            self.assertEqual(body, b"/r%d" % i)
        self.assertEqual(len(upstream.requests), 10)
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual(upstream.lost, [])
        pool = proxy.upstreams[0].pool
        self.assertEqual((pool.idleCount, pool.openCount), (1, 1))
        # The client's "Connection: close" is hop-by-hop: it must not close the upstream side.
        for request in upstream.requests:
            tokens = b",".join(request.headers(b"connection")).lower()
            self.assertNotIn(b"close", tokens)

    async def test_idleCap(self) -> None:
        """
        With C{--upstream-max-idle 2}, five connections opened for five concurrent requests are
        cut back to two idle ones once the responses are done.
        """
        held = Held()
        upstream = ScriptedUpstream(self, held)
        proxy = startProxy(self, [upstream.url], "--upstream-max-idle", "2")
        pending = [rawRequest(proxy.port, get(b"/c%d" % i), timeout=5) for i in range(5)]
        self.assertTrue(await waitFor(lambda: len(held.requests) == 5), held.requests)
        self.assertEqual(len(upstream.connections), 5)
        for i in range(5):
            held.answer(i)
        for i, data in enumerate(await defer.gatherResults(pending)):
            head, body = single(self, data)
            self.assertEqual((responseStatus(head), body), (200, b"/c%d" % i))
        pool = proxy.upstreams[0].pool
        self.assertTrue(await waitFor(lambda: len(upstream.lost) == 3), upstream.lost)
        self.assertEqual(pool.idleCount, 2)
        self.assertEqual(pool.openCount, 2)
        await sleep(0.1)
        self.assertEqual(len(upstream.lost), 3)

        # The two kept connections serve the next two concurrent requests.
        again = [rawRequest(proxy.port, get(b"/again%d" % i), timeout=5) for i in range(2)]
        self.assertTrue(await waitFor(lambda: len(held.requests) == 7), held.requests)
        self.assertEqual(len(upstream.connections), 5)
        held.answer(5)
        held.answer(6)
        for i, data in enumerate(await defer.gatherResults(again)):
            head, body = single(self, data)
            self.assertEqual((responseStatus(head), body), (200, b"/again%d" % i))

    async def test_idleTimeout(self) -> None:
        """With C{--upstream-idle-timeout 0.5}, the proxy closes an unused connection after ~0.5 s."""
        upstream = ScriptedUpstream(self, echoTarget)
        proxy = startProxy(self, [upstream.url], "--upstream-idle-timeout", "0.5")
        pool = proxy.upstreams[0].pool
        head, _ = single(self, await rawRequest(proxy.port, get(b"/first")))
        self.assertEqual(responseStatus(head), 200)
        idleSince = reactor.seconds()
        self.assertEqual(pool.idleCount, 1)

        await sleep(0.25)
        self.assertEqual(upstream.lost, [], "closed well before the idle timeout")
        self.assertEqual(pool.idleCount, 1)

        self.assertTrue(await waitFor(lambda: upstream.lost, 3.0), "idle connection never closed")
        elapsed = reactor.seconds() - idleSince
        self.assertTrue(0.4 <= elapsed <= 1.5, f"closed after {elapsed:.2f}s, not ~0.5s")
        self.assertEqual((pool.idleCount, pool.openCount), (0, 0))

        head, body = single(self, await rawRequest(proxy.port, get(b"/second")))
        self.assertEqual((responseStatus(head), body), (200, b"/second"))
        self.assertEqual(len(upstream.connections), 2)


class ConnectionLimitTests(unittest.TestCase):
    """C{--upstream-max-connections} with a bounded, timed wait queue."""

    timeout = 20

    def assertSaturated(self, data: bytes, *reasons: bytes) -> None:
        head, body = single(self, data)
        self.assertEqual(responseStatus(head), 503, data)
        self.assertEqual(headerValues(head, b"X-Rproxy-Fault"), [b"proxy"])
        self.assertIn(b"connection_limit_reached", b"".join(headerValues(head, b"Proxy-Status")))
        self.assertEqual(headerValues(head, b"Retry-After"), [b"1"])
        for reason in reasons:
            self.assertIn(reason, body)

    async def test_queueFull(self) -> None:
        """
        With two connections and a queue of one, a fourth concurrent request is refused with 503 at
        once; the queued third is served on the first connection that frees up.
        """
        held = Held()
        upstream = ScriptedUpstream(self, held)
        proxy = startProxy(self, [upstream.url], "--upstream-max-connections", "2", "--upstream-queue", "1")
        first = rawRequest(proxy.port, get(b"/1"), timeout=5)
        second = rawRequest(proxy.port, get(b"/2"), timeout=5)
        self.assertTrue(await waitFor(lambda: len(held.requests) == 2))
        third = rawRequest(proxy.port, get(b"/3"), timeout=5)
        await sleep(0.2)  # the third reaches the proxy and waits for a connection
        self.assertEqual(len(held.requests), 2)
        self.assertFalse(third.called)

        started = reactor.seconds()
        fourth = await rawRequest(proxy.port, get(b"/4"), timeout=5)
        self.assertLess(reactor.seconds() - started, 1.0, "the refusal should not wait")
        self.assertSaturated(fourth, b"limit of 2 connections", b"queue is full")
        self.assertFalse(third.called)

        held.answer(0)
        self.assertTrue(await waitFor(lambda: len(held.requests) == 3), "queued request not sent")
        self.assertIs(held.requests[2][0], held.requests[0][0], "the freed connection serves it")
        self.assertEqual(target(held.requests[2][1]), b"/3")
        held.answer(1)
        held.answer(2)
        for path, pending in ((b"/1", first), (b"/2", second), (b"/3", third)):
            head, body = single(self, await pending)
            self.assertEqual((responseStatus(head), body), (200, path))
        self.assertEqual(len(upstream.connections), 2)

    async def test_queueTimeout(self) -> None:
        """A request that waits longer than C{--queue-timeout} for a connection gets 503."""
        held = Held()
        upstream = ScriptedUpstream(self, held)
        proxy = startProxy(self, [upstream.url], "--upstream-max-connections", "1", "--queue-timeout", "0.3")
        first = rawRequest(proxy.port, get(b"/1"), timeout=5)
        self.assertTrue(await waitFor(lambda: len(held.requests) == 1))

        started = reactor.seconds()
        waited = await rawRequest(proxy.port, get(b"/2"), timeout=5)
        elapsed = reactor.seconds() - started
        self.assertTrue(0.25 <= elapsed <= 2.0, f"refused after {elapsed:.2f}s, not ~0.3s")
        self.assertSaturated(waited, b"limit of 1 connections", b"timed out after 0.3s")
        self.assertEqual(len(held.requests), 1)

        held.answer(0)
        head, body = single(self, await first)
        self.assertEqual((responseStatus(head), body), (200, b"/1"))
        # The timed-out waiter is gone: the connection goes idle and serves the next request.
        third = rawRequest(proxy.port, get(b"/3"), timeout=5)
        self.assertTrue(await waitFor(lambda: len(held.requests) == 2))
        held.answer(1)
        head, body = single(self, await third)
        self.assertEqual((responseStatus(head), body), (200, b"/3"))
        self.assertEqual(len(upstream.connections), 1)


class StaleConnectionTests(unittest.TestCase):
    """A pooled connection the upstream closed is not a client-visible failure."""

    timeout = 20

    async def test_closedAfterResponse(self) -> None:
        """
        The upstream answers the first request, then closes its side: the next GET gets a fresh
        connection and a normal response.
        """

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            if len(upstream.requests) == 1:
                proto.transport.write(ok(target(request)))
                proto.transport.loseConnection()
                return b""
            return ok(target(request))

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url])
        head, body = single(self, await rawRequest(proxy.port, get(b"/1")))
        self.assertEqual((responseStatus(head), body), (200, b"/1"))
        pool = proxy.upstreams[0].pool
        self.assertTrue(await waitFor(lambda: pool.openCount == 0))
        self.assertEqual(pool.idleCount, 0)

        head, body = single(self, await rawRequest(proxy.port, get(b"/2")))
        self.assertEqual((responseStatus(head), body), (200, b"/2"))
        self.assertEqual(len(upstream.connections), 2)

    async def closedWhenReused(self, *arguments: str) -> None:
        """
        The race the retry is for: the upstream closes an idle connection just as the proxy sends
        the next request on it (it reads the request and closes without a response byte).
        """

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            if proto is upstream.connections[0] and len(upstream.requests) > 1:
                proto.transport.loseConnection()
                return b""
            return ok(target(request))

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url], *arguments)
        head, body = single(self, await rawRequest(proxy.port, get(b"/1")))
        self.assertEqual((responseStatus(head), body), (200, b"/1"))
        self.assertEqual(proxy.upstreams[0].pool.idleCount, 1)

        head, body = single(self, await rawRequest(proxy.port, get(b"/2")))
        self.assertEqual((responseStatus(head), body), (200, b"/2"))
        self.assertEqual(len(upstream.connections), 2)
        self.assertEqual([target(r) for r in upstream.requests], [b"/1", b"/2", b"/2"])

    async def test_closedWhenReusedIsRetried(self) -> None:
        """A GET sent on a pooled connection that closes before any response byte is retried."""
        await self.closedWhenReused()

    async def test_closedWhenReusedIsRetriedAtConnectionLimit(self) -> None:
        """The retry also works when the stale connection was the only one allowed."""
        await self.closedWhenReused("--upstream-max-connections", "1")

    async def test_requestWithBodyIsNotRetried(self) -> None:
        """
        A POST with a body on a connection that closes is not retried (the upstream may have acted
        on it): the client gets a 502 blaming the upstream.
        """

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            if len(upstream.requests) > 1:
                proto.transport.loseConnection()
                return b""
            return ok(target(request))

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url])
        head, _ = single(self, await rawRequest(proxy.port, get(b"/1")))
        self.assertEqual(responseStatus(head), 200)

        post = b"POST /2 HTTP/1.1\r\nHost: test.example\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        head, _ = single(self, await rawRequest(proxy.port, post))
        self.assertEqual(responseStatus(head), 502)
        self.assertEqual(headerValues(head, b"X-Rproxy-Fault"), [b"upstream"])
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual(len(upstream.requests), 2)


class ClientConnectionTests(unittest.TestCase):
    """Keep-alive, pipelining and HTTP/1.0 on the client side."""

    timeout = 20

    def delayedEcho(self) -> Callable[[protocol.Protocol, ReceivedRequest], bytes]:
        """An upstream that answers C{/slow} after 0.2 s and everything else at once."""

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            if target(request) == b"/slow":
                later(self, 0.2, lambda: proto.transport.write(ok(b"/slow")))
                return b""
            return ok(target(request))

        return respond

    async def test_keepAlive(self) -> None:
        """Sequential requests on one HTTP/1.1 client connection are all answered on it."""
        upstream = ScriptedUpstream(self, echoTarget)
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port)
        for count, path in enumerate([b"/a", b"/b", b"/c"], 1):
            client.transport.write(get(path, close=False))
            answered = await waitFor(lambda n=count: len(splitResponses(client.received)) == n)
            self.assertTrue(answered, client.received)
        responses = splitResponses(client.received)
        self.assertEqual([body for _, body in responses], [b"/a", b"/b", b"/c"])
        self.assertEqual([responseStatus(head) for head, _ in responses], [200, 200, 200])
        await sleep(0.1)
        self.assertFalse(client.closed)

    async def test_connectionsAreTracked(self) -> None:
        """
        The site knows its open client connections (shutdown drains them, C{--max-connections}
        counts them): one while a client is connected, none once it has gone.
        """
        upstream = ScriptedUpstream(self, echoTarget)
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port)
        client.transport.write(get(b"/a", close=False))
        self.assertTrue(await waitFor(lambda: splitResponses(client.received)))
        self.assertEqual(len(proxy.site.connections), 1)
        client.transport.loseConnection()
        self.assertTrue(await waitFor(lambda: not proxy.site.connections))

    async def pipelined(self, paths: list[bytes]) -> None:
        upstream = ScriptedUpstream(self, self.delayedEcho())
        proxy = startProxy(self, [upstream.url])
        payload = b"".join(get(path, close=False) for path in paths[:-1]) + get(paths[-1])
        data = await rawRequest(proxy.port, payload, timeout=5)
        responses = splitResponses(data)
        self.assertEqual([body for _, body in responses], paths, data)
        self.assertEqual([responseStatus(head) for head, _ in responses], [200] * len(paths))
        self.assertEqual([target(r) for r in upstream.requests], paths)

    async def test_twoPipelined(self) -> None:
        """Two requests in one write get their responses in order (the first is the slower)."""
        await self.pipelined([b"/slow", b"/fast"])

    async def test_threePipelined(self) -> None:
        """Three requests in one write get their responses in order."""
        await self.pipelined([b"/slow", b"/b", b"/c"])

    async def http10(self, response: bytes) -> None:
        upstream = ScriptedUpstream(self, lambda proto, request: response)
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port)
        client.transport.write(b"GET /old HTTP/1.0\r\nHost: test.example\r\n\r\n")
        self.assertTrue(await waitFor(lambda: client.closed, 5.0), "the proxy kept it open")
        head, sep, body = client.received.partition(b"\r\n\r\n")
        self.assertTrue(sep, client.received)
        self.assertEqual(responseStatus(head), 200)
        self.assertEqual(body, b"hello")
        self.assertEqual(headerValues(head, b"Transfer-Encoding"), [])
        self.assertEqual(upstream.requests[0].requestLine, b"GET /old HTTP/1.1")

    async def test_http10Client(self) -> None:
        """An HTTP/1.0 client is served, and its connection closes after the response."""
        await self.http10(ok(b"hello"))

    async def test_http10ClientChunkedUpstream(self) -> None:
        """A chunked upstream response reaches an HTTP/1.0 client unchunked, delimited by close."""
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        await self.http10(chunked)


class UpstreamConnectionCloseTests(unittest.TestCase):
    """An upstream response that ends its connection's persistence is not reused."""

    timeout = 20

    async def notReused(self, response: bytes) -> None:
        upstream = ScriptedUpstream(self, lambda proto, request: response)
        proxy = startProxy(self, [upstream.url])
        pool = proxy.upstreams[0].pool
        head, body = single(self, await rawRequest(proxy.port, get(b"/1")))
        self.assertEqual((responseStatus(head), body), (200, b"ok"))
        # The upstream did not close: the proxy must.
        self.assertTrue(await waitFor(lambda: upstream.lost), "the proxy kept the connection")
        self.assertEqual((pool.idleCount, pool.openCount), (0, 0))
        head, body = single(self, await rawRequest(proxy.port, get(b"/2")))
        self.assertEqual((responseStatus(head), body), (200, b"ok"))
        self.assertEqual(len(upstream.connections), 2)

    async def test_connectionClose(self) -> None:
        """C{Connection: close} on an HTTP/1.1 response."""
        await self.notReused(ok(b"ok", b"Connection: close"))

    async def test_http10Response(self) -> None:
        """An HTTP/1.0 response without C{Connection: keep-alive}."""
        await self.notReused(ok(b"ok", version=b"HTTP/1.0"))

    async def test_http10KeepAliveResponseIsReused(self) -> None:
        """An HTTP/1.0 response with C{Connection: keep-alive} keeps its connection."""
        response = ok(b"ok", b"Connection: keep-alive", version=b"HTTP/1.0")
        upstream = ScriptedUpstream(self, lambda proto, request: response)
        proxy = startProxy(self, [upstream.url])
        for path in (b"/1", b"/2"):
            head, body = single(self, await rawRequest(proxy.port, get(path)))
            self.assertEqual((responseStatus(head), body), (200, b"ok"))
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual(upstream.lost, [])
