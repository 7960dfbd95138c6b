"""
C{--workers N}: one supervisor process and N worker processes on the same listening sockets.

The supervisor binds every listener once (C{--listen}, C{--tls-listen}, C{--admin-listen}; or adopts the
sockets systemd passed), and passes the listening sockets to its workers as inherited descriptors; each
worker is C{twist rproxy} with the same arguments, and runs the whole proxy, its listeners accepting from
the inherited sockets (L{_SharedPort}, one connection per turn of its loop, so that a burst of connections
spreads over the workers) instead of bound.  Inherited sockets, not C{SO_REUSEPORT}: with one socket
there is one accept queue, which outlives any worker, so a worker that exits (a restart, a crash, an
upgrade) leaves no accepted-but-unserved connection behind to be reset, as a C{SO_REUSEPORT} socket's own
queue is when it closes; and they work for UNIX sockets and systemd's socket activation alike.

The supervisor serves nothing itself but C{--metrics-listen}, whose C{/metrics} asks each worker for its
metrics over its control channel (a socketpair, JSON lines) and answers them all, each sample labelled
with its C{worker}; and gathers every worker's admin state and metrics for worker 0's admin listener (its
status page and C{GET /state}, L{combineStates}; its C{/metrics}, labelled likewise).
The admin listener is passed to worker 0 only; an upstream registered, renewed or
deregistered there is announced to the supervisor, which tells every other worker, and every worker it
starts later (L{rproxy.app.admin.Registrations.follow}).  Active health checks run in worker 0 alone, whose
verdicts go the same way (L{rproxy.health.shared}); passive health (ejections) stays per worker.

Signals to the supervisor:
  - SIGHUP: every worker reloads (its configuration, certificates, access log);
  - SIGUSR1: every worker reopens its access log;
  - SIGTERM, SIGINT: every worker drains (its grace period), then the supervisor exits;
  - SIGUSR2: a rolling restart that is also the binary upgrade: the supervisor executes itself again
    (the rproxy installed now), keeping its process id and its listening sockets, starts a new generation
    of workers, and once all of them listen, the previous generation drains and exits.

A worker that exits otherwise is replaced, after a pause that doubles while workers keep dying young (a
crash loop), up to L{MAX_BACKOFF}.  Under systemd (C{Type=notify}), the supervisor says C{READY=1} when
its first generation listens, C{RELOADING=1} on SIGHUP and C{STOPPING=1} on the way out (L{notifySystemd}).
docs/workers.md tells operators all this.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any, cast

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.app.config import ConfigError, ProxyConfig
from rproxy.downstream.listeners import Listener
from rproxy.health.shared import Verdict
from rproxy.signals import OnSignal

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from rproxy.app.admin import Registrations
    from rproxy.health.shared import VerdictFollower
    from rproxy.observe.status import StateDocument, UpstreamState

__all__ = [
    "MAX_BACKOFF",
    "Supervisor",
    "WorkerRole",
    "notifySystemd",
    "workerCount",
]

_log = Logger()

#: The variable that makes C{twist rproxy} a worker: what its supervisor passed it (JSON).
WORKER_VARIABLE = "RPROXY_WORKER_STATE"
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
#: Seconds between a worker's SIGTERM, when it stops accepting, and its drain.
SETTLE = 1.0
#: Seconds a worker has to answer a question (its metrics).
ANSWER_TIMEOUT = 5.0
#: The endpoint types whose listening sockets a supervisor can pass to its workers as they are.
_SOCKETS = ("tcp", "tcp6", "unix", "systemd")
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


def _familyOf(descriptor: int) -> int:
    """The address family of the socket C{descriptor}."""
    with socket.socket(fileno=os.dup(descriptor)) as probe:
        return int(probe.family)


def _key(option: str, description: str) -> str:
    return f"{option} {description}"


class _Control(LineOnlyReceiver):
    """One end of a control channel: JSON objects, one a line, handed to C{received}."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024  # a worker's metrics

    def __init__(self, received: Callable[[dict[str, Any]], object], lost: Callable[[], object]) -> None:
        self._received = received
        self._lost = lost

    def send(self, message: Mapping[str, object]) -> None:
        """Send C{message} (if the channel is still open)."""
        if self.transport is not None and self.connected:
            self.sendLine(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            _log.error("control channel: not a JSON message: {line!r}", line=line[:80])
            return
        self._received(message)

    def lineLengthExceeded(self, line: bytes) -> None:
        _log.error("control channel: a message of more than {limit} bytes; closing it", limit=self.MAX_LENGTH)
        super().lineLengthExceeded(line)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost()


@implementer(IListeningPort, IReadDescriptor)
class _SharedPort:
    """
    A listening socket that other processes accept from too, accepted from one connection at a time:
    each accepted socket is handed to the reactor (C{adoptStreamConnection}) and the next one waits for
    the next turn of the loop.  Twisted's own port accepts up to a hundred connections per turn (more
    after a full batch), so the first worker to wake would take a whole burst of connections (all of a load
    balancer's keep-alive connections, say) and the others none; one per turn lets the worker with the
    shortest turns, the least busy, take the most.
    """

    def __init__(self, reactor: Any, descriptor: int, family: int, factory: IProtocolFactory) -> None:
        self._reactor = reactor
        self._socket = socket.socket(family, socket.SOCK_STREAM, fileno=descriptor)
        self._socket.setblocking(False)
        self._family = family
        self._factory = factory
        self._paused: IDelayedCall | None = None

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return f"{type(self._factory).__name__} (shared)"

    def startListening(self) -> None:
        """Accept connections (the socket listens already: another process bound it)."""
        self._factory.doStart()
        self._reactor.addReader(self)

    def doRead(self) -> None:
        """Accept one connection, if one waits."""
        try:
            connection, _ = self._socket.accept()
        except BlockingIOError:
            return  # another worker took it
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # No descriptor for it: stop looking for a moment instead of waking for it at every turn.
                _log.error("cannot accept a connection: {error}; pausing for 1s", error=e.strerror)
                self._reactor.removeReader(self)
                self._paused = self._reactor.callLater(1.0, self._resume)
            return  # ECONNABORTED and the like: the client is gone
        try:
            self._reactor.adoptStreamConnection(connection.fileno(), self._family, self._factory)
        except OSError:
            pass  # the client already left (ENOTCONN): there is nothing to serve
        finally:
            connection.close()  # the reactor has its own copy

    def _resume(self) -> None:
        self._paused = None
        self._reactor.addReader(self)

    def stopListening(self) -> Deferred[None]:
        """Stop accepting (the socket stays open in the supervisor and the other workers)."""
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        self._reactor.removeReader(self)
        if self._socket.fileno() != -1:
            self._socket.close()
            self._factory.doStop()
        return succeed(None)

    loseConnection = stopListening

    def connectionLost(self, reason: Failure) -> None:
        self.stopListening()

    def getHost(self) -> IPv4Address | IPv6Address | UNIXAddress:
        host = self._socket.getsockname()
        if self._family == socket.AF_UNIX:
            return UNIXAddress(host)
        kind = IPv6Address if self._family == socket.AF_INET6 else IPv4Address
        return kind("TCP", host[0], host[1])


@implementer(IStreamServerEndpoint)
class _SharedEndpoint:
    """A listening socket passed by the supervisor, listened on as a L{_SharedPort} (once)."""

    def __init__(self, reactor: Any, descriptor: int, family: int, ports: list[_SharedPort]) -> None:
        """@param ports: where the port is added once it listens."""
        self._reactor = reactor
        self._descriptor = descriptor
        self._family = family
        self._ports = ports

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        port = _SharedPort(self._reactor, self._descriptor, self._family, factory)
        port.startListening()
        self._ports.append(port)
        return succeed(port)


def _adoptControl(reactor: Any, descriptor: int, control: _Control) -> None:
    """Run C{control} over the UNIX stream socket C{descriptor}, which is then closed (the reactor has its copy)."""
    factory = protocol.Factory.forProtocol(lambda: control)
    reactor.adoptStreamConnection(descriptor, socket.AF_UNIX, factory)
    os.close(descriptor)


# -- the worker's side


@dataclass(frozen=True)
class WorkerName:
    """Which worker said something: its number, and the generation it belongs to."""

    index: int
    generation: int


class WorkerRole(service.Service):
    """
    What makes this process a worker of a supervisor: the listening sockets it passed (L{endpoint}), and the
    control channel to it, over which the worker says when it listens, answers for its metrics, and announces
    and follows the admin API's registrations.  A worker whose supervisor is gone (its parent changed)
    shuts down, draining.

    @ivar index: the worker's number, from 0.
    @ivar generation: the generation it belongs to (a rolling restart starts the next one).
    @ivar metrics: the registry of the worker's metrics, once the proxy keeps them.
    @ivar registrations: the admin API's registrations, which this worker announces or follows.
    @ivar state: what makes this worker's admin state document (L{rproxy.app.admin.state}), if it has one.
    """

    name = "worker"

    def __init__(self, state: Mapping[str, Any], reactor: Any) -> None:
        self.index = int(state["index"])
        self.generation = int(state["generation"])
        self._sockets: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in state["sockets"].items()}
        self._controlDescriptor = int(state["control"])
        self._reactor = reactor
        self._parent = os.getppid()
        self._watch: LoopingCall | None = None
        self._control: _Control | None = None
        self.metrics: CollectorRegistry | None = None
        self.registrations: Registrations | None = None
        self.verdicts: VerdictFollower | None = None
        self.state: Callable[[], StateDocument] | None = None
        self._gathering: dict[int, Deferred[list[list[Any]]]] = {}
        self._numbers = count()
        self._ports: list[_SharedPort] = []
        self._previousTerm: Any = None
        self._leaving = False

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str], reactor: Any) -> WorkerRole | None:
        """The role the supervisor gave this process in C{environ}; C{None} if it is no worker."""
        state = environ.get(WORKER_VARIABLE)
        return None if state is None else cls(json.loads(state), reactor)

    def endpoint(self, option: str, description: str) -> IStreamServerEndpoint | None:
        """The socket the supervisor passed for C{option description}; C{None} if it passed none (not ours)."""
        passed = self._sockets.get(_key(option, description))
        if passed is None:
            return None
        return _SharedEndpoint(self._reactor, passed[0], passed[1], self._ports)

    def startService(self) -> None:
        """Open the control channel, say that this worker listens (its listeners started before), and watch."""
        super().startService()
        # SIGUSR2 is the supervisor's (a new generation); its default action would end a worker sent it too.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self._reactor.callWhenRunning(self._handleTerm)  # after the reactor's own SIGTERM handler
        self._control = _Control(self._received, self._controlLost)
        _adoptControl(self._reactor, self._controlDescriptor, self._control)
        self._control.send({"ready": os.getpid()})
        self._watch = LoopingCall(self._checkParent)
        self._watch.clock = self._reactor
        self._watch.start(1.0, now=False)
        _log.info(
            "worker {index} (generation {generation}, pid {pid}) serves",
            index=self.index,
            generation=self.generation,
            pid=os.getpid(),
        )

    def stopService(self) -> None:
        super().stopService()
        if self._watch is not None and self._watch.running:
            self._watch.stop()

    def _handleTerm(self) -> None:
        self._previousTerm = signal.signal(signal.SIGTERM, self._terminated)

    def _terminated(self, number: int, frame: object) -> None:
        self._reactor.callFromThread(self._leave)

    def _leave(self) -> None:
        """
        SIGTERM (or the supervisor gone): stop accepting at once (the other workers, or the next generation,
        take the connections that wait), and drain L{SETTLE} seconds later, as SIGTERM does otherwise.  A
        connection accepted just before has its request come in meanwhile, and is answered: the drain would
        close a connection with no request in progress at once, and its client would get no answer.
        """
        if self._leaving:
            return
        self._leaving = True
        if self._previousTerm is not None:
            signal.signal(signal.SIGTERM, self._previousTerm)  # a second SIGTERM stops at once
        for port in self._ports:
            port.stopListening()
        _log.info("worker {index}: SIGTERM: not accepting; draining in {settle:g}s", index=self.index, settle=SETTLE)
        self._reactor.callLater(SETTLE, self._reactor.stop)

    def announce(self, message: Mapping[str, object]) -> None:
        """Tell the supervisor C{message} (a registration's change), for the other workers."""
        if self._control is not None:
            self._control.send({"announce": dict(message)})

    def reportVerdict(self, verdict: Verdict) -> None:
        """Tell the supervisor C{verdict} (this worker's active checks'), for the other workers."""
        if self._control is not None:
            self._control.send({"verdict": verdict.message()})

    def _received(self, message: dict[str, Any]) -> None:
        if "ask" in message:
            assert self._control is not None
            self._control.send({"answer": message["ask"], "value": self._answer(message.get("what"))})
        elif "gathered" in message:
            waiting = self._gathering.pop(int(message["gathered"]), None)
            if waiting is not None:
                waiting.callback(message["answers"])
        elif "follow" in message and self.registrations is not None:
            self.registrations.follow(message["follow"])
        elif "verdict" in message and self.verdicts is not None:
            self.verdicts.told(Verdict.fromMessage(message["verdict"]))

    def _answer(self, what: object) -> object:
        """This worker's C{metrics} (Prometheus's text) or C{state} (the admin API's document), if it keeps them."""
        if what == "state":
            return self.state() if self.state is not None else None
        if self.metrics is None:
            return ""
        from prometheus_client import generate_latest

        return generate_latest(self.metrics).decode("utf-8")

    def everyWorker(self, mine: StateDocument) -> Deferred[StateDocument]:
        """
        The state of every worker, combined (L{combineStates}), as the supervisor gathers it; C{mine} alone if
        it cannot (its channel is closed, or it does not answer within L{ANSWER_TIMEOUT}).
        """

        def combined(answers: list[tuple[WorkerName, object]]) -> StateDocument:
            return combineStates([cast("StateDocument", a) for _, a in answers] or [mine])

        return self._gather("state").addCallback(combined)

    def everyWorkerMetrics(self) -> Deferred[list[tuple[WorkerName, str]]]:
        """
        The metrics of every worker (Prometheus's text), each with the worker that wrote them, as the
        supervisor gathers them; this worker's alone if it cannot.
        """

        def texts(answers: list[tuple[WorkerName, object]]) -> list[tuple[WorkerName, str]]:
            if not answers:
                answers = [(WorkerName(self.index, self.generation), self._answer("metrics"))]
            return [(name, str(text)) for name, text in answers]

        return self._gather("metrics").addCallback(texts)

    def _gather(self, what: str) -> Deferred[list[tuple[WorkerName, object]]]:
        """What every worker answers to C{what}, through the supervisor; nothing if it cannot say in time."""
        if self._control is None:
            return succeed([])
        number = next(self._numbers)
        waiting: Deferred[list[list[Any]]] = Deferred()
        self._gathering[number] = waiting
        self._control.send({"gather": number, "what": what})
        waiting.addTimeout(ANSWER_TIMEOUT, self._reactor, onTimeoutCancel=lambda *_: [])
        return waiting.addCallback(lambda answers: [(WorkerName(i, g), a) for i, g, a in answers])

    def _controlLost(self) -> None:
        self._control = None
        for waiting in list(self._gathering.values()):
            waiting.cancel()  # its timeout's answer: nothing (this worker's own alone)

    def _checkParent(self) -> None:
        if os.getppid() != self._parent:
            _log.warn("worker {index}: its supervisor is gone; shutting down", index=self.index)
            self._parent = os.getppid()
            self._leave()


# -- the supervisor's side


@dataclass(eq=False)
class _Worker(protocol.ProcessProtocol):
    """A worker process, seen from the supervisor."""

    index: int
    generation: int
    supervisor: Supervisor
    startedAt: float
    ended: Deferred[None] = field(default_factory=Deferred)
    listens: bool = False
    control: _Control | None = None
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
            self.supervisor.announced(self, message["announce"])
        elif "verdict" in message:
            self.supervisor.judged(self, message["verdict"])

    def lost(self) -> None:
        self.control = None
        for waiting in self._questions.values():
            waiting.callback(None)
        self._questions.clear()

    def ask(self, number: int, what: str, reactor: Any) -> Deferred[object]:
        """This worker's C{metrics} or C{state} (C{None} if it cannot say within L{ANSWER_TIMEOUT})."""
        if self.control is None:
            return succeed(None)
        waiting: Deferred[object] = Deferred()
        self._questions[number] = waiting
        self.control.send({"ask": number, "what": what})
        waiting.addTimeout(ANSWER_TIMEOUT, reactor, onTimeoutCancel=lambda *_: None)
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
        self.current: dict[int, _Worker] = {}
        self._previous: list[int] = []
        self._allListen = False
        self._abandoned = False
        self._late: IDelayedCall | None = None
        self._orphans: dict[int, Deferred[None]] = {}  # retiring workers of the previous generation: reaped
        self._youngDeaths: dict[int, int] = {}
        self._stopping = False
        self._questions = count()
        self._registrations: dict[tuple[str, str], dict[str, object]] = {}
        self._verdicts: dict[tuple[str, str], dict[str, object]] = {}  # worker 0's health checks', by upstream
        self._metrics: Listener | None = None
        upgrade = self._environ.pop(UPGRADE_VARIABLE, None)
        self._upgrade: dict[str, Any] | None = json.loads(upgrade) if upgrade is not None else None
        for registration in self._upgrade["registrations"] if self._upgrade is not None else []:
            self._registrations[(str(registration["service"]), str(registration["url"]))] = registration
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
                self._sockets[_key(option, description)] = (descriptor, _familyOf(descriptor))
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

    def _spawn(self, index: int) -> _Worker:
        worker = _Worker(index, self._generation, self, self._reactor.seconds())
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
        state = {"index": index, "generation": self._generation, "sockets": passed, "control": control}
        environ = {k: v for k, v in self._environ.items() if k not in _PRIVATE}
        environ[WORKER_VARIABLE] = json.dumps(state)
        argv = [sys.executable, "-m", "twisted", *twistOptions(sys.argv), "rproxy", *self._arguments]
        try:
            transport = self._reactor.spawnProcess(worker, argv[0], argv, env=environ, childFDs=childFDs)
        finally:
            theirs.close()
        worker.pid = transport.pid
        worker.control = _Control(worker.received, worker.lost)
        _adoptControl(self._reactor, ours.detach(), worker.control)
        self.current[index] = worker
        for registration in self._registrations.values():
            worker.control.send({"follow": registration})
        for verdict in self._verdicts.values():
            worker.control.send({"verdict": verdict})
        return worker

    def ended(self, worker: _Worker, reason: Failure) -> None:
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

    def _abandon(self, worker: _Worker, how: str) -> None:
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
            "registrations": list(self._registrations.values()),
        }
        passed = [descriptor for descriptor, _ in self._sockets.values()]
        metrics = self._metrics.port if self._metrics is not None else None
        if metrics is not None:
            descriptor = metrics.fileno()  # type: ignore[attr-defined]
            state["metrics"] = [descriptor, _familyOf(descriptor)]
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

    def announced(self, worker: _Worker, change: Mapping[str, Any]) -> None:
        """A registration changed in C{worker}: remember it for workers to come, and tell the others."""
        key = (str(change["service"]), str(change["url"]))
        if change.get("ttl") is None:
            self._registrations.pop(key, None)
        else:
            self._registrations[key] = dict(change)
        for other in self.current.values():
            if other is not worker and other.control is not None:
                other.control.send({"follow": dict(change)})

    def judged(self, worker: _Worker, verdict: Mapping[str, Any]) -> None:
        """C{worker}'s health checks reached C{verdict}: remember it for workers to come, and tell the others."""
        key = (str(verdict["service"]), str(verdict["upstream"]))
        if verdict.get("up") is None:
            self._verdicts.pop(key, None)
        else:
            self._verdicts[key] = dict(verdict)
        for other in self.current.values():
            if other is not worker and other.control is not None:
                other.control.send({"verdict": dict(verdict)})

    def _askAll(self, what: str) -> Deferred[list[tuple[_Worker, object]]]:
        """What every worker that runs answers to C{what}, in the order of their numbers."""
        workers = sorted(self.current.values(), key=lambda w: w.index)
        asked = [w.ask(next(self._questions), what, self._reactor) for w in workers]
        return gatherResults(asked).addCallback(lambda answers: list(zip(workers, answers, strict=True)))

    def allMetrics(self) -> Deferred[list[tuple[_Worker, str]]]:
        """The metrics of every worker that runs, as each writes them."""
        return self._askAll("metrics").addCallback(lambda answers: [(w, str(a or "")) for w, a in answers])

    def gather(self, asking: _Worker, number: int, what: str) -> None:
        """
        Answer C{asking}'s question C{number} with what every worker that can answers to C{what} (its admin
        C{state}, or its C{metrics}), each with its number and generation.
        """

        def answer(answers: list[tuple[_Worker, object]]) -> None:
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


def combineStates(states: list[StateDocument]) -> StateDocument:
    """
    The admin state documents of several workers as one: the first's (worker 0's), with the others' counts
    added (each upstream's exchanges in flight, connections and ejections; the tunnels); an upstream whose
    health is not the same in every worker says so in its C{reason}.  The services, upstreams and routes are
    the same in every worker (the same configuration, the registrations followed).
    """
    combined = copy.deepcopy(states[0])
    seen: dict[tuple[str, str], Counter[str]] = {}
    upstreams: dict[tuple[str, str], UpstreamState] = {}
    for kept in combined["services"]:
        for upstream in kept["upstreams"]:
            upstreams[(kept["name"], upstream["key"])] = upstream
            seen[(kept["name"], upstream["key"])] = Counter([upstream["state"]])
    for other in states[1:]:
        combined["shuttingDown"] = combined["shuttingDown"] or other["shuttingDown"]
        for name, value in other["tunnels"].items():
            combined["tunnels"][name] = combined["tunnels"].get(name, 0) + value
        for theirs in other["services"]:
            for upstream in theirs["upstreams"]:
                key = (theirs["name"], upstream["key"])
                mine = upstreams.get(key)
                if mine is None:
                    continue
                mine["inFlight"] += upstream["inFlight"]
                mine["ejections"] += upstream["ejections"]
                mine["pool"]["open"] += upstream["pool"]["open"]
                mine["pool"]["idle"] += upstream["pool"]["idle"]
                seen[key][upstream["state"]] += 1
    for key, counted in seen.items():
        if len(counted) > 1:
            upstreams[key]["reason"] = ", ".join(
                f"{state} in {n} of {len(states)} workers" for state, n in counted.items()
            )
    return combined


def twistOptions(argv: list[str]) -> list[str]:
    """
    The options of C{twist} itself in C{argv} (C{--reactor}, C{--log-format}, ...), before its C{rproxy}
    subcommand, which the workers run with too; under C{twistd -y rproxy.tac}, the text log format that
    C{twistd -n} writes.
    """
    return argv[1 : argv.index("rproxy")] if "rproxy" in argv else ["--log-format", "text"]


def listenersOf(config: ProxyConfig, adminListen: str | None) -> list[tuple[str, str]]:
    """
    The (option, endpoint) pairs a supervisor binds for its workers.

    @raise ConfigError: for an endpoint that is more than a listening socket (C{ssl:}, or a plugin's that
        wraps its connections): a worker would accept plain connections from the socket it is passed.
    """
    pairs = [("--listen", each) for each in config.listen] + [("--tls-listen", each) for each in config.tls.listen]
    if config.demoUpstream is not None:
        pairs.append(("--demo-upstream", config.demoUpstream))
    if adminListen is not None:
        pairs.append(("--admin-listen", adminListen))
    for option, description in pairs:
        if description.partition(":")[0].lower() not in _SOCKETS:
            raise ConfigError(
                f"{option} {description}: with --workers, listen on {', '.join(f'{k}:' for k in _SOCKETS)} endpoints "
                "only, whose sockets the workers share (for TLS, --tls-listen tcp:... with --tls-cert)"
            )
    return pairs
