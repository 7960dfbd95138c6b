"""
One proxied exchange: filters, director, balancer, upstream connection, response relay, errors.

An L{Exchange} is created per request by L{Proxy.handle}.  It builds the outbound request (hop-by-hop
fields removed, forwarding fields set, then request filters and the director), picks an upstream,
sends the request head and streams the body, and relays the response head and body to the client with
the upstream connection registered as the client request's producer (a slow client pauses the
upstream).  It reports every outcome to the balancer and the registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from rproxy.errors import Fault, ProxyError, clientError, proxyError
from rproxy.headers import ForwardingPolicy, Pairs, requestHeaderPairs, responseHeaderPairs
from rproxy.interfaces import IDirector, IRequestFilter, IResponseFilter, Outcome
from rproxy.message import InboundRequest, OutboundRequest
from rproxy.request import sendError, stopKeepAlive
from rproxy.streaming import RequestBodyPipe
from rproxy.upstream import Service, Upstream
from rproxy.upstream.http1 import HTTP11Connection

_log = Logger()

#: Methods a stale pooled connection may be retried with (RFC 9110 section 9.2.2), when bodiless.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Attempts after a reused connection turned out closed before answering.
_STALE_RETRIES = 2


class Proxy:
    """
    What every exchange of one proxy shares: the director, forwarding rules and filters.

    @ivar director: routes requests to services.
    @ivar forwarding: the X-Forwarded-*/Forwarded/Via policy.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        director: IDirector,
        forwarding: ForwardingPolicy = ForwardingPolicy(),
        requestFilters: Sequence[IRequestFilter] = (),
        responseFilters: Sequence[IResponseFilter] = (),
    ) -> None:
        self.reactor = reactor
        self.director = director
        self.forwarding = forwarding
        self.requestFilters = tuple(requestFilters)
        self.responseFilters = tuple(responseFilters)

    def handle(self, request: http.Request, target: bytes, body: RequestBodyPipe | None) -> Exchange:
        """Proxy C{request}, whose request-target relative to the proxy's mount point is C{target}."""
        exchange = Exchange(self, request, target, body)
        exchange.start()
        return exchange


class Exchange:
    """
    One request on its way through the proxy and its response on the way back.

    @ivar inbound: the request as received (read-only).
    @ivar outbound: the request as it will be sent (directors and filters change it).
    @ivar service: the service the director chose, once it has.
    @ivar upstream: the upstream of the current attempt.
    """

    service: Service | None = None
    upstream: Upstream | None = None
    _connection: HTTP11Connection | None = None
    _pending: Deferred[HTTP11Connection] | None = None

    def __init__(self, proxy: Proxy, request: http.Request, target: bytes, body: RequestBodyPipe | None) -> None:
        self.proxy = proxy
        self.request = request
        self._body = body
        self._tried: list[Upstream] = []
        self._staleRetries = 0
        self._ended = False
        self._sentAt = 0.0
        peer = request.getClientAddress()
        secure = request.isSecure()
        self.inbound = InboundRequest(
            method=request.method,
            target=target,
            headers=request.requestHeaders,
            clientHost=getattr(peer, "host", None),
            scheme=b"https" if secure else b"http",
            version=request.clientproto,
        )

    def start(self) -> None:
        """Build the outbound request, route it and send it."""
        request = self.request
        request.notifyFinish().addErrback(self._clientGone)
        inbound = self.inbound
        pairs, acceptsTrailers = requestHeaderPairs(inbound.headers)
        version = inbound.version[5:] if inbound.version.startswith(b"HTTP/") else inbound.version
        pairs += self.proxy.forwarding.forwardingPairs(
            inbound.headers, inbound.clientHost, inbound.scheme, inbound.host, version
        )
        headers = Headers()
        for name, value in pairs:
            headers.addRawHeader(name, value)
        self.outbound = OutboundRequest(inbound.method, inbound.target, headers, inbound.host, acceptsTrailers)
        for requestFilter in self.proxy.requestFilters:
            answer = requestFilter.onRequest(self)
            if answer is not None:
                self._end(answer)
                return
        service = self.proxy.director.direct(inbound, self.outbound)
        if service is None:
            self._end(clientError(404, f"no route matches {inbound.target[:200].decode('latin-1')!r}"))
            return
        self.service = service
        if service.rewriteHost:
            self.outbound.host = None
        self._attempt()

    def _attempt(self) -> None:
        service = self.service
        assert service is not None
        upstreams = service.registry.lookup(service.name)
        upstream = service.balancer.pick(upstreams, self.outbound, self._tried) if upstreams else None
        if upstream is None:
            self._end(
                proxyError(503, f"no upstream of service {service.name!r} is available", "destination_unavailable")
            )
            return
        self.upstream = upstream
        if upstream not in self._tried:
            self._tried.append(upstream)
        self._sentAt = self.proxy.reactor.seconds()
        self._pending = upstream.pool.acquire()
        self._pending.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, connection: HTTP11Connection) -> None:
        self._pending = None
        upstream = self.upstream
        assert upstream is not None
        if self._ended:
            upstream.pool.release(connection)
            return
        self._connection = connection
        body = self._body
        connection.sendRequest(
            self._head(upstream),
            body,
            chunked=body is not None and body.length is None,
            expectBody=self.outbound.method != b"HEAD",
            receiver=self,
        )

    def _connectFailed(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError):
            return
        error = _asProxyError(failure)
        self._report(None, error)
        service = self.service
        assert service is not None
        if len(self._tried) < len(service.registry.lookup(service.name)):
            # Nothing reached that upstream: another one may take the request, whatever its method.
            _log.info("{reason}; trying another upstream", reason=error.reason)
            self._attempt()
            return
        self._end(error)

    def _head(self, upstream: Upstream) -> bytes:
        """The request line and header section for C{upstream}, the target kept byte-exact."""
        outbound = self.outbound
        target = _joinPath(upstream.url.basePath, outbound.target)
        host = outbound.host if outbound.host is not None else upstream.hostHeader
        lines = [outbound.method + b" " + target + b" HTTP/1.1", b"Host: " + host]
        for name, values in outbound.headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value)
        if outbound.acceptsTrailers:
            lines.append(b"TE: trailers")
        body = self._body
        if body is not None:
            if body.length is None:
                lines.append(b"Transfer-Encoding: chunked")
            else:
                lines.append(b"Content-Length: %d" % body.length)
        elif self.inbound.headers.hasHeader(b"content-length"):
            lines.append(b"Content-Length: 0")
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    # -- ResponseReceiver

    def responseHead(self, version: bytes, status: int, reason: bytes, headers: Pairs, hasBody: bool) -> None:
        request = self.request
        self._report(status, None)
        pairs = responseHeaderPairs(headers)
        try:
            for responseFilter in self.proxy.responseFilters:
                responseFilter.onResponse(self, status, pairs)
        except Exception:
            _log.failure("response filter failed on {target}", target=self.inbound.target[:200])
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.abort()
            self._end(proxyError(502, "a response filter failed on the upstream's response", "proxy_internal_error"))
            return
        request.setResponseCode(status, reason or None)
        out = request.responseHeaders
        via: list[bytes] = []
        for name, value in pairs:
            if name.lower() == b"via":
                via.append(value)
            else:
                out.addRawHeader(name, value)
        out.addRawHeader(b"Via", self.proxy.forwarding.via(via, version))
        if hasBody:
            request.registerProducer(self._connection, True)
        request.write(b"")  # the head goes out now, even if the body is slow to come

    def responseData(self, data: bytes) -> None:
        self.request.write(data)

    def responseDone(self, trailers: Pairs) -> None:
        self._connection = None
        if self._ended:
            return
        self._ended = True
        request = self.request
        request.unregisterProducer()
        if self._body is not None and not self._body.complete:
            stopKeepAlive(request)  # answered before the client finished sending
        request.finish()

    def responseFailed(self, error: ProxyError, retrySafe: bool) -> None:
        self._connection = None
        if self._ended:
            return
        if (
            retrySafe
            and self._body is None
            and self._staleRetries < _STALE_RETRIES
            and self.outbound.method in _IDEMPOTENT
        ):
            # A pooled connection the upstream had closed: the request never reached it.
            self._staleRetries += 1
            if self.upstream in self._tried:  # not the upstream's fault: it may take the retry
                self._tried.remove(self.upstream)
            self._attempt()
            return
        self._failed(error)

    # -- endings

    def _failed(self, error: ProxyError) -> None:
        self._report(None, error)
        self._end(error)

    def _report(self, status: int | None, error: ProxyError | None) -> None:
        service, upstream = self.service, self.upstream
        if service is None or upstream is None:
            return
        latency = self.proxy.reactor.seconds() - self._sentAt
        service.balancer.report(upstream, Outcome(status, latency, error))
        if error is not None and error.fault is Fault.UPSTREAM:
            service.registry.failure(service.name, upstream, error.reason)

    def _end(self, error: ProxyError) -> None:
        if self._ended:
            return
        self._ended = True
        request = self.request
        if request.finished:  # already answered: the client's own input was refused
            return
        if self._body is not None and not self._body.complete:
            self._body.stopProducing()
            stopKeepAlive(request)
        sendError(request, error)

    def _clientGone(self, reason: Failure) -> None:
        if self._ended:
            return
        self._ended = True
        _log.info(
            "client went away during {method} {target}; cancelling the upstream request",
            method=self.inbound.method.decode("latin-1"),
            target=self.inbound.target[:200].decode("latin-1"),
        )
        if self._pending is not None:
            self._pending.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()


def _joinPath(base: bytes, target: bytes) -> bytes:
    """Prefix C{target} with an upstream's base path, with exactly one slash between them."""
    if target == b"*":
        return target
    if target[:1] in (b"", b"?"):
        joined = base + target
    elif base.endswith(b"/"):
        joined = base + target[1:]
    else:
        joined = base + target
    return joined if joined.startswith(b"/") else b"/" + joined


def _asProxyError(failure: Failure) -> ProxyError:
    if isinstance(failure.value, ProxyError):
        return failure.value
    _log.failure("unexpected failure while proxying", failure)
    return proxyError(502, f"unexpected failure: {failure.getErrorMessage()}", "proxy_internal_error")
