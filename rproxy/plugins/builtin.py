"""
The built-in balancers, registered as plugins so they are found like anyone else's.

Each module-level L{BalancerFactory} here is one C{--balancer NAME}; docs/plugins.md lists them with their
options.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

from twisted.plugin import IPlugin
from zope.interface import implementer

from rproxy.headers import isToken
from rproxy.interfaces import IBalancer, IBalancerFactory
from rproxy.proxy.balancers import (
    BalancerOptions,
    FirstAvailable,
    LeastConnections,
    PeakEWMA,
    PowerOfTwoChoices,
    RendezvousHash,
    RoundRobin,
    SmoothWeightedRoundRobin,
    StickySessions,
    WeightedRandom,
    balancerFactories,
    hashKey,
)


@implementer(IPlugin, IBalancerFactory)
class BalancerFactory:
    """
    A balancer kind: C{build} reads the options through a L{BalancerOptions}, and any option it did not
    read is an error.
    """

    def __init__(self, name: str, description: str, build: Callable[[BalancerOptions], IBalancer]) -> None:
        self.name = name
        self.description = description
        self._build = build

    def build(self, options: Mapping[str, object]) -> IBalancer:
        reader = BalancerOptions(self.name, options)
        balancer = self._build(reader)
        reader.finish()
        return balancer


def _ewma(options: BalancerOptions) -> IBalancer:
    return PeakEWMA(
        decay=options.number("decay", 10.0),
        penalty=options.number("penalty", 1.0, inclusive=True),
    )


def _hash(options: BalancerOptions) -> IBalancer:
    spec = options.text("key", "client_ip")
    assert spec is not None
    try:
        key = hashKey(spec)
    except ValueError as e:
        raise options.error("key", str(e)) from None
    return RendezvousHash(key)


#: The shortest C{secret} accepted for sticky cookies (bytes of UTF-8).
_MIN_SECRET = 16


def _sticky(options: BalancerOptions) -> IBalancer:
    innerName = options.text("inner", "round_robin")
    innerOptions = options.prefixed("inner.")
    if innerName == "sticky":
        raise options.error("inner", "sticky sessions cannot wrap sticky sessions")
    factories = balancerFactories()
    factory = factories.get(innerName or "")
    if factory is None:
        raise options.error("inner", f"unknown balancer {innerName!r}; installed: {', '.join(sorted(factories))}")
    try:
        inner = factory.build(innerOptions)
    except ValueError as e:
        raise ValueError(f"balancer sticky, inner balancer (options inner.*): {e}") from None
    cookie = (options.text("cookie", "rproxy_sticky") or "").encode("latin-1", "replace")
    if not isToken(cookie):
        raise options.error("cookie", f"must be a cookie name (an HTTP token), got {cookie.decode('latin-1')!r}")
    secret = options.text("secret")
    if secret is None:
        key = secrets.token_bytes(32)  # this process only: see docs/plugins.md
    elif len(secret.encode("utf-8")) < _MIN_SECRET:
        raise options.error("secret", f"must be at least {_MIN_SECRET} characters long")
    else:
        key = secret.encode("utf-8")
    return StickySessions(inner, key, cookie, options.integer("max_age", None, minimum=0))


roundRobin = BalancerFactory("round_robin", "each upstream in turn", lambda options: RoundRobin())
weightedRoundRobin = BalancerFactory(
    "weighted_round_robin",
    "each upstream in turn, in proportion to its weight (smooth, as nginx does it)",
    lambda options: SmoothWeightedRoundRobin(),
)
weightedRandom = BalancerFactory(
    "random", "a random upstream, in proportion to its weight", lambda options: WeightedRandom()
)
leastConnections = BalancerFactory(
    "least_conn", "the fewest exchanges in flight for its weight", lambda options: LeastConnections()
)
powerOfTwoChoices = BalancerFactory(
    "p2c", "the less loaded of two random upstreams", lambda options: PowerOfTwoChoices()
)
peakEWMA = BalancerFactory(
    "ewma", "the lower latency times load of two random upstreams (options: decay, penalty)", _ewma
)
firstAvailable = BalancerFactory(
    "first", "failover: the first available upstream in configured order", lambda options: FirstAvailable()
)
rendezvousHash = BalancerFactory("hash", "consistent hashing on key=client_ip|uri|header:NAME|cookie:NAME", _hash)
stickySessions = BalancerFactory(
    "sticky",
    "sticky sessions by signed cookie over an inner balancer (options: inner, inner.*, cookie, secret, max_age)",
    _sticky,
)
