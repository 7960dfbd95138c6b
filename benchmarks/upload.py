"""
An offloaded 1 GiB upload against C{cp} of 1 GiB on the same disk.

    .venv/bin/python benchmarks/upload.py [--size 1G] [--dir DIRECTORY] [--runs 3]

A C{twist rproxy} process (pinned to CPU 0 with taskset) runs the C{upload} filter with a directory storage in
C{DIRECTORY}; curl (pinned to CPU 1) sends it 1 GiB of unknown length (a pipe: chunked), and a small origin
answers the forwarded request.  The time is curl's, from the first byte sent to the response.  C{cp} copies a
1 GiB file (already in the page cache, as the piped data is in memory) to the same directory.  Neither
flushes to the disk (no fsync): both measure what the kernel accepts, the way a user sees either finish.
The best of C{--runs} runs of each is printed, and the ratio; so is the time curl alone takes to send the
same data to a socket that discards it (on a small machine the client is a large part of the upload's time).
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import HOST, MIB, REPO, VENV_BIN, BenchError, Server, free_port, pinned

SECRET = b"the benchmark's shared secret, 32 bytes or more"


class _Origin(http.server.BaseHTTPRequestHandler):
    """Answers 201 to every request, after reading its (empty) body."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *arguments: object) -> None:
        pass


def _discard(listener: socket.socket) -> None:
    """Read each connection's chunked request to its last chunk, answer 201: the client's speed alone."""
    buffer = bytearray(MIB)
    while True:
        connection, _ = listener.accept()
        with connection:
            tail = b""
            while True:
                received = connection.recv_into(buffer)
                tail = (tail + bytes(buffer[max(0, received - 8) : received]))[-8:]
                if not received or tail.endswith(b"0\r\n\r\n"):
                    break
            connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def _best(runs: int, once: Callable[[], float]) -> float:
    return min(once() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB to upload and copy (default 1024)")
    parser.add_argument("--dir", type=Path, default=None, help="where both write (default: a temporary directory)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, the best counts (default 3)")
    arguments = parser.parse_args()
    size = arguments.size * MIB
    os.environ["PYTHONPATH"] = str(REPO)  # the proxy runs this checkout's rproxy
    work = Path(tempfile.mkdtemp(prefix="rproxy-upload-bench-", dir=arguments.dir))
    origin = http.server.ThreadingHTTPServer((HOST, 0), _Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    proxy: Server | None = None
    try:
        source = work / "source"
        block = bytes(range(256)) * (MIB // 256)
        with source.open("wb") as f:
            for _ in range(size // MIB):
                f.write(block)
        (work / "secret").write_bytes(SECRET)
        (work / "store").mkdir()
        port = free_port()
        config = work / "rproxy.toml"
        config.write_text(
            f'listen = ["tcp:{port}:interface={HOST}"]\n\n'
            f'[services.origin]\nupstreams = ["http://{HOST}:{origin.server_address[1]}"]\n\n'
            '[filters.uploads]\ntype = "upload"\nstorage = { type = "directory", path = "store" }\n'
            'signing-key-file = "secret"\nmax-size = "100GiB"\n\n'
            '[[routes]]\npath-prefix = "/"\nservice = "origin"\nfilters = ["uploads"]\n'
        )
        argv = pinned(0, [str(VENV_BIN / "python"), "-m", "twisted", "rproxy", "--access-log", "off"])
        proxy = Server("rproxy", [*argv, "--config", str(config)], work / "rproxy.log")
        proxy.wait_listening(port)

        sink = socket.create_server((HOST, 0))
        threading.Thread(target=_discard, args=(sink,), daemon=True).start()

        def send(url: str) -> float:
            started = time.monotonic()
            command = f"cat {source} | taskset -c 1 curl -sS -o /dev/null -w '%{{http_code}}' -T - -X POST {url}"
            done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=600)
            elapsed = time.monotonic() - started
            if done.stdout != "201":
                raise BenchError(f"upload to {url}: {done.stdout} {done.stderr}\n{proxy.log_tail() if proxy else ''}")
            return elapsed

        def upload() -> float:
            elapsed = send(f"http://{HOST}:{port}/upload")
            stored = list((work / "store").iterdir())
            if len(stored) != 1 or stored[0].stat().st_size != size:
                raise BenchError(f"upload: stored {stored}")
            stored[0].unlink()
            return elapsed

        def copy() -> float:
            target = work / "store" / "copy"
            started = time.monotonic()
            subprocess.run(["cp", str(source), str(target)], check=True, timeout=600)
            elapsed = time.monotonic() - started
            target.unlink()
            return elapsed

        copied = _best(arguments.runs, copy)
        alone = _best(arguments.runs, lambda: send(f"http://{HOST}:{sink.getsockname()[1]}/"))
        uploaded = _best(arguments.runs, upload)
        peak = proxy.peak_rss_mib()
        print(f"cp of {arguments.size} MiB:      {copied:6.2f} s  ({arguments.size / copied:7.0f} MiB/s)")
        print(f"curl alone (discarded): {alone:5.2f} s  ({arguments.size / alone:7.0f} MiB/s)")
        print(f"offloaded upload:      {uploaded:6.2f} s  ({arguments.size / uploaded:7.0f} MiB/s)")
        print(f"ratio upload / cp:     {uploaded / copied:6.2f}")
        print(f"ratio upload / curl alone: {uploaded / alone:4.2f}")
        print(f"proxy peak RSS:        {peak:6.0f} MiB")
    finally:
        if proxy is not None:
            proxy.stop()
        origin.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
