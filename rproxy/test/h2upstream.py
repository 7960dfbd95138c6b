"""
A scripted HTTP/2 server on the C{h2} library, for tests of HTTP/2 upstreams (h2c, or TLS with ALPN h2 given
options from L{rproxy.test.certs})::

    server = H2Upstream(self, handler, maxConcurrentStreams=2)          # h2c on 127.0.0.1
    files = CertificateAuthority().writeFiles(self.mktemp())
    tlsServer = H2Upstream(self, handler, tls=serverTLS(files))         # TLS, ALPN h2
    proxy = startProxy(self, [server.url])                               # h2c://127.0.0.1:PORT

A handler is called with a L{ServerStream} once a request's head arrived; it answers with
L{ServerStream.respond}, L{ServerStream.send}, L{ServerStream.sendTrailers} or
L{ServerStream.reset}, now or later (L{ServerStream.requestDone} fires with the body once the request
ended).  Everything the server saw is recorded on the L{H2Upstream} for assertions: streams, resets the
client sent, pings, connections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.trial import unittest

from rproxy.downstream.tls import TLSServerEndpoint

Pairs = list[tuple[bytes, bytes]]


@dataclass
class ServerStream:
    """
    One request on the scripted server, and the handle to answer it.

    @ivar headers: the request's header fields, pseudo-header fields included, as received.
    @ivar body: the request body received so far.
    @ivar trailers: the request's trailer fields, if any came.
    @ivar requestDone: fires with the whole body once the request ended.
    @ivar resetCode: the error code of the client's RST_STREAM, if it sent one.
    @ivar wasReset: fires with that code.
    """

    connection: H2ServerProtocol
    streamId: int
    headers: Pairs
    body: bytes = b""
    trailers: Pairs = field(default_factory=list)
    requestDone: defer.Deferred[bytes] = field(default_factory=defer.Deferred)
    resetCode: int | None = None
    wasReset: defer.Deferred[int] = field(default_factory=defer.Deferred)
    _pending: bytes = b""
    _endAfterPending: bool = False
    _trailersAfterPending: Pairs | None = None

    def header(self, name: bytes) -> bytes | None:
        """The value of the first field C{name}."""
        return next((value for key, value in self.headers if key == name), None)

    @property
    def method(self) -> bytes:
        return self.header(b":method") or b""

    @property
    def path(self) -> bytes:
        return self.header(b":path") or b""

    def interim(self, status: int, headers: Pairs = ()) -> None:  # type: ignore[assignment]
        """Send a 1xx response."""
        self.connection.sendHeaders(self.streamId, [(b":status", b"%d" % status), *headers])

    def respond(self, status: int, headers: Pairs = (), body: bytes | None = None, trailers: Pairs = ()) -> None:  # type: ignore[assignment]
        """Send the response head, then C{body} (if not C{None}) and C{trailers}, ending the stream."""
        end = body == b"" and not trailers
        self.connection.sendHeaders(self.streamId, [(b":status", b"%d" % status), *headers], end)
        if body is not None and not end:
            self.send(body, end=not trailers)
            if trailers:
                self.sendTrailers(trailers)

    def send(self, data: bytes, end: bool = False) -> None:
        """Send body bytes as the windows allow (the rest when they open), ending the stream if C{end}."""
        self._pending += data
        self._endAfterPending = self._endAfterPending or end
        self.flush()

    def sendTrailers(self, trailers: Pairs) -> None:
        """End the stream with C{trailers}, after the pending body bytes."""
        self._trailersAfterPending = list(trailers)
        self.flush()

    def flush(self) -> None:
        """Send what the windows allow now."""
        h2 = self.connection.h2
        if self.resetCode is not None or self.streamId not in h2.streams:
            return
        try:
            while self._pending:
                window = min(h2.local_flow_control_window(self.streamId), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                h2.send_data(self.streamId, self._pending[:window])
                self._pending = self._pending[window:]
            if not self._pending:
                if self._trailersAfterPending is not None:
                    h2.send_headers(self.streamId, self._trailersAfterPending, end_stream=True)
                    self._trailersAfterPending = None
                elif self._endAfterPending:
                    h2.end_stream(self.streamId)
                    self._endAfterPending = False
        except ProtocolError:
            return
        self.connection.flush()

    def reset(self, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """Send RST_STREAM with C{code}."""
        self.connection.h2.reset_stream(self.streamId, code)
        self.connection.flush()


def echo(stream: ServerStream) -> None:
    """The default handler: answers C{METHOD PATH BODY} once the request ended (with its trailers as fields)."""

    def answer(body: bytes) -> None:
        trailers = [(b"x-request-trailer-" + name, value) for name, value in stream.trailers]
        stream.respond(
            200, [(b"content-type", b"text/plain"), *trailers], stream.method + b" " + stream.path + b" " + body
        )

    stream.requestDone.addCallback(answer)


class H2ServerProtocol(protocol.Protocol):
    """One connection of the scripted server."""

    def __init__(self, upstream: H2Upstream) -> None:
        self.upstream = upstream
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, ServerStream] = {}
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.upstream.connections.append(self)
        settings = {SettingCodes.MAX_CONCURRENT_STREAMS: self.upstream.maxConcurrentStreams}
        if self.upstream.initialWindow is not None:
            settings[SettingCodes.INITIAL_WINDOW_SIZE] = self.upstream.initialWindow
        self.h2.local_settings = Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def sendHeaders(self, streamId: int, headers: Pairs, end: bool = False) -> None:
        self.h2.send_headers(streamId, headers, end_stream=end)
        self.flush()

    def goAway(self, lastStreamId: int | None = None, code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY (C{lastStreamId}: the highest stream processed, by default the highest received)."""
        self.h2.close_connection(code, last_stream_id=lastStreamId)
        self.flush()
        # h2 closes its state machine with GOAWAY; the streams below the last id may still be answered.
        self.h2.state_machine.state = ConnectionState.SERVER_OPEN

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self.upstream.errors.append(str(e))
            self.flush()
            self.transport.loseConnection()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                stream = ServerStream(self, event.stream_id, list(event.headers))
                self.streams[event.stream_id] = stream
                self.upstream.streams.append(stream)
                self.upstream.handler(stream)
            elif isinstance(event, DataReceived):
                stream = self.streams[event.stream_id]
                stream.body += event.data
                if not self.upstream.holdRequestWindow:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, TrailersReceived):
                self.streams[event.stream_id].trailers = list(event.headers)
            elif isinstance(event, StreamEnded):
                stream = self.streams[event.stream_id]
                stream.requestDone.callback(stream.body)
            elif isinstance(event, StreamReset):
                stream = self.streams[event.stream_id]
                self.upstream.resets.append((event.stream_id, event.error_code))
                stream.resetCode = event.error_code
                stream.wasReset.callback(event.error_code)
            elif isinstance(event, WindowUpdated):
                targets = self.streams.values() if event.stream_id == 0 else [self.streams.get(event.stream_id)]
                for target in list(targets):
                    if target is not None:
                        target.flush()
            elif isinstance(event, PingReceived):
                self.upstream.pings += 1
                if not self.upstream.answerPings:
                    self.h2.clear_outbound_data_buffer()
            elif isinstance(event, ConnectionTerminated):
                self.transport.loseConnection()
        self.flush()

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


class _Factory(protocol.Factory):
    def __init__(self, upstream: H2Upstream) -> None:
        self.upstream = upstream

    def buildProtocol(self, addr: object) -> H2ServerProtocol:
        return H2ServerProtocol(self.upstream)


class H2Upstream:
    """
    A scripted HTTP/2 server on 127.0.0.1 (h2c, or TLS when C{tls} is given), torn down with the test.

    @ivar connections: every connection it accepted, in order.
    @ivar streams: every request it received, in order.
    @ivar resets: (stream id, error code) of each RST_STREAM the client sent.
    @ivar pings: PING frames received.
    @ivar errors: protocol errors it saw from the client.
    @ivar maxConcurrentStreams: what its SETTINGS announce.
    @ivar holdRequestWindow: do not acknowledge request body bytes (the client's send window closes).
    @ivar answerPings: acknowledge PINGs (h2 does it by itself; C{False} swallows the ACK).
    """

    def __init__(
        self,
        testCase: unittest.TestCase,
        handler: Callable[[ServerStream], None] = echo,
        maxConcurrentStreams: int = 100,
        tls: IOpenSSLServerConnectionCreator | None = None,
        initialWindow: int | None = None,
    ) -> None:
        self.handler = handler
        self.maxConcurrentStreams = maxConcurrentStreams
        self.initialWindow = initialWindow
        self.holdRequestWindow = False
        self.answerPings = True
        self.connections: list[H2ServerProtocol] = []
        self.streams: list[ServerStream] = []
        self.resets: list[tuple[int, int]] = []
        self.pings = 0
        self.errors: list[str] = []
        factory = _Factory(self)
        if tls is None:
            self.listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), tls)
            self.listener = testCase.successResultOf(endpoint.listen(factory))
        self.tls = tls is not None
        self.port: int = self.listener.getHost().port
        testCase.addCleanup(self.stop)

    @property
    def url(self) -> str:
        """The upstream URL of it: C{h2c://127.0.0.1:PORT}, or C{https://...} over TLS."""
        return f"{'https' if self.tls else 'h2c'}://127.0.0.1:{self.port}"

    def stop(self) -> defer.Deferred[object]:
        """Stop listening and close every connection."""
        waits: list[defer.Deferred[object]] = []
        for connection in self.connections:
            if connection.transport is not None and not connection.closed.called:
                waits.append(connection.closed)  # type: ignore[arg-type]
                connection.transport.abortConnection()
        waits.append(defer.maybeDeferred(self.listener.stopListening))
        return defer.gatherResults(waits)  # type: ignore[return-value]
