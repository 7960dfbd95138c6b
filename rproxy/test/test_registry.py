"""The in-memory registry: membership, what lookup offers, ejection with its cap, and draining on removal."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from rproxy.health.state import PassivePolicy
from rproxy.interfaces import IRegistry
from rproxy.proxy.registry import MemoryRegistry
from rproxy.test.support import ReceivedRequest, ScriptedUpstream, rawRequest, splitResponses, startProxy, waitFor
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import Upstream


def upstreams(count: int, **policy: float) -> tuple[Clock, list[Upstream]]:
    clock = Clock()
    passive = PassivePolicy(**policy)  # type: ignore[arg-type]
    return clock, [
        Upstream.fromURL(f"http://127.0.0.1:{9000 + i}", clock, PoolSettings(), passive) for i in range(count)
    ]


class MembershipTests(unittest.TestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRegistry, MemoryRegistry()))

    def test_addRemoveWatch(self) -> None:
        _, (a, b) = upstreams(2)
        registry = MemoryRegistry()
        changes: list[str] = []
        stop = registry.watch(changes.append)
        registry.add("s", a)
        registry.add("s", a)  # already there: no change
        registry.add("s", b)
        registry.remove("s", a)
        stop()
        registry.remove("s", b)
        self.assertEqual(changes, ["s", "s", "s"])
        self.assertEqual(registry.members("s"), ())
        self.assertEqual(registry.services(), ("s",))

    def test_lookupSkipsUnavailable(self) -> None:
        clock, (a, b, c) = upstreams(3, maxFails=1, baseEjection=5)
        registry = MemoryRegistry()
        for u in (a, b, c):
            registry.add("s", u)
        registry.failure("s", b, "refused")
        self.assertEqual(registry.lookup("s"), (a, c))
        self.assertEqual(registry.members("s"), (a, b, c))
        clock.advance(5)
        self.assertEqual(registry.lookup("s"), (a, b, c))

    def test_ejectionCap(self) -> None:
        """No more than the policy's share is ejected at once; one host always may be."""
        _, hosts = upstreams(4, maxFails=1, maxEjectedShare=0.5)
        registry = MemoryRegistry()
        for u in hosts:
            registry.add("s", u)
        for u in hosts:
            registry.failure("s", u, "refused")
        self.assertEqual([u.health.state for u in hosts], ["ejected", "ejected", "up", "up"])
        _, [single] = upstreams(1, maxFails=1, maxEjectedShare=0.1)
        registry.add("one", single)
        registry.failure("one", single, "refused")
        self.assertEqual(single.health.state, "ejected")
        self.assertEqual(registry.lookup("one"), ())


class RemovalTests(unittest.TestCase):
    async def test_removedUpstreamFinishesAndDrains(self) -> None:
        """Removing an upstream: its exchange in flight completes, its idle connections close, no new requests."""
        held: list[tuple[object, ReceivedRequest]] = []

        def respond(proto: object, request: ReceivedRequest) -> bytes:
            if request.requestLine.startswith(b"GET /hold"):
                held.append((proto, request))
                return b""
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

        leaving = ScriptedUpstream(self, respond)
        staying = ScriptedUpstream(self, lambda p, r: b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstayed")
        proxy = startProxy(self, [leaving.url, staying.url])
        registry = proxy.site.resource.proxy.director.service.registry  # type: ignore[attr-defined]
        gone, kept = proxy.upstreams
        # One idle connection to the leaving upstream, and one exchange in flight on it.
        await rawRequest(proxy.port, b"GET /warm HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await rawRequest(proxy.port, b"GET /other HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(gone.pool.idleCount, 1)
        inFlight = rawRequest(proxy.port, b"GET /hold HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertTrue(await waitFor(lambda: held))
        registry.remove("default", gone)
        self.assertTrue(await waitFor(lambda: gone.pool.openCount == 1))  # the idle one closed
        for _ in range(3):
            data = await rawRequest(proxy.port, b"GET /new HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            self.assertEqual(splitResponses(data)[0][1], b"stayed")
        proto, _ = held[0]
        proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")  # type: ignore[attr-defined]
        [(head, body)] = splitResponses(await inFlight)
        self.assertEqual((head.split(b" ")[1], body), (b"200", b"done"))
        self.assertTrue(await waitFor(lambda: gone.pool.openCount == 0))  # not kept after its exchange
        self.assertEqual(gone.inFlight, 0)
