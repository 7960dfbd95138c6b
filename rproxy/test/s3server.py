"""
A real S3 API server for the upload tests: moto's server mode (C{python -m moto.server}) on 127.0.0.1.

It takes seconds to start, so one server serves the tests of one process: L{s3Server} starts it on first use
(waiting for it at most L{START_TIMEOUT} seconds) and it is killed when the process exits.  Each test makes
buckets of its own (L{S3Server.bucket}) and reads them through boto3 (L{S3Server.call}, in a thread: the
proxy under test runs on this process's reactor).
"""

from __future__ import annotations

import atexit
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from rproxy.test.support import PYTHON, freePort

#: Seconds the server may take to listen.
START_TIMEOUT = 30.0

#: The credentials moto accepts (any), as the proxy's key files hold them.
ACCESS_KEY_ID = "testing-key-id"
SECRET_ACCESS_KEY = "testing-secret-key"
REGION = "us-east-1"

_T = TypeVar("_T")


class S3Server:
    """
    A running moto server.

    @ivar endpoint: its URL.
    """

    def __init__(self) -> None:
        port = freePort()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._process = subprocess.Popen(
            [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's server did not listen within {START_TIMEOUT:g} s") from None
                time.sleep(0.1)
        import boto3

        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def stop(self) -> None:
        """Kill the server."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

    def call(self, function: Callable[..., _T], *arguments: Any, **keywords: Any) -> Deferred[_T]:
        """Run a blocking boto3 call in a thread."""
        return deferToThread(function, *arguments, **keywords)

    def bucket(self) -> Deferred[str]:
        """A new, empty bucket's name."""
        name = "rproxy-" + secrets.token_hex(6)
        return self.call(self.client.create_bucket, Bucket=name).addCallback(lambda _: name)

    def keys(self, bucket: str) -> Deferred[list[str]]:
        """The keys of the objects in C{bucket}."""

        def listed(answer: dict[str, Any]) -> list[str]:
            return sorted(each["Key"] for each in answer.get("Contents", []))

        return self.call(self.client.list_objects_v2, Bucket=bucket).addCallback(listed)

    def pendingUploads(self, bucket: str) -> Deferred[list[str]]:
        """The keys of the multipart uploads in C{bucket} neither completed nor aborted."""

        def listed(answer: dict[str, Any]) -> list[str]:
            return sorted(each["Key"] for each in answer.get("Uploads", []))

        return self.call(self.client.list_multipart_uploads, Bucket=bucket).addCallback(listed)


_server: S3Server | None = None


def s3Server() -> S3Server:
    """The process's moto server, started on first use."""
    global _server
    if _server is None:
        _server = S3Server()
    return _server
