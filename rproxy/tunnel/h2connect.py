"""
WebSocket over HTTP/2 (RFC 8441): an extended CONNECT from an HTTP/2 client, carried to an HTTP/1.1
upstream as a WebSocket Upgrade, and spliced with L{rproxy.tunnel.splice}'s tunnel.

rproxy's HTTP/2 server advertises C{SETTINGS_ENABLE_CONNECT_PROTOCOL}.  A stream that opens with
``:method CONNECT`` and ``:protocol websocket`` is proxied as ``GET :path`` with ``Connection: Upgrade``,
``Upgrade: websocket`` and a ``Sec-WebSocket-Key`` generated here (the HTTP/2 side has none, RFC 8441
section 5); ``Sec-WebSocket-Version`` (13 if the client sent none), ``-Protocol`` and ``-Extensions``
pass through.  An upstream's 101 must carry the ``Sec-WebSocket-Accept`` of that key (else 502); the
client then gets ``:status 200`` without END_STREAM, with the upstream's end-to-end fields (its
``Sec-WebSocket-Protocol`` and ``-Extensions`` among them), and the stream's DATA is the tunnel.  Any
other final answer is relayed as a normal response, except a 2xx, which would tell the client that a
tunnel is open when none is: that is a 502.

Refused: a plain CONNECT (no ``:protocol``) with 405, as on HTTP/1.1; a ``:protocol`` other than
``websocket`` with 501 (nothing to carry it to).  An HTTP/2 upstream cannot take the upgrade (502).

L{StreamTransport} makes the stream look like a connection to the tunnel, so that the HTTP/1.1 splice
(idle timeout, counts, message-aware routes, drain on shutdown) serves both: client DATA is delivered
to the tunnel and acknowledged only as the upstream's socket takes it, upstream bytes go out as DATA
frames as the stream's window allows, a client END_STREAM becomes a half-close (FIN) of the upstream,
an upstream FIN or close becomes END_STREAM, an upstream reset becomes RST_STREAM(CONNECT_ERROR), and
a client RST_STREAM resets the upstream.  The end of the stream that an upstream FIN causes ends the
tunnel (the stream is then reset with NO_ERROR if the client had not ended its side): HTTP/2 keeps
no answered stream open for the client's DATA, so a half-open tunnel holds only in the client's
direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.errors
import h2.exceptions
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableDescriptor, IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import Request
from wsproto.utilities import generate_accept_token, generate_nonce
from zope.interface import implementer

from rproxy.downstream.http2 import ProxyH2Stream
from rproxy.errors import ProxyError, clientError
from rproxy.headers import Pairs
from rproxy.proxy.message import OutboundRequest
from rproxy.tunnel.splice import Tunnel, Tunnels

#: The only ``:protocol`` carried (RFC 8441 section 4).
WEBSOCKET = b"websocket"

#: Response fields of the HTTP/1.1 handshake that have no place in RFC 8441's 200.
_HANDSHAKE_ONLY = frozenset([b"sec-websocket-accept", b"upgrade", b"connection"])


def connectRefusal(protocol: bytes | None) -> ProxyError | None:
    """
    Why a CONNECT request with C{protocol} as its ``:protocol`` (C{None}: a plain CONNECT) is refused;
    C{None} for the extended CONNECT of a WebSocket, which is proxied.
    """
    if protocol is None:
        return clientError(405, "CONNECT is not supported: this is a reverse proxy")
    if protocol.lower() != WEBSOCKET:
        return clientError(
            501, f"extended CONNECT of protocol {protocol[:64].decode('latin-1')!r} is not supported, only websocket"
        )
    return None


def webSocketOverH2(request: Request) -> WebSocketOverH2 | None:
    """The RFC 8441 WebSocket that C{request} opens, if it is an extended CONNECT (checked already)."""
    channel = request.channel
    if isinstance(channel, ProxyH2Stream) and channel.connectProtocol is not None and request.method == b"CONNECT":
        return WebSocketOverH2(channel)
    return None


class WebSocketOverH2:
    """
    One extended CONNECT on its way: the upstream request it becomes, the check of the upstream's
    101, and the splice.

    @ivar key: the ``Sec-WebSocket-Key`` sent upstream.
    """

    #: What the upstream request asks to switch to (L{rproxy.upstream.connection.RequestHead.upgrade}).
    upgrade = (WEBSOCKET,)

    def __init__(self, stream: ProxyH2Stream) -> None:
        self.stream = stream
        self.key = generate_nonce()

    def prepare(self, outbound: OutboundRequest) -> None:
        """Make C{outbound} the HTTP/1.1 handshake: a GET with the key (and the version, if missing)."""
        outbound.method = b"GET"
        headers = outbound.headers
        headers.setRawHeaders(b"sec-websocket-key", [self.key])
        if not headers.hasHeader(b"sec-websocket-version"):
            headers.setRawHeaders(b"sec-websocket-version", [b"13"])

    def refusal(self, headers: Pairs) -> str | None:
        """Why the upstream's 101 with C{headers} does not complete the handshake; C{None} if it does."""
        accepts = [value.strip() for name, value in headers if name.lower() == b"sec-websocket-accept"]
        expected = generate_accept_token(self.key)
        if accepts != [expected]:
            return "upstream's Sec-WebSocket-Accept does not match the key the proxy sent"
        return None

    def splice(
        self,
        tunnels: Tunnels,
        request: Request,
        fields: Pairs,
        upstream: Any,
        upstreamEarly: bytes,
        label: str,
        relay: Callable[[Tunnel], None] | None = None,
    ) -> Tunnel:
        """
        Answer the client's CONNECT with 200 and C{fields} (the upstream 101's end-to-end ones), then
        splice the stream with C{upstream}'s transport, as L{rproxy.tunnel.splice.splice} does a connection.
        """
        stream = self.stream
        head = [(name.lower(), value) for name, value in fields if name.lower() not in _HANDSHAKE_ONLY]
        stream._conn.sendHeadersNow(stream.streamID, [(b":status", b"200"), *head])
        request.startedWriting = 1  # the response is the tunnel: nothing else may write one
        request.code = 200
        tunnel = Tunnel(tunnels, label, StreamTransport(stream), upstream)
        if relay is not None:
            relay(tunnel)
        tunnel.start(b"", upstreamEarly)  # what the client sent early waits, unacknowledged, in the stream
        return tunnel


@implementer(IHalfCloseableDescriptor, IPushProducer)
class StreamTransport:
    """
    An HTTP/2 stream as the transport of a tunnel's side: it takes the place of the stream's request,
    so that the stream hands it the client's DATA, END_STREAM and reset, and tells its C{protocol}.

    @ivar protocol: what it tells; first the request, whose place it took (L{rproxy.tunnel.splice} puts its
        tunnel end here and tells the request when the stream is over).
    """

    def __init__(self, stream: ProxyH2Stream) -> None:
        self.stream = stream
        self.protocol: Any = stream._request
        stream._request = self
        self._ending = False  # END_STREAM is queued
        self._lost = False
        self._reason: Failure = Failure(ConnectionDone("the stream ended"))
        cleanup = stream._conn._streamCleanupCallbacks.get(stream.streamID)
        if cleanup is None:  # the client reset the stream meanwhile
            self._lost = True
        else:
            cleanup.addCallback(lambda _: self.connectionLost(self._reason))

    # -- the stream's side (what it would tell its request)

    def handleContentChunk(self, data: bytes) -> None:
        """Client DATA (acknowledged by the stream once this returns, or when it resumes)."""
        self.stream._conn.resetTimeout()  # the connection is not idle while a tunnel carries bytes
        self.protocol.dataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The client ended its side of the stream (END_STREAM)."""
        self.readConnectionLost(self._reason)

    def connectionLost(self, reason: Failure) -> None:
        """The stream is over: reset by the client, its connection lost, or both ends ended."""
        if self._lost:
            return
        self._lost = True
        self.protocol.connectionLost(reason)

    # -- IHalfCloseableDescriptor

    def readConnectionLost(self, reason: Failure) -> None:
        """The client will send nothing more."""
        if not self._lost:
            self.protocol.readConnectionLost()

    def writeConnectionLost(self, reason: Failure) -> None:
        """Nothing more will be sent to the client (END_STREAM is out): see L{connectionLost}."""

    # -- the transport, as the tunnel uses it

    def write(self, data: bytes) -> None:
        """Send C{data} in DATA frames, as the stream's window allows."""
        if not (self._lost or self._ending):
            self.stream._conn.resetTimeout()
            self.stream.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        """Send each of C{data}."""
        for chunk in data:
            self.write(chunk)

    def loseWriteConnection(self) -> None:
        """End the stream (END_STREAM) once what is written is sent."""
        if not (self._lost or self._ending):
            self._ending = True
            self.stream.loseConnection()

    def loseConnection(self) -> None:
        """End the stream once what is written is sent (HTTP/2 resets the client's side then)."""
        self.loseWriteConnection()

    def abortConnection(self) -> None:
        """Reset the stream with CONNECT_ERROR (RFC 9113 section 8.5: the upstream connection failed)."""
        if self._lost:
            return
        self._reason = Failure(ConnectionLost("the stream was reset"))
        connection = self.stream._conn
        try:
            connection.conn.reset_stream(self.stream.streamID, h2.errors.ErrorCodes.CONNECT_ERROR)
        except h2.exceptions.StreamClosedError:
            pass  # it ended meanwhile; its state is cleaned up all the same
        if connection._tryToWriteControlData():
            connection._requestDone(self.stream.streamID)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """C{producer} is paused while the stream's window is shut."""
        if not self._lost:
            self.stream.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.stream.unregisterProducer()

    def getPeer(self) -> Any:
        return self.stream.getPeer()

    def getHost(self) -> Any:
        return self.stream.getHost()

    # -- IPushProducer: the client's DATA, paused by holding back its acknowledgement

    def pauseProducing(self) -> None:
        self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._lost:
            self.stream.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()
