"""The netsvc echo command against a real echo service."""

import argparse
import io
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from netsvc.cli import parser
from netsvc.echo import client
from tests.helpers import port, startDaemon, stateDir


class ParseAddressTests(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(client.parseAddress("localhost:7007"), ("localhost", 7007))
        self.assertEqual(client.parseAddress("[::1]:7007"), ("::1", 7007))
        self.assertEqual(client.parseAddress("example.org"), ("example.org", 7))
        for bad in ("host:port", ":7", "h:70000"):
            self.assertRaises(ValueError, client.parseAddress, bad)


class CommandTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startDaemon(self, 'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1", '
                                        '"udp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]\n')
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def run_(self, *argv) -> defer.Deferred:
        top = parser()
        args = top.commands["echo"].parse_intermixed_args(list(argv))
        return args.run(reactor, args)

    @defer.inlineCallbacks
    def test_messagesEchoed(self):
        status = yield self.run_(f"127.0.0.1:{port(self.daemon, 0)}", "hello", "wörld")
        self.assertEqual(status, 0)
        self.assertEqual(self.out.getvalue(), "hello\nwörld\n")

    @defer.inlineCallbacks
    def test_udpOptionAfterMessages(self):
        status = yield self.run_(f"127.0.0.1:{port(self.daemon, 1)}", "ping", "--udp")
        self.assertEqual((status, self.out.getvalue()), (0, "ping\n"))

    @defer.inlineCallbacks
    def test_tlsWithCacert(self):
        cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")
        status = yield self.run_(f"localhost:{port(self.daemon, 2)}", "--tls", "--cacert", cafile, "sealed")
        self.assertEqual((status, self.out.getvalue()), (0, "sealed\n"))

    @defer.inlineCallbacks
    def test_tlsUnverifiedFails(self):
        status = yield self.run_(f"localhost:{port(self.daemon, 2)}", "--tls", "x")
        self.assertEqual(status, 1)
        self.assertIn("certificate verify failed", self.err.getvalue())

    @defer.inlineCallbacks
    def test_tlsInsecureOptOut(self):
        status = yield self.run_(f"localhost:{port(self.daemon, 2)}", "--tls", "--insecure", "x")
        self.assertEqual(status, 0)

    @defer.inlineCallbacks
    def test_loadMode(self):
        status = yield self.run_(f"127.0.0.1:{port(self.daemon, 0)}", "--count", "200", "--concurrency", "4")
        self.assertEqual(status, 0)
        self.assertRegex(self.out.getvalue(),
                         r"^200 round trips of 32 bytes over 4 connection\(s\) in [\d.]+s: \d+/s, "
                         r"p50 [\d.]+ ms, p99 [\d.]+ ms\n$")

    @defer.inlineCallbacks
    def test_mismatchIsAnError(self):
        # A "server" that answers with other bytes: the client must notice.
        from twisted.internet.protocol import Factory, Protocol

        class Liar(Protocol):
            def dataReceived(self, data):
                self.transport.write(data.upper())

        listening = reactor.listenTCP(0, Factory.forProtocol(Liar), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        status = yield self.run_(f"127.0.0.1:{listening.getHost().port}", "quiet")
        self.assertEqual(status, 1)
        self.assertIn("sent b'quiet', got back b'QUIET'", self.err.getvalue())

    @defer.inlineCallbacks
    def test_refused(self):
        from socket import socket

        s = socket()
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
        s.close()
        status = yield self.run_(f"127.0.0.1:{free}", "x", "--timeout", "2")
        self.assertEqual(status, 1)
        self.assertIn("refused", self.err.getvalue())

    @defer.inlineCallbacks
    def test_timeout(self):
        from twisted.internet.protocol import Factory, Protocol

        listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # never answers
        self.addCleanup(listening.stopListening)
        status = yield self.run_(f"127.0.0.1:{listening.getHost().port}", "x", "--timeout", "0.3")
        self.assertEqual(status, 1)
        self.assertIn("timed out after 0.3s", self.err.getvalue())

    def test_usageErrors(self):
        self.assertEqual(self.successResultOf(self.run_("nohost:port", "x")), 2)
        self.assertEqual(self.successResultOf(self.run_("127.0.0.1:7", "--insecure", "x")), 2)


class CheckConfigTests(unittest.TestCase):
    def test_okAndErrors(self):
        from netsvc.cli import checkConfig

        good, bad = self.mktemp(), self.mktemp()
        with open(good, "w") as f:
            f.write("services:\n  echo: {}\n")
        with open(bad, "w") as f:
            f.write("services:\n  echo: {listen: [tcpp]}\n")
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(checkConfig(None, argparse.Namespace(files=[good])), 0)
        self.assertEqual(out.getvalue(), f"{good}: OK (echo)\n")
        self.assertEqual(checkConfig(None, argparse.Namespace(files=[good, bad])), 1)
        self.assertEqual(err.getvalue(), f"{bad}: services.echo.listen[0]: malformed endpoint 'tcpp': "
                                         "expected TYPE:ARGS, e.g. tcp:7007:interface=127.0.0.1\n")
