"""
The access log through a real proxy: one line per exchange (refusals, 404s, clients that leave and HTTP/2
streams included), in the combined, JSON and template formats, secrets redacted, written to a file.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.usage import UsageError
from twisted.trial import unittest

from rproxy.test.support import ScriptedUpstream, curl, rawRequest, startProxy, waitFor

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class AccessLogTests(unittest.TestCase):
    def start(self, *arguments: str) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.upstream = ScriptedUpstream(self, lambda proto, request: OK)
        self.proxy = startProxy(self, [self.upstream.url], *arguments, "--access-log", self.path)
        self.addCleanup(self.proxy.site.observers[-1].sink.close)

    async def lines(self, count: int) -> list[str]:
        """The log's lines once it holds C{count} (the writer thread writes within about 10 ms)."""

        def read() -> list[str]:
            if not os.path.exists(self.path):
                return []
            with open(self.path, encoding="utf-8") as f:
                return f.read().splitlines()

        self.assertTrue(await waitFor(lambda: len(read()) >= count, 5), read())
        return read()

    async def test_combined(self) -> None:
        """The combined format, then the request id, milliseconds and service; a secret parameter redacted."""
        self.start()
        code, out, err = await curl(
            ["-s", "-H", "Referer: https://a.example/p?token=r1", "-A", "probe/1", "-u", "alice:hunter2",
             f"http://127.0.0.1:{self.proxy.port}/x?access_token=s3cret&page=2"]
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        [line] = await self.lines(1)
        pattern = (
            r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /x\?access_token=\[redacted\]&page=2 '
            r'HTTP/1\.1" 200 5 "https://a\.example/p\?token=\[redacted\]" "probe/1" [0-9a-f]{32} \d+\.\d default\Z'
        )
        self.assertRegex(line, pattern)
        for secret in ("s3cret", "r1", "hunter2", "YWxpY2U6aHVudGVyMg"):
            self.assertNotIn(secret, line)

    async def test_json(self) -> None:
        """JSON lines: every field with a value; refusals, 404s and local answers each get their line."""
        self.start("--access-log-format", "json", "--access-log-redact", "session", "--max-body-size", "4")
        await rawRequest(self.proxy.port, b"GET /a?session=abc HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await rawRequest(
            self.proxy.port, b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\nConnection: close\r\n\r\n"
        )
        first, refused = [json.loads(line) for line in await self.lines(2)]
        self.assertEqual(first["path"], "/a?session=[redacted]")
        self.assertEqual(
            {k: first[k] for k in ("method", "host", "protocol", "status", "bytes_out", "service", "attempts")},
            {"method": "GET", "host": "h", "protocol": "HTTP/1.1", "status": 200, "bytes_out": 5, "service": "default",
             "attempts": 1},
        )  # fmt: skip
        self.assertEqual(first["upstream"], self.upstream.url)
        self.assertGreaterEqual(first["upstream_first_byte_ms"], first["upstream_connect_ms"])
        self.assertRegex(first["request_id"], r"\A[0-9a-f]{32}\Z")
        self.assertRegex(first["trace_id"], r"\A[0-9a-f]{32}\Z")
        self.assertRegex(first["time"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
        self.assertEqual(first["outcome"], "done")
        self.assertNotIn("fault", first)
        self.assertEqual((refused["status"], refused["fault"], refused["error"]), (413, "client", "http_request_error"))
        self.assertIn("exceeds the limit of 4", refused["reason"])

    async def test_templateAndHTTP2(self) -> None:
        """A template of fields; each HTTP/2 stream is its own line."""
        self.start("--access-log-format", "{protocol} {method} {path} {status} {outcome}")
        url = f"http://127.0.0.1:{self.proxy.port}"
        for path in ("/one", "/two"):  # curl 7.88 fails to reuse an h2c connection: one each
            code, out, err = await curl(["-s", "--http2-prior-knowledge", url + path])
            self.assertEqual(code, 0, err)
        self.assertEqual(sorted(await self.lines(2)), ["HTTP/2 GET /one 200 done", "HTTP/2 GET /two 200 done"])

    async def test_clientGone(self) -> None:
        """A client that leaves before the response: a line whose outcome says so, without a status."""
        self.start("--access-log-format", "{status} {outcome} {service}")
        self.upstream.respond = lambda proto, request: b""
        await rawRequest(self.proxy.port, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n", timeout=0.3)
        self.assertEqual(await self.lines(1), ["- client_gone default"])

    async def test_requestHeaders(self) -> None:
        """--access-log-header: the named fields in request_headers, credentials and configured ones redacted."""
        self.start(
            *("--access-log-format", "json", "--access-log-redact", "x-secret"),
            *("--access-log-header", "x-client", "--access-log-header", "authorization"),
            *("--access-log-header", "x-secret", "--access-log-header", "x-absent"),
        )
        extra = b"X-Client: app/2\r\nAuthorization: Bearer tok3n\r\nX-Secret: hush\r\n"
        await rawRequest(self.proxy.port, b"GET / HTTP/1.1\r\nHost: h\r\n" + extra + b"Connection: close\r\n\r\n")
        [line] = await self.lines(1)
        self.assertEqual(
            json.loads(line)["request_headers"],
            {"x-client": "app/2", "authorization": "Bearer [redacted]", "x-secret": "[redacted]"},
        )
        self.assertNotIn("tok3n", line)
        self.assertNotIn("hush", line)

    def test_badFormat(self) -> None:
        error = self.assertRaises(
            UsageError, startProxy, self, ["http://127.0.0.1:1"], "--access-log-format", "{client} {nope}"
        )
        self.assertIn("--access-log-format: ", str(error))
        self.assertIn("unknown field 'nope'", str(error))

    def test_unopenable(self) -> None:
        from rproxy.app.config import ConfigError

        error = self.assertRaises(
            ConfigError, startProxy, self, ["http://127.0.0.1:1"], "--access-log", "/no/such/dir/a.log"
        )
        self.assertTrue(re.match(r"--access-log: cannot open /no/such/dir/a\.log: ", str(error)), str(error))

    async def test_refusedHeadsAndConnections(self) -> None:
        """A head refused before it is a request, and a connection over the limit, each get their line."""
        self.start("--access-log-format", "json", "--max-connections", "1")
        await rawRequest(self.proxy.port, b"GET /x HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n")
        self.assertTrue(await waitFor(lambda: not self.proxy.site.connections, 5))
        blocker = await rawRequestHeld(self.proxy.port)
        self.assertTrue(await waitFor(lambda: len(self.proxy.site.connections) == 1, 5))
        refused = await rawRequest(self.proxy.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        blocker.transport.loseConnection()
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused)
        malformed, overLimit = [json.loads(line) for line in await self.lines(2)]
        self.assertEqual((malformed["status"], malformed["fault"], malformed["peer"]), (400, "client", "127.0.0.1"))
        self.assertEqual((overLimit["status"], overLimit["error"]), (503, "connection_limit_reached"))


async def rawRequestHeld(port: int) -> Protocol:
    """An open connection to C{port} that sends nothing (it holds a place under --max-connections)."""
    from twisted.internet import reactor

    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())


class CombinedFormatTests(unittest.TestCase):
    def test_escaped(self) -> None:
        """Quotes, backslashes, controls and bytes past ASCII in quoted values are escaped: one ASCII line."""
        from twisted.web.http_headers import Headers

        from rproxy.observe.accesslog import AccessLog
        from rproxy.observe.record import ExchangeRecord

        lines: list[bytes] = []

        class Sink:
            def write(self, line: bytes) -> None:
                lines.append(line)

        headers = Headers({b"user-agent": [b'a"b\\c\x01\xe9'], b"referer": [b"/r?key=k1"]})
        record = ExchangeRecord(0.0, b"GET", b"/p?token=t&x=1", None, b"HTTP/1.1", "10.0.0.1", None, headers)
        record.status, record.duration = 200, 0.0123
        AccessLog(Sink()).exchangeEnded(record)  # type: ignore[arg-type]
        [line] = lines
        self.assertEqual(
            line,
            b'10.0.0.1 - - [01/Jan/1970:00:00:00 +0000] "GET /p?token=[redacted]&x=1 HTTP/1.1" 200 0 '
            b'"/r?key=[redacted]" "a\\"b\\\\c\\x01\\xe9" - 12.3 -',
        )
