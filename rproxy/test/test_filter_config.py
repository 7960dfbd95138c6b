"""
Filters in the configuration: C{[filters.NAME]} tables, C{filters} lists on routes and services, the default
chain (the command line's filters, then C{default-filters}), the errors of each, and live reload keeping
the filter objects whose definitions did not change.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall
from twisted.python.usage import UsageError

from rproxy.app.build import buildFilters, buildServices
from rproxy.app.config import ProxyConfig
from rproxy.proxy.registry import MemoryRegistry
from rproxy.test.support import (
    ScriptedUpstream,
    headerValues,
    rawRequest,
    responseStatus,
    splitResponses,
    waitFor,
)
from rproxy.test.test_config import URL, ConfigTestCase, answerWith, parse
from rproxy.test.test_reload import ReloadTestCase, route, services, slowly, startReloadable

DENY_LOCAL = '[filters.nolocal]\ntype = "ip-rules"\ndeny = ["127.0.0.0/8"]\n'
ALLOW_LOCAL = '[filters.local]\ntype = "ip-rules"\nallow = ["127.0.0.1"]\n'


def chains(config: ProxyConfig) -> dict[str, list[str]]:
    """Each service's chain, by name, as built."""
    built, _ = buildServices(config, None, MemoryRegistry(), buildFilters(config, None))  # type: ignore[arg-type]
    return {name: list(service.filters.names) for name, service in built.items()}


class FilterConfigTests(ConfigTestCase):
    """Definitions, chains and their errors."""

    def test_definitionsAndChains(self) -> None:
        """A service's own list, else the default chain; a route's list is its requests' whole chain."""
        config = self.fromFile(
            'default-filters = ["local"]\n'
            + DENY_LOCAL
            + ALLOW_LOCAL
            + services(api=URL, web=URL)
            + 'filters = ["nolocal", "local"]\n'  # in [services.web], the last table
            + route("api", "/api")
            + '[[routes]]\nservice = "web"\n'
            + '[[routes]]\npath-prefix = "/open"\nservice = "web"\nfilters = []\n'
        )
        self.assertEqual(config.defaultFilters, ("local",))
        self.assertEqual(config.filters["nolocal"].kind, "ip-rules")
        self.assertEqual(config.filters["nolocal"].options, {"deny": ["127.0.0.0/8"]})
        self.assertIsNone(config.services["api"].filters)
        self.assertEqual(config.services["web"].filters, ("nolocal", "local"))
        self.assertEqual(chains(config), {"api": ["local"], "web": ["nolocal", "local"]})
        self.assertEqual([route.filters for route in config.routes], [None, None, ()])

    def test_commandLineFilters(self) -> None:
        """The command line's filters make the default chain, in a fixed order, before default-filters."""
        config = parse(
            *(
                "--upstream",
                URL,
                "--rate-limit",
                "5/s",
                "--deny-ip",
                "192.0.2.0/24",
                "--cors-origin",
                "https://a.example",
            )
        )
        self.assertEqual(config.defaultFilters, ("ip-rules", "cors", "rate-limit"))
        self.assertEqual(config.filters["rate-limit"].options, {"rate": "5/s"})
        self.assertEqual(config.filters["ip-rules"].options, {"allow": [], "deny": ["192.0.2.0/24"]})
        config = self.fromFile(
            f'upstream = ["{URL}"]\ndefault-filters = ["local"]\n' + ALLOW_LOCAL, "--deny-ip", "10.0.0.1"
        )
        self.assertEqual(config.defaultFilters, ("ip-rules", "local"))

    def test_errors(self) -> None:
        """Each mistake is one line naming the table and key."""
        top = f'upstream = ["{URL}"]\n'
        cases = [
            (
                top + '[filters.x]\ntype = "no-such-kind"\n',
                "rproxy.toml: filters.x: unknown filter type 'no-such-kind'",
            ),
            (top + "[filters.x]\nallow = []\n", "rproxy.toml: filters.x: give the filter's kind"),
            (
                top + '[filters.x]\ntype = "ip-rules"\nallow = ["300.1.1.1"]\n',
                "rproxy.toml: filters.x: filter ip-rules: option allow",
            ),
            (top + '[filters.x]\ntype = "ip-rules"\nallow = ["10.0.0.1"]\nbogus = 1\n', "unknown option 'bogus'"),
            (
                top + ALLOW_LOCAL,
                "rproxy.toml: filters.local: no route, service or default-filters uses the filter 'local'",
            ),
            (top + 'default-filters = ["nope"]\n', "rproxy.toml: default-filters: no filter named 'nope'"),
            ('default-filters = ["local", "local"]\n' + top + ALLOW_LOCAL, "a filter is listed twice"),
            (
                top + ALLOW_LOCAL + '[[routes]]\nservice = "default"\nfilters = "local"\n',
                "routes[0].filters: expected a list",
            ),
            (
                top + '[filters.rate-limit]\ntype = "ip-rules"\nallow = ["10.0.0.1"]\n',
                "the name of the command line's filter",
            ),
            (
                ALLOW_LOCAL + services(api=URL) + 'filters = ["other"]\n',
                "rproxy.toml: services.api.filters: no filter named 'other' (filters: local)",
            ),
        ]
        for text, expected in cases:
            self.assertIn(expected, self.error(text), text)

    def test_rateLimitBurstAlone(self) -> None:
        error = self.assertRaises(UsageError, parse, "--upstream", URL, "--rate-limit-burst", "5")
        self.assertIn("--rate-limit-burst: has no use without --rate-limit", str(error))


class FilterReloadTests(ReloadTestCase):
    """A reload replaces chains, keeping the objects of unchanged definitions."""

    async def test_reload(self) -> None:
        upstream = ScriptedUpstream(self, answerWith(b"up"))
        text = DENY_LOCAL + ALLOW_LOCAL + services(api=upstream.url) + route("api", "/api")
        proxy = startReloadable(self, text + 'filters = ["nolocal"]\n' + route("api") + 'filters = ["local"]\n')
        get = b"GET /api/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        self.assertTrue((await rawRequest(proxy.port, get)).startswith(b"HTTP/1.1 403 "))
        before = proxy.live._filters.filters
        # The route's chain changes; both definitions stay: the same objects serve the new chains.
        summary = proxy.reload(text + 'filters = ["local"]\n' + route("api") + 'filters = ["nolocal"]\n')
        self.assertIsNotNone(summary)
        after = proxy.live._filters.filters
        self.assertIs(after["local"], before["local"])
        self.assertIs(after["nolocal"], before["nolocal"])
        self.assertTrue((await rawRequest(proxy.port, get)).startswith(b"HTTP/1.1 200 "))
        other = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        self.assertTrue((await rawRequest(proxy.port, other)).startswith(b"HTTP/1.1 403 "))
        # A changed definition is a new object; a broken one changes nothing.
        changed = text.replace('deny = ["127.0.0.0/8"]', 'deny = ["10.0.0.0/8"]')
        proxy.reload(changed + 'filters = ["nolocal"]\n' + route("api") + 'filters = ["local"]\n')
        self.assertIsNot(proxy.live._filters.filters["nolocal"], before["nolocal"])
        self.assertIs(proxy.live._filters.filters["local"], before["local"])
        self.assertTrue((await rawRequest(proxy.port, get)).startswith(b"HTTP/1.1 200 "))
        broken = changed.replace('type = "ip-rules"', 'type = "nope"', 1)
        self.assertIsNone(proxy.reload(broken + 'filters = ["nolocal"]\n' + route("api") + 'filters = ["local"]\n'))
        self.assertTrue((await rawRequest(proxy.port, get)).startswith(b"HTTP/1.1 200 "))

    async def test_closed(self) -> None:
        """A filter holding resources is closed when a reload drops it, and when the proxy stops."""
        upstream = ScriptedUpstream(self, answerWith(b"up"))
        auth = '[filters.auth]\ntype = "forward-auth"\nurl = "http://127.0.0.1:1/check"\n'
        text = services(api=upstream.url) + route("api") + 'filters = ["auth"]\n'
        proxy = startReloadable(self, auth + text)
        closed: list[str] = []
        first = proxy.live._filters.filters["auth"]
        self.patch(first, "close", lambda: closed.append("first"))
        proxy.reload(auth + text)  # unchanged: kept, not closed
        self.assertIs(proxy.live._filters.filters["auth"], first)
        self.assertEqual(closed, [])
        proxy.reload(auth.replace("/check", "/other") + text)
        self.assertEqual(closed, ["first"])
        second = proxy.live._filters.filters["auth"]
        self.patch(second, "close", lambda: closed.append("second"))
        await proxy.top.stopService()
        self.assertEqual(closed, ["first", "second"])

    async def test_inFlightKeepsItsChain(self) -> None:
        """An exchange in flight finishes with the chain it started with; the next one gets the new chain."""
        calls: list[IDelayedCall] = self.calls
        upstream = ScriptedUpstream(self, slowly(0.5, calls))
        tables = "".join(
            f'[filters.{name}]\ntype = "headers"\nresponse-set = {{ X-Chain = "{name}" }}\n' for name in ("a", "b")
        )
        body = tables + services(api=upstream.url) + route("api")
        proxy = startReloadable(self, 'default-filters = ["b"]\n' + body + 'filters = ["a"]\n')
        get = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        first = rawRequest(proxy.port, get)
        self.assertTrue(await waitFor(lambda: upstream.requests, 5))
        proxy.reload('default-filters = ["a"]\n' + body + 'filters = ["b"]\n')
        [(head, body)] = splitResponses(await first)
        self.assertEqual((responseStatus(head), headerValues(head, b"x-chain"), body), (200, [b"a"], b"slow"))
        [(head, body)] = splitResponses(await rawRequest(proxy.port, get))
        self.assertEqual((responseStatus(head), headerValues(head, b"x-chain")), (200, [b"b"]))
