"""
``make bench``: rproxy against Twisted's stock proxy, an aiohttp proxy and nginx, one core each.

Each proxy in turn is put in front of an nginx origin and loaded with wrk (small responses) and
curl (a 100 MiB download); the proxy runs on one CPU, the origin and the load generator on the
other.  Right after rproxy, rproxy is loaded again balancing over three upstreams (the origin on
three ports), once per balancer; then rproxy with 2 workers against 1, unpinned.  Prints its tables
and writes benchmarks/results/latest.json.  See benchmarks/README.md.

    .venv/bin/python benchmarks/run.py            # the full comparison
    .venv/bin/python benchmarks/run.py --profile  # rproxy's hot path under py-spy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from harness import (
    ALL_PROXIES,
    LARGE_NAME,
    LARGE_SIZE,
    PROXIES,
    REPO,
    RESULTS,
    SMALL,
    Bench,
    BenchError,
    CpuMeter,
    Server,
    Settings,
    download_mib_s,
    ensure_tools,
    list_balancers,
    run_wrk,
    wrk_argv,
)
from http2 import (
    ALL_HTTP2_PROXIES,
    HTTP2_PROXIES,
    SHAPES,
    add_http2_ratios,
    format_http2_table,
    h2load_argv,
    measure_http2,
    write_certificate,
)
from profiling import profile_rproxy
from static import (
    STATIC_SERVERS,
    STATIC_SMALL,
    STATIC_TARGET,
    add_static_ratios,
    format_static_table,
    measure_static,
)
from workers import format_workers_table, measure_workers, workers_target

Result = dict[str, Any]

#: The balancers the balancing run tries, in this order, among those rproxy has installed.
BALANCERS = ("round_robin", "least_conn", "p2c")
#: The most of single-upstream requests/s that balancing over several upstreams may cost.
BALANCING_TOLERANCE = 0.10


def load_small(bench: Bench, server: Server, base: str, label: str) -> Result:
    """Warm up, then load each small payload through C{server} with wrk; the figures by payload."""
    settings = bench.settings
    result: Result = {}
    for payload in SMALL:
        url = f"{base}/{payload}.bin"
        print(f"  {label}: wrk {payload} ...", flush=True)
        run_wrk(url, settings.warmup, settings.connections, settings.load_cpu)
        meter = CpuMeter(server, settings)
        load = run_wrk(url, settings.duration, settings.connections, settings.load_cpu)
        result[payload] = {**load.as_dict(), "cpu": meter.stop().as_dict()}
        server.check_alive()
    return result


#: The rows whose cost against --access-log off the targets bound: each is measured again, interleaved.
FEATURE_ROWS = ("rproxy", "rproxy-nolog", "rproxy-metrics")


def measure_interleaved(bench: Bench, rows: Sequence[str], rounds: int) -> Result:
    """
    The small-payload requests/s of C{rows}, each in a fresh process, in C{rounds} rounds that take the rows in
    turn (A B C A B C ...): a machine that drifts during the run (heat, frequency, neighbours) shifts every
    row alike, where the table's rows, run one after the other, each see a different moment.  The median of
    each row's rounds, by payload, and the rounds themselves.
    """
    runs: dict[str, dict[str, list[float]]] = {row: {payload: [] for payload in SMALL} for row in rows}
    for round in range(1, rounds + 1):
        for row in rows:
            with bench.proxy(row) as (server, base):
                measured = load_small(bench, server, base, f"{row} (round {round} of {rounds})")
            for payload in SMALL:
                runs[row][payload].append(measured[payload]["rps"])
    return {
        row: {payload: {"rps": statistics.median(values), "runs": values} for payload, values in by.items()}
        for row, by in runs.items()
    }


def guarded(name: str, key: str, run: Callable[[], Result], what: str = "") -> Result:
    """C{run}'s result; if the run fails, say so and record the error under C{name} (as C{key})."""
    try:
        return run()
    except BenchError as e:
        print(f"  {name} {what}FAILED: {e}", flush=True)
        return {key: name, "error": str(e)}


def measure(bench: Bench, name: str) -> Result:
    """Load proxy C{name} with wrk, then (in a fresh process) time the large download."""
    settings = bench.settings
    result: Result = {"proxy": name}
    with bench.proxy(name) as (server, base):
        result["command"] = server.argv
        result.update(load_small(bench, server, base, name))
        result["rss_load_mib"] = round(server.peak_rss_mib(), 1)
    # A fresh process, so that its peak RSS is the streaming one alone.
    with bench.proxy(name) as (server, base):
        result["rss_idle_mib"] = round(server.rss_mib(), 1)
        print(f"  {name}: {settings.downloads} x curl {LARGE_NAME} ...", flush=True)
        meter = CpuMeter(server, settings)
        speeds = [
            round(download_mib_s(f"{base}/{LARGE_NAME}.bin", LARGE_SIZE, settings.load_cpu), 1)
            for _ in range(settings.downloads)
        ]
        result["download_cpu"] = meter.stop().as_dict()
        server.check_alive()
        result["download_mib_s"] = max(speeds)
        result["download_runs_mib_s"] = speeds
        result["rss_stream_mib"] = round(server.peak_rss_mib(), 1)
    return result


def balancing_label(balancer: str | None, upstreams: int) -> str:
    """The name of a balancing run in the table, the notes and the targets."""
    return f"{upstreams}x {balancer or 'default'}"


def choose_balancers(wanted: list[str]) -> tuple[list[str | None], list[str] | None]:
    """
    The balancers to run (None: rproxy's default, no --balancer) and those rproxy lists.

    C{wanted} is filtered to the installed balancers, so a missing one is skipped, not an error.
    When rproxy cannot list its balancers (no --list-balancers), its default runs alone.
    """
    installed = list_balancers()
    if installed is None:
        return [None], None
    return [name for name in wanted if name in installed], installed


def measure_balancing(bench: Bench, balancer: str | None) -> Result:
    """Load rproxy balancing over C{settings.upstreams} upstreams with wrk (small payloads only)."""
    upstreams = bench.settings.upstreams
    label = f"rproxy {balancing_label(balancer, upstreams)}"
    result: Result = {"balancer": balancer, "upstreams": upstreams}
    with bench.proxy("rproxy", upstreams, balancer) as (server, base):
        result["command"] = server.argv
        result.update(load_small(bench, server, base, label))
        result["rss_load_mib"] = round(server.peak_rss_mib(), 1)
    return result


def add_balancing_ratios(runs: dict[str, Result], single: Result) -> None:
    """Add to each balancing run its req/s over single-upstream rproxy's, and whether it is within tolerance."""
    for run in runs.values():
        if "error" in run:
            continue
        run["vs_single"] = {}
        run["within_tolerance"] = {}
        for payload in SMALL:
            mine, theirs = run[payload]["rps"], single.get(payload, {}).get("rps")
            run["vs_single"][payload] = _ratio(mine, theirs)
            run["within_tolerance"][payload] = None if not theirs else mine >= (1 - BALANCING_TOLERANCE) * theirs


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 2)


def _metrics(result: Result) -> dict[str, float | None]:
    """The compared figures of one result: requests/s per small payload and the download MiB/s."""
    metrics: dict[str, float | None] = {f"rps_{payload}": result.get(payload, {}).get("rps") for payload in SMALL}
    metrics["download_mib_s"] = result.get("download_mib_s")
    return metrics


def add_ratios(results: dict[str, Result]) -> None:
    """Add each result's ratios to the stock Twisted proxy and to nginx."""
    references = {reference: _metrics(results.get(reference, {})) for reference in ("twisted-stock", "nginx")}
    for result in results.values():
        mine = _metrics(result)
        result["ratios"] = {
            f"vs_{reference}": {key: _ratio(mine[key], theirs[key]) for key in mine}
            for reference, theirs in references.items()
        }


def evaluate_targets(
    results: dict[str, Result], balancing: dict[str, Result], interleaved: Result | None = None
) -> list[dict[str, Any]]:
    """The project's targets for rproxy on one core, each with its measured value and verdict."""
    mine = results.get("rproxy", {})
    peer = results.get("aiohttp", {})
    targets: list[dict[str, Any]] = []

    def target(description: str, value: str, met: bool | None) -> None:
        targets.append({"target": description, "measured": value, "met": met})

    if "error" in mine:
        target("rproxy ran", mine["error"], False)
        return targets
    for payload in SMALL:
        ratio = mine["ratios"]["vs_twisted-stock"][f"rps_{payload}"]
        errors = mine[payload]["non_2xx"] + mine[payload]["socket_errors"]
        target(
            f">= 4x stock Twisted requests/s on {payload}, zero errors",
            f"{ratio}x, {errors} errors" if ratio is not None else f"stock failed, {errors} errors",
            None if ratio is None else ratio >= 4 and errors == 0,
        )
        theirs = peer.get(payload, {}).get("rps")
        target(
            f"more requests/s than aiohttp on {payload}",
            f"{mine[payload]['rps']:.0f} vs {theirs:.0f}" if theirs else "aiohttp failed",
            None if not theirs else mine[payload]["rps"] > theirs,
        )
    target(
        f">= 900 MiB/s on the {LARGE_NAME} download",
        f"{mine['download_mib_s']:.0f} MiB/s",
        mine["download_mib_s"] >= 900,
    )
    target(
        f"peak RSS < 64 MiB while streaming {LARGE_NAME}",
        f"{mine['rss_stream_mib']:.1f} MiB",
        mine["rss_stream_mib"] < 64,
    )
    # The features' costs from the interleaved rounds when they ran (their medians), else from the table.
    costs = interleaved or results
    how = ""
    if interleaved:
        first = next(iter(next(iter(interleaved.values())).values()))
        how = f" (medians of {len(first['runs'])} interleaved rounds)"
    off = costs.get("rproxy-nolog", {})
    for row, bound, what in (("rproxy", 0.9, "the access log"), ("rproxy-metrics", 0.85, "the access log and metrics")):
        measured = costs.get(row, {})
        for payload in SMALL:
            if payload in measured and payload in off:
                ratio = round(measured[payload]["rps"] / off[payload]["rps"], 2)
                target(
                    f">= {bound}x the requests/s of --access-log off with {what} on {payload}{how}",
                    f"{ratio}x ({measured[payload]['rps']:.0f} vs {off[payload]['rps']:.0f})",
                    ratio >= bound,
                )
    filtered = results.get("rproxy-filters", {})
    for payload in SMALL:
        if payload in filtered and payload in mine:
            ratio = round(filtered[payload]["rps"] / mine[payload]["rps"], 2)
            errors = filtered[payload]["non_2xx"] + filtered[payload]["socket_errors"]
            target(
                f">= 0.8x rproxy's requests/s with basic auth, a rate limit and CORS on {payload}, zero errors",
                f"{ratio}x ({filtered[payload]['rps']:.0f} vs {mine[payload]['rps']:.0f}), {errors} errors",
                ratio >= 0.8 and errors == 0,
            )
    floor = 1 - BALANCING_TOLERANCE
    for label, run in balancing.items():
        if "error" in run:
            target(f"rproxy {label} ran", run["error"].splitlines()[0][:150], False)
            continue
        for payload in SMALL:
            ratio = run["vs_single"][payload]
            errors = run[payload]["non_2xx"] + run[payload]["socket_errors"]
            within = run["within_tolerance"][payload]
            target(
                f">= {floor:.2f}x single-upstream requests/s with {label} on {payload}, zero errors",
                f"{ratio}x ({run[payload]['rps']:.0f} vs {mine[payload]['rps']:.0f}), {errors} errors",
                None if within is None else within and errors == 0,
            )
    return targets


def notes(results: dict[str, Result]) -> list[str]:
    """The measurements that something other than the proxy may have limited or skewed."""
    found: list[str] = []
    for name, result in results.items():
        usages = [(payload, result[payload]["cpu"]) for payload in SMALL if payload in result]
        if "download_cpu" in result:
            usages.append((LARGE_NAME, result["download_cpu"]))
        for what, cpu in usages:
            if cpu["proxy_core_others"] > 10:
                found.append(f"{name} {what}: other processes took {cpu['proxy_core_others']:.0f}% of the proxy's CPU")
            if cpu["load_core"] > 95:
                found.append(
                    f"{name} {what}: the load CPU was {cpu['load_core']:.0f}% busy "
                    "(origin and load generator may be the limit)"
                )
    return found


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _loadColumns() -> list[tuple[str, str]]:
    """The columns of the small-response load runs: req/s, latency, errors, proxy CPU per payload."""
    columns: list[tuple[str, str]] = []
    for payload in SMALL:
        columns += [(f"{payload} req/s", ">11"), ("p50 ms", ">7"), ("p99 ms", ">7"), ("err", ">5"), ("cpu%", ">5")]
    return columns


def _loadCells(result: Result) -> list[str]:
    """One row's cells under L{_loadColumns}."""
    cells: list[str] = []
    for payload in SMALL:
        load = result[payload]
        cells += [
            f"{load['rps']:.0f}",
            f"{load['p50_ms']:.2f}",
            f"{load['p99_ms']:.2f}",
            f"{load['non_2xx']}/{load['socket_errors']}",
            f"{load['cpu']['proxy']:.0f}",
        ]
    return cells


def format_table(results: dict[str, Result]) -> str:
    """The results as one fixed-width table, one proxy per row."""
    columns: list[tuple[str, str]] = [("proxy", "<14")]
    columns += _loadColumns()
    columns += [("MiB/s", ">7"), ("RSS load", ">8"), ("RSS strm", ">8")]
    for reference in ("stock", "nginx"):
        columns += [(f"x{reference} {payload}", ">12") for payload in SMALL]
        columns += [(f"x{reference} MiB/s", ">12")]
    lines = ["  ".join(format(header, spec) for header, spec in columns)]
    lines.append("-" * len(lines[0]))
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name:<14}  FAILED: {result['error'].splitlines()[0][:150]}")
            continue
        cells: list[str] = [name]
        cells += _loadCells(result)
        cells += [
            f"{result['download_mib_s']:.0f}",
            f"{result['rss_load_mib']:.1f}",
            f"{result['rss_stream_mib']:.1f}",
        ]
        for reference in ("twisted-stock", "nginx"):
            ratios = result["ratios"][f"vs_{reference}"]
            cells += [_fmt(ratios[key], ".2f") for key in _metrics(result)]
        lines.append("  ".join(format(cell, spec) for cell, (_, spec) in zip(cells, columns, strict=True)))
    return "\n".join(lines)


def format_balancing_table(single: Result, runs: dict[str, Result]) -> str:
    """Single-upstream rproxy and each balancing run, with the ratios of their req/s, one run per row."""
    columns: list[tuple[str, str]] = [("run", "<16")]
    columns += _loadColumns()
    columns += [("RSS load", ">8")]
    columns += [(f"x1up {payload}", ">10") for payload in SMALL]
    columns += [(f"within {100 * BALANCING_TOLERANCE:.0f}%", "<10")]
    lines = ["  ".join(format(header, spec) for header, spec in columns).rstrip()]
    lines.append("-" * len(lines[0]))
    rows = {"1 upstream": single, **runs}
    for label, run in rows.items():
        if "error" in run:
            lines.append(f"{label:<16}  FAILED: {run['error'].splitlines()[0][:150]}")
            continue
        cells: list[str] = [label]
        cells += _loadCells(run)
        cells.append(f"{run['rss_load_mib']:.1f}")
        if run is single:
            cells += ["1.00" for _ in SMALL] + ["-"]
        else:
            cells += [_fmt(run["vs_single"][payload], ".2f") for payload in SMALL]
            verdicts = run["within_tolerance"]
            if any(verdict is None for verdict in verdicts.values()):
                cells.append("-")
            else:
                failed = [payload for payload, verdict in verdicts.items() if not verdict]
                cells.append("NO: " + ",".join(failed) if failed else "yes")
        lines.append("  ".join(format(cell, spec) for cell, (_, spec) in zip(cells, columns, strict=True)).rstrip())
    return "\n".join(lines)


def _version(argv: list[str]) -> str:
    """The first line a tool prints about its version (wrk and nginx print it on stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    output = ((done.stdout or "") + (done.stderr or "")).strip()
    return output.splitlines()[0] if output else "unknown"


def _commit(directory: Path) -> str | None:
    """The git commit checked out in C{directory}, if it is in a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return commit or None


def _baselineCommit(bin: Path) -> str | None:
    """The commit of the rproxy that the virtualenv of C{bin} imports."""
    try:
        where = subprocess.run(
            [str(bin / "python"), "-c", "import rproxy, os; print(os.path.dirname(rproxy.__file__))"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _commit(Path(where)) if where else None


def environment(tools: dict[str, str], baseline: Path | None) -> dict[str, Any]:
    """What the numbers depend on: versions, CPU, kernel, the rproxy commit (and the baseline's)."""
    commit = _commit(REPO)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "commit": commit,
        "baseline_commit": None if baseline is None else _baselineCommit(baseline),
        "python": platform.python_version(),
        "twisted": metadata.version("twisted"),
        "aiohttp": metadata.version("aiohttp"),
        "nginx": _version([tools["nginx"], "-v"]),
        "wrk": _version([tools["wrk"], "-v"]),
        "curl": _version([tools["curl"], "--version"]),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit, so that the servers are still stopped."""
    raise SystemExit(128 + signum)


def parse_arguments() -> argparse.Namespace:
    """The command line (see --help)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip("` \n"))
    parser.add_argument(
        "--proxies",
        default=None,
        help=f"comma-separated proxies to run (default: {','.join(PROXIES)}, and the baselines after "
        f"rproxy's rows with --baseline; known: {','.join(ALL_PROXIES)})",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a virtualenv with another rproxy installed (another commit): its rows 'baseline' and "
        "'baseline-nolog' run in the same session, for a before/after comparison",
    )
    parser.add_argument("--duration", type=int, default=defaults.duration, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="seconds of warm-up wrk")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of rproxy, rproxy-nolog and rproxy-metrics whose medians the access log and "
        "metrics targets use (0: use the table's single runs)",
    )
    parser.add_argument("--connections", type=int, default=defaults.connections, help="wrk connections")
    parser.add_argument("--downloads", type=int, default=defaults.downloads, help="large downloads")
    parser.add_argument(
        "--balancers",
        default=",".join(BALANCERS),
        help="comma-separated balancers for rproxy's balancing run, each run if rproxy has it "
        f"(default: {','.join(BALANCERS)}; 'none': no balancing run)",
    )
    parser.add_argument(
        "--upstreams",
        type=int,
        default=defaults.upstreams,
        help=f"upstreams in rproxy's balancing run (default: {defaults.upstreams})",
    )
    parser.add_argument(
        "--http2-proxies",
        default=None,
        help=f"comma-separated proxies for the HTTP/2 runs with h2load (default: {','.join(HTTP2_PROXIES)}, "
        "and the baselines with --baseline; 'none': no HTTP/2 run)",
    )
    parser.add_argument(
        "--static",
        default=",".join(STATIC_SERVERS),
        help=f"comma-separated file servers for the static-file run (default: {','.join(STATIC_SERVERS)}: rproxy's "
        "local static route against nginx, the same files; 'none': no static-file run)",
    )
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="skip the comparison of rproxy with 2 workers and with 1, unpinned (see benchmarks/workers.py)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison, profile rproxy under wrk load with py-spy",
    )
    parser.add_argument("--profile-seconds", type=int, default=15, help="seconds py-spy samples")
    parser.add_argument(
        "--profile-upstreams",
        type=int,
        default=1,
        help="upstreams (origin ports) rproxy balances over while profiled (default: 1)",
    )
    parser.add_argument("--profile-balancer", help="rproxy's --balancer while profiled (default: rproxy's default)")
    args = parser.parse_args()
    baselines = ("baseline", "baseline-nolog") if args.baseline is not None else ()
    if args.baseline is not None and not (args.baseline / "bin" / "twist").exists():
        parser.error(f"--baseline {args.baseline}: no bin/twist in it (give a virtualenv with rproxy installed)")
    if args.proxies is None:
        args.proxies = ",".join([*PROXIES[:2], *baselines, *PROXIES[2:]])
    if args.http2_proxies is None:
        args.http2_proxies = ",".join([*HTTP2_PROXIES[:2], *baselines, *HTTP2_PROXIES[2:]])
    args.proxies = [name.strip() for name in args.proxies.split(",") if name.strip()]
    args.balancers = [name.strip() for name in args.balancers.split(",") if name.strip() not in ("", "none")]
    args.http2_proxies = [name.strip() for name in args.http2_proxies.split(",") if name.strip() not in ("", "none")]
    args.static = [name.strip() for name in args.static.split(",") if name.strip() not in ("", "none")]
    unknownStatic = sorted(set(args.static) - set(STATIC_SERVERS))
    if unknownStatic:
        parser.error(f"unknown file servers {', '.join(unknownStatic)}; known: {', '.join(STATIC_SERVERS)}")
    unknown2 = sorted(set(args.http2_proxies) - set(ALL_HTTP2_PROXIES))
    if unknown2:
        parser.error(f"unknown HTTP/2 proxies {', '.join(unknown2)}; known: {', '.join(ALL_HTTP2_PROXIES)}")
    if args.baseline is None and any(name.startswith("baseline") for name in args.proxies + args.http2_proxies):
        parser.error("the baseline rows need --baseline VENV")
    if args.upstreams < 2:
        parser.error("--upstreams must be at least 2 (use --balancers none to skip the balancing run)")
    if args.profile_upstreams < 1:
        parser.error("--profile-upstreams must be at least 1")
    unknown = sorted(set(args.proxies) - set(ALL_PROXIES))
    if unknown:
        parser.error(f"unknown proxies {', '.join(unknown)}; known: {', '.join(ALL_PROXIES)}")
    return args


def main() -> int:
    """Run the comparison (or the profile); return the exit status."""
    args = parse_arguments()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if len(os.sched_getaffinity(0)) < 2:
        print("the benchmark needs 2 CPUs (proxy on one, load on the other)", file=sys.stderr)
        return 2
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        downloads=args.downloads,
        upstreams=max(args.upstreams, args.profile_upstreams),
        baseline=None if args.baseline is None else args.baseline.resolve() / "bin",
    )
    tools = ensure_tools()
    RESULTS.mkdir(exist_ok=True)
    with Bench(settings, tools) as bench:
        bench.start_origin()
        if args.profile:
            profile = profile_rproxy(bench, args.profile_seconds, args.profile_upstreams, args.profile_balancer)
            print(profile)
            (RESULTS / "profile.txt").write_text(profile + "\n")
            print(f"\nwritten: {RESULTS / 'profile.txt'}, {RESULTS / 'profile.collapsed'}")
            return 0
        results: dict[str, Result] = {}
        balancing: dict[str, Result] = {}
        installed: list[str] | None = None
        started = time.monotonic()
        for name in args.proxies:
            print(f"benchmarking {name} ...", flush=True)
            results[name] = guarded(name, "proxy", partial(measure, bench, name))
            if name == "rproxy" and args.balancers:
                if "error" in results[name]:
                    print("  skipping rproxy's balancing run: rproxy failed", flush=True)
                    continue
                # Right after the single-upstream run, so that both see the same machine.
                balancers, installed = choose_balancers(args.balancers)
                if not balancers:
                    print(f"  skipping rproxy's balancing run: none of {', '.join(args.balancers)} installed")
                    continue
                print(
                    f"benchmarking rproxy over {settings.upstreams} upstreams, balancers: "
                    f"{', '.join(b or 'default' for b in balancers)} "
                    f"(installed: {', '.join(installed) if installed else 'unknown'}) ...",
                    flush=True,
                )
                for balancer in balancers:
                    label = balancing_label(balancer, settings.upstreams)
                    try:
                        balancing[label] = measure_balancing(bench, balancer)
                    except BenchError as e:
                        print(f"  rproxy {label} FAILED: {e}", flush=True)
                        balancing[label] = {"balancer": balancer, "upstreams": settings.upstreams, "error": str(e)}
        interleaved: Result | None = None
        rows = [row for row in FEATURE_ROWS if row in args.proxies]
        if args.rounds and len(rows) > 1 and "rproxy-nolog" in rows:
            print(f"benchmarking {', '.join(rows)} again, interleaved, {args.rounds} rounds ...", flush=True)
            try:
                interleaved = measure_interleaved(bench, rows, args.rounds)
            except BenchError as e:
                print(f"  interleaved rounds FAILED: {e}", flush=True)
        http2: dict[str, Result] = {}
        if args.http2_proxies:
            cert, key = write_certificate(bench.workdir)
            for name in args.http2_proxies:
                print(f"benchmarking {name} over HTTP/2 ...", flush=True)
                http2[name] = guarded(name, "proxy", partial(measure_http2, bench, name, cert, key), "HTTP/2 ")
        static: dict[str, Result] = {}
        for name in args.static:
            print(f"benchmarking {name} (static files) ...", flush=True)
            static[name] = guarded(name, "server", partial(measure_static, bench, name))
        workers: dict[str, Any] = {}
        if not args.no_workers:
            try:
                workers = measure_workers(bench)
            except BenchError as e:
                print(f"  rproxy --workers FAILED: {e}", flush=True)
                workers = {"error": str(e)}
    add_http2_ratios(http2)
    staticRatios = add_static_ratios(static)
    add_ratios(results)
    single = results.get("rproxy", {})
    add_balancing_ratios(balancing, single)
    targets = evaluate_targets(results, balancing, interleaved) if "rproxy" in results else []
    if "rproxy-static" in static and "nginx-static" in static:
        measured = [ratio for ratio in staticRatios.values() if ratio is not None]
        worst = min(measured) if len(measured) == len(staticRatios) else None
        targets.append(
            {
                "target": f"static files from a local route at least {STATIC_TARGET}x nginx ({STATIC_SMALL} req/s "
                f"and {LARGE_NAME} MiB/s)",
                "measured": ", ".join(f"{k} x{v}" for k, v in staticRatios.items()),
                "met": None if worst is None else worst >= STATIC_TARGET,
            }
        )
    if workers:
        targets.append(
            workers_target(workers)
            if "runs" in workers
            else {"target": "rproxy --workers ran", "measured": workers["error"][:150], "met": False}
        )
    report: Result = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - started, 1),
        "settings": {**asdict(settings), "baseline": None if args.baseline is None else str(args.baseline)},
        "load_command": " ".join(wrk_argv("URL", settings.duration, settings.connections, settings.load_cpu)),
        "environment": environment(tools, settings.baseline),
        "results": results,
        "balancing": {
            "upstreams": settings.upstreams,
            "tolerance": BALANCING_TOLERANCE,
            "balancers_wanted": args.balancers,
            "balancers_installed": installed,
            "single_upstream": {payload: single.get(payload, {}).get("rps") for payload in SMALL},
            "runs": balancing,
        },
        "http2": {
            "load_command": " ".join(
                h2load_argv("URL", SHAPES[0], settings.duration, settings.warmup, settings.load_cpu)
            ),
            "results": http2,
        },
        "static": static,
        "workers": workers,
        "interleaved": interleaved,
        "targets": targets,
        "notes": notes({**results, **{f"rproxy {label}": run for label, run in balancing.items()}}),
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(results))
    print()
    print(f"load: {report['load_command']}  (after a {settings.warmup}s warm-up)")
    print(f"download: best of {settings.downloads} curl downloads of {LARGE_NAME}")
    print(f"proxy on CPU {settings.proxy_cpu}; origin nginx, wrk and curl on CPU {settings.load_cpu}")
    if balancing:
        print()
        print(
            f"rproxy balancing over {settings.upstreams} upstreams (the origin on {settings.upstreams} ports), "
            "same load; x1up = req/s / single-upstream rproxy's above"
        )
        print(format_balancing_table(single, balancing))
    if http2:
        print()
        print(
            "HTTP/2 (h2load on 1KiB.bin; runs named listener + connections x streams; "
            "x nginx = same run through nginx; x own h1 = the same rproxy's h2load --h1 50x1; "
            "x own h1 TLS = its h2load --h1 50x1 over TLS)"
        )
        print(format_http2_table(http2))
        print(f"load: {report['http2']['load_command']} (and -c10 -m10)")
    if "runs" in workers:
        print()
        print("rproxy --workers 1 and 2, unpinned: the proxy, wrk and the origin share both cores")
        print(format_workers_table(workers))
    if interleaved:
        print()
        print("interleaved rounds (fresh process each; req/s of each round, then the median):")
        for row, by in interleaved.items():
            cells = "  ".join(
                f"{payload} {' '.join(f'{v:.0f}' for v in entry['runs'])} -> {entry['rps']:.0f}"
                for payload, entry in by.items()
            )
            print(f"  {row:16} {cells}")
    if static:
        print()
        print(f"static files (rproxy's local static route and nginx, on CPU {settings.proxy_cpu}; same wrk and curl)")
        print(format_static_table(static))
    if report["notes"]:
        print("\nnotes:")
        for note in report["notes"]:
            print(f"  {note}")
    if targets:
        print("\nrproxy targets:")
        for entry in targets:
            verdict = {True: "MET", False: "NOT MET", None: "n/a"}[entry["met"]]
            print(f"  [{verdict:>7}] {entry['target']}: {entry['measured']}")
    print(f"\nwritten: {RESULTS / 'latest.json'} ({report['seconds']}s)")
    runs = [*results.values(), *balancing.values(), *http2.values(), *static.values()]
    failed = any("error" in result for result in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
