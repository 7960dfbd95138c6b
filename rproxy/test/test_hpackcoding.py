"""
L{rproxy.hpackcoding.FieldEncoder}: what it encodes, the hpack library's own decoder (an implementation
written apart from it) reads back as the same fields, whatever the sequence of blocks and table sizes; and
it uses the table as RFC 7541 says a peer must be able to follow.

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

from rproxy.hpackcoding import MAX_TABLE_SIZE, STATIC_TABLE, FieldEncoder

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
            if value:
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
