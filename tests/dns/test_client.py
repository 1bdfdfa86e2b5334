"""C{netsvc dns query}: argument forms, dig-like output, exit statuses, against a daemon on loopback."""

from __future__ import annotations

import argparse
import io
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from netsvc.dns import client
from tests.helpers import port, startDaemon, stateDir

YAML = """
services:
  dns:
    listen: ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:9"]
    timeout: 200ms
    records:
      - {name: lab, type: MX, value: "20 b.lab"}
      - {name: lab, type: MX, value: "10 a.lab"}
      - {name: lab, type: MX, value: "30 c.lab"}
      - {name: printer.lab, type: A, value: 10.0.0.7, ttl: 300}
      - {name: www.lab, type: CNAME, value: printer.lab}
"""


def parse(argv: list[str]) -> argparse.Namespace:
    """As C{netsvc dns ...} parses them (netsvc.cli.main)."""
    top = argparse.ArgumentParser()
    return client.addParser(top.add_subparsers()).parse_intermixed_args(argv)


class ClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.daemon = startDaemon(self, YAML)
        self.server = f"@127.0.0.1:{port(self.daemon, 0, 'dns')}"
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def run_(self, *argv: str) -> defer.Deferred:
        return defer.maybeDeferred(client.run, reactor, parse(list(argv)))

    @defer.inlineCallbacks
    def test_digLikeOutput(self):
        status = yield self.run_("query", "www.lab", self.server)
        self.assertEqual(status, 0)
        text = self.out.getvalue()
        self.assertIn("status: NOERROR", text)
        self.assertIn("flags: qr aa rd ra;", text)
        self.assertIn(";; ANSWER SECTION:", text)
        self.assertRegex(text, r"www\.lab\.\s+300\s+IN\s+CNAME\s+printer\.lab\.")
        self.assertRegex(text, r"printer\.lab\.\s+300\s+IN\s+A\s+10\.0\.0\.7")
        self.assertIn(f";; SERVER: 127.0.0.1#{port(self.daemon, 0, 'dns')}", text)

    @defer.inlineCallbacks
    def test_mxInPreferenceOrder(self):
        status = yield self.run_("query", "lab", "MX", self.server, "--short")
        self.assertEqual(status, 0)
        self.assertEqual(self.out.getvalue(), "10 a.lab.\n20 b.lab.\n30 c.lab.\n")

    @defer.inlineCallbacks
    def test_reverse(self):
        yield self.run_("query", "-x", "10.0.0.7", self.server, "--short")
        self.assertEqual(self.out.getvalue(), "printer.lab.\n")

    @defer.inlineCallbacks
    def test_tcpAndVerifiedTls(self):
        tcp = f"@127.0.0.1:{port(self.daemon, 1, 'dns')}"
        self.assertEqual((yield self.run_("query", "printer.lab", tcp, "--tcp", "--short")), 0)
        tls = f"@127.0.0.1:{port(self.daemon, 2, 'dns')}"
        cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")
        status = yield self.run_("query", "printer.lab", tls, "--tls", "--cacert", cafile, "--short")
        self.assertEqual(status, 0)
        self.assertEqual(self.out.getvalue(), "10.0.0.7\n10.0.0.7\n")

    @defer.inlineCallbacks
    def test_servfailExitsNonZero(self):
        status = yield self.run_("query", "nowhere.test", self.server)
        self.assertEqual(status, client.EXIT_RCODE)
        self.assertIn("status: SERVFAIL", self.out.getvalue())

    @defer.inlineCallbacks
    def test_timeoutExitsNonZero(self):
        status = yield self.run_("query", "x.test", "@127.0.0.1:9", "--timeout", "0.3")
        self.assertEqual(status, client.EXIT_NO_REPLY)
        self.assertEqual(client.EXIT_NO_REPLY, 1)  # the one table of every netsvc client
        self.assertRegex(self.err.getvalue(),
                         r"^netsvc dns: 127\.0\.0\.1:9 \(udp\): (connection refused|timed out after 0\.3s)\n$")

    @defer.inlineCallbacks
    def test_usageErrors(self):
        self.assertEqual((yield self.run_("query")), client.EXIT_USAGE)
        self.assertEqual((yield self.run_("query", "-x", "nonsense")), client.EXIT_USAGE)
        self.assertEqual((yield self.run_("query", "a.b", "--tcp", "--tls")), client.EXIT_USAGE)


class ParsingTests(unittest.TestCase):
    def test_server(self) -> None:
        self.assertEqual(client.parseServer("127.0.0.1:5353", 53), ("127.0.0.1", 5353))
        self.assertEqual(client.parseServer("[::1]:5353", 53), ("::1", 5353))
        self.assertEqual(client.parseServer("::1", 853), ("::1", 853))
        self.assertRaises(ValueError, client.parseServer, "1.2.3.4:99999", 53)

    def test_encodeName(self) -> None:
        self.assertEqual(client.encodeName("a.bc."), b"\x01a\x02bc\x00")
        self.assertEqual(client.encodeName("."), b"\x00")
        self.assertRaises(ValueError, client.encodeName, "a..b")
