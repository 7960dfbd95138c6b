"""
The request as the pluggable parts see it: read-only inbound, mutable outbound (Go's Rewrite model).

A director or filter reads L{InboundRequest} to decide, and changes only L{OutboundRequest}; the proxy
has already removed hop-by-hop fields and set the forwarding fields on the outbound copy, so nothing a
client lists in ``Connection`` can delete what the proxy added.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from twisted.web.http_headers import Headers

from rproxy.headers import ForwardingPolicy, Pairs, requestHeaderPairs


class InboundRequest(NamedTuple):
    """
    The request as the client sent it (do not mutate C{headers}).  Immutable, and a named tuple rather
    than a frozen dataclass because one is built for every request (three times faster to build).

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


class OutboundRequest:
    """
    What will be sent upstream; directors and filters may change any of it.

    @ivar method: the request method.
    @ivar target: the request-target, joined later with the chosen upstream's base path.
    @ivar host: the ``Host`` to send; C{None} means the chosen upstream's own host.
    @ivar acceptsTrailers: whether ``TE: trailers`` is forwarded.
    """

    def __init__(
        self,
        method: bytes,
        target: bytes,
        fields: Iterable[tuple[bytes, bytes]] = (),
        host: bytes | None = None,
        acceptsTrailers: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.host = host
        self.acceptsTrailers = acceptsTrailers
        self._fields = list(fields)
        self._headers: Headers | None = None

    @property
    def headers(self) -> Headers:
        """
        End-to-end fields plus the proxy's forwarding fields, to read or change.

        Built from the field list on first use: most exchanges never look, and are sent from the list.
        """
        if self._headers is None:
            self._headers = Headers()
            for name, value in self._fields:
                self._headers.addRawHeader(name, value)
        return self._headers

    @headers.setter
    def headers(self, headers: Headers) -> None:
        self._headers = headers

    def fields(self) -> Pairs:
        """The fields to send, in order (one pair per value)."""
        if self._headers is None:
            return self._fields
        return [(name, value) for name, values in self._headers.getAllRawHeaders() for value in values]

    @classmethod
    def fromInbound(cls, inbound: InboundRequest, forwarding: ForwardingPolicy) -> OutboundRequest:
        """
        The outbound copy of C{inbound}, as directors and filters get it: hop-by-hop, framing and
        ``Connection``-listed fields removed, the forwarding fields of C{forwarding} added.
        """
        pairs, acceptsTrailers = requestHeaderPairs(inbound.headers)
        version = inbound.version.removeprefix(b"HTTP/")
        pairs += forwarding.forwardingPairs(inbound.headers, inbound.clientHost, inbound.scheme, inbound.host, version)
        return cls(inbound.method, inbound.target, pairs, inbound.host, acceptsTrailers)
