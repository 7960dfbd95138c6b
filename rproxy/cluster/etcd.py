"""
A small etcd v3 client on etcd's HTTP/JSON gateway (the C{/v3/...} paths every etcd 3.4+ serves on its client
URLs), through treq: what the shared registry and configuration need, never blocking the reactor.

  - keys and values are bytes (the gateway carries them in base64), revisions and lease ids integers (the
    gateway carries them as decimal strings);
  - each call is bounded by the store timeout, tries the next client URL when one does not answer, and
    reports the outcome to the store's L{StoreHealth};
  - L{EtcdClient.watch} streams the changes under a prefix from a revision on, until it is stopped or the
    stream ends (etcd stopped, the connection lost, or the revision compacted away): the caller then reads
    the prefix again and watches on from there (L{rproxy.cluster.registrations} does).

etcd's gRPC API would be the other way in; its Python clients block or need asyncio, and the gateway is the
same API, documented by etcd as stable (C{Documentation/dev-guide/api_grpc_gateway.md}).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionLost
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from rproxy.cluster.health import StoreError, StoreHealth
from rproxy.cluster.tls import StoreTLS

#: The longest line of a watch stream: one message of changes (etcd caps a request at 1.5 MiB by default).
MAX_MESSAGE = 4 * 1024 * 1024


class EtcdError(StoreError):
    """A call etcd did not answer, or answered with an error: one line saying which."""


@dataclass(frozen=True)
class KeyValue:
    """
    A key as etcd holds it.

    @ivar key: the key.
    @ivar value: its value (C{b""} in a deletion event).
    @ivar lease: the lease it is attached to (0: none).
    @ivar modRevision: the revision of its last change.
    """

    key: bytes
    value: bytes
    lease: int
    modRevision: int

    @classmethod
    def fromJSON(cls, kv: dict[str, Any]) -> KeyValue:
        """A key of the gateway's answer (omitted fields are etcd's zero values)."""
        return cls(
            _decode(kv.get("key", "")),
            _decode(kv.get("value", "")),
            int(kv.get("lease", 0)),
            int(kv.get("mod_revision", 0)),
        )


@dataclass(frozen=True)
class Event:
    """A change under a watched prefix: C{kv} put (C{deleted} false) or deleted."""

    kv: KeyValue
    deleted: bool


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(text: str) -> bytes:
    return base64.b64decode(text)


def prefixEnd(prefix: bytes) -> bytes:
    """The first key after every key starting with C{prefix} (etcd's C{range_end} for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


class Watch(Protocol):
    """
    A watch in progress, and the protocol its stream is read with: one JSON message per line.

    @ivar ended: fires with why the stream ended (a line), once, however it ends: etcd stopped or cut it, the
        revision was compacted away, or L{stop} was called (C{"stopped"}).
    """

    def __init__(self, onEvents: Callable[[list[Event]], object]) -> None:
        self.ended: Deferred[str] = Deferred()
        self._onEvents = onEvents
        self._buffer = b""
        self._request: Deferred[Any] | None = None

    def stop(self) -> None:
        """End the watch now."""
        self._end("stopped")

    def _end(self, why: str) -> None:
        if self.ended.called:
            return
        self.ended.callback(why)
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()  # a response body's transport is its producer
        elif self._request is not None:
            self._request.cancel()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_MESSAGE:
            self._end("a watch message longer than 4 MiB")
        for line in lines:
            if self.ended.called:
                return
            if line.strip():
                self._message(line)

    def _message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if "error" in message and "result" not in message:  # refused: its reason is in the error
                error = message["error"]
                self._end(
                    f"etcd refused the watch: {error.get('message', error) if isinstance(error, dict) else error}"
                )
                return
            result = message["result"]
            if int(result.get("compact_revision", 0)) or result.get("canceled"):
                self._end(f"etcd cancelled the watch: {result.get('cancel_reason') or 'revision compacted'}")
                return
            events = result.get("events")
            if events:
                changes = [Event(KeyValue.fromJSON(e.get("kv", {})), e.get("type") == "DELETE") for e in events]
                self._onEvents(changes)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._end(f"a watch message etcd's API does not send: {line[:200]!r}")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ended.called:
            self.ended.callback("the watch stream ended" if reason.check(ResponseDone) else "the watch stream was cut")


class EtcdClient:
    """
    The calls of etcd v3's KV, lease and watch APIs rproxy makes, on the client URLs C{urls} (tried in turn).

    @ivar health: whether etcd answers, as this instance sees it.
    """

    def __init__(
        self,
        urls: Sequence[str],
        reactor: IReactorTime,
        timeout: float,
        health: StoreHealth,
        credentials: tuple[str, str] | None = None,
        tls: StoreTLS | None = None,
    ) -> None:
        """
        @param urls: the client URLs of the cluster's members (C{http://host:2379}).
        @param timeout: seconds a call may take in all before it fails as unanswered.
        @param credentials: the user name and password of etcd's authentication, if it is enabled: each call
            carries the token they get (asked again when etcd says it is no longer valid).
        @param tls: how to speak TLS to C{https://} members (C{None}: verified against the system's CAs).
        """
        self.health = health
        self._credentials = credentials
        self._token: str | None = None
        self._urls = list(urls)
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._pool.retryAutomatically = False  # a call is retried on the next member, not blindly
        policy = _StorePolicy(tls) if tls is not None else BrowserLikePolicyForHTTPS()
        self._http = HTTPClient(Agent(reactor, policy, pool=self._pool))  # type: ignore[arg-type]
        streams = HTTPConnectionPool(reactor, persistent=False)
        self._streams = HTTPClient(Agent(reactor, policy, pool=streams))  # type: ignore[arg-type]

    def close(self) -> Deferred[None]:
        """Close the idle connections (a watch in progress is stopped by its owner)."""
        return self._pool.closeCachedConnections()

    # -- calls

    def range(self, prefix: bytes) -> Deferred[tuple[int, list[KeyValue]]]:
        """Every key starting with C{prefix}, and the revision they are as of."""

        def read(answer: dict[str, Any]) -> tuple[int, list[KeyValue]]:
            revision = int(answer["header"]["revision"])
            return revision, [KeyValue.fromJSON(kv) for kv in answer.get("kvs", ())]

        body = {"key": _encode(prefix), "range_end": _encode(prefixEnd(prefix))}
        return self._call("/v3/kv/range", body).addCallback(read)

    def get(self, key: bytes) -> Deferred[KeyValue | None]:
        """The key C{key}, or C{None} if there is none."""

        def read(answer: dict[str, Any]) -> KeyValue | None:
            kvs = answer.get("kvs", ())
            return KeyValue.fromJSON(kvs[0]) if kvs else None

        return self._call("/v3/kv/range", {"key": _encode(key)}).addCallback(read)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[None]:
        """Set C{key} to C{value}, attached to C{lease} (0: to none)."""
        body: dict[str, object] = {"key": _encode(key), "value": _encode(value)}
        if lease:
            body["lease"] = str(lease)
        return self._call("/v3/kv/put", body).addCallback(lambda _: None)

    def delete(self, key: bytes) -> Deferred[None]:
        """Delete C{key} (nothing happens if there is none)."""
        return self._call("/v3/kv/deleterange", {"key": _encode(key)}).addCallback(lambda _: None)

    def grant(self, ttl: int) -> Deferred[int]:
        """A new lease of C{ttl} seconds (etcd may grant more: its minimum is about two seconds)."""
        return self._call("/v3/lease/grant", {"TTL": str(ttl)}).addCallback(lambda answer: int(answer["ID"]))

    def revoke(self, lease: int) -> Deferred[None]:
        """Revoke C{lease}: the keys attached to it are deleted.  A lease that has expired already is no error."""

        def gone(failure: Failure) -> None:
            failure.trap(EtcdError)
            if "lease not found" not in str(failure.value):
                failure.raiseException()

        calling = self._call("/v3/lease/revoke", {"ID": str(lease)})
        return calling.addCallback(lambda _: None).addErrback(gone)

    # -- the watch

    def watch(self, prefix: bytes, startRevision: int, onEvents: Callable[[list[Event]], object]) -> Watch:
        """
        Stream the changes of the keys starting with C{prefix} from C{startRevision} on: C{onEvents} is
        called with each batch of events, in order.  The returned L{Watch} says when and why the
        stream ended; it is never restarted here.
        """
        watch = Watch(onEvents)
        body = {
            "create_request": {
                "key": _encode(prefix),
                "range_end": _encode(prefixEnd(prefix)),
                "start_revision": str(startRevision),
            }
        }

        def streaming(response: IResponse) -> None:
            if response.code != 200:
                watch._end(f"etcd answered the watch with {response.code}")
                return
            self.health.answered()
            response.deliverBody(watch)

        def failed(failure: Failure) -> None:
            watch._end(_why(failure))

        request = self._streams.post(self._urls[0] + "/v3/watch", json=body, unbuffered=True, headers=self._headers())
        watch._request = request
        request.addCallbacks(streaming, failed)
        return watch

    # -- how every call is made

    def _headers(self) -> Headers:
        """What every request carries: the token, once there is one (etcd's gateway reads it there)."""
        return Headers({} if self._token is None else {b"authorization": [self._token.encode("ascii")]})

    def _call(self, path: str, body: Mapping[str, object]) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._authorized(path, body))

    async def _authorized(self, path: str, body: Mapping[str, object]) -> dict[str, Any]:
        """The call, with a token when etcd wants one: asked first, and again once if etcd drops it."""
        if self._credentials is None:
            return await self._callEach(path, body)
        if self._token is None:
            await self._authenticate()
        try:
            return await self._callEach(path, body)
        except EtcdError as e:
            if "invalid auth token" not in str(e):
                raise
        self._token = None
        await self._authenticate()
        return await self._callEach(path, body)

    async def _authenticate(self) -> None:
        assert self._credentials is not None
        name, password = self._credentials
        answer = await self._callEach("/v3/auth/authenticate", {"name": name, "password": password})
        token = answer.get("token")
        if not isinstance(token, str) or not token or not token.isascii():
            raise EtcdError("etcd answered authenticate without a token")
        self._token = token

    async def _callEach(self, path: str, body: Mapping[str, object]) -> dict[str, Any]:
        problems = []
        for url in list(self._urls):
            try:
                answer = await self._callOne(url + path, body)
            except _UnansweredError as e:
                problems.append(f"{url}: {e}")
                continue
            if url != self._urls[0]:  # the next calls, and the next watch, start with the member that answered
                self._urls.remove(url)
                self._urls.insert(0, url)
            self.health.answered()
            return answer
        why = "; ".join(problems)
        self.health.unreachable(why)
        raise EtcdError(why)

    async def _callOne(self, url: str, body: Mapping[str, object]) -> dict[str, Any]:
        try:
            calling = self._http.post(url, json=body, headers=self._headers())
            calling.addTimeout(self._timeout, self._reactor)  # type: ignore[arg-type]
            response = await calling
            reading = treq.content(response)
            reading.addTimeout(self._timeout, self._reactor)  # type: ignore[arg-type]
            content = await reading
        except (
            ConnectError,
            ConnectingCancelledError,
            ResponseFailed,
            RequestTransmissionFailed,
            RequestNotSent,
            ConnectionLost,
            TimeoutError,
            CancelledError,
        ) as e:
            raise _UnansweredError(_why(Failure(e))) from None
        try:
            answer = json.loads(content)
        except ValueError:
            raise _UnansweredError(f"answered {response.code} with something other than JSON") from None
        if not isinstance(answer, dict):
            raise _UnansweredError("answered with JSON that is not an object")
        if response.code != 200:
            message = answer.get("message") or answer.get("error") or "no reason given"
            raise EtcdError(f"etcd refused {url.rsplit('/v3/', 1)[-1]}: {message}")
        return answer


class _UnansweredError(Exception):
    """A member did not answer a call (the next one is tried)."""


def _why(failure: Failure) -> str:
    """One line for a call that failed."""
    if failure.check(TimeoutError, CancelledError, ConnectingCancelledError):  # the call's timeout cancelled it
        return "no answer in time"
    if failure.check(ConnectError):
        return f"cannot connect: {_message(failure)}"
    if failure.check(ResponseFailed, RequestTransmissionFailed):  # a TLS handshake that failed is one of these
        reasons = getattr(failure.value, "reasons", None) or [failure]
        if reasons[0].check(CancelledError, TimeoutError):  # the call's timeout cancelled it
            return "no answer in time"
        return f"the connection failed: {_message(reasons[0])}"
    return _message(failure)


def _message(failure: Failure) -> str:
    return failure.getErrorMessage() or type(failure.value).__name__


@implementer(IPolicyForHTTPS)
class _StorePolicy:
    """The TLS of C{https://} etcd members: L{StoreTLS}'s CAs and client certificate, the member's name checked."""

    def __init__(self, tls: StoreTLS) -> None:
        self._tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return self._tls.creator(hostname.decode("ascii"))  # as Twisted's own policy reads it
