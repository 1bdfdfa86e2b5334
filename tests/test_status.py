"""
The metrics listener (netsvc.status) against a client that pipelines
C{GET /metrics} and never reads, over a real loopback socket: twisted.web's
HTTPChannel pauses itself, so what the daemon holds stays bounded, and a
well-behaved scraper is answered meanwhile.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import sleep, startDaemon

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def held(conn) -> int:
    """Output held in userland for one connection (through the guard's wrapper)."""
    t, total = conn.transport, 0
    while t is not None:
        if hasattr(t, "dataBuffer"):
            total += len(t.dataBuffer) - t.offset + t._tempDataLen
        t = getattr(t, "transport", None)
    return total


class NonReadingScraperTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_pipelinedScrapesWithoutReadingBounded(self):
        import treq
        from twisted.web.client import HTTPConnectionPool

        daemon = startDaemon(self, 'metrics: {listen: ["tcp:0:interface=127.0.0.1"]}\n'
                                   'services: {echo: {listen: ["tcp:0:interface=127.0.0.1"]}}\n')
        svc = daemon.getServiceNamed("metrics")
        where = svc.listeners[0].port.getHost().port
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.connect(("127.0.0.1", where))
        s.setblocking(False)
        self.addCleanup(s.close)
        stream = REQUEST * 20000
        sent, most, deadline = 0, 0, time.monotonic() + 3
        while sent < len(stream) and time.monotonic() < deadline:
            try:
                sent += s.send(stream[sent:sent + 4400])
            except BlockingIOError:
                pass
            yield sleep(0.002)
            for conn in svc.guard.connections:
                most = max(most, held(conn))
        size = len(daemon.context.metrics.render())
        self.assertLess(most, 1 << 20, f"the daemon held {most} bytes ({size}-byte answers)")
        answered = -(-sent // len(REQUEST))  # the last one perhaps in part: its end is sent below
        self.assertGreater(answered * size, 8 << 20, "not enough pipelined to tell")

        # Then the client reads: every request it sent is answered.
        rest = stream[sent:answered * len(REQUEST)] + REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        received, deadline = bytearray(), time.monotonic() + 20
        while time.monotonic() < deadline:
            if rest:
                try:
                    rest = rest[s.send(rest):]
                except BlockingIOError:
                    pass
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                yield sleep(0.001)
                continue
            if not data:
                break
            received += data
        self.assertEqual(received.count(b"HTTP/1.1 200 OK\r\n"), answered + 1)

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{where}/metrics", pool=pool)
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertIn(b"netsvc_connections_accepted_total", body)


class OneAddressCannotLockOutScrapersTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_perAddressLimitUnderTheTotal(self):
        """
        One address holding connections open (a slowloris) reaches its own limit before the listener's
        total: a scraper from another address is still answered.
        """
        import treq
        from twisted.web.client import HTTPConnectionPool

        daemon = startDaemon(self, 'metrics: {listen: ["tcp:0:interface=127.0.0.1"]}\n'
                                   'services: {echo: {listen: ["tcp:0:interface=127.0.0.1"]}}\n')
        svc = daemon.getServiceNamed("metrics")
        where = svc.listeners[0].port.getHost().port
        for _ in range(80):  # more than the listener's total of 64 (non-blocking: the daemon is in this process)
            s = socket.socket()
            self.addCleanup(s.close)
            s.bind(("127.0.0.2", 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", where))
            yield sleep(0.01)
            try:
                s.send(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            except OSError:
                pass  # refused by the per-address limit
        yield sleep(0.2)
        self.assertLess(svc.guard.perHost.get("127.0.0.2", 0), svc.guard.limits.max_connections)
        pool = HTTPConnectionPool(reactor, persistent=False)
        answer = yield treq.get(f"http://127.0.0.1:{where}/metrics", pool=pool, timeout=5)
        self.assertEqual(answer.code, 200)
        yield answer.content()
