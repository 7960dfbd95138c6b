"""
The request body's way from the client to the upstream, with backpressure both ways.

L{RequestBodyPipe} receives body bytes as the client's connection decodes them, holds a bounded amount
until an upstream connection is ready, then writes straight through.  When the upstream's socket
buffer fills, the pipe pauses the client's connection; when it drains, the pipe resumes it.  Up to a
set size, it keeps a copy of what it sent, so that a retry on another upstream can send the body again.
A body already received whole (L{fileBody}: a filter buffered it) is read from its file instead, and sent
again by seeking back in it, whatever its size.
(Response bytes need no pipe: the upstream connection itself is the client request's producer.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from rproxy.errors import ProxyError
from rproxy.headers import Pairs

#: Bytes held while no upstream is attached (or it is paused) before the client is paused.
HIGH_WATER = 65536


class BodyConsumer(Protocol):
    """Where a request body goes: an upstream connection."""

    def writeBody(self, data: bytes) -> None:
        """Send body bytes."""

    def finishBody(self, trailers: Pairs) -> None:
        """The body is complete; C{trailers} are the client's trailer fields (often none)."""

    def failBody(self, error: ProxyError) -> None:
        """The body broke off: the consumer must not let it look complete."""

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        """Let the consumer pause the body's source."""

    def unregisterBodyProducer(self) -> None:
        """The body's source is finished or gone."""


@implementer(IPushProducer)
class RequestBodyPipe:
    """
    A request body in flight.

    @ivar length: the body's length when the client declared it, else C{None} (chunked).
    @ivar received: bytes received from the client so far.
    @ivar complete: whether the client has sent the whole body.
    @ivar trailers: the trailer fields that followed the body, once it is complete.
    @ivar holds: how many times the pipe paused or resumed the client (a window of its minimum body rate in
        which it did does not count).
    """

    _replay: list[bytes] | None = None  # what the current consumer was given, while it may be resent
    _demanded: Callable[[], None] | None = None
    _withheld: Callable[[bytes], bool] | None = None  # by name, the trailer fields never sent on
    _replayLimit = 0
    _replayBytes = 0
    holds = 0

    def __init__(self, source: IPushProducer, length: int | None) -> None:
        self.length = length
        self.received = 0
        self.complete = False
        self.trailers: Pairs = []
        self._source = source
        self._held: list[bytes] = []
        self._heldBytes = 0
        self._consumer: BodyConsumer | None = None
        self._paused = False  # by the consumer
        self._sourcePaused = False
        self._discarding = False
        self._failure: ProxyError | None = None

    # -- the client's side

    def dataReceived(self, data: bytes) -> None:
        """Body bytes from the client (an empty piece, such as an empty HTTP/2 DATA frame, carries nothing)."""
        if not data:
            return
        self.received += len(data)
        if self._discarding:
            return
        consumer = self._consumer
        if consumer is not None and not self._paused:
            self._give(consumer, data)
            return
        self._held.append(data)
        self._heldBytes += len(data)
        if self._paused or self._heldBytes >= HIGH_WATER:
            # Re-assert: the client's channel may have resumed its transport on its own.
            self._pauseSource()

    def finish(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """The client sent the whole body, then C{trailers}."""
        self.complete = True
        self.trailers = list(trailers)
        if self._consumer is not None and not self._paused and not self._held:
            self._end()

    def fail(self, error: ProxyError) -> None:
        """The client's body broke off or was refused: fail the consumer, now or when it attaches."""
        self._failure = error
        self._discarding = True
        self._held = []
        self._heldBytes = 0
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.unregisterBodyProducer()
            consumer.failBody(error)

    def withholdTrailers(self, withheld: Callable[[bytes], bool]) -> None:
        """
        Send on none of the client's trailer fields whose name C{withheld} is true for (the fields a
        request filter consumes: a trailer must not carry what the filters took out of the head).
        """
        self._withheld = withheld

    def whenDemanded(self, callback: Callable[[], None] | None) -> None:
        """
        Call C{callback} on L{demand} (the exchange sends a waiting client its ``100 Continue`` so); C{None}
        forgets it.
        """
        self._demanded = callback

    # -- the upstream's side

    def demand(self) -> None:
        """
        A reader takes the whole body before any upstream is asked (a buffering filter): a client that
        waits for ``100 Continue`` is sent one now, since no upstream will send it.  Only the first call counts.
        """
        demanded, self._demanded = self._demanded, None
        if demanded is not None:
            demanded()

    def attach(self, consumer: BodyConsumer) -> None:
        """Start sending the body to C{consumer}, beginning with what is held."""
        if self._failure is not None:
            consumer.failBody(self._failure)
            return
        self._consumer = consumer
        consumer.registerBodyProducer(self)
        self._flush()

    def keepForReplay(self, limit: int) -> None:
        """Keep a copy of up to C{limit} bytes sent, so that L{rewind} can send them again."""
        self._replay = []
        self._replayLimit = limit

    @property
    def replayable(self) -> bool:
        """Whether the whole body sent so far is kept, so it can be sent again."""
        return self._replay is not None and self._failure is None and not self._discarding

    def detach(self) -> None:
        """The consumer failed: hold what arrives from now on until L{rewind} or L{stopProducing}."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.unregisterBodyProducer()
        self._paused = False

    def rewind(self) -> None:
        """Start again from the first byte, for the next L{attach}; only when L{replayable}."""
        replay = self._replay
        assert replay is not None and self._consumer is None
        self._held[:0] = replay
        self._heldBytes += self._replayBytes
        self._replay = []
        self._replayBytes = 0

    def _give(self, consumer: BodyConsumer, data: bytes) -> None:
        replay = self._replay
        if replay is not None:
            self._replayBytes += len(data)
            if self._replayBytes > self._replayLimit:
                self._replay = None  # too large to keep: this body can be sent only once
            else:
                replay.append(data)
        consumer.writeBody(data)

    # IPushProducer, driven by the consumer's transport

    def pauseProducing(self) -> None:
        self._paused = True
        self._pauseSource()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """The consumer is gone: what the client still sends is read and dropped."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.unregisterBodyProducer()
        self._discarding = True
        self._held = []
        self._heldBytes = 0
        self._resumeSource()

    def _flush(self) -> None:
        consumer = self._consumer
        while self._held and not self._paused and consumer is self._consumer and consumer is not None:
            data = self._held.pop(0)
            self._heldBytes -= len(data)
            self._give(consumer, data)
        if self._paused or self._consumer is None:
            return
        if self.complete:
            self._end()
        else:
            self._resumeSource()

    def _end(self) -> None:
        consumer, self._consumer = self._consumer, None
        assert consumer is not None
        consumer.unregisterBodyProducer()
        trailers, withheld = self.trailers, self._withheld
        if withheld is not None and trailers:
            trailers = [(name, value) for name, value in trailers if not withheld(name)]
        consumer.finishBody(trailers)

    @property
    def sourcePaused(self) -> bool:
        """Whether the pipe holds the client's body back now."""
        return self._sourcePaused

    def _pauseSource(self) -> None:
        self.holds += 1
        self._sourcePaused = True
        self._source.pauseProducing()

    def _resumeSource(self) -> None:
        if self._sourcePaused:
            self.holds += 1
            self._sourcePaused = False
            self._source.resumeProducing()


@implementer(IPushProducer)
class _FileSource:
    """Feeds a pipe from a file holding a whole body, pausing with the pipe; it can start again."""

    CHUNK = 65536

    def __init__(self, file: IO[bytes], pipe: _FileBodyPipe) -> None:
        self._file = file
        self._start = file.tell()
        self._paused = False
        self._pipe: _FileBodyPipe | None = pipe

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        pipe = self._pipe
        while pipe is not None and not self._paused and not pipe.complete:
            data = self._file.read(self.CHUNK)
            if not data:
                pipe.finish()
            else:
                pipe.dataReceived(data)

    def stopProducing(self) -> None:
        self._paused = True
        self._pipe = None

    def rewind(self) -> None:
        """Read from the first byte again."""
        self._file.seek(self._start)


class _FileBodyPipe(RequestBodyPipe):
    """A body read from a file: kept for a retry by the file itself, not by a copy in memory."""

    def __init__(self, file: IO[bytes], length: int) -> None:
        self._fileSource = _FileSource(file, self)
        super().__init__(self._fileSource, length)

    def keepForReplay(self, limit: int) -> None:
        """Nothing to keep: L{rewind} seeks back in the file."""

    @property
    def replayable(self) -> bool:
        return self._failure is None and not self._discarding

    def rewind(self) -> None:
        assert self._consumer is None
        self._held = []
        self._heldBytes = 0
        self.received = 0
        self.complete = False
        self._fileSource.rewind()
        self._fileSource.resumeProducing()

    def stopProducing(self) -> None:
        self._fileSource.stopProducing()  # nothing more is read of the file (it may be closed soon)
        super().stopProducing()


def fileBody(file: IO[bytes], length: int) -> RequestBodyPipe:
    """
    A body pipe reading an already received body of C{length} bytes from C{file}, from its position now;
    a retry reads it again from there.  The file is its caller's to close once the exchange has ended.
    """
    pipe = _FileBodyPipe(file, length)
    pipe._fileSource.resumeProducing()
    return pipe
