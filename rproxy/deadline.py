"""
The re-aimable timer of both sides: of a client connection (its request head, its idleness between
requests), of an upstream connection (HTTP/1.1) or stream (HTTP/2), whose meaning changes as an
exchange goes on (waiting for the response head, for more of the body, idling in the pool), and of an
HTTP/2 upstream connection without streams.  One-shot timers (connecting, a PING's answer) are plain
C{callLater}s.

It is re-aimed with C{reset} rather than replaced: a new C{DelayedCall} per exchange costs more than a
reset, and disarming only changes what the pending call means (it lapses unless re-aimed first).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: What a deadline stands for: nothing; an upstream's response head, or the rest of its response; an idle
#: connection; a client's request head; a client's request (its body's rate, its total time,
#: L{rproxy.downstream.limits.RequestClock}); a client that does not read what is written to it.
NONE, RESPONSE, READ, IDLE, HEAD, REQUEST, WRITE = range(7)


class Deadline:
    """
    One re-aimable deadline; C{expired(mode)} is called when it passes while armed.

    @ivar mode: what it stands for now (L{NONE}: nothing).
    """

    mode = NONE
    _call: IDelayedCall | None = None

    def __init__(self, reactor: IReactorTime, expired: Callable[[int], None]) -> None:
        self._reactor = reactor
        self._expired = expired

    def arm(self, mode: int, seconds: float) -> None:
        """Stand for C{mode}, C{seconds} from now."""
        self.mode = mode
        call = self._call
        if call is not None and call.active():
            call.reset(seconds)
        else:
            self._call = self._reactor.callLater(seconds, self._passed)

    def postpone(self, mode: int, seconds: float) -> None:
        """If it stands for C{mode}, move it to C{seconds} from now (progress was made)."""
        if self.mode == mode and self._call is not None:
            self._call.reset(seconds)

    def disarm(self) -> None:
        """Stand for nothing: the pending call, if any, lapses unless re-aimed first."""
        self.mode = NONE

    def stop(self) -> None:
        """Stand for nothing and cancel the pending call (the connection or stream is over)."""
        self.mode = NONE
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _passed(self) -> None:
        self._call = None
        mode, self.mode = self.mode, NONE
        if mode != NONE:
            self._expired(mode)
