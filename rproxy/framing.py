"""
Where a message body ends (RFC 9112 section 6): Content-Length and the chunked coding, read strictly, the
same way for request bodies from clients and response bodies from upstreams.

Request smuggling lives in the gap between two parsers that read the same bytes differently, so
everything one of them might read another way is refused rather than guessed at:

 - a length is decimal digits only and at most C{2**63 - 1} (an upstream that keeps lengths in 64 bits
   would wrap a larger one, read a short body and take the rest for another request); every
   Content-Length value of a message must agree;
 - a chunk size is 1 to 16 hex digits, at most C{2**63 - 1}, optionally followed by extensions without
   control characters; the whole line at most L{MAX_CHUNK_LINE} bytes, and the extensions of a whole body
   at most L{MAX_EXTENSION_BYTES} (extensions are read past, so a sender could otherwise make the reader
   take in far more bytes than the body has: Go's CVE-2023-39326);
 - every line of the chunked framing ends with CRLF: a bare LF or CR is an error, never a line end;
 - chunk data is followed by exactly CRLF;
 - the trailer section is at most L{MAX_TRAILER_BYTES} and has no folded lines.

Malformed trailer fields (no colon, a name that is not a token, control characters) are dropped: they do
not move the end of the message, and a trailer is only ever advice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from rproxy.headers import Pairs, hasControl, isToken

#: The largest body length accepted, declared or chunked (the largest signed 64-bit integer).
MAX_LENGTH = 2**63 - 1
#: Longest chunk-size line, extensions included, without its CRLF.
MAX_CHUNK_LINE = 4096
#: Most bytes of chunk extensions (from each ``;`` to the line end) in one body.
MAX_EXTENSION_BYTES = 16384
#: Largest trailer section, its line ends included.
MAX_TRAILER_BYTES = 65536

_HEXDIGITS = b"0123456789abcdefABCDEF"
#: What a chunk extension may not hold: control characters other than HTAB.
_EXTENSION_CONTROLS = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])


class MalformedBodyError(ValueError):
    """The framing of a body is broken; C{str()} says how, in one line."""


def contentLength(values: Sequence[bytes]) -> int:
    """
    The body length that the values of a message's Content-Length fields declare (each value may be a
    comma-separated list, whose members must all be equal).

    @raise MalformedBodyError: a value is not a decimal number, the values differ, or the length exceeds
        L{MAX_LENGTH}.
    """
    if len(values) == 1:  # the usual case: one plain number
        value = values[0]
        if value.isdigit() and len(value) < 19:
            return int(value)
    declared = {member.strip(b" \t") for value in values for member in value.split(b",")}
    if len(declared) != 1:
        raise MalformedBodyError("conflicting Content-Length values" if declared else "empty Content-Length")
    (length,) = declared
    if not length.isdigit():
        raise MalformedBodyError(f"invalid Content-Length {length[:40].decode('latin-1')!r}")
    significant = length.lstrip(b"0")
    if len(significant) > 19 or int(significant or b"0") > MAX_LENGTH:
        raise MalformedBodyError(f"Content-Length {length[:40].decode('latin-1')} exceeds {MAX_LENGTH}")
    return int(significant or b"0")


def chunkSize(line: bytes) -> int:
    """
    The size a chunk-size line (without its CRLF) announces, its extensions checked and ignored.

    @raise MalformedBodyError: the line is not C{1*16HEXDIG [ext]}, the size exceeds L{MAX_LENGTH}, or an
        extension holds a control character.
    """
    if len(line) > MAX_CHUNK_LINE:
        raise MalformedBodyError(f"a chunk-size line exceeds {MAX_CHUNK_LINE} bytes")
    size, semicolon, extensions = line.partition(b";")
    if semicolon:
        size = size.rstrip(b" \t")  # BWS before the extensions (RFC 9112 section 7.1.1)
        if len(extensions.translate(None, _EXTENSION_CONTROLS)) != len(extensions):
            raise MalformedBodyError("a chunk extension holds a control character")
    if not size or len(size) > 16 or size.translate(None, _HEXDIGITS):
        raise MalformedBodyError(f"invalid chunk size {size[:40].decode('latin-1')!r}")
    value = int(size, 16)
    if value > MAX_LENGTH:
        raise MalformedBodyError(f"chunk size {size.decode('latin-1')} exceeds {MAX_LENGTH}")
    return value


# The decoder's states: what the next bytes are.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedDecoder:
    """
    Decodes a chunked body as its bytes arrive, handing on the data and, at the end, the trailer fields
    and whatever bytes followed the body.

    @ivar finished: whether the body ended (or the decoder was stopped); it takes no more bytes.
    """

    def __init__(
        self,
        onData: Callable[[bytes], object],
        onEnd: Callable[[Pairs, bytes], object],
        maxTrailerBytes: int = MAX_TRAILER_BYTES,
    ) -> None:
        """
        @param onData: called with each piece of chunk data (never an empty one).
        @param onEnd: called once, with the trailer fields and the bytes after the body.
        @param maxTrailerBytes: the largest trailer section accepted.
        """
        self._onData = onData
        self._onEnd = onEnd
        self._maxTrailerBytes = maxTrailerBytes
        self._state = _SIZE
        self._remaining = 0
        self._buffer = b""
        self._trailerLines: list[bytes] = []
        self._trailerBytes = 0
        self._extensionBytes = 0
        self.finished = False

    def stop(self) -> None:
        """Deliver nothing more: the body's reader is gone."""
        self.finished = True

    def feed(self, data: bytes) -> None:
        """
        Decode C{data}, the next bytes of the body.

        @raise MalformedBodyError: the framing is broken; the decoder takes nothing more.
        """
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        pos = 0
        end = len(data)
        while pos < end and not self.finished:
            if self._state == _DATA:
                take = min(self._remaining, end - pos)
                chunk = data[pos : pos + take] if pos or take != end else data
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
                self._onData(chunk)
                continue
            if self._state == _DATA_END:
                end2 = data[pos : pos + 2]
                if end2 == b"\r\n":
                    pos += 2
                    self._state = _SIZE
                    continue
                if end2 != b"\r":
                    self._fail("chunk data is not followed by CRLF")
                self._buffer = end2
                return
            lf = data.find(b"\n", pos)
            if lf < 0:
                self._hold(data[pos:])
                return
            if lf == pos or data[lf - 1] != 0x0D:
                self._fail("a line of the chunked framing ends with a bare LF")
            line = data[pos : lf - 1]
            pos = lf + 1
            if b"\r" in line:
                self._fail("a line of the chunked framing holds a bare CR")
            if self._line(line):
                self.finished = True
                self._onEnd(_fields(self._trailerLines), data[pos:])
                return

    def _hold(self, rest: bytes) -> None:
        """Keep an incomplete line until more bytes come, within the limit for its kind."""
        if self._state == _SIZE:
            if len(rest) > MAX_CHUNK_LINE + 1:
                self._fail(f"a chunk-size line exceeds {MAX_CHUNK_LINE} bytes")
        elif self._trailerBytes + len(rest) > self._maxTrailerBytes:
            self._fail(f"the trailer section exceeds {self._maxTrailerBytes} bytes")
        if b"\r" in rest[:-1]:
            self._fail("a line of the chunked framing holds a bare CR")
        self._buffer = rest

    def _line(self, line: bytes) -> bool:
        """Take one line of the framing; C{True} when it is the empty line that ends the body."""
        state = self._state
        if state == _SIZE:
            try:
                self._remaining = chunkSize(line)
            except MalformedBodyError:
                self.finished = True
                raise
            semicolon = line.find(b";")
            if semicolon >= 0:
                self._extensionBytes += len(line) - semicolon
                if self._extensionBytes > MAX_EXTENSION_BYTES:
                    self._fail(f"the chunk extensions exceed {MAX_EXTENSION_BYTES} bytes")
            self._state = _DATA if self._remaining else _TRAILER
        elif line:  # a trailer field
            self._trailerBytes += len(line) + 2
            if self._trailerBytes > self._maxTrailerBytes:
                self._fail(f"the trailer section exceeds {self._maxTrailerBytes} bytes")
            if line[:1] in (b" ", b"\t"):
                self._fail("the trailer section holds a folded line")
            self._trailerLines.append(line)
        else:
            return True
        return False

    def _fail(self, reason: str) -> None:
        self.finished = True
        raise MalformedBodyError(reason)


def _fields(lines: Iterable[bytes]) -> Pairs:
    """The well-formed fields of a trailer section's lines; the others are dropped."""
    fields: Pairs = []
    for line in lines:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if sep and isToken(name) and not hasControl(value):
            fields.append((name, value))
    return fields
