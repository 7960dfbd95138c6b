"""
The C{buffer} filter on a running proxy, through real sockets and real clients.

The demo of issue 16, scaled down to keep the test short: an upstream that serves one connection at a
time (a blocking server in its own process), one client uploading 320 KiB at 100 KiB/s (the issue's 10 MB
at 100 KB/s would take 100 s), and other clients asking meanwhile: with the filter they are served within
a second, without it they wait for the upload.  Then the bad cases (a body over the limit by its
C{Content-Length} or as it arrives chunked, a client that stops or vanishes mid-upload, a full disk),
every way an exchange ends (a later filter's answer, a reload, the proxy stopping), C{Expect:
100-continue}, a retry sending a spooled body again, HTTP/2 clients and upstreams, response buffering
freeing the upstream while a client does not read, and the memory of a proxy process moving 96 MiB each
way.  After every case the spool directory is empty, no file descriptor of this process points into it
(the temporary files have no name, so the descriptors are what would leak), and none was left for the
garbage collector to close.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import socket

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource, server, static
from zope.interface import implementer

from rproxy.downstream import spool
from rproxy.downstream.spool import SpoolSettings
from rproxy.filters.buffer import Buffer
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.plugins.filters import buffer
from rproxy.proxy.message import LocalResponse, RequestContext
from rproxy.test.h2client import H2Client
from rproxy.test.h2upstream import H2Upstream, ServerStream
from rproxy.test.support import (
    PYTHON,
    LogCapture,
    ReceivedRequest,
    ScriptedUpstream,
    curl,
    freePort,
    headerValues,
    rawRequest,
    responseStatus,
    sleep,
    startProxy,
    startUpstream,
    trickle,
    useFilters,
    waitFor,
)
from rproxy.testing import Clock, inboundRequest, runFilters, verifyFilterFactory

#: A blocking HTTP/1.1 server that accepts one connection, reads its request whole, answers with what it
#: got, closes, and only then accepts the next (as a single-threaded application server does).
ONE_AT_A_TIME = r"""
import hashlib, socket
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
def read(connection, data):
    more = connection.recv(65536)
    if not more:
        raise EOFError("the client closed its connection")
    return data + more
while True:
    connection, _ = listener.accept()
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            data = read(connection, data)
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body = read(connection, body)
    except EOFError:
        connection.close()
        continue
    answer = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer))
    connection.close()
"""

MiB = 1 << 20

#: The slow upload of the demo: 320 KiB, 10 KiB every 0.1 s.
SLOW_BODY = bytes(range(256)) * 1280
SLOW_PIECE = 10240
SLOW_INTERVAL = 0.1


class _PortPrinter(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.port: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" in self._out and not self.port.called:
            self.port.callback(int(self._out.split(b"\n")[0]))

    def processEnded(self, reason: object) -> None:
        if not self.port.called:
            self.port.errback(AssertionError(f"the upstream process ended before listening: {reason}"))
        self.ended.callback(None)


async def oneAtATime(testCase: unittest.TestCase) -> int:
    """Start the L{ONE_AT_A_TIME} server; return its port (it is killed when the test ends)."""
    printer = _PortPrinter()
    process = reactor.spawnProcess(printer, PYTHON, [PYTHON, "-c", ONE_AT_A_TIME], env=os.environ)

    def kill() -> defer.Deferred[None]:
        if not printer.ended.called:
            process.signalProcess("KILL")
        return printer.ended

    testCase.addCleanup(kill)
    return await printer.port


def spoolsIn(directory: str) -> list[str]:
    """The names in C{directory} and the open descriptors of this process that point into it."""
    found = list(os.listdir(directory))
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed while listing (the listing's own descriptor)
        if target.startswith(directory + os.sep):
            found.append(target)
    return found


def post(target: bytes, body: bytes, *fields: bytes) -> bytes:
    """A raw HTTP/1.1 POST with C{body} and its length, closing the connection after the response."""
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n" % (target, len(body))
    return head + b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def digest(body: bytes) -> bytes:
    return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


def echoDigest(proto: object, request: ReceivedRequest) -> bytes:
    """A L{ScriptedUpstream} answer: the received body's length and digest."""
    answer = digest(request.body)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)


class BufferTestCase(unittest.TestCase):
    """A proxy with a spool directory of its own, checked empty after each test."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    async def assertNoSpool(self) -> None:
        """
        Nothing is left of the spools (waiting a little: an exchange ends as its connection closes), and
        none was left for the garbage collector to close (Python warns of a file it closes so).
        """
        await waitFor(lambda: not spoolsIn(self.directory), 2.0)
        self.assertEqual(spoolsIn(self.directory), [])
        gc.collect()
        unclosed = [str(w["message"]) for w in self.flushWarnings() if "unclosed file" in str(w["message"])]
        self.assertEqual(unclosed, [])

    def buffered(self, proxy: object, *after: object, **options: object) -> None:
        """
        Send every request of C{proxy} through a C{buffer} filter with C{options}, spooling here, then
        through the filters C{after} it.
        """
        settings = {"directory": self.directory, **options}
        useFilters(proxy, buffer.build(settings, FilterEnvironment(reactor)), *after)  # type: ignore[arg-type]


class OptionsTests(unittest.TestCase):
    """The factory's contract, its defaults, and a precise error for each bad option."""

    def test_contract(self) -> None:
        """The filter kind passes the filter factory checks, with defaults that hold nothing back from streaming."""
        built = verifyFilterFactory(buffer, {})
        assert isinstance(built, Buffer)
        self.assertEqual(built.request, SpoolSettings(65536, 100 * MiB, None))
        self.assertIsNone(built.response)
        self.assertEqual(built.timeout, 300.0)
        self.assertEqual(built.consumes, (b"expect",))

    def test_options(self) -> None:
        """Sizes and durations as people write them; a relative directory is the config file's."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "spool"))
        options = {"memory": "1k", "max-size": "2M", "timeout": "5s", "response": True, "directory": "spool"}
        options.update({"response-memory": 10, "response-max-size": "3M"})
        built = buffer.build(options, FilterEnvironment(reactor, base))
        assert isinstance(built, Buffer)
        spool = os.path.join(base, "spool")
        self.assertEqual(built.request, SpoolSettings(1024, 2 * MiB, spool))
        self.assertEqual(built.response, SpoolSettings(10, 3 * MiB, spool))
        self.assertEqual(built.timeout, 5.0)

    def test_tunnelsUntouched(self) -> None:
        """An extended CONNECT's stream is a tunnel: it is not read, and goes on as it came."""
        buffering = buffer.build({}, FilterEnvironment(Clock()))
        connect = inboundRequest(b"/chat", method=b"CONNECT")
        result = self.successResultOf(runFilters([buffering], connect, requestBody=b"frames", declareLength=False))
        self.assertIsNone(result.verdict)
        self.assertEqual(result.sent, (b"frames", None))
        post = self.successResultOf(runFilters([buffering], requestBody=b"body", declareLength=False))
        self.assertEqual(post.sent, (b"body", 4))

    def test_badOptions(self) -> None:
        """Each bad value is a ValueError naming its option."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        with open(os.path.join(base, "file"), "w"):
            pass
        for options, message in [
            ({"directory": "missing"}, "option directory: "),
            ({"directory": "file"}, "is not a directory"),
            ({"max-size": 0}, "option max-size: must be more than 0"),
            ({"response-max-size": "0k"}, "option response-max-size: must be more than 0"),
            ({"memory": "lots"}, "option memory: not a size"),
            ({"timeout": 0}, "option timeout: must be more than 0"),
            ({"response": "yes"}, "option response: expected true or false"),
        ]:
            with self.assertRaises(ValueError) as raised:
                buffer.build(options, FilterEnvironment(reactor, base))
            self.assertIn(message, str(raised.exception))
            self.assertIn("filter buffer", str(raised.exception))


class DemoTests(BufferTestCase):
    """The issue's demo: a slow upload does not hold an upstream that serves one connection at a time."""

    async def fastRequestsDuringSlowUpload(self, proxyPort: int) -> list[float]:
        """Upload L{SLOW_BODY} slowly; meanwhile, send three GETs one after another: how long each took."""
        upload = defer.ensureDeferred(trickle(proxyPort, post(b"/slow", SLOW_BODY), SLOW_INTERVAL, SLOW_PIECE, 20.0))
        await sleep(0.5)
        durations = []
        for _ in range(3):
            started = reactor.seconds()
            response = await rawRequest(proxyPort, b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 15)
            durations.append(reactor.seconds() - started)
            self.assertEqual(responseStatus(response), 200)
            self.assertTrue(response.endswith(digest(b"")), response)
        received, took = await upload
        self.assertEqual(responseStatus(received), 200)
        self.assertTrue(received.endswith(digest(SLOW_BODY)), received[-200:])
        self.assertGreater(took, 2.5)  # it was slow indeed: 32 pieces, 0.1 s apart
        return durations

    async def test_othersServedDuringSlowUpload(self) -> None:
        """With the filter, the others are served at once while the upload arrives (spooled to disk)."""
        port = await oneAtATime(self)
        proxy = startProxy(self, [f"http://127.0.0.1:{port}"])
        self.buffered(proxy, memory="16k")
        spooling = defer.ensureDeferred(waitFor(lambda: spoolsIn(self.directory), 2.0))
        durations = await self.fastRequestsDuringSlowUpload(proxy.port)
        self.assertTrue(await spooling)  # past 16 KiB the body went to a temporary file in the directory
        # At once, not after the upload (3.2 s at least): the bound leaves a loaded machine room.
        self.assertLess(max(durations), 2.0, durations)
        await self.assertNoSpool()

    async def test_othersWaitWithoutFilter(self) -> None:
        """Without the filter, the upstream is held by the upload, and the first other request waits for it."""
        port = await oneAtATime(self)
        proxy = startProxy(self, [f"http://127.0.0.1:{port}"])
        durations = await self.fastRequestsDuringSlowUpload(proxy.port)
        self.assertGreater(durations[0], 1.5, durations)


class RefusalTests(BufferTestCase):
    """Bad input: a precise status and reason, no spool left behind, and the upstream never asked."""

    def setUp(self) -> None:
        super().setUp()
        self.upstream = ScriptedUpstream(self, echoDigest)
        self.proxy = startProxy(self, [self.upstream.url])
        self.buffered(self.proxy, **{"max-size": "64k", "memory": "8k", "timeout": "1s"})

    async def assertServed(self) -> None:
        """Other traffic goes on: a request with a body is buffered and answered."""
        response = await rawRequest(self.proxy.port, post(b"/ok", b"x" * 20000))
        self.assertEqual(responseStatus(response), 200)
        self.assertTrue(response.endswith(digest(b"x" * 20000)))

    async def test_declaredLengthOverLimit(self) -> None:
        """A Content-Length over max-size: 413 at once, without a 100 Continue, nothing read."""
        head = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
        response = await rawRequest(self.proxy.port, head)
        self.assertNotIn(b"100 Continue", response)
        self.assertEqual(responseStatus(response), 413)
        self.assertIn(b"the request body of 100000 bytes exceeds the limit of 65536 bytes", response)
        self.assertEqual(self.upstream.connections, [])
        await self.assertNoSpool()
        await self.assertServed()

    async def test_chunkedOverLimit(self) -> None:
        """A chunked body that crosses max-size: 413 as it crosses, the spool (on disk by then) released."""
        head = b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        response = await rawRequest(self.proxy.port, head + chunked([b"y" * 30000] * 3))
        self.assertEqual(responseStatus(response), 413)
        self.assertIn(b"the request body exceeds the limit of 65536 bytes", response)
        self.assertEqual(headerValues(response, b"connection"), [b"close"])
        self.assertEqual(self.upstream.connections, [])
        await self.assertNoSpool()
        await self.assertServed()

    async def test_clientStalls(self) -> None:
        """A client that stops sending mid-body gets 408 after the filter's timeout."""
        head = b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n"
        started = reactor.seconds()
        response = await rawRequest(self.proxy.port, head + b"z" * 20000, timeout=5)
        self.assertEqual(responseStatus(response), 408)
        self.assertIn(b"the request body did not arrive within 1s", response)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(self.upstream.connections, [])
        await self.assertNoSpool()
        await self.assertServed()

    async def test_clientVanishes(self) -> None:
        """A client that goes away mid-upload: its spool (on disk) is released, the upstream never contacted."""
        connected: defer.Deferred[protocol.Protocol] = protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
            "127.0.0.1", self.proxy.port
        )
        client = await connected
        head = b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n"
        client.transport.write(head + b"z" * 20000)
        self.assertTrue(await waitFor(lambda: spoolsIn(self.directory), 2.0))  # 20000 > 8k: on disk
        client.transport.abortConnection()
        await self.assertNoSpool()
        self.assertEqual(self.upstream.connections, [])
        await self.assertServed()

    async def test_proxyStops(self) -> None:
        """The proxy stopping mid-upload (its client connections closed) releases the spool."""
        upload = rawRequest(self.proxy.port, post(b"/up", b"w" * 30000)[:-10000], timeout=5)
        self.assertTrue(await waitFor(lambda: spoolsIn(self.directory), 2.0))
        for connection in list(self.proxy.site.connections):
            connection.transport.abortConnection()
        await upload
        await self.assertNoSpool()
        self.assertEqual(self.upstream.connections, [])


@implementer(IRequestFilter)
class Refusing:
    """A filter after the buffer that refuses every request (an authorisation decided on the body, say)."""

    consumes = ()

    def onRequest(self, context: RequestContext) -> LocalResponse:
        return LocalResponse(403, body=b"no\n", reason="refused after buffering")


class EndingTests(BufferTestCase):
    """The spool of a request buffered whole is released however its exchange ends."""

    async def test_laterFilterAnswers(self) -> None:
        """A filter after the buffer answers: the spool (on disk) is released, the upstream never asked."""
        upstream = ScriptedUpstream(self, echoDigest)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy, Refusing(), memory="1k")
        response = await rawRequest(proxy.port, post(b"/up", b"r" * 30000))
        self.assertEqual(responseStatus(response), 403)
        self.assertEqual(upstream.connections, [])
        await self.assertNoSpool()

    async def test_reloadMidUpload(self) -> None:
        """
        The proxy's routes and filters replaced mid-upload (what a reload does: a new director): the upload
        goes on with the filter it started with, reaches the upstream whole, and its spool is released.
        """
        upstream = ScriptedUpstream(self, echoDigest)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy, memory="1k")
        body = os.urandom(60000)
        upload = defer.ensureDeferred(trickle(proxy.port, post(b"/up", body), 0.05, 15000, 10.0))
        self.assertTrue(await waitFor(lambda: spoolsIn(self.directory), 2.0))
        useFilters(proxy)
        received, _ = await upload
        self.assertTrue(received.endswith(digest(body)), received)
        self.assertEqual(upstream.requests[0].headers(b"content-length"), [b"60000"])
        await self.assertNoSpool()


class BufferedRequestTests(BufferTestCase):
    """What the upstream gets of a buffered request, from various clients."""

    async def test_chunkedSentWithLength(self) -> None:
        """A chunked body reaches the upstream whole, with its Content-Length; trailers are dropped."""
        upstream = ScriptedUpstream(self, echoDigest)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy, memory="4k")
        parts = [os.urandom(7000) for _ in range(5)]
        head = b"PUT /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = chunked(parts)[:-2] + b"X-Sum: 1\r\n\r\n"
        log = LogCapture(self)
        response = await rawRequest(proxy.port, head + body)
        self.assertEqual(responseStatus(response), 200)
        [received] = upstream.requests
        self.assertEqual(received.body, b"".join(parts))
        self.assertEqual(received.headers(b"content-length"), [b"35000"])
        self.assertEqual(received.headers(b"transfer-encoding"), [])
        self.assertEqual(received.headers(b"x-sum"), [])
        self.assertEqual([e["count"] for e in log.events if "trailer fields" in e["log_format"]], [1])
        await self.assertNoSpool()

    async def test_continueFromProxy(self) -> None:
        """
        C{Expect: 100-continue}: curl gets its 100 from rproxy at once (it would wait 5 s for one), and the
        upstream gets the body with the head, without the expectation.
        """
        upstream = ScriptedUpstream(self, echoDigest)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy)
        body = os.urandom(100000)
        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(body)
        started = reactor.seconds()
        code, out, err = await curl(
            ["-sv", "--expect100-timeout", "5", "-H", "Expect: 100-continue", "--data-binary", f"@{path}", proxy.url]
        )
        self.assertEqual(code, 0, err)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertIn(b"HTTP/1.1 100 Continue", err)
        self.assertEqual(out, digest(body))
        [received] = upstream.requests
        self.assertEqual(received.headers(b"expect"), [])
        self.assertEqual(received.headers(b"content-length"), [b"100000"])
        await self.assertNoSpool()

    async def test_retryReplaysFromSpool(self) -> None:
        """
        A PUT of 200 KB (over the 64 KiB a pipe keeps for a retry) whose first upstream drops the connection
        is sent again, whole, to the other, read again from the spool.
        """
        received: list[ReceivedRequest] = []

        def dropFirst(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            received.append(request)
            if len(received) == 1:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
                return b""
            return echoDigest(proto, request)

        first, second = ScriptedUpstream(self, dropFirst), ScriptedUpstream(self, dropFirst)
        proxy = startProxy(self, [first.url, second.url])
        self.buffered(proxy, memory="16k")
        body = os.urandom(200000)
        response = await rawRequest(proxy.port, post(b"/put", body).replace(b"POST", b"PUT", 1))
        self.assertEqual(responseStatus(response), 200)
        self.assertTrue(response.endswith(digest(body)))
        self.assertEqual([request.body for request in received], [body, body])
        await self.assertNoSpool()

    async def test_http2Client(self) -> None:
        """An HTTP/2 client's body, sent in DATA frames without a length, reaches the upstream with one."""
        upstream = ScriptedUpstream(self, echoDigest)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy, memory="16k")
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        parts = [os.urandom(12000) for _ in range(4)]
        stream = client.request(b"POST", b"/h2", endStream=False)
        for part in parts[:-1]:
            client.send(stream, part)
        client.send(stream, parts[-1], endStream=True)
        response = await client.response(stream)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.data, digest(b"".join(parts)))
        [received] = upstream.requests
        self.assertEqual(received.headers(b"content-length"), [b"48000"])
        await self.assertNoSpool()


#: The response of the response-buffering tests: 16 MiB, more than loopback sockets hold.
BIG = os.urandom(1 << 20) * 16


class _Reader(protocol.Protocol):
    """A client that asks for one response and reads nothing until told to."""

    def __init__(self) -> None:
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    fields = b""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % self.fields)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


class _TrailersReader(_Reader):
    fields = b"TE: trailers\r\n"


class ResponseBufferingTests(BufferTestCase):
    """C{response = true}: the upstream sends at its speed and is free while the client reads at its own."""

    def setUp(self) -> None:
        super().setUp()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
        self.upstream = ScriptedUpstream(self, lambda proto, request: head + BIG)
        self.proxy = startProxy(self, [self.upstream.url])

    async def slowReader(self) -> _Reader:
        return await protocol.ClientCreator(reactor, _Reader).connectTCP("127.0.0.1", self.proxy.port)

    async def test_upstreamFreedWhileClientPaused(self) -> None:
        """The upstream's connection is back in the pool while the client has read nothing; then it reads all."""
        self.buffered(self.proxy, response=True, **{"response-max-size": "64M"})
        upstream = self.proxy.upstreams[0]
        reader = await self.slowReader()
        self.assertTrue(await waitFor(lambda: self.upstream.requests and upstream.inFlight == 0, 5.0))
        self.assertEqual(upstream.pool.idleCount, 1)
        self.assertTrue(spoolsIn(self.directory))  # the rest of the response waits on disk
        reader.transport.resumeProducing()  # type: ignore[attr-defined]
        received = await reader.done
        self.assertEqual(responseStatus(received), 200)
        self.assertEqual(hashlib.sha256(received.partition(b"\r\n\r\n")[2]).digest(), hashlib.sha256(BIG).digest())
        await self.assertNoSpool()

    async def heldByPausedReader(self) -> bytes:
        """A client that reads nothing for a second holds the upstream all along; what it then reads."""
        upstream = self.proxy.upstreams[0]
        reader = await self.slowReader()
        self.assertTrue(await waitFor(lambda: self.upstream.requests, 5.0))
        await sleep(1.0)
        self.assertEqual(upstream.inFlight, 1)
        reader.transport.resumeProducing()  # type: ignore[attr-defined]
        return await reader.done

    async def test_upstreamHeldWithoutResponseBuffering(self) -> None:
        """Without C{response}, the paused client holds the upstream (the control for the test above)."""
        self.buffered(self.proxy)
        received = await self.heldByPausedReader()
        self.assertEqual(len(received.partition(b"\r\n\r\n")[2]), len(BIG))

    async def test_beyondMaxSizeStreams(self) -> None:
        """Past C{response-max-size} the upstream is paused until the client catches up: it stays in flight."""
        self.buffered(self.proxy, response=True, **{"response-max-size": "1M"})
        received = await self.heldByPausedReader()
        self.assertEqual(hashlib.sha256(received.partition(b"\r\n\r\n")[2]).digest(), hashlib.sha256(BIG).digest())
        await self.assertNoSpool()

    async def test_clientGoneWhileSpooled(self) -> None:
        """A client that leaves before reading its spooled response: the spool is released."""
        self.buffered(self.proxy, response=True)
        reader = await self.slowReader()
        self.assertTrue(await waitFor(lambda: self.proxy.upstreams[0].inFlight == 0 and self.upstream.requests, 5.0))
        reader.transport.abortConnection()  # type: ignore[attr-defined]
        await reader.done
        await self.assertNoSpool()

    async def test_http2Upstream(self) -> None:
        """From an HTTP/2 upstream: its stream ends while the client reads nothing; its trailers follow the body."""

        def handler(stream: ServerStream) -> None:
            stream.respond(200, [], BIG, trailers=[(b"x-sum", b"16")])

        server = H2Upstream(self, handler)
        proxy = startProxy(self, [server.url])
        self.buffered(proxy, response=True)
        reader = await protocol.ClientCreator(reactor, _TrailersReader).connectTCP("127.0.0.1", proxy.port)
        self.assertTrue(await waitFor(lambda: server.streams and proxy.upstreams[0].inFlight == 0, 5.0))
        reader.transport.resumeProducing()  # type: ignore[attr-defined]
        received = await reader.done
        self.assertTrue(received.endswith(b"\r\n0\r\nx-sum: 16\r\n\r\n"), received[-100:])
        await self.assertNoSpool()

    async def test_http2SlowReader(self) -> None:
        """An HTTP/2 client that acknowledges nothing: the upstream is freed, then the client gets it all."""
        self.buffered(self.proxy, response=True)
        client = await H2Client.connect(self.proxy.port, autoAcknowledge=False)
        self.addCleanup(client.close)
        stream = client.request(b"GET", b"/big")
        self.assertTrue(await waitFor(lambda: self.upstream.requests and self.proxy.upstreams[0].inFlight == 0, 5.0))
        client.autoAcknowledge = True
        client.acknowledge(stream, len(client.streams[stream].data))
        response = await client.response(stream)
        self.assertEqual(hashlib.sha256(response.data).digest(), hashlib.sha256(BIG).digest())
        await self.assertNoSpool()


#: The body of the memory test, each way: more than the bound on the proxy's growth.
LARGE = 96 * MiB


class _Served(resource.Resource):
    """The upstream of the memory test: counts what is posted, serves a file, and tells when it has sent it."""

    isLeaf = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.sent: defer.Deferred[None] = defer.Deferred()

    def render_POST(self, request: server.Request) -> bytes:
        return b"%d" % len(request.content.read())

    def render_GET(self, request: server.Request) -> object:
        request.notifyFinish().addBoth(lambda _: self.sent.called or self.sent.callback(None))
        return static.File(self.path, defaultType="application/octet-stream").render_GET(request)


class _Counting(protocol.Protocol):
    """A client that asks for one response, reads nothing until resumed, then counts what comes."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()
        self.head = b""
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(b"GET /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in self.head:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.head += b"\r\n\r\n"
        self.size += len(data)
        self.digest.update(data)

    def connectionLost(self, reason: object) -> None:
        self.done.callback(None)


def resetPeakRSS(pid: int) -> None:
    """Start counting the peak resident memory of process C{pid} again from its resident memory now."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peakRSS(pid: int) -> int:
    """The peak resident memory of process C{pid} (VmHWM) since it started, or since L{resetPeakRSS}."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


class MemoryTests(BufferTestCase):
    """The spools hold bodies on disk, not in the proxy's memory (a proxy in its own process, its RSS read)."""

    async def test_largeBodiesOnDisk(self) -> None:
        """
        96 MiB uploaded through the filter, and a 96 MiB response spooled for a client that reads nothing
        until the upstream has sent it all: the proxy's peak RSS grows by less than 40 MiB.
        """
        path = os.path.join(self.directory, "..", "large.bin")
        with open(path, "wb") as f:
            for _ in range(LARGE // MiB):
                f.write(os.urandom(MiB))
        served = _Served(path)
        upstream = startUpstream(self, server.Site(served))
        port = freePort()
        config = os.path.join(self.directory, "..", "rproxy.toml")
        with open(config, "w") as f:
            f.write(
                f'listen = ["tcp:{port}:interface=127.0.0.1"]\naccess-log = "off"\n'
                f'[services.app]\nupstreams = ["{upstream.url}"]\nfilters = ["buffered"]\n'
                f'[filters.buffered]\ntype = "buffer"\nmax-size = "128M"\nresponse = true\n'
                f'response-max-size = "128M"\ndirectory = "{self.directory}"\n'
            )
        ended: defer.Deferred[None] = defer.Deferred()

        class Ended(protocol.ProcessProtocol):
            def processEnded(self, reason: object) -> None:
                ended.callback(None)

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        argv = [PYTHON, "-m", "twisted", "rproxy", "--config", config]
        process = reactor.spawnProcess(Ended(), PYTHON, argv, env=os.environ, path=root)
        self.addCleanup(lambda: ended if ended.called else (process.signalProcess("KILL"), ended)[1])
        warm = f"http://127.0.0.1:{port}/warm"
        self.assertTrue(await waitFor(lambda: _connects(port), 15.0), "the proxy did not start")
        code, out, err = await curl(["-s", "--data-binary", "warm", warm])
        self.assertEqual(out, b"4", err)
        resetPeakRSS(process.pid)
        baseline = peakRSS(process.pid)

        code, out, err = await curl(["-s", "--data-binary", f"@{path}", f"http://127.0.0.1:{port}/up"], 30)
        self.assertEqual((code, out), (0, b"%d" % LARGE), err)
        client = await protocol.ClientCreator(reactor, _Counting).connectTCP("127.0.0.1", port)
        await served.sent  # the upstream has sent the whole response while the client read nothing
        client.transport.resumeProducing()
        await client.done
        with open(path, "rb") as f:
            self.assertEqual(client.digest.digest(), hashlib.file_digest(f, "sha256").digest())
        grown = peakRSS(process.pid) - baseline
        self.assertLess(grown, 40 * MiB)
        process.signalProcess("TERM")
        await ended
        os.remove(path)
        await self.assertNoSpool()


def _connects(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class DiskFullTests(BufferTestCase):
    """A spool that cannot be written (the disk full, simulated where the spool writes): a precise answer."""

    def setUp(self) -> None:
        super().setUp()

        def full(file: object, data: bytes, offset: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(spool, "_writeAt", full)

    async def test_request(self) -> None:
        """A request body that does not fit in memory and cannot go to disk: 507, the upstream never asked."""
        upstream = ScriptedUpstream(self, echoDigest)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy, memory="8k")
        response = await rawRequest(proxy.port, post(b"/up", b"d" * 30000))
        self.assertEqual(responseStatus(response), 507)
        self.assertIn(b"the request body could not be spooled: No space left on device", response)
        self.assertEqual(upstream.connections, [])
        small = await rawRequest(proxy.port, post(b"/small", b"s" * 1000))  # held in memory: unaffected
        self.assertTrue(small.endswith(digest(b"s" * 1000)))
        await self.assertNoSpool()

    async def test_response(self) -> None:
        """A response that cannot be spooled is aborted (never a clean-looking truncated one), and logged."""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
        upstream = ScriptedUpstream(self, lambda proto, request: head + BIG)
        proxy = startProxy(self, [upstream.url])
        self.buffered(proxy, response=True, **{"response-memory": "8k"})
        log = LogCapture(self)
        reader = await protocol.ClientCreator(reactor, _Reader).connectTCP("127.0.0.1", proxy.port)
        self.assertTrue(await waitFor(lambda: log.withStatus(502), 5.0))
        reader.transport.resumeProducing()  # type: ignore[attr-defined]
        received = await reader.done
        self.assertEqual(responseStatus(received), 200)
        self.assertLess(len(received.partition(b"\r\n\r\n")[2]), len(BIG))
        [event] = log.withStatus(502)
        self.assertEqual(event["reason"], "the response could not be spooled: No space left on device")
        await self.assertNoSpool()
