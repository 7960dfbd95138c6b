"""
Servers that tests run as processes of their own (Prometheus, etcd, Redis): started with the reactor's
C{spawnProcess}, so that a test waits for them without blocking, their output kept for failure messages,
and stopped by the test's cleanups however it ends.
"""

from __future__ import annotations

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

#: How much of a server's output is kept for failure messages, in bytes.
OUTPUT_KEPT = 64 * 1024


class ServerProcess(protocol.ProcessProtocol):
    """One run of a server: the end of its output (both streams), and when it has ended."""

    def __init__(self) -> None:
        self.output = b""
        self.hasEnded = False
        self.exitCode: int | None = None
        self._waiters: list[defer.Deferred[None]] = []
        self._killer: IDelayedCall | None = None

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-OUTPUT_KEPT:]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.hasEnded = True
        self.exitCode = getattr(reason.value, "exitCode", None)
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @property
    def text(self) -> str:
        """The end of its output, as text."""
        return self.output.decode("utf-8", "replace")

    def whenEnded(self) -> defer.Deferred[None]:
        """Fires once the process has ended (at once if it has)."""
        if self.hasEnded:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def signal(self, name: str) -> None:
        """Send signal C{name} unless the process has exited."""
        assert self.transport is not None, "the process was never started"
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def stop(self, timeout: float = 10.0) -> defer.Deferred[None]:
        """SIGTERM, then SIGKILL if it has not ended after C{timeout} seconds; fires once it has ended."""
        ended = self.whenEnded()
        if not self.hasEnded and self._killer is None:
            self.signal("TERM")
            self._killer = reactor.callLater(timeout, self.signal, "KILL")
        return ended
