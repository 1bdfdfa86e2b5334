"""Capture mode: the store (keep limit, summaries, parsed view) and the /mail pages on the web service."""

from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from netsvc.smtp.capture import CaptureStore
from netsvc.smtp.queue import Envelope
from tests.helpers import port
from tests.web._support import get, startWeb, webPort

SMTP = '  smtp:\n    listen: ["tcp:0:interface=127.0.0.1"]\n    relay: {capture: true}\n'


def withAttachment(subject: str = "report") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "dev@example.test"
    m["To"] = "qa@example.org"
    m["Subject"] = subject
    m.set_content("see attached\n")
    m.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream",
                     filename="data.bin")
    return m


class StoreTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_keepLimitAndViews(self):
        store = CaptureStore(Path(self.mktemp()), keep=3, fsync=False)
        store.recover()
        ids = []
        for i in range(5):
            data = withAttachment(f"n{i}").as_bytes().replace(b"\n", b"\r\n")
            ids.append((yield store.enqueueBytes("dev@example.test", ["qa@example.org"], data)))
        self.assertEqual(store.count(), 3)
        self.assertEqual(store.ids(), ids[2:])
        self.assertEqual(store.latest(), list(reversed(ids[2:])))
        s = store.summary(ids[4])
        self.assertEqual((s["subject"], s["from"], s["recipients"]), ("n4", "dev@example.test", ["qa@example.org"]))
        p = store.parsed(ids[4])
        self.assertEqual(p["text"], "see attached\n")
        self.assertEqual(p["attachments"], [{"filename": "data.bin", "type": "application/octet-stream",
                                             "size": 10240}])
        # a restart sees the same three
        again = CaptureStore(store.directory, keep=3, fsync=False)
        again.recover()
        self.assertEqual(again.latest(), store.latest())

    def test_envelopeOnly(self):
        self.assertEqual(Envelope.new("a@b", ["c@d"]).pending()[0].address, "c@d")


class WebTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_mailPages(self):
        daemon = startWeb(self, SMTP)
        smtpPort = port(daemon, 0, "smtp")
        http = webPort(daemon, 1)
        message = withAttachment()

        def send():
            with smtplib.SMTP("127.0.0.1", smtpPort, timeout=10) as c:
                return c.send_message(message)

        self.assertEqual((yield threads.deferToThread(send)), {})
        listing = yield get(http, "/mail/messages.json", tls=False)
        self.assertEqual(listing.status, 200)
        (entry,) = json.loads(listing.body)
        self.assertEqual((entry["subject"], entry["recipients"]), ("report", ["qa@example.org"]))
        id = entry["id"]
        page = yield get(http, "/mail/", tls=False)
        self.assertIn(f'<a href="{id}">report</a>'.encode(), page.body)
        view = yield get(http, f"/mail/{id}", tls=False)
        self.assertIn(b"data.bin (application/octet-stream, 10240 bytes)", view.body)
        detail = json.loads((yield get(http, f"/mail/{id}.json", tls=False)).body)
        self.assertEqual(detail["text"], "see attached\n")
        raw = yield get(http, f"/mail/{id}.eml", tls=False)
        # the attachment arrived intact: the stored message parses back to the same bytes
        from email import message_from_bytes, policy

        stored = message_from_bytes(raw.body, policy=policy.default)
        (att,) = stored.iter_attachments()
        self.assertEqual(att.get_payload(decode=True), bytes(range(256)) * 40)
        self.assertEqual((yield get(http, "/mail/ffffffffffffffffffffffff", tls=False)).status, 404)
        self.assertEqual((yield get(http, "/mail/../../etc/passwd", tls=False)).status, 404)
