"""
L{rproxy.hpackcoding}, against the hpack library's coder (an implementation written apart from it):

 - what L{FieldEncoder} encodes, the library's decoder reads back as the same fields, whatever the sequence of
   blocks and table sizes, and it uses the table as RFC 7541 says a peer must be able to follow;
 - L{FieldDecoder} reads whatever bytes it is given as the library's decoder does: the same fields and the
   same table after each block, or an error where the library has one (differential testing, on arbitrary
   bytes and on the library encoder's blocks with Huffman coding); and it refuses what RFC 7541 says to.

Real peers (nghttp2's h2load, curl, httpx, grpcio) decode it in the HTTP/2 tests over sockets.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rproxy.hpackcoding import MAX_TABLE_SIZE, STATIC_TABLE, FieldDecoder, FieldEncoder

names = st.sampled_from(
    [b"server", b"content-type", b"date", b"set-cookie", b"x-a", b"x-b", b"vary", b"x-" + b"n" * 300]
)
values = st.one_of(st.binary(max_size=6), st.binary(min_size=100, max_size=300), st.just(b"v" * 5000))
fields = st.tuples(names, values, st.booleans())
#: A step: a block of fields, or a SETTINGS_HEADER_TABLE_SIZE from the peer.
steps = st.one_of(st.lists(fields, min_size=1, max_size=8), st.sampled_from([0, 60, 256, 4096, 65536]))


def asInput(name: bytes, value: bytes, sensitive: bool) -> Any:
    """A field as h2 hands it to an encoder: a plain tuple, or a never-indexed one."""
    return hpack.NeverIndexedHeaderTuple(name, value) if sensitive else (name, value)


class RoundTripTests(unittest.TestCase):
    """Whatever the encoder sends, an independent decoder reads back as sent."""

    @settings(max_examples=300, derandomize=True, database=None, deadline=timedelta(seconds=5))
    @given(st.lists(steps, min_size=1, max_size=40))
    def test_roundTrip(self, script: list[Any]) -> None:
        """Every block decodes to its fields, sensitivity included, through table size changes."""
        encoder, decoder = FieldEncoder(), hpack.Decoder()
        for step in script:
            if isinstance(step, int):
                encoder.header_table_size = step
                decoder.max_allowed_table_size = step
                continue
            decoded = decoder.decode(encoder.encode([asInput(*field) for field in step]), raw=True)
            self.assertEqual([(name, value) for name, value in decoded], [(n, v) for n, v, _ in step])
            self.assertEqual([not field.indexable for field in decoded], [s for _, _, s in step])
            self.assertLessEqual(decoder.header_table_size, MAX_TABLE_SIZE)

    def test_static(self) -> None:
        """A whole static entry is one byte; a static name is referred to by its index, not spelt out."""
        encoder = FieldEncoder()
        for index, (name, value) in enumerate(STATIC_TABLE, 1):
            self.assertEqual(encoder.encode([(name, value)]), bytes([0x80 | index]))
        block = encoder.encode([(b"content-type", b"text/html")])
        self.assertNotIn(b"content-type", block)
        self.assertEqual(hpack.Decoder().decode(block, raw=True), [(b"content-type", b"text/html")])

    def test_repeated(self) -> None:
        """A field sent again is a single index byte."""
        encoder, decoder = FieldEncoder(), hpack.Decoder()
        head = [(b":status", b"200"), (b"server", b"nginx"), (b"content-type", b"text/plain")]
        decoder.decode(encoder.encode(head), raw=True)
        again = encoder.encode(head)
        self.assertEqual(len(again), 3)
        self.assertEqual(decoder.decode(again, raw=True), head)

    def test_evictedThenAgain(self) -> None:
        """
        A field sent indexed, then evicted by a smaller table and by insertions, is sent as a literal again:
        the encoder's memory of indexed representations does not outlive the entries.
        """
        encoder, decoder = FieldEncoder(), hpack.Decoder()
        field = (b"x-a", b"1")

        def roundTrip(*fields: tuple[bytes, bytes]) -> None:
            block = encoder.encode(list(fields))
            self.assertEqual([tuple(each) for each in decoder.decode(block, raw=True)], list(fields))

        roundTrip(field)
        roundTrip(field)
        encoder.header_table_size = 0
        roundTrip(field)
        encoder.header_table_size = 4096
        roundTrip(field)
        roundTrip(field, (b"x-b", b"2"))
        encoder.header_table_size = 60  # room for one entry: x-a goes
        roundTrip(field)
        roundTrip((b"x-c", b"3"), field)

    def test_sensitive(self) -> None:
        """A never-indexed field stays out of the table, and says so to the peer (RFC 7541 section 6.2.3)."""
        encoder = FieldEncoder()
        secret = hpack.NeverIndexedHeaderTuple(b"authorization", b"Bearer t")
        first, second = encoder.encode([secret]), encoder.encode([secret])
        self.assertEqual(first, second)
        self.assertEqual(first[0] & 0xF0, 0x10)
        self.assertIn(b"Bearer t", second)

    def test_largerThanTable(self) -> None:
        """A field larger than the table is sent without indexing: the fields already indexed stay."""
        encoder, decoder = FieldEncoder(), hpack.Decoder()
        decoder.decode(encoder.encode([(b"server", b"s")]), raw=True)
        huge = (b"x-huge", b"h" * MAX_TABLE_SIZE)
        block = encoder.encode([huge])
        self.assertEqual(block[0] & 0xF0, 0x00)
        self.assertEqual(decoder.decode(block, raw=True), [huge])
        self.assertEqual(encoder.encode([(b"server", b"s")]), bytes([0x80 | (len(STATIC_TABLE) + 1)]))

    def test_sizeChanges(self) -> None:
        """
        A smaller table is signalled at the start of the next block; one made smaller and then larger again
        is signalled with its smallest size first (RFC 7541 section 4.2); a peer's larger table is capped.
        """
        encoder = FieldEncoder()
        encoder.header_table_size = 65536
        self.assertEqual(encoder.header_table_size, MAX_TABLE_SIZE)
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x88")
        encoder.header_table_size = 0
        encoder.header_table_size = 100
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x20\x3f\x45\x88")
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x88")
        # A peer that changes the size many times before a block is sent gets two updates at most.
        for size in range(2001):
            encoder.header_table_size = 4096 - size % 50
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x3f\xb0\x1f\x3f\xe1\x1f\x88")


#: How the library's decoder fails on some inputs besides its own exceptions (h2 catches these too).
LIBRARY_ERRORS = (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError)


def decodeWith(decoder: hpack.Decoder, block: bytes) -> Any:
    """What C{decoder} makes of C{block}: its fields with their kinds, or C{"error"}."""
    try:
        return [(type(field).__name__, field[0], field[1]) for field in decoder.decode(block, raw=True)]
    except LIBRARY_ERRORS:
        return "error"


#: Blocks a client may repeat, and the blocks that change the table between them: indexed fields (dynamic
#: entries 62 and 63 among them), literals not indexed and never indexed, literals inserted, a size update to
#: 0 and back.
_REPEATED = [
    b"\xbe",
    b"\x82\xbe\xbf",
    b"\x82\x84\x86",
    b"\x82\x04\x02/a\xbe",
    b"\x0f\x2f\x01v\xbf",
    b"\x14\x01x\xbe",
    b"\x40\x01a\x01b",
    b"\x40\x01c\x01d",
    b"\x7e\x01e",
    b"\x20\x3f\xe1\x1f",
]


class DecoderTests(unittest.TestCase):
    """L{FieldDecoder} reads what the library reads, and refuses what it refuses."""

    def assertSameReading(self, blocks: list[bytes], allowed: int = MAX_TABLE_SIZE) -> None:
        """The two decoders agree on every block, and on their tables, until the first error."""
        library, ours = hpack.Decoder(), FieldDecoder()
        library.max_allowed_table_size = ours.max_allowed_table_size = allowed
        for block in blocks:
            expected = decodeWith(library, block)
            try:
                got = decodeWith(ours, block)
            except LIBRARY_ERRORS[1:] as error:  # only the library's own exceptions may leave it
                self.fail(f"{block!r}: {error!r}")
            self.assertEqual(got, expected, block)
            if expected == "error":
                return
            entries = [(name, value) for name, value in library.header_table.dynamic_entries]
            self.assertEqual(entries, [(name, value) for name, value in reversed(ours._entries)])

    @settings(max_examples=1500, derandomize=True, database=None, deadline=timedelta(seconds=5))
    @given(st.lists(st.binary(max_size=24), min_size=1, max_size=4), st.sampled_from([0, 100, 4096]))
    def test_arbitraryBytes(self, blocks: list[bytes], allowed: int) -> None:
        """Whatever the bytes, the same fields or an HPACK error, never another exception."""
        self.assertSameReading(blocks, allowed)

    @settings(max_examples=200, derandomize=True, database=None, deadline=timedelta(seconds=5))
    @given(st.lists(steps, min_size=1, max_size=30), st.booleans())
    def test_libraryEncoder(self, script: list[Any], huffman: bool) -> None:
        """What the library encodes, with Huffman coding or without, through table size changes."""
        encoder, blocks = hpack.Encoder(), []
        for step in script:
            if isinstance(step, int):
                encoder.header_table_size = min(step, MAX_TABLE_SIZE)
            else:
                blocks.append(encoder.encode([asInput(*field) for field in step], huffman=huffman))
        self.assertSameReading(blocks)

    @settings(max_examples=300, derandomize=True, database=None, deadline=timedelta(seconds=5))
    @given(st.lists(st.sampled_from(_REPEATED), min_size=1, max_size=12))
    def test_repeatedBlocks(self, blocks: list[bytes]) -> None:
        """
        A block of indexed fields only, repeated, decodes as the library does however the table changed in
        between (an insertion renumbers the entries, a size update evicts them): the decoder's memory of the
        latest such block never outlives the table it was read with.
        """
        self.assertSameReading(blocks)

    def test_repeatedBlockSameList(self) -> None:
        """
        The same block that leaves the table as it was (indexed fields, a literal not indexed), the table
        unchanged, is the very same list, read once; not a block with a never-indexed literal.
        """
        decoder = FieldDecoder()
        decoder.decode(b"\x40\x01a\x01b", True)
        first = decoder.decode(b"\x82\x04\x02/x\xbe", True)
        self.assertIs(decoder.decode(b"\x82\x04\x02/x\xbe", True), first)
        self.assertEqual(first, [(b":method", b"GET"), (b":path", b"/x"), (b"a", b"b")])
        secret = decoder.decode(b"\x82\x10\x01s\x01t", True)
        self.assertIsNot(decoder.decode(b"\x82\x10\x01s\x01t", True), secret)
        decoder.decode(b"\x40\x01c\x01d", True)
        self.assertEqual(decoder.decode(b"\x82\xbe", True), [(b":method", b"GET"), (b"c", b"d")])

    def test_refused(self) -> None:
        """Each of RFC 7541's decoding errors is an HPACK error."""
        cases = {
            "index 0": b"\x80",
            "an index past the tables": b"\xbf",
            "a name index past the tables": b"\x7f\x00\x01a",
            "a size update after a field": b"\x88\x20",
            "a size update above the allowed size": b"\x3f\xe2\x1f",
            "a truncated integer": b"\xff\x80",
            "an integer of six bytes": b"\xff\x80\x80\x80\x80\x80\x01",
            "a truncated string": b"\x00\x05ab",
            "a truncated field": b"\x40",
            "Huffman padding that is not EOS's": b"\x00\x01a\x81\x00",
        }
        for what, block in cases.items():
            with self.subTest(what):
                self.assertRaises(hpack.HPACKError, FieldDecoder().decode, block, True)

    def test_tableNotShrunk(self) -> None:
        """Once a smaller table is allowed, a block that does not shrink the table to it is refused."""
        decoder = FieldDecoder()
        decoder.max_allowed_table_size = 100
        self.assertRaises(hpack.InvalidTableSizeError, decoder.decode, b"\x88", True)
        self.assertEqual(decoder.decode(b"\x3f\x45\x88", True), [(b":status", b"200")])

    def test_oversized(self) -> None:
        """A header list over C{max_header_list_size} is refused, counted as RFC 9113 counts it."""
        decoder = FieldDecoder(max_header_list_size=32 + 10 + 10)
        field = b"\x00\x0a" + b"n" * 10 + b"\x0a" + b"v" * 10
        self.assertEqual(decoder.decode(field, True), [(b"n" * 10, b"v" * 10)])
        self.assertRaises(hpack.OversizedHeaderListError, decoder.decode, field + b"\x88", True)

    def test_kindsAndText(self) -> None:
        """A never-indexed literal stays marked so; without C{raw} the fields are text."""
        decoder = FieldDecoder()
        (secret,) = decoder.decode(b"\x10\x01a\x01b", True)
        self.assertIsInstance(secret, hpack.NeverIndexedHeaderTuple)
        self.assertEqual(decoder.decode(b"\x88\x40\x01a\x02\xc3\xa9"), [(":status", "200"), ("a", "\u00e9")])
        self.assertRaises(hpack.HPACKDecodingError, decoder.decode, b"\x40\x01b\x01\xff")


class PeerTests(unittest.TestCase):
    """The encoder behind h2, as rproxy uses it, followed by a peer's h2 connection."""

    def test_peerShrinksTable(self) -> None:
        """A peer that allows no dynamic table gets a size update and no indexing, and reads every field."""
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        server.encoder = FieldEncoder()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0}
        )
        client.initiate_connection()
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        heads = []
        for streamID in (1, 3, 5):
            client.send_headers(
                streamID, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")], True
            )
            server.receive_data(client.data_to_send())
            server.send_headers(streamID, [(b":status", b"200"), (b"server", b"rproxy")], end_stream=True)
            events = client.receive_data(server.data_to_send())
            heads += [event.headers for event in events if isinstance(event, h2.events.ResponseReceived)]
        self.assertEqual(heads, [[(b":status", b"200"), (b"server", b"rproxy")]] * 3)
        self.assertEqual(server.encoder.header_table_size, 0)
