"""
The handler of the "speed up a slow endpoint" example (README.md): C{/api/prices} answered in the proxy
from a table it keeps in memory, while every other request goes to the (slow) application.
"""

from __future__ import annotations

import json

from rproxy.local.handlers import HandlerRequest
from rproxy.proxy.message import LocalResponse

PRICES = {"apple": 120, "pear": 95, "plum": 60}


async def prices(request: HandlerRequest) -> LocalResponse:
    """All prices, or one (C{?item=apple}): a 404 for an item the table does not have."""
    item = request.args.get(b"item", [None])[0]
    if item is None:
        body = PRICES
    elif item.decode("utf-8", "replace") in PRICES:
        body = {item.decode(): PRICES[item.decode()]}
    else:
        return LocalResponse(404, [(b"Content-Type", b"application/json")], b'{"error": "no such item"}\n')
    fields = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60")]
    return LocalResponse(200, fields, json.dumps(body).encode() + b"\n")
