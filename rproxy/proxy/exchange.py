"""
One proxied exchange: director, filters, balancer, upstream connection, response relay, errors.

An L{Exchange} is created per request by L{Proxy.handle}.  It builds the outbound request (hop-by-hop
fields removed, forwarding fields set, then the director and the request filters of the chosen service's
chain, L{rproxy.filters.chain}), picks an upstream,
sends the request head and streams the body, and relays the response head and body to the client with
the upstream connection registered as the body's producer (a slow client pauses the upstream), or, when a
filter asked for it (L{RequestContext.bufferResponse}), with a L{SpooledResponse} between them: the
upstream is read at its own speed into a spool, which is the producer the client pauses, and the exchange
finishes the client's response when the spool is drained.  It speaks
to the client only through its L{Downstream} and to the upstream only through an L{UpstreamConnection},
whatever their protocols.  It reports every outcome to the balancer and the registry.

A local route's service (C{Service.local}), or a response filter that answers in the upstream's response's
place (L{rproxy.interfaces.ILocalAnswer}), has the exchange serve that answer through a
L{rproxy.local.responder.Responder} instead: L{rproxy.local} says how.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.downstream.spool import SpooledResponse
from rproxy.errors import Fault, ProxyError, clientError, proxyError, upstreamError
from rproxy.filters.chain import ChainRun
from rproxy.headers import ForwardingPolicy, Pairs, responseHeaderPairs
from rproxy.interfaces import IBodyTransform, IDirector, ILocalAnswer, IResponseFilter, Outcome
from rproxy.local.responder import Responder
from rproxy.observe.record import ExchangeRecord
from rproxy.observe.requestid import REQUEST_ID, traceContext
from rproxy.proxy.message import FilterVerdict, InboundRequest, LocalResponse, OutboundRequest, RequestContext
from rproxy.proxy.service import Service
from rproxy.tunnel.h2connect import WebSocketOverH2, webSocketOverH2
from rproxy.tunnel.messages import MessageAwareService, messageRelay
from rproxy.tunnel.splice import Tunnels, requestedProtocols, splice, unrequestedProtocol
from rproxy.upstream.connection import Delivery, RequestHead, UpstreamConnection
from rproxy.upstream.upstreams import Upstream

if TYPE_CHECKING:
    from rproxy.downstream.contract import Downstream
    from rproxy.observe.tracing import ExchangeTrace, ExchangeTracer
    from rproxy.tunnel.sides import TunnelSide

_log = Logger()

#: The Retry-After (seconds) when every upstream is down by its health checks.
_DOWN_RETRY_AFTER = 5

#: Attempts after a reused connection turned out closed before answering (not counted as retries).
_STALE_RETRIES = 2

#: How many attempts' reasons an error after retries names.
_REASONS_SHOWN = 5


class Proxy:
    """
    What every exchange of one proxy shares: the director, forwarding rules and tunnels.

    @ivar director: routes requests to services.
    @ivar forwarding: the X-Forwarded-*/Forwarded/Via policy.
    @ivar tunnels: the connections spliced after a 101, with their idle timeout and counts.
    @ivar tracer: what traces each exchange and its attempts (L{rproxy.observe.tracing}), if anything does.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        director: IDirector,
        forwarding: ForwardingPolicy = ForwardingPolicy(),
        tunnels: Tunnels | None = None,
        tracer: ExchangeTracer | None = None,
    ) -> None:
        self.reactor = reactor
        self.director = director
        self.forwarding = forwarding
        self.tunnels = Tunnels(reactor) if tunnels is None else tunnels
        self.tracer = tracer

    def handle(self, downstream: Downstream, target: bytes) -> Exchange:
        """Proxy C{downstream}'s request, whose request-target relative to the proxy's mount point is C{target}."""
        exchange = Exchange(self, downstream, target)
        exchange.start()
        return exchange


class Exchange:
    """
    One request on its way through the proxy and its response on the way back.

    @ivar downstream: the client, as the exchange answers it.
    @ivar inbound: the request as received (read-only).
    @ivar outbound: the request as it will be sent (directors and filters change it).
    @ivar service: the service the director chose, once it has.
    @ivar upstream: the upstream of the current attempt.
    """

    service: Service | None = None
    upstream: Upstream | None = None
    _connection: UpstreamConnection | None = None
    _connectedAt = 0.0
    _pending: Deferred[UpstreamConnection] | None = None
    _bound: Upstream | None = None  # the upstream whose in-flight count this attempt holds
    _lastError: ProxyError | None = None
    _failures: tuple[str, ...] = ()  # why each attempt that was retried failed, in order
    _responded = False  # the response head went to the client: no retry from here on
    _startedAt = 0.0
    _status: int | None = None  # the current attempt's response status, once its head arrived
    _latency = 0.0  # seconds from sending the current attempt to its response head
    _attempts = 0  # requests sent
    _retries = 0  # attempts repeated after a request was sent
    _staleRetries = 0
    _upgrade: tuple[bytes, ...] = ()  # the protocols the client asked to switch to
    _overH2: WebSocketOverH2 | None = None  # an HTTP/2 client's extended CONNECT (RFC 8441)
    _run: ChainRun | None = None  # the way through the service's filters, when it has some
    _context: RequestContext | None = None
    _transform: IBodyTransform | None = None  # what a response filter rewrites the body with
    _trace: ExchangeTrace | None = None  # the exchange's spans, when the proxy traces
    _local: Responder | None = None  # what a local answer writes to (rproxy.local)
    _replaced = False  # a response filter answers in the upstream's response's place
    _spooled: SpooledResponse | None = None  # the response body's way to the client, when it is buffered

    def __init__(self, proxy: Proxy, downstream: Downstream, target: bytes) -> None:
        self.proxy = proxy
        self.downstream = downstream
        self._body = self._clientBody = downstream.bodyPipe  # a filter may replace the body it sends
        self._tried: list[Upstream] = []
        self._ended = False
        self._sentAt = 0.0
        peer = downstream.getClientAddress()
        self.inbound = InboundRequest(
            method=downstream.method,
            target=target,
            headers=downstream.requestHeaders,
            clientHost=getattr(peer, "host", None),
            scheme=b"https" if downstream.isSecure() else b"http",
            version=downstream.clientproto,
        )

    def start(self) -> None:
        """Build the outbound request, route it and send it."""
        downstream = self.downstream
        downstream.whenGone(self._clientGone)
        inbound = self.inbound
        outbound = self.outbound = OutboundRequest.fromInbound(inbound, self.proxy.forwarding)
        record = downstream.record
        if record is not None:
            self._identify(record, outbound)
        self._upgrade = upgrade = requestedProtocols(downstream) if inbound.headers.hasHeader(b"upgrade") else ()
        if inbound.method == b"CONNECT":
            self._overH2 = webSocketOverH2(downstream)
            if self._overH2 is not None:
                self._overH2.prepare(self.outbound)
                self._upgrade = upgrade = self._overH2.upgrade
        try:
            service = self.proxy.director.direct(inbound, self.outbound)
        except ProxyError as e:
            self._end(e)
            return
        if service is None:
            host = (inbound.host or b"")[:200].decode("latin-1")
            target = inbound.target[:200].decode("latin-1")
            self._end(clientError(404, f"no route matches host {host!r} and target {target!r}"))
            return
        self.service = service
        if isinstance(service, MessageAwareService) and upgrade:
            # Compressed frames could not be measured without inflating them: offer no extension.
            self.outbound.headers.removeHeader(b"sec-websocket-extensions")
        if service.rewriteHost and self.outbound.host == inbound.host:  # a route that set Host wins
            self.outbound.host = None
        self._mayRepeat = service.retry.mayRepeat(inbound)
        if service.filters:
            if self._body is not None and service.filters.consumes:
                self._body.withholdTrailers(service.filters.isConsumed)
            self._run = service.filters.start(self.context())
            self._run.request(self._filtered)
        else:
            self._forward()

    def _identify(self, record: ExchangeRecord, outbound: OutboundRequest) -> None:
        """
        Send the request's id, and its trace context (a new one when it has none), to the upstream; when the
        proxy traces, the trace context is each attempt's (L{_attempt}).
        """
        headers = self.inbound.headers
        tracer = self.proxy.tracer
        if tracer is None:
            started, record.traceId = traceContext(headers)
        else:
            self._trace, started = tracer.exchangeStarted(record, headers), None
        replaced = (REQUEST_ID, b"traceparent", b"tracestate") if started is not None else (REQUEST_ID,)
        if any(headers.hasHeader(name) for name in replaced):
            outbound.removeFields(replaced)
        if record.requestId is not None:
            outbound.addField(b"X-Request-ID", record.requestId.encode("ascii"))
        if started is not None:
            outbound.addField(b"traceparent", started)

    def context(self) -> RequestContext:
        """What filters (and a balancer that filters responses) see of this exchange."""
        context = self._context
        if context is None:
            inbound = self.inbound
            client = self.proxy.forwarding.client(inbound.clientHost, inbound.headers)
            name = self.service.name if self.service is not None else ""
            context = self._context = RequestContext(inbound, self.outbound, client, name, self._body)
            if self._body is not None:
                self._body.whenDemanded(self.downstream.continueBody)  # until the context ends (no cycle left)
        return context

    def _filtered(self, verdict: FilterVerdict) -> None:
        """The request filters have decided: proxy the request, or answer it as the one that stopped it did."""
        if self._ended:
            return
        if verdict is None:
            assert self._context is not None
            self._body = self._context.body  # as the filters leave it (one that read it whole may replace it)
            self._forward()
        elif isinstance(verdict, LocalResponse):
            self._answer(verdict)
        else:
            self._end(verdict)

    def _answer(self, response: LocalResponse) -> None:
        """Answer the client with a filter's C{response}, as the response filters before that filter leave it."""
        assert self._run is not None
        try:
            response = self._run.localAnswer(response)
        except Exception:
            _log.failure("response filter failed on {target}", target=self._loggedTarget())
            self._end(proxyError(500, "a response filter failed on a filter's answer", "proxy_internal_error"))
            return
        self._ended = True
        if response.reason:
            _log.info(
                "{target} answered by a filter with {status}: {reason}",
                target=self._loggedTarget(),
                status=response.status,
                reason=response.reason,
            )
        downstream = self.downstream
        self._stopClientBody()
        body = response.body if self.inbound.method != b"HEAD" else b""
        fields = [(n, v) for n, v in response.headers if n.lower() not in (b"content-length", b"transfer-encoding")]
        record = downstream.record
        if record is not None and record.requestId is not None:
            fields.append((b"X-Request-ID", record.requestId.encode("ascii")))
        if response.status not in (204, 304):
            fields.append((b"Content-Length", b"%d" % len(response.body)))
        self._record()
        downstream.sendHead(response.status, None, fields, bool(body))
        if body:
            downstream.write(body)
        downstream.finish()
        self._contextEnded()

    def _stopClientBody(self) -> None:
        """Answered before the client finished sending its body: read no more of it, close after the answer."""
        body = self._clientBody
        if body is not None and not body.complete:
            body.stopProducing()
            self.downstream.stopKeepAlive()

    def _record(self) -> None:
        """Put in the client's record where the request went and how (just before the response ends)."""
        record = self.downstream.record
        if record is None:
            return
        service = self.service
        if service is not None:
            record.service, record.route = service.name, service.route
        upstream = self._bound or self.upstream
        if upstream is not None:
            record.upstream = upstream.key
        record.attempts = self._attempts
        if self._attempts:
            record.connectTime = self._connectedAt - self._sentAt if self._connectedAt else None
            record.firstByte = self._latency if self._status is not None else None
        context = self._context
        if context is not None:
            record.client, record.user = context.client, context.user
        elif self.proxy.forwarding.trustedProxies:  # the peer may be a proxy that forwarded the client
            record.client = self.proxy.forwarding.client(self.inbound.clientHost, self.inbound.headers)

    def _contextEnded(self) -> None:
        """Tell what filters asked to know (L{RequestContext.whenEnded}) that the exchange is over."""
        context = self._context
        if context is not None:
            if self._clientBody is not None:
                self._clientBody.whenDemanded(None)
            try:
                context.end()
            except Exception:
                _log.failure("a filter failed as {target} ended", target=self._loggedTarget())

    def _forward(self) -> None:
        """The filters let the request through: send it to an upstream, or to the local route's answer."""
        local = self.service.local  # type: ignore[union-attr]
        if local is None:
            self._attempt()
        else:
            self._serve(local)

    def _serve(self, answer: ILocalAnswer) -> None:
        """Answer with C{answer} (a local route's, or a response filter's in the upstream's place): L{rproxy.local}."""
        record = self.downstream.record
        requestId = record.requestId.encode("ascii") if record is not None and record.requestId is not None else None
        self._local = Responder(self.downstream, self._run, requestId, self._served)
        self._local.serve(answer, self.context())

    def _served(self, error: ProxyError | None) -> None:
        """The local answer has ended: with its response complete, or with C{error}."""
        if self._ended:
            return
        if error is not None:
            self._responded = self._local is not None and self._local.started
            self._end(error)
            return
        self._ended = True
        self._stopClientBody()
        if self._body is not None and self._body is not self._clientBody:
            self._body.stopProducing()  # what a filter put in the body's place, which no upstream will read
        self._record()
        self.downstream.finish()
        self._contextEnded()

    def _attempt(self) -> None:
        """Send the request to an upstream the balancer picks among those not tried yet."""
        service = self.service
        assert service is not None
        upstreams = service.registry.lookup(service.name)
        if not upstreams:
            self._end(_unavailable(service))
            return
        upstream = service.balancer.pick(upstreams, self.inbound, self._tried)
        if upstream is None:  # every available upstream was tried
            self._end(self._summary(self._lastError) if self._lastError is not None else _unavailable(service))
            return
        self.upstream = upstream
        self._status = None
        if upstream not in self._tried:
            self._tried.append(upstream)
        upstream.inFlight += 1
        self._bound = upstream
        self._sentAt = now = self.proxy.reactor.seconds()
        if not self._startedAt:
            self._startedAt = now
        if self._trace is not None:
            self._trace.attemptStarted(
                upstream, _joinPath(upstream.url.basePath, self.outbound.target), self.outbound, now
            )
        connection = upstream.pool.takeIdle()
        if connection is not None:  # the usual case: no Deferred
            self._connected(connection)
            return
        self._pending = upstream.pool.acquire()
        self._pending.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._pending = None
        upstream = self.upstream
        assert upstream is not None
        if self._ended:
            connection.giveBack()
            return
        self._connection = connection
        self._connectedAt = self.proxy.reactor.seconds()
        body = self._body
        if body is not None and self._attempts == 0 and (self._mayRepeat or connection.reportsUnprocessed):
            body.keepForReplay(self.service.retry.replayBodySize)  # type: ignore[union-attr]
        self._attempts += 1
        connection.sendRequest(self._head(upstream), body, self)

    def _connectFailed(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError):
            return
        self._retryOrEnd(_asProxyError(failure), sent=False)

    def _retryOrEnd(self, error: ProxyError, sent: bool, delivery: Delivery = Delivery.MAYBE) -> None:
        """
        An attempt failed with C{error}: try again where the rules allow it, else answer with the error.

        @param sent: whether the request may have reached the upstream.
        @param delivery: once sent, whether the upstream may have processed it.
        """
        self._unbind(error)
        if self._ended:
            return
        why = self._whyNotRetry(error, sent, delivery)
        if why is None:
            self._retry(error, sent, delivery)
            return
        if why:
            _log.info("not retrying {target}: {why}", target=self._loggedTarget(), why=why)
        self._end(self._summary(error))

    def _summary(self, error: ProxyError) -> ProxyError:
        """C{error}, the last attempt's, saying in its reason why each attempt before it failed as well."""
        reasons = list(self._failures)
        if not reasons or reasons[-1] != error.reason:
            reasons.append(error.reason)
        if len(reasons) == 1:
            return error
        shown = "; ".join(reasons[:_REASONS_SHOWN]) + ("; ..." if len(reasons) > _REASONS_SHOWN else "")
        return ProxyError(
            error.status,
            f"{len(reasons)} attempts failed: {shown}",
            error.fault,
            error.errorType,
            error.retryAfter,
            error.headers,
        )

    def _whyNotRetry(self, error: ProxyError, sent: bool, delivery: Delivery) -> str | None:
        """Why the failed attempt may not be repeated (empty: no need to say), or C{None} if it may."""
        if error.fault is Fault.CLIENT or self._responded:
            return ""
        policy = self.service.retry  # type: ignore[union-attr]
        if policy.tryDuration and self.proxy.reactor.seconds() - self._startedAt >= policy.tryDuration:
            return f"the try duration of {policy.tryDuration:g}s is spent"
        if not sent:
            return None
        if not self._mayRepeat and delivery is not Delivery.UNPROCESSED:
            return f"{self.inbound.method.decode('latin-1')} requests are not repeated once sent"
        if self._body is not None and not self._body.replayable:
            return f"its body was larger than the {policy.replayBodySize} bytes kept for a retry"
        if delivery is not Delivery.MAYBE and self._staleRetries < _STALE_RETRIES:
            return None
        if self._retries >= policy.retries:
            return f"{policy.retries} retries are spent"
        return None

    def _retry(self, error: ProxyError, sent: bool, delivery: Delivery) -> None:
        if sent:
            if delivery is not Delivery.MAYBE and self._staleRetries < _STALE_RETRIES:
                # The upstream closed an idle connection as the request went out, or refused the
                # request: it may take the retry, and the retry budget is not spent.
                self._staleRetries += 1
                if self.upstream in self._tried:
                    self._tried.remove(self.upstream)  # type: ignore[arg-type]
            else:
                self._retries += 1
            if self._body is not None:
                self._body.rewind()
        _log.info("{reason}; trying {target} again", reason=error.reason, target=self._loggedTarget())
        self._lastError = error
        self._failures += (error.reason,)
        self._attempt()

    def _unbind(self, error: ProxyError | None, report: bool = True) -> None:
        """
        The current attempt is over: stop counting it against its upstream, and report how it went (with
        C{report} false, the client went away: nothing was learnt of the upstream).
        """
        upstream, self._bound = self._bound, None
        if upstream is None:
            return
        upstream.inFlight -= 1
        if self._trace is not None:
            self._trace.attemptEnded(self._status, error, self.proxy.reactor.seconds(), cancelled=not report)
        if not report:
            return
        service = self.service
        assert service is not None
        latency = self._latency if self._status is not None else self.proxy.reactor.seconds() - self._sentAt
        if self._status is not None:
            upstream.responded(latency)
        service.balancer.report(upstream, Outcome(self._status, latency, error))
        if error is None:
            service.registry.success(service.name, upstream)
        elif error.fault is Fault.UPSTREAM:
            service.registry.failure(service.name, upstream, error.reason)

    def _loggedTarget(self) -> str:
        return self.inbound.method.decode("latin-1") + " " + self.inbound.target[:200].decode("latin-1")

    def _head(self, upstream: Upstream) -> RequestHead:
        """The request for C{upstream}: the target kept byte-exact, joined with the upstream's base path."""
        outbound = self.outbound
        body = self._body
        declared = body is None and self.inbound.headers.hasHeader(b"content-length")
        return RequestHead(
            method=outbound.method,
            target=_joinPath(upstream.url.basePath, outbound.target),
            authority=outbound.host if outbound.host is not None else upstream.hostHeader,
            scheme=upstream.url.requestScheme,
            fields=outbound.fields(),
            acceptsTrailers=outbound.acceptsTrailers,
            bodyLength=0 if declared else (body.length if body is not None else None),
            hasBody=body is not None or declared,
            upgrade=self._upgrade,
        )

    # -- ResponseReceiver

    def responseInterim(self, status: int, headers: Pairs) -> None:
        if not self._ended:
            self.downstream.sendInterim(status, responseHeaderPairs(headers))

    def responseHead(self, version: bytes, status: int, reason: bytes, headers: Pairs, hasBody: bool) -> None:
        service = self.service
        assert service is not None
        self._status = status
        self._latency = self.proxy.reactor.seconds() - self._sentAt
        if status in service.retry.retryStatuses:
            label = self._bound.pool.label if self._bound is not None else "?"
            error = upstreamError(502, f"upstream {label} answered {status}", "http_response_status")
            if self._whyNotRetry(error, True, Delivery.MAYBE) is None:
                connection, self._connection = self._connection, None
                assert connection is not None
                connection.abort()
                self._unbind(error)
                self._retry(error, True, Delivery.MAYBE)
                return
        if self._overH2 is not None and 200 <= status < 300:
            # A 2xx to an extended CONNECT would tell the client its tunnel is open.
            connection, self._connection = self._connection, None
            assert connection is not None
            connection.abort()
            label = self._bound.pool.label if self._bound is not None else "?"
            why = f"upstream {label} answered {status} to a WebSocket handshake"
            self._end(upstreamError(502, why, "http_protocol_error"))
            return
        self._responded = True
        fields = self._responseFields(service, version, status, headers)
        if fields is None:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.abort()
            return
        if self._run is not None and self._run.replacement is not None:
            self._takeOver(self._run.replacement, hasBody)
            return
        downstream = self.downstream
        if not hasBody:
            self._transform = None  # nothing to rewrite: a transform's last bytes would follow a bodiless head
        else:
            downstream.registerProducer(self._bodyProducer(), True)
        downstream.sendHead(status, reason or None, fields, hasBody)

    def _bodyProducer(self) -> UpstreamConnection | SpooledResponse:
        """What the client pauses: the upstream connection, or the spool a filter asked for between them."""
        connection, context = self._connection, self._context
        assert connection is not None
        if context is None or context.bufferResponse is None:
            return connection
        spooled = self._spooled = SpooledResponse(context.bufferResponse, self.downstream, connection)
        context.whenEnded(spooled.close)
        return spooled

    def _responseFields(self, service: Service, version: bytes, status: int, headers: Pairs) -> Pairs | None:
        """
        The fields of the response to send: the end-to-end ones, as the response filters leave them, with
        this proxy added to ``Via``; C{None} (the exchange ended with a 502) when a filter failed.
        """
        pairs = responseHeaderPairs(headers)
        try:
            balancer = service.balancer
            if IResponseFilter.providedBy(balancer):
                context = self.context()
                context.upstream = self.upstream
                IResponseFilter(balancer).onResponse(context, status, pairs)
            if self._run is not None:
                self._run.context.upstream = self.upstream
                self._transform = self._run.response(status, pairs)
        except Exception:
            _log.failure("response filter failed on {target}", target=self.inbound.target[:200])
            self._end(proxyError(502, "a response filter failed on the upstream's response", "proxy_internal_error"))
            return None
        fields: Pairs = []
        via: list[bytes] = []
        for name, value in pairs:
            if name.lower() == b"via":
                via.append(value)
            else:
                fields.append((name, value))
        fields.append((b"Via", self.proxy.forwarding.via(via, version)))
        record = self.downstream.record
        if record is not None and record.requestId is not None:
            fields.append((b"X-Request-ID", record.requestId.encode("ascii")))
        return fields

    def _takeOver(self, answer: ILocalAnswer, hasBody: bool) -> None:
        """
        A response filter answers in place of the upstream's response: its body is not read (the connection
        is closed if one was coming, else goes back to its pool when the response ends), the answer is served.
        """
        self._replaced = True
        if hasBody:
            connection, self._connection = self._connection, None
            assert connection is not None
            connection.abort()
            self._unbind(None)
        self._serve(answer)

    def responseSwitched(self, headers: Pairs, side: TunnelSide) -> None:
        """The upstream switched protocols: splice the client with it, if it switched to one asked for."""
        service = self.service
        assert service is not None
        self._connection = None
        self._status = 101
        self._latency = self.proxy.reactor.seconds() - self._sentAt
        label = self._bound.pool.label if self._bound is not None else "?"
        why = unrequestedProtocol(self._upgrade, headers)
        if why is None and self._overH2 is not None:
            why = self._overH2.refusal(headers)
        if why is not None:
            side.abortConnection()
            self._end(upstreamError(502, f"upstream {label}: {why}", "http_protocol_error"))
            return
        self._responded = True
        fields = self._responseFields(service, b"1.1", 101, headers)
        if fields is None:
            side.abortConnection()
            return
        self._unbind(None)
        self._ended = True
        self._record()
        relay = None
        limits = service.websocket if isinstance(service, MessageAwareService) else None
        label = f"{self._loggedTarget()} <-> {label}"
        if self._overH2 is not None:
            relay = messageRelay(limits) if limits is not None else None
            status, fields = 200, self._overH2.responseFields(fields)
        else:
            switched = [(name, value) for name, value in headers if name.lower() == b"upgrade"]
            status, fields = 101, [(b"Connection", b"Upgrade"), *switched, *fields]
            if limits is not None and any(value.strip().lower() == b"websocket" for _, value in switched):
                relay = messageRelay(limits)
        splice(self.proxy.tunnels, self.downstream, status, fields, side, label, relay)
        self._contextEnded()

    def responseData(self, data: bytes) -> None:
        if self._transform is not None:
            data = self._transform.transform(data)
            if not data:
                return
        self._write(data)

    def _write(self, data: bytes) -> None:
        """Send response body bytes to the client, or to the spool on its way (a full disk ends the exchange)."""
        spooled = self._spooled
        if spooled is None:
            self.downstream.write(data)
            return
        try:
            spooled.write(data)
        except OSError as e:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.abort()
            self._end(proxyError(502, f"the response could not be spooled: {e.strerror}", "proxy_internal_error"))

    def responseDone(self, trailers: Pairs) -> None:
        self._connection = None
        self._unbind(None)
        if self._ended or self._replaced:
            return
        if self._transform is not None:
            tail = self._transform.finish()
            if tail:
                self._write(tail)
        if self._ended:
            return
        if self._spooled is not None:
            # The upstream is done (its connection is back in the pool); the client may still be reading.
            self._spooled.end(lambda: self._finish(trailers))
        else:
            self._finish(trailers)

    def _finish(self, trailers: Pairs) -> None:
        """The client has the whole body: end its response."""
        if self._ended:
            return
        self._ended = True
        downstream = self.downstream
        downstream.unregisterProducer()
        if self._clientBody is not None and not self._clientBody.complete:
            downstream.stopKeepAlive()  # answered before the client finished sending
        self._record()
        downstream.finish(responseHeaderPairs(trailers) if trailers else ())
        self._contextEnded()

    def responseFailed(self, error: ProxyError, delivery: Delivery) -> None:
        self._connection = None
        self._retryOrEnd(error, sent=True, delivery=delivery)

    # -- endings

    def _end(self, error: ProxyError) -> None:
        self._unbind(error)
        if self._ended:
            return
        self._ended = True
        downstream = self.downstream
        self._stopClientBody()
        if self._body is not None and self._body is not self._clientBody:
            self._body.stopProducing()
        if self._run is not None and not self._responded:
            try:
                self._run.errorFields(error)
            except Exception:
                _log.failure("response filter failed on the error for {target}", target=self._loggedTarget())
        self._record()
        downstream.fail(error)
        self._contextEnded()

    def _clientGone(self, reason: Failure) -> None:
        if self._ended:
            return
        self._ended = True
        _log.info("client went away during {target}; cancelling the upstream request", target=self._loggedTarget())
        if self._run is not None:
            self._run.cancel()
        self._record()
        self._contextEnded()
        if self._pending is not None:
            self._pending.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()
        self._unbind(None, report=False)


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


def _unavailable(service: Service) -> ProxyError:
    """503 when no upstream of C{service} may take requests, with when one might again."""
    members = service.registry.members(service.name)
    waits = [u.health.retryAfter() for u in members if u.health.activeUp]
    retryAfter = max(1, math.ceil(min(waits))) if waits else _DOWN_RETRY_AFTER
    if not members:  # the configuration's doing (or no registration yet)
        return proxyError(
            503, f"service {service.name!r} has no upstream configured", "destination_unavailable", retryAfter
        )
    states = ", ".join(f"{u.key} {u.health.state}" for u in members[:_REASONS_SHOWN])
    # Each upstream failed its health checks or was ejected for its errors: the upstreams are at fault.
    return upstreamError(
        503,
        f"no upstream of service {service.name!r} is available ({states})",
        "destination_unavailable",
        retryAfter,
    )


def _asProxyError(failure: Failure) -> ProxyError:
    if isinstance(failure.value, ProxyError):
        return failure.value
    _log.failure("unexpected failure while proxying", failure)
    return proxyError(502, f"unexpected failure: {failure.getErrorMessage()}", "proxy_internal_error")
