"""
Unit tests of L{rproxy.headers}: what must never cross the proxy, and the fields it adds.

Hop-by-hop fields (RFC 9110 section 7.6.1) and every field a ``Connection`` header lists are removed in
both directions; forwarding fields are kept and appended to only for trusted peers (RFC 7239, Via).
"""

from __future__ import annotations

import ipaddress

from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rproxy.headers import (
    FRAMING,
    HOP_BY_HOP,
    ForwardingPolicy,
    Pairs,
    connectionListed,
    isToken,
    parseNetworks,
    requestHeaderPairs,
    responseHeaderPairs,
    splitTokens,
)

#: Every hop-by-hop field, spelled as a client or upstream might send it.
HOP_FIELDS: Pairs = [
    (b"Connection", b"keep-alive"),
    (b"Keep-Alive", b"timeout=5, max=100"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"Proxy-Authenticate", b'Basic realm="proxy"'),
    (b"Proxy-Authorization", b"Basic dXNlcjpwYXNz"),
    (b"TE", b"gzip"),
    (b"Trailer", b"X-Checksum"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Upgrade", b"websocket"),
    (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
]


def headersOf(pairs: Pairs) -> Headers:
    """A C{Headers} holding C{pairs}, added in order."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def names(pairs: Pairs) -> set[bytes]:
    """The lower-cased field names of C{pairs}."""
    return {name.lower() for name, _ in pairs}


def valuesOf(pairs: Pairs, name: bytes) -> list[bytes]:
    """Every value of C{name} (case-insensitive) in C{pairs}, in order."""
    return [value for key, value in pairs if key.lower() == name.lower()]


class TokenTests(unittest.TestCase):
    """The small parsers the header rules are built from."""

    def test_splitTokens(self) -> None:
        """Comma lists over several values, lower-cased, empty elements and whitespace dropped."""
        self.assertEqual(
            list(splitTokens([b" Close , X-A", b"", b",,  ,", b"x-B\t,KEEP-ALIVE"])),
            [b"close", b"x-a", b"x-b", b"keep-alive"],
        )

    def test_connectionListed(self) -> None:
        """The names a Connection header lists; nothing for no header at all."""
        self.assertEqual(connectionListed(None), frozenset())
        self.assertEqual(connectionListed([]), frozenset())
        self.assertEqual(connectionListed([b", ,"]), frozenset())
        self.assertEqual(connectionListed([b"X-One, x-TWO", b"x-three"]), {b"x-one", b"x-two", b"x-three"})

    def test_isToken(self) -> None:
        """RFC 9110 tokens: no empty value, separators, spaces or controls."""
        for good in (b"GET", b"X-Foo", b"!#$%&'*+-.^_`|~", b"a1"):
            self.assertTrue(isToken(good), good)
        for bad in (b"", b"X Foo", b"X:Foo", b"X(Foo)", b'"q"', b"a/b", b"x\x00", b"x\x7f", b"\xe9"):
            self.assertFalse(isToken(bad), bad)

    def test_hopByHopSet(self) -> None:
        """The hop-by-hop set is the RFC 9110 list plus Proxy-Connection and HTTP2-Settings."""
        self.assertEqual(HOP_BY_HOP, {name.lower() for name, _ in HOP_FIELDS})
        self.assertEqual(FRAMING, {b"content-length", b"host"})


class RequestHeaderPairsTests(unittest.TestCase):
    """L{requestHeaderPairs}: the end-to-end fields of a client's request."""

    def test_hopByHopRemoved(self) -> None:
        """Every hop-by-hop field is left out, whatever its case; end-to-end fields remain."""
        for name, value in HOP_FIELDS:
            for spelling in (name, name.lower(), name.upper()):
                pairs, _ = requestHeaderPairs(headersOf([(spelling, value), (b"X-End", b"1")]))
                self.assertEqual(pairs, [(b"X-End", b"1")], spelling)

    def test_allHopByHopAtOnce(self) -> None:
        """All of them together: only the end-to-end fields are left, in order."""
        pairs, trailers = requestHeaderPairs(headersOf([(b"Accept", b"*/*"), *HOP_FIELDS, (b"X-Last", b"z")]))
        self.assertEqual(pairs, [(b"Accept", b"*/*"), (b"X-Last", b"z")])
        self.assertFalse(trailers)

    def test_framingRemoved(self) -> None:
        """
        Content-Length and Host are recomputed by the proxy, so left out; Expect is forwarded only as
        100-continue (the upstream's 100 is relayed), any other expectation dropped.
        """
        pairs, _ = requestHeaderPairs(
            headersOf(
                [
                    (b"Host", b"example.com"),
                    (b"Content-Length", b"5"),
                    (b"Expect", b"100-Continue"),
                    (b"Expect", b"x-other"),
                    (b"X-Keep", b"yes"),
                ]
            )
        )
        self.assertEqual(pairs, [(b"Expect", b"100-Continue"), (b"X-Keep", b"yes")])

    def test_connectionListedRemoved(self) -> None:
        """A field named in Connection is hop-by-hop for this message."""
        pairs, _ = requestHeaderPairs(headersOf([(b"Connection", b"X-Hop"), (b"X-Hop", b"secret"), (b"X-End", b"1")]))
        self.assertEqual(pairs, [(b"X-End", b"1")])

    def test_multipleConnectionHeadersAndLists(self) -> None:
        """Several Connection fields, each a comma list: every name listed in any of them is removed."""
        pairs, _ = requestHeaderPairs(
            headersOf(
                [
                    (b"Connection", b"X-A, X-B"),
                    (b"X-A", b"a"),
                    (b"X-B", b"b"),
                    (b"Connection", b"x-c"),
                    (b"X-C", b"c"),
                    (b"X-D", b"d"),
                    (b"Connection", b"keep-alive,X-E"),
                    (b"X-E", b"e"),
                ]
            )
        )
        self.assertEqual(pairs, [(b"X-D", b"d")])

    def test_connectionEmptyElements(self) -> None:
        """Empty list elements (``, ,X-A,,``) are tolerated and the listed names still removed (go#46313)."""
        pairs, _ = requestHeaderPairs(
            headersOf([(b"Connection", b""), (b"Connection", b", ,X-A,,"), (b"X-A", b"a"), (b"X-B", b"b")])
        )
        self.assertEqual(pairs, [(b"X-B", b"b")])

    def test_connectionCaseInsensitive(self) -> None:
        """Listed names match field names case-insensitively, both ways round."""
        pairs, _ = requestHeaderPairs(
            headersOf(
                [(b"Connection", b"X-UPPER, x-lower"), (b"x-upper", b"1"), (b"X-LOWER", b"2"), (b"X-Other", b"3")]
            )
        )
        self.assertEqual(pairs, [(b"X-Other", b"3")])

    def test_connectionListingEndToEndField(self) -> None:
        """Listing an end-to-end field in Connection removes it too (the client said it is hop-by-hop)."""
        pairs, _ = requestHeaderPairs(headersOf([(b"Connection", b"Cookie"), (b"Cookie", b"a=1"), (b"Accept", b"*/*")]))
        self.assertEqual(pairs, [(b"Accept", b"*/*")])

    def test_repeatedValuesKeptInOrder(self) -> None:
        """A repeated field keeps every value, in the order received."""
        pairs, _ = requestHeaderPairs(
            headersOf([(b"X-Multi", b"1"), (b"Accept", b"a"), (b"X-Multi", b"2"), (b"x-multi", b"3, 4")])
        )
        self.assertEqual(valuesOf(pairs, b"x-multi"), [b"1", b"2", b"3, 4"])
        self.assertEqual(valuesOf(pairs, b"accept"), [b"a"])
        self.assertEqual(len(pairs), 4)

    def test_teTrailers(self) -> None:
        """``TE: trailers`` is reported (to be re-added) but never forwarded as received."""
        for values in (
            [b"trailers"],
            [b"Trailers"],
            [b"gzip, trailers"],
            [b"foo", b"bar, trailers"],
            [b"deflate,,trailers ,"],
        ):
            pairs, trailers = requestHeaderPairs(headersOf([(b"TE", v) for v in values]))
            self.assertTrue(trailers, values)
            self.assertNotIn(b"te", names(pairs), values)

    def test_teWithoutTrailers(self) -> None:
        """Other transfer codings in TE are dropped and do not count as accepting trailers."""
        for values in ([b"gzip"], [b"trailersx"], [b"x-trailers, deflate"], [b""]):
            pairs, trailers = requestHeaderPairs(headersOf([(b"TE", v) for v in values]))
            self.assertFalse(trailers, values)
            self.assertEqual(pairs, [], values)
        pairs, trailers = requestHeaderPairs(headersOf([(b"Accept", b"*/*")]))
        self.assertFalse(trailers)

    def test_teTrailersListedInConnection(self) -> None:
        """Go #5: ``Te: foo``, ``Te: bar, trailers`` and ``Connection: close, TE`` still accept trailers."""
        pairs, trailers = requestHeaderPairs(
            headersOf([(b"Te", b"foo"), (b"Te", b"bar, trailers"), (b"Connection", b"close, TE")])
        )
        self.assertTrue(trailers)
        self.assertEqual(pairs, [])

    def test_inputNotMutated(self) -> None:
        """The client's headers are read, never changed (go#18327)."""
        original = [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"TE", b"trailers"), (b"Host", b"h")]
        headers = headersOf(original)
        requestHeaderPairs(headers)
        self.assertEqual(list(headers.getAllRawHeaders()), list(headersOf(original).getAllRawHeaders()))


class ResponseHeaderPairsTests(unittest.TestCase):
    """L{responseHeaderPairs}: the end-to-end fields of an upstream's response."""

    def test_hopByHopRemoved(self) -> None:
        """Every hop-by-hop field is left out, whatever its case."""
        for name, value in HOP_FIELDS:
            for spelling in (name, name.lower(), name.upper()):
                pairs = responseHeaderPairs([(b"Content-Type", b"text/plain"), (spelling, value)])
                self.assertEqual(pairs, [(b"Content-Type", b"text/plain")], spelling)

    def test_endToEndKeptInOrder(self) -> None:
        """Go #7/#8: end-to-end fields, ``Trailers`` (not special) and Content-Length pass in order."""
        upstream = [
            (b"Content-Length", b"3"),
            (b"Trailers", b"not a special header field name"),
            (b"X-Foo", b"bar"),
            (b"Upgrade", b"foo"),
            (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        ]
        self.assertEqual(responseHeaderPairs(upstream), [p for p in upstream if p[0] != b"Upgrade"])

    def test_setCookieLinesSeparate(self) -> None:
        """Set-Cookie is never folded: every line stays a separate pair, interleaving preserved."""
        upstream = [
            (b"Set-Cookie", b"a=1; Path=/; Expires=Wed, 21 Oct 2026 07:28:00 GMT"),
            (b"X-Multi", b"1"),
            (b"Set-Cookie", b"b=2"),
            (b"X-Multi", b"2"),
            (b"set-cookie", b"c=3"),
        ]
        self.assertEqual(responseHeaderPairs(upstream), upstream)

    def test_connectionListedRemoved(self) -> None:
        """Fields named in (several, comma-listed, empty-element, any-case) Connection fields are removed."""
        upstream = [
            (b"Connection", b"X-A, ,x-b"),
            (b"X-A", b"a"),
            (b"Connection", b""),
            (b"x-B", b"b"),
            (b"Connection", b",X-C,"),
            (b"X-C", b"c"),
            (b"X-Keep", b"k"),
        ]
        self.assertEqual(responseHeaderPairs(upstream), [(b"X-Keep", b"k")])

    def test_connectionAfterListedField(self) -> None:
        """A Connection field after the field it lists still removes it."""
        self.assertEqual(
            responseHeaderPairs([(b"X-Late", b"1"), (b"Connection", b"x-late"), (b"X-Keep", b"2")]),
            [(b"X-Keep", b"2")],
        )

    def test_inputNotMutated(self) -> None:
        """The upstream's list is read, not changed."""
        upstream = [(b"Connection", b"close"), (b"X-A", b"1")]
        responseHeaderPairs(upstream)
        self.assertEqual(upstream, [(b"Connection", b"close"), (b"X-A", b"1")])


def forwarding(
    policy: ForwardingPolicy,
    inbound: Pairs,
    peer: str | None = "192.0.2.7",
    scheme: bytes = b"http",
    host: bytes | None = b"example.com",
    version: bytes = b"1.1",
) -> dict[bytes, list[bytes]]:
    """The forwarding fields C{policy} produces, by lower-cased name (each must appear once)."""
    pairs = policy.forwardingPairs(headersOf(inbound), peer, scheme, host, version)
    result: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        result.setdefault(name.lower(), []).append(value)
    for name, values in result.items():
        assert len(values) == 1, (name, values)
    return result


SPOOFED: Pairs = [
    (b"X-Forwarded-For", b"6.6.6.6"),
    (b"X-Forwarded-For", b"7.7.7.7, 8.8.8.8"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"evil.example"),
    (b"Forwarded", b"for=6.6.6.6;proto=https"),
]


class ForwardingPolicyTests(unittest.TestCase):
    """L{ForwardingPolicy}: X-Forwarded-*, Forwarded and Via."""

    def test_untrustedReplaced(self) -> None:
        """From an untrusted peer every inbound forwarding field is replaced (Go #16)."""
        fields = forwarding(ForwardingPolicy(), SPOOFED)
        self.assertEqual(fields[b"x-forwarded-for"], [b"192.0.2.7"])
        self.assertEqual(fields[b"x-forwarded-proto"], [b"http"])
        self.assertEqual(fields[b"x-forwarded-host"], [b"example.com"])
        self.assertEqual(fields[b"forwarded"], [b"for=192.0.2.7;host=example.com;proto=http"])
        self.assertEqual(fields[b"via"], [b"1.1 rproxy"])

    def test_exactPairs(self) -> None:
        """The whole output for a plain request: names, values and order."""
        pairs = ForwardingPolicy().forwardingPairs(Headers(), "192.0.2.7", b"https", b"example.com", b"1.1")
        self.assertEqual(
            pairs,
            [
                (b"X-Forwarded-For", b"192.0.2.7"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"example.com"),
                (b"Forwarded", b"for=192.0.2.7;host=example.com;proto=https"),
                (b"Via", b"1.1 rproxy"),
            ],
        )

    def test_trustedIPv4Appended(self) -> None:
        """Go #14: from a trusted IPv4 peer, prior X-Forwarded-For values are kept and the peer appended."""
        policy = ForwardingPolicy(parseNetworks(["10.0.0.0/8"]))
        fields = forwarding(policy, SPOOFED, peer="10.1.2.3")
        self.assertEqual(fields[b"x-forwarded-for"], [b"6.6.6.6, 7.7.7.7, 8.8.8.8, 10.1.2.3"])
        self.assertEqual(fields[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(fields[b"x-forwarded-host"], [b"evil.example"])
        self.assertEqual(fields[b"forwarded"], [b"for=6.6.6.6;proto=https, for=10.1.2.3;host=example.com;proto=http"])

    def test_trustedWithoutPriorFields(self) -> None:
        """A trusted peer that sent no forwarding fields gets them set like anyone else."""
        policy = ForwardingPolicy(parseNetworks(["10.0.0.0/8"]))
        fields = forwarding(policy, [], peer="10.1.2.3", scheme=b"https")
        self.assertEqual(fields[b"x-forwarded-for"], [b"10.1.2.3"])
        self.assertEqual(fields[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(fields[b"x-forwarded-host"], [b"example.com"])
        self.assertEqual(fields[b"forwarded"], [b"for=10.1.2.3;host=example.com;proto=https"])

    def test_peerOutsideTrustedIPv4Replaced(self) -> None:
        """A peer outside every trusted network is not trusted."""
        policy = ForwardingPolicy(parseNetworks(["10.0.0.0/8", "192.168.1.0/24"]))
        for peer in ("11.0.0.1", "192.168.2.1", "2001:db8::1"):
            fields = forwarding(policy, SPOOFED, peer=peer)
            self.assertEqual(fields[b"x-forwarded-for"], [peer.encode()], peer)
            self.assertEqual(fields[b"x-forwarded-proto"], [b"http"], peer)
            self.assertEqual(fields[b"x-forwarded-host"], [b"example.com"], peer)

    def test_trustedIPv6Appended(self) -> None:
        """A trusted IPv6 network: appended, and the Forwarded node quoted and bracketed (RFC 7239 section 6)."""
        policy = ForwardingPolicy(parseNetworks(["2001:db8::/32"]))
        fields = forwarding(policy, [(b"X-Forwarded-For", b"203.0.113.9")], peer="2001:db8::1")
        self.assertEqual(fields[b"x-forwarded-for"], [b"203.0.113.9, 2001:db8::1"])
        self.assertEqual(fields[b"forwarded"], [b'for="[2001:db8::1]";host=example.com;proto=http'])

    def test_untrustedIPv6Replaced(self) -> None:
        """An IPv6 peer outside the trusted networks: replaced; an IPv4 network never matches IPv6."""
        policy = ForwardingPolicy(parseNetworks(["2001:db8::/32", "0.0.0.0/0"]))
        fields = forwarding(policy, SPOOFED, peer="2001:db9::1")
        self.assertEqual(fields[b"x-forwarded-for"], [b"2001:db9::1"])
        self.assertEqual(fields[b"forwarded"], [b'for="[2001:db9::1]";host=example.com;proto=http'])

    def test_loopbackIPv6Single(self) -> None:
        """A bare address is a one-address network."""
        policy = ForwardingPolicy(parseNetworks(["::1"]))
        self.assertTrue(policy.trusts("::1"))
        self.assertFalse(policy.trusts("::2"))
        self.assertFalse(policy.trusts("127.0.0.1"))

    def test_trusts(self) -> None:
        """Only IP address strings inside a network are trusted; names, junk and C{None} are not."""
        policy = ForwardingPolicy(parseNetworks(["127.0.0.1/32", "fd00::/8"]))
        self.assertTrue(policy.trusts("127.0.0.1"))
        self.assertTrue(policy.trusts("fd12:3456::1"))
        for peer in ("127.0.0.2", "localhost", "", None, "not an address", "fe80::1"):
            self.assertFalse(policy.trusts(peer), peer)
        self.assertFalse(ForwardingPolicy().trusts("127.0.0.1"))

    def test_unknownPeer(self) -> None:
        """No peer address (a UNIX socket): ``unknown`` in both fields."""
        fields = forwarding(ForwardingPolicy(), [], peer=None)
        self.assertEqual(fields[b"x-forwarded-for"], [b"unknown"])
        self.assertEqual(fields[b"forwarded"], [b"for=unknown;host=example.com;proto=http"])

    def test_noHost(self) -> None:
        """No Host (an HTTP/1.0 request without one): no X-Forwarded-Host and no ``host=``."""
        fields = forwarding(ForwardingPolicy(), [], host=None)
        self.assertNotIn(b"x-forwarded-host", fields)
        self.assertEqual(fields[b"forwarded"], [b"for=192.0.2.7;proto=http"])

    def test_forwardedHostQuotedWhenNeeded(self) -> None:
        """``host=`` is a token when it can be, else a quoted-string with escapes (RFC 7239 section 4)."""
        cases = {
            b"example.com": b"host=example.com",
            b"example.com:8080": b'host="example.com:8080"',
            b"[2001:db8::1]:443": b'host="[2001:db8::1]:443"',
            b'we"ird\\host': b'host="we\\"ird\\\\host"',
        }
        for host, expected in cases.items():
            fields = forwarding(ForwardingPolicy(), [], host=host)
            self.assertEqual(fields[b"forwarded"], [b"for=192.0.2.7;" + expected + b";proto=http"], host)
            self.assertEqual(fields[b"x-forwarded-host"], [host])

    def test_forwardedProtoIsScheme(self) -> None:
        """``proto=`` and X-Forwarded-Proto name the scheme the client used."""
        fields = forwarding(ForwardingPolicy(), [], scheme=b"https")
        self.assertEqual(fields[b"x-forwarded-proto"], [b"https"])
        self.assertTrue(fields[b"forwarded"][0].endswith(b";proto=https"))

    def test_viaAppended(self) -> None:
        """Via: this proxy is appended to the inbound chain (RFC 9110 section 7.6.3), with its version."""
        policy = ForwardingPolicy(viaName=b"edge-1")
        fields = forwarding(
            policy, [(b"Via", b"1.0 fred"), (b"Via", b"1.1 p.example.com (Apache/1.1)")], version=b"1.0"
        )
        self.assertEqual(fields[b"via"], [b"1.0 fred, 1.1 p.example.com (Apache/1.1), 1.0 edge-1"])
        self.assertEqual(policy.via(None, b"2"), b"2 edge-1")
        self.assertEqual(policy.via([], b"1.1"), b"1.1 edge-1")
        self.assertEqual(ForwardingPolicy().via([b"1.1 a"], b"1.1"), b"1.1 a, 1.1 rproxy")

    def test_viaKeptFromUntrustedPeers(self) -> None:
        """Via is a loop-detection chain, not an identity claim: kept from anyone."""
        fields = forwarding(ForwardingPolicy(), [(b"Via", b"1.1 upstream-cdn")], peer="198.51.100.1")
        self.assertEqual(fields[b"via"], [b"1.1 upstream-cdn, 1.1 rproxy"])

    def test_inboundNotMutated(self) -> None:
        """The inbound headers are read, never changed (go#18327)."""
        headers = headersOf(SPOOFED)
        before = list(headers.getAllRawHeaders())
        ForwardingPolicy(parseNetworks(["0.0.0.0/0"])).forwardingPairs(headers, "1.2.3.4", b"http", b"h", b"1.1")
        ForwardingPolicy().forwardingPairs(headers, "1.2.3.4", b"http", b"h", b"1.1")
        self.assertEqual(list(headers.getAllRawHeaders()), before)


class ForwardingCacheTests(unittest.TestCase):
    """The forwarding fields of untrusted peers are cached; each call still gets its own answer."""

    def test_eachPeerAndHost(self) -> None:
        policy = ForwardingPolicy()
        seen = {}
        for _ in range(2):
            for peer in ("192.0.2.1", "192.0.2.2", "2001:db8::1"):
                for host in (b"a.example", b"b.example:8080", None, b"x" * 400):
                    pairs = policy.forwardingPairs(Headers(), peer, b"http", host, b"1.1")
                    self.assertEqual(dict(pairs)[b"X-Forwarded-For"], peer.encode(), (peer, host))
                    if host is not None:
                        self.assertEqual(dict(pairs)[b"X-Forwarded-Host"], host)
                    seen.setdefault((peer, host), list(pairs))
                    self.assertEqual(seen[(peer, host)], pairs)
                    pairs.append((b"X-Mutated", b"1"))  # the caller's list, not the cache's

    def test_trustedPriorsNotCached(self) -> None:
        policy = ForwardingPolicy(parseNetworks(["192.0.2.0/24"]))
        for prior in (b"198.51.100.1", b"198.51.100.2"):
            headers = Headers({b"X-Forwarded-For": [prior]})
            pairs = policy.forwardingPairs(headers, "192.0.2.1", b"http", b"h", b"1.1")
            self.assertEqual(dict(pairs)[b"X-Forwarded-For"], prior + b", 192.0.2.1")


class ParseNetworksTests(unittest.TestCase):
    """L{parseNetworks}: CIDR strings for C{--trusted-proxy}."""

    def test_valid(self) -> None:
        """IPv4 and IPv6 CIDRs and bare addresses; host bits and surrounding spaces tolerated."""
        self.assertEqual(
            parseNetworks(["10.0.0.0/8", " 192.168.1.7/24 ", "::1", "2001:db8::/32", "127.0.0.1"]),
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.168.1.0/24"),
                ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("127.0.0.1/32"),
            ),
        )
        self.assertEqual(parseNetworks([]), ())

    def test_errorNamesBadValue(self) -> None:
        """A bad value raises C{ValueError} whose message quotes it (and not the good ones)."""
        for bad in ("bogus", "10.0.0.0/33", "300.1.1.1", "2001:db8::/129", "", "10.0.0.0/8/8"):
            with self.assertRaises(ValueError) as caught:
                parseNetworks(["10.0.0.0/8", bad, "::1"])
            message = str(caught.exception)
            self.assertIn(repr(bad), message, bad)
            self.assertNotIn("'::1'", message)
