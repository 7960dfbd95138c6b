"""
TLS to upstreams: which certificates are trusted, the client certificate presented, ALPN, and what a
failed handshake is called in an error response.

Certificates are verified by default, against the system's roots or a given CA file, and the upstream's
host name (or IP address) is checked with C{service_identity}; SNI is sent for host names.  Turning
verification off is a separate, explicit setting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class UpstreamTLS:
    """
    How rproxy speaks TLS to the upstreams of one service.

    @ivar caFile: a PEM file of the CA certificates to trust instead of the system's roots.
    @ivar clientCertificate: a PEM file with the certificate to present (its key may be in it too).
    @ivar clientKey: a PEM file with the client certificate's private key, when not in the certificate's file.
    @ivar insecure: accept any certificate, for any name (no verification at all).
    """

    caFile: str | None = None
    clientCertificate: str | None = None
    clientKey: str | None = None
    insecure: bool = False


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path!r}: {e.strerror}") from None


def trustRoot(caFile: str | None) -> Any:
    """
    The CA certificates of C{caFile} (the system's roots if C{None}), an C{IOpenSSLTrustRoot} (which
    Twisted does not export); C{ValueError} saying what is wrong.
    """
    if caFile is None:
        return ssl.platformTrust()
    pems = _PEM_CERTIFICATE.findall(_read(caFile, "CA file"))
    if not pems:
        raise ValueError(f"the CA file {caFile!r} holds no PEM certificate")
    try:
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])
    except SSL.Error as e:
        raise ValueError(f"the CA file {caFile!r} holds an invalid certificate: {e}") from None


def certificateFiles(spec: str | None) -> tuple[str | None, str | None]:
    """The certificate file and key file of an option's C{CERTFILE[:KEYFILE]} (C{None} for each not given)."""
    certificate, _, key = (spec or "").partition(":")
    return certificate or None, key or None


def clientCertificate(certificateFile: str | None, keyFile: str | None) -> ssl.PrivateCertificate | None:
    """
    The client certificate of C{certificateFile} with the key of C{keyFile} (or of C{certificateFile}),
    C{None} if none is given; C{ValueError} saying what is wrong.
    """
    if certificateFile is None:
        if keyFile is not None:
            raise ValueError("a client key was given without a client certificate")
        return None
    certificate = _read(certificateFile, "client certificate")
    key = _read(keyFile, "client key") if keyFile is not None else certificate
    try:
        return ssl.PrivateCertificate.loadPEM(key + b"\n" + certificate)
    except (SSL.Error, crypto.Error, VerifyError, ValueError) as e:  # VerifyError: a key of another certificate
        raise ValueError(f"the client certificate {certificateFile!r} or its key cannot be loaded: {e}") from None


def connectionCreator(host: str, settings: UpstreamTLS, protocols: Sequence[bytes]) -> IOpenSSLClientConnectionCreator:
    """
    The TLS client side for an upstream at C{host}, offering C{protocols} by ALPN (most preferred first;
    none: no ALPN extension at all).
    """
    client = clientCertificate(settings.clientCertificate, settings.clientKey)
    if not settings.insecure:
        return ssl.optionsForClientTLS(
            host, trustRoot(settings.caFile), client, acceptableProtocols=list(protocols) or None
        )
    context = ssl.CertificateOptions(
        privateKey=client.privateKey.original if client is not None else None,
        certificate=client.original if client is not None else None,
        verify=False,
    ).getContext()
    if protocols:
        context.set_alpn_protos(list(protocols))  # before any connection uses it
    return _Unverified(context, None if isIPAddress(host) or isIPv6Address(host) else host.encode("idna"))


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """A client side that accepts any certificate, still sending SNI."""

    def __init__(self, context: SSL.Context, serverName: bytes | None) -> None:
        self._context = context
        self._serverName = serverName

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        return connection


def describeFailure(reason: Failure) -> tuple[str, str] | None:
    """
    What went wrong in a TLS handshake, in one line, and its RFC 9209 error type; C{None} if C{reason} is
    not about TLS.
    """
    if reason.check(VerificationError):
        return "presented a TLS certificate that is not valid for its name", "tls_certificate_error"
    if reason.check(SSL.Error):
        args = getattr(reason.value, "args", ())
        details = args[0] if args else None
        texts: list[str] = []
        if isinstance(details, list):
            texts = [str(item[-1]) for item in details if isinstance(item, tuple) and item and item[-1]]
        text = "; ".join(texts) or reason.getErrorMessage() or "unknown error"
        errorType = "tls_certificate_error" if "certificate" in text else "tls_protocol_error"
        return f"failed the TLS handshake: {text}", errorType
    return None
