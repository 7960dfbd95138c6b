"""
The request as the pluggable parts see it: read-only inbound, mutable outbound (Go's Rewrite model).

A director or filter reads L{InboundRequest} to decide, and changes only L{OutboundRequest}; the proxy
has already removed hop-by-hop fields and set the forwarding fields on the outbound copy, so nothing a
client lists in ``Connection`` can delete what the proxy added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.web.http_headers import Headers

from rproxy.headers import ForwardingPolicy, requestHeaderPairs


@dataclass(frozen=True)
class InboundRequest:
    """
    The request as the client sent it (do not mutate C{headers}).

    @ivar target: the request-target, byte-exact, relative to where the proxy is mounted.
    @ivar clientHost: the peer's IP address, or C{None} on a UNIX socket.
    @ivar scheme: C{b"http"} or C{b"https"}, as the client connected.
    @ivar version: the protocol version (C{b"HTTP/1.1"}, C{b"HTTP/1.0"}, C{b"HTTP/2"}).
    """

    method: bytes
    target: bytes
    headers: Headers
    clientHost: str | None
    scheme: bytes
    version: bytes

    @property
    def host(self) -> bytes | None:
        """The ``Host`` the client asked for."""
        values = self.headers.getRawHeaders(b"host")
        return values[0] if values else None


@dataclass
class OutboundRequest:
    """
    What will be sent upstream; directors and filters may change any of it.

    @ivar target: the request-target, joined later with the chosen upstream's base path.
    @ivar headers: end-to-end fields plus the proxy's forwarding fields.
    @ivar host: the ``Host`` to send; C{None} means the chosen upstream's own host.
    @ivar acceptsTrailers: whether ``TE: trailers`` is forwarded.
    """

    method: bytes
    target: bytes
    headers: Headers = field(default_factory=Headers)
    host: bytes | None = None
    acceptsTrailers: bool = False

    @classmethod
    def fromInbound(cls, inbound: InboundRequest, forwarding: ForwardingPolicy) -> OutboundRequest:
        """
        The outbound copy of C{inbound}, as directors and filters get it: hop-by-hop, framing and
        ``Connection``-listed fields removed, the forwarding fields of C{forwarding} added.
        """
        pairs, acceptsTrailers = requestHeaderPairs(inbound.headers)
        version = inbound.version.removeprefix(b"HTTP/")
        pairs += forwarding.forwardingPairs(inbound.headers, inbound.clientHost, inbound.scheme, inbound.host, version)
        headers = Headers()
        for name, value in pairs:
            headers.addRawHeader(name, value)
        return cls(inbound.method, inbound.target, headers, inbound.host, acceptsTrailers)
