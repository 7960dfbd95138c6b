"""
Forward authentication: an auth service decides on every request before it is proxied (nginx's
``auth_request``, Traefik's ``ForwardAuth``).

For each request the filter sends the auth service a subrequest without a body: the credentials the client
sent (``Authorization`` and ``Cookie`` by default) and ``X-Forwarded-Method``, ``-Proto``, ``-Host``, ``-Uri``
and ``-For`` describing the original request.  A 2xx answer lets the request through, with the fields the
auth service named (``X-Auth-User``) copied onto it; any other answer (a 401 with ``WWW-Authenticate``, a 403,
a 302 to a login page) is what the client gets: its status, its end-to-end fields and its body.  When the auth
service cannot decide (it refuses the connection, times out, answers garbage or too much) the client gets a
503 or a 502, never a pass.

The subrequests of one filter share a persistent connection pool, made on the first request (building the
filter opens nothing, so C{--check-config} stays offline) on the environment's reactor.  A client that leaves
while its request waits cancels the subrequest, which closes that connection.  Cookies the auth service sets
are passed on to the client when it refuses, never kept by the filter: one client's session must never ride
on another client's subrequest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from rproxy.errors import ProxyError, proxyError
from rproxy.headers import FORWARDING, FRAMING, HOP_BY_HOP, isToken, responseHeaderPairs
from rproxy.interfaces import FilterEnvironment, IClosable, IRequestFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext
from rproxy.upstream.tls import describeFailure, trustRoot

#: The request fields copied to the subrequest unless C{request-headers} says otherwise.
DEFAULT_REQUEST_HEADERS = ("Authorization", "Cookie")

#: Idle connections to the auth service kept open, and for how many seconds (a filter has no stop hook:
#: after a reload, the old filter's connections close after this long).
IDLE_CONNECTIONS = 10
IDLE_SECONDS = 30

#: Subrequests one filter has in flight at most unless C{max-in-flight} says otherwise: a slow auth service
#: must not cost one connection per waiting request (beyond it, 503 at once, as Envoy's circuit breakers do).
DEFAULT_MAX_IN_FLIGHT = 256

#: The fields the filter sets on every subrequest itself, from the original request.
_DESCRIBING = (b"x-forwarded-method", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-uri", b"x-forwarded-for")


@implementer(IRequestFilter, IClosable)
class ForwardAuth:
    """
    A request filter that asks an auth service about each request.

    @ivar url: the auth service's URL (C{http} or C{https}).
    @ivar timeout: seconds the whole subrequest may take (connection, answer and its body).
    @ivar method: the subrequest's method, or C{None} for the original request's.
    @ivar maxInFlight: the most subrequests in flight at once; a request beyond them gets a 503 at once.
    @ivar inFlight: the subrequests in flight now.
    @ivar consumes: the C{responseHeaders} fields, and the copied C{requestHeaders} fields when they are not
        forwarded to the upstream.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        timeout: float = 5.0,
        method: bytes | None = b"GET",
        requestHeaders: Sequence[bytes] = (b"authorization", b"cookie"),
        responseHeaders: Sequence[bytes] = (),
        userHeader: bytes | None = None,
        maxResponseSize: int = 64 * 1024,
        forwardCredentials: bool = True,
        caFile: str | None = None,
        maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """
        @param reactor: the reactor the subrequests run on (nothing is connected until the first request).
        @param requestHeaders: the inbound fields copied to the subrequest (lower-case names).
        @param responseHeaders: the fields of a 2xx answer copied onto the outbound request (lower-case
            names); whatever the client sent under these names never reaches the upstream.
        @param userHeader: the field of a 2xx answer that names the user (C{context.user}).
        @param maxResponseSize: the largest answer body read; a larger one is a 502.
        @param forwardCredentials: whether the C{requestHeaders} fields still reach the upstream.
        @param caFile: a PEM file of the CAs an C{https} auth service's certificate is checked against,
            instead of the system's roots (read now).
        @param maxInFlight: the most subrequests in flight at once.
        """
        self.url = url
        self.timeout = timeout
        self.method = method
        self.maxInFlight = maxInFlight
        self.inFlight = 0
        # The chain removes what the client sent of these before any filter runs: only the auth service sets them.
        self.consumes = frozenset(responseHeaders) | frozenset(() if forwardCredentials else requestHeaders)
        self._reactor = reactor
        self._requestHeaders = tuple(requestHeaders)
        self._responseHeaders = tuple(responseHeaders)
        self._userHeader = userHeader
        self._maxResponseSize = maxResponseSize
        self._tls = BrowserLikePolicyForHTTPS(trustRoot(caFile) if caFile is not None else None)
        parts = urlsplit(url)
        self._shown = f"{parts.scheme}://{parts.netloc}{parts.path}"  # the query may hold a secret
        self._pool: HTTPConnectionPool | None = None
        self._client: HTTPClient | None = None

    def __repr__(self) -> str:
        return f"<ForwardAuth {self._shown}>"

    def onRequest(self, context: RequestContext) -> FilterVerdict | Deferred[FilterVerdict]:
        """
        Ask the auth service; the Deferred fires with its verdict, or fails with C{CancelledError}.  When
        C{maxInFlight} subrequests are in flight already, answer 503 at once.
        """
        if self.inFlight >= self.maxInFlight:
            return proxyError(
                503,
                f"forward auth service {self._shown} has {self.maxInFlight} subrequests in flight (max-in-flight)",
                "connection_limit_reached",
                retryAfter=1,
            )
        self.inFlight += 1
        asking = Deferred.fromCoroutine(self._ask(context))
        timedOut = False

        def expire() -> None:
            nonlocal timedOut
            timedOut = True
            asking.cancel()

        call = self._reactor.callLater(self.timeout, expire)

        def failed(failure: Failure) -> FilterVerdict:
            if call.active():
                call.cancel()
            if timedOut:
                return self._error(503, f"timed out after {self.timeout:g} s", "http_response_timeout")
            if any(reason.check(CancelledError, ConnectingCancelledError) for reason in _reasons(failure)):
                raise CancelledError()  # the client left (Agent wraps it): the chain expects exactly this
            error = self._unavailable(failure)
            if error is None:
                failure.raiseException()  # not a network failure: the chain logs it and answers 500
            return error

        def decided(verdict: FilterVerdict) -> FilterVerdict:
            if call.active():
                call.cancel()
            return verdict

        def ended(result: object) -> object:
            self.inFlight -= 1
            return result

        return asking.addBoth(ended).addCallbacks(decided, failed)

    def close(self) -> Deferred[None]:
        """Close the idle connections to the auth service (those in use close as their subrequests end)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]

    def _http(self) -> HTTPClient:
        """The client of the subrequests, made on first use."""
        if self._client is None:
            pool = self._pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = IDLE_CONNECTIONS
            pool.cachedConnectionTimeout = IDLE_SECONDS
            agent = Agent(self._reactor, self._tls, pool=pool)
            self._client = HTTPClient(agent, IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[])))
        return self._client

    async def _ask(self, context: RequestContext) -> FilterVerdict:
        # The method the upstream gets: an HTTP/2 WebSocket's CONNECT goes out as the GET of an HTTP/1.1 one.
        method = context.outbound.method if self.method is None else self.method
        response: IResponse = await self._http().request(
            method.decode("ascii"),
            self.url,
            headers=self._subrequestHeaders(context),
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )
        body = await readBody(response, self._maxResponseSize)
        code = response.code
        if body is None:
            return self._error(
                502, f"answered {code} with a body over {self._maxResponseSize} bytes", "http_response_body_size"
            )
        if 200 <= code < 300:
            self._admit(context, response.headers)
            return None
        if 300 <= code < 600:
            return LocalResponse(code, passedOn(response.headers), body, f"forward auth answered {code}")
        return self._error(503, f"answered with status {code}", "http_protocol_error")

    def _subrequestHeaders(self, context: RequestContext) -> Headers:
        """The copied fields, then the fields describing the original request."""
        inbound = context.inbound
        outbound = context.outbound.headers
        headers = Headers()
        for name in self._requestHeaders:
            values = inbound.headers.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
        client = context.client.encode("ascii") if context.client else None
        described = {
            b"x-forwarded-method": context.outbound.method,
            b"x-forwarded-proto": inbound.scheme,
            b"x-forwarded-host": inbound.host,
            b"x-forwarded-uri": inbound.target,
            b"x-forwarded-for": client,
        }
        for name, fallback in described.items():
            # What the upstream would get (the proxy's forwarding rules), unless it is only the request's.
            values = outbound.getRawHeaders(name) if name in FORWARDING else None
            value = b", ".join(values) if values else fallback
            if value is not None:
                headers.setRawHeaders(name, [value])
        return headers

    def _admit(self, context: RequestContext, answer: Headers) -> None:
        """Copy the named fields of a 2xx answer onto the outbound request, and note the user."""
        outbound = context.outbound.headers
        for name in self._responseHeaders:
            values = answer.getRawHeaders(name)
            if values:
                outbound.setRawHeaders(name, values)
        if self._userHeader is not None:
            user = answer.getRawHeaders(self._userHeader)
            if user:
                context.user = user[0].decode("utf-8", "replace")

    def _error(self, status: int, problem: str, errorType: str) -> ProxyError:
        return proxyError(status, f"forward auth service {self._shown} {problem}", errorType)

    def _unavailable(self, failure: Failure) -> ProxyError | None:
        """The error for a subrequest that got no usable answer; C{None} if C{failure} is not about the network."""
        reasons = _reasons(failure)
        for reason in reasons:
            tls = describeFailure(reason)
            if tls is not None:
                return self._error(503, *tls)
        if failure.check(ConnectionRefusedError):
            return self._error(503, "refused the connection", "connection_refused")
        if failure.check(DNSLookupError):
            return self._error(503, "could not be resolved", "dns_error")
        if failure.check(ConnectError):
            return self._error(503, f"could not be reached: {failure.getErrorMessage()}", "destination_unavailable")
        if failure.check(ResponseNeverReceived, RequestTransmissionFailed):
            return self._error(503, "closed the connection without answering", "connection_terminated")
        if failure.check(ResponseFailed):
            if any(reason.check(ConnectionDone, ConnectionLost) for reason in reasons):
                return self._error(503, "closed the connection in the middle of its answer", "http_response_incomplete")
            return self._error(503, "sent a malformed answer", "http_protocol_error")
        return None


def _reasons(failure: Failure) -> list[Failure]:
    """The failures an Agent error wraps (C{ResponseFailed} and its kin hold a list), or C{failure} itself."""
    return getattr(failure.value, "reasons", None) or [failure]


def passedOn(headers: Headers) -> list[tuple[bytes, bytes]]:
    """The fields of a refusal that the client gets: not the hop-by-hop and framing ones."""
    fields = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
    return [
        (name, value)
        for name, value in responseHeaderPairs(fields)
        if name.lower() not in FRAMING
        # Twisted's gzip decoding (treq's) leaves an empty Content-Encoding on an answer that had none.
        and (value or name.lower() != b"content-encoding")
    ]


class _BoundedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes: C{done} fires with it, or with C{None} once the body
    goes past the limit (the connection is closed then, rather than read to its end).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []
        self.done: Deferred[bytes | None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            self.done.callback(None)
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)

    def _cancel(self, done: Deferred[bytes | None]) -> None:
        done.errback(CancelledError())  # before the connection's loss can fire it with another failure
        self.transport.stopProducing()  # type: ignore[union-attr]


def readBody(response: IResponse, limit: int) -> Deferred[bytes | None]:
    """The body of C{response}, or C{None} if it is longer than C{limit} bytes."""
    reader = _BoundedBody(limit)
    response.deliverBody(reader)
    return reader.done


def _fieldNames(options: PluginOptions, name: str, default: Sequence[str], reserved: frozenset[bytes]) -> list[bytes]:
    """The field names of option C{name}, lower case; none of them may be C{reserved}."""
    names = []
    for text in options.strings(name, tuple(default)):
        field = text.encode("ascii", "replace")
        if not isToken(field):
            raise options.error(name, f"{text!r} is not a field name")
        if field.lower() in reserved:
            raise options.error(name, f"{text!r} is set by the proxy itself, and cannot be copied")
        names.append(field.lower())
    return names


def _checkURL(options: PluginOptions) -> str:
    """The C{url} option, an absolute http or https URL without credentials."""
    url = options.text("url")
    if url is None:
        raise options.error("url", "required: the auth service's http:// or https:// URL")
    if not url.isascii() or any(character.isspace() or not character.isprintable() for character in url):
        raise options.error("url", "must be ASCII, without spaces (percent-encode the rest)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        scheme = f"not {parts.scheme}://" if parts.scheme else "an absolute URL"
        raise options.error("url", f"must be an http:// or https:// URL ({scheme})")
    if not parts.hostname:
        raise options.error("url", "has no host")
    if parts.username is not None or parts.password is not None:
        raise options.error("url", "must not hold credentials (user:password@)")
    try:
        parts.port  # noqa: B018 (validates it)
    except ValueError as e:
        raise options.error("url", f"has an invalid port: {e}") from None
    return url


def buildForwardAuth(options: PluginOptions, environment: FilterEnvironment) -> ForwardAuth:
    """A L{ForwardAuth} from the options of a C{[filters.X]} table with C{type = "forward-auth"}."""
    url = _checkURL(options)
    timeout = options.duration("timeout", 5.0)
    if timeout <= 0:
        raise options.error("timeout", "must be greater than 0")
    methodName = options.text("method", "GET") or ""
    method = None if methodName == "original" else methodName.encode("ascii", "replace")
    if method is not None and not isToken(method):
        raise options.error("method", f"must be a method name (GET, POST, ...) or original, got {methodName!r}")
    requestHeaders = _fieldNames(
        options, "request-headers", DEFAULT_REQUEST_HEADERS, HOP_BY_HOP | FRAMING | FORWARDING | frozenset(_DESCRIBING)
    )
    responseHeaders = _fieldNames(options, "response-headers", (), HOP_BY_HOP | FRAMING)
    userHeader = options.text("user-header")
    if userHeader is not None and not isToken(userHeader.encode("ascii", "replace")):
        raise options.error("user-header", f"{userHeader!r} is not a field name")
    maxResponseSize = options.size("max-response-size", 64 * 1024)
    forwardCredentials = options.flag("forward-credentials", True)
    maxInFlight = options.integer("max-in-flight", DEFAULT_MAX_IN_FLIGHT, minimum=1)
    assert maxInFlight is not None
    caFile = options.text("ca-file")
    if caFile is not None:
        if not url.startswith("https:"):
            raise options.error("ca-file", "is only for an https:// url")
        caFile = os.path.join(environment.base, caFile)
    try:
        return ForwardAuth(
            url,
            environment.reactor,
            timeout=timeout,
            method=method,
            requestHeaders=requestHeaders,
            responseHeaders=responseHeaders,
            userHeader=userHeader.encode("ascii").lower() if userHeader is not None else None,
            maxResponseSize=maxResponseSize,
            forwardCredentials=forwardCredentials,
            caFile=caFile,
            maxInFlight=maxInFlight,
        )
    except ValueError as e:  # the CA file
        raise options.error("ca-file", str(e)) from None
