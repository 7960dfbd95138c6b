"""
Processes, tools and measurements shared by the rproxy benchmarks (see README.md).

Every server is started in its own session so that it and its children (nginx workers) can be
stopped as a group, and every external command runs with a timeout: a benchmark run is bounded
in time and leaves no process behind.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: The virtualenv's bin directory (run.py is started with the venv's python).
VENV_BIN = Path(sys.executable).parent
WRK_SCRIPT = HERE / "wrk_report.lua"
#: Where results are written (gitignored).
RESULTS = HERE / "results"
MIB = 1024 * 1024
HOST = "127.0.0.1"

#: Tools the benchmarks run, and the Debian package of each.
TOOLS = {
    "wrk": "wrk",
    "nginx": "nginx",
    "curl": "curl",
    "taskset": "util-linux",
    "h2load": "nghttp2-client",
    "redis-server": "redis-server",
}

# nginx lives in /usr/sbin, which a non-login PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


def run_command(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run C{argv} to completion within C{timeout} seconds; raise L{BenchError} if it fails."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise BenchError(f"{' '.join(argv)} exited with {result.returncode}: {output}")
    return result


def find_tool(name: str) -> str | None:
    """The path of the executable C{name} (also searching the sbin directories)."""
    return shutil.which(name, path=_SEARCH_PATH)


def ensure_tools() -> dict[str, str]:
    """
    The paths of the tools in L{TOOLS}, installing the missing ones with apt-get.

    Installing needs root (as on a fresh CI machine); otherwise the error says what to install.
    """
    missing = sorted({pkg for tool, pkg in TOOLS.items() if find_tool(tool) is None})
    if missing:
        if os.geteuid() != 0:
            raise BenchError(
                f"missing packages {', '.join(missing)}: run 'apt-get install {' '.join(missing)}' as root"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        run_command(["apt-get", "update", "-qq"], timeout=300, env=env)
        run_command(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            timeout=900,
            env=env,
        )
    paths = {tool: find_tool(tool) for tool in TOOLS}
    absent = [tool for tool, path in paths.items() if path is None]
    if absent:
        raise BenchError(f"still missing after apt-get install: {', '.join(absent)}")
    return {tool: path for tool, path in paths.items() if path is not None}


def ensure_venv_tool(executable: str, requirement: str) -> str:
    """The path of C{executable} in this virtualenv, pip-installing C{requirement} if it is missing."""
    path = shutil.which(executable, path=str(VENV_BIN))
    if path is None:
        print(f"installing {requirement} with pip ...", flush=True)
        run_command(
            [sys.executable, "-m", "pip", "install", "--quiet", requirement],
            timeout=600,
        )
        path = shutil.which(executable, path=str(VENV_BIN))
    if path is None:
        raise BenchError(f"pip installed {requirement} but {executable} is not in {VENV_BIN}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """C{argv} run on CPU C{cpu} only (taskset execs the command: the pid stays the same); on any, without one."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


def _status_kib(pid: int, field: str) -> int:
    """A C{kB} field (VmHWM, VmRSS) of /proc/<pid>/status, 0 if the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _process_tree(pid: int) -> list[int]:
    """C{pid} and its descendants."""
    tree = [pid]
    for member in tree:
        try:
            children = Path(f"/proc/{member}/task/{member}/children").read_text()
        except OSError:
            continue
        tree.extend(int(child) for child in children.split())
    return tree


_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of process C{pid} so far, zeros if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _core_busy_seconds(cpu: int) -> float:
    """Seconds CPU C{cpu} spent running anything (not idle or waiting for I/O) since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
            return (user + nice + system + irq + softirq + steal) / _TICK
    raise BenchError(f"no cpu{cpu} in /proc/stat")


@dataclass(frozen=True)
class CpuUsage:
    """
    How busy the CPUs were during a measurement, in percent of wall time.

    @ivar proxy: the proxy's processes (100: one core saturated).
    @ivar proxy_kernel: the part of C{proxy} spent in the kernel (system calls, TCP).
    @ivar proxy_core_others: everything else on the proxy's CPU (other load skews the result).
    @ivar load_core: everything on the load CPU (origin, wrk or curl, and anything else).
    """

    proxy: float
    proxy_kernel: float
    proxy_core_others: float
    load_core: float

    def as_dict(self) -> dict[str, float]:
        """The usage as a JSON-ready dict."""
        return asdict(self)


class CpuMeter:
    """Measures L{CpuUsage} between its creation and L{stop}."""

    def __init__(self, server: Server, settings: Settings) -> None:
        self._server = server
        self._settings = settings
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, float, float]:
        user, system = self._server.cpu_seconds()
        return (
            time.monotonic(),
            user,
            system,
            _core_busy_seconds(self._settings.proxy_cpu),
            _core_busy_seconds(self._settings.load_cpu),
        )

    def stop(self) -> CpuUsage:
        """The usage since the meter was created."""
        end = self._sample()
        wall, user, system, proxy_core, load_core = (b - a for a, b in zip(self._start, end, strict=True))

        def percent(seconds: float) -> float:
            return round(max(0.0, 100 * seconds / wall), 1)

        return CpuUsage(
            percent(user + system), percent(system), percent(proxy_core - user - system), percent(load_core)
        )


class Server:
    """
    A long-running process (origin or proxy) in its own session, its output in a log file.

    @ivar name: what messages call it.
    @ivar argv: the command it runs.
    """

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The process id (of the nginx master for nginx)."""
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        """The last C{lines} lines of the server's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
        """Return once C{port} accepts connections; raise L{BenchError} if the server dies or is slow."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise BenchError(f"{self.name} exited with {code} while starting:\n{self.log_tail()}")
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.name} did not listen on {HOST}:{port} within {timeout:g}s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def check_alive(self) -> None:
        """Raise L{BenchError} if the server has exited."""
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time the server's processes have used so far."""
        times = [_process_cpu_seconds(pid) for pid in _process_tree(self.pid)]
        return sum(user for user, _ in times), sum(system for _, system in times)

    def peak_rss_mib(self) -> float:
        """The peak resident memory (VmHWM) of the server, summed over its processes, in MiB."""
        return sum(_status_kib(pid, "VmHWM") for pid in _process_tree(self.pid)) / 1024

    def rss_mib(self) -> float:
        """The current resident memory (VmRSS) of the server, summed over its processes, in MiB."""
        return sum(_status_kib(pid, "VmRSS") for pid in _process_tree(self.pid)) / 1024

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after 5 s; idempotent."""
        if self.process.poll() is not None:
            return
        # The group is signalled only while its leader is known not to be reaped, so the
        # group id cannot have been reused.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def nginx_config(prefix: Path, port: int, server_body: str, http_extra: str = "", listen: bool = True) -> Path:
    """
    Write the config of an nginx with one worker and no access log, everything under C{prefix}.

    Keep-alive connections serve up to a million requests (not nginx's default 1000), so that
    neither the origin nor the nginx proxy closes connections during a run.

    @param server_body: the directives of the one C{server} block (listening on C{port}).
    @param http_extra: more directives for the C{http} block (an C{upstream} block).
    @param listen: whether to write the plain C{listen} on C{port} (C{False}: C{server_body} has its own).
    """
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / temp).mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(
        f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http_extra}
    server {{
{f"        listen {HOST}:{port};" if listen else ""}
{server_body}
    }}
}}
"""
    )
    return config


def nginx_argv(nginx: str, prefix: Path, config: Path) -> list[str]:
    """The command running nginx with C{config}, in the foreground, logging under C{prefix}."""
    return [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)]


@dataclass(frozen=True)
class WrkResult:
    """
    One wrk run.

    @ivar socket_errors: connect, read, write errors and timeouts, summed.
    @ivar non_2xx: responses whose status was not 2xx or 3xx.
    """

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    def as_dict(self) -> dict[str, float | int]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def wrk_argv(url: str, seconds: int, connections: int, cpu: int | None) -> list[str]:
    """The pinned wrk command for one load test."""
    return pinned(
        cpu,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "5s",
            *(argument for header in REQUEST_HEADERS for argument in ("-H", header)),
            "-s",
            str(WRK_SCRIPT),
            url,
        ],
    )


def parse_wrk(output: str) -> WrkResult:
    """The result that wrk_report.lua printed (a C{WRK_JSON} line) in wrk's C{output}."""
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line[len("WRK_JSON ") :])
            seconds = data["duration_us"] / 1e6
            return WrkResult(
                requests=data["requests"],
                seconds=round(seconds, 3),
                rps=round(data["requests"] / seconds, 1),
                p50_ms=round(data["p50_us"] / 1000, 3),
                p99_ms=round(data["p99_us"] / 1000, 3),
                non_2xx=data["status"],
                socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
            )
    raise BenchError(f"wrk printed no result:\n{output[-2000:]}")


def run_wrk(url: str, seconds: int, connections: int, cpu: int | None) -> WrkResult:
    """Load C{url} with wrk for C{seconds} seconds over C{connections} connections."""
    output = run_command(wrk_argv(url, seconds, connections, cpu), timeout=seconds + 30).stdout
    return parse_wrk(output)


def download_mib_s(url: str, size: int, cpu: int) -> float:
    """Download C{url} (C{size} bytes expected) with curl; return its speed in MiB/s."""
    output = run_command(
        pinned(
            cpu,
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "120",
                "-w",
                "%{http_code} %{size_download} %{speed_download}",
                *(argument for header in REQUEST_HEADERS for argument in ("-H", header)),
                url,
            ],
        ),
        timeout=150,
    ).stdout
    code, received, speed = output.split()
    if code != "200" or int(received) != size:
        raise BenchError(f"download of {url}: status {code}, {received} of {size} bytes")
    return float(speed) / MIB


@dataclass(frozen=True)
class RproxyVariant:
    """
    One way the benchmark runs rproxy: a row of its tables.

    @ivar launcher: what runs C{twist}'s command line, C{rproxy ...} appended (C{None}: this venv's
        C{twist}; a baseline's is given on the command line).
    @ivar options: what it is given after its listeners and upstreams.
    @ivar description: what the row is, for the README and --help.
    """

    launcher: tuple[str, ...] | None
    options: tuple[str, ...]
    description: str


_TWIST = (str(VENV_BIN / "twist"),)

#: The credentials every load test sends (and the origin of a cross-origin page), so that the row with edge
#: filters is loaded with exactly the requests of the others: proxies without the filters ignore them.
BENCH_USER, BENCH_PASSWORD, BENCH_ORIGIN = "bench", "bench-password", "https://app.example"
REQUEST_HEADERS = (
    "Authorization: Basic " + base64.b64encode(f"{BENCH_USER}:{BENCH_PASSWORD}".encode()).decode("ascii"),
    f"Origin: {BENCH_ORIGIN}",
)
#: The htpasswd file of the filters row (bcrypt, as htpasswd -B writes it), written when that row starts.
HTPASSWD = Path(tempfile.gettempdir()) / "rproxy-bench.htpasswd"
#: The config file of the shared rate-limit row, written when that row starts (with its Redis's port).
REDIS_LIMIT = Path(tempfile.gettempdir()) / "rproxy-bench-redis.toml"


def _fields(lines: Sequence[str]) -> list[tuple[str, str]]:
    """C{"Name: value"} lines as (name, value) pairs."""
    return [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]


def write_htpasswd() -> None:
    """Write L{HTPASSWD}: the bench user, its password hashed with bcrypt (cost 10)."""
    import bcrypt

    hashed = bcrypt.hashpw(BENCH_PASSWORD.encode(), bcrypt.gensalt(10)).decode("ascii")
    HTPASSWD.write_text(f"{BENCH_USER}:{hashed}\n")


#: The edge filters of the filters row: basic auth (a repeated credential is cached), a rate limit no load
#: reaches, CORS; in the command line's order (ip rules, cors, basic auth, rate limit).
FILTER_OPTIONS = ("--basic-auth", str(HTPASSWD), "--rate-limit", "1000000/s", "--cors-origin", BENCH_ORIGIN)
#: rproxy's rows, by name.  The first is the default configuration a user gets (the access log on, in
#: the log output, which the benchmark writes to a file as twist does to a redirected stdout).
RPROXY_VARIANTS = {
    "rproxy": RproxyVariant(_TWIST, (), "the default configuration, on rproxy's reactor"),
    "rproxy-nolog": RproxyVariant(_TWIST, ("--access-log", "off"), "--access-log off"),
    "rproxy-metrics": RproxyVariant(
        _TWIST,
        ("--metrics-listen", "tcp:0:interface=127.0.0.1"),
        "the default configuration with Prometheus metrics kept (--metrics-listen)",
    ),
    "rproxy-filters": RproxyVariant(
        _TWIST, FILTER_OPTIONS, "the default configuration with basic auth, a rate limit and CORS on every request"
    ),
    "rproxy-redis": RproxyVariant(
        _TWIST,
        ("--config", str(REDIS_LIMIT)),
        'the default configuration with a rate limit no load reaches, its buckets in Redis (store = "redis")',
    ),
    "rproxy-epoll": RproxyVariant((*_TWIST, "--reactor", "epoll"), (), "Twisted's epoll reactor"),
    "rproxy-asyncio": RproxyVariant((*_TWIST, "--reactor", "asyncio"), (), "Twisted's asyncio reactor"),
    "rproxy-uvloop": RproxyVariant(
        (sys.executable, str(HERE / "uvloop_twist.py")), (), "Twisted's asyncio reactor on uvloop"
    ),
    "baseline": RproxyVariant(None, (), "another checkout's rproxy (--baseline VENV), default configuration"),
    "baseline-nolog": RproxyVariant(None, ("--access-log", "off"), "the baseline with --access-log off"),
}
#: The proxies under test, in the order they run and appear in the table (the baselines run only
#: when a baseline is given).
PROXIES = (*(name for name in RPROXY_VARIANTS if not name.startswith("baseline")), "twisted-stock", "aiohttp", "nginx")
ALL_PROXIES = (*RPROXY_VARIANTS, "twisted-stock", "aiohttp", "nginx")


def rproxy_argv(name: str, baseline: Path | None, arguments: Sequence[str]) -> list[str]:
    """
    The command running rproxy's variant C{name} with C{arguments} (its listeners and upstreams);
    C{baseline}: the bin directory of the virtualenv the baselines run from.
    """
    variant = RPROXY_VARIANTS[name]
    if variant.options == FILTER_OPTIONS:
        write_htpasswd()
    launcher = variant.launcher
    if launcher is None:
        if baseline is None:
            raise BenchError(f"{name} needs --baseline VENV")
        launcher = (str(baseline / "twist"),)
    return [*launcher, "rproxy", *arguments, *variant.options]


#: The small files wrk requests, by name.
SMALL = {"100B": 100, "1KiB": 1024}
#: The large file curl downloads.
LARGE_NAME, LARGE_SIZE = "100MiB", 100 * MIB


@dataclass(frozen=True)
class Settings:
    """
    How long and how hard each proxy is loaded, and where everything runs.

    @ivar duration: seconds of each measured wrk run.
    @ivar warmup: seconds of the wrk run before each measured one.
    @ivar connections: wrk's concurrent connections.
    @ivar downloads: downloads of the large file (the best one counts).
    @ivar upstreams: the upstreams rproxy balances over in the balancing run (the origin listens
        on this many ports).
    @ivar proxy_cpu: the CPU the proxy under test is pinned to.
    @ivar load_cpu: the CPU the origin, wrk and curl are pinned to.
    @ivar baseline: the bin directory of the virtualenv whose rproxy the baseline rows run, if any.
    """

    duration: int = 10
    warmup: int = 2
    connections: int = 50
    downloads: int = 3
    upstreams: int = 3
    proxy_cpu: int = 0
    load_cpu: int = 1
    baseline: Path | None = None


class Bench:
    """
    A temporary directory, an nginx origin serving the payloads, and the proxies put in front of it.

    Use it as a context manager: leaving it stops every server it started and removes the directory.
    """

    def __init__(self, settings: Settings, tools: dict[str, str]) -> None:
        self.settings = settings
        self.tools = tools
        self.servers: list[Server] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="rproxy-bench-"))
        # Started by root, nginx's worker runs as nobody and must be able to read the payloads.
        self.workdir.chmod(0o755)
        self.origin_port = 0
        #: Every port the origin listens on (the first is C{origin_port}); one per balanced upstream.
        self.origin_ports: list[int] = []
        #: The port of the Redis server of the shared rate-limit row, once started.
        self.redis_port = 0

    def __enter__(self) -> Bench:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server started and remove the temporary directory."""
        for server in reversed(self.servers):
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self, name: str, argv: Sequence[str], port: int) -> Server:
        """Start a server and wait until it listens on C{port}."""
        server = Server(name, argv, self.workdir / f"{name}-{len(self.servers)}.log")
        self.servers.append(server)
        try:
            server.wait_listening(port)
        except BenchError:
            server.stop()  # not left running (or starting) while the next proxy is measured
            raise
        return server

    def start_origin(self) -> None:
        """
        Write the payloads and start the nginx origin on the load CPU.

        The origin listens on C{settings.upstreams} ports (at least one), all served by its one
        worker: the upstreams of the balancing run are the same origin, on the same CPU.
        """
        www = self.workdir / "www"
        www.mkdir()
        for name, size in SMALL.items():
            (www / f"{name}.bin").write_bytes(_payload(size))
        block = os.urandom(MIB)
        with (www / f"{LARGE_NAME}.bin").open("wb") as large:
            for _ in range(LARGE_SIZE // MIB):
                large.write(block)
        ports: list[int] = []
        while len(ports) < max(1, self.settings.upstreams):
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.origin_ports = ports
        self.origin_port = ports[0]
        prefix = self.workdir / "origin"
        more_listens = "".join(f"        listen {HOST}:{port};\n" for port in ports[1:])
        config = nginx_config(
            prefix,
            self.origin_port,
            f"""{more_listens}        root {www};
        sendfile on;
        tcp_nopush on;""",
        )
        origin = self.start(
            "origin",
            pinned(self.settings.load_cpu, nginx_argv(self.tools["nginx"], prefix, config)),
            self.origin_port,
        )
        for port in ports[1:]:
            origin.wait_listening(port)

    def start_redis(self) -> None:
        """
        Start a Redis server on the load CPU (once: a Redis is shared by the instances of a gateway, over the
        network in production) and write L{REDIS_LIMIT}, the shared rate-limit row's config, naming it.
        """
        if not self.redis_port:
            port = free_port()
            argv = [self.tools["redis-server"], "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
            self.start("redis", pinned(self.settings.load_cpu, argv), port)
            self.redis_port = port
        REDIS_LIMIT.write_text(
            f'redis = "redis://{HOST}:{self.redis_port}/0"\n'
            'default-filters = ["limit"]\n\n'
            '[filters.limit]\ntype = "rate-limit"\nrate = "1000000/s"\nstore = "redis"\n'
        )

    def proxy_argv(self, name: str, port: int, upstreams: int = 1, balancer: str | None = None) -> list[str]:
        """
        The command (not yet pinned) running proxy C{name} on C{port} in front of the origin.

        @param upstreams: rproxy only: how many of the origin's ports it balances over, each given
            with its own C{--upstream}.
        @param balancer: rproxy only: its C{--balancer} (None: rproxy's default, no option).
        """
        origin = self.origin_port
        if name in RPROXY_VARIANTS:
            if not 1 <= upstreams <= len(self.origin_ports):
                raise BenchError(f"{upstreams} upstreams asked, the origin listens on {len(self.origin_ports)} ports")
            arguments = ["--listen", f"tcp:{port}:interface={HOST}"]
            for upstream_port in self.origin_ports[:upstreams]:
                arguments += ["--upstream", f"http://{HOST}:{upstream_port}"]
            if balancer is not None:
                arguments += ["--balancer", balancer]
            if name == "rproxy-redis":
                self.start_redis()
            return rproxy_argv(name, self.settings.baseline, arguments)
        if upstreams != 1 or balancer is not None:
            raise BenchError(f"only rproxy is run with several upstreams or a balancer, not {name}")
        if name in ("twisted-stock", "aiohttp"):
            script = "stock_twisted_proxy.py" if name == "twisted-stock" else "aiohttp_proxy.py"
            return [
                sys.executable,
                str(HERE / script),
                "--port",
                str(port),
                "--origin-port",
                str(origin),
            ]
        if name == "nginx":
            prefix = self.workdir / f"nginx-proxy-{port}"
            config = nginx_config(
                prefix,
                port,
                """        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }""",
                f"""    upstream origin {{
        server {HOST}:{origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}""",
            )
            return nginx_argv(self.tools["nginx"], prefix, config)
        raise BenchError(f"unknown proxy {name!r}; known: {', '.join(ALL_PROXIES)}")

    @contextmanager
    def proxy(self, name: str, upstreams: int = 1, balancer: str | None = None) -> Iterator[tuple[Server, str]]:
        """
        Run proxy C{name} on the proxy CPU while the block runs; yield it and its base URL.

        The small payloads are fetched through it first, so a broken proxy fails fast.  With
        several C{upstreams}, each payload is fetched as many times, so that every upstream serves.
        """
        port = free_port()
        argv = pinned(self.settings.proxy_cpu, self.proxy_argv(name, port, upstreams, balancer))
        server = self.start(name, argv, port)
        try:
            base = f"http://{HOST}:{port}"
            for payload, size in [item for item in SMALL.items() for _ in range(upstreams)]:
                try:
                    request = urllib.request.Request(f"{base}/{payload}.bin", headers=dict(_fields(REQUEST_HEADERS)))
                    with urllib.request.urlopen(request, timeout=10) as response:
                        body = response.read()
                except OSError as e:  # URLError and HTTPError included
                    raise BenchError(f"{name} failed to serve {payload}.bin: {e}") from None
                if body != _payload(size):
                    raise BenchError(f"{name} returned {len(body)} wrong bytes for {payload}.bin")
            yield server, base
        finally:
            server.stop()


def list_balancers() -> list[str] | None:
    """
    The balancers C{twist rproxy --list-balancers} names (the first word of each line).

    None if rproxy has no such option or it fails: the caller then runs rproxy's default alone.
    """
    try:
        output = run_command([str(VENV_BIN / "twist"), "rproxy", "--list-balancers"], timeout=60).stdout
    except BenchError:
        return None
    names = [line.split()[0] for line in output.splitlines() if line.strip()]
    return names or None


def _payload(size: int) -> bytes:
    """The content of a small payload file of C{size} bytes."""
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]
