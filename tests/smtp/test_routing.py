"""netsvc.smtp.routing: MX order and shuffling, implicit MX, null MX, failures; netsvc.dns.lookup."""

from __future__ import annotations

import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial import unittest

from netsvc.dns import lookup
from netsvc.dns.cache import Cache
from netsvc.dns.local import LocalData
from netsvc.dns.resolver import Resolver
from netsvc.smtp.routing import MXRouter, RoutingError, SmarthostRouter


def mx(pref: int, name: str) -> dns.RRHeader:
    return dns.RRHeader(b"x", dns.MX, payload=dns.Record_MX(pref, name.encode()))


def a(address: str) -> dns.RRHeader:
    return dns.RRHeader(b"x", dns.A, payload=dns.Record_A(address))


def aaaa(address: str) -> dns.RRHeader:
    return dns.RRHeader(b"x", dns.AAAA, payload=dns.Record_AAAA(address))


class FakeDNS:
    """(name, qtype) -> (rcode, records); anything else NXDOMAIN.  Records the questions."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.asked: list[tuple[str, int]] = []

    def __call__(self, name: str, qtype: int) -> defer.Deferred:
        self.asked.append((name, qtype))
        return defer.succeed(self.data.get((name, qtype), (dns.ENAME, [])))


def route(router: MXRouter, domain: str):
    d = router.route(domain)
    results: list = []
    d.addBoth(results.append)
    return results[0]


class MXRouterTests(unittest.TestCase):
    def test_lowestPreferenceFirstThenAddresses(self) -> None:
        fake = FakeDNS({
            ("example.org", dns.MX): (dns.OK, [mx(20, "b.example.org"), mx(10, "a.example.org")]),
            ("a.example.org", dns.A): (dns.OK, [a("192.0.2.1")]),
            ("a.example.org", dns.AAAA): (dns.OK, [aaaa("2001:db8::1")]),
            ("b.example.org", dns.A): (dns.OK, [a("192.0.2.2")]),
            ("b.example.org", dns.AAAA): (dns.OK, []),
        })
        targets = route(MXRouter(fake, port=2525), "Example.ORG.")
        self.assertEqual([(t.host, t.address, t.port) for t in targets],
                         [("a.example.org", "192.0.2.1", 2525), ("a.example.org", "2001:db8::1", 2525),
                          ("b.example.org", "192.0.2.2", 2525)])

    def test_equalPreferencesShuffled(self) -> None:
        records = [mx(10, f"h{i}.example.org") for i in range(4)] + [mx(5, "first.example.org")]
        data = {("example.org", dns.MX): (dns.OK, records)}
        for i in range(4):
            data[(f"h{i}.example.org", dns.A)] = (dns.OK, [a(f"192.0.2.{i + 1}")])
        data[("first.example.org", dns.A)] = (dns.OK, [a("192.0.2.100")])
        orders = set()
        for seed in range(30):
            targets = route(MXRouter(FakeDNS(data), rng=random.Random(seed)), "example.org")
            self.assertEqual(targets[0].host, "first.example.org")
            orders.add(tuple(t.host for t in targets[1:]))
        self.assertGreater(len(orders), 3)

    def test_noMXFallsBackToAddress(self) -> None:
        fake = FakeDNS({("example.org", dns.MX): (dns.OK, []),
                        ("example.org", dns.A): (dns.OK, [a("192.0.2.9")])})
        targets = route(MXRouter(fake), "example.org")
        self.assertEqual([(t.host, t.address, t.port) for t in targets], [("example.org", "192.0.2.9", 25)])

    def test_nullMXIsPermanent(self) -> None:
        fake = FakeDNS({("example.org", dns.MX): (dns.OK, [mx(0, "")])})
        result = route(MXRouter(fake), "example.org")
        self.assertIsInstance(result.value, RoutingError)
        self.assertEqual(result.value.status, "5.1.10")
        self.assertTrue(result.value.permanent)
        self.assertEqual(fake.asked, [("example.org", dns.MX)])  # no address lookups

    def test_nxdomainIsPermanent(self) -> None:
        result = route(MXRouter(FakeDNS({})), "nowhere.example")
        self.assertTrue(result.value.permanent)
        self.assertEqual(result.value.status, "5.1.2")

    def test_servfailIsTemporary(self) -> None:
        result = route(MXRouter(FakeDNS({("example.org", dns.MX): (dns.ESERVER, [])})), "example.org")
        self.assertFalse(result.value.permanent)

    def test_mxHostsWithoutAddressesTemporary(self) -> None:
        fake = FakeDNS({("example.org", dns.MX): (dns.OK, [mx(10, "gone.example.org")]),
                        ("gone.example.org", dns.A): (dns.ESERVER, [])})
        self.assertFalse(route(MXRouter(fake), "example.org").value.permanent)

    def test_noMXNoAddressPermanent(self) -> None:
        fake = FakeDNS({("example.org", dns.MX): (dns.OK, []), ("example.org", dns.A): (dns.OK, [])})
        self.assertEqual(route(MXRouter(fake), "example.org").value.status, "5.4.4")

    def test_ourselvesAndWorseDropped(self) -> None:
        fake = FakeDNS({
            ("example.org", dns.MX): (dns.OK, [mx(10, "primary.example.org"), mx(20, "mail.lab"),
                                                 mx(30, "tertiary.example.org")]),
            ("primary.example.org", dns.A): (dns.OK, [a("192.0.2.1")]),
            ("tertiary.example.org", dns.A): (dns.OK, [a("192.0.2.3")]),
        })
        targets = route(MXRouter(fake, hostname="mail.lab"), "example.org")
        self.assertEqual([t.host for t in targets], ["primary.example.org"])
        loop = FakeDNS({("example.org", dns.MX): (dns.OK, [mx(10, "mail.lab")])})
        self.assertEqual(route(MXRouter(loop, hostname="mail.lab"), "example.org").value.status, "5.4.6")

    def test_addressLiteral(self) -> None:
        fake = FakeDNS({})
        targets = route(MXRouter(fake), "[192.0.2.7]")
        self.assertEqual((targets[0].address, targets[0].port), ("192.0.2.7", 25))
        self.assertEqual(route(MXRouter(fake), "[IPv6:2001:db8::7]")[0].address, "2001:db8::7")
        self.assertEqual(fake.asked, [])

    def test_addressLimit(self) -> None:
        fake = FakeDNS({("example.org", dns.MX): (dns.OK, [mx(10, "m.example.org")]),
                        ("m.example.org", dns.A): (dns.OK, [a(f"192.0.2.{i}") for i in range(1, 9)])})
        self.assertEqual(len(route(MXRouter(fake, maxAddresses=3), "example.org")), 3)


class SmarthostRouterTests(unittest.TestCase):
    def test_oneTarget(self) -> None:
        router = SmarthostRouter("tls:host=smtp.example:port=465")
        (t,) = route(router, "anything.example")
        self.assertEqual((t.host, t.port, t.tls), ("smtp.example", 465, True))
        (t,) = route(SmarthostRouter("tcp:host=127.0.0.1:port=2525"), "x.example")
        self.assertFalse(t.tls)


class LookupTests(unittest.TestCase):
    """netsvc.dns.lookup.query through a real Resolver's local data (no upstream is reached)."""

    def resolver(self, records) -> Resolver:
        clock = Clock()
        clock.advance(1000)

        class NoUpstreams:
            def query(self, *key):
                return defer.fail(RuntimeError("no upstream in this test"))

            def close(self):
                pass

        local = LocalData(records, [], None, 60)
        return Resolver(local, Cache(clock), NoUpstreams(), clock=clock)

    def test_mxFromLocalData(self) -> None:
        resolver = self.resolver([("lab", "MX", "10 mail.lab", 300), ("mail.lab", "A", "127.0.0.1", 300)])
        results: list = []
        lookup.query(resolver, "lab", dns.MX).addCallback(results.append)
        rcode, records = results[0]
        self.assertEqual(rcode, dns.OK)
        self.assertEqual([(r.payload.preference, r.payload.name.name) for r in records], [(10, b"mail.lab")])
        router = MXRouter(lambda n, t: lookup.query(resolver, n, t), port=2525)
        (target,) = route(router, "lab")
        self.assertEqual((target.host, target.address), ("mail.lab", "127.0.0.1"))

    def test_upstreamFailureIsServfail(self) -> None:
        resolver = self.resolver([("lab", "A", "127.0.0.1", 300)])
        results: list = []
        lookup.query(resolver, "elsewhere.example", dns.MX).addCallback(results.append)
        self.assertEqual(results[0][0], dns.ESERVER)
        self.assertFalse(route(MXRouter(lambda n, t: lookup.query(resolver, n, t)),
                               "elsewhere.example").value.permanent)

    def test_badNameIsNXDOMAIN(self) -> None:
        results: list = []
        lookup.query(self.resolver([]), "a..b", dns.MX).addCallback(results.append)
        self.assertEqual(results[0], (dns.ENAME, []))

    def test_resolverForWithoutDNSService(self) -> None:
        from netsvc.config import parse
        from netsvc.runtime import Context

        context = Context(parse("services: {}\n"), reactor=Clock())
        first = lookup.resolverFor(context)
        self.assertIs(lookup.resolverFor(context), first)
        self.assertTrue(first.upstreams.upstreams)
