"""
Certificate files: L{loadCertificates}, L{readPEMs} (a chain and its matching
key), L{generateSelfSigned} (EC P-256, with subjectAltNames, written
atomically: L{writeAtomically}), L{certificateNames}, and L{CertificateError}, which every TLS
function raises for an unusable file.  The bottom of L{netsvc.tls}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

#: The C{min_version} setting as Twisted's TLS versions.
MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

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


def readPEMs(certPath: Path, keyPath: Path) -> tuple[list[x509.Certificate], object]:
    """The chain in C{certPath} and the key in C{keyPath}; L{CertificateError} unless they match."""
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
    writeAtomically(keyPath, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    writeAtomically(certPath, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def writeAtomically(path: Path, data: bytes, mode: int = 0o644, fsync: bool = True) -> None:
    """
    Write C{data} to C{path} through C{path.tmp} and a rename, so that a reader
    never sees half a file.  The temporary file is always a new one (a leftover
    is removed, then C{O_EXCL|O_NOFOLLOW}): a symbolic link planted under its
    name is replaced, never written through.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def certificateNames(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for (subjectAltName, else its common name), lower case."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [str(n).lower().rstrip(".") for n in names]
