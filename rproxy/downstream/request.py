"""
L{ProxyRequest}: a C{twisted.web.server.Request} that is routed as soon as its head is in, and the
L{Downstream} of the exchange that proxies it.

Twisted renders a request only after its whole body has arrived.  A proxy cannot wait: C{gotLength} (all
fields in, no body yet) checks the head, finds the resource, and hands an L{IStreamingResource} the
request with a L{RequestBodyPipe} that the body then flows through.  Other resources (health, admin,
anything a user mounts) are rendered the usual way once the body is in.  A proxied request is admitted
only below the process's overload watermarks (L{rproxy.downstream.overload}); the limits of its body's
rate and of its total time run on its L{RequestClock}.

rproxy's protocols (L{rproxy.downstream.http1}, L{rproxy.downstream.http2}) drive it through twisted.web's
public request API: they set C{method}, C{uri}, C{clientproto} and the fields, then call C{gotLength},
C{handleContentChunk}, C{requestReceived} and C{connectionLost}; what that API has no word for (a head
written from a field list, 1xx, trailers, a reset, a protocol switch) the request asks of its channel,
a L{RequestChannel}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import datetimeToString, unquote
from twisted.web.resource import IResource

from rproxy.downstream.body import RequestBodyPipe
from rproxy.downstream.limits import RequestClock
from rproxy.downstream.webrequest import sendError
from rproxy.errors import ProxyError, clientError, proxyError, upstreamError
from rproxy.interfaces import IStreamingResource
from rproxy.observe.record import ABORTED, CLIENT_GONE, DONE, ExchangeRecord
from rproxy.tunnel.h2connect import connectRefusal

if TYPE_CHECKING:
    from rproxy.downstream.contract import RequestChannel
    from rproxy.downstream.site import ProxySite
    from rproxy.tunnel.sides import TunnelSide

_log = Logger()


class ProxyRequest(server.Request):
    """
    A request routed when its head is complete, whose body streams to an L{IStreamingResource}.

    @ivar headReceived: whether the whole request head has arrived (and been checked).
    @ivar bodyPipe: the body on its way, for a streaming resource (C{None}: no body, or not streaming).
    @ivar requestTrailers: the trailer fields the client sent after its body (chunked HTTP/1.1 or
        HTTP/2), set before C{requestReceived}.
    @ivar continued: whether a ``100 Continue`` was forwarded to the client.
    @ivar gone: whether the client went away before the response was finished.
    """

    defaultContentType = None  # a proxy never invents a Content-Type
    site: ProxySite
    # The RequestChannel (and what twisted.web's Request uses of a channel); twisted.web sets it to None,
    # then deletes it, once the response is finished: this default answers then.
    channel: Any = None
    content: Any
    headReceived = False
    bodyPipe: RequestBodyPipe | None = None
    requestTrailers: Sequence[tuple[bytes, bytes]] = ()
    continued = False
    gone = False
    _goneCallback: Callable[[Failure], object] | None = None
    _streaming = False
    _refused = False
    _bodyBytes = 0
    _switched = False  # the connection went to a tunnel (its record ends when the tunnel closes)
    _resource: IResource | None = None
    _bodyDone = False  # the whole body is in (or there was none)
    _admitted = False  # counted among the requests in flight (L{rproxy.downstream.overload})
    _clock: RequestClock | None = None
    #: What is known of the exchange, for the access log and the metrics (made when the head is in).
    record: ExchangeRecord | None = None

    # -- the protocol's side

    def gotLength(self, length: int | None, refusal: ProxyError | None = None) -> None:
        """
        The head is in (C{method}, C{uri}, C{clientproto} and the fields are set; C{length}: the declared
        body length, C{None} if chunked): check it, route it, and start a streaming resource.
        C{refusal}: the protocol found the head malformed already.
        """
        self.headReceived = True
        self.site = self.channel.site
        connection = self.channel.connection
        host = self.requestHeaders.getRawHeaders(b"host")
        peer = getattr(connection.peer, "host", None)
        record = self.record = ExchangeRecord(
            self.site.reactor.seconds(),
            self.method,
            self.uri,
            host[0] if host else None,
            self.clientproto,
            peer,
            connection.tls,
            self.requestHeaders,
        )
        record.requestId = self.site.requestIds.idFor(self.requestHeaders, peer)
        error = refusal or self._checkHead(length)
        if error is not None:
            super().gotLength(0)
            self._refuse(error)
            return
        resource = self._locate()
        if resource is None:
            super().gotLength(0)
            return
        if IStreamingResource.providedBy(resource):
            error = self.site.overload.admit()
            if error is not None:
                super().gotLength(0)
                self._refuse(error)
                return
            self._admitted = True
        self._bodyDone = length == 0
        self._clock = RequestClock.of(self.site.reactor, self.site.limits, self, not self._bodyDone)
        if IStreamingResource.providedBy(resource):
            self._streaming = True
            super().gotLength(0)  # requestReceived still seeks in self.content
            if length != 0:
                self.bodyPipe = RequestBodyPipe(self.channel.bodySource, length)
            resource.renderStreaming(self)
        else:
            self._resource = resource
            super().gotLength(length)
            if self._expectsContinue() and not self.finished:
                self.channel.sendContinue()  # a local resource reads the body once it is in

    def _checkHead(self, length: int | None) -> ProxyError | None:
        """Refuse what must not reach any resource: CONNECT, and announced oversize bodies."""
        if self.method == b"CONNECT":
            refusal = connectRefusal(self.channel.extendedConnect)
            if refusal is not None:
                return refusal
        self.path = self.uri.split(b"?", 1)[0]
        limit = self.site.limits.maxBodySize
        if limit and length is not None and length > limit:
            return clientError(413, f"the request body of {length} bytes exceeds the limit of {limit}")
        return None

    def _locate(self) -> IResource | None:
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        try:
            return self.site.getResourceFor(self)
        except BaseException:
            _log.failure("locating the resource for {uri!r} failed", uri=self.uri)
            self._refuse(proxyError(500, "the proxy failed to route the request", "proxy_internal_error"))
            return None

    def _refuse(self, error: ProxyError) -> None:
        """Answer now and close: the body (if any) will not be read."""
        self._refused = True
        self.stopKeepAlive()
        self.fail(error)

    def _unsolicitedBody(self) -> bool:
        """Whether the client holds its body back until a ``100 Continue`` that was not sent."""
        pipe = self.bodyPipe
        return pipe is not None and not pipe.complete and not self.continued and self._expectsContinue()

    def _expectsContinue(self) -> bool:
        expect = self.requestHeaders.getRawHeaders(b"expect")
        return expect is not None and expect[0].lower() == b"100-continue" and self.clientproto != b"HTTP/1.0"

    def handleContentChunk(self, data: bytes) -> None:
        self._bodyBytes += len(data)
        limit = self.site.limits.maxBodySize
        if limit and self._bodyBytes > limit and not self._refused:
            self.refuseBody(clientError(413, f"the request body exceeds the limit of {limit} bytes"))
            return
        if self.bodyPipe is not None:
            self.bodyPipe.dataReceived(data)
        elif not self._streaming and not self._refused:
            self.content.write(data)

    def refuseBody(self, error: ProxyError) -> None:
        """
        The body turned out bad mid-stream (too large, broken framing): its consumer is failed, so the
        upstream never sees it complete, and the client gets C{error} (a reset if its response began).
        """
        self._refused = True
        pipe, self.bodyPipe = self.bodyPipe, None
        if pipe is not None:
            pipe.fail(error)
        self.stopKeepAlive()
        self.fail(error)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._bodyDone = True
        if self._streaming or self._refused:
            if self.bodyPipe is not None:
                self.bodyPipe.finish(self.requestTrailers)
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """Render a non-streaming resource, found in C{gotLength}, now that the body is in."""
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", datetimeToString())
        try:
            self.render(self._resource)
        except BaseException:
            self.processingFailed(Failure())

    # -- limits

    def bodyProgress(self) -> tuple[int, int, bool] | None:
        """
        The body bytes received so far, how many times the proxy held the body back or let it go again
        (paused or resumed its client, or sent the ``100 Continue`` it waited for), and whether it holds it
        back now (also while that ``100 Continue`` is not sent); C{None} once no more body is expected
        (L{rproxy.downstream.limits.TimedRequest}).
        """
        if self._bodyDone or self._refused:
            return None
        pipe = self.bodyPipe
        if pipe is None:
            return None if self._streaming else (self._bodyBytes, 0, False)
        return pipe.received, pipe.holds + self.continued, pipe.sourcePaused or self._unsolicitedBody()

    def bodyTooSlow(self, received: int, seconds: float) -> None:
        """The body arrives slower than the minimum rate: 408 (a reset if the response began)."""
        rate = self.site.limits.minBodyRate
        self.refuseBody(
            clientError(
                408,
                f"the request body arrived at {received / seconds:.0f} bytes/s over {seconds:g}s,"
                f" below the minimum of {rate} bytes/s",
            )
        )

    def tookTooLong(self, seconds: float) -> None:
        """
        The request took longer than C{seconds} from its head: 408 while its body arrives, else 504 (a reset
        once the response began); the exchange is cancelled.
        """
        if not self._bodyDone:
            self.refuseBody(
                clientError(408, f"the request took longer than {seconds:g}s (its body was still arriving)")
            )
            return
        callback, self._goneCallback = self._goneCallback, None
        if callback is not None:
            callback(Failure(TimeoutError(f"the request took longer than {seconds:g}s")))
        self.fail(upstreamError(504, f"the request took longer than {seconds:g}s", "http_response_timeout"))

    def cutOff(self, error: ProxyError) -> None:
        """The connection is cut for a limit the client broke (no response can say so): the record says why."""
        self._blame(error)
        if self.record is not None:
            self.record.outcome = ABORTED

    def ended(self) -> None:
        """
        The request is over, or became a tunnel: its clock stops, and it leaves the requests in flight
        (a tunnel is bounded by the limits of connections instead).
        """
        clock, self._clock = self._clock, None
        if clock is not None:
            clock.stop()
        if self._admitted:
            self._admitted = False
            self.site.overload.release()

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        super().connectionLost(reason)
        callback, self._goneCallback = self._goneCallback, None
        if callback is not None:
            callback(reason)  # the exchange puts what it knows in the record
        if not self.finished and self.record is not None:
            if self.record.outcome == DONE and not self._switched:  # a tunnel ends as its connection closes
                self.record.outcome = CLIENT_GONE
            self.site.exchangeEnded(self)

    # -- Downstream: what the exchange says

    @property
    def bodyBytes(self) -> int:
        """The request body bytes received so far."""
        return self._bodyBytes

    @property
    def upgradable(self) -> bool:
        return bool(self.channel is not None and self.channel.upgradable)

    @property
    def extendedConnect(self) -> bytes | None:
        return self.channel.extendedConnect if self.channel is not None else None

    def whenGone(self, callback: Callable[[Failure], object]) -> None:
        self._goneCallback = callback  # no Deferred per request, as notifyFinish would make

    def sendInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """
        Forward an informational (1xx) response, such as 103 Early Hints or an upstream's 100 Continue,
        ahead of the final one.  HTTP/1.0 clients get none (RFC 9110 section 15.2), and neither does a
        response already begun; 101 is never sent this way.
        """
        if self.startedWriting or self.finished or self.gone or status == 101 or self.clientproto == b"HTTP/1.0":
            return
        if status == 100:
            self.continued = True
        self.channel.writeInterim(status, fields)

    def continueBody(self) -> None:
        if self._expectsContinue() and not self.continued:
            self.sendInterim(100, ())

    def sendHead(self, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool) -> None:
        """
        Send the response head now (even if the body is slow to come): C{status}, the fields the proxy set
        itself (C{Connection: close}), then C{fields}.
        """
        if self.gone or self.finished:
            return
        if self._unsolicitedBody():
            self.stopKeepAlive()  # the client waits for a 100 that will not come: its body is never read
        if self.channel.writeHead(self, status, reason, fields, hasBody):
            return
        self.setResponseCode(status, reason)
        headers = self.responseHeaders
        for name, value in fields:
            headers.addRawHeader(name, value)
        if hasBody:
            self.write(b"")

    def finish(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[override]
        """End the response, with C{trailers} where the client's framing can carry them."""
        self._goneCallback = None  # nothing left to cancel (and no request-exchange cycle left for the GC)
        if self.finished or self.gone:
            return
        if trailers and not self.channel.writeTrailers(self, trailers):
            _log.debug(
                "dropping {count} response trailer fields: the {version} response to {target} is not chunked",
                count=len(trailers),
                version=self.clientproto.decode("latin-1"),
                target=self.uri[:200].decode("latin-1"),
            )
        super().finish()

    def fail(self, error: ProxyError) -> None:
        self._blame(error)
        sendError(self, error, self.abort)

    def _blame(self, error: ProxyError) -> None:
        record = self.record
        if record is not None:
            record.fault, record.errorType, record.reason = error.fault.value, error.errorType, error.reason

    def abort(self) -> None:
        """Reset the client's connection (HTTP/1) or stream (HTTP/2): the response cannot be completed."""
        if self.record is not None:
            self.record.outcome = ABORTED
        if self.channel is not None:
            self.channel.abort()

    def stopKeepAlive(self) -> None:
        if self.channel is not None:
            self.channel.stopKeepAlive(self)

    def switchProtocols(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> TunnelSide:
        self.startedWriting = 1  # the response is the tunnel: nothing else may write one
        self.code = status
        self._switched = True
        self.ended()
        channel: RequestChannel = self.channel
        return channel.switchProtocols(self, status, fields)
