"""
Request buffering (and, optionally, response buffering): the filter kind C{buffer}.

An upstream that serves few requests at once (a pre-forking application server, a single-threaded one)
is held for as long as its slowest client takes to upload.  With this filter in a route's chain, rproxy
reads the whole request body first, in memory up to C{memory} bytes and then in a temporary file
(L{rproxy.downstream.spool}), and only then sends the request upstream, framed by its C{Content-Length}
(never chunked), at the speed of the local disk: the upstream is busy for the time it takes to read it,
not for the time the client takes to send it.  With C{response = true} the response body is read likewise
into a spool at the upstream's speed, so that a slow reader does not hold the upstream either
(L{rproxy.downstream.spool.SpooledResponse}).

The filter belongs after the authentication filters of a chain: an unauthenticated client must not make
the proxy store anything.  What it does with a request:

 - a declared C{Content-Length} over C{max-size}: 413 at once, nothing read (a client that sent
   C{Expect: 100-continue} never gets its 100);
 - C{Expect: 100-continue}: the client gets its ``100 Continue`` from rproxy as the filter starts to read,
   and the field is not forwarded (the upstream gets the body with the head, and has nothing to decide);
 - a chunked body that grows over C{max-size}: 413 as it crosses the limit; the rest is not stored;
 - a body that has not arrived C{timeout} seconds after the filter began to read it: 408.  The client
   connection limits do not cover this: an HTTP/1.1 connection is closed after C{--client-timeout}
   between two body bytes, but a client that sends a byte now and then, or an HTTP/2 stream that stalls
   while its connection has other streams, would hold its spool for ever;
 - trailer fields the client sends after a chunked body are dropped (logged): the upstream gets a body
   framed by its length, which cannot carry them;
 - the temporary file cannot be written (the disk is full): 507;
 - an extended CONNECT (a WebSocket over HTTP/2) goes through untouched: what follows its head is a
   tunnel's bytes, not a body.

The spool is the exchange's, released when the exchange ends however it ends (L{RequestContext.whenEnded}):
the response sent, an error, the client gone mid-upload, another filter's answer.  A retry on another
upstream reads the body again from the spool's file (L{rproxy.downstream.body.fileBody}), whatever its size.
"""

from __future__ import annotations

import os
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from rproxy.downstream.body import RequestBodyPipe, fileBody
from rproxy.downstream.spool import Spool, SpoolSettings
from rproxy.errors import ProxyError, clientError, proxyError
from rproxy.headers import Pairs
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, RequestContext

_log = Logger()

#: Bytes of a body held in memory before it goes to a temporary file (as the pipe holds for an upstream).
DEFAULT_MEMORY = 65536

#: The largest body buffered, by default (request and response alike).
DEFAULT_MAX_SIZE = 100 * 1024 * 1024

#: How long a request body may take to arrive, by default (seconds).
DEFAULT_TIMEOUT = 300.0


@implementer(IRequestFilter)
class Buffer:
    """
    The C{buffer} filter (see the module).

    @ivar request: how request bodies are held.
    @ivar response: how response bodies are held, or C{None} when they stream.
    @ivar timeout: seconds a request body may take to arrive.
    """

    consumes = (b"expect",)  # the expectation is rproxy's to meet: the upstream gets the body with the head

    def __init__(
        self, reactor: IReactorTime, request: SpoolSettings, response: SpoolSettings | None, timeout: float
    ) -> None:
        self.reactor = reactor
        self.request = request
        self.response = response
        self.timeout = timeout

    def onRequest(self, context: RequestContext) -> FilterVerdict | Deferred[FilterVerdict]:
        if self.response is not None:
            context.bufferResponse = self.response
        body = context.body
        if body is None or context.inbound.method == b"CONNECT":
            return None  # an extended CONNECT's stream is a tunnel's bytes, not a body to wait for
        limit = self.request.maxSize
        if body.length is not None and body.length > limit:
            return clientError(413, f"the request body of {body.length} bytes exceeds the limit of {limit} bytes")
        return _Upload(self, context, body).read()


class _Upload:
    """One request body on its way into a spool: the pipe's consumer, and the filter's decision once it is in."""

    def __init__(self, buffer: Buffer, context: RequestContext, body: RequestBodyPipe) -> None:
        self._buffer = buffer
        self._context = context
        self._body = body
        self._spool = Spool(buffer.request)
        self._done: Deferred[FilterVerdict] = Deferred(lambda _: self._release())
        self._timer: IDelayedCall | None = None
        context.whenEnded(self._release)

    def read(self) -> Deferred[FilterVerdict]:
        """Read the whole body; the Deferred fires when it is in (C{None}) or refused (a L{ProxyError})."""
        self._timer = self._buffer.reactor.callLater(self._buffer.timeout, self._timedOut)
        self._body.demand()
        self._body.attach(self)
        return self._done

    # BodyConsumer

    def writeBody(self, data: bytes) -> None:
        spool = self._spool
        if self._done.called:
            return
        limit = self._buffer.request.maxSize
        if spool.size + len(data) > limit:
            self._refuse(clientError(413, f"the request body exceeds the limit of {limit} bytes"))
            return
        try:
            spool.append(data)
        except OSError as e:
            why = f"the request body could not be spooled: {e.strerror}"
            self._refuse(proxyError(507, why, "proxy_internal_error"))

    def finishBody(self, trailers: Pairs) -> None:
        if self._done.called:
            return
        self._stopTimer()
        spool = self._spool
        target = self._context.inbound.target[:200].decode("latin-1")
        if trailers:
            _log.info(
                "dropping {count} trailer fields of the request body of {target}: it is sent with its length",
                count=len(trailers),
                target=target,
            )
        _log.debug("buffered {size} bytes of {target}", size=spool.size, target=target, onDisk=spool.onDisk)
        self._context.body = fileBody(spool.reader(), spool.size)
        self._done.callback(None)

    def failBody(self, error: ProxyError) -> None:
        self._refuse(error)

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        """The spool takes the body as fast as it comes: the client is never paused."""

    def unregisterBodyProducer(self) -> None:
        """Nothing was registered."""

    def _refuse(self, error: ProxyError) -> None:
        self._release()
        if not self._done.called:
            self._done.callback(error)

    def _timedOut(self) -> None:
        self._timer = None
        self._refuse(clientError(408, f"the request body did not arrive within {self._buffer.timeout:g}s"))

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _release(self) -> None:
        """The body is refused, or the exchange is over: stop the timer, free the spool."""
        self._stopTimer()
        self._spool.close()


def buildBuffer(options: PluginOptions, environment: FilterEnvironment) -> Buffer:
    """A L{Buffer} from the options of a C{[filters.X]} table with C{type = "buffer"}."""
    directory = options.text("directory")
    if directory is not None:
        directory = os.path.join(environment.base, directory)
        if not os.path.isdir(directory):
            raise options.error("directory", f"{directory!r} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise options.error("directory", f"{directory!r} is not writable")
    request = SpoolSettings(options.size("memory", DEFAULT_MEMORY), _maxSize(options, "max-size"), directory)
    response = None
    buffered = options.flag("response", False)
    memory = options.size("response-memory", DEFAULT_MEMORY)
    maxSize = _maxSize(options, "response-max-size")
    if buffered:
        response = SpoolSettings(memory, maxSize, directory)
    timeout = options.duration("timeout", DEFAULT_TIMEOUT)
    if timeout <= 0:
        raise options.error("timeout", "must be more than 0")
    return Buffer(cast(IReactorTime, environment.reactor), request, response, timeout)


def _maxSize(options: PluginOptions, name: str) -> int:
    size = options.size(name, DEFAULT_MAX_SIZE)
    if size <= 0:
        raise options.error(name, "must be more than 0")
    return size
