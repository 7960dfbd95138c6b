"""
The access log: one line per exchange, made from its L{ExchangeRecord}, in one of three formats, with the
secrets of its target redacted, handed to a sink that never blocks the reactor (L{rproxy.observe.logfile}).

Formats:
  - C{combined}: Apache's and nginx's combined log format (the default), followed by the request id, the
    duration in milliseconds and the service: C{client - user [time] "METHOD target VERSION" status bytes
    "referer" "user-agent" request-id ms service}.
  - C{json}: one JSON object per line, every field of L{FIELDS} that has a value.
  - a template of named fields, C{"{client} {method} {path} {status} {duration_ms}"}: L{FIELDS} in braces.

The target is written with the values of secret query parameters replaced (C{access_token}, C{token},
C{key}, C{signature}, C{password} and those configured), the referer likewise; the request fields written
are the User-Agent and those C{--access-log-header} names (C{Authorization}, C{Proxy-Authorization},
C{Cookie}, C{Set-Cookie} and the configured names redacted), and the user is a name a filter checked,
never a credential.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Callable, Mapping

from twisted.web.http_headers import Headers

from rproxy.observe.logfile import AccessLogSink, TwistedLogDestination
from rproxy.observe.record import ExchangeRecord
from rproxy.observe.redact import SECRET_HEADERS, SECRET_PARAMS, redactHeaders, redactTarget

#: The named fields of the json and template formats, and what each is.
FIELDS: Mapping[str, str] = {
    "time": "when the request head was in (ISO 8601, UTC, milliseconds)",
    "client": "the client's address, after the trusted-proxy rules",
    "peer": "the address of the connection's peer",
    "user": "who a filter authenticated the request as",
    "method": "the request method",
    "host": "the Host (or :authority) asked for",
    "path": "the request-target, secret query parameters redacted",
    "protocol": "HTTP/1.0, HTTP/1.1 or HTTP/2",
    "status": "the status sent (none: the exchange ended before a response)",
    "bytes_in": "request body bytes received; a tunnel's also the bytes the client sent through it",
    "bytes_out": "response body bytes sent; a tunnel's also the bytes the upstream sent through it",
    "duration_ms": "milliseconds from the request head to the end",
    "upstream": "the upstream of the last attempt",
    "upstream_connect_ms": "milliseconds to get that attempt's connection (0: one was idle)",
    "upstream_first_byte_ms": "milliseconds from that attempt's start to its response head",
    "service": "the service a route chose",
    "route": "the name of the route that matched",
    "attempts": "requests sent upstream, retries included",
    "request_id": "the request's X-Request-ID",
    "trace_id": "the W3C trace id it was sent upstream with",
    "tls_version": "the TLS version of the client's connection",
    "sni": "the server name the client asked for in TLS",
    "alpn": "the protocol ALPN chose",
    "fault": "who caused the error that ended it: client, proxy or upstream",
    "error": "that error's type (RFC 9209)",
    "reason": "that error's one-line reason",
    "outcome": "done, client_gone (the client left first) or aborted (the response was cut short)",
    "referer": "the Referer, secret query parameters redacted",
    "user_agent": "the User-Agent",
    "request_headers": "the request fields --access-log-header names, credentials and cookies redacted",
}


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def recordFields(
    record: ExchangeRecord,
    params: frozenset[bytes] = SECRET_PARAMS,
    logged: tuple[bytes, ...] = (),
    secrets: frozenset[bytes] = SECRET_HEADERS,
) -> dict[str, object]:
    """
    Every field of L{FIELDS} for C{record}: a value, or C{None} when it has none.

    @param logged: the request fields written in C{request_headers} (lower case).
    @param secrets: the fields whose values are redacted there.
    """
    tls = record.tls or (None, None, None)
    headers = record.headers
    referer = headers.getRawHeaders(b"referer") if headers is not None else None
    agent = headers.getRawHeaders(b"user-agent") if headers is not None else None
    return {
        "time": _isoTime(record.started),
        "client": record.client,
        "peer": record.peer,
        "user": record.user,
        "method": _text(record.method),
        "host": _text(record.host),
        "path": _text(redactTarget(record.target, params)),
        "protocol": _text(record.version),
        "status": record.status,
        "bytes_in": record.bytesIn,
        "bytes_out": record.bytesOut,
        "duration_ms": _milliseconds(record.duration),
        "upstream": record.upstream,
        "upstream_connect_ms": _milliseconds(record.connectTime),
        "upstream_first_byte_ms": _milliseconds(record.firstByte),
        "service": record.service,
        "route": record.route or None,
        "attempts": record.attempts,
        "request_id": record.requestId,
        "trace_id": record.traceId,
        "tls_version": tls[0],
        "sni": tls[1],
        "alpn": tls[2],
        "fault": record.fault,
        "error": record.errorType,
        "reason": record.reason,
        "outcome": record.outcome,
        "referer": _text(redactTarget(referer[0], params)) if referer else None,
        "user_agent": _text(agent[0]) if agent else None,
        "request_headers": _requestHeaders(headers, logged, secrets) if logged and headers is not None else None,
    }


def _requestHeaders(headers: Headers, logged: tuple[bytes, ...], secrets: frozenset[bytes]) -> dict[str, str]:
    """The values of the C{logged} fields the request has, joined with commas, the C{secrets} redacted."""
    present = [(name, b", ".join(values)) for name in logged if (values := headers.getRawHeaders(name))]
    return {name.decode("ascii"): value.decode("latin-1") for name, value in redactHeaders(present, secrets)}


def _isoTime(seconds: float) -> str:
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


class _Clock:
    """The combined format's time, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def __call__(self, seconds: float) -> bytes:
        whole = int(seconds)
        if whole != self._second:
            text = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(whole))
            self._second, self._text = whole, text.encode("ascii")
        return self._text


#: What a value inside the combined format's double quotes may not hold as it is: quotes, backslashes,
#: controls and bytes past ASCII (written as escapes, so that a line is printable ASCII whatever was sent).
_UNSAFE = re.compile(rb'["\\\x00-\x1f\x7f-\xff]')


def _quoted(value: bytes) -> bytes:
    """C{value} to write inside the combined format's double quotes."""
    if _UNSAFE.search(value) is None:
        return value
    return value.decode("latin-1").encode("unicode_escape").replace(b'"', b'\\"')


def _ascii(value: str | None) -> bytes:
    return b"-" if value is None else value.encode("ascii", "backslashreplace")


def checkFormat(format: str) -> None:
    """Raise C{ValueError} saying what is wrong with an access log C{format}."""
    AccessLog(TwistedLogDestination(), format)


class AccessLog:
    """
    An L{IExchangeObserver} that writes each record to C{sink} in C{format} (C{combined}, C{json}, or a
    template of L{FIELDS}), redacting the query parameters named in C{params}.
    """

    def __init__(
        self,
        sink: AccessLogSink,
        format: str = "combined",
        params: frozenset[bytes] = SECRET_PARAMS,
        headers: tuple[str, ...] = (),
        secrets: frozenset[bytes] = SECRET_HEADERS,
    ) -> None:
        self.sink = sink
        self.params = params
        self._logged = tuple(name.lower().encode("ascii") for name in headers)
        self._secrets = secrets
        self._line = self._chooseFormat(format)
        self._clock = _Clock()

    def _chooseFormat(self, format: str) -> Callable[[ExchangeRecord], bytes]:
        if format == "combined":
            return self._combined
        if format == "json":
            return self._json
        fields = [name for _, name, _, _ in string.Formatter().parse(format) if name is not None]
        unknown = [name for name in fields if name not in FIELDS]
        if not fields or unknown:
            raise ValueError(
                f"an access log format is combined, json, or a template of {{field}}s; "
                f"{'unknown field ' + repr(unknown[0]) if unknown else 'no field'} in {format!r} "
                f"(fields: {', '.join(FIELDS)})"
            )
        return lambda record: format.format_map(
            {k: "-" if v is None else v for k, v in self._fields(record).items()}
        ).encode("utf-8", "backslashreplace")

    def _fields(self, record: ExchangeRecord) -> dict[str, object]:
        return recordFields(record, self.params, self._logged, self._secrets)

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        self.sink.write(self._line(record))

    def _json(self, record: ExchangeRecord) -> bytes:
        fields = {k: v for k, v in self._fields(record).items() if v is not None}
        return json.dumps(fields, separators=(",", ":")).encode("ascii")

    def _combined(self, record: ExchangeRecord) -> bytes:
        headers = record.headers
        referer = headers.getRawHeaders(b"referer") if headers is not None else None
        agent = headers.getRawHeaders(b"user-agent") if headers is not None else None
        return b'%s - %s [%s] "%s %s %s" %s %d "%s" "%s" %s %.1f %s' % (
            _ascii(record.client),
            _ascii(record.user),
            self._clock(record.started),
            _quoted(record.method),
            _quoted(redactTarget(record.target, self.params)),
            _quoted(record.version),
            b"%d" % record.status if record.status else b"-",
            record.bytesOut,
            _quoted(redactTarget(referer[0], self.params)) if referer else b"-",
            _quoted(agent[0]) if agent else b"-",
            _ascii(record.requestId),
            record.duration * 1000,
            _ascii(record.service),
        )
