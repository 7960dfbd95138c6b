"""
Body framing read strictly (rproxy/framing.py): Content-Length values and the chunked decoder, fed whole
and a byte at a time; and an upstream's response framed past 63 bits (rproxy/upstream/http1.py).
"""

from __future__ import annotations

from twisted.trial import unittest

from rproxy.framing import MAX_LENGTH, ChunkedDecoder, MalformedBodyError, chunkSize, contentLength
from rproxy.headers import Pairs
from rproxy.test.support import LogCapture, ScriptedUpstream, rawRequest, splitResponses, startProxy


class ContentLengthTests(unittest.TestCase):
    def test_values(self) -> None:
        """Equal values, lists of them, leading zeros, and the largest 63-bit length are read."""
        self.assertEqual(contentLength([b"5"]), 5)
        self.assertEqual(contentLength([b"5", b" 5 "]), 5)
        self.assertEqual(contentLength([b"5, 5,5"]), 5)
        self.assertEqual(contentLength([b"0000000000000000000000000005"]), 5)
        self.assertEqual(contentLength([b"0"]), 0)
        self.assertEqual(contentLength([b"%d" % MAX_LENGTH]), MAX_LENGTH)

    def test_refused(self) -> None:
        cases = {
            b"9223372036854775808": "exceeds 9223372036854775807",
            b"18446744073709551621": "exceeds",
            b"9" * 5000: "exceeds",
            b"-1": "invalid Content-Length",
            b"+5": "invalid Content-Length",
            b"5_0": "invalid Content-Length",
            b"0x5": "invalid Content-Length",
            b"\xb2": "invalid Content-Length",
            b"": "invalid Content-Length",
        }
        for value, reason in cases.items():
            with self.assertRaises(MalformedBodyError) as raised:
                contentLength([value])
            self.assertIn(reason, str(raised.exception), value)
        with self.assertRaises(MalformedBodyError) as raised:
            contentLength([b"5", b"6"])
        self.assertEqual(str(raised.exception), "conflicting Content-Length values")


class ChunkSizeTests(unittest.TestCase):
    def test_sizes(self) -> None:
        self.assertEqual(chunkSize(b"a"), 10)
        self.assertEqual(chunkSize(b"00000000000000FF"), 255)
        self.assertEqual(chunkSize(b"5;name=value"), 5)
        self.assertEqual(chunkSize(b'5 \t; a="b c" ;d'), 5)
        self.assertEqual(chunkSize(b"7fffffffffffffff"), MAX_LENGTH)

    def test_refused(self) -> None:
        for line in (
            b"",
            b";x",
            b"0x5",
            b"-5",
            b" 5",
            b"5 ",
            b"g",
            b"10000000000000005",
            b"8000000000000000",
            b"5;\x00",
            b"5;\x7f",
            b"5" + b";" + b"x" * 5000,
        ):
            with self.assertRaises(MalformedBodyError, msg=repr(line)):
                chunkSize(line)


class _Recorder:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: tuple[Pairs, bytes] | None = None

    def onData(self, data: bytes) -> None:
        self.data.append(data)

    def onEnd(self, trailers: Pairs, rest: bytes) -> None:
        assert self.ended is None, "ended twice"
        self.ended = (trailers, rest)


def _decode(encoded: bytes, piece: int = 0) -> _Recorder:
    """Decode C{encoded} whole, or C{piece} bytes at a time."""
    recorder = _Recorder()
    decoder = ChunkedDecoder(recorder.onData, recorder.onEnd, maxTrailerBytes=100)
    pieces = [encoded] if not piece else [encoded[i : i + piece] for i in range(0, len(encoded), piece)]
    for data in pieces:
        if decoder.finished:
            break
        decoder.feed(data)
    return recorder


_BODY = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 11\r\nBad Line\r\nX-B:  b \r\n\r\nNEXT"


class ChunkedDecoderTests(unittest.TestCase):
    def test_whole(self) -> None:
        """Data, well-formed trailer fields (malformed ones dropped), and the bytes after the body."""
        recorder = _decode(_BODY)
        self.assertEqual(b"".join(recorder.data), b"hello world")
        self.assertEqual(recorder.ended, ([(b"X-Sum", b"11"), (b"X-B", b"b")], b"NEXT"))

    def test_byteAtATime(self) -> None:
        """Split anywhere, the same result, and never an empty piece of data."""
        for piece in (1, 2, 3, 7):
            recorder = _decode(_BODY, piece)
            self.assertEqual(b"".join(recorder.data), b"hello world", piece)
            self.assertNotIn(b"", recorder.data)
            assert recorder.ended is not None
            self.assertEqual(recorder.ended[0], [(b"X-Sum", b"11"), (b"X-B", b"b")])

    def test_refused(self) -> None:
        """Each way the framing can break is an error, whole or split byte by byte."""
        cases = {
            b"5\nhello\r\n0\r\n\r\n": "bare LF",
            b"5\r\nhello\r\n0\n\n": "bare LF",
            b"5\r\nhello\r\n0\r\n\n": "bare LF",
            b"5\r\nhello\r\n0\r\nX: a\n\r\n": "bare LF",
            b"5\rx\r\nhello\r\n0\r\n\r\n": "bare CR",
            b"5\r\nhelloXX\r\n0\r\n\r\n": "not followed by CRLF",
            b"5\r\nhello\r0\r\n\r\n": "not followed by CRLF",
            b"10000000000000005\r\nhello\r\n": "invalid chunk size",
            b"zz\r\n": "invalid chunk size",
            b"5\r\nhello\r\n0\r\n X: folded\r\n\r\n": "folded",
            b"0\r\n" + b"X: " + b"a" * 200 + b"\r\n\r\n": "trailer section exceeds 100 bytes",
            b"5" + b"0" * 5000: "chunk-size line exceeds",
        }
        for encoded, reason in cases.items():
            for piece in (0, 1):
                with self.assertRaises(MalformedBodyError, msg=repr((encoded, piece))) as raised:
                    _decode(encoded, piece)
                self.assertIn(reason, str(raised.exception), (encoded, piece))

    def test_stop(self) -> None:
        """A stopped decoder delivers nothing more."""
        recorder = _Recorder()
        decoder = ChunkedDecoder(recorder.onData, recorder.onEnd)
        decoder.feed(b"5\r\nhel")
        decoder.stop()
        decoder.feed(b"lo\r\n0\r\n\r\n")
        self.assertEqual(recorder.data, [b"hel"])
        self.assertIsNone(recorder.ended)


class UpstreamFramingTests(unittest.TestCase):
    """An upstream's response whose length would wrap a 64-bit client is a 502, never relayed."""

    async def test_contentLength(self) -> None:
        """A length past 63 bits: 502 before anything is relayed."""
        upstream = ScriptedUpstream(
            self, lambda proto, request: b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551621\r\n\r\nhello"
        )
        proxy = startProxy(self, [upstream.url])
        logs = LogCapture(self)
        data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(head, body)] = splitResponses(data)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertIn(b"X-Rproxy-Fault: upstream", head)
        self.assertIn(b"sent a bad response: Content-Length 18446744073709551621 exceeds 9223372036854775807", body)
        [event] = logs.withStatus(502)
        self.assertIn("exceeds 9223372036854775807", event["reason"])

    async def test_chunkSize(self) -> None:
        """
        A chunk size past 63 bits after the head was relayed: the client's connection is reset, the
        response never completed, and the log says why.
        """
        upstream = ScriptedUpstream(
            self,
            lambda proto, request: (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10000000000000005\r\nmore"
            ),
        )
        proxy = startProxy(self, [upstream.url])
        logs = LogCapture(self)
        data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertFalse(data.endswith(b"0\r\n\r\n"), data)
        [event] = logs.withStatus(502)
        self.assertIn("invalid chunk size", event["reason"])
