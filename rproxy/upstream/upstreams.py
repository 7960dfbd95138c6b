"""Upstreams: one server each, named by a URL whose scheme says the protocol, with its connection pool and health."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import parse_qsl, urlsplit

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from rproxy.health.state import PassivePolicy, UpstreamHealth
from rproxy.upstream.pool import HTTP1, HTTP2, NEGOTIATED, UpstreamPool
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.tls import UpstreamTLS, connectionCreator

#: The share of its moving average an upstream's latest response-head latency takes: the average follows the
#: last ten responses or so, enough to smooth one slow answer and short enough to show a trend within seconds.
LATENCY_SMOOTHING = 0.2


@dataclass(frozen=True)
class _Scheme:
    """What an upstream URL's scheme means: default port, TLS, the protocol and what ALPN offers."""

    port: int
    tls: bool
    protocol: str
    alpn: tuple[bytes, ...] = ()


#: The upstream URL schemes (see docs/upstreams.md).
SCHEMES = {
    "http": _Scheme(80, False, HTTP1),
    "h2c": _Scheme(80, False, HTTP2),
    "https": _Scheme(443, True, NEGOTIATED, (b"h2", b"http/1.1")),
    "https+h1": _Scheme(443, True, HTTP1, (b"http/1.1",)),
    "https+h2": _Scheme(443, True, HTTP2, (b"h2",)),
}


#: A label's name: lower-case letters, digits, C{_}, C{-} and C{.}, starting with a letter.
_LABEL_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}\Z")
#: A label's value: up to 200 visible ASCII characters (it is shown in the admin API, logs and metrics' help).
_LABEL_VALUE = re.compile(r"[\x21-\x7e]{0,200}\Z")


def splitSettings(spec: str) -> tuple[str, int, Mapping[str, str]]:
    """
    Split C{"http://h:9000/base#weight=3&zone=a"} into the URL, its weight (1 when not given) and its labels
    (the other C{name=value} pairs after C{#}, percent-decoded), raising C{ValueError} saying what is wrong.
    """
    url, hash, fragment = spec.partition("#")
    if not hash:
        return url, 1, _NO_LABELS
    try:
        pairs = parse_qsl(fragment, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"upstream {spec!r}: after '#', give name=value pairs joined by '&'") from None
    weight, labels, seen = 1, {}, set()
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"upstream {spec!r}: {name!r} is given twice")
        seen.add(name)
        if name == "weight":
            weight = _weight(spec, value)
        elif not _LABEL_NAME.match(name):
            raise ValueError(
                f"upstream {spec!r}: label {name!r}: a name is a lower-case letter, then letters, digits, _ . -"
            )
        elif not _LABEL_VALUE.match(value):
            raise ValueError(f"upstream {spec!r}: label {name!r}: a value is at most 200 visible ASCII characters")
        else:
            labels[name] = value
    return url, weight, MappingProxyType(labels)


def _weight(spec: str, value: str) -> int:
    try:
        weight = int(value)
    except ValueError:
        raise ValueError(f"upstream {spec!r}: weight must be a whole number, not {value!r}") from None
    if not 1 <= weight <= 1000:
        raise ValueError(f"upstream {spec!r}: weight must be from 1 to 1000, not {weight}")
    return weight


_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class UpstreamURL:
    """
    A parsed upstream URL: C{scheme://host:port/base} (the base path is prefixed to every target).

    @ivar tls: the TLS settings its connections use, for the https schemes.
    """

    scheme: str
    host: str
    port: int
    basePath: bytes
    tls: UpstreamTLS = field(default_factory=UpstreamTLS)

    @classmethod
    def parse(cls, url: str) -> UpstreamURL:
        """Parse C{url}; raise C{ValueError} saying what is wrong with it."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            known = ", ".join(SCHEMES)
            raise ValueError(f"upstream {url!r}: scheme must be one of {known}, not {parts.scheme!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"upstream {url!r}: no query, fragment or credentials allowed")
        try:
            port = parts.port or SCHEMES[parts.scheme].port
        except ValueError:
            raise ValueError(f"upstream {url!r}: invalid port") from None
        if not parts.hostname:
            raise ValueError(f"upstream {url!r}: no host")
        return cls(parts.scheme, parts.hostname, port, parts.path.encode("ascii"))

    @property
    def authority(self) -> str:
        """C{host:port}, the port left out when it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == SCHEMES[self.scheme].port:
            return host
        return f"{host}:{self.port}"

    @property
    def requestScheme(self) -> bytes:
        """The scheme requests to it carry (HTTP/2's ``:scheme``)."""
        return b"https" if SCHEMES[self.scheme].tls else b"http"

    def endpoint(self, reactor: IReactorTime, timeout: float, alpn: Sequence[bytes] = ()) -> IStreamClientEndpoint:
        """
        A client endpoint for this upstream (for the https schemes, TLS as L{tls} says, offering C{alpn}:
        by default nothing, so that the server speaks HTTP/1.1, for clients such as health checks).
        """
        tcp: IStreamClientEndpoint
        if isIPAddress(self.host):
            tcp = endpoints.TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        elif isIPv6Address(self.host):
            tcp = endpoints.TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        else:
            tcp = endpoints.HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if SCHEMES[self.scheme].tls:
            return endpoints.wrapClientTLS(connectionCreator(self.host, self.tls, alpn), tcp)
        return tcp

    def pool(self, reactor: IReactorTime, settings: PoolSettings) -> UpstreamPool:
        """A new pool of connections to this upstream, in the protocol its scheme says."""
        scheme = SCHEMES[self.scheme]
        endpoint = self.endpoint(reactor, settings.connectTimeout, scheme.alpn)
        return UpstreamPool(reactor, endpoint, self.authority, settings, scheme.protocol, scheme.tls)


class Upstream:
    """
    One upstream server, the pool of connections to it, and its health.

    Balancers read C{key}, C{weight}, C{inFlight} and C{labels}; nothing else about an upstream is theirs to use.

    @ivar url: where it is.
    @ivar key: a stable name for it (its URL), what hashing balancers hash.
    @ivar configuredWeight: its share of traffic relative to the service's other upstreams.
    @ivar inFlight: exchanges using it now.
    @ivar health: passive ejection, active check verdicts, slow start.
    @ivar hostHeader: the ``Host`` to send when a service rewrites it.
    @ivar labels: what its URL says of it after C{#} besides its weight (C{#zone=a&canary=true}): names to
        values, for balancers (zone- or canary-aware), the admin API and the status page.
    @ivar latency: the moving average of the seconds from sending a request to it to its response head
        (C{None} until one came), for people and the admin API (balancers that learn keep their own).
    """

    def __init__(
        self,
        url: UpstreamURL,
        pool: UpstreamPool,
        health: UpstreamHealth,
        weight: int = 1,
        labels: Mapping[str, str] = _NO_LABELS,
    ) -> None:
        if weight < 1:
            raise ValueError(f"upstream {url.authority}: weight must be at least 1, not {weight}")
        self.url = url
        self.key = f"{url.scheme}://{url.authority}{url.basePath.decode('ascii')}"
        self.pool = pool
        self.health = health
        self.configuredWeight = weight
        self.labels = labels
        self.inFlight = 0
        self.hostHeader = url.authority.encode("idna")
        self.latency: float | None = None

    @classmethod
    def fromURL(
        cls,
        url: str,
        reactor: IReactorTime,
        settings: PoolSettings,
        passive: PassivePolicy | None = None,
    ) -> Upstream:
        """An upstream for C{url} (which may end in C{#weight=N&label=value...}) with a new pool."""
        url, weight, labels = splitSettings(url)
        parsed = replace(UpstreamURL.parse(url), tls=settings.tls)
        health = UpstreamHealth(reactor, passive or PassivePolicy())
        return cls(parsed, parsed.pool(reactor, settings), health, weight, labels)

    @property
    def weight(self) -> float:
        """The weight it has now: the configured one, scaled down while it slow-starts after a return."""
        return self.configuredWeight * self.health.weightFactor()

    def responded(self, latency: float) -> None:
        """An attempt on it got its response head C{latency} seconds after it was sent: fold that into L{latency}."""
        average = self.latency
        self.latency = latency if average is None else average + LATENCY_SMOOTHING * (latency - average)

    def __repr__(self) -> str:
        return f"<Upstream {self.key}>"
