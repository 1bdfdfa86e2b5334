"""
Who the DNS service answers without C{allow:} (issue 21): loopback and the
listeners' own networks; everyone else gets REFUSED over UDP and TCP, counted.

Over real loopback sockets.  Every 127.x address is loopback, so to have a client
outside the default the tests narrow L{netsvc.dns.access.LOOPBACK} to 127.0.0.1/32
and ask from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to lo): the same code
path a client from another network takes.
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.names import dns
from twisted.trial import unittest

from netsvc.dns import access, client
from tests.helpers import freePort, loopbackAliasesWork, port, startDaemon

YAML = """
services:
  dns:
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:9"]
    records:
      - {{name: printer.lab, type: A, value: 10.0.0.7}}
{extra}"""


class _UDPAsker(protocol.DatagramProtocol):
    def __init__(self, query: bytes, target: tuple[str, int]) -> None:
        self.query, self.target = query, target
        self.answer: defer.Deferred = defer.Deferred()

    def startProtocol(self) -> None:
        self.transport.write(self.query, self.target)

    def datagramReceived(self, data: bytes, addr) -> None:
        if not self.answer.called:
            self.answer.callback(data)


class _TCPAsker(protocol.Protocol):
    def __init__(self, query: bytes) -> None:
        self.query = query
        self.buf = b""
        self.answer: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(struct.pack("!H", len(self.query)) + self.query)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 2 and len(self.buf) >= 2 + struct.unpack("!H", self.buf[:2])[0]:
            if not self.answer.called:
                self.answer.callback(self.buf[2 : 2 + struct.unpack("!H", self.buf[:2])[0]])
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


@defer.inlineCallbacks
def askFrom(testCase, source: str, portNumber: int, transport: str, name: str = "printer.lab"):
    """Ask C{name} from the address C{source}; the decoded answer (bounded by 5 s)."""
    qid, query = client.buildQuery(name, dns.A)
    if transport == "udp":
        asker = _UDPAsker(query, ("127.0.0.1", portNumber))
        listening = reactor.listenUDP(0, asker, interface=source)
        testCase.addCleanup(listening.stopListening)
    else:
        asker = _TCPAsker(query)
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber, bindAddress=(source, 0))
        yield endpoints.connectProtocol(ep, asker)
    asker.answer.addTimeout(5, reactor)
    data = yield asker.answer
    m = dns.Message()
    m.fromStr(data)
    return m


def refusedACL(daemon) -> float:
    return daemon.context.metrics.get("netsvc_connections_refused_total").labels(service="dns", reason="acl").value


class DefaultAccessTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        if not loopbackAliasesWork():
            raise unittest.SkipTest("binding 127.0.0.2 needs Linux's 127.0.0.0/8 on lo")
        self.patch(access, "LOOPBACK", ["127.0.0.1/32"])

    def start(self, extra: str = ""):
        p = freePort()
        daemon = startDaemon(self, YAML.format(port=p, extra=extra))
        return daemon, port(daemon, 0, "dns"), port(daemon, 1, "dns")

    @defer.inlineCallbacks
    def test_othersRefusedByDefault(self):
        daemon, udp, tcp = self.start()
        for transport, number in (("udp", udp), ("tcp", tcp)):
            m = yield askFrom(self, "127.0.0.1", number, transport)
            self.assertEqual((m.rCode, m.answers[0].payload.dottedQuad()), (dns.OK, "10.0.0.7"), transport)
            m = yield askFrom(self, "127.0.0.2", number, transport)
            self.assertEqual((m.rCode, m.answers), (dns.EREFUSED, []), transport)
        self.assertEqual(refusedACL(daemon), 2)

    @defer.inlineCallbacks
    def test_explicitAllowOpensIt(self):
        daemon, udp, tcp = self.start("    allow: [127.0.0.0/8]\n")
        for transport, number in (("udp", udp), ("tcp", tcp)):
            m = yield askFrom(self, "127.0.0.2", number, transport)
            self.assertEqual((m.rCode, m.answers[0].payload.dottedQuad()), (dns.OK, "10.0.0.7"), transport)
        self.assertEqual(refusedACL(daemon), 0)

    @defer.inlineCallbacks
    def test_denyAloneKeepsTheDefault(self):
        daemon, udp, tcp = self.start("    deny: [192.0.2.0/24]\n")
        m = yield askFrom(self, "127.0.0.2", udp, "udp")
        self.assertEqual(m.rCode, dns.EREFUSED)

    @defer.inlineCallbacks
    def test_reloadWithoutAllowKeepsTheDefault(self):
        from netsvc import config

        daemon, udp, tcp = self.start("    allow: [127.0.0.0/8]\n")
        new = config.parse(YAML.format(port=9, extra=""), "t.yaml")
        daemon.getServiceNamed("dns").reconfigure(new.services["dns"])
        m = yield askFrom(self, "127.0.0.2", udp, "udp")
        self.assertEqual(m.rCode, dns.EREFUSED)


class OwnNetworksTests(unittest.TestCase):
    def test_wildcardAndLoopbackAddNothing(self):
        for endpoint in ("udp:53", "tcp:53:interface=0.0.0.0", "tcp6:53:interface=\\:\\:", "udp:53:interface=::",
                         "tcp:53:interface=127.0.0.1", "tcp:53:interface=localhost", "unix:/tmp/x"):
            self.assertEqual(access.ownNetworks(endpoint), [], endpoint)
        self.assertEqual(access.defaultAllow([]), ["127.0.0.0/8", "::1/128"])

    def test_anInterfaceAddressAddsItsNetwork(self):
        found = [(a, n) for a, n in access.interfaceAddresses() if not a.is_loopback and not a.is_link_local]
        if not found:
            raise unittest.SkipTest("no non-loopback interface address on this machine")
        addr, net = found[0]
        spelled = str(addr).replace(":", "\\:")
        self.assertIn(net, access.ownNetworks(f"tcp:53:interface={spelled}"))
        self.assertIn(net, access.defaultAllow([f"udp:53:interface={spelled}"]))
        self.assertTrue(ipaddress.ip_address(addr) in ipaddress.ip_network(net))

    def test_anAddressOnNoInterfaceIsItselfOnly(self):
        # an address this machine does not have (binding would fail; the list stays narrow)
        self.assertEqual(access.ownNetworks("udp:53:interface=198.51.100.77"), ["198.51.100.77/32"])
