"""
L{ProxyRequest}: a C{twisted.web.server.Request} that is routed as soon as its head is in.

Twisted renders a request only after its whole body has arrived.  A proxy cannot wait: C{gotLength}
(all fields parsed, no body yet) validates the head, finds the resource, and hands an
L{IStreamingResource} the request with a L{RequestBodyPipe} that the body then flows through.  Other
resources (health, admin, anything a user mounts) are rendered the usual way once the body is in.

This relies on the request line being on the channel while C{gotLength} runs (C{HTTPChannel._command},
C{_path}, C{_version}, private to Twisted); L{rproxy.test.test_twisted_contract} fails if that changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import NO_BODY_CODES, RESPONSES, HTTPChannel, Request, datetimeToString, unquote
from twisted.web.resource import IResource

from rproxy.downstream.body import RequestBodyPipe
from rproxy.downstream.http2 import ProxyH2Stream
from rproxy.downstream.validation import authorityProblem, targetProblem
from rproxy.errors import ProxyError, clientError, proxyError
from rproxy.headers import hasControl, isToken
from rproxy.interfaces import IStreamingResource
from rproxy.tunnel.h2connect import connectRefusal

if TYPE_CHECKING:
    from rproxy.downstream.site import ProxySite

_log = Logger()

Field = tuple[bytes, bytes]

#: Reason phrases of informational statuses Twisted does not name.
_INTERIM_REASONS = {103: b"Early Hints"}


def stopKeepAlive(request: Request) -> None:
    """Close the client's HTTP/1 connection after this response (its body was not read to the end)."""
    channel = getattr(request, "channel", None)  # gone once the request is finished
    if isinstance(channel, HTTPChannel):
        channel.persistent = False
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])


def whenClientGone(request: Request, callback: Callable[[Failure], object]) -> None:
    """Call C{callback} with the reason if the client's connection is lost before C{request} finishes."""
    if isinstance(request, ProxyRequest):
        request.clientGone = callback  # no Deferred per request on the proxy's own path
    else:
        request.notifyFinish().addErrback(callback)


def sendResponseHead(
    request: Request, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool = True
) -> None:
    """
    Send the head of C{request}'s response now (even if the body is slow to come): C{status}, then
    C{fields} after those the proxy has set itself (C{Connection: close}).

    Without a body (C{hasBody} false), an HTTP/2 head waits for C{finish}, which follows at once, so that
    it goes as one HEADERS frame ending the stream (gRPC's trailers-only responses must).
    """
    if isinstance(request, ProxyRequest) and (hasBody or request._http1) and request.writeHead(status, reason, fields):
        return
    request.setResponseCode(status, reason)
    headers = request.responseHeaders
    for name, value in fields:
        headers.addRawHeader(name, value)
    if hasBody or not isinstance(request.channel, ProxyH2Stream):
        request.write(b"")


def sendInterim(request: Request, status: int, fields: Sequence[Field]) -> None:
    """
    Forward an informational (1xx) response, such as 103 Early Hints or an upstream's 100 Continue,
    ahead of C{request}'s final one: a status line on HTTP/1.1, a HEADERS frame on HTTP/2.

    HTTP/1.0 clients get none (RFC 9110 section 15.2), and neither does a response already begun.
    101 is never sent this way: switching protocols is not an interim answer.
    """
    if request.startedWriting or request.finished or request._disconnected or status == 101:
        return
    if not isinstance(request, ProxyRequest):
        return  # a plain twisted.web request: Twisted answered Expect itself, and has no 1xx API
    channel = request.channel
    if status == 100:
        request.continued = True
    if isinstance(channel, ProxyH2Stream):
        channel.writeInterim(status, fields)
    elif request._http1 and request.clientproto == b"HTTP/1.1":
        lines = [b"HTTP/1.1 %d %s" % (status, _INTERIM_REASONS.get(status) or RESPONSES.get(status, b"Informational"))]
        lines.extend(name + b": " + value for name, value in fields)
        lines.append(b"\r\n")
        channel.write(b"\r\n".join(lines))


def setTrailers(request: Request, fields: Sequence[Field]) -> None:
    """Send C{fields} as trailers after C{request}'s body, where the client's framing can carry them."""
    if isinstance(request, ProxyRequest):
        request.responseTrailers = list(fields)


def abortClient(request: Request) -> None:
    """Reset the client's connection (HTTP/1) or stream (HTTP/2): a response cannot be completed."""
    channel: Any = request.channel
    if channel is None:
        return
    transport = getattr(channel, "transport", None)
    if transport is not None:
        # Hand what is already written (the head, part of the body) to the kernel first, so the client
        # sees how far the response got before the reset.
        flush = getattr(transport, "doWrite", None)
        if flush is not None and transport.connected:
            flush()
        transport.abortConnection()
    else:
        channel.abortConnection()


def sendError(request: Request, error: ProxyError) -> None:
    """
    Answer C{request} with C{error} (status, one-line reason, C{Proxy-Status}) and log it.

    If the response has already begun, the client's connection is reset instead: a truncated response
    must never look complete.
    """
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
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        request.unregisterProducer()
        abortClient(request)
        return
    request.setResponseCode(error.status, error.phrase)
    headers = request.responseHeaders
    for name, value in error.responseHead():
        headers.setRawHeaders(name, [value])
    request.write(error.body())
    request.finish()


class ProxyRequest(server.Request):
    """
    A request routed when its head is complete, whose body streams to an L{IStreamingResource}.

    @ivar headReceived: whether the whole request head has arrived (and been checked).
    @ivar bodyPipe: the body on its way, for a streaming resource (C{None}: no body, or not streaming).
    @ivar clientGone: called with the reason if the connection is lost before the response is finished
        (what C{notifyFinish} would errback with).
    @ivar responseTrailers: trailer fields sent after the response body when the framing allows
        (chunked HTTP/1.1, HTTP/2).
    @ivar requestTrailers: the trailer fields the client sent after its body (chunked HTTP/1.1 or
        HTTP/2), set before C{requestReceived}.
    @ivar continued: whether a ``100 Continue`` was forwarded to the client.
    """

    defaultContentType = None  # a proxy never invents a Content-Type
    site: ProxySite
    channel: Any  # an HTTPChannel (HTTP/1) or an H2Stream (HTTP/2)
    content: Any
    headReceived = False
    bodyPipe: RequestBodyPipe | None = None
    clientGone: Callable[[Failure], object] | None = None
    responseTrailers: Sequence[Field] = ()
    requestTrailers: Sequence[Field] = ()
    continued = False
    _streaming = False
    _http1 = False
    _refused = False
    _bodyBytes = 0
    _resource: IResource | None = None

    def gotLength(self, length: int | None, refusal: ProxyError | None = None) -> None:
        """
        The head is in (C{length}: the declared body length, C{None} if chunked): check it, route it, and
        start a streaming resource.  C{refusal}: the protocol found the head malformed already.
        """
        self.headReceived = True
        channel = self.channel
        self._http1 = isinstance(channel, HTTPChannel)
        if self._http1:
            self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        else:
            self.method, self.uri, self.clientproto = channel.command, channel.path, b"HTTP/2"
        self.site = channel.site
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
            self._streaming = True
            super().gotLength(0)  # requestReceived still seeks in self.content
            if length != 0:
                self.bodyPipe = RequestBodyPipe(self._clientProducer(), length)
            resource.renderStreaming(self)
        else:
            self._resource = resource
            super().gotLength(length)

    def _checkHead(self, length: int | None) -> ProxyError | None:
        """
        Refuse what must not reach any resource: bad targets, a missing, repeated or invalid ``Host``
        (RFC 9112 section 3.2; HTTP/2 heads were checked by L{rproxy.downstream.h2request}), and announced oversize
        bodies.
        """
        if self.method == b"CONNECT":
            refusal = connectRefusal(getattr(self.channel, "connectProtocol", None))
            if refusal is not None:
                return refusal
        uri = self.uri
        if self._http1:
            # The request line's parse refused whitespace and other control characters, but not DEL.
            problem = (targetProblem(uri) if b"\x7f" in uri else None) or self._hostProblem()
            if problem is not None:
                return clientError(400, problem)
            if uri[:1] != b"/":
                if uri == b"*" and self.method == b"OPTIONS":
                    pass
                elif uri[:7].lower() == b"http://" or uri[:8].lower() == b"https://":
                    problem = self._absoluteForm(uri)
                    if problem is not None:
                        return clientError(400, problem)
                else:
                    return clientError(400, "the request target must be an absolute path or absolute URL")
        self.path = self.uri.split(b"?", 1)[0]
        limit = self.site.limits.maxBodySize
        if limit and length is not None and length > limit:
            return clientError(413, f"the request body of {length} bytes exceeds the limit of {limit}")
        return None

    def _hostProblem(self) -> str | None:
        """Why the ``Host`` of an HTTP/1 request is not acceptable: none on HTTP/1.1, several, or invalid."""
        hosts = self.requestHeaders.getRawHeaders(b"host")
        if hosts is None:
            return "an HTTP/1.1 request must have a Host field" if self.clientproto == b"HTTP/1.1" else None
        if len(hosts) > 1:
            return "the request has more than one Host field"
        return authorityProblem(hosts[0])

    def _absoluteForm(self, uri: bytes) -> str | None:
        """
        RFC 9112 section 3.2.2: the authority of an absolute-form target replaces ``Host``; why it cannot,
        if its authority is not valid.
        """
        rest = uri.split(b"://", 1)[1]
        slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, target = rest[:slash], rest[slash:]
        problem = authorityProblem(authority)
        if problem is not None:
            return problem
        self.requestHeaders.setRawHeaders(b"host", [authority])
        self.uri = target if target.startswith(b"/") else b"/" + target
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

    def _clientProducer(self) -> IPushProducer:
        channel = self.channel
        transport = getattr(channel, "transport", None)
        return transport if transport is not None else channel  # H2Stream pauses its flow control

    def _refuse(self, error: ProxyError) -> None:
        """Answer now and close: the body (if any) will not be read."""
        self._refused = True
        stopKeepAlive(self)
        sendError(self, error)

    def continueAutomatically(self) -> bool:
        """
        Whether the client's channel should answer ``Expect: 100-continue`` itself, now that the head is
        routed: yes for a resource that reads the body once it is in (health, admin); no for a streaming
        one (the proxy forwards the expectation and relays the upstream's 100, or its final answer
        without one), nor for a request already refused (its error goes out without soliciting the body).
        """
        return not (self._streaming or self.finished or self._refused) and self._expectsContinue()

    def _unsolicitedBody(self) -> bool:
        """Whether the client holds its body back until a ``100 Continue`` that was not sent."""
        pipe = self.bodyPipe
        return pipe is not None and not pipe.complete and not self.continued and self._expectsContinue()

    def _expectsContinue(self) -> bool:
        expect = self.requestHeaders.getRawHeaders(b"expect")
        return expect is not None and expect[0].lower() == b"100-continue"

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
        stopKeepAlive(self)
        sendError(self, error)

    def writeHead(self, code: int, reason: bytes | None, fields: Sequence[Field]) -> bool:
        """
        Write an HTTP/1 response head with C{fields} as they are, the framing chosen the way Twisted's
        C{write} does (chunked on HTTP/1.1 unless a length is given), or an HTTP/2 one as a HEADERS frame
        built from them; C{False}, and nothing written, when Twisted's own path must do it: a closed
        connection, or a field that is not valid (or, on HTTP/2, that h2 must check itself).

        Twisted would copy every field into C{responseHeaders} and read them back to frame the body.
        """
        if self._disconnected or self.startedWriting:
            return False
        if not self._http1:
            return self._writeHeadH2(code, reason, fields)
        names = [name for name, _ in fields]
        if not all(names) or not isToken(b"".join(names)) or hasControl(b"".join([value for _, value in fields])):
            return False  # what a filter added goes through Twisted's checks
        if self._unsolicitedBody():
            stopKeepAlive(self)  # the client waits for a 100 that will not come: its body is never read
        self.setResponseCode(code, reason)
        lines = [self.clientproto + b" %d " % code + self.code_message]
        for name, values in self.responseHeaders.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value)
        hasLength = self.responseHeaders.hasHeader(b"content-length")
        for name, value in fields:
            lines.append(name + b": " + value)
            if name.lower() == b"content-length":
                hasLength = True
        if self.clientproto == b"HTTP/1.1" and not hasLength and self.method != b"HEAD" and code not in NO_BODY_CODES:
            lines.append(b"Transfer-Encoding: chunked")
            self.chunked = 1
        lines.append(b"\r\n")
        self.startedWriting = 1
        self.channel.write(b"\r\n".join(lines))
        return True

    def _writeHeadH2(self, code: int, reason: bytes | None, fields: Sequence[Field]) -> bool:
        """L{writeHead} on HTTP/2: the fields the proxy set itself, then C{fields}, as one HEADERS frame."""
        channel = self.channel
        if not isinstance(channel, ProxyH2Stream) or self.cookies or (self.lastModified or self.etag) is not None:
            return False
        own = [(name, value) for name, values in self.responseHeaders.getAllRawHeaders() for value in values]
        self.setResponseCode(code, reason)
        if not channel.writeHead(code, [*own, *fields] if own else fields):
            return False
        self.startedWriting = 1
        return True

    def finish(self) -> None:
        self.clientGone = None  # nothing left to cancel (and no request-exchange cycle left for the GC)
        trailers = self.responseTrailers
        channel = self.channel
        if not trailers and not self.startedWriting and isinstance(channel, ProxyH2Stream):
            channel.endWithHead()
        elif trailers and not self._disconnected and not self.finished:
            if isinstance(channel, ProxyH2Stream):
                channel.setTrailers(trailers)
            elif self.chunked:
                # Twisted's finish would end the chunked body with an empty trailer section.
                channel.write(b"0\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in trailers) + b"\r\n")
                self.chunked = 0
            else:
                _log.debug(
                    "dropping {count} response trailer fields: the {version} response to {target} is not chunked",
                    count=len(trailers),
                    version=self.clientproto.decode("latin-1"),
                    target=self.uri[:200].decode("latin-1"),
                )
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        callback, self.clientGone = self.clientGone, None
        if callback is not None:
            callback(reason)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
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
