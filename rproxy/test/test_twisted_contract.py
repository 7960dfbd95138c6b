"""
The private names of Twisted that rproxy uses, all in L{rproxy.app.reactor} (its docstring says why).

If a Twisted release renames or reshapes one of them, these tests fail first, naming what moved, and the
reactor's own check (L{rproxy.app.reactor.missingPrivateNames}) makes C{twist rproxy} fall back to
Twisted's epoll reactor instead of misbehaving.  C{make test} runs them on the oldest and the newest
Twisted that setup.py admits.
"""

from __future__ import annotations

import inspect

from twisted.internet import defer, epollreactor, protocol
from twisted.python import context, log
from twisted.python.log import ILogContext
from twisted.trial import unittest

from rproxy.app.reactor import REACTOR_STATE, WRITER_STATE, FlushingEPollReactor, missingPrivateNames
from rproxy.test.support import listen, rawRequest


class ReactorStateContractTests(unittest.TestCase):
    """The epoll reactor's loop state that L{FlushingEPollReactor.doPoll} runs Twisted's turn with."""

    def test_state(self) -> None:
        built = FlushingEPollReactor()
        self.addCleanup(built._poller.close)
        self.addCleanup(built.waker.connectionLost, None)
        self.assertEqual(missingPrivateNames(built), [])
        self.assertIsInstance(built._selectables, dict)
        self.assertIsInstance(built._writes, (set, dict))  # of file descriptors
        self.assertEqual(list(inspect.signature(built._poller.poll).parameters)[:2], ["timeout", "maxevents"])
        self.assertEqual(
            list(inspect.signature(epollreactor.EPollReactor._doReadOrWrite).parameters),
            ["self", "selectable", "fd", "event"],
        )

    def test_missingNamed(self) -> None:
        """The check names what a reactor lacks."""
        self.assertEqual(
            missingPrivateNames(object()),
            [f"EPollReactor.{name}" for name in REACTOR_STATE],
        )
        self.assertIn("_tempDataBuffer", WRITER_STATE)


class LogContextContractTests(unittest.TestCase):
    """
    L{rproxy.app.reactor._LogContexts} pushes onto the thread's C{contexts} list what C{log.callWithLogger}
    makes current: the log context with the selectable's C{logPrefix()} as its C{system}.
    """

    def test_callWithLoggerPushesOntoContexts(self) -> None:
        tracker = context.theContextTracker
        self.assertIsInstance(tracker, context.ThreadedContextTracker)
        stack = tracker.currentContext()
        depth = len(stack.contexts)
        seen: list[tuple[int, object]] = []

        class Selectable:
            def logPrefix(self) -> str:
                return "a-connection"

        def during() -> None:
            seen.append((len(stack.contexts), context.get(ILogContext)["system"]))

        log.callWithLogger(Selectable(), during)
        self.assertEqual(seen, [(depth + 1, "a-connection")])
        self.assertEqual(len(stack.contexts), depth)


class _Capture(protocol.Protocol):
    def __init__(self, made: defer.Deferred[protocol.Protocol]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


class WriteBufferContractTests(unittest.TestCase):
    """
    rproxy.app.reactor._sendWhole does what C{FileDescriptor.doWrite} does in its usual case, on the same
    state: the buffers C{write} fills, the producer flags and the pending-close flags.
    """

    async def test_bufferState(self) -> None:
        made: defer.Deferred[protocol.Protocol] = defer.Deferred()
        listening = listen(self, protocol.Factory.forProtocol(lambda: _Capture(made)))
        client = rawRequest(listening.port, b"", timeout=5)
        transport = (await made).transport
        transport.write(b"ab")
        transport.write(b"cd")
        self.assertEqual((transport.dataBuffer, transport.offset), (b"", 0))
        self.assertEqual((transport._tempDataBuffer, transport._tempDataLen), ([b"ab", b"cd"], 4))
        self.assertEqual(transport.SEND_LIMIT, 128 * 1024)
        for flag in ("producer", "streamingProducer", "producerPaused", "disconnecting", "_writeDisconnecting"):
            self.assertFalse(getattr(transport, flag), flag)
        transport.loseConnection()
        self.assertEqual(await client, b"abcd")
