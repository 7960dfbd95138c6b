"""
Response compression: zstd, brotli or gzip, as the client's C{Accept-Encoding} prefers, streamed part by part.

The filter L{Compress} compresses a response body the upstream sent unencoded when the client accepts one of
its codings, the media type is worth compressing (text, JSON, XML, JavaScript, SVG, WebAssembly by default)
and the body is not known to be tiny.  It never touches range responses, C{Cache-Control: no-transform}
exchanges, statuses without content (204, 304) or errors.

Each body part the upstream sends is compressed and flushed at once (a sync flush: the compressor's window
and dictionary are kept, the pending bits end on a byte boundary), so a stream such as server-sent events
reaches the client as it is produced, and a response's memory is its compressor's state (about 270 KiB for
gzip, 2 MiB for brotli and zstd with their 512 KiB windows) whatever the body's size.  Flushing costs little
with the parts of a bulk transfer (up to 64 KiB each) and some ratio with tiny ones, which are the streams
that need it.

When it compresses, the representation changes, so the head changes too: C{Content-Encoding} is set,
C{Content-Length} goes (the body is framed by chunks on HTTP/1.1, by DATA frames on HTTP/2), a strong
C{ETag} becomes weak, the digests of the old bytes and C{Accept-Ranges} go; C{Vary: Accept-Encoding} is
added to every response whose form depends on the client's C{Accept-Encoding}, compressed or not, so that
caches keep the forms apart.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import brotli
import zstandard
from zope.interface import implementer

from rproxy.headers import splitTokens
from rproxy.interfaces import FilterEnvironment, IBodyTransform, IResponseFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import RequestContext

#: The media types compressed unless the C{types} option says otherwise.
DEFAULT_TYPES = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/x-ndjson",
    "application/javascript",
    "application/xml",
    "application/*+xml",
    "application/wasm",
    "image/svg+xml",
)

#: Responses with a known length under this many bytes are sent as they are (a compressed tiny body saves
#: nothing, and costs a compressor).
DEFAULT_MIN_SIZE = 1024

#: Base-2 logarithm of the window of brotli and zstd: 512 KiB, which decoders of every browser take, and
#: which keeps a stream's compressor near 2 MiB (their defaults, 4 MiB and 2 MiB windows, cost more per
#: response for little gain on web bodies).
_WINDOW_BITS = 19

#: Fields that describe the bytes as the upstream sent them, wrong once they are compressed.
_DIGESTS = frozenset({b"content-md5", b"content-digest", b"repr-digest", b"digest"})

#: The most elements and parameters of C{Accept-Encoding} read (a browser sends four or five codings, a few
#: qvalues); a longer field is ignored whole (identity is always acceptable): 32 KiB of commas then costs a
#: count, not the parse of 30000 elements (5 ms of the reactor's time).
MAX_CODINGS = 64

#: A qvalue (RFC 9110 section 12.4.2).
_QVALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")

#: A media type or range as the C{types} option takes it: C{type/subtype}, C{type/*}, C{type/*+suffix}, C{*/*}.
_MEDIA_RANGE = re.compile(r"([a-z0-9!#$&^_.+-]+|\*)/(\*|\*\+[a-z0-9!#$&^_.-]+|[a-z0-9!#$&^_.+-]+)")


class _Compressor(Protocol):
    """One body's compressor: each part compressed and flushed, then the stream's end."""

    def compress(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class _Gzip:
    def __init__(self, level: int) -> None:
        self._stream = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16: the gzip wrapper

    def compress(self, data: bytes) -> bytes:
        return self._stream.compress(data) + self._stream.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._stream.flush(zlib.Z_FINISH)


class _Brotli:
    def __init__(self, quality: int) -> None:
        self._stream = brotli.Compressor(quality=quality, lgwin=_WINDOW_BITS)

    def compress(self, data: bytes) -> bytes:
        return self._stream.process(data) + self._stream.flush()

    def end(self) -> bytes:
        return self._stream.finish()


class _Zstd:
    def __init__(self, level: int) -> None:
        parameters = zstandard.ZstdCompressionParameters.from_level(level, window_log=_WINDOW_BITS)
        self._stream = zstandard.ZstdCompressor(compression_params=parameters).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._stream.compress(data) + self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def end(self) -> bytes:
        return self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


@dataclass(frozen=True)
class Coding:
    """
    A content coding the filter can apply.

    @ivar name: its name in C{Accept-Encoding} and C{Content-Encoding}.
    @ivar levelOption: the option that sets its level (or quality).
    @ivar default: its level unless the option says otherwise.
    @ivar lowest: the lowest level it takes (the fastest).
    @ivar highest: the highest level it takes (the smallest output).
    @ivar start: makes the compressor of one body, at a level.
    """

    name: str
    levelOption: str
    default: int
    lowest: int
    highest: int
    start: Callable[[int], _Compressor]


#: The codings by name, in the default order of preference: zstd compresses text about as well as gzip at
#: several times its speed, brotli (quality 4) nearly as well as gzip at twice its speed, gzip everyone takes.
CODINGS = {
    coding.name: coding
    for coding in (
        Coding("zstd", "zstd-level", 3, 1, 19, _Zstd),
        Coding("br", "br-quality", 4, 0, 11, _Brotli),
        Coding("gzip", "gzip-level", 6, 1, 9, _Gzip),
    )
}


@implementer(IBodyTransform)
class CompressedBody:
    """
    One response body compressed as it streams; the compressor is made at the first byte and dropped at the
    end.  An empty body stays empty: a response without one (to a HEAD, or that the upstream ended with its
    head) gets the head a GET's would, and no byte.
    """

    def __init__(self, start: Callable[[], _Compressor]) -> None:
        self._start = start
        self._compressor: _Compressor | None = None

    def transform(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._compressor is None:
            self._compressor = self._start()
        return self._compressor.compress(data)

    def finish(self) -> bytes:
        compressor, self._compressor = self._compressor, None
        return b"" if compressor is None else compressor.end()


def acceptedCodings(values: Iterable[bytes]) -> dict[bytes, float]:
    """
    The codings C{Accept-Encoding} field values list, lower case, with their qvalues (1 when not given).

    An element whose qvalue does not parse is left out; a coding listed twice keeps its lowest qvalue (a
    refusal stands); C{x-gzip} counts as C{gzip} (RFC 9110 section 8.4.1.3).  Values of more than
    L{MAX_CODINGS} elements and parameters in all give none (the response is sent as it is).
    """
    accepted: dict[bytes, float] = {}
    if sum(value.count(b",") + value.count(b";") + 1 for value in values) > MAX_CODINGS:
        return accepted
    for value in values:
        for element in value.split(b","):
            coding, *parameters = element.split(b";")
            coding = coding.strip().lower()
            if not coding:
                continue
            q: float | None = 1.0
            for parameter in parameters:
                name, _, given = parameter.partition(b"=")
                if name.strip().lower() == b"q":
                    given = given.strip()
                    q = float(given) if _QVALUE.fullmatch(given) else None
            if q is None:
                continue
            if coding == b"x-gzip":
                coding = b"gzip"
            accepted[coding] = min(q, accepted.get(coding, q))
    return accepted


def preferredCoding(accepted: Mapping[bytes, float], offered: Sequence[bytes]) -> bytes | None:
    """
    The coding of C{offered} the client gives the highest qvalue in C{accepted} (C{*} stands for those it
    does not name), the first of C{offered} among equals; C{None} when it accepts none of them, or when it
    names C{identity} with a higher qvalue than theirs.
    """
    wildcard = accepted.get(b"*", 0.0)
    best, bestQ = None, 0.0
    for name in offered:
        q = accepted.get(name, wildcard)
        if q > bestQ:
            best, bestQ = name, q
    if best is not None and accepted.get(b"identity", 0.0) > bestQ:
        return None
    return best


class MediaRanges:
    """
    The media types worth compressing: exact types (C{application/json}), whole top-level types
    (C{text/*}), structured-syntax suffixes (C{application/*+json}), or anything (C{*/*}).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self._exact: set[bytes] = set()
        self._types: set[bytes] = set()
        self._suffixes: set[tuple[bytes, bytes]] = set()
        self._any = False
        for pattern in patterns:
            match = _MEDIA_RANGE.fullmatch(pattern.strip().lower())
            if match is None:
                raise ValueError(f"not a media type or range: {pattern!r} (examples: text/*, application/json)")
            kind, subtype = (part.encode("ascii") for part in match.groups())
            if kind == b"*" and subtype != b"*":
                raise ValueError(f"not a media type or range: {pattern!r} (a subtype needs its type)")
            if kind == b"*":
                self._any = True
            elif subtype == b"*":
                self._types.add(kind)
            elif subtype.startswith(b"*+"):
                self._suffixes.add((kind, subtype[1:]))
            else:
                self._exact.add(kind + b"/" + subtype)

    def __contains__(self, contentType: bytes) -> bool:
        """Whether the media type of C{Content-Type} value C{contentType} is one of these."""
        mediaType = contentType.partition(b";")[0].strip().lower()
        if mediaType in self._exact:
            return True
        kind, slash, subtype = mediaType.partition(b"/")
        if not slash:
            return False
        if self._any or kind in self._types:
            return True
        return any(kind == k and subtype.endswith(suffix) for k, suffix in self._suffixes)


#: Statuses whose content is the representation a compressed one can replace: 2xx with content, and not
#: a part of it (206).
_COMPRESSIBLE_STATUSES = frozenset({200, 201, 202, 203})


@implementer(IResponseFilter)
class Compress:
    """
    Compresses the responses the client accepts a coding of (see the module's docstring for which).

    @ivar codings: the codings it applies, in its order of preference, with their levels.
    @ivar minSize: responses with a known length under this many bytes (or empty) are left as they are.
    @ivar types: the media types it compresses.
    """

    def __init__(
        self,
        codings: Sequence[tuple[Coding, int]] | None = None,
        minSize: int = DEFAULT_MIN_SIZE,
        types: MediaRanges | None = None,
    ) -> None:
        if codings is None:
            codings = [(coding, coding.default) for coding in CODINGS.values()]
        self.codings = tuple(codings)
        self.minSize = minSize
        self.types = MediaRanges(DEFAULT_TYPES) if types is None else types
        self._offered = [coding.name.encode("ascii") for coding, _ in self.codings]
        self._starters = {
            name: functools.partial(coding.start, level)
            for name, (coding, level) in zip(self._offered, self.codings, strict=True)
        }

    def onResponse(
        self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]
    ) -> IBodyTransform | None:
        if status not in _COMPRESSIBLE_STATUSES and status != 304:
            return None
        fields: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)
        request = context.inbound.headers
        if _noTransform(fields.get(b"cache-control"), request.getRawHeaders(b"cache-control")):
            return None
        if b"content-range" in fields or set(splitTokens(fields.get(b"content-encoding", ()))) - {b"identity"}:
            return None
        contentType = fields.get(b"content-type")
        if contentType is None and status != 304:
            return None  # a 304 usually omits it: its Vary and ETag must still match the 200's
        if contentType is not None and contentType[0] not in self.types:
            return None
        if status != 304 and _tooShort(fields.get(b"content-length"), self.minSize):
            return None
        _addVary(headers, fields.get(b"vary"))
        chosen = preferredCoding(acceptedCodings(request.getRawHeaders(b"accept-encoding", ())), self._offered)
        if chosen is None:
            return None
        _weakenETag(headers)
        if status == 304:
            return None
        headers[:] = [(name, value) for name, value in headers if name.lower() not in _REPLACED]
        headers.append((b"Content-Encoding", chosen))
        return CompressedBody(self._starters[chosen])


#: The fields compressing replaces or removes.
_REPLACED = _DIGESTS | {b"content-length", b"content-encoding", b"accept-ranges"}


def _noTransform(response: Sequence[bytes] | None, request: Sequence[bytes] | None) -> bool:
    """Whether C{Cache-Control} of the response or the request says C{no-transform}."""
    for values in (response, request):
        if values and any(token.partition(b"=")[0].strip() == b"no-transform" for token in splitTokens(values)):
            return True
    return False


def _tooShort(lengths: Sequence[bytes] | None, minSize: int) -> bool:
    """Whether C{Content-Length} says the body is empty or under C{minSize} bytes (unknown: it is not)."""
    if not lengths:
        return False
    try:
        length = int(lengths[0])
    except ValueError:
        return True  # the upstream side refuses such framing; nothing to compress then
    return length < max(minSize, 1)


def _addVary(headers: list[tuple[bytes, bytes]], vary: Sequence[bytes] | None) -> None:
    """Add C{Accept-Encoding} to C{Vary}: to its last field if there is one, unless listed or C{*}."""
    if not vary:
        headers.append((b"Vary", b"Accept-Encoding"))
        return
    listed = set(splitTokens(vary))
    if b"accept-encoding" in listed or b"*" in listed:
        return
    for i in range(len(headers) - 1, -1, -1):
        name, value = headers[i]
        if name.lower() == b"vary":
            headers[i] = (name, value + b", Accept-Encoding" if value.strip() else b"Accept-Encoding")
            return


def _weakenETag(headers: list[tuple[bytes, bytes]]) -> None:
    """Make a strong C{ETag} weak: the compressed bytes differ, the content is the same."""
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"etag" and value.startswith(b'"'):
            headers[i] = (name, b"W/" + value)


def buildCompress(options: PluginOptions, environment: FilterEnvironment) -> Compress:
    """A L{Compress} from the options of a C{[filters.X]} table with C{type = "compress"}."""
    names = options.strings("encodings", tuple(CODINGS))
    if not names:
        raise options.error("encodings", "must name at least one of " + ", ".join(CODINGS))
    codings: list[tuple[Coding, int]] = []
    for name in names:
        coding = CODINGS.get(name.strip().lower())
        if coding is None:
            raise options.error("encodings", f"unknown coding {name!r} (known: {', '.join(CODINGS)})")
        if any(coding is chosen for chosen, _ in codings):
            raise options.error("encodings", f"{name!r} is listed twice")
        codings.append((coding, _level(options, coding)))
    for coding in CODINGS.values():
        if not any(coding is chosen for chosen, _ in codings):
            _level(options, coding)  # read (and checked) though unused, so that it is no unknown option
    minSize = options.size("min-size", DEFAULT_MIN_SIZE)
    try:
        types = MediaRanges(options.strings("types", DEFAULT_TYPES))
    except ValueError as e:
        raise options.error("types", str(e)) from None
    return Compress(codings, minSize, types)


def _level(options: PluginOptions, coding: Coding) -> int:
    level = options.integer(coding.levelOption, coding.default, coding.lowest)
    assert level is not None
    if level > coding.highest:
        raise options.error(coding.levelOption, f"must be at most {coding.highest}, got {level}")
    return level
