"""
The configuration model: one L{ProxyConfig}, however it was given (flags, environment, file).

Every source becomes command-line arguments for L{rproxy.tap.Options}, so there is one parser and one
set of error messages: the environment (``RPROXY_UPSTREAM=...``, for ``rproxy.tac``) and a TOML file
whose keys are the options' long names.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rproxy.health import PassivePolicy
from rproxy.healthcheck import HealthCheckSettings
from rproxy.retry import RetryPolicy
from rproxy.server import ClientLimits
from rproxy.upstream.pool import PoolSettings

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parseSize(text: str) -> int:
    """Parse C{"1024"}, C{"64k"}, C{"10M"}, C{"1GiB"} (powers of 1024) into bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 512k, 10M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class ProxyConfig:
    """
    Everything a running rproxy is built from.

    @ivar listen: server endpoint strings (C{tcp:8080}, C{ssl:443:...}, C{systemd:domain=INET:index=0}).
    @ivar upstreams: upstream URLs (each may end in C{#weight=N}), balanced by C{balancer}.
    @ivar balancerOptions: options for the balancer's factory.
    @ivar accessLog: C{None} for none, C{"-"} for the Twisted log, or a file path.
    @ivar demoUpstream: an endpoint on which to also serve the built-in demo upstream.
    @ivar healthCheck: the active health checks of the upstreams, or C{None} for none.
    """

    listen: tuple[str, ...] = ("tcp:8080",)
    upstreams: tuple[str, ...] = ()
    balancer: str = "round_robin"
    balancerOptions: Mapping[str, str] = field(default_factory=dict)
    rewriteHost: bool = False
    trustedProxies: tuple[str, ...] = ()
    viaName: str = "rproxy"
    grace: float = 30.0
    accessLog: str | None = "-"
    demoUpstream: str | None = None
    pool: PoolSettings = field(default_factory=PoolSettings)
    client: ClientLimits = field(default_factory=ClientLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    passive: PassivePolicy = field(default_factory=PassivePolicy)
    healthCheck: HealthCheckSettings | None = None


def argumentsFromMapping(settings: Mapping[str, object], where: str, known: Iterable[str]) -> list[str]:
    """
    Command-line arguments equivalent to C{settings} (option long name -> value), as read from a
    TOML file: a list repeats the option, C{true} sets a flag, C{false} leaves it unset.  A key that
    is not one of the C{known} option names is an error naming C{where} and the key.
    """
    knownNames = set(known)
    arguments: list[str] = []
    for key, value in settings.items():
        if key.replace("_", "-") not in knownNames:
            raise ValueError(f"{where}: unknown key {key!r} (see docs/options.md)")
        option = "--" + key.replace("_", "-")
        values: Iterable[object] = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool):
                if item:
                    arguments.append(option)
            elif isinstance(item, str | int | float):
                arguments += [option, str(item)]
            else:
                raise ValueError(f"{where}: {key}: expected a string, number, boolean or list, got {item!r}")
    return arguments


def argumentsFromFile(path: str, known: Iterable[str]) -> list[str]:
    """Command-line arguments from a TOML settings file; errors name the file and the key."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    return argumentsFromMapping(settings, path, known)


def argumentsFromEnvironment(environ: Mapping[str, str], names: Iterable[str], flags: Iterable[str]) -> list[str]:
    """
    Command-line arguments from ``RPROXY_<OPTION>`` variables (``RPROXY_CONNECT_TIMEOUT=3``); the
    repeatable options take whitespace-separated lists (``RPROXY_UPSTREAM="http://a http://b"``), a
    flag is set by ``1``, ``true`` or ``yes``.
    """
    arguments: list[str] = []
    for name in flags:
        value = environ.get("RPROXY_" + name.upper().replace("-", "_"))
        if value is not None and value.strip().lower() in ("1", "true", "yes"):
            arguments.append("--" + name)
    for name in names:
        value = environ.get("RPROXY_" + name.upper().replace("-", "_"))
        if value is None:
            continue
        for item in value.split() if name in REPEATABLE else [value]:
            arguments += ["--" + name, item]
    return arguments


#: The options that may be given more than once.
REPEATABLE = frozenset({"listen", "upstream", "trusted-proxy", "balancer-option"})
