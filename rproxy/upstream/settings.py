"""How long an upstream may take and how many connections it gets (L{PoolSettings}), and the 504 a timeout gives."""

from __future__ import annotations

from dataclasses import dataclass, field

from rproxy.deadline import RESPONSE
from rproxy.errors import ProxyError, upstreamError
from rproxy.upstream.tls import UpstreamTLS


@dataclass(frozen=True)
class PoolSettings:
    """
    Limits and timeouts for the connections to one upstream (seconds, counts).

    @ivar connectTimeout: how long a connect may take (with the TLS handshake and HTTP/2 SETTINGS).
    @ivar responseTimeout: how long, once the request is written, the response head may take.
    @ivar readTimeout: how long the upstream may stay silent in the middle of a response.
    @ivar maxConnections: connections open or opening at once.
    @ivar maxIdle: idle connections kept for reuse.
    @ivar idleTimeout: how long an idle connection is kept (below the upstream's keep-alive timeout).
    @ivar maxQueue: requests that may wait for a connection when all are busy.
    @ivar queueTimeout: how long a request may wait for a connection.
    @ivar pingInterval: HTTP/2: a PING when a connection was silent this long (0: never).
    @ivar pingTimeout: HTTP/2: how long the answer to a PING may take before the connection is closed.
    @ivar tls: certificates and verification, for https upstreams.
    """

    connectTimeout: float = 5.0
    responseTimeout: float = 60.0
    readTimeout: float = 60.0
    maxConnections: int = 512
    maxIdle: int = 64
    idleTimeout: float = 30.0
    maxQueue: int = 1024
    queueTimeout: float = 10.0
    pingInterval: float = 30.0
    pingTimeout: float = 10.0
    tls: UpstreamTLS = field(default_factory=UpstreamTLS)


def timeoutError(mode: int, label: str, settings: PoolSettings) -> ProxyError:
    """The 504 for a L{RESPONSE} or L{READ} deadline that passed on upstream C{label}."""
    if mode == RESPONSE:
        return upstreamError(
            504, f"upstream {label} sent no response within {settings.responseTimeout:g}s", "http_response_timeout"
        )
    return upstreamError(
        504, f"upstream {label} sent nothing for {settings.readTimeout:g}s mid-response", "connection_read_timeout"
    )
