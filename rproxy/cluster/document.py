"""
The services, routes and filters of a gateway kept in etcd (C{--etcd-config-key}): one TOML document that
every instance applies in place of its config file's, as a live reload.

The document has the config file's form, limited to C{[services.*]}, C{[[routes]]}, C{[filters.*]} and
C{default-filters} (what a reload applies); listeners, TLS, limits and the rest stay in each instance's file
or command line.  Every change of the key is applied like a reload (L{rproxy.app.reload}): checked whole
first, so that a broken document is refused, logged, and the last good one keeps serving; a deleted key puts
the config file's services and routes back.  A SIGHUP or a change of the file applies the file with the
document in force.

Until etcd has answered once, an instance serves its file's services and routes; its ready route says it is
not ready meanwhile (L{pending}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rproxy.cluster.etcd import EtcdClient, Event, KeyValue
from rproxy.cluster.follow import PrefixFollower

_log = Logger()

#: A document and what its errors name (C{None}: there is none in etcd).
Document = tuple[str, str] | None


class EtcdDocument(Service):
    """
    The document at one etcd key, followed and applied.

    @ivar where: the key as the log and errors name it (C{etcd /rproxy/config}).
    @ivar text: the document in force (C{None}: none, the config file's services and routes serve).
    """

    def __init__(self, client: EtcdClient, prefix: str, key: str, reactor: IReactorTime) -> None:
        self.where = f"etcd {prefix}{key}"
        self.text: str | None = None
        self._apply: Callable[[str], object] = lambda trigger: None
        self._key = (prefix + key).encode("utf-8")
        self._offered: bytes | None = None
        self._follower = PrefixFollower(client, self._key, reactor, self._snapshot, self._changed, "the configuration")

    def applyWith(self, apply: Callable[[str], object]) -> None:
        """
        Apply each new document with C{apply(trigger)}, which reloads with L{current} and returns C{None} when
        the configuration is refused (L{rproxy.app.reload.ConfigReloader.reload}).
        """
        self._apply = apply

    def current(self) -> Document:
        """The document in force and what its errors name, or C{None}."""
        return None if self.text is None else (self.text, self.where)

    def pending(self) -> list[str]:
        """Why this instance should not take requests yet: the document not read once (none otherwise)."""
        return [] if self._follower.read else [f"the configuration at {self.where} is not read yet"]

    def startService(self) -> None:
        super().startService()
        self._follower.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._follower.stop()

    def _snapshot(self, kvs: list[KeyValue]) -> None:
        found = [kv.value for kv in kvs if kv.key == self._key]
        self._offer(found[0] if found else None)

    def _changed(self, events: list[Event]) -> None:
        for event in events:
            if event.kv.key == self._key:
                self._offer(None if event.deleted else event.kv.value)

    def _offer(self, value: bytes | None) -> None:
        """Apply the key's value (C{None}: deleted) unless it is the one seen last."""
        if value == self._offered:
            return
        self._offered = value
        if value is None:
            if self.text is not None:
                self._try(None, f"{self.where} was deleted: the config file's services and routes serve again")
            return
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as e:
            _log.error(
                "{where}: not applied, the previous configuration keeps serving: not UTF-8 ({reason} at byte {at})",
                where=self.where,
                reason=e.reason,
                at=e.start,
            )
            return
        self._try(text, f"{self.where} changed")

    def _try(self, text: str | None, trigger: str) -> None:
        previous, self.text = self.text, text
        if self._apply(trigger) is None:  # refused (and logged): the last good document stays in force
            self.text = previous
