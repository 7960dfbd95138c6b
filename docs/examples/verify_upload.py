"""
How an upstream checks the signed field rproxy's upload filter sends (docs/filters/upload.md).

Copy this function into the application behind rproxy; it needs only PyJWT (``pip install pyjwt[crypto]``).
rproxy's tests run this file as it is (rproxy/test/upload_upstream.py imports it).
"""

import hashlib

import jwt


def verifyUpload(token, key, algorithm, method, path, body):
    """
    The claims of the upload token ``token`` (the ``Rproxy-Upload`` field's value), once checked against the
    request that carried it: its ``method`` and ``path`` (str, the path and query as received) and its
    ``body`` (bytes, exactly as received).  ``key`` is the HS256 shared secret (bytes), or the public key
    (PEM) of the private key rproxy signs with.  Raises ``jwt.InvalidTokenError`` if anything does not match.
    """
    claims = jwt.decode(
        token,
        key,
        algorithms=[algorithm],  # exactly the one configured: never let the token choose
        issuer="rproxy",
        options={"require": ["exp", "iat", "iss"]},
    )
    if claims.get("method") != method or claims.get("path") != path:
        raise jwt.InvalidTokenError("the token was issued for another request")
    if claims.get("body_sha256") != hashlib.sha256(body).hexdigest() or claims.get("body_size") != len(body):
        raise jwt.InvalidTokenError("the body is not the one the token was issued for")
    return claims  # claims["objects"]: each stored object's field, filename, key, location, size, sha256
