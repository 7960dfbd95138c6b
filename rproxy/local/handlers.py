"""
Local routes answered by code named in the configuration (C{handler = "package.module:name"}).

The name is a twisted.web C{IResource} (an instance: a whole resource tree works, its children found below
the route's prefix) or an C{async def} taking a L{HandlerRequest}.  Either gets the request's body read
whole, up to a limit (413 beyond it), before it runs.

An C{async def} handler returns the response: a L{LocalResponse} (status, fields, body), any
L{rproxy.interfaces.ILocalAnswer} (a L{rproxy.local.files.FileAnswer} to stream a file), or C{None} once it
has written a response itself through C{request.responder} (head, body, finish: to stream one).  It may raise a
L{rproxy.errors.ProxyError} (C{clientError(404, "...")}) for the proxy's one-line error response.  When the
client goes away, the coroutine is cancelled.

A resource renders on a twisted.web request of its own (the public C{twisted.web.server.Request}, over a
channel that writes to the L{Responder}), so C{NOT_DONE_YET}, producers (pull ones too) and
C{notifyFinish} work as in a twisted.web site; its C{getHost()} is a stand-in (port 443 or 80), and it has no
sessions.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from zope.interface import implementer

from rproxy.errors import ProxyError, clientError, proxyError
from rproxy.interfaces import ILocalAnswer
from rproxy.proxy.message import LocalResponse

if TYPE_CHECKING:
    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.headers import Pairs
    from rproxy.local.responder import Responder
    from rproxy.proxy.message import RequestContext

_log = Logger()


@dataclass(frozen=True)
class HandlerRequest:
    """
    What an C{async def} handler gets.

    @ivar method: the request method.
    @ivar path: the request-target below the route's prefix, with its query (C{/items/3?full=1}).
    @ivar headers: the request's fields, as the client sent them.
    @ivar client: the client's address (after the trusted-proxy rules).
    @ivar content: the whole request body.
    @ivar context: what the route's filters learnt (C{user}, C{claims}, C{notes}).
    @ivar responder: where a handler that streams its response writes it (then it returns C{None}).
    """

    method: bytes
    path: bytes
    headers: Headers
    client: str | None
    content: bytes
    context: RequestContext
    responder: Responder

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query's arguments, as twisted.web's C{request.args}."""
        return parse_qs(self.path.partition(b"?")[2], keep_blank_values=True)


def load(dotted: str, besides: str | None = None) -> object:
    """
    The object C{"package.module:name"} names (C{name} may be dotted: C{module:App.resource}).

    @param besides: a directory modules are also found in (the config file's: appended to C{sys.path}).
    @raise ValueError: naming C{dotted} and why it could not be loaded.
    """
    module, colon, name = dotted.partition(":")
    if not colon or not module or not name:
        raise ValueError(f"{dotted!r}: expected package.module:name")
    if besides is not None and os.path.abspath(besides) not in sys.path:
        sys.path.append(os.path.abspath(besides))
    try:
        found: object = importlib.import_module(module)
    except Exception as e:
        raise ValueError(f"{dotted!r}: cannot import {module}: {type(e).__name__}: {e}") from None
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"{dotted!r}: {module} has no {name}") from None
    return found


def handlerAnswer(dotted: str, maxBody: int, besides: str | None = None) -> ILocalAnswer:
    """
    The answer of the handler C{dotted} names: an C{IResource} or an C{async def} (see the module).

    @param maxBody: the largest request body it is given, in bytes.
    @param besides: a directory modules are also found in (see L{load}).
    @raise ValueError: naming C{dotted} when it cannot be loaded or is neither.
    """
    found = load(dotted, besides)
    if IResource.providedBy(found):
        return ResourceHandler(found, maxBody)
    if inspect.iscoroutinefunction(found):
        return CoroutineHandler(found, maxBody)
    raise ValueError(f"{dotted!r}: expected a twisted.web IResource (an instance) or an async def, got {found!r}")


class _BodyReader:
    """Reads a request body pipe whole, up to a limit (a L{rproxy.downstream.body.BodyConsumer})."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._content = BytesIO()
        self.done: Deferred[bytes] = Deferred()

    def writeBody(self, data: bytes) -> None:
        if self._content.tell() + len(data) > self._limit:
            self.failBody(clientError(413, f"the request body exceeds the handler's limit of {self._limit} bytes"))
            return
        self._content.write(data)

    def finishBody(self, trailers: Pairs) -> None:
        if not self.done.called:
            self.done.callback(self._content.getvalue())

    def failBody(self, error: ProxyError) -> None:
        if not self.done.called:
            self._content = BytesIO()
            self.done.errback(error)

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        """Nothing to pause: the body is bounded."""

    def unregisterBodyProducer(self) -> None:
        """The pipe is done."""


def readBody(body: RequestBodyPipe | None, limit: int) -> Deferred[bytes]:
    """The whole of C{body} (C{b""} for none); a 413 error beyond C{limit} bytes (the rest is not read)."""
    if body is None:
        return succeed(b"")
    if body.length is not None and body.length > limit:
        body.stopProducing()
        return fail(clientError(413, f"the request body of {body.length} bytes exceeds the handler's limit of {limit}"))
    reader = _BodyReader(limit)
    reader.done.addErrback(_stopReading, body)
    body.attach(reader)
    return reader.done


def _stopReading(failure: Failure, body: RequestBodyPipe) -> Failure:
    body.stopProducing()
    return failure


class _Handler(ABC):
    """What both kinds of handler share: the body read first, a failure answered, the client's leaving."""

    def __init__(self, handler: Any, maxBody: int) -> None:
        self.handler = handler
        self.maxBody = maxBody

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.handler!r}>"

    def serve(self, context: RequestContext, responder: Responder) -> None:
        body, context.body = context.body, None
        if body is not None and (body.length is None or body.length <= self.maxBody):
            responder.sendContinue()
        running = readBody(body, self.maxBody)
        running.addCallback(self._run, context, responder)
        running.addErrback(self._failed, responder)
        context.whenEnded(running.cancel)

    @abstractmethod
    def _run(self, content: bytes, context: RequestContext, responder: Responder) -> object:
        """Serve the request, whose whole body is C{content}."""

    def _failed(self, failure: Failure, responder: Responder) -> None:
        if failure.check(CancelledError):
            return  # the client went away
        if isinstance(failure.value, ProxyError):
            responder.fail(failure.value)
            return
        _log.failure("the local handler {handler!r} failed", failure, handler=self.handler)
        reason = f"the local handler failed: {failure.getErrorMessage()[:200]}"
        responder.fail(proxyError(500, reason, "proxy_internal_error"))


@implementer(ILocalAnswer)
class CoroutineHandler(_Handler):
    """An C{async def} handler (see the module)."""

    def _run(self, content: bytes, context: RequestContext, responder: Responder) -> Deferred[None]:
        inbound = context.inbound
        request = HandlerRequest(
            inbound.method, context.outbound.target, inbound.headers, context.client, content, context, responder
        )
        running = ensureDeferred(self.handler(request))
        running.addCallback(self._returned, context, responder)
        return running

    def _returned(self, result: object, context: RequestContext, responder: Responder) -> None:
        if isinstance(result, LocalResponse):
            responder.answer(result)
        elif ILocalAnswer.providedBy(result):
            responder.serve(ILocalAnswer(result), context)
        elif result is not None:
            raise TypeError(f"a handler returns a LocalResponse, an ILocalAnswer or None, not {result!r}")
        elif not responder.started and not responder.done:
            raise TypeError("the handler returned None without writing a response")


@implementer(IPushProducer)
class _Pulling:
    """A pull producer (twisted.web.static's) driven as a push one: pulled until paused, a bounded number per turn."""

    TURN = 64
    _paused = False
    _stopped = False

    def __init__(self, producer: Any, channel: _Channel) -> None:
        self._producer = producer
        self._channel = channel

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        for _ in range(self.TURN):
            if self._paused or self._stopped or self._channel.producer is not self:
                return
            self._producer.resumeProducing()
        if self._channel.producer is self:
            self._channel.reactor.callLater(0, self.resumeProducing)

    def stopProducing(self) -> None:
        self._stopped = True
        self._producer.stopProducing()


class _Channel:
    """What a resource's twisted.web request writes to: the responder."""

    transport = None
    producer: IPushProducer | None = None

    def __init__(self, responder: Responder, site: server.Site, context: RequestContext, reactor: Any) -> None:
        self.site = site
        self.reactor = reactor
        self.request: server.Request | None = None
        self._responder = responder
        client = context.client or "127.0.0.1"
        self._peer = (IPv6Address if ":" in client else IPv4Address)("TCP", client, 0)
        self._secure = context.inbound.scheme == b"https"

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "0.0.0.0", 443 if self._secure else 80)

    def isSecure(self) -> bool:
        return self._secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        assert self.request is not None
        self.request.chunked = 0  # the client's side frames the body
        raw = headers.getAllRawHeaders()
        fields = [(n, v) for n, values in raw if n.lower() != b"transfer-encoding" for v in values]
        status = int(code)
        self._responder.sendHead(status, fields, hasBody=status not in NO_BODY_CODES)

    def write(self, data: bytes) -> None:
        self._responder.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self._responder.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer if streaming else _Pulling(producer, self)
        self._responder.registerProducer(self.producer)
        if not streaming:
            self.producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._responder.unregisterProducer()

    def requestDone(self, request: server.Request) -> None:
        self._responder.finish()

    def loseConnection(self) -> None:
        self._responder.finish()


@implementer(ILocalAnswer)
class ResourceHandler(_Handler):
    """A twisted.web resource as a handler (see the module)."""

    def __init__(self, handler: Any, maxBody: int, reactor: Any = None) -> None:
        super().__init__(handler, maxBody)
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._site = server.Site(handler)
        self._reactor = reactor

    def _run(self, content: bytes, context: RequestContext, responder: Responder) -> None:
        channel = _Channel(responder, self._site, context, self._reactor)
        request = channel.request = server.Request(channel)
        for name, values in context.inbound.headers.getAllRawHeaders():
            request.requestHeaders.setRawHeaders(name, list(values))
        request.content = BytesIO(content)
        context.whenEnded(lambda: _lost(request))
        request.requestReceived(context.inbound.method, context.outbound.target, b"HTTP/1.1")


def _lost(request: server.Request) -> None:
    """The exchange ended: if the resource had not finished, its request's client is gone."""
    if not request.finished:
        request.connectionLost(Failure(ConnectionDone("the client went away")))
