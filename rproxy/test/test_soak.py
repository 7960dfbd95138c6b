"""
The soak of benchmarks/soak.py on a small scale, within the suite: a real ``twist rproxy`` under HTTP/1.1
(wrk), HTTP/2 (h2load) and WebSocket load at once for 22 seconds, its upstreams killed and started again
and its configuration reloaded every few seconds.  The script asserts what C{make soak} asserts for
minutes (flat RSS and descriptors after the warm-up, no failed idempotent request, every WebSocket
handshake and echo right, nothing left open after the load); this test runs it and reads its report.
"""

from __future__ import annotations

import json
import os

from twisted.internet import utils
from twisted.trial import unittest

from rproxy.test.support import PYTHON, ROOT

SOAK = os.path.join(ROOT, "benchmarks", "soak.py")


class SoakTests(unittest.TestCase):
    timeout = 150

    async def test_smallSoak(self) -> None:
        """
        22 seconds: four upstream kills, about ten reloads; zero failed requests, RSS and descriptors flat
        after a 9-second warm-up, every descriptor the load opened closed after it.
        """
        report = os.path.abspath(self.mktemp())
        env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
        env["PYTHONPATH"] = ROOT
        out, err, code = await utils.getProcessOutputAndValue(
            PYTHON,
            [
                SOAK,
                "--seconds=22",
                "--warmup=9",
                "--h1-connections=8",
                "--h2-connections=2",
                "--h2-streams=4",
                "--ws-connections=4",
                "--kill-every=4",
                "--down-for=1.5",
                "--reload-every=2",
                f"--report={report}",
            ],
            env=env,
            path=ROOT,
        )
        output = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, output[-5000:])
        with open(os.path.join(report, "soak.json")) as f:
            results = json.load(f)
        self.assertEqual(results["problems"], [])
        self.assertGreaterEqual(results["upstreamKills"], 4)
        self.assertGreaterEqual(results["reloads"], 8)
        self.assertGreater(results["http1"]["requests"], 0)
        self.assertEqual(results["http2"]["succeeded"], results["http2"]["total"])
        self.assertGreater(results["websocket"]["messages"], 0)
        self.assertLessEqual(results["rssGrowth"], 0.05)
        self.assertTrue(os.path.exists(os.path.join(report, "soak.txt")))
