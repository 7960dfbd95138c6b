"""The in-memory L{IRegistry} the command line and config file fill."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from rproxy.interfaces import IRegistry
from rproxy.upstream import Upstream


@implementer(IRegistry)
class MemoryRegistry:
    """Upstreams per service, held in memory; watchers hear of every change."""

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
        current = self._services.get(service, ())
        if upstream in current:
            self._services[service] = tuple(u for u in current if u is not upstream)
            self._changed(service)

    def lookup(self, service: str) -> Sequence[Upstream]:
        return self._services.get(service, ())

    def failure(self, service: str, upstream: Upstream, reason: str) -> None:
        self._log.info(
            "service {service}: upstream {upstream} failed: {reason}",
            service=service,
            upstream=upstream.pool.label,
            reason=reason,
        )

    def watch(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    def _changed(self, service: str) -> None:
        for watcher in list(self._watchers):
            watcher(service)
