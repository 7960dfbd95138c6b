"""
The filters of a configuration: their definitions (C{[filters.NAME]} tables and the command line's common
ones), which chain each service and route uses, and building them.

A definition names a filter kind (C{type}, an L{IFilterFactory}'s name) and its options.  A route's or
service's C{filters} list is its whole chain, in order; without one, a route uses its service's, and a
service the default chain: the command line's filters (C{--allow-ip}/C{--deny-ip}, C{--cors-origin},
C{--basic-auth}, C{--rate-limit}, C{--compress}, in that order), then the file's C{default-filters}.  One
definition is one filter object, shared by every chain that names it (a rate limit named twice is one set
of buckets), and kept across reloads while its definition does not change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import Clock

from rproxy.filters.chain import NO_FILTERS, FilterChain
from rproxy.filters.factory import filterFactories
from rproxy.interfaces import FilterEnvironment, IClosable, IFilterFactory

if TYPE_CHECKING:
    from rproxy.cluster.redis import RedisClient

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]*\Z")


def checkName(where: str, kind: str, name: str) -> None:
    """Raise C{ValueError} unless C{name} is a configuration's name of a C{kind} (filter, service, route)."""
    if not _NAME.match(name):
        raise ValueError(f"{where}: a {kind}'s name is letters, digits and . _ ~ : - (from a letter or digit)")


@dataclass(frozen=True)
class FilterConfig:
    """
    One filter definition.

    @ivar name: what chains call it.
    @ivar kind: its factory's name (the table's C{type}).
    @ivar options: the options for the factory (the table's other keys).
    @ivar where: where it was defined, for errors.
    """

    name: str
    kind: str
    options: Mapping[str, object] = field(default_factory=dict)
    where: str = field(default="", compare=False)


#: The command line's filters, in the order they run: (name, kind, options from the option values).
COMMAND_LINE_FILTERS = ("ip-rules", "cors", "basic-auth", "rate-limit", "compress")


def commandLineFilters(
    text: Callable[[str], str | None],
    repeated: Callable[[str], list[str]],
    flag: Callable[[str], bool],
    where: Callable[[str], str],
) -> list[FilterConfig]:
    """The filters the command-line options (or the file's top-level keys of the same names) define."""
    found = []
    allow, deny = repeated("allow-ip"), repeated("deny-ip")
    if allow or deny:
        networks = {"allow": allow, "deny": deny}
        found.append(FilterConfig("ip-rules", "ip-rules", networks, where("allow-ip" if allow else "deny-ip")))
    origins = repeated("cors-origin")
    if origins:
        found.append(FilterConfig("cors", "cors", {"origins": origins}, where("cors-origin")))
    htpasswd = text("basic-auth")
    if htpasswd is not None:
        found.append(FilterConfig("basic-auth", "basic-auth", {"htpasswd": htpasswd}, where("basic-auth")))
    rate, burst = text("rate-limit"), text("rate-limit-burst")
    if rate is not None:
        options: dict[str, object] = {"rate": rate}
        if burst is not None:
            options["burst"] = burst
        found.append(FilterConfig("rate-limit", "rate-limit", options, where("rate-limit")))
    elif burst is not None:
        raise ValueError(f"{where('rate-limit-burst')}: has no use without --rate-limit")
    if flag("compress"):
        found.append(FilterConfig("compress", "compress", {}, where("compress")))
    return found


def fileFilters(path: str, tables: Mapping[str, object]) -> list[FilterConfig]:
    """The definitions of a file's C{[filters.NAME]} tables."""
    found = []
    for name, table in tables.items():
        where = f"{path}: filters.{name}"
        checkName(where, "filter", name)
        if name in COMMAND_LINE_FILTERS:
            raise ValueError(f"{where}: {name!r} is the name of the command line's filter; choose another")
        if not isinstance(table, dict):
            raise ValueError(f"{where}: expected a table with type = KIND and the filter's options")
        options = {key.replace("_", "-"): value for key, value in table.items()}
        kind = options.pop("type", None)
        if not isinstance(kind, str):
            raise ValueError(f'{where}: give the filter\'s kind, type = "basic-auth" (see --list-filters)')
        found.append(FilterConfig(name, kind, options, where))
    return found


def filterNames(where: str, value: object, defined: Mapping[str, FilterConfig]) -> tuple[str, ...]:
    """A C{filters} list: names of defined filters, each at most once."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'{where}: expected a list of filter names, such as ["auth", "cors"], got {value!r}')
    for name in value:
        if name not in defined:
            known = ", ".join(sorted(defined)) or "none"
            raise ValueError(f"{where}: no filter named {name!r} (filters: {known})")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: a filter is listed twice: {value!r}")
    return tuple(value)


def checkFilters(definitions: Iterable[FilterConfig], base: str, redis: str | None = None) -> None:
    """
    Build each definition once, on a clock instead of the reactor (a factory starts no I/O as it builds),
    so that a kind nobody installed or a wrong option is an error of the configuration.  With C{redis}
    (C{--redis}'s URL), the filters are given a Redis client, which connects to nothing unless called.
    """
    factories = filterFactories()
    client = None
    if redis is not None:
        from rproxy.cluster.redis import RedisClient  # txredisapi: only with --redis

        client = RedisClient(redis, Clock())
    environment = FilterEnvironment(Clock(), base, client)
    for definition in definitions:
        _build(definition, factories, environment)


def _build(definition: FilterConfig, factories: Mapping[str, IFilterFactory], environment: FilterEnvironment) -> object:
    factory = factories.get(definition.kind)
    if factory is None:
        installed = ", ".join(sorted(factories)) or "none"
        raise ValueError(f"{definition.where}: unknown filter type {definition.kind!r} (installed: {installed})")
    try:
        return factory.build(definition.options, replace(environment, name=definition.name))
    except ValueError as e:
        raise ValueError(f"{definition.where}: {e}") from None


class FilterSet:
    """
    The filter objects of one configuration, by name, built on the reactor; L{rebuilt} keeps the objects
    whose definitions did not change (their state: buckets, caches, keys fetched).
    """

    def __init__(
        self,
        definitions: Mapping[str, FilterConfig],
        reactor: object,
        base: str = ".",
        redis: RedisClient | None = None,
    ) -> None:
        """
        @param redis: the process's Redis client (C{--redis}), which the set's and its rebuilt sets' filters
            may keep state in.
        """
        self.definitions = dict(definitions)
        self._environment = FilterEnvironment(reactor, base, redis)
        factories = filterFactories()
        self.filters = {name: _build(each, factories, self._environment) for name, each in self.definitions.items()}

    def rebuilt(self, definitions: Mapping[str, FilterConfig]) -> FilterSet:
        """The set of C{definitions}, sharing this one's objects for the definitions that did not change."""
        new = FilterSet.__new__(FilterSet)
        new.definitions = dict(definitions)
        new._environment = self._environment
        factories = filterFactories()
        new.filters = {
            name: self.filters[name]
            if self.definitions.get(name) == each
            else _build(each, factories, new._environment)
            for name, each in new.definitions.items()
        }
        return new

    def closeDropped(self, successor: FilterSet) -> None:
        """Close this set's filters that C{successor} (its L{rebuilt} set, now in force) does not keep."""
        kept = {id(each) for each in successor.filters.values()}
        self._close([each for each in self.filters.values() if id(each) not in kept])

    def close(self) -> Deferred[None]:
        """Close every filter that holds resources (L{IClosable}): the proxy is stopping."""
        return self._close(list(self.filters.values()))

    def _close(self, filters: list[object]) -> Deferred[None]:
        closing = [maybeDeferred(IClosable(each).close) for each in filters if IClosable.providedBy(each)]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def chain(self, names: Iterable[str]) -> FilterChain:
        """The chain of the filters C{names}, in order."""
        names = tuple(names)
        if not names:
            return NO_FILTERS
        return FilterChain((name, self.filters[name]) for name in names)


def configBase(path: str | None) -> str:
    """The directory a config file's relative paths are read from (the current one without a file)."""
    return os.path.dirname(os.path.abspath(path)) if path else "."
