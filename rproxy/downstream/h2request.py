"""
An HTTP/2 request head as an HTTP/1.1 request will carry it: every field checked (RFC 9113 section 8.2),
and the pseudo-header fields turned into a method, a target and one ``Host`` (section 8.3), before anything
reaches an upstream.

A malformed request is answered 400 on its stream, which then ends with RST_STREAM(PROTOCOL_ERROR) (431
for the same size limits as HTTP/1.1, ended normally), never forwarded, and the connection goes on
(section 8.1.1 makes it a stream error and allows a response first: h2's own checks, which would end the
whole connection, are switched off in favour of these, done in one pass):

 - field names: not empty, lower case, no separators, controls or colons (but the leading one of a
   pseudo-header field); values: no NUL, CR or LF, no leading or trailing blank;
 - no connection-specific field (``Connection``, ``Keep-Alive``, ``Proxy-Connection``,
   ``Transfer-Encoding``, ``Upgrade``), and ``TE`` only as ``trailers``;
 - pseudo-header fields: only the request ones, each at most once, all before the regular fields;
   ``:method``, and ``:scheme`` and ``:path`` (but on a plain CONNECT), with ``:protocol`` only on CONNECT;
 - ``:method`` a token, ``:scheme`` a URI scheme, ``:path`` an absolute path (or ``*`` for OPTIONS) without
   spaces or control characters: an absolute URL there would replace the authority, and a space would
   split the upstream's request line;
 - the authority: ``:authority``, else one ``Host`` field (both: naming the same host and port), and
   C{host[:port]};
 - ``content-length`` values digits only (not the list HTTP/1.1 may accept), equal, and within 63 bits
   (L{rproxy.framing}).

The ``cookie`` crumbs of section 8.2.3 become one field, as HTTP/1.1 requires, after the others (and count as
one against the limit of fields).  L{trailerProblem} checks a trailer block the same way.
(L{rproxy.downstream.h2connection} checks a body against its ``content-length``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rproxy.downstream.validation import authorityProblem, methodProblem, schemeProblem, targetProblem
from rproxy.errors import ProxyError, clientError
from rproxy.framing import MalformedBodyError, contentLength
from rproxy.headers import Pairs, hasControl

#: What RFC 9113 section 4.3.1 counts for each field besides its name and value.
FIELD_OVERHEAD = 32

#: What a field name may not hold (RFC 9113 section 8.2.1): controls and space, upper case, DEL and
#: beyond, and a colon.
_NAME_FORBIDDEN = bytes([*range(0x21), *range(0x41, 0x5B), *range(0x7F, 0x100), 0x3A])
#: Fields of an HTTP/1.1 connection, never in an HTTP/2 message (section 8.2.2).
_CONNECTION_SPECIFIC = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"])
#: The pseudo-header fields of a request (section 8.3.1, and RFC 8441's ``:protocol``).
_REQUEST_PSEUDO = frozenset([b":method", b":scheme", b":authority", b":path", b":protocol"])
#: The port an authority without one means, by scheme.
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}
#: Blank bytes, which may not start or end a value.
_BLANKS = (0x20, 0x09)


class H2RequestHead(NamedTuple):
    """
    A checked HTTP/2 request head.

    @ivar method: the ``:method``.
    @ivar target: the ``:path`` (an authority-form target for a plain CONNECT, which has none).
    @ivar fields: the regular fields in order, ``host`` first (from the authority).
    @ivar length: the body length ``content-length`` declares, or C{None}.
    @ivar protocol: the ``:protocol`` of an extended CONNECT (RFC 8441), else C{None}.
    """

    method: bytes
    target: bytes
    fields: Pairs
    length: int | None
    protocol: bytes | None


class HeadLimits(NamedTuple):
    """
    How large a request head may be: the same limits as an HTTP/1.1 head, and the HTTP/2 setting.

    @ivar maxHeaders: most regular fields.
    @ivar maxHeaderBytes: largest sum of the names and values, pseudo-header fields included.
    @ivar maxHeaderListSize: largest header list as RFC 9113 counts it (C{SETTINGS_MAX_HEADER_LIST_SIZE}).
    """

    maxHeaders: int
    maxHeaderBytes: int
    maxHeaderListSize: int


def requestHead(block: Sequence[tuple[bytes, bytes]], limits: HeadLimits) -> H2RequestHead | ProxyError:
    """The request that the field block C{block} (as h2 decoded it) asks for, or the error to answer it with."""
    pseudo: dict[bytes, bytes] = {}
    fields: Pairs = [(b"host", b"")]  # the authority goes first, once it is known
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    cookies: list[bytes] = []
    size = 0
    for field in block:
        name, value = field
        size += len(name) + len(value)
        if name[:1] == b":":
            if len(fields) > 1 or hosts:
                return clientError(400, f"the pseudo-header field {_shown(name)} follows a regular field")
            if name not in _REQUEST_PSEUDO:
                return clientError(400, f"unknown pseudo-header field {_shown(name)}")
            if name in pseudo:
                return clientError(400, f"repeated pseudo-header field {_shown(name)}")
            pseudo[name] = value
        elif name == b"host":
            hosts.append(value)
        else:
            if name == b"content-length":
                lengths.append(value)
            elif name == b"cookie":
                cookies.append(value)
                continue
            elif name in _CONNECTION_SPECIFIC:
                return clientError(400, f"connection-specific field {_shown(name)} in an HTTP/2 request")
            elif name == b"te" and value.lower() != b"trailers":
                return clientError(400, "a TE field other than 'trailers'")
            fields.append(field)
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    if len(fields) - 1 + len(hosts) > limits.maxHeaders:
        return clientError(431, f"the request has more than {limits.maxHeaders} header fields")
    if size > limits.maxHeaderBytes:
        return clientError(431, f"the request header section exceeds {limits.maxHeaderBytes} bytes")
    if size + FIELD_OVERHEAD * len(block) > limits.maxHeaderListSize:
        return clientError(431, f"the request header list exceeds {limits.maxHeaderListSize} bytes")
    problem = fieldsProblem(block)
    if problem is not None:
        return clientError(400, problem)

    method = pseudo.get(b":method")
    if method is None:
        return clientError(400, "the request has no :method")
    problem = methodProblem(method)
    protocol = pseudo.get(b":protocol")
    scheme = pseudo.get(b":scheme")
    target = pseudo.get(b":path")
    if problem is None:
        if method == b"CONNECT" and protocol is None:
            if scheme is not None or target is not None:
                problem = "a plain CONNECT has neither :scheme nor :path"
        elif protocol is not None and method != b"CONNECT":
            problem = ":protocol on a request other than CONNECT"
        elif scheme is None or target is None:
            problem = "the request has no :scheme or no :path"
        elif scheme != b"https" and scheme != b"http":
            problem = schemeProblem(scheme)
    authority = pseudo.get(b":authority")
    if len(hosts) > 1:
        problem = problem or "the request has more than one Host field"
    elif hosts:
        if authority is None:
            authority = hosts[0]
        elif authority != hosts[0] and _normalAuthority(authority, scheme) != _normalAuthority(hosts[0], scheme):
            problem = problem or "the Host field differs from :authority"
    if problem is None:
        if authority is None:
            problem = "the request has neither :authority nor Host"
        else:
            problem = authorityProblem(authority)
    if target is None:  # a plain CONNECT, which names only an authority (refused later)
        target = authority or b""
    elif problem is None:
        problem = _pathProblem(method, target)
    if problem is not None:
        return clientError(400, problem)
    length = None
    if lengths:
        notDigits = [value for value in lengths if not value.isdigit()]
        if notDigits:
            return clientError(400, f"invalid Content-Length {_shown(notDigits[0])}: HTTP/2 allows digits only")
        try:
            length = contentLength(lengths)
        except MalformedBodyError as e:
            return clientError(400, str(e))
    if authority is None:
        del fields[0]
    else:
        fields[0] = (b"host", authority)
    return H2RequestHead(method, target, fields, length, protocol)


def fieldsProblem(block: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why the names or values of a field block are not valid HTTP/2 fields (see the module), or C{None}."""
    names = [name[1:] if name[:1] == b":" else name for name, _ in block]
    joined = b"".join(names)
    if len(joined.translate(None, _NAME_FORBIDDEN)) != len(joined) or not all(names):
        for name, _ in block:
            bare = name[1:] if name[:1] == b":" else name
            if not bare or len(bare.translate(None, _NAME_FORBIDDEN)) != len(bare):
                return f"invalid field name {_shown(name)}"
    values = [value for _, value in block]
    if hasControl(b"".join(values)):
        return "a field value holds NUL, CR or LF"
    for value in values:
        if value and (value[0] in _BLANKS or value[-1] in _BLANKS):
            return "a field value starts or ends with a blank"
    return None


def trailerProblem(block: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why a request's trailer block is malformed (as a request head would be, and no pseudo-header field)."""
    for name, value in block:
        if name[:1] == b":":
            return f"pseudo-header field {_shown(name)} in the trailers"
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific field {_shown(name)} in the trailers"
        if name == b"te" and value.lower() != b"trailers":
            return "a TE field other than 'trailers'"
    return fieldsProblem(block)


def _normalAuthority(authority: bytes, scheme: bytes | None) -> bytes:
    """
    C{authority} as RFC 9113 section 8.3.1 compares a ``Host`` field with ``:authority`` (normalised by RFC
    3986 section 6.2: the host's case, an empty port or the scheme's default port do not matter).
    """
    lowered = authority.lower()
    host, colon, port = lowered.rpartition(b":")
    if colon and b"]" not in port and (not port or port == _DEFAULT_PORTS.get(scheme or b"")):
        return host
    return lowered


def _pathProblem(method: bytes, path: bytes) -> str | None:
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return f"the :path {_shown(path)} is not an absolute path"
    return targetProblem(path)


def _shown(value: bytes) -> str:
    """A hostile value, as a log line or a reason may show it (escaped, cut)."""
    return repr(value[:100].decode("latin-1"))
