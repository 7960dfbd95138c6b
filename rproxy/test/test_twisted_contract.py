"""
The private parts of Twisted that rproxy relies on (see the docstrings of request.py and server.py).

If a Twisted release renames or reshapes one of them, these tests fail first, with a message naming
what moved, instead of the proxy misbehaving in subtle ways.  setup.py pins Twisted to the versions
these tests have passed on.
"""

from __future__ import annotations

import inspect

from twisted.internet import defer, protocol, reactor
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest
from twisted.web import http, server
from twisted.web.resource import Resource

from rproxy.test.support import listen, rawRequest


class _RecordingRequest(server.Request):
    seen: list[tuple[bytes, bytes, bytes]] = []

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        self.seen.append((channel._command, channel._path, channel._version))
        super().gotLength(length)


class HTTPChannelContractTests(unittest.TestCase):
    async def test_requestLineOnChannelDuringGotLength(self) -> None:
        """
        ProxyRequest.gotLength reads the request line from HTTPChannel._command/_path/_version, which
        Twisted sets before calling gotLength and deletes after the body.
        """
        _RecordingRequest.seen = []
        root = Resource()
        listening = listen(self, server.Site(root, requestFactory=_RecordingRequest))
        await rawRequest(
            listening.port,
            b"POST /a%2Fb?x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nzGET / HTTP/1.0\r\n\r\n",
            timeout=2,
        )
        self.assertEqual(_RecordingRequest.seen[0], (b"POST", b"/a%2Fb?x", b"HTTP/1.1"))

    def test_privateMethods(self) -> None:
        """The HTTPChannel methods ProxyHTTPChannel overrides exist with the signatures it assumes."""
        expected = {
            "_respondToBadRequestAndDisconnect": ["self"],
            "_finishRequestBody": ["self", "data"],
            "allContentReceived": ["self"],
            "allHeadersReceived": ["self"],
            "headerReceived": ["self", "line"],
            "lineReceived": ["self", "line"],
            "lineLengthExceeded": ["self", "line"],
        }
        for name, parameters in expected.items():
            method = getattr(http.HTTPChannel, name, None)
            self.assertIsNotNone(method, f"HTTPChannel.{name} is gone")
            self.assertEqual(list(inspect.signature(method).parameters), parameters, name)

    def test_privateState(self) -> None:
        """The channel state and helpers ProxyHTTPChannel reads."""
        channel = http.HTTPChannel()
        for attribute in (
            "_transferDecoder",
            "_receivedHeaderSize",
            "_receivedHeaderCount",
            "requests",
            "persistent",
            "length",
            "_dataBuffer",
            # ProxyHTTPChannel.dataReceived reads a whole head itself when the line reader is idle:
            "_HTTPChannel__first_line",
            "_buffer",
            "_busyReceiving",
            "line_mode",
        ):
            self.assertTrue(hasattr(channel, attribute), f"HTTPChannel.{attribute} is gone")
        self.assertEqual(channel._HTTPChannel__first_line, 1, "HTTPChannel's 'waiting for a request line' state")
        self.assertEqual(
            list(inspect.signature(http._IdentityTransferDecoder).parameters),
            ["contentLength", "dataCallback", "finishCallback"],
        )
        self.assertEqual(
            list(inspect.signature(http._ChunkedTransferDecoder).parameters), ["dataCallback", "finishCallback"]
        )
        self.assertRaises(ValueError, http._parseRequestLine, b"GET / HTTP/9")

    def test_genericChannelProtocol(self) -> None:
        """ProxySite subclasses _GenericHTTPChannelProtocol, which wraps its channel in _channel."""
        wrapper = http._GenericHTTPChannelProtocol(http.HTTPChannel())
        self.assertIsInstance(wrapper._channel, http.HTTPChannel)


class AgentContractTests(unittest.TestCase):
    """The private parts of Twisted's HTTP client that the health checks rely on."""

    def test_parseErrorIsResponseFailureCause(self) -> None:
        """rproxy.health.checks names a non-HTTP answer by _newclient.ParseError, which Agent wraps."""
        from twisted.web import _newclient
        from twisted.web.client import ResponseFailed

        self.assertTrue(issubclass(_newclient.ParseError, Exception))
        self.assertIs(_newclient.ResponseFailed, ResponseFailed)


class ChunkedTrailerContractTests(unittest.TestCase):
    """ProxyHTTPChannel reads a chunked request's trailers from the decoder, which Twisted keeps and drops."""

    def test_trailerHeadersKept(self) -> None:
        finished: list[bytes] = []
        decoder = http._ChunkedTransferDecoder(lambda data: None, finished.append)
        seen: list[list[bytes]] = []
        decoder.finishCallback = lambda rest: (seen.append([bytes(x) for x in decoder._trailerHeaders]), rest)
        decoder.dataReceived(b"1\r\na\r\n0\r\nX-One: 1\r\nX-Two: 2\r\n\r\n")
        self.assertEqual(seen, [[b"X-One: 1", b"X-Two: 2"]])


class ProtocolSwitchContractTests(unittest.TestCase):
    """_ProxyChannelProtocol switches to HTTP/2 itself, with what Twisted's switch uses."""

    def test_genericChannelState(self) -> None:
        wrapper = http._GenericHTTPChannelProtocol(http.HTTPChannel())
        for attribute in ("_negotiatedProtocol", "_requestFactory", "_factory", "_site", "_timeOut", "_callLater"):
            self.assertTrue(hasattr(wrapper, attribute), f"_GenericHTTPChannelProtocol.{attribute} is gone")
        from twisted.internet.testing import StringTransport

        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        self.assertTrue(callable(channel._send100Continue))
        self.assertTrue(callable(channel._networkProducer.unregisterProducer), "HTTPChannel._networkProducer")
        channel.connectionLost(None)


class HTTP2ContractTests(unittest.TestCase):
    """The private parts of twisted.web._http2 and of h2 that rproxy.downstream.http2 relies on."""

    def test_connectionMethods(self) -> None:
        from twisted.web import _http2

        expected = {
            "_requestReceived": ["self", "event"],
            "_requestDataReceived": ["self", "event"],
            "_requestEnded": ["self", "event"],
            "_requestAborted": ["self", "event"],
            "_requestDone": ["self", "streamID"],
            "_handleWindowUpdate": ["self", "event"],
            "_sendPrioritisedData": ["self", "args"],
            "_tryToWriteControlData": ["self"],
            "_terminate": ["self", "reason"],
            "connectionLost": ["self", "reason", "_cancelTimeouts"],
            "remainingOutboundWindow": ["self", "streamID"],
            "writeHeaders": ["self", "version", "code", "reason", "headers", "streamID"],
        }
        for name, parameters in expected.items():
            method = getattr(_http2.H2Connection, name, None)
            self.assertIsNotNone(method, f"H2Connection.{name} is gone")
            self.assertEqual(list(inspect.signature(method).parameters), parameters, name)
        self.assertEqual(
            list(inspect.signature(_http2.H2Stream).parameters),
            ["streamID", "connection", "headers", "requestFactory", "site", "factory"],
        )
        for name in ("_convertHeaders", "_send100Continue", "requestComplete", "flowControlBlocked", "windowUpdated"):
            self.assertTrue(callable(getattr(_http2.H2Stream, name, None)), f"H2Stream.{name} is gone")
        self.assertTrue(hasattr(_http2, "_END_STREAM_SENTINEL"))

    def test_connectionState(self) -> None:
        from twisted.internet.task import Clock
        from twisted.web import _http2

        connection = _http2.H2Connection(Clock())
        for attribute in (
            "_outboundStreamQueues",
            "_streamCleanupCallbacks",
            "_consumerBlocked",
            "_sendingDeferred",
            "_stillProducing",
            "_bufferedControlFrames",
            "_resetTokens",
            "_resetTokenBurst",
            "_resetTokenRate",
            "_reactor",
            "priority",
            "streams",
        ):
            self.assertTrue(hasattr(connection, attribute), f"H2Connection.{attribute} is gone")

    def test_h2Internals(self) -> None:
        import h2.connection
        import h2.events
        import h2.stream

        state = h2.connection.H2Connection()
        self.assertTrue(callable(state._receive_headers_frame))
        self.assertTrue(hasattr(state, "_closed_streams"))
        self.assertTrue(hasattr(state, "highest_inbound_stream_id"))
        self.assertTrue(callable(h2.connection._decode_headers))
        self.assertEqual(h2.stream.StreamClosedBy.SEND_RST_STREAM.name, "SEND_RST_STREAM")
        self.assertIn("stream_ended", vars(h2.events.RequestReceived)["__annotations__"])


class _Receiver(protocol.Protocol):
    def __init__(self) -> None:
        self.received = defer.Deferred[bytes]()

    def dataReceived(self, data: bytes) -> None:
        if not self.received.called:
            self.received.callback(data)


class _Handover(protocol.Protocol):
    """Hands its TCP transport to another protocol as soon as it is connected, as rproxy/tunnel/splice.py does."""

    def __init__(self, successor: protocol.Protocol) -> None:
        self.successor = successor

    def connectionMade(self) -> None:
        self.transport.protocol = self.successor  # type: ignore[union-attr]


class TransportHandoverContractTests(unittest.TestCase):
    """
    rproxy/tunnel/splice.py splices two connections by making the tunnel the protocol of each transport: a TCP
    connection delivers to its C{protocol} attribute, a TLS one to its C{wrappedProtocol}.
    """

    async def test_tcpDeliversToItsProtocolAttribute(self) -> None:
        successor = _Receiver()
        factory = protocol.Factory.forProtocol(lambda: _Handover(successor))
        listening = listen(self, factory)
        await rawRequest(listening.port, b"after the switch", timeout=0.5)
        self.assertEqual(await successor.received.addTimeout(5, reactor), b"after the switch")

    def test_tlsWrapperAttribute(self) -> None:
        self.assertIn("wrappedProtocol", inspect.signature(TLSMemoryBIOProtocol.__init__).parameters)


class _Capture(protocol.Protocol):
    def __init__(self, made: defer.Deferred[protocol.Protocol]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


class WriteBufferContractTests(unittest.TestCase):
    """
    rproxy.app.reactor._sendWhole does what C{FileDescriptor.doWrite} does in its usual case, on the same
    state: the buffers C{write} fills, the producer flags and the pending-close flags.
    """

    async def test_bufferState(self) -> None:
        made: defer.Deferred[protocol.Protocol] = defer.Deferred()
        listening = listen(self, protocol.Factory.forProtocol(lambda: _Capture(made)))
        client = rawRequest(listening.port, b"", timeout=5)
        transport = (await made).transport
        transport.write(b"ab")
        transport.write(b"cd")
        self.assertEqual((transport.dataBuffer, transport.offset), (b"", 0))
        self.assertEqual((transport._tempDataBuffer, transport._tempDataLen), ([b"ab", b"cd"], 4))
        self.assertEqual(transport.SEND_LIMIT, 128 * 1024)
        for flag in ("producer", "streamingProducer", "producerPaused", "disconnecting", "_writeDisconnecting"):
            self.assertFalse(getattr(transport, flag), flag)
        transport.loseConnection()
        self.assertEqual(await client, b"abcd")
