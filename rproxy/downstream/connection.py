"""
One client connection, whatever it speaks: it registers with its site (so that shutdown can drain it),
chooses its protocol, and passes the transport's events to the protocol in charge.

The protocol is HTTP/2 when TLS negotiated ``h2`` with ALPN, or when a plain connection opens with the
HTTP/2 preface (h2c with prior knowledge, however the preface is split); HTTP/1.1 otherwise.  After a
protocol switch, a tunnel takes the connection over (L{takeOver}): from then on the connection's bytes,
its half-close and its end go to the tunnel.

It asks the transport for its addresses and TLS state once, for every request of the connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, ISSLTransport, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from rproxy.tunnel.sides import TransportSide

if TYPE_CHECKING:
    from rproxy.downstream.http1 import HTTP11Server
    from rproxy.downstream.site import ProxySite

#: What opens an HTTP/2 connection with prior knowledge (RFC 9113 section 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ConnectionHandler(Protocol):
    """The protocol in charge of a client connection: HTTP/1.1, HTTP/2, or a tunnel's side."""

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client."""

    def connectionLost(self, reason: Failure) -> None:
        """The connection is gone."""

    def drain(self) -> None:
        """Shutdown: finish what is in flight, take nothing new, close."""


class ClientConnection(TwistedProtocol):
    """
    A client's connection (see the module).

    @ivar site: the site it belongs to.
    @ivar clientKey: the key its client's address counts under (L{rproxy.downstream.limits.addressKey}), or
        C{None} when connections per client are not counted.
    @ivar handler: the protocol in charge.
    """

    transport: Any
    handler: ConnectionHandler
    _http1: HTTP11Server
    _sniffed = b""  # the start of what may be the HTTP/2 preface, until there is enough to tell
    _chosen = False
    _peer: IAddress | None = None
    _host: IAddress | None = None
    _secure: bool | None = None
    _tls: tuple[str, str | None, str | None] | None = None

    def __init__(self, site: ProxySite, clientKey: bytes | None = None) -> None:
        self.site = site
        self.clientKey = clientKey

    def connectionMade(self) -> None:
        self.site.opened(self)
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self._http1 = self.site.http1(self)
        self.handler = self._http1

    def dataReceived(self, data: bytes) -> None:
        if self._chosen:
            self.handler.dataReceived(data)
            return
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated is None:
            data = self._sniffed + data
            if len(data) < len(PREFACE) and PREFACE.startswith(data):
                self._sniffed = data
                self._http1.headStarted()  # it may be an HTTP/1.1 head too
                return
            self._sniffed = b""
            negotiated = b"h2" if data.startswith(PREFACE) else b"http/1.1"
        self._chosen = True
        if negotiated == b"h2":
            previous = self.handler
            self.handler = self.site.http2(self)
            previous.connectionLost(Failure(connectionDone))  # its timers go; it never saw a byte
        self.handler.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.closed(self)
        self.handler.connectionLost(reason)

    def readConnectionLost(self) -> None:
        """The client sent its FIN (only asked once a tunnel has the connection, see L{takeOver})."""
        side: Any = self.handler
        side.readConnectionLost()

    def writeConnectionLost(self) -> None:
        """Our FIN is out (only once a tunnel has the connection)."""
        side: Any = self.handler
        side.writeConnectionLost()

    def drain(self) -> None:
        """Shutdown: see L{ConnectionHandler.drain}."""
        self.handler.drain()

    def takeOver(self, early: bytes) -> TransportSide:
        """
        The connection switched protocols: hand it to a tunnel as a side, with C{early}, what the client
        sent after its request.  The HTTP protocol that carried it still hears when it is gone.
        """
        previous = self.handler
        side = _ConnectionSide(self.transport, early, previous.connectionLost)
        self.handler = side
        if side.halfCloses:
            alsoProvides(self, IHalfCloseableProtocol)  # a FIN from the client is passed on, not the end
        return side

    # -- what every request of the connection asks

    @property
    def peer(self) -> IAddress:
        """The client's address."""
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    @property
    def host(self) -> IAddress:
        """The local address the client connected to."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    @property
    def secure(self) -> bool:
        """Whether the connection is TLS."""
        if self._secure is None:
            self._secure = ISSLTransport(self.transport, None) is not None
        return self._secure

    @property
    def tls(self) -> tuple[str, str | None, str | None] | None:
        """C{(version, server name, ALPN protocol)} of a TLS connection (read once), else C{None}."""
        system = ISystemHandle(self.transport, None) if self._tls is None and self.secure else None
        if system is not None:
            handle = cast(SSL.Connection, system.getHandle())  # a TLS transport's handle: pyOpenSSL's
            name = handle.get_servername()
            negotiated = getattr(self.transport, "negotiatedProtocol", None)
            self._tls = (
                handle.get_protocol_version_name(),
                name.decode("ascii", "replace") if name else None,
                negotiated.decode("ascii", "replace") if negotiated else None,
            )
        return self._tls


class _ConnectionSide(TransportSide):
    """The client's connection as a tunnel's side (it has no draining of its own: the tunnel has its end)."""

    def drain(self) -> None:
        """Shutdown resets what is left of a tunnel when the grace period ends, like any busy connection."""
