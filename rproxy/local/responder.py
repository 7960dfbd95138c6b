"""
L{Responder}: what a local answer (L{rproxy.interfaces.ILocalAnswer}) writes its response to.

It stands between the answer and the exchange's client: the head goes through the response filters of the
route's chain (those that may see it), then to the client with the request's id; the body goes through the
transform a filter asked for (compression); a producer registered for the body is paused while the client
cannot take more.  Whatever ends the answer (its end, an error, a failure of its own) is reported once to the
exchange, which records and closes the exchange as for a proxied response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.logger import Logger

from rproxy.errors import ProxyError, proxyError
from rproxy.proxy.message import LocalResponse

if TYPE_CHECKING:
    from rproxy.downstream.contract import Downstream, Producer
    from rproxy.filters.chain import ChainRun
    from rproxy.interfaces import IBodyTransform, ILocalAnswer
    from rproxy.proxy.message import RequestContext

_log = Logger()


class Responder:
    """
    One local answer's way to its client.

    @ivar method: the request's method (the response to C{HEAD} has no body, whatever its fields say).
    @ivar started: whether the response head has gone to the client.
    @ivar done: whether the answer has ended (finished, failed, or the client went away).
    """

    started = False
    done = False
    _bodiless = False
    _transform: IBodyTransform | None = None
    _producer: Producer | None = None

    def __init__(
        self,
        downstream: Downstream,
        run: ChainRun | None,
        requestId: bytes | None,
        ended: Callable[[ProxyError | None], None],
    ) -> None:
        """
        @param run: the exchange's way through its route's filters (C{None}: no filters).
        @param requestId: the request's id, sent back as ``X-Request-ID``.
        @param ended: told once how the answer ended: C{None} once its response is complete (the exchange
            finishes the client's response), or the error to answer with (an abort once the head is out).
        """
        self.method = downstream.method
        self._downstream = downstream
        self._run = run
        self._requestId = requestId
        self._ended = ended

    def serve(self, answer: ILocalAnswer, context: RequestContext) -> None:
        """Let C{answer} answer C{context}'s request; a failure of its own is the proxy's 500, logged."""
        context.whenEnded(self._gone)
        try:
            answer.serve(context, self)
        except ProxyError as e:
            self.fail(e)
        except Exception:
            _log.failure("the local answer {answer!r} failed", answer=answer)
            self.fail(proxyError(500, "the local answer failed", "proxy_internal_error"))

    def sendContinue(self) -> None:
        """
        Tell a client that waits (``Expect: 100-continue``) to send its body: for an answer that reads it.
        Nothing is sent when the client did not ask, or its protocol has no ``100 Continue``.
        """
        if not self.started:
            self._downstream.continueBody()

    def sendHead(self, status: int, fields: Sequence[tuple[bytes, bytes]], hasBody: bool = True) -> None:
        """
        Send the response head: C{status} and C{fields} (end-to-end fields, and C{Content-Length} when the
        length is known), as the response filters leave them; C{hasBody} false when no body follows (a HEAD,
        a 304), L{finish} then following.
        """
        if self.done:
            return
        pairs = list(fields)
        if self._run is not None:
            try:
                self._transform = self._run.response(status, pairs)
            except Exception:
                _log.failure("a response filter failed on a local answer")
                self.fail(proxyError(500, "a response filter failed on a local answer", "proxy_internal_error"))
                return
        hasBody = hasBody and self.method != b"HEAD"
        if not hasBody:
            self._transform, self._bodiless = None, True
        if self._requestId is not None:
            pairs.append((b"X-Request-ID", self._requestId))
        self.started = True
        self._downstream.sendHead(status, None, pairs, hasBody)

    def write(self, data: bytes) -> None:
        """Send body bytes (none after a head without a body: the response to a HEAD)."""
        if self.done or self._bodiless:
            return
        if self._transform is not None:
            data = self._transform.transform(data)
            if not data:
                return
        self._downstream.write(data)

    def registerProducer(self, producer: Producer) -> None:
        """
        Pause C{producer} (an C{IPushProducer}) while the client cannot take more of the body; it is stopped
        if the exchange ends before it is unregistered (the client went away).
        """
        self._producer = producer
        self._downstream.registerProducer(producer, True)

    def unregisterProducer(self) -> None:
        """The body's producer is done."""
        self._producer = None
        self._downstream.unregisterProducer()

    def finish(self) -> None:
        """The response is complete."""
        if self.done:
            return
        if self._transform is not None:
            tail = self._transform.finish()
            if tail:
                self._downstream.write(tail)
        self.done = True
        self._ended(None)

    def fail(self, error: ProxyError) -> None:
        """Answer with C{error} instead (if the head is out already, the client's response is aborted)."""
        if self.done:
            return
        self.done = True
        self._ended(error)

    def answer(self, response: LocalResponse) -> None:
        """Send all of C{response} (its C{Content-Length} set from its body) and finish."""
        fields = [(n, v) for n, v in response.headers if n.lower() not in (b"content-length", b"transfer-encoding")]
        bodiless = response.status in (204, 304)
        if not bodiless:
            fields.append((b"Content-Length", b"%d" % len(response.body)))
        self.sendHead(response.status, fields, hasBody=not bodiless)
        if not bodiless and self.method != b"HEAD":
            self.write(response.body)
        self.finish()

    def _gone(self) -> None:
        """The exchange ended (the client may have gone): nothing more is written, the producer is stopped."""
        self.done = True
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
