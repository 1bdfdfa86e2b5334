"""
What both relays of a stream rule share, below them and below L{netsvc.forward.rule}:
L{RelayBase} (idle check, running out of backends, log events), L{READ_SIZE},
L{address} and L{label}, and L{RuleHandle}, what a relay uses of its rule.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger, LogLevel

from netsvc.forward.balance import Backend, Pool, RuleMetrics
from netsvc.forward.settings import Rule
from netsvc.logs import wants

log = Logger(namespace="netsvc.forward")

#: Read size (and send-buffer bound) of plain transports once linked.
READ_SIZE = 256 * 1024


def address(addr: Any) -> tuple[str, int] | None:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    return (host, port) if host is not None and port is not None else None


def label(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "unix"
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


class RuleHandle(Protocol):
    """What a relay uses of its rule (L{netsvc.forward.rule.RuleRuntime}, which imports the relays)."""

    settings: Rule
    name: str
    reactor: Any
    metrics: RuleMetrics
    pool: Pool
    idleTimeouts: Any
    #: A bandwidth limit applies: the relay asks L{takeUp}/L{takeDown} how long to pause.
    limited: bool
    #: The connect deadline queue (L{netsvc.forward.deadlines.Deadlines}).
    deadlines: Any

    def permits(self, address: tuple[str, int] | None) -> bool: ...
    def noBackend(self) -> None: ...
    def opened(self, relay: RelayBase) -> None: ...
    def closed(self, relay: RelayBase) -> None: ...
    def takeUp(self, relay: RelayBase, n: int) -> float: ...
    def takeDown(self, relay: RelayBase, n: int) -> float: ...


class RelayBase:
    """
    What both relays (L{netsvc.forward.relay.Relay} and
    L{netsvc.forward.direct.DirectRelay}) share: the idle check of the rule's
    sweep, running out of backends, and the log events.
    """

    rule: RuleHandle
    guard: Any
    backend: Backend | None = None
    linked = False  # the backend connection is up
    reason: str | None = None
    source: tuple[str, int] | None = None
    _finished = False
    _lastError = ""  # why the last backend tried failed

    def abort(self, reason: str) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """The daemon stops: connections go on for drain_timeout, then the guard closes them."""

    def _closedAlready(self) -> bool:
        return self._finished

    def checkIdle(self, now: float) -> None:
        """Called by the rule's sweep every quarter of the idle timeout."""
        if self._closedAlready():
            return
        timeout = self.rule.settings.idle_timeout
        if not timeout:
            return
        total = self.up + self.down
        if total != self._lastTotal:
            self._lastTotal = total
            self._lastActive = now
        elif now - self._lastActive >= timeout:
            self.rule.idleTimeouts.value += 1
            self.abort(f"idle timeout ({timeout:g}s)")

    def _noBackendLeft(self) -> None:
        """No healthy backend, or every candidate failed: count it and say why (the caller closes)."""
        if self.backend is None:
            self.rule.noBackend()
            self.rule.metrics.refused("no_backend").value += 1
            self.reason = "no healthy backend"
        else:
            self.rule.metrics.refused("connect_failed").value += 1
            self.reason = f"no backend reachable (last: {self.backend.label}: {self._lastError})"

    def _connectFailedLog(self, backend: Backend, problem: str) -> None:
        backend.failures.value += 1
        log.info(
            "forward {rule}: backend {backend} failed for {client}: {problem}",
            rule=self.rule.name,
            backend=backend.label,
            client=label(self.source),
            problem=problem,
            event="connect_failed",
        )

    def _report(self) -> None:
        """The connection is over: leave the rule and the guard, log one event."""
        self._finished = True
        self.rule.closed(self)
        self.guard.closed(self)
        if not wants(LogLevel.info):
            return  # (building the event costs more than the rest of a short connection's close)
        duration = self.rule.reactor.seconds() - self.started
        log.info(
            "forward {rule}: {client} -> {backend} closed after {duration:.3f}s, "
            "{bytes_up} bytes up, {bytes_down} down ({reason})",
            rule=self.rule.name,
            client=label(self.source),
            backend=self.backend.label if self.backend and self.linked else "-",
            duration=duration,
            bytes_up=self.up,
            bytes_down=self.down,
            reason=self.reason or "closed",
            event="connection_closed",
        )
