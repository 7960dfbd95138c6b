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

The client's HTTP/2 protocol hands the stream to the tunnel as its side (L{rproxy.tunnel.sides}), so
that the HTTP/1.1 splice (idle timeout, counts, message-aware routes, drain on shutdown) serves both:
client DATA is delivered to the tunnel and acknowledged only as the upstream's socket takes it, upstream
bytes go out as DATA frames as the stream's window allows, a client END_STREAM becomes a half-close (FIN)
of the upstream, an upstream FIN or close becomes END_STREAM, an upstream reset becomes
RST_STREAM(CONNECT_ERROR), and a client RST_STREAM resets the upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rproxy.errors import ProxyError, clientError
from rproxy.headers import Pairs

if TYPE_CHECKING:
    from rproxy.downstream.contract import Downstream
    from rproxy.proxy.message import OutboundRequest

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


def webSocketOverH2(downstream: Downstream) -> WebSocketOverH2 | None:
    """The RFC 8441 WebSocket that C{downstream}'s request opens, if it is an extended CONNECT (checked already)."""
    if downstream.extendedConnect is not None and downstream.method == b"CONNECT":
        return WebSocketOverH2()
    return None


class WebSocketOverH2:
    """
    One extended CONNECT on its way: the upstream request it becomes, and the check of the upstream's
    101.

    @ivar key: the ``Sec-WebSocket-Key`` sent upstream.
    """

    #: What the upstream request asks to switch to (L{rproxy.upstream.connection.RequestHead.upgrade}).
    upgrade = (WEBSOCKET,)

    def __init__(self) -> None:
        from wsproto.utilities import generate_nonce  # wsproto when a WebSocket first comes over HTTP/2

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
        from wsproto.utilities import generate_accept_token

        expected = generate_accept_token(self.key)
        if accepts != [expected]:
            return "upstream's Sec-WebSocket-Accept does not match the key the proxy sent"
        return None

    def responseFields(self, fields: Pairs) -> Pairs:
        """The fields of the client's 200: the upstream 101's end-to-end ones, but the handshake's own."""
        return [(name.lower(), value) for name, value in fields if name.lower() not in _HANDSHAKE_ONLY]
