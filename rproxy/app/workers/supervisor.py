"""
The supervisor of C{--workers} (L{Supervisor}): it binds the listeners, starts the workers, replaces those
that die, passes signals on, relays what workers tell each other, and restarts them a generation at a time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.app.workers.channel import ASK_TIMEOUT, WORKER_VARIABLE, Control, adoptControl
from rproxy.app.workers.sockets import familyOf, socketKey
from rproxy.downstream.listeners import Listener
from rproxy.signals import OnSignal

_log = Logger()

#: What workers tell the supervisor for every other worker, by the kind of message the others get: for a
#: message, what it is about (the latest message about a thing is the one remembered) and whether that
#: thing is over (then nothing about it is remembered).  C{follow}: a registration made or renewed through
#: the admin API, over when it has no C{ttl} (L{rproxy.app.admin.Registrations}); C{verdict}: worker 0's
#: health checks' verdict on an upstream, over when it has none (L{rproxy.health.shared}).
_RELAYED: dict[str, Callable[[Mapping[str, Any]], tuple[tuple[str, str], bool]]] = {
    "follow": lambda m: ((str(m["service"]), str(m["url"])), m.get("ttl") is None),
    "verdict": lambda m: ((str(m["service"]), str(m["upstream"])), m.get("up") is None),
}

#: The variable a supervisor executing itself again (SIGUSR2) passes its sockets and workers in (JSON).
UPGRADE_VARIABLE = "RPROXY_UPGRADE_STATE"

#: The longest pause before a worker that died is replaced, in seconds.
MAX_BACKOFF = 30.0

#: The first pause after a worker died young, in seconds (doubled at each young death in a row).
FIRST_BACKOFF = 0.5

#: A worker that ran this long (seconds) did not die young: its replacement starts at once.
MIN_UPTIME = 10.0

#: Seconds a new generation has to listen before a rolling restart gives up on it.
READY_TIMEOUT = 60.0

#: Variables of the supervisor that its workers must not see: systemd's (the supervisor alone notifies it).
_PRIVATE = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def workerCount(value: str) -> int:
    """
    The number of workers C{--workers} asks for: a whole number from 1, or C{auto}, the number of cores.

    @raise ValueError: saying what is wrong with C{value}.
    """
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expected a number of processes, 1 or more, or auto, got {value!r}")
    return number


def notifySystemd(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Tell systemd C{state} (C{READY=1}, ...) over C{$NOTIFY_SOCKET}, as C{sd_notify} does; whether it was said
    (C{False} when not run by a C{Type=notify} unit, or when the socket cannot be reached).
    """
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # "@": an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
            sender.sendto(state.encode("utf-8"), address)
    except OSError as e:
        _log.warn("cannot tell systemd {state}: {error}", state=state, error=e.strerror or str(e))
        return False
    return True


@dataclass(eq=False)
class WorkerProcess(protocol.ProcessProtocol):
    """A worker process, seen from the supervisor."""

    index: int
    generation: int
    supervisor: Supervisor
    startedAt: float
    ended: Deferred[None] = field(default_factory=Deferred)
    listens: bool = False
    control: Control | None = None
    pid: int | None = None
    _questions: dict[int, Deferred[object]] = field(default_factory=dict)

    def received(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            self.listens = True
            self.supervisor.listening()
        elif "answer" in message:
            waiting = self._questions.pop(int(message["answer"]), None)
            if waiting is not None:
                waiting.callback(message.get("value"))
        elif "gather" in message:
            self.supervisor.gather(self, int(message["gather"]), str(message.get("what", "state")))
        elif "announce" in message:
            self.supervisor.relay(self, "follow", message["announce"])
        elif "verdict" in message:
            self.supervisor.relay(self, "verdict", message["verdict"])

    def lost(self) -> None:
        self.control = None
        for waiting in self._questions.values():
            waiting.callback(None)
        self._questions.clear()

    def ask(self, number: int, what: str, reactor: Any) -> Deferred[object]:
        """This worker's C{metrics} or C{state} (C{None} if it cannot say within L{ASK_TIMEOUT})."""
        if self.control is None:
            return succeed(None)
        waiting: Deferred[object] = Deferred()
        self._questions[number] = waiting
        self.control.send({"ask": number, "what": what})
        waiting.addTimeout(ASK_TIMEOUT, reactor, onTimeoutCancel=lambda *_: None)
        return waiting

    def signal(self, name: str) -> None:
        """Send the signal C{name} (C{"TERM"}) to the worker, if it still runs."""
        if not self.ended.called and self.transport is not None:
            self.transport.signalProcess(name)

    def processEnded(self, reason: Failure) -> None:
        self.lost()
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


def _describeExit(reason: Failure) -> str:
    """How a process ended: C{exited with status 3}, C{was killed by signal 9 (SIGKILL)}."""
    number = getattr(reason.value, "signal", None)
    if number == signal.SIGTERM:
        return "stopped (SIGTERM)"  # what twist re-raises after draining
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "?"
        return f"was killed by signal {number} ({name})"
    return f"exited with status {getattr(reason.value, 'exitCode', None)}"


class _Signal(OnSignal):
    """A signal to the supervisor, and what it does."""

    def __init__(self, signalNumber: int, reactor: Any, action: Callable[[], object]) -> None:
        super().__init__(signalNumber, reactor)
        self._action = action

    def received(self) -> None:
        self._action()


class Supervisor(service.MultiService):
    """
    The process of C{twist rproxy --workers N} (N > 1): it holds the listening sockets, starts N workers on
    them, replaces those that die, passes signals on, serves the metrics of them all, and restarts them a
    generation at a time (see the module's description).
    """

    name = "supervisor"

    def __init__(
        self,
        workers: int,
        arguments: list[str],
        listeners: Iterable[tuple[str, str]],
        metricsListen: str | None,
        grace: float,
        reactor: Any,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """
        @param workers: how many worker processes run at once.
        @param arguments: the arguments of C{twist rproxy} each worker runs with (the supervisor's own).
        @param listeners: the endpoints to pass to the workers: (option, description) pairs.
        @param metricsListen: the endpoint of C{--metrics-listen}, which the supervisor serves, if any.
        @param grace: seconds a draining worker may take (then it is killed, a little later).
        """
        self.workers = workers
        self._arguments = list(arguments)
        self._listeners = list(listeners)
        self._metricsListen = metricsListen
        self._grace = grace
        self._reactor = reactor
        self._environ = dict(environ)
        self._sockets: dict[str, tuple[int, int]] = {}
        self._bound: list[Listener] = []
        self._adopted: list[int] = []
        self._generation = 0
        self.current: dict[int, WorkerProcess] = {}
        self._previous: list[int] = []
        self._allListen = False
        self._abandoned = False
        self._late: IDelayedCall | None = None
        self._orphans: dict[int, Deferred[None]] = {}  # retiring workers of the previous generation: reaped
        self._youngDeaths: dict[int, int] = {}
        self._stopping = False
        self._questions = count()
        # What workers told the others, as the supervisor relays it, by kind and by what it is about.
        self._relayed: dict[str, dict[tuple[str, str], dict[str, object]]] = {kind: {} for kind in _RELAYED}
        self._metrics: Listener | None = None
        upgrade = self._environ.pop(UPGRADE_VARIABLE, None)
        self._upgrade: dict[str, Any] | None = json.loads(upgrade) if upgrade is not None else None
        for registration in self._upgrade["registrations"] if self._upgrade is not None else []:
            self._remember("follow", registration)
        self.notify = self._environ.get("NOTIFY_SOCKET") is not None
        super().__init__()
        for number, action in (
            (signal.SIGHUP, self._hangUp),
            (signal.SIGUSR1, lambda: self._passOn("USR1")),
            (signal.SIGUSR2, self.upgrade),
        ):
            _Signal(number, reactor, action).setServiceParent(self)

    # -- listening

    def privilegedStartService(self) -> None:
        """Bind the listeners (or take them from the supervisor this one replaced), while it may bind any port."""
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        if self._sockets:
            return
        if self._upgrade is not None:
            for key, (descriptor, family) in self._upgrade["sockets"].items():
                self._sockets[key] = (int(descriptor), int(family))
                self._adopted.append(int(descriptor))
        else:
            idle = protocol.Factory.forProtocol(protocol.Protocol)  # never accepts: the workers do
            for option, description in self._listeners:
                listener = Listener(option, description, idle)
                listener.privilegedStartService()
                port = listener.port
                assert port is not None
                self._reactor.removeReader(port)
                self._bound.append(listener)
                descriptor = port.fileno()  # type: ignore[attr-defined]
                self._sockets[socketKey(option, description)] = (descriptor, familyOf(descriptor))
        if self._metricsListen is not None and self._metrics is None:
            kept = self._upgrade.get("metrics") if self._upgrade is not None else None
            endpoint = AdoptedStreamServerEndpoint(self._reactor, kept[0], kept[1]) if kept else None
            self._metrics = Listener("--metrics-listen", self._metricsListen, self._metricsSite(), endpoint)
            self._metrics.privilegedStartService()

    def _metricsSite(self) -> IProtocolFactory:
        from rproxy.app.workermetrics import allWorkersMetricsSite  # prometheus_client, only for metrics

        return allWorkersMetricsSite(self.allMetrics, self._reactor)

    # -- running

    def startService(self) -> None:
        """Start the first generation of workers (after a SIGUSR2, the next one), and handle the signals."""
        super().startService()
        self._listen()
        if self._upgrade is not None:
            self._previous = [int(pid) for pid in self._upgrade["workers"]]
            self._generation = int(self._upgrade["generation"])
        self._upgrade = None
        self._generation += 1
        for index in range(self.workers):
            self._spawn(index)
        self._late = self._reactor.callLater(READY_TIMEOUT, self._notListening)

    def listening(self) -> None:
        """
        A worker listens: once all of this generation's do (the first time), the processes of the previous
        generation (before the supervisor executed itself again) drain, and systemd hears that rproxy is ready.
        """
        if self._allListen or len(self.current) < self.workers:
            return
        if not all(worker.listens for worker in self.current.values()):
            return
        self._allListen = True
        _log.info(
            "generation {generation}: {workers} workers listen", generation=self._generation, workers=self.workers
        )
        for pid in self._previous:
            self._retireOrphan(pid)
        self._previous = []
        self._say("READY=1", f"MAINPID={os.getpid()}")

    def _notListening(self) -> None:
        self._late = None
        if not self._allListen:
            _log.error(
                "generation {generation}: not every worker listens after {timeout:g}s (see their log){previous}",
                generation=self._generation,
                timeout=READY_TIMEOUT,
                previous="; the previous generation keeps serving" if self._previous else "",
            )

    def _spawn(self, index: int) -> WorkerProcess:
        worker = WorkerProcess(index, self._generation, self, self._reactor.seconds())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        passed: dict[str, list[int]] = {}
        for number, (key, (descriptor, family)) in enumerate(self._sockets.items(), start=3):
            if key.startswith("--admin-listen ") and index != 0:
                continue
            childFDs[number] = descriptor
            passed[key] = [number, family]
        control = max(childFDs) + 1
        childFDs[control] = theirs.fileno()
        state = {
            "index": index,
            "generation": self._generation,
            "sockets": passed,
            "control": control,
            "supervisor": os.getpid(),
        }
        environ = {k: v for k, v in self._environ.items() if k not in _PRIVATE}
        environ[WORKER_VARIABLE] = json.dumps(state)
        argv = [sys.executable, "-m", "twisted", *twistOptions(sys.argv), "rproxy", *self._arguments]
        try:
            transport = self._reactor.spawnProcess(worker, argv[0], argv, env=environ, childFDs=childFDs)
        finally:
            theirs.close()
        worker.pid = transport.pid
        worker.control = Control(worker.received, worker.lost)
        adoptControl(self._reactor, ours.detach(), worker.control)
        self.current[index] = worker
        for kind, remembered in self._relayed.items():
            for message in remembered.values():
                worker.control.send({kind: message})
        return worker

    def ended(self, worker: WorkerProcess, reason: Failure) -> None:
        """C{worker} ended: replace it, unless it was meant to end (drained, or the supervisor is stopping)."""
        how = _describeExit(reason)
        if self._stopping or self.current.get(worker.index) is not worker:
            _log.info(
                "worker {index} (generation {generation}, pid {pid}) {how}",
                index=worker.index,
                generation=worker.generation,
                pid=worker.pid,
                how=how,
            )
            return
        if self._previous and not self._allListen and not worker.listens:
            self._abandon(worker, how)
            return
        del self.current[worker.index]
        lived = self._reactor.seconds() - worker.startedAt
        young = self._youngDeaths.get(worker.index, 0) + 1 if lived < MIN_UPTIME else 0
        self._youngDeaths[worker.index] = young
        delay = 0.0 if young == 0 else min(FIRST_BACKOFF * 2 ** (young - 1), MAX_BACKOFF)
        _log.error(
            "worker {index} (pid {pid}) {how} after {lived:.1f}s (its log above says why); "
            "replacing it in {delay:g}s{loop}",
            index=worker.index,
            pid=worker.pid,
            how=how,
            lived=lived,
            delay=delay,
            loop=f" ({young} young deaths in a row: a crash loop?)" if young > 1 else "",
        )
        self._reactor.callLater(delay, self._replace, worker.index)

    def _replace(self, index: int) -> None:
        if not (self._stopping or self._abandoned or index in self.current):
            self._spawn(index)

    def _abandon(self, worker: WorkerProcess, how: str) -> None:
        """
        A worker of the generation a SIGUSR2 started ended before it listened: that generation cannot start
        (a configuration or an installation that is broken), so it stops, and the previous one keeps serving.
        """
        _log.error(
            "worker {index} of generation {generation} (pid {pid}) {how} before it listened: generation "
            "{generation} cannot start, the previous one keeps serving; fix what its log says, then send SIGUSR2",
            index=worker.index,
            generation=self._generation,
            pid=worker.pid,
            how=how,
        )
        self._abandoned = True
        others, self.current = list(self.current.values()), {}
        for other in others:
            other.signal("TERM")
        if self._late is not None and self._late.active():
            self._late.cancel()
        self._say("READY=1")

    def _hangUp(self) -> None:
        self._say("RELOADING=1")
        self._passOn("HUP")
        self._say("READY=1")

    def _passOn(self, name: str) -> None:
        for worker in self.current.values():
            worker.signal(name)

    def upgrade(self) -> None:
        """
        SIGUSR2: execute this program again (the rproxy installed now), handing it the listening sockets and
        the workers, which drain once the next generation listens.
        """
        if self._stopping:
            return
        sockets = {key: [descriptor, family] for key, (descriptor, family) in self._sockets.items()}
        workers = [w.pid for w in self.current.values() if w.pid is not None]
        workers += [*self._orphans, *self._previous]
        state: dict[str, object] = {
            "sockets": sockets,
            "workers": workers,
            "generation": self._generation,
            "registrations": list(self._relayed["follow"].values()),
        }
        passed = [descriptor for descriptor, _ in self._sockets.values()]
        metrics = self._metrics.port if self._metrics is not None else None
        if metrics is not None:
            descriptor = metrics.fileno()  # type: ignore[attr-defined]
            state["metrics"] = [descriptor, familyOf(descriptor)]
            passed.append(descriptor)
        for descriptor in passed:
            os.set_inheritable(descriptor, True)
        environ = {**os.environ, UPGRADE_VARIABLE: json.dumps(state)}
        argv = list(sys.orig_argv)
        _log.info("SIGUSR2: executing {argv} again, keeping the listeners; a new generation starts", argv=argv)
        self._say("RELOADING=1")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, argv, environ)
        except OSError as e:
            _log.error("SIGUSR2: cannot execute {argv}: {error}; nothing changed", argv=argv, error=e)
            for descriptor in passed:
                os.set_inheritable(descriptor, False)
            self._say("READY=1")

    def _retireOrphan(self, pid: int) -> Deferred[None]:
        """
        Drain a worker of the generation before the supervisor executed itself again, and reap it; fires once
        it is reaped.
        """
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return succeed(None)
        if pid in self._orphans:
            return self._orphans[pid]

        def reap() -> None:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self._orphans[pid]
                reaper.stop()
                _log.info(
                    "worker pid {pid} of the previous generation ended ({status})",
                    pid=pid,
                    status=os.waitstatus_to_exitcode(status),
                )

        reaper = LoopingCall(reap)
        reaper.clock = self._reactor
        reaped = self._orphans[pid] = reaper.start(0.1, now=False).addCallback(lambda _: None)
        return reaped

    def relay(self, worker: WorkerProcess, kind: str, message: Mapping[str, Any]) -> None:
        """
        C{worker} told what every worker must know (L{_RELAYED}): remember it for workers to come, and tell
        the others.
        """
        self._remember(kind, message)
        for other in self.current.values():
            if other is not worker and other.control is not None:
                other.control.send({kind: dict(message)})

    def _remember(self, kind: str, message: Mapping[str, Any]) -> None:
        about, over = _RELAYED[kind](message)
        if over:
            self._relayed[kind].pop(about, None)
        else:
            self._relayed[kind][about] = dict(message)

    def _askAll(self, what: str) -> Deferred[list[tuple[WorkerProcess, object]]]:
        """What every worker that runs answers to C{what}, in the order of their numbers."""
        workers = sorted(self.current.values(), key=lambda w: w.index)
        asked = [w.ask(next(self._questions), what, self._reactor) for w in workers]
        return gatherResults(asked).addCallback(lambda answers: list(zip(workers, answers, strict=True)))

    def allMetrics(self) -> Deferred[list[tuple[WorkerProcess, str]]]:
        """The metrics of every worker that runs, as each writes them."""
        return self._askAll("metrics").addCallback(lambda answers: [(w, str(a or "")) for w, a in answers])

    def gather(self, asking: WorkerProcess, number: int, what: str) -> None:
        """
        Answer C{asking}'s question C{number} with what every worker that can answers to C{what} (its admin
        C{state}, or its C{metrics}), each with its number and generation.
        """

        def answer(answers: list[tuple[WorkerProcess, object]]) -> None:
            if asking.control is not None:
                found = [[w.index, w.generation, a] for w, a in answers if a is not None]
                asking.control.send({"gathered": number, "answers": found})

        self._askAll(what).addCallback(answer)

    # -- stopping

    def stopService(self) -> Deferred[None]:
        """Drain every worker (killed if still there a little after their grace period), then close the sockets."""
        handlers = super().stopService()  # the signals' services
        self._stopping = True
        if self._late is not None and self._late.active():
            self._late.cancel()
        self._say("STOPPING=1")
        workers = list(self.current.values())
        for worker in workers:
            worker.signal("TERM")
        orphans = [*self._orphans, *self._previous]
        reaped = [self._retireOrphan(pid) for pid in orphans]  # SIGTERM again to those already retiring
        self._previous = []

        def kill() -> None:
            for worker in workers:
                worker.signal("KILL")
            for pid in orphans:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        killer = self._reactor.callLater(self._grace + 5.0, kill)

        def closed(_: object) -> Deferred[None]:
            if killer.active():
                killer.cancel()
            for descriptor in self._adopted:
                os.close(descriptor)
            closing = [listener.stopService() for listener in self._bound]
            if self._metrics is not None:
                closing.append(self._metrics.stopService())
            return gatherResults(closing).addCallback(lambda _: None)

        return gatherResults([handlers, *reaped, *(w.ended for w in workers)]).addCallback(closed)

    def _say(self, *states: str) -> None:
        if self.notify:
            notifySystemd("\n".join(states), self._environ)


def twistOptions(argv: list[str]) -> list[str]:
    """
    The options of C{twist} itself in C{argv} (C{--reactor}, C{--log-format}, ...), before its C{rproxy}
    subcommand, which the workers run with too; under C{twistd -y rproxy.tac}, the text log format that
    C{twistd -n} writes.
    """
    return argv[1 : argv.index("rproxy")] if "rproxy" in argv else ["--log-format", "text"]
