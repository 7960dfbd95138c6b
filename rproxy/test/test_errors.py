"""
Upstream failures become precise errors (rproxy/upstream/http1.py, pool.py, exchange.py).

Before the response began: a status that says who failed, a one-line reason, Proxy-Status and
X-Rproxy-Fault, and a structured log event.  After it began: the client's connection is reset, so a
truncated response never looks complete.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import reactor
from twisted.trial import unittest

from rproxy.test.support import (
    LogCapture,
    ReceivedRequest,
    ScriptedUpstream,
    rawRequest,
    sleep,
    splitResponses,
    startProxy,
)

GET = b"GET /resource HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def answer(response: bytes, close: bool = False, closeDelay: float = 0.0):  # type: ignore[no-untyped-def]
    """A ScriptedUpstream responder writing C{response} (and closing, after C{closeDelay}, if asked)."""

    def respond(protocol, request: ReceivedRequest) -> bytes:  # type: ignore[no-untyped-def]
        protocol.transport.write(response)
        if close:
            reactor.callLater(closeDelay, protocol.transport.loseConnection)
        return b""

    return respond


def silent(protocol: object, request: ReceivedRequest) -> bytes:
    return b""


class ErrorBeforeResponseTests(unittest.TestCase):
    """Failures before any response byte reached the client: an error response."""

    async def errorResponse(
        self, upstreamURL: str, status: int, errorType: bytes, reasonPart: bytes, *arguments: str
    ) -> bytes:
        logs = LogCapture(self)
        proxy = startProxy(self, [upstreamURL], *arguments)
        data = await rawRequest(proxy.port, GET, timeout=15)
        responses = splitResponses(data)
        self.assertEqual(len(responses), 1, data)
        head, body = responses[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
        self.assertIn(b"\r\nProxy-Status: rproxy; error=" + errorType + b";", head)
        self.assertIn(b"\r\nContent-Type: text/plain; charset=utf-8", head)
        self.assertIn(reasonPart, body)
        self.assertEqual(body.count(b"\n"), 1)
        [event] = logs.withStatus(status)
        self.assertIn(reasonPart.decode(), event["reason"])
        self.assertEqual(event["errorType"], errorType.decode())
        self.assertEqual(event["target"], "/resource")
        return head

    async def test_refused(self) -> None:
        """Nothing listens: 502 at once, the upstream at fault."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.monotonic()
        head = await self.errorResponse(
            f"http://127.0.0.1:{port}", 502, b"connection_refused", b"refused the connection"
        )
        self.assertIn(b"\r\nX-Rproxy-Fault: upstream", head)
        self.assertLess(time.monotonic() - started, 2)

    async def test_unresolvable(self) -> None:
        """A host name that does not resolve: 502 within the connect timeout."""
        started = time.monotonic()
        head = await self.errorResponse(
            "http://no-such-host.invalid:80", 502, b"dns_error", b"could not be resolved", "--connect-timeout", "5"
        )
        self.assertIn(b"\r\nX-Rproxy-Fault: upstream", head)
        self.assertLess(time.monotonic() - started, 7)

    async def test_connectTimeout(self) -> None:
        """A listener whose accept queue is full never completes the handshake: 504 after the timeout."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(3):  # fill the accept queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        self.addCleanup(lambda: [f.close() for f in fillers])
        started = time.monotonic()
        await self.errorResponse(
            f"http://127.0.0.1:{port}",
            504,
            b"connection_timeout",
            b"did not accept the connection within 0.5s",
            "--connect-timeout",
            "0.5",
        )
        self.assertLess(time.monotonic() - started, 3)

    async def test_responseTimeout(self) -> None:
        """The upstream reads the request and never answers: 504 after --response-timeout."""
        upstream = ScriptedUpstream(self, silent)
        await self.errorResponse(
            upstream.url, 504, b"http_response_timeout", b"sent no response within 0.5s", "--response-timeout", "0.5"
        )
        self.assertEqual(len(upstream.requests), 1)

    async def test_closedBeforeResponse(self) -> None:
        """The upstream hangs up without a response: 502."""
        upstream = ScriptedUpstream(self, answer(b"", close=True))
        await self.errorResponse(
            upstream.url, 502, b"connection_terminated", b"closed the connection before responding"
        )

    async def test_garbageStatusLine(self) -> None:
        """A response that is not HTTP: 502."""
        upstream = ScriptedUpstream(self, answer(b"SSH-2.0-OpenSSH\r\n\r\n"))
        await self.errorResponse(upstream.url, 502, b"http_protocol_error", b"malformed status line")

    async def test_contentLengthAndTransferEncoding(self) -> None:
        """An ambiguously framed response is refused, not guessed: 502."""
        upstream = ScriptedUpstream(
            self,
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        )
        await self.errorResponse(
            upstream.url, 502, b"http_response_transfer_coding", b"both Content-Length and Transfer-Encoding"
        )

    async def test_conflictingContentLength(self) -> None:
        upstream = ScriptedUpstream(
            self, answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
        )
        await self.errorResponse(
            upstream.url, 502, b"http_response_content_length", b"conflicting Content-Length values"
        )

    async def test_badHeaderLine(self) -> None:
        upstream = ScriptedUpstream(self, answer(b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n"))
        await self.errorResponse(upstream.url, 502, b"http_protocol_error", b"malformed header line")

    async def test_headTooLarge(self) -> None:
        upstream = ScriptedUpstream(self, answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000))
        await self.errorResponse(upstream.url, 502, b"http_response_header_section_size", b"larger than 65536")

    async def test_unrequestedSwitch(self) -> None:
        """101 to a request that asked for no upgrade: 502."""
        upstream = ScriptedUpstream(self, answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"))
        await self.errorResponse(upstream.url, 502, b"http_protocol_error", b"no upgrade was requested")


class ErrorAfterResponseTests(unittest.TestCase):
    """Failures after the response began: the client's connection is reset, never ended cleanly."""

    async def aborted(self, response: bytes, *arguments: str, close: bool = True, headSent: bool = True) -> bytes:
        """
        The upstream sends C{response}, then (a moment later, as a failing server would) closes;
        the client must get what was sent and then see its connection end without a complete response.
        """
        upstream = ScriptedUpstream(self, answer(response, close=close, closeDelay=0.3))
        proxy = startProxy(self, [upstream.url], *arguments)
        # keep-alive request: a clean end would leave the connection open, an abort closes it
        started = time.monotonic()
        data = await rawRequest(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        self.assertLess(time.monotonic() - started, 3, "reset at once, not left hanging until a timeout")
        if headSent:
            self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        else:  # the failure was seen in the same read as the head: the reset may discard it
            self.assertTrue(data == b"" or data.startswith(b"HTTP/1.1 200 "), data)
        return data

    async def test_shortBody(self) -> None:
        """Content-Length 100, 10 bytes, close: the client gets 10 bytes and a reset connection."""
        data = await self.aborted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
        self.assertTrue(data.endswith(b"\r\n\r\n" + b"a" * 10), data)

    async def test_chunkedCutOff(self) -> None:
        """A chunked body that stops before its last chunk: no terminating chunk reaches the client."""
        data = await self.aborted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertIn(b"hello", data)
        self.assertNotIn(b"0\r\n\r\n", data)

    async def test_brokenChunkFraming(self) -> None:
        """Bad chunk framing mid-body: abort, and what follows the bad chunk is not forwarded."""
        data = await self.aborted(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nsmuggled\r\n0\r\n\r\n",
            close=False,
            headSent=False,
        )
        self.assertNotIn(b"smuggled", data)
        self.assertNotIn(b"0\r\n\r\n", data)

    async def test_readTimeout(self) -> None:
        """An upstream that stalls mid-body longer than --read-timeout: abort."""
        data = await self.aborted(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", "--read-timeout", "0.5", close=False
        )
        self.assertTrue(data.endswith(b"abc"))

    async def test_proxyStillServes(self) -> None:
        """After an aborted exchange the proxy serves the next request normally."""
        responses = iter(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        )

        def respond(protocol, request: ReceivedRequest) -> bytes:  # type: ignore[no-untyped-def]
            data = next(responses)
            protocol.transport.write(data)
            if data.endswith(b"abc"):
                protocol.transport.loseConnection()
            return b""

        upstream = ScriptedUpstream(self, respond)
        proxy = startProxy(self, [upstream.url])
        await rawRequest(proxy.port, GET, timeout=5)
        await sleep(0.1)
        data = await rawRequest(proxy.port, GET, timeout=5)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok"), data)


class FailoverBeforeSendingTests(unittest.TestCase):
    async def test_refusedUpstreamSkipped(self) -> None:
        """One of two upstreams refuses connections: every request, POSTs too, is served by the other."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            deadPort = s.getsockname()[1]
        alive = ScriptedUpstream(self, answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        proxy = startProxy(self, [f"http://127.0.0.1:{deadPort}", alive.url])
        for method in (b"GET", b"POST", b"GET", b"POST"):
            data = await rawRequest(
                proxy.port, method + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nz"
            )
            self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertEqual([r.body for r in alive.requests], [b"z"] * 4)
