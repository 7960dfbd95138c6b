"""
Third-party plugins, pip-installed into a directory of their own (offline, with the build tools of this
environment) and found by a real ``twist rproxy``: the balancer of docs/examples/rproxy-prefer-local
proxies requests, passes its own rproxy.testing tests, and loads from a read-only directory where Twisted
cannot write its ``dropin.cache``; the filter of docs/examples/rproxy-api-key is listed, guards a route
of a config file, has its options checked by ``--check-config``, and passes its own tests.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping

from twisted.internet import utils
from twisted.trial import unittest

from rproxy.test.support import BIN, PYTHON, ReceivedRequest, ScriptedUpstream, curl
from rproxy.test.test_drain import ROOT, ProxyProcess, freePort, waitUntilListening

PREFER_LOCAL = os.path.join(ROOT, "docs", "examples", "rproxy-prefer-local")
API_KEY = os.path.join(ROOT, "docs", "examples", "rproxy-api-key")
TWIST = os.path.join(BIN, "twist")

#: Run as a child's first step when the tests run as root, whom file modes do not stop: drop
#: CAP_DAC_OVERRIDE from the capability bounding set, then exec the command, which keeps uid 0 but must
#: obey the modes of the files it writes (prctl 24 is PR_CAPBSET_DROP; capability 1 is CAP_DAC_OVERRIDE).
OBEY_FILE_MODES = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:
    sys.exit(f"cannot drop CAP_DAC_OVERRIDE (errno {ctypes.get_errno()}), so root could write anywhere")
os.execv(sys.argv[1], sys.argv[1:])
"""


def echo(proto: object, request: ReceivedRequest) -> bytes:
    body = b"answered " + request.requestLine
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def environment(site: str) -> dict[str, str]:
    """This environment, with C{site} (where the example is installed) first on the Python path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    return env


def obeyingModes(argv: list[str]) -> list[str]:
    """C{argv}, run so that a read-only directory is read-only to it even as root."""
    if os.geteuid() != 0:
        return argv
    return [PYTHON, "-c", OBEY_FILE_MODES, *argv]


def makeReadOnly(testCase: unittest.TestCase, directory: str) -> None:
    """Take write permission off C{directory} and what it holds, until the test ends."""
    modes: dict[str, int] = {}
    for parent, _, files in os.walk(directory):
        for path in [parent, *(os.path.join(parent, name) for name in files)]:
            modes[path] = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(path, modes[path] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    def restore() -> None:  # or trial cannot remove its _trial_temp on the next run
        for path, mode in modes.items():
            os.chmod(path, mode)

    testCase.addCleanup(restore)


class InstalledPluginTests(unittest.TestCase):
    """What the tests of an installed example package run: pip, C{twist rproxy}, curl, trial."""

    timeout = 120

    async def install(self, example: str) -> str:
        """pip-install a copy of the C{example} package into a new directory; return that directory."""
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "source")
        site = os.path.join(work, "site")
        shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "_trial*"))
        arguments = ["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        arguments += ["--no-cache-dir", "--disable-pip-version-check", "--target", site, source]
        out, err, code = await utils.getProcessOutputAndValue(PYTHON, arguments, env=os.environ, path=work)
        self.assertEqual(code, 0, f"pip install failed:\n{out.decode()}\n{err.decode()}")
        return site

    async def listed(self, site: str, argv: list[str]) -> str:
        """The output of C{argv} (C{twist rproxy --list-...}) with C{site} on the path; it must exit with 0."""
        out, err, code = await utils.getProcessOutputAndValue(argv[0], argv[1:], env=environment(site), path=ROOT)
        self.assertEqual(code, 0, f"{out.decode()}\n{err.decode()}")
        self.assertNotIn(b"Traceback", out + err)
        return out.decode()

    async def runTwist(
        self, site: str, argv: list[str], extra: Mapping[str, str] = {}
    ) -> tuple[ProxyProcess, int, ScriptedUpstream]:
        """
        Run C{argv} (a C{twist rproxy}) with C{site} on the path, in front of a scripted upstream (the
        C{--upstream}), on a free port; return it once it listens, its port, and the upstream.
        """
        upstream = ScriptedUpstream(self, echo)
        port = freePort()
        options = ["--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", upstream.url, "--access-log", "off"]
        process = ProxyProcess.spawn(self, [*argv, *options], {**environment(site), **extra})
        await waitUntilListening(self, process, port)
        return process, port, upstream

    async def get(self, port: int, *arguments: str) -> tuple[bytes, bytes]:
        """The response head and body of C{GET /via/plugin?x=1} through the proxy, with curl's C{arguments}."""
        code, out, err = await curl(["-s", "-i", *arguments, f"http://127.0.0.1:{port}/via/plugin?x=1"], 10)
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        return head, body

    async def proxyThrough(self, site: str, argv: list[str], extra: Mapping[str, str] = {}) -> ProxyProcess:
        """Run C{argv} as L{runTwist} does, and proxy one request through it."""
        process, port, upstream = await self.runTwist(site, argv, extra)
        head, body = await self.get(port)
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head + body)
        self.assertEqual(body, b"answered GET /via/plugin?x=1 HTTP/1.1")
        self.assertEqual(len(upstream.requests), 1)
        self.assertNotIn("Traceback", process.log)
        return process

    async def exampleTests(self, example: str, test: str, successes: int) -> None:
        """The C{test} file of C{example} passes C{successes} tests with trial against the installed package."""
        site = await self.install(example)
        tests = os.path.abspath(self.mktemp())
        shutil.copytree(os.path.join(example, "tests"), tests)
        trial = os.path.join(BIN, "trial")
        out, err, code = await utils.getProcessOutputAndValue(
            trial, [os.path.join(tests, test)], env=environment(site), path=tests
        )
        self.assertEqual(code, 0, f"{out.decode()}\n{err.decode()}")
        self.assertIn(b"PASSED (successes=%d)" % successes, out)


class ThirdPartyPluginTests(InstalledPluginTests):
    """The balancer of docs/examples/rproxy-prefer-local."""

    async def listBalancers(self, site: str, argv: list[str] | None = None) -> str:
        """The output of C{twist rproxy --list-balancers} with C{site} on the path."""
        return await self.listed(site, argv or [TWIST, "rproxy", "--list-balancers"])

    async def test_installedAndListed(self) -> None:
        """
        The package installs only its plugin module (no rproxy/__init__.py to shadow rproxy), and
        C{--list-balancers} shows it beside the built-in ones; Twisted caches what it found.
        """
        site = await self.install(PREFER_LOCAL)
        self.assertEqual(sorted(os.listdir(os.path.join(site, "rproxy"))), ["plugins"])
        plugins = os.path.join(site, "rproxy", "plugins")
        self.assertFalse(os.path.exists(os.path.join(plugins, "__init__.py")))
        self.assertTrue(os.path.exists(os.path.join(plugins, "prefer_local.py")))
        listed = await self.listBalancers(site)
        names = [line.split()[0] for line in listed.splitlines() if line.strip()]
        self.assertIn("prefer_local", names)
        self.assertIn("round_robin", names)
        self.assertIn("local upstreams", listed)
        self.assertTrue(os.path.exists(os.path.join(plugins, "dropin.cache")))
        self.assertNotIn("prefer_local", await self.listBalancers(os.path.abspath(self.mktemp())))

    async def test_proxies(self) -> None:
        """C{twist rproxy --balancer prefer_local} runs and proxies through the plugin's balancer."""
        site = await self.install(PREFER_LOCAL)
        await self.proxyThrough(site, [TWIST, "rproxy", "--balancer", "prefer_local"])

    async def test_unknownWithoutThePackage(self) -> None:
        """Without the package on the path, the name is an error that lists what is installed."""
        argv = [TWIST, "rproxy", "--upstream", "http://127.0.0.1:1", "--balancer", "prefer_local"]
        out, err, code = await utils.getProcessOutputAndValue(argv[0], argv[1:], env=os.environ, path=ROOT)
        self.assertNotEqual(code, 0)
        self.assertIn(b"prefer_local", out + err)
        self.assertIn(b"round_robin", out + err)

    async def test_readOnlyPluginDirectory(self) -> None:
        """
        Installed where the proxy may not write, the plugin still loads: Twisted's getCache logs that it
        cannot write dropin.cache and goes on with what it found.
        """
        site = await self.install(PREFER_LOCAL)
        plugins = os.path.join(site, "rproxy", "plugins")
        makeReadOnly(self, site)
        cache = os.path.join(plugins, "dropin.cache")
        self.assertFalse(os.path.exists(cache))

        listed = await self.listBalancers(site, obeyingModes([TWIST, "rproxy", "--list-balancers"]))
        self.assertIn("prefer_local", listed)
        await self.proxyThrough(site, obeyingModes([TWIST, "rproxy", "--balancer", "prefer_local"]))
        written = [name for name in os.listdir(plugins) if name.startswith("dropin.cache")]
        self.assertEqual(written, [], "the directory was not read-only to the proxy: the test proved nothing")

    async def test_exampleTests(self) -> None:
        """The example's own tests, written with rproxy.testing, pass against the installed package."""
        await self.exampleTests(PREFER_LOCAL, "test_prefer_local.py", 11)


#: A key of L{KEYS_FILE}, labelled C{ci}.
GOOD_KEY = "ci-4b1d9e7a2c5f8e30"

#: The api-key filter's keys file in L{FILTER_CONFIG}.
KEYS_FILE = f"# label:key\nci:{GOOD_KEY}\n"

#: A config file whose one route, to the service of C{--upstream}, goes through the api-key filter.
FILTER_CONFIG = """
[filters.keys]
type = "api-key"
keys-file = "api-keys.txt"

[[routes]]
service = "default"
filters = ["keys"]
"""


class ThirdPartyFilterTests(InstalledPluginTests):
    """The filter of docs/examples/rproxy-api-key, in a config file."""

    def configFile(self, content: str) -> str:
        """A new directory with C{rproxy.toml} holding C{content}, and the keys file; the config file's path."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        with open(os.path.join(directory, "api-keys.txt"), "w", encoding="utf-8") as f:
            f.write(KEYS_FILE)
        path = os.path.join(directory, "rproxy.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        return path

    async def test_installedAndListed(self) -> None:
        """The package installs only its plugin module, and C{--list-filters} shows the kind it adds."""
        site = await self.install(API_KEY)
        self.assertEqual(os.listdir(os.path.join(site, "rproxy")), ["plugins"])
        plugins = os.path.join(site, "rproxy", "plugins")
        self.assertFalse(os.path.exists(os.path.join(plugins, "__init__.py")))
        self.assertTrue(os.path.exists(os.path.join(plugins, "api_key.py")))
        listed = await self.listed(site, [TWIST, "rproxy", "--list-filters"])
        kinds = {line.split()[0]: line for line in listed.splitlines() if line.strip()}
        self.assertIn("X-Api-Key header", kinds.get("api-key", ""))
        without = await self.listed(os.path.abspath(self.mktemp()), [TWIST, "rproxy", "--list-filters"])
        self.assertNotIn("api-key", without)

    async def test_guardsRoute(self) -> None:
        """
        A real C{twist rproxy} with a config file's C{[filters.keys]}: a request with a good key reaches the
        upstream without the key; one without gets 401, one with a wrong key 403, and neither reaches it.
        """
        site = await self.install(API_KEY)
        config = self.configFile(FILTER_CONFIG)
        process, port, upstream = await self.runTwist(site, [TWIST, "rproxy", "--config", config])

        head, body = await self.get(port, "-H", f"X-Api-Key: {GOOD_KEY}", "-H", "X-Other: kept")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head + body)
        self.assertEqual(body, b"answered GET /via/plugin?x=1 HTTP/1.1")
        [received] = upstream.requests
        self.assertEqual(received.headers(b"x-api-key"), [])
        self.assertEqual(received.headers(b"x-other"), [b"kept"])

        head, body = await self.get(port)
        self.assertTrue(head.startswith(b"HTTP/1.1 401"), head + body)
        self.assertIn(b'\r\nWWW-Authenticate: ApiKey header="X-Api-Key"', head)
        head, body = await self.get(port, "-H", f"X-Api-Key: {GOOD_KEY[:-1]}")
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head + body)
        self.assertNotIn(GOOD_KEY[:-1].encode(), head + body)
        self.assertEqual(len(upstream.requests), 1)
        self.assertNotIn("Traceback", process.log)

    async def test_checkConfig(self) -> None:
        """
        C{--check-config} builds the filter: the file passes with its keys file beside it, and a missing
        option of the plugin is one line naming the table and the option.
        """
        site = await self.install(API_KEY)
        checks = []
        for content in (FILTER_CONFIG, FILTER_CONFIG.replace('keys-file = "api-keys.txt"\n', "")):
            path = self.configFile(content)
            argv = [TWIST, "rproxy", "--check-config", path, "--upstream", "http://127.0.0.1:1"]
            checks.append(utils.getProcessOutputAndValue(argv[0], argv[1:], env=environment(site), path=ROOT))
        (okOut, okErr, okCode), (out, err, code) = [await check for check in checks]
        self.assertEqual((okCode, okErr), (0, b""), okOut)
        self.assertIn(b": OK (1 service, 1 route)", okOut)
        self.assertEqual(code, 1, out + err)
        [line] = (out + err).decode().splitlines()
        self.assertTrue(
            line.endswith(
                "rproxy.toml: filters.keys: filter api-key: option keys-file: required: "
                "the file of API keys, one per line"
            ),
            line,
        )

    async def test_exampleTests(self) -> None:
        """The example's own tests, written with rproxy.testing, pass against the installed package."""
        await self.exampleTests(API_KEY, "test_api_key.py", 11)
