"""
Certificates made at test time: a throwaway L{CertificateAuthority} (or an intermediate CA under one)
issues server and client certificates for host names and IP addresses, as PEM, as files, or as the TLS
side of a test server, which L{listenTLS} serves a factory with::

    ca = CertificateAuthority()
    issued = ca.issue("a", ["a.example.test"], ["127.0.0.1"])       # .certificate, .certificatePEM, .keyPEM
    options = issued.privateCertificate().options()                  # for reactor.listenSSL
    files = ca.writeFiles(self.mktemp())                             # ca.pem, server.pem/.key, client.pem/.key
    tls = serverTLS(files, protocols=[b"h2"], requireClientCertificate=True)
    port = listenTLS(self, factory, tls)                             # on 127.0.0.1, closed when the test ends

L{listenTLS} listens as rproxy's own TLS listeners do (L{rproxy.downstream.tls.TLSServerEndpoint}): a
twisted.web site behind C{reactor.listenSSL} or an C{ssl:} endpoint would have Twisted 25.5 set ALPN on
a context in use, which pyOpenSSL 26.2 refuses.

A certificate issued by a fresh CA that the client is not given is one no one trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.trial import unittest

from rproxy.downstream.tls import CertificateFiles as ServedCertificate
from rproxy.downstream.tls import CertificateStore, ServerConnections, TLSServerEndpoint, offerProtocols

_DAY = datetime.timedelta(days=1)


def _name(commonName: str) -> x509.Name:
    """A subject of this common name (none if empty)."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)] if commonName else [])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _sign(
    subject: x509.Name,
    publicKey: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuerKey: ec.EllipticCurvePrivateKey,
    extensions: Sequence[x509.ExtensionType],
) -> x509.Certificate:
    """A certificate valid from yesterday to tomorrow, with C{extensions} (critical only a CA's constraints)."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
    return builder.sign(issuerKey, hashes.SHA256())


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@dataclass
class CertificateFiles:
    """PEM files written by L{CertificateAuthority.writeFiles}."""

    ca: str
    serverCertificate: str
    serverKey: str
    clientCertificate: str
    clientKey: str


@dataclass(frozen=True)
class Issued:
    """
    A certificate and its key, as files hold them.

    @ivar certificatePEM: the certificate, then the certificates of its chain up to (not including) the root.
    """

    certificate: x509.Certificate
    certificatePEM: bytes
    keyPEM: bytes

    def privateCertificate(self) -> ssl.PrivateCertificate:
        """The certificate with its key, for a test server's TLS options."""
        return ssl.PrivateCertificate.loadPEM(self.keyPEM + self.certificatePEM)

    def writeTo(self, directory: str, name: str) -> tuple[str, str]:
        """Write NAME.pem (the certificate and its chain) and NAME.key into C{directory}; their paths."""
        os.makedirs(directory, exist_ok=True)
        certificatePath, keyPath = os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")
        _write(certificatePath, self.certificatePEM)
        _write(keyPath, self.keyPEM)
        return certificatePath, keyPath


class CertificateAuthority:
    """
    A CA made for one test (or an intermediate CA under one), with an EC P-256 key: it issues server and
    client certificates.

    @ivar certificate: its own certificate; a root's is what clients trust.
    @ivar pem: that certificate, PEM.
    """

    def __init__(self, name: str = "rproxy test CA", parent: CertificateAuthority | None = None) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._parent = parent
        issuer, issuerKey = (parent.certificate.subject, parent._key) if parent else (_name(name), self._key)
        constraints = x509.BasicConstraints(ca=True, path_length=None)
        self.certificate = _sign(_name(name), self._key.public_key(), issuer, issuerKey, [constraints])
        self.pem = _pem(self.certificate)

    def _chain(self) -> bytes:
        """The PEM of the intermediate certificates from this CA up to the root (which is left out)."""
        return b"" if self._parent is None else self.pem + self._parent._chain()

    def issue(
        self,
        commonName: str,
        hostNames: Sequence[str] = (),
        ips: Sequence[str] = (),
        client: bool = False,
        alsoClient: bool = False,
    ) -> Issued:
        """
        A certificate for C{hostNames} and C{ips} (its subjectAltName; none if both are empty), for a server
        or, if C{client}, a client (with C{alsoClient}, a server's that is a client's too), with a new key.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in hostNames]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        if alsoClient and not client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        extensions: list[x509.ExtensionType] = [x509.ExtendedKeyUsage(usages)]
        if names:
            extensions.append(x509.SubjectAlternativeName(names))
        certificate = _sign(_name(commonName), key.public_key(), self.certificate.subject, self._key, extensions)
        keyPEM = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(certificate, _pem(certificate) + self._chain(), keyPEM)

    def writeFiles(
        self,
        directory: str,
        serverNames: Sequence[str] = ("localhost",),
        serverIPs: Sequence[str] = ("127.0.0.1",),
        serverIsClient: bool = False,
    ) -> CertificateFiles:
        """
        Write into C{directory} this CA (ca.pem), a server certificate for C{serverNames} and C{serverIPs}
        (server.pem, server.key; a client's too if C{serverIsClient}), and a client certificate (client.pem,
        client.key).
        """
        issued = self.issue("upstream", serverNames, serverIPs, alsoClient=serverIsClient)
        serverCertificate, serverKey = issued.writeTo(directory, "server")
        clientCertificate, clientKey = self.issue("rproxy client", client=True).writeTo(directory, "client")
        ca = os.path.join(directory, "ca.pem")
        _write(ca, self.pem)
        return CertificateFiles(ca, serverCertificate, serverKey, clientCertificate, clientKey)


def serverTLS(
    files: CertificateFiles, protocols: Sequence[bytes] = (b"h2",), requireClientCertificate: bool = False
) -> ServerConnections:
    """The TLS side of a test server with C{files}' server certificate, selecting among C{protocols} by ALPN."""
    with open(files.serverCertificate, "rb") as f:
        certificate = f.read()
    with open(files.serverKey, "rb") as f:
        key = f.read()
    private = ssl.PrivateCertificate.loadPEM(key + certificate)
    extra: dict[str, object] = {}
    if requireClientCertificate:
        with open(files.ca, "rb") as f:
            extra = {
                "verify": True,
                "caCerts": [ssl.Certificate.loadPEM(f.read()).original],
                "requireCertificate": True,
            }
    context = ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        **extra,  # type: ignore[arg-type]
    ).getContext()
    offerProtocols(context, protocols)
    return ServerConnections(lambda: context)


def listenTLS(testCase: unittest.TestCase, factory: IProtocolFactory, tls: IOpenSSLServerConnectionCreator) -> int:
    """Serve C{factory} through TLS (C{tls}: see L{serverTLS}) on 127.0.0.1 until the test ends; its port."""
    endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), tls)
    port = testCase.successResultOf(endpoint.listen(factory))
    testCase.addCleanup(port.stopListening)
    return port.getHost().port  # type: ignore[no-any-return]


def listenSiteTLS(testCase: unittest.TestCase, factory: IProtocolFactory, names: Sequence[str] = ("localhost",)) -> int:
    """
    Serve C{factory} (a proxy's site) as a C{--tls-listen} listener does, with a certificate for C{names}
    from a fresh CA; its port.
    """
    certificate, key = CertificateAuthority().issue(names[0], list(names)).writeTo(testCase.mktemp(), "server")
    store = CertificateStore([ServedCertificate(certificate, key)], reactor)
    return listenTLS(testCase, factory, store.serverConnections())
