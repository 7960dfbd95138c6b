"""
rproxy's hot path: py-spy samples a running rproxy while wrk loads it with 100-byte responses.

py-spy reads the interpreter's stacks from outside. It pauses rproxy only for the moment each
sample takes, so the profile slows the proxy far less than cProfile would (the report gives the
req/s reached while sampling).

py-spy runs on rproxy's CPU. Sampling from the other CPU charged about 40% of the samples to system
calls, while /proc showed 15% of rproxy's time in the kernel. On the same CPU the two agree, and the
report prints both. Without pausing (C{--nonblocking}), py-spy dropped about half of its samples as
inconsistent, most of them in system calls.

Samples taken while rproxy is in a system call are kept (C{--idle}) and charged to the Python
function that made the call. So kernel time (send, recv, epoll_ctl) counts where it is spent. So
does waiting in epoll_wait, which shows as C{EPollReactor.doPoll}'s own time when rproxy's CPU is
not saturated.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

from harness import (
    RESULTS,
    Bench,
    BenchError,
    CpuMeter,
    CpuUsage,
    WrkResult,
    ensure_venv_tool,
    parse_wrk,
    pinned,
    run_command,
    run_wrk,
    wrk_argv,
)

#: py-spy's frame format: C{function (file:line)}.
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")
#: Sampling rate (Hz).
RATE = 200
TOP = 15
#: Frames on a larger share of the samples are the reactor's loop, left out of the cumulative list.
LOOP_SHARE = 0.8
PAYLOAD = "100B"


@dataclass(frozen=True)
class Profile:
    """
    Sample counts of one py-spy recording.

    @ivar own: samples per frame where it was the innermost one (own time).
    @ivar cumulative: samples per frame where it was anywhere on the stack.
    @ivar files: own samples per source file.
    @ivar total: all samples kept.
    """

    own: Counter[str]
    cumulative: Counter[str]
    files: Counter[str]
    total: int


def parse_collapsed(text: str) -> Profile:
    """Count py-spy's C{--format raw} output: one C{frame;frame;... count} line per stack."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            cumulative[frame] += samples
        match = _FRAME.match(frames[-1])
        files[match.group("file") if match else frames[-1]] += samples
    return Profile(own, cumulative, files, total)


def format_profile(
    profile: Profile, load: WrkResult, cpu: CpuUsage, seconds: int, connections: int, setup: str = "1 upstream"
) -> str:
    """The top functions by own and by cumulative time, and own time per file."""
    if not profile.total:
        raise BenchError("py-spy recorded no samples")
    total = profile.total

    def share(samples: int) -> str:
        return f"{100 * samples / total:5.1f}%"

    lines = [
        f"rproxy ({setup}) under wrk -c{connections} on {PAYLOAD}: {load.rps:.0f} req/s while sampled, "
        f"{load.non_2xx} non-2xx, {load.socket_errors} socket errors",
        f"rproxy used {cpu.proxy:.0f}% of its CPU, {cpu.proxy_kernel:.0f}% in the kernel "
        f"(py-spy and other processes {cpu.proxy_core_others:.0f}%); "
        f"load CPU {cpu.load_core:.0f}% busy",
        f"py-spy: {total} samples at {RATE} Hz over {seconds}s, system calls included (charged to their "
        "caller: doPoll = epoll_wait, doRead = recv, untilConcludes = send)",
        "",
        f"top {TOP} functions by own time",
        "   own     cum  function (file:first line)",
    ]
    for frame, samples in profile.own.most_common(TOP):
        lines.append(f"{share(samples)}  {share(profile.cumulative[frame])}  {frame}")
    lines += [
        "",
        f"top {TOP} functions by cumulative time (leaving out the reactor loop: frames on more than "
        f"{100 * LOOP_SHARE:.0f}% of the samples)",
        "   cum     own  function",
    ]
    below = [(frame, n) for frame, n in profile.cumulative.most_common() if n <= LOOP_SHARE * total]
    for frame, samples in below[:TOP]:
        lines.append(f"{share(samples)}  {share(profile.own[frame])}  {frame}")
    lines += ["", f"own time by file (top {TOP})", "   own  file"]
    for path, samples in profile.files.most_common(TOP):
        lines.append(f"{share(samples)}  {path}")
    return "\n".join(lines)


def profile_rproxy(bench: Bench, seconds: int, upstreams: int = 1, balancer: str | None = None) -> str:
    """
    Profile rproxy (pinned like in the comparison) for C{seconds} seconds of wrk load.

    rproxy balances over C{upstreams} of the origin's ports with C{balancer} (None: its default).

    Writes the collapsed stacks to results/profile.collapsed (flamegraph.pl or speedscope read
    them) and returns the report.
    """
    pyspy = ensure_venv_tool("py-spy", "py-spy")
    settings = bench.settings
    collapsed = RESULTS / "profile.collapsed"
    with bench.proxy("rproxy", upstreams, balancer) as (server, base):
        url = f"{base}/{PAYLOAD}.bin"
        run_wrk(url, settings.warmup, settings.connections, settings.load_cpu)
        # wrk runs a little longer than py-spy, so that every sample is taken under load.
        load = subprocess.Popen(
            wrk_argv(url, seconds + 3, settings.connections, settings.load_cpu),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            time.sleep(1)
            meter = CpuMeter(server, settings)
            print(f"  py-spy: sampling rproxy (pid {server.pid}) for {seconds}s ...", flush=True)
            run_command(
                pinned(
                    settings.proxy_cpu,
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(server.pid),
                        "--duration",
                        str(seconds),
                        "--rate",
                        str(RATE),
                        "--format",
                        "raw",
                        "--function",
                        "--idle",
                        "--output",
                        str(collapsed),
                    ],
                ),
                timeout=seconds + 60,
            )
            usage = meter.stop()
            output, _ = load.communicate(timeout=seconds + 40)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        server.check_alive()
    profile = parse_collapsed(collapsed.read_text())
    setup = f"{upstreams} upstream{'s' if upstreams > 1 else ''}"
    if balancer is not None:
        setup += f", --balancer {balancer}"
    return format_profile(profile, parse_wrk(output), usage, seconds, settings.connections, setup)
