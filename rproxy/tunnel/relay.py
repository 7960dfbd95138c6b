"""
The frame relay of a message-aware WebSocket tunnel (see L{rproxy.tunnel.messages}): wsproto's frame layer in
each direction, imported only when a route with WebSocket limits relays its first tunnel.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from twisted.logger import Logger
from wsproto.frame_protocol import CloseReason, Frame, FrameProtocol, Opcode, ParseFailed

from rproxy.tunnel.splice import Deliver, Tunnel

if TYPE_CHECKING:
    from rproxy.tunnel.messages import WebSocketLimits

_log = Logger()


class _Direction:
    """The frames going one way: parsed as the receiving end of the sender, re-framed for the other side."""

    def __init__(self, relay: MessageRelay, fromClient: bool, deliver: Deliver) -> None:
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


class MessageRelay:
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
