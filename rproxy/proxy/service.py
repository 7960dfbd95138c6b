"""A service: a named set of interchangeable upstreams, and how requests are spread over them and retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rproxy.filters.chain import NO_FILTERS, FilterChain
from rproxy.proxy.retry import RetryPolicy

if TYPE_CHECKING:
    from rproxy.interfaces import IBalancer, ILocalAnswer, IRegistry


@dataclass(frozen=True)
class Service:
    """
    A named set of interchangeable upstreams and how to choose among them.

    @ivar rewriteHost: send the chosen upstream's host as ``Host`` instead of the client's.
    @ivar retry: when a failed attempt is tried again on another upstream.
    @ivar filters: the filters its requests and responses go through (a route gives its own with a copy).
    @ivar route: the name of the route its requests came by, for logs and metrics (each route has a copy).
    @ivar local: what answers its requests in the proxy itself, after its filters, instead of an upstream
        (a local route's static directory, handler or canned response: L{rproxy.local}); C{None} to proxy.
    """

    name: str
    registry: IRegistry
    balancer: IBalancer
    rewriteHost: bool = False
    retry: RetryPolicy = RetryPolicy()
    filters: FilterChain = NO_FILTERS
    route: str = ""
    local: ILocalAnswer | None = None
