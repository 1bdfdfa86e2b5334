"""The direct relay's own parts: which listeners and rules get it, and its connect deadlines."""

from __future__ import annotations

import errno

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from netsvc.forward.deadlines import Deadlines
from netsvc.forward.direct import DirectRelay
from tests.forward._util import Client, connect, echoBackend, fport, startForwarder
from tests.forward.test_stream import rule, tcp


class EligibilityTests(unittest.TestCase):
    """Plain TCP listeners of rules with address backends get it; everything else keeps the Relay."""

    def test_whichListenersAndRules(self):
        port = echoBackend(self)
        path = self.mktemp() + ".sock"
        daemon, svc = startForwarder(
            self,
            f'      - name: plain\n        listen: ["tcp:0:interface=127.0.0.1", "unix:{path}"]\n'
            f'        connect: ["{tcp(port)}"]\n'
            + rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.1/32]", "proxied")
            + rule([f"tcp:host=localhost:port={port}"], name="named")
            + rule([tcp(port)], "bandwidth: {per_rule: 1MiB}", "paced")
            + rule([tcp(port), f"tls:host=127.0.0.1:port={port}"], name="mixed"),
        )
        plain = svc.ruleListeners["plain"].targets
        self.assertEqual([f.direct for f in plain], [True, False])  # the unix listener keeps the Relay
        self.assertTrue(svc.rules["plain"].direct)
        for name in ("named", "paced", "mixed"):
            self.assertFalse(svc.rules[name].direct, name)

    @defer.inlineCallbacks
    def test_reloadBetweenRelays(self):
        """
        A reload that adds a bandwidth limit: the same port now builds Relays (on a
        tcp.Server, through the port's hook); the open direct connection goes on.
        """
        from netsvc.forward.relay import Relay
        from tests.forward._util import parseForward

        port = echoBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        before = yield connect(fport(daemon))
        before.transport.write(b"1")
        yield before.waitFor(1)
        svc.reconfigure(parseForward(self, rule([tcp(port)], "bandwidth: {per_connection: 1MiB}")))
        after = yield connect(fport(daemon))
        after.transport.write(b"2")
        self.assertEqual((yield after.waitFor(1)), b"2")
        kinds = {type(r) for r in svc.rules["r"].connections}
        self.assertEqual(kinds, {DirectRelay, Relay})
        before.transport.write(b"3")
        self.assertEqual((yield before.waitFor(2)), b"13")
        svc.reconfigure(parseForward(self, rule([tcp(port)])))  # and back
        again = yield connect(fport(daemon))
        again.transport.write(b"4")
        self.assertEqual((yield again.waitFor(1)), b"4")
        self.assertEqual(len([r for r in svc.rules["r"].connections if type(r) is DirectRelay]), 2)
        for c in (before, after, again):
            c.transport.loseConnection()
            yield c.closed

    @defer.inlineCallbacks
    def test_acceptProxyListenerBuildsRelays(self):
        daemon, svc = startForwarder(
            self, rule([tcp(echoBackend(self))], "accept_proxy: true\ntrusted_proxies: [127.0.0.1/32]")
        )
        client = yield connect(fport(daemon), Client())
        client.transport.write(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhi")
        yield client.waitFor(2)
        self.assertNotIsInstance(next(iter(svc.rules["r"].connections)), DirectRelay)
        client.transport.loseConnection()
        yield client.closed


class _Attempt:
    """What Deadlines looks at in a relay: its current attempt, whether it connected."""

    def __init__(self) -> None:
        self.server: object | None = object()
        self.connected = False
        self._finished = False
        self.timedOut = 0

    def connectTimedOut(self) -> None:
        self.timedOut += 1


class DeadlinesTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.deadlines = Deadlines(self.clock)

    def test_expiresInOrderSkippingConnected(self):
        a, b, c = _Attempt(), _Attempt(), _Attempt()
        self.deadlines.add(a, 5)
        self.clock.advance(1)
        self.deadlines.add(b, 5)
        self.deadlines.add(c, 5)
        b.connected = True
        self.clock.advance(4)
        self.assertEqual((a.timedOut, b.timedOut, c.timedOut), (1, 0, 0))
        self.clock.advance(0.5)
        self.assertEqual(c.timedOut, 0)
        self.clock.advance(0.5)
        self.assertEqual((a.timedOut, b.timedOut, c.timedOut), (1, 0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_newAttemptOfTheSameRelay(self):
        """A relay that failed over is timed on its new attempt, not the old one."""
        a = _Attempt()
        self.deadlines.add(a, 5)
        self.clock.advance(3)
        a.server = object()  # the next backend
        self.deadlines.add(a, 5)
        self.clock.advance(2)
        self.assertEqual(a.timedOut, 0)
        self.clock.advance(3)
        self.assertEqual(a.timedOut, 1)

    def test_shorterTimeoutInsertedInOrder(self):
        """A backend with its own shorter timeout= does not wait behind the rule's."""
        slow, fast = _Attempt(), _Attempt()
        self.deadlines.add(slow, 10)
        self.deadlines.add(fast, 1)
        self.clock.advance(1)
        self.assertEqual((slow.timedOut, fast.timedOut), (0, 1))
        self.clock.advance(9)
        self.assertEqual(slow.timedOut, 1)

    def test_connectedFrontEntriesAreDropped(self):
        """The queue does not keep connected attempts (nor their relays) alive."""
        attempts = [_Attempt() for _ in range(100)]
        for a in attempts:
            self.deadlines.add(a, 5)
            a.connected = True
        self.assertEqual(len(self.deadlines.queue), 1)

    def test_stopWaitsForAttemptsInFlight(self):
        a = _Attempt()
        self.deadlines.add(a, 5)
        self.deadlines.stop()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # a still times out
        a.connected = True
        self.deadlines.settle()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NoLeaksTests(unittest.TestCase):
    """Many connections ending every way there is leave nothing behind."""

    timeout = 60

    @defer.inlineCallbacks
    def test_mixedEndings(self):
        import os
        import socket
        import struct

        from twisted.internet import reactor, threads

        from netsvc.forward.direct import _End

        def openFDs() -> int:
            return len(os.listdir("/proc/self/fd"))

        port = echoBackend(self)
        dead = socket.socket()  # a backend that is never there: failover to the echo
        dead.bind(("127.0.0.1", 0))
        deadPort = dead.getsockname()[1]
        dead.close()
        daemon, svc = startForwarder(
            self, rule([tcp(port), f"tcp:host=127.0.0.1:port={deadPort}"], "balance: roundrobin")
        )
        forwarder = fport(daemon)
        yield threads.deferToThread(lambda: None)  # (the reactor's and the thread pool's own descriptors)
        before = openFDs()

        def one(i: int) -> str:
            s = socket.create_connection(("127.0.0.1", forwarder), timeout=10)
            kind = i % 4
            try:
                if kind == 0:  # a request, half-close, the whole answer
                    payload = bytes([i % 256]) * (1 + i * 997 % 200000)
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while chunk := s.recv(65536):
                        got += chunk
                    return "ok" if bytes(got) == payload else f"short {len(got)}/{len(payload)}"
                if kind == 1:  # sends and resets
                    s.sendall(b"x" * 5000)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return "ok"
                if kind == 2:  # connects and goes
                    return "ok"
                s.sendall(b"ping")  # kind 3: reads its echo, then closes with data unread
                s.recv(4)
                s.sendall(b"y" * 100000)
                return "ok"
            finally:
                s.close()

        def many() -> list[str]:
            return [one(i) for i in range(120)]

        results = yield threads.deferToThread(many)
        self.assertEqual([r for r in results if r != "ok"], [])
        rule_ = svc.rules["r"]
        yield _waitFor(lambda: not rule_.connections and not svc.guard.connections)
        self.assertEqual([b.active for b in rule_.pool.backends], [0, 0])
        ends = [s for s in list(reactor.getReaders()) + list(reactor.getWriters()) if isinstance(s, _End)]
        self.assertEqual(ends, [])
        # (the echo backend closes its side of the last connections a moment later)
        yield _waitFor(lambda: openFDs() <= before)


def _waitFor(predicate, timeout: float = 10.0) -> defer.Deferred:
    from tests.forward.test_stream import waitUntil

    return waitUntil(predicate, timeout)


class FakeSocket:
    """
    A socket for the relay's unit tests: C{inbox} is what recv_into returns in
    turn (bytes, b"" for EOF, or an exception), C{room} how much send may take
    (None: everything), C{connects} what connect_ex returns in turn.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.inbox: list = []
        self.sent = bytearray()
        self.room: int | None = None
        self.sendError: Exception | None = None
        self.connects = [errno.EINPROGRESS, errno.EISCONN]
        self.soError = 0
        self.shut = False
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args) -> None:
        pass

    def getsockopt(self, level: int, option: int) -> int:
        return self.soError

    def getsockname(self):
        return ("127.0.0.1", 8000)

    def connect_ex(self, address) -> int:
        return self.connects.pop(0)

    def recv_into(self, buffer) -> int:
        if not self.inbox:
            raise BlockingIOError()
        item = self.inbox.pop(0)
        if isinstance(item, Exception):
            raise item
        buffer[: len(item)] = item
        return len(item)

    def send(self, data) -> int:
        if self.sendError is not None:
            raise self.sendError
        n = len(data) if self.room is None else min(self.room, len(data))
        if not n and len(data):
            raise BlockingIOError()
        self.sent += bytes(data[:n])
        if self.room is not None:
            self.room -= n
        return n

    def shutdown(self, how: int) -> None:
        self.shut = True

    def close(self) -> None:
        self.closed = True


class DirectRelayUnitTests(unittest.TestCase):
    """The relay's state machine on fake sockets and a memory reactor: partial writes, EOFs, resets."""

    def setUp(self):
        from netsvc.config import Limits
        from netsvc.forward.rule import RuleRuntime
        from netsvc.metrics import Registry, ServiceMetrics
        from netsvc.policies import Guard
        from tests.forward._util import parseForward

        self.reactor = MemoryReactorClock()
        settings = parseForward(self, rule([tcp(1001), tcp(1002)], "balance: first")).rules[0]
        registry = Registry()
        self.rule = RuleRuntime(settings, self.reactor, registry)
        self.guard = Guard(Limits(), ServiceMetrics(registry, "forward"), self.reactor)
        self.backends: list[FakeSocket] = []
        self.patch(DirectRelay, "newSocket", staticmethod(self._newSocket))
        self.next: list[FakeSocket] = []

    def _newSocket(self, family, kind) -> FakeSocket:
        sock = self.next.pop(0) if self.next else FakeSocket(100 + len(self.backends))
        self.backends.append(sock)
        return sock

    def relay(self, connected: bool = True) -> tuple[DirectRelay, FakeSocket, FakeSocket]:
        client = FakeSocket(10)
        relay = DirectRelay(self.rule, IPv4Address("TCP", "127.0.0.1", 5000), self.guard, "127.0.0.1")
        relay.adopt(client)
        relay.makeConnection(relay)
        backend = self.backends[-1]
        if connected:
            relay.server.doWrite()  # the connect finished
            self.assertTrue(relay.connected)
        return relay, client, backend

    def test_connectWaitsForWritable(self):
        relay, client, backend = self.relay(connected=False)
        self.assertIn(relay.server, self.reactor.getWriters())
        self.assertNotIn(relay.client, self.reactor.getReaders())  # the client is not read yet
        relay.server.doWrite()
        self.assertEqual(set(self.reactor.getReaders()), {relay.client, relay.server})
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.rule.pool.backends[0].active, 1)

    def test_staleWritableWhileConnectingIsIgnored(self):
        """A writable event that was for an earlier socket on the same descriptor (EALREADY)."""
        self.next = [FakeSocket(100)]
        self.next[0].connects = [errno.EINPROGRESS, errno.EALREADY, errno.EISCONN]
        relay, client, backend = self.relay(connected=False)
        relay.server.doWrite()
        self.assertFalse(relay.connected)
        self.assertEqual((len(self.backends), backend.closed), (1, False))  # still this attempt
        relay.server.doWrite()
        self.assertTrue(relay.connected)
        self.assertEqual(self.rule.pool.backends[0].failures.value, 0)

    def test_refusedFailsOverToTheNextBackend(self):
        from twisted.python.failure import Failure

        relay, client, first = self.relay(connected=False)
        first.soError = errno.ECONNREFUSED
        end = relay.server
        self.reactor.removeWriter(end)  # what the reactor does before connectionLost
        end.connectionLost(Failure(Exception("hang-up")))
        self.assertTrue(first.closed)
        second = self.backends[-1]
        self.assertIsNot(second, first)
        relay.server.doWrite()
        self.assertTrue(relay.connected)
        self.assertEqual(relay.backend, self.rule.pool.backends[1])
        self.assertEqual(self.rule.pool.backends[0].failures.value, 1)

    def test_connectTimeoutFailsOverThenGivesUp(self):
        relay, client, first = self.relay(connected=False)
        self.reactor.advance(self.rule.settings.connect_timeout)
        self.assertTrue(first.closed)
        self.assertEqual(len(self.backends), 2)
        self.reactor.advance(self.rule.settings.connect_timeout)
        self.assertTrue(client.closed)
        self.assertIn("timed out", relay.reason)
        self.assertEqual(self.rule.metrics.refused("connect_failed").value, 1)
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_partialWritePausesTheReader(self):
        relay, client, backend = self.relay()
        backend.room = 3
        client.inbox = [b"abcdefgh"]
        relay.client.doRead()
        self.assertEqual(bytes(backend.sent), b"abc")
        self.assertNotIn(relay.client, self.reactor.getReaders())  # back-pressure
        self.assertIn(relay.server, self.reactor.getWriters())
        self.assertEqual(relay.buffered(), 5)
        backend.room = 2
        relay.server.doWrite()
        self.assertEqual(bytes(backend.sent), b"abcde")
        backend.room = None
        relay.server.doWrite()
        self.assertEqual(bytes(backend.sent), b"abcdefgh")
        self.assertIn(relay.client, self.reactor.getReaders())
        self.assertNotIn(relay.server, self.reactor.getWriters())
        self.assertEqual((relay.up, self.rule.metrics.bytesUp.value), (8, 8))

    def test_eofPassedOnAfterPendingBytes(self):
        relay, client, backend = self.relay()
        backend.room = 2
        client.inbox = [b"1234", b""]
        relay.client.doRead()
        self.assertFalse(backend.shut)
        backend.room = None
        relay.server.doWrite()
        self.assertFalse(backend.shut)  # the EOF is not read yet: reading had stopped
        relay.client.doRead()
        self.assertTrue(backend.shut)  # FIN after every byte
        self.assertEqual(bytes(backend.sent), b"1234")
        self.assertFalse(client.closed)  # the other direction goes on
        backend.inbox = [b"answer", b""]
        relay.server.doRead()
        relay.server.doRead()
        self.assertEqual(bytes(client.sent), b"answer")
        self.assertTrue(client.closed and backend.closed)
        self.assertEqual(relay.reason, "client closed")
        self.assertFalse(self.rule.connections)

    def test_backendResetKeepsWhatItSentToTheClient(self):
        """A reset toward the backend drops what was going to it, still delivers what came from it."""
        relay, client, backend = self.relay()
        client.room = 4
        backend.inbox = [b"response"]
        relay.server.doRead()  # "resp" sent, "onse" pending toward the client
        backend.sendError = ConnectionResetError(errno.ECONNRESET, "reset")
        client.inbox = [b"more"]
        relay.client.doRead()  # sending it to the backend fails
        self.assertTrue(backend.closed)
        self.assertFalse(client.closed)
        client.room = None
        relay.client.doWrite()
        self.assertEqual(bytes(client.sent), b"response")
        self.assertTrue(client.closed)
        self.assertEqual(relay.reason, "backend: connection reset by peer")
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(self.reactor.getWriters(), [])

    def test_readErrorClosesBoth(self):
        relay, client, backend = self.relay()
        client.inbox = [ConnectionResetError(errno.ECONNRESET, "reset")]
        relay.client.doRead()
        self.assertTrue(client.closed and backend.closed)
        self.assertEqual(self.rule.pool.backends[0].active, 0)
        self.assertFalse(self.guard.connections)

    def test_staleReadAfterPauseIsIgnored(self):
        relay, client, backend = self.relay()
        backend.room = 0
        client.inbox = [b"first", b"second"]
        relay.client.doRead()
        relay.client.doRead()  # (an event from the same poll, after the pause)
        self.assertEqual(client.inbox, [b"second"])

    def test_loseConnectionFlushesThenCloses(self):
        relay, client, backend = self.relay()
        client.room = 1
        backend.inbox = [b"xyz"]
        relay.server.doRead()
        relay.loseConnection()
        self.assertFalse(client.closed)
        client.room = None
        relay.client.doWrite()
        self.assertEqual(bytes(client.sent), b"xyz")
        self.assertTrue(client.closed and backend.closed)
        self.assertEqual(relay.reason, "shutdown")

    def test_idleTimeoutAborts(self):
        relay, client, backend = self.relay()
        relay.checkIdle(self.reactor.seconds())
        self.reactor.advance(self.rule.settings.idle_timeout + 1)
        relay.checkIdle(self.reactor.seconds())
        self.assertTrue(client.closed and backend.closed)
        self.assertIn("idle timeout", relay.reason)
