"""
The HTTP/2 part of ``make bench``: rproxy and nginx as HTTP/2 proxies, loaded with h2load.

Each proxy listens twice, h2c (prior knowledge) on one port and TLS with ALPN on another, in front of
the same nginx origin (HTTP/1.1).  h2load loads each listener with the same settings; rproxy is also
loaded over HTTP/1.1 with h2load (``--h1``), in cleartext and over TLS, so that its HTTP/2 and HTTP/1.1
figures come from one tool: each HTTP/2 run's ratio to HTTP/1.1 in cleartext (what a request costs over
HTTP/2 against the cheapest way rproxy serves it) and, for a TLS run, to HTTP/1.1 over TLS (HTTP/2's own
cost, TLS's being in both).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import (
    HOST,
    RPROXY_VARIANTS,
    Bench,
    BenchError,
    CpuMeter,
    free_port,
    nginx_argv,
    nginx_config,
    pinned,
    rproxy_argv,
    run_command,
)

#: The HTTP/2 proxies, in the order they run (any of rproxy's variants may be named too).
HTTP2_PROXIES = ("rproxy", "rproxy-nolog", "nginx")
ALL_HTTP2_PROXIES = (*RPROXY_VARIANTS, "nginx")
#: The payload every HTTP/2 run requests.
HTTP2_PAYLOAD = "1KiB"


@dataclass(frozen=True)
class H2Shape:
    """
    How h2load loads a listener: C{clients} connections, each with up to C{streams} requests in flight.
    """

    name: str
    clients: int
    streams: int


#: 50 connections of one stream each (as wrk's 50 keep-alive connections), then 10 connections
#: multiplexing 10 streams each (the shape of gRPC traffic).
SHAPES = (H2Shape("50x1", 50, 1), H2Shape("10x10", 10, 10))


@dataclass(frozen=True)
class H2LoadResult:
    """One h2load run: requests/s, mean time per request, and failures (non-2xx counted apart)."""

    requests: int
    rps: float
    mean_ms: float
    failed: int
    non_2xx: int
    protocol: str

    def as_dict(self) -> dict[str, float | int | str]:
        """The result as a JSON-ready dict."""
        return asdict(self)


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_MEAN = re.compile(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)")
_PROTOCOL = re.compile(r"Application protocol: (\S+)")


def parse_h2load(output: str) -> H2LoadResult:
    """The figures h2load printed in C{output}."""
    finished, requests, status, mean = (pattern.search(output) for pattern in (_FINISHED, _REQUESTS, _STATUS, _MEAN))
    if finished is None or requests is None or status is None or mean is None:
        raise BenchError(f"h2load printed no result:\n{output[-2000:]}")
    protocol = _PROTOCOL.search(output)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[mean.group(2)]
    return H2LoadResult(
        requests=int(requests.group(2)),
        rps=round(float(finished.group(3)), 1),
        mean_ms=round(float(mean.group(1)) * scale, 3),
        failed=int(requests.group(3)) + int(requests.group(4)),
        non_2xx=sum(int(status.group(i)) for i in (3, 4)),
        protocol=protocol.group(1) if protocol else "?",
    )


def h2load_argv(url: str, shape: H2Shape, seconds: int, warmup: int, cpu: int, http1: bool = False) -> list[str]:
    """The pinned h2load command for one run of C{seconds} after C{warmup} seconds."""
    argv = [
        "h2load",
        "-t1",
        f"-c{shape.clients}",
        f"-m{shape.streams}",
        f"-D{seconds}",
        f"--warm-up-time={warmup}",
    ]
    if http1:
        argv.append("--h1")
    return pinned(cpu, [*argv, url])


def run_h2load(url: str, shape: H2Shape, seconds: int, warmup: int, cpu: int, http1: bool = False) -> H2LoadResult:
    """Load C{url} with h2load; the figures."""
    argv = h2load_argv(url, shape, seconds, warmup, cpu, http1)
    return parse_h2load(run_command(argv, timeout=seconds + warmup + 60).stdout)


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in C{directory}."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rproxy-bench")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certPath, keyPath = directory / "bench-cert.pem", directory / "bench-key.pem"
    certPath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certPath, keyPath


def proxy_argv(bench: Bench, name: str, plainPort: int, tlsPort: int, cert: Path, key: Path) -> list[str]:
    """The command (not yet pinned) running HTTP/2 proxy C{name} on both ports."""
    origin = f"{HOST}:{bench.origin_port}"
    if name in RPROXY_VARIANTS:
        arguments = ["--listen", f"tcp:{plainPort}:interface={HOST}"]
        arguments += ["--tls-listen", f"tcp:{tlsPort}:interface={HOST}", "--tls-cert", f"{cert}:{key}"]
        return rproxy_argv(name, bench.settings.baseline, [*arguments, "--upstream", f"http://{origin}"])
    if name == "nginx":
        prefix = bench.workdir / f"nginx-h2-{plainPort}"
        config = nginx_config(
            prefix,
            plainPort,
            f"""        listen {HOST}:{plainPort} http2;
        listen {HOST}:{tlsPort} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        http2_max_requests 1000000;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}""",
            f"""    upstream origin {{
        server {origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}""",
            listen=False,
        )
        return nginx_argv(bench.tools["nginx"], prefix, config)
    raise BenchError(f"unknown HTTP/2 proxy {name!r}; known: {', '.join(ALL_HTTP2_PROXIES)}")


@contextmanager
def http2_proxy(bench: Bench, name: str, cert: Path, key: Path) -> Iterator[tuple[Any, int, int]]:
    """Run HTTP/2 proxy C{name} on the proxy CPU; yield it, its h2c port and its TLS port."""
    plainPort, tlsPort = free_port(), free_port()
    while tlsPort == plainPort:
        tlsPort = free_port()
    argv = pinned(bench.settings.proxy_cpu, proxy_argv(bench, name, plainPort, tlsPort, cert, key))
    server = bench.start(f"{name}-h2", argv, plainPort)
    try:
        server.wait_listening(tlsPort)
        yield server, plainPort, tlsPort
    finally:
        server.stop()


def measure_http2(bench: Bench, name: str, cert: Path, key: Path) -> dict[str, Any]:
    """Load HTTP/2 proxy C{name} over h2c and TLS (and rproxy over HTTP/1.1) in every shape."""
    settings = bench.settings
    result: dict[str, Any] = {"proxy": name}
    with http2_proxy(bench, name, cert, key) as (server, plainPort, tlsPort):
        result["command"] = server.argv
        listeners = {"h2c": f"http://{HOST}:{plainPort}", "h2 TLS": f"https://{HOST}:{tlsPort}"}
        if name in RPROXY_VARIANTS:
            listeners["h1"] = f"http://{HOST}:{plainPort}"
            listeners["h1 TLS"] = f"https://{HOST}:{tlsPort}"
        for listener, base in listeners.items():
            http1 = listener.startswith("h1")
            for shape in SHAPES:
                if http1 and shape.streams > 1:
                    continue  # HTTP/1.1 has no multiplexing (h2load would pipeline)
                label = f"{listener} {shape.name}"
                print(f"  {name}: h2load {label} ...", flush=True)
                meter = CpuMeter(server, settings)
                load = run_h2load(
                    f"{base}/{HTTP2_PAYLOAD}.bin",
                    shape,
                    settings.duration,
                    settings.warmup,
                    settings.load_cpu,
                    http1=http1,
                )
                if load.failed or load.requests == 0:
                    raise BenchError(f"{name} {label}: {load.failed} of {load.requests} requests failed")
                result[label] = {**load.as_dict(), "cpu": meter.stop().as_dict()}
                server.check_alive()
        result["rss_load_mib"] = round(server.peak_rss_mib(), 1)
    return result


def add_http2_ratios(results: dict[str, dict[str, Any]]) -> None:
    """
    Add to each rproxy row's runs the ratio to nginx's same run, to that row's own HTTP/1.1 run in cleartext,
    and for a TLS run to its HTTP/1.1 run over TLS.
    """
    nginx = results.get("nginx", {})
    for name, mine in results.items():
        if name not in RPROXY_VARIANTS:
            continue
        h1 = mine.get("h1 50x1", {}).get("rps")
        h1TLS = mine.get("h1 TLS 50x1", {}).get("rps")
        for label, run in mine.items():
            if not isinstance(run, dict) or "rps" not in run:
                continue
            theirs = nginx.get(label, {}).get("rps") if isinstance(nginx.get(label), dict) else None
            run["vs_nginx"] = round(run["rps"] / theirs, 2) if theirs else None
            run["vs_rproxy_h1"] = round(run["rps"] / h1, 2) if h1 else None
            tls = label.startswith("h2 TLS") and h1TLS
            run["vs_rproxy_h1_tls"] = round(run["rps"] / h1TLS, 2) if tls else None


def format_http2_table(results: dict[str, dict[str, Any]]) -> str:
    """The HTTP/2 table: one row per proxy and run."""
    rows = [("proxy", "run", "req/s", "mean ms", "failed", "x nginx", "x own h1", "x own h1 TLS")]
    for name, result in results.items():
        if "error" in result:
            rows.append((name, "FAILED", result["error"].splitlines()[0][:60], "", "", "", "", ""))
            continue
        for label, run in result.items():
            if not isinstance(run, dict) or "rps" not in run:
                continue
            rows.append(
                (
                    name,
                    label,
                    f"{run['rps']:.0f}",
                    f"{run['mean_ms']:.2f}",
                    str(run["failed"] + run["non_2xx"]),
                    "-" if run.get("vs_nginx") is None else f"{run['vs_nginx']:.2f}",
                    "-" if run.get("vs_rproxy_h1") is None else f"{run['vs_rproxy_h1']:.2f}",
                    "-" if run.get("vs_rproxy_h1_tls") is None else f"{run['vs_rproxy_h1_tls']:.2f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
