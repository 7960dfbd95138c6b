"""
A C{multipart/form-data} body rewritten as it streams: file parts to storage, the other fields kept.

The form is parsed with C{multipart}'s C{PushMultipartParser} (sans-I/O: it is fed what arrives, and yields
each part's head, its body bytes and its end; treq already depends on it).  A file part's bytes go to a new
object as they arrive, never to memory or to a file of the proxy's.  The other fields, and in place of each
file part the fields naming its object, are written to the rewritten form: a spooled buffer that stays in
memory while small (the fields are small: C{maxFieldsSize} bounds them), forwarded with its
C{Content-Length} and the SHA-256 of its exact bytes, which the signature carries.

A file part of field C{NAME} is replaced by these fields, in its place: C{NAME.name} (the client's file
name, sanitized: L{safeFilename}; absent if nothing is left of it), C{NAME.content_type} (if the client gave
one), C{NAME.key}, C{NAME.location}, C{NAME.size} and C{NAME.sha256}.  A part with an empty file name (a
file input left empty) is kept as a field.  The rewritten form has a boundary of its own.

A form that is not well formed (a boundary that never comes, a truncated part, a broken part head) is the
client's 400; one over the parser's limits or C{maxFieldsSize}, a 413.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
import unicodedata
from collections.abc import Iterator
from typing import IO

from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser
from twisted.internet.defer import Deferred

from rproxy.errors import clientError
from rproxy.upload.signing import StoredField
from rproxy.upload.storage import IObjectWriter, ObjectSet

#: Bytes of the rewritten form kept in memory before its buffer moves to a temporary file (deleted at once).
SPOOL_IN_MEMORY = 1 << 20

#: The most parts a form may have.
MAX_PARTS = 1000

#: The longest sanitized file name passed on.
MAX_FILENAME = 255


def safeFilename(name: str) -> str | None:
    """
    What of the client's file name C{name} may be passed on: its last path segment (after C{/} or C{\\}), letters,
    digits, C{.}, C{_}, C{-} and spaces kept, anything else C{_}, no leading dot; C{None} when nothing is left.
    """
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    kept = "".join(c if c.isalnum() or c in "._- " else "_" for c in name).strip(" ").lstrip(".")
    return kept[:MAX_FILENAME] or None


def formBoundary(contentType: bytes) -> bytes | None:
    """The boundary of a C{multipart/form-data} C{contentType}, or C{None} if it is another type."""
    from multipart import parse_options_header

    kind, parameters = parse_options_header(contentType.decode("latin-1"))
    if kind != "multipart/form-data":
        return None
    return parameters.get("boundary", "").encode("latin-1")


def _quoted(name: str) -> bytes:
    """A field name in a C{Content-Disposition} quoted string, as the HTML standard escapes it."""
    return name.encode("utf-8").replace(b'"', b"%22").replace(b"\r", b"%0D").replace(b"\n", b"%0A")


class FormRewriter:
    """
    One form being rewritten.

    @ivar boundary: the rewritten form's boundary.
    @ivar fields: the stored file parts, in order.
    """

    def __init__(self, boundary: bytes, objects: ObjectSet, maxFieldsSize: int) -> None:
        """
        @param boundary: the client's form's boundary.
        @param objects: where file parts are stored (and what is dropped if the request fails).
        @param maxFieldsSize: the most bytes of the rewritten form (the fields, and those naming the objects).
        @raise rproxy.errors.ProxyError: the boundary is not one (400).
        """
        if not 1 <= len(boundary) <= 70:
            raise clientError(400, "multipart/form-data body without a valid boundary parameter")
        self._parser = PushMultipartParser(boundary, max_segment_count=MAX_PARTS)
        self._objects = objects
        self._maxFieldsSize = maxFieldsSize
        self.boundary = b"rproxy-" + secrets.token_hex(16).encode("ascii")
        self.fields: list[StoredField] = []
        self._out: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)
        self._digest = hashlib.sha256()
        self._size = 0
        self._segment: MultipartSegment | None = None
        self._writer: IObjectWriter | None = None

    @property
    def forwardedType(self) -> bytes:
        """The rewritten form's C{Content-Type}."""
        return b"multipart/form-data; boundary=" + self.boundary

    def feed(self, data: bytes) -> Deferred[None] | None:
        """
        Parse C{data}, the next bytes of the form (C{b""}: the end).

        @return: C{None} when more may follow at once, else a Deferred that fires when the objects can take
            more (the rest of C{data} is handled by then), or fails with a L{rproxy.errors.ProxyError}.
        @raise rproxy.errors.ProxyError: the form is broken or too large.
        """
        try:
            events = list(self._parser.parse(data))
        except ParserLimitReached as e:
            raise clientError(413, f"multipart/form-data body over a limit: {e}") from None
        except ParserError as e:
            raise clientError(400, f"malformed multipart/form-data body: {e}") from None
        return self._handle(iter(events))

    def _handle(self, events: Iterator[MultipartSegment | bytes | None]) -> Deferred[None] | None:
        """Handle C{events} until one must be waited for; then go on when it has been."""
        for event in events:
            if isinstance(event, MultipartSegment):
                self._begin(event)
                continue
            waiting = self._end() if event is None else self._part(event)
            if waiting is not None:
                return waiting.addCallback(lambda _: self._handle(events))
        return None

    async def finish(self) -> tuple[IO[bytes], int, str]:
        """The whole form arrived: the rewritten form (at its start), its length and SHA-256."""
        waiting = self.feed(b"")
        if waiting is not None:
            await waiting
        if not self._parser.closed:
            raise clientError(400, "malformed multipart/form-data body: it ends before its closing boundary")
        self._emit(b"--" + self.boundary + b"--\r\n")
        self._out.seek(0)
        return self._out, self._size, self._digest.hexdigest()

    def close(self) -> None:
        """Drop the rewritten form's buffer (a failed request)."""
        self._out.close()

    def _begin(self, segment: MultipartSegment) -> None:
        self._segment = segment
        if segment.filename:
            self._writer = self._objects.open()
        else:
            self._field(segment.name or "", segment.content_type)

    def _part(self, data: bytes) -> Deferred[None] | None:
        writer = self._writer
        if writer is None:
            self._emit(data)
            return None
        return writer.write(data)

    def _end(self) -> Deferred[None] | None:
        segment, self._segment = self._segment, None
        writer, self._writer = self._writer, None
        assert segment is not None
        if writer is None:
            self._emit(b"\r\n")
            return None
        return Deferred.fromCoroutine(self._stored(segment, writer))

    async def _stored(self, segment: MultipartSegment, writer: IObjectWriter) -> None:
        """Store the object of a file part, then write the fields naming it."""
        stored = await self._objects.close(writer)
        name = segment.name or ""
        field = StoredField(stored, name, safeFilename(segment.filename or ""), segment.content_type)
        self.fields.append(field)
        described = {"name": field.filename, "content_type": field.contentType, **field.claim()}
        for suffix in ("name", "content_type", "key", "location", "size", "sha256"):
            value = described[suffix]
            if value is not None:
                self._field(f"{name}.{suffix}")
                self._emit(str(value).encode("utf-8") + b"\r\n")

    def _field(self, name: str, contentType: str | None = None) -> None:
        """The head of a field of the rewritten form (its value follows, then CRLF)."""
        head = b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n' % (self.boundary, _quoted(name))
        if contentType:
            head += b"Content-Type: " + contentType.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
        self._emit(head + b"\r\n")

    def _emit(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._maxFieldsSize:
            raise clientError(413, f"multipart/form-data fields over {self._maxFieldsSize} bytes (max-fields-size)")
        self._digest.update(data)
        self._out.write(data)
