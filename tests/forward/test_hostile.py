"""
Hostile peers of a forward rule, over real loopback sockets: a TLS client that
sends forever to a backend that never reads (and a backend that sends forever
to a TLS client that never reads), the same behind a PROXY header, and PROXY
headers that never end.  What the daemon holds stays bounded.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from netsvc.forward import proxyheader
from netsvc.tls import clientCreator
from tests.forward._util import Client, Firehose, connect, fport, metric, recorderBackend, startForwarder
from tests.forward.test_stream import rule, tcp, waitUntil
from tests.helpers import sleep, stateDir

#: What one forwarded connection may make the daemon hold, both directions, every layer.
BOUND = 1 << 20


def held(transport) -> int:
    """Output held in userland by a transport and the transports under it (TLS, guard, TCP)."""
    total = 0
    while transport is not None:
        total += sum(len(x) for x in getattr(transport, "_appSendBuffer", []))
        total += sum(len(x) for x in getattr(getattr(transport, "_aggregator", None), "_buffer", []))
        if hasattr(transport, "dataBuffer"):
            total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        transport = getattr(transport, "transport", None)
    return total


def relayHeld(relay) -> int:
    out = held(relay.transport)
    if relay.side is not None:
        out += held(relay.side.transport)
    return out + sum(len(x) for x in relay._pending)


def tlsRule(port: int, extra: str = "") -> str:
    return rule([tcp(port)], extra).replace("tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1")


def smallReceiveBuffer(transport) -> None:
    while not hasattr(transport, "socket"):
        transport = transport.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)


class TLSListenerTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def connectTLS(self, daemon) -> defer.Deferred:
        cafile = str(stateDir(daemon) / "tls" / "selfsigned.pem")
        endpoint = endpoints.wrapClientTLS(
            clientCreator("localhost", cafile=cafile),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", fport(daemon)))
        client = yield endpoints.connectProtocol(endpoint, Client())
        self.addCleanup(client.transport.abortConnection)
        return client

    @defer.inlineCallbacks
    def measure(self, svc, hose, seconds: float = 1.0):
        most = 0
        for _ in range(int(seconds / 0.02)):
            yield sleep(0.02)
            for relay in svc.rules["r"].connections:
                most = max(most, relayHeld(relay))
        return most

    @defer.inlineCallbacks
    def test_clientSendsForeverBackendNeverReads(self):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, tlsRule(port))
        client = yield self.connectTLS(daemon)
        client.transport.write(b"hello")
        yield waitUntil(lambda: backend.instances and backend.instances[0].buf)
        backend.instances[0].transport.pauseProducing()
        total = 64 << 20
        hose = Firehose(client.transport, total)
        most = yield self.measure(svc, hose)
        self.assertLess(most, BOUND, f"the forwarder held {most} bytes")
        self.assertLess(hose.sent, 24 << 20, "the client was never paused")
        backend.instances[0].transport.resumeProducing()  # and everything arrives
        yield hose.done
        yield waitUntil(lambda: len(backend.instances[0].buf) == total + 5, 20)

    @defer.inlineCallbacks
    def test_backendSendsForeverClientNeverReads(self):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, tlsRule(port))
        client = yield self.connectTLS(daemon)
        client.transport.write(b"hello")
        yield waitUntil(lambda: backend.instances and backend.instances[0].buf)
        smallReceiveBuffer(client.transport)
        client.transport.pauseProducing()
        total = 64 << 20
        hose = Firehose(backend.instances[0].transport, total)
        most = yield self.measure(svc, hose)
        self.assertLess(most, BOUND, f"the forwarder held {most} bytes")
        self.assertLess(hose.sent, 24 << 20, "the backend was never paused")
        client.transport.resumeProducing()
        yield hose.done
        yield client.waitFor(total)


class ProxyHeaderTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_behindAHeaderBackendNeverReads(self):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.1/32]"))
        client = yield connect(fport(daemon))
        client.transport.write(proxyheader.v1(("203.0.113.7", 4242), ("198.51.100.1", 443)) + b"hello")
        yield waitUntil(lambda: backend.instances and backend.instances[0].buf)
        backend.instances[0].transport.pauseProducing()
        hose = Firehose(client.transport, 64 << 20)
        most = 0
        for _ in range(50):
            yield sleep(0.02)
            for relay in svc.rules["r"].connections:
                most = max(most, relayHeld(relay))
        self.assertLess(most, BOUND, f"the forwarder held {most} bytes")
        self.assertLess(hose.sent, 24 << 20, "the client was never paused")
        client.transport.abortConnection()
        yield client.closed
        backend.instances[0].transport.resumeProducing()  # what the relay still holds can go
        yield backend.instances[0].closed

    @defer.inlineCallbacks
    def refusedAtItsBound(self, start: bytes, filler: bytes):
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(self, rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.1/32]"))
        s = socket.socket()
        s.connect(("127.0.0.1", fport(daemon)))
        s.setblocking(False)
        self.addCleanup(s.close)
        s.send(start)
        sent, closed = len(start), False
        for _ in range(400):  # a byte at a time, as a slowloris would
            try:
                s.send(filler)
                sent += 1
            except OSError:
                closed = True
                break
            yield sleep(0.002)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
        self.assertTrue(closed, "a PROXY header that never ends was not refused")
        self.assertLessEqual(sent, proxyheader.V2_MAX + 2)
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="r", reason="proxy_header"), 1)
        self.assertEqual(backend.instances, [])

    def test_v1WithoutEndRefused(self):
        return self.refusedAtItsBound(b"PROXY TCP4 ", b"1")

    def test_v2WithHugeLengthRefused(self):
        return self.refusedAtItsBound(proxyheader.V2_SIGNATURE + b"\x21\x11\xff", b"\xff")
