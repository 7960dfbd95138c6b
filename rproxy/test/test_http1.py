"""The upstream HTTP/1.1 client's framing (rproxy/upstream/http1.py), over real sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from rproxy.downstream.body import RequestBodyPipe
from rproxy.errors import ProxyError
from rproxy.headers import Pairs
from rproxy.test.support import ReceivedRequest, ScriptedUpstream, rawRequest, startProxy, waitFor
from rproxy.testing import _GivenBody
from rproxy.upstream.connection import Delivery, RequestHead
from rproxy.upstream.http1 import _FIELD
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import Upstream


def trickle(response: bytes, close: bool = False):  # type: ignore[no-untyped-def]
    """A responder writing C{response} one byte per reactor turn (every read sees a fragment)."""

    def respond(protocol, request: ReceivedRequest) -> bytes:  # type: ignore[no-untyped-def]
        def send(i: int) -> None:
            if i < len(response):
                protocol.transport.write(response[i : i + 1])
                reactor.callLater(0, send, i + 1)
            elif close:
                protocol.transport.loseConnection()

        send(0)
        return b""

    return respond


def dechunk(body: bytes) -> bytes:
    """Decode a chunked body (as the proxy writes it: no extensions or trailers)."""
    decoded, rest = b"", body
    while True:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            return decoded
        decoded, rest = decoded + rest[:length], rest[length + 2 :]


class FramingTests(unittest.TestCase):
    async def through(self, response: bytes, close: bool = False, request: bytes = b"GET") -> bytes:
        upstream = ScriptedUpstream(self, trickle(response, close))
        proxy = startProxy(self, [upstream.url])
        return await rawRequest(proxy.port, request + b" / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    async def test_contentLengthFragmented(self) -> None:
        data = await self.through(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertIn(b"\r\nX-A: 1\r\n", data)
        self.assertTrue(data.endswith(b"\r\n\r\nhello"), data)

    async def test_chunkedFragmented(self) -> None:
        """
        Chunk extensions are ignored; the client gets the body re-chunked, and the trailers after it
        (a hop-by-hop one dropped).
        """
        data = await self.through(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\nKeep-Alive: 1\r\nGrpc-Status: 0\r\n\r\n"
        )
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(dechunk(body), b"hello world")
        self.assertTrue(body.endswith(b"\r\n0\r\nX-Trailer: t\r\nGrpc-Status: 0\r\n\r\n"), body)

    async def test_interimResponsesForwarded(self) -> None:
        """
        Interim responses (100 Continue, 103 Early Hints) reach the client ahead of the final response,
        without the fields their Connection lists (rproxy.test.test_continue covers Expect end to end).
        """
        data = await self.through(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        continued, interim, final = data.split(b"\r\n\r\n", 2)
        self.assertEqual(continued, b"HTTP/1.1 100 Continue")
        self.assertEqual(interim, b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload")
        self.assertTrue(final.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertTrue(final.endswith(b"ok"))

    async def test_closeDelimited(self) -> None:
        """No length and no chunking: the body ends when the upstream closes, and that is success."""
        data = await self.through(b"HTTP/1.1 200 OK\r\n\r\nuntil close", close=True)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(dechunk(body), b"until close", "the client's chunked body ends properly")

    async def test_headHasNoBody(self) -> None:
        """A HEAD response's Content-Length announces a body that does not follow."""
        data = await self.through(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", request=b"HEAD")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertIn(b"Content-Length: 1000", data)
        self.assertTrue(data.endswith(b"\r\n\r\n"))

    async def test_noContent(self) -> None:
        data = await self.through(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 204 No Content\r\n"), data)
        self.assertNotIn(b"Transfer-Encoding", data)

    async def test_blanksAroundValues(self) -> None:
        """Blanks before and after a field value are not part of it (RFC 9112 section 5)."""
        data = await self.through(b"HTTP/1.1 200 OK\r\nX-A: \t a  b \t\r\nX-B:  \r\nX-C:c\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"\r\nX-A: a  b\r\nX-B: \r\nX-C: c\r\n", data)

    async def test_obsFoldJoined(self) -> None:
        """Obsolete line folding is replaced by a space (RFC 9112 section 5.2)."""
        data = await self.through(b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"\r\nX-Long: a b\r\n", data)


class FieldLineTests(unittest.TestCase):
    """The one-regex fast path for a response's field lines agrees with the line-by-line parse."""

    def test_blanksBeforeValues(self) -> None:
        """Blanks before a value are not part of it (the parse sends lines with blanks after it the slow way)."""
        block = b"A:b\r\nB: \t two  words\r\nC:\r\nE: x\x01y\r\nF:\tz\r\n"
        self.assertEqual(
            _FIELD.findall(block),
            [(b"A", b"b"), (b"B", b"two  words"), (b"C", b""), (b"E", b"x\x01y"), (b"F", b"z")],
        )

    def test_notAFieldLine(self) -> None:
        """A line that is not a field as a whole matches nothing (the parse takes the slow path)."""
        for line in (b"no colon\r\n", b"bad name: v\r\n", b" folded: v\r\n", b"N: a\x00b\r\n", b"N: a\rb\r\n"):
            self.assertEqual(_FIELD.findall(line), [], line)


class _Outcome:
    """A response receiver that keeps how the exchange ended."""

    def __init__(self) -> None:
        self.failure: ProxyError | None = None
        self.done = False

    def responseInterim(self, status: int, headers: Pairs) -> None:
        pass

    def responseHead(self, version: bytes, status: int, reason: bytes, headers: Pairs, hasBody: bool) -> None:
        pass

    def responseData(self, data: bytes) -> None:
        pass

    def responseDone(self, trailers: Pairs) -> None:
        self.done = True

    def responseSwitched(self, headers: Pairs, side: Any) -> None:
        pass

    def responseFailed(self, error: ProxyError, delivery: Delivery) -> None:
        self.failure = error


#: What the client sends after its declared body, in the longer case: a request of its own making.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


class RequestBodyLengthTests(unittest.TestCase):
    """
    L{rproxy.upstream.http1.HTTP11Connection}'s backstop, whatever the client side checked: a request body
    longer or shorter than the Content-Length its head declared fails the exchange (400) and aborts the
    upstream connection, so the upstream never reads the excess as a request, nor the next request as the
    rest of the body.
    """

    async def exchange(self, declared: int, first: bytes) -> tuple[RequestBodyPipe, _Outcome, ScriptedUpstream]:
        """
        A POST of C{declared} bytes on a connection of a pool, to an upstream that never answers, its body's
        C{first} bytes received by the upstream.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: b"")
        pool = Upstream.fromURL(upstream.url, reactor, PoolSettings()).pool
        self.addCleanup(pool.drain)
        connection = await pool.acquire()
        pipe = RequestBodyPipe(_GivenBody(), declared)  # fed by hand below
        outcome = _Outcome()
        connection.sendRequest(
            RequestHead(b"POST", b"/b", b"x", b"http", [], bodyLength=declared, hasBody=True), pipe, outcome
        )
        pipe.dataReceived(first)
        self.assertTrue(await waitFor(lambda: upstream.received and upstream.received[0].endswith(b"\r\n\r\n" + first)))
        self.assertIn(b"\r\nContent-Length: %d\r\n" % declared, upstream.received[0])
        return pipe, outcome, upstream

    async def test_longer(self) -> None:
        """Bytes past the declared length are not written: the upstream sees the declared request, then a close."""
        pipe, outcome, upstream = await self.exchange(5, b"hello")
        pipe.dataReceived(SMUGGLED)
        self.assertTrue(await waitFor(lambda: upstream.lost, 2), "the upstream connection stayed open")
        assert outcome.failure is not None
        self.assertEqual(
            (outcome.failure.status, outcome.failure.reason),
            (400, "the request body is longer than its Content-Length"),
        )
        self.assertEqual([request.requestLine for request in upstream.requests], [b"POST /b HTTP/1.1"])
        self.assertEqual(upstream.requests[0].body, b"hello")
        self.assertNotIn(b"/smuggled", upstream.received[0])

    async def test_shorter(self) -> None:
        """A body that ends short is never completed on the connection: it is aborted, the request incomplete."""
        pipe, outcome, upstream = await self.exchange(10, b"12345")
        pipe.finish()
        self.assertTrue(await waitFor(lambda: upstream.lost, 2), "the upstream connection stayed open")
        assert outcome.failure is not None
        self.assertEqual(
            (outcome.failure.status, outcome.failure.reason),
            (400, "the request body ended 5 bytes short of its Content-Length"),
        )
        self.assertFalse(outcome.done)
        self.assertEqual(upstream.requests, [])
        self.assertTrue(upstream.received[0].endswith(b"\r\n\r\n12345"))
