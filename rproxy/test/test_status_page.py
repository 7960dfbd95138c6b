"""
The status page of the admin listener (L{rproxy.observe.status}, C{GET /status}): what it shows of a real
proxy (services, routes, each upstream's health, ejection, last error, load, pool and latency), that it
escapes what upstreams send, who may see it, and, in Debian's headless Chromium, that it refreshes itself
while the proxy's state changes; with the records it is drawn from (an upstream's last error, the moving
average of its latency).

L{ScreenshotTests} takes a screenshot of a realistic state; docs/tools/status_screenshot.py runs it to
regenerate docs/status-page.png.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from html.parser import HTMLParser
from urllib.parse import quote

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial import unittest

from rproxy.app.admin import AdminAPI
from rproxy.app.reload import LiveProxy
from rproxy.downstream.site import ProxySite
from rproxy.health.state import PassivePolicy, UpstreamHealth
from rproxy.interfaces import HealthResult
from rproxy.observe.record import ExchangeRecord
from rproxy.observe.status import PAGE_HEADERS, StateDocument, UpstreamState, statusPage
from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    chromium,
    dumpDOM,
    rawRequest,
    splitResponses,
    waitFor,
)
from rproxy.test.test_admin import TOKEN, AdminClient, RunningService, startAdmin
from rproxy.test.test_config import answerWith, writeConfig
from rproxy.test.test_healthcheck import captureLog
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import LATENCY_SMOOTHING, Upstream

#: What a broken upstream sends instead of a status line: the proxy's error reason quotes it.
GARBAGE = b"<img src=x onerror=alert(1)>"

#: The user name a person signs in with (any would do).
USER = "admin"


def basic(password: str, user: str = USER) -> str:
    """An C{Authorization} value: HTTP Basic with C{user} and C{password}."""
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode("ascii")


async def get(port: int, target: bytes, host: bytes = b"front") -> tuple[bytes, bytes]:
    """The head and body of the response to C{GET target} for C{host}, sent to 127.0.0.1:C{port}."""
    payload = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, host)
    [response] = splitResponses(await rawRequest(port, payload))
    return response


def garbage(proto: Protocol, request: ReceivedRequest) -> bytes:
    """A L{ScriptedUpstream} answer that is no HTTP: L{GARBAGE} where the status line should be."""
    return GARBAGE + b"\r\n\r\n"


@dataclass
class Scenario:
    """
    A proxy with the admin listener and three services, as a person would watch it: C{web} (two upstreams,
    one slower), C{api} (three, one of which answers garbage) and C{auth} (one, which holds the requests it
    gets until told to answer).
    """

    running: RunningService
    upstreams: dict[str, list[ScriptedUpstream]]
    held: list[Protocol] = field(default_factory=list)

    @property
    def live(self) -> LiveProxy:
        return self.running.reloader.live

    def upstream(self, service: str, index: int) -> Upstream:
        """The proxy's upstream for C{self.upstreams[service][index]}."""
        url = self.upstreams[service][index].url
        [found] = [each for each in self.live.registry.members(service) if each.key == url]
        return found

    def pageURL(self, password: str = TOKEN) -> str:
        """The page's URL with the credentials in it, as a browser given them takes them to the prompt."""
        return f"http://{USER}:{quote(password, safe='')}@127.0.0.1:{self.running.adminPort}/status"

    def answerHeld(self) -> None:
        """Let C{auth}'s upstream answer the requests it holds."""
        for proto in self.held:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nauth")
        del self.held[:]

    async def traffic(self) -> None:
        """A few requests to C{web} and C{api}: latencies, pooled connections (no ejection: C{api} has 3 tries)."""
        for _ in range(3):
            for host, target in [(b"www.example.com", b"/"), (b"front", b"/api/users")]:
                await get(self.running.port, target, host)

    async def eject(self) -> None:
        """Send requests to C{api} until its garbage upstream is ejected (a bounded number)."""
        broken = self.upstream("api", 2)
        for _ in range(10):
            if broken.health.ejected:
                return
            await get(self.running.port, b"/api/users")
        raise AssertionError(f"{broken} was not ejected: {broken.health.state}")


def startScenario(testCase: unittest.TestCase) -> Scenario:
    """Start a L{Scenario}: its upstreams, then the proxy, from a config file."""
    held: list[Protocol] = []

    def hold(proto: Protocol, request: ReceivedRequest) -> bytes:
        held.append(proto)
        return b""

    def slower(proto: Protocol, request: ReceivedRequest) -> bytes:
        call = reactor.callLater(0.02, proto.transport.write, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nweb")
        testCase.addCleanup(lambda: call.cancel() if call.active() else None)
        return b""

    answers: dict[str, list[Callable[[Protocol, ReceivedRequest], bytes]]] = {
        "web": [answerWith(b"web"), slower],
        "api": [answerWith(b"api"), answerWith(b"api"), garbage],
        "auth": [hold],
    }
    upstreams = {name: [ScriptedUpstream(testCase, each) for each in respond] for name, respond in answers.items()}
    services = "".join(
        f"[services.{name}]\nupstreams = [{', '.join(repr(each.url) for each in listed)}]\nmax-fails = 2\n"
        for name, listed in upstreams.items()
    )
    routes = (
        '[[routes]]\nhosts = ["www.example.com"]\nservice = "web"\n'
        '[[routes]]\npath-prefix = "/api/"\nservice = "api"\n'
        '[[routes]]\npath-prefix = "/auth/"\nservice = "auth"\n'
    )
    running = startAdmin(testCase, "--config", writeConfig(testCase, services + routes))
    scenario = Scenario(running, upstreams, held)
    testCase.addCleanup(scenario.answerHeld)
    return scenario


def listenerSite(running: RunningService) -> ProxySite:
    """The site of C{running}'s admin listener."""
    [site] = [
        each.factory
        for each in running.top
        if isinstance(getattr(each, "factory", None), ProxySite) and isinstance(each.factory.resource, AdminAPI)
    ]
    return site


@dataclass
class PageRequests:
    """
    An exchange observer of the admin site: the status of each C{/status} answered; C{then} is called once
    the first page has been (its body is written: what it shows is settled).
    """

    then: Callable[[], None]
    answered: list[int | None] = field(default_factory=list)

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        if record.target != b"/status":
            return
        self.answered.append(record.status)
        if self.answered.count(200) == 1 and record.status == 200:
            self.then()


class _Elements(HTMLParser):
    """Every start tag of a page, with its attributes, and the text of its script and style elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.inline: dict[str, list[str]] = {"script": [], "style": []}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        self._open = tag if tag in self.inline else None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.inline[self._open].append(data)
            self._open = None


def elements(page: bytes) -> _Elements:
    parser = _Elements()
    parser.feed(page.decode("utf-8"))
    parser.close()
    return parser


#: The elements and attributes the page is made of: anything else would have come from the data.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "small", "span", "main"}
PAGE_TAGS |= {"section", "table", "thead", "tbody", "tr", "th", "td", "code", "br", "p", "ol", "li", "footer"}
PAGE_TAGS |= {"script"}
PAGE_ATTRIBUTES = {"lang", "charset", "name", "content", "class", "id", "data-every", "data-time"}
PAGE_ATTRIBUTES |= {"data-service", "data-upstream", "data-state"}


def rows(page: str) -> dict[str, str]:
    """The C{data-state} of each upstream's row of C{page}, by its URL."""
    return dict(re.findall(r'<tr data-upstream="([^"]*)" data-state="([^"]*)"', page))


class RecordsTests(unittest.TestCase):
    """What an upstream keeps for the page: its last error and when, and its moving average of latency."""

    def test_lastError(self) -> None:
        """Every failure is the last error (ejecting or not), a failed active check too; successes keep it."""
        clock = Clock()
        health = UpstreamHealth(clock, PassivePolicy(maxFails=3))
        self.assertEqual((health.lastError, health.lastErrorAt), ("", None))
        clock.advance(5)
        self.assertFalse(health.failed("refused"))
        self.assertEqual((health.lastError, health.lastErrorAt), ("refused", 5))
        clock.advance(1)
        health.succeeded()
        self.assertEqual((health.lastError, health.lastErrorAt), ("refused", 5))
        health.checked(HealthResult(True), rise=1, fall=1)
        self.assertEqual((health.lastError, health.lastErrorAt), ("refused", 5))
        health.checked(HealthResult(False, "GET /health: 500"), rise=1, fall=2)
        self.assertEqual((health.lastError, health.lastErrorAt, health.state), ("GET /health: 500", 6, "up"))

    def test_latency(self) -> None:
        """The first response head sets the average; each next one moves it by L{LATENCY_SMOOTHING}."""
        upstream = Upstream.fromURL("http://127.0.0.1:1", Clock(), PoolSettings())
        self.assertIsNone(upstream.latency)
        upstream.responded(0.1)
        self.assertEqual(upstream.latency, 0.1)
        upstream.responded(0.2)
        self.assertAlmostEqual(upstream.latency, 0.1 + LATENCY_SMOOTHING * 0.1)


def hostileDocument() -> StateDocument:
    """A state whose every text is markup, quotes and ampersands."""
    bad = "<script>alert(1)</script>\"'&amp;<img src=x onerror=alert(2)>"
    upstream: UpstreamState = {
        "key": "http://x/" + bad,
        "weight": 1,
        "labels": {"zone": bad},
        "state": bad,
        "reason": bad,
        "ejections": 1,
        "ejectionEndsIn": 3.0,
        "lastError": {"reason": bad, "at": 100.0},
        "inFlight": 0,
        "pool": {"open": 0, "idle": 0},
        "latency": None,
        "balancer": {bad: bad},
        "registration": {"id": bad, "service": bad, "key": bad, "weight": 1, "ttl": 3.0, "expiresIn": 2.0},
    }
    return {
        "shuttingDown": True,
        "services": [{"name": bad, "balancer": bad, "upstreams": [upstream]}],
        "routes": [{"description": bad}],
        "tunnels": {"open": 0, "opened": 0},
        "stores": [{"store": bad, "url": bad, "up": False, "since": 100.0, "error": bad, "fallback": bad}],
    }


class RenderTests(unittest.TestCase):
    """L{statusPage} without a proxy: escaping, and the policy that lets only its own script and style run."""

    def test_escaped(self) -> None:
        """Markup in any text of the state stays text: the page has only its own elements and attributes."""
        page = statusPage(hostileDocument(), 103.0)
        found = elements(page)
        self.assertLessEqual({tag for tag, _ in found.tags}, PAGE_TAGS)
        self.assertLessEqual({name for _, attrs in found.tags for name, _ in attrs}, PAGE_ATTRIBUTES)
        self.assertEqual([tag for tag, _ in found.tags].count("script"), 1)
        self.assertNotIn(b"<img", page)
        self.assertIn(b"&lt;img src=x onerror=alert(2)&gt;", page)
        self.assertIn(b"&quot;&#x27;&amp;amp;", page)
        self.assertIn(b"shutting down", page)

    def test_policy(self) -> None:
        """The Content-Security-Policy allows the page's inline script and style by their hashes, and nothing else."""
        found = elements(statusPage(hostileDocument(), 0.0))
        policy = PAGE_HEADERS[b"content-security-policy"].decode()
        directives = dict(each.strip().split(" ", 1) for each in policy.split(";"))
        for kind, directive in [("script", "script-src"), ("style", "style-src")]:
            [text] = found.inline[kind]
            digest = b64encode(sha256(text.encode()).digest()).decode()
            self.assertEqual(directives[directive], f"'sha256-{digest}'")
        self.assertEqual(directives["default-src"], "'none'")
        self.assertEqual(directives["connect-src"], "'self'")
        self.assertEqual(directives["frame-ancestors"], "'none'")


class PageTests(unittest.TestCase):
    """C{GET /status} on a real admin listener, as curl or a browser without JavaScript gets it."""

    def setUp(self) -> None:
        self.scenario = startScenario(self)
        self.client = AdminClient(self, self.scenario.running.adminURL, token=None)

    async def test_state(self) -> None:
        """
        Every service, route and upstream with its state; the ejected upstream shows "ejected", its last error
        (quoting the garbage it sent, escaped) and its time; latencies and pools once traffic went through;
        the request in flight.
        """
        scenario = self.scenario
        await scenario.traffic()
        await scenario.eject()
        held = defer.ensureDeferred(get(scenario.running.port, b"/auth/login"))
        self.assertTrue(await waitFor(lambda: scenario.held))
        answer = await self.client.request("GET", "/status", authorization=basic(TOKEN))
        self.assertEqual(answer.status, 200)
        page = answer.body.decode("utf-8")
        for name in ["web", "api", "auth"]:
            self.assertIn(f'<section data-service="{name}"><h2>{name} <small>round_robin', page)
        for route in ["www.example.com -&gt; service web", "any host/api/ -&gt; service api", "/auth/ -&gt;"]:
            self.assertIn(route, page)
        broken = scenario.upstreams["api"][2].url
        expected = {each.url: "up" for listed in scenario.upstreams.values() for each in listed}
        self.assertEqual(rows(page), expected | {broken: "ejected"})
        row = page[page.index(f'<tr data-upstream="{broken}"') :].split("</tr>")[0]
        self.assertIn(">ejected</span>", row)
        self.assertRegex(row, r"\d+ s left")
        error = f"upstream 127.0.0.1:{scenario.upstreams['api'][2].port} sent a bad response: malformed status line"
        self.assertIn(error, row)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;", row)
        self.assertRegex(row, r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, \d+ s ago")
        self.assertNotIn("<img", page)
        self.assertIn('<span class="count">2 of 3 up</span>', page)
        web = page[page.index(f'<tr data-upstream="{scenario.upstreams["web"][1].url}"') :].split("</tr>")[0]
        self.assertRegex(web, r'<td class="number">\d+(\.\d+)? ms</td>')
        auth = page[page.index(f'<tr data-upstream="{scenario.upstreams["auth"][0].url}"') :].split("</tr>")[0]
        self.assertIn('<td class="number">1</td><td class="number">1 / 0</td>', auth)
        scenario.answerHeld()
        self.assertEqual((await held)[1], b"auth")
        [api] = [
            each
            for each in (await self.client.request("GET", "/state", authorization=f"Bearer {TOKEN}")).json()["services"]
            if each["name"] == "api"
        ]
        self.assertIn(GARBAGE.decode(), api["upstreams"][2]["lastError"]["reason"])

    async def test_headers(self) -> None:
        """Served as HTML that is never cached, framed, sniffed or sent a referrer; HEAD too, without a body."""
        for method in ["GET", "HEAD"]:
            answer = await self.client.request(method, "/status", authorization=basic(TOKEN))
            self.assertEqual(answer.status, 200)
            for name, value in PAGE_HEADERS.items():
                self.assertEqual(answer.headers[name.decode()], [value.decode()])
            self.assertEqual(bool(answer.body), method == "GET")
        answer = await self.client.request("POST", "/status", authorization=basic(TOKEN))
        self.assertEqual((answer.status, answer.headers["allow"]), (405, ["GET, HEAD"]))


class AuthenticationTests(unittest.TestCase):
    """
    The page takes the token as a bearer token or as the password of HTTP Basic (browsers ask for it);
    the rest of the API takes only the bearer token, so that a browser's remembered password cannot be
    used by another site's page to change anything.
    """

    def setUp(self) -> None:
        self.running = startAdmin(self, "--upstream", ScriptedUpstream(self, answerWith(b"up")).url)
        self.client = AdminClient(self, self.running.adminURL, token=None)

    async def assertChallenged(self, authorization: str | None, reason: str) -> None:
        answer = await self.client.request("GET", "/status", authorization=authorization)
        self.assertEqual(answer.status, 401, authorization)
        self.assertEqual(answer.headers["www-authenticate"], ['Basic realm="rproxy-admin", charset="UTF-8"'])
        self.assertEqual(answer.json(), {"error": reason})
        self.assertEqual(answer.headers["x-content-type-options"], ["nosniff"])

    async def test_signIn(self) -> None:
        """Any user name (or none) with the token as the password; the bearer token as the API takes it."""
        for authorization in [basic(TOKEN), basic(TOKEN, user=""), basic(TOKEN, "caf\u00e9"), f"Bearer {TOKEN}"]:
            answer = await self.client.request("GET", "/status", authorization=authorization)
            self.assertEqual(answer.status, 200, authorization)

    async def test_refused(self) -> None:
        """
        No credentials, malformed ones or a wrong password: 401 with the challenge that makes a browser ask
        again; a wrong password is logged (never the password); a wrong bearer token is 403, as elsewhere.
        """
        events = captureLog(self)
        await self.assertChallenged(None, "sign in with any user name and the admin token as the password")
        for malformed in ["Basic !!!", "Basic " + b64encode(TOKEN.encode()).decode()]:
            await self.assertChallenged(malformed, "malformed Basic credentials: expected base64 of NAME:PASSWORD")
        await self.assertChallenged("Digest x", "expected Authorization: Bearer <token>")
        await self.assertChallenged(basic(TOKEN + "x"), "the password is not the admin token")
        logged = [formatEvent(event) for event in events]
        self.assertTrue(any("admin API: a request with a wrong Basic password from" in line for line in logged))
        self.assertFalse(any(TOKEN in repr(event) for event in events))
        answer = await self.client.request("GET", "/status", authorization=f"Bearer {TOKEN}x")
        self.assertEqual(answer.status, 403)

    async def test_notForTheAPI(self) -> None:
        """The password is refused everywhere but the page: reading the state, and registering."""
        answer = await self.client.request("GET", "/state", authorization=basic(TOKEN))
        self.assertEqual((answer.status, answer.headers["www-authenticate"]), (401, ['Bearer realm="rproxy-admin"']))
        answer = await self.client.request(
            "POST", "/services/default/upstreams", {"url": "http://127.0.0.1:9", "ttl": 30}, authorization=basic(TOKEN)
        )
        self.assertEqual(answer.status, 401)
        state = (await self.client.request("GET", "/state", authorization=f"Bearer {TOKEN}")).json()
        self.assertEqual(len(state["services"][0]["upstreams"]), 1)


class BrowserTests(unittest.TestCase):
    """The page in Debian's headless Chromium, signed in with the password, over a real admin listener."""

    timeout = 60

    async def test_liveRefresh(self) -> None:
        """
        The upstream that answers garbage is ejected once the browser has the page: the page refreshes
        itself (through the same credentials) and shows it ejected, with its error as text.
        """
        scenario = startScenario(self)
        await scenario.traffic()
        broken = scenario.upstream("api", 2)
        changed: list[float] = []

        def eject() -> None:
            reason = f"upstream 127.0.0.1:{scenario.upstreams['api'][2].port} sent {GARBAGE.decode()}"
            for _ in range(broken.health.policy.maxFails):
                scenario.live.registry.failure("api", broken, reason)
            changed.append(reactor.seconds())

        watched = PageRequests(eject)
        listenerSite(scenario.running).observers.append(watched)
        dom = await dumpDOM(self, scenario.pageURL())
        self.assertEqual(broken.health.state, "ejected")
        # The browser sends the credentials of the URL when challenged (401), then with every fetch.
        signedIn = watched.answered[watched.answered.index(200) :]
        self.assertGreaterEqual(len(signedIn), 2, "the page never fetched itself again")
        self.assertEqual(set(signedIn), {200})
        self.assertIn('<span id="live" class="live" data-every="2">live, every 2 s</span>', dom)
        [shown] = re.findall(r'<main id="status" data-time="([0-9.]+)">', dom)
        self.assertGreaterEqual(float(shown), changed[0])
        self.assertEqual(rows(dom)[broken.key], "ejected")
        self.assertIn("sent &lt;img src=x onerror=alert(1)&gt;", dom)
        self.assertNotIn("<img", dom)


#: Where L{ScreenshotTests} also copies its screenshot when set (docs/tools/status_screenshot.py sets it).
SCREENSHOT_COPY = "RPROXY_STATUS_SCREENSHOT"

#: The browser window of the screenshot.
WINDOW = (1200, 800)


def pngSize(data: bytes) -> tuple[int, int]:
    """The width and height of the PNG image C{data}; C{AssertionError} if it is not one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {data[:8]!r}"
    assert data[12:16] == b"IHDR", "a PNG starts with its IHDR chunk"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class ScreenshotTests(unittest.TestCase):
    """A screenshot of the page, as docs/admin.md shows it."""

    timeout = 60

    async def test_screenshot(self) -> None:
        """Three services, one upstream ejected, one request in flight: a PNG of the window's size."""
        scenario = startScenario(self)
        await scenario.traffic()
        await scenario.eject()
        held = defer.ensureDeferred(get(scenario.running.port, b"/auth/login"))
        self.assertTrue(await waitFor(lambda: scenario.held))
        path = os.path.abspath(self.mktemp() + ".png")
        width, height = WINDOW
        await chromium(
            self, ["--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={path}", scenario.pageURL()]
        )
        scenario.answerHeld()
        await held
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(pngSize(data), WINDOW)
        self.assertLess(len(data), 200_000)
        copy = os.environ.get(SCREENSHOT_COPY)
        if copy:
            shutil.copyfile(path, copy)
