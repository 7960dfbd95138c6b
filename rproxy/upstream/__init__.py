"""Upstreams (one server each, with its connection pool) and services (sets of interchangeable ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS

from rproxy.health import PassivePolicy, UpstreamHealth
from rproxy.retry import RetryPolicy
from rproxy.upstream.pool import PoolSettings, UpstreamPool

if TYPE_CHECKING:
    from rproxy.interfaces import IBalancer, IRegistry

_DEFAULT_PORTS = {"http": 80, "https": 443}


def splitWeight(spec: str) -> tuple[str, int]:
    """Split C{"http://h:9000/base#weight=3"} into the URL and its weight (1 when not given)."""
    url, hash, fragment = spec.partition("#")
    if not hash:
        return url, 1
    name, equals, value = fragment.partition("=")
    if name != "weight" or not equals:
        raise ValueError(f"upstream {spec!r}: the only setting after '#' is weight=N")
    try:
        weight = int(value)
    except ValueError:
        raise ValueError(f"upstream {spec!r}: weight must be a whole number, not {value!r}") from None
    if not 1 <= weight <= 1000:
        raise ValueError(f"upstream {spec!r}: weight must be from 1 to 1000, not {weight}")
    return url, weight


@dataclass(frozen=True)
class UpstreamURL:
    """A parsed upstream URL: C{scheme://host:port/base} (the base path is prefixed to every target)."""

    scheme: str
    host: str
    port: int
    basePath: bytes

    @classmethod
    def parse(cls, url: str) -> UpstreamURL:
        """Parse C{url}; raise C{ValueError} saying what is wrong with it."""
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"upstream {url!r}: scheme must be http or https, not {parts.scheme!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"upstream {url!r}: no query, fragment or credentials allowed")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValueError(f"upstream {url!r}: invalid port") from None
        if not parts.hostname:
            raise ValueError(f"upstream {url!r}: no host")
        return cls(parts.scheme, parts.hostname, port, parts.path.encode("ascii"))

    @property
    def authority(self) -> str:
        """C{host:port}, the port left out when it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    @property
    def requestScheme(self) -> bytes:
        """The scheme requests to it carry (HTTP/2's ``:scheme``)."""
        return b"https" if self.scheme == "https" else b"http"

    def endpoint(self, reactor: IReactorTime, timeout: float) -> IStreamClientEndpoint:
        """A client endpoint for this upstream (TLS verified against the host name for https)."""
        tcp: IStreamClientEndpoint
        if isIPAddress(self.host):
            tcp = endpoints.TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        elif isIPv6Address(self.host):
            tcp = endpoints.TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        else:
            tcp = endpoints.HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.scheme == "https":
            return endpoints.wrapClientTLS(optionsForClientTLS(self.host), tcp)
        return tcp


class Upstream:
    """
    One upstream server, the pool of connections to it, and its health.

    Balancers read C{key}, C{weight} and C{inFlight}; nothing else about an upstream is theirs to use.

    @ivar url: where it is.
    @ivar key: a stable name for it (its URL), what hashing balancers hash.
    @ivar configuredWeight: its share of traffic relative to the service's other upstreams.
    @ivar inFlight: exchanges using it now.
    @ivar health: passive ejection, active check verdicts, slow start.
    @ivar hostHeader: the ``Host`` to send when a service rewrites it.
    """

    def __init__(self, url: UpstreamURL, pool: UpstreamPool, health: UpstreamHealth, weight: int = 1) -> None:
        if weight < 1:
            raise ValueError(f"upstream {url.authority}: weight must be at least 1, not {weight}")
        self.url = url
        self.key = f"{url.scheme}://{url.authority}{url.basePath.decode('ascii')}"
        self.pool = pool
        self.health = health
        self.configuredWeight = weight
        self.inFlight = 0
        self.hostHeader = url.authority.encode("idna")

    @classmethod
    def fromURL(
        cls,
        url: str,
        reactor: IReactorTime,
        settings: PoolSettings,
        passive: PassivePolicy | None = None,
    ) -> Upstream:
        """An upstream for C{url} (which may end in C{#weight=N}) with a new pool."""
        url, weight = splitWeight(url)
        parsed = UpstreamURL.parse(url)
        endpoint = parsed.endpoint(reactor, settings.connectTimeout)
        pool = UpstreamPool(reactor, endpoint, parsed.authority, settings)
        return cls(parsed, pool, UpstreamHealth(reactor, passive or PassivePolicy()), weight)

    @property
    def weight(self) -> float:
        """The weight it has now: the configured one, scaled down while it slow-starts after a return."""
        return self.configuredWeight * self.health.weightFactor()

    def __repr__(self) -> str:
        return f"<Upstream {self.key}>"


@dataclass(frozen=True)
class Service:
    """
    A named set of interchangeable upstreams and how to choose among them.

    @ivar rewriteHost: send the chosen upstream's host as ``Host`` instead of the client's.
    @ivar retry: when a failed attempt is tried again on another upstream.
    """

    name: str
    registry: IRegistry
    balancer: IBalancer
    rewriteHost: bool = False
    retry: RetryPolicy = RetryPolicy()
