"""
The direct relay: plain TCP in, plain TCP out, with both sockets owned here.

Why not Twisted's transports, as L{netsvc.forward.relay.Relay} uses: for a short
connection most of a forwarder's CPU goes to Twisted's per-connection machinery
rather than to relaying -- a connector, Deferreds and two C{connect_ex} calls
to connect, C{callLater} for the timeout and for C{_finishInit}, a producer pair,
C{Failure} objects and C{shutdown} before C{close} at the end.  For the common
rule (TCP listeners, backends given as IP addresses, no TLS, no PROXY header to
read, no bandwidth limit) this relay registers the two sockets with the reactor
itself (C{IReadWriteDescriptor}s) and moves bytes with C{recv_into} and C{send}:
about a third less CPU per connection.  Every other rule, and every listener
that is not plain TCP, uses the Relay; the behaviour is the same:

  - Back-pressure: one read in flight per direction.  When the other socket
    takes only part of it, reading stops until the rest is sent, so the kernel's
    buffers push back on the sender.  Userland memory per connection stays under
    2 x L{READ_SIZE}.
  - Half-close: an EOF from one side becomes C{shutdown(SHUT_WR)} on the other
    (once what was read before it is sent) while the other direction goes on;
    both sockets close when both directions have ended.
  - An error (a reset) on one socket: what it had sent is still delivered to the
    other side, what was on its way to it is dropped, then both close.
  - Failover, connect timeout (one deadline queue per rule instead of a timer per
    connection), idle timeout (the rule's sweep), PROXY headers sent, metrics and
    one log event per connection, as for the Relay.

The client socket is not read until the backend connection is up: until then
the kernel holds what the client sends, and a client that gives up is noticed
when the backend answers (or does not).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from netsvc.forward import proxyheader
from netsvc.forward.balance import Backend
from netsvc.forward.base import READ_SIZE, RelayBase, RuleHandle, address, label

#: One receive buffer for every relay: what is read is sent at once (the rest,
#: if the other side takes only part, is copied out), so no read allocates.
_buffer = bytearray(READ_SIZE)
_view = memoryview(_buffer)

_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK)
_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


def _problem(code: int) -> str:
    """A short reason for logs from an errno: 'connection refused', as balance.why says it."""
    if code == errno.ECONNREFUSED:
        return "connection refused"
    if code == errno.ETIMEDOUT:
        return "timed out"
    return os.strerror(code).lower()


def _noDelay(sock: socket.socket) -> None:
    """A relay passes on writes as they come: Nagle's algorithm would only add delay."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


@implementer(IReadWriteDescriptor)
class _End:
    """One socket of a direct relay, as the reactor sees it."""

    __slots__ = ("relay", "sock", "fd", "reading", "writing", "inbound", "outbound", "name")

    def __init__(self, relay: DirectRelay, sock: socket.socket, name: str) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name  # "client" or "backend", for the close reason
        self.reading = False
        self.writing = False
        self.inbound: _Flow | None = None  # the direction this socket is read for
        self.outbound: _Flow | None = None  # the direction written to this socket

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "forward"

    def doRead(self) -> None:
        self.relay._readable(self)

    def doWrite(self) -> None:
        self.relay._writable(self)

    def connectionLost(self, reason: Failure) -> None:
        # Only the reactor calls this: hang-up or error reported without data to read.
        self.reading = self.writing = False  # the reactor has unregistered us
        self.relay._lost(self, reason)


class _Flow:
    """One direction: bytes read from C{src} and written to C{dst}."""

    __slots__ = ("src", "dst", "pending", "ended", "done", "counters", "up")

    def __init__(self, src: _End, dst: _End, counters: tuple[Any, ...], up: bool) -> None:
        self.src = src
        self.dst = dst
        self.pending: bytes | memoryview | None = None  # read, not yet taken by dst
        self.ended = False  # nothing more will be read from src
        self.done = False  # ended, everything sent, dst told (FIN)
        self.counters = counters  # metric children to add each chunk to
        self.up = up  # client to backend
        src.inbound = self
        dst.outbound = self


class DirectRelay(RelayBase):
    """
    One forwarded connection, made by L{netsvc.forward.rule.RuleFactory} for a
    plain TCP port whose accepted sockets come here through L{adoptPort}.  For
    the service's L{netsvc.policies.Guard} it is its own transport
    (C{loseConnection}, C{abortConnection}).
    """

    connected = False
    #: Makes the backend sockets (tests give fakes).
    newSocket = staticmethod(socket.socket)
    _candidates: Any = None
    client: _End
    server: _End | None = None

    def __init__(self, rule: RuleHandle, addr: Any, guard: Any, host: str) -> None:
        self.rule = rule
        self.guard = guard
        self.host = host
        self.reactor = rule.reactor
        self.source = address(addr)
        self.transport = self
        self.up = self.down = 0
        self._lastTotal = -1
        self.started = self._lastActive = 0.0
        self._flows: tuple[_Flow, _Flow] | None = None

    # -- the accepted socket (through the port's transport hook, then makeConnection)

    def adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.client = _End(self, sock, "client")

    def makeConnection(self, transport: Any) -> None:
        self.started = self._lastActive = self.reactor.seconds()
        self.guard.opened(self)
        self.rule.opened(self)
        self._candidates = self.rule.pool.candidates()
        self._tryNext()

    # -- connecting

    def _tryNext(self) -> None:
        backend = next(self._candidates, None)
        if backend is None:
            self._noBackendLeft()
            self._closeAll()
            return
        self.backend = backend
        spec = backend.spec
        try:
            sock = self.newSocket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, _STREAM)
        except OSError as e:  # out of descriptors: this connection cannot be served
            self._connectFailed(backend, e.errno or 0)
            return
        sock.setblocking(False)  # (a no-op where SOCK_NONBLOCK was given)
        code = 0
        try:
            if spec.bindAddress:
                sock.bind(spec.bindAddress)
            code = sock.connect_ex((spec.host, spec.port))
        except OSError as e:
            code = e.errno or errno.EINVAL
        end = _End(self, sock, "backend")
        if code == 0:
            self.server = end
            self._connected()
        elif code in _IN_PROGRESS:
            self.server = end
            end.writing = True
            self.reactor.addWriter(end)  # writable: the connection is made (or failed)
            timeout = spec.timeout if spec.timeout is not None else self.rule.settings.connect_timeout
            self.rule.deadlines.add(self, timeout)
        else:
            sock.close()
            self._connectFailed(backend, code)

    def connectTimedOut(self) -> None:
        """The rule's deadline queue: this attempt took longer than connect_timeout."""
        end = self.server
        if self.connected or end is None or self._finished:
            return
        self._drop(end)
        self._connectFailed(self.backend, errno.ETIMEDOUT)  # type: ignore[arg-type]

    def _connectFailed(self, backend: Backend, code: int) -> None:
        self.server = None
        self._lastError = _problem(code)
        self._connectFailedLog(backend, self._lastError)
        self._tryNext()

    def _connected(self) -> None:
        self.connected = self.linked = True
        backend = self.backend
        assert backend is not None and self.server is not None
        backend.active += 1
        backend.connections.value += 1
        client, server = self.client, self.server
        metrics = self.rule.metrics
        guardMetrics = self.guard.metrics
        self._flows = (
            _Flow(client, server, (metrics.bytesUp, backend.bytesUp, guardMetrics.bytesIn), True),
            _Flow(server, client, (metrics.bytesDown, backend.bytesDown, guardMetrics.bytesOut), False),
        )
        _noDelay(client.sock)
        _noDelay(server.sock)
        reactor = self.reactor
        if server.writing:
            server.writing = False
            reactor.removeWriter(server)
        server.reading = client.reading = True
        reactor.addReader(server)
        reactor.addReader(client)
        mode = self.rule.settings.send_proxy
        if mode is not None:
            build = proxyheader.v1 if mode == "v1" else proxyheader.v2
            try:
                destination = client.sock.getsockname()[:2]
            except OSError as e:  # the client is gone already
                self._broken(client, e.errno or 0)
                return
            self._send(self._flows[0], build(self.source, destination))

    # -- moving bytes

    def _readable(self, end: _End) -> None:
        flow = end.inbound
        if flow is None or not end.reading:
            return  # (an event from before we stopped reading, in the same poll)
        try:
            n = end.sock.recv_into(_buffer)
        except BlockingIOError:
            return
        except OSError as e:
            self._broken(end, e.errno or 0)
            return
        if not n:
            self._ended(flow)
            return
        if flow.up:
            self.up += n
        else:
            self.down += n
        for counter in flow.counters:
            counter.value += n
        self._send(flow, _view[:n])

    def _send(self, flow: _Flow, data: Any) -> None:
        dst = flow.dst
        try:
            sent = dst.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._broken(dst, e.errno or 0)
            return
        if sent < len(data):
            flow.pending = bytes(data[sent:])
            self._pause(flow)

    def _pause(self, flow: _Flow) -> None:
        """dst is full: stop reading src until dst has taken the pending bytes."""
        src, dst = flow.src, flow.dst
        if src.reading:
            src.reading = False
            self.reactor.removeReader(src)
        if not dst.writing:
            dst.writing = True
            self.reactor.addWriter(dst)

    def _writable(self, end: _End) -> None:
        if not end.writing:
            return
        if not self.connected:
            self._connectResult(end)
            return
        flow = end.outbound
        pending = flow.pending if flow is not None else None
        if pending is None:  # nothing to send (not expected): do not spin on writability
            end.writing = False
            self.reactor.removeWriter(end)
            return
        try:
            sent = end.sock.send(pending)
        except BlockingIOError:
            return
        except OSError as e:
            self._broken(end, e.errno or 0)
            return
        if sent < len(pending):
            flow.pending = memoryview(pending)[sent:]  # (no copy)
            return
        flow.pending = None
        end.writing = False
        self.reactor.removeWriter(end)
        if flow.ended:
            self._finish(flow)
        elif not flow.src.reading:
            flow.src.reading = True
            self.reactor.addReader(flow.src)

    def _connectResult(self, end: _End) -> None:
        if end is not self.server:
            return
        # connect_ex again, as Twisted does: unlike SO_ERROR it tells a finished
        # connect (EISCONN) from a stale event about a reused descriptor (EALREADY).
        spec = self.backend.spec  # type: ignore[union-attr]
        try:
            code = end.sock.connect_ex((spec.host, spec.port))
        except OSError as e:
            code = e.errno or errno.EINVAL
        if code in (0, errno.EISCONN):
            self._connected()
        elif code not in _IN_PROGRESS:
            self._drop(end)
            self._connectFailed(self.backend, code)  # type: ignore[arg-type]

    # -- ending

    def _ended(self, flow: _Flow) -> None:
        """EOF from flow.src: pass it on once the pending bytes are sent."""
        if self.reason is None:
            self.reason = f"{flow.src.name} closed"
        flow.ended = True
        src = flow.src
        if src.reading:
            src.reading = False
            self.reactor.removeReader(src)
        if flow.pending is None:
            self._finish(flow)

    def _finish(self, flow: _Flow) -> None:
        flow.done = True
        other = flow.dst.inbound  # the opposite direction
        if other is None or other.done:
            self._closeAll()
            return
        try:
            flow.dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone; reading from it will say so

    def _broken(self, end: _End, code: int) -> None:
        """
        C{end}'s socket failed (a reset, most often): what it sent is still
        delivered, what was going to it is dropped.
        """
        if self.reason is None:
            self.reason = f"{end.name}: {_problem(code)}" if code else f"{end.name} closed"
        into, out = end.outbound, end.inbound
        self._drop(end)
        if into is not None:
            into.pending = None
            into.ended = into.done = True
            src = into.src
            if src.reading:
                src.reading = False
                self.reactor.removeReader(src)
        if out is None or out.pending is None:
            self._closeAll()
        else:
            out.ended = True  # the rest goes out, then both close (_finish)

    def _lost(self, end: _End, reason: Failure) -> None:
        code = getattr(reason.value, "errno", None) or 0
        try:
            code = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or code
        except OSError:
            pass
        if not self.connected and end is self.server:
            self._drop(end)
            self._connectFailed(self.backend, code or errno.ECONNREFUSED)  # type: ignore[arg-type]
        else:
            self._broken(end, code)

    def _drop(self, end: _End) -> None:
        """Unregister and close one socket (unregistering needs its descriptor: first)."""
        if end.fd < 0:
            return
        if end.reading:
            end.reading = False
            self.reactor.removeReader(end)
        if end.writing:
            end.writing = False
            self.reactor.removeWriter(end)
        end.fd = -1
        end.sock.close()

    def _closeAll(self) -> None:
        if self._finished:
            return
        self._drop(self.client)
        if self.server is not None:
            self._drop(self.server)
        if self.connected:
            self.backend.active -= 1  # type: ignore[union-attr]
        else:
            self.rule.deadlines.settle()
        self._report()

    # -- the guard's and the rule's handles

    def loseConnection(self) -> None:
        """Close once what was read has been sent (the guard, after drain_timeout)."""
        if self._flows is None:
            self.abort("shutdown")
            return
        if self.reason is None:
            self.reason = "shutdown"
        for flow in self._flows:
            if not flow.ended:
                self._ended(flow)

    def abortConnection(self) -> None:
        self.abort("shutdown")

    def abort(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._closeAll()

    def buffered(self) -> int:
        """Bytes read and not yet sent on (both directions)."""
        return sum(len(f.pending or b"") for f in self._flows or ())

    def __repr__(self) -> str:
        return f"<DirectRelay {label(self.source)} -> {self.backend.label if self.backend else '-'}>"


def _transport(skt: Any, protocol: Any, addr: Any, port: Any, sessionno: int, reactor: Any) -> Any:
    """A port's transport hook: direct relays take the socket, other protocols get a tcp.Server."""
    if type(protocol) is DirectRelay:
        protocol.adopt(skt)
        return protocol
    return tcp.Server(skt, protocol, addr, port, sessionno, reactor)


def adoptPort(port: Any, factory: Any) -> bool:
    """
    Let C{factory} (a L{netsvc.forward.rule.RuleFactory}) build direct relays
    for connections accepted by C{port}, if C{port} is a plain TCP port calling
    it directly (a TLS listener wraps the factory: it keeps Twisted's transports).
    L{tcp.Port} builds each accepted connection's transport by calling its
    C{transport} attribute: the hook is set on this one port.
    """
    if type(port) is not tcp.Port or port.factory is not factory:
        return False
    port.transport = _transport
    factory.direct = True
    return True
