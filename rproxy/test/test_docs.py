"""
The documentation against the code: docs/options.md documents every option of L{rproxy.app.tap.Options}, and
nothing else, with the code's defaults; docs/configuration.md documents every key of a config file's
tables, and its examples are what C{--check-config} says of them; README.md shows the commands a newcomer
runs.

docs/options.md describes each option as a C{### --name} heading whose first line below is its default::

    Default: `5.0`          an optParameter whose code default is 5.0
    Default: none           an optParameter whose code default is None
    Default: off            a flag
    Default: (repeatable)   an option that may be given more than once (rproxy.app.config.REPEATABLE)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

from twisted.internet import utils
from twisted.trial import unittest

from rproxy.app.config import BLUE_GREEN_KEYS, REPEATABLE, ROUTE_KEYS, SERVICE_KEYS, WEIGHTED_SPLIT_KEYS
from rproxy.app.tap import Options
from rproxy.test.support import BIN, ROOT

OPTIONS_MD = os.path.join(ROOT, "docs", "options.md")
CONFIGURATION_MD = os.path.join(ROOT, "docs", "configuration.md")
README_MD = os.path.join(ROOT, "README.md")

_HEADING = re.compile(r"^### --([A-Za-z0-9][A-Za-z0-9-]*)\s*$")
_DEFAULT = re.compile(r"^Default: (`[^`]*`|none|off|\(repeatable\))\s*$")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def documentedOptions(text: str) -> dict[str, str | None]:
    """
    Each C{### --name} heading of C{text} and the default given on the first non-empty line below it
    (C{"`5.0`"}, C{"none"}, C{"off"}, C{"(repeatable)"}), or C{None} when that line is not a default.
    Headings inside fenced code blocks are ignored.
    """
    documented: dict[str, str | None] = {}
    lines = text.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        heading = _HEADING.match(line)
        if heading is None:
            continue
        name = heading.group(1)
        if name in documented:
            raise AssertionError(f"--{name} is documented twice")
        following = next((later for later in lines[i + 1 :] if later.strip()), "")
        default = _DEFAULT.match(following)
        documented[name] = default.group(1) if default else None
    return documented


def codeOptions() -> dict[str, str]:
    """
    Every option of L{Options} (from optParameters, optFlags and the opt_* methods; not --help) and its
    default as docs/options.md must show it.
    """
    options: dict[str, str] = {}
    for method in dir(Options):
        if method.startswith("opt_") and callable(getattr(Options, method)):
            name = method[len("opt_") :].replace("_", "-")
            if name != "help":
                options[name] = "(repeatable)" if name in REPEATABLE else "off"
    for flag in Options.optFlags:
        options[str(flag[0])] = "off"
    for parameter in Options.optParameters:
        name, default = str(parameter[0]), parameter[2]
        options[name] = "none" if default is None else f"`{default}`"
    for name in REPEATABLE:
        options[name] = "(repeatable)"
    return options


class OptionsReferenceTests(unittest.TestCase):
    """docs/options.md and rproxy.app.tap.Options describe the same options."""

    def setUp(self) -> None:
        self.documented = documentedOptions(_read(OPTIONS_MD))
        self.code = codeOptions()

    def test_sameOptions(self) -> None:
        """Every option has a C{### --name} heading, and every heading is an option."""
        undocumented = sorted(set(self.code) - set(self.documented))
        unknown = sorted(set(self.documented) - set(self.code))
        self.assertEqual(
            (undocumented, unknown),
            ([], []),
            "docs/options.md is out of date: (options without a '### --name' heading, "
            "headings of options that do not exist)",
        )

    def test_defaultLines(self) -> None:
        """The first line under every heading is a C{Default: ...} line."""
        missing = sorted(name for name, default in self.documented.items() if default is None)
        self.assertEqual(missing, [], "headings in docs/options.md without a 'Default: ...' line right below")

    def test_defaults(self) -> None:
        """Each documented default is the code's: optParameters' values, none, off or (repeatable)."""
        wrong = {
            name: (self.documented[name], expected)
            for name, expected in sorted(self.code.items())
            if name in self.documented and self.documented[name] is not None and self.documented[name] != expected
        }
        self.assertEqual(wrong, {}, "docs/options.md defaults that differ from the code: {name: (documented, code)}")

    def test_parametersCovered(self) -> None:
        """The options of each kind are all found (guards the parsing above against silently finding none)."""
        self.assertIn("connect-timeout", self.code)
        self.assertIn("rewrite-host", self.code)
        self.assertIn("upstream", self.code)
        self.assertNotIn("help", self.code)
        self.assertEqual(self.documented.get("connect-timeout"), f"`{Options().defaults['connect-timeout']}`")


class ParsingTests(unittest.TestCase):
    """The helpers above read the format the module docstring describes."""

    def test_headingsAndDefaults(self) -> None:
        text = (
            "# Title\n\n### --alpha\n\nDefault: `5.0`\n\nText.\n\n### --beta\nDefault: none\n\n"
            "### --gamma\n\nSeconds.\n\n```\n### --in-code\n```\n\n### --delta\n\nDefault: (repeatable)\n"
        )
        self.assertEqual(
            documentedOptions(text),
            {"alpha": "`5.0`", "beta": "none", "gamma": None, "delta": "(repeatable)"},
        )

    def test_duplicateHeading(self) -> None:
        with self.assertRaises(AssertionError):
            documentedOptions("### --alpha\n\nDefault: off\n\n### --alpha\n\nDefault: off\n")


def documentedKeys(text: str) -> dict[str, set[str]]:
    """
    The keys each table of C{text} documents (the backquoted first cell of each row), by the heading of its
    first column (C{"Service key"}).
    """
    tables: dict[str, set[str]] = {}
    rows: set[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        first = line.strip("|").split("|")[0].strip()
        if rows is None:
            rows = tables.setdefault(first, set())
            continue
        key = re.fullmatch(r"`([^`]+)`", first)
        if key is not None:
            rows.add(key[1])
    return tables


def fencedBlocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of C{text}, in order: (language, content)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def examples(text: str) -> list[tuple[str, list[str] | None]]:
    """
    Each TOML block of C{text}, and the C{twist rproxy} command line and output of the console block right
    after it (C{None} when there is none): the arguments and the lines it prints.
    """
    blocks = fencedBlocks(text)
    found: list[tuple[str, list[str] | None]] = []
    for i, (language, content) in enumerate(blocks):
        if language != "toml":
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
        found.append((content, after[1].splitlines() if after[0] == "console" else None))
    return found


def runCheckConfig(testCase: unittest.TestCase, content: str, arguments: list[str]) -> list[str]:
    """
    What C{twist rproxy ARGUMENTS} prints (with C{rproxy.toml} holding C{content}) as C{Options} parses
    them in this process, C{rproxy.toml} standing for the file's path.
    """
    directory = testCase.mktemp()
    os.mkdir(directory)
    path = os.path.join(directory, "rproxy.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), testCase.assertRaises(SystemExit) as exited:
        Options().parseOptions([path if argument == "rproxy.toml" else argument for argument in arguments])
    code = exited.exception.code
    output = printed.getvalue() + ("" if code == 0 else f"{code}\n")
    return output.replace(path, "rproxy.toml").splitlines()


class ConfigurationReferenceTests(unittest.TestCase):
    """docs/configuration.md documents the keys the parser accepts, and its examples say what rproxy does."""

    def setUp(self) -> None:
        self.text = _read(CONFIGURATION_MD)
        self.tables = documentedKeys(self.text)

    def test_keys(self) -> None:
        """Each table of keys lists exactly the keys of its kind of table in the file."""
        for heading, keys in [
            ("Service key", SERVICE_KEYS),
            ("Route key", ROUTE_KEYS),
            ("Weighted split key", WEIGHTED_SPLIT_KEYS),
            ("Blue/green key", BLUE_GREEN_KEYS),
        ]:
            documented = self.tables.get(heading, set())
            self.assertEqual(
                (sorted(keys - documented), sorted(documented - keys)),
                ([], []),
                f"docs/configuration.md's '{heading}' table: (keys not documented, documented keys that do not exist)",
            )

    def test_examples(self) -> None:
        """
        Every TOML block (of this page and of docs/options.md) is a whole file: C{--check-config} accepts it,
        or says exactly what the console block below it shows.
        """
        found = examples(self.text)
        self.assertGreaterEqual(sum(1 for _, console in found if console), 5)
        for content, console in [*found, *examples(_read(OPTIONS_MD))]:
            if console is None:
                [output] = runCheckConfig(self, content, ["--check-config", "rproxy.toml"])
                self.assertIn(": OK (", output, content)
                continue
            command, *expected = console
            self.assertTrue(command.startswith("$ twist rproxy "), command)
            arguments = shlex.split(command)[3:]
            self.assertEqual(runCheckConfig(self, content, arguments), expected, content)

    def test_parsing(self) -> None:
        """The helpers above find tables, blocks and consoles as this page uses them."""
        text = (
            "| Service key | Value |\n| --- | --- |\n| `upstreams` | a list |\n| plain | x |\n\n"
            "| Route key | Value |\n| --- | --- |\n| `hosts` | hosts |\n\n"
            "```toml\na = 1\n```\n\n```console\n$ twist rproxy --check-config rproxy.toml\nout\n```\n"
            "```toml\nb = 2\n```\n"
        )
        self.assertEqual(documentedKeys(text), {"Service key": {"upstreams"}, "Route key": {"hosts"}})
        self.assertEqual(
            examples(text),
            [("a = 1\n", ["$ twist rproxy --check-config rproxy.toml", "out"]), ("b = 2\n", None)],
        )


class ReadmeTests(unittest.TestCase):
    """README.md shows the commands that set up, run and test rproxy."""

    def test_commands(self) -> None:
        readme = _read(README_MD)
        for command in ("make run", "make test"):
            self.assertIn(command, readme)


class APIReferenceTests(unittest.TestCase):
    """
    C{make docs} builds the API reference with pydoctor (its settings in pyproject.toml): every docstring
    outside the tests parses, and every link to an rproxy name leads somewhere.  (Links to Twisted's names
    cannot resolve offline, and pydoctor cannot tell that a Twisted class it does not read is an interface.)
    """

    timeout = 120

    def test_builds(self) -> None:
        output = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, "-m", "pydoctor", "--html-output", output],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=110,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        problems = [
            line
            for line in (done.stdout + done.stderr).splitlines()
            if "/rproxy/test/" not in line
            and ("bad docstring" in line or 'Cannot find link target for "rproxy' in line)
        ]
        unparsed = re.findall(r"^    (rproxy\S*)$", done.stdout + done.stderr, re.M)
        self.assertEqual(problems, [])
        self.assertEqual([name for name in unparsed if not name.startswith("rproxy.test.")], [])
        for page in ("index.html", "rproxy.html", "rproxy.IBalancer.html", "rproxy.testing.html"):
            self.assertTrue(os.path.exists(os.path.join(output, page)), page)


class FilterPagesTests(unittest.TestCase):
    """
    The TOML blocks of docs/filters.md and docs/filters/*.md are whole files that C{--check-config} accepts,
    the htpasswd files they name written beside them; a complete block (one with upstreams) must be OK.
    """

    def test_examples(self) -> None:
        pages = [os.path.join(ROOT, "docs", "filters.md")]
        folder = os.path.join(ROOT, "docs", "filters")
        pages += sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".md"))
        checked = 0
        for page in pages:
            for content, _ in examples(_read(page)):
                if "upstream" not in content:
                    continue  # a fragment: a [filters.X] table shown alone
                directory = os.path.abspath(self.mktemp())
                os.mkdir(directory)
                for name in re.findall(r'^htpasswd = "([^"]+)"', content, re.M):
                    with open(os.path.join(directory, name), "w") as f:
                        f.write("user:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n")
                path = os.path.join(directory, "rproxy.toml")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed), self.assertRaises(SystemExit) as exited:
                    Options().parseOptions(["--check-config", path])
                self.assertEqual(exited.exception.code, 0, f"{page}: {printed.getvalue()}\n{content}")
                self.assertIn(": OK (", printed.getvalue(), page)
                checked += 1
        self.assertGreaterEqual(checked, 8)


class ObservabilityPageTests(unittest.TestCase):
    """docs/observability.md lists exactly the access log's fields."""

    def test_fields(self) -> None:
        from rproxy.observe.accesslog import FIELDS

        text = _read(os.path.join(ROOT, "docs", "observability.md"))
        section = text[text.index("| Field | What it is |") :].split("\n\n", 1)[0]
        documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
        self.assertEqual(documented, list(FIELDS))


class SmartProxyPageTests(unittest.TestCase):
    """docs/smart-proxy.md shows docs/examples/smart-proxy/rproxy.toml, which C{--check-config} accepts."""

    async def test_configuration(self) -> None:
        example = os.path.join(ROOT, "docs", "examples", "smart-proxy", "rproxy.toml")
        shown = [content for content, _ in examples(_read(os.path.join(ROOT, "docs", "smart-proxy.md")))]
        self.assertEqual(shown[0], _read(example))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "public", "assets"))
        os.makedirs(os.path.join(directory, "files"))
        shutil.copy(example, directory)
        shutil.copy(os.path.join(ROOT, "docs", "examples", "speedup", "prices.py"), directory)
        with open(os.path.join(directory, "upload-secret"), "w") as f:
            f.write("an-upload-signing-secret-of-at-least-32-bytes\n")
        out, err, code = await utils.getProcessOutputAndValue(
            os.path.join(BIN, "twist"), ["rproxy", "--check-config", "rproxy.toml"], path=directory
        )
        self.assertEqual((code, out, err), (0, b"rproxy.toml: OK (1 service, 6 routes)\n", b""))
