"""
L{rproxy.observe.logfile}: an access log file written by its own thread, on the running reactor and real
files and FIFOs: rotation under load (every record once, whole, in one file), a stalled destination (the
reactor keeps running, memory stays bounded, drops are counted and warned about), close, failed reopens
and writes, SIGUSR1, and the Twisted log destination.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import stat
import threading
import time
from collections.abc import Callable

from twisted.internet import reactor, task
from twisted.trial import unittest

from rproxy.observe.logfile import AccessLogFile, AccessLogSink, ReopenOnSignal, TwistedLogDestination
from rproxy.test.support import LogCapture, sleep, waitFor
from rproxy.test.test_conformance import deferredTest

RECORD = re.compile(rb"record (\d+) (x*)")


def record(number: int) -> bytes:
    """Record C{number}: lines of different lengths, each saying how long it must be."""
    return b"record %d " % number + b"x" * (number % 97)


def numbers(data: bytes) -> list[int]:
    """The record numbers of C{data}, which must hold whole records only, one a line."""
    found = []
    assert data == b"" or data.endswith(b"\n"), data[-100:]
    for line in data.splitlines():
        match = RECORD.fullmatch(line)
        assert match is not None and len(match.group(2)) == int(match.group(1)) % 97, line
        found.append(int(match.group(1)))
    return found


def contents(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def writeRecords(
    sink: AccessLogSink, count: int, perTurn: int, between: Callable[[int], None] = lambda sent: None
) -> None:
    """Write records 0 to C{count} - 1 from the reactor, C{perTurn} a turn; call C{between} after each turn."""
    for start in range(0, count, perTurn):
        for number in range(start, min(start + perTurn, count)):
            sink.write(record(number))
        between(start + perTurn)
        await sleep(0)


class StalledFifo:
    """
    A FIFO with a reader that reads nothing, as a stalled disk takes nothing.  A watchdog thread starts
    reading it if the test has not stopped it within 5 seconds: a writer that wrongly blocks the reactor on
    it is freed (and its test fails) instead of hanging the run.

    @ivar path: the FIFO's path.
    @ivar reader: the reader's file descriptor (non-blocking).
    """

    def __init__(self, testCase: unittest.TestCase) -> None:
        self.path = testCase.mktemp()
        os.mkfifo(self.path)
        self.reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._released = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()
        self._open = True
        testCase.addCleanup(self.closeReader)

    def _watch(self) -> None:
        if self._released.wait(5.0):
            return
        while not self._released.is_set():
            try:
                os.read(self.reader, 1 << 16)
            except BlockingIOError:
                time.sleep(0.001)

    def stopWatching(self) -> None:
        """Stop the watchdog (the test reads the FIFO itself from now on, or closes it)."""
        self._released.set()
        self._watchdog.join()

    def closeReader(self) -> None:
        """Close the reading end: a writer blocked on the FIFO gets EPIPE."""
        self.stopWatching()
        if self._open:
            self._open = False
            os.close(self.reader)


def warnings(capture: LogCapture, fragment: str) -> list[dict[str, object]]:
    return [e for e in capture.events if fragment in e.get("log_format", "")]


class AccessLogFileTests(unittest.TestCase):
    def sink(self, path: str, **options: float) -> AccessLogFile:
        """An access log file closed at the end of the test."""
        sink = AccessLogFile(path, reactor, **options)
        self.addCleanup(sink.close)
        return sink

    @deferredTest
    async def test_rotationUnderLoad(self) -> None:
        """
        200,000 records written from the reactor, 2,000 a turn, while the file is renamed away, a new one
        created and the log reopened ten times (as logrotate's C{create} mode does): each record is one
        whole line of one file, once, and each file holds exactly the records written between its
        rotations, those of the turn that rotated it included.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "access.log")
        capture = LogCapture(self)
        sink = self.sink(path, maxBuffered=256 * 1024 * 1024)
        total, perTurn = 200_000, 2000
        rotated: list[str] = []
        boundaries = [0]
        for start in range(0, total, perTurn):
            for number in range(start, start + perTurn):
                sink.write(record(number))
            if (start + perTurn) % 18_000 == 0 and len(rotated) < 10:
                # The previous reopen is done (the writer reopens while the writes go on, but never lags a
                # whole rotation behind, which would make which file gets which record a matter of timing).
                self.assertTrue(await waitFor(lambda: len(warnings(capture, "reopened")) == len(rotated)))
                rotated.append(f"{path}.{len(rotated) + 1}")
                os.rename(path, rotated[-1])
                with open(path, "xb"):
                    pass
                sink.reopen()
                boundaries.append(start + perTurn)
            await sleep(0)
        await sink.close()
        self.assertEqual(len(rotated), 10)
        self.assertEqual(sink.dropped, 0)
        boundaries.append(total)
        self.assertEqual(
            [numbers(contents(each)) for each in [*rotated, path]],
            [list(range(a, b)) for a, b in zip(boundaries, boundaries[1:], strict=False)],
        )

    @deferredTest
    async def test_stalledDestination(self) -> None:
        """
        A destination that takes nothing (a FIFO nobody reads) stalls the writer, never the reactor: a
        LoopingCall keeps ticking, at most C{maxBuffered} bytes are held, the rest is dropped and counted, and
        one warning says so.  Once the FIFO is read, the records that were taken come out whole and in order.
        """
        fifo = StalledFifo(self)
        capture = LogCapture(self)
        maxBuffered = 256 * 1024
        sink = self.sink(fifo.path, maxBuffered=maxBuffered)
        ticks = []
        ticker = task.LoopingCall(lambda: ticks.append(reactor.seconds()))
        ticker.start(0.01)
        self.addCleanup(ticker.stop)
        peak = []

        def watch(sent: int) -> None:
            peak.append(sink.buffered)

        started = reactor.seconds()
        total = 0
        while reactor.seconds() - started < 0.5:
            await writeRecords(sink, 1000, 1000, watch)
            total += 1000
            await sleep(0.005)
        elapsed = reactor.seconds() - started
        fifo.stopWatching()
        self.assertGreater(len([t for t in ticks if t >= started]), elapsed / 0.01 / 3)
        self.assertLessEqual(max(peak), maxBuffered)
        self.assertGreater(sink.dropped, 0)
        dropped = warnings(capture, "records dropped")
        self.assertEqual(len(dropped), 1)
        self.assertEqual(dropped[0]["count"], 1)

        # Now read the FIFO: the writer finishes, close fires.
        received = bytearray()

        def drain() -> None:
            try:
                received.extend(os.read(fifo.reader, 1 << 16))
            except BlockingIOError:
                pass

        draining = task.LoopingCall(drain)
        draining.start(0.001)
        self.addCleanup(draining.stop)
        closed = sink.close()
        self.assertTrue(await waitFor(lambda: closed.called, 10))
        drain()
        # Records 0..999 again and again: each taken one came out whole, and they add up.
        self.assertEqual(len(numbers(bytes(received))), total - sink.dropped)
        self.assertEqual(sum(e["count"] for e in warnings(capture, "records dropped")), sink.dropped)

    @deferredTest
    async def test_warningsSpaced(self) -> None:
        """
        While records keep being dropped, a warning says how many at most once a C{warnInterval}; together
        the warnings (the last one at close) count every record dropped.
        """
        fifo = StalledFifo(self)
        capture = LogCapture(self)
        sink = self.sink(fifo.path, maxBuffered=64 * 1024, warnInterval=0.1, closeTimeout=0.1)
        started = reactor.seconds()
        while reactor.seconds() - started < 0.45:
            await writeRecords(sink, 500, 500)
            await sleep(0.005)
        beforeClose = len(warnings(capture, "records dropped"))
        await sink.close()
        fifo.closeReader()  # the writer gets EPIPE and ends
        self.assertTrue(await waitFor(lambda: not sink._writer.is_alive()))
        dropped = warnings(capture, "records dropped")
        self.assertGreaterEqual(beforeClose, 3)
        times = [e["log_time"] for e in dropped[:beforeClose]]
        self.assertTrue(all(b - a >= 0.09 for a, b in zip(times, times[1:], strict=False)), times)
        stuck = warnings(capture, "not written")
        self.assertEqual(len(stuck), 1)
        self.assertEqual(
            sum(e["count"] for e in dropped) + stuck[0]["count"],
            stuck[0]["dropped"],
        )

    @deferredTest
    async def test_closeGivesUp(self) -> None:
        """
        Closing a log whose writer is stuck fires after C{closeTimeout} all the same, and counts what was
        not written as dropped; the writer ends when its destination does.
        """
        fifo = StalledFifo(self)
        capture = LogCapture(self)
        sink = self.sink(fifo.path, closeTimeout=0.3)
        await writeRecords(sink, 10_000, 1000)
        self.assertEqual(sink.dropped, 0)
        started = reactor.seconds()
        await sink.close()
        self.assertLess(reactor.seconds() - started, 3)
        [stuck] = warnings(capture, "not written")
        self.assertGreater(stuck["count"], 0)
        self.assertEqual(sink.dropped, stuck["count"])
        self.assertTrue(sink._writer.is_alive())
        fifo.closeReader()
        self.assertTrue(await waitFor(lambda: not sink._writer.is_alive()))

    @deferredTest
    async def test_closeFlushes(self) -> None:
        """
        Close writes everything taken, even right after the writes (no turn in between), and fires; records
        written afterwards are dropped; closing again gives the same result.
        """
        path = self.mktemp()
        sink = self.sink(path)
        for number in range(10_000):
            sink.write(record(number))
        closed = sink.close()
        sink.write(record(10_000))
        await closed
        self.assertEqual(numbers(contents(path)), list(range(10_000)))
        self.assertEqual(sink.dropped, 1)
        self.assertIs(sink.close(), closed)
        self.assertFalse(sink._writer.is_alive())

    @deferredTest
    async def test_oneRecordOneLine(self) -> None:
        """A newline inside a record is written as C{\\n}: it cannot start a record of its own."""
        path = self.mktemp()
        sink = self.sink(path)
        sink.write(b"one")
        sink.write(b'two\n127.0.0.1 - - "GET /forged HTTP/1.1" 200')
        sink.write(b"three\n")
        await sink.close()
        self.assertEqual(contents(path), b'one\ntwo\\n127.0.0.1 - - "GET /forged HTTP/1.1" 200\nthree\\n\n')

    @deferredTest
    async def test_reopenFails(self) -> None:
        """A path that cannot be opened again is logged as an error; the records keep going to the old file."""
        directory = self.mktemp()
        os.mkdir(directory)
        capture = LogCapture(self)
        sink = self.sink(os.path.join(directory, "access.log"))
        sink.write(record(0))
        os.rename(directory, directory + ".old")
        sink.reopen()
        sink.write(record(1))
        self.assertTrue(await waitFor(lambda: warnings(capture, "cannot reopen")))
        sink.write(record(2))
        await sink.close()
        self.assertEqual(numbers(contents(os.path.join(directory + ".old", "access.log"))), [0, 1, 2])
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(sink.dropped, 0)

    def test_openFails(self) -> None:
        """A path that cannot be opened fails at once, with the reason."""
        self.assertRaises(FileNotFoundError, AccessLogFile, os.path.join(self.mktemp(), "access.log"), reactor)

    @deferredTest
    async def test_writeFails(self) -> None:
        """
        A write that fails amid a record (the file size limit here, as a full disk would) counts the records
        it lost as dropped, and the next record starts a line of its own: the one cut short stays alone.
        """
        limit = 64 * 1024 * 1024
        lengths = [len(record(number)) + 1 for number in (93, 94, 95)]
        self.assertEqual(lengths, [104, 105, 106])  # 209 bytes fit in the 250 left, the third record does not
        previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        previousHandler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGXFSZ, previousHandler)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(limit - 250)  # sparse: almost at the limit, at no cost
        capture = LogCapture(self)
        sink = self.sink(path, flushDelay=0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous[1]))
        try:
            for number in (93, 94, 95, 96, 190, 191):
                sink.write(record(number))
            self.assertTrue(await waitFor(lambda: sink.dropped))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        sink.write(record(1))
        await sink.close()
        self.assertEqual(sink.dropped, 4)
        [failed] = warnings(capture, "records dropped")
        self.assertIn("File too large", failed["reason"])
        self.assertEqual(failed["count"], 4)
        self.assertEqual(
            contents(path)[limit - 250 :],
            record(93) + b"\n" + record(94) + b"\n" + record(95)[:41] + b"\n" + record(1) + b"\n",
        )

    @deferredTest
    async def test_reopenOnSignal(self) -> None:
        """
        SIGUSR1 reopens the log (what logrotate's C{postrotate} sends); stopping the service gives the
        signal its previous handler back.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "access.log")
        capture = LogCapture(self)
        sink = self.sink(path)
        previous = signal.getsignal(signal.SIGUSR1)
        reopener = ReopenOnSignal([sink], reactor)
        reopener.startService()
        self.addCleanup(reopener.stopService)
        sink.write(record(0))
        os.rename(path, path + ".1")
        os.kill(os.getpid(), signal.SIGUSR1)
        self.assertTrue(await waitFor(lambda: warnings(capture, "reopened")))
        sink.write(record(1))
        await sink.close()
        self.assertEqual(numbers(contents(path + ".1")), [0])
        self.assertEqual(numbers(contents(path)), [1])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode) & 0o600, 0o600)
        reopener.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), previous)


class TwistedLogDestinationTests(unittest.TestCase):
    @deferredTest
    async def test_events(self) -> None:
        """
        Each record is an info event of C{rproxy.access}, its text in C{line} (bytes that are not UTF-8
        escaped); reopen has nothing to do, close fires at once.
        """
        capture = LogCapture(self)
        sink: AccessLogSink = TwistedLogDestination()
        sink.write(b'127.0.0.1 - - "GET / HTTP/1.1" 200 2')
        sink.reopen()
        sink.write(b"caf\xc3\xa9 \xff")
        closed = sink.close()
        self.assertTrue(closed.called)
        await closed
        events = [e for e in capture.events if e["log_namespace"] == "rproxy.access"]
        self.assertEqual([e["line"] for e in events], ['127.0.0.1 - - "GET / HTTP/1.1" 200 2', "café \\xff"])
        self.assertEqual({e["log_level"].name for e in events}, {"info"})
