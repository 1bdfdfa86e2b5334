"""
Listening sockets shared by worker processes.

The parent binds; workers adopt (C{reactor.adoptStreamPort} /
C{adoptDatagramPort}).  Why the parent binds everything rather than each worker
binding its own SO_REUSEPORT socket: port 0 then means one port for all
workers, privileged ports and unix paths are bound once, a bind error is one
clear startup error in the parent, and a restarted worker gets back exactly
the socket its predecessor had.

Why one socket per worker (SO_REUSEPORT group) for TCP and UDP rather than one
socket shared by all: with one shared accept queue every worker is woken for
each connection and Twisted's C{Port.doRead} accepts up to 100 connections per
wake-up, so a burst of new connections lands on whichever worker woke first;
SO_REUSEPORT makes the kernel spread connections (and datagrams) evenly over
the workers' sockets by a hash of the peer's address.  The cost: while a dead
worker is being restarted, connections hashed to its socket wait in its accept
queue (the parent keeps the socket open) instead of going to another worker.
Unix sockets have no such balancing on Linux, so a unix listener is one socket
shared by every worker.  Where SO_REUSEPORT is missing (not Linux/BSD), every
listener is one shared socket.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger

from netsvc.endpoints import UDPServerEndpoint
from netsvc.schema import Problem
from netsvc.workers import affinity

REUSEPORT = getattr(socket, "SO_REUSEPORT", None)

log = Logger()


class Bound:
    """One listener bound by the parent: its socket for each worker (the same one, when shared)."""

    def __init__(self, key: str, description: str, kind: str, family: int, sockets: list[socket.socket]) -> None:
        self.key = key
        self.description = description
        self.kind = kind  # "stream" or "datagram"
        self.family = family
        self.sockets = sockets
        #: Whether a steering program (netsvc.workers.affinity) chooses among the sockets.
        self.steered = False

    def socketFor(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    @property
    def address(self) -> dict[str, Any]:
        """Like L{netsvc.runtime.ListenerService.address}: for logs and status.json."""
        out: dict[str, Any] = {"key": self.key, "endpoint": self.description}
        name = self.sockets[0].getsockname()
        if self.family == socket.AF_UNIX:
            out.update(type="UNIX", path=name.decode() if isinstance(name, bytes) else name)
        else:
            out.update(type="TCP" if self.kind == "stream" else "UDP", host=name[0], port=name[1])
        return out

    def close(self) -> None:
        for s in {id(s): s for s in self.sockets}.values():
            s.close()


def describeEndpoint(endpoint: Any) -> tuple[str, dict[str, Any]]:
    """
    What to bind for one of our server endpoints: (kind, parameters), kind one of
    C{tcp}, C{unix}, C{udp}.  @raise ValueError: an endpoint a worker cannot adopt.
    """
    from netsvc.tls import TLSServerEndpoint

    if isinstance(endpoint, TLSServerEndpoint):
        endpoint = endpoint.endpoint
    if isinstance(endpoint, UDPServerEndpoint):
        return "udp", {"port": endpoint.port, "interface": endpoint.interface}
    if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint, endpoints.SSL4ServerEndpoint)):
        interface = endpoint._interface
        if isinstance(endpoint, endpoints.TCP6ServerEndpoint) and not interface:
            interface = "::"
        return "tcp", {"port": endpoint._port, "interface": interface, "backlog": endpoint._backlog}
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return "unix", {"path": endpoint._address, "mode": endpoint._mode, "backlog": endpoint._backlog}
    raise ValueError(f"{type(endpoint).__name__} cannot be adopted by a worker")


def bind(key: str, description: str, endpoint: Any, workers: int, configFile: str = "",
         steering: bytes | None = None) -> Bound:
    """
    Bind what C{endpoint} would listen on: C{workers} SO_REUSEPORT sockets for
    TCP/UDP (one if SO_REUSEPORT is missing), one socket for unix.  C{steering}:
    a program from L{netsvc.workers.affinity.program} choosing the worker's socket
    for each connection or datagram (None: the kernel's hash of the address).

    @raise netsvc.runtime.StartupError: it cannot be bound (naming C{key}).
    """
    from netsvc.runtime import StartupError

    try:
        kind, p = describeEndpoint(endpoint)
        if kind == "unix":
            return Bound(key, description, "stream", socket.AF_UNIX, [_bindUNIX(p["path"], p["mode"], p["backlog"])])
        family = socket.AF_INET6 if isIPv6Address(p["interface"]) else socket.AF_INET
        stream = kind == "tcp"
        count = workers if REUSEPORT is not None else 1
        sockets: list[socket.socket] = []
        port = p["port"]
        try:
            for _ in range(count):
                s = _bindInet(family, stream, p["interface"], port, p.get("backlog", 50))
                port = s.getsockname()[1]  # port 0: the others join the port the first one got
                sockets.append(s)
            steered = False
            if steering is not None and len(sockets) > 1:
                try:
                    affinity.attach(sockets[0], steering)  # the group's, whichever socket sets it
                    steered = True
                except OSError as e:  # an old kernel, a seccomp filter: the hash still spreads the load
                    log.warn("{key}: cannot steer connections by CPU ({error})", key=key,
                             error=e.strerror or str(e))
        except BaseException:
            for s in sockets:
                s.close()
            raise
        bound = Bound(key, description, "stream" if stream else "datagram", family, sockets)
        bound.steered = steered
        return bound
    except (OSError, ValueError) as e:
        reason = (getattr(e, "strerror", None) or str(e)).lower()
        raise StartupError([Problem(configFile, key, f"cannot listen on {description!r}: {reason}")]) from None


def _bindInet(family: int, stream: bool, interface: str, port: int, backlog: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
    try:
        if stream:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's own ports do
        if REUSEPORT is not None:
            s.setsockopt(socket.SOL_SOCKET, REUSEPORT, 1)
        # IPV6_V6ONLY is left to the system's default, as Twisted's own ports do: a tcp6: listener on
        # :: accepts IPv4 clients (or not) the same with workers: N as with workers: 1.
        s.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        if stream:
            s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _bindUNIX(path: str, mode: int, backlog: int) -> socket.socket:
    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(path)  # left by a process that is gone
        else:
            raise OSError(errno.EADDRINUSE, "address already in use (another process listens on it)")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, mode)
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class AdoptingEndpoint:
    """
    In a worker: stands in for a listener's endpoint and adopts the socket the
    parent passed (file descriptor C{fd}), with the same TLS wrapping the
    endpoint would have added.
    """

    def __init__(self, reactor: Any, original: Any, fd: int, family: int, kind: str) -> None:
        self.reactor = reactor
        self.original = original
        self.fd = fd
        self.family = family
        self.kind = kind

    def listen(self, target: Any) -> defer.Deferred:
        try:
            if self.kind == "datagram":
                maxPacketSize = getattr(self.original, "maxPacketSize", 65535)
                port = self.reactor.adoptDatagramPort(self.fd, self.family, target, maxPacketSize)
            else:
                port = self.reactor.adoptStreamPort(self.fd, self.family, self._wrap(target))
        except Exception:
            return defer.fail()
        os.close(self.fd)  # adopting duplicated it
        return defer.succeed(port)

    def _wrap(self, factory: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from netsvc.tls import TLSServerEndpoint
        from netsvc.tls.server import TLSFactory

        if isinstance(self.original, TLSServerEndpoint):
            return TLSFactory(self.original.creator, False, factory)
        if isinstance(self.original, endpoints.SSL4ServerEndpoint):
            return TLSMemoryBIOFactory(self.original._sslContextFactory, False, factory)
        return factory
