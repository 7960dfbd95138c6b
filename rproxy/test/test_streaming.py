"""
Streaming through rproxy, end to end over real sockets on 127.0.0.1.

Request bodies flow to the upstream as they arrive and the client is paused while the upstream is
slow; responses flow to the client with the upstream paused while the client is slow; every chunk is
flushed at once; a client that goes away cancels the upstream request.  The memory tests run the
proxy as a subprocess (``twist rproxy``) and read its peak RSS (``VmHWM``) from ``/proc``.

Clients and upstreams here are raw Twisted protocols, so the tests see exactly which bytes crossed
which socket and when.  Every wait is bounded in time (L{waitFor}) and every loop in count.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import termios
import time
from collections.abc import Callable

from twisted.internet import protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.test.support import BIN, ROOT, Listening, curl, headerValues, listen, sleep, startProxy
from rproxy.upstream.http1 import HTTP11Connection

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: The peak RSS the proxy process may reach while streaming a 1 GiB body (the issue's figure).
RSS_LIMIT = 80 * MiB
#: How far the upstream may get ahead of a slow client (socket buffers included).
RESPONSE_IN_FLIGHT_LIMIT = 16 * MiB
#: How far a client may get ahead of a stalled upstream (socket buffers included).
REQUEST_IN_FLIGHT_LIMIT = 16 * MiB
#: How long the upstream request may outlive the client's connection: it ends in the turn the client's does (a
#: few ms); the bound leaves room for a loaded machine, and is still far from the time the body would take.
CANCEL_LIMIT = 3.0

_ZEROS = bytes(64 * KiB)


# -- small helpers


async def waitFor(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll C{predicate} until it is true (then return the seconds waited) or fail after C{timeout}."""
    start = time.monotonic()
    deadline = start + timeout
    for _ in range(int(timeout / interval) + 100):  # the deadline ends it first; the count bounds it too
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            break
        await sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def queued(transport: object, request: int) -> int:
    """Bytes in a socket's kernel queue: C{termios.FIONREAD} (receive) or C{termios.TIOCOUTQ} (send)."""
    handle = transport.getHandle()  # type: ignore[attr-defined]
    answer = fcntl.ioctl(handle.fileno(), request, struct.pack("i", 0))
    return int(struct.unpack("i", answer)[0])


def statusKiB(pid: int, field: str) -> int:
    """A C{/proc/<pid>/status} figure such as C{VmHWM} (peak RSS), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def connectionTimers() -> list:
    """The reactor's pending calls into upstream connections (response and read timeouts)."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if call.active() and isinstance(getattr(call.func, "__self__", None), HTTP11Connection)
    ]


def splitHead(data: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) once C{data} holds a whole message head, else C{None}."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    return data[:end], data[end + 4 :]


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body as far as C{data} goes: (payload so far, whether the last chunk came)."""
    payload = bytearray()
    position = 0
    for _ in range(len(data) + 1):  # at least 3 bytes per chunk: bounded by the input
        eol = data.find(b"\r\n", position)
        if eol < 0:
            return bytes(payload), False
        size = int(data[position:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(payload), data.find(b"\r\n\r\n", eol) >= 0
        start = eol + 2
        payload += data[start : start + size]
        if len(data) < start + size + 2:
            return bytes(payload), False
        position = start + size + 2
    raise AssertionError("unreachable")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def parseResponse(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(status, head, body) of a complete Content-Length response, else C{None}."""
    parts = splitHead(data)
    if parts is None:
        return None
    head, rest = parts
    length = int((headerValues(head, b"content-length") or [b"0"])[0])
    if len(rest) < length:
        return None
    return int(head.split(b" ", 2)[1]), head, rest[:length]


# -- servers and clients


class _Upstream(protocol.Protocol):
    """An upstream connection: every byte received kept, and when the connection ended."""

    lostAt: float | None = None

    def __init__(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.lostAt = time.monotonic()

    @property
    def head(self) -> bytes | None:
        parts = splitHead(bytes(self.received[: 64 * KiB]))
        return None if parts is None else parts[0]

    @property
    def body(self) -> bytes:
        end = self.received.find(b"\r\n\r\n")
        return b"" if end < 0 else bytes(self.received[end + 4 :])


def serve(testCase: unittest.TestCase, build: Callable[[], protocol.Protocol]) -> tuple[Listening, list]:
    """Listen on 127.0.0.1 with protocols from C{build}; return the listener and the protocols built."""
    built: list = []

    def make() -> protocol.Protocol:
        proto = build()
        built.append(proto)
        return proto

    factory = protocol.Factory.forProtocol(make)  # type: ignore[arg-type]
    factory.noisy = False
    listening = listen(testCase, factory)

    def closeAll() -> None:
        for proto in built:
            if proto.transport is not None and proto.transport.connected:
                proto.transport.abortConnection()

    testCase.addCleanup(closeAll)
    return listening, built


class _Client(_Upstream):
    """A raw client: every byte received kept, with when the connection ended."""


async def connect(testCase: unittest.TestCase, port: int, proto: protocol.Protocol) -> protocol.Protocol:
    connected = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)

    def abort() -> None:
        if connected.transport.connected:
            connected.transport.abortConnection()

    testCase.addCleanup(abort)
    return connected


class _ProxyProcess(protocol.ProcessProtocol):
    """A C{twist rproxy} subprocess: its output (the last MiB) and its listening port."""

    exited = False

    def __init__(self) -> None:
        self.output = bytearray()
        self.port: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if self.port is None:
            found = re.search(rb"ProxySite starting on (\d+)", self.output)
            if found:
                self.port = int(found.group(1))
        if len(self.output) > MiB:
            del self.output[: len(self.output) - MiB]

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.exited = True


async def startProxyProcess(testCase: unittest.TestCase, upstreamURL: str) -> tuple[int, int, _ProxyProcess]:
    """Run C{twist rproxy} in front of C{upstreamURL}; return its pid, port and process protocol."""
    twist = os.path.join(BIN, "twist")
    argv = [
        twist,
        "--log-format=text",
        "rproxy",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--upstream",
        upstreamURL,
        "--access-log",
        "off",
        "--grace",
        "1",
    ]
    process = _ProxyProcess()
    transport = reactor.spawnProcess(process, twist, argv, env=dict(os.environ), path=ROOT)

    async def stop() -> None:
        if process.exited:
            return
        transport.signalProcess("TERM")
        try:
            await waitFor(lambda: process.exited, 5, "the proxy process to exit")
        except AssertionError:
            if not process.exited:
                transport.signalProcess("KILL")
                await waitFor(lambda: process.exited, 5, "the killed proxy process to exit")

    testCase.addCleanup(stop)
    try:
        await waitFor(lambda: process.port is not None or process.exited, 20, "the proxy process to listen", 0.05)
    except AssertionError:
        raise AssertionError(f"the proxy did not start: {bytes(process.output)!r}") from None
    if process.port is None:
        raise AssertionError(f"the proxy exited at start: {bytes(process.output)!r}")
    return transport.pid, process.port, process


# -- 1. request bodies stream as they arrive


class _AnsweringUpstream(_Upstream):
    """Answers 200 once C{complete(head, body)} says the request is in."""

    answered = False

    def __init__(self, complete: Callable[[bytes, bytes], bool]) -> None:
        super().__init__()
        self.complete = complete

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        head = self.head
        if not self.answered and head is not None and self.complete(head, self.body):
            self.answered = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class RequestBodyStreamingTests(unittest.TestCase):
    """The upstream sees the request head and the first body bytes while the client is still sending."""

    timeout = 30

    async def _halfThenRest(
        self, head: bytes, first: bytes, complete: Callable[[bytes, bytes], bool]
    ) -> tuple[_AnsweringUpstream, _Client]:
        upstream, upstreams = serve(self, lambda: _AnsweringUpstream(complete))
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port, _Client())
        self.writtenAt = time.monotonic()
        client.transport.write(head + first)
        await waitFor(lambda: upstreams and upstreams[0].head is not None, 5, "the request head upstream")
        up = upstreams[0]
        return up, client

    async def test_contentLengthBodyStreams(self) -> None:
        """
        A client sends the head and half of a Content-Length body, then waits: the upstream receives
        the head and that half (all of it, nothing more) before the client sends the rest.
        """
        body = os.urandom(20000)
        first, rest = body[:10000], body[10000:]
        head = b"POST /upload HTTP/1.1\r\nHost: example\r\nContent-Length: %d\r\n\r\n" % len(body)
        up, client = await self._halfThenRest(head, first, lambda head, got: len(got) >= len(body))
        self.assertTrue(up.head.startswith(b"POST /upload HTTP/1.1\r\n"))
        self.assertEqual(headerValues(up.head, b"content-length"), [b"20000"])
        await waitFor(lambda: len(up.body) >= len(first), 5, "the first half of the body upstream")
        waited = time.monotonic() - self.writtenAt
        self.assertEqual(up.body, first)
        self.assertFalse(up.answered)

        client.transport.write(rest)
        await waitFor(lambda: parseResponse(bytes(client.received)) is not None, 5, "the response")
        status, _, answer = parseResponse(bytes(client.received))
        self.assertEqual((status, answer), (200, b"ok"))
        self.assertEqual(up.body, body)
        print(f"\n  head and first half upstream {waited * 1000:.1f} ms after the client sent them")

    async def test_chunkedBodyStreams(self) -> None:
        """
        The same with a chunked body: the upstream receives the head (chunked) and the first chunks,
        decoded intact, before the client sends the rest and the last chunk.
        """
        parts = [os.urandom(size) for size in (3000, 7000, 5000, 5000)]
        head = b"POST /upload HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n"
        first = chunk(parts[0]) + chunk(parts[1])
        rest = chunk(parts[2]) + chunk(parts[3]) + b"0\r\n\r\n"
        up, client = await self._halfThenRest(head, first, lambda head, got: dechunk(got)[1])
        self.assertTrue(up.head.startswith(b"POST /upload HTTP/1.1\r\n"))
        self.assertEqual(headerValues(up.head, b"transfer-encoding"), [b"chunked"])
        self.assertEqual(headerValues(up.head, b"content-length"), [])
        expected = parts[0] + parts[1]
        await waitFor(lambda: len(dechunk(up.body)[0]) >= len(expected), 5, "the first chunks upstream")
        payload, complete = dechunk(up.body)
        self.assertEqual(payload, expected)
        self.assertFalse(complete)
        self.assertFalse(up.answered)

        client.transport.write(rest)
        await waitFor(lambda: parseResponse(bytes(client.received)) is not None, 5, "the response")
        status, _, answer = parseResponse(bytes(client.received))
        self.assertEqual((status, answer), (200, b"ok"))
        self.assertEqual(dechunk(up.body), (b"".join(parts), True))


# -- 2. a slow upstream pauses the client


class _SinkUpstream(protocol.Protocol):
    """Reads and discards a Content-Length body, counting it, then answers 200 with the count."""

    answered = False

    def __init__(self) -> None:
        self.head = bytearray()
        self.length: int | None = None
        self.bodyRead = 0

    def dataReceived(self, data: bytes) -> None:
        if self.length is None:
            self.head += data
            parts = splitHead(bytes(self.head))
            if parts is None:
                return
            head, data = parts
            self.length = int(headerValues(head, b"content-length")[0])
        self.bodyRead += len(data)
        if self.bodyRead >= self.length and not self.answered:
            self.answered = True
            count = b"%d" % self.bodyRead
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(count), count))


class _StalledUpstream(_SinkUpstream):
    """A sink that reads nothing until its transport is resumed."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()


@implementer(IPushProducer)
class _PushingClient(_Client):
    """Sends a C{length}-byte body as fast as its transport takes it (a push producer)."""

    paused = False

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length
        self.sent = 0

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(b"PUT /upload HTTP/1.1\r\nHost: example\r\nContent-Length: %d\r\n\r\n" % self.length)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.length:  # at most length / 64 KiB rounds
            size = min(len(_ZEROS), self.length - self.sent)
            self.sent += size
            self.transport.write(_ZEROS[:size])  # may call pauseProducing at once
        if self.sent >= self.length:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.paused = True


class RequestBackpressureTests(unittest.TestCase):
    """An upstream that stops reading stalls the client's upload: the proxy does not soak it up."""

    timeout = 60

    async def test_slowUpstreamPausesClient(self) -> None:
        length = 64 * MiB
        upstream, upstreams = serve(self, _StalledUpstream)
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port, _PushingClient(length))
        await waitFor(lambda: upstreams, 5, "the proxy to connect upstream")
        up = upstreams[0]

        # Wait until the client's sending has stalled: no progress for a whole second.
        last, since = -1, time.monotonic()
        for _ in range(200):  # 20 s at most
            if client.sent != last:
                last, since = client.sent, time.monotonic()
            elif time.monotonic() - since >= 1.0:
                break
            await sleep(0.1)
        else:
            self.fail(f"the client never stalled: {client.sent} of {length} bytes sent")

        sent, read = client.sent, up.bodyRead
        inFlight = sent - read
        clientSendQ = queued(client.transport, termios.TIOCOUTQ)
        upstreamRecvQ = queued(up.transport, termios.FIONREAD)
        proxyHeld = inFlight - clientSendQ - upstreamRecvQ
        print(
            f"\n  client wrote {sent / MiB:.2f} MiB of {length / MiB:.0f} MiB, upstream read {read} bytes:"
            f" {inFlight / MiB:.2f} MiB in flight (client send queue {clientSendQ / KiB:.0f} KiB,"
            f" upstream receive queue {upstreamRecvQ / KiB:.0f} KiB; the rest, in the proxy's two"
            f" socket queues and its memory, and the client's Twisted buffer: {proxyHeld / KiB:.0f} KiB)"
        )
        self.assertTrue(client.paused, "the client's transport should have paused it")
        self.assertLess(sent, length)
        self.assertLessEqual(inFlight, REQUEST_IN_FLIGHT_LIMIT)

        # The upstream reads again: the client resumes and the whole body arrives, exactly.
        up.transport.resumeProducing()
        await waitFor(lambda: parseResponse(bytes(client.received)) is not None, 30, "the response")
        status, _, answer = parseResponse(bytes(client.received))
        self.assertEqual((status, answer), (200, b"%d" % length))
        self.assertEqual((client.sent, up.bodyRead), (length, length))


# -- 3. a 1 GiB upload through the proxy process stays small


class UploadMemoryTests(unittest.TestCase):
    timeout = 120

    async def test_oneGiBUploadPeakRSS(self) -> None:
        """
        curl uploads 1 GiB (a sparse file of zeros, Content-Length) through a C{twist rproxy}
        process: the upstream receives exactly 1 GiB and the proxy's peak RSS stays under 80 MiB.
        """
        path = self.mktemp()
        with open(path, "wb") as sparse:
            sparse.truncate(GiB)
        self.addCleanup(os.remove, path)
        upstream, upstreams = serve(self, _SinkUpstream)
        pid, port, process = await startProxyProcess(self, upstream.url)
        baseline = statusKiB(pid, "VmRSS")

        started = time.monotonic()
        code, out, err = await curl(["-sS", "-H", "Expect:", "-T", path, f"http://127.0.0.1:{port}/upload"], timeout=90)
        elapsed = time.monotonic() - started
        peak = statusKiB(pid, "VmHWM")
        print(
            f"\n  1 GiB upload in {elapsed:.1f}s ({GiB / MiB / elapsed:.0f} MiB/s); proxy RSS at start"
            f" {baseline / KiB:.1f} MiB, peak (VmHWM) {peak / KiB:.1f} MiB"
        )
        self.assertEqual(code, 0, f"curl failed: {err!r}; proxy said {bytes(process.output[-4000:])!r}")
        self.assertEqual(len(upstreams), 1)
        self.assertEqual(upstreams[0].bodyRead, GiB)
        self.assertEqual(out, b"%d" % GiB)
        self.assertLess(peak * KiB, RSS_LIMIT)


# -- 4. a slow client pauses the upstream


@implementer(IPushProducer)
class _LargeUpstream(_Upstream):
    """Answers any request with a C{size}-byte body, written only as fast as its socket takes it."""

    paused = False
    stopped = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.sent = 0

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.head is not None and not self.sent and not self.stopped:
            self.transport.registerProducer(self, True)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % self.size
            )
            self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.sent < self.size:  # at most size / 64 KiB
            size = min(len(_ZEROS), self.size - self.sent)
            self.sent += size
            self.transport.write(_ZEROS[:size])

    def stopProducing(self) -> None:
        self.stopped = True


class _SlowReader(_Client):
    """GETs a body and reads it at about C{rate} bytes a second by pausing and resuming its transport."""

    TICK = 0.1
    headSeen = False

    def __init__(self, rate: int) -> None:
        super().__init__()
        self.rate = rate
        self.bodyRead = 0
        self.allowance = 0.0
        self.paused = False
        self.loop = task.LoopingCall(self.tick)

    def connectionMade(self) -> None:
        self.transport.write(b"GET /large HTTP/1.1\r\nHost: example\r\n\r\n")
        self.pause()
        self.loop.start(self.TICK)

    def pause(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def tick(self) -> None:
        self.allowance = min(self.allowance + self.rate * self.TICK, self.rate * self.TICK)
        if self.allowance > 0 and self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.headSeen:
            self.received += data
            parts = splitHead(bytes(self.received))
            if parts is None:
                return
            self.headSeen = True
            data = parts[1]
        self.bodyRead += len(data)
        self.allowance -= len(data)
        if self.allowance <= 0 and not self.paused:
            self.pause()

    def connectionLost(self, reason: object) -> None:
        super().connectionLost(reason)
        if self.loop.running:
            self.loop.stop()


class ResponseBackpressureTests(unittest.TestCase):
    timeout = 60

    async def test_slowClientPausesUpstream(self) -> None:
        """
        A client reading a 1 GiB response at ~1 MB/s for ~5 s through a C{twist rproxy} process:
        the proxy's peak RSS stays under 80 MiB and the upstream gets at most 16 MiB ahead of the
        client.  When the client then disconnects, the upstream connection is closed within 1 s.
        """
        upstream, upstreams = serve(self, lambda: _LargeUpstream(GiB))
        pid, port, process = await startProxyProcess(self, upstream.url)
        client = await connect(self, port, _SlowReader(1_000_000))
        self.addCleanup(lambda: client.loop.running and client.loop.stop())
        await waitFor(lambda: client.headSeen, 10, "the response head")

        samples = []
        for _ in range(25):  # 5 s
            await sleep(0.2)
            up = upstreams[0]
            samples.append((up.sent - client.bodyRead, statusKiB(pid, "VmRSS")))
        up = upstreams[0]
        sent, read = up.sent, client.bodyRead
        peak = statusKiB(pid, "VmHWM")
        upstreamSendQ = queued(up.transport, termios.TIOCOUTQ)
        clientRecvQ = queued(client.transport, termios.FIONREAD)
        maxAhead = max(ahead for ahead, _ in samples)
        print(
            f"\n  after ~5 s the client read {read / MiB:.2f} MiB, the upstream wrote {sent / MiB:.2f} MiB:"
            f" {(sent - read) / MiB:.2f} MiB ahead (at most {maxAhead / MiB:.2f} MiB; upstream send queue"
            f" {upstreamSendQ / KiB:.0f} KiB, client receive queue {clientRecvQ / KiB:.0f} KiB);"
            f" proxy RSS peak (VmHWM) {peak / KiB:.1f} MiB"
        )
        self.assertGreater(read, 2 * MiB, "the client should be reading about 1 MB/s")
        self.assertFalse(client.lostAt, "the proxy should not have dropped the client")
        self.assertLessEqual(maxAhead, RESPONSE_IN_FLIGHT_LIMIT)
        self.assertLess(peak * KiB, RSS_LIMIT)

        # The client goes away: the upstream's connection is closed, well before its body is done.
        client.loop.stop()
        gone = time.monotonic()
        client.transport.abortConnection()
        await waitFor(lambda: up.lostAt is not None, 5, "the upstream connection to close")
        delay = up.lostAt - gone
        print(f"  upstream connection closed {delay * 1000:.0f} ms after the client left")
        self.assertLess(delay, CANCEL_LIMIT)
        self.assertLess(up.sent, GiB)
        self.assertLess(statusKiB(pid, "VmHWM") * KiB, RSS_LIMIT)


# -- 5. each chunk is flushed at once


class _EventUpstream(_Upstream):
    """Answers with Server-Sent Events, one every C{interval} seconds, chunked; records when each left."""

    def __init__(self, count: int, interval: float) -> None:
        super().__init__()
        self.count = count
        self.interval = interval
        self.sentAt: list[float] = []
        self.call = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.head is not None and self.call is None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            self.send()

    def send(self) -> None:
        i = len(self.sentAt)
        self.sentAt.append(time.monotonic())
        self.transport.write(chunk(b"id: %d\ndata: event %d\n\n" % (i, i)))
        if i + 1 < self.count:
            self.call = reactor.callLater(self.interval, self.send)
        else:
            self.transport.write(b"0\r\n\r\n")

    def connectionLost(self, reason: object) -> None:
        super().connectionLost(reason)
        if self.call is not None and self.call.active():
            self.call.cancel()


class _EventClient(_Client):
    """Records when each event first appears in the response."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.arrivedAt: list[float | None] = [None] * count

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        now = time.monotonic()
        for i, seen in enumerate(self.arrivedAt):
            if seen is None and b"data: event %d\n\n" % i in self.received:
                self.arrivedAt[i] = now


class ChunkFlushTests(unittest.TestCase):
    timeout = 30

    async def test_serverSentEventsArriveOneByOne(self) -> None:
        """
        An upstream sends an event every 300 ms: the client receives each one before the next is
        sent, the first more than a second before the last is sent.
        """
        count, interval = 5, 0.3
        upstream, upstreams = serve(self, lambda: _EventUpstream(count, interval))
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port, _EventClient(count))
        client.transport.write(b"GET /events HTTP/1.1\r\nHost: example\r\nAccept: text/event-stream\r\n\r\n")
        await waitFor(lambda: all(client.arrivedAt), 10, "all the events")
        sentAt, arrivedAt = upstreams[0].sentAt, client.arrivedAt
        latencies = [arrived - sent for sent, arrived in zip(sentAt, arrivedAt, strict=True)]
        print("\n  event latencies through the proxy: " + ", ".join(f"{d * 1000:.1f} ms" for d in latencies))
        for i in range(count - 1):
            self.assertLess(arrivedAt[i], sentAt[i + 1], f"event {i} arrived only with the next one")
        self.assertLess(arrivedAt[0], sentAt[-1] - 2 * interval)

        parts = splitHead(bytes(client.received))
        self.assertIsNotNone(parts)
        head, body = parts
        self.assertTrue(head.startswith(b"HTTP/1.1 200"))
        self.assertEqual(headerValues(head, b"content-type"), [b"text/event-stream"])
        await waitFor(lambda: dechunk(splitHead(bytes(client.received))[1])[1], 5, "the end of the stream")
        events = b"".join(b"id: %d\ndata: event %d\n\n" % (i, i) for i in range(count))
        self.assertEqual(dechunk(splitHead(bytes(client.received))[1]), (events, True))


# -- 6. a client that goes away cancels the upstream request


class _HangingUpstream(_Upstream):
    """Sends C{prefix} once the request head is in, then nothing more."""

    def __init__(self, prefix: bytes) -> None:
        super().__init__()
        self.prefix = prefix
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.head is not None and not self.answered:
            self.answered = True
            if self.prefix:
                self.transport.write(self.prefix)


class ClientGoneTests(unittest.TestCase):
    timeout = 30

    async def _leave(self, prefix: bytes, arrived: Callable[[bytes], bool], abort: bool) -> float:
        """The client leaves once C{arrived(received)}; return how long the upstream connection outlived it."""
        upstream, upstreams = serve(self, lambda: _HangingUpstream(prefix))
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port, _Client())
        client.transport.write(b"GET /download HTTP/1.1\r\nHost: example\r\n\r\n")
        await waitFor(lambda: upstreams and upstreams[0].answered, 5, "the request upstream")
        await waitFor(lambda: arrived(bytes(client.received)), 5, "the response so far")
        up = upstreams[0]
        self.assertIsNone(up.lostAt)
        gone = time.monotonic()
        if abort:
            client.transport.abortConnection()
        else:
            client.transport.loseConnection()
        await waitFor(lambda: up.lostAt is not None, 5, "the upstream connection to close")
        delay = up.lostAt - gone
        print(f"\n  upstream connection closed {delay * 1000:.1f} ms after the client left")
        self.assertLess(delay, CANCEL_LIMIT)
        self.assertEqual(proxy.upstreams[0].pool.idleCount, 0)
        # Cancelled means gone: no timer of the aborted upstream connection is left to fire later.
        await sleep(0.05)
        leftover = connectionTimers()
        self.addCleanup(lambda: [call.cancel() for call in connectionTimers()])  # one failure, not two
        if leftover:
            self.fail(f"the aborted upstream connection left its timer armed: {leftover}")
        return delay

    async def test_midContentLengthBody(self) -> None:
        """The client closes after the head and 1000 of 10 MB body bytes: the upstream request ends."""
        prefix = b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000
        await self._leave(prefix, lambda got: got.endswith(b"x" * 1000), abort=False)

    async def test_midChunkedBody(self) -> None:
        """The client resets the connection in the middle of a chunked body: the upstream request ends."""
        prefix = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"y" * 500)
        await self._leave(prefix, lambda got: b"y" * 500 in got, abort=True)

    async def test_beforeResponseHead(self) -> None:
        """The client closes while the upstream has not answered yet: the upstream request ends."""
        await self._leave(b"", lambda got: True, abort=False)
