"""
Conformance with the behaviours Go's C{net/http/httputil} C{reverseproxy_test.go} checks, for HTTP/1.1
without trailers, 1xx or Upgrade (see ../shared/notes/anchors.md section (b); each test names its Go
counterpart and number), plus the header, target and body rules a reverse proxy must keep.

Every test runs a real rproxy (L{startProxy}) on 127.0.0.1 in front of a raw L{ScriptedUpstream}, a
C{twisted.web} upstream or a small raw server of its own, with real client sockets, and checks what the
upstream received as well as what the client got, so that no test passes without traffic.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from rproxy.interfaces import IRequestFilter, IResponseFilter
from rproxy.proxy.exchange import Proxy
from rproxy.proxy.message import RequestContext
from rproxy.test.support import (
    ReceivedRequest,
    RunningProxy,
    ScriptedUpstream,
    _ScriptedProtocol,
    listen,
    rawRequest,
    sleep,
    startProxy,
    startUpstream,
    useFilters,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
MiB = 1 << 20

Respond = Callable[[_ScriptedProtocol, ReceivedRequest], bytes]


def deferredTest(
    function: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], defer.Deferred[None]]:
    """Run an C{async def} test method as a Deferred (trial waits for it, bounded by C{timeout})."""

    @functools.wraps(function)
    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(function(self))

    return run


def answer(response: bytes) -> Respond:
    """An upstream that answers every request with C{response}."""
    return lambda proto, request: response


def stall(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
    """An upstream that reads the request and never answers."""
    return b""


def hangUp(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
    """An upstream that reads the request and closes the connection without a response."""
    proto.transport.loseConnection()
    return b""


def get(target: bytes = b"/", extra: bytes = b"", host: bytes = b"example.com") -> bytes:
    """A GET request on a connection the client closes after the response."""
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n" + extra + b"\r\n"


@dataclass
class Response:
    """A response as the client received it, framing decoded."""

    statusLine: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: whether the framing says the whole body arrived (C{None}: delimited by the connection's close)
    complete: bool | None

    @property
    def status(self) -> int:
        return int(self.statusLine.split(b" ")[1])

    def values(self, name: bytes) -> list[bytes]:
        """Every value of field C{name} (case-insensitive), in order."""
        return [value for key, value in self.headers if key.lower() == name.lower()]


def parseResponse(data: bytes) -> Response:
    """Parse one raw response (Content-Length, chunked or close-delimited)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise AssertionError(f"no complete response head in {data[:300]!r}")
    lines = data[:end].split(b"\r\n")
    rest = data[end + 4 :]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    response = Response(lines[0], headers, b"", None)
    if b"chunked" in b",".join(response.values(b"transfer-encoding")).lower():
        body, complete = _dechunk(rest)
        response.body, response.complete = body, complete
    elif response.values(b"content-length"):
        size = int(response.values(b"content-length")[0])
        response.body, response.complete = rest[:size], len(rest) >= size
    else:
        response.body = rest
    return response


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body; whether its last chunk and the final CRLF arrived."""
    body = b""
    position = 0
    while True:
        eol = data.find(b"\r\n", position)
        if eol < 0:
            return body, False
        try:
            size = int(data[position:eol].split(b";")[0], 16)
        except ValueError:
            return body, False
        if size == 0:
            return body, data[eol + 2 : eol + 4] == b"\r\n"
        chunk = data[eol + 2 : eol + 2 + size]
        body += chunk
        if len(chunk) < size or data[eol + 2 + size : eol + 4 + size] != b"\r\n":
            return body, False
        position = eol + 4 + size


class StreamClient(protocol.Protocol):
    """A raw client that keeps everything it receives and notes when the connection ends."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.closed.callback(None)


async def waitUntil(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll C{check} every 10 ms until it is true; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await sleep(0.01)


def proxyOf(running: RunningProxy) -> Proxy:
    """The L{Proxy} behind a running proxy's site (to plug filters in, as a user's code would)."""
    proxy = running.site.resource.proxy
    assert isinstance(proxy, Proxy)
    return proxy


class FilterBrokeError(Exception):
    """Raised by a response filter that fails."""


@implementer(IResponseFilter)
class ResponseFilter:
    """Records what each exchange looked like when its response arrived, optionally changes or fails."""

    def __init__(self, add: tuple[bytes, bytes] | None = None, fail: bool = False) -> None:
        self.add = add
        self.fail = fail
        self.seen: list[dict[str, Any]] = []

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.seen.append(
            {
                "inboundTarget": context.inbound.target,
                "inboundHeaders": [
                    (name.lower(), value)
                    for name, values in context.inbound.headers.getAllRawHeaders()
                    for value in values
                ],
                "outboundTarget": context.outbound.target,
            }
        )
        if self.fail:
            raise FilterBrokeError("the filter broke")
        if self.add is not None:
            headers.append(self.add)


class _EventStream(resource.Resource):
    """A twisted.web SSE source: the first event at once, the rest when the test says."""

    isLeaf = True

    def __init__(self, contentType: bytes) -> None:
        super().__init__()
        self.contentType = contentType
        self.requests: list[server.Request] = []

    def render_GET(self, request: server.Request) -> object:
        request.setHeader(b"content-type", self.contentType)
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"data: one\n\n")
        self.requests.append(request)
        return server.NOT_DONE_YET


class _Dribble(resource.Resource):
    """A twisted.web upstream writing C{count} pieces C{interval} seconds apart."""

    isLeaf = True

    def __init__(self, count: int, interval: float) -> None:
        super().__init__()
        self.count = count
        self.interval = interval
        self.finished = False
        self.calls: list[Any] = []

    def render_GET(self, request: server.Request) -> object:
        request.setHeader(b"content-type", b"text/plain")

        def piece(n: int) -> None:
            if request._disconnected:
                return
            request.write(b"piece %d;" % n)
            if n + 1 < self.count:
                self.calls.append(reactor.callLater(self.interval, piece, n + 1))
            else:
                request.finish()
                self.finished = True

        piece(0)
        return server.NOT_DONE_YET


class _PostBreaker(protocol.Protocol):
    """A broken upstream: resets every POST as its first bytes arrive, answers anything else."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.startswith(b"POST"):
            self.seen.append(b"POST")
            self.buffer = b""
            self.transport.abortConnection()
            return
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.seen.append(head.split(b" ", 1)[0])
            self.transport.write(OK)


class ConformanceTests(unittest.TestCase):
    """Go's reverseproxy_test.go behaviours, and the proxy's header/target/body rules, over sockets."""

    timeout = 30

    def proxied(self, respond: Respond | None = None, *arguments: str) -> tuple[ScriptedUpstream, RunningProxy]:
        upstream = ScriptedUpstream(self, respond or answer(OK))
        return upstream, startProxy(self, [upstream.url], *arguments)

    async def roundTrip(
        self, payload: bytes, respond: Respond | None = None, *arguments: str
    ) -> tuple[Response, ReceivedRequest]:
        """Send C{payload} through a new proxy to a scripted upstream; the response and what arrived."""
        upstream, proxy = self.proxied(respond or answer(OK), *arguments)
        data = await rawRequest(proxy.port, payload, timeout=5)
        self.assertEqual(len(upstream.requests), 1, f"upstream requests: {upstream.requests!r}; client got {data!r}")
        return parseResponse(data), upstream.requests[0]

    async def openClient(self, port: int) -> StreamClient:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), StreamClient())

        def close() -> None:
            if client.transport.connected:
                client.transport.abortConnection()

        self.addCleanup(close)
        return client

    def assertNoForwardedSpoof(self, received: ReceivedRequest) -> None:
        """Each forwarding field arrives exactly once."""
        for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via"):
            self.assertEqual(len(received.headers(name)), 1, (name, received.head))

    # -- Go #1-#8, #11: TestReverseProxy

    @deferredTest
    async def test_statusPassedThrough(self) -> None:
        """Go #1 TestReverseProxy: the upstream's status (404), reason and body reach the client unchanged."""
        response, received = await self.roundTrip(
            get(b"/missing"),
            answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nX-Status: nope\r\n\r\nnot found"),
        )
        self.assertEqual(response.statusLine, b"HTTP/1.1 404 Not Found")
        self.assertEqual(response.body, b"not found")
        self.assertEqual(response.values(b"x-status"), [b"nope"])
        self.assertEqual(received.requestLine, b"GET /missing HTTP/1.1")

    @deferredTest
    async def test_noRequestTransferEncoding(self) -> None:
        """Go #2 TestReverseProxy: a bodiless GET reaches the upstream with no Transfer-Encoding (nor length)."""
        response, received = await self.roundTrip(get(b"/"))
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"transfer-encoding"), [])
        self.assertEqual(received.headers(b"content-length"), [])
        self.assertEqual(received.body, b"")

    @deferredTest
    async def test_xForwardedForAdded(self) -> None:
        """Go #3 TestReverseProxy: the upstream gets X-Forwarded-For (and -Proto, -Host, Forwarded)."""
        response, received = await self.roundTrip(get(b"/", host=b"front.example:8080"))
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(received.headers(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(received.headers(b"x-forwarded-host"), [b"front.example:8080"])
        self.assertEqual(received.headers(b"forwarded"), [b'for=127.0.0.1;host="front.example:8080";proto=http'])

    @deferredTest
    async def test_hopByHopRequestHeadersStripped(self) -> None:
        """Go #4 TestReverseProxy: Connection, Upgrade (no upgrade asked), Proxy-Connection etc. never arrive."""
        response, received = await self.roundTrip(
            get(
                b"/",
                b"Proxy-Connection: should be deleted\r\nUpgrade: foo\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
                b"Trailer: X-Sum\r\nX-Keep: kept\r\n",
            )
        )
        self.assertEqual(response.status, 200)
        for name in (
            b"connection",
            b"proxy-connection",
            b"upgrade",
            b"keep-alive",
            b"proxy-authorization",
            b"http2-settings",
            b"trailer",
            b"te",
            b"transfer-encoding",
        ):
            self.assertEqual(received.headers(name), [], name)
        self.assertEqual(received.headers(b"x-keep"), [b"kept"])

    @deferredTest
    async def test_teTrailersOnly(self) -> None:
        """
        Go #5 TestReverseProxy: ``Te: foo``, ``Te: bar, trailers``, ``Connection: close`` + ``Connection: TE`` ->
        exactly ``Te: trailers``.  (Go sends ``Connection: close, TE`` on one line: see
        L{test_connectionCloseInListHonoured} for why that would leave this client's connection open.)
        """
        response, received = await self.roundTrip(
            b"GET / HTTP/1.1\r\nHost: x\r\nTe: foo\r\nTe: bar, trailers\r\nConnection: close\r\nConnection: TE\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"te"), [b"trailers"])
        self.assertEqual(received.headers(b"connection"), [])

    @deferredTest
    async def test_hostPreserved(self) -> None:
        """Go #6 TestReverseProxy: the client's Host ("some-name") reaches the upstream by default."""
        response, received = await self.roundTrip(get(b"/", host=b"some-name"))
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"host"), [b"some-name"])

    @deferredTest
    async def test_responseHeadersPassed(self) -> None:
        """
        Go #7 TestReverseProxy: end-to-end fields pass; repeated fields keep every value; Set-Cookie lines
        stay apart.
        """
        response, received = await self.roundTrip(
            get(b"/"),
            answer(
                b"HTTP/1.1 200 OK\r\nX-Foo: bar\r\nX-Multi-Value: foo\r\nX-Multi-Value: bar\r\n"
                b"Set-Cookie: flavor=chocolateChip; Expires=Wed, 21 Oct 2026 07:28:00 GMT\r\n"
                b"Set-Cookie: session=abc; Path=/; HttpOnly\r\nContent-Type: text/x-test\r\n"
                b"Content-Length: 2\r\n\r\nok"
            ),
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.values(b"x-foo"), [b"bar"])
        self.assertEqual(response.values(b"x-multi-value"), [b"foo", b"bar"])
        self.assertEqual(
            response.values(b"set-cookie"),
            [b"flavor=chocolateChip; Expires=Wed, 21 Oct 2026 07:28:00 GMT", b"session=abc; Path=/; HttpOnly"],
        )
        self.assertEqual(response.values(b"content-type"), [b"text/x-test"])
        self.assertEqual(response.body, b"ok")
        self.assertEqual(received.requestLine, b"GET / HTTP/1.1")

    @deferredTest
    async def test_responseHopByHopStripped(self) -> None:
        """Go #8 TestReverseProxy: response hop-by-hop fields (and listed ones) stripped; ``Trailers`` kept."""
        response, received = await self.roundTrip(
            get(b"/"),
            answer(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Fake-Hop-Header-For-Test\r\n"
                b"X-Fake-Hop-Header-For-Test: foo\r\nKeep-Alive: timeout=5\r\nUpgrade: foo\r\n"
                b"Proxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\n"
                b"Trailers: not a special header field name\r\nX-Foo: bar\r\nContent-Length: 2\r\n\r\nok"
            ),
        )
        self.assertEqual(response.status, 200)
        for name in (
            b"x-fake-hop-header-for-test",
            b"keep-alive",
            b"upgrade",
            b"proxy-authenticate",
            b"proxy-connection",
            b"trailer",
        ):
            self.assertEqual(response.values(name), [], name)
        self.assertNotIn(b"keep-alive", b",".join(response.values(b"connection")).lower())
        self.assertEqual(response.values(b"trailers"), [b"not a special header field name"])
        self.assertEqual(response.values(b"x-foo"), [b"bar"])
        self.assertEqual(response.body, b"ok")
        self.assertEqual(received.requestLine, b"GET / HTTP/1.1")

    @deferredTest
    async def test_upstreamHangsUp(self) -> None:
        """Go #11 TestReverseProxy: an upstream closing without a response -> 502 with Proxy-Status, fault, reason."""
        response, received = await self.roundTrip(get(b"/"), hangUp)
        self.assertEqual(response.status, 502)
        self.assertEqual(response.values(b"x-rproxy-fault"), [b"upstream"])
        proxyStatus = response.values(b"proxy-status")
        self.assertEqual(len(proxyStatus), 1)
        self.assertTrue(proxyStatus[0].startswith(b"rproxy; error=connection_terminated"), proxyStatus)
        self.assertTrue(response.body.startswith(b"502 Bad Gateway: "), response.body)
        self.assertIn(b"before responding", response.body)
        self.assertEqual(response.body.count(b"\n"), 1, "a one-line reason")
        self.assertTrue(response.body.endswith(b"\n"))
        self.assertEqual(received.requestLine, b"GET / HTTP/1.1")

    # -- Go #12, #13: Connection-listed fields

    @deferredTest
    async def test_stripHeadersPresentInConnection(self) -> None:
        """Go #12 TestReverseProxyStripHeadersPresentInConnection: listed fields go both ways; inbound untouched."""
        upstream, proxy = self.proxied(
            answer(
                b"HTTP/1.1 200 OK\r\nConnection: Upgrade, X-Fake-Connection-Token\r\nConnection: X-Other\r\n"
                b"X-Fake-Connection-Token: should be deleted\r\nUpgrade: should be deleted\r\n"
                b"X-Other: should be deleted\r\nX-Kept: yes\r\nContent-Length: 16\r\n\r\nI am the backend"
            )
        )
        recorder = ResponseFilter()
        useFilters(proxy, recorder)
        data = await rawRequest(
            proxy.port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: Upgrade, X-Fake-Connection-Token\r\n"
            b"Upgrade: original value\r\nX-Fake-Connection-Token: should be deleted\r\nX-Kept: yes\r\n\r\n",
            timeout=5,
        )
        response = parseResponse(data)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"I am the backend")
        for name in (b"x-fake-connection-token", b"upgrade", b"x-other"):
            self.assertEqual(response.values(name), [], name)
        self.assertEqual(response.values(b"x-kept"), [b"yes"])
        [received] = upstream.requests
        for name in (b"x-fake-connection-token", b"upgrade", b"connection"):
            self.assertEqual(received.headers(name), [], name)
        self.assertEqual(received.headers(b"x-kept"), [b"yes"])
        [seen] = recorder.seen
        self.assertIn((b"upgrade", b"original value"), seen["inboundHeaders"])
        self.assertIn((b"x-fake-connection-token", b"should be deleted"), seen["inboundHeaders"])

    @deferredTest
    async def test_stripEmptyConnection(self) -> None:
        """Go #13 TestReverseProxyStripEmptyConnection: empty Connection values tolerated, listed fields removed."""
        response, received = await self.roundTrip(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection:\r\nConnection: , ,X-Listed,,\r\n"
            b"X-Listed: gone\r\nX-Kept: yes\r\n\r\n",
            answer(
                b"HTTP/1.1 200 OK\r\nConnection:\r\nConnection: ,X-Resp-Listed, \r\nX-Resp-Listed: gone\r\n"
                b"X-Resp-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
            ),
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"ok")
        self.assertEqual(response.values(b"x-resp-listed"), [])
        self.assertEqual(response.values(b"x-resp-kept"), [b"yes"])
        self.assertEqual(received.headers(b"x-listed"), [])
        self.assertEqual(received.headers(b"connection"), [])
        self.assertEqual(received.headers(b"x-kept"), [b"yes"])

    # -- Go #14, #16: forwarding fields

    @deferredTest
    async def test_xForwardedForAppendedFromTrustedProxy(self) -> None:
        """Go #14 TestXForwardedFor: with --trusted-proxy 127.0.0.1/32 the prior XFF is kept, the peer appended."""
        response, received = await self.roundTrip(
            get(
                b"/",
                b"X-Forwarded-For: 203.0.113.1, 198.51.100.2\r\nX-Forwarded-Proto: https\r\n"
                b"X-Forwarded-Host: public.example\r\nForwarded: for=203.0.113.1;proto=https\r\n",
            ),
            answer(OK),
            "--trusted-proxy",
            "127.0.0.1/32",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"203.0.113.1, 198.51.100.2, 127.0.0.1"])
        self.assertEqual(received.headers(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(received.headers(b"x-forwarded-host"), [b"public.example"])
        self.assertEqual(
            received.headers(b"forwarded"),
            [b"for=203.0.113.1;proto=https, for=127.0.0.1;host=example.com;proto=http"],
        )

    @deferredTest
    async def test_xForwardedForReplacedFromUntrustedClient(self) -> None:
        """Go #14 TestXForwardedFor, untrusted side: without --trusted-proxy the inbound value is replaced."""
        response, received = await self.roundTrip(get(b"/", b"X-Forwarded-For: 203.0.113.1\r\n"))
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"127.0.0.1"])

    @deferredTest
    async def test_rewriteStripsForwarded(self) -> None:
        """Go #16 TestReverseProxyRewriteStripsForwarded: a client's Forwarded, XFF, XFH, XFP are replaced."""
        response, received = await self.roundTrip(
            get(
                b"/",
                b"Forwarded: for=6.6.6.6;proto=https\r\nX-Forwarded-For: 6.6.6.6\r\n"
                b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n",
                host=b"good.example",
            )
        )
        self.assertEqual(response.status, 200)
        self.assertNoForwardedSpoof(received)
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(received.headers(b"x-forwarded-host"), [b"good.example"])
        self.assertEqual(received.headers(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(received.headers(b"forwarded"), [b"for=127.0.0.1;host=good.example;proto=http"])
        self.assertNotIn(b"6.6.6.6", received.head)
        self.assertNotIn(b"evil.example", received.head)

    @deferredTest
    async def test_viaAddedBothWays(self) -> None:
        """Via: the proxy appends itself to the request's chain and to the response's (RFC 9110 section 7.6.3)."""
        response, received = await self.roundTrip(
            get(b"/"), answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), "--via-name", "edge-7"
        )
        self.assertEqual(received.headers(b"via"), [b"1.1 edge-7"])
        self.assertEqual(response.values(b"via"), [b"1.1 edge-7"])

    @deferredTest
    async def test_viaChainsAppended(self) -> None:
        """Via chains already present are appended to, each arriving as one field in each direction."""
        response, received = await self.roundTrip(
            get(b"/", b"Via: 1.0 fred\r\nVia: 1.1 nowhere.example (Apache/1.1)\r\n"),
            answer(b"HTTP/1.1 200 OK\r\nVia: 1.1 backend-cache\r\nContent-Length: 2\r\n\r\nok"),
        )
        self.assertEqual(response.values(b"via"), [b"1.1 backend-cache, 1.1 rproxy"])
        self.assertEqual(received.headers(b"via"), [b"1.0 fred, 1.1 nowhere.example (Apache/1.1), 1.1 rproxy"])

    # -- Go #17, #45, #49, #44: targets, base paths, Host

    @deferredTest
    async def test_queryJoined(self) -> None:
        """Go #17 TestReverseProxyQuery: the request's query follows the base path; a base query is refused."""
        upstream, proxy = self.proxied(answer(OK))
        base = startProxy(self, [upstream.url + "/base"])
        cases = [
            (proxy.port, b"/x", b"/x"),
            (proxy.port, b"/x?b=2", b"/x?b=2"),
            (base.port, b"/x?b=2&a=1", b"/base/x?b=2&a=1"),
            (base.port, b"/x?", b"/base/x?"),
            (base.port, b"/?q", b"/base/?q"),
        ]
        for port, target, expected in cases:
            data = await rawRequest(port, get(target), timeout=5)
            self.assertEqual(parseResponse(data).status, 200, target)
            self.assertEqual(upstream.requests[-1].requestLine, b"GET " + expected + b" HTTP/1.1", target)
        self.assertEqual(len(upstream.requests), len(cases))
        # Go joins a target URL's query with the request's; rproxy refuses such a target outright.
        self.assertRaises(usage.UsageError, startProxy, self, [upstream.url + "/base?a=1"])

    @deferredTest
    async def test_rawQueryForwardedByteExact(self) -> None:
        """Go #49 TestReverseProxyQueryParameterSmuggling*: the raw query is forwarded unchanged, never re-encoded."""
        upstream, proxy = self.proxied(answer(OK), "--max-request-line", "65536")
        targets = [
            b"/?a=1&a=2;b=3",
            b"/x?%zz",
            b"/x?%zz=%zz&q=a+b%20c",
            b"/x?a=1;b=2&&c",
            b"/x?=&=",
            b"/x?" + b"&".join(b"p%d=%d" % (i, i) for i in range(2000)),
        ]
        for target in targets:
            data = await rawRequest(proxy.port, get(target), timeout=5)
            self.assertEqual(parseResponse(data).status, 200, target[:80])
            self.assertEqual(upstream.requests[-1].requestLine, b"GET " + target + b" HTTP/1.1", target[:80])
        self.assertEqual(len(upstream.requests), len(targets))

    @deferredTest
    async def test_requestTargetByteExact(self) -> None:
        """The request target reaches the upstream byte-exact: no decoding, dot-segment or slash cleaning."""
        upstream, proxy = self.proxied(answer(OK))
        targets = [
            b"/a%2Fb/c",
            b"//double//slash/",
            b"/x/../y/./z",
            b"/p;jsessionid=1/q;v=2",
            b"/%2e%2e/secret",
            b"/~user/%7Efile%20name",
            b"/a%2Fb/../c;x?y=%2F&z=..//",
        ]
        for target in targets:
            data = await rawRequest(proxy.port, get(target), timeout=5)
            self.assertEqual(parseResponse(data).status, 200, target)
            self.assertEqual(upstream.requests[-1].requestLine, b"GET " + target + b" HTTP/1.1")
        self.assertEqual(len(upstream.requests), len(targets))

    @deferredTest
    async def test_requestTargetByteExactWithBasePath(self) -> None:
        """With an upstream base path the target is appended byte-exact (``/base`` + target)."""
        upstream = ScriptedUpstream(self, answer(OK))
        proxy = startProxy(self, [upstream.url + "/base"])
        targets = [b"/a%2Fb/c", b"//double//slash/", b"/x/../y", b"/p;v=1", b"/?a=1&a=2;b=3", b"/q?%zz"]
        for target in targets:
            data = await rawRequest(proxy.port, get(target), timeout=5)
            self.assertEqual(parseResponse(data).status, 200, target)
            self.assertEqual(upstream.requests[-1].requestLine, b"GET /base" + target + b" HTTP/1.1")
        self.assertEqual(len(upstream.requests), len(targets))

    @deferredTest
    async def test_joinURLPath(self) -> None:
        """Go #45 TestSingleJoinSlash/TestJoinURLPath: one slash between base and target; ``%2F`` kept raw."""
        upstream = ScriptedUpstream(self, answer(OK))
        cases = [
            ("/base", b"/x", b"/base/x"),
            ("/base/", b"/x", b"/base/x"),
            ("/base/", b"/", b"/base/"),
            ("/", b"/x", b"/x"),
            ("", b"/x", b"/x"),
            ("/a%2Fb", b"/c%2Fd", b"/a%2Fb/c%2Fd"),
            ("/a%2Fb/", b"/c%2Fd", b"/a%2Fb/c%2Fd"),
        ]
        for base, target, expected in cases:
            proxy = startProxy(self, [upstream.url + base])
            data = await rawRequest(proxy.port, get(target), timeout=5)
            self.assertEqual(parseResponse(data).status, 200, (base, target))
            self.assertEqual(upstream.requests[-1].requestLine, b"GET " + expected + b" HTTP/1.1", (base, target))
        self.assertEqual(len(upstream.requests), len(cases))

    @deferredTest
    async def test_setURLRewritesHost(self) -> None:
        """Go #44 TestSetURL: with --rewrite-host the upstream's own host:port is sent as Host."""
        upstream, proxy = self.proxied(answer(OK), "--rewrite-host")
        data = await rawRequest(proxy.port, get(b"/", host=b"public.example"), timeout=5)
        self.assertEqual(parseResponse(data).status, 200)
        [received] = upstream.requests
        self.assertEqual(received.headers(b"host"), [f"127.0.0.1:{upstream.port}".encode()])
        self.assertEqual(received.headers(b"x-forwarded-host"), [b"public.example"])

    # -- Go #18, #20, #37: flushing

    @deferredTest
    async def test_flushIntervalBodyDelivered(self) -> None:
        """Go #18 TestReverseProxyFlushInterval: a body written piece by piece is delivered as it comes, and whole."""
        dribble = _Dribble(count=5, interval=0.15)
        upstream = startUpstream(self, server.Site(dribble))
        proxy = startProxy(self, [upstream.url])
        self.addCleanup(lambda: [c.cancel() for c in dribble.calls if c.active()])
        client = await self.openClient(proxy.port)
        client.transport.write(get(b"/dribble"))
        await waitUntil(lambda: b"piece 0;" in client.received, 2, "the first piece")
        self.assertFalse(dribble.finished, "the first piece must arrive before the upstream finishes")
        await client.closed.addTimeout(5, reactor)
        response = parseResponse(client.received)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"piece 0;piece 1;piece 2;piece 3;piece 4;")
        self.assertTrue(response.complete)

    @deferredTest
    async def test_flushIntervalHeaders(self) -> None:
        """Go #20 TestReverseProxyFlushIntervalHeaders: the head reaches the client while the upstream stalls."""
        upstream, proxy = self.proxied(
            lambda proto, request: b"HTTP/1.1 200 OK\r\nX-Header: X-Value\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        client = await self.openClient(proxy.port)
        client.transport.write(get(b"/"))
        await waitUntil(lambda: b"\r\n\r\n" in client.received, 2, "the response head")
        response = parseResponse(client.received)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.values(b"x-header"), [b"X-Value"])
        self.assertFalse(response.complete)
        self.assertEqual(len(upstream.requests), 1)
        # The stalled upstream now finishes: the client gets the end of the body.
        upstream.connections[0].transport.write(b"4\r\ndone\r\n0\r\n\r\n")
        await client.closed.addTimeout(5, reactor)
        response = parseResponse(client.received)
        self.assertEqual(response.body, b"done")
        self.assertTrue(response.complete)

    @deferredTest
    async def test_selectFlushIntervalEventStream(self) -> None:
        """Go #37 TestSelectFlushInterval: text/event-stream (with or without parameters) is flushed event by event."""
        for contentType in (b"text/event-stream", b"text/event-stream; charset=utf-8"):
            events = _EventStream(contentType)
            upstream = startUpstream(self, server.Site(events))
            proxy = startProxy(self, [upstream.url])
            client = await self.openClient(proxy.port)
            client.transport.write(get(b"/events", b"Accept: text/event-stream\r\n"))
            await waitUntil(lambda c=client: b"data: one\n\n" in c.received, 2, "the first event")
            response = parseResponse(client.received)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.values(b"content-type"), [contentType])
            self.assertEqual(len(events.requests), 1)
            events.requests[0].write(b"data: two\n\n")
            await waitUntil(lambda c=client: b"data: two\n\n" in c.received, 2, "the second event")
            self.assertFalse(parseResponse(client.received).complete)
            events.requests[0].write(b"data: three\n\n")
            events.requests[0].finish()
            await client.closed.addTimeout(5, reactor)
            response = parseResponse(client.received)
            self.assertEqual(response.body, b"data: one\n\ndata: two\n\ndata: three\n\n")
            self.assertTrue(response.complete)

    @deferredTest
    async def test_selectFlushIntervalUnknownLength(self) -> None:
        """Go #37 TestSelectFlushInterval: a body of unknown length (close-delimited) is flushed as it arrives."""
        upstream, proxy = self.proxied(
            lambda proto, request: b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nfirst;"
        )
        client = await self.openClient(proxy.port)
        client.transport.write(get(b"/"))
        await waitUntil(lambda: b"first;" in client.received, 2, "the first bytes")
        upstream.connections[0].transport.write(b"second;")
        await waitUntil(lambda: b"second;" in client.received, 2, "the second bytes")
        upstream.connections[0].transport.loseConnection()
        await client.closed.addTimeout(5, reactor)
        response = parseResponse(client.received)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"first;second;")
        self.assertTrue(response.complete, "a close-delimited upstream body that ended cleanly is complete")

    # -- Go #21, #22, #23, #25, #26, #27: requests

    @deferredTest
    async def test_cancellation(self) -> None:
        """Go #21 TestReverseProxyCancellation: a client hanging up closes the upstream connection within 1 s."""
        upstream, proxy = self.proxied(stall)
        client = await self.openClient(proxy.port)
        client.transport.write(get(b"/slow"))
        await waitUntil(lambda: upstream.requests, 2, "the request to reach the upstream")
        lost = upstream.connectionLost()
        started = time.monotonic()
        client.transport.abortConnection()
        await lost.addTimeout(1.0, reactor)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(client.received, b"", "the client got no response")
        self.assertEqual(len(upstream.lost), 1)
        await sleep(0.05)
        timers = [call for call in reactor.getDelayedCalls() if "HTTP11Connection" in repr(call.func)]
        self.assertEqual(timers, [], "the cancelled exchange's upstream timers are cancelled too")

    @deferredTest
    async def test_nilBodyHTTP10(self) -> None:
        """Go #22 TestNilBody: an HTTP/1.0 request without a body is proxied (as HTTP/1.1, bodiless)."""
        response, received = await self.roundTrip(
            b"GET /ten HTTP/1.0\r\nHost: x\r\n\r\n", answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        )
        self.assertTrue(response.statusLine.startswith(b"HTTP/1.0 200 "), response.statusLine)
        self.assertEqual(response.body, b"hi")
        self.assertEqual(received.requestLine, b"GET /ten HTTP/1.1")
        self.assertEqual(received.body, b"")
        self.assertEqual(received.headers(b"content-length"), [])
        self.assertEqual(received.headers(b"transfer-encoding"), [])
        self.assertEqual(received.headers(b"via"), [b"1.0 rproxy"])

    @deferredTest
    async def test_userAgentForwardedVerbatim(self) -> None:
        """Go #23 TestUserAgentHeader: an explicit User-Agent is forwarded verbatim."""
        agent = b'foo/1.2.3 (X11; Linux x86_64) bar/4.5 "quoted" ;;'
        response, received = await self.roundTrip(get(b"/", b"User-Agent: " + agent + b"\r\n"))
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"user-agent"), [agent])

    @deferredTest
    async def test_userAgentNotAdded(self) -> None:
        """Go #23 TestUserAgentHeader: no User-Agent from the client, none (no proxy default) to the upstream."""
        response, received = await self.roundTrip(get(b"/"))
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"user-agent"), [])
        self.assertEqual(received.requestLine, b"GET / HTTP/1.1")

    @deferredTest
    async def test_postBodyForwarded(self) -> None:
        """Go #25 TestReverseProxy_Post: a 1 MiB Content-Length body arrives byte-identical."""
        body = os.urandom(MiB)
        response, received = await self.roundTrip(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"content-length"), [b"%d" % MiB])
        self.assertEqual(received.headers(b"transfer-encoding"), [])
        self.assertEqual(len(received.body), MiB)
        self.assertTrue(received.body == body, "the body differs")

    @deferredTest
    async def test_chunkedPostBodyForwarded(self) -> None:
        """Go #25 TestReverseProxy_Post, chunked: a 1 MiB chunked body arrives byte-identical, re-framed chunked."""
        body = os.urandom(MiB)
        sizes = [1, 1000, 65536, 4096, 300000]
        framed = b""
        position = 0
        while position < len(body):
            size = sizes[len(framed) % len(sizes)]
            piece = body[position : position + size]
            extension = b";ext=1" if position == 0 else b""
            framed += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
            position += len(piece)
        framed += b"0\r\n\r\n"
        response, received = await self.roundTrip(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(received.headers(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(received.headers(b"content-length"), [])
        self.assertEqual(len(received.body), MiB)
        self.assertTrue(received.body == body, "the body differs")

    @deferredTest
    async def test_nilBodyTransportError(self) -> None:
        """Go #26 TestReverseProxy_NilBody: a GET goes without body framing; an upstream reset -> 502."""

        def reset(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
            proto.transport.abortConnection()
            return b""

        response, received = await self.roundTrip(get(b"/"), reset)
        self.assertEqual(received.headers(b"content-length"), [])
        self.assertEqual(received.headers(b"transfer-encoding"), [])
        self.assertEqual(response.status, 502)
        self.assertEqual(response.values(b"x-rproxy-fault"), [b"upstream"])

    @deferredTest
    async def test_allocatedHeader(self) -> None:
        """Go #27 TestReverseProxy_AllocatedHeader: a request with no header fields at all is proxied."""
        upstream, proxy = self.proxied(answer(OK))
        data = await rawRequest(proxy.port, b"GET /bare HTTP/1.0\r\n\r\n", timeout=5)
        response = parseResponse(data)
        self.assertEqual(response.status, 200)
        [received] = upstream.requests
        self.assertEqual(received.requestLine, b"GET /bare HTTP/1.1")
        self.assertEqual(received.headers(b"host"), [f"127.0.0.1:{upstream.port}".encode()])
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(received.headers(b"x-forwarded-host"), [])

    # -- Go #28, #29, #32, #33, #34: hooks see an untouched inbound request, errors become 502

    @deferredTest
    async def test_modifyResponse(self) -> None:
        """Go #28 TestReverseProxyModifyResponse: a response filter's change reaches the client; its failure -> 502."""
        upstream, proxy = self.proxied(answer(OK))
        useFilters(proxy, ResponseFilter(add=(b"X-Modified", b"yes")))
        response = parseResponse(await rawRequest(proxy.port, get(b"/"), timeout=5))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.values(b"x-modified"), [b"yes"])

        useFilters(proxy, ResponseFilter(fail=True))
        started = time.monotonic()
        response = parseResponse(await rawRequest(proxy.port, get(b"/"), timeout=5))
        self.assertLess(time.monotonic() - started, 4, "answered, not left hanging")
        self.flushLoggedErrors(FilterBrokeError)
        self.assertEqual(response.status, 502)
        self.assertEqual(response.values(b"x-rproxy-fault"), [b"proxy"], "a filter is the proxy's fault")
        self.assertEqual(len(upstream.requests), 2)

    @deferredTest
    async def test_errorHandlerDefault(self) -> None:
        """Go #29 TestReverseProxyErrorHandler: the default error answer is 502 with a reason (here: refused)."""
        closed = listen(self, protocol.Factory.forProtocol(protocol.Protocol))
        port = closed.port
        await closed.listener.stopListening()
        proxy = startProxy(self, [f"http://127.0.0.1:{port}"])
        response = parseResponse(await rawRequest(proxy.port, get(b"/"), timeout=5))
        self.assertEqual(response.status, 502)
        self.assertEqual(response.values(b"x-rproxy-fault"), [b"upstream"])
        self.assertTrue(response.values(b"proxy-status")[0].startswith(b"rproxy; error=connection_refused"))
        self.assertIn(b"refused", response.body)
        self.assertEqual(response.values(b"content-type"), [b"text/plain; charset=utf-8"])

    @deferredTest
    async def test_serveHTTPDeepCopy(self) -> None:
        """Go #32 TestServeHTTPDeepCopy: proxying (base path joined) does not change the inbound target."""
        upstream = ScriptedUpstream(self, answer(OK))
        proxy = startProxy(self, [upstream.url + "/base"])
        recorder = ResponseFilter()
        useFilters(proxy, recorder)
        response = parseResponse(await rawRequest(proxy.port, get(b"/x%2Fy?q=1"), timeout=5))
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.requests[0].requestLine, b"GET /base/x%2Fy?q=1 HTTP/1.1")
        [seen] = recorder.seen
        self.assertEqual(seen["inboundTarget"], b"/x%2Fy?q=1")
        self.assertEqual(seen["outboundTarget"], b"/x%2Fy?q=1")

    @deferredTest
    async def test_clonesRequestHeaders(self) -> None:
        """Go #33 TestClonesRequestHeaders: the proxy's header edits do not leak into the client's request."""
        upstream, proxy = self.proxied(answer(OK))
        recorder = ResponseFilter()
        useFilters(proxy, recorder)
        response = parseResponse(
            await rawRequest(
                proxy.port, get(b"/", b"Connection: X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\nVia: 1.0 fred\r\n"), timeout=5
            )
        )
        self.assertEqual(response.status, 200)
        [received] = upstream.requests
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"127.0.0.1"])
        [seen] = recorder.seen
        for headers in (seen["inboundHeaders"],):
            names = {name for name, _ in headers}
            for added in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"):
                self.assertNotIn(added, names)
            self.assertIn((b"x-hop", b"1"), headers)
            self.assertIn((b"te", b"trailers"), headers)
            self.assertEqual([v for n, v in headers if n == b"via"], [b"1.0 fred"])

    @deferredTest
    async def test_requestFilterEditsHeaders(self) -> None:
        """What a request filter changes in the outbound headers is what the upstream receives."""
        upstream, proxy = self.proxied(answer(OK))

        @implementer(IRequestFilter)
        class Edit:
            consumes = ()

            def onRequest(self, context: RequestContext) -> None:
                context.outbound.headers.removeHeader(b"x-secret")
                context.outbound.headers.addRawHeader(b"X-Added", b"yes")

        useFilters(proxy, Edit())
        response = parseResponse(await rawRequest(proxy.port, get(b"/", b"X-Secret: s\r\nX-Kept: k\r\n"), timeout=5))
        self.assertEqual(response.status, 200)
        [received] = upstream.requests
        self.assertEqual(received.headers(b"x-secret"), [])
        self.assertEqual(received.headers(b"x-kept"), [b"k"])
        self.assertEqual(received.headers(b"x-added"), [b"yes"])
        self.assertEqual(received.headers(b"x-forwarded-for"), [b"127.0.0.1"])

    @deferredTest
    async def test_modifyResponseClosesBody(self) -> None:
        """Go #34 TestModifyResponseClosesBody: a filter failure closes the upstream connection and is logged."""
        upstream, proxy = self.proxied(lambda proto, request: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
        useFilters(proxy, ResponseFilter(fail=True))
        client = await self.openClient(proxy.port)
        client.transport.write(get(b"/"))
        await waitUntil(lambda: upstream.connections, 2, "the upstream connection")
        lost = upstream.connectionLost() if not upstream.lost else defer.succeed(None)
        await lost.addTimeout(1.0, reactor)
        self.assertEqual(len(upstream.requests), 1)
        self.assertTrue(self.flushLoggedErrors(FilterBrokeError), "the filter's failure is logged")
        await client.closed.addTimeout(2, reactor)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 502 "), client.received)

    # -- Go #30, #35, #36: broken upstream bodies

    async def brokenMidBody(self, head: bytes, then: bytes) -> tuple[bytes, float]:
        """
        An upstream sends C{head} (status line, fields, some body), then after 0.2 s C{then} and closes.
        Return what a keep-alive client received and how long its connection outlived the upstream's.
        """
        closedAt: list[float] = []

        def respond(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
            def breakOff() -> None:
                proto.transport.write(then)
                proto.transport.loseConnection()
                closedAt.append(time.monotonic())

            call = reactor.callLater(0.2, breakOff)
            self.addCleanup(lambda: call.active() and call.cancel())
            return head

        upstream, proxy = self.proxied(respond)
        client = await self.openClient(proxy.port)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: only a close ends it
        await waitUntil(lambda: closedAt, 2, "the upstream to break off")
        await client.closed.addTimeout(2, reactor)
        self.assertEqual(len(upstream.requests), 1)
        return client.received, time.monotonic() - closedAt[0]

    @deferredTest
    async def test_copyBufferShortBody(self) -> None:
        """Go #30 TestReverseProxy_CopyBuffer: a short upstream body (Content-Length 100, 10 sent) aborts the client."""
        data, after = await self.brokenMidBody(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n01234", b"56789")
        self.assertLess(after, 1, "the client connection is closed as soon as the upstream's body breaks off")
        response = parseResponse(data)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.values(b"content-length"), [b"100"])
        self.assertTrue(response.body.startswith(b"01234"), "what arrived in time was relayed")
        self.assertLess(len(response.body), 100)
        self.assertFalse(response.complete)

    @deferredTest
    async def test_copyBufferShortBodyAtOnce(self) -> None:
        """Go #30 TestReverseProxy_CopyBuffer: head, short body and close at once: the client never sees it complete."""

        def short(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            proto.transport.loseConnection()
            return b""

        upstream, proxy = self.proxied(short)
        started = time.monotonic()
        # Keep-alive request: only a closed connection ends it before rawRequest's timeout.
        data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        self.assertLess(time.monotonic() - started, 3, f"the client connection was left open: {data!r}")
        self.assertEqual(len(upstream.requests), 1)
        if data:  # an abort may discard what was still buffered: nothing at all is fine too
            response = parseResponse(data)
            self.assertEqual(response.status, 200)
            self.assertLess(len(response.body), 100)
            self.assertFalse(response.complete)

    @deferredTest
    async def test_panicBodyError(self) -> None:
        """Go #35 TestReverseProxy_PanicBodyError: a mid-body upstream failure aborts, never a clean chunked end."""
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        for then in (b"ZZ\r\n", b"3\r\nab", b"3\r\nabcdef\r\n0\r\n\r\n", b""):
            data, after = await self.brokenMidBody(head, then)
            self.assertLess(after, 1, f"{then!r}: the client connection is closed when the upstream breaks")
            response = parseResponse(data)
            self.assertEqual(response.status, 200, then)
            self.assertTrue(response.body.startswith(b"hello"), (then, data))
            self.assertFalse(response.complete, f"{then!r}: {data!r}")
            self.assertFalse(data.endswith(b"0\r\n\r\n"), then)

    @deferredTest
    async def test_panicClosesIncomingBody(self) -> None:
        """Go #36 TestReverseProxy_PanicClosesIncomingBody: concurrent POSTs to a broken upstream; proxy lives on."""
        seen: list[bytes] = []
        broken = listen(self, protocol.Factory.forProtocol(lambda: _PostBreaker(seen)))
        proxy = startProxy(self, [broken.url])
        body = b"x" * (6 * MiB)
        post = b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        results = await defer.gatherResults([rawRequest(proxy.port, post, timeout=10) for _ in range(4)])
        self.assertEqual(seen.count(b"POST"), 4, seen)
        for data in results:
            if data:  # a reset may discard the answer to a client still sending
                self.assertTrue(data.startswith(b"HTTP/1.1 502 "), data[:200])
        self.assertTrue(any(results), "at least one client got its 502")
        response = parseResponse(await rawRequest(proxy.port, get(b"/after"), timeout=5))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"ok")
        self.assertEqual(seen[-1], b"GET")
        await waitUntil(lambda: not proxy.site.connections, 2, "the client connections to close")

    # -- other response rules

    @deferredTest
    async def test_noContentTypeInvented(self) -> None:
        """No Content-Type is added when the upstream sends none (Content-Length, chunked, 204)."""
        for upstreamResponse in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ):
            response, received = await self.roundTrip(get(b"/"), answer(upstreamResponse))
            self.assertIn(response.status, (200, 204))
            self.assertEqual(response.values(b"content-type"), [], upstreamResponse)
            self.assertEqual(received.requestLine, b"GET / HTTP/1.1")

    @deferredTest
    async def test_connectionCloseInListHonoured(self) -> None:
        """``Connection: close`` among other tokens (or on a later line) closes the connection after the response."""
        keptOpen: list[bytes] = []
        for connection in (
            b"Connection: close, X-Foo\r\nX-Foo: 1\r\n",
            b"Connection: keep-alive\r\nConnection: close\r\n",
            b"Connection: X-Foo,close\r\n",
        ):
            upstream, proxy = self.proxied(answer(OK))
            started = time.monotonic()
            data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + connection + b"\r\n", timeout=1.5)
            response = parseResponse(data)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.body, b"ok")
            self.assertEqual(upstream.requests[0].headers(b"x-foo"), [])
            if time.monotonic() - started > 1:
                keptOpen.append(connection)
        self.assertEqual(keptOpen, [], "the proxy kept these connections open")
