"""
``twist`` on Twisted's asyncio reactor over a uvloop event loop: the benchmark's ``rproxy-uvloop`` row.

    python benchmarks/uvloop_twist.py rproxy --listen tcp:8080 --upstream http://127.0.0.1:9000

``twist --reactor asyncio`` runs the asyncio reactor on asyncio's own loop; uvloop's has to be made the
loop before the reactor is installed, which no ``twist`` option does.
"""

from __future__ import annotations

import asyncio
import runpy
import sys

import uvloop
from twisted.internet import asyncioreactor


def main() -> None:
    """Install the reactor on a uvloop loop, then run ``python -m twisted`` (twist) with our arguments."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    sys.argv = ["twist", *sys.argv[1:]]
    runpy.run_module("twisted", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
