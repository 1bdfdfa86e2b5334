"""
Backends of a rule: choosing one (roundrobin, first, leastconn, random), failing
over on connect errors, active health checks, and their metrics.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from netsvc import endpoints
from netsvc.forward.settings import Health, unescape

log = Logger(namespace="netsvc.forward")


class RuleMetrics:
    """The metric children of one rule, bound once (hot paths add to C{.value})."""

    def __init__(self, registry: Any, rule: str) -> None:
        r = {"rule": rule}
        self.registry = registry
        self.rule = rule
        self.connections = registry.counter(
            "netsvc_forward_connections_total", "Connections accepted by a forwarding rule.", ["rule"]
        ).labels(**r)
        self.active = registry.gauge(
            "netsvc_forward_connections_active", "Forwarded connections open now.", ["rule"]
        ).labels(**r)
        self._refused = registry.counter(
            "netsvc_forward_refused_total",
            "Connections or datagrams a rule refused, by reason.",
            ["rule", "reason"],
        )
        self.bytesUp = registry.counter(
            "netsvc_forward_bytes_total", "Bytes forwarded (up: client to backend).", ["rule", "direction"]
        ).labels(rule=rule, direction="up")
        self.bytesDown = registry.counter(
            "netsvc_forward_bytes_total", "Bytes forwarded (up: client to backend).", ["rule", "direction"]
        ).labels(rule=rule, direction="down")
        self.associations = registry.gauge(
            "netsvc_forward_udp_associations", "UDP client associations open now.", ["rule"]
        ).labels(**r)

    def refused(self, reason: str) -> Any:
        return self._refused.labels(rule=self.rule, reason=reason)


class Backend:
    """
    One C{connect:} entry of a rule: where to connect, whether it is up, how
    many connections it has, and its metrics.
    """

    def __init__(self, spec: endpoints.ClientSpec, rule: str, registry: Any) -> None:
        self.spec = spec
        self.label = str(spec)
        self.up = True
        self.active = 0
        self._endpoint: Any = None
        labels = {"rule": rule, "backend": self.label}
        self.connections = registry.counter(
            "netsvc_forward_backend_connections_total", "Connections made to a backend.", ["rule", "backend"]
        ).labels(**labels)
        self.activeGauge = registry.gauge(
            "netsvc_forward_backend_active", "Connections open to a backend now.", ["rule", "backend"]
        ).labels(**labels)
        self.activeGauge.setFunction(lambda: self.active)
        self.failures = registry.counter(
            "netsvc_forward_backend_failures_total",
            "Failed connection attempts to a backend.",
            ["rule", "backend"],
        ).labels(**labels)
        self.upGauge = registry.gauge(
            "netsvc_forward_backend_up",
            "1 when the backend is up (health checks), else 0.",
            ["rule", "backend"],
        ).labels(**labels)
        self.upGauge.set(1)
        family = registry.counter(
            "netsvc_forward_backend_bytes_total",
            "Bytes forwarded to (up) and from (down) a backend.",
            ["rule", "backend", "direction"],
        )
        self.bytesUp = family.labels(direction="up", **labels)
        self.bytesDown = family.labels(direction="down", **labels)

    def setUp(self, up: bool) -> None:
        self.up = up
        self.upGauge.set(1 if up else 0)

    def connect(self, reactor: Any, proto: protocol.Protocol, timeout: float) -> defer.Deferred:
        """
        Connect C{proto} (a stream protocol) to this backend.  The Deferred fails
        if the connection cannot be made; success is for C{proto} to notice
        (C{connectionMade}, and C{handshakeCompleted} for TLS backends).
        """
        spec = self.spec
        if spec.kind == "tcp" and spec.isIPLiteral and not spec.bindAddress and ":" not in spec.host:
            # The hot path: no endpoint objects, no resolver (and no IPv6 concerns).
            d: defer.Deferred = defer.Deferred()
            reactor.connectTCP(
                spec.host,
                spec.port,
                _OneShot(proto, d),
                spec.timeout if spec.timeout is not None else timeout,
            )
            return d
        if self._endpoint is None:
            self._endpoint = endpoints.clientFromString(reactor, spec, timeout)
        factory = _OneShot(proto, None)
        return self._endpoint.connect(factory).addCallback(lambda _: proto)


class _OneShot(protocol.ClientFactory):
    """Hands one prepared protocol to a connection; C{d} fires when it connects or fails."""

    noisy = False

    def __init__(self, proto: protocol.Protocol, d: defer.Deferred | None) -> None:
        self.proto = proto
        self.d = d

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        if self.d is not None:
            d, self.d = self.d, None
            d.callback(self.proto)  # connected (the protocol hears of it in connectionMade)
        return self.proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.d is not None:
            d, self.d = self.d, None
            d.errback(reason)


class Pool:
    """
    The backends of one rule and the policy choosing between them.  L{candidates}
    yields the backends to try for one connection, in order, each at most once:
    the balancing choice first, then the others (failover).
    """

    def __init__(self, backends: list[Backend], balance: str, rng: random.Random | None = None) -> None:
        self.backends = backends
        self.balance = balance
        self._next = 0
        self._random = rng or random.Random()
        self.allDownLogged = False

    @property
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.up]

    def candidates(self) -> Iterator[Backend]:
        backends = self.backends
        if len(backends) == 1:  # the common case, without building lists
            return iter(backends if backends[0].up else ())
        up = self.healthy
        n = len(up)
        if not n:
            return iter(())
        if n == 1:
            return iter(up)
        if self.balance == "first":
            return iter(up)
        if self.balance == "random":
            start = self._random.randrange(n)
        elif self.balance == "leastconn":
            # The least loaded; ties go round robin so equal backends share the load.
            low = min(b.active for b in up)
            start = self._next % n
            for k in range(n):
                if up[(start + k) % n].active == low:
                    start = (start + k) % n
                    break
            self._next = start + 1
        else:  # roundrobin
            start = self._next % n
            self._next = start + 1
        first = up[start]
        rest = [b for b in up[start + 1 :] + up[:start]]
        if self.balance == "leastconn":
            rest.sort(key=lambda b: b.active)
        return iter([first] + rest)


# -- health checks -------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Probe(protocol.Protocol):
    """Connects, optionally sends and waits for an expected answer."""

    def __init__(self, send: bytes | None, expect: bytes | None, done: Callable[[str | None], None]) -> None:
        self.send = send
        self.expect = expect
        self.done = done
        self.received = b""
        self.tls = False
        self.inflight: set[Any] = set()

    def connectionMade(self) -> None:
        self.inflight.add(self.transport)
        self.tls = getattr(self.transport, "TLS", False) or hasattr(self.transport, "_tlsConnection")
        if not self.tls:
            self._ready()

    def handshakeCompleted(self) -> None:
        self._ready()

    def _ready(self) -> None:
        if self.send:
            self.transport.write(self.send)
        if not self.expect:
            self._finish(None)

    def dataReceived(self, data: bytes) -> None:
        if self.expect is None:
            return
        self.received = (self.received + data)[-65536:]
        if self.expect in self.received:
            self._finish(None)

    def connectionLost(self, reason: Failure) -> None:
        self._finish(f"closed before the check passed ({_why(reason)})")

    def _finish(self, problem: str | None) -> None:
        done, self.done = self.done, None  # type: ignore[assignment]
        if done is not None:
            done(problem)
            transport = self.transport
            if transport is not None and problem is None:
                transport.loseConnection()


class HealthChecker:
    """
    Checks every backend of a pool each C{interval}: a connection (with the TLS
    handshake for tls: backends), then C{send}/C{expect} if configured.  C{fall}
    consecutive failures mark a backend down, C{rise} successes mark it up.
    """

    def __init__(self, reactor: Any, pool: Pool, health: Health, timeout: float, rule: str) -> None:
        self.reactor = reactor
        self.pool = pool
        self.health = health
        self.timeout = float(health.timeout if health.timeout is not None else timeout)
        self.rule = rule
        self.send = unescape(health.send) if health.send else None
        self.expect = unescape(health.expect) if health.expect else None
        self._streak: dict[int, int] = {}  # backend index -> +successes / -failures in a row
        self._calls: list[Any] = []
        self._running = False
        self._inflight: set[Any] = set()

    def start(self) -> None:
        self._running = True
        for i, backend in enumerate(self.pool.backends):
            # Spread the first checks over the interval, so many backends do not all go at once.
            delay = self.health.interval * i / max(1, len(self.pool.backends))
            self._schedule(i, backend, delay)

    def stop(self) -> None:
        self._running = False
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        for transport in list(self._inflight):
            transport.abortConnection()

    def _schedule(self, i: int, backend: Backend, delay: float) -> None:
        if not self._running:
            return
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self.reactor.callLater(delay, self.check, i, backend))

    def check(self, i: int, backend: Backend) -> defer.Deferred:
        """One check of one backend; fires (never fails) when it is recorded."""
        result: defer.Deferred = defer.Deferred()
        timer = None

        def done(problem: str | None) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not result.called:
                result.callback(problem)

        probe = _Probe(self.send, self.expect, done)
        probe.inflight = self._inflight
        d = backend.connect(self.reactor, probe, self.timeout)

        d.addErrback(lambda f: done(_why(f)))
        timer = self.reactor.callLater(self.timeout, self._timedOut, probe, done)
        result.addCallback(self._record, i, backend, probe)
        return result

    def _timedOut(self, probe: _Probe, done: Callable[[str | None], None]) -> None:
        done(f"no answer within {self.timeout:g}s")
        if probe.transport is not None:
            probe.transport.abortConnection()

    def _record(self, problem: str | None, i: int, backend: Backend, probe: _Probe) -> None:
        if probe.transport is not None:
            self._inflight.discard(probe.transport)
            if problem is not None:
                probe.transport.abortConnection()
        streak = self._streak.get(i, 0)
        if problem is None:
            streak = streak + 1 if streak > 0 else 1
            if not backend.up and streak >= self.health.rise:
                backend.setUp(True)
                self.pool.allDownLogged = False
                log.info(
                    "forward {rule}: backend {backend} is up ({n} checks passed)",
                    rule=self.rule,
                    backend=backend.label,
                    n=streak,
                    event="backend_up",
                )
        else:
            streak = streak - 1 if streak < 0 else -1
            if backend.up and -streak >= self.health.fall:
                backend.setUp(False)
                log.warn(
                    "forward {rule}: backend {backend} is down ({n} checks failed, last: {problem})",
                    rule=self.rule,
                    backend=backend.label,
                    n=-streak,
                    problem=problem,
                    event="backend_down",
                )
                if not self.pool.healthy:
                    log.error(
                        "forward {rule}: no healthy backend; new connections are refused",
                        rule=self.rule,
                        event="no_backend",
                    )
        self._streak[i] = streak
        self._schedule(i, backend, self.health.interval)


def _why(f: Failure) -> str:
    """A short reason for logs: 'connection refused', 'certificate verify failed' ..."""
    value = f.value
    from OpenSSL import SSL

    if isinstance(value, SSL.Error):
        reasons = [r[2] for r in value.args[0] if isinstance(r, tuple) and len(r) == 3] if value.args else []
        return "TLS: " + (", ".join(reasons) or str(value))
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, (error.TimeoutError, defer.CancelledError)):
        return "timed out"
    if isinstance(value, error.ConnectionDone):
        return "closed"
    if isinstance(value, error.ConnectionLost):
        return "connection lost"
    if isinstance(value, error.DNSLookupError):
        return "name not found"
    text = str(value).strip().rstrip(".")
    return text or type(value).__name__


why = _why
