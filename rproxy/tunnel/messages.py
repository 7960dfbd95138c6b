"""
Message-aware WebSocket routes: the frames of a tunnel parsed both ways, with limits.

A route with C{websocket = { max-message-size = "1MiB", max-messages-per-second = 100 }} sends its requests
to a L{MessageAwareService}.  When such a request switches to WebSocket, L{messageRelay} puts a parser
(wsproto's frame layer) in each direction of the tunnel: client frames must be masked and are re-masked
for the upstream, upstream frames must not be.  Data frames are re-framed as they come (a message is never
held whole), pings, pongs and close frames pass through with their payloads and codes, and every message
and byte is counted.  A message larger than the limit closes both sides with 1009 (Message Too Big); a
client sending more messages per second than allowed is closed with 1008 (Policy Violation), and so is
its upstream; a frame that breaks RFC 6455 closes both with the parser's code (1002 or 1007).

No extension is negotiated on these routes (the client's ``Sec-WebSocket-Extensions`` is not forwarded):
a compressed message cannot be measured without inflating it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from twisted.logger import Logger
from wsproto.frame_protocol import CloseReason, Frame, FrameProtocol, Opcode, ParseFailed

from rproxy.proxy.service import Service
from rproxy.tunnel.splice import Deliver, Tunnel

_log = Logger()


@dataclass(frozen=True)
class WebSocketLimits:
    """
    What a message-aware route allows (0: no limit).

    @ivar maxMessageSize: the largest message, in bytes (text counted encoded), either way.
    @ivar maxMessagesPerSecond: the most messages a client may send in any one second.
    """

    maxMessageSize: int = 0
    maxMessagesPerSecond: int = 0

    def __post_init__(self) -> None:
        for each in fields(self):
            if getattr(self, each.name) < 0:
                raise ValueError(f"{each.name} must not be negative")


@dataclass(frozen=True)
class MessageAwareService(Service):
    """
    A service as a route with WebSocket limits sends to it: its WebSockets are parsed, not copied.

    @ivar websocket: the route's limits.
    """

    websocket: WebSocketLimits = WebSocketLimits()

    @classmethod
    def of(cls, service: Service, limits: WebSocketLimits) -> MessageAwareService:
        """C{service}, with C{limits} for its WebSockets."""
        if isinstance(service, MessageAwareService):
            return replace(service, websocket=limits)
        return cls(**{each.name: getattr(service, each.name) for each in fields(service)}, websocket=limits)


class _Direction:
    """The frames going one way: parsed as the receiving end of the sender, re-framed for the other side."""

    def __init__(self, relay: _MessageRelay, fromClient: bool, deliver: Deliver) -> None:
        self.relay = relay
        self.fromClient = fromClient
        self.deliver = deliver
        self.parser = FrameProtocol(client=not fromClient, extensions=[])
        self.writer = FrameProtocol(client=fromClient, extensions=[])
        self.messageSize = 0
        self.inMessage = False
        self.started: deque[float] = deque(maxlen=relay.limits.maxMessagesPerSecond or 1)

    def dataReceived(self, data: bytes) -> None:
        if self.relay.closed:
            return
        self.parser.receive_bytes(data)
        try:
            for frame in self.parser.received_frames():
                self._frame(frame)
                if self.relay.closed:
                    return
        except ParseFailed as e:
            self.relay.fail(int(e.code), f"invalid frame from the {self._sender}: {e}")

    @property
    def _sender(self) -> str:
        return "client" if self.fromClient else "upstream"

    def send(self, frame: bytearray) -> None:
        """Write one frame (that the writer serialized) to the receiving side."""
        self.deliver(bytes(frame))

    def _frame(self, frame: Frame) -> None:
        opcode, payload = frame.opcode, frame.payload
        if isinstance(payload, tuple):  # a close frame's code and reason
            code, reason = payload
            self.send(self.writer.close(code, reason or None))
        elif isinstance(payload, str):
            self._data(payload, frame.message_finished)
        elif opcode is Opcode.PING:
            self.send(self.writer.ping(payload))
        elif opcode is Opcode.PONG:
            self.send(self.writer.pong(payload))
        else:
            self._data(payload, frame.message_finished)

    def _data(self, payload: bytes | str, finished: bool) -> None:
        limits, relay = self.relay.limits, self.relay
        if not self.inMessage and self.fromClient and limits.maxMessagesPerSecond:
            now = relay.tunnel.tunnels.reactor.seconds()
            started = self.started
            if len(started) == started.maxlen and now - started[0] < 1.0:
                relay.fail(
                    CloseReason.POLICY_VIOLATION,
                    f"more than {limits.maxMessagesPerSecond} messages per second",
                    byLimit=True,
                )
                return
            started.append(now)
        size = len(payload.encode()) if isinstance(payload, str) else len(payload)
        self.messageSize += size
        self.inMessage = not finished
        if limits.maxMessageSize and self.messageSize > limits.maxMessageSize:
            relay.fail(
                CloseReason.MESSAGE_TOO_BIG,
                f"a message from the {self._sender} exceeds {limits.maxMessageSize} bytes",
                byLimit=True,
            )
            return
        self.send(self.writer.send_data(payload, finished))
        if finished:
            self.messageSize = 0
            counts = relay.tunnel.tunnels.counts
            if self.fromClient:
                counts.messagesFromClients += 1
            else:
                counts.messagesFromUpstreams += 1


class _MessageRelay:
    """Both directions of one message-aware tunnel."""

    def __init__(self, tunnel: Tunnel, limits: WebSocketLimits) -> None:
        self.tunnel = tunnel
        self.limits = limits
        self.closed = False
        client, upstream = tunnel.client, tunnel.upstream
        self.fromClient = _Direction(self, True, upstream.side.write)
        self.fromUpstream = _Direction(self, False, client.side.write)
        client.deliver = self.fromClient.dataReceived
        upstream.deliver = self.fromUpstream.dataReceived

    def fail(self, code: int, reason: str, byLimit: bool = False) -> None:
        """Close both sides with C{code}: each gets a close frame, then its connection is closed."""
        self.closed = True
        if byLimit:
            self.tunnel.tunnels.counts.closedByLimits += 1
        _log.info(
            "closing WebSocket {tunnel} with {code}: {reason}", tunnel=self.tunnel.label, code=code, reason=reason
        )
        reason = reason[:100]
        self.fromUpstream.send(self.fromUpstream.writer.close(code, reason))  # to the client
        self.fromClient.send(self.fromClient.writer.close(code, reason))  # to the upstream
        self.tunnel.close()


def messageRelay(limits: WebSocketLimits) -> Callable[[Tunnel], None]:
    """What L{rproxy.tunnel.splice.splice} calls to parse a WebSocket tunnel's frames under C{limits}."""

    def relay(tunnel: Tunnel) -> None:
        _MessageRelay(tunnel, limits)

    return relay
