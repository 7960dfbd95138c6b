"""
The C{basic-auth} filter (L{rproxy.filters.basicauth}): every hash format htpasswd writes, malformed
credentials, the dummy check for unknown users, the credential cache, reloading the file, the thread pool
bound; and through a real proxy with curl as the client.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import bcrypt
from passlib.hash import apr_md5_crypt, des_crypt, ldap_sha1, sha256_crypt, sha512_crypt
from passlib.hash import bcrypt as passlibBcrypt
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorThreads
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.errors import ProxyError
from rproxy.filters import basicauth
from rproxy.filters.basicauth import BasicAuth, checkPassword, hashSetting
from rproxy.interfaces import FilterEnvironment
from rproxy.plugins.filters import basicAuth
from rproxy.test.support import LogCapture, ScriptedUpstream, curl, startProxy, useFilters
from rproxy.test.test_conformance import answer, deferredTest
from rproxy.testing import Clock, FilterResult, inboundRequest, runFilters, verifyFilterFactory

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHALLENGE = (b"WWW-Authenticate", b'Basic realm="rproxy", charset="UTF-8"')

#: Lines Apache's htpasswd 2.4 wrote (-m, -s, -B -C 5, -2, -5, -d), with the passwords they were made from.
APACHE_LINES = {
    "alice": ("apr1-secret", "$apr1$USoqLgV/$ceGszexk./jSOE2uat6sU0"),
    "bob": ("sha-secret", "{SHA}KkPcK3XYeA35EhWhKYmaCyAgadY="),
    "carol": ("bcrypt-secret", "$2y$05$LzyZf6KWAAd17psi9PvgkeiEGSDijLHN9gk44DlCCs6hvYk6mcDQm"),
    "dave": ("sha256-secret", "$5$kP60iQ22s8tETepB$g..TDNhrbdaW.e6.nbcoRv/tHBxQi20cGFzDmCICz97"),
    "erin": (
        "sha512-secret",
        "$6$veIf.2LdinI0zRcg$kr9M/u32X596y5HqZzWLNS0peSBPtDd6OLaF19sun7cea8DlB.Gbu7AcX7JiH57O2mONbUQeI1c/R1lUMLsn2.",
    ),
    "frank": ("crypt-se", "p4xK4rqO/Y0LU"),
}

#: The cheapest bcrypt, for tests that do not care about the scheme.
fastBcrypt = passlibBcrypt.using(rounds=4, ident="2y")


def basic(user: bytes | str, password: bytes | str) -> tuple[bytes, bytes]:
    """An C{Authorization} field with Basic credentials."""
    raw = (user.encode() if isinstance(user, str) else user) + b":"
    raw += password.encode() if isinstance(password, str) else password
    return (b"authorization", b"Basic " + base64.b64encode(raw))


def htpasswd(testCase: unittest.TestCase, users: dict[str, str] | bytes, path: str | None = None) -> str:
    """Write an htpasswd file of C{users} (name to hash, or the file's bytes) and return its path."""
    if path is None:
        path = testCase.mktemp()
    data = users if isinstance(users, bytes) else b"".join(f"{u}:{h}\n".encode() for u, h in users.items())
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)  # a new file (inode) whatever the clock's resolution
    return path


def build(path: str, reactor: object = None, **options: object) -> BasicAuth:
    environment = FilterEnvironment(Clock() if reactor is None else reactor)
    built = basicAuth.build({"htpasswd": path, **options}, environment)
    assert isinstance(built, BasicAuth)
    return built


class Counted:
    """L{checkPassword} with its calls recorded (patched into the module by L{countChecks})."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str]] = []

    def __call__(self, password: bytes, hashed: str) -> bool:
        self.calls.append((password, hashed))
        return checkPassword(password, hashed)


def countChecks(testCase: unittest.TestCase) -> Counted:
    counted = Counted()
    testCase.patch(basicauth, "checkPassword", counted)
    return counted


class FilterTestCase(unittest.TestCase):
    def run1(self, filter: object, *headers: tuple[bytes, bytes]) -> FilterResult:
        return self.successResultOf(runFilters([filter], inboundRequest(headers=headers)))

    def assertRefused(self, result: FilterResult, status: int, reason: str) -> ProxyError:
        self.assertIsInstance(result.verdict, ProxyError)
        error = result.verdict
        assert isinstance(error, ProxyError)
        self.assertEqual((error.status, error.reason), (status, reason))
        self.assertIsNone(result.context.user)
        return error


class HashFormatTests(FilterTestCase):
    """Each format htpasswd writes lets the right password through, and not a wrong one."""

    def assertFormat(self, users: dict[str, tuple[str, str]]) -> None:
        auth = build(htpasswd(self, {user: hashed for user, (_, hashed) in users.items()}))
        for user, (password, _) in users.items():
            result = self.run1(auth, basic(user, password))
            self.assertIsNone(result.verdict, user)
            self.assertEqual(result.context.user, user)
            self.assertRefused(
                self.run1(auth, basic(user, "x" + password)),
                403,
                f"wrong user name or password for realm 'rproxy' (user '{user}')",
            )

    def test_apacheLines(self) -> None:
        """The lines of Apache's own htpasswd: apr1, {SHA}, bcrypt $2y$, SHA-256/512 crypt, crypt."""
        self.assertFormat(APACHE_LINES)

    def test_passlibHashes(self) -> None:
        """Hashes made here with passlib, in each scheme, with the costs htpasswd uses."""
        self.assertFormat(
            {
                "b": ("pw-b", fastBcrypt.hash("pw-b")),
                "a": ("pw-a", apr_md5_crypt.hash("pw-a")),
                "s": ("pw-s", ldap_sha1.hash("pw-s")),
                "five": ("pw-5", sha256_crypt.using(rounds=5000).hash("pw-5")),
                "six": ("pw-6", sha512_crypt.using(rounds=5000).hash("pw-6")),
                "d": ("pw-d", des_crypt.hash("pw-d")),
            }
        )

    def test_utf8Password(self) -> None:
        """Passwords are UTF-8 (the challenge says so), in user names too."""
        self.assertFormat({"zoë": ("pässwörd ✓", apr_md5_crypt.hash("pässwörd ✓"))})

    def test_bcryptLongPassword(self) -> None:
        """bcrypt reads 72 bytes of a password, as Apache's did when it made the hash; longer ones are not a 500."""
        password = b"p" * 72
        auth = build(htpasswd(self, {"long": bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()}))
        self.assertIsNone(self.run1(auth, basic("long", password + b"and more")).verdict)
        self.assertEqual(self.run1(auth, basic("long", password[:71])).status, 403)

    def test_cryptEightCharacters(self) -> None:
        """Traditional crypt reads 8 characters of a password (why htpasswd -d warns): the format, kept."""
        auth = build(htpasswd(self, {"frank": APACHE_LINES["frank"][1]}))
        self.assertIsNone(self.run1(auth, basic("frank", "crypt-secret")).verdict)
        self.assertEqual(self.run1(auth, basic("frank", "crypt-s")).status, 403)

    def test_colonInPassword(self) -> None:
        """The user name ends at the first colon; the password may hold more."""
        auth = build(htpasswd(self, {"u": apr_md5_crypt.hash("a:b:c")}))
        self.assertIsNone(self.run1(auth, basic("u", "a:b:c")).verdict)


class MalformedTests(FilterTestCase):
    """Missing or malformed credentials: 401 with the challenge, and a reason saying what is wrong."""

    def setUp(self) -> None:
        self.checks = countChecks(self)
        self.auth = build(htpasswd(self, {"u": apr_md5_crypt.hash("pw")}))

    def assertChallenged(self, reason: str, *headers: tuple[bytes, bytes]) -> None:
        result = self.run1(self.auth, *headers)
        self.assertRefused(result, 401, reason)
        self.assertIn(CHALLENGE, result.headers)
        self.assertEqual(result.forwarded, [])
        self.assertEqual(self.checks.calls, [])

    def test_missing(self) -> None:
        self.assertChallenged("credentials missing")

    def test_notBasic(self) -> None:
        self.assertChallenged("Authorization is not Basic", (b"authorization", b"Bearer abc.def"))
        self.assertChallenged("Authorization is not Basic", (b"authorization", b"BasicdTpwdw=="))

    def test_huge(self) -> None:
        """A 100 KB field is refused before it is decoded."""
        huge = b"Basic " + base64.b64encode(b"u:" + b"p" * 75_000)
        self.assertGreater(len(huge), 100_000)
        self.assertChallenged("Authorization is over 8 KiB", (b"authorization", huge))

    def test_notBase64(self) -> None:
        self.assertChallenged("malformed Basic credentials: not base64", (b"authorization", b"Basic !!!not base64"))
        self.assertChallenged("malformed Basic credentials: not base64", (b"authorization", b"Basic dTpwdw"))

    def test_noColon(self) -> None:
        self.assertChallenged(
            "malformed Basic credentials: no colon between user name and password",
            (b"authorization", b"Basic " + base64.b64encode(b"upw")),
        )

    def test_notUTF8(self) -> None:
        self.assertChallenged("malformed Basic credentials: not UTF-8", basic(b"u", b"\xff\xfe"))
        self.assertChallenged("malformed Basic credentials: not UTF-8", basic(b"\xc3", b"pw"))

    def test_controlCharacters(self) -> None:
        """RFC 7617 forbids them, and a NUL is what some hash schemes refuse outright."""
        self.assertChallenged("malformed Basic credentials: a control character", basic("u", "p\x00w"))
        self.assertChallenged("malformed Basic credentials: a control character", basic("u\n", "pw"))

    def test_noUserName(self) -> None:
        self.assertChallenged("malformed Basic credentials: no user name", basic("", "pw"))

    def test_twoFields(self) -> None:
        self.assertChallenged("more than one Authorization field", basic("u", "pw"), basic("u", "pw"))

    def test_schemeCaseAndSpaces(self) -> None:
        """The scheme is case-insensitive (RFC 9110 section 11.1); spaces around the token are allowed."""
        token = base64.b64encode(b"u:pw")
        self.assertIsNone(self.run1(self.auth, (b"authorization", b"bAsIc   " + token + b" ")).verdict)

    def test_realm(self) -> None:
        auth = build(htpasswd(self, {"u": apr_md5_crypt.hash("pw")}), realm="Staff area")
        result = self.run1(auth)
        self.assertIn((b"WWW-Authenticate", b'Basic realm="Staff area", charset="UTF-8"'), result.headers)
        self.assertRefused(
            self.run1(auth, basic("u", "no")), 403, "wrong user name or password for realm 'Staff area' (user 'u')"
        )


class WrongCredentialTests(FilterTestCase):
    """Present but wrong credentials: 403 without a challenge, never showing the password."""

    def setUp(self) -> None:
        self.checks = countChecks(self)
        self.path = htpasswd(
            self, {"a": fastBcrypt.hash("pa"), "b": fastBcrypt.hash("pb"), "m": apr_md5_crypt.hash("pm")}
        )
        self.auth = build(self.path)

    def test_wrongPassword(self) -> None:
        result = self.run1(self.auth, basic("a", "secret-guess"))
        error = self.assertRefused(result, 403, "wrong user name or password for realm 'rproxy' (user 'a')")
        self.assertNotIn(CHALLENGE, result.headers)
        self.assertNotIn(b"secret-guess", error.responseBytes())

    def test_unknownUserChecksDummy(self) -> None:
        """
        An unknown user costs one check against a dummy hash of the file's usual scheme and cost (bcrypt at
        cost 4 here, two users of three), as a known user's wrong password does.
        """
        self.assertRefused(
            self.run1(self.auth, basic("nobody", "pw")),
            403,
            "wrong user name or password for realm 'rproxy' (user 'nobody')",
        )
        self.run1(self.auth, basic("a", "wrong"))
        [(unknownPassword, dummy), (knownPassword, real)] = self.checks.calls
        self.assertEqual((unknownPassword, knownPassword), (b"pw", b"wrong"))
        self.assertEqual(hashSetting(dummy), hashSetting(real))
        self.assertEqual(hashSetting(dummy), ("bcrypt", 4))
        self.assertNotIn(dummy, self.auth.users.values())

    def test_dummyFollowsFile(self) -> None:
        """The dummy's scheme is that of the file's usual entries (here APR1)."""
        auth = build(
            htpasswd(self, {"x": apr_md5_crypt.hash("1"), "y": apr_md5_crypt.hash("2"), "z": fastBcrypt.hash("3")})
        )
        self.run1(auth, basic("nobody", "pw"))
        self.assertEqual(hashSetting(self.checks.calls[-1][1]), ("apr_md5_crypt", None))

    def test_unsafeUserNotNamed(self) -> None:
        """A user name that would garble the reason is left out of it."""
        for user in ("it's", "x" * 65, "back\\slash", "tab\u00a0\u2028"):
            self.assertRefused(
                self.run1(self.auth, basic(user, "pw")), 403, "wrong user name or password for realm 'rproxy'"
            )


class CacheTests(FilterTestCase):
    """Good credentials are checked once; the cache keeps digests, and forgets a user's old password."""

    def setUp(self) -> None:
        self.checks = countChecks(self)
        self.clock = Clock()
        self.path = htpasswd(self, {"a": fastBcrypt.hash("pa"), "b": fastBcrypt.hash("pb")})

    def test_secondRequestNotChecked(self) -> None:
        auth = build(self.path, self.clock)
        for _ in range(3):
            result = self.run1(auth, basic("a", "pa"))
            self.assertIsNone(result.verdict)
            self.assertEqual(result.context.user, "a")
        self.assertEqual(len(self.checks.calls), 1)

    def test_wrongPasswordsNotCached(self) -> None:
        auth = build(self.path, self.clock)
        for _ in range(2):
            self.assertEqual(self.run1(auth, basic("a", "no")).status, 403)
        self.assertEqual(len(self.checks.calls), 2)
        self.assertEqual(len(auth.cache), 0)

    def test_otherPasswordSameUser(self) -> None:
        """A cached good password does not vouch for another password of the same user."""
        auth = build(self.path, self.clock)
        self.run1(auth, basic("a", "pa"))
        self.assertEqual(self.run1(auth, basic("a", "pa-not")).status, 403)
        self.assertEqual(len(self.checks.calls), 2)

    def test_digestsNotPasswords(self) -> None:
        auth = build(self.path, self.clock)
        self.run1(auth, basic("a", "pa"))
        [(key, value)] = auth.cache._entries.items()
        self.assertEqual(len(key), 32)
        self.assertNotIn(b"pa", key)
        self.assertEqual(value, ("a", auth.users["a"]))
        self.assertNotEqual(auth.cache.digest(b"a:pa"), BasicAuth(self.path, self.clock).cache.digest(b"a:pa"))

    def test_changedPasswordForgotten(self) -> None:
        """Once the file gives the user a new hash, the old password is checked again (and fails)."""
        auth = build(self.path, self.clock)
        self.run1(auth, basic("a", "pa"))
        htpasswd(self, {"a": fastBcrypt.hash("new"), "b": fastBcrypt.hash("pb")}, self.path)
        self.clock.advance(1)
        self.assertEqual(self.run1(auth, basic("a", "pa")).status, 403)
        self.assertIsNone(self.run1(auth, basic("a", "new")).verdict)
        self.assertEqual(len(self.checks.calls), 3)

    def test_leastRecentlyUsedDropped(self) -> None:
        auth = build(self.path, self.clock, **{"cache-size": 1})
        for user in ("a", "b", "a", "a"):
            self.assertIsNone(self.run1(auth, basic(user, "p" + user)).verdict)
        self.assertEqual([password for password, _ in self.checks.calls], [b"pa", b"pb", b"pa"])

    def test_disabled(self) -> None:
        auth = build(self.path, self.clock, **{"cache-size": 0})
        for _ in range(2):
            self.assertIsNone(self.run1(auth, basic("a", "pa")).verdict)
        self.assertEqual(len(self.checks.calls), 2)


class ReloadTests(FilterTestCase):
    """The file is read again when it changes, at most once a second; a bad file keeps the last good users."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.path = htpasswd(self, {"alice": apr_md5_crypt.hash("a")})
        self.auth = build(self.path, self.clock)

    def assertUsers(self, allowed: Iterable[str], refused: Iterable[str]) -> None:
        for user in allowed:
            self.assertIsNone(self.run1(self.auth, basic(user, user[0])).verdict, user)
        for user in refused:
            self.assertEqual(self.run1(self.auth, basic(user, user[0])).status, 403, user)

    def warnings(self) -> list[str]:
        return [line for line in self.logs.formatted() if "cannot use" in line]

    def test_replaced(self) -> None:
        htpasswd(self, {"bob": apr_md5_crypt.hash("b")}, self.path)
        self.clock.advance(0.5)
        self.assertUsers(["alice"], ["bob"])  # not looked at yet
        self.clock.advance(0.5)
        self.assertUsers(["bob"], ["alice"])
        self.assertIn(f"basic-auth: read 1 users from {self.path}", self.logs.formatted())

    def test_rewrittenInPlace(self) -> None:
        """Same file, new content and modification time."""
        with open(self.path, "ab") as f:
            f.write(f"carol:{apr_md5_crypt.hash('c')}\n".encode())
        os.utime(self.path, ns=(0, 10**18))
        self.clock.advance(1)
        self.assertUsers(["alice", "carol"], [])

    def test_unchangedNotRead(self) -> None:
        self.clock.advance(5)
        self.assertUsers(["alice"], [])
        self.assertEqual(self.logs.formatted(), [])

    def test_deleted(self) -> None:
        """A deleted file keeps the users read before, with one warning however long it stays away."""
        os.remove(self.path)
        for _ in range(3):
            self.clock.advance(1)
            self.assertUsers(["alice"], ["bob"])
        [warning] = self.warnings()
        self.assertIn("No such file or directory", warning)
        self.assertIn("keeping the 1 users read before", warning)

    def test_garbage(self) -> None:
        """A malformed file likewise; when a good one comes back, it is read, and a later bad one warned of again."""
        htpasswd(self, b"alice:$apr1$\nthis is not htpasswd\n", self.path)
        self.clock.advance(1)
        self.assertUsers(["alice"], [])
        htpasswd(self, b"\xff\xff:garbage\n", self.path)
        self.clock.advance(1)
        self.assertUsers(["alice"], [])
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("line 1: the hash of user 'alice' is in no supported format", self.warnings()[0])
        htpasswd(self, {"bob": apr_md5_crypt.hash("b")}, self.path)
        self.clock.advance(1)
        self.assertUsers(["bob"], ["alice"])
        htpasswd(self, b"plain:text\n", self.path)
        self.clock.advance(1)
        self.assertUsers(["bob"], [])
        self.assertEqual(len(self.warnings()), 2)

    def test_reloadOff(self) -> None:
        auth = build(self.path, self.clock, reload=False)
        htpasswd(self, {"bob": apr_md5_crypt.hash("b")}, self.path)
        self.clock.advance(10)
        self.assertIsNone(self.run1(auth, basic("alice", "a")).verdict)


class BuildTests(unittest.TestCase):
    """Options and the file at build time: a bad one is a ValueError naming the option."""

    def assertBuildError(self, options: dict[str, object], *parts: str) -> None:
        error = self.assertRaises(ValueError, basicAuth.build, options, FilterEnvironment(Clock()))
        for part in parts:
            self.assertIn(part, str(error))

    def test_factory(self) -> None:
        built = verifyFilterFactory(basicAuth, {"htpasswd": htpasswd(self, {"u": apr_md5_crypt.hash("pw")})})
        self.assertEqual(built.consumes, frozenset({b"authorization"}))  # type: ignore[attr-defined]

    def test_missingFile(self) -> None:
        path = self.mktemp()
        self.assertBuildError({"htpasswd": path}, "option htpasswd", f"cannot read {path}", "No such file or directory")

    def test_noPath(self) -> None:
        self.assertBuildError({}, "option htpasswd: required")

    def test_malformed(self) -> None:
        cases = {
            b"u:" + fastBcrypt.hash("x").encode() + b"\nno colon here\n": "line 2 is not user:hash",
            b"u:plaintext\n": "line 1: the hash of user 'u' is in no supported format",
            b"u:$2y$10$short\n": "line 1: the hash of user 'u' is in no supported format",
            b"u:{SHA}x\nu:{SHA}y\n": "line 2: user 'u' is already on line 1",
            b"\xe9t\xe9:{SHA}x\n": "line 1 is not UTF-8",
        }
        for data, problem in cases.items():
            self.assertBuildError({"htpasswd": htpasswd(self, data)}, "option htpasswd", problem)

    def test_noHashInErrors(self) -> None:
        hashed = apr_md5_crypt.hash("x")
        self.assertBuildError({"htpasswd": htpasswd(self, f"u:{hashed}\nu:{hashed}\n".encode())}, "already on line 1")
        error = self.assertRaises(ValueError, build, htpasswd(self, f"u:{hashed}\nu:{hashed}\n".encode()))
        self.assertNotIn(hashed, str(error))

    def test_commentsAndExtraFields(self) -> None:
        """Comments and blank lines are skipped; fields after the hash are ignored, as Apache does."""
        hashed = apr_md5_crypt.hash("pw")
        auth = build(htpasswd(self, f"# staff\n\nu:{hashed}:Some One\r\n".encode()))
        self.assertEqual(dict(auth.users), {"u": hashed})

    def test_relativePath(self) -> None:
        """A relative path is read from the environment's base (the config file's directory)."""
        path = htpasswd(self, {"u": apr_md5_crypt.hash("pw")})
        built = basicAuth.build({"htpasswd": os.path.basename(path)}, FilterEnvironment(Clock(), os.path.dirname(path)))
        self.assertEqual(built.path, path)  # type: ignore[union-attr]

    def test_badOptions(self) -> None:
        path = htpasswd(self, {"u": apr_md5_crypt.hash("pw")})
        self.assertBuildError({"htpasswd": path, "realm": 'a "quoted" realm'}, "option realm")
        self.assertBuildError({"htpasswd": path, "realm": ""}, "option realm")
        self.assertBuildError({"htpasswd": path, "cache-size": -1}, "option cache-size")
        self.assertBuildError({"htpasswd": path, "forward-credentials": "maybe"}, "option forward-credentials")


class ForwardingTests(FilterTestCase):
    """The credentials are consumed (removed before forwarding) unless forward-credentials says otherwise."""

    def setUp(self) -> None:
        self.path = htpasswd(self, {"u": apr_md5_crypt.hash("pw")})

    def test_removed(self) -> None:
        result = self.run1(build(self.path), basic("u", "pw"))
        self.assertIsNone(result.verdict)
        self.assertEqual([v for n, v in result.forwarded if n.lower() == b"authorization"], [])

    def test_kept(self) -> None:
        result = self.run1(build(self.path, **{"forward-credentials": True}), basic("u", "pw"))
        self.assertIsNone(result.verdict)
        self.assertEqual([v for n, v in result.forwarded if n.lower() == b"authorization"], [basic("u", "pw")[1]])


class FakePool:
    """A thread pool whose work runs when the test says."""

    def __init__(self) -> None:
        self.work: list[tuple[Callable[[bool, object], None], Callable[..., object], tuple[Any, ...]]] = []

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], f: Callable[..., object], *a: Any
    ) -> None:
        self.work.append((onResult, f, a))

    def runAll(self) -> None:
        while self.work:
            onResult, f, a = self.work.pop(0)
            onResult(True, f(*a))


@implementer(IReactorThreads)
class ThreadedClock(Clock):
    """A clock with a thread pool (only what the filter uses of C{IReactorThreads})."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = FakePool()

    def getThreadPool(self) -> FakePool:
        return self.pool

    def callFromThread(self, f: Callable[..., object], *a: object) -> None:
        f(*a)


class ThreadTests(FilterTestCase):
    """Under a reactor with threads, the hash is checked in its pool, a bounded number at once."""

    def setUp(self) -> None:
        self.reactor = ThreadedClock()
        self.auth = build(htpasswd(self, {"u": apr_md5_crypt.hash("pw")}), self.reactor)

    def test_inPool(self) -> None:
        waiting = runFilters([self.auth], inboundRequest(headers=[basic("u", "pw")]))
        self.assertNoResult(waiting)
        self.reactor.pool.runAll()
        result = self.successResultOf(waiting)
        self.assertIsNone(result.verdict)
        self.assertEqual(result.context.user, "u")
        self.assertIsNone(self.run1(self.auth, basic("u", "pw")).verdict)  # cached: no thread
        self.assertEqual(self.reactor.pool.work, [])

    def test_bounded(self) -> None:
        """Beyond MAX_CHECKING checks at once: 503 with Retry-After; a cancelled check counts until it ends."""
        waiting = [runFilters([self.auth], inboundRequest(headers=[basic("u", f"{i}")])) for i in range(4)]
        self.assertEqual(len(self.reactor.pool.work), basicauth.MAX_CHECKING)
        error = self.assertRefused(
            self.run1(self.auth, basic("u", "pw")), 503, "too many password checks in progress (4 at once)"
        )
        self.assertEqual(error.retryAfter, 1)
        waiting[0].cancel()
        self.failureResultOf(waiting[0], CancelledError)
        self.assertEqual(self.run1(self.auth, basic("u", "pw")).status, 503)
        self.reactor.pool.runAll()
        for each in waiting[1:]:
            self.assertEqual(self.successResultOf(each).status, 403)
        later = runFilters([self.auth], inboundRequest(headers=[basic("u", "pw")]))
        self.reactor.pool.runAll()
        self.assertIsNone(self.successResultOf(later).verdict)


class RealProxyTests(unittest.TestCase):
    """curl through a real rproxy whose requests go through basic-auth, to a scripted upstream."""

    timeout = 20

    def setUp(self) -> None:
        self.upstream = ScriptedUpstream(self, answer(OK))
        self.proxy = startProxy(self, [self.upstream.url])
        self.path = htpasswd(self, {"alice": fastBcrypt.hash("wonder land"), "bob": apr_md5_crypt.hash("builder")})

    def use(self, **options: object) -> None:
        useFilters(self.proxy, build(self.path, reactor, **options))

    async def fetch(self, *arguments: str) -> tuple[int, bytes]:
        code, out, err = await curl(["-sS", "-i", *arguments, self.proxy.url + "/private"])
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), out

    @deferredTest
    async def test_authenticated(self) -> None:
        """Good credentials pass, checked outside the reactor's thread, and the upstream never sees them."""
        threads = []

        def check(password: bytes, hashed: str) -> bool:
            threads.append(threading.current_thread())
            return checkPassword(password, hashed)

        self.patch(basicauth, "checkPassword", check)
        self.use()
        for user, password in (("alice", "wonder land"), ("bob", "builder"), ("alice", "wonder land")):
            status, out = await self.fetch("-u", f"{user}:{password}")
            self.assertEqual(status, 200, out)
        self.assertEqual(len(self.upstream.requests), 3)
        self.assertEqual(len(threads), 2)  # the third request's credentials were cached
        self.assertNotIn(threading.main_thread(), threads)
        for request in self.upstream.requests:
            self.assertEqual(request.headers(b"authorization"), [])

    @deferredTest
    async def test_forwarded(self) -> None:
        self.use(**{"forward-credentials": True})
        status, _ = await self.fetch("-u", "bob:builder")
        self.assertEqual(status, 200)
        self.assertEqual(
            self.upstream.requests[0].headers(b"authorization"), [b"Basic " + base64.b64encode(b"bob:builder")]
        )

    @deferredTest
    async def test_noCredentials(self) -> None:
        self.use(realm="Staff")
        status, out = await self.fetch()
        self.assertEqual(status, 401)
        self.assertIn(b'\r\nWWW-Authenticate: Basic realm="Staff", charset="UTF-8"\r\n', out)
        self.assertIn(b"credentials missing", out)
        self.assertEqual(self.upstream.requests, [])

    @deferredTest
    async def test_wrongCredentials(self) -> None:
        self.use()
        for credentials in ("alice:wrong", "mallory:wonder land"):
            status, out = await self.fetch("-u", credentials)
            self.assertEqual(status, 403, out)
            self.assertNotIn(b"WWW-Authenticate", out)
            self.assertNotIn(b"wonder", out)
        self.assertEqual(self.upstream.requests, [])
