"""
The config file (L{rproxy.app.config}): services, routes and splits from TOML, one model with the command line,
errors naming the file and the key, C{--check-config}, and a proxy built from a file, end to end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from twisted.internet import defer, utils
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial import unittest

from rproxy.app.build import buildDirector
from rproxy.app.config import (
    SERVICE_OPTIONS,
    BlueGreenConfig,
    ConfigError,
    ConfigFile,
    ProxyConfig,
    RouteConfig,
    ServiceVersionConfig,
    WeightedSplitConfig,
)
from rproxy.app.tap import Options, buildService, checkConfig
from rproxy.health.checks import HealthChecker
from rproxy.proxy.directors import BlueGreen, RoutingDirector, SingleServiceDirector, WeightedSplit
from rproxy.proxy.retry import RetryPolicy
from rproxy.test.certs import CertificateAuthority
from rproxy.test.support import (
    BIN,
    ReceivedRequest,
    RunningProxy,
    ScriptedUpstream,
    rawRequest,
    splitResponses,
    startProxy,
    waitFor,
)
from rproxy.test.test_drain import ROOT
from rproxy.testing import directRequest, inboundRequest, makeService

URL = "http://127.0.0.1:9001"


def writeConfig(testCase: unittest.TestCase, text: str) -> str:
    """A new C{rproxy.toml} holding C{text}; its absolute path."""
    directory = os.path.abspath(testCase.mktemp())
    os.mkdir(directory)
    path = os.path.join(directory, "rproxy.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def parse(*arguments: str) -> ProxyConfig:
    """The config of a command line."""
    options = Options()
    options.parseOptions(list(arguments))
    return options.config


class ConfigTestCase(unittest.TestCase):
    """Configs and errors from files."""

    def fromFile(self, text: str, *arguments: str) -> ProxyConfig:
        """The config of C{--config FILE ARGUMENTS}, FILE holding C{text}."""
        return parse("--config", writeConfig(self, text), *arguments)

    def error(self, text: str, *arguments: str) -> str:
        """The error C{--config FILE ARGUMENTS} stops with, C{rproxy.toml} standing for FILE's path."""
        path = writeConfig(self, text)
        error = self.assertRaises(UsageError, parse, "--config", path, *arguments)
        return str(error).replace(path, "rproxy.toml")


class FlatFileTests(ConfigTestCase):
    """A file without services: its top level is options, and the upstreams form the service C{default}."""

    def test_commandLineModel(self) -> None:
        """One service C{default} of the upstreams, with every setting; one route without conditions to it."""
        config = parse("--upstream", URL, "--connect-timeout", "2", "--retries", "1", "--rewrite-host")
        self.assertEqual(list(config.services), ["default"])
        default = config.services["default"]
        self.assertEqual(default.upstreams, (URL,))
        self.assertEqual(default.pool.connectTimeout, 2.0)
        self.assertEqual(default.retry.retries, 1)
        self.assertTrue(default.rewriteHost)
        self.assertEqual(config.routes, (RouteConfig("default"),))

    def test_fileAndCommandLineSame(self) -> None:
        """The same settings as flags, as a file's top level, or as its service C{default}: the same config."""
        flags = [
            *("--upstream", URL, "--upstream", "http://127.0.0.1:9002#weight=2"),
            *("--balancer", "hash", "--balancer-option", "key=header:X-User"),
            *("--retries", "3", "--retry-on-status", "502,503", "--retry-body-size", "1M", "--rewrite-host"),
            *("--health-path", "/healthz", "--health-fall", "1", "--max-ejected-percent", "30"),
            *("--listen", "tcp:8081", "--via-name", "edge", "--max-body-size", "10M"),
        ]
        topLevel = (
            f'upstream = ["{URL}", "http://127.0.0.1:9002#weight=2"]\n'
            'balancer = "hash"\nbalancer-option = ["key=header:X-User"]\n'
            'retries = 3\nretry-on-status = "502,503"\nretry-body-size = "1M"\nrewrite-host = true\n'
            'health-path = "/healthz"\nhealth-fall = 1\nmax-ejected-percent = 30\n'
            'listen = ["tcp:8081"]\nvia-name = "edge"\nmax-body-size = "10M"\n'
        )
        service = (
            'listen = ["tcp:8081"]\nvia-name = "edge"\nmax-body-size = "10M"\n'
            "[services.default]\n"
            f'upstreams = ["{URL}", "http://127.0.0.1:9002#weight=2"]\n'
            'balancer = "hash"\nbalancer-options = { key = "header:X-User" }\n'
            'retries = 3\nretry-on-status = "502,503"\nretry-body-size = "1M"\nrewrite-host = true\n'
            'health-path = "/healthz"\nhealth-fall = 1\nmax-ejected-percent = 30\n'
        )
        expected = parse(*flags)
        self.assertEqual(self.fromFile(topLevel), expected)
        self.assertEqual(self.fromFile(service), expected)

    def test_commandLineOverridesTopLevel(self) -> None:
        config = self.fromFile(f'upstream = ["{URL}"]\nconnect-timeout = 2\nretries = 4\n', "--retries", "1")
        self.assertEqual(config.services["default"].pool.connectTimeout, 2.0)
        self.assertEqual(config.services["default"].retry.retries, 1)

    def test_routesToDefault(self) -> None:
        """Routes may send the top-level upstreams' requests, by the name C{default}."""
        config = self.fromFile(
            f'upstream = ["{URL}"]\n[[routes]]\npath-prefix = "/api"\nstrip-prefix = true\nservice = "default"\n'
        )
        self.assertEqual(config.routes, (RouteConfig("default", pathPrefix="/api", stripPrefix=True),))

    def test_demoUpstream(self) -> None:
        """The demo upstream is the service C{default} without --upstream, unless the file defines services."""
        config = parse("--demo-upstream", "tcp:9000:interface=127.0.0.2")
        self.assertEqual(config.services["default"].upstreams, ("http://127.0.0.2:9000",))
        config = self.fromFile(f'[services.api]\nupstreams = ["{URL}"]\n', "--demo-upstream", "tcp:9000")
        self.assertEqual(list(config.services), ["api"])
        self.assertEqual(config.demoUpstream, "tcp:9000")

    def test_singleServiceDirector(self) -> None:
        """One catch-all route to a service is that service's L{SingleServiceDirector}; anything more, routes."""
        api, web = makeService("api"), makeService("web")
        services = {"api": api, "web": web}
        director = buildDirector([RouteConfig("api")], services)
        assert isinstance(director, SingleServiceDirector)
        self.assertIs(director.service, api)
        for routes in ([RouteConfig("api", pathPrefix="/a")], [RouteConfig("api"), RouteConfig("web", hosts=("w",))]):
            self.assertIsInstance(buildDirector(routes, services), RoutingDirector)


#: A valid value, other than the default, for each setting a service may override.
SAMPLES: dict[str, object] = {
    "balancer": "least_conn",
    "rewrite-host": True,
    "connect-timeout": 1.5,
    "response-timeout": 7,
    "read-timeout": "8",
    "upstream-max-connections": 9,
    "upstream-max-idle": 0,
    "upstream-idle-timeout": 4,
    "upstream-queue": 5,
    "queue-timeout": 6,
    "retries": 5,
    "try-duration": 2.5,
    "retry-on-status": "502,504",
    "retry-body-size": "1k",
    "retry-idempotency-key": True,
    "max-fails": 2,
    "fail-rate": 0.5,
    "fail-window": 3,
    "ejection-time": 4,
    "max-ejection-time": 50,
    "max-ejected-percent": 20,
    "slow-start": 5,
    "health-path": "/other",
    "health-method": "HEAD",
    "health-status": "200,204",
    "health-body": "ok",
    "health-interval": 2,
    "health-timeout": 1,
    "health-rise": 5,
    "health-fall": 6,
    "upstream-ping-interval": 2,
    "upstream-ping-timeout": 3,
    "upstream-tls-insecure": True,
    # Files under trial's working directory, written when first read.
    "upstream-ca": "upstream-tls-samples/ca.pem",
    "upstream-client-cert": "upstream-tls-samples/client.pem:upstream-tls-samples/client.key",
}


class ServiceTests(ConfigTestCase):
    """C{[services.NAME]}: upstreams, a balancer, and the top level's settings unless overridden."""

    def test_eachSettingAsOnCommandLine(self) -> None:
        """Every setting a service may override gives the service what the option gives the command line's."""
        self.assertEqual(sorted(SAMPLES), sorted(SERVICE_OPTIONS))
        CertificateAuthority().writeFiles("upstream-tls-samples")
        baseline = parse("--upstream", URL, "--health-path", "/healthz").services["default"]
        for option, value in SAMPLES.items():
            text = f'health-path = "/healthz"\n[services.s]\nupstreams = ["{URL}"]\n{option} = {json.dumps(value)}\n'
            fromFile = self.fromFile(text).services["s"]
            flag = [f"--{option}"] if value is True else [f"--{option}", str(value)]
            fromCommandLine = parse("--upstream", URL, "--health-path", "/healthz", *flag).services["default"]
            self.assertEqual(replace(fromFile, name="default"), fromCommandLine, option)
            self.assertNotEqual(fromCommandLine, baseline, option)

    def test_inheritance(self) -> None:
        """A service has the top level's settings, the command line's over them, and its own over both."""
        config = self.fromFile(
            "connect-timeout = 2\nretries = 4\nmax-fails = 7\nrewrite-host = true\n"
            f'[services.a]\nupstreams = ["{URL}"]\nretries = 0\nrewrite_host = false\n'
            f'[services.b]\nupstreams = ["{URL}"]\n'
            '[[routes]]\nhosts = "a"\nservice = "a"\n[[routes]]\nservice = "b"\n',
            "--connect-timeout",
            "3",
            "--retries",
            "1",
        )
        a, b = config.services["a"], config.services["b"]
        self.assertEqual(
            (a.pool.connectTimeout, a.retry.retries, a.passive.maxFails, a.rewriteHost), (3.0, 0, 7, False)
        )
        self.assertEqual((b.pool.connectTimeout, b.retry.retries, b.passive.maxFails, b.rewriteHost), (3.0, 1, 7, True))

    def test_balancerOptions(self) -> None:
        """The top level's balancer options go with the top level's balancer, unless a service sets its own."""
        config = self.fromFile(
            'balancer = "hash"\nbalancer-option = ["key=client_ip"]\n'
            f'[services.inherits]\nupstreams = ["{URL}"]\n'
            f'[services.own]\nupstreams = ["{URL}"]\nbalancer = "p2c"\n'
            f'[services.options]\nupstreams = ["{URL}"]\nbalancer-options = {{ key = "header:X-User" }}\n'
            f'[services.both]\nupstreams = ["{URL}"]\nbalancer = "ewma"\nbalancer-options = {{ decay = 5 }}\n'
            "[[routes]]\nsplit = { services = { inherits = 1, own = 1, options = 1, both = 1 } }\n"
        )
        self.assertEqual(
            {name: (service.balancer, dict(service.balancerOptions)) for name, service in config.services.items()},
            {
                "inherits": ("hash", {"key": "client_ip"}),
                "own": ("p2c", {}),
                "options": ("hash", {"key": "header:X-User"}),
                "both": ("ewma", {"decay": 5}),
            },
        )

    def test_healthChecks(self) -> None:
        """Each service with a health path, its own or the top level's, is checked its own way."""
        config = self.fromFile(
            "health-interval = 3\n"
            f'[services.a]\nupstreams = ["{URL}"]\nhealth-path = "/a"\nhealth-fall = 1\n'
            f'[services.b]\nupstreams = ["{URL}"]\n'
            '[[routes]]\nhosts = "a"\nservice = "a"\n[[routes]]\nservice = "b"\n'
        )
        check = config.services["a"].healthCheck
        assert check is not None
        self.assertEqual((check.path, check.interval, check.fall), ("/a", 3.0, 1))
        self.assertIsNone(config.services["b"].healthCheck)
        checkers = [each for each in buildService(config, MemoryReactorClock()) if isinstance(each, HealthChecker)]
        self.assertEqual(len(checkers), 1)  # what it checks: EndToEndTests.test_healthChecksPerService

    def test_oneServiceNoRoutes(self) -> None:
        config = self.fromFile(f'[services."users:v1"]\nupstreams = ["{URL}"]\n')
        self.assertEqual(config.routes, (RouteConfig("users:v1"),))
        self.assertEqual(config.services["users:v1"].name, "users:v1")


class RouteTests(ConfigTestCase):
    """C{[[routes]]}: the target, the conditions and rewrites of L{rproxy.proxy.directors.Route}, retries per route."""

    SERVICES = "".join(
        f'[services.{name}]\nupstreams = ["{URL}"]\n' for name in ("api", "web", "canary", '"users:v1"', '"users:v2"')
    )

    #: Routes to every service of L{SERVICES}, so that routes under test need not reach them all.
    EVERY_SERVICE = (
        "[[routes]]\nservice-version = true\n[[routes]]\nsplit = { services = { api = 1, web = 1, canary = 1 } }\n"
    )

    def routes(self, text: str) -> tuple[RouteConfig, ...]:
        """The routes C{text} defines, over L{SERVICES}."""
        return self.fromFile(self.SERVICES + text + self.EVERY_SERVICE).routes[:-2]

    def test_everyKey(self) -> None:
        [route] = self.routes(
            "[[routes]]\n"
            'service = "web"\nhosts = ["www.example", "*.example"]\npath-prefix = "/v1"\nreplace-prefix = "/api/v1"\n'
            'headers = { X-Env = "staging", X-Canary = true }\nquery = { debug = "1", trace = true }\n'
            'set-host = "web.internal:8080"\nset-headers = { X-Route = "web" }\n'
            'add-headers = { X-Tag = ["a", "b"], X-One = "c" }\nremove-headers = "X-Debug"\n'
        )
        self.assertEqual(
            route,
            RouteConfig(
                "web",
                hosts=("www.example", "*.example"),
                pathPrefix="/v1",
                headers={"X-Env": "staging", "X-Canary": None},
                query={"debug": "1", "trace": None},
                replacePrefix="/api/v1",
                setHost="web.internal:8080",
                setHeaders={"X-Route": "web"},
                addHeaders=(("X-Tag", "a"), ("X-Tag", "b"), ("X-One", "c")),
                removeHeaders=("X-Debug",),
            ),
        )

    def test_builtRoute(self) -> None:
        """A route's keys mean what L{rproxy.proxy.directors.Route}'s arguments mean."""
        [route] = self.routes(
            '[[routes]]\nservice = "web"\nhosts = "www.example"\npath-prefix = "/v1"\nreplace-prefix = "/api"\n'
            'headers = { X-Env = "staging" }\nset-host = "web.internal"\nset-headers = { X-Route = "web" }\n'
            'add-headers = { X-Tag = ["a", "b"] }\nremove-headers = ["X-Debug"]\n'
        )
        web = makeService("web")
        director = RoutingDirector([route.build({"web": web})])
        request = inboundRequest(
            b"/v1/x?q=1", headers=[(b"host", b"www.example"), (b"x-env", b"staging"), (b"x-debug", b"1")]
        )
        service, outbound = directRequest(director, request)
        self.assertIs(service, web)
        self.assertEqual((outbound.target, outbound.host), (b"/api/x?q=1", b"web.internal"))
        self.assertEqual(outbound.headers.getRawHeaders(b"x-tag"), [b"a", b"b"])
        self.assertEqual(outbound.headers.getRawHeaders(b"x-route"), [b"web"])
        self.assertFalse(outbound.headers.hasHeader(b"x-debug"))
        self.assertIsNone(directRequest(director, inboundRequest(b"/v1/x", headers=[(b"host", b"www.example")]))[0])

    def test_splits(self) -> None:
        weighted, blueGreen = self.routes(
            "[[routes]]\nhosts = 'w'\nsplit = { services = { web = 90, canary = 10 }, sticky = 'client_ip' }\n"
            "[[routes]]\nhosts = 'b'\n[routes.split]\nblue = 'web'\ngreen = 'canary'\nactive = 'green'\n"
        )
        self.assertEqual(weighted.target, WeightedSplitConfig((("web", 90), ("canary", 10)), sticky="client_ip"))
        self.assertEqual(blueGreen.target, BlueGreenConfig("web", "canary", "green"))
        web, canary = makeService("web"), makeService("canary")
        switch = blueGreen.build({"web": web, "canary": canary}).service
        assert isinstance(switch, BlueGreen)
        self.assertEqual((switch.blue, switch.green, switch.active), (web, canary, "green"))

    def test_serviceVersion(self) -> None:
        [route] = self.routes("[[routes]]\nservice-version = true\npath-prefix = '/svc'\nstrip-prefix = true\n")
        self.assertEqual(route, RouteConfig(ServiceVersionConfig(), pathPrefix="/svc", stripPrefix=True))
        services = {name: makeService(name) for name in ("api", "users:v1", "users:v2")}
        self.assertEqual(route.serviceNames(services), ("users:v1", "users:v2"))
        service, outbound = directRequest(RoutingDirector([route.build(services)]), inboundRequest(b"/svc/users/v2/x"))
        self.assertIs(service, services["users:v2"])
        self.assertEqual(outbound.target, b"/x")

    def test_retriesPerRoute(self) -> None:
        """A route's retry settings replace those of each service it sends to, for its requests only."""
        config = self.fromFile(
            "retries = 3\n"
            + self.SERVICES.replace("[services.web]\n", '[services.web]\nretry-on-status = "503"\n')
            + "[[routes]]\npath-prefix = '/reports'\nretries = 0\nretry-idempotency-key = true\n"
            + "split = { services = { web = 1, canary = 1 } }\n"
            + self.EVERY_SERVICE
        )
        route = config.routes[0]
        self.assertEqual(
            route.retry,
            {
                "web": RetryPolicy(retries=0, retryStatuses=frozenset({503}), idempotencyKey=True),
                "canary": RetryPolicy(retries=0, idempotencyKey=True),
            },
        )
        self.assertEqual(config.services["web"].retry, RetryPolicy(retries=3, retryStatuses=frozenset({503})))
        self.assertEqual(config.routes[1].retry, {})
        services = {name: makeService(name) for name in ("web", "canary")}
        split = route.build(services).service
        assert isinstance(split, WeightedSplit)
        self.assertEqual([(s.name, s.retry.retries) for s in split.services], [("web", 0), ("canary", 0)])
        self.assertEqual(services["web"].retry, RetryPolicy())  # the services themselves are unchanged


UPSTREAMS = 'upstreams = ["http://127.0.0.1:9001"]\n'
API = "[services.api]\n" + UPSTREAMS
TWO = API + "[services.web]\n" + UPSTREAMS


class ErrorTests(ConfigTestCase):
    """Every mistake stops rproxy with a message naming where the value was given and what is wrong."""

    CASES: list[tuple[str, list[str], str]] = [
        ("listen = [\n", [], "rproxy.toml: invalid TOML: Invalid value (at end of document)"),
        (
            'bogus-key = 1\nupstream = ["http://a:1"]\n',
            [],
            "rproxy.toml: unknown key 'bogus-key' (see docs/options.md)",
        ),
        ("services = 3\n", [], "rproxy.toml: services: expected tables such as [services.api], got 3"),
        ("services = { api = 3 }\n", [], "rproxy.toml: services.api: expected a table of settings, got 3"),
        (
            "routes = { a = 1 }\n[services.api]\n" + UPSTREAMS,
            [],
            "rproxy.toml: routes: expected [[routes]] tables, got {'a': 1}",
        ),
        (
            '[services."a b"]\n' + UPSTREAMS,
            [],
            'rproxy.toml: services."a b": a service\'s name is letters, digits and . _ ~ : - (from a letter or digit)',
        ),
        (
            "[services.api]\nretries = 1\n",
            [],
            'rproxy.toml: services.api: no upstreams (give upstreams = ["http://host:port", ...])',
        ),
        (
            '[services.api]\nupstreams = "http://a:1"\n',
            [],
            'rproxy.toml: services.api.upstreams: expected a list of upstream URLs, such as ["http://10.0.0.5:8080"]',
        ),
        (
            "[services.api]\nupstreams = [3]\n",
            [],
            "rproxy.toml: services.api.upstreams[0]: expected an upstream URL, got 3",
        ),
        (
            '[services.api]\nupstreams = ["http://a:1#weight=0"]\n',
            [],
            "rproxy.toml: services.api.upstreams[0]: upstream 'http://a:1#weight=0': weight must be from 1 to "
            "1000, not 0",
        ),
        (
            API + "retrys = 1\n",
            [],
            "rproxy.toml: services.api: unknown key 'retrys' (see docs/configuration.md: the keys of a service)",
        ),
        (
            '[services.api]\nupstreams = ["http://a:1#zone=a&zone=b"]\n',
            [],
            "rproxy.toml: services.api.upstreams[0]: upstream 'http://a:1#zone=a&zone=b': 'zone' is given twice",
        ),
        (
            '[services.api]\nupstreams = ["http://a:1#zone"]\n',
            [],
            "rproxy.toml: services.api.upstreams[0]: upstream 'http://a:1#zone': after '#', give name=value pairs "
            "joined by '&'",
        ),
        (
            '[services.api]\nupstream = "http://a:1"\n',
            [],
            "rproxy.toml: services.api: unknown key 'upstream': did you mean 'upstreams'?",
        ),
        (
            API + 'max-body-size = "1M"\n',
            [],
            "rproxy.toml: services.api: 'max-body-size' is a global option: set it at the top level of the file",
        ),
        (
            API + 'connect-timeout = "soon"\n',
            [],
            "rproxy.toml: services.api.connect-timeout: expected a number, got 'soon'",
        ),
        (
            API + "connect-timeout = true\n",
            [],
            "rproxy.toml: services.api.connect-timeout: expected a string or a number, got True",
        ),
        (
            API + 'rewrite-host = "yes"\n',
            [],
            "rproxy.toml: services.api.rewrite-host: expected true or false, got 'yes'",
        ),
        (API + "retries = [1]\n", [], "rproxy.toml: services.api.retries: expected one value, not a list"),
        (
            API + 'retry-on-status = "5xx"\n',
            [],
            "rproxy.toml: services.api.retry-on-status: expected statuses such as 502,503, got '5xx'",
        ),
        (
            API + 'retry-body-size = "lots"\n',
            [],
            "rproxy.toml: services.api.retry-body-size: not a size: 'lots' (examples: 1048576, 512k, 10M, 1G)",
        ),
        (
            API + "max-ejected-percent = 200\n",
            [],
            "rproxy.toml: services.api.max-ejected-percent: must be at most 100, got 200",
        ),
        (API + "fail-rate = 2\n", [], "rproxy.toml: services.api.fail-rate: must be a share from 0 to 1, got 2"),
        (
            API + "upstream-max-connections = 2.5\n",
            [],
            "rproxy.toml: services.api.upstream-max-connections: expected an integer, got '2.5'",
        ),
        (
            API + 'health-path = "/h"\nhealth-status = "2xx"\n',
            [],
            "rproxy.toml: services.api.health-status: health check status '2xx': '2xx' is not a status or a range "
            "of statuses like 200-399",
        ),
        (
            API + 'health-path = "h"\n',
            [],
            "rproxy.toml: services.api.health-path: health check path 'h' must start with '/' and be printable "
            "ASCII without spaces or '#' (percent-encode the rest)",
        ),
        (
            API + 'health-path = "/h"\nhealth-interval = 0\n',
            [],
            "rproxy.toml: services.api.health-interval: must be greater than 0, got 0.0",
        ),
        (
            API + 'balancer-options = "key=x"\n',
            [],
            "rproxy.toml: services.api.balancer-options: expected a table, got 'key=x'",
        ),
        (
            API + "balancer-options = { bogus = 1 }\n",
            [],
            "rproxy.toml: services.api.balancer-options: balancer round_robin: unknown option 'bogus' (its "
            "options: none)",
        ),
        (
            'balancer = "hash"\nbalancer-option = ["key=client_ip"]\n[services.api]\n'
            + UPSTREAMS
            + 'balancer = "p2c"\nbalancer-options = { key = "x" }\n',
            [],
            "rproxy.toml: services.api.balancer-options: balancer p2c: unknown option 'key' (its options: none)",
        ),
        ("retries = -1\n[services.api]\n" + UPSTREAMS, [], "rproxy.toml: retries: must not be negative, got -1"),
        (API, ["--retries", "-1"], "--retries: must not be negative, got -1"),
        (
            API + '[[routes]]\nhosts = "a"\n',
            [],
            "rproxy.toml: routes[0]: give one of service, split, service-version = true or local",
        ),
        (
            API + '[[routes]]\nservice = "api"\nservice-version = true\n',
            [],
            "rproxy.toml: routes[0]: give one of service, split, service-version = true or local, not service and "
            "service-version",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\n[[routes]]\nservice = "web"\n[[routes]]\nservice = "billing"\n',
            [],
            "rproxy.toml: routes[2].service: no service named 'billing' (services: api, web)",
        ),
        (TWO + "[[routes]]\nservice = 3\n", [], "rproxy.toml: routes[0].service: expected a string, got 3"),
        (
            TWO + '[[routes]]\nservice = "api"\nprefix = "/a"\n',
            [],
            "rproxy.toml: routes[0]: unknown key 'prefix' (see docs/configuration.md: the keys of a route)",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\npath_prefx = "/a"\n',
            [],
            "rproxy.toml: routes[0]: unknown key 'path_prefx': did you mean 'path-prefix'?",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nconnect-timeout = 1\n',
            [],
            "rproxy.toml: routes[0]: 'connect-timeout' is a service setting: set it in the service's table",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nlisten = "tcp:1"\n',
            [],
            "rproxy.toml: routes[0]: 'listen' is a global option: set it at the top level of the file",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nretries = -1\n[[routes]]\nservice="web"\n',
            [],
            "rproxy.toml: routes[0].retries: must not be negative, got -1",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nhosts = 3\n',
            [],
            "rproxy.toml: routes[0].hosts: expected a string or a list of strings, got 3",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nhosts = ["a", 3]\n',
            [],
            "rproxy.toml: routes[0].hosts[1]: expected a string, got 3",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nhosts = "a b"\n',
            [],
            "rproxy.toml: routes[0].hosts: host pattern 'a b': expected a host name (no port), an IP address, or "
            "'*.' and a domain",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\npath-prefix = "api"\n',
            [],
            "rproxy.toml: routes[0].path-prefix: path prefix 'api': expected visible ASCII starting with '/', "
            "without '?' or '#'",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\npath-prefix = "/a"\nstrip-prefix = true\nreplace-prefix = "/b"\n',
            [],
            "rproxy.toml: routes[0].strip-prefix: a route strips its prefix or replaces it, not both",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\npath-prefix = "/a"\nstrip-prefix = "yes"\n',
            [],
            "rproxy.toml: routes[0].strip-prefix: expected true or false, got 'yes'",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nheaders = ["X-A"]\n',
            [],
            "rproxy.toml: routes[0].headers: expected a table, got ['X-A']",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nheaders = { X-A = 3 }\n',
            [],
            "rproxy.toml: routes[0].headers.X-A: expected a string, or true for any value, got 3",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nheaders = { X-A = false }\n',
            [],
            "rproxy.toml: routes[0].headers.X-A: expected a string, or true for any value, got False",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nheaders = { "X A" = "1" }\n',
            [],
            "rproxy.toml: routes[0].headers: header name 'X A': not a field name",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nquery = { "a&b" = "1" }\n',
            [],
            "rproxy.toml: routes[0].query: query argument 'a&b': expected it as sent, visible ASCII without '&#?='",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nset-host = "a b"\n',
            [],
            "rproxy.toml: routes[0].set-host: setHost 'a b': expected a host name or IP address, and an optional port",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nset-headers = { Connection = "close" }\n',
            [],
            "rproxy.toml: routes[0].set-headers: header 'Connection': routes may not change connection or framing "
            "fields (set the Host with setHost)",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nadd-headers = { X-A = "a\\nb" }\n',
            [],
            "rproxy.toml: routes[0].add-headers: header 'X-A': its value 'a\\nb' has control characters (CR, LF, "
            "NUL, ...)",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\nremove-headers = { X-A = 1 }\n',
            [],
            "rproxy.toml: routes[0].remove-headers: expected a string or a list of strings, got {'X-A': 1}",
        ),
        (TWO + '[[routes]]\nsplit = "api"\n', [], "rproxy.toml: routes[0].split: expected a table, got 'api'"),
        (
            TWO + '[[routes]]\nsplit = { pin = "cookie:x" }\n',
            [],
            "rproxy.toml: routes[0].split: expected services = { NAME = WEIGHT, ... } (a weighted split), or blue "
            "and green (a switch)",
        ),
        (
            TWO + '[[routes]]\nsplit = { services = { api = 1 }, blue = "api" }\n',
            [],
            "rproxy.toml: routes[0].split: 'blue' is not a key of a weighted split (its keys: pin, services, sticky)",
        ),
        (
            TWO + '[[routes]]\nsplit = { services = { api = "1", web = 1 } }\n',
            [],
            "rproxy.toml: routes[0].split.services.api: expected a whole number (a weight), got '1'",
        ),
        (
            TWO + "[[routes]]\nsplit = { services = { api = 0, web = 0 } }\n",
            [],
            "rproxy.toml: routes[0].split.services: weights must be whole numbers from 0, not all 0: [0, 0]",
        ),
        (
            TWO + "[[routes]]\nsplit = { services = { api = -1, web = 1 } }\n",
            [],
            "rproxy.toml: routes[0].split.services: weights must be whole numbers from 0, not all 0: [-1, 1]",
        ),
        (
            TWO + "[[routes]]\nsplit = { services = { api = 1, billing = 1 } }\n",
            [],
            "rproxy.toml: routes[0].split.services.billing: no service named 'billing' (services: api, web)",
        ),
        (
            TWO + '[[routes]]\nsplit = { services = { api = 1, web = 1 }, pin = "nope" }\n',
            [],
            "rproxy.toml: routes[0].split.pin: expected client_ip, uri, header:NAME or cookie:NAME, got 'nope'",
        ),
        (
            TWO + "[[routes]]\nsplit = { services = { api = 1, web = 1 }, sticky = 3 }\n",
            [],
            "rproxy.toml: routes[0].split.sticky: expected a string, got 3",
        ),
        (
            TWO + '[[routes]]\nsplit = { blue = "api" }\n',
            [],
            "rproxy.toml: routes[0].split: a blue/green split needs blue and green (service names)",
        ),
        (
            TWO + '[[routes]]\nsplit = { blue = "api", green = "billing" }\n',
            [],
            "rproxy.toml: routes[0].split.green: no service named 'billing' (services: api, web)",
        ),
        (
            TWO + '[[routes]]\nsplit = { blue = "api", green = "web", active = "red" }\n',
            [],
            "rproxy.toml: routes[0].split.active: expected 'blue' or 'green', not 'red'",
        ),
        (
            TWO + '[[routes]]\nservice-version = true\n[[routes]]\nservice="api"\n[[routes]]\nservice="web"\n',
            [],
            "rproxy.toml: routes[0].service-version: no service is named NAME:VERSION, as the path /NAME/VERSION/ "
            'names it ([services."users:v1"])',
        ),
        (
            TWO + '[[routes]]\nservice-version = "yes"\n',
            [],
            "rproxy.toml: routes[0].service-version: expected true or false, got 'yes'",
        ),
        (
            TWO + '[[routes]]\nservice = "api"\n',
            [],
            "rproxy.toml: services.web: no route sends requests to the service 'web'",
        ),
        (TWO, [], "rproxy.toml: 2 services (api, web) but no [[routes]] to send requests to them"),
        (
            'upstream = ["http://a:1"]\n[services.default]\n' + UPSTREAMS,
            [],
            "rproxy.toml: services.default: the top-level upstreams (--upstream) are the service 'default' already",
        ),
        (
            API + '[[routes]]\nservice = "api"\n',
            ["--upstream", "http://a:1"],
            "--upstream: no route sends requests to the service 'default'",
        ),
        ("", [], "at least one --upstream URL is required (or --demo-upstream)"),
        (
            'upstream = ["http://a:1"]\nconnect-timeout = "soon"\n',
            [],
            "rproxy.toml: connect-timeout: expected a number, got 'soon'",
        ),
        (
            'upstream = ["http://a:1"]\nconnect-timeout = "soon"\n',
            ["--connect-timeout", "x"],
            "--connect-timeout: expected a number, got 'x'",
        ),
        (
            'upstream = ["http://a:1"]\nconnect-timeout = [1, 2]\n',
            [],
            "rproxy.toml: connect-timeout: expected one value, not a list",
        ),
        (
            'upstream = ["http://a:1"]\nrewrite-host = "yes"\n',
            [],
            "rproxy.toml: rewrite-host: expected true or false, got 'yes'",
        ),
        (
            'upstream = ["http://a:1"]\nconfig = "other.toml"\n',
            [],
            "rproxy.toml: unknown key 'config' (see docs/options.md)",
        ),
    ]

    def test_messages(self) -> None:
        for text, arguments, expected in self.CASES:
            self.assertEqual(self.error(text, *arguments), expected, text)

    def test_unknownBalancer(self) -> None:
        message = self.error(API + 'balancer = "nope"\n')
        self.assertTrue(message.startswith("rproxy.toml: services.api.balancer: unknown balancer 'nope'; installed: "))
        self.assertIn("round_robin", message)

    def test_unreadable(self) -> None:
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(UsageError, parse, "--config", path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")

    def test_configError(self) -> None:
        """The loader's errors are L{ConfigError}s (a C{ValueError}), naming the file."""
        path = writeConfig(self, "routes = 3\n")
        error = self.assertRaises(ConfigError, ConfigFile.load, path)
        self.assertEqual(str(error), f"{path}: routes: expected [[routes]] tables, got 3")


def answerWith(name: bytes) -> Callable[[object, ReceivedRequest], bytes]:
    """A L{ScriptedUpstream} answer: 200 with C{name} as the body."""

    def respond(proto: object, request: ReceivedRequest) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name)

    return respond


async def getMany(port: int, requests: list[bytes], connections: int = 20) -> list[bytes]:
    """
    Send C{requests} (each a request head without its final blank line) pipelined over C{connections}
    connections at once; the bodies of the responses, in the order of the requests.
    """
    batches = [requests[i::connections] for i in range(connections)]

    async def send(batch: list[bytes]) -> list[bytes]:
        payload = b"".join(head + b"\r\n" for head in batch[:-1]) + batch[-1] + b"Connection: close\r\n\r\n"
        responses = splitResponses(await rawRequest(port, payload, timeout=30))
        assert len(responses) == len(batch), (len(responses), len(batch))
        for head, _ in responses:
            assert head.startswith(b"HTTP/1.1 200 "), head
        return [body for _, body in responses]

    answers = await defer.gatherResults([defer.ensureDeferred(send(batch)) for batch in batches if batch])
    bodies: list[bytes] = [b""] * len(requests)
    for i, batch in enumerate(answers):
        bodies[i::connections] = batch
    return bodies


def get(target: bytes, host: bytes = b"www.example", *fields: bytes) -> bytes:
    """A GET request's head, without the blank line that ends it."""
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + b"".join(f + b"\r\n" for f in fields)


class EndToEndTests(unittest.TestCase):
    """A proxy built from a config file, in front of real upstreams, one or two per service."""

    timeout = 60

    def upstream(self, name: str) -> ScriptedUpstream:
        return ScriptedUpstream(self, answerWith(name.encode("ascii")))

    def proxy(self, text: str, *arguments: str) -> RunningProxy:
        return startProxy(self, [], "--config", writeConfig(self, text), *arguments)

    async def test_hostAndPathRoutes(self) -> None:
        """Each request reaches the service its host or path routes it to, rewritten as the route says."""
        shop, api = self.upstream("shop"), self.upstream("api")
        proxy = self.proxy(
            f'[services.shop]\nupstreams = ["{shop.url}"]\n'
            f'[services.api]\nupstreams = ["{api.url}"]\nrewrite-host = true\n'
            '[[routes]]\nhosts = ["shop.example", "*.shop.example"]\nservice = "shop"\n'
            '[[routes]]\npath-prefix = "/api"\nstrip-prefix = true\nset-headers = { X-Route = "api" }\nservice = '
            '"api"\n'
            '[[routes]]\nservice = "shop"\n'
        )
        bodies = await getMany(
            proxy.port,
            [
                get(b"/api/users?id=1"),
                get(b"/api/x", b"shop.example"),
                get(b"/other"),
                get(b"/api", b"eu.shop.example"),
            ],
            connections=1,
        )
        self.assertEqual(bodies, [b"api", b"shop", b"shop", b"shop"])
        [toApi] = api.requests
        self.assertEqual(toApi.requestLine, b"GET /users?id=1 HTTP/1.1")
        self.assertEqual(toApi.headers(b"host"), [f"127.0.0.1:{api.port}".encode()])
        self.assertEqual(toApi.headers(b"x-route"), [b"api"])
        self.assertEqual(
            [r.requestLine for r in shop.requests],
            [b"GET /api/x HTTP/1.1", b"GET /other HTTP/1.1", b"GET /api HTTP/1.1"],
        )
        self.assertEqual(shop.requests[1].headers(b"host"), [b"www.example"])
        self.assertEqual(shop.requests[0].headers(b"x-route"), [])

    async def test_canary(self) -> None:
        """
        A 90/10 split over 2,000 requests sends 90% of them to the first service, give or take 3 points: at
        p = 0.9 the share's standard deviation is 0.67 points, so the bound is 4.5 of them (a false failure
        about once in 150,000 runs).
        """
        web, canary = self.upstream("web"), self.upstream("canary")
        proxy = self.proxy(
            f'[services.web]\nupstreams = ["{web.url}"]\n[services.canary]\nupstreams = ["{canary.url}"]\n'
            "[[routes]]\nsplit = { services = { web = 90, canary = 10 } }\n"
        )
        counts = Counter(await getMany(proxy.port, [get(b"/page")] * 2000))
        self.assertEqual(sum(counts.values()), 2000)
        self.assertEqual((len(web.requests), len(canary.requests)), (counts[b"web"], counts[b"canary"]))
        self.assertLessEqual(abs(counts[b"web"] / 2000 - 0.9), 0.03, counts)

    async def test_pinnedABTest(self) -> None:
        """A cookie pins a request to its side of an A/B test, even a side of weight 0 (a dark launch)."""
        a, b = self.upstream("a"), self.upstream("b")
        proxy = self.proxy(
            f'[services.a]\nupstreams = ["{a.url}"]\n[services.b]\nupstreams = ["{b.url}"]\n'
            "[[routes]]\nhosts = 'ab.example'\nsplit = { services = { a = 50, b = 50 }, pin = 'cookie:variant' }\n"
            "[[routes]]\nhosts = 'dark.example'\nsplit = { services = { a = 1, b = 0 }, pin = 'cookie:variant' }\n"
        )
        pinned = [get(b"/", b"ab.example", b"Cookie: theme=dark; variant=" + side) for side in (b"a", b"b") * 20]
        self.assertEqual(await getMany(proxy.port, pinned, connections=4), [b"a", b"b"] * 20)
        unpinned = Counter(await getMany(proxy.port, [get(b"/", b"ab.example")] * 200, connections=4))
        self.assertEqual(set(unpinned), {b"a", b"b"})  # each side's chance of none is 2**-200
        dark = [get(b"/", b"dark.example"), get(b"/", b"dark.example", b"Cookie: variant=b")] * 10
        self.assertEqual(await getMany(proxy.port, dark, connections=2), [b"a", b"b"] * 10)

    async def test_retriesPerRoute(self) -> None:
        """A route without retries passes a retryable status on; its service, elsewhere, tries the next upstream."""
        failing = ScriptedUpstream(self, lambda p, r: b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        working = self.upstream("working")
        proxy = self.proxy(
            f'[services.api]\nupstreams = ["{failing.url}", "{working.url}"]\nbalancer = "first"\n'
            'retry-on-status = "503"\nmax-fails = 0\n'
            "[[routes]]\npath-prefix = '/once'\nretries = 0\nservice = 'api'\n"
            "[[routes]]\nservice = 'api'\n"
        )
        [(head, body)] = splitResponses(await rawRequest(proxy.port, get(b"/once") + b"Connection: close\r\n\r\n"))
        self.assertEqual((head.split(b" ")[1], body), (b"503", b"busy"))
        self.assertEqual(await getMany(proxy.port, [get(b"/twice")], connections=1), [b"working"])
        self.assertEqual([len(failing.requests), len(working.requests)], [2, 1])

    async def test_healthChecksPerService(self) -> None:
        """Each service's upstreams are checked at its own path; a service without a path is not checked."""
        checked, unchecked = self.upstream("checked"), self.upstream("unchecked")
        self.proxy(
            f'[services.checked]\nupstreams = ["{checked.url}"]\nhealth-path = "/ready?deep=1"\nhealth-interval = 0.1\n'
            f'[services.unchecked]\nupstreams = ["{unchecked.url}"]\n'
            "[[routes]]\nhosts = 'c'\nservice = 'checked'\n[[routes]]\nservice = 'unchecked'\n"
        )
        self.assertTrue(await waitFor(lambda: len(checked.requests) >= 3))
        self.assertEqual({r.requestLine for r in checked.requests}, {b"GET /ready?deep=1 HTTP/1.1"})
        self.assertTrue(all(r.headers(b"user-agent")[0].startswith(b"rproxy-health/") for r in checked.requests))
        self.assertEqual(unchecked.requests, [])


class CheckConfigTests(unittest.TestCase):
    """C{twist rproxy --check-config FILE}: builds all but the listeners, then says OK, or what is wrong."""

    timeout = 30

    async def twist(self, *arguments: str) -> tuple[int, str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
        out, err, code = await utils.getProcessOutputAndValue(
            os.path.join(BIN, "twist"), ["rproxy", *arguments], env=environ, path=ROOT
        )
        return code, out.decode(), err.decode()

    async def test_ok(self) -> None:
        path = writeConfig(
            self,
            'listen = ["tcp:0:interface=127.0.0.1"]\nhealth-path = "/healthz"\n'
            '[services.api]\nupstreams = ["http://127.0.0.1:1"]\n[services.web]\nupstreams = ["https://localhost"]\n'
            "[[routes]]\npath-prefix = '/api'\nservice = 'api'\n[[routes]]\nservice = 'web'\n",
        )
        code, out, err = await self.twist("--check-config", path)
        self.assertEqual((code, out, err), (0, f"{path}: OK (2 services, 2 routes)\n", ""))

    async def test_error(self) -> None:
        path = writeConfig(self, '[services.api]\nupstreams = ["http://127.0.0.1:1"]\nretries = -1\n')
        code, out, err = await self.twist("--check-config", path)
        self.assertEqual((code, out, err), (1, "", f"{path}: services.api.retries: must not be negative, got -1\n"))

    def test_inProcess(self) -> None:
        """The same, as L{Options} parses it: the message is printed, or ends the process alone."""
        path = writeConfig(self, f'upstream = ["{URL}"]\n')
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), self.assertRaises(SystemExit) as exited:
            Options().parseOptions(["--check-config", path, "--retries", "3"])
        self.assertEqual((exited.exception.code, printed.getvalue()), (0, f"{path}: OK (1 service, 1 route)\n"))
        for arguments, message in [
            (["--retries", "x"], "--retries: expected an integer, got 'x'"),
            (["--config", path], "--check-config: give the file to check there alone, without --config"),
        ]:
            with self.assertRaises(SystemExit) as exited:
                Options().parseOptions(["--check-config", path, *arguments])
            self.assertEqual(exited.exception.code, message)

    def test_checkConfig(self) -> None:
        """L{checkConfig} builds what it checks: an unbuildable config raises."""
        config = parse("--upstream", URL)
        self.assertEqual(checkConfig("f.toml", config), "f.toml: OK (1 service, 1 route)")
        broken = replace(config, services={"default": replace(config.services["default"], balancer="nope")})
        self.assertRaises(KeyError, checkConfig, "f.toml", broken)
