"""
The static-file part of ``make bench``: rproxy serving files from a local static route (rproxy.local) against
nginx serving the same files, each on the proxy CPU, in the same run.

Both serve the origin's directory (``1KiB.bin`` under wrk, ``100MiB.bin`` downloaded with curl): nginx with
``root`` and ``sendfile on`` (one worker, access log off), rproxy with ``local = { static = ... }`` as its
catch-all route and ``--access-log off``.  The ratios are rproxy's figure over nginx's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness import (
    HOST,
    LARGE_NAME,
    LARGE_SIZE,
    VENV_BIN,
    Bench,
    BenchError,
    CpuMeter,
    Server,
    download_mib_s,
    free_port,
    nginx_argv,
    nginx_config,
    pinned,
    run_wrk,
)

#: The file servers, in the order they run.
STATIC_SERVERS = ("rproxy-static", "nginx-static")
#: The small file wrk requests.
STATIC_SMALL = "1KiB"
#: The least of nginx's figures rproxy's must reach (both the 1 KiB req/s and the 100 MiB download).
STATIC_TARGET = 0.5


def static_argv(bench: Bench, name: str, port: int) -> list[str]:
    """The command (not yet pinned) of file server C{name} on C{port}, serving the origin's files."""
    www = bench.workdir / "www"
    if name == "rproxy-static":
        config = bench.workdir / "static.toml"
        config.write_text(
            f'upstream = "http://{HOST}:{bench.origin_port}"\n\n'
            f'[[routes]]\nlocal = {{ static = "{www}" }}\n\n'
            '[[routes]]\npath-prefix = "/proxied"\nservice = "default"\n'
        )
        listen = f"tcp:{port}:interface={HOST}"
        return [str(VENV_BIN / "twist"), "rproxy", "--listen", listen, "--config", str(config), "--access-log", "off"]
    if name == "nginx-static":
        prefix = bench.workdir / f"nginx-static-{port}"
        config = nginx_config(prefix, port, f"        root {www};\n        sendfile on;\n        tcp_nopush on;")
        return nginx_argv(bench.tools["nginx"], prefix, config)
    raise BenchError(f"unknown file server {name!r}; known: {', '.join(STATIC_SERVERS)}")


@contextmanager
def static_server(bench: Bench, name: str) -> Iterator[tuple[Server, str]]:
    """Run file server C{name} on the proxy CPU while the block runs; yield it and its base URL."""
    port = free_port()
    server = bench.start(name, pinned(bench.settings.proxy_cpu, static_argv(bench, name, port)), port)
    try:
        yield server, f"http://{HOST}:{port}"
    finally:
        server.stop()


def measure_static(bench: Bench, name: str) -> dict[str, Any]:
    """Load file server C{name} with wrk on the small file, then time the large download (best of N)."""
    settings = bench.settings
    result: dict[str, Any] = {"server": name}
    with static_server(bench, name) as (server, base):
        result["command"] = server.argv
        url = f"{base}/{STATIC_SMALL}.bin"
        print(f"  {name}: wrk {STATIC_SMALL} ...", flush=True)
        run_wrk(url, settings.warmup, settings.connections, settings.load_cpu)
        meter = CpuMeter(server, settings)
        load = run_wrk(url, settings.duration, settings.connections, settings.load_cpu)
        if load.socket_errors or load.non_2xx:
            raise BenchError(f"{name}: {load.socket_errors} socket errors, {load.non_2xx} non-2xx on {url}")
        result[STATIC_SMALL] = {**load.as_dict(), "cpu": meter.stop().as_dict()}
        print(f"  {name}: {settings.downloads} x curl {LARGE_NAME} ...", flush=True)
        speeds = [
            round(download_mib_s(f"{base}/{LARGE_NAME}.bin", LARGE_SIZE, settings.load_cpu), 1)
            for _ in range(settings.downloads)
        ]
        server.check_alive()
        result["download_mib_s"] = max(speeds)
        result["download_runs_mib_s"] = speeds
        result["rss_peak_mib"] = round(server.peak_rss_mib(), 1)
    return result


def add_static_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """rproxy's figures over nginx's (C{None} where either is missing), also stored in rproxy's row."""
    mine, nginx = results.get("rproxy-static", {}), results.get("nginx-static", {})
    small = _ratio(mine.get(STATIC_SMALL, {}).get("rps"), nginx.get(STATIC_SMALL, {}).get("rps"))
    large = _ratio(mine.get("download_mib_s"), nginx.get("download_mib_s"))
    ratios = {f"{STATIC_SMALL} req/s": small, f"{LARGE_NAME} MiB/s": large}
    if mine and "error" not in mine:
        mine["vs_nginx"] = ratios
    return ratios


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else round(value / reference, 2)


def format_static_table(results: dict[str, dict[str, Any]]) -> str:
    """The static-file table: one row per server."""
    rows = [("server", f"{STATIC_SMALL} req/s", f"{LARGE_NAME} MiB/s", "peak RSS MiB", "x nginx (small, large)")]
    for name, result in results.items():
        if "error" in result:
            rows.append((name, "FAILED", result["error"].splitlines()[0][:60], "", ""))
            continue
        ratios = result.get("vs_nginx")
        shown = "-" if ratios is None else ", ".join("-" if r is None else f"{r:.2f}" for r in ratios.values())
        rows.append(
            (
                name,
                f"{result[STATIC_SMALL]['rps']:.0f}",
                f"{result['download_mib_s']:.0f}",
                f"{result['rss_peak_mib']:.0f}",
                shown,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
