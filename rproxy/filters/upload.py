"""
Upload offload (GitLab Workhorse's body hijack): the request body goes to storage, the upstream gets a signed
note of where it is.

On a route with this filter, a request with a body is not streamed to the upstream.  Optionally a
pre-authorization service is asked first (the original method, target and fields, no body): its 2xx JSON
answer says whether to offload and under which key prefix and size limit, any other answer is the client's.
Then the body streams to the storage (L{rproxy.upload.storage}: a directory, or S3-compatible object
storage), the client paused while the storage is behind, so that an upload of any size holds a bounded amount
of memory.  A C{multipart/form-data} body is rewritten as it streams (L{rproxy.upload.multipart}): its file
parts go to storage, its other fields are kept, and fields naming each stored object take the file's place.
Any other body becomes one object, and the upstream gets no body (C{Content-Length: 0}).

The forwarded request carries a JWT in C{header} (L{rproxy.upload.signing}) over its method, its target, the
SHA-256 of the exact body forwarded and each object's key, location, size and SHA-256, valid for C{expiry}.
The client's own value of that field never reaches the upstream.

Nothing is left behind: an upload that fails (the client stops sending, the body is over C{max-size} (413) or
a malformed form (400), the storage is full (507) or refuses (502, 503), the pre-authorization service is down
(503)) aborts what was written; the objects of a request the upstream answers with a status of at least
C{delete-on-status} (or that gets no answer at all) are deleted when the exchange ends.  No body byte is
written on the reactor's thread: storage I/O runs in the storage's threads.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from rproxy.downstream.body import RequestBodyPipe, fileBody
from rproxy.errors import ProxyError, clientError, proxyError, upstreamError
from rproxy.filters.forwardauth import passedOn, readBody
from rproxy.headers import Pairs, isToken
from rproxy.interfaces import FilterEnvironment, IClosable, IRequestFilter, IResponseFilter
from rproxy.options import PluginOptions
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext
from rproxy.upload.multipart import FormRewriter, formBoundary
from rproxy.upload.signing import StoredField, UploadSigner
from rproxy.upload.storage import (
    MINIMUM_PART_SIZE,
    DirectoryStorage,
    IObjectStorage,
    IObjectWriter,
    ObjectSet,
    S3Settings,
    S3Storage,
    checkPrefix,
)

_log = Logger()

#: The SHA-256 of no bytes: the forwarded body's digest when the whole body was stored.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

#: Where an exchange's upload is noted on its context, for the response side.
_NOTE = "upload"

#: The largest pre-authorization answer read (a refusal's body is what the client gets).
PREAUTHORIZE_ANSWER_SIZE = 64 * 1024


class _Sink(Protocol):
    """What a body is fed to: one object (L{_WholeBody}) or a form rewrite (L{FormRewriter})."""

    fields: list[StoredField]

    @property
    def forwardedType(self) -> bytes | None:
        """The forwarded body's C{Content-Type}, when it is not the client's."""

    def feed(self, data: bytes) -> Deferred[None] | None:
        """The next bytes of the body; a Deferred to wait for before more (see L{IObjectWriter.write})."""

    async def finish(self) -> tuple[IO[bytes], int, str]:
        """The body to forward (at its start), its length and SHA-256."""

    def close(self) -> None:
        """Drop what is held for the body to forward."""


class _WholeBody:
    """A body stored as one object; nothing is forwarded of it."""

    forwardedType: bytes | None = None

    def __init__(self, objects: ObjectSet, contentType: str | None) -> None:
        self.fields: list[StoredField] = []
        self._objects = objects
        self._contentType = contentType
        self._writer: IObjectWriter = objects.open()

    def feed(self, data: bytes) -> Deferred[None] | None:
        return self._writer.write(data)

    async def finish(self) -> tuple[IO[bytes], int, str]:
        stored = await self._objects.close(self._writer)
        self.fields = [StoredField(stored, contentType=self._contentType)]
        return io.BytesIO(), 0, EMPTY_SHA256

    def close(self) -> None:
        pass


class _BodyReader:
    """
    Reads a request body from its pipe into a sink, pausing the client while the sink is behind, and stopping
    at C{maxSize} bytes.  L{read}'s Deferred fires with what the sink's C{finish} gives, or fails with a
    L{ProxyError}; cancelling it stops reading.
    """

    _producer: IPushProducer | None = None
    _waiting = False  # for the sink
    _complete = False

    def __init__(self, pipe: RequestBodyPipe, sink: _Sink, maxSize: int) -> None:
        self._pipe = pipe
        self._sink = sink
        self._maxSize = maxSize
        self._received = 0
        self._pending: deque[bytes] = deque()
        self._done: Deferred[tuple[IO[bytes], int, str]] = Deferred(lambda _: self._stop())

    def read(self) -> Deferred[tuple[IO[bytes], int, str]]:
        """Start reading."""
        self._pipe.attach(self)
        return self._done

    # BodyConsumer

    def writeBody(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._maxSize:
            self._fail(clientError(413, f"upload body over {self._maxSize} bytes (max-size)"))
            return
        self._pending.append(data)
        self._pump()

    def finishBody(self, trailers: Pairs) -> None:
        self._complete = True
        self._pump()

    def failBody(self, error: ProxyError) -> None:
        self._fail(error)

    def registerBodyProducer(self, producer: IPushProducer) -> None:
        self._producer = producer

    def unregisterBodyProducer(self) -> None:
        self._producer = None

    def _pump(self) -> None:
        """Feed the sink what arrived, until it asks to wait (the client is paused then)."""
        if self._waiting or self._done.called:
            return
        while self._pending:
            try:
                waiting = self._sink.feed(self._pending.popleft())
            except Exception:
                self._broke(Failure())
                return
            if waiting is not None:
                self._waiting = True
                self._pause(True)
                waiting.addCallbacks(self._resumed, self._broke)
                return
        if self._complete:
            self._waiting = True  # for good: the sink is finishing
            Deferred.fromCoroutine(self._sink.finish()).addCallbacks(self._finished, self._broke)

    def _resumed(self, _: None) -> None:
        self._waiting = False
        self._pause(False)
        self._pump()

    def _finished(self, forwarded: tuple[IO[bytes], int, str]) -> None:
        if not self._done.called:
            self._done.callback(forwarded)

    def _broke(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, ProxyError):
            _log.failure("upload failed", failure)
            error = proxyError(503, f"upload failed: {type(error).__name__}", "proxy_internal_error")
        self._fail(error)

    def _pause(self, paused: bool) -> None:
        producer = self._producer
        if producer is None or self._done.called:
            return
        if paused:
            producer.pauseProducing()
        else:
            producer.resumeProducing()

    def _fail(self, error: ProxyError) -> None:
        if not self._done.called:
            self._stop()
            self._done.errback(error)

    def _stop(self) -> None:
        """Read no more: what the client still sends is dropped."""
        self._pending.clear()
        self._pipe.stopProducing()


class _Offload:
    """One request's stored objects, deleted when its exchange ends unless the upstream accepted it."""

    accepted = False

    def __init__(self, objects: ObjectSet) -> None:
        self.objects = objects

    def ended(self) -> None:
        if not self.accepted:
            self.objects.discard()


@dataclass(frozen=True)
class _Grant:
    """What a pre-authorization service allowed: where to store, up to what size."""

    prefix: str
    maxSize: int


class _Preauthorizer:
    """Asks a service whether, and where, to store a request's body."""

    _pool: HTTPConnectionPool | None = None
    _client: HTTPClient | None = None

    def __init__(self, url: str, reactor: Any, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._reactor = reactor
        parts = urlsplit(url)
        self._shown = f"{parts.scheme}://{parts.netloc}{parts.path}"  # the query may hold a secret

    def close(self) -> Deferred[None]:
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]

    async def ask(self, context: RequestContext, maxSize: int) -> _Grant | FilterVerdict:
        """The grant, or the client's answer: the service's refusal, or a 503 or 502 when it cannot say."""
        asking = Deferred.fromCoroutine(self._ask(context, maxSize))
        timedOut = []

        def expire() -> None:
            timedOut.append(True)
            asking.cancel()

        call = self._reactor.callLater(self.timeout, expire)
        try:
            return await asking
        except CancelledError:
            if timedOut:
                return self._unavailable(f"timed out after {self.timeout:g} s")
            raise
        except ProxyError:
            raise
        except Exception as e:
            return self._unavailable(type(e).__name__)
        finally:
            if call.active():
                call.cancel()

    def _unavailable(self, problem: str) -> ProxyError:
        return upstreamError(503, f"pre-authorization service unavailable: {problem}", "destination_unavailable")

    def _http(self) -> HTTPClient:
        if self._client is None:
            pool = self._pool = HTTPConnectionPool(self._reactor, persistent=True)
            self._client = HTTPClient(Agent(self._reactor, pool=pool))
        return self._client

    async def _ask(self, context: RequestContext, maxSize: int) -> _Grant | FilterVerdict:
        outbound = context.outbound
        headers = Headers()
        for name, value in outbound.fields():
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"x-forwarded-method", [outbound.method])
        headers.setRawHeaders(b"x-forwarded-uri", [outbound.target])
        body = context.body
        if body is not None and body.length is not None:
            headers.setRawHeaders(b"x-upload-length", [b"%d" % body.length])
        response = await self._http().request(
            outbound.method.decode("ascii"), self.url, headers=headers, allow_redirects=False, unbuffered=True
        )
        answer = await readBody(response, PREAUTHORIZE_ANSWER_SIZE)
        if answer is None:
            raise upstreamError(
                502, f"pre-authorization answer over {PREAUTHORIZE_ANSWER_SIZE} bytes", "http_response_body_size"
            )
        if not 200 <= response.code < 300:
            return LocalResponse(
                response.code, passedOn(response.headers), answer, f"pre-authorization answered {response.code}"
            )
        return self._grant(answer, maxSize)

    def _grant(self, answer: bytes, maxSize: int) -> _Grant | None:
        """The 2xx answer's decision: C{None} to proxy the request as it is (C{"offload": false})."""
        try:
            decision = json.loads(answer or b"{}")
        except ValueError:
            decision = None
        if not isinstance(decision, dict):
            raise upstreamError(502, "pre-authorization answer is not a JSON object", "http_protocol_error")
        if decision.get("offload", True) is False:
            return None
        prefix = decision.get("prefix", "")
        problem = checkPrefix(prefix) if isinstance(prefix, str) else "must be a string"
        problem = problem and f"prefix {problem}"
        limit = decision.get("max_size", maxSize)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            problem = "max_size must be a whole number of bytes"
        if problem:
            raise upstreamError(502, f"pre-authorization answer is not valid: {problem}", "http_protocol_error")
        return _Grant(prefix, min(limit, maxSize))


@implementer(IRequestFilter, IResponseFilter, IClosable)
class UploadOffload:
    """
    A filter that stores request bodies and forwards signed notes of them.

    @ivar storage: where bodies go.
    @ivar signer: what signs the forwarded requests.
    @ivar header: the field the signature is sent in (lower case).
    @ivar maxSize: the largest body stored (a larger one is a 413).
    @ivar maxFieldsSize: the largest rewritten form (fields other than files; a larger one is a 413).
    @ivar deleteFrom: the lowest upstream status for which the objects are deleted.
    @ivar consumes: the signature field: what a client sends under its name never reaches the upstream.
    """

    def __init__(
        self,
        storage: IObjectStorage,
        signer: UploadSigner,
        reactor: Any,
        *,
        header: bytes = b"rproxy-upload",
        maxSize: int = 10 << 30,
        maxFieldsSize: int = 1 << 20,
        deleteFrom: int = 400,
        preauthorize: str | None = None,
        preauthorizeTimeout: float = 5.0,
    ) -> None:
        self.storage = storage
        self.signer = signer
        self.header = header.lower()
        self.maxSize = maxSize
        self.maxFieldsSize = maxFieldsSize
        self.deleteFrom = deleteFrom
        self.consumes = (self.header,)
        self._preauthorizer = (
            _Preauthorizer(preauthorize, reactor, preauthorizeTimeout) if preauthorize is not None else None
        )

    def __repr__(self) -> str:
        return f"<UploadOffload {self.storage!r}>"

    def onRequest(self, context: RequestContext) -> FilterVerdict | Awaitable[FilterVerdict]:
        """Store the body (a request without one goes on as it is)."""
        body = context.body
        if body is None:
            return None
        if body.length is not None and body.length > self.maxSize:
            return clientError(413, f"upload body of {body.length} bytes over {self.maxSize} bytes (max-size)")
        return self._offload(context, body)

    async def _offload(self, context: RequestContext, body: RequestBodyPipe) -> FilterVerdict:
        grant: _Grant | FilterVerdict = _Grant("", self.maxSize)
        if self._preauthorizer is not None:
            grant = await self._preauthorizer.ask(context, self.maxSize)
        if not isinstance(grant, _Grant):
            return grant
        if body.length is not None and body.length > grant.maxSize:
            return clientError(413, f"upload body of {body.length} bytes over {grant.maxSize} bytes allowed")
        objects = ObjectSet(self.storage, grant.prefix)
        offload = _Offload(objects)
        context.notes[_NOTE] = offload
        context.whenEnded(offload.ended)
        contentType = (context.inbound.headers.getRawHeaders(b"content-type") or [b""])[0]
        boundary = formBoundary(contentType)
        sink: _Sink
        if boundary is None:
            sink = _WholeBody(objects, contentType.decode("latin-1") or None)
        else:
            sink = FormRewriter(boundary, objects, self.maxFieldsSize)
        try:
            forwarded, length, digest = await _BodyReader(body, sink, grant.maxSize).read()
        except BaseException:
            sink.close()
            await objects.discard()  # gone before the client hears why (a 507 leaves no partial file behind)
            raise
        outbound = context.outbound
        if sink.forwardedType is not None:
            outbound.headers.setRawHeaders(b"content-type", [sink.forwardedType])
        token = self.signer.sign(outbound.method, outbound.target, digest, length, sink.fields)
        outbound.headers.setRawHeaders(self.header, [token.encode("ascii")])
        context.body = fileBody(forwarded, length)
        for each in sink.fields:
            _log.info(
                "upload stored {key}: {size} bytes, sha256 {sha256}",
                key=each.stored.key,
                size=each.stored.size,
                sha256=each.stored.sha256,
            )
        return None

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Keep the objects if the upstream accepted the request."""
        offload = context.notes.get(_NOTE)
        if isinstance(offload, _Offload) and status < self.deleteFrom:
            offload.accepted = True
        elif isinstance(offload, _Offload) and offload.objects.stored:
            _log.info(
                "deleting {count} uploaded objects: the request was answered {status}",
                count=len(offload.objects.stored),
                status=status,
            )

    def close(self) -> Deferred[None]:
        """Close the pre-authorization connections and stop the storage's threads."""
        closing = [self.storage.close()]
        if self._preauthorizer is not None:
            closing.append(self._preauthorizer.close())
        return gatherResults(closing).addCallback(lambda _: None)


def _readSecret(options: PluginOptions, name: str, base: str) -> bytes | None:
    """The contents of the file option C{name} names (relative to C{base}), or C{None} when it is not given."""
    path = options.text(name)
    if path is None:
        return None
    try:
        with open(os.path.join(base, path), "rb") as f:
            return f.read()
    except OSError as e:
        raise options.error(name, f"cannot be read: {e.strerror}") from None


def _checkURL(options: PluginOptions, name: str) -> str | None:
    url = options.text(name)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not url.isascii() or " " in url:
        raise options.error(name, "must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise options.error(name, "must not hold credentials (user:password@)")
    return url


def _storage(options: PluginOptions, environment: FilterEnvironment, partSize: int) -> IObjectStorage:
    table = PluginOptions("filter", "upload: storage", options.table("storage"))
    kind = table.text("type")
    threads = table.integer("threads", 4, minimum=1)
    assert threads is not None
    storage: IObjectStorage
    if kind == "directory":
        path = table.text("path")
        if not path:
            raise table.error("path", "required: the directory uploads are stored in")
        storage = DirectoryStorage(os.path.join(environment.base, path), environment.reactor, threads)
    elif kind == "s3":
        if importlib.util.find_spec("boto3") is None:
            raise options.error("storage", "type s3 needs boto3: pip install 'rproxy[s3]'")
        bucket = table.text("bucket")
        if not bucket:
            raise table.error("bucket", "required: the bucket uploads are stored in")
        prefix = table.text("prefix", "") or ""
        problem = checkPrefix(prefix)
        if problem is not None:
            raise table.error("prefix", problem)
        keyId = _readSecret(table, "access-key-id-file", environment.base)
        secret = _readSecret(table, "secret-access-key-file", environment.base)
        if (keyId is None) != (secret is None):
            raise table.error("access-key-id-file", "goes with secret-access-key-file: give both, or neither")
        credentials = None
        if keyId is not None and secret is not None:
            credentials = (keyId.decode("utf-8").strip(), secret.decode("utf-8").strip())
        settings = S3Settings(
            bucket=bucket,
            region=table.text("region"),
            endpoint=_checkURL(table, "endpoint"),
            prefix=prefix,
            credentials=credentials,
            timeout=table.duration("timeout", 30.0),
        )
        storage = S3Storage(settings, environment.reactor, partSize, threads)
    else:
        raise options.error("storage", 'needs type = "directory" or type = "s3"')
    table.finish()
    return storage


def buildUpload(options: PluginOptions, environment: FilterEnvironment) -> UploadOffload:
    """A L{UploadOffload} from the options of a C{[filters.X]} table with C{type = "upload"}."""
    partSize = options.size("part-size", 16 << 20)
    if partSize < MINIMUM_PART_SIZE:
        raise options.error("part-size", f"must be at least {MINIMUM_PART_SIZE} bytes (5MiB), S3's smallest part")
    storage = _storage(options, environment, partSize)
    algorithm = options.text("algorithm", "HS256") or ""
    key = _readSecret(options, "signing-key-file", environment.base)
    if key is None:
        raise options.error("signing-key-file", "required: the HS256 secret or the private key that signs")
    try:
        signer = UploadSigner(key, algorithm, options.duration("expiry", 300.0))
    except ValueError as e:
        raise options.error("algorithm" if "must be one of" in str(e) else "signing-key-file", str(e)) from None
    header = (options.text("header", "Rproxy-Upload") or "").encode("ascii", "replace")
    if not isToken(header):
        raise options.error("header", f"{header!r} is not a field name")
    deleteFrom = options.integer("delete-on-status", 400, minimum=200)
    assert deleteFrom is not None
    return UploadOffload(
        storage,
        signer,
        environment.reactor,
        header=header,
        maxSize=options.size("max-size", 10 << 30),
        maxFieldsSize=options.size("max-fields-size", 1 << 20),
        deleteFrom=deleteFrom,
        preauthorize=_checkURL(options, "preauthorize"),
        preauthorizeTimeout=options.duration("preauthorize-timeout", 5.0),
    )
