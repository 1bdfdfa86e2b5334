"""
TLS half-close for forwarding rules: L{halfClosing} turns a shared-certificate
L{TLSServerEndpoint} into one whose connections pass the peer's close_notify
to the protocol as C{readConnectionLost} (see the comment below).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from netsvc.tls.server import FlushingTLSTransport, TLSFactory, TLSServerEndpoint

# -- TLS half-close (used by forwarding rules) -----------------------------------------
#
# A client such as C{socat - OPENSSL:...} sends its request, then close_notify
# (and often a TCP FIN), and waits for the answer.  Twisted's TLS transport treats
# the close_notify (or the FIN) as the end of the whole connection, so an answer
# that arrives a moment later (from a forwarded backend) is lost.  Here both are
# passed to a protocol that provides IHalfCloseableProtocol as readConnectionLost(),
# and the connection stays open for writing until that protocol closes it (our
# close_notify then goes out, and the TCP connection is closed).  TLS 1.3 allows
# this explicitly; OpenSSL allows it for 1.2 as well.  Built on Twisted-private
# names of twisted.protocols.tls (checked on 26.10).


@implementer(IHalfCloseableProtocol)
class HalfCloseTLSTransport(FlushingTLSTransport):
    _peerDone = False

    def _halfCloseable(self) -> bool:
        return IHalfCloseableProtocol.providedBy(self.wrappedProtocol)

    def _peerFinished(self) -> bool:
        """The peer will send nothing more: tell the protocol, once.  False: not half-closeable."""
        if not self._halfCloseable():
            return False
        if not self._peerDone:
            self._peerDone = True
            self.wrappedProtocol.readConnectionLost()
        return True

    def _flushReceiveBIO(self) -> None:
        while not self._lostTLSConnection and not self._peerDone:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._peerFinished():
                    break
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(data)
        self._flushSendBIO()

    # The TCP connection under us (we provide IHalfCloseableProtocol to it).

    def readConnectionLost(self) -> None:
        if not self._handshakeDone or not self._peerFinished():
            self.transport.loseConnection()  # as before: the TCP EOF ends everything

    def writeConnectionLost(self) -> None:
        pass

    def loseConnection(self) -> None:
        if self._peerDone and not self.disconnecting:
            # Our close_notify, then close the TCP connection (the peer has finished already).
            super().loseConnection()
            if self.transport is not None and not self._appSendBuffer and self._producer is None:
                self.transport.loseConnection()
            return
        super().loseConnection()


class _HalfCloseTLSFactory(TLSFactory):
    protocol = HalfCloseTLSTransport


class HalfCloseTLSServerEndpoint(TLSServerEndpoint):
    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(_HalfCloseTLSFactory(self.creator, False, factory))


def halfClosing(endpoint: Any) -> Any:
    """The same listener with half-close for a shared-certificate C{tls:PORT}; others unchanged."""
    if type(endpoint) is TLSServerEndpoint:
        return HalfCloseTLSServerEndpoint(endpoint.creator, endpoint.endpoint)
    return endpoint
