"""
Overload shedding: above a watermark of requests in flight, or of the process's resident memory, a new
request is answered at once with 503 and ``Retry-After`` (fault: proxy, counted as C{overload}) rather than
let in to slow every request down or to take the process past its memory.

Only proxied requests are counted and shed: the local routes (health, readiness) and the admin listener
answer whatever the load, so that a probe tells an overloaded proxy from a dead one.  The resident memory is
read from ``/proc/self/statm`` at most every L{MEMORY_SAMPLE} seconds, when a request asks, never per
request; where there is no such file, the memory watermark is not enforced (a warning says so once).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rproxy.errors import ProxyError, proxyError

_log = Logger()

#: Seconds between two readings of the resident memory.
MEMORY_SAMPLE = 0.25

#: Seconds a shed client is told to wait (``Retry-After``).
RETRY_AFTER = 1

#: The RFC 9209 error type of a shed request: the proxy is at one of its limits.
ERROR_TYPE = "connection_limit_reached"


def residentBytes() -> int | None:
    """The process's resident memory, from ``/proc/self/statm``; C{None} where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Overload:
    """
    The proxied requests in flight of a process, and whether one more may start.

    @ivar inFlight: the requests admitted and not yet ended.
    @ivar maxInFlight: the watermark of C{inFlight} (0: none).
    @ivar maxMemory: the watermark of the resident memory, in bytes (0: none).
    """

    inFlight = 0
    _sampledAt = -MEMORY_SAMPLE
    _resident = 0

    def __init__(
        self,
        reactor: IReactorTime,
        maxInFlight: int = 0,
        maxMemory: int = 0,
        readMemory: Callable[[], int | None] = residentBytes,
    ) -> None:
        self._reactor = reactor
        self.maxInFlight = maxInFlight
        self.maxMemory = maxMemory
        self._readMemory = readMemory

    def admit(self) -> ProxyError | None:
        """Count a new request in, or say why it is shed (then it is not counted)."""
        if self.maxInFlight and self.inFlight >= self.maxInFlight:
            return self._shed(f"{self.inFlight} requests in flight, the limit is {self.maxInFlight}")
        if self.maxMemory:
            resident = self.resident()
            if self.maxMemory and resident >= self.maxMemory:  # (it is 0 once the memory proved unreadable)
                return self._shed(f"{resident >> 20} MiB resident, the limit is {self.maxMemory >> 20} MiB")
        self.inFlight += 1
        return None

    def release(self) -> None:
        """An admitted request ended."""
        self.inFlight -= 1

    def resident(self) -> int:
        """The resident memory as last sampled (sampled again if the sample is older than L{MEMORY_SAMPLE})."""
        now = self._reactor.seconds()
        if now - self._sampledAt >= MEMORY_SAMPLE:
            self._sampledAt = now
            resident = self._readMemory()
            if resident is None:
                _log.warn("cannot read the resident memory: the memory watermark is not enforced")
                self.maxMemory = 0
                resident = 0
            self._resident = resident
        return self._resident

    def _shed(self, why: str) -> ProxyError:
        return proxyError(503, f"the proxy is overloaded ({why})", ERROR_TYPE, RETRY_AFTER)
