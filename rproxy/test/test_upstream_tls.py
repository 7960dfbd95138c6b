"""
TLS upstreams (C{https://}, C{https+h1://}, C{https+h2://}) through the proxy, with real sockets and
certificates issued at test time: ALPN's choice of protocol, verification failures, client certificates
and the insecure mode.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web import resource, server

from rproxy.app.tap import Options, buildService
from rproxy.test.certs import CertificateAuthority, CertificateFiles, listenTLS, serverTLS
from rproxy.test.h2upstream import H2Upstream
from rproxy.test.support import RunningProxy, rawRequest, responseStatus, sleep, startProxy, waitFor
from rproxy.test.test_upstream_http2 import get, splitResponse


class _Protocol(resource.Resource):
    """Answers with the HTTP version the request came in."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return request.clientproto


class TLSTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.files: CertificateFiles = self.ca.writeFiles(self.mktemp())

    def twistedSite(
        self, protocols: Sequence[bytes] = (b"h2", b"http/1.1"), requireClientCertificate: bool = False
    ) -> int:
        """A twisted.web site over TLS with the test server certificate, selecting among C{protocols}; its port."""
        return listenTLS(self, server.Site(_Protocol()), serverTLS(self.files, protocols, requireClientCertificate))

    def proxy(self, url: str, *arguments: str) -> RunningProxy:
        """A proxy to C{url}; when the test ends, its TLS connections are closed before the reactor is checked."""
        running: list[RunningProxy] = []

        async def closed() -> None:
            for upstream in running[0].upstreams if running else []:
                await waitFor(lambda: upstream.pool.openCount == 0)  # noqa: B023
            await sleep(0.05)  # the servers' side of them

        self.addCleanup(lambda: defer.ensureDeferred(closed()))
        running.append(startProxy(self, [url], *arguments))
        return running[0]


class ALPNTests(TLSTestCase):
    """The protocol is the one the server selects."""

    async def test_h2ServerByALPN(self) -> None:
        """The scripted h2 server over TLS: requests go as streams of one connection."""
        upstream = H2Upstream(self, tls=serverTLS(self.files))
        proxy = self.proxy(upstream.url, "--upstream-ca", self.files.ca)
        for path in (b"/a", b"/b"):
            head, body = splitResponse(await get(proxy.port, path))
            self.assertEqual((responseStatus(head), body), (200, b"GET " + path + b" "))
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual(upstream.streams[0].header(b":scheme"), b"https")

    async def test_postToTwistedSiteOverH2(self) -> None:
        """Twisted's own Site selects h2 by ALPN, and serves the proxied requests over it."""
        port = self.twistedSite()
        proxy = self.proxy(f"https://127.0.0.1:{port}", "--upstream-ca", self.files.ca)
        head, body = splitResponse(await get(proxy.port, b"/"))
        self.assertEqual((responseStatus(head), body), (200, b"HTTP/2"))

    async def test_fallbackToHTTP1(self) -> None:
        """A server that offers only http/1.1 gets HTTP/1.1."""
        port = self.twistedSite((b"http/1.1",))
        proxy = self.proxy(f"https://127.0.0.1:{port}", "--upstream-ca", self.files.ca)
        for _ in range(2):
            head, body = splitResponse(await get(proxy.port, b"/"))
            self.assertEqual((responseStatus(head), body), (200, b"HTTP/1.1"))
        self.assertEqual(proxy.upstreams[0].pool.openCount, 1)

    async def test_forceHTTP1(self) -> None:
        """C{https+h1://} offers HTTP/1.1 only, to a server that would take h2."""
        port = self.twistedSite()
        proxy = self.proxy(f"https+h1://127.0.0.1:{port}", "--upstream-ca", self.files.ca)
        head, body = splitResponse(await get(proxy.port, b"/"))
        self.assertEqual((responseStatus(head), body), (200, b"HTTP/1.1"))

    async def test_requireHTTP2(self) -> None:
        """
        C{https+h2://} to a server that does not offer h2 (it goes on without ALPN): a 502 saying so, and
        the connection is not used for HTTP/1.1.
        """
        port = self.twistedSite((b"http/1.1",))
        proxy = self.proxy(f"https+h2://127.0.0.1:{port}", "--upstream-ca", self.files.ca)
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"error=tls_protocol_error", response)
        self.assertIn(b"did not agree to HTTP/2 by ALPN (it chose None)", response)


class VerificationTests(TLSTestCase):
    """Certificates are verified unless told otherwise, and failures say why."""

    async def test_unknownCA(self) -> None:
        """Without the test CA, the certificate is not trusted: 502, tls_certificate_error."""
        port = self.twistedSite()
        proxy = self.proxy(f"https://127.0.0.1:{port}")
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"error=tls_certificate_error", response)
        self.assertIn(b"failed the TLS handshake: certificate verify failed", response)

    async def test_wrongHostName(self) -> None:
        """A certificate for other names: 502 naming the problem."""
        self.files = self.ca.writeFiles(self.mktemp(), serverNames=["other.example"], serverIPs=[])
        port = self.twistedSite()
        proxy = self.proxy(f"https://127.0.0.1:{port}", "--upstream-ca", self.files.ca)
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"presented a TLS certificate that is not valid for its name", response)
        self.assertIn(b"error=tls_certificate_error", response)

    async def test_wrongHostNameHTTP1(self) -> None:
        """The same with a server that speaks only HTTP/1.1 (the connection is ready as soon as TLS is)."""
        self.files = self.ca.writeFiles(self.mktemp(), serverNames=["other.example"], serverIPs=[])
        port = self.twistedSite((b"http/1.1",))
        proxy = self.proxy(f"https://127.0.0.1:{port}", "--upstream-ca", self.files.ca)
        response = await get(proxy.port, b"/")
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"presented a TLS certificate that is not valid for its name", response)
        self.assertIn(b"error=tls_certificate_error", response)

    async def test_hostNameVerified(self) -> None:
        """A certificate for the URL's host name passes (SNI and the name check agree)."""
        self.files = self.ca.writeFiles(self.mktemp(), serverNames=["localhost"], serverIPs=[])
        port = self.twistedSite()
        proxy = self.proxy(f"https://localhost:{port}", "--upstream-ca", self.files.ca)
        head, body = splitResponse(await get(proxy.port, b"/"))
        self.assertEqual((responseStatus(head), body), (200, b"HTTP/2"))

    async def test_insecure(self) -> None:
        """With --upstream-tls-insecure, an unknown CA and a wrong name are both accepted."""
        self.files = self.ca.writeFiles(self.mktemp(), serverNames=["other.example"], serverIPs=[])
        port = self.twistedSite()
        proxy = self.proxy(f"https://127.0.0.1:{port}", "--upstream-tls-insecure")
        head, body = splitResponse(await get(proxy.port, b"/"))
        self.assertEqual((responseStatus(head), body), (200, b"HTTP/2"))

    def test_insecureIsLogged(self) -> None:
        """The proxy's service says at start which services do not verify their upstreams."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = Options()
        options.parseOptions(["--upstream", "https://127.0.0.1:1", "--upstream-tls-insecure", "--listen", "tcp:0"])
        buildService(options.config, reactor)
        warnings = [e for e in events if "not verified" in str(e.get("log_format", ""))]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["services"], "default")
        events.clear()
        secure = Options()
        secure.parseOptions(["--upstream", "https://127.0.0.1:1", "--listen", "tcp:0"])
        buildService(secure.config, reactor)
        self.assertEqual([e for e in events if "not verified" in str(e.get("log_format", ""))], [])

    def test_badFiles(self) -> None:
        """A CA file or a client certificate file that holds none is a one-line error naming its option."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nothing here\n")
        for option, expected in [
            ("--upstream-ca", f"--upstream-ca: the CA file {path!r} holds no PEM certificate"),
            ("--upstream-client-cert", f"--upstream-client-cert: the client certificate {path!r} or its key cannot"),
        ]:
            with self.subTest(option):
                arguments = ["--upstream", "https://127.0.0.1:1", option, path]
                error = self.assertRaises(UsageError, Options().parseOptions, arguments)
                self.assertIn(expected, str(error))


class ClientCertificateTests(TLSTestCase):
    """Mutual TLS."""

    async def test_presented(self) -> None:
        """A server requiring a client certificate accepts the configured one."""
        port = self.twistedSite(requireClientCertificate=True)
        proxy = self.proxy(
            f"https://127.0.0.1:{port}",
            "--upstream-ca",
            self.files.ca,
            "--upstream-client-cert",
            f"{self.files.clientCertificate}:{self.files.clientKey}",
        )
        head, body = splitResponse(await get(proxy.port, b"/"))
        self.assertEqual((responseStatus(head), body), (200, b"HTTP/2"))

    async def test_missing(self) -> None:
        """Without one, the same server refuses the handshake: 502."""
        port = self.twistedSite(requireClientCertificate=True)
        proxy = self.proxy(f"https://127.0.0.1:{port}", "--upstream-ca", self.files.ca, "--retries", "0")
        response = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        self.assertEqual(responseStatus(response), 502)
