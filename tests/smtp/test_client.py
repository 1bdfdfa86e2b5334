"""
The client side: L{netsvc.smtp.sender.SMTPSender} driven over a StringTransport
by a scripted server, the dot-stuffing, and C{netsvc mail send}'s message
building and argument checks.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import io
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import directlyProvides

from netsvc.smtp import client
from netsvc.smtp.sender import SMTPSender
from netsvc.smtp.sendertransaction import DotStuffer
from netsvc.smtp.sendertypes import Outgoing, Recipient, SessionError

BODY = b"Subject: t\r\n\r\n.first line starts with a dot\r\nmiddle\r\n.\r\nlast"


def outgoing(data: bytes = BODY, recipients: tuple[str, ...] = ("b@example.org", "c@example.org"),
             sender: str = "a@lab", **kw: Any) -> Outgoing:
    return Outgoing(sender, [Recipient(r) for r in recipients], lambda: io.BytesIO(data), len(data), **kw)


class Harness:
    """A sender on a StringTransport; C{reply()} feeds server lines, C{sent()} returns what it wrote."""

    def __init__(self, messages: list[Outgoing], **kw: Any) -> None:
        self.messages = list(messages)
        self.results: list[tuple[Outgoing, list]] = []
        self.trace: list[str] = []
        self.clock = Clock()
        self.sender = SMTPSender("relay.lab", self.nextMessage, lambda m, r: self.results.append((m, r)),
                                 trace=lambda d, line: self.trace.append(f"{d} {line}"), **kw)
        self.sender.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.sender.makeConnection(self.transport)
        self.outcome: list[Any] = []
        self.sender.done.addBoth(self.outcome.append)

    def nextMessage(self) -> Outgoing | None:
        return self.messages.pop(0) if self.messages else None

    def reply(self, *lines: str) -> None:
        self.sender.dataReceived("".join(line + "\r\n" for line in lines).encode())

    def sent(self) -> list[str]:
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        return data.split("\r\n")[:-1]

    def pumpData(self) -> None:
        """Let FileSender (a pull producer) send the whole message."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()


EHLO = ["250-mx.example.org", "250-PIPELINING", "250-SIZE 1000000", "250-8BITMIME", "250-DSN",
        "250 ENHANCEDSTATUSCODES"]


class SenderTests(unittest.TestCase):
    def test_pipelinedTransactionWithParameters(self) -> None:
        m = outgoing(ret="HDRS", envid="id+1=x")
        m.recipients[0].notify, m.recipients[0].orcpt = "FAILURE,DELAY", "rfc822;B@example.org"
        h = Harness([m], starttls="none")
        h.reply("220 mx ESMTP")
        self.assertEqual(h.sent(), ["EHLO relay.lab"])
        h.reply(*EHLO)
        self.assertEqual(h.sent(), [
            f"MAIL FROM:<a@lab> SIZE={len(BODY)} BODY=8BITMIME RET=HDRS ENVID=id+2B1+3Dx",
            "RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;B@example.org",
            "RCPT TO:<c@example.org>", "DATA"])  # one write: pipelined
        h.reply("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 unknown", "354 go")
        h.pumpData()
        self.assertEqual(h.sent(), ["Subject: t", "", "..first line starts with a dot", "middle", "..", "last", "."])
        h.reply("250 2.0.0 queued")
        ((msg, results),) = h.results
        self.assertIs(msg, m)
        self.assertEqual([(r.address, reply.code, reply.text) for r, reply in results],
                         [("b@example.org", 250, "2.0.0 queued"), ("c@example.org", 550, "5.1.1 unknown")])
        self.assertEqual(h.sent(), ["QUIT"])
        h.reply("221 bye")
        self.assertEqual(h.outcome, [None])
        self.assertTrue(h.transport.disconnecting)

    def test_largeMessageStreamedAndStuffed(self) -> None:
        from netsvc.smtp.sendertransaction import SMALL_MESSAGE

        line = b"x" * 62 + b"\r\n"
        big = b"Subject: big\r\n\r\n" + (line * 100 + b".dot\r\n") * (SMALL_MESSAGE // (len(line) * 100) + 2)
        h = Harness([outgoing(big, ("b@example.org",))], starttls="none")
        h.reply("220 mx")
        h.reply(*EHLO)
        h.sent()
        h.reply("250 ok", "250 ok", "354 go")
        h.pumpData()
        wire = h.transport.value()
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))
        self.assertEqual(wire[:-3].replace(b"\r\n..", b"\r\n."), big)  # unstuffed: the message exactly
        self.assertNotIn(b"\r\n.d", wire)

    def test_sequentialWithoutPipeliningAndMailRefused(self) -> None:
        h = Harness([outgoing(), outgoing(b"x\r\n", ("d@example.org",))], starttls="none")
        h.reply("220 mx")
        h.sent()
        h.reply("250-mx", "250 8BITMIME")
        self.assertEqual(h.sent(), ["MAIL FROM:<a@lab> BODY=8BITMIME"])
        h.reply("451 4.3.0 try later")
        self.assertEqual(h.sent(), ["RSET"])  # no RCPT after a refused MAIL
        h.reply("250 ok")
        self.assertEqual([(r.address, reply.code) for r, reply in h.results[0][1]],
                         [("b@example.org", 451), ("c@example.org", 451)])
        self.assertEqual(h.sent(), ["MAIL FROM:<a@lab> BODY=8BITMIME"])  # the next message
        h.reply("250 ok")
        self.assertEqual(h.sent(), ["RCPT TO:<d@example.org>"])
        h.reply("550 5.1.1 no")
        self.assertEqual(h.sent(), ["RSET"])  # nobody accepted: no DATA
        h.reply("250 ok")
        self.assertEqual(h.results[1][1][0][1].code, 550)

    def test_heloFallback(self) -> None:
        h = Harness([outgoing(b"x\r\n", ("b@x.org",))], starttls="none")
        h.reply("220 old")
        h.sent()
        h.reply("502 5.5.1 what")
        self.assertEqual(h.sent(), ["HELO relay.lab"])
        h.reply("250 old")
        self.assertEqual(h.sent(), ["MAIL FROM:<a@lab>"])

    def test_starttlsRequiredButNotOffered(self) -> None:
        h = Harness([outgoing()], starttls="required", tlsCreator=object())
        h.reply("220 mx")
        h.sent()
        h.reply(*EHLO)
        (f,) = h.outcome
        self.assertIsInstance(f.value, SessionError)
        self.assertIn("STARTTLS required", str(f.value))
        self.assertIsNone(f.value.current)
        self.assertEqual(h.results, [])

    def test_starttlsThenEhloAgainThenAuthPlain(self) -> None:
        started = []
        h = Harness([outgoing(b"x\r\n", ("b@x.org",))], starttls="required", tlsCreator="creator",
                    auth=("user", "s3cret"))
        h.transport.startTLS = lambda creator: (started.append(creator), directlyProvides(h.transport,
                                                                                          ISSLTransport))
        h.reply("220 mx")
        h.sent()
        h.reply("250-mx", "250-STARTTLS", "250 AUTH PLAIN LOGIN")
        self.assertEqual(h.sent(), ["STARTTLS"])
        h.reply("220 go ahead")
        self.assertEqual(started, ["creator"])
        self.assertEqual(h.sent(), ["EHLO relay.lab"])
        h.reply("250-mx", "250 AUTH PLAIN LOGIN")
        self.assertEqual(h.sent(), ["AUTH PLAIN AHVzZXIAczNjcmV0"])
        self.assertIn("> AUTH PLAIN <credentials>", h.trace)
        self.assertFalse(any("s3cret" in t or "AHVzZXIAczNjcmV0" in t for t in h.trace))
        h.reply("235 2.7.0 ok")
        self.assertEqual(h.sent(), ["MAIL FROM:<a@lab>"])

    def test_authLoginAndRefusal(self) -> None:
        h = Harness([outgoing()], starttls="none", auth=("user", "pw"), authWithoutTLS=True)
        h.reply("220 mx")
        h.sent()
        h.reply("250-mx", "250 AUTH LOGIN")
        self.assertEqual(h.sent(), ["AUTH LOGIN"])
        h.reply("334 VXNlcm5hbWU6")
        self.assertEqual(h.sent(), ["dXNlcg=="])
        h.reply("334 UGFzc3dvcmQ6")
        self.assertEqual(h.sent(), ["cHc="])
        h.reply("535 5.7.8 bad credentials")
        (f,) = h.outcome
        self.assertEqual(f.value.reply.code, 535)
        self.assertEqual(h.sent(), ["QUIT"])

    def test_noPasswordInClearUnlessAskedFor(self) -> None:
        """starttls none alone no longer sends the password in clear: only authWithoutTLS does."""
        h = Harness([outgoing()], starttls="none", auth=("user", "pw"))
        h.reply("220 mx")
        h.sent()
        h.reply("250-mx", "250 AUTH PLAIN LOGIN")
        self.assertIn("not sending a password without TLS", str(h.outcome[0].value))
        self.assertEqual(h.sent(), [])

    def test_noPasswordWithoutTLS(self) -> None:
        h = Harness([outgoing()], starttls="opportunistic", tlsCreator=object(), auth=("user", "pw"))
        h.reply("220 mx")
        h.sent()
        h.reply("250-mx", "250 AUTH PLAIN")
        self.assertIn("without TLS", str(h.outcome[0].value))
        self.assertEqual(h.sent(), [])

    def test_connectionLostMidData(self) -> None:
        m = outgoing()
        h = Harness([m], starttls="none")
        h.reply("220 mx")
        h.reply(*EHLO)
        h.reply("250 ok", "250 ok", "250 ok", "354 go")
        h.sender.connectionLost(Failure(ConnectionLost("reset")))
        (f,) = h.outcome
        self.assertIn("connection lost", str(f.value))
        self.assertIs(f.value.current, m)
        self.assertEqual(h.results, [])

    def test_timeout(self) -> None:
        h = Harness([outgoing()], starttls="none", timeout=30)
        h.reply("220 mx")
        h.clock.advance(31)
        self.assertIn("no reply for 30s", str(h.outcome[0].value))
        self.assertTrue(h.transport.disconnecting)

    def test_malformedReply(self) -> None:
        h = Harness([outgoing()], starttls="none")
        h.reply("hello there")
        self.assertIn("malformed reply", str(h.outcome[0].value))

    def test_greetingRefused(self) -> None:
        h = Harness([outgoing()], starttls="none")
        h.reply("554 5.3.2 go away")
        self.assertTrue(h.outcome[0].value.permanent)

    def test_utf8AddressWithoutSMTPUTF8(self) -> None:
        h = Harness([outgoing(recipients=("j\u00f6rg@example.org",))], starttls="none")
        h.reply("220 mx")
        h.reply(*EHLO)
        self.assertEqual(h.results[0][1][0][1].code, 553)
        self.assertEqual(h.sent()[-1], "QUIT")  # nothing of it was sent
        self.assertNotIn("MAIL", " ".join(h.sent()))


class DotStufferTests(unittest.TestCase):
    def stuff(self, chunks: list[bytes]) -> bytes:
        s = DotStuffer()
        return b"".join(s(c) for c in chunks) + s.end()

    def test_acrossChunkEdges(self) -> None:
        self.assertEqual(self.stuff([b".a\r\n", b".b\r\n.", b"c\r\n"]), b"..a\r\n..b\r\n..c\r\n.\r\n")
        self.assertEqual(self.stuff([b"x\r", b"\n.y"]), b"x\r\n..y\r\n.\r\n")
        self.assertEqual(self.stuff([b"no newline at end"]), b"no newline at end\r\n.\r\n")
        self.assertEqual(self.stuff([]), b".\r\n")


class ComposeTests(unittest.TestCase):
    def test_headersBodyAndAttachments(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        (folder / "notes.txt").write_text("plain notes\n")
        (folder / "logs.tar.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 20)
        (folder / "data.unknownext").write_bytes(b"\x00\x01")
        data = client.composeMessage("alice@lab", ["bob@example.org", "carol@example.org"], "R\u00e9sum\u00e9",
                                     "h\u00e9llo\n.dot line\n", [str(folder / n) for n in
                                                                 ("pic.png", "notes.txt", "logs.tar.gz",
                                                                  "data.unknownext")])
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        m = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(m["Subject"], "R\u00e9sum\u00e9")
        self.assertEqual(m["To"], "bob@example.org, carol@example.org")
        self.assertIsNotNone(m["Date"])
        self.assertTrue(m["Message-ID"].endswith("@lab>"))
        self.assertEqual(m["MIME-Version"], "1.0")
        parts = list(m.iter_parts())
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/plain", "image/png", "text/plain", "application/gzip", "application/octet-stream"])
        self.assertEqual(parts[0].get_content().replace("\r\n", "\n"), "h\u00e9llo\n.dot line\n")
        self.assertEqual(parts[1].get_filename(), "pic.png")
        self.assertEqual(parts[1].get_content(), b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        self.assertEqual(parts[3].get_filename(), "logs.tar.gz")
        self.assertTrue(all(p["MIME-Version"] is None for p in parts))

    def test_missingAttachmentIsUsageError(self) -> None:
        self.assertRaises(client.UsageError, client.composeMessage, "a@lab", ["b@x.org"], None, "x",
                          ["/nonexistent/file.pdf"])


class ArgumentTests(unittest.TestCase):
    def status(self, *argv: str) -> int:
        parser = argparse.ArgumentParser()
        client.addParser(parser.add_subparsers())
        args = parser.parse_args(["mail", "send", *argv])
        self.patch(sys, "stderr", io.StringIO())
        status = client.runSend(None, args)
        self.assertTrue(sys.stderr.getvalue().startswith("netsvc mail: "))
        return status

    def test_usageErrors(self) -> None:
        cases = [
            ["--from", "a@lab", "--tls", "--starttls", "--to", "b@x.org"],
            ["--from", "a@lab", "--cacert", "ca.pem", "--to", "b@x.org"],
            ["--from", "a@lab", "--user", "u", "--password-file", "p", "--to", "b@x.org"],
            ["--from", "a@lab"],
            ["--from", "a@lab", "--to", "not an address"],
            ["--from", "a@lab", "--to", "b@x.org", "--server", "host:99999"],
        ]
        for argv in cases:
            self.assertEqual(self.status(*argv), 2, argv)


class QueueCommandTests(unittest.TestCase):
    """netsvc mail queue's functions over a queue folder (no daemon)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        from netsvc.smtp.queue import Envelope, Queue

        self.queue = Queue(Path(self.mktemp()), fsync=False, reactor=reactor)
        env = Envelope.new("alice@lab", ["bob@example.org", "carol@example.org"], id="0001", created=1000.0,
                           next_attempt=1600.0)
        env.recipients[0].status = "sent"
        env.recipients[1].last_error = "mx.example.org:25: 451 4.7.1 greylisted"
        (self.queue.msg / "0001").write_bytes(b"Subject: queued\r\nFrom: alice@lab\r\n\r\nbody\r\n")
        (self.queue.env / "0001.json").write_bytes(env.dumps())

    def test_listAndShow(self) -> None:
        from netsvc.smtp import queuecli

        out = io.StringIO()
        self.assertEqual(queuecli.listQueue(self.queue, out, now=1300.0), 0)
        text = out.getvalue()
        self.assertIn("0001", text)
        self.assertIn("<alice@lab> -> carol@example.org (mx.example.org:25: 451 4.7.1 greylisted)", text)
        self.assertNotIn("bob@example.org", text)  # delivered already
        self.assertRegex(text, r"0001\s+5m\s+\d+\s+5m")  # age 5 minutes, next attempt in 5 minutes
        self.assertIn("1 message(s)", text)
        out = io.StringIO()
        queuecli.showMessage(self.queue, "0001", out)
        self.assertIn('"status": "sent"', out.getvalue())
        self.assertIn("Subject: queued", out.getvalue())
        self.assertNotIn("body", out.getvalue())
        self.assertRaises(queuecli.QueueCLIError, queuecli.showMessage, self.queue, "../../etc/passwd", out)
        empty = io.StringIO()
        self.queue.remove("0001")
        queuecli.listQueue(self.queue, empty)
        self.assertEqual(empty.getvalue(), "the queue is empty\n")

    def test_retryAndDeleteAskTheRunningDaemon(self) -> None:
        from netsvc.smtp import queuecli
        from netsvc.smtp.control import takeRequests

        out = io.StringIO()
        queuecli.retry(self.queue, "0001", True, out)
        queuecli.retry(self.queue, "0001", True, out)  # one request is as good as two
        queuecli.retry(self.queue, None, True, out)
        queuecli.delete(self.queue, "0001", True, out)
        self.assertEqual(self.queue.ids(), ["0001"])  # the daemon owns it: only asked
        self.assertEqual(takeRequests(self.queue.ctl), [("delete", "0001"), ("retry", "0001"), ("retry", "all")])
        self.assertEqual(takeRequests(self.queue.ctl), [])

    def test_deleteWithoutDaemonActsAtOnce(self) -> None:
        from netsvc.smtp import queuecli

        queuecli.delete(self.queue, "0001", False, io.StringIO())
        self.assertEqual(self.queue.ids(), [])
        self.assertFalse((self.queue.msg / "0001").exists())

    def test_daemonRunning(self) -> None:
        import json
        import os

        from netsvc.smtp.queuecli import daemonRunning

        state = Path(self.mktemp())
        state.mkdir()
        self.assertFalse(daemonRunning(state))
        (state / "status.json").write_text(json.dumps({"pid": os.getpid()}))
        self.assertTrue(daemonRunning(state))
        (state / "status.json").write_text(json.dumps({"pid": 2**22 + 12345}))  # above pid_max: no such process
        self.assertFalse(daemonRunning(state))


class _BrokenTLSServer(LineReceiver):
    """Offers STARTTLS, then answers the handshake with garbage; otherwise a minimal SMTP server."""

    def connectionMade(self) -> None:
        self.factory.sessions.append([])
        self.inData = False
        self.sendLine(b"220 broken.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        self.factory.sessions[-1].append(line)
        if self.inData:
            if line == b".":
                self.inData = False
                self.sendLine(b"250 2.0.0 kept")
            return
        verb = line.split(b" ")[0].upper()
        replies = {b"EHLO": b"250-broken.test\r\n250-PIPELINING\r\n250 STARTTLS", b"MAIL": b"250 ok",
                   b"RCPT": b"250 ok", b"DATA": b"354 go", b"QUIT": b"221 bye"}
        if verb == b"STARTTLS":
            self.sendLine(b"220 go ahead")
            self.transport.write(b"this is not a TLS record\r\n" * 4)
            self.transport.loseConnection()
            return
        self.sendLine(replies.get(verb, b"500 what"))
        if verb == b"DATA":
            self.inData = True
        elif verb == b"QUIT":
            self.transport.loseConnection()


class OpportunisticTLSTests(unittest.TestCase):
    """Over loopback: a failed STARTTLS handshake is retried in clear (opportunistic), never when required."""

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        factory = Factory.forProtocol(_BrokenTLSServer)
        factory.sessions = []
        self.factory = factory
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def opener(self, starttls: str) -> Any:
        from twisted.internet import reactor

        from netsvc.smtp.outbound import SessionOpener
        from netsvc.smtp.settings import RelaySettings, Settings

        number = self.port.getHost().port
        return SessionOpener(Settings(hostname="relay.test", relay=RelaySettings(
            smarthost=f"tcp:host=127.0.0.1:port={number}", starttls=starttls)), reactor, replyTimeout=5)

    def deliver(self, starttls: str) -> Any:
        from netsvc.smtp.routing import SmarthostRouter

        opener = self.opener(starttls)
        target = SmarthostRouter(f"tcp:host=127.0.0.1:port={self.port.getHost().port}").target
        pending = [outgoing(b"Subject: x\r\n\r\nhi\r\n", ("b@example.org",))]
        results: list = []
        d = opener(target, lambda: pending.pop() if pending else None, lambda m, r: results.extend(r))
        return d.addCallback(lambda _: results)

    @defer.inlineCallbacks
    def test_opportunisticFallsBackToClear(self) -> None:
        results = yield self.deliver("opportunistic")
        self.assertEqual([(r.address, reply.code) for r, reply in results], [("b@example.org", 250)])
        first, second = self.factory.sessions
        self.assertIn(b"STARTTLS", first)
        self.assertNotIn(b"STARTTLS", second)
        self.assertIn(b".", second)

    @defer.inlineCallbacks
    def test_requiredDoesNot(self) -> None:
        try:
            yield self.deliver("required")
        except SessionError as e:
            self.assertTrue(e.tlsFailed)
        else:
            self.fail("delivered without TLS")
        self.assertEqual(len(self.factory.sessions), 1)
