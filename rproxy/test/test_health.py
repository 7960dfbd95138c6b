"""Passive ejection, active verdicts and slow start of one upstream (L{rproxy.health.state}), on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from rproxy.health.state import PassivePolicy, UpstreamHealth
from rproxy.interfaces import HealthResult


def health(**policy: float) -> tuple[Clock, UpstreamHealth]:
    clock = Clock()
    clock.advance(1000)
    return clock, UpstreamHealth(clock, PassivePolicy(**policy))  # type: ignore[arg-type]


class PassiveTests(unittest.TestCase):
    def test_consecutiveFailures(self) -> None:
        """maxFails failures in a row call for ejection; a success in between starts the count again."""
        _, h = health(maxFails=3)
        self.assertFalse(h.failed("reset"))
        self.assertFalse(h.failed("reset"))
        h.succeeded()
        self.assertFalse(h.failed("reset"))
        self.assertFalse(h.failed("reset"))
        self.assertTrue(h.failed("reset"))

    def test_failureRate(self) -> None:
        """A failure share reached over at least minRequests in the window calls for ejection."""
        _, h = health(maxFails=0, failureRate=0.5, minRequests=10)
        for _ in range(5):
            h.succeeded()
        results = [h.failed("timeout") for _ in range(5)]
        self.assertEqual(results, [False, False, False, False, True])

    def test_failureRateWindow(self) -> None:
        """Outcomes older than the window no longer count."""
        clock, h = health(maxFails=0, failureRate=0.5, minRequests=4, window=10)
        for _ in range(3):
            h.failed("timeout")
        clock.advance(11)
        h.succeeded()
        h.succeeded()
        h.succeeded()
        self.assertFalse(h.failed("timeout"))  # 1 of 4 in the window

    def test_ejectionDoublesUpToMax(self) -> None:
        clock, h = health(baseEjection=10, maxEjection=35)
        lengths = []
        for _ in range(4):
            lengths.append(h.eject("refused"))
            self.assertEqual(h.state, "ejected")
            clock.advance(lengths[-1])
            self.assertEqual(h.state, "up")
        self.assertEqual(lengths, [10, 20, 35, 35])
        self.assertEqual(h.reason, "refused")

    def test_longCleanRunResetsEjections(self) -> None:
        clock, h = health(baseEjection=10, maxEjection=40)
        clock.advance(h.eject("x"))
        clock.advance(h.eject("x"))
        clock.advance(41)
        self.assertEqual(h.eject("x"), 10)

    def test_retryAfter(self) -> None:
        clock, h = health(baseEjection=10)
        self.assertEqual(h.retryAfter(), 0)
        h.eject("x")
        clock.advance(4)
        self.assertEqual(h.retryAfter(), 6)

    def test_noEjectionCallWhileEjected(self) -> None:
        _, h = health(maxFails=1)
        h.eject("x")
        self.assertFalse(h.failed("again"))


class SlowStartTests(unittest.TestCase):
    def test_rampAfterEjection(self) -> None:
        """A returning host goes from a tenth of its weight to all of it over the slow-start time."""
        clock, h = health(baseEjection=10, slowStart=20)
        self.assertEqual(h.weightFactor(), 1.0)
        h.eject("x")
        clock.advance(10)
        self.assertAlmostEqual(h.weightFactor(), 0.1)
        clock.advance(10)
        self.assertAlmostEqual(h.weightFactor(), 0.5)
        clock.advance(10)
        self.assertEqual(h.weightFactor(), 1.0)

    def test_rampAfterChecksPass(self) -> None:
        clock, h = health(slowStart=10)
        h.checked(HealthResult(False, "status 500"), rise=1, fall=1)
        self.assertEqual(h.state, "down")
        h.checked(HealthResult(True), rise=1, fall=1)
        clock.advance(5)
        self.assertAlmostEqual(h.weightFactor(), 0.5)

    def test_noSlowStart(self) -> None:
        clock, h = health(baseEjection=1)
        h.eject("x")
        clock.advance(1)
        self.assertEqual(h.weightFactor(), 1.0)


class ActiveTests(unittest.TestCase):
    def test_riseAndFall(self) -> None:
        """fall failures in a row mark the host down, rise passes in a row up; the reason is kept."""
        _, h = health()
        bad, good = HealthResult(False, "status 503, expected 200-399"), HealthResult(True)
        self.assertFalse(h.checked(bad, rise=2, fall=3))
        self.assertFalse(h.checked(bad, rise=2, fall=3))
        self.assertTrue(h.available)
        self.assertTrue(h.checked(bad, rise=2, fall=3))
        self.assertEqual((h.state, h.available, h.reason), ("down", False, "status 503, expected 200-399"))
        self.assertFalse(h.checked(good, rise=2, fall=3))
        self.assertFalse(h.checked(bad, rise=2, fall=3))  # the streak of passes is broken
        self.assertFalse(h.checked(good, rise=2, fall=3))
        self.assertTrue(h.checked(good, rise=2, fall=3))
        self.assertEqual(h.state, "up")

    def test_passingChecksEndEjection(self) -> None:
        """A host ejected passively but passing its checks after being down is back at once."""
        _, h = health(baseEjection=100)
        h.checked(HealthResult(False, "refused"), rise=1, fall=1)
        h.eject("refused")
        h.checked(HealthResult(True), rise=1, fall=1)
        self.assertTrue(h.available)
