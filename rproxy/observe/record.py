"""
One record per request, filled as it goes, read once when it ends: what the access log writes and the
metrics count.

The client side makes an L{ExchangeRecord} when a request's head is in; the exchange adds where the
request went and how (service, route, upstream, attempts, timings, the side at fault); filters add the
user.  When the response is finished, or the client or the proxy abandons it, the site hands the record
to its L{IExchangeObserver}s, each exactly once.  A record copies no secret: its target is redacted by
whoever writes it, and of the request's fields (which it refers to) the access log writes only the
Referer (redacted) and the User-Agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

#: How an exchange ended (L{ExchangeRecord.outcome}).
DONE, CLIENT_GONE, ABORTED = "done", "client_gone", "aborted"


class ExchangeRecord:
    """
    What is known of one request and its response.

    @ivar started: the reactor's time when the request head was in.
    @ivar duration: seconds from C{started} to the end (set when it ends).
    @ivar method: the request method.
    @ivar target: the request-target as the client sent it (not redacted).
    @ivar host: the ``Host`` (or C{:authority}) asked for, or C{None}.
    @ivar version: the protocol version (C{b"HTTP/1.1"}, C{b"HTTP/2"}).
    @ivar peer: the connection's peer address (C{None} on a UNIX socket).
    @ivar client: the client's address after the trusted-proxy rules (the peer unless a filter or the
        exchange learned better).
    @ivar tls: C{(version, server name, ALPN protocol)} of a TLS connection, else C{None}.
    @ivar status: the status sent (C{None}: none was, the client or the proxy gave up first).
    @ivar bytesIn: request body bytes received (and, for a tunnel, the bytes the client sent through it).
    @ivar bytesOut: response body bytes sent (and, for a tunnel, the bytes the upstream sent through it).
    @ivar splicedIn: bytes the client sent through the tunnel after a protocol switch (counted as it runs).
    @ivar splicedOut: bytes the upstream sent through the tunnel.
    @ivar service: the service a route chose, once one did.
    @ivar route: the name of the route that matched.
    @ivar upstream: the upstream of the last attempt (its key: host and port).
    @ivar attempts: requests sent upstream (retries included).
    @ivar connectTime: seconds to get an upstream connection for the last attempt (0 when one was idle).
    @ivar firstByte: seconds from sending the last attempt to its response head.
    @ivar fault: who caused an error (C{"client"}, C{"proxy"}, C{"upstream"}), when one ended it.
    @ivar errorType: the RFC 9209 error type of that error.
    @ivar reason: its one-line reason.
    @ivar user: who a filter authenticated the request as.
    @ivar requestId: the request's id (L{rproxy.observe.requestid}).
    @ivar traceId: the W3C trace id the request was sent upstream with.
    @ivar outcome: L{DONE}, L{CLIENT_GONE} or L{ABORTED}.
    @ivar headers: the request's fields (read-only), or C{None}.
    """

    __slots__ = (
        "started",
        "duration",
        "method",
        "target",
        "host",
        "version",
        "peer",
        "client",
        "tls",
        "status",
        "bytesIn",
        "bytesOut",
        "splicedIn",
        "splicedOut",
        "service",
        "route",
        "upstream",
        "attempts",
        "connectTime",
        "firstByte",
        "fault",
        "errorType",
        "reason",
        "user",
        "requestId",
        "traceId",
        "outcome",
        "headers",
    )

    def __init__(
        self,
        started: float,
        method: bytes,
        target: bytes,
        host: bytes | None,
        version: bytes,
        peer: str | None,
        tls: tuple[str, str | None, str | None] | None = None,
        headers: Headers | None = None,
    ) -> None:
        self.started = started
        self.duration = 0.0
        self.method = method
        self.target = target
        self.host = host
        self.version = version
        self.peer = peer
        self.client = peer
        self.tls = tls
        self.status: int | None = None
        self.bytesIn = 0
        self.bytesOut = 0
        self.splicedIn = self.splicedOut = 0
        self.service: str | None = None
        self.route: str | None = None
        self.upstream: str | None = None
        self.attempts = 0
        self.connectTime: float | None = None
        self.firstByte: float | None = None
        self.fault: str | None = None
        self.errorType: str | None = None
        self.reason: str | None = None
        self.user: str | None = None
        self.requestId: str | None = None
        self.traceId: str | None = None
        self.outcome = DONE
        self.headers = headers


class IExchangeObserver(Protocol):
    """What sees every record once its exchange has ended (the access log, the metrics)."""

    def exchangeEnded(self, record: ExchangeRecord) -> None:
        """C{record}'s exchange has ended; read it now (it is not changed after this)."""


def notify(observers: Sequence[IExchangeObserver], record: ExchangeRecord) -> None:
    """Hand C{record} to each of C{observers}."""
    for observer in observers:
        observer.exchangeEnded(record)
