"""
Tests for L{rproxy.proxy.directors}: matching, ordering, rewrites and splits without sockets, then routes
through a real proxy to real upstreams.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
from collections import Counter
from collections.abc import Iterable

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.site import ProxySite
from rproxy.errors import ProxyError
from rproxy.interfaces import IDirector
from rproxy.proxy.balancers import RoundRobin
from rproxy.proxy.directors import (
    BlueGreen,
    ISplit,
    Route,
    RoutingDirector,
    ServiceVersion,
    SingleServiceDirector,
    WeightedSplit,
    normalisedPath,
)
from rproxy.proxy.exchange import Proxy
from rproxy.proxy.message import InboundRequest, OutboundRequest
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.resource import buildResource
from rproxy.proxy.service import Service
from rproxy.test.support import ScriptedUpstream, rawRequest, splitResponses
from rproxy.testing import countServices, directRequest, inboundRequest, makeService
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import Upstream

#: Targets a proxy must pass on byte for byte: encoded slashes, empty segments, dot segments, parameters.
AWKWARD = b"/a%2Fb//c/../d;p=1/%2e%2E/x?q=%2F&r=a+b;s"


def request(
    target: bytes = b"/",
    host: bytes | None = b"example.com",
    headers: Iterable[tuple[bytes, bytes]] = (),
    clientHost: str | None = "192.0.2.1",
) -> InboundRequest:
    fields = [(b"host", host)] if host is not None else []
    return inboundRequest(target, clientHost, [*fields, *headers])


def route(
    director: IDirector,
    target: bytes = b"/",
    host: bytes | None = b"example.com",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> tuple[Service | None, OutboundRequest]:
    """The service a director chooses for one request, and the outbound request as it left it."""
    return directRequest(director, request(target, host, headers))


class Services:
    """Named fake services, made on first use."""

    def __init__(self) -> None:
        self._made: dict[str, Service] = {}

    def __getattr__(self, name: str) -> Service:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._made:
            self._made[name] = makeService(name)
        return self._made[name]


class HostTests(unittest.TestCase):
    """Host patterns: exact and C{*.} wildcards, case-insensitive, ports and a trailing dot ignored."""

    def setUp(self) -> None:
        s = self.s = Services()
        self.director = RoutingDirector(
            [
                Route(s.shop, hosts=["Shop.Example.com"]),
                Route(s.wild, hosts="*.example.com"),
                Route(s.v6, hosts=["[::1]"]),
                Route(s.idn, hosts=["bücher.example"]),
                Route(s.other, pathPrefix="/other"),
            ]
        )

    def served(self, host: bytes | None, target: bytes = b"/") -> Service | None:
        return route(self.director, target, host)[0]

    def test_exact(self) -> None:
        s = self.s
        for host in (b"shop.example.com", b"SHOP.example.COM", b"shop.example.com:8443", b"shop.example.com."):
            self.assertIs(self.served(host), s.shop, host)
        self.assertIs(self.served(b"[::1]:8080"), s.v6)
        self.assertIs(self.served(b"xn--bcher-kva.example"), s.idn)

    def test_wildcard(self) -> None:
        s = self.s
        for host in (b"a.example.com", b"A.B.Example.Com:80", b"x-1.example.com.", b"cdn.example.com:8080"):
            self.assertIs(self.served(host), s.wild, host)

    def test_wildcardLeavesTheDomainAndLookalikes(self) -> None:
        for host in (b"example.com", b"badexample.com", b"example.com.evil", b"other.org"):
            self.assertIsNone(self.served(host), host)

    def test_noHost(self) -> None:
        """A request without Host (HTTP/1.0) matches only routes without hosts."""
        self.assertIsNone(self.served(None))
        self.assertIs(self.served(None, b"/other"), self.s.other)
        self.assertIs(self.served(b"unknown.org", b"/other"), self.s.other)

    def test_badPatterns(self) -> None:
        for pattern in ("example.com:80", "*", "*.", "a.*.com", "*example.com", "", "ex ample.com", "*.[::1]"):
            with self.assertRaises(ValueError, msg=pattern):
                Route(self.s.shop, hosts=[pattern])


class PathPrefixTests(unittest.TestCase):
    """Path prefixes match raw targets at segment boundaries."""

    def setUp(self) -> None:
        self.s = Services()

    def matches(self, prefix: str, target: bytes) -> bool:
        return route(RoutingDirector([Route(self.s.api, pathPrefix=prefix)]), target)[0] is not None

    def test_boundary(self) -> None:
        for target in (b"/api", b"/api/", b"/api/x", b"/api?q=1", b"/api/x/../y"):
            self.assertTrue(self.matches("/api", target), target)
        for target in (b"/apix", b"/ap", b"/API", b"/%61pi", b"//api", b"/api%2Fx", b"*", b"/"):
            self.assertFalse(self.matches("/api", target), target)

    def test_trailingSlash(self) -> None:
        """A prefix ending in C{/} matches what starts with it, and no less."""
        self.assertTrue(self.matches("/api/", b"/api/x"))
        self.assertTrue(self.matches("/api/", b"/api/"))
        self.assertFalse(self.matches("/api/", b"/api"))
        self.assertFalse(self.matches("/api/", b"/api?q"))

    def test_root(self) -> None:
        self.assertTrue(self.matches("/", b"/anything?at=all"))
        self.assertFalse(self.matches("/", b"*"))

    def test_encodedPrefix(self) -> None:
        """A prefix is compared as written, percent-encoding included."""
        self.assertTrue(self.matches("/a%2Fb", b"/a%2Fb/c"))
        self.assertFalse(self.matches("/a%2Fb", b"/a/b/c"))

    def test_badPrefixes(self) -> None:
        for prefix in ("api", "", "/a b", "/a?b", "/a#b", "/caf\u00e9"):
            with self.assertRaises(ValueError, msg=prefix):
                Route(self.s.api, pathPrefix=prefix)


class NormalisedTargetTests(unittest.TestCase):
    """A target one route takes as sent and another once an upstream normalises it is refused."""

    def test_normalisedPath(self) -> None:
        cases = {
            b"/a/b?x=/../": None,  # nothing to normalise: the query does not count
            b"/.well-known/x": b"/.well-known/x",
            b"/a/./b/../c/": b"/a/c/",
            b"/a/b/..": b"/a/",
            b"/../../a": b"/a",
            b"//a///b": b"/a/b",
            b"/%61%2Fb/%2e%2E/%2E": b"/a/",
            b"/a%5Cb\\c": b"/a/b/c",
            b"/a;x=1/b;y?q;z": b"/a/b?q;z",
            b"/a%252e": b"/a%2e",  # decoded once
        }
        for target, normalised in cases.items():
            self.assertEqual(normalisedPath(target), normalised, target)

    def test_refusedOnlyForAnotherRoute(self) -> None:
        s = Services()
        director = RoutingDirector(
            [Route(s.admin, pathPrefix="/admin"), Route(s.api, pathPrefix="/api/"), Route(s.web)]
        )
        for target, service in [
            (b"/admin/x/../y;p=1", s.admin),
            (b"/web//a/../b%2F", s.web),
            (b"/api/%2e%2e/api/x", s.api),
            (b"/a%64min", None),
            (b"/x/../admin", None),
            (b"//api/x", None),
            (b"/api/../x", None),
        ]:
            if service is None:
                with self.assertRaises(ProxyError, msg=target) as raised:
                    route(director, target)
                self.assertEqual(raised.exception.status, 400)
            else:
                self.assertIs(route(director, target)[0], service, target)
        alone = RoutingDirector([Route(s.admin, pathPrefix="/admin")])  # nothing else to take it
        self.assertIsNone(route(alone, b"/x/../admin")[0])


class RewriteTests(unittest.TestCase):
    """Prefix rewrites keep the rest of the target byte for byte; Host and field rewrites."""

    def setUp(self) -> None:
        self.s = Services()

    def rewritten(self, target: bytes, **options: object) -> bytes:
        director = RoutingDirector([Route(self.s.api, pathPrefix="/api", **options)])  # type: ignore[arg-type]
        service, outbound = route(director, target)
        self.assertIs(service, self.s.api)
        return outbound.target

    def test_unchanged(self) -> None:
        """Without a rewrite, the target is passed on as sent, however odd."""
        self.assertEqual(self.rewritten(b"/api" + AWKWARD), b"/api" + AWKWARD)
        director = RoutingDirector([Route(self.s.api)])
        for target in (AWKWARD, b"*", b"/%2e%2e/%00"):
            self.assertEqual(route(director, target)[1].target, target)

    def test_strip(self) -> None:
        self.assertEqual(self.rewritten(b"/api" + AWKWARD, stripPrefix=True), AWKWARD)
        self.assertEqual(self.rewritten(b"/api", stripPrefix=True), b"/")
        self.assertEqual(self.rewritten(b"/api/", stripPrefix=True), b"/")
        self.assertEqual(self.rewritten(b"/api?q=%20&x", stripPrefix=True), b"/?q=%20&x")
        self.assertEqual(self.rewritten(b"/api//x", stripPrefix=True), b"//x")

    def test_stripSlashEndedPrefix(self) -> None:
        director = RoutingDirector([Route(self.s.api, pathPrefix="/api/", stripPrefix=True)])
        self.assertEqual(route(director, b"/api/x%2F;y?z")[1].target, b"/x%2F;y?z")
        self.assertEqual(route(director, b"/api/")[1].target, b"/")

    def test_replace(self) -> None:
        self.assertEqual(self.rewritten(b"/api/x/../y?q", replacePrefix="/v2"), b"/v2/x/../y?q")
        self.assertEqual(self.rewritten(b"/api", replacePrefix="/v2"), b"/v2")
        self.assertEqual(self.rewritten(b"/api?q", replacePrefix="/v2"), b"/v2?q")
        self.assertEqual(self.rewritten(b"/api/x", replacePrefix="/v2/"), b"/v2/x")
        self.assertEqual(self.rewritten(b"/api", replacePrefix="/v2/"), b"/v2/")
        self.assertEqual(self.rewritten(b"/api/x", replacePrefix="/"), b"/x")

    def test_hostAndFields(self) -> None:
        director = RoutingDirector(
            [
                Route(
                    self.s.api,
                    setHost="internal.example:8080",
                    removeHeaders=["X-Debug", "X-Forwarded-For"],
                    setHeaders={"X-Env": "prod"},
                    addHeaders=[("X-Tag", "a"), ("X-Tag", "b")],
                )
            ]
        )
        headers = [(b"x-debug", b"1"), (b"x-env", b"dev"), (b"x-tag", b"client"), (b"x-keep", b"yes")]
        _, outbound = route(director, b"/", b"public.example", headers=headers)
        self.assertEqual(outbound.host, b"internal.example:8080")
        fields = outbound.headers
        self.assertFalse(fields.hasHeader(b"x-debug"))
        self.assertEqual(fields.getRawHeaders(b"x-env"), [b"prod"])
        self.assertEqual(fields.getRawHeaders(b"x-tag"), [b"client", b"a", b"b"])
        self.assertEqual(fields.getRawHeaders(b"x-keep"), [b"yes"])

    def test_hostKeptByDefault(self) -> None:
        _, outbound = route(RoutingDirector([Route(self.s.api)]), b"/", b"Public.Example:81")
        self.assertEqual(outbound.host, b"Public.Example:81")

    def test_badRewrites(self) -> None:
        api = self.s.api
        bad: list[dict[str, object]] = [
            {"stripPrefix": True},
            {"replacePrefix": "/v2"},
            {"pathPrefix": "/a", "stripPrefix": True, "replacePrefix": "/b"},
            {"pathPrefix": "/a", "replacePrefix": "v2"},
            {"setHost": "a b"},
            {"setHost": "a.example:port"},
            {"setHeaders": {"Connection": "close"}},
            {"setHeaders": {"Content-Length": "5"}},
            {"addHeaders": [("Transfer-Encoding", "chunked")]},
            {"removeHeaders": ["Host"]},
            {"setHeaders": {"X-A": "1\r\nX-Injected: 1"}},
            {"addHeaders": [("X A", "1")]},
        ]
        for options in bad:
            with self.assertRaises(ValueError, msg=repr(options)):
                Route(api, **options)  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            Route("api")  # type: ignore[arg-type]


class MatcherTests(unittest.TestCase):
    """Header and query matchers."""

    def setUp(self) -> None:
        self.s = Services()

    def matches(self, target: bytes = b"/", sent: Iterable[tuple[bytes, bytes]] = (), **conditions: object) -> bool:
        director = RoutingDirector([Route(self.s.api, **conditions)])  # type: ignore[arg-type]
        return route(director, target, headers=sent)[0] is not None

    def test_headerPresent(self) -> None:
        self.assertTrue(self.matches(b"/", [(b"X-Canary", b"")], headers={"x-canary": None}))
        self.assertTrue(self.matches(b"/", [(b"x-canary", b"1")], headers={"X-Canary": None}))
        self.assertFalse(self.matches(b"/", [(b"x-other", b"1")], headers={"X-Canary": None}))

    def test_headerEquals(self) -> None:
        conditions = {"X-Env": "staging"}
        self.assertTrue(self.matches(b"/", [(b"x-env", b"staging")], headers=conditions))
        self.assertTrue(self.matches(b"/", [(b"x-env", b"prod"), (b"X-Env", b"staging")], headers=conditions))
        for value in (b"Staging", b"staging2", b"prod", b"staging, prod"):
            self.assertFalse(self.matches(b"/", [(b"x-env", value)], headers=conditions), value)
        self.assertFalse(self.matches(b"/", [], headers=conditions))

    def test_query(self) -> None:
        self.assertTrue(self.matches(b"/x?debug", query={"debug": None}))
        self.assertTrue(self.matches(b"/x?a=1&debug=0", query={"debug": None}))
        self.assertFalse(self.matches(b"/x?debugger=1", query={"debug": None}))
        self.assertFalse(self.matches(b"/x/debug", query={"debug": None}))
        self.assertTrue(self.matches(b"/x?v=2&w", query={"v": "2", "w": ""}))
        self.assertFalse(self.matches(b"/x?v=22", query={"v": "2"}))

    def test_queryRaw(self) -> None:
        """Query arguments are compared as sent: no decoding, C{;} is not a separator."""
        self.assertTrue(self.matches(b"/?name=a%20b", query={"name": "a%20b"}))
        self.assertFalse(self.matches(b"/?name=a%20b", query={"name": "a+b"}))
        self.assertFalse(self.matches(b"/?name=a+b", query={"name": "a%20b"}))
        self.assertFalse(self.matches(b"/?x=1;name=a", query={"name": "a"}))
        self.assertTrue(self.matches(b"/?x=1;name=a", query={"x": "1;name=a"}))

    def test_allMustMatch(self) -> None:
        conditions = {"pathPrefix": "/api", "headers": {"X-Env": "prod"}, "query": {"v": "2"}}
        self.assertTrue(self.matches(b"/api?v=2", [(b"x-env", b"prod")], **conditions))
        self.assertFalse(self.matches(b"/api?v=1", [(b"x-env", b"prod")], **conditions))
        self.assertFalse(self.matches(b"/api?v=2", [(b"x-env", b"dev")], **conditions))
        self.assertFalse(self.matches(b"/web?v=2", [(b"x-env", b"prod")], **conditions))

    def test_badMatchers(self) -> None:
        for conditions in (
            {"headers": {"X Env": "a"}},
            {"headers": {"X-Env": "a\nb"}},
            {"query": {"": None}},
            {"query": {"a=b": None}},
            {"query": {"a": "b&c"}},
            {"query": {"a": "b c"}},
        ):
            with self.assertRaises(ValueError, msg=repr(conditions)):
                Route(self.s.api, **conditions)  # type: ignore[arg-type]


class OrderTests(unittest.TestCase):
    """Routes are tried most specific first, whatever order they are given in."""

    def setUp(self) -> None:
        self.s = Services()

    def test_hostGroups(self) -> None:
        """Exact hosts, then wildcards (longest domain first), then routes without hosts."""
        s = self.s
        routes = [
            Route(s.anyHost),
            Route(s.anyHostApi, pathPrefix="/api"),
            Route(s.wide, hosts=["*.example.com"]),
            Route(s.narrow, hosts=["*.api.example.com"]),
            Route(s.exact, hosts=["eu.api.example.com"]),
        ]
        for order in (routes, routes[::-1]):
            director = RoutingDirector(order)
            self.assertIs(route(director, b"/api", b"eu.api.example.com")[0], s.exact)
            self.assertIs(route(director, b"/api", b"us.api.example.com")[0], s.narrow)
            self.assertIs(route(director, b"/api", b"www.example.com")[0], s.wide)
            self.assertIs(route(director, b"/api", b"example.org")[0], s.anyHostApi)
            self.assertIs(route(director, b"/web", b"example.org")[0], s.anyHost)
            self.assertEqual(
                [r.service for r in director.candidates(b"EU.api.example.com:443")],
                [s.exact, s.narrow, s.wide, s.anyHostApi, s.anyHost],
            )

    def test_withinAGroup(self) -> None:
        """Longest prefix first, then more matchers, then the order given."""
        s = self.s
        routes = [
            Route(s.first, pathPrefix="/api"),
            Route(s.second, pathPrefix="/api"),
            Route(s.matchers, pathPrefix="/api", headers={"X-Beta": None}),
            Route(s.longer, pathPrefix="/api/v2"),
            Route(s.slash, pathPrefix="/api/"),
            Route(s.none),
            Route(s.root, pathPrefix="/"),
        ]
        director = RoutingDirector(routes)
        self.assertEqual(
            [r.service for r in director.candidates(None)],
            [s.longer, s.slash, s.matchers, s.first, s.second, s.root, s.none],
        )
        self.assertIs(route(director, b"/api/v2/x")[0], s.longer)
        self.assertIs(route(director, b"/api/v1")[0], s.slash)
        self.assertIs(route(director, b"/api", headers=[(b"x-beta", b"1")])[0], s.matchers)
        self.assertIs(route(director, b"/api")[0], s.first)
        self.assertIs(route(director, b"/web")[0], s.root)
        self.assertIs(route(director, b"*")[0], s.none)
        self.assertEqual(
            [r.service for r in RoutingDirector(routes[::-1]).candidates(None)],
            [s.longer, s.slash, s.matchers, s.second, s.first, s.root, s.none],
        )

    def test_hostBeforePath(self) -> None:
        """A route for the request's host wins over a longer path prefix for any host."""
        s = self.s
        director = RoutingDirector([Route(s.health, pathPrefix="/health"), Route(s.site, hosts=["a.example"])])
        self.assertIs(route(director, b"/health", b"a.example")[0], s.site)
        self.assertIs(route(director, b"/health", b"b.example")[0], s.health)

    def test_severalHosts(self) -> None:
        """A route listing several hosts sits in the group of the pattern that matched."""
        s = self.s
        director = RoutingDirector(
            [Route(s.both, hosts=["a.example", "*.b.example"]), Route(s.exactB, hosts=["x.b.example"])]
        )
        self.assertIs(route(director, b"/", b"a.example")[0], s.both)
        self.assertIs(route(director, b"/", b"x.b.example")[0], s.exactB)
        self.assertIs(route(director, b"/", b"y.b.example")[0], s.both)

    def test_fallThrough(self) -> None:
        """A route that does not match leaves the outbound request alone, and the next one is tried."""
        s = self.s
        versions = ServiceVersion({"users:v1": s.users})
        director = RoutingDirector(
            [
                Route(versions, pathPrefix="/svc", stripPrefix=True, setHost="users.internal"),
                Route(s.fallback, pathPrefix="/", headers={"X-Fallback": None}, addHeaders=[("X-Routed", "1")]),
                Route(s.last),
            ]
        )
        service, outbound = route(director, b"/svc/orders/v1/x", headers=[(b"x-fallback", b"")])
        self.assertIs(service, s.fallback)
        self.assertEqual((outbound.target, outbound.host), (b"/svc/orders/v1/x", b"example.com"))
        self.assertEqual(outbound.headers.getRawHeaders(b"x-routed"), [b"1"])
        service, outbound = route(director, b"/svc/orders/v1/x")
        self.assertIs(service, s.last)
        self.assertFalse(outbound.headers.hasHeader(b"x-routed"))

    def test_noMatch(self) -> None:
        director = RoutingDirector([Route(self.s.api, hosts=["a.example"], pathPrefix="/api")])
        service, outbound = route(director, b"/api", b"b.example")
        self.assertIsNone(service)
        self.assertEqual((outbound.target, outbound.host), (b"/api", b"b.example"))
        self.assertIsNone(route(RoutingDirector([]), b"/")[0])


class ServiceVersionTests(unittest.TestCase):
    """C{/service/version/rest}: the service C{service:version}, the target C{/rest}."""

    def setUp(self) -> None:
        s = self.s = Services()
        self.services = {"users:v2": s.usersV2, "users:v1": s.usersV1, "orders:2024-01": s.orders}
        self.director = RoutingDirector([Route(ServiceVersion(self.services))])

    def test_extraction(self) -> None:
        s = self.s
        cases = [
            (b"/users/v2/list", s.usersV2, b"/list"),
            (b"/users/v1/list?all=1&x=%2F", s.usersV1, b"/list?all=1&x=%2F"),
            (b"/users/v2", s.usersV2, b"/"),
            (b"/users/v2/", s.usersV2, b"/"),
            (b"/users/v2?x", s.usersV2, b"/?x"),
            (b"/orders/2024-01" + AWKWARD, s.orders, AWKWARD),
        ]
        for target, service, rest in cases:
            chosen, outbound = route(self.director, target)
            self.assertIs(chosen, service, target)
            self.assertEqual(outbound.target, rest, target)

    def test_noService(self) -> None:
        for target in (
            b"/users/v3/list",  # unknown version
            b"/Users/v2/list",  # names are case-sensitive
            b"/users",  # one segment
            b"/users/v2x",  # the segment is v2x
            b"/users//v2/list",  # empty segment
            b"/users%2Fv2/list",
            b"/../v2/x",
            b"/users/%76%32/list",
            b"*",
        ):
            service, outbound = route(self.director, target)
            self.assertIsNone(service, target)
            self.assertEqual(outbound.target, target)

    def test_underAPrefix(self) -> None:
        s = self.s
        services = ServiceVersion(self.services)
        stripped = RoutingDirector([Route(services, pathPrefix="/svc", stripPrefix=True)])
        kept = RoutingDirector([Route(services, pathPrefix="/svc/")])
        replaced = RoutingDirector([Route(services, pathPrefix="/svc", replacePrefix="/internal")])
        self.assertEqual(route(stripped, b"/svc/users/v1/a;b")[1].target, b"/a;b")
        self.assertEqual(route(kept, b"/svc/users/v1/a;b")[1].target, b"/svc/a;b")
        self.assertEqual(route(kept, b"/svc/users/v1")[1].target, b"/svc/")
        self.assertEqual(route(replaced, b"/svc/users/v1?q")[1].target, b"/internal?q")
        self.assertIs(route(replaced, b"/svc/users/v1?q")[0], s.usersV1)
        self.assertIsNone(route(stripped, b"/svcx/users/v1")[0])

    def test_lookupIsLive(self) -> None:
        """A callable lookup, and a mapping consulted per request."""
        self.services["carts:v1"] = self.s.carts
        self.assertIs(route(self.director, b"/carts/v1/")[0], self.s.carts)
        asked: list[str] = []

        def lookup(name: str) -> Service | None:
            asked.append(name)
            return self.s.any if name.endswith(":beta") else None

        director = RoutingDirector([Route(ServiceVersion(lookup))])
        self.assertIs(route(director, b"/x/beta/y")[0], self.s.any)
        self.assertIsNone(route(director, b"/x/v1/y")[0])
        self.assertEqual(asked, ["x:beta", "x:v1"])


def _share(counts: Counter[Service | None], service: Service) -> float:
    return counts[service] / sum(counts.values())


class WeightedSplitTests(unittest.TestCase):
    """Canary percentages, A/B pinning and stickiness."""

    def assertNear(self, share: float, expected: float, within: float) -> None:
        self.assertTrue(abs(share - expected) <= within, f"{share:.3f} is not within {within} of {expected}")

    def setUp(self) -> None:
        self.s = Services()

    def test_canary(self) -> None:
        """90/10 over 2,000 requests lands within 3 percentage points of 90/10."""
        s = self.s
        split = WeightedSplit([(s.stable, 90), (s.canary, 10)], rng=random.Random(4))
        counts = countServices(RoutingDirector([Route(split)]), 2000)
        self.assertEqual(set(counts), {s.stable, s.canary})
        self.assertNear(_share(counts, s.canary), 0.10, 0.03)
        again = WeightedSplit([(s.stable, 90), (s.canary, 10)], rng=random.Random(4))
        self.assertEqual(countServices(RoutingDirector([Route(again)]), 2000), counts)

    def test_zeroWeight(self) -> None:
        s = self.s
        split = WeightedSplit([(s.a, 0), (s.b, 3), (s.dark, 0)], rng=random.Random(1))
        self.assertEqual({split.choose(request()) for _ in range(200)}, {s.b})

    def test_pinned(self) -> None:
        """A cookie or header naming a service sends the request there, even at weight 0."""
        s = self.s
        byCookie = WeightedSplit([(s.a, 100), (s.b, 0)], pin="cookie:variant", rng=random.Random(2))
        byHeader = WeightedSplit([(s.a, 100), (s.b, 0)], pin="header:X-Variant", rng=random.Random(2))
        for _ in range(20):
            self.assertIs(byCookie.choose(request(headers=[(b"cookie", b"session=1; variant=b")])), s.b)
            self.assertIs(byHeader.choose(request(headers=[(b"x-variant", b"b")])), s.b)
        for unknown in (b"variant=c", b"variant=B", b"other=b"):
            self.assertIs(byCookie.choose(request(headers=[(b"cookie", unknown)])), s.a, unknown)
        self.assertIs(byHeader.choose(request(headers=[(b"x-variant", b"b"), (b"x-variant", b"a")])), s.a)

    def test_stickyClient(self) -> None:
        """The same client key always gets the same service, and the keys spread by the weights."""
        s = self.s
        split = WeightedSplit([(s.stable, 90), (s.canary, 10)], sticky="client_ip")
        director = RoutingDirector([Route(split)])
        first = countServices(director, 2000)
        self.assertEqual(countServices(director, 2000), first)
        self.assertNear(_share(first, s.canary), 0.10, 0.03)
        for client in ("198.51.100.7", "2001:db8::1", "10.1.2.3"):
            self.assertEqual(len({split.choose(request(clientHost=client)) for _ in range(30)}), 1, client)

    def test_stickyCookieWithPin(self) -> None:
        """Pinning comes first; a request without the sticky key is placed at random."""
        s = self.s
        split = WeightedSplit(
            [(s.a, 50), (s.b, 50)], pin="header:X-Variant", sticky="cookie:session", rng=random.Random(3)
        )
        sessions = [b"session=%d" % i for i in range(200)]
        placed = {cookie: split.choose(request(headers=[(b"cookie", cookie)])) for cookie in sessions}
        for cookie, service in placed.items():
            self.assertIs(split.choose(request(headers=[(b"cookie", cookie)], clientHost="203.0.113.9")), service)
        self.assertEqual(set(placed.values()), {s.a, s.b})
        self.assertIs(split.choose(request(headers=[(b"cookie", sessions[0]), (b"x-variant", b"b")])), s.b)
        self.assertEqual({split.choose(request()) for _ in range(100)}, {s.a, s.b})

    def test_rampMovesOnlyTowardsTheLast(self) -> None:
        """Raising the weight of the service listed last only moves sticky clients onto it."""
        s = self.s
        split = WeightedSplit([(s.stable, 95), (s.canary, 5)], sticky="client_ip")
        clients = [request(clientHost=f"10.0.{i // 256}.{i % 256}") for i in range(1000)]
        before = [split.choose(r) for r in clients]
        split.setWeights([70, 30])
        self.assertEqual(split.weights, (70, 30))
        after = [split.choose(r) for r in clients]
        moved = [(b, a) for b, a in zip(before, after, strict=True) if b is not a]
        self.assertTrue(moved)
        self.assertEqual(set(moved), {(s.stable, s.canary)})
        self.assertNear(after.count(s.canary) / len(clients), 0.30, 0.05)

    def test_badSplits(self) -> None:
        s = self.s
        with self.assertRaises(ValueError):
            WeightedSplit([(s.a, 1), (s.a, 1)])
        for weights in ([(s.a, 0), (s.b, 0)], [(s.a, -1), (s.b, 2)], [(s.a, 1.5), (s.b, 1)], []):
            with self.assertRaises(ValueError, msg=repr(weights)):
                WeightedSplit(weights)  # type: ignore[arg-type]
        split = WeightedSplit([(s.a, 1), (s.b, 1)])
        with self.assertRaises(ValueError):
            split.setWeights([1])
        self.assertEqual(split.weights, (1, 1))
        with self.assertRaises(ValueError):
            WeightedSplit([(s.a, 1)], pin="query:x")

    def test_interfaces(self) -> None:
        s = self.s
        self.assertTrue(verifyObject(ISplit, WeightedSplit([(s.a, 1)])))
        self.assertTrue(verifyObject(ISplit, BlueGreen(s.a, s.b)))
        self.assertTrue(verifyObject(IDirector, RoutingDirector([])))
        self.assertTrue(verifyObject(IDirector, SingleServiceDirector(s.a)))


class BlueGreenTests(unittest.TestCase):
    def setUp(self) -> None:
        self.s = Services()

    def test_switch(self) -> None:
        s = self.s
        switch = BlueGreen(s.blue, s.green)
        director = RoutingDirector([Route(switch, hosts=["app.example"]), Route(s.green, headers={"X-Preview": None})])
        self.assertEqual(switch.active, "blue")
        self.assertEqual(countServices(director, 10, lambda i: request(host=b"app.example")), Counter({s.blue: 10}))
        switch.activate("green")
        self.assertEqual(switch.active, "green")
        self.assertEqual(countServices(director, 10, lambda i: request(host=b"app.example")), Counter({s.green: 10}))
        switch.activate("green")
        self.assertIs(route(director, b"/", b"app.example")[0], s.green)
        self.assertIs(BlueGreen(s.blue, s.green, active="green").choose(request()), s.green)

    def test_badColor(self) -> None:
        switch = BlueGreen(self.s.blue, self.s.green)
        with self.assertRaises(ValueError):
            switch.activate("red")
        self.assertEqual(switch.active, "blue")
        with self.assertRaises(ValueError):
            BlueGreen(self.s.blue, self.s.green, active="Blue")


class KitTests(unittest.TestCase):
    """The director helpers of L{rproxy.testing}, and the single-service director."""

    def test_makeService(self) -> None:
        service = makeService("users", [3, 1])
        upstreams = service.registry.lookup("users")
        self.assertEqual([u.configuredWeight for u in upstreams], [3, 1])
        self.assertEqual(service.name, "users")
        self.assertIn(service.balancer.pick(upstreams, request(), ()), upstreams)

    def test_directRequest(self) -> None:
        """The outbound copy is built as an exchange builds it: hop-by-hop fields out, forwarding fields in."""
        service = makeService()
        inbound = request(
            b"/x?y",
            b"a.example",
            headers=[(b"connection", b"x-hop"), (b"x-hop", b"1"), (b"x-kept", b"2"), (b"te", b"trailers")],
        )
        chosen, outbound = directRequest(SingleServiceDirector(service), inbound)
        self.assertIs(chosen, service)
        self.assertEqual((outbound.method, outbound.target, outbound.host), (b"GET", b"/x?y", b"a.example"))
        self.assertEqual(
            sorted(outbound.headers.getAllRawHeaders()),
            [
                (b"Forwarded", [b"for=192.0.2.1;host=a.example;proto=http"]),
                (b"Via", [b"1.1 rproxy"]),
                (b"X-Forwarded-For", [b"192.0.2.1"]),
                (b"X-Forwarded-Host", [b"a.example"]),
                (b"X-Forwarded-Proto", [b"http"]),
                (b"X-Kept", [b"2"]),
            ],
        )
        self.assertTrue(outbound.acceptsTrailers)
        self.assertEqual(inbound.headers.getRawHeaders(b"x-hop"), [b"1"])

    def test_countServices(self) -> None:
        a = makeService("a")
        director = RoutingDirector([Route(a, pathPrefix="/a")])
        counts = countServices(director, 10, lambda i: request(b"/a" if i % 2 else b"/b"))
        self.assertEqual(counts, Counter({a: 5, None: 5}))


# -- end to end: a real proxy, real upstreams


def _answer(name: bytes):
    def respond(proto: object, received: object) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name)

    return respond


class EndToEndTests(unittest.TestCase):
    """A proxy whose director is a L{RoutingDirector}, in front of upstreams of its own per service."""

    def service(self, name: str) -> tuple[Service, ScriptedUpstream]:
        upstream = ScriptedUpstream(self, _answer(name.encode("ascii")))
        registry = MemoryRegistry()
        registry.add(name, Upstream.fromURL(upstream.url, reactor, PoolSettings()))
        self._upstreams.extend(registry.members(name))
        return Service(name, registry, RoundRobin()), upstream

    def setUp(self) -> None:
        self._upstreams: list[Upstream] = []
        self.users, self.usersUpstream = self.service("users")
        self.usersV2, self.usersV2Upstream = self.service("users-v2")
        self.shop, self.shopUpstream = self.service("shop")
        self.api, self.apiUpstream = self.service("api")
        director = RoutingDirector(
            [
                Route(self.shop, hosts=["shop.example", "*.shop.example"]),
                Route(self.api, pathPrefix="/api", stripPrefix=True, setHost="api.internal"),
                Route(
                    ServiceVersion({"users:v1": self.users, "users:v2": self.usersV2}),
                    pathPrefix="/svc",
                    stripPrefix=True,
                ),
            ]
        )
        site = ProxySite(buildResource(Proxy(reactor, director)), ClientLimits(), reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = port.getHost().port

        def stop() -> defer.Deferred[None]:
            for connection in list(site.connections):
                connection.transport.abortConnection()
            for upstream in self._upstreams:
                upstream.pool.drain("is closing: the test is over")
            return defer.maybeDeferred(port.stopListening)

        self.addCleanup(stop)

    async def get(self, target: bytes, host: bytes) -> tuple[bytes, bytes]:
        data = await rawRequest(
            self.port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        )
        [(head, body)] = splitResponses(data)
        return head, body

    def allRequests(self) -> list[bytes]:
        return [
            r.requestLine
            for upstream in (self.usersUpstream, self.usersV2Upstream, self.shopUpstream, self.apiUpstream)
            for r in upstream.requests
        ]

    async def test_hosts(self) -> None:
        head, body = await self.get(b"/api/x", b"Shop.Example:8080")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, b"shop")
        head, body = await self.get(b"/", b"eu.shop.example")
        self.assertEqual(body, b"shop")
        [first, second] = self.shopUpstream.requests
        self.assertEqual(first.requestLine, b"GET /api/x HTTP/1.1")
        self.assertEqual(first.headers(b"host"), [b"Shop.Example:8080"])
        self.assertEqual(second.headers(b"host"), [b"eu.shop.example"])

    async def test_prefixStripped(self) -> None:
        """The upstream receives the exact rest of the target, and the Host the route sets."""
        head, body = await self.get(b"/api" + AWKWARD, b"www.example")
        self.assertEqual(body, b"api")
        [received] = self.apiUpstream.requests
        self.assertEqual(received.requestLine, b"GET " + AWKWARD + b" HTTP/1.1")
        self.assertEqual(received.headers(b"host"), [b"api.internal"])
        await self.get(b"/api?q=%2F", b"www.example")
        self.assertEqual(self.apiUpstream.requests[1].requestLine, b"GET /?q=%2F HTTP/1.1")

    async def test_serviceVersion(self) -> None:
        _, body = await self.get(b"/svc/users/v2/list?all=1", b"www.example")
        self.assertEqual(body, b"users-v2")
        _, body = await self.get(b"/svc/users/v1/a%2Fb", b"www.example")
        self.assertEqual(body, b"users")
        self.assertEqual(self.usersV2Upstream.requests[0].requestLine, b"GET /list?all=1 HTTP/1.1")
        self.assertEqual(self.usersUpstream.requests[0].requestLine, b"GET /a%2Fb HTTP/1.1")

    async def test_noRoute(self) -> None:
        """A request no route matches gets 404 with a reason, and reaches no upstream."""
        for target in (b"/svc/users/v9/list", b"/apix", b"/"):
            head, body = await self.get(target, b"www.example")
            self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
            self.assertIn(b"no route matches", body)
            self.assertIn(target, body)
        self.assertEqual(self.allRequests(), [])


class DocsTests(unittest.TestCase):
    """The Python examples of docs/routing.md run, in order, and print what their comments say."""

    def test_examples(self) -> None:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "docs", "routing.md")
        with open(path, encoding="utf-8") as f:
            blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.MULTILINE | re.DOTALL)
        self.assertGreaterEqual(len(blocks), 5)
        namespace: dict[str, object] = {}
        for block in blocks:
            expected = [line.split("  # ", 1)[1] for line in block.splitlines() if line.startswith("print(")]
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(block, path, "exec"), namespace)
            self.assertEqual(printed.getvalue().splitlines(), expected, block)
