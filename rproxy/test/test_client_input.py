"""
Bad client input gets a precise error and never reaches the upstream (rproxy/downstream/site.py, request.py).

Each case sends raw bytes to a real proxy listening on 127.0.0.1 and checks the status, the one-line
reason, the fault header, that the connection is closed, and what the upstream saw.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server

from rproxy.downstream.site import ProxySite
from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    rawRequest,
    sleep,
    splitResponses,
    startProxy,
    trickle,
    waitFor,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _answerOK(protocol: object, request: ReceivedRequest) -> bytes:
    return OK


class ClientInputTests(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, _answerOK)
        self.proxy = startProxy(self, [self.upstream.url], "--max-body-size", "1k", "--header-timeout", "1")

    async def refused(self, payload: bytes, status: int, reasonPart: bytes) -> bytes:
        """Send C{payload}; assert one error response C{status} whose reason mentions C{reasonPart}."""
        data = await rawRequest(self.proxy.port, payload, timeout=5)
        responses = splitResponses(data)
        self.assertEqual(len(responses), 1, data)
        head, body = responses[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
        self.assertIn(b"\r\nX-Rproxy-Fault: client", head)
        self.assertIn(b"\r\nProxy-Status: rproxy; error=http_request_error", head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertIn(reasonPart, body)
        self.assertEqual(body.count(b"\n"), 1, "the reason is one line")
        return body

    async def test_contentLengthAndTransferEncoding(self) -> None:
        """Both framings at once is the classic smuggling vector: 400, closed, nothing forwarded."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            b"both Content-Length and Transfer-Encoding",
        )
        self.assertEqual(self.upstream.requests, [])

    async def test_transferEncodingThenContentLength(self) -> None:
        """The order of the two fields does not matter."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            400,
            b"both Content-Length and Transfer-Encoding",
        )
        self.assertEqual(self.upstream.requests, [])

    async def test_conflictingContentLengths(self) -> None:
        """Two Content-Length fields that differ: 400."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            400,
            b"conflicting Content-Length",
        )
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd", 400, b"conflicting Content-Length"
        )
        self.assertEqual(self.upstream.requests, [])

    async def test_identicalContentLengths(self) -> None:
        """Identical repeated Content-Length values are one length (RFC 9112 section 6.3)."""
        data = await rawRequest(
            self.proxy.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertEqual(self.upstream.requests[0].body, b"abc")
        self.assertEqual(self.upstream.requests[0].headers(b"content-length"), [b"3"])

    async def test_invalidContentLength(self) -> None:
        """Signs, letters and hex are not lengths."""
        for value in (b"-1", b"+3", b"0x3", b"abc", b""):
            await self.refused(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\nabc",
                400,
                b"invalid Content-Length",
            )
        self.assertEqual(self.upstream.requests, [])

    async def test_unsupportedTransferEncoding(self) -> None:
        """Only plain chunked is accepted: anything a second parser could read differently is refused."""
        for value in (b"gzip, chunked", b"identity", b"chunked, chunked", b"xchunked"):
            await self.refused(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n",
                400,
                b"unsupported Transfer-Encoding",
            )
        self.assertEqual(self.upstream.requests, [])

    async def test_brokenChunkedFraming(self) -> None:
        """A bad chunk size mid-body: 400, and the upstream never sees the request complete."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nmore\r\n0\r\n\r\n",
            400,
            b"malformed chunked request body",
        )
        await sleep(0.2)
        self.assertEqual(self.upstream.requests, [], "a truncated body must not reach the upstream as complete")

    async def test_requestLineTooLong(self) -> None:
        """A request line over --max-request-line: 414."""
        await self.refused(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"request line exceeds 8192")
        self.assertEqual(self.upstream.requests, [])

    async def test_requestLineTooLongWithoutEnd(self) -> None:
        """A request line that never ends is cut off at the limit, not buffered forever."""
        await self.refused(b"GET /" + b"a" * 40000, 414, b"request line exceeds")

    async def test_headerSectionTooLarge(self) -> None:
        """A header section over --max-header-size: 431."""
        fields = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 4000) for i in range(10))
        await self.refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 431, b"header section exceeds")
        self.assertEqual(self.upstream.requests, [])

    async def test_tooManyHeaders(self) -> None:
        """More than --max-headers fields: 431."""
        fields = b"".join(b"X-F%d: v\r\n" % i for i in range(150))
        body = await self.refused(
            b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 431, b"more than 100 header fields"
        )
        self.assertTrue(body.startswith(b"431 Request Header Fields Too Large: "), body)
        self.assertEqual(self.upstream.requests, [])

    async def test_invalidHeaderName(self) -> None:
        """Whitespace before the colon (a smuggling vector) and other non-token names: 400."""
        await self.refused(
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc", 400, b"invalid request header name"
        )
        await self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, b"no colon")

    async def test_malformedRequestLine(self) -> None:
        """A request line that is not METHOD SP TARGET SP HTTP/1.x: 400."""
        await self.refused(b"GET  /  HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"malformed request line")
        await self.refused(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400, b"malformed request line")

    async def test_announcedBodyTooLarge(self) -> None:
        """A Content-Length over --max-body-size: 413 before anything is sent upstream."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"a" * 100, 413, b"exceeds the limit"
        )
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.upstream.connections, [])

    async def test_streamedBodyTooLarge(self) -> None:
        """A chunked body that grows over the limit while streaming: 413, upstream request aborted."""
        chunk = b"200\r\n" + b"a" * 0x200 + b"\r\n"
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n",
            413,
            b"exceeds the limit of 1024",
        )
        await sleep(0.2)
        self.assertEqual(self.upstream.requests, [], "the upstream must never see the oversize body complete")

    async def test_headTooSlow(self) -> None:
        """A head still incomplete after --header-timeout (slowloris): 408."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", 408, b"did not arrive within 1s")

    async def test_requestLineTrickled(self) -> None:
        """
        A request line sent a byte every 0.2 s keeps sending, yet the whole head must arrive within the
        header timeout (1 s): 408 and closed, counted from its first byte.
        """
        data, elapsed = await trickle(self.proxy.port, b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 0.2)
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
        self.assertIn(b"did not arrive within 1s", data)
        self.assertLess(elapsed, 3)
        self.assertEqual(self.upstream.connections, [])

    async def test_headerLinesTrickled(self) -> None:
        """Header lines that each arrive in time, but not the whole head: 408."""
        fields = b"".join(b"X-F%d: v\r\n" % i for i in range(20))
        data, elapsed = await trickle(self.proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 0.1, 8)
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
        self.assertLess(elapsed, 3)
        self.assertEqual(self.upstream.connections, [])

    async def test_prefaceTrickled(self) -> None:
        """The start of the HTTP/2 preface, held while it may be one, counts against the header timeout."""
        data, elapsed = await trickle(self.proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r", 0.2)
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
        self.assertLess(elapsed, 3)

    async def test_contentLengthPast63Bits(self) -> None:
        """
        An upstream that keeps lengths in 64 bits would wrap these, read 5 bytes, and take the rest for
        another request: 400, closed, nothing forwarded.
        """
        for value in (b"9223372036854775808", b"18446744073709551621", b"0" * 30 + b"18446744073709551621"):
            await self.refused(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
                b"helloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
                400,
                b"exceeds 9223372036854775807",
            )
        self.assertEqual(self.upstream.connections, [])

    async def test_contentLengthHugeNumber(self) -> None:
        """Thousands of digits (past what int() converts): 400, not a traceback."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400, b"exceeds"
        )
        self.assertEqual(self.upstream.connections, [])

    async def chunkedRefused(self, body: bytes, reasonPart: bytes) -> None:
        """A chunked body C{body}: 400 naming what broke, and the upstream never sees a complete request."""
        reason = await self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body, 400, reasonPart
        )
        self.assertIn(b"malformed chunked request body: ", reason)
        await sleep(0.1)
        self.assertEqual(self.upstream.requests, [], "the upstream saw a complete request")
        self.assertEqual(self.upstream.lost, self.upstream.connections, "an upstream request was left open")

    async def test_chunkSizePast63Bits(self) -> None:
        """17 hex digits, and a 16-digit size past 2**63 - 1: 400."""
        await self.chunkedRefused(b"10000000000000005\r\nhello\r\n0\r\n\r\n", b"invalid chunk size")
        await self.chunkedRefused(b"8000000000000000\r\nhello\r\n0\r\n\r\n", b"exceeds 9223372036854775807")

    async def test_chunkSizeOf24Digits(self) -> None:
        """Twisted's decoder waited for that many bytes, leaving the upstream request open: now 400."""
        await self.chunkedRefused(b"0" * 20 + b"0005\r\nhello\r\n0\r\n\r\n", b"invalid chunk size")
        await self.chunkedRefused(b"1" * 24 + b"\r\nhello\r\n0\r\n\r\n", b"invalid chunk size")

    async def test_lastChunkWithBareLF(self) -> None:
        """A last chunk followed by bare LFs: 400 at once (Twisted's decoder waited for a CRLF for ever)."""
        await self.chunkedRefused(b"5\r\nhello\r\n0\n\n", b"bare LF")
        await self.chunkedRefused(b"5\r\nhello\r\n0\r\n\nGET /smuggled HTTP/1.1\r\n\r\n", b"bare LF")

    async def test_chunkSizeWithBareLF(self) -> None:
        await self.chunkedRefused(b"5\nhello\r\n0\r\n\r\n", b"bare LF")

    async def test_chunkDataWithoutCRLF(self) -> None:
        """Data longer than its chunk size (the "funky chunks" of h11's CVE-2025-43859): 400."""
        await self.chunkedRefused(b"5\r\nhelloXX\r\n0\r\n\r\n", b"not followed by CRLF")

    async def test_chunkExtensionWithControl(self) -> None:
        await self.chunkedRefused(b"5;a=\x01\r\nhello\r\n0\r\n\r\n", b"control character")

    async def test_chunkExtensionAllowed(self) -> None:
        """A chunk extension is read past (and not forwarded)."""
        data = await rawRequest(
            self.proxy.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b'5 ; name="v"\r\nhello\r\n0\r\n\r\n',
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertEqual(self.upstream.requests[0].body, b"hello")

    async def test_transferEncodingOnHTTP10(self) -> None:
        """RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing."""
        await self.refused(
            b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
            b"Transfer-Encoding in an HTTP/1.0 request",
        )
        self.assertEqual(self.upstream.connections, [])

    async def test_missingHost(self) -> None:
        """RFC 9112 section 3.2: an HTTP/1.1 request without Host is 400."""
        await self.refused(b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400, b"must have a Host field")
        self.assertEqual(self.upstream.connections, [])

    async def test_twoHosts(self) -> None:
        """Which one would the upstream believe?  400."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"more than one Host field")
        self.assertEqual(self.upstream.connections, [])

    async def test_invalidHost(self) -> None:
        """A space, a slash, a tab, userinfo, a bad port: 400 each."""
        for host in (b"a b", b"a/b", b"a\tb", b"user@a", b"a:8o", b"[::zz]"):
            await self.refused(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400, b"invalid host")
        self.assertEqual(self.upstream.connections, [])

    async def test_http10WithoutHost(self) -> None:
        """HTTP/1.0 has no Host requirement: forwarded (with the upstream's own Host)."""
        data = await rawRequest(self.proxy.port, b"GET /old HTTP/1.0\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.0 200 "), data)
        self.assertEqual(self.upstream.requests[0].requestLine, b"GET /old HTTP/1.1")

    async def test_absoluteFormWithInvalidAuthority(self) -> None:
        await self.refused(b"GET http://a b/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"malformed request line")
        await self.refused(b"GET http://u@evil/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"invalid host 'u@evil'")
        self.assertEqual(self.upstream.connections, [])

    async def test_deleteInTarget(self) -> None:
        """Twisted's request-line check lets DEL through; rproxy does not."""
        await self.refused(b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"space or a control character")
        self.assertEqual(self.upstream.connections, [])

    async def test_connectRefused(self) -> None:
        """CONNECT has no meaning for a reverse proxy: 405."""
        await self.refused(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405, b"CONNECT")

    async def test_badTarget(self) -> None:
        """A target that is neither a path nor an absolute URL: 400."""
        await self.refused(b"GET foo HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"request target")

    async def test_absoluteFormTarget(self) -> None:
        """An absolute-form target is forwarded in origin form, its authority as Host."""
        data = await rawRequest(
            self.proxy.port, b"GET http://example.com/a%2Fb?q=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertEqual(self.upstream.requests[0].requestLine, b"GET /a%2Fb?q=1 HTTP/1.1")
        self.assertEqual(self.upstream.requests[0].headers(b"host"), [b"example.com"])

    async def test_otherClientsUnaffected(self) -> None:
        """While a client smuggles and another stalls mid-head, a well-formed request is served."""
        slow = rawRequest(self.proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", timeout=5)
        smuggler = rawRequest(
            self.proxy.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        )
        good = rawRequest(self.proxy.port, b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        slowData, smuggled, served = await defer.gatherResults([slow, smuggler, good])
        self.assertTrue(served.startswith(b"HTTP/1.1 200 "), served)
        self.assertTrue(smuggled.startswith(b"HTTP/1.1 400 "), smuggled)
        self.assertTrue(slowData.startswith(b"HTTP/1.1 408 "), slowData)
        self.assertEqual([r.requestLine for r in self.upstream.requests], [b"GET /fine HTTP/1.1"])

    async def test_pipelinedAfterBadRequestDropped(self) -> None:
        """Requests pipelined behind a refused one are never processed."""
        data = await rawRequest(
            self.proxy.port,
            b"GET /a HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertEqual(len(splitResponses(data)), 1)
        self.assertEqual(self.upstream.requests, [])


class ConnectionLimitTests(unittest.TestCase):
    async def test_overLimitRefusedWith503(self) -> None:
        """Past --max-connections a new client gets 503 and is closed; the open ones keep working."""
        upstream = ScriptedUpstream(self, _answerOK)
        proxy = startProxy(self, [upstream.url], "--max-connections", "2")
        held = [rawRequest(proxy.port, b"GET /held HTTP/1.1\r\nHost: x\r\n", timeout=2) for _ in range(2)]
        for _ in range(50):
            if len(proxy.site.connections) == 2:
                break
            await sleep(0.02)
        self.assertEqual(len(proxy.site.connections), 2)
        data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
        self.assertTrue(data.startswith(b"HTTP/1.1 503 "), data)
        self.assertIn(b"X-Rproxy-Fault: proxy", data)
        self.assertIn(b"limit of 2 connections", data)
        for pending in held:
            await pending
        await sleep(0.1)
        data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)


class _KeepAliveClient(protocol.Protocol):
    """A client on one connection: what it received, and when the proxy closed it."""

    def __init__(self) -> None:
        self.received = b""
        self.closedAt: float | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    @property
    def answered(self) -> int:
        """How many 200 responses arrived."""
        return self.received.count(b"HTTP/1.1 200 OK\r\n")

    def connectionLost(self, reason: Failure) -> None:
        self.closedAt = reactor.seconds()
        self.closed.callback(None)

    async def ask(self, target: bytes) -> None:
        """Send a GET for C{target} and wait for its whole response."""
        answered = self.answered
        self.transport.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await waitFor(lambda: self.answered > answered or self.closedAt, timeout=5)


def _answerSlowly(protocol: Any, request: ReceivedRequest) -> bytes:
    """Answer C{/slow} after 1.5 s, anything else at once."""
    if request.requestLine.split(b" ")[1] != b"/slow":
        return OK
    reactor.callLater(1.5, protocol.transport.write, OK)
    return b""


class IdleTimeoutTests(unittest.TestCase):
    """
    --client-timeout closes a client connection idle for that long: before its first request and
    between requests, never while a request is handled however long it takes.
    """

    def setUp(self) -> None:
        upstream = ScriptedUpstream(self, _answerSlowly)
        self.proxy = startProxy(self, [upstream.url], "--client-timeout", "0.5")

    async def connect(self) -> _KeepAliveClient:
        client = _KeepAliveClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.closedAt is None else None)
        return client

    async def assertClosedIdle(self, client: _KeepAliveClient) -> None:
        """The proxy closes C{client} after half a second of silence, counted from now."""
        idleSince = reactor.seconds()
        self.assertTrue(await waitFor(lambda: client.closedAt is not None, timeout=5))
        assert client.closedAt is not None
        self.assertGreaterEqual(client.closedAt - idleSince, 0.4)

    async def test_beforeFirstRequest(self) -> None:
        """A connection that never sends a request is closed."""
        await self.assertClosedIdle(await self.connect())

    async def test_afterResponse(self) -> None:
        """The idle time is counted from the end of the last response."""
        client = await self.connect()
        await client.ask(b"/")
        self.assertEqual(client.answered, 1)
        await self.assertClosedIdle(client)

    async def test_slowResponse(self) -> None:
        """A request that takes three times the timeout is answered, and the idle count starts after it."""
        client = await self.connect()
        await client.ask(b"/slow")
        self.assertEqual(client.answered, 1, client.received)
        self.assertIsNone(client.closedAt)
        await self.assertClosedIdle(client)

    async def test_busyConnectionKept(self) -> None:
        """Requests 0.3 s apart keep one connection open well past the timeout."""
        client = await self.connect()
        for _ in range(5):
            await client.ask(b"/")
            await sleep(0.3)
        self.assertEqual(client.answered, 5)
        self.assertIsNone(client.closedAt)


class _Recorder(resource.Resource):
    """A local resource recording each request it renders."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes, list[tuple[bytes, list[bytes]]], bytes]] = []

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        headers = sorted((name, list(values)) for name, values in request.requestHeaders.getAllRawHeaders())
        self.seen.append((request.method, request.uri, request.clientproto, headers, request.content.read()))
        return b"ok"


class _Transport(StringTransport):
    def unregisterProducer(self) -> None:
        self.producer = None  # a socket transport does not mind being asked twice


class WholeHeadTests(unittest.TestCase):
    """A head that arrives in one piece (ProxyHTTPChannel's own path) is read as Twisted reads it line by line."""

    def feed(self, chunks: list[bytes]) -> tuple[list[object], bytes]:
        recorder = _Recorder()
        site = ProxySite(recorder, reactor=Clock())
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert protocol is not None
        transport = _Transport(IPv4Address("TCP", "127.0.0.1", 8080), IPv4Address("TCP", "127.0.0.1", 5555))
        protocol.makeConnection(transport)
        for chunk in chunks:
            if transport.disconnecting:
                break  # a socket stops reading once it is closing
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(ConnectionDone()))
        return list(recorder.seen), transport.value()

    def assertSameAsByteByByte(self, payload: bytes) -> list[object]:
        whole = self.feed([payload])
        byteByByte = self.feed([payload[i : i + 1] for i in range(len(payload))])
        self.assertEqual(whole, byteByByte)
        return whole[0]

    def test_pipelined(self) -> None:
        """Requests in one piece, with bodies and repeated fields, in order."""
        seen = self.assertSameAsByteByByte(
            b"GET /a?x HTTP/1.1\r\nHost: h\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            b"GET /d HTTP/1.0\r\n\r\n"
        )
        self.assertEqual(
            [(method, uri, body) for method, uri, _, _, body in seen],
            [  # type: ignore[misc]
                (b"GET", b"/a?x", b""),
                (b"POST", b"/b", b"abc"),
                (b"PUT", b"/c", b"hi"),
                (b"GET", b"/d", b""),
            ],
        )

    def test_foldedAndLeadingEmptyLine(self) -> None:
        """An obsolete folded field and an empty line before the request line, as Twisted takes them."""
        seen = self.assertSameAsByteByByte(b"\r\nGET / HTTP/1.1\r\nHost: h\r\nX-Fold: a\r\n  b\r\n\r\n")
        self.assertEqual(len(seen), 1)

    def test_refusals(self) -> None:
        """Errors found in a whole head are the ones found line by line."""
        for payload in (
            b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/9.9\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
        ):
            whole, answer = self.feed([payload])
            self.assertEqual((whole, answer), self.feed([payload[i : i + 1] for i in range(len(payload))]), payload)
            self.assertTrue(answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 414 ", b"HTTP/1.1 431 ")), answer)


class IdleTimerTests(unittest.TestCase):
    """The idle timeout's timer, on a simulated clock."""

    def test_oneTimerPerConnection(self) -> None:
        """
        Requests re-aim the connection's two timers (the idle timeout's, and the head's, made for the first
        request) rather than schedule new ones each (a timer that fires unused lapses: requests here come
        within the header timeout of each other); the idle timeout still fires.
        """
        clock = Clock()
        site = ProxySite(_Recorder(), reactor=clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert channel is not None
        transport = _Transport(IPv4Address("TCP", "127.0.0.1", 8080), IPv4Address("TCP", "127.0.0.1", 5555))
        channel.makeConnection(transport)
        [idle] = clock.getDelayedCalls()
        timers = None
        for _ in range(3):
            clock.advance(site.limits.headerTimeout / 2)
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            if timers is None:
                timers = set(clock.getDelayedCalls())
                self.assertIn(idle, timers)
                self.assertEqual(len(timers), 2)
            self.assertEqual(set(clock.getDelayedCalls()), timers)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
        clock.advance(site.limits.idleTimeout - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
