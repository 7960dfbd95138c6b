"""
What a configuration becomes: its services of upstreams, the director over them, the proxy and its site, the
health checks.  Used at start (L{rproxy.app.tap}), by a live reload (L{rproxy.app.reload}) and by
C{--check-config}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rproxy.app.config import ConfigError, ProxyConfig, RouteConfig
from rproxy.app.filters import FilterSet
from rproxy.downstream.site import ProxySite
from rproxy.headers import ForwardingPolicy, parseNetworks
from rproxy.health.checks import HealthChecker, HealthCheckSettings
from rproxy.health.shared import Verdict
from rproxy.interfaces import IDirector
from rproxy.observe.accesslog import AccessLog
from rproxy.observe.logfile import AccessLogFile, AccessLogSink, TwistedLogDestination
from rproxy.observe.redact import SECRET_HEADERS, SECRET_PARAMS, secretNames
from rproxy.observe.requestid import RequestIds
from rproxy.proxy.balancers import balancerFactories
from rproxy.proxy.directors import RoutingDirector, SingleServiceDirector
from rproxy.proxy.exchange import Proxy
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.resource import buildResource
from rproxy.proxy.service import Service
from rproxy.tunnel.splice import Tunnels
from rproxy.upstream.upstreams import Upstream

if TYPE_CHECKING:
    from rproxy.cluster.redis import RedisClient

_log = Logger()


def buildServices(
    config: ProxyConfig, reactor: IReactorTime, registry: MemoryRegistry, filters: FilterSet
) -> tuple[dict[str, Service], list[Upstream]]:
    """
    Each service of C{config}, by name, with its balancer and its chain of C{filters}; and all their upstreams,
    registered in C{registry}.
    """
    factories = balancerFactories()
    services: dict[str, Service] = {}
    upstreams: list[Upstream] = []
    for name, settings in config.services.items():
        for url in settings.upstreams:
            upstream = Upstream.fromURL(url, reactor, settings.pool, settings.passive)
            registry.add(name, upstream)
            upstreams.append(upstream)
        balancer = factories[settings.balancer].build(settings.balancerOptions)
        chain = filters.chain(config.serviceFilters(name))
        services[name] = Service(name, registry, balancer, settings.rewriteHost, settings.retry, chain)
    return services, upstreams


def buildDirector(
    routes: Sequence[RouteConfig], services: Mapping[str, Service], filters: FilterSet | None = None
) -> IDirector:
    """
    The director of C{routes} over C{services} (by name): a L{RoutingDirector}; for the one catch-all route to
    a service, without rewrites, that service's L{SingleServiceDirector} (the same answers, less work).
    """
    only = routes[0] if len(routes) == 1 else None
    if only is not None and isinstance(only.target, str) and replace(only, name="") == RouteConfig(only.target):
        service = services[only.target]
        return SingleServiceDirector(replace(service, route=only.name) if only.name else service)
    return RoutingDirector(route.build(services, filters) for route in routes)


def buildForwarding(config: ProxyConfig) -> ForwardingPolicy:
    """The X-Forwarded-*/Forwarded/Via policy of C{config}."""
    return ForwardingPolicy(parseNetworks(config.trustedProxies), config.viaName.encode("ascii"))


def buildProxy(
    config: ProxyConfig, reactor: IReactorTime, services: Mapping[str, Service], filters: FilterSet
) -> Proxy:
    """The proxy of C{config}, routing to C{services} (by name), the routes with their own chains of C{filters}."""
    tunnels = Tunnels(reactor, config.tunnelIdleTimeout)
    director = buildDirector(config.routes, services, filters)
    return Proxy(reactor, director, buildForwarding(config), tunnels=tunnels)


def buildFilters(config: ProxyConfig, reactor: IReactorTime, redis: RedisClient | None = None) -> FilterSet:
    """The filters C{config} defines, on C{reactor}, with the process's C{redis} client if there is one."""
    return FilterSet(config.filters, reactor, config.base, redis)


def buildSite(
    config: ProxyConfig,
    reactor: IReactorTime,
    registry: MemoryRegistry | None = None,
    redis: RedisClient | None = None,
) -> tuple[ProxySite, list[Upstream]]:
    """
    The proxy's site, routing to its services, and their upstreams (whose pools shutdown closes); its filters
    may keep state in C{redis}, the process's Redis client.
    """
    filters = buildFilters(config, reactor, redis)
    services, upstreams = buildServices(config, reactor, MemoryRegistry() if registry is None else registry, filters)
    proxy = buildProxy(config, reactor, services, filters)
    site = ProxySite(buildResource(proxy), config.client, reactor)
    site.requestIds = RequestIds(lambda peer: proxy.forwarding.trusts(peer))
    accessLog = buildAccessLog(config, reactor)
    if accessLog is not None:
        site.observers.append(accessLog)
    return site, upstreams


def buildAccessLog(config: ProxyConfig, reactor: IReactorTime) -> AccessLog | None:
    """The access log C{config} asks for: to the log output (C{-}), to a file, or none."""
    if config.accessLog is None:
        return None
    sink: AccessLogSink
    if config.accessLog == "-":
        sink = TwistedLogDestination()
    elif config.accessLog == "stdout":
        sink = AccessLogFile.standardOutput(cast(Any, reactor))
    else:
        path = os.path.abspath(config.accessLog)
        try:
            sink = AccessLogFile(path, cast(Any, reactor))
        except OSError as e:
            raise ConfigError(f"--access-log: cannot open {path}: {e.strerror}") from None
    return AccessLog(
        sink,
        config.accessLogFormat,
        secretNames(SECRET_PARAMS, config.accessLogRedact),
        config.accessLogHeaders,
        secretNames(SECRET_HEADERS, config.accessLogRedact),
    )


def healthCheckSettings(config: ProxyConfig) -> dict[str, HealthCheckSettings]:
    """The active health checks of the services that have them, by service name."""
    return {name: each.healthCheck for name, each in config.services.items() if each.healthCheck is not None}


def healthChecker(
    config: ProxyConfig,
    reactor: IReactorTime,
    registry: MemoryRegistry,
    report: Callable[[Verdict], None] | None = None,
) -> HealthChecker | None:
    """
    The active health checks of the services that have them (C{None} if none has), over C{registry}; their
    verdicts also told to C{report} (L{rproxy.health.shared}).
    """
    settings = healthCheckSettings(config)
    return HealthChecker(reactor, registry, settings, report) if settings else None


def closeUpstreams(registry: MemoryRegistry) -> None:
    """Close the idle connections to every upstream in C{registry}; busy ones close when their exchange ends."""
    for name in registry.services():
        for upstream in registry.members(name):
            upstream.pool.drain("is closing: the proxy is shutting down")


def warnInsecureUpstreams(config: ProxyConfig) -> None:
    """Say, once, which services do not verify their upstreams' TLS certificates."""
    insecure = sorted(name for name, each in config.services.items() if each.pool.tls.insecure)
    if insecure:
        _log.warn(
            "the TLS certificates of the https upstreams of {services} are not verified (--upstream-tls-insecure)",
            services=", ".join(insecure),
        )
