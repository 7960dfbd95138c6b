"""
``twist rproxy``: the command line, and the services it builds.

Flags, a TOML file (C{--config}) and the environment (C{rproxy.tac}) all go through L{Options}, which
produces one L{ProxyConfig}; L{buildService} turns a config into listeners, services of upstreams, the
routes to them, health checks and a draining shutdown; with a config file, SIGHUP (and with
C{--watch-config}, a change to the file) applies the file again (L{rproxy.app.reload}), and SIGHUP reads
the certificates of the TLS listeners again (L{rproxy.downstream.tls}).  C{--check-config
FILE} builds all but the listeners, and says whether the file is right.
"""

from __future__ import annotations

import getopt
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from rproxy import __version__
from rproxy.app.admin import (
    AdminSettings,
    LocalRoutes,
    Registrations,
    adminSite,
    localRoutes,
    metricsSite,
    state,
)
from rproxy.app.build import (
    buildAccessLog,
    buildFilters,
    buildProxy,
    buildServices,
    buildSite,
    closeUpstreams,
    healthChecker,
    warnInsecureUpstreams,
)
from rproxy.app.config import (
    REPEATABLE,
    ConfigError,
    ConfigFile,
    OptionValues,
    ProxyConfig,
    argumentsFromEnvironment,
    argumentsFromMapping,
    buildConfig,
)
from rproxy.app.reload import ConfigReloader, ConfigSource, HangUpReloader, LiveProxy
from rproxy.app.workers.sockets import listenersOf
from rproxy.app.workers.supervisor import Supervisor, workerCount
from rproxy.app.workers.worker import WorkerRole
from rproxy.cluster.defaults import DEFAULT_ETCD_PREFIX, DEFAULT_REDIS_PREFIX, DEFAULT_STORE_TIMEOUT
from rproxy.cluster.health import StoreHealth
from rproxy.cluster.settings import ClusterSettings, clusterSettings
from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.listeners import Listener, ListenError
from rproxy.downstream.site import DrainingService, ProxySite
from rproxy.downstream.tls import CertificateStore, TLSSettings, plainListener, tlsListener
from rproxy.filters.factory import filterFactories
from rproxy.health.checks import HealthChecker, HealthCheckSettings
from rproxy.health.shared import VerdictFollower
from rproxy.health.state import PassivePolicy
from rproxy.observe.logfile import ReopenOnSignal
from rproxy.observe.requestid import RequestIds
from rproxy.observe.tracing import TracingUnavailableError, buildTracing
from rproxy.proxy.balancers import balancerFactories
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.resource import buildResource
from rproxy.proxy.retry import RetryPolicy
from rproxy.tunnel.splice import DEFAULT_IDLE_TIMEOUT
from rproxy.upstream.settings import PoolSettings

if TYPE_CHECKING:
    from rproxy.cluster.etcd import EtcdClient  # treq: imported when --etcd is given

_log = Logger()
_DEFAULT_POOL = PoolSettings()
_DEFAULT_CLIENT = ClientLimits()
_DEFAULT_RETRY = RetryPolicy()
_DEFAULT_PASSIVE = PassivePolicy()
_DEFAULT_HEALTH = HealthCheckSettings()

if TYPE_CHECKING:
    from rproxy.cluster.redis import RedisClient

#: Options that make no sense in a config file: they name the file, check it, or say how it is watched.
_NOT_IN_FILES = ("config", "check-config", "watch-config")


class Options(usage.Options):
    """The options of ``twist rproxy`` (see docs/options.md)."""

    synopsis = "[options]"
    longdesc = (
        "A streaming HTTP reverse proxy. Example: twist rproxy --listen tcp:8080 --upstream http://127.0.0.1:9000"
    )

    optFlags: list[list[str | None]] = [
        ["rewrite-host", None, "Send the upstream's host as Host instead of the client's."],
        [
            "retry-idempotency-key",
            None,
            "Also retry requests of any method that carry an Idempotency-Key, once sent.",
        ],
        [
            "upstream-tls-insecure",
            None,
            "Do not verify the certificates of https upstreams at all (logged as a warning).",
        ],
        ["list-balancers", None, "Print the installed balancers and exit."],
        ["list-filters", None, "Print the installed filter kinds and exit."],
        ["compress", None, "Compress responses (gzip, brotli, zstd) for clients that accept it (the compress filter)."],
        [
            "otel",
            None,
            "Trace exchanges with OpenTelemetry (the otel extra), exporting by OTLP/HTTP where OTEL_* variables say.",
        ],
        ["version", None, "Print the version and exit."],
    ]
    optParameters: list[list[Any]] = [
        ["config", "c", None, "A TOML file of settings, services and routes (see docs/configuration.md)."],
        [
            "check-config",
            None,
            None,
            "Check this config file (with the other options): build all but the listeners, say OK or what is wrong.",
        ],
        [
            "watch-config",
            None,
            0.0,
            "Seconds between checks of the --config file for changes, which then apply as on SIGHUP (0: off).",
        ],
        ["balancer", None, "round_robin", "How to choose among the upstreams (see --list-balancers)."],
        ["via-name", None, "rproxy", "The pseudonym this proxy adds to Via."],
        [
            "access-log",
            None,
            "stdout",
            "Access log: 'stdout' (written off the hot path), '-' for the log output, a file path, or 'off'.",
        ],
        [
            "access-log-format",
            None,
            "combined",
            "The access log's format: combined, json, or a template of {field}s (see docs/observability.md).",
        ],
        [
            "demo-upstream",
            None,
            None,
            "Also serve the built-in demo upstream on this endpoint, and proxy to it when no --upstream is given.",
        ],
        ["grace", None, 30.0, "Seconds in-flight exchanges get to finish on shutdown."],
        [
            "workers",
            None,
            "1",
            "Worker processes sharing the listeners under a supervisor, or auto: one per core (see docs/workers.md).",
        ],
        [
            "tunnel-idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds an upgraded connection (a WebSocket) may be silent both ways before it is closed (0: no limit).",
        ],
        ["connect-timeout", None, _DEFAULT_POOL.connectTimeout, "Seconds to connect to an upstream."],
        [
            "response-timeout",
            None,
            _DEFAULT_POOL.responseTimeout,
            "Seconds for the response head once the request is sent (then 504).",
        ],
        [
            "read-timeout",
            None,
            _DEFAULT_POOL.readTimeout,
            "Seconds an upstream may stay silent mid-response (then the exchange is aborted).",
        ],
        ["upstream-max-connections", None, _DEFAULT_POOL.maxConnections, "Connections per upstream at once."],
        ["upstream-max-idle", None, _DEFAULT_POOL.maxIdle, "Idle connections kept per upstream."],
        ["upstream-idle-timeout", None, _DEFAULT_POOL.idleTimeout, "Seconds an idle upstream connection is kept."],
        [
            "upstream-queue",
            None,
            _DEFAULT_POOL.maxQueue,
            "Requests that may wait for a busy upstream's connection (more: 503).",
        ],
        [
            "queue-timeout",
            None,
            _DEFAULT_POOL.queueTimeout,
            "Seconds a request may wait for an upstream connection (then 503).",
        ],
        [
            "upstream-ping-interval",
            None,
            _DEFAULT_POOL.pingInterval,
            "Seconds of silence on an HTTP/2 upstream connection before a PING checks it (0: never).",
        ],
        [
            "upstream-ping-timeout",
            None,
            _DEFAULT_POOL.pingTimeout,
            "Seconds the answer to a PING may take before the HTTP/2 connection is closed.",
        ],
        ["upstream-ca", None, None, "A PEM file of CA certificates to verify https upstreams with (default: system)."],
        [
            "upstream-client-cert",
            None,
            None,
            "CERTFILE[:KEYFILE], a PEM client certificate (and its key) to present to https upstreams.",
        ],
        ["max-body-size", None, "0", "Largest request body, e.g. 10M (0: no limit; larger: 413)."],
        ["max-request-line", None, _DEFAULT_CLIENT.maxRequestLine, "Longest request line (longer: 414)."],
        ["max-header-size", None, str(_DEFAULT_CLIENT.maxHeaderBytes), "Largest request header section (larger: 431)."],
        ["max-headers", None, _DEFAULT_CLIENT.maxHeaders, "Most request header fields (more: 431)."],
        [
            "header-timeout",
            None,
            _DEFAULT_CLIENT.headerTimeout,
            "Seconds a client may take to send a request head (then 408).",
        ],
        ["client-timeout", None, _DEFAULT_CLIENT.idleTimeout, "Seconds an idle client connection is kept open."],
        ["max-connections", None, _DEFAULT_CLIENT.maxConnections, "Client connections at once (more: 503)."],
        [
            "max-client-connections",
            None,
            _DEFAULT_CLIENT.maxClientConnections,
            "Client connections at once from one address, an IPv6 one by its /64 (more: 503; 0: no limit).",
        ],
        [
            "min-body-rate",
            None,
            str(_DEFAULT_CLIENT.minBodyRate),
            "Slowest request body, bytes per second over --body-rate-window (slower: 408; 0: no minimum).",
        ],
        [
            "body-rate-grace",
            None,
            _DEFAULT_CLIENT.bodyRateGrace,
            "Seconds a request body may take before --min-body-rate applies.",
        ],
        [
            "body-rate-window",
            None,
            _DEFAULT_CLIENT.bodyRateWindow,
            "Seconds over which a request body's rate is averaged.",
        ],
        [
            "write-timeout",
            None,
            _DEFAULT_CLIENT.writeTimeout,
            "Seconds a client may leave the send buffer full without reading (then aborted; 0: no limit).",
        ],
        [
            "request-timeout",
            None,
            _DEFAULT_CLIENT.requestTimeout,
            "Seconds from a request's head to its response's end, tunnels excepted (then 408/504; 0: no limit).",
        ],
        [
            "max-in-flight",
            None,
            _DEFAULT_CLIENT.maxInFlight,
            "Proxied requests at once; more are shed with 503 and Retry-After (0: no limit).",
        ],
        [
            "max-memory",
            None,
            str(_DEFAULT_CLIENT.maxMemory),
            "Resident memory, e.g. 512M, above which new proxied requests are shed with 503 (0: no limit).",
        ],
        [
            "h2-max-concurrent-streams",
            None,
            _DEFAULT_CLIENT.h2MaxConcurrentStreams,
            "HTTP/2 streams a client may have open at once (more: refused with REFUSED_STREAM).",
        ],
        [
            "h2-max-header-list-size",
            None,
            str(_DEFAULT_CLIENT.h2MaxHeaderListSize),
            "Largest HTTP/2 request header list (larger: GOAWAY).",
        ],
        [
            "h2-reset-burst",
            None,
            _DEFAULT_CLIENT.h2ResetBurst,
            "HTTP/2 stream resets a client may send in a burst (Rapid Reset; more: GOAWAY).",
        ],
        ["h2-reset-rate", None, _DEFAULT_CLIENT.h2ResetRate, "HTTP/2 stream resets per second after the burst."],
        ["retries", None, _DEFAULT_RETRY.retries, "Attempts repeated on another upstream once a request was sent."],
        ["try-duration", None, _DEFAULT_RETRY.tryDuration, "Seconds after which no new attempt starts (0: no limit)."],
        ["retry-on-status", None, "", "Response statuses retried like failures, e.g. 502,503 (default: none)."],
        [
            "retry-body-size",
            None,
            str(_DEFAULT_RETRY.replayBodySize),
            "Request body bytes kept to send again on a retry (larger bodies are sent once).",
        ],
        ["max-fails", None, _DEFAULT_PASSIVE.maxFails, "Consecutive failures that eject an upstream (0: off)."],
        [
            "fail-rate",
            None,
            _DEFAULT_PASSIVE.failureRate,
            "Share of failed exchanges in --fail-window that ejects an upstream, e.g. 0.5 (0: off).",
        ],
        ["fail-window", None, _DEFAULT_PASSIVE.window, "Seconds over which --fail-rate is measured."],
        ["ejection-time", None, _DEFAULT_PASSIVE.baseEjection, "Seconds of a first ejection (doubling on repeats)."],
        ["max-ejection-time", None, _DEFAULT_PASSIVE.maxEjection, "Longest ejection, in seconds."],
        [
            "max-ejected-percent",
            None,
            _DEFAULT_PASSIVE.maxEjectedShare * 100,
            "Most of a service's upstreams ejected at once, in percent (one may always be).",
        ],
        ["slow-start", None, _DEFAULT_PASSIVE.slowStart, "Seconds a returning upstream takes to reach full weight."],
        ["health-path", None, None, "Check every upstream's health at this path (default: no active checks)."],
        ["health-method", None, _DEFAULT_HEALTH.method, "The health check's method: GET or HEAD."],
        ["health-status", None, _DEFAULT_HEALTH.status, "Statuses that pass the health check, e.g. 200-299,304."],
        ["health-body", None, None, "Text the health check's response body must contain."],
        ["health-interval", None, _DEFAULT_HEALTH.interval, "Seconds between two checks of an upstream."],
        ["health-timeout", None, _DEFAULT_HEALTH.timeout, "Seconds a health check may take in all."],
        ["health-rise", None, _DEFAULT_HEALTH.rise, "Passing checks in a row that bring a down upstream back."],
        ["health-fall", None, _DEFAULT_HEALTH.fall, "Failing checks in a row that take an upstream out."],
        ["health-route", None, None, "Answer 200 ok at this path, e.g. /_rproxy/health, instead of proxying it."],
        [
            "ready-route",
            None,
            None,
            "Answer 200 at this path when every service has an upstream available, else 503 (not proxied).",
        ],
        [
            "admin-listen",
            None,
            None,
            "Serve the admin API on this endpoint, e.g. tcp:9901:interface=127.0.0.1 (default: off).",
        ],
        ["admin-token-file", None, None, "A file holding the bearer token the admin API requires."],
        [
            "metrics-listen",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint, e.g. tcp:9902:interface=127.0.0.1 (default: off).",
        ],
        [
            "otel-endpoint",
            None,
            None,
            "Trace with OpenTelemetry, exporting by OTLP/HTTP to this collector URL (/v1/traces added without a path).",
        ],
        ["basic-auth", None, None, "Require HTTP Basic credentials from this htpasswd file (the basic-auth filter)."],
        [
            "rate-limit",
            None,
            None,
            "Limit each client address to this rate, e.g. 100/s or 600/m (rate-limit filter).",
        ],
        [
            "rate-limit-burst",
            None,
            None,
            "Requests a client may send at once (default: a second's worth of --rate-limit).",
        ],
        [
            "etcd-prefix",
            None,
            DEFAULT_ETCD_PREFIX,
            "Where this gateway's keys are in etcd (several gateways may share one).",
        ],
        ["etcd-user", None, None, "The user of etcd's authentication, when etcd has it enabled."],
        ["etcd-password-file", None, None, "A file holding the password of --etcd-user."],
        [
            "etcd-ca",
            None,
            None,
            "A PEM file of CA certificates to verify https:// etcd members with (default: system).",
        ],
        [
            "etcd-client-cert",
            None,
            None,
            "CERTFILE[:KEYFILE], a PEM client certificate (and its key) to present to https:// etcd members.",
        ],
        [
            "etcd-config-key",
            None,
            None,
            "Take services, routes and filters from the TOML document at this key under --etcd-prefix, e.g. config.",
        ],
        [
            "redis",
            None,
            None,
            'Where rate limits with store = "redis" keep their buckets, e.g. redis://127.0.0.1:6379/0.',
        ],
        ["redis-password-file", None, None, "A file holding the password of --redis."],
        [
            "redis-prefix",
            None,
            DEFAULT_REDIS_PREFIX,
            "What this gateway's keys in Redis start with (several gateways may share one).",
        ],
        ["redis-ca", None, None, "A PEM file of CA certificates to verify a rediss:// Redis with (default: system)."],
        [
            "redis-client-cert",
            None,
            None,
            "CERTFILE[:KEYFILE], a PEM client certificate (and its key) to present to a rediss:// Redis.",
        ],
        [
            "store-timeout",
            None,
            DEFAULT_STORE_TIMEOUT,
            "Seconds etcd or Redis may take to answer before it counts as out of reach.",
        ],
        [
            "tls-watch",
            None,
            TLSSettings().watchInterval,
            "Seconds between checks of the --tls-cert files for changes, which then apply (0: only on SIGHUP).",
        ],
    ]

    #: What the options and the config file describe, once parsed.
    config: ProxyConfig
    #: The arguments parsed (the command line's, or the environment's for rproxy.tac): a reload parses them again.
    arguments: list[str]
    #: Seconds between two looks at the config file for changes (0: it is not watched).
    watchInterval: float
    #: The local routes (and the admin listener), which apply at the next restart only.
    admin: AdminSettings
    #: Where the instances of a gateway share their state (etcd, Redis).
    cluster: ClusterSettings
    #: A TOML document of services, routes and filters that replaces the config file's, and what errors in it
    #: name (set before parsing: the document of C{--etcd-config-key}).
    document: tuple[str, str] | None = None
    #: How many worker processes serve (C{--workers}; 1: this process serves, with no supervisor).
    workers: int

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = []
        self._file: ConfigFile | None = None
        self._sources: dict[str, str] = {}
        self._failed = False

    def opt_listen(self, endpoint: str) -> None:
        """A server endpoint to listen on, e.g. tcp:8080 (repeatable; default tcp:8080)."""
        self["listen"].append(endpoint)

    def opt_tls_listen(self, endpoint: str) -> None:
        """A plain server endpoint to serve TLS on, with the --tls-cert certificates, e.g. tcp:8443 (repeatable)."""
        self["tls-listen"].append(endpoint)

    def opt_tls_cert(self, spec: str) -> None:
        """CERTFILE[:KEYFILE[:HOSTNAME,...]], a certificate for --tls-listen; the first is the default (repeatable)."""
        self["tls-cert"].append(spec)

    def opt_upstream(self, url: str) -> None:
        """An upstream URL, e.g. http://127.0.0.1:9000/base (repeatable)."""
        self["upstream"].append(url)

    def opt_balancer_option(self, setting: str) -> None:
        """An option for the balancer, KEY=VALUE (repeatable)."""
        self["balancer-option"].append(setting)

    def opt_trusted_proxy(self, network: str) -> None:
        """A CIDR whose X-Forwarded-*/Forwarded fields are kept (repeatable)."""
        self["trusted-proxy"].append(network)

    def opt_allow_ip(self, network: str) -> None:
        """Serve only clients in this CIDR or address (repeatable; the ip-rules filter)."""
        self["allow-ip"].append(network)

    def opt_deny_ip(self, network: str) -> None:
        """Refuse clients in this CIDR or address with 403 (repeatable; the ip-rules filter)."""
        self["deny-ip"].append(network)

    def opt_cors_origin(self, origin: str) -> None:
        """Allow cross-origin requests from this origin, e.g. https://app.example.com, or * (repeatable; cors)."""
        self["cors-origin"].append(origin)

    def opt_access_log_redact(self, name: str) -> None:
        """A query parameter (or logged field) the access log redacts, besides access_token, token, ... (repeatable)."""
        self["access-log-redact"].append(name)

    def opt_access_log_header(self, name: str) -> None:
        """A request field the json access log writes, in request_headers, credentials redacted (repeatable)."""
        self["access-log-header"].append(name)

    def opt_etcd(self, url: str) -> None:
        """Share admin API registrations with other instances through this etcd v3 client URL (repeatable)."""
        self["etcd"].append(url)

    def opt_list_filters(self) -> None:
        """Print the installed filter kinds and exit."""
        for name, factory in sorted(filterFactories().items()):
            print(f"{name:24} {factory.description}")
        sys.exit(0)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"rproxy {__version__}")
        sys.exit(0)

    def opt_list_balancers(self) -> None:
        """Print the installed balancers and exit."""
        for name, factory in sorted(balancerFactories().items()):
            print(f"{name:24} {factory.description}")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse C{options} (the command line's by default) after the config file's top-level settings, so
        that an option given here overrides the file's (and adds to a repeatable option's values).  With
        C{--check-config}, a mistake ends the process with its message instead of the usage.
        """
        arguments = self.arguments = list(sys.argv[1:] if options is None else options)
        given: dict[str, str] = {}
        try:
            given = self._given(arguments)
            super().parseOptions(self._fileArguments(given) + arguments)
        except usage.UsageError as e:
            if "check-config" in given:
                raise SystemExit(str(e)) from None
            self._failed = True  # the error is printed with a pointer to --help, not the ~150 lines of usage
            raise

    def getUsage(self, width: int | None = None) -> str:
        """Every option (C{--help}); after a mistake, only where to find them, so that the error stays in sight."""
        if self._failed:
            return "Run 'twist rproxy --help' for every option.\n"
        return super().getUsage(width)

    def _given(self, arguments: list[str]) -> dict[str, str]:
        """The options among C{arguments}, by long name (as getopt reads them: -cF, --conf=F, ...)."""
        try:
            found, _ = getopt.getopt(arguments, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        return {self.synonyms.get(option.lstrip("-"), option.lstrip("-")): value for option, value in found}

    def _fileArguments(self, given: Mapping[str, str]) -> list[str]:
        """The arguments the top level of the config file (--config or --check-config) stands for."""
        if "config" in given and "check-config" in given:
            raise usage.UsageError("--check-config: give the file to check there alone, without --config")
        path = given.get("check-config", given.get("config"))
        if path is None:
            return []
        try:
            self._file = ConfigFile.load(path)
            arguments = argumentsFromMapping(self._file.options, path, *fileOptionNames())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for key in self._file.options:
            name = key.replace("_", "-")
            if name not in given:  # the command line's value wins, and errors name it
                self._sources[name] = f"{path}: {key}"
        return arguments

    def postOptions(self) -> None:
        """Build L{config} from the options and the file; with C{--check-config}, check it, say so and exit."""
        from rproxy.app.admin import (
            adminSettings,  # here: rproxy.app.admin builds on rproxy.app.reload, which imports this
        )

        values = OptionValues(self, self._sources)
        file = self._file
        try:
            if self.document is not None:
                text, where = self.document
                file = (file or ConfigFile("", {}, {}, ())).withDocument(text, where)
            self.config = buildConfig(values, file)
            self.admin = adminSettings(values)
            self.cluster = clusterSettings(values)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self.workers = workerCount(str(self["workers"]))
        except ValueError as e:
            raise usage.UsageError(f"{self._sources.get('workers', '--workers')}: {e}") from None
        if self["check-config"] is not None:
            print(checkConfig(self["check-config"], self.config, self.cluster))
            sys.exit(0)
        self.watchInterval = self._watchInterval()

    def _watchInterval(self) -> float:
        """C{--watch-config}'s seconds: 0 or more, and more only with a file to watch."""
        value = self["watch-config"]
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise usage.UsageError(f"--watch-config: expected a number of seconds, 0 or more, got {value!r}")
        if seconds and self["config"] is None:
            raise usage.UsageError("--watch-config: there is no file to watch without --config")
        return seconds


def optionsFromEnvironment(environ: Mapping[str, str]) -> Options:
    """L{Options} from ``RPROXY_*`` variables (and ``RPROXY_CONFIG``, a TOML file), for rproxy.tac."""
    options = Options()
    names = [str(p[0]) for p in Options.optParameters if p[0] != "check-config"] + sorted(REPEATABLE)
    flags = [str(f[0]) for f in Options.optFlags if f[0] not in ("list-balancers", "list-filters", "version")]
    options.parseOptions(argumentsFromEnvironment(environ, names, flags))
    return options


def fileOptionNames() -> tuple[list[str], list[str]]:
    """The long names of the options that take values, and of the flags: the keys of a config file's top level."""
    parameters = [str(p[0]) for p in Options.optParameters if p[0] not in _NOT_IN_FILES]
    return parameters + sorted(REPEATABLE), [str(f[0]) for f in Options.optFlags]


def buildService(
    config: ProxyConfig,
    reactor: IReactorTime,
    source: ConfigSource | None = None,
    signals: IReactorFromThreads | None = None,
    admin: AdminSettings | None = None,
    worker: WorkerRole | None = None,
    cluster: ClusterSettings | None = None,
) -> service.MultiService:
    """
    The proxy's services: a draining shutdown, health checks, then one listener per endpoint (answering
    the local routes of C{admin} themselves), the TLS listeners and their L{CertificateStore}, the admin
    listener and the metrics listener, if any; with a C{source} to read the configuration again from, a
    L{ConfigReloader}; and given the reactor to hand C{signals} to, a L{HangUpReloader}: SIGHUP reloads the
    configuration and the certificates.  A C{worker} of a supervisor (C{--workers}) listens on the sockets
    its supervisor passed, serves the admin listener only if passed it, and leaves the metrics listener to
    the supervisor, which asks each worker for its metrics.  With C{cluster}'s etcd, the registrations are
    shared with the gateway's other instances (L{rproxy.cluster}); with its Redis, the filters may keep
    state there (the process's client, closed at shutdown).
    """

    def passed(option: str, description: str) -> IStreamServerEndpoint | None:
        return None if worker is None else worker.endpoint(option, description)

    top = service.MultiService()
    if config.demoUpstream is not None:
        from rproxy.app.demo import demoSite

        demo = config.demoUpstream
        Listener("--demo-upstream", demo, demoSite(), passed("--demo-upstream", demo)).setServiceParent(top)
    registry = MemoryRegistry()
    redis = None if cluster is None else redisClient(cluster, reactor)
    filters = buildFilters(config, reactor, redis)
    services, _ = buildServices(config, reactor, registry, filters)
    warnInsecureUpstreams(config)
    proxy = buildProxy(config, reactor, services, filters)

    # Added first so that it is stopped last, after the listeners stop accepting (its site is added below).
    closers: list[Callable[[], Deferred[None]]] = []  # what holds threads, files or connections to the end

    def stopped() -> Deferred[None]:
        closeUpstreams(registry)
        closing = [live.closeFilters(), *(close() for close in closers)]
        if accessLog is not None:
            closing.append(accessLog.sink.close())
        return gatherResults(closing).addCallback(lambda _: None)

    draining = DrainingService([], config.grace, reactor, stopped)
    draining.setServiceParent(top)
    # Under a supervisor, worker 0 runs the active health checks and the others follow its verdicts; every worker
    # applies the verdicts the supervisor remembers (worker 0 too: a new one starts from what its predecessor
    # found), and a worker that loses its channel to the supervisor checks for itself.
    checking = worker is None or worker.index == 0
    if worker is not None:
        follower = worker.verdicts = VerdictFollower(registry)
        follower.setServiceParent(top)

    def checks(config: ProxyConfig) -> HealthChecker | None:
        if not checking:
            return None
        report = worker.reportVerdict if worker is not None and worker.index == 0 else None
        return healthChecker(config, reactor, registry, report)

    live = LiveProxy(config, reactor, registry, proxy, services, filters, draining, top, checks)
    if worker is not None and not checking:

        def checkAlone() -> None:
            nonlocal checking
            checking = True
            live.restartChecks()

        worker.whenAlone.append(checkAlone)
    if redis is not None:
        live.stores.append(redis.health)
        closers.append(redis.close)
    resource = buildResource(proxy)
    local = localRoutes(admin, live, draining) if admin is not None else {}
    site = ProxySite(LocalRoutes(local, resource) if local else resource, config.client, reactor)
    accessLog = buildAccessLog(config, reactor)
    if accessLog is not None:
        site.observers.append(accessLog)
        if signals is not None:
            ReopenOnSignal([accessLog.sink], signals).setServiceParent(top)  # SIGUSR1, after logrotate
    site.requestIds = RequestIds(lambda peer: proxy.forwarding.trusts(peer))  # read per request: reloads apply
    draining.sites.append(site)
    for endpoint in config.listen:
        plainListener(endpoint, site, passed("--listen", endpoint)).setServiceParent(top)
    certificates = None
    if config.tls.listen:
        certificates = CertificateStore(config.tls.certificates, reactor, config.tls.watchInterval)
        certificates.setServiceParent(top)
        for endpoint in config.tls.listen:
            tlsListener(endpoint, site, certificates, passed("--tls-listen", endpoint)).setServiceParent(top)
    if config.tracing:
        try:
            tracing = buildTracing(config.otelEndpoint)
        except (TracingUnavailableError, ValueError) as e:
            raise ConfigError(f"--otel: {e}") from None
        if tracing is not None:
            proxy.tracer = tracing
            site.observers.append(tracing)  # the exchange's span ends with its record
            closers.append(lambda: tracing.close(reactor))  # type: ignore[arg-type]
    shared = document = None
    if cluster is not None and cluster.shared:
        from rproxy.cluster.registrations import EtcdRegistrations  # treq and the etcd client: with --etcd only

        client = etcdClient(cluster, reactor)
        live.stores.append(client.health)
        closers.append(client.close)
        shared = EtcdRegistrations(client, cluster.prefix, reactor)
        live.pending.append(shared.pending)
        if cluster.configKey is not None:
            from rproxy.cluster.document import EtcdDocument

            document = EtcdDocument(client, cluster.prefix, cluster.configKey, reactor)
            live.pending.append(document.pending)
    metrics = None
    if admin is not None and (admin.listen is not None or admin.metricsListen is not None):
        from rproxy.observe.metrics import ProxyMetrics  # prometheus_client, imported when metrics are served

        metrics = ProxyMetrics()  # kept for the admin listener's /metrics and the metrics listener
        metrics.watch(registry, draining.sites, proxy.tunnels, live.stores)
        site.observers.append(metrics)
    if shared is not None or (admin is not None and admin.listen is not None):
        registrations = Registrations(live, reactor, shared)
        registrations.setServiceParent(top)
        if worker is not None:
            if shared is None:  # else every worker follows etcd
                registrations.announceTo(worker.announce)
            worker.registrations = registrations
            worker.state = lambda: state(live, draining, registrations)
    if admin is not None and admin.listen is not None:
        assert admin.token is not None  # AdminSettings never has one without the other
        everyWorker = worker.everyWorker if worker is not None else None
        everyWorkerMetrics = worker.everyWorkerMetrics if worker is not None else None
        api = adminSite(admin.token, live, draining, registrations, reactor, metrics, everyWorker, everyWorkerMetrics)
        adminEndpoint = passed("--admin-listen", admin.listen)
        if worker is None or adminEndpoint is not None:
            Listener("--admin-listen", admin.listen, api, adminEndpoint).setServiceParent(top)
    if worker is not None and metrics is not None:
        worker.metrics = metrics.registry  # asked for by the supervisor's metrics listener and worker 0's admin
    if admin is not None and admin.metricsListen is not None and worker is None:
        assert metrics is not None
        Listener("--metrics-listen", admin.metricsListen, metricsSite(metrics, reactor)).setServiceParent(top)
    reloads: list[Callable[[str], object]] = []
    if source is not None:
        reloader = ConfigReloader(source, live, reactor)
        reloader.setServiceParent(top)
        reloads.append(reloader.reload)
        if document is not None:
            reloader.document = document.current
            document.applyWith(reloader.reload)
            document.setServiceParent(top)
    if certificates is not None:
        reloads.append(certificates.reload)
    if accessLog is not None:
        sink = accessLog.sink
        reloads.append(lambda trigger: sink.reopen())
    if signals is not None and reloads:
        HangUpReloader(reloads, signals).setServiceParent(top)
    if worker is not None:
        worker.setServiceParent(top)  # last: it says the worker listens
    return top


def etcdClient(cluster: ClusterSettings, reactor: IReactorTime) -> EtcdClient:
    """The client of C{cluster}'s etcd (treq and the etcd client: imported when there is one)."""
    from rproxy.cluster.etcd import EtcdClient

    fallback = "serving the registrations and configuration last known; the admin API cannot register (503)"
    health = StoreHealth("etcd", ", ".join(cluster.etcd), fallback, reactor)
    return EtcdClient(cluster.etcd, reactor, cluster.timeout, health, cluster.etcdCredentials, cluster.etcdTLS)


def checkConfig(path: str, config: ProxyConfig, cluster: ClusterSettings | None = None) -> str:
    """
    Build what C{config} describes but its listeners: upstreams, balancers, routes and health checks,
    over the reactor, which does not run before the process exits (nothing connects, Redis of C{cluster}
    neither); say that C{path} is fine, and what it holds.
    """
    from twisted.internet import reactor

    registry = MemoryRegistry()
    redis = None if cluster is None else redisClient(cluster, reactor)  # type: ignore[arg-type]
    buildSite(replace(config, accessLog=None), reactor, registry, redis)  # the access log file is opened by the proxy
    healthChecker(config, reactor, registry)
    services, routes = len(config.services), len(config.routes)
    return f"{path}: OK ({services} service{'s' * (services != 1)}, {routes} route{'s' * (routes != 1)})"


def redisClient(cluster: ClusterSettings, reactor: IReactorTime) -> RedisClient | None:
    """
    The process's Redis client, if C{cluster} has one (C{--redis}): txredisapi is imported only then, and the
    client connects on its first call.
    """
    if cluster.redis is None:
        return None
    from rproxy.cluster.redis import RedisClient

    return RedisClient(
        cluster.redis, reactor, cluster.redisPassword, cluster.timeout, cluster.redisTLS, cluster.redisPrefix
    )


def reloadSource(options: Options) -> ConfigSource | None:
    """
    Where the configuration of C{options} is read again from on a reload: its config file, with the same
    arguments around it, and the document of C{--etcd-config-key} if any (C{None} with neither: nothing could
    change).
    """
    path = options["config"]
    cluster = options.cluster
    if path is None and cluster.configKey is None:
        return None
    arguments = list(options.arguments)

    def load(document: tuple[str, str] | None) -> ProxyConfig:
        again = Options()
        again.document = document
        again.parseOptions(arguments)
        return again.config

    return ConfigSource(path or f"etcd {cluster.prefix}{cluster.configKey}", load, options.watchInterval)


class _Main(service.MultiService):
    """
    The service of C{twist rproxy} and rproxy.tac: a listener that cannot listen ends the process with its
    one line (C{twist} and C{twistd} start services before the reactor runs, so nothing is served yet).
    """

    def privilegedStartService(self) -> None:
        with _oneLineErrors():
            super().privilegedStartService()

    def startService(self) -> None:
        with _oneLineErrors():
            super().startService()


@contextmanager
def _oneLineErrors() -> Iterator[None]:
    """What operators get wrong at start ends the process with one line on standard error, and status 1."""
    try:
        yield
    except (ConfigError, ListenError) as e:
        raise SystemExit(f"Error: {e}") from None


def makeService(options: Options, environ: Mapping[str, str] | None = None) -> service.MultiService:
    """
    The entry point of ``twist rproxy`` (and of rproxy.tac): a proxy that SIGHUP reloads; with C{--workers}
    above 1, the L{Supervisor} of that many workers, each of which is C{twist rproxy} with the same
    arguments, told by C{environ} (the process's environment by default) that it is one.
    """
    from twisted.internet import reactor

    environ = os.environ if environ is None else environ
    main = _Main()
    worker = WorkerRole.fromEnvironment(environ, reactor)
    if worker is None and options.workers > 1:
        config, admin = options.config, options.admin
        with _oneLineErrors():
            listeners = listenersOf(config, admin.listen)
        Supervisor(
            options.workers, options.arguments, listeners, admin.metricsListen, config.grace, reactor, environ
        ).setServiceParent(main)
        return main
    with _oneLineErrors():
        proxy = buildService(
            options.config,
            reactor,  # type: ignore[arg-type]
            reloadSource(options),
            reactor,  # type: ignore[arg-type]
            options.admin,
            worker,
            options.cluster,
        )
    proxy.setServiceParent(main)
    return main
