"""
Tests of L{rproxy.filters.compress}: C{Accept-Encoding} negotiation, when a response is compressed and when
never, the head it gets (C{Vary}, C{ETag}, framing fields), bodies that decode to the upstream's whatever the
parts they came in; then over real sockets, with curl and httpx decoding gzip, brotli and zstd on HTTP/1.1
and HTTP/2, a stream whose first part reaches the client before the upstream sends the next, and a 100 MiB
body through the proxy with its memory watched.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import time
import zlib
from collections.abc import Callable, Sequence

import brotli
import httpx
import zstandard
from twisted.internet import protocol, reactor, task, threads
from twisted.internet.interfaces import IPushProducer
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.errors import clientError
from rproxy.filters.compress import Compress, CompressedBody, MediaRanges, acceptedCodings, preferredCoding
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.plugins.filters import compress
from rproxy.proxy.message import LocalResponse, OutboundRequest, RequestContext
from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    _ScriptedProtocol,
    curl,
    headerValues,
    rawRequest,
    responseStatus,
    startProxy,
    useFilters,
    waitFor,
)
from rproxy.testing import FilterResult, inboundRequest, runFilters, verifyFilterFactory

MiB = 1 << 20

#: About 29 KB of text that compresses as web pages do (words, numbers, repetition at a distance).
_WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega request response header".split()
_random = random.Random(7)
TEXT = "".join(
    f"<li id='item{i}' class='{_random.choice(_WORDS)}'>{' '.join(_random.sample(_WORDS, 5))} {_random.random()}</li>\n"
    for i in range(400)
).encode()

CODINGS = (b"gzip", b"br", b"zstd")


def decode(coding: bytes, data: bytes) -> bytes:
    """C{data} decoded from C{coding}; fails unless it is one whole, well-formed stream."""
    if coding == b"gzip":
        return gzip.decompress(data)
    if coding == b"br":
        return brotli.decompress(data)  # type: ignore[no-any-return]
    stream = zstandard.ZstdDecompressor().decompressobj()
    decoded = stream.decompress(data)
    if not stream.eof:
        raise AssertionError("the zstd frame does not end")
    return decoded


def streamDecoder(coding: bytes) -> Callable[[bytes], bytes]:
    """A decoder of C{coding} fed part by part, as a client's: each call returns what that part decodes to."""
    if coding == b"gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if coding == b"br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    return zstandard.ZstdDecompressor().decompressobj().decompress


def field(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of C{name} among C{headers}, case-insensitively."""
    return [value for key, value in headers if key.lower() == name.lower()]


def textHead(length: int | None = len(TEXT), contentType: bytes = b"text/html; charset=utf-8") -> list:
    """The fields of an upstream's text response (with C{Content-Length} unless C{length} is C{None})."""
    fields = [(b"Content-Type", contentType)]
    if length is not None:
        fields.append((b"Content-Length", b"%d" % length))
    return fields


def context(acceptEncoding: bytes) -> RequestContext:
    """What a filter sees of a GET with C{Accept-Encoding: acceptEncoding}."""
    request = inboundRequest(headers=[(b"accept-encoding", acceptEncoding)])
    return RequestContext(request, OutboundRequest(request.method, request.target), None)


class NegotiationTests(unittest.TestCase):
    """C{Accept-Encoding} read as RFC 9110 section 12.5.3 says."""

    def test_qvalues(self) -> None:
        """Codings with their qvalues (1 when absent), lower case, whitespace and empty elements ignored."""
        self.assertEqual(
            acceptedCodings([b"GZIP;q=0.5 , br ;Q=0.8,, zstd;q=1.000", b"identity; q=0"]),
            {b"gzip": 0.5, b"br": 0.8, b"zstd": 1.0, b"identity": 0.0},
        )

    def test_badQvalues(self) -> None:
        """An element whose qvalue is not one (over 1, four decimals, not a number) is left out."""
        self.assertEqual(acceptedCodings([b"gzip;q=2, br;q=0.1234, zstd;q=x, deflate;q=0.5"]), {b"deflate": 0.5})

    def test_repeatedAndAlias(self) -> None:
        """A coding listed twice keeps its lowest qvalue (a refusal stands); x-gzip is gzip."""
        self.assertEqual(acceptedCodings([b"gzip, gzip;q=0"]), {b"gzip": 0.0})
        self.assertEqual(acceptedCodings([b"x-gzip;q=0.3"]), {b"gzip": 0.3})

    def test_otherParameters(self) -> None:
        """Parameters other than q are ignored."""
        self.assertEqual(acceptedCodings([b"gzip;level=9;q=0.7"]), {b"gzip": 0.7})

    def test_bomb(self) -> None:
        """
        A field of more than 64 elements and parameters in all (30000 commas, a coding with 10000
        parameters) is ignored whole: counted, not parsed; up to that it is read.
        """
        for values in ([b"," * 30000 + b"gzip"], [b"gzip" + b";a" * 10000], [b"br, gzip"] * 33):
            self.assertEqual(acceptedCodings(values), {})
        self.assertEqual(acceptedCodings([b"x, " * 62 + b"gzip;q=0.5"]), {b"x": 1.0, b"gzip": 0.5})

    def test_preferred(self) -> None:
        """The highest qvalue wins; ties go to the order offered; q=0 refuses; * stands for codings not named."""
        offered = [b"zstd", b"br", b"gzip"]
        for accept, expected in [
            (b"gzip", b"gzip"),
            (b"gzip, br", b"br"),
            (b"gzip, deflate, br, zstd", b"zstd"),
            (b"gzip;q=1, br;q=0.9", b"gzip"),
            (b"gzip;q=0.2, br;q=0.8, zstd;q=0.5", b"br"),
            (b"*", b"zstd"),
            (b"*;q=0.5, gzip", b"gzip"),
            (b"*, zstd;q=0", b"br"),
            (b"gzip;q=0", None),
            (b"*;q=0", None),
            (b"deflate", None),
            (b"", None),
            (b"identity;q=0", None),
            (b"identity, gzip;q=0.5", None),
            (b"identity;q=0.5, gzip", b"gzip"),
            (b"identity;q=0.5, gzip;q=0.5", b"gzip"),
        ]:
            self.assertEqual(preferredCoding(acceptedCodings([accept]), offered), expected, accept)

    def test_mediaRanges(self) -> None:
        """Exact types, whole types, structured-syntax suffixes and */*, parameters and case ignored."""
        ranges = MediaRanges(["text/*", "application/json", "application/*+xml"])
        for yes in (b"text/html", b"TEXT/Plain; charset=utf-8", b"application/json", b"application/atom+xml"):
            self.assertIn(yes, ranges)
        for no in (b"application/jsonx", b"image/png", b"application/xml", b"textual", b"", b"application/x+json"):
            self.assertNotIn(no, ranges)
        self.assertIn(b"image/png", MediaRanges(["*/*"]))
        for bad in ("json", "*/json", "text/", "text/html extra", "*/*+json"):
            self.assertRaises(ValueError, MediaRanges, [bad])


class CompressTests(unittest.TestCase):
    """
    Through L{runFilters}: what the client gets.

    @ivar started: how many compressors L{_Counting} made.
    """

    started = 0

    def respond(
        self,
        accept: bytes | None = b"gzip",
        *,
        filter: Compress | None = None,
        method: bytes = b"GET",
        status: int = 200,
        headers: Sequence[tuple[bytes, bytes]] | None = None,
        body: bytes | Sequence[bytes] = TEXT,
        request: Sequence[tuple[bytes, bytes]] = (),
    ) -> FilterResult:
        """What the client gets when the upstream answers a request accepting C{accept} (none: no field)."""
        fields = list(request) + ([] if accept is None else [(b"accept-encoding", accept)])
        return self.successResultOf(
            runFilters(
                [filter or Compress()],
                inboundRequest(headers=fields, method=method),
                status=status,
                headers=textHead() if headers is None else headers,
                body=body,
            )
        )

    def assertUntouched(
        self, result: FilterResult, headers: Sequence[tuple[bytes, bytes]], body: bytes, why: object = None
    ) -> None:
        """The client gets C{headers} and C{body}, as the upstream sent them (or as Vary added)."""
        self.assertEqual((result.headers, result.body), (list(headers), body), why)

    def test_eachCoding(self) -> None:
        """Each coding the client asks for gives a body that decodes to the upstream's, much smaller."""
        for coding in CODINGS:
            result = self.respond(coding)
            self.assertEqual(field(result.headers, b"content-encoding"), [coding])
            self.assertEqual(decode(coding, result.body), TEXT)
            self.assertLess(len(result.body), len(TEXT) / 3)

    def test_parts(self) -> None:
        """A body in many parts (one byte, empty, large) decodes whole, with every coding."""
        cuts = [0, 1, 1, 2, 100, 5000, 5001, 20000, len(TEXT)]
        parts = [TEXT[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        self.assertIn(b"", parts)
        for coding in CODINGS:
            self.assertEqual(decode(coding, self.respond(coding, headers=textHead(None), body=parts).body), TEXT)

    def test_eachPartFlushed(self) -> None:
        """What each part gives decodes at once to that part: a client sees a stream as it comes."""
        parts = [b"data: %d %s\n\n" % (i, TEXT[i * 50 : i * 50 + 30]) for i in range(20)]
        for coding in CODINGS:
            transform = Compress().onResponse(context(coding), 200, textHead(None, b"text/event-stream"))
            assert transform is not None
            decoder = streamDecoder(coding)
            for part in parts:
                self.assertEqual(decoder(transform.transform(part)), part)
            self.assertEqual(decoder(transform.finish()), b"")

    def test_head(self) -> None:
        """
        Compressing changes the head: Content-Encoding set, Content-Length, Accept-Ranges and the digests
        of the old bytes removed, a strong ETag made weak, Vary added; other fields kept in order.
        """
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(TEXT)),
            (b"ETag", b'"v1"'),
            (b"Accept-Ranges", b"bytes"),
            (b"Content-MD5", b"Q2hlY2sgSW50ZWdyaXR5IQ=="),
            (b"Content-Digest", b"sha-256=:abc=:"),
            (b"Repr-Digest", b"sha-256=:abc=:"),
            (b"X-Custom", b"kept"),
            (b"Content-Encoding", b"identity"),
        ]
        result = self.respond(b"br", headers=headers)
        self.assertEqual(
            result.headers,
            [
                (b"Content-Type", b"application/json"),
                (b"ETag", b'W/"v1"'),
                (b"X-Custom", b"kept"),
                (b"Vary", b"Accept-Encoding"),
                (b"Content-Encoding", b"br"),
            ],
        )

    def test_weakETagKept(self) -> None:
        """A weak ETag stays as it is."""
        result = self.respond(headers=[*textHead(), (b"etag", b'W/"v1"')])
        self.assertEqual(field(result.headers, b"etag"), [b'W/"v1"'])

    def test_varyAppended(self) -> None:
        """Accept-Encoding is added to the last Vary field, once; Vary: * and a listed one stay as they are."""
        for vary, expected in [
            ([b"Origin"], [b"Origin, Accept-Encoding"]),
            ([b"Origin", b"Cookie"], [b"Origin", b"Cookie, Accept-Encoding"]),
            ([b"origin, accept-encoding"], [b"origin, accept-encoding"]),
            ([b"ACCEPT-ENCODING"], [b"ACCEPT-ENCODING"]),
            ([b"*"], [b"*"]),
            ([b""], [b"Accept-Encoding"]),
        ]:
            result = self.respond(headers=[*textHead(), *((b"Vary", value) for value in vary)])
            self.assertEqual(field(result.headers, b"vary"), expected)
            self.assertEqual(decode(b"gzip", result.body), TEXT)

    def test_varyWhenNotAccepted(self) -> None:
        """
        A response that would be compressed for another client gets Vary even when this one accepts no coding
        (no Accept-Encoding, an unknown one, or a refusal), and is otherwise left as it is.
        """
        for accept in (None, b"", b"deflate", b"gzip;q=0", b"identity"):
            result = self.respond(accept, headers=[*textHead(), (b"ETag", b'"v1"')])
            self.assertUntouched(result, [*textHead(), (b"ETag", b'"v1"'), (b"Vary", b"Accept-Encoding")], TEXT)

    def test_encodingsOrder(self) -> None:
        """Ties go to the order of the C{encodings} option; a coding not listed there is never used."""
        gzipFirst = compress.build({"encodings": ["gzip", "br"]}, _environment())
        result = self.respond(b"br, gzip, zstd", filter=gzipFirst)
        self.assertEqual(field(result.headers, b"content-encoding"), [b"gzip"])
        result = self.respond(b"zstd", filter=gzipFirst)
        self.assertUntouched(result, [*textHead(), (b"Vary", b"Accept-Encoding")], TEXT)

    def test_levels(self) -> None:
        """The level options reach the compressors (gzip's header tells its level; brotli's size shows)."""
        fast = self.respond(filter=compress.build({"gzip-level": 1}, _environment()))
        best = self.respond(filter=compress.build({"gzip-level": 9}, _environment()))
        self.assertEqual((fast.body[8], best.body[8]), (4, 2))  # XFL: fastest, maximum compression
        low = self.respond(b"br", filter=compress.build({"br-quality": 0}, _environment()))
        high = self.respond(b"br", filter=compress.build({"br-quality": 9}, _environment()))
        self.assertLess(len(high.body), len(low.body))
        self.assertEqual(decode(b"br", low.body), decode(b"br", high.body))
        low = self.respond(b"zstd", filter=compress.build({"zstd-level": 1}, _environment()))
        high = self.respond(b"zstd", filter=compress.build({"zstd-level": 19}, _environment()))
        self.assertLess(len(high.body), len(low.body))

    def test_types(self) -> None:
        """The default types cover text, JSON, XML, JavaScript, SVG, WebAssembly; not images, video, archives."""
        for contentType in (
            b"text/html",
            b"text/css",
            b"text/event-stream",
            b"application/json",
            b"application/problem+json",
            b"application/javascript",
            b"application/xml",
            b"application/atom+xml",
            b"image/svg+xml",
            b"application/wasm",
        ):
            result = self.respond(headers=textHead(contentType=contentType))
            self.assertEqual(field(result.headers, b"content-encoding"), [b"gzip"], contentType)
        for contentType in (b"image/png", b"video/mp4", b"application/zip", b"application/octet-stream"):
            self.assertUntouched(
                self.respond(headers=textHead(contentType=contentType)), textHead(contentType=contentType), TEXT
            )
        own = compress.build({"types": ["application/octet-stream"]}, _environment())
        result = self.respond(filter=own, headers=textHead(contentType=b"application/octet-stream"))
        self.assertEqual(decode(b"gzip", result.body), TEXT)

    def test_never(self) -> None:
        """
        Never compressed, and left as they are: a range response (206, or a Content-Range), no-transform
        (response or request), a body the upstream encoded, no or another media type, a known length under
        min-size, an empty body, statuses other than 2xx with content.
        """
        text = textHead()
        cases = [
            ("206", {"status": 206, "headers": [*text, (b"Content-Range", b"bytes 0-99/5000")]}),
            ("Content-Range on a 200", {"headers": [*text, (b"Content-Range", b"bytes 0-99/5000")]}),
            ("no-transform", {"headers": [*text, (b"Cache-Control", b"public, No-Transform")]}),
            ("request no-transform", {"request": [(b"cache-control", b"no-transform")]}),
            ("encoded", {"headers": [*text, (b"Content-Encoding", b"br")], "body": b"\x0b\x02\x80"}),
            ("encoded twice", {"headers": [*text, (b"Content-Encoding", b"identity, gzip")]}),
            ("no type", {"headers": [(b"Content-Length", b"%d" % len(TEXT))]}),
            ("a picture", {"headers": textHead(contentType=b"image/jpeg")}),
            ("under min-size", {"headers": textHead(1023), "body": TEXT[:1023]}),
            ("empty", {"headers": textHead(0), "body": b""}),
            ("404", {"status": 404}),
            ("500", {"status": 500}),
            ("204", {"status": 204, "headers": [(b"Content-Type", b"text/plain")], "body": b""}),
            ("205", {"status": 205, "headers": [(b"Content-Type", b"text/plain")], "body": b""}),
            ("302", {"status": 302}),
        ]
        for why, case in cases:
            headers = case.get("headers", text)
            body = case.get("body", TEXT)
            result = self.respond(b"gzip, br, zstd", **case)  # type: ignore[arg-type]
            self.assertUntouched(result, headers, body, why)  # type: ignore[arg-type]
            self.assertEqual(field(result.headers, b"vary"), [], why)

    def test_minSize(self) -> None:
        """At min-size a body is compressed; an unknown length (chunked) is; min-size 0 still spares empty ones."""
        self.assertEqual(decode(b"gzip", self.respond(headers=textHead(1024), body=TEXT[:1024]).body), TEXT[:1024])
        self.assertEqual(decode(b"gzip", self.respond(headers=textHead(None), body=b"tiny").body), b"tiny")
        zero = compress.build({"min-size": 0}, _environment())
        self.assertEqual(decode(b"gzip", self.respond(filter=zero, headers=textHead(4), body=b"tiny").body), b"tiny")
        self.assertUntouched(self.respond(filter=zero, headers=textHead(0), body=b""), textHead(0), b"")
        big = compress.build({"min-size": "64k"}, _environment())
        self.assertUntouched(self.respond(filter=big), textHead(), TEXT)

    def test_emptyChunkedBody(self) -> None:
        """A body of unknown length that turns out empty stays empty (no compressor is made for it)."""
        result = self.respond(headers=textHead(None), body=[b"", b""])
        self.assertEqual((field(result.headers, b"content-encoding"), result.body), ([b"gzip"], b""))

    def test_notModified(self) -> None:
        """A 304 is not compressed, but its ETag and Vary say what the 200's would (a cache must match them)."""
        fields = [(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=60")]
        result = self.respond(status=304, headers=fields, body=b"")
        self.assertUntouched(result, [(b"ETag", b'W/"v1"'), fields[1], (b"Vary", b"Accept-Encoding")], b"")
        result = self.respond(b"deflate", status=304, headers=fields, body=b"")
        self.assertUntouched(result, [*fields, (b"Vary", b"Accept-Encoding")], b"")
        picture = [(b"Content-Type", b"image/png"), *fields]
        self.assertUntouched(self.respond(status=304, headers=picture, body=b""), picture, b"")

    def test_headRequest(self) -> None:
        """
        A HEAD's head says what a GET's would (Content-Encoding, no Content-Length, weak ETag, Vary); no body
        comes, and none is made up (an empty body stays empty).
        """
        headers = [*textHead(), (b"ETag", b'"v1"')]
        get = self.respond(b"zstd", headers=headers)
        head = self.respond(b"zstd", method=b"HEAD", headers=headers, body=b"")
        self.assertEqual((head.headers, head.body), (get.headers, b""))

    def test_headLocalAnswer(self) -> None:
        """
        A later filter's answer to a HEAD is compressed like a GET's, so that the Content-Length the exchange
        sets from it is the GET's (the exchange sends no body to a HEAD).
        """
        answer = LocalResponse(200, [(b"Content-Type", b"text/plain")], TEXT)
        request = inboundRequest(method=b"HEAD", headers=[(b"accept-encoding", b"gzip")])
        result = self.successResultOf(runFilters([Compress(), _Answering(answer)], request))
        self.assertEqual(decode(b"gzip", result.body), TEXT)

    def test_otherSuccesses(self) -> None:
        """201, 202 and 203 carry a representation too: compressed."""
        for status in (201, 202, 203):
            self.assertEqual(decode(b"gzip", self.respond(status=status).body), TEXT)

    def test_localAnswer(self) -> None:
        """A later filter's own answer is compressed whole (the exchange sets its Content-Length after)."""
        answer = LocalResponse(200, [(b"Content-Type", b"application/json")], TEXT, "mocked")
        result = self.successResultOf(
            runFilters([Compress(), _Answering(answer)], inboundRequest(headers=[(b"accept-encoding", b"br")]))
        )
        self.assertEqual(field(result.headers, b"content-encoding"), [b"br"])
        self.assertEqual(decode(b"br", result.body), TEXT)

    def test_errorsUntouched(self) -> None:
        """A later filter's refusal (a ProxyError, whose body is the proxy's own) gets no field from it."""
        refusal = clientError(403, "no")
        result = self.successResultOf(
            runFilters([Compress(), _Answering(refusal)], inboundRequest(headers=[(b"accept-encoding", b"gzip")]))
        )
        self.assertEqual((result.status, result.headers), (403, []))

    def test_transformReleases(self) -> None:
        """After finish, the compressor is gone (its memory with it); finish again gives nothing."""
        transform = CompressedBody(lambda: _Counting(self))
        self.assertEqual(transform.transform(b""), b"")
        self.assertEqual(self.started, 0)
        self.assertEqual(transform.transform(b"ab") + transform.transform(b"c"), b"abc")
        self.assertEqual((self.started, transform.finish(), transform.finish()), (1, b"<end>", b""))


class _Counting:
    """A compressor that copies, and counts how many were made."""

    def __init__(self, test: CompressTests) -> None:
        test.started += 1

    def compress(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        return b"<end>"


@implementer(IRequestFilter)
class _Answering:
    """A request filter that answers every request itself."""

    consumes = ()

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def onRequest(self, context: RequestContext) -> object:
        return self.answer


def _environment() -> FilterEnvironment:
    return FilterEnvironment(task.Clock())


class OptionTests(unittest.TestCase):
    """The factory's contract and its options' errors."""

    def test_contract(self) -> None:
        """verifyFilterFactory passes with no option and with every option."""
        verifyFilterFactory(compress, {})
        built = verifyFilterFactory(
            compress,
            {
                "encodings": ["br", "gzip"],
                "min-size": "2k",
                "types": ["text/*"],
                "gzip-level": 9,
                "br-quality": 5,
                "zstd-level": 10,
            },
        )
        assert isinstance(built, Compress)
        self.assertEqual([(c.name, level) for c, level in built.codings], [("br", 5), ("gzip", 9)])
        self.assertEqual(built.minSize, 2048)

    def test_defaults(self) -> None:
        """zstd, br, gzip at levels 3, 4 and 6; min-size 1024."""
        built = compress.build({}, _environment())
        assert isinstance(built, Compress)
        self.assertEqual([(c.name, level) for c, level in built.codings], [("zstd", 3), ("br", 4), ("gzip", 6)])
        self.assertEqual(built.minSize, 1024)

    def test_badOptions(self) -> None:
        """Each bad value is a ValueError naming its option."""
        for options, named in [
            ({"encodings": ["deflate"]}, "encodings"),
            ({"encodings": ["gzip", "GZIP"]}, "encodings"),
            ({"encodings": []}, "encodings"),
            ({"encodings": 3}, "encodings"),
            ({"gzip-level": 0}, "gzip-level"),
            ({"gzip-level": 10}, "gzip-level"),
            ({"gzip-level": "fast"}, "gzip-level"),
            ({"br-quality": 12}, "br-quality"),
            ({"br-quality": -1}, "br-quality"),
            ({"zstd-level": 20}, "zstd-level"),
            ({"zstd-level": 0}, "zstd-level"),
            ({"min-size": "big"}, "min-size"),
            ({"min-size": -1}, "min-size"),
            ({"types": ["json"]}, "types"),
            ({"types": "text/html, */json"}, "types"),
        ]:
            with self.assertRaises(ValueError, msg=options) as raised:
                compress.build(options, _environment())
            self.assertIn(f"option {named}:", str(raised.exception))

    def test_unusedLevelChecked(self) -> None:
        """A level of a coding left out of encodings is still checked (and is no unknown option)."""
        compress.build({"encodings": ["gzip"], "br-quality": 5}, _environment())
        self.assertRaises(ValueError, compress.build, {"encodings": ["gzip"], "br-quality": 50}, _environment())


# -- over real sockets


def textUpstream(testCase: unittest.TestCase) -> ScriptedUpstream:
    """An upstream answering C{/text} with L{TEXT} (Content-Length), C{/empty} with an empty chunked body."""

    def respond(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
        target = request.requestLine.split(b" ")[1]
        if target == b"/empty":
            return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        head = b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nETag: "t1"\r\n\r\n' % len(TEXT)
        return head + (b"" if request.requestLine.startswith(b"HEAD ") else TEXT)

    return ScriptedUpstream(testCase, respond)


def splitCurl(out: bytes) -> tuple[bytes, bytes, int]:
    """(the last head, the body, the bytes downloaded) of C{curl -D - -w '\\n%{size_download}'}'s output."""
    rest, _, size = out.rpartition(b"\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    return head, body, int(size)


class ProxyTests(unittest.TestCase):
    """A real proxy compressing for real clients."""

    timeout = 30

    def setUp(self) -> None:
        self.upstream = textUpstream(self)
        self.proxy = startProxy(self, [self.upstream.url])
        useFilters(self.proxy, compress.build({}, _environment()))

    async def test_curl(self) -> None:
        """curl --compressed decodes each coding, over HTTP/1.1 (chunked) and HTTP/2."""
        for version in ("--http1.1", "--http2-prior-knowledge"):
            for coding in CODINGS:
                code, out, err = await curl(
                    ["-s", version, "--compressed", "-H", "Accept-Encoding: " + coding.decode()]
                    + ["-D", "-", "-w", "\n%{size_download}", self.proxy.url + "/text"]
                )
                self.assertEqual(code, 0, err)
                head, body, downloaded = splitCurl(out)
                self.assertEqual(body, TEXT, (version, coding))
                self.assertLess(downloaded, len(TEXT) / 3)
                self.assertEqual(headerValues(head, b"content-encoding"), [coding])
                self.assertEqual(headerValues(head, b"content-length"), [])
                self.assertEqual(headerValues(head, b"etag"), [b'W/"t1"'])
                self.assertEqual(headerValues(head, b"vary"), [b"Accept-Encoding"])
                if version == "--http1.1":
                    self.assertEqual(headerValues(head, b"transfer-encoding"), [b"chunked"])

    async def test_httpx(self) -> None:
        """httpx (its own Accept-Encoding: gzip, deflate, br, zstd) gets zstd; asked for one coding, that one."""

        def fetch(accept: str | None) -> tuple[str, bytes, int]:
            with httpx.Client() as client:
                headers = {} if accept is None else {"Accept-Encoding": accept}
                response = client.get(self.proxy.url + "/text", headers=headers)
                return response.headers["content-encoding"], response.content, response.num_bytes_downloaded

        for accept, expected in ((None, "zstd"), ("br", "br"), ("gzip;q=0.5, br;q=0.4", "gzip")):
            coding, body, downloaded = await threads.deferToThread(fetch, accept)
            self.assertEqual((coding, body), (expected, TEXT))
            self.assertLess(downloaded, len(TEXT) / 3)

    async def test_http10(self) -> None:
        """An HTTP/1.0 client gets the compressed body delimited by the connection's close."""
        data = await rawRequest(self.proxy.port, b"GET /text HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertEqual(responseStatus(head), 200)
        self.assertEqual(headerValues(head, b"content-length") + headerValues(head, b"transfer-encoding"), [])
        self.assertEqual(decode(b"gzip", body), TEXT)

    async def test_headThenGet(self) -> None:
        """A HEAD's response has the GET's head and no body: the GET after it on the connection reads right."""
        request = b"%s /text HTTP/1.1\r\nHost: x\r\nAccept-Encoding: br\r\n%s\r\n"
        data = await rawRequest(
            self.proxy.port, request % (b"HEAD", b"") + request % (b"GET", b"Connection: close\r\n")
        )
        head, _, rest = data.partition(b"\r\n\r\n")
        self.assertEqual(headerValues(head, b"content-encoding"), [b"br"])
        self.assertEqual(headerValues(head, b"content-length") + headerValues(head, b"transfer-encoding"), [])
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 "), rest[:100])
        second, _, body = rest.partition(b"\r\n\r\n")
        self.assertEqual(headerValues(second, b"etag"), headerValues(head, b"etag"))
        self.assertEqual(decode(b"br", dechunk(body)), TEXT)

    async def test_headCurl(self) -> None:
        """curl -I gets the GET's head, without a body, on HTTP/1.1 and HTTP/2."""
        for version in ("--http1.1", "--http2-prior-knowledge"):
            code, out, err = await curl(["-sI", version, "-H", "Accept-Encoding: br", self.proxy.url + "/text"])
            self.assertEqual(code, 0, err)
            self.assertEqual(headerValues(out, b"content-encoding"), [b"br"])
            self.assertEqual(headerValues(out, b"etag"), [b'W/"t1"'])
            self.assertEqual(headerValues(out, b"content-length"), [])

    async def test_emptyBody(self) -> None:
        """An empty chunked body stays empty; curl accepts it."""
        for version in ("--http1.1", "--http2-prior-knowledge"):
            code, out, err = await curl(
                ["-s", version, "--compressed", "-D", "-", "-w", "\n%{size_download}", self.proxy.url + "/empty"]
            )
            self.assertEqual(code, 0, err)
            head, body, downloaded = splitCurl(out)
            self.assertEqual((body, downloaded), (b"", 0))
            self.assertEqual(headerValues(head, b"content-encoding"), [b"zstd"])


def dechunk(data: bytes) -> bytes:
    """A whole chunked body's payload."""
    payload = b""
    for _ in range(len(data)):  # every chunk takes at least 5 bytes: bounded by the input
        size, _, data = data.partition(b"\r\n")
        length = int(size.split(b";")[0], 16)
        if length == 0:
            return payload
        payload, data = payload + data[:length], data[length + 2 :]
    raise AssertionError("the chunked body does not end")


class _Output(protocol.ProcessProtocol):
    """A client process whose standard output is kept (or only counted and hashed, for large bodies)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.out = b""
        self.size = 0
        self.digest = hashlib.sha256()
        self.err = b""
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.keep:
            self.out += data
        else:
            self.digest.update(data)

    def errReceived(self, data: bytes) -> None:
        self.err += data[:10000]

    def processEnded(self, reason: object) -> None:
        self.ended = True


def spawnCurl(testCase: unittest.TestCase, arguments: list[str], keep: bool = True) -> _Output:
    """Start curl with C{arguments}; it is killed if the test ends first."""
    output = _Output(keep)
    transport = reactor.spawnProcess(
        output, "curl", ["curl", "--max-time", "30", *arguments], env=os.environ, childFDs={0: "w", 1: "r", 2: "r"}
    )

    async def kill() -> None:
        if not output.ended:
            transport.signalProcess("KILL")
            await waitFor(lambda: output.ended, 5)

    testCase.addCleanup(kill)
    return output


class StreamingTests(unittest.TestCase):
    """Compression does not hold a stream back, nor hold a large body in memory."""

    timeout = 60

    async def test_partsFlow(self) -> None:
        """
        An upstream sends an event, then waits: curl has decoded it (each coding, HTTP/1.1 and HTTP/2) before
        the upstream sends the next and ends.
        """
        events = [b"data: %d %s\n\n" % (i, TEXT[: 40 + i]) for i in range(3)]
        streams: list[_ScriptedProtocol] = []

        def respond(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
            streams.append(proto)
            return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url])
        useFilters(proxy, compress.build({}, _environment()))
        for version in ("--http1.1", "--http2-prior-knowledge"):
            for coding in CODINGS:
                del streams[:]
                await self.stream(proxy.url, version, coding, streams, events)

    async def stream(
        self, url: str, version: str, coding: bytes, streams: list[_ScriptedProtocol], events: list[bytes]
    ) -> None:
        """curl asks C{url} for C{coding} with C{version}; the upstream sends C{events} as it decodes them."""
        accept = "Accept-Encoding: " + coding.decode()
        client = spawnCurl(
            self, ["-s", "-N", version, "--compressed", "-H", accept, "-w", "%header{content-encoding}", url]
        )
        self.assertTrue(await waitFor(lambda: streams, 10), "the request did not reach the upstream")
        for i, event in enumerate(events):
            streams[0].transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            expected = b"".join(events[: i + 1])
            arrived = await waitFor(lambda: client.out == expected, 5)  # noqa: B023 (awaited in this turn)
            self.assertTrue(arrived, (version, coding, client.out, client.err))
        streams[0].transport.write(b"0\r\n\r\n")
        self.assertTrue(await waitFor(lambda: client.ended, 5))
        self.assertEqual(client.out, b"".join(events) + coding)  # it was compressed: curl decoded it

    async def test_largeBodyBoundedMemory(self) -> None:
        """
        100 MiB of text (Content-Length) through the proxy to curl --compressed (gzip): every byte decodes
        right, and the process (proxy, upstream, reactor) grows by less than 30 MiB meanwhile.
        """
        size = 100 * MiB
        words = random.Random(1)
        block = " ".join(words.choice(_WORDS) + str(words.randrange(1000)) for _ in range(12000)).encode()[: 64 * 1024]
        upstreams: list[_LargeText] = []

        def respond(proto: _ScriptedProtocol, request: ReceivedRequest) -> bytes:
            large = _LargeText(proto.transport, block, size)
            upstreams.append(large)
            large.start()
            return b""

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url])
        useFilters(proxy, compress.build({"encodings": ["gzip"]}, _environment()))
        expected = hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)

        baseline = rssBytes()
        peak = [baseline]
        sampler = task.LoopingCall(lambda: peak.append(max(peak[-1], rssBytes())))
        sampler.start(0.02)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        started = time.monotonic()
        client = spawnCurl(
            self, ["-s", "--compressed", "-w", "", "-H", "Accept-Encoding: gzip", proxy.url + "/large"], keep=False
        )
        self.assertTrue(await waitFor(lambda: client.ended, 50), f"the transfer did not end: {client.size} bytes")
        elapsed = time.monotonic() - started
        sampler.stop()
        grown = peak[-1] - baseline
        print(f"\n  100 MiB gzip through the proxy in {elapsed:.1f}s; RSS grew {grown / MiB:.1f} MiB")
        self.assertLess(grown, 30 * MiB)
        self.assertEqual(client.err, b"")
        self.assertEqual(client.size, size)
        self.assertEqual(client.digest.hexdigest(), expected.hexdigest())


def rssBytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@implementer(IPushProducer)
class _LargeText:
    """Writes a C{size}-byte text response as fast as its connection takes it (a push producer)."""

    paused = False

    def __init__(self, transport: object, block: bytes, size: int) -> None:
        self.transport = transport
        self.block = block
        self.left = size

    def start(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % self.left
        )
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:  # at most size / len(block) writes
            self.left -= len(self.block)
            self.transport.write(self.block)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.left = 0
