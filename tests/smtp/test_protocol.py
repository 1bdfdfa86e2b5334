"""The ESMTP session over a StringTransport: replies, relay policy, AUTH, DATA checks, pipelining.

AUTH: test_sasl.py; the DATA reader alone: test_data.py; address syntax: test_syntax.py."""

from __future__ import annotations

import base64

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface import directlyProvides

from netsvc.metrics import Registry
from netsvc.policies import RateLimiter
from netsvc.smtp.protocol import MAX_COMMAND_LINE, ServerConfig, SMTPFactory, SMTPMetrics


class FakeIncoming:
    def __init__(self, queue, id):
        self.queue, self.id = queue, id
        self.data = b""
        self.aborted = False
        self.envelope = None

    def write(self, data):
        assert not self.aborted
        self.data += data

    def abort(self):
        self.aborted = True

    def commit(self, envelope):
        envelope.id = self.id
        self.envelope = envelope
        d = defer.Deferred()
        self.queue.pending.append((d, self))
        if self.queue.autoCommit:
            d.callback(self.id)
        return d


class FakeQueue:
    def __init__(self):
        self.messages: list[FakeIncoming] = []
        self.pending = []
        self.autoCommit = True

    def newMessage(self):
        m = FakeIncoming(self, f"id{len(self.messages)}")
        self.messages.append(m)
        return m

    def committed(self):
        return [m for m in self.messages if m.envelope is not None]


class FakeAuth:
    def __init__(self):
        self.calls = []

    def check(self, user, password):
        self.calls.append((user, password))
        return defer.succeed(user == "alice" and password == "s3cret")


class TLSStringTransport(StringTransport):
    def __init__(self, *a, secure=False, **kw):
        super().__init__(*a, **kw)
        self.tlsStarted = None
        if secure:
            directlyProvides(self, ISSLTransport)

    def startTLS(self, ctx):
        self.tlsStarted = ctx


def plain(user, password, authz=""):
    return base64.b64encode(f"{authz}\0{user}\0{password}".encode())


class SessionCase(unittest.TestCase):
    """A session over a StringTransport with fakes for the queue and the authenticator (no tests here)."""

    peer = "127.0.0.1"

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.queue = FakeQueue()
        self.auth = FakeAuth()
        self.registry = Registry()
        self.accepted = []
        self.config = self.makeConfig()

    def makeConfig(self, **kw):
        args = dict(hostname="mx.test", queue=self.queue, metrics=SMTPMetrics(self.registry), clock=self.clock,
                    authenticator=self.auth, tlsOptions=lambda: "CTX", maxSize=10_000,
                    authFailures=RateLimiter(0.1, 5, self.clock), messageRate=RateLimiter(0, 0, self.clock),
                    onAccepted=self.accepted.append)
        args.update(kw)
        return ServerConfig(**args)

    def connect(self, peer=None, secure=False, config=None):
        proto = SMTPFactory(config or self.config).buildProtocol(None)
        t = TLSStringTransport(peerAddress=_addr(peer or self.peer), secure=secure)
        proto.makeConnection(t)
        self.assertTrue(t.value().startswith(b"220 mx.test ESMTP"))
        t.clear()
        return proto, t

    def send(self, proto, t, data):
        t.clear()
        proto.dataReceived(data)
        return t.value()

    def metric(self, name, **labels):
        fam = self.registry.get(name)
        return fam.labels(service="smtp", **labels).value

    def transaction(self, p, t, body=b"Subject: hi\r\n\r\nhello\r\n", rcpt=b"<r@example.test>"):
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:" + rcpt + b"\r\nDATA\r\n")
        out += self.send(p, t, body + b".\r\n")
        return out



class SessionTests(SessionCase):
    # -- EHLO

    def test_ehloPlain(self):
        p, t = self.connect()
        out = self.send(p, t, b"ehlo client.test\r\n")
        lines = out.decode().split("\r\n")
        self.assertEqual(lines[0], "250-mx.test")
        for ext in ("PIPELINING", "SIZE 10000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "STARTTLS"):
            self.assertIn(ext, out.decode())
        self.assertNotIn("AUTH", out.decode())
        self.assertTrue(lines[-2].startswith("250 "))

    def test_ehloUnderTLS(self):
        p, t = self.connect(secure=True)
        out = self.send(p, t, b"EHLO client.test\r\n").decode()
        self.assertIn("AUTH PLAIN LOGIN", out)
        self.assertNotIn("STARTTLS", out)

    def test_starttls(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO c\r\n")
        self.assertEqual(self.send(p, t, b"STARTTLS\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(t.tlsStarted, "CTX")
        # state forgotten: MAIL needs a new EHLO
        self.assertTrue(self.send(p, t, b"MAIL FROM:<a@b.test>\r\n").startswith(b"503 5.5.1"))
        self.assertIn(b"AUTH PLAIN LOGIN", self.send(p, t, b"EHLO c\r\n"))

    def test_starttlsWithPipelinedCommandsRefused(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO c\r\n")
        out = self.send(p, t, b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
        self.assertTrue(out.startswith(b"554 5.5.0"))
        self.assertIsNone(t.tlsStarted)
        self.assertTrue(t.disconnecting)

    # -- relay policy

    def test_relayFromMynetworks(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO client.test\r\n")
        out = self.transaction(p, t, b"Subject: hi\r\n\r\n..dot\r\nplain\r\n")
        self.assertEqual(out, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                              b"250 2.0.0 Ok: queued as id0\r\n")
        (m,) = self.queue.committed()
        self.assertEqual(m.envelope.sender, "s@example.test")
        self.assertEqual([r.address for r in m.envelope.recipients], ["r@example.test"])
        self.assertEqual(m.envelope.client, {"address": "127.0.0.1", "helo": "client.test", "user": None})
        self.assertTrue(m.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (netsvc) "
                                          b"with ESMTP id id0\r\n\tfor <r@example.test>; "))
        self.assertIn(b"\r\nMessage-ID: <id0@mx.test>\r\nDate: ", m.data)
        self.assertTrue(m.data.endswith(b"Subject: hi\r\n\r\n.dot\r\nplain\r\n"))
        self.assertEqual(self.accepted, ["id0"])
        self.assertEqual(self.metric("netsvc_smtp_messages_accepted_total"), 1)
        self.assertEqual(self.send(p, t, b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(t.disconnecting)

    def test_messageIdAndDateKeptWhenPresent(self):
        """Message-ID and Date are added only when missing (any case, folded or not); Received always."""
        p, t = self.connect()
        self.send(p, t, b"EHLO client.test\r\n")
        body = (b"message-id:\r\n <own@client.test>\r\nDATE: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
                b"Subject: hi\r\n\r\nMessage-ID: <in-the-body@x>\r\n")
        self.assertTrue(self.transaction(p, t, body).endswith(b"queued as id0\r\n"))
        data = self.queue.committed()[0].data
        head = data.split(b"\r\n\r\n")[0]
        self.assertEqual(head.lower().count(b"message-id:"), 1)
        self.assertEqual(head.lower().count(b"\ndate:"), 1)
        self.assertTrue(data.startswith(b"Received: from client.test "))
        self.assertTrue(data.endswith(body))

    def test_receivedNamesAnIPv6ClientAsAnAddressLiteral(self):
        p, t = self.connect(peer="::1")
        self.send(p, t, b"EHLO client.test\r\n")
        self.assertTrue(self.transaction(p, t).endswith(b"250 2.0.0 Ok: queued as id0\r\n"))
        self.assertTrue(self.queue.committed()[0].data.startswith(b"Received: from client.test ([IPv6:::1])\r\n"))

    def test_duplicateRecipientKeptOnce(self):
        """The same recipient twice in one transaction (the domain in any case): 250, but delivered once."""
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\n"
                              b"RCPT TO:<r@EXAMPLE.test>\r\nRCPT TO:<R@example.test>\r\nDATA\r\n")
        self.assertEqual(out.count(b"250 2.1.5 Ok\r\n"), 3, out)
        self.send(p, t, b"x: y\r\n\r\nbody\r\n.\r\n")
        env = self.queue.committed()[0].envelope
        self.assertEqual([r.address for r in env.recipients], ["r@example.test", "R@example.test"])

    def test_noOpenRelay(self):
        p, t = self.connect(peer="192.0.2.7")
        self.send(p, t, b"EHLO outsider\r\n")
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n")
        self.assertEqual(out, b"250 2.1.0 Ok\r\n554 5.7.1 <victim@example.org>: Relay access denied\r\n"
                              b"554 5.5.1 Error: no valid recipients\r\n")
        self.assertEqual(self.queue.messages, [])
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="relay_denied"), 1)
        # probing for a relay, recipient after recipient, is an erring client: closed in the end
        out = self.send(p, t, b"RCPT TO:<victim@example.org>\r\n" * 30)
        self.assertTrue(out.endswith(b"421 4.7.0 mx.test Error: too many errors\r\n"), out)

    # -- envelope syntax and DSN

    def test_dsnParametersKept(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"MAIL FROM:<s@example.test> RET=HDRS ENVID=abc+2B1 SIZE=100 BODY=8BITMIME\r\n"
                              b"RCPT TO:<r@example.test> NOTIFY=success,failure ORCPT=rfc822;r+40example.test\r\n"
                              b"DATA\r\n")
        self.assertEqual(out.count(b"250 "), 2, out)
        self.send(p, t, b"x: y\r\n\r\nbody\r\n.\r\n")
        env = self.queue.committed()[0].envelope
        self.assertEqual((env.ret, env.envid), ("HDRS", "abc+1"))
        self.assertEqual(env.recipients[0].notify, "SUCCESS,FAILURE")
        self.assertEqual(env.recipients[0].orcpt, "rfc822;r@example.test")

    def test_badSyntax(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        cases = [
            (b"MAIL FROM:<no-at-sign>\r\n", b"501 5.1.7"),
            (b"MAIL FROM <a@b.test>\r\n", b"501 5.5.4"),
            (b"MAIL FROM:<a@b.test> FOO=1\r\n", b"555 5.5.4"),
            (b"MAIL FROM:<a@b.test> SIZE=99999999\r\n", b"552 5.3.4"),
            (b"MAIL FROM:<\xc3\xa9@b.test>\r\n", b"553 5.6.7"),
            (b"RCPT TO:<a@b.test>\r\n", b"503 5.5.1"),
            (b"BOGUS\r\n", b"500 5.5.2"),
            (b"DATA\r\n", b"503 5.5.1"),
        ]
        for line, code in cases:
            self.assertTrue(self.send(p, t, line).startswith(code), line)
        self.assertTrue(self.send(p, t, b"MAIL FROM:<\xc3\xa9@b.test> SMTPUTF8\r\n").startswith(b"250 "))
        self.assertTrue(self.send(p, t, b"RCPT TO:<bad address@x>\r\n").startswith(b"501 5.1.3"))
        self.assertTrue(self.send(p, t, b"RCPT TO:<Postmaster>\r\n").startswith(b"250 "))
        self.assertTrue(self.send(p, t, b"RSET\r\n").startswith(b"250 2.0.0"))
        self.assertTrue(self.send(p, t, b"MAIL FROM:<>\r\n").startswith(b"250 "))

    # -- bad input

    def test_overlongCommandLine(self):
        p, t = self.connect()
        out = self.send(p, t, b"EHLO " + b"x" * (MAX_COMMAND_LINE + 10))
        self.assertEqual(out, b"500 5.5.2 Error: line too long\r\n")
        self.assertEqual(self.send(p, t, b"yyyy\r\nNOOP\r\n"), b"250 2.0.0 Ok\r\n")  # the rest skipped
        self.assertFalse(t.disconnecting)

    def test_overlongDataLine(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.transaction(p, t, b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n")
        self.assertTrue(out.endswith(b"500 5.5.2 Error: line too long\r\n"), out)
        self.assertTrue(self.queue.messages[0].aborted)
        self.assertEqual(self.queue.committed(), [])
        # the session goes on
        self.assertTrue(self.transaction(p, t).endswith(b"250 2.0.0 Ok: queued as id1\r\n"))

    def test_oversizeDuringData(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n")
        m = self.queue.messages[0]
        chunk = b"z" * 98 + b"\r\n"
        for _ in range(150):  # 15 KB > 10 KB; nothing kept past the limit
            self.send(p, t, chunk)
        self.assertTrue(m.aborted)
        self.assertLess(len(m.data), 10_000 + 300)  # the trace headers, then at most the limit
        out = self.send(p, t, b".\r\n")
        self.assertEqual(out, b"552 5.3.4 Error: message too big for system\r\n")
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="size"), 1)
        self.assertTrue(self.send(p, t, b"NOOP\r\n").startswith(b"250"))

    def test_bareLF(self):
        p, t = self.connect()
        out = self.send(p, t, b"EHLO x\n")
        self.assertTrue(out.startswith(b"521 5.5.2"), out)
        self.assertTrue(t.disconnecting)
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\n")
        self.send(p, t, b"DATA\r\n")
        out = self.send(p, t, b"Subject: x\r\n\r\nsmuggle\n.\nMAIL FROM:<evil@x>\r\n")
        self.assertTrue(out.startswith(b"521 5.5.2"), out)
        self.assertTrue(self.queue.messages[0].aborted)
        self.assertEqual(self.queue.committed(), [])

    def test_nulInData(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.transaction(p, t, b"Subject: x\r\n\r\na\0b\r\n")
        self.assertTrue(out.endswith(b"554 5.6.0 Error: message contains NUL characters\r\n"), out)
        self.assertEqual(self.queue.committed(), [])

    def test_bareCRInData(self):
        """
        A bare CR is refused like NUL (RFC 5321 2.3.8): relayed, "<CR>.<CR>" is an end of data for some
        receivers (SMTP smuggling); only the transaction ends.
        """
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.transaction(p, t, b"Subject: x\r\n\r\nfoo\r.\rMAIL FROM:<evil@x>\r\n")
        self.assertTrue(out.endswith(b"554 5.6.0 Error: message contains bare <CR> characters\r\n"), out)
        self.assertEqual(self.queue.committed(), [])
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="bare_cr"), 1)
        out = self.transaction(p, t)
        self.assertTrue(out.endswith(b"250 2.0.0 Ok: queued as id1\r\n"), out)

    def test_mailLoopRefused(self):
        """More than 100 Received headers (RFC 5321 6.3): a loop; refused, not relayed once more."""
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        hops = b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        out = self.transaction(p, t, hops * 101 + b"Subject: x\r\n\r\nloop\r\n")
        self.assertTrue(out.endswith(b"554 5.4.6 Error: too many hops (a mail loop?)\r\n"), out)
        self.assertEqual(self.queue.committed(), [])
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="loop"), 1)
        out = self.transaction(p, t, hops * 100 + b"Subject: x\r\n\r\nfine\r\n")
        self.assertTrue(out.endswith(b"250 2.0.0 Ok: queued as id1\r\n"), out)

    def test_vanishMidData(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\n")
        self.send(p, t, b"DATA\r\n")
        self.send(p, t, b"Subject: x\r\n\r\npartial")
        p.connectionLost(None)
        self.assertTrue(self.queue.messages[0].aborted)
        self.assertEqual(self.queue.committed(), [])
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="lost_in_data"), 1)

    # -- pipelining

    def test_pipelinedGroupRepliesInOrderAndWaitsForCommit(self):
        self.queue.autoCommit = False
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<a@example.test>\r\n"
                              b"RCPT TO:<b@example.test>\r\nDATA\r\n")
        self.assertEqual(out.count(b"\r\n"), 4)
        out = self.send(p, t, b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<s2@example.test>\r\nQUIT\r\n")
        self.assertEqual(out, b"")  # nothing answered before the message is durable
        self.assertFalse(t.disconnecting)
        d, m = self.queue.pending[0]
        t.clear()
        d.callback(m.id)
        self.assertEqual(t.value(), b"250 2.0.0 Ok: queued as id0\r\n250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n")
        self.assertTrue(t.disconnecting)

    def test_clientNotReadingRepliesIsNotRead(self):
        """
        Back-pressure: the session is its transport's producer.  When the client does not read its replies
        and the transport's buffer fills, the session stops answering, and once the input waiting passes
        MAX_HELD_INPUT it stops reading (memory stays bounded).  Not at once: under TLS the banner waits
        for the handshake, which must still be read.
        """
        self.queue.autoCommit = False
        p, t = self.connect(config=self.makeConfig(junkLimit=10**6))  # NOOPs here are not junk
        self.assertIs(t.producer, p)
        self.assertTrue(t.streaming)
        self.send(p, t, b"EHLO x\r\n")
        p.pauseProducing()  # the transport: my write buffer is full
        self.assertEqual(self.send(p, t, b"NOOP\r\n"), b"")
        self.assertEqual(t.producerState, "producing")  # a little input: still read
        self.assertEqual(self.send(p, t, b"NOOP\r\n" * 50000), b"")
        self.assertEqual(t.producerState, "paused")
        p.resumeProducing()
        self.assertEqual(t.value().count(b"250 2.0.0 Ok\r\n"), 50001)
        self.assertEqual(t.producerState, "producing")
        # input held behind a commit, and writes paused meanwhile: both must clear
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
        self.send(p, t, b"x: y\r\n\r\nbody\r\n.\r\n" + b"NOOP\r\n" * 50000)
        self.assertEqual(t.producerState, "paused")
        p.pauseProducing()
        d, m = self.queue.pending[0]
        t.clear()
        d.callback(m.id)
        self.assertEqual(t.value(), b"250 2.0.0 Ok: queued as id0\r\n")  # the rest waits for the client
        self.assertEqual(t.producerState, "paused")
        p.resumeProducing()
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(t.value().count(b"250 2.0.0 Ok\r\n"), 50000)

    def test_dataPipelinedAfterDATA(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\nSubject: x\r\n")
        self.assertTrue(out.endswith(b"554 5.5.0 Error: SMTP protocol synchronization (data sent after DATA)\r\n"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.queue.messages, [])

    def test_commitFailure(self):
        self.queue.autoCommit = False
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        self.transaction(p, t)
        d, m = self.queue.pending[0]
        t.clear()
        d.errback(OSError("disk full"))
        self.assertEqual(t.value(), b"451 4.3.0 Error: local error in processing; message not accepted\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_failingAcceptHookStillAnswers(self):
        """The message is durable: a bug in the hook (delivery's kick) is logged, the client still gets its 250."""
        def broken(id):
            raise RuntimeError("kick failed")

        p, t = self.connect(config=self.makeConfig(onAccepted=broken))
        self.send(p, t, b"EHLO x\r\n")
        self.assertTrue(self.transaction(p, t).endswith(b"250 2.0.0 Ok: queued as id0\r\n"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.send(p, t, b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_diskFullWhileReceiving(self):
        """The queue file cannot be written (ENOSPC): 452 4.3.1 at the end of the data, the session goes on."""
        import errno

        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n")
        (m,) = self.queue.messages

        def full(data):
            raise OSError(errno.ENOSPC, "No space left on device")

        m.write = full
        out = self.send(p, t, b"Subject: x\r\n\r\n" + b"body\r\n" * 100 + b".\r\n")
        self.assertEqual(out, b"452 4.3.1 Error: insufficient system storage\r\n")
        self.assertTrue(m.aborted)
        self.assertEqual(self.queue.committed(), [])
        self.assertFalse(t.disconnecting)
        self.assertEqual(self.send(p, t, b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    # -- limits

    def test_maxRecipients(self):
        config = self.makeConfig(maxRecipients=2)
        p, t = self.connect(config=config)
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        out = self.send(p, t, b"RCPT TO:<a@e.test>\r\nRCPT TO:<b@e.test>\r\nRCPT TO:<c@e.test>\r\n")
        self.assertEqual(out, b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n")

    def test_maxMessagesPerSession(self):
        config = self.makeConfig(maxMessages=1)
        p, t = self.connect(config=config)
        self.send(p, t, b"EHLO x\r\n")
        self.assertTrue(self.transaction(p, t).endswith(b"queued as id0\r\n"))
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        self.assertTrue(out.startswith(b"421 4.7.0"), out)
        self.assertTrue(t.disconnecting)

    def test_messageRatePerClient(self):
        config = self.makeConfig(messageRate=RateLimiter(1, 1, self.clock))
        p, t = self.connect(config=config)
        self.send(p, t, b"EHLO x\r\n")
        self.assertTrue(self.transaction(p, t).endswith(b"queued as id0\r\n"))
        self.assertTrue(self.send(p, t, b"MAIL FROM:<s@example.test>\r\n").startswith(b"450 4.7.1"))
        self.clock.advance(1)
        self.assertTrue(self.send(p, t, b"MAIL FROM:<s@example.test>\r\n").startswith(b"250"))
        # a client that keeps trying without waiting is an erring client: closed in the end
        self.send(p, t, b"RSET\r\n")
        out = self.send(p, t, b"MAIL FROM:<s@example.test>\r\n" * 30)
        self.assertTrue(out.endswith(b"421 4.7.0 mx.test Error: too many errors\r\n"), out)

    def test_pipeliningAfterEHLO(self):
        p, t = self.connect()
        out = self.send(p, t, b"EHLO x\r\nMAIL FROM:<s@example.test>\r\n")
        self.assertTrue(out.startswith(b"554 5.5.0"), out)
        self.assertTrue(t.disconnecting)

    def test_tooManyErrors(self):
        p, t = self.connect()
        out = self.send(p, t, b"X\r\n" * 25)
        self.assertTrue(out.endswith(b"421 4.7.0 mx.test Error: too many errors\r\n"))
        self.assertTrue(t.disconnecting)

    def test_junkCommandLimit(self):
        """20,000 pipelined NOOPs: junkLimit (100) answered, then 421 and close (Postfix smtpd_junk_command_limit)."""
        p, t = self.connect()
        out = self.send(p, t, b"NOOP\r\n" * 20000)
        self.assertEqual(out, b"250 2.0.0 Ok\r\n" * 100 + b"421 4.7.0 mx.test Error: too many junk commands\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="junk_commands"), 1)

    def test_junkCountsEveryJunkVerbAndRestartsAfterAMessage(self):
        p, t = self.connect(config=self.makeConfig(junkLimit=4))
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n")
        self.assertEqual(out.count(b"\r\n"), 4)
        self.assertFalse(t.disconnecting)
        self.assertTrue(self.transaction(p, t).endswith(b"250 2.0.0 Ok: queued as id0\r\n"))
        out = self.send(p, t, b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n")  # counted again from 0
        self.assertEqual(out.count(b"\r\n"), 4)
        self.assertFalse(t.disconnecting)
        out = self.send(p, t, b"EXPN x\r\nNOOP\r\n")
        self.assertEqual(out, b"421 4.7.0 mx.test Error: too many junk commands\r\n")
        self.assertTrue(t.disconnecting)

    def test_longPipelineParsedFromAnOffset(self):
        """
        200,000 pipelined commands in one read are parsed in linear time: each line is sliced once from
        an offset, the rest of the buffer is never copied per line (that was quadratic: ~1.2 MB copied
        200,000 times).  Structural: the buffer counts the bytes its slices copy.
        """
        copied = [0]
        lines = 200_000
        data = b"NOOP\r\n" * lines
        limit = 3 * len(data)

        class Counting(bytes):
            def __getitem__(self, key):
                out = bytes.__getitem__(self, key)
                if isinstance(key, slice):
                    copied[0] += len(out)
                    if copied[0] > limit:
                        raise AssertionError(f"{copied[0]} bytes copied parsing {len(data)}")
                    return Counting(out)
                return out

        p, t = self.connect(config=self.makeConfig(junkLimit=10**6))
        p.dataReceived(Counting(data))
        self.assertEqual(t.value().count(b"250 2.0.0 Ok\r\n"), lines)
        self.assertLessEqual(copied[0], limit)
        self.assertEqual((p._buf, p._pos), (b"", 0))  # nothing kept once parsed

    def test_idleTimeoutAndDrain(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n")
        p.drain()  # mid-transaction: not yet
        self.assertFalse(t.disconnecting)
        t.clear()
        p.timedOut()
        self.assertTrue(t.value().startswith(b"421 4.4.2"))
        self.assertTrue(self.queue.messages[0].aborted)
        p, t = self.connect()
        p.drain()
        self.assertTrue(t.value().startswith(b"421 4.3.2"))


def _addr(host):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, 12345)
