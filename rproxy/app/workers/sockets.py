"""
The listening sockets a supervisor binds once and passes to its workers (L{listenersOf}), and how a worker
accepts from one it was passed (L{SharedEndpoint}, L{SharedPort}).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.app.config import ConfigError, ProxyConfig

_log = Logger()

#: The endpoint types whose listening sockets a supervisor can pass to its workers as they are.
_SOCKETS = ("tcp", "tcp6", "unix", "systemd")


def familyOf(descriptor: int) -> int:
    """The address family of the socket C{descriptor}."""
    with socket.socket(fileno=os.dup(descriptor)) as probe:
        return int(probe.family)


def socketKey(option: str, description: str) -> str:
    return f"{option} {description}"


@implementer(IListeningPort, IReadDescriptor)
class SharedPort:
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
class SharedEndpoint:
    """A listening socket passed by the supervisor, listened on as a L{SharedPort} (once)."""

    def __init__(self, reactor: Any, descriptor: int, family: int, ports: list[SharedPort]) -> None:
        """@param ports: where the port is added once it listens."""
        self._reactor = reactor
        self._descriptor = descriptor
        self._family = family
        self._ports = ports

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        port = SharedPort(self._reactor, self._descriptor, self._family, factory)
        port.startListening()
        self._ports.append(port)
        return succeed(port)


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
