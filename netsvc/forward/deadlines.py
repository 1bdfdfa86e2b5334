"""
The connect deadlines of the direct relays of one rule: one timer for all the
attempts in flight instead of a C{callLater} per connection.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any


class Deadlines:
    """
    The connect deadlines of one rule: every attempt has the rule's timeout, so
    a FIFO queue is in deadline order and one timer serves them all (a backend
    with its own C{timeout=} is inserted in order).  Entries whose attempt has
    ended (connected, failed, closed) are dropped from the front as new ones come.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.queue: deque[tuple[float, Any, Any]] = deque()
        self.timer: Any = None
        self.stopped = False

    @staticmethod
    def _waiting(entry: tuple[float, Any, Any]) -> bool:
        relay = entry[1]
        return relay.server is entry[2] and not relay.connected and not relay._finished

    def add(self, relay: Any, timeout: float) -> None:
        queue = self.queue
        while queue and not self._waiting(queue[0]):
            queue.popleft()
        entry = (self.reactor.seconds() + timeout, relay, relay.server)
        if queue and entry[0] < queue[-1][0]:
            keys = [e[0] for e in queue]
            queue.insert(bisect.bisect(keys, entry[0]), entry)
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
        else:
            queue.append(entry)
        if self.timer is None:
            self._arm(self.reactor.seconds())

    def _arm(self, now: float) -> None:
        self.timer = self.reactor.callLater(max(0.0, self.queue[0][0] - now), self._expire)

    def _expire(self) -> None:
        self.timer = None
        queue = self.queue
        now = self.reactor.seconds()
        while queue:
            entry = queue[0]
            if self._waiting(entry):
                if entry[0] > now:
                    break
                queue.popleft()
                entry[1].connectTimedOut()
            else:
                queue.popleft()
        if queue and self.timer is None:  # (a failover may have armed it already)
            self._arm(now)

    def stop(self) -> None:
        """The rule is replaced or stopped: its attempts still in flight still time out."""
        self.stopped = True
        self.settle()

    def settle(self) -> None:
        """After a stop, cancel the timer once no attempt is left to time out."""
        if not self.stopped:
            return
        if not any(self._waiting(e) for e in self.queue):
            self.queue.clear()
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
