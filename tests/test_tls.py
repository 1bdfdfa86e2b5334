"""TLS: generated and loaded certificates, reload, client verification."""

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet._sslverify import ClientTLSOptions
from twisted.trial import unittest

from netsvc import tls
from netsvc.config import TLSSettings
from netsvc.tls import CertificateError, ServerCertificate


def sans(path):
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), set(ext.get_values_for_type(x509.IPAddress))


class GeneratedTests(unittest.TestCase):
    def setUp(self):
        self.state = Path(self.mktemp())

    def test_generatedWithSANs(self):
        cert = ServerCertificate.fromSettings(TLSSettings(), self.state)
        self.assertTrue(cert.generated)
        dns, ips = sans(cert.certPath)
        self.assertEqual(dns, {"localhost"})
        self.assertEqual(ips, {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
        self.assertEqual(cert.keyPath.stat().st_mode & 0o777, 0o600)

    def test_reusedOnNextStart(self):
        first = ServerCertificate.fromSettings(TLSSettings(), self.state)
        second = ServerCertificate.fromSettings(TLSSettings(), self.state)
        self.assertEqual(first.chain[0].serial_number, second.chain[0].serial_number)

    def test_regeneratedWhenCloseToExpiry(self):
        first = ServerCertificate.fromSettings(TLSSettings(), self.state)
        self.patch(tls.server, "RENEW_BEFORE", tls.GENERATED_LIFETIME + datetime.timedelta(days=1))
        second = ServerCertificate.fromSettings(TLSSettings(), self.state)
        self.assertNotEqual(first.chain[0].serial_number, second.chain[0].serial_number)

    def test_minimumVersion(self):
        cert = ServerCertificate.fromSettings(TLSSettings(), self.state)
        self.assertEqual(handshake(cert, SSL.TLS1_2_VERSION), b"TLSv1.2")
        self.assertRaises(SSL.Error, handshake, cert, SSL.TLS1_1_VERSION)

    def test_minimumVersion13(self):
        cert = ServerCertificate.fromSettings(TLSSettings(min_version="1.3"), self.state)
        self.assertRaises(SSL.Error, handshake, cert, SSL.TLS1_2_VERSION)


def handshake(certificate, clientMaxVersion):
    """An in-memory handshake with a client capped at C{clientMaxVersion}; the version agreed."""
    server = certificate.connectionCreator().serverConnectionForTLS(None)
    server.set_accept_state()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(clientMaxVersion)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    done = set()
    for _ in range(10):
        for name, conn in (("client", client), ("server", server)):
            try:
                conn.do_handshake()
                done.add(name)
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == {"client", "server"}:
            return client.get_protocol_version_name().encode()
    raise AssertionError("handshake did not finish")


class LoadedTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.cert, self.key = self.dir / "c.pem", self.dir / "k.pem"
        tls.generateSelfSigned(self.cert, self.key, ["example.test"])

    def test_loadsUserFiles(self):
        cert = ServerCertificate(self.cert, self.key)
        self.assertFalse(cert.generated)
        self.assertEqual(sans(self.cert)[0], {"example.test"})

    def test_combinedPEM(self):
        combined = self.dir / "both.pem"
        combined.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        ServerCertificate(combined, combined)

    def test_unreadable(self):
        e = self.assertRaises(CertificateError, ServerCertificate, self.dir / "nope.pem", self.key)
        self.assertIn("cannot read certificate", str(e))
        self.assertIn("No such file", str(e))

    def test_notPEM(self):
        bad = self.dir / "bad.pem"
        bad.write_text("hello")
        self.assertIn("no PEM certificate", str(self.assertRaises(CertificateError, ServerCertificate, bad, self.key)))

    def test_keyMismatch(self):
        other = self.dir / "o.pem", self.dir / "ok.pem"
        tls.generateSelfSigned(*other, ["x"])
        e = self.assertRaises(CertificateError, ServerCertificate, self.cert, other[1])
        self.assertIn("does not match", str(e))

    def test_reloadSwitchesNewConnectionsOnly(self):
        cert = ServerCertificate(self.cert, self.key)
        creator = cert.connectionCreator()
        before = creator.serverConnectionForTLS(None)
        tls.generateSelfSigned(self.cert, self.key, ["renewed.test"])
        cert.reload()
        after = creator.serverConnectionForTLS(None)
        self.assertIsNot(before.get_context(), after.get_context())
        self.assertEqual(sans(self.cert)[0], {"renewed.test"})

    def test_failedReloadKeepsOld(self):
        cert = ServerCertificate(self.cert, self.key)
        generation = cert.generation
        self.key.write_text("garbage")
        self.assertRaises(CertificateError, cert.reload)
        self.assertEqual(cert.generation, generation)


class ClientTests(unittest.TestCase):
    def test_verifiesByDefault(self):
        creator = tls.clientCreator("localhost")
        self.assertIsInstance(creator, ClientTLSOptions)

    def test_cafileUnreadable(self):
        self.assertRaises(CertificateError, tls.clientCreator, "localhost", cafile="/nonexistent.pem")

    def test_insecureIsExplicit(self):
        creator = tls.clientCreator("localhost", insecure=True)
        conn = creator.clientConnectionForTLS(None)
        self.assertEqual(conn.get_servername(), b"localhost")
        self.assertEqual(conn.get_context().get_verify_mode(), SSL.VERIFY_NONE)


def makeClientCertificate(certPath, keyPath, name):
    """A self-signed certificate for TLS client authentication (extendedKeyUsage clientAuth)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


class ClientCertificateTests(unittest.TestCase):
    """clientCreator(certFile=...) presents a client certificate (mutual TLS)."""

    def test_presentedAndVerified(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        serverCert, serverKey = folder / "s.pem", folder / "s.key"
        clientCert, clientKey = folder / "c.pem", folder / "c.key"
        tls.generateSelfSigned(serverCert, serverKey, ["localhost"])
        makeClientCertificate(clientCert, clientKey, "client.test")
        server = ServerCertificate(serverCert, serverKey).freshOptions().getContext()
        seen = []

        def verify(conn, cert, errno, depth, ok):
            seen.append(cert.get_subject().CN)
            return ok

        server.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        server.load_verify_locations(str(clientCert))
        creator = tls.clientCreator("localhost", cafile=str(serverCert), certFile=str(clientCert),
                                    keyFile=str(clientKey))

        class TLSProtocol:  # what ClientTLSOptions reads (ALPN hints) and calls back on a failure
            class factory:
                wrappedFactory = None

            def failVerification(self, reason):
                raise AssertionError(reason)

        client = creator.clientConnectionForTLS(TLSProtocol())
        client.set_connect_state()  # what Twisted's TLS protocol does for clients
        serverConn = SSL.Connection(server, None)
        serverConn.set_accept_state()
        for _ in range(10):
            for conn in (client, serverConn):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    pass
            for a, b in ((client, serverConn), (serverConn, client)):
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    pass
        self.assertIn("client.test", seen)
        self.assertEqual(serverConn.get_peer_certificate().get_subject().CN, "client.test")

    def test_insecureWithCertificateRefused(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        tls.generateSelfSigned(folder / "c.pem", folder / "c.key", ["x"])
        self.assertRaises(CertificateError, tls.clientCreator, "localhost", insecure=True,
                          certFile=str(folder / "c.pem"))
