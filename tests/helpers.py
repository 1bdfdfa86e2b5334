"""Shared test helpers: a daemon on loopback port 0, and ways to talk to it."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory, Protocol

from netsvc import config
from netsvc.echo.client import EchoClient
from netsvc.runtime import buildDaemon


def startDaemon(testCase, yaml: str):
    """
    Build and start a daemon from YAML text (listeners on port 0), with state in
    a temporary folder; stopped at the end of the test.  Returns the daemon.
    """
    state = Path(testCase.mktemp()).absolute()
    settings = config.parse(f"state_dir: {state}\n" + yaml, "test.yaml")
    daemon = buildDaemon(settings, reactor, configFile="test.yaml")
    daemon.privilegedStartService()
    daemon.startService()
    testCase.addCleanup(lambda: daemon.stopService() if daemon.running else None)
    return daemon


def port(daemon, index: int = 0, service: str = "echo") -> int:
    """The port bound by listener C{index} of C{service}."""
    return daemon.getServiceNamed(service).listeners[index].port.getHost().port


def connectEcho(host: str, portNumber: int, tlsCreator=None) -> defer.Deferred:
    endpoint = endpoints.HostnameEndpoint(reactor, host.encode(), portNumber)
    if tlsCreator is not None:
        endpoint = endpoints.wrapClientTLS(tlsCreator, endpoint)
    return endpoints.connectProtocol(endpoint, EchoClient())


class Collector(Protocol):
    """Collects what arrives; C{closed} fires (with the reason's exception) at disconnection."""

    def __init__(self):
        self.data = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(reason.value)


def sleep(seconds: float) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(_sleep(seconds))


async def _sleep(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)


def freePort() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS retries truncated answers over TCP)."""
    import socket

    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            candidate = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", candidate))
                except OSError:
                    continue
                return candidate
    raise RuntimeError("no port free for both UDP and TCP")


def stateDir(daemon) -> Path:
    return Path(daemon.context.stateDir)


def loopbackAliasesWork() -> bool:
    """Whether this machine can use 127.0.0.2 as a source address (a second client address on loopback)."""
    import socket

    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


class Keeping(Factory):
    """A factory wrapper that keeps every protocol it builds, for a test to look at (C{.built})."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.built: list = []

    def buildProtocol(self, addr):
        p = self.factory.buildProtocol(addr)
        self.built.append(p)
        return p


def silentClient(rcvbuf: int = 16 * 1024):
    """A client protocol that never reads (reading paused at once, a small socket buffer); C{.received}."""
    import socket

    class Silent(Protocol):
        def __init__(self) -> None:
            self.received = bytearray()

        def connectionMade(self) -> None:
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.transport.pauseProducing()  # read nothing

        def dataReceived(self, data: bytes) -> None:
            self.received += data

    return Silent()


def unsentBytes(transport) -> int:
    """Output a TCP transport holds in user space (not yet taken by the socket)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def machineLock(testCase, name: str) -> None:
    """
    Hold, until C{testCase}'s cleanups have run, a lock that every test process on this machine
    shares (C{flock} on a file in the temporary folder): for tests that need a fixed resource --
    the shipped configuration's fixed ports, the few ports below 1024 -- while trial's workers
    (C{make test} runs one per CPU) run other tests at the same time.  Take it first, so that it is
    released after the test's own cleanups (a daemon stopped) have run.
    """
    fd = os.open(os.path.join(tempfile.gettempdir(), f"netsvc-tests-{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    testCase.addCleanup(os.close, fd)  # closing it releases the lock
