"""
Real-socket fixtures for rproxy's tests: a proxy and upstreams on 127.0.0.1, and real clients::

    upstream = startUpstream(self, demoSite())        # any twisted.web site as an upstream
    scripted = ScriptedUpstream(self, respond)        # a raw upstream that answers with exact bytes
    proxy = startProxy(self, [upstream.url], "--rewrite-host")
    head, body = await rawRequest(proxy.port, b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    code, out, err = await curl(["-s", proxy.url + "/echo"])
    dom = await dumpDOM(self, url)                    # the DOM Debian's headless Chromium made of a page

Everything listens on an ephemeral port and is torn down by the test's cleanups.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, reactor, task, utils
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import server
from zope.interface import implementer, provider

from rproxy.app.build import buildSite, healthChecker
from rproxy.app.tap import Options
from rproxy.downstream.site import ProxySite
from rproxy.filters.chain import FilterChain
from rproxy.interfaces import IDirector
from rproxy.proxy.message import InboundRequest, OutboundRequest
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.service import Service
from rproxy.upstream.upstreams import Upstream

#: Python of this environment, for subprocess-based tests.
PYTHON = sys.executable
BIN = os.path.dirname(sys.executable)
#: The checkout (or the directory rproxy is installed in) holding the C{rproxy} package.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Listening:
    """A server listening on 127.0.0.1."""

    port: int
    listener: IListeningPort

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class RunningProxy(Listening):
    """An in-process proxy: its site, upstreams and registry, to inspect pools and connections."""

    site: ProxySite = field(default=None)  # type: ignore[assignment]
    upstreams: list[Upstream] = field(default_factory=list)
    registry: MemoryRegistry = field(default_factory=MemoryRegistry)


def listen(testCase: unittest.TestCase, factory: protocol.Factory) -> Listening:
    """Listen on an ephemeral loopback port until the test ends (closing open connections)."""
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testCase.addCleanup(port.stopListening)
    return Listening(port.getHost().port, port)


def startUpstream(testCase: unittest.TestCase, site: server.Site) -> Listening:
    """Serve C{site} as an upstream."""
    return listen(testCase, site)


def startProxy(testCase: unittest.TestCase, upstreamURLs: list[str], *arguments: str) -> RunningProxy:
    """
    An rproxy in this process, configured by command-line C{arguments}, in front of C{upstreamURLs}.
    """
    options = Options()
    argv = [a for url in upstreamURLs for a in ("--upstream", url)]
    options.parseOptions([*argv, "--access-log", "off", *arguments])
    registry = MemoryRegistry()
    site, upstreams = buildSite(options.config, reactor, registry)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    checker = healthChecker(options.config, reactor, registry)
    if checker is not None:
        checker.startService()
        testCase.addCleanup(checker.stopService)

    def stop() -> defer.Deferred[None]:
        for connection in list(site.connections):
            connection.transport.abortConnection()
        for upstream in upstreams:
            upstream.pool.drain("is closing: the proxy is shutting down")
        return defer.maybeDeferred(port.stopListening)

    testCase.addCleanup(stop)
    return RunningProxy(port.getHost().port, port, site, upstreams, registry)


@implementer(IDirector)
class _Filtered:
    """A director whose services go through a chain of filters (as a user's code would set one up)."""

    def __init__(self, inner: IDirector, chain: FilterChain) -> None:
        self.inner = inner
        self.chain = chain

    def direct(self, inbound: InboundRequest, outbound: OutboundRequest) -> Service | None:
        service = self.inner.direct(inbound, outbound)
        return None if service is None else dataclasses.replace(service, filters=self.chain)


def useFilters(running: RunningProxy, *filters: object) -> None:
    """Send every request of C{running} through C{filters} (replacing filters set before)."""
    proxy = running.site.resource.proxy
    inner = proxy.director.inner if isinstance(proxy.director, _Filtered) else proxy.director
    proxy.director = _Filtered(inner, FilterChain((f"filter{i}", each) for i, each in enumerate(filters)))


@dataclass
class ReceivedRequest:
    """A request as a L{ScriptedUpstream} received it, unparsed beyond its framing."""

    head: bytes
    body: bytes

    @property
    def requestLine(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def headers(self, name: bytes) -> list[bytes]:
        """Every value of field C{name} (case-insensitive), in order."""
        wanted = name.lower()
        values = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                values.append(value.strip())
        return values


class _ScriptedProtocol(protocol.Protocol):
    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.received = b""  # every byte that arrived, exactly

    def connectionMade(self) -> None:
        self.upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.buffer += data
        while True:
            request = _takeRequest(self)
            if request is None:
                return
            self.upstream.requests.append(request)
            answer = self.upstream.respond(self, request)
            if answer:
                self.transport.write(answer)

    def connectionLost(self, reason: object) -> None:
        self.upstream.lost.append(self)
        for waiter in self.upstream._lostWaiters:
            if not waiter.called:
                waiter.callback(None)


def _takeRequest(proto: _ScriptedProtocol) -> ReceivedRequest | None:
    """Cut one complete request (head and Content-Length or chunked body) off the buffer."""
    buffer = proto.buffer
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = buffer[:end], buffer[end + 4 :]
    request = ReceivedRequest(head, b"")
    length = request.headers(b"content-length")
    if length:
        size = int(length[0])
        if len(rest) < size:
            return None
        request.body, rest = rest[:size], rest[size:]
    elif b"chunked" in b",".join(request.headers(b"transfer-encoding")).lower():
        body = b""
        position = 0
        while True:
            eol = rest.find(b"\r\n", position)
            if eol < 0:
                return None
            size = int(rest[position:eol].split(b";")[0], 16)
            if size == 0:
                final = rest.find(b"\r\n\r\n", eol)
                if final < 0:
                    return None
                rest = rest[final + 4 :]
                break
            if len(rest) < eol + 2 + size + 2:
                return None
            body += rest[eol + 2 : eol + 2 + size]
            position = eol + 2 + size + 2
        request.body = body
    proto.buffer = rest
    return request


class ScriptedUpstream:
    """
    A raw TCP upstream: C{respond(protocol, request)} returns the exact response bytes (or writes
    them itself through C{protocol.transport} and returns C{b""}).
    """

    def __init__(
        self,
        testCase: unittest.TestCase,
        respond: Callable[[_ScriptedProtocol, ReceivedRequest], bytes],
    ) -> None:
        self.respond = respond
        self.requests: list[ReceivedRequest] = []
        self.connections: list[_ScriptedProtocol] = []
        self.lost: list[_ScriptedProtocol] = []
        self._lostWaiters: list[defer.Deferred[None]] = []
        factory = protocol.Factory.forProtocol(lambda: _ScriptedProtocol(self))
        factory.noisy = False
        self.listening = listen(testCase, factory)

        def closeAll() -> None:
            for connection in self.connections:
                if connection.transport.connected:
                    connection.transport.abortConnection()

        testCase.addCleanup(closeAll)

    @property
    def url(self) -> str:
        return self.listening.url

    @property
    def port(self) -> int:
        return self.listening.port

    @property
    def received(self) -> list[bytes]:
        """The exact bytes each connection received, in the order the connections were made."""
        return [connection.received for connection in self.connections]

    def connectionLost(self) -> defer.Deferred[None]:
        """Fires when the next upstream connection closes."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._lostWaiters.append(waiter)
        return waiter


class _Collector(protocol.Protocol):
    def __init__(self, payload: bytes, done: defer.Deferred[bytes], closeAfter: bool) -> None:
        self.payload = payload
        self.done = done
        self.received = b""
        self.closeAfter = closeAfter

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        if self.closeAfter:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        if not self.done.called:
            self.done.callback(self.received)


def rawRequest(port: int, payload: bytes, timeout: float = 10.0, halfClose: bool = False) -> defer.Deferred[bytes]:
    """
    Send C{payload} to 127.0.0.1:C{port} and collect everything until the server closes (or
    C{timeout} passes: then whatever arrived).
    """
    done: defer.Deferred[bytes] = defer.Deferred()
    creator = protocol.ClientCreator(reactor, _Collector, payload, done, halfClose)
    connecting = creator.connectTCP("127.0.0.1", port)

    def timedOut() -> None:
        if not done.called:
            connecting.addCallback(lambda p: p.transport.abortConnection())

    call = reactor.callLater(timeout, timedOut)
    done.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
    return done


class _Trickler(protocol.Protocol):
    """Sends its payload a piece at a time, C{interval} seconds apart, and keeps what comes back."""

    def __init__(self, payload: bytes, piece: int, interval: float, done: defer.Deferred[bytes]) -> None:
        self.payload = payload
        self.piece = piece
        self.interval = interval
        self.done = done
        self.received = b""
        self.call: Any = None

    def connectionMade(self) -> None:
        self.sendPiece()

    def sendPiece(self) -> None:
        piece, self.payload = self.payload[: self.piece], self.payload[self.piece :]
        self.transport.write(piece)
        if self.payload:
            self.call = reactor.callLater(self.interval, self.sendPiece)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.done.callback(self.received)


async def trickle(
    port: int, payload: bytes, interval: float, piece: int = 1, timeout: float = 10.0
) -> tuple[bytes, float]:
    """
    Send C{payload} to 127.0.0.1:C{port} C{piece} bytes at a time, C{interval} seconds apart (a slowloris
    client); return what came back once the server closed, and after how many seconds.
    """
    done: defer.Deferred[bytes] = defer.Deferred()
    started = reactor.seconds()
    connected = await protocol.ClientCreator(reactor, _Trickler, payload, piece, interval, done).connectTCP(
        "127.0.0.1", port
    )
    call = reactor.callLater(timeout, connected.transport.abortConnection)
    received = await done
    if call.active():
        call.cancel()
    return received, reactor.seconds() - started


def responseStatus(head: bytes) -> int:
    """The status code of a raw response head (or of a whole raw response)."""
    return int(head.split(b"\r\n", 1)[0].split(b" ")[1])


def headerValues(head: bytes, name: bytes) -> list[bytes]:
    """Every value of field C{name} (case-insensitive) in a raw response head, in order."""
    wanted = name.lower()
    return [
        value.strip()
        for key, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        if key.strip().lower() == wanted
    ]


def splitResponses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a byte stream of Content-Length-framed (or bodiless) responses into (head, body)."""
    responses = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head, data = data[:end], data[end + 4 :]
        size = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                size = int(value)
        responses.append((head, data[:size]))
        data = data[size:]
    return responses


def curl(arguments: list[str], timeout: float = 30.0) -> defer.Deferred[tuple[int, bytes, bytes]]:
    """Run curl (a real HTTP client) and return (exit code, stdout, stderr)."""
    d = utils.getProcessOutputAndValue("curl", ["--max-time", str(timeout), *arguments], env=os.environ)
    return d.addCallback(lambda result: (result[2], result[0], result[1]))


def sleep(seconds: float) -> defer.Deferred[None]:
    """Wait without blocking the reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


async def waitFor(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll C{predicate} until it is true (C{True}) or C{timeout} seconds pass (C{False})."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await sleep(0.01)
    return True


def freePort() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Debian's Chromium, which browser tests drive headless (make test installs it).
CHROMIUM = "/usr/bin/chromium"

#: Headless, without anything that would reach outside 127.0.0.1 or wait for a GPU; --virtual-time-budget lets
#: the page's scripts and fetches run before the DOM is dumped or the screenshot taken (virtual time stands
#: still while requests are pending, and runs ahead of the clock when nothing is).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]


class _Collected(protocol.ProcessProtocol):
    """Keeps a process's output until it ends."""

    def __init__(self, ended: defer.Deferred[tuple[bytes, bytes, int | None]]) -> None:
        self.ended = ended
        self.out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-4000:]

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((self.out, self.err, getattr(reason.value, "exitCode", None)))


async def chromium(testCase: unittest.TestCase, arguments: list[str], timeout: float = 30.0) -> bytes:
    """
    Run a headless Chromium with L{CHROMIUM_FLAGS}, a profile of its own and C{arguments}, killed after
    C{timeout} seconds; fail C{testCase} unless it exits with 0; return what it wrote to its standard output.
    """
    testCase.assertTrue(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: make test installs it")
    profile = os.path.abspath(testCase.mktemp())
    os.makedirs(profile)
    ended: defer.Deferred[tuple[bytes, bytes, int | None]] = defer.Deferred()
    argv = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments]
    process = reactor.spawnProcess(
        _Collected(ended), CHROMIUM, argv, env={"HOME": profile, "PATH": os.environ.get("PATH", "/usr/bin")}
    )
    killer = reactor.callLater(timeout, process.signalProcess, "KILL")
    out, err, code = await ended
    if killer.active():
        killer.cancel()
    testCase.assertEqual(code, 0, f"chromium failed or timed out after {timeout} s: {err.decode('utf-8', 'replace')}")
    return out


async def dumpDOM(testCase: unittest.TestCase, url: str, timeout: float = 30.0) -> str:
    """Load C{url} in a headless L{chromium}; return the DOM once scripts are done."""
    return (await chromium(testCase, ["--dump-dom", url], timeout)).decode("utf-8")


class _ReadyProtocol(protocol.ProcessProtocol):
    def __init__(self, ready: defer.Deferred[None]) -> None:
        self.ready = ready
        self.exited: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: object) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"upstream process ended before it was ready: {self.output!r}"))
        self.exited.callback(None)


class UpstreamProcess:
    """
    A L{rproxy.test.upstream_process} server in its own process on 127.0.0.1, to be killed and
    restarted; it answers C{NAME METHOD <body length>}.
    """

    def __init__(self, testCase: unittest.TestCase, name: str, port: int | None = None) -> None:
        self.testCase = testCase
        self.name = name
        self.port = port or freePort()
        self._protocol: _ReadyProtocol | None = None
        testCase.addCleanup(self.kill)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> defer.Deferred[None]:
        """Start the process; fires once it listens."""
        ready: defer.Deferred[None] = defer.Deferred()
        self._protocol = _ReadyProtocol(ready)
        argv = [PYTHON, "-m", "rproxy.test.upstream_process", str(self.port), self.name]
        reactor.spawnProcess(self._protocol, PYTHON, argv, env=os.environ)
        return ready

    def kill(self) -> defer.Deferred[None]:
        """SIGKILL the process; fires once it is gone."""
        proto, self._protocol = self._protocol, None
        if proto is None or proto.exited.called:
            return defer.succeed(None)
        proto.transport.signalProcess("KILL")
        return proto.exited


class LogCapture:
    """Collects the log events of rproxy's namespaces for the duration of a test."""

    def __init__(self, testCase: unittest.TestCase) -> None:
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace", "").startswith("rproxy"):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        testCase.addCleanup(globalLogPublisher.removeObserver, observe)

    def withStatus(self, status: int) -> list[LogEvent]:
        """The events of errors answered with C{status}."""
        return [e for e in self.events if e.get("status") == status]

    def formatted(self) -> list[str]:
        """Every event as its message reads."""
        return [formatEvent(event) for event in self.events]
