"""
TLS on the client side: the certificate chosen by the host name a client asks for (SNI), TLS 1.2 and
1.3 only, ALPN, and certificates read again when their files change.

A L{CertificateStore} holds each certificate of C{--tls-cert} as a ready server context: its private
key, its certificate and chain, no TLS version older than 1.2, ALPN choosing C{h2} or C{http/1.1}
(L{ALPN_PROTOCOLS}), and the store's SNI callback.  A handshake starts on the default certificate's
context (the first); when the client names a host, the connection switches to the context of the
certificate for that name -- the exact name, else a wildcard one label up (C{*.example.com} for
C{www.example.com}), else it stays on the default.

The contexts are set up once, before any connection uses them, and never changed after: pyOpenSSL 26.2
refuses to change a context that made a connection.  So rproxy's listeners (L{TLSServerEndpoint}) do
their TLS on Twisted's public L{TLSMemoryBIOFactory} with rproxy's own connection creator, the same on
every Twisted rproxy admits -- Twisted 25.5 would otherwise set ALPN on the context at each connection
(twisted/twisted#12639).  C{--listen ssl:...} is Twisted's own endpoint; on that combination it cannot
offer ALPN (L{sslEndpointsOfferALPN}), and rproxy serves it HTTP/1.1 only, saying so in the log.

A reload (on SIGHUP, and every C{watchInterval} seconds when a file changed) reads the files again and
replaces the context of each certificate whose files changed and are right: new handshakes get it, a
connection keeps the one it started with.  A file that is wrong (no PEM, a key that does not match the
certificate, a file that is gone) is logged as an error naming it, and the certificate before it keeps
serving.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from rproxy.downstream.listeners import Listener

__all__ = [
    "ALPN_PROTOCOLS",
    "MINIMUM_TLS_VERSION",
    "CertificateError",
    "CertificateFiles",
    "CertificateStore",
    "LoadedCertificate",
    "ServerConnections",
    "TLSServerEndpoint",
    "TLSSettings",
    "loadCertificate",
    "offerProtocols",
    "plainListener",
    "sslEndpointsOfferALPN",
    "tlsListener",
]

#: The oldest TLS version a client may use; the newest is the newest OpenSSL has (1.3).
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

#: What rproxy's TLS listeners choose by ALPN, most preferred first.
ALPN_PROTOCOLS = (b"h2", b"http/1.1")

_log = Logger()

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
        """Parse C{CERTFILE[:KEYFILE[:HOSTNAME,...]]}; raise C{ValueError} saying what is wrong."""
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


def offerProtocols(context: SSL.Context, protocols: Sequence[bytes]) -> None:
    """
    Make the handshakes of C{context} (a server's, not yet used) choose by ALPN the first of C{protocols}
    that the client offers.  A handshake that offers none of them goes on without ALPN, as one without
    the extension does: RFC 7301 section 3.2 wants the C{no_application_protocol} alert, but pyOpenSSL
    can only end such a handshake with C{internal_error}, which would send the client looking for a bug.
    """
    ours = tuple(protocols)

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    context.set_alpn_select_callback(select)


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
        self._serving = [self._ready(loadCertificate(files)) for files in certificates]
        # What each certificate's files held at the last look (or why they could not be read).
        self._seen: list[tuple[bytes, bytes] | str] = [each.contents for each in self._serving]
        self._byName: dict[str, LoadedCertificate] = {}
        self._index()
        self._reactor = reactor
        self._watchInterval = watchInterval
        self._poll: LoopingCall | None = None

    def _ready(self, loaded: LoadedCertificate) -> LoadedCertificate:
        """C{loaded}, its context (which no connection used yet) choosing the protocol and the certificate."""
        offerProtocols(loaded.context, ALPN_PROTOCOLS)
        loaded.context.set_tlsext_servername_callback(self._serverNameReceived)
        return loaded

    def _serverNameReceived(self, connection: SSL.Connection) -> None:
        """OpenSSL's SNI callback: switch C{connection} to the context of the name it asks for."""
        context = self.contextForServerName(connection.get_servername())
        if context is not connection.get_context():
            connection.set_context(context)

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

    def serverConnections(self) -> ServerConnections:
        """The TLS side of a listener (for L{TLSServerEndpoint}): each handshake starts on the default context."""
        return ServerConnections(lambda: self._serving[0].context)

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
                fresh = self._ready(_load(serving.files, state))
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


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnections:
    """
    The TLS side of a server: each handshake's connection starts on the context C{context()} gives;
    callbacks set on the contexts beforehand (L{offerProtocols}, SNI) choose the rest.
    """

    def __init__(self, context: Callable[[], SSL.Context]) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection for the handshake of C{tlsProtocol}."""
        return SSL.Connection(self._context(), None)


@implementer(IProtocolFactory)
class _WithoutNegotiation:
    """
    C{factory} without L{twisted.internet.interfaces.IProtocolNegotiationFactory}: so that Twisted 25.5's
    TLS does not set ALPN on a context in use (the contexts choose the protocol themselves).
    """

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: object) -> Protocol | None:
        """The wrapped factory's protocol for C{addr}."""
        return self._factory.buildProtocol(addr)  # type: ignore[arg-type,return-value]

    def doStart(self) -> None:
        """The wrapped factory starts."""
        self._factory.doStart()

    def doStop(self) -> None:
        """The wrapped factory stops."""
        self._factory.doStop()


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    A server endpoint that speaks TLS on C{endpoint} (a plain one), with the connections of
    C{connections} (a L{ServerConnections}, a L{CertificateStore}'s or another IOpenSSLServerConnectionCreator).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, connections: IOpenSSLServerConnectionCreator) -> None:
        self._endpoint = endpoint
        self._connections = connections

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the plain endpoint, serving C{protocolFactory} through TLS."""
        tls = TLSMemoryBIOFactory(self._connections, False, _WithoutNegotiation(protocolFactory))
        return self._endpoint.listen(tls)


def sslEndpointsOfferALPN() -> bool:
    """
    Whether Twisted's own C{ssl:} server endpoints can offer ALPN here: not on Twisted 25.5 (whose
    CertificateOptions are not yet connection creators) with a pyOpenSSL that refuses to change a context
    in use (26.2 and newer): twisted/twisted#12639.
    """
    if IOpenSSLServerConnectionCreator.implementedBy(CertificateOptions):
        return True
    context = SSL.Context(SSL.TLS_METHOD)
    SSL.Connection(context, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            context.set_alpn_protos([b"h2"])
        except ValueError:
            return False
    return True


def plainListener(
    description: str, factory: IProtocolFactory, endpoint: IStreamServerEndpoint | None = None
) -> Listener:
    """
    A listener serving C{factory} on the endpoint C{description} (a C{--listen}; or on C{endpoint}, the socket
    a supervisor passed for it, when given); its start raises a
    L{ListenError} when it cannot listen.  An C{ssl:} endpoint that cannot offer ALPN
    (L{sslEndpointsOfferALPN}) serves without it, HTTP/1.1, with a warning.
    """
    if description.partition(":")[0].lower() == "ssl" and not sslEndpointsOfferALPN():
        _log.warn(
            "--listen {description}: this Twisted cannot offer HTTP/2 by ALPN with this pyOpenSSL "
            "(twisted/twisted#12639), so it serves HTTP/1.1 only; --tls-listen offers both",
            description=description,
        )
        factory = _WithoutNegotiation(factory)
    return Listener("--listen", description, factory, endpoint)


def tlsListener(
    description: str,
    factory: IProtocolFactory,
    certificates: CertificateStore,
    endpoint: IStreamServerEndpoint | None = None,
) -> Listener:
    """
    A listener serving C{factory} over TLS with C{certificates} on the plain server endpoint
    C{description} (C{tcp:8443}; or C{endpoint}, the socket a supervisor passed for it, when given); its start
    raises a L{ListenError} when it cannot listen.
    """
    listener = Listener("--tls-listen", description, factory, endpoint)
    listener.endpoint = TLSServerEndpoint(listener.endpoint, certificates.serverConnections())
    return listener
