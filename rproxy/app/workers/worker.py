"""
A worker's side of C{--workers} (L{WorkerRole}): it listens on the sockets its supervisor passed, answers its
questions (metrics, admin state), tells it what others must know (registrations, health verdicts) and follows
what it is told, and drains on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Mapping
from itertools import count
from typing import TYPE_CHECKING, Any, cast

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rproxy.app.workers.channel import ANSWER_TIMEOUT, WORKER_VARIABLE, Control, WorkerName, adoptControl
from rproxy.app.workers.sockets import SharedEndpoint, SharedPort, socketKey
from rproxy.app.workers.states import combineStates
from rproxy.health.shared import Verdict

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from rproxy.app.admin import Registrations
    from rproxy.health.shared import VerdictFollower
    from rproxy.observe.status import StateDocument


_log = Logger()

#: Seconds between a worker's SIGTERM, when it stops accepting, and its drain.
SETTLE = 1.0


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
    @ivar verdicts: what applies the health verdicts worker 0 reports (L{rproxy.health.shared}) here.
    @ivar whenAlone: what is called if the channel to the supervisor closes (a worker that followed worker 0's
        health checks then runs its own).
    @ivar state: what makes this worker's admin state document (L{rproxy.app.admin.state}), if it has one.
    """

    name = "worker"

    def __init__(self, state: Mapping[str, Any], reactor: Any) -> None:
        self.index = int(state["index"])
        self.generation = int(state["generation"])
        self._sockets: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in state["sockets"].items()}
        self._controlDescriptor = int(state["control"])
        self._reactor = reactor
        # The supervisor's pid, not this process's parent when it gets here: a supervisor killed while this worker
        # was starting would otherwise leave it running for good, with init as the parent it watches.  A supervisor
        # of an older rproxy (it replaces a worker after rproxy was upgraded under it) does not say its pid.
        self._parent = int(state.get("supervisor", os.getppid()))
        self._watch: LoopingCall | None = None
        self._control: Control | None = None
        self.metrics: CollectorRegistry | None = None
        self.registrations: Registrations | None = None
        self.verdicts: VerdictFollower | None = None
        self.whenAlone: list[Callable[[], object]] = []  # called when the channel to the supervisor closes
        self.state: Callable[[], StateDocument] | None = None
        self._gathering: dict[int, Deferred[list[list[Any]]]] = {}
        self._numbers = count()
        self._ports: list[SharedPort] = []
        self._previousTerm: Any = None
        self._leaving = False

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str], reactor: Any) -> WorkerRole | None:
        """The role the supervisor gave this process in C{environ}; C{None} if it is no worker."""
        state = environ.get(WORKER_VARIABLE)
        return None if state is None else cls(json.loads(state), reactor)

    def endpoint(self, option: str, description: str) -> IStreamServerEndpoint | None:
        """The socket the supervisor passed for C{option description}; C{None} if it passed none (not ours)."""
        passed = self._sockets.get(socketKey(option, description))
        if passed is None:
            return None
        return SharedEndpoint(self._reactor, passed[0], passed[1], self._ports)

    def startService(self) -> None:
        """Open the control channel, say that this worker listens (its listeners started before), and watch."""
        super().startService()
        # SIGUSR2 is the supervisor's (a new generation); its default action would end a worker sent it too.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self._reactor.callWhenRunning(self._handleTerm)  # after the reactor's own SIGTERM handler
        self._control = Control(self._received, self._controlLost)
        adoptControl(self._reactor, self._controlDescriptor, self._control)
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
        """
        The channel to the supervisor closed: it executed itself again (a rolling restart; this worker drains
        soon, unless the new generation cannot start) or it ended.  Nothing reaches this worker from the others
        any more: what it followed, it does for itself (L{whenAlone}).
        """
        self._control = None
        for waiting in list(self._gathering.values()):
            waiting.cancel()  # its timeout's answer: nothing (this worker's own alone)
        _log.info(
            "worker {index}: no channel to the supervisor any more (it restarted, or ended); on its own from now",
            index=self.index,
        )
        alone, self.whenAlone = self.whenAlone, []
        for call in alone:
            call()

    def _checkParent(self) -> None:
        if os.getppid() != self._parent:
            _log.warn("worker {index}: its supervisor is gone; shutting down", index=self.index)
            self._parent = os.getppid()
            self._leave()
