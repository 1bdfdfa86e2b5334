"""
Limits every listener shares: connections in total and per client IP, idle
timeouts, message sizes, rates, and CIDR access lists.

L{Limits} is the C{limits:} settings class (re-exported by L{netsvc.config});
the token buckets are in L{netsvc.rates} (re-exported here).

A service owns one L{Guard} (built from its L{Limits} and access lists) and wraps
each listener's factory with L{Guard.wrap}.  The guard counts into the service's
L{netsvc.metrics.ServiceMetrics}, and at shutdown L{Guard.drain} lets open
connections finish for a bounded time before closing them.

Wrapped protocols may define two optional methods:
  - C{drain()}: the server is shutting down; finish politely (say goodbye).
  - C{timedOut()}: the idle timeout fired; say so and close (default: close).
A wrapped factory may define C{refusalProtocol(reason) -> Protocol | None} to
answer a refused connection protocol-correctly (e.g. SMTP 421) before it closes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer, tcp, unix
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import directlyProvides, implementer, providedBy

from netsvc.metrics import ServiceMetrics
from netsvc.rates import Bandwidth, RateLimiter, TokenBucket
from netsvc.schema import Duration, Size, field, frozen

__all__ = [
    "AccessList", "Bandwidth", "Guard", "GuardedFactory", "GuardedProtocol", "HalfCloseableGuardedProtocol",
    "Limits", "Network", "RateLimiter", "TokenBucket", "networkProblems", "parseNetworks", "peerHost",
]

log = Logger()


# -- the limits of a service -------------------------------------------------------


@frozen
class Limits:
    """
    C{limits:} of a service (enforced by L{Guard}).  Zero turns a
    timeout or rate off.  Each service sets its own defaults.
    """

    max_connections: int = field(4096, min=1, max=1_000_000)
    max_connections_per_ip: int = field(256, min=1, max=1_000_000)
    #: Close a connection with no traffic either way for this long (0: never).
    idle_timeout: Duration = field(Duration(300), min=0)
    #: Largest line, message or datagram the service accepts.
    max_message: Size = field(Size(65536), min=1, max=1 << 30)
    #: Requests (datagrams, messages) per second per client IP (0: unlimited), and the burst allowed.
    rate: float = field(0.0, min=0)
    burst: int = field(0, min=0)

    def bucket(self) -> tuple[float, float]:
        """(rate, burst) for a L{RateLimiter}; burst defaults to one second's worth."""
        return self.rate, float(self.burst or max(1, int(self.rate)))


# -- access lists --------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parseNetworks(specs: Iterable[str]) -> list[Network]:
    """
    Parse CIDR strings (a bare address is a /32 or /128).  A network with host
    bits set (C{1.2.3.4/8}) is refused, as C{ip_network(strict=True)} does: it
    usually means a typo, and it would silently admit or deny far more than written.

    @raise ValueError: naming the bad entry.
    """
    out = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec, strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(spec, strict=False)
            except ValueError:
                raise ValueError(f"not an address or CIDR network: {spec!r}") from None
            raise ValueError(f"{spec!r} has host bits set: the network is {loose} "
                             f"(or write the address alone for just {spec.split('/')[0]})") from None
    return out


def networkProblems(settings: Any, *keys: str) -> list[tuple[str, str]]:
    """
    For settings' C{check()}: C{(key, reason)} for each attribute in C{keys} of
    C{settings} whose CIDR list L{parseNetworks} refuses.
    """
    problems = []
    for key in keys:
        try:
            parseNetworks(getattr(settings, key))
        except ValueError as e:
            problems.append((key, str(e)))
    return problems


class AccessList:
    """
    Who may connect: C{deny} wins, then an empty C{allow} admits everyone,
    otherwise only addresses in C{allow}.  Decisions are cached per address.
    """

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = parseNetworks(allow)
        self.deny = parseNetworks(deny)
        self.open = not self.allow and not self.deny
        self._cache: dict[str, bool] = {}

    def permits(self, host: str) -> bool:
        if self.open:
            return True
        verdict = self._cache.get(host)
        if verdict is None:
            verdict = self._decide(host)
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[host] = verdict
        return verdict

    def _decide(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return not self.allow  # a unix socket peer: only when no allow list is set
        mapped = getattr(addr, "ipv4_mapped", None)
        if mapped is not None:
            addr = mapped
        if any(addr in net for net in self.deny):
            return False
        return not self.allow or any(addr in net for net in self.allow)


# -- the guard -------------------------------------------------------------------


def peerHost(address: Any) -> str:
    """The client IP of an address (a unix socket peer gives C{"unix"})."""
    return getattr(address, "host", None) or "unix"


class Guard:
    """
    The limits of one service, shared by all of its listeners.
    """

    #: After the drain time, connections get loseConnection(); this long later, abortConnection().
    abortGrace = 2.0

    def __init__(self, limits: Limits, metrics: ServiceMetrics, clock: IReactorTime,
                 access: AccessList | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.access = access or AccessList()
        self.rates = RateLimiter(*limits.bucket(), clock)
        self.connections: set[GuardedProtocol] = set()
        self.perHost: dict[str, int] = {}
        self.draining = False
        self._drained: list[defer.Deferred] = []
        metrics.active.setFunction(lambda: len(self.connections))

    def reconfigure(self, limits: Limits, access: AccessList) -> None:
        """New limits and access lists, for connections and datagrams from now on."""
        self.limits = limits
        self.access = access
        self.rates = RateLimiter(*limits.bucket(), self.clock)

    def wrap(self, factory: IProtocolFactory) -> GuardedFactory:
        """A factory enforcing these limits around C{factory}."""
        return GuardedFactory(self, factory)

    # -- connections

    def refusal(self, host: str) -> str | None:
        """Why a new connection from C{host} is refused, or None to accept it."""
        if self.draining:
            return "shutdown"
        if not self.access.permits(host):
            return "acl"
        if len(self.connections) >= self.limits.max_connections:
            return "max_connections"
        if self.perHost.get(host, 0) >= self.limits.max_connections_per_ip:
            return "max_connections_per_ip"
        return None

    def opened(self, conn: GuardedProtocol) -> None:
        self.connections.add(conn)
        self.perHost[conn.host] = self.perHost.get(conn.host, 0) + 1
        self.metrics.accepted.value += 1

    def closed(self, conn: GuardedProtocol) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        left = self.perHost[conn.host] - 1
        if left:
            self.perHost[conn.host] = left
        else:
            del self.perHost[conn.host]
        if not self.connections and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    # -- datagrams

    def admitDatagram(self, host: str, size: int) -> bool:
        """Count a datagram; False (and counted) when it must be dropped."""
        self.metrics.datagramsIn.value += 1
        self.metrics.bytesIn.value += size
        if not self.access.permits(host):
            self.metrics.refused("acl").value += 1
            return False
        if size > self.limits.max_message:
            self.metrics.limit("max_message").value += 1
            return False
        if not self.rates.allow(host):
            self.metrics.limit("rate").value += 1
            return False
        return True

    # -- shutdown

    def drain(self, timeout: float) -> defer.Deferred:
        """
        Ask every open connection to finish (C{drain()} on protocols that have it),
        wait up to C{timeout} seconds for them to close, then close the rest:
        C{loseConnection()}, and C{abortConnection()} L{abortGrace} seconds later.
        Fires when no connection is left, and at the latest L{abortSettle} seconds
        after the abort whatever state a connection was left in: one still on the
        books then is forgotten (logged), so that a shutdown always ends.

        A connection whose socket is gone but whose C{connectionLost} never came
        (a protocol that raised in the last read of a TLS connection: the TLS layer
        then never tells the protocols above it) gets its C{connectionLost} here,
        at once, rather than holding the shutdown until the deadline.
        """
        self.draining = True
        self._sweepGhosts()
        for conn in list(self.connections):
            try:
                conn.drain()
            except Exception:
                log.failure("drain() of a connection from {client} failed; it is closed at the deadline",
                            client=conn.host, service=self.metrics.service)
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        clock = self.clock
        calls = [
            clock.callLater(timeout, self._closeAll),
            clock.callLater(timeout + self.abortGrace, self._abortAll),
            clock.callLater(timeout + self.abortGrace + self.abortSettle, self._forgetAll),
        ]

        def cancelTimers(result):
            for call in calls:
                if call.active():
                    call.cancel()
            return result

        return d.addBoth(cancelTimers)

    #: After the abort, this long for the aborted connections' C{connectionLost}; then the drain ends regardless.
    abortSettle = 0.5

    def _closeAll(self) -> None:
        self._sweepGhosts()
        for conn in list(self.connections):
            try:
                conn.transport.loseConnection()
            except Exception:
                log.failure("closing a connection from {client} at shutdown failed", client=conn.host,
                            service=self.metrics.service)

    def _abortAll(self) -> None:
        self._sweepGhosts()
        for conn in list(self.connections):
            try:
                _abort(conn.transport)
            except Exception:
                log.failure("aborting a connection from {client} at shutdown failed", client=conn.host,
                            service=self.metrics.service)

    def _sweepGhosts(self) -> None:
        """Deliver C{connectionLost} to connections whose transport (or one beneath it) is disconnected."""
        for conn in list(self.connections):
            if _transportGone(conn):
                log.warn("a connection from {client} closed without telling its protocol; closing it now",
                         client=conn.host, service=self.metrics.service)
                self._lose(conn)

    def _lose(self, conn: GuardedProtocol) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        try:
            conn.connectionLost(Failure(ConnectionLost("closed without connectionLost")))
        except Exception:
            log.failure("connectionLost of a connection from {client} failed", client=conn.host,
                        service=self.metrics.service)
        self.closed(conn)  # already done by connectionLost, unless that raised first

    def _forgetAll(self) -> None:
        """The drain's deadline: what is still on the books is forgotten, and the drain ends."""
        for conn in list(self.connections):
            if _transportGone(conn):
                self._lose(conn)
            else:
                log.warn("a connection from {client} is still open after the abort; shutdown goes on",
                         client=conn.host, service=self.metrics.service)
                self.closed(conn)
        if self._drained:  # closed() fires them when the last one goes; none may have been left
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)


def _abort(transport: Any) -> None:
    """Abort a connection (or close it, for a transport that cannot abort)."""
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


def _transportGone(conn: Any) -> bool:
    """Whether the transport of C{conn}, or one beneath it (TLS over TCP), is disconnected."""
    transport = conn.transport
    for _ in range(4):
        if transport is None:
            return False
        if getattr(transport, "disconnected", False):
            return True
        transport = getattr(transport, "transport", None)
    return False


@implementer(IProtocolFactory)
class GuardedFactory(Factory):
    """Wraps a service's factory: refuses over-limit connections, wraps accepted ones."""

    def __init__(self, guard: Guard, wrappedFactory: IProtocolFactory) -> None:
        self.guard = guard
        self.wrappedFactory = wrappedFactory
        self.halfClose = None  # learnt from the first protocol built

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        return self.wrappedFactory.logPrefix()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        guard = self.guard
        host = peerHost(addr)
        reason = guard.refusal(host)
        if reason is not None:
            guard.metrics.refused(reason).value += 1
            log.debug("refused {client}: {reason}", client=host, reason=reason,
                      service=guard.metrics.service)
            refuse = getattr(self.wrappedFactory, "refusalProtocol", None)
            answer = refuse(reason) if refuse is not None else None
            return answer if answer is not None else _Refused()
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:  # never None: a TLS wrapper would wrap it and fail on the first byte
            return _Refused()
        cls = HalfCloseableGuardedProtocol if IHalfCloseableProtocol.providedBy(wrapped) else GuardedProtocol
        return cls(guard, wrapped, host)


#: Plain stream transports whose socket L{GuardedProtocol.write} may write to directly.
_EAGER_TRANSPORTS = (tcp.Server, unix.Server)


class _Refused(Protocol):
    """
    Closes a refused connection at once.  (Returning None from buildProtocol
    does that for plain TCP, but a TLS wrapper -- ours, Twisted's ssl: and
    tls: -- would wrap None and fail on the first byte.)  Under TLS it aborts
    before any handshake work.
    """

    def connectionMade(self) -> None:
        if ISSLTransport.providedBy(self.transport):
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()


class GuardedProtocol(Protocol):
    """
    Sits between the transport and the service's protocol, which sees it as its
    transport: counts bytes, enforces the idle timeout, keeps the guard's books.
    Everything else is passed through to the real transport.
    """

    _idleCall = None
    disconnecting = False
    #: The socket, while writes may go straight to it (see L{write}).
    _socket = None

    def __init__(self, guard: Guard, wrapped: Protocol, host: str) -> None:
        self.guard = guard
        self.wrappedProtocol = wrapped
        self.host = host
        m = guard.metrics
        self._bytesIn = m.bytesIn
        self._bytesOut = m.bytesOut
        self._seconds = guard.clock.seconds
        self._last = 0.0

    # -- as a protocol, toward the real transport

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        if type(transport) in _EAGER_TRANSPORTS:
            self._socket = transport.getHandle()
        Protocol.makeConnection(self, transport)
        self.guard.opened(self)
        timeout = self.guard.limits.idle_timeout
        if timeout:
            self._last = self._seconds()
            self._idleCall = self.guard.clock.callLater(timeout, self._checkIdle)
        self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._last = self._seconds()
        self._bytesIn.value += len(data)
        try:
            self.wrappedProtocol.dataReceived(data)
        except Exception:
            self._protocolFailed()

    def _protocolFailed(self) -> None:
        """
        A bug in this connection's protocol: logged with its traceback, counted, and only this
        connection aborted.  Never raised into the transport: under TLS the exception interrupted TLS's
        own connectionLost, leaving the connection on the guard's books (its per-IP slot, and a drain
        that never ended).
        """
        self.guard.metrics.error("protocol").inc()
        log.failure("closing the connection from {client} after an error in its protocol",
                    client=self.host, service=self.guard.metrics.service)
        _abort(self.transport)

    def connectionLost(self, reason: Any) -> None:
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        self.guard.closed(self)
        self.wrappedProtocol.connectionLost(reason)

    # -- as a transport, toward the service's protocol

    def write(self, data: bytes) -> None:
        """
        Eager writes: Twisted's TCP transport buffers every write until the next
        reactor turn (two epoll_ctl calls per write); asyncio sends at once.  While
        nothing is buffered, we send at once too; the first time the socket takes
        less than everything, the rest and all later writes go through the
        transport, with its buffering and producer/consumer back-pressure.
        """
        self._last = self._seconds()
        self._bytesOut.value += len(data)
        sock = self._socket
        if sock is not None:
            if self.disconnecting or self.transport.disconnecting:
                self._socket = None
            else:
                try:
                    sent = sock.send(data)
                except OSError:  # EAGAIN, or an error the transport will report
                    sent = 0
                if sent == len(data):
                    return
                self._socket = None
                data = data[sent:]
        self.transport.write(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        self.disconnecting = True
        # A producer still registered would be resumed when the buffer drains instead of the connection
        # closing (TCP), or keep TLS from starting its shutdown: a closing connection produces nothing more.
        # (TCP keeps it as .producer, TLS as ._producer; StringTransport refuses to unregister none.)
        t = self.transport
        if getattr(t, "producer", None) is not None or getattr(t, "_producer", None) is not None:
            t.unregisterProducer()
        t.loseConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        """STARTTLS: what was written so far goes out in clear; later writes through the TLS layer."""
        self._socket = None  # no more eager writes to the raw socket
        self.transport.startTLS(contextFactory, normal)

    def __getattr__(self, name: str) -> Any:
        # abortConnection, loseWriteConnection, getHandle, pauseProducing ...
        return getattr(self.transport, name)

    # -- limits

    def _checkIdle(self) -> None:
        timeout = self.guard.limits.idle_timeout
        quiet = self._seconds() - self._last
        if quiet < timeout:
            self._idleCall = self.guard.clock.callLater(timeout - quiet, self._checkIdle)
            return
        self._idleCall = None
        self.guard.metrics.limit("idle_timeout").value += 1
        log.debug("idle timeout for {client}", client=self.host, service=self.guard.metrics.service)
        timedOut: Callable[[], None] | None = getattr(self.wrappedProtocol, "timedOut", None)
        if timedOut is not None:
            timedOut()
        else:
            self.transport.loseConnection()
        # A client that does not read never lets a polite close finish (the unsent output, or TLS's
        # close_notify, waits for it; a registered producer is resumed instead of closed): abort it.
        if self in self.guard.connections:  # (not when timedOut() already closed it for good)
            self._idleCall = self.guard.clock.callLater(self.guard.abortGrace, self._abortIdle)

    def _abortIdle(self) -> None:
        self._idleCall = None
        _abort(self.transport)

    def drain(self) -> None:
        drain = getattr(self.wrappedProtocol, "drain", None)
        if drain is not None:
            drain()


@implementer(IHalfCloseableProtocol)
class HalfCloseableGuardedProtocol(GuardedProtocol):
    """For wrapped protocols that handle half-close: pass the EOFs on."""

    def readConnectionLost(self) -> None:
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()
