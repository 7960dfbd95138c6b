"""Built-in directors (each an L{IDirector})."""

from __future__ import annotations

from zope.interface import implementer

from rproxy.interfaces import IDirector
from rproxy.message import InboundRequest, OutboundRequest
from rproxy.upstream import Service


@implementer(IDirector)
class SingleServiceDirector:
    """Every request goes to one service, unchanged."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def direct(self, inbound: InboundRequest, outbound: OutboundRequest) -> Service:
        return self.service
