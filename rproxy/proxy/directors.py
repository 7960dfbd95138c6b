"""
Built-in directors (each an L{IDirector}): one service for everything, or routes.

A L{Route} sends the requests that meet its conditions (host, path prefix, header and query matchers) to a
L{Service}, to a split between services (L{WeightedSplit} for canaries and A/B tests, L{BlueGreen} for a
switch), or to the service its path names (L{ServiceVersion}), and rewrites what is sent (prefix, ``Host``,
fields).  L{RoutingDirector} tries its routes most specific first (see there; docs/routing.md has the
whole model)::

    director = RoutingDirector([
        Route(shop, hosts=["shop.example.com", "*.shop.example.com"]),
        Route(api, pathPrefix="/api", stripPrefix=True),
        Route(WeightedSplit([(web, 90), (webCanary, 10)], sticky="cookie:session")),
    ])

Request-targets are matched and rewritten as raw bytes: nothing is decoded, normalised or re-quoted, so
C{%2F}, C{//}, C{..} and C{;} reach the upstream exactly as the client sent them.  Many upstreams do
normalise paths, so a target that one route takes as sent and another once normalised is refused (400):
C{/x/../admin} must not slip past the filters of an C{/admin} route to an upstream that reads it as
C{/admin} (L{normalisedPath}).
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from hashlib import blake2b
from itertools import accumulate

from zope.interface import implementer

from rproxy.errors import clientError
from rproxy.headers import FRAMING, HOP_BY_HOP
from rproxy.interfaces import IDirector, ISplit
from rproxy.proxy.balancers import hashKey
from rproxy.proxy.message import InboundRequest, OutboundRequest
from rproxy.proxy.service import Service

#: A name to service lookup for L{ServiceVersion}: a mapping, or a callable returning C{None} for an unknown name.
ServiceLookup = Mapping[str, Service] | Callable[[str], Service | None]


@implementer(IDirector)
class SingleServiceDirector:
    """Every request goes to one service, unchanged."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def direct(self, inbound: InboundRequest, outbound: OutboundRequest) -> Service:
        return self.service


# -- matching and rewriting, compiled once per route

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
_PATH_PREFIX = re.compile(r"/[!-~]*\Z")
_QUERY_PART = re.compile(r"[!-~]*\Z")
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_-]+(\.[a-z0-9_-]+)*)\Z")
_HOST_VALUE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)(:[0-9]{1,5})?\Z")

#: Fields a route may not set, add or remove: they describe the connection, or the proxy computes them.
_RESERVED_FIELDS = HOP_BY_HOP | FRAMING

#: The bytes that end a path segment right after a prefix: ``/api`` matches ``/api/x`` and ``/api?q``.
_SEGMENT_END = b"/?"


def _hostName(host: bytes) -> bytes:
    """A ``Host`` value as routes match it: lower case, without its port or one trailing dot."""
    if host[:1] == b"[":
        end = host.find(b"]")
        name = host[: end + 1] if end > 0 else host
    else:
        name = host.partition(b":")[0]
    name = name.lower()
    return name[:-1] if name.endswith(b".") else name


def _hostPattern(pattern: str) -> tuple[bool, bytes]:
    """
    Compile a host pattern: C{"Shop.example.com"} to C{(False, b"shop.example.com")}, a wildcard
    C{"*.example.com"} to C{(True, b".example.com")} (the suffix a host must end with).
    """
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern
    name = name[:-1] if name.endswith(".") else name
    try:
        encoded = name.lower().encode("idna")
    except UnicodeError:
        raise ValueError(f"host pattern {pattern!r}: not a host name") from None
    if not _HOST.match(encoded.decode("ascii")) or (wildcard and encoded.startswith(b"[")):
        raise ValueError(
            f"host pattern {pattern!r}: expected a host name (no port), an IP address, or '*.' and a domain"
        )
    return wildcard, (b"." + encoded if wildcard else encoded)


def _pathPrefix(what: str, prefix: str) -> bytes:
    """Check a path prefix (visible ASCII from a ``/``, no query) and encode it."""
    if not _PATH_PREFIX.match(prefix) or "?" in prefix or "#" in prefix:
        raise ValueError(f"{what} {prefix!r}: expected visible ASCII starting with '/', without '?' or '#'")
    return prefix.encode("ascii")


def _fieldName(name: str, rewriting: bool = False) -> bytes:
    if not _TOKEN.match(name):
        raise ValueError(f"header name {name!r}: not a field name")
    encoded = name.lower().encode("ascii")
    if rewriting and encoded in _RESERVED_FIELDS:
        raise ValueError(
            f"header {name!r}: routes may not change connection or framing fields (set the Host with setHost)"
        )
    return encoded


def _fieldValue(name: str, value: str) -> bytes:
    if not _FIELD_VALUE.match(value):
        raise ValueError(f"header {name!r}: its value {value!r} has control characters (CR, LF, NUL, ...)")
    return value.encode("latin-1")


def _queryPart(what: str, text: str, forbidden: str) -> bytes:
    """Check a query argument's name or value (visible ASCII as sent, none of C{forbidden}) and encode it."""
    if not _QUERY_PART.match(text) or any(c in text for c in forbidden) or (what == "argument" and not text):
        raise ValueError(f"query {what} {text!r}: expected it as sent, visible ASCII without {forbidden!r}")
    return text.encode("ascii")


def _queryMatches(target: bytes, matchers: Sequence[tuple[bytes, bytes | None]]) -> bool:
    """Whether the raw query of C{target} has each argument (with the value, when given); C{a} is C{a=}."""
    query = target.partition(b"?")[2]
    pairs = [pair.partition(b"=") for pair in query.split(b"&")]
    for name, value in matchers:
        if not any(key == name and (value is None or got == value) for key, _, got in pairs):
            return False
    return True


#: What an upstream may read differently from the bytes a path has: escapes, backslashes, parameters, empty
#: and dot segments (C{/.} also starts C{/.well-known}: such a path is normalised, to itself).
_NORMALISED_AWAY = re.compile(rb"[%\\;]|/[/.]")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def normalisedPath(target: bytes) -> bytes | None:
    """
    The path of C{target} as an upstream that normalises paths may read it, with the query as sent; C{None}
    when the path has nothing such an upstream would change.

    Every normalisation an upstream might apply at once, so that no combination of them is missed:
    percent-escapes decoded (once), C{\\} read as C{/} (Windows servers), each segment's parameters
    (C{;jsessionid=...}, Tomcat and Jetty) dropped, empty segments merged (nginx), then dot segments
    resolved (RFC 3986 section 5.2.4).  A final slash is kept.
    """
    path, question, query = target.partition(b"?")
    if _NORMALISED_AWAY.search(path) is None:
        return None
    path = _ESCAPE.sub(lambda match: bytes([int(match[1], 16)]), path).replace(b"\\", b"/")
    segments: list[bytes] = []
    last = b""
    for last in path.split(b"/")[1:]:
        segment = last.partition(b";")[0]
        if segment == b"..":
            if segments:
                segments.pop()
        elif segment not in (b"", b"."):
            segments.append(segment)
    normalised = b"/" + b"/".join(segments)
    if segments and last.partition(b";")[0] in (b"", b".", b".."):
        normalised += b"/"
    return normalised + question + query


def _joinRest(head: bytes, rest: bytes) -> bytes:
    """
    The new target: C{head} (a path from ``/``) then C{rest}, what followed the prefix (empty, or from a
    ``/`` or ``?``), with one slash between them: C{/v2} and C{/x} give C{/v2/x}; C{/} and C{?q} give C{/?q}.
    """
    if rest[:1] == b"/":
        return head.rstrip(b"/") + rest
    return head + rest


class ServiceVersion:
    """
    A route target that reads the service from the path: the first two segments after the route's path
    prefix name a service and its version, and are removed from the target.

    C{/users/v2/list?all=1} goes to the service named C{"users:v2"} with the target C{/list?all=1}
    (C{/users/v2} alone becomes C{/}).  Segments are raw bytes of letters, digits and C{.-_~}, starting with
    a letter or digit, compared case-sensitively; a target without two such segments, or whose name the
    lookup does not know, does not match the route.

    @ivar services: the lookup, consulted per request (a mapping that changes routes to its new entries).
    """

    _SEGMENTS = re.compile(rb"/([A-Za-z0-9][A-Za-z0-9._~-]*)/([A-Za-z0-9][A-Za-z0-9._~-]*)(?=[/?]|\Z)")

    def __init__(self, services: ServiceLookup) -> None:
        self.services = services
        self._lookup = services.get if isinstance(services, Mapping) else services

    def resolve(self, rest: bytes) -> tuple[Service, bytes] | None:
        """The service C{rest} (the target after the route's prefix) names, and what follows the two segments."""
        match = self._SEGMENTS.match(rest)
        if match is None:
            return None
        service = self._lookup(f"{match[1].decode('ascii')}:{match[2].decode('ascii')}")
        return None if service is None else (service, rest[match.end() :])


class Route:
    """
    Where the requests that meet every given condition go, and how they are rewritten.

    Conditions (each optional; a route with none matches every request):
      - C{hosts}: exact names or C{*.domain} wildcards (one or more labels before the domain, not the
        domain itself); case-insensitive, the request's port and a trailing dot ignored.
      - C{pathPrefix}: raw bytes at a segment boundary: C{/api} matches C{/api}, C{/api/x} and C{/api?q}, not
        C{/apix}; a prefix ending in C{/} matches what starts with it.
      - C{headers}: name to value (one of the field's lines equals it exactly) or C{None} (present).
      - C{query}: argument to raw value (as sent, not decoded) or C{None} (present).

    Rewrites, applied when the route is chosen: C{stripPrefix} removes the path prefix, C{replacePrefix}
    puts another path in its place (the rest of the target kept byte for byte, a leading ``/`` guaranteed);
    C{setHost} sets the ``Host`` sent (a service with C{rewriteHost} still sends its upstream's); C{removeHeaders},
    then C{setHeaders}, then C{addHeaders} change the outbound fields.

    @ivar service: a L{Service}, an L{ISplit} choosing one per request, or a L{ServiceVersion}.
    @ivar specificity: how it ranks among routes whose hosts match equally well (larger first): the path
        prefix length (-1 without one), then the number of header and query matchers.
    """

    def __init__(
        self,
        service: Service | ISplit | ServiceVersion,
        *,
        hosts: str | Iterable[str] = (),
        pathPrefix: str | None = None,
        headers: Mapping[str, str | None] | None = None,
        query: Mapping[str, str | None] | None = None,
        stripPrefix: bool = False,
        replacePrefix: str | None = None,
        setHost: str | None = None,
        setHeaders: Mapping[str, str] | None = None,
        addHeaders: Iterable[tuple[str, str]] = (),
        removeHeaders: Iterable[str] = (),
    ) -> None:
        self.service = service
        self._fixed: Service | None = None
        self._split: ISplit | None = None
        self._versions: ServiceVersion | None = None
        if isinstance(service, ServiceVersion):
            self._versions = service
        elif isinstance(service, Service):
            self._fixed = service
        elif ISplit.providedBy(service):
            self._split = service
        else:
            raise TypeError(f"a route goes to a Service, an ISplit or a ServiceVersion, not {service!r}")

        self.hosts = (hosts,) if isinstance(hosts, str) else tuple(hosts)
        self._hostKeys = tuple(_hostPattern(pattern) for pattern in self.hosts)

        self.pathPrefix = pathPrefix
        self._prefix = None if pathPrefix is None else _pathPrefix("path prefix", pathPrefix)
        #: A prefix ending in "/" needs no boundary check; what follows it starts after its base.
        self._open = self._prefix is not None and self._prefix.endswith(b"/")
        self._baseLength = 0 if self._prefix is None else len(self._prefix.rstrip(b"/"))
        if stripPrefix and replacePrefix is not None:
            raise ValueError("a route strips its prefix or replaces it, not both")
        if (stripPrefix or replacePrefix is not None) and pathPrefix is None:
            raise ValueError("stripPrefix and replacePrefix need a pathPrefix")
        # When the target is rebuilt, the path put before the rest of it (the prefix itself, if kept).
        self._rebuild = stripPrefix or replacePrefix is not None or self._versions is not None
        self._head = self._prefix or b"/"
        if stripPrefix:
            self._head = b"/"
        elif replacePrefix is not None:
            self._head = _pathPrefix("replacement prefix", replacePrefix)

        self._headers = tuple(
            (_fieldName(name), None if value is None else _fieldValue(name, value))
            for name, value in (headers or {}).items()
        )
        self._query = tuple(
            (_queryPart("argument", name, "&#?="), None if value is None else _queryPart("value", value, "&#?"))
            for name, value in (query or {}).items()
        )
        self.specificity = (-1 if self._prefix is None else len(self._prefix), len(self._headers) + len(self._query))

        if setHost is not None and not _HOST_VALUE.match(setHost):
            raise ValueError(f"setHost {setHost!r}: expected a host name or IP address, and an optional port")
        self._setHost = None if setHost is None else setHost.encode("ascii")
        self._removeHeaders = tuple(_fieldName(name, rewriting=True) for name in removeHeaders)
        self._setHeaders = tuple(
            (_fieldName(name, rewriting=True), _fieldValue(name, value)) for name, value in (setHeaders or {}).items()
        )
        self._addHeaders = tuple(
            (_fieldName(name, rewriting=True), _fieldValue(name, value)) for name, value in addHeaders
        )

    def _coversNormalised(self, target: bytes) -> bool:
        """
        Whether C{target}, as a normalising upstream reads it, is under this route's prefix read the same way
        (a prefix with escapes, C{/a%2Fb}, covers C{/a/b/c}; nothing covers C{/a%2Fb/../../internal}).
        """
        prefix = self._prefix
        if prefix is None:
            return True
        prefix = normalisedPath(prefix) or prefix
        if not target.startswith(prefix):
            return False
        return prefix.endswith(b"/") or len(target) == len(prefix) or target[len(prefix)] in _SEGMENT_END

    def _matches(self, inbound: InboundRequest, target: bytes) -> bool:
        """Whether C{inbound}, with C{target} as its request-target, meets the conditions other than hosts."""
        prefix = self._prefix
        if prefix is not None:
            if not target.startswith(prefix):
                return False
            length = len(prefix)
            if not self._open and len(target) > length and target[length] not in _SEGMENT_END:
                return False
        if self._headers:
            headers = inbound.headers
            for name, value in self._headers:
                values = headers.getRawHeaders(name)
                if values is None or (value is not None and value not in values):
                    return False
        return not self._query or _queryMatches(target, self._query)

    def _direct(self, inbound: InboundRequest, outbound: OutboundRequest) -> Service | None:
        """
        If C{inbound} meets the route's conditions other than its hosts (L{RoutingDirector} has matched
        those), rewrite C{outbound} and return the service; otherwise, or when its L{ServiceVersion} knows
        no such service, return C{None} and leave C{outbound} alone.
        """
        target = inbound.target
        if not self._matches(inbound, target):
            return None
        service: Service | None
        rest = target[self._baseLength :]
        if self._versions is not None:
            resolved = self._versions.resolve(rest)
            if resolved is None:
                return None
            service, rest = resolved
        else:
            service = self._fixed if self._split is None else self._split.choose(inbound)
        if self._rebuild:
            outbound.target = _joinRest(self._head, rest)

        if self._setHost is not None:
            outbound.host = self._setHost
        fields = outbound.headers
        for name in self._removeHeaders:
            fields.removeHeader(name)
        for name, value in self._setHeaders:
            fields.setRawHeaders(name, [value])
        for name, value in self._addHeaders:
            fields.addRawHeader(name, value)
        return service


@implementer(IDirector)
class RoutingDirector:
    """
    Routes tried in a fixed order; the first that matches takes the request, and none: C{None} (a 404).

    The order, for a request whose ``Host`` is C{h}:
      1. routes listing C{h} exactly;
      2. routes with a wildcard matching C{h}, the longest domain first (C{*.api.example.com}, then
         C{*.example.com});
      3. routes without hosts.
    Within each group, the longest path prefix first (a route without one last), then the route with more
    header and query matchers, then the one given first.  A route listing several hosts takes its place in
    the group of the pattern that matched.

    A target that a route takes, and another route or none would take once normalised (L{normalisedPath}), is
    refused with 400 rather than routed: which route it belongs to depends on the upstream's reading, and the
    routes may differ in their filters (C{/x/../admin} past an C{/admin} route's authentication), or the
    upstream would serve a path no route gave it (C{/admin/../internal} when only C{/admin} is routed).

    @ivar routes: the routes as given.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        ranked = sorted(
            range(len(self.routes)),
            key=lambda i: (tuple(-n for n in self.routes[i].specificity), i),
        )
        exact: dict[bytes, list[Route]] = {}
        wildcards: dict[bytes, list[Route]] = {}
        anyHost: list[Route] = []
        for i in ranked:
            route = self.routes[i]
            if not route._hostKeys:
                anyHost.append(route)
            for isWildcard, name in route._hostKeys:
                group = wildcards if isWildcard else exact
                if route not in group.setdefault(name, []):
                    group[name].append(route)
        self._exact = {name: tuple(group) for name, group in exact.items()}
        self._wildcards = {suffix: tuple(group) for suffix, group in wildcards.items()}
        self._anyHost = tuple(anyHost)
        # Only path prefixes tell routes apart by path: without one, normalising cannot change the route.  One
        # route with a prefix is enough: C{/admin/../internal} must not reach the upstream's C{/internal}.
        self._byPath = any(route._prefix is not None for route in self.routes)

    def _groups(self, host: bytes | None) -> Iterator[tuple[Route, ...]]:
        """The groups of routes a request for C{host} tries, in order."""
        if host is not None and (self._exact or self._wildcards):
            name = _hostName(host)
            group = self._exact.get(name)
            if group:
                yield group
            if self._wildcards:
                dot = name.find(b".")
                while dot >= 0:
                    group = self._wildcards.get(name[dot:])
                    if group:
                        yield group
                    dot = name.find(b".", dot + 1)
        yield self._anyHost

    def candidates(self, host: bytes | None) -> list[Route]:
        """The routes a request with C{host} (a ``Host`` value) tries, in the order it tries them."""
        return [route for group in self._groups(host) for route in group]

    def direct(self, inbound: InboundRequest, outbound: OutboundRequest) -> Service | None:
        """
        The service of the first route that takes C{inbound} (see above), having rewritten C{outbound}.

        @raise ProxyError: a 400 when another route would take the normalised target.
        """
        for group in self._groups(inbound.host):
            for route in group:
                service = route._direct(inbound, outbound)
                if service is not None:
                    if self._byPath:
                        self._checkUnambiguous(route, inbound)
                    return service
        return None

    def _checkUnambiguous(self, chosen: Route, inbound: InboundRequest) -> None:
        """Refuse C{inbound}, which C{chosen} takes, if its normalised target is another route's or no route's."""
        normalised = normalisedPath(inbound.target)
        if normalised is None:
            return
        other = next(
            (route for group in self._groups(inbound.host) for route in group if route._matches(inbound, normalised)),
            None,
        )
        if other is not chosen and (other is not None or not chosen._coversNormalised(normalised)):
            target = inbound.target[:200].decode("latin-1")
            raise clientError(
                400,
                f"the target {target!r} is routed differently once normalised (escapes, dot segments, //, ;): "
                "send it as the upstream reads it",
            )


@implementer(ISplit)
class WeightedSplit:
    """
    Each request goes to one of several services in proportion to their weights: a canary, an A/B test.

    A request may be I{pinned}: when C{pin} (C{"cookie:NAME"} or C{"header:NAME"}) reads a service's name
    from it, it goes to that service, whatever its weight (0 included: a dark launch only testers see).
    Otherwise, with C{sticky} (C{"cookie:NAME"}, C{"header:NAME"} or C{"client_ip"}) the request's key is
    hashed to a point of the weights' range, so the same key always lands on the same service; without
    C{sticky}, or a request without the key, the point is drawn at random.  The weights are laid out in
    the order given: raising a later service's weight (a canary listed last) only moves keys onto it.

    @ivar services: the services, in order.
    """

    def __init__(
        self,
        variants: Sequence[tuple[Service, int]],
        *,
        pin: str | None = None,
        sticky: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.services = tuple(service for service, _ in variants)
        self._byName = {service.name.encode("utf-8"): service for service in self.services}
        if len(self._byName) != len(self.services):
            raise ValueError(f"a split needs services of different names, not {[s.name for s in self.services]}")
        self._pin = None if pin is None else hashKey(pin)
        self._sticky = None if sticky is None else hashKey(sticky)
        self._rng = rng or random.Random()
        self.setWeights([weight for _, weight in variants])

    @property
    def weights(self) -> tuple[int, ...]:
        """The current weights, in the order of L{services}."""
        return self._weights

    def setWeights(self, weights: Sequence[int]) -> None:
        """Change the weights (non-negative whole numbers, one per service, not all 0) for the next requests."""
        weights = tuple(weights)
        if len(weights) != len(self.services):
            raise ValueError(f"{len(self.services)} weights needed, one per service, not {len(weights)}")
        if any(not isinstance(weight, int) or weight < 0 for weight in weights) or not sum(weights):
            raise ValueError(f"weights must be whole numbers from 0, not all 0: {list(weights)}")
        bounds = tuple(accumulate(weights))
        # One assignment, so that a request never sees new bounds with the old total.
        self._weights, self._table = weights, (bounds, bounds[-1])

    def choose(self, inbound: InboundRequest) -> Service:
        if self._pin is not None:
            name = self._pin(inbound)
            if name is not None:
                pinned = self._byName.get(name)
                if pinned is not None:
                    return pinned
        bounds, total = self._table
        key = None if self._sticky is None else self._sticky(inbound)
        if key is None:
            point = self._rng.randrange(total)
        else:
            # 64 bits of hash as a fraction of the range, so a key keeps its relative place when it grows.
            point = (int.from_bytes(blake2b(key, digest_size=8).digest(), "big") * total) >> 64
        return self.services[bisect_right(bounds, point)]


@implementer(ISplit)
class BlueGreen:
    """
    Two deployments of one service, one of them live: every request goes to the active one.

    L{activate} switches for every request that has not been routed yet; requests in flight finish on
    the service they were sent to.  Call it in the reactor thread (C{reactor.callFromThread} from others).
    """

    _COLORS = ("blue", "green")

    def __init__(self, blue: Service, green: Service, active: str = "blue") -> None:
        self.blue = blue
        self.green = green
        self.activate(active)

    @property
    def active(self) -> str:
        """C{"blue"} or C{"green"}."""
        return self._active

    def activate(self, color: str) -> None:
        """Send the next requests to C{color} (C{"blue"} or C{"green"}); activating the active one changes nothing."""
        if color not in self._COLORS:
            raise ValueError(f"expected 'blue' or 'green', not {color!r}")
        self._active, self._live = color, self.blue if color == "blue" else self.green

    def choose(self, inbound: InboundRequest) -> Service:
        return self._live
