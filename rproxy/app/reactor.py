"""
The epoll reactor, sending what a loop turn wrote at the end of that turn.

Twisted's epoll reactor sends nothing when a protocol writes: C{startWriting} registers the socket for
C{EPOLLOUT} (an C{epoll_ctl}), the next C{epoll_wait} reports it writable, C{doWrite} sends, and
C{stopWriting} unregisters it (another C{epoll_ctl}).  A proxy writes twice per exchange (the request
upstream, the response to the client), so each small request paid four system calls and two event
dispatches for it.

L{FlushingEPollReactor} instead keeps a connected socket that starts writing in a list, and calls its
C{doWrite} once the turn's events are handled: everything the turn wrote to it goes out in one C{send}.
Only what the kernel does not take waits for C{EPOLLOUT}, as before.

Each event (and each flush) runs in its connection's legacy log context, as Twisted's
C{callWithLogger} sets it (C{system} is the connection's C{logPrefix()}), but pushed straight onto the
reactor thread's context stack: Twisted's way copies the context twice and looks the thread's stack up
twice per event, about 6% of a small proxied request's CPU.

Most flushes are a TCP connection's first bytes of the turn, with no producer to resume and no close
pending: those go out with one C{socket.send} straight from the connection's buffer (L{_sendWhole}),
skipping C{doWrite}'s bookkeeping and the dispatch around it; anything else takes Twisted's C{doWrite}.

C{twist rproxy} installs it unless a reactor was chosen (C{twist --reactor epoll rproxy} keeps Twisted's);
the rproxy plugin also names it C{rproxy}, for C{twistd -r rproxy}; the test suite runs on it
(C{trial --reactor=rproxy}).  On systems without epoll, Twisted's default reactor is installed instead.

This is the one module of rproxy that uses private names of Twisted (C{rproxy.test.test_layout} fails
on one anywhere else).  Each, and why:

  - C{EPollReactor._poller}, C{._selectables}, C{._writes}, C{._doReadOrWrite(selectable, fd, event)}:
    the reactor's loop turn (L{FlushingEPollReactor.doPoll}) is Twisted's own, with the flush added at its
    end; there is no public hook at the end of a turn.
  - C{FileDescriptor._tempDataBuffer}, C{._tempDataLen}, C{._writeDisconnecting} (with the public-named
    C{dataBuffer}, C{offset}, C{SEND_LIMIT}, C{producerPaused}): L{_sendWhole} sends a TCP connection's
    buffer the way C{doWrite} would, without its bookkeeping; it only stands in for classes whose
    C{doWrite} and C{writeSomeData} are Twisted's.
  - C{ContextTracker.contexts} of C{twisted.python.context.theContextTracker}: L{_LogContexts} pushes a
    connection's log context as C{log.callWithLogger} would, without copying the stack twice per event.

C{rproxy.test.test_twisted_contract} checks each of them on the installed Twisted, and
L{missingPrivateNames} checks them when the reactor is installed: if one is gone, Twisted's own epoll
reactor is installed instead, with a warning, so a Twisted release that reshapes them makes rproxy
slower, not wrong.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python import context, log
from twisted.python.log import ILogContext

try:
    from twisted.internet.epollreactor import EPOLLOUT, EPollReactor
except ImportError:  # pragma: no cover (no epoll: not Linux)
    EPollReactor = None  # type: ignore[assignment,misc]


if EPollReactor is not None:

    class FlushingEPollReactor(EPollReactor):  # type: ignore[misc]
        """An epoll reactor that sends what each turn wrote at the end of the turn, without C{EPOLLOUT}."""

        _flushingNow: IWriteDescriptor | None = None  # the writer being flushed, until it stops writing

        def __init__(self) -> None:
            # Writers to flush at the end of this turn, in the order they started writing.
            self._flushing: dict[IWriteDescriptor, None] = {}
            super().__init__()

        def addWriter(self, writer: IWriteDescriptor) -> None:
            if (
                isinstance(writer, abstract.FileDescriptor)
                and writer.connected
                and not writer.disconnected
                and (not self._writes or writer.fileno() not in self._writes)
            ):
                self._flushing[writer] = None
            else:  # a socket still connecting, or anything else: as Twisted does
                super().addWriter(writer)

        def removeWriter(self, writer: IWriteDescriptor) -> None:
            if writer is self._flushingNow:
                self._flushingNow = None  # it sent everything (or is gone)
            self._flushing.pop(writer, None)
            super().removeWriter(writer)

        def getWriters(self) -> list[IWriteDescriptor]:
            return [*super().getWriters(), *self._flushing]

        def removeAll(self) -> list[IReadDescriptor | IWriteDescriptor]:
            flushing = list(self._flushing)
            self._flushing.clear()
            removed = super().removeAll()
            return removed + [writer for writer in flushing if writer not in removed]

        def doPoll(self, timeout: float | None) -> None:
            """Handle the ready descriptors' events as Twisted does, then send what they wrote."""
            if self._flushing:
                timeout = 0  # written from a timer or a thread's call: send without waiting
            try:
                events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
            except OSError as e:
                if e.errno == errno.EINTR:
                    return
                raise
            logged = _LogContexts.ofThisThread()
            selectables = self._selectables
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is not None:
                    logged.call(selectable, self._doReadOrWrite, fd, event)
            self._flush(logged)

        doIteration = doPoll

        def _flush(self, logged: _LogContexts) -> None:
            """Send what this turn wrote; what the kernel does not take waits for C{EPOLLOUT}."""
            flushing, self._flushing = self._flushing, {}
            for writer in flushing:
                fd = writer.fileno()
                if fd == -1 or writer.disconnected:  # type: ignore[attr-defined]
                    continue
                sent = _sendWhole(writer)
                if sent is _SENT:
                    continue
                if sent is _DECLINED:
                    self._flushingNow = writer
                    logged.call(writer, self._doReadOrWrite, fd, EPOLLOUT)
                    if self._flushingNow is not writer or writer in self._flushing:
                        continue  # it stopped writing (all sent, or it is gone), or wrote again meanwhile
                EPollReactor.addWriter(self, writer)  # bytes are left: they wait for EPOLLOUT
            self._flushingNow = None


#: What L{_sendWhole} did.
_SENT, _LEFT, _DECLINED = "sent", "left", "declined"
#: Writer classes whose C{doWrite} and C{writeSomeData} are Twisted's TCP ones, and so L{_sendWhole} may stand in.
_stockWriters: dict[type, bool] = {}


def _sendWhole(writer: Any) -> str:
    """
    What Twisted's C{doWrite} does with a TCP connection's buffer, in the usual case: nothing left over
    from an earlier send, at most C{SEND_LIMIT} bytes, no close pending, and no producer to resume once the
    buffer is empty.  Then the buffered bytes go out in one C{send}, and are L{_SENT}, or what the kernel
    did not take is L{_LEFT} where C{doWrite} will find it.  Anything else is L{_DECLINED} (nothing
    changed): C{doWrite} handles it, as it does a failed C{send}.
    """
    stock = _stockWriters.get(type(writer))
    if stock is None:
        stock = _stockWriters[type(writer)] = (
            isinstance(writer, tcp.Connection)
            and type(writer).doWrite is abstract.FileDescriptor.doWrite
            and type(writer).writeSomeData is tcp.Connection.writeSomeData
        )
    if (
        not stock
        or writer.dataBuffer
        or writer._tempDataLen > writer.SEND_LIMIT
        or writer.disconnecting
        or writer._writeDisconnecting
        or (writer.producer is not None and (writer.producerPaused or not writer.streamingProducer))
    ):
        return _DECLINED
    chunks = writer._tempDataBuffer
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        sent = writer.socket.send(data)
    except OSError:
        return _DECLINED
    writer._tempDataBuffer = []
    writer._tempDataLen = 0
    if sent == len(data):
        return _SENT
    writer.dataBuffer = data
    writer.offset = sent
    return _LEFT


class _LogContexts:
    """
    What C{log.callWithLogger} does for each event, for one reactor turn: the thread's context stack and
    the log context the turn started in are looked up once, and each call pushes one new context.
    """

    def __init__(self, stack: context.ContextTracker | None) -> None:
        self._stack = stack
        self._base: dict[str, Any] = stack.getContext(ILogContext) if stack is not None else {}

    @classmethod
    def ofThisThread(cls) -> _LogContexts:
        """The contexts of the calling thread (none to push onto if a custom tracker is installed)."""
        tracker = context.theContextTracker
        return cls(tracker.currentContext() if isinstance(tracker, context.ThreadedContextTracker) else None)

    def call(self, selectable: Any, function: Callable[[Any, int, int], object], fd: int, event: int) -> None:
        """C{log.callWithLogger(selectable, function, selectable, fd, event)}."""
        stack = self._stack
        if stack is None:
            log.callWithLogger(selectable, function, selectable, fd, event)
            return
        try:
            prefix = selectable.logPrefix()
        except KeyboardInterrupt:
            raise
        except BaseException:
            prefix = "(buggy logPrefix method)"
            log.err(system=prefix)
        contexts = stack.contexts
        contexts.append({ILogContext: {**self._base, "system": prefix}})
        try:
            function(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(system=prefix)
        finally:
            contexts.pop()


#: The private state L{FlushingEPollReactor} and L{_sendWhole} use (see the module's docstring).
REACTOR_STATE = ("_poller", "_selectables", "_writes", "_doReadOrWrite")
WRITER_STATE = ("_tempDataBuffer", "_tempDataLen", "_writeDisconnecting", "dataBuffer", "offset", "SEND_LIMIT")


def missingPrivateNames(reactor: object) -> list[str]:
    """The private names this module uses that C{reactor} (an epoll reactor) or Twisted's TCP connections lack."""
    writer = abstract.FileDescriptor(reactor)  # type: ignore[arg-type]
    missing = [f"EPollReactor.{name}" for name in REACTOR_STATE if not hasattr(reactor, name)]
    missing += [f"tcp.Connection.{name}" for name in WRITER_STATE if not hasattr(writer, name)]
    if not hasattr(context.theContextTracker, "currentContext") or not isinstance(
        getattr(context.theContextTracker.currentContext(), "contexts", None), list
    ):
        missing.append("ContextTracker.contexts")
    return missing


def install() -> None:
    """
    Install L{FlushingEPollReactor}; Twisted's epoll reactor if this Twisted lacks a private name it uses
    (with a warning), Twisted's default reactor where there is no epoll.
    """
    if EPollReactor is None:  # pragma: no cover
        from twisted.internet import default

        default.install()
        return
    from twisted.internet.main import installReactor

    reactor: EPollReactor = FlushingEPollReactor()
    missing = missingPrivateNames(reactor)
    if missing:
        reactor = EPollReactor()
        Logger().warn(
            "rproxy's reactor needs {missing}, which this Twisted lacks: Twisted's epoll reactor runs instead",
            missing=", ".join(missing),
        )
    installReactor(reactor)


def installUnlessChosen() -> None:
    """Install rproxy's reactor, unless one is installed already (chosen on the command line)."""
    if "twisted.internet.reactor" not in sys.modules:
        install()
