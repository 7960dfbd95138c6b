"""
A forward auth service in its own process, for the tests of the C{forward-auth} filter::

    python -m rproxy.test.forwardauth_service PORT

It prints ``ready`` once it listens on 127.0.0.1:PORT, and answers by the path of its own URL:

    - C{/check}: a 302 to a login page when C{X-Forwarded-Uri} holds C{/login}; a 200 with
      C{X-Auth-User: alice}, C{X-Auth-Role: admin} and a C{Set-Cookie} for C{Authorization: Bearer good};
      else a 401 with C{WWW-Authenticate}, a C{Set-Cookie} and a body.
    - C{/big}: a 401 with a body of 1 MiB.
    - C{/garbage}: bytes that are not an HTTP response, then it closes the connection.
    - C{/close}: it closes the connection without answering.
    - C{/cut}: a 401 head promising 100 bytes of body, 2 of them, then it closes the connection.
    - C{/hang}: nothing, ever.
    - C{/stall}: a 200 head promising 100 bytes of body, 2 of them, then nothing.
    - C{/log}: a JSON list of the requests it received before (not C{/log} ones): C{path}, C{method}, C{body},
      C{headers} (lower-case name to values), C{lost}, whether the connection closed before it answered, and
      C{port}, the client's port (one per connection).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web import resource, server

LOGIN = b"https://login.example/start"


class _AuthService(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.log: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes | int:
        if request.path == b"/log":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.log).encode("utf-8")
        entry: dict[str, Any] = {
            "path": request.path.decode("latin-1"),
            "method": request.method.decode("latin-1"),
            "body": request.content.read().decode("latin-1") if request.content is not None else "",
            "headers": {
                name.decode("latin-1").lower(): [value.decode("latin-1") for value in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            "lost": False,
            "port": request.getClientAddress().port,
        }
        self.log.append(entry)
        request.notifyFinish().addErrback(lambda _: entry.update(lost=True))
        return self._answer(request)

    def _answer(self, request: server.Request) -> bytes | int:
        if request.path == b"/hang":
            return server.NOT_DONE_YET
        if request.path == b"/stall":
            request.setHeader(b"content-length", b"100")
            request.write(b"xx")
            return server.NOT_DONE_YET
        if request.path in (b"/garbage", b"/close", b"/cut"):
            transport = request.channel.transport
            if request.path == b"/garbage":
                transport.write(b"this is not HTTP\r\n\r\n")
            elif request.path == b"/cut":
                transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 100\r\n\r\nxx")
            transport.loseConnection()
            return server.NOT_DONE_YET
        if request.path == b"/big":
            request.setResponseCode(401)
            return b"x" * (1 << 20)
        uri = request.getHeader(b"x-forwarded-uri") or b""
        if b"/login" in uri:
            request.setResponseCode(302)
            request.setHeader(b"location", LOGIN)
            return b""
        request.setHeader(b"set-cookie", b"auth-session=s3cr3t; Path=/")
        if request.getHeader(b"authorization") == b"Bearer good":
            request.setHeader(b"x-auth-user", b"alice")
            request.setHeader(b"x-auth-role", b"admin")
            return b"welcome"
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="test"')
        request.setHeader(b"content-type", b"text/plain")
        return b"no entry without a good token\n"


def main(port: int) -> None:
    site = server.Site(_AuthService())
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.callWhenRunning(lambda: print("ready", flush=True))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]))
