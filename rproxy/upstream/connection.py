"""
What an exchange and an upstream connection say to each other, whatever the protocol (HTTP/1.1 or HTTP/2).

The exchange hands a connection a L{RequestHead} (the request as fields, not bytes: each protocol frames
it its own way), the request body's pipe, and a L{ResponseReceiver}; the connection reports the response
back to the receiver and is the C{IPushProducer} of its body, so a slow client pauses it.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from rproxy.headers import Pairs

if TYPE_CHECKING:
    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.errors import ProxyError
    from rproxy.tunnel.sides import TunnelSide


class RequestHead(NamedTuple):
    """
    A request as it goes to one upstream (a named tuple: one is built for every attempt, and a frozen
    dataclass takes three times as long to build).

    @ivar method: the request method.
    @ivar target: the request-target, byte-exact, with the upstream's base path already joined.
    @ivar authority: the ``Host`` (HTTP/1.1) or ``:authority`` (HTTP/2) to send.
    @ivar scheme: C{b"http"} or C{b"https"}, the upstream's (HTTP/2's ``:scheme``).
    @ivar fields: the end-to-end fields, in order, without framing fields (Host, Content-Length,
        Transfer-Encoding, TE): each protocol adds its own.
    @ivar acceptsTrailers: whether the client accepts trailers (``TE: trailers`` is sent).
    @ivar bodyLength: the body's length when known; C{None} when it is streamed with no declared length.
    @ivar hasBody: whether a body follows the head (one of length 0 counts when the client declared it).
    @ivar upgrade: the protocols the client asked to switch to (``Upgrade``), as sent; empty for a request
        that is no upgrade (L{rproxy.tunnel.splice.requestedProtocols} chooses them).
    """

    method: bytes
    target: bytes
    authority: bytes
    scheme: bytes
    fields: Pairs
    acceptsTrailers: bool = False
    bodyLength: int | None = None
    hasBody: bool = False
    upgrade: tuple[bytes, ...] = ()

    @property
    def expectsResponseBody(self) -> bool:
        """C{False} for HEAD, whose response has no body whatever its fields say."""
        return self.method != b"HEAD"


class Delivery(Enum):
    """What the upstream may have done with a request whose exchange failed: what a retry may assume."""

    #: It may have been processed (the request was sent, the exchange broke after).
    MAYBE = "maybe"
    #: Almost surely not: a reused HTTP/1.1 connection closed before any response byte (the upstream
    #: closed it as idle as the request went out).  Only idempotent requests are sent again.
    STALE = "stale"
    #: Certainly not: the upstream said so (HTTP/2 REFUSED_STREAM, or a stream above a GOAWAY's last
    #: stream id).  Any request may be sent again.
    UNPROCESSED = "unprocessed"


class ResponseReceiver(Protocol):
    """What an upstream connection tells about the response to the request it carries."""

    def responseInterim(self, status: int, headers: Pairs) -> None:
        """An informational (1xx) response arrived, before the final one (101 is not reported so)."""

    def responseHead(self, version: bytes, status: int, reason: bytes, headers: Pairs, hasBody: bool) -> None:
        """The final response head arrived (C{version} as in ``Via``: C{b"1.1"}, C{b"2"})."""

    def responseData(self, data: bytes) -> None:
        """Some response body bytes arrived."""

    def responseDone(self, trailers: Pairs) -> None:
        """The response ended with correct framing (C{trailers}: the trailer fields, if any came)."""

    def responseSwitched(self, headers: Pairs, side: TunnelSide) -> None:
        """
        The upstream answered an upgrade request with 101 (Switching Protocols): the connection, which
        never goes back to its pool, is the receiver's to splice as C{side} from now on (with the bytes
        that followed the 101 head, delivered when the side is attached).
        """

    def responseFailed(self, error: ProxyError, delivery: Delivery) -> None:
        """The exchange with the upstream failed; C{delivery} says whether the request may have been processed."""


class UpstreamConnection(Protocol):
    """
    The exchange's handle on one request's way to an upstream: an HTTP/1.1 connection, or one stream
    of an HTTP/2 connection.  It is the C{IPushProducer} of the response body.

    @ivar reused: whether the underlying connection carried an earlier exchange.
    @ivar reportsUnprocessed: whether it can fail with L{Delivery.UNPROCESSED} (HTTP/2): then the
        exchange keeps the request body of any method, to send it again.
    """

    reused: bool
    reportsUnprocessed: bool

    @property
    def isOpen(self) -> bool:
        """Whether it can still carry an exchange."""

    def sendRequest(self, head: RequestHead, body: RequestBodyPipe | None, receiver: ResponseReceiver) -> None:
        """Send C{head} and stream C{body} (C{None}: the request has none); report to C{receiver}."""

    def giveBack(self) -> None:
        """Return it, unused, to its pool (the exchange ended while it was being opened)."""

    def abort(self) -> None:
        """Drop the exchange: the client went away, or the proxy gave up on the response."""

    def pauseProducing(self) -> None:
        """The client cannot take more response bytes now."""

    def resumeProducing(self) -> None:
        """The client can take response bytes again."""

    def stopProducing(self) -> None:
        """The client is gone: same as L{abort}."""
