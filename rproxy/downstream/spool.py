"""
Bodies held whole by the proxy: in memory up to a threshold, then in a temporary file (L{Spool}); and the
response relay that reads an upstream's body into one at the upstream's speed while the client is written
from it at its own (L{SpooledResponse}).

Temporary files are made with C{tempfile.TemporaryFile}: on Linux (C{O_TMPFILE}) and most other systems it
never has a name in its directory, or loses it at once, so nothing is left on disk whatever happens to the
proxy, even a crash; the space is returned when the spool is closed, which its owner does however the
exchange ends.

The bytes are written to the file on the reactor thread, one received piece at a time (a socket read or an
HTTP/2 DATA frame: at most 64 KiB or so).  Such a write lands in the page cache and costs microseconds; a
thread per write would cost more than it saves, and the bound on each write keeps the reactor's stalls
small even when the disk is slow to flush.  A spool's total is bounded by its owner (C{max-size}).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from rproxy.downstream.contract import Downstream, Producer

#: The most bytes written to a client from a spool in one call.
CHUNK = 65536


@dataclass(frozen=True)
class SpoolSettings:
    """
    Where and how much a spool holds.

    @ivar memory: bytes held in memory; past them, the whole body goes to a temporary file.
    @ivar maxSize: the most bytes the spool takes (what happens beyond is its owner's rule).
    @ivar directory: where temporary files are made (C{None}: the system's temporary directory).
    """

    memory: int
    maxSize: int
    directory: str | None = None


class Spool:
    """
    Bytes appended at the end and read from any offset, in memory up to L{SpoolSettings.memory}, then in a
    temporary file; L{close} releases both.

    @ivar settings: its memory threshold and where its file goes (its C{maxSize} is its owner's to apply).
    @ivar size: bytes held.
    @ivar closed: whether L{close} was called (nothing more may be appended).
    """

    def __init__(self, settings: SpoolSettings) -> None:
        self.settings = settings
        self.size = 0
        self.closed = False
        self._memory = bytearray()
        self._file: IO[bytes] | None = None

    @property
    def onDisk(self) -> bool:
        """Whether the bytes went to a temporary file."""
        return self._file is not None

    def append(self, data: bytes) -> None:
        """
        Add C{data} at the end.

        @raise OSError: the temporary file could not be made or written (the disk is full): the spool is
            closed.
        """
        assert not self.closed
        file = self._file
        if file is None and self.size + len(data) <= self.settings.memory:
            self._memory += data
            self.size += len(data)
            return
        try:
            if file is None:
                file = self._file = tempfile.TemporaryFile(dir=self.settings.directory)
                _writeAt(file, bytes(self._memory), 0)
                self._memory = bytearray()
            _writeAt(file, data, self.size)
        except OSError:
            self.close()
            raise
        self.size += len(data)

    def read(self, offset: int, limit: int) -> bytes:
        """Up to C{limit} bytes from C{offset}."""
        file = self._file
        if file is None:
            return bytes(self._memory[offset : offset + limit])
        return os.pread(file.fileno(), min(limit, self.size - offset), offset)

    def reader(self) -> IO[bytes]:
        """The bytes as a file to read from the first (the spool's own file, or one over its memory)."""
        file = self._file
        if file is None:
            return io.BytesIO(self._memory)
        file.seek(0)
        return file

    def clear(self) -> None:
        """Drop every byte held (a file is kept, truncated, for what comes next)."""
        self.size = 0
        if self._file is None:
            self._memory = bytearray()
        else:
            os.ftruncate(self._file.fileno(), 0)

    def close(self) -> None:
        """Release the memory and the file (it is gone from the disk as it closes); more calls do nothing."""
        self.closed = True
        self._memory = bytearray()
        file, self._file = self._file, None
        if file is not None:
            file.close()


def _writeAt(file: IO[bytes], data: bytes, offset: int) -> None:
    view = memoryview(data)
    fd = file.fileno()
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@implementer(IPushProducer)
class SpooledResponse:
    """
    A response body's way from the upstream to the client through a L{Spool}: the exchange writes what
    the upstream sends to it (L{write}) and says when the upstream is done (L{end}); it is the producer the
    client's side pauses.  While the client keeps up, the bytes go straight through; while it is paused,
    they go to the spool, and the upstream is never paused, so it finishes at its own speed and its
    connection goes back to the pool.  When the spool holds L{SpoolSettings.maxSize} bytes, the upstream is
    paused until the client has taken them all (then the spool starts again empty): beyond its size, a
    response streams with backpressure, as nginx does past C{proxy_max_temp_file_size}.
    """

    def __init__(self, settings: SpoolSettings, downstream: Downstream, upstream: Producer) -> None:
        self._spool = Spool(settings)
        self._downstream = downstream
        self._upstream: Producer | None = upstream
        self._sent = 0  # bytes of the spool written to the client
        self._paused = False  # by the client
        self._upstreamPaused = False
        self._ended: Callable[[], None] | None = None

    @property
    def spooled(self) -> int:
        """Bytes held that the client has not taken yet."""
        return self._spool.size - self._sent

    def write(self, data: bytes) -> None:
        """Response body bytes from the upstream (an error closes the spool and goes to the caller)."""
        spool = self._spool
        if spool.closed:
            return
        if not self._paused and not self.spooled:
            self._downstream.write(data)
            return
        spool.append(data)
        if spool.size >= spool.settings.maxSize and self._upstream is not None and not self._upstreamPaused:
            self._upstreamPaused = True
            self._upstream.pauseProducing()

    def end(self, ended: Callable[[], None]) -> None:
        """The upstream has sent the whole body: call C{ended} once the client has it too."""
        self._upstream = None
        self._ended = ended
        self._drain()

    def close(self) -> None:
        """The exchange is over, however it ended: release the spool."""
        self._upstream = None
        self._ended = None
        self._spool.close()

    # IPushProducer, driven by the client's side

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        upstream = self._upstream
        self.close()
        if upstream is not None:
            upstream.stopProducing()

    def _drain(self) -> None:
        spool = self._spool
        while not self._paused and not spool.closed and self.spooled:
            data = spool.read(self._sent, CHUNK)
            self._sent += len(data)
            self._downstream.write(data)
        if self._paused or spool.closed:
            return
        if spool.size:
            spool.clear()
            self._sent = 0
        if self._upstreamPaused and self._upstream is not None:
            self._upstreamPaused = False
            self._upstream.resumeProducing()
        ended, self._ended = self._ended, None
        if ended is not None:
            ended()
