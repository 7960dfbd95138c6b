"""Upstreams (one server each, with its connection pool) and services (sets of interchangeable ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS

from rproxy.upstream.pool import PoolSettings, UpstreamPool

if TYPE_CHECKING:
    from rproxy.interfaces import IBalancer, IRegistry

_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    One upstream server and the pool of connections to it.

    @ivar url: where it is.
    @ivar hostHeader: the ``Host`` to send when a service rewrites it.
    """

    def __init__(self, url: UpstreamURL, pool: UpstreamPool) -> None:
        self.url = url
        self.pool = pool
        self.hostHeader = url.authority.encode("idna")

    @classmethod
    def fromURL(cls, url: str, reactor: IReactorTime, settings: PoolSettings) -> Upstream:
        """An upstream for C{url} with a new pool."""
        parsed = UpstreamURL.parse(url)
        endpoint = parsed.endpoint(reactor, settings.connectTimeout)
        return cls(parsed, UpstreamPool(reactor, endpoint, parsed.authority, settings))

    def __repr__(self) -> str:
        return f"<Upstream {self.url.scheme}://{self.url.authority}{self.url.basePath.decode()}>"


@dataclass(frozen=True)
class Service:
    """
    A named set of interchangeable upstreams and how to choose among them.

    @ivar rewriteHost: send the chosen upstream's host as ``Host`` instead of the client's.
    """

    name: str
    registry: IRegistry
    balancer: IBalancer
    rewriteHost: bool = False
