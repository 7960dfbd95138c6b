"""
HTTP/1.1 Upgrade (RFC 9110 section 7.8): WebSocket and every other protocol a client switches to.

An HTTP/1.1 request that lists ``upgrade`` in ``Connection`` and names protocols in ``Upgrade`` is sent
upstream as an upgrade request (L{requestedProtocols}); ``h2c`` is never among them (an ``h2c`` upgrade
through a proxy is a known way to smuggle requests past it).  Requests of HTTP/1.0 and HTTP/2 clients
have their ``Upgrade`` dropped as the hop-by-hop field it is, and are proxied as usual, as Go does.

When the upstream answers 101 with protocols the client asked for, L{splice} answers the client and joins
its side and the upstream's (L{rproxy.tunnel.sides.TunnelSide}: a connection, or an HTTP/2 stream for
RFC 8441, L{rproxy.tunnel.h2connect}) in a L{Tunnel}: each side is the producer of the other
(backpressure in both directions), the bytes either side sent early (after the client's request head,
after the upstream's 101 head) are replayed first, a FIN from one side becomes a half-close of the other
(plain TCP; a TLS connection has no half-close, so the other side is closed), and an idle timeout ends a
silent tunnel.
On a route with message limits (L{rproxy.tunnel.messages}), the WebSocket frames are parsed on their way
instead of being copied.

L{Tunnels} is the registry of a proxy's open tunnels and their counts (the admin API's ``/state`` shows
them).  A tunnel's client connection stays one of its site's connections: it counts against the client
connection limit, and shutdown resets it at the end of the grace period like any connection still busy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.headers import Pairs, isToken, splitTokens

if TYPE_CHECKING:
    from rproxy.downstream.contract import Downstream
    from rproxy.observe.record import ExchangeRecord
    from rproxy.tunnel.sides import TunnelSide

_log = Logger()

#: Seconds a tunnel may stay silent both ways before it is closed (C{--tunnel-idle-timeout}).
DEFAULT_IDLE_TIMEOUT = 300.0

#: The upgrade token never forwarded: HTTP/2 over cleartext, which lets a client talk past the proxy.
_H2C = b"h2c"


def requestedProtocols(downstream: Downstream) -> tuple[bytes, ...]:
    """
    The protocols C{downstream}'s request asks to switch to, as sent, without ``h2c`` and without names
    that are not C{token[/token]}; empty when it is no upgrade request, or one that is not honoured (its
    connection cannot switch: not HTTP/1.1; or ``upgrade`` is not listed in ``Connection``): its
    ``Upgrade`` is then dropped as hop-by-hop.
    """
    headers = downstream.requestHeaders
    values = headers.getRawHeaders(b"upgrade")
    if not values or not downstream.upgradable:
        return ()
    if b"upgrade" not in set(splitTokens(headers.getRawHeaders(b"connection", ()))):
        return ()
    protocols = []
    for value in values:
        for protocol in value.split(b","):
            protocol = protocol.strip(b" \t")
            if not protocol:
                continue
            name, slash, version = protocol.partition(b"/")
            if isToken(name) and (not slash or isToken(version)) and name.lower() != _H2C:
                protocols.append(protocol)
    return tuple(protocols)


def unrequestedProtocol(offered: Sequence[bytes], headers: Pairs) -> str | None:
    """
    Why a 101 with C{headers} must not be spliced for a client that C{offered} those protocols: it names
    none, or one the client did not ask for; C{None} when it may.
    """
    switched = [
        protocol.strip(b" \t")
        for name, value in headers
        if name.lower() == b"upgrade"
        for protocol in value.split(b",")
        if protocol.strip(b" \t")
    ]
    if not switched:
        return "upstream switched protocols without naming one in Upgrade"
    asked = {protocol.lower() for protocol in offered}
    for protocol in switched:
        if protocol.lower() not in asked:
            return (
                f"upstream switched to protocol {protocol[:64].decode('latin-1')!r}, which the client did not "
                f"ask for ({b', '.join(offered).decode('latin-1')})"
            )
    return None


@dataclass
class TunnelCounts:
    """
    What a proxy's tunnels carried, since it started.

    @ivar opened: tunnels spliced.
    @ivar bytesFromClients: bytes the clients sent through tunnels (frames included).
    @ivar bytesFromUpstreams: bytes the upstreams sent through tunnels.
    @ivar messagesFromClients: WebSocket messages from clients, on routes that parse them.
    @ivar messagesFromUpstreams: WebSocket messages from upstreams, on routes that parse them.
    @ivar closedByLimits: WebSocket tunnels closed because a message limit was broken.
    @ivar closedIdle: tunnels closed by the idle timeout.
    """

    opened: int = 0
    bytesFromClients: int = 0
    bytesFromUpstreams: int = 0
    messagesFromClients: int = 0
    messagesFromUpstreams: int = 0
    closedByLimits: int = 0
    closedIdle: int = 0


class Tunnels:
    """
    A proxy's open tunnels, their idle timeout and their counts.

    @ivar idleTimeout: seconds a tunnel may be silent both ways (applies to tunnels opened from then on).
    @ivar open: the tunnels open now.
    @ivar counts: totals since the proxy started.
    """

    def __init__(self, reactor: IReactorTime, idleTimeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.open: set[Tunnel] = set()
        self.counts = TunnelCounts()

    def describe(self) -> dict[str, int]:
        """The counts as the admin API shows them: C{open} now, and the totals."""
        return {"open": len(self.open), **{each.name: getattr(self.counts, each.name) for each in fields(self.counts)}}

    def closeAll(self) -> None:
        """Close every open tunnel (what is already written is sent first)."""
        for tunnel in list(self.open):
            tunnel.close()


#: Where the bytes one side of a tunnel sends go: straight to the other side, or through a parser.
Deliver = Callable[[bytes], None]


class _TunnelEnd:
    """
    One side of a tunnel: what receives the side's bytes, FIN and end (a L{TunnelReceiver}).

    @ivar side: the side.
    @ivar peer: the other end.
    @ivar deliver: where the side's bytes go.
    """

    peer: _TunnelEnd
    deliver: Deliver

    def __init__(self, tunnel: Tunnel, fromClient: bool, side: TunnelSide) -> None:
        self.tunnel = tunnel
        self.fromClient = fromClient
        self.side = side
        self._readDone = False
        self._writeDone = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.carried(self.fromClient, len(data))
        self.deliver(data)

    def readConnectionLost(self) -> None:
        """The side sent its FIN: pass it on as the other side's half-close."""
        self._readDone = True
        self.peer.shutDownWrite()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self._writeDone = True
        self._closeIfDone()

    def shutDownWrite(self) -> None:
        """Nothing more will be written to this side: a FIN after what is buffered, or a close."""
        if not self.lost:
            self.side.loseWriteConnection()

    def _closeIfDone(self) -> None:
        if self._readDone and self._writeDone:
            self.side.loseConnection()

    def close(self, abort: bool = False) -> None:
        """Close this side (C{abort}: reset it, dropping what is not sent yet)."""
        if self.lost:
            return
        if abort:
            self.side.abortConnection()
        else:
            self.side.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.tunnel.sideLost(self, reason)


class Tunnel:
    """
    A client's side and an upstream's side spliced after a protocol switch.

    @ivar label: how logs name it (the request and the upstream).
    @ivar client: the client's end.
    @ivar upstream: the upstream's end.
    """

    _idleTimer: IDelayedCall | None = None

    def __init__(
        self,
        tunnels: Tunnels,
        label: str,
        client: TunnelSide,
        upstream: TunnelSide,
        record: ExchangeRecord | None = None,
    ) -> None:
        self.tunnels = tunnels
        self._record = record  # the exchange's, which counts what the tunnel carries
        self.label = label
        self.client = _TunnelEnd(self, True, client)
        self.upstream = _TunnelEnd(self, False, upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.deliver, self.upstream.deliver = upstream.write, client.write
        reactor = tunnels.reactor
        self._openedAt = self._activeAt = reactor.seconds()
        self.bytesFromClient = self.bytesFromUpstream = 0
        if tunnels.idleTimeout:
            self._idleTimeout = tunnels.idleTimeout
            self._idleTimer = reactor.callLater(self._idleTimeout, self._idleCheck)
        tunnels.open.add(self)
        tunnels.counts.opened += 1

    def carried(self, fromClient: bool, length: int) -> None:
        """C{length} bytes arrived from one side."""
        self._activeAt = self.tunnels.reactor.seconds()
        counts = self.tunnels.counts
        record = self._record
        if fromClient:
            self.bytesFromClient += length
            counts.bytesFromClients += length
            if record is not None:
                record.splicedIn += length
        else:
            self.bytesFromUpstream += length
            counts.bytesFromUpstreams += length
            if record is not None:
                record.splicedOut += length

    def start(self) -> None:
        """Replay the early bytes of each side, then let both flow, each side pacing the other."""
        client, upstream = self.client.side, self.upstream.side
        clientEarly = client.attach(self.client)
        upstreamEarly = upstream.attach(self.upstream)
        for side in (client, upstream):
            side.unregisterProducer()  # the HTTP response's, or the request body's
        if upstreamEarly:
            self.upstream.dataReceived(upstreamEarly)
        if clientEarly:
            self.client.dataReceived(clientEarly)
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)
        client.resumeProducing()  # a client that sent much before its response may have been paused
        upstream.resumeProducing()

    def close(self, abort: bool = False) -> None:
        """Close both sides (C{abort}: reset them)."""
        self.client.close(abort)
        self.upstream.close(abort)

    def _idleCheck(self) -> None:
        reactor = self.tunnels.reactor
        silent = reactor.seconds() - self._activeAt
        if silent < self._idleTimeout:
            self._idleTimer = reactor.callLater(self._idleTimeout - silent, self._idleCheck)
            return
        self._idleTimer = None
        self.tunnels.counts.closedIdle += 1
        _log.info("closing tunnel {tunnel}: silent for {timeout:g}s", tunnel=self.label, timeout=self._idleTimeout)
        self.close(abort=True)

    def sideLost(self, end: _TunnelEnd, reason: Failure) -> None:
        """One side is gone: close the other (reset it, if this one was reset)."""
        other = end.peer
        if not other.lost:
            other.close(abort=not reason.check(ConnectionDone))
            return
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.cancel()
        self._idleTimer = None
        self.tunnels.open.discard(self)
        _log.info(
            "tunnel {tunnel} closed after {duration:.3f}s: {fromClient} bytes from the client, "
            "{fromUpstream} from the upstream",
            tunnel=self.label,
            duration=self.tunnels.reactor.seconds() - self._openedAt,
            fromClient=self.bytesFromClient,
            fromUpstream=self.bytesFromUpstream,
        )


def splice(
    tunnels: Tunnels,
    downstream: Downstream,
    status: int,
    fields: Sequence[tuple[bytes, bytes]],
    upstream: TunnelSide,
    label: str,
    relay: Callable[[Tunnel], None] | None = None,
) -> Tunnel:
    """
    Answer C{downstream}'s client with C{status} and C{fields} (a 101, or the 200 of an extended CONNECT)
    and splice its side with C{upstream}'s.  C{relay}, if given, puts a parser between the two sides first.
    """
    tunnel = Tunnel(tunnels, label, downstream.switchProtocols(status, fields), upstream, downstream.record)
    if relay is not None:
        relay(tunnel)
    tunnel.start()
    return tunnel
