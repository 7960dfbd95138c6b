"""
rproxy's HTTP/1.1 request-head parser against httptools (llhttp) and h11, per head, on one core.

    taskset -c 0 .venv/bin/python benchmarks/parsers.py

rproxy's figure is L{HTTP11Server._parseHead}: the syntax, then the framing and Host checks
(C{_checkFields}, printed apart, which rproxy would run whichever parser read the syntax).  httptools is
timed with a new parser per head and with one parser reused across keep-alive requests; h11 with a new
connection per head.  Two heads: a load generator's (three fields) and a browser's (eight).
"""

from __future__ import annotations

import timeit
import types
from collections.abc import Callable

import h11
import httptools

from rproxy.downstream.http1 import HTTP11Server
from rproxy.downstream.limits import ClientLimits

HEADS = {
    "3 fields": b"GET /1KiB.bin HTTP/1.1\r\nHost: 127.0.0.1:9902\r\nUser-Agent: wrk\r\nAccept: */*\r\n",
    "8 fields": (
        b"GET /1KiB.bin HTTP/1.1\r\nHost: 127.0.0.1:9902\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n"
        b"Cookie: session=abcdef0123456789\r\nCache-Control: no-cache\r\n"
    ),
}
RUNS = 100_000


def microseconds(function: Callable[[], object], runs: int = RUNS) -> float:
    """The mean time of one call of C{function}, in microseconds (the best of three rounds)."""
    return min(timeit.repeat(function, number=runs, repeat=3)) / runs * 1e6


class _Collector:
    """httptools' callbacks: the target and the fields, as rproxy would need them."""

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


def measure(label: str, head: bytes) -> None:
    """Print the time each parser takes to read C{head} (a request head without its final empty line)."""
    server = types.SimpleNamespace(_limits=ClientLimits(), _version=None, _persistent=True)
    server._checkFields = lambda *fields: HTTP11Server._checkFields(server, *fields)  # type: ignore[arg-type]
    raw = head + b"\r\n"
    whole = microseconds(lambda: HTTP11Server._parseHead(server, head[:-2]))  # type: ignore[arg-type]
    method, target, version, fields, _, _ = HTTP11Server._parseHead(server, head[:-2])  # type: ignore[arg-type]
    checks = microseconds(lambda: server._checkFields(method, target, version, fields))

    def fresh() -> None:
        httptools.HttpRequestParser(_Collector()).feed_data(raw)

    collector = _Collector()
    reused = httptools.HttpRequestParser(collector)

    def again() -> None:
        collector.fields = []
        reused.feed_data(raw)

    def withH11() -> None:
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(raw)
        connection.next_event()

    print(f"{label}:")
    print(f"  rproxy             {whole - checks:6.2f} us  (+ {checks:.2f} us of framing and Host checks)")
    print(f"  httptools, fresh   {microseconds(fresh):6.2f} us")
    print(f"  httptools, reused  {microseconds(again):6.2f} us")
    print(f"  h11                {microseconds(withH11, RUNS // 10):6.2f} us")


def main() -> None:
    """Print the time per head of each parser, for each head."""
    for label, head in HEADS.items():
        measure(label, head)


if __name__ == "__main__":
    main()
