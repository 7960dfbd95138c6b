"""
L{rproxy.app.admin}: the local routes of the proxy's listeners (health, readiness, resources a user mounts),
answered by rproxy and never proxied, and the admin listener; real sockets, a real client (treq) and a
proxy built as C{twist rproxy} builds it.
"""

from __future__ import annotations

import json
import os
import re
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import treq
from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import formatEvent
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web import server, static
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource

from rproxy.app.admin import AdminSettings, LocalRoutes
from rproxy.app.reload import ConfigReloader
from rproxy.app.tap import Options, buildService, reloadSource
from rproxy.downstream.site import ProxySite
from rproxy.proxy.resource import ReverseProxyResource
from rproxy.test.support import (
    ScriptedUpstream,
    freePort,
    headerValues,
    listen,
    rawRequest,
    responseStatus,
    sleep,
    splitResponses,
    waitFor,
)
from rproxy.test.test_config import answerWith, writeConfig
from rproxy.test.test_drain import ROOT, startExchange
from rproxy.test.test_healthcheck import captureLog
from rproxy.test.test_reload import rewrite, slowly

HEALTH = "/_rproxy/health"
READY = "/_rproxy/ready"
TOKEN = "s3cr3t-T0ken_for.tests~+/=="


@dataclass
class RunningService:
    """A proxy built by L{buildService} from command-line arguments, started in this process."""

    top: MultiService
    port: int
    adminPort: int | None = None

    @property
    def adminURL(self) -> str:
        return f"http://127.0.0.1:{self.adminPort}"

    @property
    def reloader(self) -> ConfigReloader:
        reloader = self.top.getServiceNamed("config-reloader")
        assert isinstance(reloader, ConfigReloader)
        return reloader

    def reload(self, path: str, text: str) -> None:
        """Rewrite the config file at C{path} with C{text} and reload it, as SIGHUP would."""
        rewrite(path, text)
        assert self.reloader.reload("a test") is not None, "the reload was refused"


async def request(port: int, target: bytes, method: bytes = b"GET", body: bytes | None = None) -> tuple[bytes, bytes]:
    """The head and body of the response to C{method target} (with C{body}) sent to 127.0.0.1:C{port}."""
    length = b"" if body is None else b"Content-Length: %d\r\n" % len(body)
    payload = method + b" " + target + b" HTTP/1.1\r\nHost: front\r\n" + length + b"Connection: close\r\n\r\n"
    [response] = splitResponses(await rawRequest(port, payload + (body or b"")))
    return response


def startService(testCase: unittest.TestCase, *arguments: str) -> RunningService:
    """C{twist rproxy ARGUMENTS} built by L{buildService}, listening on a loopback port until the test ends."""
    port = freePort()
    options = Options()
    listen = f"tcp:{port}:interface=127.0.0.1"
    options.parseOptions(["--listen", listen, "--access-log", "off", "--grace", "1", *arguments])
    top = buildService(options.config, reactor, reloadSource(options), admin=options.admin)
    top.startService()

    def stop() -> defer.Deferred[object] | None:
        return defer.maybeDeferred(top.stopService) if top.running else None

    testCase.addCleanup(stop)
    return RunningService(top, port)


def tokenFile(testCase: unittest.TestCase, content: str = TOKEN + "\n") -> str:
    """A file holding C{content} (the token, by default); its path."""
    path = os.path.abspath(testCase.mktemp())
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
    return path


def startAdmin(testCase: unittest.TestCase, *arguments: str) -> RunningService:
    """L{startService} with the admin API on a loopback port of its own, with the token L{TOKEN}."""
    adminPort = freePort()
    running = startService(
        testCase,
        "--admin-listen",
        f"tcp:{adminPort}:interface=127.0.0.1",
        "--admin-token-file",
        tokenFile(testCase),
        *arguments,
    )
    running.adminPort = adminPort
    return running


@dataclass
class Answer:
    """A response read whole by treq: its status, fields and body."""

    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AdminClient:
    """A real HTTP client (treq, connections closed after each request) of an admin API."""

    def __init__(self, testCase: unittest.TestCase, url: str, token: str | None = TOKEN) -> None:
        self.url = url
        self.token = token
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        testCase.addCleanup(self.pool.closeCachedConnections)

    async def request(
        self, method: str, path: str, body: object = None, authorization: str | None = None, raw: bytes | None = None
    ) -> Answer:
        """C{method path} with C{body} as JSON (or C{raw} bytes), authorized with the token unless told otherwise."""
        headers: dict[bytes | str, bytes | str] = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        elif self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        response = await treq.request(method, self.url + path, headers=headers, data=data, pool=self.pool)
        content = await response.content()
        fields = {
            name.decode().lower(): [v.decode() for v in values] for name, values in response.headers.getAllRawHeaders()
        }
        return Answer(response.code, fields, content)


def slowCalls(testCase: unittest.TestCase) -> list[IDelayedCall]:
    """A list for L{slowly}'s delayed answers, those still pending cancelled when the test ends."""
    calls: list[IDelayedCall] = []

    def cancel() -> None:
        for call in calls:
            if call.active():
                call.cancel()

    testCase.addCleanup(cancel)
    return calls


class OptionsTests(unittest.TestCase):
    """The local routes' options: paths, checked and named in errors."""

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:1", *arguments])
        return options

    def test_defaults(self) -> None:
        """No local routes unless asked for."""
        self.assertEqual(self.parse().admin, AdminSettings())

    def test_routes(self) -> None:
        options = self.parse("--health-route", HEALTH, "--ready-route", READY)
        self.assertEqual(options.admin, AdminSettings(healthRoute=HEALTH.encode(), readyRoute=READY.encode()))

    def test_badRoutes(self) -> None:
        for arguments, expected in [
            (("--health-route", "health"), "--health-route: expected an absolute path"),
            (("--health-route", "/a b"), "--health-route: expected an absolute path"),
            (("--ready-route", "/ready?x=1"), "--ready-route: expected an absolute path"),
            (("--ready-route", "/r\u00e9"), "--ready-route: expected an absolute path"),
            (("--health-route", "/h", "--ready-route", "/h"), "--ready-route: must differ from --health-route"),
        ]:
            with self.assertRaises(UsageError, msg=arguments) as raised:
                self.parse(*arguments)
            self.assertIn(expected, str(raised.exception))

    def test_fromFile(self) -> None:
        """A config file's key names itself in the error."""
        path = writeConfig(self, 'upstream = ["http://127.0.0.1:1"]\nhealth-route = "nope"\n')
        with self.assertRaises(UsageError) as raised:
            Options().parseOptions(["--config", path])
        self.assertIn(f"{path}: health-route: expected an absolute path", str(raised.exception))
        path = writeConfig(self, f'upstream = ["http://127.0.0.1:1"]\nready-route = "{READY}"\n')
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.admin.readyRoute, READY.encode())


class HealthRouteTests(unittest.TestCase):
    """C{--health-route}: answered by rproxy; every other path is proxied as before."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, answerWith(b"upstream"))
        self.proxy = startService(self, "--upstream", self.upstream.url, "--health-route", HEALTH)

    async def test_answeredLocally(self) -> None:
        for target in [HEALTH.encode(), HEALTH.encode() + b"?probe=1"]:
            head, body = await request(self.proxy.port, target)
            self.assertEqual((responseStatus(head), body), (200, b"ok\n"), target)
            self.assertEqual(headerValues(head, b"content-type"), [b"text/plain; charset=utf-8"])
            self.assertEqual(headerValues(head, b"cache-control"), [b"no-store"])
        head, body = await request(self.proxy.port, HEALTH.encode(), b"HEAD")
        self.assertEqual((responseStatus(head), body, headerValues(head, b"content-length")), (200, b"", [b"3"]))
        self.assertEqual(self.upstream.requests, [])

    async def test_otherMethods(self) -> None:
        """Other methods get 405 from rproxy (the body read and dropped), not the upstream's answer."""
        head, body = await request(self.proxy.port, HEALTH.encode(), b"POST", b"data")
        self.assertEqual((responseStatus(head), headerValues(head, b"allow")), (405, [b"GET, HEAD"]))
        self.assertEqual(self.upstream.requests, [])

    async def test_otherPathsProxied(self) -> None:
        """Paths that are not exactly the route go upstream, their request-target untouched."""
        targets = [
            b"/",
            b"/other?q=%41",
            HEALTH.encode() + b"/",
            b"/_rproxy/%68ealth",
            b"/_rproxy",
            b"/_rproxy/healthz",
        ]
        for target in targets:
            head, body = await request(self.proxy.port, target)
            self.assertEqual((responseStatus(head), body), (200, b"upstream"), target)
        self.assertEqual([r.requestLine for r in self.upstream.requests], [b"GET " + t + b" HTTP/1.1" for t in targets])


class ReadyRouteTests(unittest.TestCase):
    """C{--ready-route}: 200 when every service has an upstream available, 503 saying why not otherwise."""

    async def test_ready(self) -> None:
        upstream = ScriptedUpstream(self, answerWith(b"upstream"))
        proxy = startService(self, "--upstream", upstream.url, "--ready-route", READY, "--health-route", HEALTH)
        head, body = await request(proxy.port, READY.encode())
        self.assertEqual((responseStatus(head), body), (200, b"ready\n"))
        self.assertEqual(headerValues(head, b"cache-control"), [b"no-store"])
        self.assertEqual(upstream.requests, [])

    async def test_ejected(self) -> None:
        """A service whose only upstream is ejected makes rproxy unready, and the reason says so."""
        dead = f"http://127.0.0.1:{freePort()}"
        proxy = startService(self, "--upstream", dead, "--ready-route", READY, "--max-fails", "1")
        head, body = await request(proxy.port, READY.encode())
        self.assertEqual((responseStatus(head), body), (200, b"ready\n"))
        head, _ = await request(proxy.port, b"/anything")
        self.assertIn(responseStatus(head), (502, 503))  # 503 when the retry finds no other upstream
        head, body = await request(proxy.port, READY.encode())
        self.assertEqual(responseStatus(head), 503)
        self.assertEqual(body, b"not ready: service default has no upstream available (1 ejected)\n")

    async def test_namesTheServiceDown(self) -> None:
        """With several services, the reason names those without an upstream, and only them."""
        live = ScriptedUpstream(self, answerWith(b"live"))
        dead = f"http://127.0.0.1:{freePort()}"
        path = writeConfig(
            self,
            f'[services.web]\nupstreams = ["{live.url}"]\n'
            f'[services.api]\nupstreams = ["{dead}"]\nhealth-path = "/h"\nhealth-interval = 0.05\n'
            "health-fall = 1\n"
            '[[routes]]\npath-prefix = "/api/"\nservice = "api"\n[[routes]]\nservice = "web"\n',
        )
        proxy = startService(self, "--config", path, "--ready-route", READY)
        for _ in range(200):
            head, body = await request(proxy.port, READY.encode())
            if responseStatus(head) == 503:
                break
        self.assertEqual(responseStatus(head), 503, body)
        self.assertEqual(body, b"not ready: service api has no upstream available (1 down)\n")
        self.assertEqual(live.requests, [])

    async def test_shuttingDown(self) -> None:
        """From the moment rproxy starts to shut down, a request to the route gets 503 (here, one in flight)."""
        upstream = ScriptedUpstream(self, answerWith(b"upstream"))
        proxy = startService(self, "--upstream", upstream.url, "--ready-route", READY)
        head = (
            b"GET " + READY.encode() + b" HTTP/1.1\r\nHost: front\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n"
        )
        exchange = await startExchange(self, proxy.port, head)
        self.assertTrue(await waitFor(lambda: exchange.received))  # the head is in: 100 Continue
        stopped = proxy.top.stopService()
        exchange.transport.write(b"x")
        await stopped
        [(interim, _), (head, body)] = splitResponses(exchange.received)
        self.assertEqual(responseStatus(interim), 100)
        self.assertEqual((responseStatus(head), body), (503, b"not ready: rproxy is shutting down\n"))


class MountedTests(unittest.TestCase):
    """L{LocalRoutes} in front of a L{ReverseProxyResource}, in a user's own site."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, answerWith(b"upstream"))

    def root(self) -> LocalRoutes:
        class Echo(Resource):
            """Answers a POST with its body: the body was read before the resource rendered."""

            isLeaf = True

            def render_POST(self, request: server.Request) -> bytes:
                assert request.content is not None
                return b"echo " + request.content.read()

        mine = static.Data(b"mine", "text/plain")
        proxy = ReverseProxyResource("127.0.0.1", self.upstream.port, b"/base")
        return LocalRoutes({b"/status": mine, b"/echo": Echo()}, proxy)

    async def check(self, port: int) -> None:
        head, body = await request(port, b"/status")
        self.assertEqual((responseStatus(head), body), (200, b"mine"))
        head, body = await request(port, b"/echo", b"POST", b"hello")
        self.assertEqual((responseStatus(head), body), (200, b"echo hello"))
        head, body = await request(port, b"/status/x?y")
        self.assertEqual((responseStatus(head), body), (200, b"upstream"))
        self.assertEqual([r.requestLine for r in self.upstream.requests], [b"GET /base/status/x?y HTTP/1.1"])

    async def test_plainSite(self) -> None:
        await self.check(listen(self, server.Site(self.root())).port)

    async def test_proxySite(self) -> None:
        await self.check(listen(self, ProxySite(self.root())).port)


class AdminOptionsTests(unittest.TestCase):
    """C{--admin-listen} and C{--admin-token-file}: both or neither, an address given, a token read."""

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:1", *arguments])
        return options

    def error(self, *arguments: str) -> str:
        with self.assertRaises(UsageError, msg=arguments) as raised:
            self.parse(*arguments)
        return str(raised.exception)

    def test_settings(self) -> None:
        """The token is read from the file, without its line end, and never shown in the settings' repr."""
        options = self.parse("--admin-listen", "tcp:9901:interface=127.0.0.1", "--admin-token-file", tokenFile(self))
        self.assertEqual((options.admin.listen, options.admin.token), ("tcp:9901:interface=127.0.0.1", TOKEN.encode()))
        self.assertNotIn(TOKEN, repr(options.admin))
        unix = self.parse("--admin-listen", "unix:/run/rproxy/admin.sock", "--admin-token-file", tokenFile(self))
        self.assertEqual(unix.admin.listen, "unix:/run/rproxy/admin.sock")

    def test_bothOrNeither(self) -> None:
        self.assertIn(
            "--admin-listen: needs --admin-token-file", self.error("--admin-listen", "tcp:9901:interface=127.0.0.1")
        )
        self.assertIn(
            "--admin-token-file: has no use without --admin-listen",
            self.error("--admin-token-file", tokenFile(self)),
        )

    def test_address(self) -> None:
        """An IP endpoint must say which address; a malformed endpoint is refused, saying why."""
        token = ("--admin-token-file", tokenFile(self))
        for endpoint in ["tcp:9901", "tcp6:9901", "tcp:9901:backlog=5"]:
            self.assertIn(
                "--admin-listen: give the address to listen on", self.error("--admin-listen", endpoint, *token)
            )
        for endpoint in ["tcp:x:interface=127.0.0.1", "tcp:9901:interfac=127.0.0.1"]:
            self.assertIn("--admin-listen: not a server endpoint", self.error("--admin-listen", endpoint, *token))
        for endpoint, kind in [("9901", "9901"), ("bogus:1", "bogus")]:
            self.assertIn(
                f"--admin-listen: unknown endpoint type {kind!r} in {endpoint!r}",
                self.error("--admin-listen", endpoint, *token),
            )

    def test_badTokenFiles(self) -> None:
        """A token file that cannot be read, is empty or holds more than a token; the error never shows it."""
        listen = ("--admin-listen", "tcp:9901:interface=127.0.0.1")
        missing = os.path.abspath(self.mktemp())
        self.assertIn(
            f"--admin-token-file: cannot read {missing}: No such file or directory",
            self.error(*listen, "--admin-token-file", missing),
        )
        self.assertIn("is empty", self.error(*listen, "--admin-token-file", tokenFile(self, " \n")))
        for content in ["tw0 w0rds\n", "l1neA\nl1neB\n", "caf\u00e9\n"]:
            message = self.error(*listen, "--admin-token-file", tokenFile(self, content))
            self.assertIn("does not hold a bearer token", message)
            self.assertNotIn(content[:3], message)


class AdminAuthenticationTests(unittest.TestCase):
    """Every admin request needs the bearer token: none is 401 (with a challenge), a wrong one 403."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, answerWith(b"upstream"))
        self.proxy = startAdmin(self, "--upstream", self.upstream.url)

    async def test_missing(self) -> None:
        client = AdminClient(self, self.proxy.adminURL, token=None)
        for authorization in [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer ", TOKEN]:
            answer = await client.request("GET", "/state", authorization=authorization)
            self.assertEqual(answer.status, 401, authorization)
            self.assertEqual(answer.headers["www-authenticate"], ['Bearer realm="rproxy-admin"'])
            self.assertEqual(answer.headers["content-type"], ["application/json"])
            self.assertEqual(list(answer.json()), ["error"])
            self.assertIn("Authorization: Bearer <token>", answer.json()["error"])

    async def test_wrong(self) -> None:
        """A wrong token is refused and logged, the token itself never."""
        events = captureLog(self)
        client = AdminClient(self, self.proxy.adminURL, token=TOKEN + "x")
        for path in ["/state", "/nowhere"]:
            answer = await client.request("GET", path)
            self.assertEqual(
                (answer.status, answer.json()), (403, {"error": "the bearer token is not the admin token"})
            )
            self.assertNotIn("www-authenticate", answer.headers)
        logged = [formatEvent(event) for event in events]
        self.assertTrue(any("admin API: a request with a wrong bearer token" in line for line in logged), logged)
        self.assertFalse(any(TOKEN in repr(event) for event in events))

    async def test_schemeCaseInsensitive(self) -> None:
        client = AdminClient(self, self.proxy.adminURL)
        answer = await client.request("GET", "/state", authorization=f"bearer {TOKEN}")
        self.assertEqual(answer.status, 200)


class StateTests(unittest.TestCase):
    """C{GET /state}: the services, their upstreams (health, load, pool) and the routes, as they are now."""

    async def test_oneService(self) -> None:
        calls = slowCalls(self)
        upstream = ScriptedUpstream(self, slowly(0.5, calls))
        proxy = startAdmin(self, "--upstream", upstream.url + "#weight=3&zone=eu-1", "--balancer", "least_conn")
        client = AdminClient(self, proxy.adminURL)
        answer = await client.request("GET", "/state")
        self.assertEqual((answer.status, answer.headers["content-type"]), (200, ["application/json"]))
        self.assertEqual(answer.headers["cache-control"], ["no-store"])
        upstreamState = {
            "key": upstream.url,
            "weight": 3,
            "labels": {"zone": "eu-1"},
            "state": "up",
            "reason": None,
            "ejections": 0,
            "ejectionEndsIn": None,
            "lastError": None,
            "inFlight": 0,
            "pool": {"open": 0, "idle": 0},
            "latency": None,
            "balancer": None,
            "registration": None,
        }
        self.assertEqual(
            answer.json(),
            {
                "shuttingDown": False,
                "services": [{"name": "default", "balancer": "least_conn", "upstreams": [upstreamState]}],
                "routes": [{"description": "any host -> service default"}],
                "tunnels": {
                    "open": 0,
                    "opened": 0,
                    "bytesFromClients": 0,
                    "bytesFromUpstreams": 0,
                    "messagesFromClients": 0,
                    "messagesFromUpstreams": 0,
                    "closedByLimits": 0,
                    "closedIdle": 0,
                },
                "stores": [],
            },
        )
        inFlight = defer.ensureDeferred(request(proxy.port, b"/slow"))
        self.assertTrue(await waitFor(lambda: upstream.requests))
        [service] = (await client.request("GET", "/state")).json()["services"]
        self.assertEqual(service["upstreams"][0] | {}, upstreamState | {"inFlight": 1, "pool": {"open": 1, "idle": 0}})
        self.assertEqual((await inFlight)[1], b"slow")
        [service] = (await client.request("GET", "/state")).json()["services"]
        self.assertEqual(service["upstreams"][0]["inFlight"], 0)
        self.assertGreaterEqual(service["upstreams"][0]["latency"], 0.5)
        self.assertIsNone(service["upstreams"][0]["balancer"], "least_conn learns nothing to show")

    async def test_balancerState(self) -> None:
        """A balancer that shows what it learnt (IBalancerState): ewma's latency estimate of each upstream."""
        calls = slowCalls(self)
        slow, fast = ScriptedUpstream(self, slowly(0.3, calls)), ScriptedUpstream(self, answerWith(b"fast"))
        proxy = startAdmin(self, "--upstream", slow.url, "--upstream", fast.url + "#canary=true", "--balancer", "ewma")
        client = AdminClient(self, proxy.adminURL)
        [service] = (await client.request("GET", "/state")).json()["services"]
        self.assertEqual([u["balancer"] for u in service["upstreams"]], [None, None], "nothing learnt yet")
        # Two at once: whichever is picked first has one in flight, so the other takes the second request.
        await defer.gatherResults([defer.ensureDeferred(request(proxy.port, b"/x")) for _ in range(2)])
        self.assertEqual((len(slow.requests), len(fast.requests)), (1, 1))
        [service] = (await client.request("GET", "/state")).json()["services"]
        learnt = {u["key"]: u["balancer"] for u in service["upstreams"]}
        self.assertEqual(
            {u["key"]: u["labels"] for u in service["upstreams"]}, {slow.url: {}, fast.url: {"canary": "true"}}
        )
        self.assertGreater(learnt[slow.url]["latency_ms"], 250)
        self.assertLess(learnt[fast.url]["latency_ms"], 250)
        self.assertGreater(learnt[slow.url]["cost"], learnt[fast.url]["cost"])

    async def test_servicesAndRoutes(self) -> None:
        """Several services from a file, one ejected with its reason; the routes in order."""
        live = ScriptedUpstream(self, answerWith(b"live"))
        dead = f"http://127.0.0.1:{freePort()}"
        path = writeConfig(
            self,
            f'[services.web]\nupstreams = ["{live.url}"]\n'
            f'[services.api]\nupstreams = ["{dead}"]\nbalancer = "random"\nmax-fails = 1\n'
            '[[routes]]\npath-prefix = "/api/"\nservice = "api"\n'
            '[[routes]]\nhosts = ["www.example"]\nservice = "web"\n',
        )
        proxy = startAdmin(self, "--config", path)
        head, _ = await request(proxy.port, b"/api/x")
        self.assertIn(responseStatus(head), (502, 503))
        document = (await AdminClient(self, proxy.adminURL).request("GET", "/state")).json()
        self.assertEqual(
            [(s["name"], s["balancer"]) for s in document["services"]], [("web", "round_robin"), ("api", "random")]
        )
        [api] = document["services"][1]["upstreams"]
        self.assertEqual((api["key"], api["state"]), (dead, "ejected"))
        self.assertIn("connect", api["reason"])
        self.assertEqual(
            document["routes"],
            [{"description": "any host/api/ -> service api"}, {"description": "www.example -> service web"}],
        )

    async def test_notProxied(self) -> None:
        """The admin listener proxies nothing, and the proxy's listeners do not answer the admin API."""
        upstream = ScriptedUpstream(self, answerWith(b"upstream"))
        proxy = startAdmin(self, "--upstream", upstream.url)
        client = AdminClient(self, proxy.adminURL)
        answer = await client.request("GET", "/anything")
        self.assertEqual(answer.status, 404)
        self.assertEqual(answer.json(), {"error": "no such resource: /anything (see docs/admin.md)"})
        answer = await client.request("POST", "/state", {})
        self.assertEqual((answer.status, answer.headers["allow"]), (405, ["GET, HEAD"]))
        self.assertEqual(upstream.requests, [])
        head, body = await request(proxy.port, b"/state")
        self.assertEqual(body, b"upstream")


def upstreamsOf(document: dict[str, Any], service: str = "default") -> list[dict[str, Any]]:
    """The upstreams of C{service} in a C{GET /state} document."""
    [found] = [each for each in document["services"] if each["name"] == service]
    return list(found["upstreams"])


async def bodies(port: int, target: bytes, count: int) -> list[bytes]:
    """The bodies of C{count} requests for C{target}, one after the other."""
    return [(await request(port, target))[1] for _ in range(count)]


class RegistrationTests(unittest.TestCase):
    """
    Service instances register themselves (C{POST /services/NAME/upstreams}), renew (C{PUT}) and leave
    (C{DELETE}, or an expired TTL); a live proxy sends requests to them meanwhile, and not after.
    """

    def setUp(self) -> None:
        self.configured = ScriptedUpstream(self, answerWith(b"configured"))
        self.instance = ScriptedUpstream(self, answerWith(b"instance"))
        self.proxy = startAdmin(self, "--upstream", self.configured.url)
        self.client = AdminClient(self, self.proxy.adminURL)

    async def register(self, url: str, ttl: float, service: str = "default") -> Answer:
        return await self.client.request("POST", f"/services/{service}/upstreams", {"url": url, "ttl": ttl})

    async def state(self) -> dict[str, Any]:
        answer = await self.client.request("GET", "/state")
        self.assertEqual(answer.status, 200)
        document: dict[str, Any] = answer.json()
        return document

    async def test_register(self) -> None:
        answer = await self.register(self.instance.url, 30)
        self.assertEqual(answer.status, 201, answer.body)
        registration = answer.json()
        self.assertRegex(registration.pop("id"), "^[0-9a-f]{16}$")
        expiresIn = registration.pop("expiresIn")
        self.assertTrue(29 < expiresIn <= 30, expiresIn)
        self.assertEqual(registration, {"service": "default", "key": self.instance.url, "weight": 1, "ttl": 30.0})
        id = answer.json()["id"]
        self.assertEqual(answer.headers["location"], [f"/services/default/upstreams/{id}"])

        self.assertEqual(sorted(await bodies(self.proxy.port, b"/x", 4)), [b"configured"] * 2 + [b"instance"] * 2)
        [configured, instance] = upstreamsOf(await self.state())
        self.assertEqual((configured["key"], configured["registration"]), (self.configured.url, None))
        self.assertEqual(
            (instance["key"], instance["state"], instance["registration"]["id"]), (self.instance.url, "up", id)
        )

        again = await self.register(self.instance.url, 60)
        self.assertEqual((again.status, again.json()["id"], again.json()["ttl"]), (200, id, 60.0))
        self.assertEqual(len(upstreamsOf(await self.state())), 2)

    async def test_conflicts(self) -> None:
        """A configured upstream cannot be registered; a registered one cannot change its weight."""
        answer = await self.register(self.configured.url, 30)
        self.assertEqual(answer.status, 409)
        self.assertEqual(
            answer.json(), {"error": f"{self.configured.url} is already an upstream of service default (configured)"}
        )
        id = (await self.register(self.instance.url + "#weight=2", 30)).json()["id"]
        answer = await self.register(self.instance.url, 30)
        self.assertEqual(answer.status, 409)
        self.assertIn(f"with weight 2 (id {id}): deregister it first", answer.json()["error"])

    async def test_badInput(self) -> None:
        """Each mistake gets 400 (404 for what does not exist, 405 for a wrong method) saying what is wrong."""
        url = self.instance.url
        cases: list[tuple[str, str, bytes | None, int, str]] = [
            (
                "POST",
                "/services/nope/upstreams",
                b'{"url": "%s", "ttl": 30}' % url.encode(),
                404,
                "no service named 'nope' (services: default)",
            ),
            ("POST", "/services/default/upstreams", b"not json", 400, "the body is not JSON: "),
            ("POST", "/services/default/upstreams", b"\xff", 400, "the body is not JSON: "),
            ("POST", "/services/default/upstreams", b"", 400, "the body is not JSON: "),
            ("POST", "/services/default/upstreams", b"[]", 400, "expected a JSON object such as"),
            (
                "POST",
                "/services/default/upstreams",
                b'{"ttl": 30}',
                400,
                "url: expected a string such as http://10.0.0.7:8080, got nothing",
            ),
            ("POST", "/services/default/upstreams", b'{"url": 5, "ttl": 30}', 400, "url: expected a string"),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "ftp://h", "ttl": 30}',
                400,
                "url: upstream 'ftp://h': scheme must be one of http, h2c, https, https+h1, https+h2",
            ),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "http://h:1/?q", "ttl": 30}',
                400,
                "url: upstream 'http://h:1/?q': no query",
            ),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "http://h#weight=0", "ttl": 30}',
                400,
                "weight must be from 1 to 1000",
            ),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "%s"}' % url.encode(),
                400,
                "ttl: expected a number of seconds, more than 0 and at most 86400, got nothing",
            ),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "%s", "ttl": 0}' % url.encode(),
                400,
                "ttl: expected a number",
            ),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "%s", "ttl": -5}' % url.encode(),
                400,
                "ttl: expected a number",
            ),
            ("POST", "/services/default/upstreams", b'{"url": "%s", "ttl": 86401}' % url.encode(), 400, "got 86401"),
            ("POST", "/services/default/upstreams", b'{"url": "%s", "ttl": "30"}' % url.encode(), 400, 'got "30"'),
            ("POST", "/services/default/upstreams", b'{"url": "%s", "ttl": true}' % url.encode(), 400, "got true"),
            ("POST", "/services/default/upstreams", b'{"url": "%s", "ttl": NaN}' % url.encode(), 400, "got NaN"),
            (
                "POST",
                "/services/default/upstreams",
                b'{"url": "%s", "ttl": 3, "name": "x"}' % url.encode(),
                400,
                "unknown key 'name' (the keys: url, ttl)",
            ),
            ("GET", "/services/default/upstreams", None, 405, "use POST here, not GET"),
            ("PUT", "/services/default/upstreams/0123", None, 404, "no registration '0123' in service default"),
            ("DELETE", "/services/default/upstreams/0123", None, 404, "no registration '0123' in service default"),
            ("POST", "/services/default/upstreams/0123", None, 405, "use PUT, DELETE here, not POST"),
            ("GET", "/services/default", None, 404, "no such resource: /services/default"),
        ]
        for method, path, raw, expected, reason in cases:
            answer = await self.client.request(method, path, raw=raw)
            self.assertEqual(answer.status, expected, (method, path, raw, answer.body))
            self.assertEqual(list(answer.json()), ["error"])
            self.assertIn(reason, answer.json()["error"], (method, path, raw))
        self.assertEqual([each["key"] for each in upstreamsOf(await self.state())], [self.configured.url])

    async def test_heartbeatAndExpiry(self) -> None:
        """Renewed within its TTL it stays; not renewed, it leaves its service, and renewing is then 404."""
        events = captureLog(self)
        id = (await self.register(self.instance.url, 1.0)).json()["id"]
        path = f"/services/default/upstreams/{id}"
        for _ in range(8):  # 2 s in all: twice the TTL (each renewal with 0.75 s to spare)
            await sleep(0.25)
            answer = await self.client.request("PUT", path)
            self.assertEqual((answer.status, answer.json()["id"], answer.json()["ttl"]), (200, id, 1.0))
        answer = await self.client.request("PUT", path, {"ttl": 0.4})
        self.assertEqual((answer.status, answer.json()["ttl"]), (200, 0.4))
        self.assertEqual(len(upstreamsOf(await self.state())), 2)
        self.assertIn(b"instance", await bodies(self.proxy.port, b"/x", 2))

        await sleep(0.6)
        self.assertEqual([each["key"] for each in upstreamsOf(await self.state())], [self.configured.url])
        self.assertEqual(await bodies(self.proxy.port, b"/x", 3), [b"configured"] * 3)
        self.assertEqual((await self.client.request("PUT", path)).status, 404)
        logged = [formatEvent(event) for event in events]
        self.assertIn(
            f"admin API: {self.instance.url} left service default (id {id}): not renewed within its TTL of 0.4s", logged
        )

    async def test_deregisterWhileInFlight(self) -> None:
        """DELETE takes it out at once; the request it is answering completes, then its connection closes."""
        slow = ScriptedUpstream(self, slowly(0.5, slowCalls(self)))
        id = (await self.register(slow.url, 30)).json()["id"]
        exchanges = [defer.ensureDeferred(request(self.proxy.port, b"/%d" % i)) for i in range(2)]
        self.assertTrue(await waitFor(lambda: slow.requests))
        answer = await self.client.request("DELETE", f"/services/default/upstreams/{id}")
        self.assertEqual((answer.status, answer.body), (204, b""))
        [configured] = upstreamsOf(await self.state())
        self.assertEqual(configured["key"], self.configured.url)
        self.assertEqual(sorted([body for _, body in await defer.gatherResults(exchanges)]), [b"configured", b"slow"])
        self.assertTrue(await waitFor(lambda: slow.lost))
        self.assertEqual(await bodies(self.proxy.port, b"/x", 3), [b"configured"] * 3)
        self.assertEqual(len(slow.requests), 1)
        self.assertEqual((await self.client.request("DELETE", f"/services/default/upstreams/{id}")).status, 404)


class RegistrationSettingsTests(unittest.TestCase):
    """A registered upstream gets its service's settings, and survives live reloads that keep its service."""

    async def test_serviceSettings(self) -> None:
        """Registered in a service that ejects after one failure, a dead instance is ejected after one."""
        live = ScriptedUpstream(self, answerWith(b"live"))
        dead = f"http://127.0.0.1:{freePort()}"
        path = writeConfig(self, f'[services.api]\nupstreams = ["{live.url}"]\nmax-fails = 1\n')
        proxy = startAdmin(self, "--config", path)
        client = AdminClient(self, proxy.adminURL)
        answer = await client.request("POST", "/services/api/upstreams", {"url": dead, "ttl": 30})
        self.assertEqual(answer.status, 201)
        self.assertEqual(await bodies(proxy.port, b"/x", 2), [b"live"] * 2)  # the failed attempt retried on live
        states = {
            each["key"]: each["state"] for each in upstreamsOf((await client.request("GET", "/state")).json(), "api")
        }
        self.assertEqual(states, {live.url: "up", dead: "ejected"})

    async def test_reload(self) -> None:
        """
        A reload leaves registered upstreams alone in the services it keeps (the same upstream, its pool
        and health untouched), and drops the registrations of a service it removes.
        """
        events = captureLog(self)
        web, api, instance = (ScriptedUpstream(self, answerWith(name)) for name in (b"web", b"api", b"instance"))
        both = (
            f'[services.web]\nupstreams = ["{web.url}"]\n[services.api]\nupstreams = ["{api.url}"]\n'
            '[[routes]]\npath-prefix = "/api/"\nservice = "api"\n[[routes]]\nservice = "web"\n'
        )
        path = writeConfig(self, both)
        proxy = startAdmin(self, "--config", path)
        client = AdminClient(self, proxy.adminURL)
        id = (await client.request("POST", "/services/api/upstreams", {"url": instance.url, "ttl": 30})).json()["id"]
        registry = proxy.reloader.live.registry
        [before] = [each for each in registry.members("api") if each.key == instance.url]

        proxy.reload(path, both + "\n")
        self.assertIn(before, registry.members("api"))
        self.assertIn(b"instance", await bodies(proxy.port, b"/api/x", 2))
        [_, registered] = upstreamsOf((await client.request("GET", "/state")).json(), "api")
        self.assertEqual((registered["key"], registered["registration"]["id"]), (instance.url, id))
        self.assertEqual((await client.request("PUT", f"/services/api/upstreams/{id}")).status, 200)

        proxy.reload(path, f'[services.web]\nupstreams = ["{web.url}"]\n')
        await sleep(0)
        self.assertEqual((await client.request("PUT", f"/services/api/upstreams/{id}")).status, 404)
        logged = [formatEvent(event) for event in events]
        self.assertIn(
            f"admin API: registration {id} of {instance.url} dropped after a reload: "
            "its service 'api' is no longer configured",
            logged,
        )


OPENAPI_JSON = os.path.join(ROOT, "docs", "admin-openapi.json")

#: The schema keywords L{schemaErrors} checks, and those it may ignore (annotations): a document using
#: any other is refused, so that nothing it says goes unchecked.
_CHECKED = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "nullable", "minimum", "maximum"}
    | {"exclusiveMinimum", "pattern", "allOf", "$ref"}
)
_ANNOTATIONS = frozenset({"description", "example"})
_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "boolean": lambda value: isinstance(value, bool),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
}


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """C{node}, or what its C{$ref} (a local C{#/...} pointer) points to, followed to the end."""
    while "$ref" in node:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        target: Any = document
        for part in pointer[2:].split("/"):
            target = target[part]
        node = target
    return node


def schemaErrors(document: dict[str, Any], schema: dict[str, Any], value: object, where: str = "$") -> list[str]:
    """
    What is wrong with C{value} against C{schema} (an OpenAPI 3.0 schema object within C{document}):
    the subset of JSON Schema that docs/admin-openapi.json uses, with OpenAPI's C{nullable} and boolean
    C{exclusiveMinimum}.  Empty when it is valid.
    """
    schema = resolve(document, schema)
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    if unknown:
        raise AssertionError(f"{where}: the schema uses keywords this validator does not check: {sorted(unknown)}")
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    errors = [error for each in schema.get("allOf", []) for error in schemaErrors(document, each, value, where)]
    kind = schema.get("type")
    if kind is not None and not _TYPES[kind](value):
        return [*errors, f"{where}: expected {kind}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") and value == low):
                errors.append(f"{where}: {value!r} is below the minimum {low}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value!r} is above the maximum {schema['maximum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schemaErrors(document, schema["items"], item, f"{where}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where}: {name!r} is missing" for name in schema.get("required", []) if name not in value]
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                errors += schemaErrors(document, properties[name], item, f"{where}.{name}")
            elif extra is False:
                errors.append(f"{where}: {name!r} is not allowed")
            elif isinstance(extra, dict):
                errors += schemaErrors(document, extra, item, f"{where}.{name}")
    return errors


def responseErrors(document: dict[str, Any], method: str, template: str, answer: Answer) -> list[str]:
    """What is wrong with C{answer}, to C{method} on the path C{template}, against the OpenAPI C{document}."""
    operation = document["paths"][template][method.lower()]
    described = operation["responses"].get(str(answer.status))
    if described is None:
        return [f"{method} {template}: {answer.status} is not documented"]
    described = resolve(document, described)
    errors = []
    for name, header in described.get("headers", {}).items():
        header = resolve(document, header)
        values = answer.headers.get(name.lower(), [])
        if header.get("required") and not values:
            errors.append(f"header {name} is missing")
        for value in values:
            errors += schemaErrors(document, header["schema"], value, f"header {name}")
    content = described.get("content")
    if content is None:
        return errors + ([f"a body that is not documented: {answer.body!r}"] if answer.body else [])
    [(mediaType, media)] = content.items()
    if answer.headers.get("content-type") != [mediaType]:
        errors.append(f"Content-Type {answer.headers.get('content-type')}, documented {mediaType}")
    body = answer.json() if mediaType == "application/json" else answer.body.decode("utf-8")
    return errors + schemaErrors(document, media["schema"], body)


def loadOpenAPI() -> dict[str, Any]:
    with open(OPENAPI_JSON, encoding="utf-8") as f:
        document: dict[str, Any] = json.load(f)
    return document


def documentedResponses(document: dict[str, Any]) -> set[tuple[str, str, int]]:
    """Every (method, path template, status) the document describes."""
    return {
        (method.upper(), template, int(status))
        for template, item in document["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
        for status in operation["responses"]
    }


class ValidatorTests(unittest.TestCase):
    """L{schemaErrors} finds what is wrong, and refuses schemas it could not check whole."""

    def setUp(self) -> None:
        self.document = loadOpenAPI()
        self.upstream = {
            "key": "http://10.0.0.5:8080",
            "weight": 1,
            "labels": {"zone": "a"},
            "state": "up",
            "reason": None,
            "ejections": 0,
            "ejectionEndsIn": None,
            "lastError": None,
            "inFlight": 0,
            "pool": {"open": 1, "idle": 1},
            "latency": 0.0012,
            "balancer": {"latency_ms": 1.2, "cost": 0.0013},
            "registration": None,
        }

    def errors(self, schema: str, value: object) -> list[str]:
        return schemaErrors(self.document, {"$ref": f"#/components/schemas/{schema}"}, value)

    def test_valid(self) -> None:
        registration = {"id": "0123456789abcdef", "service": "a", "key": "k", "weight": 2, "ttl": 0.5, "expiresIn": 0}
        self.assertEqual(self.errors("Upstream", self.upstream), [])
        self.assertEqual(self.errors("Upstream", self.upstream | {"registration": registration, "state": "down"}), [])
        ejected = {"state": "ejected", "ejections": 2, "ejectionEndsIn": 9.5, "lastError": {"reason": "r", "at": 1e9}}
        self.assertEqual(self.errors("Upstream", self.upstream | ejected), [])
        self.assertEqual(self.errors("RenewalRequest", {}), [])

    def test_invalid(self) -> None:
        for schema, value, expected in [
            ("Upstream", {**self.upstream, "state": "gone"}, "$.state: 'gone' is not one of"),
            ("Upstream", {**self.upstream, "weight": True}, "$.weight: expected integer, got True"),
            ("Upstream", {**self.upstream, "weight": 0}, "$.weight: 0 is below the minimum 1"),
            ("Upstream", {**self.upstream, "inFlight": None}, "$.inFlight: null is not allowed"),
            ("Upstream", {**self.upstream, "lastError": {"reason": "r"}}, "$.lastError: 'at' is missing"),
            ("Upstream", {**self.upstream, "extra": 1}, "$: 'extra' is not allowed"),
            ("Upstream", {k: v for k, v in self.upstream.items() if k != "pool"}, "$: 'pool' is missing"),
            ("Upstream", {**self.upstream, "pool": {"open": 1, "idle": "1"}}, "$.pool.idle: expected integer"),
            ("Upstream", {**self.upstream, "registration": {"id": "x"}}, "$.registration.id: 'x' does not match"),
            ("State", {"shuttingDown": False, "services": [{}], "routes": []}, "$.services[0]: 'name' is missing"),
            ("RegistrationRequest", {"url": "http://h", "ttl": 0}, "$.ttl: 0 is below the minimum 0"),
            ("RegistrationRequest", {"url": "http://h", "ttl": 86401}, "$.ttl: 86401 is above the maximum 86400"),
            ("RegistrationRequest", [], "$: expected object, got []"),
        ]:
            self.assertIn(expected, "\n".join(self.errors(schema, value)), (schema, value))

    def test_uncheckedKeywords(self) -> None:
        with self.assertRaises(AssertionError):
            schemaErrors(self.document, {"type": "string", "maxLength": 3}, "abcd")

    def test_references(self) -> None:
        """Every C{$ref} of the document resolves."""

        def walk(node: object) -> None:
            if isinstance(node, dict):
                if "$ref" in node:
                    resolve(self.document, node)
                for each in node.values():
                    walk(each)
            elif isinstance(node, list):
                for each in node:
                    walk(each)

        walk(self.document)
        self.assertTrue(self.document["openapi"].startswith("3.0."))


class OpenAPITests(unittest.TestCase):
    """docs/admin-openapi.json describes what the admin API answers: every answer, and every documented answer."""

    async def test_responses(self) -> None:
        document = loadOpenAPI()
        configured = ScriptedUpstream(self, answerWith(b"configured"))
        instance = ScriptedUpstream(self, answerWith(b"instance"))
        proxy = startAdmin(self, "--upstream", configured.url, "--max-fails", "1")
        client = AdminClient(self, proxy.adminURL)
        wrong = AdminClient(self, proxy.adminURL, token="wrong")
        seen: set[tuple[str, str, int]] = set()

        async def check(
            method: str,
            template: str,
            path: str,
            body: object = None,
            raw: bytes | None = None,
            by: AdminClient = client,
            authorization: str | None = None,
        ) -> Answer:
            answer = await by.request(method, path, body, raw=raw, authorization=authorization)
            self.assertEqual(responseErrors(document, method, template, answer), [], (method, path, answer.body))
            seen.add((method, template, answer.status))
            return answer

        state, page = "/state", "/status"
        many, one = "/services/{name}/upstreams", "/services/{name}/upstreams/{id}"
        registration = {"url": instance.url, "ttl": 30}
        self.assertEqual(schemaErrors(document, {"$ref": "#/components/schemas/RegistrationRequest"}, registration), [])
        id = (await check("POST", many, "/services/default/upstreams", registration)).json()["id"]
        await check("POST", many, "/services/default/upstreams", registration)
        await check("POST", many, "/services/default/upstreams", {"url": f"http://127.0.0.1:{freePort()}", "ttl": 9})
        await request(proxy.port, b"/")
        await request(proxy.port, b"/")  # the dead one is ejected: its state has a reason
        await check("GET", state, state)
        await check("GET", page, page)
        await check("GET", page, page, authorization="Basic " + b64encode(f"admin:{TOKEN}".encode()).decode())
        await check("GET", page, page, authorization="Basic " + b64encode(b"admin:wrong").decode())
        await check("POST", many, "/services/default/upstreams", raw=b"{")
        await check("POST", many, "/services/nope/upstreams", registration)
        await check("POST", many, "/services/default/upstreams", {"url": configured.url, "ttl": 30})
        await check("PUT", one, f"/services/default/upstreams/{id}")
        await check("PUT", one, f"/services/default/upstreams/{id}", {"ttl": 60})
        await check("PUT", one, f"/services/default/upstreams/{id}", {"ttl": "long"})
        await check("PUT", one, "/services/default/upstreams/nope")
        await check("DELETE", one, f"/services/default/upstreams/{id}")
        await check("DELETE", one, f"/services/default/upstreams/{id}")
        for method, template, path in [
            ("GET", state, state),
            ("GET", page, page),
            ("POST", many, "/services/default/upstreams"),
            ("PUT", one, "/services/default/upstreams/x"),
            ("DELETE", one, "/services/default/upstreams/x"),
        ]:
            await check(method, template, path, by=AdminClient(self, proxy.adminURL, token=None))
            await check(method, template, path, by=wrong)
        self.assertEqual(seen, documentedResponses(document))

    def test_documented(self) -> None:
        """docs/admin.md links the document, and names every path of it."""
        with open(os.path.join(ROOT, "docs", "admin.md"), encoding="utf-8") as f:
            text = f.read()
        self.assertIn("(admin-openapi.json)", text)
        for template, item in loadOpenAPI()["paths"].items():
            for method in item:
                if method != "parameters":
                    written = template.replace("{name}", "NAME").replace("{id}", "ID")
                    self.assertIn(f"{method.upper()} {written}", text)
