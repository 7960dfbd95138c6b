"""
Request ids and W3C trace context through a real proxy: generated or kept from a trusted client, sent
upstream, returned to the client on every response and error, recorded; traceparent forwarded or started.
"""

from __future__ import annotations

import re

from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rproxy.errors import clientError
from rproxy.observe.requestid import RequestIds, traceContext
from rproxy.test.support import ScriptedUpstream, curl, headerValues, rawRequest, startProxy, useFilters
from rproxy.test.test_filter_chain import Step
from rproxy.test.test_observe_record import Recorder

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEX32 = re.compile(rb"[0-9a-f]{32}\Z")
VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def get(extra: bytes = b"", target: bytes = b"/") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + extra + b"\r\n"


class RequestIdTests(unittest.TestCase):
    def start(self, *arguments: str) -> None:
        self.upstream = ScriptedUpstream(self, lambda proto, request: OK)
        self.proxy = startProxy(self, [self.upstream.url], *arguments)
        self.recorder = Recorder()
        self.proxy.site.observers.append(self.recorder)

    async def test_generated(self) -> None:
        """Without one from a trusted client: a new id, the same upstream, to the client and in the record."""
        self.start()
        head = await rawRequest(self.proxy.port, get(b"X-Request-ID: forged\r\n"))
        [sent] = headerValues(head, b"x-request-id")
        self.assertRegex(sent, HEX32)
        self.assertEqual(self.upstream.requests[0].headers(b"x-request-id"), [sent])
        self.assertEqual(self.recorder.records[0].requestId, sent.decode())
        again = await rawRequest(self.proxy.port, get())
        self.assertNotEqual(headerValues(again, b"x-request-id"), [sent], "each request has its own")

    async def test_trustedClient(self) -> None:
        """A trusted proxy's id is kept, unless it could break a log line."""
        self.start("--trusted-proxy", "127.0.0.1")
        head = await rawRequest(self.proxy.port, get(b"X-Request-ID: abc-123\r\n"))
        self.assertEqual(headerValues(head, b"x-request-id"), [b"abc-123"])
        self.assertEqual(self.upstream.requests[0].headers(b"x-request-id"), [b"abc-123"])
        head = await rawRequest(self.proxy.port, get(b"X-Request-ID: a b\r\n"))
        self.assertRegex(headerValues(head, b"x-request-id")[0], HEX32)

    async def test_errors(self) -> None:
        """Every error the proxy answers carries the id: a filter's refusal, a refused body, an upstream down."""
        self.start("--max-body-size", "10")
        useFilters(self.proxy, Step(b"f", [], lambda c: clientError(401, "no") if c.inbound.target == b"/f" else None))  # type: ignore[arg-type]
        refused = await rawRequest(self.proxy.port, get(target=b"/f"))
        self.assertTrue(refused.startswith(b"HTTP/1.1 401 "), refused)
        tooLarge = await rawRequest(
            self.proxy.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(tooLarge.startswith(b"HTTP/1.1 413 "), tooLarge)
        await self.upstream.listening.listener.stopListening()
        down = await rawRequest(self.proxy.port, get())
        self.assertTrue(down.startswith(b"HTTP/1.1 502 "), down)
        for response in (refused, tooLarge, down):
            self.assertRegex(headerValues(response, b"x-request-id")[0], HEX32)
        self.assertEqual(
            [r.requestId for r in self.recorder.records],
            [headerValues(r, b"x-request-id")[0].decode() for r in (refused, tooLarge, down)],
        )

    async def test_http2(self) -> None:
        self.start()
        code, out, err = await curl(["-s", "-i", "--http2-prior-knowledge", f"http://127.0.0.1:{self.proxy.port}/"])
        self.assertEqual(code, 0, err)
        [sent] = re.findall(rb"x-request-id: ([0-9a-f]+)", out)
        self.assertEqual(self.upstream.requests[0].headers(b"x-request-id"), [sent])


class TraceContextTests(unittest.TestCase):
    async def test_forwardedOrStarted(self) -> None:
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        recorder = Recorder()
        proxy.site.observers.append(recorder)
        await rawRequest(proxy.port, get(b"traceparent: " + VALID + b"\r\ntracestate: vendor=1\r\n"))
        await rawRequest(proxy.port, get())
        await rawRequest(proxy.port, get(b"traceparent: 00-xyz\r\ntracestate: vendor=1\r\n"))
        kept, started, replaced = upstream.requests
        self.assertEqual((kept.headers(b"traceparent"), kept.headers(b"tracestate")), ([VALID], [b"vendor=1"]))
        self.assertEqual(recorder.records[0].traceId, "4bf92f3577b34da6a3ce929d0e0e4736")
        for received, record in ((started, recorder.records[1]), (replaced, recorder.records[2])):
            [value] = received.headers(b"traceparent")
            self.assertRegex(value, rb"00-[0-9a-f]{32}-[0-9a-f]{16}-01\Z")
            self.assertEqual(value[3:35].decode(), record.traceId)
            self.assertEqual(received.headers(b"tracestate"), [])

    def test_traceContextRules(self) -> None:
        """What counts as a valid traceparent (W3C Trace Context, version 00 and later)."""

        def parsed(*values: bytes) -> bytes | None:
            headers = Headers()
            for value in values:
                headers.addRawHeader(b"traceparent", value)
            return traceContext(headers)[0]

        self.assertIsNone(parsed(VALID))
        self.assertIsNone(parsed(VALID.upper()))
        for bad in (
            VALID.replace(b"4bf92f3577b34da6a3ce929d0e0e4736", b"0" * 32),
            VALID.replace(b"00f067aa0ba902b7", b"0" * 16),
            b"ff" + VALID[2:],
            VALID + b"x",
            VALID[:-1],
        ):
            self.assertIsNotNone(parsed(bad), bad)
        self.assertIsNotNone(parsed(VALID, VALID), "two traceparent fields")

    def test_requestIdRules(self) -> None:
        ids = RequestIds(lambda peer: peer == "10.0.0.1")
        headers = Headers({b"x-request-id": [b"r-1"]})
        self.assertEqual(ids.idFor(headers, "10.0.0.1"), "r-1")
        self.assertRegex(ids.idFor(headers, "10.0.0.2").encode(), HEX32)
        self.assertRegex(ids.idFor(headers, None).encode(), HEX32)
        self.assertRegex(ids.idFor(Headers({b"x-request-id": [b"x" * 201]}), "10.0.0.1").encode(), HEX32)
