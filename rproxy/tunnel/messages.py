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

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from twisted.logger import Logger

from rproxy.proxy.service import Service
from rproxy.tunnel.splice import Tunnel

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


def messageRelay(limits: WebSocketLimits) -> Callable[[Tunnel], None]:
    """What L{rproxy.tunnel.splice.splice} calls to parse a WebSocket tunnel's frames under C{limits}."""

    def relay(tunnel: Tunnel) -> None:
        from rproxy.tunnel.relay import MessageRelay  # wsproto, when a message-aware route first needs it

        MessageRelay(tunnel, limits)

    return relay
