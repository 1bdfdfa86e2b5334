"""
Back-pressure on DNS over TCP and TLS, over real loopback sockets: a client
that pipelines thousands of queries for a large answer and never reads cannot
make the server hold more than a small, bounded amount of output; once it
reads, it gets every answer, in order.  Other clients are answered meanwhile.
"""

from __future__ import annotations

import socket
import struct
import time

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.names import dns
from twisted.trial import unittest

from netsvc.tls import clientCreator
from tests.dns._fakes import query
from tests.dns.test_service import ask
from tests.helpers import freePort, port, sleep, startDaemon, stateDir

#: 50 TXT records of 240 bytes: a ~12.5 KB answer.
RECORDS = "".join(f"      - {{name: big.lab, type: TXT, value: \"{'x' * 236} {i:02d}\"}}\n" for i in range(50))
#: Queries pipelined by the hostile client: ~25 MB of answers if all were held.
PIPELINED = 2000
#: What the server may hold for it (its transport's buffer and TLS layers).
BOUND = 1 << 20


def yamlFor(p: int) -> str:
    return f"""
services:
  dns:
    listen: ["udp:{p}:interface=127.0.0.1", "tcp:{p}:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:9"]
    records:
      - {{name: printer.lab, type: A, value: 10.0.0.7}}
{RECORDS}"""


def rawSocket(transport) -> socket.socket:
    t = transport
    while not hasattr(t, "socket"):
        t = t.transport
    return t.socket


def held(conn) -> int:
    """Output the server holds in userland for one connection (its guard wrapper's transport)."""
    t, total = conn.transport, 0
    while t is not None:
        total += sum(len(x) for x in getattr(t, "_appSendBuffer", []))
        aggregator = getattr(t, "_aggregator", None)
        total += sum(len(x) for x in getattr(aggregator, "_buffer", []))
        if hasattr(t, "dataBuffer"):
            total += len(t.dataBuffer) - t.offset + t._tempDataLen
        t = getattr(t, "transport", None)
    return total


class Pipeliner(Protocol):
    """Writes what it is given; collects length-prefixed answers while reading."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answers: list[bytes] = []
        self.arrived: defer.Deferred | None = None
        self.want = 0

    def connectionMade(self) -> None:
        # (Not smaller: a window under loopback's 64 KB MSS stalls TCP itself.)
        rawSocket(self.transport).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (n,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + n:
                break
            self.answers.append(self.buffer[2:2 + n])
            self.buffer = self.buffer[2 + n:]
        if self.arrived is not None and len(self.answers) >= self.want:
            d, self.arrived = self.arrived, None
            d.callback(None)

    def waitFor(self, count: int, timeout: float) -> defer.Deferred:
        self.want = count
        self.arrived = defer.Deferred()
        if len(self.answers) >= count:
            self.dataReceived(b"")
        return self.arrived.addTimeout(timeout, reactor)

    def send(self, qid: int, name: str, qtype: int = dns.TXT) -> None:
        data = query(name, qtype, id=qid)
        self.transport.write(struct.pack("!H", len(data)) + data)


class NonReadingPipelinerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.daemon = startDaemon(self, yamlFor(freePort()))
        self.svc = self.daemon.getServiceNamed("dns")

    def answered(self) -> float:
        family = self.daemon.context.metrics.get("netsvc_dns_queries_total")
        return family.labels(service="dns", qtype="TXT", rcode="NOERROR").value

    @defer.inlineCallbacks
    def pipelineWithoutReading(self, tls: bool):
        index = 2 if tls else 1
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port(self.daemon, index, "dns"))
        if tls:
            cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")
            endpoint = endpoints.wrapClientTLS(clientCreator("localhost", cafile=cafile), endpoint)
        client = yield endpoints.connectProtocol(endpoint, Pipeliner())
        self.addCleanup(client.transport.abortConnection)
        client.send(0, "big.lab")  # one round trip: the TLS handshake is done
        yield client.waitFor(1, 10)
        client.transport.pauseProducing()  # stop reading
        for qid in range(1, PIPELINED + 1):
            client.send(qid, "big.lab")

        (conn,) = self.svc.guard.connections
        most, last, stable = 0, -1.0, 0
        deadline = time.monotonic() + 10
        while stable < 5 and time.monotonic() < deadline:
            yield sleep(0.05)
            most = max(most, held(conn))
            now = self.answered()
            stable = stable + 1 if now == last else 0
            last = now
        # A well-behaved client, meanwhile, over UDP and TCP.
        m = yield ask("127.0.0.1", port(self.daemon, 0, "dns"), "printer.lab")
        self.assertEqual(m.answers[0].payload.dottedQuad(), "10.0.0.7")
        m = yield ask("127.0.0.1", port(self.daemon, 1, "dns"), "printer.lab", transport="tcp")
        self.assertEqual(m.answers[0].payload.dottedQuad(), "10.0.0.7")
        most = max(most, held(conn))

        self.assertLess(most, BOUND, f"the server held {most} bytes for a client that does not read")
        self.assertLess(last, PIPELINED, "every answer was rendered for a client that does not read")

        client.transport.resumeProducing()
        yield client.waitFor(PIPELINED + 1, 60)
        ids = [struct.unpack_from("!H", a)[0] for a in client.answers]
        self.assertEqual(ids, list(range(PIPELINED + 1)))
        m = dns.Message()
        m.fromStr(client.answers[-1])
        self.assertEqual(len(m.answers), 50)

    def test_tcp(self):
        return self.pipelineWithoutReading(tls=False)

    def test_tls(self):
        return self.pipelineWithoutReading(tls=True)
