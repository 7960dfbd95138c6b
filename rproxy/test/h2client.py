"""
A small HTTP/2 client for tests, on the h2 library over a real socket: h2c with prior knowledge, or
TLS with ALPN ``h2``.

It exposes what a test needs to see and control, frame by frame: requests with bodies streamed in
pieces and trailers, the responses' interim heads, DATA, trailers and resets, the peer's SETTINGS and
GOAWAY, and the flow-control window (acknowledge received data automatically, or never)::

    client = await H2Client.connect(proxy.port)
    stream = client.request(b"POST", b"/echo", [(b"te", b"trailers")], endStream=False)
    client.send(stream, b"part one")
    client.send(stream, b"part two", trailers=[(b"x-sum", b"2")])
    response = await client.response(stream)
    self.assertEqual(response.status, 200)
    client.close()

Everything is bounded by a timeout: a response that does not come fails the test instead of hanging.

An attacker's client (C{strict=False}) sends what h2 would refuse to send (spaces in pseudo-header
fields, absolute URLs in ``:path``, anything h2's outbound validation checks), and L{H2Client.writeRaw}
sends any bytes at all, for frames no library would build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.python.failure import Failure

Fields = list[tuple[bytes, bytes]]


@dataclass
class StreamRecord:
    """
    What arrived on one stream.

    @ivar interim: the informational (1xx) heads, in order.
    @ivar headers: the final response's fields, pseudo-fields included (C{None} until it arrives).
    @ivar data: the body, as received so far.
    @ivar trailers: the trailer fields, if the response had any.
    @ivar ended: whether the server ended the stream (END_STREAM).
    @ivar resetCode: the error code of an RST_STREAM the server sent, if it did.
    @ivar endedWithHead: whether the final HEADERS frame itself ended the stream (no DATA, no trailers).
    """

    interim: list[Fields] = field(default_factory=list)
    headers: Fields | None = None
    data: bytes = b""
    trailers: Fields | None = None
    ended: bool = False
    resetCode: int | None = None
    endedWithHead: bool = False

    @property
    def status(self) -> int | None:
        """The final status, once its head arrived."""
        return None if self.headers is None else int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> list[bytes]:
        """Every value of response field C{name} (lower case, as HTTP/2 sends it)."""
        return [value for key, value in self.headers or () if key == name]

    @property
    def finished(self) -> bool:
        """Whether the stream is over: ended or reset."""
        return self.ended or self.resetCode is not None


class _H2ClientProtocol(protocol.Protocol):
    transport: Any

    def __init__(self, client: H2Client) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.client._received(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.client._lost()


class H2Client:
    """
    One HTTP/2 connection to a server, driven by a test.

    @ivar streams: what arrived, per stream ID.
    @ivar remoteSettings: the server's settings, once its SETTINGS frame arrived.
    @ivar goAway: the server's GOAWAY (C{ConnectionTerminated}), if it sent one.
    @ivar closed: fires when the connection is closed.
    @ivar autoAcknowledge: whether received DATA is acknowledged at once (WINDOW_UPDATE); if not, the
        server's windows shrink until L{acknowledge} is called.
    """

    def __init__(
        self,
        initialWindow: int | None = None,
        autoAcknowledge: bool = True,
        strict: bool = True,
        gracefulGoAway: bool = False,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=strict,
            normalize_outbound_headers=strict,
        )
        self.conn = h2.connection.H2Connection(config)
        self.streams: dict[int, StreamRecord] = {}
        self.remoteSettings: dict[int, int] | None = None
        self.goAway: h2.events.ConnectionTerminated | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.autoAcknowledge = autoAcknowledge
        self._initialWindow = initialWindow
        self._gracefulGoAway = gracefulGoAway
        self._unframed = b""
        self._protocol: _H2ClientProtocol | None = None
        self._pending: dict[int, list[tuple[bytes, bool, Fields | None]]] = {}
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    @classmethod
    async def connect(
        cls,
        port: int,
        host: str = "127.0.0.1",
        tls: bool = False,
        initialWindow: int | None = None,
        autoAcknowledge: bool = True,
        strict: bool = True,
        gracefulGoAway: bool = False,
    ) -> H2Client:
        """
        Open a connection to C{host}:C{port}: h2c with prior knowledge, or TLS (any certificate) with
        ALPN ``h2``.  C{initialWindow} sets the streams' receive window (SETTINGS_INITIAL_WINDOW_SIZE);
        C{strict=False} sends request heads as given, unchecked and unnormalised.  C{gracefulGoAway}: a
        GOAWAY only records C{goAway}, and the streams below its last stream ID go on, as RFC 9113 section
        6.8 intends (h2 ends the whole connection, python-hyper/h2#1181).
        """
        client = cls(initialWindow, autoAcknowledge, strict, gracefulGoAway)
        if tls:
            options = ssl.CertificateOptions(acceptableProtocols=[b"h2"])
            endpoint: Any = SSL4ClientEndpoint(reactor, host, port, options)
        else:
            endpoint = TCP4ClientEndpoint(reactor, host, port)
        await endpoint.connect(protocol.Factory.forProtocol(lambda: _H2ClientProtocol(client)))
        await client.waitUntil(lambda: client.remoteSettings is not None or client.closed.called)
        return client

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """The ALPN protocol of a TLS connection (C{None} on h2c)."""
        assert self._protocol is not None
        return getattr(self._protocol.transport, "negotiatedProtocol", None)

    # -- sending

    def request(
        self,
        method: bytes,
        path: bytes,
        fields: Sequence[tuple[bytes, bytes]] = (),
        endStream: bool = True,
        authority: bytes | None = b"127.0.0.1",
    ) -> int:
        """Open a stream with a request head (C{authority}, if any, as ``:authority``); return its ID."""
        head = [(b":method", method), (b":path", path), (b":scheme", b"http")]
        if authority is not None:
            head.append((b":authority", authority))
        return self.requestHead(head + list(fields), endStream)

    def requestHead(self, fields: Sequence[tuple[bytes, bytes]], endStream: bool = True) -> int:
        """Open a stream with exactly C{fields} as its header block; return its ID."""
        streamID = self.conn.get_next_available_stream_id()
        self.streams[streamID] = StreamRecord()
        self.conn.send_headers(streamID, list(fields), end_stream=endStream)
        self._flush()
        return streamID

    def writeRaw(self, data: bytes) -> None:
        """Write C{data} to the connection as it is (after anything h2 has queued)."""
        self._flush()
        assert self._protocol is not None
        self._protocol.transport.write(data)

    def stopReading(self) -> None:
        """Read nothing more from the socket (a client that does not read what it asked for)."""
        assert self._protocol is not None
        self._protocol.transport.pauseProducing()

    def transportHandle(self) -> Any:
        """The connection's socket (to set its options)."""
        assert self._protocol is not None
        return self._protocol.transport.getHandle()

    def resumeReading(self) -> None:
        """Read again, after L{stopReading}."""
        assert self._protocol is not None
        self._protocol.transport.resumeProducing()

    def send(self, streamID: int, data: bytes, endStream: bool = False, trailers: Fields | None = None) -> None:
        """
        Send body bytes on C{streamID} as the server's windows allow (the rest waits for its
        WINDOW_UPDATE), then end the stream, with C{trailers} (a HEADERS frame) if given.
        """
        self._pending.setdefault(streamID, []).append((data, endStream or trailers is not None, trailers))
        self._sendPending(streamID)

    def reset(self, streamID: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Send RST_STREAM."""
        self._pending.pop(streamID, None)
        self.conn.reset_stream(streamID, code)
        self._flush()

    def acknowledge(self, streamID: int, size: int) -> None:
        """Open the server's windows for C{size} received bytes (WINDOW_UPDATE)."""
        self.conn.acknowledge_received_data(size, streamID)
        self._flush()

    def close(self) -> None:
        """Send GOAWAY and close the connection."""
        if self._protocol is not None and self._protocol.transport.connected:
            self.conn.close_connection()
            self._flush()
            self._protocol.transport.loseConnection()

    # -- waiting

    def waitUntil(self, predicate: Callable[[], bool], timeout: float = 10.0) -> defer.Deferred[None]:
        """Fire once C{predicate} holds (checked after each read); fail after C{timeout} seconds."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if predicate():
            waiter.callback(None)
            return waiter
        self._waiters.append((predicate, waiter))

        def timedOut() -> None:
            if not waiter.called:
                self._waiters.remove((predicate, waiter))
                waiter.errback(defer.TimeoutError(f"HTTP/2 client: condition not met within {timeout}s"))

        call = reactor.callLater(timeout, timedOut)
        waiter.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return waiter

    async def response(self, streamID: int, timeout: float = 10.0) -> StreamRecord:
        """The stream's record once it is over (ended or reset)."""
        record = self.streams[streamID]
        await self.waitUntil(lambda: record.finished or self.closed.called, timeout)
        return record

    # -- the protocol's side

    def _connected(self, proto: _H2ClientProtocol) -> None:
        self._protocol = proto
        self.conn.initiate_connection()
        if self._initialWindow is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._initialWindow})
        self._flush()

    def _received(self, data: bytes) -> None:
        if self._gracefulGoAway:
            data = self._withoutGoAway(data)
        for event in self.conn.receive_data(data):
            self._handle(event)
        self._flush()
        for predicate, waiter in list(self._waiters):
            if predicate():
                self._waiters.remove((predicate, waiter))
                waiter.callback(None)

    def _handle(self, event: h2.events.Event) -> None:
        record = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.RemoteSettingsChanged):
            settings = {code: change.new_value for code, change in event.changed_settings.items()}
            self.remoteSettings = {**(self.remoteSettings or {}), **settings}
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goAway = event
        elif isinstance(event, h2.events.WindowUpdated):
            for streamID in list(self._pending) if event.stream_id == 0 else [event.stream_id]:
                self._sendPending(streamID)
        elif record is None:
            return
        elif isinstance(event, h2.events.InformationalResponseReceived):
            record.interim.append(list(event.headers))
        elif isinstance(event, h2.events.ResponseReceived):
            record.headers = list(event.headers)
            record.endedWithHead = event.stream_ended is not None
        elif isinstance(event, h2.events.DataReceived):
            record.data += event.data
            if self.autoAcknowledge and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            record.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            record.ended = True
        elif isinstance(event, h2.events.StreamReset):
            record.resetCode = event.error_code
            self._pending.pop(event.stream_id, None)

    def _withoutGoAway(self, data: bytes) -> bytes:
        """The complete frames of what arrived, but GOAWAY frames, which are recorded in C{goAway}."""
        buffered = self._unframed + data
        kept = []
        while len(buffered) >= 9:
            end = 9 + int.from_bytes(buffered[:3], "big")
            if len(buffered) < end:
                break
            frame, buffered = buffered[:end], buffered[end:]
            if frame[3] == 7:  # GOAWAY
                event = h2.events.ConnectionTerminated()
                event.last_stream_id = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
                event.error_code = h2.errors.ErrorCodes(int.from_bytes(frame[13:17], "big"))
                self.goAway = event
            else:
                kept.append(frame)
        self._unframed = buffered
        return b"".join(kept)

    def _sendPending(self, streamID: int) -> None:
        queue = self._pending.get(streamID)
        while queue:
            data, end, trailers = queue[0]
            window = min(self.conn.local_flow_control_window(streamID), self.conn.max_outbound_frame_size)
            if len(data) > window:
                if window <= 0:
                    break  # until the server's WINDOW_UPDATE
                self.conn.send_data(streamID, data[:window])
                queue[0] = (data[window:], end, trailers)
                continue
            queue.pop(0)
            if trailers is not None:
                if data:
                    self.conn.send_data(streamID, data)
                self.conn.send_headers(streamID, trailers, end_stream=True)
            else:
                self.conn.send_data(streamID, data, end_stream=end)
        if not queue:
            self._pending.pop(streamID, None)
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._protocol is not None and self._protocol.transport.connected:
            self._protocol.transport.write(data)

    def _lost(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)
        for predicate, waiter in list(self._waiters):
            if predicate():
                self._waiters.remove((predicate, waiter))
                waiter.callback(None)
