"""
An upstream server in its own process, for tests that kill and restart one::

    python -m rproxy.test.upstream_process PORT NAME

Answers every request with ``NAME METHOD <body length>`` after an optional delay (the ``delay`` query
argument, in seconds), and prints ``ready`` once it listens on 127.0.0.1:PORT.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web import resource, server


class _Answer(resource.Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render(self, request: server.Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        answer = b"%s %s %d" % (self.name, request.method, len(body))
        request.setHeader(b"content-type", b"text/plain")
        delay = float((request.args or {}).get(b"delay", [b"0"])[0])
        if not delay:
            return answer

        def respond() -> None:
            if not request._disconnected:
                request.write(answer)
                request.finish()

        reactor.callLater(delay, respond)  # type: ignore[attr-defined]
        return server.NOT_DONE_YET


def main(port: int, name: str) -> None:
    site = server.Site(_Answer(name.encode("ascii")))
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.callWhenRunning(lambda: print("ready", flush=True))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
