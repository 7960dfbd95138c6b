"""
Tests for L{rproxy.filters.headers}: its options and the refusals of bad ones, the rules on requests and
responses through L{runFilters} (on errors and filters' answers too), and a real rproxy in front of a raw
upstream, with real clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.errors import clientError
from rproxy.filters.headers import HeaderRulesFilter
from rproxy.interfaces import FilterEnvironment, IRequestFilter, IResponseFilter
from rproxy.plugins.filters import headerRules
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext
from rproxy.test.support import ScriptedUpstream, curl, freePort, rawRequest, startProxy, useFilters
from rproxy.testing import FilterResult, inboundRequest, runFilters, verifyFilterFactory

Fields = list[tuple[bytes, bytes]]

#: Every field a rule may not name, as a user would write it.
MANAGED = [
    "Connection",
    "Transfer-Encoding",
    "Content-Length",
    "Host",
    "TE",
    "Upgrade",
    "Keep-Alive",
    "Proxy-Connection",
    "Trailer",
]
OPTIONS = ["request-set", "request-add", "request-remove", "response-set", "response-add", "response-remove"]


def build(options: Mapping[str, object]) -> HeaderRulesFilter:
    built = headerRules.build(options, FilterEnvironment(Clock()))
    assert isinstance(built, HeaderRulesFilter)
    return built


def values(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of field C{name} (case-insensitive), in order."""
    return [value for key, value in fields if key.lower() == name.lower()]


@implementer(IRequestFilter)
class Refusing:
    """A filter after the rules that refuses every request, as an authenticating one would."""

    consumes = ()

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        return clientError(401, "no credentials", headers=[(b"WWW-Authenticate", b"Bearer"), (b"X-Debug", b"1")])


@implementer(IRequestFilter)
class Answering:
    """A filter after the rules that answers every request itself."""

    consumes = ()

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        return LocalResponse(200, [(b"X-Debug", b"1")], b"local")


class OptionTests(unittest.TestCase):
    """What a C{[filters.X]} table of C{type = "headers"} may say; every bad value names its option."""

    def assertRefused(self, option: str, options: Mapping[str, object], said: str = "") -> None:
        with self.assertRaises(ValueError) as raised:
            build(options)
        self.assertIn(f"option {option}:", str(raised.exception))
        self.assertIn(said, str(raised.exception))

    def test_contract(self) -> None:
        """The factory meets the IFilterFactory contract; the filter is a request and a response filter."""
        built = verifyFilterFactory(headerRules, {"response-set": {"X-Frame-Options": "DENY"}})
        self.assertTrue(IRequestFilter.providedBy(built) and IResponseFilter.providedBy(built))
        self.assertEqual(headerRules.name, "headers")

    def test_noRules(self) -> None:
        """A table without a rule is a mistake."""
        with self.assertRaises(ValueError) as raised:
            build({})
        self.assertIn("no rule", str(raised.exception))
        with self.assertRaises(ValueError):
            build({"request-set": {}, "response-remove": []})

    def test_managedFields(self) -> None:
        """Hop-by-hop and framing fields, and Host, are refused in every option, whatever their case."""
        for option in OPTIONS:
            for name in MANAGED:
                for spelt in (name, name.lower(), name.upper()):
                    rule: object = [spelt] if option.endswith("remove") else {spelt: "x"}
                    self.assertRefused(option, {option: rule}, "set-host" if name == "Host" else spelt)

    def test_notFieldNames(self) -> None:
        """A name that is not a token (a space, a colon, an empty one, non-ASCII) is refused."""
        for option in OPTIONS:
            for name in ["X Custom", "X:Y", "", "Ünïcode", ":authority", "X\r\nInjected"]:
                rule: object = [name] if option.endswith("remove") else {name: "x"}
                self.assertRefused(option, {option: rule}, "not a field name")

    def test_badValues(self) -> None:
        """A value holding CR, LF or NUL (header injection), or not a string, is refused."""
        for option in ("request-set", "request-add", "response-set", "response-add"):
            for value in ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"]:
                self.assertRefused(option, {option: {"X-A": value}}, "CR, LF or NUL")
            for bad in [3, True, None, {"x": "y"}]:
                self.assertRefused(option, {option: {"X-A": bad}}, "expected a string value")
        self.assertRefused("response-add", {"response-add": {"X-A": ["ok", 1]}}, "expected a string value")
        self.assertRefused("request-add", {"request-add": {"X-A": ["ok", "b\r\n"]}}, "CR, LF or NUL")

    def test_notTables(self) -> None:
        """C{*-set} and C{*-add} are tables; C{*-remove} a list of names."""
        self.assertRefused("request-set", {"request-set": ["X-A"]}, "expected a table")
        self.assertRefused("response-add", {"response-add": "X-A"}, "expected a table")
        self.assertRefused("response-remove", {"response-remove": {"X-A": "x"}}, "expected a list")

    def test_setTwice(self) -> None:
        """A table setting the same field in two spellings is refused (names are case-insensitive)."""
        self.assertRefused("response-set", {"response-set": {"X-A": "1", "x-a": "2"}}, "set twice")

    def test_unknownOption(self) -> None:
        """A misspelt option is an error."""
        with self.assertRaises(ValueError) as raised:
            build({"response-set": {"X-A": "1"}, "responses-set": {"X-A": "1"}})
        self.assertIn("'responses-set'", str(raised.exception))


class RuleTests(unittest.TestCase):
    """The rules as the upstream and the client see them."""

    def run_(
        self, filters: list[object], fields: Iterable[tuple[bytes, bytes]] = (), upstream: Fields | None = None
    ) -> FilterResult:
        request = inboundRequest(b"/", headers=fields)
        return self.successResultOf(runFilters(filters, request, headers=upstream or []))

    def test_request(self) -> None:
        """Remove, then set (replacing every field of the name), then add; names without case."""
        rules = build(
            {
                "request-remove": ["x-secret", "X-Forwarded-For"],
                "request-set": {"X-Env": "prod", "x-tenant": "t1"},
                "request-add": {"X-Tag": ["a", "b"], "X-Env": "extra"},
            }
        )
        fields = [(b"X-Secret", b"s"), (b"X-Tenant", b"forged"), (b"X-Tenant", b"again"), (b"X-Kept", b"k")]
        result = self.run_([rules], fields)
        forwarded = result.forwarded
        self.assertEqual(values(forwarded, b"x-secret"), [])
        self.assertEqual(values(forwarded, b"x-forwarded-for"), [])
        self.assertEqual(values(forwarded, b"x-tenant"), [b"t1"])
        self.assertEqual(values(forwarded, b"x-env"), [b"prod", b"extra"])
        self.assertEqual(values(forwarded, b"x-tag"), [b"a", b"b"])
        self.assertEqual(values(forwarded, b"x-kept"), [b"k"])
        self.assertEqual(values(result.headers, b"x-env"), [])  # request rules only

    def test_removeThenSet(self) -> None:
        """A field both removed and set is set: the order is remove, set, add whatever the table's."""
        rules = build({"request-set": {"X-A": "new"}, "request-remove": ["X-A"]})
        self.assertEqual(values(self.run_([rules], [(b"x-a", b"old")]).forwarded, b"x-a"), [b"new"])

    def test_response(self) -> None:
        """Response rules keep the names' case as written, and remove without case."""
        rules = build(
            {
                "response-remove": ["server", "X-Powered-By"],
                "response-set": {"X-Frame-Options": "DENY", "cache-control": "no-cache"},
                "response-add": {"Link": ["</a>; rel=preload", "</b>; rel=preload"]},
            }
        )
        upstream = [
            (b"Server", b"upstream/1.0"),
            (b"x-powered-by", b"php"),
            (b"Cache-Control", b"max-age=60"),
            (b"Link", b"</c>; rel=preload"),
            (b"Content-Type", b"text/html"),
        ]
        result = self.run_([rules], upstream=upstream)
        self.assertEqual(
            result.headers,
            [
                (b"Link", b"</c>; rel=preload"),
                (b"Content-Type", b"text/html"),
                (b"X-Frame-Options", b"DENY"),
                (b"cache-control", b"no-cache"),
                (b"Link", b"</a>; rel=preload"),
                (b"Link", b"</b>; rel=preload"),
            ],
        )
        self.assertEqual(values(result.forwarded, b"x-frame-options"), [])  # response rules only

    def test_utf8Value(self) -> None:
        """A value beyond ASCII is sent as UTF-8."""
        result = self.run_([build({"response-set": {"X-Name": "café"}})])
        self.assertEqual(values(result.headers, b"x-name"), ["café".encode()])

    def test_errorOfLaterFilter(self) -> None:
        """A refusal of a filter after the rules gets the response rules."""
        rules = build({"response-set": {"X-Frame-Options": "DENY"}, "response-remove": ["X-Debug"]})
        result = self.run_([rules, Refusing()])
        self.assertEqual(result.status, 401)
        self.assertEqual(result.headers, [(b"WWW-Authenticate", b"Bearer"), (b"X-Frame-Options", b"DENY")])

    def test_answerOfLaterFilter(self) -> None:
        """A filter's own answer after the rules gets them."""
        rules = build({"response-add": {"X-Frame-Options": "DENY"}, "response-remove": ["x-debug"]})
        result = self.run_([rules, Answering()])
        self.assertEqual((result.status, result.body), (200, b"local"))
        self.assertEqual(result.headers, [(b"Content-Length", b"5"), (b"X-Frame-Options", b"DENY")])

    def test_noRulesOnSide(self) -> None:
        """A side without rules leaves its fields as they are."""
        rules = build({"request-set": {"X-A": "1"}})
        result = self.run_([rules], upstream=[(b"X-A", b"upstream")])
        self.assertEqual(result.headers, [(b"X-A", b"upstream")])


class SocketTests(unittest.TestCase):
    """A real rproxy with header rules, in front of a raw upstream."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(
            self,
            lambda proto, request: (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: upstream\r\nX-Powered-By: php\r\n\r\nok"
            ),
        )
        self.rules = build(
            {
                "request-set": {"X-Env": "prod"},
                "request-add": {"X-Tag": ["a", "b"]},
                "request-remove": ["Cookie"],
                "response-set": {"x-FRAME-options": "DENY"},
                "response-add": {"Strict-Transport-Security": "max-age=63072000"},
                "response-remove": ["Server", "x-powered-by"],
            }
        )

    async def test_bothWays(self) -> None:
        """The upstream gets the request rules' fields; the client the response rules', names as written."""
        proxy = startProxy(self, [self.upstream.url])
        useFilters(proxy, self.rules)
        request = b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nX-Env: dev\r\nConnection: close\r\n\r\n"
        response = await rawRequest(proxy.port, request)
        head = response.split(b"\r\n\r\n")[0]
        self.assertIn(b"\r\nx-FRAME-options: DENY\r\n", head)
        self.assertIn(b"\r\nStrict-Transport-Security: max-age=63072000\r\n", head)
        self.assertNotIn(b"upstream", head)
        self.assertNotIn(b"php", head)
        [received] = self.upstream.requests
        self.assertEqual(received.headers(b"x-env"), [b"prod"])
        self.assertEqual(received.headers(b"x-tag"), [b"a", b"b"])
        self.assertEqual(received.headers(b"cookie"), [])

    async def test_proxyError(self) -> None:
        """
        The proxy's own error (an upstream that is down) gets the response rules (its fields are written
        through Twisted's C{Headers}, in their canonical case).
        """
        proxy = startProxy(self, [f"http://127.0.0.1:{freePort()}"])
        useFilters(proxy, self.rules)
        code, out, err = await curl(["-si", proxy.url + "/x"])
        self.assertEqual(code, 0, err)
        head = out.split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertIn(b"\r\nX-Frame-Options: DENY\r\n", head)
        self.assertIn(b"\r\nStrict-Transport-Security: max-age=63072000", head)
