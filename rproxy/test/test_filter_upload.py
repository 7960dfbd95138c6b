"""
The C{upload} filter through a real proxy: bodies and forms stored in a directory and in a real S3 API server
(moto's), the signed field checked by a sample upstream with the documented snippet, and every way an upload
can fail leaving nothing behind; a 1 GiB upload through a C{twist rproxy} process in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any

import jwt
from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.interfaces import IProcessTransport
from twisted.trial import unittest
from twisted.web import resource, server

from rproxy.interfaces import FilterEnvironment
from rproxy.plugins.filters import upload
from rproxy.test.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, s3Server
from rproxy.test.support import (
    BIN,
    curl,
    freePort,
    rawRequest,
    responseStatus,
    sleep,
    startProxy,
    startUpstream,
    useFilters,
    waitFor,
)
from rproxy.test.upload_upstream import SNIPPET, UploadUpstream, loadSnippet
from rproxy.testing import verifyFilterFactory
from rproxy.upload.multipart import safeFilename
from rproxy.upload.signing import StoredField, UploadSigner
from rproxy.upload.storage import StoredObject, _directoryError

SECRET = b"a shared secret of forty bytes, or more."
MIB = 1 << 20


def chunked(body: bytes, piece: int = 65536) -> bytes:
    """C{body} in HTTP/1.1 chunks, with the last chunk."""
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)]
    return b"".join(b"%x\r\n%s\r\n" % (len(each), each) for each in pieces) + b"0\r\n\r\n"


def post(target: bytes, body: bytes, contentType: bytes = b"application/octet-stream", length: bool = False) -> bytes:
    """A POST of C{body}, chunked unless C{length}."""
    framing = b"Content-Length: %d\r\n" % len(body) if length else b"Transfer-Encoding: chunked\r\n"
    head = b"POST %s HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\nContent-Type: %s\r\n" % (target, contentType)
    return head + framing + b"\r\n" + (body if length else chunked(body))


def files(directory: str) -> list[str]:
    """Every file under C{directory}, relative to it."""
    found = []
    for parent, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, name), directory) for name in names]
    return sorted(found)


def formFields(body: bytes, contentType: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data C{body} (each name once)."""
    import multipart

    boundary = multipart.parse_options_header(contentType.decode())[1]["boundary"]
    fields: dict[str, bytes] = {}
    parser = multipart.PushMultipartParser(boundary)
    name = ""
    for event in [*parser.parse(body), *parser.parse(b"")]:
        if isinstance(event, multipart.MultipartSegment):
            name = event.name
            fields[name] = b""
        elif event is not None:
            fields[name] += event
    return fields


class _Cutter(protocol.Protocol):
    """Sends a request's head and part of its body, then closes the connection when told to."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]


async def cutOff(port: int, payload: bytes) -> protocol.Protocol:
    """A connection that sent C{payload} (call C{transport.abortConnection()} to cut it)."""
    creator = protocol.ClientCreator(reactor, _Cutter, payload)
    return await creator.connectTCP("127.0.0.1", port)  # type: ignore[no-any-return]


class UploadTestCase(unittest.TestCase):
    """Starts a sample upstream and a proxy with an upload filter."""

    timeout = 60

    def offload(self, storage: dict[str, object], **options: object) -> tuple[UploadUpstream, Any, Any]:
        """The upstream, the proxy and the filter, built from C{storage} and C{options}."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        with open(os.path.join(base, "secret"), "wb") as f:
            f.write(SECRET + b"\n")
        upstream = UploadUpstream(SECRET)
        listening = startUpstream(self, server.Site(upstream))
        proxy = startProxy(self, [listening.url])
        built = upload.build(
            {"storage": storage, "signing-key-file": "secret", **options}, FilterEnvironment(reactor, base)
        )
        self.addCleanup(built.close)  # type: ignore[union-attr]
        useFilters(proxy, built)
        return upstream, proxy, built

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path


class DirectoryTests(UploadTestCase):
    """Uploads stored in a local directory."""

    async def test_wholeBody(self) -> None:
        """
        A body of unknown length becomes one object; the upstream gets no body (Content-Length: 0) and a
        token the documented snippet verifies, naming the object's key, size and SHA-256.
        """
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory})
        body = os.urandom(3 * MIB + 17)
        response = await rawRequest(proxy.port, post(b"/files?x=1", body))
        self.assertEqual(responseStatus(response), 201, response[:300])
        [seen] = upstream.received
        self.assertEqual(seen.headers[b"content-length"], [b"0"])
        self.assertEqual(seen.body, b"")
        assert seen.claims is not None
        self.assertEqual((seen.claims["method"], seen.claims["path"]), ("POST", "/files?x=1"))
        [stored] = seen.claims["objects"]
        self.assertEqual(stored["size"], len(body))
        self.assertEqual(stored["sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(stored["content_type"], "application/octet-stream")
        self.assertEqual(files(directory), [stored["key"]])
        self.assertEqual(stored["location"], os.path.join(directory, stored["key"]))
        with open(stored["location"], "rb") as f:
            self.assertEqual(f.read(), body)

    async def test_form(self) -> None:
        """
        A form from curl: the file part is stored, the other field kept, the file replaced by fields naming
        its object; the client's hostile file name is passed on sanitized and never used as a path.
        """
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory})
        source = os.path.join(self.directory(), "data.bin")
        content = os.urandom(2 * MIB + 5)
        with open(source, "wb") as f:
            f.write(content)
        code, out, err = await curl(
            [
                "-sS",
                "-F",
                "title=holiday pictures",
                "-F",
                f"file=@{source};filename=../../etc/passwd;type=image/png",
                f"{proxy.url}/forms",
            ]
        )
        self.assertEqual(code, 0, err)
        [seen] = upstream.received
        assert seen.claims is not None, seen.refusal
        fields = formFields(seen.body, seen.headers[b"content-type"][0])
        self.assertEqual(fields["title"], b"holiday pictures")
        self.assertNotIn("file", fields)
        self.assertEqual(fields["file.name"], b"passwd")
        self.assertEqual(fields["file.content_type"], b"image/png")
        self.assertEqual(fields["file.size"], b"%d" % len(content))
        self.assertEqual(fields["file.sha256"], hashlib.sha256(content).hexdigest().encode())
        key = fields["file.key"].decode()
        self.assertRegex(key, "^[0-9a-f]{32}$")
        self.assertEqual(files(directory), [key])
        with open(os.path.join(directory, key), "rb") as f:
            self.assertEqual(f.read(), content)
        [stored] = seen.claims["objects"]
        self.assertEqual((stored["field"], stored["filename"], stored["key"]), ("file", "passwd", key))
        self.assertEqual(json.loads(out)["body_size"], len(seen.body))

    async def test_http2(self) -> None:
        """A form over HTTP/2 (h2c) is rewritten alike; a token the client sends itself never reaches the upstream."""
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory})
        source = os.path.join(self.directory(), "a.txt")
        with open(source, "wb") as f:
            f.write(b"abc")
        code, out, err = await curl(
            [
                "-sS",
                "--http2-prior-knowledge",
                "-H",
                "Rproxy-Upload: forged",
                "-F",
                "note=hi",
                "-F",
                f"doc=@{source};filename=a b.txt",
                f"{proxy.url}/h2",
            ],
        )
        self.assertEqual(code, 0, err)
        [seen] = upstream.received
        self.assertEqual(seen.headers[b"rproxy-upload"], [seen.headers[b"rproxy-upload"][0]])
        assert seen.claims is not None, seen.refusal
        [stored] = seen.claims["objects"]
        self.assertEqual((stored["field"], stored["filename"], stored["size"]), ("doc", "a b.txt", 3))
        self.assertEqual(formFields(seen.body, seen.headers[b"content-type"][0])["note"], b"hi")
        self.assertEqual(os.stat(stored["location"]).st_mode & 0o777, 0o640)

    async def test_brokenBoundary(self) -> None:
        """A form whose boundary never comes is a 400; nothing is stored, the upstream gets nothing."""
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory})
        body = b'--other\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n' + b"x" * 300000
        response = await rawRequest(proxy.port, post(b"/", body, b"multipart/form-data; boundary=expected"))
        self.assertEqual(responseStatus(response), 400)
        self.assertIn(b"malformed multipart/form-data body", response)
        self.assertEqual(upstream.received, [])
        self.assertEqual(files(directory), [])
        # A truncated part: the file was being stored, and is gone.
        body = b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n' + b"x" * (3 * MIB)
        response = await rawRequest(proxy.port, post(b"/", body, b"multipart/form-data; boundary=b"))
        self.assertEqual(responseStatus(response), 400)
        self.assertTrue(await waitFor(lambda: files(directory) == []))

    async def test_overLimit(self) -> None:
        """A body over max-size is a 413, declared (at once) or not (when it gets there); nothing is left."""
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory}, **{"max-size": "2MiB"})
        body = b"y" * (3 * MIB)
        response = await rawRequest(proxy.port, post(b"/", body, length=True))
        self.assertEqual(responseStatus(response), 413)
        self.assertIn(b"over 2097152 bytes (max-size)", response)
        response = await rawRequest(proxy.port, post(b"/", body))
        self.assertEqual(responseStatus(response), 413)
        self.assertEqual(upstream.received, [])
        self.assertTrue(await waitFor(lambda: files(directory) == []))

    async def test_cutOff(self) -> None:
        """A client that stops sending midway: what was stored of its body is removed, the upstream gets nothing."""
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory})
        head = post(b"/", b"")[: -len(b"0\r\n\r\n")]
        connection = await cutOff(proxy.port, head + chunked(b"z" * (4 * MIB))[:-5])
        self.assertTrue(await waitFor(lambda: files(directory) != []), "nothing was being stored")
        [temporary] = files(directory)
        self.assertTrue(temporary.startswith(".rproxy-upload-"), temporary)
        connection.transport.abortConnection()  # type: ignore[union-attr]
        self.assertTrue(await waitFor(lambda: files(directory) == []), files(directory))
        self.assertEqual(upstream.received, [])
        # Other traffic is unaffected.
        response = await rawRequest(proxy.port, post(b"/", b"fine"))
        self.assertEqual(responseStatus(response), 201)

    async def test_upstreamRejects(self) -> None:
        """An upstream that answers 4xx: its answer goes to the client, and the object is deleted."""
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory})
        response = await rawRequest(proxy.port, post(b"/reject", b"unwanted"))
        self.assertEqual(responseStatus(response), 422)
        self.assertEqual(len(upstream.received), 1)
        self.assertTrue(await waitFor(lambda: files(directory) == []), files(directory))

    async def test_expiredToken(self) -> None:
        """A token that expired before the upstream saw it is refused there (403), and the object deleted."""
        directory = self.directory()
        upstream, proxy, built = self.offload({"type": "directory", "path": directory})
        built.signer = UploadSigner(SECRET, "HS256", 60, clock=lambda: time.time() - 120)
        response = await rawRequest(proxy.port, post(b"/late", b"too late"))
        self.assertEqual(responseStatus(response), 403)
        self.assertIn(b"bad upload token: Signature has expired", response)
        self.assertEqual(upstream.received[0].refusal, "Signature has expired")
        self.assertTrue(await waitFor(lambda: files(directory) == []), files(directory))

    async def test_upstreamDown(self) -> None:
        """An upstream that cannot be reached: the client's 502 or 503, and the object is deleted."""
        directory = self.directory()
        _, proxy, built = self.offload({"type": "directory", "path": directory})
        down = startProxy(self, [f"http://127.0.0.1:{freePort()}"])
        useFilters(down, built)
        response = await rawRequest(down.port, post(b"/", b"lost"))
        self.assertIn(responseStatus(response), (502, 503))
        self.assertTrue(await waitFor(lambda: files(directory) == []), files(directory))

    async def test_storageRefuses(self) -> None:
        """A directory that cannot be written is a 503 saying so; a full disk would be a 507."""
        blocker = os.path.join(self.directory(), "a-file")
        open(blocker, "w").close()
        _, proxy, _ = self.offload({"type": "directory", "path": blocker})
        response = await rawRequest(proxy.port, post(b"/", b"x" * (2 * MIB)))
        self.assertEqual(responseStatus(response), 503)
        self.assertIn(b"upload directory cannot be written", response)
        full = _directoryError(OSError(28, "No space left on device"))
        self.assertEqual((full.status, full.reason), (507, "upload storage is full: No space left on device"))


class PreauthorizeTests(UploadTestCase):
    """The pre-authorization subrequest."""

    def preauthorizer(self) -> tuple[str, list[tuple[server.Request, bytes]]]:
        asked: list[tuple[server.Request, bytes]] = []

        class Service(resource.Resource):
            isLeaf = True

            def render(self, request: server.Request) -> bytes:
                asked.append((request, request.content.read()))  # type: ignore[union-attr]
                if request.path == b"/deny":
                    request.setResponseCode(401)
                    request.setHeader(b"www-authenticate", b'Bearer realm="uploads"')
                    return b"no uploads for you\n"
                if request.path == b"/garbage":
                    return b"not json"
                if request.path == b"/pass":
                    return b'{"offload": false}'
                return json.dumps({"prefix": "user-7/", "max_size": 1000}).encode()

        return startUpstream(self, server.Site(Service())).url, asked

    async def test_grant(self) -> None:
        """A 2xx JSON answer: the object key has its prefix, and its max_size is the limit (413 beyond)."""
        url, asked = self.preauthorizer()
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory}, preauthorize=url + "/ok")
        response = await rawRequest(
            proxy.port, post(b"/up", b"small", length=True).replace(b"\r\n\r\n", b"\r\nCookie: s=1\r\n\r\n", 1)
        )
        self.assertEqual(responseStatus(response), 201)
        [(request, content)] = asked
        self.assertEqual(request.method, b"POST")
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-forwarded-uri"), [b"/up"])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"cookie"), [b"s=1"])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-upload-length"), [b"5"])
        self.assertEqual(content, b"")
        [stored] = upstream.received[0].claims["objects"]  # type: ignore[index]
        self.assertTrue(stored["key"].startswith("user-7/"), stored)
        self.assertEqual(files(directory), [stored["key"]])
        response = await rawRequest(proxy.port, post(b"/up", b"b" * 2000))
        self.assertEqual(responseStatus(response), 413)
        self.assertTrue(await waitFor(lambda: len(files(directory)) == 1))

    async def test_noOffload(self) -> None:
        """C{"offload": false}: the request goes upstream as it is, body and all, without a token."""
        url, _ = self.preauthorizer()
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory}, preauthorize=url + "/pass")
        response = await rawRequest(proxy.port, post(b"/up", b"kept inline"))
        self.assertEqual(responseStatus(response), 403)  # the sample upstream wants a token
        [seen] = upstream.received
        self.assertEqual((seen.body, seen.headers.get(b"rproxy-upload")), (b"kept inline", None))
        self.assertEqual(files(directory), [])

    async def test_refusal(self) -> None:
        """Any other answer is the client's, as the service gave it; nothing is stored or proxied."""
        url, _ = self.preauthorizer()
        directory = self.directory()
        upstream, proxy, _ = self.offload({"type": "directory", "path": directory}, preauthorize=url + "/deny")
        response = await rawRequest(proxy.port, post(b"/up", b"data"))
        self.assertEqual(responseStatus(response), 401)
        self.assertIn(b'www-authenticate: Bearer realm="uploads"', response.lower().replace(b"bearer", b"Bearer"))
        self.assertTrue(response.endswith(b"no uploads for you\n"))
        self.assertEqual(upstream.received, [])
        self.assertEqual(files(directory), [])

    async def test_unavailable(self) -> None:
        """A service that is down, or answers garbage: 503 and 502, saying so; nothing stored."""
        url, _ = self.preauthorizer()
        directory = self.directory()
        upstream, proxy, built = self.offload(
            {"type": "directory", "path": directory}, preauthorize=f"http://127.0.0.1:{freePort()}/"
        )
        response = await rawRequest(proxy.port, post(b"/up", b"data"))
        self.assertEqual(responseStatus(response), 503)
        self.assertIn(b"pre-authorization service unavailable", response)
        _, garbled, _ = self.offload({"type": "directory", "path": directory}, preauthorize=url + "/garbage")
        response = await rawRequest(garbled.port, post(b"/up", b"data"))
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"pre-authorization answer is not a JSON object", response)
        self.assertEqual(upstream.received, [])
        self.assertEqual(files(directory), [])


class SignatureTests(unittest.TestCase):
    """The token, as the documented snippet checks it."""

    def setUp(self) -> None:
        self.verify = loadSnippet().verifyUpload
        stored = StoredObject("k", "/srv/k", 3, hashlib.sha256(b"abc").hexdigest())
        self.objects = [StoredField(stored)]

    def test_verified(self) -> None:
        token = UploadSigner(SECRET, "HS256", 60).sign(b"POST", b"/a", hashlib.sha256(b"").hexdigest(), 0, self.objects)
        claims = self.verify(token, SECRET, "HS256", "POST", "/a", b"")
        self.assertEqual(claims["objects"][0]["key"], "k")

    def test_tampered(self) -> None:
        """Another path, body or key, or a token re-signed by someone else, is refused."""
        digest = hashlib.sha256(b"").hexdigest()
        token = UploadSigner(SECRET, "HS256", 60).sign(b"POST", b"/a", digest, 0, self.objects)
        for arguments in [("POST", "/b", b""), ("PUT", "/a", b""), ("POST", "/a", b"x")]:
            self.assertRaises(jwt.InvalidTokenError, self.verify, token, SECRET, "HS256", *arguments)
        forged = jwt.encode(jwt.decode(token, options={"verify_signature": False}), b"x" * 40, algorithm="HS256")
        self.assertRaises(jwt.InvalidSignatureError, self.verify, forged, SECRET, "HS256", "POST", "/a", b"")
        header, payload, signature = token.split(".")
        self.assertRaises(
            jwt.InvalidTokenError,
            self.verify,
            f"{header}.{payload[:-2]}AA.{signature}",
            SECRET,
            "HS256",
            "POST",
            "/a",
            b"",
        )

    def test_expired(self) -> None:
        signer = UploadSigner(SECRET, "HS256", 60, clock=lambda: time.time() - 120)
        token = signer.sign(b"POST", b"/a", hashlib.sha256(b"").hexdigest(), 0, self.objects)
        self.assertRaises(jwt.ExpiredSignatureError, self.verify, token, SECRET, "HS256", "POST", "/a", b"")

    def test_keyPair(self) -> None:
        """EdDSA with a private key; the upstream holds the public one."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        token = UploadSigner(pem, "EdDSA", 60).sign(b"POST", b"/a", hashlib.sha256(b"").hexdigest(), 0, self.objects)
        self.assertEqual(self.verify(token, public, "EdDSA", "POST", "/a", b"")["iss"], "rproxy")
        self.assertRaises(ValueError, UploadSigner, pem, "ES256", 60)
        self.assertRaises(ValueError, UploadSigner, b"short", "HS256", 60)

    def test_documentedSnippet(self) -> None:
        """The verification function docs/smart-proxy.md shows is the one the sample upstream runs."""
        from rproxy.test.upload_upstream import ROOT

        with open(os.path.join(ROOT, "docs", "smart-proxy.md"), encoding="utf-8") as f:
            [snippet] = re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)
        namespace: dict[str, Any] = {}
        exec(compile(snippet, "docs/smart-proxy.md", "exec"), namespace)
        documented = namespace["verifyUpload"]
        token = UploadSigner(SECRET, "HS256", 60).sign(
            b"POST", b"/a", hashlib.sha256(b"f").hexdigest(), 1, self.objects
        )
        self.assertEqual(
            documented(token, SECRET, "HS256", "POST", "/a", b"f"),
            self.verify(token, SECRET, "HS256", "POST", "/a", b"f"),
        )
        self.assertRaises(jwt.InvalidTokenError, documented, token, SECRET, "HS256", "POST", "/a", b"g")
        shown = re.sub(r'\n    """.*?"""\n', "\n", open(SNIPPET, encoding="utf-8").read(), flags=re.S)
        self.assertIn(snippet.strip(), shown)

    async def test_forgedThroughUpstream(self) -> None:
        """The sample upstream refuses a request that did not come through the proxy."""
        upstream = UploadUpstream(SECRET)
        listening = startUpstream(self, server.Site(upstream))
        forged = jwt.encode({"iss": "rproxy", "exp": int(time.time()) + 60, "iat": 0}, b"y" * 40, algorithm="HS256")
        response = await rawRequest(
            listening.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\nRproxy-Upload: %s\r\n\r\n"
            % forged.encode(),
        )
        self.assertEqual(responseStatus(response), 403)
        self.assertIn(b"bad upload token: Signature verification failed", response)


class OptionTests(unittest.TestCase):
    """The filter's options."""

    def test_options(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        with open(os.path.join(base, "secret"), "wb") as f:
            f.write(SECRET)
        environment = FilterEnvironment(reactor, base)
        good = {"storage": {"type": "directory", "path": "up"}, "signing-key-file": "secret"}
        verifyFilterFactory(upload, {**good, "signing-key-file": os.path.join(base, "secret")}, reactor)
        for changed, message in [
            ({"storage": {"type": "ftp"}}, "option storage"),
            ({"storage": {"type": "directory"}}, "option path"),
            ({"storage": {"type": "directory", "path": "x", "colour": 1}}, "unknown option 'colour'"),
            ({"storage": {"type": "s3", "bucket": "b", "prefix": "../x/"}}, "option prefix"),
            ({"storage": {"type": "s3", "bucket": "b", "access-key-id-file": "secret"}}, "access-key-id-file"),
            ({"signing-key-file": "missing"}, "option signing-key-file: cannot be read"),
            ({"algorithm": "none"}, "option algorithm"),
            ({"algorithm": "RS256"}, "option signing-key-file"),
            ({"part-size": "1MiB"}, "option part-size"),
            ({"preauthorize": "ftp://x"}, "option preauthorize"),
            ({"header": "bad header"}, "option header"),
        ]:
            with self.assertRaises(ValueError) as raised:
                upload.build({**good, **changed}, environment)
            self.assertIn(message, str(raised.exception))
            self.assertNotIn(SECRET.decode(), str(raised.exception))

    def test_safeFilename(self) -> None:
        for given, kept in [
            ("../../etc/passwd", "passwd"),
            ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
            ("..", None),
            (".htaccess", "htaccess"),
            ('a\r\nb\x00c;d"e.txt', "a__b_c_d_e.txt"),
            ("résumé.pdf", "résumé.pdf"),
        ]:
            self.assertEqual(safeFilename(given), kept, given)


class S3Tests(UploadTestCase):
    """Uploads stored in a real S3 API server (moto's)."""

    def s3(self, bucket: str, **options: object) -> tuple[UploadUpstream, Any, Any]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        for name, value in [("key-id", ACCESS_KEY_ID), ("secret-key", SECRET_ACCESS_KEY)]:
            with open(os.path.join(base, name), "w") as f:
                f.write(value + "\n")
        storage = {
            "type": "s3",
            "endpoint": s3Server().endpoint,
            "bucket": bucket,
            "region": REGION,
            "prefix": "incoming/",
            "access-key-id-file": os.path.join(base, "key-id"),
            "secret-access-key-file": os.path.join(base, "secret-key"),
        }
        return self.offload(storage, **{"part-size": "5MiB", **options})

    async def object(self, bucket: str, key: str) -> bytes:
        s3 = s3Server()
        answer = await s3.call(s3.client.get_object, Bucket=bucket, Key=key)
        return await s3.call(answer["Body"].read)  # type: ignore[no-any-return]

    async def test_multipartAndSinglePut(self) -> None:
        """
        A 12 MiB body of unknown length is a multipart upload of three parts; a small form's file one
        PutObject; both objects whole, with the digests the token names.
        """
        s3 = s3Server()
        bucket = await s3.bucket()
        upstream, proxy, _ = self.s3(bucket)
        body = os.urandom(12 * MIB + 1000)
        response = await rawRequest(proxy.port, post(b"/big", body), timeout=30)
        self.assertEqual(responseStatus(response), 201, response[-300:])
        [stored] = upstream.received[0].claims["objects"]  # type: ignore[index]
        self.assertEqual(stored["location"], f"s3://{bucket}/{stored['key']}")
        self.assertTrue(stored["key"].startswith("incoming/"))
        self.assertEqual(stored["sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(await self.object(bucket, stored["key"]), body)
        head = await s3.call(s3.client.head_object, Bucket=bucket, Key=stored["key"])
        self.assertTrue(head["ETag"].endswith('-3"'), head["ETag"])  # a multipart upload's ETag names its parts
        small = b'--b\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\n\r\nsmall file\r\n--b--\r\n'
        response = await rawRequest(proxy.port, post(b"/small", small, b"multipart/form-data; boundary=b", True))
        self.assertEqual(responseStatus(response), 201, response[-300:])
        [single] = upstream.received[1].claims["objects"]  # type: ignore[index]
        self.assertEqual(await self.object(bucket, single["key"]), b"small file")
        head = await s3.call(s3.client.head_object, Bucket=bucket, Key=single["key"])
        self.assertNotIn("-", head["ETag"])
        self.assertEqual(await s3.keys(bucket), sorted([stored["key"], single["key"]]))

    async def test_bucketMissing(self) -> None:
        """Storage that refuses (no such bucket) is a 502 naming the refusal."""
        _, proxy, _ = self.s3("rproxy-no-such-bucket")
        response = await rawRequest(proxy.port, post(b"/", b"data"))
        self.assertEqual(responseStatus(response), 502)
        self.assertIn(b"object storage refused the upload: NoSuchBucket", response)

    async def test_cutOffAndRejected(self) -> None:
        """A cut-off upload leaves no object and no pending multipart upload; a rejected one no object."""
        s3 = s3Server()
        bucket = await s3.bucket()
        upstream, proxy, _ = self.s3(bucket)
        head = post(b"/", b"")[: -len(b"0\r\n\r\n")]
        connection = await cutOff(proxy.port, head + chunked(os.urandom(11 * MIB))[:-5])
        started = False
        for _ in range(100):
            if await s3.pendingUploads(bucket):
                started = True
                break
            await sleep(0.1)
        self.assertTrue(started, "no multipart upload was started")
        connection.transport.abortConnection()  # type: ignore[union-attr]
        for _ in range(100):
            if not await s3.pendingUploads(bucket):
                break
            await sleep(0.1)
        self.assertEqual(await s3.pendingUploads(bucket), [])
        response = await rawRequest(proxy.port, post(b"/reject", b"refused"))
        self.assertEqual(responseStatus(response), 422)
        for _ in range(100):
            if not await s3.keys(bucket):
                break
            await sleep(0.1)
        self.assertEqual(await s3.keys(bucket), [])
        self.assertEqual(len(upstream.received), 1)


#: The 1 GiB upload's size.
GIB = 1 << 30

#: How much the proxy process's resident memory may grow while it offloads 1 GiB.
RSS_GROWTH_LIMIT = 64 * MIB


def statusKiB(pid: int, field: str) -> int:
    """A C{/proc/PID/status} memory field (C{VmRSS}, C{VmHWM}: the peak), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class _Twist(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-4000:]

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)


class ProcessTests(unittest.TestCase):
    """Uploads through a C{twist rproxy} process: 1 GiB measured from its /proc, a file size limit."""

    timeout = 120

    async def proxyProcess(
        self, launcher: tuple[str, ...] = ()
    ) -> tuple[UploadUpstream, IProcessTransport, _Twist, str, str]:
        """
        A C{twist rproxy} process (run by C{launcher}, such as C{prlimit}) offloading to a directory, once it
        has proxied a first small upload: the upstream, the process, its protocol, its URL and the directory.
        """
        import rproxy

        root = os.path.dirname(os.path.dirname(os.path.abspath(rproxy.__file__)))
        base = os.path.abspath(self.mktemp())
        store = os.path.join(base, "store")
        os.makedirs(store)
        with open(os.path.join(base, "secret"), "wb") as f:
            f.write(SECRET)
        upstream = UploadUpstream(SECRET)
        listening = startUpstream(self, server.Site(upstream))
        port = freePort()
        config = os.path.join(base, "rproxy.toml")
        with open(config, "w") as f:
            f.write(
                f'listen = ["tcp:{port}:interface=127.0.0.1"]\n\n'
                f'[services.app]\nupstreams = ["{listening.url}"]\n\n'
                '[filters.uploads]\ntype = "upload"\nstorage = { type = "directory", path = "store" }\n'
                'signing-key-file = "secret"\n\n'
                '[[routes]]\npath-prefix = "/"\nservice = "app"\nfilters = ["uploads"]\n'
            )
        twist = _Twist()
        environment = {**os.environ, "PYTHONPATH": root}
        argv = [*launcher, os.path.join(BIN, "python"), "-m", "twisted", "rproxy", "--access-log", "off"]
        process = reactor.spawnProcess(twist, argv[0], [*argv, "--config", config], env=environment, path=root)

        async def stop() -> None:
            if not twist.ended.called:
                process.signalProcess("KILL")
                await twist.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        url = f"http://127.0.0.1:{port}/up"
        for _ in range(200):
            code, _, _ = await curl(["-sS", "-o", "/dev/null", "--data-binary", "warm", url], timeout=5)
            if code == 0:
                break
            await sleep(0.1)
        self.assertEqual(len(upstream.received), 1, twist.output)
        return upstream, process, twist, url, store

    async def test_storageFull(self) -> None:
        """
        Storage that is full (here: the process may write no file over 2 MiB, so a write fails with EFBIG as
        it would with ENOSPC) is a 507 saying so; the partial file is removed, and the process serves on.
        """
        upstream, _, _, url, store = await self.proxyProcess(("prlimit", f"--fsize={2 * MIB}", "--"))
        warm = files(store)
        source = os.path.join(os.path.abspath(self.mktemp()))
        with open(source, "wb") as f:
            f.write(b"f" * (3 * MIB))
        code, out, err = await curl(["-sS", "-H", "Transfer-Encoding: chunked", "-T", source, url])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"507 Insufficient Storage: upload storage is full: File too large\n")
        self.assertEqual(files(store), warm)
        code, out, err = await curl(["-sS", "--data-binary", "small", url])
        self.assertEqual(json.loads(out)["objects"][0]["size"], 5)
        self.assertEqual(len(upstream.received), 2)

    async def test_oneGiB(self) -> None:
        """
        1 GiB of unknown length (curl sends stdin chunked) is stored whole, with the right digest, while the
        proxy process's peak resident memory (VmHWM) grows less than 64 MiB over what it had after a small
        upload; the upstream verifies the token.
        """
        upstream, process, twist, url, store = await self.proxyProcess()
        before = statusKiB(process.pid, "VmRSS")
        started = time.monotonic()
        command = f"head -c {GIB} /dev/zero | curl -sS -T - -X POST --max-time 100 {url}"
        done = await utils.getProcessOutputAndValue("/bin/sh", ["-c", command], env=os.environ)
        elapsed = time.monotonic() - started
        peak = statusKiB(process.pid, "VmHWM")
        self.assertEqual(done[2], 0, done)
        [_, seen] = upstream.received
        assert seen.claims is not None, seen.refusal
        [stored] = seen.claims["objects"]
        zeros = hashlib.sha256()
        block = bytes(MIB)
        for _ in range(GIB // MIB):
            zeros.update(block)
        self.assertEqual((stored["size"], stored["sha256"]), (GIB, zeros.hexdigest()))
        path = os.path.join(store, stored["key"])
        self.assertEqual(os.path.getsize(path), GIB)
        os.unlink(path)
        growth = (peak - before) * 1024
        print(f"\n1 GiB offloaded in {elapsed:.1f} s; proxy RSS {before // 1024} MiB, peak {peak // 1024} MiB")
        self.assertLess(growth, RSS_GROWTH_LIMIT, f"the proxy's peak RSS grew by {growth / MIB:.0f} MiB")
        process.signalProcess("TERM")
        await twist.ended
