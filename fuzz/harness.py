"""
Coverage-guided fuzzing of a live rproxy: atheris (libFuzzer for Python) mutates raw bytes, and each input
is sent over a real TCP socket to a proxy listening on 127.0.0.1 in front of the demo upstream.

The proxy runs in this process, on rproxy's reactor in a thread of its own, so that atheris sees the
coverage of the code that reads each input (rproxy's modules and h2, hpack and hyperframe are instrumented
as they are imported); the fuzzer's thread plays the client with a blocking socket.  One listener takes
both protocols: an input that starts with the HTTP/2 preface is h2c, anything else HTTP/1.1.

After each input the harness checks, and stops with a crash report (and the input saved) when one fails:

 - no crash: nothing logged with a failure (an unhandled exception) or at the error or critical level,
   and no 500 answer (bad input earns a precise status);
 - no hang: the reactor runs a call within L{REACTOR_BOUND} seconds, and the proxy's answer (or its
   close) comes within L{ANSWER_BOUND} seconds of the last byte sent;
 - no leak: once the client has closed, the site's connection count is back to zero and this process has
   exactly the file descriptors it had before the input, within L{CLEANUP_BOUND} seconds.  Idle upstream
   connections are not kept (C{--upstream-max-idle 0}), so every descriptor an input opened must close.

Run it as atheris runs anything (libFuzzer's options; the first corpus directory receives new inputs)::

    python fuzz/harness.py -max_total_time=60 -dict=fuzz/http.dict -artifact_prefix=/tmp/ /tmp/corpus fuzz/seeds

C{make fuzz} does (C{FUZZ_SECONDS}, default 300); C{rproxy.test.test_fuzz} runs it for seconds in the
suite.  With C{RPROXY_FUZZ_SUMMARY} set to a path, the counts of inputs and of what they got (a status
class, HTTP/2 frames, a close) are written there after each input.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

import atheris

# The rproxy of this checkout, whatever else is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["rproxy", "h2", "hpack", "hyperframe"]):
    from rproxy.app import reactor as rproxyReactor

    rproxyReactor.install()
    from twisted.internet import reactor
    from twisted.logger import LogEvent, LogLevel, globalLogPublisher

    from rproxy.app.build import buildSite
    from rproxy.app.demo import demoSite
    from rproxy.app.tap import Options
    from rproxy.downstream import connection, h2connection, h2request, http1, http2, request, validation  # noqa: F401
    from rproxy.proxy import exchange  # noqa: F401
    from rproxy.upstream import http1 as upstreamHttp1  # noqa: F401

#: Seconds the proxy has to answer (or close) after the last byte of an input before the client gives up
#: waiting; an input the proxy waits on (an incomplete request) just ends there.
ANSWER_BOUND = 2.0
#: Seconds of silence after which an answer is taken as complete.
QUIET = 0.02
#: Seconds the reactor has to run a call: longer is a hang.
REACTOR_BOUND = 5.0
#: Seconds after the client closes for the connection count and the descriptors to be back.
CLEANUP_BOUND = 5.0


class PropertyBrokenError(Exception):
    """An input broke a property: the message says which."""


class LiveProxy:
    """The demo upstream and an rproxy in front of it, on the reactor's thread, and what they log."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        upstream = reactor.listenTCP(0, demoSite(), interface="127.0.0.1")
        options = Options()
        options.parseOptions(
            [
                "--upstream",
                f"http://127.0.0.1:{upstream.getHost().port}",
                "--access-log",
                "off",
                "--upstream-max-idle",
                "0",
                "--header-timeout",
                "2",
            ]
        )
        self.site, _ = buildSite(options.config, reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1").getHost().port
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self.thread.start()

    def _observe(self, event: LogEvent) -> None:
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            failure = event.get("log_failure")
            what = failure.getTraceback() if failure is not None else str(event.get("log_format"))
            self.problems.append(what)

    def call(self, function: Any) -> Any:
        """Run C{function} on the reactor's thread and return its result, or fail as a hang."""
        result: list[Any] = []
        done = threading.Event()

        def run() -> None:
            result.append(function())
            done.set()

        reactor.callFromThread(run)
        if not done.wait(REACTOR_BOUND):
            raise PropertyBrokenError(f"hang: the reactor ran nothing for {REACTOR_BOUND}s")
        return result[0]

    def connections(self) -> int:
        return int(self.call(lambda: len(self.site.connections)))


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def exchange(port: int, data: bytes) -> bytes:
    """Send C{data} on a new connection and read the answer until the proxy closes or falls silent."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_BOUND) as client:
        try:
            client.sendall(data)
        except OSError:
            return answer  # the proxy closed before taking everything: an answer too
        deadline = time.monotonic() + ANSWER_BOUND
        client.settimeout(QUIET * 5)
        while time.monotonic() < deadline:
            try:
                received = client.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not received:
                break
            answer += received
            client.settimeout(QUIET)
    return answer


class Fuzzing:
    """The per-input checks (see the module) and the run's counts."""

    def __init__(self, summaryPath: str | None) -> None:
        self.proxy = LiveProxy()
        self.counts: Counter[str] = Counter()
        self.summaryPath = summaryPath
        #: The descriptors open between inputs, counted at the first input (libFuzzer opens files before).
        self.descriptors: int | None = None

    def settle(self) -> None:
        """Wait until the proxy holds no connection and the descriptors are back, or fail as a leak."""
        deadline = time.monotonic() + CLEANUP_BOUND
        while True:
            open_ = self.proxy.connections()
            descriptors = openDescriptors()
            if open_ == 0 and (self.descriptors is None or descriptors <= self.descriptors):
                return
            if time.monotonic() > deadline:
                raise PropertyBrokenError(
                    f"leak: {open_} client connections and {descriptors} descriptors "
                    f"({self.descriptors} before) {CLEANUP_BOUND}s after the client closed"
                )
            time.sleep(0.005)

    def testOneInput(self, data: bytes) -> None:
        if self.descriptors is None:
            exchange(self.proxy.port, b"GET / HTTP/1.1\r\nHost: warm\r\nConnection: close\r\n\r\n")
            self.settle()
            self.descriptors = openDescriptors()
        answer = exchange(self.proxy.port, data)
        self.counts["inputs"] += 1
        got = kind(data, answer)
        self.counts[got] += 1
        if got == "500":
            raise PropertyBrokenError(f"a 500 answered bad input: {answer[:300]!r}")
        self.settle()
        if self.proxy.problems:
            raise PropertyBrokenError("an error was logged:\n" + "\n".join(self.proxy.problems))
        if self.summaryPath is not None:  # libFuzzer ends the process without running exit handlers
            with open(self.summaryPath, "w") as f:
                json.dump(dict(self.counts), f)


def kind(data: bytes, answer: bytes) -> str:
    """What an input got: an HTTP/1.1 status class, HTTP/2 frames, or nothing before the close."""
    if data.startswith(b"PRI * HTTP/2.0"):
        return "h2" if answer else "h2 closed"
    if answer.startswith(b"HTTP/1."):
        status = answer[9:12].decode("latin-1")
        return status if status.startswith("5") else f"{status[:1]}xx"  # each server error by its code
    return "closed" if not answer else "other"


def main() -> None:
    fuzzing = Fuzzing(os.environ.get("RPROXY_FUZZ_SUMMARY"))
    atheris.Setup(sys.argv, fuzzing.testOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
