"""
Where offloaded uploads go: a local directory or S3-compatible object storage, written as the body streams.

The contract is L{IObjectStorage}: L{IObjectStorage.start} opens one object, whose L{IObjectWriter} takes
the body part by part (saying when the caller must wait: backpressure), then finishes (its location, size
and SHA-256) or aborts (nothing left).  L{IObjectStorage.delete} removes a finished object again, when the
upstream refused the request that named it.

Every disk or network operation runs in a small thread pool of the storage's own (started on first use,
stopped by L{IObjectStorage.close}), never on the reactor: a slow disk or an object store that hangs slows
the uploads, not the proxy.  A writer collects what arrives until it holds a batch (1 MiB for a directory,
a part for S3), then hands the batch to the pool as one job (the digest is computed there too: hashlib
releases the GIL on large buffers, so another core hashes while the reactor reads the next bytes).  The jobs
of one object run one after the other, queued so that the thread never waits for the reactor to hand it the
next batch; once the batches handed over and not yet written reach a bound (4 MiB for a directory, two parts
for S3), the writer asks its caller to wait, and the client is paused.  So an upload holds at most the
bound and one batch collecting: about 5 MiB for a directory, two parts for S3 (the third cannot fill while
the client is paused).

A directory object is written to a hidden temporary name (C{.rproxy-upload-*}) in its target directory and
renamed to its key when complete, so a reader never sees half an object and an abort removes the only file.
Batches of 1 MiB keep the thread hand-offs few (one per MiB) and the disk writes large.  Writing on the
reactor's thread instead would be cheaper per byte, but a page-cache write stalls whenever the kernel
throttles dirty pages, and the reactor would stall with it for every client.

An S3 object of at most one part (known by its end, whether or not the client declared a length) is sent
with one C{PutObject}; a larger one becomes a multipart upload, one C{UploadPart} per full part, completed at the end
or aborted (C{AbortMultipartUpload}) on failure.  boto3's client is made in the pool on first use (making it
reads no network, but costs time) and is shared by the pool's threads, which boto3 allows.

Failures become L{ProxyError}s with a one-line reason that never holds a secret: a full disk or a store that
says it is full is a 507, a directory that cannot be written a 503, an object store that cannot be reached
a 503, one that refuses (no such bucket, access denied) a 502.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from rproxy.errors import ProxyError, proxyError, upstreamError

_log = Logger()

_T = TypeVar("_T")

#: Bytes a directory writer collects before handing them to a thread as one write.
DIRECTORY_BATCH = 1 << 20

#: Bytes a directory writer hands to its jobs, not yet written, before it asks its caller to wait.
DIRECTORY_QUEUE = 4 << 20

#: The smallest part S3 accepts (but for the last one).
MINIMUM_PART_SIZE = 5 << 20

#: The permissions of a directory object: the proxy's user writes it, its group (the application's) reads it.
FILE_MODE = 0o640

#: Where a directory object is written until it is complete (a hidden name, in the target directory).
TEMPORARY_PREFIX = ".rproxy-upload-"


@dataclass(frozen=True)
class StoredObject:
    """
    An object written whole.

    @ivar key: its key (a directory storage's path relative to its directory).
    @ivar location: where the upstream finds it: a file's absolute path, or C{s3://bucket/key}.
    @ivar size: its length in bytes.
    @ivar sha256: the SHA-256 of its bytes, in lower-case hexadecimal.
    """

    key: str
    location: str
    size: int
    sha256: str


class IObjectWriter(Interface):
    """One object being written, part by part."""

    def write(data: bytes) -> Deferred[None] | None:
        """
        Add C{data} to the object.

        @return: C{None} when more may follow at once; else a Deferred to wait for before writing more,
            which fails with a L{ProxyError} when the storage failed.
        """

    def finish() -> Deferred[StoredObject]:
        """The object is complete: store it; fails with a L{ProxyError} (nothing then left behind)."""

    def abort() -> Deferred[None]:
        """Drop the object and all that was written of it; never fails."""


class IObjectStorage(Interface):
    """A place uploads are stored in."""

    def start(prefix: str) -> IObjectWriter:
        """Open a new object under a random key after C{prefix} (already checked: see L{checkPrefix})."""

    def delete(stored: StoredObject) -> Deferred[None]:
        """Remove an object written before; never fails (a failure is logged)."""

    def close() -> Deferred[None]:
        """Stop the storage's threads, after the jobs they run."""


def checkPrefix(prefix: str) -> str | None:
    """
    Why C{prefix} is not a safe key prefix (C{None} if it is): path segments of letters, digits, C{.}, C{_} and
    C{-}, each ending with C{/}, none of them C{.} or C{..}.
    """
    if not prefix:
        return None
    if not prefix.endswith("/"):
        return "must end with /"
    for segment in prefix[:-1].split("/"):
        if segment in ("", ".", "..") or not all(c.isascii() and (c.isalnum() or c in "._-") for c in segment):
            return "must be path segments of letters, digits, '.', '_' and '-', without '.' or '..' segments"
    return None


def newKey(prefix: str) -> str:
    """A key nobody can guess or choose: C{prefix} and 128 random bits."""
    return prefix + secrets.token_hex(16)


class Workers:
    """
    A thread pool of a storage's own, started on first use: the proxy that never offloads starts no thread.

    @ivar name: the threads' name.
    @ivar size: the most threads at once.
    """

    _pool: ThreadPool | None = None
    _trigger: object = None

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        self._reactor = reactor
        self.name = name
        self.size = size

    def run(self, function: Callable[..., _T], *arguments: object) -> Deferred[_T]:
        """Run C{function(*arguments)} in a thread of the pool."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(0, self.size, self.name)
            pool.start()
            self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stopNow)
        return deferToThreadPool(self._reactor, pool, function, *arguments)

    def _stopNow(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def stop(self) -> Deferred[None]:
        """Stop the threads once their jobs are done (waiting for them in the reactor's own pool)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        self._reactor.removeSystemEventTrigger(self._trigger)
        return deferToThread(pool.stop)


class _Sink(Protocol):
    """The blocking side of one object, called in a thread, one call at a time."""

    def write(self, data: bytes) -> None:
        """Store a full batch."""

    def complete(self, tail: bytes) -> str:
        """Store C{tail} (the last bytes, maybe none) and make the object whole; return its location."""

    def discard(self) -> None:
        """Remove whatever was stored of the object (after any call, even one that failed)."""


@implementer(IObjectWriter)
class _BatchingWriter:
    """
    The reactor's side of one object: batches what arrives, and runs the blocking side's jobs one after the
    other (a write, the completion, a discard: never two at once on one object).
    """

    _error: ProxyError | None = None
    _queued = 0  # bytes handed to jobs that have not ended
    _ended = False

    def __init__(
        self,
        workers: Workers,
        sink: _Sink,
        key: str,
        flushAt: int,
        pauseAt: int,
        translate: Callable[[Exception], ProxyError],
    ) -> None:
        """
        @param flushAt: the bytes collected before they are handed to a job.
        @param pauseAt: the bytes handed to jobs not yet done beyond which the caller must wait.
        """
        self._workers = workers
        self._sink = sink
        self._key = key
        self._flushAt = flushAt
        self._pauseAt = pauseAt
        self._translate = translate
        self._batch: list[bytes] = []
        self._batched = 0
        self._waiting: list[Deferred[None]] = []
        self._last: Deferred[None] = succeed(None)
        self._digest = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._error is not None:
            return fail(self._error)
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= self._flushAt:
            self._flush()
        if self._queued < self._pauseAt:
            return None
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def finish(self) -> Deferred[StoredObject]:
        self._ended = True
        done: Deferred[StoredObject] = Deferred.fromCoroutine(self._finish())
        return done

    async def _finish(self) -> StoredObject:
        tail, self._batch, self._batched = b"".join(self._batch), [], 0
        try:
            location = await self._serially(self._inThread, self._sink.complete, tail)
        except ProxyError:
            await self._serially(self._discard)
            raise
        return StoredObject(self._key, location, self._size, self._digest.hexdigest())

    def abort(self) -> Deferred[None]:
        self._ended = True
        self._error = self._error or proxyError(503, "upload aborted", "proxy_internal_error")
        self._batch, self._batched = [], 0
        self._release()
        return self._serially(self._discard)

    def _serially(self, step: Callable[..., _T], *arguments: object) -> Deferred[_T]:
        """Run C{step(*arguments)} in a thread once the object's earlier jobs are done."""
        done: Deferred[_T] = Deferred()

        def run(_: object) -> Deferred[None]:
            job = self._workers.run(step, *arguments)
            job.chainDeferred(done)
            return job  # type: ignore[return-value]  # None once chained

        self._last = self._last.addCallback(run)
        return done

    def _discard(self) -> None:
        try:
            self._sink.discard()
        except Exception:
            _log.failure("could not discard upload object {key}", key=self._key)

    def _flush(self) -> None:
        batch, self._batch, self._batched = b"".join(self._batch), [], 0
        self._queued += len(batch)
        job = self._serially(self._inThread, self._sink.write, batch)
        job.addCallbacks(self._written, self._failed, callbackArgs=(len(batch),), errbackArgs=(len(batch),))

    def _inThread(self, step: Callable[[bytes], _T], data: bytes) -> _T:
        """Digest C{data} and hand it to C{step}, unless an earlier job failed; errors become L{ProxyError}s."""
        if self._error is not None:
            raise self._error
        self._digest.update(data)
        self._size += len(data)
        try:
            return step(data)
        except Exception as e:
            raise self._translate(e) from None

    def _written(self, _: None, size: int) -> None:
        self._queued -= size
        if self._queued < self._pauseAt:
            self._release()

    def _failed(self, failure: Failure, size: int) -> None:
        self._queued -= size
        error = failure.value
        self._error = self._error or (error if isinstance(error, ProxyError) else self._translate(error))  # type: ignore[arg-type]
        self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            if self._error is None:
                each.callback(None)
            else:
                each.errback(self._error)


class ObjectSet:
    """
    The objects of one request: those being written and those stored, all dropped by L{discard} unless
    the request was accepted.
    """

    _discarded = False

    def __init__(self, storage: IObjectStorage, prefix: str) -> None:
        self._storage = storage
        self._prefix = prefix
        self._writing: list[IObjectWriter] = []
        self.stored: list[StoredObject] = []

    def open(self) -> IObjectWriter:
        """A new object."""
        writer = self._storage.start(self._prefix)
        self._writing.append(writer)
        if self._discarded:
            writer.abort()
        return writer

    async def close(self, writer: IObjectWriter) -> StoredObject:
        """Finish the object of C{writer}; if the set was discarded meanwhile, the object goes too."""
        try:
            stored = await writer.finish()
        finally:
            self._writing.remove(writer)
        if self._discarded:
            await self._storage.delete(stored)
            raise proxyError(503, "upload discarded", "proxy_internal_error")
        self.stored.append(stored)
        return stored

    def discard(self) -> Deferred[None]:
        """Abort the objects being written and delete those stored; for all of them to be gone."""
        self._discarded = True
        writing, stored, self.stored = list(self._writing), self.stored, []
        gone = [writer.abort() for writer in writing] + [self._storage.delete(each) for each in stored]
        return gatherResults(gone).addCallback(lambda _: None)


# -- a local directory


class _DirectoryObject:
    """A file written under a temporary name in its directory, renamed to its key when complete."""

    _fd: int | None = None
    _temporary: str | None = None

    def __init__(self, final: str) -> None:
        self._final = final

    def write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            directory = os.path.dirname(self._final)
            os.makedirs(directory, exist_ok=True)
            fd, self._temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=directory)
            self._fd = fd
            os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide it from an application running as another user
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def complete(self, tail: bytes) -> str:
        self.write(tail)
        fd, self._fd = self._fd, None
        assert fd is not None and self._temporary is not None
        os.close(fd)
        os.rename(self._temporary, self._final)
        self._temporary = None
        return self._final

    def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        temporary, self._temporary = self._temporary, None
        if temporary is not None:
            os.unlink(temporary)


def _directoryError(error: Exception) -> ProxyError:
    """The client's answer for a failed disk operation."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return proxyError(507, f"upload storage is full: {error.strerror}", "proxy_internal_error")
    if isinstance(error, OSError):
        return proxyError(503, f"upload directory cannot be written: {error.strerror}", "proxy_internal_error")
    return proxyError(503, f"upload directory failed: {type(error).__name__}", "proxy_internal_error")


@implementer(IObjectStorage)
class DirectoryStorage:
    """
    Objects as files under a directory.

    @ivar path: the directory (absolute).
    """

    def __init__(self, path: str, reactor: Any, threads: int = 4) -> None:
        self.path = os.path.abspath(path)
        self._workers = Workers(reactor, "rproxy-upload-directory", threads)

    def __repr__(self) -> str:
        return f"<DirectoryStorage {self.path}>"

    def start(self, prefix: str) -> IObjectWriter:
        key = newKey(prefix)
        sink = _DirectoryObject(os.path.join(self.path, key))
        return _BatchingWriter(self._workers, sink, key, DIRECTORY_BATCH, DIRECTORY_QUEUE, _directoryError)

    def delete(self, stored: StoredObject) -> Deferred[None]:
        def remove() -> None:
            try:
                os.unlink(os.path.join(self.path, stored.key))
            except FileNotFoundError:
                pass

        return self._workers.run(remove).addErrback(_logged, stored.key)

    def close(self) -> Deferred[None]:
        return self._workers.stop()


def _logged(failure: Failure, key: str) -> None:
    _log.failure("could not delete upload object {key}", failure, key=key)


# -- S3-compatible object storage


@dataclass(frozen=True)
class S3Settings:
    """
    How to reach a bucket.

    @ivar endpoint: the service's URL (C{None}: AWS's, by region).
    @ivar credentials: an access key id and its secret, or C{None} for boto3's own lookup (its environment
        variables, its configuration files, an instance role).
    """

    bucket: str
    region: str | None = None
    endpoint: str | None = None
    prefix: str = ""
    credentials: tuple[str, str] | None = None
    timeout: float = 30.0

    def __repr__(self) -> str:
        return f"<S3Settings {self.endpoint or 'aws'} {self.bucket}>"  # never the credentials


class _S3Object:
    """One object: a single C{PutObject} if it is one part at most, else a multipart upload."""

    _uploadId: str | None = None

    def __init__(self, client: Callable[[], Any], bucket: str, key: str) -> None:
        self._client = client  # made on first use, in the first job's thread
        self._bucket = bucket
        self._key = key
        self._parts: list[dict[str, object]] = []

    def write(self, data: bytes) -> None:
        if self._uploadId is None:
            answer = self._client().create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self._uploadId = answer["UploadId"]
        number = len(self._parts) + 1
        answer = self._client().upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._uploadId, PartNumber=number, Body=data
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def complete(self, tail: bytes) -> str:
        if self._uploadId is None:
            self._client().put_object(Bucket=self._bucket, Key=self._key, Body=tail)
        else:
            if tail:
                self.write(tail)
            self._client().complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._uploadId, MultipartUpload={"Parts": self._parts}
            )
            self._uploadId = None
        return f"s3://{self._bucket}/{self._key}"

    def discard(self) -> None:
        uploadId, self._uploadId = self._uploadId, None
        if uploadId is not None:
            self._client().abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=uploadId)


def _s3Error(error: Exception) -> ProxyError:
    """The client's answer for a failed S3 call."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 507 or code in ("XMinioStorageFull", "QuotaExceeded", "InsufficientStorage"):
            return upstreamError(507, f"object storage is full: {code}", "http_response_status")
        return upstreamError(502, f"object storage refused the upload: {code}", "http_response_status")
    if isinstance(error, ConnectionError | HTTPClientError):
        return upstreamError(503, f"object storage unreachable: {type(error).__name__}", "destination_unavailable")
    return upstreamError(502, f"object storage failed: {type(error).__name__}", "http_protocol_error")


@implementer(IObjectStorage)
class S3Storage:
    """
    Objects in a bucket of an S3-compatible service.

    @ivar settings: the bucket and how to reach it.
    @ivar partSize: the size of a multipart upload's parts, and the largest object sent with one C{PutObject}.
    """

    _client: Any = None

    def __init__(self, settings: S3Settings, reactor: Any, partSize: int = 16 << 20, threads: int = 4) -> None:
        self.settings = settings
        self.partSize = partSize
        self._threads = threads
        self._workers = Workers(reactor, "rproxy-upload-s3", threads)
        self._making = threading.Lock()

    def __repr__(self) -> str:
        return f"<S3Storage {self.settings!r}>"

    def _connected(self) -> Any:
        """The boto3 client, made in the first thread that needs it (boto3's clients are thread-safe)."""
        with self._making:
            return self._client or self._make()

    def _make(self) -> Any:
        import boto3
        from botocore.config import Config

        settings = self.settings
        keys = settings.credentials
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=settings.region,
            aws_access_key_id=keys[0] if keys else None,
            aws_secret_access_key=keys[1] if keys else None,
            config=Config(
                connect_timeout=settings.timeout,
                read_timeout=settings.timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=self._threads,
                s3={"addressing_style": "path"},
            ),
        )
        self._client = client
        return client

    def start(self, prefix: str) -> IObjectWriter:
        key = newKey(self.settings.prefix + prefix)
        sink = _S3Object(self._connected, self.settings.bucket, key)
        return _BatchingWriter(self._workers, sink, key, self.partSize, 2 * self.partSize, _s3Error)

    def delete(self, stored: StoredObject) -> Deferred[None]:
        def remove() -> None:
            self._connected().delete_object(Bucket=self.settings.bucket, Key=stored.key)

        return self._workers.run(remove).addErrback(_logged, stored.key)

    def close(self) -> Deferred[None]:
        return self._workers.stop()
