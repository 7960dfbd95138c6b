"""
The signed field that tells the upstream what the proxy stored: a JWT (PyJWT) over the forwarded request.

The upstream cannot see the body the client sent, only the request the proxy forwards after storing it:
no body, or a rewritten form.  So the token binds together what the upstream must trust: the method, the
target exactly as forwarded, the SHA-256 of the exact body bytes forwarded, each stored object (its key,
location, size and SHA-256) and an expiry.  A client cannot forge it (it lacks the key), replay it on
another path or with another form (the digests and the target would not match), or keep it for later
(C{exp}).  docs/filters/upload.md shows how an upstream verifies it.

The key is a shared secret (HS256, at least 32 bytes) or a private key in PEM (RS256, ES256, EdDSA), whose
public half the upstream holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from rproxy.upload.storage import StoredObject

#: The algorithms a signing key may be used with.
ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")

#: The C{iss} claim of every token.
ISSUER = "rproxy"

#: The shortest shared secret accepted for HS256 (RFC 7518 section 3.2: at least the hash's size).
MINIMUM_SECRET = 32


@dataclass(frozen=True)
class StoredField:
    """
    A stored object and what the client said of it.

    @ivar field: the form field it came in, or C{None} for a whole body.
    @ivar filename: the client's file name, sanitized (L{rproxy.upload.multipart.safeFilename}), if any.
    @ivar contentType: the media type the client gave it, if any.
    """

    stored: StoredObject
    field: str | None = None
    filename: str | None = None
    contentType: str | None = None

    def claim(self) -> dict[str, object]:
        """The object as the token lists it."""
        stored = self.stored
        return {
            "field": self.field,
            "filename": self.filename,
            "content_type": self.contentType,
            "key": stored.key,
            "location": stored.location,
            "size": stored.size,
            "sha256": stored.sha256,
        }


class UploadSigner:
    """
    Signs the forwarded requests of one filter.

    @ivar algorithm: one of L{ALGORITHMS}.
    @ivar expiry: seconds a token is valid for.
    """

    def __init__(self, key: bytes, algorithm: str, expiry: float, clock: Callable[[], float] = time.time) -> None:
        """
        @param key: the shared secret (HS256), or a PEM private key of the algorithm's kind.
        @raise ValueError: the key does not fit the algorithm (the message never quotes it).
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        self.algorithm = algorithm
        self.expiry = expiry
        self._clock = clock
        self._key: object = _checkedKey(key, algorithm)

    def __repr__(self) -> str:
        return f"<UploadSigner {self.algorithm}>"

    def sign(self, method: bytes, target: bytes, bodySha256: str, bodySize: int, objects: Sequence[StoredField]) -> str:
        """The token for a request forwarded with C{method}, C{target} and a body of that digest and size."""
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "iat": now,
            "exp": now + max(1, round(self.expiry)),
            "method": method.decode("ascii"),
            "path": target.decode("latin-1"),
            "body_sha256": bodySha256,
            "body_size": bodySize,
            "objects": [each.claim() for each in objects],
        }
        return jwt.encode(claims, self._key, algorithm=self.algorithm)  # type: ignore[arg-type]


def _checkedKey(key: bytes, algorithm: str) -> object:
    if algorithm == "HS256":
        secret = key.strip()
        if len(secret) < MINIMUM_SECRET:
            raise ValueError(f"an HS256 secret must be at least {MINIMUM_SECRET} bytes, got {len(secret)}")
        return secret
    try:
        private = load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"is not a PEM private key without a password ({type(e).__name__})") from None
    fits = {
        "RS256": lambda: isinstance(private, rsa.RSAPrivateKey) and private.key_size >= 2048,
        "ES256": lambda: isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1",
        "EdDSA": lambda: isinstance(private, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey),
    }[algorithm]
    if not fits():
        wanted = {"RS256": "an RSA key of 2048 bits or more", "ES256": "a P-256 EC key", "EdDSA": "an Ed25519 key"}
        raise ValueError(f"{algorithm} needs {wanted[algorithm]}")
    return private
