"""
UDP rules: each client address gets its own association -- a socket connected
to one backend -- so answers find their way back.  Associations expire after
C{udp.idle_timeout} without traffic (or after C{udp.responses} answers), and
there are at most C{udp.max_associations} per listener: datagrams from new
clients beyond that are dropped and counted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

log = Logger(namespace="netsvc.forward")

#: Datagrams held for a new association while its backend's name resolves.
MAX_QUEUED = 32


class UDPForwarder(DatagramProtocol):
    """The listening socket of a UDP rule."""

    noisy = False

    def __init__(self, rule: Any, guard: Any) -> None:
        self.rule = rule  # swapped on reload; associations keep their own
        self.guard = guard
        self.associations: dict[tuple[str, int], Association] = {}

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        rule = self.rule
        if not self.guard.admitDatagram(addr[0], len(data)):
            return
        assoc = self.associations.get(addr)
        if assoc is None:
            if not rule.access.permits(addr[0]):
                rule.metrics.refused("acl").value += 1
                return
            if len(self.associations) >= rule.settings.udp.max_associations:
                rule.metrics.refused("max_associations").value += 1
                return
            backend = next(rule.pool.candidates(), None)
            if backend is None:
                rule.metrics.refused("no_backend").value += 1
                rule.noBackend()
                return
            assoc = self.associations[addr] = Association(self, rule, backend, addr)
            rule.metrics.connections.value += 1
            rule.metrics.associations.inc()
            assoc.open()
        assoc.send(data)

    def reply(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.transport.write(data, addr)
        except OSError:  # EAGAIN and the like: UDP may drop
            self.guard.metrics.error("send").value += 1
            return
        self.guard.metrics.bytesOut.value += len(data)

    def forget(self, assoc: Association) -> None:
        if self.associations.get(assoc.client) is assoc:
            del self.associations[assoc.client]
            assoc.rule.metrics.associations.dec()

    def stop(self) -> None:
        for assoc in list(self.associations.values()):
            assoc.close("shutdown")


class Association(DatagramProtocol):
    """One client's socket toward its backend."""

    noisy = False

    def __init__(self, forwarder: UDPForwarder, rule: Any, backend: Any, client: tuple[str, int]) -> None:
        self.forwarder = forwarder
        self.rule = rule
        self.backend = backend
        self.client = client
        self.reactor = rule.reactor
        self.port: Any = None
        self.queue: list[bytes] | None = []
        self.up = self.down = 0
        self.datagramsUp = self.datagramsDown = 0
        self.responses = 0
        self.closed = False
        self.started = self.reactor.seconds()
        self._lastTotal = -1
        self._lastActive = self.started
        self._timer: Any = None

    def open(self) -> None:
        spec = self.backend.spec
        host = spec.host
        self.backend.active += 1
        self.backend.connections.value += 1
        d = defer.succeed(host) if isIPAddress(host) or isIPv6Address(host) else self.reactor.resolve(host)
        d.addCallbacks(self._resolved, self._failed)
        self._timer = self.reactor.callLater(self._step(), self._checkIdle)

    def _resolved(self, address: str) -> None:
        if self.closed:
            return
        try:
            interface = "::" if ":" in address else ""
            self.port = self.reactor.listenUDP(0, self, interface=interface)
            self.port.connect(address, self.backend.spec.port)
        except Exception as e:  # noqa: BLE001 -- any socket error ends this association only
            self._failed(e)
            return
        queue, self.queue = self.queue or [], None
        for data in queue:
            self._write(data)

    def _failed(self, problem: Any) -> None:
        self.backend.failures.value += 1
        self.close(f"backend: {getattr(problem, 'value', problem)}")

    def send(self, data: bytes) -> None:
        if self.queue is not None:
            if len(self.queue) < MAX_QUEUED:
                self.queue.append(data)
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self.transport.write(data)
        except OSError:
            self.rule.metrics.refused("send_failed").value += 1
            return
        n = len(data)
        self.up += n
        self.datagramsUp += 1
        self.rule.metrics.bytesUp.value += n
        self.backend.bytesUp.value += n

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        n = len(data)
        self.down += n
        self.datagramsDown += 1
        self.rule.metrics.bytesDown.value += n
        self.backend.bytesDown.value += n
        self.forwarder.reply(data, self.client)
        limit = self.rule.settings.udp.responses
        if limit:
            self.responses += 1
            if self.responses >= limit:
                self.close("responses received")

    def connectionRefused(self) -> None:
        # ICMP port unreachable: the backend is not there.  Forget the association,
        # so that the client's next datagram tries (perhaps) another backend.
        self.backend.failures.value += 1
        self.close("backend: port unreachable")

    def _step(self) -> float:
        return max(0.01, self.rule.settings.udp.idle_timeout / 4)

    def _checkIdle(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.reactor.seconds()
        total = self.datagramsUp + self.datagramsDown
        if total != self._lastTotal:
            self._lastTotal, self._lastActive = total, now
        elif now - self._lastActive >= self.rule.settings.udp.idle_timeout:
            self.close("idle timeout")
            return
        self._timer = self.reactor.callLater(self._step(), self._checkIdle)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.backend.active -= 1
        self.forwarder.forget(self)
        if self.port is not None:
            self.port.stopListening()
        log.info(
            "forward {rule}: udp {client} -> {backend} closed after {duration:.3f}s, "
            "{bytes_up} bytes up, {bytes_down} down ({reason})",
            rule=self.rule.name,
            client=f"{self.client[0]}:{self.client[1]}",
            backend=self.backend.label,
            duration=self.reactor.seconds() - self.started,
            bytes_up=self.up,
            bytes_down=self.down,
            datagrams_up=self.datagramsUp,
            datagrams_down=self.datagramsDown,
            reason=reason,
            event="association_closed",
        )
