"""
rproxy: a streaming HTTP reverse proxy and edge gateway on Twisted.

The public API, importable from here: L{ReverseProxyResource} (a drop-in for C{twisted.web.proxy}'s) and
the L{Proxy} it mounts; the site that serves it; the parts a proxy is assembled from (services of
upstreams, a registry, directors, balancers, forwarding rules, health checks); the interfaces of the
pluggable parts, with what filters see, answer and read their options with; and the version.  Plug-in
authors also use L{rproxy.interfaces} and L{rproxy.testing}.

Each name is imported from its module on first use: importing C{rproxy} imports nothing else, so that
no part of rproxy depends on this module, and importing it installs no reactor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rproxy._version import __version__

if TYPE_CHECKING:
    from rproxy.app.admin import LocalRoutes
    from rproxy.downstream.limits import ClientLimits
    from rproxy.downstream.site import ProxySite
    from rproxy.errors import ProxyError, clientError, proxyError
    from rproxy.filters.chain import FilterChain
    from rproxy.filters.factory import filterFactories
    from rproxy.headers import ForwardingPolicy, parseNetworks
    from rproxy.health.checks import HealthChecker, HealthCheckSettings
    from rproxy.interfaces import (
        FilterEnvironment,
        HealthResult,
        IBalancer,
        IBalancerFactory,
        IBodyTransform,
        IDirector,
        IFilterFactory,
        IHealthCheck,
        IRegistry,
        IRequestFilter,
        IResponseFilter,
        IStreamingResource,
        Outcome,
    )
    from rproxy.options import PluginOptions
    from rproxy.proxy.balancers import BalancerOptions, RoundRobin, balancerFactories
    from rproxy.proxy.directors import (
        BlueGreen,
        Route,
        RoutingDirector,
        ServiceVersion,
        SingleServiceDirector,
        WeightedSplit,
    )
    from rproxy.proxy.exchange import Exchange, Proxy
    from rproxy.proxy.message import FilterVerdict, InboundRequest, LocalResponse, OutboundRequest, RequestContext
    from rproxy.proxy.registry import MemoryRegistry
    from rproxy.proxy.resource import ReverseProxyResource
    from rproxy.proxy.service import Service
    from rproxy.upstream.settings import PoolSettings
    from rproxy.upstream.upstreams import Upstream

#: Where each public name is defined.
_PUBLIC = {
    "BalancerOptions": "rproxy.proxy.balancers",
    "BlueGreen": "rproxy.proxy.directors",
    "ClientLimits": "rproxy.downstream.limits",
    "Exchange": "rproxy.proxy.exchange",
    "FilterChain": "rproxy.filters.chain",
    "FilterEnvironment": "rproxy.interfaces",
    "FilterVerdict": "rproxy.proxy.message",
    "ForwardingPolicy": "rproxy.headers",
    "HealthCheckSettings": "rproxy.health.checks",
    "HealthChecker": "rproxy.health.checks",
    "HealthResult": "rproxy.interfaces",
    "IBalancer": "rproxy.interfaces",
    "IBalancerFactory": "rproxy.interfaces",
    "IBodyTransform": "rproxy.interfaces",
    "IDirector": "rproxy.interfaces",
    "IFilterFactory": "rproxy.interfaces",
    "IHealthCheck": "rproxy.interfaces",
    "IRegistry": "rproxy.interfaces",
    "IRequestFilter": "rproxy.interfaces",
    "IResponseFilter": "rproxy.interfaces",
    "IStreamingResource": "rproxy.interfaces",
    "InboundRequest": "rproxy.proxy.message",
    "LocalResponse": "rproxy.proxy.message",
    "LocalRoutes": "rproxy.app.admin",
    "MemoryRegistry": "rproxy.proxy.registry",
    "OutboundRequest": "rproxy.proxy.message",
    "Outcome": "rproxy.interfaces",
    "PluginOptions": "rproxy.options",
    "PoolSettings": "rproxy.upstream.settings",
    "Proxy": "rproxy.proxy.exchange",
    "ProxyError": "rproxy.errors",
    "ProxySite": "rproxy.downstream.site",
    "RequestContext": "rproxy.proxy.message",
    "ReverseProxyResource": "rproxy.proxy.resource",
    "RoundRobin": "rproxy.proxy.balancers",
    "Route": "rproxy.proxy.directors",
    "RoutingDirector": "rproxy.proxy.directors",
    "Service": "rproxy.proxy.service",
    "ServiceVersion": "rproxy.proxy.directors",
    "SingleServiceDirector": "rproxy.proxy.directors",
    "Upstream": "rproxy.upstream.upstreams",
    "WeightedSplit": "rproxy.proxy.directors",
    "balancerFactories": "rproxy.proxy.balancers",
    "clientError": "rproxy.errors",
    "filterFactories": "rproxy.filters.factory",
    "parseNetworks": "rproxy.headers",
    "proxyError": "rproxy.errors",
}

__all__ = [
    "BalancerOptions",
    "BlueGreen",
    "ClientLimits",
    "Exchange",
    "FilterChain",
    "FilterEnvironment",
    "FilterVerdict",
    "ForwardingPolicy",
    "HealthCheckSettings",
    "HealthChecker",
    "HealthResult",
    "IBalancer",
    "IBalancerFactory",
    "IBodyTransform",
    "IDirector",
    "IFilterFactory",
    "IHealthCheck",
    "IRegistry",
    "IRequestFilter",
    "IResponseFilter",
    "IStreamingResource",
    "InboundRequest",
    "LocalResponse",
    "LocalRoutes",
    "MemoryRegistry",
    "OutboundRequest",
    "Outcome",
    "PluginOptions",
    "PoolSettings",
    "Proxy",
    "ProxyError",
    "ProxySite",
    "RequestContext",
    "ReverseProxyResource",
    "RoundRobin",
    "Route",
    "RoutingDirector",
    "Service",
    "ServiceVersion",
    "SingleServiceDirector",
    "Upstream",
    "WeightedSplit",
    "balancerFactories",
    "clientError",
    "filterFactories",
    "parseNetworks",
    "proxyError",
    "__version__",
]


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
