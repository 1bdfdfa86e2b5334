"""
TLS: the shared server certificate (loaded from PEM files, or generated
self-signed under state_dir), server connection creators that pick up a reloaded
certificate for new connections, and client contexts that verify by default.

Server side::

    material = ServerCertificate.fromSettings(settings.tls, stateDir)
    creator = material.connectionCreator()          # IOpenSSLServerConnectionCreator
    endpoint = TLSServerEndpoint(creator, TCP4ServerEndpoint(reactor, 7443))
    material.reload()                               # SIGHUP: new connections get the new cert

Client side::

    clientCreator("localhost", cafile="var/tls/selfsigned.pem")
    clientCreator("localhost", insecure=True)       # explicit opt-out
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

log = Logger()

_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

#: A generated certificate is replaced when it has less than this left.
RENEW_BEFORE = datetime.timedelta(days=30)
GENERATED_LIFETIME = datetime.timedelta(days=397)


class CertificateError(Exception):
    """A certificate or key cannot be used; the message says which file and why."""


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e.strerror}") from None


def loadCertificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """
    The PEM certificates in C{path}.

    @raise CertificateError: unreadable, or no certificate in it.
    """
    try:
        return x509.load_pem_x509_certificates(_read(path, what))
    except ValueError:
        raise CertificateError(f"no PEM certificate in {path}") from None


def _readPEMs(certPath: Path, keyPath: Path) -> tuple[list[x509.Certificate], object]:
    chain = loadCertificates(certPath)
    keyData = _read(keyPath, "private key")
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"no usable PEM private key in {keyPath}: {e}") from None
    if chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(f"private key {keyPath} does not match certificate {certPath}")
    return chain, key


def generateSelfSigned(certPath: Path, keyPath: Path, names: Sequence[str]) -> None:
    """
    Write a self-signed certificate (EC P-256) valid for C{names} (DNS names and
    IP addresses, as subjectAltNames) to C{certPath}, its key to C{keyPath} (0600).
    Files are written to a temporary name and renamed, so a crash leaves no half file.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "netsvc"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "netsvc self-signed"),
    ])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + GENERATED_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certPath.parent.mkdir(parents=True, exist_ok=True)
    _atomicWrite(keyPath, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _atomicWrite(certPath, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _atomicWrite(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
        chain, key = _readPEMs(self.certPath, self.keyPath)
        self.chain, self._key = chain, key
        self._options = self.freshOptions()
        self.generation += 1

    def _needsGenerating(self) -> bool:
        try:
            chain, _ = _readPEMs(self.certPath, self.keyPath)
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
            raiseMinimumTo=_MIN_VERSION[self.minVersion],
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


class _FlushingTLSTransport(BufferingTLSTransport):
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


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _FlushingTLSTransport


class TLSServerEndpoint:
    """Like L{twisted.internet.endpoints.wrapServerTLS}, with L{_FlushingTLSTransport}."""

    def __init__(self, creator: IOpenSSLServerConnectionCreator, endpoint: IStreamServerEndpoint) -> None:
        self.creator = creator
        self.endpoint = endpoint

    def listen(self, factory: IProtocolFactory) -> Any:
        return self.endpoint.listen(_TLSFactory(self.creator, False, factory))


# -- TLS half-close (used by forwarding rules) -----------------------------------------
#
# A client such as C{socat - OPENSSL:...} sends its request, then close_notify
# (and often a TCP FIN), and waits for the answer.  Twisted's TLS transport treats
# the close_notify (or the FIN) as the end of the whole connection, so an answer
# that arrives a moment later (from a forwarded backend) is lost.  Here both are
# passed to a protocol that provides IHalfCloseableProtocol as readConnectionLost(),
# and the connection stays open for writing until that protocol closes it (our
# close_notify then goes out, and the TCP connection is closed).  TLS 1.3 allows
# this explicitly; OpenSSL allows it for 1.2 as well.  Built on Twisted-private
# names of twisted.protocols.tls (checked on 26.10).


@implementer(IHalfCloseableProtocol)
class HalfCloseTLSTransport(_FlushingTLSTransport):
    _peerDone = False

    def _halfCloseable(self) -> bool:
        return IHalfCloseableProtocol.providedBy(self.wrappedProtocol)

    def _peerFinished(self) -> bool:
        """The peer will send nothing more: tell the protocol, once.  False: not half-closeable."""
        if not self._halfCloseable():
            return False
        if not self._peerDone:
            self._peerDone = True
            self.wrappedProtocol.readConnectionLost()
        return True

    def _flushReceiveBIO(self) -> None:
        while not self._lostTLSConnection and not self._peerDone:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._peerFinished():
                    break
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(data)
        self._flushSendBIO()

    # The TCP connection under us (we provide IHalfCloseableProtocol to it).

    def readConnectionLost(self) -> None:
        if not self._handshakeDone or not self._peerFinished():
            self.transport.loseConnection()  # as before: the TCP EOF ends everything

    def writeConnectionLost(self) -> None:
        pass

    def loseConnection(self) -> None:
        if self._peerDone and not self.disconnecting:
            # Our close_notify, then close the TCP connection (the peer has finished already).
            super().loseConnection()
            if self.transport is not None and not self._appSendBuffer and self._producer is None:
                self.transport.loseConnection()
            return
        super().loseConnection()


class _HalfCloseTLSFactory(_TLSFactory):
    protocol = HalfCloseTLSTransport


class HalfCloseTLSServerEndpoint(TLSServerEndpoint):
    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(_HalfCloseTLSFactory(self.creator, False, factory))


def halfClosing(endpoint: Any) -> Any:
    """The same listener with half-close for a shared-certificate C{tls:PORT}; others unchanged."""
    if type(endpoint) is TLSServerEndpoint:
        return HalfCloseTLSServerEndpoint(endpoint.creator, endpoint.endpoint)
    return endpoint


# -- client side -----------------------------------------------------------------


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
        chain, key = _readPEMs(Path(certFile), Path(keyFile or certFile))
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(chain[0])),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(key)))  # type: ignore[arg-type]
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trustRoot, clientCertificate=client,
        acceptableProtocols=list(acceptableProtocols) if acceptableProtocols else None,
        extraCertificateOptions={"raiseMinimumTo": _MIN_VERSION[minVersion]})


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
            verify=False, raiseMinimumTo=_MIN_VERSION[minVersion],
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


# -- several certificates, chosen by SNI ---------------------------------------------


def certificateNames(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for (subjectAltName, else its common name), lower case."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [str(n).lower().rstrip(".") for n in names]


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
