"""
The pipeline with a fake clock and scripted upstreams: cache expiry, negative
caching, bounds, SERVFAIL caching, serve-stale, prefetch, coalescing, forward.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.names import dns
from twisted.trial import unittest

from netsvc.dns import wire
from netsvc.dns.cache import Cache
from netsvc.dns.resolver import StaleAnswer
from netsvc.metrics import Registry
from tests.dns._fakes import FakeUpstream, a, decode, key, makeResolver, query


def answerOf(answer, name: str = "www.test", qtype: int = dns.A, now: float = 0.0) -> dns.Message:
    return decode(answer.render(wire.parseQuery(query(name, qtype)), now))


class CacheTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.up = FakeUpstream("udp://192.0.2.1:53", self.clock,
                               {"www.test": [a("www.test", "192.0.2.80", 60)]})
        self.registry = Registry()

    def resolver(self, **cacheArgs):
        cache = Cache(self.clock, **cacheArgs)
        return makeResolver(self.clock, [self.up], cache=cache, registry=self.registry)

    def resolve(self, r, name="www.test", qtype=dns.A):
        """lookup, then resolve on a miss; the answer (the fakes answer at once)."""
        k = key(name, qtype)
        found = r.lookup(k, self.clock.seconds())
        if found is not None:
            return found
        return self.successResultOf(r.resolve(k))

    def test_hitUntilTTLThenMiss(self) -> None:
        r = self.resolver()
        self.resolve(r)
        self.clock.advance(30)
        answer = self.resolve(r)
        self.assertEqual(len(self.up.asked), 1)
        self.assertEqual(answerOf(answer, now=self.clock.seconds()).answers[0].ttl, 30)
        self.clock.advance(31)
        self.resolve(r)
        self.assertEqual(len(self.up.asked), 2)

    def test_ttlClamps(self) -> None:
        r = self.resolver(minTTL=120, maxTTL=3600)
        self.resolve(r)
        self.clock.advance(100)
        self.assertEqual(answerOf(self.resolve(r), now=100).answers[0].ttl, 20)
        self.assertEqual(len(self.up.asked), 1)
        self.up.zone["long.test"] = [a("long.test", "192.0.2.2", 999999)]
        answer = self.resolve(r, "long.test")
        self.assertEqual(answerOf(answer, "long.test", now=100).answers[0].ttl, 3600)

    def test_nxdomainCachedForSOAMinimum(self) -> None:
        self.up.zone["nx.test"] = 3
        r = self.resolver()
        answer = self.resolve(r, "nx.test")
        m = answerOf(answer, "nx.test")
        self.assertEqual(m.rCode, dns.ENAME)
        self.assertEqual(m.authority[0].ttl, 300)  # min(SOA TTL 3600, minimum 300)
        self.clock.advance(299)
        self.resolve(r, "nx.test")
        self.assertEqual(len(self.up.asked), 1)
        self.clock.advance(2)
        self.resolve(r, "nx.test")
        self.assertEqual(len(self.up.asked), 2)

    def test_nodataCachedAndCapped(self) -> None:
        r = self.resolver(negativeMaxTTL=100)
        m = answerOf(self.resolve(r, "www.test", dns.AAAA), qtype=dns.AAAA)
        self.assertEqual((m.rCode, m.answers), (dns.OK, []))
        self.assertEqual(m.authority[0].ttl, 100)
        self.clock.advance(99)
        self.resolve(r, "www.test", dns.AAAA)
        self.assertEqual(len(self.up.asked), 1)
        self.clock.advance(2)
        self.resolve(r, "www.test", dns.AAAA)
        self.assertEqual(len(self.up.asked), 2)

    def test_boundedLeastRecentlyStoredGoFirst(self) -> None:
        for i in range(5):
            self.up.zone[f"h{i}.test"] = [a(f"h{i}.test", f"192.0.2.{i}")]
        r = self.resolver(maxEntries=3)
        for i in range(5):
            self.resolve(r, f"h{i}.test")
        self.assertEqual(len(r.cache), 3)
        self.assertIsNone(r.cache.get(key("h0.test"), 0))
        self.assertIsNotNone(r.cache.get(key("h4.test"), 0))
        self.assertEqual(r.cache.evictions, 2)

    def test_servfailCachedBriefly(self) -> None:
        self.up.zone["broken.test"] = "timeout"
        r = self.resolver(servfailTTL=5)
        d = r.resolve(key("broken.test"))
        self.clock.advance(2)
        self.clock.advance(2)  # one retry: the only upstream is asked twice
        self.assertEqual(self.successResultOf(d).rcode, wire.SERVFAIL)
        asked = len(self.up.asked)
        self.assertEqual(r.lookup(key("broken.test"), self.clock.seconds()).rcode, wire.SERVFAIL)
        self.clock.advance(6)
        self.assertIsNone(r.lookup(key("broken.test"), self.clock.seconds()))
        self.assertEqual(len(self.up.asked), asked)

    def test_serveStaleWhenUpstreamsFail(self) -> None:
        r = self.resolver(staleTTL=3600)
        self.resolve(r)
        self.clock.advance(120)  # expired
        self.up.zone["www.test"] = "timeout"
        d = r.resolve(key("www.test"))
        self.clock.advance(2)
        self.clock.advance(2)
        answer = self.successResultOf(d)
        self.assertIsInstance(answer, StaleAnswer)
        m = answerOf(answer)
        self.assertEqual((m.rCode, m.answers[0].ttl), (dns.OK, 30))
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.80")
        # For a while after, stale is answered at once, without asking again.
        asked = len(self.up.asked)
        self.assertIsInstance(r.lookup(key("www.test"), self.clock.seconds()), StaleAnswer)
        self.assertEqual(len(self.up.asked), asked)
        self.assertEqual(r.metrics.staleServed.value, 2)

    def test_noStaleBeyondWindow(self) -> None:
        r = self.resolver(staleTTL=100)
        self.resolve(r)
        self.clock.advance(60 + 101)
        self.up.zone["www.test"] = 2  # SERVFAIL from upstream
        answer = self.successResultOf(r.resolve(key("www.test")))
        self.assertEqual(answer.rcode, wire.SERVFAIL)

    def test_prefetchPopularEntryNearExpiry(self) -> None:
        r = self.resolver()
        self.resolve(r)
        self.resolve(r)
        self.resolve(r)  # popular now
        self.assertEqual(len(self.up.asked), 1)
        self.clock.advance(55)  # 5 of 60 s left: under 10%
        answer = r.lookup(key("www.test"), self.clock.seconds())
        self.assertIsNotNone(answer)  # served from cache ...
        self.assertEqual(len(self.up.asked), 2)  # ... and refreshed in the background
        self.assertEqual(r.metrics.prefetches.value, 1)
        self.clock.advance(10)  # past the old expiry: the refreshed entry answers
        self.assertIsNotNone(r.lookup(key("www.test"), self.clock.seconds()))
        self.assertEqual(len(self.up.asked), 2)

    def test_noPrefetchWhenDisabledOrUnpopular(self) -> None:
        r = self.resolver(prefetch=False)
        for _ in range(3):
            self.resolve(r)
        self.clock.advance(55)
        r.lookup(key("www.test"), self.clock.seconds())
        self.assertEqual(len(self.up.asked), 1)

    def test_identicalQuestionsInFlightShareOneQuery(self) -> None:
        self.up.zone["slow.test"] = "hang"
        r = self.resolver()
        ds = [r.resolve(key("slow.test")) for _ in range(10)]
        self.assertEqual(len(self.up.asked), 1)
        self.up.hanging[0].callback(b"")  # malformed: fails over to the retry
        self.assertEqual(len(self.up.asked), 2)
        self.up.hanging[1].callback(__import__("tests.dns._fakes", fromlist=["response"]).response(
            key("slow.test")[0], dns.A, answers=[a("slow.test", "192.0.2.7")]))
        for d in ds:
            self.assertEqual(self.successResultOf(d).rcode, wire.NOERROR)

    def test_questionsInFlightBounded(self) -> None:
        from netsvc.dns import resolver as resolverModule

        self.patch(resolverModule, "MAX_INFLIGHT", 3)
        self.up.zone["*"] = "hang"
        r = self.resolver()
        waiting = [r.resolve(key(f"h{i}.test")) for i in range(3)]
        over = self.successResultOf(r.resolve(key("h4.test")))
        self.assertEqual(over.rcode, wire.SERVFAIL)
        self.assertIsNone(r.cache.get(key("h4.test"), 0))  # not remembered: it was us, not the upstream
        for d in waiting:
            self.assertNoResult(d)

    def test_metrics(self) -> None:
        r = self.resolver()
        self.resolve(r)
        self.resolve(r)
        text = self.registry.render()
        self.assertIn('netsvc_dns_cache_hits_total{service="dns"} 1', text)
        self.assertIn('netsvc_dns_cache_misses_total{service="dns"} 1', text)
        self.assertIn('netsvc_dns_cache_entries{service="dns"} 1', text)
        self.assertIn('netsvc_dns_upstream_seconds_count{service="dns",upstream="udp://192.0.2.1:53"} 1',
                      text)


class ForwardTests(unittest.TestCase):
    def test_longestDomainWins(self) -> None:
        clock = task.Clock()
        default = FakeUpstream("udp://192.0.2.1:53", clock, {"*": [a("x", "192.0.2.1")]})
        corp = FakeUpstream("udp://192.0.2.2:53", clock, {"*": [a("x", "192.0.2.2")]})
        lab = FakeUpstream("udp://192.0.2.3:53", clock, {"*": [a("x", "192.0.2.3")]})
        r = makeResolver(clock, [default], forwards={"corp.example": [corp], "lab.corp.example.": [lab]})
        for name in ("www.example", "corp.example", "a.corp.example", "b.lab.corp.example", "xcorp.example"):
            r.resolve(key(name))
        self.assertEqual(len(default.asked), 2)
        self.assertEqual([q[0] for q in corp.asked], [key("corp.example")[0], key("a.corp.example")[0]])
        self.assertEqual(len(lab.asked), 1)
