"""
The admin API's registrations kept in etcd, so that every instance of a gateway serves what any one registered.

Each registration is one key, C{PREFIX}C{registrations/ID}, whose value is a JSON object (C{id}, C{service},
C{url}, C{ttl}) and which is attached to an etcd lease of its TTL: when nobody renews it, etcd deletes the key,
and every instance hears of it.  A renewal puts the key again under a new lease (and revokes the old one), so
that every instance also hears of renewals and shows when the registration expires.

L{EtcdRegistrations} reads the prefix, then watches it from the revision it read, and hands each change to the
instance's registrations (L{rproxy.app.admin.Registrations.follow}) in the shape workers announce changes in.
When the watch ends (etcd stopped, the connection lost, the revision compacted) it reads the prefix again,
backing off while etcd does not answer, and reconciles: what was deleted meanwhile leaves, what was added
comes.  Until etcd answers again, the registrations last known keep serving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from rproxy.cluster.etcd import EtcdClient, EtcdError, Event, KeyValue, Watch

_log = Logger()

#: A change as L{rproxy.app.admin.Registrations.follow} takes it: C{id}, C{service}, C{url}, and C{ttl}
#: (C{None}: the registration ended).
Change = Mapping[str, object]

#: The first and the longest wait before reading etcd again after it did not answer, in seconds.
FIRST_RETRY, LONGEST_RETRY = 0.1, 5.0

#: Seconds between two probes of etcd while a watch streams (a stream over a connection that died silently
#: would otherwise say nothing).
PROBE_INTERVAL = 2.0


class EtcdRegistrations:
    """
    The registrations under C{PREFIX}C{registrations/} in etcd, as changes for this instance to follow.

    @ivar client: the etcd client (and its health).
    @ivar synced: whether the registrations known here are etcd's as of the last read or event.
    """

    def __init__(self, client: EtcdClient, prefix: str, reactor: IReactorTime) -> None:
        self.client = client
        self.synced = False
        self._prefix = (prefix + "registrations/").encode("utf-8")
        self._reactor = reactor
        self._follow: Callable[[Change], object] = lambda change: None
        self._known: dict[str, tuple[KeyValue, Change]] = {}
        self._running = False
        self._watch: Watch | None = None
        self._probe = LoopingCall(self._probeOnce)
        self._probe.clock = reactor
        self._loop: Deferred[None] | None = None

    # -- what the admin API asks

    def put(self, id: str, service: str, url: str, ttl: float) -> Deferred[None]:
        """Register or renew C{id}: its key under a new lease of C{ttl} seconds (rounded up), the old one revoked."""
        return Deferred.fromCoroutine(self._put(id, service, url, ttl))

    async def _put(self, id: str, service: str, url: str, ttl: float) -> None:
        lease = await self.client.grant(max(1, math.ceil(ttl)))
        value = json.dumps({"id": id, "service": service, "url": url, "ttl": ttl}).encode("utf-8")
        try:
            await self.client.put(self._key(id), value, lease)
        except EtcdError:
            self.client.revoke(lease).addErrback(lambda _: None)  # unused: it would expire anyway
            raise
        known = self._known.get(id)
        if known is not None and known[0].lease and known[0].lease != lease:
            # The key is under the new lease now: the old one holds nothing, and would only expire later.
            self.client.revoke(known[0].lease).addErrback(lambda _: None)

    def delete(self, id: str) -> Deferred[None]:
        """Deregister C{id}: its key deleted, its lease revoked."""
        known = self._known.get(id)
        deleting = self.client.delete(self._key(id))
        if known is not None and known[0].lease:
            lease = known[0].lease
            deleting.addCallback(lambda _: self.client.revoke(lease).addErrback(lambda _: None))
        return deleting.addCallback(lambda _: None)

    # -- following etcd

    def start(self, follow: Callable[[Change], object]) -> None:
        """Read the registrations and follow every change from then on with C{follow}, until L{stop}."""
        self._follow = follow
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._probe.start(PROBE_INTERVAL, now=False)

    def stop(self) -> Deferred[None]:
        """Stop following (the registrations known stay as they are); fires when the watch has ended."""
        self._running = False
        if self._probe.running:
            self._probe.stop()
        if self._watch is not None:
            self._watch.stop()
        loop, self._loop = self._loop, None
        return succeed(None) if loop is None else loop

    async def _run(self) -> None:
        wait = FIRST_RETRY
        while self._running:
            try:
                revision, kvs = await self.client.range(self._prefix)
            except EtcdError:
                self.synced = False
                await deferLater(self._reactor, wait, lambda: None)  # type: ignore[arg-type]
                wait = min(wait * 2, LONGEST_RETRY)
                continue
            wait = FIRST_RETRY
            self._reconcile(kvs)
            self.synced = True
            if not self._running:
                return
            self._watch = self.client.watch(self._prefix, revision + 1, self._events)
            why = await self._watch.ended
            self._watch = None
            self.synced = False
            if self._running:
                _log.info("etcd: the watch of the registrations ended ({why}): reading them again", why=why)

    def _probeOnce(self) -> None:
        """While a watch streams, ask etcd something: a watch that a dead connection holds is ended."""
        watch = self._watch
        if watch is None:
            return

        def unanswered(failure: object) -> None:
            if self._watch is watch:
                watch.stop()

        self.client.get(self._prefix).addErrback(unanswered)

    def _reconcile(self, kvs: list[KeyValue]) -> None:
        """Follow what changed between the registrations known here and C{kvs}, all of etcd's."""
        read = {}
        for kv in kvs:
            change = self._change(kv)
            if change is not None:
                read[str(change["id"])] = (kv, change)
        for id, (kv, change) in read.items():
            known = self._known.get(id)
            if known is None or known[0].modRevision != kv.modRevision:
                self._known[id] = (kv, change)
                self._follow(change)
        for id in [id for id in self._known if id not in read]:
            _, change = self._known.pop(id)
            self._follow({**change, "ttl": None})

    def _events(self, revision: int, events: list[Event]) -> None:
        for event in events:
            if event.deleted:
                id = event.kv.key[len(self._prefix) :].decode("utf-8", "replace")
                known = self._known.pop(id, None)
                if known is not None:
                    self._follow({**known[1], "ttl": None})
                continue
            change = self._change(event.kv)
            if change is not None:
                self._known[str(change["id"])] = (event.kv, change)
                self._follow(change)

    def _change(self, kv: KeyValue) -> Change | None:
        """The registration a key holds, or C{None} (logged) when it holds none."""
        try:
            change = json.loads(kv.value)
            if not (isinstance(change, dict) and {"id", "service", "url", "ttl"} <= change.keys()):
                raise ValueError("not an object with id, service, url and ttl")
            if self._key(str(change["id"])) != kv.key:
                raise ValueError(f"its id {change['id']!r} is not its key's")
        except ValueError as e:
            _log.warn("etcd: key {key} is not a registration, ignored: {error}", key=kv.key, error=e)
            return None
        return change

    def _key(self, id: str) -> bytes:
        return self._prefix + id.encode("utf-8")
