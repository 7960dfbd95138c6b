"""
What an idle rproxy holds: the resident memory of a real ``twist rproxy`` process once it listens, and the
modules a configuration imports.

A configuration imports what it uses, when it uses it: a filter kind's module and its libraries (bcrypt,
PyJWT, brotli, ...) when a filter of that kind is built, prometheus_client when metrics are served.  The
figures, and what Twisted itself costs, are in docs/operations.md ("Memory").
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import utils
from twisted.trial import unittest

from rproxy.test.support import PYTHON, ROOT, sleep
from rproxy.test.test_drain import ProxyProcess, freePort, waitUntilListening

MiB = 1 << 20

#: The most an idle worker with the default configuration may hold (VmRSS): 56.8 MiB measured on the newest
#: dependencies, 57.6 on the oldest, and up to half a MiB more in a fresh clone (61.7-62.1 before imports were
#: made lazy); the bound catches a regression of a megabyte or two.  Not the 45 MiB aimed at: Twisted's reactor
#: alone imports pyOpenSSL and cryptography (about 13 MiB), asyncio and urllib.request, and twisted.web h2;
#: with ``twist`` and twisted.web that is 52.7 MiB before any of rproxy (docs/operations.md, "Memory").
DEFAULT_LIMIT = 59 * MiB

#: The most an idle worker may hold with L{FILTERS_CONFIG}'s filters (their libraries: passlib, PyJWT, brotli,
#: zstandard) and a metrics listener (prometheus_client): 61.3-61.5 MiB measured.
FILTERS_LIMIT = 64 * MiB

#: Optional libraries (and rproxy modules that import them) the default configuration does not need.
OPTIONAL_MODULES = (
    "brotli",
    "jwt",
    "multipart",
    "opentelemetry",
    "passlib",
    "prometheus_client",
    "treq",
    "wsproto",
    "zstandard",
    "rproxy.filters.basicauth",
    "rproxy.filters.bearer",
    "rproxy.filters.compress",
    "rproxy.filters.forwardauth",
    "rproxy.filters.upload",
    "rproxy.observe.metrics",
    "rproxy.observe.otel",
    "rproxy.tunnel.relay",
    "rproxy.upload.storage",
)

#: A typical edge: IP rules, Basic and JWT authentication, a rate limit, CORS, header rules, compression.
FILTERS_CONFIG = """\
upstream = ["http://127.0.0.1:9"]
default-filters = ["ips", "web", "headers", "gzip"]

[filters.ips]
type = "ip-rules"
deny = ["192.0.2.0/24"]

[filters.auth]
type = "basic-auth"
htpasswd = "users.htpasswd"

[filters.token]
type = "jwt"
algorithms = ["HS256"]
secret = "a secret of thirty-two bytes, ok"

[filters.limit]
type = "rate-limit"
rate = "100/s"

[filters.web]
type = "cors"
origins = ["https://app.example.com"]

[filters.headers]
type = "headers"
response-set = { "X-Frame-Options" = "DENY" }

[filters.gzip]
type = "compress"

[[routes]]
path-prefix = "/api"
service = "default"
filters = ["ips", "token", "limit"]

[[routes]]
path-prefix = "/admin"
service = "default"
filters = ["ips", "auth"]

[[routes]]
service = "default"
"""

#: A user of the htpasswd file above (password "wonderland", bcrypt, cost 5).
HTPASSWD = "alice:$2b$05$LeV8KFPAfl6Gjhh2TygsG.U6R4GSfAAgtecdVcOFtOybq6i6V2BnG\n"

#: Prints, as JSON, which of the modules named in argv[1] (a JSON list) building the service for the other
#: arguments imported.
_LOADED = """\
import json, sys
from rproxy.app.reactor import installUnlessChosen
installUnlessChosen()
from rproxy.app.tap import Options, makeService
options = Options()
options.parseOptions(sys.argv[2:])
makeService(options)
print(json.dumps([name for name in json.loads(sys.argv[1]) if name in sys.modules]))
"""


def residentBytes(pid: int) -> int:
    """The resident set (VmRSS) of process C{pid}, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def idleResident(testCase: unittest.TestCase, *arguments: str) -> int:
    """
    Start C{twist rproxy} (this checkout's) with C{arguments}, wait until it listens and has settled, and
    return its resident set.  Its modules are compiled first, as pip compiles an installed rproxy's: compiling
    them at start would leave the compiler's garbage in the process (2 MiB more).
    """
    compiling = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    out, err, code = await utils.getProcessOutputAndValue(
        PYTHON, ["-m", "compileall", "-q", "rproxy"], env=compiling, path=ROOT
    )
    testCase.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
    port = freePort()
    argv = [PYTHON, "-m", "twisted", "rproxy", "--listen", f"tcp:{port}:interface=127.0.0.1", *arguments]
    process = ProxyProcess.spawn(testCase, argv, {"PYTHONPATH": ROOT})
    await waitUntilListening(testCase, process, port)
    await sleep(0.5)  # the start-up's last callbacks run; nothing is in flight
    testCase.assertTrue(process.running, process.log)
    return residentBytes(process.transport.pid)


async def loadedModules(testCase: unittest.TestCase, arguments: list[str], names: tuple[str, ...]) -> list[str]:
    """Which of C{names} a process that builds the service of C{arguments} (and does not start it) imported."""
    out, err, code = await utils.getProcessOutputAndValue(
        PYTHON, ["-c", _LOADED, json.dumps(names), *arguments], env={**os.environ, "PYTHONPATH": ROOT}, path=ROOT
    )
    testCase.assertEqual(code, 0, err.decode("utf-8", "replace"))
    loaded: list[str] = json.loads(out)
    return loaded


def writeFiltersConfig(testCase: unittest.TestCase) -> str:
    """L{FILTERS_CONFIG} and its htpasswd file in a new directory; the config file's path."""
    directory = testCase.mktemp()
    os.makedirs(directory)
    with open(os.path.join(directory, "users.htpasswd"), "w") as users:
        users.write(HTPASSWD)
    path = os.path.join(directory, "rproxy.toml")
    with open(path, "w") as config:
        config.write(FILTERS_CONFIG)
    return os.path.abspath(path)


class IdleMemoryTests(unittest.TestCase):
    """The resident set of an idle ``twist rproxy`` process."""

    async def test_defaultConfiguration(self) -> None:
        """With the default configuration, an idle worker holds at most L{DEFAULT_LIMIT}."""
        resident = await idleResident(self, "--upstream", "http://127.0.0.1:9", "--access-log", "off")
        self.assertLessEqual(resident, DEFAULT_LIMIT, f"idle VmRSS {resident / MiB:.1f} MiB")

    async def test_typicalFilters(self) -> None:
        """With a typical set of filters and a metrics listener, an idle worker holds at most L{FILTERS_LIMIT}."""
        metricsPort = freePort()
        resident = await idleResident(
            self,
            "--config",
            writeFiltersConfig(self),
            "--metrics-listen",
            f"tcp:{metricsPort}:interface=127.0.0.1",
            "--access-log",
            "off",
        )
        self.assertLessEqual(resident, FILTERS_LIMIT, f"idle VmRSS {resident / MiB:.1f} MiB")


class ImportTests(unittest.TestCase):
    """A configuration imports the optional libraries it uses, and no others."""

    async def test_defaultImportsNoOptionalLibrary(self) -> None:
        """The default configuration imports none of L{OPTIONAL_MODULES}."""
        loaded = await loadedModules(self, ["--upstream", "http://127.0.0.1:9"], OPTIONAL_MODULES)
        self.assertEqual(loaded, [])

    async def test_filtersImportWhatTheyUse(self) -> None:
        """
        A configuration with filters imports their kinds' libraries (and prometheus_client for metrics),
        and still none of the kinds it does not use.
        """
        arguments = ["--config", writeFiltersConfig(self), "--metrics-listen", "tcp:0:interface=127.0.0.1"]
        loaded = await loadedModules(self, arguments, OPTIONAL_MODULES)
        used = {
            "brotli",
            "jwt",
            "passlib",
            "prometheus_client",
            "zstandard",
            "rproxy.filters.basicauth",
            "rproxy.filters.bearer",
            "rproxy.filters.compress",
            "rproxy.observe.metrics",
        }
        self.assertEqual(set(loaded), used)

    async def test_listingFiltersImportsNone(self) -> None:
        """Finding the filter kinds (C{getPlugins}, as C{--list-filters} does) imports no filter's module."""
        script = (
            "import json, sys\n"
            "from rproxy.filters.factory import filterFactories\n"
            "kinds = sorted(filterFactories())\n"
            "print(json.dumps([kinds, sorted(n for n in sys.modules if n.startswith('rproxy.filters.'))]))\n"
        )
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-c", script], env={**os.environ, "PYTHONPATH": ROOT}, path=ROOT
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        kinds, imported = json.loads(out)
        self.assertIn("basic-auth", kinds)
        self.assertIn("jwt", kinds)
        self.assertEqual(imported, ["rproxy.filters.factory"])
