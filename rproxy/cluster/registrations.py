"""
The admin API's registrations kept in etcd, so that every instance of a gateway serves what any one registered.

Each registration is one key, C{PREFIX}C{registrations/ID}, whose value is a JSON object (C{id}, C{service},
C{url}, C{ttl}) and which is attached to an etcd lease of its TTL: when nobody renews it, etcd deletes the key,
and every instance hears of it.  A renewal puts the key again under a new lease (and revokes the old one), so
that every instance also hears of renewals and shows when the registration expires.

L{EtcdRegistrations} reads the prefix, then watches it from the revision it read, and hands each change to the
instance's registrations (L{rproxy.app.admin.Registrations.follow}) in the shape workers announce changes in.
Each time it has read the prefix again (L{rproxy.cluster.follow}: after etcd comes back) it reconciles:
what was deleted meanwhile leaves, what was added comes.  Until etcd answers again, the registrations last
known keep serving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rproxy.cluster.etcd import EtcdClient, EtcdError, Event, KeyValue
from rproxy.cluster.follow import PrefixFollower

_log = Logger()

#: A change as L{rproxy.app.admin.Registrations.follow} takes it: C{id}, C{service}, C{url}, and C{ttl}
#: (C{None}: the registration ended).
Change = Mapping[str, object]


class EtcdRegistrations:
    """
    The registrations under C{PREFIX}C{registrations/} in etcd, as changes for this instance to follow.

    @ivar client: the etcd client (and its health).
    """

    def __init__(self, client: EtcdClient, prefix: str, reactor: IReactorTime) -> None:
        self.client = client
        self._prefix = (prefix + "registrations/").encode("utf-8")
        self._follow: Callable[[Change], object] = lambda change: None
        self._known: dict[str, tuple[KeyValue, Change]] = {}
        self._follower = PrefixFollower(
            client, self._prefix, reactor, self._reconcile, self._events, "the registrations"
        )

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

    def pending(self) -> list[str]:
        """Why this instance should not take requests yet: the registrations not read once (none otherwise)."""
        return self._follower.pending()

    def start(self, follow: Callable[[Change], object]) -> None:
        """Read the registrations and follow every change from then on with C{follow}, until L{stop}."""
        self._follow = follow
        self._follower.start()

    def stop(self) -> Deferred[None]:
        """Stop following (the registrations known stay as they are); fires when the watch has ended."""
        return self._follower.stop()

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

    def _events(self, events: list[Event]) -> None:
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
