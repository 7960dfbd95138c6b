"""The in-memory L{IRegistry} the command line and config file fill, and where passive health decides."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from rproxy.interfaces import IRegistry
from rproxy.upstream.upstreams import Upstream


@implementer(IRegistry)
class MemoryRegistry:
    """
    Upstreams per service, held in memory; watchers hear of every change.

    Failures reported here feed each upstream's passive health; an upstream is ejected when its own
    failures call for it, unless that would eject more than its policy's share of the service.
    """

    _log = Logger()

    def __init__(self) -> None:
        self._services: dict[str, tuple[Upstream, ...]] = {}
        self._watchers: list[Callable[[str], None]] = []

    def add(self, service: str, upstream: Upstream) -> None:
        current = self._services.get(service, ())
        if upstream not in current:
            self._services[service] = (*current, upstream)
            self._changed(service)

    def remove(self, service: str, upstream: Upstream) -> None:
        """Take C{upstream} out: exchanges in flight on it finish, its idle connections close."""
        current = self._services.get(service, ())
        if upstream in current:
            self._services[service] = tuple(u for u in current if u is not upstream)
            upstream.pool.drain()
            self._changed(service)

    def lookup(self, service: str) -> Sequence[Upstream]:
        members = self._services.get(service, ())
        for upstream in members:
            if not upstream.health.available:
                return tuple(u for u in members if u.health.available)
        return members

    def members(self, service: str) -> Sequence[Upstream]:
        return self._services.get(service, ())

    def services(self) -> Sequence[str]:
        """The names of the services that have upstreams."""
        return tuple(self._services)

    def failure(self, service: str, upstream: Upstream, reason: str) -> None:
        health = upstream.health
        if not health.failed(reason):
            return
        members = self._services.get(service, ())
        ejected = sum(1 for u in members if u.health.ejected)
        allowed = max(1, int(len(members) * health.policy.maxEjectedShare))
        if ejected >= allowed:
            self._log.warn(
                "service {service}: upstream {upstream} keeps failing ({reason}) but {ejected} of {count} "
                "upstreams are already ejected; keeping it",
                service=service,
                upstream=upstream.key,
                reason=reason,
                ejected=ejected,
                count=len(members),
            )
            return
        length = health.eject(reason)
        self._log.warn(
            "service {service}: ejecting upstream {upstream} for {seconds:g}s (ejection {ejections}): {reason}",
            service=service,
            upstream=upstream.key,
            seconds=length,
            ejections=health.ejections,
            reason=reason,
        )
        self._changed(service)

    def success(self, service: str, upstream: Upstream) -> None:
        upstream.health.succeeded()

    def watch(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    def _changed(self, service: str) -> None:
        for watcher in list(self._watchers):
            watcher(service)
