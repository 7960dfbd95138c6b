"""The balancers end to end: a proxy in front of real upstream processes, chosen with --balancer."""

from __future__ import annotations

from collections import Counter

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from rproxy.test.support import UpstreamProcess, startProxy, waitFor


class BalancingTests(unittest.TestCase):
    timeout = 60

    async def upstreams(self, count: int) -> list[UpstreamProcess]:
        hosts = [UpstreamProcess(self, f"host{i}") for i in range(count)]
        await defer.gatherResults([h.start() for h in hosts])
        return hosts

    def pool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        return pool

    async def get(self, url: str, pool: HTTPConnectionPool, **kwargs: object) -> tuple[str, object]:
        response = await treq.get(url, pool=pool, **kwargs)
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        return body.split(b" ")[0].decode(), response

    async def assertIdlePreferred(self, balancer: str) -> None:
        """While one host holds a slow request, every quick request goes to the other one."""
        hosts = await self.upstreams(2)
        proxy = startProxy(self, [h.url for h in hosts], "--balancer", balancer)
        pool = self.pool()
        slow = defer.ensureDeferred(self.get(f"{proxy.url}/slow?delay=5", pool))
        self.assertTrue(await waitFor(lambda: sum(u.inFlight for u in proxy.upstreams) == 1))
        [busy] = [h.name for h, u in zip(hosts, proxy.upstreams, strict=True) if u.inFlight]
        quick = Counter([(await self.get(f"{proxy.url}/quick", pool))[0] for _ in range(10)])
        self.assertEqual(sum(u.inFlight for u in proxy.upstreams), 1, "the slow request ended before the quick ones")
        self.assertEqual(set(quick), {h.name for h in hosts} - {busy}, quick)
        self.assertEqual((await slow)[0], busy)

    async def test_leastConnPrefersIdleHost(self) -> None:
        await self.assertIdlePreferred("least_conn")

    async def test_p2cPrefersIdleHost(self) -> None:
        await self.assertIdlePreferred("p2c")

    async def test_roundRobinSpreadsEvenly(self) -> None:
        hosts = await self.upstreams(3)
        proxy = startProxy(self, [h.url for h in hosts])
        pool = self.pool()
        counts = Counter([(await self.get(f"{proxy.url}/", pool))[0] for _ in range(300)])
        self.assertEqual(sorted(counts.values()), [100, 100, 100])

    async def test_weightsHonoured(self) -> None:
        hosts = await self.upstreams(2)
        proxy = startProxy(self, [hosts[0].url + "#weight=3", hosts[1].url], "--balancer", "weighted_round_robin")
        pool = self.pool()
        counts = Counter([(await self.get(f"{proxy.url}/", pool))[0] for _ in range(200)])
        self.assertEqual(counts, {"host0": 150, "host1": 50})

    async def test_hashKeepsKeyOnHost(self) -> None:
        """Each user (by header) always reaches the same host, and the users spread over the hosts."""
        hosts = await self.upstreams(3)
        proxy = startProxy(self, [h.url for h in hosts], "--balancer", "hash", "--balancer-option", "key=header:X-User")
        pool = self.pool()
        placement: dict[str, set[str]] = {}
        for _ in range(3):
            for user in range(30):
                name, _ = await self.get(f"{proxy.url}/", pool, headers={"X-User": f"user-{user}"})
                placement.setdefault(f"user-{user}", set()).add(name)
        self.assertTrue(all(len(names) == 1 for names in placement.values()), placement)
        self.assertEqual(len(set().union(*placement.values())), 3)

    async def test_stickyCookie(self) -> None:
        """The first response sets a signed cookie; requests carrying it stay on that host."""
        hosts = await self.upstreams(3)
        proxy = startProxy(
            self, [h.url for h in hosts], "--balancer", "sticky", "--balancer-option", "secret=0123456789abcdef0123"
        )
        pool = self.pool()
        first, response = await self.get(f"{proxy.url}/", pool)
        [cookie] = response.headers.getRawHeaders(b"set-cookie")  # type: ignore[attr-defined]
        self.assertIn(b"HttpOnly", cookie)
        value = cookie.split(b";")[0]
        names = {(await self.get(f"{proxy.url}/", pool, headers={b"Cookie": value}))[0] for _ in range(9)}
        self.assertEqual(names, {first})
        forged = value.split(b"=")[0] + b"=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        spread = {(await self.get(f"{proxy.url}/", pool, headers={b"Cookie": forged}))[0] for _ in range(6)}
        self.assertEqual(len(spread), 3)  # a forged cookie is ignored: round robin as usual
