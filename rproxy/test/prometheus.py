"""
A real Prometheus server for tests: Debian's C{/usr/bin/prometheus} (C{make test} installs it) scraping
targets on 127.0.0.1, so that what rproxy exposes is checked by the program that will read it, not only by
a parser of our choosing::

    prometheus = await startPrometheus(self, [f"127.0.0.1:{port}"])
    result = await prometheus.waitForSeries("rproxy_requests_total", lambda result: len(result) == 2)
    health = await prometheus.targetsHealth()

Each server has its own port, configuration and storage in the test's temporary directory, whatever else
runs on the machine (Debian's package starts a system-wide Prometheus on port 9090 where systemd runs), and
is stopped by the test's cleanups.

Prometheus answers C{/-/ready} within a twentieth of a second (the fixture sees it after about a third of a
second: its first probe finds the port closed, which Twisted's C{HostnameEndpoint} reports 0.3 s later), but it
scrapes a target for the first time about five seconds after it started: its service discovery hands new
targets to the scrapers in batches five seconds apart, and Prometheus 2.42 has no flag to shorten that. Waiting
for a series therefore takes about six seconds once per server; later scrapes come every C{interval}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet import defer, error, reactor
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from rproxy.test.processes import ServerProcess
from rproxy.test.support import freePort, sleep

#: Debian's Prometheus server.
PROMETHEUS = "/usr/bin/prometheus"

#: The job name of every target, the C{job} label of their series.
JOB = "test"

#: Series returned by the query API: dictionaries with C{metric} (the labels) and C{value} (a timestamp and
#: the value as a string) or, for a range selector, C{values}.
Series = list[dict[str, Any]]

#: How often readiness and series are polled, in seconds.
_POLL = 0.05

_log = Logger()


@dataclass(frozen=True)
class TargetHealth:
    """
    One scrape target as Prometheus last saw it.

    @ivar instance: The C{instance} label: the target's C{host:port}.
    @ivar health: C{"up"}, C{"down"}, or C{"unknown"} before its first scrape.
    @ivar lastError: Why its last scrape failed, or C{""}.
    @ivar scrapeUrl: The URL Prometheus scrapes.
    """

    instance: str
    health: str
    lastError: str
    scrapeUrl: str


def _configuration(targets: list[str], interval: float) -> dict[str, Any]:
    """
    The configuration scraping C{targets} every C{interval} seconds (written as JSON, which is YAML); a
    scrape may last the whole interval.
    """
    every = f"{round(interval * 1000)}ms"
    return {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}],
    }


class PrometheusServer:
    """
    A Prometheus server of one test, and a client of its HTTP API.

    @ivar port: The port it listens on, on 127.0.0.1.
    @ivar directory: Its own directory: configuration and storage.
    """

    def __init__(self, testCase: unittest.TestCase, port: int, directory: str) -> None:
        self.testCase = testCase
        self.port = port
        self.directory = directory
        self._process = ServerProcess()
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        testCase.addCleanup(self._pool.closeCachedConnections)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        """The end of what Prometheus logged so far."""
        return self._process.text

    @property
    def exitCode(self) -> int | None:
        """The exit status once Prometheus has ended normally, else C{None}."""
        return self._process.exitCode

    async def _run(self, targets: list[str], interval: float, readyTimeout: float) -> PrometheusServer:
        """Start Prometheus, stopped by the test's cleanups; return once it is ready."""
        configPath = os.path.join(self.directory, "prometheus.yml")
        with open(configPath, "w", encoding="utf-8") as f:
            json.dump(_configuration(targets, interval), f, indent=2)
        arguments = [
            PROMETHEUS,
            f"--config.file={configPath}",
            f"--storage.tsdb.path={os.path.join(self.directory, 'data')}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        # No environment of the machine's (proxy variables included) reaches it.
        reactor.spawnProcess(self._process, PROMETHEUS, arguments, env={"HOME": self.directory}, path=self.directory)
        self.testCase.addCleanup(self.stop)
        await self._waitReady(readyTimeout)
        return self

    async def _waitReady(self, timeout: float) -> None:
        started = reactor.seconds()
        while not self._process.hasEnded:
            try:
                response = await treq.get(self.url + "/-/ready", pool=self._pool, timeout=5)
                await response.content()
                if response.code == 200:
                    seconds = reactor.seconds() - started
                    _log.info("Prometheus ready on {url} after {seconds:.3f} s", url=self.url, seconds=seconds)
                    return
            except (error.ConnectError, ResponseFailed, defer.CancelledError):
                pass
            if reactor.seconds() - started >= timeout:
                self.testCase.fail(f"Prometheus not ready after {timeout} s:\n{self.output}")
            await sleep(_POLL)
        self.testCase.fail(f"Prometheus ended (status {self.exitCode}) before it was ready:\n{self.output}")

    def stop(self, timeout: float = 10.0) -> defer.Deferred[None]:
        """
        Stop Prometheus: SIGTERM, then SIGKILL if it has not ended after C{timeout} seconds.

        @return: Fires once it has ended.
        """
        return self._process.stop(timeout)

    async def _get(self, path: str, parameters: dict[str, str]) -> Any:
        """The C{data} of the API's answer at C{path}; a failure of the test if the API answers an error."""
        response = await treq.get(self.url + path, params=parameters, pool=self._pool, timeout=10)
        answer = json.loads(await response.content())
        if answer.get("status") != "success":
            self.testCase.fail(f"Prometheus answered {response.code} to {path} {parameters}: {answer}")
        return answer["data"]

    async def _query(self, promql: str) -> Series:
        data = await self._get("/api/v1/query", {"query": promql})
        if data["resultType"] not in ("vector", "matrix"):
            self.testCase.fail(f"{promql!r} is a {data['resultType']}, not series: {data['result']}")
        series: Series = data["result"]
        return series

    def query(self, promql: str) -> defer.Deferred[Series]:
        """
        Evaluate C{promql} now (an instant query).

        @return: The series, each a dictionary with C{metric} (its labels) and C{value} (C{[timestamp, "value"]}).
        """
        return defer.Deferred.fromCoroutine(self._query(promql))

    async def _targetsHealth(self) -> list[TargetHealth]:
        data = await self._get("/api/v1/targets", {"state": "active"})
        return [
            TargetHealth(target["labels"]["instance"], target["health"], target["lastError"], target["scrapeUrl"])
            for target in data["activeTargets"]
        ]

    def targetsHealth(self) -> defer.Deferred[list[TargetHealth]]:
        """
        How each target's last scrape went (none is listed before Prometheus's first batch of targets).

        @return: One L{TargetHealth} per target.
        """
        return defer.Deferred.fromCoroutine(self._targetsHealth())

    async def _waitForSeries(self, promql: str, predicate: Callable[[Series], object], timeout: float) -> Series:
        deadline = reactor.seconds() + timeout
        while True:
            result = await self._query(promql)
            if predicate(result):
                return result
            if reactor.seconds() >= deadline:
                health = await self._targetsHealth()
                self.testCase.fail(f"{promql!r} after {timeout} s: {result}\ntargets: {health}")
            await sleep(_POLL)

    def waitForSeries(
        self, promql: str, predicate: Callable[[Series], object] = bool, timeout: float = 15.0
    ) -> defer.Deferred[Series]:
        """
        Evaluate C{promql} until C{predicate} holds for its result (by default: until it has a series), which
        may take until a scrape has happened; fail the test after C{timeout} seconds, saying how each target's
        last scrape went.

        @return: The result C{predicate} held for.
        """
        return defer.Deferred.fromCoroutine(self._waitForSeries(promql, predicate, timeout))


def startPrometheus(
    testCase: unittest.TestCase, targets: list[str], interval: float = 0.5, readyTimeout: float = 30.0
) -> defer.Deferred[PrometheusServer]:
    """
    Start a Prometheus server scraping C{/metrics} of each of C{targets} (C{host:port}) every C{interval}
    seconds, stopped when the test ends.

    @return: Fires with the server once it answers C{/-/ready}; fails the test with Prometheus's output if it
        ends first or is not ready after C{readyTimeout} seconds.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    server = PrometheusServer(testCase, freePort(), directory)
    return defer.Deferred.fromCoroutine(server._run(targets, interval, readyTimeout))
