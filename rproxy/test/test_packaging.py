"""
rproxy as pip installs it, in a new virtualenv: the wheel carries the tac that C{twistd -y} runs and the
C{py.typed} marker; a plugin package installed in editable mode (setuptools' default) is found.

Offline: the wheel is built from a copy of the checkout without build isolation, and the new virtualenv
reaches rproxy's dependencies through a C{.pth} line naming this environment's site-packages (after its
own, so that the rproxy it imports is the installed wheel's).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

from twisted.internet import threads, utils
from twisted.trial import unittest

from rproxy.test.support import PYTHON, ROOT, ScriptedUpstream, curl, freePort, headerValues, responseStatus
from rproxy.test.test_config import answerWith
from rproxy.test.test_drain import ProxyProcess, waitUntilListening

#: What a copy of the checkout leaves out: environments, build output, test scratch.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__")


#: The environment of the processes: no PYTHONPATH (trial's workers get one naming this checkout), which would
#: put this checkout's rproxy before the installed one.
_ENVIRON = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def _run(*argv: str) -> str:
    """Run C{argv} to its end; its output, or an assertion error with it if it failed."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_ENVIRON)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def newVirtualenv(directory: str) -> str:
    """A new virtualenv in C{directory} reaching this environment's packages after its own; its python."""
    _run(PYTHON, "-m", "venv", "--without-pip", directory)
    python = os.path.join(directory, "bin", "python")
    own = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    ours = sysconfig.get_paths()["purelib"]
    with open(os.path.join(own, "zz_rproxy_test_dependencies.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({ours!r})\n")
    return python


class WheelTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.scratch = os.path.abspath(self.mktemp())
        os.makedirs(self.scratch)

    def buildAndInstall(self) -> tuple[str, str]:
        """Build rproxy's wheel and install it into a new virtualenv: (its directory, its python)."""
        source = os.path.join(self.scratch, "source")
        shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
        wheels = os.path.join(self.scratch, "wheels")
        _run(
            PYTHON,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            wheels,
            source,
        )
        [wheel] = glob.glob(os.path.join(wheels, "rproxy-*.whl"))
        venv = os.path.join(self.scratch, "venv")
        python = newVirtualenv(venv)
        _run(PYTHON, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel)
        return venv, python

    async def test_tacFromWheel(self) -> None:
        """C{twistd -n -y PREFIX/share/rproxy/rproxy.tac} runs the installed rproxy, configured by the environment."""
        venv, python = await threads.deferToThread(self.buildAndInstall)
        imported = _run(python, "-c", "import rproxy; print(rproxy.__file__)")
        self.assertTrue(imported.startswith(venv), imported)
        package = os.path.dirname(imported.strip())
        self.assertTrue(os.path.isfile(os.path.join(package, "py.typed")))
        tac = os.path.join(venv, "share", "rproxy", "rproxy.tac")
        self.assertTrue(os.path.isfile(tac))
        upstream = ScriptedUpstream(self, answerWith(b"from the wheel"))
        port = freePort()
        twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        process = ProxyProcess.spawn(
            self,
            [python, "-c", twistd, "-n", "--pidfile=", "-y", tac],
            {"RPROXY_LISTEN": f"tcp:{port}:interface=127.0.0.1", "RPROXY_UPSTREAM": upstream.url, "PYTHONPATH": ""},
        )
        await waitUntilListening(self, process, port)
        code, out, err = await curl(["-s", "-i", f"http://127.0.0.1:{port}/hello"])
        self.assertEqual(responseStatus(out), 200, out)
        self.assertTrue(out.endswith(b"from the wheel"), out)
        self.assertTrue(headerValues(out, b"x-request-id"))

    async def test_editablePlugin(self) -> None:
        """A plugin package installed with C{pip install -e} (setuptools' default mode) is listed and usable."""
        example = os.path.join(self.scratch, "rproxy-prefer-local")
        shutil.copytree(os.path.join(ROOT, "docs", "examples", "rproxy-prefer-local"), example, ignore=_NOT_SOURCE)
        python = await threads.deferToThread(newVirtualenv, os.path.join(self.scratch, "venv"))
        await threads.deferToThread(
            _run, PYTHON, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
            "--no-build-isolation", "-e", example,
        )  # fmt: skip
        finders = glob.glob(os.path.join(self.scratch, "venv", "lib", "*", "site-packages", "__editable__*"))
        self.assertTrue(finders, "not an editable install through setuptools' finder")
        out, err, code = await utils.getProcessOutputAndValue(
            python, ["-m", "twisted", "rproxy", "--list-balancers"], env=_ENVIRON
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"prefer_local", out)
