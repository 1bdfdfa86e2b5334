"""netsvc.smtp.dsn: RFC 3464 reports parse as such, carry the right fields, and are not sent when they must not be."""

from __future__ import annotations

import email
import email.policy

from twisted.trial import unittest

from netsvc.smtp.dsn import FULL_LIMIT, ReportItem, buildReport, statusOf, wantsReport
from netsvc.smtp.queue import Envelope, Recipient

ORIGINAL = (b"Received: from client by mail.lab\r\nFrom: alice@lab\r\nTo: bob@example.org\r\n"
            b"Subject: hello\r\nMessage-ID: <m1@lab>\r\n\r\nBody line\r\n.dot line\r\n")


def envelope(**fields) -> Envelope:
    rcpts = [Recipient(address="bob@example.org", orcpt="rfc822;Bob@Example.org"),
             Recipient(address="carol@example.org")]
    return Envelope.new("alice@lab", rcpts, created=1_700_000_000.0, **fields)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


class ReportTests(unittest.TestCase):
    def test_bounceStructure(self) -> None:
        env = envelope(envid="ENV-1")
        items = [ReportItem(env.recipients[0], "5.1.1", "smtp; 550 5.1.1 no such user", "mx.example.org")]
        data = buildReport(env, ORIGINAL, items, "failed", "mail.lab", now=1_700_000_100.0)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))  # CRLF only
        m = parse(data)
        self.assertEqual(m.get_content_type(), "multipart/report")
        self.assertEqual(m.get_param("report-type"), "delivery-status")
        self.assertEqual(m["To"].addresses[0].addr_spec, "alice@lab")
        self.assertIn("MAILER-DAEMON@mail.lab", m["From"])
        self.assertEqual(m["Auto-Submitted"], "auto-replied")
        parts = list(m.iter_parts())
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/plain", "message/delivery-status", "message/rfc822"])
        self.assertIn("<bob@example.org>: smtp; 550 5.1.1 no such user", parts[0].get_content())
        perMessage, perRecipient = parts[1].get_payload()
        self.assertEqual(perMessage["Reporting-MTA"], "dns; mail.lab")
        self.assertEqual(perMessage["Original-Envelope-Id"], "ENV-1")
        self.assertEqual(perRecipient["Final-Recipient"], "rfc822; bob@example.org")
        self.assertEqual(perRecipient["Original-Recipient"], "rfc822;Bob@Example.org")
        self.assertEqual(perRecipient["Action"], "failed")
        self.assertEqual(perRecipient["Status"], "5.1.1")
        self.assertEqual(perRecipient["Remote-MTA"], "dns; mx.example.org")
        self.assertEqual(perRecipient["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertIsNone(perRecipient["Will-Retry-Until"])
        inner = parts[2].get_payload()[0]
        self.assertEqual(inner["Message-ID"], "<m1@lab>")
        self.assertIn(ORIGINAL, data)  # byte for byte

    def test_retHeadersOnly(self) -> None:
        env = envelope(ret="HDRS")
        data = buildReport(env, ORIGINAL, [ReportItem(env.recipients[1], "5.0.0", "x")], "failed", "mail.lab")
        parts = list(parse(data).iter_parts())
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"Body line", data)
        self.assertIn(b"Subject: hello", data)

    def test_largeMessageHeadersOnly(self) -> None:
        env = envelope()
        big = ORIGINAL + (b"y" * 998 + b"\r\n") * (FULL_LIMIT // 1000 + 1)
        data = buildReport(env, big, [ReportItem(env.recipients[1], "5.0.0")], "failed", "mail.lab")
        self.assertEqual(list(parse(data).iter_parts())[2].get_content_type(), "text/rfc822-headers")
        self.assertLess(len(data), 10_000)

    def test_delayWarning(self) -> None:
        env = envelope()
        data = buildReport(env, ORIGINAL, [ReportItem(env.recipients[1], "4.4.1", "connection refused")],
                           "delayed", "mail.lab", now=1_700_014_400.0, retryUntil=1_700_432_000.0)
        m = parse(data)
        self.assertIn("Delayed", m["Subject"])
        perRecipient = list(m.iter_parts())[1].get_payload()[1]
        self.assertEqual(perRecipient["Action"], "delayed")
        self.assertEqual(perRecipient["Status"], "4.4.1")
        self.assertIsNotNone(perRecipient["Will-Retry-Until"])
        self.assertIsNone(perRecipient["Remote-MTA"])

    def test_neverBounceABounce(self) -> None:
        env = envelope(dsn=True)
        self.assertIsNone(buildReport(env, ORIGINAL, [ReportItem(env.recipients[0], "5.0.0")], "failed", "h"))

    def test_nullSenderGetsNothing(self) -> None:
        env = Envelope.new("", ["bob@example.org"])
        self.assertIsNone(buildReport(env, ORIGINAL, [ReportItem(env.recipients[0], "5.0.0")], "failed", "h"))

    def test_notify(self) -> None:
        env = envelope()
        r = env.recipients[0]
        for notify, failed, delayed, delivered in (
                (None, True, True, False), ("NEVER", False, False, False), ("FAILURE", True, False, False),
                ("DELAY,SUCCESS", False, True, True), ("success,failure", True, False, True)):
            r.notify = notify
            self.assertEqual((wantsReport(env, r, "failed"), wantsReport(env, r, "delayed"),
                              wantsReport(env, r, "delivered")), (failed, delayed, delivered), notify)
        r.notify = "NEVER"
        self.assertIsNone(buildReport(env, ORIGINAL, [ReportItem(r, "5.0.0")], "failed", "h"))

    def test_successReport(self) -> None:
        """NOTIFY=SUCCESS: a "delivered" report (an alias of several: "expanded"), with the headers only."""
        env = envelope(envid="ENV-2")  # RET absent: FULL for failures, never for success (RFC 3461 4.3)
        bob, carol = env.recipients
        bob.notify, carol.notify = "SUCCESS", "SUCCESS,FAILURE"
        items = [ReportItem(bob, "2.0.0", "x-netsvc; delivered to mailbox"),
                 ReportItem(carol, "2.0.0", "x-netsvc; delivered to several destinations (an alias)",
                            action="expanded")]
        data = buildReport(env, ORIGINAL, items, "delivered", "mail.lab")
        m = parse(data)
        self.assertEqual(m["Subject"], "Successful Mail Delivery Report")
        self.assertEqual(m["To"].addresses[0].addr_spec, "alice@lab")
        parts = list(m.iter_parts())
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/plain", "message/delivery-status", "text/rfc822-headers"])
        self.assertIn("successfully delivered", parts[0].get_content())
        self.assertIn("<bob@example.org>: x-netsvc; delivered to mailbox", parts[0].get_content())
        _, first, second = parts[1].get_payload()
        self.assertEqual((first["Final-Recipient"], first["Action"], first["Status"]),
                         ("rfc822; bob@example.org", "delivered", "2.0.0"))
        self.assertEqual((second["Final-Recipient"], second["Action"]), ("rfc822; carol@example.org", "expanded"))
        self.assertNotIn(b"Body line", data)
        self.assertIn(b"Subject: hello\r\n", data)
        # not asked for: nothing; a report is never reported
        bob.notify, carol.notify = None, "FAILURE"
        self.assertIsNone(buildReport(env, ORIGINAL, items, "delivered", "mail.lab"))
        bob.notify = "SUCCESS"
        self.assertIsNone(buildReport(envelope(dsn=True), ORIGINAL, items, "delivered", "mail.lab"))

    def test_headerInjectionFlattened(self) -> None:
        env = envelope(envid="a\r\nBcc: evil@example")
        data = buildReport(env, ORIGINAL, [ReportItem(env.recipients[0], "5.0.0", "smtp; 550\r\nX: y")],
                           "failed", "h")
        self.assertNotIn(b"\r\nBcc:", data)
        self.assertNotIn(b"\r\nX: y", data)

    def test_statusOf(self) -> None:
        self.assertEqual(statusOf(550, "5.1.1 no such user"), "5.1.1")
        self.assertEqual(statusOf(550, "no such user"), "5.0.0")
        self.assertEqual(statusOf(451, "4.3.0 try later"), "4.3.0")
        self.assertEqual(statusOf(451, "5.1.1 inconsistent"), "4.0.0")
