"""
services.dns: settings validation, and daemons on loopback port 0 -- a front
resolver forwarding to a second netsvc (its local records as the upstream data)
over UDP, TCP and DNS over TLS with a verified certificate.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.names import dns
from twisted.trial import unittest

from netsvc import config
from netsvc.dns import client
from netsvc.tls import clientCreator
from tests.helpers import freePort, port, sleep, startDaemon, stateDir

UPSTREAM_YAML = """
services:
  dns:
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:9"]
    records:
      - {name: www.up.test, type: A, value: 192.0.2.11, ttl: 600}
      - {name: up.test, type: MX, value: "20 mx2.up.test"}
      - {name: up.test, type: MX, value: "10 mx1.up.test"}
      - {name: alias.up.test, type: CNAME, value: www.up.test}
      - {name: short.up.test, type: A, value: 192.0.2.12, ttl: 1}
""" + "".join(f"      - {{name: big.up.test, type: TXT, value: \"{'x' * 200} {i}\"}}\n" for i in range(12))


def problems(text: str) -> list[str]:
    try:
        config.parse(text, "t.yaml")
    except config.ConfigError as e:
        return [str(p) for p in e.problems]
    return []


class SettingsTests(unittest.TestCase):
    def test_issueExampleIsValid(self) -> None:
        self.assertEqual(problems("""
services:
  dns:
    listen: ["udp:5353:interface=127.0.0.1", "tcp:5353:interface=127.0.0.1", "tls:8853:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.2:53", "tls://9.9.9.9:853?name=dns.quad9.net"]
    policy: sequential
    hosts: ["/etc/hosts"]
    records:
      - {name: printer.lab, type: A, value: 10.0.0.7, ttl: 300}
      - {name: lab, type: MX, value: "10 mail.lab"}
    blocklist: blocked.txt
    forward: {corp.example: ["udp://10.0.0.53"]}
    cache: {max_entries: 1000, min_ttl: 10s, max_ttl: 1h, negative_ttl_max: 5m, stale_ttl: 1d,
            prefetch: false}
"""), [])

    def test_errorsNameTheKey(self) -> None:
        found = problems("""
services:
  dns:
    upstreams: ["udp://dns.google", "quic://1.1.1.1"]
    policy: sequentail
    records:
      - {name: printer.lab, type: A, value: 10.0.0.300}
      - {name: lab, type: MX, value: "mail.lab"}
      - {name: x.lab, type: NAPTR, value: "x"}
    cache: {min_ttl: 1h, max_ttl: 1m, max_entires: 5}
    forward: {corp.example: []}
""")
        text = "\n".join(found)
        for expected in ["services.dns.upstreams[0]: the upstream host must be an IP address",
                         "services.dns.upstreams[1]: scheme must be",
                         "services.dns.policy: expected one of", "did you mean 'sequential'",
                         "services.dns.records[0].value: not a valid A value",
                         "services.dns.records[1].value: not a valid MX value",
                         "services.dns.records[2].type: expected one of",
                         "services.dns.cache.max_entires: unknown key (did you mean 'max_entries'?)"]:
            self.assertIn(expected, text)

    def test_crossFieldChecks(self) -> None:
        text = "\n".join(problems("services:\n  dns:\n    cache: {min_ttl: 1h, max_ttl: 1m}\n"
                                  "    forward: {corp.example: []}\n"))
        self.assertIn("services.dns.cache.min_ttl: is more than max_ttl", text)
        self.assertIn("services.dns.forward.corp.example: needs at least one upstream URL", text)


def ask(host: str, portNumber: int, name: str, qtype: int = dns.A, transport: str = "udp",
        tlsCreator=None) -> defer.Deferred:
    qid, data = client.buildQuery(name, qtype)

    def decode(answer: bytes) -> dns.Message:
        m = dns.Message()
        m.fromStr(answer)
        return m

    d = client.exchange(reactor, host, portNumber, data, qid, transport, 5.0, tlsCreator)
    return d.addCallback(decode)


class ForwardingTests(unittest.TestCase):
    """A front netsvc forwarding to an upstream netsvc, both on loopback."""

    def setUp(self) -> None:
        self.upstream = startDaemon(self, UPSTREAM_YAML.replace("{port}", str(freePort())))
        self.upUDP = port(self.upstream, 0, "dns")
        self.upTLS = port(self.upstream, 2, "dns")
        self.cafile = str(stateDir(self.upstream) / "tls" / "selfsigned.pem")
        self.addCleanup(self._closeUpstreamConnections)

    def _closeUpstreamConnections(self) -> None:
        front = getattr(self, "front", None)
        if front is not None:
            front.getServiceNamed("dns").resolver.close()

    def startFront(self, upstreams: str, extra: str = "") -> None:
        p = freePort()
        self.front = startDaemon(self, f"""
services:
  dns:
    listen: ["udp:{p}:interface=127.0.0.1", "tcp:{p}:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    upstreams: {upstreams}
    timeout: 1s
    records:
      - {{name: printer.lab, type: A, value: 10.0.0.7}}
{extra}""")
        self.frontUDP = port(self.front, 0, "dns")
        self.frontTCP = port(self.front, 1, "dns")
        self.frontTLS = port(self.front, 2, "dns")

    @defer.inlineCallbacks
    def test_udpTcpTlsClientsThroughUdpUpstream(self):
        self.startFront(f'["udp://127.0.0.1:{self.upUDP}"]')
        m = yield ask("127.0.0.1", self.frontUDP, "WWW.up.test")
        self.assertEqual((m.rCode, m.auth, m.recAv), (dns.OK, 0, 1))
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.11")
        self.assertEqual(m.queries[0].name.name, b"WWW.up.test")
        m = yield ask("127.0.0.1", self.frontTCP, "up.test", dns.MX, "tcp")
        self.assertEqual(sorted(rr.payload.preference for rr in m.answers), [10, 20])
        tls = clientCreator("localhost", cafile=str(stateDir(self.front) / "tls" / "selfsigned.pem"))
        m = yield ask("127.0.0.1", self.frontTLS, "alias.up.test", dns.A, "tls", tls)
        self.assertEqual([rr.type for rr in m.answers], [dns.CNAME, dns.A])
        m = yield ask("127.0.0.1", self.frontUDP, "printer.lab")
        self.assertEqual(m.auth, 1)

    @defer.inlineCallbacks
    def test_bigAnswerTruncatedOverUdpThenTcp(self):
        self.startFront(f'["udp://127.0.0.1:{self.upUDP}"]')
        qid, data = client.buildQuery("big.up.test", dns.TXT, edns=False)
        raw = yield client.exchange(reactor, "127.0.0.1", self.frontUDP, data, qid, "udp", 5.0)
        # exchange() itself retries over TCP on TC: a full answer whichever way it came.
        m = dns.Message()
        m.fromStr(raw)
        self.assertEqual(len(m.answers), 12)
        metrics = self.front.context.metrics.render()
        self.assertIn('netsvc_dns_queries_total{service="dns",qtype="TXT",rcode="NOERROR"} 2', metrics)

    @defer.inlineCallbacks
    def test_dnsOverTlsUpstreamVerified(self):
        self.startFront(f'["tls://127.0.0.1:{self.upTLS}?name=localhost&cafile={self.cafile}"]')
        m = yield ask("127.0.0.1", self.frontUDP, "www.up.test")
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.11")
        m = yield ask("127.0.0.1", self.frontUDP, "up.test", dns.MX)
        self.assertEqual(len(m.answers), 2)

    @defer.inlineCallbacks
    def test_dnsOverTlsWrongNameFails(self):
        self.startFront(f'["tls://127.0.0.1:{self.upTLS}?name=wrong.example&cafile={self.cafile}"]')
        m = yield ask("127.0.0.1", self.frontUDP, "www.up.test")
        self.assertEqual(m.rCode, dns.ESERVER)
        text = self.front.context.metrics.render()
        self.assertIn("netsvc_dns_upstream_failures_total", text)

    @defer.inlineCallbacks
    def test_failoverToSecondUpstream(self):
        self.startFront(f'["udp://127.0.0.1:9", "tcp://127.0.0.1:{port(self.upstream, 1, "dns")}"]')
        m = yield ask("127.0.0.1", self.frontUDP, "www.up.test")
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.11")

    @defer.inlineCallbacks
    def test_serveStaleWhenTheUpstreamIsGone(self):
        self.startFront(f'["udp://127.0.0.1:{self.upUDP}"]')
        m = yield ask("127.0.0.1", self.frontUDP, "short.up.test")
        self.assertEqual((m.answers[0].ttl, m.answers[0].payload.dottedQuad()), (1, "192.0.2.12"))
        yield self.upstream.stopService()
        yield sleep(1.2)
        m = yield ask("127.0.0.1", self.frontUDP, "short.up.test")
        self.assertEqual((m.rCode, m.answers[0].ttl), (dns.OK, 30))
        self.assertEqual(m.answers[0].payload.dottedQuad(), "192.0.2.12")
        self.assertIn('netsvc_dns_stale_answers_total{service="dns"} 1', self.front.context.metrics.render())

    @defer.inlineCallbacks
    def test_reconfigureSwapsLocalData(self):
        self.startFront(f'["udp://127.0.0.1:{self.upUDP}"]')
        new = config.parse(f"""
services:
  dns:
    upstreams: ["udp://127.0.0.1:{self.upUDP}"]
    records:
      - {{name: printer.lab, type: A, value: 10.0.0.99}}
""", "t.yaml")
        self.front.getServiceNamed("dns").reconfigure(new.services["dns"])
        m = yield ask("127.0.0.1", self.frontUDP, "printer.lab")
        self.assertEqual(m.answers[0].payload.dottedQuad(), "10.0.0.99")

    @defer.inlineCallbacks
    def test_reconfigureAppliesAccessListAndRate(self):
        self.startFront(f'["udp://127.0.0.1:{self.upUDP}"]')
        new = config.parse(f"""
services:
  dns:
    upstreams: ["udp://127.0.0.1:{self.upUDP}"]
    allow: ["10.0.0.0/8"]
""", "t.yaml")
        self.front.getServiceNamed("dns").reconfigure(new.services["dns"])
        m = yield ask("127.0.0.1", self.frontUDP, "printer.lab")
        self.assertEqual(m.rCode, dns.EREFUSED)
        new = config.parse(f"""
services:
  dns:
    upstreams: ["udp://127.0.0.1:{self.upUDP}"]
    records: [{{name: printer.lab, type: A, value: 10.0.0.7}}]
    limits: {{rate: 1, burst: 1}}
""", "t.yaml")
        self.front.getServiceNamed("dns").reconfigure(new.services["dns"])
        codes = []
        for _ in range(3):
            m = yield ask("127.0.0.1", self.frontUDP, "printer.lab")
            codes.append(m.rCode)
        self.assertEqual(codes, [dns.OK, dns.EREFUSED, dns.EREFUSED])
