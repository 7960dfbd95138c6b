"""
Cross-origin resource sharing (the Fetch standard's CORS protocol) enforced at the proxy, for a route.

A browser lets a page of one origin read a response from another only when the response's
``Access-Control-*`` fields allow that origin; before a request that is not "simple" (a custom field, a
method other than GET, HEAD or POST), it first asks with a preflight ``OPTIONS``.  L{CORSFilter} answers
preflights itself (an allowed one with 204 and the fields, a refused one with 403 and none, which the
browser fails) and never forwards them; it writes the fields of every other response, after removing
those the upstream set, so that the route's policy is the proxy's alone whatever the upstream answers.
Errors of the proxy and refusals of the filters after it get the fields too, so that a page can read why
(a 401 from an authenticating filter, a 502).

Origins are compared as browsers serialize them (lower case, no default port).  A pattern such as
C{https://*.example.com} is parsed, never turned into a regular expression: an origin matches when it has
the same scheme and port and its host is one or more DNS labels followed by C{.example.com}.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy.errors import ProxyError, clientError
from rproxy.headers import Pairs, isToken, splitTokens
from rproxy.interfaces import FilterEnvironment, IRequestFilter, IResponseFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext

#: Every response field of the protocol starts so; those of an upstream are replaced by the proxy's.
_PREFIX = b"access-control-"

#: The port a serialized origin leaves out, by scheme.
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}

_SCHEME = b"abcdefghijklmnopqrstuvwxyz0123456789+-."
_LABEL = b"abcdefghijklmnopqrstuvwxyz0123456789-_"
_IPV6 = b"0123456789abcdef:."

#: What a preflight's ``Access-Control-Request-Headers`` may list when C{headers} is C{"*"}: everything
#: but ``Authorization``, which the Fetch standard leaves out of the wildcard.
_NOT_WILDCARD = b"authorization"


@dataclass(frozen=True)
class Origin:
    """
    A serialized origin, as a browser sends it in ``Origin``: C{scheme://host[:port]}.

    @ivar scheme: the scheme (C{b"https"}).
    @ivar host: a name, an IPv4 address, or an IPv6 address in brackets.
    @ivar port: the port's digits, or C{b""} when the origin leaves it out (the scheme's default).
    """

    scheme: bytes
    host: bytes
    port: bytes

    @classmethod
    def parse(cls, text: bytes) -> Origin | None:
        """
        The origin C{text} serializes, or C{None} when it is not one (upper case, a path, a user, a
        trailing slash, an empty host, an opaque origin's C{null}...).
        """
        scheme, separator, rest = text.partition(b"://")
        if not separator or not scheme[:1].isalpha() or scheme.translate(None, _SCHEME):
            return None
        if rest.startswith(b"["):
            end = rest.find(b"]") + 1
            host, rest = rest[:end], rest[end:]
            valid = end > 2 and not host[1:-1].translate(None, _IPV6)
        else:
            end = rest.find(b":")
            host, rest = (rest, b"") if end < 0 else (rest[:end], rest[end:])
            valid = _isHostName(host)
        if rest and not (rest[:1] == b":" and rest[1:].isdigit() and len(rest) <= 6):
            return None
        return cls(scheme, host, rest[1:]) if valid else None

    def serialize(self) -> bytes:
        """The origin as a browser writes it in ``Origin``."""
        return self.scheme + b"://" + self.host + (b":" + self.port if self.port else b"")


def _isHostName(host: bytes) -> bool:
    """Whether C{host} is dot-separated non-empty lower-case labels (a DNS name or an IPv4 address)."""
    return bool(host) and all(label and not label.translate(None, _LABEL) for label in host.split(b"."))


@dataclass(frozen=True)
class OriginPattern:
    """
    The origins of every subdomain of a domain, on one scheme and port (C{https://*.example.com}).

    @ivar scheme: the scheme they must have.
    @ivar suffix: what their host must end with, after one or more labels (C{b".example.com"}).
    @ivar port: the port they must have (C{b""}: the default).
    """

    scheme: bytes
    suffix: bytes
    port: bytes

    def matches(self, origin: Origin) -> bool:
        """Whether C{origin} is one of these."""
        host = origin.host
        return (
            origin.scheme == self.scheme
            and origin.port == self.port
            and len(host) > len(self.suffix)
            and host.endswith(self.suffix)
            and _isHostName(host[: -len(self.suffix)])
        )


@implementer(IRequestFilter, IResponseFilter)
class CORSFilter:
    """
    One route's CORS policy: which origins may read its responses, with which methods and request
    fields, which response fields they may read, whether with credentials.

    @ivar anyOrigin: whether every origin may (C{origins = "*"}); with C{credentials} (which the factory
        refuses), each is answered with itself, never C{*}.
    @ivar origins: the origins that may, serialized.
    @ivar patterns: the patterns of origins that may.
    @ivar methods: the methods a preflight may ask for (C{b"*"}: any).
    @ivar headers: the request fields a preflight may ask for, lower case (C{b"*"}: any but ``Authorization``).
    @ivar credentials: whether the browser may send cookies and read the response with them.
    """

    consumes: tuple[bytes, ...] = ()

    def __init__(
        self,
        origins: Iterable[bytes] = (),
        patterns: Iterable[OriginPattern] = (),
        anyOrigin: bool = False,
        methods: Iterable[bytes] = (b"GET", b"HEAD", b"POST"),
        headers: Iterable[bytes] = (),
        exposeHeaders: Iterable[bytes] = (),
        credentials: bool = False,
        maxAge: int = 600,
        allowPrivateNetwork: bool = False,
    ) -> None:
        self.anyOrigin = anyOrigin
        self.origins = frozenset(origins)
        self.patterns = tuple(patterns)
        self.methods = tuple(methods)
        listedHeaders = tuple(headers)
        self.headers = frozenset(name.lower() for name in listedHeaders)
        self.credentials = credentials
        self._allowPrivateNetwork = allowPrivateNetwork
        # Only a policy that answers with the origin itself makes responses differ by Origin.
        self._varies = not anyOrigin or credentials
        common: Pairs = [(b"Access-Control-Allow-Credentials", b"true")] if credentials else []
        self._actual = common + (
            [(b"Access-Control-Expose-Headers", b", ".join(exposeHeaders))] if exposeHeaders else []
        )
        self._preflight = common + [(b"Access-Control-Allow-Methods", b", ".join(self.methods))]
        if listedHeaders:
            self._preflight.append((b"Access-Control-Allow-Headers", b", ".join(listedHeaders)))
        self._preflight.append((b"Access-Control-Max-Age", b"%d" % maxAge))

    def allowedOrigin(self, headers: Headers) -> bytes | None:
        """
        The value of ``Access-Control-Allow-Origin`` for a request with C{headers}: C{b"*"} (for every
        request, C{Origin} or not: a response that does not vary by origin must not vary by its presence
        either, or a cache could give a browser's request the copy without the field), the request's
        ``Origin`` itself, or C{None} when it has none, several, or one this policy does not allow.
        """
        if self.anyOrigin and not self.credentials:
            return b"*"
        values = headers.getRawHeaders(b"origin")
        if not values or len(values) != 1:
            return None
        origin = values[0]
        if self.anyOrigin:
            return origin
        if origin in self.origins:
            return origin
        if self.patterns:
            parsed = Origin.parse(origin)
            if parsed is not None and any(pattern.matches(parsed) for pattern in self.patterns):
                return origin
        return None

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        """Answer a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``); pass the rest."""
        inbound = context.inbound
        if inbound.method != b"OPTIONS":
            return None
        headers = inbound.headers
        if not (headers.hasHeader(b"origin") and headers.hasHeader(b"access-control-request-method")):
            return None
        return self.preflight(headers)

    def preflight(self, headers: Headers) -> LocalResponse | ProxyError:
        """The answer to a preflight with C{headers}: 204 with the policy's fields, or a 403 without any."""
        origin = self.allowedOrigin(headers)
        if origin is None:
            return _refused(b"origin", headers.getRawHeaders(b"origin", []))
        methods = headers.getRawHeaders(b"access-control-request-method", [])
        if len(methods) != 1 or not isToken(methods[0]) or not self._allowsMethod(methods[0]):
            return _refused(b"method", methods)
        for name in splitTokens(headers.getRawHeaders(b"access-control-request-headers", [])):
            if not self._allowsHeader(name):
                return _refused(b"request header", [name])
        fields: Pairs = [(b"Access-Control-Allow-Origin", origin), *self._preflight]
        privateNetwork = headers.getRawHeaders(b"access-control-request-private-network", [])
        if privateNetwork == [b"true"]:
            if not self._allowPrivateNetwork:
                return clientError(403, "CORS preflight refused: private network access is not allowed")
            fields.append((b"Access-Control-Allow-Private-Network", b"true"))
        if self._varies:
            fields.append((b"Vary", b"Origin"))
        return LocalResponse(204, fields)

    # A wildcard is refused with credentials when the policy is built (browsers take it literally then).
    def _allowsMethod(self, method: bytes) -> bool:
        return method in self.methods or b"*" in self.methods

    def _allowsHeader(self, name: bytes) -> bool:
        return isToken(name) and (name in self.headers or (b"*" in self.headers and name != _NOT_WILDCARD))

    def onResponse(self, context: RequestContext, status: int, headers: Pairs) -> None:
        """Replace the CORS fields of a response (or an error) with the policy's, for the request's origin."""
        if any(name[: len(_PREFIX)].lower() == _PREFIX for name, _ in headers):  # rare: the upstream set its own
            headers[:] = [field for field in headers if not field[0].lower().startswith(_PREFIX)]
        if self._varies:
            varyOnOrigin(headers)
        origin = self.allowedOrigin(context.inbound.headers)
        if origin is not None:
            headers.append((b"Access-Control-Allow-Origin", origin))
            headers.extend(self._actual)


def _refused(what: bytes, values: Sequence[bytes]) -> ProxyError:
    shown = b", ".join(values)[:100].decode("latin-1")
    return clientError(403, f"CORS preflight refused: {what.decode()} {shown!r} is not allowed")


def varyOnOrigin(headers: Pairs) -> None:
    """Make C{headers} (response fields, in order) say that the response varies by ``Origin``, once."""
    last = -1
    for index, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            tokens = set(splitTokens([value]))
            if b"origin" in tokens or b"*" in tokens:
                return
            last = index
    if last < 0:
        headers.append((b"Vary", b"Origin"))
    else:
        name, value = headers[last]
        headers[last] = (name, value + b", Origin" if value.strip() else b"Origin")


def buildCORS(reader: PluginOptions, environment: FilterEnvironment) -> CORSFilter:
    """A L{CORSFilter} from the options of a C{[filters.X]} table of C{type = "cors"} (docs/filters/cors.md)."""
    credentials = reader.flag("credentials", False)
    listed = reader.strings("origins")
    patterns = tuple(_pattern(reader, text) for text in reader.strings("origin-patterns"))
    anyOrigin = "*" in listed
    if anyOrigin:
        if len(listed) > 1 or patterns:
            raise reader.error("origins", '"*" allows every origin: list no other origins or origin-patterns with it')
        if credentials:
            raise reader.error(
                "origins", '"*" with credentials = true would let every site read with the user\'s cookies; list them'
            )
    elif not listed and not patterns:
        raise reader.error("origins", "give the origins allowed (or origin-patterns)")
    return CORSFilter(
        origins=() if anyOrigin else (_origin(reader, text) for text in listed),
        patterns=patterns,
        anyOrigin=anyOrigin,
        methods=_tokens(reader, "methods", ("GET", "HEAD", "POST"), credentials),
        headers=_tokens(reader, "headers", (), credentials),
        exposeHeaders=_tokens(reader, "expose-headers", (), credentials),
        credentials=credentials,
        maxAge=round(reader.duration("max-age", 600)),
        allowPrivateNetwork=reader.flag("allow-private-network", False),
    )


def _ascii(reader: PluginOptions, option: str, text: str) -> bytes:
    try:
        return text.strip().lower().encode("ascii")
    except UnicodeEncodeError:
        raise reader.error(option, f"{text!r}: write an international domain name in its xn-- form") from None


def _serialized(reader: PluginOptions, option: str, text: str, value: bytes) -> Origin:
    origin = Origin.parse(value)
    if origin is None:
        raise reader.error(option, f"not an origin (scheme://host[:port], no path or final slash): {text!r}")
    if origin.port and origin.port == _DEFAULT_PORTS.get(origin.scheme):
        return Origin(origin.scheme, origin.host, b"")  # browsers leave the default port out
    return origin


def _origin(reader: PluginOptions, text: str) -> bytes:
    value = _ascii(reader, "origins", text)
    if value == b"null":
        raise reader.error("origins", '"null" is the origin of every sandboxed page and local file: not allowed')
    return _serialized(reader, "origins", text, value).serialize()


def _pattern(reader: PluginOptions, text: str) -> OriginPattern:
    scheme, separator, rest = _ascii(reader, "origin-patterns", text).partition(b"://")
    if not rest.startswith(b"*."):
        raise reader.error("origin-patterns", f"{text!r}: a pattern's host starts with *. (https://*.example.com)")
    origin = _serialized(reader, "origin-patterns", text, scheme + separator + rest[2:])
    if origin.host.startswith(b"[") or b"." not in origin.host:
        raise reader.error("origin-patterns", f"{text!r}: the wildcard must stand for subdomains of a domain")
    return OriginPattern(origin.scheme, b"." + origin.host, origin.port)


def _tokens(reader: PluginOptions, option: str, default: tuple[str, ...], credentials: bool) -> tuple[bytes, ...]:
    """Field names or methods: tokens, or C{"*"} (which browsers take literally with credentials)."""
    names = []
    for text in reader.strings(option, default):
        name = text.strip().encode("latin-1", "replace")
        if name == b"*" and credentials:
            raise reader.error(option, '"*" means itself to browsers when credentials = true: list the names')
        if name != b"*" and not isToken(name):
            raise reader.error(option, f"not a token: {text!r}")
        names.append(name)
    return tuple(names)
