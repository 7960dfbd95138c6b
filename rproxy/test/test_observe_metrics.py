"""
The Prometheus metrics (L{rproxy.observe.metrics}) of a real proxy: real requests through it, then what its
metrics resource serves, parsed with prometheus_client's own parsers and scraped by a real Prometheus.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openMetricsFamilies
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, utils
from twisted.python import usage
from twisted.trial import unittest

from rproxy.app.admin import metricsSite
from rproxy.app.tap import Options
from rproxy.cluster.health import StoreHealth
from rproxy.errors import clientError
from rproxy.observe.metrics import REJECTION_REASONS, ProxyMetrics
from rproxy.proxy.message import RequestContext
from rproxy.test.prometheus import startPrometheus
from rproxy.test.support import (
    Listening,
    ReceivedRequest,
    RunningProxy,
    ScriptedUpstream,
    curl,
    freePort,
    headerValues,
    listen,
    rawRequest,
    responseStatus,
    splitResponses,
    startProxy,
    useFilters,
    waitFor,
)
from rproxy.test.test_admin import RunningService, startService
from rproxy.test.test_docs import ROOT
from rproxy.test.test_filter_chain import Step
from rproxy.test.test_observe_record import Recorder

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
UPGRADE = b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: rawproto/1\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: rawproto/1\r\n\r\n"

#: A sample as compared here: its name and its labels, sorted.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def sampleKey(name: str, **labels: str) -> SampleKey:
    return name, tuple(sorted(labels.items()))


def samples(text: str, names: Iterable[str] | None = None) -> dict[SampleKey, float]:
    """The samples of C{text} (Prometheus's text format) named one of C{names} (default: all), by name and labels."""
    wanted = None if names is None else set(names)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if wanted is None or sample.name in wanted
    }


def byLabel(name: str, label: str, values: dict[str, float], **others: str) -> dict[SampleKey, float]:
    """The samples of C{name} whose C{label} takes each key of C{values}, with C{others} as their other labels."""
    return {sampleKey(name, **others, **{label: key}): value for key, value in values.items()}


def serveMetrics(testCase: unittest.TestCase, metrics: ProxyMetrics) -> Listening:
    """Serve C{metrics} on a port of their own, as C{--metrics-listen} does."""
    return listen(testCase, metricsSite(metrics, reactor))


async def scrape(
    port: int, method: bytes = b"GET", accept: bytes | None = None, path: bytes = b"/metrics"
) -> tuple[int, bytes, bytes]:
    """C{method} C{path} on C{port}: the status, the response head and the body."""
    fields = b"Accept: " + accept + b"\r\n" if accept is not None else b""
    request = b"%s %s HTTP/1.1\r\nHost: m\r\n%sConnection: close\r\n\r\n" % (method, path, fields)
    answer = await rawRequest(port, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    return responseStatus(head), head, body


async def metricsText(port: int) -> str:
    """What C{GET /metrics} on C{port} answers (in Prometheus's text format: it asks for no other)."""
    status, head, body = await scrape(port)
    assert status == 200, head
    return body.decode("utf-8")


def watched(testCase: unittest.TestCase, proxy: RunningProxy) -> tuple[ProxyMetrics, Listening]:
    """Metrics observing C{proxy} and watching its state, served on a port of their own."""
    metrics = ProxyMetrics()
    proxy.site.observers.append(metrics)
    metrics.watch(proxy.registry, [proxy.site], proxy.site.resource.proxy.tunnels)  # type: ignore[attr-defined]
    return metrics, serveMetrics(testCase, metrics)


def deny(context: RequestContext) -> object:
    """A filter's check: a request carrying C{X-Deny} is refused with 401."""
    if context.inbound.headers.hasHeader(b"x-deny"):
        return clientError(401, "denied")
    return None


def get(path: bytes, *fields: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    """A raw request for C{path} that closes its connection."""
    head = [b"%s %s HTTP/1.1" % (method, path), b"Host: h", b"Connection: close", *fields]
    if body:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def writeConfig(testCase: unittest.TestCase, text: str) -> str:
    """A config file holding C{text}; its path."""
    path = os.path.abspath(testCase.mktemp()) + ".toml"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class ExchangeMetricsTests(unittest.TestCase):
    """What the records of real exchanges add up to, as served, parsed with prometheus_client's parser."""

    maxDiff = None

    async def test_exchanges(self) -> None:
        """
        Requests to named and unnamed routes of three services (a retry; an upstream down, then ejected),
        refused by a filter, matching no route, with an unknown method: each counter and histogram has
        exactly the samples they make, and the state of the upstreams is read when scraped.
        """
        web = ScriptedUpstream(self, lambda proto, request: OK)
        answered: list[ReceivedRequest] = []

        def firstUnavailable(proto: object, request: ReceivedRequest) -> bytes:
            answered.append(request)
            return UNAVAILABLE if len(answered) == 1 else OK

        flaky = [ScriptedUpstream(self, firstUnavailable) for _ in range(2)]  # type: ignore[arg-type]
        dead = f"http://127.0.0.1:{freePort()}"
        config = writeConfig(
            self,
            f"""
            retry-on-status = "503"
            [services.web]
            upstreams = ["{web.url}"]
            [services.flaky]
            upstreams = ["{flaky[0].url}", "{flaky[1].url}"]
            [services.down]
            upstreams = ["{dead}"]
            max-fails = 2
            [[routes]]
            name = "web"
            path-prefix = "/web"
            service = "web"
            [[routes]]
            path-prefix = "/flaky"
            service = "flaky"
            [[routes]]
            name = "down"
            path-prefix = "/down"
            service = "down"
            """,
        )
        proxy = startProxy(self, [], "--config", config)
        useFilters(proxy, Step(b"deny", [], deny))  # type: ignore[arg-type]
        metrics, served = watched(self, proxy)
        sent: dict[str, int] = {}
        for service, request, status in [
            ("web", get(b"/web/a"), 200),
            ("web", get(b"/web/b"), 200),
            ("web", get(b"/web/c", method=b"POST", body=b"abc"), 200),
            ("web", get(b"/web/d", method=b"BREW"), 200),
            ("web", get(b"/web/e", b"X-Deny: 1"), 401),
            ("", get(b"/elsewhere"), 404),
            ("flaky", get(b"/flaky/x"), 200),
            ("down", get(b"/down/x"), 502),
            ("down", get(b"/down/y"), 503),  # the second failure ejects it, and the service has no other
        ]:
            [(head, body)] = splitResponses(await rawRequest(proxy.port, request))
            self.assertEqual(responseStatus(head), status, head)
            sent[service] = sent.get(service, 0) + len(body)
        self.assertTrue(await waitFor(lambda: not proxy.site.connections))
        text = await metricsText(served.port)

        services = {"web": "web", "": "", "flaky": "", "down": "down"}  # each service's route
        requests = {
            ("web", "web", "GET", "2xx"): 2,
            ("web", "web", "POST", "2xx"): 1,
            ("web", "web", "other", "2xx"): 1,
            ("web", "web", "GET", "4xx"): 1,
            ("", "", "GET", "4xx"): 1,
            ("flaky", "", "GET", "2xx"): 1,
            ("down", "down", "GET", "5xx"): 2,
        }
        expected = {
            sampleKey("rproxy_requests_total", service=s, route=r, method=m, code_class=c): n
            for (s, r, m, c), n in requests.items()
        }
        expected.update(byLabel("rproxy_rejections_total", "reason", dict.fromkeys(REJECTION_REASONS, 0.0)))
        expected[sampleKey("rproxy_rejections_total", reason="auth")] = 1
        expected[sampleKey("rproxy_rejections_total", reason="no_route")] = 1
        expected[sampleKey("rproxy_rejections_total", reason="unavailable")] = 1
        perService = {
            "rproxy_exchanges_ended_total": {"web": 5, "": 1, "flaky": 1, "down": 2},
            "rproxy_attempts_total": {"web": 4, "": 0, "flaky": 2, "down": 0},
            "rproxy_retries_total": {"web": 0, "": 0, "flaky": 1, "down": 0},
            "rproxy_bytes_received_total": {"web": 3, "": 0, "flaky": 0, "down": 0},
            "rproxy_bytes_sent_total": sent,
            "rproxy_upstream_first_byte_seconds_count": {"web": 4, "": 0, "flaky": 1, "down": 0},
        }
        for name, values in perService.items():
            others = {"outcome": "done"} if name == "rproxy_exchanges_ended_total" else {}
            expected.update(byLabel(name, "service", values, **others))  # type: ignore[arg-type]
        for service, route in services.items():
            count = perService["rproxy_exchanges_ended_total"][service]
            expected[sampleKey("rproxy_request_duration_seconds_count", service=service, route=route)] = count
        self.assertEqual(samples(text, {name for name, _ in expected}), expected)

        # The connection that answered the 503 was closed (its answer is not wanted), the others are idle.
        [retried] = [each for each in flaky if any(request is answered[0] for request in each.requests)]
        upstreams = {
            ("web", web.url): ("up", 0, 1),
            **{("flaky", each.url): ("up", 0, 0 if each is retried else 1) for each in flaky},
            ("down", dead): ("ejected", 1, 0),
        }
        state: dict[SampleKey, float] = {}
        for (service, key), (health, ejections, idle) in upstreams.items():
            labels = {"service": service, "upstream": key}
            state[sampleKey("rproxy_upstream_requests_in_flight", **labels)] = 0
            for each in ("up", "ejected", "down"):
                state[sampleKey("rproxy_upstream_health", **labels, state=each)] = 1 if each == health else 0
            state[sampleKey("rproxy_upstream_ejections_total", **labels)] = ejections
            state[sampleKey("rproxy_upstream_connections", **labels, state="active")] = 0
            state[sampleKey("rproxy_upstream_connections", **labels, state="idle")] = idle
        state.update(byLabel("rproxy_requests_in_flight", "service", {"web": 0, "flaky": 0, "down": 0}))
        for name in ("rproxy_client_connections", "rproxy_http2_streams", "rproxy_tunnels_open"):
            state[sampleKey(name)] = 0
        state[sampleKey("rproxy_tunnels_opened_total")] = 0
        state.update(
            byLabel("rproxy_tunnel_bytes_total", "direction", {"client_to_upstream": 0, "upstream_to_client": 0})
        )
        self.assertEqual(samples(text, {name for name, _ in state}), state)

    async def test_histogramBuckets(self) -> None:
        """A latency histogram's buckets are cumulative, up to +Inf, which is its count; its sum is the durations'."""
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        recorder = Recorder()
        proxy.site.observers.append(recorder)
        metrics, served = watched(self, proxy)
        for _ in range(3):
            await rawRequest(proxy.port, get(b"/"))
        text = await metricsText(served.port)
        [family] = [f for f in text_string_to_metric_families(text) if f.name == "rproxy_request_duration_seconds"]
        buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
        counts = [value for _, value in buckets]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(buckets[-1], ("+Inf", 3))
        self.assertEqual(buckets[0][0], "0.001")
        [total] = [s.value for s in family.samples if s.name.endswith("_sum")]
        durations = [record.duration for record in recorder.records]
        self.assertAlmostEqual(total, sum(durations))
        for le, value in buckets[:-1]:
            self.assertEqual(value, sum(1 for duration in durations if duration <= float(le)), le)

    async def test_rejections(self) -> None:
        """
        Refusals for a body over the limit, a malformed body, an upstream at its connection limit and a
        client over its rate: each counted under its reason.
        """
        held: list[object] = []

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            if request.requestLine.startswith(b"GET /hold"):
                held.append(proto)
                return b""
            return OK

        upstream = ScriptedUpstream(self, respond)  # type: ignore[arg-type]
        proxy = startProxy(
            self,
            [upstream.url],
            *("--max-body-size", "10", "--rate-limit", "3/m", "--rate-limit-burst", "3"),
            *("--upstream-max-connections", "1", "--upstream-queue", "0"),
        )
        metrics, served = watched(self, proxy)
        answers = [await rawRequest(proxy.port, get(b"/big", method=b"POST", body=b"x" * 20))]
        chunked = get(b"/c", b"Transfer-Encoding: chunked", method=b"POST") + b"zz\r\n"
        answers.append(await rawRequest(proxy.port, chunked, timeout=5))
        holding = rawRequest(proxy.port, get(b"/hold"))
        self.assertTrue(await waitFor(lambda: held))
        answers.append(await rawRequest(proxy.port, get(b"/busy")))
        held[0].transport.write(OK)  # type: ignore[attr-defined]
        answers.append(await holding)
        answers.append(await rawRequest(proxy.port, get(b"/more")))
        self.assertEqual([responseStatus(answer) for answer in answers], [413, 400, 503, 200, 429])
        self.assertIn(b"error=connection_limit_reached", headerValues(answers[2], b"proxy-status")[0])
        expected = dict.fromkeys(REJECTION_REASONS, 0.0)
        expected.update(limits=1, bad_input=1, overload=1, rate_limit=1)
        self.assertEqual(
            samples(await metricsText(served.port), ["rproxy_rejections_total"]),
            byLabel("rproxy_rejections_total", "reason", expected),
        )


class StateMetricsTests(unittest.TestCase):
    """What is read when scraped: exchanges in flight, connections, HTTP/2 streams and tunnels open."""

    async def test_open(self) -> None:
        """An HTTP/2 request held upstream and a tunnel open are seen while they last, and gone after."""
        held: list[protocol.Protocol] = []

        def respond(proto: protocol.Protocol, request: ReceivedRequest) -> bytes:
            if request.requestLine.startswith(b"GET /chat"):
                return SWITCHED + b"hello"
            held.append(proto)
            return b""

        upstream = ScriptedUpstream(self, respond)  # type: ignore[arg-type]
        proxy = startProxy(self, [upstream.url])
        metrics, served = watched(self, proxy)
        tunnels = proxy.site.resource.proxy.tunnels  # type: ignore[attr-defined]
        requesting = curl(["-s", "--http2-prior-knowledge", f"{proxy.url}/hold"], timeout=10)
        self.assertTrue(await waitFor(lambda: held))
        tunnelling = rawRequest(proxy.port, UPGRADE + b"ping", timeout=1)
        self.assertTrue(await waitFor(lambda: tunnels.open))
        names = {
            "rproxy_client_connections": 2,
            "rproxy_http2_streams": 1,
            "rproxy_tunnels_open": 1,
            "rproxy_tunnels_opened_total": 1,
        }
        labels = {"service": "default", "upstream": upstream.url}
        during = samples(await metricsText(served.port), [*names, "rproxy_requests_in_flight"])
        expected = {sampleKey(name): value for name, value in names.items()}
        expected[sampleKey("rproxy_requests_in_flight", service="default")] = 1
        self.assertEqual(during, expected)
        held[0].transport.write(OK)
        self.assertEqual(await requesting, (0, b"hello", b""))
        self.assertIn(b" 101 ", await tunnelling)  # the client leaves after a second
        self.assertTrue(await waitFor(lambda: not tunnels.open and not proxy.site.connections))
        names.update(rproxy_client_connections=0, rproxy_http2_streams=0, rproxy_tunnels_open=0)
        expected = {sampleKey(name): value for name, value in names.items()}
        expected.update(
            byLabel("rproxy_tunnel_bytes_total", "direction", {"client_to_upstream": 4, "upstream_to_client": 5})
        )
        expected[sampleKey("rproxy_upstream_requests_in_flight", **labels)] = 0
        after = await metricsText(served.port)
        self.assertEqual(samples(after, {name for name, _ in expected}), expected)


class CardinalityTests(unittest.TestCase):
    """Labels are bounded: what clients choose makes no new series."""

    async def test_pathsAndAddresses(self) -> None:
        """1000 requests from 1000 client addresses for 1000 paths add to the series of the first, and make no other."""
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        recorder = Recorder()
        proxy.site.observers.append(recorder)
        metrics, served = watched(self, proxy)
        await rawRequest(proxy.port, get(b"/first"))
        self.assertTrue(await waitFor(lambda: not proxy.site.connections))
        before = samples(await metricsText(served.port))

        async def one(i: int) -> bytes:
            address = f"127.{1 + i // 250}.{i // 50 % 5}.{1 + i % 250}"
            done: defer.Deferred[bytes] = defer.Deferred()
            creator = protocol.ClientCreator(reactor, _Collect, get(b"/p/%d?q=%d" % (i, i)), done)
            await creator.connectTCP("127.0.0.1", proxy.port, bindAddress=(address, 0))
            return await done

        for start in range(0, 1000, 20):  # 20 at a time: a listening port's backlog is 50
            answers = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(one(i)) for i in range(start, start + 20)]
            )
            self.assertEqual({responseStatus(answer) for answer in answers}, {200})
        self.assertEqual(len({record.peer for record in recorder.records}), 1001)
        self.assertTrue(await waitFor(lambda: not proxy.site.connections))
        after = samples(await metricsText(served.port))
        self.assertEqual(sorted(after), sorted(before))
        key = sampleKey("rproxy_requests_total", service="default", route="", method="GET", code_class="2xx")
        self.assertEqual((before[key], after[key]), (1, 1001))


class _Collect(protocol.Protocol):
    """Sends a request and keeps the answer until the server closes."""

    def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
        self.request = request
        self.done = done
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


class ResourceTests(unittest.TestCase):
    """The metrics resource: formats, content types, methods."""

    def setUp(self) -> None:
        self.metrics = ProxyMetrics()
        self.served = serveMetrics(self, self.metrics)

    async def test_textFormat(self) -> None:
        """Without an Accept, Prometheus's text format with prometheus_client's content type for it; never cached."""
        status, head, body = await scrape(self.served.port)
        self.assertEqual(status, 200)
        self.assertEqual(headerValues(head, b"content-type"), [choose_encoder("")[1].encode()])
        self.assertEqual(headerValues(head, b"cache-control"), [b"no-store"])
        self.assertIn("rproxy_requests", {family.name for family in text_string_to_metric_families(body.decode())})

    async def test_openMetrics(self) -> None:
        """What Prometheus asks for: OpenMetrics, which its parser reads (ended by # EOF)."""
        accept = b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        status, head, body = await scrape(self.served.port, accept=accept)
        self.assertEqual(status, 200)
        self.assertEqual(headerValues(head, b"content-type"), [choose_encoder(accept.decode())[1].encode()])
        self.assertTrue(body.endswith(b"# EOF\n"))
        families = {family.name: family for family in openMetricsFamilies(body.decode())}
        self.assertEqual(families["rproxy_rejections"].type, "counter")

    async def test_head(self) -> None:
        """HEAD: the fields of GET, no body."""
        status, head, body = await scrape(self.served.port, method=b"HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headerValues(head, b"content-type"), [choose_encoder("")[1].encode()])

    async def test_otherMethods(self) -> None:
        """Any other method: 405, allowing GET and HEAD."""
        status, head, body = await scrape(self.served.port, method=b"POST")
        self.assertEqual(status, 405)
        self.assertEqual(headerValues(head, b"allow"), [b"GET, HEAD"])


def startWithMetrics(testCase: unittest.TestCase, *arguments: str) -> tuple[RunningService, int]:
    """C{twist rproxy --metrics-listen ... ARGUMENTS} built by L{buildService}; the metrics listener's port."""
    port = freePort()
    return startService(testCase, "--metrics-listen", f"tcp:{port}:interface=127.0.0.1", *arguments), port


class ListenerTests(unittest.TestCase):
    """C{--metrics-listen}: the metrics of the proxy that the command line builds, on a listener of their own."""

    async def test_served(self) -> None:
        """The proxy's exchanges and upstreams at C{/metrics}; any other path of the listener is 404."""
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        running, port = startWithMetrics(self, "--upstream", upstream.url)
        self.assertEqual(responseStatus(await rawRequest(running.port, get(b"/a"))), 200)
        text = await metricsText(port)
        requests = sampleKey("rproxy_requests_total", service="default", route="", method="GET", code_class="2xx")
        up = sampleKey("rproxy_upstream_health", service="default", upstream=upstream.url, state="up")
        self.assertEqual(samples(text, ["rproxy_requests_total", "rproxy_upstream_health"])[requests], 1)
        self.assertEqual(samples(text, ["rproxy_upstream_health"])[up], 1)
        self.assertEqual((await scrape(port, path=b"/state"))[0], 404)

    def test_address(self) -> None:
        """A TCP endpoint must name its address, as the admin API's must; the option takes endpoints only."""
        for endpoint, error in [
            ("tcp:9902", "--metrics-listen: give the address to listen on, e.g. tcp:9902:interface=127.0.0.1"),
            ("nonsense:1", "--metrics-listen: unknown endpoint type 'nonsense' in 'nonsense:1'"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                Options().parseOptions(["--upstream", "http://127.0.0.1:9000", "--metrics-listen", endpoint])
            self.assertIn(error, str(raised.exception))
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:9000", "--metrics-listen", "unix:/run/rproxy/m.sock"])
        self.assertEqual(options.admin.metricsListen, "unix:/run/rproxy/m.sock")


class PrometheusTests(unittest.TestCase):
    """A real Prometheus scrapes the metrics and answers queries about them."""

    async def test_scraped(self) -> None:
        """
        Prometheus scrapes C{--metrics-listen}; PromQL finds the requests by service and status class, the
        upstream's health and the latency.
        """
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        running, port = startWithMetrics(self, "--upstream", upstream.url)
        prometheus = await startPrometheus(self, [f"127.0.0.1:{port}"])
        for _ in range(3):
            await rawRequest(running.port, get(b"/"))
        result = await prometheus.waitForSeries(
            'rproxy_requests_total{service="default",code_class="2xx"}',
            lambda result: [each["value"][1] for each in result] == ["3"],
        )
        self.assertEqual(result[0]["metric"]["method"], "GET")
        [health] = await prometheus.query('rproxy_upstream_health{state="up"}')
        self.assertEqual((health["metric"]["upstream"], health["value"][1]), (upstream.url, "1"))
        [p50] = await prometheus.query(
            'histogram_quantile(0.5, sum by (le) (rproxy_request_duration_seconds_bucket{service="default"}))'
        )
        self.assertLess(float(p50["value"][1]), 1.0)
        self.assertEqual([target.health for target in await prometheus.targetsHealth()], ["up"])


OBSERVABILITY_MD = os.path.join(ROOT, "docs", "observability.md")

#: Debian's promtool, of the prometheus package C{make test} installs.
PROMTOOL = "/usr/bin/promtool"


def promtool(directory: str, *arguments: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """Run promtool with C{arguments} in C{directory}, for at most 30 seconds: its output, errors and status."""
    running = utils.getProcessOutputAndValue(PROMTOOL, arguments, env={}, path=directory)
    return running.addTimeout(30, reactor)


class DocsTests(unittest.TestCase):
    """docs/observability.md: every metric as served, and a scrape config and alert rules that Prometheus takes."""

    def setUp(self) -> None:
        with open(OBSERVABILITY_MD, encoding="utf-8") as f:
            self.text = f.read()

    async def test_everyMetric(self) -> None:
        """The tables list every metric family served, with its type, and no other."""
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        metrics, served = watched(self, proxy)
        # With a shared store (--etcd, --redis), its reachability too.
        store = StoreHealth("etcd", "http://127.0.0.1:2379", "serving what it knew", reactor)
        metrics.watch(proxy.registry, [proxy.site], proxy.site.resource.proxy.tunnels, [store])  # type: ignore[attr-defined]
        store.unreachable("cannot connect")
        await rawRequest(proxy.port, get(b"/"))
        text = await metricsText(served.port)
        self.assertIn('rproxy_store_up{store="etcd"} 0.0', text)
        self.assertIn('rproxy_store_outages_total{store="etcd"} 1.0', text)
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        documented = dict(re.findall(r"^\| `(rproxy_\w+)` \| (counter|gauge|histogram) \|", self.text, re.M))
        self.assertEqual(documented, types)

    async def test_prometheusFiles(self) -> None:
        """
        The scrape config and the alert rules pass C{promtool check config}; the alerts fire as described
        on series made up for them (C{promtool test rules}).
        """
        configuration, rules = re.findall(r"^```yaml\n(.*?)^```$", self.text, re.M | re.S)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name, content in [("prometheus.yml", configuration), ("rproxy-alerts.yml", rules)]:
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(content)
        out, err, status = await promtool(directory, "check", "config", "prometheus.yml")
        self.assertEqual(status, 0, out + err)
        self.assertIn(b"SUCCESS: 3 rules found", out + err)
        with open(os.path.join(directory, "tests.yml"), "w", encoding="utf-8") as f:
            json.dump(_ruleTests(), f)  # JSON is YAML
        out, err, status = await promtool(directory, "test", "rules", "tests.yml")
        self.assertEqual(status, 0, out + err)


def _ruleTests() -> dict[str, object]:
    """A promtool unit test of the documented alerts: an upstream ejected, a service answering 10% 5xx."""
    where = {"job": "rproxy", "instance": "10.0.0.2:9902", "service": "web"}
    upstream = {**where, "upstream": "http://10.0.0.5:8080"}

    def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
        shown = ",".join(f'{key}="{value}"' for key, value in labels.items())
        return {"series": f"{name}{{{shown}}}", "values": values}

    def alert(at: str, name: str, labels: dict[str, str] | None = None, summary: str = "") -> dict[str, object]:
        expected = [] if labels is None else [{"exp_labels": labels, "exp_annotations": {"summary": summary}}]
        return {"eval_time": at, "alertname": name, "exp_alerts": expected}

    requests = {**where, "route": "", "method": "GET"}
    return {
        "rule_files": ["rproxy-alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("rproxy_upstream_health", {**upstream, "state": "up"}, "1 0 0 0"),
                    series("rproxy_upstream_health", {**upstream, "state": "ejected"}, "0 1 1 1"),
                    series("rproxy_upstream_health", {**upstream, "state": "down"}, "0 0 0 0"),
                    series("rproxy_requests_total", {**requests, "code_class": "2xx"}, "0+9x10"),
                    series("rproxy_requests_total", {**requests, "code_class": "5xx"}, "0+1x10"),
                ],
                "alert_rule_test": [
                    alert("1m", "RproxyUpstreamDown"),  # not for a minute yet
                    alert(
                        "3m",
                        "RproxyUpstreamDown",
                        {**upstream, "state": "ejected", "severity": "warning"},
                        "rproxy: upstream http://10.0.0.5:8080 of service web is ejected",
                    ),
                    alert(
                        "3m",
                        "RproxyServiceUnavailable",
                        {**where, "severity": "critical"},
                        "rproxy: service web has no upstream up on 10.0.0.2:9902",
                    ),
                    alert("4m", "RproxyHighErrorRate"),  # not for five minutes yet
                    alert(
                        "10m",
                        "RproxyHighErrorRate",
                        {"job": "rproxy", "service": "web", "severity": "warning"},
                        "rproxy: 10% of the requests to service web end in 5xx",
                    ),
                ],
            }
        ],
    }


class AdminMetricsTests(unittest.TestCase):
    """The admin listener serves the metrics at /metrics, behind its token."""

    async def test_behindToken(self) -> None:
        from rproxy.test.test_admin import TOKEN, startAdmin

        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        running = startAdmin(self, "--upstream", upstream.url)
        self.assertEqual(responseStatus(await rawRequest(running.port, get(b"/a"))), 200)
        assert running.adminPort is not None
        status, head, _ = await scrape(running.adminPort)
        self.assertEqual(status, 401)
        request = b"GET /metrics HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
        answer = await rawRequest(running.adminPort, request % TOKEN.encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertEqual(responseStatus(head), 200, head)
        key = sampleKey("rproxy_requests_total", service="default", route="", method="GET", code_class="2xx")
        self.assertEqual(samples(body.decode(), ["rproxy_requests_total"])[key], 1)
