"""
The C{local} target of a route (C{[[routes]]} with C{local = {...}}): L{LocalConfig}, read from the file and
built into the L{rproxy.proxy.service.Service} whose C{local} answers the route's requests.

Three kinds, told apart by their key: C{static} (a directory), C{handler} (a dotted path), C{status} or
C{body} (a canned response).  Everything is checked when the file is read (the directory exists, the handler
imports), so that C{--check-config} and a reload refuse a mistake with the key that holds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from rproxy.filters.chain import FilterChain
from rproxy.headers import FRAMING, HOP_BY_HOP, isToken
from rproxy.interfaces import ILocalAnswer
from rproxy.local.canned import CannedAnswer
from rproxy.local.handlers import handlerAnswer
from rproxy.local.static import StaticDirectory
from rproxy.options import PluginOptions
from rproxy.proxy.balancers import FirstAvailable
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.service import Service

#: The keys of each kind of C{local} table.
STATIC_KEYS = frozenset({"static", "index", "listing", "hidden", "cache-control"})
HANDLER_KEYS = frozenset({"handler", "max-body"})
CANNED_KEYS = frozenset({"status", "body", "headers"})

#: The largest request body a handler gets, by default.
DEFAULT_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class LocalConfig:
    """
    A route's C{local} table, checked.

    @ivar kind: C{"static"}, C{"handler"} or C{"canned"}.
    @ivar options: the table (its keys with C{-}), as given.
    @ivar base: the directory a relative C{static} path is read from (the config file's).
    """

    kind: str
    options: Mapping[str, object] = field(default_factory=dict)
    base: str = "."

    def serviceNames(self, defined: Mapping[str, Service]) -> tuple[str, ...]:
        """None: a local route sends requests to no service."""
        return ()

    def describe(self) -> str:
        """The target in a few words, for a reload's summary."""
        shown = {"static": "static", "handler": "handler", "canned": "status"}[self.kind]
        return f"local {self.kind} {self.options.get(shown, 200)}"

    def answer(self) -> ILocalAnswer:
        """
        What answers the route's requests.

        @raise ValueError: naming the key at fault.
        """
        reader = PluginOptions("local", self.kind, self.options)
        answer: ILocalAnswer
        if self.kind == "static":
            root = os.path.join(self.base, reader.text("static") or "")
            if not os.path.isdir(root):
                raise reader.error("static", f"no directory {root!r}")
            index = reader.strings("index", ("index.html",))
            if any("/" in name or name in ("", ".", "..") for name in index):
                raise reader.error("index", f"expected file names, got {list(index)!r}")
            cache = reader.text("cache-control")
            fields = [] if cache is None else [(b"Cache-Control", _value(reader, "cache-control", cache))]
            listing, hidden = reader.flag("listing", False), reader.flag("hidden", False)
            answer = StaticDirectory(root, index, listing, hidden, fields)
        elif self.kind == "handler":
            maxBody = reader.size("max-body", DEFAULT_MAX_BODY)
            try:
                answer = handlerAnswer(reader.text("handler") or "", maxBody, self.base)
            except ValueError as e:
                raise reader.error("handler", str(e)) from None
        else:
            status = reader.integer("status", 200, minimum=200)
            assert status is not None
            if status > 599:
                raise reader.error("status", f"expected 200 to 599, got {status}")
            body = (reader.text("body") or "").encode("utf-8")
            headers = reader.table("headers")
            fields = []
            for name, value in headers.items():
                if not isToken(name.encode("ascii", "replace")) or name.lower().encode() in HOP_BY_HOP | FRAMING:
                    raise reader.error("headers", f"{name!r} is not a field a response may be given")
                if not isinstance(value, str):
                    raise reader.error("headers", f"{name}: expected a string, got {value!r}")
                fields.append((name.encode("ascii"), _value(reader, "headers", value)))
            answer = CannedAnswer(status, fields, body)
        reader.finish()
        return answer

    def build(self, name: str, chain: FilterChain) -> Service:
        """The service of a route named C{name} (C{local} when unnamed), its filters C{chain}."""
        registry = MemoryRegistry()
        return Service(name or "local", registry, FirstAvailable(), filters=chain, route=name, local=self.answer())


def _value(reader: PluginOptions, name: str, value: str) -> bytes:
    """A field value from C{value}: visible ASCII, spaces and tabs."""
    if not all(" " <= c <= "~" or c == "\t" for c in value):
        raise reader.error(name, f"{value!r} has characters a field value cannot carry")
    return value.encode("ascii")


def localConfig(table: Mapping[str, object], base: str) -> LocalConfig:
    """
    The L{LocalConfig} of a route's C{local} table, checked by building its answer.

    @raise ValueError: naming the key at fault.
    """
    options = {key.replace("_", "-"): value for key, value in table.items()}
    kinds = [kind for kind, key in (("static", "static"), ("handler", "handler")) if key in options]
    if "status" in options or "body" in options:
        kinds.append("canned")
    if len(kinds) != 1:
        raise ValueError("expected one of static = DIRECTORY, handler = 'package.module:name', or status and body")
    config = LocalConfig(kinds[0], options, base)
    config.answer()
    return config
