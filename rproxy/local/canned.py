"""A fixed response served by a local route (a maintenance page, a robots.txt, a health answer): L{CannedAnswer}."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from zope.interface import implementer

from rproxy.interfaces import ILocalAnswer
from rproxy.proxy.message import LocalResponse

if TYPE_CHECKING:
    from rproxy.local.responder import Responder
    from rproxy.proxy.message import RequestContext


@implementer(ILocalAnswer)
class CannedAnswer:
    """
    The same response to every request (a C{HEAD} gets its head only).

    @ivar status: its status.
    @ivar fields: its fields (C{Content-Length} is set from the body).
    @ivar body: its body.
    """

    def __init__(self, status: int, fields: Sequence[tuple[bytes, bytes]] = (), body: bytes = b"") -> None:
        self.status = status
        self.fields = tuple(fields)
        self.body = body

    def __repr__(self) -> str:
        return f"<CannedAnswer {self.status}>"

    def serve(self, context: RequestContext, responder: Responder) -> None:
        responder.answer(LocalResponse(self.status, self.fields, self.body))
