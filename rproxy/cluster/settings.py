"""The settings of the cluster stores (C{--etcd}, C{--redis} and theirs), from the options."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from rproxy.app.config import OptionValues, secretFile
from rproxy.cluster.defaults import DEFAULT_ETCD_PREFIX, DEFAULT_REDIS_PREFIX, DEFAULT_STORE_TIMEOUT
from rproxy.cluster.tls import CAError, StoreTLS
from rproxy.upstream.tls import certificateFiles

#: A key prefix: printable ASCII, starting and ending with C{/}.
_PREFIX = re.compile(r"/(?:[!-~]*/)?\Z")


@dataclass(frozen=True)
class ClusterSettings:
    """
    Where the instances of one gateway share their state.

    @ivar etcd: the client URLs of the etcd v3 cluster (C{()}: registrations stay in this instance).
    @ivar etcdCredentials: the user name and password of etcd's authentication (C{--etcd-user},
        C{--etcd-password-file}), if it is enabled.
    @ivar prefix: the keys of this gateway in etcd start with it (several gateways may share one etcd).
    @ivar configKey: the etcd key (under C{prefix}) of the TOML document of services, routes and filters that
        every instance applies (C{None}: they come from the config file).
    @ivar redis: the Redis URL rate limits with C{store = "redis"} keep their buckets at (C{None}: none).
    @ivar redisPassword: the password of C{redis}, read from C{--redis-password-file} (never logged).
    @ivar etcdTLS: how to speak TLS to C{https://} etcd members.
    @ivar redisTLS: how to speak TLS to a C{rediss://} Redis.
    @ivar redisPrefix: what the keys of this gateway in Redis start with (several gateways may share one).
    @ivar timeout: seconds a store may take to answer a request before it counts as out of reach.
    """

    etcd: tuple[str, ...] = ()
    etcdCredentials: tuple[str, str] | None = field(default=None, repr=False)
    prefix: str = DEFAULT_ETCD_PREFIX
    configKey: str | None = None
    redis: str | None = None
    redisPassword: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_STORE_TIMEOUT
    etcdTLS: StoreTLS = field(default_factory=StoreTLS)
    redisTLS: StoreTLS = field(default_factory=StoreTLS)
    redisPrefix: str = DEFAULT_REDIS_PREFIX

    @property
    def shared(self) -> bool:
        """Whether the registrations are shared through etcd."""
        return bool(self.etcd)


def _etcdURL(values: OptionValues, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise values.error("etcd", f"expected an etcd client URL such as http://127.0.0.1:2379, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _redisURL(values: OptionValues) -> str | None:
    url = values.text("redis")
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is not None:  # the URL is not shown: it holds a secret
        raise values.error("redis", "put the password in --redis-password-file, not in the URL")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise values.error("redis", f"expected a URL such as redis://127.0.0.1:6379/0, got {url!r}")
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
        raise values.error("redis", f"the path is the database number, e.g. redis://127.0.0.1:6379/0, got {url!r}")
    return url


def _password(values: OptionValues, name: str, of: str) -> str | None:
    """The password in the file of option C{name} (the password C{of} what), as text."""
    password = secretFile(values, name, f"the password of {of}")
    if password is None:
        return None
    try:
        return password.decode("utf-8")
    except UnicodeDecodeError:
        raise values.error(name, f"{values.text(name)} is not UTF-8") from None


def _etcdCredentials(values: OptionValues, etcd: tuple[str, ...]) -> tuple[str, str] | None:
    user, password = values.text("etcd-user"), _password(values, "etcd-password-file", "--etcd-user")
    if (user is None) != (password is None):
        given = "etcd-user" if user is not None else "etcd-password-file"
        other = "--etcd-password-file" if user is not None else "--etcd-user"
        raise values.error(given, f"needs {other} too: etcd's authentication takes a user name and a password")
    if user is None or password is None:
        return None
    if not etcd:
        raise values.error("etcd-user", "has no use without --etcd")
    return user, password


def _storeTLS(values: OptionValues, store: str, used: bool, scheme: str) -> StoreTLS:
    """
    The TLS settings of C{--STORE-ca} and C{--STORE-client-cert}, their files read now to report a mistake
    now; C{used}: whether the store is reached over TLS (a C{scheme} URL).
    """
    ca, client = f"{store}-ca", f"{store}-client-cert"
    for name in (ca, client):
        if values.text(name) is not None and not used:
            raise values.error(name, f"has no use without a {scheme}:// --{store} URL")
    try:
        return StoreTLS.read(values.text(ca), *certificateFiles(values.text(client)))
    except CAError as e:
        raise values.error(ca, str(e)) from None
    except ValueError as e:
        raise values.error(client, str(e)) from None


def clusterSettings(values: OptionValues) -> ClusterSettings:
    """The settings that the options' C{values} give; raise L{ConfigError} naming the option at fault."""
    etcd = tuple(_etcdURL(values, url) for url in values.repeated("etcd"))
    prefix = str(values["etcd-prefix"])
    if not _PREFIX.match(prefix):
        raise values.error(
            "etcd-prefix", f"expected a key prefix such as /rproxy/ (starting and ending with /), got {prefix!r}"
        )
    configKey = values.text("etcd-config-key")
    if configKey is not None:
        if not etcd:
            raise values.error("etcd-config-key", "has no use without --etcd")
        if not re.fullmatch(r"[!-~]+", configKey) or configKey.startswith("/"):
            raise values.error(
                "etcd-config-key", f"expected a key name under --etcd-prefix, e.g. config, got {configKey!r}"
            )
    credentials = _etcdCredentials(values, etcd)
    redis, password = _redisURL(values), _password(values, "redis-password-file", "--redis")
    if password is not None and redis is None:
        raise values.error("redis-password-file", "has no use without --redis")
    try:
        timeout = float(str(values["store-timeout"]))
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and 0 < timeout <= 60):
        raise values.error("store-timeout", f"expected seconds above 0, at most 60, got {values['store-timeout']!r}")
    etcdTLS = _storeTLS(values, "etcd", any(urlsplit(url).scheme == "https" for url in etcd), "https")
    redisTLS = _storeTLS(values, "redis", redis is not None and urlsplit(redis).scheme == "rediss", "rediss")
    redisPrefix = str(values["redis-prefix"])
    if not re.fullmatch(r"[!-~]{1,64}", redisPrefix):
        raise values.error(
            "redis-prefix", f"expected 1 to 64 printable ASCII characters such as rproxy:, got {redisPrefix!r}"
        )
    if redisPrefix != DEFAULT_REDIS_PREFIX and redis is None:
        raise values.error("redis-prefix", "has no use without --redis")
    return ClusterSettings(
        etcd, credentials, prefix, configKey, redis, password, timeout, etcdTLS, redisTLS, redisPrefix
    )
