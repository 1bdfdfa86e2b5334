"""
The relay on Twisted's transports (TLS and unix sockets on either side, PROXY
headers to read, named backends, bandwidth limits): one L{Relay} per accepted
connection and its L{BackendSide} toward the chosen backend.  Plain TCP rules
use L{netsvc.forward.direct.DirectRelay}, with the same semantics.

Stream semantics:
  - Back-pressure both ways: each direction is a L{netsvc.forward.pump.Pump},
    registered as the streaming producer of the side it writes to; when that
    side's send buffer passes its bound (L{READ_SIZE}, 256 KiB), the other side
    stops reading.
    Userland memory per connection stays under 2 x (bound + one read), about
    1 MiB, whatever the speeds (in practice far less).
  - Half-close: an EOF from one side becomes a FIN (C{loseWriteConnection}) on
    the other while the opposite direction keeps flowing; the connection closes
    once both directions have ended.  Over TLS an EOF is sent as close_notify
    (C{loseConnection}), which still lets the peer's answer arrive until it sends
    its own; a TLS client's close_notify reaches us as C{readConnectionLost} (see
    L{netsvc.tls.halfClosing}).
  - Failover: a backend that refuses, times out or fails the TLS handshake is
    counted and the next candidate is tried; the client only notices when all fail.
  - Writes toward a plain TCP backend go straight to the socket while nothing is
    buffered (as L{netsvc.policies.GuardedProtocol} does toward clients).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error, tcp, unix
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, INegotiated
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from netsvc.forward import proxyheader
from netsvc.forward.balance import Backend, why
from netsvc.forward.base import READ_SIZE, RelayBase, RuleHandle, address, label, log
from netsvc.forward.pump import Pump, closeTransport, shutdownNow

#: Accepted plain stream transports whose socket may be written to directly.
_PLAIN_SERVERS = (tcp.Server, unix.Server)

#: Bytes read from a client before its backend connection is up; beyond, reading pauses.
PENDING_MAX = 65536


@implementer(IHalfCloseableProtocol)
class Relay(RelayBase, Protocol):
    """The accepted (client) side of one forwarded connection."""

    side: BackendSide | None = None
    clientEOF = False
    backendEOF = False
    clientGone = False
    backendGone = True  # until a backend connection exists
    _reader: proxyheader.HeaderReader | None = None
    _headerTimer: Any = None

    def __init__(self, rule: RuleHandle, addr: Any, acceptProxy: bool, guard: Any, host: str) -> None:
        self.rule = rule
        self.guard = guard  # the service's Guard: this relay is one of its connections
        self.host = host
        self._csock: Any = None
        self.reactor = rule.reactor
        self.peer = address(addr)
        self.source = self.peer  # the client as far as we know (PROXY header may say otherwise)
        self._destination: tuple[str, int] | None = None
        self.acceptProxy = acceptProxy
        self.up = 0
        self.down = 0
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._bsock: Any = None
        self._lastTotal = -1
        self._lastActive = 0.0
        self.started = 0.0
        self._candidates: Any = None

    # -- the client connection

    def connectionMade(self) -> None:
        transport = self.transport
        self.started = self.reactor.seconds()
        self.clientTLS = INegotiated.providedBy(transport)
        if type(transport) in _PLAIN_SERVERS:
            self._csock = transport.getHandle()  # eager writes (see GuardedProtocol.write)
        self.upPump = Pump(transport, self._backendDrained)
        self.guard.opened(self)
        self.rule.opened(self)
        settings = self.rule.settings
        self._lastActive = self.started
        if self.acceptProxy:
            self._reader = proxyheader.HeaderReader()
            self._headerTimer = self.reactor.callLater(settings.connect_timeout, self._headerTimedOut)
        else:
            self._connect()

    @property
    def _bytesIn(self) -> Any:
        return self.guard.metrics.bytesIn

    @property
    def _bytesOut(self) -> Any:
        return self.guard.metrics.bytesOut

    @property
    def destination(self) -> tuple[str, int] | None:
        """Where the client connected to (or, behind a PROXY header, where it says it did)."""
        if self._destination is None and self.transport is not None:
            self._destination = address(self.transport.getHost())
        return self._destination

    @destination.setter
    def destination(self, value: tuple[str, int] | None) -> None:
        self._destination = value

    def _headerTimedOut(self) -> None:
        self._headerTimer = None
        self._refuse("proxy_header", "no PROXY header in time")

    def _refuse(self, metric: str, reason: str) -> None:
        self.rule.metrics.refused(metric).value += 1
        self.reason = reason
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._bytesIn.value += len(data)
        if self.linked:
            n = len(data)
            self.up += n
            self.rule.metrics.bytesUp.value += n
            self.backend.bytesUp.value += n  # type: ignore[union-attr]
            self._toBackend(data)
            if self.rule.limited:
                delay = self.rule.takeUp(self, n)
                if delay:
                    self.upPump.throttle(self.reactor, delay)
            return
        if self._reader is not None:
            try:
                parsed = self._reader.feed(data)
            except proxyheader.ProxyHeaderError as e:
                log.info(
                    "forward {rule}: {client}: {problem}",
                    rule=self.rule.name,
                    client=label(self.peer),
                    problem=str(e),
                )
                self._refuse("proxy_header", f"bad PROXY header: {e}")
                return
            if parsed is None:
                return
            source, destination, data = parsed
            self._reader = None
            if self._headerTimer is not None and self._headerTimer.active():
                self._headerTimer.cancel()
            self._headerTimer = None
            if source is not None:
                self.source, self.destination = source, destination
            if not self.rule.permits(self.source):
                self._refuse("acl", "refused by the rule's allow/deny lists")
                return
            self._connect()
        if data:
            self._pending.append(data)
            self._pendingSize += len(data)
            if self._pendingSize >= PENDING_MAX and not self.upPump.held:
                self.upPump.held = True  # until the backend is there
                self.upPump.update()

    def readConnectionLost(self) -> None:
        self.clientEOF = True
        if self.reason is None and self.linked:
            self.reason = "client closed"
        self.upPump.done = True
        if self.linked:
            self._shutdownBackendWrite()
            if self.backendEOF:
                self._closeBoth()
        elif self._reader is not None:
            self.reason = "client closed before the PROXY header"
            self.transport.loseConnection()
        # Not connected yet: the FIN is passed on once the backend is there.

    def writeConnectionLost(self) -> None:
        pass  # our FIN toward the client went out; the other direction may go on

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.clientGone = True
        self._csock = None
        self.guard.closed(self)
        self.upPump.cancel()
        if self._headerTimer is not None and self._headerTimer.active():
            self._headerTimer.cancel()
        if self.reason is None:
            self.reason = "client closed" if reason.check(error.ConnectionDone) else f"client: {why(reason)}"
        side = self.side
        if side is not None and not self.backendGone and side.transport is not None:
            if self.backendEOF and self._bsock is not None:
                side.transport.abortConnection()  # nothing left to send or to read: no need to wait
            else:
                closeTransport(side.transport)
        self._maybeFinish()

    # -- the backend connection

    def _connect(self) -> None:
        self._candidates = self.rule.pool.candidates()
        self._tryNext()

    def _tryNext(self) -> None:
        if self.clientGone:
            self._maybeFinish()
            return
        backend = next(self._candidates, None)
        if backend is None:
            self._noBackendLeft()
            self.transport.abortConnection()
            return
        self.backend = backend
        self.side = side = BackendSide(self, backend)
        d = backend.connect(self.reactor, side, self.rule.settings.connect_timeout)
        d.addErrback(self._connectFailed, side)

    def _connectFailed(self, f: Failure, side: BackendSide) -> None:
        if side is not self.side or side.failed:
            return
        side.failed = True
        self._lastError = why(f)
        self._connectFailedLog(side.backend, self._lastError)
        self._tryNext()

    def _backendDrained(self) -> None:
        side = self.side
        if side is not None and not self.clientEOF and type(side.transport) is tcp.Client:
            self._bsock = side.transport.socket

    def _clientDrained(self) -> None:
        if not self.backendEOF and type(self.transport) in _PLAIN_SERVERS:
            self._csock = self.transport.getHandle()

    def _toBackend(self, data: bytes) -> None:
        sock = self._bsock
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or an error the transport will report
                sent = 0
            if sent == len(data):
                return
            self._bsock = None  # from now on, the transport's buffering and back-pressure
            data = data[sent:]
        self.side.transport.write(data)  # type: ignore[union-attr]

    def _backendReady(self, side: BackendSide) -> None:
        if side is not self.side:
            return
        backend = side.backend
        self.linked = True
        self.backendGone = False
        backend.active += 1
        backend.connections.value += 1
        transport = side.transport
        if self.clientGone:
            closeTransport(transport)
            return
        self.backendTLS = side.tls
        self.downPump = Pump(transport, self._clientDrained)
        if type(transport) is tcp.Client:
            self._bsock = transport.socket  # eager writes, as GuardedProtocol does toward clients
        # Larger reads for bulk transfers (fewer trips through Python); this is also the
        # send-buffer size above which the other side is paused, so memory stays bounded.
        # (Not with a bandwidth limit: it needs small reads to pace them.)
        if not self.rule.limited:
            for t in (transport, self.transport):
                if getattr(t, "bufferSize", READ_SIZE) < READ_SIZE:
                    t.bufferSize = READ_SIZE
        for t in (transport, self.transport):  # writes are passed on as they come: no Nagle delay
            setNoDelay = getattr(t, "setTcpNoDelay", None)
            if setNoDelay is not None:
                try:
                    setNoDelay(True)
                except OSError:
                    pass  # (a unix socket)
        mode = self.rule.settings.send_proxy
        if mode is not None:
            build = proxyheader.v1 if mode == "v1" else proxyheader.v2
            self._toBackend(build(self.source, self.destination))
        pending, self._pending = self._pending, []
        for chunk in pending:
            self.up += len(chunk)
            self.rule.metrics.bytesUp.value += len(chunk)
            backend.bytesUp.value += len(chunk)
            self._toBackend(chunk)
        transport.registerProducer(self.upPump, True)
        self.transport.registerProducer(self.downPump, True)
        if self.clientEOF:
            self._shutdownBackendWrite()
        elif self.upPump.held:
            self.upPump.held = False
            self.upPump.update()

    def fromBackend(self, data: bytes) -> None:
        n = len(data)
        self.down += n
        self.rule.metrics.bytesDown.value += n
        self.backend.bytesDown.value += n  # type: ignore[union-attr]
        self._bytesOut.value += n
        sock = self._csock
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent != n:
                self._csock = None
                self.transport.write(data[sent:])
        else:
            self.transport.write(data)
        if self.rule.limited:
            delay = self.rule.takeDown(self, n)
            if delay:
                self.downPump.throttle(self.reactor, delay)

    def backendEnded(self) -> None:
        """The backend sent EOF: pass it on to the client, keep the other direction."""
        self.backendEOF = True
        self.downPump.done = True
        if self.reason is None:
            self.reason = "backend closed"
        if self.clientGone:
            return
        if self.clientTLS:
            closeTransport(self.transport)
        else:
            sock, self._csock = self._csock, None
            if not shutdownNow(self.transport, sock):
                self.transport.loseWriteConnection()
        if self.clientEOF:
            self._closeBoth()

    def backendLost(self, side: BackendSide, reason: Failure) -> None:
        if side is not self.side:
            return
        if not self.linked:
            self._connectFailed(reason, side)
            return
        self.backendGone = True
        side.backend.active -= 1
        if hasattr(self, "downPump"):
            self.downPump.cancel()
        if self.reason is None:
            self.reason = (
                "backend closed" if reason.check(error.ConnectionDone) else f"backend: {why(reason)}"
            )
        if not self.clientGone:
            closeTransport(self.transport)
        self._maybeFinish()

    def _shutdownBackendWrite(self) -> None:
        sock, self._bsock = self._bsock, None
        transport = self.side.transport  # type: ignore[union-attr]
        if self.backendTLS:
            closeTransport(transport)  # close_notify; its answer may still come
        elif not shutdownNow(transport, sock):
            transport.loseWriteConnection()

    # -- closing

    def _closeBoth(self) -> None:
        closeTransport(self.transport)
        if self.side is not None and self.side.transport is not None and not self.backendGone:
            closeTransport(self.side.transport)

    def abort(self, reason: str) -> None:
        """Close both sides now (idle timeout, shutdown)."""
        if self.reason is None:
            self.reason = reason
        self.transport.abortConnection()
        if self.side is not None and self.side.transport is not None and not self.backendGone:
            self.side.transport.abortConnection()

    def _closedAlready(self) -> bool:
        return self._finished or (self.clientGone and self.backendGone)

    def _maybeFinish(self) -> None:
        if self._finished or not self.clientGone or not self.backendGone:
            return
        if self.side is not None and not self.side.failed and not self.linked and not self.side.lost:
            return  # a connection attempt is still under way; it closes itself when it lands
        self._report()


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class BackendSide(Protocol):
    """The connection to the backend; reports to its L{Relay}."""

    failed = False
    lost = False
    ready = False

    def __init__(self, relay: Relay, backend: Backend) -> None:
        self.relay = relay
        self.backend = backend
        self.tls = backend.spec.kind == "tls"

    def connectionMade(self) -> None:
        if not self.tls:
            self.ready = True
            self.relay._backendReady(self)

    def handshakeCompleted(self) -> None:
        if self.tls and not self.ready:
            self.ready = True
            self.relay._backendReady(self)

    def dataReceived(self, data: bytes) -> None:
        self.relay.fromBackend(data)

    def readConnectionLost(self) -> None:
        self.relay.backendEnded()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        relay = self.relay
        if relay.side is self and relay.linked:
            relay.backendLost(self, reason)
        elif relay.side is self:
            relay._connectFailed(reason, self)
        if relay.clientGone:
            relay._maybeFinish()
