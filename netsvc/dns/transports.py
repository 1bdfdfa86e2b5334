"""
How one query reaches one upstream server: L{UDPAttempt}, a fresh connected
UDP socket per query, or L{StreamPool}, one pipelined TCP or TLS connection
made on demand (RFC 7766).  An answer is accepted only when it matches the
question (L{checkResponse}); every failure is an L{UpstreamError}.
L{netsvc.dns.upstream} builds on these and re-exports them.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReadDescriptor
from twisted.protocols.basic import Int16StringReceiver
from zope.interface import implementer

from netsvc.dns import wire

#: Stream connections to an upstream close after this long without a query.
STREAM_IDLE = 10.0
#: At most this many queries wait on one stream connection (RFC 7766 pipelining).
STREAM_MAX_PENDING = 256


class UpstreamError(Exception):
    """One attempt at one upstream failed; C{reason} is a short metrics label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def checkResponse(data: bytes, qid: int, qname: bytes, qtype: int, qclass: int) -> bool:
    """Whether C{data} answers our query (ID, QR and question, case-insensitively)."""
    if len(data) < 12:
        return False
    rid, flags, qd = struct.unpack_from("!HHH", data)
    if rid != qid or not flags & wire.QR or qd != 1:
        return False
    end = 12 + len(qname)
    return data[12:end].lower() == qname and data[end:end + 4] == struct.pack("!HH", qtype, qclass)


@implementer(IReadDescriptor)
class UDPAttempt:
    """
    One query over a fresh connected UDP socket: the kernel picks a random source
    port per query, and only the upstream's address can answer (no spoofing from
    elsewhere).  A bare reader rather than Twisted's UDP port, which logs every
    open and close.
    """

    def __init__(self, reactor: Any, host: str, port: int, data: bytes, qid: int, qname: bytes,
                 qtype: int, qclass: int) -> None:
        self.reactor = reactor
        self.qid, self.qname, self.qtype, self.qclass = qid, qname, qtype, qclass
        self.done: defer.Deferred = defer.Deferred(lambda _: self.close())
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.connect((host, port))
            self.sock.send(data)
        except OSError:
            self.sock.close()
            raise
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-upstream"

    def doRead(self) -> None:
        for _ in range(16):  # bounded: stray datagrams cannot keep us here
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as e:
                reason = "refused" if isinstance(e, ConnectionRefusedError) else "recv"
                self._finish(UpstreamError(reason, str(e)))
                return
            if checkResponse(data, self.qid, self.qname, self.qtype, self.qclass):
                self._finish(data)
                return

    def _finish(self, result: Any) -> None:
        self.close()
        if not self.done.called:
            if isinstance(result, Exception):
                self.done.errback(result)
            else:
                self.done.callback(result)

    def connectionLost(self, reason: Any) -> None:
        self._finish(UpstreamError("closed", "reactor stopped"))

    def close(self) -> None:
        if self.sock.fileno() != -1:
            self.reactor.removeReader(self)
            self.sock.close()


class StreamClient(Int16StringReceiver):
    """A pipelined stream connection: queries matched to answers by ID."""

    MAX_LENGTH = 65535

    def __init__(self, owner: StreamPool) -> None:
        self.owner = owner
        self.pending: dict[int, tuple[defer.Deferred, bytes, int, int]] = {}
        self.idleCall: Any = None

    def connectionMade(self) -> None:
        self._armIdle()

    def send(self, qid: int, query: bytes, qname: bytes, qtype: int, qclass: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred(lambda _: self.pending.pop(qid, None))
        self.pending[qid] = (d, qname, qtype, qclass)
        self.sendString(query)
        self._armIdle()
        return d

    def stringReceived(self, data: bytes) -> None:
        if len(data) < 2:
            return
        qid = struct.unpack_from("!H", data)[0]
        waiting = self.pending.get(qid)
        if waiting is None:
            return
        d, qname, qtype, qclass = waiting
        if checkResponse(data, qid, qname, qtype, qclass):
            del self.pending[qid]
            d.callback(data)
        self._armIdle()

    def _armIdle(self) -> None:
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = self.owner.reactor.callLater(STREAM_IDLE, self._idle)

    def _idle(self) -> None:
        self.idleCall = None
        if self.pending:
            self._armIdle()
        else:
            self.close()

    def close(self) -> None:
        """Close now: nothing is waiting, and TLS's close_notify exchange is not worth waiting for."""
        self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.owner.lost(self)
        pending, self.pending = self.pending, {}
        for d, *_ in pending.values():
            if not d.called:
                d.errback(UpstreamError("closed", reason.getErrorMessage()))


class StreamPool:
    """One persistent (TCP or TLS) connection to an upstream, made on demand."""

    def __init__(self, reactor: Any, host: str, port: int, tlsCreator: Any = None,
                 connectTimeout: float = 5.0) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.tlsCreator = tlsCreator
        self.connectTimeout = connectTimeout
        self.client: StreamClient | None = None
        self.connecting: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []

    def _connect(self) -> defer.Deferred:
        if self.client is not None and len(self.client.pending) < STREAM_MAX_PENDING:
            return defer.succeed(self.client)
        waiting: defer.Deferred = defer.Deferred(
            lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiting)
        if self.connecting is None:
            cls = endpoints.TCP6ClientEndpoint if ":" in self.host else endpoints.TCP4ClientEndpoint
            endpoint = cls(self.reactor, self.host, self.port, timeout=self.connectTimeout)
            if self.tlsCreator is not None:
                endpoint = endpoints.wrapClientTLS(self.tlsCreator, endpoint)
            self.connecting = endpoints.connectProtocol(endpoint, StreamClient(self))
            self.connecting.addCallbacks(self._connected, self._failed)
        return waiting

    def _connected(self, client: StreamClient) -> None:
        self.connecting = None
        self.client = client
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(client)

    def _failed(self, f: Any) -> None:
        self.connecting = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(UpstreamError("connect", f.getErrorMessage()))

    def query(self, qid: int, data: bytes, qname: bytes, qtype: int, qclass: int) -> defer.Deferred:
        return self._connect().addCallback(lambda c: c.send(qid, data, qname, qtype, qclass))

    def lost(self, client: StreamClient) -> None:
        if self.client is client:
            self.client = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.connecting is not None:
            self.connecting.cancel()
