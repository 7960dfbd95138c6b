"""
Tests for L{rproxy.tunnel.splice}: HTTP/1.1 Upgrade spliced between real sockets, with raw peers on both
ends (a protocol that is not WebSocket, so every byte is checked); WebSocket itself is in test_websocket.

The Go counterparts (``reverseproxy_test.go``) are named in the docstrings.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.proxy.resource import ReverseProxyResource
from rproxy.test.support import RunningProxy, headerValues, listen, responseStatus, sleep, startProxy, waitFor
from rproxy.test.test_reload import route, services, startReloadable
from rproxy.tunnel.splice import Tunnels

#: What a raw client sends to switch to the test protocol, and what the upstream answers.
UPGRADE = b"GET /chat HTTP/1.1\r\nHost: example\r\nConnection: Upgrade\r\nUpgrade: rawproto/1\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: rawproto/1\r\nX-Up: yes\r\n\r\n"


@implementer(IHalfCloseableProtocol)
class Peer(protocol.Protocol):
    """
    A raw end of a connection: what arrived (after the head, for an upstream), whether a FIN came, and
    when the connection ended.

    @ivar onHead: for an upstream, called with the peer and the request head once it is in.
    @ivar echo: write back every byte that arrives after the head.
    @ivar halfOpen: stay open after a FIN (and go on sending) instead of closing, as most peers do.
    """

    halfOpen = False

    def __init__(self, onHead: Callable[[Peer, bytes], None] | None = None, echo: bool = False) -> None:
        self.onHead = onHead
        self.echo = echo
        self.head: bytes | None = None
        self.buffer = b""
        self.received = b""
        self.finReceived = False
        self.finSent = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.onHead is not None and self.head is None:
            self.buffer += data
            if b"\r\n\r\n" not in self.buffer:
                return
            self.head, data = self.buffer.split(b"\r\n\r\n", 1)
            self.onHead(self, self.head)
        self.received += data
        if self.echo and data:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.finReceived = True
        if not self.halfOpen or self.finSent:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.finSent = True
        if self.finReceived:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason
        if not self.lost.called:
            self.lost.callback(None)

    def headers(self, name: bytes) -> list[bytes]:
        """The values of C{name} in the request head (an upstream's)."""
        assert self.head is not None
        return headerValues(self.head + b"\r\n\r\n", name)


class RawUpstream:
    """An upstream whose connections are L{Peer}s answering each request head with C{answer(peer, head)}."""

    def __init__(self, testCase: unittest.TestCase, answer: Callable[[Peer, bytes], None], echo: bool = True) -> None:
        self.peers: list[Peer] = []

        def build() -> Peer:
            peer = Peer(answer, echo)
            self.peers.append(peer)
            return peer

        factory = protocol.Factory.forProtocol(build)
        factory.noisy = False
        self.listening = listen(testCase, factory)

        def closeAll() -> None:
            for peer in self.peers:
                if peer.transport.connected:
                    peer.transport.abortConnection()

        testCase.addCleanup(closeAll)

    @property
    def url(self) -> str:
        return self.listening.url


def switching(extra: bytes = b"") -> Callable[[Peer, bytes], None]:
    """An upstream's answer: 101 to the test protocol, then C{extra} at once (in the same write)."""
    return lambda peer, head: peer.transport.write(SWITCHED + extra)


async def connect(testCase: unittest.TestCase, port: int, data: bytes) -> Peer:
    """A raw client connected to the proxy on C{port}, having sent C{data}."""
    peer = Peer()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)
    testCase.addCleanup(lambda: peer.transport.connected and peer.transport.abortConnection())
    peer.transport.write(data)
    return peer


def tunnelsOf(proxy: RunningProxy) -> Tunnels:
    resource = proxy.site.resource
    assert isinstance(resource, ReverseProxyResource)
    return resource.proxy.tunnels


class UpgradeTestCase(unittest.TestCase):
    timeout = 30

    async def tunnel(
        self, *arguments: str, early: bytes = b"", upstreamEarly: bytes = b"", echo: bool = True
    ) -> tuple[RunningProxy, RawUpstream, Peer, Peer]:
        """A tunnel through a new proxy: the proxy, the upstream, the client and the upstream's peer."""
        upstream = RawUpstream(self, switching(upstreamEarly), echo)
        proxy = startProxy(self, [upstream.url], *arguments)
        client = await connect(self, proxy.port, UPGRADE + early)
        self.assertTrue(await waitFor(lambda: SWITCHED.split(b"\r\n")[0] in client.received))
        [server] = upstream.peers
        return proxy, upstream, client, server


class SpliceTests(UpgradeTestCase):
    """Bytes both ways after a 101, in order, with the heads and pools as they must be."""

    async def test_switched(self) -> None:
        """
        Go's C{TestReverseProxyWebSocket}: the upgrade request reaches the upstream with C{Connection:
        Upgrade} and its C{Upgrade}; the 101 reaches the client with the upstream's fields and C{Via};
        then bytes flow both ways.  The upstream connection never goes back to the pool, and is closed
        with the tunnel.
        """
        proxy, upstream, client, server = await self.tunnel()
        self.assertEqual(server.headers(b"connection"), [b"Upgrade"])
        self.assertEqual(server.headers(b"upgrade"), [b"rawproto/1"])
        head, _, rest = client.received.partition(b"\r\n\r\n")
        self.assertEqual(responseStatus(head), 101)
        self.assertEqual(headerValues(head + b"\r\n\r\n", b"upgrade"), [b"rawproto/1"])
        self.assertEqual(headerValues(head + b"\r\n\r\n", b"connection"), [b"Upgrade"])
        self.assertEqual(headerValues(head + b"\r\n\r\n", b"x-up"), [b"yes"])
        self.assertEqual(headerValues(head + b"\r\n\r\n", b"via"), [b"1.1 rproxy"])
        client.received = rest
        client.transport.write(b"ping one")
        self.assertTrue(await waitFor(lambda: client.received == b"ping one"))
        server.transport.write(b"|pushed")
        self.assertTrue(await waitFor(lambda: client.received == b"ping one|pushed"))
        self.assertEqual(server.received, b"ping one")
        pool = proxy.upstreams[0].pool
        self.assertEqual((pool.openCount, pool.idleCount), (1, 0))
        tunnels = tunnelsOf(proxy)
        self.assertEqual(len(tunnels.open), 1)
        self.assertEqual((tunnels.counts.bytesFromClients, tunnels.counts.bytesFromUpstreams), (8, 15))
        client.transport.loseConnection()
        await server.lost
        self.assertTrue(await waitFor(lambda: pool.openCount == 0))
        self.assertEqual((pool.idleCount, len(tunnels.open), tunnels.counts.opened), (0, 0, 1))

    async def test_earlyData(self) -> None:
        """
        Bytes the client sent right after its request head (before any 101) and bytes the upstream sent
        right after its 101 head arrive first, in order, before what follows.
        """
        early = b"client-early-" * 3000  # beyond the 16 KiB after which the HTTP channel pauses the client
        _, _, client, server = await self.tunnel(early=early, upstreamEarly=b"upstream-early", echo=False)
        self.assertTrue(await waitFor(lambda: server.received == early))
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"\r\n\r\nupstream-early")))
        client.transport.write(b"+later")
        server.transport.write(b"+later")
        self.assertTrue(await waitFor(lambda: server.received == early + b"+later"))
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"upstream-early+later")))

    async def test_largeBothWays(self) -> None:
        """Eight megabytes each way at once through an echoing upstream arrive whole and in order."""
        _, _, client, server = await self.tunnel()
        client.received = b""
        payload = os.urandom(1 << 20) * 8
        client.transport.write(payload)
        self.assertTrue(await waitFor(lambda: len(client.received) >= len(payload), timeout=20))
        self.assertEqual(client.received, payload)
        self.assertEqual(server.received, payload)

    async def test_bodyThenSwitch(self) -> None:
        """
        An upgrade request with a body (as Go does, it is sent): the upstream gets the body, framed,
        then the tunnel's bytes.
        """
        upstream = RawUpstream(self, lambda peer, head: None, echo=False)
        proxy = startProxy(self, [upstream.url])
        request = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello")
        client = await connect(self, proxy.port, request)
        self.assertTrue(await waitFor(lambda: upstream.peers and upstream.peers[0].received == b"hello"))
        [server] = upstream.peers
        self.assertEqual(server.headers(b"content-length"), [b"5"])
        server.transport.write(SWITCHED)
        self.assertTrue(await waitFor(lambda: b" 101 " in client.received))
        client.transport.write(b"after")
        self.assertTrue(await waitFor(lambda: server.received == b"helloafter"))

    async def test_switchBeforeBody(self) -> None:
        """A 101 before the request body is all sent is refused: 502, and the upstream connection closed."""
        upstream = RawUpstream(self, switching(), echo=False)
        proxy = startProxy(self, [upstream.url])
        request = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 10\r\n\r\nhalf")
        client = await connect(self, proxy.port, request)
        self.assertTrue(await waitFor(lambda: b"\r\n\r\n" in client.received))
        self.assertEqual(responseStatus(client.received), 502)
        self.assertIn(b"switched protocols before the request body was sent", client.received)
        await upstream.peers[0].lost


class HalfCloseTests(UpgradeTestCase):
    """Go's C{TestReverseProxyWebSocketHalfTCP}: a FIN from either side reaches the other, which may still send."""

    async def test_clientFirst(self) -> None:
        _, _, client, server = await self.tunnel(echo=False)
        client.halfOpen = server.halfOpen = True
        client.transport.loseWriteConnection()
        self.assertTrue(await waitFor(lambda: server.finReceived))
        server.transport.write(b"still talking")
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"still talking")))
        self.assertFalse(client.finReceived)
        server.transport.loseWriteConnection()
        self.assertTrue(await waitFor(lambda: client.finReceived))
        await client.lost
        await server.lost

    async def test_upstreamFirst(self) -> None:
        _, _, client, server = await self.tunnel(echo=False)
        client.halfOpen = server.halfOpen = True
        server.transport.loseWriteConnection()
        self.assertTrue(await waitFor(lambda: client.finReceived))
        client.transport.write(b"still talking")
        self.assertTrue(await waitFor(lambda: server.received == b"still talking"))
        self.assertFalse(server.finReceived)
        client.transport.loseWriteConnection()
        self.assertTrue(await waitFor(lambda: server.finReceived))
        await client.lost
        await server.lost


class EndingTests(UpgradeTestCase):
    """How a tunnel ends: a side gone, silence, shutdown."""

    async def test_clientVanishes(self) -> None:
        """
        Go's C{TestReverseProxyWebSocketCancellation} and C{TestReverseProxyUpgradeNoCloseWrite}: a client
        whose connection is reset takes the upstream connection with it, within a second.
        """
        _, _, client, server = await self.tunnel()
        client.transport.abortConnection()
        started = reactor.seconds()
        await server.lost
        self.assertLess(reactor.seconds() - started, 1.0)

    async def test_upstreamCloses(self) -> None:
        """An upstream that closes its connection closes the client's, after what it sent last."""
        _, _, client, server = await self.tunnel()
        server.transport.write(b"last words")
        server.transport.loseConnection()
        await client.lost
        self.assertTrue(client.received.endswith(b"last words"), client.received)

    async def test_idleTimeout(self) -> None:
        """A tunnel silent both ways for C{--tunnel-idle-timeout} is closed; one carrying bytes is not."""
        proxy, _, quiet, quietServer = await self.tunnel("--tunnel-idle-timeout", "0.5")
        started = reactor.seconds()
        chatty = await connect(self, proxy.port, UPGRADE)
        for _ in range(8):  # 1.2 s of a byte every 0.15 s
            chatty.transport.write(b".")
            await sleep(0.15)
        await quiet.lost
        await quietServer.lost
        self.assertLess(reactor.seconds() - started, 1.5)
        self.assertTrue(chatty.transport.connected)
        self.assertTrue(await waitFor(lambda: chatty.received.endswith(b"." * 8)))
        self.assertEqual(tunnelsOf(proxy).counts.closedIdle, 1)
        await chatty.lost  # silent from now on

    async def test_drain(self) -> None:
        """
        Shutdown leaves a tunnel working during the grace period (it is a connection still busy), and
        closes it at its end, before the drain is over.
        """
        proxy, _, client, server = await self.tunnel()
        drained = proxy.site.drain(0.6, reactor)
        await sleep(0.3)
        client.received = b""
        client.transport.write(b"during grace")
        self.assertTrue(await waitFor(lambda: client.received == b"during grace"))
        await drained
        self.assertFalse(client.transport.connected)
        await server.lost
        self.assertEqual(len(tunnelsOf(proxy).open), 0)

    async def test_connectionLimit(self) -> None:
        """A tunnel counts against C{--max-connections} until it ends."""
        proxy, _, client, _ = await self.tunnel("--max-connections", "1")
        refused = await connect(self, proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await refused.lost
        self.assertEqual(responseStatus(refused.received), 503)
        client.transport.loseConnection()
        await client.lost
        self.assertTrue(await waitFor(lambda: not proxy.site.connections))
        accepted = await connect(self, proxy.port, UPGRADE)
        self.assertTrue(await waitFor(lambda: b" 101 " in accepted.received))


class ReloadTests(unittest.TestCase):
    timeout = 30

    async def test_reloadKeepsTunnel(self) -> None:
        """
        A reload that changes the routes (one added, the tunnel's own untouched) leaves an open tunnel
        working, and a new tunnel opens under the new configuration.
        """
        upstream = RawUpstream(self, switching())
        other = RawUpstream(self, switching())
        proxy = startReloadable(self, services(ws=upstream.url) + route("ws"))
        client = await connect(self, proxy.port, UPGRADE)
        self.assertTrue(await waitFor(lambda: b" 101 " in client.received))
        summary = proxy.reload(services(ws=upstream.url, other=other.url) + route("other", "/other") + route("ws"))
        assert summary is not None
        self.assertEqual(summary.routesAdded, ("any host/other -> service other",))
        client.received = b""
        client.transport.write(b"after reload")
        self.assertTrue(await waitFor(lambda: client.received == b"after reload"))
        self.assertTrue(proxy.live.proxy.tunnels.open)
        second = await connect(self, proxy.port, UPGRADE.replace(b"/chat", b"/other"))
        self.assertTrue(await waitFor(lambda: b" 101 " in second.received))
        self.assertEqual(len(other.peers), 1)


class BackpressureTests(UpgradeTestCase):
    """Each transport is the producer of the other: a side that does not read pauses the one sending."""

    async def assertPaced(self, sender: Peer, receiver: Peer) -> None:
        """
        C{sender} writes 64 KiB whenever its transport is not paused, for up to 2 s; C{receiver} reads
        nothing: the sender is paused with a bounded amount written.  Then all of it arrives.
        """
        receiver.transport.pauseProducing()
        paused = []

        @implementer(IPushProducer)
        class Writer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                paused.clear()

            def stopProducing(self) -> None:
                pass

        sender.transport.registerProducer(Writer(), True)
        chunk = b"x" * 65536
        written = 0
        deadline = reactor.seconds() + 2
        while reactor.seconds() < deadline and written < (256 << 20):
            if not paused:
                sender.transport.write(chunk)
                written += len(chunk)
            await sleep(0.001)
        self.assertTrue(paused, f"never paused after {written} bytes")
        self.assertLess(written, 64 << 20)
        sender.transport.unregisterProducer()
        before = len(receiver.received)
        receiver.transport.resumeProducing()
        self.assertTrue(await waitFor(lambda: len(receiver.received) - before == written, timeout=20))

    async def test_slowClient(self) -> None:
        _, _, client, server = await self.tunnel(echo=False)
        await self.assertPaced(server, client)

    async def test_slowUpstream(self) -> None:
        _, _, client, server = await self.tunnel(echo=False)
        await self.assertPaced(client, server)


class RuleTests(unittest.TestCase):
    """What is an upgrade request, and which 101 is honoured."""

    timeout = 30

    async def exchange(self, request: bytes, answer: bytes) -> tuple[Peer, Peer]:
        """C{request} through a proxy to an upstream answering C{answer}: the client and the upstream peers."""
        upstream = RawUpstream(self, lambda peer, head: peer.transport.write(answer), echo=False)
        proxy = startProxy(self, [upstream.url])
        client = await connect(self, proxy.port, request)
        self.assertTrue(await waitFor(lambda: b"\r\n\r\n" in client.received))
        return client, upstream.peers[0]

    async def test_h2cDropped(self) -> None:
        """
        Go's C{TestReverseProxyUpgradeH2C}: ``h2c`` in Upgrade, in any case, with blanks, in a list or on
        several lines, is not forwarded, and the request goes on as a normal one (200); the other
        protocols of the list are kept.
        """
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        for upgrade, forwarded in [
            (b"Upgrade: h2c\r\n", []),
            (b"Upgrade: H2C \r\n", []),
            (b"Upgrade: foo, h2c\r\n", [b"foo"]),
            (b"Upgrade: h2c\r\nUpgrade: websocket\r\n", [b"websocket"]),
            (b"Upgrade: ,  h2C ,\r\n", []),
        ]:
            request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n" + upgrade
            request += b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            client, server = await self.exchange(request, ok)
            self.assertEqual(responseStatus(client.received), 200, upgrade)
            self.assertEqual(server.headers(b"upgrade"), [b", ".join(forwarded)] if forwarded else [], upgrade)
            self.assertEqual(server.headers(b"http2-settings"), [])
            self.assertEqual(server.headers(b"connection"), [b"Upgrade"] if forwarded else [], upgrade)

    async def test_unrequestedProtocol(self) -> None:
        """An upstream switching to a protocol the client did not ask for, or to none named: 502, its fault."""
        for switched, reason in [
            (b"Upgrade: other\r\n", b"upstream switched to protocol 'other', which the client did not ask for"),
            (b"", b"upstream switched protocols without naming one in Upgrade"),
        ]:
            answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n" + switched + b"\r\nbytes"
            client, server = await self.exchange(UPGRADE, answer)
            self.assertEqual(responseStatus(client.received), 502)
            self.assertIn(reason, client.received)
            self.assertEqual(headerValues(client.received, b"x-rproxy-fault"), [b"upstream"])
            self.assertNotIn(b"bytes", client.received)
            await server.lost

    async def test_http10NotHonoured(self) -> None:
        """
        RFC 9110 section 7.8 (Upgrade is HTTP/1.1's) and Go (Upgrade on a non-HTTP/1.1 request is not
        honoured): an HTTP/1.0 request's Upgrade is dropped as hop-by-hop, the request proxied as usual;
        a 101 to it would be an upstream switching unasked, a 502.
        """
        request = UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0")
        client, server = await self.exchange(request, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(responseStatus(client.received), 200)
        self.assertEqual((server.headers(b"upgrade"), server.headers(b"connection")), ([], []))
        client, _ = await self.exchange(request, SWITCHED)
        self.assertEqual(responseStatus(client.received), 502)
        self.assertIn(b"upstream switched protocols though no upgrade was requested", client.received)

    async def test_notListedInConnection(self) -> None:
        """
        Go's C{TestReverseProxy} (``Upgrade`` of a non-upgrade request never reaches the backend): an
        ``Upgrade`` that ``Connection`` does not list is dropped.
        """
        request = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: rawproto/1\r\n\r\n"
        client, server = await self.exchange(request, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(responseStatus(client.received), 200)
        self.assertEqual(server.headers(b"upgrade"), [])

    async def test_normalAnswer(self) -> None:
        """
        An upgrade request answered with a normal response (426 here) has it relayed as one, its
        ``Upgrade`` field stripped as hop-by-hop (Go's C{TestReverseProxy}, response side), and the
        client's connection goes on with HTTP.
        """
        answer = (
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: other\r\nConnection: Upgrade\r\nContent-Length: 4\r\n\r\nnope"
        )
        client, _ = await self.exchange(UPGRADE, answer)
        self.assertTrue(await waitFor(lambda: client.received.endswith(b"nope")))
        self.assertEqual(responseStatus(client.received), 426)
        self.assertEqual(headerValues(client.received, b"upgrade"), [])
        self.assertTrue(client.transport.connected)

    async def test_invalidProtocolName(self) -> None:
        """
        Go's check that an upgrade token is printable, made stricter: a protocol name that is not a token
        (``token[/token]``) is dropped like ``h2c``; with none left, the request is a normal one.
        """
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        client, server = await self.exchange(UPGRADE.replace(b"rawproto/1", b"raw proto, a/b/c, good/2"), ok)
        self.assertEqual(server.headers(b"upgrade"), [b"good/2"])
        client, server = await self.exchange(UPGRADE.replace(b"rawproto/1", b"raw proto"), ok)
        self.assertEqual(responseStatus(client.received), 200)
        self.assertEqual((server.headers(b"upgrade"), server.headers(b"connection")), ([], []))
