"""
The C{forward-auth} filter: its options, its timer and cancellation on a memory reactor, and end to end
with a real auth service in its own process (L{rproxy.test.forwardauth_service}) in front of a
L{ScriptedUpstream}, through a real rproxy, with curl, httpx and treq as clients.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from rproxy.filters.forwardauth import ForwardAuth
from rproxy.headers import ForwardingPolicy
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.plugins.filters import forwardAuth
from rproxy.proxy.message import OutboundRequest, RequestContext
from rproxy.test.certs import CertificateAuthority, listenTLS, serverTLS
from rproxy.test.support import (
    PYTHON,
    RunningProxy,
    ScriptedUpstream,
    UpstreamProcess,
    _ReadyProtocol,
    curl,
    headerValues,
    responseStatus,
    sleep,
    startProxy,
    useFilters,
)
from rproxy.testing import inboundRequest, runFilters, verifyFilterFactory

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SERVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forwardauth_service.py")


def build(options: dict[str, object], reactor: object = reactor, base: str = ".") -> ForwardAuth:
    built = forwardAuth.build(options, FilterEnvironment(reactor, base))
    assert isinstance(built, ForwardAuth)
    return built


class BuildTests(unittest.TestCase):
    """The options, checked when the filter is built; building opens nothing."""

    def test_contract(self) -> None:
        """The factory keeps the filter contract, and building a filter neither connects nor starts a timer."""
        memory = MemoryReactorClock()
        built = verifyFilterFactory(forwardAuth, {"url": "https://auth.example/check"}, memory)
        self.assertIsInstance(built, ForwardAuth)
        self.assertEqual((memory.tcpClients, memory.sslClients, memory.getDelayedCalls()), ([], [], []))

    def test_defaults(self) -> None:
        built = build({"url": "http://127.0.0.1:1/check"})
        self.assertEqual((built.timeout, built.method, built.consumes), (5.0, b"GET", frozenset()))

    def test_options(self) -> None:
        built = build(
            {
                "url": "http://auth.internal:4181/verify?token=abc",
                "timeout": "250ms",
                "method": "original",
                "request-headers": ["Authorization", "X-Api-Key"],
                "response-headers": ["X-Auth-User"],
                "user-header": "X-Auth-User",
                "max-response-size": "1k",
                "forward-credentials": False,
            }
        )
        self.assertEqual((built.timeout, built.method), (0.25, None))
        self.assertEqual(built.consumes, frozenset({b"authorization", b"x-api-key", b"x-auth-user"}))
        self.assertEqual(repr(built), "<ForwardAuth http://auth.internal:4181/verify>")  # no query: it may be secret

    def test_badOptions(self) -> None:
        """Each bad option is a ValueError naming it and saying what is wrong, without echoing credentials."""
        url = "http://auth.example/check"
        cases: list[tuple[dict[str, object], str, str]] = [
            ({}, "url", "required"),
            ({"url": "ftp://auth.example/"}, "url", "not ftp://"),
            ({"url": "/check"}, "url", "absolute URL"),
            ({"url": "http:///check"}, "url", "has no host"),
            ({"url": "http://user:hunter2@auth.example/"}, "url", "credentials"),
            ({"url": "http://auth.example:99999/"}, "url", "invalid port"),
            ({"url": "http://auth.example/a b"}, "url", "without spaces"),
            ({"url": "http://ауth.example/"}, "url", "ASCII"),
            ({"url": 5}, "url", "expected a string"),
            ({"url": url, "timeout": 0}, "timeout", "greater than 0"),
            ({"url": url, "timeout": "soon"}, "timeout", "not a duration"),
            ({"url": url, "method": "G T"}, "method", "method name"),
            ({"url": url, "request-headers": ["X-Forwarded-Uri"]}, "request-headers", "set by the proxy"),
            ({"url": url, "request-headers": ["Connection"]}, "request-headers", "set by the proxy"),
            ({"url": url, "request-headers": ["Bad Name"]}, "request-headers", "not a field name"),
            ({"url": url, "response-headers": ["Content-Length"]}, "response-headers", "set by the proxy"),
            ({"url": url, "response-headers": [3]}, "response-headers", "list of strings"),
            ({"url": url, "user-header": "a:b"}, "user-header", "not a field name"),
            ({"url": url, "max-response-size": "lots"}, "max-response-size", "not a size"),
            ({"url": url, "max-in-flight": 0}, "max-in-flight", "at least 1"),
            ({"url": url, "forward-credentials": "maybe"}, "forward-credentials", "true or false"),
            ({"url": url, "ca-file": "ca.pem"}, "ca-file", "only for an https"),
            ({"url": "https://auth.example/", "ca-file": "missing.pem"}, "ca-file", "cannot read"),
            ({"url": url, "realm": "x"}, "realm", "unknown option"),
        ]
        for options, option, problem in cases:
            with self.assertRaises(ValueError, msg=options) as raised:
                build(options)
            message = str(raised.exception)
            self.assertIn(option, message)
            self.assertIn(problem, message)
            self.assertNotIn("hunter2", message)

    def test_caFileRelativeToBase(self) -> None:
        directory = self.mktemp()
        CertificateAuthority().writeFiles(directory)
        build({"url": "https://127.0.0.1/check", "ca-file": "ca.pem"}, base=directory)
        with self.assertRaises(ValueError) as raised:
            build({"url": "https://127.0.0.1/check", "ca-file": "server.key"}, base=directory)
        self.assertIn("holds no PEM certificate", str(raised.exception))


class MemoryTests(unittest.TestCase):
    """The timer and cancellation, on a memory reactor where a connection never completes."""

    def setUp(self) -> None:
        self.memory = MemoryReactorClock()
        self.auth = build({"url": "http://127.0.0.1:9/check", "timeout": 2}, self.memory)

    def test_timeoutWhileConnecting(self) -> None:
        """The timeout counts from the start of the subrequest: a connection that never completes is a 503."""
        result = runFilters([self.auth])
        self.assertNoResult(result)
        self.assertEqual(len(self.memory.tcpClients), 1)
        self.memory.advance(1.9)
        self.assertNoResult(result)
        self.memory.advance(0.1)
        answered = self.successResultOf(result)
        self.assertEqual(answered.status, 503)
        self.assertIn(b"forward auth service http://127.0.0.1:9/check timed out after 2 s", answered.body)
        self.assertEqual(answered.forwarded, [])
        self.assertEqual(self.memory.getDelayedCalls(), [])

    def test_cancelWhileConnecting(self) -> None:
        """A cancelled subrequest (the client left) fails with exactly CancelledError and leaves no timer."""
        request = inboundRequest()
        outbound = OutboundRequest.fromInbound(request, ForwardingPolicy())
        waiting = self.auth.onRequest(RequestContext(request, outbound, request.clientHost))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.memory.getDelayedCalls(), [])

    def test_cancelWhileWaitingForTheAnswer(self) -> None:
        """Cancelled once the subrequest is sent, it aborts the connection and fails with CancelledError."""
        request = inboundRequest(b"/report?q=1", headers=[(b"authorization", b"Bearer t")])
        outbound = OutboundRequest.fromInbound(request, ForwardingPolicy())
        waiting = self.auth.onRequest(RequestContext(request, outbound, request.clientHost))
        factory = self.memory.tcpClients[0][2]
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        sent = transport.value()
        self.assertTrue(sent.startswith(b"GET /check HTTP/1.1\r\n"), sent)
        self.assertIn(b"X-Forwarded-Uri: /report?q=1\r\n", sent)
        self.assertIn(b"Authorization: Bearer t\r\n", sent)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.memory.getDelayedCalls(), [])

    def answer(self, response: bytes) -> StringTransport:
        """Complete the connection the filter started with C{response} as the auth service's answer."""
        factory = self.memory.tcpClients[-1][2]
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(response)
        return transport

    def test_passThroughRunFilters(self) -> None:
        auth = build({"url": "http://127.0.0.1:9/check", "response-headers": "X-Auth-User"}, self.memory)
        request = inboundRequest(headers=[(b"x-auth-user", b"mallory"), (b"x-auth-user", b"root")])
        result = runFilters([auth], request)
        self.answer(b"HTTP/1.1 204 No Content\r\nX-Auth-User: alice\r\n\r\n")
        passed = self.successResultOf(result)
        self.assertIsNone(passed.verdict)
        self.assertEqual([value for name, value in passed.forwarded if name.lower() == b"x-auth-user"], [b"alice"])

    def test_refusalFields(self) -> None:
        """A refusal reaches the client without hop-by-hop fields or its own framing."""
        result = runFilters([self.auth])
        self.answer(
            b"HTTP/1.1 403 Forbidden\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTrailer: X-Sum\r\n"
            b"Proxy-Authenticate: Basic\r\nTransfer-Encoding: chunked\r\nX-Reason: banned\r\n\r\n"
            b"3\r\nno!\r\n0\r\n\r\n"
        )
        refused = self.successResultOf(result)
        self.assertEqual((refused.status, refused.body, refused.forwarded), (403, b"no!", []))
        self.assertEqual(refused.headers, [(b"X-Reason", b"banned"), (b"Content-Length", b"3")])
        self.assertEqual(refused.verdict.reason, "forward auth answered 403")  # type: ignore[union-attr]

    def test_closeBeforeUse(self) -> None:
        self.successResultOf(self.auth.close())

    def test_inFlightBounded(self) -> None:
        """
        Past C{max-in-flight} subrequests waiting for a slow auth service, a request is refused at once (a 503
        without a connection) instead of costing one more; the slots come back however a subrequest ends.
        """
        auth = build({"url": "http://127.0.0.1:9/check", "timeout": 2, "max-in-flight": 2}, self.memory)
        self.assertEqual(build({"url": "http://127.0.0.1:9/check"}).maxInFlight, 256)
        first, second = runFilters([auth]), runFilters([auth])
        refused = self.successResultOf(runFilters([auth]))
        self.assertEqual((refused.status, refused.verdict.retryAfter), (503, 1))  # type: ignore[union-attr]
        self.assertIn(b"has 2 subrequests in flight (max-in-flight)", refused.body)
        self.assertEqual(refused.verdict.errorType, "connection_limit_reached")  # type: ignore[union-attr]
        self.assertEqual((len(self.memory.tcpClients), auth.inFlight), (2, 2))
        self.memory.advance(2)
        self.assertEqual([self.successResultOf(each).status for each in (first, second)], [503, 503])
        request = inboundRequest()
        waiting = auth.onRequest(
            RequestContext(request, OutboundRequest.fromInbound(request, ForwardingPolicy()), None)
        )
        self.assertEqual(auth.inFlight, 1)
        waiting.cancel()  # type: ignore[union-attr]
        self.failureResultOf(waiting, CancelledError)  # type: ignore[arg-type]
        answered = runFilters([auth])
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIsNone(self.successResultOf(answered).verdict)
        self.assertEqual(auth.inFlight, 0)


@implementer(IRequestFilter)
class SeenUser:
    """A filter after the auth filter: the users it was told of."""

    consumes = ()

    def __init__(self) -> None:
        self.users: list[str | None] = []

    def onRequest(self, context: RequestContext) -> None:
        self.users.append(context.user)


class AuthService(UpstreamProcess):
    """The auth service of L{rproxy.test.forwardauth_service}, in its own process."""

    def start(self) -> defer.Deferred[None]:
        ready: defer.Deferred[None] = defer.Deferred()
        self._protocol = _ReadyProtocol(ready)
        reactor.spawnProcess(self._protocol, PYTHON, [PYTHON, SERVICE, str(self.port)], env=os.environ)
        return ready


def split(output: bytes) -> tuple[bytes, bytes]:
    """The head and body of the last response of curl -i output."""
    head, _, body = output.rpartition(b"\r\n\r\n")
    return head[head.rfind(b"HTTP/") :], body


class EndToEndTests(unittest.TestCase):
    """A real auth service, proxy, upstream and clients."""

    timeout = 30

    async def setUpAuth(self, path: str = "/check", **options: object) -> tuple[RunningProxy, ScriptedUpstream]:
        """Start the auth service, an upstream and a proxy whose requests go through a filter asking C{path}."""
        self.service = AuthService(self, "auth")
        await self.service.start()
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        self.seen = SeenUser()
        self.use(proxy, path, **options)
        return proxy, upstream

    def use(self, proxy: RunningProxy, path: str, **options: object) -> None:
        """Put a filter asking the auth service's C{path} on C{proxy} (options with _ for -)."""
        table = {"url": self.service.url + path, **{name.replace("_", "-"): v for name, v in options.items()}}
        auth = build(table)
        self.addCleanup(auth.close)
        useFilters(proxy, auth, self.seen)

    async def authLog(self) -> list[dict[str, Any]]:
        """What the auth service received."""
        response = await treq.get(self.service.url + "/log", pool=self.pool)
        return json.loads(await response.content())  # type: ignore[no-any-return]

    async def curl(self, url: str, *arguments: str) -> tuple[int, bytes, bytes]:
        """curl C{url}: the status, the head, and the body."""
        code, out, err = await curl(["-s", "-i", *arguments, url], timeout=10)
        self.assertEqual(code, 0, err)
        head, body = split(out)
        return responseStatus(head), head, body

    async def test_passCopiesNamedFields(self) -> None:
        """
        A 2xx answer lets the request through with the fields the auth service named (forged ones are
        replaced or removed), the user noted, the credentials still forwarded; the auth service got the credentials and
        the description of the original request, and no body.
        """
        proxy, upstream = await self.setUpAuth(
            response_headers=["X-Auth-User", "X-Auth-Role", "X-Auth-Groups"], user_header="X-Auth-User"
        )
        status, head, body = await self.curl(
            proxy.url + "/app/page?q=1",
            *("-H", "Host: app.example", "-H", "Authorization: Bearer good", "-H", "Cookie: theme=dark"),
            *("-H", "X-Auth-User: mallory", "-H", "X-Auth-Groups: root", "-H", "X-Other: kept"),
        )
        self.assertEqual((status, body), (200, b"ok"))
        [received] = upstream.requests
        self.assertEqual(received.requestLine, b"GET /app/page?q=1 HTTP/1.1")
        self.assertEqual(received.headers(b"x-auth-user"), [b"alice"])
        self.assertEqual(received.headers(b"x-auth-role"), [b"admin"])
        self.assertEqual(received.headers(b"x-auth-groups"), [])  # forged, and not in the answer
        self.assertEqual(received.headers(b"authorization"), [b"Bearer good"])
        self.assertEqual(received.headers(b"cookie"), [b"theme=dark"])
        self.assertEqual(received.headers(b"x-other"), [b"kept"])
        self.assertEqual(self.seen.users, ["alice"])
        [asked] = await self.authLog()
        self.assertEqual((asked["path"], asked["method"], asked["body"]), ("/check", "GET", ""))
        fields = asked["headers"]
        self.assertEqual(fields["authorization"], ["Bearer good"])
        self.assertEqual(fields["cookie"], ["theme=dark"])
        self.assertEqual(fields["x-forwarded-method"], ["GET"])
        self.assertEqual(fields["x-forwarded-uri"], ["/app/page?q=1"])
        self.assertEqual(fields["x-forwarded-host"], ["app.example"])
        self.assertEqual(fields["x-forwarded-proto"], ["http"])
        self.assertEqual(fields["x-forwarded-for"], ["127.0.0.1"])
        self.assertNotIn("x-auth-user", fields)
        self.assertNotIn("x-other", fields)

    async def test_refusalPassedOn(self) -> None:
        """A 401 reaches the client as the auth service gave it (httpx as the client); nothing is proxied."""
        proxy, upstream = await self.setUpAuth(response_headers=["X-Auth-User"])
        response = await threads.deferToThread(
            httpx.get, proxy.url + "/app", headers={"Authorization": "Bearer bad", "X-Auth-User": "mallory"}
        )
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="test"')
        self.assertEqual(response.headers["content-type"], "text/plain")
        self.assertEqual(response.text, "no entry without a good token\n")
        self.assertEqual(response.headers["set-cookie"], "auth-session=s3cr3t; Path=/")
        self.assertNotIn("x-rproxy-fault", response.headers)
        self.assertNotIn("content-encoding", response.headers)
        self.assertEqual(upstream.requests, [])
        self.assertEqual(self.seen.users, [])

    async def test_redirectPassedOn(self) -> None:
        proxy, upstream = await self.setUpAuth()
        status, head, body = await self.curl(proxy.url + "/login/again")
        self.assertEqual(status, 302)
        self.assertEqual(headerValues(head, b"location"), [b"https://login.example/start"])
        self.assertEqual(upstream.requests, [])

    async def test_cookiesNeverKept(self) -> None:
        """A cookie the auth service sets goes to the client it answered, never on another client's subrequest."""
        proxy, upstream = await self.setUpAuth()
        status, head, body = await self.curl(proxy.url + "/", "-H", "Authorization: Bearer good")
        self.assertEqual(status, 200)
        status, head, body = await self.curl(proxy.url + "/")
        self.assertEqual(status, 401)
        self.assertEqual(headerValues(head, b"set-cookie"), [b"auth-session=s3cr3t; Path=/"])
        first, second = await self.authLog()
        self.assertNotIn("cookie", second["headers"])
        self.assertEqual(len(upstream.requests), 1)

    async def test_connectionReused(self) -> None:
        """Subrequests one after the other share one persistent connection."""
        proxy, upstream = await self.setUpAuth()
        for _ in range(5):
            status, head, body = await self.curl(proxy.url + "/", "-H", "Authorization: Bearer good")
            self.assertEqual(status, 200)
        self.assertEqual(len({entry["port"] for entry in await self.authLog()}), 1)

    async def test_originalMethodAndCredentialsConsumed(self) -> None:
        """
        C{method = "original"} asks with the client's method (without its body); with C{forward-credentials}
        off the copied fields do not reach the upstream, which gets the body.
        """
        proxy, upstream = await self.setUpAuth(method="original", forward_credentials=False)
        arguments = ("-X", "POST", "-d", "payload", "-H", "Authorization: Bearer good", "-H", "Cookie: a=b")
        status, head, body = await self.curl(proxy.url + "/form", *arguments)
        self.assertEqual(status, 200)
        [asked] = await self.authLog()
        self.assertEqual((asked["method"], asked["body"]), ("POST", ""))
        self.assertEqual(asked["headers"]["x-forwarded-method"], ["POST"])
        [received] = upstream.requests
        self.assertEqual((received.requestLine, received.body), (b"POST /form HTTP/1.1", b"payload"))
        self.assertEqual((received.headers(b"authorization"), received.headers(b"cookie")), ([], []))

    async def test_serviceStopped(self) -> None:
        """Once the auth service is gone (its pooled connection too), requests get a 503 at once."""
        proxy, upstream = await self.setUpAuth()
        status, head, body = await self.curl(proxy.url + "/", "-H", "Authorization: Bearer good")
        self.assertEqual(status, 200)
        await self.service.kill()
        started = time.monotonic()
        status, head, body = await self.curl(proxy.url + "/", "-H", "Authorization: Bearer good")
        elapsed = time.monotonic() - started
        self.assertEqual(status, 503)
        reason = f"forward auth service {self.service.url}/check refused the connection"
        self.assertEqual(body, f"503 Service Unavailable: {reason}\n".encode())
        self.assertIn(b"error=connection_refused", headerValues(head, b"proxy-status")[0])
        self.assertLess(elapsed, 4.5)  # not the 5 s timeout (curl's start counts too)
        self.assertEqual(len(upstream.requests), 1)

    async def test_timeoutCoversAnswerAndBody(self) -> None:
        """A service that never answers, and one that stops in the middle of its body: 503 after the timeout."""
        proxy, upstream = await self.setUpAuth("/hang", timeout=0.5)
        for path in ("/hang", "/stall"):
            self.use(proxy, path, timeout=0.5)
            started = time.monotonic()
            status, head, body = await self.curl(proxy.url + "/")
            elapsed = time.monotonic() - started
            self.assertEqual(status, 503, path)
            self.assertIn(f"forward auth service {self.service.url}{path} timed out after 0.5 s".encode(), body)
            self.assertTrue(0.5 <= elapsed < 4.5, elapsed)
        asked = [(entry["path"], entry["lost"]) for entry in await self.authLog()]
        self.assertEqual(asked, [("/hang", True), ("/stall", True)])
        self.assertEqual(upstream.requests, [])

    async def test_answerTooLarge(self) -> None:
        proxy, upstream = await self.setUpAuth("/big")
        status, head, body = await self.curl(proxy.url + "/")
        self.assertEqual(status, 502)
        self.assertIn(b"answered 401 with a body over 65536 bytes", body)
        self.assertIn(b"error=http_response_body_size", headerValues(head, b"proxy-status")[0])
        self.assertEqual(upstream.requests, [])

    async def test_brokenAnswers(self) -> None:
        """An answer that is not HTTP, none, or one cut short: a 503 saying which."""
        proxy, upstream = await self.setUpAuth("/garbage")
        cases = [
            ("/garbage", "sent a malformed answer", "http_protocol_error"),
            ("/close", "closed the connection without answering", "connection_terminated"),
            ("/cut", "closed the connection in the middle of its answer", "http_response_incomplete"),
        ]
        for path, problem, errorType in cases:
            self.use(proxy, path)
            status, head, body = await self.curl(proxy.url + "/")
            self.assertEqual(status, 503, path)
            self.assertIn(f"forward auth service {self.service.url}{path} {problem}".encode(), body)
            self.assertIn(b"error=" + errorType.encode(), headerValues(head, b"proxy-status")[0])
        self.assertEqual(upstream.requests, [])

    async def test_clientLeaves(self) -> None:
        """A client that leaves while its request waits closes the subrequest; nothing is proxied."""
        proxy, upstream = await self.setUpAuth("/hang", timeout=20)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), Protocol())
        client.transport.write(b"GET /app HTTP/1.1\r\nHost: app.example\r\n\r\n")
        for _ in range(200):
            if await self.authLog():
                break
            await sleep(0.02)
        client.transport.abortConnection()
        started = time.monotonic()
        for _ in range(200):
            [asked] = await self.authLog()
            if asked["lost"]:
                break
            await sleep(0.02)
        self.assertTrue(asked["lost"])
        self.assertLess(time.monotonic() - started, 5.0)  # not the 20 s timeout
        self.assertEqual(upstream.requests, [])

    async def test_concurrentRequests(self) -> None:
        """20 requests at once (treq), half with a good token: each gets its own verdict."""
        proxy, upstream = await self.setUpAuth(response_headers=["X-Auth-User"])

        async def one(index: int) -> tuple[int, int, bytes]:
            token = "good" if index % 2 else "bad"
            response = await treq.get(
                f"{proxy.url}/item/{index}", headers={"Authorization": f"Bearer {token}"}, pool=self.pool
            )
            return index, response.code, await response.content()

        results = await defer.gatherResults([defer.ensureDeferred(one(i)) for i in range(20)])
        for index, code, body in results:
            self.assertEqual(code, 200 if index % 2 else 401, (index, body))
        proxied = sorted(r.requestLine for r in upstream.requests)
        self.assertEqual(proxied, sorted(b"GET /item/%d HTTP/1.1" % i for i in range(1, 20, 2)))
        self.assertTrue(all(r.headers(b"x-auth-user") == [b"alice"] for r in upstream.requests))
        self.assertEqual(len(await self.authLog()), 20)


class _Verifier(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"x-auth-user", b"tls-user")
        return b""


class TLSTests(unittest.TestCase):
    """An https auth service: its certificate checked against C{ca-file}."""

    timeout = 15

    async def test_caFile(self) -> None:
        directory = self.mktemp()
        files = CertificateAuthority().writeFiles(directory)
        port = listenTLS(self, server.Site(_Verifier()), serverTLS(files, protocols=[b"http/1.1"]))
        upstream = ScriptedUpstream(self, lambda proto, request: OK)
        proxy = startProxy(self, [upstream.url])
        url = f"https://127.0.0.1:{port}/check"
        trusting = build({"url": url, "ca-file": "ca.pem", "response-headers": "X-Auth-User"}, base=directory)
        self.addCleanup(trusting.close)
        useFilters(proxy, trusting)
        code, out, err = await curl(["-s", "-i", proxy.url + "/"])
        head, body = split(out)
        self.assertEqual((responseStatus(head), body), (200, b"ok"))
        self.assertEqual(upstream.requests[0].headers(b"x-auth-user"), [b"tls-user"])
        untrusting = build({"url": url})
        self.addCleanup(untrusting.close)
        useFilters(proxy, untrusting)
        code, out, err = await curl(["-s", "-i", proxy.url + "/"])
        head, body = split(out)
        self.assertEqual(responseStatus(head), 503)
        self.assertIn(b"error=tls_certificate_error", headerValues(head, b"proxy-status")[0])
        self.assertEqual(len(upstream.requests), 1)
