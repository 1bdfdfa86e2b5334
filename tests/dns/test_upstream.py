"""
Upstream URLs, policies, failover and health with scripted upstreams; the real
transports (UDP with TC -> TCP, TCP pipelining) over loopback sockets.
"""

from __future__ import annotations

import random
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.trial import unittest

from netsvc.dns import upstream as up
from netsvc.dns.upstream import AllUpstreamsFailed, Upstream, UpstreamGroup, parseURL
from tests.dns._fakes import FakeUpstream, a, key, response


class URLTests(unittest.TestCase):
    def test_forms(self) -> None:
        self.assertEqual(parseURL("udp://127.0.0.2:53")["port"], 53)
        self.assertEqual(parseURL("192.0.2.1")["scheme"], "udp")
        self.assertEqual(parseURL("tcp://[::1]:5353")["host"], "::1")
        tls = parseURL("tls://9.9.9.9?name=dns.quad9.net")
        self.assertEqual((tls["port"], tls["name"]), (853, "dns.quad9.net"))

    def test_errors(self) -> None:
        for bad, words in [("http://1.2.3.4", "scheme"), ("udp://dns.google", "IP address"),
                           ("udp://1.2.3.4:99999", "port"), ("udp://1.2.3.4?name=x", "unknown option"),
                           ("tls://1.2.3.4?nme=x", "name=")]:
            e = self.assertRaises(ValueError, parseURL, bad)
            self.assertIn(words, str(e))

    def test_systemUpstreams(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# x\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nsearch lab\n")
        self.assertEqual(up.systemUpstreams(path), ["udp://10.0.0.1:53", "udp://[fe80::1]:53"])
        self.assertEqual(up.systemUpstreams(path + ".missing"), ["udp://127.0.0.1:53"])


class PolicyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.zone = {"www.test": [a("www.test", "192.0.2.1")]}

    def upstreams(self, n: int, **zones) -> list[FakeUpstream]:
        return [FakeUpstream(f"udp://192.0.2.{i + 1}:53", self.clock, dict(zones.get(f"u{i}", self.zone)))
                for i in range(n)]

    def ask(self, group: UpstreamGroup, name: str = "www.test") -> defer.Deferred:
        return group.query(*key(name))

    def test_sequentialInOrder(self) -> None:
        us = self.upstreams(3)
        group = UpstreamGroup(us, "sequential", self.clock)
        for _ in range(3):
            self.successResultOf(self.ask(group))
        self.assertEqual([len(u.asked) for u in us], [3, 0, 0])

    def test_failoverOnServfailRefusedAndTimeout(self) -> None:
        us = self.upstreams(4, u0={"*": 2}, u1={"*": 5}, u2={"*": "timeout"})
        group = UpstreamGroup(us, "sequential", self.clock, timeout=1.0)
        d = self.ask(group)
        self.clock.advance(1)
        message = up.decode(self.successResultOf(d)[0])
        self.assertEqual(message.answers[0].payload.dottedQuad(), "192.0.2.1")
        self.assertEqual([len(u.asked) for u in us], [1, 1, 1, 1])

    def test_nxdomainIsAnAnswerNotAFailure(self) -> None:
        us = self.upstreams(2, u0={"*": 3})
        message = up.decode(self.successResultOf(self.ask(UpstreamGroup(us, "sequential", self.clock)))[0])
        self.assertEqual(message.rCode, dns.ENAME)
        self.assertEqual(len(us[1].asked), 0)

    def test_allFail(self) -> None:
        us = self.upstreams(2, u0={"*": 2}, u1={"*": 2})
        f = self.failureResultOf(self.ask(UpstreamGroup(us, "sequential", self.clock)), AllUpstreamsFailed)
        self.assertIn("servfail", str(f.value))

    def test_failingUpstreamSkippedForAWhile(self) -> None:
        us = self.upstreams(2, u0={"*": 2})
        group = UpstreamGroup(us, "sequential", self.clock)
        for _ in range(up.FAILURES_BEFORE_DOWN):
            self.successResultOf(self.ask(group))
        self.assertFalse(us[0].isUp(self.clock.seconds()))
        self.successResultOf(self.ask(group))
        self.assertEqual(len(us[0].asked), up.FAILURES_BEFORE_DOWN)  # skipped
        self.clock.advance(up.FIRST_DOWN + 0.1)
        us[0].zone["*"] = self.zone["www.test"]
        self.successResultOf(self.ask(group))
        self.assertEqual(len(us[0].asked), up.FAILURES_BEFORE_DOWN + 1)  # tried again, and healthy
        self.assertEqual(us[0].failures, 0)

    def test_allDownStillTried(self) -> None:
        us = self.upstreams(1)
        us[0].downUntil = 1e9
        self.successResultOf(self.ask(UpstreamGroup(us, "sequential", self.clock)))

    def test_randomPrefersFaster(self) -> None:
        us = self.upstreams(2)
        us[0].srtt, us[1].srtt = 0.200, 0.010
        group = UpstreamGroup(us, "random", self.clock, rng=random.Random(7))
        for _ in range(50):
            self.successResultOf(self.ask(group))
        self.assertGreater(len(us[1].asked), 35)

    def test_randomSpreads(self) -> None:
        us = self.upstreams(3)
        group = UpstreamGroup(us, "random", self.clock, rng=random.Random(7))
        for _ in range(60):
            self.successResultOf(self.ask(group))
        self.assertTrue(all(len(u.asked) > 5 for u in us), [len(u.asked) for u in us])

    def test_raceFirstAnswerWinsBoundedFanout(self) -> None:
        us = self.upstreams(4)
        us[0].delay, us[1].delay = 0.3, 0.1
        us[2].srtt = us[3].srtt = 1.0  # slower: outside the fan-out
        group = UpstreamGroup(us, "race", self.clock, fanout=2)
        d = self.ask(group)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual([len(u.asked) for u in us], [1, 1, 0, 0])

    def test_raceFallsBackToTheRest(self) -> None:
        us = self.upstreams(3, u0={"*": 2}, u1={"*": 5})
        us[2].srtt = 1.0
        group = UpstreamGroup(us, "race", self.clock, fanout=2)
        self.successResultOf(self.ask(group))
        self.assertEqual([len(u.asked) for u in us], [1, 1, 1])


class _TruncatingUDP(DatagramProtocol):
    """A UDP upstream that says TC to everything."""

    def datagramReceived(self, data, addr):
        qid = struct.unpack_from("!H", data)[0]
        qname = data[12:data.index(b"\x00", 12) + 1]
        self.transport.write(response(qname, dns.A, id=qid, tc=True), addr)


class _TCPAnswers(Int16StringReceiver):
    """A TCP upstream answering pipelined queries in reverse order of arrival."""

    def stringReceived(self, data):
        self.factory.received.append(data)
        qid = struct.unpack_from("!H", data)[0]
        qname = data[12:data.index(b"\x00", 12) + 1]
        many = [a("big.test", f"192.0.2.{i}") for i in range(40)]
        self.factory.pending.append(response(qname, dns.A, answers=many, id=qid))
        if len(self.factory.pending) >= self.factory.batch:
            for answer in reversed(self.factory.pending):
                self.sendString(answer)
            self.factory.pending = []


class TransportTests(unittest.TestCase):
    """Real sockets on 127.0.0.1."""

    def listen(self, batch: int = 1):
        factory = Factory.forProtocol(_TCPAnswers)
        factory.received, factory.pending, factory.batch = [], [], batch
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)
        port = tcp.getHost().port
        udp = reactor.listenUDP(port, _TruncatingUDP(), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        return factory, port

    @defer.inlineCallbacks
    def test_truncatedUDPRetriedOverTCP(self):
        factory, port = self.listen()
        upstream = Upstream(f"udp://127.0.0.1:{port}", reactor)
        self.addCleanup(upstream.close)
        data = yield upstream.exchange(*key("big.test"), timeout=5)
        self.assertEqual(len(up.decode(data).answers), 40)
        self.assertEqual(len(factory.received), 1)

    @defer.inlineCallbacks
    def test_tcpPipelinesOnOneConnection(self):
        factory, port = self.listen(batch=3)
        upstream = Upstream(f"tcp://127.0.0.1:{port}", reactor)
        self.addCleanup(upstream.close)
        answers = yield defer.gatherResults([upstream.exchange(*key(f"q{i}.test"), timeout=5)
                                             for i in range(3)])
        names = [up.decode(d).queries[0].name.name for d in answers]
        self.assertEqual(names, [b"q0.test", b"q1.test", b"q2.test"])
        self.assertEqual(len(factory.received), 3)

    @defer.inlineCallbacks
    def test_udpTimeout(self):
        silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        upstream = Upstream(f"udp://127.0.0.1:{silent.getHost().port}", reactor)
        with self.assertRaises(up.UpstreamError) as e:
            yield upstream.exchange(*key("x.test"), timeout=0.2)
        self.assertEqual(e.exception.reason, "timeout")

    @defer.inlineCallbacks
    def test_wrongIdIgnored(self):
        class Liar(DatagramProtocol):
            def datagramReceived(self, data, addr):
                qid = struct.unpack_from("!H", data)[0] ^ 1
                self.transport.write(response(b"\x01x\x04test\x00", dns.A, id=qid,
                                              answers=[a("x.test", "6.6.6.6")]), addr)

        liar = reactor.listenUDP(0, Liar(), interface="127.0.0.1")
        self.addCleanup(liar.stopListening)
        upstream = Upstream(f"udp://127.0.0.1:{liar.getHost().port}", reactor)
        with self.assertRaises(up.UpstreamError):
            yield upstream.exchange(*key("x.test"), timeout=0.3)
