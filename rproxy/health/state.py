"""
Whether an upstream may take requests: passive ejection, active check verdicts and slow start.

Each L{Upstream} carries one L{UpstreamHealth}.  Exchanges feed it their outcomes (through the
registry, which also caps how much of a service may be ejected at once); active checks feed it their
verdicts (L{rproxy.health.checks}).  A host is I{available} when it is neither ejected nor marked down by
its checks; a host that comes back ramps its weight up over the slow-start period.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from rproxy.interfaces import HealthResult


@dataclass(frozen=True)
class PassivePolicy:
    """
    When failed exchanges eject a host, and for how long (seconds, counts, shares).

    @ivar maxFails: consecutive failures that eject a host (0: never on this ground).
    @ivar failureRate: the share of failures within C{window} that ejects a host (0: never on this ground).
    @ivar window: the span over which C{failureRate} is measured.
    @ivar minRequests: exchanges within C{window} before C{failureRate} applies.
    @ivar baseEjection: the first ejection's length; each repeat doubles it.
    @ivar maxEjection: the longest an ejection may last.
    @ivar maxEjectedShare: the largest share of a service's hosts ejected at once (at least one host may be).
    @ivar slowStart: how long a returning host takes to ramp up to its full weight (0: at once).
    """

    maxFails: int = 5
    failureRate: float = 0.0
    window: float = 10.0
    minRequests: int = 20
    baseEjection: float = 10.0
    maxEjection: float = 300.0
    maxEjectedShare: float = 0.5
    slowStart: float = 0.0


#: The weight share a host starts its slow start with.
_RAMP_FLOOR = 0.1


class UpstreamHealth:
    """
    The health state of one upstream.

    @ivar ejectedUntil: when the current passive ejection ends (0 when not ejected).
    @ivar ejections: how many times in a row the host was ejected (reset by a clean period).
    @ivar ejectionCount: how many times the host was ejected in all (never reset: the metrics' counter).
    @ivar activeUp: the active checks' verdict (C{True} until checks say otherwise).
    @ivar reason: why the host was last ejected or marked down (empty when it never was).
    @ivar lastError: the latest failure, of an exchange or of an active check, ejecting or not (empty when
        none failed yet): what a person looking at a host that misbehaves wants to read first.
    @ivar lastErrorAt: the reactor's time of C{lastError} (C{None} when none failed yet).
    """

    def __init__(self, clock: IReactorTime, policy: PassivePolicy) -> None:
        self._clock = clock
        self.policy = policy
        self.ejectedUntil = 0.0
        self.ejections = 0
        self.ejectionCount = 0
        self.activeUp = True
        self.reason = ""
        self.lastError = ""
        self.lastErrorAt: float | None = None
        self._consecutiveFailures = 0
        self._recent: deque[tuple[float, bool]] = deque()  # (time, failed) within the window
        self._returnedAt: float | None = None
        self._checkStreak = 0  # consecutive active results against the current verdict

    @property
    def ejected(self) -> bool:
        """Whether a passive ejection is in force now."""
        return self._clock.seconds() < self.ejectedUntil

    @property
    def available(self) -> bool:
        """Whether the host may take new requests."""
        return self.activeUp and not self.ejected

    @property
    def state(self) -> str:
        """C{"up"}, C{"ejected"} or C{"down"} (checks failing), for the admin API and logs."""
        if not self.activeUp:
            return "down"
        return "ejected" if self.ejected else "up"

    def weightFactor(self) -> float:
        """The share of its configured weight the host gets now (below 1 while slow-starting)."""
        returnedAt = self._returnedAt
        slowStart = self.policy.slowStart
        if returnedAt is None or slowStart <= 0:
            return 1.0
        elapsed = self._clock.seconds() - returnedAt
        if elapsed >= slowStart:
            self._returnedAt = None
            return 1.0
        return max(_RAMP_FLOOR, elapsed / slowStart)

    def retryAfter(self) -> float:
        """Seconds until the host might take requests again (0 when it may now)."""
        if not self.ejected:
            return 0.0
        return self.ejectedUntil - self._clock.seconds()

    # -- passive

    def succeeded(self) -> None:
        """An exchange with the host went well."""
        self._consecutiveFailures = 0
        self._remember(False)

    def failed(self, reason: str) -> bool:
        """
        An exchange with the host failed.

        @return: whether the failures now call for ejecting the host (the caller decides, given the cap).
        """
        self._noteError(reason)
        self._consecutiveFailures += 1
        self._remember(True)
        if self.ejected:
            return False
        policy = self.policy
        if policy.maxFails and self._consecutiveFailures >= policy.maxFails:
            return True
        if policy.failureRate and len(self._recent) >= policy.minRequests:
            failures = sum(1 for _, failed in self._recent if failed)
            return failures / len(self._recent) >= policy.failureRate
        return False

    def eject(self, reason: str) -> float:
        """Take the host out for a time that doubles with each repeat; return that time."""
        policy = self.policy
        now = self._clock.seconds()
        if self.ejectedUntil and now - self.ejectedUntil > policy.maxEjection:
            self.ejections = 0  # a long clean run since the last ejection: start again
        length = min(policy.baseEjection * 2**self.ejections, policy.maxEjection)
        self.ejections += 1
        self.ejectionCount += 1
        self.ejectedUntil = now + length
        self._returnedAt = self.ejectedUntil
        self.reason = reason
        self._consecutiveFailures = 0
        self._recent.clear()
        return length

    def _noteError(self, reason: str) -> None:
        self.lastError = reason
        self.lastErrorAt = self._clock.seconds()

    def _remember(self, failed: bool) -> None:
        now = self._clock.seconds()
        recent = self._recent
        recent.append((now, failed))
        horizon = now - self.policy.window
        while recent and recent[0][0] < horizon:
            recent.popleft()

    # -- active

    def checked(self, result: HealthResult, rise: int, fall: int) -> bool:
        """
        Take an active check's verdict: C{fall} failures in a row mark the host down, C{rise} passes up.

        @return: whether the verdict changed.
        """
        if not result.healthy:
            self.reason = result.reason
            self._noteError(result.reason)
        if result.healthy == self.activeUp:
            self._checkStreak = 0
            return False
        self._checkStreak += 1
        if self._checkStreak < (rise if result.healthy else fall):
            return False
        self._mark(result.healthy)
        return True

    def told(self, up: bool, reason: str) -> bool:
        """
        Take the verdict that another process's active checks reached (L{rproxy.health.shared}): C{up}, or
        down for C{reason}.

        @return: whether the verdict changed.
        """
        if not up and reason != self.reason:
            self.reason = reason
            self._noteError(reason)
        if up == self.activeUp:
            return False
        self._mark(up)
        return True

    def _mark(self, up: bool) -> None:
        self._checkStreak = 0
        self.activeUp = up
        if up:
            self._returnedAt = self._clock.seconds()  # slow start, as for a host back from an ejection
            self.ejectedUntil = 0.0
