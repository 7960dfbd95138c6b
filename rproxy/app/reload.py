"""
Live reload: a new configuration put in force in a running proxy, on SIGHUP or when its file changes.

L{ConfigReloader} reads the configuration again (the same config file, with the same command line or
environment around it) and hands it to L{LiveProxy.apply}, which builds everything new before it changes
anything: a configuration that is wrong in any way changes nothing, its error is logged, and the
previous one keeps serving.  A right one is put in force at once, between two events of the reactor:

  - the proxy's director (its routes) and forwarding policy are replaced, each in one assignment.
    Requests that start from then on are routed by the new routes; an exchange in flight keeps the
    service and upstream it already has until it ends, whatever changed;
  - a service whose balancing settings (balancer and its options, retries, C{rewrite-host}) did not
    change keeps its L{Service}, and so its balancer's state;
  - an upstream whose URL, weight, pool and passive health settings did not change stays the same
    L{Upstream}: its connection pool, health and in-flight count are carried over, its connections stay
    open.  An upstream that is gone is removed from the registry, which drains it: its exchanges in
    flight finish, its idle connections close.  A new one is added;
  - the health checks are replaced when their settings changed;
  - the grace period applies to the next shutdown, the tunnel idle timeout to the tunnels opened next.
    Open tunnels (WebSockets and other upgraded connections) are never closed by a reload: like any
    exchange in flight, they keep their upstream until they end.

The listeners, the client limits, the access log and the demo upstream cannot change while rproxy runs:
a change to them is logged as a warning and applies at the next restart.  So does a change to the TLS
options (which files hold the certificates); what the files hold is read again by
L{rproxy.downstream.tls.CertificateStore}, which SIGHUP reloads too (L{HangUpReloader}).
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from rproxy.app.build import buildDirector, buildForwarding, buildServices, healthCheckSettings
from rproxy.app.config import (
    BlueGreenConfig,
    ConfigError,
    LocalConfig,
    ProxyConfig,
    RouteConfig,
    ServiceConfig,
    ServiceVersionConfig,
    WeightedSplitConfig,
)
from rproxy.app.filters import FilterSet
from rproxy.cluster.health import StoreHealth
from rproxy.downstream.site import DrainingService
from rproxy.health.checks import HealthChecker
from rproxy.interfaces import IBalancer
from rproxy.proxy.exchange import Proxy
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.service import Service
from rproxy.signals import OnSignal
from rproxy.upstream.upstreams import Upstream

__all__ = ["ConfigReloader", "ConfigSource", "HangUpReloader", "LiveProxy", "ReloadSummary", "describeRoute"]

#: The settings besides services and routes that a reload applies, by option name.
_APPLIED: Mapping[str, Callable[[ProxyConfig], object]] = {
    "trusted-proxy": attrgetter("trustedProxies"),
    "via-name": attrgetter("viaName"),
    "grace": attrgetter("grace"),
    "tunnel-idle-timeout": attrgetter("tunnelIdleTimeout"),
}

#: The settings that only a restart applies, by option name.
_NOT_APPLIED: Mapping[str, Callable[[ProxyConfig], object]] = {
    "listen": attrgetter("listen"),
    "demo-upstream": attrgetter("demoUpstream"),
    "access-log": attrgetter("accessLog"),
    "max-request-line": attrgetter("client.maxRequestLine"),
    "max-header-size": attrgetter("client.maxHeaderBytes"),
    "max-headers": attrgetter("client.maxHeaders"),
    "max-body-size": attrgetter("client.maxBodySize"),
    "header-timeout": attrgetter("client.headerTimeout"),
    "client-timeout": attrgetter("client.idleTimeout"),
    "max-connections": attrgetter("client.maxConnections"),
    "max-client-connections": attrgetter("client.maxClientConnections"),
    "min-body-rate": attrgetter("client.minBodyRate"),
    "body-rate-grace": attrgetter("client.bodyRateGrace"),
    "body-rate-window": attrgetter("client.bodyRateWindow"),
    "write-timeout": attrgetter("client.writeTimeout"),
    "request-timeout": attrgetter("client.requestTimeout"),
    "max-in-flight": attrgetter("client.maxInFlight"),
    "max-memory": attrgetter("client.maxMemory"),
    "tls-listen": attrgetter("tls.listen"),
    "tls-cert": attrgetter("tls.certificates"),
    "tls-watch": attrgetter("tls.watchInterval"),
}


@dataclass(frozen=True)
class ConfigSource:
    """
    Where a running proxy's configuration is read again from.

    @ivar path: the config file: what is watched, and what the log names.
    @ivar load: reads the configuration again, with the services, routes and filters of a document in place
        of the file's when given one (its text, and what its errors name: L{rproxy.cluster.document}); raises
        L{usage.UsageError} or L{ConfigError} saying what is wrong with it.
    @ivar watchInterval: seconds between two looks at the file for changes (0: it is not watched).
    """

    path: str
    load: Callable[[tuple[str, str] | None], ProxyConfig]
    watchInterval: float = 0.0


def _shown(value: object) -> str:
    """A setting's value as the log shows it."""
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _changes(
    old: ProxyConfig, new: ProxyConfig, settings: Mapping[str, Callable[[ProxyConfig], object]]
) -> tuple[str, ...]:
    """Each of C{settings} that differs between C{old} and C{new}, with both values."""
    return tuple(
        f"{name} ({_shown(read(old))} -> {_shown(read(new))})"
        for name, read in settings.items()
        if read(old) != read(new)
    )


def describeRoute(route: RouteConfig) -> str:
    """A route in a few words: its hosts and path prefix, and where it sends requests."""
    target = route.target
    if isinstance(target, str):
        to = f"service {target}"
    elif isinstance(target, WeightedSplitConfig):
        to = "split " + " ".join(f"{name}={weight}" for name, weight in target.services)
    elif isinstance(target, BlueGreenConfig):
        to = f"blue/green {target.blue} {target.green} (active {target.active})"
    elif isinstance(target, LocalConfig):
        to = target.describe()
    else:
        assert isinstance(target, ServiceVersionConfig)
        to = "/service/version/"
    hosts = ",".join(route.hosts) or "any host"
    return f"{hosts}{route.pathPrefix or ''} -> {to}"


@dataclass(frozen=True)
class ReloadSummary:
    """
    What a reload changed: services and routes added, removed or changed, other settings applied, and
    the settings that changed but apply only at the next restart (C{listen (tcp:8080 -> tcp:8081)}).
    """

    servicesAdded: tuple[str, ...] = ()
    servicesRemoved: tuple[str, ...] = ()
    servicesChanged: tuple[str, ...] = ()
    routesAdded: tuple[str, ...] = ()
    routesRemoved: tuple[str, ...] = ()
    routesReordered: bool = False
    applied: tuple[str, ...] = ()
    notApplied: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: ProxyConfig, new: ProxyConfig) -> ReloadSummary:
        """What changes from C{old} to C{new}."""
        added = tuple(route for route in new.routes if route not in old.routes)
        removed = tuple(route for route in old.routes if route not in new.routes)
        return cls(
            servicesAdded=tuple(name for name in new.services if name not in old.services),
            servicesRemoved=tuple(name for name in old.services if name not in new.services),
            servicesChanged=tuple(
                name for name, each in new.services.items() if name in old.services and old.services[name] != each
            ),
            routesAdded=tuple(map(describeRoute, added)),
            routesRemoved=tuple(map(describeRoute, removed)),
            routesReordered=not added and not removed and old.routes != new.routes,
            applied=_changes(old, new, _APPLIED),
            notApplied=_changes(old, new, _NOT_APPLIED),
        )

    def describe(self) -> str:
        """One line: what changed (C{no changes} when nothing did)."""
        parts = [
            f"{what}: {', '.join(items)}"
            for what, items in [
                ("services added", self.servicesAdded),
                ("services removed", self.servicesRemoved),
                ("services changed", self.servicesChanged),
                ("routes added", self.routesAdded),
                ("routes removed", self.routesRemoved),
                ("settings changed", self.applied),
            ]
            if items
        ]
        if self.routesReordered:
            parts.append("routes reordered")
        return "; ".join(parts) or "no changes"


def _balancing(settings: ServiceConfig) -> tuple[object, ...]:
    """The settings a service's L{Service} (its balancer included) is made of."""
    return (settings.balancer, settings.balancerOptions, settings.rewriteHost, settings.retry)


def _sameUpstream(running: Upstream, built: Upstream) -> bool:
    """Whether C{built} (for the new configuration) is C{running} again: the same URL and weight."""
    return (running.key, running.configuredWeight) == (built.key, built.configuredWeight)


class LiveProxy:
    """
    The parts of a running proxy that a new configuration replaces, and how it replaces them (see the
    module's docstring).

    @ivar config: the configuration in force.
    @ivar registry: where the services' upstreams are.
    @ivar proxy: the proxy whose director and forwarding policy a reload replaces.
    @ivar stores: the shared stores it uses (etcd, Redis), whose reachability the admin API, the status page
        and the metrics show.
    @ivar pending: what tells why it should not take requests yet (its configuration from etcd not read).
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: IReactorTime,
        registry: MemoryRegistry,
        proxy: Proxy,
        services: Mapping[str, Service],
        filters: FilterSet,
        draining: DrainingService,
        parent: service.MultiService,
        checks: Callable[[ProxyConfig], HealthChecker | None],
    ) -> None:
        """
        @param config: the configuration that the other arguments were built from.
        @param services: the services the director routes to, by name.
        @param filters: the filters their chains are made of.
        @param draining: the service that drains the proxy at shutdown.
        @param parent: the service that the health checker runs under.
        @param checks: what makes the health checker of a configuration (C{None}: none runs in this process).
        """
        self.config = config
        self._reactor = reactor
        self.registry = registry
        self.proxy = proxy
        self.stores: list[StoreHealth] = []
        self.pending: list[Callable[[], Sequence[str]]] = []
        self._services = dict(services)
        self._filters = filters
        self._draining = draining
        self._parent = parent
        self._checks = checks
        self._checker: HealthChecker | None = None
        self._replaceChecker(config)
        # The upstreams the configuration put in the registry, by service: a reload replaces these and
        # leaves alone what others (the admin API's registrations) added.
        self._configured = {name: list(registry.members(name)) for name in config.services}

    def apply(self, config: ProxyConfig) -> ReloadSummary:
        """
        Put C{config} in force; return what changed.  Everything is built first: if that raises, nothing
        has changed.
        """
        staging = MemoryRegistry()
        filters = self._filters.rebuilt(config.filters)
        built, _ = buildServices(config, self._reactor, staging, filters)
        members = {
            name: self._upstreams(name, settings, staging.members(name)) for name, settings in config.services.items()
        }
        services = {name: self._service(name, settings, built[name]) for name, settings in config.services.items()}
        director = buildDirector(config.routes, services, filters)
        forwarding = buildForwarding(config)
        summary = ReloadSummary.between(self.config, config)

        # Built: from here on, nothing fails and no request is served until all is done.
        self._replaceUpstreams(members)
        if healthCheckSettings(config) != healthCheckSettings(self.config):
            self._replaceChecker(config)
        self.proxy.director = director  # an exchange reads it once, as it starts
        self.proxy.forwarding = forwarding
        self._draining.grace = config.grace
        self.proxy.tunnels.idleTimeout = config.tunnelIdleTimeout  # for the tunnels opened from now on
        self._filters.closeDropped(filters)
        self.config, self._services, self._filters = config, services, filters
        return summary

    def balancer(self, name: str) -> IBalancer | None:
        """The balancer of the service named C{name} in the configuration in force (C{None}: no such service)."""
        service = self._services.get(name)
        return None if service is None else service.balancer

    def closeFilters(self) -> Deferred[None]:
        """Close the filters in force that hold resources: the proxy is stopping."""
        return self._filters.close()

    def _upstreams(self, name: str, settings: ServiceConfig, built: Sequence[Upstream]) -> list[Upstream]:
        """
        The upstreams of service C{name} under its new C{settings}: each of those C{built} for them, or the
        running one that it would be again.
        """
        previous = self.config.services.get(name)
        if previous is None or (previous.pool, previous.passive) != (settings.pool, settings.passive):
            return list(built)
        running = list(self._configured.get(name, ()))
        chosen = []
        for upstream in built:
            same = next((each for each in running if _sameUpstream(each, upstream)), None)
            if same is not None:
                running.remove(same)  # a URL listed twice is two upstreams
            chosen.append(upstream if same is None else same)
        return chosen

    def _service(self, name: str, settings: ServiceConfig, built: Service) -> Service:
        """Service C{name} under its new C{settings}: the running one if they balance alike, else C{built}."""
        previous, running = self.config.services.get(name), self._services.get(name)
        if previous is not None and running is not None and _balancing(previous) == _balancing(settings):
            # Its balancer's state is kept; its filters are the new chain (of the same objects where unchanged).
            return running if list(running.filters) == list(built.filters) else replace(running, filters=built.filters)
        return replace(built, registry=self.registry)

    def _replaceUpstreams(self, members: Mapping[str, Sequence[Upstream]]) -> None:
        """
        Make C{members} (by service name) the configured upstreams: remove (and drain) those configured
        before and not now, and every upstream of a service that is gone; others' upstreams stay.
        """
        registry = self.registry
        for name in registry.services():
            keep = members.get(name)
            leaving = registry.members(name) if keep is None else self._configured.get(name, ())
            for upstream in list(leaving):
                if keep is None or upstream not in keep:
                    registry.remove(name, upstream)
        for name, upstreams in members.items():
            for upstream in upstreams:
                registry.add(name, upstream)  # nothing for those that are there
        self._configured = {name: list(upstreams) for name, upstreams in members.items()}

    def restartChecks(self) -> None:
        """Start the health checks of the configuration in force again (whoever makes them may have changed)."""
        self._replaceChecker(self.config)

    def _replaceChecker(self, config: ProxyConfig) -> None:
        """Stop the health checks, and start those of C{config} (their verdicts live on in the upstreams)."""
        if self._checker is not None:
            self._checker.disownServiceParent()
        self._checker = self._checks(config)
        if self._checker is not None:
            self._checker.setServiceParent(self._parent)


def _signature(path: str) -> bytes | None:
    """What tells a version of file C{path} from another: its modification time, size and SHA-256; or C{None}."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            digest = hashlib.sha256(f.read()).digest()
    except OSError:
        return None
    return b"%d %d " % (stat.st_mtime_ns, stat.st_size) + digest


class HangUpReloader(OnSignal):
    """
    SIGHUP, while it runs: each of its reloads (the configuration's, the certificates'), in order, from
    the reactor's thread.
    """

    name = "sighup"

    def __init__(self, reloads: Sequence[Callable[[str], object]], signals: IReactorFromThreads) -> None:
        """
        @param reloads: what to call with the trigger, C{"SIGHUP"}, as L{ConfigReloader.reload}.
        @param signals: the reactor to hand SIGHUP over to, from the signal handler.
        """
        super().__init__(signal.SIGHUP, signals)
        self._reloads = tuple(reloads)

    def received(self) -> None:
        """Reload, each in turn."""
        for reload in self._reloads:
            reload("SIGHUP")


class ConfigReloader(service.Service):
    """
    Reads the configuration of a running proxy again and puts it in force (L{LiveProxy.apply}): on SIGHUP
    (by a L{HangUpReloader}), and when the source is watched, when its file changes.  A configuration
    that is wrong is logged as an error naming the file, the key and the mistake, and the previous one
    keeps serving.

    @ivar live: the running proxy it reloads.
    @ivar document: the document whose services, routes and filters replace the file's, if any (read at
        each reload: L{rproxy.cluster.document.EtcdDocument.current}).
    """

    name = "config-reloader"
    _log = Logger()

    def __init__(self, source: ConfigSource, live: LiveProxy, reactor: IReactorTime) -> None:
        self._source = source
        self.live = live
        self._reactor = reactor
        self._poll: LoopingCall | None = None
        self._seen: bytes | None = None
        self.document: Callable[[], tuple[str, str] | None] = lambda: None

    def startService(self) -> None:
        """Start watching the file."""
        super().startService()
        self._seen = _signature(self._source.path)
        if self._source.watchInterval:
            self._poll = LoopingCall(self._look)
            self._poll.clock = self._reactor
            self._poll.start(self._source.watchInterval, now=False)

    def stopService(self) -> None:
        """Stop watching."""
        if not self.running:
            return
        super().stopService()
        if self._poll is not None:
            self._poll.stop()
            self._poll = None

    def _look(self) -> None:
        if _signature(self._source.path) != self._seen:
            self.reload("the file changed")

    def reload(self, trigger: str) -> ReloadSummary | None:
        """
        Read the configuration again and put it in force; say why (C{trigger}) in the log.  Return what
        changed, or C{None} when the new configuration was rejected.
        """
        path = self._source.path
        self._seen = _signature(path)  # taken first: a change made while it is read is seen next time
        try:
            config = self._source.load(self.document())
        except (usage.UsageError, ConfigError) as e:
            self._rejected(path, trigger, str(e))
            return None
        except SystemExit as e:  # a flag that prints and exits (version = true): never end a running proxy
            self._rejected(path, trigger, f"it exits instead of configuring (status {e.code!r})")
            return None
        try:
            summary = self.live.apply(config)
        except Exception:
            self._log.failure(
                "{path}: not reloaded ({trigger}): the new configuration cannot be built", path=path, trigger=trigger
            )
            return None
        self._log.info(
            "{path}: configuration reloaded ({trigger}): {changes}",
            path=path,
            trigger=trigger,
            changes=summary.describe(),
            summary=summary,
        )
        if summary.notApplied:
            self._log.warn(
                "{path}: changed settings that apply only at the next restart (the running values stay): {settings}",
                path=path,
                settings="; ".join(summary.notApplied),
            )
        return summary

    def _rejected(self, path: str, trigger: str, error: str) -> None:
        self._log.error(
            "{path}: not reloaded ({trigger}), the previous configuration keeps serving: {error}",
            path=path,
            trigger=trigger,
            error=error,
        )
