"""
The filter chain through a real proxy: request filters that go on, answer or wait, consumed fields, the
onion order of response filters, body transforms, errors, a client that leaves while a filter waits, and
the end of every exchange told to the filters that asked.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.downstream.body import fileBody
from rproxy.errors import clientError
from rproxy.filters.chain import FilterChain
from rproxy.interfaces import IBodyTransform, IRequestFilter, IResponseFilter
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext
from rproxy.test.support import (
    ScriptedUpstream,
    rawRequest,
    startProxy,
    useFilters,
    waitFor,
)
from rproxy.test.test_conformance import parseResponse
from rproxy.testing import inboundRequest, runFilters

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


def get(target: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n" + extra + b"\r\n"


@implementer(IRequestFilter, IResponseFilter)
class Step:
    """A filter that records what it sees, adds a response field naming itself, and answers as told."""

    def __init__(
        self,
        name: bytes,
        log: list[str],
        verdict: Callable[[RequestContext], object] = lambda context: None,
        consumes: tuple[bytes, ...] = (),
    ) -> None:
        self.name = name
        self.log = log
        self.verdict = verdict
        self.consumes = consumes
        self.ended = 0

    def onRequest(self, context: RequestContext) -> object:
        self.log.append(f"request {self.name.decode()}")
        context.whenEnded(self._ended)
        return self.verdict(context)

    def _ended(self) -> None:
        self.ended += 1

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.log.append(f"response {self.name.decode()} {status}")
        headers.append((b"X-Step", self.name))


@implementer(IResponseFilter)
class Upper:
    """A response filter that upper-cases the body, part by part."""

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> IBodyTransform:
        headers[:] = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        return UpperTransform()


@implementer(IBodyTransform)
class UpperTransform:
    def transform(self, data: bytes) -> bytes:
        return data.upper()

    def finish(self) -> bytes:
        return b"!"


@implementer(IRequestFilter)
class ReadWhole:
    """A request filter that reads the whole body, then sends it upper-cased, with its length."""

    consumes = ()

    def onRequest(self, context: RequestContext) -> defer.Deferred[None]:
        body = context.body
        assert body is not None
        read: defer.Deferred[None] = defer.Deferred()
        parts: list[bytes] = []

        class Reader:
            def writeBody(self, data: bytes) -> None:
                parts.append(data)

            def finishBody(self, trailers: object) -> None:
                whole = b"".join(parts).upper()
                context.body = fileBody(io.BytesIO(whole), len(whole))
                read.callback(None)

            def failBody(self, error: object) -> None:
                read.errback(Exception(error))

            def registerBodyProducer(self, producer: object) -> None:
                pass

            def unregisterBodyProducer(self) -> None:
                pass

        body.attach(Reader())
        return read


class ChainTests(unittest.TestCase):
    """Filters on a running proxy, through real sockets."""

    def proxied(self) -> tuple[ScriptedUpstream, object]:
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        return upstream, startProxy(self, [upstream.url])

    async def test_goOnInOrder(self) -> None:
        """Request filters run in order; response filters in reverse, each adding to the head."""
        upstream, proxy = self.proxied()
        log: list[str] = []
        first, second = Step(b"a", log), Step(b"b", log)
        useFilters(proxy, first, second)  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.values(b"x-step"), [b"b", b"a"])
        self.assertEqual(log, ["request a", "request b", "response b 200", "response a 200"])
        self.assertEqual((first.ended, second.ended), (1, 1))
        self.assertEqual(len(upstream.requests), 1)

    async def test_answerLocally(self) -> None:
        """A filter's answer goes to the client through the response sides of the filters before it only."""
        upstream, proxy = self.proxied()
        log: list[str] = []
        answer = LocalResponse(204, [(b"X-Answer", b"yes")], reason="preflight")
        first = Step(b"a", log)
        second = Step(b"b", log, lambda context: answer)
        third = Step(b"c", log)
        useFilters(proxy, first, second, third)  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 204)
        self.assertEqual(response.values(b"x-answer"), [b"yes"])
        self.assertEqual(response.values(b"x-step"), [b"a"])
        self.assertEqual(log, ["request a", "request b", "response a 204"])
        self.assertEqual(upstream.requests, [], "never forwarded")
        self.assertEqual((first.ended, second.ended, third.ended), (1, 1, 0))

    async def test_filterReplacesBody(self) -> None:
        """
        A filter that reads the whole body puts another in its place: the upstream gets that one, framed by
        its length, although the client sent it chunked.
        """
        upstream, proxy = self.proxied()
        useFilters(proxy, ReadWhole())  # type: ignore[arg-type]
        request = (
            b"POST / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        response = parseResponse(await rawRequest(proxy.port, request))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 200)
        [received] = upstream.requests
        self.assertEqual(received.body, b"HELLO WORLD")
        self.assertEqual(received.headers(b"content-length"), [b"11"])
        self.assertEqual(received.headers(b"transfer-encoding"), [])

    async def test_refuse(self) -> None:
        """A refusal is the error response, with its fields and those the filters before it add."""
        upstream, proxy = self.proxied()
        log: list[str] = []
        refusal = clientError(401, "credentials missing", [(b"WWW-Authenticate", b'Basic realm="x"')])
        useFilters(proxy, Step(b"a", log), Step(b"b", log, lambda context: refusal))  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 401)
        self.assertEqual(response.values(b"www-authenticate"), [b'Basic realm="x"'])
        self.assertEqual(response.values(b"x-step"), [b"a"])
        self.assertEqual(response.values(b"x-rproxy-fault"), [b"client"])
        self.assertIn(b"credentials missing", response.body)
        self.assertEqual(upstream.requests, [])

    async def test_waitForDeferredAndCoroutine(self) -> None:
        """A filter may answer later, with a Deferred or a coroutine; the exchange waits for it."""
        upstream, proxy = self.proxied()
        log: list[str] = []

        def later(context: RequestContext) -> defer.Deferred[None]:
            return task.deferLater(reactor, 0.05, lambda: None)

        async def checks(context: RequestContext) -> FilterVerdict:
            await task.deferLater(reactor, 0.05, lambda: None)
            if context.inbound.headers.hasHeader(b"x-deny"):
                return clientError(403, "denied by the coroutine")
            context.outbound.headers.addRawHeader(b"X-Checked", b"yes")
            return None

        useFilters(proxy, Step(b"a", log, later), Step(b"b", log, checks))  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.requests[0].headers(b"x-checked"), [b"yes"])
        response = parseResponse(await rawRequest(proxy.port, get(extra=b"X-Deny: 1\r\n")))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 403)
        self.assertEqual(len(upstream.requests), 1)

    async def test_consumedFieldsRemoved(self) -> None:
        """The fields a filter consumes never reach the upstream; others do."""
        upstream, proxy = self.proxied()
        useFilters(proxy, Step(b"a", [], consumes=(b"authorization", b"x-api-key")))  # type: ignore[arg-type]
        extra = b"Authorization: Basic dTpw\r\nX-Api-Key: k\r\nX-Kept: 1\r\n"
        response = parseResponse(await rawRequest(proxy.port, get(extra=extra)))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 200)
        [received] = upstream.requests
        self.assertEqual(received.headers(b"authorization"), [])
        self.assertEqual(received.headers(b"x-api-key"), [])
        self.assertEqual(received.headers(b"x-kept"), [b"1"])

    async def test_laterFilterSetsConsumedField(self) -> None:
        """Consumed fields are removed before the filters run: any filter may set them for the upstream."""
        upstream, proxy = self.proxied()

        def setAuthorization(context: RequestContext) -> None:
            context.outbound.headers.setRawHeaders(b"authorization", [b"Bearer internal"])

        consumer = Step(b"a", [], setAuthorization, consumes=(b"authorization",))
        useFilters(proxy, Step(b"b", [], setAuthorization), consumer)  # type: ignore[arg-type]
        extra = b"Authorization: Basic dTpw\r\n"
        response = parseResponse(await rawRequest(proxy.port, get(extra=extra)))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.requests[0].headers(b"authorization"), [b"Bearer internal"])

    async def test_filterFails(self) -> None:
        """A filter that raises is the proxy's 500, logged with the filter's name; the request never passes."""
        upstream, proxy = self.proxied()

        def broken(context: RequestContext) -> None:
            raise ZeroDivisionError("oops")

        useFilters(proxy, Step(b"a", [], broken))  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 500)
        self.assertIn(b"filter 'filter0' failed", response.body)
        self.assertEqual(response.values(b"x-rproxy-fault"), [b"proxy"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(upstream.requests, [])

    async def test_asyncFilterFails(self) -> None:
        """A waiting filter whose Deferred fails is a 500 too."""
        upstream, proxy = self.proxied()

        async def broken(context: RequestContext) -> None:
            await task.deferLater(reactor, 0.01, lambda: None)
            raise ZeroDivisionError("later")

        useFilters(proxy, Step(b"a", [], broken))  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(upstream.requests, [])

    async def test_clientLeavesWhileFilterWaits(self) -> None:
        """A client that leaves cancels the filter's wait; nothing is forwarded, the end is told once."""
        upstream, proxy = self.proxied()
        waiting: list[defer.Deferred[None]] = []
        cancelled: list[bool] = []

        def wait(context: RequestContext) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred(lambda _: cancelled.append(True))
            waiting.append(d)
            return d

        step = Step(b"a", [], wait)
        useFilters(proxy, step)  # type: ignore[arg-type]
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), Protocol())  # type: ignore[attr-defined]
        client.transport.write(get())
        self.assertTrue(await waitFor(lambda: waiting, 5))
        client.transport.abortConnection()
        self.assertTrue(await waitFor(lambda: cancelled, 5), "the filter's Deferred is cancelled")
        self.assertTrue(await waitFor(lambda: step.ended == 1, 5))
        self.assertEqual(upstream.requests, [])

    async def test_bodyTransformAndErrorFields(self) -> None:
        """A response filter's transform rewrites the body as it streams; an upstream error gets its fields."""
        upstream = ScriptedUpstream(
            self,
            lambda proto, request: (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            ),
        )
        proxy = startProxy(self, [upstream.url])
        useFilters(proxy, Step(b"a", []), Upper())  # type: ignore[arg-type]
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.body, b"ABCDE!")
        self.assertEqual(response.values(b"x-step"), [b"a"])

        # An upstream that is gone: the 502 still passes the response filters' head side.
        await upstream.listening.listener.stopListening()
        for connection in upstream.connections:
            connection.transport.abortConnection()
        response = parseResponse(await rawRequest(proxy.port, get()))  # type: ignore[attr-defined]
        self.assertEqual(response.status, 502)
        self.assertEqual(response.values(b"x-step"), [b"a"])
        self.assertIn(b"502 Bad Gateway", response.body, "an error's body is never transformed")


class RunFiltersTests(unittest.TestCase):
    """L{rproxy.testing.runFilters}, what a filter author tests with, behaves as the proxy does."""

    def test_passAndTransform(self) -> None:
        log: list[str] = []
        result = self.successResultOf(
            runFilters(
                [Step(b"a", log, consumes=(b"x-key",)), Upper()],
                inboundRequest(headers=[(b"x-key", b"secret"), (b"x-other", b"1")]),
                headers=[(b"Content-Length", b"3")],
                body=[b"ab", b"c"],
            )
        )
        self.assertIsNone(result.verdict)
        names = [name.lower() for name, _ in result.forwarded]
        self.assertNotIn(b"x-key", names)
        self.assertIn(b"x-other", names)
        self.assertEqual(result.body, b"ABC!")
        self.assertEqual(result.headers, [(b"X-Step", b"a")])

    def test_refusalAndEnd(self) -> None:
        step = Step(b"a", [], lambda context: clientError(429, "slow down", [(b"Retry-After", b"3")]))
        result = self.successResultOf(runFilters([Step(b"outer", []), step]))
        self.assertEqual(result.status, 429)
        self.assertEqual(result.headers, [(b"Retry-After", b"3"), (b"X-Step", b"outer")])
        self.assertEqual(result.forwarded, [])
        self.assertEqual(step.ended, 1)

    def test_chainRejectsNonFilters(self) -> None:
        self.assertRaises(TypeError, FilterChain, [("x", object())])
