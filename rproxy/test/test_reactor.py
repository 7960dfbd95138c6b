"""
Tests for L{rproxy.app.reactor}: Twisted's own reactor tests (TCP, TLS, UNIX sockets, processes, file
descriptor sets, threads, system events) run against L{FlushingEPollReactor}, plus what it does
differently.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any
from unittest import skip as skipped

from twisted.internet import protocol, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.test import test_core, test_fdset, test_process, test_tcp, test_threads, test_tls, test_unix
from twisted.internet.test.reactormixins import ReactorBuilder
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.app.reactor import FlushingEPollReactor

_REACTORS = [f"{FlushingEPollReactor.__module__}.{FlushingEPollReactor.__qualname__}"]
_EPOLL_SKIP = "like Twisted's epoll reactor, it cannot detect a file descriptor replaced under it"
_ROOT_SKIP = "fails as root with Twisted's epoll reactor too"

_builders: list[type[ReactorBuilder]] = [
    test_tcp.TCP4ClientTestsBuilder,
    test_tcp.TCP6ClientTestsBuilder,
    test_tcp.TCPPortTestsBuilder,
    test_tcp.TCPFDPortTestsBuilder,
    test_tcp.TCPConnectionTestsBuilder,
    test_tcp.TCPTransportTestsBuilder,
    test_tcp.TCP4ConnectorTestsBuilder,
    test_tcp.AdoptStreamConnectionTestsBuilder,
    test_tls.SSLClientTestsMixin,
    test_tls.StartTLSClientTestsMixin,
    test_tls.TLSPortTestsBuilder,
    test_unix.UNIXTestsBuilder,
    test_unix.UNIXPortTestsBuilder,
    test_fdset.ReactorFDSetTestsBuilder,
    test_core.SystemEventTestsBuilder,
    test_process.ProcessTestsBuilder,
    test_threads.ThreadTestsBuilder,
]
_skips = {
    "test_lostFileDescriptor": _EPOLL_SKIP,  # Twisted skips it for EPollReactor by class name
    **({"test_changeUID": _ROOT_SKIP, "test_changeGID": _ROOT_SKIP} if os.getuid() == 0 else {}),
}
for _builder in _builders:
    _attributes: dict[str, Any] = {"_reactors": _REACTORS, "__module__": __name__}
    for _name, _reason in _skips.items():
        if hasattr(_builder, _name):
            _attributes[_name] = skipped(_reason)(getattr(_builder, _name))
    globals().update(type("Flushing" + _builder.__name__, (_builder,), _attributes).makeTestCaseClasses())


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@implementer(IPushProducer)
class _CountingProducer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class FlushingTestsBuilder(ReactorBuilder):
    """What the reactor does differently from Twisted's epoll reactor."""

    _reactors = _REACTORS

    def _start(self) -> tuple[Any, socket.socket, tcp.Server, list[str]]:
        """
        A reactor, a client socket and the reactor's transport for its other end (echoing what it gets),
        and the list of registrations for writing (EPOLLOUT) made from then on.
        """
        reactor = self.buildReactor()
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        while not [s for s in reactor.getReaders() if isinstance(s, tcp.Server)]:
            reactor.iterate(0.01)
        [transport] = [s for s in reactor.getReaders() if isinstance(s, tcp.Server)]
        calls: list[str] = []
        poller = reactor._poller

        class _Poller:
            def __getattr__(self, name: str) -> Any:
                return getattr(poller, name)

            def modify(self, fd: int, flags: int) -> None:
                calls.append("modify")
                poller.modify(fd, flags)

        reactor._poller = _Poller()
        return reactor, client, transport, calls

    def _receive(self, reactor: Any, client: socket.socket, size: int) -> bytes:
        """Run C{reactor} until C{client} has received C{size} bytes."""
        client.setblocking(False)
        received = bytearray()
        for _ in range(10000):
            if len(received) >= size:
                break
            reactor.iterate(0.001)
            try:
                received += client.recv(1 << 20)
            except BlockingIOError:
                pass
        return bytes(received)

    def test_writeSentInSameTurn(self) -> None:
        """What a turn writes is sent by the end of that turn, without a registration for writing."""
        reactor, client, transport, calls = self._start()
        client.sendall(b"hello")
        self.assertEqual(self._receive(reactor, client, 5), b"hello")
        self.assertEqual(calls, [])
        self.assertEqual(reactor.getWriters(), [])

    def test_leftoverWaitsForWritable(self) -> None:
        """What the kernel does not take is sent when the socket becomes writable, as Twisted does."""
        reactor, client, transport, calls = self._start()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = b"x" * (1024 * 1024)
        transport.write(payload)
        reactor.iterate(0)
        self.assertIn(transport, reactor.getWriters())
        self.assertIn("modify", calls)
        self.assertEqual(self._receive(reactor, client, len(payload)), payload)
        self.assertEqual(reactor.getWriters(), [])

    def test_pausedProducerResumed(self) -> None:
        """A streaming producer paused by a full buffer is resumed once a flush has sent everything."""
        reactor, client, transport, calls = self._start()
        producer = _CountingProducer()
        transport.registerProducer(producer, True)
        transport.bufferSize = 4
        transport.write(b"more than four")
        self.assertEqual(producer.calls, ["pause"])
        self.assertEqual(self._receive(reactor, client, 14), b"more than four")
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_closeAfterFlush(self) -> None:
        """A connection closed right after a write sends what it wrote, then closes, as Twisted does."""
        reactor, client, transport, calls = self._start()
        transport.write(b"last words")
        transport.loseConnection()
        self.assertEqual(self._receive(reactor, client, 10), b"last words")
        for _ in range(100):
            if transport.disconnected:
                break
            reactor.iterate(0.01)
        self.assertTrue(transport.disconnected)

    def test_removeAllIncludesPendingWriters(self) -> None:
        """A writer whose bytes are still to be flushed is disconnected at shutdown like the others."""
        reactor, client, transport, calls = self._start()
        transport.stopReading()
        transport.write(b"pending")
        self.assertEqual(reactor.getWriters(), [transport])
        self.assertIn(transport, reactor.removeAll())
        self.assertEqual(reactor.getWriters(), [])


globals().update(FlushingTestsBuilder.makeTestCaseClasses())


class InstallTests(unittest.TestCase):
    """Which reactor C{twist rproxy} runs on."""

    def _reactorOf(self, *arguments: str) -> str:
        code = (
            "import sys\n"
            "from twisted.application.twist._options import TwistOptions\n"
            "options = TwistOptions()\n"
            "options.parseOptions(sys.argv[1:])\n"
            "print(type(options['reactor']).__name__)\n"
        )
        return subprocess.run(
            [sys.executable, "-c", code, *arguments], check=True, capture_output=True, text=True, timeout=60
        ).stdout.strip()

    def test_defaultForRproxy(self) -> None:
        """C{twist rproxy} runs on rproxy's reactor."""
        self.assertEqual(self._reactorOf("rproxy", "--upstream", "http://127.0.0.1:9"), "FlushingEPollReactor")

    def test_chosenReactorKept(self) -> None:
        """A reactor chosen before the subcommand is kept."""
        self.assertEqual(
            self._reactorOf("--reactor", "epoll", "rproxy", "--upstream", "http://127.0.0.1:9"), EPollReactor.__name__
        )

    def test_byName(self) -> None:
        """The rproxy plugin names the reactor C{rproxy}."""
        self.assertEqual(
            self._reactorOf("--reactor", "rproxy", "rproxy", "--upstream", "http://127.0.0.1:9"),
            "FlushingEPollReactor",
        )

    def test_tac(self) -> None:
        """rproxy.tac (twistd -y without -r) installs rproxy's reactor before anything imports one."""
        tac = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rproxy.tac")
        code = (
            "import sys\n"
            "exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'), {'__name__': 'rproxy_tac'})\n"
            "from twisted.internet import reactor\n"
            "print(type(reactor).__name__)\n"
        )
        environment = {**os.environ, "RPROXY_UPSTREAM": "http://127.0.0.1:9", "RPROXY_LISTEN": "tcp:0"}
        result = subprocess.run(
            [sys.executable, "-c", code, tac], check=True, capture_output=True, text=True, timeout=60, env=environment
        )
        self.assertEqual(result.stdout.strip(), "FlushingEPollReactor")
