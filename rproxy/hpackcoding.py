"""
HPACK (RFC 7541) for rproxy's HTTP/2 connections, both sides: what h2 calls to turn a field list into a field
block and back, cheaper than the hpack library's own coder.

The hpack library's encoder searches its static and dynamic tables entry by entry for every field and
Huffman-codes every literal in pure Python; for a response head of ten fields that was about a tenth of the
proxy's CPU per HTTP/2 request.  L{FieldEncoder} finds a field or a name in a dict, keeps the dynamic table
as a sequence of insertion numbers (an entry's index is how many were inserted after it), and sends
literals without Huffman coding (RFC 7541 lets each literal choose; a decoder reads both).  What the peer
decodes is the same field list, and repeated fields still cost a byte or two: they are indexed as before.

Choices a decoder cannot tell apart from the library's, and why:
 - a field marked sensitive (L{hpack.NeverIndexedHeaderTuple}, or a third tuple item that is true) is a
   never-indexed literal (section 6.2.3) and is never added to the table;
 - a field larger than the whole dynamic table is sent without indexing (section 6.2.2), rather than
   inserted, which would only empty the table (section 4.4);
 - the table is at most L{MAX_TABLE_SIZE} whatever a peer allows (section 4.2: an encoder may use less), so
   a peer that allows a huge table does not make us keep every distinct field a connection ever sends;
 - a size change is signalled at the start of the next block, the smallest size first when it went down
   and up again (section 4.2).

The hpack library's decoder costs about 2 us a field even when the field is one index byte, as most are
after a connection's first request.  L{FieldDecoder} reads the block itself and returns the very tuples its
tables hold for indexed fields; it hands a Huffman-coded string to the library's decoder, through its public
interface, so what RFC 7541 section 5.2 requires of padding and EOS is checked where it always was (and
remembers a few short values it decoded: the same path comes again on a connection, coded the same).  It
refuses what the library refuses, with the library's exceptions, which h2 turns into connection errors:
an index outside the tables, a size update after a field or above the allowed size, a table left larger
than the allowed size, a truncated integer or string, and a header list over C{max_header_list_size}; and
an integer of more than five bytes after its prefix (no legitimate one needs them).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import hpack
from hpack import HeaderTuple, NeverIndexedHeaderTuple

#: The largest dynamic table the encoder keeps for a peer (RFC 7541's default size).
MAX_TABLE_SIZE = 4096

#: RFC 7541 Appendix A: the static table, index 1 first.
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

#: A whole static entry -> its index.
_STATIC_FIELDS = {field: index for index, field in enumerate(STATIC_TABLE, 1)}
#: A static name -> its lowest index.
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(STATIC_TABLE, 1):
    _STATIC_NAMES.setdefault(_name, _index)
del _index, _name

#: What an entry costs in the table beyond its name and value (RFC 7541 section 4.1).
_ENTRY_OVERHEAD = 32

#: The first byte's pattern of each representation (RFC 7541 section 6), and its prefix's width in bits.
_INDEXED = (0x80, 7)
_INCREMENTAL = (0x40, 6)
_WITHOUT_INDEXING = (0x00, 4)
_NEVER_INDEXED = (0x10, 4)
_SIZE_UPDATE = (0x20, 5)

#: The static table as the decoder returns its entries (index 0 is not one).
_STATIC_TUPLES = (HeaderTuple(b"", b""), *(HeaderTuple(name, value) for name, value in STATIC_TABLE))
#: The most bytes an integer may take after its prefix (RFC 7541 section 5.1): enough for 2**35.
_MAX_INTEGER_BYTES = 5
#: What a Huffman-coded string is prefixed with to make a field block of one field without indexing whose
#: value it is: the library's decoder reads it, and its table is never touched.
_HUFFMAN_NAME = b"\x00\x01x"
#: A connection's decoder remembers the Huffman-coded values it decoded, by their coded bytes (a string's code
#: is the same wherever it is sent): mostly paths, which clients send again and again without indexing them.
#: Short ones only, at most so many (cleared when full), never a never-indexed field's, and each connection
#: its own: a client cannot tell by timing what another sent.
_HUFFMAN_CACHED_LENGTH = 128
_HUFFMAN_CACHE_SIZE = 16


def _integer(value: int, representation: tuple[int, int]) -> bytes:
    """C{value} as an HPACK integer (RFC 7541 section 5.1) in the prefix of C{representation}'s first byte."""
    pattern, bits = representation
    limit = (1 << bits) - 1
    if value < limit:
        return bytes((pattern | value,))
    out = bytearray((pattern | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """C{value} as a string literal without Huffman coding (RFC 7541 section 5.2)."""
    length = len(value)
    if length < 0x7F:
        return bytes((length,)) + value
    return _integer(length, (0x00, 7)) + value


class FieldEncoder(hpack.Encoder):
    """
    An HPACK encoder for one connection, with the interface h2 uses of L{hpack.Encoder}: L{encode}, and
    L{header_table_size}, which h2 sets when the peer's SETTINGS_HEADER_TABLE_SIZE changes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._maxSize = MAX_TABLE_SIZE
        self._size = 0
        self._inserted = 0  # how many entries were ever inserted: the next one's insertion number
        self._entries: deque[tuple[bytes, bytes, int]] = deque()  # name, value, insertion number; oldest first
        self._fields: dict[tuple[bytes, bytes], int] = {}  # an entry -> its newest insertion number
        self._names: dict[bytes, int] = {}  # a name -> the newest insertion number of an entry with it
        # The smallest and the last size to signal at the start of the next block (None: none to signal).
        self._sizeMin: int | None = None
        self._sizeLast: int | None = None

    @property
    def header_table_size(self) -> int:
        """The dynamic table's maximum size: what the peer allows, at most L{MAX_TABLE_SIZE}."""
        return self._maxSize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        size = min(value, MAX_TABLE_SIZE)
        if size == self._maxSize and self._sizeLast is None:
            return
        self._maxSize = self._sizeLast = size
        self._sizeMin = size if self._sizeMin is None else min(self._sizeMin, size)
        self._evict(size)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        """
        The field block of C{headers}: an iterable of (name, value) or (name, value, sensitive) tuples or
        L{hpack.HeaderTuple}s, of bytes, pseudo-header fields first (h2 hands them over so).  C{huffman} is
        ignored: literals are never Huffman-coded.
        """
        block = []
        if self._sizeLast is not None:
            assert self._sizeMin is not None
            if self._sizeMin < self._sizeLast:
                block.append(_integer(self._sizeMin, _SIZE_UPDATE))
            block.append(_integer(self._sizeLast, _SIZE_UPDATE))
        for header in headers:
            if type(header) is tuple and len(header) == 2:
                block.append(self._field(header[0], header[1], False))
            elif isinstance(header, hpack.HeaderTuple):
                block.append(self._field(header[0], header[1], not header.indexable))
            else:
                block.append(self._field(header[0], header[1], bool(header[2:3] and header[2])))
        self._sizeMin = self._sizeLast = None  # signalled (once the block is made)
        return b"".join(block)

    def _field(self, name: bytes, value: bytes, sensitive: bool) -> bytes:
        if sensitive:
            return self._literal(name, value, _NEVER_INDEXED)
        field = (name, value)
        index = _STATIC_FIELDS.get(field)
        if index is not None:
            return _integer(index, _INDEXED)
        inserted = self._fields.get(field)
        if inserted is not None:
            return _integer(self._dynamicIndex(inserted), _INDEXED)
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self._maxSize:
            return self._literal(name, value, _WITHOUT_INDEXING)
        encoded = self._literal(name, value, _INCREMENTAL)
        self._evict(self._maxSize - size)
        self._entries.append((name, value, self._inserted))
        self._fields[field] = self._names[name] = self._inserted
        self._inserted += 1
        self._size += size
        return encoded

    def _literal(self, name: bytes, value: bytes, representation: tuple[int, int]) -> bytes:
        index = _STATIC_NAMES.get(name)
        if index is None:
            inserted = self._names.get(name)
            if inserted is not None:
                index = self._dynamicIndex(inserted)
        if index is None:
            return bytes((representation[0],)) + _string(name) + _string(value)
        return _integer(index, representation) + _string(value)

    def _dynamicIndex(self, inserted: int) -> int:
        return len(STATIC_TABLE) + self._inserted - inserted

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until the table holds at most C{room} bytes."""
        entries = self._entries
        while self._size > room:
            name, value, inserted = entries.popleft()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
            if self._fields.get((name, value)) == inserted:
                del self._fields[(name, value)]
            if self._names.get(name) == inserted:
                del self._names[name]


class FieldDecoder(hpack.Decoder):
    """
    An HPACK decoder for one connection, with the interface h2 uses of L{hpack.Decoder}: L{decode},
    C{max_header_list_size} and C{max_allowed_table_size}.
    """

    _lastBlock: bytes | None = None  # the latest block that left the table as it was, while it still is
    _lastFields: list[HeaderTuple] = []  # its fields

    def __init__(self, max_header_list_size: int = 65536) -> None:
        super().__init__(max_header_list_size)
        self.max_allowed_table_size = MAX_TABLE_SIZE
        self._maxSize = MAX_TABLE_SIZE
        self._size = 0
        self._entries: deque[HeaderTuple] = deque()  # newest last
        self._strings = hpack.Decoder(max_header_list_size=1 << 62)  # Huffman-coded strings only
        self._decoded: dict[bytes, bytes] = {}  # Huffman-coded values decoded, by their coded bytes

    @property
    def header_table_size(self) -> int:
        """The dynamic table's maximum size, as the peer's encoder last set it."""
        return self._maxSize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._maxSize = value
        self._lastBlock = None
        self._evict(value)

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:
        """
        The fields of the field block C{data}, as L{hpack.HeaderTuple}s (L{hpack.NeverIndexedHeaderTuple}s for
        never-indexed literals) of bytes, or with C{raw} false of text decoded as UTF-8.

        A block that changes nothing in the table (indexed fields, and literals not indexed but not
        never-indexed either), the same as the latest one while the table has not changed, decodes to the
        very same list: a client that repeats a request sends the same such block each time (indexed fields
        and, from nghttp2's encoder, the C{:path} as a literal).  Callers must not change the list.

        @raise hpack.HPACKDecodingError: (or one of its subclasses) for a block that cannot be decoded.
        @raise hpack.OversizedHeaderListError: for a header list larger than C{max_header_list_size}.
        """
        data = bytes(data)
        if raw and data == self._lastBlock:
            return self._lastFields
        fields: list[HeaderTuple] = []
        listSize, limit, position, end = 0, self.max_header_list_size, 0, len(data)
        repeatable = raw  # the same bytes would decode to the same fields until the table changes
        while position < end:
            first = data[position]
            if first & 0x80:
                index, position = _readInteger(data, position, 7)
                field = self._field(index)
            elif first & 0x40:
                field, position = self._literal(data, position, 6, HeaderTuple)
                self._insert(field)
                repeatable = False
            elif first & 0x20:
                if fields:
                    raise hpack.HPACKDecodingError("Table size update not at the start of the block")
                size, position = _readInteger(data, position, 5)
                if size > self.max_allowed_table_size:
                    raise hpack.InvalidTableSizeError(
                        f"Encoder exceeded max allowable table size: {size} > {self.max_allowed_table_size}"
                    )
                self.header_table_size = size
                repeatable = False
                continue
            else:
                kind = NeverIndexedHeaderTuple if first & 0x10 else HeaderTuple
                field, position = self._literal(data, position, 4, kind)
                if first & 0x10:
                    repeatable = False  # a secret is not kept any longer than its request needs
            fields.append(field)
            listSize += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if listSize > limit:
                raise hpack.OversizedHeaderListError(f"A header list larger than {limit} has been received")
        if self._maxSize > self.max_allowed_table_size:
            raise hpack.InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if repeatable:
            self._lastBlock, self._lastFields = data, fields
        if raw:
            return fields
        try:
            return [field.__class__(field[0].decode("utf-8"), field[1].decode("utf-8")) for field in fields]
        except UnicodeDecodeError as error:
            raise hpack.HPACKDecodingError("Unable to decode headers as UTF-8") from error

    def _field(self, index: int) -> HeaderTuple:
        if 0 < index < len(_STATIC_TUPLES):
            return _STATIC_TUPLES[index]
        dynamic = index - len(_STATIC_TUPLES)
        if 0 <= dynamic < len(self._entries):
            return self._entries[-1 - dynamic]
        raise hpack.InvalidTableIndexError(f"Invalid table index {index}")

    def _literal(self, data: bytes, position: int, bits: int, kind: type[HeaderTuple]) -> tuple[HeaderTuple, int]:
        index, position = _readInteger(data, position, bits)
        if index:
            name = self._field(index)[0]
        else:
            name, position = self._string(data, position, False)
        value, position = self._string(data, position, kind is not NeverIndexedHeaderTuple)
        return kind(name, value), position

    def _string(self, data: bytes, position: int, remember: bool) -> tuple[bytes, int]:
        length, start = _readInteger(data, position, 7)
        stop = start + length
        if stop > len(data):
            raise hpack.HPACKDecodingError("Truncated string literal")
        if not data[position] & 0x80:
            return data[start:stop], stop
        coded = data[position:stop]
        decoded = self._decoded.get(coded) if remember else None
        if decoded is None:
            (field,) = self._strings.decode(_HUFFMAN_NAME + coded, raw=True)
            decoded = field[1]
            if remember and length <= _HUFFMAN_CACHED_LENGTH:
                if len(self._decoded) >= _HUFFMAN_CACHE_SIZE:
                    self._decoded.clear()
                self._decoded[coded] = decoded
        return decoded, stop

    def _insert(self, field: HeaderTuple) -> None:
        self._lastBlock = None  # the indexes mean other fields now
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        self._evict(self._maxSize - size)  # a field larger than the table empties it (section 4.4)
        if size <= self._maxSize:
            self._entries.append(field)
            self._size += size

    def _evict(self, room: int) -> None:
        entries = self._entries
        while self._size > room and entries:
            name, value = entries.popleft()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _readInteger(data: bytes, position: int, bits: int) -> tuple[int, int]:
    """The HPACK integer at C{position} with a prefix of C{bits} (RFC 7541 section 5.1), and where it ends."""
    if position >= len(data):
        raise hpack.HPACKDecodingError("Truncated field")
    limit = (1 << bits) - 1
    value = data[position] & limit
    position += 1
    if value < limit:
        return value, position
    for shift in range(0, 7 * _MAX_INTEGER_BYTES, 7):
        if position >= len(data):
            raise hpack.HPACKDecodingError("Truncated integer")
        byte = data[position]
        position += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise hpack.HPACKDecodingError(f"Integer of more than {_MAX_INTEGER_BYTES} bytes after its prefix")
