"""
OpenTelemetry spans for each exchange and each of its upstream attempts (the C{otel} extra).

Only L{rproxy.observe.tracing.buildTracing} imports this module, when tracing is asked for: it imports the
OpenTelemetry SDK, which a proxy that does not trace never loads.

Each exchange is a C{SERVER} span, the child of the span of the request's W3C C{traceparent} when it came
with a valid one (its C{tracestate} kept), else the root of a new trace; its trace id is the access log's
C{trace_id}.  Each upstream attempt (a retry is another) is a C{CLIENT} span, child of the C{SERVER} span,
and the attempt is sent with a C{traceparent} naming it as the parent: the upstream's own spans hang under
the attempt that reached it.

A span is started when what it stands for starts and ended when that ends, with the reactor's times
(L{ExchangeRecord.started}, the attempt's start and end), exactly once whichever way the exchange ends: an
attempt when L{rproxy.proxy.exchange.Exchange} lets go of its upstream (response done, failure, retry, the
client gone), the exchange when its record reaches the observers.  (A span cannot be made after the fact
with an id chosen earlier, which the C{traceparent} sent upstream needs: the SDK picks ids itself.)

Attributes follow OpenTelemetry's HTTP semantic conventions: C{http.request.method}, C{url.scheme},
C{url.path} and C{url.query} (secret query parameters redacted, L{rproxy.observe.redact}),
C{server.address}, C{server.port}, C{network.protocol.version}, C{client.address},
C{http.response.status_code}, C{error.type}; C{url.full} on attempts; C{rproxy.service},
C{rproxy.route} and C{rproxy.request_id} on the exchange.  A span's status is an error on a 5xx, an error
the proxy or an upstream caused, a response cut short, or a client gone; C{error.type} then says which
(the RFC 9209 error type when the proxy has one).  A 4xx is an answer the proxy relays, not its error.

Spans are exported by OTLP over HTTP (protobuf) from the SDK's batching thread, never from the reactor's.
The SDK's C{OTEL_*} variables apply: sampling (C{OTEL_TRACES_SAMPLER}; the default follows the inbound
C{traceparent}'s sampled flag, and samples new traces), the resource (C{OTEL_SERVICE_NAME},
C{rproxy} by default, C{OTEL_RESOURCE_ATTRIBUTES}), the exporter (C{OTEL_EXPORTER_OTLP_*}: endpoint,
headers, timeout, compression, certificates), batching (C{OTEL_BSP_*}) and limits (C{OTEL_SPAN_*}).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.environment_variables import OTEL_SDK_DISABLED
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, format_trace_id, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from rproxy import __version__
from rproxy.errors import Fault
from rproxy.observe.record import ABORTED, CLIENT_GONE, DONE, ExchangeRecord
from rproxy.observe.redact import SECRET_PARAMS, redactTarget

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

    from rproxy.errors import ProxyError
    from rproxy.proxy.message import OutboundRequest
    from rproxy.upstream.upstreams import Upstream

__all__ = ["OTelTracing", "buildOTelTracing"]

_log = Logger()

#: The methods the semantic conventions name; any other is C{_OTHER} (the method is then an attribute of
#: its own), so that a client cannot make span names of its choosing.
_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"},
)

#: OTLP/HTTP's path for traces, added to a collector's URL that has no path.
_TRACES_PATH = "/v1/traces"

#: Why an exchange that ended otherwise than L{DONE} is an error.
_OUTCOMES = {CLIENT_GONE: "the client went away", ABORTED: "the response was cut short"}

_propagator = TraceContextTextMapPropagator()
_FIELDS = tuple(name.encode("ascii") for name in _propagator.fields)


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


class _HeadersGetter(Getter["Headers"]):
    """Reads the trace context of a request's fields; a C{traceparent} given twice is none at all."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = carrier.getRawHeaders(key.encode("ascii"))
        if values is None or (key == "traceparent" and len(values) != 1):
            return None
        return [value.decode("latin-1") for value in values]

    def keys(self, carrier: Headers) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier.getAllRawHeaders()]


class _OutboundSetter(Setter["OutboundRequest"]):
    """Writes the trace context of an attempt into the request sent upstream."""

    def set(self, carrier: OutboundRequest, key: str, value: str) -> None:
        carrier.addField(key.encode("ascii"), value.encode("latin-1"))


_getter, _setter = _HeadersGetter(), _OutboundSetter()


def _method(method: bytes) -> tuple[str, dict[str, str]]:
    """A request method as span names and C{http.request.method} take it, and the attributes it adds."""
    text = method.decode("latin-1")
    if text in _METHODS:
        return text, {}
    return "_OTHER", {"http.request.method_original": text}


def _hostAndPort(host: bytes) -> tuple[str, int | None]:
    """The host and the port, if one is given, of a C{Host} value (an IPv6 literal's brackets removed)."""
    text = host.decode("latin-1")
    name, colon, port = text.rpartition(":")
    if not colon or "]" in port or not port.isdigit():
        return text.strip("[]"), None
    return name.strip("[]"), int(port)


def _failed(span: Span, errorType: str, description: str) -> None:
    span.set_attribute("error.type", errorType)
    span.set_status(Status(StatusCode.ERROR, description))


class _ExchangeTrace:
    """
    The spans of one exchange: its C{SERVER} span, and the C{CLIENT} span of its current attempt.

    @ivar span: the exchange's span.
    """

    _attempt: Span | None = None
    _parent: Context | None = None

    def __init__(self, tracing: OTelTracing, span: Span, method: str, methodAttributes: dict[str, str]) -> None:
        self._tracing = tracing
        self.span = span
        self._method = method
        self._methodAttributes = methodAttributes

    def attemptStarted(self, upstream: Upstream, target: bytes, outbound: OutboundRequest, at: float) -> None:
        url = upstream.url
        parent = self._parent
        if parent is None:
            parent = self._parent = set_span_in_context(self.span)
        attempt = self._attempt = self._tracing.tracer.start_span(
            self._method,
            parent,
            SpanKind.CLIENT,
            {
                "http.request.method": self._method,
                **self._methodAttributes,
                "server.address": url.host,
                "server.port": url.port,
                "url.full": f"{url.requestScheme.decode('ascii')}://{url.authority}"
                + redactTarget(target, self._tracing.params).decode("latin-1"),
            },
            start_time=_nanoseconds(at),
        )
        outbound.removeFields(_FIELDS)
        _propagator.inject(outbound, set_span_in_context(attempt), _setter)

    def attemptEnded(self, status: int | None, error: ProxyError | None, at: float, cancelled: bool) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        if status is not None:
            attempt.set_attribute("http.response.status_code", status)
        if cancelled:
            _failed(attempt, "client_gone", "the client went away")
        elif error is not None:
            _failed(attempt, error.errorType, error.reason)
        elif status is not None and status >= 500:
            _failed(attempt, str(status), f"the upstream answered {status}")
        attempt.end(_nanoseconds(at))

    def end(self, record: ExchangeRecord) -> None:
        """End the exchange's span as C{record} says it ended."""
        span = self.span
        status = record.status
        attributes: dict[str, str | int] = {
            "http.request.body.size": record.bytesIn,
            "http.response.body.size": record.bytesOut,
        }
        for name, value in (
            ("http.response.status_code", status),
            ("client.address", record.client),
            ("rproxy.service", record.service),
            ("rproxy.route", record.route),
            ("rproxy.request_id", record.requestId),
        ):
            if value:
                attributes[name] = value
        span.set_attributes(attributes)
        if record.fault is not None and record.errorType is not None and record.fault != Fault.CLIENT.value:
            _failed(span, record.errorType, record.reason or record.errorType)
        elif record.outcome != DONE:
            _failed(span, record.outcome, _OUTCOMES[record.outcome])
        elif status is not None and status >= 500:
            _failed(span, str(status), f"answered {status}")
        elif record.errorType is not None:
            span.set_attribute("error.type", record.errorType)  # the client's error: the span's status stays unset
        span.end(_nanoseconds(record.started + record.duration))


class OTelTracing:
    """
    The L{ExchangeTracer} of a proxy, and an L{IExchangeObserver} of its site (both are needed: the
    exchange's span ends when its record does).

    @ivar tracer: the OpenTelemetry tracer the spans come from.
    @ivar params: the query parameters whose values are redacted (L{rproxy.observe.redact.secretNames}).
    """

    def __init__(self, provider: TracerProvider, params: frozenset[bytes] = SECRET_PARAMS) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("rproxy", __version__)
        self.params = params
        self._open: dict[ExchangeRecord, _ExchangeTrace] = {}

    def exchangeStarted(self, record: ExchangeRecord, headers: Headers) -> _ExchangeTrace:
        method, methodAttributes = _method(record.method)
        path, question, query = redactTarget(record.target, self.params).partition(b"?")
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            **methodAttributes,
            "url.scheme": "https" if record.tls is not None else "http",
            "url.path": path.decode("latin-1"),
            "network.protocol.version": record.version.removeprefix(b"HTTP/").decode("latin-1"),
        }
        if question:
            attributes["url.query"] = query.decode("latin-1")
        if record.host:
            host, port = _hostAndPort(record.host)
            attributes["server.address"] = host
            if port is not None:
                attributes["server.port"] = port
        if record.peer is not None:
            attributes["network.peer.address"] = record.peer
        agent = headers.getRawHeaders(b"user-agent")
        if agent:
            attributes["user_agent.original"] = agent[0].decode("latin-1")
        span = self.tracer.start_span(
            method,
            _propagator.extract(headers, getter=_getter),
            SpanKind.SERVER,
            attributes,
            start_time=_nanoseconds(record.started),
        )
        record.traceId = format_trace_id(span.get_span_context().trace_id)
        trace = self._open[record] = _ExchangeTrace(self, span, method, methodAttributes)
        return trace

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        trace = self._open.pop(record, None)
        if trace is not None:  # else it was not proxied (a local route's)
            trace.end(record)

    def close(self, reactor: IReactorThreads) -> Deferred[None]:
        """
        Export the spans not exported yet, within the exporter's timeout, and stop the exporting thread (in
        a thread of C{reactor}'s pool: it blocks); fires when done.
        """
        return deferToThreadPool(reactor, reactor.getThreadPool(), self.provider.shutdown)


def tracesURL(endpoint: str) -> str:
    """
    The OTLP/HTTP URL of traces for a collector at C{endpoint}: C{/v1/traces} added when it has no path,
    C{endpoint} itself when it has one.

    @raise ValueError: when C{endpoint} is not an http or https URL with a host.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an OTLP endpoint is an http or https URL, such as http://collector:4318, not {endpoint!r}")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + _TRACES_PATH
    return endpoint


def buildOTelTracing(endpoint: str | None = None) -> OTelTracing | None:
    """
    Tracing that exports by OTLP/HTTP to C{endpoint} (L{tracesURL}), or where the C{OTEL_EXPORTER_OTLP_*}
    variables say; the resource named C{rproxy} unless C{OTEL_SERVICE_NAME} or C{OTEL_RESOURCE_ATTRIBUTES}
    name it; C{None} when C{OTEL_SDK_DISABLED} is C{true}.
    """
    url = tracesURL(endpoint) if endpoint is not None else None
    if os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        _log.info("tracing is off: OTEL_SDK_DISABLED is true")
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "rproxy"}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # closed by the service, off the reactor
    exporter = OTLPSpanExporter(endpoint=url)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _log.info("tracing: spans exported by OTLP/HTTP to {url}", url=url or "the OTEL_EXPORTER_OTLP_* endpoint")
    return OTelTracing(provider)
