"""
OpenTelemetry spans through a real proxy (L{rproxy.observe.otel}): the exchange's C{SERVER} span under the
client's trace context, one C{CLIENT} span per upstream attempt named as the parent in the C{traceparent}
the upstream receives, errors, clients gone, redaction, export by OTLP/HTTP to a collector on 127.0.0.1;
and a proxy that does not trace imports no C{opentelemetry} at all.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from twisted.internet import reactor, utils
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.server import Request

import rproxy
from rproxy.errors import clientError
from rproxy.observe.accesslog import recordFields
from rproxy.observe.otel import OTelTracing, buildOTelTracing
from rproxy.observe.tracing import buildTracing, tracesURL
from rproxy.test.support import (
    PYTHON,
    ReceivedRequest,
    ScriptedUpstream,
    curl,
    rawRequest,
    startProxy,
    startUpstream,
    useFilters,
    waitFor,
)
from rproxy.test.test_filter_chain import Step
from rproxy.test.test_observe_record import Recorder

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
FAILED = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01".encode()


def get(target: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: shop.example:8080\r\nConnection: close\r\n" + extra + b"\r\n"


def spanId(span: ReadableSpan) -> str:
    return format_span_id(span.context.span_id)


def parentId(span: ReadableSpan) -> str | None:
    return format_span_id(span.parent.span_id) if span.parent is not None else None


def traceparentOf(span: ReadableSpan) -> bytes:
    """The traceparent naming C{span} as the parent, without its flags."""
    return f"00-{format_trace_id(span.context.trace_id)}-{spanId(span)}".encode()


class TracedProxy:
    """A proxy in front of a L{ScriptedUpstream}, tracing into memory, its records kept."""

    def __init__(
        self, testCase: unittest.TestCase, respond: Callable[..., bytes], *arguments: str, route: str | None = None
    ) -> None:
        """
        @param route: the name of a config file's one route to the upstream (C{None}: the upstream is the
            default service, without a config file).
        """
        self.upstream = ScriptedUpstream(testCase, respond)
        if route is None:
            self.proxy = startProxy(testCase, [self.upstream.url], *arguments)
        else:
            config = testCase.mktemp()
            with open(config, "w", encoding="utf-8") as f:
                f.write(f'[services.shop]\nupstreams = ["{self.upstream.url}"]\n')
                f.write(f'[[routes]]\nname = "{route}"\nservice = "shop"\n')
            self.proxy = startProxy(testCase, [], "--config", config, *arguments)
        self.exporter = InMemorySpanExporter()
        self.tracing = OTelTracing(SimpleSpanProcessor(self.exporter), ParentBased(ALWAYS_ON), Resource.create())
        self.proxy.site.resource.proxy.tracer = self.tracing
        self.recorder = Recorder()
        self.proxy.site.observers += [self.tracing, self.recorder]

    def spans(self) -> tuple[ReadableSpan, list[ReadableSpan]]:
        """The one exchange's C{SERVER} span and its C{CLIENT} spans, in the order they started."""
        spans = self.exporter.get_finished_spans()
        [exchange] = [span for span in spans if span.kind is SpanKind.SERVER]
        attempts = sorted((span for span in spans if span.kind is SpanKind.CLIENT), key=lambda s: s.start_time or 0)
        self.exporter.clear()
        return exchange, attempts


def nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


class SpanTests(unittest.TestCase):
    async def test_childOfInbound(self) -> None:
        """
        A request with a traceparent: the exchange is its child (its tracestate kept), the attempt the
        exchange's, and the upstream is sent the attempt as its parent; attributes and times as recorded.
        """
        traced = TracedProxy(self, lambda proto, request: OK)
        head = await rawRequest(
            traced.proxy.port, get(b"/a/b?q=1", b"traceparent: " + TRACEPARENT + b"\r\ntracestate: vendor=1\r\n")
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        exchange, [attempt] = traced.spans()
        [record] = traced.recorder.records
        self.assertEqual((format_trace_id(exchange.context.trace_id), parentId(exchange)), (TRACE, PARENT))
        self.assertEqual(exchange.context.trace_state.to_header(), "vendor=1")
        self.assertEqual((attempt.context.trace_id, parentId(attempt)), (exchange.context.trace_id, spanId(exchange)))
        [received] = traced.upstream.requests
        [sent] = received.headers(b"traceparent")
        self.assertEqual(sent[:-3], traceparentOf(attempt))
        self.assertEqual(int(sent[-2:], 16) & 1, 1, "sampled")
        self.assertEqual(received.headers(b"tracestate"), [b"vendor=1"])
        self.assertEqual(record.traceId, TRACE)
        self.assertEqual(exchange.name, "GET")
        self.assertEqual(
            dict(exchange.attributes or {}),
            {
                "http.request.method": "GET",
                "url.scheme": "http",
                "url.path": "/a/b",
                "url.query": "q=1",
                "server.address": "shop.example",
                "server.port": 8080,
                "network.protocol.version": "1.1",
                "network.peer.address": "127.0.0.1",
                "client.address": "127.0.0.1",
                "http.response.status_code": 200,
                "rproxy.service": "default",
                "rproxy.request_id": record.requestId,
            },
        )
        self.assertEqual(
            dict(attempt.attributes or {}),
            {
                "http.request.method": "GET",
                "server.address": "127.0.0.1",
                "server.port": traced.upstream.port,
                "url.full": f"{traced.upstream.url}/a/b?q=1",
                "http.response.status_code": 200,
            },
        )
        for span in (exchange, attempt):
            self.assertIs(span.status.status_code, StatusCode.UNSET)
        self.assertEqual(exchange.start_time, nanoseconds(record.started))
        self.assertEqual(exchange.end_time, nanoseconds(record.started + record.duration))
        assert attempt.start_time is not None and attempt.end_time is not None and exchange.end_time is not None
        self.assertLessEqual(exchange.start_time, attempt.start_time)
        self.assertLessEqual(attempt.start_time, attempt.end_time)
        self.assertLessEqual(attempt.end_time, exchange.end_time)

    async def test_notSampled(self) -> None:
        """
        A trace its client did not sample is not recorded: no span, and the upstream gets the trace, unsampled,
        with the attempt's span id as the parent all the same.
        """
        traced = TracedProxy(self, lambda proto, request: OK)
        await rawRequest(traced.proxy.port, get(extra=b"traceparent: " + TRACEPARENT[:-2] + b"00\r\n"))
        self.assertEqual(traced.exporter.get_finished_spans(), ())
        self.assertEqual(traced.tracing._open, {})
        [sent] = traced.upstream.requests[0].headers(b"traceparent")
        self.assertRegex(sent, rb"00-" + TRACE.encode() + rb"-[0-9a-f]{16}-00\Z")
        self.assertNotEqual(sent[36:52], PARENT.encode())
        self.assertEqual(traced.recorder.records[0].traceId, TRACE)

    async def test_otherMethod(self) -> None:
        """A method the conventions do not name is _OTHER, as the span name too, the method an attribute."""
        traced = TracedProxy(self, lambda proto, request: OK)
        await rawRequest(traced.proxy.port, b"PURGE /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        exchange, [attempt] = traced.spans()
        for span in (exchange, attempt):
            self.assertEqual(span.name, "_OTHER")
            attributes = span.attributes or {}
            self.assertEqual(attributes["http.request.method"], "_OTHER")
            self.assertEqual(attributes["http.request.method_original"], "PURGE")

    async def test_newTrace(self) -> None:
        """
        Without a (valid) traceparent, the exchange starts a trace: its id is the access log's, and the
        client's tracestate does not go on with it.  Over HTTP/2, the protocol version says so.
        """
        traced = TracedProxy(self, lambda proto, request: OK)
        await rawRequest(traced.proxy.port, get(extra=b"traceparent: 00-xyz\r\ntracestate: vendor=1\r\n"))
        spans = [traced.spans()]
        code, _, err = await curl(["-s", "--http2-prior-knowledge", f"http://127.0.0.1:{traced.proxy.port}/"])
        self.assertEqual(code, 0, err)
        spans.append(traced.spans())
        for (exchange, [attempt]), received, record in zip(
            spans, traced.upstream.requests, traced.recorder.records, strict=True
        ):
            self.assertIsNone(exchange.parent)
            self.assertEqual(format_trace_id(exchange.context.trace_id), record.traceId)
            self.assertEqual(recordFields(record)["trace_id"], record.traceId)
            self.assertEqual(received.headers(b"traceparent")[0][:-3], traceparentOf(attempt))
            self.assertEqual(received.headers(b"tracestate"), [])
        versions = [(exchange.attributes or {})["network.protocol.version"] for exchange, _ in spans]
        self.assertEqual(versions, ["1.1", "2"])
        self.assertNotEqual(traced.recorder.records[0].traceId, traced.recorder.records[1].traceId)

    async def test_retry(self) -> None:
        """A retried request: one span per attempt, each sent upstream as the parent of its own request."""
        received: list[ReceivedRequest] = []

        def respond(proto: object, request: ReceivedRequest) -> bytes:
            received.append(request)
            return UNAVAILABLE if len(received) == 1 else OK  # whichever upstream is tried first

        other = ScriptedUpstream(self, respond)
        traced = TracedProxy(self, respond, "--upstream", other.url, "--retry-on-status", "503")
        head = await rawRequest(traced.proxy.port, get())
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        exchange, [first, second] = traced.spans()
        for attempt, request in zip((first, second), received, strict=True):
            self.assertEqual(parentId(attempt), spanId(exchange))
            self.assertEqual(request.headers(b"traceparent")[0][:-3], traceparentOf(attempt))
        self.assertEqual(first.attributes["http.response.status_code"], 503)  # type: ignore[index]
        self.assertEqual(first.attributes["error.type"], "http_response_status")  # type: ignore[index]
        self.assertIs(first.status.status_code, StatusCode.ERROR)
        self.assertIs(second.status.status_code, StatusCode.UNSET)
        self.assertIs(exchange.status.status_code, StatusCode.UNSET)
        assert first.end_time is not None and second.start_time is not None
        self.assertLessEqual(first.end_time, second.start_time)

    async def test_errors(self) -> None:
        """
        An upstream's 500, a response cut short and an upstream down are errors with their type; a
        request the proxy refuses as the client's fault has its type, and no error status.
        """
        bodies = {b"/500": FAILED, b"/cut": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab"}

        def respond(proto: object, request: ReceivedRequest) -> bytes:
            answer = bodies[request.requestLine.split()[1]]
            if answer.endswith(b"ab"):
                reactor.callLater(0.05, proto.transport.loseConnection)  # type: ignore[attr-defined]
            return answer

        traced = TracedProxy(self, respond, "--max-body-size", "10")
        await rawRequest(traced.proxy.port, get(b"/500"))
        exchange, [attempt] = traced.spans()
        for span in (exchange, attempt):
            self.assertEqual((span.attributes or {})["error.type"], "500")
            self.assertIs(span.status.status_code, StatusCode.ERROR)
        await rawRequest(traced.proxy.port, get(b"/cut"))
        exchange, [attempt] = traced.spans()
        self.assertEqual((attempt.attributes or {})["http.response.status_code"], 200)
        for span in (exchange, attempt):
            self.assertIs(span.status.status_code, StatusCode.ERROR)
            self.assertEqual((span.attributes or {})["error.type"], "http_response_incomplete")
        tooLarge = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\nConnection: close\r\n\r\n"
        await rawRequest(traced.proxy.port, tooLarge)
        self.assertEqual(traced.exporter.get_finished_spans(), (), "refused before the exchange started")
        await traced.upstream.listening.listener.stopListening()
        head = await rawRequest(traced.proxy.port, get())
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        exchange, [attempt] = traced.spans()
        for span in (exchange, attempt):
            self.assertEqual((span.attributes or {})["error.type"], "connection_refused")
            self.assertIs(span.status.status_code, StatusCode.ERROR)
        self.assertEqual((exchange.attributes or {})["http.response.status_code"], 502)

    async def test_clientError(self) -> None:
        """A filter's refusal has its type but not an error status: a 4xx is not the proxy's error."""
        traced = TracedProxy(self, lambda proto, request: OK)
        useFilters(traced.proxy, Step(b"f", [], lambda context: clientError(401, "no")))
        head = await rawRequest(traced.proxy.port, get())
        self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
        exchange, attempts = traced.spans()
        self.assertEqual(attempts, [])
        self.assertEqual((exchange.attributes or {})["error.type"], "http_request_error")
        self.assertEqual((exchange.attributes or {})["http.response.status_code"], 401)
        self.assertIs(exchange.status.status_code, StatusCode.UNSET)

    async def test_clientGone(self) -> None:
        """A client that goes away while the upstream thinks: both spans end, saying so."""
        traced = TracedProxy(self, lambda proto, request: b"")
        pending = rawRequest(traced.proxy.port, get(), timeout=0.3)
        self.assertTrue(await waitFor(lambda: traced.upstream.requests))
        await pending
        self.assertTrue(await waitFor(lambda: traced.recorder.records))
        exchange, [attempt] = traced.spans()
        for span in (exchange, attempt):
            self.assertEqual((span.attributes or {})["error.type"], "client_gone")
            self.assertIs(span.status.status_code, StatusCode.ERROR)
            self.assertIsNotNone(span.end_time)
        self.assertNotIn("http.response.status_code", exchange.attributes or {})
        self.assertEqual(traced.tracing._open, {}, "nothing held")

    async def test_secretsRedacted(self) -> None:
        """No span holds a secret query parameter's value; the upstream gets the target as it came."""
        traced = TracedProxy(self, lambda proto, request: OK)
        await rawRequest(traced.proxy.port, get(b"/cb?access_token=s3cret&x=1"))
        exchange, [attempt] = traced.spans()
        self.assertEqual((exchange.attributes or {})["url.query"], "access_token=[redacted]&x=1")
        self.assertEqual(
            (attempt.attributes or {})["url.full"], f"{traced.upstream.url}/cb?access_token=[redacted]&x=1"
        )
        for span in (exchange, attempt):
            self.assertNotIn("s3cret", span.to_json())
        self.assertEqual(traced.upstream.requests[0].requestLine, b"GET /cb?access_token=s3cret&x=1 HTTP/1.1")


class _Collector(resource.Resource):
    """An OTLP/HTTP collector: keeps the spans posted to /v1/traces."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ExportTraceServiceRequest] = []

    def render_POST(self, request: Request) -> bytes:
        if request.path != b"/v1/traces" or request.getHeader(b"content-type") != b"application/x-protobuf":
            request.setResponseCode(404)
            return b""
        export = ExportTraceServiceRequest()
        export.ParseFromString(request.content.read())
        self.requests.append(export)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()  # type: ignore[no-any-return]


class ExportTests(unittest.TestCase):
    async def test_otlpHttp(self) -> None:
        """Spans reach a collector by OTLP/HTTP, from the exporter's thread, when tracing closes."""
        collector = _Collector()
        listening = startUpstream(self, server.Site(collector))
        tracing = buildTracing(listening.url)
        assert tracing is not None
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        proxy.site.resource.proxy.tracer = tracing
        proxy.site.observers.append(tracing)
        await rawRequest(proxy.port, get())
        closed = tracing.close(reactor)
        self.assertTrue(await waitFor(lambda: closed.called, timeout=8), "the export did not end in time")
        spans = [
            (span.name, span.kind, scope.scope.name)
            for export in collector.requests
            for batch in export.resource_spans
            for scope in batch.scope_spans
            for span in scope.spans
        ]
        self.assertEqual(sorted(spans), [("GET", 2, "rproxy"), ("GET", 3, "rproxy")])  # SERVER, CLIENT
        [batch] = collector.requests[0].resource_spans
        names = {a.key: a.value.string_value for a in batch.resource.attributes}
        self.assertEqual(names["service.name"], os.environ.get("OTEL_SERVICE_NAME", "rproxy"))

    def test_endpoints(self) -> None:
        """A collector's URL gets OTLP's traces path unless it has a path; other URLs are refused."""
        self.assertEqual(tracesURL("http://collector:4318"), "http://collector:4318/v1/traces")
        self.assertEqual(tracesURL("https://collector:4318/"), "https://collector:4318/v1/traces")
        self.assertEqual(tracesURL("http://c/otlp/v1/traces"), "http://c/otlp/v1/traces")
        for bad in ("collector:4318", "grpc://c:4317", "http://"):
            self.assertRaises(ValueError, tracesURL, bad)

    def test_sdkDisabled(self) -> None:
        """OTEL_SDK_DISABLED=true turns tracing off (the exchange then does W3C trace context alone)."""
        self.patch(os, "environ", {**os.environ, "OTEL_SDK_DISABLED": "true"})
        self.assertIsNone(buildOTelTracing("http://127.0.0.1:1"))


#: Imports every module of rproxy but the OpenTelemetry one, builds a proxy's services, then asks for
#: tracing, with every import of opentelemetry refused and written down.
_WITHOUT_OPENTELEMETRY = """
import importlib, pkgutil, sys

attempts = []


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "opentelemetry":
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Refuse())
import rproxy

for module in pkgutil.walk_packages(rproxy.__path__, "rproxy."):
    if not module.name.startswith("rproxy.test") and module.name != "rproxy.observe.otel":
        importlib.import_module(module.name)
from twisted.internet import reactor
from rproxy.app.tap import Options, buildService

options = Options()
arguments = ["--listen", "tcp:0:interface=127.0.0.1", "--upstream", "http://127.0.0.1:1", "--access-log", "off"]
options.parseOptions(arguments)
buildService(options.config, reactor)
print("attempts:", attempts)
from rproxy.observe.tracing import TracingUnavailableError, buildTracing

try:
    buildTracing()
except TracingUnavailableError as e:
    print("refused:", e)
"""


class WithoutOpenTelemetryTests(unittest.TestCase):
    async def test_noImport(self) -> None:
        """rproxy imports, and builds a proxy, without opentelemetry; asking for tracing says what to install."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(rproxy.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
        out, err, code = await utils.getProcessOutputAndValue(PYTHON, ["-c", _WITHOUT_OPENTELEMETRY], env=env)
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0], "attempts: []")
        self.assertEqual(
            lines[1],
            "refused: tracing needs the otel extra (pip install 'rproxy[otel]'): opentelemetry is missing",
        )


OBSERVABILITY_MD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(rproxy.__file__))), "docs", "observability.md"
)
_SPANS = {"exchange": SpanKind.SERVER, "attempt": SpanKind.CLIENT}


class DocsTests(unittest.TestCase):
    async def test_attributes(self) -> None:
        """docs/observability.md's table lists every attribute the spans have, with the spans that have it."""
        with open(OBSERVABILITY_MD, encoding="utf-8") as f:
            rows = re.findall(r"^\| `([a-z_.]+)` \| (both|exchange|attempt) \|", f.read(), re.M)
        documented = {(name, kind) for name, where in rows for span, kind in _SPANS.items() if where in (span, "both")}
        traced = TracedProxy(self, lambda proto, request: FAILED if b"/500" in request.requestLine else OK, route="all")
        inbound = b"traceparent: " + TRACEPARENT + b"\r\nUser-Agent: test\r\n"
        await rawRequest(traced.proxy.port, get(b"/a?q=1", inbound))
        await rawRequest(traced.proxy.port, b"PURGE /500 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        seen = {(name, span.kind) for span in traced.exporter.get_finished_spans() for name in span.attributes or {}}
        self.assertEqual(seen, documented)
        self.assertEqual(traced.recorder.records[0].route, "all")


class CommandLineTests(unittest.TestCase):
    async def test_otelEndpoint(self) -> None:
        """C{--otel-endpoint URL}: the proxy twist builds traces its exchanges, exported there as it stops."""
        from rproxy.test.test_admin import startService

        collector = _Collector()
        listening = startUpstream(self, server.Site(collector))
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        running = startService(self, "--upstream", upstream.url, "--otel-endpoint", listening.url)
        await rawRequest(running.port, get())
        await running.top.stopService()
        self.assertTrue(await waitFor(lambda: collector.requests, timeout=8), "nothing was exported")

    def test_badEndpoint(self) -> None:
        from twisted.python.usage import UsageError

        from rproxy.app.tap import Options

        error = self.assertRaises(
            UsageError, Options().parseOptions, ["--upstream", "http://h", "--otel-endpoint", "ftp://x"]
        )
        self.assertIn("--otel-endpoint: ", str(error))
