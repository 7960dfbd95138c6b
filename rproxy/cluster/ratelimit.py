"""
A C{rate-limit} whose buckets are kept in Redis (C{store = "redis"}), so that one limit holds across every
instance of a gateway.

Each check is one atomic Lua script (L{TOKEN_BUCKET}): it refills the bucket by Redis's own clock (the
instances' clocks do not matter), takes a token if there is one, sets the key to expire when the bucket would
be full again (a full bucket is the same as none), and answers whether the request may pass and the tokens
left.  The filter then answers exactly as the local limit does (L{RateLimit.decide}): the same 429, reason and
C{RateLimit-Policy}/C{RateLimit} fields.  While Redis is out of reach, the same limit counts in this instance's
memory (C{on-store-down = "local"}, failing open to a per-instance limit), or requests are refused with 503
(C{"deny"}, failing closed).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.cluster.redis import RedisClient, Script, StoreUnavailableError
from rproxy.errors import proxyError
from rproxy.interfaces import IRequestFilter, IResponseFilter

if TYPE_CHECKING:  # rproxy.filters.ratelimit builds this filter
    from rproxy.filters.ratelimit import Key, RateLimit
    from rproxy.proxy.message import FilterVerdict, RequestContext

#: One check of a token bucket.  KEYS[1]: the bucket, a hash of its tokens and when they were counted (Redis's
#: TIME, seconds and microseconds kept apart: a double of microseconds since 1970 is exact, Lua's %.14g of one
#: is not).  ARGV: the rate's quota and window (seconds), the burst, and how far below a whole token still
#: counts as one.  Replies {1 if a token was taken else 0, the tokens left as text}.
TOKEN_BUCKET = Script(
    """\
local quota, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local burst, tolerance = tonumber(ARGV[3]), tonumber(ARGV[4])
local perSecond = quota / window
local now = redis.call('TIME')
local tokens = burst
local kept = redis.call('HMGET', KEYS[1], 'tokens', 's', 'us')
if kept[1] then
  local elapsed = (tonumber(now[1]) - tonumber(kept[2])) + (tonumber(now[2]) - tonumber(kept[3])) / 1e6
  tokens = tonumber(kept[1])
  if elapsed > 0 then
    tokens = math.min(burst, tokens + elapsed * perSecond)
  end
end
local taken = 0
if tokens >= 1 - tolerance then
  taken = 1
  tokens = tokens - 1
end
local left = string.format('%.17g', tokens)
redis.call('HSET', KEYS[1], 'tokens', left, 's', now[1], 'us', now[2])
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((burst - tokens) / perSecond * 1000)))
return {taken, left}
"""
)


def bucketPrefix(prefix: str, name: str, limit: RateLimit) -> str:
    """
    The start of the Redis keys of the buckets of the filter C{name} (its C{[filters.NAME]} table), under the
    gateway's C{prefix} (C{--redis-prefix}): the same on every instance for the same definition, another one
    when its rate, burst or key rule changes (a bucket of the old limit is not one of the new).
    """
    rule = limit.key
    definition = f"{limit.rate.quota}/{limit.rate.window} burst {limit.burst} per {rule.text} /{rule.ipv6Prefix}"
    return f"{prefix}rate-limit:{name}:{hashlib.blake2b(definition.encode(), digest_size=8).hexdigest()}:"


@implementer(IRequestFilter, IResponseFilter)
class SharedRateLimit:
    """
    The token buckets of L{limit}, kept in Redis: one check (one round trip) per request.

    @ivar limit: the limit, which also keeps the buckets of this instance's memory while Redis is out of reach.
    @ivar redis: the process's Redis client.
    @ivar deny: whether requests are refused (503) while Redis is out of reach, rather than counted here.
    """

    consumes: frozenset[bytes] = frozenset()

    def __init__(self, limit: RateLimit, redis: RedisClient, name: str, deny: bool = False) -> None:
        self.limit = limit
        self.redis = redis
        self.deny = deny
        self._prefix = bucketPrefix(redis.prefix, name, limit)
        self._arguments = (limit.rate.quota, limit.rate.window, limit.burst, repr(limit.tolerance))

    def __repr__(self) -> str:
        return f"<SharedRateLimit {self.limit.policyName!r} in {self.redis.url}>"

    def bucket(self, key: Key) -> str:
        """The Redis key of C{key}'s bucket: the request's key in hexadecimal (a digest for fields and claims)."""
        return self._prefix + ("-" if key is None else key.hex())

    def onRequest(self, context: RequestContext) -> FilterVerdict | Deferred[FilterVerdict]:
        key = self.limit.key.keyOf(context)
        if key is None and self.limit.key.deny:
            return self.limit.missingKey()
        checking = self.redis.evaluate(TOKEN_BUCKET, [self.bucket(key)], self._arguments)
        return checking.addCallbacks(
            self._checked, self._storeDown, callbackArgs=(context, key), errbackArgs=(context, key)
        )

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.limit.onResponse(context, status, headers)

    def _checked(self, reply: object, context: RequestContext, key: Key) -> FilterVerdict:
        taken, tokens = cast(tuple[int, str], reply)
        return self.limit.decide(context, key, int(taken) == 1, float(tokens))

    def _storeDown(self, failure: Failure, context: RequestContext, key: Key) -> FilterVerdict:
        failure.trap(StoreUnavailableError)
        if self.deny:
            return proxyError(503, "rate limit store redis out of reach", "proxy_internal_error", retryAfter=1)
        return self.limit.decide(context, key, *self.limit.take(key))
