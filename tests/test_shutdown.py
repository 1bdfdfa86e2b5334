"""
Graceful shutdown always ends (issue 22): whatever state a connection was left
in, stopping finishes within C{drain_timeout} plus the abort grace.

After mutated input a daemon logged "stopping: ... draining connections for up to
5.0s" and ran on for 18 minutes: a protocol that raised while TLS delivered the
last bytes of a closing connection never got C{connectionLost} (the TLS layer
stops there), so its guard kept it on the books with no socket left and the
drain waited for it forever.  L{netsvc.policies.Guard.drain} now delivers the
missing C{connectionLost} and has a deadline; L{netsvc.runtime.Daemon} stops
regardless of a service that never finishes stopping.
"""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, endpoints, reactor, ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial import unittest

from netsvc.config import Limits
from netsvc.echo.protocol import Echo
from netsvc.metrics import Registry, ServiceMetrics
from netsvc.policies import AccessList, Guard
from netsvc.runtime import STOP_SLACK
from tests.helpers import sleep, startDaemon

DRAIN = 0.3


class Parser(Protocol):
    def __init__(self) -> None:
        self.lost = 0

    def connectionLost(self, reason: object) -> None:
        self.lost += 1


class Stubborn(Parser):
    def drain(self) -> None:
        raise RuntimeError("drain failed")


class GuardDeadlineTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.guard = Guard(Limits(), ServiceMetrics(Registry(), "t"), self.clock, AccessList())

    def connect(self, protocol: type[Protocol] = Parser) -> tuple[object, StringTransport]:
        conn = self.guard.wrap(Factory.forProtocol(protocol)).buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def test_ghostGetsConnectionLostAtOnce(self):
        """A transport already disconnected whose connectionLost never came does not hold the drain."""
        conn, transport = self.connect()
        transport.disconnected = True  # the socket is gone; nobody told the protocols above
        d = self.guard.drain(5)
        self.successResultOf(d)
        self.assertEqual(conn.wrappedProtocol.lost, 1)
        self.assertEqual(self.guard.connections, set())
        self.assertEqual(self.guard.perHost, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadlineWhateverTheConnectionDoes(self):
        """A connection that ignores the close and the abort is forgotten at the deadline."""
        conn, transport = self.connect()
        transport.abortConnection = lambda: None  # never closes
        d = self.guard.drain(5)
        self.clock.advance(5 + self.guard.abortGrace)
        self.assertNoResult(d)
        self.clock.advance(self.guard.abortSettle)
        self.successResultOf(d)
        self.assertEqual(self.guard.connections, set())
        self.assertEqual(self.guard.perHost, {})

    def test_aDrainThatRaisesDoesNotStopTheOthers(self):
        bad, badTransport = self.connect(Stubborn)
        good, goodTransport = self.connect()
        d = self.guard.drain(1)
        self.clock.advance(1)
        self.assertTrue(badTransport.disconnecting)
        self.assertTrue(goodTransport.disconnecting)
        bad.connectionLost(None)
        good.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class Never(service.Service):
    """A service whose stop never finishes."""

    name = "never"

    def stopService(self):
        service.Service.stopService(self)
        return defer.Deferred()


class Crash(ValueError):
    pass


def _raise(self, data):
    raise Crash("a parser crashed on mutated input")


class OneRecordAtATime(Protocol):
    """Over plain L{TLSMemoryBIOProtocol} (one record per write): two records in one segment, then closes."""

    def connectionMade(self) -> None:
        self.transport.write(b"first record")
        self.transport.write(b"second record")
        self.transport.loseConnection()


class HalfPreface(Protocol):
    """HTTP/2 (ALPN h2): half the connection preface, then nothing."""

    def connectionMade(self) -> None:
        self.transport.write(b"PRI * HTTP/2.0\r\n\r\n")


class DaemonStopTests(unittest.TestCase):
    timeout = 60

    def stopWithin(self, daemon, limit: float) -> defer.Deferred:
        """Stop C{daemon}; fail (instead of hanging) when that takes longer than C{limit} seconds."""
        return daemon.stopService().addTimeout(limit, reactor)

    def connectTLS(self, portNumber, protocol, tlsProtocol=None, protocols=None) -> defer.Deferred:
        options = ssl.CertificateOptions(acceptableProtocols=protocols)  # no verification: a test client
        factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: protocol))
        if tlsProtocol is not None:
            factory.protocol = tlsProtocol
        return endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber).connect(factory)

    def limit(self) -> float:
        # The daemon's own bound is DRAIN + abortGrace + STOP_SLACK; a little more for a busy machine.
        return DRAIN + Guard.abortGrace + STOP_SLACK + 3.0

    @defer.inlineCallbacks
    def test_aServiceThatNeverStops(self):
        daemon = startDaemon(self, f"drain_timeout: {int(DRAIN * 1000)}ms\n"
                                   'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        Never().setServiceParent(daemon)
        yield self.stopWithin(daemon, self.limit())
        self.assertFalse(daemon.running)

    @defer.inlineCallbacks
    def test_oddConnectionsDoNotHoldTheStop(self):
        """
        Echo over TLS whose protocol raises (which left a ghost), web over TLS and TCP: a
        half-sent TLS handshake, a pipeline of big files never read (a paused
        producer, full buffers), an HTTP/2 preface half sent, a TLS connection
        that says nothing.  The daemon stops within the bound.
        """
        root = Path(self.mktemp()).absolute()
        root.mkdir(parents=True)
        (root / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, past the cache
        daemon = startDaemon(
            self,
            f"drain_timeout: {int(DRAIN * 1000)}ms\n"
            "services:\n"
            '  echo:\n    listen: ["tls:0:interface=127.0.0.1"]\n'
            '  web:\n    listen: ["tls:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]\n'
            f"    root: {root}\n    cache: {{max_file_size: 64KiB}}\n",
        )
        self.patch(Echo, "dataReceived", _raise)

        def port(name, index=0):
            return daemon.getServiceNamed(name).listeners[index].port.getHost().port

        echoGuard = daemon.getServiceNamed("echo").guard
        # the ghost: two records in one read, the first raises, the second raises again in
        # TLS's connectionLost, which then never reaches the guard
        ghost = OneRecordAtATime()
        closed = defer.Deferred()
        ghost.connectionLost = lambda reason: closed.callback(None)
        yield self.connectTLS(port("echo"), ghost, TLSMemoryBIOProtocol)  # one record per write
        yield closed.addTimeout(10, reactor)
        for _ in range(50):  # until the server has read and failed (bounded)
            if self.flushLoggedErrors(Crash):
                break
            yield sleep(0.02)
        yield sleep(0.1)
        self.flushLoggedErrors(Crash)

        sockets = []

        def raw(portNumber: int, payload: bytes, rcvbuf: int = 0) -> None:
            s = socket.socket()
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.connect(("127.0.0.1", portNumber))
            s.sendall(payload)
            sockets.append(s)

        self.addCleanup(lambda: [s.close() for s in sockets])
        raw(port("web", 0), bytes.fromhex("16030101fc010001f80303") + b"\x00" * 40)  # half a ClientHello
        raw(port("web", 1), b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n" * 16, rcvbuf=4096)
        yield self.connectTLS(port("web", 0), HalfPreface(), protocols=[b"h2"])
        raw(port("web", 0), b"")  # TCP only, no ClientHello at all
        webGuard = daemon.getServiceNamed("web").guard
        for _ in range(100):  # until the web service has them all (bounded)
            if len(webGuard.connections) >= 4:
                break
            yield sleep(0.02)
        yield sleep(0.2)  # the big responses fill the buffers
        self.assertEqual(len(webGuard.connections), 4,
                         [(type(c.wrappedProtocol).__name__, getattr(c.wrappedProtocol, "delegate", None), c.transport)
                          for c in webGuard.connections])
        ghosts = len(echoGuard.connections)

        yield self.stopWithin(daemon, self.limit())
        # The guard catches the protocol's error and aborts only that connection, so TLS never sees it
        # and no ghost is left (before, this connection stayed on the books until the stop).
        self.assertEqual(ghosts, 0, "the crashing TLS connection stayed on the books")
        self.assertEqual(echoGuard.connections, set())
        self.assertEqual(webGuard.connections, set())
        self.flushLoggedErrors(Crash)
