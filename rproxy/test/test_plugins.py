"""
Third-party balancers: the example package in docs/examples/rproxy-prefer-local, pip-installed into a
directory of its own (offline, with the build tools of this environment), is found by a real
``twist rproxy``, proxies requests, passes its own rproxy.testing tests, and loads from a read-only
directory where Twisted cannot write its ``dropin.cache``.
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

EXAMPLE = os.path.join(ROOT, "docs", "examples", "rproxy-prefer-local")
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


class ThirdPartyPluginTests(unittest.TestCase):
    timeout = 120

    async def install(self) -> str:
        """pip-install a copy of the example package into a new directory; return that directory."""
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "source")
        site = os.path.join(work, "site")
        shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "_trial*"))
        arguments = ["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        arguments += ["--no-cache-dir", "--disable-pip-version-check", "--target", site, source]
        out, err, code = await utils.getProcessOutputAndValue(PYTHON, arguments, env=os.environ, path=work)
        self.assertEqual(code, 0, f"pip install failed:\n{out.decode()}\n{err.decode()}")
        return site

    async def listBalancers(self, site: str, argv: list[str] | None = None) -> str:
        """The output of C{twist rproxy --list-balancers} with C{site} on the path; it must exit with 0."""
        command = argv or [TWIST, "rproxy", "--list-balancers"]
        out, err, code = await utils.getProcessOutputAndValue(command[0], command[1:], env=environment(site), path=ROOT)
        self.assertEqual(code, 0, f"{out.decode()}\n{err.decode()}")
        self.assertNotIn(b"Traceback", out + err)
        return out.decode()

    async def proxyThrough(self, site: str, argv: list[str], extra: Mapping[str, str] = {}) -> ProxyProcess:
        """
        Run C{argv} (a C{twist rproxy} in front of a scripted upstream, on a free port) with C{site} on the
        path, and proxy one request through it with curl.
        """
        upstream = ScriptedUpstream(self, echo)
        port = freePort()
        options = ["--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", upstream.url, "--access-log", "off"]
        process = ProxyProcess.spawn(self, [*argv, *options], {**environment(site), **extra})
        await waitUntilListening(self, process, port)
        code, out, err = await curl(["-s", "-i", f"http://127.0.0.1:{port}/via/plugin?x=1"], 10)
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), out)
        self.assertEqual(body, b"answered GET /via/plugin?x=1 HTTP/1.1")
        self.assertEqual(len(upstream.requests), 1)
        self.assertNotIn("Traceback", process.log)
        return process

    async def test_installedAndListed(self) -> None:
        """
        The package installs only its plugin module (no rproxy/__init__.py to shadow rproxy), and
        C{--list-balancers} shows it beside the built-in ones; Twisted caches what it found.
        """
        site = await self.install()
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
        site = await self.install()
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
        site = await self.install()
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
        site = await self.install()
        tests = os.path.abspath(self.mktemp())
        shutil.copytree(os.path.join(EXAMPLE, "tests"), tests)
        trial = os.path.join(BIN, "trial")
        out, err, code = await utils.getProcessOutputAndValue(
            trial, [os.path.join(tests, "test_prefer_local.py")], env=environment(site), path=tests
        )
        self.assertEqual(code, 0, f"{out.decode()}\n{err.decode()}")
        self.assertIn(b"PASSED (successes=11)", out)
