"""
The systemd units of docs/systemd/: what they say (read here, and by ``systemd-analyze verify`` where it is
installed), and what they run: their ``ExecStart`` with their environment, reloaded by their ``ExecReload``'s
signal and stopped by their ``KillSignal``; the socket-activated one on a socket handed over as systemd
hands it.  docs/operations.md shows each unit as it is.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import signal

from twisted.internet import utils
from twisted.trial import unittest

from rproxy.app.config import REPEATABLE
from rproxy.app.tap import Options
from rproxy.test.support import BIN, PYTHON, ScriptedUpstream, waitFor
from rproxy.test.test_config import answerWith, writeConfig
from rproxy.test.test_drain import ROOT, ProxyProcess, assertCleanExit, freePort, waitUntilListening
from rproxy.test.test_reload import body, rewrite, route, services

UNITS = os.path.join(ROOT, "docs", "systemd")
OPERATIONS_MD = os.path.join(ROOT, "docs", "operations.md")

#: Where the units expect rproxy: pip-installed into a virtualenv at /opt/rproxy, its tac in share/rproxy.
INSTALLED_BIN = "/opt/rproxy/bin/"
INSTALLED_TAC = "/opt/rproxy/share/rproxy/rproxy.tac"

#: What systemd does for rproxy.socket: the listening socket becomes descriptor 3 of the service's process,
#: which LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES describe.  Arguments: the port, then the command to run.
SOCKET_ACTIVATION = """
import os, socket, sys
listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listening.bind(("127.0.0.1", int(sys.argv[1])))
listening.listen(128)
os.dup2(listening.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="rproxy.socket")
os.execv(sys.argv[2], sys.argv[2:])
"""

Unit = dict[str, list[tuple[str, str]]]


def readUnit(name: str) -> Unit:
    """The unit file C{name} of docs/systemd: each section's settings, in order (a key may repeat)."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    with open(os.path.join(UNITS, name), encoding="utf-8") as f:
        for line in f.read().replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = unit.setdefault(line[1:-1], [])
                continue
            key, equals, value = line.partition("=")
            assert section is not None and equals, f"{name}: not a setting in a section: {line!r}"
            section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value of C{key} in C{section}."""
    return [value for name, value in unit.get(section, []) if name == key]


def value(unit: Unit, section: str, key: str) -> str:
    """The one value of C{key} in C{section}."""
    [found] = values(unit, section, key)
    return found


def environment(unit: Unit) -> dict[str, str]:
    """The variables the unit's C{Environment=} lines set."""
    assignments = [word for line in values(unit, "Service", "Environment") for word in shlex.split(line)]
    return dict(assignment.split("=", 1) for assignment in assignments)


def _local(text: str) -> str:
    """C{text} with the installed paths replaced by this checkout's."""
    return text.replace(INSTALLED_TAC, os.path.join(ROOT, "rproxy.tac")).replace(INSTALLED_BIN, BIN + os.sep)


def localCommand(command: str) -> list[str]:
    """The unit's command line, with the installed paths replaced by this checkout's."""
    return [_local(word) for word in shlex.split(command)]


def localCopy(testCase: unittest.TestCase) -> str:
    """A directory holding the units, with the installed paths replaced by this checkout's."""
    directory = os.path.abspath(testCase.mktemp())
    os.mkdir(directory)
    for name in os.listdir(UNITS):
        with open(os.path.join(UNITS, name), encoding="utf-8") as f:
            text = _local(f.read())
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
    return directory


SERVICES = ("rproxy.service", "rproxy-socket.service")
#: The unit that runs a worker per core (rproxy.app.workers).
WORKERS = "rproxy-workers.service"


class UnitFileTests(unittest.TestCase):
    """The units run rproxy.tac under twistd in the foreground, stop it gracefully and reload it with SIGHUP."""

    def test_files(self) -> None:
        self.assertEqual(sorted(os.listdir(UNITS)), sorted([*SERVICES, WORKERS, "rproxy.socket"]))

    def test_workers(self) -> None:
        """
        rproxy-workers.service runs the same command with workers, as a notify service whose supervisor
        alone may notify, and which alone gets SIGTERM (it drains its workers); its variables are options.
        """
        unit, plain = readUnit(WORKERS), readUnit("rproxy.service")
        for key in ("ExecStart", "ExecReload", "KillSignal", "TimeoutStopSec"):
            self.assertEqual(value(unit, "Service", key), value(plain, "Service", key), key)
        self.assertEqual(
            [value(unit, "Service", key) for key in ("Type", "NotifyAccess", "KillMode")], ["notify", "main", "mixed"]
        )
        self.assertEqual(environment(unit), {**environment(plain), "RPROXY_WORKERS": "auto"})

    def test_services(self) -> None:
        """
        Each service runs C{twistd -n --pidfile= -y rproxy.tac} as a simple service, stops it with SIGTERM
        and more time than the grace period, and reloads it with SIGHUP.
        """
        grace = float(Options().defaults["grace"])
        for name in SERVICES:
            unit = readUnit(name)
            command = shlex.split(value(unit, "Service", "ExecStart"))
            self.assertEqual(
                (os.path.basename(command[0]), command[1:4], os.path.basename(command[-1])),
                ("twistd", ["-n", "--pidfile=", "-y"], "rproxy.tac"),
                name,
            )
            self.assertEqual(value(unit, "Service", "Type"), "simple", name)
            self.assertEqual(value(unit, "Service", "KillSignal"), "SIGTERM", name)
            self.assertGreater(float(value(unit, "Service", "TimeoutStopSec")), grace, name)
            self.assertEqual(shlex.split(value(unit, "Service", "ExecReload")), ["/bin/kill", "-HUP", "$MAINPID"])
            self.assertEqual(environment(unit)["RPROXY_CONFIG"], "/etc/rproxy/rproxy.toml", name)

    def test_variablesAreOptions(self) -> None:
        """Every C{RPROXY_*} variable of the units is an option's (a misspelt one would be ignored)."""
        options = {str(parameter[0]) for parameter in Options.optParameters} | REPEATABLE
        for name in SERVICES:
            for variable in environment(readUnit(name)):
                option = variable.removeprefix("RPROXY_").lower().replace("_", "-")
                self.assertIn(option, options, f"{name}: {variable}")

    def test_socketActivation(self) -> None:
        """
        rproxy.socket starts rproxy-socket.service, which requires it and listens on its IPv4 socket: the
        address family of the socket is the one C{RPROXY_LISTEN} gives Twisted's systemd endpoint.
        """
        socket, service = readUnit("rproxy.socket"), readUnit("rproxy-socket.service")
        self.assertEqual(value(socket, "Socket", "Service"), "rproxy-socket.service")
        self.assertEqual(value(service, "Unit", "Requires"), "rproxy.socket")
        self.assertIn("rproxy.socket", value(service, "Unit", "After").split())
        host, _, port = value(socket, "Socket", "ListenStream").rpartition(":")
        self.assertEqual((ipaddress.ip_address(host).version, int(port)), (4, 8080))
        self.assertEqual(environment(service)["RPROXY_LISTEN"], "systemd:domain=INET:index=0")
        self.assertNotIn("RPROXY_LISTEN", environment(readUnit("rproxy.service")))

    def test_documented(self) -> None:
        """docs/operations.md shows every unit as it is."""
        with open(OPERATIONS_MD, encoding="utf-8") as f:
            operations = f.read()
        for name in os.listdir(UNITS):
            with open(os.path.join(UNITS, name), encoding="utf-8") as f:
                self.assertIn(f"```ini\n{f.read()}```\n", operations, name)


class VerifyTests(unittest.TestCase):
    """``systemd-analyze verify`` finds nothing to say about the units (run from this checkout's paths)."""

    timeout = 30

    def setUp(self) -> None:
        if shutil.which("systemd-analyze") is None:
            raise unittest.SkipTest("systemd-analyze is not installed")

    async def verify(self, directory: str) -> tuple[int, str]:
        """Exit status and output of C{systemd-analyze verify} on every unit in C{directory}."""
        paths = [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
        out, err, code = await utils.getProcessOutputAndValue(
            "systemd-analyze", ["verify", *paths], env=dict(os.environ), path=directory
        )
        return code, (out + err).decode("utf-8", "replace")

    async def test_verify(self) -> None:
        self.assertEqual(await self.verify(localCopy(self)), (0, ""))

    async def test_verifyFindsMistakes(self) -> None:
        """The same check of a unit with a misspelt key says so (the check above can fail)."""
        directory = localCopy(self)
        path = os.path.join(directory, "rproxy.service")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace("KillSignal=", "KillSignall="))
        code, output = await self.verify(directory)
        self.assertIn("KillSignall", output)


class RunTests(unittest.TestCase):
    """The services' commands, with their environment, as systemd runs them."""

    timeout = 60

    async def start(
        self, name: str, configuration: str, port: int, wrapper: list[str] | None = None
    ) -> tuple[ProxyProcess, str]:
        """
        Start service C{name}'s C{ExecStart} (behind the C{wrapper} command, if given) with its environment,
        C{RPROXY_CONFIG} naming a file holding C{configuration}; return the process once it accepts
        connections on C{port}, and the file.
        """
        unit = readUnit(name)
        path = writeConfig(self, configuration)
        environ = {**environment(unit), "RPROXY_CONFIG": path}
        command = localCommand(value(unit, "Service", "ExecStart"))
        process = ProxyProcess.spawn(self, [*(wrapper or []), *command], environ)
        await waitUntilListening(self, process, port)
        return process, path

    async def stop(self, name: str, process: ProxyProcess) -> None:
        """Stop the process with the unit's C{KillSignal}, as C{systemctl stop} does; it ends cleanly."""
        kill = value(readUnit(name), "Service", "KillSignal")
        self.assertEqual(signal.Signals[kill], signal.SIGTERM)
        process.transport.signalProcess(kill.removeprefix("SIG"))
        await process.waitForExit(self, 10.0)
        assertCleanExit(self, process)
        self.assertNotIn("Traceback", process.log)

    async def test_reload(self) -> None:
        """
        rproxy.service proxies as its config file says; after the file changed, the signal its C{ExecReload}
        sends (C{systemctl reload}) puts the new file in force.
        """
        a, b = ScriptedUpstream(self, answerWith(b"a")), ScriptedUpstream(self, answerWith(b"b"))
        port = freePort()
        top = f'listen = ["tcp:{port}:interface=127.0.0.1"]\naccess-log = "off"\n'
        process, path = await self.start("rproxy.service", top + services(a=a.url) + route("a"), port)
        self.assertEqual(await body(port, b"/"), b"a")

        rewrite(path, top + services(a=b.url) + route("a"))
        _, option, _ = shlex.split(value(readUnit("rproxy.service"), "Service", "ExecReload"))
        process.transport.signalProcess(option.removeprefix("-"))

        self.assertTrue(await waitFor(lambda: "configuration reloaded (SIGHUP)" in process.log, 10), process.log)
        self.assertEqual(await body(port, b"/"), b"b")
        await self.stop("rproxy.service", process)

    async def test_socketActivated(self) -> None:
        """rproxy-socket.service serves on the listening socket handed over to it, and nowhere else."""
        a = ScriptedUpstream(self, answerWith(b"a"))
        port = freePort()
        wrapper = [PYTHON, "-c", SOCKET_ACTIVATION, str(port)]
        configuration = 'access-log = "off"\n' + services(a=a.url) + route("a")
        process, _ = await self.start("rproxy-socket.service", configuration, port, wrapper)
        self.assertEqual(await body(port, b"/through/the/socket"), b"a")
        self.assertEqual(a.requests[0].requestLine, b"GET /through/the/socket HTTP/1.1")
        await self.stop("rproxy-socket.service", process)
