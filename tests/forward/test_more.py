"""UDP associations, TLS origination, reload, settings, PROXY headers, the client command."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from netsvc import config, endpoints
from netsvc.forward import client as cli
from netsvc.forward import proxyheader
from netsvc.tls import ServerCertificate, TLSServerEndpoint, generateSelfSigned
from tests.forward._util import (
    connect,
    fport,
    metric,
    namedBackend,
    parseForward,
    startForwarder,
)
from tests.forward.test_stream import rule, tcp, waitUntil
from tests.helpers import sleep


class _UDPBackend(protocol.DatagramProtocol):
    def __init__(self):
        self.peers = set()

    def datagramReceived(self, data, addr):
        self.peers.add(addr)
        self.transport.write(b"re:" + data, addr)


class _UDPClient(protocol.DatagramProtocol):
    def __init__(self):
        self.received = []
        self.arrived = defer.Deferred()

    def datagramReceived(self, data, addr):
        self.received.append(data)
        if not self.arrived.called:
            self.arrived.callback(data)


class UDPTests(unittest.TestCase):
    timeout = 15

    def udpRule(self, backendPort: int, extra: str) -> str:
        return (
            f"      - name: u\n"
            f'        listen: ["udp:0:interface=127.0.0.1"]\n'
            f'        connect: ["udp:host=127.0.0.1:port={backendPort}"]\n'
            f"        udp: {extra}\n"
        )

    def client(self) -> _UDPClient:
        c = _UDPClient()
        p = reactor.listenUDP(0, c, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        return c

    @defer.inlineCallbacks
    def test_associationsPerClientAndExpiry(self):
        backend = _UDPBackend()
        bport = reactor.listenUDP(0, backend, interface="127.0.0.1")
        self.addCleanup(bport.stopListening)
        daemon, svc = startForwarder(self, self.udpRule(bport.getHost().port, "{idle_timeout: 0.3s}"))
        target = ("127.0.0.1", fport(daemon))
        a, b = self.client(), self.client()
        a.transport.write(b"from a", target)
        b.transport.write(b"from b", target)
        self.assertEqual((yield a.arrived), b"re:from a")
        self.assertEqual((yield b.arrived), b"re:from b")
        a.transport.write(b"again", target)
        yield waitUntil(lambda: len(a.received) == 2)
        self.assertEqual(a.received, [b"re:from a", b"re:again"])
        self.assertEqual(b.received, [b"re:from b"])
        self.assertEqual(len(backend.peers), 2)  # one backend socket per client
        self.assertEqual(metric(daemon, "netsvc_forward_udp_associations", rule="u"), 2)
        yield waitUntil(lambda: metric(daemon, "netsvc_forward_udp_associations", rule="u") == 0, 3)

    @defer.inlineCallbacks
    def test_maxAssociationsAndResponses(self):
        backend = _UDPBackend()
        bport = reactor.listenUDP(0, backend, interface="127.0.0.1")
        self.addCleanup(bport.stopListening)
        daemon, svc = startForwarder(
            self, self.udpRule(bport.getHost().port, "{max_associations: 1, responses: 1}")
        )
        target = ("127.0.0.1", fport(daemon))
        a, b = self.client(), self.client()
        a.transport.write(b"q1", target)
        b.transport.write(b"q2", target)
        self.assertEqual((yield a.arrived), b"re:q1")
        yield sleep(0.2)
        self.assertEqual(b.received, [])
        self.assertEqual(
            metric(daemon, "netsvc_forward_refused_total", rule="u", reason="max_associations"), 1
        )
        # a's association closed after its one response: b gets a turn now.
        self.assertEqual(metric(daemon, "netsvc_forward_udp_associations", rule="u"), 0)
        b.transport.write(b"q3", target)
        self.assertEqual((yield b.arrived), b"re:q3")


def _tlsBackend(testCase, names=("localhost", "127.0.0.1")):
    folder = Path(testCase.mktemp())
    folder.mkdir()
    certPath, keyPath = folder / "cert.pem", folder / "key.pem"
    generateSelfSigned(certPath, keyPath, list(names))
    cert = ServerCertificate(certPath, keyPath)
    f = protocol.Factory.forProtocol(_TLSEcho)
    ep = TLSServerEndpoint(
        cert.connectionCreator(),
        __import__("twisted.internet.endpoints", fromlist=["x"]).TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ),
    )
    results = []
    ep.listen(f).addBoth(results.append)
    testCase.addCleanup(results[0].stopListening)
    return results[0].getHost().port, str(certPath)


class _TLSEcho(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class TLSOriginationTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def roundTrip(self, connectString: str) -> defer.Deferred:
        daemon, svc = startForwarder(self, rule([connectString]))
        client = yield connect(fport(daemon))
        client.transport.write(b"secret")
        d = client.waitFor(6)
        closed = client.closed
        yield defer.DeferredList([d, closed], fireOnOneCallback=True)
        client.transport.loseConnection()
        yield closed
        return client.data, daemon

    @defer.inlineCallbacks
    def test_verifiedWithCAFile(self):
        port, ca = _tlsBackend(self)
        data, _ = yield self.roundTrip(f"tls:host=127.0.0.1:port={port}:sni=localhost:cafile={ca}")
        self.assertEqual(data, b"secret")

    @defer.inlineCallbacks
    def test_refusesUntrustedCertificate(self):
        port, ca = _tlsBackend(self)
        data, daemon = yield self.roundTrip(f"tls:host=127.0.0.1:port={port}:sni=localhost")
        self.assertEqual(data, b"")
        self.assertEqual(
            metric(
                daemon, "netsvc_forward_backend_failures_total", rule="r", backend=f"tls://127.0.0.1:{port}"
            ),
            1,
        )

    @defer.inlineCallbacks
    def test_refusesWrongName(self):
        port, ca = _tlsBackend(self)
        data, _ = yield self.roundTrip(f"tls:host=127.0.0.1:port={port}:sni=other.example:cafile={ca}")
        self.assertEqual(data, b"")

    @defer.inlineCallbacks
    def test_insecureOptOut(self):
        port, ca = _tlsBackend(self)
        data, _ = yield self.roundTrip(f"ssl:host=127.0.0.1:port={port}:insecure=yes")
        self.assertEqual(data, b"secret")


class ReloadTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_newRulesForNewConnectionsOpenOnesKept(self):
        a, fa = namedBackend(self, b"A")
        b, fb = namedBackend(self, b"B")
        daemon, svc = startForwarder(self, rule([tcp(a)]))
        port = fport(daemon)
        old = yield connect(port)
        yield old.waitFor(1)
        svc.reconfigure(parseForward(self, rule([tcp(b)]) + rule([tcp(a)], name="added")))
        self.assertEqual(fport(daemon), port, "an unchanged listener keeps its socket")
        new = yield connect(port)
        self.assertEqual((yield new.waitFor(1)), b"B")
        old.transport.write(b"still")
        self.assertEqual((yield old.waitFor(6)), b"Astill")
        added = yield connect(fport(daemon, 1))
        self.assertEqual((yield added.waitFor(1)), b"A")
        # Removing a rule closes its listener, not its connections.
        svc.reconfigure(parseForward(self, rule([tcp(b)])))
        yield sleep(0.05)
        self.assertEqual(len(svc.listeners), 1)
        added.transport.write(b"!")
        self.assertEqual((yield added.waitFor(2)), b"A!")
        for c in (old, new, added):
            c.transport.loseConnection()
            yield c.closed


class SettingsTests(unittest.TestCase):
    def problems(self, rules: str) -> str:
        with self.assertRaises(config.ConfigError) as e:
            parseForward(self, rules)
        return str(e.exception)

    def test_goodRuleParses(self):
        s = parseForward(
            self,
            rule(
                ["tcp:host=127.0.0.1:port=80"], "balance: leastconn\nsend_proxy: v2\nhealth: {interval: 1s}"
            ),
        )
        self.assertEqual(s.rules[0].balance, "leastconn")
        self.assertEqual(s.rules[0].health.interval, 1.0)

    def test_errors(self):
        text = self.problems(rule(["tcp:host=127.0.0.1:port=80"], "balance: roundrobn"))
        self.assertIn("services.forward.rules[0].balance", text)
        self.assertIn("did you mean 'roundrobin'", text)
        text = self.problems(rule(["tcp:host=127.0.0.1:prt=80"]))
        self.assertIn("rules[0].connect[0]", text)
        self.assertIn("unknown option 'prt'", text)

    def test_udpMismatch(self):
        text = self.problems(
            '      - name: x\n        listen: ["udp:0"]\n'
            '        connect: ["tcp:host=127.0.0.1:port=1"]\n        send_proxy: v1\n'
        )
        self.assertIn("backends must match the listeners", text)
        self.assertIn("send_proxy: not supported on UDP rules", text)

    def test_duplicateNames(self):
        text = self.problems(rule(["tcp:host=a:port=1"]) + rule(["tcp:host=a:port=1"]))
        self.assertIn("rules[1].name: 'r' is also rules[0]", text)


class ProxyHeaderTests(unittest.TestCase):
    def test_v1(self):
        self.assertEqual(
            proxyheader.v1(("192.0.2.1", 5000), ("198.51.100.2", 80)),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n",
        )
        self.assertEqual(
            proxyheader.v1(("2001:db8::1", 5000), ("2001:db8::2", 443)),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n",
        )
        self.assertEqual(proxyheader.v1(None, None), b"PROXY UNKNOWN\r\n")
        self.assertEqual(
            proxyheader.v1(("192.0.2.1", 1), ("::1", 2)), b"PROXY TCP6 ::ffff:c000:201 ::1 1 2\r\n"
        )

    def test_v2(self):
        sig = b"\r\n\r\n\x00\r\nQUIT\n"
        self.assertEqual(
            proxyheader.v2(("192.0.2.1", 5000), ("198.51.100.2", 80)),
            sig
            + b"\x21\x11\x00\x0c"
            + socket.inet_aton("192.0.2.1")
            + socket.inet_aton("198.51.100.2")
            + struct.pack("!HH", 5000, 80),
        )
        six = proxyheader.v2(("2001:db8::1", 1), ("2001:db8::2", 2))
        self.assertEqual(six[12:16], b"\x21\x21\x00\x24")
        self.assertEqual(len(six), 16 + 36)
        self.assertEqual(proxyheader.v2(None, None), sig + b"\x21\x00\x00\x00")

    def test_readerRoundTripsInPieces(self):
        for header in (
            proxyheader.v1(("192.0.2.1", 5000), ("198.51.100.2", 80)),
            proxyheader.v2(("2001:db8::1", 1), ("2001:db8::2", 2)),
        ):
            reader = proxyheader.HeaderReader()
            stream = header + b"rest"
            results = [reader.feed(stream[i : i + 1]) for i in range(len(header))]
            self.assertEqual(results[:-1], [None] * (len(header) - 1))
            src, dst, rest = results[-1]
            self.assertEqual(rest, b"")
            self.assertIn(src[1], (5000, 1))

    def test_readerRefusesAtItsBound(self):
        """A header that never ends is refused as soon as it passes its bound, fed a byte at a time."""
        for start, filler, bound in (
            (b"PROXY TCP4 ", b"1", proxyheader.V1_MAX),
            (proxyheader.V2_SIGNATURE + b"\x21\x11\x08", b"\x01", proxyheader.V2_MAX),  # 2049 > 2048
        ):
            reader = proxyheader.HeaderReader()
            self.assertIsNone(reader.feed(start))
            fed = len(start)
            with self.assertRaises(proxyheader.ProxyHeaderError):
                while fed <= bound:
                    self.assertIsNone(reader.feed(filler))
                    fed += 1
            self.assertLessEqual(len(reader.buffer), bound)

    def test_maximalV2HeaderInPieces(self):
        tlvs = b"\x04" + struct.pack("!H", proxyheader.V2_MAX - 16 - 12 - 3) + b"x" * (proxyheader.V2_MAX - 31)
        body = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 5000, 80) + tlvs
        header = proxyheader.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body
        self.assertEqual(len(header), proxyheader.V2_MAX)
        reader = proxyheader.HeaderReader()
        for i in range(len(header) - 1):
            self.assertIsNone(reader.feed(header[i:i + 1]))
        self.assertEqual(reader.feed(header[-1:] + b"rest"), (("192.0.2.1", 5000), ("198.51.100.2", 80), b"rest"))

    def test_readerRejects(self):
        for bad in (
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY " + b"x" * 120,
            b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00",
        ):
            with self.assertRaises(proxyheader.ProxyHeaderError):
                proxyheader.HeaderReader().feed(bad)


class ClientEndpointTests(unittest.TestCase):
    def test_kinds(self):
        self.assertEqual(endpoints.validateClient("tcp:host=127.0.0.1:port=80"), "stream")
        self.assertEqual(endpoints.validateClient("udp:host=127.0.0.1:port=53"), "udp")
        spec = endpoints.parseClient("tls:host=[::1]:port=443:sni=example.org")
        self.assertEqual(
            (spec.kind, spec.host, spec.port, spec.sni, spec.insecure),
            ("tls", "::1", 443, "example.org", False),
        )
        self.assertEqual(endpoints.parseClient("unix:/run/x.sock").path, "/run/x.sock")

    def test_errors(self):
        for bad, phrase in (
            ("tcp:host=a", "needs a port"),
            ("tcp:host=a:port=1:tmeout=1", "did you mean"),
            ("ftp:host=a:port=1", "unknown client endpoint type"),
            ("tls:host=a:port=1:insecure=maybe", "insecure must be"),
            ("tls:host=a:port=1:caCertsDir=/etc", "cafile"),
        ):
            with self.assertRaises(endpoints.EndpointError) as e:
                endpoints.parseClient(bad)
            self.assertIn(phrase, str(e.exception))

    def test_clientFromString(self):
        from twisted.internet.testing import MemoryReactor

        r = MemoryReactor()
        ep = endpoints.clientFromString(r, "tcp:host=127.0.0.1:port=80", timeout=3)
        ep.connect(protocol.Factory.forProtocol(protocol.Protocol))
        self.assertEqual(r.tcpClients[0][:2], ("127.0.0.1", 80))
        self.assertIsInstance(
            endpoints.clientFromString(r, "udp:host=127.0.0.1:port=53"), endpoints.UDPClientEndpoint
        )


class CommandLineTests(unittest.TestCase):
    def parse(self, *argv):
        import argparse

        top = argparse.ArgumentParser()
        sub = top.add_subparsers()
        cli.addParser(sub)
        return cli.ruleFromArgs(top.parse_args(["forward", *argv]))

    def test_shorthands(self):
        r = self.parse(
            "8080",
            "10.0.0.5:80",
            "[::1]:81",
            "--balance",
            "leastconn",
            "--send-proxy",
            "v2",
            "--health-interval",
            "2s",
            "--allow",
            "10.0.0.0/8",
            "--bandwidth",
            "1MiB",
        )
        self.assertEqual(r["listen"], ["tcp:8080:interface=127.0.0.1"])
        self.assertEqual(r["connect"], ["tcp:host=10.0.0.5:port=80", "tcp:host=[::1]:port=81"])
        self.assertEqual(r["health"], {"interval": "2s"})
        self.assertEqual(r["bandwidth"], {"per_connection": "1MiB"})
        self.assertEqual(r["send_proxy"], "v2")
        u = self.parse("udp:5300:interface=127.0.0.1", "127.0.0.1:53", "--udp-responses", "1", "--name", "u")
        self.assertEqual(u["connect"], ["udp:host=127.0.0.1:port=53"])
        self.assertEqual(u["udp"], {"responses": 1})
        # What the command line builds is a valid rule.
        config.structure(config.Settings, {"services": {"forward": {"rules": [r, u]}}})


class SIGHUPTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_daemonReloadReachesTheRules(self):
        """Daemon.reload (what SIGHUP runs) re-reads the file and hands the forward settings over."""
        a, _ = namedBackend(self, b"A")
        b, _ = namedBackend(self, b"B")
        daemon, svc = startForwarder(self, rule([tcp(a)]))
        newFile = config.parse("services:\n  forward:\n    rules:\n" + rule([tcp(b)]), "test.yaml")
        daemon.context.reloadSettings = lambda: newFile
        daemon.reload()
        client = yield connect(fport(daemon))
        self.assertEqual((yield client.waitFor(1)), b"B")
        client.transport.loseConnection()
        yield client.closed
