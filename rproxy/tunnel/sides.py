"""
The two sides of a tunnel, whatever carries them: a client's connection, a client's HTTP/2 stream, an
upstream's connection.

After a protocol switch, the protocol that carried HTTP on a connection hands its side over as a
L{TunnelSide}: a byte stream both ways, with backpressure both ways, that delivers what arrives to the
L{TunnelReceiver} the tunnel attaches.  L{TransportSide} is the side of a whole connection (HTTP/1.1 on
either side of the proxy): the protocol that owns the transport passes its events on to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from rproxy.downstream.contract import Producer


class TunnelReceiver(Protocol):
    """Where the bytes one side of a tunnel sends go, once the tunnel is spliced."""

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the side."""

    def readConnectionLost(self) -> None:
        """The side will send nothing more (a FIN, or the end of an HTTP/2 stream)."""

    def writeConnectionLost(self) -> None:
        """Our FIN to the side is out (after L{TunnelSide.loseWriteConnection})."""

    def connectionLost(self, reason: Failure) -> None:
        """The side is gone."""


class TunnelSide(Protocol):
    """
    One side of a tunnel after a protocol switch.

    @ivar halfCloses: whether it can send a FIN while it goes on reading (plain TCP); otherwise the end of
        one direction ends the side.
    """

    halfCloses: bool

    def attach(self, receiver: TunnelReceiver) -> bytes:
        """
        Deliver what the side sends to C{receiver} from now on; return what it sent early (after the head
        that switched protocols), which was delivered nowhere.
        """

    def write(self, data: bytes) -> None:
        """Send C{data}."""

    def loseWriteConnection(self) -> None:
        """Send nothing more: a FIN once what is written is sent (or the end of the stream)."""

    def loseConnection(self) -> None:
        """Close once what is written is sent."""

    def abortConnection(self) -> None:
        """Reset now (the other side failed)."""

    def registerProducer(self, producer: Producer, streaming: bool) -> None:
        """Pause C{producer} while the side cannot take more."""

    def unregisterProducer(self) -> None:
        """No producer any more."""

    def pauseProducing(self) -> None:
        """Stop delivering what the side sends (the other side cannot take it)."""

    def resumeProducing(self) -> None:
        """Deliver again."""

    def stopProducing(self) -> None:
        """The other side, which this one produced for, is gone."""


class TransportSide:
    """
    A whole connection as a tunnel's side: it writes to the transport, and the protocol that owns the
    transport passes on what it hears (L{dataReceived}, L{readConnectionLost}, L{connectionLost}).

    @ivar lost: whether the connection is gone.
    """

    def __init__(self, transport: Any, early: bytes, onLost: Callable[[Failure], object] | None = None) -> None:
        """
        @param early: what the peer sent after the head that switched protocols.
        @param onLost: called when the connection is gone, after the receiver (so that whatever counted the
            connection forgets it as usual).
        """
        self.transport = transport
        self.halfCloses = IHalfCloseableDescriptor.providedBy(transport)
        self.lost = False
        self._early = early
        self._onLost = onLost
        self._receiver: TunnelReceiver | None = None

    def attach(self, receiver: TunnelReceiver) -> bytes:
        self._receiver = receiver
        early, self._early = self._early, b""
        return early

    # -- what the owning protocol passes on

    def dataReceived(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.dataReceived(data)
        else:
            self._early += data

    def readConnectionLost(self) -> None:
        if self._receiver is not None:
            self._receiver.readConnectionLost()

    def writeConnectionLost(self) -> None:
        if self._receiver is not None:
            self._receiver.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        if self._receiver is not None:
            self._receiver.connectionLost(reason)
        if self._onLost is not None:
            self._onLost(reason)

    # -- the transport, as the tunnel uses it

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def loseWriteConnection(self) -> None:
        if not self.lost:
            self.transport.unregisterProducer()  # a paused producer would hold the FIN back
            if self.halfCloses:
                self.transport.loseWriteConnection()
            else:
                self.transport.loseConnection()

    def loseConnection(self) -> None:
        if not self.lost:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        if not self.lost:
            self.transport.unregisterProducer()
            self.transport.abortConnection()

    def registerProducer(self, producer: Producer, streaming: bool) -> None:
        if not self.lost:
            self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self.lost:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        if not self.lost:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.lost:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The transport it produced for is gone: close once what is written is sent, as a transport does."""
        self.loseConnection()
