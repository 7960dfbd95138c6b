"""
Soak: a ``twist rproxy`` process under HTTP/1.1 (wrk), HTTP/2 (h2load) and WebSocket load at once, for a
bounded time, while its upstreams are killed and started again and its configuration reloads every few
seconds; its resident memory and open file descriptors are sampled every second.

What it asserts (exit status 1 and the reason when one fails):

 - after the warm-up, RSS and descriptors are flat: the median RSS of the last third of the samples is at
   most C{--max-growth} (5%) above the median of the first third.  Descriptors follow the connections the
   pools hold, which move between levels as upstreams die and return (the survivor's pool grows, and keeps
   its connections when the other is back): their median over the last third must stay within 5% of the
   highest count of the first third;
 - no idempotent request failed: every wrk and h2load request (GETs) got a 2xx, none errored or timed out,
   although an upstream died under each of them (the proxy retries them on the other upstream);
 - every WebSocket handshake succeeded and every message came back as sent; a tunnel to an upstream that
   died is closed (a WebSocket is not replayable) and the client opens another;
 - the proxy is alive at the end, and once the load stops it holds no client connection, and its
   descriptors fall back to what it held idle before the load, or fewer (idle upstream connections close
   after 2 s): nothing the soak opened is left open.

Usage (``make soak`` runs it with SOAK_SECONDS, default 300)::

    python benchmarks/soak.py --seconds 300 --report build/soak

The report directory gets C{soak.txt} (the settings, the curves as a table, the verdict), C{soak.json}
(everything, for tools), and C{soak.png} when matplotlib is installed (it is not a dependency).
C{rproxy/test/test_soak.py} runs it for 22 seconds on a smaller scale.

The upstreams are processes of this script: C{soak.py web PORT} (rproxy's demo site on twisted.web) and
C{soak.py ws PORT} (a WebSocket echo server on the websockets library).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, REPO, WRK_SCRIPT, BenchError, Server, find_tool, free_port, parse_wrk  # noqa: E402


@dataclass
class Sample:
    """One measurement of the proxy process."""

    second: float
    rssMiB: float
    descriptors: int
    connections: int


@dataclass
class WebSocketCounts:
    """What the WebSocket clients saw."""

    handshakes: int = 0
    failedHandshakes: int = 0
    messages: int = 0
    wrongEchoes: int = 0
    tunnelsClosedByUpstream: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Settings:
    """How long and how hard to soak (the command line's options)."""

    seconds: int = 300
    warmup: float = 0.0  # 0: a quarter of the run, at most 60 s
    h1Connections: int = 16
    h2Connections: int = 4
    h2Streams: int = 8
    wsConnections: int = 8
    killEvery: float = 5.0
    downFor: float = 2.0
    reloadEvery: float = 3.0
    maxGrowth: float = 0.05


# -- the upstreams (this script's other modes)


def serveWeb(port: int) -> None:
    """rproxy's demo upstream on 127.0.0.1:C{port}."""
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor

    from rproxy.app.demo import demoSite

    reactor.listenTCP(port, demoSite(), interface=HOST)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def serveWebSocket(port: int) -> None:
    """A WebSocket echo server on 127.0.0.1:C{port}."""
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async def main() -> None:
        async with serve(echo, HOST, port, compression=None):
            await asyncio.Future()

    asyncio.run(main())


class Upstream:
    """An upstream process of one kind on a fixed port, killed (SIGKILL) and started again on demand."""

    def __init__(self, kind: str, port: int, logs: Path) -> None:
        self.kind, self.port, self.logs = kind, port, logs
        self.server: Server | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.server = Server(
            f"{self.kind} upstream :{self.port}",
            [sys.executable, __file__, self.kind, str(self.port)],
            self.logs / f"{self.kind}-{self.port}-{self.starts}.log",
        )
        self.server.wait_listening(self.port)

    def kill(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait(timeout=10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# -- the proxy


def writeConfig(path: Path, port: int, web: list[Upstream], ws: list[Upstream], generation: int) -> None:
    """The proxy's configuration; each generation sets another response header, so a reload changes something."""
    upstreams = {
        "web": ", ".join(f'"http://{HOST}:{u.port}"' for u in web),
        "ws": ", ".join(f'"http://{HOST}:{u.port}"' for u in ws),
    }
    path.write_text(
        f'listen = ["tcp:{port}:interface={HOST}"]\n'
        'access-log = "off"\n'
        "retries = 2\n"
        "connect-timeout = 2\n"
        "upstream-idle-timeout = 2\n"
        "\n[services.web]\n"
        f"upstreams = [{upstreams['web']}]\n"
        "\n[services.ws]\n"
        f"upstreams = [{upstreams['ws']}]\n"
        '\n[[routes]]\npath-prefix = "/ws"\nservice = "ws"\n'
        f'\n[[routes]]\nservice = "web"\nset-headers = {{ X-Soak-Generation = "{generation}" }}\n'
    )


def proxyConnections(pid: int, port: int) -> int:
    """The established TCP connections to the proxy's listening port (clients), from /proc/PID/net/tcp."""
    count = 0
    portHex = f"{port:04X}"
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[1].endswith(":" + portHex) and parts[3] == "01":  # local port, ESTABLISHED
                count += 1
    return count


def sample(pid: int, port: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
    return Sample(
        round(time.monotonic() - started, 1),
        round(rss / 1024, 2),
        len(os.listdir(f"/proc/{pid}/fd")),
        proxyConnections(pid, port),
    )


# -- the load


def webSocketLoad(url: str, connections: int, until: float, counts: WebSocketCounts) -> None:
    """C{connections} WebSocket clients echoing messages until C{until} (monotonic), reconnecting when closed."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    async def client(number: int) -> None:
        sequence = 0
        while time.monotonic() < until:
            try:
                async with connect(url, compression=None, open_timeout=5, close_timeout=1) as ws:
                    counts.handshakes += 1
                    while time.monotonic() < until:
                        sequence += 1
                        message = f"{number}:{sequence}:" + "x" * (sequence % 200)
                        await ws.send(message)
                        echoed = await asyncio.wait_for(ws.recv(), 5)
                        counts.messages += 1
                        if echoed != message:
                            counts.wrongEchoes += 1
                        await asyncio.sleep(0.01)
            except ConnectionClosed:
                counts.tunnelsClosedByUpstream += 1
            except (InvalidHandshake, InvalidStatus, OSError, TimeoutError) as e:
                counts.failedHandshakes += 1
                counts.errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.1)

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(connections)))

    asyncio.run(main())


def parseH2load(output: str) -> dict[str, int]:
    """The request counts and status classes h2load printed."""
    found = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
        r"(\d+) timeout",
        output,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if found is None or codes is None:
        raise BenchError(f"h2load printed no result:\n{output[-2000:]}")
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    result = dict(zip(names, map(int, found.groups()), strict=True))
    result.update(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()), strict=True))
    return result


# -- the run


def growth(values: list[float], highest: bool = False) -> float:
    """
    How much the median of the last third of C{values} exceeds the median of the first third (a fraction), or
    with C{highest}, the largest value of the first third.
    """
    third = max(1, len(values) // 3)
    first = max(values[:third]) if highest else statistics.median(values[:third])
    last = statistics.median(values[-third:])
    return (last - first) / first if first else 0.0


def soak(settings: Settings, report: Path) -> dict[str, Any]:
    """Run the soak (see the module); return its results, with C{problems} listing what failed."""
    wrk, h2load = find_tool("wrk"), find_tool("h2load")
    if wrk is None or h2load is None:
        raise BenchError("soak needs wrk and h2load (Debian: apt-get install wrk nghttp2-client)")
    report.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="rproxy-soak-"))
    web = [Upstream("web", free_port(), logs) for _ in range(2)]
    ws = [Upstream("ws", free_port(), logs) for _ in range(2)]
    port = free_port()
    config = logs / "rproxy.toml"
    writeConfig(config, port, web, ws, 0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for upstream in [*web, *ws]:
        upstream.start()
    proxy = Server(
        "rproxy",
        [sys.executable, "-m", "twisted", "--log-format=text", "rproxy", "--config", str(config)],
        logs / "rproxy.log",
    )
    warmup = settings.warmup or min(60.0, settings.seconds / 4)
    samples: list[Sample] = []
    wsCounts = WebSocketCounts()
    events: list[str] = []
    problems: list[str] = []
    try:
        proxy.wait_listening(port)
        time.sleep(0.5)
        baseline = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        started = time.monotonic()
        until = started + settings.seconds
        url = f"http://{HOST}:{port}/"
        loads = {
            "wrk": subprocess.Popen(
                [wrk, "-t1", f"-c{settings.h1Connections}", f"-d{settings.seconds}s", "--timeout", "5s"]
                + ["-s", str(WRK_SCRIPT), url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            ),
            "h2load": subprocess.Popen(
                [h2load, f"-c{settings.h2Connections}", f"-m{settings.h2Streams}", f"-D{settings.seconds}"]
                + ["-T5", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        }
        wsThread = threading.Thread(
            target=webSocketLoad, args=(f"ws://{HOST}:{port}/ws", settings.wsConnections, until, wsCounts)
        )
        wsThread.start()
        nextSample = nextKill = nextReload = started
        nextKill += settings.killEvery
        nextReload += settings.reloadEvery
        victims = [*web, *ws]
        killed = 0
        down: tuple[Upstream, float] | None = None
        generation = 0
        while (now := time.monotonic()) < until:
            if now >= nextSample:
                samples.append(sample(proxy.pid, port, started))
                nextSample += 1.0
            if down is not None and now >= down[1]:
                down[0].start()
                events.append(f"{now - started:6.1f}s  {down[0].kind} upstream :{down[0].port} started again")
                down = None
            if down is None and now >= nextKill and now + settings.downFor < until - 1:
                victim = victims[killed % len(victims)]
                killed += 1
                victim.kill()
                events.append(f"{now - started:6.1f}s  {victim.kind} upstream :{victim.port} killed (SIGKILL)")
                down = (victim, now + settings.downFor)
                nextKill = now + settings.killEvery
            if now >= nextReload:
                generation += 1
                writeConfig(config, port, web, ws, generation)
                os.kill(proxy.pid, signal.SIGHUP)
                nextReload = now + settings.reloadEvery
            time.sleep(0.05)
        if down is not None:
            down[0].start()
        outputs = {name: process.communicate(timeout=60)[0] for name, process in loads.items()}
        wsThread.join(timeout=30)
        proxy.check_alive()
        idle = settleDescriptors(proxy.pid, port, baseline)
        h1 = parse_wrk(outputs["wrk"]).as_dict()
        h2 = parseH2load(outputs["h2load"])
        afterWarmup = [s for s in samples if s.second >= warmup]
        rssGrowth = growth([s.rssMiB for s in afterWarmup])
        fdGrowth = growth([float(s.descriptors) for s in afterWarmup], highest=True)
        if len(afterWarmup) < 3:
            problems.append(f"only {len(afterWarmup)} samples after the warm-up: run longer")
        if rssGrowth > settings.maxGrowth:
            problems.append(f"RSS grew {rssGrowth:.1%} after the warm-up (at most {settings.maxGrowth:.0%})")
        if fdGrowth > settings.maxGrowth:
            problems.append(f"descriptors grew {fdGrowth:.1%} after the warm-up (at most {settings.maxGrowth:.0%})")
        if h1["non_2xx"] or h1["socket_errors"]:
            problems.append(f"HTTP/1.1: {h1['non_2xx']} non-2xx responses, {h1['socket_errors']} socket errors")
        if h2["failed"] or h2["errored"] or h2["timeout"] or h2["succeeded"] != h2["done"]:
            problems.append(f"HTTP/2: {h2['failed']} failed, {h2['errored']} errored, {h2['timeout']} timed out")
        if h1["requests"] == 0 or h2["succeeded"] == 0 or wsCounts.messages == 0:
            problems.append("a load generator made no request")
        if wsCounts.failedHandshakes or wsCounts.wrongEchoes:
            problems.append(
                f"WebSocket: {wsCounts.failedHandshakes} failed handshakes, {wsCounts.wrongEchoes} wrong echoes "
                f"({'; '.join(sorted(set(wsCounts.errors))[:3])})"
            )
        if idle["connections"]:
            problems.append(f"{idle['connections']} client connections still open after the load stopped")
        if idle["descriptors"] > baseline:
            problems.append(f"{idle['descriptors']} descriptors open after the load, {baseline} before it")
        results = {
            "settings": asdict(settings),
            "warmupSeconds": warmup,
            "http1": h1,
            "http2": h2,
            "websocket": asdict(wsCounts) | {"errors": sorted(set(wsCounts.errors))[:10]},
            "upstreamKills": killed,
            "reloads": generation,
            "rssGrowth": round(rssGrowth, 4),
            "descriptorGrowth": round(fdGrowth, 4),
            "descriptorsBeforeLoad": baseline,
            "afterLoad": idle,
            "samples": [asdict(s) for s in samples],
            "events": events,
            "problems": problems,
        }
    finally:
        proxy.stop()
        for upstream in [*web, *ws]:
            upstream.stop()
    writeReport(report, results)
    return results


def settleDescriptors(pid: int, port: int, baseline: int, bound: float = 15.0) -> dict[str, int]:
    """
    Once the load stopped: wait (up to C{bound} seconds) until no client connection is left and the descriptors
    are down to C{baseline}; what is open then.
    """
    deadline = time.monotonic() + bound
    while True:
        connections = proxyConnections(pid, port)
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        if (connections == 0 and descriptors <= baseline) or time.monotonic() > deadline:
            return {"connections": connections, "descriptors": descriptors}
        time.sleep(0.2)


def writeReport(report: Path, results: dict[str, Any]) -> None:
    """soak.json, soak.txt (a table of the curves) and, with matplotlib, soak.png."""
    (report / "soak.json").write_text(json.dumps(results, indent=1))
    samples = results["samples"]
    step = max(1, len(samples) // 40)
    lines = [
        "rproxy soak",
        f"settings: {json.dumps(results['settings'])}",
        f"warm-up: {results['warmupSeconds']:g}s; upstream kills: {results['upstreamKills']}; "
        f"reloads: {results['reloads']}",
        f"HTTP/1.1 (wrk): {results['http1']['requests']} requests, {results['http1']['rps']} req/s, "
        f"{results['http1']['non_2xx']} non-2xx, {results['http1']['socket_errors']} socket errors",
        f"HTTP/2 (h2load): {results['http2']['succeeded']} of {results['http2']['total']} succeeded, "
        f"{results['http2']['failed']} failed, {results['http2']['errored']} errored",
        f"WebSocket: {results['websocket']['handshakes']} handshakes, {results['websocket']['messages']} echoes, "
        f"{results['websocket']['tunnelsClosedByUpstream']} tunnels closed by a dying upstream, "
        f"{results['websocket']['failedHandshakes']} failed handshakes",
        f"growth after the warm-up (median of the last third over the first third's median; descriptors: over "
        f"its highest): RSS {results['rssGrowth']:+.2%}, descriptors {results['descriptorGrowth']:+.2%}",
        f"after the load: {results['afterLoad']['connections']} client connections, "
        f"{results['afterLoad']['descriptors']} descriptors ({results['descriptorsBeforeLoad']} before the load)",
        "",
        f"{'second':>7} {'RSS MiB':>8} {'fds':>5} {'clients':>7}",
        *(
            f"{s['second']:7.1f} {s['rssMiB']:8.2f} {s['descriptors']:5d} {s['connections']:7d}"
            for s in samples[::step]
        ),
        "",
        "events:",
        *results["events"],
        "",
        "verdict: " + ("PASS" if not results["problems"] else "FAIL: " + "; ".join(results["problems"])),
    ]
    (report / "soak.txt").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (rss, fds) = plt.subplots(2, 1, sharex=True)
    rss.plot([s["second"] for s in samples], [s["rssMiB"] for s in samples])
    rss.set_ylabel("RSS (MiB)")
    fds.plot([s["second"] for s in samples], [s["descriptors"] for s in samples])
    fds.set_ylabel("open descriptors")
    fds.set_xlabel("seconds")
    figure.savefig(report / "soak.png")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("web", "ws"):
        (serveWeb if sys.argv[1] == "web" else serveWebSocket)(int(sys.argv[2]))
        return
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--report", type=Path, default=REPO / "build" / "soak", help="where the report goes")
    for name, value in asdict(defaults).items():
        option = "--" + re.sub(r"([A-Z])", lambda m: "-" + m[1].lower(), name)
        parser.add_argument(option, dest=name, type=type(value), default=value)
    arguments = vars(parser.parse_args())
    report = arguments.pop("report")
    try:
        results = soak(Settings(**arguments), report)
    except BenchError as e:
        print(f"soak: {e}", file=sys.stderr)
        sys.exit(2)
    print((report / "soak.txt").read_text())
    sys.exit(1 if results["problems"] else 0)


if __name__ == "__main__":
    main()
