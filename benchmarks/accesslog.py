"""
What the access log costs the reactor: L{AccessLogFile}'s hot path and hand-over, its writer's
throughput, and redaction, on one core.

    taskset -c 0 .venv/bin/python benchmarks/accesslog.py

Records are written from a running epoll reactor, C{perTurn} a reactor turn (1: a lightly loaded proxy,
one exchange a turn; 100: a busy one), to a file in a temporary directory.  For each, the time the
C{write} calls take (the hot path), and the CPU the reactor thread spends per record beyond what the same
turns cost with a sink that does nothing (the hand-overs and the waking of the writer).  The alternative
weighed against the writer thread, batched C{write(2)}s from the reactor thread once a turn, is timed the
same way: it is cheaper, and it blocks the reactor whenever the disk does (C{O_NONBLOCK} does nothing
for a regular file), which is why it was not chosen.  The writer's throughput is the rate at which it
empties a buffer of a million queued records.
"""

from __future__ import annotations

import os
import tempfile
import time
import timeit
from collections.abc import Callable

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402

from rproxy.observe.logfile import AccessLogFile, AccessLogSink  # noqa: E402
from rproxy.observe.redact import redactHeaders, redactTarget  # noqa: E402

LINE = (
    b'127.0.0.1 - - [01/Jan/2026:00:00:00 +0000] "GET /some/path/of/typical/length?x=1 HTTP/1.1" 200 1234 '
    b'"-" "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120"'
)


class NullSink:
    """Takes records and does nothing: the cost of the loop around the writes."""

    def __init__(self, path: str) -> None:
        pass

    def write(self, line: bytes) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> Deferred[None]:
        return succeed(None)


class ReactorWrites:
    """The rejected alternative: the records of a turn written with one C{write(2)} from the reactor thread."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        self._pending: list[bytes] = []
        self._call: object = None

    def write(self, line: bytes) -> None:
        self._pending.append(line)
        if self._call is None:
            self._call = reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        batch, self._pending = self._pending, []
        view = memoryview(b"\n".join(batch) + b"\n")
        while view:
            view = view[os.write(self._fd, view) :]

    def reopen(self) -> None:
        pass

    def close(self) -> Deferred[None]:
        self._flush()
        os.close(self._fd)
        return succeed(None)


async def run(makeSink: Callable[[str], AccessLogSink], records: int, perTurn: int) -> tuple[float, float]:
    """Write C{records} records, C{perTurn} a turn; return the hot path and the reactor thread's CPU, µs/record."""
    with tempfile.TemporaryDirectory() as directory:
        sink = makeSink(os.path.join(directory, "access.log"))
        hot = 0.0
        cpu = time.thread_time()
        for _ in range(records // perTurn):
            started = time.perf_counter()
            for _ in range(perTurn):
                sink.write(LINE)
            hot += time.perf_counter() - started
            await task.deferLater(reactor, 0, lambda: None)
        await sink.close()
        return hot / records * 1e6, (time.thread_time() - cpu) / records * 1e6


async def writerThroughput(records: int) -> float:
    """Records a second the writer thread writes, from a buffer of C{records} queued at once."""
    with tempfile.TemporaryDirectory() as directory:
        sink = AccessLogFile(os.path.join(directory, "access.log"), reactor, maxBuffered=1 << 31, flushDelay=0)
        for _ in range(records):
            sink.write(LINE)
        started = time.perf_counter()
        await sink.close()
        return records / (time.perf_counter() - started)


def microseconds(function: Callable[[], object], runs: int = 200_000) -> float:
    return min(timeit.repeat(function, number=runs, repeat=3)) / runs * 1e6


async def main() -> None:
    print(f"record: {len(LINE) + 1} bytes")
    sinks: dict[str, Callable[[str], AccessLogSink]] = {
        "AccessLogFile (writer thread)": lambda path: AccessLogFile(path, reactor),
        "batched writes from the reactor": ReactorWrites,
    }
    for perTurn, records in [(1, 100_000), (100, 1_000_000)]:
        _, baseline = await run(NullSink, records, perTurn)
        for name, makeSink in sinks.items():
            hot, cpu = await run(makeSink, records, perTurn)
            print(
                f"{perTurn:>3} a turn, {name:<32} hot path {hot:.3f} µs/write,"
                f" reactor thread {cpu - baseline:+.3f} µs/record beyond a null sink"
            )
    print(f"writer thread: {await writerThroughput(1_000_000):,.0f} records/s")
    headers = [
        (b"host", b"example.com"),
        (b"user-agent", b"Mozilla/5.0"),
        (b"accept", b"*/*"),
        (b"accept-language", b"en"),
        (b"accept-encoding", b"gzip"),
        (b"cookie", b"session=abc"),
        (b"authorization", b"Bearer abc"),
        (b"x-forwarded-for", b"192.0.2.1"),
    ]
    for target in [b"/some/path/of/typical/length", b"/search?q=hello&page=2&sort=asc", b"/api?access_token=a&x=1"]:
        print(f"redactTarget({target.decode()}): {microseconds(lambda: redactTarget(target)):.3f} µs")  # noqa: B023
    print(f"redactHeaders(8 fields, 2 secret): {microseconds(lambda: redactHeaders(headers)):.3f} µs")


if __name__ == "__main__":
    task.react(lambda _: Deferred.fromCoroutine(main()))
