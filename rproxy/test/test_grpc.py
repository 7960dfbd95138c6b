"""
gRPC end to end through rproxy, with grpcio on both sides: a grpcio server behind the proxy and a
grpcio client in front, over h2c with prior knowledge on both sides, and over TLS with ALPN on both
sides (certificates from a CA made at test time).

The service uses generic handlers over raw bytes, so no stubs are generated.  grpcio's client calls
block, so each runs in a thread while the reactor (and the proxy in it) keeps running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from twisted.internet import threads
from twisted.trial import unittest

from rproxy.downstream.tls import ALPN_PROTOCOLS
from rproxy.test.certs import CertificateAuthority, listenTLS, serverTLS
from rproxy.test.support import freePort, startProxy

SERVICE = "rproxy.test.Echo"
#: Room for the 4 MB message test on both sides (grpcio's default limit is 4 MiB).
MAX_MESSAGE = 8 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]

T = TypeVar("T")


class EchoServicer:
    """The upstream's handlers, and what they saw (for the cancel and deadline tests)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.streamStarted = threading.Event()
        self.timeRemaining: float | None = None

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: fail")
        if request == b"slow":
            self.timeRemaining = context.time_remaining()
            time.sleep(3)
        return b"echo:" + request

    def serverStream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count = int(request)
        if count < 0:  # a few messages, then an error: the status can only travel in trailers
            yield b"first"
            yield b"second"
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "stream refused after two messages")
        if count == 0:  # until cancelled
            context.add_callback(self.cancelled.set)
            self.streamStarted.set()
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                yield b"tick"
                time.sleep(0.05)
            return
        for i in range(count):
            yield b"%d" % i

    def clientStream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        count = 0
        for message in requests:
            total += len(message)
            count += 1
        return b"%d messages, %d bytes" % (count, total)

    def bidiStream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield message.upper()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.serverStream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.clientStream),
                "BidiStream": grpc.stream_stream_rpc_method_handler(self.bidiStream),
            },
        )


def startGrpcServer(
    testCase: unittest.TestCase, servicer: EchoServicer, credentials: grpc.ServerCredentials | None = None
) -> int:
    """A grpcio server on 127.0.0.1 (plaintext HTTP/2, or TLS with C{credentials}) until the test ends; its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_OPTIONS)
    server.add_generic_rpc_handlers((servicer.handler(),))
    address = f"127.0.0.1:{freePort()}"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    server.start()
    testCase.addCleanup(lambda: server.stop(grace=None).wait(5))
    return port


def inThread(function: Callable[[], T]) -> Any:
    """Run a blocking grpcio call in a thread; a Deferred of its result."""
    return threads.deferToThread(function)


def failureOf(function: Callable[[], object]) -> Any:
    """Run a grpcio call that must fail in a thread; a Deferred of its C{grpc.RpcError}."""

    def call() -> grpc.RpcError:
        try:
            function()
        except grpc.RpcError as e:
            return e
        raise AssertionError("the call did not fail")

    return inThread(call)


class GrpcThroughProxyTests(unittest.TestCase):
    """A grpcio client talks to a grpcio server through rproxy, h2c on both sides."""

    def setUp(self) -> None:
        self.servicer = EchoServicer()
        self.channel = self.connect()
        self.addCleanup(self.channel.close)

    def connect(self) -> grpc.Channel:
        """Start the grpcio server and rproxy in front of it; a channel to rproxy."""
        upstreamPort = startGrpcServer(self, self.servicer)
        proxy = startProxy(self, [f"h2c://127.0.0.1:{upstreamPort}"])
        return grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=_OPTIONS)

    def method(self, kind: str, name: str) -> Any:
        return getattr(self.channel, kind)(f"/{SERVICE}/{name}")

    async def test_unary(self) -> None:
        """A unary call and its answer."""
        call = self.method("unary_unary", "Unary")
        self.assertEqual(await inThread(lambda: call(b"hello", timeout=10)), b"echo:hello")

    async def test_serverStreaming(self) -> None:
        """10,000 messages from the server arrive, all and in order."""
        call = self.method("unary_stream", "ServerStream")
        messages = await inThread(lambda: list(call(b"10000", timeout=60)))
        self.assertEqual(len(messages), 10000)
        self.assertEqual(messages[:3], [b"0", b"1", b"2"])
        self.assertEqual(messages[-1], b"9999")

    async def test_clientStreaming(self) -> None:
        """Messages streamed by the client all reach the server."""
        call = self.method("stream_unary", "ClientStream")
        answer = await inThread(lambda: call(iter([b"x" * 1000] * 500), timeout=30))
        self.assertEqual(answer, b"500 messages, 500000 bytes")

    async def test_bidirectionalStreaming(self) -> None:
        """Each message the client sends is answered while the stream stays open."""
        call = self.method("stream_stream", "BidiStream")
        words = [b"alpha", b"beta", b"gamma"] * 50
        answers = await inThread(lambda: list(call(iter(words), timeout=30)))
        self.assertEqual(answers, [w.upper() for w in words])

    async def test_largeMessage(self) -> None:
        """A 4 MB message goes both ways whole."""
        call = self.method("unary_unary", "Unary")
        payload = bytes(range(256)) * (4 * 1024 * 1024 // 256)
        answer = await inThread(lambda: call(payload, timeout=60))
        self.assertEqual(answer, b"echo:" + payload)

    async def test_errorStatusInTrailers(self) -> None:
        """A status sent after messages (so in trailers) reaches the client with its message."""
        call = self.method("unary_stream", "ServerStream")
        received: list[bytes] = []
        error = await failureOf(lambda: received.extend(call(b"-1", timeout=10)))
        self.assertEqual(received, [b"first", b"second"])
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(error.details(), "stream refused after two messages")

    async def test_errorStatusTrailersOnly(self) -> None:
        """An immediate error (a trailers-only response) reaches the client with its message."""
        call = self.method("unary_unary", "Unary")
        error = await failureOf(lambda: call(b"fail", timeout=10))
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(error.details(), "no such thing: fail")

    async def test_deadlineExceeded(self) -> None:
        """The client's deadline reaches the server (grpc-timeout) and expires as DEADLINE_EXCEEDED."""
        call = self.method("unary_unary", "Unary")
        error = await failureOf(lambda: call(b"slow", timeout=0.5))
        self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        remaining = self.servicer.timeRemaining
        self.assertIsNotNone(remaining)
        self.assertLess(remaining, 0.6)

    async def test_cancelReachesServer(self) -> None:
        """A client that cancels a stream makes the server's call end (the proxy resets its stream)."""
        call = self.method("unary_stream", "ServerStream")
        responses = call(b"0", timeout=30)

        def firstThenCancel() -> bytes:
            first = next(responses)
            responses.cancel()
            return first

        self.assertEqual(await inThread(firstThenCancel), b"tick")
        cancelled = await inThread(lambda: self.servicer.cancelled.wait(3))
        self.assertTrue(cancelled, "the server's call was not cancelled within 3 s")


class GrpcOverTLSTests(GrpcThroughProxyTests):
    """
    The same calls over TLS on both sides: the client reaches rproxy's TLS listener (h2 by ALPN), and
    rproxy reaches the grpcio server at an C{https://} upstream, verified against the test CA.
    """

    def connect(self) -> grpc.Channel:
        authority = CertificateAuthority()
        files = authority.writeFiles(self.mktemp())
        with open(files.serverCertificate, "rb") as f:
            certificate = f.read()
        with open(files.serverKey, "rb") as f:
            key = f.read()
        upstreamPort = startGrpcServer(self, self.servicer, grpc.ssl_server_credentials([(key, certificate)]))
        proxy = startProxy(self, [f"https://localhost:{upstreamPort}"], "--upstream-ca", files.ca)
        port = listenTLS(self, proxy.site, serverTLS(files, ALPN_PROTOCOLS))
        credentials = grpc.ssl_channel_credentials(root_certificates=authority.pem)
        return grpc.secure_channel(f"localhost:{port}", credentials, options=_OPTIONS)
