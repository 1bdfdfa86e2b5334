"""
The resolution pipeline, in order: local data (authoritative), the cache, the
upstreams (per-domain C{forward:} groups first).  Identical questions in flight
share one upstream query.  When every upstream fails, a stale answer is served
(RFC 8767) if there is one, otherwise SERVFAIL, remembered briefly.

L{Resolver.lookup} is the synchronous hot path (local data and cache hits);
L{Resolver.resolve} goes to the upstreams.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns

from netsvc.dns import wire
from netsvc.dns.cache import STALE_ANSWER_TTL, Cache
from netsvc.dns.local import LocalData
from netsvc.dns.upstream import UpstreamGroup

log = Logger()

#: Distinct questions waiting on upstreams at once (each holds a socket); beyond that, SERVFAIL at once.
MAX_INFLIGHT = 1000
#: After the upstreams failed and a stale answer was served, serve it without asking again for this long.
STALE_RECHECK = 30.0

_TYPE_LABELS = {dns.A: "A", dns.AAAA: "AAAA", dns.CNAME: "CNAME", dns.MX: "MX", dns.TXT: "TXT",
                dns.PTR: "PTR", dns.SRV: "SRV", dns.NS: "NS", dns.SOA: "SOA", dns.ALL_RECORDS: "ANY",
                65: "HTTPS", 64: "SVCB", 43: "DS", 48: "DNSKEY", 257: "CAA", 35: "NAPTR"}


def typeLabel(qtype: int) -> str:
    return _TYPE_LABELS.get(qtype, "other")


class DNSMetrics:
    """The DNS service's metrics, in the shared registry, bound once."""

    def __init__(self, registry: Any, service: str = "dns") -> None:
        s = {"service": service}
        self.service = service
        self._queries = registry.counter("netsvc_dns_queries_total",
                                         "DNS answers sent, by query type and rcode.",
                                         ["service", "qtype", "rcode"])
        self._bound: dict[tuple[int, int], Any] = {}
        self.cacheHits = registry.counter("netsvc_dns_cache_hits_total", "Answers from the cache.",
                                          ["service"]).labels(**s)
        self.cacheMisses = registry.counter("netsvc_dns_cache_misses_total", "Questions not in the cache.",
                                            ["service"]).labels(**s)
        self.localAnswers = registry.counter("netsvc_dns_local_answers_total",
                                             "Answers from local records, hosts files and the blocklist.",
                                             ["service"]).labels(**s)
        self.staleServed = registry.counter("netsvc_dns_stale_answers_total",
                                            "Expired answers served because every upstream failed "
                                            "(RFC 8767).",
                                            ["service"]).labels(**s)
        self.prefetches = registry.counter("netsvc_dns_prefetches_total",
                                           "Popular entries refreshed before they expired.",
                                           ["service"]).labels(**s)
        self.cacheSize = registry.gauge("netsvc_dns_cache_entries", "Entries in the DNS cache.",
                                        ["service"]).labels(**s)
        self._upstreamSeconds = registry.histogram("netsvc_dns_upstream_seconds",
                                                   "Upstream round-trip times of answered queries.",
                                                   ["service", "upstream"])
        self._latency: dict[str, Any] = {}
        self._upstreamFailures = registry.counter("netsvc_dns_upstream_failures_total",
                                                  "Failed upstream queries, by reason.",
                                                  ["service", "upstream", "reason"])

    def answered(self, qtype: int, rcode: int) -> None:
        self.counter(qtype, rcode).value += 1

    def counter(self, qtype: int, rcode: int) -> Any:
        """The C{netsvc_dns_queries_total} counter of answers of C{rcode} to C{qtype} queries."""
        counter = self._bound.get((qtype, rcode))
        if counter is None:
            counter = self._queries.labels(service=self.service, qtype=typeLabel(qtype),
                                           rcode=wire.RCODE_NAMES.get(rcode, str(rcode)))
            if len(self._bound) < 4096:
                self._bound[(qtype, rcode)] = counter
        return counter

    def upstreamAnswered(self, upstream: str, seconds: float) -> None:
        histogram = self._latency.get(upstream)
        if histogram is None:
            histogram = self._latency[upstream] = self._upstreamSeconds.labels(service=self.service,
                                                                               upstream=upstream)
        histogram.observe(seconds)

    def upstreamFailed(self, upstream: str, reason: str) -> None:
        self._upstreamFailures.labels(service=self.service, upstream=upstream, reason=reason).inc()


class StaleAnswer:
    """A cached answer served past its expiry, every TTL set to 30 s."""

    __slots__ = ("stored", "rcode", "aa")

    def __init__(self, stored: wire.Stored) -> None:
        self.stored = stored
        self.rcode = stored.rcode
        self.aa = False

    def render(self, query: wire.Query, now: float, fixedTTL: int | None = None) -> bytes:
        return self.stored.render(query, now, STALE_ANSWER_TTL)


def failure(key: tuple[bytes, int, int], rcode: int = wire.SERVFAIL) -> wire.Stored:
    """An answer with no records (SERVFAIL by default) for question C{key}."""
    return wire.Stored(rcode, False, (1, 0, 0, 0), struct.pack("!HH", key[1], key[2]), (), (), 0.0, True)


def domainToWire(domain: str) -> bytes:
    """C{corp.example} -> its lowercased wire form."""
    labels = [label for label in domain.strip().rstrip(".").lower().split(".") if label]
    return b"".join(bytes([len(label)]) + label.encode("idna") for label in labels) + b"\x00"


class Resolver:
    """
    @param forwards: domain (text) -> the group answering names under it.
    """

    def __init__(self, local: LocalData, cache: Cache, upstreams: UpstreamGroup,
                 forwards: dict[str, UpstreamGroup] | None = None, clock: Any = None,
                 metrics: DNSMetrics | None = None) -> None:
        self.local = local
        self.cache = cache
        self.upstreams = upstreams
        self.forwards = {domainToWire(d): g for d, g in (forwards or {}).items()}
        self.clock = clock
        self.metrics = metrics
        self.inflight: dict[Any, list[defer.Deferred]] = {}
        if metrics is not None:
            metrics.cacheSize.setFunction(lambda: len(self.cache))

    def groupFor(self, qname: bytes) -> UpstreamGroup:
        """The upstreams for C{qname} (lowercased wire form): the longest matching C{forward:} domain."""
        if self.forwards:
            pos = 0
            while True:
                group = self.forwards.get(qname[pos:])
                if group is not None:
                    return group
                if pos >= len(qname) or qname[pos] == 0:
                    break
                pos += qname[pos] + 1
        return self.upstreams

    def lookup(self, key: tuple[bytes, int, int], now: float) -> Any:
        """
        The answer for C{key} without waiting: local data, a fresh cache entry, or a
        stale one while upstreams are known to fail; None otherwise.  A hit on a
        popular entry about to expire starts its refresh.
        """
        local = self.local.lookup(key, now)
        if local is not None:
            if self.metrics is not None:
                self.metrics.localAnswers.value += 1
            return local
        cache = self.cache
        entry = cache.get(key, now)
        if entry is not None:
            if self.metrics is not None:
                self.metrics.cacheHits.value += 1
            if now >= entry.prefetchAt and cache.wantsPrefetch(entry, now):
                self.prefetch(entry)
            return entry.stored
        stale = cache.getStale(key, now)
        if stale is not None and getattr(stale, "staleRetry", 0) > now:
            if self.metrics is not None:
                self.metrics.staleServed.value += 1
            return StaleAnswer(stale.stored)
        return None

    def reusableUntil(self, key: tuple[bytes, int, int], answer: Any, now: float) -> tuple[float, Any] | None:
        """
        For how long the answer L{lookup} just gave for C{key} may be given again
        exactly as rendered now, without looking again: (until, its cache entry, or
        None for local data); None when it may not be (served stale, or not what
        local data or the cache hold).  Never past one second from now (so hit
        counts and prefetching still see every popular name at least once a
        second), the entry's expiry or prefetch time, or the next whole second of
        the answer's age (its TTLs count down by seconds).  Whoever keeps it must
        also check that local data has the same L{LocalData.generation} and that
        the cache still holds that entry (L{stillAnswers}).
        """
        if not isinstance(answer, wire.Stored):
            return None
        until = now + 1.0
        if self.local.lookup(key, now) is answer:
            entry = None
        else:
            entry = self.cache.entries.get(key)
            if entry is None or entry.stored is not answer:
                return None
            until = min(until, entry.expires)
            if self.cache.prefetch:
                until = min(until, entry.prefetchAt)
        if not answer.static:
            until = min(until, answer.stored + int(now - answer.stored) + 1)
        return (until, entry) if until > now else None

    def stillAnswers(self, key: tuple[bytes, int, int], entry: Any, localGeneration: int) -> bool:
        """Whether an answer L{reusableUntil} allowed (C{entry}: its cache entry or None) is still the one."""
        return self.local.generation == localGeneration and (entry is None or self.cache.entries.get(key) is entry)

    def prefetch(self, entry: Any) -> None:
        entry.refreshing = True
        if self.metrics is not None:
            self.metrics.prefetches.value += 1
        self.resolve(entry.key, miss=False).addErrback(lambda f: None)

    def resolve(self, key: tuple[bytes, int, int], miss: bool = True) -> defer.Deferred:
        """
        Ask the upstreams (sharing a question already in flight); fires with an
        answer, never fails.  C{miss}: count it as a cache miss (not for prefetches).
        """
        if miss and self.metrics is not None:
            self.metrics.cacheMisses.value += 1
        waiting = self.inflight.get(key)
        d: defer.Deferred = defer.Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        if len(self.inflight) >= MAX_INFLIGHT:
            return defer.succeed(failure(key))
        self.inflight[key] = [d]
        group = self.groupFor(key[0])
        q = defer.maybeDeferred(group.query, *key)
        q.addCallbacks(self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        q.addBoth(self._deliver, key)
        return d

    def _answered(self, result: tuple[bytes, Any], key: Any) -> Any:
        data, parsed = result
        now = self.clock.seconds()
        if data[3] & 0xF not in (wire.NOERROR, wire.NXDOMAIN):
            try:  # e.g. YXDOMAIN: passed on, not cached
                return wire.store(data, now, lambda t, ttl, s: ttl, parsed=parsed)
            except ValueError:
                return self._failed(None, key)
        kind, ttl = self.cache.classify(data, parsed)
        try:
            stored = wire.store(data, now, self.cache.ttlFunction(kind, ttl), parsed=parsed)
        except ValueError as e:
            log.debug("unusable upstream answer: {error}", error=str(e))
            return self._failed(None, key)
        self.cache.put(key, stored, ttl, kind, now)
        return stored

    def _failed(self, f: Any, key: Any) -> Any:
        now = self.clock.seconds()
        if f is not None:
            log.debug("no upstream answered {key}: {error}", key=key, error=str(f.value))
        stale = self.cache.getStale(key, now)
        if stale is not None:
            stale.staleRetry = now + STALE_RECHECK
            stale.refreshing = False
            if self.metrics is not None:
                self.metrics.staleServed.value += 1
            return StaleAnswer(stale.stored)
        answer = failure(key)
        if self.cache.servfailTTL > 0:
            self.cache.put(key, answer, int(self.cache.servfailTTL), "servfail", now)
        return answer

    def _deliver(self, answer: Any, key: Any) -> None:
        waiting = self.inflight.pop(key, [])
        if not isinstance(answer, (wire.Stored, StaleAnswer)):  # a bug; never leave clients waiting
            log.failure("resolving {key}", answer, key=key)
            answer = failure(key)
        for d in waiting:
            d.callback(answer)

    def close(self) -> None:
        self.upstreams.close()
        for g in self.forwards.values():
            g.close()
