"""
Active health checks against real upstreams on 127.0.0.1: L{HealthCheckSettings}, L{HTTPHealthCheck}'s
verdicts and reasons, L{HealthChecker} marking upstreams down and up and reporting its verdicts, and
L{VerdictFollower} applying them in another process's registry.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial import unittest
from zope.interface import verify

import rproxy
from rproxy.health.checks import BODY_LIMIT, USER_AGENT, HealthChecker, HealthCheckSettings, HTTPHealthCheck
from rproxy.health.shared import Verdict, VerdictFollower
from rproxy.interfaces import HealthResult, IHealthCheck
from rproxy.proxy.registry import MemoryRegistry
from rproxy.test.certs import CertificateAuthority
from rproxy.test.support import ReceivedRequest, ScriptedUpstream, listen, sleep, waitFor
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import Upstream


def response(status: int = 200, body: bytes = b"ok") -> bytes:
    """An HTTP/1.1 response with a Content-Length."""
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def upstreamAt(url: str) -> Upstream:
    return Upstream.fromURL(url, reactor, PoolSettings())


def check(url: str, **settings: object) -> defer.Deferred[HealthResult]:
    """One check of the upstream at C{url} with C{settings}."""
    return HTTPHealthCheck(reactor, HealthCheckSettings(**settings)).check(upstreamAt(url))  # type: ignore[arg-type]


def freePort(testCase: unittest.TestCase) -> int:
    """A port nothing listens on any more (listened on, then closed)."""
    listening = listen(testCase, protocol.Factory.forProtocol(protocol.Protocol))
    listening.listener.stopListening()
    return listening.port


def captureLog(testCase: unittest.TestCase) -> list[LogEvent]:
    """Every log event from now until the test ends."""
    events: list[LogEvent] = []
    observer: ILogObserver = events.append  # type: ignore[assignment]
    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class SettingsTests(unittest.TestCase):
    """L{HealthCheckSettings}: defaults, the status syntax, and validation that names what is wrong."""

    def test_defaults(self) -> None:
        settings = HealthCheckSettings()
        self.assertEqual(
            (settings.path, settings.method, settings.status, settings.body, settings.host),
            ("/", "GET", "200-399", None, None),
        )
        self.assertEqual((settings.interval, settings.timeout, settings.rise, settings.fall), (10.0, 5.0, 2, 3))
        self.assertTrue(settings.expects(200) and settings.expects(399))
        self.assertFalse(settings.expects(199) or settings.expects(400) or settings.expects(500))

    def test_statusList(self) -> None:
        settings = HealthCheckSettings(status=" 200 - 299, 304 ")
        self.assertEqual(settings.status, "200-299,304")
        self.assertEqual(
            [code for code in (200, 250, 299, 300, 303, 304, 305) if settings.expects(code)], [200, 250, 299, 304]
        )

    def test_badStatus(self) -> None:
        for spec, named in [
            ("2xx", "'2xx'"),
            ("200,", "''"),
            ("299-200", "'299-200'"),
            ("600", "'600'"),
            ("200-20", "'200-20'"),
        ]:
            with self.assertRaises(ValueError) as caught:
                HealthCheckSettings(status=spec)
            self.assertIn(named, str(caught.exception), spec)
            self.assertIn("status", str(caught.exception))

    def test_method(self) -> None:
        self.assertEqual(HealthCheckSettings(method="head").method, "HEAD")
        with self.assertRaisesRegex(ValueError, "method must be GET or HEAD, not 'POST'"):
            HealthCheckSettings(method="POST")

    def test_body(self) -> None:
        with self.assertRaisesRegex(ValueError, "HEAD response has no body"):
            HealthCheckSettings(method="HEAD", body="ok")
        with self.assertRaisesRegex(ValueError, "body must not be empty"):
            HealthCheckSettings(body="")
        with self.assertRaisesRegex(ValueError, f"at most {BODY_LIMIT} bytes"):
            HealthCheckSettings(body="x" * (BODY_LIMIT + 1))

    def test_path(self) -> None:
        self.assertEqual(HealthCheckSettings(path="/health?full=1").path, "/health?full=1")
        for path in ("health", "/a b", "/a#b", "/caf\u00e9", ""):
            with self.assertRaisesRegex(ValueError, "path .* must start with '/'"):
                HealthCheckSettings(path=path)

    def test_numbers(self) -> None:
        for name in ("interval", "timeout"):
            for value in (0, -1, float("inf"), float("nan"), "5"):
                with self.assertRaisesRegex(ValueError, f"{name} must be a positive number"):
                    HealthCheckSettings(**{name: value})  # type: ignore[arg-type]
        for name in ("rise", "fall"):
            for value in (0, 1.5, True):
                with self.assertRaisesRegex(ValueError, f"{name} must be a whole number of at least 1"):
                    HealthCheckSettings(**{name: value})  # type: ignore[arg-type]

    def test_host(self) -> None:
        self.assertEqual(HealthCheckSettings(host="example.com:8080").host, "example.com:8080")
        for host in ("", "a b", "caf\u00e9.example"):
            with self.assertRaisesRegex(ValueError, "host .* must be non-empty printable ASCII"):
                HealthCheckSettings(host=host)


class HTTPHealthCheckTests(unittest.TestCase):
    """One check against a real upstream: what is sent, and the verdict with its reason."""

    def test_interface(self) -> None:
        self.assertTrue(verify.verifyObject(IHealthCheck, HTTPHealthCheck(reactor, HealthCheckSettings())))

    async def test_healthy(self) -> None:
        """A 200 passes; the request carries the User-Agent, Connection: close and the upstream's Host."""
        upstream = ScriptedUpstream(self, lambda p, r: response(200))
        events = captureLog(self)
        result = await check(upstream.url)
        self.assertEqual(result, HealthResult(True))
        self.assertEqual(events, [], "a passing check logs nothing (no 'Starting factory' either)")
        [request] = upstream.requests
        self.assertEqual(request.requestLine, b"GET / HTTP/1.1")
        self.assertEqual(request.headers(b"user-agent"), [f"rproxy-health/{rproxy.__version__}".encode()])
        self.assertEqual(USER_AGENT, f"rproxy-health/{rproxy.__version__}")
        self.assertEqual(request.headers(b"connection"), [b"close"])
        self.assertEqual(request.headers(b"host"), [f"127.0.0.1:{upstream.port}".encode()])
        self.assertTrue(await waitFor(lambda: len(upstream.lost) == 1), "the check's connection is closed")

    async def test_pathAndHost(self) -> None:
        """The path follows the upstream's base path (one slash between them); the Host may be set."""
        upstream = ScriptedUpstream(self, lambda p, r: response(204, b""))
        result = await check(upstream.url + "/api/", path="/health?full=1", host="app.example", method="HEAD")
        self.assertEqual(result, HealthResult(True))
        [request] = upstream.requests
        self.assertEqual(request.requestLine, b"HEAD /api/health?full=1 HTTP/1.1")
        self.assertEqual(request.headers(b"host"), [b"app.example"])

    async def test_unexpectedStatus(self) -> None:
        upstream = ScriptedUpstream(self, lambda p, r: response(500, b"x" * 100_000))
        self.assertEqual(await check(upstream.url), HealthResult(False, "status 500, expected 200-399"))
        self.assertEqual(
            await check(upstream.url, status="200,500-503"), HealthResult(True), "500 is expected this time"
        )
        self.assertEqual(await check(upstream.url, status="200"), HealthResult(False, "status 500, expected 200"))
        self.assertTrue(await waitFor(lambda: len(upstream.lost) == 3))

    async def test_body(self) -> None:
        """The body must contain the expected text, within its first BODY_LIMIT bytes."""
        upstream = ScriptedUpstream(self, lambda p, r: response(200, b'{"status": "starting"}'))
        self.assertEqual(
            await check(upstream.url, body='"ready"'), HealthResult(False, "body does not contain '\"ready\"'")
        )
        self.assertEqual(await check(upstream.url, body='"starting"'), HealthResult(True))

    async def test_bodyLimit(self) -> None:
        """Only the first BODY_LIMIT bytes are read: text beyond them is not found, and a huge body is cut."""
        body = b"a" * BODY_LIMIT + b"ready" + b"b" * 4 * BODY_LIMIT
        upstream = ScriptedUpstream(self, lambda p, r: response(200, body))
        self.assertEqual(
            await check(upstream.url, body="ready"),
            HealthResult(False, f"body does not contain 'ready' within its first {BODY_LIMIT} bytes"),
        )
        self.assertEqual(await check(upstream.url, body="aaa"), HealthResult(True))
        self.assertEqual(await check(upstream.url), HealthResult(True))

    async def test_refused(self) -> None:
        port = freePort(self)
        self.assertEqual(await check(f"http://127.0.0.1:{port}"), HealthResult(False, "connection refused"))
        self.assertEqual(await check(f"http://localhost:{port}"), HealthResult(False, "connection refused"))

    async def test_dns(self) -> None:
        """A name that cannot resolve (.invalid never does, RFC 6761)."""
        self.assertEqual(
            await check("http://upstream.invalid:8080"),
            HealthResult(False, "DNS lookup of upstream.invalid failed"),
        )

    async def test_noAnswer(self) -> None:
        """An upstream that accepts but never answers: the check times out within its timeout."""
        upstream = ScriptedUpstream(self, lambda p, r: b"")
        started = reactor.seconds()
        result = await check(upstream.url, timeout=0.2)
        elapsed = reactor.seconds() - started
        self.assertEqual(result, HealthResult(False, "timed out after 0.2s waiting for the response"))
        self.assertTrue(0.19 <= elapsed < 1.0, elapsed)
        self.assertTrue(await waitFor(lambda: len(upstream.lost) == 1), "the connection is closed")

    async def test_stalledBody(self) -> None:
        upstream = ScriptedUpstream(self, lambda p, r: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        result = await check(upstream.url, timeout=0.2)
        self.assertEqual(result, HealthResult(False, "timed out after 0.2s reading the body"))

    async def test_closedMidResponse(self) -> None:
        def respond(p: protocol.Protocol, r: ReceivedRequest) -> bytes:
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
            p.transport.loseConnection()
            return b""

        upstream = ScriptedUpstream(self, respond)
        self.assertEqual(await check(upstream.url), HealthResult(False, "connection closed mid-response"))

    async def test_closedBeforeResponse(self) -> None:
        def respond(p: protocol.Protocol, r: ReceivedRequest) -> bytes:
            p.transport.loseConnection()
            return b""

        upstream = ScriptedUpstream(self, respond)
        self.assertEqual(await check(upstream.url), HealthResult(False, "connection closed before the response"))

    async def test_notHTTP(self) -> None:
        """A response that is not HTTP gets a reason naming the parse failure."""
        upstream = ScriptedUpstream(self, lambda p, r: b"SSH-2.0-OpenSSH\r\n\r\n")
        result = await check(upstream.url)
        self.assertEqual(result, HealthResult(False, "invalid HTTP response: wrong number of parts"))

    async def test_untrustedCertificate(self) -> None:
        """An https upstream whose certificate is not trusted fails with a TLS reason."""
        server = TLSUpstream(self)
        result = await check(f"https://localhost:{server.port}")
        self.assertEqual(result, HealthResult(False, "TLS handshake failed: certificate verify failed"))
        self.assertEqual(server.requests, [], "nothing is sent before the certificate is verified")

    async def test_plainHTTPAsHTTPS(self) -> None:
        """An https upstream that speaks plain HTTP (answering the TLS hello with a 400, as servers do)."""

        class BadRequest(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                self.transport.loseConnection()

        port = listen(self, protocol.Factory.forProtocol(BadRequest)).port
        result = await check(f"https://localhost:{port}", timeout=2)
        self.assertTrue(result.reason.startswith("TLS handshake failed: "), result.reason)

    async def test_freshConnections(self) -> None:
        """Every check opens its own connection and closes it."""
        upstream = ScriptedUpstream(self, lambda p, r: response(200))
        healthCheck = HTTPHealthCheck(reactor, HealthCheckSettings())
        target = upstreamAt(upstream.url)
        for _ in range(3):
            self.assertEqual(await healthCheck.check(target), HealthResult(True))
        self.assertEqual((len(upstream.connections), len(upstream.requests)), (3, 3))
        self.assertTrue(await waitFor(lambda: len(upstream.lost) == 3))

    async def test_cancel(self) -> None:
        """A cancelled check fails with CancelledError; abortAll fires once its connection is closed."""
        upstream = ScriptedUpstream(self, lambda p, r: b"")
        healthCheck = HTTPHealthCheck(reactor, HealthCheckSettings(timeout=30))
        d = healthCheck.check(upstreamAt(upstream.url))
        self.assertTrue(await waitFor(lambda: upstream.requests))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        await healthCheck.abortAll()
        self.assertTrue(await waitFor(lambda: len(upstream.lost) == 1))
        self.assertEqual(await healthCheck.abortAll(), None, "nothing left in flight")


class TLSUpstream:
    """
    An https upstream on 127.0.0.1 with a certificate for localhost and 127.0.0.1 that no one trusts (its CA
    is its own), answering 200 to anything.
    """

    def __init__(self, testCase: unittest.TestCase) -> None:
        self.requests: list[bytes] = []
        self.connections: list[protocol.Protocol] = []
        upstream = self

        class Answer(protocol.Protocol):
            def connectionMade(self) -> None:
                upstream.connections.append(self)

            def dataReceived(self, data: bytes) -> None:
                upstream.requests.append(data)
                self.transport.write(response(200))

        factory = protocol.Factory.forProtocol(Answer)
        untrusted = CertificateAuthority().issue("localhost", ["localhost"], ["127.0.0.1"])
        port = reactor.listenSSL(0, factory, untrusted.privateCertificate().options(), interface="127.0.0.1")
        testCase.addCleanup(port.stopListening)

        def closeAll() -> None:
            for connection in self.connections:
                if connection.transport.connected:
                    connection.transport.abortConnection()

        testCase.addCleanup(closeAll)
        self.port = port.getHost().port


class Switchable:
    """A scripted upstream's answers, set by the test; it notes whether the upstream was up at each request."""

    def __init__(self, testCase: unittest.TestCase, status: int = 200) -> None:
        self.status = status
        self.upstreamsUp: list[bool] = []
        self.answered: list[int] = []
        self.server = ScriptedUpstream(testCase, self.respond)
        self.upstream = upstreamAt(self.server.url)

    def respond(self, p: protocol.Protocol, r: ReceivedRequest) -> bytes:
        self.upstreamsUp.append(self.upstream.health.activeUp)
        self.answered.append(self.status)
        return response(self.status)

    @property
    def checks(self) -> int:
        return len(self.server.requests)


class HealthCheckerTests(unittest.TestCase):
    """L{HealthChecker} over a registry, with real checks at short intervals."""

    def startChecker(
        self,
        registry: MemoryRegistry,
        settings: dict[str, HealthCheckSettings] | None = None,
        report: Callable[[Verdict], None] | None = None,
        **kwargs: object,
    ) -> HealthChecker:
        if settings is None:
            defaults: dict[str, object] = {"interval": 0.05, "timeout": 1.0, "rise": 2, "fall": 2}
            defaults.update(kwargs)
            settings = {"default": HealthCheckSettings(**defaults)}  # type: ignore[arg-type]
        checker = HealthChecker(reactor, registry, settings, report)
        checker.startService()
        self.addCleanup(lambda: checker.running and checker.stopService())
        return checker

    async def test_fallAndRise(self) -> None:
        """Down after `fall` failed checks in a row, up after `rise` passes; the reason is kept."""
        switchable = Switchable(self, status=500)
        registry = MemoryRegistry()
        registry.add("default", switchable.upstream)
        events = captureLog(self)
        self.startChecker(registry)
        health = switchable.upstream.health
        self.assertTrue(await waitFor(lambda: switchable.checks >= 4))
        switchable.status = 200
        self.assertTrue(await waitFor(lambda: switchable.answered[-3:] == [200, 200, 200]))
        # As each check arrives, the upstream was: up for the 1st and 2nd, down from the 3rd (after two
        # failures) while it keeps failing, and after the first pass, still down for one more, then up.
        observed = switchable.upstreamsUp
        firstPass = switchable.answered.index(200)
        self.assertGreaterEqual(firstPass, 4)
        self.assertEqual(observed[: firstPass + 1], [True, True] + [False] * (firstPass - 1))
        self.assertEqual(observed[firstPass + 1 : firstPass + 3], [False, True])
        self.assertEqual((health.state, health.reason), ("up", "status 500, expected 200-399"))
        self.assertIn(switchable.upstream, registry.lookup("default"))
        down = [e for e in events if "is down after" in e.get("log_format", "")]
        up = [e for e in events if "is up again" in e.get("log_format", "")]
        self.assertEqual(len(down), 1)
        self.assertEqual(len(up), 1)
        self.assertEqual(down[0]["log_level"], LogLevel.warn)
        self.assertEqual(
            (down[0]["service"], down[0]["upstream"], down[0]["reason"]),
            ("default", switchable.upstream.key, "status 500, expected 200-399"),
        )
        failures = [e for e in events if "health check of upstream" in e.get("log_format", "")]
        self.assertEqual(
            [e["log_level"] for e in failures[:2]], [LogLevel.info, LogLevel.debug], "while down, a repeat is debug"
        )

    async def test_downLeavesLookup(self) -> None:
        """An upstream marked down by its checks is not offered to balancers."""
        failing, healthy = Switchable(self, status=503), Switchable(self, status=200)
        registry = MemoryRegistry()
        registry.add("default", failing.upstream)
        registry.add("default", healthy.upstream)
        self.startChecker(registry, fall=1)
        self.assertTrue(await waitFor(lambda: failing.upstream.health.state == "down"))
        self.assertEqual(registry.lookup("default"), (healthy.upstream,))
        self.assertEqual(failing.upstream.health.reason, "status 503, expected 200-399")

    async def test_reported(self) -> None:
        """
        The verdict on each upstream is reported after its first check and at each change (of the verdict, or
        of the reason it is down for), not at each check; an upstream removed from the service is reported as
        no longer checked.
        """
        switchable = Switchable(self, status=200)
        registry = MemoryRegistry()
        registry.add("default", switchable.upstream)
        reported: list[Verdict] = []
        self.startChecker(registry, report=reported.append)
        key = switchable.upstream.key
        self.assertTrue(await waitFor(lambda: switchable.checks >= 3))
        self.assertEqual(reported, [Verdict("default", key, True)])
        switchable.status = 500
        self.assertTrue(await waitFor(lambda: len(reported) == 2))
        self.assertEqual(reported[1], Verdict("default", key, False, "status 500, expected 200-399"))
        checks = switchable.checks
        self.assertTrue(await waitFor(lambda: switchable.checks >= checks + 2))
        switchable.status = 503
        self.assertTrue(await waitFor(lambda: len(reported) == 3))
        self.assertEqual(reported[2], Verdict("default", key, False, "status 503, expected 200-399"))
        switchable.status = 200
        self.assertTrue(await waitFor(lambda: len(reported) == 4))
        self.assertEqual(reported[3], Verdict("default", key, True))
        checks = switchable.checks
        self.assertTrue(await waitFor(lambda: switchable.checks >= checks + 3))
        self.assertEqual(len(reported), 4)
        registry.remove("default", switchable.upstream)
        self.assertEqual(reported[4:], [Verdict("default", key, None)])

    async def test_firstCheckPrompt(self) -> None:
        """The first check comes at the start, not an interval later; the next one an interval later."""
        switchable = Switchable(self)
        registry = MemoryRegistry()
        registry.add("default", switchable.upstream)
        self.startChecker(registry, interval=5.0)
        self.assertTrue(await waitFor(lambda: switchable.checks == 1, timeout=2.0))  # not an interval later
        await sleep(0.3)
        self.assertEqual(switchable.checks, 1)

    async def test_membershipChanges(self) -> None:
        """Added upstreams are checked, removed ones no longer; services without settings are not checked."""
        first, second, other = Switchable(self), Switchable(self), Switchable(self)
        registry = MemoryRegistry()
        registry.add("default", first.upstream)
        registry.add("other", other.upstream)
        checker = self.startChecker(registry)
        self.assertTrue(await waitFor(lambda: first.checks >= 2))
        registry.add("default", second.upstream)
        self.assertTrue(await waitFor(lambda: second.checks >= 2))
        registry.remove("default", first.upstream)
        removedAt = first.checks
        await sleep(0.3)
        self.assertEqual(first.checks, removedAt)
        self.assertGreaterEqual(second.checks, 4)
        self.assertEqual(other.checks, 0)
        await checker.stopService()

    async def test_removedInFlight(self) -> None:
        """Removing an upstream aborts its check in flight, leaving its health alone."""
        server = ScriptedUpstream(self, lambda p, r: b"")
        upstream = upstreamAt(server.url)
        registry = MemoryRegistry()
        registry.add("default", upstream)
        self.startChecker(registry, timeout=30.0, fall=1)
        self.assertTrue(await waitFor(lambda: server.requests))
        registry.remove("default", upstream)
        self.assertTrue(await waitFor(lambda: len(server.lost) == 1, timeout=1.0))
        await sleep(0.2)
        self.assertEqual((len(server.requests), upstream.health.state, upstream.health.reason), (1, "up", ""))

    async def test_oneCheckAtATime(self) -> None:
        """A slow answer is waited for: an upstream never has two checks in flight."""
        open: list[int] = []
        answers: list[IDelayedCall] = []
        self.addCleanup(lambda: [answer.cancel() for answer in answers if answer.active()])

        def respond(p: protocol.Protocol, r: ReceivedRequest) -> bytes:
            open.append(len(server.connections) - len(server.lost))
            answers.append(reactor.callLater(0.15, p.transport.write, response(200)))
            return b""

        server = ScriptedUpstream(self, respond)
        upstream = upstreamAt(server.url)
        registry = MemoryRegistry()
        registry.add("default", upstream)
        checker = self.startChecker(registry, interval=0.01)
        self.assertTrue(await waitFor(lambda: len(server.requests) >= 3))
        await checker.stopService()
        self.assertEqual(set(open), {1})
        self.assertTrue(await waitFor(lambda: len(server.lost) == len(server.connections)))

    async def test_stopService(self) -> None:
        """Stopping aborts the checks in flight and fires once their connections are closed; no timer is left."""
        hung = ScriptedUpstream(self, lambda p, r: b"")
        idle = Switchable(self)
        registry = MemoryRegistry()
        registry.add("default", upstreamAt(hung.url))
        registry.add("default", idle.upstream)
        checker = self.startChecker(registry, interval=5.0, timeout=30.0)
        self.assertTrue(await waitFor(lambda: hung.requests and idle.checks == 1))
        started = reactor.seconds()
        await checker.stopService()
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertFalse(checker.running)
        self.assertTrue(await waitFor(lambda: len(hung.lost) == 1, timeout=1.0))
        leftover = [call for call in reactor.getDelayedCalls() if call.func.__module__ == "rproxy.health.checks"]
        self.assertEqual(leftover, [], "no check is scheduled, no check's deadline is pending")
        registry.add("default", upstreamAt(idle.server.url + "/other"))
        await sleep(0.1)
        self.assertEqual(idle.checks, 1, "a stopped checker no longer watches the registry")

    async def test_restart(self) -> None:
        """A stopped checker starts again where the registry is now."""
        switchable = Switchable(self)
        registry = MemoryRegistry()
        registry.add("default", switchable.upstream)
        checker = self.startChecker(registry)
        self.assertTrue(await waitFor(lambda: switchable.checks >= 1))
        await checker.stopService()
        stoppedAt = switchable.checks
        checker.startService()
        self.assertTrue(await waitFor(lambda: switchable.checks >= stoppedAt + 2))


class VerdictFollowerTests(unittest.TestCase):
    """L{VerdictFollower}: another process's verdicts applied to this process's upstreams."""

    def test_appliedAsToldAndAsTheyAppear(self) -> None:
        """
        A verdict marks its upstream down or up, whether the upstream is there when it is told or comes
        later; one for an upstream no longer checked is forgotten; verdicts survive as JSON messages.
        """
        registry = MemoryRegistry()
        present, later = upstreamAt("http://127.0.0.1:1"), upstreamAt("http://127.0.0.1:2")
        registry.add("default", present)
        follower = VerdictFollower(registry)
        follower.told(Verdict("default", later.key, False, "status 503"))
        follower.startService()
        self.addCleanup(follower.stopService)
        follower.told(Verdict.fromMessage(Verdict("default", present.key, False, "refused").message()))
        self.assertEqual((present.health.state, present.health.reason), ("down", "refused"))
        self.assertEqual(registry.lookup("default"), ())
        registry.add("default", later)
        self.assertEqual((later.health.state, later.health.reason), ("down", "status 503"))
        follower.told(Verdict("default", present.key, True))
        self.assertEqual(present.health.state, "up")
        self.assertEqual(registry.lookup("default"), (present,))
        # Removed, then no longer checked: added again, it is not marked down by what was said before.
        registry.remove("default", later)
        follower.told(Verdict("default", later.key, None))
        again = upstreamAt(later.key)
        registry.add("default", again)
        self.assertEqual(again.health.state, "up")
        # Another service's upstream of the same address is another upstream.
        other = upstreamAt(present.key)
        registry.add("other", other)
        follower.told(Verdict("default", present.key, False, "refused"))
        self.assertEqual((present.health.state, other.health.state), ("down", "up"))
