"""The hot path's wire handling: query parsing rules and answers from stored bytes."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.names import dns
from twisted.trial import unittest

from netsvc.dns import wire
from tests.dns._fakes import a, decode, query, response, soa


class ParseQueryTests(unittest.TestCase):
    def test_plainQuery(self) -> None:
        q = wire.parseQuery(query("WWW.Example.com", dns.MX, id=77))
        self.assertEqual((q.id, q.qtype, q.qclass, q.edns, q.payload), (77, dns.MX, dns.IN, False, 512))
        self.assertEqual(q.qname, b"\x03WWW\x07Example\x03com\x00")
        self.assertEqual(q.key, (b"\x03www\x07example\x03com\x00", dns.MX, dns.IN))

    def test_ednsPayloadClampedToOurs(self) -> None:
        self.assertEqual(wire.parseQuery(query("a.b", edns=4096)).payload, wire.EDNS_PAYLOAD)
        self.assertEqual(wire.parseQuery(query("a.b", edns=100)).payload, 512)

    def assertBad(self, data: bytes, rcode: int | None) -> wire.BadQuery:
        e = self.assertRaises(wire.BadQuery, wire.parseQuery, data)
        self.assertEqual(e.rcode, rcode)
        return e

    def test_shortHeaderDropped(self) -> None:
        self.assertBad(b"\x00\x01\x00", None)

    def test_responsesDropped(self) -> None:
        self.assertBad(response(b"\x01a\x00", dns.A, id=3), None)

    def test_twoQuestionsFormerr(self) -> None:
        data = bytearray(query("a.b"))
        data[5] = 2
        self.assertBad(bytes(data), wire.FORMERR)

    def test_compressionPointerInQuestionFormerr(self) -> None:
        data = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
        self.assertBad(data, wire.FORMERR)

    def test_truncatedQuestionFormerr(self) -> None:
        self.assertBad(query("example.com")[:-3], wire.FORMERR)

    def test_trailingGarbageFormerr(self) -> None:
        self.assertBad(query("example.com") + b"xx", wire.FORMERR)

    def test_unknownOpcodeNotimp(self) -> None:
        data = bytearray(query("a.b"))
        data[2] |= 0x20  # opcode 4 (NOTIFY)
        self.assertBad(bytes(data), wire.NOTIMP)

    def test_zoneTransfersNotimp(self) -> None:
        e = self.assertBad(query("lab", dns.AXFR), wire.NOTIMP)
        self.assertEqual(decode(wire.errorResponse(e.query.id, e.query.flags, e.rcode, e.query)).rCode, 4)

    def test_ednsVersionBadvers(self) -> None:
        data = bytearray(query("a.b", edns=1232))
        data[-5] = 1  # version 1
        e = self.assertBad(bytes(data), wire.BADVERS)
        answer = decode(wire.errorResponse(e.query.id, e.query.flags, wire.BADVERS, e.query))
        opt = [rr for rr in answer.additional if rr.type == wire.OPT]
        self.assertEqual(opt[0].ttl >> 24, 1)  # extended rcode 16 = BADVERS

    def test_hugeCountsFormerr(self) -> None:
        data = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 65535) + b"\x01a\x00\x00\x01\x00\x01"
        self.assertBad(data, wire.FORMERR)

    def test_overlongNameFormerr(self) -> None:
        name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"
        data = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
        self.assertBad(data, wire.FORMERR)

    @settings(derandomize=True, max_examples=400, deadline=None)
    @given(st.binary(max_size=600))
    def test_fuzzedBytesNeverCrash(self, data: bytes) -> None:
        try:
            wire.parseQuery(data)
        except wire.BadQuery:
            pass

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
    def test_mutatedQueriesNeverCrash(self, position: int, junk: bytes) -> None:
        data = bytearray(query("www.example.com", edns=1232))
        position %= len(data)
        data[position:position + len(junk)] = junk
        try:
            wire.parseQuery(bytes(data))
        except wire.BadQuery as e:
            if e.query is not None:
                wire.errorResponse(e.query.id, e.query.flags, e.rcode or 1, e.query)


class StoredTests(unittest.TestCase):
    def store(self, data: bytes, now: float = 100.0) -> wire.Stored:
        return wire.store(data, now, lambda rtype, ttl, section: ttl)

    def test_renderPatchesIdFlagsCaseAndTTLs(self) -> None:
        up = response(b"\x03www\x07example\x03com\x00", dns.A,
                      answers=[a("www.example.com", "192.0.2.1", 300)])
        stored = self.store(up, now=100.0)
        q = wire.parseQuery(query("WwW.ExAmple.COM", id=4321))
        out = decode(stored.render(q, 110.5))
        self.assertEqual(out.id, 4321)
        self.assertEqual((out.answer, out.recDes, out.recAv, out.auth), (1, 1, 1, 0))
        self.assertEqual(out.queries[0].name.name, b"WwW.ExAmple.COM")
        self.assertEqual(out.answers[0].ttl, 290)
        self.assertEqual(out.answers[0].payload.dottedQuad(), "192.0.2.1")

    def test_optDroppedAndOursAddedForEdnsClients(self) -> None:
        m = dns._EDNSMessage(id=0, answer=1, maxSize=4096)
        m.queries = [dns.Query(b"a.test", dns.A)]
        m.answers = [a("a.test", "192.0.2.9")]
        stored = self.store(m.toStr())
        plain = decode(stored.render(wire.parseQuery(query("a.test")), 100))
        self.assertEqual(plain.additional, [])
        withEdns = decode(stored.render(wire.parseQuery(query("a.test", edns=1232)), 100))
        self.assertEqual([rr.type for rr in withEdns.additional], [wire.OPT])
        self.assertEqual(withEdns.additional[0].cls, wire.EDNS_PAYLOAD)

    def test_rdNotSetIsEchoed(self) -> None:
        stored = self.store(response(b"\x01a\x00", dns.A, answers=[a("a", "192.0.2.1")]))
        out = decode(stored.render(wire.parseQuery(query("a", rd=False)), 100))
        self.assertEqual((out.recDes, out.recAv), (0, 1))

    def test_ttlsNeverNegative(self) -> None:
        stored = self.store(response(b"\x01a\x00", dns.A, answers=[a("a", "192.0.2.1", 5)]))
        out = decode(stored.render(wire.parseQuery(query("a")), 1000))
        self.assertEqual(out.answers[0].ttl, 0)

    def test_negativeKeepsAuthority(self) -> None:
        stored = self.store(response(b"\x02nx\x04test\x00", dns.A, rcode=3, authority=[soa("test")]))
        out = decode(stored.render(wire.parseQuery(query("nx.test")), 100))
        self.assertEqual((out.rCode, len(out.authority)), (3, 1))

    def test_truncation(self) -> None:
        many = [a("big.test", f"192.0.2.{i}") for i in range(60)]
        stored = self.store(response(b"\x03big\x04test\x00", dns.A, answers=many))
        q = wire.parseQuery(query("big.test"))
        full = stored.render(q, 100)
        self.assertGreater(len(full), 512)
        small = decode(wire.fit(full, q, q.payload, stored.rcode, stored.aa))
        self.assertEqual((small.trunc, small.answers), (1, []))
        self.assertEqual(small.queries[0].name.name, b"big.test")


class CheckMessageTests(unittest.TestCase):
    """Upstream answers: well-formed, and nothing that could loop a client."""

    def test_compressedAnswersAccepted(self) -> None:
        mx = dns.RRHeader(b"lab", dns.MX, dns.IN, 60, dns.Record_MX(10, b"mail.lab"))
        data = response(b"\x03lab\x00", dns.MX, answers=[mx], authority=[soa("lab")],
                        additional=[a("mail.lab", "10.0.0.8")])
        qend, found = wire.checkMessage(data)
        self.assertEqual(len(found), 3)

    def test_compressionLoopRejected(self) -> None:
        good = response(b"\x01x\x04test\x00", dns.A, answers=[a("x.test", "192.0.2.1")])
        # The answer's owner name is a pointer; make it point at itself.
        qend, found = wire.recordOffsets(good)
        start = found[0][0]
        looped = bytearray(good)
        looped[start:start + 2] = bytes([0xC0 | (start >> 8), start & 0xFF])
        self.assertRaises(ValueError, wire.checkMessage, bytes(looped))

    def test_pointerLoopInsideCnameTargetRejected(self) -> None:
        cname = dns.RRHeader(b"x.test", dns.CNAME, dns.IN, 60, dns.Record_CNAME(b"y.test"))
        data = bytearray(response(b"\x01x\x04test\x00", dns.A, answers=[cname]))
        qend, found = wire.recordOffsets(bytes(data))
        rdata = found[0][1] + 10
        data[rdata:rdata + 2] = bytes([0xC0 | (rdata >> 8), rdata & 0xFF])  # a pointer to itself
        data = data[:rdata + 2]
        data[found[0][1] + 8:found[0][1] + 10] = b"\x00\x02"
        self.assertRaises(ValueError, wire.checkMessage, bytes(data))

    def test_queryWithPointerLoopInAdditionalIsBounded(self) -> None:
        # An additional record whose name points at itself: never followed, so no loop.
        data = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 1) + b"\x01a\x00\x00\x01\x00\x01"
        data += b"\xc0\x11" + struct.pack("!HHIH", 1, 1, 0, 0)
        q = wire.parseQuery(data)
        self.assertFalse(q.edns)

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(st.binary(max_size=400))
    def test_fuzzedAnswersNeverCrash(self, data: bytes) -> None:
        try:
            wire.checkMessage(data)
        except ValueError:
            pass
