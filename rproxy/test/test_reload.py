"""
Live reload (L{rproxy.app.reload}): a proxy built from a config file, in front of real upstreams, reloaded by
calling its L{ConfigReloader}, by a change to the file, by SIGHUP to this process and to a ``twist rproxy``
process; what changed is in force at once, what did not keeps running, and a wrong file changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from twisted.application.service import MultiService
from twisted.internet import error, protocol, reactor
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.python.usage import UsageError
from twisted.trial import unittest

from rproxy.app.config import ProxyConfig, RouteConfig
from rproxy.app.reload import ConfigReloader, LiveProxy, ReloadSummary, describeRoute
from rproxy.app.tap import Options, buildService, optionsFromEnvironment, reloadSource
from rproxy.health.checks import HealthChecker
from rproxy.proxy.directors import RoutingDirector
from rproxy.test.support import (
    BIN,
    ReceivedRequest,
    ScriptedUpstream,
    rawRequest,
    sleep,
    splitResponses,
    waitFor,
)
from rproxy.test.test_config import answerWith, get, writeConfig
from rproxy.test.test_drain import (
    ProxyProcess,
    assertCleanExit,
    freePort,
    startExchange,
    tryConnect,
    waitUntilListening,
)
from rproxy.test.test_healthcheck import captureLog


def services(**upstreams: str) -> str:
    """C{[services.NAME]} tables, each with one upstream URL."""
    return "".join(f'[services.{name}]\nupstreams = ["{url}"]\n' for name, url in upstreams.items())


def route(service: str, prefix: str | None = None) -> str:
    """A C{[[routes]]} table sending the requests below C{prefix} (or all) to C{service}."""
    return "[[routes]]\n" + (f'path-prefix = "{prefix}"\n' if prefix else "") + f'service = "{service}"\n'


def rewrite(path: str, text: str) -> None:
    """Replace the file at C{path} with one holding C{text}, atomically (as editors and config tools should)."""
    with open(path + ".new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".new", path)


def messages(events: list[LogEvent], level: LogLevel) -> list[str]:
    """The formatted messages of the events of C{level}."""
    return [formatEvent(event) for event in events if event.get("log_level") == level]


async def body(port: int, target: bytes) -> bytes:
    """The body of a 200 response to C{GET target} through the proxy on C{port}."""
    [(head, content)] = splitResponses(await rawRequest(port, get(target) + b"Connection: close\r\n\r\n"))
    assert head.startswith(b"HTTP/1.1 200 "), head
    return content


@dataclass
class ReloadableProxy:
    """A proxy started in this process from the config file C{path}, listening on C{port}."""

    top: MultiService
    reloader: ConfigReloader
    path: str
    port: int

    @property
    def live(self) -> LiveProxy:
        return self.reloader.live

    def reload(self, text: str) -> ReloadSummary | None:
        """Rewrite the file with C{text} and reload it."""
        rewrite(self.path, text)
        return self.reloader.reload("a test")

    async def body(self, target: bytes) -> bytes:
        return await body(self.port, target)


def startReloadable(
    testCase: unittest.TestCase, text: str, *arguments: str, signals: IReactorFromThreads | None = None
) -> ReloadableProxy:
    """
    C{twist rproxy --config FILE ARGUMENTS}, FILE holding C{text}, as L{buildService} builds it (with
    SIGHUP handed to C{signals}, a reactor, when given), started until the test ends.
    """
    path = writeConfig(testCase, text)
    port = freePort()
    options = Options()
    listen = f"tcp:{port}:interface=127.0.0.1"
    options.parseOptions(["--config", path, "--listen", listen, "--access-log", "off", "--grace", "2", *arguments])
    top = buildService(options.config, reactor, reloadSource(options), signals)  # type: ignore[arg-type]
    top.startService()
    testCase.addCleanup(top.stopService)
    reloader = top.getServiceNamed("config-reloader")
    assert isinstance(reloader, ConfigReloader)
    return ReloadableProxy(top, reloader, path, port)


def slowly(seconds: float, calls: list[IDelayedCall]) -> Callable[[protocol.Protocol, ReceivedRequest], bytes]:
    """A L{ScriptedUpstream} answer: 200 C{slow}, C{seconds} after the request (the call kept in C{calls})."""

    def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"
        calls.append(reactor.callLater(seconds, proto.transport.write, answer))
        return b""

    return respond


def dechunked(data: bytes) -> bytes:
    """The content of the complete chunked body C{data} (without trailers); C{AssertionError} if it is not."""
    content = b""
    while True:
        sizeLine, end, data = data.partition(b"\r\n")
        assert end, f"a chunk's size line is cut: {sizeLine!r}"
        size = int(sizeLine.split(b";")[0], 16)
        if size == 0:
            assert data == b"\r\n", f"not the end of a chunked body: {data!r}"
            return content
        assert data[size : size + 2] == b"\r\n", f"a chunk is cut: {data!r}"
        content, data = content + data[:size], data[size + 2 :]


class ReloadTestCase(unittest.TestCase):
    """Upstreams that answer with their name, and cancelled timers."""

    timeout = 30

    def setUp(self) -> None:
        self.calls: list[IDelayedCall] = []
        self.addCleanup(self.cancelCalls)

    def cancelCalls(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()

    def upstream(self, name: str) -> ScriptedUpstream:
        return ScriptedUpstream(self, answerWith(name.encode("ascii")))


class ReloadTests(ReloadTestCase):
    """L{ConfigReloader.reload}, called directly, on a proxy serving real requests."""

    async def test_routeMoves(self) -> None:
        """
        A route moved to a new service takes the next request there; a removed service is gone; the other
        routes and settings (here C{via-name}) are as the new file says; the summary says what changed.
        """
        a, b, c = self.upstream("a"), self.upstream("b"), self.upstream("c")
        proxy = startReloadable(self, services(a=a.url, b=b.url) + route("a", "/moved") + route("b"))
        events = captureLog(self)
        self.assertEqual([await proxy.body(b"/moved/x"), await proxy.body(b"/other")], [b"a", b"b"])

        summary = proxy.reload('via-name = "edge"\n' + services(b=b.url, c=c.url) + route("c", "/moved") + route("b"))

        self.assertEqual(
            summary,
            ReloadSummary(
                servicesAdded=("c",),
                servicesRemoved=("a",),
                routesAdded=("any host/moved -> service c",),
                routesRemoved=("any host/moved -> service a",),
                applied=("via-name (rproxy -> edge)",),
            ),
        )
        self.assertEqual([await proxy.body(b"/moved/x"), await proxy.body(b"/other")], [b"c", b"b"])
        self.assertEqual((len(a.requests), len(b.requests), len(c.requests)), (1, 2, 1))
        self.assertEqual(c.requests[0].headers(b"via"), [b"1.1 edge"])
        self.assertEqual(proxy.live.registry.members("a"), ())
        self.assertEqual(
            messages(events, LogLevel.info),
            [
                f"{proxy.path}: configuration reloaded (a test): services added: c; services removed: a; "
                "routes added: any host/moved -> service c; routes removed: any host/moved -> service a; "
                "settings changed: via-name (rproxy -> edge)"
            ],
        )

    async def test_streamSpansReload(self) -> None:
        """
        A response streaming from an upstream (a chunk every 0.2 s for 1.2 s) on a route that did not
        change goes on, intact, through a reload that changes another route; its connection is kept.
        """
        pieces = [b"piece%d;" % i for i in range(5)]

        def stream(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            for i, piece in enumerate(pieces):
                self.calls.append(reactor.callLater(0.2 * (i + 1), proto.transport.write, b"7\r\n%s\r\n" % piece))
            self.calls.append(reactor.callLater(1.2, proto.transport.write, b"0\r\n\r\n"))
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

        streaming, a, b = ScriptedUpstream(self, stream), self.upstream("a"), self.upstream("b")
        proxy = startReloadable(self, services(stream=streaming.url, a=a.url) + route("stream", "/stream") + route("a"))
        upstream = proxy.live.registry.members("stream")[0]
        exchange = await startExchange(
            self, proxy.port, b"GET /stream/events HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(await waitFor(lambda: b"piece0" in exchange.received))

        summary = proxy.reload(services(stream=streaming.url, b=b.url) + route("stream", "/stream") + route("b"))

        assert summary is not None
        self.assertEqual((summary.servicesAdded, summary.servicesRemoved), (("b",), ("a",)))
        self.assertNotIn(b"piece4", exchange.received, "the stream ended before the reload: it spans nothing")
        self.assertEqual(await proxy.body(b"/elsewhere"), b"b")
        self.assertTrue(await waitFor(lambda: exchange.endedAt is not None))
        head, _, content = exchange.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(dechunked(content), b"".join(pieces))
        assert exchange.reason is not None
        self.assertTrue(exchange.reason.check(error.ConnectionDone), exchange.reason)
        self.assertIs(proxy.live.registry.members("stream")[0], upstream)
        self.assertEqual((len(streaming.connections), streaming.lost), (1, []))

    async def test_removedUpstreamFinishes(self) -> None:
        """
        An exchange in flight on an upstream the reload removes completes; new requests go where the new
        file says; the removed upstream's connection closes once its exchange is over.
        """
        slow, b = ScriptedUpstream(self, slowly(1.0, self.calls)), self.upstream("b")
        proxy = startReloadable(self, services(slow=slow.url, b=b.url) + route("slow", "/slow") + route("b"))
        exchange = await startExchange(
            self, proxy.port, b"GET /slow/report HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(await waitFor(lambda: slow.requests))

        summary = proxy.reload(services(b=b.url) + route("b"))

        assert summary is not None
        self.assertEqual(summary.servicesRemoved, ("slow",))
        self.assertEqual(await proxy.body(b"/slow/report"), b"b")
        self.assertIsNone(exchange.endedAt, "the exchange in flight was cut short")
        self.assertTrue(await waitFor(lambda: exchange.endedAt is not None))
        [(head, content)] = splitResponses(exchange.received)
        self.assertEqual((head.split(b"\r\n")[0], content), (b"HTTP/1.1 200 OK", b"slow"))
        self.assertTrue(await waitFor(lambda: slow.lost), "the removed upstream's connection stays open")
        self.assertEqual(len(slow.requests), 1)

    async def test_unchangedKept(self) -> None:
        """
        An upstream whose URL and settings did not change is kept, with its pooled connection (reused after
        the reload), even when its service's balancer changes (a new L{Service}); an upstream whose pool
        settings changed is a new one (the old one's idle connection closes), its service, balanced as
        before, the same L{Service}.
        """
        a, b = self.upstream("a"), self.upstream("b")
        proxy = startReloadable(self, services(a=a.url, b=b.url) + route("a", "/a") + route("b"))
        self.assertEqual([await proxy.body(b"/a/1"), await proxy.body(b"/b/1")], [b"a", b"b"])
        registry = proxy.live.registry
        [upstreamA], [upstreamB] = registry.members("a"), registry.members("b")
        self.assertTrue(await waitFor(lambda: upstreamA.pool.idleCount == upstreamB.pool.idleCount == 1))
        director = proxy.live.proxy.director
        assert isinstance(director, RoutingDirector)

        summary = proxy.reload(
            f'[services.a]\nupstreams = ["{a.url}"]\nbalancer = "random"\n'
            f'[services.b]\nupstreams = ["{b.url}"]\nconnect-timeout = 3\n'
            + route("a", "/a")
            + route("a", "/also-a")
            + route("b")
        )

        assert summary is not None
        self.assertEqual(
            (summary.servicesChanged, summary.routesAdded), (("a", "b"), ("any host/also-a -> service a",))
        )
        newDirector = proxy.live.proxy.director
        assert isinstance(newDirector, RoutingDirector)
        self.assertIsNot(newDirector.routes[0].service, director.routes[0].service)
        self.assertIs(newDirector.routes[2].service, director.routes[1].service)
        self.assertEqual(registry.members("a"), (upstreamA,))
        self.assertEqual(upstreamA.pool.idleCount, 1)
        [newB] = registry.members("b")
        self.assertIsNot(newB, upstreamB)
        self.assertEqual(newB.pool.settings.connectTimeout, 3.0)
        self.assertTrue(await waitFor(lambda: b.lost), "the replaced upstream's idle connection stays open")

        self.assertEqual([await proxy.body(b"/also-a/2"), await proxy.body(b"/b/2")], [b"a", b"b"])
        self.assertEqual((len(a.connections), len(b.connections)), (1, 2))

    async def test_rejected(self) -> None:
        """
        A wrong file is rejected: its error, naming the file and the key, is logged at error level, and
        the previous configuration keeps serving, whatever the mistake.
        """
        a, b = self.upstream("a"), self.upstream("b")
        good = services(a=a.url, b=b.url) + route("a", "/a") + route("b")
        proxy = startReloadable(self, good)
        events = captureLog(self)
        before = proxy.live.config
        path = proxy.path
        cases = [
            (services(a=a.url, b=b.url) + "retries = -1\n" + route("b"), f"{path}: services.b.retries: must not be "),
            (good + route("nope", "/x"), f"{path}: routes[2].service: no service named 'nope'"),
            ("[[routes]\n", f"{path}: invalid TOML"),
            ('watch-config = "1"\n' + good, f"{path}: unknown key 'watch-config'"),
            ("version = true\n" + good, "it exits instead of configuring (status 0)"),
        ]
        for text, expected in cases:
            with contextlib.redirect_stdout(io.StringIO()):  # what a version flag prints
                self.assertIsNone(proxy.reload(text), text)
            [logged] = messages(events, LogLevel.error)
            self.assertIn(f"{path}: not reloaded (a test), the previous configuration keeps serving: ", logged)
            self.assertIn(expected, logged)
            events.clear()
            self.assertIs(proxy.live.config, before)
            self.assertEqual([await proxy.body(b"/a/1"), await proxy.body(b"/other")], [b"a", b"b"])
        os.remove(path)
        self.assertIsNone(proxy.reloader.reload("a test"))
        self.assertIn(f"{path}: cannot read", messages(events, LogLevel.error)[0])

    async def test_notApplied(self) -> None:
        """
        Listeners and client limits cannot change while running: a reload that changes them warns, naming
        them, applies the rest, and keeps the running listeners and limits.
        """
        a, b = self.upstream("a"), self.upstream("b")
        proxy = startReloadable(self, services(a=a.url) + route("a"))
        events = captureLog(self)
        other = freePort()
        listen = f"tcp:{other}:interface=127.0.0.1"

        summary = proxy.reload(f'listen = ["{listen}"]\nmax-body-size = "1M"\n' + services(a=b.url) + route("a"))

        running = f"tcp:{proxy.port}:interface=127.0.0.1"
        assert summary is not None
        self.assertEqual(
            summary.notApplied, (f"listen ({running} -> {listen} {running})", "max-body-size (0 -> 1048576)")
        )
        [warning] = messages(events, LogLevel.warn)
        self.assertIn("apply only at the next restart", warning)
        self.assertIn(f"listen ({running} -> {listen} {running}); max-body-size (0 -> 1048576)", warning)
        self.assertEqual(await proxy.body(b"/"), b"b")
        self.assertFalse(await tryConnect(other))

    async def test_healthChecks(self) -> None:
        """New health check settings replace the checks; the same ones leave the checks alone."""
        a = self.upstream("a")
        proxy = startReloadable(self, services(a=a.url) + route("a"))
        checked = services(a=a.url) + "health-path = '/ready'\nhealth-interval = 0.05\n" + route("a")

        def checks(path: bytes) -> int:
            return sum(1 for r in a.requests if r.requestLine == b"GET " + path + b" HTTP/1.1")

        def checkers() -> list[HealthChecker]:
            return [each for each in proxy.top if isinstance(each, HealthChecker)]

        self.assertEqual(checkers(), [])
        proxy.reload(checked)
        self.assertTrue(await waitFor(lambda: checks(b"/ready") >= 2))
        [checker] = checkers()
        proxy.reload(checked + route("a", "/more"))
        self.assertEqual(checkers(), [checker])
        proxy.reload(checked.replace("/ready", "/live"))
        self.assertTrue(await waitFor(lambda: checks(b"/live") >= 2))
        ready = checks(b"/ready")
        await sleep(0.2)
        self.assertEqual(checks(b"/ready"), ready)
        self.assertFalse(checker.running)
        self.assertNotIn(checker, checkers())


class TriggerTests(ReloadTestCase):
    """What reloads: a change to a watched file, SIGHUP."""

    async def test_watchedFile(self) -> None:
        """
        With C{--watch-config}, a change to the file is applied within an interval; a wrong version is
        logged once, not at every look.
        """
        a, b = self.upstream("a"), self.upstream("b")
        proxy = startReloadable(self, services(a=a.url) + route("a"), "--watch-config", "0.05")
        events = captureLog(self)

        rewrite(proxy.path, services(a=a.url) + "retries = -1\n" + route("a"))
        self.assertTrue(await waitFor(lambda: messages(events, LogLevel.error)))
        await sleep(0.3)
        [logged] = messages(events, LogLevel.error)
        self.assertIn(f"{proxy.path}: not reloaded (the file changed)", logged)
        self.assertIn("services.a.retries", logged)

        rewrite(proxy.path, services(a=b.url) + route("a"))
        self.assertTrue(await waitFor(lambda: messages(events, LogLevel.info)))
        [reloaded] = messages(events, LogLevel.info)
        self.assertIn("configuration reloaded (the file changed): services changed: a", reloaded)
        self.assertEqual(await proxy.body(b"/"), b"b")

    async def test_signal(self) -> None:
        """
        Given the reactor for signals, the reloader handles SIGHUP (here sent to this process) by reloading,
        and gives SIGHUP its previous handler back when it stops.
        """
        a, b = self.upstream("a"), self.upstream("b")
        previous = signal.getsignal(signal.SIGHUP)
        proxy = startReloadable(self, services(a=a.url) + route("a"), signals=reactor)  # type: ignore[arg-type]
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), previous)
        rewrite(proxy.path, services(a=b.url) + route("a"))

        os.kill(os.getpid(), signal.SIGHUP)

        self.assertTrue(await waitFor(lambda: proxy.live.config.services["a"].upstreams == (b.url,)))
        self.assertEqual(await proxy.body(b"/"), b"b")
        await proxy.top.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    async def test_twistProcess(self) -> None:
        """
        ``twist rproxy -c FILE``: SIGHUP applies the changed file; a wrong file then is logged and changes
        nothing; SIGTERM still stops it cleanly.
        """
        a, b = self.upstream("a"), self.upstream("b")
        port = freePort()
        top = f'listen = ["tcp:{port}:interface=127.0.0.1"]\naccess-log = "off"\n'
        path = writeConfig(self, top + services(a=a.url, b=b.url) + route("a", "/moved") + route("b"))
        process = ProxyProcess.spawn(self, [os.path.join(BIN, "twist"), "--log-format=text", "rproxy", "-c", path])
        await waitUntilListening(self, process, port)
        self.assertEqual(await body(port, b"/moved"), b"a")

        rewrite(path, top + services(b=b.url) + route("b"))
        process.transport.signalProcess("HUP")
        self.assertTrue(await waitFor(lambda: "configuration reloaded (SIGHUP)" in process.log, 10), process.log)
        self.assertEqual(await body(port, b"/moved"), b"b")

        rewrite(path, top + services(b=b.url) + "retries = -1\n" + route("b"))
        process.transport.signalProcess("HUP")
        self.assertTrue(await waitFor(lambda: "not reloaded (SIGHUP)" in process.log, 10), process.log)
        self.assertIn("services.b.retries: must not be negative", process.log)
        self.assertTrue(process.running)
        self.assertEqual(await body(port, b"/moved"), b"b")

        process.terminate()
        await process.waitForExit(self, 10.0)
        assertCleanExit(self, process)
        self.assertNotIn("Traceback", process.log)


class SummaryTests(unittest.TestCase):
    """L{ReloadSummary} and L{describeRoute}: what the log says."""

    def test_nothingChanged(self) -> None:
        config = ProxyConfig()
        self.assertEqual(ReloadSummary.between(config, config).describe(), "no changes")

    def test_reordered(self) -> None:
        old = ProxyConfig(routes=(RouteConfig("a", pathPrefix="/a"), RouteConfig("b")))
        new = ProxyConfig(routes=old.routes[::-1])
        self.assertEqual(ReloadSummary.between(old, new).describe(), "routes reordered")

    def test_describeRoute(self) -> None:
        from rproxy.app.config import BlueGreenConfig, ServiceVersionConfig, WeightedSplitConfig

        self.assertEqual(
            describeRoute(RouteConfig("api", hosts=("a.example", "*.b.example"))),
            "a.example,*.b.example -> service api",
        )
        self.assertEqual(
            describeRoute(RouteConfig(WeightedSplitConfig((("web", 90), ("canary", 10))), pathPrefix="/shop")),
            "any host/shop -> split web=90 canary=10",
        )
        self.assertEqual(
            describeRoute(RouteConfig(BlueGreenConfig("blue", "green", "green"))),
            "any host -> blue/green blue green (active green)",
        )
        self.assertEqual(describeRoute(RouteConfig(ServiceVersionConfig())), "any host -> /service/version/")


class SourceTests(unittest.TestCase):
    """L{reloadSource} and C{--watch-config}: where a reload reads from, and how often the file is looked at."""

    def test_source(self) -> None:
        """The file, read again with the same arguments around it; the interval of C{--watch-config}."""
        path = writeConfig(self, 'upstream = ["http://127.0.0.1:9001"]\n')
        options = Options()
        options.parseOptions(["-c", path, "--connect-timeout", "3", "--watch-config", "2.5"])
        source = reloadSource(options)
        assert source is not None
        self.assertEqual((source.path, source.watchInterval), (path, 2.5))
        rewrite(path, 'upstream = ["http://127.0.0.1:9002"]\n')
        again = source.load(None).services["default"]
        self.assertEqual((again.upstreams, again.pool.connectTimeout), (("http://127.0.0.1:9002",), 3.0))

    def test_environment(self) -> None:
        """For rproxy.tac: C{RPROXY_CONFIG} and C{RPROXY_WATCH_CONFIG}, the same variables again."""
        path = writeConfig(self, 'upstream = ["http://127.0.0.1:9001"]\n')
        options = optionsFromEnvironment({"RPROXY_CONFIG": path, "RPROXY_WATCH_CONFIG": "1", "RPROXY_RETRIES": "4"})
        source = reloadSource(options)
        assert source is not None
        self.assertEqual((source.path, source.watchInterval), (path, 1.0))
        self.assertEqual(source.load(None).services["default"].retry.retries, 4)

    def test_noFile(self) -> None:
        """Without a config file there is nothing to reload: no source, no reloader."""
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:9001"])
        self.assertIsNone(reloadSource(options))
        top = buildService(options.config, reactor, reloadSource(options))  # type: ignore[arg-type]
        self.assertRaises(KeyError, top.getServiceNamed, "config-reloader")

    def test_watchErrors(self) -> None:
        path = writeConfig(self, 'upstream = ["http://127.0.0.1:9001"]\n')
        for arguments, message in [
            (["-c", path, "--watch-config", "-1"], "--watch-config: expected a number of seconds, 0 or more, got '-1'"),
            (["-c", path, "--watch-config", "soon"], "--watch-config: expected a number of seconds, 0 or more"),
            (["-c", path, "--watch-config", "inf"], "--watch-config: expected a number of seconds, 0 or more"),
            (
                ["--upstream", "http://127.0.0.1:9001", "--watch-config", "1"],
                "--watch-config: there is no file to watch without --config",
            ),
        ]:
            options = Options()
            self.assertIn(message, str(self.assertRaises(UsageError, options.parseOptions, arguments)))
