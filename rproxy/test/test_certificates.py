"""
TLS listeners (L{rproxy.downstream.tls}), with certificates that a small CA makes at test time: the store
that chooses them by host name and reloads them (with a L{Clock}), the options, and proxies with
C{--tls-listen} in front of a real upstream, reached on 127.0.0.1 by real clients -- curl over h2 and
http/1.1, and Python's C{ssl} module, which shows the certificate each handshake got: each host name
gets its own, TLS 1.1 is refused, a replaced certificate serves new connections while an open one keeps
working, and a broken replacement is logged, naming its file, and changes nothing.
"""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import warnings
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.application.service import MultiService
from twisted.internet import protocol, reactor, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import Data

from rproxy.app.tap import Options, buildService, optionsFromEnvironment
from rproxy.downstream.listeners import ListenError
from rproxy.downstream.tls import (
    CertificateError,
    CertificateFiles,
    CertificateStore,
    ServerConnections,
    TLSSettings,
    loadCertificate,
    sslEndpointsOfferALPN,
)
from rproxy.test.certs import CertificateAuthority, Issued, listenTLS
from rproxy.test.support import BIN, ScriptedUpstream, curl, freePort, listen, waitFor
from rproxy.test.test_config import answerWith, writeConfig
from rproxy.test.test_drain import ProxyProcess, assertCleanExit, waitUntilListening
from rproxy.test.test_healthcheck import captureLog
from rproxy.test.test_reload import messages


def writeFile(path: str, data: bytes) -> None:
    """Replace the file at C{path} with C{data}, atomically (as certificate tools should)."""
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)


class TLSClient(http.client.HTTPConnection):
    """
    A blocking HTTP/1.1 client of 127.0.0.1:C{port} over TLS, which sends C{serverName} by SNI (C{None}:
    no SNI).  Its methods block: tests call them in a thread (L{threads.deferToThread}).
    """

    def __init__(self, port: int, serverName: str | None, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, timeout=10)
        self.serverName = serverName
        self.context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.serverName)

    def fetch(self, target: str = "/") -> tuple[int, bytes]:
        """The status and body of C{GET target}, on this connection (opened first if need be)."""
        self.request("GET", target, headers={"Host": self.serverName or "127.0.0.1"})
        response = self.getresponse()
        return response.status, response.read()

    @property
    def peerCertificate(self) -> x509.Certificate:
        """The certificate the server's handshake gave."""
        return x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True))


def trusting(ca: bytes, checkHostName: bool = True) -> ssl.SSLContext:
    """A client context that trusts the CA C{ca} (PEM), and checks the host name unless told not to."""
    context = ssl.create_default_context(cadata=ca.decode("ascii"))
    context.check_hostname = checkHostName
    return context


def tls11Only(ca: bytes) -> ssl.SSLContext:
    """A client context that trusts C{ca} and offers TLS 1.0 and 1.1 only, with every cipher they can use."""
    context = trusting(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting TLS 1.0 and 1.1 is deprecated
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


class TLSTestCase(unittest.TestCase):
    """A CA, certificates for C{a.example.test} and C{b.example.test}, and a directory for files."""

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.caPath = os.path.join(self.directory, "ca.pem")
        writeFile(self.caPath, self.ca.pem)
        self.a = self.ca.issue("a", ["a.example.test"])
        self.b = self.ca.issue("b", ["b.example.test"])

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def install(self, name: str, issued: Issued) -> str:
        """Write C{issued} to NAME.pem and NAME.key (replacing them); the C{--tls-cert} of the two."""
        writeFile(self.path(name + ".key"), issued.keyPEM)
        writeFile(self.path(name + ".pem"), issued.certificatePEM)
        return f"{self.path(name + '.pem')}:{self.path(name + '.key')}"

    def files(self, name: str, issued: Issued, hostNames: Sequence[str] = ()) -> CertificateFiles:
        """C{issued}, installed as NAME, with its host names given (or not)."""
        spec = self.install(name, issued) + (":" + ",".join(hostNames) if hostNames else "")
        return CertificateFiles.fromSpec(spec)

    def client(self, port: int, serverName: str | None, context: ssl.SSLContext | None = None) -> TLSClient:
        """A client of the proxy on C{port} that trusts the CA (closed when the test ends)."""
        client = TLSClient(port, serverName, context or trusting(self.ca.pem, checkHostName=False))
        self.addCleanup(client.close)
        return client

    async def certificateFor(self, port: int, serverName: str | None) -> x509.Certificate:
        """The certificate a new connection's handshake gets, for C{serverName} (the connection is closed)."""
        client = self.client(port, serverName)
        await threads.deferToThread(client.connect)
        certificate = client.peerCertificate
        client.close()
        return certificate


class CertificateFilesTests(unittest.TestCase):
    """C{--tls-cert CERTFILE[:KEYFILE[:HOSTNAME,...]]}."""

    def test_spec(self) -> None:
        self.assertEqual(CertificateFiles.fromSpec("c.pem:k.pem"), CertificateFiles("c.pem", "k.pem"))
        self.assertEqual(CertificateFiles.fromSpec("both.pem"), CertificateFiles("both.pem", "both.pem"))
        self.assertEqual(
            CertificateFiles.fromSpec("c.pem::WWW.Example.com., *.example.net"),
            CertificateFiles("c.pem", "c.pem", ("www.example.com", "*.example.net")),
        )
        self.assertEqual(str(CertificateFiles.fromSpec("c.pem:k.pem:a.test,b.test")), "c.pem:k.pem:a.test,b.test")

    def test_wrong(self) -> None:
        for spec, problem in [
            ("", "expected CERTFILE[:KEYFILE[:HOSTNAME,...]], got ''"),
            (":k.pem", "expected CERTFILE"),
            ("c.pem:k.pem:a.test:more", "expected CERTFILE"),
            ("c.pem:k.pem:a b.test", "not a host name: 'a b.test'"),
            ("c.pem:k.pem:a.*.test", "not a host name: 'a.*.test'"),
            ("c.pem:k.pem:*", "not a host name: '*'"),
        ]:
            with self.assertRaises(ValueError, msg=spec) as raised:
                CertificateFiles.fromSpec(spec)
            self.assertIn(problem, str(raised.exception))


class LoadTests(TLSTestCase):
    """L{loadCertificate}: the names a certificate serves, and files that cannot serve."""

    def test_names(self) -> None:
        """The subjectAltName's DNS names; without one, the CN; given names instead of either."""
        both = self.ca.issue("both", ["One.example.test", "*.two.example.test"])
        self.assertEqual(
            loadCertificate(self.files("both", both)).hostNames, ("one.example.test", "*.two.example.test")
        )
        common = self.ca.issue("common.example.test")
        self.assertEqual(loadCertificate(self.files("common", common)).hostNames, ("common.example.test",))
        given = loadCertificate(self.files("given", both, ["x.example.test"]))
        self.assertEqual(given.hostNames, ("x.example.test",))
        self.assertEqual(given.certificate, both.certificate)

    def test_oneFile(self) -> None:
        """A file that holds the certificate and the key."""
        writeFile(self.path("both.pem"), self.a.certificatePEM + self.a.keyPEM)
        loaded = loadCertificate(CertificateFiles.fromSpec(self.path("both.pem")))
        self.assertEqual(loaded.certificate, self.a.certificate)

    def assertRefused(self, files: CertificateFiles, problem: str) -> None:
        with self.assertRaises(CertificateError) as raised:
            loadCertificate(files)
        self.assertEqual(str(raised.exception), problem)

    def test_wrongFiles(self) -> None:
        """Each error names the file at fault and what is wrong with it."""
        certificate, key = self.path("a.pem"), self.path("a.key")
        files = self.files("a", self.a)
        self.assertRefused(
            CertificateFiles(self.path("none.pem"), key),
            f"{self.path('none.pem')}: cannot read: No such file or directory",
        )
        writeFile(certificate, b"not a certificate\n")
        self.assertRefused(
            files, f"{certificate}: cannot read a certificate from it (expected PEM: -----BEGIN CERTIFICATE-----)"
        )
        self.install("a", self.a)
        writeFile(key, self.a.certificatePEM)
        self.assertRefused(
            files, f"{key}: cannot read a private key from it (expected PEM: -----BEGIN PRIVATE KEY-----)"
        )
        writeFile(key, self.b.keyPEM)
        self.assertRefused(files, f"{key}: the private key does not match the certificate in {certificate}")
        private = serialization.load_pem_private_key(self.a.keyPEM, None)
        encrypted = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
        writeFile(key, encrypted)
        self.assertRefused(files, f"{key}: the private key is encrypted; rproxy needs it unencrypted")
        self.assertRefused(
            self.files("nameless", self.ca.issue("")),
            f"{self.path('nameless.pem')}: the certificate names no host (no DNS name in its subjectAltName, no CN): "
            "give its host names, CERTFILE:KEYFILE:HOSTNAME,...",
        )


class StoreTests(TLSTestCase):
    """L{CertificateStore}: which certificate serves which name, and reloads (with a L{Clock})."""

    def store(self, *files: CertificateFiles, watchInterval: float = 0.0) -> tuple[CertificateStore, Clock]:
        clock = Clock()
        store = CertificateStore(files, clock, watchInterval)
        store.startService()
        self.addCleanup(store.stopService)
        return store, clock

    def test_choice(self) -> None:
        """
        The certificate of the exact name, else of a wildcard one label up; else, and without a name, the
        first certificate.  Names compare without case and a final dot.
        """
        wildcard = self.ca.issue("wildcard", ["*.wild.example.test"])
        store, _ = self.store(self.files("a", self.a), self.files("b", self.b), self.files("w", wildcard))
        a, b, w = store.certificates
        for name, expected in [
            ("a.example.test", a),
            ("B.Example.Test.", b),
            ("x.wild.example.test", w),
            ("y.x.wild.example.test", a),
            ("wild.example.test", a),
            ("c.example.test", a),
            ("", a),
            (None, a),
        ]:
            self.assertIs(store.certificateFor(name), expected, name)
        self.assertIs(store.contextForServerName(b"b.example.test"), b.context)
        self.assertIs(store.contextForServerName(None), a.context)
        self.assertIs(store.contextForServerName(b"\xff.example.test"), a.context)

    def test_exactBeforeWildcard(self) -> None:
        """An exact name wins over a wildcard, whatever their order; of two exact names, the first."""
        wildcard = self.ca.issue("wildcard", ["*.example.test"])
        other = self.ca.issue("other", ["b.example.test"])
        store, _ = self.store(self.files("w", wildcard), self.files("b", self.b), self.files("o", other))
        w, b, _ = store.certificates
        self.assertIs(store.certificateFor("b.example.test"), b)
        self.assertIs(store.certificateFor("a.example.test"), w)

    def test_reload(self) -> None:
        """A replaced certificate serves from the reload on, with the names it has; it is logged."""
        store, _ = self.store(self.files("a", self.a), self.files("b", self.b))
        events = captureLog(self)
        self.assertEqual(store.reload("a test"), 0)
        self.assertEqual(messages(events, LogLevel.info), ["TLS certificates read again (a test): none changed"])

        renamed = self.ca.issue("a2", ["a2.example.test"])
        self.install("a", renamed)
        self.assertEqual(store.reload("a test"), 1)
        self.assertEqual(store.certificateFor("a2.example.test").certificate, renamed.certificate)
        self.assertEqual(store.certificateFor("a.example.test").certificate, renamed.certificate)  # the default
        self.assertEqual(store.certificateFor("b.example.test").certificate, self.b.certificate)
        [logged] = messages(events, LogLevel.info)[1:]
        self.assertIn(f"TLS certificate {self.path('a.pem')}:{self.path('a.key')} reloaded (a test): CN=a2", logged)
        self.assertIn("for a2.example.test, valid until", logged)

    def test_brokenReplacement(self) -> None:
        """A file that cannot serve is logged as an error naming it; the certificate before keeps serving."""
        store, _ = self.store(self.files("a", self.a), self.files("b", self.b))
        events = captureLog(self)
        writeFile(self.path("a.pem"), b"-----BEGIN CERTIFICATE-----\ntruncated")
        self.assertEqual(store.reload("a test"), 0)
        writeFile(self.path("b.pem"), self.ca.issue("b2", ["b.example.test"]).certificatePEM)  # b.key is b's
        self.assertEqual(store.reload("a test"), 0)
        self.assertEqual(store.certificateFor("a.example.test").certificate, self.a.certificate)
        self.assertEqual(store.certificateFor("b.example.test").certificate, self.b.certificate)
        first, second, third = messages(events, LogLevel.error)
        prefix = f"TLS certificate {self.path('a.pem')}:{self.path('a.key')} not reloaded (a test)"
        self.assertEqual(
            first,
            f"{prefix}, the previous one keeps serving: {self.path('a.pem')}: cannot read a certificate from it "
            "(expected PEM: -----BEGIN CERTIFICATE-----)",
        )
        self.assertEqual(second, first)  # a reload says again what is still wrong
        self.assertIn(f"{self.path('b.key')}: the private key does not match the certificate in ", third)

    def test_watch(self) -> None:
        """
        Every interval, the certificates whose files changed are reloaded; a wrong file is logged once, not
        at every look; when it is right again, it serves.
        """
        store, clock = self.store(self.files("a", self.a), watchInterval=10)
        events = captureLog(self)
        a2, a3 = self.ca.issue("a2", ["a.example.test"]), self.ca.issue("a3", ["a.example.test"])
        self.install("a", a2)
        clock.advance(9)
        self.assertEqual(store.certificateFor(None).certificate, self.a.certificate)
        clock.advance(1)
        self.assertEqual(store.certificateFor(None).certificate, a2.certificate)
        self.assertIn("reloaded (the files changed): CN=a2", messages(events, LogLevel.info)[0])

        os.remove(self.path("a.key"))
        clock.advance(10)
        clock.advance(10)
        [logged] = messages(events, LogLevel.error)
        self.assertIn(f"{self.path('a.key')}: cannot read: No such file or directory", logged)
        self.assertEqual(store.certificateFor(None).certificate, a2.certificate)

        self.install("a", a3)
        clock.advance(10)
        self.assertEqual(store.certificateFor(None).certificate, a3.certificate)
        store.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_versions(self) -> None:
        """
        Each certificate's context (the default one is the handshake's first, which the version is chosen
        with) excludes every version before TLS 1.2 and none after.  (OpenSSL's default security level
        refuses TLS 1.1 on its own too, so a handshake alone, as in L{ListenerTests.test_tlsVersions},
        cannot tell.)
        """
        store, _ = self.store(self.files("a", self.a), self.files("b", self.b))
        older = SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1
        for context in [each.context for each in store.certificates]:
            options = context.set_options(0)  # adds nothing, returns the options set
            self.assertEqual(options & older, older)
            self.assertEqual(options & (SSL.OP_NO_TLSv1_2 | SSL.OP_NO_TLSv1_3), 0)

    def test_noCertificate(self) -> None:
        self.assertRaises(ValueError, CertificateStore, [], Clock())


def parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(["--upstream", "http://127.0.0.1:9", *arguments])
    return options


class OptionTests(TLSTestCase):
    """C{--tls-listen}, C{--tls-cert} and C{--tls-watch}, on the command line, in a file and the environment."""

    def test_options(self) -> None:
        """With TLS listeners only, there is no plain listener; with --listen too, both."""
        a, b = self.install("a", self.a), self.install("b", self.b)
        config = parse("--tls-listen", "tcp:8443", "--tls-cert", a, "--tls-cert", b + ":b.example.test").config
        self.assertEqual(
            config.tls,
            TLSSettings(
                ("tcp:8443",),
                (CertificateFiles.fromSpec(a), CertificateFiles.fromSpec(b + ":b.example.test")),
                60.0,
            ),
        )
        self.assertEqual(config.listen, ())
        config = parse("--listen", "tcp:8080", "--tls-listen", "tcp:8443", "--tls-cert", a, "--tls-watch", "0").config
        self.assertEqual(
            (config.listen, config.tls.listen, config.tls.watchInterval), (("tcp:8080",), ("tcp:8443",), 0)
        )
        self.assertEqual(parse().config.listen, ("tcp:8080",))
        self.assertEqual(parse().config.tls, TLSSettings())

    def test_wrong(self) -> None:
        """Each mistake is an error naming its option (and the file at fault)."""
        a = self.install("a", self.a)
        writeFile(self.path("bad.pem"), b"nothing")
        for arguments, problem in [
            (["--tls-listen", "tcp:8443"], "--tls-listen: needs a certificate: give --tls-cert CERTFILE:KEYFILE"),
            (["--tls-cert", a], "--tls-cert: has no use without --tls-listen (there is no TLS listener)"),
            (
                ["--tls-listen", "ssl:8443:privateKey=k.pem", "--tls-cert", a],
                "--tls-listen: give a plain endpoint such as tcp:8443, which rproxy wraps in TLS, not "
                "'ssl:8443:privateKey=k.pem'",
            ),
            (["--tls-listen", "tcp:8443", "--tls-cert", a + ":a..b"], "--tls-cert: not a host name: 'a..b'"),
            (
                ["--tls-listen", "tcp:8443", "--tls-cert", self.path("bad.pem") + ":" + self.path("a.key")],
                f"--tls-cert: {self.path('bad.pem')}: cannot read a certificate from it",
            ),
            (["--tls-listen", "tcp:8443", "--tls-cert", a, "--tls-watch", "-1"], "--tls-watch: must not be negative"),
        ]:
            with self.assertRaises(UsageError, msg=arguments) as raised:
                parse(*arguments)
            self.assertIn(problem, str(raised.exception))

    def test_configFile(self) -> None:
        """The file's keys are the options' names; an error names the file and the key."""
        a, b = self.install("a", self.a), self.install("b", self.b)
        path = writeConfig(self, f'tls-listen = ["tcp:8443"]\ntls-cert = ["{a}", "{b}"]\ntls-watch = 5\n')
        config = parse("--config", path).config
        self.assertEqual(config.tls, TLSSettings(("tcp:8443",), tuple(map(CertificateFiles.fromSpec, (a, b))), 5.0))
        path = writeConfig(self, f'tls-listen = ["tcp:8443"]\ntls-cert = ["{a}:bad name"]\n')
        with self.assertRaises(UsageError) as raised:
            parse("--config", path)
        self.assertEqual(
            str(raised.exception),
            f"{path}: tls-cert: not a host name: 'bad name' (examples: www.example.com, *.example.com)",
        )

    def test_environment(self) -> None:
        """For rproxy.tac: RPROXY_TLS_CERT lists certificates separated by whitespace."""
        a, b = self.install("a", self.a), self.install("b", self.b)
        options = optionsFromEnvironment(
            {
                "RPROXY_UPSTREAM": "http://127.0.0.1:9",
                "RPROXY_TLS_LISTEN": "tcp:8443",
                "RPROXY_TLS_CERT": f"{a} {b}",
                "RPROXY_TLS_WATCH": "0",
            }
        )
        self.assertEqual(
            options.config.tls, TLSSettings(("tcp:8443",), tuple(map(CertificateFiles.fromSpec, (a, b))), 0)
        )


class ListenerTests(TLSTestCase):
    """A proxy with a TLS listener, in this process, in front of an upstream that answers C{hello}."""

    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.upstream = ScriptedUpstream(self, answerWith(b"hello"))

    def startTLSProxy(self, *arguments: str, signals: IReactorFromThreads | None = None) -> tuple[MultiService, int]:
        """
        C{twist rproxy --tls-listen ... --tls-cert a --tls-cert b ARGUMENTS} as L{buildService} builds it (with
        SIGHUP handed to C{signals}, when given), started until the test ends; and the TLS listener's port.
        """
        port = freePort()
        options = parse(
            "--upstream",
            self.upstream.url,
            "--access-log",
            "off",
            "--grace",
            "1",
            "--tls-listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--tls-cert",
            self.install("a", self.a),
            "--tls-cert",
            self.install("b", self.b),
            *arguments,
        )
        top = buildService(options.config, reactor, None, signals)  # type: ignore[arg-type]
        top.startService()
        self.addCleanup(top.stopService)
        return top, port

    def curl(self, port: int, hostName: str, *arguments: str) -> object:
        """curl C{https://HOSTNAME:PORT/} through the proxy, trusting the CA; its output ends with the HTTP version."""
        url = f"https://{hostName}:{port}/"
        resolve = f"{hostName}:{port}:127.0.0.1"
        return curl(["-sS", "--resolve", resolve, "--cacert", self.caPath, "-w", " %{http_version}", *arguments, url])

    async def test_curl(self) -> None:
        """curl gets the upstream's answer over h2 (by ALPN), and over http/1.1 when it asks for it."""
        _, port = self.startTLSProxy()
        for hostName in ("a.example.test", "b.example.test"):
            self.assertEqual(await self.curl(port, hostName), (0, b"hello 2", b""))
            self.assertEqual(await self.curl(port, hostName, "--http1.1"), (0, b"hello 1.1", b""))
        self.assertEqual(len(self.upstream.requests), 4)

    async def test_certificatePerName(self) -> None:
        """Each name gets its certificate (verified against the CA); no name, or an unknown one, the default."""
        _, port = self.startTLSProxy()
        self.assertEqual(await self.certificateFor(port, "a.example.test"), self.a.certificate)
        self.assertEqual(await self.certificateFor(port, "b.example.test"), self.b.certificate)
        self.assertEqual(await self.certificateFor(port, None), self.a.certificate)
        self.assertEqual(await self.certificateFor(port, "c.example.test"), self.a.certificate)
        client = self.client(port, "b.example.test", trusting(self.ca.pem))
        self.assertEqual(await threads.deferToThread(client.fetch), (200, b"hello"))

    async def test_tlsVersions(self) -> None:
        """
        TLS 1.3 by default, and 1.2, are accepted; a client offering only TLS 1.1 (and 1.0) is refused,
        although it completes a handshake with a server that allows 1.1.
        """
        _, port = self.startTLSProxy()
        client = self.client(port, "a.example.test")
        await threads.deferToThread(client.connect)
        self.assertEqual(client.sock.version(), "TLSv1.3")
        context = trusting(self.ca.pem)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        client = self.client(port, "a.example.test", context)
        await threads.deferToThread(client.connect)
        self.assertEqual(client.sock.version(), "TLSv1.2")

        permissive = CertificateOptions(
            privateKey=PKey.from_cryptography_key(serialization.load_pem_private_key(self.a.keyPEM, None)),  # type: ignore[arg-type]
            certificate=X509.from_cryptography(self.a.certificate),
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
        )
        context = permissive.getContext()
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        old = listenTLS(self, Site(Data(b"old", "text/plain")), ServerConnections(lambda: context))
        client = self.client(old, "a.example.test", tls11Only(self.ca.pem))
        await threads.deferToThread(client.connect)
        self.assertEqual(client.sock.version(), "TLSv1.1")

        client = self.client(port, "a.example.test", tls11Only(self.ca.pem))
        with self.assertRaises(ssl.SSLError) as raised:
            await threads.deferToThread(client.connect)
        self.assertEqual(raised.exception.reason, "TLSV1_ALERT_PROTOCOL_VERSION")

    async def test_alpn(self) -> None:
        """
        ALPN chooses h2 before http/1.1, whatever the client's order, on each certificate's context; a
        client that offers neither, or no ALPN at all, goes on without it and is served HTTP/1.1.
        """
        _, port = self.startTLSProxy()
        for hostName in ("a.example.test", "b.example.test", None):
            for offered, chosen in (
                (["http/1.1", "h2"], "h2"),
                (["http/1.1"], "http/1.1"),
                (["acme-tls/1"], None),
                ([], None),
            ):
                context = trusting(self.ca.pem, checkHostName=False)
                if offered:
                    context.set_alpn_protocols(offered)
                client = self.client(port, hostName, context)
                await threads.deferToThread(client.connect)
                self.assertEqual(client.sock.selected_alpn_protocol(), chosen, (hostName, offered))
                if chosen is None:
                    self.assertEqual(await threads.deferToThread(client.fetch), (200, b"hello"))
                client.close()

    async def test_chain(self) -> None:
        """The intermediate certificates in the certificate's file are sent: a client that trusts the root verifies."""
        intermediate = CertificateAuthority("rproxy test intermediate", self.ca)
        _, port = self.startTLSProxy("--tls-cert", self.install("c", intermediate.issue("c", ["c.example.test"])))
        self.assertEqual(await self.curl(port, "c.example.test"), (0, b"hello 2", b""))

    def test_portInUse(self) -> None:
        """A TLS listener that cannot listen stops the start, as a plain one does."""
        taken = listen(self, protocol.Factory())
        options = parse(
            "--tls-listen", f"tcp:{taken.port}:interface=127.0.0.1", "--tls-cert", self.install("a", self.a)
        )
        top = buildService(options.config, reactor)  # type: ignore[arg-type]
        self.addCleanup(top.stopService)
        raised = self.assertRaises(ListenError, top.startService)
        self.assertEqual(
            str(raised), f"--tls-listen tcp:{taken.port}:interface=127.0.0.1: cannot listen: address already in use"
        )

    async def test_reloadOnSignal(self) -> None:
        """
        Without a config file, SIGHUP reads the certificates again: a new connection gets the replaced
        certificate, one open before keeps working with its own; a broken replacement (bad PEM, then a key
        that does not match) is logged naming its file, and the last good certificate keeps serving.
        SIGHUP gets its previous handler back when the proxy stops.
        """
        previous = signal.getsignal(signal.SIGHUP)
        top, port = self.startTLSProxy("--tls-watch", "0", signals=reactor)  # type: ignore[arg-type]
        events = captureLog(self)
        kept = self.client(port, "a.example.test", trusting(self.ca.pem))
        self.assertEqual(await threads.deferToThread(kept.fetch), (200, b"hello"))
        keptSocket = kept.sock

        async def hangUp() -> None:
            count = len(events)
            os.kill(os.getpid(), signal.SIGHUP)
            self.assertTrue(await waitFor(lambda: any("(SIGHUP)" in formatEvent(e) for e in events[count:])))

        a2 = self.ca.issue("a2", ["a.example.test"])
        self.install("a", a2)
        await hangUp()
        self.assertEqual(await self.certificateFor(port, "a.example.test"), a2.certificate)
        self.assertEqual(await self.certificateFor(port, "b.example.test"), self.b.certificate)
        self.assertEqual(await threads.deferToThread(kept.fetch), (200, b"hello"))
        self.assertIs(kept.sock, keptSocket)
        self.assertEqual(kept.peerCertificate, self.a.certificate)

        writeFile(self.path("a.pem"), b"garbage\n")
        await hangUp()
        writeFile(self.path("a.pem"), self.ca.issue("a3", ["a.example.test"]).certificatePEM)
        await hangUp()
        self.assertEqual(await self.certificateFor(port, "a.example.test"), a2.certificate)
        badPEM, mismatch = messages(events, LogLevel.error)
        self.assertIn(f"not reloaded (SIGHUP), the previous one keeps serving: {self.path('a.pem')}: ", badPEM)
        self.assertIn(f"{self.path('a.key')}: the private key does not match the certificate in ", mismatch)
        self.assertEqual(await threads.deferToThread(kept.fetch), (200, b"hello"))

        await top.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    async def test_reloadWhenFilesChange(self) -> None:
        """With --tls-watch, a changed file is read within the interval, without SIGHUP."""
        top, port = self.startTLSProxy("--tls-watch", "0.05")
        b2 = self.ca.issue("b2", ["b.example.test"])
        self.install("b", b2)
        store = top.getServiceNamed("tls-certificates")
        assert isinstance(store, CertificateStore)
        self.assertTrue(await waitFor(lambda: store.certificateFor("b.example.test").certificate == b2.certificate))
        self.assertEqual(await self.certificateFor(port, "b.example.test"), b2.certificate)

    async def test_sslListen(self) -> None:
        """
        --listen ssl:... is Twisted's own TLS endpoint, as before: one certificate, h2 by ALPN.  Where that
        endpoint cannot offer ALPN (Twisted 25.5 with pyOpenSSL 26.2 or newer), it serves HTTP/1.1 and the
        log says why.
        """
        port = freePort()
        self.install("a", self.a)
        events = captureLog(self)
        description = f"ssl:{port}:interface=127.0.0.1:privateKey={self.path('a.key')}:certKey={self.path('a.pem')}"
        options = parse("--upstream", self.upstream.url, "--access-log", "off", "--listen", description)
        top = buildService(options.config, reactor)  # type: ignore[arg-type]
        top.startService()
        self.addCleanup(top.stopService)
        warned = [formatEvent(e) for e in events if "twisted/twisted#12639" in formatEvent(e)]
        if sslEndpointsOfferALPN():
            self.assertEqual(await self.curl(port, "a.example.test"), (0, b"hello 2", b""))
            self.assertEqual(warned, [])
        else:
            self.assertEqual(await self.curl(port, "a.example.test"), (0, b"hello 1.1", b""))
            self.assertEqual(len(warned), 1)
            self.assertIn(f"--listen {description}: ", warned[0])
        self.assertEqual(await self.curl(port, "a.example.test", "--http1.1"), (0, b"hello 1.1", b""))


class ProcessTests(TLSTestCase):
    """C{twist rproxy} with a TLS listener, in its own process (on rproxy's reactor)."""

    timeout = 60

    async def test_twist(self) -> None:
        """It serves h2 through TLS; SIGHUP reloads the certificates; SIGTERM stops it cleanly."""
        upstream = ScriptedUpstream(self, answerWith(b"hello"))
        port = freePort()
        argv = [os.path.join(BIN, "twist"), "--log-format=text", "rproxy", "--upstream", upstream.url]
        argv += ["--access-log", "off", "--tls-listen", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--tls-cert", self.install("a", self.a), "--tls-cert", self.install("b", self.b)]
        process = ProxyProcess.spawn(self, argv)
        await waitUntilListening(self, process, port)
        resolve = f"b.example.test:{port}:127.0.0.1"
        url = f"https://b.example.test:{port}/"
        result = await curl(["-sS", "--resolve", resolve, "--cacert", self.caPath, "-w", " %{http_version}", url])
        self.assertEqual(result, (0, b"hello 2", b""), process.log)

        b2 = self.ca.issue("b2", ["b.example.test"])
        self.install("b", b2)
        process.transport.signalProcess("HUP")
        self.assertTrue(await waitFor(lambda: "reloaded (SIGHUP): CN=b2" in process.log, 10), process.log)
        self.assertEqual(await self.certificateFor(port, "b.example.test"), b2.certificate)

        process.terminate()
        await process.waitForExit(self, 10.0)
        assertCleanExit(self, process)
        self.assertNotIn("Traceback", process.log)
