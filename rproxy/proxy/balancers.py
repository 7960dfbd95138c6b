"""
Built-in balancers (each an L{IBalancer}, registered as a plugin in L{rproxy.plugins.builtin}).

Every balancer chooses among the upstreams it is offered (the available set, in configured order) one that
the request has not tried yet, and reads only an upstream's C{key}, C{weight} and C{inFlight}.  Those that
draw at random take a C{random.Random} (seed one in tests); the one that measures time takes a clock
callable (C{time.monotonic} by default, a C{Clock}'s C{seconds} in tests).

L{BalancerOptions} reads a factory's options (strings from the command line, typed values from a TOML
file) with errors that name the balancer and the option; third-party factories may use it too.
"""

from __future__ import annotations

import hmac
import math
import random
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Collection, Mapping, Sequence
from hashlib import blake2b, sha256
from typing import TYPE_CHECKING

from zope.interface import implementer

from rproxy.interfaces import IBalancer, IBalancerFactory, IBalancerState, IResponseFilter, Outcome
from rproxy.options import PluginOptions
from rproxy.proxy.message import InboundRequest, RequestContext
from rproxy.upstream.upstreams import Upstream

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers


class BalancerOptions(PluginOptions):
    """The options given to one balancer (L{PluginOptions} whose errors name the balancer)."""

    def __init__(self, balancer: str, options: Mapping[str, object]) -> None:
        super().__init__("balancer", balancer, options)
        self.balancer = balancer


def _untried(upstreams: Sequence[Upstream], tried: Collection[Upstream]) -> Sequence[Upstream]:
    if not tried:
        return upstreams
    return [upstream for upstream in upstreams if upstream not in tried]


def _weightedChoice(rng: random.Random, candidates: Sequence[Upstream]) -> Upstream:
    """One of C{candidates} (not empty), each with a chance proportional to its weight."""
    if len(candidates) == 1:
        return candidates[0]
    point = rng.random() * sum(upstream.weight for upstream in candidates)
    for upstream in candidates:
        point -= upstream.weight
        if point < 0:
            return upstream
    return candidates[-1]  # rounding left the point at the very end


@implementer(IBalancer)
class RoundRobin:
    """Each upstream in turn, ignoring weights; a retry takes the next one not tried yet."""

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        count = len(upstreams)
        index = self._next % count
        if not tried:
            self._next = index + 1
            return upstreams[index]
        for _ in range(count):
            upstream = upstreams[index]
            index = (index + 1) % count
            if upstream not in tried:
                self._next = index
                return upstream
        return None

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Round robin does not learn."""


@implementer(IBalancer)
class SmoothWeightedRoundRobin:
    """
    Each upstream in proportion to its current weight, interleaved (nginx's smooth weighted round robin).

    Every pick adds each candidate's weight to its running score, takes the highest, and lowers that one
    by the candidates' total: weights 5, 1, 1 give C{a a b a c a a}, never five C{a} in a row.  Because
    it reads the current weight, a host that slow-starts gets its growing share as it grows.
    """

    def __init__(self) -> None:
        self._scores: dict[Upstream, float] = {}

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        scores = self._scores
        if len(scores) > len(upstreams):  # hosts left the set: forget them, or their scores pile up
            kept = set(upstreams)
            self._scores = scores = {upstream: s for upstream, s in scores.items() if upstream in kept}
        best = None
        bestScore = -math.inf
        total = 0.0
        for upstream in upstreams:
            if tried and upstream in tried:
                continue
            weight = upstream.weight
            total += weight
            score = scores.get(upstream, 0.0) + weight
            scores[upstream] = score
            if score > bestScore:
                best = upstream
                bestScore = score
        if best is not None:
            scores[best] = bestScore - total
        return best

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Weighted round robin does not learn."""


@implementer(IBalancer)
class WeightedRandom:
    """A random upstream, each with a chance proportional to its current weight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        candidates = _untried(upstreams, tried)
        if not candidates:
            return None
        return _weightedChoice(self._rng, candidates)

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Random choice does not learn."""


@implementer(IBalancer)
class LeastConnections:
    """
    The upstream with the fewest exchanges in flight for its weight (C{inFlight / weight}).

    Among equally loaded upstreams each has a chance proportional to its weight, so idle traffic still
    follows the weights and no host is favoured for coming first.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        best = None
        bestLoad = math.inf
        tiedWeight = 0.0
        for upstream in upstreams:
            if tried and upstream in tried:
                continue
            weight = upstream.weight
            load = upstream.inFlight / weight
            if load < bestLoad:
                best, bestLoad, tiedWeight = upstream, load, weight
            elif load == bestLoad:
                # Weighted reservoir sampling over the ties: one pass, no list.
                tiedWeight += weight
                if self._rng.random() * tiedWeight < weight:
                    best = upstream
        return best

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Least connections reads in-flight counts, which the exchange keeps."""


def _twoChoices(rng: random.Random, candidates: Sequence[Upstream]) -> tuple[Upstream, Upstream]:
    """Two different upstreams of C{candidates} (at least two), drawn in proportion to their weights."""
    weights = [upstream.weight for upstream in candidates]
    total = sum(weights)
    first = _drawIndex(rng.random() * total, weights, -1)
    second = _drawIndex(rng.random() * (total - weights[first]), weights, first)
    return candidates[first], candidates[second]


def _drawIndex(point: float, weights: Sequence[float], skip: int) -> int:
    """The index whose stretch of the weights' running sum holds C{point}, leaving out index C{skip}."""
    last = -1
    for index, weight in enumerate(weights):
        if index == skip:
            continue
        point -= weight
        last = index
        if point < 0:
            break
    return last  # also when rounding left the point at the very end


@implementer(IBalancer)
class PowerOfTwoChoices:
    """
    Two upstreams drawn at random (in proportion to their weights); the one with fewer exchanges in flight
    for its weight takes the request.

    Nearly as good as scanning for the least loaded, and without the herd: several proxies (or worker
    processes) with their own counts do not all pile onto the same idle host.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        candidates = _untried(upstreams, tried)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        first, second = _twoChoices(self._rng, candidates)
        if second.inFlight / second.weight < first.inFlight / first.weight:
            return second
        return first

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Two choices read in-flight counts, which the exchange keeps."""


#: The smallest latency (seconds) a cost is computed with, so that in-flight counts still tell idle
#: hosts apart before any latency is known.
_LATENCY_FLOOR = 1e-4


@implementer(IBalancer, IBalancerState)
class PeakEWMA:
    """
    Latency-aware: of two upstreams drawn at random, the one with the lower expected cost takes the request.

    An upstream's cost is its moving average of latency (seconds to the response head) times its exchanges
    in flight plus one, over its weight.  The average is I{peak-sensitive}: a latency above it replaces it at
    once, one below pulls it down with a weight that grows with the time since the last sample
    (C{1 - exp(-elapsed / decay)}), so a host turns from fast to slow at once and from slow to fast over
    about C{decay} seconds.  It also decays towards zero while the host gets no samples, so a host shunned
    for being slow is tried again later instead of being starved for good.

    A failed attempt (an error, or a 5xx status) counts as a latency of at least C{penalty} seconds: a
    host that fails fast must not look fast.  A host with no samples yet is valued at the average of all
    samples of the service, so it gets its share at once without being flooded.
    """

    def __init__(
        self,
        decay: float = 10.0,
        penalty: float = 1.0,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.decay = decay
        self.penalty = penalty
        self._now = now
        self._rng = rng or random.Random()
        self._stats: dict[Upstream, list[float]] = {}  # upstream -> [average latency, when it was last updated]
        self._serviceAverage = 0.0
        self._serviceStamp: float | None = None

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        if len(self._stats) > 2 * len(upstreams) + 16:  # hosts came and went: drop the old ones
            kept = set(upstreams)
            self._stats = {upstream: stats for upstream, stats in self._stats.items() if upstream in kept}
        candidates = _untried(upstreams, tried)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        first, second = _twoChoices(self._rng, candidates)
        now = self._now()
        return second if self._cost(second, now) < self._cost(first, now) else first

    def cost(self, upstream: Upstream) -> float:
        """What sending one more request to C{upstream} is expected to cost now (for tests and the admin view)."""
        return self._cost(upstream, self._now())

    def describe(self, upstream: Upstream) -> Mapping[str, float | int | str] | None:
        """Its latency estimate of C{upstream} (milliseconds, decayed to now) and the cost it would pick by."""
        stats = self._stats.get(upstream)
        if stats is None:
            return None
        elapsed = max(0.0, self._now() - stats[1])
        latency = stats[0] * math.exp(-elapsed / self.decay)
        cost = (latency + _LATENCY_FLOOR) * (upstream.inFlight + 1) / upstream.weight
        return {"latency_ms": round(latency * 1000, 3), "cost": round(cost, 6)}

    def _cost(self, upstream: Upstream, now: float) -> float:
        stats = self._stats.get(upstream)
        if stats is None:  # valued at the service's average, drifting towards zero as a sampled host's does
            stamp = self._serviceStamp
            latency = 0.0 if stamp is None else self._serviceAverage * math.exp(-max(now - stamp, 0.0) / self.decay)
        else:
            average, stamp = stats
            elapsed = now - stamp
            if elapsed > 0:  # no sample since: drift towards zero
                average *= math.exp(-elapsed / self.decay)
                stats[0] = average
                stats[1] = now
            latency = average
        return (latency + _LATENCY_FLOOR) * (upstream.inFlight + 1) / upstream.weight

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        latency = max(outcome.latency, 0.0)
        if outcome.error is not None or (outcome.status is not None and outcome.status >= 500):
            latency = max(latency, self.penalty)
        now = self._now()
        stats = self._stats.get(upstream)
        if stats is None:
            self._stats[upstream] = [latency, now]
        else:
            stats[0] = self._blend(stats[0], latency, now - stats[1])
            stats[1] = now
        stamp = self._serviceStamp
        self._serviceAverage = latency if stamp is None else self._blend(self._serviceAverage, latency, now - stamp)
        self._serviceStamp = now

    def _blend(self, average: float, sample: float, elapsed: float) -> float:
        if sample >= average:
            return sample
        keep = math.exp(-max(elapsed, 0.0) / self.decay)
        return average * keep + sample * (1 - keep)


def _blake(data: bytes) -> blake2b:
    return blake2b(data, digest_size=8)


@implementer(IBalancer)
class RendezvousHash:
    """
    Consistent hashing: requests with the same key go to the same upstream while it is available.

    Weighted rendezvous (highest random weight) hashing: each upstream scores the key with a hash of its
    own C{key} and the request's, scaled by its weight (C{-weight / ln(score)}), and the best score wins.
    Adding an upstream to N moves only the keys it now wins, about 1/(N+1) of them; removing one moves only
    its own.  A retry takes the best of the upstreams not tried yet, which is the next in the key's order.
    A request without a key (say, without the header) goes to a weighted random upstream.
    """

    def __init__(self, key: Callable[[InboundRequest], bytes | None], rng: random.Random | None = None) -> None:
        self._key = key
        self._rng = rng or random.Random()
        self._seeds: dict[Upstream, blake2b] = {}

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        key = self._key(request)
        if key is None:
            candidates = _untried(upstreams, tried)
            return _weightedChoice(self._rng, candidates) if candidates else None
        return self.order(upstreams, key, tried)

    def order(self, upstreams: Sequence[Upstream], key: bytes, tried: Collection[Upstream] = ()) -> Upstream | None:
        """The upstream that C{key} goes to among C{upstreams}, leaving out C{tried}."""
        seeds = self._seeds
        if len(seeds) > 2 * len(upstreams) + 16:  # hosts came and went: drop the old ones
            kept = set(upstreams)
            self._seeds = seeds = {upstream: seed for upstream, seed in seeds.items() if upstream in kept}
        best = None
        bestScore = -math.inf
        log = math.log
        for upstream in upstreams:
            if tried and upstream in tried:
                continue
            seed = seeds.get(upstream)
            if seed is None:
                seeds[upstream] = seed = _blake(upstream.key.encode("utf-8") + b"\0")
            digest = seed.copy()
            digest.update(key)
            # 53 bits of the hash as a float strictly between 0 and 1.
            unit = ((int.from_bytes(digest.digest(), "big") >> 11) + 0.5) * 2.0**-53
            score = -upstream.weight / log(unit)
            if score > bestScore:
                best = upstream
                bestScore = score
        return best

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Hashing does not learn."""


def _cookie(headers: Headers, name: bytes) -> bytes | None:
    """The value of cookie C{name} in the request's C{Cookie} fields (HTTP/2 may send several)."""
    for field in headers.getRawHeaders(b"cookie") or ():
        for pair in field.split(b";"):
            key, equals, value = pair.partition(b"=")
            if equals and key.strip() == name:
                return value.strip()
    return None


def hashKey(spec: str) -> Callable[[InboundRequest], bytes | None]:
    """
    The function that reads a request's hash key, as C{spec} names it.

    C{client_ip}: the client's address; C{uri}: the request-target (path and query);
    C{header:NAME}: the field's values; C{cookie:NAME}: the cookie's value.  It returns C{None}
    when the request lacks the key.  Raise C{ValueError} for any other C{spec}.
    """
    kind, colon, name = spec.partition(":")
    if spec == "client_ip":
        return lambda request: request.clientHost.encode("ascii") if request.clientHost else None
    if spec == "uri":
        return lambda request: request.target
    if colon and name and kind == "header":
        field = name.encode("latin-1")

        def header(request: InboundRequest) -> bytes | None:
            values = request.headers.getRawHeaders(field)
            return b"\n".join(values) if values else None

        return header
    if colon and name and kind == "cookie":
        cookieName = name.encode("latin-1")
        return lambda request: _cookie(request.headers, cookieName)
    raise ValueError(f"expected client_ip, uri, header:NAME or cookie:NAME, got {spec!r}")


@implementer(IBalancer)
class FirstAvailable:
    """Failover: the first upstream in configured order that is available and not tried yet."""

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        for upstream in upstreams:
            if not tried or upstream not in tried:
                return upstream
        return None

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        """Failover order does not learn; health checks and ejection take hosts out of it."""


#: What the signed cookie's token is derived with, so that it means nothing outside sticky sessions.
_STICKY_CONTEXT = b"rproxy sticky session\0"


@implementer(IBalancer, IResponseFilter)
class StickySessions:
    """
    Sticky sessions: a client that was sent to an upstream keeps going there, through a signed cookie.

    The cookie holds an HMAC-SHA256 of a hash of the upstream's key, so it reveals nothing about the
    upstream and cannot be forged without the secret.  A request with a valid cookie for an available
    upstream it has not tried goes there; any other request (no cookie, a forged or stale one, its host
    gone or already tried) is balanced by C{inner}, and the response sets the cookie to the upstream that
    answered.

    @ivar cookieName: the cookie's name.
    @ivar maxAge: the cookie's C{Max-Age} in seconds, or C{None} for a cookie that ends with the session.
    """

    def __init__(
        self, inner: IBalancer, secret: bytes, cookieName: bytes = b"rproxy_sticky", maxAge: int | None = None
    ) -> None:
        self.inner = inner
        self.cookieName = cookieName
        self.maxAge = maxAge
        self._secret = secret
        self._tokens: dict[str, bytes] = {}
        self._filter = IResponseFilter(inner, None)

    def token(self, upstream: Upstream) -> bytes:
        """The cookie value that sends a client to C{upstream}."""
        token = self._tokens.get(upstream.key)
        if token is None:
            if len(self._tokens) >= 1024:  # hosts came and went: the cache is cheap to rebuild
                self._tokens.clear()
            digest = sha256(upstream.key.encode("utf-8")).digest()
            mac = hmac.new(self._secret, _STICKY_CONTEXT + digest, sha256).digest()
            token = self._tokens[upstream.key] = urlsafe_b64encode(mac).rstrip(b"=")
        return token

    def _pinned(self, upstreams: Sequence[Upstream], request: InboundRequest) -> Upstream | None:
        """The upstream the request's cookie names, if it is valid and names one of C{upstreams}."""
        cookie = _cookie(request.headers, self.cookieName)
        if not cookie:
            return None
        for upstream in upstreams:
            if hmac.compare_digest(self.token(upstream), cookie):
                return upstream
        return None

    def pick(
        self, upstreams: Sequence[Upstream], request: InboundRequest, tried: Collection[Upstream]
    ) -> Upstream | None:
        pinned = self._pinned(upstreams, request)
        if pinned is not None and pinned not in tried:
            return pinned
        return self.inner.pick(upstreams, request, tried)

    def report(self, upstream: Upstream, outcome: Outcome) -> None:
        self.inner.report(upstream, outcome)

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Set the cookie to the upstream that answered, unless the request's cookie already names it."""
        if self._filter is not None:
            self._filter.onResponse(context, status, headers)
        upstream = context.upstream
        if upstream is None:
            return
        token = self.token(upstream)
        cookie = _cookie(context.inbound.headers, self.cookieName)
        if cookie is not None and hmac.compare_digest(token, cookie):
            return
        attributes = [self.cookieName + b"=" + token, b"Path=/", b"HttpOnly", b"SameSite=Lax"]
        if self.maxAge is not None:
            attributes.append(b"Max-Age=%d" % self.maxAge)
        if context.inbound.scheme == b"https":
            attributes.append(b"Secure")
        headers.append((b"Set-Cookie", b"; ".join(attributes)))


def balancerFactories() -> dict[str, IBalancerFactory]:
    """Every installed balancer kind by name: the built-in ones and third parties' plugins."""
    from twisted.plugin import getPlugins

    import rproxy.plugins

    return {factory.name: factory for factory in getPlugins(IBalancerFactory, rproxy.plugins)}
