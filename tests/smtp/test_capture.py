"""Capture mode: the store (keep limit, summaries, parsed view) and the /mail pages on the web service."""

from __future__ import annotations

import base64
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

    @defer.inlineCallbacks
    def test_restartWithASmallerKeep(self):
        """Start-up pruning (keep lowered in the config) removes the oldest, with the queue's writer idle."""
        folder = Path(self.mktemp())
        store = CaptureStore(folder, keep=5, fsync=True)
        store.recover()
        ids = []
        for i in range(4):
            ids.append((yield store.enqueueBytes("a@b.test", ["c@d.test"], b"n: %d\r\n\r\nx\r\n" % i)))
        again = CaptureStore(folder, keep=2, fsync=True)
        again.recover()
        self.assertEqual(again.ids(), ids[2:])
        self.assertEqual(again.latest(), list(reversed(ids[2:])))

    @defer.inlineCallbacks
    def test_malformedHeadersDoNotBreakTheViews(self):
        """The email package raises on some malformed headers; one such message must not break the listing."""
        store = CaptureStore(Path(self.mktemp()), fsync=False)
        store.recover()
        poison = (b"From: a@[1.2.3\r\nTo: =?iso-2022-jp?b?GyRC?=\r\nSubject: poison \xff\r\n"
                  b"Content-Type: text/plain; charset=x-unknown\r\n\r\nbody \xe9\r\n")
        id = yield store.enqueueBytes("a@b.test", ["c@d.test"], poison)
        s = store.summary(id)
        self.assertEqual(s["from"], "a@[1.2.3")
        self.assertEqual(s["subject"], "poison \ufffd")
        p = store.parsed(id)
        self.assertIn(["From", "a@[1.2.3"], p["headers"])
        self.assertIn("body", p["text"])
        json.dumps(p, ensure_ascii=False).encode("utf-8")  # no lone surrogates

    @defer.inlineCallbacks
    def test_hugeTextIsCut(self):
        from netsvc.smtp import capture

        store = CaptureStore(Path(self.mktemp()), fsync=False)
        store.recover()
        big = b"Subject: big\r\n\r\n" + (b"t" * 98 + b"\r\n") * (capture.MAX_TEXT // 100 + 1000)
        id = yield store.enqueueBytes("a@b.test", ["c@d.test"], big)
        p = store.parsed(id)
        self.assertTrue(p["truncated"])
        self.assertLessEqual(len(p["text"]), capture.MAX_TEXT)
        self.assertFalse(store.parsed((yield store.enqueueBytes("a@b.test", ["c@d.test"], b"x: y\r\n\r\nz\r\n")))
                         ["truncated"])

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

    @defer.inlineCallbacks
    def test_pagesEscapeWhatClientsSent(self):
        daemon = startWeb(self, SMTP)
        smtpPort = port(daemon, 0, "smtp")
        http = webPort(daemon, 1)
        word = base64.b64encode("<img src=x onerror=alert(1)> ünï".encode()).decode()
        messages = [
            b"Subject: <script>alert(1)</script>\r\nFrom: \"<b>x</b>\" <a@b.test>\r\n\r\n</pre><script>2</script>\r\n",
            f"Subject: =?utf-8?b?{word}?=\r\n\r\nbody\r\n".encode(),
            b"From: nosubject@b.test\r\n\r\nbody\r\n",
            b"From: a@[1.2.3\r\nSubject: poison\r\n\r\nbody\r\n",
        ]

        def send():
            with smtplib.SMTP("127.0.0.1", smtpPort, timeout=10) as c:
                for m in messages:
                    c.sendmail("s@b.test", ["q@example.org"], m)

        yield threads.deferToThread(send)
        page = yield get(http, "/mail/", tls=False)
        self.assertEqual(page.status, 200)
        self.assertNotIn(b"<script>", page.body)
        self.assertNotIn(b"<img", page.body)
        self.assertIn(b"&lt;script&gt;alert(1)&lt;/script&gt;", page.body)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt; ünï".encode(), page.body)
        self.assertIn(b"(no subject)", page.body)
        self.assertIn(b">poison</a>", page.body)
        listing = json.loads((yield get(http, "/mail/messages.json", tls=False)).body)
        self.assertEqual(len(listing), 4)
        for entry in listing:
            view = yield get(http, f"/mail/{entry['id']}", tls=False)
            self.assertEqual(view.status, 200)
            self.assertNotIn(b"<script>", view.body)
            self.assertNotIn(b"<b>", view.body)

    @defer.inlineCallbacks
    def test_messagesAreReadOffTheReactor(self):
        """Parsing is slow for big messages: the list, the JSON and one message are read in a thread."""
        import threading

        daemon = startWeb(self, SMTP)
        store = daemon.getServiceNamed("smtp").capture
        http = webPort(daemon, 1)
        id = yield store.enqueueBytes("s@b.test", ["q@example.org"], b"Subject: s\r\n\r\nbody\r\n")
        threadsUsed = []
        for name in ("summary", "parsed", "raw"):
            real = getattr(store, name)

            def spy(*a, real=real):
                threadsUsed.append(threading.current_thread() is threading.main_thread())
                return real(*a)

            self.patch(store, name, spy)
        for path in ("/mail/", "/mail/messages.json", f"/mail/{id}", f"/mail/{id}.json", f"/mail/{id}.eml"):
            self.assertEqual((yield get(http, path, tls=False)).status, 200, path)
        self.assertTrue(threadsUsed)
        self.assertNotIn(True, threadsUsed)
