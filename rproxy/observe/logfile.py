"""
Where access log records go: a file written by a thread of its own, or the Twisted log.

A proxy writes one record per exchange, on the reactor thread, between two events.  Writing it to a file
there would put a system call on every request, and a disk that stalls (a full device queue, an NFS
server that went away) would stall every connection with it: C{O_NONBLOCK} means nothing to a regular
file, so the reactor cannot find out that a write would block before it does.  L{AccessLogFile}
therefore only appends the record to a list on the reactor thread (about 0.1 µs); 10 ms after the first
record of a list (by default), the list goes to a writer thread, which joins it and writes it with one
C{write(2)}.  The writer is woken at most a hundred times a second whatever the load, and may block as long
as the disk wants: the reactor keeps serving.  (Batched writes from the reactor thread, once a turn, cost
the reactor about as little under load, and block it whenever the disk blocks: C{benchmarks/accesslog.py}.)

Memory stays bounded.  The records taken but not yet written (on the list, queued, or in the writer's
hands) may hold at most C{maxBuffered} bytes, counted in bytes since a record's length is bounded only by
the request line's; a record that would go over is dropped and counted in L{AccessLogFile.dropped}.  The
first drop is logged as a warning at once, the next ones together at most once a minute, saying how many.
A stalled disk thus costs records, never memory, and never latency.

Rotation follows logrotate's C{create} mode: the file is renamed away, a new one is created, and the
proxy is told to reopen the path (SIGUSR1, by L{ReopenOnSignal}; a reload calls L{AccessLogFile.reopen}
too).  The writer writes whole batches and reopens between two of them, in the order the reactor asked,
so each record is one whole line of exactly one of the files: those taken before the reopen are in the
renamed file, those after in the new one.  A record is one line: a newline inside it is written as
C{\\n}, so that no record can forge another.

The writer thread lives in the process that made the L{AccessLogFile}: a worker forked afterwards has none,
so each worker makes its own.  Several processes may append to one file: each batch is one C{write(2)}
with C{O_APPEND}, which Linux does not interleave with another process's on a local file system.

L{TwistedLogDestination} sends each record to the Twisted log instead (the C{-} destination), and both
answer to L{AccessLogSink}.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads
from twisted.logger import Logger

from rproxy.signals import OnSignal

__all__ = ["AccessLogFile", "AccessLogSink", "ReopenOnSignal", "TwistedLogDestination"]

_log = Logger()
_accessLog = Logger(namespace="rproxy.access")

#: How a log file is opened: appended to (whole writes land at its end whatever other processes append),
#: created if missing (after a rotation that did not create it), never inherited by a child process.
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class AccessLogSink(Protocol):
    """Where access log records go."""

    def write(self, line: bytes) -> None:
        """
        Take one record, without its line end, on the reactor thread: this must cost next to nothing and
        never block.
        """

    def reopen(self) -> None:
        """Reopen the destination by its name (after a rotation renamed it away)."""

    def close(self) -> Deferred[None]:
        """Write out what is held, within a bounded time, and let go of the destination; fires when done."""


class _Reactor(Protocol):
    """What L{AccessLogFile} asks of the reactor: timed calls, and calls from its writer thread."""

    def callLater(self, delay: float, callable: Callable[..., object], /, *args: object, **kw: object) -> IDelayedCall:
        """See L{twisted.internet.interfaces.IReactorTime.callLater}."""

    def callFromThread(self, callable: Callable[..., object], /, *args: object, **kw: object) -> None:
        """See L{twisted.internet.interfaces.IReactorFromThreads.callFromThread}."""


class AccessLogFile:
    """
    An access log file, written by a thread of its own (see the module's docstring).

    @ivar path: the file's absolute path, opened again by L{reopen}.
    @ivar dropped: how many records were not written: taken while the buffer was full, or lost to a write
        that failed (a full disk), or still held when L{close} gave up.
    """

    def __init__(
        self,
        path: str,
        reactor: _Reactor,
        maxBuffered: int = 8 * 1024 * 1024,
        flushDelay: float = 0.01,
        warnInterval: float = 60.0,
        closeTimeout: float = 5.0,
        descriptor: int | None = None,
    ) -> None:
        """
        Open the file (raising L{OSError} when it cannot be) and start its writer thread.

        @param reactor: the reactor whose thread calls L{write}.
        @param maxBuffered: how many bytes of records may wait for the writer; more are dropped.
        @param flushDelay: how long a record waits for others before they go to the writer together: a
            hand-over costs the reactor a few microseconds (and wakes the writer), a record well under one.
        @param warnInterval: the least number of seconds between two warnings about dropped records.
        @param closeTimeout: how long L{close} waits for the writer before it gives up on what is left.
        @param descriptor: write to (a duplicate of) this open descriptor instead of opening C{path}, which
            then only names it: standard output (L{standardOutput}), which is never reopened.
        """
        self.path = os.path.abspath(path) if descriptor is None else path
        self._reopenable = descriptor is None
        self.dropped = 0
        self._reactor = reactor
        self._maxBuffered = maxBuffered
        self._flushDelay = flushDelay
        self._warnInterval = warnInterval
        self._closeTimeout = closeTimeout
        # The reactor thread's side.
        self._pending: list[bytes] = []
        self._taken = 0  # bytes of the records taken so far
        self._records = 0  # how many records were taken
        self._handOff: IDelayedCall | None = None
        self._dropReason = ""
        self._droppedWhenWarned = 0
        self._quiet: IDelayedCall | None = None  # set while a warning is recent
        self._closed: Deferred[None] | None = None
        self._closeTimer: IDelayedCall | None = None
        self._gaveUp = False  # whether close gave up on the writer
        # The writer thread's side: only it changes these, the reactor thread reads _written.
        self._fd = os.open(self.path, _FLAGS, 0o644) if descriptor is None else os.dup(descriptor)
        self._written = 0  # bytes of the records written (or given up on) so far
        self._recordsWritten = 0
        self._lineOpen = False  # whether a failed write left a record cut short
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._work, name=f"access log {self.path}", daemon=True)
        self._writer.start()

    @property
    def buffered(self) -> int:
        """How many bytes of records are taken and not yet written (at most C{maxBuffered})."""
        return self._taken - self._written

    def write(self, line: bytes) -> None:
        """Take one record (without its line end), or drop it when C{maxBuffered} bytes are waiting already."""
        size = len(line) + 1
        if self._taken - self._written + size > self._maxBuffered:
            self._drop(1, "the writer is behind (is the disk stalled?) and the buffer is full")
            return
        self._pending.append(line)
        self._taken += size
        self._records += 1
        if self._handOff is None:
            self._handOff = self._reactor.callLater(self._flushDelay, self._handOver)

    def reopen(self) -> None:
        """
        Close the file and open its path again, once the records taken so far are written to the old one.
        When the path cannot be opened, an error is logged and the records keep going to the old file.
        """
        if self._closed is None:
            self._handOver()
            self._jobs.put(self._reopenFile)

    def close(self) -> Deferred[None]:
        """
        Write what is held and close the file; fires when done, or after C{closeTimeout} seconds (then what
        is left is counted as dropped, and the writer, stuck on the destination, is left to the process's
        end).  Records written afterwards are dropped.
        """
        if self._closed is not None:
            return self._closed
        self._maxBuffered = -1  # every record from now on is dropped, at no cost to the hot path
        self._handOver()
        self._jobs.put(None)
        self._closed = Deferred()
        self._closeTimer = self._reactor.callLater(self._closeTimeout, self._giveUp)
        if self._quiet is not None:
            self._quiet.cancel()
            self._warnDropped()  # the drops since the last warning
        return self._closed

    def _handOver(self) -> None:
        """Give the writer the records taken since the last time (C{flushDelay} after the first of them)."""
        if self._handOff is not None:
            if self._handOff.active():
                self._handOff.cancel()
            self._handOff = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._jobs.put(partial(self._writeBatch, batch))

    def _drop(self, count: int, reason: str) -> None:
        """Count C{count} records as dropped; warn unless a warning is recent."""
        if self._gaveUp:
            return  # the writer's records were counted when close gave up on them
        self.dropped += count
        self._dropReason = reason
        if self._quiet is None and self._closed is None:
            self._warnDropped()

    def _warnDropped(self) -> None:
        """Say how many records were dropped since the last warning; keep quiet for C{warnInterval}."""
        self._quiet = None
        count = self.dropped - self._droppedWhenWarned
        if not count:
            return
        _log.warn(
            "access log {path}: {count} records dropped: {reason}",
            path=self.path,
            count=count,
            reason=self._dropReason,
            dropped=self.dropped,
        )
        self._droppedWhenWarned = self.dropped
        if self._closed is None:
            self._quiet = self._reactor.callLater(self._warnInterval, self._warnDropped)

    def _giveUp(self) -> None:
        """The writer did not finish within C{closeTimeout}: count what it holds as dropped, and be done."""
        assert self._closed is not None
        left = self._records - self._recordsWritten
        self.dropped += left
        self._gaveUp = True
        _log.warn(
            "access log {path}: {count} records not written {timeout:g}s after it was closed: {reason}",
            path=self.path,
            count=left,
            timeout=self._closeTimeout,
            reason="the writer is stuck (is the disk stalled?)",
            dropped=self.dropped,
        )
        self._closed.callback(None)

    def _finished(self) -> None:
        """The writer wrote everything and closed the file."""
        assert self._closed is not None and self._closeTimer is not None
        self._writer.join()  # it has nothing left to do but return
        if self._closeTimer.active():
            self._closeTimer.cancel()
            self._warnDropped()  # what the last writes lost
            self._closed.callback(None)

    # The writer thread.

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
        os.close(self._fd)
        self._reactor.callFromThread(self._finished)

    def _writeBatch(self, batch: list[bytes]) -> None:
        data = b"\n".join(batch) + b"\n"
        size = len(data)  # as taken: each record and its line end, before any escaping
        if data.count(b"\n") != len(batch):
            data = b"".join(line.replace(b"\n", b"\\n") + b"\n" for line in batch)
        # After a write that failed amid a record, the next starts a new line: that record stays alone.
        prefix = b"\n" if self._lineOpen else b""
        data = prefix + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            done = data[: len(data) - len(view)]
            if done:
                self._lineOpen = not done.endswith(b"\n")
            lost = len(batch) - max(0, done.count(b"\n") - len(prefix))
            self._reactor.callFromThread(self._drop, lost, f"cannot write: {e}")
        else:
            self._lineOpen = False
        self._written += size
        self._recordsWritten += len(batch)

    @classmethod
    def standardOutput(cls, reactor: _Reactor) -> AccessLogFile:
        """
        A sink writing to the process's standard output (shared with the Twisted log's text output when
        C{twist} logs there: both write whole lines to the one file description, so lines never mix).
        """
        return cls("<stdout>", reactor, descriptor=1)

    def _reopenFile(self) -> None:
        if not self._reopenable:
            return
        try:
            fd = os.open(self.path, _FLAGS, 0o644)
        except OSError as e:
            self._reactor.callFromThread(
                _log.error,
                "access log {path}: cannot reopen it, still writing to the old file: {error}",
                path=self.path,
                error=str(e),
            )
            return
        os.close(self._fd)
        self._fd = fd
        self._lineOpen = False
        self._reactor.callFromThread(_log.info, "access log {path}: reopened", path=self.path)


class TwistedLogDestination:
    """
    Access log records as events of the Twisted log (the C{-} destination): each is an C{info} event of the
    C{rproxy.access} namespace, its text in the C{line} field (decoded as UTF-8, any other byte escaped).
    The log's observers write it where the process logs; they own the files, so L{reopen} has nothing to do.
    """

    def write(self, line: bytes) -> None:
        """Log C{line} now."""
        _accessLog.info("{line}", line=line.decode("utf-8", "backslashreplace"))

    def reopen(self) -> None:
        """Nothing to reopen: the Twisted log's observers own their files."""

    def close(self) -> Deferred[None]:
        """Nothing is held."""
        return succeed(None)


class ReopenOnSignal(OnSignal):
    """
    Reopens access logs when the process gets a signal (SIGUSR1, what logrotate's C{postrotate} sends),
    from the reactor thread, between two of its events.
    """

    def __init__(
        self, sinks: Sequence[AccessLogSink], reactor: IReactorFromThreads, signalNumber: int = signal.SIGUSR1
    ) -> None:
        """
        @param sinks: what to reopen.
        @param reactor: the reactor to hand the signal over to, from the signal handler.
        @param signalNumber: the signal.
        """
        super().__init__(signalNumber, reactor)
        self._sinks = tuple(sinks)

    def received(self) -> None:
        """Reopen each sink."""
        for sink in self._sinks:
            sink.reopen()
