"""
The C{sendfile} filter (L{rproxy.filters.sendfile}): a real twisted.web upstream answers with X-Accel-Redirect
or X-Sendfile, and curl gets the file from the proxy, with ranges, or the proxy's refusal.
"""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes

from twisted.trial import unittest
from twisted.web import resource, server

from rproxy.interfaces import FilterEnvironment
from rproxy.plugins.filters import sendfile
from rproxy.test.support import (
    LogCapture,
    ReceivedRequest,
    ScriptedUpstream,
    curl,
    headerValues,
    responseStatus,
    startProxy,
    startUpstream,
    waitFor,
)


class _App(resource.Resource):
    """Names a file by the request's path: /accel/NAME, /sendfile/PATH, /raw/VALUE (any accel value)."""

    isLeaf = True

    def __init__(self, files: str) -> None:
        super().__init__()
        self.files = files

    def render_GET(self, request: server.Request) -> bytes:
        kind, _, rest = request.path[1:].partition(b"/")
        request.setHeader(b"Content-Disposition", b"attachment")
        request.setHeader(b"ETag", b'"app"')
        if kind == b"accel":
            request.setHeader(b"X-Accel-Redirect", b"/protected/" + rest)
        elif kind == b"sendfile":
            request.setHeader(b"X-Sendfile", os.fsencode(self.files) + b"/" + unquote_to_bytes(rest))
        elif kind == b"raw":
            request.setHeader(b"X-Accel-Redirect", rest.replace(b"~", b"/"))
        elif kind == b"body":
            request.setHeader(b"X-Accel-Redirect", b"/protected/data.bin")
            return b"ignored" * 50000
        return b""


class SendfileTests(unittest.TestCase):
    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.files = os.path.join(base, "files")
        os.makedirs(self.files)
        self.payload = os.urandom(200_000)
        with open(os.path.join(self.files, "data.bin"), "wb") as f:
            f.write(self.payload)
        upstream = startUpstream(self, server.Site(_App(self.files)))
        path = os.path.join(base, "rproxy.toml")
        with open(path, "w") as f:
            f.write(
                f'upstream = "{upstream.url}"\ndefault-filters = ["files"]\n[filters.files]\ntype = "sendfile"\n'
                f'roots = {{ "/protected/" = "files" }}\nsendfile-roots = ["files"]\n'
            )
        self.proxy = startProxy(self, [], "--config", path)

    async def get(self, path: str, *arguments: str) -> tuple[bytes, bytes]:
        code, out, err = await curl(["-s", "-D", "-", *arguments, f"http://127.0.0.1:{self.proxy.port}{path}"])
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        return head, body

    async def test_served(self) -> None:
        """The file replaces the response; the header and the upstream's body fields never reach the client."""
        for path in ("/accel/data.bin", "/sendfile/data.bin", "/body"):
            head, body = await self.get(path)
            self.assertEqual((responseStatus(head), body == self.payload), (200, True), path)
            self.assertEqual(headerValues(head, b"x-accel-redirect") + headerValues(head, b"x-sendfile"), [])
            self.assertEqual(headerValues(head, b"content-disposition"), [b"attachment"])
            self.assertNotEqual(headerValues(head, b"etag"), [b'"app"'])
        head, body = await self.get("/accel/data.bin", "--http2-prior-knowledge", "-r", "100-199")
        self.assertEqual((responseStatus(head), body), (206, self.payload[100:200]))
        [etag] = headerValues(head, b"etag")
        head, body = await self.get("/accel/data.bin", "-H", b"If-None-Match: " + etag)
        self.assertEqual((responseStatus(head), body), (304, b""))

    async def test_refused(self) -> None:
        """Outside the roots is the upstream's 502 with a reason, in the response and the log; a missing file a 404."""
        log = LogCapture(self)
        for path, status, reason in [
            ("/raw/~etc~passwd", 502, b"'/etc/passwd' is refused: outside the allowed locations"),
            ("/raw/~protected~..~..~etc~passwd", 502, b"has a '..' segment"),
            ("/raw/~protected~a%2f..%2f..%2fx", 502, b"encoded slash"),
            ("/sendfile/..%2f..%2fetc%2fpasswd", 502, b"outside the allowed directories"),
            ("/accel/missing.bin", 404, b"no file at '/protected/missing.bin'"),
            ("/sendfile/missing.bin", 404, b"no file at 'missing.bin'"),
        ]:
            head, body = await self.get(path)
            self.assertEqual(responseStatus(head), status, (path, body))
            self.assertIn(reason, body, path)
        head, _ = await self.get("/raw/~etc~passwd")
        self.assertEqual(headerValues(head, b"x-rproxy-fault"), [b"upstream"])
        logged = [event["reason"] for event in log.withStatus(502)]
        self.assertIn("the upstream's X-Accel-Redirect '/etc/passwd' is refused: outside the allowed locations", logged)

    def test_options(self) -> None:
        """Bad options name the option."""
        environment = FilterEnvironment(reactor=None, base=self.files)
        with self.assertRaises(ValueError) as raised:
            sendfile.build({}, environment)
        self.assertIn("option roots: give roots", str(raised.exception))
        with self.assertRaises(ValueError) as raised:
            sendfile.build({"roots": {"/p/": "nowhere"}}, environment)
        self.assertIn("option roots: no directory 'nowhere'", str(raised.exception))
        with self.assertRaises(ValueError) as raised:
            sendfile.build({"sendfile-roots": ["."], "accel-header": "bad header"}, environment)
        self.assertIn("option accel-header: not a field name", str(raised.exception))


class ConnectionTests(unittest.TestCase):
    """The upstream's connection after a takeover: kept when its response had no body, closed when it had one."""

    async def test_connections(self) -> None:
        files = os.path.abspath(self.mktemp())
        os.makedirs(files)
        with open(os.path.join(files, "f.txt"), "wb") as f:
            f.write(b"from the file\n")
        bodies = {b"/empty": b"", b"/body": b"x" * 300_000}

        def respond(proto: object, request: ReceivedRequest) -> bytes:
            body = bodies[request.requestLine.split(b" ")[1]]
            head = b"HTTP/1.1 200 OK\r\nX-Accel-Redirect: /p/f.txt\r\nContent-Length: %d\r\n\r\n" % len(body)
            return head + body

        upstream = ScriptedUpstream(self, respond)
        base = os.path.dirname(files)
        path = os.path.join(base, "rproxy.toml")
        with open(path, "w") as f:
            f.write(
                f'upstream = "{upstream.url}"\ndefault-filters = ["files"]\n[filters.files]\ntype = "sendfile"\n'
                f'roots = {{ "/p/" = "{files}" }}\n'
            )
        proxy = startProxy(self, [], "--config", path)
        for target in ("/empty", "/empty", "/body", "/body"):
            code, out, _ = await curl(["-s", f"http://127.0.0.1:{proxy.port}{target}"])
            self.assertEqual(out, b"from the file\n", target)
        await waitFor(lambda: len(upstream.lost) >= 2)
        # One connection carried both bodiless responses and the first with a body, closed for its unread body;
        # the second with a body came on a new one, closed too.
        self.assertEqual((len(upstream.requests), len(upstream.connections), len(upstream.lost)), (4, 2, 2))
