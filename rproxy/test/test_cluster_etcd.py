"""
L{rproxy.cluster.etcd.EtcdClient} against a real etcd, and against servers that fail the ways etcd's members
can: one that refuses connections, one that accepts and never answers, one whose watch stream is garbage.
"""

from __future__ import annotations

import os

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from rproxy.cluster.etcd import EtcdClient, EtcdError, Event, prefixEnd
from rproxy.cluster.follow import PrefixFollower
from rproxy.cluster.health import StoreHealth
from rproxy.cluster.tls import StoreTLS
from rproxy.test.stores import EtcdServer, TLSEtcdServer, startEtcd
from rproxy.test.support import freePort, listen, sleep


def client(
    testCase: unittest.TestCase,
    *urls: str,
    timeout: float = 2.0,
    credentials: tuple[str, str] | None = None,
    tls: StoreTLS | None = None,
) -> EtcdClient:
    health = StoreHealth("etcd", ", ".join(urls), "serving what it knew", reactor)
    made = EtcdClient(urls, reactor, timeout, health, credentials, tls)
    testCase.addCleanup(made.close)
    return made


class _Silent(protocol.Protocol):
    """Accepts a connection and never answers."""


class _Garbage(protocol.Protocol):
    """Answers any request with a 200 whose streamed body is not etcd's JSON."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n\n\r\n")


class EtcdClientTests(unittest.TestCase):
    async def setUpEtcd(self) -> EtcdServer:
        etcd: EtcdServer = await startEtcd(self)
        return etcd

    async def test_calls(self) -> None:
        """Put under a lease, read by prefix and by key, delete; a revoked lease takes its keys along."""
        etcd = await self.setUpEtcd()
        c = client(self, etcd.url)
        lease = await c.grant(30)
        await c.put(b"/p/a", b"1", lease)
        await c.put(b"/p/b", b"\x00\xff")
        await c.put(b"/q", b"outside")
        revision, kvs = await c.range(b"/p/")
        self.assertEqual([(kv.key, kv.value) for kv in kvs], [(b"/p/a", b"1"), (b"/p/b", b"\x00\xff")])
        self.assertEqual((kvs[0].lease, kvs[1].lease), (lease, 0))
        self.assertGreaterEqual(revision, kvs[1].modRevision)
        await c.revoke(lease)
        await c.revoke(lease)  # once more: no error, it is gone
        self.assertIsNone(await c.get(b"/p/a"))
        await c.delete(b"/p/b")
        self.assertEqual((await c.range(b"/p/"))[1], [])
        self.assertTrue(c.health.up)

    async def test_tls(self) -> None:
        """
        An C{https://} member is verified against the CA given, and is presented the client certificate it
        asks for; without that certificate, or without that CA, it is out of reach, and the reason says so.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        etcd = TLSEtcdServer(self, directory)
        await etcd.start()
        files = etcd.files
        trusted = client(self, etcd.url, tls=StoreTLS.read(files.ca, files.clientCertificate, files.clientKey))
        await trusted.put(b"/tls", b"yes")
        self.assertEqual((await trusted.get(b"/tls")).value, b"yes")  # type: ignore[union-attr]
        self.assertTrue(trusted.health.up)
        for tls, why in [
            (StoreTLS.read(files.ca, None, None), "tls alert bad certificate"),  # etcd's: no certificate
            (StoreTLS.read(None, files.clientCertificate, files.clientKey), "certificate verify failed"),  # ours
        ]:
            with self.subTest(why):
                refused = client(self, etcd.url, tls=tls, timeout=1.0)
                with self.assertRaises(EtcdError):
                    await refused.get(b"/tls")
                self.assertFalse(refused.health.up)
                self.assertIn(f"{etcd.url}: the connection failed: ", refused.health.error)
                self.assertIn(why, refused.health.error)

    def test_prefixEnd(self) -> None:
        self.assertEqual(prefixEnd(b"/rproxy/"), b"/rproxy0")
        self.assertEqual(prefixEnd(b"a\xff"), b"b")
        self.assertEqual(prefixEnd(b"\xff\xff"), b"\x00")

    async def test_nextMember(self) -> None:
        """A member that refuses connections is passed over for the next; the call succeeds."""
        etcd = await self.setUpEtcd()
        c = client(self, f"http://127.0.0.1:{freePort()}", etcd.url)
        await c.put(b"/k", b"v")
        self.assertEqual((await c.get(b"/k")).value, b"v")  # type: ignore[union-attr]
        self.assertTrue(c.health.up)

    async def test_noAnswer(self) -> None:
        """A member that never answers fails the call after the timeout, and etcd counts as out of reach."""
        silent = listen(self, protocol.Factory.forProtocol(_Silent))
        c = client(self, silent.url, timeout=0.3)
        started = reactor.seconds()
        with self.assertRaises(EtcdError) as raised:
            await c.range(b"/")
        self.assertLess(reactor.seconds() - started, 2)
        self.assertIn("no answer in time", str(raised.exception))
        self.assertFalse(c.health.up)
        self.assertIn("no answer in time", c.health.error)

    async def test_refused(self) -> None:
        """etcd's error answers are errors with its message (a key that is not base64 here)."""
        etcd = await self.setUpEtcd()
        c = client(self, etcd.url)
        with self.assertRaises(EtcdError) as raised:
            await c._call("/v3/kv/put", {"key": "not base64!", "value": ""})
        self.assertIn("etcd refused kv/put", str(raised.exception))

    async def test_watch(self) -> None:
        """Changes stream in order, deletions flagged; stop ends the stream."""
        etcd = await self.setUpEtcd()
        c = client(self, etcd.url)
        revision, _ = await c.range(b"/w/")
        seen: list[Event] = []
        arrived: list[Deferred[None]] = [Deferred()]

        def onEvents(events: list[Event]) -> None:
            seen.extend(events)
            if len(seen) >= 3 and not arrived[0].called:
                arrived[0].callback(None)

        watch = c.watch(b"/w/", revision + 1, onEvents)
        await c.put(b"/w/1", b"one")
        await c.put(b"/outside", b"no")
        await c.put(b"/w/2", b"two")
        await c.delete(b"/w/1")
        await arrived[0].addTimeout(5, reactor)
        self.assertEqual(
            [(e.kv.key, e.kv.value, e.deleted) for e in seen],
            [(b"/w/1", b"one", False), (b"/w/2", b"two", False), (b"/w/1", b"", True)],
        )
        watch.stop()
        self.assertEqual(await watch.ended, "stopped")

    async def test_watchEndsWithEtcd(self) -> None:
        """etcd stopping ends the watch (the owner reads again); so does a stream that is not etcd's."""
        etcd = await self.setUpEtcd()
        c = client(self, etcd.url)
        watch = c.watch(b"/w/", 1, lambda events: None)
        await c.put(b"/w/x", b"1")
        await etcd.stop()
        why = await watch.ended.addTimeout(10, reactor)
        self.assertIn("watch stream", why)

        garbage = listen(self, protocol.Factory.forProtocol(_Garbage))
        other = client(self, garbage.url).watch(b"/", 1, lambda events: None)
        why = await other.ended.addTimeout(5, reactor)
        self.assertIn("a watch message etcd's API does not send", why)

    async def test_authentication(self) -> None:
        """
        With etcd's authentication on: a client without credentials, or with a wrong password, is refused
        with etcd's reason; one with them gets a token, asks again when it expires, and may use its prefix only.
        """
        etcd = await self.setUpEtcd()
        await etcd.enableAuth("gateway", "gw-pass", "/gw/", "root-pass")
        with self.assertRaises(EtcdError) as raised:
            await client(self, etcd.url).range(b"/gw/")
        self.assertIn("etcd refused kv/range: etcdserver: user name is empty", str(raised.exception))
        with self.assertRaises(EtcdError) as raised:
            await client(self, etcd.url, credentials=("gateway", "wrong")).range(b"/gw/")
        self.assertIn("authentication failed", str(raised.exception))
        self.assertNotIn("wrong", str(raised.exception))

        c = client(self, etcd.url, credentials=("gateway", "gw-pass"))
        lease = await c.grant(30)
        await c.put(b"/gw/a", b"1", lease)
        await sleep(2.5)  # the token's TTL is 1 s here (etcd's --auth-token-ttl): the next call asks again
        revision, [kv] = await c.range(b"/gw/")
        self.assertEqual((kv.key, kv.value), (b"/gw/a", b"1"))
        with self.assertRaises(EtcdError) as raised:
            await c.put(b"/other", b"x")
        self.assertIn("permission denied", str(raised.exception))

        seen: list[Event] = []
        watch = c.watch(b"/gw/", revision + 1, seen.extend)
        await c.put(b"/gw/b", b"2")
        for _ in range(100):
            if seen:
                break
            await sleep(0.05)
        self.assertEqual([(e.kv.key, e.kv.value) for e in seen], [(b"/gw/b", b"2")])
        watch.stop()
        await c.revoke(lease)
        self.assertIsNone(await c.get(b"/gw/a"))


class FollowerTests(unittest.TestCase):
    """L{PrefixFollower}: following a prefix while etcd is out of reach."""

    async def test_stopsAtOnce(self) -> None:
        """
        Stopped while etcd is out of reach, it ends at once: between two tries (backing off), or within the
        timeout of the try under way (then it does not back off once more).
        """
        c = client(self, f"http://127.0.0.1:{freePort()}", timeout=0.2)
        snapshots: list[object] = []
        follower = PrefixFollower(c, b"/p/", reactor, snapshots.append, lambda events: None, "keys")
        follower.start()
        await sleep(1.6)  # tries of up to 0.2 s, backing off 0.1, 0.2, 0.4, 0.8 s: in a try or between two
        self.assertEqual((follower.read, follower.pending(), snapshots), (False, ["keys in etcd are not read yet"], []))
        self.assertFalse(c.health.up)
        started = reactor.seconds()
        await follower.stop()
        self.assertLess(reactor.seconds() - started, 0.5)

    async def test_stopsDuringATry(self) -> None:
        """
        Stopped during a try that etcd does not answer, after a few have failed (the next back-off would be
        0.8 s), it ends once that try times out, without backing off once more.
        """
        tries: list[float] = []

        class Counted(_Silent):
            def connectionMade(self) -> None:
                tries.append(reactor.seconds())

        silent = listen(self, protocol.Factory.forProtocol(Counted))
        c = client(self, f"http://127.0.0.1:{silent.port}", timeout=0.2)
        follower = PrefixFollower(c, b"/p/", reactor, lambda kvs: None, lambda events: None, "keys")
        follower.start()
        for _ in range(500):
            if len(tries) == 4:
                break
            await sleep(0.01)
        self.assertEqual(len(tries), 4, "the fourth try never came")
        started = reactor.seconds()
        await follower.stop()
        self.assertLess(reactor.seconds() - started, 0.75, "it backed off once more (0.8 s)")

    async def test_survivesItsOwner(self) -> None:
        """An owner that fails on what was read is told again (the failure logged), not left behind."""
        etcd = await startEtcd(self)
        c = client(self, etcd.url)
        await c.put(b"/p/k", b"v")
        calls: list[int] = []

        def snapshot(kvs: list[object]) -> None:
            calls.append(len(kvs))
            if len(calls) == 1:
                raise RuntimeError("a bug of the owner")

        follower = PrefixFollower(c, b"/p/", reactor, snapshot, lambda events: None, "keys")
        follower.start()
        self.addCleanup(follower.stop)
        for _ in range(50):
            if follower.read:
                break
            await sleep(0.05)
        self.assertEqual((follower.read, calls), (True, [1, 1]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
