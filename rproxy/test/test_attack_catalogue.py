"""
The current attack catalogue against a real proxy on 127.0.0.1, one table per class of vector, each row
naming the write-up or CVE it comes from (docs/security.md lists them with what rproxy does).

Every row sends what an attacker sends (raw HTTP/1.1 bytes, or HTTP/2 frames no library would build) to
a proxy in front of a counting raw upstream (L{ScriptedUpstream}: every request it saw, and every byte),
and checks the answer (a status and its one-line reason, or a GOAWAY or RST_STREAM code), that the
refusal was recorded for the access log and the rejections metric, and that the upstream saw exactly
the requests it should: never a smuggled one.  The cases test_client_input.py, test_h2_requests.py,
test_h2_abuse.py and test_http2_server.py already cover (CL.TE, TE.CL, differing lengths, sizes past 63
bits, Rapid Reset, broken frames) are not repeated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import h2.errors
import h2.settings
import hpack
import priority
from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.trial import unittest

from rproxy.downstream.http2 import STREAM_BUFFER
from rproxy.errors import clientError
from rproxy.observe.metrics import rejectionReason
from rproxy.proxy.message import RequestContext
from rproxy.test.h2client import H2Client
from rproxy.test.support import (
    LogCapture,
    ReceivedRequest,
    ScriptedUpstream,
    rawRequest,
    sleep,
    splitResponses,
    startProxy,
    useFilters,
    waitFor,
)
from rproxy.test.test_filter_chain import Step
from rproxy.test.test_h2_abuse import frame
from rproxy.test.test_observe_record import Recorder
from rproxy.test.test_streaming import MiB, _LargeUpstream, serve

ErrorCodes = h2.errors.ErrorCodes

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
#: A request that ends a connection, sent after an attack to see how the proxy reads what follows it.
NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _deny(context: RequestContext) -> object:
    """A request filter's verdict: a request carrying C{X-Deny} is answered by the proxy itself (403)."""
    if context.inbound.headers.hasHeader(b"x-deny"):
        return clientError(403, "denied")
    return None


def _answer(protocol: object, request: ReceivedRequest) -> bytes:
    if request.requestLine.startswith(b"GET /upgrade"):
        return b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope"
    return OK


class _CatalogueTestCase(unittest.TestCase):
    """
    A proxy (a 1 KiB body limit; a filter that answers requests carrying C{X-Deny} itself) in front of a
    counting upstream, its records observed.
    """

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, _answer)
        self.proxy = startProxy(self, [self.upstream.url], "--max-body-size", "1k", "--header-timeout", "2")
        useFilters(self.proxy, Step(b"deny", [], _deny))
        self.records = Recorder()
        self.proxy.site.observers.append(self.records)

    def upstreamLines(self) -> list[bytes]:
        return [request.requestLine for request in self.upstream.requests]

    def assertNothingSmuggled(self, row: str) -> None:
        for request in self.upstream.requests:
            self.assertNotIn(b"/smuggled", request.requestLine, row)


@dataclass
class Exchange:
    """
    A row of an HTTP/1.1 table: bytes on one connection, the statuses that come back in order, the
    reason the first refusal gives, and the request lines the upstream sees (with the body of the first).
    """

    payload: bytes
    statuses: list[int]
    reason: bytes = b""
    upstream: tuple[bytes, ...] = ()
    body: bytes | None = None


async def _play(case: _CatalogueTestCase, name: str, row: Exchange) -> None:
    case.upstream.requests.clear()
    case.records.records.clear()
    data = await rawRequest(case.proxy.port, row.payload, timeout=5)
    responses = splitResponses(data)
    statuses = [int(head.split(b" ", 2)[1]) for head, _ in responses]
    case.assertEqual(statuses, row.statuses, f"{name}: {data[:300]!r}")
    if row.reason:
        head, body = [(head, body) for head, body in responses if b"\r\nX-Rproxy-Fault: client" in head][0]
        case.assertIn(row.reason, body, name)
        case.assertEqual(body.count(b"\n"), 1, f"{name}: the reason is one line")
        # Recorded for the access log and counted by the rejections metric.
        await waitFor(lambda: any(r.reason and row.reason.decode() in r.reason for r in case.records.records), 2)
        [record] = [r for r in case.records.records if r.reason and row.reason.decode() in r.reason]
        case.assertIn(rejectionReason(record), ("bad_input", "limits"), name)
    await waitFor(lambda: len(case.upstream.requests) >= len(row.upstream), 2)
    case.assertEqual(case.upstreamLines(), list(row.upstream), name)
    if row.body is not None:
        case.assertEqual(case.upstream.requests[0].body, row.body, name)
    case.assertNothingSmuggled(name)


def head(line: bytes, *fields: bytes) -> bytes:
    """A raw request head: C{line}, then each field line, CRLF-ended."""
    return b"\r\n".join([line, *fields]) + b"\r\n\r\n"


#: A Content-Length field for L{SMUGGLED} as a body.
LENGTH = b"Content-Length: %d" % len(SMUGGLED)
HOST = b"Host: x"
BOTH = (b"POST /e HTTP/1.1", b"GET /next HTTP/1.1")


class SmugglingTests(_CatalogueTestCase):
    """Request smuggling beyond CL.TE and TE.CL: the proxy and the upstream must agree on every body's end."""

    async def test_bodyWhereNoneIsExpected(self) -> None:
        """
        CL.0 (Kettle, "HTTP/1.1 must die", 2025; Pingora CVE-2025-4366): a body the proxy answers without
        reading, or on a method that usually has none, is forwarded as a body or the connection closed:
        never read as the next request.
        """
        rows = {
            # the proxy answers without reading the body (a filter's 403): the connection closes
            "answered locally": Exchange(head(b"GET /l HTTP/1.1", HOST, b"X-Deny: 1", LENGTH) + SMUGGLED + NEXT, [403]),
            # a GET's body is forwarded as a body, framed by its length
            "GET with a body": Exchange(
                head(b"GET /a HTTP/1.1", HOST, LENGTH) + SMUGGLED + NEXT,
                [200, 200],
                upstream=(b"GET /a HTTP/1.1", b"GET /next HTTP/1.1"),
                body=SMUGGLED,
            ),
            "OPTIONS * with a body": Exchange(
                head(b"OPTIONS * HTTP/1.1", HOST, LENGTH) + SMUGGLED + NEXT,
                [200, 200],
                upstream=(b"OPTIONS * HTTP/1.1", b"GET /next HTTP/1.1"),
                body=SMUGGLED,
            ),
            # refused from the head: closed, nothing after it read
            "CONNECT with a body": Exchange(
                head(b"CONNECT a:443 HTTP/1.1", HOST, LENGTH) + SMUGGLED, [405], b"CONNECT"
            ),
            "over the body limit": Exchange(
                head(b"POST /a HTTP/1.1", HOST, b"Content-Length: 2000") + SMUGGLED + NEXT, [413], b"exceeds"
            ),
        }
        for name, row in rows.items():
            await _play(self, name, row)

    async def test_hiddenLength(self) -> None:
        """
        0.CL (Kettle 2025; CVE-2025-32094): a framing field the proxy might not see while the upstream
        does (or the reverse), by spelling, whitespace or folding, is refused or read the same way.
        """
        post = b"POST /f HTTP/1.1"
        rows = {
            "space before the colon": (head(post, HOST, b"Content-Length : 35"), b"invalid request header name"),
            "a folded first field": (head(post, b" " + LENGTH, HOST), b"starts with a folded line"),
            "vertical tab before the length": (head(post, HOST, b"Content-Length: \x0b35"), b"invalid Content-Length"),
            "a length folded onto two lines": (
                head(post, HOST, b"Content-Length: 3", b" 5"),
                b"invalid Content-Length",
            ),
            "a length with a trailing comma": (head(post, HOST, LENGTH + b","), b"Content-Length"),
            "NUL in a field value": (head(post, HOST, b"X: a\x00b", LENGTH), b"invalid character"),
            "a bare CR in a field value": (head(post, HOST, b"X: a\r" + LENGTH), b"invalid character"),
            "a bare LF ending a field line": (head(post, HOST, LENGTH + b"\nX: y"), b"invalid"),
            "TE with a vertical tab": (head(post, HOST, b"Transfer-Encoding: chunked\x0b"), b"Transfer-Encoding"),
        }
        for name, (payload, reason) in rows.items():
            await _play(self, name, Exchange(payload + SMUGGLED, [400], reason))
        # obs-fold is replaced by a space (RFC 9112 section 5.2) before the framing is read: the upstream
        # gets the same single request, its framing rebuilt
        folded = head(post, HOST, b"Transfer-Encoding:", b" chunked", b"Connection: close") + b"5\r\nhello\r\n0\r\n\r\n"
        await _play(self, "a folded Transfer-Encoding", Exchange(folded, [200], upstream=(post,), body=b"hello"))
        # framing fields listed in Connection are not dropped as hop-by-hop: the body keeps its length
        listed = head(post, HOST, LENGTH, b"Connection: Content-Length, Transfer-Encoding, close") + SMUGGLED
        await _play(self, "a length listed in Connection", Exchange(listed, [200], upstream=(post,), body=SMUGGLED))
        # an HTTP/1.0 request has no body without a length, and its connection closes after it
        old = head(b"POST /f HTTP/1.0", HOST) + SMUGGLED
        await _play(self, "HTTP/1.0 without a length", Exchange(old, [200], upstream=(b"POST /f HTTP/1.1",), body=b""))

    async def test_expectations(self) -> None:
        """
        Expect-based desync (Kettle 2025: "Expect: y 100-continue", "Expect:\\n 100-continue"): an
        expectation other than C{100-continue} is not forwarded, and the body is read by its length alike.
        """
        post = b"POST /e HTTP/1.1"
        rows = {
            "an obfuscated expectation": head(post, HOST, b"Expect: y 100-continue", LENGTH) + SMUGGLED,
            "a folded expectation": head(post, HOST, b"Expect:", b" 100-continue", LENGTH) + SMUGGLED,
        }
        for name, payload in rows.items():
            await _play(self, name, Exchange(payload + NEXT, [200, 200], upstream=BOTH, body=SMUGGLED))
        self.upstream.requests.clear()
        await rawRequest(self.proxy.port, rows["an obfuscated expectation"] + NEXT, timeout=5)
        self.assertEqual(self.upstream.requests[0].headers(b"expect"), [], "an unknown expectation went upstream")
        bodiless = head(b"GET /e HTTP/1.1", HOST, b"Expect: 100-continue") + NEXT
        await _play(
            self, "100-continue, no body", Exchange(bodiless, [200, 200], upstream=(b"GET /e HTTP/1.1", BOTH[1]))
        )

    async def test_chunkLines(self) -> None:
        """
        Chunk-line tricks ("funky chunks", h11 CVE-2025-43859, Go CVE-2023-39326, ATS#10580): whitespace
        before a size, a sign or prefix, sizes past 64 bits, bare LF in an extension or a trailer, an
        oversized extension: 400, the upstream request aborted.
        """
        chunked = head(b"POST /c HTTP/1.1", HOST, b"Transfer-Encoding: chunked")
        refused = {
            b" 5\r\nhello\r\n0\r\n\r\n": b"invalid chunk size",  # whitespace before the size
            b"\t5\r\nhello\r\n0\r\n\r\n": b"invalid chunk size",
            b"5 \r\nhello\r\n0\r\n\r\n": b"invalid chunk size",  # whitespace after, no extension
            b"0x5\r\nhello\r\n0\r\n\r\n": b"invalid chunk size",
            b"+5\r\nhello\r\n0\r\n\r\n": b"invalid chunk size",
            b"-5\r\nhello\r\n0\r\n\r\n": b"invalid chunk size",
            b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n": b"exceeds",  # 2**64 - 1 wraps to -1 in signed 64 bits
            b"1_0\r\nhello\r\n0\r\n\r\n": b"invalid chunk size",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n": b"bare LF",  # TERM.EXT: LF inside an extension
            b"5;a\rb\r\nhello\r\n0\r\n\r\n": b"bare CR",
            b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n": b"exceeds 4096",
            (b"1;" + b"a" * 4000 + b"\r\nx\r\n") * 5 + b"0\r\n\r\n": b"chunk extensions exceed 16384",  # CVE-2023-39326
            b"5\r\nhello\r\n0\r\nX: y\n\r\n": b"bare LF",  # a trailer line ending in a bare LF
            b"5\r\nhello\r\n0\r\nX: y\r\n folded\r\n\r\n": b"folded",
            b"5\r\nhello\n0\r\n\r\n": b"not followed by CRLF",
        }
        for chunks, reason in refused.items():
            await _play(self, repr(chunks[:40]), Exchange(chunked + chunks + SMUGGLED, [400], reason))
        accepted = [
            b"005\r\nhello\r\n0\r\n\r\n",  # leading zeros within 16 digits
            b'5;a=b;c="d;e"\r\nhello\r\n0\r\n\r\n',  # a quoted extension holding a semicolon
            b"5\r\nhello\r\n0;x=y\r\n\r\n",
        ]
        for chunks in accepted:
            row = Exchange(chunked + chunks + NEXT, [200, 200], upstream=(b"POST /c HTTP/1.1", BOTH[1]), body=b"hello")
            await _play(self, repr(chunks[:40]), row)

    async def test_trailers(self) -> None:
        """
        Fields smuggled as trailers (RFC 9110 section 6.5.1; an upstream that merges trailers into the
        header section, as some frameworks do, would read them as the client's): framing, routing,
        forwarding, credentials and request modifiers are dropped; other trailers go on.
        """
        smuggled = [
            b"Host: evil",
            b"Content-Length: 5",
            b"Transfer-Encoding: chunked",
            b"X-Forwarded-For: 10.0.0.1",
            b"Forwarded: for=10.0.0.1",
            b"Cookie: admin=1",
            b"Authorization: Basic YTpi",
            b"Range: bytes=0-1",
            b"Max-Forwards: 0",
            b"Connection: close",
        ]
        chunked = head(b"POST /t HTTP/1.1", HOST, b"Transfer-Encoding: chunked", b"Connection: close")
        trailers = b"\r\n".join([*smuggled, b"X-Checksum: 1"]) + b"\r\n\r\n"
        await _play(
            self,
            "trailers",
            Exchange(chunked + b"5\r\nhello\r\n0\r\n" + trailers, [200], upstream=(b"POST /t HTTP/1.1",)),
        )
        [received] = self.upstream.received
        section = received.split(b"\r\n0\r\n", 1)[1].split(b"\r\n\r\n", 1)[0]
        self.assertEqual(section, b"X-Checksum: 1")


#: A response the upstream sends for a request the proxy never sent.
_STALE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"


class _Desynchronised(protocol.Protocol):
    """
    An upstream out of step with the proxy.  Its first connection, once C{heads} request heads have
    arrived, writes C{answer} (a response with more after it), and a little later another L{_STALE}
    response; its next connections behave, answering C{fresh}.
    """

    def __init__(self, built: list[_Desynchronised], heads: int, answer: bytes) -> None:
        self.first = not built
        self.heads = heads
        self.answer = answer
        self.received = b""
        self.later: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.first:
            if self.received.endswith(b"\r\n\r\n"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        elif self.received.count(b"\r\n\r\n") == self.heads:
            self.transport.write(self.answer)
            self.later = reactor.callLater(0.05, self.transport.write, _STALE)

    def connectionLost(self, reason: object) -> None:
        if self.later is not None and self.later.active():
            self.later.cancel()


class UpstreamDesyncTests(unittest.TestCase):
    """
    Response queue poisoning (Kettle 2025): an upstream that sends more than the response to the request
    it was sent.  Bytes after a complete response are never read as the next client's response: the
    connection is closed, and the next request (here waiting for the one connection allowed) gets a
    fresh one.
    """

    async def test_excessResponse(self) -> None:
        rows = {
            # CL.0 on the upstream: it answers the head (204) and reads the body as a request of its own
            "a body read as a request": (
                head(b"POST /a HTTP/1.1", HOST, LENGTH, b"Connection: close") + SMUGGLED,
                2,
                b"HTTP/1.1 204 No Content\r\n\r\n" + _STALE,
            ),
            # a body sent with the answer to a HEAD, itself a response
            "a body after a HEAD answer": (
                head(b"HEAD /a HTTP/1.1", HOST, b"Connection: close"),
                1,
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(_STALE) + _STALE,
            ),
        }
        for name, (payload, heads, answer) in rows.items():
            listening, built = serve(self, lambda: _Desynchronised(built, heads, answer))  # noqa: B023
            proxy = startProxy(self, [listening.url], "--upstream-max-connections", "1")
            first = rawRequest(proxy.port, payload)
            await sleep(0.01)
            second = rawRequest(proxy.port, head(b"GET /b HTTP/1.1", HOST, b"Connection: close"))
            answers = [splitResponses(await first), splitResponses(await second)]
            self.assertEqual(len(answers[0]), 1, name)
            self.assertEqual([head.split(b" ")[1] for head, _ in answers[1]], [b"200"], name)
            self.assertEqual(answers[1][0][1], b"fresh", f"{name}: a response meant for no request reached a client")


class HostTests(_CatalogueTestCase):
    """RFC 9112 section 3.2: Host on HTTP/1.1 (the cases test_client_input does not already send)."""

    async def test_host(self) -> None:
        get = b"GET / HTTP/1.1"
        rows = {
            "empty Host on HTTP/1.1": (head(get, b"Host:"), b"empty host"),
            "absolute form, empty authority": (head(b"GET http:///a HTTP/1.1", b"Host: a"), b"empty host"),
            "Host repeated in another case": (head(get, b"Host: a", b"hOST: a"), b"more than one Host"),
            "Host with two ports": (head(get, b"Host: a:80:81"), b"invalid host"),
            "Host with a path": (head(get, b"Host: a/admin"), b"invalid host"),
            "Host list": (head(get, b"Host: a, b"), b"invalid host"),
            "absolute form without Host": (head(b"GET http://a/ HTTP/1.1"), b"must have a Host field"),
            "absolute form, userinfo": (head(b"GET http://a:1@b/ HTTP/1.1", b"Host: b"), b"invalid host"),
            "absolute form, other scheme": (
                head(b"GET ftp://a/ HTTP/1.1", b"Host: a"),
                b"absolute path or absolute URL",
            ),
        }
        for name, (payload, reason) in rows.items():
            await _play(self, name, Exchange(payload, [400], reason))

    async def test_absoluteFormWins(self) -> None:
        """The absolute form's authority replaces Host (RFC 9112 section 3.2.2), whatever its case or scheme."""
        for target, host in ((b"HTTPS://Inner:8443?q", b"Inner:8443"), (b"http://[::1]:81/p", b"[::1]:81")):
            self.upstream.requests.clear()
            await rawRequest(
                self.proxy.port, head(b"GET " + target + b" HTTP/1.1", b"Host: outer", b"Connection: close")
            )
            [request] = self.upstream.requests
            self.assertEqual(request.headers(b"host"), [host], target)


class FailedUpgradeTests(_CatalogueTestCase):
    """
    An Upgrade the upstream refuses (websocket-smuggle, 0ang3el; Pingora CVE-2026-2833): no tunnel
    opens, and the bytes the client sends next are read as HTTP by the proxy, not passed through raw.
    """

    async def test_refusedUpgrade(self) -> None:
        upgrade = head(
            b"GET /upgrade HTTP/1.1",
            HOST,
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Version: 1337",
        )
        # the next request is read and answered by the proxy (its filter's 403), not spliced to the upstream
        denied = upgrade + head(b"GET /local HTTP/1.1", HOST, b"X-Deny: 1", b"Connection: close")
        await _play(self, "filtered request", Exchange(denied, [426, 403], upstream=(b"GET /upgrade HTTP/1.1",)))
        # a malformed request after it is refused by the proxy
        smuggling = upgrade + head(b"GET /smuggled HTTP/1.1", HOST, b"Content-Length: 1", b"Transfer-Encoding: chunked")
        reason = b"both Content-Length and Transfer-Encoding"
        await _play(self, "smuggling", Exchange(smuggling, [426, 400], reason, upstream=(b"GET /upgrade HTTP/1.1",)))
        self.assertNotIn(b"/local", b"".join(self.upstream.received), "the upstream saw the proxy's own request")


# -- HTTP/2

_HEADERS, _PRIORITY, _SETTINGS, _PING, _WINDOW_UPDATE, _CONTINUATION = 1, 2, 4, 6, 8, 9
_END_STREAM, _END_HEADERS = 0x1, 0x4
_GET = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")])


def _hangOrAnswer(protocol: object, request: ReceivedRequest) -> bytes:
    """An upstream that never answers C{/hang}, and answers anything else at once."""
    return b"" if request.requestLine.startswith(b"GET /hang ") else OK


class H2FloodTests(unittest.TestCase):
    """
    HTTP/2 floods and bombs: each ends the connection with the code that says why, before any request
    reaches the upstream, and another client's connection goes on.
    """

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, _hangOrAnswer)
        self.proxy = startProxy(self, [self.upstream.url], "--h2-reset-burst", "10", "--h2-reset-rate", "1")
        self.logs = LogCapture(self)
        self.records = Recorder()
        self.proxy.site.observers.append(self.records)

    async def goAway(self, payload: bytes) -> int:
        """Send C{payload} after the preface; the code of the GOAWAY that ends the connection."""
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        client.writeRaw(payload)
        await client.waitUntil(lambda: client.closed.called, timeout=10)
        assert client.goAway is not None
        return client.goAway.error_code

    async def test_malformedTrailers(self) -> None:
        """
        Malformed trailers (MadeYouReset by another frame): each request is answered 400 and reset with
        PROTOCOL_ERROR after its upstream request began, and each such reset spends the Rapid Reset budget:
        past the burst of 10, GOAWAY(ENHANCE_YOUR_CALM).
        """
        client = await H2Client.connect(self.proxy.port, strict=False)
        self.addCleanup(client.close)
        head = [(b":method", b"POST"), (b":path", b"/hang"), (b":scheme", b"http"), (b":authority", b"x")]
        for _ in range(30):
            if client.goAway is not None or client.closed.called:
                break
            stream = client.requestHead(head, endStream=False)
            client.send(stream, b"x", trailers=[(b":path", b"/smuggled")])
            await client.response(stream, timeout=5)
        await client.waitUntil(lambda: client.closed.called, timeout=10)
        assert client.goAway is not None
        self.assertEqual(ErrorCodes(client.goAway.error_code), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLessEqual(client.goAway.last_stream_id, 2 * 12 - 1, "more than the budget went through")

    async def test_bombs(self) -> None:
        # A 4000-byte value entered in the dynamic table once, then referenced by a one-byte index.
        entry = hpack.Encoder().encode([(b"x-a", b"a" * 4000)])
        huge = _GET + entry + b"\xbe" * 2000  # about 8 MB of fields from 6 kB of HPACK
        many = _GET + b"\x90" * 20000  # 20,000 copies of a static field (accept-encoding: gzip, deflate)
        block = _GET + b"\x40\x03x-b\x01b"  # one more field, in CONTINUATION frames of one byte each
        rows = {
            # CVE-2024-27316 (httpd), CVE-2024-27919 (Envoy), CVE-2023-45288 (Go): CONTINUATION frames without end
            "CONTINUATION flood": (
                frame(_HEADERS, _END_STREAM, 1, block[:1])
                + b"".join(frame(_CONTINUATION, 0, 1, block[1:2]) for _ in range(500)),
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
            "empty CONTINUATION flood": (
                frame(_HEADERS, _END_STREAM, 1, _GET) + frame(_CONTINUATION, 0, 1, b"") * 5000,
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
            # CVE-2019-9518 (empty frames flood): DATA frames that carry nothing and end nothing
            "empty DATA flood": (
                frame(_HEADERS, _END_HEADERS, 1, _GET) + frame(0, 0, 1, b"") * 2000,
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
            # CVE-2019-9513 (resource loop): priorities for 1,200 streams that never open, each kept in the tree
            "PRIORITY churn": (
                b"".join(frame(_PRIORITY, 0, 2 * i + 1, struct.pack(">IB", 0, 15)) for i in range(1200)),
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
            # CVE-2016-6581 (HPACK bomb), CVE-2026-49975 / CVE-2026-47774 ("HTTP/2 Bomb"): by size, by count
            "HPACK bomb by size": (frame(_HEADERS, _END_STREAM | _END_HEADERS, 1, huge), ErrorCodes.ENHANCE_YOUR_CALM),
            "HPACK bomb by count": (
                frame(_HEADERS, _END_STREAM, 1, many[:16000]) + frame(_CONTINUATION, _END_HEADERS, 1, many[16000:]),
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
        }
        polite = await H2Client.connect(self.proxy.port)
        self.addCleanup(polite.close)
        for name, (payload, code) in rows.items():
            self.assertEqual(ErrorCodes(await self.goAway(payload)), code, name)
        self.assertEqual(self.upstream.requests, [])
        response = await polite.response(polite.request(b"GET", b"/"))
        self.assertEqual(response.status, 200, "another client's connection is unaffected")
        logged = "\n".join(self.logs.formatted())
        self.assertIn("ENHANCE_YOUR_CALM", logged)
        # each connection refused is recorded for the access log, and counted as a flood (429); the empty DATA
        # flood's stream had opened, and its request's record says it was cut off (no response), and why
        refused = [(r.status, rejectionReason(r), r.reason) for r in self.records.records if r.status != 200]
        expected = [(429, "rate_limit")] * len(rows)
        expected[list(rows).index("empty DATA flood")] = (None, "limits")
        self.assertEqual([(status, reason) for status, reason, _ in refused], expected)
        self.assertTrue(all("GOAWAY ENHANCE_YOUR_CALM" in why for _, _, why in refused), refused)

    async def test_priorityTreeFullThenHeaders(self) -> None:
        """
        The PRIORITY churn of CVE-2019-9513 stopped one short of the tree's limit (999 idle streams and its
        root fill the 1,000 places), then a request: the stream its HEADERS opens finds no place, and the
        connection ends with GOAWAY(ENHANCE_YOUR_CALM) as for the churn itself (it used to raise
        priority's TooManyStreamsError out of the reactor, an unhandled error that dropped the connection).
        """
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        client.writeRaw(b"".join(frame(_PRIORITY, 0, 2 * i, struct.pack(">IB", 0, 15)) for i in range(1, 1000)))
        await sleep(0.2)
        self.assertFalse(client.closed.called, "the tree holds 999 idle streams")
        client.writeRaw(frame(_HEADERS, _END_STREAM | _END_HEADERS, 1, _GET))
        await client.waitUntil(lambda: client.closed.called)
        self.assertEqual(self.flushLoggedErrors(priority.TooManyStreamsError), [], "raised out of the reactor")
        assert client.goAway is not None
        self.assertEqual(client.goAway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(self.upstream.requests, [])
        self.assertIn("more streams than the priority tree holds", "\n".join(self.logs.formatted()))
        await waitFor(lambda: self.records.records, 2)
        [record] = self.records.records
        self.assertEqual((record.status, rejectionReason(record)), (429, "rate_limit"))
        self.assertEqual(
            record.reason,
            "HTTP/2 connection closed with GOAWAY ENHANCE_YOUR_CALM: too many streams in the priority tree",
        )

    async def test_madeYouReset(self) -> None:
        """
        MadeYouReset (CVE-2025-8671; Tempesta's analysis, 2025): frames that make the server reset its own
        streams count against the Rapid Reset budget like the client's own resets (or end the connection
        at once, where h2 makes them connection errors), and the upstream requests of the reset streams
        do not go on.
        """
        primitives = {
            "WINDOW_UPDATE past 2**31 - 1": (
                lambda stream: frame(_WINDOW_UPDATE, 0, stream, struct.pack(">I", 2**31 - 1)),
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
            "DATA after END_STREAM": (lambda stream: frame(0, _END_STREAM, stream, b"x"), ErrorCodes.ENHANCE_YOUR_CALM),
            "HEADERS after END_STREAM": (
                lambda stream: frame(_HEADERS, _END_STREAM | _END_HEADERS, stream, _GET),
                ErrorCodes.ENHANCE_YOUR_CALM,
            ),
            "WINDOW_UPDATE of 0": (
                lambda stream: frame(_WINDOW_UPDATE, 0, stream, bytes(4)),
                ErrorCodes.PROTOCOL_ERROR,
            ),
            "PRIORITY on itself": (
                lambda stream: frame(_PRIORITY, 0, stream, struct.pack(">IB", stream, 15)),
                ErrorCodes.PROTOCOL_ERROR,
            ),
            "PRIORITY of 4 bytes": (lambda stream: frame(_PRIORITY, 0, stream, bytes(4)), ErrorCodes.FRAME_SIZE_ERROR),
        }
        pools = [upstream.pool for upstream in self.proxy.upstreams]
        for name, (provoke, code) in primitives.items():
            client = await H2Client.connect(self.proxy.port)
            self.addCleanup(client.close)
            for _ in range(30):
                if client.goAway is not None or client.closed.called:
                    break
                stream = client.request(b"GET", b"/hang")
                client.writeRaw(provoke(stream))
                await sleep(0)
            await client.waitUntil(lambda: client.closed.called)  # noqa: B023 (awaited in this iteration)
            assert client.goAway is not None
            self.assertEqual(ErrorCodes(client.goAway.error_code), code, name)
            # the burst of 10 (and the rate of 1/s) let the 11th reset through, not more
            self.assertLessEqual(client.goAway.last_stream_id, 2 * 12 - 1, f"{name}: more than the budget went through")
            # no upstream exchange of a reset stream goes on (a connection it opened waits idle in the pool)
            self.assertTrue(await waitFor(lambda: all(pool.openCount == pool.idleCount for pool in pools), 5), name)
        self.assertEqual(self.upstream.requests, [])


class ZeroWindowTests(unittest.TestCase):
    """
    Zero-window slow reads (CVE-2019-9517, "internal data buffering"): a client that opens streams with a
    window of 0 and never opens it costs the proxy its bounded buffers, and the upstreams are paused.
    """

    async def test_zeroWindow(self) -> None:
        listening, built = serve(self, lambda: _LargeUpstream(16 * MiB))
        proxy = startProxy(self, [listening.url])
        client = await H2Client.connect(proxy.port, initialWindow=0)
        self.addCleanup(client.close)
        streams = [client.request(b"GET", b"/large/%d" % i) for i in range(10)]
        await client.waitUntil(lambda: all(client.streams[s].headers is not None for s in streams))
        self.assertTrue(await waitFor(lambda: len(built) == 10 and all(u.paused for u in built), 10))
        [connection] = [c.handler for c in proxy.site.connections]
        self.assertLessEqual(connection._queuedTotal, 10 * (STREAM_BUFFER + 65536))
        self.assertEqual(b"".join(client.streams[s].data for s in streams), b"", "DATA went past a window of 0")
        self.assertLess(sum(u.sent for u in built), 10 * 8 * MiB, "the upstreams were not paused")


class _Unique(protocol.Protocol):
    """An upstream whose every response carries a field value of 200 bytes never sent before."""

    count = 0

    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            _Unique.count += 1
            unique = b"%0200d" % _Unique.count
            self.transport.write(b"HTTP/1.1 200 OK\r\nX-Unique: %s\r\nContent-Length: 2\r\n\r\nok" % unique)


class EncoderTableTests(unittest.TestCase):
    """
    HPACK table inflation, the other way (RFC 7541 section 4.2): a client that advertises a huge
    SETTINGS_HEADER_TABLE_SIZE would have the proxy's encoder keep every distinct response field of the
    connection for ever.  The encoder keeps at most 4 KiB, whatever the client allows.
    """

    async def test_hugeTableAdvertised(self) -> None:
        listening, _ = serve(self, _Unique)
        proxy = startProxy(self, [listening.url])
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        client.conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**30})
        client.writeRaw(b"")
        for i in range(50):
            response = await client.response(client.request(b"GET", b"/%d" % i))
            self.assertEqual(response.status, 200)
        [connection] = [c.handler for c in proxy.site.connections]
        self.assertLessEqual(connection.conn.encoder.header_table_size, 4096)
        self.assertEqual(len(response.header(b"x-unique")[0]), 200, "the client decodes what the proxy encodes")


class _AnswersHeads(protocol.Protocol):
    """
    An upstream that answers each request head as it arrives, reading no body (as a server answering a
    static file does): a body the proxy sends short of its Content-Length would be made up from the
    next request's bytes.  It keeps every byte it received.
    """

    transport: Any

    def __init__(self) -> None:
        self.received = b""
        self.answered = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while self.answered < self.received.count(b"\r\n\r\n"):
            self.answered += 1
            self.transport.write(OK)


class DowngradeTests(unittest.TestCase):
    """
    HTTP/2 to HTTP/1.1 downgrade injection (PortSwigger, "HTTP/2: the sequel is always worse"): what is
    not covered by test_h2_requests.  Each malformed request is answered 400, its stream then reset with
    PROTOCOL_ERROR (RFC 9113 section 8.1.1), nothing reaches the upstream, and the connection goes on.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        self.upstream = ScriptedUpstream(self, _hangOrAnswer)
        self.proxy = startProxy(self, [self.upstream.url])
        self.records = Recorder()
        self.proxy.site.observers.append(self.records)
        self.client = await H2Client.connect(self.proxy.port, strict=False)
        self.addCleanup(self.client.close)

    async def test_injection(self) -> None:
        base = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")]
        rows = {
            "NUL in a value": ([*base, (b":authority", b"x"), (b"x-a", b"a\x00b")], b"NUL, CR or LF"),
            "a bare CR in a value": ([*base, (b":authority", b"x"), (b"x-a", b"a\rTransfer-Encoding: x")], b"CR"),
            "LF in a name": ([*base, (b":authority", b"x"), (b"x-a\nhost", b"evil")], b"invalid field name"),
            "CRLF in :authority": ([*base, (b":authority", b"x\r\nX-Injected: 1")], b"NUL, CR or LF"),
            "CRLF in :path": ([(b":method", b"GET"), (b":path", b"/ HTTP/1.1\r\nHost: evil\r\n\r\nGET /smuggled"), (b":scheme", b"http"), (b":authority", b"x")], b"NUL, CR or LF"),  # noqa: E501
            "CRLF in :method": ([(b":method", b"GET / HTTP/1.1\r\n"), *base[1:], (b":authority", b"x")], b"CR or LF"),
            "an empty :authority": ([*base, (b":authority", b"")], b"empty host"),
            ":authority and host differ": ([*base, (b":authority", b"x"), (b"host", b"x:8080")], b"differs"),
            "proxy-connection": ([*base, (b":authority", b"x"), (b"proxy-connection", b"close")], b"connection-"),
            "keep-alive": ([*base, (b":authority", b"x"), (b"keep-alive", b"timeout=5")], b"connection-"),
            "te: trailers, gzip": ([*base, (b":authority", b"x"), (b"te", b"trailers, gzip")], b"TE field"),
            "userinfo in :authority": ([*base, (b":authority", b"user@x")], b"invalid host"),
        }  # fmt: skip
        for name, (block, reason) in rows.items():
            response = await self.client.response(self.client.requestHead(block))
            self.assertEqual(response.status, 400, name)
            self.assertIn(reason, response.data, name)
            self.assertEqual(response.resetCode, ErrorCodes.PROTOCOL_ERROR, name)
            self.assertFalse(self.client.closed.called, name)
        self.assertEqual(b"".join(self.upstream.received), b"")
        self.assertEqual([rejectionReason(r) for r in self.records.records], ["bad_input"] * len(rows))
        response = await self.client.response(self.client.request(b"GET", b"/fine"))
        self.assertEqual((response.status, response.resetCode), (200, None), "the connection goes on")

    async def test_sameAuthority(self) -> None:
        """
        A Host naming the same host and port as ``:authority`` (RFC 9113 section 8.3.1 compares them
        normalised: case, an empty or default port) is not a disagreement; the upstream gets ``:authority``.
        """
        base = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"Example.com")]
        for host in (b"example.COM", b"example.com:80", b"example.com:"):
            self.upstream.requests.clear()
            response = await self.client.response(self.client.requestHead([*base, (b"host", host)]))
            self.assertEqual(response.status, 200, host)
            self.assertEqual(self.upstream.requests[0].headers(b"host"), [b"Example.com"], host)

    async def mismatched(self, length: bytes) -> int:
        """A POST declaring C{length}, followed by DATA that does not add up to it; the GOAWAY's code."""
        post = [(b":method", b"POST"), (b":path", b"/h2cl"), (b":scheme", b"http"), (b":authority", b"x")]
        client = await H2Client.connect(self.proxy.port, strict=False)
        self.addCleanup(client.close)
        stream = client.requestHead([*post, (b"content-length", length)], endStream=False)
        client.send(stream, b"hello" + SMUGGLED, endStream=True)
        await client.waitUntil(lambda: client.closed.called)
        assert client.goAway is not None
        return client.goAway.error_code

    async def test_lengthAgainstData(self) -> None:
        """
        H2.CL (the same write-up): DATA that does not add up to the ``content-length`` ends the connection
        (h2 makes it a connection error, GOAWAY(PROTOCOL_ERROR)), and the extra bytes never become a
        request upstream: the upstream sees at most the declared body.
        """
        for length in (b"0", b"5"):
            self.assertEqual(ErrorCodes(await self.mismatched(length)), ErrorCodes.PROTOCOL_ERROR, length)
        await sleep(0.2)
        for connection in self.upstream.received:
            self.assertNotIn(b"/smuggled", connection)
        self.assertEqual([request.body for request in self.upstream.requests if request.body], [])

    async def test_lengthWithoutData(self) -> None:
        """
        H2.CL with no DATA at all: a HEADERS frame that ends the stream declares ``content-length: 41``.  No
        DATA can make up the body (RFC 9113 section 8.1.1): the request is malformed, answered 400 on its
        stream then reset with PROTOCOL_ERROR, and never forwarded.  It used to go upstream with
        ``Content-Length: 41`` and no body, and an upstream that answers the head at once (here: every
        head, as it arrives) would have read the first 41 bytes of the next request on its connection as
        that body, and the rest as a request of the client's making.  The connection goes on: the next
        stream's request reaches the upstream as it was sent, alone on its connection.
        """
        listening, built = serve(self, _AnswersHeads)
        proxy = startProxy(self, [listening.url], "--upstream-max-connections", "1")
        client = await H2Client.connect(proxy.port, strict=False)
        self.addCleanup(client.close)
        post = [(b":method", b"POST"), (b":path", b"/first"), (b":scheme", b"http"), (b":authority", b"x")]
        refused = await client.response(client.requestHead([*post, (b"content-length", b"41")], endStream=True))
        self.assertEqual((refused.status, refused.resetCode), (400, ErrorCodes.PROTOCOL_ERROR))
        self.assertIn(b"content-length 41 on a request that ended with its HEADERS", refused.data)
        get = [(b":method", b"GET"), (b":path", b"/next"), (b":scheme", b"http"), (b":authority", b"x")]
        following = await client.response(client.requestHead([*get, (b"x-pad", b"GET /smuggled HTTP/1.1")]))
        self.assertEqual((following.status, following.data, following.resetCode), (200, b"ok", None))
        self.assertFalse(client.closed.called, "the connection goes on")
        [upstream] = built
        received = upstream.received
        head, end, rest = received.partition(b"\r\n\r\n")
        self.assertEqual((end, rest), (b"\r\n\r\n", b""), f"one head and nothing else: {received!r}")
        request = ReceivedRequest(head, b"")
        self.assertEqual(request.requestLine, b"GET /next HTTP/1.1")
        self.assertEqual(request.headers(b"x-pad"), [b"GET /smuggled HTTP/1.1"])
        self.assertEqual(request.headers(b"content-length"), [])
        self.assertEqual(upstream.answered, 1)

    async def test_shortBodyEndedByTrailers(self) -> None:
        """
        H2.CL ended by trailers: ``content-length: 10``, DATA of 5 bytes, then trailers that end the stream.
        The body is short of its length as the stream ends: the connection ends with GOAWAY(PROTOCOL_ERROR),
        as when DATA ends it short.  The upstream connection, which had the head and the 5 bytes, is
        closed, not given the next request to complete the body with; the next request gets a connection
        of its own.
        """
        client = await H2Client.connect(self.proxy.port, strict=False)
        self.addCleanup(client.close)
        post = [(b":method", b"POST"), (b":path", b"/short"), (b":scheme", b"http"), (b":authority", b"x")]
        stream = client.requestHead([*post, (b"content-length", b"10")], endStream=False)
        client.send(stream, b"12345")
        upstream = self.upstream
        self.assertTrue(await waitFor(lambda: upstream.connections and upstream.received[0].endswith(b"\r\n12345")))
        [partial] = upstream.connections
        client.send(stream, b"", trailers=[(b"x-checksum", b"1")])
        await client.waitUntil(lambda: client.closed.called, timeout=5)
        assert client.goAway is not None
        self.assertEqual(client.goAway.error_code, ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(await waitFor(lambda: partial in upstream.lost, 2), "the upstream connection stayed open")
        response = await self.client.response(self.client.request(b"GET", b"/next"))
        self.assertEqual((response.status, response.data), (200, b"ok"))
        self.assertEqual([request.requestLine for request in upstream.requests], [b"GET /next HTTP/1.1"])
        head, _, body = partial.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"POST /short HTTP/1.1\r\n"), head)
        self.assertEqual(ReceivedRequest(head, b"").headers(b"content-length"), [b"10"])
        self.assertEqual(body, b"12345", "the partial request's connection carried nothing more")
        self.assertTrue(upstream.received[1].startswith(b"GET /next HTTP/1.1\r\n"))
