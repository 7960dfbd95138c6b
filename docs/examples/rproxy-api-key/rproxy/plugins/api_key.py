"""
api_key: an rproxy filter that lets through only requests carrying a known API key.

The key travels in a header (C{X-Api-Key} unless the C{header} option names another) and must be one of
the keys of a file (the C{keys-file} option, relative to the config file's directory), one per line, each
optionally behind a label (C{billing:3f9c...}); the label becomes the request's user for the filters
after this one.  The header is consumed: the upstream never sees it.

    [filters.keys]
    type = "api-key"
    keys-file = "api-keys.txt"

    [[routes]]
    path-prefix = "/api"
    service = "api"
    filters = ["keys"]

This module is a Twisted plugin: rproxy finds the module-level C{apiKey} object because it provides
L{IFilterFactory} and this file is installed in an C{rproxy/plugins/} directory on C{sys.path}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from zope.interface import implementer

from rproxy.errors import clientError
from rproxy.interfaces import FilterEnvironment, IFilterFactory, IRequestFilter
from rproxy.options import PluginOptions

if TYPE_CHECKING:
    from rproxy.proxy.message import FilterVerdict, RequestContext

#: The header the key travels in when the C{header} option is not given.
DEFAULT_HEADER = "X-Api-Key"

#: Shorter keys are too easy to guess: the keys file is refused.
MIN_KEY_LENGTH = 16

_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

#: A known key: the SHA-256 digest of the key, and its label (C{None} for a key without one).
KnownKey = tuple[bytes, str | None]


@implementer(IRequestFilter)
class ApiKey:
    """
    Answers 401 to a request without the key header, 403 to one whose key is not known, and lets the
    others through without the header, their key's label as C{context.user}.

    @ivar header: the header's name, as configured.
    @ivar consumes: the header's name as the chain removes it from the outbound request.
    @ivar keys: the known keys; only their digests are kept, so a memory dump does not give them away.
    """

    def __init__(self, keys: Sequence[KnownKey], header: str = DEFAULT_HEADER) -> None:
        self.header = header
        self.consumes = (header.lower().encode("ascii"),)
        self.keys = tuple(keys)
        self._challenge = [(b"WWW-Authenticate", b'ApiKey header="%s"' % header.encode("ascii"))]

    def onRequest(self, context: RequestContext) -> FilterVerdict:
        values = context.inbound.headers.getRawHeaders(self.consumes[0], [])
        if len(values) > 1:
            return clientError(400, f"more than one {self.header} header")
        presented = values[0].strip() if values else b""
        if not presented:
            return clientError(401, f"no API key: send it in the {self.header} header", self._challenge)
        digest = hashlib.sha256(presented).digest()
        matched = False
        label: str | None = None
        for known, knownLabel in self.keys:  # every one, matched or not: the time taken says nothing
            if hmac.compare_digest(digest, known):
                matched, label = True, knownLabel
        if not matched:
            return clientError(403, f"the {self.header} header holds no known API key")
        if label is not None:
            context.user = label
        return None


def readKeys(path: str, reader: PluginOptions) -> list[KnownKey]:
    """
    The keys of the file at C{path}: one per line, C{label:key} or C{key}, blank lines and C{#} comments
    skipped.  A key with a colon in it needs a label in front.  Errors name the option and the line, never
    a key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise reader.error("keys-file", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise reader.error("keys-file", f"{path} is not UTF-8 text") from None
    keys: dict[bytes, str | None] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, colon, key = line.partition(":")
        if not colon:
            label, key = "", line
        label, key = label.strip(), key.strip()
        if colon and not label:
            raise reader.error("keys-file", f"line {number}: nothing before the ':' (label:key)")
        if len(key) < MIN_KEY_LENGTH:
            raise reader.error("keys-file", f"line {number}: a key needs {MIN_KEY_LENGTH} characters or more")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        if digest in keys:
            raise reader.error("keys-file", f"line {number}: the same key as an earlier line")
        keys[digest] = label or None
    if not keys:
        raise reader.error("keys-file", f"{path} has no keys")
    return list(keys.items())


@implementer(IPlugin, IFilterFactory)
class ApiKeyFactory:
    """Builds L{ApiKey} from its options: C{keys-file} (required) and C{header}."""

    name = "api-key"
    description = "only requests whose X-Api-Key header holds a key of a file (options keys-file, header)"

    def build(self, options: Mapping[str, object], environment: FilterEnvironment) -> IRequestFilter:
        reader = PluginOptions("filter", self.name, options)
        header = reader.text("header", DEFAULT_HEADER) or ""
        keysFile = reader.text("keys-file")
        reader.finish()
        if not _FIELD_NAME.fullmatch(header):
            raise reader.error("header", f"not a header name: {header!r}")
        if not keysFile:
            raise reader.error("keys-file", "required: the file of API keys, one per line")
        return ApiKey(readKeys(os.path.join(environment.base, keysFile), reader), header)


apiKey = ApiKeyFactory()
