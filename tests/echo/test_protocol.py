"""Echo wire behaviour, on in-memory transports."""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.proto_helpers import FakeDatagramTransport
from twisted.trial import unittest

from netsvc.config import Limits
from netsvc.echo.protocol import DatagramEcho, EchoFactory
from netsvc.metrics import Registry, ServiceMetrics
from netsvc.policies import Guard


class EchoTests(unittest.TestCase):
    def setUp(self):
        self.proto = EchoFactory().buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_bytesBackWhateverTheFraming(self):
        for chunk in (b"33 bytes of cookbook, no newline!", b"h\xc3\xa9llo\x00", b"\r\n", b"\x00" * 5):
            self.transport.clear()
            self.proto.dataReceived(chunk)
            self.assertEqual(self.transport.value(), chunk)

    def test_splitAndCoalesced(self):
        self.proto.dataReceived(b"hel")
        self.proto.dataReceived(b"lo\x00wor")
        self.proto.dataReceived(b"ld\x00")
        self.assertEqual(self.transport.value(), b"hello\x00world\x00")

    def test_backPressure(self):
        # The transport produces into itself: when its buffer fills it pauses reading.
        self.assertIs(self.transport.producer, self.transport)
        self.assertTrue(self.transport.streaming)

    def test_idleCloseUnregistersThenAborts(self):
        clock = MemoryReactorClock()
        proto = EchoFactory(clock).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.timedOut()
        self.assertIsNone(transport.producer)  # or TLS would never start its shutdown
        self.assertTrue(transport.disconnecting)
        clock.advance(proto.abortGrace)
        self.assertTrue(transport.disconnected)

    def test_halfCloseFlushesThenCloses(self):
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.proto))
        self.proto.dataReceived(b"last words")
        self.proto.readConnectionLost()
        self.assertEqual(self.transport.value(), b"last words")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)


class DatagramEchoTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.metrics = ServiceMetrics(Registry(), "echo")
        self.guard = Guard(Limits(max_message=100, rate=10, burst=3), self.metrics, self.clock)
        self.proto = DatagramEcho(self.guard)
        self.transport = FakeDatagramTransport()
        self.proto.makeConnection(self.transport)

    def test_echoedToSender(self):
        self.proto.datagramReceived(b"ping", ("127.0.0.1", 40000))
        self.assertEqual(self.transport.written, [(b"ping", ("127.0.0.1", 40000))])
        self.assertEqual(self.metrics.bytesOut.value, 4)

    def test_oversizedDropped(self):
        self.proto.datagramReceived(b"x" * 101, ("127.0.0.1", 40000))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.metrics.limit("max_message").value, 1)

    def test_rateLimitedPerClient(self):
        for _ in range(5):
            self.proto.datagramReceived(b"x", ("127.0.0.1", 40000))
        self.proto.datagramReceived(b"y", ("127.0.0.2", 40000))
        self.assertEqual(len(self.transport.written), 4)  # burst of 3, plus the other client

    def test_rateLimitOnByDefault(self):
        """UDP echo reflects to any source address: the service's default limits rate it per client."""
        from netsvc.echo.service import Settings

        limits = Settings().limits
        self.assertGreater(limits.rate, 0)
        guard = Guard(limits, ServiceMetrics(Registry(), "echo"), self.clock)
        proto = DatagramEcho(guard)
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)
        for _ in range(int(limits.burst) + 10):
            proto.datagramReceived(b"x", ("127.0.0.1", 40000))
        self.assertEqual(len(transport.written), limits.burst)

    def test_loopPortsIgnored(self):
        # Answering another echo/chargen server would start an endless loop.
        for port in (7, 19, 0):
            self.proto.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.metrics.limit("loop_port").value, 3)
