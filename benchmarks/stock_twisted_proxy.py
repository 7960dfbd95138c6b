"""
The baseline: Twisted's stock C{twisted.web.proxy.ReverseProxyResource} in front of one origin.

    python benchmarks/stock_twisted_proxy.py --port 8081 --origin-port 9000

It is used as shipped (one HTTP/1.0 upstream connection per request, no flow control); only
the access log is turned off, as it is for every proxy the benchmark compares.
"""

from __future__ import annotations

import argparse

from twisted.internet import reactor
from twisted.web.http import Request
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class QuietSite(Site):
    """A C{Site} without an access log."""

    def log(self, request: Request) -> None:
        """Log nothing."""


def main() -> None:
    """Serve the stock reverse proxy on 127.0.0.1 until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--origin-port", type=int, required=True, help="origin's port")
    args = parser.parse_args()
    site = QuietSite(ReverseProxyResource("127.0.0.1", args.origin_port, b""))
    reactor.listenTCP(args.port, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
