"""
Three rproxy instances (real C{twist rproxy} processes) sharing their registrations through a real etcd: an
upstream registered through one instance is served by all, renewed through another, gone from all when its
lease expires or it is deregistered; while etcd is stopped, every instance keeps serving what it knew, says so,
and refuses registrations with 503; when etcd is back, they follow it again.  How fast a change reaches every
instance (docs/cluster.md promises a second) is measured by C{benchmarks/cluster.py}.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from rproxy.cluster.follow import LONGEST_RETRY
from rproxy.test.stores import TLSEtcdServer, startEtcd
from rproxy.test.support import PYTHON, ScriptedUpstream, freePort, sleep
from rproxy.test.test_admin import AdminClient, Answer, request, tokenFile, upstreamsOf
from rproxy.test.test_config import answerWith
from rproxy.test.test_drain import ProxyProcess, waitUntilListening

#: How long a test waits for an instance to follow a change made through another.  It takes about 10 ms (the
#: watch streams it); the bound is wide so that a loaded machine fails no test, as how fast it is is measured, not
#: asserted here.
PATIENCE = 10.0

#: --store-timeout of the instances: etcd syncs each write to the disk, which a loaded machine may take more than
#: the default half second to do (the instance would answer 503, and count an outage).
STORE_TIMEOUT = 5.0


async def waitFor(
    testCase: unittest.TestCase, what: str, predicate: Callable[[], Any], timeout: float, *logOf: Instance
) -> float:
    """
    Seconds until C{await predicate()} holds; fail the test, with the logs of C{logOf}, once it did not hold when
    asked after C{timeout} (a predicate that makes requests may itself take long: one asked before the timeout and
    answered after it is asked again).
    """
    started = reactor.seconds()
    while True:
        asked = reactor.seconds()
        if await predicate():
            return reactor.seconds() - started
        if asked - started > timeout:
            logs = "".join(f"\n--- {each.name}:\n{each.process.log}" for each in logOf)
            testCase.fail(f"not within {timeout:g}s: {what}{logs}")
        await sleep(0.02)


class Instance:
    """One C{twist rproxy} process of the gateway: its proxy port and its admin API."""

    def __init__(self, testCase: unittest.TestCase, name: str, arguments: Sequence[str]) -> None:
        self.name = name
        self.port = freePort()
        self.adminPort = freePort()
        argv = [
            PYTHON,
            "-m",
            "twisted",
            "--log-format=text",
            "rproxy",
            f"--listen=tcp:{self.port}:interface=127.0.0.1",
            f"--admin-listen=tcp:{self.adminPort}:interface=127.0.0.1",
            *arguments,
        ]
        self.process = ProxyProcess.spawn(testCase, argv)
        self.admin = AdminClient(testCase, f"http://127.0.0.1:{self.adminPort}")

    async def body(self) -> bytes:
        """The body of one request through this instance."""
        return (await request(self.port, b"/x"))[1]

    async def bodies(self, count: int) -> list[bytes]:
        return [await self.body() for _ in range(count)]

    async def state(self) -> dict[str, Any]:
        answer = await self.admin.request("GET", "/state")
        assert answer.status == 200, answer
        document: dict[str, Any] = answer.json()
        return document

    def register(self, url: str, ttl: float) -> Any:
        return self.admin.request("POST", "/services/default/upstreams", {"url": url, "ttl": ttl})


class SharedRegistryTests(unittest.TestCase):
    """Three instances, one etcd."""

    async def startGateway(
        self,
        count: int = 3,
        *extra: str,
        upstream: str | None = None,
        authenticated: bool = False,
        tls: bool = False,
    ) -> list[Instance]:
        """
        C{count} instances with C{extra} arguments, in front of C{upstream} (by default L{configured}); with
        etcd's authentication on, as a user that may use the keys under C{/rproxy/} only, if C{authenticated};
        over TLS to an etcd that asks for client certificates, if C{tls}.
        """
        if tls:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            self.etcd = TLSEtcdServer(self, directory)
            await self.etcd.start()
            files = self.etcd.files
            extra = (*extra, f"--etcd-ca={files.ca}", f"--etcd-client-cert={files.clientCertificate}:{files.clientKey}")
        else:
            self.etcd = await startEtcd(self)
        if authenticated:
            await self.etcd.enableAuth("gateway", "gw-pass", "/rproxy/", "root-pass")
            extra = (*extra, "--etcd-user=gateway", f"--etcd-password-file={tokenFile(self, 'gw-pass')}")
        self.configured = ScriptedUpstream(self, answerWith(b"configured"))
        self.registered = ScriptedUpstream(self, answerWith(b"registered"))
        arguments = [
            f"--upstream={upstream or self.configured.url}",
            f"--admin-token-file={tokenFile(self)}",
            f"--etcd={self.etcd.url}",
            "--access-log=off",
            f"--store-timeout={STORE_TIMEOUT:g}",
            *extra,
        ]
        instances = [Instance(self, name, arguments) for name in "ABC"[:count]]
        for instance in instances:
            await waitUntilListening(self, instance.process, instance.port)
            await waitUntilListening(self, instance.process, instance.adminPort)
        return instances

    async def serves(self, instance: Instance) -> bool:
        """Whether C{instance} sends requests to the registered upstream (round robin: within two)."""
        return b"registered" in await instance.bodies(2)

    async def servesNot(self, instance: Instance) -> bool:
        return b"registered" not in await instance.bodies(2)

    async def test_registeredThroughOneServedByAll(self) -> None:
        """
        Registered through A: B and C serve it, and show the registration; renewed through B
        (the same id everywhere); deregistered through C: gone from all three.
        """
        a, b, c = await self.startGateway()
        answer: Answer = await a.register(self.registered.url, 30)
        self.assertEqual(answer.status, 201, answer.body)
        id = answer.json()["id"]
        self.assertTrue(await self.serves(a))
        for other in (b, c):
            await waitFor(
                self, f"{other.name} serves the registration", functools.partial(self.serves, other), PATIENCE, other
            )
            [_, registered] = upstreamsOf(await other.state())
            self.assertEqual((registered["key"], registered["registration"]["id"]), (self.registered.url, id))

        renewed = await b.admin.request("PUT", f"/services/default/upstreams/{id}", {"ttl": 120})
        self.assertEqual((renewed.status, renewed.json()["ttl"]), (200, 120.0), renewed.body)

        async def renewedEverywhere() -> bool:
            states = [upstreamsOf(await each.state())[1]["registration"] for each in (a, b, c)]
            return all(state["ttl"] == 120.0 and state["expiresIn"] > 100 for state in states)

        await waitFor(self, "every instance sees the renewal", renewedEverywhere, PATIENCE, a, b, c)

        again = await c.register(self.registered.url, 60)
        self.assertEqual((again.status, again.json()["id"]), (200, id), "the same upstream is one registration")

        gone = await c.admin.request("DELETE", f"/services/default/upstreams/{id}")
        self.assertEqual(gone.status, 204, gone.body)
        for each in (a, b, c):
            await waitFor(
                self, f"{each.name} no longer serves it", functools.partial(self.servesNot, each), PATIENCE, each
            )
            self.assertEqual(len(upstreamsOf(await each.state())), 1)

    async def test_authenticated(self) -> None:
        """With etcd's authentication on, the instances log in (and again as their tokens expire)."""
        a, b = await self.startGateway(2, authenticated=True)
        self.assertEqual((await a.register(self.registered.url, 30)).status, 201)
        await waitFor(self, "B serves it", functools.partial(self.serves, b), PATIENCE, b)
        await sleep(2.5)  # the tokens expired (etcd's --auth-token-ttl is 1 s in the tests)
        other = ScriptedUpstream(self, answerWith(b"other"))
        self.assertEqual((await a.register(other.url, 30)).status, 201)

        async def bServesOther() -> bool:
            return b"other" in await b.bodies(3)

        await waitFor(self, "B serves the second", bServesOther, PATIENCE, b)
        self.assertNotIn("gw-pass", a.process.log + b.process.log)

    async def test_tls(self) -> None:
        """
        Over TLS, to an etcd that asks for a client certificate (C{--etcd-ca}, C{--etcd-client-cert}): registered
        through A, served by B.
        """
        a, b = await self.startGateway(2, tls=True)
        self.assertEqual((await a.register(self.registered.url, 30)).status, 201)
        await waitFor(self, "B serves it", functools.partial(self.serves, b), PATIENCE, b)
        self.assertEqual(upstreamsOf(await b.state())[1]["key"], self.registered.url)

    async def test_leaseExpiry(self) -> None:
        """A registration nobody renews leaves every instance when its etcd lease expires."""
        a, b, c = await self.startGateway()
        answer = await a.register(self.registered.url, 2)
        self.assertEqual(answer.status, 201, answer.body)
        for each in (a, b, c):
            await waitFor(self, f"{each.name} serves it", functools.partial(self.serves, each), PATIENCE, each)
        # etcd checks its leases twice a second; its minimum lease is about two seconds.
        seconds = await waitFor(
            self, "the lease expires everywhere", lambda: self.allServeNot((a, b, c)), 2 + PATIENCE, a, b, c
        )
        self.assertGreater(seconds, 0.5, "it left before its TTL")
        for each in (a, b, c):
            self.assertIn("left service default", each.process.log)

    async def allServeNot(self, instances: Sequence[Instance]) -> bool:
        for each in instances:
            if not await self.servesNot(each):
                return False
        return True

    async def test_etcdOutOfReach(self) -> None:
        """
        etcd stopped: every instance keeps serving the registrations it knew (no request lost), says etcd is
        out of reach (in its log, /state, metrics and status page), and a registration answers 503; etcd back: a
        registration made then reaches the others again.
        """
        a, b = await self.startGateway(2)
        self.assertEqual((await a.register(self.registered.url, 60)).status, 201)
        await waitFor(self, "B serves it", lambda: self.serves(b), PATIENCE, b)
        await self.etcd.stop()

        served = []
        for _ in range(20):
            served += await b.bodies(2)
            await sleep(0.05)
        self.assertEqual(sorted(set(served)), [b"configured", b"registered"], "B forgot or lost something")

        refused = await a.register(self.registered.url + "/other", 60)
        self.assertEqual(refused.status, 503, refused.body)
        self.assertIn("etcd did not take it", refused.json()["error"])
        self.assertEqual(refused.headers["retry-after"], ["1"])

        async def saysSo(instance: Instance) -> bool:
            [store] = (await instance.state())["stores"]
            return store["store"] == "etcd" and not store["up"]

        await waitFor(self, "B says etcd is out of reach", lambda: saysSo(b), PATIENCE, b)
        self.assertIn(f"etcd at {self.etcd.url} is out of reach", b.process.log)
        metrics = (await b.admin.request("GET", "/metrics")).body.decode()
        self.assertIn('rproxy_store_up{store="etcd"} 0.0', metrics)
        self.assertIn('rproxy_store_outages_total{store="etcd"} 1.0', metrics)
        page = (await b.admin.request("GET", "/status")).body.decode()
        self.assertIn(f"etcd at {self.etcd.url} out of reach since", page)
        self.assertIn("serving the registrations and configuration last known", page)

        await self.etcd.start()
        other = ScriptedUpstream(self, answerWith(b"other"))
        await waitFor(self, "A registers again", lambda: self.registers(a, other.url), PATIENCE, a)

        async def bServesOther() -> bool:
            return b"other" in await b.bodies(3)

        await waitFor(self, "B follows etcd again", bServesOther, PATIENCE + LONGEST_RETRY, b)
        [store] = (await b.state())["stores"]
        self.assertTrue(store["up"], store)
        self.assertIn("answers again", b.process.log)
        metrics = (await b.admin.request("GET", "/metrics")).body.decode()
        self.assertIn('rproxy_store_up{store="etcd"} 1.0', metrics)

    async def test_everyWorker(self) -> None:
        """
        Instances of two workers each: a registration made through A reaches every worker of B (each follows
        etcd itself).  Their configured upstream refuses connections, so a worker that did not know the
        registration would answer 502.
        """
        refusing = f"http://127.0.0.1:{freePort()}"
        a, b = await self.startGateway(2, "--workers=2", upstream=refusing)
        self.assertEqual((await a.register(self.registered.url, 60)).status, 201)

        async def everyWorkerServes() -> bool:
            statuses = [(await request(b.port, b"/x"))[0].split(b"\r\n")[0] for _ in range(30)]
            return set(statuses) == {b"HTTP/1.1 200 OK"}

        await waitFor(self, "every worker of B serves it", everyWorkerServes, PATIENCE, b)
        self.assertEqual(await b.bodies(4), [b"registered"] * 4)

    async def registers(self, instance: Instance, url: str) -> bool:
        return bool((await instance.register(url, 60)).status == 201)
