"""Make ``twist rproxy`` and ``twistd rproxy`` available (a Twisted dropin: no __init__.py here)."""

from typing import Any

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker


class _ProxyServiceMaker(ServiceMaker):
    """Choosing the rproxy subcommand installs rproxy's reactor, unless one was chosen before it."""

    @property
    def options(self) -> Any:
        from rproxy.app.reactor import installUnlessChosen

        installUnlessChosen()
        return super().options


rproxy = _ProxyServiceMaker(
    "rproxy",
    "rproxy.app.tap",
    "A streaming HTTP/1.1 reverse proxy with pooled upstream connections.",
    "rproxy",
)

rproxyReactor = Reactor(
    "rproxy",
    "rproxy.app.reactor",
    "epoll, sending what each loop turn wrote at the end of the turn (rproxy's default; Linux)",
)
