"""
The fuzzer's seed corpus (fuzz/seeds/): valid HTTP/1.1 requests, the smuggling shapes that broke other
proxies, and HTTP/2 connections (preface, SETTINGS, HEADERS, DATA, CONTINUATION, resets, floods), so that
mutation starts from inputs that reach deep into both parsers instead of from noise.

The files are committed; this script writes them again (``python fuzz/seeds.py``) after a change here.
"""

from __future__ import annotations

import hashlib
import os

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

HTTP1 = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /echo?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
    b"GET /stream?n=2 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a:80/x HTTP/1.1\r\nHost: b\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD /large?size=10 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    # Smuggling shapes: CL.TE, TE.CL, TE.TE, 0.CL, CL.0, obs-fold, chunk-line tricks, size overflow.
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;\x00\r\nx\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\nx\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551617\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /%2e%2e/admin;x=1//b/../c HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
]


def frames(*items: object) -> bytes:
    return b"".join(item.serialize() for item in items)  # type: ignore[attr-defined]


def headersBlock(fields: list[tuple[bytes, bytes]]) -> bytes:
    return Encoder().encode(fields)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/echo")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/echo")]


def http2() -> list[bytes]:
    block = headersBlock(GET)
    return [
        PREFACE + frames(SettingsFrame(0), HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"])),
        PREFACE
        + frames(
            SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 10}),
            HeadersFrame(1, headersBlock(POST), flags=["END_HEADERS"]),
            DataFrame(1, b"hello", flags=["END_STREAM"]),
            WindowUpdateFrame(0, window_increment=1000),
        ),
        PREFACE
        + frames(
            SettingsFrame(0),
            HeadersFrame(1, block[:3]),
            ContinuationFrame(1, block[3:], flags=["END_HEADERS"]),
        ),
        PREFACE
        + frames(
            SettingsFrame(0),
            HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]),
            RstStreamFrame(1, error_code=8),
            HeadersFrame(3, block, flags=["END_HEADERS", "END_STREAM"]),
            RstStreamFrame(3, error_code=8),
        ),
        PREFACE + frames(SettingsFrame(0), *(PingFrame(0, opaque_data=b"12345678") for _ in range(8))),
        PREFACE + frames(SettingsFrame(0), PriorityFrame(1, depends_on=0, stream_weight=16), GoAwayFrame(0)),
        PREFACE
        + frames(
            SettingsFrame(0),
            HeadersFrame(
                1,
                headersBlock([*GET, (b"connection", b"keep-alive"), (b"x", b"a\r\nb"), (b"host", b"b")]),
                flags=["END_HEADERS", "END_STREAM"],
            ),
        ),
        PREFACE + frames(SettingsFrame(0), HeadersFrame(1, b"\x3f\xe1\xff\xff\x0f" + block, flags=["END_HEADERS"])),
    ]


def main() -> None:
    os.makedirs(SEEDS, exist_ok=True)
    for seed in [*HTTP1, *http2()]:
        name = hashlib.sha1(seed).hexdigest()  # libFuzzer names corpus files the same way
        with open(os.path.join(SEEDS, name), "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    main()
