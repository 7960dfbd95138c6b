"""
Informational responses end to end: ``Expect: 100-continue`` decided by the upstream (its 100 relayed,
or its final answer relayed without the body being read), automatic for local resources and for requests
the proxy refuses itself; 103 Early Hints to HTTP/1.1 and HTTP/2 clients, and no 1xx to HTTP/1.0.
"""

from __future__ import annotations

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from rproxy.app.demo import demoSite
from rproxy.downstream.site import ProxySite
from rproxy.test.h2client import H2Client
from rproxy.test.support import listen, rawRequest, responseStatus, sleep, startProxy, waitFor
from rproxy.test.test_streaming import serve

#: How long the upstream thinks before answering an expectation.
_THINK = 0.3


class _ExpectingUpstream(protocol.Protocol):
    """
    Answers ``Expect: 100-continue`` after L{_THINK} seconds with C{verdict}: C{b"100"} (then 200 once the
    5-byte body is in) or a final head sent without reading the body.
    """

    verdict = b"100"
    answeredAt: float | None = None

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        first = not self.received
        self.received += data
        if first:
            reactor.callLater(_THINK, self._decide)
        if self.verdict == b"100" and self.body == b"hello":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")

    @property
    def body(self) -> bytes:
        return self.received.partition(b"\r\n\r\n")[2]

    def _decide(self) -> None:
        self.answeredAt = reactor.seconds()
        if self.verdict == b"100":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self.transport.write(self.verdict)


class _WaitingClient(protocol.Protocol):
    """A raw HTTP/1.1 client that sends a head with ``Expect: 100-continue`` and its body only after a 100."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        self.received = b""
        self.closed = False
        self.firstByteAt: float | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        if self.firstByteAt is None:
            self.firstByteAt = reactor.seconds()
        before = self.received
        self.received += data
        if b"100 Continue\r\n\r\n" in self.received and b"100 Continue\r\n\r\n" not in before:
            self.transport.write(self.body)

    def connectionLost(self, reason: object) -> None:
        self.closed = True


_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"


class ContinueTests(unittest.TestCase):
    def upstream(self, verdict: bytes) -> list[_ExpectingUpstream]:
        def build() -> _ExpectingUpstream:
            upstream = _ExpectingUpstream()
            upstream.verdict = verdict
            return upstream

        listening, built = serve(self, build)
        self.proxy = startProxy(self, [listening.url])
        return built

    async def client(self, port: int, head: bytes = _HEAD) -> _WaitingClient:
        client = _WaitingClient(head, b"hello")
        await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        self.addCleanup(lambda: client.closed or client.transport.abortConnection())
        return client

    async def test_upstreamContinues(self) -> None:
        """
        The expectation goes upstream; the client hears nothing until the upstream's 100, which is
        relayed; only then does the body go, and the final response follows.
        """
        upstreams = self.upstream(b"100")
        client = await self.client(self.proxy.port)
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"done"), 5), client.received)
        upstream = upstreams[0]
        self.assertIn(b"\r\nExpect: 100-continue\r\n", upstream.received)
        assert client.firstByteAt is not None and upstream.answeredAt is not None
        self.assertGreaterEqual(client.firstByteAt, upstream.answeredAt, "a 100 came before the upstream's")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"))
        self.assertEqual(upstream.body, b"hello")

    async def test_upstreamRefuses(self) -> None:
        """A final answer without 100 (417, 401) is relayed; the body is never solicited; the connection closes."""
        for final in (
            b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\nContent-Length: 6\r\n\r\nwho?\r\n",
        ):
            upstreams = self.upstream(final)
            client = await self.client(self.proxy.port)
            self.assertTrue(await waitFor(lambda: client.closed, 5), "the connection was kept open")  # noqa: B023
            status = int(final[9:12])
            self.assertEqual(responseStatus(client.received), status, client.received)
            self.assertNotIn(b"100 Continue", client.received)
            self.assertIn(b"\r\nConnection: close\r\n", client.received.split(b"\r\n\r\n")[0])
            self.assertEqual(upstreams[0].body, b"", "the upstream got a body")

    async def test_http2(self) -> None:
        """The same over HTTP/2: the upstream's 100 is a HEADERS frame; a refusal ends the stream."""
        upstreams = self.upstream(b"100")
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        stream = client.request(b"POST", b"/up", [(b"content-length", b"5"), (b"expect", b"100-continue")], False)
        await client.waitUntil(lambda: bool(client.streams[stream].interim))
        self.assertEqual(client.streams[stream].interim, [[(b":status", b"100")]])
        assert upstreams[0].answeredAt is not None
        self.assertEqual(upstreams[0].body, b"")
        client.send(stream, b"hello", endStream=True)
        response = await client.response(stream)
        self.assertEqual((response.status, response.data), (200, b"done"))

        upstreams = self.upstream(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        stream = client.request(b"POST", b"/up", [(b"content-length", b"5"), (b"expect", b"100-continue")], False)
        response = await client.response(stream)
        self.assertEqual((response.status, response.interim, response.ended), (417, [], True))
        await sleep(0.1)  # the RST_STREAM(NO_ERROR) that tells the client to keep its body
        self.assertEqual(response.resetCode, 0)
        self.assertEqual(upstreams[0].body, b"")

    async def test_localResourceAutomatic(self) -> None:
        """A resource the proxy serves itself reads the body once it is in: the 100 is sent at once."""
        listening = listen(self, ProxySite(demoSite().resource))
        client = await self.client(listening.port, _HEAD.replace(b"/up", b"/echo"))
        self.assertTrue(await waitFor(lambda: b"bodyLength" in client.received, 5), client.received)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"))

    async def test_refusedWithoutContinue(self) -> None:
        """A body the proxy refuses by its declared length gets its 413 at once, without a 100."""
        self.upstream(b"100")
        proxy = startProxy(self, [self.proxy.url], "--max-body-size", "4")
        client = await self.client(proxy.port)
        self.assertTrue(await waitFor(lambda: client.closed, 5))
        self.assertEqual(responseStatus(client.received), 413)
        self.assertNotIn(b"100 Continue", client.received)


class EarlyHintsTests(unittest.TestCase):
    """103 Early Hints from the upstream reaches HTTP/1.1 and HTTP/2 clients, never HTTP/1.0 ones."""

    def setUp(self) -> None:
        listening, _ = serve(self, _Answering)
        self.proxy = startProxy(self, [listening.url])

    async def test_versions(self) -> None:
        for version, expected in ((b"HTTP/1.1", True), (b"HTTP/1.0", False)):
            data = await rawRequest(self.proxy.port, b"GET / " + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
            first = data.split(b"\r\n", 1)[0]
            self.assertEqual(first == b"HTTP/1.1 103 Early Hints", expected, data)
            self.assertEqual(b"Link: </style.css>; rel=preload" in data.split(b"\r\n\r\n")[0], expected)
            self.assertTrue(data.endswith(b"ok"), data)
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        response = await client.response(client.request(b"GET", b"/"))
        self.assertEqual(response.interim, [[(b":status", b"103"), (b"link", b"</style.css>; rel=preload")]])
        self.assertEqual((response.status, response.data), (200, b"ok"))


class _Answering(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            self.transport.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            )
