"""The SMTP service over loopback sockets: capture, STARTTLS + AUTH, implicit TLS, recovery, metrics."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from netsvc import auth
from tests.helpers import port, sleep, startDaemon


def config(state_users: str, extra: str = "") -> str:
    return f"""
services:
  smtp:
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {{endpoint: "tcp:0:interface=127.0.0.1", submission: true}}
      - {{endpoint: "tls:0:interface=127.0.0.1", submission: true}}
    hostname: mail.test
    users: {state_users}
    queue: {{fsync: true}}
{extra}"""


class ServiceTests(unittest.TestCase):
    def setUp(self):
        self.users = Path(self.mktemp()).absolute()
        auth.addUser(self.users, "alice", "s3cret")
        self.daemon = startDaemon(self, config(str(self.users)))
        self.svc = self.daemon.getServiceNamed("smtp")
        self.state = Path(self.daemon.context.stateDir)
        self.cafile = str(self.state / "tls" / "selfsigned.pem")

    def port(self, i):
        return port(self.daemon, i, "smtp")

    def tls(self):
        return ssl.create_default_context(cafile=self.cafile)

    def message(self, subject="hello"):
        m = EmailMessage()
        m["From"] = "dev@example.test"
        m["To"] = "someone@example.org"
        m["Subject"] = subject
        m.set_content("body text\n.leading dot\n")
        return m

    @defer.inlineCallbacks
    def test_relayPortCapturesDurably(self):
        captured = self.state / "captured"

        def send():
            with smtplib.SMTP("127.0.0.1", self.port(0), timeout=10) as c:
                refused = c.send_message(self.message())
                # the 250 came: the message is already on disk, committed
                return refused, sorted(p.name for p in (captured / "env").iterdir())

        refused, envs = yield threads.deferToThread(send)
        self.assertEqual(refused, {})
        self.assertEqual(len(envs), 1)
        (id,) = self.svc.capture.ids()
        data = self.svc.capture.raw(id)
        self.assertTrue(data.startswith(b"Received: from "))
        self.assertIn(b"\r\nSubject: hello\r\n", data)
        self.assertIn(b"\r\n.leading dot\r\n", data)
        self.assertEqual(self.svc.capture.envelope(id).recipients[0].address, "someone@example.org")
        text = self.daemon.context.metrics.render()
        self.assertIn('netsvc_smtp_messages_accepted_total{service="smtp"} 1', text)
        self.assertIn('netsvc_smtp_sessions_total{service="smtp"} 1', text)

    @defer.inlineCallbacks
    def test_submissionStarttlsAuth(self):
        def send():
            with smtplib.SMTP("127.0.0.1", self.port(1), timeout=10) as c:
                c.ehlo()
                self.assertNotIn("auth", c.esmtp_features)
                with self.assertRaises(smtplib.SMTPSenderRefused) as e:
                    c.sendmail("dev@example.test", ["x@example.org"], b"Subject: no\r\n\r\nx\r\n")
                self.assertEqual(e.exception.smtp_code, 530)
                c.starttls(context=self.tls())
                c.ehlo()
                self.assertEqual(c.esmtp_features["auth"].split(), ["PLAIN", "LOGIN"])
                with self.assertRaises(smtplib.SMTPAuthenticationError) as e:
                    c.login("alice", "wrong")
                self.assertEqual(e.exception.smtp_code, 535)
                c.login("alice", "s3cret")
                return c.send_message(self.message("submitted"))

        self.assertEqual((yield threads.deferToThread(send)), {})
        (id,) = self.svc.capture.ids()
        self.assertEqual(self.svc.capture.envelope(id).client["user"], "alice")
        self.assertIn(b"with ESMTPSA id", self.svc.capture.raw(id))

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        def send():
            with smtplib.SMTP_SSL("127.0.0.1", self.port(2), timeout=10, context=self.tls()) as c:
                c.login("alice", "s3cret")
                return c.send_message(self.message("over tls"))

        self.assertEqual((yield threads.deferToThread(send)), {})
        self.assertEqual(self.svc.capture.summary(self.svc.capture.ids()[0])["subject"], "over tls")

    @defer.inlineCallbacks
    def test_clientVanishesMidData(self):
        def talk():
            s = socket.create_connection(("127.0.0.1", self.port(0)), timeout=10)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO x\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            for _ in range(3):
                f.readline()
            s.sendall(b"Subject: cut\r\n\r\n" + b"partial line\r\n" * 100)
            time.sleep(0.1)
            s.close()

        yield threads.deferToThread(talk)
        captured = self.state / "captured"
        for _ in range(50):
            if not list((captured / "tmp").iterdir()):
                break
            yield sleep(0.02)
        self.assertEqual(list((captured / "tmp").iterdir()), [])
        self.assertEqual(self.svc.capture.ids(), [])

    @defer.inlineCallbacks
    def test_otherSessionsUnaffectedByBadClient(self):
        def bad():
            s = socket.create_connection(("127.0.0.1", self.port(0)), timeout=10)
            s.recv(100)
            s.sendall(b"EHLO x\n")  # bare LF: 521 and closed
            out = s.recv(200)
            s.close()
            return out

        def good():
            with smtplib.SMTP("127.0.0.1", self.port(0), timeout=10) as c:
                return c.send_message(self.message("fine"))

        out, refused = yield defer.gatherResults([threads.deferToThread(bad), threads.deferToThread(good)])
        self.assertTrue(out.startswith(b"521 5.5.2"), out)
        self.assertEqual(refused, {})
        self.assertEqual(len(self.svc.capture.ids()), 1)


    @defer.inlineCallbacks
    def test_reconfigure(self):
        from netsvc import config as cfg

        settings = cfg.parse(f"services: {{smtp: {{users: {self.users}, max_message_size: 2KB, "
                             f"hostname: new.test, mynetworks: []}}}}").services["smtp"]
        self.svc.reconfigure(settings)

        def send():
            with smtplib.SMTP("127.0.0.1", self.port(0), timeout=10) as c:
                code, text = c.ehlo()
                self.assertIn(b"SIZE 2000", text)
                self.assertTrue(text.startswith(b"new.test"))
                with self.assertRaises(smtplib.SMTPRecipientsRefused):  # no longer in mynetworks
                    c.sendmail("a@example.test", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")

        yield threads.deferToThread(send)


class ConnectionLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_perIPLimitAnswers421(self):
        daemon = startDaemon(self, "services:\n  smtp:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
                                   "    limits: {max_connections_per_ip: 2}\n")
        p = port(daemon, 0, "smtp")

        def connect():
            socks = [socket.create_connection(("127.0.0.1", p), timeout=10) for _ in range(3)]
            banners = [s.recv(200) for s in socks]
            for s in socks:
                s.close()
            return banners

        banners = yield threads.deferToThread(connect)
        self.assertEqual([b[:4] for b in banners], [b"220 ", b"220 ", b"421 "])
        self.assertIn(b"4.7.0", banners[2])


class SilentClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_silentClientOnImplicitTLSIsClosed(self):
        """
        A client that connects to the TLS port and never says anything: the idle timeout's 421 cannot
        go out (no handshake) and a TLS close waits for the peer -- the connection is aborted instead
        of staying open for ever.
        """
        from netsvc.smtp import protocol

        self.patch(protocol, "CLOSE_GRACE", 0.5)
        daemon = startDaemon(self, "services:\n  smtp:\n    listen: ['tls:0:interface=127.0.0.1']\n"
                                   "    limits: {idle_timeout: 1s}\n")
        p = port(daemon, 0, "smtp")

        def silent():
            with socket.create_connection(("127.0.0.1", p), timeout=10) as s:
                started = time.monotonic()
                try:
                    data = s.recv(100)
                except ConnectionResetError:
                    data = b""
                return data, time.monotonic() - started

        data, waited = yield threads.deferToThread(silent)
        self.assertEqual(data, b"")
        self.assertLess(waited, 5)


    @defer.inlineCallbacks
    def test_silentClientOverTheLimitOnImplicitTLSIsClosed(self):
        """A connection over the per-IP limit on the TLS port gets its 421 if it does the handshake, else an abort."""
        from netsvc.smtp import protocol

        self.patch(protocol, "CLOSE_GRACE", 0.5)
        daemon = startDaemon(self, "services:\n  smtp:\n    listen: ['tls:0:interface=127.0.0.1']\n"
                                   "    limits: {idle_timeout: 1m, max_connections_per_ip: 1}\n")
        p = port(daemon, 0, "smtp")
        cafile = str(Path(daemon.context.stateDir) / "tls" / "selfsigned.pem")

        def overTheLimit():
            with socket.create_connection(("127.0.0.1", p), timeout=10) as first:
                first.settimeout(1)
                with socket.create_connection(("127.0.0.1", p), timeout=10) as silent:
                    started = time.monotonic()
                    try:
                        data = silent.recv(100)
                    except ConnectionResetError:
                        data = b""
                    waited = time.monotonic() - started
                ctx = ssl.create_default_context(cafile=cafile)
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", p), timeout=10),
                                     server_hostname="localhost") as polite:
                    banner = polite.recv(200)
                return data, waited, banner

        data, waited, banner = yield threads.deferToThread(overTheLimit)
        self.assertEqual(data, b"")
        self.assertLess(waited, 5)
        self.assertTrue(banner.startswith(b"421 4.7.0"), banner)


class RecoveryTests(unittest.TestCase):
    def test_recoveryAtStart(self):
        import attrs

        from netsvc import config as cfg
        from netsvc.runtime import buildDaemon

        state = Path(self.mktemp()).absolute()
        for sub in ("tmp", "msg", "env"):
            (state / "captured" / sub).mkdir(parents=True)
        (state / "captured" / "tmp" / "half.msg").write_bytes(b"x")
        (state / "captured" / "msg" / "unacked").write_bytes(b"y")
        settings = cfg.parse(f"state_dir: {state}\nservices: {{smtp: {{listen: ['tcp:0:interface=127.0.0.1']}}}}")
        settings = attrs.evolve(settings)
        daemon = buildDaemon(settings)
        # built, not started: nothing removed yet (check-config never touches a running daemon's files)
        self.assertTrue((state / "captured" / "tmp" / "half.msg").exists())
        daemon.privilegedStartService()
        daemon.startService()
        self.addCleanup(daemon.stopService)
        self.assertEqual(list((state / "captured" / "tmp").iterdir()), [])
        self.assertEqual(list((state / "captured" / "msg").iterdir()), [])

    def test_badConfig(self):
        from netsvc import config as cfg

        with self.assertRaises(cfg.ConfigError) as e:
            cfg.parse("services: {smtp: {relay: {capture: true, mx: true}, max_recipients: 0}}", "f.yaml")
        text = str(e.exception)
        self.assertIn("f.yaml: services.smtp.max_recipients: must be at least 1", text)
