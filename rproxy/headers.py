"""
Header rules of a proxy: what must never cross it, and what it adds; and how an HTTP/1 head is written.

Hop-by-hop fields (RFC 9110 section 7.6.1) and every field a ``Connection`` header names are removed in
both directions.  Forwarding fields (``X-Forwarded-*``, RFC 7239 ``Forwarded``) are trusted only from
configured proxies: from anyone else they are replaced, so a client cannot forge its address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from twisted.web.http_headers import Headers

#: Fields that describe one connection, not the message (lower case).  ``TE`` is special-cased:
#: ``TE: trailers`` is end-to-end in practice (gRPC needs it), every other coding is not.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)

#: Fields the proxy recomputes itself, so the inbound values are dropped with the hop-by-hop ones.
#: (``Expect`` is end-to-end: ``100-continue`` is forwarded, and the upstream's 100 relayed.)
FRAMING = frozenset({b"content-length", b"host"})


#: Fields the proxy rebuilds from the inbound ones (kept only from trusted proxies): see
#: L{ForwardingPolicy.forwardingPairs}.
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via"})

#: Fields a trailer section must not carry (RFC 9110 section 6.5.1): framing, routing, request modifiers,
#: credentials, content metadata, the hop-by-hop ones, and the forwarding fields the proxy rebuilds (an
#: upstream that merges trailers into the header section would otherwise read them as the client's own);
#: dropped from the trailers a client sends.
NOT_TRAILERS = (
    HOP_BY_HOP
    | FRAMING
    | FORWARDING
    | frozenset(
        {
            b"expect",
            b"content-type",
            b"content-encoding",
            b"content-range",
            b"authorization",
            b"cookie",
            b"range",
            b"max-forwards",
            b"cache-control",
        }
    )
)

Pairs = list[tuple[bytes, bytes]]


def splitTokens(values: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the lower-cased, non-empty comma-separated tokens of one or more header values."""
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                yield token


def connectionListed(values: Sequence[bytes] | None) -> frozenset[bytes]:
    """The field names a ``Connection`` header lists, lower case (tolerating empty elements)."""
    if not values:
        return frozenset()
    return frozenset(splitTokens(values))


def _dropped(always: frozenset[bytes], connectionValues: Sequence[bytes] | None) -> frozenset[bytes]:
    return always | connectionListed(connectionValues) if connectionValues else always


_REQUEST_DROPPED = HOP_BY_HOP | FRAMING | FORWARDING


def requestHeaderPairs(headers: Headers) -> tuple[Pairs, bool]:
    """
    The end-to-end request fields of C{headers}, in order, and whether the client accepts trailers.

    Hop-by-hop, Connection-listed, framing and forwarding fields are left out; ``TE`` survives only as
    ``TE: trailers`` (added back by the caller when the second value is true).
    """
    dropped = _dropped(_REQUEST_DROPPED, headers.getRawHeaders(b"connection"))
    pairs: Pairs = []
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered in dropped:
            continue
        if lowered == b"expect":  # the only expectation defined; others are not passed on
            pairs.extend((name, value) for value in values if value.strip().lower() == b"100-continue")
            continue
        for value in values:
            pairs.append((name, value))
    te = headers.getRawHeaders(b"te")
    acceptsTrailers = b"trailers" in set(splitTokens(te)) if te else False
    return pairs, acceptsTrailers


def allowedTrailers(fields: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """C{fields} without those a trailer section must not carry (L{NOT_TRAILERS})."""
    return [(name, value) for name, value in fields if name.lower() not in NOT_TRAILERS]


def responseHeaderPairs(pairs: Sequence[tuple[bytes, bytes]]) -> Pairs:
    """Remove hop-by-hop and Connection-listed fields from an upstream response's fields."""
    connection = [value for name, value in pairs if name.lower() == b"connection"]
    dropped = _dropped(HOP_BY_HOP, connection)
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parseNetworks(specs: Iterable[str]) -> tuple[Network, ...]:
    """Parse CIDR strings (``10.0.0.0/8``, ``::1``); raise C{ValueError} naming the bad one."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"not an IP network: {spec!r} ({e})") from None
    return tuple(networks)


@dataclass(frozen=True)
class ForwardingPolicy:
    """
    How the proxy identifies itself and the client to upstreams.

    @ivar trustedProxies: peers whose inbound ``X-Forwarded-*`` and ``Forwarded`` fields are kept
        (and appended to); from any other peer they are replaced.
    @ivar viaName: the pseudonym in ``Via`` (RFC 9110 section 7.6.3).
    """

    trustedProxies: tuple[Network, ...] = ()
    viaName: bytes = b"rproxy"

    def trusts(self, peerHost: str | None) -> bool:
        """Whether C{peerHost} (an IP address string) is a trusted proxy."""
        if not self.trustedProxies or not peerHost:
            return False
        try:
            address = ipaddress.ip_address(peerHost)
        except ValueError:
            return False
        return any(address in network for network in self.trustedProxies)

    def client(self, peerHost: str | None, inbound: Headers) -> str | None:
        """
        The client's address: the peer's, unless the peer is a trusted proxy, in which case the last
        address of ``X-Forwarded-For`` that is not a trusted proxy (the first one a client could not forge).
        """
        if not self.trusts(peerHost):
            return peerHost
        values = inbound.getRawHeaders(b"x-forwarded-for")
        if not values:
            return peerHost
        client = peerHost
        for hop in reversed([part.strip() for value in values for part in value.split(b",")]):
            try:
                address = str(ipaddress.ip_address(hop.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                return client  # garbage: the last address a trusted proxy vouched for
            client = address
            if not self.trusts(address):
                return address
        return client

    def forwardingPairs(
        self,
        inbound: Headers,
        peerHost: str | None,
        scheme: bytes,
        host: bytes | None,
        version: bytes,
    ) -> Pairs:
        """
        The ``X-Forwarded-For/Proto/Host``, ``Forwarded`` and ``Via`` fields for the outbound request.

        @param peerHost: the address of the connection's peer, or C{None} (a UNIX socket).
        @param version: the inbound protocol version as in ``Via`` (C{b"1.1"}, C{b"1.0"}, C{b"2"}).
        """
        if self.trusts(peerHost):
            proto = inbound.getRawHeaders(b"x-forwarded-proto")
            forwardedHost = inbound.getRawHeaders(b"x-forwarded-host")
            fields = _forwardingFields.__wrapped__(  # not cached: the prior values can be anything
                peerHost,
                scheme,
                host,
                tuple(inbound.getRawHeaders(b"x-forwarded-for", ())),
                proto[-1] if proto else None,
                forwardedHost[-1] if forwardedHost else None,
                tuple(inbound.getRawHeaders(b"forwarded", ())),
            )
        elif host is not None and len(host) > _CACHED_HOST:
            fields = _forwardingFields.__wrapped__(peerHost, scheme, host, (), None, None, ())
        else:
            fields = _forwardingFields(peerHost, scheme, host, (), None, None, ())
        return [*fields, (b"Via", self.via(inbound.getRawHeaders(b"via"), version))]

    def via(self, prior: Sequence[bytes] | None, version: bytes) -> bytes:
        """Append this proxy to a ``Via`` chain."""
        hop = version + b" " + self.viaName
        return b", ".join([*prior, hop]) if prior else hop


#: Longest Host whose forwarding fields are cached (a DNS name and a port), so the cache stays small; only
#: requests from untrusted peers (no prior values to keep) are cached.
_CACHED_HOST = 300


@functools.lru_cache(maxsize=1024)  # a client sends the same values on every request of a connection
def _forwardingFields(
    peerHost: str | None,
    scheme: bytes,
    host: bytes | None,
    priorFor: tuple[bytes, ...],
    proto: bytes | None,
    forwardedHost: bytes | None,
    priorForwarded: tuple[bytes, ...],
) -> tuple[tuple[bytes, bytes], ...]:
    """X-Forwarded-For/Proto/Host and Forwarded for a peer, after what trusted proxies before it said."""
    client = peerHost.encode("ascii") if peerHost else b"unknown"
    fields = [
        (b"X-Forwarded-For", b", ".join([*priorFor, client])),
        (b"X-Forwarded-Proto", proto if proto is not None else scheme),
    ]
    if forwardedHost is not None:
        fields.append((b"X-Forwarded-Host", forwardedHost))
    elif host is not None:
        fields.append((b"X-Forwarded-Host", host))
    element = b"for=" + _forwardedNode(peerHost)
    if host is not None:
        element += b";host=" + _forwardedValue(host)
    element += b";proto=" + scheme
    fields.append((b"Forwarded", b", ".join([*priorForwarded, element])))
    return tuple(fields)


def _forwardedNode(peerHost: str | None) -> bytes:
    if not peerHost:
        return b"unknown"
    if ":" in peerHost:  # IPv6 must be quoted and bracketed (RFC 7239 section 6)
        return b'"[' + peerHost.encode("ascii") + b']"'
    return peerHost.encode("ascii")


def _forwardedValue(value: bytes) -> bytes:
    """A token, or a quoted-string when it holds characters a token may not."""
    if isToken(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def isToken(value: bytes) -> bool:
    """Whether C{value} is a non-empty RFC 9110 token (a valid field name or method)."""
    return bool(value) and not value.translate(None, _TOKEN)  # deleting every token byte leaves nothing


def hasControl(value: bytes) -> bool:
    """Whether a field value holds NUL, CR or LF (never allowed, RFC 9110 section 5.5)."""
    return len(value.translate(None, b"\x00\r\n")) != len(value)


def serializeHead(startLine: bytes, fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """
    An HTTP/1 head: C{startLine} (a request or status line), one line per field, and the empty line that
    ends it.  Every HTTP/1 head rproxy writes, on either side, is written here.
    """
    lines = [startLine]
    lines.extend([name + b": " + value for name, value in fields])
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
