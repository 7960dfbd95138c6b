"""
rproxy: a streaming HTTP reverse proxy and edge gateway on Twisted.

The public API: L{ReverseProxyResource} (a drop-in for C{twisted.web.proxy}'s), the L{Proxy} it
mounts, the interfaces of the pluggable parts, and the version.
"""

from rproxy._version import __version__
from rproxy.exchange import Exchange, Proxy
from rproxy.interfaces import (
    HealthResult,
    IBalancer,
    IBalancerFactory,
    IDirector,
    IHealthCheck,
    IRegistry,
    IRequestFilter,
    IResponseFilter,
    IStreamingResource,
    Outcome,
)
from rproxy.resource import ReverseProxyResource

__all__ = [
    "Exchange",
    "HealthResult",
    "IBalancer",
    "IBalancerFactory",
    "IDirector",
    "IHealthCheck",
    "IRegistry",
    "IRequestFilter",
    "IResponseFilter",
    "IStreamingResource",
    "Outcome",
    "Proxy",
    "ReverseProxyResource",
    "__version__",
]
