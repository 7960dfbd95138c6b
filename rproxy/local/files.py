"""
One file served by the proxy: conditional requests, ranges, and a producer that streams it.

L{FileAnswer} answers C{GET} and C{HEAD} for a file, evaluating the client's preconditions in the order of
RFC 9110 section 13.2.2 (C{If-Match}, C{If-Unmodified-Since}: 412; C{If-None-Match}, C{If-Modified-Since}:
304), then its C{Range} (with C{If-Range}): one range is a 206 with C{Content-Range}, several a
C{multipart/byteranges} 206 (at most L{MAX_RANGES}; more, or a malformed header, and the whole file is sent,
as RFC 9110 allows), none satisfiable a 416.  The validators are C{Last-Modified} and a strong C{ETag} made of
the file's modification time and size, as nginx makes it.

L{FileProducer} is the body's C{IPushProducer}: it reads L{CHUNK} bytes at a time with C{os.pread} and writes
them until the client's side pauses it, so a slow client holds at most a chunk and the transport's buffer
in memory, whatever the file's size.  The reads are synchronous, on the reactor thread: reads of a local
file are short and bounded (one chunk each, at most L{TURN} bytes per reactor turn before it lets other
connections run), as twisted.web.static and nginx without C{aio} read; a file on a slow network disk would
stall the reactor, and is not what a local route is for.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.http import datetimeToString, stringToDatetime
from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy.errors import clientError, proxyError
from rproxy.interfaces import ILocalAnswer
from rproxy.local.paths import notFound, openFile

if TYPE_CHECKING:
    from rproxy.local.responder import Responder
    from rproxy.proxy.message import RequestContext

#: Bytes read and written at a time.
CHUNK = 256 * 1024

#: Bytes written in one reactor turn before the producer lets other work run.
TURN = 4 * CHUNK

#: The most ranges one request may ask for (more: the whole file is sent).
MAX_RANGES = 16

_RANGE = re.compile(rb"\s*(\d*)\s*-\s*(\d*)\s*\Z")
_BOUNDARY = b"rproxy-byteranges-3d1f0a"
_ALLOWED = ((b"Allow", b"GET, HEAD"),)

#: A piece of a body: bytes as they are, or C{(offset, length)} of the file.
Segment = bytes | tuple[int, int]


def contentType(path: str) -> bytes:
    """The media type of C{path} by its extension (C{application/octet-stream} when unknown)."""
    return _typeOf(os.path.splitext(path)[1].lower())


@functools.lru_cache(maxsize=256)
def _typeOf(extension: str) -> bytes:
    import mimetypes  # here: a proxy that serves no file never reads the system's types

    guessed, encoding = mimetypes.guess_type("x" + extension, strict=False)
    if guessed is None or encoding is not None:
        return b"application/octet-stream"
    return guessed.encode("ascii")


def checkMethod(context: RequestContext) -> None:
    """Refuse (405) a method a file does not answer: only C{GET} and C{HEAD}."""
    method = context.inbound.method
    if method not in (b"GET", b"HEAD"):
        raise clientError(405, f"{method[:20].decode('latin-1')} is not served by a file (GET or HEAD)", _ALLOWED)


def _validators(status: os.stat_result) -> tuple[bytes, bytes, int]:
    """The C{ETag}, C{Last-Modified} and modification time (whole seconds) of a file."""
    etag = b'"%x-%x"' % (status.st_mtime_ns // 1_000_000_000, status.st_size)
    modified = int(status.st_mtime)
    return etag, datetimeToString(modified), modified


def _tags(values: Sequence[bytes] | None) -> list[bytes] | None:
    """The entity tags a precondition lists (C{W/} kept), or C{None} when the field is absent."""
    if values is None:
        return None
    return [tag.strip() for value in values for tag in value.split(b",") if tag.strip()]


def _date(headers: Headers, name: bytes) -> int | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    try:
        return int(stringToDatetime(values[0]))
    except (ValueError, IndexError, KeyError):
        return None  # an invalid date is ignored (RFC 9110 section 13.1.3)


def precondition(headers: Headers, etag: bytes, modified: int) -> int | None:
    """
    The status the client's preconditions call for (412, 304), or C{None} to answer normally.

    @param etag: the file's strong entity tag.
    @param modified: its modification time, in whole seconds.
    """
    match = _tags(headers.getRawHeaders(b"if-match"))
    if match is not None:
        if b"*" not in match and etag not in match:
            return 412
    else:
        since = _date(headers, b"if-unmodified-since")
        if since is not None and modified > since:
            return 412
    noneMatch = _tags(headers.getRawHeaders(b"if-none-match"))
    if noneMatch is not None:
        weak = etag.removeprefix(b"W/")
        if b"*" in noneMatch or any(tag.removeprefix(b"W/") == weak for tag in noneMatch):
            return 304
        return None
    since = _date(headers, b"if-modified-since")
    if since is not None and modified <= since:
        return 304
    return None


def byteRanges(value: bytes, size: int) -> list[tuple[int, int]] | None:
    """
    The satisfiable ranges (first, last byte) of a C{Range} value for a file of C{size} bytes, in the order
    asked; C{None} when the header is to be ignored (another unit, malformed, more than L{MAX_RANGES}).
    """
    unit, equals, spec = value.partition(b"=")
    if not equals or unit.strip().lower() != b"bytes":
        return None
    ranges = []
    parts = [part for part in spec.split(b",") if part.strip()]
    if not parts or len(parts) > MAX_RANGES:
        return None
    for part in parts:
        match = _RANGE.match(part)
        if match is None or match[1] == match[2] == b"":
            return None
        if match[1] == b"":
            suffix = int(match[2])
            if suffix:
                ranges.append((max(0, size - suffix), size - 1))
            continue
        first = int(match[1])
        last = int(match[2]) if match[2] else size - 1
        if last < first:
            return None
        if first < size:
            ranges.append((first, min(last, size - 1)))
    return ranges


def _ifRange(headers: Headers, etag: bytes, modified: bytes) -> bool:
    """Whether the ranges asked for apply: no C{If-Range}, or one that names the file as it is."""
    values = headers.getRawHeaders(b"if-range")
    if not values:
        return True
    value = values[0].strip()
    return value == etag if value.startswith((b'"', b"W/")) else value == modified


@implementer(ILocalAnswer)
class FileAnswer:
    """
    Serve one file (see the module).

    @ivar path: the file (already checked to be where it may be served from).
    @ivar fields: fields to send with it (an upstream's C{Content-Disposition}, C{Cache-Control}); a
        C{Content-Type} among them is used instead of the one its extension gives.
    @ivar shownPath: what reasons call it (the request's path, not the file system's).
    """

    def __init__(
        self,
        path: str,
        shownPath: bytes,
        fields: Sequence[tuple[bytes, bytes]] = (),
        reactor: IReactorTime | None = None,
        roots: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.shownPath = shownPath
        self.fields = list(fields)
        self.roots = tuple(roots)
        self._reactor = reactor

    def __repr__(self) -> str:
        return f"<FileAnswer {self.shownPath!r}>"

    def serve(self, context: RequestContext, responder: Responder) -> None:
        checkMethod(context)
        fd, status = openFile(self.path, self.shownPath, self.roots)
        self.serveOpen(fd, status, context, responder)

    def serveOpen(self, fd: int, status: os.stat_result, context: RequestContext, responder: Responder) -> None:
        """Serve the file already open as C{fd}, whose C{stat} is C{status}; the descriptor is closed when done."""
        try:
            if not stat.S_ISREG(status.st_mode):
                raise notFound(self.shownPath, IsADirectoryError())
            segments = self._respond(context, responder, status)
            if sum(len(each) if isinstance(each, bytes) else each[1] for each in segments) > CHUNK:
                FileProducer(fd, segments, responder, self._reactor).start()
                return
            # A small body goes at once: no producer to register.
            for each in segments:
                responder.write(each if isinstance(each, bytes) else os.pread(fd, each[1], each[0]))
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        responder.finish()

    def _respond(self, context: RequestContext, responder: Responder, status: os.stat_result) -> list[Segment]:
        """Send the head for the file whose C{stat} is C{status}; return the body's segments."""
        headers = context.inbound.headers
        size = status.st_size
        etag, modified, seconds = _validators(status)
        fields = [(b"ETag", etag), (b"Last-Modified", modified)]
        fields += [(name, value) for name, value in self.fields if name.lower() != b"content-type"]
        mediaType = next((v for n, v in self.fields if n.lower() == b"content-type"), None) or contentType(self.path)
        outcome = precondition(headers, etag, seconds)
        if outcome == 304:
            responder.sendHead(304, fields, hasBody=False)
            return []
        if outcome == 412:
            raise clientError(412, f"a precondition failed for the file at {self.shownPath.decode('latin-1')!r}")
        fields.append((b"Accept-Ranges", b"bytes"))
        ranges = None
        asked = headers.getRawHeaders(b"range")
        if asked and context.inbound.method == b"GET" and _ifRange(headers, etag, modified):
            ranges = byteRanges(asked[0], size)
        if ranges == []:
            unsatisfiable = [(b"Content-Range", b"bytes */%d" % size)]
            raise clientError(416, f"no range asked for is within the {size} bytes of the file", unsatisfiable)
        if ranges is None:
            responder.sendHead(200, [(b"Content-Type", mediaType), (b"Content-Length", b"%d" % size), *fields])
            whole: list[Segment] = [(0, size)]
            return whole if size and context.inbound.method == b"GET" else []
        if len(ranges) == 1:
            [(first, last)] = ranges
            fields.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
            responder.sendHead(
                206, [(b"Content-Type", mediaType), (b"Content-Length", b"%d" % (last - first + 1)), *fields]
            )
            return [(first, last - first + 1)]
        segments: list[Segment] = []
        for first, last in ranges:
            part = b"\r\n--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
            segments += [part % (_BOUNDARY, mediaType, first, last, size), (first, last - first + 1)]
        segments.append(b"\r\n--%s--\r\n" % _BOUNDARY)
        length = sum(len(each) if isinstance(each, bytes) else each[1] for each in segments)
        multipart = b"multipart/byteranges; boundary=" + _BOUNDARY
        responder.sendHead(206, [(b"Content-Type", multipart), (b"Content-Length", b"%d" % length), *fields])
        return segments


@implementer(IPushProducer)
class FileProducer:
    """
    Streams C{segments} of an open file to a responder, as fast as the client takes them (see the module);
    it closes the file when done or stopped.
    """

    _paused = False
    _stopped = False
    _producing = False
    _later: IDelayedCall | None = None

    def __init__(
        self, fd: int, segments: Sequence[Segment], responder: Responder, reactor: IReactorTime | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor  # type: ignore[assignment]
        self._fd = fd
        self._segments = list(segments)
        self._responder = responder
        self._reactor = reactor
        self._index = 0
        self._offset = 0  # into the current segment

    def start(self) -> None:
        """Register with the responder and start writing."""
        self._responder.registerProducer(self)
        self._produce()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._producing and self._later is None:
            self._produce()

    def stopProducing(self) -> None:
        self._stopped = True
        self._close()

    def _produce(self) -> None:
        self._later = None
        self._producing = True
        written = 0
        responder = self._responder
        try:
            while not (self._paused or self._stopped) and written < TURN:
                if self._index == len(self._segments):
                    self._close()
                    responder.unregisterProducer()
                    responder.finish()
                    return
                segment = self._segments[self._index]
                if isinstance(segment, bytes):
                    data = segment
                else:
                    offset, length = segment
                    data = os.pread(self._fd, min(CHUNK, length - self._offset), offset + self._offset)
                    if not data:  # the file shrank while it was sent: the response cannot be completed
                        raise EOFError()
                if isinstance(segment, bytes) or self._offset + len(data) == segment[1]:
                    self._index += 1
                    self._offset = 0
                else:
                    self._offset += len(data)
                written += len(data)
                responder.write(data)
        except (OSError, EOFError):
            self._close()
            responder.unregisterProducer()
            responder.fail(proxyError(500, "the file could not be read to its end", "proxy_internal_error"))
            return
        finally:
            self._producing = False
        if not (self._paused or self._stopped):
            self._later = self._reactor.callLater(0, self._produce)  # type: ignore[attr-defined]

    def _close(self) -> None:
        later, self._later = self._later, None
        if later is not None and later.active():
            later.cancel()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
