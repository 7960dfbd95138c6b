"""ReverseProxyResource as a drop-in for twisted.web.proxy's, in plain and rproxy sites."""

from __future__ import annotations

import warnings

from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource

from rproxy import ReverseProxyResource
from rproxy.downstream.site import ProxySite
from rproxy.test.support import ReceivedRequest, ScriptedUpstream, listen, rawRequest


def _ok(protocol: object, request: ReceivedRequest) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: yes\r\n\r\nok"


class DropInTests(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, _ok)

    def mounted(self) -> Resource:
        root = Resource()
        root.putChild(b"api", ReverseProxyResource("127.0.0.1", self.upstream.port, b"/base"))
        return root

    def test_subclassOfStock(self) -> None:
        """Existing code that checks for the stock class keeps working."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from twisted.web.proxy import ReverseProxyResource as Stock
        self.assertTrue(issubclass(ReverseProxyResource, Stock))

    async def test_plainSite(self) -> None:
        """In a stock twisted.web Site, below a mount point, with a buffered body: path byte-exact."""
        listening = listen(self, server.Site(self.mounted()))
        data = await rawRequest(
            listening.port,
            b"POST /api/a%2Fb//c/../d;e?q=%zz&a=1 HTTP/1.1\r\nHost: front\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\nhello",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertIn(b"\r\nX-Upstream: yes", data)
        [request] = self.upstream.requests
        self.assertEqual(request.requestLine, b"POST /base/a%2Fb//c/../d;e?q=%zz&a=1 HTTP/1.1")
        self.assertEqual(request.body, b"hello")
        self.assertEqual(request.headers(b"host"), [b"front"])

    async def test_proxySite(self) -> None:
        """Mounted in a ProxySite the body streams; the result is the same."""
        listening = listen(self, ProxySite(self.mounted()))
        data = await rawRequest(
            listening.port,
            b"POST /api/x%2F?y HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        [request] = self.upstream.requests
        self.assertEqual(request.requestLine, b"POST /base/x%2F?y HTTP/1.1")
        self.assertEqual(request.body, b"hello")

    async def test_mountPointItself(self) -> None:
        """The mount point without a trailing slash maps to the base path."""
        listening = listen(self, server.Site(self.mounted()))
        await rawRequest(listening.port, b"GET /api?q HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(self.upstream.requests[0].requestLine, b"GET /base?q HTTP/1.1")

    async def test_localResourcesBesideProxy(self) -> None:
        """Resources beside the proxy in a ProxySite are rendered locally, never proxied."""
        root = self.mounted()

        class Health(Resource):
            isLeaf = True

            def render_GET(self, request: server.Request) -> bytes:
                return b"healthy"

        root.putChild(b"health", Health())
        listening = listen(self, ProxySite(root))
        data = await rawRequest(listening.port, b"GET /health HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.endswith(b"healthy"), data)
        self.assertEqual(self.upstream.requests, [])


class EmptyBasePathTests(unittest.TestCase):
    async def test_mountPointWithEmptyBase(self) -> None:
        """The stock usage ReverseProxyResource(host, port, b"") still sends an origin-form target."""
        upstream = ScriptedUpstream(self, _ok)
        root = Resource()
        root.putChild(b"api", ReverseProxyResource("127.0.0.1", upstream.port, b""))
        listening = listen(self, server.Site(root))
        for target in (b"/api", b"/api?x=1"):
            await rawRequest(listening.port, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual([r.requestLine for r in upstream.requests], [b"GET / HTTP/1.1", b"GET /?x=1 HTTP/1.1"])
