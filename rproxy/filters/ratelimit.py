"""
Limits on how fast and how much at once: C{rate-limit} (token buckets) and C{concurrency-limit} (requests in flight).

Both count per key: the client's address (after the trusted-proxy rules), a request field, a claim an
authenticating filter verified, or one count for the whole route.  Both keep their key table bounded, so
that a flood of distinct keys costs a fixed amount of memory, and both answer an excess with 429 and
C{Retry-After}.

C{rate-limit} refills its buckets lazily, when a request arrives (no timer per key), and advertises its
policy and the state of the request's bucket in the C{RateLimit-Policy} and C{RateLimit} fields of
draft-ietf-httpapi-ratelimit-headers (draft 11), on its refusals and on the responses to the requests it let
through.

C{concurrency-limit} holds a slot from the request until its exchange ends, however it ends (the body
complete, an error answered, the client gone): it asks the context to be told (L{RequestContext.whenEnded}).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from rproxy.downstream.limits import addressKey
from rproxy.errors import Fault, ProxyError, clientError, proxyError
from rproxy.interfaces import FilterEnvironment, IRequestFilter, IResponseFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, RequestContext

if TYPE_CHECKING:
    from rproxy.cluster.ratelimit import SharedRateLimit

_log = Logger()

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token: a field name
_PRINTABLE = re.compile(r"[\x20-\x7e]{1,100}")  # what a structured-field String may hold

#: The default bound of a key table.
MAX_KEYS = 100_000

#: How far below a whole token a bucket may be and still count as holding it: a clock reading near 1.7e9
#: seconds is exact only to 0.24 microseconds, a visible fraction of a token at high rates.
TOLERANCE = 1e-3

#: The least seconds between two warnings that a full key table forgot buckets that were not full.
_WARN_EVERY = 60.0

#: How much of an IPv6 client address is its key by default: a /64 is one subscriber's (RFC 6177), and a host
#: may take any of its addresses, each a fresh bucket if counted one by one.
IPV6_PREFIX = 64

#: A request's key: bytes for a known key, C{None} for the requests without one (when they share a count).
Key = bytes | None


@dataclass(frozen=True)
class Rate:
    """
    A rate as configured: C{quota} requests every C{window} seconds, both whole numbers (for C{RateLimit-Policy}).

    @ivar text: the rate as people read it (C{"100/s"}, C{"600/m"}, C{"0.5/s"}).
    """

    text: str
    quota: int
    window: int

    @property
    def perSecond(self) -> float:
        """Requests per second."""
        return self.quota / self.window


def parseRate(value: object) -> Rate:
    """
    Parse C{"100/s"}, C{"600/m"}, C{"10/h"}, C{"0.5/s"} or a number of requests per second (C{5}, C{2.5}, C{"5"}).

    @raise ValueError: if C{value} is none of those, or not above zero.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be above zero, got {value!r}")
        count, unit = Fraction(repr(value)), "s"
        text = f"{value:g}/s"
    elif isinstance(value, str) and (match := _RATE.fullmatch(value)):
        count, unit = Fraction(match.group(1)), match.group(2) or "s"
        text = f"{match.group(1)}/{unit}"
        if count <= 0:
            raise ValueError(f"must be above zero, got {value!r}")
    else:
        raise ValueError(f"not a rate: {value!r} (examples: 100/s, 600/m, 10/h, 0.5/s, 20)")
    # count/unit as a ratio of whole numbers: 0.5/s is 1 every 2 seconds, 1.5/m is 3 every 120.
    return Rate(text, count.numerator, count.denominator * _UNIT_SECONDS[unit])


@dataclass(frozen=True)
class KeyRule:
    """
    What a limit counts by, from its C{key} and C{missing-key} options.

    @ivar kind: C{"client"}, C{"route"}, C{"header"} or C{"claim"}.
    @ivar name: the field's or the claim's name, for C{header} and C{claim}.
    @ivar deny: whether a request without a key is refused (else the requests without one share a count).
    @ivar ipv6Prefix: for C{client}, the length of the network an IPv6 address is counted by (128: itself).
    """

    kind: str
    name: str = ""
    deny: bool = False
    ipv6Prefix: int = IPV6_PREFIX

    @classmethod
    def parse(cls, text: str, deny: bool = False, ipv6Prefix: int = IPV6_PREFIX) -> KeyRule:
        """The rule of a C{key} option: C{client}, C{route}, C{header:NAME} or C{claim:NAME}."""
        kind, colon, name = text.strip().partition(":")
        kind, name = kind.strip().lower(), name.strip()
        if kind in ("client", "route") and not colon:
            return cls(kind, deny=deny, ipv6Prefix=ipv6Prefix)
        if kind == "header" and _TOKEN.fullmatch(name):
            return cls(kind, name, deny, ipv6Prefix)
        if kind == "claim" and name:
            return cls(kind, name, deny, ipv6Prefix)
        raise ValueError(f"not a key: {text!r} (one of client, route, header:NAME, claim:NAME)")

    @property
    def text(self) -> str:
        """The rule as configured (C{"client"}, C{"header:X-Api-Key"})."""
        return f"{self.kind}:{self.name}" if self.name else self.kind

    def keyOf(self, context: RequestContext) -> Key:
        """
        The key of the request of C{context}, or C{None} if it has none.  Field and claim values are kept
        as a digest: a key costs the same memory whatever its length, and a table of them holds no secret.
        """
        if self.kind == "client":
            client = context.client
            if client is None:
                return None
            return addressKey(client, self.ipv6Prefix) if ":" in client else client.encode("ascii", "replace")
        if self.kind == "route":
            return b""
        if self.kind == "header":
            values = context.inbound.headers.getRawHeaders(self.name.lower().encode("ascii"))
            value = b", ".join(values) if values else b""
        else:
            claim = context.claims.get(self.name)
            scalar = isinstance(claim, str | int | float)  # a list or an object is no key
            value = str(claim).encode("utf-8", "surrogatepass") if scalar else b""
        return hashlib.blake2b(value, digest_size=16).digest() if value else None

    def describe(self, key: Key) -> str:
        """Whose count C{key} is, for a refusal's reason: never a field's or a claim's value."""
        if self.kind == "route":
            return "this route (one count for all requests)"
        if key is None:
            return f"requests without {self._what()} (one count for them all)"
        if self.kind == "client":
            return f"client {key.decode('ascii')}"
        return f"{self.kind} {self.name}"

    def missingReason(self, what: str) -> str:
        """Why a request without a key is refused: C{"no header X-Api-Key to rate-limit on"}."""
        return f"no {self._what()} to {what} on"

    def _what(self) -> str:
        return "client address" if self.kind == "client" else f"{self.kind} {self.name}"


def readKeyRule(reader: PluginOptions) -> KeyRule:
    """The C{key}, C{missing-key} and C{ipv6-prefix} options of a limit."""
    missing = reader.text("missing-key", "shared")
    if missing not in ("shared", "deny"):
        raise reader.error("missing-key", f"expected shared or deny, got {missing!r}")
    ipv6Prefix = reader.integer("ipv6-prefix", IPV6_PREFIX, minimum=1)
    assert ipv6Prefix is not None
    if ipv6Prefix > 128:
        raise reader.error("ipv6-prefix", f"must be at most 128, got {ipv6Prefix}")
    try:
        return KeyRule.parse(reader.text("key", "client") or "client", deny=missing == "deny", ipv6Prefix=ipv6Prefix)
    except ValueError as e:
        raise reader.error("key", str(e)) from None


def _readMaxKeys(reader: PluginOptions) -> int:
    maxKeys = reader.integer("max-keys", MAX_KEYS, minimum=1)
    assert maxKeys is not None
    return maxKeys


class _Bucket:
    """The tokens of one key, as of C{updated} (the clock's seconds)."""

    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


@implementer(IRequestFilter, IResponseFilter)
class RateLimit:
    """
    Token buckets per key: each holds up to C{burst} tokens and gains C{rate} of them a second; a request
    takes one, or is refused with 429 when there is none.

    The buckets are kept in least-recently-used order, at most C{maxKeys} of them.  A full bucket is the
    same as a missing one, so full buckets at the old end are dropped as new keys come; when the table is
    full all the same, the least recently used bucket is forgotten even if it was not full (its key starts
    again with a full bucket: a flood of keys can loosen the limit of keys idle since, never of those it
    refuses, which stay at the recent end).

    @ivar rate: the rate buckets refill at.
    @ivar burst: the most tokens a bucket holds.
    @ivar key: what it counts by.
    @ivar maxKeys: the most buckets it keeps.
    @ivar policyName: the policy's name in the C{RateLimit-Policy} and C{RateLimit} fields.
    @ivar forgotten: how many buckets that were not full were forgotten to make room.
    @ivar tolerance: how far below a whole token a bucket may be and still count as holding it (L{TOLERANCE}).
    """

    consumes: frozenset[bytes] = frozenset()
    tolerance = TOLERANCE

    def __init__(
        self,
        rate: Rate,
        clock: IReactorTime,
        burst: int | None = None,
        key: KeyRule = KeyRule("client"),
        maxKeys: int = MAX_KEYS,
        policyName: str | None = None,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate.perSecond))
        self.key = key
        self.maxKeys = maxKeys
        self.policyName = policyName or f"{rate.text} burst {self.burst} per {key.text}"
        self.forgotten = 0
        self._clock = clock
        self._perSecond = rate.perSecond
        self._buckets: OrderedDict[Key, _Bucket] = OrderedDict()
        self._warnedAt: float | None = None
        self._note = f"rate-limit {self.policyName}"
        self._item = _structuredString(self.policyName)
        self._policyField = (b"RateLimit-Policy", b"%s;q=%d;w=%d" % (self._item, rate.quota, rate.window))

    def __repr__(self) -> str:
        return f"<RateLimit {self.policyName!r}>"

    @property
    def keyCount(self) -> int:
        """How many buckets it keeps now."""
        return len(self._buckets)

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        key = self.key.keyOf(context)
        if key is None and self.key.deny:
            return self.missingKey()
        return self.decide(context, key, *self.take(key))

    def missingKey(self) -> ProxyError:
        """The refusal of a request without a key, when C{missing-key = "deny"}."""
        return clientError(429, self.key.missingReason("rate-limit"))

    def take(self, key: Key) -> tuple[bool, float]:
        """
        Take a token from C{key}'s bucket in this instance's memory, if it holds one: whether it did, and the
        tokens left.
        """
        bucket = self._bucket(key, self._clock.seconds())
        if bucket.tokens < 1 - self.tolerance:
            return False, bucket.tokens
        bucket.tokens -= 1
        return True, bucket.tokens

    def decide(self, context: RequestContext, key: Key, allowed: bool, tokens: float) -> FilterVerdict:
        """
        The verdict on the request of C{context} once its bucket (kept here or in a shared store) said whether it
        had a token for it, C{allowed}, and how many it holds now, C{tokens}: the 429 with its fields, or
        C{None} with the fields noted for the response.
        """
        if not allowed:
            wait = max(1, math.ceil((1 - tokens) / self._perSecond))
            reason = f"rate limit {self.rate.text} (burst {self.burst}) exceeded for {self.key.describe(key)}"
            state = (b"RateLimit", b"%s;r=0;t=%d" % (self._item, wait))
            return ProxyError(429, reason, Fault.CLIENT, "http_request_error", wait, [self._policyField, state])
        remaining = math.floor(tokens + self.tolerance)
        # Until one more request is allowed: the bucket's next whole token (it is not full, one was just taken).
        untilMore = math.ceil((remaining + 1 - tokens) / self._perSecond)
        context.notes[self._note] = f"{self._item.decode('ascii')};r={remaining};t={untilMore}"
        return None

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        state = context.notes.get(self._note)  # the request's bucket when it was let through
        if isinstance(state, str):
            headers.append(self._policyField)
            headers.append((b"RateLimit", state.encode("ascii")))

    def _bucket(self, key: Key, now: float) -> _Bucket:
        """C{key}'s bucket, refilled up to C{now} and made the most recently used."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._makeRoom(now)
            bucket = buckets[key] = _Bucket(self.burst, now)
            return bucket
        buckets.move_to_end(key)
        elapsed = now - bucket.updated
        if elapsed > 0:
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self._perSecond)
        bucket.updated = now  # also when the clock went back: no refill, and no debt either
        return bucket

    def _makeRoom(self, now: float) -> None:
        """Drop full buckets from the old end (two at most: constant work), then forget one if still full."""
        buckets = self._buckets
        for _ in range(2):
            if not buckets:
                return
            bucket = next(iter(buckets.values()))
            if not self._full(bucket, now):
                break
            buckets.popitem(last=False)
        if len(buckets) < self.maxKeys:
            return
        _, bucket = buckets.popitem(last=False)
        if not self._full(bucket, now):
            self.forgotten += 1
            if self._warnedAt is None or now - self._warnedAt >= _WARN_EVERY:
                self._warnedAt = now
                _log.warn(
                    "rate-limit {policy}: {maxKeys} keys in use; forgot buckets that were not full "
                    "({forgotten} so far): raise max-keys if this is not a flood",
                    policy=self.policyName,
                    maxKeys=self.maxKeys,
                    forgotten=self.forgotten,
                )

    def _full(self, bucket: _Bucket, now: float) -> bool:
        return bucket.tokens + max(0.0, now - bucket.updated) * self._perSecond >= self.burst


@implementer(IRequestFilter)
class ConcurrencyLimit:
    """
    At most C{maximum} requests in flight per key: a request holds its slot from this filter until its
    exchange ends (L{RequestContext.whenEnded}), however it ends: the response's body complete, an error
    answered, the client gone, or the connection handed to a tunnel (a WebSocket counts until its 101).

    Only keys with requests in flight are kept, at most C{maxKeys} of them; a new key when that many are
    busy is refused with 503 (the proxy's limit, not the client's).

    @ivar maximum: the most requests in flight per key.
    @ivar key: what it counts by.
    @ivar maxKeys: the most keys with requests in flight.
    """

    consumes: frozenset[bytes] = frozenset()

    def __init__(self, maximum: int, key: KeyRule = KeyRule("client"), maxKeys: int = MAX_KEYS) -> None:
        self.maximum = maximum
        self.key = key
        self.maxKeys = maxKeys
        self._inFlight: dict[Key, int] = {}

    def __repr__(self) -> str:
        return f"<ConcurrencyLimit {self.maximum} per {self.key.text}>"

    def inFlight(self, key: Key = b"") -> int:
        """How many requests of C{key} are in flight (C{b""}: the route's, for C{key = "route"})."""
        return self._inFlight.get(key, 0)

    @property
    def total(self) -> int:
        """How many requests are in flight, all keys together."""
        return sum(self._inFlight.values())

    @property
    def keyCount(self) -> int:
        """How many keys have requests in flight."""
        return len(self._inFlight)

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        key = self.key.keyOf(context)
        if key is None and self.key.deny:
            return clientError(429, self.key.missingReason("limit concurrency"))
        count = self._inFlight.get(key, 0)
        if count >= self.maximum:
            reason = f"concurrency limit {self.maximum} reached for {self.key.describe(key)}"
            return ProxyError(429, reason, Fault.CLIENT, "http_request_error", retryAfter=1)
        if not count and len(self._inFlight) >= self.maxKeys:
            reason = f"concurrency limit: {self.maxKeys} keys have requests in flight (max-keys)"
            return proxyError(503, reason, "proxy_internal_error", retryAfter=1)
        self._inFlight[key] = count + 1
        context.whenEnded(functools.partial(self._release, key))
        return None

    def _release(self, key: Key) -> None:
        count = self._inFlight[key] - 1
        if count:
            self._inFlight[key] = count
        else:
            del self._inFlight[key]


def _structuredString(text: str) -> bytes:
    """C{text} (printable ASCII) as a structured-field String (RFC 8941 section 3.3.3)."""
    return b'"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii")


def _readRate(reader: PluginOptions) -> Rate:
    try:
        text = reader.text("rate")
    except ValueError:  # not a string: a number of requests per second
        value: object = reader.number("rate", 0.0)
    else:
        if text is None:
            raise reader.error("rate", "required (examples: 100/s, 600/m, 10/h, 0.5/s)") from None
        value = text
    try:
        return parseRate(value)
    except ValueError as e:
        raise reader.error("rate", str(e)) from None


def buildRateLimit(reader: PluginOptions, environment: FilterEnvironment) -> RateLimit | SharedRateLimit:
    """
    A L{RateLimit} from the options of a C{[filters.X]} table with C{type = "rate-limit"}; with
    C{store = "redis"}, a L{SharedRateLimit} of it, on the process's Redis client.
    """
    rate = _readRate(reader)
    burst = reader.integer("burst", None, minimum=1)
    key = readKeyRule(reader)
    maxKeys = _readMaxKeys(reader)
    policyName = reader.text("policy-name")
    if policyName is not None and not _PRINTABLE.fullmatch(policyName):
        raise reader.error("policy-name", f"expected 1 to 100 printable ASCII characters, got {policyName!r}")
    store = reader.text("store", "local")
    onStoreDown = reader.text("on-store-down")
    if store not in ("local", "redis"):
        raise reader.error("store", f'expected "local" or "redis", got {store!r}')
    if onStoreDown not in (None, "local", "deny"):
        raise reader.error("on-store-down", f'expected "local" or "deny", got {onStoreDown!r}')
    limit = RateLimit(rate, IReactorTime(environment.reactor), burst, key, maxKeys, policyName)
    if store == "local":
        if onStoreDown is not None:
            raise reader.error("on-store-down", 'has no use without store = "redis"')
        return limit
    if environment.redis is None:
        raise reader.error("store", '"redis" needs --redis, the Redis server the instances share')
    from rproxy.cluster.ratelimit import SharedRateLimit  # txredisapi: only with --redis

    return SharedRateLimit(limit, environment.redis, environment.name, onStoreDown == "deny")


def buildConcurrencyLimit(reader: PluginOptions, environment: FilterEnvironment) -> ConcurrencyLimit:
    """A L{ConcurrencyLimit} from the options of a C{[filters.X]} table with C{type = "concurrency-limit"}."""
    maximum = reader.integer("max", None, minimum=1)
    if maximum is None:
        raise reader.error("max", "required: the most requests in flight per key")
    return ConcurrencyLimit(maximum, readKeyRule(reader), _readMaxKeys(reader))
