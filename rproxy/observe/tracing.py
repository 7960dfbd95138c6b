"""
Tracing's contract with the exchange, and the way to turn it on without paying for it when it is off.

An exchange asks its proxy's L{ExchangeTracer}, if it has one, for an L{ExchangeTrace} as it starts, tells
the trace when each upstream attempt starts and ends, and lets the trace write the trace context each
attempt is sent with.  Without a tracer, the exchange forwards or starts W3C trace context itself
(L{rproxy.observe.requestid.traceContext}), at no further cost.

The one tracer rproxy has is OpenTelemetry's (L{rproxy.observe.otel}), an optional extra (C{pip install
'rproxy[otel]'}): L{buildTracing} imports it only when tracing is asked for, so a proxy that does not
trace never imports C{opentelemetry}, installed or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

    from rproxy.errors import ProxyError
    from rproxy.observe.otel import OTelTracing
    from rproxy.observe.record import ExchangeRecord
    from rproxy.proxy.message import OutboundRequest
    from rproxy.upstream.upstreams import Upstream

__all__ = ["ExchangeTrace", "ExchangeTracer", "TracingUnavailableError", "buildTracing", "tracesURL"]

#: OTLP/HTTP's path for traces, added to a collector's URL that has no path.
_TRACES_PATH = "/v1/traces"


class ExchangeTrace(Protocol):
    """The trace of one exchange: its upstream attempts, one at a time."""

    def attemptStarted(self, upstream: Upstream, target: bytes, outbound: OutboundRequest, at: float) -> None:
        """
        An attempt at C{upstream} starts (before its connection is asked for): put in C{outbound} the
        trace context it is to be sent with.

        @param target: the request-target it is sent with (the upstream's base path included).
        @param at: the reactor's time.
        """

    def attemptEnded(self, status: int | None, error: ProxyError | None, at: float, cancelled: bool) -> None:
        """
        The current attempt is over (its response ended, it failed, or it was given up).

        @param status: the response status it got, if its head arrived.
        @param error: what it failed with, if it did.
        @param cancelled: whether it was given up because the client went away.
        """


class ExchangeTracer(Protocol):
    """What traces a proxy's exchanges (L{rproxy.proxy.exchange.Proxy.tracer})."""

    def exchangeStarted(self, record: ExchangeRecord, headers: Headers) -> ExchangeTrace:
        """
        An exchange whose request came with C{headers} starts: its trace, whose id goes into
        C{record.traceId}.  The tracer sees the record again as an L{IExchangeObserver} when it ends.
        """


class TracingUnavailableError(Exception):
    """Tracing was asked for, but the C{otel} extra is not installed."""


def tracesURL(endpoint: str) -> str:
    """
    The OTLP/HTTP URL of traces for a collector at C{endpoint}: C{/v1/traces} added when it has no path,
    C{endpoint} itself when it has one.  (A configuration checks an endpoint with it, extra or not.)

    @raise ValueError: when C{endpoint} is not an http or https URL with a host.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an OTLP endpoint is an http or https URL, such as http://collector:4318, not {endpoint!r}")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + _TRACES_PATH
    return endpoint


def buildTracing(endpoint: str | None = None) -> OTelTracing | None:
    """
    An OpenTelemetry tracer exporting spans by OTLP/HTTP in a thread of its own, configured as
    L{rproxy.observe.otel.buildOTelTracing} says; C{None} when the C{OTEL_SDK_DISABLED} variable turns the
    SDK off.

    @param endpoint: the collector's URL (L{tracesURL}), or C{None} for the C{OTEL_EXPORTER_OTLP_*}
        variables' (or the SDK's default, C{http://localhost:4318/v1/traces}).
    @raise TracingUnavailableError: when the OpenTelemetry SDK or its OTLP exporter is not installed.
    @raise ValueError: when C{endpoint} is not an http or https URL.
    """
    url = tracesURL(endpoint) if endpoint is not None else None
    try:
        from rproxy.observe.otel import buildOTelTracing
    except ImportError as e:
        raise TracingUnavailableError(
            f"tracing needs the otel extra (pip install 'rproxy[otel]'): {e.name or 'opentelemetry'} is missing"
        ) from e
    return buildOTelTracing(url)
