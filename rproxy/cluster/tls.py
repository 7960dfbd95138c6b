"""
TLS to the cluster's stores (C{https://} etcd members, a C{rediss://} Redis): the CA certificates that verify
the store's certificate, and the client certificate presented to a store that asks for one (etcd's
C{--client-cert-auth}, Redis's C{tls-auth-clients}); the files read as upstreams' are
(L{rproxy.upstream.tls}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import PrivateCertificate, optionsForClientTLS

from rproxy.upstream.tls import clientCertificate, trustRoot


@dataclass(frozen=True)
class StoreTLS:
    """
    How rproxy speaks TLS to a store.

    @ivar caFile: a PEM file of the CA certificates to trust (C{--etcd-ca}, C{--redis-ca}; C{None}: the
        system's).
    @ivar clientCertificate: a PEM file with the certificate to present (C{--etcd-client-cert},
        C{--redis-client-cert}; its key may be in it too), if any.
    @ivar clientKey: a PEM file with its private key, when not in the certificate's file.
    @ivar trust: the CAs of C{caFile}, as read (an C{IOpenSSLTrustRoot}; C{None}: the system's).
    @ivar client: the client certificate with its key, as read.
    """

    caFile: str | None = None
    clientCertificate: str | None = None
    clientKey: str | None = None
    trust: Any = field(default=None, compare=False, repr=False)
    client: PrivateCertificate | None = field(default=None, compare=False, repr=False)

    @classmethod
    def read(cls, caFile: str | None, certificate: str | None, key: str | None) -> StoreTLS:
        """
        The settings of these files, read now.

        @raise CAError: if the CA file cannot be read.
        @raise ValueError: if the client certificate or its key cannot be read.
        """
        try:
            trust = trustRoot(caFile) if caFile is not None else None
        except ValueError as e:
            raise CAError(str(e)) from None
        return cls(caFile, certificate, key, trust, clientCertificate(certificate, key))

    def creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """The client side of a TLS connection to the store at C{host}, its certificate checked for that name."""
        return optionsForClientTLS(host, self.trust, self.client)


class CAError(ValueError):
    """The CA file of a store cannot be read (the message says why)."""
