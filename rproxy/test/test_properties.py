"""
Property-based tests (hypothesis) of the parts that read what others send: the client's HTTP/1.1 parser
and the body framing, the header filter, request-target routing against upstreams that normalise paths,
and the upstream response parser.

The parsers are driven through the whole proxy in memory: a L{ProxySite} built from options as
C{twist rproxy} builds it, on a L{MemoryReactorClock}, a client connection on a C{StringTransport}, and the
upstream connection the pool opens handed a C{StringTransport} of its own.  So a property holds for what a
client and an upstream really see, at thousands of inputs a second, with no socket to time out.  The
examples are derandomized and bounded (C{RPROXY_PROPERTY_EXAMPLES} raises the bound, C{make fuzz} does), so
a run is reproducible and takes seconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rproxy.app.build import buildSite
from rproxy.app.tap import Options
from rproxy.framing import MAX_LENGTH, ChunkedDecoder, MalformedBodyError, chunkSize, contentLength
from rproxy.headers import (
    FORWARDING,
    FRAMING,
    HOP_BY_HOP,
    ForwardingPolicy,
    requestHeaderPairs,
    responseHeaderPairs,
)
from rproxy.proxy.directors import Route, RoutingDirector, normalisedPath
from rproxy.proxy.message import InboundRequest
from rproxy.testing import directRequest, inboundRequest, makeService

EXAMPLES = int(os.environ.get("RPROXY_PROPERTY_EXAMPLES", "150"))

settings.register_profile(
    "rproxy",
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # a loaded CI machine is slow; a hang is caught long before trial's timeout
    derandomize=os.environ.get("RPROXY_PROPERTY_RANDOM") is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("rproxy")

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Fields the proxy itself removes, rebuilds or replaces: a generated end-to-end field is none of them.
NOT_END_TO_END = HOP_BY_HOP | FRAMING | FORWARDING | {b"expect", b"x-request-id", b"traceparent", b"tracestate"}

tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
#: Field values as a client may send them: no NUL, CR or LF; obs-text and inner blanks allowed.
fieldValues = st.binary(max_size=40).map(lambda v: v.translate(None, b"\x00\r\n"))
endToEndNames = tokens.filter(lambda name: name.lower() not in NOT_END_TO_END)
pathChars = st.sampled_from([*b"abcxyz019-._~!$&'()*+,;=:@%", *b"/"]).map(lambda c: bytes([c]))
paths = st.lists(pathChars, max_size=30).map(lambda chars: b"/" + b"".join(chars))
queries = st.one_of(st.just(b""), st.lists(pathChars, max_size=10).map(lambda chars: b"?" + b"".join(chars)))
methods = st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]), tokens)


class TCPStringTransport(StringTransport):
    """A string transport with the TCP options the upstream side sets."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to set in memory."""

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Nothing to set in memory."""

    def unregisterProducer(self) -> None:
        """As a socket's transport does, unregistering no producer is no error."""
        self.producer = None
        self.streaming = None


class MemoryProxy:
    """
    An rproxy in memory (see the module): client connections on string transports, and the upstream
    connections the proxy opens, answered by hand.
    """

    def __init__(self, *arguments: str) -> None:
        self.reactor = MemoryReactorClock()
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:9", "--access-log", "off", *arguments])
        self.site, _ = buildSite(options.config, self.reactor)

    def connect(self) -> tuple[Any, StringTransport]:
        """A new client connection, and the transport that collects what the proxy answers on it."""
        protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = TCPStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        assert protocol is not None
        protocol.makeConnection(transport)
        return protocol, transport

    def upstream(self) -> tuple[Any, StringTransport] | None:
        """The connection the proxy opened to its upstream last, made (C{None}: it opened none)."""
        if not self.reactor.tcpClients:
            return None
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients.pop()
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = TCPStringTransport()
        protocol.makeConnection(transport)
        self.turn()
        return protocol, transport

    def turn(self) -> None:
        """Run what is scheduled for now (a few rounds: callbacks schedule callbacks)."""
        for _ in range(5):
            self.reactor.advance(0)


@contextmanager
def noErrorsLogged() -> Iterator[list[LogEvent]]:
    """Collect every event logged as an error or with a failure (an unhandled exception) while it runs."""
    errors: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observe)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (taken modulo its length), as a peer's reads might cut it."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def byName(pairs: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """Each field name (lower case: names are case-insensitive) and its values, in order."""
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        grouped.setdefault(name.lower(), []).append(value)
    return grouped


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: |\r\n)")  # the reason phrase may be missing


def statuses(data: bytes) -> list[int]:
    """The statuses of the response heads in C{data} (a status line at its start or after a CRLF)."""
    return [
        int(m[1]) for m in STATUS_LINE.finditer(data) if m.start() == 0 or data[m.start() - 2 : m.start()] == b"\r\n"
    ]


def parseUpstreamRequest(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """The request line, the fields and the body (Content-Length or chunked) of the request the upstream got."""
    head, _, rest = data.partition(b"\r\n\r\n")
    line, *fieldLines = head.split(b"\r\n")
    fields = [(n, v.strip(b" \t")) for n, _, v in (f.partition(b":") for f in fieldLines)]
    names = {n.lower(): v for n, v in fields}
    if b"content-length" in names:
        return line, fields, rest[: int(names[b"content-length"])]
    if names.get(b"transfer-encoding", b"").lower() == b"chunked":
        body: list[bytes] = []
        decoder = ChunkedDecoder(body.append, lambda trailers, after: None)
        decoder.feed(rest)
        assert decoder.finished, rest
        return line, fields, b"".join(body)
    return line, fields, b""


class RequestParserTests(unittest.TestCase):
    """The client's HTTP/1.1 parser: valid requests arrive intact; any bytes get an answer or a clean close."""

    @given(
        method=methods,
        path=paths,
        query=queries,
        fields=st.lists(st.tuples(endToEndNames, fieldValues), max_size=8),
        body=st.binary(max_size=300),
        chunked=st.booleans(),
        chunkSizes=st.lists(st.integers(1, 64), min_size=1, max_size=8),
        cuts=st.lists(st.integers(0, 2000), max_size=6),
    )
    def test_validRequestRoundTrips(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        fields: list[tuple[bytes, bytes]],
        body: bytes,
        chunked: bool,
        chunkSizes: list[int],
        cuts: list[int],
    ) -> None:
        """
        A valid request, cut anywhere, reaches the upstream with its method, target, end-to-end fields (each
        name's values in order, without surrounding blanks; twisted.web's C{Headers} keeps no order between
        names) and body; a chunked body is re-framed, not altered.
        """
        assume(method != b"CONNECT")
        if chunked:
            framing = [(b"Transfer-Encoding", b"chunked")]
            encoded, rest, i = b"", body, 0
            while rest:
                size = chunkSizes[i % len(chunkSizes)]
                encoded += b"%x\r\n%s\r\n" % (size if size <= len(rest) else len(rest), rest[:size])
                rest, i = rest[size:], i + 1
            encoded += b"0\r\n\r\n"
        else:
            framing = [(b"Content-Length", b"%d" % len(body))]
            encoded = body
        head = [(b"Host", b"example.com"), *fields, *framing]
        wire = b"".join([method, b" ", path + query, b" HTTP/1.1\r\n", *(n + b": " + v + b"\r\n" for n, v in head)])
        proxy = MemoryProxy()
        with noErrorsLogged() as errors:
            protocol, client = proxy.connect()
            for piece in pieces(wire + b"\r\n" + encoded, cuts):
                protocol.dataReceived(piece)
                proxy.turn()
            connected = proxy.upstream()
            self.assertIsNotNone(connected, client.value())
            assert connected is not None
            upstreamProtocol, upstream = connected
            proxy.turn()
        self.assertEqual(errors, [])
        line, received, receivedBody = parseUpstreamRequest(upstream.value())
        self.assertEqual(line, method + b" " + path + query + b" HTTP/1.1")
        self.assertEqual(
            byName((n, v) for n, v in received if n.lower() not in NOT_END_TO_END),
            byName((n, v.strip(b" \t")) for n, v in fields),
        )
        self.assertEqual(receivedBody, body)
        self.assertEqual(client.value(), b"")  # nothing answered before the upstream did

    @given(
        data=st.one_of(
            st.binary(max_size=400),
            st.lists(
                st.sampled_from(
                    [
                        b"GET / HTTP/1.1\r\n",
                        b"POST /x HTTP/1.1\r\n",
                        b"GET http://a/ HTTP/1.0\r\n",
                        b"Host: a\r\n",
                        b"Host: b:80\r\n",
                        b"Content-Length: 5\r\n",
                        b"Content-Length: -1\r\n",
                        b"Transfer-Encoding: chunked\r\n",
                        b"Transfer-Encoding: chunked, identity\r\n",
                        b" folded\r\n",
                        b"Connection: close\r\n",
                        b"Expect: 100-continue\r\n",
                        b"\r\n",
                        b"\n",
                        b"5\r\nhello\r\n",
                        b"0\r\n\r\n",
                        b"ffffffffffffffffff\r\n",
                        b"\x00",
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                    ]
                ),
                max_size=14,
            ).map(b"".join),
        ),
        cuts=st.lists(st.integers(0, 500), max_size=5),
    )
    def test_anyBytesAnsweredOrClosed(self, data: bytes, cuts: list[int]) -> None:
        """
        Whatever a client sends, cut anywhere: no exception, nothing logged as an error, and every answer the
        proxy makes itself is a precise 4xx (never a 5xx: the upstream has not answered); when the client
        then goes away, the connection is gone from the site's count.
        """
        proxy = MemoryProxy()
        with noErrorsLogged() as errors:
            protocol, client = proxy.connect()
            for piece in pieces(data, cuts):
                protocol.dataReceived(piece)
                proxy.turn()
            answered = client.value()
            protocol.connectionLost(Failure(ConnectionDone()))
            proxy.turn()
        self.assertEqual(errors, [])
        for status in statuses(answered):
            self.assertTrue(status == 100 or 400 <= status < 500, answered)
        self.assertEqual(proxy.site.connections, set())


class FramingTests(unittest.TestCase):
    """Content-Length and chunk sizes: what parses is exactly what was meant; the rest is refused."""

    @given(st.integers(0, MAX_LENGTH), st.integers(0, 3), st.integers(1, 3))
    def test_contentLengthRoundTrips(self, length: int, zeros: int, copies: int) -> None:
        """A length, with leading zeros, repeated in one value or several, reads as itself."""
        value = b"0" * zeros + b"%d" % length
        self.assertEqual(contentLength([value] * copies), length)
        self.assertEqual(contentLength([b", ".join([value] * copies)]), length)

    @given(st.lists(st.binary(max_size=8), min_size=1, max_size=3))
    def test_contentLengthNeverGuesses(self, values: list[bytes]) -> None:
        """Any values either parse to the one number all of them state, or are refused."""
        try:
            length = contentLength(values)
        except MalformedBodyError:
            return
        members = {m.strip(b" \t") for v in values for m in v.split(b",")}
        self.assertEqual({int(m) for m in members}, {length})
        self.assertTrue(all(m.isdigit() for m in members))

    @given(st.binary(max_size=24))
    def test_chunkSizeHexOnly(self, line: bytes) -> None:
        """A chunk-size line parses only to the value of its 1 to 16 hex digits."""
        try:
            size = chunkSize(line)
        except MalformedBodyError:
            return
        digits = line.partition(b";")[0].rstrip(b" \t")
        self.assertTrue(1 <= len(digits) <= 16 and re.fullmatch(rb"[0-9a-fA-F]+", digits), line)
        self.assertEqual(size, int(digits, 16))

    @given(
        st.lists(st.binary(min_size=1, max_size=50), max_size=6),
        st.binary(max_size=30),
        st.lists(st.integers(0, 400), max_size=6),
    )
    def test_chunkedRoundTrips(self, chunks: list[bytes], after: bytes, cuts: list[int]) -> None:
        """Chunked data, cut anywhere, decodes to the data, and what follows the body is handed back whole."""
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-T: 1\r\n\r\n" + after
        data: list[bytes] = []
        ends: list[tuple[Any, bytes]] = []
        decoder = ChunkedDecoder(data.append, lambda trailers, rest: ends.append((trailers, rest)))
        rest = b""
        for piece in pieces(encoded, cuts):
            if decoder.finished:
                rest += piece
            else:
                decoder.feed(piece)
        self.assertEqual(b"".join(data), b"".join(chunks))
        self.assertEqual(len(ends), 1)
        self.assertEqual(ends[0][0], [(b"X-T", b"1")])
        self.assertEqual(ends[0][1] + rest, after)


hopNames = st.sampled_from(sorted(HOP_BY_HOP)).map(bytes.title)  # names are case-insensitive
anyNames = st.one_of(tokens, st.sampled_from(sorted(HOP_BY_HOP | FRAMING | FORWARDING)), hopNames)
fieldLists = st.lists(st.tuples(anyNames, fieldValues), max_size=12)


def headersOf(pairs: list[tuple[bytes, bytes]]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def connectionListed(pairs: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The model: every comma-separated token of every Connection value, lower case."""
    return {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


class HeaderFilterTests(unittest.TestCase):
    """The header filter: what never crosses the proxy, checked against a model, and idempotence."""

    @given(fieldLists, st.lists(tokens, max_size=3))
    def test_requestFields(self, pairs: list[tuple[bytes, bytes]], listed: list[bytes]) -> None:
        """
        No hop-by-hop, framing, forwarding or Connection-listed field survives; every other field does, in
        order; filtering the result again changes nothing.
        """
        pairs = [*pairs, *((b"Connection", name) for name in listed)]
        kept, _ = requestHeaderPairs(headersOf(pairs))
        dropped = HOP_BY_HOP | FRAMING | FORWARDING | connectionListed(pairs)
        names = [n.lower() for n, _ in kept]
        self.assertFalse(set(names) & dropped)
        model = [(n, v) for n, v in pairs if n.lower() not in dropped and n.lower() != b"expect"]
        self.assertEqual(
            sorted((n.lower(), v) for n, v in kept),
            sorted((n.lower(), v) for n, v in model),
        )
        again, _ = requestHeaderPairs(headersOf(kept))
        self.assertEqual(again, kept)

    @given(fieldLists, st.lists(tokens, max_size=3))
    def test_responseFields(self, pairs: list[tuple[bytes, bytes]], listed: list[bytes]) -> None:
        """The same for a response: the model's fields, in their order, and idempotent."""
        pairs = [*pairs, *((b"Connection", name) for name in listed)]
        kept = responseHeaderPairs(pairs)
        dropped = HOP_BY_HOP | connectionListed(pairs)
        self.assertEqual(kept, [(n, v) for n, v in pairs if n.lower() not in dropped])
        self.assertEqual(responseHeaderPairs(kept), kept)

    @given(fieldLists, st.ip_addresses(v=4).map(str), st.booleans())
    def test_forwardingFromUntrustedPeers(self, pairs: list[tuple[bytes, bytes]], peer: str, tls: bool) -> None:
        """
        From a peer that is not trusted, whatever forwarding fields it sent, the upstream is told exactly
        the peer's address and the scheme it connected with; nothing the client sent is kept.
        """
        policy = ForwardingPolicy(trustedProxies=())
        scheme = b"https" if tls else b"http"
        fields = dict((n.lower(), v) for n, v in policy.forwardingPairs(headersOf(pairs), peer, scheme, b"h", b"1.1"))
        self.assertEqual(fields[b"x-forwarded-for"], peer.encode())
        self.assertEqual(fields[b"x-forwarded-proto"], scheme)
        self.assertEqual(fields[b"forwarded"], b"for=" + peer.encode() + b";host=h;proto=" + scheme)
        self.assertEqual(fields[b"via"].split(b", ")[-1], b"1.1 rproxy")


# -- request targets

#: Path pieces that upstreams read differently: escapes (of dots, slashes, backslashes, semicolons),
#: dot segments, empty segments, parameters.
targetPieces = st.sampled_from(
    [b"/", b"a", b"b", b"admin", b"api", b".", b"..", b"%2e", b"%2E%2e", b"%2f", b"%5c", b"\\", b";", b";x=1", b"%3b"]
)
targets = st.lists(targetPieces, max_size=10).map(lambda parts: b"/" + b"".join(parts))
prefixes = st.sampled_from(["/admin", "/api", "/a", "/a/b", "/api/", "/b/admin"])


def modelNormalise(path: bytes) -> bytes:
    """
    What a normalising upstream reads (the model, independent of the proxy's code): escapes decoded once,
    backslashes as slashes, segment parameters dropped, then dot and empty segments resolved.
    """
    decoded = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m[1], 16)]), path).replace(b"\\", b"/")
    out: list[bytes] = []
    segments = decoded.split(b"/")[1:]
    for segment in segments:
        segment = segment.split(b";")[0]
        if segment == b"..":
            out = out[:-1]
        elif segment not in (b"", b"."):
            out.append(segment)
    trailing = bool(out) and segments[-1].split(b";")[0] in (b"", b".", b"..")
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


def modelRoute(prefixes: list[str], path: bytes) -> int | None:
    """Which of the routes (by path prefix, longest first, then the first given) the model takes C{path} to."""
    ranked = sorted(range(len(prefixes)), key=lambda i: (-len(prefixes[i]), i))
    for i in ranked:
        prefix = prefixes[i].encode()
        if path.startswith(prefix) and (
            prefix.endswith(b"/") or len(path) == len(prefix) or path[len(prefix) : len(prefix) + 1] in (b"/", b"?")
        ):
            return i
    return None


class RequestTargetTests(unittest.TestCase):
    """Routing by path prefix against upstreams that normalise: no target reaches a route's path unguarded."""

    @given(targets)
    def test_normalisedPathIsTheModel(self, target: bytes) -> None:
        """L{normalisedPath} reads a target as the model upstream does (C{None}: the same bytes)."""
        normalised = normalisedPath(target)
        self.assertEqual(target if normalised is None else normalised, modelNormalise(target))

    @given(st.lists(prefixes, min_size=1, max_size=4, unique=True), targets, st.booleans())
    @example(["/admin"], b"/admin/../internal", False)  # once reached the upstream's /internal
    @example(["/api", "/admin"], b"/api/%2e%2e/admin", True)
    def test_normalisingUpstreamStaysOnRoute(self, routePrefixes: list[str], target: bytes, catchAll: bool) -> None:
        """
        A request the director sends to a route reaches, as a normalising upstream reads its target, only a
        path that same route would have matched; a request it cannot route that way is refused with 400.
        """
        services = [makeService(f"s{i}") for i in range(len(routePrefixes) + 1)]
        routes = [Route(services[i], pathPrefix=prefix) for i, prefix in enumerate(routePrefixes)]
        if catchAll:
            routes.append(Route(services[-1]))
        director = RoutingDirector(routes)
        inbound: InboundRequest = inboundRequest(target, "192.0.2.1", [(b"host", b"example.com")])
        try:
            service, _ = directRequest(director, inbound)
        except Exception as e:  # noqa: BLE001 - the only exception allowed is the 400 checked below
            self.assertEqual(getattr(e, "status", None), 400, repr(e))
            return
        if service is None:
            return  # 404: no upstream sees it
        seen = modelRoute(routePrefixes, modelNormalise(target))
        if seen is None and catchAll:
            seen = len(routePrefixes)
        self.assertEqual(seen, services.index(service), (target, modelNormalise(target)))


# -- the upstream's response


def wellFormedResponse(status: int, fields: list[tuple[bytes, bytes]], body: bytes, chunked: bool) -> bytes:
    framing = [(b"Transfer-Encoding", b"chunked")] if chunked else [(b"Content-Length", b"%d" % len(body))]
    encoded = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n" if chunked else body
    head = b"".join(n + b": " + v + b"\r\n" for n, v in [*fields, *framing])
    return b"HTTP/1.1 %d OK\r\n%s\r\n%s" % (status, head, encoded)


def responseBytes() -> st.SearchStrategy[bytes]:
    """A lying upstream's answers: noise, well-formed responses with mutations, and pieces of both."""
    fields = st.lists(st.tuples(endToEndNames, fieldValues.map(lambda v: v.strip(b" \t"))), max_size=4)
    wellFormed = st.builds(wellFormedResponse, st.integers(200, 599), fields, st.binary(max_size=100), st.booleans())
    parts = st.sampled_from(
        [
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n",
            b"HTTP/1.0 204 No Content\r\n",
            b"HTTP/1.1 999 X\r\n",
            b"Content-Length: 3\r\n",
            b"Content-Length: 3, 4\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Connection: close\r\n",
            b" folded\r\n",
            b"\r\n",
            b"\n",
            b"abc",
            b"3\r\nabc\r\n",
            b"0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"\x00",
        ]
    )
    mutated = st.tuples(wellFormed, st.integers(0, 300), st.binary(max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
    )
    return st.one_of(st.binary(max_size=200), wellFormed, mutated, st.lists(parts, max_size=10).map(b"".join))


def relayedStatus(client: bytes) -> int | None:
    found = statuses(client)
    final = [s for s in found if s >= 200]
    return final[0] if final else None


class UpstreamResponseTests(unittest.TestCase):
    """Whatever an upstream answers, the client gets a clean 502 or a correct relay, and never waits forever."""

    def exchange(self, response: bytes, cuts: list[int], method: bytes = b"GET") -> tuple[bytes, StringTransport]:
        """Send one request through a memory proxy, answer it with C{response} and close the upstream."""
        proxy = MemoryProxy("--retries", "0")
        with noErrorsLogged() as errors:
            protocol, client = proxy.connect()
            protocol.dataReceived(method + b" /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
            proxy.turn()
            connected = proxy.upstream()
            assert connected is not None
            upstreamProtocol, upstream = connected
            for piece in pieces(response, cuts):
                upstreamProtocol.dataReceived(piece)
                proxy.turn()
            upstreamProtocol.connectionLost(Failure(ConnectionDone()))
            proxy.turn()
            proxy.reactor.advance(3600)  # every timer the exchange armed has fired
            proxy.turn()
        self.assertEqual(errors, [])
        return client.value(), client

    @given(responseBytes(), st.lists(st.integers(0, 400), max_size=5))
    @example(b"HTTP/1.0 500 \r\n*:\r\n\r\n", [])  # the upstream's 500, relayed
    @example(b"HTTP/1.0 200\r\n*:\r\n\r\n", [])  # no reason phrase, not even its space
    def test_anyResponseRelayedOr502(self, response: bytes, cuts: list[int]) -> None:
        """
        Any bytes: the client gets a final status (the upstream's, or a 502 when nothing usable came) and
        then either the response completes or the connection is closed; no 500 of the proxy's own, no
        exception, no open end.
        """
        answer, client = self.exchange(response, cuts)
        status = relayedStatus(answer)
        if status is None:
            self.assertTrue(client.disconnecting or client.disconnected, answer)
            return
        upstreamStatuses = [s for s in statuses(response) if s >= 200]
        # So a 500 is only ever the upstream's own.
        self.assertTrue(status == 502 or status in upstreamStatuses, (status, answer, response))

    @given(
        st.integers(200, 599).filter(lambda s: s not in (204, 304)),
        st.lists(st.tuples(endToEndNames, fieldValues.map(lambda v: v.strip(b" \t"))), max_size=4),
        st.binary(max_size=200),
        st.booleans(),
        st.lists(st.integers(0, 400), max_size=5),
    )
    def test_wellFormedResponseRelayed(
        self, status: int, fields: list[tuple[bytes, bytes]], body: bytes, chunked: bool, cuts: list[int]
    ) -> None:
        """A well-formed response, cut anywhere, reaches the client with its status, fields and body."""
        answer, _ = self.exchange(wellFormedResponse(status, fields, body, chunked), cuts)
        self.assertEqual(relayedStatus(answer), status, answer)
        head, _, rest = answer.partition(b"\r\n\r\n")
        relayedFields = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
        for field in fields:
            self.assertIn(field, relayedFields)
        if (b"Transfer-Encoding", b"chunked") in relayedFields:
            _, _, relayedBody = parseUpstreamRequest(b"X\r\nTransfer-Encoding: chunked\r\n\r\n" + rest)
        else:
            relayedBody = rest
        self.assertEqual(relayedBody, body)
