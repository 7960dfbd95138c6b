"""
L{rproxy.observe.redact}: each default header and parameter, configured ones, case variants,
percent-encoded and bracketed names, repeated parameters, parameters without values, fragments, targets
without a query, and bytes that are not text.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from rproxy.observe.redact import (
    SECRET_HEADERS,
    SECRET_PARAMS,
    redactHeaders,
    redactTarget,
    secretNames,
)


class RedactHeadersTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """Each default field's value is replaced; other fields are kept as they are, in order."""
        pairs = [
            (b"Host", b"example.com"),
            (b"Cookie", b"session=s3cret; theme=dark"),
            (b"Set-Cookie", b"session=s3cret; HttpOnly"),
            (b"Authorization", b"Digest username=u, response=s3cret"),
            (b"Proxy-Authorization", b"s3cret"),
            (b"Accept", b"*/*"),
        ]
        self.assertEqual(
            redactHeaders(pairs),
            [
                (b"Host", b"example.com"),
                (b"Cookie", b"[redacted]"),
                (b"Set-Cookie", b"[redacted]"),
                (b"Authorization", b"[redacted]"),
                (b"Proxy-Authorization", b"[redacted]"),
                (b"Accept", b"*/*"),
            ],
        )

    def test_schemeKept(self) -> None:
        """The scheme word of Basic and Bearer credentials is kept as sent, the credentials are not."""
        pairs = [
            (b"authorization", b"Basic dXNlcjpzM2NyZXQ="),
            (b"AUTHORIZATION", b"bearer eyJhbGciOi.s3cret"),
            (b"proxy-authorization", b"BASIC dXNlcjpzM2NyZXQ="),
            (b"authorization", b"Bearer"),
        ]
        self.assertEqual(
            redactHeaders(pairs),
            [
                (b"authorization", b"Basic [redacted]"),
                (b"AUTHORIZATION", b"bearer [redacted]"),
                (b"proxy-authorization", b"BASIC [redacted]"),
                (b"authorization", b"Bearer [redacted]"),
            ],
        )

    def test_schemeLike(self) -> None:
        """
        A value whose first word only looks like a scheme (no space after it, a tab, a longer word) is
        replaced whole: the first word may be the secret.
        """
        for value in [b"Basic\tdXNlcjpzM2NyZXQ=", b"Bearers3cret", b"s3cret", b"", b"\xff\x00 Basic"]:
            self.assertEqual(redactHeaders([(b"Authorization", value)]), [(b"Authorization", b"[redacted]")], value)

    def test_caseVariants(self) -> None:
        """Field names match in any case, and keep the case they were sent in."""
        self.assertEqual(
            redactHeaders([(b"cOoKiE", b"a=1"), (b"SET-COOKIE", b"b=2")]),
            [(b"cOoKiE", b"[redacted]"), (b"SET-COOKIE", b"[redacted]")],
        )

    def test_repeated(self) -> None:
        """Every field of a repeated name is replaced."""
        pairs = [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"set-cookie", b"c=3")]
        self.assertEqual(redactHeaders(pairs), [(b"set-cookie", b"[redacted]")] * 3)

    def test_configured(self) -> None:
        """Configured names (in any case) are redacted as well as the defaults, which stay."""
        names = secretNames(SECRET_HEADERS, ["X-Api-Key", "x-auth-token"])
        pairs = [(b"x-api-key", b"k"), (b"X-AUTH-TOKEN", b"t"), (b"cookie", b"c"), (b"x-other", b"o")]
        self.assertEqual(
            redactHeaders(pairs, names),
            [
                (b"x-api-key", b"[redacted]"),
                (b"X-AUTH-TOKEN", b"[redacted]"),
                (b"cookie", b"[redacted]"),
                (b"x-other", b"o"),
            ],
        )
        self.assertEqual(redactHeaders(pairs), [*pairs[:2], (b"cookie", b"[redacted]"), pairs[3]])

    def test_binary(self) -> None:
        """Bytes that are not text pass through untouched, or are replaced whole."""
        garbage = os.urandom(64)
        self.assertEqual(
            redactHeaders([(b"x-blob", garbage), (b"cookie", garbage)]),
            [(b"x-blob", garbage), (b"cookie", b"[redacted]")],
        )

    def test_noneNamed(self) -> None:
        """Without fields, nothing."""
        self.assertEqual(redactHeaders([]), [])


class RedactTargetTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """Each default parameter's value is replaced, and nothing else changes."""
        for name in sorted(SECRET_PARAMS):
            target = b"/p/a%20th?before=1&" + name + b"=s3cret&after=%2F"
            self.assertEqual(redactTarget(target), b"/p/a%20th?before=1&" + name + b"=[redacted]&after=%2F", name)

    def test_noQuery(self) -> None:
        """A target without a query is returned itself, whatever its path holds."""
        for target in [b"/", b"/token=x", b"/a;token=x/b", b"*", b"/%ff%00"]:
            self.assertIs(redactTarget(target), target)

    def test_noSecret(self) -> None:
        """A query without a secret parameter is returned as it came, the very object."""
        for target in [
            b"/search?q=hello&page=2",
            b"/?tokens=1&keys=2&mykey=3&token_type=bearer",
            b"/?%41=1",
            b"/?=token&x",
            b"/?",
        ]:
            self.assertIs(redactTarget(target), target)

    def test_caseVariants(self) -> None:
        """Names match in any case and keep theirs."""
        self.assertEqual(
            redactTarget(b"/?ACCESS_TOKEN=a&Token=b&kEy=c"),
            b"/?ACCESS_TOKEN=[redacted]&Token=[redacted]&kEy=[redacted]",
        )

    def test_percentEncodedNames(self) -> None:
        """A percent-encoded name is decoded to be compared, and kept encoded."""
        self.assertEqual(
            redactTarget(b"/?acc%65ss_token=a&%54%4f%4b%45%4e=b&pass%77ord=c&ok%3Dtoken=d"),
            b"/?acc%65ss_token=[redacted]&%54%4f%4b%45%4e=[redacted]&pass%77ord=[redacted]&ok%3Dtoken=d",
        )

    def test_bracketedNames(self) -> None:
        """Each part of a bracketed name is a name too (user[password], token[], as Rails and PHP read forms)."""
        self.assertEqual(
            redactTarget(b"/?user[password]=a&user%5Bpassword%5D=b&user[name]=c&token[]=d&[key]=e&a[b][key]=f"),
            b"/?user[password]=[redacted]&user%5Bpassword%5D=[redacted]&user[name]=c&token[]=[redacted]"
            b"&[key]=[redacted]&a[b][key]=[redacted]",
        )

    def test_repeated(self) -> None:
        """Every occurrence of a repeated parameter is replaced."""
        self.assertEqual(
            redactTarget(b"/?token=1&token=2&x=3&token=4"),
            b"/?token=[redacted]&token=[redacted]&x=3&token=[redacted]",
        )

    def test_withoutValues(self) -> None:
        """A name without C{=} has no value to hide; an empty value is replaced like any other."""
        self.assertEqual(redactTarget(b"/?token&key=&password=="), b"/?token&key=[redacted]&password=[redacted]")

    def test_valueWithEquals(self) -> None:
        """The value runs from the first C{=} to the next separator (base64 padding and all)."""
        self.assertEqual(redactTarget(b"/?signature=abc==&x=1"), b"/?signature=[redacted]&x=1")

    def test_semicolons(self) -> None:
        """C{;} separates query parameters as C{&} does."""
        self.assertEqual(redactTarget(b"/?a=1;token=2;b=3"), b"/?a=1;token=[redacted];b=3")

    def test_fragments(self) -> None:
        """
        A fragment ends a value, and its parameters are read too, with or without a query (an OAuth
        implicit grant puts the token there).
        """
        self.assertEqual(redactTarget(b"/cb?token=1#frag"), b"/cb?token=[redacted]#frag")
        self.assertEqual(redactTarget(b"/cb?a=1#access_token=2&b=3"), b"/cb?a=1#access_token=[redacted]&b=3")
        self.assertEqual(redactTarget(b"/cb#access_token=2&state=3"), b"/cb#access_token=[redacted]&state=3")

    def test_configured(self) -> None:
        """Configured names are redacted as well as the defaults, which stay; only the names given count."""
        params = secretNames(SECRET_PARAMS, ["X-Amz-Signature", "sig"])
        target = b"/o?X-Amz-Signature=a&sig=b&key=c&x=d"
        self.assertEqual(
            redactTarget(target, params), b"/o?X-Amz-Signature=[redacted]&sig=[redacted]&key=[redacted]&x=d"
        )
        self.assertEqual(redactTarget(target), b"/o?X-Amz-Signature=a&sig=b&key=[redacted]&x=d")

    def test_absoluteForm(self) -> None:
        """An absolute-form target keeps its scheme and authority."""
        self.assertEqual(redactTarget(b"http://h.example:8080/p?key=1"), b"http://h.example:8080/p?key=[redacted]")

    def test_binary(self) -> None:
        """
        Bytes that are not text, in names and values: only the secret values change, every other byte is
        kept, and random bytes never raise.
        """
        self.assertEqual(
            redactTarget(b"/\xff\x00?\xfe=\x80&token=\xc3\x28&%ff%zz=1&%=2"),
            b"/\xff\x00?\xfe=\x80&token=[redacted]&%ff%zz=1&%=2",
        )
        for _ in range(500):
            garbage = os.urandom(40)
            redacted = redactTarget(b"/?" + garbage + b"&token=s3cret")
            self.assertTrue(redacted.startswith(b"/?") and redacted.endswith(b"&token=[redacted]"), garbage)
            self.assertNotIn(b"s3cret", redacted, garbage)
