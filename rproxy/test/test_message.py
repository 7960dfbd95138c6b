"""Tests for L{rproxy.proxy.message}."""

from __future__ import annotations

from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rproxy.proxy.message import OutboundRequest


class OutboundRequestTests(unittest.TestCase):
    def test_fieldsUntouched(self) -> None:
        """Fields nobody asked to see as Headers are sent as given, in order, repeated names kept."""
        fields = [(b"Accept", b"a"), (b"X-Multi", b"1"), (b"X-Multi", b"2")]
        outbound = OutboundRequest(b"GET", b"/", fields)
        self.assertEqual(outbound.fields(), fields)

    def test_headersEdited(self) -> None:
        """Changes made through C{headers} are what is sent."""
        outbound = OutboundRequest(b"GET", b"/", [(b"Accept", b"a"), (b"X-Drop", b"1")])
        outbound.headers.removeHeader(b"x-drop")
        outbound.headers.addRawHeader(b"X-Added", b"2")
        self.assertEqual(outbound.fields(), [(b"Accept", b"a"), (b"X-Added", b"2")])

    def test_headersReplaced(self) -> None:
        """A director may replace the whole field set."""
        outbound = OutboundRequest(b"GET", b"/", [(b"Accept", b"a")])
        outbound.headers = Headers({b"X-Only": [b"1"]})
        self.assertEqual(outbound.fields(), [(b"X-Only", b"1")])
