"""Tests of the api-key filter, with rproxy.testing: no sockets, the keys in files of a temporary directory."""

from __future__ import annotations

import os
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from rproxy.filters.factory import filterFactories
from rproxy.interfaces import FilterEnvironment, IBodyTransform, IResponseFilter
from rproxy.plugins import api_key  # installed by this package
from rproxy.proxy.message import RequestContext
from rproxy.testing import FilterResult, inboundRequest, runFilters, verifyFilterFactory

ApiKey = api_key.ApiKey
apiKey = api_key.apiKey

BILLING = "billing-7f3a9c2e5b1d4f60"
REPORTS = "reports-0c8e2a4b6d1f3957"
UNLABELLED = "plain-5e7d9b1a3c2f4e68"
KEYS = f"# who: key\nbilling: {BILLING}\n\nreports:{REPORTS}\n{UNLABELLED}\n"


@implementer(IResponseFilter)
class Metered:
    """
    A response filter to put before api-key in a chain: it tells the client who it was let in as, and counts
    the bytes of body each API user gets.
    """

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()

    def onResponse(self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> IBodyTransform:
        user = context.user or "anonymous"
        headers.append((b"X-Api-User", user.encode()))
        return Meter(self.sent, user)


@implementer(IBodyTransform)
class Meter:
    """Counts one response's body into C{sent[user]} as it streams, and passes it on unchanged."""

    def __init__(self, sent: Counter[str], user: str) -> None:
        self.sent = sent
        self.user = user

    def transform(self, data: bytes) -> bytes:
        self.sent[self.user] += len(data)
        return data

    def finish(self) -> bytes:
        return b""


class ApiKeyTests(unittest.TestCase):
    def keysFile(self, content: str = KEYS) -> str:
        """A new file holding C{content}; its absolute path."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        return path

    def build(self, **options: object) -> object:
        """The filter built from C{options} (hyphens for underscores), the keys of L{KEYS} by default."""
        given = {name.replace("_", "-"): value for name, value in options.items()}
        given.setdefault("keys-file", self.keysFile())
        return apiKey.build(given, FilterEnvironment(Clock()))

    def send(self, *headers: tuple[bytes, bytes], **options: object) -> FilterResult:
        """A request with C{headers} through the filter built from C{options}."""
        request = inboundRequest(headers=[(b"Accept", b"text/plain"), *headers])
        return self.successResultOf(runFilters([self.build(**options)], request))

    def test_installed(self) -> None:
        """rproxy finds the plugin, and the factory keeps the contract with and without the header option."""
        self.assertIs(filterFactories()["api-key"], apiKey)
        built = verifyFilterFactory(apiKey, {"keys-file": self.keysFile()})
        self.assertEqual(built.consumes, (b"x-api-key",))  # type: ignore[attr-defined]
        verifyFilterFactory(apiKey, {"keys-file": self.keysFile(), "header": "Api-Token"})

    def test_knownKey(self) -> None:
        """A known key goes through, without the header; its label is the user."""
        result = self.send((b"X-Api-Key", BILLING.encode()))
        self.assertIsNone(result.verdict)
        self.assertEqual(result.status, 200)
        self.assertEqual(result.context.user, "billing")
        names = [name.lower() for name, _ in result.forwarded]
        self.assertNotIn(b"x-api-key", names)
        self.assertIn(b"accept", names)

    def test_labels(self) -> None:
        """Each key gives its own label; a key without one leaves the user unset."""
        self.assertEqual(self.send((b"x-api-key", REPORTS.encode())).context.user, "reports")
        result = self.send((b"X-API-KEY", b"  " + UNLABELLED.encode() + b" "))
        self.assertIsNone(result.verdict)
        self.assertIsNone(result.context.user)

    def test_missing(self) -> None:
        """Without the header, or with an empty one: 401, saying where the key goes."""
        for headers in [(), ((b"X-Api-Key", b""),), ((b"Authorization", ("Bearer " + BILLING).encode()),)]:
            result = self.send(*headers)
            self.assertEqual(result.status, 401)
            self.assertIn((b"WWW-Authenticate", b'ApiKey header="X-Api-Key"'), result.headers)
            self.assertIn(b"X-Api-Key", result.body)
            self.assertEqual(result.forwarded, [])

    def test_unknown(self) -> None:
        """An unknown key (a known one with a character changed, a label, the line): 403, the key never told."""
        for wrong in [BILLING[:-1] + "1", "billing", f"billing:{BILLING}", BILLING.upper()]:
            result = self.send((b"X-Api-Key", wrong.encode()))
            self.assertEqual(result.status, 403, wrong)
            self.assertNotIn(wrong.encode(), result.body)
            self.assertIsNone(result.context.user)
            self.assertEqual(result.forwarded, [])

    def test_twoKeys(self) -> None:
        """Two X-Api-Key fields, even both known: 400."""
        result = self.send((b"X-Api-Key", BILLING.encode()), (b"X-Api-Key", REPORTS.encode()))
        self.assertEqual(result.status, 400)
        self.assertIsNone(result.context.user)

    def test_otherHeader(self) -> None:
        """With C{header}, the key travels in that header, which is consumed instead."""
        result = self.send((b"Api-Token", BILLING.encode()), (b"X-Api-Key", b"not-consumed"), header="Api-Token")
        self.assertEqual(result.context.user, "billing")
        self.assertIn((b"X-Api-Key", b"not-consumed"), result.forwarded)
        self.assertNotIn(b"api-token", [name.lower() for name, _ in result.forwarded])
        missing = self.send((b"X-Api-Key", BILLING.encode()), header="Api-Token")
        self.assertEqual(missing.status, 401)
        self.assertIn((b"WWW-Authenticate", b'ApiKey header="Api-Token"'), missing.headers)

    def test_digestsOnly(self) -> None:
        """The filter keeps SHA-256 digests of the keys, not the keys."""
        built = self.build()
        assert isinstance(built, ApiKey)
        self.assertEqual([len(digest) for digest, _ in built.keys], [32, 32, 32])
        self.assertEqual([label for _, label in built.keys], ["billing", "reports", None])
        for key in (BILLING, REPORTS, UNLABELLED):
            self.assertNotIn(key.encode(), repr(vars(built)).encode())

    def test_relativeToBase(self) -> None:
        """A relative C{keys-file} is read from the environment's base directory (the config file's)."""
        path = self.keysFile()
        base, name = os.path.split(path)
        built = apiKey.build({"keys-file": name}, FilterEnvironment(Clock(), base))
        request = inboundRequest(headers=[(b"X-Api-Key", BILLING.encode())])
        self.assertEqual(self.successResultOf(runFilters([built], request)).context.user, "billing")

    def test_optionErrors(self) -> None:
        """A wrong option or keys file is a ValueError naming the option (and the line), never a key."""
        missing = os.path.abspath(self.mktemp())
        for options, words in [
            ({}, ["option keys-file", "required"]),
            ({"keys-file": missing}, ["option keys-file", "cannot read", missing]),
            ({"keys-file": self.keysFile("# none yet\n\n")}, ["option keys-file", "has no keys"]),
            ({"keys-file": self.keysFile(f"{BILLING}\nshort\n")}, ["option keys-file", "line 2", "16 characters"]),
            ({"keys-file": self.keysFile(f":{BILLING}\n")}, ["option keys-file", "line 1", "before the ':'"]),
            ({"keys-file": self.keysFile(f"a:{BILLING}\nb:{BILLING}\n")}, ["line 2", "the same key"]),
            ({"keys-file": self.keysFile(), "header": "X Api Key"}, ["option header", "'X Api Key'"]),
            ({"keys-file": self.keysFile(), "header": ""}, ["option header"]),
            ({"keys-file": self.keysFile(), "header": 3}, ["option header", "expected a string"]),
            ({"keys-file": self.keysFile(), "keys": "x"}, ["unknown option 'keys'"]),
        ]:
            with self.assertRaises(ValueError) as raised:
                apiKey.build(options, FilterEnvironment(Clock()))
            message = str(raised.exception)
            self.assertIn("filter api-key", message)
            for word in words:
                self.assertIn(word, message)
            self.assertNotIn(BILLING, message)

    def test_responseSide(self) -> None:
        """
        Response filters run last first, and only those whose request side ran: one before api-key sees its
        user and its refusals (whose bodies are never transformed); one after it sees no refusal.
        """
        keys, metered = self.build(), Metered()
        good = inboundRequest(headers=[(b"X-Api-Key", BILLING.encode())])
        result = self.successResultOf(runFilters([metered, keys], good, body=[b"abc", b"de"]))
        self.assertEqual((result.status, result.body), (200, b"abcde"))
        self.assertIn((b"X-Api-User", b"billing"), result.headers)
        refused = self.successResultOf(runFilters([metered, keys], inboundRequest()))
        self.assertEqual(refused.status, 401)
        self.assertIn((b"X-Api-User", b"anonymous"), refused.headers)
        self.assertEqual(metered.sent, Counter(billing=5))  # the refusal's body is the proxy's, never transformed
        after = self.successResultOf(runFilters([keys, metered], inboundRequest()))
        self.assertEqual(after.status, 401)
        self.assertNotIn(b"X-Api-User", [name for name, _ in after.headers])
