"""
Request ids and W3C trace context: what ties a client's request to the proxy's log, the upstream's log and
a trace.

Every request gets an id (L{RequestIds}): the client's C{X-Request-ID} when the client is a trusted proxy
and the value is sane, else a new random one.  The id is sent to the upstream, returned to the client, and
written in the access log and every error response.

W3C Trace Context (L{traceContext}): a valid C{traceparent} is forwarded as it came (with its
C{tracestate}); a request without one, or with a malformed one, starts a trace: a new C{traceparent}
(sampled, so that upstreams sampling by their parent keep their default of recording) and no
C{tracestate}.  The trace id goes into the access log.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable

from twisted.web.http_headers import Headers

#: The field carrying the request id, both ways.
REQUEST_ID = b"x-request-id"

#: A request id the proxy takes from a trusted client: visible ASCII without separators that could break
#: a log line, at most 200 bytes.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,200}\Z")

#: version 00: trace id, parent id, flags (https://www.w3.org/TR/trace-context/#traceparent-header).
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_ZERO_TRACE, _ZERO_PARENT = b"0" * 32, b"0" * 16

#: Ids and trace ids must be unique, not secret: a fast generator, seeded from the system's randomness
#: (os.urandom per request cost a tenth of a small request's CPU).
_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)  # workers forked from one process must not repeat ids


def _randomHex(bits: int) -> str:
    return f"{_random.getrandbits(bits):0{bits // 4}x}"


class RequestIds:
    """
    Where each request's id comes from.

    @ivar trusts: whether a peer's C{X-Request-ID} is kept (the trusted proxies': the proxy's forwarding
        policy, read per request, so that a reload changes it).
    """

    def __init__(self, trusts: Callable[[str], bool] = lambda peer: False) -> None:
        self.trusts = trusts

    def idFor(self, headers: Headers, peer: str | None) -> str:
        """The id of a request with C{headers} from C{peer}: a trusted client's own, else a new one."""
        given = headers.getRawHeaders(REQUEST_ID)
        if given is not None and peer and len(given) == 1 and _SANE_ID.match(given[0]) and self.trusts(peer):
            return given[0].decode("ascii")
        return _randomHex(128)


def traceContext(headers: Headers) -> tuple[bytes | None, str]:
    """
    The trace context to send upstream for a request with C{headers}: C{(None, trace id)} when its
    C{traceparent} is valid (it goes as it came), else C{(a new traceparent, its trace id)}.
    """
    values = headers.getRawHeaders(b"traceparent")
    if values is not None and len(values) == 1:
        match = _TRACEPARENT.match(values[0].strip().lower())
        if match is not None and match[1] != b"ff" and match[2] != _ZERO_TRACE and match[3] != _ZERO_PARENT:
            return None, match[2].decode("ascii")
    trace = _randomHex(128)
    return f"00-{trace}-{_randomHex(64)}-01".encode("ascii"), trace
