"""
Echo wire behaviour (RFC 862), over streams and datagrams.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Sends every byte back, whatever the framing.

    Back-pressure: the transport is registered as its own producer, so while the
    client does not read (our writes pile up in the send buffer) we stop reading
    from it, and the server's memory stays bounded.

    Half-close: a client that sends and then shuts its side down (C{socat},
    C{nc -N}) still gets every echo: we close only once our writes are flushed.
    (Without IHalfCloseableProtocol, Twisted drops unsent output on the peer's FIN.)

    Closing unregisters the producer first: with one registered, TLS never
    starts its shutdown and TCP resumes a paused producer instead of closing.
    """

    #: After an idle close, how long the peer gets (to read what is left, to answer
    #: TLS's close_notify) before the connection is aborted.
    abortGrace = 2.0

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock
        self._abortCall: Any = None

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.close()

    def writeConnectionLost(self) -> None:
        self.close()

    def timedOut(self) -> None:
        """Idle: close, and abort if the peer neither reads nor closes within L{abortGrace}."""
        self.close()
        if self.clock is not None:
            self._abortCall = self.clock.callLater(self.abortGrace, self.transport.abortConnection)

    def connectionLost(self, reason: Any) -> None:
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()


class EchoFactory(Factory):
    noisy = False

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock

    def buildProtocol(self, addr: Any) -> Echo:
        p = Echo(self.clock)
        p.factory = self
        return p


#: Source ports of the small services (echo, discard, daytime, qotd, chargen, time):
#: answering them could start an endless loop between two such servers (as inetd
#: refuses to).  Port 0 is never a real sender.
LOOP_PORTS = frozenset({0, 7, 9, 13, 17, 19, 37})


class DatagramEcho(DatagramProtocol):
    """
    Sends each datagram back to its sender.  C{guard} (a L{netsvc.policies.Guard})
    decides what is admitted: access list, size bound, per-client rate.
    """

    noisy = False

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self._sent = guard.metrics.bytesOut

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        host, port = addr[0], addr[1]
        if port in LOOP_PORTS:
            self.guard.metrics.limit("loop_port").value += 1
            return
        if not self.guard.admitDatagram(host, len(data)):
            return
        try:
            self.transport.write(data, addr)
        except OSError:  # e.g. EAGAIN: the socket buffer is full; UDP may drop
            self.guard.metrics.error("send").value += 1
            return
        self._sent.value += len(data)
