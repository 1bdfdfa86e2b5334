"""
C{netsvc echo}: send messages to an echo server and check they come back.

    netsvc echo localhost:7007 hello world        # each argument is one message
    printf 'a\\nb\\n' | netsvc echo localhost:7007  # or each stdin line
    netsvc echo localhost:7007 --udp hello
    netsvc echo localhost:7443 --tls --cacert var/tls/selfsigned.pem hello
    netsvc echo localhost:7007 --count 10000 --concurrency 50   # load: round trips/s, p50/p99

Exit status: 0 when every echo matched, 1 on a mismatch, timeout or connection
failure (one line: netsvc echo: localhost:7 (tcp): connection refused), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, protocol, stdio
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.basic import LineReceiver

from netsvc import clients


class Mismatch(Exception):
    """The bytes that came back are not the bytes sent."""


class EchoClient(protocol.Protocol):
    """
    Round trips over a stream: L{roundTrip} sends bytes and fires with what came
    back once at least as many bytes have arrived (more means a mismatch).
    One round trip at a time.
    """

    def __init__(self) -> None:
        self._waiting: defer.Deferred | None = None
        self._expected = 0
        self._received: list[bytes] = []
        self._count = 0
        self._closed: Any = None

    def roundTrip(self, data: bytes) -> defer.Deferred:
        if self._closed is not None:
            return defer.fail(self._closed)
        self._waiting = defer.Deferred()
        self._expected = len(data)
        self.transport.write(data)
        self._check()
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)
        self._count += len(data)
        self._check()

    def _check(self) -> None:
        if self._waiting is not None and self._count >= self._expected:
            got = b"".join(self._received)
            self._received, self._count = [], 0
            d, self._waiting = self._waiting, None
            d.callback(got)

    def connectionLost(self, reason: Any) -> None:
        if reason.check(SSL.Error) or type(reason.value).__name__ == "VerificationError":
            self._closed = reason.value  # the caller words it (with its TLS hint)
        else:
            self._closed = error.ConnectionClosed(
                f"connection closed with {self._count} of {self._expected} bytes back")
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(self._closed)


class DatagramEchoClient(protocol.DatagramProtocol):
    """Round trips over UDP on a connected socket; lost datagrams are re-sent."""

    def __init__(self, reactor: IReactorTime, timeout: float, retries: int = 2) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.retries = retries
        self._waiting: defer.Deferred | None = None
        self._data = b""

    def roundTrip(self, data: bytes) -> defer.Deferred:
        self._data = data
        self._waiting = defer.Deferred()
        self._send(self.retries)
        return self._waiting

    def _send(self, retriesLeft: int) -> None:
        self._timer = self.reactor.callLater(
            self.timeout / (self.retries + 1), self._expire, retriesLeft)
        self.transport.write(self._data)  # may call connectionRefused at once

    def _expire(self, retriesLeft: int) -> None:
        if self._waiting is None:
            return
        if self.transport is None:  # the port was closed under us (an ICMP error)
            self.connectionRefused()
            return
        if retriesLeft:
            self._send(retriesLeft - 1)
            return
        d, self._waiting = self._waiting, None
        d.errback(defer.TimeoutError(f"no echo after {self.retries + 1} tries"))

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self._waiting is None or data != self._data:
            return  # a late duplicate of an earlier message
        if self._timer.active():
            self._timer.cancel()
        d, self._waiting = self._waiting, None
        d.callback(data)

    def stopProtocol(self) -> None:
        # An ICMP "port unreachable" on a connected UDP socket can make the reactor close
        # the port (EPOLLERR) instead of calling connectionRefused: the same answer.
        self.connectionRefused()

    def connectionRefused(self) -> None:
        if self._waiting is not None:
            if self._timer.active():
                self._timer.cancel()
            d, self._waiting = self._waiting, None
            d.errback(error.ConnectionRefusedError("port unreachable"))


def parseAddress(text: str) -> tuple[str, int]:
    """C{host:port}, C{[v6addr]:port}, or C{host} (port 7)."""
    return clients.parseAddress(text, 7)


@defer.inlineCallbacks
def connect(reactor: Any, args: argparse.Namespace) -> Any:
    """Connect one client (stream or datagram) as the options say; fires with it."""
    host, port = args.host, args.port
    if args.udp:
        infos = yield reactor.resolve(host) if not _isAddress(host) else defer.succeed(host)
        client = DatagramEchoClient(reactor, args.timeout)
        transport = reactor.listenUDP(0, client, interface="::" if ":" in infos else "")
        transport.connect(infos, port)
        return client
    endpoint = clients.streamEndpoint(reactor, host, port, args.tls, args.cacert, args.insecure, args.timeout)
    d = endpoints.connectProtocol(endpoint, EchoClient())
    d.addTimeout(args.timeout, reactor)
    client = yield d
    return client


def _isAddress(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def close(client: Any) -> None:
    transport = getattr(client, "transport", None)
    if transport is None:
        return
    if isinstance(client, DatagramEchoClient):
        transport.stopListening()
    else:
        transport.loseConnection()


class _StdinLines(LineReceiver):
    """Feeds standard input lines into a queue; None marks the end."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, queue: defer.DeferredQueue) -> None:
        self.queue = queue

    def lineReceived(self, line: bytes) -> None:
        self.queue.put(line.rstrip(b"\r"))

    def connectionLost(self, reason: Any) -> None:
        if self._buffer:
            self.queue.put(self._buffer)
        self.queue.put(None)


@defer.inlineCallbacks
def sendMessages(reactor: Any, args: argparse.Namespace, out: Any = None) -> Any:
    """Send each message, print each echo; 1 at the first mismatch or failure."""
    out = out or sys.stdout
    client = yield connect(reactor, args)
    if args.messages:
        queue: defer.DeferredQueue = defer.DeferredQueue()
        for m in args.messages:
            queue.put(m.encode("utf-8"))
        queue.put(None)
    else:
        queue = defer.DeferredQueue()
        stdio.StandardIO(_StdinLines(queue), reactor=reactor)
    try:
        while True:
            message = yield queue.get()
            if message is None:
                return 0
            d = client.roundTrip(message)
            d.addTimeout(args.timeout, reactor)
            got = yield d
            if got != message:
                raise Mismatch(f"sent {message!r}, got back {got!r}")
            out.write(got.decode("utf-8", "replace") + "\n")
            out.flush()
    finally:
        close(client)


@defer.inlineCallbacks
def load(reactor: Any, args: argparse.Namespace, out: Any = None) -> Any:
    """C{--count N --concurrency C}: N round trips over C clients; print rate and latency."""
    out = out or sys.stdout
    message = (args.messages[0].encode() if args.messages else b"x" * args.size)
    clients = yield defer.gatherResults([connect(reactor, args) for _ in range(args.concurrency)],
                                        consumeErrors=True)
    remaining = [args.count]
    latencies: list[float] = []

    @defer.inlineCallbacks
    def worker(client: Any) -> Any:
        while remaining[0] > 0:
            remaining[0] -= 1
            start = time.perf_counter()
            d = client.roundTrip(message)
            d.addTimeout(args.timeout, reactor)
            got = yield d
            latencies.append(time.perf_counter() - start)
            if got != message:
                raise Mismatch(f"sent {message!r}, got back {got!r}")

    began = time.perf_counter()
    try:
        yield defer.gatherResults([worker(c) for c in clients], consumeErrors=True)
    finally:
        for c in clients:
            close(c)
    elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    out.write(f"{n} round trips of {len(message)} bytes over {len(clients)} connection(s) "
              f"in {elapsed:.3f}s: {n / elapsed:.0f}/s, p50 {_pct(latencies, 0.50) * 1000:.3f} ms, "
              f"p99 {_pct(latencies, 0.99) * 1000:.3f} ms\n")
    return 0


def _pct(sorted_: list[float], q: float) -> float:
    return sorted_[min(len(sorted_) - 1, int(q * len(sorted_)))] if sorted_ else 0.0


def run(reactor: Any, args: argparse.Namespace) -> defer.Deferred:
    status = clients.checkArguments("echo", args, 7)
    if status is None and args.udp and args.tls:
        status = clients.fail("echo", "", "--udp or --tls, not both", clients.EXIT_USAGE)
    if status is not None:
        return defer.succeed(status)
    d = load(reactor, args) if args.count else sendMessages(reactor, args)
    transport = "udp" if args.udp else ("tls" if args.tls else "tcp")
    hint = clients.TLSHint(args.host, args.cacert) if args.tls else None

    def failed(f: Any) -> int:
        return clients.fail("echo", clients.target(args.host, args.port, transport),
                            clients.describe(f.value, args.timeout, hint))

    return d.addErrback(failed)


def addParser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("echo", help="send messages to an echo server, check the echoes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", metavar="HOST:PORT", help="the server ([v6addr]:port for IPv6; default port 7)")
    p.add_argument("messages", nargs="*", metavar="MESSAGE",
                   help="messages to send (default: each line of standard input)")
    p.add_argument("--udp", action="store_true", help="one datagram per message")
    clients.addConnectionOptions(p)
    p.add_argument("--count", type=int, default=0, metavar="N", help="load mode: N round trips")
    p.add_argument("--concurrency", type=int, default=1, metavar="C", help="load mode: C connections")
    p.add_argument("--size", type=int, default=32, metavar="BYTES", help="load mode: message size (default 32)")
    p.set_defaults(run=run)
    return p
