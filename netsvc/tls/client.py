"""
The client side: L{clientCreator} (verified by default: the system roots or a
CA file, and the name checked; an explicit C{insecure} opt-out), and
L{httpsPolicy}, the same for C{twisted.web.client.Agent} and treq.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from netsvc.tls.certificates import MIN_VERSION, CertificateError, loadCertificates, readPEMs


def clientCreator(hostname: str, cafile: str | None = None, insecure: bool = False,
                  acceptableProtocols: Sequence[bytes] | None = None,
                  minVersion: str = "1.2", certFile: str | None = None,
                  keyFile: str | None = None) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS for C{hostname} (a DNS name or an IP address): the certificate is
    verified against C{cafile} (PEM, one or more CAs) or the system's roots, and
    its name checked with service-identity -- unless C{insecure} is given.
    C{certFile} (and C{keyFile}, default: the same file) present a client certificate.

    @raise CertificateError: a file is unusable, or C{insecure} with a client certificate.
    """
    if insecure:
        if certFile is not None:
            raise CertificateError("insecure with a client certificate is not supported")
        return _UnverifiedClientCreator(hostname, acceptableProtocols, minVersion)
    trustRoot = ssl.platformTrust() if cafile is None else _trustRootFrom(cafile)
    client = None
    if certFile is not None:
        chain, key = readPEMs(Path(certFile), Path(keyFile or certFile))
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(chain[0])),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(key)))  # type: ignore[arg-type]
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trustRoot, clientCertificate=client,
        acceptableProtocols=list(acceptableProtocols) if acceptableProtocols else None,
        extraCertificateOptions={"raiseMinimumTo": MIN_VERSION[minVersion]})


def _trustRootFrom(cafile: str) -> ssl.IOpenSSLTrustRoot:
    certs = loadCertificates(Path(cafile), "CA file")
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs])


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """Client TLS that sends SNI but checks nothing: only for an explicit --insecure."""

    def __init__(self, hostname: str, acceptableProtocols: Sequence[bytes] | None, minVersion: str) -> None:
        self.hostname = hostname
        self._context = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=MIN_VERSION[minVersion],
            acceptableProtocols=list(acceptableProtocols) if acceptableProtocols else None,
        ).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        try:
            ipaddress.ip_address(self.hostname)
        except ValueError:
            conn.set_tlsext_host_name(self.hostname.encode("idna"))
        conn.set_connect_state()
        return conn



def httpsPolicy(cafile: str | None = None, insecure: bool = False) -> IPolicyForHTTPS:
    """
    An C{IPolicyForHTTPS} for C{twisted.web.client.Agent} (and so treq) built on
    L{clientCreator}: every host's certificate verified against C{cafile} or the
    system roots, unless C{insecure}.

    @raise CertificateError: C{cafile} is unusable (checked now, not at the first request).
    """
    if cafile is not None and not insecure:
        _trustRootFrom(cafile)
    return _ClientPolicy(cafile, insecure)


@implementer(IPolicyForHTTPS)
class _ClientPolicy:
    """L{clientCreator} per host name, cached (a client talks to few hosts)."""

    def __init__(self, cafile: str | None, insecure: bool) -> None:
        self.cafile, self.insecure = cafile, insecure
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii").strip("[]")
        if name not in self._creators:
            self._creators[name] = clientCreator(name, cafile=self.cafile, insecure=self.insecure)
        return self._creators[name]
