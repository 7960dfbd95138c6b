"""
Local routes (L{rproxy.local}): static directories, handlers and canned responses served by a running proxy
to real clients (curl over HTTP/1.1 and HTTP/2, raw sockets), with a real upstream for the proxied rest.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import reactor
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web import resource, server, static

from rproxy.app.tap import Options
from rproxy.local.handlers import HandlerRequest
from rproxy.local.static import StaticDirectory
from rproxy.proxy.balancers import FirstAvailable
from rproxy.proxy.directors import Route, RoutingDirector
from rproxy.proxy.exchange import Proxy
from rproxy.proxy.message import LocalResponse
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.resource import ReverseProxyResource
from rproxy.proxy.service import Service
from rproxy.test.support import (
    RunningProxy,
    curl,
    headerValues,
    rawRequest,
    responseStatus,
    sleep,
    startProxy,
    startUpstream,
    waitFor,
)
from rproxy.test.test_reload import startReloadable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUEST = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
EXAMPLE = os.path.join(ROOT, "docs", "examples", "speedup", "rproxy.toml")


class _Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"resource saw " + request.path


#: A twisted.web resource a local route names (rproxy.test.test_local_routes:HELLO).
HELLO = _Hello()

#: twisted.web's own static files (a pull producer streams them): this directory.
TESTS = static.File(os.path.dirname(os.path.abspath(__file__)))


async def echo(request: HandlerRequest) -> LocalResponse:
    """An async def handler: the method, the path below the prefix and the body."""
    body = request.method + b" " + request.path + b" " + request.content
    return LocalResponse(200, [(b"Content-Type", b"text/plain")], body)


class _App(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return b"proxied " + request.uri


def _openFiles() -> list[str]:
    """What this process's file descriptors are open on."""
    opened = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            opened.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the descriptor listdir itself used
    return opened


class LocalRouteTests(unittest.TestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        www = os.path.join(self.base, "www")
        os.makedirs(os.path.join(www, "sub"))
        os.makedirs(os.path.join(self.base, "secret"))
        self.payload = bytes(range(256)) * 4096  # 1 MiB
        for name, data in [("big.bin", self.payload), ("a.txt", b"hello\n"), (".env", b"KEY=1\n")]:
            with open(os.path.join(www, name), "wb") as f:
                f.write(data)
        with open(os.path.join(self.base, "secret", "s.txt"), "wb") as f:
            f.write(b"secret\n")
        os.symlink(os.path.join(self.base, "secret"), os.path.join(www, "out"))
        upstream = startUpstream(self, server.Site(_App()))
        self.proxy = self.start(
            f"""
upstream = "{upstream.url}"
[filters.stamp]
type = "headers"
response-set = {{ "X-Stamp" = "yes" }}

[[routes]]
path-prefix = "/static"
filters = ["stamp"]
local = {{ static = "www" }}

[[routes]]
path-prefix = "/listed"
local = {{ static = "www", listing = true }}

[[routes]]
path-prefix = "/res"
local = {{ handler = "rproxy.test.test_local_routes:HELLO" }}

[[routes]]
path-prefix = "/tests"
local = {{ handler = "rproxy.test.test_local_routes:TESTS" }}

[[routes]]
path-prefix = "/echo"
local = {{ handler = "rproxy.test.test_local_routes:echo", max-body = "10" }}

[filters.gz]
type = "compress"
min-size = "0"

[[routes]]
path-prefix = "/gz"
filters = ["gz"]
local = {{ static = "www" }}

[[routes]]
path-prefix = "/maintenance"
local = {{ status = 503, body = "back soon", headers = {{ "Retry-After" = "60" }} }}

[[routes]]
service = "default"
"""
        )
        self.url = f"http://127.0.0.1:{self.proxy.port}"

    def write(self, config: str, name: str = "rproxy.toml") -> str:
        path = os.path.join(self.base, name)
        with open(path, "w") as f:
            f.write(config)
        return path

    def start(self, config: str) -> RunningProxy:
        return startProxy(self, [], "--config", self.write(config))

    async def get(self, path: str, *arguments: str) -> tuple[bytes, bytes]:
        code, out, err = await curl(["-s", "-D", "-", *arguments, self.url + path])
        self.assertEqual(code, 0, err)
        head, _, body = out.partition(b"\r\n\r\n")
        return head, body

    async def test_fileWithValidators(self) -> None:
        """A file is served whole with its length, type, ETag and Last-Modified; filters of the route apply."""
        head, body = await self.get("/static/big.bin")
        self.assertEqual(responseStatus(head), 200)
        self.assertEqual(body, self.payload)
        self.assertEqual(headerValues(head, b"content-length"), [b"%d" % len(self.payload)])
        self.assertEqual(headerValues(head, b"x-stamp"), [b"yes"])
        [etag] = headerValues(head, b"etag")
        [modified] = headerValues(head, b"last-modified")
        head, body = await self.get("/static/big.bin", "-H", b"If-None-Match: W/" + etag)
        self.assertEqual((responseStatus(head), body), (304, b""))
        head, body = await self.get("/static/big.bin", "-H", b"If-Modified-Since: " + modified)
        self.assertEqual((responseStatus(head), body), (304, b""))
        head = await rawRequest(self.proxy.port, b"HEAD /static/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual((responseStatus(head), headerValues(head, b"content-length")), (200, [b"6"]))
        self.assertEqual(headerValues(head, b"content-type"), [b"text/plain"])
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)

    async def test_ranges(self) -> None:
        """One range is a 206, several a multipart/byteranges, none satisfiable a 416; If-Range must match."""
        head, body = await self.get("/static/big.bin", "-r", "10-19")
        self.assertEqual((responseStatus(head), body), (206, self.payload[10:20]))
        self.assertEqual(headerValues(head, b"content-range"), [b"bytes 10-19/%d" % len(self.payload)])
        head, body = await self.get("/static/big.bin", "-r", "0-1,-2")
        self.assertEqual(responseStatus(head), 206)
        self.assertIn(b"multipart/byteranges", headerValues(head, b"content-type")[0])
        self.assertIn(self.payload[-2:] + b"\r\n--", body)
        head, body = await self.get("/static/a.txt", "-r", "100-200")
        self.assertEqual(responseStatus(head), 416)
        self.assertEqual(headerValues(head, b"content-range"), [b"bytes */6"])
        self.assertIn(b"no range asked for is within the 6 bytes", body)
        head, body = await self.get("/static/a.txt", "-r", "0-1", "-H", 'If-Range: "stale"')
        self.assertEqual((responseStatus(head), body), (200, b"hello\n"))

    async def test_traversalRefused(self) -> None:
        """Dot segments, encoded slashes, NUL, hidden files and symbolic links out of the root are refused."""
        for target, status, reason in [
            (b"/static/%2e%2e/secret/s.txt", 400, b"routed differently once normalised"),
            (b"/static/sub/%2e%2e/a.txt", 400, b"'..' segment"),
            (b"/static/sub%2f..%2fa.txt", 400, b"encoded slash"),
            (b"/static/a.txt%00", 400, b"NUL"),
            (b"/static/.env", 404, b"hidden file"),
            (b"/static/out/s.txt", 403, b"leads out of the served directory"),
            (b"/static/nothing", 404, b"no file at '/nothing'"),
            (b"/static/sub/", 403, b"has no index file and is not listed"),
        ]:
            response = await rawRequest(
                self.proxy.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target
            )
            self.assertEqual(responseStatus(response), status, (target, response[:400]))
            self.assertIn(reason, response, target)
            self.assertNotIn(b"secret\n", response)

    async def test_directories(self) -> None:
        """A directory path without its slash is redirected on this host; listing happens only when asked."""
        head, _ = await self.get("/listed/sub?x=1")
        self.assertEqual((responseStatus(head), headerValues(head, b"location")), (301, [b"/listed/sub/?x=1"]))
        head, body = await self.get("/listed/")
        self.assertEqual(responseStatus(head), 200)
        self.assertIn(b'<a href="big.bin">big.bin</a>', body)
        self.assertNotIn(b".env", body)

    async def test_compressed(self) -> None:
        """A route's compress filter compresses a file it serves (and leaves a range alone)."""
        text = b"a line of text\n" * 10000
        with open(os.path.join(self.base, "www", "big.txt"), "wb") as f:
            f.write(text)
        head, body = await self.get("/gz/big.txt", "--compressed")
        self.assertEqual(responseStatus(head), 200)
        self.assertEqual(len(headerValues(head, b"content-encoding")), 1)
        self.assertEqual(body, text)
        head, body = await self.get("/gz/big.txt", "--compressed", "-r", "0-9")
        self.assertEqual(responseStatus(head), 206)
        self.assertEqual((headerValues(head, b"content-encoding"), body), ([], text[:10]))

    async def test_http2(self) -> None:
        """An HTTP/2 client gets the file, and a range of it."""
        head, body = await self.get("/static/big.bin", "--http2-prior-knowledge")
        self.assertTrue(head.startswith(b"HTTP/2 200"), head)
        self.assertEqual(body, self.payload)
        head, body = await self.get("/static/big.bin", "--http2-prior-knowledge", "-r", "5-9")
        self.assertEqual((responseStatus(head), body), (206, self.payload[5:10]))

    async def test_handlers(self) -> None:
        """A twisted.web resource and an async def see the path below the prefix; the rest is proxied."""
        head, body = await self.get("/res/deep/x")
        self.assertEqual((responseStatus(head), body), (200, b"resource saw /deep/x"))
        with open(__file__.removesuffix("c"), "rb") as f:
            source = f.read()
        self.assertGreater(len(source), 2**14)  # more than one read of twisted.web.static's producer
        for protocol in ("--http1.1", "--http2-prior-knowledge"):
            head, body = await self.get("/tests/test_local_routes.py", protocol)
            self.assertEqual((responseStatus(head), body == source), (200, True), protocol)
        head, body = await self.get("/echo/it?q=1", "--data-binary", "0123456789")
        self.assertEqual((responseStatus(head), body), (200, b"POST /it?q=1 0123456789"))
        head, body = await self.get("/echo/it", "--data-binary", "0123456789A")
        self.assertEqual(responseStatus(head), 413)
        started = reactor.seconds()
        expecting = ["--data-binary", "0123", "-H", "Expect: 100-continue", "--expect100-timeout", "5"]
        interim, body = await self.get("/echo/it", *expecting)
        self.assertEqual(responseStatus(interim), 100)
        head, _, body = body.partition(b"\r\n\r\n")
        self.assertEqual((responseStatus(head), body), (200, b"POST /it 0123"))
        self.assertLess(reactor.seconds() - started, 4)  # the 100 Continue came: curl did not wait out its 5 s
        head, body = await self.get("/echo/it", "--http2-prior-knowledge")
        self.assertEqual((responseStatus(head), body), (200, b"GET /it "))
        head, body = await self.get("/maintenance", "--http2-prior-knowledge")
        self.assertEqual((responseStatus(head), body, headerValues(head, b"retry-after")), (503, b"back soon", [b"60"]))
        head, body = await self.get("/elsewhere")
        self.assertEqual((responseStatus(head), body), (200, b"proxied /elsewhere"))

    async def test_clientGoneClosesFile(self) -> None:
        """A client that leaves mid-file leaves no open file behind."""
        big = os.path.join(self.base, "www", "huge.bin")
        with open(big, "wb") as f:
            f.truncate(64 << 20)
        from twisted.internet import protocol

        class Leaver(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET /static/huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                self.transport.abortConnection()

        endpoint = protocol.ClientCreator(reactor, Leaver)
        await endpoint.connectTCP("127.0.0.1", self.proxy.port)
        for _ in range(50):
            await sleep(0.05)
            if big not in _openFiles():
                break
        opened = _openFiles()
        self.assertNotIn(big, opened)

    async def test_slowClient(self) -> None:
        """
        A client that reads nothing pauses the file's producer: what is read of the file stays bounded
        (socket buffers and a chunk or two), however large the file.
        """
        big = os.path.join(self.base, "www", "huge.bin")
        with open(big, "wb") as f:
            f.truncate(256 << 20)
        read: list[int] = []
        pread = os.pread

        def counting(fd: int, length: int, offset: int) -> bytes:
            data = pread(fd, length, offset)
            read.append(len(data))
            return data

        self.patch(os, "pread", counting)
        from twisted.internet import protocol

        class Stalled(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.pauseProducing()  # read nothing
                self.transport.write(b"GET /static/huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")

        client = await protocol.ClientCreator(reactor, Stalled).connectTCP("127.0.0.1", self.proxy.port)
        self.addCleanup(client.transport.abortConnection)
        await waitFor(lambda: sum(read) > 0)
        await sleep(1.0)
        self.assertGreater(sum(read), 0)
        self.assertLess(sum(read), 48 << 20)  # a producer that ignored pauses would read the 256 MiB in that second

    async def test_accessLog(self) -> None:
        """A local route's exchanges are logged with the route's service and name."""
        log = os.path.join(self.base, "access.log")
        www = os.path.join(self.base, "www")
        proxy = startProxy(
            self,
            [],
            "--config",
            self.write(
                f'upstream = "http://127.0.0.1:9"\n[[routes]]\nname = "files"\nlocal = {{ static = "{www}" }}\n'
                '[[routes]]\npath-prefix = "/p"\nservice = "default"\n'
            ),
            "--access-log",
            log,
            "--access-log-format",
            "json",
        )
        code, out, _ = await curl(["-s", f"http://127.0.0.1:{proxy.port}/a.txt"])
        self.assertEqual(out, b"hello\n")
        await waitFor(lambda: os.path.exists(log) and os.path.getsize(log) > 0)
        with open(log) as f:
            [record] = [json.loads(line) for line in f]
        self.assertEqual(
            (record["status"], record["service"], record["route"], record["bytes_out"], record["attempts"]),
            (200, "files", "files", 6, 0),
        )


class ReadmeExampleTests(unittest.TestCase):
    """The README's "speed up a slow endpoint" example, run as the docs show it."""

    async def test_example(self) -> None:
        upstream = startUpstream(self, server.Site(_App()))
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        with open(EXAMPLE) as f:
            config = f.read().replace("http://127.0.0.1:9000", upstream.url)
        self.assertIn(upstream.url, config)
        with open(os.path.join(directory, "rproxy.toml"), "w") as f:
            f.write(config)
        shutil.copy(os.path.join(os.path.dirname(EXAMPLE), "prices.py"), directory)
        proxy = startProxy(self, [], "--config", os.path.join(directory, "rproxy.toml"), "--listen", "tcp:0")
        url = f"http://127.0.0.1:{proxy.port}"
        code, out, _ = await curl(["-s", url + "/api/prices?item=apple"])
        self.assertEqual(out, b'{"apple": 120}\n')
        code, out, _ = await curl(["-s", "-o", "/dev/null", "-w", "%{http_code}", url + "/api/prices?item=kiwi"])
        self.assertEqual(out, b"404")
        code, out, _ = await curl(["-s", url + "/orders"])
        self.assertEqual(out, b"proxied /orders")


class LocalConfigTests(unittest.TestCase):
    """Mistakes in a local route are refused with the key at fault."""

    def check(self, local: str) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "www"))
        path = os.path.join(base, "rproxy.toml")
        with open(path, "w") as f:
            f.write(f'upstream = "http://127.0.0.1:9"\n[[routes]]\npath-prefix = "/x"\nlocal = {local}\n')
            f.write('[[routes]]\nservice = "default"\n')
        with self.assertRaises(UsageError) as raised:
            Options().parseOptions(["--config", path])
        return str(raised.exception).replace(path, "rproxy.toml")

    def test_withoutUpstreams(self) -> None:
        """A file of local routes needs no upstream; a route to a service then names the missing service."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "www"))
        path = os.path.join(base, "rproxy.toml")
        with open(path, "w") as f:
            f.write('[[routes]]\nlocal = { static = "www" }\n')
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual((len(options.config.services), len(options.config.routes)), (0, 1))
        with open(path, "a") as f:
            f.write('[[routes]]\npath-prefix = "/api"\nservice = "api"\n')
        with self.assertRaises(UsageError) as raised:
            Options().parseOptions(["--config", path])
        self.assertIn("routes[1].service: no service named 'api' (services: none)", str(raised.exception))

    def test_errors(self) -> None:
        self.assertIn("option static: no directory", self.check('{ static = "nowhere" }'))
        self.assertIn("unknown option 'lsting'", self.check('{ static = "www", lsting = true }'))
        self.assertIn("routes[0].local: local static: option listing: ", self.check('{ static = "www", listing = 1 }'))
        message = self.check('{ handler = "no.such.module:thing" }')
        self.assertIn("'no.such.module:thing': cannot import no.such.module", message)
        self.assertIn("has no nothing", self.check('{ handler = "rproxy.test.test_local_routes:nothing" }'))
        self.assertIn("expected one of static", self.check('{ static = "www", status = 200 }'))
        self.assertIn("option status: expected 200 to 599", self.check("{ status = 700 }"))


class PlainSiteTests(unittest.TestCase):
    """A local route behind L{ReverseProxyResource} in a plain twisted.web site (L{WebRequestDownstream})."""

    async def test_static(self) -> None:
        www = os.path.abspath(self.mktemp())
        os.mkdir(www)
        payload = os.urandom(700_000)
        with open(os.path.join(www, "f.bin"), "wb") as f:
            f.write(payload)
        files = Service("files", MemoryRegistry(), FirstAvailable(), local=StaticDirectory(www))
        proxy = Proxy(reactor, RoutingDirector([Route(files, pathPrefix="/files", stripPrefix=True)]))
        root = resource.Resource()
        root.putChild(b"mounted", ReverseProxyResource.fromProxy(proxy))
        site = startUpstream(self, server.Site(root))
        url = f"{site.url}/mounted/files/f.bin"
        code, out, err = await curl(["-s", url])
        self.assertEqual((code, out == payload), (0, True), err)
        code, out, _ = await curl(["-s", "-D", "-", "-r", "5-9", url])
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertEqual((responseStatus(head), body), (206, payload[5:10]))
        code, out, _ = await curl(["-s", f"{site.url}/mounted/files/nope"])
        self.assertEqual(out, b"404 Not Found: no file at '/nope'\n")


class ReloadTests(unittest.TestCase):
    """A reload swaps local routes, and refuses a broken one with the key at fault."""

    async def test_swapped(self) -> None:
        upstream = startUpstream(self, server.Site(_App()))
        config = f'upstream = "{upstream.url}"\n[[routes]]\npath-prefix = "/hi"\nlocal = {{ body = "one" }}\n'
        config += '[[routes]]\nservice = "default"\n'
        proxy = startReloadable(self, config)
        url = f"http://127.0.0.1:{proxy.port}/hi"
        self.assertEqual((await curl(["-s", url]))[1], b"one")
        summary = proxy.reload(config.replace('"one"', '"two"'))
        self.assertIsNotNone(summary)
        self.assertEqual((await curl(["-s", url]))[1], b"two")
        self.assertIsNone(proxy.reload(config.replace('body = "one"', 'static = "nowhere"')))
        self.assertEqual((await curl(["-s", url]))[1], b"two")
