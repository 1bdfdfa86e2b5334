"""
DNS server wire behaviour: UDP (one datagram per query) and TCP/TLS (2-byte
length framing, pipelined queries answered as they are ready, RFC 7766).

Both take a L{netsvc.dns.resolver.Resolver} and the service's
L{netsvc.policies.Guard}: its access list and per-client rate limit are
answered with REFUSED; malformed queries get FORMERR (or nothing, when not
even a query header can be read); a UDP answer larger than the client's limit
(512 bytes, or its EDNS payload size up to 1232) is truncated with TC set.
A query without RD (recursion desired) is answered from local data and the
cache only; when neither has it, REFUSED (no upstream is asked).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from zope.interface import implementer

from netsvc.dns import wire
from netsvc.dns.resolver import Resolver, typeLabel

log = Logger()

#: After an idle close, how long a TLS peer gets to answer our close_notify before the abort.
ABORT_GRACE = 2.0
#: Datagrams read per reactor wakeup, at most (then other sockets get their turn).
READ_BATCH = 256
#: Queries one stream connection may have waiting on upstreams before we stop reading from it.
MAX_PENDING_PER_CONNECTION = 64
#: Unparsed input one stream connection may hold: a whole query (64 KB) and a read or two that
#: arrived before a pause took effect; more means the transport ignored the pause (closed).
MAX_UNPARSED = 256 * 1024
#: Answers to pipelined queries are written together up to this many bytes (then the transport
#: may pause us before the next query is answered).
BATCH_MAX = 16 * 1024
#: Rendered answers kept per UDP listener (see L{DNSDatagramProtocol}), oldest out first; only for
#: queries up to MEMO_QUERY_MAX bytes (an ordinary one is under 100), so at most ~7 MB each.
MEMO_MAX = 4096
MEMO_QUERY_MAX = 512

_LENGTH = struct.Struct("!H")


def nameText(qname: bytes) -> str:
    """Wire name -> dotted text, for logs."""
    labels = []
    pos = 0
    while pos < len(qname) and qname[pos]:
        n = qname[pos]
        labels.append(qname[pos + 1:pos + 1 + n].decode("ascii", "backslashreplace"))
        pos += n + 1
    return ".".join(labels) + "."


class _Answering:
    """What the UDP and stream protocols share: counting, logging, refusing."""

    resolver: Resolver
    guard: Any
    queryLog: bool

    def _setup(self, resolver: Resolver, guard: Any, dnsMetrics: Any, queryLog: bool) -> None:
        self.resolver = resolver
        self.guard = guard
        self.dnsMetrics = dnsMetrics
        self.queryLog = queryLog
        self.clock = guard.clock

    def logQuery(self, client: str, query: wire.Query, rcode: int, source: str, transport: str) -> None:
        log.debug("dns query from {client} over {transport}: {name} {qtype} -> {rcode} ({source})",
                  client=client, transport=transport, name=nameText(query.qname),
                  qtype=typeLabel(query.qtype),
                  rcode=wire.RCODE_NAMES.get(rcode, str(rcode)), source=source, service="dns")

    def badQuery(self, e: wire.BadQuery, data: bytes) -> bytes | None:
        """The answer to a query that could not be used (None: drop it)."""
        self.guard.metrics.error("malformed").value += 1
        if e.rcode is None:
            return None
        q = e.query
        self.dnsMetrics.answered(q.qtype if q is not None else 0, e.rcode)
        if q is None:
            return None
        return wire.errorResponse(q.id, q.flags, e.rcode, q if q.qname else None)


class DNSDatagramProtocol(DatagramProtocol, _Answering):
    """
    Answers queries arriving as datagrams.

    Answers from local data and the cache are also kept rendered (the memo), by
    the query's bytes after its ID: the same question asked again (same name
    spelling, type, flags and EDNS record -- what a busy name gets from a
    client's stub) is answered by copying its ID in front, without parsing,
    looking up or rendering: about a quarter less CPU per cached answer.  A
    memo entry is used only while the answer it holds is exactly what the full
    path would send (L{Resolver.reusableUntil}: at most a second, until the
    TTLs' next countdown, the entry's expiry or prefetch time; and
    L{Resolver.stillAnswers}: local data not rebuilt -- a hosts file, the
    blocklist, SIGHUP -- and the cache still holding that entry), and the access
    list, rate limit and metrics apply to it as to any query.  Bounded: queries
    up to L{MEMO_QUERY_MAX} bytes, L{MEMO_MAX} entries, oldest out first.  Not
    used with the query log on (every query is logged through the full path).
    """

    noisy = False

    def __init__(self, resolver: Resolver, guard: Any, dnsMetrics: Any, queryLog: bool = False) -> None:
        self._setup(resolver, guard, dnsMetrics, queryLog)
        m = guard.metrics
        self._datagramsIn = m.datagramsIn
        self._bytesIn = m.bytesIn
        self._bytesOut = m.bytesOut
        self._sendto: Any = None
        #: query bytes after the ID -> (answer after the ID, since, until, local data generation, key,
        #: cache entry, counters); no reference to the resolver's data, which SIGHUP may replace
        self._memo: dict[bytes, tuple] | None = None if queryLog else {}

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self._datagramsIn.value += 1
        self._bytesIn.value += len(data)
        host = addr[0]
        guard = self.guard  # its limits, access list and rates change on SIGHUP
        if len(data) > guard.limits.max_message:
            self.guard.metrics.limit("max_message").value += 1
            return
        memo = self._memo.get(data[2:]) if self._memo is not None else None
        if memo is not None and self._fromMemo(memo, data, addr):
            return
        try:
            query = wire.parseQuery(data)
        except wire.BadQuery as e:
            answer = self.badQuery(e, data)
            if answer is not None:
                self._write(answer, addr)
            return
        access = guard.access
        if not access.open and not access.permits(host):
            self._refuse(query, addr, "acl")
            return
        rates = guard.rates
        if rates.rate > 0 and not rates.allow(host):
            self._refuse(query, addr, "rate")
            return
        now = self.clock.seconds()
        answer = self.resolver.lookup(query.key, now)
        if answer is None:
            if not query.flags & wire.RD:
                self.dnsMetrics.answered(query.qtype, wire.REFUSED)
                self._write(wire.errorResponse(query.id, query.flags, wire.REFUSED, query), addr)
                return
            self.resolver.resolve(query.key).addCallback(self._resolved, query, addr)
            return
        sent = self._send(query, answer, now, addr, "cache")
        if self._memo is not None and sent is not None:
            self._remember(data, query, answer, now, sent)

    def _resolved(self, answer: Any, query: wire.Query, addr: Any) -> None:
        self._send(query, answer, self.clock.seconds(), addr, "upstream")

    def _send(self, query: wire.Query, answer: Any, now: float, addr: Any, source: str) -> bytes | None:
        """Send C{answer}; return what was sent, unless it had to be truncated."""
        data = answer.render(query, now)
        whole: bytes | None = data
        if len(data) > query.payload:
            data = wire.truncated(query, answer.rcode, answer.aa)
            whole = None
        self._write(data, addr)
        self.dnsMetrics.answered(query.qtype, answer.rcode)
        if self.queryLog:
            self.logQuery(addr[0], query, answer.rcode, source, "udp")
        return whole

    def _remember(self, data: bytes, query: wire.Query, answer: Any, now: float, sent: bytes) -> None:
        """Keep C{sent}, the answer to C{data}, for L{_fromMemo}, if and while it may be reused."""
        if len(data) > MEMO_QUERY_MAX:
            return
        resolver = self.resolver
        reuse = resolver.reusableUntil(query.key, answer, now)
        if reuse is None:
            return
        until, entry = reuse
        metrics = resolver.metrics
        source = None if metrics is None else metrics.cacheHits if entry is not None else metrics.localAnswers
        memo = self._memo
        if len(memo) >= MEMO_MAX:
            del memo[next(iter(memo))]  # the oldest: one client's many spellings cannot empty it for all
        memo[data[2:]] = (sent[2:], now, until, resolver.local.generation, query.key, entry,
                          self.dnsMetrics.counter(query.qtype, answer.rcode), source)

    def _fromMemo(self, memo: tuple, data: bytes, addr: Any) -> bool:
        """Answer C{data} from its memo entry if it is still good and the client may ask; else False."""
        tail, since, until, localGeneration, key, entry, answered, source = memo
        now = self.clock.seconds()
        if not since <= now < until or not self.resolver.stillAnswers(key, entry, localGeneration):
            del self._memo[data[2:]]  # (since: a clock set back)
            return False
        host = addr[0]
        guard = self.guard
        access = guard.access
        if not access.open and not access.permits(host):
            return False  # the full path refuses it
        rates = guard.rates
        if rates.rate > 0 and not rates.allow(host):
            self._refuse(wire.parseQuery(data), addr, "rate")
            return True
        if entry is not None:
            entry.hits += 1
        if source is not None:
            source.value += 1
        answered.value += 1
        self._write(data[:2] + tail, addr)
        return True

    def _refuse(self, query: wire.Query, addr: Any, reason: str) -> None:
        self.guard.metrics.refused(reason).value += 1
        self.dnsMetrics.answered(query.qtype, wire.REFUSED)
        self._write(wire.errorResponse(query.id, query.flags, wire.REFUSED, query), addr)

    def startProtocol(self) -> None:
        # Twisted's udp.Port.write validates the address (twice) on every call; our
        # addresses come from recvfrom, so answers go to the socket directly.  And
        # its read loop is replaced by a leaner one (same bound per wakeup).
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else self.transport.write
        if sock is not None and hasattr(self.transport, "doRead"):
            self._recvfrom = sock.recvfrom
            self._ipv6 = sock.family == socket.AF_INET6
            self.transport.doRead = self._doRead

    def _doRead(self) -> None:
        """Read up to READ_BATCH datagrams (Twisted's udp.Port.doRead, minus per-datagram overhead)."""
        recvfrom = self._recvfrom
        received = self.datagramReceived
        for _ in range(READ_BATCH):
            try:
                data, addr = recvfrom(65535)
            except OSError:  # EAGAIN: drained; ECONNREFUSED and the like: nothing to read now
                return
            if self._ipv6:
                addr = addr[:2]
            try:
                received(data, addr)
            except Exception:  # a bug must not stop the listener
                log.failure("dns: answering a datagram")

    def _write(self, data: bytes, addr: Any) -> None:
        try:
            self._sendto(data, addr)
        except OSError:  # EAGAIN: the send buffer is full; UDP may drop
            self.guard.metrics.error("send").value += 1
            return
        self._bytesOut.value += len(data)


@implementer(IPushProducer)
class DNSStreamProtocol(Protocol, _Answering):
    """
    Answers length-prefixed queries over TCP or TLS (RFC 7766): pipelined,
    answered as they are ready (answers from local data and the cache at once,
    others when their upstream answers, so possibly out of order).

    Back-pressure: the protocol is a streaming producer of its transport.  When
    the transport's send buffer is full (a client that does not read) it is
    paused: it stops answering the queries it has buffered and stops reading
    (C{transport.pauseProducing()}); resumed, it answers what it buffered, then
    reads again.  It also stops reading while L{MAX_PENDING_PER_CONNECTION}
    queries wait on upstreams (their answers are written when they come, paused
    or not, so what a connection can make the server hold is bounded by the
    transport's buffer plus that many answers).  Unparsed input is held up to
    L{MAX_UNPARSED} bytes (at most a read or two arrive after a pause);
    beyond that the connection is closed.
    """

    #: Framing: a query is at most this long (the 2-byte length allows no more).
    MAX_LENGTH = 65535

    def __init__(self, resolver: Resolver, guard: Any, dnsMetrics: Any, queryLog: bool = False,
                 transportName: str = "tcp") -> None:
        self._setup(resolver, guard, dnsMetrics, queryLog)
        self.transportName = transportName
        self.pending = 0
        #: The transport paused us (its send buffer is full).
        self.outputPaused = False
        #: We asked the transport to stop reading.
        self.readingPaused = False
        self.closed = False
        self._buffer = b""
        self._offset = 0
        self._processing = False
        #: Answers to the queries of one read, written together (one send instead of one each).
        self._batch: list[bytes] | None = None
        self._batchSize = 0

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "unix")
        self.transport.registerProducer(self, True)
        # Each write is a whole answer, for a client that waits for it: Nagle's algorithm only delays.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass

    # -- input

    def dataReceived(self, data: bytes) -> None:
        if self._offset < len(self._buffer):
            self._buffer = self._buffer[self._offset:] + data  # the unparsed rest only, once per read
        else:
            self._buffer = data
        self._offset = 0
        if len(self._buffer) > MAX_UNPARSED:
            self.guard.metrics.limit("max_buffer").value += 1
            self.close()
            self.transport.abortConnection()
            return
        self._process()

    def _process(self) -> None:
        """Answer buffered queries until paused, closed, or no whole query is left."""
        if self._processing:
            return  # re-entered (an answer that was ready at once): the loop below carries on
        self._processing = True
        self._batch = []
        self._batchSize = 0
        try:
            buffer = self._buffer
            end = len(buffer)
            maxLength = min(self.MAX_LENGTH, self.guard.limits.max_message)
            while not (self.outputPaused or self.pending >= MAX_PENDING_PER_CONNECTION or self.closed):
                offset = self._offset
                if end - offset < 2:
                    break
                length = (buffer[offset] << 8) | buffer[offset + 1]
                if length > maxLength:
                    self.guard.metrics.limit("max_message").value += 1
                    self.close()
                    break
                if end - offset - 2 < length:
                    break
                self._offset = offset + 2 + length
                self.queryReceived(buffer[offset + 2:offset + 2 + length])
                if self._batchSize >= BATCH_MAX:
                    self._flush()  # the transport may pause us here
                if self.transport.disconnecting:
                    break
        finally:
            self._processing = False
            self._flush()
            self._batch = None
        if self._offset == len(self._buffer):
            self._buffer, self._offset = b"", 0
        self._readOrNot()

    def _readOrNot(self) -> None:
        """Read from the transport only while we may answer what comes."""
        if self.closed:
            return
        stop = self.outputPaused or self.pending >= MAX_PENDING_PER_CONNECTION
        if stop and not self.readingPaused:
            self.readingPaused = True
            self.transport.pauseProducing()
        elif not stop and self.readingPaused:
            self.readingPaused = False
            self.transport.resumeProducing()

    # -- IPushProducer, for the transport

    def pauseProducing(self) -> None:
        self.outputPaused = True
        self._readOrNot()

    def resumeProducing(self) -> None:
        self.outputPaused = False
        self._process()

    def stopProducing(self) -> None:
        self.closed = True
        self._buffer = b""

    # -- answering

    def queryReceived(self, data: bytes) -> None:
        try:
            query = wire.parseQuery(data)
        except wire.BadQuery as e:
            answer = self.badQuery(e, data)
            if answer is None:
                self.close()
            else:
                self.sendString(answer)
            return
        rates = self.guard.rates
        if rates.rate > 0 and not rates.allow(self.peer):
            self.guard.metrics.refused("rate").value += 1
            self.dnsMetrics.answered(query.qtype, wire.REFUSED)
            self.sendString(wire.errorResponse(query.id, query.flags, wire.REFUSED, query))
            return
        now = self.clock.seconds()
        answer = self.resolver.lookup(query.key, now)
        if answer is not None:
            self._send(query, answer, now, "cache")
            return
        if not query.flags & wire.RD:
            self.dnsMetrics.answered(query.qtype, wire.REFUSED)
            self.sendString(wire.errorResponse(query.id, query.flags, wire.REFUSED, query))
            return
        self.pending += 1
        self.resolver.resolve(query.key).addCallback(self._resolved, query)

    def _resolved(self, answer: Any, query: wire.Query) -> None:
        self.pending -= 1
        if self.closed:
            return
        self._send(query, answer, self.clock.seconds(), "upstream")
        if self.readingPaused:
            self._process()  # perhaps below the bound again: buffered queries, then reading

    def _send(self, query: wire.Query, answer: Any, now: float, source: str) -> None:
        data = answer.render(query, now)
        if len(data) > 65535:
            data = wire.truncated(query, answer.rcode, answer.aa)
        self.sendString(data)
        self.dnsMetrics.answered(query.qtype, answer.rcode)
        if self.queryLog:
            self.logQuery(self.peer, query, answer.rcode, source, self.transportName)

    def sendString(self, data: bytes) -> None:
        batch = self._batch
        if batch is None:
            self.transport.write(_LENGTH.pack(len(data)) + data)
        else:
            batch.append(_LENGTH.pack(len(data)))
            batch.append(data)
            self._batchSize += len(data)

    def _flush(self) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            self._batchSize = 0
            self.transport.write(b"".join(batch))

    def close(self) -> None:
        """
        Close once what was written is sent.  The producer goes first: with one
        registered, TCP would resume it instead of closing, and TLS would never
        start its shutdown.
        """
        if not self.closed:
            self.closed = True
            self.transport.unregisterProducer()
            if self.readingPaused:  # TLS must read the peer's close_notify to finish closing
                self.readingPaused = False
                self.transport.resumeProducing()
        self._buffer = b""
        self.transport.loseConnection()

    def timedOut(self) -> None:
        """Idle (RFC 7766 lets servers close idle connections): close, and abort if TLS lingers."""
        self.close()
        self.abortCall = self.clock.callLater(ABORT_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason: Any) -> None:
        self.closed = True
        self._buffer = b""
        abortCall = getattr(self, "abortCall", None)
        if abortCall is not None and abortCall.active():
            abortCall.cancel()


class _RefusingProtocol(Int16StringReceiver):
    """For a connection the guard refused: REFUSED to its first query, then close (within 5 s anyway)."""

    MAX_LENGTH = 65535

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.clock.callLater(5, self.transport.abortConnection)

    def connectionLost(self, reason: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def stringReceived(self, data: bytes) -> None:
        try:
            query = wire.parseQuery(data)
            self.sendString(wire.errorResponse(query.id, query.flags, wire.REFUSED, query))
        except wire.BadQuery:
            pass
        self.transport.loseConnection()


class DNSStreamFactory(Factory):
    noisy = False

    def __init__(self, resolver: Resolver, guard: Any, dnsMetrics: Any, queryLog: bool = False,
                 transportName: str = "tcp") -> None:
        self.resolver = resolver
        self.guard = guard
        self.dnsMetrics = dnsMetrics
        self.queryLog = queryLog
        self.transportName = transportName

    def buildProtocol(self, addr: Any) -> DNSStreamProtocol:
        p = DNSStreamProtocol(self.resolver, self.guard, self.dnsMetrics, self.queryLog, self.transportName)
        p.factory = self
        return p

    def refusalProtocol(self, reason: str) -> Any:
        """The guard refused the connection (ACL, limits): say REFUSED when the access list is why."""
        return _RefusingProtocol(self.guard.clock) if reason == "acl" else None
