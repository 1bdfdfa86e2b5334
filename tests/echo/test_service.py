"""The echo service over real loopback sockets: TCP, UDP, TLS, IPv6, limits."""

import socket
import time

from twisted.internet import defer, endpoints, reactor
from twisted.internet.error import ConnectionDone
from twisted.trial import unittest

from netsvc.echo import client as echoClient
from netsvc.tls import clientCreator
from tests.helpers import Collector, connectEcho, port, sleep, startDaemon, stateDir

ECHO = """
services:
  echo:
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    limits: {max_connections_per_ip: 3, idle_timeout: 30s, max_message: 1KiB}
"""


class EchoServiceTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startDaemon(self, ECHO)

    @defer.inlineCallbacks
    def test_tcp(self):
        client = yield connectEcho("127.0.0.1", port(self.daemon, 0))
        got = yield client.roundTrip(b"33 bytes of cookbook, no newline!")
        self.assertEqual(got, b"33 bytes of cookbook, no newline!")
        got = yield client.roundTrip("héllo wörld\0".encode())
        self.assertEqual(got, "héllo wörld\0".encode())
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_tlsVerifiedWithGeneratedCertificate(self):
        cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")
        for host in ("localhost", "127.0.0.1"):
            client = yield connectEcho("127.0.0.1", port(self.daemon, 2), clientCreator(host, cafile=cafile))
            got = yield client.roundTrip(b"secret\0")
            self.assertEqual(got, b"secret\0")
            client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_tlsRefusesUnknownCertificate(self):
        # Verification is on by default: the system roots do not know our certificate.
        client = yield connectEcho("127.0.0.1", port(self.daemon, 2), clientCreator("localhost"))
        e = yield self.assertFailure(client.roundTrip(b"x"), Exception)
        self.assertIn("certificate verify failed", str(e))

    @defer.inlineCallbacks
    def test_udp(self):
        proto = echoClient.DatagramEchoClient(reactor, timeout=3)
        udp = reactor.listenUDP(0, proto, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        udp.connect("127.0.0.1", port(self.daemon, 1))
        got = yield proto.roundTrip(b"datagram")
        self.assertEqual(got, b"datagram")

    @defer.inlineCallbacks
    def test_udpOversizedNotEchoed(self):
        proto = echoClient.DatagramEchoClient(reactor, timeout=0.3, retries=0)
        udp = reactor.listenUDP(0, proto, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        udp.connect("127.0.0.1", port(self.daemon, 1))
        yield self.assertFailure(proto.roundTrip(b"x" * 1025), defer.TimeoutError)
        self.assertEqual(self.daemon.getServiceNamed("echo").metrics.limit("max_message").value, 1)

    @defer.inlineCallbacks
    def test_perIPLimitRefusesOthersUnaffected(self):
        clients = []
        for _ in range(3):
            clients.append((yield connectEcho("127.0.0.1", port(self.daemon, 0))))
        extra = Collector()
        yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port(self.daemon, 0)), extra)
        reason = yield extra.closed
        self.assertIsInstance(reason, ConnectionDone)
        self.assertEqual(extra.data, b"")
        got = yield clients[0].roundTrip(b"still fine")  # the others never notice
        self.assertEqual(got, b"still fine")
        self.assertEqual(self.daemon.getServiceNamed("echo").metrics.refused("max_connections_per_ip").value, 1)
        for c in clients:
            c.transport.loseConnection()

    @defer.inlineCallbacks
    def test_tlsConnectionsOverTheLimitAreClosedCleanly(self):
        """A refusal under TLS closes the connection (no errors logged: trial fails on those)."""
        cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")
        clients = []
        for _ in range(3):
            clients.append((yield connectEcho("127.0.0.1", port(self.daemon, 2),
                                              clientCreator("localhost", cafile=cafile))))
            self.assertEqual((yield clients[-1].roundTrip(b"in")), b"in")
        extra = yield connectEcho("127.0.0.1", port(self.daemon, 2), clientCreator("localhost", cafile=cafile))
        yield self.assertFailure(extra.roundTrip(b"over"), Exception)
        self.assertEqual(self.daemon.getServiceNamed("echo").metrics.refused("max_connections_per_ip").value, 1)
        self.assertEqual((yield clients[0].roundTrip(b"others fine")), b"others fine")
        for c in clients:
            c.transport.loseConnection()

    @defer.inlineCallbacks
    def test_backPressureBoundsServerMemory(self):
        """A client that sends but never reads cannot grow the server's buffers."""
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.connect(("127.0.0.1", port(self.daemon, 0)))
        s.setblocking(False)
        self.addCleanup(s.close)
        chunk = b"x" * 65536
        sent, deadline = 0, time.monotonic() + 3
        while sent < 64 * 2**20 and time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                yield sleep(0.01)
        (conn,) = self.daemon.getServiceNamed("echo").guard.connections
        tcp = conn.transport
        buffered = len(tcp.dataBuffer) + tcp._tempDataLen
        self.assertLess(sent, 32 * 2**20, "the client could push without limit")
        self.assertLess(buffered, 1 * 2**20)
        self.assertTrue(tcp.producerPaused)


class IPv6Tests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tcp6(self):
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6 on this machine")
        daemon = startDaemon(self, 'services:\n  echo:\n    listen: ["tcp6:0:interface=::1", "udp:0:interface=::1"]\n')
        client = yield connectEcho("::1", port(daemon, 0))
        self.assertEqual((yield client.roundTrip(b"six")), b"six")
        client.transport.loseConnection()
        proto = echoClient.DatagramEchoClient(reactor, timeout=3)
        udp = reactor.listenUDP(0, proto, interface="::1")
        self.addCleanup(udp.stopListening)
        udp.connect("::1", port(daemon, 1))
        self.assertEqual((yield proto.roundTrip(b"six")), b"six")


def held(conn) -> int:
    """Output the server holds in userland for one connection (through the guard and TLS layers)."""
    t, total = conn.transport, 0
    while t is not None:
        total += sum(len(x) for x in getattr(t, "_appSendBuffer", []))
        total += sum(len(x) for x in getattr(getattr(t, "_aggregator", None), "_buffer", []))
        if hasattr(t, "dataBuffer"):
            total += len(t.dataBuffer) - t.offset + t._tempDataLen
        t = getattr(t, "transport", None)
    return total


class NonReadingClientTests(unittest.TestCase):
    """A client that sends and never reads, over TCP and TLS, against the echo service."""

    def setUp(self):
        self.daemon = startDaemon(self, ECHO.replace("idle_timeout: 30s", "idle_timeout: 1s"))
        self.cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")

    @defer.inlineCallbacks
    def connect(self, tls: bool):
        client = yield connectEcho("127.0.0.1", port(self.daemon, 2 if tls else 0),
                                   clientCreator("localhost", cafile=self.cafile) if tls else None)
        self.addCleanup(client.transport.abortConnection)
        self.assertEqual((yield client.roundTrip(b"hello")), b"hello")  # the TLS handshake is done
        t = client.transport
        while not hasattr(t, "socket"):
            t = t.transport
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        (conn,) = self.daemon.getServiceNamed("echo").guard.connections
        return client, conn

    @defer.inlineCallbacks
    def sendForever(self, tls: bool):
        client, conn = yield self.connect(tls)
        client.transport.pauseProducing()  # never read again
        chunk = b"x" * 65536
        sent, most, deadline = 0, 0, time.monotonic() + 3
        # The client writes only while its own transport accepts it (held by the kernel or sent).
        while sent < 64 * 2**20 and time.monotonic() < deadline:
            tcp = client.transport if not tls else client.transport.transport
            if len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen < 4 * 65536:
                client.transport.write(chunk)
                sent += len(chunk)
            yield sleep(0.002)
            most = max(most, held(conn))
        self.assertLess(sent, 32 * 2**20, "the client could push without limit")
        self.assertLess(most, 2**20, f"the server held {most} bytes for a client that does not read")

    def test_tcpNonReaderBounded(self):
        return self.sendForever(tls=False)

    def test_tlsNonReaderBounded(self):
        return self.sendForever(tls=True)

    @defer.inlineCallbacks
    def idleClose(self, tls: bool):
        client, conn = yield self.connect(tls)
        closed = defer.Deferred()
        client.connectionLost = lambda reason: closed.callback(None)
        yield closed.addTimeout(6, reactor)  # idle 1 s, then close (or abort after the grace)

    def test_tcpIdleCloses(self):
        return self.idleClose(tls=False)

    def test_tlsIdleCloses(self):
        """Echo registers a producer: TLS starts its shutdown only once it is unregistered."""
        return self.idleClose(tls=True)
