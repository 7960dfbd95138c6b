"""
Trailers through the proxy, both directions, over real sockets: HTTP/1.1 chunked and HTTP/2 clients in
front of an HTTP/1.1 upstream (the upstream side is protocol-neutral, so this is the translation too).
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.trial import unittest

from rproxy.test.h2client import H2Client
from rproxy.test.support import rawRequest, startProxy, waitFor
from rproxy.test.test_streaming import serve

#: The upstream's answer: a chunked body and two trailer fields (one of them Connection-listed by no one).
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status, x-sum\r\n\r\n"
    b"5\r\nhello\r\n0\r\nGrpc-Status: 0\r\nX-Sum: 9\r\nKeep-Alive: 1\r\n\r\n"
)


class _TrailerUpstream(protocol.Protocol):
    """Keeps every byte of the request; answers with L{_RESPONSE} once a body (chunked, or of 5 bytes) has ended."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        head, _, body = self.received.partition(b"\r\n\r\n")
        if b"\r\nContent-Length: 5" in head:
            if len(body) == 5:
                self.transport.write(_RESPONSE)
        elif body.startswith(b"0\r\n") or b"\r\n0\r\n" in body:
            if body.endswith(b"\r\n\r\n"):
                self.transport.write(_RESPONSE)


class TrailerTests(unittest.TestCase):
    def setUp(self) -> None:
        listening, self.upstreams = serve(self, _TrailerUpstream)
        self.proxy = startProxy(self, [listening.url])

    async def test_http1BothWays(self) -> None:
        """
        A chunked HTTP/1.1 client's trailers go on to the upstream (without fields a trailer must not
        carry), ``TE: trailers`` with them; the upstream's response trailers come back after the last chunk
        (without hop-by-hop ones).
        """
        data = await rawRequest(
            self.proxy.port,
            b"POST /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nContent-Length: 99\r\n\r\n",
        )
        upstream = self.upstreams[0].received
        head = upstream.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"\r\nTE: trailers", head)
        self.assertTrue(upstream.endswith(b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"), upstream)
        self.assertIn(b"Transfer-Encoding: chunked", data.split(b"\r\n\r\n", 1)[0])
        self.assertTrue(data.endswith(b"5\r\nhello\r\n0\r\nGrpc-Status: 0\r\nX-Sum: 9\r\n\r\n"), data)

    async def test_http2ToHttp1(self) -> None:
        """
        An HTTP/2 client's trailers (a HEADERS frame after its DATA) reach the HTTP/1.1 upstream in its
        chunked body; the upstream's chunked trailers reach the client as a HEADERS frame ending the stream.
        """
        client = await H2Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        stream = client.request(b"POST", b"/t", [(b"te", b"trailers")], endStream=False)
        client.send(stream, b"hello", trailers=[(b"x-checksum", b"abc"), (b"host", b"evil")])
        response = await client.response(stream)
        upstream = self.upstreams[0].received
        self.assertIn(b"\r\nTE: trailers", upstream.split(b"\r\n\r\n", 1)[0])
        self.assertTrue(upstream.endswith(b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"), upstream)
        self.assertEqual((response.status, response.data, response.ended), (200, b"hello", True))
        self.assertEqual(response.trailers, [(b"grpc-status", b"0"), (b"x-sum", b"9")])

    async def test_http10DropsThem(self) -> None:
        """An HTTP/1.0 response cannot carry trailers: the body arrives whole, without them."""
        data = await rawRequest(
            self.proxy.port,
            b"POST /t HTTP/1.0\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        )
        self.assertTrue(await waitFor(lambda: self.upstreams, 1))
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200"), head)
        self.assertNotIn(b"chunked", head)
        self.assertEqual(body, b"hello")
