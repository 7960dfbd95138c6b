"""
Header rules of a route: fields removed, set or added on the request the upstream gets and on the response
the client gets (L{HeaderRulesFilter}).

Each side applies its rules in one order, remove then set then add, so that a table's meaning does not
depend on how it is written: C{set} replaces every field of its name, C{add} appends one more.  Response
rules apply to the proxy's errors and to the answers of the filters after this one as well, so that a
security field (C{Strict-Transport-Security}, C{X-Frame-Options}) is on every response of the route.

Rules may not touch the fields that describe a connection or frame a message (hop-by-hop fields,
C{Content-Length}, C{Host}): the proxy manages those, and a rule could only break framing or route
requests somewhere else (a route sets C{Host} with C{set-host}).  Names and values are checked when the
filter is built, never on a request.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy.headers import FRAMING, HOP_BY_HOP, Pairs, hasControl, isToken
from rproxy.interfaces import FilterEnvironment, IRequestFilter, IResponseFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, RequestContext

#: Fields no rule may name (lower case).
MANAGED = HOP_BY_HOP | FRAMING


class HeaderRules:
    """
    The rules of one side (request or response): names to remove, fields to set, fields to add.

    @ivar remove: the names of the fields to remove, lower case.
    @ivar replace: the fields to set, one per name, each replacing every field of its name.
    @ivar add: the fields to add after the others.
    """

    def __init__(
        self,
        remove: Iterable[bytes] = (),
        replace: Iterable[tuple[bytes, bytes]] = (),
        add: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        self.remove = frozenset(name.lower() for name in remove)
        self.replace = tuple(replace)
        self.add = tuple(add)
        self._dropped = self.remove | {name.lower() for name, _ in self.replace}

    def __bool__(self) -> bool:
        return bool(self._dropped or self.add)

    def __repr__(self) -> str:
        return f"<HeaderRules remove={sorted(self.remove)} set={list(self.replace)} add={list(self.add)}>"

    def applyToHeaders(self, headers: Headers) -> None:
        """Apply the rules to C{headers} (a request's, whose names Twisted writes in its canonical case)."""
        for name in self.remove:
            headers.removeHeader(name)
        for name, value in self.replace:
            headers.setRawHeaders(name, [value])
        for name, value in self.add:
            headers.addRawHeader(name, value)

    def applyToFields(self, fields: Pairs) -> None:
        """Apply the rules to C{fields} (a response's, in order, changed in place); names keep their case."""
        if self._dropped:
            fields[:] = [field for field in fields if field[0].lower() not in self._dropped]
        fields.extend(self.replace)
        fields.extend(self.add)


@implementer(IRequestFilter, IResponseFilter)
class HeaderRulesFilter:
    """
    Header rules on a route's requests (as the upstream gets them) and responses (as the client gets them).

    @ivar request: the rules of the request side.
    @ivar response: the rules of the response side, errors and the later filters' answers included.
    """

    consumes: tuple[bytes, ...] = ()

    def __init__(self, request: HeaderRules, response: HeaderRules) -> None:
        self.request = request
        self.response = response

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        """Apply the request rules to the outbound request."""
        if self.request:
            self.request.applyToHeaders(context.outbound.headers)
        return None

    def onResponse(self, context: RequestContext, status: int, headers: Pairs) -> None:
        """Apply the response rules."""
        if self.response:
            self.response.applyToFields(headers)


def buildHeaderRules(reader: PluginOptions, environment: FilterEnvironment) -> HeaderRulesFilter:
    """
    A L{HeaderRulesFilter} from the options of a C{[filters.X]} table of C{type = "headers"}
    (docs/filters/headers.md).
    """
    built = HeaderRulesFilter(_side(reader, "request"), _side(reader, "response"))
    if not (built.request or built.response):
        raise ValueError(f"filter {reader.name}: no rule: give request-set, request-add, request-remove, or response-*")
    return built


def _side(reader: PluginOptions, side: str) -> HeaderRules:
    remove = [_name(reader, f"{side}-remove", text) for text in reader.strings(f"{side}-remove")]
    option = f"{side}-set"
    replace = [_field(reader, option, text, value) for text, value in reader.table(option).items()]
    names = [name.lower() for name, _ in replace]
    for name in names:
        if names.count(name) > 1:
            raise reader.error(option, f"{name.decode()!r} is set twice (names are case-insensitive)")
    option = f"{side}-add"
    add = [
        _field(reader, option, text, value)
        for text, values in reader.table(option).items()
        for value in (values if isinstance(values, list) else [values])
    ]
    return HeaderRules(remove, replace, add)


def _field(reader: PluginOptions, option: str, text: str, value: object) -> tuple[bytes, bytes]:
    """The field C{text}: C{value} of a rule, checked."""
    name = _name(reader, option, text)
    if not isinstance(value, str):
        raise reader.error(option, f"{text}: expected a string value, got {value!r}")
    encoded = value.encode("utf-8")
    if hasControl(encoded):
        raise reader.error(option, f"{text}: a value may not hold CR, LF or NUL")
    return name, encoded


def _name(reader: PluginOptions, option: str, text: str) -> bytes:
    name = text.encode("latin-1", "replace")
    if not isToken(name):
        raise reader.error(option, f"not a field name: {text!r}")
    if name.lower() == b"host":
        raise reader.error(option, "Host is the route's: set it with the route's set-host")
    if name.lower() in MANAGED:
        raise reader.error(option, f"{text} is managed by the proxy (hop-by-hop or framing), not by header rules")
    return name
