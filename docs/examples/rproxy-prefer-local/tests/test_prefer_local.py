"""Tests of prefer_local, with rproxy.testing: no sockets, simulated time."""

from __future__ import annotations

from twisted.trial import unittest

from rproxy import balancerFactories
from rproxy.interfaces import IBalancer
from rproxy.plugins import prefer_local  # installed by this package
from rproxy.testing import (
    BalancerContractTests,
    Clock,
    Simulation,
    assertSpread,
    countPicks,
    makeUpstreams,
    verifyBalancer,
)

PreferLocal = prefer_local.PreferLocal
preferLocal = prefer_local.preferLocal

# makeUpstreams gives hosts 10.0.0.1, 10.0.0.2, ...: call the first two local.
LOCAL = ("10.0.0.1", "10.0.0.2")


class PreferLocalContractTests(BalancerContractTests, unittest.TestCase):
    """The IBalancer contract, as rproxy.testing checks it."""

    def makeBalancer(self) -> IBalancer:
        return PreferLocal(LOCAL)


class PreferLocalTests(unittest.TestCase):
    def test_installed(self) -> None:
        """rproxy finds the plugin, and the factory keeps the contract with and without options."""
        self.assertIs(balancerFactories()["prefer_local"], preferLocal)
        verifyBalancer(preferLocal)
        verifyBalancer(preferLocal, {"local": "10.0.0.1, 10.0.0.2"})

    def test_localOnly(self) -> None:
        """While local upstreams are available, they share all the traffic evenly."""
        hosts = makeUpstreams(4)
        picks = countPicks(PreferLocal(LOCAL), hosts, 1000)
        assertSpread(picks, hosts, 0.05, weights={hosts[0]: 1, hosts[1]: 1, hosts[2]: 0, hosts[3]: 0})

    def test_failsOverToRemote(self) -> None:
        """
        Both local upstreams die mid-run: their requests in flight are retried on remote ones, and so is
        every later request.
        """
        clock = Clock()
        hosts = makeUpstreams(4, clock)
        simulation = Simulation(PreferLocal(LOCAL), hosts, clock, latency=0.5)
        simulation.killAt(hosts[0], 2.005)  # between two arrivals, 10 ms apart
        simulation.killAt(hosts[1], 2.005)
        result = simulation.run(400, interval=0.01)
        self.assertEqual(result.failed, [])
        early = [r for r in result.requests if r.arrivedAt < 2.005]
        late = [r for r in result.requests if r.arrivedAt > 2.005]
        self.assertEqual({r.attempts[0] for r in early}, set(hosts[:2]))
        self.assertEqual({r.servedBy for r in late}, set(hosts[2:]))
        self.assertEqual({len(r.attempts) for r in late}, {1})
        rescued = [r for r in early if r.servedBy in hosts[2:]]
        self.assertEqual(len(rescued), 50)  # in flight when the local hosts died: 0.5 s of arrivals

    def test_optionErrors(self) -> None:
        for options, word in (({"local": " , "}, "option local"), ({"remote": "x"}, "'remote'")):
            with self.assertRaises(ValueError) as raised:
                preferLocal.build(options)
            self.assertIn("balancer prefer_local", str(raised.exception))
            self.assertIn(word, str(raised.exception))
