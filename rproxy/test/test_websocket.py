"""
WebSocket through rproxy with the C{websockets} library on both ends: spliced routes (bytes copied) and
message-aware routes (L{rproxy.tunnel.messages}: frames parsed, limits enforced, messages counted).

The library is asyncio's: its client and upstream server run on an event loop in a thread of their own
(L{AsyncioThread}), while the proxy runs on the test's reactor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet import defer, reactor
from twisted.trial import unittest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from rproxy.test.support import RunningProxy, startProxy, waitFor
from rproxy.test.test_config import writeConfig
from rproxy.test.test_upgrade import tunnelsOf

_T = TypeVar("_T")


class AsyncioThread:
    """An asyncio event loop in a thread, for the test's life; L{run} awaits a coroutine on it."""

    def __init__(self, testCase: unittest.TestCase) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        testCase.addCleanup(lambda: defer.ensureDeferred(self.stop()))

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> defer.Deferred[_T]:
        """Run C{coroutine} on the loop, cancelled after C{timeout} seconds (C{None}: never)."""
        bounded = coroutine if timeout is None else asyncio.wait_for(coroutine, timeout)
        future = asyncio.run_coroutine_threadsafe(bounded, self.loop)
        result: defer.Deferred[_T] = defer.Deferred()

        def done(future: concurrent.futures.Future[_T]) -> None:
            if future.cancelled():
                reactor.callFromThread(result.errback, defer.CancelledError())
                return
            error = future.exception()
            if error is None:
                reactor.callFromThread(result.callback, future.result())
            else:
                reactor.callFromThread(result.errback, error)

        future.add_done_callback(done)
        return result

    async def stop(self) -> None:
        """Cancel what runs on the loop (not blocking the reactor, which its sockets may need), then end it."""

        async def cancelAll() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        await self.run(cancelAll(), timeout=None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class EchoServer:
    """
    A C{websockets} upstream that echoes every message, closes with the code a C{close CODE} text asks
    for, and records how each connection ended (C{closes}: code and reason it received).
    """

    def __init__(self, asyncioThread: AsyncioThread, testCase: unittest.TestCase) -> None:
        self.closes: list[tuple[int | None, str | None]] = []
        self.asyncioThread = asyncioThread

        async def start() -> Server:
            return await serve(self.handle, "127.0.0.1", 0, max_size=None, ping_interval=None)

        self.started = asyncioThread.run(start())

        async def stop() -> None:
            server = await self.server()
            server.close()
            await asyncioThread.run(server.wait_closed(), timeout=10)

        testCase.addCleanup(lambda: defer.ensureDeferred(stop()))

    async def server(self) -> Server:
        """The server, once it listens."""
        server: Server = await self.started
        self.started = defer.succeed(server)
        return server

    async def handle(self, connection: ServerConnection) -> None:
        try:
            async for message in connection:
                if isinstance(message, str) and message.startswith("close "):
                    await connection.close(int(message.split()[1]), "asked to")
                    break
                await connection.send(message)
        except ConnectionClosed:
            pass
        finally:
            await connection.wait_closed()
            self.closes.append((connection.close_code, connection.close_reason))

    async def url(self) -> str:
        server = await self.server()
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


class WebSocketTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.asyncioThread = AsyncioThread(self)
        self.server = EchoServer(self.asyncioThread, self)

    async def proxy(self, *arguments: str) -> RunningProxy:
        return startProxy(self, [await self.server.url()], *arguments)

    def inLoop(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30.0) -> defer.Deferred[_T]:
        return self.asyncioThread.run(coroutine, timeout)


def wsURL(proxy: RunningProxy, path: str = "/socket") -> str:
    return f"ws://127.0.0.1:{proxy.port}{path}"


class SplicedTests(WebSocketTestCase):
    """A route without message limits: the WebSocket is spliced, bytes for bytes."""

    async def test_echo(self) -> None:
        """Text and binary messages, with compression negotiated end to end, echo back unchanged."""
        proxy = await self.proxy()

        async def talk() -> tuple[object, ...]:
            async with connect(wsURL(proxy), max_size=None) as ws:
                await ws.send("héllo")
                text = await ws.recv()
                await ws.send(b"\x00\x01\xff")
                binary = await ws.recv()
                return text, binary, ws.response.headers.get("via"), ws.response.headers.get("sec-websocket-extensions")

        text, binary, via, extensions = await self.inLoop(talk())
        self.assertEqual((text, binary, via), ("héllo", b"\x00\x01\xff", "1.1 rproxy"))
        self.assertIn("permessage-deflate", str(extensions))

    async def test_sixteenMegabytes(self) -> None:
        """A 16 MB binary message goes through and back whole."""
        proxy = await self.proxy()
        payload = bytes(range(256)) * (1 << 16)

        async def talk() -> bytes:
            async with connect(wsURL(proxy), max_size=None, compression=None) as ws:
                await ws.send(payload)
                answer = await ws.recv()
                assert isinstance(answer, bytes)
                return answer

        self.assertEqual(await self.inLoop(talk()), payload)

    async def test_pingPong(self) -> None:
        """A client's ping is answered by the upstream's pong, through the tunnel."""
        proxy = await self.proxy()

        async def talk() -> float:
            async with connect(wsURL(proxy)) as ws:
                return await (await ws.ping(b"are you there"))

        self.assertGreaterEqual(await self.inLoop(talk()), 0.0)

    async def test_closeCodes(self) -> None:
        """The client's close code and reason reach the upstream; the upstream's reach the client."""
        proxy = await self.proxy()

        async def clientCloses() -> None:
            async with connect(wsURL(proxy)) as ws:
                await ws.close(4001, "client leaves")

        async def upstreamCloses() -> tuple[int | None, str | None]:
            async with connect(wsURL(proxy)) as ws:
                await ws.send("close 4002")
                try:
                    await ws.recv()
                except ConnectionClosed:
                    pass
                return ws.close_code, ws.close_reason

        await self.inLoop(clientCloses())
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertEqual(self.server.closes[0], (4001, "client leaves"))
        self.assertEqual(await self.inLoop(upstreamCloses()), (4002, "asked to"))

    async def test_clientVanishes(self) -> None:
        """A client whose connection drops without a close frame closes the upstream's within 1 s."""
        proxy = await self.proxy()

        async def vanish() -> None:
            ws = await connect(wsURL(proxy))
            await ws.send("hi")
            await ws.recv()
            ws.transport.abort()

        await self.inLoop(vanish())
        started = reactor.seconds()
        self.assertTrue(await waitFor(lambda: self.server.closes, timeout=1.0))
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(self.server.closes[0][0], 1006)  # no close frame: abnormal closure

    async def test_manySockets(self) -> None:
        """
        500 WebSockets open at once each echo a message; the proxy's memory grows by a bounded amount
        (a loose sanity bound: the figure itself is measured in benchmarks/).
        """
        proxy = await self.proxy()
        count = 500
        before = _rss()

        async def many() -> list[object]:
            sockets: list[ClientConnection] = []
            try:
                for _ in range(count):
                    sockets.append(await connect(wsURL(proxy), compression=None, ping_interval=None))
                for i, ws in enumerate(sockets):
                    await ws.send(f"message {i}")
                return [await ws.recv() for ws in sockets]
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

        answers = await self.inLoop(many(), timeout=50)
        self.assertEqual(answers, [f"message {i}" for i in range(count)])
        self.assertLess(_rss() - before, 200 << 20)
        self.assertEqual(tunnelsOf(proxy).counts.opened, count)
        self.assertTrue(await waitFor(lambda: not tunnelsOf(proxy).open, timeout=10))


def _rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class MessageAwareTests(WebSocketTestCase):
    """A route with C{websocket} limits: frames parsed both ways, limits enforced with their close codes."""

    async def limitedProxy(self, limits: str) -> RunningProxy:
        url = await self.server.url()
        path = writeConfig(
            self,
            f'[services.chat]\nupstreams = ["{url}"]\n[[routes]]\nservice = "chat"\nwebsocket = {{ {limits} }}\n',
        )
        return startProxy(self, [], "--config", path)

    async def test_echoAndCounts(self) -> None:
        """
        Text (in fragments) and binary messages, pings and close codes pass through the parser; no
        compression is negotiated; messages and bytes are counted.
        """
        proxy = await self.limitedProxy('max-message-size = "1MiB", max-messages-per-second = 100')

        async def talk() -> tuple[object, ...]:
            async with connect(wsURL(proxy), max_size=None) as ws:
                await ws.send(["frag", "mented ", "text"])
                text = await ws.recv()
                await ws.send(b"\xff" * 70000)
                binary = await ws.recv()
                await (await ws.ping(b"p"))
                extensions = ws.response.headers.get("sec-websocket-extensions")
                await ws.close(4003, "done")
                return text, binary, extensions

        text, binary, extensions = await self.inLoop(talk())
        self.assertEqual((text, binary, extensions), ("fragmented text", b"\xff" * 70000, None))
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertEqual(self.server.closes[0], (4003, "done"))
        counts = tunnelsOf(proxy).counts
        self.assertEqual((counts.messagesFromClients, counts.messagesFromUpstreams), (2, 2))
        self.assertGreater(counts.bytesFromClients, 70000)

    async def test_messageTooBig(self) -> None:
        """A message over C{max-message-size}, either way, closes both sides with 1009."""
        proxy = await self.limitedProxy('max-message-size = "64KiB"')

        async def talk() -> tuple[object, ...]:
            async with connect(wsURL(proxy), max_size=None) as ws:
                await ws.send(b"x" * 65536)  # at the limit: fine
                fits = len(await ws.recv())
                await ws.send(b"x" * 65537)
                try:
                    await ws.recv()
                except ConnectionClosed as closed:
                    return fits, closed.rcvd.code if closed.rcvd else None
                return fits, "not closed"

        self.assertEqual(await self.inLoop(talk()), (65536, 1009))
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertEqual(self.server.closes[0][0], 1009)
        self.assertEqual(tunnelsOf(proxy).counts.closedByLimits, 1)

    async def test_rateLimit(self) -> None:
        """A client sending more than C{max-messages-per-second} is closed with 1008, and so is its upstream."""
        proxy = await self.limitedProxy("max-messages-per-second = 5")

        async def talk() -> tuple[object, ...]:
            async with connect(wsURL(proxy)) as ws:
                for i in range(5):
                    await ws.send(f"m{i}")
                    await ws.recv()
                await ws.send("one too many")
                try:
                    await ws.recv()
                except ConnectionClosed as closed:
                    return closed.rcvd.code if closed.rcvd else None, closed.rcvd.reason if closed.rcvd else None
                return ("not closed",)

        code, reason = await self.inLoop(talk())
        self.assertEqual((code, reason), (1008, "more than 5 messages per second"))
        self.assertTrue(await waitFor(lambda: self.server.closes))
        self.assertEqual(self.server.closes[0][0], 1008)
