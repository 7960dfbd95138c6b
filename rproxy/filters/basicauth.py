"""
HTTP Basic authentication (RFC 7617) against an htpasswd file: the C{basic-auth} filter.

The file is the one Apache's C{htpasswd} writes, so operators keep their tooling: bcrypt (C{$2y$}), APR1
MD5 (C{$apr1$}), C{{SHA}}, SHA-256/512 crypt (C{$5$}, C{$6$}) and traditional crypt, verified by passlib.
Plain-text entries, which C{htpasswd -p} can write, are refused: a hash that passlib cannot identify makes
the whole file malformed rather than a password anyone could read.

A request without usable Basic credentials gets 401 with a challenge; credentials that are present but
wrong get 403.  Three things keep the check cheap and quiet:

 - an unknown user name is checked against a dummy hash of the file's usual scheme and cost, so the time
   an answer takes does not tell whether the user exists;
 - good credentials are remembered (a keyed digest of them, never the password) for as long as the user's
   hash stays the same, so a client sending them on every request costs one bcrypt, not one per request;
 - under a real reactor the hash is checked in the reactor's thread pool, a few at a time per filter, so a
   flood of wrong passwords neither stalls the reactor nor starves its other users of threads.

The file is read again when it changes (checked at most once a second); a file that becomes unreadable or
malformed leaves the users read before in place, with one warning.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from hashlib import blake2b
from typing import cast

from passlib.context import CryptContext
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.errors import clientError, proxyError
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, RequestContext

_log = Logger()

#: The passlib schemes of the hashes C{htpasswd} writes (C{-B}, C{-5}/C{-2}, C{-m}, C{-s}, C{-d}); not plain text.
SCHEMES = ("bcrypt", "sha256_crypt", "sha512_crypt", "apr_md5_crypt", "ldap_sha1", "des_crypt")
_HASHES = CryptContext(schemes=list(SCHEMES))

#: The longest C{Authorization} value read (anything longer is refused, not decoded).
MAX_AUTHORIZATION = 8 * 1024
#: Seconds between two looks at the htpasswd file's size and modification time.
RELOAD_INTERVAL = 1.0
#: Password checks one filter runs in the reactor's thread pool at once; beyond that, 503.
MAX_CHECKING = 4

#: bcrypt reads the first 72 bytes of a password (as Apache's htpasswd does); the bcrypt module refuses more.
_BCRYPT_LENGTH = 72
#: The setting of the dummy hash of a file without users (no user to tell apart, so the cheapest will do).
_NO_USERS = ("ldap_sha1", None)
#: RFC 7617: neither user-id nor password contains a control character.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_REALM = re.compile(r"[ !#-\[\]-~]+")  # printable ASCII but the quote and the backslash

Setting = tuple[str, int | None]


def parseHtpasswd(data: bytes) -> dict[str, str]:
    """
    The users of an htpasswd file and their hashes.

    Lines are C{user:hash}, with anything after a second colon ignored (as Apache does); blank lines and
    lines starting with C{#} are skipped.

    @raise ValueError: naming the first bad line (not UTF-8, no colon, a user listed twice, a hash in no
        supported format); the message never holds a hash.
    """
    users: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"line {number} is not UTF-8") from None
        if not text or text.startswith("#"):
            continue
        user, colon, rest = text.partition(":")
        if not colon or not user:
            raise ValueError(f"line {number} is not user:hash")
        if user in users:
            raise ValueError(f"line {number}: user {user!r} is already on line {lines[user]}")
        hashed = rest.split(":", 1)[0]
        if not _isHash(hashed):
            raise ValueError(
                f"line {number}: the hash of user {user!r} is in no supported format (bcrypt, apr1, {{SHA}}, "
                "SHA-256/512 crypt, crypt)"
            )
        users[user] = hashed
        lines[user] = number
    return users


def _isHash(hashed: str) -> bool:
    scheme = _HASHES.identify(hashed)
    if scheme is None:
        return False
    try:
        return bool(_HASHES.handler(scheme).from_string(hashed).checksum)
    except ValueError:
        return False


def hashSetting(hashed: str) -> Setting:
    """The scheme and cost (C{rounds}, if the scheme has one) of a hash L{parseHtpasswd} accepted."""
    handler = _HASHES.handler(_HASHES.identify(hashed))
    return handler.name, getattr(handler.from_string(hashed), "rounds", None)


def typicalSetting(hashes: Mapping[str, str]) -> Setting:
    """The most common scheme and cost among C{hashes} (the values of L{parseHtpasswd}'s result)."""
    counts = Counter(hashSetting(hashed) for hashed in hashes.values())
    return counts.most_common(1)[0][0] if counts else _NO_USERS


def dummyHash(setting: Setting) -> str:
    """A hash of a random password with C{setting}: checking a password against it costs what a user's does."""
    scheme, rounds = setting
    handler = _HASHES.handler(scheme)
    if rounds is not None:
        handler = handler.using(rounds=rounds)
    return cast(str, handler.hash(secrets.token_urlsafe(24)))


def checkPassword(password: bytes, hashed: str) -> bool:
    """
    Whether C{password} matches C{hashed}; C{False} too for a password the scheme cannot take (a bcrypt
    hash is checked against the first 72 bytes, as Apache's htpasswd made it).
    """
    if hashed.startswith("$2"):
        password = password[:_BCRYPT_LENGTH]
    try:
        return bool(_HASHES.verify(password, hashed))
    except (ValueError, TypeError):
        return False


class CredentialCache:
    """
    Credentials checked lately, least recently used dropped first: a keyed digest of the C{Authorization}
    value that carried them (the key is random and never leaves the process) to the user and the hash they
    matched.  A repeated credential is known by one digest, without decoding it again.

    @ivar size: how many it keeps (0: none).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def digest(self, value: bytes) -> bytes:
        """The digest the credentials of an C{Authorization} C{value} are known by."""
        return blake2b(value, key=self._key, digest_size=32).digest()

    def user(self, digest: bytes, users: Mapping[str, str]) -> str | None:
        """The user whose credentials C{digest} are, if they matched the hash C{users} gives that user now."""
        entry = self._entries.get(digest)
        if entry is None or users.get(entry[0]) != entry[1]:
            return None
        self._entries.move_to_end(digest)
        return entry[0]

    def add(self, digest: bytes, user: str, hashed: str) -> None:
        """Remember that the credentials of C{digest} are C{user}'s and match C{hashed}."""
        if not self.size:
            return
        self._entries[digest] = (user, hashed)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class CredentialsError(ValueError):
    """Why an C{Authorization} field gives no usable Basic credentials (its message, for the 401's reason)."""


def basicCredentials(values: Sequence[bytes] | None) -> tuple[str, bytes, bytes]:
    """
    The user name, password and decoded C{user:password} of the C{Authorization} field C{values}.

    @raise CredentialsError: saying why there are none.
    """
    if not values:
        raise CredentialsError("credentials missing")
    if len(values) > 1:
        raise CredentialsError("more than one Authorization field")
    value = values[0]
    if len(value) > MAX_AUTHORIZATION:
        raise CredentialsError(f"Authorization is over {MAX_AUTHORIZATION // 1024} KiB")
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise CredentialsError("Authorization is not Basic")
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except binascii.Error:
        raise CredentialsError("malformed Basic credentials: not base64") from None
    rawUser, colon, password = decoded.partition(b":")
    if not colon:
        raise CredentialsError("malformed Basic credentials: no colon between user name and password")
    try:
        user = rawUser.decode("utf-8")
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError("malformed Basic credentials: not UTF-8") from None
    if not user:
        raise CredentialsError("malformed Basic credentials: no user name")
    if _CONTROL.search(user) or _CONTROL.search(text):
        raise CredentialsError("malformed Basic credentials: a control character")
    return user, password, decoded


def _quoted(user: str) -> str:
    """C{user} for a reason, if it is short and plain enough to show; else nothing."""
    if len(user) <= 64 and user.isprintable() and "'" not in user and "\\" not in user:
        return f" (user '{user}')"
    return ""


@implementer(IRequestFilter)
class BasicAuth:
    """
    The C{basic-auth} filter: lets through the requests whose Basic credentials match a user of an
    htpasswd file, with C{context.user} set to the user name.

    @ivar path: the htpasswd file.
    @ivar realm: the protection space named in the challenge and in reasons.
    @ivar consumes: C{authorization}, unless the credentials are forwarded to the upstream.
    @ivar users: the users and hashes in force (those of the last good reading of the file).
    @ivar cache: the credentials that matched lately.
    """

    def __init__(
        self,
        path: str,
        reactor: object,
        realm: str = "rproxy",
        forwardCredentials: bool = False,
        cacheSize: int = 1024,
        reload: bool = True,
    ) -> None:
        """
        Read C{path} (C{reactor} gives the time, and threads if it has them).

        @raise OSError: if the file cannot be read.
        @raise ValueError: if it is malformed (see L{parseHtpasswd}).
        """
        self.path = path
        self.realm = realm
        self.consumes = frozenset() if forwardCredentials else frozenset({b"authorization"})
        self.cache = CredentialCache(cacheSize)
        self.users: Mapping[str, str] = {}
        self._clock = cast(IReactorTime, reactor)
        self._threads = cast(IReactorThreads, reactor) if IReactorThreads.providedBy(reactor) else None
        self._reload = reload
        self._challenge = [(b"WWW-Authenticate", b'Basic realm="%s", charset="UTF-8"' % realm.encode("ascii"))]
        self._dummies: dict[Setting, str] = {}
        self._dummy = ""
        self._signature: tuple[int, int, int] | None = None
        self._broken = False
        self._checking = 0
        self._read()
        self._nextLook = self._clock.seconds() + RELOAD_INTERVAL

    def __repr__(self) -> str:
        return f"<BasicAuth {self.path!r} realm={self.realm!r} users={len(self.users)}>"

    def onRequest(self, context: RequestContext) -> FilterVerdict | Deferred[FilterVerdict]:
        values = context.inbound.headers.getRawHeaders(b"authorization")
        self._lookAtFile()
        if values is not None and len(values) == 1:  # the usual case: credentials seen before
            known = self.cache.user(self.cache.digest(values[0]), self.users)
            if known is not None:
                context.user = known
                return None
        try:
            user, password, _ = basicCredentials(values)
        except CredentialsError as e:
            return clientError(401, str(e), self._challenge)
        digest = self.cache.digest(values[0])  # type: ignore[index]  # basicCredentials took one value
        hashed = self.users.get(user)
        checked = hashed if hashed is not None else self._dummy  # as long for a user that does not exist

        def decide(good: bool) -> FilterVerdict:
            if not (good and hashed is not None):
                return clientError(403, f"wrong user name or password for realm '{self.realm}'{_quoted(user)}")
            self.cache.add(digest, user, hashed)
            context.user = user
            return None

        if self._threads is None:
            return decide(checkPassword(password, checked))
        if self._checking >= MAX_CHECKING:
            return proxyError(
                503, f"too many password checks in progress ({MAX_CHECKING} at once)", "proxy_internal_error", 1
            )
        return self._inThread(checkPassword, password, checked).addCallback(decide)

    def _inThread(self, check: Callable[[bytes, str], bool], password: bytes, hashed: str) -> Deferred[bool]:
        """
        C{check(password, hashed)} in the reactor's thread pool.  The Deferred has no canceller: when the
        client leaves, the check still runs to its end, and counts as running until then.
        """
        threads = cast(IReactorThreads, self._threads)
        result: Deferred[bool] = Deferred()

        def finished(succeeded: bool, outcome: object) -> None:
            self._checking -= 1
            if succeeded:
                result.callback(cast(bool, outcome))
            else:
                result.errback(cast(Failure, outcome))

        self._checking += 1
        threads.getThreadPool().callInThreadWithCallback(
            lambda succeeded, outcome: threads.callFromThread(finished, succeeded, outcome), check, password, hashed
        )
        return result

    def _lookAtFile(self) -> None:
        """Read the file again if it changed since it was last read (looking at most once a second)."""
        if not self._reload:
            return
        now = self._clock.seconds()
        if now < self._nextLook:
            return
        self._nextLook = now + RELOAD_INTERVAL
        try:
            info = os.stat(self.path)
            if (info.st_ino, info.st_size, info.st_mtime_ns) == self._signature:
                return
            self._read()
        except (OSError, ValueError) as e:
            if not self._broken:
                _log.warn(
                    "basic-auth: cannot use {path} ({problem}); keeping the {count} users read before",
                    path=self.path,
                    problem=e.strerror if isinstance(e, OSError) else str(e),
                    count=len(self.users),
                )
            self._broken = True
            return
        self._broken = False
        _log.info("basic-auth: read {count} users from {path}", path=self.path, count=len(self.users))

    def _read(self) -> None:
        """Read the file; the users change only if it is good (a bad file is not read again until it changes)."""
        with open(self.path, "rb") as f:
            info = os.fstat(f.fileno())
            self._signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            data = f.read()
        users = parseHtpasswd(data)
        setting = typicalSetting(users)
        if setting not in self._dummies:
            self._dummies[setting] = dummyHash(setting)
        self.users = users
        self._dummy = self._dummies[setting]


def buildBasicAuth(options: PluginOptions, environment: FilterEnvironment) -> BasicAuth:
    """A L{BasicAuth} from the options of a C{[filters.X]} table with C{type = "basic-auth"}."""
    path = options.text("htpasswd")
    if not path:
        raise options.error("htpasswd", "required: the path of an htpasswd file")
    path = os.path.normpath(os.path.join(environment.base, path))
    realm = cast(str, options.text("realm", "rproxy"))
    if not _REALM.fullmatch(realm):
        raise options.error("realm", f"expected printable ASCII without quotes or backslashes, got {realm!r}")
    forward = options.flag("forward-credentials", False)
    cacheSize = cast(int, options.integer("cache-size", 1024))
    reload = options.flag("reload", True)
    try:
        return BasicAuth(path, environment.reactor, realm, forward, cacheSize, reload)
    except OSError as e:
        raise options.error("htpasswd", f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise options.error("htpasswd", f"{path}: {e}") from None
