"""
The edge filters attacked through real sockets, over HTTP/1.1 and HTTP/2 (h2c with prior knowledge): fields a
filter consumes smuggled past it (spelled with C{_}, sent as trailers, listed in C{Connection}), a target that
a route takes as sent and an upstream reads as another route's, WebSocket handshakes on both protocols (the
filters decide before the upstream sees a byte), compressed responses on HTTP/2, and the logs of every
refusal searched for the secrets the requests carried.
"""

from __future__ import annotations

import base64
import gzip
import os
from collections.abc import Sequence

import jwt
from passlib.hash import ldap_sha1
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest
from wsproto.handshake import generate_accept_token

from rproxy.interfaces import FilterEnvironment
from rproxy.plugins.filters import basicAuth, compress, forwardAuth, jwtAuth
from rproxy.test.h2client import H2Client, StreamRecord
from rproxy.test.support import (
    ReceivedRequest,
    RunningProxy,
    ScriptedUpstream,
    freePort,
    rawRequest,
    responseStatus,
    startProxy,
    useFilters,
)
from rproxy.test.test_config import writeConfig
from rproxy.test.test_filter_basicauth import htpasswd

SECRET = "attacks-secret-attacks-secret-attacks!"
PASSWORD = "Tr0ub4dor&3-horse"
CREDENTIALS = b"Basic " + base64.b64encode(b"alice:" + PASSWORD.encode())
PAGE = b"<p>" + b"hello " * 1000 + b"</p>"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)

Fields = Sequence[tuple[bytes, bytes]]


def respond(proto: object, request: ReceivedRequest) -> bytes:
    """A 101 to a WebSocket handshake (with the accept token of its key), else L{OK}."""
    keys = request.headers(b"sec-websocket-key")
    if not keys:
        return OK
    accept = generate_accept_token(keys[0])
    return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + (
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def get(target: bytes, fields: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + fields + b"\r\n"


async def h2(
    proxy: RunningProxy,
    method: bytes,
    path: bytes,
    fields: Fields = (),
    body: bytes | None = None,
    trailers: Fields | None = None,
    endStream: bool = True,
) -> StreamRecord:
    """One request on a new h2c connection; its stream once it ended (or, with C{endStream=False}, its head)."""
    client = await H2Client.connect(proxy.port)
    streamID = client.request(method, path, fields, endStream=endStream and body is None)
    if body is not None:
        client.send(streamID, body, endStream=trailers is None, trailers=trailers)
    record = client.streams[streamID]
    await client.waitUntil(lambda: record.finished or (not endStream and record.headers is not None))
    client.close()
    return record


class FilterTestCase(unittest.TestCase):
    """A real proxy in front of a L{ScriptedUpstream} answering L{respond}."""

    timeout = 20

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, respond)
        self.proxy = startProxy(self, [self.upstream.url])

    def basicAuth(self) -> object:
        return basicAuth.build(
            {"htpasswd": htpasswd(self, {"alice": ldap_sha1.hash(PASSWORD)})}, FilterEnvironment(reactor)
        )

    def jwtAuth(self) -> object:
        options = {"algorithms": ["HS256"], "secret": SECRET, "require": [], "claims-to-headers": {"sub": "X-User"}}
        return jwtAuth.build(options, FilterEnvironment(reactor))

    def bearer(self, sub: str = "alice") -> bytes:
        return b"Bearer " + jwt.encode({"sub": sub}, SECRET, algorithm="HS256").encode()


class ConsumedFieldTests(FilterTestCase):
    """What the client sends of a field a filter sets from what it verified never reaches the upstream."""

    async def test_underscoreSpellings(self) -> None:
        """
        C{X_User} is C{X-User} to CGI, WSGI and PHP upstreams: removed with it, in any case, on both protocols.
        A C{Connection} that lists the field removes the client's copy only, never the filter's.
        """
        useFilters(self.proxy, self.jwtAuth())
        forged = b"X_User: root\r\nx_USER: root\r\nX-User: root\r\nConnection: X-User, x_user\r\n"
        response = await rawRequest(self.proxy.port, get(b"/", b"Authorization: " + self.bearer() + b"\r\n" + forged))
        self.assertEqual(responseStatus(response), 200)
        record = await h2(self.proxy, b"GET", b"/", [(b"authorization", self.bearer()), (b"x_user", b"root")])
        self.assertEqual(record.status, 200)
        for request in self.upstream.requests:
            fields = [line.split(b":")[0].lower() for line in request.head.split(b"\r\n")[1:]]
            self.assertEqual([name for name in fields if b"user" in name], [b"x-user"], request.head)
            self.assertEqual(request.headers(b"x-user"), [b"alice"])

    async def test_trailers(self) -> None:
        """A consumed field sent as a trailer is dropped, on both protocols; other trailers go on."""
        useFilters(self.proxy, self.jwtAuth())
        trailers = b"X-User: root\r\nX_User: root\r\nX-Checksum: 1\r\n"
        chunked = b"Transfer-Encoding: chunked\r\nAuthorization: " + self.bearer() + b"\r\n"
        request = get(b"/", chunked, b"POST") + b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n"
        self.assertEqual(responseStatus(await rawRequest(self.proxy.port, request)), 200)
        fields = [(b"authorization", self.bearer())]
        trailerFields = [(b"x-user", b"root"), (b"x_user", b"root"), (b"x-checksum", b"1")]
        record = await h2(self.proxy, b"POST", b"/", fields, body=b"abc", trailers=trailerFields)
        self.assertEqual(record.status, 200)
        for received in self.upstream.requests:
            self.assertEqual(received.body, b"abc")
            self.assertTrue(received.head.endswith(b"\r\nX-User: alice\r\nTransfer-Encoding: chunked"), received.head)
        received = b"".join(connection.received for connection in self.upstream.connections)
        sections = [part.partition(b"\r\n\r\n")[0].lower() for part in received.split(b"\r\n0\r\n")[1:]]
        self.assertEqual(sections, [b"x-checksum: 1"] * 2)


class RouteTests(unittest.TestCase):
    """
    An authenticated route and a catch-all to the same upstream: a target that the upstream, normalising it
    (as nginx, Tomcat or Express do), would read as the authenticated route's is refused, not routed past it.
    """

    timeout = 20

    async def test_normalisedTargetOfAnotherRoute(self) -> None:
        upstream = ScriptedUpstream(self, respond)
        users = os.path.abspath(htpasswd(self, {"alice": ldap_sha1.hash(PASSWORD)}))
        config = (
            f'upstream = ["{upstream.url}"]\n[filters.auth]\ntype = "basic-auth"\nhtpasswd = "{users}"\n'
            '[[routes]]\npath-prefix = "/admin"\nservice = "default"\nfilters = ["auth"]\n'
            '[[routes]]\nservice = "default"\n'
        )
        proxy = startProxy(self, [], "--config", writeConfig(self, config))
        tricks = [
            b"/x/../admin/users",
            b"/./admin/users",
            b"/%2e%2E/admin/users",
            b"//admin/users",
            b"/%61dmin/users",
            b"/admin%2Fusers",
            b"/admin;x=1/users",
            b"/admin\\users",
            b"/admin/../x",  # the other way round: the route with filters takes it, as sent
        ]
        for target in tricks:
            response = await rawRequest(proxy.port, get(target))
            self.assertEqual(responseStatus(response), 400, target)
            self.assertIn(b"is routed differently once normalised", response)
        record = await h2(proxy, b"GET", b"//admin/users")
        self.assertEqual(record.status, 400)
        self.assertEqual(upstream.requests, [])
        self.assertEqual(responseStatus(await rawRequest(proxy.port, get(b"/admin/x/../users"))), 401)
        self.assertEqual(responseStatus(await rawRequest(proxy.port, get(b"/open/a%20b/../c;d=1"))), 200)
        authorized = get(b"/admin/users", b"Authorization: " + CREDENTIALS + b"\r\n")
        self.assertEqual(responseStatus(await rawRequest(proxy.port, authorized)), 200)
        self.assertEqual(
            [r.requestLine for r in upstream.requests],
            [
                b"GET /open/a%20b/../c;d=1 HTTP/1.1",
                b"GET /admin/users HTTP/1.1",
            ],
        )


class UpgradeTests(FilterTestCase):
    """A WebSocket handshake goes through the filters before the upstream sees it, on both protocols."""

    async def test_http1(self) -> None:
        useFilters(self.proxy, self.basicAuth())
        handshake = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        handshake += b"Sec-WebSocket-Version: 13\r\n"
        request = b"GET /socket HTTP/1.1\r\nHost: h\r\n" + handshake
        refused = await rawRequest(self.proxy.port, request + b"Authorization: Basic eDp5\r\n\r\n", timeout=2)
        self.assertEqual(responseStatus(refused), 403)
        self.assertEqual(self.upstream.requests, [])
        switched = await rawRequest(
            self.proxy.port, request + b"Authorization: " + CREDENTIALS + b"\r\n\r\n", timeout=1
        )
        self.assertEqual(responseStatus(switched), 101)
        [received] = self.upstream.requests
        self.assertEqual(received.headers(b"authorization"), [])

    async def test_extendedConnect(self) -> None:
        """RFC 8441 over HTTP/2: the stream gets 401 without credentials, 200 (the tunnel) with them."""
        useFilters(self.proxy, self.basicAuth())
        webSocket = [(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")]
        refused = await h2(self.proxy, b"CONNECT", b"/socket", webSocket, endStream=False)
        self.assertEqual(refused.status, 401)
        self.assertEqual(self.upstream.requests, [])
        opened = await h2(
            self.proxy, b"CONNECT", b"/socket", [*webSocket, (b"authorization", CREDENTIALS)], endStream=False
        )
        self.assertEqual(opened.status, 200)
        [received] = self.upstream.requests
        self.assertEqual(received.headers(b"authorization"), [])

    async def test_extendedConnectForwardAuth(self) -> None:
        """
        The auth service is asked about an HTTP/2 WebSocket as about an HTTP/1.1 one: a GET (the request the
        upstream gets), not a CONNECT it would refuse or judge by other rules.
        """
        service = ScriptedUpstream(self, lambda proto, request: b"HTTP/1.1 204 No Content\r\n\r\n")
        auth = forwardAuth.build({"url": f"{service.url}/check", "method": "original"}, FilterEnvironment(reactor))
        self.addCleanup(auth.close)  # type: ignore[attr-defined]
        useFilters(self.proxy, auth)
        webSocket = [(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")]
        opened = await h2(self.proxy, b"CONNECT", b"/socket", webSocket, endStream=False)
        self.assertEqual(opened.status, 200)
        [asked] = service.requests
        self.assertEqual((asked.requestLine, asked.headers(b"x-forwarded-method")), (b"GET /check HTTP/1.1", [b"GET"]))


class CompressH2Tests(unittest.TestCase):
    """Compressed responses to an HTTP/2 client: no stale content-length, bodiless heads stay bodiless."""

    timeout = 20

    async def test_heads(self) -> None:
        def answer(proto: object, request: ReceivedRequest) -> bytes:
            if request.requestLine.startswith(b"GET /cut "):  # says more than it sends, then closes
                proto.transport.write(OK.replace(b"Content-Length: %d" % len(PAGE), b"Content-Length: 99999"))  # type: ignore[attr-defined]
                proto.transport.loseConnection()  # type: ignore[attr-defined]
                return b""
            if request.requestLine.startswith(b"GET /etag "):
                return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'
            return OK

        upstream = ScriptedUpstream(self, answer)
        proxy = startProxy(self, [upstream.url])
        useFilters(proxy, compress.build({}, FilterEnvironment(reactor)))
        gzipped = [(b"accept-encoding", b"gzip")]
        full = await h2(proxy, b"GET", b"/", gzipped)
        self.assertEqual(
            (full.status, full.header(b"content-encoding"), full.header(b"content-length")), (200, [b"gzip"], [])
        )
        self.assertEqual(gzip.decompress(full.data), PAGE)
        head = await h2(proxy, b"HEAD", b"/", gzipped)
        self.assertEqual((head.status, head.header(b"content-length"), head.data), (200, [], b""))
        notModified = await h2(proxy, b"GET", b"/etag", gzipped)
        self.assertEqual((notModified.status, notModified.header(b"etag"), notModified.data), (304, [b'W/"v1"'], b""))
        self.assertEqual(notModified.header(b"content-encoding"), [])
        cut = await h2(proxy, b"GET", b"/cut", gzipped)
        self.assertIsNotNone(cut.resetCode)  # never a stream that looks complete
        self.assertFalse(cut.ended)


class LogTests(FilterTestCase):
    """No filter puts a secret of a request (password, token, cookie, the auth service's key) in a log."""

    async def test_noSecretLogged(self) -> None:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        cookie = "session=cookie-value-never-logged"
        serviceKey = "service-key-never-logged"

        def auth(proto: object, request: ReceivedRequest) -> bytes:
            if b"refuse" in request.head:
                return b"HTTP/1.1 401 No\r\nWWW-Authenticate: Basic\r\nContent-Length: 2\r\n\r\nno"
            return b"HTTP/1.1 2x0 garbage\r\n\r\n"

        service = ScriptedUpstream(self, auth)
        expired = jwt.encode({"sub": "alice", "exp": 1}, SECRET, algorithm="HS256").encode()
        forged = jwt.encode({"sub": "alice"}, SECRET[::-1], algorithm="HS256").encode()
        wrong = b"Basic " + base64.b64encode(b"alice:" + PASSWORD.encode()[::-1])
        cases = [
            (self.basicAuth(), [CREDENTIALS, wrong, b"Basic !" + PASSWORD.encode(), b"Bearer " + PASSWORD.encode()]),
            (self.jwtAuth(), [self.bearer(), b"Bearer " + expired, b"Bearer " + forged, b"Bearer a.b." + expired]),
            (
                forwardAuth.build({"url": f"{service.url}/check?key={serviceKey}"}, FilterEnvironment(reactor)),
                [b"Bearer refuse-" + expired, b"Bearer " + expired],
            ),
            (
                forwardAuth.build(
                    {"url": f"http://127.0.0.1:{freePort()}/?key={serviceKey}"}, FilterEnvironment(reactor)
                ),
                [b"Bearer " + expired],
            ),
        ]
        statuses = []
        for built, values in cases:
            useFilters(self.proxy, built)
            for value in values:
                fields = [(b"authorization", value), (b"cookie", cookie.encode())]
                response = await rawRequest(
                    self.proxy.port, get(b"/", b"".join(n + b": " + v + b"\r\n" for n, v in fields))
                )
                record = await h2(self.proxy, b"GET", b"/", fields)
                statuses.append((responseStatus(response), record.status))
            if hasattr(built, "close"):
                await built.close()
        self.assertEqual(
            statuses,
            [(200, 200), (403, 403), (401, 401), (401, 401)]
            + [(200, 200), (403, 403), (403, 403), (401, 401)]
            + [(401, 401), (503, 503), (503, 503)],
        )
        logged = "\n".join(formatEvent(event) + repr(event) for event in events)
        self.assertIn("forward auth service", logged)
        for secret in (PASSWORD, PASSWORD[::-1], SECRET, cookie, serviceKey, expired.decode(), CREDENTIALS.decode()):
            self.assertNotIn(secret, logged)
        self.assertNotIn(expired.decode().rpartition(".")[2], logged)  # not even a token's signature
