"""Backends and clients for the forwarding tests (all on 127.0.0.1, port 0)."""

from __future__ import annotations

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from zope.interface import implementer

from netsvc import config
from netsvc.echo.protocol import EchoFactory
from netsvc.forward.service import Settings
from tests.helpers import startDaemon


def forwardYAML(rules: str, extra: str = "") -> str:
    """services.forward with the given rules block (already indented by 6)."""
    return f"services:\n  forward:\n{extra}    rules:\n{rules}"


def startForwarder(testCase, rules: str, extra: str = ""):
    daemon = startDaemon(testCase, forwardYAML(rules, extra))
    return daemon, daemon.getServiceNamed("forward")


def fport(daemon, index: int = 0) -> int:
    return daemon.getServiceNamed("forward").listeners[index].port.getHost().port


def parseForward(testCase, rules: str, extra: str = "") -> Settings:
    return config.parse(forwardYAML(rules, extra), "test.yaml").services["forward"]


def listenTCP(testCase, factory) -> int:
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


def echoBackend(testCase) -> int:
    return listenTCP(testCase, EchoFactory())


class Named(protocol.Protocol):
    """Says its name, then echoes; closes on EOF."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.transport.write(self.factory.name)

    def dataReceived(self, data):
        self.factory.received += data
        self.transport.write(data)


def namedBackend(testCase, name: bytes):
    f = protocol.Factory.forProtocol(Named)
    f.name, f.connections, f.received = name, [], b""
    return listenTCP(testCase, f), f


@implementer(IHalfCloseableProtocol)
class Recorder(protocol.Protocol):
    """
    Records what arrives; on EOF answers C{factory.answer(data)} (if any) and
    closes.  C{factory.instances} lists the connections.
    """

    def __init__(self):
        self.buf = bytearray()
        self.eof = False
        self.closed = defer.Deferred()
        self.gotEOF = defer.Deferred()

    def connectionMade(self):
        self.factory.instances.append(self)
        greeting = getattr(self.factory, "greeting", None)
        if greeting is not None:
            self.transport.write(greeting)
            if getattr(self.factory, "halfCloseAfterGreeting", False):
                self.transport.loseWriteConnection()

    @property
    def data(self) -> bytes:
        return bytes(self.buf)

    def dataReceived(self, data):
        self.buf += data

    def readConnectionLost(self):
        self.eof = True
        answer = getattr(self.factory, "answer", None)
        if answer is not None:
            self.transport.write(answer(self.data))
        self.gotEOF.callback(self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.closed.callback(None)


def recorderBackend(testCase, **attrs):
    f = protocol.Factory.forProtocol(Recorder)
    f.instances = []
    for k, v in attrs.items():
        setattr(f, k, v)
    return listenTCP(testCase, f), f


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """A client that collects what arrives, and can half-close."""

    def __init__(self, halfOpen: bool = False):
        self._data = bytearray()
        self.closed = defer.Deferred()
        self.eof = defer.Deferred()
        self.waiters: list = []
        self.halfOpen = halfOpen  # keep sending after the server's EOF

    @property
    def data(self) -> bytes:
        return bytes(self._data)

    def dataReceived(self, data):
        self._data += data
        if not self.waiters:
            return
        for n, d in list(self.waiters):
            if len(self._data) >= n:
                self.waiters.remove((n, d))
                d.callback(self.data)

    def waitFor(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        if len(self._data) >= n:
            d.callback(self.data)
        else:
            self.waiters.append((n, d))
        return d

    def readConnectionLost(self):
        self.eof.callback(self.data)
        if not self.halfOpen:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.eof.called:
            self.eof.callback(self.data)
        self.closed.callback(self.data)


def connect(port: int, proto=None) -> defer.Deferred:
    proto = proto or Client()
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return endpoints.connectProtocol(ep, proto)


def freePort() -> int:
    """A port nothing listens on (bound and released; good enough on loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@implementer(IPushProducer)
class Firehose:
    """Writes chunks to a transport for as long as it is not paused, up to C{total} bytes."""

    def __init__(self, transport, total: int, chunk: int = 65536):
        self.transport = transport
        self.total = total
        self.sent = 0
        self.chunk = b"x" * chunk
        self.paused = False
        self.done = defer.Deferred()
        transport.registerProducer(self, True)
        reactor.callLater(0, self.resumeProducing)

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.sent < self.total:
            self.sent += len(self.chunk)
            self.transport.write(self.chunk)
        if self.sent >= self.total and not self.done.called:
            self.transport.unregisterProducer()
            self.done.callback(self.sent)

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True


def buffered(transport) -> int:
    """Bytes waiting in a Twisted transport's userland send buffer."""
    t = getattr(transport, "transport", transport)  # through the guard's wrapper
    return (
        len(getattr(t, "dataBuffer", b""))
        - getattr(t, "offset", 0)
        + sum(len(x) for x in getattr(t, "_tempDataBuffer", []))
    )


def relayBuffered(relay) -> int:
    """Bytes a forwarded connection holds in userland, both directions (either relay)."""
    if hasattr(relay, "side"):  # the Relay: its transports' send buffers
        return buffered(relay.transport) + buffered(relay.side.transport)
    return relay.buffered()


def relaySockets(relay) -> list:
    """The client-side and backend-side sockets of a forwarded connection (either relay)."""
    if hasattr(relay, "side"):
        return [relay.transport.getHandle(), relay.side.transport.getHandle()]
    return [relay.client.sock, relay.server.sock]


def metric(daemon, name: str, **labels) -> float:
    family = daemon.context.metrics.get(name)
    child = family.labels(**labels)
    return child.read() if hasattr(child, "read") else child.value
