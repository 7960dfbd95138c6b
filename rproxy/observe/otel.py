"""
OpenTelemetry spans for each exchange and each of its upstream attempts (the C{otel} extra).

Only L{rproxy.observe.tracing.buildTracing} imports this module, when tracing is asked for: it imports the
OpenTelemetry SDK, which a proxy that does not trace never loads.

Each exchange is a C{SERVER} span, the child of the span of the request's W3C C{traceparent} when it came
with a valid one (its C{tracestate} kept), else the root of a new trace; its trace id is the access log's
C{trace_id}.  Each upstream attempt (a retry is another) is a C{CLIENT} span, child of the C{SERVER} span,
and the attempt is sent with a C{traceparent} naming it as the parent: the upstream's own spans hang under
the attempt that reached it.

How the spans are made: their ids are chosen when the exchange and each attempt start (the sampler decides
then, from the inbound trace context, whether the trace is recorded), what they say is kept in a few plain
attributes, and each span is handed whole to the span processor (batching, then OTLP) as it ends, as the
SDK's own C{ReadableSpan}, with the start and end times the exchange measured: an attempt's when the
exchange lets go of its upstream (response done, failure, retry, the client gone), the exchange's when its
record reaches the observers.  Each is thus ended exactly once, whichever way the exchange ends.  The SDK's
C{Tracer} would make the same spans, live ones, at three times the cost (a lock, checks and copies per
attribute, contexts per span): measured in a proxy under load, its two spans took 76 microseconds of the
reactor thread's CPU per exchange, these 23 (34 under an inbound C{traceparent}; 12 when the sampler leaves
the trace out), where a small proxied request takes about 90.  (The OTLP exporter's encoding, in its own
thread, takes about 30 more per span: docs/observability.md.)  What the C{Tracer} adds and this does not:
span processors' C{on_start} (the processor here is the SDK's batching one, which ignores it) and the span
limits (C{OTEL_SPAN_*}, C{OTEL_ATTRIBUTE_*}: a span here has at most 16 attributes and those a sampler
adds, whose values the request head's limits bound).  An attempt is recorded when its exchange is: the
sampler decides once per exchange.

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
headers, timeout, compression, certificates) and batching (C{OTEL_BSP_*}).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.environment_variables import OTEL_SDK_DISABLED
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
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

#: Why an exchange that ended otherwise than L{DONE} is an error.
_OUTCOMES = {CLIENT_GONE: "the client went away", ABORTED: "the response was cut short"}

#: The fields of W3C Trace Context, replaced in each attempt's request.
_FIELDS = (b"traceparent", b"tracestate")

_propagator = TraceContextTextMapPropagator()
_ids = RandomIdGenerator()
_SCOPE = InstrumentationScope("rproxy", __version__)
_OK = Status(StatusCode.UNSET)

Attributes = dict[str, str | int]


class _HeadersGetter(Getter["Headers"]):
    """Reads the trace context of a request's fields; a C{traceparent} given twice is none at all."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = carrier.getRawHeaders(key.encode("ascii"))
        if values is None or (key == "traceparent" and len(values) != 1):
            return None
        return [value.decode("latin-1") for value in values]

    def keys(self, carrier: Headers) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier.getAllRawHeaders()]


_getter = _HeadersGetter()


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


def _method(method: bytes) -> tuple[str, Attributes]:
    """A request method as span names and C{http.request.method} take it, with the attributes it makes."""
    text = method.decode("latin-1")
    if text in _METHODS:
        return text, {"http.request.method": text}
    return "_OTHER", {"http.request.method": "_OTHER", "http.request.method_original": text}


def _hostAndPort(host: bytes) -> tuple[str, int | None]:
    """The host and the port, if one is given, of a C{Host} value (an IPv6 literal's brackets removed)."""
    text = host.decode("latin-1")
    name, colon, port = text.rpartition(":")
    if not colon or "]" in port or not port.isdigit():
        return text.strip("[]"), None
    return name.strip("[]"), int(port)


def _failed(attributes: Attributes, errorType: str, description: str) -> Status:
    attributes["error.type"] = errorType
    return Status(StatusCode.ERROR, description)


class _Attempt:
    """What is known of an upstream attempt until it ends."""

    __slots__ = ("spanId", "started", "attributes")

    def __init__(self, spanId: int, started: float, attributes: Attributes) -> None:
        self.spanId = spanId
        self.started = started
        self.attributes = attributes


class _ExchangeTrace:
    """
    The spans of one exchange: its C{SERVER} span, and the C{CLIENT} span of its current attempt.

    @ivar context: the exchange's span context.
    @ivar parent: the inbound trace context's, if it came with one.
    """

    __slots__ = ("_tracing", "context", "parent", "_name", "_attributes", "_attempt", "_traceparent", "_tracestate")

    def __init__(
        self,
        tracing: OTelTracing,
        context: SpanContext,
        parent: SpanContext | None,
        name: str,
        attributes: Attributes | None,
    ) -> None:
        self._tracing = tracing
        self.context = context
        self.parent = parent
        self._name = name
        self._attributes = attributes  # None: not recorded
        self._attempt: _Attempt | None = None
        self._traceparent = f"00-{context.trace_id:032x}-%016x-{context.trace_flags:02x}"
        state = context.trace_state
        self._tracestate = state.to_header().encode("latin-1") if state else None

    def attemptStarted(self, upstream: Upstream, target: bytes, outbound: OutboundRequest, at: float) -> None:
        spanId = _ids.generate_span_id()
        outbound.removeFields(_FIELDS)
        outbound.addField(b"traceparent", (self._traceparent % spanId).encode("ascii"))
        if self._tracestate is not None:
            outbound.addField(b"tracestate", self._tracestate)
        attributes = self._attributes
        if attributes is None:
            return
        url = upstream.url
        attempt: Attributes = {
            "http.request.method": self._name,
            "server.address": url.host,
            "server.port": url.port,
            "url.full": f"{url.requestScheme.decode('ascii')}://{url.authority}"
            + redactTarget(target, self._tracing.params).decode("latin-1"),
        }
        if self._name == "_OTHER":
            attempt["http.request.method_original"] = attributes["http.request.method_original"]
        self._attempt = _Attempt(spanId, at, attempt)

    def attemptEnded(self, status: int | None, error: ProxyError | None, at: float, cancelled: bool) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        attributes = attempt.attributes
        if status is not None:
            attributes["http.response.status_code"] = status
        if cancelled:
            outcome = _failed(attributes, "client_gone", "the client went away")
        elif error is not None:
            outcome = _failed(attributes, error.errorType, error.reason)
        elif status is not None and status >= 500:
            outcome = _failed(attributes, str(status), f"the upstream answered {status}")
        else:
            outcome = _OK
        context = self.context
        self._tracing.export(
            self._name,
            SpanContext(context.trace_id, attempt.spanId, False, context.trace_flags, context.trace_state),
            context,
            SpanKind.CLIENT,
            attributes,
            outcome,
            attempt.started,
            at,
        )

    def end(self, record: ExchangeRecord) -> None:
        """End the exchange's span as C{record} says it ended."""
        attributes = self._attributes
        if attributes is None:
            return
        status = record.status
        for name, value in (
            ("http.response.status_code", status),
            ("client.address", record.client),
            ("rproxy.service", record.service),
            ("rproxy.route", record.route),
            ("rproxy.request_id", record.requestId),
        ):
            if value:
                attributes[name] = value
        if record.fault is not None and record.errorType is not None and record.fault != Fault.CLIENT.value:
            outcome = _failed(attributes, record.errorType, record.reason or record.errorType)
        elif record.outcome != DONE:
            outcome = _failed(attributes, record.outcome, _OUTCOMES[record.outcome])
        elif status is not None and status >= 500:
            outcome = _failed(attributes, str(status), f"answered {status}")
        else:
            outcome = _OK
            if record.errorType is not None:
                attributes["error.type"] = record.errorType  # the client's error: the span's status stays unset
        self._tracing.export(
            self._name,
            self.context,
            self.parent,
            SpanKind.SERVER,
            attributes,
            outcome,
            record.started,
            record.started + record.duration,
        )


class OTelTracing:
    """
    The L{ExchangeTracer} of a proxy, and an L{IExchangeObserver} of its site (both are needed: the
    exchange's span ends when its record does).

    @ivar processor: what each span goes to as it ends (the SDK's batching processor, then an exporter).
    @ivar sampler: what decides which traces are recorded.
    @ivar resource: what the spans come from (the C{service.name} and the like).
    @ivar params: the query parameters whose values are redacted (L{rproxy.observe.redact.secretNames}).
    """

    def __init__(
        self,
        processor: SpanProcessor,
        sampler: Sampler,
        resource: Resource,
        params: frozenset[bytes] = SECRET_PARAMS,
    ) -> None:
        self.processor = processor
        self.sampler = sampler
        self.resource = resource
        self.params = params
        self._open: dict[ExchangeRecord, _ExchangeTrace] = {}

    def exchangeStarted(self, record: ExchangeRecord, headers: Headers) -> _ExchangeTrace:
        name, attributes = _method(record.method)
        path, question, query = redactTarget(record.target, self.params).partition(b"?")
        attributes["url.scheme"] = "https" if record.tls is not None else "http"
        attributes["url.path"] = path.decode("latin-1")
        if question:
            attributes["url.query"] = query.decode("latin-1")
        if record.host:
            host, port = _hostAndPort(record.host)
            attributes["server.address"] = host
            if port is not None:
                attributes["server.port"] = port
        attributes["network.protocol.version"] = record.version.removeprefix(b"HTTP/").decode("latin-1")
        if record.peer is not None:
            attributes["network.peer.address"] = record.peer
        agent = headers.getRawHeaders(b"user-agent")
        if agent:
            attributes["user_agent.original"] = agent[0].decode("latin-1")
        inbound: Context | None = None
        parent: SpanContext | None = None
        if headers.hasHeader(b"traceparent"):
            inbound = _propagator.extract(headers, getter=_getter)
            parent = get_current_span(inbound).get_span_context()
            if not parent.is_valid:
                inbound = parent = None
        traceId = parent.trace_id if parent is not None else _ids.generate_trace_id()
        sampling = self.sampler.should_sample(inbound, traceId, name, SpanKind.SERVER, attributes)
        decision = sampling.decision
        context = SpanContext(
            traceId,
            _ids.generate_span_id(),
            False,
            TraceFlags(TraceFlags.SAMPLED if decision.is_sampled() else TraceFlags.DEFAULT),
            sampling.trace_state,
        )
        record.traceId = f"{traceId:032x}"
        if decision.is_recording():
            attributes.update(sampling.attributes)
            trace = self._open[record] = _ExchangeTrace(self, context, parent, name, attributes)
        else:
            trace = _ExchangeTrace(self, context, parent, name, None)
        return trace

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        trace = self._open.pop(record, None)
        if trace is not None:  # else it was not recorded, or not proxied (a local route's)
            trace.end(record)

    def export(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Attributes,
        status: Status,
        started: float,
        ended: float,
    ) -> None:
        """Hand a span that ended, from C{started} to C{ended} (the reactor's times), to L{processor}."""
        span = ReadableSpan(
            name,
            context,
            parent,
            self.resource,
            attributes,
            kind=kind,
            status=status,
            start_time=_nanoseconds(started),
            end_time=_nanoseconds(ended),
            instrumentation_scope=_SCOPE,
        )
        self.processor.on_end(span)

    def close(self, reactor: IReactorThreads) -> Deferred[None]:
        """
        Export the spans not exported yet, within the exporter's timeout, and stop the exporting thread (in
        a thread of C{reactor}'s pool: it blocks); fires when done.
        """
        return deferToThreadPool(reactor, reactor.getThreadPool(), self.processor.shutdown)


def buildOTelTracing(url: str | None = None) -> OTelTracing | None:
    """
    Tracing that exports by OTLP/HTTP to C{url} (L{rproxy.observe.tracing.tracesURL}), or where the
    C{OTEL_EXPORTER_OTLP_*} variables say, sampled as C{OTEL_TRACES_SAMPLER} says; the resource named
    C{rproxy} unless C{OTEL_SERVICE_NAME} or C{OTEL_RESOURCE_ATTRIBUTES} name it; C{None} when
    C{OTEL_SDK_DISABLED} is C{true}.
    """
    if os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        _log.info("tracing is off: OTEL_SDK_DISABLED is true")
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "rproxy"}))
    sampler = TracerProvider(resource=resource, shutdown_on_exit=False).sampler  # the one the variables choose
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=url))
    _log.info("tracing: spans exported by OTLP/HTTP to {url}", url=url or "the OTEL_EXPORTER_OTLP_* endpoint")
    return OTelTracing(processor, sampler, resource)
