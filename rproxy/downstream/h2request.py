"""
An HTTP/2 request head as an HTTP/1.1 request will carry it: pseudo-header fields checked and turned
into a method, a target and one ``Host``, before anything reaches an upstream (RFC 9113 section 8.3).

h2 already refuses, as a connection error, what RFC 9113 section 8.2 forbids in any field block: names
that are not lower case or hold separators, NUL, CR and LF in values, connection-specific fields, a
``TE`` other than ``trailers``, and pseudo-header fields that are missing, repeated, unknown or out of
place, or a ``Host`` that differs from ``:authority``.  It does not look inside the values that become
the request line and ``Host`` of an HTTP/1.1 request, nor at ``content-length`` beyond C{int()}, so
L{requestHead} does, and answers 400 (or 431, for the same limits as HTTP/1.1) instead of forwarding:

 - ``:method`` must be a token, ``:scheme`` a URI scheme;
 - ``:path`` must be an absolute path (or ``*`` for OPTIONS): an absolute URL there would replace the
   authority, and a space or control character would split the upstream's request line;
 - the authority (``:authority``, else the one ``Host`` field) must be C{host[:port]}, and one of them
   must be there;
 - ``content-length`` values must be decimal, agree, and fit in 63 bits (L{rproxy.framing}).

(h2 joins the ``cookie`` crumbs of RFC 9113 section 8.2.3 into one field, as HTTP/1.1 requires.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rproxy.downstream.validation import authorityProblem, methodProblem, schemeProblem, targetProblem
from rproxy.errors import ProxyError, clientError
from rproxy.framing import MalformedBodyError, contentLength
from rproxy.headers import Pairs

#: What RFC 9113 section 4.3.1 counts for each field besides its name and value.
FIELD_OVERHEAD = 32


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
    """
    The request that the field block C{block} (as h2 decoded and checked it) asks for, or the error to
    answer it with.
    """
    pseudo: dict[bytes, bytes] = {}
    fields: Pairs = [(b"host", b"")]  # the authority goes first, once it is known
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    size = 0
    for field in block:
        name, value = field
        size += len(name) + len(value)
        if name[0] == 0x3A:  # ":", a pseudo-header field (h2 refused empty names)
            pseudo[name] = value
        elif name == b"host":
            hosts.append(value)
        else:
            if name == b"content-length":
                lengths.append(value)
            fields.append(field)
    if len(fields) - 1 + len(hosts) > limits.maxHeaders:
        return clientError(431, f"the request has more than {limits.maxHeaders} header fields")
    if size > limits.maxHeaderBytes:
        return clientError(431, f"the request header section exceeds {limits.maxHeaderBytes} bytes")
    if size + FIELD_OVERHEAD * len(block) > limits.maxHeaderListSize:
        return clientError(431, f"the request header list exceeds {limits.maxHeaderListSize} bytes")

    method = pseudo.get(b":method", b"")
    problem = methodProblem(method)
    scheme = pseudo.get(b":scheme")
    if problem is None and scheme is not None and scheme != b"https" and scheme != b"http":
        problem = schemeProblem(scheme)
    authority = pseudo.get(b":authority")
    if authority is None:
        if len(hosts) > 1:
            return clientError(400, "the request has more than one Host field")
        authority = hosts[0] if hosts else None
    if problem is None:
        if authority is None:
            problem = "the request has neither :authority nor Host"
        else:
            problem = authorityProblem(authority)
    target = pseudo.get(b":path")
    if target is None:  # a plain CONNECT, which names only an authority (refused later)
        target = authority or b""
    elif problem is None:
        problem = _pathProblem(method, target)
    if problem is not None:
        return clientError(400, problem)
    length = None
    if lengths:
        try:
            length = contentLength(lengths)
        except MalformedBodyError as e:
            return clientError(400, str(e))
    if authority is None:
        del fields[0]
    else:
        fields[0] = (b"host", authority)
    return H2RequestHead(method, target, fields, length, pseudo.get(b":protocol"))


def _pathProblem(method: bytes, path: bytes) -> str | None:
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return f"the :path {path[:100].decode('latin-1')!r} is not an absolute path"
    return targetProblem(path)
