"""
The SMTP relay, run as the real daemon (C{twistd -n netsvc --config ...}) in
capture mode, exercised by clients nobody here wrote: swaks (STARTTLS, AUTH,
pipelining, implicit TLS), Python's smtplib (the books' senders) and Postfix's
smtp-source under load.

The daemon listens on 127.0.0.1 (relay port, submission with STARTTLS, submission
over TLS, all port 0) and on 127.0.0.2 (relay port); only 127.0.0.1 is in
mynetworks, so a client from 127.0.0.2 is an outsider (no open relay).
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from twisted.trial import unittest

from netsvc import auth
from tests.helpers import loopbackAliasesWork
from tests.interop._daemon import IO_TIMEOUT, decoded, requirePeer, runToCompletion, startNetsvc
from tests.interop._mailpeers import PostfixInstance, runSmtpSource

RELAY = "services.smtp.listen[0]"
SUBMISSION = "services.smtp.listen[1]"
SMTPS = "services.smtp.listen[2]"
OUTSIDE = "services.smtp.listen[3]"


class SMTPDaemonTestCase(unittest.TestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        auth.addUser(base / "users.txt", "dev", "devpass")
        outside = '      - "tcp:0:interface=127.0.0.2"\n' if loopbackAliasesWork() else ""
        (base / "netsvc.yaml").write_text(
            "state_dir: state\n"
            "drain_timeout: 1s\n"
            "services:\n"
            "  smtp:\n"
            "    listen:\n"
            '      - "tcp:0:interface=127.0.0.1"\n'
            '      - {endpoint: "tcp:0:interface=127.0.0.1", submission: true}\n'
            '      - {endpoint: "tls:0:interface=127.0.0.1", submission: true}\n'
            + outside +
            "    hostname: mail.test\n"
            "    mynetworks: [127.0.0.1/32]\n"
            "    users: users.txt\n"
            "    max_messages_per_session: 1000\n"
            "    limits: {rate: 0}\n"
        )
        self.daemon = startNetsvc(self, base / "netsvc.yaml", base / "state")
        self.state = base / "state"
        self.cafile = self.daemon.cafile

    def port(self, key: str) -> int:
        return self.daemon.port(key)

    def captured(self) -> list[Path]:
        env = self.state / "captured" / "env"
        return sorted(env.iterdir()) if env.exists() else []

    def newOne(self, before: int) -> Path:
        """The one envelope captured since there were C{before}."""
        captured = self.captured()
        self.assertEqual(len(captured), before + 1)
        return captured[-1]

    def capturedMessage(self, envPath: Path) -> bytes:
        return (self.state / "captured" / "msg" / envPath.name[:-5]).read_bytes()

    def swaks(self, *args: str) -> tuple[int, str]:
        swaks = requirePeer("swaks", "swaks")
        if any(a.startswith("--tls") for a in args):
            check = subprocess.run(["perl", "-MNet::SSLeay", "-MIO::Socket::SSL", "-e", "1"], capture_output=True)
            if check.returncode != 0:
                raise unittest.SkipTest("swaks needs Net::SSLeay and IO::Socket::SSL for TLS: install "
                                        "the Debian packages libnet-ssleay-perl libio-socket-ssl-perl")
        result = runToCompletion(self, [swaks, "--from", "dev@example.test", "--to", "qa@example.org",
                                        "--server", "127.0.0.1", "--timeout", "10", "--helo", "client.test",
                                        *args], timeout=30)
        return result.returncode, decoded(result)


class SwaksTests(SMTPDaemonTestCase):
    def check_starttlsAuthVerified(self):
        n = len(self.captured())
        rc, out = self.swaks("--port", str(self.port(SUBMISSION)), "--tls", "--tls-verify",
                             "--tls-ca-path", self.cafile, "--auth", "PLAIN", "--auth-user", "dev",
                             "--auth-password", "devpass", "--header", "Subject: via swaks")
        self.assertEqual(rc, 0, out)
        self.assertIn("<-  220 2.0.0 Ready to start TLS", out)
        self.assertIn(" ~> AUTH PLAIN", out)  # sent under TLS
        self.assertIn("235 2.7.0 Authentication successful", out)
        self.assertIn("250 2.0.0 Ok: queued as", out)
        env = self.newOne(n)
        self.assertEqual(json.loads(env.read_text())["client"]["user"], "dev")
        self.assertIn(b"Subject: via swaks", self.capturedMessage(env))

    def check_authLoginImplicitTLS(self):
        n = len(self.captured())
        rc, out = self.swaks("--port", str(self.port(SMTPS)), "--tls-on-connect", "--tls-verify",
                             "--tls-ca-path", self.cafile, "--auth", "LOGIN", "--auth-user", "dev",
                             "--auth-password", "devpass")
        self.assertEqual(rc, 0, out)
        self.assertEqual(len(self.captured()), n + 1)

    def check_pipelining(self):
        n = len(self.captured())
        rc, out = self.swaks("--port", str(self.port(RELAY)), "--pipeline", "--to", "a@example.org,b@example.org")
        self.assertEqual(rc, 0, out)
        self.assertIn("PIPELINING", out)
        env = self.newOne(n)
        self.assertEqual([r["address"] for r in json.loads(env.read_text())["recipients"]],
                         ["a@example.org", "b@example.org"])

    def check_authRefusedWithoutTLS(self):
        n = len(self.captured())
        rc, out = self.swaks("--port", str(self.port(RELAY)), "--auth", "PLAIN", "--auth-user", "dev",
                             "--auth-password", "devpass")
        self.assertNotEqual(rc, 0, out)
        self.assertIn("Host did not advertise authentication", out)
        # and sent anyway: the server refuses it before TLS
        with socket.create_connection(("127.0.0.1", self.port(RELAY)), timeout=IO_TIMEOUT) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO client.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            sock.sendall(b"AUTH PLAIN AGRldgBkZXZwYXNz\r\n")
            self.assertTrue(f.readline().startswith(b"538 5.7.11"))
        self.assertEqual(len(self.captured()), n)

    def check_wrongPasswordAndSubmissionWithoutAuth(self):
        n = len(self.captured())
        rc, out = self.swaks("--port", str(self.port(SUBMISSION)), "--tls", "--tls-ca-path", self.cafile,
                             "--auth", "PLAIN", "--auth-user", "dev", "--auth-password", "wrong")
        self.assertNotEqual(rc, 0)
        self.assertIn("535 5.7.8", out)
        rc, out = self.swaks("--port", str(self.port(SUBMISSION)), "--tls", "--tls-ca-path", self.cafile)
        self.assertNotEqual(rc, 0)
        self.assertIn("530 5.7.0 Authentication required", out)
        self.assertEqual(len(self.captured()), n)

    def check_noOpenRelay(self):
        n = len(self.captured())
        if not loopbackAliasesWork():
            raise unittest.SkipTest("127.0.0.2 cannot be bound here (needed as an outside address)")
        rc, out = self.swaks("--server", "127.0.0.2", "--port", str(self.port(OUTSIDE)),
                             "--local-interface", "127.0.0.2")
        self.assertNotEqual(rc, 0)
        self.assertIn("554 5.7.1 <qa@example.org>: Relay access denied", out)
        self.assertEqual(len(self.captured()), n)


    def test_submission(self):
        """One daemon: STARTTLS + AUTH PLAIN verified, implicit TLS + AUTH LOGIN, wrong password, no AUTH."""
        self.check_starttlsAuthVerified()
        self.check_authLoginImplicitTLS()
        self.check_wrongPasswordAndSubmissionWithoutAuth()

    def test_relayPort(self):
        """One daemon: pipelining, AUTH refused without TLS, no open relay for an outsider."""
        self.check_pipelining()
        self.check_authRefusedWithoutTLS()
        self.check_noOpenRelay()


class SmtplibTests(SMTPDaemonTestCase):
    def message(self) -> EmailMessage:
        m = EmailMessage()
        m["From"] = "dev@example.test"
        m["To"] = "qa@example.org"
        m["Subject"] = "with attachment"
        m.set_content("Hello,\n.a line starting with a dot\n\nSee the attachment.\n")
        m.add_attachment(bytes(range(256)) * 300, maintype="application", subtype="octet-stream",
                         filename="blob.bin")
        return m

    def check_plainRelayFromMynetworksWithAttachment(self):
        n = len(self.captured())
        with smtplib.SMTP("127.0.0.1", self.port(RELAY), timeout=IO_TIMEOUT) as c:
            self.assertEqual(c.send_message(self.message()), {})
        env = self.newOne(n)
        stored = message_from_bytes(self.capturedMessage(env), policy=policy.default)
        self.assertEqual(stored.get_body(("plain",)).get_content().replace("\r\n", "\n"),
                         "Hello,\n.a line starting with a dot\n\nSee the attachment.\n")
        (att,) = stored.iter_attachments()
        self.assertEqual((att.get_filename(), att.get_payload(decode=True)), ("blob.bin", bytes(range(256)) * 300))
        self.assertTrue(stored["Received"].startswith("from "))

    def check_starttlsAuthPlainSubmission(self):
        n = len(self.captured())
        with smtplib.SMTP("127.0.0.1", self.port(SUBMISSION), timeout=IO_TIMEOUT) as c:
            c.starttls(context=ssl.create_default_context(cafile=self.cafile))
            c.ehlo()
            self.assertEqual(c.esmtp_features["auth"].split(), ["PLAIN", "LOGIN"])
            self.assertEqual(c.login("dev", "devpass")[0], 235)  # smtplib picks PLAIN
            self.assertEqual(c.send_message(self.message()), {})
        self.assertEqual(json.loads(self.newOne(n).read_text())["client"]["user"], "dev")

    def test_booksSenders(self):
        """One daemon: plain relay with an attachment, STARTTLS + AUTH PLAIN, an outsider refused."""
        self.check_plainRelayFromMynetworksWithAttachment()
        self.check_starttlsAuthPlainSubmission()
        self.check_outsiderRefused()

    def check_outsiderRefused(self):
        n = len(self.captured())
        if not loopbackAliasesWork():
            raise unittest.SkipTest("127.0.0.2 cannot be bound here (needed as an outside address)")
        with smtplib.SMTP("127.0.0.2", self.port(OUTSIDE), timeout=IO_TIMEOUT,
                          source_address=("127.0.0.2", 0)) as c:
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as e:
                c.sendmail("dev@example.test", ["qa@example.org"], b"Subject: x\r\n\r\nx\r\n")
        self.assertEqual(e.exception.recipients["qa@example.org"][0], 554)
        self.assertEqual(len(self.captured()), n)


class LoadTests(SMTPDaemonTestCase):
    def test_smtpSourceEveryMessageCaptured(self):
        count = 300
        started = time.monotonic()
        result = runSmtpSource(self.port(RELAY), sessions=8, messages=count, size=2048,
                               recipient="sink@example.org", timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(self.captured()), count, f"after {time.monotonic() - started:.1f}s")
        ids = [p.name[:-5] for p in self.captured()]
        self.assertEqual(len(set(ids)), count)
        self.assertEqual(list((self.state / "captured" / "tmp").iterdir()), [])


class PostfixClientTests(SMTPDaemonTestCase):
    def test_postfixRelaysIntoNetsvc(self):
        """A real Postfix (its smtp client: EHLO, STARTTLS offered, PIPELINING) relays to the relay port."""
        requirePeer("postfix", "postfix")
        postfix = PostfixInstance(self, mode="relay", relayhost=f"127.0.0.1:{self.port(RELAY)}",
                                  domains=["example.org"])
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=IO_TIMEOUT) as c:
            for i in range(3):
                c.sendmail("dev@example.test", ["qa@example.org"],
                           f"Subject: through postfix {i}\r\n\r\nhello\r\n".encode())
        deadline = time.monotonic() + 30
        while len(self.captured()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(len(self.captured()), 3, postfix.output()[-2000:])
        subjects = sorted(message_from_bytes(self.capturedMessage(e))["Subject"] for e in self.captured())
        self.assertEqual(subjects, [f"through postfix {i}" for i in range(3)])
        self.assertIn("status=sent (250 2.0.0 Ok: queued as", postfix.output())


class TLSAndBadInputTests(SMTPDaemonTestCase):
    def test_opensslStarttlsAndInjection(self):
        """
        openssl s_client negotiates STARTTLS and verifies the certificate; commands pipelined behind
        STARTTLS in clear (CVE-2011-0411) are refused and the session ends without TLS.
        """
        openssl = requirePeer("openssl", "openssl")
        result = runToCompletion(self, [openssl, "s_client", "-starttls", "smtp", "-connect",
                                        f"127.0.0.1:{self.port(SUBMISSION)}", "-CAfile", self.cafile,
                                        "-verify_return_error", "-brief"], timeout=30)
        out = decoded(result)
        self.assertEqual(result.returncode, 0, out)
        self.assertIn("Verification: OK", out)
        with socket.create_connection(("127.0.0.1", self.port(SUBMISSION)), timeout=IO_TIMEOUT) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO client.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\nAUTH PLAIN AGRldgBkZXZwYXNz\r\n")
            self.assertTrue(f.readline().startswith(b"554 5.5.0"))
            self.assertEqual(f.readline(), b"")  # closed, never in TLS

    def test_badInputEndsOnlyTheTransaction(self):
        """Over the real daemon: NUL, bare CR, an over-long line -- that message refused, the session goes on."""
        n = len(self.captured())
        with socket.create_connection(("127.0.0.1", self.port(RELAY)), timeout=IO_TIMEOUT) as sock:
            f = sock.makefile("rb")

            def reply() -> bytes:
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
                return line

            reply()
            sock.sendall(b"EHLO client.test\r\n")
            reply()
            for body, code in [(b"a\0b\r\n", b"554 5.6.0"), (b"a\rb\r\n", b"554 5.6.0"),
                               (b"x" * 1200 + b"\r\n", b"500 5.5.2")]:
                sock.sendall(b"MAIL FROM:<dev@example.test>\r\nRCPT TO:<qa@example.org>\r\nDATA\r\n")
                self.assertEqual([reply()[:3] for _ in range(3)], [b"250", b"250", b"354"])
                sock.sendall(b"Subject: bad\r\n\r\n" + body + b".\r\n")
                self.assertTrue(reply().startswith(code), body[:10])
            sock.sendall(b"NOOP\r\n")
            self.assertTrue(reply().startswith(b"250 2.0.0"))
            sock.sendall(b"MAIL FROM:<dev@example.test>\r\nRCPT TO:<qa@example.org>\r\nDATA\r\n")
            [reply() for _ in range(3)]
            sock.sendall(b"Subject: bare LF\r\n\r\nline\n.\r\n")
            self.assertTrue(reply().startswith(b"521 5.5.2"))
            self.assertEqual(f.readline(), b"")
        self.assertEqual(len(self.captured()), n)
        self.assertEqual(list((self.state / "captured" / "tmp").iterdir()), [])
