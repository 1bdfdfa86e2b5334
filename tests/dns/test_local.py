"""Local data: static records, hosts files (re-read on change), automatic PTR, the blocklist."""

from __future__ import annotations

import os

from twisted.names import dns
from twisted.trial import unittest

from netsvc.dns import wire
from netsvc.dns.local import LocalData, makePayload, parseBlocklist
from tests.dns._fakes import decode, key, query

RECORDS = [
    ("printer.lab", "A", "10.0.0.7", 300),
    ("printer.lab", "AAAA", "fd00::7", 300),
    ("lab", "MX", "20 backup.lab", 300),
    ("lab", "MX", "10 mail.lab", 300),
    ("mail.lab", "A", "10.0.0.8", 300),
    ("www.lab", "CNAME", "web.lab", 60),
    ("web.lab", "CNAME", "printer.lab", 60),
    ("loop.lab", "CNAME", "loop.lab", 60),
    ("lab", "TXT", "v=spf1 -all", 300),
    ("_sip._udp.lab", "SRV", "0 5 5060 mail.lab", 300),
    ("10.0.0.99", "PTR", "explicit.lab", 300),
]


def ask(local: LocalData, name: str, qtype: int = dns.A) -> dns.Message | None:
    answer = local.lookup(key(name, qtype), 0)
    if answer is None:
        return None
    return decode(answer.render(wire.parseQuery(query(name, qtype)), 0))


class RecordTests(unittest.TestCase):
    def setUp(self) -> None:
        self.local = LocalData(RECORDS)

    def test_authoritativeAnswer(self) -> None:
        m = ask(self.local, "Printer.LAB")
        self.assertEqual((m.auth, m.rCode), (1, dns.OK))
        self.assertEqual(m.queries[0].name.name, b"Printer.LAB")
        self.assertEqual([(rr.payload.dottedQuad(), rr.ttl) for rr in m.answers], [("10.0.0.7", 300)])
        self.assertEqual(ask(self.local, "printer.lab", dns.AAAA).answers[0].payload.address,
                         dns.Record_AAAA("fd00::7").address)

    def test_mxWithAddresses(self) -> None:
        m = ask(self.local, "lab", dns.MX)
        self.assertEqual(sorted((rr.payload.preference, rr.payload.name.name) for rr in m.answers),
                         [(10, b"mail.lab"), (20, b"backup.lab")])
        self.assertEqual([rr.name.name for rr in m.additional], [b"mail.lab"])

    def test_cnameChainFollowed(self) -> None:
        m = ask(self.local, "www.lab")
        self.assertEqual([rr.type for rr in m.answers], [dns.CNAME, dns.CNAME, dns.A])

    def test_cnameLoopBounded(self) -> None:
        m = ask(self.local, "loop.lab")
        self.assertEqual([rr.type for rr in m.answers], [dns.CNAME])

    def test_nodataWithSOA(self) -> None:
        m = ask(self.local, "mail.lab", dns.AAAA)
        self.assertEqual((m.rCode, m.answers, m.auth), (dns.OK, [], 1))
        self.assertEqual(m.authority[0].type, dns.SOA)

    def test_txtAndSrv(self) -> None:
        self.assertEqual(ask(self.local, "lab", dns.TXT).answers[0].payload.data, [b"v=spf1 -all"])
        srv = ask(self.local, "_sip._udp.lab", dns.SRV).answers[0].payload
        self.assertEqual((srv.port, srv.target.name), (5060, b"mail.lab"))

    def test_automaticAndExplicitPTR(self) -> None:
        m = ask(self.local, "7.0.0.10.in-addr.arpa", dns.PTR)
        self.assertEqual(m.answers[0].payload.name.name, b"printer.lab")
        v6 = ask(self.local, "7." + "0." * 29 + "d.f.ip6.arpa", dns.PTR)
        self.assertEqual(v6.answers[0].payload.name.name, b"printer.lab")
        self.assertEqual(ask(self.local, "99.0.0.10.in-addr.arpa", dns.PTR).answers[0].payload.name.name,
                         b"explicit.lab")

    def test_otherNamesNotLocal(self) -> None:
        self.assertIsNone(ask(self.local, "example.com"))
        self.assertIsNone(ask(self.local, "nothere.lab"))

    def test_badValues(self) -> None:
        for rtype, value in [("A", "10.0.0.300"), ("AAAA", "10.0.0.1"), ("MX", "mail.lab"),
                             ("SRV", "1 2 mail.lab"), ("CNAME", "a..b")]:
            self.assertRaises(ValueError, makePayload, rtype, value, 60)


class HostsTests(unittest.TestCase):
    def write(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    def test_hostsAnsweredAndReReadOnChange(self) -> None:
        hosts = self.mktemp()
        self.write(hosts, "# comment\n127.0.0.1 localhost\n10.1.0.5 nas.home nas  # the NAS\n"
                          "::1 localhost\nbad line\n")
        local = LocalData(hostsFiles=[hosts], hostsTTL=42)
        m = ask(local, "nas.home")
        self.assertEqual((m.answers[0].payload.dottedQuad(), m.answers[0].ttl), ("10.1.0.5", 42))
        self.assertEqual(ask(local, "nas").answers[0].payload.dottedQuad(), "10.1.0.5")
        ptr = ask(local, "5.0.1.10.in-addr.arpa", dns.PTR)
        self.assertEqual(ptr.answers[0].payload.name.name, b"nas.home")
        self.assertEqual(len(ask(local, "localhost", dns.AAAA).answers), 1)
        self.assertFalse(local.reloadIfChanged())

        self.write(hosts, "10.1.0.6 nas.home\n")
        os.utime(hosts, ns=(1, 1))  # a different mtime, whatever the clock's resolution
        self.assertTrue(local.reloadIfChanged())
        self.assertEqual(ask(local, "nas.home").answers[0].payload.dottedQuad(), "10.1.0.6")
        self.assertIsNone(ask(local, "nas"))

    def test_missingHostsFileIsEmpty(self) -> None:
        local = LocalData(hostsFiles=[self.mktemp()])
        self.assertIsNone(ask(local, "anything"))


class BlocklistTests(unittest.TestCase):
    def test_blockedNamesAndSubdomainsNXDOMAIN(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("ads.example\n0.0.0.0 tracker.test  # hosts style\n# comment\n\n")
        local = LocalData(blocklist=path)
        for name in ("ads.example", "x.y.ads.example", "tracker.test"):
            m = ask(local, name, dns.AAAA)
            self.assertEqual((m.rCode, m.auth), (dns.ENAME, 1), name)
            self.assertEqual(m.authority[0].type, dns.SOA)
        self.assertIsNone(ask(local, "notads.example"))
        self.assertIsNone(ask(local, "example"))

    def test_parse(self) -> None:
        self.assertEqual(parseBlocklist("A.Example.\n127.0.0.1 localhost\n::1 b.test\n"),
                         {"a.example", "b.test"})
