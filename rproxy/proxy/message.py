"""
The request as the pluggable parts see it: read-only inbound, mutable outbound (Go's Rewrite model).

Filters see both in a L{RequestContext}, and may answer with a L{LocalResponse} instead of proxying.

A director or filter reads L{InboundRequest} to decide, and changes only L{OutboundRequest}; the proxy
has already removed hop-by-hop fields and set the forwarding fields on the outbound copy, so nothing a
client lists in ``Connection`` can delete what the proxy added.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from twisted.web.http_headers import Headers

from rproxy.errors import ProxyError
from rproxy.headers import ForwardingPolicy, Pairs, requestHeaderPairs

if TYPE_CHECKING:
    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.downstream.spool import SpoolSettings
    from rproxy.upstream.upstreams import Upstream


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

    def addField(self, name: bytes, value: bytes) -> None:
        """Append a field line, without building L{headers} when it was not."""
        if self._headers is None:
            self._fields.append((name, value))
        else:
            self._headers.addRawHeader(name, value)

    def removeFields(self, names: Collection[bytes]) -> None:
        """Remove every field named in C{names} (lower case), without building L{headers} when it was not."""
        if self._headers is None:
            self._fields = [(name, value) for name, value in self._fields if name.lower() not in names]
        else:
            for name in names:
                self._headers.removeHeader(name)

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


class LocalResponse:
    """
    An answer a filter gives the client itself, instead of proxying (a CORS preflight, an auth service's
    refusal passed on).  For a refusal with a one-line reason, a filter returns a L{ProxyError} instead.

    @ivar status: the status code.
    @ivar headers: the fields, in order (framing fields are the proxy's: C{Content-Length} is set from C{body}).
    @ivar body: the whole body.
    @ivar reason: why, for the log (never a secret).
    """

    def __init__(
        self, status: int, headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b"", reason: str = ""
    ) -> None:
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.reason = reason

    def __repr__(self) -> str:
        return f"<LocalResponse {self.status} {self.reason!r}>"


#: What a request filter decides: C{None} to go on, else the client's answer.
FilterVerdict = LocalResponse | ProxyError | None


class RequestContext:
    """
    What the filters of one exchange see and share: the request both ways, where it goes, what they learned.

    Filters read C{inbound} and change C{outbound}; the other attributes are set by the proxy, except
    C{user}, C{claims} and C{notes}, which a filter sets for the filters after it and for the access log.

    @ivar inbound: the request as the client sent it (read-only).
    @ivar outbound: the request as it will be sent (mutable).
    @ivar client: the client's address after the trusted-proxy rules (the peer's, unless a trusted proxy
        forwarded the request), or C{None} on a UNIX socket.
    @ivar service: the name of the service the route chose.
    @ivar upstream: the upstream of the current attempt, once one is chosen (C{None} in request filters).
    @ivar user: who the request was authenticated as, once a filter has.
    @ivar claims: what an authenticating filter verified about the request (a JWT's claims).
    @ivar notes: anything else filters pass along, by name.
    @ivar body: the request body as it will be sent (C{None}: none).  A filter that must read the whole body
        before the upstream gets it (buffering, an upload stored elsewhere) reads it from here and puts what
        is to be sent in its place: another pipe (L{rproxy.downstream.body.fileBody}, whose length frames the
        request), or C{None} to send none (with C{Content-Length: 0} if the client declared a length).
    @ivar bufferResponse: set by a request filter to have the response body read from the upstream at its
        own speed into a spool of these settings, and written to the client from there at the client's
        (L{rproxy.downstream.spool.SpooledResponse}); C{None}, the default: it streams, a slow client pausing
        the upstream.
    """

    __slots__ = (
        "inbound",
        "outbound",
        "client",
        "service",
        "upstream",
        "user",
        "claims",
        "notes",
        "body",
        "bufferResponse",
        "_ended",
    )

    def __init__(
        self,
        inbound: InboundRequest,
        outbound: OutboundRequest,
        client: str | None,
        service: str = "",
        body: RequestBodyPipe | None = None,
    ) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self.client = client
        self.service = service
        self.body = body
        self.upstream: Upstream | None = None
        self.user: str | None = None
        self.claims: Mapping[str, object] = {}
        self.notes: dict[str, object] = {}
        self.bufferResponse: SpoolSettings | None = None
        self._ended: list[Callable[[], None]] | None = []

    def whenEnded(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once when the exchange ends, however it ends: its response complete, an error
        answered, a filter's answer sent, the client gone, or its connection handed to a tunnel.
        """
        if self._ended is None:
            callback()
        else:
            self._ended.append(callback)

    def end(self) -> None:
        """The exchange has ended: call what L{whenEnded} was given (the proxy calls this, once)."""
        callbacks, self._ended = self._ended, None
        for callback in callbacks or ():
            callback()
