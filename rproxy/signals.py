"""
L{OnSignal}: a service that acts on a POSIX signal while it runs, from the reactor's thread.

A signal handler runs between two bytecodes of whatever the process was doing, possibly amid an event of
the reactor; what the signal asks for (reload the configuration, reopen the log files) must run between
two events instead.  So the handler only hands the work to the reactor (C{callFromThread}, which is safe
from a handler), and the service gives the signal its previous handler back when it stops.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads

__all__ = ["OnSignal"]


class OnSignal(service.Service, ABC):
    """
    While it runs, signal C{signalNumber} calls L{received} from the reactor's thread; subclasses say what
    it does.
    """

    def __init__(self, signalNumber: int, reactor: IReactorFromThreads) -> None:
        """
        @param signalNumber: the signal (C{signal.SIGHUP}, ...).
        @param reactor: the reactor to hand the signal over to, from the signal handler.
        """
        self.signalNumber = signalNumber
        self._reactor = reactor
        self._previousHandler: Any = None

    def startService(self) -> None:
        """Handle the signal."""
        super().startService()
        self._previousHandler = signal.signal(self.signalNumber, self._handle)

    def stopService(self) -> None:
        """Give the signal its previous handler back."""
        if not self.running:
            return
        super().stopService()
        previous, self._previousHandler = self._previousHandler, None
        signal.signal(self.signalNumber, signal.SIG_DFL if previous is None else previous)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.received)

    @abstractmethod
    def received(self) -> None:
        """The signal came: act on it (on the reactor's thread, between two of its events)."""
