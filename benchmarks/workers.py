"""
rproxy with ``--workers 2`` against ``--workers 1``, in the same run, on the whole machine.

The comparison of proxies pins each proxy to one CPU and the load to the other.  Here nothing but the
origin (started pinned to the load CPU, as for every run) is pinned: rproxy, its workers and wrk share
both cores, as they would on a 2-core machine in production, so the second worker competes with the
load generator and the origin for the second core.  The target (issue 17): 2 workers at least 1.5x one
worker's requests/s.
"""

from __future__ import annotations

from typing import Any

from harness import HOST, Bench, BenchError, CpuMeter, free_port, run_wrk

#: The worker counts compared, the first being the reference.
COUNTS = (1, 2)
#: Rounds of each count, in alternating order (1, 2, 2, 1, 1, 2): the best of each counts.
ROUNDS = 3
#: The least ratio of 2 workers' requests/s to 1 worker's that meets the target.
WORKERS_TARGET = 1.5
#: The payload loaded.
PAYLOAD = "1KiB"


def measure_workers(bench: Bench) -> dict[str, Any]:
    """
    Load rproxy (default configuration) with each of L{COUNTS} workers, unpinned, in L{ROUNDS} rounds of
    alternating order (a slower phase of a shared machine weighs on both); each count's best round, and its
    ratio to 1 worker's.
    """
    runs: dict[str, Any] = {}
    order = [count for number in range(ROUNDS) for count in (COUNTS if number % 2 == 0 else COUNTS[::-1])]
    for count in order:
        name = f"rproxy-{count}worker{'s' * (count > 1)}"
        run = _load(bench, name, count)
        best = runs.get(name)
        rounds = [*(best["rounds_rps"] if best else []), run["rps"]]
        if best is None or run["rps"] > best["rps"]:
            best = run
        runs[name] = {**best, "rounds_rps": rounds}
    reference, *others = runs.values()
    for run in others:
        run["x1"] = round(run["rps"] / reference["rps"], 2)
    return {"payload": PAYLOAD, "target": WORKERS_TARGET, "runs": runs}


def _load(bench: Bench, name: str, count: int) -> dict[str, Any]:
    """One round: rproxy with C{count} workers under wrk, nothing pinned but the origin."""
    settings = bench.settings
    port = free_port()
    argv = [*bench.proxy_argv("rproxy", port), "--workers", str(count)]
    print(f"benchmarking {name} (unpinned) ...", flush=True)
    server = bench.start(name, argv, port)
    try:
        url = f"http://{HOST}:{port}/{PAYLOAD}.bin"
        run_wrk(url, settings.warmup, settings.connections, None)
        meter = CpuMeter(server, settings)
        load = run_wrk(url, settings.duration, settings.connections, None)
        usage = meter.stop()
        cpu = usage.proxy  # percent of one core, all of rproxy's processes
        server.check_alive()
    finally:
        server.stop()
    if load.socket_errors or load.non_2xx or load.requests == 0:
        raise BenchError(f"{name}: {load.socket_errors} socket errors, {load.non_2xx} non-2xx responses")
    perRequest = round(cpu / 100 * load.seconds / load.requests * 1e6, 1)
    rest = round(usage.proxy_core_others + usage.load_core, 1)  # both cores' busy time but rproxy's
    return {
        "workers": count,
        "command": argv,
        **load.as_dict(),
        "cpu_percent": cpu,
        "cpu_us": perRequest,
        "rest_percent": rest,
    }


def format_workers_table(report: dict[str, Any]) -> str:
    """
    One row per worker count: its best round's req/s and latency, the ratio to one worker, the CPU all of
    rproxy's processes used then (100: one core) and per request, what everything else used of both cores
    (200: both; wrk, the origin, and anything else running), and every round's req/s.
    """
    header = f"{'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'x1':>6} {'CPU %':>6} {'us/req':>7} {'rest %':>6}"
    lines = [f"{'run':18} {header}  rounds"]
    for name, run in report["runs"].items():
        ratio = f"{run['x1']:.2f}" if "x1" in run else "1.00"
        rounds = ", ".join(f"{rps:.0f}" for rps in run["rounds_rps"])
        figures = f"{run['rps']:>10.1f} {run['p50_ms']:>8.2f} {run['p99_ms']:>8.2f} {ratio:>6}"
        cpu = f"{run['cpu_percent']:>6.0f} {run['cpu_us']:>7.1f} {run['rest_percent']:>6.0f}"
        lines.append(f"{name:18} {figures} {cpu}  {rounds}")
    return "\n".join(lines)


def workers_target(report: dict[str, Any]) -> dict[str, Any]:
    """The target's entry for the report: measured ratio and verdict."""
    ratios = [run["x1"] for run in report["runs"].values() if "x1" in run]
    ratio = ratios[0] if ratios else None
    return {
        "target": f">= {WORKERS_TARGET}x one worker's requests/s with 2 workers on {PAYLOAD}, all sharing 2 cores",
        "measured": "n/a" if ratio is None else f"x{ratio}",
        "met": None if ratio is None else ratio >= WORKERS_TARGET,
    }
