"""Endpoint strings: Twisted's, plus udp:PORT and the shared-certificate tls:PORT."""

from twisted.internet import endpoints as tx
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from netsvc import endpoints
from netsvc.endpoints import EndpointError, UDPServerEndpoint
from netsvc.tls import TLSServerEndpoint


class FakeCertificate:
    def connectionCreator(self, acceptableProtocols=None):
        self.alpn = acceptableProtocols
        return object()


class ValidateTests(unittest.TestCase):
    def test_kinds(self):
        self.assertEqual(endpoints.validateServer("tcp:7007:interface=127.0.0.1"), "stream")
        self.assertEqual(endpoints.validateServer("udp:7007:interface=127.0.0.1"), "udp")
        self.assertEqual(endpoints.validateServer("tls:7443:interface=127.0.0.1"), "stream")
        self.assertEqual(endpoints.validateServer("tcp6:7007:interface=::1"), "stream")
        self.assertEqual(endpoints.validateServer("unix:/tmp/x.sock"), "stream")

    def test_errors(self):
        for bad, reason in [
            ("tcpp:7007", "unknown endpoint type 'tcpp' (did you mean 'tcp'?)"),
            ("tcp:70000", "port must be a number from 0 to 65535"),
            ("tcp:abc", "port must be a number"),
            ("udp:7007:bogus=1", "unknown option 'bogus' for udp:"),
            ("udp:", "port must be a number"),
            ("tls:7443:cert=x", "unknown option 'cert' for tls:"),
            ("tcp:7007:interfce=127.0.0.1", "unknown option 'interfce'"),
            ("7007", "expected TYPE:ARGS"),
        ]:
            e = self.assertRaises(EndpointError, endpoints.validateServer, bad)
            self.assertIn(reason, str(e), bad)
            self.assertIn(repr(bad), str(e))

    def test_plainIPv6Interface(self):
        self.assertEqual(endpoints.normalize("tcp6:7007:interface=::1"), "tcp6:7007:interface=\\:\\:1")
        self.assertEqual(endpoints.normalize("tcp6:port=1:interface=fe80::1%eth0:backlog=5"),
                         "tcp6:port=1:interface=fe80\\:\\:1%eth0:backlog=5")
        self.assertEqual(endpoints.split("udp:53:interface=::1"), ("udp", ["53"], {"interface": "::1"}))
        # already escaped stays as it was
        self.assertEqual(endpoints.split("tcp6:1:interface=\\:\\:1")[2], {"interface": "::1"})


class BuildTests(unittest.TestCase):
    def test_udp(self):
        e = endpoints.serverFromString(MemoryReactor(), "udp:5353:interface=::1")
        self.assertIsInstance(e, UDPServerEndpoint)
        self.assertEqual((e.port, e.interface), (5353, "::1"))

    def test_sharedTLS(self):
        cert = FakeCertificate()
        e = endpoints.serverFromString(MemoryReactor(), "tls:7443:interface=::1", cert, [b"h2"])
        self.assertIsInstance(e, TLSServerEndpoint)
        self.assertIsInstance(e.endpoint, tx.TCP6ServerEndpoint)
        self.assertEqual(cert.alpn, [b"h2"])
        e4 = endpoints.serverFromString(MemoryReactor(), "tls:port=7443", cert)
        self.assertIsInstance(e4.endpoint, tx.TCP4ServerEndpoint)

    def test_sharedTLSNeedsCertificate(self):
        self.assertRaises(EndpointError, endpoints.serverFromString, MemoryReactor(), "tls:7443")

    def test_twistedTypesPassThrough(self):
        e = endpoints.serverFromString(MemoryReactor(), "tcp6:7007:interface=::1")
        self.assertIsInstance(e, tx.TCP6ServerEndpoint)
        self.assertEqual(e._interface, "::1")
