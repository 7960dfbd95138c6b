"""
The C{jwt} filter: a request passes only with a valid JSON Web Token in ``Authorization: Bearer``.

The token's signature is checked with PyJWT's algorithms (HS256, RS256, ES256, EdDSA) against a shared
secret, a PEM public key, or the keys of a JWKS URL, which are fetched with treq on the first request,
refreshed in the background, and kept when the endpoint fails (a gateway must not fall over because its
identity provider hiccups).  The time claims are checked here rather than by PyJWT, on the reactor's
clock, so that the filter runs the same under a test's C{Clock}; a verified token is cached until it
expires, so that a client sending the same token again costs no signature check.

A request without credentials or with a token that is not a JWT is answered 401 with a
``WWW-Authenticate: Bearer`` challenge; a well-formed token that fails verification (signature, time,
issuer, audience, algorithm, key) is answered 403 with the precise reason.  Neither the token nor any
secret ever goes into a reason or a log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import PyJWTError
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy.errors import ProxyError, clientError, proxyError
from rproxy.interfaces import FilterEnvironment, IRequestFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, RequestContext

_log = Logger()

#: The algorithms a token may be signed with; C{none} is never one of them.
SUPPORTED_ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")

#: The longest token looked at, in bytes (an ordinary JWT is well under 2 KiB).
MAX_TOKEN = 8192

#: The largest JWKS document read, in bytes.
MAX_JWKS = 1 << 20

#: How long a verified token is trusted without a new signature check, at most, in seconds (a key removed
#: from a JWKS stops being honoured at most this long after its last use was verified).
CACHE_LIFETIME = 300.0

#: A JWT in compact form: header, payload and signature in base64url (the signature of an unsecured token,
#: C{alg: none}, is empty: such a token is well-formed, and refused for its algorithm).
_COMPACT = re.compile(rb"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
#: Control characters a header value must not carry (HTAB is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Fields a claim may not be copied into: the proxy's framing and routing, and the credentials.
_RESERVED_FIELDS = frozenset(
    {"authorization", "connection", "content-length", "host", "keep-alive", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "proxy-authorization", "proxy-connection"}
)


class _Key(NamedTuple):
    """A key that verifies the signatures of one algorithm."""

    algorithm: str
    verifier: Algorithm
    key: Any
    kid: str | None


class _Token(NamedTuple):
    """A well-formed JWT, not verified yet."""

    algorithm: str
    kid: str | None
    signingInput: bytes
    signature: bytes
    claims: dict[str, Any]
    critical: bool


class _Verified(NamedTuple):
    """
    What a verified token gave, as cached.

    @ivar claims: its claims, read-only.
    @ivar user: the user claim, if it is a string.
    @ivar fields: the outbound fields its claims fill.
    @ivar trustedUntil: when its signature must be checked again (its expiry, or L{CACHE_LIFETIME}).
    """

    claims: Mapping[str, object]
    user: str | None
    fields: list[tuple[bytes, bytes]]
    trustedUntil: float


class _MalformedError(Exception):
    """The credentials are missing or are not a JWT: a 401."""

    def __init__(self, reason: str, error: str | None = "invalid_token") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class _RefusedError(Exception):
    """A well-formed token that fails verification: a 403."""


def _show(value: object, limit: int = 40) -> str:
    """A claim or header value for a reason: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decodeSegment(segment: bytes) -> bytes:
    if len(segment) % 4 == 1:
        raise ValueError("impossible base64url length")
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _refuseConstant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _jsonObject(segment: bytes, what: str) -> dict[str, Any]:
    """The JSON object a base64url segment encodes (NaN and Infinity are not JSON, and are refused)."""
    try:
        value = json.loads(_decodeSegment(segment), parse_constant=_refuseConstant)
    except (ValueError, RecursionError, binascii.Error):
        raise _MalformedError(f"the JWT {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise _MalformedError(f"the JWT {what} is not a JSON object")
    return value


def _parseToken(token: bytes) -> _Token:
    """
    Read a compact JWT without verifying it.

    @raise _MalformedError: when it is not three base64url parts, or its header or payload is not a JSON
        object, or its header has no algorithm or a C{kid} that is not a string.
    """
    parts = _COMPACT.fullmatch(token)
    if parts is None:
        raise _MalformedError("the bearer token is not a JWT (three base64url parts)")
    header = _jsonObject(parts.group(1), "header")
    claims = _jsonObject(parts.group(2), "payload")
    try:
        signature = _decodeSegment(parts.group(3))
    except (ValueError, binascii.Error):
        raise _MalformedError("the JWT signature is not base64url") from None
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or not algorithm:
        raise _MalformedError("the JWT header has no alg")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _MalformedError("the JWT kid is not a string")
    signingInput = parts.group(1) + b"." + parts.group(2)
    return _Token(algorithm, kid, signingInput, signature, claims, "crit" in header)


def _numericDate(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    try:  # an int past a float's range (10**400 is JSON) does not convert
        date = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        date = math.nan
    if not math.isfinite(date):
        raise _RefusedError(f"the {name} claim is not a NumericDate: {_show(value)}")
    return date


def _fieldText(value: object) -> str:
    """A claim as text for a header field: strings as they are, numbers and booleans as JSON has them."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise TypeError(value)


def _claimField(claim: str, value: object) -> bytes:
    """
    The value of the header field a claim is copied into: text and numbers as text, a list of them joined
    with C{", "}.

    @raise _RefusedError: when the claim is something else, or holds a control character (CR, LF, NUL, ...).
    """
    try:
        text = ", ".join(_fieldText(item) for item in value) if isinstance(value, list) else _fieldText(value)
    except TypeError:
        raise _RefusedError(f"the {claim} claim is not text, a number or a list of them") from None
    if _CONTROL.search(text):
        raise _RefusedError(f"the {claim} claim holds a control character and cannot be sent in a header field")
    return text.strip().encode("utf-8")


def _displayURL(url: str) -> str:
    """C{url} for reasons and logs: without its user information and query, where credentials may hide."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _LimitedBody(Protocol):
    """Collects a response body of at most C{limit} bytes; cancelling its Deferred stops the transfer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda d: self._producer.stopProducing())

    def connectionMade(self) -> None:
        self._producer = IPushProducer(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        self.parts.append(data)
        if self.size > self.limit:
            self.done.errback(ValueError(f"the document is larger than {self.limit} bytes"))
            self._producer.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _usableKeys(document: bytes, algorithms: Collection[str]) -> list[_Key]:
    """
    The signing keys of a JWKS document for C{algorithms} (keys for encryption or other algorithms are
    left out).

    @raise ValueError: when it is not a JWKS, or has no such key.
    """
    try:
        parsed = json.loads(document, parse_constant=_refuseConstant)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise ValueError('not a JWKS (a JSON object with a "keys" list)')
    keys = [_fromJWK(entry, algorithms) for entry in parsed["keys"]]
    usable = [key for key in keys if key is not None]
    if not usable:
        raise ValueError(f"no usable signing key for {', '.join(algorithms)} among its {len(keys)} keys")
    return usable


def _fromJWK(entry: object, algorithms: Collection[str]) -> _Key | None:
    """The key of one JWK, if it is a signing key for one of C{algorithms}; a key PyJWT cannot read is left out."""
    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
        return None
    try:
        jwk = PyJWK(entry)
        if jwk.algorithm_name not in algorithms:
            return None
        prepared = jwk.Algorithm.prepare_key(jwk.key)
    except (PyJWTError, TypeError, ValueError, KeyError, AttributeError):
        return None
    return (
        _Key(jwk.algorithm_name, jwk.Algorithm, prepared, jwk.key_id)
        if _curveFits(jwk.algorithm_name, prepared)
        else None
    )


def _curveFits(algorithm: str, key: object) -> bool:
    """
    Whether an elliptic-curve C{key} is on the curve C{algorithm} names (ES256: P-256); other keys fit.
    PyJWT 2.10.0 (the oldest admitted) does not check it.
    """
    if algorithm != "ES256":
        return True
    curve = getattr(key, "curve", None)
    return curve is not None and curve.name == "secp256r1"


def _describe(failure: Failure) -> str:
    """What went wrong, in one short line (the first cause of a failed HTTP exchange)."""
    if failure.check(ResponseFailed):
        failure = cast(ResponseFailed, failure.value).reasons[0]
    return failure.getErrorMessage()[:200] or type(failure.value).__name__


class _StaticKeys:
    """The one key of a secret or a public key file."""

    def __init__(self, key: _Key) -> None:
        self._key = key

    def select(self, token: _Token) -> list[_Key]:
        """The key, when it is for the token's algorithm (its C{kid}, if any, does not matter)."""
        if token.algorithm != self._key.algorithm:
            raise _RefusedError(f"no key for algorithm {token.algorithm}")
        return [self._key]


class _RemoteKeys:
    """
    The keys of a JWKS URL, fetched on first use and every C{refresh} seconds after, and early when a
    token names a key it does not know (at most once every C{minRefresh} seconds).  A failed fetch keeps
    the keys there are, and is retried after C{minRefresh} seconds.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        algorithms: Collection[str],
        refresh: float,
        minRefresh: float,
        timeout: float,
    ) -> None:
        self.url = url
        self.shown = _displayURL(url)
        self._reactor = reactor
        self._algorithms = algorithms
        self._refresh = refresh
        self._minRefresh = minRefresh
        self._timeout = timeout
        self._keys: list[_Key] | None = None
        self._problem = "not fetched yet"
        self._nextFetch = -math.inf
        self._lastFetch = -math.inf
        self._fetching = False
        self._waiters: list[Deferred[None]] = []

    def select(self, token: _Token) -> list[_Key] | Deferred[list[_Key]]:
        """
        The keys that may have signed C{token}, or a Deferred of them when a fetch must be waited for.

        @raise ProxyError: a 503 when there are no keys at all (the first fetch failed).
        @raise _RefusedError: when no key fits.
        """
        now = self._reactor.seconds()
        if not self._fetching and now >= self._nextFetch:
            self._fetch(now)
        if self._keys is None:
            if not self._fetching:
                raise self._unavailable(now)
            return self._wait().addCallback(lambda _: self._choose(token, early=False))
        return self._choose(token, early=True)

    def _choose(self, token: _Token, early: bool) -> list[_Key] | Deferred[list[_Key]]:
        if self._keys is None:
            raise self._unavailable(self._reactor.seconds())
        named = self._keys if token.kid is None else [key for key in self._keys if key.kid == token.kid]
        if not named:
            now = self._reactor.seconds()
            if early and (self._fetching or now >= self._lastFetch + self._minRefresh):
                if not self._fetching:
                    self._fetch(now)
                return self._wait().addCallback(lambda _: self._choose(token, early=False))
            raise _RefusedError(f"no key with kid {_show(token.kid)}")
        keys = [key for key in named if key.algorithm == token.algorithm]
        if keys:
            return keys
        if token.kid is None:
            raise _RefusedError(f"no key for algorithm {token.algorithm}")
        raise _RefusedError(f"the key with kid {_show(token.kid)} is not for {token.algorithm}")

    def _unavailable(self, now: float) -> ProxyError:
        retry = max(1, math.ceil(self._nextFetch - now))
        return proxyError(503, f"JWKS from {self.shown} unavailable: {self._problem}", "proxy_internal_error", retry)

    def _wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _fetch(self, now: float) -> None:
        self._fetching = True
        self._lastFetch = now
        fetching = ensureDeferred(self._download())
        deadline = self._reactor.callLater(self._timeout, fetching.cancel)
        fetching.addCallbacks(self._fetched, self._failed, (deadline,), errbackArgs=(deadline,))

    async def _download(self) -> list[_Key]:
        import treq  # with twisted.web.client's Agent: for a JWKS URL only

        response = await treq.get(
            self.url,
            headers=Headers({b"Accept": [b"application/jwk-set+json, application/json"]}),
            reactor=self._reactor,
            persistent=False,
            unbuffered=True,
        )
        body = _LimitedBody(MAX_JWKS)
        response.deliverBody(body)
        document = await body.done
        if response.code != 200:
            raise ValueError(f"HTTP status {response.code}")
        return _usableKeys(document, self._algorithms)

    def _fetched(self, keys: list[_Key], deadline: IDelayedCall) -> None:
        deadline.cancel()
        self._keys = keys
        self._problem = ""
        self._nextFetch = self._reactor.seconds() + self._refresh
        _log.info("JWKS from {url}: {count} keys", url=self.shown, count=len(keys))
        self._done()

    def _failed(self, failure: Failure, deadline: IDelayedCall) -> None:
        if deadline.active():
            deadline.cancel()
            self._problem = _describe(failure)
        else:
            self._problem = f"no answer within {self._timeout:g} s"
        self._nextFetch = self._reactor.seconds() + self._minRefresh
        kept = 0 if self._keys is None else len(self._keys)
        _log.warn(
            "JWKS from {url} failed, {kept} keys kept: {problem}", url=self.shown, kept=kept, problem=self._problem
        )
        self._done()

    def _done(self) -> None:
        self._fetching = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)


@implementer(IRequestFilter)
class BearerFilter:
    """
    Lets a request through when its ``Authorization: Bearer`` token is a valid JWT; notes the user and
    the claims on the context and copies claims into outbound fields.  L{jwtAuth} builds it from a
    C{[filters.X]} table (L{buildBearerFilter}); its keyword parameters are the table's options.

    @ivar consumes: C{authorization}, unless the token is forwarded, and the fields claims are copied to.
    """

    def __init__(
        self,
        keys: _StaticKeys | _RemoteKeys,
        reactor: Any,
        algorithms: Collection[str],
        *,
        realm: str = "rproxy",
        leeway: float = 0.0,
        require: Sequence[str] = ("exp",),
        issuer: str | None = None,
        audience: Collection[str] = (),
        claimFields: Mapping[str, str] | None = None,
        forwardToken: bool = False,
        userClaim: str = "sub",
        cacheSize: int = 4096,
    ) -> None:
        self._keys = keys
        self._reactor = reactor
        self._algorithms = frozenset(algorithms)
        self._realm = realm
        self._leeway = leeway
        self._require = tuple(require)
        self._issuer = issuer
        self._audience = frozenset(audience)
        self._claimFields = {claim: field.encode("ascii") for claim, field in (claimFields or {}).items()}
        self._userClaim = userClaim
        self._cacheSize = cacheSize
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        # The claim fields too: what a client sends of them must never reach the upstream (the chain removes
        # them before any filter runs; this one sets them from the verified claims).
        credentials = frozenset() if forwardToken else frozenset({b"authorization"})
        self.consumes: frozenset[bytes] = credentials | {field.lower() for field in self._claimFields.values()}

    def onRequest(self, context: RequestContext) -> FilterVerdict | Deferred[FilterVerdict]:
        try:
            token = self._credentials(context)
            digest = hashlib.sha256(token).digest()
            cached = self._cached(digest)
            if cached is not None:
                self._accept(context, cached)
                return None
            parsed = _parseToken(token)
            keys = self._select(parsed)
        except _MalformedError as e:
            return self._unauthorized(e)
        except _RefusedError as e:
            return self._forbidden(str(e))
        except ProxyError as e:
            return e
        if isinstance(keys, Deferred):
            return keys.addCallback(self._checked, parsed, digest, context).addErrback(self._refusedLater)
        return self._checked(keys, parsed, digest, context)

    def _credentials(self, context: RequestContext) -> bytes:
        values = context.inbound.headers.getRawHeaders(b"authorization") or []
        if not values:
            raise _MalformedError("no Authorization field: a bearer token is required", None)
        if len(values) > 1:
            raise _MalformedError("more than one Authorization field", "invalid_request")
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            raise _MalformedError("the Authorization field is not a bearer token", None)
        token = token.strip()
        if len(token) > MAX_TOKEN:
            raise _MalformedError(f"the bearer token is longer than {MAX_TOKEN} bytes")
        return token

    def _select(self, token: _Token) -> list[_Key] | Deferred[list[_Key]]:
        if token.algorithm.lower() == "none":
            raise _RefusedError("algorithm none is not allowed")
        if token.algorithm not in self._algorithms:
            raise _RefusedError(f"algorithm {_show(token.algorithm)} is not allowed")
        if token.critical:
            raise _RefusedError("the JWT has critical header parameters, none of which is supported")
        return self._keys.select(token)

    def _checked(self, keys: list[_Key], token: _Token, digest: bytes, context: RequestContext) -> FilterVerdict:
        try:
            verified = self._verify(keys, token)
        except _RefusedError as e:
            return self._forbidden(str(e))
        self._remember(digest, verified)
        self._accept(context, verified)
        return None

    def _refusedLater(self, failure: Failure) -> FilterVerdict:
        """The answer when the keys, once fetched, refuse the token (or there are still none: a 503)."""
        if failure.check(_RefusedError):
            return self._forbidden(failure.getErrorMessage())
        failure.trap(ProxyError)
        return cast(ProxyError, failure.value)

    def _verify(self, keys: Iterable[_Key], token: _Token) -> _Verified:
        if not any(key.verifier.verify(token.signingInput, key.key, token.signature) for key in keys):
            raise _RefusedError("signature does not verify")
        claims = token.claims
        for name in self._require:
            if claims.get(name) is None:
                raise _RefusedError(f"the token has no {name} claim")
        now = self._reactor.seconds()
        expires = self._checkTime(claims, now)
        self._checkIssuer(claims)
        self._checkAudience(claims)
        fields = [
            (field, _claimField(claim, claims[claim]))
            for claim, field in self._claimFields.items()
            if claims.get(claim) is not None
        ]
        user = claims.get(self._userClaim)
        trustedUntil = min(expires, now + CACHE_LIFETIME)
        return _Verified(MappingProxyType(claims), user if isinstance(user, str) else None, fields, trustedUntil)

    def _checkTime(self, claims: Mapping[str, object], now: float) -> float:
        """Refuse a token outside its validity (with the leeway); return when it expires (C{inf}: never)."""
        notBefore = _numericDate(claims, "nbf")
        if notBefore is not None and now + self._leeway < notBefore:
            raise _RefusedError(f"the token is not valid for another {math.ceil(notBefore - now)} s")
        expiry = _numericDate(claims, "exp")
        if expiry is None:
            return math.inf
        if now >= expiry + self._leeway:
            raise _RefusedError(f"token expired {int(now - expiry)} s ago")
        return expiry + self._leeway

    def _checkIssuer(self, claims: Mapping[str, object]) -> None:
        if self._issuer is None:
            return
        issuer = claims.get("iss")
        if issuer is None:
            raise _RefusedError("the token has no iss claim")
        if issuer != self._issuer:
            raise _RefusedError(f"the token's issuer {_show(issuer)} is not {self._issuer!r}")

    def _checkAudience(self, claims: Mapping[str, object]) -> None:
        if not self._audience:
            return
        audience = claims.get("aud")
        if audience is None:
            raise _RefusedError("the token has no aud claim")
        named = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        if not any(isinstance(each, str) and each in self._audience for each in named):
            raise _RefusedError(f"the token's audience {_show(audience)} is not {' or '.join(sorted(self._audience))}")

    def _cached(self, digest: bytes) -> _Verified | None:
        verified = self._cache.get(digest)
        if verified is None:
            return None
        now = self._reactor.seconds()
        try:
            self._checkTime(verified.claims, now)
        except _RefusedError:
            del self._cache[digest]
            raise
        if now >= verified.trustedUntil:
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return verified

    def _remember(self, digest: bytes, verified: _Verified) -> None:
        if not self._cacheSize:
            return
        self._cache[digest] = verified
        if len(self._cache) > self._cacheSize:
            self._cache.popitem(last=False)

    def _accept(self, context: RequestContext, verified: _Verified) -> None:
        if verified.fields:
            headers = context.outbound.headers
            for field, value in verified.fields:
                headers.setRawHeaders(field, [value])
        context.user = verified.user
        context.claims = verified.claims

    def _challenge(self, error: str | None) -> list[tuple[bytes, bytes]]:
        value = f'Bearer realm="{self._realm}"' + (f', error="{error}"' if error else "")
        return [(b"WWW-Authenticate", value.encode("ascii"))]

    def _unauthorized(self, malformed: _MalformedError) -> ProxyError:
        return clientError(401, malformed.reason, self._challenge(malformed.error))

    def _forbidden(self, reason: str) -> ProxyError:
        return clientError(403, reason, self._challenge("invalid_token"))


def _readFile(environment: FilterEnvironment, reader: PluginOptions, option: str, path: str) -> bytes:
    try:
        with open(os.path.join(environment.base, path), "rb") as f:
            return f.read()
    except OSError as e:
        raise reader.error(option, f"cannot read {path!r}: {e.strerror}") from None


def _secretKey(secret: bytes, reader: PluginOptions, option: str) -> _Key:
    if len(secret) < 32:
        raise reader.error(option, f"an HS256 secret must be at least 32 bytes (RFC 7518 3.2), not {len(secret)}")
    verifier = get_default_algorithms()["HS256"]
    try:
        return _Key("HS256", verifier, verifier.prepare_key(secret), None)
    except PyJWTError as e:
        raise reader.error(option, str(e)) from None


def _publicKey(pem: bytes, algorithms: Collection[str], reader: PluginOptions) -> _Key:
    try:
        public: Any = load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            public = x509.load_pem_x509_certificate(pem).public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise reader.error("public-key-file", "not a PEM public key or certificate") from None
    fitting = []
    for name in SUPPORTED_ALGORITHMS:
        verifier = get_default_algorithms()[name]
        try:
            prepared = verifier.prepare_key(public)
        except (PyJWTError, TypeError, ValueError):
            continue
        if _curveFits(name, prepared):
            fitting.append(_Key(name, verifier, prepared, None))
    if len(fitting) != 1 or {fitting[0].algorithm} != set(algorithms):
        kind = fitting[0].algorithm if len(fitting) == 1 else "none of " + ", ".join(SUPPORTED_ALGORITHMS)
        raise reader.error("public-key-file", f"the key is for {kind}, and algorithms lists {', '.join(algorithms)}")
    return fitting[0]


def _algorithms(reader: PluginOptions) -> tuple[str, ...]:
    algorithms = reader.strings("algorithms")
    if not algorithms:
        raise reader.error("algorithms", f"required: a list of {', '.join(SUPPORTED_ALGORITHMS)}")
    for name in algorithms:
        if name.lower() == "none":
            raise reader.error("algorithms", "none is never accepted: an unsigned token proves nothing")
        if name not in SUPPORTED_ALGORITHMS:
            raise reader.error("algorithms", f"unknown algorithm {name!r} (known: {', '.join(SUPPORTED_ALGORITHMS)})")
    return algorithms


def _keySource(
    reader: PluginOptions, environment: FilterEnvironment, algorithms: tuple[str, ...]
) -> _StaticKeys | _RemoteKeys:
    sources = {name: reader.text(name) for name in ("secret", "secret-file", "public-key-file", "jwks-url")}
    given = {name: value for name, value in sources.items() if value is not None}
    if len(given) != 1:
        raise ValueError(
            f"filter {reader.name}: give one of secret, secret-file, public-key-file, jwks-url (got {len(given)})"
        )
    ((option, value),) = given.items()
    if option == "jwks-url":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise reader.error(option, f"not an http or https URL: {_displayURL(value)!r}")
        if "@" in parts.netloc:
            raise reader.error(option, f"user information in the URL is not supported: {_displayURL(value)!r}")
        refresh = reader.duration("jwks-refresh", 300.0)
        if refresh <= 0:
            raise reader.error("jwks-refresh", "must be more than 0")
        minRefresh = reader.duration("jwks-min-refresh", 30.0)
        timeout = reader.duration("jwks-timeout", 5.0)
        if timeout <= 0:
            raise reader.error("jwks-timeout", "must be more than 0")
        return _RemoteKeys(value, environment.reactor, algorithms, refresh, minRefresh, timeout)
    if option == "public-key-file":
        return _StaticKeys(_publicKey(_readFile(environment, reader, option, value), algorithms, reader))
    if set(algorithms) != {"HS256"}:
        raise reader.error(option, f"a secret verifies HS256 only, and algorithms lists {', '.join(algorithms)}")
    secret = (
        value.encode("utf-8") if option == "secret" else _readFile(environment, reader, option, value).rstrip(b"\r\n")
    )
    return _StaticKeys(_secretKey(secret, reader, option))


def _claimFields(reader: PluginOptions) -> dict[str, str]:
    fields = {}
    for claim, field in reader.table("claims-to-headers").items():
        if not isinstance(field, str) or not _FIELD_NAME.fullmatch(field):
            raise reader.error("claims-to-headers", f"{claim}: not a header field name: {field!r}")
        if field.lower() in _RESERVED_FIELDS:
            raise reader.error("claims-to-headers", f"{claim}: {field} cannot carry a claim")
        fields[claim] = field
    return fields


def buildBearerFilter(reader: PluginOptions, environment: FilterEnvironment) -> BearerFilter:
    """A L{BearerFilter} from the options of a C{[filters.X]} table with C{type = "jwt"}."""
    algorithms = _algorithms(reader)
    keys = _keySource(reader, environment, algorithms)
    realm = reader.text("realm", "rproxy") or "rproxy"
    if not _QUOTABLE.fullmatch(realm):
        raise reader.error("realm", f"must be printable ASCII without quotes or backslashes: {realm!r}")
    return BearerFilter(
        keys,
        environment.reactor,
        algorithms,
        realm=realm,
        leeway=reader.duration("leeway", 0.0),
        require=reader.strings("require", ("exp",)),
        issuer=reader.text("issuer"),
        audience=reader.strings("audience"),
        claimFields=_claimFields(reader),
        forwardToken=reader.flag("forward-token", False),
        userClaim=reader.text("user-claim", "sub") or "sub",
        cacheSize=reader.integer("cache-size", 4096) or 0,
    )
