"""
A sample upstream behind the C{upload} filter: it verifies the signed field with the documented snippet
(docs/examples/verify_upload.py, imported from its file as a user would copy it) and answers by what it found.

    - a token that verifies: C{201} with the claims as JSON (C{422} instead when the path holds C{/reject}:
      an upstream that refuses the upload after reading it);
    - no token, or one that does not verify (tampered, expired, issued for another request): C{403} with the
      reason.

Each request is recorded in L{UploadUpstream.received}.  Run alone (docs/filters/upload.md does)::

    python -m rproxy.test.upload_upstream PORT SECRET-FILE
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import jwt
from twisted.web import resource, server

import rproxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rproxy.__file__)))
SNIPPET = os.path.join(ROOT, "docs", "examples", "verify_upload.py")


def loadSnippet() -> ModuleType:
    """docs/examples/verify_upload.py as a module."""
    spec = importlib.util.spec_from_file_location("verify_upload", SNIPPET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Received:
    """One request as the upstream saw it, and what it decided."""

    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    claims: dict[str, Any] | None = None
    refusal: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class UploadUpstream(resource.Resource):
    """
    The upstream.

    @ivar key: the verification key (the shared secret, or a public key in PEM).
    @ivar algorithm: the one algorithm accepted.
    @ivar header: the signed field's name.
    """

    isLeaf = True

    def __init__(self, key: bytes, algorithm: str = "HS256", header: bytes = b"rproxy-upload") -> None:
        super().__init__()
        self.key = key
        self.algorithm = algorithm
        self.header = header
        self.received: list[Received] = []
        self._verify = loadSnippet().verifyUpload

    def render(self, request: server.Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        headers = {name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()}
        seen = Received(request.method, request.uri, headers, body)
        self.received.append(seen)
        tokens = headers.get(self.header, [])
        try:
            if len(tokens) != 1:
                raise jwt.InvalidTokenError(f"expected one {self.header.decode()} field, got {len(tokens)}")
            seen.claims = self._verify(
                tokens[0].decode("ascii"),
                self.key,
                self.algorithm,
                request.method.decode("ascii"),
                request.uri.decode("latin-1"),
                body,
            )
        except jwt.InvalidTokenError as e:
            seen.refusal = str(e)
            request.setResponseCode(403)
            return f"bad upload token: {e}\n".encode()
        request.setResponseCode(422 if b"/reject" in request.uri else 201)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(seen.claims).encode("utf-8")


def main(port: int, keyFile: str) -> None:
    """Serve on 127.0.0.1:C{port} with the HS256 secret in C{keyFile}; print C{ready} once listening."""
    from twisted.internet import reactor

    with open(keyFile, "rb") as f:
        key = f.read().strip()
    reactor.listenTCP(port, server.Site(UploadUpstream(key)), interface="127.0.0.1")  # type: ignore[attr-defined]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]), sys.argv[2])
