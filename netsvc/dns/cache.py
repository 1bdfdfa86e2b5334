"""
The answer cache: bounded, TTL-respecting, with RFC 2308 negative caching,
brief SERVFAIL caching, RFC 8767 serve-stale and prefetch of popular entries.

Entries are L{netsvc.dns.wire.Stored} response bytes keyed by
C{(lowercased question name wire bytes, qtype, qclass)}.  The cache decides
how long an answer lives (L{Cache.ttlPolicy}); it never talks to the network:
the resolver asks L{Cache.get} and acts on what it says (serve, prefetch).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

from twisted.names import dns

from netsvc.dns import wire

#: Without an SOA, RFC 2308 says a negative answer should not be cached; we keep it this long at most.
NEGATIVE_NO_SOA_TTL = 10
#: The TTL of answers served stale (RFC 8767 section 4 recommends 30 seconds).
STALE_ANSWER_TTL = 30


class Entry:
    """One cached answer.  C{expires}/C{staleUntil} are clock times; C{ttl} its clamped lifetime."""

    __slots__ = ("key", "stored", "expires", "staleUntil", "ttl", "hits", "kind", "refreshing", "staleRetry",
                 "prefetchAt")

    def __init__(self, key: Any, stored: wire.Stored, expires: float, staleUntil: float, ttl: int,
                 kind: str) -> None:
        self.key = key
        self.stored = stored
        self.expires = expires
        self.staleUntil = staleUntil
        self.ttl = ttl
        self.hits = 0
        self.kind = kind  # positive, negative, servfail
        self.refreshing = False
        #: Served stale after the upstreams failed: until then, serve stale without asking them.
        self.staleRetry = 0.0
        #: When a hit should start a refresh (the last 10% of the TTL; never for short TTLs or failures).
        self.prefetchAt = expires - ttl * 0.1 if kind == "positive" and ttl >= 10 else float("inf")


class Cache:
    """
    @param maxEntries: bound on entries (least recently used go first); 0 disables caching.
    @param minTTL/maxTTL: clamps for positive answers.
    @param negativeMaxTTL: cap for NXDOMAIN/NODATA lifetimes (SOA minimum otherwise).
    @param servfailTTL: how long a failure to resolve is remembered.
    @param staleTTL: how long past expiry an answer may be served when upstreams fail (0: never).
    @param prefetch: refresh entries hit at least C{prefetchHits} times in the last 10% of their TTL.
    """

    def __init__(self, clock: Any, maxEntries: int = 100_000, minTTL: int = 0, maxTTL: int = 86400,
                 negativeMaxTTL: int = 3600, servfailTTL: int = 5, staleTTL: int = 86400,
                 prefetch: bool = True, prefetchHits: int = 2) -> None:
        self.clock = clock
        self.maxEntries = maxEntries
        self.minTTL = minTTL
        self.maxTTL = maxTTL
        self.negativeMaxTTL = negativeMaxTTL
        self.servfailTTL = servfailTTL
        self.staleTTL = staleTTL
        self.prefetch = prefetch
        self.prefetchHits = prefetchHits
        self.entries: OrderedDict[Any, Entry] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Any, now: float) -> Entry | None:
        """A fresh entry for C{key} (counted as a hit), or None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            if now >= entry.staleUntil:
                del self.entries[key]
            return None
        entry.hits += 1
        return entry

    def wantsPrefetch(self, entry: Entry, now: float) -> bool:
        """Whether a hit on C{entry} should refresh it in the background now."""
        return (self.prefetch and now >= entry.prefetchAt and not entry.refreshing
                and entry.hits >= self.prefetchHits)

    def getStale(self, key: Any, now: float) -> Entry | None:
        """An expired answer still inside the serve-stale window (never a SERVFAIL)."""
        entry = self.entries.get(key)
        if entry is None or entry.kind == "servfail" or now >= entry.staleUntil:
            return None
        return entry

    def put(self, key: Any, stored: wire.Stored, ttl: int, kind: str, now: float) -> Entry:
        """Keep C{stored} for C{ttl} seconds (and the stale window after); evict LRU beyond the bound."""
        stale = self.staleTTL if kind != "servfail" else 0
        entry = Entry(key, stored, now + ttl, now + ttl + stale, ttl, kind)
        if self.maxEntries <= 0:
            return entry
        entries = self.entries
        if key in entries:
            del entries[key]
        entries[key] = entry
        while len(entries) > self.maxEntries:
            entries.popitem(last=False)
            self.evictions += 1
        return entry

    def touch(self, key: Any) -> None:
        """Mark C{key} recently used (the LRU order is only updated on stores and refreshes)."""
        if key in self.entries:
            self.entries.move_to_end(key)

    def clear(self) -> None:
        self.entries.clear()

    # -- how long an upstream answer lives

    def classify(self, data: bytes, parsed: tuple[int, list] | None = None) -> tuple[str, int]:
        """
        (kind, TTL) for an upstream response (bytes, structurally checked):
        C{positive} with the smallest answer TTL, clamped; C{negative} (NXDOMAIN or
        NODATA) with the SOA's min(TTL, minimum) capped at negativeMaxTTL (RFC
        2308 section 5); read straight from the wire, nothing decoded.
        """
        rcode = data[3] & 0xF
        an, ns = struct.unpack_from("!HH", data, 6)
        _, records = parsed or wire.recordOffsets(data)
        if rcode == wire.NOERROR and an:
            ttl = min(r[2] for r in records[:an])
            return "positive", self.clampPositive(ttl)
        for _start, typePos, ttl, end in records[an:an + ns]:
            if struct.unpack_from("!H", data, typePos)[0] == dns.SOA and end - typePos >= 10 + 22:
                minimum = struct.unpack_from("!I", data, end - 4)[0]
                return "negative", max(0, min(ttl, minimum, self.negativeMaxTTL))
        return "negative", min(NEGATIVE_NO_SOA_TTL, self.negativeMaxTTL)

    def clampPositive(self, ttl: int) -> int:
        return max(self.minTTL, min(ttl, self.maxTTL))

    def ttlFunction(self, kind: str, entryTTL: int):
        """How each record's TTL is rewritten when stored (see L{wire.store})."""
        if kind == "negative":
            # Every record of a negative answer (the SOA above all) says how long it may be cached.
            return lambda rtype, ttl, section: min(ttl, entryTTL) if section == 0 else entryTTL
        return lambda rtype, ttl, section: self.clampPositive(ttl)
