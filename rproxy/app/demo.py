"""
A demo upstream to try rproxy against (``make run``): echo, streaming, slow and large responses::

    /echo            the request as received (method, target, headers, body size and digest), as JSON
    /stream?n=5&interval=1   Server-Sent Events, one per interval
    /slow?delay=2    answers after a delay
    /large?size=100M a large body, produced as the client reads

An argument that is not a number in its range (C{n} at most 10000, C{interval} and C{delay} at most an
hour) is answered with 400, as any upstream should answer bad input.
"""

from __future__ import annotations

import hashlib
import json
import math

from twisted.internet import reactor as globalReactor
from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from twisted.web.http import Request
from zope.interface import implementer

from rproxy.options import parseSize

_INDEX = b"""rproxy demo upstream
  /echo                    the request as received, as JSON
  /stream?n=5&interval=1   Server-Sent Events
  /slow?delay=2            a response after a delay
  /large?size=100M         a large body, streamed with backpressure
"""


def _arg(request: Request, name: bytes, default: str) -> str:
    return (request.args.get(name) or [default.encode()])[0].decode("ascii", "replace")


def _number(request: Request, name: bytes, default: str, most: float) -> float:
    """The argument C{name} as a number from 0 to C{most}; C{ValueError} (a 400) for anything else."""
    text = _arg(request, name, default)
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= most):
        raise ValueError(f"{name.decode()}={text!r} is not from 0 to {most:g}")
    return value


class _Checked(resource.Resource):
    """A demo resource reading query arguments: one that does not parse (C{ValueError}) is answered 400."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        try:
            return super().render(request)  # type: ignore[no-any-return]
        except ValueError as e:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"bad argument: {e}\n".encode()


class Index(resource.Resource):
    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return _INDEX


class Echo(resource.Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"content-type", b"application/json")
        return (
            json.dumps(
                {
                    "method": request.method.decode("latin-1"),
                    "uri": request.uri.decode("latin-1"),
                    "headers": [
                        [name.decode("latin-1"), value.decode("latin-1")]
                        for name, values in request.requestHeaders.getAllRawHeaders()
                        for value in values
                    ],
                    "bodyLength": len(body),
                    "bodySha256": hashlib.sha256(body).hexdigest(),
                },
                indent=1,
            ).encode()
            + b"\n"
        )


class Stream(_Checked):
    def render_GET(self, request: Request) -> int:
        count, interval = int(_number(request, b"n", "5", 10000)), _number(request, b"interval", "1", 3600)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")

        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def send(i: int) -> None:
            if request.finished or gone:
                return
            request.write(b"id: %d\ndata: event %d of %d\n\n" % (i, i, count))
            if i < count:
                globalReactor.callLater(interval, send, i + 1)
            else:
                request.finish()

        request.write(b"")
        send(1)
        return server.NOT_DONE_YET


class Slow(_Checked):
    def render_GET(self, request: Request) -> int:
        delay = _number(request, b"delay", "2", 3600)

        def answer() -> None:  # cancelled below if the client goes away first
            request.write(b"answered after %gs\n" % delay)
            request.finish()

        call = globalReactor.callLater(delay, answer)

        def clientGone(reason: object) -> None:
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(clientGone)
        return server.NOT_DONE_YET


@implementer(IPushProducer)
class _Filler:
    """Writes C{size} bytes as fast as the consumer takes them."""

    CHUNK = b"x" * 65536

    def __init__(self, request: Request, size: int) -> None:
        self.request = request
        self.left = size
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            chunk = self.CHUNK[: self.left]
            self.left -= len(chunk)
            self.request.write(chunk)
        if self.left == 0 and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.left = -1


class Large(_Checked):
    def render_GET(self, request: Request) -> int:
        size = parseSize(_arg(request, b"size", "100M"))
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % size)
        filler = _Filler(request, size)
        request.registerProducer(filler, True)
        globalReactor.callLater(0, filler.resumeProducing)
        return server.NOT_DONE_YET


def demoSite() -> server.Site:
    """The demo upstream's site."""
    root = Index()
    root.putChild(b"", root)
    root.putChild(b"echo", Echo())
    root.putChild(b"stream", Stream())
    root.putChild(b"slow", Slow())
    root.putChild(b"large", Large())
    site = server.Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # the proxy logs access
    return site
