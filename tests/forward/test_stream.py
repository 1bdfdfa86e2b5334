"""The TCP relay over real loopback sockets: stream semantics, limits, balancing."""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from netsvc.echo.protocol import EchoFactory
from netsvc.forward import proxyheader
from netsvc.forward import rule as ruleModule
from netsvc.forward.direct import DirectRelay
from netsvc.forward.relay import Relay
from tests.forward._util import (
    Client,
    Firehose,
    connect,
    echoBackend,
    fport,
    freePort,
    listenTCP,
    metric,
    namedBackend,
    recorderBackend,
    relayBuffered,
    relaySockets,
    startForwarder,
)
from tests.helpers import sleep


def rule(connect: list[str], extra: str = "", name: str = "r") -> str:
    backends = ", ".join(f'"{c}"' for c in connect)
    out = (
        f"      - name: {name}\n"
        f'        listen: ["tcp:0:interface=127.0.0.1"]\n'
        f"        connect: [{backends}]\n"
    )
    for line in extra.strip("\n").splitlines():
        out += f"        {line}\n"
    return out


def tcp(port: int) -> str:
    return f"tcp:host=127.0.0.1:port={port}"


async def _wait(predicate, timeout: float = 5.0) -> None:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not met in time")
        await sleep(0.01)
        waited += 0.01


def waitUntil(predicate, timeout: float = 5.0) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(_wait(predicate, timeout))


class RelayTests(unittest.TestCase):
    """
    Stream semantics over real sockets, through the L{DirectRelay} (what plain
    TCP rules get); L{TwistedRelayTests} runs them through the L{Relay}.
    """

    timeout = 15
    relayType: type = DirectRelay

    @defer.inlineCallbacks
    def test_echoRoundTrip(self):
        daemon, svc = startForwarder(self, rule([tcp(echoBackend(self))]))
        client = yield connect(fport(daemon))
        client.transport.write(b"hello through")
        data = yield client.waitFor(13)
        self.assertEqual(data, b"hello through")
        self.assertIsInstance(next(iter(svc.rules["r"].connections)), self.relayType)
        client.transport.loseConnection()
        yield client.closed
        yield waitUntil(lambda: not svc.rules["r"].connections)
        self.assertEqual(metric(daemon, "netsvc_forward_bytes_total", rule="r", direction="up"), 13)
        self.assertEqual(metric(daemon, "netsvc_forward_bytes_total", rule="r", direction="down"), 13)

    @defer.inlineCallbacks
    def test_noNagleDelayEitherSide(self):
        """Small writes are passed on at once: TCP_NODELAY on both sockets."""
        daemon, svc = startForwarder(self, rule([tcp(echoBackend(self))]))
        client = yield connect(fport(daemon))
        client.transport.write(b"x")
        yield client.waitFor(1)
        relay = next(iter(svc.rules["r"].connections))
        for sock in relaySockets(relay):
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_halfCloseFromClient(self):
        """The client sends and shuts down its side; the backend's answer still arrives."""
        port, backend = recorderBackend(self, answer=lambda data: b"got " + data)
        daemon, _ = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        client.transport.write(b"request")
        client.transport.loseWriteConnection()
        data = yield client.closed
        self.assertEqual(data, b"got request")
        self.assertTrue(backend.instances[0].eof)

    @defer.inlineCallbacks
    def test_halfCloseFromBackend(self):
        """The backend greets and shuts its side; the client can still send to it."""
        port, backend = recorderBackend(self, greeting=b"banner", halfCloseAfterGreeting=True)
        daemon, _ = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon), Client(halfOpen=True))
        data = yield client.eof
        self.assertEqual(data, b"banner")
        yield waitUntil(lambda: backend.instances)
        client.transport.write(b"after your EOF")
        client.transport.loseWriteConnection()
        got = yield backend.instances[0].gotEOF
        self.assertEqual(got, b"after your EOF")
        client.transport.loseConnection()  # both directions are done (a half-closeable client closes itself)
        yield client.closed

    @defer.inlineCallbacks
    def test_backPressureSlowClient(self):
        """
        A backend sending as fast as it may to a client that does not read: the
        forwarder stops reading from the backend, its buffers stay bounded, and
        every byte arrives once the client reads again.
        """
        backendSide = []
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        client.transport.pauseProducing()
        yield waitUntil(lambda: backend.instances)
        total = 64 << 20
        hose = Firehose(backend.instances[0].transport, total)
        yield sleep(0.5)
        relay = next(iter(svc.rules["r"].connections))
        peak = relayBuffered(relay)
        # Each side: its send-buffer bound (256 KiB) plus one read (256 KiB), at most.
        self.assertLess(peak, 1024 * 1024, "forwarder buffers grew")
        self.assertLess(hose.sent, 24 << 20, "the backend was never paused")
        sentWhilePaused = hose.sent
        yield sleep(0.2)
        self.assertEqual(hose.sent, sentWhilePaused, "the backend kept sending while the client was paused")
        client.transport.resumeProducing()
        yield hose.done
        yield client.waitFor(total)
        self.assertEqual(len(client.data), total)
        backendSide.append(1)
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_backPressureSlowBackend(self):
        """The other way: a client sending to a backend that does not read."""
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        yield waitUntil(lambda: backend.instances)
        backend.instances[0].transport.pauseProducing()
        total = 16 << 20
        hose = Firehose(client.transport, total)
        yield sleep(0.5)
        relay = next(iter(svc.rules["r"].connections))
        self.assertLess(relayBuffered(relay), 1024 * 1024)
        self.assertLess(hose.sent, 24 << 20)
        backend.instances[0].transport.resumeProducing()
        yield hose.done
        yield waitUntil(lambda: len(backend.instances[0].buf) == total, 10)
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        daemon, svc = startForwarder(self, rule([tcp(echoBackend(self))], "idle_timeout: 0.3s"))
        client = yield connect(fport(daemon))
        client.transport.write(b"x")
        yield client.waitFor(1)
        started = reactor.seconds()
        yield client.closed
        self.assertGreaterEqual(reactor.seconds() - started, 0.25)
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual(metric(daemon, "netsvc_forward_idle_timeouts_total", rule="r"), 1)

    @defer.inlineCallbacks
    def test_connectTimeoutFailsOver(self):
        """A backend whose accept queue is full (SYNs dropped) times out; the next one answers."""
        stuck = socket.socket()
        self.addCleanup(stuck.close)
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        fillers = []
        for _ in range(3):  # fill the accept queue; later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(stuck.getsockname())
            fillers.append(s)
        self.addCleanup(lambda: [s.close() for s in fillers])
        good, _ = namedBackend(self, b"B")
        daemon, svc = startForwarder(
            self, rule([tcp(stuck.getsockname()[1]), tcp(good)], "connect_timeout: 0.3s\nbalance: first")
        )
        started = reactor.seconds()
        client = yield connect(fport(daemon))
        data = yield client.waitFor(1)
        self.assertEqual(data, b"B")
        self.assertGreaterEqual(reactor.seconds() - started, 0.25)
        self.assertEqual(
            metric(
                daemon,
                "netsvc_forward_backend_failures_total",
                rule="r",
                backend=f"127.0.0.1:{stuck.getsockname()[1]}",
            ),
            1,
        )
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_allAttemptsFailClosesClient(self):
        daemon, svc = startForwarder(self, rule([tcp(freePort()), tcp(freePort())]))
        client = yield connect(fport(daemon))
        data = yield client.closed
        self.assertEqual(data, b"")
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="r", reason="connect_failed"), 1)

    @defer.inlineCallbacks
    def test_aclRefuses(self):
        port = echoBackend(self)
        daemon, svc = startForwarder(
            self,
            rule([tcp(port)], 'allow: ["10.0.0.0/8"]', "a")
            + rule([tcp(port)], 'deny: ["127.0.0.1"]', "d")
            + rule([tcp(port)], 'allow: ["127.0.0.0/8"]\ndeny: ["10.0.0.0/8"]', "ok"),
        )
        for index, name in ((0, "a"), (1, "d")):
            client = yield connect(fport(daemon, index))
            client.transport.write(b"let me in")
            data = yield client.closed
            self.assertEqual(data, b"")
            self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule=name, reason="acl"), 1)
        client = yield connect(fport(daemon, 2))
        client.transport.write(b"in")
        yield client.waitFor(2)
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_maxConnections(self):
        daemon, svc = startForwarder(self, rule([tcp(echoBackend(self))], "max_connections: 1"))
        first = yield connect(fport(daemon))
        first.transport.write(b"1")
        yield first.waitFor(1)
        second = yield connect(fport(daemon))
        data = yield second.closed
        self.assertEqual(data, b"")
        self.assertEqual(
            metric(daemon, "netsvc_forward_refused_total", rule="r", reason="max_connections"), 1
        )
        first.transport.loseConnection()
        yield first.closed

    @defer.inlineCallbacks
    def test_bandwidthLimit(self):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)], "bandwidth: {per_connection: 200KiB}"))
        client = yield connect(fport(daemon))
        yield waitUntil(lambda: backend.instances)
        started = reactor.seconds()
        Firehose(client.transport, 300 * 1024, 16384)
        yield waitUntil(lambda: len(backend.instances[0].data) >= 300 * 1024, 10)
        elapsed = reactor.seconds() - started
        # 300 KiB at 200 KiB/s with a 50 KiB burst: about 1.25 s.
        self.assertGreater(elapsed, 0.9)
        self.assertLess(elapsed, 4)
        client.transport.loseConnection()
        yield client.closed


    @defer.inlineCallbacks
    def test_backendResetDeliversWhatItSent(self):
        """A backend answers and resets: the client gets the answer, then the close."""

        class AnswerAndReset(protocol.Protocol):
            def dataReceived(self, data):
                sock = self.transport.getHandle()
                sock.send(b"answer")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.transport.abortConnection()

        port = listenTCP(self, protocol.Factory.forProtocol(AnswerAndReset))
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        client.transport.write(b"question")
        data = yield client.closed
        self.assertEqual(data, b"answer")
        yield waitUntil(lambda: not svc.rules["r"].connections)

    @defer.inlineCallbacks
    def test_clientResetClosesBackend(self):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        client.transport.write(b"x")
        yield waitUntil(lambda: backend.instances and backend.instances[0].data == b"x")
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()
        yield backend.instances[0].closed
        yield waitUntil(lambda: not svc.rules["r"].connections)

    @defer.inlineCallbacks
    def test_oneLogEventPerConnection(self):
        events: list[dict] = []
        observer = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        port = echoBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        client.transport.write(b"12345")
        yield client.waitFor(5)
        clientPort = client.transport.getHost().port
        client.transport.loseConnection()
        yield client.closed
        yield waitUntil(lambda: not svc.rules["r"].connections)
        closed = [e for e in events if e.get("event") == "connection_closed"]
        self.assertEqual(len(closed), 1)
        event = closed[0]
        self.assertEqual(event["client"], f"127.0.0.1:{clientPort}")
        self.assertEqual(event["backend"], f"127.0.0.1:{port}")
        self.assertEqual((event["bytes_up"], event["bytes_down"]), (5, 5))
        self.assertEqual(event["reason"], "client closed")

    @defer.inlineCallbacks
    def test_shutdownClosesOpenConnections(self):
        """After drain_timeout the service's guard closes what is left: both sides see the close."""
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)]))
        client = yield connect(fport(daemon))
        client.transport.write(b"x")
        yield waitUntil(lambda: backend.instances and backend.instances[0].data == b"x")
        svc.guard._closeAll()
        yield client.closed
        yield backend.instances[0].closed
        yield waitUntil(lambda: not svc.rules["r"].connections)

    @defer.inlineCallbacks
    def test_ipv6(self):
        from twisted.internet import endpoints

        from tests.interop._daemon import ipv6LoopbackWorks

        if not ipv6LoopbackWorks():
            raise unittest.SkipTest("this machine has no IPv6 loopback")
        echo = reactor.listenTCP(0, EchoFactory(), interface="::1")
        self.addCleanup(echo.stopListening)
        daemon, svc = startForwarder(
            self,
            "      - name: r\n"
            '        listen: ["tcp6:0:interface=::1"]\n'
            f'        connect: ["tcp:host=[::1]:port={echo.getHost().port}"]\n',
        )
        ep = endpoints.TCP6ClientEndpoint(reactor, "::1", fport(daemon))
        client = yield endpoints.connectProtocol(ep, Client())
        client.transport.write(b"six")
        self.assertEqual((yield client.waitFor(3)), b"six")
        self.assertIsInstance(next(iter(svc.rules["r"].connections)), self.relayType)
        client.transport.loseConnection()
        yield client.closed


class BalanceTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def names(self, daemon, n: int, hold: bool = False) -> list[bytes]:
        out, clients = [], []
        for _ in range(n):
            client = yield connect(fport(daemon))
            data = yield client.waitFor(1)
            out.append(data[:1])
            clients.append(client)
            if not hold:
                client.transport.loseConnection()
                yield client.closed
        for c in clients:
            if hold:
                c.transport.loseConnection()
                yield c.closed
        return out

    @defer.inlineCallbacks
    def test_roundRobinSkipsDeadBackend(self):
        a, _ = namedBackend(self, b"A")
        b, _ = namedBackend(self, b"B")
        dead = freePort()
        daemon, svc = startForwarder(self, rule([tcp(a), tcp(dead), tcp(b)]))
        names = yield self.names(daemon, 6)
        # The dead backend's turns go to the next one (no health checks here).
        self.assertEqual(set(names), {b"A", b"B"})
        self.assertEqual(len(names), 6)
        self.assertGreaterEqual(
            metric(daemon, "netsvc_forward_backend_failures_total", rule="r", backend=f"127.0.0.1:{dead}"), 1
        )

    @defer.inlineCallbacks
    def test_roundRobinOrder(self):
        ports = [namedBackend(self, n)[0] for n in (b"A", b"B", b"C")]
        daemon, svc = startForwarder(self, rule([tcp(p) for p in ports]))
        names = yield self.names(daemon, 6)
        self.assertEqual(names, [b"A", b"B", b"C", b"A", b"B", b"C"])

    @defer.inlineCallbacks
    def test_first(self):
        ports = [freePort()] + [namedBackend(self, n)[0] for n in (b"A", b"B")]
        daemon, svc = startForwarder(self, rule([tcp(p) for p in ports], "balance: first"))
        names = yield self.names(daemon, 3)
        self.assertEqual(names, [b"A"] * 3)

    @defer.inlineCallbacks
    def test_leastconn(self):
        ports = [namedBackend(self, n)[0] for n in (b"A", b"B", b"C")]
        daemon, svc = startForwarder(self, rule([tcp(p) for p in ports], "balance: leastconn"))
        names = yield self.names(daemon, 3, hold=True)
        self.assertEqual(sorted(names), [b"A", b"B", b"C"])

    @defer.inlineCallbacks
    def test_random(self):
        ports = [namedBackend(self, n)[0] for n in (b"A", b"B")]
        daemon, svc = startForwarder(self, rule([tcp(p) for p in ports], "balance: random"))
        names = yield self.names(daemon, 12)
        self.assertEqual(set(names) - {b"A", b"B"}, set())
        self.assertEqual(len(names), 12)


class HealthTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_downThenUp(self):
        from twisted.internet import protocol

        good, _ = namedBackend(self, b"G")
        flaky = freePort()
        daemon, svc = startForwarder(
            self, rule([tcp(flaky), tcp(good)], "health: {interval: 0.05s, fall: 2, rise: 2, timeout: 0.5s}")
        )
        label = f"127.0.0.1:{flaky}"
        yield waitUntil(lambda: metric(daemon, "netsvc_forward_backend_up", rule="r", backend=label) == 0)
        # While it is down, every connection goes to the good one (no failed attempts).
        failures = metric(daemon, "netsvc_forward_backend_failures_total", rule="r", backend=label)
        names = yield BalanceTests.names(self, daemon, 4)
        self.assertEqual(names, [b"G"] * 4)
        self.assertEqual(
            metric(daemon, "netsvc_forward_backend_failures_total", rule="r", backend=label), failures
        )
        f = protocol.Factory.forProtocol(protocol.Protocol)
        p = reactor.listenTCP(flaky, f, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        yield waitUntil(lambda: metric(daemon, "netsvc_forward_backend_up", rule="r", backend=label) == 1)

    @defer.inlineCallbacks
    def test_noHealthyBackendRefuses(self):
        daemon, svc = startForwarder(self, rule([tcp(freePort())], "health: {interval: 0.05s, fall: 1}"))
        yield waitUntil(lambda: not svc.rules["r"].pool.healthy)
        client = yield connect(fport(daemon))
        data = yield client.closed
        self.assertEqual(data, b"")
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="r", reason="no_backend"), 1)

    @defer.inlineCallbacks
    def test_expect(self):
        a, _ = namedBackend(self, b"HELLO")
        b, _ = namedBackend(self, b"NOPE")
        daemon, svc = startForwarder(
            self,
            rule(
                [tcp(a), tcp(b)], "health: {interval: 0.05s, fall: 1, rise: 1, timeout: 0.3s, expect: HELLO}"
            ),
        )
        yield waitUntil(lambda: [x.up for x in svc.rules["r"].pool.backends] == [True, False])


class ProxyProtocolTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def received(self, version: str):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)], f"send_proxy: {version}"))
        client = yield connect(fport(daemon))
        clientPort = client.transport.getHost().port
        client.transport.write(b"payload")
        client.transport.loseWriteConnection()
        yield waitUntil(lambda: backend.instances)
        data = yield backend.instances[0].gotEOF
        yield client.closed
        return data, clientPort, fport(daemon)

    @defer.inlineCallbacks
    def test_v1Bytes(self):
        data, clientPort, listenPort = yield self.received("v1")
        self.assertEqual(
            data, f"PROXY TCP4 127.0.0.1 127.0.0.1 {clientPort} {listenPort}\r\n".encode() + b"payload"
        )

    @defer.inlineCallbacks
    def test_v2Bytes(self):
        data, clientPort, listenPort = yield self.received("v2")
        expected = (
            b"\r\n\r\n\x00\r\nQUIT\n"
            + b"\x21\x11\x00\x0c"
            + bytes([127, 0, 0, 1]) * 2
            + clientPort.to_bytes(2, "big")
            + listenPort.to_bytes(2, "big")
        )
        self.assertEqual(data, expected + b"payload")

    @defer.inlineCallbacks
    def test_acceptThenSend(self):
        """accept_proxy reads the client's header; send_proxy passes its addresses on; the ACL sees them."""
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(
            self,
            rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.1/32]\nsend_proxy: v1")
            + rule([tcp(port)], 'accept_proxy: true\ntrusted_proxies: [127.0.0.1/32]\ndeny: ["192.0.2.0/24"]', "acl"),
        )
        client = yield connect(fport(daemon))
        client.transport.write(proxyheader.v2(("203.0.113.7", 4242), ("198.51.100.1", 443)) + b"data")
        client.transport.loseWriteConnection()
        yield waitUntil(lambda: backend.instances)
        data = yield backend.instances[0].gotEOF
        self.assertEqual(data, b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\ndata")
        denied = yield connect(fport(daemon, 1))
        denied.transport.write(b"PROXY TCP4 192.0.2.9 10.0.0.1 1000 80\r\nhello")
        self.assertEqual((yield denied.closed), b"")
        bad = yield connect(fport(daemon, 1))
        bad.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual((yield bad.closed), b"")
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="acl", reason="acl"), 1)
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="acl", reason="proxy_header"), 1)


class TransportKindsTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_unixBackendAndIPv6Listener(self):
        from netsvc.echo.protocol import EchoFactory
        from tests.interop._daemon import ipv6LoopbackWorks

        path = self.mktemp() + ".sock"
        port = reactor.listenUNIX(path, EchoFactory())
        self.addCleanup(port.stopListening)
        listen = '["tcp:0:interface=127.0.0.1"' + (
            ', "tcp6:0:interface=::1"]' if ipv6LoopbackWorks() else "]"
        )
        daemon, svc = startForwarder(
            self,
            f'      - name: r\n        listen: {listen}\n        connect: ["unix:path={path}"]\n',
        )
        client = yield connect(fport(daemon))
        client.transport.write(b"over unix")
        self.assertEqual((yield client.waitFor(9)), b"over unix")
        client.transport.loseConnection()
        yield client.closed
        if ipv6LoopbackWorks():
            from twisted.internet import endpoints

            ep = endpoints.TCP6ClientEndpoint(reactor, "::1", fport(daemon, 1))
            six = yield endpoints.connectProtocol(ep, Client())
            six.transport.write(b"v6")
            self.assertEqual((yield six.waitFor(2)), b"v6")
            six.transport.loseConnection()
            yield six.closed


class _ThroughTwistedTransports:
    """Mixin: the same tests with the direct relay off (the L{Relay}, as TLS, unix,
    accept_proxy, bandwidth-limited and named-host rules use)."""

    relayType = Relay

    def setUp(self):
        self.patch(ruleModule, "DIRECT", False)


class TwistedRelayTests(_ThroughTwistedTransports, RelayTests):
    pass


class TwistedBalanceTests(_ThroughTwistedTransports, BalanceTests):
    pass


class TwistedProxyProtocolTests(_ThroughTwistedTransports, ProxyProtocolTests):
    pass
