"""
Active health verdicts shared by the workers of a supervisor (C{--workers}): one worker checks, every worker
follows its verdicts.

Were every worker to run the active checks, each upstream would get N times the checks, and N workers
could disagree about it for an interval.  So under a supervisor worker 0 alone runs the
L{rproxy.health.checks.HealthChecker}, which reports a L{Verdict} per upstream after its first check and
whenever the verdict or the reason changes (and one without a verdict when the upstream is no longer
checked); the supervisor passes each to the other workers, and to every worker it starts later
(L{rproxy.app.workers}).  In every worker a L{VerdictFollower} applies them to its own upstreams, as they are
told and as the upstreams appear (an upstream registered through the admin API, or read from etcd, may
reach a worker after its first verdict); in a new worker 0 too, whose checks then start from what its
predecessor found.  A worker whose channel to the supervisor closes runs its own checks.  Passive health
stays each worker's own: it is what that worker's exchanges saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.application.service import Service

from rproxy.interfaces import IRegistry


@dataclass(frozen=True)
class Verdict:
    """
    What the active checks say of one upstream of one service.

    @ivar up: up or down; C{None} when it is no longer checked (removed from the service).
    @ivar reason: why it is down (empty when up).
    """

    service: str
    upstream: str
    up: bool | None
    reason: str = ""

    def message(self) -> dict[str, object]:
        """This verdict as a JSON object, as it goes between processes."""
        return {"service": self.service, "upstream": self.upstream, "up": self.up, "reason": self.reason}

    @classmethod
    def fromMessage(cls, message: Mapping[str, object]) -> Verdict:
        """The verdict of the JSON object C{message} (what L{message} made)."""
        up = message.get("up")
        return cls(
            str(message["service"]), str(message["upstream"]), None if up is None else bool(up), str(message["reason"])
        )


class VerdictFollower(Service):
    """Applies the verdicts another process reached to the upstreams of C{registry}, as told and as they appear."""

    def __init__(self, registry: IRegistry) -> None:
        self._registry = registry
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        self._unwatch: Callable[[], None] | None = None

    def startService(self) -> None:
        """Apply what is known, and watch the registry for upstreams that appear."""
        super().startService()
        self._unwatch = self._registry.watch(self._apply)
        for service in {service for service, _ in self._verdicts}:
            self._apply(service)

    def stopService(self) -> None:
        """Stop watching."""
        super().stopService()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def told(self, verdict: Verdict) -> None:
        """Remember C{verdict}, and apply it to its upstream if this process has it."""
        key = (verdict.service, verdict.upstream)
        if verdict.up is None:
            self._verdicts.pop(key, None)
            return
        self._verdicts[key] = verdict
        if self.running:
            for upstream in self._registry.members(verdict.service):
                if upstream.key == verdict.upstream:
                    upstream.health.told(verdict.up, verdict.reason)

    def _apply(self, service: str) -> None:
        verdicts = self._verdicts
        for upstream in self._registry.members(service):
            verdict = verdicts.get((service, upstream.key))
            if verdict is not None and verdict.up is not None:
                upstream.health.told(verdict.up, verdict.reason)
