"""
What operators get wrong when they start rproxy: each mistake is one line naming the option and the value,
with no traceback and no page of usage, and a non-zero exit; real C{twist rproxy} processes.
"""

from __future__ import annotations

import os

from twisted.internet import protocol, reactor, utils
from twisted.trial import unittest

from rproxy.test.support import BIN, ROOT, curl, freePort, headerValues, responseStatus, sleep
from rproxy.test.test_drain import ProxyProcess, waitUntilListening

#: A listener that can never be reached (the processes below must not start serving).
UPSTREAM = "http://127.0.0.1:1"


async def twist(*arguments: str) -> tuple[int, list[str]]:
    """Run C{twist rproxy ARGUMENTS} to its end: its exit status and the lines it wrote (both streams)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RPROXY_", "LISTEN_"))}
    out, err, code = await utils.getProcessOutputAndValue(
        os.path.join(BIN, "twist"), ["rproxy", *arguments], env=environ, path=ROOT
    )
    return code, (out + err).decode().splitlines()


class StartupErrorTests(unittest.TestCase):
    timeout = 60

    def assertOneLine(self, lines: list[str], *expected: str) -> None:
        """The output is the one error line (holding each of C{expected}), or that line and a pointer to --help."""
        self.assertFalse([line for line in lines if "Traceback" in line], lines)
        errors = [line for line in lines if line.startswith("Error: ")]
        self.assertEqual(len(errors), 1, lines)
        for text in expected:
            self.assertIn(text, errors[0])
        self.assertLessEqual(len([line for line in lines if line.strip()]), 3, lines)

    async def test_portInUse(self) -> None:
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = f"tcp:{port.getHost().port}:interface=127.0.0.1"
        code, lines = await twist("--listen", endpoint, "--upstream", UPSTREAM)
        self.assertEqual(code, 1)
        self.assertOneLine(lines, f"--listen {endpoint}: cannot listen: address already in use")

    async def test_adminPortInUse(self) -> None:
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("a-long-enough-admin-token-for-the-test\n")
        endpoint = f"tcp:{port.getHost().port}:interface=127.0.0.1"
        code, lines = await twist(
            "--listen", "tcp:0:interface=127.0.0.1", "--admin-listen", endpoint, "--admin-token-file", token,
            "--upstream", UPSTREAM,
        )  # fmt: skip
        self.assertEqual(code, 1, lines)
        self.assertOneLine(lines, f"--admin-listen {endpoint}: cannot listen: address already in use")

    async def test_unknownEndpointType(self) -> None:
        code, lines = await twist("--listen", "tpc:8080", "--upstream", UPSTREAM)
        self.assertEqual(code, 64)
        self.assertOneLine(lines, "--listen: unknown endpoint type 'tpc' in 'tpc:8080'", "tcp")

    async def test_unknownEndpointTypeChecked(self) -> None:
        """C{--check-config} finds it in the file, as a start would."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f'listen = ["tpc:8080"]\nupstream = ["{UPSTREAM}"]\n')
        code, lines = await twist("--check-config", path)
        self.assertEqual((code, len(lines)), (1, 1), lines)
        self.assertTrue(lines[0].startswith(f"{path}: listen: unknown endpoint type 'tpc' in 'tpc:8080' (known"), lines)

    async def test_systemdWithoutSocket(self) -> None:
        code, lines = await twist("--listen", "systemd:domain=INET:index=0", "--upstream", UPSTREAM)
        self.assertEqual(code, 1)
        self.assertOneLine(lines, "--listen systemd:domain=INET:index=0: systemd passed no socket", ".socket unit")

    async def test_unreadableCertificate(self) -> None:
        missing = os.path.abspath(self.mktemp())
        code, lines = await twist(
            "--tls-listen", "tcp:0:interface=127.0.0.1", "--tls-cert", f"{missing}.pem:{missing}.key",
            "--upstream", UPSTREAM,
        )  # fmt: skip
        self.assertEqual(code, 64)
        self.assertOneLine(lines, "--tls-cert", f"{missing}.pem", "cannot read")

    async def test_unreadableToken(self) -> None:
        missing = os.path.abspath(self.mktemp())
        code, lines = await twist(
            "--admin-listen", "tcp:0:interface=127.0.0.1", "--admin-token-file", missing, "--upstream", UPSTREAM
        )
        self.assertEqual(code, 64)
        self.assertOneLine(lines, "--admin-token-file", missing, "cannot read")

    async def test_usageNotDumped(self) -> None:
        """A wrong option or value is printed alone, with a pointer to --help (which still lists every option)."""
        for arguments, text in [
            (["--bogus"], "option --bogus not recognized"),
            (["--retries", "x"], "--retries: expected an integer, got 'x'"),
            (["--upstream", "htp://x"], "--upstream: upstream 'htp://x': scheme must be one of"),
        ]:
            code, lines = await twist(*arguments)
            self.assertEqual(code, 64)
            self.assertOneLine(lines, text)
            self.assertIn("Run 'twist rproxy --help' for every option.", lines)
        code, lines = await twist("--help")
        self.assertEqual(code, 0)
        self.assertGreater(len(lines), 100)
        self.assertIn("--upstream=", "\n".join(lines))


class HintTests(unittest.TestCase):
    """Errors that point at the right side: the upstreams, each of them by name."""

    timeout = 60

    async def proxy(self, *arguments: str) -> int:
        port = freePort()
        process = ProxyProcess.spawn(
            self,
            [os.path.join(BIN, "twist"), "rproxy", "--listen", f"tcp:{port}:interface=127.0.0.1", *arguments],
        )
        await waitUntilListening(self, process, port)
        return port

    async def test_everyAttemptNamed(self) -> None:
        """A 502 after several upstreams were tried says why each one failed."""
        dead = [f"127.0.0.1:{freePort()}", f"127.0.0.1:{freePort()}"]
        port = await self.proxy("--upstream", f"http://{dead[0]}", "--upstream", f"http://{dead[1]}")
        code, out, err = await curl(["-s", "-i", f"http://127.0.0.1:{port}/x"])
        self.assertEqual(responseStatus(out), 502, out)
        self.assertEqual(headerValues(out, b"x-rproxy-fault"), [b"upstream"])
        body = out.split(b"\r\n\r\n", 1)[1].decode()
        self.assertIn("2 attempts failed: ", body)
        for upstream in dead:
            self.assertIn(f"upstream {upstream} refused the connection", body)

    async def test_unhealthyUpstreamsAtFault(self) -> None:
        """A 503 because every upstream failed its health checks blames the upstreams, not the proxy."""
        dead = f"127.0.0.1:{freePort()}"
        port = await self.proxy(
            "--upstream", f"http://{dead}", "--health-path", "/health", "--health-interval", "0.1",
            "--health-fall", "1", "--health-timeout", "1",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/x"
        statuses = []
        for _ in range(50):  # until the checks took it out: at most 5 s
            code, out, err = await curl(["-s", "-i", url])
            statuses.append(responseStatus(out))
            if statuses[-1] == 503:
                break
            await sleep(0.1)
        self.assertEqual(statuses[-1], 503, statuses)
        self.assertEqual(headerValues(out, b"x-rproxy-fault"), [b"upstream"])
        self.assertIn(f"no upstream of service 'default' is available (http://{dead} down)".encode(), out)


class SocketActivationTests(unittest.TestCase):
    """C{systemd-socket-activate} passes a socket as systemd does; without C{--fdname}, with no name."""

    timeout = 60

    async def activate(self, *options: str) -> tuple[ProxyProcess, int]:
        port = freePort()
        argv = ["/usr/bin/systemd-socket-activate", *options, "-l", f"127.0.0.1:{port}", os.path.join(BIN, "twist")]
        argv += ["rproxy", "--listen", "systemd:domain=INET:index=0", "--upstream", UPSTREAM]
        return ProxyProcess.spawn(self, argv), port

    async def test_withoutName(self) -> None:
        process, port = await self.activate()
        await waitUntilListening(self, process, port)  # systemd-socket-activate's socket; rproxy starts on use
        await curl(["-s", "-m", "5", f"http://127.0.0.1:{port}/"])
        await process.ended()
        self.assertEqual(process.exitCode, 1)
        self.assertIn(
            "Error: --listen systemd:domain=INET:index=0: a socket was passed (descriptor 3) without its name in "
            "LISTEN_FDNAMES",
            process.log,
        )
        self.assertIn("systemd-socket-activate needs --fdname=NAME", process.log)

    async def test_withName(self) -> None:
        process, port = await self.activate("--fdname=rproxy.socket")
        await waitUntilListening(self, process, port)
        code, out, err = await curl(["-s", "-i", "-m", "5", f"http://127.0.0.1:{port}/"])
        self.assertEqual(responseStatus(out), 502, out)  # served by rproxy: the upstream refused
