"""
The plumbing of L{netsvc.forward.relay.Relay} on Twisted transports: L{Pump},
one direction's flow control (back-pressure, bandwidth pauses, held until the
backend is up), and the two ways of ending a direction, L{closeTransport} and
L{shutdownNow}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Pump:
    """
    One direction's flow control: the producer the writing side sees.  The
    reading side is paused while any reason holds: the consumer's buffer is
    full, the bandwidth limit says wait, or the relay holds it (no backend yet).
    """

    __slots__ = ("source", "consumerPaused", "throttled", "held", "paused", "done", "timer", "drained")

    def __init__(self, source: Any, drained: Any = None) -> None:
        self.source = source
        #: Called when the consumer has sent everything it held (Twisted calls
        #: resumeProducing only then): eager writes may start again.
        self.drained = drained
        self.consumerPaused = False
        self.throttled = False
        self.held = False
        self.paused = False
        self.done = False  # the source's read side has ended: never touch it again
        self.timer: Any = None

    def update(self) -> None:
        want = self.consumerPaused or self.throttled or self.held
        if want is not self.paused and not self.done:
            self.paused = want
            if want:
                self.source.pauseProducing()
            else:
                self.source.resumeProducing()

    def pauseProducing(self) -> None:
        self.consumerPaused = True
        self.update()

    def resumeProducing(self) -> None:
        self.consumerPaused = False
        if self.drained is not None:
            self.drained()
        self.update()

    def stopProducing(self) -> None:
        pass  # the relay closes the other side itself (connectionLost)

    def throttle(self, reactor: Any, delay: float) -> None:
        if self.timer is not None:
            return
        self.throttled = True
        self.update()
        self.timer = reactor.callLater(delay, self._unthrottle)

    def _unthrottle(self) -> None:
        self.timer = None
        self.throttled = False
        self.update()

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def closeTransport(transport: Any) -> None:
    """
    loseConnection, after unregistering our producer: TLS defers its close_notify
    until the producer is gone (it would wait forever otherwise).
    """
    if getattr(transport, "producer", None) is not None or getattr(transport, "_producer", None) is not None:
        transport.unregisterProducer()
    transport.loseConnection()


def shutdownNow(transport: Any, sock: Any) -> bool:
    """
    Send our FIN at once when nothing is buffered (C{sock} is the eager-write
    socket, set only while that holds): Twisted's loseWriteConnection would wait
    for a writable event first.  False: use loseWriteConnection.
    """
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    return True
