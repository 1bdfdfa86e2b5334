"""
Who may speak PROXY (issue 21): a rule with C{accept_proxy} believes a header only
from its C{trusted_proxies} (like nginx's C{set_real_ip_from}); a connection from
anyone else is refused and counted; the rule's ACL sees the real peer first, then
the address a trusted sender claims.  Over real loopback sockets: clients bind
127.0.0.2 / 127.0.0.3 (Linux routes all of 127.0.0.0/8 to lo) to be someone else.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from netsvc import config
from netsvc.forward import proxyheader
from tests.forward._util import Client, fport, metric, recorderBackend, startForwarder
from tests.forward.test_stream import rule, tcp, waitUntil
from tests.helpers import loopbackAliasesWork

HEADER = proxyheader.v1(("203.0.113.7", 4242), ("198.51.100.1", 443))


def connectFrom(source: str, port: int) -> defer.Deferred:
    """A client whose address is C{source} (any 127.x address) to our listener."""
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return endpoints.connectProtocol(ep, Client())


class TrustedSendersTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        if not loopbackAliasesWork():
            raise unittest.SkipTest("binding 127.0.0.2 needs Linux's 127.0.0.0/8 on lo")

    @defer.inlineCallbacks
    def test_headerFromUntrustedPeerRefused(self):
        """127.0.0.3 is not in trusted_proxies: its header is not believed, the connection is closed."""
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(
            self, rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.2/32]\nsend_proxy: v1")
        )
        client = yield connectFrom("127.0.0.3", fport(daemon))
        client.transport.write(HEADER + b"hello")
        self.assertEqual((yield client.closed), b"")
        self.assertEqual(backend.instances, [])  # nothing reached the backend
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="r", reason="proxy_untrusted"), 1)

    @defer.inlineCallbacks
    def test_headerFromTrustedPeerUsed(self):
        """From 127.0.0.2 (trusted) the claimed client is the one the backend hears about."""
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(
            self, rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.2/32]\nsend_proxy: v1")
        )
        client = yield connectFrom("127.0.0.2", fport(daemon))
        client.transport.write(HEADER + b"hello")
        client.transport.loseWriteConnection()
        yield waitUntil(lambda: backend.instances)
        data = yield backend.instances[0].gotEOF
        self.assertEqual(data, b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\nhello")
        yield client.closed
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="r", reason="proxy_untrusted"), 0)

    @defer.inlineCallbacks
    def test_aclSeesTheRealPeerFirst(self):
        """
        allow lists only the claimed network: a trusted sender outside allow is refused
        at accept (its claim does not let it in); inside allow, a claimed address outside
        it is refused too.
        """
        port, backend = recorderBackend(self)
        daemon, svc = startForwarder(
            self,
            rule([tcp(port)], "accept_proxy: true\ntrusted_proxies: [127.0.0.2/32]\nallow: [203.0.113.0/24]")
            + rule(
                [tcp(port)],
                "accept_proxy: true\ntrusted_proxies: [127.0.0.2/32]\nallow: [127.0.0.2/32, 203.0.113.0/24]",
                "both",
            ),
        )
        client = yield connectFrom("127.0.0.2", fport(daemon))
        client.transport.write(HEADER + b"hello")
        self.assertEqual((yield client.closed), b"")
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="r", reason="acl"), 1)
        # the claimed address is checked as well (192.0.2.9 is not in allow)
        other = yield connectFrom("127.0.0.2", fport(daemon, 1))
        other.transport.write(proxyheader.v1(("192.0.2.9", 1), ("198.51.100.1", 443)) + b"hello")
        self.assertEqual((yield other.closed), b"")
        self.assertEqual(metric(daemon, "netsvc_forward_refused_total", rule="both", reason="acl"), 1)
        self.assertEqual(backend.instances, [])
        # and an allowed claim from an allowed, trusted sender goes through
        good = yield connectFrom("127.0.0.2", fport(daemon, 1))
        good.transport.write(HEADER + b"ok")
        good.transport.loseWriteConnection()
        yield waitUntil(lambda: backend.instances)
        self.assertEqual((yield backend.instances[0].gotEOF), b"ok")
        yield good.closed


class SettingsTests(unittest.TestCase):
    def parse(self, extra: str):
        return config.parse(
            "services:\n  forward:\n    rules:\n" + rule(["tcp:host=127.0.0.1:port=1"], extra), "test.yaml"
        )

    def test_acceptProxyWithoutTrustedSendersIsAnError(self):
        with self.assertRaises(config.ConfigError) as e:
            self.parse("accept_proxy: true")
        self.assertIn("services.forward.rules[0].trusted_proxies", str(e.exception))
        self.assertIn("accept_proxy needs the list of senders", str(e.exception))

    def test_perListenerAcceptProxyToo(self):
        with self.assertRaises(config.ConfigError) as e:
            config.parse(
                "services:\n  forward:\n    rules:\n      - name: r\n"
                '        listen: [{endpoint: "tcp:0:interface=127.0.0.1", accept_proxy: true}]\n'
                '        connect: ["tcp:host=127.0.0.1:port=1"]\n',
                "test.yaml",
            )
        self.assertIn("trusted_proxies", str(e.exception))

    def test_trustedProxiesChecked(self):
        with self.assertRaises(config.ConfigError) as e:
            self.parse("accept_proxy: true\ntrusted_proxies: [10.0.0.1/8]")
        self.assertIn("services.forward.rules[0].trusted_proxies", str(e.exception))
        with self.assertRaises(config.ConfigError) as e:
            self.parse("trusted_proxies: [10.0.0.0/8]")
        self.assertIn("only used with accept_proxy", str(e.exception))
        settings = self.parse("accept_proxy: true\ntrusted_proxies: [10.0.0.0/8, '::1']")
        self.assertEqual(settings.services["forward"].rules[0].trusted_proxies, ["10.0.0.0/8", "::1"])

    def test_commandLine(self):
        import argparse

        from netsvc.forward import client as cli

        top = argparse.ArgumentParser()
        cli.addParser(top.add_subparsers())
        r = cli.ruleFromArgs(top.parse_args(["forward", "8080", "10.0.0.5:80", "--accept-proxy",
                                             "--trusted-proxy", "10.0.0.2", "--trusted-proxy", "10.0.1.0/24"]))
        self.assertEqual(r["trusted_proxies"], ["10.0.0.2", "10.0.1.0/24"])
        config.structure(config.Settings, {"services": {"forward": {"rules": [r]}}})
