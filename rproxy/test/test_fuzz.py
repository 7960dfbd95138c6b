"""
The coverage-guided fuzzer of fuzz/ (atheris against a live proxy over real sockets), run briefly: every
seed and every regression input replayed, then some seconds of mutation.  The harness itself checks each
input (no unhandled error logged, an answer or a close within its bound, the connection count back to
zero and no descriptor left open) and exits non-zero, with the input saved, when one fails.

C{make fuzz} runs the same harness for minutes.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import utils
from twisted.trial import unittest

from rproxy.test.support import PYTHON, ROOT

FUZZ = os.path.join(ROOT, "fuzz")
#: Seconds of mutation in the suite (C{make fuzz} runs minutes).
SECONDS = int(os.environ.get("RPROXY_FUZZ_SECONDS", "8"))


class FuzzTests(unittest.TestCase):
    timeout = 120 + SECONDS

    async def runHarness(self, *arguments: str) -> tuple[str, dict[str, int]]:
        """Run fuzz/harness.py with libFuzzer's C{arguments}; its output, and the counts it wrote."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        summary = os.path.join(work, "summary.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
        env["RPROXY_FUZZ_SUMMARY"] = summary
        env["PYTHONPATH"] = ROOT
        out, err, code = await utils.getProcessOutputAndValue(
            PYTHON,
            [
                os.path.join(FUZZ, "harness.py"),
                "-timeout=30",
                f"-artifact_prefix={work}/",
                f"-dict={os.path.join(FUZZ, 'http.dict')}",
                *arguments,
            ],
            env=env,
            path=work,
        )
        output = (out + err).decode("utf-8", "replace")
        crashes = [name for name in os.listdir(work) if name.startswith(("crash-", "timeout-", "leak-", "oom-"))]
        self.assertEqual((code, crashes), (0, []), output[-6000:])
        with open(summary) as f:
            return output, json.load(f)

    async def test_seedsAndRegressions(self) -> None:
        """
        Every seed (valid requests, smuggling shapes, HTTP/2 connections) and every input that once broke a
        property (fuzz/regressions/) passes the harness's checks; both protocols were reached.
        """
        inputs = [
            os.path.join(directory, name)
            for directory in (os.path.join(FUZZ, "seeds"), os.path.join(FUZZ, "regressions"))
            if os.path.isdir(directory)
            for name in sorted(os.listdir(directory))
        ]
        _, counts = await self.runHarness(*inputs)
        self.assertEqual(counts["inputs"], len(inputs))
        self.assertGreater(counts.get("h2", 0), 0, counts)
        self.assertGreater(counts.get("4xx", 0), 0, counts)
        self.assertGreater(counts.get("2xx", 0), 0, counts)

    async def test_boundedFuzzRun(self) -> None:
        """Some seconds of coverage-guided mutation from the seeds: no crash, hang or leak, and new coverage found."""
        corpus = os.path.abspath(self.mktemp())
        os.makedirs(corpus)
        output, counts = await self.runHarness(
            f"-max_total_time={SECONDS}", "-max_len=2048", corpus, os.path.join(FUZZ, "seeds")
        )
        done = re.search(r"Done (\d+) runs", output)
        self.assertIsNotNone(done, output[-3000:])
        assert done is not None
        self.assertGreater(int(done[1]), 50, output[-3000:])
        self.assertGreater(counts["inputs"], 50)
        self.assertTrue(os.listdir(corpus), "the fuzzer found no input with new coverage")
