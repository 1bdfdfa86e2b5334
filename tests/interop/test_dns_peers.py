"""
The DNS service, run as the real daemon (C{twistd -n netsvc --config ...}),
against programs nobody here wrote: C{dig} (BIND 9.18) over UDP, TCP and TLS;
C{dnsmasq} started here as the real upstream; and a C{dnspython} stub resolver
pointed at netsvc (A, MX in preference order, CNAME, reverse PTR).

netsvc listens on one port for both UDP and TCP (so that dig's TC retry over
TCP finds it) and on port 0 for DNS over TLS; dnsmasq on another free port.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

from twisted.trial import unittest

from tests.helpers import freePort
from tests.interop._daemon import IO_TIMEOUT, _dieWithParent, requirePeer, runToCompletion, startNetsvc

DNSMASQ_RECORDS = [
    "--host-record=www.up.test,192.0.2.11",
    "--host-record=mx1.up.test,192.0.2.21",
    "--mx-host=up.test,mx2.up.test,20",
    "--mx-host=up.test,mx1.up.test,10",
    "--mx-host=up.test,mx3.up.test,30",
    "--cname=alias.up.test,www.up.test",
    "--txt-record=txt.up.test,hello from dnsmasq",
    "--local=/up.test/",
    "--local=/2.0.192.in-addr.arpa/",
]


def udpQuery(port: int, name: str, qtype: int = 1) -> bytes | None:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    query = struct.pack("!HHHHHH", 4242, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(query, ("127.0.0.1", port))
        try:
            return s.recv(4096)
        except OSError:
            return None


def startDnsmasq(testCase: unittest.TestCase) -> int:
    """dnsmasq on a free loopback port with the records above; stopped after the test."""
    dnsmasq = requirePeer("dnsmasq", "dnsmasq-base")
    port = freePort()
    folder = Path(testCase.mktemp()).resolve()
    folder.mkdir(parents=True)
    log = open(folder / "dnsmasq.log", "wb")
    (folder / "empty.conf").write_text("")  # not /dev/null: on a shared machine it may not be a device
    process = subprocess.Popen(
        [dnsmasq, "--keep-in-foreground", f"--conf-file={folder / 'empty.conf'}", f"--port={port}",
         "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--local-ttl=300", "--user=root",
         f"--pid-file={folder / 'dnsmasq.pid'}", "--log-facility=-", *DNSMASQ_RECORDS],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_dieWithParent)

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()

    testCase.addCleanup(stop)
    deadline = time.monotonic() + IO_TIMEOUT
    while udpQuery(port, "www.up.test") is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise testCase.failureException(
                f"dnsmasq did not start: {(folder / 'dnsmasq.log').read_text(errors='replace')}")
    return port


class DNSPeersTestCase(unittest.TestCase):
    """netsvc (udp+tcp on one port, tls) forwarding to dnsmasq, with local records of its own."""

    def setUp(self) -> None:
        self.upstreamPort = startDnsmasq(self)
        self.port = freePort()
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        config = base / "netsvc.yaml"
        config.write_text(f"""
state_dir: state
drain_timeout: 1s
services:
  dns:
    listen: ["udp:{self.port}:interface=127.0.0.1", "tcp:{self.port}:interface=127.0.0.1",
             "tls:0:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:{self.upstreamPort}"]
    records:
      - {{name: printer.lab, type: A, value: 10.0.0.7, ttl: 300}}
      - {{name: lab, type: MX, value: "10 mail.lab"}}
      - {{name: mail.lab, type: A, value: 10.0.0.8}}
""" + "".join(f"      - {{name: big.lab, type: A, value: 10.9.0.{i}}}\n" for i in range(1, 60)))
        self.daemon = startNetsvc(self, config, base / "state")
        self.tlsPort = self.daemon.port("services.dns.listen[2]")

    def dig(self, *args: str) -> str:
        digPath = requirePeer("dig", "bind9-dnsutils")
        command = [digPath, "@127.0.0.1", "-p", str(self.port), "+time=3", "+tries=2", *args]
        result = runToCompletion(self, command,
                                 timeout=IO_TIMEOUT * 2)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        return out


class DigTests(DNSPeersTestCase):
    def test_udpThroughDnsmasq(self) -> None:
        out = self.dig("www.up.test", "+noall", "+answer", "+comments")
        self.assertIn("status: NOERROR", out)
        self.assertRegex(out, r"flags: qr rd ra;")
        self.assertRegex(out, r"www\.up\.test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.11")

    def test_tcp(self) -> None:
        out = self.dig("+tcp", "alias.up.test", "+noall", "+answer")
        self.assertRegex(out, r"alias\.up\.test\.\s+\d+\s+IN\s+CNAME\s+www\.up\.test\.")
        self.assertRegex(out, r"www\.up\.test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.11")

    def test_tls(self) -> None:
        out = self.dig("-p", str(self.tlsPort), "+tls", "printer.lab", "+noall", "+answer", "+comments")
        self.assertRegex(out, r"flags: qr aa rd ra;")
        self.assertRegex(out, r"printer\.lab\.\s+300\s+IN\s+A\s+10\.0\.0\.7")

    def test_truncatedThenTcp(self) -> None:
        out = self.dig("+noedns", "+ignore", "big.lab", "+comments")
        self.assertRegex(out, r"flags: qr aa tc rd ra;")
        out = self.dig("+noedns", "big.lab", "+noall", "+answer")
        self.assertEqual(out.count("IN\tA\t10.9.0."), 59)

    def test_ednsAndNoRecursion(self) -> None:
        out = self.dig("+norecurse", "printer.lab", "+comments")
        self.assertRegex(out, r"flags: qr aa ra;")
        self.assertIn("udp: 1232", out)

    def test_nxdomainFromDnsmasqCachedWithTTL(self) -> None:
        out = self.dig("nothere.up.test", "+comments")
        self.assertIn("status: NXDOMAIN", out)
        out = self.dig("txt.up.test", "TXT", "+short")
        self.assertEqual(out.strip(), '"hello from dnsmasq"')

    def test_caseOfTheQuestionKept(self) -> None:
        self.dig("www.up.test")
        out = self.dig("WwW.uP.TeSt", "+noall", "+question", "+answer")
        self.assertIn(";WwW.uP.TeSt.", out)


class DnspythonTests(DNSPeersTestCase):
    def resolver(self):
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.lifetime = IO_TIMEOUT
        return r

    def test_a(self) -> None:
        answer = self.resolver().resolve("www.up.test", "A")
        self.assertEqual([r.address for r in answer], ["192.0.2.11"])
        answer = self.resolver().resolve("printer.lab", "A")
        self.assertEqual([r.address for r in answer], ["10.0.0.7"])

    def test_mxInPreferenceOrder(self) -> None:
        answer = self.resolver().resolve("up.test", "MX")
        ordered = sorted(answer, key=lambda r: r.preference)
        self.assertEqual([(r.preference, str(r.exchange)) for r in ordered],
                         [(10, "mx1.up.test."), (20, "mx2.up.test."), (30, "mx3.up.test.")])

    def test_cname(self) -> None:
        answer = self.resolver().resolve("alias.up.test", "A")
        self.assertEqual(str(answer.canonical_name), "www.up.test.")
        self.assertEqual([r.address for r in answer], ["192.0.2.11"])

    def test_reversePtr(self) -> None:
        import dns.reversename

        r = self.resolver()
        local = r.resolve(dns.reversename.from_address("10.0.0.7"), "PTR")
        self.assertEqual([str(p) for p in local], ["printer.lab."])
        upstream = r.resolve(dns.reversename.from_address("192.0.2.11"), "PTR")
        self.assertEqual([str(p) for p in upstream], ["www.up.test."])

    def test_nxdomain(self) -> None:
        import dns.resolver

        self.assertRaises(dns.resolver.NXDOMAIN, self.resolver().resolve, "nothere.up.test", "A")
