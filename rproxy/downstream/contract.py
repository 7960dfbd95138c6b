"""
What an exchange says to its client, whatever the protocol (HTTP/1.1 or HTTP/2): the mirror of
L{rproxy.upstream.connection}.

An exchange answers one request through a L{Downstream}: 1xx responses, then the response head, the
body with backpressure (the upstream connection is registered as the body's producer, so a slow client
pauses it), trailers and the end; or an error response, or an abort once the response has begun (a
truncated response must never look complete).  It learns when the client goes away, and after a protocol
switch (an HTTP/1.1 ``101``, or the ``200`` of an RFC 8441 extended CONNECT) it takes the client's side
as a L{rproxy.tunnel.sides.TunnelSide}.  Two classes implement it: L{rproxy.downstream.request.ProxyRequest},
for rproxy's own protocols, and L{rproxy.downstream.webrequest.WebRequestDownstream}, over any twisted.web
request.

A L{ProxyRequest} in turn asks the protocol that carries it for what twisted.web's request API has no
word for: L{RequestChannel}, which the HTTP/1.1 connection and each HTTP/2 stream implement.  Nothing
outside those two protocol modules needs to know which protocol a request came by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress
    from twisted.python.failure import Failure
    from twisted.web.http_headers import Headers

    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.downstream.connection import ClientConnection
    from rproxy.errors import ProxyError
    from rproxy.observe.record import ExchangeRecord
    from rproxy.tunnel.sides import TunnelSide


class Producer(Protocol):
    """What pauses and resumes (an C{IPushProducer}): an upstream connection, a tunnel's side."""

    def pauseProducing(self) -> None:
        """Stop producing for now."""

    def resumeProducing(self) -> None:
        """Produce again."""

    def stopProducing(self) -> None:
        """Stop for good."""


class Downstream(Protocol):
    """
    One request's client, as an exchange sees it.

    @ivar method: the request method.
    @ivar clientproto: the protocol version, as in a request line (C{b"HTTP/1.1"}; C{b"HTTP/2"}).
    @ivar requestHeaders: the request's fields (read-only).
    @ivar bodyPipe: the request body on its way, if the request has one and it streams.
    @ivar upgradable: whether the connection can be switched to another protocol (HTTP/1.1 ``Upgrade``).
    @ivar extendedConnect: the ``:protocol`` of an RFC 8441 extended CONNECT (HTTP/2), else C{None}.
    @ivar record: what the access log and the metrics will know of the exchange (the exchange adds where the
        request went); C{None} where nothing records it (a plain twisted.web site).
    """

    method: bytes
    clientproto: bytes
    requestHeaders: Headers
    bodyPipe: RequestBodyPipe | None
    record: ExchangeRecord | None

    @property
    def upgradable(self) -> bool: ...

    @property
    def extendedConnect(self) -> bytes | None: ...

    def getClientAddress(self) -> IAddress:
        """The address of the client's connection (its peer)."""

    def isSecure(self) -> bool:
        """Whether the client connected over TLS."""

    def whenGone(self, callback: Callable[[Failure], object]) -> None:
        """Call C{callback} with the reason if the client goes away before the response is finished."""

    def sendInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Send an informational (1xx, not 101) response, where the protocol and version can carry one."""

    def continueBody(self) -> None:
        """
        The body is wanted now, before any response: a client that waits for it (``Expect: 100-continue``)
        gets its ``100 Continue``, once; nothing happens otherwise, or where the protocol has none.
        """

    def sendHead(self, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool) -> None:
        """Send the response head now (C{hasBody}: a body follows; without one, L{finish} follows at once)."""

    def write(self, data: bytes) -> None:
        """Send response body bytes."""

    def registerProducer(self, producer: Producer, streaming: bool) -> None:
        """Pause C{producer} (the upstream) while the client cannot take more of the body."""

    def unregisterProducer(self) -> None:
        """The body's producer is done."""

    def finish(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """The response is complete, ending with C{trailers} where the protocol can carry them."""

    def fail(self, error: ProxyError) -> None:
        """
        Answer with C{error} (its status, reason and C{Proxy-Status}), and log it; if the response has
        already begun, abort instead.
        """

    def stopKeepAlive(self) -> None:
        """Close the client's connection after this response (its request body was not read to the end)."""

    def switchProtocols(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> TunnelSide:
        """
        Answer with C{status} (101 on HTTP/1.1, 200 to an extended CONNECT) and C{fields}, and hand over the
        client's side for a tunnel: nothing else is written to it as HTTP any more.
        """


class RequestChannel(Protocol):
    """
    What a L{rproxy.downstream.request.ProxyRequest} asks of the protocol that carries it, besides what
    twisted.web's request uses (C{write}, C{writeHeaders}, C{registerProducer}, C{requestDone}, ...).

    @ivar upgradable: see L{Downstream.upgradable}.
    @ivar extendedConnect: see L{Downstream.extendedConnect}.
    @ivar bodySource: what the request body's pipe pauses when it holds too much (the connection, or the
        stream's flow control).
    """

    upgradable: bool
    extendedConnect: bytes | None
    bodySource: Any

    @property
    def connection(self) -> ClientConnection:
        """The client connection the request came on (its peer, its TLS)."""

    def writeHead(
        self, request: Any, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool
    ) -> bool:
        """
        Send a response head built from C{fields} as they are, now, or without a body (C{hasBody} false)
        as late as the end of the response; C{False} (nothing sent) when twisted.web's own path must do it.
        """

    def writeInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Send a 1xx response."""

    def writeTrailers(self, request: Any, trailers: Sequence[tuple[bytes, bytes]]) -> bool:
        """End the response with C{trailers}; C{False} if the framing cannot carry them."""

    def abort(self) -> None:
        """Reset the request's connection (HTTP/1.1) or stream (HTTP/2)."""

    def stopKeepAlive(self, request: Any) -> None:
        """Close the connection after this response (a no-op on HTTP/2)."""

    def sendContinue(self) -> None:
        """Send ``100 Continue`` (for a local resource that reads the body)."""

    def switchProtocols(self, request: Any, status: int, fields: Sequence[tuple[bytes, bytes]]) -> TunnelSide:
        """See L{Downstream.switchProtocols}."""
