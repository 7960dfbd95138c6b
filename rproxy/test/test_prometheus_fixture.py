"""
Tests for L{rproxy.test.prometheus}, the fixture that runs Debian's Prometheus server: it scrapes a twisted.web
site on 127.0.0.1 serving a prometheus_client registry, its queries see a counter change and a histogram's
buckets, a target that is down is reported with its error, and a server that cannot start fails the test
with what Prometheus said.
"""

from __future__ import annotations

from collections.abc import Callable

import treq
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error, reactor
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Request

from rproxy.test.prometheus import JOB, Series, startPrometheus
from rproxy.test.support import freePort, listen

BUCKETS = (0.1, 0.5, 1.0)


class _Metrics(resource.Resource):
    """C{/metrics}: the registry in the text format, as rproxy's metrics endpoint will serve it."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


def serveMetrics(testCase: unittest.TestCase, registry: CollectorRegistry) -> str:
    """
    Serve C{registry} at C{/metrics} until the test ends, closing the connections Prometheus keeps open.

    @return: The target's C{host:port}.
    """
    root = resource.Resource()
    root.putChild(b"metrics", _Metrics(registry))
    wrapping = WrappingFactory(server.Site(root))
    listening = listen(testCase, wrapping)

    def closeConnections() -> None:
        for connection in list(wrapping.protocols):
            connection.transport.abortConnection()

    testCase.addCleanup(closeConnections)
    return f"127.0.0.1:{listening.port}"


def values(result: Series) -> list[str]:
    """The value of each series of an instant query's result."""
    return [series["value"][1] for series in result]


def equalTo(expected: list[str]) -> Callable[[Series], bool]:
    """A predicate for L{PrometheusServer.waitForSeries}: the result's values are C{expected}."""
    return lambda result: values(result) == expected


class PrometheusFixtureTests(unittest.TestCase):
    timeout = 40

    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fixture_requests", "Requests seen.", registry=self.registry)
        self.latency = Histogram("fixture_latency_seconds", "Latency.", buckets=BUCKETS, registry=self.registry)
        self.target = serveMetrics(self, self.registry)

    async def test_scraped(self) -> None:
        """
        Prometheus scrapes the site: the counter's value after the test increments it, each bucket of the
        histogram; the served text parses as the same metrics.
        """
        prometheus = await startPrometheus(self, [self.target])
        await prometheus.waitForSeries("fixture_requests_total", equalTo(["0"]))
        self.requests.inc(3)
        self.latency.observe(0.3)
        self.latency.observe(2)
        await prometheus.waitForSeries("fixture_requests_total", equalTo(["3"]))

        buckets = await prometheus.query("fixture_latency_seconds_bucket")
        counts = {series["metric"]["le"]: series["value"][1] for series in buckets}
        self.assertEqual(counts, {"0.1": "0", "0.5": "1", "1.0": "1", "+Inf": "2"})
        self.assertEqual({(s["metric"]["job"], s["metric"]["instance"]) for s in buckets}, {(JOB, self.target)})
        self.assertEqual(values(await prometheus.query("fixture_latency_seconds_count")), ["2"])
        self.assertEqual(values(await prometheus.query(f'up{{instance="{self.target}"}}')), ["1"])
        [health] = await prometheus.targetsHealth()
        self.assertEqual((health.instance, health.health, health.lastError), (self.target, "up", ""))
        self.assertEqual(health.scrapeUrl, f"http://{self.target}/metrics")

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://{self.target}/metrics", pool=pool)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()])
        families = {family.name: family for family in text_string_to_metric_families(await response.text())}
        self.assertEqual(families["fixture_requests"].type, "counter")
        self.assertEqual(families["fixture_latency_seconds"].type, "histogram")
        samples = {(s.name, s.labels.get("le")): s.value for f in families.values() for s in f.samples}
        self.assertEqual(samples[("fixture_requests_total", None)], 3.0)
        self.assertEqual(
            {le: value for (name, le), value in samples.items() if name == "fixture_latency_seconds_bucket"},
            {"0.1": 0.0, "0.5": 1.0, "1.0": 1.0, "+Inf": 2.0},
        )

    async def test_downTarget(self) -> None:
        """A target nothing listens on is C{up == 0}, its health "down" with the connection's error."""
        down = f"127.0.0.1:{freePort()}"
        prometheus = await startPrometheus(self, [self.target, down])
        await prometheus.waitForSeries(f'up{{instance="{down}"}}', equalTo(["0"]))
        health = {target.instance: target for target in await prometheus.targetsHealth()}
        self.assertEqual(health[down].health, "down")
        self.assertIn("connection refused", health[down].lastError)
        await prometheus.waitForSeries(f'up{{instance="{self.target}"}}', equalTo(["1"]))

    async def test_stop(self) -> None:
        """Stopping ends Prometheus cleanly (SIGTERM) and its port is closed."""
        prometheus = await startPrometheus(self, [self.target])
        await prometheus.stop()
        self.assertEqual(prometheus.exitCode, 0, prometheus.output)
        with self.assertRaises(error.ConnectError):
            await treq.get(prometheus.url + "/-/ready", pool=HTTPConnectionPool(reactor, persistent=False))

    async def test_notStarted(self) -> None:
        """A server that ends before it is ready fails the test with Prometheus's own reason."""
        with self.assertRaises(self.failureException) as raised:
            await startPrometheus(self, [f"{self.target}/metrics"])
        message = str(raised.exception)
        self.assertIn("Prometheus ended", message)
        self.assertIn("is not a valid hostname", message)
