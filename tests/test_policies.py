"""
Limits: connections in total and per IP, idle timeout, datagram size and rate,
access lists, and the shutdown drain -- each counted in metrics when it triggers.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from netsvc.config import Limits
from netsvc.metrics import Registry, ServiceMetrics
from netsvc.policies import AccessList, Guard, GuardedProtocol, RateLimiter


class Recorder(Protocol):
    def __init__(self):
        self.received = []
        self.lost = None
        self.drained = False

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason

    def drain(self):
        self.drained = True


def addr(host="10.0.0.1", port=40000):
    return IPv4Address("TCP", host, port)


class GuardTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.metrics = ServiceMetrics(Registry(), "test")

    def guard(self, **limits):
        return Guard(Limits(**limits), self.metrics, self.clock, AccessList(*limits.pop("acl", ((), ()))))

    def connect(self, factory, host="10.0.0.1"):
        """(protocol, transport), or (None, None) when refused (and closed at once)."""
        proto = factory.buildProtocol(addr(host))
        transport = StringTransport()
        proto.makeConnection(transport)
        if not isinstance(proto, GuardedProtocol):
            self.assertTrue(transport.disconnecting, "a refused connection must be closed")
            return None, None
        return proto, transport

    def test_passesBytesBothWaysAndCountsThem(self):
        factory = self.guard().wrap(Factory.forProtocol(Recorder))
        proto, transport = self.connect(factory)
        proto.dataReceived(b"hello")
        proto.wrappedProtocol.transport.write(b"world!")
        self.assertEqual(proto.wrappedProtocol.received, [b"hello"])
        self.assertEqual(transport.value(), b"world!")
        self.assertEqual(self.metrics.bytesIn.value, 5)
        self.assertEqual(self.metrics.bytesOut.value, 6)
        self.assertEqual(self.metrics.accepted.value, 1)
        self.assertEqual(self.metrics.active.read(), 1)

    def test_maxConnections(self):
        guard = self.guard(max_connections=2)
        factory = guard.wrap(Factory.forProtocol(Recorder))
        first, _ = self.connect(factory, "10.0.0.1")
        self.connect(factory, "10.0.0.2")
        self.assertEqual(self.connect(factory, "10.0.0.3"), (None, None))
        self.assertEqual(self.metrics.refused("max_connections").value, 1)
        first.connectionLost(None)
        self.assertIsNotNone(self.connect(factory, "10.0.0.3")[0])
        self.assertEqual(self.metrics.active.read(), 2)

    def test_maxConnectionsPerIP(self):
        factory = self.guard(max_connections_per_ip=1).wrap(Factory.forProtocol(Recorder))
        self.connect(factory, "10.0.0.1")
        self.assertEqual(self.connect(factory, "10.0.0.1"), (None, None))
        self.assertIsNotNone(self.connect(factory, "10.0.0.2")[0])
        self.assertEqual(self.metrics.refused("max_connections_per_ip").value, 1)

    def test_refusalProtocolOfTheWrappedFactory(self):
        class Polite(Factory):
            protocol = Recorder

            def refusalProtocol(self, reason):
                p = Protocol()
                p.reason = reason
                return p

        proto = self.guard(max_connections=1).wrap(Polite())
        self.connect(proto)
        refused = proto.buildProtocol(addr("10.0.0.9"))
        self.assertEqual(refused.reason, "max_connections")

    def test_refusalNeverNone(self):
        """
        A wrapped factory whose refusalProtocol (or buildProtocol) answers None still gets a protocol that
        closes the connection: a TLS wrapper around the guard would wrap None and fail with a traceback on
        every refused connection (DNS over TLS under a connection flood).
        """
        from twisted.internet.ssl import CertificateOptions
        from twisted.protocols.tls import TLSMemoryBIOFactory

        class Silent(Factory):
            protocol = Recorder

            def refusalProtocol(self, reason):
                return None

        class Declines(Factory):
            def buildProtocol(self, addr):
                return None

        tls = TLSMemoryBIOFactory(CertificateOptions(), False, self.guard(max_connections=1).wrap(Silent()))
        tls.doStart()
        self.connect(tls.wrappedFactory)
        for factory in (tls, TLSMemoryBIOFactory(CertificateOptions(), False, self.guard().wrap(Declines()))):
            refused = factory.buildProtocol(addr("10.0.0.9"))
            transport = StringTransport()
            refused.makeConnection(transport)  # AttributeError on None before
            self.assertTrue(transport.disconnecting)

    def test_accessList(self):
        guard = Guard(Limits(), self.metrics, self.clock, AccessList(["10.0.0.0/8"], ["10.6.6.0/24"]))
        factory = guard.wrap(Factory.forProtocol(Recorder))
        self.assertIsNotNone(self.connect(factory, "10.1.2.3")[0])
        self.assertEqual(self.connect(factory, "10.6.6.6"), (None, None))
        self.assertEqual(self.connect(factory, "192.0.2.1"), (None, None))
        self.assertEqual(self.metrics.refused("acl").value, 2)

    def test_idleTimeout(self):
        factory = self.guard(idle_timeout=10).wrap(Factory.forProtocol(Recorder))
        proto, transport = self.connect(factory)
        self.clock.advance(6)
        proto.dataReceived(b"x")  # activity pushes the deadline
        self.clock.advance(6)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(4)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.metrics.limit("idle_timeout").value, 1)

    def test_idleCloseAbortsAClientThatDoesNotRead(self):
        """
        A connection the idle timeout closed that is still open after the guard's abort grace (its client
        does not read, so the unsent output and TLS's close_notify never leave) is aborted; a connection
        that closed in time leaves no timer behind.
        """
        guard = self.guard(idle_timeout=10)
        factory = guard.wrap(Factory.forProtocol(Recorder))
        proto, transport = self.connect(factory)
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(guard.abortGrace)
        self.assertTrue(transport.disconnected)

        polite, _ = self.connect(factory)
        self.clock.advance(10)
        polite.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closingUnregistersTheProducer(self):
        """
        A protocol that is its transport's producer and closes: the producer is unregistered first (a
        paused producer left registered is resumed instead of the connection closed, and TLS never
        starts its shutdown), and what was written is still flushed before the close.
        """
        class Producing(Recorder):
            def connectionMade(self):
                self.transport.registerProducer(self, True)

            def pauseProducing(self):
                pass

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        factory = self.guard().wrap(Factory.forProtocol(Producing))
        proto, transport = self.connect(factory)
        self.assertIs(transport.producer, proto.wrappedProtocol)
        proto.wrappedProtocol.transport.write(b"last words")
        proto.wrappedProtocol.transport.loseConnection()
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"last words")

    def test_protocolErrorClosesOnlyThatConnection(self):
        """
        A protocol that raises while handling input: the error is logged and counted, that connection
        is aborted, and nothing is raised into the transport (TLS would stop in its own connectionLost).
        """
        class Buggy(Recorder):
            def dataReceived(self, data):
                raise ZeroDivisionError("a bug")

        factory = self.guard().wrap(Factory.forProtocol(Buggy))
        proto, transport = self.connect(factory)
        other, otherTransport = self.connect(factory, "10.0.0.2")
        proto.dataReceived(b"boom")  # does not raise
        self.assertTrue(transport.disconnected)
        self.assertFalse(otherTransport.disconnecting)
        self.assertEqual(self.metrics.error("protocol").value, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_writesCountAsActivity(self):
        factory = self.guard(idle_timeout=10).wrap(Factory.forProtocol(Recorder))
        proto, transport = self.connect(factory)
        self.clock.advance(9)
        proto.write(b"still here")
        self.clock.advance(9)
        self.assertFalse(transport.disconnecting)

    def test_idleTimeoutCallsTimedOut(self):
        class Polite(Recorder):
            def timedOut(self):
                self.transport.write(b"bye\n")
                self.transport.loseConnection()

        factory = self.guard(idle_timeout=1).wrap(Factory.forProtocol(Polite))
        proto, transport = self.connect(factory)
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"bye\n")
        self.assertTrue(transport.disconnecting)

    def test_noAbortTimerWhenTimedOutClosedAtOnce(self):
        """timedOut() that closed the connection there and then leaves no abort timer behind."""
        class Abrupt(Recorder):
            def timedOut(self):
                self.transport.abortConnection()
                guarded.connectionLost(None)  # what a real transport reports at once

        factory = self.guard(idle_timeout=1).wrap(Factory.forProtocol(Abrupt))
        guarded, transport = self.connect(factory)
        self.clock.advance(1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleTimerCancelledOnClose(self):
        factory = self.guard(idle_timeout=10).wrap(Factory.forProtocol(Recorder))
        proto, _ = self.connect(factory)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_halfCloseIsPassedOn(self):
        from zope.interface import implementer

        @implementer(IHalfCloseableProtocol)
        class HalfCloser(Recorder):
            readLost = False

            def readConnectionLost(self):
                self.readLost = True

            def writeConnectionLost(self):
                pass

        plain, _ = self.connect(self.guard().wrap(Factory.forProtocol(Recorder)))
        self.assertFalse(IHalfCloseableProtocol.providedBy(plain))
        half, _ = self.connect(self.guard().wrap(Factory.forProtocol(HalfCloser)), "10.0.0.7")
        self.assertTrue(IHalfCloseableProtocol.providedBy(half))
        half.readConnectionLost()
        self.assertTrue(half.wrappedProtocol.readLost)

    def test_drainWaitsThenCloses(self):
        guard = self.guard()
        factory = guard.wrap(Factory.forProtocol(Recorder))
        proto, transport = self.connect(factory)
        d = guard.drain(5)
        self.assertTrue(proto.wrappedProtocol.drained)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # and nothing new is accepted while shutting down
        self.assertEqual(self.connect(factory), (None, None))

    def test_drainEndsEarlyWhenConnectionsFinish(self):
        guard = self.guard()
        proto, transport = self.connect(guard.wrap(Factory.forProtocol(Recorder)))
        d = guard.drain(30)
        proto.connectionLost(None)
        self.successResultOf(d)
        self.assertFalse(transport.disconnecting)

    def test_drainAbortsStuckConnections(self):
        guard = self.guard()
        proto, transport = self.connect(guard.wrap(Factory.forProtocol(Recorder)))
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        guard.drain(1)
        self.clock.advance(1 + guard.abortGrace)
        self.assertEqual(aborted, [True])

    def test_drainWithNothingOpen(self):
        self.successResultOf(self.guard().drain(5))

    def test_datagrams(self):
        guard = self.guard(max_message=10, rate=2, burst=2)
        self.assertTrue(guard.admitDatagram("10.0.0.1", 10))
        self.assertFalse(guard.admitDatagram("10.0.0.1", 11))
        self.assertTrue(guard.admitDatagram("10.0.0.1", 1))
        self.assertFalse(guard.admitDatagram("10.0.0.1", 1))  # burst of 2 used up
        self.assertTrue(guard.admitDatagram("10.0.0.2", 1))  # per client
        self.clock.advance(0.5)
        self.assertTrue(guard.admitDatagram("10.0.0.1", 1))  # refilled at 2/s
        self.assertEqual(self.metrics.limit("max_message").value, 1)
        self.assertEqual(self.metrics.limit("rate").value, 1)
        self.assertEqual(self.metrics.datagramsIn.value, 6)


class AccessListTests(unittest.TestCase):
    def test_openByDefault(self):
        self.assertTrue(AccessList().permits("203.0.113.5"))

    def test_denyWins(self):
        acl = AccessList(["0.0.0.0/0"], ["203.0.113.0/24"])
        self.assertFalse(acl.permits("203.0.113.5"))
        self.assertTrue(acl.permits("198.51.100.1"))

    def test_ipv6AndMapped(self):
        acl = AccessList(["127.0.0.0/8", "::1"])
        self.assertTrue(acl.permits("::1"))
        self.assertTrue(acl.permits("::ffff:127.0.0.1"))
        self.assertFalse(acl.permits("2001:db8::1"))

    def test_badNetwork(self):
        self.assertRaises(ValueError, AccessList, ["nonsense"])


class RateLimiterTests(unittest.TestCase):
    def test_boundedTable(self):
        clock = MemoryReactorClock()
        limiter = RateLimiter(1, 1, clock, maxKeys=3)
        for key in range(10):
            self.assertTrue(limiter.allow(key))
        self.assertLessEqual(len(limiter._buckets), 3)

    def test_unlimited(self):
        limiter = RateLimiter(0, 0, MemoryReactorClock())
        self.assertTrue(all(limiter.allow("a") for _ in range(1000)))

    def test_refund(self):
        """Reserve-first: allow() takes a token before the check, refund() gives it back (never above the burst)."""
        clock = MemoryReactorClock()
        limiter = RateLimiter(0.1, 2, clock)
        self.assertTrue(limiter.allow("a"))
        self.assertTrue(limiter.allow("a"))
        self.assertFalse(limiter.allow("a"))
        limiter.refund("a")
        self.assertEqual(limiter.available("a"), 1)
        self.assertTrue(limiter.allow("a"))
        for _ in range(5):
            limiter.refund("a")
        self.assertEqual(limiter.available("a"), 2)
        limiter.refund("unknown")  # nothing taken: nothing to give back
        self.assertNotIn("unknown", limiter._buckets)
        RateLimiter(0, 0, clock).refund("a")  # unlimited: a no-op
