"""
Overload shedding (rproxy/downstream/overload.py): a proxy held at its watermark of requests in flight, by a
slow upstream and more concurrent requests than the watermark, sheds the excess with 503 and
``Retry-After`` (HTTP/1.1 and HTTP/2) while the admitted requests complete and the health route answers;
the memory watermark sheds the same way; the memory is sampled, not read per request.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from rproxy.downstream.overload import MEMORY_SAMPLE, Overload
from rproxy.downstream.site import DrainingService, ProxySite
from rproxy.observe.metrics import rejectionReason
from rproxy.observe.record import ExchangeRecord
from rproxy.test.h2client import H2Client
from rproxy.test.support import (
    ReceivedRequest,
    ScriptedUpstream,
    freePort,
    headerValues,
    rawRequest,
    responseStatus,
    splitResponses,
    waitFor,
)
from rproxy.test.test_admin import HEALTH, TOKEN, RunningService, startAdmin, startService
from rproxy.test.test_drain import ProxyProcess, waitUntilListening
from rproxy.test.test_limits import connectClient

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
#: Requests sent at once, and the watermark they meet.
_SENT, _WATERMARK = 12, 5


def siteOf(running: RunningService) -> ProxySite:
    """The proxy site of a service built by L{startService}."""
    [draining] = [each for each in running.top if isinstance(each, DrainingService)]
    [site] = draining.sites
    return site


class _Records:
    """An exchange observer keeping every record."""

    def __init__(self, site: ProxySite) -> None:
        self.records: list[ExchangeRecord] = []
        site.observers.append(self)

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        self.records.append(record)


def get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def holdingSlow(held: list[Any]) -> Callable[[Any, ReceivedRequest], bytes]:
    """A scripted upstream's answers: C{/slow...} is held (its connection kept in C{held}), the rest is 200."""

    def respond(proto: Any, request: ReceivedRequest) -> bytes:
        if request.requestLine.startswith(b"GET /slow"):
            held.append(proto)
            return b""
        return _OK

    return respond


class InFlightTests(unittest.TestCase):
    """--max-in-flight: a slow upstream, and more requests at once than the watermark."""

    async def test_shed(self) -> None:
        held: list[Any] = []
        upstream = ScriptedUpstream(self, holdingSlow(held))
        running = startAdmin(
            self, "--upstream", upstream.url, "--max-in-flight", str(_WATERMARK), "--health-route", HEALTH
        )
        site = siteOf(running)
        records = _Records(site)
        answers = [rawRequest(running.port, get(b"/slow/%d" % i), timeout=15) for i in range(_SENT)]
        self.assertTrue(await waitFor(lambda: len(held) == _WATERMARK and len(records.records) == _SENT - _WATERMARK))
        self.assertEqual(site.overload.inFlight, _WATERMARK)

        # Overloaded: the health route and the admin API answer, a new request (HTTP/1.1 or HTTP/2) is shed.
        [(head, body)] = splitResponses(await rawRequest(running.port, get(HEALTH.encode()), timeout=5))
        self.assertEqual((responseStatus(head), body), (200, b"ok\n"))
        assert running.adminPort is not None
        state = b"GET /state HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
        answer = await rawRequest(running.adminPort, state % TOKEN.encode(), timeout=5)
        self.assertEqual(responseStatus(answer), 200, answer)
        client = await H2Client.connect(running.port)
        self.addCleanup(client.close)
        stream = client.request(b"GET", b"/fast")
        await client.waitUntil(lambda: client.streams[stream].ended)
        self.assertEqual(client.streams[stream].status, 503)
        self.assertEqual(client.streams[stream].header(b"retry-after"), [b"1"])
        self.assertEqual(len(held), _WATERMARK)

        for proto in held:
            proto.transport.write(_OK)
        responses = await defer.gatherResults(answers)
        statuses = sorted(responseStatus(response) for response in responses)
        self.assertEqual(statuses, [200] * _WATERMARK + [503] * (_SENT - _WATERMARK))
        for response in responses:
            if responseStatus(response) == 503:
                self.assertEqual(headerValues(response, b"retry-after"), [b"1"])
                self.assertEqual(headerValues(response, b"x-rproxy-fault"), [b"proxy"])
                self.assertIn(b"the proxy is overloaded (5 requests in flight, the limit is 5)", response)
        shed = [record for record in records.records if record.status == 503]
        self.assertEqual(len(shed), _SENT - _WATERMARK + 1)
        self.assertEqual({rejectionReason(record) for record in shed}, {"overload"})
        self.assertEqual(len(upstream.requests), _WATERMARK)  # the shed requests never went upstream

        # Every admitted request ended: the count is back to 0, and requests are admitted again.
        self.assertTrue(await waitFor(lambda: site.overload.inFlight == 0))
        self.assertEqual(responseStatus(await rawRequest(running.port, get(b"/fast"), timeout=5)), 200)
        self.assertEqual(site.overload.inFlight, 0)

    async def test_tunnelLeavesTheCount(self) -> None:
        """A WebSocket's request leaves the requests in flight once its tunnel opens."""

        def respond(proto: Any, request: ReceivedRequest) -> bytes:
            if not request.requestLine.startswith(b"GET /chat"):
                return _OK
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: x\r\n\r\n"
            )

        upstream = ScriptedUpstream(self, respond)
        running = startService(self, "--upstream", upstream.url, "--max-in-flight", "1")
        site = siteOf(running)
        upgrade = (
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        tunnel = await connectClient(self, running.port)
        tunnel.transport.write(upgrade)
        self.assertTrue(await waitFor(lambda: tunnel.received.startswith(b"HTTP/1.1 101 ")))
        self.assertTrue(await waitFor(lambda: site.overload.inFlight == 0, timeout=2))
        self.assertEqual(responseStatus(await rawRequest(running.port, get(b"/other"), timeout=5)), 200)
        self.assertIsNone(tunnel.closedAt)  # the tunnel is still open


class ProcessTests(unittest.TestCase):
    """A real C{twist rproxy} process (this checkout's rproxy), overloaded."""

    async def test_overloaded(self) -> None:
        held: list[Any] = []
        upstream = ScriptedUpstream(self, holdingSlow(held))
        port = freePort()
        argv = [sys.executable, "-m", "twisted", "rproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--upstream", upstream.url, "--access-log", "-", "--max-in-flight", "3", "--health-route", HEALTH]
        process = ProxyProcess.spawn(self, argv)
        await waitUntilListening(self, process, port)
        answers = [rawRequest(port, get(b"/slow/%d" % i), timeout=15) for i in range(8)]
        self.assertTrue(await waitFor(lambda: len(held) == 3, timeout=10))
        [(head, body)] = splitResponses(await rawRequest(port, get(HEALTH.encode()), timeout=5))
        self.assertEqual((responseStatus(head), body), (200, b"ok\n"))
        for proto in held:
            proto.transport.write(_OK)
        statuses = sorted(responseStatus(response) for response in await defer.gatherResults(answers))
        self.assertEqual(statuses, [200] * 3 + [503] * 5)
        self.assertEqual(responseStatus(await rawRequest(port, get(b"/fast"), timeout=5)), 200)
        self.assertTrue(await waitFor(lambda: process.log.count("the proxy is overloaded (3 requests in flight") >= 5))


class MemoryTests(unittest.TestCase):
    """--max-memory: above it, proxied requests are shed; the health route answers."""

    async def test_shed(self) -> None:
        upstream = ScriptedUpstream(self, lambda proto, request: _OK)
        running = startService(self, "--upstream", upstream.url, "--max-memory", "1M", "--health-route", HEALTH)
        answer = await rawRequest(running.port, get(b"/"), timeout=5)
        self.assertEqual(responseStatus(answer), 503, answer)
        self.assertIn(b"MiB resident, the limit is 1 MiB", answer)
        self.assertEqual(headerValues(answer, b"retry-after"), [b"1"])
        [(head, body)] = splitResponses(await rawRequest(running.port, get(HEALTH.encode()), timeout=5))
        self.assertEqual((responseStatus(head), body), (200, b"ok\n"))
        self.assertEqual(upstream.requests, [])

    def test_sampled(self) -> None:
        """The memory is read at most every MEMORY_SAMPLE seconds, however many requests arrive."""
        clock = Clock()
        readings: list[int] = []

        def read() -> int:
            readings.append(1)
            return 100 << 20

        overload = Overload(clock, maxMemory=200 << 20, readMemory=read)
        for _ in range(1000):
            self.assertIsNone(overload.admit())
        self.assertEqual(len(readings), 1)
        clock.advance(MEMORY_SAMPLE)
        self.assertIsNone(overload.admit())
        self.assertEqual(len(readings), 2)
        self.assertEqual(overload.inFlight, 1001)

    def test_unreadable(self) -> None:
        """Without /proc, the memory watermark is not enforced (and a warning says so)."""
        overload = Overload(Clock(), maxMemory=1, readMemory=lambda: None)
        self.assertIsNone(overload.admit())
        self.assertEqual(overload.maxMemory, 0)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
