"""
The pluggable parts of rproxy.

An exchange runs: the L{IDirector} (which service, and how to rewrite the request), then the request
filters of the route's chain, then the service's L{IBalancer} (which upstream from the L{IRegistry}), then
the upstream, then the chain's response filters in reverse order.  Each built-in part implements these
interfaces, so third parties plug in the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from twisted.web.resource import IResource
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from rproxy.cluster.redis import RedisClient
    from rproxy.downstream.request import ProxyRequest
    from rproxy.errors import ProxyError
    from rproxy.local.responder import Responder
    from rproxy.proxy.message import FilterVerdict, InboundRequest, OutboundRequest, RequestContext
    from rproxy.proxy.service import Service
    from rproxy.upstream.upstreams import Upstream


@dataclass(frozen=True)
class Outcome:
    """
    How one attempt on an upstream went, reported to its balancer.

    @ivar status: the response status, or C{None} when no response arrived.
    @ivar latency: seconds from sending the request to the response head (or the failure).
    @ivar error: the failure, if the attempt failed.
    """

    status: int | None
    latency: float
    error: ProxyError | None = None


@dataclass(frozen=True)
class HealthResult:
    """The verdict of one health check, with the reason when it failed."""

    healthy: bool
    reason: str = ""


class IStreamingResource(IResource):
    """
    A resource that answers as soon as the request head is in, while the body still arrives.

    L{rproxy.downstream.request.ProxyRequest} calls L{renderStreaming} instead of C{render} for such a resource;
    under a plain C{twisted.web.server.Request} the resource's C{render} runs as usual.
    """

    def renderStreaming(request: ProxyRequest) -> None:
        """Start answering; C{request.bodyPipe} carries the body (C{None} when there is none)."""


class IDirector(Interface):
    """Routing and rewriting: which service takes a request, and what is sent to it."""

    def direct(inbound: InboundRequest, outbound: OutboundRequest) -> Service | None:
        """
        Choose the service for C{inbound} and rewrite C{outbound} (target, host, headers).

        @return: the service, or C{None} if no route matches (the client gets 404).
        @raise ProxyError: to refuse the request instead (a target it cannot route unambiguously: 400).
        """


class ISplit(Interface):
    """The choice between several services for one request: a canary, an A/B test, a blue/green switch."""

    def choose(inbound: InboundRequest) -> Service:
        """The service that takes C{inbound} (called once per request a route sends to the split)."""


class IBalancer(Interface):
    """
    Choosing an upstream of a service for one attempt.

    A balancer reads only an upstream's C{key} (a stable name, for hashing), C{weight} (its current
    weight, lowered while it slow-starts) and C{inFlight} (exchanges using it now).  A balancer that also
    provides L{IResponseFilter} sees each response head of its service (sticky sessions set cookies so).
    """

    def pick(upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]) -> Upstream | None:
        """
        Choose one of C{upstreams} (the available set, never empty) that is not in C{tried}.

        @param request: the request as the client sent it (client address, headers, target).
        @param tried: the upstreams this request has already been sent to or failed on.
        @return: the upstream, or C{None} when every one was tried (or none should take this attempt).
        """

    def report(upstream: Upstream, outcome: Outcome) -> None:
        """Learn how an attempt on C{upstream} went (latency, status, error)."""


class IBalancerState(Interface):
    """
    A balancer that shows what it has learnt of each upstream (its latency estimates, its shares) in the
    admin API's C{/state} and on the status page; an optional addition to L{IBalancer}.
    """

    def describe(upstream: Upstream) -> Mapping[str, float | int | str] | None:
        """
        What it has learnt of C{upstream}: a few named numbers or short texts (C{None}: nothing yet).  Called
        for people, never on the proxying path; it must not change what the balancer will pick.
        """


class IBalancerFactory(IPlugin):
    """A named balancer kind, found with C{getPlugins(IBalancerFactory, rproxy.plugins)}."""

    name = Attribute("The name that selects it, as in C{--balancer NAME}.")
    description = Attribute("One line for C{--list-balancers}.")

    def build(options: Mapping[str, object]) -> IBalancer:
        """A new balancer for one service; raise C{ValueError} naming a bad option."""


class IRegistry(Interface):
    """The live upstreams of each service."""

    def add(service: str, upstream: Upstream) -> None:
        """Put C{upstream} in C{service}'s set."""

    def remove(service: str, upstream: Upstream) -> None:
        """Take C{upstream} out; its exchanges in flight finish."""

    def lookup(service: str) -> Sequence[Upstream]:
        """The upstreams that may take new requests for C{service} (not ejected, not down)."""

    def members(service: str) -> Sequence[Upstream]:
        """Every upstream of C{service}, available or not."""

    def failure(service: str, upstream: Upstream, reason: str) -> None:
        """Record that an exchange with C{upstream} failed (passive health may eject it)."""

    def success(service: str, upstream: Upstream) -> None:
        """Record that an exchange with C{upstream} went well."""

    def watch(callback: Callable[[str], None]) -> Callable[[], None]:
        """Call C{callback(service)} on every change; return a function that stops watching."""


class IHealthCheck(Interface):
    """An active probe of one upstream."""

    def check(upstream: Upstream) -> Deferred[HealthResult]:
        """Probe C{upstream} on a fresh connection."""


class IRequestFilter(Interface):
    """
    A step of a route's filter chain on the way in (authentication, rate limits, CORS, header rules, ...).

    It reads C{context.inbound} (as the client sent it), may change C{context.outbound} (what the upstream
    gets), may note what it learned on the context (C{user}, C{claims}, C{notes}) for the filters after it,
    and decides: go on, or answer the client itself.
    """

    consumes = Attribute(
        "The request fields (lower-case bytes names) it reads (from the inbound request) and that are removed "
        "from the outbound request before the chain runs, so that what the client sent of them (credentials, "
        "fields a filter sets from what it verified) never reaches the upstream; filters may set them. "
        "An empty collection for none."
    )

    def onRequest(context: RequestContext) -> FilterVerdict | Awaitable[FilterVerdict]:
        """
        Decide on the request: C{None} to go on, a L{LocalResponse} or a L{ProxyError} to answer the client
        instead of proxying (the filters before it see that answer as a response); or a Deferred or coroutine
        of one of those when the decision needs I/O (the exchange waits, and cancels it if the client leaves).
        """


class IClosable(Interface):
    """
    A filter that holds resources (connections, timers, threads): closed when a reload drops it (its
    definition changed or is gone) and when the proxy stops.  Exchanges in flight may still use it.
    """

    def close() -> Deferred[None] | None:
        """Release what it holds; a Deferred when that takes time (the proxy's shutdown waits for it)."""


class IBodyTransform(Interface):
    """A rewrite of one response body as it streams (compression); bounded memory whatever the body's size."""

    def transform(data: bytes) -> bytes:
        """The bytes to send for C{data}, the next part of the body (may be empty while it buffers)."""

    def finish() -> bytes:
        """The body has ended: the last bytes to send."""


class ILocalAnswer(Interface):
    """
    A response the proxy makes itself and streams: what a local route serves (a static directory, a handler,
    a canned response), or what replaces an upstream's response (the file an ``X-Accel-Redirect`` names).
    """

    def serve(context: RequestContext, responder: Responder) -> None:
        """
        Answer the request of C{context} through C{responder} (its head, its body with a producer, its end,
        or an error), now or later; C{context.whenEnded} tells when the client has gone.
        """


class IResponseFilter(Interface):
    """A step of a route's filter chain on the way out: it sees the response head before the client does."""

    def onResponse(
        context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]
    ) -> IBodyTransform | ILocalAnswer | None:
        """
        Change C{headers} (the end-to-end fields, in order) in place; return a transform to rewrite the
        body, or C{None}.  Called for upstream responses, for the answers of filters later in the chain
        (whose whole body a transform rewrites), and for the proxy's errors, of which C{headers} holds only
        the error's own fields (C{WWW-Authenticate}, ...; the status line, framing and the one-line body are
        the proxy's) and whose bodies are never transformed.

        For an upstream's response only, it may return an L{ILocalAnswer} instead: the upstream's response
        is then dropped (its body unread, its connection closed if one was coming) and the answer is served
        in its place, its head seen only by the response filters before this one in the chain.
        """


class IFilterFactory(IPlugin):
    """A named filter kind, found with C{getPlugins(IFilterFactory, rproxy.plugins)}."""

    name = Attribute("The name that selects it, as C{type = NAME} in a C{[filters.X]} table.")
    description = Attribute("One line for C{--list-filters}.")

    def build(options: Mapping[str, object], environment: FilterEnvironment) -> IRequestFilter | IResponseFilter:
        """
        A new filter (providing L{IRequestFilter}, L{IResponseFilter} or both) from the options of its table;
        raise C{ValueError} naming a bad option.
        """


@dataclass(frozen=True)
class FilterEnvironment:
    """
    What a filter factory may build on besides its options.

    @ivar reactor: the reactor, for timers and the filter's own I/O (treq takes it).
    @ivar base: the directory relative file names in options are read from (the config file's).
    @ivar redis: the process's Redis client (C{--redis}), one for every filter and every reload; C{None}
        without C{--redis}.  While a configuration is only checked, a client that has not connected.
    @ivar name: the name of the definition being built (its C{[filters.NAME]} table), for the state a filter
        keeps outside the process (its keys in Redis).
    """

    reactor: object
    base: str = "."
    redis: RedisClient | None = None
    name: str = ""
