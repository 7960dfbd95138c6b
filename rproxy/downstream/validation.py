"""
What a well-formed request head is, whichever protocol carried it (RFC 9110, RFC 9112 section 3, RFC 9113
section 8.3).

A request becomes bytes of an HTTP/1.1 request line and ``Host`` field on its way upstream, so anything
that would read differently there is refused first: a method that is not a token, a target holding a
space or a control character, an authority that is not C{host[:port]}.  Each check returns C{None} for
a well-formed value, else the one-line reason for the 400.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from rproxy.headers import isToken

#: C{host [":" port]} (RFC 3986 section 3.2.2): a reg-name or IPv4 address, or an IP literal in brackets;
#: no userinfo (RFC 9110 section 4.2.4 and RFC 9113 section 8.3.1 forbid it).
_AUTHORITY = re.compile(rb"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*|\[([0-9A-Fa-f:.]+)\])(?::[0-9]{0,5})?")
#: A URI scheme (RFC 3986 section 3.1).
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*")
#: What a request-target may not hold anywhere: whitespace, control characters and DEL.
_TARGET_FORBIDDEN = bytes([*range(0x21), 0x7F])


def methodProblem(method: bytes) -> str | None:
    """Why C{method} is not a valid method (it must be a token), or C{None}."""
    if isToken(method):
        return None
    return f"invalid method {method[:40].decode('latin-1')!r}"


def targetProblem(target: bytes) -> str | None:
    """Why a request-target holds what no request-target may (whitespace, controls), or C{None}."""
    if not target:
        return "empty request target"
    if len(target.translate(None, _TARGET_FORBIDDEN)) != len(target):
        return "the request target holds a space or a control character"
    return None


@functools.lru_cache(maxsize=1024)  # a client sends the same Host on every request
def authorityProblem(authority: bytes) -> str | None:
    """
    Why C{authority} (a ``Host`` value or ``:authority``) is not C{host[:port]}, or C{None}.  An empty one
    is refused too: an ``http`` or ``https`` URI has a host (RFC 9110 section 4.2), and an upstream would
    route an empty one to its default site.
    """
    if not authority:
        return "empty host"
    match = _AUTHORITY.fullmatch(authority)
    if match is not None:
        literal = match.group(1)
        if literal is None:
            return None
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            pass
        else:
            return None
    return f"invalid host {authority[:100].decode('latin-1')!r}"


def schemeProblem(scheme: bytes) -> str | None:
    """Why C{scheme} (``:scheme``) is not a URI scheme, or C{None}."""
    if _SCHEME.fullmatch(scheme):
        return None
    return f"invalid :scheme {scheme[:40].decode('latin-1')!r}"
