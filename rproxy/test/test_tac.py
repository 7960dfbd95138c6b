"""
``twistd -n --pidfile= -y rproxy.tac``, configured from ``RPROXY_*`` variables or an ``RPROXY_CONFIG``
TOML file, and the error messages of those configuration sources.
"""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.python.usage import UsageError
from twisted.trial import unittest

from rproxy.app.config import ConfigFile, argumentsFromMapping
from rproxy.app.tap import Options, fileOptionNames, optionsFromEnvironment
from rproxy.test.support import BIN, ReceivedRequest, ScriptedUpstream, curl
from rproxy.test.test_drain import (
    ProxyProcess,
    assertCleanExit,
    freePort,
    waitUntilListening,
)


def echo(proto: object, request: ReceivedRequest) -> bytes:
    """Answer with the request line the upstream received."""
    body = request.requestLine
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class TacTests(unittest.TestCase):
    """rproxy.tac under twistd, as systemd would run it."""

    timeout = 30

    async def runTac(self, environ: dict[str, str], port: int, upstream: ScriptedUpstream) -> None:
        """Start the tac, proxy one request through it with curl, then stop it with SIGTERM."""
        argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "-y", "rproxy.tac"]
        process = ProxyProcess.spawn(self, argv, environ)
        await waitUntilListening(self, process, port)

        code, out, err = await curl(["-s", "-i", f"http://127.0.0.1:{port}/through/the/tac?x=1"], 10)
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), out)
        self.assertEqual(body, b"GET /through/the/tac?x=1 HTTP/1.1")
        self.assertEqual(len(upstream.requests), 1)

        terminatedAt = process.terminate()
        exitedAt = await process.waitForExit(self, 10.0)
        assertCleanExit(self, process)
        self.assertLess(exitedAt - terminatedAt, 5.0)
        self.assertNotIn("Traceback", process.log)

    async def test_environment(self) -> None:
        """C{RPROXY_LISTEN}, C{RPROXY_UPSTREAM} and C{RPROXY_ACCESS_LOG} configure the tac."""
        upstream = ScriptedUpstream(self, echo)
        port = freePort()
        environ = {
            "RPROXY_LISTEN": f"tcp:{port}:interface=127.0.0.1",
            "RPROXY_UPSTREAM": upstream.url,
            "RPROXY_ACCESS_LOG": "off",
        }
        await self.runTac(environ, port, upstream)

    async def test_configFile(self) -> None:
        """C{RPROXY_CONFIG} names a TOML file whose keys are the options' long names."""
        upstream = ScriptedUpstream(self, echo)
        port = freePort()
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(
                f'upstream = ["{upstream.url}"]\n'
                f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
                "connect-timeout = 2\n"
                'access-log = "off"\n'
                'via-name = "from-toml"\n'
            )
        await self.runTac({"RPROXY_CONFIG": os.path.abspath(path)}, port, upstream)
        self.assertEqual(upstream.requests[0].headers(b"via"), [b"1.1 from-toml"])


class EnvironmentOptionsTests(unittest.TestCase):
    """L{optionsFromEnvironment}: what the tac reads."""

    def tomlFile(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def usageError(self, environ: dict[str, str]) -> str:
        """The message of the L{usage.UsageError} that C{environ} causes."""
        with self.assertRaises(usage.UsageError) as caught:
            optionsFromEnvironment(environ)
        return str(caught.exception)

    def test_variables(self) -> None:
        """Repeatable options are whitespace-separated lists; flags take 1/true/yes."""
        config = optionsFromEnvironment(
            {
                "RPROXY_UPSTREAM": "http://127.0.0.1:9001  http://127.0.0.1:9002/base",
                "RPROXY_LISTEN": "tcp:8081 tcp:8082",
                "RPROXY_CONNECT_TIMEOUT": "3",
                "RPROXY_UPSTREAM_MAX_IDLE": "7",
                "RPROXY_REWRITE_HOST": "yes",
                "RPROXY_ACCESS_LOG": "off",
                "UNRELATED": "ignored",
            }
        ).config
        default = config.services["default"]
        self.assertEqual(default.upstreams, ("http://127.0.0.1:9001", "http://127.0.0.1:9002/base"))
        self.assertEqual(config.listen, ("tcp:8081", "tcp:8082"))
        self.assertEqual(default.pool.connectTimeout, 3.0)
        self.assertEqual(default.pool.maxIdle, 7)
        self.assertTrue(default.rewriteHost)
        self.assertIsNone(config.accessLog)

    def test_flagOff(self) -> None:
        """A flag variable that is not 1/true/yes leaves the flag unset."""
        config = optionsFromEnvironment({"RPROXY_UPSTREAM": "http://127.0.0.1:9001", "RPROXY_REWRITE_HOST": "0"}).config
        self.assertFalse(config.services["default"].rewriteHost)

    def test_configFile(self) -> None:
        """C{RPROXY_CONFIG}: the file's settings apply; other variables override its scalars."""
        path = self.tomlFile(
            'upstream = ["http://127.0.0.1:9001"]\n'
            'listen = ["tcp:8081"]\n'
            "connect-timeout = 2\n"
            "read-timeout = 4.5\n"
            "rewrite-host = true\n"
        )
        config = optionsFromEnvironment({"RPROXY_CONFIG": path, "RPROXY_READ_TIMEOUT": "9"}).config
        default = config.services["default"]
        self.assertEqual(default.upstreams, ("http://127.0.0.1:9001",))
        self.assertEqual(config.listen, ("tcp:8081",))
        self.assertEqual(default.pool.connectTimeout, 2.0)
        self.assertEqual(default.pool.readTimeout, 9.0)
        self.assertTrue(default.rewriteHost)

    def test_badTomlNamesFile(self) -> None:
        """A file that is not valid TOML: the error names the file."""
        path = self.tomlFile('upstream = ["http://127.0.0.1:9001"\nlisten = \n')
        message = self.usageError({"RPROXY_CONFIG": path})
        self.assertIn(path, message)
        self.assertIn("invalid TOML", message)

    def test_missingFileNamesFile(self) -> None:
        """A config file that cannot be read: the error names the file."""
        path = os.path.abspath(self.mktemp() + ".toml")
        message = self.usageError({"RPROXY_CONFIG": path})
        self.assertIn(path, message)
        self.assertIn("cannot read", message)

    def test_badValueNamesOption(self) -> None:
        """A variable that is not a number: the error names the option."""
        message = self.usageError({"RPROXY_UPSTREAM": "http://127.0.0.1:9001", "RPROXY_CONNECT_TIMEOUT": "soon"})
        self.assertIn("connect-timeout", message)

    def test_badIntegerNamesOption(self) -> None:
        """A variable that is not an integer: the error names the option."""
        message = self.usageError(
            {"RPROXY_UPSTREAM": "http://127.0.0.1:9001", "RPROXY_UPSTREAM_MAX_CONNECTIONS": "many"}
        )
        self.assertIn("upstream-max-connections", message)

    def test_outOfRangeValueNamesOption(self) -> None:
        """A number out of range: the error names the option."""
        message = self.usageError({"RPROXY_UPSTREAM": "http://127.0.0.1:9001", "RPROXY_CONNECT_TIMEOUT": "-1"})
        self.assertIn("--connect-timeout", message)

    def test_badSizeNamesOption(self) -> None:
        message = self.usageError({"RPROXY_UPSTREAM": "http://127.0.0.1:9001", "RPROXY_MAX_BODY_SIZE": "lots"})
        self.assertIn("--max-body-size", message)

    def test_badUpstreamNamesOption(self) -> None:
        message = self.usageError({"RPROXY_UPSTREAM": "ftp://127.0.0.1:9001"})
        self.assertIn("--upstream", message)
        self.assertIn("ftp://127.0.0.1:9001", message)

    def test_badValueInFileNamesOption(self) -> None:
        """A value in the file that is not a number: the error names the option."""
        path = self.tomlFile('upstream = ["http://127.0.0.1:9001"]\nconnect-timeout = "soon"\n')
        message = self.usageError({"RPROXY_CONFIG": path})
        self.assertIn("connect-timeout", message)

    def test_unknownKeyInFileNamesIt(self) -> None:
        path = self.tomlFile('upstream = ["http://127.0.0.1:9001"]\nconect-timeout = 2\n')
        message = self.usageError({"RPROXY_CONFIG": path})
        self.assertIn("conect-timeout", message)
        self.assertIn(path, message)


def argumentsFromFile(path: str) -> list[str]:
    """The command-line arguments the top level of the config file C{path} stands for."""
    return argumentsFromMapping(ConfigFile.load(path).options, path, *fileOptionNames())


class ArgumentsFromFileTests(unittest.TestCase):
    """A TOML file's top level as command-line arguments, errors naming file and key."""

    def tomlFile(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_arguments(self) -> None:
        """Lists repeat the option, true sets a flag, false leaves it out, numbers become text."""
        path = self.tomlFile(
            'upstream = ["http://a:1", "http://b:2"]\n'
            "connect-timeout = 2\n"
            "grace = 1.5\n"
            "rewrite-host = true\n"
            "version = false\n"
        )
        self.assertEqual(
            argumentsFromFile(path),
            [
                "--upstream",
                "http://a:1",
                "--upstream",
                "http://b:2",
                "--connect-timeout",
                "2",
                "--grace",
                "1.5",
                "--rewrite-host",
            ],
        )

    def test_invalidToml(self) -> None:
        path = self.tomlFile("listen = [\n")
        with self.assertRaises(ValueError) as caught:
            argumentsFromFile(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("invalid TOML", str(caught.exception))

    def test_unreadable(self) -> None:
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)  # a directory: open() fails
        with self.assertRaises(ValueError) as caught:
            argumentsFromFile(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("cannot read", str(caught.exception))

    def test_unsupportedValueNamesFileAndKey(self) -> None:
        """A table where a value belongs: the error names the file and the key."""
        path = self.tomlFile("[grace]\nseconds = 3\n")
        with self.assertRaises(ValueError) as caught:
            argumentsFromFile(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("grace", str(caught.exception))


class CommandLineConfigTests(unittest.TestCase):
    """--config in every form getopt accepts loads the file; flags given after it override it."""

    def test_configForms(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('upstream = ["http://127.0.0.1:9001"]\nconnect-timeout = 2\n')
        for arguments in (["-c", path], ["-c" + path], ["--config", path], ["--conf=" + path], ["--config=" + path]):
            options = Options()
            options.parseOptions(arguments)
            default = options.config.services["default"]
            self.assertEqual(default.upstreams, ("http://127.0.0.1:9001",), arguments)
            self.assertEqual(default.pool.connectTimeout, 2.0, arguments)
        options = Options()
        options.parseOptions(["-c", path, "--connect-timeout", "3"])
        self.assertEqual(options.config.services["default"].pool.connectTimeout, 3.0)

    def test_viaNameMustBeToken(self) -> None:
        options = Options()
        error = self.assertRaises(
            UsageError, options.parseOptions, ["--upstream", "http://127.0.0.1:1", "--via-name", "my proxy"]
        )
        self.assertIn("--via-name", str(error))


class BalancingOptionsTests(unittest.TestCase):
    """The balancing, retry and passive health options: what they build, and errors naming them."""

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--upstream", "http://127.0.0.1:1", *arguments])
        return options

    def error(self, *arguments: str) -> str:
        return str(self.assertRaises(UsageError, self.parse, *arguments))

    def test_built(self) -> None:
        config = self.parse(
            "--upstream",
            "http://127.0.0.1:2/base#weight=3",
            "--retries",
            "4",
            "--try-duration",
            "2.5",
            "--retry-on-status",
            "502, 503",
            "--retry-body-size",
            "1M",
            "--retry-idempotency-key",
            "--max-fails",
            "0",
            "--fail-rate",
            "0.25",
            "--max-ejected-percent",
            "30",
            "--slow-start",
            "20",
        ).config.services["default"]
        self.assertEqual(config.upstreams, ("http://127.0.0.1:1", "http://127.0.0.1:2/base#weight=3"))
        self.assertEqual(
            (config.retry.retries, config.retry.tryDuration, config.retry.retryStatuses, config.retry.replayBodySize),
            (4, 2.5, frozenset({502, 503}), 1 << 20),
        )
        self.assertTrue(config.retry.idempotencyKey)
        self.assertEqual(
            (config.passive.maxFails, config.passive.failureRate, config.passive.maxEjectedShare),
            (0, 0.25, 0.3),
        )
        self.assertEqual(config.passive.slowStart, 20)

    def test_weightApplied(self) -> None:
        from twisted.internet.task import Clock

        from rproxy.app.build import buildSite

        config = self.parse("--upstream", "http://127.0.0.1:2/base#weight=3").config
        _, upstreams = buildSite(config, Clock())
        self.assertEqual(
            [(u.key, u.configuredWeight) for u in upstreams],
            [
                ("http://127.0.0.1:1", 1),
                ("http://127.0.0.1:2/base", 3),
            ],
        )

    def test_errors(self) -> None:
        cases = [
            (("--upstream", "http://127.0.0.1:2#weight=0"), "weight must be from 1 to 1000"),
            (("--upstream", "http://127.0.0.1:2#weight=x"), "weight must be a whole number"),
            (("--upstream", "http://127.0.0.1:2#Zone=a"), "label 'Zone': a name is a lower-case letter"),
            (("--retry-on-status", "502,700"), "--retry-on-status: expected statuses"),
            (("--retries", "-1"), "--retries: must not be negative"),
            (("--fail-rate", "2"), "--fail-rate: must be a share from 0 to 1"),
            (("--max-ejected-percent", "101"), "--max-ejected-percent: must be at most 100"),
            (("--balancer-option", "novalue"), "--balancer-option: expected KEY=VALUE"),
            (("--balancer-option", "bogus=1"), "--balancer-option: "),
            (("--balancer", "nope"), "--balancer: unknown balancer 'nope'; installed: "),
        ]
        for arguments, expected in cases:
            self.assertIn(expected, self.error(*arguments), arguments)

    def test_healthCheckService(self) -> None:
        """--health-path adds a health checker to the service tree; without it there is none."""
        from twisted.internet.task import Clock

        from rproxy.app.tap import buildService
        from rproxy.health.checks import HealthChecker

        def checkers(*arguments: str) -> list[object]:
            top = buildService(self.parse(*arguments).config, Clock())
            return [s for s in top if isinstance(s, HealthChecker)]

        self.assertEqual(checkers(), [])
        [checker] = checkers("--health-path", "/healthz", "--health-interval", "2", "--health-fall", "1")
        config = self.parse("--health-path", "/healthz", "--health-interval", "2", "--health-fall", "1").config
        check = config.services["default"].healthCheck
        assert check is not None
        self.assertEqual((check.path, check.interval), ("/healthz", 2.0))
        self.assertEqual((check.rise, check.fall), (2, 1))

    def test_healthCheckErrorsNameOption(self) -> None:
        for arguments, expected in [
            (("--health-path", "/h", "--health-status", "2xx"), "--health-status: "),
            (("--health-path", "/h", "--health-method", "POST"), "--health-method: "),
            (("--health-path", "nopath"), "--health-path: "),
            (("--health-path", "/h", "--health-interval", "0"), "--health-interval: must be greater than 0"),
        ]:
            self.assertIn(expected, self.error(*arguments), arguments)
