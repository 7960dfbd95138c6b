"""
The private parts of Twisted that rproxy relies on (see the docstrings of request.py and server.py).

If a Twisted release renames or reshapes one of them, these tests fail first, with a message naming
what moved, instead of the proxy misbehaving in subtle ways.  setup.py pins Twisted to the versions
these tests have passed on.
"""

from __future__ import annotations

import inspect

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
        """rproxy.healthcheck names a non-HTTP answer by _newclient.ParseError, which Agent wraps."""
        from twisted.web import _newclient
        from twisted.web.client import ResponseFailed

        self.assertTrue(issubclass(_newclient.ParseError, Exception))
        self.assertIs(_newclient.ResponseFailed, ResponseFailed)
