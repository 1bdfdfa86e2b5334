"""
Token buckets: L{RateLimiter} (one bucket per key, e.g. a client IP, in a
bounded table), L{TokenBucket} (one client's), and L{Bandwidth} (bytes per
second, that says how long to pause rather than refusing).  Clocks are passed in
(an C{IReactorTime}); nothing here imports from netsvc.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime


class RateLimiter:
    """
    One token bucket per key (a client IP): C{rate} tokens per second, holding
    at most C{burst}.  The table is bounded: when full, it is cleared (a reset
    only ever errs toward admitting).
    """

    def __init__(self, rate: float, burst: float, clock: IReactorTime, maxKeys: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.maxKeys = maxKeys
        self._buckets: dict[Any, list[float]] = {}

    def allow(self, key: Any, cost: float = 1.0) -> bool:
        """Take C{cost} tokens for C{key}; False when there are not enough."""
        if self.rate <= 0:
            return True
        now = self.clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.maxKeys:
                self._buckets.clear()
            bucket = self._buckets[key] = [self.burst, now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return True
        return False

    def refund(self, key: Any, cost: float = 1.0) -> None:
        """
        Give back C{cost} tokens taken by L{allow} (never above the burst).  The
        reserve-first pattern for failure limits: C{allow()} before the expensive
        check (so parallel attempts cannot all pass a check made before any of
        them failed), C{refund()} when it succeeded.
        """
        bucket = self._buckets.get(key)
        if self.rate > 0 and bucket is not None:
            bucket[0] = min(self.burst, bucket[0] + cost)

    def available(self, key: Any) -> float:
        """The tokens C{key} has now, without taking any (the burst for a new key or no limit)."""
        bucket = self._buckets.get(key)
        if self.rate <= 0 or bucket is None:
            return self.burst
        return min(self.burst, bucket[0] + (self.clock.seconds() - bucket[1]) * self.rate)


class TokenBucket:
    """One client's bucket: C{rate} tokens per second, holding at most C{burst}."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "clock")

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.stamp = clock.seconds()

    def take(self, cost: float = 1.0) -> bool:
        """Take C{cost} tokens; False (nothing taken) when there are not enough."""
        if self.rate <= 0:
            return True
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class Bandwidth:
    """
    A token bucket of bytes: C{rate} bytes per second, holding at most C{burst}
    (default: a quarter second's worth, at least 16 KiB).  Unlike L{RateLimiter}
    it never refuses: L{take} always succeeds and says how long the caller should
    stop reading so that the average stays at C{rate} (the bucket may go into
    debt by one read).  A rate of 0 means unlimited.
    """

    def __init__(self, rate: float, clock: IReactorTime, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.clock = clock
        self.burst = float(burst) if burst is not None else max(16384.0, self.rate / 4)
        self.tokens = self.burst
        self.stamp = clock.seconds()

    def take(self, size: int) -> float:
        """Spend C{size} bytes; return the seconds to wait before the next read (0: none)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - size
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
