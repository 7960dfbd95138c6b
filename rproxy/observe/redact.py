"""
Secrets taken out of what the access log writes: header values and query parameters.

A log is read by more people, kept longer and copied to more places than the requests it records, so a
credential in it is a leak.  L{redactHeaders} replaces the values of the fields that carry credentials
(C{Authorization}, C{Proxy-Authorization}, C{Cookie}, C{Set-Cookie}, and the names configured) with
C{[redacted]}.  Of an C{Authorization} or C{Proxy-Authorization} value it keeps the scheme word when it
is C{Basic} or C{Bearer} (C{Bearer [redacted]}): which kind of credential a client sent helps in
reading a log, and those two words are known not to be secret.  Any other value is replaced whole,
since a value without a known scheme word may be nothing but a token.

L{redactTarget} replaces the values of the query parameters that carry credentials (C{access_token},
C{token}, C{key}, C{signature}, C{password}, and the names configured) with C{[redacted]}, and touches
nothing else: the bytes go in and come out as the client sent them, never decoded and encoded again.  A
parameter's name is compared case-insensitively and percent-decoded (C{acc%65ss_token} is
C{access_token} to the application that reads it), and so is each part of a bracketed name, as Rails
and PHP read forms (C{user[password]}, C{token[]}).  Parameters are separated by C{&} and by C{;} (which
some servers take as C{&}); the fragment, which clients should not send but C{/cb#access_token=...} can
carry an OAuth token, is read as parameters too.  Parameters of a path segment (C{/a;jsessionid=x/b})
are not looked at.

Both are meant for the hot path: a target without C{?} or C{#} costs two C{find}s, a query that
mentions no secret name (nor a C{%}) one regular expression search, and a target without a secret is
returned as it came.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

from rproxy.headers import Pairs

__all__ = ["REDACTED", "SECRET_HEADERS", "SECRET_PARAMS", "redactHeaders", "redactTarget", "secretNames"]

#: What a secret is replaced with.
REDACTED = b"[redacted]"

#: The header fields whose values are always redacted (lower case).
SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})

#: The query parameters whose values are always redacted (lower case).
SECRET_PARAMS = frozenset({b"access_token", b"token", b"key", b"signature", b"password"})

#: The fields whose scheme word is kept, and the scheme words kept (lower case).
_CREDENTIALS = frozenset({b"authorization", b"proxy-authorization"})
_SCHEMES = frozenset({b"basic", b"bearer"})

#: A query's separators, kept by the split.
_SEPARATOR = re.compile(rb"([&;#])")


def secretNames(defaults: frozenset[bytes], configured: Iterable[str]) -> frozenset[bytes]:
    """
    C{defaults} and the C{configured} names, lower case: what L{redactHeaders} or L{redactTarget} takes.

    @param defaults: L{SECRET_HEADERS} or L{SECRET_PARAMS}.
    @param configured: more names, as the configuration spells them (encoded as UTF-8, as a percent-encoded
        parameter name decodes).
    """
    return defaults | {name.encode("utf-8").lower() for name in configured}


def redactHeaders(pairs: Iterable[tuple[bytes, bytes]], names: frozenset[bytes] = SECRET_HEADERS) -> Pairs:
    """
    C{pairs} (name, value), the value of each field named in C{names} replaced (see the module's docstring).

    @param names: the lower-case field names to redact (L{secretNames} builds them).
    """
    return [(name, _redactedValue(name, value)) if name.lower() in names else (name, value) for name, value in pairs]


def _redactedValue(name: bytes, value: bytes) -> bytes:
    if name.lower() in _CREDENTIALS:
        scheme = value.partition(b" ")[0]
        if scheme.lower() in _SCHEMES:
            return scheme + b" " + REDACTED
    return REDACTED


def redactTarget(target: bytes, params: frozenset[bytes] = SECRET_PARAMS) -> bytes:
    """
    C{target} with the value of each query (or fragment) parameter named in C{params} replaced (see the
    module's docstring); C{target} itself when it holds none.

    @param params: the lower-case parameter names to redact (L{secretNames} builds them).
    """
    start = target.find(b"?")
    if start < 0:
        start = target.find(b"#")
        if start < 0:
            return target
    query = target[start + 1 :]
    if _mentions(params).search(query.lower()) is None:
        return target
    parts = _SEPARATOR.split(query)
    changed = False
    for i in range(0, len(parts), 2):  # parameters at even indexes, separators at odd ones
        name, equals, value = parts[i].partition(b"=")
        if equals and _secret(name, params):
            parts[i] = name + b"=" + REDACTED
            changed = True
    return target[: start + 1] + b"".join(parts) if changed else target


@functools.lru_cache(maxsize=16)  # one set of names per configuration
def _mentions(params: frozenset[bytes]) -> re.Pattern[bytes]:
    """
    What a lower-cased query holding a parameter of C{params} must hold: one of the names, or a C{%} that
    may encode one.  Most queries hold neither, and are then not split at all.  (Searching the lower-cased
    query is four times faster than a case-insensitive search.)
    """
    return re.compile(b"|".join([*map(re.escape, sorted(params)), b"%"]))


def _secret(name: bytes, params: frozenset[bytes]) -> bool:
    """Whether a parameter named C{name} (as sent) is one of C{params}, or one of its bracketed parts is."""
    if b"%" in name:
        name = unquote_to_bytes(name)
    name = name.lower()
    if name in params:
        return True
    return b"[" in name and any(key.rstrip(b"]") in params for key in name.split(b"["))
