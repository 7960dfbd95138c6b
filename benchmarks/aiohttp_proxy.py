"""
A minimal streaming reverse proxy on aiohttp, the asyncio peer rproxy is compared with.

    python benchmarks/aiohttp_proxy.py --port 8082 --origin-port 9000

One shared C{ClientSession} keeps a pool of upstream connections; response bodies are relayed
chunk by chunk (C{iter_chunked} into a C{StreamResponse}) and request bodies are streamed too,
so no whole body is ever held in memory.  Hop-by-hop fields are dropped in both directions.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

#: Fields that describe one connection, not the message (lower case).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CHUNK = 65536

SESSION = web.AppKey("session", ClientSession)
ORIGIN = web.AppKey("origin", str)


def end_to_end(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """The end-to-end fields of C{headers}, duplicates kept."""
    fields: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            fields.add(name, value)
    return fields


async def proxy(request: web.Request) -> web.StreamResponse:
    """Relay C{request} to the origin and stream its response back."""
    url = URL(request.app[ORIGIN] + request.raw_path, encoded=True)
    async with request.app[SESSION].request(
        request.method,
        url,
        headers=end_to_end(request.headers),
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(end_to_end(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """The shared upstream session, closed on shutdown."""
    connector = TCPConnector(limit=512, keepalive_timeout=30)
    async with ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=ClientTimeout(total=None, sock_connect=5, sock_read=60),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    """Serve the proxy on 127.0.0.1 until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--origin-port", type=int, required=True, help="origin's port")
    args = parser.parse_args()
    app = web.Application()
    app[ORIGIN] = f"http://127.0.0.1:{args.origin_port}"
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
