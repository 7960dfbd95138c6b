"""The built-in balancers and their discovery as plugins."""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from rproxy.balancers import RoundRobin, balancerFactories
from rproxy.interfaces import IBalancer, IBalancerFactory
from rproxy.message import InboundRequest
from rproxy.upstream import Upstream
from rproxy.upstream.pool import PoolSettings

REQUEST = InboundRequest(b"GET", b"/", Headers(), "127.0.0.1", b"http", b"HTTP/1.1")


def upstreams(count: int) -> list[Upstream]:
    clock = Clock()
    return [Upstream.fromURL(f"http://127.0.0.1:{9000 + i}", clock, PoolSettings()) for i in range(count)]


class RoundRobinTests(unittest.TestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IBalancer, RoundRobin()))

    def test_even(self) -> None:
        """Each upstream in turn: exactly even over a multiple of the count."""
        hosts = upstreams(3)
        balancer = RoundRobin()
        picks = Counter(balancer.pick(hosts, REQUEST, ()) for _ in range(300))
        self.assertEqual(sorted(picks.values()), [100, 100, 100])

    def test_skipsTried(self) -> None:
        """A retry never goes back to a host already tried while others remain; none left: None."""
        hosts = upstreams(3)
        balancer = RoundRobin()
        request = REQUEST
        tried = [balancer.pick(hosts, request, ())]
        tried.append(balancer.pick(hosts, request, tried))
        tried.append(balancer.pick(hosts, request, tried))
        self.assertEqual(set(tried), set(hosts))
        self.assertIsNone(balancer.pick(hosts, request, tried))


class PluginTests(unittest.TestCase):
    def test_builtinFoundAsPlugin(self) -> None:
        """round_robin is found through getPlugins(IBalancerFactory, rproxy.plugins), like a third party's."""
        factories = balancerFactories()
        self.assertIn("round_robin", factories)
        factory = factories["round_robin"]
        self.assertTrue(verifyObject(IBalancerFactory, factory))
        self.assertIsInstance(factory.build({}), RoundRobin)

    def test_optionsRejected(self) -> None:
        self.assertRaises(ValueError, balancerFactories()["round_robin"].build, {"weight": 2})
