"""When a failed attempt may be tried again on another upstream (the "no request lost" rules)."""

from __future__ import annotations

from dataclasses import dataclass

from rproxy.proxy.message import InboundRequest

#: Methods whose repetition has the effect of one request (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True)
class RetryPolicy:
    """
    How hard a service tries to answer a request whose attempt failed.

    A failure before the request reached an upstream (refused, connect timeout, a saturated pool) is
    always tried on another upstream not tried yet.  Once the request was sent, an attempt is repeated
    only within these bounds, for a request that may safely run twice, and before any of the response
    reached the client.

    @ivar retries: attempts after the first once a request was sent.
    @ivar tryDuration: seconds from the first attempt after which no new attempt starts (0: no limit).
    @ivar retryStatuses: response statuses treated as failed attempts, when a retry is allowed.
    @ivar replayBodySize: request body bytes kept to send again (a larger body is sent once).
    @ivar idempotencyKey: also retry requests of other methods that carry an ``Idempotency-Key``.
    """

    retries: int = 2
    tryDuration: float = 0.0
    retryStatuses: frozenset[int] = frozenset()
    replayBodySize: int = 65536
    idempotencyKey: bool = False

    def mayRepeat(self, request: InboundRequest) -> bool:
        """Whether running C{request} twice is safe, given its method and headers."""
        if request.method in IDEMPOTENT_METHODS:
            return True
        return self.idempotencyKey and request.headers.hasHeader(b"idempotency-key")
