"""
The server side: L{ServerCertificate} (the shared certificate, generated or
loaded, and L{ServerCertificate.reload}), the connection creators that follow a
reload (L{ReloadingServerCreator}, and L{SNIServerCreator} for several
certificates chosen by SNI), and L{TLSServerEndpoint}.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from netsvc.tls.certificates import MIN_VERSION, CertificateError, certificateNames, generateSelfSigned, readPEMs

log = Logger(namespace="netsvc.tls")

#: A generated certificate is replaced when it has less than this left.
RENEW_BEFORE = datetime.timedelta(days=30)


class ServerCertificate:
    """
    The shared server certificate and its contexts.  L{reload} re-reads the files;
    connections already open keep the context they started with.
    """

    def __init__(self, certPath: Path, keyPath: Path, minVersion: str = "1.2",
                 generateNames: Sequence[str] | None = None) -> None:
        self.certPath = Path(certPath)
        self.keyPath = Path(keyPath)
        self.minVersion = minVersion
        self.generateNames = list(generateNames) if generateNames is not None else None
        self.generation = 0
        self.chain: list[x509.Certificate] = []
        self._key: object = None
        self.reload()

    @classmethod
    def fromSettings(cls, settings, stateDir: Path, resolve=Path) -> ServerCertificate:
        """From L{netsvc.config.TLSSettings}; C{resolve} maps a configured path to a real one."""
        if settings.cert == "auto":
            folder = Path(stateDir) / "tls"
            return cls(folder / "selfsigned.pem", folder / "selfsigned.key", settings.min_version,
                       generateNames=settings.names)
        cert = resolve(settings.cert)
        return cls(cert, resolve(settings.key) if settings.key else cert, settings.min_version)

    @property
    def generated(self) -> bool:
        return self.generateNames is not None

    def reload(self) -> None:
        """
        (Re)load the certificate and key.  With generated certificates, create them
        when missing, unreadable or close to expiry.

        @raise CertificateError: the files are unusable; the previous certificate stays in use.
        """
        if self.generated and self._needsGenerating():
            log.info("generating a self-signed certificate for {names} in {path}",
                     names=self.generateNames, path=str(self.certPath))
            generateSelfSigned(self.certPath, self.keyPath, self.generateNames)  # type: ignore[arg-type]
        chain, key = readPEMs(self.certPath, self.keyPath)
        self.chain, self._key = chain, key
        self._options = self.freshOptions()
        self.generation += 1

    def _needsGenerating(self) -> bool:
        try:
            chain, _ = readPEMs(self.certPath, self.keyPath)
        except CertificateError:
            return True
        remaining = chain[0].not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        return remaining < RENEW_BEFORE

    @property
    def notAfter(self) -> datetime.datetime:
        return self.chain[0].not_valid_after_utc

    def options(self, acceptableProtocols: Sequence[bytes] | None = None) -> ssl.CertificateOptions:
        """CertificateOptions for the current certificate (and ALPN protocols, if any)."""
        return self.freshOptions(acceptableProtocols) if acceptableProtocols else self._options

    def freshOptions(self, acceptableProtocols: Sequence[bytes] | None = None) -> ssl.CertificateOptions:
        """New CertificateOptions (so a context of its own) for the current key and chain."""
        chain = self.chain
        return ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self._key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=MIN_VERSION[self.minVersion],
            acceptableProtocols=list(acceptableProtocols) if acceptableProtocols else None,
        )

    def connectionCreator(self, acceptableProtocols: Sequence[bytes] | None = None) -> ReloadingServerCreator:
        """An L{IOpenSSLServerConnectionCreator} that follows L{reload}."""
        return ReloadingServerCreator(self, acceptableProtocols)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerCreator:
    """Makes server-side TLS connections from the certificate's current context."""

    def __init__(self, certificate: ServerCertificate, acceptableProtocols: Sequence[bytes] | None) -> None:
        self.certificate = certificate
        self.acceptableProtocols = acceptableProtocols
        self._generation = -1
        self._context: SSL.Context | None = None

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        if self._generation != self.certificate.generation:
            self._context = self.certificate.options(self.acceptableProtocols).getContext()
            self._generation = self.certificate.generation
        return SSL.Connection(self._context, None)


class FlushingTLSTransport(BufferingTLSTransport):
    """
    Twisted's buffering TLS transport, fixed for one case: when the peer's
    close_notify arrives in the same read as its last data, what the protocol
    wrote in answer was still in the small-writes buffer when Twisted sent its own
    close_notify, and was lost (C{printf x | socat - OPENSSL:...} got no echo).
    Flush before the TLS shutdown.  (Uses Twisted-private names; checked on 26.10.)
    """

    def _shutdownTLS(self) -> None:
        self._aggregator.flush()
        super()._shutdownTLS()


class TLSFactory(TLSMemoryBIOFactory):
    protocol = FlushingTLSTransport


class TLSServerEndpoint:
    """Like L{twisted.internet.endpoints.wrapServerTLS}, with L{FlushingTLSTransport}."""

    def __init__(self, creator: IOpenSSLServerConnectionCreator, endpoint: IStreamServerEndpoint) -> None:
        self.creator = creator
        self.endpoint = endpoint

    def listen(self, factory: IProtocolFactory) -> Any:
        return self.endpoint.listen(TLSFactory(self.creator, False, factory))


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerCreator:
    """
    Server TLS with several certificates: the one whose names match the client's
    SNI name (exact, then C{*.domain} wildcards for one label), else C{default}.
    Like L{ReloadingServerCreator}, it follows each certificate's L{reload}: new
    connections get the new certificates, open ones keep theirs.
    """

    def __init__(self, default: ServerCertificate, others: Sequence[ServerCertificate],
                 acceptableProtocols: Sequence[bytes] | None = None) -> None:
        self.default = default
        self.others = list(others)
        self.acceptableProtocols = acceptableProtocols
        self._generations: tuple[int, ...] = ()
        self._defaultContext: SSL.Context | None = None
        self._byName: dict[str, SSL.Context] = {}

    def _refresh(self) -> None:
        generations = tuple(c.generation for c in [self.default] + self.others)
        if generations == self._generations:
            return
        byName: dict[str, SSL.Context] = {}
        for certificate in reversed(self.others):  # the first listed wins a name
            context = certificate.freshOptions(self.acceptableProtocols).getContext()
            for name in certificateNames(certificate.chain[0]):
                byName[name] = context
        default = self.default.freshOptions(self.acceptableProtocols).getContext()
        default.set_tlsext_servername_callback(self._select)
        self._byName, self._defaultContext, self._generations = byName, default, generations

    def contextFor(self, serverName: str | None) -> SSL.Context | None:
        """The context for an SNI name; None: the default certificate's."""
        if not serverName:
            return None
        name = serverName.lower().rstrip(".")
        context = self._byName.get(name)
        if context is None and "." in name:
            context = self._byName.get("*." + name.split(".", 1)[1])
        return context

    def _select(self, connection: SSL.Connection) -> None:
        # Called by OpenSSL during the handshake: never raise (the handshake would fail).
        try:
            raw = connection.get_servername()
            context = self.contextFor(raw.decode("ascii", "replace") if raw else None)  # A-labels
            if context is not None:
                connection.set_context(context)
        except Exception:
            log.failure("SNI certificate selection failed; using the default certificate")

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        self._refresh()
        return SSL.Connection(self._defaultContext, None)
