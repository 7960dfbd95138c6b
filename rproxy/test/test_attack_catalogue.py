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

from dataclasses import dataclass

import h2.errors
from twisted.trial import unittest

from rproxy.errors import clientError
from rproxy.observe.metrics import rejectionReason
from rproxy.proxy.message import RequestContext
from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    rawRequest,
    splitResponses,
    startProxy,
    useFilters,
    waitFor,
)
from rproxy.test.test_filter_chain import Step
from rproxy.test.test_observe_record import Recorder

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

    arguments: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, _answer)
        self.proxy = startProxy(
            self,
            [self.upstream.url],
            *("--max-body-size", "1k", "--header-timeout", "2"),
            *self.arguments,
        )
        useFilters(self.proxy, Step(b"deny", [], _deny))
        self.records = Recorder()
        self.proxy.site.observers.append(self.records)

    def upstreamLines(self) -> list[bytes]:
        return [request.requestLine for request in self.upstream.requests]

    def assertNothingSmuggled(self, row: str) -> None:
        for connection in self.upstream.received:
            self.assertNotIn(b"/smuggled", connection.split(b"\r\n\r\n", 1)[0], row)
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
    refusals = [(head, body) for head, body in responses if b"\r\nX-Rproxy-Fault: client" in head]
    if row.reason:
        head, body = refusals[0]
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
