"""
Whether a shared store (etcd, Redis) answers: what the log, the metrics and the status page say of it.

A store's client reports each request's outcome here.  Only the changes are logged (one warning when it
goes out of reach, with why; one line when it answers again, with how long it was away), so that a store
that is down for an hour costs two log lines, not one per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()


class StoreError(Exception):
    """A shared store did not answer a request, or refused it: one line saying which."""


class StoreState(TypedDict):
    """A store as C{/state} and the status page show it."""

    store: str
    url: str
    up: bool
    since: float
    error: str
    fallback: str


class StoreHealth:
    """
    One store's reachability as this instance sees it.

    @ivar name: what it is (C{"etcd"}, C{"redis"}).
    @ivar url: where it is (no credentials).
    @ivar fallback: what this instance does while the store is out of reach, as the log and the status page say it.
    @ivar up: whether its last request was answered (C{True} until one is not).
    @ivar since: the clock's seconds when C{up} last changed (or when it was made).
    @ivar error: why it is out of reach (C{""} while up).
    @ivar failures: how many times it went out of reach.
    """

    def __init__(self, name: str, url: str, fallback: str, clock: IReactorTime) -> None:
        self.name = name
        self.url = url
        self.fallback = fallback
        self.up = True
        self.since = clock.seconds()
        self.error = ""
        self.failures = 0
        self._clock = clock
        self._observers: list[Callable[[StoreHealth], object]] = []

    def observe(self, observer: Callable[[StoreHealth], object]) -> None:
        """Call C{observer} with this health each time the store goes out of reach or comes back."""
        self._observers.append(observer)

    def answered(self) -> None:
        """A request was answered."""
        if self.up:
            return
        away = self._clock.seconds() - self.since
        self._change(True, "")
        _log.info(
            "{store} at {url} answers again, after {away:.1f}s out of reach", store=self.name, url=self.url, away=away
        )

    def unreachable(self, why: str) -> None:
        """A request failed: C{why}, one line."""
        if not self.up:
            self.error = why
            return
        self.failures += 1
        self._change(False, why)
        _log.warn(
            "{store} at {url} is out of reach ({why}): {fallback}",
            store=self.name,
            url=self.url,
            why=why,
            fallback=self.fallback,
        )

    def describe(self) -> StoreState:
        """The store as C{/state} shows it."""
        return {
            "store": self.name,
            "url": self.url,
            "up": self.up,
            "since": self.since,
            "error": self.error,
            "fallback": self.fallback,
        }

    def _change(self, up: bool, error: str) -> None:
        self.up, self.error, self.since = up, error, self._clock.seconds()
        for observer in list(self._observers):
            observer(self)
