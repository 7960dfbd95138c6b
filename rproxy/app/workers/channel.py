"""
The control channel between a supervisor and each of its workers: a UNIX socketpair, one JSON object a line
(L{Control}); and what both ends agree on (the variable a worker finds its role in, how long an answer may
take, how a worker is named).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

_log = Logger()

#: The variable that makes C{twist rproxy} a worker: what its supervisor passed it (JSON).
WORKER_VARIABLE = "RPROXY_WORKER_STATE"

#: Seconds worker 0 waits for what the supervisor gathers from every worker (its metrics, its admin state).
ANSWER_TIMEOUT = 5.0

#: Seconds the supervisor waits for one worker's answer: less than L{ANSWER_TIMEOUT}, so that a worker slow to
#: answer leaves the others' answers in what worker 0 gets, rather than worker 0 giving up on all of them.
ASK_TIMEOUT = ANSWER_TIMEOUT - 1.5


class Control(LineOnlyReceiver):
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


def adoptControl(reactor: Any, descriptor: int, control: Control) -> None:
    """Run C{control} over the UNIX stream socket C{descriptor}, which is then closed (the reactor has its copy)."""
    factory = protocol.Factory.forProtocol(lambda: control)
    reactor.adoptStreamConnection(descriptor, socket.AF_UNIX, factory)
    os.close(descriptor)


@dataclass(frozen=True)
class WorkerName:
    """Which worker said something: its number, and the generation it belongs to."""

    index: int
    generation: int
