"""
Rate limits shared through Redis (C{store = "redis"}: L{rproxy.cluster.ratelimit}, L{rproxy.cluster.redis}):
three real C{twist rproxy} processes on 127.0.0.1 in front of one upstream, one real C{redis-server}
(L{rproxy.test.stores}), stopped and started again under them, and a "Redis" that accepts connections and never
answers.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import treq
from twisted.internet import defer, reactor, utils
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool

from rproxy.app.build import buildFilters
from rproxy.app.filters import FilterConfig, FilterSet
from rproxy.app.tap import Options
from rproxy.cluster.ratelimit import TOKEN_BUCKET, bucketPrefix
from rproxy.cluster.redis import RedisClient, StoreUnavailableError
from rproxy.cluster.tls import StoreTLS
from rproxy.filters.ratelimit import KeyRule, RateLimit, parseRate
from rproxy.test.certs import CertificateAuthority
from rproxy.test.stores import RedisServer, startRedis
from rproxy.test.support import ROOT, LogCapture, freePort, listen, sleep, waitFor
from rproxy.test.test_drain import ProxyProcess

#: The shared limit: RATE requests a second, BURST at once, one count for the route.
RATE, BURST = 20, 10

#: --store-timeout in these tests, and how much later than it a request may be decided.  A proxy paused longer
#: than the timeout with a call to Redis in flight (a loaded machine) would count Redis out of reach: 2 s.
TIMEOUT, SLACK = 2.0, 1.0

#: Where each filter is: /shared falls back to local limits, /closed to 503, /local never uses Redis.
ROUTES = {"/shared": '"local"', "/closed": '"deny"', "/local": None}

#: What the log says when Redis goes out of reach, and when it answers again (their events' formats).
OUT_OF_REACH = "{store} at {url} is out of reach"
ANSWERS_AGAIN = "{store} at {url} answers again"


class _Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello"


def writeConfig(testCase: unittest.TestCase, redisURL: str, upstream: str) -> str:
    """A config file of the three routes of L{ROUTES} to C{upstream}, their limits on C{redisURL}."""
    lines = [
        f'redis = "{redisURL}"',
        f"store-timeout = {TIMEOUT}",
        f'upstream = ["{upstream}"]',
        'access-log = "off"',
    ]
    for path, onStoreDown in ROUTES.items():
        name = path.strip("/")
        lines += ["", f"[filters.{name}]", 'type = "rate-limit"', f'rate = "{RATE}/s"', f"burst = {BURST}"]
        lines += ['key = "route"', f'store = "{"local" if onStoreDown is None else "redis"}"']
        if onStoreDown is not None:
            lines.append(f"on-store-down = {onStoreDown}")
    for path in ROUTES:
        lines += ["", "[[routes]]", f'path-prefix = "{path}"', 'service = "default"', f'filters = ["{path[1:]}"]']
    path = os.path.abspath(testCase.mktemp()) + ".toml"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@dataclass
class Proxy:
    """A C{twist rproxy} process of these tests."""

    process: ProxyProcess
    port: int
    metricsPort: int

    def logged(self, text: str) -> int:
        """How many times its output holds C{text}."""
        return self.process.log.count(text)


@dataclass
class Answer:
    """What one request got: C{status} 0 when it got no answer."""

    status: int
    seconds: float
    headers: dict[bytes, list[bytes]] = field(default_factory=dict)
    body: bytes = b""


class ClusterRateLimitTests(unittest.TestCase):
    """Three instances, one Redis."""

    timeout = 60

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 50
        self.addCleanup(self.pool.closeCachedConnections)
        self.upstream = listen(self, server.Site(_Hello()))

    async def startProxies(self, redisURL: str, count: int, *extra: str) -> list[Proxy]:
        """C{count} proxies with the config of L{writeConfig} (and C{extra} arguments), once each answers."""
        config = writeConfig(self, redisURL, self.upstream.url)
        proxies = []
        for _ in range(count):
            port, metricsPort = freePort(), freePort()
            argv = [sys.executable, "-m", "twisted", "rproxy", "--config", config]
            argv += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
            argv += ["--metrics-listen", f"tcp:{metricsPort}:interface=127.0.0.1", *extra]
            proxies.append(Proxy(ProxyProcess.spawn(self, argv, {"PYTHONPATH": ROOT}), port, metricsPort))
        for proxy in proxies:
            while (await self.get(proxy, "/ready")).status == 0:
                if not proxy.process.running:
                    self.fail(f"the proxy ended:\n{proxy.process.log}")
                await sleep(0.05)
        return proxies

    async def get(self, proxy: Proxy, path: str, port: int | None = None) -> Answer:
        """What C{proxy} answers to C{path} (on its C{port}: its metrics listener's, say)."""
        started = reactor.seconds()
        try:
            response = await treq.get(f"http://127.0.0.1:{port or proxy.port}{path}", pool=self.pool, timeout=5)
            body = await response.content()
        except Exception:
            return Answer(0, reactor.seconds() - started)
        headers = {name.lower(): values for name, values in response.headers.getAllRawHeaders()}
        return Answer(response.code, reactor.seconds() - started, headers, body)

    async def burst(
        self, proxies: Sequence[Proxy], path: str, count: int, seconds: float
    ) -> tuple[Counter[int], float]:
        """
        C{count} requests for C{path}, evenly over C{seconds}, in turn to each of C{proxies}, not waiting for
        answers; their statuses, and the seconds from the first request to the last.
        """
        sent: list[defer.Deferred[Answer]] = []
        started = reactor.seconds()
        for i in range(count):
            await sleep(max(0.0, started + i * seconds / count - reactor.seconds()))
            sent.append(defer.ensureDeferred(self.get(proxies[i % len(proxies)], path)))
        elapsed = reactor.seconds() - started
        answers = await defer.gatherResults(sent)
        return Counter(answer.status for answer in answers), elapsed

    def assertShared(self, statuses: Counter[int], elapsed: float) -> None:
        """
        C{statuses} are what one limit allows, within 10% (and half a second's refill more, for requests a
        loaded machine decides later than they were sent), and nothing was lost.
        """
        allowed = BURST + RATE * elapsed
        self.assertEqual(set(statuses), {200, 429}, statuses)
        let = f"{statuses}, {allowed:.1f} allowed"
        self.assertGreaterEqual(statuses[200], allowed * 0.9, let)
        self.assertLessEqual(statuses[200], allowed * 1.1 + RATE * 0.5, let)

    async def untilRefused(self, proxy: Proxy, path: str, let: int = 0) -> list[Answer]:
        """
        Requests for C{path}, one after the other, until one is refused: each let through (C{let} were before),
        and as many as the burst and the refill while they ran allow.
        """
        started = reactor.seconds()
        answers = []
        while not answers or answers[-1].status == 200:
            self.assertLess(len(answers), BURST + 10 * RATE, "never refused")
            answers.append(await self.get(proxy, path))
        self.assertEqual(answers[-1].status, 429, [a.status for a in answers])
        refilled = RATE * (reactor.seconds() - started)
        self.assertTrue(BURST <= let + len(answers) - 1 <= BURST + refilled + 1, (len(answers), refilled))
        return answers

    async def test_oneLimitForThree(self) -> None:
        """
        A burst spread over three instances gets what one limit allows (within 10%); the same limit kept in
        each instance's memory lets about three times that through.
        """
        redis = await startRedis(self)
        proxies = await self.startProxies(redis.url, 3)
        shared, elapsed = await self.burst(proxies, "/shared/x", 180, 1.5)
        self.assertShared(shared, elapsed)
        local, elapsed = await self.burst(proxies, "/local/x", 180, 1.5)
        self.assertGreater(local[200], 2.5 * (BURST + RATE * elapsed), local)

    async def test_refusalLikeLocal(self) -> None:
        """A refusal of the shared limit is the local limit's: 429, its reason, Retry-After, the RateLimit fields."""
        redis = await startRedis(self)
        [proxy] = await self.startProxies(redis.url, 1)
        for path in ("/shared/x", "/local/x"):
            answers = await self.untilRefused(proxy, path)
            let, refused = answers[-2], answers[-1]
            policy = f'"{RATE}/s burst {BURST} per route";q={RATE};w=1'.encode()
            self.assertEqual(let.headers[b"ratelimit-policy"], [policy])
            self.assertEqual(let.headers[b"ratelimit"], [f'"{RATE}/s burst {BURST} per route";r=0;t=1'.encode()])
            self.assertEqual(refused.headers[b"ratelimit-policy"], [policy])
            self.assertEqual(refused.headers[b"retry-after"], [b"1"])
            self.assertIn(b"rate limit 20/s (burst 10) exceeded for this route", refused.body)
        keys = await redisCLI(redis, "--scan")
        self.assertEqual(keys.split(), [bucketPrefix("rproxy:", "shared", sharedLimit()).encode()])
        ttl = int(await redisCLI(redis, "PTTL", keys.split()[0].decode()))
        self.assertTrue(0 < ttl <= 1000 * BURST / RATE, ttl)  # expires when full again

    async def test_prefix(self) -> None:
        """
        Two gateways on one Redis, with their own C{--redis-prefix}: each limit is its own (a burst through one
        leaves the other's bucket full), and their keys start with their prefixes.
        """
        redis = await startRedis(self)
        [a] = await self.startProxies(redis.url, 1, "--redis-prefix", "gw-a:")
        [b] = await self.startProxies(redis.url, 1, "--redis-prefix", "gw-b:")
        for proxy in (a, b):
            await self.untilRefused(proxy, "/shared/x")
        keys = sorted((await redisCLI(redis, "--scan")).split())
        expected = [bucketPrefix(prefix, "shared", sharedLimit()).encode() for prefix in ("gw-a:", "gw-b:")]
        self.assertEqual(keys, expected)
        self.assertTrue(expected[0].startswith(b"gw-a:rate-limit:shared:"))

    async def test_redisStoppedMidRun(self) -> None:
        """
        Redis stopped: /shared keeps serving on each instance's own limit, /closed answers 503, each instance
        says so once; Redis started again (knowing no script: NOSCRIPT): the limit is shared again.  No request
        is lost.
        """
        redis = await startRedis(self)
        proxies = await self.startProxies(redis.url, 3)
        for proxy in proxies:  # running: each has answered
            self.assertEqual((await self.get(proxy, "/shared/x")).status, 200)
        await redis.stop()
        shared, elapsed = await self.burst(proxies, "/shared/x", 120, 1.0)
        self.assertEqual(set(shared), {200, 429}, shared)
        perInstance = BURST + RATE * elapsed
        self.assertGreater(shared[200], 2 * perInstance, shared)  # three local limits
        self.assertLessEqual(shared[200], 3 * (perInstance + RATE * 0.5), shared)  # decided late: refilled more
        closed = [await self.get(proxy, "/closed/x") for proxy in proxies]
        self.assertEqual([a.status for a in closed], [503] * 3)
        for answer in closed:
            self.assertEqual(answer.headers[b"x-rproxy-fault"], [b"proxy"])
            self.assertEqual(answer.headers[b"retry-after"], [b"1"])
            self.assertIn(b"rate limit store redis out of reach", answer.body)
            self.assertLess(answer.seconds, SLACK)  # known out of reach: no wait
        self.assertEqual([proxy.logged(OUT_OF_REACH) for proxy in proxies], [1, 1, 1], proxies[0].process.log)
        metrics = await self.get(proxies[0], "/metrics", proxies[0].metricsPort)
        self.assertIn(b'rproxy_store_up{store="redis"} 0.0', metrics.body)
        self.assertIn(b'rproxy_store_outages_total{store="redis"} 1.0', metrics.body)

        await redis.start()
        back = await waitFor(lambda: all(proxy.logged(ANSWERS_AGAIN) for proxy in proxies), timeout=6)
        self.assertTrue(back, "\n".join(proxy.process.log[-2000:] for proxy in proxies))
        await sleep(BURST / RATE)  # the buckets full again
        shared, elapsed = await self.burst(proxies, "/shared/x", 180, 1.5)
        self.assertShared(shared, elapsed)
        self.assertEqual((await redisCLI(redis, "SCRIPT", "EXISTS", TOKEN_BUCKET.digest)).strip(), b"1")
        self.assertEqual([proxy.logged(OUT_OF_REACH) for proxy in proxies], [1, 1, 1])
        metrics = await self.get(proxies[0], "/metrics", proxies[0].metricsPort)
        self.assertIn(b'rproxy_store_up{store="redis"} 1.0', metrics.body)

    async def test_scriptFlushed(self) -> None:
        """A Redis that forgot the script (SCRIPT FLUSH) gets it again: the requests go on, still counted there."""
        redis = await startRedis(self)
        [proxy] = await self.startProxies(redis.url, 1)
        self.assertEqual((await self.get(proxy, "/shared/x")).status, 200)
        await redisCLI(redis, "SCRIPT", "FLUSH")
        await self.untilRefused(proxy, "/shared/x", let=1)
        self.assertEqual(proxy.logged(OUT_OF_REACH), 0)

    async def test_redisNeverAnswers(self) -> None:
        """
        A Redis that accepts connections and never answers: the first request is decided after --store-timeout
        (/shared let through on the local limit, /closed refused), the next ones at once.
        """
        silent = listen(self, Factory.forProtocol(Protocol))
        first, second = await defer.gatherResults(
            [defer.ensureDeferred(self.startProxies(f"redis://127.0.0.1:{silent.port}/0", 1)) for _ in range(2)]
        )
        [openProxy], [closedProxy] = first, second
        for proxy, path, status in ((openProxy, "/shared/x", 200), (closedProxy, "/closed/x", 503)):
            answer = await self.get(proxy, path)
            self.assertEqual(answer.status, status)
            self.assertTrue(TIMEOUT * 0.9 <= answer.seconds < TIMEOUT + SLACK, answer.seconds)
            again = await self.get(proxy, path)
            self.assertEqual(again.status, status)
            self.assertLess(again.seconds, SLACK / 2)
            self.assertEqual(proxy.logged(OUT_OF_REACH), 1)
            self.assertIn(f'"why": "no answer within {TIMEOUT:g}s"', proxy.process.log)


async def redisCLI(redis: RedisServer, *command: str) -> bytes:
    """What C{redis-cli} says to C{command} on C{redis}."""
    return await utils.getProcessOutput("/usr/bin/redis-cli", ["-p", str(redis.port), *command], env={})


def sharedLimit() -> RateLimit:
    """The limit of L{writeConfig}'s filters."""
    return RateLimit(parseRate(f"{RATE}/s"), reactor, BURST, KeyRule("route"))


class ConfigTests(unittest.TestCase):
    """The options of a shared limit, checked as the configuration is read; nothing connects."""

    def options(self, filter: str, *arguments: str) -> Options:
        path = os.path.abspath(self.mktemp()) + ".toml"
        with open(path, "w") as f:
            f.write('upstream = ["http://127.0.0.1:1"]\ndefault-filters = ["limit"]\n')
            f.write(f'[filters.limit]\ntype = "rate-limit"\nrate = "5/s"\n{filter}\n')
        options = Options()
        options.parseOptions(["--config", path, *arguments])
        return options

    def assertRefused(self, filter: str, message: str, *arguments: str) -> None:
        error = self.assertRaises(usage.UsageError, self.options, filter, *arguments)
        self.assertIn(f"filters.limit: filter rate-limit: {message}", str(error))

    def test_redisNeedsTheOption(self) -> None:
        """C{store = "redis"} without C{--redis} names the filter's option."""
        self.assertRefused('store = "redis"', 'option store: "redis" needs --redis')

    def test_badValues(self) -> None:
        """Unknown stores and behaviours, and C{on-store-down} without a store to be down, are refused."""
        redis = ("--redis", "redis://127.0.0.1:1/0")
        self.assertRefused('store = "memcached"', 'option store: expected "local" or "redis", got \'memcached\'')
        self.assertRefused('store = "redis"\non-store-down = "open"', "option on-store-down: expected", *redis)
        self.assertRefused('on-store-down = "deny"', 'option on-store-down: has no use without store = "redis"')

    def test_commandLineLimitStaysLocal(self) -> None:
        """C{--rate-limit} with C{--redis}: the command line's limit is this instance's; a file's may be shared."""
        options = self.options('store = "redis"', "--redis", "redis://127.0.0.1:1/0", "--rate-limit", "5/s")
        client = RedisClient("redis://127.0.0.1:1/0", reactor)
        filters = buildFilters(options.config, reactor, client)
        self.assertIs(type(filters.filters["rate-limit"]), RateLimit)
        self.assertIs(filters.filters["limit"].redis, client)  # type: ignore[attr-defined]

    def test_bucketKeys(self) -> None:
        """
        The keys of a limit's buckets: one per definition, another when the gateway's prefix, or the limit's name,
        rate, burst or key change.
        """
        limit = sharedLimit()
        self.assertEqual(bucketPrefix("p:", "a", limit), bucketPrefix("p:", "a", sharedLimit()))
        others = [
            bucketPrefix("q:", "a", limit),
            bucketPrefix("p:", "b", limit),
            bucketPrefix("p:", "a", RateLimit(parseRate("21/s"), reactor, BURST, KeyRule("route"))),
            bucketPrefix("p:", "a", RateLimit(parseRate("20/s"), reactor, BURST + 1, KeyRule("route"))),
            bucketPrefix("p:", "a", RateLimit(parseRate("20/s"), reactor, BURST, KeyRule("client"))),
        ]
        self.assertEqual(len({bucketPrefix("p:", "a", limit), *others}), 6)


class PasswordRedis(RedisServer):
    """A Redis that asks for L{PASSWORD}."""

    def arguments(self) -> Sequence[str]:
        return [*super().arguments(), "--requirepass", PASSWORD]


class TLSRedis(RedisServer):
    """A Redis that speaks TLS only (C{rediss://}), with a certificate of a CA made for the test."""

    def __init__(self, testCase: unittest.TestCase, directory: str) -> None:
        super().__init__(testCase, directory)
        self.files = CertificateAuthority().writeFiles(directory)

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0"

    def arguments(self) -> Sequence[str]:
        files = self.files
        return [
            *super().arguments(),
            *("--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"),
            *("--tls-cert-file", files.serverCertificate, "--tls-key-file", files.serverKey),
            *("--tls-ca-cert-file", files.ca),
        ]


class MutualTLSRedis(TLSRedis):
    """A L{TLSRedis} that asks its clients for a certificate of its CA (C{tls-auth-clients yes})."""

    def arguments(self) -> Sequence[str]:
        return [*super().arguments(), "--tls-auth-clients", "yes"]


PASSWORD = "s3cret-of-the-test"


class ClientTests(unittest.TestCase):
    """The Redis client in this process, on servers that ask for a password or speak TLS."""

    async def start(self, server: type[RedisServer]) -> RedisServer:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        redis = server(self, directory)
        await redis.start()
        return redis

    async def check(self, client: RedisClient) -> object:
        self.addCleanup(client.close)
        return await client.evaluate(TOKEN_BUCKET, ["a-bucket"], [RATE, 1, BURST, "0.001"])

    async def test_password(self) -> None:
        """The password of --redis-password-file is sent; a wrong one is said (not shown) and falls back."""
        log = LogCapture(self)
        redis = await self.start(PasswordRedis)
        self.assertEqual(await self.check(RedisClient(redis.url, reactor, PASSWORD)), [1, str(BURST - 1)])
        wrong = RedisClient(redis.url, reactor, "not-" + PASSWORD, TIMEOUT)
        started = reactor.seconds()
        with self.assertRaises(StoreUnavailableError):
            await self.check(wrong)
        self.assertLess(reactor.seconds() - started, TIMEOUT + SLACK)
        self.assertIn("WRONGPASS", wrong.health.error)
        said = "\n".join(log.formatted()) + repr(wrong) + repr(wrong.health.describe())
        self.assertIn("WRONGPASS", said)
        self.assertNotIn(PASSWORD, said)

    async def test_tls(self) -> None:
        """C{rediss://} speaks TLS and verifies the server's certificate against the trusted CAs."""
        redis = await self.start(TLSRedis)
        untrusted = RedisClient(redis.url, reactor, timeout=TIMEOUT)
        with self.assertRaises(StoreUnavailableError):
            await self.check(untrusted)
        self.patchEnvironment("SSL_CERT_FILE", redis.files.ca)  # OpenSSL's trusted CAs: the test's
        self.assertEqual(await self.check(RedisClient(redis.url, reactor)), [1, str(BURST - 1)])

    async def test_clientCertificate(self) -> None:
        """
        C{--redis-ca} verifies Redis's certificate, and C{--redis-client-cert} is presented to a Redis that asks
        for one; without it, Redis is out of reach.
        """
        redis = await self.start(MutualTLSRedis)
        files = redis.files
        tls = StoreTLS.read(files.ca, files.clientCertificate, files.clientKey)
        self.assertEqual(await self.check(RedisClient(redis.url, reactor, tls=tls)), [1, str(BURST - 1)])
        anonymous = RedisClient(redis.url, reactor, timeout=TIMEOUT, tls=StoreTLS.read(files.ca, None, None))
        with self.assertRaises(StoreUnavailableError):
            await self.check(anonymous)
        self.assertFalse(anonymous.health.up)

    def patchEnvironment(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self.addCleanup(lambda: os.environ.__setitem__(name, old) if old is not None else os.environ.pop(name))

    def test_reloadKeepsTheClient(self) -> None:
        """A reload's filters get the process's client: a changed shared limit is built on it again."""
        client = RedisClient("redis://127.0.0.1:1/0", reactor)
        options = {"rate": "5/s", "key": "route", "store": "redis"}
        first = FilterSet({"limit": FilterConfig("limit", "rate-limit", options)}, reactor, redis=client)
        changed = {**options, "rate": "6/s"}
        second = first.rebuilt({"limit": FilterConfig("limit", "rate-limit", changed)})
        self.assertIsNot(second.filters["limit"], first.filters["limit"])
        self.assertIs(second.filters["limit"].redis, client)  # type: ignore[attr-defined]
