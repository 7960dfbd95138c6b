"""
The record of each exchange (L{rproxy.observe.record}), as a real proxy fills it: one per request, handed to
the site's observers once it ends, however it ends, over HTTP/1.1 and HTTP/2 over TLS.
"""

from __future__ import annotations

from twisted.trial import unittest

from rproxy.errors import clientError
from rproxy.observe.record import ABORTED, CLIENT_GONE, DONE, ExchangeRecord
from rproxy.proxy.message import RequestContext
from rproxy.test.certs import listenSiteTLS
from rproxy.test.support import ScriptedUpstream, curl, rawRequest, startProxy, useFilters, waitFor
from rproxy.test.test_filter_chain import Step
from rproxy.test.test_upgrade import UpgradeTestCase

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Recorder:
    """An observer keeping every record it is handed."""

    def __init__(self) -> None:
        self.records: list[ExchangeRecord] = []

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        self.records.append(record)


class RecordTests(unittest.TestCase):
    """Records through a real proxy."""

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, lambda proto, request: OK)
        self.proxy = startProxy(self, [self.upstream.url])
        self.recorder = Recorder()
        self.proxy.site.observers.append(self.recorder)

    async def test_proxied(self) -> None:
        """A proxied exchange: its request, status, bytes both ways, service, upstream, attempts and times."""
        code, out, err = await curl(
            ["-s", "-d", "abc", "-H", "Host: shop.example", f"http://127.0.0.1:{self.proxy.port}/x?q=1"]
        )
        self.assertEqual((code, out), (0, b"hello"), err)
        [record] = self.recorder.records
        self.assertEqual((record.method, record.target, record.host), (b"POST", b"/x?q=1", b"shop.example"))
        self.assertEqual((record.version, record.peer, record.client), (b"HTTP/1.1", "127.0.0.1", "127.0.0.1"))
        self.assertEqual((record.status, record.bytesIn, record.bytesOut, record.outcome), (200, 3, 5, DONE))
        self.assertEqual((record.service, record.route, record.attempts), ("default", "", 1))
        self.assertEqual(record.upstream, self.upstream.url)
        assert record.connectTime is not None and record.firstByte is not None
        self.assertGreaterEqual(record.firstByte, record.connectTime)
        self.assertGreaterEqual(record.duration, record.firstByte)
        self.assertIsNone(record.tls)
        self.assertIsNone(record.fault)

    async def test_refusedAndUser(self) -> None:
        """A filter's refusal and an error name the side at fault; an authenticating filter names the user."""

        def authenticate(context: RequestContext) -> object:
            if context.inbound.headers.hasHeader(b"x-user"):
                context.user = "alice"
                return None
            return clientError(401, "credentials missing")

        useFilters(self.proxy, Step(b"auth", [], authenticate))  # type: ignore[arg-type]
        await rawRequest(self.proxy.port, b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await rawRequest(self.proxy.port, b"GET /b HTTP/1.1\r\nHost: h\r\nX-User: a\r\nConnection: close\r\n\r\n")
        refused, passed = self.recorder.records
        self.assertEqual((refused.status, refused.fault, refused.errorType), (401, "client", "http_request_error"))
        self.assertEqual((refused.reason, refused.attempts, refused.upstream), ("credentials missing", 0, None))
        self.assertEqual((passed.status, passed.user, passed.fault), (200, "alice", None))

    async def test_clientGone(self) -> None:
        """A client that leaves before the response: the record ends once, as the client's."""
        held: list[object] = []
        self.upstream.respond = lambda proto, request: held.append(proto) or b""  # type: ignore[func-returns-value]
        waiting = rawRequest(self.proxy.port, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n", timeout=0.5)
        self.assertTrue(await waitFor(lambda: held, 5))
        await waiting  # the client gives up after its timeout and closes
        self.assertTrue(await waitFor(lambda: self.recorder.records, 5))
        [record] = self.recorder.records
        self.assertEqual((record.outcome, record.status, record.service), (CLIENT_GONE, None, "default"))

    async def test_upstreamFailsMidBody(self) -> None:
        """A response the proxy must cut short is recorded as aborted, with its status and the upstream at fault."""
        self.upstream.respond = _cutAfter(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
        await rawRequest(self.proxy.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", timeout=5)
        self.assertTrue(await waitFor(lambda: self.recorder.records, 5))
        [record] = self.recorder.records
        self.assertEqual((record.outcome, record.status, record.fault), (ABORTED, 200, "upstream"))

    async def test_http2OverTLS(self) -> None:
        """HTTP/2 over TLS: the version, and the TLS version, server name and ALPN protocol."""
        port = listenSiteTLS(self, self.proxy.site)
        code, out, err = await curl(
            ["-s", "-k", "--http2", "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/t"]
        )
        self.assertEqual((code, out), (0, b"hello"), err)
        [record] = self.recorder.records
        self.assertEqual((record.version, record.status, record.host), (b"HTTP/2", 200, f"localhost:{port}".encode()))
        assert record.tls is not None
        version, name, alpn = record.tls
        self.assertTrue(version.startswith("TLSv1."), version)
        self.assertEqual((name, alpn), ("localhost", "h2"))


def _cutAfter(data: bytes):  # type: ignore[no-untyped-def]
    """A scripted answer: C{data}, then the connection closes (a response cut short)."""

    def respond(proto, request):  # type: ignore[no-untyped-def]
        proto.transport.write(data)
        proto.transport.loseConnection()
        return b""

    return respond


class TunnelRecordTests(UpgradeTestCase):
    async def test_recordedWhenClosed(self) -> None:
        """A tunnel's record ends when the tunnel closes, with its 101, as done."""
        proxy, upstream, client, server = await self.tunnel()
        recorder = Recorder()
        proxy.site.observers.append(recorder)
        client.transport.write(b"ping")
        self.assertTrue(await waitFor(lambda: server.received == b"ping"))
        self.assertEqual(recorder.records, [])
        client.transport.loseConnection()
        await server.lost
        self.assertTrue(await waitFor(lambda: recorder.records, 5))
        [record] = recorder.records
        self.assertEqual((record.status, record.outcome, record.target), (101, DONE, b"/chat"))
        self.assertGreater(record.duration, 0)
        self.assertEqual((record.splicedIn, record.bytesIn), (4, 4), "the client's bytes through the tunnel")

    async def test_splicedBytes(self) -> None:
        """What the tunnel carried both ways is in the record's bytes when it closes."""
        proxy, upstream, client, server = await self.tunnel()
        recorder = Recorder()
        proxy.site.observers.append(recorder)
        client.transport.write(b"ping")
        self.assertTrue(await waitFor(lambda: server.received == b"ping"))
        server.transport.write(b"pong, and more")
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"pong, and more")))
        client.transport.loseConnection()
        await server.lost
        self.assertTrue(await waitFor(lambda: recorder.records, 5))
        [record] = recorder.records
        carried = client.received[client.received.index(b"\r\n\r\n") + 4 :]  # after the 101's head
        self.assertTrue(carried.endswith(b"pong, and more"), carried)
        self.assertEqual((record.splicedIn, record.splicedOut), (4, len(carried)))
        self.assertEqual(record.bytesIn, 4)
        self.assertEqual(record.bytesOut - record.splicedOut, 0, "the 101 has no body")


class TrustedClientTests(unittest.TestCase):
    async def test_clientAfterTrustedProxies(self) -> None:
        """Behind a trusted proxy, the record's client is the address it forwarded; the peer stays the peer."""
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url], "--trusted-proxy", "127.0.0.1")
        recorder = Recorder()
        proxy.site.observers.append(recorder)
        forwarded = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n"
        await rawRequest(proxy.port, forwarded)
        [record] = recorder.records
        self.assertEqual((record.client, record.peer), ("203.0.113.9", "127.0.0.1"))
