"""
The HTTP/1.1 client side of an exchange: one persistent connection to an upstream.

It writes a request head the exchange built (byte-exact target, cleaned headers), streams the request
body from a L{rproxy.downstream.body.RequestBodyPipe}, and parses the response strictly: anything that could
make the proxy and the upstream disagree about where a message ends (conflicting or malformed
Content-Length, Transfer-Encoding with Content-Length, broken chunk framing, a short body) is an error,
never a guess.  The connection is an C{IPushProducer} of response bytes, so a slow client pauses it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from zope.interface import implementer

from rproxy import deadline
from rproxy.errors import ProxyError, clientError, upstreamError
from rproxy.framing import ChunkedDecoder, MalformedBodyError, contentLength
from rproxy.headers import Pairs, hasControl, isToken
from rproxy.tunnel.sides import TransportSide
from rproxy.upstream.connection import Delivery, RequestHead, ResponseReceiver
from rproxy.upstream.settings import timeoutError

if TYPE_CHECKING:
    from rproxy.downstream.body import RequestBodyPipe
    from rproxy.upstream.pool import UpstreamPool

#: Largest response head (status line and fields) accepted from an upstream.
MAX_RESPONSE_HEAD = 65536
#: Largest trailer section accepted.
MAX_TRAILERS = 65536

#: What a reason phrase must not hold: control bytes other than HTAB.
_REASON_CONTROLS = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
#: One well-formed field line whose value has no trailing blanks; heads where every line matches take the
#: fast path.  (Heads with trailing blanks, which are rare, take the slow path: excluding them in the
#: pattern makes every match a third slower.)
_FIELD = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n\x00]*)\r\n", re.MULTILINE)

# Body framings of a response.
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)


@implementer(IPushProducer, IHalfCloseableProtocol)
class HTTP11Connection(TwistedProtocol):
    """
    A persistent HTTP/1.1 connection to one upstream, carrying one exchange at a time.

    @ivar reused: whether this connection carried an earlier exchange.
    """

    # A TCP (or TLS) transport: ITCPTransport, IConsumer and IPushProducer at once.
    transport: Any
    reused = False
    reportsUnprocessed = False
    multiplexes = False  # one exchange at a time (see rproxy.upstream.pool.Pooled)
    _receiver: ResponseReceiver | None = None
    _body: RequestBodyPipe | None = None
    _upgrade = False  # the exchange asked to switch protocols
    _switchedHeaders: Pairs = []  # the fields of the 101 that switched them
    _side: TransportSide | None = None  # after a 101: the tunnel's side this connection became
    _excess = False  # bytes followed the response head being handled

    def __init__(self, pool: UpstreamPool, reactor: IReactorTime) -> None:
        self._pool = pool
        self._closed = False
        self._paused = False
        self._deadline = deadline.Deadline(reactor, self._deadlinePassed)
        self._resetExchangeState()

    def _resetExchangeState(self) -> None:
        self._buffer = b""
        self._headSeen = False
        self._framing = _NONE
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._requestDone = False
        self._responseDone = False
        self._keepAlive = True
        self._chunkedRequest = False
        self._bodyLeft = 0  # of a request body with a declared length, the bytes still to write
        self._expectBody = True
        self._received = 0

    @property
    def isOpen(self) -> bool:
        """Whether the connection can still carry an exchange."""
        return not self._closed

    # -- the exchange's side

    def sendRequest(self, head: RequestHead, body: RequestBodyPipe | None, receiver: ResponseReceiver) -> None:
        """Write C{head}, stream C{body} (C{None}: none), and report the response to C{receiver}."""
        self._deadline.disarm()
        self._receiver = receiver
        self._expectBody = head.expectsResponseBody
        self._upgrade = bool(head.upgrade)
        self._chunkedRequest = body is not None and head.bodyLength is None
        self._bodyLeft = head.bodyLength or 0 if body is not None else 0
        self.transport.write(_serialize(head, self._chunkedRequest))
        if body is None:
            self._requestWritten()
        else:
            self._body = body
            body.attach(self)

    def writeBody(self, data: bytes) -> None:
        """Write request body bytes with the framing announced in the head."""
        if self._closed or not data:
            return  # an empty chunk would be the last-chunk marker
        if self._chunkedRequest:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        # A body longer or shorter than its Content-Length would desynchronise the connection (the upstream
        # would read the rest as another request): whatever the client side checked, never on this one.
        self._bodyLeft -= len(data)
        if self._bodyLeft < 0:
            self.failBody(clientError(400, "the request body is longer than its Content-Length"))
            return
        self.transport.write(data)

    def finishBody(self, trailers: Pairs) -> None:
        """The request body is complete: end its framing, with C{trailers} when it is chunked."""
        self._body = None
        if self._closed:
            return
        if self._chunkedRequest:
            self.transport.write(
                b"0\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in trailers) + b"\r\n"
            )
        elif self._bodyLeft:
            short = self._bodyLeft
            self.failBody(clientError(400, f"the request body ended {short} bytes short of its Content-Length"))
            return
        self._requestWritten()

    def failBody(self, error: ProxyError) -> None:
        """The client's body broke off: abort, so the upstream never sees the request complete."""
        self._body = None
        self._fail(error)
        if not self._closed:
            self.transport.abortConnection()

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        """Let the upstream socket pause the request body's source when its buffer is full."""
        if not self._closed:
            self.transport.registerProducer(producer, True)

    def unregisterBodyProducer(self) -> None:
        """The body source is finished or gone."""
        if not self._closed:
            self.transport.unregisterProducer()

    def giveBack(self) -> None:
        """Return it, unused, to the pool."""
        self._pool.release(self)

    def abort(self) -> None:
        """Drop the exchange and the connection: the client went away or its request broke."""
        self._deadline.disarm()
        self._receiver = None
        body, self._body = self._body, None
        if body is not None:
            body.detach()
        if not self._closed:
            self.transport.abortConnection()

    # -- IPushProducer for the response body: the client's consumer paces the upstream

    def pauseProducing(self) -> None:
        self._paused = True
        self._deadline.disarm()  # a slow client is not the upstream's fault
        if not self._closed:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._receiver is not None and self._headSeen and not self._responseDone:
            self._deadline.arm(deadline.READ, self._pool.settings.readTimeout)
        if not self._closed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    # -- pool life

    def recycle(self) -> None:
        """Forget the finished exchange, ready for the next one."""
        self._receiver = None
        self.reused = True
        self._resetExchangeState()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def whenReady(self) -> Deferred[HTTP11Connection]:
        """It can carry an exchange at once (see L{rproxy.upstream.pool.Opening})."""
        return succeed(self)

    def idle(self, timeout: float) -> None:
        """Wait in the pool; close after C{timeout} seconds unused."""
        self.recycle()
        self._deadline.arm(deadline.IDLE, timeout)

    def close(self) -> None:
        """Close the connection once what was written is sent."""
        if not self._closed:
            self.transport.loseConnection()

    def _deadlinePassed(self, mode: int) -> None:
        if self._closed:
            return
        if mode == deadline.IDLE:
            self.transport.loseConnection()
            return
        self._fail(timeoutError(mode, self._pool.label, self._pool.settings))
        if not self._closed:
            self.transport.abortConnection()

    def _requestWritten(self) -> None:
        self._requestDone = True
        if self._responseDone:
            self._release()
        elif not self._headSeen:
            self._deadline.arm(deadline.RESPONSE, self._pool.settings.responseTimeout)

    # -- parsing the response

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._side is not None:
            self._side.dataReceived(data)
            return
        if self._receiver is None:
            if not self._closed:  # unsolicited bytes on an idle connection: it cannot be trusted
                self.transport.abortConnection()
            return
        self._received += len(data)
        if not self._headSeen:
            data, self._buffer = self._buffer + data, b""
            rest = self._parseHead(data)
            if rest is None or self._receiver is None:
                return
            data = rest
        else:
            self._deadline.postpone(deadline.READ, self._pool.settings.readTimeout)
        if data:
            self._parseBody(data)

    def _parseHead(self, data: bytes) -> bytes | None:
        """Consume response heads (skipping 1xx); return the bytes after the final one."""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_RESPONSE_HEAD:
                    self._failProtocol(
                        f"response head larger than {MAX_RESPONSE_HEAD} bytes",
                        "http_response_header_section_size",
                    )
                else:
                    self._buffer = data
                return None
            head, data = data[:end], data[end + 4 :]
            # Bytes after a head that ends its response (no body) answer no request of ours: an upstream
            # that read a request body as another request (CL.0) sent them.  The connection is not reused.
            self._excess = bool(data)
            status = self._handleHead(head)
            if status == 101 and self._receiver is not None:
                self._switchProtocols(data)
                return None
            if status is None or status >= 200 or self._receiver is None:
                return data
            # After a 1xx interim response, the final response follows.

    def _handleHead(self, head: bytes) -> int | None:
        statusLine, _, block = head.partition(b"\r\n")
        version, _, rest = statusLine.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            self._failProtocol(f"malformed status line {statusLine[:80]!r}")
            return None
        status = int(code)
        if status < 100 or len(reason.translate(None, _REASON_CONTROLS)) != len(reason):
            self._failProtocol(f"malformed status line {statusLine[:80]!r}")
            return None
        headers = self._parseFields(block)
        if headers is None:
            return None
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    self._failProtocol("upstream switched protocols though no upgrade was requested")
                    return None
                self._switchedHeaders = headers
                return status
            receiver = self._receiver
            assert receiver is not None
            receiver.responseInterim(status, headers)
            return status
        if not self._frame(version, status, headers):
            return None
        self._headSeen = True
        hasBody = self._framing != _NONE
        if not hasBody:
            self._deadline.disarm()
        elif self._requestDone:
            self._deadline.arm(deadline.READ, self._pool.settings.readTimeout)
        receiver = self._receiver
        assert receiver is not None
        receiver.responseHead(version[5:], status, reason, headers, hasBody)
        if not hasBody and self._receiver is not None:
            if self._excess:
                self._keepAlive = False
            self._complete([])
        return status

    def _switchProtocols(self, early: bytes) -> None:
        """
        The upstream answered the upgrade request with 101: hand the transport to the receiver, with
        the bytes that followed the head.  The connection is spent: it never goes back to the pool
        (its C{connectionLost} still tells the pool when the tunnel ends).
        """
        if not self._requestDone:  # body bytes and tunnel bytes would be indistinguishable upstream
            self._failProtocol("upstream switched protocols before the request body was sent")
            return
        self._deadline.stop()
        self._responseDone = True
        receiver, self._receiver = self._receiver, None
        assert receiver is not None
        self._side = side = TransportSide(self.transport, early)
        receiver.responseSwitched(self._switchedHeaders, side)

    def _parseFields(self, block: bytes) -> Pairs | None:
        """The fields of a head's field block, in order; C{None} (after failing) when malformed."""
        if not block:
            return []
        block += b"\r\n"
        if b" \r\n" not in block and b"\t\r\n" not in block:
            fields: Pairs = _FIELD.findall(block)
            if len(fields) == block.count(b"\n"):
                return fields  # every line is a well-formed field
        fields = []
        for line in block[:-2].split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):  # obsolete line folding: join with a space (RFC 9112 5.2)
                if not fields:
                    self._failProtocol("response header section starts with a folded line")
                    return None
                name, value = fields[-1]
                fields[-1] = (name, value + b" " + line.strip(b" \t"))
                continue
            name, sep, value = line.partition(b":")
            if not sep or not isToken(name):
                self._failProtocol(f"malformed header line {line[:80]!r}")
                return None
            value = value.strip(b" \t")
            if hasControl(value):
                self._failProtocol(f"invalid character in header {name.decode('latin-1')!r}")
                return None
            fields.append((name, value))
        return fields

    def _frame(self, version: bytes, status: int, headers: Pairs) -> bool:
        """Decide how the body is delimited (RFC 9112 section 6.3), refusing ambiguity."""
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection: list[bytes] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                lengths.append(value)
            elif lowered == b"transfer-encoding":
                codings.extend([v.strip().lower() for v in value.split(b",") if v.strip()])
            elif lowered == b"connection":
                connection.extend([v.strip().lower() for v in value.split(b",")])
        if version == b"HTTP/1.0":
            self._keepAlive = b"keep-alive" in connection
        else:
            self._keepAlive = b"close" not in connection
        if not self._expectBody or status in NO_BODY_CODES:
            self._framing = _NONE
            return True
        if codings:
            if lengths:
                self._failProtocol(
                    "response has both Content-Length and Transfer-Encoding",
                    "http_response_transfer_coding",
                )
                return False
            if codings != [b"chunked"]:
                self._failProtocol(
                    f"unsupported response transfer coding {b', '.join(codings).decode('latin-1')!r}",
                    "http_response_transfer_coding",
                )
                return False
            self._framing = _CHUNKED
            self._chunks = ChunkedDecoder(self._chunkData, self._chunksEnded, MAX_TRAILERS)
            return True
        if lengths:
            try:
                self._remaining = contentLength(lengths)
            except MalformedBodyError as e:
                self._failProtocol(str(e), "http_response_content_length")
                return False
            self._framing = _LENGTH if self._remaining else _NONE
            return True
        self._framing = _CLOSE
        self._keepAlive = False
        return True

    def _parseBody(self, data: bytes) -> None:
        framing = self._framing
        receiver = self._receiver
        assert receiver is not None
        if framing == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                receiver.responseData(data)
                return
            if len(data) > remaining:
                self._keepAlive = False  # bytes beyond the response: do not trust the connection
                data = data[:remaining]
            self._remaining = 0
            if data:
                receiver.responseData(data)
            if self._receiver is not None:
                self._complete([])
        elif framing == _CHUNKED:
            assert self._chunks is not None
            try:
                self._chunks.feed(data)
            except MalformedBodyError as e:
                self._failProtocol(f"malformed chunked response body: {e}", "http_response_transfer_coding")
        elif framing == _CLOSE:
            receiver.responseData(data)
        else:
            self._keepAlive = False  # bytes after a body-less response

    def _chunkData(self, data: bytes) -> None:
        receiver = self._receiver
        if receiver is not None:
            receiver.responseData(data)

    def _chunksEnded(self, trailers: Pairs, rest: bytes) -> None:
        if rest:
            self._keepAlive = False  # bytes beyond the response: do not trust the connection
        if self._receiver is not None:
            self._complete(trailers)

    def _failProtocol(self, detail: str, errorType: str = "http_protocol_error") -> None:
        self._fail(upstreamError(502, f"upstream {self._pool.label} sent a bad response: {detail}", errorType))
        if not self._closed:
            self.transport.abortConnection()

    # -- endings

    def _complete(self, trailers: Pairs) -> None:
        self._responseDone = True
        self._deadline.disarm()
        receiver = self._receiver
        self._receiver = None
        assert receiver is not None
        receiver.responseDone(trailers)
        if self._requestDone:
            self._release()
        elif self._body is not None:
            # The upstream answered before reading the whole request body: the connection is spent.
            self._keepAlive = False
            self._body.stopProducing()
            self._release()

    def _release(self) -> None:
        if self._closed:
            return
        if self._keepAlive:
            self._pool.release(self)
        else:
            self.transport.loseConnection()

    def _fail(self, error: ProxyError, delivery: Delivery = Delivery.MAYBE) -> None:
        self._deadline.disarm()
        if self._chunks is not None:
            self._chunks.stop()
        receiver = self._receiver
        self._receiver = None
        self._responseDone = True
        body, self._body = self._body, None
        if body is not None:
            body.detach()  # the exchange decides whether it is sent again or dropped
        if receiver is not None:
            receiver.responseFailed(error, delivery)

    def readConnectionLost(self) -> None:
        """
        The upstream sent its FIN: a tunnel passes it on (a half-close); otherwise the connection is over
        (what is written goes first), as if no half-close existed.
        """
        if self._side is not None:
            self._side.readConnectionLost()
        elif not self._closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our FIN to the upstream is out (only ever sent by a tunnel)."""
        if self._side is not None:
            self._side.writeConnectionLost()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self._side is not None:
            self._side.connectionLost(reason)
        self._closed = True
        self._deadline.stop()
        if self._receiver is not None:
            if self._headSeen and self._framing == _CLOSE:
                self._complete([])
            else:
                self._fail(*self._lostError(reason))
        self._pool.connectionLost(self)

    def _lostError(self, reason: Failure) -> tuple[ProxyError, Delivery]:
        how = "reset" if reason.check(ierror.ConnectionLost) else "closed"
        label = self._pool.label
        if not self._headSeen:
            delivery = Delivery.STALE if self.reused and self._received == 0 else Delivery.MAYBE
            return (
                upstreamError(502, f"upstream {label} {how} the connection before responding", "connection_terminated"),
                delivery,
            )
        if self._framing == _LENGTH:
            detail = f"with {self._remaining} bytes of the body still due"
        else:
            detail = "in the middle of the chunked body"
        return (
            upstreamError(502, f"upstream {label} {how} the connection {detail}", "http_response_incomplete"),
            Delivery.MAYBE,
        )


def _serialize(head: RequestHead, chunked: bool) -> bytes:
    """The request line and header section of C{head}, ending with the empty line."""
    lines = [head.method + b" " + head.target + b" HTTP/1.1", b"Host: " + head.authority]
    for name, value in head.fields:
        lines.append(name + b": " + value)
    if head.upgrade:
        lines.append(b"Connection: Upgrade")
        lines.append(b"Upgrade: " + b", ".join(head.upgrade))
    if head.acceptsTrailers:
        lines.append(b"TE: trailers")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif head.bodyLength is not None:
        lines.append(b"Content-Length: %d" % head.bodyLength)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
