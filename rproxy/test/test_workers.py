"""
C{--workers}: a supervisor and its worker processes, run as real C{twist rproxy} processes on real sockets
(L{rproxy.app.workers}, docs/workers.md): the listeners they share (also handed over by socket activation),
a worker replaced when it dies, the metrics of all of them, admin registrations in every worker, SIGHUP,
SIGUSR2 (a rolling restart that refuses no connection), SIGTERM, and what systemd is told.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import tempfile
from dataclasses import replace

import treq
from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from rproxy.app.config import ConfigError
from rproxy.app.tap import Options
from rproxy.app.workers.channel import Control
from rproxy.app.workers.sockets import SharedEndpoint, listenersOf
from rproxy.app.workers.states import combineStates
from rproxy.app.workers.supervisor import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    Supervisor,
    WorkerProcess,
    twistOptions,
    workerCount,
)
from rproxy.app.workers.worker import WorkerRole
from rproxy.observe.status import ServiceState, StateDocument, UpstreamState
from rproxy.test.support import (
    PYTHON,
    ROOT,
    LogCapture,
    ReceivedRequest,
    ScriptedUpstream,
    curl,
    rawRequest,
    responseStatus,
    sleep,
    waitFor,
)
from rproxy.test.test_admin import TOKEN, tokenFile
from rproxy.test.test_config import answerWith, get, parse, writeConfig
from rproxy.test.test_drain import ProxyProcess, assertCleanExit, freePort, waitUntilListening
from rproxy.test.test_reload import body, rewrite, route, services
from rproxy.test.test_systemd import SOCKET_ACTIVATION, WORKERS, environment, localCommand, readUnit, value

TWIST = [PYTHON, "-m", "twisted", "--log-format", "text", "rproxy"]
#: The active health checks' interval in the tests that have them, in seconds.
INTERVAL = 0.1


def children(pid: int) -> set[int]:
    """The process ids of the children of process C{pid}."""
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return {int(each) for each in f.read().split()}


async def workersOf(testCase: unittest.TestCase, process: ProxyProcess, count: int) -> set[int]:
    """The worker processes of C{process}, once there are C{count} (fail after 20 s)."""
    pid = process.transport.pid
    found = await waitFor(lambda: len(children(pid)) == count, 20.0)
    testCase.assertTrue(found, f"{children(pid)} instead of {count} workers:\n{process.log}")
    return children(pid)


def running(pid: int) -> bool:
    """Whether process C{pid} runs (neither gone nor a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def metrics(port: int) -> str:
    """The supervisor's C{/metrics} text."""
    code, out, err = await curl(["-sS", "--fail", f"http://127.0.0.1:{port}/metrics"])
    assert code == 0, err
    return out.decode("utf-8")


async def metricsOfBoth(port: int, key: str) -> str:
    """
    The supervisor's C{/metrics} text once it shows both workers' samples for the upstream C{key} (a worker the
    supervisor asks may answer too late for one scrape on a loaded machine: asked again, for up to 20 s).
    """
    for _ in range(20):
        text = await metrics(port)
        if upstreamIn(text, key) == {"0", "1"}:
            break
        await sleep(0.5)
    return text


def upstreamIn(text: str, key: str) -> set[str]:
    """The workers whose metrics in C{text} show the health of the upstream C{key}."""
    return {
        line.rpartition('worker="')[2].partition('"')[0]
        for line in text.splitlines()
        if line.startswith("rproxy_upstream_health{") and f'upstream="{key}"' in line
    }


def healthIn(text: str, key: str) -> dict[str, str]:
    """The health state (up, ejected, down) of the upstream C{key} in each worker, from their metrics in C{text}."""
    found = {}
    for line in text.splitlines():
        if line.startswith("rproxy_upstream_health{") and f'upstream="{key}"' in line and line.endswith(" 1.0"):
            found[line.rpartition('worker="')[2].partition('"')[0]] = line.partition('state="')[2].partition('"')[0]
    return found


def idleConnections(text: str, key: str) -> dict[str, int]:
    """The idle connections to the upstream C{key} of each worker, by its number, from its metrics in C{text}."""
    found = {}
    for line in text.splitlines():
        if line.startswith("rproxy_upstream_connections{") and f'upstream="{key}"' in line and 'state="idle"' in line:
            found[line.rpartition('worker="')[2].partition('"')[0]] = int(float(line.rpartition(" ")[2]))
    return found


class CountTests(unittest.TestCase):
    """What C{--workers} accepts."""

    def test_count(self) -> None:
        """A whole number from 1, or auto (the cores); anything else is an error saying what is expected."""
        self.assertEqual(workerCount("3"), 3)
        self.assertEqual(workerCount("auto"), os.cpu_count())
        for wrong in ("0", "-1", "two", "1.5"):
            with self.assertRaises(ValueError) as caught:
                workerCount(wrong)
            self.assertIn("1 or more, or auto", str(caught.exception))

    def test_option(self) -> None:
        """C{--workers} is 1 by default (no supervisor); a wrong value is a usage error naming the option."""
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:9"])
        self.assertEqual(options.workers, 1)
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--upstream", "http://127.0.0.1:9", "--workers", "none"])
        self.assertIn("--workers: expected a number of processes", str(caught.exception))

    async def test_checked(self) -> None:
        """C{--check-config} checks the file's C{workers} too, naming the key."""
        path = writeConfig(self, 'workers = 0\nupstream = ["http://127.0.0.1:9"]\n')
        arguments = [*TWIST[1:], "--check-config", path]
        out, err, code = await utils.getProcessOutputAndValue(PYTHON, arguments, env=os.environ, path=ROOT)
        self.assertEqual(code, 1, out + err)
        self.assertIn(f"{path}: workers: expected a number of processes, 1 or more, or auto, got '0'", err.decode())

    def test_plainSocketsOnly(self) -> None:
        """
        The workers are passed listening sockets, so an endpoint that is more than one (C{ssl:}) is refused,
        saying what to use: a worker would otherwise accept plain connections where TLS was asked for.
        """
        config = replace(parse("--upstream", "http://127.0.0.1:9"), listen=["tcp:8080", "ssl:8443:privateKey=k.pem"])
        with self.assertRaises(ConfigError) as caught:
            listenersOf(config, None)
        self.assertIn("--listen ssl:8443:privateKey=k.pem: with --workers, listen on tcp:", str(caught.exception))
        self.assertIn("--tls-listen", str(caught.exception))
        config = replace(config, listen=["tcp:8080", "unix:/tmp/rproxy.sock", "systemd:domain=INET:index=0"])
        self.assertEqual(
            listenersOf(config, "tcp6:9901"),
            [
                ("--listen", "tcp:8080"),
                ("--listen", "unix:/tmp/rproxy.sock"),
                ("--listen", "systemd:domain=INET:index=0"),
                ("--admin-listen", "tcp6:9901"),
            ],
        )

    def test_twistOptions(self) -> None:
        """The workers run with the options given to C{twist} itself; under C{twistd -y}, with its text log."""
        argv = ["twist", "--reactor", "epoll", "--log-format", "text", "rproxy", "--workers", "2"]
        self.assertEqual(twistOptions(argv), ["--reactor", "epoll", "--log-format", "text"])
        self.assertEqual(twistOptions(["twistd", "-n", "-y", "rproxy.tac"]), ["--log-format", "text"])


def upstreamState(key: str, state: str, inFlight: int, open: int, idle: int) -> UpstreamState:
    """An upstream as one worker's admin state shows it."""
    return {
        "key": key,
        "weight": 1,
        "labels": {},
        "state": state,
        "reason": None,
        "ejections": int(state == "ejected"),
        "ejectionEndsIn": None,
        "lastError": None,
        "inFlight": inFlight,
        "pool": {"open": open, "idle": idle},
        "latency": None,
        "balancer": None,
    }


class CombineTests(unittest.TestCase):
    """The status page of a supervisor's workers: worker 0's state, with every worker's counts."""

    def test_combine(self) -> None:
        """Counts add up; a health that differs between workers says how many see what; the rest is worker 0's."""

        def document(up: UpstreamState, down: UpstreamState, opened: int) -> StateDocument:
            service: ServiceState = {"name": "api", "balancer": "round_robin", "upstreams": [up, down]}
            return {
                "shuttingDown": False,
                "services": [service],
                "routes": [],
                "tunnels": {"open": 1, "opened": opened},
            }

        first = document(upstreamState("a", "up", 1, 2, 1), upstreamState("b", "up", 0, 1, 1), 5)
        second = document(upstreamState("a", "up", 2, 3, 1), upstreamState("b", "ejected", 0, 0, 0), 7)
        combined = combineStates([first, second])
        a, b = combined["services"][0]["upstreams"]
        self.assertEqual((a["inFlight"], a["pool"], a["state"], a["reason"]), (3, {"open": 5, "idle": 2}, "up", None))
        self.assertEqual(
            (b["state"], b["reason"], b["ejections"]), ("up", "up in 1 of 2 workers, ejected in 1 of 2 workers", 1)
        )
        self.assertEqual(combined["tunnels"], {"open": 2, "opened": 12})
        self.assertEqual(first["services"][0]["upstreams"][0]["inFlight"], 1)  # the documents are left alone
        self.assertEqual(combineStates([first]), first)


class BackOffTests(unittest.TestCase):
    """A worker that dies is replaced: at once after a long life, later and later while workers die young."""

    def test_backOff(self) -> None:
        clock = Clock()
        supervisor = Supervisor(1, [], [], None, 1.0, clock)
        delays = []
        for lived in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 60.0, 1.0):
            worker = WorkerProcess(0, 0, supervisor, clock.seconds())
            supervisor.current[0] = worker
            clock.advance(lived)
            supervisor.ended(worker, Failure(ProcessTerminated(exitCode=1)))
            [call] = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            call.cancel()
        young = [FIRST_BACKOFF * 2**n for n in range(6)]
        self.assertEqual(delays, [*young, MAX_BACKOFF, MAX_BACKOFF, 0.0, FIRST_BACKOFF])


class _Greeter(protocol.Protocol):
    """Says which port accepted the connection, and closes it."""

    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]
        self.transport.write(self.factory.name)  # type: ignore[attr-defined]
        self.transport.loseConnection()


def greeter(name: bytes) -> protocol.Factory:
    factory = protocol.Factory.forProtocol(_Greeter)
    factory.name, factory.accepted = name, []  # type: ignore[attr-defined]
    return factory


class AloneTests(unittest.TestCase):
    """A worker whose channel to its supervisor closes."""

    def test_whenAlone(self) -> None:
        """What it followed, it does for itself: each of L{WorkerRole.whenAlone} is called, once; it says so."""
        log = LogCapture(self)
        role, _ = self.role(supervisor=os.getppid())
        called: list[str] = []
        role.whenAlone.append(lambda: called.append("checks"))
        control = Control(lambda message: None, role._controlLost)
        role._control = control
        control.connectionLost()
        control.connectionLost()
        self.assertEqual(called, ["checks"])
        self.assertIn("worker 1: no channel to the supervisor any more", "\n".join(log.formatted()))

    def role(self, **state: object) -> tuple[WorkerRole, MemoryReactorClock]:
        """A worker's role (not started: its channel is never adopted) with C{state} beside the usual."""
        descriptor = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, descriptor)
        clock = MemoryReactorClock()
        return WorkerRole({"index": 1, "generation": 2, "sockets": {}, "control": descriptor, **state}, clock), clock

    def test_supervisorGone(self) -> None:
        """A worker whose parent is not the supervisor that spawned it (init took it over) shuts down."""
        log = LogCapture(self)
        role, clock = self.role(supervisor=os.getpid())  # this process: never its own parent
        role._checkParent()
        self.assertIn("worker 1: its supervisor is gone; shutting down", "\n".join(log.formatted()))
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the drain, then the stop

    def test_olderSupervisor(self) -> None:
        """
        The state of an older rproxy's supervisor (which replaces a worker after an upgrade under it) says no
        pid: the worker watches the parent it starts with.
        """
        log = LogCapture(self)
        role, clock = self.role()
        role._checkParent()
        self.assertEqual((log.formatted(), clock.getDelayedCalls()), ([], []))


class SharedPortTests(unittest.TestCase):
    """How a worker accepts from a socket its siblings accept from too."""

    def listening(self) -> socket.socket:
        shared = socket.socket()
        shared.bind(("127.0.0.1", 0))
        shared.listen(64)
        self.addCleanup(shared.close)
        return shared

    async def listen(self, shared: socket.socket, name: bytes) -> protocol.Factory:
        factory = greeter(name)
        port = await SharedEndpoint(reactor, os.dup(shared.fileno()), socket.AF_INET, []).listen(factory)
        self.addCleanup(port.stopListening)
        return factory

    async def test_burstSpreads(self) -> None:
        """
        Connections that arrive at once are taken one per turn of the loop by each port: two ports on one
        socket share a burst, where Twisted's own port would take it all at its first turn.
        """
        shared = self.listening()
        clients = [socket.create_connection(shared.getsockname()) for _ in range(10)]
        for each in clients:
            self.addCleanup(each.close)
        first, second = await self.listen(shared, b"1"), await self.listen(shared, b"2")
        self.assertTrue(await waitFor(lambda: len(first.accepted) + len(second.accepted) == 10))
        self.assertGreaterEqual(min(len(first.accepted), len(second.accepted)), 3)

    async def test_clientGone(self) -> None:
        """A client that left before its connection was accepted (reset) is skipped; the port goes on."""
        shared = self.listening()
        gone = socket.create_connection(shared.getsockname())
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()
        await self.listen(shared, b"still here")
        await sleep(0.05)
        self.assertEqual(await rawRequest(shared.getsockname()[1], b""), b"still here")


class SupervisorTests(unittest.TestCase):
    """Real supervisors with two workers."""

    timeout = 120

    async def test_sharedSocketsMetricsAdminAndReplacement(self) -> None:
        """
        Two workers serve the socket that socket activation handed the supervisor; its C{/metrics} has
        samples of both, and so has the admin listener's; an upstream registered through the admin API
        (served by worker 0) is in both, in the worker that replaces one killed, whose death is logged with
        its signal, and in the next generation of workers.
        """
        a, b = ScriptedUpstream(self, answerWith(b"a")), ScriptedUpstream(self, answerWith(b"b"))
        port, admin, metricsPort = freePort(), freePort(), freePort()
        command = [
            *TWIST,
            "--workers=2",
            "--listen=systemd:domain=INET:index=0",
            f"--upstream={a.url}",
            f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
            f"--admin-token-file={tokenFile(self)}",
            f"--metrics-listen=tcp:{metricsPort}:interface=127.0.0.1",
            "--access-log=off",
        ]
        process = ProxyProcess.spawn(self, [PYTHON, "-c", SOCKET_ACTIVATION, str(port), *command])
        first = await workersOf(self, process, 2)
        await waitUntilListening(self, process, admin)
        self.assertEqual([await body(port, b"/") for _ in range(4)], [b"a"] * 4)
        self.assertTrue(await waitFor(lambda: process.log.count("serves") == 2, 20.0), process.log)
        text = await metricsOfBoth(metricsPort, a.url)
        self.assertEqual(upstreamIn(text, a.url), {"0", "1"}, text)

        code, out, err = await curl(
            [
                "-sS",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                "--json",
                json.dumps({"url": b.url, "ttl": 60}),
                f"http://127.0.0.1:{admin}/services/default/upstreams",
            ]
        )
        self.assertEqual(code, 0, err + process.log.encode())
        self.assertIn(b'"id"', out)
        text = await metricsOfBoth(metricsPort, b.url)
        self.assertEqual(upstreamIn(text, b.url), {"0", "1"}, text)

        victim = max(first)
        os.kill(victim, 9)
        self.assertTrue(await waitFor(lambda: "was killed by signal 9 (SIGKILL)" in process.log, 10.0))
        second = await workersOf(self, process, 2)
        self.assertNotIn(victim, second)
        self.assertTrue(await waitFor(lambda: process.log.count("serves") == 3, 20.0), process.log)
        text = await metricsOfBoth(metricsPort, b.url)
        self.assertEqual(upstreamIn(text, b.url), {"0", "1"}, text)
        self.assertEqual({await body(port, b"/") for _ in range(10)}, {b"a", b"b"})

        # The status page (served by worker 0) adds up every worker's connections to an upstream.
        for _ in range(40):
            idle = idleConnections(await metrics(metricsPort), a.url)
            if len(idle) == 2 and all(idle.values()):
                break
            await body(port, b"/")
        self.assertEqual(set(idle), {"0", "1"})
        code, page, err = await curl(["-sS", "-u", f"any:{TOKEN}", f"http://127.0.0.1:{admin}/status"])
        self.assertEqual(code, 0, err)
        row = page.decode("utf-8").partition(f'data-upstream="{a.url}"')[2].partition("</tr>")[0]
        total = sum(idle.values())
        self.assertIn(f'<td class="number">{total} / {total}</td>', row)
        # So does GET /state, the same document for machines.
        code, out, err = await curl(["-sS", "-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{admin}/state"])
        [upstream] = [u for s in json.loads(out)["services"] for u in s["upstreams"] if u["key"] == a.url]
        self.assertEqual(upstream["pool"], {"open": total, "idle": total}, out)
        # And the admin listener's /metrics: every worker's samples, labelled, as on the metrics listener.
        code, out, err = await curl(
            ["-sS", "--fail", "-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{admin}/metrics"]
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(upstreamIn(out.decode("utf-8"), a.url), {"0", "1"}, out)
        self.assertEqual(idleConnections(out.decode("utf-8"), a.url), idle)

        # A rolling restart keeps the registration, and the metrics listener (the supervisor's own).
        os.kill(process.transport.pid, signal.SIGUSR2)
        self.assertTrue(await waitFor(lambda: "generation 2: 2 workers listen" in process.log, 20.0), process.log)
        text = await metricsOfBoth(metricsPort, b.url)
        self.assertEqual(upstreamIn(text, b.url), {"0", "1"}, text)
        self.assertIn('generation="2"', text)
        self.assertEqual({await body(port, b"/") for _ in range(10)}, {b"a", b"b"})

    async def test_healthCheckedByOneWorker(self) -> None:
        """
        Worker 0 alone runs the active health checks, and the other worker follows its verdicts: the
        upstream whose checks fail is down in both workers, and up in both again once they pass; it gets
        the checks of one worker, not of two; a worker that replaces one killed is told the verdict, worker 0
        too.
        """
        status = [200]

        def answer(proto: object, request: ReceivedRequest) -> bytes:
            if request.requestLine.startswith(b"GET /health "):
                return b"HTTP/1.1 %d Checked\r\nContent-Length: 0\r\n\r\n" % status[0]
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"

        upstream = ScriptedUpstream(self, answer)
        port, admin = freePort(), freePort()
        checked = f'health-path = "/health"\nhealth-interval = {INTERVAL}\nhealth-fall = 3\nhealth-rise = 1\n'
        top = f'listen = ["tcp:{port}:interface=127.0.0.1"]\naccess-log = "off"\n'
        path = writeConfig(self, top + services(a=upstream.url) + checked + route("a"))
        # Metrics from worker 0's admin listener alone (no --metrics-listen): every worker's, all the same.
        command = [
            *TWIST,
            "--workers=2",
            f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
            f"--admin-token-file={tokenFile(self)}",
            "--config",
            path,
        ]
        process = ProxyProcess.spawn(self, command)
        first = await workersOf(self, process, 2)
        self.assertTrue(await waitFor(lambda: process.log.count("serves") == 2, 20.0), process.log)

        async def health() -> dict[str, str]:
            """Each worker's state of the upstream ({} while worker 0, which serves the admin API, is replaced)."""
            url = f"http://127.0.0.1:{admin}/metrics"
            code, out, err = await curl(["-sS", "--fail", "-H", f"Authorization: Bearer {TOKEN}", url])
            return healthIn(out.decode("utf-8"), upstream.url) if code == 0 else {}

        async def healthIs(state: str) -> bool:
            for _ in range(50):
                if await health() == {"0": state, "1": state}:
                    return True
                await sleep(0.1)
            return False

        def checks() -> int:
            return sum(r.requestLine.startswith(b"GET /health ") for r in upstream.requests)

        status[0] = 503
        self.assertTrue(await healthIs("down"), process.log)
        code, out, err = await curl(["-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/"])
        self.assertEqual(out, b"503", err)
        before, started = checks(), reactor.seconds()
        await sleep(20 * INTERVAL)
        intervals = (reactor.seconds() - started) / INTERVAL  # 20, or more when the test was paused longer
        # One worker checking at INTERVAL makes at most one check an interval; two would make about two.
        self.assertLessEqual(checks() - before, 1.2 * intervals + 1)
        self.assertGreater(checks() - before, 0)

        victim = max(first)  # worker 1: its replacement learns the verdict from the supervisor
        os.kill(victim, 9)
        self.assertTrue(await waitFor(lambda: process.log.count("serves") == 3, 20.0), process.log)
        self.assertTrue(await healthIs("down"), process.log)
        # Worker 0 replaced: the new one starts from the verdict too, so it never says the upstream is up
        # while its checks fail (before the three a new process needs to mark it down).
        os.kill(min(first), 9)
        self.assertTrue(await waitFor(lambda: process.log.count("serves") == 4, 20.0), process.log)
        for _ in range(10):
            self.assertIn((await health()).get("1"), ("down", None))
            await sleep(INTERVAL)
        self.assertTrue(await healthIs("down"), process.log)
        status[0] = 200
        self.assertTrue(await healthIs("up"), process.log)
        self.assertEqual({await body(port, b"/") for _ in range(4)}, {b"a"})

    async def test_reloadRollingRestartAndStop(self) -> None:
        """
        SIGHUP reloads every worker; SIGUSR2 starts a new generation (the supervisor executed again, same
        pid) while clients keep connecting, and not one connection or request fails; a SIGUSR2 whose workers
        cannot start changes nothing; SIGTERM drains them all and the supervisor exits cleanly; systemd is
        told READY=1, RELOADING=1 and STOPPING=1.
        """
        a, b = ScriptedUpstream(self, answerWith(b"a")), ScriptedUpstream(self, answerWith(b"b"))
        port = freePort()
        notifications = self.notifySocket()
        top = f'workers = "2"\nlisten = ["tcp:{port}:interface=127.0.0.1"]\naccess-log = "off"\n'
        path = writeConfig(self, top + services(a=a.url) + route("a"))
        process = ProxyProcess.spawn(self, [*TWIST, "--config", path], {"NOTIFY_SOCKET": notifications.path})
        first = await workersOf(self, process, 2)
        await waitUntilListening(self, process, port)
        self.assertTrue(await waitFor(lambda: "READY=1" in notifications.said, 20.0), process.log)
        self.assertIn(f"MAINPID={process.transport.pid}", notifications.said)

        rewrite(path, top + services(a=b.url) + route("a"))
        process.transport.signalProcess("HUP")
        reloaded = await waitFor(lambda: process.log.count("configuration reloaded (SIGHUP)") == 2, 10.0)
        self.assertTrue(reloaded, process.log)
        self.assertEqual({await body(port, b"/") for _ in range(10)}, {b"b"})
        self.assertIn("RELOADING=1", notifications.said)

        outcomes: list[int] = []
        done = False

        async def hammer() -> None:
            """A new connection for each request: a listener that stops accepting would refuse one."""
            while not done and len(outcomes) < 30000:
                answer = await rawRequest(port, get(b"/") + b"Connection: close\r\n\r\n")
                outcomes.append(responseStatus(answer))

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)

        async def keepAlive() -> None:
            """
            Keep-alive connections, as a browser keeps them: a draining worker closes each between two
            responses, and the client sends its idempotent request again on a new connection (as Twisted's
            pool does for one closed before any byte of the response came back).
            """
            while not done and len(outcomes) < 30000:
                response = await treq.get(f"http://127.0.0.1:{port}/", pool=pool)
                await response.content()
                outcomes.append(response.code)

        clients = [defer.ensureDeferred(each()) for each in (hammer, hammer, keepAlive, keepAlive)]
        self.assertTrue(await waitFor(lambda: outcomes, 10.0), "no request answered before the restart")
        before = len(outcomes)
        os.kill(process.transport.pid, signal.SIGUSR2)
        retired = await waitFor(lambda: process.log.count("of the previous generation ended") == 2, 30.0)
        during = len(outcomes)
        await sleep(0.3)
        done = True
        await defer.gatherResults(clients)
        self.assertTrue(retired, process.log)
        self.assertGreater(before, 0)
        self.assertGreater(during, before + 10)  # the clients went on all through the restart
        self.assertGreater(len(outcomes), during)  # and the new generation alone answered them
        self.assertEqual(set(outcomes), {200}, f"{len(outcomes)} requests")
        second = await workersOf(self, process, 2)
        self.assertFalse(first & second)
        self.assertIn("generation 2: 2 workers listen", process.log)

        # A SIGUSR2 whose workers cannot start leaves the generation that serves alone.
        missing = os.path.join(tempfile.mkdtemp(), "gone", "access.log")
        rewrite(path, top.replace('"off"', f'"{missing}"') + services(a=b.url) + route("a"))
        os.kill(process.transport.pid, signal.SIGUSR2)
        abandoned = await waitFor(
            lambda: "generation 3 cannot start, the previous one keeps serving" in process.log, 20
        )
        self.assertTrue(abandoned, process.log)
        self.assertIn(f"--access-log: cannot open {missing}", process.log)
        self.assertEqual({await body(port, b"/") for _ in range(6)}, {b"b"})
        self.assertEqual(await workersOf(self, process, 2), second)

        process.terminate()
        await process.waitForExit(self, 20.0)
        assertCleanExit(self, process)
        self.assertEqual(process.log.count("Main loop terminated."), 5, process.log)  # 2 generations of 2, and it
        self.assertEqual(process.log.count("of the previous generation ended"), 4, process.log)
        self.assertIn("STOPPING=1", notifications.said)

    async def test_notifyUnit(self) -> None:
        """
        rproxy-workers.service's command, with its environment (rproxy.tac, C{RPROXY_WORKERS=auto}): the
        supervisor runs a worker per core, tells systemd C{READY=1} once they listen, reloads them all on its
        C{ExecReload} signal, starts a new generation on SIGUSR2 (twistd executed again), and stops them all
        on its C{KillSignal}, cleanly.
        """
        a = ScriptedUpstream(self, answerWith(b"a"))
        port = freePort()
        notifications = self.notifySocket()
        unit = readUnit(WORKERS)
        path = writeConfig(self, f'listen = ["tcp:{port}:interface=127.0.0.1"]\n' + services(a=a.url) + route("a"))
        environ = {**environment(unit), "RPROXY_CONFIG": path, "NOTIFY_SOCKET": notifications.path}
        environ["PYTHONPATH"] = ROOT  # this checkout's rproxy, whatever the virtualenv's twistd would import
        process = ProxyProcess.spawn(self, localCommand(value(unit, "Service", "ExecStart")), environ)
        await workersOf(self, process, os.cpu_count() or 1)
        self.assertTrue(await waitFor(lambda: "READY=1" in notifications.said, 20.0), process.log)
        self.assertEqual(await body(port, b"/"), b"a")
        os.kill(process.transport.pid, signal.SIGHUP)  # ExecReload: kill -HUP $MAINPID
        reloads = os.cpu_count() or 1
        reloaded = await waitFor(lambda: process.log.count("configuration reloaded (SIGHUP)") == reloads, 10.0)
        self.assertTrue(reloaded, process.log)
        os.kill(process.transport.pid, signal.SIGUSR2)  # twistd executed again: a new generation
        upgraded = await waitFor(lambda: f"generation 2: {reloads} workers listen" in process.log, 20.0)
        self.assertTrue(upgraded, process.log)
        self.assertEqual(await body(port, b"/"), b"a")
        os.kill(process.transport.pid, signal.Signals[value(unit, "Service", "KillSignal")])
        await process.waitForExit(self, 20.0)
        assertCleanExit(self, process)
        self.assertIn("STOPPING=1", notifications.said)

    async def test_orphans(self) -> None:
        """
        Workers ignore SIGUSR2 (the supervisor's); workers whose supervisor was killed (SIGKILL: it could not
        stop them) shut down by themselves.
        """
        port = freePort()
        process = ProxyProcess.spawn(
            self, [*TWIST, "--workers=2", f"--listen=tcp:{port}:interface=127.0.0.1", "--upstream=http://127.0.0.1:9"]
        )
        workers = await workersOf(self, process, 2)
        self.assertTrue(await waitFor(lambda: process.log.count("serves") == 2, 20.0), process.log)

        for pid in workers:
            os.kill(pid, signal.SIGUSR2)  # the supervisor's signal, as a whole process group gets it
        await sleep(0.3)
        self.assertEqual(await workersOf(self, process, 2), workers)
        process.transport.signalProcess("KILL")

        self.assertTrue(await waitFor(lambda: not any(running(pid) for pid in workers), 10.0))

    async def test_orphanedWhileStarting(self) -> None:
        """
        Workers whose supervisor was killed while they were starting (their parent is no longer the supervisor
        when they look) shut down by themselves too.
        """
        port = freePort()
        process = ProxyProcess.spawn(
            self, [*TWIST, "--workers=2", f"--listen=tcp:{port}:interface=127.0.0.1", "--upstream=http://127.0.0.1:9"]
        )
        workers = await workersOf(self, process, 2)
        for pid in workers:  # just spawned, still importing: held there until their supervisor is gone
            os.kill(pid, signal.SIGSTOP)

        def killLeftovers() -> None:  # had the test failed, a stopped worker would outlive it
            for pid in workers:
                if running(pid):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(killLeftovers)
        supervisor = process.transport.pid
        process.transport.signalProcess("KILL")

        def parentOf(pid: int) -> int:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                return int(f.read().rpartition(")")[2].split()[1])

        self.assertTrue(await waitFor(lambda: all(parentOf(pid) != supervisor for pid in workers), 10.0))
        for pid in workers:
            os.kill(pid, signal.SIGCONT)

        self.assertTrue(await waitFor(lambda: not any(running(pid) for pid in workers), 10.0))

    def notifySocket(self) -> _Notifications:
        """A datagram socket standing for systemd's C{NOTIFY_SOCKET}, read while the test runs."""
        directory = tempfile.mkdtemp()
        listening = _Notifications(os.path.join(directory, "notify"))
        self.addCleanup(listening.close)
        return listening


class _Notifications:
    """What rproxy says to systemd, read from a datagram socket as it arrives."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(path)
        self._socket.setblocking(False)
        self._said: list[str] = []
        reactor.addReader(self)  # type: ignore[attr-defined]

    @property
    def said(self) -> str:
        return "\n".join(self._said)

    def fileno(self) -> int:
        return self._socket.fileno()

    def doRead(self) -> None:
        try:
            self._said.append(self._socket.recv(4096).decode("utf-8"))
        except BlockingIOError:
            pass

    def logPrefix(self) -> str:
        return "notify"

    def connectionLost(self, reason: Failure) -> None:
        pass

    def close(self) -> None:
        reactor.removeReader(self)  # type: ignore[attr-defined]
        self._socket.close()
        os.unlink(self.path)
        os.rmdir(os.path.dirname(self.path))
