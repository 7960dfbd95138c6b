"""
The limits of rproxy/downstream/limits.py and their answers, with real sockets: connections per client
address, the minimum body rate (slow POST), the write timeout (slow read, HTTP/1.1 and HTTP/2), the total
request time, and the bytes of control frames an HTTP/2 client that does not read makes the proxy queue.
Each refusal is checked for its status (or GOAWAY code), its reason in the log, and its record's
rejection reason (what C{rproxy_rejections_total} counts).

(HTTP/2 response memory per stream and per connection under a client that does not read is measured by
test_h2_abuse.ResponseMemoryTests; the header count limit on HTTP/2 by test_h2_requests.)
"""

from __future__ import annotations

import socket
import time
from typing import Any

import h2.errors
from twisted.internet import protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from rproxy.downstream.connection import ClientConnection
from rproxy.downstream.http2 import CLOSE_GRACE
from rproxy.downstream.limits import ClientLimits, RequestClock, addressKey
from rproxy.downstream.site import ProxySite
from rproxy.observe.metrics import rejectionReason
from rproxy.observe.record import ExchangeRecord
from rproxy.test.h2client import H2Client
from rproxy.test.support import (
    LogCapture,
    ReceivedRequest,
    RunningProxy,
    ScriptedUpstream,
    headerValues,
    rawRequest,
    responseStatus,
    sleep,
    startProxy,
    waitFor,
)
from rproxy.test.test_streaming import MiB, _LargeUpstream, serve

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Records:
    """An exchange observer keeping every record."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.records: list[ExchangeRecord] = []
        proxy.site.observers.append(self)

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        self.records.append(record)

    def reasons(self) -> list[str | None]:
        """What C{rproxy_rejections_total} counts each record under."""
        return [rejectionReason(record) for record in self.records]


class _Client(protocol.Protocol):
    """A raw client: sends what it is told, keeps what comes back; optionally reads nothing."""

    transport: Any
    closedAt: float | None = None

    def __init__(self, reads: bool = True) -> None:
        self.received = bytearray()
        self.reads = reads

    def connectionMade(self) -> None:
        if not self.reads:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closedAt = time.monotonic()


async def connectClient(testCase: unittest.TestCase, port: int, reads: bool = True) -> _Client:
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), _Client(reads))

    def abort() -> None:
        if client.transport.connected:
            client.transport.abortConnection()

    testCase.addCleanup(abort)
    return client


def _hold(held: list[Any]) -> Any:
    """An upstream script that answers nothing, keeping each connection in C{held}."""

    def respond(proto: Any, request: ReceivedRequest) -> bytes:
        held.append(proto)
        return b""

    return respond


class AddressKeyTests(unittest.TestCase):
    """What a client's connections are counted under."""

    def test_keys(self) -> None:
        self.assertEqual(addressKey("192.0.2.7"), b"192.0.2.7")
        self.assertEqual(addressKey("::ffff:192.0.2.7"), b"192.0.2.7")
        self.assertEqual(addressKey("2001:db8:1:2::1"), b"2001:db8:1:2::/64")
        self.assertEqual(addressKey("2001:db8:1:2:ffff::9"), addressKey("2001:db8:1:2::1"))
        self.assertNotEqual(addressKey("2001:db8:1:3::1"), addressKey("2001:db8:1:2::1"))


class ClientConnectionsTests(unittest.TestCase):
    """--max-client-connections: the connections of one address at once."""

    async def test_capped(self) -> None:
        """The third connection from 127.0.0.1 gets 503 and is closed; once one closes, a new one is served."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url], "--max-client-connections", "2")
        records = _Records(proxy)
        logs = LogCapture(self)
        first, second = [await connectClient(self, proxy.port) for _ in range(2)]
        self.assertTrue(await waitFor(lambda: len(proxy.site.connections) == 2))
        refused = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        self.assertEqual(responseStatus(refused), 503, refused)
        self.assertIn(b"the client is at its limit of 2 connections", refused)
        self.assertIn(b"error=connection_limit_reached", headerValues(refused, b"proxy-status")[0])
        self.assertEqual(upstream.requests, [])
        self.assertEqual(records.reasons(), ["overload"])
        self.assertTrue(any("connections open from 127.0.0.1" in line for line in logs.formatted()))
        first.transport.loseConnection()
        self.assertTrue(await waitFor(lambda: proxy.site.perClient == {b"127.0.0.1": 1}))
        served = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5)
        self.assertEqual(responseStatus(served), 200, served)
        second.transport.loseConnection()
        self.assertTrue(await waitFor(lambda: proxy.site.perClient == {}))

    def test_ipv6ByNetwork(self) -> None:
        """Two addresses of one IPv6 /64 share a count; another /64, and IPv4, have their own."""
        site = ProxySite(None, ClientLimits(maxClientConnections=2), Clock())  # type: ignore[arg-type]

        def open(address: Any) -> Any:
            made = site.buildProtocol(address)
            assert made is not None
            made.makeConnection(StringTransport(peerAddress=address))
            return made

        for host in ("2001:db8::1", "2001:db8::2:1"):
            self.assertIsInstance(open(IPv6Address("TCP", host, 40000)), ClientConnection)
        refusedTransport = StringTransport()
        refused = site.buildProtocol(IPv6Address("TCP", "2001:db8::3", 40000))
        assert refused is not None
        refused.makeConnection(refusedTransport)
        self.assertNotIsInstance(refused, ClientConnection)
        self.assertIn(b"503 Service Unavailable", refusedTransport.value())
        self.assertIsInstance(open(IPv6Address("TCP", "2001:db8:0:1::1", 40000)), ClientConnection)
        self.assertIsInstance(open(IPv4Address("TCP", "192.0.2.1", 40000)), ClientConnection)
        self.assertEqual(site.perClient, {b"2001:db8::/64": 2, b"2001:db8:0:1::/64": 1, b"192.0.2.1": 1})


class BodyRateTests(unittest.TestCase):
    """--min-body-rate: a body slower than the rate over a window, after the grace period, gets 408."""

    def startProxy(self, upstream: str, *arguments: str) -> RunningProxy:
        rate = ("--min-body-rate", "1000", "--body-rate-grace", "0.5", "--body-rate-window", "0.5")
        return startProxy(self, [upstream], *rate, *arguments)

    async def test_slowPost(self) -> None:
        """100 bytes per second against a minimum of 1000: 408 with the rate, the upstream request aborted."""
        held: list[Any] = []
        upstream = ScriptedUpstream(self, _hold(held))
        proxy = self.startProxy(upstream.url)
        records = _Records(proxy)
        logs = LogCapture(self)
        client = await connectClient(self, proxy.port)
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        for _ in range(50):  # 10 bytes every 0.1 s, at most 5 s
            if client.closedAt is not None:
                break
            client.transport.write(b"x" * 10)
            await sleep(0.1)
        self.assertIsNotNone(client.closedAt, "a slow body was not refused")
        self.assertLess(client.closedAt - started, 3)  # type: ignore[operator]
        answer = bytes(client.received)
        self.assertEqual(responseStatus(answer), 408, answer)
        self.assertIn(b"below the minimum of 1000 bytes/s", answer)
        self.assertEqual(records.reasons(), ["limits"])
        self.assertEqual(len(logs.withStatus(408)), 1)
        self.assertTrue(await waitFor(lambda: upstream.lost))  # the upstream never sees the body complete
        self.assertEqual(upstream.requests, [])

    async def test_slowPostHTTP2(self) -> None:
        """The same over HTTP/2: 408 on the stream, and the connection goes on."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = self.startProxy(upstream.url)
        records = _Records(proxy)
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        stream = client.request(b"POST", b"/upload", [(b"content-length", b"100000")], endStream=False)
        for _ in range(50):  # 10 bytes every 0.1 s, at most 5 s
            if client.streams[stream].finished:
                break
            client.send(stream, b"x" * 10)
            await sleep(0.1)
        self.assertEqual(client.streams[stream].status, 408)
        self.assertIn(b"below the minimum of 1000 bytes/s", client.streams[stream].data)
        self.assertEqual(records.reasons(), ["limits"])
        other = client.request(b"GET", b"/after")
        await client.waitUntil(lambda: client.streams[other].ended)
        self.assertEqual(client.streams[other].status, 200)

    async def test_steadyPostServed(self) -> None:
        """A body that keeps above the rate, for longer than several windows, is served."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = self.startProxy(upstream.url)
        client = await connectClient(self, proxy.port)
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 6000\r\n\r\n")
        for _ in range(30):  # 200 bytes every 0.05 s: 4000 bytes/s, for 1.5 s
            client.transport.write(b"x" * 200)
            await sleep(0.05)
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"ok")))
        self.assertEqual(responseStatus(bytes(client.received)), 200)
        self.assertEqual(len(upstream.requests[0].body), 6000)

    async def test_waitingForContinue(self) -> None:
        """
        A client waiting for a ``100 Continue`` that its upstream does not send is not slow: its body
        is not measured while it waits.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = self.startProxy(upstream.url)
        client = await connectClient(self, proxy.port)
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await sleep(2)  # four windows
        self.assertEqual(bytes(client.received), b"")
        client.transport.write(b"hello")
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"ok")))
        self.assertEqual(responseStatus(bytes(client.received)), 200)

    async def test_heldBackByUpstream(self) -> None:
        """
        An upstream that reads nothing for 2 s: the proxy pauses the client, and the windows it was paused
        in do not count against it; the whole body arrives and is answered.
        """
        size = 16 * MiB
        listening, built = serve(self, lambda: _SlowReader(size, 2.0))
        proxy = self.startProxy(listening.url, "--request-timeout", "0")
        client = await connectClient(self, proxy.port)
        client.transport.write(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        client.transport.write(bytes(size))
        done = await waitFor(lambda: client.received.endswith(b"ok") or client.closedAt is not None, timeout=15)
        self.assertTrue(done, f"no answer; the upstream has {built[0].received} bytes")
        self.assertEqual(responseStatus(bytes(client.received)), 200, bytes(client.received[:300]))
        self.assertTrue(built[0].wasPaused)


class _SlowReader(protocol.Protocol):
    """An upstream that reads nothing for C{delay} seconds, then the whole request, and answers 200."""

    transport: Any
    wasPaused = False

    def __init__(self, size: int, delay: float) -> None:
        self.size = size
        self.received = 0
        self.delay = delay

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.wasPaused = True
        reactor.callLater(self.delay, self.transport.resumeProducing)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.size:  # the head and the body: at least the body's size
            end = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            if not self.transport.disconnecting:
                self.transport.write(end)


class _Timed:
    """A request as a L{RequestClock} sees it, its body's progress set by the test."""

    def __init__(self) -> None:
        self.progress: tuple[int, int, bool] | None = (0, 0, False)
        self.slow: list[tuple[int, float]] = []
        self.late: list[float] = []

    def bodyProgress(self) -> tuple[int, int, bool] | None:
        return self.progress

    def bodyTooSlow(self, received: int, seconds: float) -> None:
        self.slow.append((received, seconds))

    def tookTooLong(self, seconds: float) -> None:
        self.late.append(seconds)


class RequestClockTests(unittest.TestCase):
    """The windows of the body rate, measured on a fake clock."""

    limits = ClientLimits(minBodyRate=100, bodyRateGrace=2.0, bodyRateWindow=1.0)

    def start(self, limits: ClientLimits | None = None) -> tuple[Clock, _Timed, RequestClock]:
        clock, request = Clock(), _Timed()
        timer = RequestClock.of(clock, limits or self.limits, request, True)
        assert timer is not None
        return clock, request, timer

    def test_slowAfterGrace(self) -> None:
        """Nothing is measured in the grace period; the first window after it that is short is refused."""
        clock, request, _ = self.start()
        clock.advance(2.0)  # the grace period: the first window starts
        request.progress = (99, 0, False)
        clock.advance(1.0)
        self.assertEqual(request.slow, [(99, 1.0)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fastEnough(self) -> None:
        clock, request, timer = self.start()
        for second in range(2, 10):
            request.progress = (second * 100, 0, False)
            clock.advance(1.0)
        self.assertEqual(request.slow, [])
        timer.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_heldBackWindows(self) -> None:
        """A window in which the body was held back, or let go, does not count, even if let go at its end."""
        clock, request, _ = self.start()
        clock.advance(2.0)
        request.progress = (0, 1, True)  # paused by the proxy
        clock.advance(1.0)
        request.progress = (0, 2, False)  # let go just now: the window does not count
        clock.advance(1.0)
        self.assertEqual(request.slow, [])
        clock.advance(1.0)  # a whole window, not held back, and nothing came
        self.assertEqual(request.slow, [(0, 1.0)])

    def test_bodyComplete(self) -> None:
        """Once the body is in, nothing more is measured and no timer is left."""
        clock, request, _ = self.start()
        request.progress = None
        clock.advance(2.0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_totalTime(self) -> None:
        clock, request, _ = self.start(ClientLimits(minBodyRate=100, requestTimeout=2.5))
        for _ in range(3):
            request.progress = (request.progress[0] + 1000, 0, False)  # type: ignore[index]
            clock.advance(1.0)
        self.assertEqual((request.slow, request.late), ([], [2.5]))
        self.assertEqual(clock.getDelayedCalls(), [])


class WriteTimeoutTests(unittest.TestCase):
    """--write-timeout: a client that reads nothing of its response is cut off."""

    async def test_http1(self) -> None:
        listening, built = serve(self, lambda: _LargeUpstream(256 * MiB))
        proxy = startProxy(self, [listening.url], "--write-timeout", "1")
        records = _Records(proxy)
        logs = LogCapture(self)
        client = await connectClient(self, proxy.port, reads=False)
        client.transport.write(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(await waitFor(lambda: built and built[0].paused, timeout=10), "the upstream was not paused")
        self.assertTrue(await waitFor(lambda: not proxy.site.connections, timeout=5), "the client was not cut off")
        self.assertTrue(await waitFor(lambda: built[0].lostAt is not None), "the upstream request went on")
        self.assertLess(built[0].sent, 64 * MiB)
        self.assertEqual(records.reasons(), ["limits"])
        [record] = records.records
        self.assertEqual((record.outcome, record.reason), ("aborted", "the client read nothing of the response for 1s"))
        self.assertTrue(any("read nothing of the response for 1s; connection aborted" in x for x in logs.formatted()))

    async def test_http1Reading(self) -> None:
        """A client that reads, slowly, a response larger than the buffers: the timeout does not cut it."""
        size = 8 * MiB
        listening, built = serve(self, lambda: _LargeUpstream(size))
        proxy = startProxy(self, [listening.url], "--write-timeout", "1")
        client = await connectClient(self, proxy.port)
        client.transport.write(b"GET /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for _ in range(30):  # read in bursts, pausing 0.3 s between them: at most 9 s
            if client.closedAt is not None:
                break
            client.transport.pauseProducing()
            await sleep(0.3)
            client.transport.resumeProducing()
            await sleep(0.05)
        self.assertIsNotNone(client.closedAt)
        self.assertEqual(len(client.received) - client.received.find(b"\r\n\r\n") - 4, size)

    async def test_http2(self) -> None:
        listening, built = serve(self, lambda: _LargeUpstream(256 * MiB))
        proxy = startProxy(self, [listening.url], "--write-timeout", "1")
        records = _Records(proxy)
        logs = LogCapture(self)
        client = await H2Client.connect(proxy.port, initialWindow=2**31 - 1)
        self.addCleanup(client.close)
        client.conn.increment_flow_control_window(2**31 - 1 - 65535)
        stream = client.request(b"GET", b"/large")
        await client.waitUntil(lambda: len(client.streams[stream].data) > 0)
        client.stopReading()
        self.assertTrue(await waitFor(lambda: not proxy.site.connections, timeout=10), "the client was not cut off")
        self.assertTrue(await waitFor(lambda: built[0].lostAt is not None), "the upstream request went on")
        self.assertEqual(records.reasons(), ["limits"])
        self.assertTrue(any("the client read nothing for 1s; connection aborted" in x for x in logs.formatted()))

    async def test_http2ShutWindow(self) -> None:
        """
        A client that reads, but never opens a stream's window again (a zero-window slow read): that stream
        is reset with CANCEL and its upstream request cancelled; the connection serves another stream.
        """
        listening, built = serve(self, lambda: _LargeUpstream(64 * MiB))
        proxy = startProxy(self, [listening.url], "--write-timeout", "1")
        records = _Records(proxy)
        logs = LogCapture(self)
        client = await H2Client.connect(proxy.port, autoAcknowledge=False)
        self.addCleanup(client.close)
        stream = client.request(b"GET", b"/large")
        await client.waitUntil(lambda: client.streams[stream].finished, timeout=10)
        self.assertEqual(client.streams[stream].resetCode, h2.errors.ErrorCodes.CANCEL)
        self.assertEqual(len(client.streams[stream].data), 65535)  # the first window, no more
        self.assertTrue(await waitFor(lambda: built[0].lostAt is not None), "the upstream request went on")
        self.assertEqual(records.reasons(), ["limits"])
        self.assertTrue(any("kept its flow-control window shut for 1s; stream reset" in x for x in logs.formatted()))
        client.acknowledge(stream, 65535)  # the connection's window only (the stream is closed): others may send
        other = client.request(b"GET", b"/large")
        await client.waitUntil(lambda: len(client.streams[other].data) > 0)
        self.assertTrue(proxy.site.connections)


class RequestTimeoutTests(unittest.TestCase):
    """--request-timeout: from the head to the end of the response."""

    async def test_noResponse(self) -> None:
        """An upstream that never answers: 504, and the upstream request is cancelled."""
        held: list[Any] = []
        upstream = ScriptedUpstream(self, _hold(held))
        proxy = startProxy(self, [upstream.url], "--request-timeout", "1", "--response-timeout", "30")
        records = _Records(proxy)
        started = time.monotonic()
        answer = await rawRequest(proxy.port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5)
        self.assertEqual(responseStatus(answer), 504, answer)
        self.assertIn(b"the request took longer than 1s", answer)
        self.assertLess(time.monotonic() - started, 3)
        self.assertTrue(await waitFor(lambda: upstream.lost), "the upstream request was not cancelled")
        self.assertEqual([(r.status, r.errorType) for r in records.records], [(504, "http_response_timeout")])

    async def test_bodyStillArriving(self) -> None:
        """A body still arriving when the time is up: 408."""
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = startProxy(self, [upstream.url], "--request-timeout", "1", "--min-body-rate", "0")
        records = _Records(proxy)
        answer = await rawRequest(
            proxy.port, b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nsome", timeout=5
        )
        self.assertEqual(responseStatus(answer), 408, answer)
        self.assertIn(b"the request took longer than 1s (its body was still arriving)", answer)
        self.assertEqual(records.reasons(), ["limits"])
        self.assertEqual(upstream.requests, [])

    async def test_responseBegun(self) -> None:
        """A response begun and not ended in time is reset: the client never sees it complete."""

        def respond(proto: Any, request: ReceivedRequest) -> bytes:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url], "--request-timeout", "1", "--read-timeout", "30")
        answer = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        self.assertEqual(responseStatus(answer), 200, answer)
        self.assertTrue(answer.endswith(b"\r\n\r\npart"), answer)
        self.assertTrue(await waitFor(lambda: upstream.lost))

    def test_noTimerWithoutLimits(self) -> None:
        """A request without a body, and no total time: no timer is made."""
        request: Any = object()
        self.assertIsNone(RequestClock.of(Clock(), ClientLimits(), request, False))
        self.assertIsNotNone(RequestClock.of(Clock(), ClientLimits(), request, True))
        self.assertIsNone(RequestClock.of(Clock(), ClientLimits(minBodyRate=0), request, True))


class ControlFloodTests(unittest.TestCase):
    """A client that sends PINGs or SETTINGS and reads none of their acknowledgements."""

    async def test_pingFlood(self) -> None:
        """The client reads again at once: it finds GOAWAY(ENHANCE_YOUR_CALM) after the acknowledgements."""
        client, records = await self.flood(bytes.fromhex("000008060000000000") + bytes(8))
        client.resumeReading()
        await client.waitUntil(lambda: client.closed.called, timeout=CLOSE_GRACE + 5)
        assert client.goAway is not None
        self.assertEqual(client.goAway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(records.reasons(), ["rate_limit"])  # a flood: 429, as every GOAWAY(ENHANCE_YOUR_CALM)

    async def test_settingsFlood(self) -> None:
        """The client never reads again: its connection is reset after the close's grace period."""
        client, records = await self.flood(bytes.fromhex("000000040000000000"))  # an empty SETTINGS
        self.assertTrue(await waitFor(lambda: not self.proxy.site.connections, timeout=CLOSE_GRACE + 5))
        self.assertEqual(records.reasons(), ["rate_limit"])

    async def flood(self, frame: bytes) -> tuple[H2Client, _Records]:
        """
        Send C{frame} over and over, reading nothing, until the replies held pass the cap and the proxy
        sends GOAWAY(ENHANCE_YOUR_CALM); return the client and the records.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        proxy = self.proxy = startProxy(self, [upstream.url])
        records = _Records(proxy)
        logs = LogCapture(self)
        client = await H2Client.connect(proxy.port)
        self.addCleanup(client.close)
        # Small socket buffers on both ends, so that fewer replies fill them (seconds of h2 work otherwise).
        [connection] = proxy.site.connections
        connection.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transportHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.stopReading()
        for _ in range(400):  # 2000 frames (at most 34 KB) a turn, at most 14 MB (about 10 turns are needed)
            if any("GOAWAY(ENHANCE_YOUR_CALM)" in line for line in logs.formatted()):
                break
            client.writeRaw(frame * 2000)
            await sleep(0.02)
        self.assertTrue(any("frames it does not read" in line for line in logs.formatted()))
        self.assertTrue(await waitFor(lambda: records.records))
        self.assertIn("GOAWAY ENHANCE_YOUR_CALM: the client made the proxy queue", records.records[0].reason or "")
        self.assertIn("bytes of frames it does not read", records.records[0].reason or "")
        return client, records
