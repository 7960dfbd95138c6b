"""
Tests for L{rproxy.filters.cors}: its options, origins and patterns, preflights and actual responses through
L{runFilters}; a real rproxy in front of a real upstream with curl as the client; and Debian's headless
Chromium loading a page of one origin that fetches through rproxy on another, allowed and refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from rproxy.errors import ProxyError, clientError
from rproxy.filters.cors import CORSFilter, Origin
from rproxy.interfaces import FilterEnvironment, IRequestFilter, IResponseFilter
from rproxy.plugins.filters import cors
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext
from rproxy.test.support import (
    ScriptedUpstream,
    curl,
    dumpDOM,
    freePort,
    startProxy,
    startUpstream,
    useFilters,
)
from rproxy.testing import FilterResult, inboundRequest, runFilters, verifyFilterFactory

APP = "https://app.example.com"
Fields = list[tuple[bytes, bytes]]


def build(**options: object) -> CORSFilter:
    """A cors filter from options given as Python keywords (C{max_age} for C{max-age})."""
    built = cors.build({name.replace("_", "-"): value for name, value in options.items()}, FilterEnvironment(Clock()))
    assert isinstance(built, CORSFilter)
    return built


def preflight(
    origin: bytes = APP.encode(), method: bytes = b"PUT", headers: bytes | None = None, extra: Fields | None = None
) -> Fields:
    """The fields of a browser's preflight."""
    fields = [(b"origin", origin), (b"access-control-request-method", method), *(extra or [])]
    if headers is not None:
        fields.append((b"access-control-request-headers", headers))
    return fields


def headersOf(fields: Fields) -> Headers:
    """The fields as a request's C{Headers}."""
    return inboundRequest(headers=fields).headers


def values(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of field C{name} (case-insensitive)."""
    return [value for key, value in fields if key.lower() == name.lower()]


def corsFields(fields: Iterable[tuple[bytes, bytes]]) -> Fields:
    """The ``Access-Control-*`` fields, names lower-cased."""
    return [(key.lower(), value) for key, value in fields if key.lower().startswith(b"access-control-")]


class FilterRun(unittest.TestCase):
    """Runs filters with L{runFilters} and returns the result at once (no filter here waits)."""

    def run_(
        self,
        filters: list[object],
        fields: Fields,
        method: bytes = b"GET",
        headers: Iterable[tuple[bytes, bytes]] = (),
        status: int = 200,
    ) -> FilterResult:
        request = inboundRequest(b"/api", headers=fields, method=method)
        return self.successResultOf(runFilters(filters, request, status=status, headers=headers))


class OptionTests(unittest.TestCase):
    """What a C{[filters.X]} table of C{type = "cors"} may say; every bad value names its option."""

    def assertRefused(self, option: str, options: Mapping[str, object]) -> str:
        with self.assertRaises(ValueError) as raised:
            cors.build(options, FilterEnvironment(Clock()))
        message = str(raised.exception)
        self.assertIn(f"option {option}", message)
        return message

    def test_contract(self) -> None:
        """The factory meets the IFilterFactory contract; the filter is both a request and a response filter."""
        built = verifyFilterFactory(cors, {"origins": [APP]})
        self.assertTrue(IRequestFilter.providedBy(built) and IResponseFilter.providedBy(built))
        self.assertEqual(cors.name, "cors")

    def test_defaults(self) -> None:
        """Methods GET, HEAD, POST; no extra request fields; no credentials; ten minutes of preflight cache."""
        built = build(origins=[APP])
        self.assertEqual(built.methods, (b"GET", b"HEAD", b"POST"))
        self.assertEqual(built.headers, frozenset())
        self.assertFalse(built.credentials)
        fields = built.preflight(headersOf(preflight(method=b"POST")))
        assert isinstance(fields, LocalResponse)
        self.assertEqual(values(fields.headers, b"access-control-max-age"), [b"600"])

    def test_originsNormalized(self) -> None:
        """Origins are compared as browsers write them: lower case, without the scheme's default port."""
        built = build(origins=["HTTPS://App.Example.COM:443", "http://localhost:8080", "http://[::1]:80"])
        self.assertEqual(built.origins, {b"https://app.example.com", b"http://localhost:8080", b"http://[::1]"})

    def test_commaSeparated(self) -> None:
        """A single string may list several origins, as a command-line option would."""
        self.assertEqual(build(origins=f"{APP}, https://b.example").origins, {APP.encode(), b"https://b.example"})

    def test_notOrigins(self) -> None:
        """A path, a final slash, a user, no scheme, an empty host or a bad port is not an origin."""
        for bad in [
            "https://app.example.com/",
            "https://app.example.com/api",
            "https://user@app.example.com",
            "app.example.com",
            "https://",
            "https://a.example:port",
            "https://a.example:",
            "https://a..example",
            "https://a.example?x",
            "1http://a.example",
        ]:
            message = self.assertRefused("origins", {"origins": [bad]})
            self.assertIn(repr(bad), message)

    def test_nullOrigin(self) -> None:
        """C{null}, the origin of every sandboxed page and local file, is refused."""
        self.assertIn("sandboxed", self.assertRefused("origins", {"origins": ["null"]}))

    def test_internationalName(self) -> None:
        """An international domain name must be given as browsers send it, in its xn-- form."""
        self.assertIn("xn--", self.assertRefused("origins", {"origins": ["https://bücher.example"]}))
        self.assertEqual(build(origins=["https://xn--bcher-kva.example"]).origins, {b"https://xn--bcher-kva.example"})

    def test_noOrigins(self) -> None:
        """A policy allowing no origin is a mistake."""
        self.assertRefused("origins", {})
        self.assertRefused("origins", {"methods": ["GET"]})

    def test_anyOriginAlone(self) -> None:
        """C{"*"} comes alone: with other origins or patterns it is a mistake."""
        self.assertRefused("origins", {"origins": ["*", APP]})
        self.assertRefused("origins", {"origins": ["*"], "origin-patterns": ["https://*.example.com"]})

    def test_anyOriginWithCredentials(self) -> None:
        """Every site reading with the user's cookies is refused: credentials need listed origins."""
        self.assertIn("credentials", self.assertRefused("origins", {"origins": "*", "credentials": True}))

    def test_wildcardsWithCredentials(self) -> None:
        """With credentials, browsers take C{*} literally in the method and field lists: refused."""
        for option in ("methods", "headers", "expose-headers"):
            self.assertRefused(option, {"origins": [APP], "credentials": True, option: ["*"]})
            build(origins=[APP], **{option.replace("-", "_"): ["*"]})

    def test_notTokens(self) -> None:
        """Methods and field names are tokens."""
        for option in ("methods", "headers", "expose-headers"):
            for bad in ["X Custom", "X:Y", "", "é"]:
                self.assertRefused(option, {"origins": [APP], option: [bad]})

    def test_patterns(self) -> None:
        """A pattern is an origin whose host starts with C{*.}, followed by a domain."""
        for bad in [
            "https://example.com",
            "https://*example.com",
            "https://a.*.example.com",
            "https://*.*.example.com",
            "https://*.com",
            "https://*.[::1]",
            "https://*.example.com/",
            "*.example.com",
            "https://*.(a|b).com",
            "https://*.example.com.*",
        ]:
            message = self.assertRefused("origin-patterns", {"origin-patterns": [bad]})
            self.assertIn(repr(bad), message)

    def test_maxAge(self) -> None:
        """C{max-age} is a duration, sent in whole seconds; a negative or non-duration one is refused."""
        built = build(origins=[APP], max_age="2h")
        answer = built.preflight(headersOf(preflight(method=b"GET")))
        assert isinstance(answer, LocalResponse)
        self.assertEqual(values(answer.headers, b"access-control-max-age"), [b"7200"])
        self.assertRefused("max-age", {"origins": [APP], "max-age": -1})
        self.assertRefused("max-age", {"origins": [APP], "max-age": "soon"})

    def test_flags(self) -> None:
        """C{credentials} and C{allow-private-network} are booleans."""
        self.assertRefused("credentials", {"origins": [APP], "credentials": "yes"})
        self.assertRefused("allow-private-network", {"origins": [APP], "allow-private-network": 1})

    def test_unknownOption(self) -> None:
        """A misspelt option is an error, not a silent default."""
        with self.assertRaises(ValueError) as raised:
            cors.build({"origins": [APP], "origin": APP}, FilterEnvironment(Clock()))
        self.assertIn("'origin'", str(raised.exception))


class OriginTests(unittest.TestCase):
    """Origins parsed as browsers serialize them, and patterns matched without regular expressions."""

    def test_parse(self) -> None:
        self.assertEqual(Origin.parse(b"https://a.example:8443"), Origin(b"https", b"a.example", b"8443"))
        self.assertEqual(Origin.parse(b"http://[::1]:8080"), Origin(b"http", b"[::1]", b"8080"))
        self.assertEqual(Origin.parse(b"http://127.0.0.1"), Origin(b"http", b"127.0.0.1", b""))
        for bad in [b"null", b"https://A.example", b"https://a.example/", b"https://[::1", b"https://[]", b"x://"]:
            self.assertIsNone(Origin.parse(bad), bad)

    def test_serialize(self) -> None:
        for text in [b"https://a.example:8443", b"http://[::1]", b"http://127.0.0.1"]:
            origin = Origin.parse(text)
            assert origin is not None
            self.assertEqual(origin.serialize(), text)

    def test_patternMatches(self) -> None:
        """C{https://*.example.com} matches subdomains of example.com on https and the default port only."""
        built = build(origin_patterns=["https://*.example.com"])
        allowed = [b"https://a.example.com", b"https://x.a.example.com", b"https://a-b.example.com"]
        refused = [
            b"https://example.com",
            b"https://evil-example.com",
            b"https://a.example.com.evil.net",
            b"https://aexample.com",
            b"http://a.example.com",
            b"https://a.example.com:8443",
            b"https://.example.com",
            b"https://a..example.com",
            b"https://A.example.com",
            b"https://a.example.com/",
            b"https://a.example.com.",
            b"null",
        ]
        for origin in allowed:
            self.assertEqual(built.allowedOrigin(headersOf([(b"origin", origin)])), origin)
        for origin in refused:
            self.assertIsNone(built.allowedOrigin(headersOf([(b"origin", origin)])), origin)

    def test_patternPort(self) -> None:
        """A pattern with a port matches that port only."""
        built = build(origin_patterns=["http://*.dev.example:8080"])
        self.assertIsNotNone(built.allowedOrigin(headersOf([(b"origin", b"http://a.dev.example:8080")])))
        self.assertIsNone(built.allowedOrigin(headersOf([(b"origin", b"http://a.dev.example")])))

    def test_patternIsNotARegularExpression(self) -> None:
        """Dots in a pattern are dots: C{https://*.a.example} does not match C{https://x.aXexample}."""
        built = build(origin_patterns=["https://*.a.example"])
        self.assertIsNone(built.allowedOrigin(headersOf([(b"origin", b"https://x.aXexample")])))
        self.assertIsNone(built.allowedOrigin(headersOf([(b"origin", b"https://x.a-example")])))

    def test_severalOrigins(self) -> None:
        """A request with two ``Origin`` fields is allowed nothing."""
        built = build(origins=[APP])
        self.assertIsNone(built.allowedOrigin(headersOf([(b"origin", APP.encode())] * 2)))


@implementer(IRequestFilter)
class Refusing:
    """A filter after cors that refuses every request, as an authenticating one would."""

    consumes = ()

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        return clientError(401, "no credentials", headers=[(b"WWW-Authenticate", b'Basic realm="x"')])


class PreflightTests(FilterRun):
    """Preflights are answered by the filter: 204 with the policy, or 403 without any CORS field."""

    def assertRefusedPreflight(self, result: FilterResult, because: str) -> None:
        verdict = result.verdict
        assert isinstance(verdict, ProxyError), verdict
        self.assertEqual(result.status, 403)
        self.assertIn(because, verdict.reason)
        self.assertEqual(corsFields(result.headers), [])
        self.assertEqual(result.forwarded, [])

    def test_allowed(self) -> None:
        """An allowed preflight gets 204 with the origin, the methods, the fields and the cache time."""
        policy = build(origins=[APP], methods=["GET", "PUT"], headers=["X-Request-Id", "Content-Type"], max_age=60)
        result = self.run_([policy], preflight(headers=b"content-type, x-request-id"), b"OPTIONS")
        self.assertIsInstance(result.verdict, LocalResponse)
        self.assertEqual(result.status, 204)
        self.assertEqual(result.forwarded, [])
        self.assertEqual(
            corsFields(result.headers),
            [
                (b"access-control-allow-origin", APP.encode()),
                (b"access-control-allow-methods", b"GET, PUT"),
                (b"access-control-allow-headers", b"X-Request-Id, Content-Type"),
                (b"access-control-max-age", b"60"),
            ],
        )
        self.assertEqual(values(result.headers, b"vary"), [b"Origin"])
        self.assertEqual(result.body, b"")

    def test_refusedOrigin(self) -> None:
        """An origin not listed gets 403 and no CORS field: the browser fails the request."""
        result = self.run_([build(origins=[APP])], preflight(origin=b"https://evil.example"), b"OPTIONS")
        self.assertRefusedPreflight(result, "origin 'https://evil.example'")

    def test_refusedMethod(self) -> None:
        """A method not listed (methods are case-sensitive, as browsers send them) is refused."""
        policy = build(origins=[APP], methods=["GET", "PUT"])
        self.assertRefusedPreflight(self.run_([policy], preflight(method=b"DELETE"), b"OPTIONS"), "method 'DELETE'")
        self.assertRefusedPreflight(self.run_([policy], preflight(method=b"put"), b"OPTIONS"), "method 'put'")
        self.assertRefusedPreflight(self.run_([policy], preflight(method=b"P T"), b"OPTIONS"), "method")

    def test_refusedHeader(self) -> None:
        """A request field not listed is refused, even when the others are."""
        policy = build(origins=[APP], headers=["X-A"])
        result = self.run_([policy], preflight(method=b"POST", headers=b"x-a, x-b"), b"OPTIONS")
        self.assertRefusedPreflight(result, "request header 'x-b'")
        result = self.run_([policy], preflight(method=b"POST", headers=b"x-a, x(b"), b"OPTIONS")
        self.assertRefusedPreflight(result, "request header 'x(b'")

    def test_headerNamesCaseInsensitive(self) -> None:
        """Field names compare without case; empty list elements are tolerated."""
        policy = build(origins=[APP], methods=["PUT"], headers=["x-token"])
        result = self.run_([policy], preflight(headers=b"X-Token,,"), b"OPTIONS")
        self.assertEqual(result.status, 204)

    def test_credentials(self) -> None:
        """With credentials the origin itself is answered (never C{*}) with Allow-Credentials."""
        policy = build(origin_patterns=["https://*.example.com"], credentials=True, methods=["PUT"])
        result = self.run_([policy], preflight(), b"OPTIONS")
        self.assertEqual(values(result.headers, b"access-control-allow-origin"), [APP.encode()])
        self.assertEqual(values(result.headers, b"access-control-allow-credentials"), [b"true"])

    def test_anyOrigin(self) -> None:
        """C{origins = "*"} answers C{*} (without credentials), and the answer does not vary by Origin."""
        policy = build(origins="*", methods="*", headers="*")
        result = self.run_([policy], preflight(origin=b"https://anyone.example", headers=b"x-a"), b"OPTIONS")
        self.assertEqual(result.status, 204)
        self.assertEqual(values(result.headers, b"access-control-allow-origin"), [b"*"])
        self.assertEqual(values(result.headers, b"access-control-allow-methods"), [b"*"])
        self.assertEqual(values(result.headers, b"access-control-allow-headers"), [b"*"])
        self.assertEqual(values(result.headers, b"access-control-allow-credentials"), [])
        self.assertEqual(values(result.headers, b"vary"), [])

    def test_wildcardLeavesOutAuthorization(self) -> None:
        """C{headers = "*"} does not cover ``Authorization`` (as in the Fetch standard) unless it is listed."""
        result = self.run_(
            [build(origins="*", headers="*")], preflight(method=b"GET", headers=b"authorization"), b"OPTIONS"
        )
        self.assertRefusedPreflight(result, "'authorization'")
        policy = build(origins="*", headers=["*", "Authorization"])
        result = self.run_([policy], preflight(method=b"GET", headers=b"authorization, x-a"), b"OPTIONS")
        self.assertEqual(values(result.headers, b"access-control-allow-headers"), [b"*, Authorization"])

    def test_privateNetwork(self) -> None:
        """Chrome's private network preflight is allowed only with C{allow-private-network}."""
        asks = preflight(method=b"GET", extra=[(b"access-control-request-private-network", b"true")])
        result = self.run_([build(origins=[APP])], asks, b"OPTIONS")
        self.assertRefusedPreflight(result, "private network")
        result = self.run_([build(origins=[APP], allow_private_network=True)], asks, b"OPTIONS")
        self.assertEqual(result.status, 204)
        self.assertEqual(values(result.headers, b"access-control-allow-private-network"), [b"true"])
        result = self.run_([build(origins=[APP], allow_private_network=True)], preflight(method=b"GET"), b"OPTIONS")
        self.assertEqual(values(result.headers, b"access-control-allow-private-network"), [])

    def test_notPreflight(self) -> None:
        """An ``OPTIONS`` without ``Access-Control-Request-Method`` (or without ``Origin``) is forwarded."""
        policy = build(origins=[APP])
        for fields in [[(b"origin", APP.encode())], [(b"access-control-request-method", b"PUT")], []]:
            result = self.run_([policy], fields, b"OPTIONS", headers=[(b"Allow", b"GET, OPTIONS")])
            self.assertIsNone(result.verdict)
            self.assertEqual(values(result.forwarded, b"origin"), values(fields, b"origin"))
            self.assertEqual(values(result.headers, b"allow"), [b"GET, OPTIONS"])

    def test_otherMethodsNotPreflights(self) -> None:
        """A PUT carrying the preflight fields is an actual request: forwarded."""
        result = self.run_([build(origins=[APP])], preflight(), b"PUT")
        self.assertIsNone(result.verdict)

    def test_refusingFilterAfter(self) -> None:
        """A filter after cors (authentication) never sees a preflight: the filter answers first."""
        result = self.run_([build(origins=[APP], methods=["PUT"]), Refusing()], preflight(), b"OPTIONS")
        self.assertEqual(result.status, 204)


class ActualResponseTests(FilterRun):
    """The CORS fields of every other response are the policy's, for the request's origin."""

    upstream: Fields = [
        (b"Content-Type", b"application/json"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"access-control-allow-credentials", b"true"),
        (b"Access-Control-Expose-Headers", b"X-Secret"),
    ]

    def test_allowed(self) -> None:
        """An allowed origin gets Allow-Origin, Expose-Headers; the upstream's own CORS fields are replaced."""
        policy = build(origins=[APP], expose_headers=["X-Request-Id", "ETag"])
        result = self.run_([policy], [(b"origin", APP.encode())], headers=self.upstream)
        self.assertEqual(
            corsFields(result.headers),
            [
                (b"access-control-allow-origin", APP.encode()),
                (b"access-control-expose-headers", b"X-Request-Id, ETag"),
            ],
        )
        self.assertEqual(values(result.headers, b"content-type"), [b"application/json"])
        self.assertEqual(values(result.headers, b"vary"), [b"Origin"])
        self.assertEqual(values(result.forwarded, b"origin"), [APP.encode()])

    def test_credentials(self) -> None:
        """With credentials: the origin itself and Allow-Credentials."""
        result = self.run_([build(origins=[APP], credentials=True)], [(b"origin", APP.encode())])
        self.assertEqual(
            corsFields(result.headers),
            [(b"access-control-allow-origin", APP.encode()), (b"access-control-allow-credentials", b"true")],
        )

    def test_refused(self) -> None:
        """Another origin gets no CORS field at all, the upstream's included; Vary still says Origin."""
        policy = build(origins=[APP], credentials=True)
        result = self.run_([policy], [(b"origin", b"https://evil.example")], headers=self.upstream)
        self.assertEqual(corsFields(result.headers), [])
        self.assertEqual(values(result.headers, b"vary"), [b"Origin"])

    def test_noOrigin(self) -> None:
        """A same-origin or non-browser request (no Origin) gets no CORS field, and Vary: Origin."""
        result = self.run_([build(origins=[APP])], [], headers=self.upstream)
        self.assertEqual(corsFields(result.headers), [])
        self.assertEqual(values(result.headers, b"vary"), [b"Origin"])

    def test_anyOrigin(self) -> None:
        """
        C{origins = "*"}: C{*} for anyone, and no Vary (the answer is the same for every origin), so also
        without C{Origin} or with two: else a cache could give a page the copy without the field.
        """
        origins: list[Fields] = [[(b"origin", b"https://a.example")], [], [(b"origin", b"a"), (b"origin", b"b")]]
        for fields in origins:
            result = self.run_([build(origins="*")], fields, headers=self.upstream)
            self.assertEqual(corsFields(result.headers), [(b"access-control-allow-origin", b"*")])
            self.assertEqual(values(result.headers, b"vary"), [])

    def test_varyAppended(self) -> None:
        """Origin is added to the upstream's last ``Vary`` field, keeping its name's case."""
        upstream = [(b"Vary", b"Accept"), (b"vary", b"Accept-Encoding")]
        result = self.run_([build(origins=[APP])], [(b"origin", APP.encode())], headers=upstream)
        self.assertEqual(
            [(key, value) for key, value in result.headers if key.lower() == b"vary"],
            [(b"Vary", b"Accept"), (b"vary", b"Accept-Encoding, Origin")],
        )

    def test_varyNotDuplicated(self) -> None:
        """A ``Vary`` that names Origin already (any case), or C{*}, is left as it is."""
        for upstream in [[(b"Vary", b"Accept, origin")], [(b"Vary", b"*")], [(b"Vary", b"Origin"), (b"Vary", b"X")]]:
            result = self.run_([build(origins=[APP])], [(b"origin", APP.encode())], headers=upstream)
            self.assertEqual(values(result.headers, b"vary"), values(upstream, b"vary"))

    def test_varyEmpty(self) -> None:
        """An empty ``Vary`` becomes ``Vary: Origin``."""
        result = self.run_([build(origins=[APP])], [], headers=[(b"Vary", b"")])
        self.assertEqual(values(result.headers, b"vary"), [b"Origin"])

    def test_errorOfLaterFilter(self) -> None:
        """A 401 of a filter after cors carries the CORS fields, so that the page can read it."""
        policy = build(origins=[APP], credentials=True)
        result = self.run_([policy, Refusing()], [(b"origin", APP.encode())])
        self.assertEqual(result.status, 401)
        self.assertEqual(
            corsFields(result.headers),
            [(b"access-control-allow-origin", APP.encode()), (b"access-control-allow-credentials", b"true")],
        )
        self.assertEqual(values(result.headers, b"www-authenticate"), [b'Basic realm="x"'])
        self.assertEqual(values(result.headers, b"vary"), [b"Origin"])

    def test_errorOfFilterBefore(self) -> None:
        """A refusal of a filter before cors does not: cors belongs first in a chain (docs/filters/cors.md)."""
        result = self.run_([Refusing(), build(origins=[APP])], [(b"origin", APP.encode())])
        self.assertEqual(corsFields(result.headers), [])

    def test_localAnswerOfLaterFilter(self) -> None:
        """A filter's own answer after cors gets the fields, its CORS fields replaced."""

        @implementer(IRequestFilter)
        class Answering:
            consumes = ()

            def onRequest(self, context: RequestContext) -> FilterVerdict:
                return LocalResponse(200, [(b"Access-Control-Allow-Origin", b"*")], b"local")

        result = self.run_([build(origins=[APP]), Answering()], [(b"origin", APP.encode())])
        self.assertEqual(result.body, b"local")
        self.assertEqual(corsFields(result.headers), [(b"access-control-allow-origin", APP.encode())])


OK_WITH_CORS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: *\r\n"
    b"Access-Control-Allow-Methods: DELETE\r\nVary: Accept-Encoding\r\n\r\nok"
)


def curlHead(output: bytes) -> tuple[int, Fields]:
    """The status and fields of the (last) response head curl printed with C{-i}."""
    head = output.split(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    fields = [line.split(b":", 1) for line in lines[1:]]
    return int(lines[0].split(b" ")[1]), [(name, value.strip()) for name, value in fields]


class SocketTests(unittest.TestCase):
    """A real rproxy with the filter, in front of a raw upstream, curl as the client."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, lambda proto, request: OK_WITH_CORS)
        self.proxy = startProxy(self, [self.upstream.url])
        useFilters(self.proxy, build(origins=[APP], methods=["GET", "PUT"], headers=["X-Token"], credentials=True))

    async def test_preflight(self) -> None:
        """A preflight is answered with 204 and the policy's fields; the upstream never sees it."""
        code, out, err = await curl(
            ["-si", "-X", "OPTIONS", self.proxy.url + "/api/items", "-H", f"Origin: {APP}"]
            + ["-H", "Access-Control-Request-Method: PUT", "-H", "Access-Control-Request-Headers: x-token"]
        )
        self.assertEqual(code, 0, err)
        status, fields = curlHead(out)
        self.assertEqual(status, 204)
        self.assertEqual(
            corsFields(fields),
            [
                (b"access-control-allow-origin", APP.encode()),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-allow-methods", b"GET, PUT"),
                (b"access-control-allow-headers", b"X-Token"),
                (b"access-control-max-age", b"600"),
            ],
        )
        self.assertEqual(values(fields, b"vary"), [b"Origin"])
        self.assertEqual(values(fields, b"content-length"), [])
        self.assertEqual(self.upstream.requests, [])

    async def test_refusedPreflight(self) -> None:
        """A refused preflight gets 403, with its reason and no CORS field; the upstream never sees it."""
        code, out, err = await curl(
            ["-si", "-X", "OPTIONS", self.proxy.url + "/api", "-H", "Origin: https://evil.example"]
            + ["-H", "Access-Control-Request-Method: PUT"]
        )
        self.assertEqual(code, 0, err)
        status, fields = curlHead(out)
        self.assertEqual(status, 403)
        self.assertEqual(corsFields(fields), [])
        self.assertIn(b"origin 'https://evil.example' is not allowed", out)
        self.assertEqual(self.upstream.requests, [])

    async def test_actualRequest(self) -> None:
        """An actual request is forwarded (Origin too); the upstream's CORS fields are replaced."""
        code, out, err = await curl(["-si", self.proxy.url + "/api", "-H", f"Origin: {APP}", "-X", "PUT"])
        self.assertEqual(code, 0, err)
        status, fields = curlHead(out)
        self.assertEqual(status, 200)
        self.assertEqual(
            corsFields(fields),
            [(b"access-control-allow-origin", APP.encode()), (b"access-control-allow-credentials", b"true")],
        )
        self.assertEqual(values(fields, b"vary"), [b"Accept-Encoding, Origin"])
        [request] = self.upstream.requests
        self.assertEqual(request.requestLine, b"PUT /api HTTP/1.1")
        self.assertEqual(request.headers(b"origin"), [APP.encode()])

    async def test_optionsForwarded(self) -> None:
        """An ``OPTIONS`` that is not a preflight reaches the upstream."""
        code, out, err = await curl(["-si", "-X", "OPTIONS", self.proxy.url + "/api", "-H", f"Origin: {APP}"])
        self.assertEqual(code, 0, err)
        self.assertEqual(curlHead(out)[0], 200)
        self.assertEqual([request.requestLine for request in self.upstream.requests], [b"OPTIONS /api HTTP/1.1"])

    async def test_commandLine(self) -> None:
        """C{--cors-origin} puts the filter, with its defaults, in the default chain."""
        proxy = startProxy(self, [self.upstream.url], "--cors-origin", APP, "--cors-origin", "https://b.example")
        code, out, err = await curl(
            ["-si", "-X", "OPTIONS", proxy.url + "/", "-H", "Origin: https://b.example"]
            + ["-H", "Access-Control-Request-Method: POST"]
        )
        self.assertEqual(code, 0, err)
        status, fields = curlHead(out)
        self.assertEqual(status, 204)
        self.assertEqual(values(fields, b"access-control-allow-origin"), [b"https://b.example"])
        self.assertEqual(values(fields, b"access-control-allow-methods"), [b"GET, HEAD, POST"])
        self.assertEqual(self.upstream.requests, [])

    async def test_proxyError(self) -> None:
        """The proxy's own error (an upstream that is down) carries the fields, so that a page can read it."""
        proxy = startProxy(self, [f"http://127.0.0.1:{freePort()}"])
        useFilters(proxy, build(origins=[APP]))
        code, out, err = await curl(["-si", proxy.url + "/api", "-H", f"Origin: {APP}"])
        self.assertEqual(code, 0, err)
        status, fields = curlHead(out)
        self.assertEqual(status, 502)
        self.assertEqual(corsFields(fields), [(b"access-control-allow-origin", APP.encode())])


#: The page: it fetches through rproxy with credentials and a custom field (so the browser preflights), and
#: writes what came back, or the error, where --dump-dom shows it.
PAGE = """<!doctype html>
<html><body><pre id="out">pending</pre><script>
fetch("%(url)s", {credentials: "include", headers: {"X-Token": "t"}})
  .then(response => response.text().then(text => "status " + response.status + ": " + text))
  .catch(error => "error " + error.name + ": " + error.message)
  .then(shown => { document.getElementById("out").textContent = shown; });
</script></body></html>
"""


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.page = (PAGE % {"url": url}).encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.page


class _Upstream(resource.Resource):
    """An upstream that allows anyone itself (``Access-Control-Allow-Origin: *``, which browsers refuse
    with credentials): the page reads its body only if the proxy replaced that."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.methods: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.methods.append(request.method)
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from upstream"


@implementer(IRequestFilter, IResponseFilter)
class _Seen:
    """A filter before cors that notes each request's method and the status its client got."""

    consumes = ()

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, int]] = []

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        return None

    def onResponse(self, context: RequestContext, status: int, headers: Fields) -> None:
        self.seen.append((context.inbound.method, status))


class CORSBrowserTests(unittest.TestCase):
    """
    A page on http://localhost:A fetches http://127.0.0.1:B (rproxy with the filter, in front of a twisted.web
    upstream) with credentials and a custom field, in Debian's headless Chromium.
    """

    timeout = 60

    async def browse(self, origins: list[str] | None = None) -> tuple[str, _Upstream, _Seen]:
        """
        Load the page with a policy allowing C{origins} (the page's when C{None}) with credentials and the
        page's field; return the DOM, the upstream and what rproxy answered.
        """
        upstream = _Upstream()
        proxy = startProxy(self, [startUpstream(self, server.Site(upstream)).url])
        page = startUpstream(self, server.Site(_Page(proxy.url + "/data")))
        origin = f"http://localhost:{page.port}"
        seen = _Seen()
        useFilters(proxy, seen, build(origins=origins or [origin], headers="X-Token", credentials=True))
        dom = await dumpDOM(self, origin + "/")
        return dom, upstream, seen

    async def test_allowed(self) -> None:
        """
        The page's origin is allowed: the browser's preflight is answered by rproxy (the upstream never gets
        it), and the page reads the upstream's body.
        """
        dom, upstream, seen = await self.browse()
        self.assertIn("status 200: hello from upstream", dom)
        self.assertEqual(seen.seen, [(b"OPTIONS", 204), (b"GET", 200)])
        self.assertEqual(upstream.methods, [b"GET"])

    async def test_refused(self) -> None:
        """
        Only another origin is allowed: the preflight is refused, and the page gets the fetch's TypeError;
        the request never reaches the upstream.
        """
        dom, upstream, seen = await self.browse(["http://allowed.example"])
        self.assertIn("error TypeError: Failed to fetch", dom)
        self.assertEqual(seen.seen, [(b"OPTIONS", 403)])
        self.assertEqual(upstream.methods, [])
