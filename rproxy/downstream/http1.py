"""
The HTTP/1.1 server protocol of a client connection: rproxy's own parser, strict about everything two
parsers could read differently, answering bad input with a precise error.

A request head is read whole (in one pass when it arrives in one piece, as it usually does), checked, and
handed to twisted.web's public request API: a L{ProxyRequest} with its method, target, version and fields,
then C{gotLength} (which routes it before its body arrives), the body piece by piece, and
C{requestReceived}.  What is refused, and how:

 - a request line that is not C{METHOD SP TARGET SP HTTP/1.x}, a method that is not a token, a target
   holding a control character or DEL: 400; longer than C{maxRequestLine}: 414;
 - a field name that is not a token (whitespace before the colon), a value with NUL, CR or LF, a bare LF
   anywhere in the head: 400; more fields than C{maxHeaders}, or a head larger than C{maxHeaderBytes}: 431;
   an obsolete folded line is joined with a space (RFC 9112 section 5.2);
 - the framing rules of L{rproxy.framing}: Content-Length with Transfer-Encoding, differing or
   malformed lengths, lengths past 63 bits, a coding other than exactly ``chunked``, ``chunked`` on
   HTTP/1.0, broken chunked framing: 400;
 - ``Host`` (RFC 9112 section 3.2): none on HTTP/1.1, more than one, or not C{host[:port]}: 400; an
   absolute-form target's authority replaces it (and is checked the same way);
 - a head still incomplete C{headerTimeout} seconds after its first byte: 408;
 - a client that leaves the send buffer full for C{writeTimeout} seconds (it does not read the response,
   or the end of one the connection closes after): the connection is aborted (L{_WriteWatch}).

Each error is logged, answered with C{Connection: close}, and the connection closed: nothing the client
sent after the error is read.  A request body streams to the request as it arrives (the request's body
pipe pauses the connection through L{bodySource}); requests pipelined behind the one in flight wait, and
reading pauses once 64 KiB of them are held.  Keep-alive: HTTP/1.1 unless ``Connection: close``; never for
HTTP/1.0.  The idle timeout runs between requests and while a body arrives, not while a response is made.

It is the L{RequestChannel} of each request it carries (one at a time), and what twisted.web's request
writes its response to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy import deadline
from rproxy.downstream.validation import authorityProblem, methodProblem, targetProblem
from rproxy.errors import ProxyError, clientError
from rproxy.framing import ChunkedDecoder, MalformedBodyError, contentLength
from rproxy.headers import Pairs, allowedTrailers, connectionListed, hasControl, isToken, serializeHead

if TYPE_CHECKING:
    from rproxy.downstream.connection import ClientConnection
    from rproxy.downstream.request import ProxyRequest
    from rproxy.tunnel.sides import TunnelSide

_log = Logger()

#: What the connection is waiting for.
_IDLE, _HEAD, _BODY, _HANDLING, _CLOSING, _SWITCHED = range(6)

#: Bytes of pipelined requests held while a response is made, before reading pauses.
PIPELINE_BUFFER = 65536

#: Reason phrases of informational statuses Twisted does not name.
_INTERIM_REASONS = {103: b"Early Hints"}

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _BadHeadError(Exception):
    """A request head is refused with C{error}."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.reason)
        self.error = error


@implementer(IPushProducer)
class HTTP11Server:
    """
    The HTTP/1.1 protocol of one client connection (see the module).

    @ivar connection: the connection it speaks on.
    @ivar site: the site whose resources answer its requests (twisted.web's request asks its channel).
    @ivar factory: the same site: twisted.web's request logs itself through its channel's factory.
    @ivar transport: the connection's transport.
    @ivar bodySource: what a request's body pipe pauses: this protocol, which pauses the transport.
    """

    extendedConnect: bytes | None = None
    _request: ProxyRequest | None = None
    _chunks: ChunkedDecoder | None = None
    _remaining = 0  # bytes of a Content-Length body still to come
    _processing = False
    _bodyPaused = False  # the request body's pipe paused reading
    _pipelinePaused = False  # too much of the next requests is held

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.site = self.factory = connection.site
        self.transport = connection.transport
        self.bodySource = self
        self._limits = limits = connection.site.limits
        # A header line may be as long as the whole head may be.
        self._maxLine = max(limits.maxRequestLine, limits.maxHeaderBytes)
        self._buffer = b""
        self._scanned = 0  # how far the buffer was searched for the end of a head
        self._state = _IDLE
        self._persistent = True
        self._version = b"HTTP/1.1"
        reactor = connection.site.reactor
        self._headDeadline = deadline.Deadline(reactor, self._headTimedOut)
        self._idleDeadline = deadline.Deadline(reactor, self._idleTimedOut)
        self._idleDeadline.arm(deadline.IDLE, limits.idleTimeout)
        self._writeDeadline = deadline.Deadline(reactor, self._writeTimedOut)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY and not self._buffer:
            self._idleDeadline.postpone(deadline.IDLE, self._limits.idleTimeout)
            self._feedBody(data)
            if self._buffer:
                self._process()
            return
        if state == _HANDLING:
            self._buffer += data
            if len(self._buffer) > PIPELINE_BUFFER and not self._pipelinePaused:
                self._pipelinePaused = True
                self.transport.pauseProducing()
            return
        if state >= _CLOSING:
            return  # after an error, or a switch: nothing more is read as HTTP
        if state == _IDLE:
            self.headStarted()
        self._buffer += data
        self._process()

    def headStarted(self) -> None:
        """
        The first bytes of a request head arrived: the whole head, request line included, must follow
        within the header timeout (408), however slowly its bytes trickle in.
        """
        if self._state == _IDLE:
            self._state = _HEAD
            self._idleDeadline.disarm()
            self._headDeadline.arm(deadline.HEAD, self._limits.headerTimeout)

    def _process(self) -> None:
        """Read what is buffered: heads and bodies, until a response is awaited or more bytes are needed."""
        if self._processing:
            return  # a response ended inside; the loop below goes on
        self._processing = True
        try:
            while self._buffer:
                state = self._state
                if state == _IDLE:
                    self.headStarted()
                elif state == _HEAD:
                    if not self._takeHead():
                        return
                elif state == _BODY:
                    data, self._buffer = self._buffer, b""
                    self._feedBody(data)
                else:
                    return
        finally:
            self._processing = False

    def _takeHead(self) -> bool:
        """Read one request head from the buffer; C{False} when more bytes are needed or it was refused."""
        buffer = self._buffer
        if buffer[:2] == b"\r\n":  # empty lines before a request line are ignored (RFC 9112 section 2.2)
            self._buffer = buffer = buffer.lstrip(b"\r\n")
            self._scanned = 0
            if not buffer:
                return False
        end = buffer.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            self._scanned = max(0, len(buffer) - 3)
            return self._partialHead(buffer)
        self._buffer = buffer[end + 4 :]
        self._scanned = 0
        try:
            head = self._parseHead(buffer[:end])
        except _BadHeadError as e:
            self._reject(e.error)
            return False
        self._startRequest(*head)
        return self._state != _CLOSING

    def _partialHead(self, buffer: bytes) -> bool:
        """A head without its end yet: refuse it already if it is too long to ever be accepted."""
        limits = self._limits
        lineEnd = buffer.find(b"\r\n")
        if lineEnd < 0:
            if len(buffer) > limits.maxRequestLine:
                self._reject(clientError(414, f"the request line exceeds {limits.maxRequestLine} bytes"))
            return False
        if lineEnd > limits.maxRequestLine:
            self._reject(clientError(414, f"the request line exceeds {limits.maxRequestLine} bytes"))
        elif len(buffer) - buffer.count(b"\r\n") * 2 > limits.maxHeaderBytes + 2:
            self._reject(clientError(431, f"the request header section exceeds {limits.maxHeaderBytes} bytes"))
        return False

    def _parseHead(self, head: bytes) -> tuple[bytes, bytes, bytes, Pairs, int | None, bool]:
        """
        The method, target, version, fields, body length (C{None}: chunked) and chunked-ness of a head.

        @raise _BadHeadError: it is malformed.
        """
        limits = self._limits
        lines = head.split(b"\r\n")
        requestLine = lines[0]
        if len(requestLine) > limits.maxRequestLine:
            raise _BadHeadError(clientError(414, f"the request line exceeds {limits.maxRequestLine} bytes"))
        if len(head) - 2 * (len(lines) - 1) > limits.maxHeaderBytes:
            raise _BadHeadError(clientError(431, f"the request header section exceeds {limits.maxHeaderBytes} bytes"))
        parts = requestLine.split(b" ")
        if len(parts) != 3:
            raise _BadHeadError(clientError(400, "malformed request line (not METHOD TARGET VERSION)"))
        method, target, version = parts
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            raise _BadHeadError(clientError(400, f"malformed request line (unsupported version {version[:20]!r})"))
        problem = methodProblem(method) or targetProblem(target)
        if problem is not None:
            raise _BadHeadError(clientError(400, f"malformed request line ({problem})"))
        self._version = version
        fields: Pairs = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):  # obsolete line folding: joined with a space
                if not fields:
                    raise _BadHeadError(clientError(400, "the header section starts with a folded line"))
                name, value = fields[-1]
                line = line.strip(b" \t")
                if hasControl(line):
                    raise _BadHeadError(clientError(400, f"invalid character in request header {name[:64]!r}"))
                fields[-1] = (name, value + b" " + line if value else line)
                continue
            name, colon, value = line.partition(b":")
            if not colon:
                raise _BadHeadError(clientError(400, "a request header line has no colon"))
            if not isToken(name):
                raise _BadHeadError(clientError(400, f"invalid request header name {name[:64]!r}"))
            value = value.strip(b" \t")
            if hasControl(value):
                raise _BadHeadError(clientError(400, f"invalid character in request header {name.decode()!r}"))
            fields.append((name, value))
            if len(fields) > limits.maxHeaders:
                raise _BadHeadError(clientError(431, f"the request has more than {limits.maxHeaders} header fields"))
        return self._checkFields(method, target, version, fields)

    def _checkFields(
        self, method: bytes, target: bytes, version: bytes, fields: Pairs
    ) -> tuple[bytes, bytes, bytes, Pairs, int | None, bool]:
        """
        The framing and routing fields of a parsed head (see the module).

        @raise _BadHeadError: they are not acceptable.
        """
        lengths: list[bytes] = []
        codings: list[bytes] = []
        hosts: list[bytes] = []
        connection: list[bytes] = []
        for name, value in fields:
            if len(name) in (4, 10, 14, 17):  # a quick look before comparing names
                lowered = name.lower()
                if lowered == b"host":
                    hosts.append(value)
                elif lowered == b"content-length":
                    lengths.append(value)
                elif lowered == b"transfer-encoding":
                    codings.append(value)
                elif lowered == b"connection":
                    connection.append(value)
        chunked = False
        length: int | None = 0
        if codings:
            if lengths:
                raise _BadHeadError(clientError(400, "both Content-Length and Transfer-Encoding"))
            if len(codings) != 1 or codings[0].lower() != b"chunked":
                coding = b", ".join(codings)[:64].decode("latin-1")
                raise _BadHeadError(clientError(400, f"unsupported Transfer-Encoding {coding!r} (only chunked)"))
            if version != b"HTTP/1.1":
                raise _BadHeadError(clientError(400, "Transfer-Encoding in an HTTP/1.0 request"))
            chunked, length = True, None
        elif lengths:
            try:
                length = contentLength(lengths)
            except MalformedBodyError as e:
                raise _BadHeadError(clientError(400, str(e))) from None
        problem = None
        if len(hosts) > 1:
            problem = "the request has more than one Host field"
        elif hosts:
            problem = authorityProblem(hosts[0])
        elif version == b"HTTP/1.1":
            problem = "an HTTP/1.1 request must have a Host field"
        if problem is not None:
            raise _BadHeadError(clientError(400, problem))
        if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS") and method != b"CONNECT":
            lowered = target[:8].lower()
            if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
                raise _BadHeadError(clientError(400, "the request target must be an absolute path or absolute URL"))
            # RFC 9112 section 3.2.2: the authority of an absolute-form target replaces Host.
            rest = target.split(b"://", 1)[1]
            slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
            authority, path = rest[:slash], rest[slash:]
            problem = authorityProblem(authority)
            if problem is not None:
                raise _BadHeadError(clientError(400, problem))
            fields = [(n, v) for n, v in fields if n.lower() != b"host"]
            fields.append((b"Host", authority))
            target = path if path.startswith(b"/") else b"/" + path
        if version != b"HTTP/1.1" or (connection and b"close" in connectionListed(connection)):
            self._persistent = False
        return method, target, version, fields, length, chunked

    def _startRequest(
        self, method: bytes, target: bytes, version: bytes, fields: Pairs, length: int | None, chunked: bool
    ) -> None:
        """Hand the request to twisted.web and route it; its body (if any) follows."""
        self._headDeadline.disarm()
        request = cast("ProxyRequest", self.site.requestFactory(self))
        self._request = request
        request.method, request.uri, request.clientproto = method, target, version
        headers = request.requestHeaders
        for name, value in fields:
            headers.addRawHeader(name, value)
        if not self._persistent and version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if chunked:
            self._chunks = ChunkedDecoder(self._chunkData, self._chunksEnded)
            self._state = _BODY
            self._idleDeadline.arm(deadline.IDLE, self._limits.idleTimeout)
        elif length:
            self._remaining = length
            self._state = _BODY
            self._idleDeadline.arm(deadline.IDLE, self._limits.idleTimeout)
        else:
            self._state = _HANDLING
        request.parseCookies()
        request.gotLength(length)
        if self._state == _HANDLING and self._request is request:
            request.requestReceived(method, target, version)

    def _feedBody(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is not None:
            try:
                chunks.feed(data)
            except MalformedBodyError as e:
                self._refuseBody(clientError(400, f"malformed chunked request body: {e}"))
            return
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            self._chunkData(data)
            return
        self._remaining = 0
        self._buffer = data[remaining:] + self._buffer
        self._chunkData(data[:remaining] if len(data) > remaining else data)
        self._bodyEnded([])

    def _chunkData(self, data: bytes) -> None:
        request = self._request
        if request is not None:
            request.handleContentChunk(data)

    def _chunksEnded(self, trailers: Pairs, rest: bytes) -> None:
        self._chunks = None
        self._buffer = rest + self._buffer
        self._bodyEnded(trailers)

    def _bodyEnded(self, trailers: Pairs) -> None:
        """The whole body is in: the request may be rendered (a local resource), or its pipe ends."""
        request = self._request
        if self._state != _BODY:
            return
        self._state = _HANDLING
        self._idleDeadline.disarm()
        self._resumeIfNeeded()
        if request is not None:
            request.requestTrailers = allowedTrailers(trailers)
            request.requestReceived(request.method, request.uri, request.clientproto)

    def _refuseBody(self, error: ProxyError) -> None:
        """The body broke: the request's pipe fails (the upstream never sees it complete), the client gets C{error}."""
        request = self._request
        self._persistent = False
        self._state = _CLOSING
        self._chunks = None
        if request is not None:
            request.refuseBody(error)
        else:
            self.transport.loseConnection()

    # -- errors and timers

    def _reject(self, error: ProxyError) -> None:
        """Answer a malformed request head with C{error} and close: nothing after it is read."""
        _log.warn(
            "client {client} -> {status} ({fault} fault, {errorType}): {reason}",
            client=self.connection.peer,
            status=error.status,
            fault=error.fault.value,
            errorType=error.errorType,
            reason=error.reason,
        )
        self.connection.site.refused(self.connection.peer, error)
        self._close(error.responseBytes())

    def _close(self, last: bytes = b"") -> None:
        self._state = _CLOSING
        self._persistent = False
        self._buffer = b""
        self._headDeadline.stop()
        self._idleDeadline.stop()
        if last:
            self.transport.write(last)
        self.transport.loseConnection()
        self.waitForReader()  # a close waits for what is written to be read: not for ever

    def waitForReader(self) -> None:
        """What is written waits for the client to read it: abort after the write timeout if it does not."""
        timeout = self._limits.writeTimeout
        if timeout and self._writeDeadline.mode != deadline.WRITE:
            self._writeDeadline.arm(deadline.WRITE, timeout)

    def _writeTimedOut(self, mode: int) -> None:
        timeout = self._limits.writeTimeout
        error = clientError(408, f"the client read nothing of the response for {timeout:g}s")
        _log.warn("client {client}: {reason}; connection aborted", client=self.connection.peer, reason=error.reason)
        request = self._request
        if request is not None:
            request.cutOff(error)
        else:
            self.site.refused(self.connection.peer, error, answered=False)
        self.abort()

    def _headTimedOut(self, mode: int) -> None:
        if self._state == _HEAD:
            timeout = self._limits.headerTimeout
            self._reject(clientError(408, f"the request head did not arrive within {timeout:g}s"))

    def _idleTimedOut(self, mode: int) -> None:
        if self._state in (_IDLE, _BODY):
            self._close()

    def drain(self) -> None:
        """Shutdown: close after the response in flight (now if there is none), keeping no connection alive."""
        self._persistent = False
        request = self._request
        if request is not None:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        elif self._state < _CLOSING:
            self._close()

    def connectionLost(self, reason: Failure) -> None:
        self._state = _CLOSING
        self._headDeadline.stop()
        self._idleDeadline.stop()
        self._writeDeadline.stop()
        request, self._request = self._request, None
        if request is not None:
            request.connectionLost(reason)

    # -- IPushProducer: what the request body's pipe pauses

    def pauseProducing(self) -> None:
        if not self._bodyPaused:
            self._bodyPaused = True
            if not self._pipelinePaused:
                self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._bodyPaused:
            self._bodyPaused = False
            if not self._pipelinePaused:
                self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The pipe's consumer is gone: what the client still sends is read and dropped."""
        self.resumeProducing()

    def _resumeIfNeeded(self) -> None:
        """The body is in: reading is paused only for pipelined requests now."""
        self._bodyPaused = False
        if not self._pipelinePaused:
            self.transport.resumeProducing()

    # -- what twisted.web's request writes its response to

    def getPeer(self) -> Any:
        return self.connection.peer

    def getHost(self) -> Any:
        return self.connection.host

    def isSecure(self) -> bool:
        return self.connection.secure

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.transport.writeSequence(data)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        fields = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
        self.transport.write(serializeHead(version + b" " + code + b" " + reason, fields))

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if streaming and self._limits.writeTimeout:
            producer = _WriteWatch(producer, self)
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._writeDeadline.disarm()
        self.transport.unregisterProducer()

    def loseConnection(self) -> None:
        self._persistent = False
        self.transport.loseConnection()

    def requestDone(self, request: ProxyRequest) -> None:
        """The response is complete: read the next request, or close."""
        if request is not self._request:
            return
        self._request = None
        if self._state == _SWITCHED:
            return
        if not self._persistent or self._state != _HANDLING:
            self._close()  # a body not read to its end, or Connection: close
            return
        self._state = _IDLE
        self._idleDeadline.arm(deadline.IDLE, self._limits.idleTimeout)
        if self._pipelinePaused:
            self._pipelinePaused = False
            if not self._bodyPaused:
                self.transport.resumeProducing()
        if self._buffer:
            self._process()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """What twisted.web's request calls when a form body does not parse."""
        request = self._request
        if request is not None:
            request.stopKeepAlive()
            request.fail(clientError(400, "malformed form body"))

    # -- RequestChannel

    @property
    def upgradable(self) -> bool:
        """An HTTP/1.1 request's connection can be switched to another protocol (not an HTTP/1.0 one's)."""
        return self._version == b"HTTP/1.1"

    def writeHead(
        self, request: Any, status: int, reason: bytes | None, fields: Sequence[tuple[bytes, bytes]], hasBody: bool
    ) -> bool:
        """
        The head as one write, with the fields as they are, framed as Twisted would frame it (chunked on
        HTTP/1.1 unless a length is given); C{False} for fields that Twisted's checks must see.
        """
        names = [name for name, _ in fields]
        if not all(names) or not isToken(b"".join(names)) or hasControl(b"".join([value for _, value in fields])):
            return False
        request.setResponseCode(status, reason)
        own = [(name, value) for name, values in request.responseHeaders.getAllRawHeaders() for value in values]
        hasLength = request.responseHeaders.hasHeader(b"content-length") or any(
            name.lower() == b"content-length" for name in names
        )
        if (
            request.clientproto == b"HTTP/1.1"
            and not hasLength
            and request.method != b"HEAD"
            and status not in NO_BODY_CODES
        ):
            fields = [*fields, (b"Transfer-Encoding", b"chunked")]
            request.chunked = 1
        request.startedWriting = 1
        self.transport.write(
            serializeHead(request.clientproto + b" %d " % status + request.code_message, [*own, *fields])
        )
        return True

    def writeInterim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None:
        reason = _INTERIM_REASONS.get(status) or RESPONSES.get(status, b"Informational")
        self.transport.write(serializeHead(b"HTTP/1.1 %d %s" % (status, reason), fields))

    def writeTrailers(self, request: Any, trailers: Sequence[tuple[bytes, bytes]]) -> bool:
        if not request.chunked:
            return False
        self.transport.write(b"0\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in trailers) + b"\r\n")
        request.chunked = 0  # Twisted's finish would end the chunked body once more
        return True

    def abort(self) -> None:
        """Reset the connection, after handing what is written to the kernel (the client sees how far it got)."""
        self._persistent = False
        self._state = _CLOSING
        transport = self.transport
        flush = getattr(transport, "doWrite", None)  # IWriteDescriptor, on a TCP connection
        if flush is not None and transport.connected:
            flush()
        transport.abortConnection()

    def stopKeepAlive(self, request: Any) -> None:
        self._persistent = False
        if not request.startedWriting and request.clientproto == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def sendContinue(self) -> None:
        if self._version == b"HTTP/1.1":
            self.transport.write(_CONTINUE)

    def switchProtocols(self, request: Any, status: int, fields: Sequence[tuple[bytes, bytes]]) -> TunnelSide:
        """Send the 101 head and hand the connection, with what the client sent after its request, to a tunnel."""
        self._state = _SWITCHED
        self._headDeadline.stop()
        self._idleDeadline.stop()
        self._writeDeadline.stop()
        self.transport.write(serializeHead(b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"")), fields))
        early, self._buffer = self._buffer, b""
        self._resumeIfNeeded()
        return self.connection.takeOver(early)


@implementer(IPushProducer)
class _WriteWatch:
    """
    A response's producer as the transport sees it: paused while the send buffer is full, which is when
    the write timeout runs (L{HTTP11Server.waitForReader}); resumed once the client read it all.
    """

    def __init__(self, producer: IPushProducer, server: HTTP11Server) -> None:
        self._producer = producer
        self._server = server

    def pauseProducing(self) -> None:
        self._server.waitForReader()
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._server._writeDeadline.disarm()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()
