"""
Graceful shutdown of a real ``twist rproxy`` process: SIGTERM stops accepting, lets the exchanges in
flight finish, and resets what is left when the grace period ends.

The process helpers here (L{ProxyProcess}, L{freePort}, L{waitUntilListening}) are shared with
L{rproxy.test.test_tac}.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping, Sequence

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rproxy.test.support import BIN, ROOT, ReceivedRequest, ScriptedUpstream, sleep, waitFor


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class ProxyProcess(protocol.ProcessProtocol):
    """
    A child process, its output, and when and how it ended.

    @ivar exitedAt: C{reactor.seconds()} when it ended, or C{None}.
    @ivar exitCode: its exit code once ended (C{None} if a signal killed it).
    """

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.exitedAt: float | None = None
        self.exitCode: int | None = None
        self.signal: int | None = None
        self._waiters: list[defer.Deferred[None]] = []

    @classmethod
    def spawn(
        cls,
        testCase: unittest.TestCase,
        argv: Sequence[str],
        environ: Mapping[str, str] | None = None,
    ) -> ProxyProcess:
        """Start C{argv} from the repository root; the test's cleanup kills it if still running."""
        process = cls()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
        env.update(environ or {})
        reactor.spawnProcess(process, argv[0], list(argv), env=env, path=ROOT)

        def kill() -> defer.Deferred[None] | None:
            if process.exitedAt is not None:
                return None
            try:
                process.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            return process.ended()

        testCase.addCleanup(kill)
        return process

    @property
    def running(self) -> bool:
        return self.exitedAt is None

    @property
    def log(self) -> str:
        """Everything the process wrote, for failure messages."""
        return b"".join(self.output).decode("utf-8", "replace")

    def terminate(self) -> float:
        """Send SIGTERM; return when."""
        self.transport.signalProcess("TERM")
        return reactor.seconds()

    def ended(self) -> defer.Deferred[None]:
        """Fires once the process has ended."""
        if self.exitedAt is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    async def waitForExit(self, testCase: unittest.TestCase, timeout: float) -> float:
        """Wait up to C{timeout} seconds for the process to end; return when it did."""
        deadline = reactor.seconds() + timeout
        while self.exitedAt is None:
            if reactor.seconds() >= deadline:
                testCase.fail(f"the process still runs after {timeout:g}s; its log:\n{self.log}")
            await sleep(0.02)
        return self.exitedAt

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    def errReceived(self, data: bytes) -> None:
        self.output.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.exitedAt = reactor.seconds()
        self.exitCode = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


def assertCleanExit(testCase: unittest.TestCase, process: ProxyProcess) -> None:
    """
    The process ended after an orderly shutdown: exit code 0, or -- what C{twist} and C{twistd} do
    after a shutdown that SIGTERM started -- SIGTERM re-raised with its default action
    (C{twisted.application.app._exitWithSignal}), which systemd also counts as a clean stop.
    """
    clean = process.exitCode == 0 or (process.exitCode is None and process.signal == signal.SIGTERM)
    testCase.assertTrue(
        clean,
        f"exit code {process.exitCode}, signal {process.signal}; its log:\n{process.log}",
    )
    testCase.assertIn("Main loop terminated", process.log)


async def tryConnect(port: int) -> bool:
    """Whether 127.0.0.1:C{port} accepts a connection (closed again at once)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
    try:
        connected = await connectProtocol(endpoint, protocol.Protocol())
    except (error.ConnectionRefusedError, error.TimeoutError):
        return False
    connected.transport.abortConnection()
    return True


async def waitUntilListening(
    testCase: unittest.TestCase, process: ProxyProcess, port: int, timeout: float = 15.0
) -> None:
    """Wait until the process accepts connections on C{port}; fail if it exits or takes too long."""
    deadline = reactor.seconds() + timeout
    while not await tryConnect(port):
        if not process.running:
            testCase.fail(f"the process exited ({process.exitCode}) before listening:\n{process.log}")
        if reactor.seconds() >= deadline:
            testCase.fail(f"nothing listens on port {port} after {timeout:g}s:\n{process.log}")
        await sleep(0.05)


class ClientExchange(protocol.Protocol):
    """One raw client connection: what it received, and when and how it ended."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.endedAt: float | None = None
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.endedAt = reactor.seconds()
        self.reason = reason


async def startExchange(testCase: unittest.TestCase, port: int, payload: bytes) -> ClientExchange:
    exchange = ClientExchange(payload)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), exchange)

    def close() -> None:
        if exchange.endedAt is None:
            exchange.transport.abortConnection()

    testCase.addCleanup(close)
    return exchange


def startTwist(testCase: unittest.TestCase, upstreamURL: str, grace: str) -> tuple[ProxyProcess, int]:
    port = freePort()
    argv = [
        os.path.join(BIN, "twist"),
        "rproxy",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--upstream",
        upstreamURL,
        "--grace",
        grace,
        "--access-log",
        "off",
    ]
    return ProxyProcess.spawn(testCase, argv), port


REQUEST = b"GET /slow HTTP/1.1\r\nHost: test.example\r\n\r\n"


class DrainTests(unittest.TestCase):
    """SIGTERM drains a running proxy."""

    timeout = 30

    async def test_inFlightExchangeCompletes(self) -> None:
        """
        After SIGTERM the listener closes at once, the exchange in flight (its upstream answers once the
        listener is seen closed) completes with 200 on its keep-alive connection, which then closes, and the
        process exits with code 0 as soon as that is done, well before the 5 s grace period.
        """
        waiting: list[protocol.Protocol] = []

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            waiting.append(proto)
            return b""

        upstream = ScriptedUpstream(self, respond)
        process, port = startTwist(self, upstream.url, "5")
        await waitUntilListening(self, process, port)

        exchange = await startExchange(self, port, REQUEST)
        self.assertTrue(await waitFor(lambda: upstream.requests, 5.0), process.log)
        terminatedAt = process.terminate()

        refused = False
        while not refused and reactor.seconds() < terminatedAt + 3.0:
            refused = not await tryConnect(port)
            if not refused:
                await sleep(0.05)
        self.assertTrue(refused, "new connections are still accepted 3 s after SIGTERM")
        self.assertIsNone(exchange.endedAt, "the exchange in flight was cut short")

        body = b"slow answer"
        [upstreamSide] = waiting
        upstreamSide.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answeredAt = reactor.seconds()
        self.assertTrue(await waitFor(lambda: exchange.endedAt is not None, 6.0), process.log)
        head, _, received = exchange.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), exchange.received)
        self.assertEqual(received, body)
        assert exchange.endedAt is not None
        self.assertLess(exchange.endedAt - answeredAt, 3.0, "the drained connection stayed open")

        exitedAt = await process.waitForExit(self, 6.0)
        assertCleanExit(self, process)
        self.assertGreaterEqual(exitedAt, exchange.endedAt - 0.05, "exited before the exchange ended")
        self.assertLess(exitedAt - exchange.endedAt, 3.0, "did not exit soon after the exchange ended")

    async def test_graceExpires(self) -> None:
        """
        An exchange whose upstream never answers is reset when the grace period (1 s) ends, and
        the process exits then.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: b"")
        process, port = startTwist(self, upstream.url, "1")
        await waitUntilListening(self, process, port)

        exchange = await startExchange(self, port, REQUEST)
        self.assertTrue(await waitFor(lambda: upstream.requests, 5.0), process.log)
        terminatedAt = process.terminate()

        exitedAt = await process.waitForExit(self, 8.0)
        assertCleanExit(self, process)
        self.assertTrue(
            0.8 <= exitedAt - terminatedAt <= 3.5,
            f"exited {exitedAt - terminatedAt:.2f}s after SIGTERM, not after the 1s grace period",
        )

        self.assertTrue(await waitFor(lambda: exchange.endedAt is not None, 2.0))
        assert exchange.endedAt is not None and exchange.reason is not None
        self.assertEqual(exchange.received, b"", "a response that was never complete")
        self.assertTrue(exchange.reason.check(error.ConnectionLost, error.ConnectionDone))
        self.assertGreaterEqual(exchange.endedAt - terminatedAt, 0.8, "reset before the grace ended")

    async def test_graceExpiresMidResponse(self) -> None:
        """
        A response the end of the grace period cuts off must not look complete: an HTTP/1.0
        client, whose response body ends where the connection ends, gets a reset, not a clean
        close.
        """
        partial = b"HTTP/1.1 200 OK\r\n\r\npartial"  # close-delimited, and never finished
        upstream = ScriptedUpstream(self, lambda proto, request: partial)
        process, port = startTwist(self, upstream.url, "1")
        await waitUntilListening(self, process, port)

        request = b"GET /stream HTTP/1.0\r\nHost: test.example\r\n\r\n"
        exchange = await startExchange(self, port, request)
        self.assertTrue(await waitFor(lambda: b"partial" in exchange.received, 5.0), process.log)
        process.terminate()

        await process.waitForExit(self, 8.0)
        assertCleanExit(self, process)
        self.assertTrue(await waitFor(lambda: exchange.endedAt is not None, 2.0))
        assert exchange.reason is not None
        self.assertTrue(
            exchange.reason.check(error.ConnectionLost),
            f"{exchange.reason.value}: the truncated response {exchange.received!r} looks complete",
        )
