"""
The configuration model: one L{ProxyConfig}, however it was given (flags, environment, file).

The command line, the environment (``RPROXY_UPSTREAM=...``, for ``rproxy.tac``) and the top level of a
TOML file (whose keys are the options' long names) all become command-line arguments for
L{rproxy.app.tap.Options}; L{buildConfig} turns the options' values into the model.  The file may also
define services (C{[services.NAME]}) and routes (C{[[routes]]}).  A service's settings are overrides of
options under the options' names, and go through the same converters as the options, so a value is
checked one way wherever it is given.  Every error names where the value was given and what is wrong
with it: C{--retries: must not be negative, got -1}, C{rproxy.toml: services.api.retries: ...}.
docs/configuration.md is the reference of the file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, TypeVar

from rproxy.app.filters import (
    FilterConfig,
    FilterSet,
    checkFilters,
    checkName,
    commandLineFilters,
    configBase,
    fileFilters,
    filterNames,
)
from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.listeners import checkEndpoint
from rproxy.downstream.tls import CertificateFiles, TLSSettings, loadCertificate
from rproxy.filters.chain import NO_FILTERS
from rproxy.headers import isToken, parseNetworks
from rproxy.health.checks import HealthCheckSettings
from rproxy.health.state import PassivePolicy
from rproxy.interfaces import IBalancerFactory
from rproxy.local.target import LocalConfig, localConfig
from rproxy.observe.accesslog import checkFormat
from rproxy.observe.tracing import tracesURL
from rproxy.options import parseSize
from rproxy.proxy.balancers import FirstAvailable, balancerFactories
from rproxy.proxy.directors import BlueGreen, Route, ServiceVersion, WeightedSplit
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.retry import RetryPolicy
from rproxy.proxy.service import Service
from rproxy.tunnel.messages import MessageAwareService, WebSocketLimits
from rproxy.tunnel.splice import DEFAULT_IDLE_TIMEOUT
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.tls import UpstreamTLS, certificateFiles, clientCertificate, trustRoot
from rproxy.upstream.upstreams import UpstreamURL, splitSettings


class ConfigError(ValueError):
    """A mistake in the configuration; the message names where the value was given and what is wrong."""


# -- the model


@dataclass(frozen=True)
class ServiceConfig:
    """
    One service: its upstreams, and how they are chosen, connected to, retried, ejected and checked.

    @ivar name: what routes call it.
    @ivar upstreams: upstream URLs (each may end in C{#weight=N}).
    @ivar balancer: the name of its balancer (an L{IBalancerFactory}'s).
    @ivar balancerOptions: options for the balancer's factory.
    @ivar rewriteHost: send the chosen upstream's host as ``Host`` instead of the client's.
    @ivar healthCheck: its active health checks, or C{None} for none.
    @ivar filters: the names of its filters, in order; C{None}: the default chain.
    """

    name: str
    upstreams: tuple[str, ...]
    balancer: str = "round_robin"
    balancerOptions: Mapping[str, object] = field(default_factory=dict)
    rewriteHost: bool = False
    pool: PoolSettings = field(default_factory=PoolSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    passive: PassivePolicy = field(default_factory=PassivePolicy)
    healthCheck: HealthCheckSettings | None = None
    filters: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WeightedSplitConfig:
    """
    A route's split in proportion to weights (a canary, an A/B test): a L{WeightedSplit}.

    @ivar services: service names and their weights, in order.
    @ivar pin: where a request may name its service (C{cookie:NAME} or C{header:NAME}).
    @ivar sticky: the key that keeps a client on one service (C{cookie:NAME}, C{header:NAME}, C{client_ip}).
    """

    services: tuple[tuple[str, int], ...]
    pin: str | None = None
    sticky: str | None = None

    def serviceNames(self, defined: Mapping[str, Service]) -> tuple[str, ...]:
        """The names of the services it sends requests to."""
        return tuple(name for name, _ in self.services)

    def build(self, services: Mapping[str, Service]) -> WeightedSplit:
        """The split, over C{services} (by name)."""
        variants = [(services[name], weight) for name, weight in self.services]
        return WeightedSplit(variants, pin=self.pin, sticky=self.sticky)


@dataclass(frozen=True)
class BlueGreenConfig:
    """A route's switch between two services, C{active} the live one: a L{BlueGreen}."""

    blue: str
    green: str
    active: str = "blue"

    def serviceNames(self, defined: Mapping[str, Service]) -> tuple[str, ...]:
        """The names of the services it sends requests to."""
        return (self.blue, self.green)

    def build(self, services: Mapping[str, Service]) -> BlueGreen:
        """The switch, over C{services} (by name)."""
        return BlueGreen(services[self.blue], services[self.green], self.active)


@dataclass(frozen=True)
class ServiceVersionConfig:
    """A route that reads its service from the path, C{/NAME/VERSION/...} for C{"NAME:VERSION"}: a L{ServiceVersion}."""

    def serviceNames(self, defined: Mapping[str, Service]) -> tuple[str, ...]:
        """The names among C{defined} that a path can name (C{NAME:VERSION}, each part a path segment)."""
        versions = ServiceVersion(defined)
        return tuple(
            name for name in defined if versions.resolve(b"/" + name.replace(":", "/", 1).encode("ascii")) is not None
        )

    def build(self, services: Mapping[str, Service]) -> ServiceVersion:
        """The lookup, over C{services} (by name)."""
        return ServiceVersion(services)


#: Where a route sends its requests: a service's name, or a split, or the service its path names; or nowhere,
#: answered in the proxy (L{LocalConfig}).
RouteTarget = str | WeightedSplitConfig | BlueGreenConfig | ServiceVersionConfig | LocalConfig


@dataclass(frozen=True)
class RouteConfig:
    """
    One route: where its requests go, when it matches, and how it rewrites them (the fields other than
    C{target}, C{retry} and C{websocket} are L{Route}'s keyword arguments).

    @ivar target: a service name, a split, or L{ServiceVersionConfig}.
    @ivar retry: the retry policy the route gives each service it sends to (by service name), when it
        overrides the services' own; empty when it does not.
    @ivar websocket: the message limits of the route's WebSockets, whose frames are then parsed
        (L{rproxy.tunnel.messages}); C{None}: they are spliced, bytes for bytes.
    @ivar filters: the names of the route's filters, in order, instead of its services' chains; C{None}:
        each service's own.
    @ivar name: what logs and metrics call it (C{name} in the file; empty: unnamed).
    """

    target: RouteTarget
    hosts: tuple[str, ...] = ()
    pathPrefix: str | None = None
    headers: Mapping[str, str | None] = field(default_factory=dict)
    query: Mapping[str, str | None] = field(default_factory=dict)
    stripPrefix: bool = False
    replacePrefix: str | None = None
    setHost: str | None = None
    setHeaders: Mapping[str, str] = field(default_factory=dict)
    addHeaders: tuple[tuple[str, str], ...] = ()
    removeHeaders: tuple[str, ...] = ()
    retry: Mapping[str, RetryPolicy] = field(default_factory=dict)
    websocket: WebSocketLimits | None = None
    filters: tuple[str, ...] | None = None
    name: str = ""

    def serviceNames(self, defined: Mapping[str, Service]) -> tuple[str, ...]:
        """The names of the services among C{defined} that the route may send requests to."""
        if isinstance(self.target, str):
            return (self.target,)
        return self.target.serviceNames(defined)

    def build(self, services: Mapping[str, Service], chains: FilterSet | None = None) -> Route:
        """
        The route, over C{services} (by name; each one the route retries its own way, or filters with its own
        chain, from C{chains}, is copied with its policy or chain).
        """
        if isinstance(self.target, LocalConfig):
            chain = chains.chain(self.filters or ()) if chains is not None else NO_FILTERS
            return self._route(self.target.build(self.name, chain))
        names = self.serviceNames(services)
        if self.name:
            services = {**services, **{name: replace(services[name], route=self.name) for name in names}}
        if self.filters is not None and chains is not None:
            chain = chains.chain(self.filters)
            services = {**services, **{name: replace(services[name], filters=chain) for name in names}}
        if self.retry:
            services = {**services, **{name: replace(services[name], retry=p) for name, p in self.retry.items()}}
        if self.websocket is not None:
            limits = self.websocket
            services = {
                **services,
                **{name: MessageAwareService.of(services[name], limits) for name in self.serviceNames(services)},
            }
        return self._route(services[self.target] if isinstance(self.target, str) else self.target.build(services))

    def _route(self, target: Service | WeightedSplit | BlueGreen | ServiceVersion) -> Route:
        """The route to C{target}, with this one's conditions and rewrites (a local route strips its prefix)."""
        strip = self.stripPrefix or (
            isinstance(self.target, LocalConfig) and self.pathPrefix is not None and self.replacePrefix is None
        )
        return Route(
            target,
            hosts=self.hosts,
            pathPrefix=self.pathPrefix,
            headers=self.headers,
            query=self.query,
            stripPrefix=strip,
            replacePrefix=self.replacePrefix,
            setHost=self.setHost,
            setHeaders=self.setHeaders,
            addHeaders=self.addHeaders,
            removeHeaders=self.removeHeaders,
        )


@dataclass(frozen=True)
class ProxyConfig:
    """
    Everything a running rproxy is built from.

    @ivar listen: server endpoint strings (C{tcp:8080}, C{ssl:443:...}, C{systemd:domain=INET:index=0}).
    @ivar tls: the TLS listeners, whose certificates are chosen by host name and reloaded (L{rproxy.downstream.tls}).
    @ivar tunnelIdleTimeout: seconds an upgraded connection (a WebSocket) may be silent both ways; 0: no limit.
    @ivar accessLog: C{None} for none, C{"stdout"}, C{"-"} for the Twisted log, or a file path.
    @ivar accessLogFormat: C{combined}, C{json}, or a template of named fields (L{rproxy.observe.accesslog}).
    @ivar accessLogRedact: query parameters and fields redacted in the log besides the default ones.
    @ivar accessLogHeaders: the request fields the json format and templates write (C{request_headers}).
    @ivar tracing: whether exchanges are traced with OpenTelemetry (L{rproxy.observe.tracing}).
    @ivar otelEndpoint: the OTLP/HTTP URL spans are exported to (C{None}: where C{OTEL_*} variables say).
    @ivar demoUpstream: an endpoint on which to also serve the built-in demo upstream.
    @ivar services: the services by name; without a config file's services, the one service C{default}
        of the command line's upstreams.
    @ivar routes: which requests go to which service (C{RoutingDirector} orders them).
    @ivar filters: the filter definitions, by name.
    @ivar defaultFilters: the chain of services without their own C{filters}.
    @ivar base: the directory relative paths in filter options are read from.
    """

    listen: tuple[str, ...] = ("tcp:8080",)
    trustedProxies: tuple[str, ...] = ()
    viaName: str = "rproxy"
    grace: float = 30.0
    tunnelIdleTimeout: float = DEFAULT_IDLE_TIMEOUT
    accessLog: str | None = "stdout"
    accessLogFormat: str = "combined"
    accessLogRedact: tuple[str, ...] = ()
    accessLogHeaders: tuple[str, ...] = ()
    tracing: bool = False
    otelEndpoint: str | None = None
    demoUpstream: str | None = None
    client: ClientLimits = field(default_factory=ClientLimits)
    tls: TLSSettings = field(default_factory=TLSSettings)
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    filters: Mapping[str, FilterConfig] = field(default_factory=dict)
    defaultFilters: tuple[str, ...] = ()
    base: str = field(default=".", compare=False)

    def serviceFilters(self, name: str) -> tuple[str, ...]:
        """The names of the filters of service C{name}'s chain."""
        own = self.services[name].filters
        return self.defaultFilters if own is None else own


# -- what a file's tables accept

#: The options that may be given more than once.
REPEATABLE = frozenset(
    {
        "listen",
        "upstream",
        "trusted-proxy",
        "balancer-option",
        "tls-listen",
        "tls-cert",
        "allow-ip",
        "deny-ip",
        "cors-origin",
        "access-log-redact",
        "access-log-header",
        "etcd",
    }
)

#: The options a service may override, by kind (the flags take C{true} or C{false}).
POOL_OPTIONS = (
    "connect-timeout",
    "response-timeout",
    "read-timeout",
    "upstream-max-connections",
    "upstream-max-idle",
    "upstream-idle-timeout",
    "upstream-queue",
    "queue-timeout",
    "upstream-ping-interval",
    "upstream-ping-timeout",
    "upstream-ca",
    "upstream-client-cert",
    "upstream-tls-insecure",
)
RETRY_OPTIONS = ("retries", "try-duration", "retry-on-status", "retry-body-size", "retry-idempotency-key")
PASSIVE_OPTIONS = (
    "max-fails",
    "fail-rate",
    "fail-window",
    "ejection-time",
    "max-ejection-time",
    "max-ejected-percent",
    "slow-start",
)
HEALTH_OPTIONS = (
    "health-path",
    "health-method",
    "health-status",
    "health-body",
    "health-interval",
    "health-timeout",
    "health-rise",
    "health-fall",
)
SERVICE_OPTIONS = ("balancer", "rewrite-host", *POOL_OPTIONS, *RETRY_OPTIONS, *PASSIVE_OPTIONS, *HEALTH_OPTIONS)
SERVICE_FLAGS = frozenset({"rewrite-host", "retry-idempotency-key", "upstream-tls-insecure"})

#: Every key of a C{[services.NAME]} table.
SERVICE_KEYS = frozenset({"upstreams", "balancer-options", "filters", *SERVICE_OPTIONS})

#: The keys of a route that say where its requests go (one of them).
ROUTE_TARGETS = ("service", "split", "service-version", "local")

#: The keys of a route's C{split} table, of each kind.
WEIGHTED_SPLIT_KEYS = frozenset({"services", "pin", "sticky"})
BLUE_GREEN_KEYS = frozenset({"blue", "green", "active"})

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(name: str) -> str:
    """A key as a TOML key path writes it: bare, or quoted (C{"users:v1"})."""
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _fieldName(key: str) -> str:
    """The model's field for a file's key: C{path-prefix} is C{pathPrefix}."""
    return re.sub(r"-([a-z])", lambda match: match[1].upper(), key)


def _fileKey(fieldName: str) -> str:
    """The file's key for a model's field: C{pathPrefix} is C{path-prefix}."""
    return re.sub(r"[A-Z]", lambda match: "-" + match[0].lower(), fieldName)


# -- reading a file


@dataclass(frozen=True)
class ConfigFile:
    """
    A TOML config file, in its parts.

    @ivar path: the file, as given (errors name it so).
    @ivar options: the top-level keys: options by their long names.
    @ivar services: the C{[services.NAME]} tables by name.
    @ivar routes: the C{[[routes]]} tables, in order.
    @ivar filters: the C{[filters.NAME]} tables by name.
    @ivar defaultFilters: the C{default-filters} list, if given.
    @ivar source: the file its relative paths are relative to, when C{path} names something else (its
        services and routes came from etcd: L{withDocument}).
    """

    path: str
    options: Mapping[str, object]
    services: Mapping[str, Mapping[str, object]]
    routes: tuple[Mapping[str, object], ...]
    filters: Mapping[str, object] = field(default_factory=dict)
    defaultFilters: object = None
    source: str | None = None

    @property
    def base(self) -> str:
        """The directory its relative paths are read from: its file's, or the one C{source} names."""
        return configBase(self.source if self.source is not None else self.path)

    @classmethod
    def load(cls, path: str) -> ConfigFile:
        """Read C{path}; raise L{ConfigError} naming it when it cannot be read or is not such a file."""
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str, source: str | None = None) -> ConfigFile:
        """The config file whose text is C{text}, named C{path} in errors; raise L{ConfigError} if it is none."""
        import tomllib  # here: a proxy without a config file never parses TOML

        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        options = dict(document)
        services = options.pop("services", {})
        routes = options.pop("routes", [])
        filters = options.pop("filters", {})
        defaultFilters = options.pop("default-filters", options.pop("default_filters", None))
        if not isinstance(filters, dict):
            raise ConfigError(f"{path}: filters: expected tables such as [filters.auth], got {filters!r}")
        if not isinstance(services, dict):
            raise ConfigError(f"{path}: services: expected tables such as [services.api], got {services!r}")
        for name, table in services.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: services.{_key(name)}: expected a table of settings, got {table!r}")
        if not isinstance(routes, list) or not all(isinstance(route, dict) for route in routes):
            raise ConfigError(f"{path}: routes: expected [[routes]] tables, got {routes!r}")
        return cls(path, options, services, tuple(routes), filters, defaultFilters, source)

    def withDocument(self, text: str, where: str) -> ConfigFile:
        """
        This file with the services, routes, filters and C{default-filters} of the TOML document C{text} in
        place of its own (the document has nothing else); errors in them name C{where}.
        """
        document = ConfigFile.parse(text, where)
        if document.options:
            key = next(iter(document.options))
            raise ConfigError(
                f"{where}: {key!r}: only [services.*], [[routes]], [filters.*] and default-filters are read from "
                "there; other settings belong in the config file or on the command line"
            )
        return replace(document, options=self.options, source=self.source or self.path)


def _text(where: str, value: object) -> str:
    """An option's value from a file, as the command line gives it: a string, or a number as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        raise ConfigError(f"{where}: expected one value, not a list")
    raise ConfigError(f"{where}: expected a string or a number, got {value!r}")


def _boolean(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def argumentsFromMapping(
    settings: Mapping[str, object], where: str, parameters: Iterable[str], flags: Iterable[str]
) -> list[str]:
    """
    Command-line arguments equivalent to C{settings} (option long name -> value), as read from a file's top
    level: a string or number is the value of one of the C{parameters} (a list repeats one of the
    L{REPEATABLE} ones), C{true} sets one of the C{flags}, C{false} leaves it unset.  Anything else, and a key
    that is none of those options (C{_} may stand for C{-}), is an error naming C{where} and the key.
    """
    parameterNames, flagNames = set(parameters), set(flags)
    arguments: list[str] = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        if name in flagNames:
            if _boolean(f"{where}: {key}", value):
                arguments.append("--" + name)
        elif name in parameterNames:
            values = value if isinstance(value, list) and name in REPEATABLE else [value]
            for item in values:
                arguments += ["--" + name, _text(f"{where}: {key}", item)]
        else:
            raise ConfigError(f"{where}: unknown key {key!r} (see docs/options.md)")
    return arguments


def argumentsFromEnvironment(environ: Mapping[str, str], names: Iterable[str], flags: Iterable[str]) -> list[str]:
    """
    Command-line arguments from ``RPROXY_<OPTION>`` variables (``RPROXY_CONNECT_TIMEOUT=3``); the
    repeatable options take whitespace-separated lists (``RPROXY_UPSTREAM="http://a http://b"``), a
    flag is set by ``1``, ``true`` or ``yes``.
    """
    arguments: list[str] = []
    for name in flags:
        value = environ.get("RPROXY_" + name.upper().replace("-", "_"))
        if value is not None and value.strip().lower() in ("1", "true", "yes"):
            arguments.append("--" + name)
    for name in names:
        value = environ.get("RPROXY_" + name.upper().replace("-", "_"))
        if value is None:
            continue
        for item in value.split() if name in REPEATABLE else [value]:
            arguments += ["--" + name, item]
    return arguments


# -- option values, wherever they were given


class OptionValues:
    """
    Option values by long name (text as the command line gives it, a list for a repeatable option, C{0}
    or C{1} for a flag, or the option's default), and where each was given, for errors.

    A value given in a file is named by the file and its key path (C{rproxy.toml: services.api.retries}),
    any other by its option (C{--retries}).
    """

    def __init__(self, values: Mapping[str, object], sources: Mapping[str, str] | None = None) -> None:
        """
        @param values: every option's value, by long name.
        @param sources: where the values given in a file were given, by long name.
        """
        self._values = values
        self._sources = dict(sources or {})

    def __getitem__(self, name: str) -> object:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def text(self, name: str) -> str | None:
        """The value of option C{name} as text (C{None} when it has none)."""
        value = self._values[name]
        return None if value is None else str(value)

    def repeated(self, name: str) -> list[str]:
        """The values of the repeatable option C{name}."""
        value = self._values[name]
        assert isinstance(value, list), name
        return [str(item) for item in value]

    def where(self, name: str) -> str:
        """Where option C{name} was given, as an error names it."""
        return self._sources.get(name, "--" + name)

    def error(self, name: str, problem: str) -> ConfigError:
        """An error about the value of option C{name}, for the caller to raise."""
        return ConfigError(f"{self.where(name)}: {problem}")

    def overlay(self, settings: Mapping[str, object], where: str) -> OptionValues:
        """These values with C{settings} (by long name) in their place, each named C{where} and its key."""
        sources = {**self._sources, **{name: f"{where}.{_key(name)}" for name in settings}}
        return OptionValues({**self._values, **settings}, sources)


# -- the converters: one per kind of value, for every place it may be given


def secretFile(values: OptionValues, name: str, holds: str) -> bytes | None:
    """
    What the file named by option C{name} holds (surrounding whitespace dropped): a secret, never shown in
    an error; C{None} when the option is not given.  C{holds} says what it must hold, for an empty file.
    """
    path = values.text(name)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise values.error(name, f"cannot read {path}: {e.strerror}") from None
    if not secret:
        raise values.error(name, f"{path} is empty: it must hold {holds}")
    return secret


_Number = TypeVar("_Number", int, float)


def _number(values: OptionValues, name: str, kind: type[_Number]) -> _Number:
    value = values[name]
    try:
        number = kind(str(value))
        if not math.isfinite(number):
            raise ValueError(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise values.error(name, f"expected {expected}, got {value!r}") from None
    return number


def _positive(values: OptionValues, name: str, kind: type[_Number]) -> _Number:
    value = _number(values, name, kind)
    if value <= 0:
        raise values.error(name, f"must be greater than 0, got {value}")
    return value


def _atLeastZero(values: OptionValues, name: str, kind: type[_Number]) -> _Number:
    value = _number(values, name, kind)
    if value < 0:
        raise values.error(name, f"must not be negative, got {value}")
    return value


def _size(values: OptionValues, name: str) -> int:
    try:
        return parseSize(str(values[name]))
    except ValueError as e:
        raise values.error(name, str(e)) from None


def _statuses(values: OptionValues, name: str) -> frozenset[int]:
    """A comma-separated list of HTTP statuses (100 to 599)."""
    statuses = set()
    for item in str(values[name]).split(","):
        if not item.strip():
            continue
        if not item.strip().isdigit() or not 100 <= int(item) <= 599:
            raise values.error(name, f"expected statuses such as 502,503, got {item.strip()!r}")
        statuses.add(int(item))
    return frozenset(statuses)


def _pool(values: OptionValues) -> PoolSettings:
    return PoolSettings(
        connectTimeout=_positive(values, "connect-timeout", float),
        responseTimeout=_positive(values, "response-timeout", float),
        readTimeout=_positive(values, "read-timeout", float),
        maxConnections=_positive(values, "upstream-max-connections", int),
        maxIdle=_atLeastZero(values, "upstream-max-idle", int),
        idleTimeout=_positive(values, "upstream-idle-timeout", float),
        maxQueue=_atLeastZero(values, "upstream-queue", int),
        queueTimeout=_positive(values, "queue-timeout", float),
        pingInterval=_atLeastZero(values, "upstream-ping-interval", float),
        pingTimeout=_positive(values, "upstream-ping-timeout", float),
        tls=_upstreamTLS(values),
    )


def _upstreamTLS(values: OptionValues) -> UpstreamTLS:
    """The upstream TLS settings, their files loaded once to report a mistake now."""
    certificate, key = certificateFiles(values.text("upstream-client-cert"))
    tls = UpstreamTLS(
        caFile=values.text("upstream-ca"),
        clientCertificate=certificate,
        clientKey=key,
        insecure=bool(values["upstream-tls-insecure"]),
    )
    try:
        trustRoot(tls.caFile)
    except ValueError as e:
        raise values.error("upstream-ca", str(e)) from None
    try:
        clientCertificate(tls.clientCertificate, tls.clientKey)
    except ValueError as e:
        raise values.error("upstream-client-cert", str(e)) from None
    if tls.insecure and tls.caFile is not None:
        raise values.error("upstream-ca", "has no use with --upstream-tls-insecure (nothing is verified)")
    return tls


def _retry(values: OptionValues) -> RetryPolicy:
    return RetryPolicy(
        retries=_atLeastZero(values, "retries", int),
        tryDuration=_atLeastZero(values, "try-duration", float),
        retryStatuses=_statuses(values, "retry-on-status"),
        replayBodySize=_size(values, "retry-body-size"),
        idempotencyKey=bool(values["retry-idempotency-key"]),
    )


def _passive(values: OptionValues) -> PassivePolicy:
    maxEjectedPercent = _atLeastZero(values, "max-ejected-percent", float)
    if maxEjectedPercent > 100:
        raise values.error("max-ejected-percent", f"must be at most 100, got {maxEjectedPercent:g}")
    failRate = _atLeastZero(values, "fail-rate", float)
    if failRate > 1:
        raise values.error("fail-rate", f"must be a share from 0 to 1, got {failRate:g}")
    return PassivePolicy(
        maxFails=_atLeastZero(values, "max-fails", int),
        failureRate=failRate,
        window=_positive(values, "fail-window", float),
        baseEjection=_positive(values, "ejection-time", float),
        maxEjection=_positive(values, "max-ejection-time", float),
        maxEjectedShare=maxEjectedPercent / 100,
        slowStart=_atLeastZero(values, "slow-start", float),
    )


def _healthCheck(values: OptionValues) -> HealthCheckSettings | None:
    path = values.text("health-path")
    if path is None:
        return None
    interval = _positive(values, "health-interval", float)
    timeout = _positive(values, "health-timeout", float)
    rise = _positive(values, "health-rise", int)
    fall = _positive(values, "health-fall", int)
    try:
        return HealthCheckSettings(
            path=path,
            method=str(values["health-method"]),
            status=str(values["health-status"]),
            body=values.text("health-body"),
            interval=interval,
            timeout=timeout,
            rise=rise,
            fall=fall,
        )
    except ValueError as e:
        # The settings name themselves ("health check status ..."): name the option that set them.
        setting = str(e).removeprefix("health check ").split(" ", 1)[0].rstrip(":")
        raise values.error(f"health-{setting}", str(e)) from None


def _balancer(
    values: OptionValues,
    options: Mapping[str, object],
    optionsWhere: str,
    factories: Mapping[str, IBalancerFactory],
) -> str:
    """The balancer's name, checked with its C{options} by building it once."""
    name = str(values["balancer"])
    if name not in factories:
        raise values.error("balancer", f"unknown balancer {name!r}; installed: " + ", ".join(sorted(factories)))
    try:
        factories[name].build(options)
    except ValueError as e:
        raise ConfigError(f"{optionsWhere}: {e}") from None
    return name


def _keyValues(values: OptionValues, name: str) -> dict[str, str]:
    """The C{KEY=VALUE} settings of a repeatable option."""
    settings: dict[str, str] = {}
    for setting in values.repeated(name):
        key, equals, value = setting.partition("=")
        if not equals or not key.strip():
            raise values.error(name, f"expected KEY=VALUE, got {setting!r}")
        settings[key.strip()] = value.strip()
    return settings


def _upstream(where: str, spec: object) -> str:
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: expected an upstream URL, got {spec!r}")
    try:
        UpstreamURL.parse(splitSettings(spec)[0])
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec


def _service(
    name: str,
    values: OptionValues,
    upstreams: tuple[str, ...],
    balancerOptions: tuple[Mapping[str, object], str],
    factories: Mapping[str, IBalancerFactory],
) -> ServiceConfig:
    """
    A service of C{upstreams} with the settings C{values} give; C{balancerOptions}: the balancer's options,
    and where they were given.
    """
    options, optionsWhere = balancerOptions
    return ServiceConfig(
        name=name,
        upstreams=upstreams,
        balancer=_balancer(values, options, optionsWhere, factories),
        balancerOptions=options,
        rewriteHost=bool(values["rewrite-host"]),
        pool=_pool(values),
        retry=_retry(values),
        passive=_passive(values),
        healthCheck=_healthCheck(values),
    )


def _client(values: OptionValues) -> ClientLimits:
    return ClientLimits(
        maxRequestLine=_positive(values, "max-request-line", int),
        maxHeaderBytes=_size(values, "max-header-size"),
        maxHeaders=_positive(values, "max-headers", int),
        maxBodySize=_size(values, "max-body-size"),
        headerTimeout=_positive(values, "header-timeout", float),
        idleTimeout=_positive(values, "client-timeout", float),
        maxConnections=_positive(values, "max-connections", int),
        maxClientConnections=_atLeastZero(values, "max-client-connections", int),
        minBodyRate=_size(values, "min-body-rate"),
        bodyRateGrace=_atLeastZero(values, "body-rate-grace", float),
        bodyRateWindow=_positive(values, "body-rate-window", float),
        writeTimeout=_atLeastZero(values, "write-timeout", float),
        requestTimeout=_atLeastZero(values, "request-timeout", float),
        maxInFlight=_atLeastZero(values, "max-in-flight", int),
        maxMemory=_size(values, "max-memory"),
        h2MaxConcurrentStreams=_positive(values, "h2-max-concurrent-streams", int),
        h2MaxHeaderListSize=_size(values, "h2-max-header-list-size"),
        h2ResetBurst=_positive(values, "h2-reset-burst", int),
        h2ResetRate=_positive(values, "h2-reset-rate", int),
    )


def endpoints(values: OptionValues, name: str) -> tuple[str, ...]:
    """The server endpoint strings of option C{name}, each of a known type (not listened on here)."""
    given = tuple(values.repeated(name))
    for description in given:
        problem = checkEndpoint(description)
        if problem is not None:
            raise values.error(name, problem)
    return given


def _tls(values: OptionValues) -> TLSSettings:
    """The TLS listeners (plain endpoints, which rproxy wraps) and their certificates, each read once to check it."""
    for description in values.repeated("tls-listen"):
        if description.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise values.error(
                "tls-listen", f"give a plain endpoint such as tcp:8443, which rproxy wraps in TLS, not {description!r}"
            )
    listen = endpoints(values, "tls-listen")
    certificates = []
    for spec in values.repeated("tls-cert"):
        try:
            files = CertificateFiles.fromSpec(spec)
            loadCertificate(files)
        except ValueError as e:  # a CertificateError names the file
            raise values.error("tls-cert", str(e)) from None
        certificates.append(files)
    if listen and not certificates:
        raise values.error("tls-listen", "needs a certificate: give --tls-cert CERTFILE:KEYFILE")
    if certificates and not listen:
        raise values.error("tls-cert", "has no use without --tls-listen (there is no TLS listener)")
    return TLSSettings(listen, tuple(certificates), _atLeastZero(values, "tls-watch", float))


def _misplaced(where: str, key: str, values: OptionValues, allowed: str, keys: Collection[str]) -> ConfigError:
    """
    The error for a key a table does not accept (its keys are C{keys}): a near miss of one of them, an
    option set elsewhere, or an unknown key.
    """
    name = key.replace("_", "-")
    import difflib  # here: only a mistake needs it

    near = difflib.get_close_matches(name, sorted(keys), n=1, cutoff=0.8)
    if near:
        return ConfigError(f"{where}: unknown key {key!r}: did you mean {near[0]!r}?")
    if name in SERVICE_OPTIONS:
        return ConfigError(f"{where}: {key!r} is a service setting: set it in the service's table")
    if name in values:
        return ConfigError(f"{where}: {key!r} is a global option: set it at the top level of the file")
    return ConfigError(f"{where}: unknown key {key!r} (see docs/configuration.md: {allowed})")


# -- services


def _setting(where: str, option: str, value: object) -> object:
    """A service or route's value for C{option}: C{true} or C{false} for a flag, else as the command line gives it."""
    return _boolean(where, value) if option in SERVICE_FLAGS else _text(where, value)


def _serviceTable(
    where: str,
    name: str,
    table: Mapping[str, object],
    defaults: OptionValues,
    inherited: ServiceConfig,
    factories: Mapping[str, IBalancerFactory],
    filters: Mapping[str, FilterConfig],
) -> tuple[ServiceConfig, OptionValues]:
    """
    The service a C{[services.NAME]} table defines, and its option values: the table's over C{defaults}.

    Its balancer options are the table's C{balancer-options}; without them, none if it names its own
    balancer, else those of C{inherited} (the top level's).
    """
    settings: dict[str, object] = {}
    upstreams: tuple[str, ...] | None = None
    balancerOptions: tuple[Mapping[str, object], str] | None = None
    chain: tuple[str, ...] | None = None
    for key, value in table.items():
        option = key.replace("_", "-")
        keyWhere = f"{where}.{_key(key)}"
        if option == "filters":
            chain = _filterNames(keyWhere, value, filters)
        elif option == "upstreams":
            if not isinstance(value, list) or not value:
                raise ConfigError(f'{keyWhere}: expected a list of upstream URLs, such as ["http://10.0.0.5:8080"]')
            upstreams = tuple(_upstream(f"{keyWhere}[{i}]", spec) for i, spec in enumerate(value))
        elif option == "balancer-options":
            balancerOptions = (_table(keyWhere, value), keyWhere)
        elif option in SERVICE_OPTIONS:
            settings[option] = _setting(keyWhere, option, value)
        else:
            raise _misplaced(where, key, defaults, "the keys of a service", SERVICE_KEYS)
    if upstreams is None:
        raise ConfigError(f'{where}: no upstreams (give upstreams = ["http://host:port", ...])')
    if balancerOptions is None:
        inheriting = "balancer" not in settings
        balancerOptions = (inherited.balancerOptions, defaults.where("balancer-option")) if inheriting else ({}, where)
    values = defaults.overlay(settings, where)
    return replace(_service(name, values, upstreams, balancerOptions, factories), filters=chain), values


# -- routes: the values of a route's keys


def _string(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _strings(where: str, value: object) -> tuple[str, ...]:
    """A string, or a list of strings."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a string or a list of strings, got {value!r}")
    return tuple(_string(f"{where}[{i}]", item) for i, item in enumerate(value))


def _table(where: str, value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return value


def _matchers(where: str, value: object) -> dict[str, str | None]:
    """Name to the value that must be there, or C{true}: there with any value (C{None})."""
    matchers: dict[str, str | None] = {}
    for name, expected in _table(where, value).items():
        if expected is True:
            matchers[name] = None
        elif isinstance(expected, str):
            matchers[name] = expected
        else:
            raise ConfigError(f"{where}.{_key(name)}: expected a string, or true for any value, got {expected!r}")
    return matchers


def _fieldValues(where: str, value: object) -> dict[str, str]:
    return {name: _string(f"{where}.{_key(name)}", item) for name, item in _table(where, value).items()}


def _fieldLines(where: str, value: object) -> tuple[tuple[str, str], ...]:
    """Name to a value or a list of values: one field line each."""
    return tuple(
        (name, line)
        for name, lines in _table(where, value).items()
        for line in _strings(f"{where}.{_key(name)}", lines)
    )


#: The keys of a route's C{websocket} table, and the L{WebSocketLimits} field each sets.
WEBSOCKET_KEYS = {"max-message-size": "maxMessageSize", "max-messages-per-second": "maxMessagesPerSecond"}


def _websocket(where: str, value: object) -> WebSocketLimits:
    """C{websocket = { max-message-size = "1MiB", max-messages-per-second = 100 }} (each optional)."""
    limits: dict[str, int] = {}
    for key, item in _table(where, value).items():
        name = key.replace("_", "-")
        keyWhere = f"{where}.{_key(key)}"
        if name not in WEBSOCKET_KEYS:
            raise ConfigError(f"{keyWhere}: not a key of websocket (its keys: {', '.join(WEBSOCKET_KEYS)})")
        if name == "max-message-size" and isinstance(item, str):
            try:
                limits[WEBSOCKET_KEYS[name]] = parseSize(item)
            except ValueError as e:
                raise ConfigError(f"{keyWhere}: {e}") from None
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            limits[WEBSOCKET_KEYS[name]] = item
        else:
            raise ConfigError(f"{keyWhere}: expected a whole number of at least 0 (0: no limit), got {item!r}")
    return WebSocketLimits(**limits)


_ROUTE_SETTINGS: dict[str, Callable[[str, object], object]] = {
    "websocket": _websocket,
    "hosts": _strings,
    "path-prefix": _string,
    "headers": _matchers,
    "query": _matchers,
    "strip-prefix": _boolean,
    "replace-prefix": _string,
    "set-host": _string,
    "set-headers": _fieldValues,
    "add-headers": _fieldLines,
    "remove-headers": _strings,
}

#: Every key of a C{[[routes]]} table: its target, its conditions and rewrites (L{RouteConfig}'s fields), retries.
ROUTE_KEYS = frozenset({*ROUTE_TARGETS, *_ROUTE_SETTINGS, *RETRY_OPTIONS, "filters", "name"})

_Config = TypeVar("_Config", RouteConfig, WeightedSplitConfig, BlueGreenConfig)


def _check(where: str, config: _Config, build: Callable[[_Config], object]) -> None:
    """
    Build C{config} to check it with the directors' own rules.  When that fails, the error names the key
    at fault (the fields are the file's keys): the one without which it builds (C{strip-prefix} without
    C{path-prefix}), else the first that fails on its own, else the one it cannot do without (a split's
    C{services}); or else just C{where}.
    """
    try:
        build(config)
        return
    except ValueError as e:
        problem = str(e)
    neutral: dict[str, Any] = {}
    for each in fields(config):
        if each.default is not MISSING:
            neutral[each.name] = each.default
        elif each.default_factory is not MISSING:
            neutral[each.name] = each.default_factory()
    given = [name for name, value in neutral.items() if getattr(config, name) != value]
    for name in given:
        try:
            build(replace(config, **{name: neutral[name]}))
        except ValueError:
            continue
        raise ConfigError(f"{where}.{_fileKey(name)}: {problem}")
    minimal = replace(config, **{name: neutral[name] for name in given})
    try:
        build(minimal)
    except ValueError:
        required = [each.name for each in fields(config) if each.name not in neutral]
        at = f".{_fileKey(required[0])}" if len(required) == 1 else ""
        raise ConfigError(f"{where}{at}: {problem}") from None
    for name in given:
        try:
            build(replace(minimal, **{name: getattr(config, name)}))
        except ValueError as alone:
            raise ConfigError(f"{where}.{_fileKey(name)}: {alone}") from None
    raise ConfigError(f"{where}: {problem}")


def _serviceName(where: str, value: object, defined: Mapping[str, Service]) -> str:
    name = _string(where, value)
    if name not in defined:
        raise ConfigError(f"{where}: no service named {name!r} (services: {', '.join(sorted(defined)) or 'none'})")
    return name


def _split(where: str, value: object, defined: Mapping[str, Service]) -> WeightedSplitConfig | BlueGreenConfig:
    table = {key.replace("_", "-"): item for key, item in _table(where, value).items()}
    if "services" in table:
        kind, keys = "a weighted split", WEIGHTED_SPLIT_KEYS
    elif "blue" in table or "green" in table:
        kind, keys = "a blue/green split", BLUE_GREEN_KEYS
    else:
        raise ConfigError(
            f"{where}: expected services = {{ NAME = WEIGHT, ... }} (a weighted split), or blue and green (a switch)"
        )
    for key in table:
        if key not in keys:
            raise ConfigError(f"{where}: {key!r} is not a key of {kind} (its keys: {', '.join(sorted(keys))})")
    optional = {key: _string(f"{where}.{key}", table[key]) for key in ("pin", "sticky", "active") if key in table}
    split: WeightedSplitConfig | BlueGreenConfig
    if keys is WEIGHTED_SPLIT_KEYS:
        weights = _table(f"{where}.services", table["services"])
        variants = []
        for name, weight in weights.items():
            nameWhere = f"{where}.services.{_key(name)}"
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise ConfigError(f"{nameWhere}: expected a whole number (a weight), got {weight!r}")
            variants.append((_serviceName(nameWhere, name, defined), weight))
        split = WeightedSplitConfig(tuple(variants), **optional)
        _check(where, split, lambda each: each.build(defined))
    else:
        for color in ("blue", "green"):
            if color not in table:
                raise ConfigError(f"{where}: a blue/green split needs blue and green (service names)")
        split = BlueGreenConfig(
            _serviceName(f"{where}.blue", table["blue"], defined),
            _serviceName(f"{where}.green", table["green"], defined),
            **optional,
        )
        _check(where, split, lambda each: each.build(defined))
    return split


def _target(where: str, given: Mapping[str, object], defined: Mapping[str, Service], base: str) -> RouteTarget:
    """
    What the route's C{service}, C{split}, C{service-version} or C{local} key says (exactly one of them); a
    relative C{local.static} directory is read from C{base}.
    """
    if given.get("service-version") is False:
        given = {key: value for key, value in given.items() if key != "service-version"}
    if len(given) != 1:
        these = f", not {' and '.join(given)}" if given else ""
        raise ConfigError(f"{where}: give one of service, split, service-version = true or local{these}")
    [(key, value)] = given.items()
    keyWhere = f"{where}.{key}"
    if key == "service":
        return _serviceName(keyWhere, value, defined)
    if key == "local":
        try:
            return localConfig(_table(keyWhere, value), base)
        except ValueError as e:
            raise ConfigError(f"{keyWhere}: {e}") from None
    if key == "split":
        return _split(keyWhere, value, defined)
    _boolean(keyWhere, value)
    versions = ServiceVersionConfig()
    if not versions.serviceNames(defined):
        raise ConfigError(
            f'{keyWhere}: no service is named NAME:VERSION, as the path /NAME/VERSION/ names it ([services."users:v1"])'
        )
    return versions


def _route(
    where: str,
    table: Mapping[str, object],
    values: OptionValues,
    services: Mapping[str, OptionValues],
    defined: Mapping[str, Service],
    filters: Mapping[str, FilterConfig],
    defaultFilters: tuple[str, ...] = (),
    base: str = ".",
) -> RouteConfig:
    """
    The route a C{[[routes]]} table defines, checked by building it over C{defined} (stand-ins of the
    services, by name).  C{values}: the top-level option values; C{services}: each service's, which the
    route's retry options override; a local route without its own C{filters} has C{defaultFilters}, and
    reads a relative C{static} directory from C{base}.
    """
    targets: dict[str, object] = {}
    settings: dict[str, Any] = {}
    retry: dict[str, object] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        keyWhere = f"{where}.{_key(key)}"
        if name == "name":
            settings["name"] = _string(keyWhere, value)
            _named(keyWhere, "route", settings["name"])
        elif name == "filters":
            settings["filters"] = _filterNames(keyWhere, value, filters)
        elif name in ROUTE_TARGETS:
            targets[name] = value
        elif name in _ROUTE_SETTINGS:
            settings[_fieldName(name)] = _ROUTE_SETTINGS[name](keyWhere, value)
        elif name in RETRY_OPTIONS:
            retry[name] = _setting(keyWhere, name, value)
        else:
            raise _misplaced(where, key, values, "the keys of a route", ROUTE_KEYS)
    route = RouteConfig(_target(where, targets, defined, base), **settings)
    if isinstance(route.target, LocalConfig) and route.filters is None:
        route = replace(route, filters=defaultFilters)
    if retry:
        policies = {name: _retry(services[name].overlay(retry, where)) for name in route.serviceNames(defined)}
        route = replace(route, retry=policies)
    _check(where, route, lambda each: each.build(defined))
    return route


# -- the whole


def _localURL(endpoint: str) -> str:
    """The http:// URL of a local tcp: endpoint string (for the demo upstream)."""
    parameters = dict(part.split("=", 1) for part in endpoint.split(":")[2:] if "=" in part)
    port = endpoint.split(":")[1]
    return f"http://{parameters.get('interface', '127.0.0.1')}:{port}"


def _standIn(name: str, registry: MemoryRegistry) -> Service:
    """A service that routes may be built over, to check them without upstreams."""
    return Service(name, registry, FirstAvailable())


def _services(
    values: OptionValues,
    file: ConfigFile | None,
    factories: Mapping[str, IBalancerFactory],
    filters: Mapping[str, FilterConfig],
) -> tuple[dict[str, ServiceConfig], dict[str, OptionValues], dict[str, str]]:
    """
    The services, the option values of each, and where each was defined (for errors), by name; none only for
    a file with routes (local routes need no service: a route to a service that does not exist is an error).
    """
    upstreams = tuple(_upstream(values.where("upstream"), spec) for spec in values.repeated("upstream"))
    demo = values.text("demo-upstream")
    path, fileServices = ("", {}) if file is None else (file.path, file.services)
    if not upstreams and demo is not None and not fileServices:
        upstreams = (_localURL(demo),)
    # Built even without upstreams, so that the top-level settings are checked when every service overrides them.
    topLevelOptions = (_keyValues(values, "balancer-option"), values.where("balancer-option"))
    default = _service("default", values, upstreams, topLevelOptions, factories)
    services, serviceValues, places = {}, {}, {}
    if upstreams:
        services["default"], serviceValues["default"], places["default"] = default, values, values.where("upstream")
    for name, table in fileServices.items():
        where = f"{path}: services.{_key(name)}"
        _named(where, "service", name)
        if name in services:
            raise ConfigError(f"{where}: the top-level upstreams (--upstream) are the service 'default' already")
        services[name], serviceValues[name] = _serviceTable(where, name, table, values, default, factories, filters)
        places[name] = where
    if not services and not (file is not None and file.routes):
        raise ConfigError("at least one --upstream URL is required (or --demo-upstream)")
    return services, serviceValues, places


def _fieldNames(values: OptionValues, name: str) -> tuple[str, ...]:
    names = tuple(values.repeated(name))
    for each in names:
        if not isToken(each.encode("utf-8")):
            raise values.error(name, f"not a field name: {each!r}")
    return names


def _otelEndpoint(values: OptionValues) -> str | None:
    endpoint = values.text("otel-endpoint")
    if endpoint is None:
        return None
    try:
        return tracesURL(endpoint)
    except ValueError as e:
        raise values.error("otel-endpoint", str(e)) from None


def _accessLogFormat(values: OptionValues) -> str:
    format = values.text("access-log-format") or "combined"
    try:
        checkFormat(format)
    except ValueError as e:
        raise values.error("access-log-format", str(e)) from None
    return format


def _named(where: str, kind: str, name: str) -> None:
    try:
        checkName(where, kind, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _filterNames(where: str, value: object, defined: Mapping[str, FilterConfig]) -> tuple[str, ...]:
    try:
        return filterNames(where, value, defined)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _filters(values: OptionValues, file: ConfigFile | None) -> tuple[dict[str, FilterConfig], tuple[str, ...]]:
    """
    The filter definitions (the command line's, then the file's), checked by building them; and the default
    chain: the command line's filters, then the file's C{default-filters}.
    """
    try:
        given = commandLineFilters(values.text, values.repeated, lambda name: bool(values[name]), values.where)
        fromFile = fileFilters(file.path, file.filters) if file is not None else []
        definitions = {each.name: each for each in [*given, *fromFile]}
        checkFilters(definitions.values(), file.base if file is not None else configBase(None), values.text("redis"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    defaults = tuple(each.name for each in given)
    if file is not None and file.defaultFilters is not None:
        names = _filterNames(f"{file.path}: default-filters", file.defaultFilters, definitions)
        if set(names) & set(defaults):
            raise ConfigError(
                f"{file.path}: default-filters: the command line's filters are in the default chain already"
            )
        defaults += names
    return definitions, defaults


def buildConfig(values: OptionValues, file: ConfigFile | None = None) -> ProxyConfig:
    """
    The configuration that the options' C{values} (from the command line, the environment and the file's
    top level) and C{file}'s services and routes describe; raise L{ConfigError} for the first mistake.

    The command line's upstreams (or the demo upstream, when there are none and C{file} defines no
    services) form the service C{default}, with the top-level settings; each of the file's services has
    those settings unless it overrides them.  Without routes, the one service takes every request.  Every
    service must be reachable by some route.
    """
    filters, defaultFilters = _filters(values, file)
    services, serviceValues, places = _services(values, file, balancerFactories(), filters)
    registry = MemoryRegistry()
    standIns = {name: _standIn(name, registry) for name in services}
    if file is not None and file.routes:
        routes = tuple(
            _route(
                f"{file.path}: routes[{i}]",
                table,
                values,
                serviceValues,
                standIns,
                filters,
                defaultFilters,
                file.base,
            )
            for i, table in enumerate(file.routes)
        )
    elif len(services) == 1:
        routes = (RouteConfig(next(iter(services))),)
    else:
        where = file.path if file is not None else "routes"
        names = ", ".join(services)
        raise ConfigError(f"{where}: {len(services)} services ({names}) but no [[routes]] to send requests to them")
    named: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name and named.setdefault(route.name, i) != i:
            raise ConfigError(f"routes[{i}].name: routes[{named[route.name]}] is named {route.name!r} already")
    reached = {name for route in routes for name in route.serviceNames(standIns)}
    for name, where in places.items():
        if name not in reached:
            raise ConfigError(f"{where}: no route sends requests to the service {name!r}")
    used = {*defaultFilters, *(n for s in services.values() for n in s.filters or ())}
    used.update(n for route in routes for n in route.filters or ())
    for name, definition in filters.items():
        if name not in used:
            raise ConfigError(f"{definition.where}: no route, service or default-filters uses the filter {name!r}")

    trustedProxies = tuple(values.repeated("trusted-proxy"))
    try:
        parseNetworks(trustedProxies)
    except ValueError as e:
        raise values.error("trusted-proxy", str(e)) from None
    viaName = str(values["via-name"])
    if not isToken(viaName.encode("utf-8")):
        raise values.error("via-name", f"must be an HTTP token (letters, digits, -._~...), got {viaName!r}")
    accessLog = values.text("access-log")
    tls = _tls(values)
    return ProxyConfig(
        # Without any listener, plain HTTP on 8080; with TLS listeners, only the listeners given.
        listen=endpoints(values, "listen") or (() if tls.listen else ("tcp:8080",)),
        trustedProxies=trustedProxies,
        viaName=viaName,
        grace=_atLeastZero(values, "grace", float),
        tunnelIdleTimeout=_atLeastZero(values, "tunnel-idle-timeout", float),
        accessLog=None if accessLog == "off" else accessLog,
        accessLogFormat=_accessLogFormat(values),
        accessLogRedact=tuple(values.repeated("access-log-redact")),
        accessLogHeaders=_fieldNames(values, "access-log-header"),
        tracing=bool(values["otel"]) or values.text("otel-endpoint") is not None,
        otelEndpoint=_otelEndpoint(values),
        demoUpstream=values.text("demo-upstream"),
        client=_client(values),
        tls=tls,
        services=services,
        routes=routes,
        filters=filters,
        defaultFilters=defaultFilters,
        base=file.base if file is not None else configBase(None),
    )
