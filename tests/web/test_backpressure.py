"""
Back-pressure (issue 18): a client that pipelines requests and never reads gets only a few
answers ahead; netsvc stops reading from it instead of buffering every response, and other
clients are answered meanwhile.  Over real loopback sockets (plain TCP and TLS): in-memory
transports have no back-pressure.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from netsvc.tls import clientCreator
from tests.helpers import sleep
from tests.web._support import PLAIN, SMALL, TLS, get, parseResponses, req, startWeb, webPort

#: Requests pipelined by the non-reading client: every other one for a 100 KB incompressible
#: file held in the cache (the fast path), the rest for a 1 KiB one.
COUNT = 2000
BIG = 100 * 1024


class _Pipeliner(Protocol):
    """
    Asks for one small file (the TLS handshake done, the cache warm), then sends C{payload} at
    once and stops reading; C{read()} reads again.  C{done} fires at disconnection.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.data = bytearray()
        self.sent = False
        self.ready: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        handle = getattr(self.transport, "transport", self.transport).getHandle()  # under TLS too
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.write(req("GET", "/small.bin"))

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        end = self.data.find(b"\r\n\r\n")
        if not self.sent and end >= 0 and len(self.data) >= end + 4 + len(SMALL):
            self.sent = True
            del self.data[:]
            self.transport.pauseProducing()  # never read (until read())
            self.transport.write(self.payload)
            self.ready.callback(None)

    def read(self) -> None:
        handle = getattr(self.transport, "transport", self.transport).getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.transport.resumeProducing()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


def _unsent(conn: Any) -> int:
    """Bytes a server connection (a Guard's GuardedProtocol) holds in Twisted's write buffers."""
    total = 0
    t = conn.transport
    while t is not None:
        total += sum(map(len, getattr(t, "_appSendBuffer", []) or []))
        buffered = getattr(t, "dataBuffer", None)
        if buffered is not None:
            total += len(buffered) - t.offset + t._tempDataLen
            break
        t = getattr(t, "transport", None)
    return total


class PipelineWithoutReadingTests(unittest.TestCase):
    status = 200
    def setUp(self) -> None:
        self.daemon = startWeb(self)
        (self.root / "big.bin").write_bytes(os.urandom(BIG))  # replaced: under the cache limit
        web = self.daemon.getServiceNamed("web")
        self.guard = web.guard
        site = web.site
        self.answered = 0
        original = site.onRequest

        def counting(request: Any) -> None:
            self.answered += 1
            original(request)

        site.onRequest = counting

    def request(self, path: str, close: bool) -> bytes:
        return req("GET", path, close=close)

    @defer.inlineCallbacks
    def pipeline(self, index: int, tls: bool) -> Any:
        paths = ["/big.bin" if i % 2 else "/small.bin" for i in range(COUNT)]
        payload = b"".join(self.request(p, close=(i == COUNT - 1)) for i, p in enumerate(paths))
        endpoint: Any = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", webPort(self.daemon, index))
        if tls:
            endpoint = endpoints.wrapClientTLS(
                clientCreator("localhost", cafile=self.cafile, acceptableProtocols=[b"http/1.1"]),
                endpoint,
            )
        client = _Pipeliner(payload)
        yield endpoints.connectProtocol(endpoint, client)
        yield client.ready.addTimeout(10, reactor)
        self.addCleanup(lambda: client.transport.abortConnection() if not client.done.called else None)
        start = self.answered
        # The server answers what the socket buffers take, then must stop: wait until it does.
        last, stable = -1, 0
        for _ in range(100):
            yield sleep(0.05)
            now = self.answered - start
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 6 or now >= COUNT:
                break
        unsent = max(_unsent(c) for c in self.guard.connections)
        # What the kernel's socket buffers take (a few MB on loopback) is answered; netsvc itself
        # holds at most about one batch past the transport's bound.
        self.assertLess(last, COUNT // 10, f"{last} of {COUNT} answered to a client that does not read")
        self.assertLess(unsent, 256 * 1024)
        # Another client is answered meanwhile.
        r = yield get(webPort(self.daemon, index), "/small.bin", tls=tls, cafile=self.cafile)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, SMALL)
        # The first one reads at last and gets every answer, in order.
        client.read()
        data = yield client.done.addTimeout(30, reactor)
        big = (self.root / "big.bin").read_bytes()
        responses = parseResponses(data, ["GET"] * COUNT)
        self.assertEqual({r.status for r in responses}, {self.status})
        for i, r in enumerate(responses):
            self.assertEqual(r.body, big if i % 2 else SMALL, f"response {i}")

    def test_plain(self) -> Any:
        return self.pipeline(PLAIN, tls=False)

    def test_tls(self) -> Any:
        return self.pipeline(TLS, tls=True)


class _Stalled(Protocol):
    """Sends C{payload} at once and never reads."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.pauseProducing()
        self.transport.write(self.payload)


class HeldInputTests(unittest.TestCase):
    """While the client does not read, netsvc stops reading it too: the requests it has not
    answered stay in the client's and the kernel's buffers, not in netsvc's."""

    @defer.inlineCallbacks
    def test_heldInputBounded(self) -> Any:
        from netsvc.web import fast

        daemon = startWeb(self)
        (self.root / "big.bin").write_bytes(os.urandom(BIG))
        web = daemon.getServiceNamed("web")
        padding = {"User-Agent": "x" * 8000}
        count = 400  # 3.2 MB of requests
        payload = b"".join(
            req("GET", "/big.bin" if i % 2 else "/small.bin", padding) for i in range(count)
        )
        received = web.metrics.bytesIn.value
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", webPort(daemon, PLAIN))
        client = yield endpoints.connectProtocol(endpoint, _Stalled(payload))
        self.addCleanup(client.transport.abortConnection)
        last, stable = -1, 0
        for _ in range(100):
            yield sleep(0.05)
            now = web.metrics.bytesIn.value - received
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 6:
                break
        (conn,) = web.guard.connections
        held = len(conn.wrappedProtocol._buffer)
        self.assertLessEqual(held, fast.MAX_HELD)
        self.assertLess(last, len(payload) // 2, "netsvc went on reading a client that does not read")
        r = yield get(webPort(daemon, PLAIN), "/small.bin", tls=False)
        self.assertEqual(r.body, SMALL)


def _refusedHeadThenMore(portNumber: int, cafile: str) -> bytes:
    """(In a thread.)  Over TLS: a head twisted.web refuses (400), then, once the answer is read,
    more lines on the same connection, before the server's close completes."""
    import ssl

    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", portNumber), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            got = s.recv(65536)
            try:
                s.sendall(b"\r\n\r\nHost: x\r\n\r\n")
                while True:
                    more = s.recv(65536)
                    if not more:
                        break
                    got += more
            except (OSError, ssl.SSLError):
                pass
            return got


class RefusedHeadTests(unittest.TestCase):
    """Issue 22: after twisted.web answered 400 to a head the fast path handed over, lines that
    still arrive over TLS were parsed as the rest of that head (AttributeError: '_version')."""

    @defer.inlineCallbacks
    def test_linesAfter400OverTLS(self) -> Any:
        from twisted.internet import threads

        daemon = startWeb(self)
        for _ in range(3):
            got = yield threads.deferToThread(_refusedHeadThenMore, webPort(daemon, TLS), self.cafile)
            self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got)
            yield sleep(0.05)
        self.assertEqual(self.flushLoggedErrors(AttributeError), [])


class SlowPathPipelineTests(PipelineWithoutReadingTests):
    """The same through twisted.web's channel (a Range request is not for the fast path; the
    connection is handed over at the first one)."""

    rangeHeader = {"Range": "bytes=0-"}
    status = 206

    def request(self, path: str, close: bool) -> bytes:
        return req("GET", path, self.rangeHeader, close=close)
