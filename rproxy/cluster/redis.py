"""
The process's Redis client (C{--redis}): one per process, shared by every filter that keeps its state in Redis
(a C{rate-limit} with C{store = "redis"}), and kept across reloads.

It is txredisapi's lazy pool, reconnecting with a short backoff, over a Twisted endpoint of our own (so that
C{rediss://} verifies the server's certificate).  No call waits longer than C{--store-timeout}: a Redis that is
down, or that accepts connections and never answers, counts as out of reach after that long and the caller
falls back.  Each outcome goes to L{health}, which logs only the changes.  While Redis is out of reach, calls
fail at once (an outage costs one timeout, not one per request) and a C{PING} asks it every L{PROBE_INTERVAL}
seconds; the first answer puts the calls back on Redis.  A pool that lost every connection after it answered
(Redis stopped or restarted) is out of reach at once, without waiting for the timeout.

This module is imported only when C{--redis} is given: txredisapi is an optional extra (C{rproxy[redis]}), with
hiredis, Redis's own reply parser in C, which txredisapi uses when it is installed (a quarter more checks a
second than its parser in Python, in C{make bench}'s C{rproxy-redis} row).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from rproxy.cluster.defaults import DEFAULT_REDIS_PREFIX, DEFAULT_STORE_TIMEOUT
from rproxy.cluster.health import StoreError, StoreHealth
from rproxy.cluster.tls import StoreTLS

#: Connections in the pool: commands are pipelined on them, so a few carry any rate.
POOL_SIZE = 2

#: The most seconds between two attempts to connect again (txredisapi's default, 10, would leave the
#: instances on their fallback for up to that long after Redis is back).
MAX_RECONNECT_DELAY = 2.0

#: Seconds between two C{PING}s while Redis is out of reach.
PROBE_INTERVAL = 0.5

#: The least seconds between two new pools, when Redis refused a pool's AUTH or SELECT (which stops it).
RECONNECT_STOPPED = 5.0

#: What the instance does while Redis is out of reach, as the log and the status page say it.
FALLBACK = 'rate limits with on-store-down = "local" count in this instance\'s memory, those with "deny" answer 503'


class StoreUnavailableError(StoreError):
    """Redis did not answer a call (down, too slow, or refusing it): the caller takes its fallback."""


@dataclass(frozen=True)
class Script:
    """
    A Lua script, run atomically by Redis, called by its SHA1 digest once Redis knows it.

    @ivar text: its source.
    """

    text: str

    @functools.cached_property
    def digest(self) -> str:
        """Its SHA1, hexadecimal: what C{EVALSHA} names it by."""
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()


def publicURL(url: str) -> str:
    """C{url} as logs and the status page show it: scheme, host, port and database, no user name."""
    parts = urlsplit(url)
    port = parts.port or 6379
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    database = parts.path if parts.path not in ("", "/") else "/0"
    return f"{parts.scheme}://{host}:{port}{database}"


class RedisClient:
    """
    The connection pool to one Redis server (or proxy, or primary behind a virtual address).

    It connects on its first call: building one (as checking a configuration does, on a clock) makes no
    connection.

    @ivar url: the server, without credentials (L{publicURL}).
    @ivar timeout: the most seconds a call waits for its answer.
    @ivar prefix: what the keys of this gateway start with (C{--redis-prefix}).
    @ivar health: whether Redis answers, as the log, the metrics and the status page tell it.
    """

    def __init__(
        self,
        url: str,
        reactor: IReactorTime,
        password: str | None = None,
        timeout: float = DEFAULT_STORE_TIMEOUT,
        tls: StoreTLS | None = None,
        prefix: str = DEFAULT_REDIS_PREFIX,
    ) -> None:
        """
        @param url: C{--redis}: C{redis://} or C{rediss://}, host, port and database number (no password).
        @param password: C{--redis-password-file}'s.
        @param timeout: C{--store-timeout}.
        @param tls: how to speak TLS to a C{rediss://} Redis (C{None}: verified against the system's CAs).
        @param prefix: C{--redis-prefix}: the start of every key this gateway keeps in Redis.
        """
        self.prefix = prefix
        self._address = url
        self._tls = tls
        self._password = password
        self._reactor = reactor
        self.url = publicURL(url)
        self.timeout = timeout
        self.health = StoreHealth("redis", self.url, FALLBACK, reactor)
        self._factory: txredisapi.RedisFactory | None = None
        self._probe: IDelayedCall | None = None
        self._closed = False
        self._answered = False
        self._connectedAt = 0.0

    def __repr__(self) -> str:
        return f"<RedisClient {self.url}>"

    def evaluate(self, script: Script, keys: Sequence[str], arguments: Sequence[object]) -> defer.Deferred[object]:
        """
        Run C{script} on C{keys} with C{arguments}: C{EVALSHA}, then C{EVAL} if Redis does not know the script
        (C{NOSCRIPT}: it restarted, or its scripts were flushed), all within L{timeout}.  Fires with the script's
        reply, or fails with L{StoreUnavailableError} (at once while Redis is out of reach).
        """
        if self._closed:
            return defer.fail(StoreUnavailableError("the proxy is stopping"))
        if self.health.up and self._answered and self._factory is not None and not self._factory.size:
            self._unreachable("connection lost")
        if not self.health.up:
            return defer.fail(StoreUnavailableError(self.health.error))
        command = [len(keys), *keys, *arguments]
        calling = self._command("EVALSHA", script.digest, *command)
        calling.addErrback(self._unknownScript, script, command)
        return self._bounded(calling)

    def close(self) -> defer.Deferred[None]:
        """Close the connections and stop connecting: the proxy is stopping."""
        self._closed = True
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        return defer.maybeDeferred(factory.disconnect).addCallback(lambda _: None)

    def _command(self, *command: object) -> defer.Deferred[object]:
        if self._factory is None:
            self._factory = self._connect()
        calling: defer.Deferred[object] = self._factory.handler.execute_command(*command)
        return calling

    def _connect(self) -> txredisapi.RedisFactory:
        parts = urlsplit(self._address)
        host, port = parts.hostname or "localhost", parts.port or 6379
        database = int(parts.path.strip("/") or 0)
        factory = txredisapi.RedisFactory(
            self.url,
            database or None,  # 0 is where a connection starts: no SELECT
            POOL_SIZE,
            isLazy=True,
            password=self._password,
            replyTimeout=self.timeout,  # a connection that stops answering is closed, and made again
            convertNumbers=False,
            username=parts.username,
        )
        factory.maxDelay = MAX_RECONNECT_DELAY
        # An attempt to connect gets a second at least: the calls waiting for it are bounded by the timeout anyway.
        connecting = max(1, round(self.timeout))
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self._reactor, host, port, timeout=connecting)
        if parts.scheme == "rediss":
            creator = self._tls.creator(host) if self._tls is not None else optionsForClientTLS(host)
            endpoint = wrapClientTLS(creator, endpoint)
        factory.startConnecting(endpoint)
        # A refused AUTH or SELECT stops the pool for good (wrong password, no such database): say why.
        factory.deferred.addErrback(lambda failure: self._unreachable(failure.getErrorMessage()))
        self._connectedAt = self._reactor.seconds()
        return factory

    def _unknownScript(self, failure: Failure, script: Script, command: list[object]) -> object:
        failure.trap(txredisapi.ResponseError)
        if not str(failure.value).startswith("NOSCRIPT"):
            return failure
        return self._command("EVAL", script.text, *command)

    def _bounded(self, calling: defer.Deferred[object]) -> defer.Deferred[object]:
        """C{calling}, failed after L{timeout} seconds; its outcome told to L{health}."""
        calling.addTimeout(self.timeout, self._reactor)  # type: ignore[arg-type]
        return calling.addBoth(self._outcome)

    def _outcome(self, result: object) -> object:
        if not isinstance(result, Failure):
            self._answered = True
            self.health.answered()
            return result
        if result.check(defer.CancelledError):
            return result  # the caller gave up (its client left): says nothing of Redis
        if not self.health.up and result.check(defer.TimeoutError, txredisapi.ConnectionError):
            # Known out of reach already: the known reason (a refused AUTH, say) says more than a timeout or the
            # "Not connected" of a call that waited for a connection the refusal stopped.
            why = self.health.error
        elif result.check(defer.TimeoutError, txredisapi.TimeoutError):
            why = f"no answer within {self.timeout:g}s"
        else:
            why = (result.getErrorMessage().splitlines() or [repr(result.value)])[0][:200]
        self._unreachable(why)
        return Failure(StoreUnavailableError(why))

    def _unreachable(self, why: str) -> None:
        """Redis is out of reach: say so, and ask it again in L{PROBE_INTERVAL} seconds."""
        self.health.unreachable(why)
        if not self._closed and (self._probe is None or not self._probe.active()):
            self._probe = self._reactor.callLater(PROBE_INTERVAL, self._ping)

    def _ping(self) -> None:
        factory = self._factory
        if factory is not None and factory.stopped and self._reactor.seconds() - self._connectedAt >= RECONNECT_STOPPED:
            self._factory = None  # a new pool: Redis's users or databases may have been fixed since
            factory.disconnect()
        self._bounded(self._command("PING")).addErrback(lambda failure: failure.trap(StoreUnavailableError))
