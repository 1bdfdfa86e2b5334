"""
Delivery interop: the real daemon (C{twistd -n netsvc}) relaying to real mail
servers -- Postfix's C{smtp-sink} as a smarthost, a real Postfix as the
upstream (STARTTLS verified, its bounces coming back as RFC 3464 reports), and
MX delivery through netsvc's own DNS service.  Messages go in with Python's
smtplib; each test is bounded in count and time.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, decoded, runToCompletion, startNetsvc
from tests.interop._mailpeers import PostfixInstance, Scratch, SmtpSink, freeTCPPort

#: How long relayed mail may take to arrive.
ARRIVAL = 20.0


def message(subject: str, body: str = "hello\r\n", sender: str = "alice@example.test",
            to: str = "bob@example.test") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n"
            f"\r\n{body}").encode()


def scratch(testCase: unittest.TestCase) -> Scratch:
    """
    Short, world-traversable temporary folders for the peers: smtp-sink runs as
    nobody (trial's mktemp folders are 0700), and Postfix's unix sockets under its
    queue folder must fit in 108 bytes (trial's paths for these tests do not).
    """
    s = Scratch()
    testCase.addCleanup(s.cleanup)
    return s


def startSink(testCase: unittest.TestCase, **kwargs) -> SmtpSink:
    return SmtpSink(scratch(testCase), **kwargs)


class RelayTestMixin:
    def startRelay(self, relay: str, extra: str = "", queue: str = "{retry: [1s, 2s], fsync: true}"):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        config = folder / "netsvc.yaml"
        config.write_text(f"""\
state_dir: {folder}/var
services:
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: relay.test
    relay: {relay}
    queue: {queue}
{extra}""")
        self.daemon = startNetsvc(self, config, folder / "var")
        self.port = self.daemon.port("services.smtp.listen[0]")
        self.queueDir = folder / "var" / "queue"
        return self.daemon

    def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=IO_TIMEOUT) as s:
            s.sendmail(sender, recipients, data)

    def queued(self) -> list[str]:
        env = self.queueDir / "env"
        return sorted(env.iterdir()) if env.exists() else []

    def waitForEmptyQueue(self, timeout: float = ARRIVAL) -> None:
        deadline = time.monotonic() + timeout
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.queued(), [], self.daemon.output()[-3000:])


class SmtpSinkSmarthostTests(RelayTestMixin, unittest.TestCase):
    def test_relayedIntactOnceEach(self) -> None:
        sink = startSink(self)
        self.startRelay(f'{{smarthost: "{sink.endpoint}", starttls: none}}')
        tricky = "first\r\n.starts with a dot\r\n..two dots\r\n.\r\ncaf\u00e9 8-bit\r\n"
        for i in range(10):
            self.send("alice@example.test", [f"bob{i}@example.test", f"carol{i}@other.test"],
                      message(f"m{i}", tricky))
        got = sink.waitForMessages(10, ARRIVAL)
        self.assertEqual(len(got), 10, self.daemon.output()[-3000:])
        subjects = sorted(email.message_from_bytes(m).get("Subject") for m in got)
        self.assertEqual(subjects, sorted(f"m{i}" for i in range(10)))
        for m in got:
            n = email.message_from_bytes(m).get("Subject")[1:]
            self.assertIn(f"X-Rcpt-Args: <bob{n}@example.test>".encode(), m)
            self.assertIn(f"X-Rcpt-Args: <carol{n}@other.test>".encode(), m)
            self.assertIn(b"X-Mail-Args: <alice@example.test>", m)
            # dot lines and 8-bit bytes as they were (smtp-sink writes its dumps with LF line ends)
            self.assertIn(tricky.replace("\r\n", "\n").encode("utf-8"), m)
            self.assertIn(b"by relay.test", m)  # our Received header went along
        self.waitForEmptyQueue()

    def test_deferredWhileDownThenDelivered(self) -> None:
        port = freeTCPPort()
        self.startRelay(f'{{smarthost: "tcp:host=127.0.0.1:port={port}", starttls: none}}')
        self.send("alice@example.test", ["bob@example.test"], message("later"))
        deadline = time.monotonic() + ARRIVAL
        while time.monotonic() < deadline:
            envs = [p.read_text() for p in self.queued()]
            if envs and '"attempts":1' in envs[0].replace(" ", ""):
                break
            time.sleep(0.05)
        self.assertIn("connection refused", self.queued()[0].read_text())
        sink = startSink(self, port=port)  # the smarthost comes up; the retry (1s, 2s, 2s ...) finds it
        got = sink.waitForMessages(1, ARRIVAL)
        self.assertEqual([email.message_from_bytes(m).get("Subject") for m in got], ["later"])
        self.waitForEmptyQueue()


class PostfixUpstreamTests(RelayTestMixin, unittest.TestCase):
    def test_starttlsVerifiedToPostfixAndBouncesComeBack(self) -> None:
        from netsvc.tls import generateSelfSigned

        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        cert, key = folder / "postfix.pem", folder / "postfix.key"
        generateSelfSigned(cert, key, ["127.0.0.1", "postfix.test"])
        cert.chmod(0o644)
        key.chmod(0o644)  # Postfix's smtpd reads it after dropping privileges
        # We are not in its mynetworks: it refuses to relay elsewhere (554 5.7.1) at RCPT time.
        postfix = PostfixInstance(scratch(self), mode="mailbox", domains=["example.test"],
                                  tls=(str(cert), str(key)), main={"mynetworks": "192.0.2.0/24"})
        self.startRelay(f'{{smarthost: "{postfix.endpoint}", starttls: required, cacert: "{cert}"}}')
        self.send("carol@example.test", ["bob@example.test"], message("via-postfix"))
        # A domain Postfix does not relay for: refused (554 5.7.1) -> a report back to the sender.
        self.send("carol@example.test", ["dave@elsewhere.test"], message("refused", to="dave@elsewhere.test"))
        got = postfix.waitForMessages(2, ARRIVAL)
        self.assertEqual(len(got), 2, postfix.output()[-2000:] + self.daemon.output()[-3000:])
        byKind = {}
        for raw in got:
            m = email.message_from_bytes(raw, policy=email.policy.default)
            byKind["report" if m.get_content_type() == "multipart/report" else "plain"] = m
        plain = byKind["plain"]
        self.assertEqual(plain["Subject"], "via-postfix")
        received = plain.get_all("Received")
        self.assertIn("ESMTPS", received[0])  # Postfix saw TLS (verified by us: starttls required + cacert)
        self.assertIn("by relay.test", received[1])
        report = byKind["report"]
        self.assertEqual(report["To"].addresses[0].addr_spec, "carol@example.test")
        self.assertIn("MAILER-DAEMON@relay.test", report["From"])
        self.assertIn(b"Return-Path: <>", [r for r in got if b"multipart/report" in r][0])
        status = list(report.iter_parts())[1].get_payload()[1]
        self.assertEqual(status["Final-Recipient"], "rfc822; dave@elsewhere.test")
        self.assertEqual(status["Action"], "failed")
        self.assertTrue(status["Status"].startswith("5."))
        self.assertIn("smtp; 5", status["Diagnostic-Code"])
        self.assertIn("Subject: refused", list(report.iter_parts())[2].as_string())
        self.waitForEmptyQueue()

    def test_starttlsRequiredWithWrongCertificateDefers(self) -> None:
        from netsvc.tls import generateSelfSigned

        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        cert, key = folder / "postfix.pem", folder / "postfix.key"
        other, otherKey = folder / "other.pem", folder / "other.key"
        generateSelfSigned(cert, key, ["127.0.0.1"])
        generateSelfSigned(other, otherKey, ["127.0.0.1"])
        key.chmod(0o644)
        postfix = PostfixInstance(scratch(self), mode="mailbox", domains=["example.test"], tls=(str(cert), str(key)))
        self.startRelay(f'{{smarthost: "{postfix.endpoint}", starttls: required, cacert: "{other}"}}')
        self.send("carol@example.test", ["bob@example.test"], message("unverified"))
        deadline = time.monotonic() + ARRIVAL
        while time.monotonic() < deadline:
            envs = [p.read_text() for p in self.queued()]
            if envs and "last_error" in envs[0] and '"last_error":null' not in envs[0].replace(" ", ""):
                break
            time.sleep(0.05)
        self.assertEqual(postfix.messages(), [])
        self.assertIn("certificate verify failed", self.queued()[0].read_text())


class MXDeliveryTests(RelayTestMixin, unittest.TestCase):
    def test_mxThroughNetsvcDNS(self) -> None:
        sink = startSink(self)
        dns = """\
  dns:
    listen: ["udp:0:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:9"]
    timeout: 0.2
    records:
      - {name: mx.test, type: MX, value: "20 backup.mx.test"}
      - {name: mx.test, type: MX, value: "10 primary.mx.test"}
      - {name: primary.mx.test, type: A, value: 127.0.0.1}
      - {name: backup.mx.test, type: A, value: 127.0.0.2}
      - {name: nomail.test, type: TXT, value: "no MX, no address"}
      - {name: direct.test, type: A, value: 127.0.0.1}
"""
        self.startRelay(f"{{mx: true, port: {sink.port}, starttls: opportunistic}}", extra=dns)
        self.send("alice@mx.test", ["bob@mx.test", "eve@direct.test"], message("by-mx"))
        self.send("alice@mx.test", ["nobody@nomail.test"], message("no-route"))
        got = sink.waitForMessages(3, ARRIVAL)
        self.assertEqual(len(got), 3, self.daemon.output()[-3000:])
        plain = [m for m in got if b"Subject: by-mx" in m]
        self.assertEqual(len(plain), 2)  # one transaction per domain
        self.assertEqual(sorted(r for m in plain for r in m.split(b"\n") if r.startswith(b"X-Rcpt-Args")),
                         [b"X-Rcpt-Args: <bob@mx.test>", b"X-Rcpt-Args: <eve@direct.test>"])
        (report,) = [m for m in got if b"multipart/report" in m]
        self.assertIn(b"X-Mail-Args: <>", report)
        self.assertIn(b"Final-Recipient: rfc822; nobody@nomail.test", report)
        self.assertIn(b"Status: 5.4.4", report)  # no MX and no address: given up at once
        self.waitForEmptyQueue()


def netsvc(testCase: unittest.TestCase, *args: str, input: bytes = b"") -> tuple[int, str]:
    result = runToCompletion(testCase, [sys.executable, "-m", "netsvc", *args], input=input)
    return result.returncode, decoded(result)


class MailCommandTests(RelayTestMixin, unittest.TestCase):
    """C{netsvc mail send/adduser/queue} as a user runs them, against the real daemon."""

    def startSubmission(self) -> tuple[Path, Path]:
        """A capture-mode daemon with a user alice (added by netsvc mail adduser) on submission ports."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        password = folder / "pw"
        password.write_text("correct horse\n")
        status, out = netsvc(self, "mail", "adduser", "alice", "--users", str(folder / "users.txt"),
                             "--password-file", str(password))
        self.assertEqual(status, 0, out)
        self.assertTrue((folder / "users.txt").read_text().startswith("alice:scrypt:"))
        config = folder / "netsvc.yaml"
        config.write_text(f"""\
state_dir: {folder}/var
services:
  smtp:
    listen:
      - {{endpoint: "tcp:0:interface=127.0.0.1", submission: true}}
      - {{endpoint: "tls:0:interface=127.0.0.1", submission: true}}
    hostname: submit.test
    users: users.txt
    relay: {{capture: true}}
""")
        self.submission = startNetsvc(self, config, folder / "var")
        return folder, password

    def captured(self, folder: Path) -> list[bytes]:
        msg = folder / "var" / "captured" / "msg"
        return [p.read_bytes() for p in sorted(msg.iterdir())] if msg.exists() else []

    def test_sendStarttlsAuthAttachImplicitTLSAndFailures(self) -> None:
        folder, password = self.startSubmission()
        starttls = self.submission.port("services.smtp.listen[0]")
        implicit = self.submission.port("services.smtp.listen[1]")
        attachment = folder / "report.pdf"
        attachment.write_bytes(b"%PDF-1.4 not really\n")
        common = ["--user", "alice", "--password-file", str(password), "--cacert", self.submission.cafile,
                  "--from", "alice@submit.test", "--to", "bob@example.org"]
        status, out = netsvc(self, "mail", "send", "--server", f"localhost:{starttls}", "--starttls", *common,
                             "--subject", "with STARTTLS", "--attach", str(attachment), "-v",
                             input=b"Hello Bob,\n.a dot line\n")
        self.assertEqual(status, 0, out)
        self.assertIn("> STARTTLS", out)
        self.assertIn("> AUTH PLAIN <credentials>", out)
        self.assertIn("< 235", out)
        self.assertNotIn("correct horse", out)
        status, out = netsvc(self, "mail", "send", "--server", f"localhost:{implicit}", "--tls", *common,
                             "--subject", "implicit TLS", input=b"second\n")
        self.assertEqual(status, 0, out)
        self.assertIn("sent to 1 of 1 recipient(s): 250", out)
        got = [email.message_from_bytes(m, policy=email.policy.default) for m in self.captured(folder)]
        self.assertEqual(sorted(m["Subject"] for m in got), ["implicit TLS", "with STARTTLS"])
        first = next(m for m in got if m["Subject"] == "with STARTTLS")
        body, pdf = first.iter_parts()
        self.assertEqual(body.get_content().replace("\r\n", "\n"), "Hello Bob,\n.a dot line\n")
        self.assertEqual((pdf.get_content_type(), pdf.get_filename(), pdf.get_content()),
                         ("application/pdf", "report.pdf", b"%PDF-1.4 not really\n"))

        # Failures: one line each, exit status 1.
        wrong = folder / "wrong"
        wrong.write_text("nope\n")
        base = ["mail", "send", "--server", f"localhost:{starttls}", "--starttls", "--from", "alice@submit.test",
                "--to", "bob@example.org"]
        status, out = netsvc(self, *base, "--user", "alice", "--password-file", str(wrong), "--cacert",
                             self.submission.cafile, input=b"x\n")
        self.assertEqual(status, 1)
        self.assertRegex(out.strip(), r"^netsvc mail: sending to localhost:\d+: AUTH: 535 ")
        status, out = netsvc(self, *base, input=b"x\n")  # the self-signed certificate is not trusted
        self.assertEqual(status, 1)
        self.assertIn("certificate verify failed", out)
        self.assertEqual(len(out.strip().splitlines()), 1, out)
        status, out = netsvc(self, "mail", "send", "--server", f"127.0.0.1:{freeTCPPort()}",
                             "--from", "a@x.test", "--to", "b@x.test", input=b"x\n")
        self.assertEqual(status, 1)
        self.assertRegex(out.strip(), r"^netsvc mail: connecting to 127.0.0.1:\d+: .*refused")
        self.assertEqual(len(self.captured(folder)), 2)  # nothing more

    def test_relayAuthenticatesToItsSmarthost(self) -> None:
        folder, password = self.startSubmission()
        port = self.submission.port("services.smtp.listen[0]")
        self.startRelay(f'{{smarthost: "tcp:host=localhost:port={port}", starttls: required, '
                        f'cacert: "{self.submission.cafile}", auth: {{user: alice, password_file: "{password}"}}}}')
        self.send("carol@relay.test", ["bob@example.org"], message("relayed with AUTH"))
        deadline = time.monotonic() + ARRIVAL
        while not self.captured(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        (raw,) = self.captured(folder)
        received = email.message_from_bytes(raw).get_all("Received")
        self.assertIn("by submit.test", received[0])
        self.assertIn("ESMTPSA", received[0])  # TLS and AUTH (RFC 3848)
        self.waitForEmptyQueue()

    def test_queueCommands(self) -> None:
        self.startRelay(f'{{smarthost: "tcp:host=127.0.0.1:port={freeTCPPort()}", starttls: none}}',
                        queue="{retry: [1h], fsync: true}")
        config = str(self.daemon.stateDir.parent / "netsvc.yaml")
        self.send("carol@relay.test", ["bob@example.org", "dan@example.net"], message("stuck"))
        self.send("carol@relay.test", ["eve@example.org"], message("also stuck"))
        deadline = time.monotonic() + ARRIVAL
        while time.monotonic() < deadline and not all("refused" in p.read_text() for p in self.queued()):
            time.sleep(0.05)
        status, out = netsvc(self, "mail", "queue", "list", "--config", config)
        self.assertEqual(status, 0, out)
        self.assertIn("<carol@relay.test> -> bob@example.org, dan@example.net", out)
        self.assertIn("connection refused", out)
        self.assertIn("2 message(s)", out)
        first, second = (p.name[:-5] for p in self.queued())
        status, out = netsvc(self, "mail", "queue", "show", first, "--config", config)
        self.assertEqual(status, 0, out)
        self.assertIn('"address": "dan@example.net"', out)
        self.assertIn("Subject: stuck", out)
        status, out = netsvc(self, "mail", "queue", "delete", first, "--config", config)
        self.assertEqual((status, out.strip()), (0, f"{first}: delete requested"))
        status, out = netsvc(self, "mail", "queue", "retry", second, "--config", config)
        self.assertEqual(status, 0, out)
        deadline = time.monotonic() + ARRIVAL
        while time.monotonic() < deadline and len(self.queued()) != 1:
            time.sleep(0.05)
        self.assertEqual([p.name[:-5] for p in self.queued()], [second])
        self.assertTrue(self.daemon.waitForOutput(f"retry of {second} requested", ARRIVAL),
                        self.daemon.output()[-2000:])
        status, out = netsvc(self, "mail", "queue", "show", "nonexistent", "--config", config)
        self.assertEqual(status, 1)
        self.assertIn("no message 'nonexistent'", out)
