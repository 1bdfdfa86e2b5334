"""
The smarthost password goes only over verified TLS (issue 21).

A real ESMTP peer in this process (a small recording server with STARTTLS and
implicit TLS, self-signed certificate) on 127.0.0.1:0, and netsvc's delivery
side talking to it: sessions built by L{SessionOpener} from settings made in
Python (so that the combinations the config check now refuses -- the old
default C{starttls: opportunistic} with C{auth} -- can still be tried at run
time), and the daemon itself relaying a message it accepted.  Each peer session
records its lines and whether TLS was on when each arrived.
"""

from __future__ import annotations

import json
import smtplib
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, reactor, ssl, threads
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from netsvc import config
from netsvc.runtime import buildDaemon
from netsvc.smtp.outbound import SessionOpener
from netsvc.smtp.routing import SmarthostRouter
from netsvc.smtp.sendertypes import Outgoing, Recipient, SessionError
from netsvc.smtp.settings import RelayAuth, RelaySettings, Settings
from netsvc.tls import generateSelfSigned
from tests.helpers import port, sleep


class RecordingESMTP(LineReceiver):
    """EHLO, STARTTLS (real, or C{broken}: garbage after the 220), AUTH (any password), MAIL, RCPT, DATA."""

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.tls = self.factory.implicit
        self.inData = False
        self.lines: list[tuple[bool, bytes]] = []
        self.factory.sessions.append(self.lines)
        self.sendLine(b"220 peer.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        self.lines.append((self.tls, line))
        if self.inData:
            if line == b".":
                self.inData = False
                self.factory.delivered += 1
                self.sendLine(b"250 2.0.0 kept")
            return
        verb = line.split(b" ")[0].upper()
        if verb == b"EHLO":
            offers = [b"250-peer.test"] + ([] if self.tls else [b"250-STARTTLS"]) + [b"250 AUTH PLAIN LOGIN"]
            self.transport.write(b"\r\n".join(offers) + b"\r\n")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 go ahead")
            if self.factory.broken:
                self.transport.write(b"this is not a TLS record\r\n" * 4)
                self.transport.loseConnection()
                return
            self.transport.startTLS(self.factory.tlsOptions)
            self.tls = True
        elif verb == b"AUTH":
            self.sendLine(b"235 2.7.0 ok")
        elif verb in (b"MAIL", b"RCPT"):
            self.sendLine(b"250 ok")
        elif verb == b"DATA":
            self.inData = True
            self.sendLine(b"354 go")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"500 what")


def authLines(factory: Any) -> list[tuple[bool, bytes]]:
    """Every AUTH command the peer received, with whether TLS was on."""
    return [(tls, line) for session in factory.sessions for tls, line in session if line.upper().startswith(b"AUTH")]


class PeerMixin:
    def startPeer(self, broken: bool = False, implicit: bool = False) -> Any:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        self.cert, key = folder / "peer.pem", folder / "peer.key"
        generateSelfSigned(self.cert, key, ["127.0.0.1", "localhost"])
        options = ssl.PrivateCertificate.loadPEM(self.cert.read_text() + key.read_text()).options()
        factory = Factory.forProtocol(RecordingESMTP)
        factory.sessions, factory.delivered = [], 0
        factory.broken, factory.implicit, factory.tlsOptions = broken, implicit, options
        if implicit:
            listening = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        else:
            listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.password = folder / "password"
        self.password.write_text("hunter2\n")
        self.peer = factory
        self.peerPort = listening.getHost().port
        return factory


def outgoing() -> Outgoing:
    data = b"Subject: x\r\n\r\nhi\r\n"

    def openData() -> Any:
        import io

        return io.BytesIO(data)

    return Outgoing("a@relay.test", [Recipient("b@example.org")], openData, len(data))


class SessionTests(PeerMixin, unittest.TestCase):
    """One delivery attempt by the session opener, against the peer."""

    timeout = 20

    def deliver(self, starttls: str = "opportunistic", cacert: str | None = None, anyway: bool = False,
                smarthost: str | None = None) -> defer.Deferred:
        smarthost = smarthost or f"tcp:host=127.0.0.1:port={self.peerPort}"
        relay = RelaySettings(smarthost=smarthost, starttls=starttls, cacert=cacert,
                              auth=RelayAuth(user="me", password_file=str(self.password),
                                             insecure_send_password_without_verified_tls=anyway))
        opener = SessionOpener(Settings(hostname="relay.test", relay=relay), reactor, replyTimeout=5)
        pending = [outgoing()]
        results: list = []
        d = opener(SmarthostRouter(smarthost).target, lambda: pending.pop() if pending else None,
                   lambda m, r: results.extend(r))
        return d.addCallback(lambda _: results)

    @defer.inlineCallbacks
    def assertNoPasswordSent(self, d: defer.Deferred) -> Any:
        try:
            yield d
        except SessionError as e:
            error = e
        else:
            self.fail("delivered")
        self.assertEqual(authLines(self.peer), [])
        self.assertEqual(self.peer.delivered, 0)
        return error

    @defer.inlineCallbacks
    def test_selfSignedWithoutCafileNoAuth(self):
        """The old default (opportunistic) with auth: the unverified peer never sees AUTH."""
        self.startPeer()
        error = yield self.assertNoPasswordSent(self.deliver("opportunistic"))
        self.assertTrue(error.tlsFailed, str(error))
        self.assertEqual(len(self.peer.sessions), 1)  # no second try in clear

    @defer.inlineCallbacks
    def test_failedStarttlsNoAuthInClear(self):
        """STARTTLS offered, the handshake fails: no retry in clear text with the password."""
        self.startPeer(broken=True)
        yield self.assertNoPasswordSent(self.deliver("opportunistic"))
        self.assertEqual(len(self.peer.sessions), 1)

    @defer.inlineCallbacks
    def test_starttlsNoneWithAuthStillNeedsVerifiedTLS(self):
        self.startPeer()
        yield self.assertNoPasswordSent(self.deliver("none"))

    @defer.inlineCallbacks
    def test_implicitTLSInsecureStillVerified(self):
        self.startPeer(implicit=True)
        yield self.assertNoPasswordSent(
            self.deliver("opportunistic", smarthost=f"tls:host=127.0.0.1:port={self.peerPort}:insecure=yes"))

    @defer.inlineCallbacks
    def test_withCafileAuthOverTLS(self):
        self.startPeer()
        results = yield self.deliver("required", cacert=str(self.cert))
        self.assertEqual([reply.code for _, reply in results], [250])
        (auth,) = authLines(self.peer)
        self.assertTrue(auth[0], "AUTH arrived before TLS")
        self.assertTrue(auth[1].startswith(b"AUTH PLAIN "))

    @defer.inlineCallbacks
    def test_implicitTLSWithCafile(self):
        self.startPeer(implicit=True)
        results = yield self.deliver(smarthost=f"tls:host=127.0.0.1:port={self.peerPort}:cafile={self.cert}")
        self.assertEqual([reply.code for _, reply in results], [250])
        self.assertEqual([tls for tls, _ in authLines(self.peer)], [True])

    @defer.inlineCallbacks
    def test_explicitOptOutSendsAnyway(self):
        """The loudly named opt-out: the old behaviour (falls back to clear text, AUTH there)."""
        self.startPeer(broken=True)
        results = yield self.deliver("opportunistic", anyway=True)
        self.assertEqual([reply.code for _, reply in results], [250])
        self.assertEqual([tls for tls, _ in authLines(self.peer)], [False])


class DaemonDefersTests(PeerMixin, unittest.TestCase):
    """The daemon relays a message to the self-signed peer with auth: deferred (4xx, kept), no AUTH sent."""

    timeout = 30

    @defer.inlineCallbacks
    def test_deferredNotSent(self):
        self.startPeer()
        state = Path(self.mktemp()).absolute()
        settings = config.parse(f"""\
state_dir: {state}
services:
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: relay.test
    relay: {{smarthost: "tcp:host=127.0.0.1:port={self.peerPort}", starttls: required,
             auth: {{user: me, password_file: "{self.password}"}}}}
    queue: {{retry: [1h], fsync: false}}
""", "test.yaml")
        # What a file with the old default said (the config check refuses it now): opportunistic.
        smtp = settings.services["smtp"]
        smtp = attrs.evolve(smtp, relay=attrs.evolve(smtp.relay, starttls="opportunistic"))
        settings = attrs.evolve(settings, services={**settings.services, "smtp": smtp})
        daemon = buildDaemon(settings, reactor, configFile="test.yaml")
        daemon.privilegedStartService()
        daemon.startService()
        self.addCleanup(lambda: daemon.stopService() if daemon.running else None)
        number = port(daemon, 0, "smtp")

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", number, timeout=10) as c:
                return c.sendmail("carol@relay.test", ["bob@example.org"], b"Subject: s\r\n\r\nbody\r\n")

        self.assertEqual((yield threads.deferToThread(send)), {})
        envDir = state / "queue" / "env"
        deadline = time.monotonic() + 15
        text = ""
        while time.monotonic() < deadline:
            envs = sorted(envDir.iterdir()) if envDir.exists() else []
            text = envs[0].read_text() if envs else ""
            if "certificate verify failed" in text or self.peer.delivered:
                break
            yield sleep(0.05)
        self.assertEqual(authLines(self.peer), [])
        self.assertEqual(self.peer.delivered, 0)
        self.assertIn("certificate verify failed", text)
        envelope = json.loads(text)  # kept in the queue, to be retried (a 4xx: deferred, not bounced)
        (recipient,) = envelope["recipients"]
        self.assertEqual((recipient["status"], recipient["attempts"]), ("pending", 1))
        self.assertGreater(envelope["next_attempt"], envelope["created"] + 3000)  # retry: [1h]


class ConfigCheckTests(unittest.TestCase):
    """check-config (the settings' check()) refuses a password without verified TLS unless opted out."""

    def problems(self, relay: str) -> list[str]:
        try:
            config.parse("services:\n  smtp:\n    relay: " + relay + "\n", "t.yaml")
        except config.ConfigError as e:
            return [str(p) for p in e.problems]
        return []

    AUTH = "auth: {user: u, password_file: pw}"

    def test_refused(self):
        for relay, key in [
            (f'{{smarthost: "tcp:host=smtp.example:port=587", {self.AUTH}}}', "starttls"),  # the default
            (f'{{smarthost: "tcp:host=smtp.example:port=587", starttls: opportunistic, {self.AUTH}}}', "starttls"),
            (f'{{smarthost: "tcp:host=smtp.example:port=587", starttls: none, {self.AUTH}}}', "starttls"),
            (f'{{smarthost: "tls:host=smtp.example:port=465:insecure=yes", {self.AUTH}}}', "smarthost"),
        ]:
            (problem,) = self.problems(relay)
            self.assertIn(f"t.yaml: services.smtp.relay.{key}: ", problem)
            self.assertIn("insecure_send_password_without_verified_tls: true", problem)

    def test_accepted(self):
        for relay in [
            f'{{smarthost: "tcp:host=smtp.example:port=587", starttls: required, {self.AUTH}}}',
            f'{{smarthost: "tcp:host=smtp.example:port=587", starttls: required, cacert: ca.pem, {self.AUTH}}}',
            f'{{smarthost: "tls:host=smtp.example:port=465", {self.AUTH}}}',
            f'{{smarthost: "ssl:host=smtp.example:port=465:cafile=ca.pem", {self.AUTH}}}',
            '{smarthost: "tcp:host=smtp.example:port=25"}',  # no password: opportunistic is fine
            '{smarthost: "tcp:host=smtp.example:port=587", starttls: none, auth: {user: u, password_file: pw, '
            'insecure_send_password_without_verified_tls: true}}',
        ]:
            self.assertEqual(self.problems(relay), [], relay)

    def test_checkConfigCommand(self):
        import argparse
        import contextlib
        import io

        from netsvc.checkconfig import checkConfig

        path = Path(self.mktemp())
        path.write_text('services:\n  smtp:\n    relay: {smarthost: "tcp:host=smtp.example:port=587", '
                        'auth: {user: u, password_file: pw}}\n')
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = checkConfig(None, argparse.Namespace(files=[str(path)], strict=False))
        self.assertEqual(status, 1)
        self.assertIn("services.smtp.relay.starttls: with auth the smarthost password goes only over verified "
                      "TLS", err.getvalue())
