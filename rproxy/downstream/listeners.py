"""
Listeners: a server endpoint string (C{tcp:8080}, C{systemd:domain=INET:index=0}) served by a factory, whose
failures are one line naming the option and the value.

What operators get wrong at start surfaces in three places, each with Twisted's own words, which name
neither the option nor always the cause: a mistyped endpoint type (C{tpc:8080}) when the string is parsed,
a C{systemd:} endpoint whose socket systemd did not pass ("list index out of range") also when it is
parsed, and a port already in use when the listener starts.  L{checkEndpoint} catches the first when the
configuration is read (so C{--check-config} does too); L{Listener} turns the others into a L{ListenError},
which C{twist rproxy} prints alone and exits with.
"""

from __future__ import annotations

import os
import stat

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import getPlugins
from twisted.python.failure import Failure

__all__ = ["ListenError", "Listener", "checkEndpoint"]

#: The endpoint types Twisted parses itself; plugins add others (C{systemd}, C{tcp6}, ...).
_BUILT_IN = ("ssl", "tcp", "unix")


class ListenError(Exception):
    """A listener could not be made or started: its one-line message names the option and the endpoint."""


def _endpointTypes() -> list[str]:
    """Every endpoint type a server endpoint string may start with, in this installation."""
    plugins = (parser.prefix.lower() for parser in getPlugins(IStreamServerEndpointStringParser))
    return sorted({*_BUILT_IN, *plugins})


def checkEndpoint(description: str) -> str | None:
    """
    What is wrong with the server endpoint string C{description}, found without listening (nor requiring
    the socket of a C{systemd:} endpoint to be passed yet); C{None} if nothing is.
    """
    kind = description.partition(":")[0].lower()
    known = _endpointTypes()
    if kind not in known:
        return f"unknown endpoint type {kind!r} in {description!r} (known types: {', '.join(known)})"
    try:
        _parse(description)
    except IndexError:  # the systemd parser's way of saying that the socket it names was not passed
        if kind != "systemd":
            return f"not a server endpoint: {description!r}"
    except OSError as e:  # an ssl: endpoint's certificate
        return f"not a server endpoint ({e.filename or 'a file'}: {e.strerror}): {description!r}"
    except (ValueError, TypeError, KeyError) as e:
        return f"not a server endpoint ({e}): {description!r}"
    return None


def _parse(description: str) -> IStreamServerEndpoint:
    from twisted.internet import reactor  # only to describe the endpoint: it does not listen here

    return endpoints.serverFromString(reactor, description)


def _serverEndpoint(option: str, description: str) -> IStreamServerEndpoint:
    """The endpoint C{description} stands for; a L{ListenError} naming C{option} if it stands for none."""
    problem = checkEndpoint(description)
    if problem is not None:
        raise ListenError(f"{option} {description}: {problem}")
    try:
        return _parse(description)
    except IndexError:  # checked: a systemd endpoint whose socket was not passed
        if _socketWithoutName():
            raise ListenError(
                f"{option} {description}: a socket was passed (descriptor {_FIRST_PASSED}) without its name in "
                "LISTEN_FDNAMES, which Twisted requires: systemd 227 or newer sets it; systemd-socket-activate "
                "needs --fdname=NAME"
            ) from None
        raise ListenError(
            f"{option} {description}: systemd passed no socket for it: start rproxy through its .socket unit "
            "(socket activation), or listen on a tcp: endpoint instead"
        ) from None


#: The first descriptor systemd passes (C{SD_LISTEN_FDS_START}).
_FIRST_PASSED = 3


def _socketWithoutName() -> bool:
    """Whether a socket was passed as systemd passes them, but with no C{LISTEN_FDNAMES} for Twisted to take it."""
    if "LISTEN_FDNAMES" in os.environ:
        return False
    try:
        return stat.S_ISSOCK(os.fstat(_FIRST_PASSED).st_mode)
    except OSError:
        return False


class Listener(service.Service):
    """
    A factory served on a server endpoint string given to an option; a L{ListenError} naming both when the
    string is not an endpoint (at construction) or when the endpoint cannot listen (at start).  Like
    Twisted's C{StreamServerEndpointService}, it listens in C{privilegedStartService} (before C{twistd}
    drops its privileges); unlike it, a failure is one line, and raised, never only logged.

    @ivar option: the option the endpoint came from (C{--listen}), for messages.
    @ivar description: the endpoint string.
    @ivar endpoint: what it listens on (a wrapper, such as TLS, may replace it before the start).
    @ivar port: the listening port, once it listens.
    """

    port: IListeningPort | None = None

    def __init__(
        self,
        option: str,
        description: str,
        factory: IProtocolFactory,
        endpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        """
        @param endpoint: what to listen on instead of what C{description} stands for (a socket that a
            supervising process bound: L{rproxy.app.workers}).
        """
        self.option = option
        self.description = description
        self.endpoint = _serverEndpoint(option, description) if endpoint is None else endpoint
        self.factory = factory
        self._listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        """Listen now (a privileged port while the process may still bind one)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Listen, unless already listening; raise a L{ListenError} if the endpoint cannot."""
        super().startService()
        self._listen()

    def stopService(self) -> Deferred[None]:
        """Stop listening (connections already accepted are the factory's to close)."""
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        listening.cancel()  # a listen still under way (an endpoint that listens asynchronously)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening).addCallback(lambda _: None)

    def _listen(self) -> None:
        if self._listening is not None:
            return
        failures: list[Failure] = []
        listening = self._listening = self.endpoint.listen(self.factory)
        listening.addCallbacks(self._listened, failures.append)
        if failures:
            self._listening = None
            raise self._error(failures[0])

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def _error(self, failure: Failure) -> ListenError:
        """The one line for a failure to listen."""
        error = failure.value
        if isinstance(error, CannotListenError):
            reason = error.socketError
            detail = getattr(reason, "strerror", None) or str(reason)
        elif isinstance(error, OSError):
            detail = error.strerror or str(error)
        else:
            detail = str(error) or type(error).__name__
        return ListenError(f"{self.option} {self.description}: cannot listen: {detail[:1].lower()}{detail[1:]}")
