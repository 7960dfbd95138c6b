"""Make ``twist rproxy`` and ``twistd rproxy`` available (a Twisted dropin: no __init__.py here)."""

from twisted.application.service import ServiceMaker

rproxy = ServiceMaker(
    "rproxy",
    "rproxy.tap",
    "A streaming HTTP/1.1 reverse proxy with pooled upstream connections.",
    "rproxy",
)
