"""
Real etcd and Redis servers for the cluster tests: Debian's C{etcd-server} and C{redis-server} (C{make test}
installs them), each on free ports of 127.0.0.1 with its data in the test's temporary directory::

    etcd = await startEtcd(self)
    redis = await startRedis(self)
    await etcd.stop()       # out of reach: what do the proxies do?
    await etcd.start()      # back, with the same data

A server is stopped by the test's cleanups however the test ends.  etcd answers C{/health} about half a
second after it starts (it elects itself leader of its one-member cluster first); Redis at once.
"""

from __future__ import annotations

import base64
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import treq
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from rproxy.cluster.etcd import prefixEnd
from rproxy.test.certs import CertificateAuthority
from rproxy.test.processes import ServerProcess
from rproxy.test.support import freePort, sleep

ETCD = "/usr/bin/etcd"
REDIS = "/usr/bin/redis-server"

#: How often readiness is polled, in seconds.
_POLL = 0.05


class StoreServer(ABC):
    """
    A server one test runs, which it may stop and start again (same ports, same data).

    @ivar port: the port clients connect to, on 127.0.0.1.
    @ivar directory: its data.
    """

    #: Its program, and what it is called in failure messages.
    program = ""
    name = ""

    def __init__(self, testCase: unittest.TestCase, directory: str) -> None:
        self.testCase = testCase
        self.directory = directory
        self.port = freePort()
        self._process: ServerProcess | None = None
        testCase.addCleanup(self.stop)

    @abstractmethod
    def arguments(self) -> Sequence[str]:
        """Its command line, without the program."""

    @abstractmethod
    async def ready(self) -> bool:
        """Whether it answers clients yet."""

    @property
    def output(self) -> str:
        """The end of what its current (or last) run wrote."""
        return "" if self._process is None else self._process.text

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.hasEnded

    async def _start(self, timeout: float) -> None:
        assert not self.running, f"{self.name} is running already"
        process = self._process = ServerProcess()
        program = self.program
        reactor.spawnProcess(
            process, program, [program, *self.arguments()], env={"HOME": self.directory}, path=self.directory
        )
        deadline = reactor.seconds() + timeout
        while not process.hasEnded:
            if await self.ready():
                return
            if reactor.seconds() >= deadline:
                self.testCase.fail(f"{self.name} not ready after {timeout} s:\n{self.output}")
            await sleep(_POLL)
        self.testCase.fail(f"{self.name} ended (status {process.exitCode}) before it was ready:\n{self.output}")

    def start(self, timeout: float = 20.0) -> defer.Deferred[None]:
        """Start it (again); fires once it answers clients."""
        return defer.Deferred.fromCoroutine(self._start(timeout))

    def stop(self) -> defer.Deferred[None]:
        """Stop it (SIGTERM, then SIGKILL); fires once it has ended."""
        if self._process is None:
            return defer.succeed(None)
        return self._process.stop()

    def kill(self) -> defer.Deferred[None]:
        """End it at once, as a crash would (SIGKILL); fires once it has ended."""
        if self._process is None or self._process.hasEnded:
            return defer.succeed(None)
        self._process.signal("KILL")
        return self._process.whenEnded()


class EtcdServer(StoreServer):
    """A one-member etcd v3 cluster; L{url} is its client URL (also its HTTP/JSON gateway)."""

    program = ETCD
    name = "etcd"

    def __init__(self, testCase: unittest.TestCase, directory: str) -> None:
        super().__init__(testCase, directory)
        self.peerPort = freePort()
        self._pool = HTTPConnectionPool(reactor, persistent=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arguments(self) -> Sequence[str]:
        peer = f"http://127.0.0.1:{self.peerPort}"
        return [
            "--name=test",
            f"--data-dir={os.path.join(self.directory, 'data')}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--logger=zap",
            "--log-level=warn",
            "--auth-token-ttl=1",  # with authentication enabled (enableAuth), tokens expire fast: clients ask again
        ]

    async def _call(self, path: str, body: dict[str, object]) -> None:
        response = await treq.post(self.url + path, json=body, pool=self._pool, timeout=5)
        content = await response.content()
        assert response.code == 200, (path, response.code, content)

    def put(self, key: str, value: bytes) -> defer.Deferred[None]:
        """Set C{key} to C{value}, as an operator's C{etcdctl put} would."""
        body = {"key": _b64(key.encode()), "value": _b64(value)}
        return defer.Deferred.fromCoroutine(self._call("/v3/kv/put", body))

    async def _enableAuth(self, user: str, password: str, prefix: str, rootPassword: str) -> None:
        await self._call("/v3/auth/role/add", {"name": "root"})
        await self._call("/v3/auth/user/add", {"name": "root", "password": rootPassword})
        await self._call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await self._call("/v3/auth/role/add", {"name": "gateway"})
        start, end = prefix.encode(), prefixEnd(prefix.encode())
        permission = {"key": _b64(start), "range_end": _b64(end), "permType": "READWRITE"}
        await self._call("/v3/auth/role/grant", {"name": "gateway", "perm": permission})
        await self._call("/v3/auth/user/add", {"name": user, "password": password})
        await self._call("/v3/auth/user/grant", {"user": user, "role": "gateway"})
        await self._call("/v3/auth/enable", {})

    def enableAuth(self, user: str, password: str, prefix: str, rootPassword: str) -> defer.Deferred[None]:
        """
        Turn etcd's authentication on, with C{user} allowed to read and write the keys under C{prefix} only
        (and C{root} everything); from then on, L{put} and L{delete} are refused without a token.
        """
        return defer.Deferred.fromCoroutine(self._enableAuth(user, password, prefix, rootPassword))

    def delete(self, key: str) -> defer.Deferred[None]:
        """Delete C{key}."""
        return defer.Deferred.fromCoroutine(self._call("/v3/kv/deleterange", {"key": _b64(key.encode())}))

    @property
    def healthURL(self) -> str:
        """Where it says whether it is healthy (C{/health})."""
        return self.url + "/health"

    async def ready(self) -> bool:
        try:
            response = await treq.get(self.healthURL, pool=self._pool, timeout=2)
            return response.code == 200 and b'"true"' in await response.content()
        except (error.ConnectError, ResponseFailed, defer.CancelledError):
            return False


class TLSEtcdServer(EtcdServer):
    """
    An etcd that speaks TLS only, with a server certificate of a CA made for the test, and asks its clients
    for a certificate of that CA (C{--client-cert-auth}); L{files} are the CA's, the server's and a client's.
    It says whether it is healthy over plain HTTP, on another port.
    """

    def __init__(self, testCase: unittest.TestCase, directory: str) -> None:
        super().__init__(testCase, directory)
        # etcd's HTTP/JSON gateway presents the server's certificate to etcd itself (client-cert-auth).
        self.files = CertificateAuthority().writeFiles(directory, serverIsClient=True)
        self.metricsPort = freePort()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def healthURL(self) -> str:
        return f"http://127.0.0.1:{self.metricsPort}/health"

    def arguments(self) -> Sequence[str]:
        files = self.files
        return [
            *super().arguments(),
            f"--cert-file={files.serverCertificate}",
            f"--key-file={files.serverKey}",
            f"--trusted-ca-file={files.ca}",
            "--client-cert-auth",
            f"--listen-metrics-urls=http://127.0.0.1:{self.metricsPort}",
        ]


class RedisServer(StoreServer):
    """A Redis server without persistence; L{url} is its C{redis://} URL."""

    program = REDIS
    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arguments(self) -> Sequence[str]:
        return ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", "."]

    async def ready(self) -> bool:
        try:
            connected = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, 1), Protocol())
        except error.ConnectError:
            return False
        connected.transport.loseConnection()
        return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _directory(testCase: unittest.TestCase) -> str:
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    return directory


async def _started(server: StoreServer) -> StoreServer:
    await server.start()
    return server


def startEtcd(testCase: unittest.TestCase) -> defer.Deferred[EtcdServer]:
    """A running etcd of C{testCase}'s own, stopped when it ends."""
    server = EtcdServer(testCase, _directory(testCase))
    return defer.Deferred.fromCoroutine(_started(server)).addCallback(lambda _: server)


def startRedis(testCase: unittest.TestCase) -> defer.Deferred[RedisServer]:
    """A running Redis of C{testCase}'s own, stopped when it ends."""
    server = RedisServer(testCase, _directory(testCase))
    return defer.Deferred.fromCoroutine(_started(server)).addCallback(lambda _: server)
