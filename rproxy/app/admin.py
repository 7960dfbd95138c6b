"""
What rproxy answers itself, never proxied: local routes on the proxy's listeners (health, readiness,
anything mounted), and the admin API on a listener of its own.

L{LocalRoutes} is the root of a listener's resource tree when there are local routes: a request whose raw
path is exactly one of them is answered by its resource, any other goes to the L{ReverseProxyResource}
below (one dictionary lookup on the proxy's path).  C{--health-route} answers C{200 ok} while rproxy runs;
C{--ready-route} answers C{200 ready} when every service has an upstream available, and C{503} saying why
not otherwise, or while rproxy shuts down.

L{AdminAPI} is the whole of the admin listener (C{--admin-listen}, off by default): every request must
carry the bearer token of C{--admin-token-file}; C{GET /state} describes the services, their upstreams
and the routes.  C{GET /status} shows the same to people, as a page that refreshes itself
(L{rproxy.observe.status}); a browser cannot send a bearer token with a page it loads, so the page
alone also takes the token as the password of HTTP Basic, which browsers ask their user for.
docs/admin.md describes it all (and why Basic is taken there only), docs/admin-openapi.json the API.

L{metricsSite} is the listener of C{--metrics-listen} (off by default): the Prometheus metrics at
C{/metrics} (L{rproxy.observe.metrics}, docs/observability.md).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import math
import re
from base64 import b64decode
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from rproxy.app.config import OptionValues, secretFile
from rproxy.app.reload import LiveProxy, describeRoute
from rproxy.cluster.health import StoreError
from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.listeners import checkEndpoint
from rproxy.downstream.site import ProxySite
from rproxy.interfaces import IBalancerState
from rproxy.observe.status import PAGE_HEADERS, RegistrationState, StateDocument, UpstreamState, statusPage
from rproxy.upstream.upstreams import Upstream

if TYPE_CHECKING:
    from rproxy.app.workermetrics import Gather  # prometheus_client: imported when metrics are served
    from rproxy.cluster.registrations import EtcdRegistrations  # treq: imported when registrations are shared
    from rproxy.observe.metrics import ProxyMetrics  # prometheus_client: imported when metrics are served

_log = Logger()

#: A local route: an absolute path of visible ASCII characters, without a query or fragment.
_ROUTE = re.compile(r"/[!-~]*\Z")
#: A bearer token (RFC 6750 section 2.1: b64token).
_TOKEN = re.compile(rb"[A-Za-z0-9._~+/-]+=*\Z")
#: The endpoint types that listen on an IP address, which must then be given.
_IP_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl"})
#: What a client of the admin API (or of the metrics listener) may send and keep open.
_ADMIN_LIMITS = ClientLimits(maxBodySize=65536, maxHeaders=50, maxConnections=100)
#: The longest TTL a registration may ask for, in seconds.
MAX_TTL = 86400.0
#: The challenge of an API request without the token.
_BEARER_CHALLENGE = {b"www-authenticate": b'Bearer realm="rproxy-admin"'}
#: The challenge of the status page without credentials: browsers ask their user for a name and a password.
_BASIC_CHALLENGE = {b"www-authenticate": b'Basic realm="rproxy-admin", charset="UTF-8"'}
#: Where the status page is.
STATUS_PATH = b"/status"
#: Where the admin listener serves Prometheus's metrics (behind its token), when they are kept.
METRICS_PATH = b"/metrics"


@dataclass(frozen=True)
class AdminSettings:
    """
    The local routes of the proxy's listeners (raw paths, matched exactly) and the admin listener, from
    the options.

    @ivar healthRoute: where C{200 ok} is answered (C{None}: nowhere).
    @ivar readyRoute: where readiness is answered (C{None}: nowhere).
    @ivar listen: the admin API's server endpoint (C{None}: no admin API).
    @ivar token: the bearer token the admin API requires (there whenever C{listen} is).
    @ivar metricsListen: the server endpoint of the metrics listener (C{None}: none).
    """

    healthRoute: bytes | None = None
    readyRoute: bytes | None = None
    listen: str | None = None
    token: bytes | None = field(default=None, repr=False)
    metricsListen: str | None = None


def _route(values: OptionValues, name: str) -> bytes | None:
    path = values.text(name)
    if path is None:
        return None
    if not _ROUTE.match(path) or "?" in path or "#" in path:
        raise values.error(name, f"expected an absolute path such as /_rproxy/health (no query), got {path!r}")
    return path.encode("ascii")


def _endpoint(values: OptionValues, name: str, example: str, what: str) -> str | None:
    """
    C{--admin-listen} or C{--metrics-listen} (option C{name}, serving C{what}): a server endpoint string,
    with the address given when it listens on one (C{example} shows how).
    """
    description = values.text(name)
    if description is None:
        return None
    problem = checkEndpoint(description)
    if problem is not None:
        raise values.error(name, problem)
    kind, *parameters = re.split(r"(?<!\\):", description)
    if kind in _IP_ENDPOINTS and not any(each.startswith("interface=") for each in parameters):
        raise values.error(
            name,
            f"give the address to listen on, e.g. {example} (got {description!r}): "
            f"{what} must not listen on every address by default",
        )
    return description


def _token(values: OptionValues) -> bytes | None:
    """The bearer token in the C{--admin-token-file} (surrounding whitespace dropped); never in an error."""
    token = secretFile(values, "admin-token-file", "the admin API's bearer token")
    if token is None:
        return None
    if not _TOKEN.match(token):
        path = values.text("admin-token-file")
        raise values.error(
            "admin-token-file",
            f"{path} does not hold a bearer token: letters, digits and -._~+/ (then = signs), on one line",
        )
    return token


def adminSettings(values: OptionValues) -> AdminSettings:
    """The settings that the options' C{values} give; raise L{ConfigError} naming the option at fault."""
    health, ready = _route(values, "health-route"), _route(values, "ready-route")
    if health is not None and health == ready:
        raise values.error("ready-route", f"must differ from --health-route (both are {health.decode()})")
    listen, token = _endpoint(values, "admin-listen", "tcp:9901:interface=127.0.0.1", "the admin API"), _token(values)
    if listen is not None and token is None:
        raise values.error("admin-listen", "needs --admin-token-file: the admin API requires a bearer token")
    if listen is None and token is not None:
        raise values.error("admin-token-file", "has no use without --admin-listen (the admin API is off)")
    metrics = _endpoint(values, "metrics-listen", "tcp:9902:interface=127.0.0.1", "the metrics")
    return AdminSettings(health, ready, listen, token, metrics)


class LocalRoutes(Resource):
    """
    The root of a proxy listener's tree: requests for the exact raw paths of C{routes} are answered by
    their resources, all others by C{proxy} (which sees the whole request-target, as if it were the root).
    """

    def __init__(self, routes: Mapping[bytes, IResource], proxy: IResource) -> None:
        super().__init__()
        self._routes = dict(routes)
        self._proxy = proxy

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        prepath, postpath = request.prepath, request.postpath
        assert prepath is not None and postpath is not None  # the traversal calling this has set them
        local = self._routes.get(request.path)
        if local is not None:
            prepath.extend(postpath)  # all consumed: the route is the whole path
            del postpath[:]
            return local
        postpath.insert(0, prepath.pop())  # the proxy is mounted at the root
        return self._proxy


class TextResource(Resource):
    """
    A leaf answering C{GET} and C{HEAD} with the status and the line of text that C{answer} gives at that
    moment, never cached; other methods get 405.
    """

    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, str]]) -> None:
        super().__init__()
        self._answer = answer

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b"method not allowed: use GET or HEAD\n"
        status, line = self._answer()
        request.setResponseCode(status)
        return line.encode("utf-8") + b"\n"


def unready(live: LiveProxy, lifetime: IService) -> list[str]:
    """
    Why rproxy should not be sent requests now (none when it should): it is shutting down (C{lifetime}
    is not running), or a service of the configuration in force has no upstream available.
    """
    if not lifetime.running:
        return ["rproxy is shutting down"]
    registry = live.registry
    reasons = [reason for pending in live.pending for reason in pending()]
    for name in live.config.services:
        if registry.lookup(name):
            continue
        # Counts, not addresses: the route answers anyone; the admin API's /state has the details.
        states = Counter(upstream.health.state for upstream in registry.members(name))
        counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        reasons.append(f"service {name} has no upstream available ({counts or 'it has none'})")
    return reasons


def readiness(live: LiveProxy, lifetime: IService) -> tuple[int, str]:
    """The ready route's answer: C{200 ready}, or C{503} and the reasons L{unready} gives."""
    reasons = unready(live, lifetime)
    if reasons:
        return 503, "not ready: " + "; ".join(reasons)
    return 200, "ready"


def localRoutes(settings: AdminSettings, live: LiveProxy, lifetime: IService) -> dict[bytes, IResource]:
    """
    The local routes that C{settings} ask for, by raw path, over the running proxy C{live}; C{lifetime}
    stops running as rproxy starts to shut down.
    """
    routes: dict[bytes, IResource] = {}
    if settings.healthRoute is not None:
        routes[settings.healthRoute] = TextResource(lambda: (200, "ok"))
    if settings.readyRoute is not None:
        routes[settings.readyRoute] = TextResource(lambda: readiness(live, lifetime))
    return routes


class APIError(Exception):
    """An admin API request that fails: its status, the one-line reason, and fields for the response."""

    def __init__(self, status: int, reason: str, fields: Mapping[bytes, bytes] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.fields = dict(fields or {})


def _upstreamState(upstream: Upstream, registration: Registration | None, balancer: object) -> UpstreamState:
    health = upstream.health
    current = health.state
    at, latency = health.lastErrorAt, upstream.latency
    return {
        "key": upstream.key,
        "weight": upstream.configuredWeight,
        "labels": dict(upstream.labels),
        "state": current,
        "reason": health.reason if current != "up" else None,
        "ejections": health.ejectionCount,
        "ejectionEndsIn": round(health.retryAfter(), 3) if health.ejected else None,
        "lastError": None if at is None else {"reason": health.lastError, "at": at},
        "inFlight": upstream.inFlight,
        "pool": {"open": upstream.pool.openCount, "idle": upstream.pool.idleCount},
        "latency": None if latency is None else round(latency, 6),
        "balancer": _learnt(balancer, upstream),
        "registration": None if registration is None else registration.describe(),
    }


def _learnt(balancer: object, upstream: Upstream) -> dict[str, float | int | str] | None:
    """What C{balancer} shows of C{upstream}, if it shows anything (L{IBalancerState})."""
    if not IBalancerState.providedBy(balancer):
        return None
    learnt = balancer.describe(upstream)  # type: ignore[attr-defined]
    return None if learnt is None else dict(learnt)


def state(live: LiveProxy, lifetime: IService, registrations: Registrations) -> StateDocument:
    """
    What C{GET /state} answers: whether rproxy shuts down, the services of the configuration in force
    (each with its balancer and upstreams, those registered through the API with their registration),
    its routes, in order, and the tunnels (upgraded connections) open and what they carried.
    """
    registry = live.registry
    return {
        "shuttingDown": not lifetime.running,
        "services": [
            {
                "name": name,
                "balancer": settings.balancer,
                "upstreams": [
                    _upstreamState(upstream, registrations.of(upstream), live.balancer(name))
                    for upstream in registry.members(name)
                ],
            }
            for name, settings in live.config.services.items()
        ],
        "routes": [{"description": describeRoute(route)} for route in live.config.routes],
        "tunnels": live.proxy.tunnels.describe(),
        "stores": [store.describe() for store in live.stores],
    }


class Registration:
    """
    An upstream a service instance registered: it stays in its service while renewed within its TTL.

    @ivar id: what the instance renews and deregisters it by: the same for the same service and URL.
    @ivar service: the service's name.
    @ivar url: the URL it was registered with (C{#weight=N} included).
    @ivar ttl: seconds it stays without a renewal.
    @ivar upstream: the upstream in the registry now.
    """

    def __init__(
        self,
        id: str,
        service: str,
        url: str,
        ttl: float,
        upstream: Upstream,
        clock: IReactorTime,
        expire: Callable[[Registration], object] | None,
    ) -> None:
        """
        Registered now: C{expire} is called with it C{ttl} seconds from now, unless it is renewed or
        cancelled (C{None}: its expiry is kept elsewhere, an etcd lease).
        """
        self.id = id
        self.service = service
        self.url = url
        self.ttl = ttl
        self.upstream = upstream
        self._clock = clock
        self._expire = expire
        self._expiry = None if expire is None else clock.callLater(ttl, expire, self)
        self._renewed = clock.seconds()

    def renew(self, ttl: float) -> None:
        """Keep it C{ttl} seconds from now (its new TTL)."""
        self.ttl = ttl
        self._renewed = self._clock.seconds()
        if self._expiry is not None:
            self._expiry.reset(ttl)

    def cancel(self) -> None:
        """Stop its expiry timer (it no longer expires)."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()

    def describe(self) -> RegistrationState:
        """The registration as the API shows it."""
        return {
            "id": self.id,
            "service": self.service,
            "key": self.upstream.key,
            "weight": self.upstream.configuredWeight,
            "ttl": self.ttl,
            "expiresIn": round(max(0.0, self._renewed + self.ttl - self._clock.seconds()), 3),
        }


def registrationID(service: str, key: str) -> str:
    """
    The id of the registration of the upstream C{key} (its URL's key) in C{service}: the same on every
    instance and every time, so that the same upstream registered twice, through two instances or after it
    expired, is one registration.
    """
    return hashlib.blake2b(f"{service}\n{key}".encode(), digest_size=8).hexdigest()


class Registrations(Service):
    """
    The upstreams service instances registered through the admin API, each in the registry of the
    running proxy C{live} while renewed within its TTL.  A registration that expires or is deregistered
    leaves its service the way any removed upstream does: its exchanges in flight finish.

    A live reload leaves registered upstreams alone (they keep their pools, health and the settings their
    service had when they registered), and drops the registrations of a service it removes.

    Where they are kept:
      - in this process, each with a timer of its TTL.  Under a supervisor (C{--workers}), the worker
        serving the admin API announces each change (L{announceTo}), and the other workers L{follow} it;
      - or, given a C{shared} store (C{--etcd}: L{rproxy.cluster.registrations.EtcdRegistrations}), in
        etcd under a lease of the TTL: a change made here is answered once etcd has it, and every instance
        (every worker of each) follows etcd's changes, its own included.

    @ivar shared: the etcd store, if the registrations are kept there.
    """

    _log = Logger()

    def __init__(self, live: LiveProxy, reactor: IReactorTime, shared: EtcdRegistrations | None = None) -> None:
        self.shared = shared
        self._live = live
        self._reactor = reactor
        self._byID: dict[str, Registration] = {}
        self._byUpstream: dict[Upstream, Registration] = {}
        self._unwatch: Callable[[], None] | None = None
        self._announce: Callable[[dict[str, object]], object] | None = None

    def announceTo(self, announce: Callable[[dict[str, object]], object]) -> None:
        """
        Call C{announce} with each change made here: C{id}, C{service}, C{url} and C{ttl} (C{None} when the
        registration ended).
        """
        self._announce = announce

    def follow(self, change: Mapping[str, object]) -> None:
        """Make a change another worker announced (see L{announceTo}) or etcd holds here, without announcing it."""
        try:
            service, url, ttl, id = (str(change["service"]), str(change["url"]), change["ttl"], str(change["id"]))
            if ttl is None:
                registration = self._byID.get(id)
                if registration is not None:
                    self._remove(registration, "deregistered, or not renewed, through another instance or worker")
            elif isinstance(ttl, int | float):
                self._add(service, url, float(ttl), id)
        except (APIError, KeyError, ValueError) as e:
            self._log.warn("admin API: cannot follow {change}: {error}", change=dict(change), error=e)

    def _announced(self, made: Registration, ttl: float | None) -> None:
        if self._announce is not None:
            self._announce({"id": made.id, "service": made.service, "url": made.url, "ttl": ttl})

    def startService(self) -> None:
        super().startService()
        self._unwatch = self._live.registry.watch(self._changed)
        if self.shared is not None:
            self.shared.start(self.follow)

    def stopService(self) -> Deferred[None] | None:
        """Stop the expiry timers (the registrations end with the process), and following etcd."""
        super().stopService()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for registration in self._byID.values():
            registration.cancel()
        return None if self.shared is None else self.shared.stop()

    def of(self, upstream: Upstream) -> Registration | None:
        """The registration C{upstream} is in its service by, if any."""
        return self._byUpstream.get(upstream)

    def register(self, service: str, url: str, ttl: float) -> Deferred[tuple[Registration, bool]]:
        """
        Add an upstream at C{url} to C{service} for C{ttl} seconds; fires with its registration, and whether
        it is new (C{False}: that URL was registered there already, and is renewed with C{ttl}).

        @raise APIError: 404 for an unknown service, 400 for a bad URL, 409 when the URL is one of the
            service's configured upstreams, or registered with another weight; (in the Deferred) 503 when
            the registration is kept in etcd and etcd does not answer.
        """
        upstream = self._build(service, url)
        new = self._existing(service, upstream) is None
        id = registrationID(service, upstream.key)
        if self.shared is None:
            return succeed(self._add(service, url, ttl, id))
        # New or not as it was asked: etcd's echo of the change may come through the watch before its answer.
        return self._stored(self.shared.put(id, service, url, ttl), f"register {upstream.key}").addCallback(
            lambda _: (self._add(service, url, ttl, id)[0], new)
        )

    def renew(self, registration: Registration, ttl: float) -> Deferred[None]:
        """Keep C{registration} C{ttl} seconds from now (its new TTL)."""
        if self.shared is None:
            registration.renew(ttl)
            self._announced(registration, ttl)
            return succeed(None)
        putting = self.shared.put(registration.id, registration.service, registration.url, ttl)
        return self._stored(putting, f"renew {registration.id}").addCallback(lambda _: registration.renew(ttl))

    def deregister(self, registration: Registration, why: str) -> Deferred[None]:
        """Take C{registration}'s upstream out of its service (its exchanges in flight finish)."""
        if self.shared is None:
            self._remove(registration, why)
            self._announced(registration, None)
            return succeed(None)
        deleting = self.shared.delete(registration.id)
        return self._stored(deleting, f"deregister {registration.id}").addCallback(
            lambda _: self._remove(registration, why) if self._byID.get(registration.id) is registration else None
        )

    def find(self, service: str, id: str) -> Registration:
        """The registration C{id} of C{service}; raise a 404 L{APIError} when there is none."""
        registration = self._byID.get(id)
        if registration is None or registration.service != service:
            raise APIError(
                404, f"no registration {id!r} in service {service}: it expired or was deregistered (register again)"
            )
        return registration

    def _stored(self, storing: Deferred[None], what: str) -> Deferred[None]:
        """C{storing}, etcd's answer, with its failure turned into the API's 503."""

        def unstored(failure: Failure) -> None:
            failure.trap(StoreError)
            raise APIError(503, f"cannot {what}: etcd did not take it ({failure.value})", {b"retry-after": b"1"})

        return storing.addErrback(unstored)

    def _existing(self, service: str, upstream: Upstream) -> Registration | None:
        """
        The registration of C{upstream}'s key in C{service}, if it is registered there with the same weight.

        @raise APIError: 409 when it is a configured upstream of C{service}, or registered with another weight.
        """
        for existing in self._live.registry.members(service):
            if existing.key != upstream.key:
                continue
            registration = self._byUpstream.get(existing)
            if registration is None:
                raise APIError(409, f"{upstream.key} is already an upstream of service {service} (configured)")
            if existing.configuredWeight != upstream.configuredWeight:
                raise APIError(
                    409,
                    f"{upstream.key} is registered in service {service} with weight {existing.configuredWeight} "
                    f"(id {registration.id}): deregister it first",
                )
            return registration
        return None

    def _add(self, service: str, url: str, ttl: float, id: str) -> tuple[Registration, bool]:
        """Put the registration in force here: a new one, or the renewal of the one there is."""
        registration = self._byID.get(id)
        if registration is not None and (registration.service, registration.url) == (service, url):
            return self._renewed(registration, ttl)  # etcd's event of a renewal: nothing to build
        upstream = self._build(service, url)
        registration = self._existing(service, upstream)
        if registration is not None:
            return self._renewed(registration, ttl)
        expire = self._expire if self.shared is None else None
        registration = Registration(id, service, url, ttl, upstream, self._reactor, expire)
        self._byID[id] = registration
        self._byUpstream[upstream] = registration
        self._live.registry.add(service, upstream)
        self._announced(registration, ttl)
        self._log.info(
            "admin API: {url} registered in service {service} for {ttl:g}s (id {id})",
            url=upstream.key,
            service=service,
            ttl=ttl,
            id=id,
        )
        return registration, True

    def _renewed(self, registration: Registration, ttl: float) -> tuple[Registration, bool]:
        registration.renew(ttl)
        self._announced(registration, ttl)
        return registration, False

    def _remove(self, registration: Registration, why: str) -> None:
        registration.cancel()
        del self._byID[registration.id]
        del self._byUpstream[registration.upstream]
        self._live.registry.remove(registration.service, registration.upstream)
        self._log.info(
            "admin API: {url} left service {service} (id {id}): {why}",
            url=registration.upstream.key,
            service=registration.service,
            id=registration.id,
            why=why,
        )

    def _expire(self, registration: Registration) -> None:
        self._remove(registration, f"not renewed within its TTL of {registration.ttl:g}s")
        self._announced(registration, None)

    def _build(self, service: str, url: str) -> Upstream:
        """A new upstream for C{url} with the settings of C{service} in the configuration in force."""
        settings = self._live.config.services.get(service)
        if settings is None:
            names = ", ".join(self._live.config.services)
            raise APIError(404, f"no service named {service!r} (services: {names})")
        try:
            return Upstream.fromURL(url, self._reactor, settings.pool, settings.passive)
        except ValueError as e:
            raise APIError(400, f"url: {e}") from None

    def _changed(self, service: str) -> None:
        """
        The registry changed: a registration whose upstream someone else took out (a reload that dropped
        its service) ends.
        """
        members = self._live.registry.members(service)
        for registration in list(self._byID.values()):
            if registration.service == service and registration.upstream not in members:
                registration.cancel()
                del self._byID[registration.id]
                del self._byUpstream[registration.upstream]
                self._log.warn(
                    "admin API: registration {id} of {url} dropped after a reload: "
                    "its service {service!r} is no longer configured",
                    id=registration.id,
                    url=registration.upstream.key,
                    service=service,
                )


class AdminAPI(Resource):
    """
    The admin listener's one resource: authenticates every request by its bearer token (a missing one:
    401, a wrong one: 403), then answers it: C{GET /state}; C{POST /services/NAME/upstreams} (register),
    C{PUT} and C{DELETE /services/NAME/upstreams/ID} (renew, deregister).  Every answer is JSON, every
    error C{{"error": reason}}; but C{GET /status}, the status page, is HTML, and takes the token as the
    password of HTTP Basic too (a missing or wrong one: 401, with the challenge that makes a browser ask).
    """

    isLeaf = True

    def __init__(
        self,
        token: bytes,
        live: LiveProxy,
        lifetime: IService,
        registrations: Registrations,
        clock: IReactorTime,
        metrics: IResource | None = None,
        everyWorker: Callable[[StateDocument], Deferred[StateDocument]] | None = None,
    ) -> None:
        """
        @param token: the bearer token every request must carry.
        @param live: the running proxy.
        @param lifetime: a service that stops as rproxy starts to shut down.
        @param registrations: the upstreams registered through the API.
        @param clock: the reactor whose time the upstreams' health keeps (the status page says how long ago).
        @param metrics: what answers C{GET /metrics} (Prometheus's exposition), if the metrics are kept.
        @param everyWorker: under a supervisor (C{--workers}), what turns this worker's state into every
            worker's, which the status page shows (L{rproxy.app.workers.worker.WorkerRole.everyWorker}).
        """
        super().__init__()
        self._token = token
        self._live = live
        self._lifetime = lifetime
        self._registrations = registrations
        self._clock = clock
        self._metrics = metrics
        self._everyWorker = everyWorker

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        page = request.path == STATUS_PATH
        try:
            self._authenticate(request, page)
            if page:
                return self._page(request)
            if request.path == METRICS_PATH and self._metrics is not None:
                return self._metrics.render(request)  # type: ignore[no-any-return]
        except APIError as e:
            return _answer(request, *_failed(request, e))
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        answering: Deferred[tuple[int, object]] = maybeDeferred(self._route, request)  # type: ignore[call-overload]

        def answer(result: tuple[int, object]) -> None:
            if not gone:
                request.write(_answer(request, *result))
                request.finish()

        def failed(failure: Failure) -> tuple[int, object]:
            failure.trap(APIError)
            return _failed(request, failure.value)  # type: ignore[arg-type]

        answering.addErrback(failed).addCallback(answer)
        return NOT_DONE_YET

    def _authenticate(self, request: Request, page: bool) -> None:
        """
        Raise L{APIError} unless C{request} carries the token: C{Authorization: Bearer TOKEN}; or, for the
        status page (C{page}), C{Authorization: Basic} with the token as the password (any user name).
        """
        challenge = _BASIC_CHALLENGE if page else _BEARER_CHALLENGE
        given = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(given) != 1:
            if page:
                raise APIError(401, "sign in with any user name and the admin token as the password", challenge)
            raise APIError(401, "send the admin token: Authorization: Bearer <token>", challenge)
        scheme, _, credentials = given[0].strip().partition(b" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if page and scheme == b"basic":
            password = _basicPassword(credentials)
            if password is None:
                raise APIError(401, "malformed Basic credentials: expected base64 of NAME:PASSWORD", challenge)
            if not hmac.compare_digest(password, self._token):
                self._refused(request, "Basic password")
                raise APIError(401, "the password is not the admin token", challenge)
            return
        if scheme != b"bearer" or not credentials:
            raise APIError(401, "expected Authorization: Bearer <token>", challenge)
        if not hmac.compare_digest(credentials, self._token):
            self._refused(request, "bearer token")
            raise APIError(403, "the bearer token is not the admin token")

    def _refused(self, request: Request, what: str) -> None:
        """Log a request refused for a wrong token (C{what} it was given as), naming its client, not the token."""
        _log.warn(
            "admin API: a request with a wrong {what} from {client}: {method} {path}",
            what=what,
            client=request.getClientAddress(),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
        )

    def _page(self, request: Request) -> bytes | int:
        """The status page, for an authenticated C{request}: of every worker, under a supervisor."""
        _allow(request, b"GET", b"HEAD")
        for name, value in PAGE_HEADERS.items():
            request.setHeader(name, value)
        document = state(self._live, self._lifetime, self._registrations)
        if self._everyWorker is None:
            return statusPage(document, self._clock.seconds())
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def show(combined: StateDocument) -> None:
            if not gone:
                request.write(statusPage(combined, self._clock.seconds()))
                request.finish()

        self._everyWorker(document).addCallback(show)
        return NOT_DONE_YET

    def _route(self, request: Request) -> tuple[int, object] | Deferred[tuple[int, object]]:
        """The status and document (C{None}: no body) that answer an authenticated C{request}."""
        path = request.path
        if path == b"/state":
            _allow(request, b"GET", b"HEAD")
            document = state(self._live, self._lifetime, self._registrations)
            if self._everyWorker is None:
                return 200, document
            return self._everyWorker(document).addCallback(lambda combined: (200, combined))
        segments = path.split(b"/")
        if len(segments) in (4, 5) and segments[1] == b"services" and segments[3] == b"upstreams":
            service = unquote(segments[2].decode("latin-1"))
            if len(segments) == 4:
                _allow(request, b"POST")
                return self._register(request, service)
            _allow(request, b"PUT", b"DELETE")
            registration = self._registrations.find(service, unquote(segments[4].decode("latin-1")))
            if request.method == b"PUT":
                renewing = self._registrations.renew(
                    registration, _ttl(_body(request, optional=True), registration.ttl)
                )
                return renewing.addCallback(lambda _: (200, registration.describe()))
            return self._registrations.deregister(registration, "deregistered").addCallback(lambda _: (204, None))
        raise APIError(404, f"no such resource: {path.decode('latin-1')} (see docs/admin.md)")

    def _register(self, request: Request, service: str) -> Deferred[tuple[int, object]]:
        body = _body(request, optional=False)
        url = body.get("url")
        if not isinstance(url, str):
            raise APIError(400, f"url: expected a string such as http://10.0.0.7:8080, got {_shown(url)}")

        def registered(made: tuple[Registration, bool]) -> tuple[int, object]:
            registration, new = made
            location = f"/services/{service}/upstreams/{registration.id}"
            request.setHeader(b"location", location.encode("utf-8"))
            return (201 if new else 200), registration.describe()

        return self._registrations.register(service, url, _ttl(body, None)).addCallback(registered)


def _failed(request: Request, error: APIError) -> tuple[int, object]:
    """The status and document of a request that failed with C{error} (its fields set on C{request})."""
    for name, value in error.fields.items():
        request.setHeader(name, value)
    return error.status, {"error": error.reason}


def _answer(request: Request, status: int, document: object) -> bytes:
    """The body answering C{request} with C{status} and C{document} (C{None}: no body), its head set."""
    request.setResponseCode(status)
    if document is None:
        return b""
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document).encode("utf-8") + b"\n"


def _basicPassword(credentials: bytes) -> bytes | None:
    """The password of HTTP Basic C{credentials} (base64 of C{NAME:PASSWORD}), or C{None} if they are malformed."""
    try:
        decoded = b64decode(credentials, validate=True)
    except (binascii.Error, ValueError):
        return None
    _, colon, password = decoded.partition(b":")
    return password if colon else None


def _shown(value: object) -> str:
    """A JSON value as an error shows it (cut short)."""
    text = "nothing" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _body(request: Request, optional: bool) -> dict[str, object]:
    """
    The JSON object in C{request}'s body, with only the keys C{url} and C{ttl} (an empty body is an
    empty object when C{optional}); raise a 400 L{APIError} saying what is wrong.
    """
    assert request.content is not None
    content = request.content.read()
    if optional and not content.strip():
        return {}
    try:
        body = json.loads(content)
    except ValueError as e:  # UnicodeDecodeError included
        raise APIError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(
            400, f'expected a JSON object such as {{"url": "http://10.0.0.7:8080", "ttl": 30}}, got {_shown(body)}'
        )
    allowed = ("ttl",) if optional else ("url", "ttl")
    for key in body:
        if key not in allowed:
            raise APIError(400, f"unknown key {key!r} (the keys: {', '.join(allowed)})")
    return body


def _ttl(body: Mapping[str, object], default: float | None) -> float:
    """The body's C{ttl}: seconds, more than 0 and at most L{MAX_TTL} (C{default} when absent, if any)."""
    ttl = body.get("ttl", default)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or not 0 < ttl <= MAX_TTL:
        raise APIError(
            400, f"ttl: expected a number of seconds, more than 0 and at most {MAX_TTL:g}, got {_shown(ttl)}"
        )
    return float(ttl)


def _allow(request: Request, *methods: bytes) -> None:
    """Raise a 405 L{APIError} unless C{request}'s method is one of C{methods}."""
    if request.method not in methods:
        allowed = b", ".join(methods)
        raise APIError(405, f"use {allowed.decode()} here, not {request.method.decode('latin-1')}", {b"allow": allowed})


def adminSite(
    token: bytes,
    live: LiveProxy,
    lifetime: IService,
    registrations: Registrations,
    reactor: IReactorTime,
    metrics: ProxyMetrics | None = None,
    everyWorker: Callable[[StateDocument], Deferred[StateDocument]] | None = None,
    everyWorkerMetrics: Gather | None = None,
) -> ProxySite:
    """
    The admin listener's site: L{AdminAPI} over C{live} (and C{metrics} at C{/metrics}, behind its token), with
    small client limits and no access log; under a supervisor, its status page and C{GET /state} show
    C{everyWorker}'s state, and C{/metrics} every worker's (what C{everyWorkerMetrics} gathers).
    """
    served: IResource | None = None
    if metrics is not None and everyWorkerMetrics is not None:
        from rproxy.app.workermetrics import allWorkersMetrics  # prometheus_client, imported with the metrics

        served = allWorkersMetrics(everyWorkerMetrics)
    elif metrics is not None:
        from rproxy.observe.metrics import metricsResource

        served = metricsResource(metrics.registry)
    api = AdminAPI(token, live, lifetime, registrations, reactor, served, everyWorker)
    return ProxySite(api, _ADMIN_LIMITS, reactor)


def metricsSite(metrics: ProxyMetrics, reactor: IReactorTime) -> ProxySite:
    """
    The metrics listener's site: C{metrics} at C{/metrics} (anything else is 404), with the admin API's
    small client limits and no access log.
    """
    from rproxy.observe.metrics import metricsResource

    root = Resource()
    root.putChild(b"metrics", metricsResource(metrics.registry))
    return ProxySite(root, _ADMIN_LIMITS, reactor)
