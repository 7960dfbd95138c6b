"""
Errors the proxy answers itself, each with a status, a one-line reason and who is at fault.

Every error response carries the reason in its body, an RFC 9209 ``Proxy-Status`` field naming the
error type, and ``X-Rproxy-Fault`` saying whether the client, the proxy or the upstream failed; the same
fields go into a structured log event.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from http import HTTPStatus


class Fault(Enum):
    """Who caused an error."""

    CLIENT = "client"
    PROXY = "proxy"
    UPSTREAM = "upstream"


class ProxyError(Exception):
    """
    A failure the proxy reports to the client as an HTTP error.

    @ivar status: the HTTP status code to answer with.
    @ivar reason: one line saying what went wrong, for the response body and the log.
    @ivar fault: who caused it.
    @ivar errorType: the RFC 9209 error type (``connection_refused``, ``http_response_timeout``, ...).
    @ivar retryAfter: seconds after which the client may try again (sent as ``Retry-After``), if known.
    @ivar headers: more fields for the response, in order (C{WWW-Authenticate}, rate-limit fields, ...).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        fault: Fault,
        errorType: str,
        retryAfter: int | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.fault = fault
        self.errorType = errorType
        self.retryAfter = retryAfter
        self.headers = list(headers)

    def __repr__(self) -> str:
        return f"<ProxyError {self.status} {self.errorType}: {self.reason}>"

    @property
    def phrase(self) -> bytes:
        """The status's reason phrase (Twisted's table lacks some, such as 431)."""
        try:
            return HTTPStatus(self.status).phrase.encode("ascii")
        except ValueError:
            return b"Error"

    def responseHead(self) -> list[tuple[bytes, bytes]]:
        """The header fields of the error response, body framing included."""
        fields = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % len(self.body())),
            (b"Proxy-Status", self.proxyStatus()),
            (b"X-Rproxy-Fault", self.fault.value.encode("ascii")),
            (b"Cache-Control", b"no-store"),
        ]
        if self.retryAfter is not None:
            fields.append((b"Retry-After", b"%d" % self.retryAfter))
        fields += self.headers
        return fields

    def body(self) -> bytes:
        """``<status> <phrase>: <reason>`` and a newline."""
        return b"%d %s: %s\n" % (self.status, self.phrase, _oneLine(self.reason))

    def proxyStatus(self) -> bytes:
        """The RFC 9209 ``Proxy-Status`` field value."""
        details = _oneLine(self.reason).replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'rproxy; error=%s; details="%s"' % (self.errorType.encode("ascii"), details)

    def responseBytes(self, version: bytes = b"HTTP/1.1", close: bool = True) -> bytes:
        """A complete raw response, for errors found before a request object exists."""
        head = [b"%s %d %s" % (version, self.status, self.phrase)]
        head += [name + b": " + value for name, value in self.responseHead()]
        if close:
            head.append(b"Connection: close")
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body()


def _oneLine(text: str) -> bytes:
    return " ".join(text.split()).encode("utf-8", "replace")


def clientError(status: int, reason: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> ProxyError:
    """A request the proxy refuses (RFC 9209 ``http_request_error``)."""
    return ProxyError(status, reason, Fault.CLIENT, "http_request_error", headers=headers)


def upstreamError(status: int, reason: str, errorType: str, retryAfter: int | None = None) -> ProxyError:
    """A failure of the upstream (or of every upstream)."""
    return ProxyError(status, reason, Fault.UPSTREAM, errorType, retryAfter)


def proxyError(
    status: int, reason: str, errorType: str, retryAfter: int | None = None, headers: Iterable[tuple[bytes, bytes]] = ()
) -> ProxyError:
    """A limit or failure of the proxy itself."""
    return ProxyError(status, reason, Fault.PROXY, errorType, retryAfter, headers)
