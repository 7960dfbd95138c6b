"""
HTTP/2 requests are checked before they become HTTP/1.1 ones (rproxy/downstream/h2request.py,
rproxy/downstream/validation.py).

An attacker's HTTP/2 client (h2 with its outbound checks switched off) sends what well-behaved clients
never do: spaces and control characters in pseudo-header fields, absolute URLs in ``:path``, hostile
authorities, lengths past 64 bits, empty DATA frames, too many fields.  A raw upstream records every
byte it receives, so each test proves what reached it: nothing, or one well-framed request.
"""

from __future__ import annotations

import h2.errors
from twisted.trial import unittest

from rproxy.test.h2client import H2Client, StreamRecord
from rproxy.test.support import LogCapture, ReceivedRequest, ScriptedUpstream, startProxy, waitFor

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _answerOK(protocol: object, request: ReceivedRequest) -> bytes:
    return _OK


class _Tests(unittest.TestCase):
    """A proxy in front of a raw upstream, and an attacker's HTTP/2 client."""

    arguments: tuple[str, ...] = ()

    async def setUp(self) -> None:  # type: ignore[override]
        self.upstream = ScriptedUpstream(self, _answerOK)
        self.proxy = startProxy(self, [self.upstream.url], *self.arguments)
        self.logs = LogCapture(self)
        self.client = await H2Client.connect(self.proxy.port, strict=False)
        self.addCleanup(self.client.close)

    def request(self, head: list[tuple[bytes, bytes]], endStream: bool = True) -> int:
        return self.client.requestHead(head, endStream)

    async def refused(self, streamID: int, status: int, reasonPart: bytes) -> StreamRecord:
        """
        The stream was answered with C{status}, its reason (in the body and the log) mentioning
        C{reasonPart}; the connection goes on, and no byte reached the upstream.  A malformed request's
        stream (400) is then reset with PROTOCOL_ERROR, the stream error of RFC 9113 section 8.1.1.
        """
        response = await self.client.response(streamID)
        self.assertEqual(response.status, status, response)
        if status == 400:
            self.assertEqual(response.resetCode, h2.errors.ErrorCodes.PROTOCOL_ERROR, response)
        self.assertEqual(response.header(b"x-rproxy-fault"), [b"client"])
        self.assertIn(reasonPart, response.data)
        self.assertEqual(response.data.count(b"\n"), 1, "the reason is one line")
        [event] = self.logs.withStatus(status)
        self.assertIn(reasonPart.decode(), event["reason"])
        self.assertEqual(b"".join(self.upstream.received), b"")
        self.assertFalse(self.client.closed.called)
        return response

    async def forwarded(self, streamID: int) -> bytes:
        """The stream was answered by the upstream; the exact bytes of the one request it received."""
        response = await self.client.response(streamID)
        self.assertEqual((response.status, response.data), (200, b"ok"), response)
        [received] = self.upstream.received
        self.assertEqual(len(self.upstream.requests), 1, received)
        return received

    async def lengthRefused(self, head: list[tuple[bytes, bytes]], reasonPart: bytes) -> None:
        """
        The block C{head}, sent on a connection of its own without END_STREAM, is refused and nothing is
        forwarded: h2 4.3 and newer refuse a bad content-length themselves (GOAWAY(PROTOCOL_ERROR)), before
        rproxy sees it; with an older h2, rproxy answers 400 saying C{reasonPart}.
        """
        client = await H2Client.connect(self.proxy.port, strict=False)
        self.addCleanup(client.close)
        response = await client.response(client.requestHead(head, endStream=False))
        if client.closed.called:
            assert client.goAway is not None
            self.assertEqual(client.goAway.error_code, h2.errors.ErrorCodes.PROTOCOL_ERROR, head)
        else:
            self.assertEqual(response.status, 400, head)
            self.assertIn(reasonPart, response.data)
        self.assertEqual(b"".join(self.upstream.received), b"")


def _head(
    method: bytes = b"GET", path: bytes = b"/", authority: bytes | None = b"example.com", scheme: bytes = b"http"
) -> list[tuple[bytes, bytes]]:
    head = [(b":method", method), (b":path", path), (b":scheme", scheme)]
    if authority is not None:
        head.append((b":authority", authority))
    return head


class PseudoHeaderTests(_Tests):
    """What becomes the upstream's request line and Host is checked (RFC 9113 section 8.3)."""

    async def test_spaceInMethod(self) -> None:
        """A space in :method would split the request line: 400."""
        await self.refused(self.request(_head(method=b"GET /smuggled")), 400, b"invalid method 'GET /smuggled'")

    async def test_spaceInPath(self) -> None:
        """The upstream would read GET /public /smuggled HTTP/1.1: 400 instead."""
        await self.refused(self.request(_head(path=b"/public /smuggled")), 400, b"space or a control character")

    async def test_controlsInPath(self) -> None:
        """A tab, a DEL, a vertical tab or a NUL in :path: 400 each."""
        for path in (b"/a\tb", b"/a\x7fb", b"/a\x0bb"):
            await self.refused(self.request(_head(path=path)), 400, b"space or a control character")
            self.logs.events.clear()
        await self.refused(self.request(_head(path=b"/a\x00b")), 400, b"NUL, CR or LF")

    async def test_absoluteURLInPath(self) -> None:
        """An absolute URL in :path does not replace :authority (it would choose another Host): 400."""
        await self.refused(self.request(_head(path=b"http://evil.example/x")), 400, b"is not an absolute path")

    async def test_relativePath(self) -> None:
        await self.refused(self.request(_head(path=b"x/y")), 400, b"is not an absolute path")

    async def test_asteriskOnlyForOptions(self) -> None:
        """``*`` is the target of OPTIONS only."""
        await self.refused(self.request(_head(path=b"*")), 400, b"is not an absolute path")
        received = await self.forwarded(self.request(_head(method=b"OPTIONS", path=b"*")))
        self.assertTrue(received.startswith(b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n"), received)

    async def test_invalidAuthority(self) -> None:
        """An authority that is not host[:port] (userinfo, a slash, a space, a bad port or literal): 400."""
        for authority in (b"a/b@c d", b"user@example.com", b"example.com:80x", b"[zz::1]", b"exa mple.com"):
            await self.refused(self.request(_head(authority=authority)), 400, b"invalid host")
            self.logs.events.clear()

    async def test_validAuthorities(self) -> None:
        """A name, an IPv4 address and an IPv6 literal, with ports, are forwarded as Host."""
        for authority in (b"example.com:8443", b"127.0.0.1", b"[::1]:8080"):
            response = await self.client.response(self.request(_head(authority=authority)))
            self.assertEqual(response.status, 200)
        self.assertEqual(
            [r.headers(b"host") for r in self.upstream.requests],
            [[b"example.com:8443"], [b"127.0.0.1"], [b"[::1]:8080"]],
        )

    async def test_hostWithoutAuthority(self) -> None:
        """A Host field stands in for a missing :authority (RFC 9113 section 8.3.1), and is checked too."""
        received = await self.forwarded(self.request([*_head(authority=None), (b"host", b"example.org")]))
        self.assertIn(b"\r\nHost: example.org\r\n", received)

    async def test_invalidHostWithoutAuthority(self) -> None:
        await self.refused(self.request([*_head(authority=None), (b"host", b"a b")]), 400, b"invalid host")

    async def test_twoHostsWithoutAuthority(self) -> None:
        head = [*_head(authority=None), (b"host", b"a.example"), (b"host", b"b.example")]
        await self.refused(self.request(head), 400, b"more than one Host field")

    async def test_noAuthorityAtAll(self) -> None:
        await self.refused(self.request(_head(authority=None)), 400, b"neither :authority nor Host")

    async def test_authorityAndHostOnce(self) -> None:
        """:authority and an identical Host reach the upstream as one Host field."""
        received = await self.forwarded(self.request([*_head(), (b"host", b"example.com")]))
        self.assertEqual(ReceivedRequest(received, b"").headers(b"host"), [b"example.com"])

    async def test_authorityAndHostDiffer(self) -> None:
        """Which one would the upstream believe?  400."""
        await self.refused(self.request([*_head(), (b"host", b"evil.example")]), 400, b"differs from :authority")

    async def test_invalidScheme(self) -> None:
        await self.refused(self.request(_head(scheme=b"ht tp")), 400, b"invalid :scheme")


class FieldTests(_Tests):
    """Fields that would change the HTTP/1.1 framing never get there."""

    async def test_crlfInValue(self) -> None:
        """A CR LF in a value would inject a header line: 400 (a stream error: the connection goes on)."""
        head = [*_head(), (b"x-a", b"1\r\nTransfer-Encoding: chunked")]
        await self.refused(self.request(head), 400, b"NUL, CR or LF")

    async def test_connectionSpecificFields(self) -> None:
        """Transfer-Encoding, Connection, Upgrade (an h2c smuggling attempt), Keep-Alive: 400, each time."""
        for field in ((b"transfer-encoding", b"chunked"), (b"connection", b"close"), (b"upgrade", b"h2c")):
            await self.refused(self.request([*_head(), field]), 400, b"connection-specific field")
            self.logs.events.clear()

    async def test_malformedFields(self) -> None:
        """What RFC 9113 section 8.2 forbids in any field block: 400 each, nothing forwarded."""
        cases = [
            ([*_head(), (b"X-Upper", b"v")], b"invalid field name"),
            ([*_head(), (b"x sp", b"v")], b"invalid field name"),
            ([*_head(), (b"x:y", b"v")], b"invalid field name"),
            ([*_head(), (b"", b"v")], b"invalid field name"),
            ([*_head(), (b"x-a", b" padded")], b"starts or ends with a blank"),
            ([*_head(), (b"te", b"gzip")], b"TE field other than 'trailers'"),
            ([(b"x-first", b"v"), *_head()], b"follows a regular field"),
            ([*_head(), (b"x-a", b"1"), (b":protocol", b"websocket")], b"follows a regular field"),
            ([*_head(), (b":status", b"200")], b"unknown pseudo-header field"),
            ([(b":method", b"GET"), (b":method", b"PUT"), *_head()[1:]], b"repeated pseudo-header field"),
            (_head()[1:], b"has no :method"),
            ([h for h in _head() if h[0] != b":path"], b"no :scheme or no :path"),
            ([*_head(), (b":protocol", b"websocket")], b":protocol on a request other"),
        ]
        for head, reason in cases:
            await self.refused(self.request(head), 400, reason)
            self.logs.events.clear()

    async def test_malformedTrailers(self) -> None:
        """Trailers with a pseudo-header field or a CR: the body is refused, and never completes upstream."""
        for trailers, reason in (
            ([(b":path", b"/x")], b"pseudo-header field"),
            ([(b"x-a", b"a\rb")], b"NUL, CR or LF"),
        ):
            stream = self.request(_head(method=b"POST"), endStream=False)
            self.client.send(stream, b"part", trailers=trailers)
            response = await self.client.response(stream)
            self.assertEqual(response.status, 400, response)
            self.assertIn(reason, response.data)
            self.assertEqual(self.upstream.requests, [], "the upstream saw a complete request")
            self.logs.events.clear()

    async def test_contentLengthPast63Bits(self) -> None:
        """An upstream that keeps lengths in 64 bits would wrap these and read a smuggled request."""
        for length in (b"9223372036854775808", b"18446744073709551621"):
            stream = self.request([*_head(method=b"POST"), (b"content-length", length)], endStream=False)
            await self.refused(stream, 400, b"exceeds 9223372036854775807")
            self.logs.events.clear()

    async def test_contentLengthNotDigits(self) -> None:
        """Signs, underscores, hex, lists: each is refused (by h2, or by rproxy with 400)."""
        for length in (b"+5", b"5_0", b"-1", b"0x5", b"5, 5"):
            await self.lengthRefused([*_head(method=b"POST"), (b"content-length", length)], b"Content-Length")

    async def test_conflictingContentLengths(self) -> None:
        head = [*_head(method=b"POST"), (b"content-length", b"5"), (b"content-length", b"6")]
        await self.lengthRefused(head, b"Content-Length")

    async def test_cookieCrumbsJoined(self) -> None:
        """Cookie crumbs (RFC 9113 section 8.2.3) reach an HTTP/1.1 upstream as one Cookie field."""
        head = [*_head(), (b"cookie", b"a=1"), (b"x-other", b"o"), (b"cookie", b"b=2")]
        received = await self.forwarded(self.request(head))
        self.assertEqual(ReceivedRequest(received, b"").headers(b"cookie"), [b"a=1; b=2"])


class EmptyDataTests(_Tests):
    """An empty DATA frame carries nothing: it never becomes the last-chunk marker of an HTTP/1.1 body."""

    async def test_emptyDataMidBody(self) -> None:
        stream = self.request(_head(method=b"POST"), endStream=False)
        self.client.send(stream, b"first")
        self.client.send(stream, b"")
        self.assertTrue(await waitFor(lambda: b"first" in b"".join(self.upstream.received)))
        self.client.send(stream, b"")
        self.client.send(stream, b"second", endStream=True)
        received = await self.forwarded(stream)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
        self.assertEqual(body, b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n")

    async def test_emptyDataBeforeTrailers(self) -> None:
        """Empty DATA, then trailers: one chunked body, its trailers after the last chunk."""
        stream = self.request([*_head(method=b"POST"), (b"te", b"trailers")], endStream=False)
        self.client.send(stream, b"abc")
        self.client.send(stream, b"", trailers=[(b"x-sum", b"3")])
        received = await self.forwarded(stream)
        self.assertTrue(received.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 3\r\n\r\n"), received)

    async def test_onlyEmptyData(self) -> None:
        """A body of empty DATA frames is an empty body."""
        stream = self.request(_head(method=b"POST"), endStream=False)
        self.client.send(stream, b"")
        self.client.send(stream, b"", endStream=True)
        received = await self.forwarded(stream)
        self.assertTrue(received.endswith(b"\r\n\r\n0\r\n\r\n"), received)


class LimitTests(_Tests):
    """The request head limits of HTTP/1.1 hold on HTTP/2 (431)."""

    arguments = ("--max-headers", "20", "--max-header-size", "4096")

    async def test_tooManyFields(self) -> None:
        head = _head() + [(b"x-f%d" % i, b"v") for i in range(21)]
        await self.refused(self.request(head), 431, b"more than 20 header fields")

    async def test_thousandFields(self) -> None:
        """The attack of the issue: a thousand fields are not forwarded."""
        head = _head() + [(b"x-f%d" % i, b"v") for i in range(1000)]
        await self.refused(self.request(head), 431, b"more than 20 header fields")

    async def test_fieldsTooLarge(self) -> None:
        head = [*_head(), (b"x-big", b"a" * 4100)]
        await self.refused(self.request(head), 431, b"the request header section exceeds 4096 bytes")

    async def test_cookieCrumbsCountOnce(self) -> None:
        """A browser's many cookie crumbs are one field (h2 joins them), as they are on HTTP/1.1."""
        head = _head() + [(b"cookie", b"c%d=1" % i) for i in range(40)]
        received = await self.forwarded(self.request(head))
        self.assertEqual(len(ReceivedRequest(received, b"").headers(b"cookie")), 1)

    async def test_withinLimits(self) -> None:
        head = _head() + [(b"x-f%d" % i, b"v") for i in range(19)]
        await self.forwarded(self.request(head))
