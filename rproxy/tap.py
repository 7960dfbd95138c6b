"""
``twist rproxy``: the command line, and the services it builds.

Flags, a TOML file (C{--config}) and the environment (C{rproxy.tac}) all go through L{Options}, which
produces one L{ProxyConfig}; L{buildService} turns a config into listeners, upstream pools and a
draining shutdown.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from twisted.application import service, strports
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from rproxy import __version__
from rproxy.balancers import balancerFactories
from rproxy.config import (
    REPEATABLE,
    ProxyConfig,
    argumentsFromEnvironment,
    argumentsFromFile,
    parseSize,
)
from rproxy.directors import SingleServiceDirector
from rproxy.exchange import Proxy
from rproxy.headers import ForwardingPolicy, isToken, parseNetworks
from rproxy.health import PassivePolicy
from rproxy.healthcheck import HealthChecker, HealthCheckSettings
from rproxy.registry import MemoryRegistry
from rproxy.resource import buildResource
from rproxy.retry import RetryPolicy
from rproxy.server import ClientLimits, DrainingService, ProxySite
from rproxy.upstream import Service, Upstream, UpstreamURL, splitWeight
from rproxy.upstream.pool import PoolSettings

_DEFAULT_POOL = PoolSettings()
_DEFAULT_CLIENT = ClientLimits()
_DEFAULT_RETRY = RetryPolicy()
_DEFAULT_PASSIVE = PassivePolicy()
_DEFAULT_HEALTH = HealthCheckSettings()


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
        ["list-balancers", None, "Print the installed balancers and exit."],
        ["version", None, "Print the version and exit."],
    ]
    optParameters: list[list[Any]] = [
        ["config", "c", None, "A TOML file of settings; its keys are these options' long names."],
        ["balancer", None, "round_robin", "How to choose among the upstreams (see --list-balancers)."],
        ["via-name", None, "rproxy", "The pseudonym this proxy adds to Via."],
        ["access-log", None, "-", "Access log: '-' for the log output, a file path, or 'off'."],
        [
            "demo-upstream",
            None,
            None,
            "Also serve the built-in demo upstream on this endpoint, and proxy to it when no --upstream is given.",
        ],
        ["grace", None, 30.0, "Seconds in-flight exchanges get to finish on shutdown."],
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
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = []

    def opt_listen(self, endpoint: str) -> None:
        """A server endpoint to listen on, e.g. tcp:8080 (repeatable; default tcp:8080)."""
        self["listen"].append(endpoint)

    def opt_upstream(self, url: str) -> None:
        """An upstream URL, e.g. http://127.0.0.1:9000/base (repeatable)."""
        self["upstream"].append(url)

    def opt_balancer_option(self, setting: str) -> None:
        """An option for the balancer, KEY=VALUE (repeatable)."""
        self["balancer-option"].append(setting)

    def opt_trusted_proxy(self, network: str) -> None:
        """A CIDR whose X-Forwarded-*/Forwarded fields are kept (repeatable)."""
        self["trusted-proxy"].append(network)

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
        arguments = list(sys.argv[1:] if options is None else options)
        configFile = _configFile(arguments)
        if configFile is not None:
            try:
                arguments = argumentsFromFile(configFile, optionNames()) + arguments
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        super().parseOptions(arguments)

    def postOptions(self) -> None:
        self.config = self._buildConfig()

    def _buildConfig(self) -> ProxyConfig:
        upstreams = tuple(self["upstream"])
        if not upstreams and not self["demo-upstream"]:
            raise usage.UsageError("at least one --upstream URL is required (or --demo-upstream)")
        for spec in upstreams:
            try:
                UpstreamURL.parse(splitWeight(spec)[0])
            except ValueError as e:
                raise usage.UsageError(f"--upstream: {e}") from None
        try:
            parseNetworks(self["trusted-proxy"])
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxy: {e}") from None
        if not isToken(self["via-name"].encode("utf-8")):
            raise usage.UsageError(
                f"--via-name: must be an HTTP token (letters, digits, -._~...), got {self['via-name']!r}"
            )
        balancerOptions = _balancerOptions(self)
        pool = PoolSettings(
            connectTimeout=_positive(self, "connect-timeout"),
            responseTimeout=_positive(self, "response-timeout"),
            readTimeout=_positive(self, "read-timeout"),
            maxConnections=_positive(self, "upstream-max-connections"),
            maxIdle=_atLeastZero(self, "upstream-max-idle"),
            idleTimeout=_positive(self, "upstream-idle-timeout"),
            maxQueue=_atLeastZero(self, "upstream-queue"),
            queueTimeout=_positive(self, "queue-timeout"),
        )
        client = ClientLimits(
            maxRequestLine=_positive(self, "max-request-line"),
            maxHeaderBytes=_size(self, "max-header-size"),
            maxHeaders=_positive(self, "max-headers"),
            maxBodySize=_size(self, "max-body-size"),
            headerTimeout=_positive(self, "header-timeout"),
            idleTimeout=_positive(self, "client-timeout"),
            maxConnections=_positive(self, "max-connections"),
        )
        retry = RetryPolicy(
            retries=_atLeastZero(self, "retries"),
            tryDuration=_atLeastZero(self, "try-duration"),
            retryStatuses=_statuses(self, "retry-on-status"),
            replayBodySize=_size(self, "retry-body-size"),
            idempotencyKey=bool(self["retry-idempotency-key"]),
        )
        maxEjectedPercent = _atLeastZero(self, "max-ejected-percent")
        if maxEjectedPercent > 100:
            raise usage.UsageError(f"--max-ejected-percent: must be at most 100, got {maxEjectedPercent:g}")
        failRate = _atLeastZero(self, "fail-rate")
        if failRate > 1:
            raise usage.UsageError(f"--fail-rate: must be a share from 0 to 1, got {failRate:g}")
        passive = PassivePolicy(
            maxFails=_atLeastZero(self, "max-fails"),
            failureRate=failRate,
            window=_positive(self, "fail-window"),
            baseEjection=_positive(self, "ejection-time"),
            maxEjection=_positive(self, "max-ejection-time"),
            maxEjectedShare=maxEjectedPercent / 100,
            slowStart=_atLeastZero(self, "slow-start"),
        )
        return ProxyConfig(
            healthCheck=self._healthCheck(),
            listen=tuple(self["listen"]) or ("tcp:8080",),
            upstreams=upstreams,
            balancer=self["balancer"],
            balancerOptions=balancerOptions,
            rewriteHost=bool(self["rewrite-host"]),
            trustedProxies=tuple(self["trusted-proxy"]),
            viaName=self["via-name"],
            grace=_atLeastZero(self, "grace"),
            accessLog=None if self["access-log"] == "off" else self["access-log"],
            demoUpstream=self["demo-upstream"],
            pool=pool,
            client=client,
            retry=retry,
            passive=passive,
        )

    def _healthCheck(self) -> HealthCheckSettings | None:
        if self["health-path"] is None:
            return None
        try:
            return HealthCheckSettings(
                path=self["health-path"],
                method=self["health-method"],
                status=self["health-status"],
                body=self["health-body"],
                interval=_positive(self, "health-interval"),
                timeout=_positive(self, "health-timeout"),
                rise=_positive(self, "health-rise"),
                fall=_positive(self, "health-fall"),
            )
        except ValueError as e:
            # The settings name themselves ("health check status ..."): name the option that set them.
            setting = str(e).removeprefix("health check ").split(" ", 1)[0]
            raise usage.UsageError(f"--health-{setting}: {e}") from None


def optionsFromEnvironment(environ: Mapping[str, str]) -> Options:
    """L{Options} from ``RPROXY_*`` variables (and ``RPROXY_CONFIG``, a TOML file), for rproxy.tac."""
    options = Options()
    names = [str(p[0]) for p in Options.optParameters] + sorted(REPEATABLE)
    flags = [str(f[0]) for f in Options.optFlags if f[0] not in ("list-balancers", "version")]
    options.parseOptions(argumentsFromEnvironment(environ, names, flags))
    return options


def optionNames() -> list[str]:
    """Every long option name, as a config file key."""
    names = [str(p[0]) for p in Options.optParameters] + [str(f[0]) for f in Options.optFlags]
    return names + sorted(REPEATABLE)


def _configFile(arguments: list[str]) -> str | None:
    """The --config file among C{arguments}, in any form getopt accepts (-c F, -cF, --conf=F, ...)."""
    for i, argument in enumerate(arguments):
        name, equals, value = argument.partition("=")
        if len(name) >= len("--conf") and "--config".startswith(name):
            if equals:
                return value
            return arguments[i + 1] if i + 1 < len(arguments) else None
        if argument == "-c":
            return arguments[i + 1] if i + 1 < len(arguments) else None
        if argument.startswith("-c") and not argument.startswith("--"):
            return argument[2:]
    return None


def _number(options: Options, name: str) -> Any:
    """The option's value as the type of its default (int or float), or an error naming it."""
    default = next(p[2] for p in Options.optParameters if p[0] == name)
    kind = type(default)
    try:
        return kind(options[name])
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise usage.UsageError(f"--{name}: expected {expected}, got {options[name]!r}") from None


def _positive(options: Options, name: str) -> Any:
    value = _number(options, name)
    if value <= 0:
        raise usage.UsageError(f"--{name}: must be greater than 0, got {value}")
    return value


def _atLeastZero(options: Options, name: str) -> Any:
    value = _number(options, name)
    if value < 0:
        raise usage.UsageError(f"--{name}: must not be negative, got {value}")
    return value


def _statuses(options: Options, name: str) -> frozenset[int]:
    """A comma-separated list of HTTP statuses (100 to 599)."""
    statuses = set()
    for item in str(options[name]).split(","):
        if not item.strip():
            continue
        if not item.strip().isdigit() or not 100 <= int(item) <= 599:
            raise usage.UsageError(f"--{name}: expected statuses such as 502,503, got {item.strip()!r}")
        statuses.add(int(item))
    return frozenset(statuses)


def _balancerOptions(options: Options) -> dict[str, str]:
    """The --balancer-option KEY=VALUE settings, checked by building the balancer once."""
    name = options["balancer"]
    factories = balancerFactories()
    if name not in factories:
        raise usage.UsageError(f"--balancer: unknown balancer {name!r}; installed: " + ", ".join(sorted(factories)))
    settings: dict[str, str] = {}
    for setting in options["balancer-option"]:
        key, equals, value = setting.partition("=")
        if not equals or not key.strip():
            raise usage.UsageError(f"--balancer-option: expected KEY=VALUE, got {setting!r}")
        settings[key.strip()] = value.strip()
    try:
        factories[name].build(settings)
    except ValueError as e:
        raise usage.UsageError(f"--balancer-option: {e}") from None
    return settings


def _size(options: Options, name: str) -> int:
    try:
        return parseSize(str(options[name]))
    except ValueError as e:
        raise usage.UsageError(f"--{name}: {e}") from None


def buildSite(
    config: ProxyConfig, reactor: IReactorTime, upstreamURLs: list[str], registry: MemoryRegistry | None = None
) -> tuple[ProxySite, list[Upstream]]:
    """The proxy's site and its upstreams (whose pools shutdown closes), registered in C{registry}."""
    registry = registry or MemoryRegistry()
    upstreams = [Upstream.fromURL(url, reactor, config.pool, config.passive) for url in upstreamURLs]
    for upstream in upstreams:
        registry.add("default", upstream)
    balancer = balancerFactories()[config.balancer].build(config.balancerOptions)
    director = SingleServiceDirector(Service("default", registry, balancer, config.rewriteHost, config.retry))
    forwarding = ForwardingPolicy(parseNetworks(config.trustedProxies), config.viaName.encode("ascii"))
    proxy = Proxy(reactor, director, forwarding)
    return ProxySite(buildResource(proxy), config.client, reactor, config.accessLog), upstreams


def buildService(config: ProxyConfig, reactor: IReactorTime) -> service.MultiService:
    """The proxy's services: a draining shutdown, then one listener per endpoint."""
    top = service.MultiService()
    upstreamURLs = list(config.upstreams)
    if config.demoUpstream is not None:
        from rproxy.demo import demoSite

        strports.service(config.demoUpstream, demoSite()).setServiceParent(top)
        if not upstreamURLs:
            upstreamURLs.append(_localURL(config.demoUpstream))
    registry = MemoryRegistry()
    site, upstreams = buildSite(config, reactor, upstreamURLs, registry)

    def closeUpstreams() -> None:
        for upstream in upstreams:
            upstream.pool.drain("is closing: the proxy is shutting down")

    # Added first so that it is stopped last, after the listeners stop accepting.
    DrainingService([site], config.grace, reactor, closeUpstreams).setServiceParent(top)
    if config.healthCheck is not None:
        HealthChecker(reactor, registry, {"default": config.healthCheck}).setServiceParent(top)
    for endpoint in config.listen:
        strports.service(endpoint, site).setServiceParent(top)
    return top


def _localURL(endpoint: str) -> str:
    """The http:// URL of a local tcp: endpoint string (for the demo upstream)."""
    fields = dict(part.split("=", 1) for part in endpoint.split(":")[2:] if "=" in part)
    port = endpoint.split(":")[1]
    return f"http://{fields.get('interface', '127.0.0.1')}:{port}"


def makeService(options: Options) -> service.MultiService:
    """The entry point of ``twist rproxy``."""
    from twisted.internet import reactor

    return buildService(options.config, reactor)  # type: ignore[arg-type]
