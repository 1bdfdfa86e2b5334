"""
The UDP and TCP server protocols over fake transports: header rules, EDNS,
truncation, REFUSED for the access list and rate limit, FORMERR and drops for
malformed input (fuzzed), pipelined TCP answers.
"""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.names import dns
from twisted.trial import unittest

from netsvc.config import Limits
from netsvc.dns import protocol, wire
from netsvc.dns.local import LocalData
from netsvc.dns.protocol import DNSDatagramProtocol, DNSStreamFactory
from netsvc.dns.resolver import DNSMetrics, failure
from netsvc.policies import AccessList
from tests.dns._fakes import FakeDatagramTransport, FakeUpstream, a, decode, makeGuard, makeResolver, query

CLIENT = ("127.0.0.1", 40000)


class Setup:
    def build(self, limits: Limits | None = None, allow=(), deny=(), zone=None) -> None:
        self.clock = task.Clock()
        zone = zone if zone is not None else {
            "www.test": [a("www.test", "192.0.2.80")],
            "big.test": [a("big.test", f"192.0.2.{i}") for i in range(100)],
            "slow.test": "hang",
        }
        self.upstream = FakeUpstream("udp://192.0.2.1:53", self.clock, zone)
        self.local = LocalData([("printer.lab", "A", "10.0.0.7", 300)])
        self.resolver = makeResolver(self.clock, [self.upstream], local=self.local)
        self.guard = makeGuard(self.clock, limits, allow, deny)
        self.metrics = DNSMetrics(self.guard.metrics.registry)
        self.udp = DNSDatagramProtocol(self.resolver, self.guard, self.metrics)
        self.transport = FakeDatagramTransport()
        self.udp.makeConnection(self.transport)

    def send(self, data: bytes, client=CLIENT) -> dns.Message | None:
        before = len(self.transport.written)
        self.udp.datagramReceived(data, client)
        if len(self.transport.written) == before:
            return None
        answer, addr = self.transport.written[-1]
        self.assertEqual(addr, client)
        return decode(answer)


class DatagramTests(Setup, unittest.TestCase):
    def setUp(self) -> None:
        self.build()

    def test_forwardedAnswerHeaders(self) -> None:
        m = self.send(query("WWW.test", id=999))
        self.assertEqual((m.id, m.answer, m.recDes, m.recAv, m.auth, m.rCode), (999, 1, 1, 1, 0, dns.OK))
        self.assertEqual(m.queries[0].name.name, b"WWW.test")
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.80")

    def test_localAnswerIsAuthoritative(self) -> None:
        m = self.send(query("printer.lab", rd=False))
        self.assertEqual((m.auth, m.recDes, m.recAv), (1, 0, 1))

    def test_withoutRecursionDesiredOnlyCacheAndLocal(self) -> None:
        m = self.send(query("www.test", rd=False))
        self.assertEqual((m.rCode, m.recDes), (dns.EREFUSED, 0))
        self.assertEqual(self.upstream.asked, [])
        self.send(query("www.test"))
        m = self.send(query("www.test", rd=False))
        self.assertEqual((m.rCode, m.recDes, len(m.answers)), (dns.OK, 0, 1))

    def test_ednsAdvertised(self) -> None:
        self.send(query("www.test"))
        m = self.send(query("www.test", edns=4096))
        self.assertEqual([(rr.type, rr.cls) for rr in m.additional], [(wire.OPT, 1232)])

    def test_truncatedWithoutEdns(self) -> None:
        m = self.send(query("big.test"))
        self.assertEqual((m.trunc, m.answers), (1, []))
        data = self.transport.written[-1][0]
        self.assertLessEqual(len(data), 512)

    def test_fitsWithEdns(self) -> None:
        m = self.send(query("big.test", edns=1232))
        self.assertEqual((m.trunc, len(m.answers)), (1, 0))  # 100 A records > 1232 bytes
        self.upstream.zone["mid.test"] = [a("mid.test", f"192.0.2.{i}") for i in range(40)]
        m = self.send(query("mid.test", edns=1232))
        self.assertEqual((m.trunc, len(m.answers)), (0, 40))
        m = self.send(query("mid.test"))
        self.assertEqual(m.trunc, 1)

    def test_waitsForUpstream(self) -> None:
        self.assertIsNone(self.send(query("slow.test")))
        self.upstream.hanging[0].callback(
            __import__("tests.dns._fakes", fromlist=["response"]).response(
                b"\x04slow\x04test\x00", dns.A, answers=[a("slow.test", "192.0.2.5")]))
        m = decode(self.transport.written[-1][0])
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.5")

    def test_formerrKeepsId(self) -> None:
        data = bytearray(query("www.test", id=31337))
        data[5] = 3  # three questions
        m = self.send(bytes(data))
        self.assertEqual((m.id, m.rCode), (31337, dns.EFORMAT))

    def test_responsesAndRuntsDropped(self) -> None:
        self.assertIsNone(self.send(b"\x00\x01"))
        reply = bytearray(query("www.test"))
        reply[2] |= 0x80
        self.assertIsNone(self.send(bytes(reply)))

    def test_notimpForOtherOpcodes(self) -> None:
        data = bytearray(query("www.test"))
        data[2] |= 0x10  # opcode 2 (STATUS)
        self.assertEqual(self.send(bytes(data)).rCode, dns.ENOTIMP)

    def test_metricsByTypeAndRcode(self) -> None:
        self.send(query("www.test"))
        self.send(query("printer.lab"))
        text = self.guard.metrics.registry.render()
        self.assertIn('netsvc_dns_queries_total{service="dns",qtype="A",rcode="NOERROR"} 2', text)

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_fuzzNeverCrashesNorAnswersBig(self, data: bytes) -> None:
        before = len(self.transport.written)
        self.udp.datagramReceived(data, CLIENT)
        for answer, _ in self.transport.written[before:]:
            self.assertLessEqual(len(answer), 512 + 300)

    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(st.integers(0, 60), st.binary(min_size=1, max_size=6))
    def test_mutatedQueriesNeverCrash(self, position: int, junk: bytes) -> None:
        data = bytearray(query("www.test", edns=1232))
        position %= len(data)
        data[position:position + len(junk)] = junk
        self.udp.datagramReceived(bytes(data), CLIENT)


class AccessTests(Setup, unittest.TestCase):
    def test_aclRefused(self) -> None:
        self.build(allow=["10.0.0.0/8"])
        m = self.send(query("www.test", id=5))
        self.assertEqual((m.id, m.rCode), (5, dns.EREFUSED))
        self.assertEqual(self.upstream.asked, [])
        m = self.send(query("www.test"), client=("10.1.2.3", 5000))
        self.assertEqual(m.rCode, dns.OK)

    def test_denyWins(self) -> None:
        self.build(allow=["127.0.0.0/8"], deny=["127.0.0.1"])
        self.assertEqual(self.send(query("www.test")).rCode, dns.EREFUSED)

    def test_rateLimitRefusedPerClient(self) -> None:
        self.build(limits=Limits(rate=5, burst=5))
        codes = [self.send(query("printer.lab")).rCode for _ in range(8)]
        self.assertEqual(codes, [dns.OK] * 5 + [dns.EREFUSED] * 3)
        self.assertEqual(self.send(query("printer.lab"), client=("127.0.0.2", 1)).rCode, dns.OK)
        self.clock.advance(1)
        self.assertEqual(self.send(query("printer.lab")).rCode, dns.OK)
        text = self.guard.metrics.registry.render()
        self.assertIn('netsvc_connections_refused_total{service="dns",reason="rate"} 3', text)

    def test_oversizedDropped(self) -> None:
        self.build(limits=Limits(max_message=100))
        self.assertIsNone(self.send(query("www.test") + b"\x00" * 100))


class MemoTests(Setup, unittest.TestCase):
    """
    A question asked again is answered from the rendered-answer memo: the same
    bytes the full path would send (but the ID), only while they are still true.
    """

    def setUp(self) -> None:
        self.build()
        self.send(query("www.test"))  # from the upstream, now cached

    def fullPath(self, data: bytes) -> bytes:
        """What the full path answers to C{data} (the memo emptied first)."""
        self.udp._memo.clear()
        self.udp.datagramReceived(data, CLIENT)
        return self.transport.written[-1][0]

    def again(self, data: bytes) -> bytes:
        self.udp.datagramReceived(data, CLIENT)
        return self.transport.written[-1][0]

    def test_repeatedQuestionNotLookedUpAgain(self) -> None:
        first = self.fullPath(query("www.test", id=1))
        lookups = []
        original = self.resolver.lookup
        self.resolver.lookup = lambda *a: lookups.append(a) or original(*a)
        second = self.again(query("www.test", id=2))
        self.assertEqual(lookups, [])
        self.assertEqual(second[:2], b"\x00\x02")
        self.assertEqual(second[2:], first[2:])
        self.assertEqual(len(self.upstream.asked), 1)

    def test_eachQueryFormItsOwnAnswer(self) -> None:
        self.again(query("www.test"))
        m = self.send(query("www.test", rd=False))
        self.assertEqual((m.recDes, len(m.answers)), (0, 1))
        m = self.send(query("www.test", edns=1232))
        self.assertEqual([rr.type for rr in m.additional], [wire.OPT])
        m = self.send(query("WwW.test"))
        self.assertEqual(m.queries[0].name.name, b"WwW.test")

    def test_ttlCountsDown(self) -> None:
        self.again(query("www.test"))
        before = self.send(query("www.test")).answers[0].ttl
        self.clock.advance(1.5)
        after = self.send(query("www.test")).answers[0].ttl
        self.assertEqual(before - after, 1)
        self.assertEqual(self.again(query("www.test"))[2:], self.fullPath(query("www.test"))[2:])

    def test_replacedEntryReplacesMemo(self) -> None:
        self.again(query("www.test"))
        key = (b"\x03www\x04test\x00", dns.A, dns.IN)
        self.resolver.cache.put(key, failure(key), 5, "servfail", self.clock.seconds())
        self.assertEqual(decode(self.again(query("www.test"))).rCode, dns.ESERVER)

    def test_clearedCacheAsksUpstream(self) -> None:
        self.again(query("www.test"))
        self.resolver.cache.clear()
        self.again(query("www.test"))
        self.assertEqual(len(self.upstream.asked), 2)

    def test_expiredEntryNotServed(self) -> None:
        self.again(query("www.test"))
        self.clock.advance(301)
        self.again(query("www.test"))
        self.assertEqual(len(self.upstream.asked), 2)

    def test_accessListAndMetricsApply(self) -> None:
        hits = self.resolver.metrics.cacheHits.value
        self.again(query("www.test"))
        self.again(query("www.test"))
        self.assertEqual(self.resolver.metrics.cacheHits.value, hits + 2)
        self.guard.access = AccessList([], ["127.0.0.1"])  # as a SIGHUP would
        self.assertEqual(self.send(query("www.test")).rCode, dns.EREFUSED)
        text = self.guard.metrics.registry.render()
        self.assertIn('netsvc_dns_queries_total{service="dns",qtype="A",rcode="NOERROR"} 3', text)

    def test_localDataRebuiltReplacesMemo(self) -> None:
        hosts = Path(self.mktemp())
        hosts.write_text("10.0.0.1 nas.lab\n")
        blocklist = Path(self.mktemp())
        blocklist.write_text("")
        self.resolver.local = LocalData(hostsFiles=[str(hosts)], blocklist=str(blocklist))
        for _ in range(2):
            self.assertIn(bytes([10, 0, 0, 1]), self.again(query("nas.lab")))
        self.again(query("www.test"))  # cached, now in the memo too
        hosts.write_text("10.0.0.2 nas.lab\n")
        blocklist.write_text("www.test\n")
        self.resolver.local.reloadIfChanged(force=True)  # as the 2 s timer does: the same object
        self.assertIn(bytes([10, 0, 0, 2]), self.again(query("nas.lab")))
        self.assertEqual(decode(self.again(query("www.test"))).rCode, dns.ENAME)

    def test_bigQueriesNotKept(self) -> None:
        padded = bytearray(query("www.test", edns=1232))
        padded[-2:] = struct.pack("!H", 600)  # an OPT record with 600 bytes of option data
        padded += b"\x00\x0c" + struct.pack("!H", 596) + b"\x00" * 596  # one padding option (RFC 7830)
        self.assertEqual(self.send(bytes(padded)).rCode, dns.OK)
        self.assertEqual(self.udp._memo, {})

    def test_fullMemoLetsTheOldestGo(self) -> None:
        self.patch(protocol, "MEMO_MAX", 3)
        for i in range(5):
            self.send(query("www.test", id=i, edns=1232 - i))  # five spellings of one question
        self.assertEqual(len(self.udp._memo), 3)
        kept = [struct.unpack("!H", key[-8:-6])[0] for key in self.udp._memo]
        self.assertEqual(kept, [1230, 1229, 1228])

    def test_clockSetBackDropsMemo(self) -> None:
        self.again(query("www.test"))
        lookups = []
        original = self.resolver.lookup
        self.resolver.lookup = lambda *a: lookups.append(a) or original(*a)
        self.clock.rightNow -= 3600
        self.again(query("www.test"))
        self.assertEqual(len(lookups), 1)

    def test_notWithQueryLog(self) -> None:
        logged = DNSDatagramProtocol(self.resolver, self.guard, self.metrics, queryLog=True)
        logged.makeConnection(FakeDatagramTransport())
        logged.datagramReceived(query("www.test"), CLIENT)
        logged.datagramReceived(query("www.test"), CLIENT)
        self.assertIsNone(logged._memo)


class StreamTests(Setup, unittest.TestCase):
    def setUp(self) -> None:
        self.build()
        self.factory = DNSStreamFactory(self.resolver, self.guard, self.metrics)
        self.proto = self.factory.buildProtocol(None)
        self.stream = StringTransport()
        self.proto.makeConnection(self.stream)

    def answers(self) -> list[dns.Message]:
        data, out = self.stream.value(), []
        while len(data) >= 2:
            (n,) = struct.unpack("!H", data[:2])
            out.append(decode(data[2:2 + n]))
            data = data[2 + n:]
        return out

    def frame(self, data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    def test_pipelinedAnswersAsReady(self) -> None:
        self.proto.dataReceived(self.frame(query("slow.test", id=1)) + self.frame(query("www.test", id=2))
                                + self.frame(query("printer.lab", id=3))[:5])
        self.assertEqual([m.id for m in self.answers()], [2])
        self.proto.dataReceived(self.frame(query("printer.lab", id=3))[5:])
        self.upstream.hanging[0].callback(__import__("tests.dns._fakes", fromlist=["response"]).response(
            b"\x04slow\x04test\x00", dns.A, answers=[a("slow.test", "192.0.2.5")]))
        self.assertEqual([m.id for m in self.answers()], [2, 3, 1])

    def test_withoutRecursionDesiredMissRefused(self) -> None:
        self.proto.dataReceived(self.frame(query("www.test", id=9, rd=False)))
        self.assertEqual([(m.id, m.rCode) for m in self.answers()], [(9, dns.EREFUSED)])
        self.assertEqual(self.upstream.asked, [])

    def test_bigAnswersNotTruncatedOverTCP(self) -> None:
        self.proto.dataReceived(self.frame(query("big.test")))
        m = self.answers()[0]
        self.assertEqual((m.trunc, len(m.answers)), (0, 100))

    def test_idleTimeoutClosesThenAborts(self) -> None:
        self.proto.timedOut()
        self.assertTrue(self.stream.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.stream.disconnected)

    def test_garbageClosesOrFormerr(self) -> None:
        self.proto.dataReceived(self.frame(b"\x00\x07" + b"\x00" * 3))
        self.assertTrue(self.stream.disconnecting)

    def test_refusedConnectionSaysREFUSED(self) -> None:
        clock = task.Clock()
        refusing = self.factory.refusalProtocol("acl")
        refusing.clock = clock
        t = StringTransport()
        refusing.makeConnection(t)
        refusing.dataReceived(self.frame(query("www.test", id=77)))
        (n,) = struct.unpack("!H", t.value()[:2])
        m = decode(t.value()[2:2 + n])
        self.assertEqual((m.id, m.rCode), (77, dns.EREFUSED))
        self.assertTrue(t.disconnecting)
        self.assertIsNone(self.factory.refusalProtocol("max_connections"))


class StreamBackPressureTests(Setup, unittest.TestCase):
    """The stream protocol as its transport's producer (StringTransport has no real back-pressure)."""

    answers = StreamTests.answers
    frame = StreamTests.frame

    def setUp(self) -> None:
        self.build()
        self.setUp_stream()

    def test_registeredAsStreamingProducer(self) -> None:
        self.assertIs(self.stream.producer, self.proto)
        self.assertTrue(self.stream.streaming)

    def test_pausedAnswersNothingAndStopsReading(self) -> None:
        self.proto.pauseProducing()
        self.assertEqual(self.stream.producerState, "paused")
        self.proto.dataReceived(b"".join(self.frame(query("www.test", id=i)) for i in range(3)))
        self.assertEqual(self.stream.value(), b"")  # one read arrived after the pause: held, not answered
        self.proto.resumeProducing()
        self.assertEqual([m.id for m in self.answers()], [0, 1, 2])
        self.assertEqual(self.stream.producerState, "producing")

    def test_pauseDuringAWriteStopsAtOnce(self) -> None:
        """A transport pauses its producer from inside write(): the rest waits for the resume."""
        self.patch(protocol, "BATCH_MAX", 0)  # each answer written alone
        write = self.stream.write

        def pausingWrite(data: bytes) -> None:
            write(data)
            self.proto.pauseProducing()

        self.stream.write = pausingWrite
        self.proto.dataReceived(b"".join(self.frame(query("printer.lab", id=i)) for i in range(5)))
        self.assertEqual([m.id for m in self.answers()], [0])
        self.proto.resumeProducing()
        self.assertEqual([m.id for m in self.answers()], [0, 1])
        self.stream.write = write
        self.proto.resumeProducing()
        self.assertEqual([m.id for m in self.answers()], [0, 1, 2, 3, 4])

    def test_pendingUpstreamsStopReadingThenResume(self) -> None:
        limit = protocol.MAX_PENDING_PER_CONNECTION
        frames = b"".join(self.frame(query(f"h{i}.slow.test", id=i)) for i in range(limit + 3))
        self.upstream.zone.update({f"h{i}.slow.test": "hang" for i in range(limit + 3)})
        self.proto.dataReceived(frames)
        self.assertEqual((self.proto.pending, self.stream.producerState), (limit, "paused"))
        self.assertEqual(len(self.upstream.hanging), limit)
        from tests.dns._fakes import response
        d = self.upstream.hanging[0]
        d.callback(response(b"\x02h0\x04slow\x04test\x00", dns.A, answers=[a("h0.slow.test", "192.0.2.9")]))
        self.assertEqual([m.id for m in self.answers()], [0])
        self.assertEqual(self.proto.pending, limit)  # the next buffered query took its place
        self.assertEqual(self.stream.producerState, "paused")

    def test_answersToOneReadWrittenTogether(self) -> None:
        writes = []
        write = self.stream.write
        self.stream.write = lambda data: (writes.append(len(data)), write(data))
        self.proto.dataReceived(b"".join(self.frame(query("printer.lab", id=i)) for i in range(5)))
        self.assertEqual([m.id for m in self.answers()], [0, 1, 2, 3, 4])
        self.assertEqual(len(writes), 1)

    def test_lengthPrefixSplitAnywhere(self) -> None:
        data = b"".join(self.frame(query("printer.lab", id=i)) for i in range(4))
        for i in range(len(data)):
            self.proto.dataReceived(data[i:i + 1])
        self.assertEqual([m.id for m in self.answers()], [0, 1, 2, 3])
        self.assertEqual(self.proto._buffer, b"")

    def test_unparsedInputBounded(self) -> None:
        self.proto.pauseProducing()
        chunk = self.frame(query("printer.lab")) * 2000
        for _ in range(protocol.MAX_UNPARSED // len(chunk) + 1):
            if self.stream.disconnecting:
                break
            self.proto.dataReceived(chunk)
        self.assertTrue(self.stream.disconnecting)
        self.assertEqual(self.guard.metrics.limit("max_buffer").value, 1)
        self.assertEqual(self.proto._buffer, b"")

    def test_oversizedQueryClosesPerLimits(self) -> None:
        self.build(limits=Limits(max_message=512))
        self.setUp_stream()
        self.proto.dataReceived(struct.pack("!H", 513) + b"\x00" * 100)
        self.assertTrue(self.stream.disconnecting)
        self.assertIsNone(self.stream.producer)  # unregistered, or TLS would never close
        self.assertEqual(self.guard.metrics.limit("max_message").value, 1)

    def test_closeWhilePausedReadsAgain(self) -> None:
        """A connection closed while its reading was paused reads again: TLS must read the peer's
        close_notify to finish closing (else it lingers until the idle timeout)."""
        self.proto.pauseProducing()
        self.assertEqual(self.stream.producerState, "paused")
        self.proto.timedOut()
        self.assertTrue(self.stream.disconnecting)
        self.assertEqual(self.stream.producerState, "producing")

    def test_idleCloseUnregistersTheProducer(self) -> None:
        self.assertIs(self.stream.producer, self.proto)
        self.proto.timedOut()
        self.assertIsNone(self.stream.producer)

    def setUp_stream(self) -> None:
        self.factory = DNSStreamFactory(self.resolver, self.guard, self.metrics)
        self.proto = self.factory.buildProtocol(None)
        self.stream = StringTransport()
        self.proto.makeConnection(self.stream)
