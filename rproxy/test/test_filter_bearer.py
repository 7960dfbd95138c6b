"""
The C{jwt} filter (L{rproxy.filters.bearer}): tokens signed with each algorithm, the time and identity
claims on a C{Clock}, the attacks on JWT verifiers (C{alg: none}, HS256 signed with an RSA public key,
oversized and garbage tokens, forged claim fields), the verification cache; and JWKS keys fetched from a
real endpoint on 127.0.0.1 by a real proxy, with key rotation, a failing, garbage or hanging endpoint.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server

from rproxy.errors import ProxyError
from rproxy.filters.bearer import BearerFilter
from rproxy.headers import ForwardingPolicy
from rproxy.interfaces import FilterEnvironment
from rproxy.plugins.filters import jwtAuth
from rproxy.proxy.message import OutboundRequest, RequestContext
from rproxy.test.support import (
    LogCapture,
    ScriptedUpstream,
    curl,
    freePort,
    headerValues,
    responseStatus,
    sleep,
    startProxy,
    startUpstream,
    useFilters,
    waitFor,
)
from rproxy.testing import FilterResult, inboundRequest, runFilters, verifyFilterFactory

NOW = 1_700_000_000.0
SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def publicPEM(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def encode(segment: bytes) -> bytes:
    return base64.urlsafe_b64encode(segment).rstrip(b"=")


def handMade(header: Mapping[str, object], claims: Mapping[str, object], signature: bytes = b"") -> str:
    """A token put together by hand, with any header and signature."""
    parts = [encode(json.dumps(header).encode()), encode(json.dumps(claims).encode()), encode(signature)]
    return b".".join(parts).decode()


def token(
    claims: Mapping[str, object] | None = None, algorithm: str = "HS256", key: Any = SECRET, **header: Any
) -> str:
    """A token signed with C{key}; by default for user alice, expiring an hour after L{NOW}."""
    payload = {"sub": "alice", "exp": int(NOW) + 3600} if claims is None else dict(claims)
    return jwt.encode(payload, key, algorithm=algorithm, headers=header or None)


def jwk(key: Any, kid: str, algorithm: type[Any] = RSAAlgorithm, **extra: object) -> dict[str, object]:
    """The public JWK of C{key}, with C{kid}."""
    return {**algorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, **extra}


def jwks(*keys: dict[str, object]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


class FilterTestCase(unittest.TestCase):
    """Building a filter on a C{Clock} at L{NOW}, running requests through it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.base = self.mktemp()
        os.makedirs(self.base)

    def writeFile(self, name: str, data: bytes) -> str:
        with open(os.path.join(self.base, name), "wb") as f:
            f.write(data)
        return name

    def build(self, options: Mapping[str, object], reactor: Any = None) -> BearerFilter:
        built = jwtAuth.build(options, FilterEnvironment(self.clock if reactor is None else reactor, self.base))
        assert isinstance(built, BearerFilter)
        return built

    def hs256(self, **options: object) -> BearerFilter:
        return self.build({"algorithms": ["HS256"], "secret": SECRET, **options})

    def through(
        self, bearer: BearerFilter, credentials: str | None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> FilterResult:
        """Run a request with C{Authorization: Bearer credentials} (none if C{None}) through C{bearer}."""
        fields = list(headers)
        if credentials is not None:
            fields.append((b"authorization", b"Bearer " + credentials.encode("latin-1")))
        return self.successResultOf(runFilters([bearer], inboundRequest(headers=fields)))

    def assertPassed(self, result: FilterResult, user: str | None = "alice") -> None:
        self.assertIsNone(result.verdict, result.body)
        self.assertEqual(result.context.user, user)
        self.assertNotIn(b"authorization", [name.lower() for name, _ in result.forwarded])

    def assertRefused(
        self,
        result: FilterResult,
        status: int,
        reason: str,
        credentials: str | None = None,
        error: str = "invalid_token",
    ) -> None:
        """C{result} is C{status} with C{reason} in its body, a Bearer challenge, and no trace of the token."""
        self.assertEqual(result.status, status, result.body)
        self.assertIn(reason.encode(), result.body)
        self.assertEqual(result.forwarded, [])
        self.assertIsNone(result.context.user)
        challenge = [value for name, value in result.headers if name.lower() == b"www-authenticate"]
        expected = b'Bearer realm="rproxy"' + (b', error="%s"' % error.encode() if error else b"")
        self.assertEqual(challenge, [expected])
        if credentials:
            for part in credentials.split(".")[:2]:
                if len(part) > 8:
                    self.assertNotIn(part.encode(), result.body)
                    self.assertNotIn(part.encode(), b"".join(value for _, value in result.headers))


class AlgorithmTests(FilterTestCase):
    """Each algorithm verifies its tokens with its key, and only those."""

    def test_factory(self) -> None:
        verifyFilterFactory(jwtAuth, {"algorithms": ["HS256"], "secret": SECRET})
        verifyFilterFactory(jwtAuth, {"algorithms": ["RS256"], "jwks-url": "https://idp.example/jwks.json"})

    def test_hs256(self) -> None:
        bearer = self.hs256()
        result = self.through(bearer, token())
        self.assertPassed(result)
        self.assertEqual(result.context.claims["exp"], int(NOW) + 3600)
        self.assertRefused(self.through(bearer, token(key=SECRET + "x")), 403, "signature does not verify")

    def test_hs256SecretFile(self) -> None:
        bearer = self.build({"algorithms": "HS256", "secret-file": self.writeFile("secret", SECRET.encode() + b"\n")})
        self.assertPassed(self.through(bearer, token()))

    def test_rs256(self) -> None:
        bearer = self.build({"algorithms": ["RS256"], "public-key-file": self.writeFile("rsa.pem", publicPEM(RSA_KEY))})
        self.assertPassed(self.through(bearer, token(algorithm="RS256", key=RSA_KEY)))
        self.assertRefused(
            self.through(bearer, token(algorithm="RS256", key=OTHER_RSA_KEY)), 403, "signature does not verify"
        )

    def test_certificate(self) -> None:
        """public-key-file may be an X.509 certificate (as some identity providers publish their keys)."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
        start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        builder = x509.CertificateBuilder(name, name, EC_KEY.public_key(), 1, start, start + datetime.timedelta(1))
        certificate = builder.sign(EC_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        bearer = self.build({"algorithms": ["ES256"], "public-key-file": self.writeFile("cert.pem", certificate)})
        self.assertPassed(self.through(bearer, token(algorithm="ES256", key=EC_KEY)))

    def test_es256(self) -> None:
        bearer = self.build({"algorithms": ["ES256"], "public-key-file": self.writeFile("ec.pem", publicPEM(EC_KEY))})
        self.assertPassed(self.through(bearer, token(algorithm="ES256", key=EC_KEY)))
        other = ec.generate_private_key(ec.SECP256R1())
        self.assertRefused(self.through(bearer, token(algorithm="ES256", key=other)), 403, "signature does not verify")

    def test_eddsa(self) -> None:
        bearer = self.build({"algorithms": ["EdDSA"], "public-key-file": self.writeFile("ed.pem", publicPEM(ED_KEY))})
        self.assertPassed(self.through(bearer, token(algorithm="EdDSA", key=ED_KEY)))
        other = ed25519.Ed25519PrivateKey.generate()
        self.assertRefused(self.through(bearer, token(algorithm="EdDSA", key=other)), 403, "signature does not verify")

    def test_tamperedPayload(self) -> None:
        """A token whose claims were changed after signing (alice becomes admin) does not verify."""
        header, _, signature = token().split(".")
        forged = handMade({"alg": "HS256", "typ": "JWT"}, {"sub": "admin", "exp": int(NOW) + 3600})
        forged = ".".join([header, forged.split(".")[1], signature])
        self.assertRefused(self.through(self.hs256(), forged), 403, "signature does not verify", forged)

    def test_algorithmNotAllowed(self) -> None:
        bearer = self.build({"algorithms": ["ES256"], "public-key-file": self.writeFile("ec.pem", publicPEM(EC_KEY))})
        self.assertRefused(self.through(bearer, token()), 403, "algorithm 'HS256' is not allowed")

    def test_algNone(self) -> None:
        """An unsigned token is refused, whatever the case of its C{none}, even with a signature added."""
        bearer = self.hs256()
        for alg in ("none", "None", "NONE"):
            unsigned = handMade({"alg": alg, "typ": "JWT"}, {"sub": "admin", "exp": int(NOW) + 3600})
            self.assertRefused(self.through(bearer, unsigned), 403, "algorithm none is not allowed", unsigned)
        signed = handMade({"alg": "none"}, {"sub": "admin", "exp": int(NOW) + 3600}, b"x" * 32)
        self.assertRefused(self.through(bearer, signed), 403, "algorithm none is not allowed", signed)

    def test_hs256WithPublicKeyAsSecret(self) -> None:
        """
        The classic confusion attack: an HS256 token whose HMAC key is the server's RSA public key (PEM).
        A verifier that picks the algorithm from the token would check it with the PEM as the secret.
        """
        pem = publicPEM(RSA_KEY)
        header = {"alg": "HS256", "typ": "JWT"}
        unsigned = handMade(header, {"sub": "admin", "exp": int(NOW) + 3600})
        signingInput = unsigned.rsplit(".", 1)[0].encode()
        forged = handMade(header, {"sub": "admin", "exp": int(NOW) + 3600}, hmac.digest(pem, signingInput, "sha256"))
        bearer = self.build({"algorithms": ["RS256"], "public-key-file": self.writeFile("rsa.pem", pem)})
        self.assertRefused(self.through(bearer, forged), 403, "algorithm 'HS256' is not allowed", forged)
        # An RSA key verifies RS256 only: listing HS256 next to it is a configuration error.
        error = self.assertRaises(
            ValueError, self.build, {"algorithms": ["RS256", "HS256"], "public-key-file": "rsa.pem"}
        )
        self.assertIn("public-key-file", str(error))

    def test_criticalHeader(self) -> None:
        """A token with critical extensions is refused: none is understood (RFC 7515 section 4.1.11)."""
        crit = token(crit=["exp"], exp=1)
        self.assertRefused(self.through(self.hs256(), crit), 403, "critical header parameters")


class ClaimTests(FilterTestCase):
    """exp, nbf (with leeway), the required claims, issuer and audience, the user claim."""

    def test_expired(self) -> None:
        bearer = self.hs256()
        expiring = token({"sub": "alice", "exp": int(NOW) + 10})
        self.assertPassed(self.through(bearer, expiring))
        self.clock.advance(52)
        self.assertRefused(self.through(bearer, expiring), 403, "token expired 42 s ago", expiring)
        now = int(self.clock.seconds())
        self.assertRefused(self.through(bearer, token({"sub": "alice", "exp": now})), 403, "token expired 0 s ago")

    def test_expiredWithLeeway(self) -> None:
        bearer = self.hs256(leeway=30, **{"cache-size": 0})
        expired = token({"sub": "alice", "exp": int(NOW) - 20})
        self.assertPassed(self.through(bearer, expired))
        self.clock.advance(10)
        self.assertRefused(self.through(bearer, expired), 403, "token expired 30 s ago")

    def test_notBefore(self) -> None:
        bearer = self.hs256(**{"cache-size": 0})
        early = token({"sub": "alice", "exp": int(NOW) + 3600, "nbf": int(NOW) + 60})
        self.assertRefused(self.through(bearer, early), 403, "not valid for another 60 s", early)
        self.clock.advance(60)
        self.assertPassed(self.through(bearer, early))
        self.assertPassed(
            self.through(self.hs256(leeway="1m"), token({"exp": int(NOW) + 3600, "nbf": int(NOW) + 110})), None
        )

    def test_badTimes(self) -> None:
        """
        exp and nbf must be finite numbers (a huge exponent is infinity to JSON parsers, a huge integer is
        past a float's range: refused, not a 500).
        """
        bearer = self.hs256()
        for claims in ({"exp": "tomorrow"}, {"exp": True}, {"exp": int(NOW) + 9, "nbf": [1]}):
            self.assertRefused(self.through(bearer, token(claims)), 403, "is not a NumericDate")
        for payload, shown in ((b'{"exp": 1e400}', "inf"), (b'{"exp": 1' + b"0" * 400 + b"}", "1000")):
            huge = token({"exp": 1}).split(".")
            huge[1] = encode(payload).decode()
            signingInput = ".".join(huge[:2]).encode()
            huge[2] = encode(hmac.digest(SECRET.encode(), signingInput, "sha256")).decode()
            self.assertRefused(self.through(bearer, ".".join(huge)), 403, f"exp claim is not a NumericDate: {shown}")

    def test_require(self) -> None:
        self.assertRefused(self.through(self.hs256(), token({"sub": "alice"})), 403, "the token has no exp claim")
        self.assertPassed(self.through(self.hs256(require=[]), token({"sub": "alice"})))
        bearer = self.hs256(require=["exp", "email"])
        self.assertRefused(self.through(bearer, token()), 403, "the token has no email claim")
        self.assertPassed(self.through(bearer, token({"sub": "alice", "exp": int(NOW) + 9, "email": "a@example.com"})))

    def test_issuer(self) -> None:
        bearer = self.hs256(issuer="https://idp.example")
        self.assertPassed(
            self.through(bearer, token({"sub": "alice", "exp": int(NOW) + 9, "iss": "https://idp.example"}))
        )
        self.assertRefused(self.through(bearer, token()), 403, "the token has no iss claim")
        wrong = token({"sub": "alice", "exp": int(NOW) + 9, "iss": "https://evil.example"})
        self.assertRefused(
            self.through(bearer, wrong), 403, "issuer 'https://evil.example' is not 'https://idp.example'"
        )

    def test_audience(self) -> None:
        bearer = self.hs256(audience=["api", "admin"])
        for audience in ("api", ["other", "admin"]):
            self.assertPassed(self.through(bearer, token({"sub": "alice", "exp": int(NOW) + 9, "aud": audience})))
        self.assertRefused(self.through(bearer, token()), 403, "the token has no aud claim")
        for audience in ("web", ["web", "mobile"], [["api"]], 7):
            wrong = token({"sub": "alice", "exp": int(NOW) + 9, "aud": audience})
            self.assertRefused(self.through(bearer, wrong), 403, "is not admin or api")

    def test_userClaim(self) -> None:
        bearer = self.hs256(**{"user-claim": "email"})
        result = self.through(bearer, token({"sub": "a1", "email": "alice@example.com", "exp": int(NOW) + 9}))
        self.assertPassed(result, "alice@example.com")
        self.assertEqual(result.context.claims["sub"], "a1")
        self.assertPassed(self.through(bearer, token({"sub": "a1", "exp": int(NOW) + 9})), None)

    def test_forwardToken(self) -> None:
        credentials = token()
        result = self.through(self.hs256(**{"forward-token": True}), credentials)
        self.assertIsNone(result.verdict)
        self.assertIn((b"Authorization", b"Bearer " + credentials.encode()), result.forwarded)
        self.assertEqual(self.hs256().consumes, frozenset({b"authorization"}))


class MalformedTests(FilterTestCase):
    """Missing or malformed credentials are a 401 with a Bearer challenge, never a 500 or a pass."""

    def test_missing(self) -> None:
        result = self.through(self.hs256(), None)
        self.assertRefused(result, 401, "no Authorization field", error="")
        result = self.through(self.hs256(), None, [(b"authorization", b"Basic YWxpY2U6cHc=")])
        self.assertRefused(result, 401, "not a bearer token", error="")

    def test_twoFields(self) -> None:
        result = self.through(self.hs256(), token(), [(b"authorization", b"Bearer " + token().encode())])
        self.assertRefused(result, 401, "more than one Authorization field", error="invalid_request")

    def test_realm(self) -> None:
        result = self.through(self.hs256(realm="api.example"), token(key=SECRET + "x"))
        challenge = [value for name, value in result.headers if name == b"WWW-Authenticate"]
        self.assertEqual(challenge, [b'Bearer realm="api.example", error="invalid_token"'])

    def test_hugeToken(self) -> None:
        """A 100 KB token is refused before anything decodes it."""
        huge = token({"sub": "alice", "exp": int(NOW) + 9, "pad": "x" * 100_000})
        self.assertGreater(len(huge), 100_000)
        self.assertRefused(self.through(self.hs256(), huge), 401, "longer than 8192 bytes", huge)

    def test_garbage(self) -> None:
        def jwt3(header: bytes, payload: bytes = b'{"sub":"alice"}', signature: str = "sig") -> str:
            return ".".join([encode(header).decode(), encode(payload).decode(), signature])

        good = b'{"alg":"HS256"}'
        garbage = {
            "": "not a JWT",
            "abc": "not a JWT",
            "a.b": "not a JWT",
            "a.b.c.d": "not a JWT",
            "!!!.abc.def": "not a JWT",
            "a b.c.d": "not a JWT",
            "\u00e9.a.b": "not a JWT",
            jwt3(good, signature="="): "not a JWT",
            "Zm9v." + jwt3(good).split(".", 1)[1]: "header is not base64url-encoded JSON",
            "a." + jwt3(good).split(".", 1)[1]: "header is not base64url-encoded JSON",
            jwt3(b"[1, 2]"): "header is not a JSON object",
            jwt3(b"[" * 3000 + b"]" * 3000): "header is not base64url-encoded JSON",
            jwt3(b"{}"): "header has no alg",
            jwt3(b'{"alg": 5}'): "header has no alg",
            jwt3(b'{"alg": "HS256", "kid": 1}'): "kid is not a string",
            jwt3(good, b"NaN"): "payload is not base64url-encoded JSON",
            jwt3(good, b'{"exp": NaN}'): "payload is not base64url-encoded JSON",
            jwt3(good, b'"alice"'): "payload is not a JSON object",
            jwt3(good, b"\xff\xfe"): "payload is not base64url-encoded JSON",
            jwt3(good, signature="a"): "signature is not base64url",
        }
        bearer = self.hs256()
        for credentials, reason in garbage.items():
            result = self.through(bearer, credentials)
            self.assertRefused(result, 401, reason, credentials)

    def test_bearerWithoutToken(self) -> None:
        result = self.through(self.hs256(), None, [(b"authorization", b"Bearer")])
        self.assertRefused(result, 401, "not a JWT")
        result = self.through(self.hs256(), None, [(b"authorization", b"bearer   " + token().encode() + b"  ")])
        self.assertPassed(result)


class ClaimFieldTests(FilterTestCase):
    """claims-to-headers: claims become outbound fields, which a client cannot forge."""

    def bearer(self) -> BearerFilter:
        return self.hs256(**{"claims-to-headers": {"sub": "X-User", "roles": "X-Roles", "tier": "X-Tier"}})

    def forwarded(self, result: FilterResult, name: bytes) -> list[bytes]:
        return [value for field, value in result.forwarded if field.lower() == name]

    def test_copied(self) -> None:
        claims = {"sub": "alice", "exp": int(NOW) + 9, "roles": ["admin", "dev", 3], "tier": 2}
        result = self.through(self.bearer(), token(claims))
        self.assertIsNone(result.verdict)
        self.assertEqual(self.forwarded(result, b"x-user"), [b"alice"])
        self.assertEqual(self.forwarded(result, b"x-roles"), [b"admin, dev, 3"])
        self.assertEqual(self.forwarded(result, b"x-tier"), [b"2"])

    def test_forgedRemoved(self) -> None:
        """The client's own X-User and X-Roles never reach the upstream, whether the token has the claim or not."""
        forged = [(b"x-user", b"root"), (b"X-Roles", b"admin"), (b"x-roles", b"superuser")]
        result = self.through(self.bearer(), token(), forged)
        self.assertIsNone(result.verdict)
        self.assertEqual(self.forwarded(result, b"x-user"), [b"alice"])
        self.assertEqual(self.forwarded(result, b"x-roles"), [])
        self.assertEqual(self.forwarded(result, b"x-tier"), [])

    def test_refusedValues(self) -> None:
        bearer = self.bearer()
        for value in ("alice\r\nX-Admin: yes", "alice\n", "al\x00ice", ["ok", "bad\r"], {"nested": 1}, [["x"]]):
            result = self.through(bearer, token({"sub": value, "exp": int(NOW) + 9}))
            self.assertRefused(result, 403, "the sub claim")
        self.assertPassed(self.through(bearer, token({"sub": "alice\tsmith", "exp": int(NOW) + 9})), "alice\tsmith")


class CacheTests(FilterTestCase):
    """A verified token is not verified again until it expires."""

    def countVerifications(self) -> list[int]:
        calls = [0]
        verify = RSAAlgorithm.verify

        def counting(self: RSAAlgorithm, msg: bytes, key: Any, sig: bytes) -> bool:
            calls[0] += 1
            return verify(self, msg, key, sig)

        self.patch(RSAAlgorithm, "verify", counting)
        return calls

    def rs256(self, **options: object) -> BearerFilter:
        pem = self.writeFile("rsa.pem", publicPEM(RSA_KEY))
        return self.build({"algorithms": ["RS256"], "public-key-file": pem, **options})

    def test_cached(self) -> None:
        calls = self.countVerifications()
        bearer = self.rs256(**{"claims-to-headers": {"sub": "X-User"}})
        credentials = token(algorithm="RS256", key=RSA_KEY)
        self.assertPassed(self.through(bearer, credentials))
        self.assertEqual(calls, [1])
        result = self.through(bearer, credentials, [(b"x-user", b"root")])
        self.assertPassed(result)
        self.assertEqual(calls, [1])
        self.assertIn((b"X-User", b"alice"), result.forwarded)
        self.assertNotIn(b"root", b"".join(value for _, value in result.forwarded))
        self.assertEqual(result.context.claims["sub"], "alice")

    def test_expiresAtExp(self) -> None:
        """A cached token is refused once its exp passes, without a signature check."""
        calls = self.countVerifications()
        bearer = self.rs256()
        credentials = token({"sub": "alice", "exp": int(NOW) + 100}, "RS256", RSA_KEY)
        self.assertPassed(self.through(bearer, credentials))
        self.clock.advance(99)
        self.assertPassed(self.through(bearer, credentials))
        self.clock.advance(1)
        self.assertRefused(self.through(bearer, credentials), 403, "token expired 0 s ago")
        self.assertEqual(calls, [1])

    def test_lifetime(self) -> None:
        """A long-lived token's signature is checked again after five minutes."""
        calls = self.countVerifications()
        bearer = self.rs256()
        credentials = token({"sub": "alice", "exp": int(NOW) + 86400}, "RS256", RSA_KEY)
        self.assertPassed(self.through(bearer, credentials))
        self.clock.advance(299)
        self.assertPassed(self.through(bearer, credentials))
        self.assertEqual(calls, [1])
        self.clock.advance(1)
        self.assertPassed(self.through(bearer, credentials))
        self.assertEqual(calls, [2])

    def test_bounded(self) -> None:
        """The least recently used token leaves a full cache; a refused token is never cached."""
        calls = self.countVerifications()
        bearer = self.rs256(**{"cache-size": 2})
        first, second, third = (token({"sub": f"u{i}", "exp": int(NOW) + 9}, "RS256", RSA_KEY) for i in range(3))
        for credentials in (first, second, first, third, first, second):
            self.assertIsNone(self.through(bearer, credentials).verdict)
        self.assertEqual(calls, [4])  # first, second, third, then second again: it was the oldest when third came
        bad = token(algorithm="RS256", key=OTHER_RSA_KEY)
        for _ in range(2):
            self.assertEqual(self.through(bearer, bad).status, 403)
        self.assertEqual(calls, [6])

    def test_disabled(self) -> None:
        calls = self.countVerifications()
        bearer = self.rs256(**{"cache-size": 0})
        credentials = token(algorithm="RS256", key=RSA_KEY)
        for _ in range(3):
            self.assertPassed(self.through(bearer, credentials))
        self.assertEqual(calls, [3])


class OptionTests(FilterTestCase):
    """Bad options are errors that name the option."""

    def assertBad(self, options: Mapping[str, object], *words: str) -> None:
        error = self.assertRaises(ValueError, self.build, options)
        for word in words:
            self.assertIn(word, str(error))

    def test_algorithms(self) -> None:
        self.assertBad({"secret": SECRET}, "algorithms", "required")
        self.assertBad({"algorithms": ["HS256", "none"], "secret": SECRET}, "algorithms", "none is never accepted")
        self.assertBad({"algorithms": ["HS512"], "secret": SECRET}, "algorithms", "HS512")

    def test_keys(self) -> None:
        self.assertBad({"algorithms": ["HS256"]}, "secret, secret-file, public-key-file, jwks-url")
        self.assertBad({"algorithms": ["HS256"], "secret": SECRET, "jwks-url": "https://x/"}, "one of")
        self.assertBad({"algorithms": ["HS256"], "secret": "short"}, "secret", "at least 32 bytes")
        self.assertBad({"algorithms": ["RS256"], "secret": SECRET}, "secret", "HS256 only")
        self.assertBad({"algorithms": ["HS256"], "secret": publicPEM(RSA_KEY).decode()}, "secret", "asymmetric")
        self.assertBad({"algorithms": ["RS256"], "public-key-file": "missing.pem"}, "public-key-file", "missing.pem")
        self.assertBad({"algorithms": ["RS256"], "public-key-file": self.writeFile("x", b"junk")}, "not a PEM")
        p384 = self.writeFile("p384.pem", publicPEM(ec.generate_private_key(ec.SECP384R1())))
        self.assertBad({"algorithms": ["ES256"], "public-key-file": p384}, "public-key-file", "none of")
        self.assertBad({"algorithms": ["ES256"], "public-key-file": self.writeFile("r", publicPEM(RSA_KEY))}, "RS256")
        self.assertBad({"algorithms": ["RS256"], "jwks-url": "file:///etc/passwd"}, "jwks-url", "not an http")
        self.assertBad({"algorithms": ["RS256"], "jwks-url": "https://x/?k=1", "jwks-refresh": 0}, "refresh")
        self.assertBad({"algorithms": ["RS256"], "jwks-url": "https://u:pw@x/"}, "user information")

    def test_jwksOptionsNeedURL(self) -> None:
        self.assertBad(
            {"algorithms": ["HS256"], "secret": SECRET, "jwks-refresh": 60}, "unknown option", "jwks-refresh"
        )

    def test_secretNotShown(self) -> None:
        """Errors about a JWKS URL show it without the credentials it may hold; errors never show a secret."""
        for url in ("https://user:pw@x/?key=hidden", "ftp://user:pw@x/?key=hidden"):
            error = self.assertRaises(ValueError, self.build, {"algorithms": ["RS256"], "jwks-url": url})
            self.assertIn("://x/", str(error))
            self.assertNotIn("pw", str(error))
            self.assertNotIn("hidden", str(error))
        error = self.assertRaises(ValueError, self.build, {"algorithms": ["HS256"], "secret": "hidden-but-short"})
        self.assertNotIn("hidden", str(error))

    def test_other(self) -> None:
        base = {"algorithms": ["HS256"], "secret": SECRET}
        self.assertBad({**base, "realm": 'a"b'}, "realm")
        self.assertBad({**base, "claims-to-headers": {"sub": "X User"}}, "claims-to-headers", "X User")
        self.assertBad({**base, "claims-to-headers": {"sub": "Authorization"}}, "claims-to-headers", "cannot carry")
        self.assertBad({**base, "claims-to-headers": {"sub": 3}}, "claims-to-headers")
        self.assertBad({**base, "cache-size": -1}, "cache-size")
        self.assertBad({**base, "leeway": "soon"}, "leeway")
        self.assertBad({**base, "forward-token": "yes"}, "forward-token")


class JWKSResource(resource.Resource):
    """
    A JWKS endpoint: serves C{document}, or answers 500, or never answers (C{mode}); counts its requests.
    """

    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.document = document
        self.mode = "serve"
        self.delay = 0.0
        self.requests = 0

    def render_GET(self, request: server.Request) -> bytes | int:
        self.requests += 1
        if self.mode == "hang":
            return server.NOT_DONE_YET
        if self.mode == "fail":
            request.setResponseCode(500)
            return b"identity provider down\n"
        request.setHeader(b"content-type", b"application/json")
        if self.delay:
            document = self.document
            reactor.callLater(self.delay, lambda: (request.write(document), request.finish()))
            return server.NOT_DONE_YET
        return self.document


class JWKSTestCase(unittest.TestCase):
    """A JWKS endpoint with the RSA key as C{k1}, and JWKS filters on the real reactor."""

    def setUp(self) -> None:
        self.jwks = JWKSResource(jwks(jwk(RSA_KEY, "k1")))
        self.url = startUpstream(self, server.Site(self.jwks)).url + "/jwks.json"
        self.log = LogCapture(self)

    def bearer(self, url: str | None = None, **options: object) -> BearerFilter:
        built = jwtAuth.build(
            {"algorithms": ["RS256"], "jwks-url": url or self.url, "jwks-min-refresh": 0, **options},
            FilterEnvironment(reactor),
        )
        assert isinstance(built, BearerFilter)
        return built

    def signed(self, kid: str = "k1", key: Any = RSA_KEY, sub: str = "alice") -> str:
        return jwt.encode(
            {"sub": sub, "exp": int(reactor.seconds()) + 3600}, key, algorithm="RS256", headers={"kid": kid}
        )

    async def through(self, bearer: BearerFilter, credentials: str) -> FilterResult:
        request = inboundRequest(headers=[(b"authorization", b"Bearer " + credentials.encode())])
        return await runFilters([bearer], request)

    def warnings(self) -> list[str]:
        return [text for text in self.log.formatted() if "JWKS from" in text and "failed" in text]


class JWKSFilterTests(JWKSTestCase):
    """JWKS keys through L{runFilters} on the real reactor."""

    async def test_keys(self) -> None:
        bearer = self.bearer()
        self.assertIsNone((await self.through(bearer, self.signed())).verdict)
        self.assertEqual(self.jwks.requests, 1)
        self.assertIsNone((await self.through(bearer, self.signed(sub="bob"))).verdict)
        self.assertEqual(self.jwks.requests, 1)

    async def test_unknownKid(self) -> None:
        """A kid the JWKS lacks is refused, after one early refresh per jwks-min-refresh."""
        bearer = self.bearer(**{"jwks-min-refresh": 60})
        self.assertIsNone((await self.through(bearer, self.signed())).verdict)
        for _ in range(3):
            result = await self.through(bearer, self.signed("k9"))
            self.assertEqual(result.status, 403)
            self.assertIn(b"no key with kid 'k9'", result.body)
        self.assertEqual(self.jwks.requests, 1)  # the first fetch was less than 60 s ago

        eager = self.bearer()
        self.assertIsNone((await self.through(eager, self.signed())).verdict)
        self.assertEqual((await self.through(eager, self.signed("k9"))).status, 403)
        self.assertEqual(self.jwks.requests, 3)

    async def test_keyOfOtherAlgorithm(self) -> None:
        """
        With HS256 and RS256 allowed, an HS256 token naming the RSA key (signed with its PEM as an HMAC
        secret) is refused: a JWKS key verifies its own algorithm only.
        """
        bearer = jwtAuth.build({"algorithms": ["RS256", "HS256"], "jwks-url": self.url}, FilterEnvironment(reactor))
        assert isinstance(bearer, BearerFilter)
        forged = jwt.api_jws.PyJWS().encode(
            json.dumps({"sub": "admin", "exp": int(reactor.seconds()) + 60}).encode(),
            b"not-the-pem-but-signature-does-not-matter-here",
            algorithm="HS256",
            headers={"kid": "k1"},
        )
        result = await self.through(bearer, forged)
        self.assertEqual(result.status, 403)
        self.assertIn(b"the key with kid 'k1' is not for HS256", result.body)

    async def test_skipsUnusableKeys(self) -> None:
        """Keys for encryption, other algorithms or that PyJWT cannot read are left out; the others work."""
        self.jwks.document = jwks(
            {"kty": "RSA", "kid": "broken", "n": 5},
            {"kty": "RSA", "kid": "k0", "alg": [1]},
            jwk(OTHER_RSA_KEY, "k2", use="enc"),
            jwk(EC_KEY, "k3", ECAlgorithm),
            jwk(RSA_KEY, "k1"),
        )
        bearer = self.bearer()
        self.assertIsNone((await self.through(bearer, self.signed())).verdict)
        result = await self.through(bearer, self.signed("k2", OTHER_RSA_KEY))
        self.assertIn(b"no key with kid 'k2'", result.body)

    async def test_garbageFirst(self) -> None:
        """A first fetch that gives no keys is a 503 naming the URL and the problem, retried later."""
        cases = {
            b"<html>": "not JSON",
            b"[]": "not a JWKS",
            b'{"keys": {}}': "not a JWKS",
            b'{"keys": []}': "no usable signing key",
            jwks(jwk(EC_KEY, "e1", ECAlgorithm)): "no usable signing key for RS256 among its 1 keys",
            b'{"keys": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}": "not JSON",
            b"x" * (2 << 20): "the document is larger than 1048576 bytes",
        }
        for document, problem in cases.items():
            self.jwks.document = document
            bearer = self.bearer(**{"jwks-min-refresh": 30})
            result = await self.through(bearer, self.signed())
            self.assertEqual(result.status, 503)
            self.assertIn(f"JWKS from {self.url} unavailable: {problem}".encode(), result.body)
            assert isinstance(result.verdict, ProxyError)
            self.assertEqual(result.verdict.retryAfter, 30)
            self.assertTrue(any(problem in text and self.url in text for text in self.warnings()), problem)
            requests = self.jwks.requests
            self.assertEqual((await self.through(bearer, self.signed())).status, 503)
            self.assertEqual(self.jwks.requests, requests)

    async def test_unreachable(self) -> None:
        url = f"http://127.0.0.1:{freePort()}/jwks.json?token=hidden"
        result = await self.through(self.bearer(url), self.signed())
        self.assertEqual(result.status, 503)
        self.assertIn(b"JWKS from http://127.0.0.1:", result.body)
        self.assertIn(b"unavailable: Connection was refused by other side", result.body)
        for text in [result.body.decode(), *self.log.formatted()]:
            self.assertNotIn("hidden", text)

    async def test_cancelledWhileWaiting(self) -> None:
        """A client that leaves while the first fetch runs does not stop it for the others."""
        self.jwks.delay = 0.2
        bearer = self.bearer()
        request = inboundRequest(headers=[(b"authorization", b"Bearer " + self.signed().encode())])
        leaving = bearer.onRequest(
            RequestContext(request, OutboundRequest.fromInbound(request, ForwardingPolicy()), None)
        )
        assert isinstance(leaving, defer.Deferred)
        staying = runFilters([bearer], request)
        leaving.cancel()
        self.failureResultOf(leaving, defer.CancelledError)
        self.assertIsNone((await staying).verdict)
        self.assertEqual(self.jwks.requests, 1)


class JWKSProxyTests(JWKSTestCase):
    """A real proxy whose filter fetches a real JWKS endpoint; curl is the client."""

    def setUp(self) -> None:
        super().setUp()
        self.upstream = ScriptedUpstream(self, lambda proto, request: OK)
        self.proxy = startProxy(self, [self.upstream.url])

    async def get(self, credentials: str | None, port: int | None = None) -> tuple[int, bytes]:
        arguments = ["-s", "-i", f"http://127.0.0.1:{port or self.proxy.port}/resource"]
        if credentials is not None:
            arguments += ["-H", f"Authorization: Bearer {credentials}"]
        code, out, err = await curl(arguments, timeout=10)
        self.assertEqual(code, 0, err)
        return responseStatus(out), out

    def use(self, **options: object) -> None:
        useFilters(self.proxy, self.bearer(**{"claims-to-headers": {"sub": "X-User"}, **options}))

    async def test_rotation(self) -> None:
        """A token signed with a new key (new kid) is accepted once the JWKS has it; a retired key is refused."""
        self.use(**{"jwks-refresh": 0.2})
        status, _ = await self.get(self.signed())
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.requests[-1].headers(b"x-user"), [b"alice"])
        self.assertEqual(self.upstream.requests[-1].headers(b"authorization"), [])

        self.jwks.document = jwks(jwk(RSA_KEY, "k1"), jwk(OTHER_RSA_KEY, "k2"))
        status, _ = await self.get(self.signed("k2", OTHER_RSA_KEY, "bob"))
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.requests[-1].headers(b"x-user"), [b"bob"])
        self.assertEqual(self.jwks.requests, 2)

        self.jwks.document = jwks(jwk(OTHER_RSA_KEY, "k2"))  # k1 retired: honoured until the next refresh
        await sleep(0.25)
        self.assertEqual((await self.get(self.signed("k1", RSA_KEY, "carol")))[0], 200)
        self.assertTrue(await waitFor(lambda: self.jwks.requests == 3))
        status, body = await self.get(self.signed("k1", RSA_KEY, "dave"))
        self.assertEqual(status, 403)
        self.assertIn(b"no key with kid 'k1'", body)
        self.assertEqual(len(self.upstream.requests), 3)

    async def test_garbageKeepsKeys(self) -> None:
        self.use(**{"jwks-refresh": 0.2})
        self.assertEqual((await self.get(self.signed()))[0], 200)
        self.jwks.document = b"<html>oops</html>"
        await sleep(0.25)
        self.assertEqual((await self.get(self.signed(sub="bob")))[0], 200)  # starts a refresh, served from the old keys
        self.assertTrue(await waitFor(lambda: self.warnings(), 5))
        self.assertIn(f"JWKS from {self.url} failed, 1 keys kept: not JSON", self.warnings()[0])
        self.assertEqual((await self.get(self.signed(sub="carol")))[0], 200)
        self.assertEqual(self.upstream.requests[-1].headers(b"x-user"), [b"carol"])

    async def test_hangKeepsKeys(self) -> None:
        self.use(**{"jwks-refresh": 0.2, "jwks-timeout": 0.3})
        self.assertEqual((await self.get(self.signed()))[0], 200)
        self.jwks.mode = "hang"
        await sleep(0.25)
        self.assertEqual((await self.get(self.signed(sub="bob")))[0], 200)
        self.assertTrue(await waitFor(lambda: self.warnings(), 5))
        self.assertIn("1 keys kept: no answer within 0.3 s", self.warnings()[0])
        self.assertEqual((await self.get(self.signed(sub="carol")))[0], 200)
        # A new kid waits for a refresh, which times out too: the token is refused, not let through.
        status, body = await self.get(self.signed("k2", OTHER_RSA_KEY))
        self.assertEqual(status, 403)
        self.assertIn(b"no key with kid 'k2'", body)
        self.assertEqual(len(self.upstream.requests), 3)

    async def test_firstFetchFails(self) -> None:
        """No keys at all: 503, never a pass; another proxy without the filter is unaffected."""
        other = startProxy(self, [self.upstream.url])
        self.jwks.mode = "fail"
        self.use(**{"jwks-min-refresh": 30})
        status, body = await self.get(self.signed())
        self.assertEqual(status, 503)
        self.assertIn(f"JWKS from {self.url} unavailable: HTTP status 500".encode(), body)
        self.assertEqual(headerValues(body.split(b"\r\n\r\n")[0], b"retry-after"), [b"30"])
        self.assertEqual((await self.get(None, other.port))[0], 200)
        self.assertEqual(self.upstream.requests[-1].headers(b"x-user"), [])
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual((await self.get(None))[0], 401)

    async def test_concurrentFirstRequests(self) -> None:
        """Requests arriving while the first fetch runs wait for it; it runs once."""
        self.jwks.delay = 0.3
        self.use()
        results = await defer.gatherResults(
            [defer.ensureDeferred(self.get(self.signed(sub=f"u{i}"))) for i in range(4)]
        )
        self.assertEqual([status for status, _ in results], [200] * 4)
        self.assertEqual(self.jwks.requests, 1)
        self.assertEqual(sorted(r.headers(b"x-user")[0] for r in self.upstream.requests), [b"u0", b"u1", b"u2", b"u3"])

    async def test_forgedHeaderThroughProxy(self) -> None:
        self.use()
        arguments = ["-s", "-i", self.proxy.url + "/", "-H", f"Authorization: Bearer {self.signed()}"]
        code, out, _ = await curl([*arguments, "-H", "X-User: root"])
        self.assertEqual(responseStatus(out), 200)
        self.assertEqual(self.upstream.requests[-1].headers(b"x-user"), [b"alice"])
        code, out, _ = await curl(["-s", "-i", self.proxy.url + "/", "-H", "X-User: root"])
        self.assertEqual(responseStatus(out), 401)
        self.assertEqual(headerValues(out.split(b"\r\n\r\n")[0], b"www-authenticate"), [b'Bearer realm="rproxy"'])
        self.assertEqual(len(self.upstream.requests), 1)
