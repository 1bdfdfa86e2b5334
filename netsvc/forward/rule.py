"""
One rule at run time: its settings, backends, health checks, limits and
metrics, and the factory its stream listeners use.  On reload a listener's
factory is pointed at the new L{RuleRuntime}; connections already open keep the
one they started with.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from netsvc import endpoints
from netsvc.forward.balance import Backend, HealthChecker, Pool, RuleMetrics
from netsvc.forward.base import RelayBase
from netsvc.forward.deadlines import Deadlines
from netsvc.forward.direct import DirectRelay
from netsvc.forward.relay import Relay
from netsvc.forward.settings import Rule
from netsvc.policies import AccessList, Bandwidth

log = Logger(namespace="netsvc.forward")

#: Whether rules may use the L{DirectRelay} (tests turn it off to exercise the Relay).
DIRECT = True


class RuleRuntime:
    """The live state of one rule (shared by all its listeners)."""

    def __init__(self, settings: Rule, reactor: Any, registry: Any, pool: Pool | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.reactor = reactor
        self.metrics = RuleMetrics(registry, settings.name)
        self.metrics.active.setFunction(lambda: len(self.connections))
        self.idleTimeouts = registry.counter(
            "netsvc_forward_idle_timeouts_total", "Connections closed by a rule's idle timeout.", ["rule"]
        ).labels(rule=settings.name)
        if pool is None:
            pool = Pool(
                [Backend(endpoints.parseClient(c), settings.name, registry) for c in settings.connect],
                settings.balance,
            )
        self.pool = pool
        self.access = AccessList(settings.allow, settings.deny)
        #: Who may send a PROXY header (an empty list trusts nobody, unlike an empty allow).
        self.proxySenders = AccessList(settings.trusted_proxies) if settings.trusted_proxies else None
        self.connections: set[Any] = set()
        bw = settings.bandwidth
        self.limited = bool(bw.per_connection or bw.per_rule)
        #: Plain TCP backends given as addresses, nothing to pace: the direct relay will do
        #: (on listeners where L{netsvc.forward.direct.adoptPort} succeeded).
        self.direct = DIRECT and not self.limited and all(
            b.spec.kind == "tcp" and b.spec.isIPLiteral for b in pool.backends
        )
        self.deadlines = Deadlines(reactor)
        self._ruleUp = Bandwidth(bw.per_rule, reactor)
        self._ruleDown = Bandwidth(bw.per_rule, reactor)
        self.checker: HealthChecker | None = None
        if settings.health is not None:
            self.checker = HealthChecker(reactor, pool, settings.health, settings.connect_timeout, self.name)
        self._sweep: Any = None
        self._running = False
        self._lastNoBackendLog = -1e9
        self._noBackendCount = 0
        self._lastUntrustedLog = -1e9
        self._untrustedCount = 0

    def start(self) -> None:
        self._running = True
        if self.checker is not None:
            self.checker.start()
        if self.connections and self.settings.idle_timeout and self._sweep is None:
            self._sweep = self.reactor.callLater(self._sweepStep(), self._sweepIdle)

    def stop(self) -> None:
        self._running = False
        self.deadlines.stop()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        if self.checker is not None:
            self.checker.stop()

    # -- admission

    def permits(self, address: tuple[str, int] | None) -> bool:
        return self.access.permits(address[0] if address else "unix")

    def trustsProxy(self, host: str) -> bool:
        """Whether C{host} (the real peer) may send a PROXY header (C{trusted_proxies}; unix peers: no)."""
        senders = self.proxySenders
        return senders is not None and host != "unix" and senders.permits(host)

    def noBackend(self) -> None:
        """A connection found no healthy backend: say so (at most every 10 s per rule)."""
        self._noBackendCount += 1
        now = self.reactor.seconds()
        if now - self._lastNoBackendLog >= 10:
            log.warn(
                "forward {rule}: no healthy backend; refused {count} connection(s)",
                rule=self.name,
                count=self._noBackendCount,
                event="no_backend",
            )
            self._lastNoBackendLog = now
            self._noBackendCount = 0

    def untrustedProxy(self, host: str) -> None:
        """A connection to a PROXY listener from outside trusted_proxies was refused: say so (every 10 s)."""
        self._untrustedCount += 1
        now = self.reactor.seconds()
        if now - self._lastUntrustedLog >= 10:
            log.warn(
                "forward {rule}: refused {count} connection(s) to a PROXY listener from senders not in "
                "trusted_proxies (latest: {client})",
                rule=self.name,
                count=self._untrustedCount,
                client=host,
                event="proxy_untrusted",
            )
            self._lastUntrustedLog = now
            self._untrustedCount = 0

    def opened(self, relay: RelayBase) -> None:
        self.connections.add(relay)
        if self._sweep is None and self.settings.idle_timeout and self._running:
            self._sweep = self.reactor.callLater(self._sweepStep(), self._sweepIdle)

    def _sweepStep(self) -> float:
        return max(0.01, self.settings.idle_timeout / 4)

    def _sweepIdle(self) -> None:
        """One timer per rule (not per connection) for idle timeouts."""
        self._sweep = None
        if not self.connections or not self._running:
            return
        now = self.reactor.seconds()
        for relay in list(self.connections):
            relay.checkIdle(now)
        if self.connections:
            self._sweep = self.reactor.callLater(self._sweepStep(), self._sweepIdle)

    def closed(self, relay: RelayBase) -> None:
        self.connections.discard(relay)

    # -- bandwidth

    def takeUp(self, relay: RelayBase, n: int) -> float:
        own = relay.__dict__.get("_bwUp")
        if own is None:
            own = relay._bwUp = Bandwidth(self.settings.bandwidth.per_connection, self.reactor)  # type: ignore[attr-defined]
        return max(own.take(n), self._ruleUp.take(n))

    def takeDown(self, relay: RelayBase, n: int) -> float:
        own = relay.__dict__.get("_bwDown")
        if own is None:
            own = relay._bwDown = Bandwidth(self.settings.bandwidth.per_connection, self.reactor)  # type: ignore[attr-defined]
        return max(own.take(n), self._ruleDown.take(n))


class RuleFactory(Factory):
    """
    Builds a L{Relay} per accepted connection, after the service's admission
    checks (its L{netsvc.policies.Guard}: draining, ACL, connection limits) and
    the rule's own.
    """

    noisy = False
    #: Set by L{netsvc.forward.direct.adoptPort}: our port hands its sockets to direct relays.
    direct = False

    def __init__(self, rule: RuleRuntime, acceptProxy: bool, guard: Any) -> None:
        self.rule = rule
        self.acceptProxy = acceptProxy
        self.guard = guard

    def buildProtocol(self, addr: Any) -> Relay | DirectRelay | None:
        # The service's Guard is used directly rather than through Guard.wrap: a
        # relay has its own idle timeout (both directions) and eager writes, and
        # the wrapper's per-connection layer costs a third of a connection's time.
        guard = self.guard
        host = getattr(addr, "host", None) or "unix"
        refusal = guard.refusal(host)
        if refusal is not None:
            guard.metrics.refused(refusal).value += 1
            return None
        rule = self.rule
        metrics = rule.metrics
        if len(rule.connections) >= rule.settings.max_connections:
            metrics.refused("max_connections").value += 1
            return None
        # The ACL sees the real peer first, PROXY header or not (a claimed address is
        # checked too, once read: see Relay.dataReceived).
        if not rule.access.permits(host):
            metrics.refused("acl").value += 1
            return None
        if self.acceptProxy and not rule.trustsProxy(host):
            # Only trusted_proxies may speak PROXY on this listener; anyone else would
            # choose the address the ACL, the logs and the backend see.
            metrics.refused("proxy_untrusted").value += 1
            rule.untrustedProxy(host)
            return None
        backends = rule.pool.backends
        if not (backends[0].up or any(b.up for b in backends)):
            metrics.refused("no_backend").value += 1
            rule.noBackend()
            return None
        metrics.connections.value += 1
        if self.direct and rule.direct and not self.acceptProxy:
            return DirectRelay(rule, addr, guard, host)
        return Relay(rule, addr, self.acceptProxy, guard, host)


def raiseFileLimit() -> None:
    """A forwarder needs two descriptors per connection: raise the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
