"""
A L{Downstream} over any twisted.web request, for L{rproxy.proxy.resource.ReverseProxyResource} mounted
in a plain twisted.web site: it uses the request's public API only, so it works on any Twisted.

What that API cannot express is left out, as Twisted's own site leaves it out: informational responses
(Twisted answers ``Expect: 100-continue`` itself), trailers, and protocol switches (a 101 from an upstream
is refused with 502).  Errors are answered, and logged, as on rproxy's own site (L{sendError}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request

from rproxy.errors import ProxyError, upstreamError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress
    from twisted.web.http_headers import Headers

    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.downstream.contract import Producer
    from rproxy.observe.record import ExchangeRecord
    from rproxy.tunnel.sides import TunnelSide

_log = Logger()


def sendError(request: Request, error: ProxyError, abort: Callable[[], None]) -> None:
    """
    Answer C{request} with C{error} (status, one-line reason, C{Proxy-Status}) and log it; if the response
    has already begun, call C{abort} instead: a truncated response must never look complete.
    """
    if request.finished:  # answered already: the client's own input was refused
        return
    _log.warn(
        "{method} {target} -> {status} ({fault} fault, {errorType}): {reason}",
        method=(request.method or b"-").decode("latin-1"),
        target=(request.uri or b"-").decode("latin-1"),
        status=error.status,
        fault=error.fault.value,
        errorType=error.errorType,
        reason=error.reason,
        client=request.getClientAddress(),
    )
    if request.channel is None:  # the client is gone
        return
    if request.startedWriting:
        request.unregisterProducer()
        abort()
        return
    request.setResponseCode(error.status, error.phrase)
    headers = request.responseHeaders
    fields = error.responseHead()
    record = getattr(request, "record", None)
    if record is not None and record.requestId is not None:
        fields.append((b"X-Request-ID", record.requestId.encode("ascii")))
    for name, _ in fields:
        headers.removeHeader(name)
    for name, value in fields:
        headers.addRawHeader(name, value)
    request.write(error.body())
    request.finish()


class WebRequestDownstream:
    """The client of a request that a plain twisted.web site carries (see the module)."""

    upgradable = False
    extendedConnect: bytes | None = None
    record: ExchangeRecord | None = None  # a plain twisted.web site logs in its own way

    def __init__(self, request: Request, body: RequestBodyPipe | None) -> None:
        self._request = request
        self.method: bytes = request.method
        self.clientproto: bytes = request.clientproto
        self.requestHeaders: Headers = request.requestHeaders
        self.bodyPipe = body

    def getClientAddress(self) -> IAddress:
        return self._request.getClientAddress()

    def isSecure(self) -> bool:
        return bool(self._request.isSecure())

    def whenGone(self, callback: Callable[[Failure], object]) -> None:
        self._request.notifyFinish().addErrback(callback)

    def sendInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Nothing: twisted.web has no way to send one."""

    def continueBody(self) -> None:
        """Nothing: twisted.web has read the body already."""

    def sendHead(self, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool) -> None:
        request = self._request
        request.setResponseCode(status, reason)
        headers = request.responseHeaders
        for name, value in fields:
            headers.addRawHeader(name, value)
        request.write(b"")  # the head goes now, even if the body is slow to come

    def write(self, data: bytes) -> None:
        self._request.write(data)

    def registerProducer(self, producer: Producer, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._request.unregisterProducer()

    def finish(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """End the response (twisted.web cannot send C{trailers}: they are dropped)."""
        if not self._request.finished and self._request.channel is not None:
            self._request.finish()

    def fail(self, error: ProxyError) -> None:
        sendError(self._request, error, self._abort)

    def stopKeepAlive(self) -> None:
        if not self._request.startedWriting:
            self._request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def switchProtocols(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> TunnelSide:
        """Never called: the exchange asks for no switch where L{upgradable} is false."""
        raise upstreamError(502, "a plain twisted.web site cannot switch protocols", "http_protocol_error")

    def _abort(self) -> None:
        transport: Any = self._request.transport
        if transport is not None:
            transport.abortConnection()
