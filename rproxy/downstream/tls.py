"""
TLS on the client side: the certificate chosen by the host name a client asks for (SNI), TLS 1.2 and
1.3 only, ALPN, and certificates read again when their files change.

A L{CertificateStore} holds each certificate of C{--tls-cert} as a ready server context: its private
key, its certificate and chain, no TLS version older than 1.2, and ALPN offering what the site speaks
(C{h2} and C{http/1.1}: L{twisted.web.server.Site.acceptableProtocols}).  The options of a
C{--tls-listen} listener (L{CertificateStore.serverOptions}) carry no certificate of their own: OpenSSL
calls L{CertificateStore.contextForServerName} during every handshake, with the name the client sent
or C{None}, and the connection switches to the context of the certificate for that name -- the exact
name, else a wildcard one label up (C{*.example.com} for C{www.example.com}), else the default, the
first certificate.

A reload (on SIGHUP, and every C{watchInterval} seconds when a file changed) reads the files again and
replaces the context of each certificate whose files changed and are right: new handshakes get it, a
connection keeps the one it started with.  A file that is wrong (no PEM, a key that does not match the
certificate, a file that is gone) is logged as an error naming it, and the certificate before it keeps
serving.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = [
    "MINIMUM_TLS_VERSION",
    "CertificateError",
    "CertificateFiles",
    "CertificateStore",
    "LoadedCertificate",
    "TLSSettings",
    "loadCertificate",
    "tlsListener",
]

#: The oldest TLS version a client may use; the newest is the newest OpenSSL has (1.3).
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}\Z")


class CertificateError(ValueError):
    """A certificate or key file that cannot serve; the message names the file and what is wrong."""


def _hostName(name: str) -> str:
    """A host name as it is compared: lower case, without a final dot."""
    return name.lower().rstrip(".")


@dataclass(frozen=True)
class CertificateFiles:
    """
    Where a certificate is, and the host names it serves: C{--tls-cert CERTFILE[:KEYFILE[:HOSTNAME,...]]}.

    @ivar certificate: the PEM file of the certificate, followed by the intermediate certificates of
        its chain.
    @ivar key: the PEM file of its private key, unencrypted (the certificate's own file when it holds both).
    @ivar hostNames: the names it serves (C{*.example.com}: any one label in front of C{example.com});
        empty for the DNS names in the certificate (its subjectAltName, else its CN).
    """

    certificate: str
    key: str
    hostNames: tuple[str, ...] = ()

    @classmethod
    def fromSpec(cls, spec: str) -> CertificateFiles:
        """Parse C{CERTFILE[:KEYFILE[:HOSTNAME,...]]}; raise L{ValueError} saying what is wrong."""
        parts = spec.split(":")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"expected CERTFILE[:KEYFILE[:HOSTNAME,...]], got {spec!r}")
        certificate, key, names = parts + [""] * (3 - len(parts))
        hostNames = tuple(_hostName(name.strip()) for name in names.split(",") if name.strip())
        for name in hostNames:
            if not _HOST_NAME.match(name):
                raise ValueError(f"not a host name: {name!r} (examples: www.example.com, *.example.com)")
        return cls(certificate, key or certificate, hostNames)

    def __str__(self) -> str:
        """The files and names as C{--tls-cert} gives them."""
        return ":".join([self.certificate, self.key, *([",".join(self.hostNames)] if self.hostNames else [])])


@dataclass(frozen=True)
class TLSSettings:
    """
    The TLS listeners and their certificates.

    @ivar listen: plain server endpoint strings (C{tcp:8443}) on which to serve TLS.
    @ivar certificates: the certificates; the first is the default, for a client that names no host
        or one that no certificate serves.
    @ivar watchInterval: seconds between two looks at the certificates' files for changes (0: only
        SIGHUP reads them again).
    """

    listen: tuple[str, ...] = ()
    certificates: tuple[CertificateFiles, ...] = ()
    watchInterval: float = 60.0


@dataclass(frozen=True)
class LoadedCertificate:
    """
    A certificate read from its files, ready to serve.

    @ivar files: where it was read from.
    @ivar contents: the bytes of its certificate file and key file, to tell when they change.
    @ivar hostNames: the host names it serves.
    @ivar certificate: the certificate itself (the first of its chain).
    @ivar context: the server context of its handshakes.
    """

    files: CertificateFiles
    contents: tuple[bytes, bytes]
    hostNames: tuple[str, ...]
    certificate: x509.Certificate
    context: SSL.Context


def _read(files: CertificateFiles) -> tuple[bytes, bytes]:
    """The contents of the certificate file and of the key file."""
    contents = []
    for path in (files.certificate, files.key):
        try:
            with open(path, "rb") as f:
                contents.append(f.read())
        except OSError as e:
            raise CertificateError(f"{path}: cannot read: {e.strerror}") from None
    return contents[0], contents[1]


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of C{certificate}'s subjectAltName, else its common names."""
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = [each.value for each in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    else:
        names = list(alternative.get_values_for_type(x509.DNSName))
    return tuple(dict.fromkeys(_hostName(name) for name in names if isinstance(name, str) and name))


def _publicKey(key: PublicKeyTypes) -> bytes:
    """A public key as DER SubjectPublicKeyInfo, to compare two."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load(files: CertificateFiles, contents: tuple[bytes, bytes]) -> LoadedCertificate:
    """The certificate that C{contents} (of C{files}) hold; raise L{CertificateError} naming the file at fault."""
    certificateData, keyData = contents
    try:
        chain = x509.load_pem_x509_certificates(certificateData)
    except ValueError:
        raise CertificateError(
            f"{files.certificate}: cannot read a certificate from it (expected PEM: -----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise CertificateError(f"{files.key}: the private key is encrypted; rproxy needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            f"{files.key}: cannot read a private key from it (expected PEM: -----BEGIN PRIVATE KEY-----)"
        ) from None
    leaf = chain[0]
    if _publicKey(key.public_key()) != _publicKey(leaf.public_key()):
        raise CertificateError(f"{files.key}: the private key does not match the certificate in {files.certificate}")
    hostNames = files.hostNames or _names(leaf)
    if not hostNames:
        raise CertificateError(
            f"{files.certificate}: the certificate names no host (no DNS name in its subjectAltName, no CN): "
            "give its host names, CERTFILE:KEYFILE:HOSTNAME,..."
        )
    try:
        options = CertificateOptions(
            # Keys OpenSSL cannot sign a handshake with (DH, X25519, ...) raise TypeError, handled below.
            privateKey=PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=X509.from_cryptography(leaf),
            extraCertChain=[X509.from_cryptography(each) for each in chain[1:]],
            raiseMinimumTo=MINIMUM_TLS_VERSION,
        )
        context = options.getContext()
    except (TypeError, SSL.Error) as e:
        raise CertificateError(f"{files.key}: OpenSSL cannot serve this key and certificate: {e}") from None
    return LoadedCertificate(files, contents, hostNames, leaf, context)


def loadCertificate(files: CertificateFiles) -> LoadedCertificate:
    """Read the certificate in C{files}; raise L{CertificateError} naming the file at fault."""
    return _load(files, _read(files))


class CertificateStore(service.Service):
    """
    The certificates of the TLS listeners, by host name, and their reloads (see the module's docstring):
    on L{reload}, and while the service runs, every C{watchInterval} seconds when a file changed.
    """

    name = "tls-certificates"
    _log = Logger()

    def __init__(self, certificates: Sequence[CertificateFiles], reactor: IReactorTime, watchInterval: float = 0.0):
        """
        @param certificates: the certificates; the first is the default.
        @param watchInterval: seconds between two looks at the files (0: they are not watched).
        @raise CertificateError: for the first certificate that cannot serve.
        """
        if not certificates:
            raise ValueError("a CertificateStore needs a certificate")
        self._serving = [loadCertificate(files) for files in certificates]
        # What each certificate's files held at the last look (or why they could not be read).
        self._seen: list[tuple[bytes, bytes] | str] = [each.contents for each in self._serving]
        self._byName: dict[str, LoadedCertificate] = {}
        self._index()
        self._reactor = reactor
        self._watchInterval = watchInterval
        self._poll: LoopingCall | None = None

    def _index(self) -> None:
        """Find each certificate by its host names; the first that names a host serves it."""
        self._byName = {}
        for each in self._serving:
            for name in each.hostNames:
                self._byName.setdefault(name, each)

    @property
    def certificates(self) -> tuple[LoadedCertificate, ...]:
        """The certificates serving now, the default first."""
        return tuple(self._serving)

    def certificateFor(self, hostName: str | None) -> LoadedCertificate:
        """The certificate that serves C{hostName}, the name a client sent (C{None}: it sent none)."""
        if hostName:
            name = _hostName(hostName)
            found = self._byName.get(name) or self._byName.get("*." + name.partition(".")[2])
            if found is not None:
                return found
        return self._serving[0]

    def contextForServerName(self, serverName: bytes | None) -> SSL.Context:
        """The server context of a handshake whose client sent C{serverName} (SNI), or none."""
        return self.certificateFor(None if serverName is None else serverName.decode("ascii", "replace")).context

    def serverOptions(self) -> CertificateOptions:
        """
        The TLS options of a listener (for L{endpoints.wrapServerTLS}): TLS 1.2 and newer, each handshake
        served by the context of L{contextForServerName}.
        """
        return CertificateOptions(raiseMinimumTo=MINIMUM_TLS_VERSION, contextForServerName=self.contextForServerName)

    def startService(self) -> None:
        """Say which certificate serves which names, and start watching the files."""
        super().startService()
        for each in self._serving:
            self._log.info(
                "TLS certificate {certificate}: {subject}, for {hosts}, valid until {notAfter}",
                **self._fields(each),
            )
        if self._watchInterval:
            self._poll = LoopingCall(self._look)
            self._poll.clock = self._reactor
            self._poll.start(self._watchInterval, now=False)

    def stopService(self) -> None:
        """Stop watching the files."""
        super().stopService()
        if self._poll is not None:
            self._poll.stop()
            self._poll = None

    def _look(self) -> None:
        self._refresh("the files changed", everyOne=False)

    def reload(self, trigger: str) -> int:
        """
        Read every certificate's files again and put in force each that changed and is right; say why
        (C{trigger}) in the log.  Return how many certificates were replaced.
        """
        return self._refresh(trigger, everyOne=True)

    def _refresh(self, trigger: str, everyOne: bool) -> int:
        """
        Reload the certificates whose files changed since the last look, or, with C{everyOne}, those that
        differ from what serves (so that a file still wrong is logged again).
        """
        replaced = 0
        for index, serving in enumerate(self._serving):
            state: tuple[bytes, bytes] | str
            try:
                state = _read(serving.files)
            except CertificateError as e:
                state = str(e)
            if state == self._seen[index] and not everyOne:
                continue
            self._seen[index] = state
            if state == serving.contents:
                continue
            if isinstance(state, str):
                self._rejected(serving, trigger, state)
                continue
            try:
                fresh = _load(serving.files, state)
            except CertificateError as e:
                self._rejected(serving, trigger, str(e))
                continue
            self._serving[index] = fresh
            replaced += 1
            self._log.info(
                "TLS certificate {certificate} reloaded ({trigger}): {subject}, for {hosts}, valid until {notAfter}",
                trigger=trigger,
                **self._fields(fresh),
            )
        if replaced:
            self._index()
        elif everyOne:
            self._log.info("TLS certificates read again ({trigger}): none changed", trigger=trigger)
        return replaced

    def _rejected(self, serving: LoadedCertificate, trigger: str, error: str) -> None:
        self._log.error(
            "TLS certificate {certificate} not reloaded ({trigger}), the previous one keeps serving: {error}",
            certificate=str(serving.files),
            trigger=trigger,
            error=error,
        )

    @staticmethod
    def _fields(loaded: LoadedCertificate) -> dict[str, str]:
        """A certificate's log fields: its files, subject, host names and expiry."""
        return {
            "certificate": str(loaded.files),
            "subject": loaded.certificate.subject.rfc4514_string(),
            "hosts": ", ".join(loaded.hostNames),
            "notAfter": loaded.certificate.not_valid_after_utc.isoformat(),
        }


def tlsListener(
    description: str, factory: IProtocolFactory, certificates: CertificateStore
) -> StreamServerEndpointService:
    """
    A listener serving C{factory} over TLS with C{certificates} on the plain server endpoint
    C{description} (C{tcp:8443}); like L{strports.service}'s, its start raises when it cannot listen.
    """
    listener = strports.service(description, factory)
    listener.endpoint = endpoints.wrapServerTLS(certificates.serverOptions(), listener.endpoint)
    return listener
