"""
POP3 (netsvc.mailbox.pop3): the wire behaviour over a StringTransport, then over
real loopback sockets with Python's poplib (the books' recipe), a client that
never reads, junk forever and a flood of bad passwords.
"""

from __future__ import annotations

import base64

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import directlyProvides

from netsvc.auth import FailureLimit, Refused
from netsvc.mailbox.maildir import Maildirs
from netsvc.mailbox.pop3 import CHUNK, POP3Config, POP3Metrics, POP3Session, topLines, toWire
from netsvc.metrics import Registry

MESSAGE = (b"From: alice@lab.test\r\nTo: dev@lab.test\r\nSubject: one\r\n\r\n"
           b"first line\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast\r\n")


class FakeAuthenticator:
    """dev/dev is right; counts the checks it made."""

    def __init__(self, users=None):
        self.users = users or {"dev": "dev"}
        self.checks = []

    def isReserved(self, user):
        return user.lower() in self.users

    def check(self, user, password, client=None):
        self.checks.append((user, password))
        return defer.succeed(self.users.get(user.lower()) == password)


def syncRun(f, *args):
    return defer.maybeDeferred(f, *args)


class FullTransport(StringTransport):
    """A transport whose buffer is full after every write: it pauses its streaming producer each time."""

    def write(self, data):
        StringTransport.write(self, data)
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS (and then provides ISSLTransport)."""

    tlsStarted = None

    def startTLS(self, contextFactory, normal=True):
        self.tlsStarted = contextFactory
        directlyProvides(self, ISSLTransport)


class SessionTestCase(unittest.TestCase):
    secure = True

    def setUp(self):
        self.clock = Clock()
        self.store = Maildirs(self.mktemp(), fsync=False)
        self.auth = FakeAuthenticator()
        self.registry = Registry()
        self.failures = FailureLimit(self.clock, rate=0.01, burst=5, registry=self.registry, service="mailbox")
        self.config = POP3Config(store=self.store, authenticator=self.auth, metrics=POP3Metrics(self.registry),
                                 clock=self.clock, failures=self.failures, tlsOptions=lambda: "ctx",
                                 run=syncRun, junkLimit=20)

    def connect(self, secure=None, host="10.0.0.1"):
        proto = POP3Session(self.config)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, 4321))
        if self.secure if secure is None else secure:
            directlyProvides(transport, ISSLTransport)
        proto.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"+OK"))
        transport.clear()
        return proto, transport

    def send(self, proto, transport, *lines):
        transport.clear()
        proto.dataReceived(b"".join(line + b"\r\n" for line in lines))
        return transport.value()

    def login(self, user=b"dev", password=b"dev"):
        proto, transport = self.connect()
        out = self.send(proto, transport, b"USER " + user, b"PASS " + password)
        self.assertTrue(out.endswith(b"+OK Logged in; %d messages (%d octets).\r\n"
                                     % (len(proto.drop.messages), sum(m.size for m in proto.drop.messages))),
                        out)
        return proto, transport


class WireTests(unittest.TestCase):
    def test_toWire(self):
        """CRLF line ends, dot-stuffing (the first line too), a final CRLF, the terminator."""
        self.assertEqual(toWire(b".a\r\nb\r\n.\r\n"), b"..a\r\nb\r\n..\r\n.\r\n")
        self.assertEqual(toWire(b"a\nb\n.c"), b"a\r\nb\r\n..c\r\n.\r\n")  # bare LF, no final newline
        self.assertEqual(toWire(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n")
        self.assertEqual(toWire(b""), b".\r\n")

    def test_toWireLongMessage(self):
        """Stuffing across what would be chunk boundaries in a streamed copy: every line."""
        body = b"".join(b".%d\r\n" % i for i in range(50000))
        wire = toWire(body)
        self.assertEqual(wire.count(b"\r\n.."), 50000 - 1)
        self.assertTrue(wire.startswith(b"..0\r\n"))

    def test_topLines(self):
        msg = b"A: 1\nB: 2\n\nl1\nl2\n.l3\nl4\n"
        self.assertEqual(topLines(msg, 0), b"A: 1\r\nB: 2\r\n\r\n.\r\n")
        self.assertEqual(topLines(msg, 3), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n..l3\r\n.\r\n")
        self.assertEqual(topLines(msg, 99), toWire(msg))
        self.assertEqual(topLines(b"A: 1\r\n", 5), b"A: 1\r\n.\r\n")


class PlainTests(SessionTestCase):
    """Before TLS: no passwords, STLS offered."""

    secure = False

    def test_capaBeforeTLS(self):
        proto, t = self.connect()
        out = self.send(proto, t, b"CAPA")
        self.assertIn(b"\r\nSTLS\r\n", out)
        self.assertNotIn(b"USER", out)
        self.assertNotIn(b"SASL", out)
        self.assertTrue(out.endswith(b"\r\n.\r\n"))

    def test_passwordsRefusedBeforeTLS(self):
        """USER, PASS and AUTH answer -ERR [AUTH] in clear; nothing is checked."""
        proto, t = self.connect()
        plain = base64.b64encode(b"\0dev\0dev")
        out = self.send(proto, t, b"USER dev", b"PASS dev", b"AUTH PLAIN " + plain)
        self.assertEqual(out.count(b"-ERR [AUTH] Plaintext authentication disallowed"), 3)
        self.assertEqual(self.auth.checks, [])
        self.assertIsNone(proto.drop)

    def test_stls(self):
        """STLS: +OK, TLS started with the configured context, then USER/PASS work and CAPA changes."""
        proto, t = self.connect()
        out = self.send(proto, t, b"STLS")
        self.assertEqual(out, b"+OK Begin TLS negotiation.\r\n")
        self.assertEqual(t.tlsStarted, "ctx")
        out = self.send(proto, t, b"CAPA")
        self.assertIn(b"\r\nUSER\r\nSASL PLAIN\r\n", out)
        self.assertNotIn(b"STLS", out)
        self.assertIn(b"-ERR TLS is already active", self.send(proto, t, b"STLS"))
        self.send(proto, t, b"USER dev", b"PASS dev")
        self.assertIsNotNone(proto.drop)

    def test_userForgottenAtSTLS(self):
        """A USER given in clear is not used after STLS (RFC 2595)."""
        proto, t = self.connect(secure=True)
        proto.secure = False  # USER accepted, then STLS
        proto.userGiven = "dev"
        self.send(proto, t, b"STLS")
        self.assertIn(b"-ERR USER first", self.send(proto, t, b"PASS dev"))

    def test_pipelinedAfterSTLS(self):
        """Commands pipelined after STLS would be read as if under TLS: -ERR and close, TLS not started."""
        proto, t = self.connect()
        out = self.send(proto, t, b"STLS", b"USER dev")
        self.assertIn(b"-ERR Commands pipelined after STLS", out)
        self.assertIsNone(t.tlsStarted)
        self.assertTrue(t.disconnecting)

    def test_apopNotOffered(self):
        proto, t = self.connect()
        self.assertTrue(self.send(proto, t, b"APOP dev 0123456789abcdef").startswith(b"-ERR"))
        greeting = POP3Session(self.config)
        t2 = StringTransport()
        greeting.makeConnection(t2)
        self.assertNotIn(b"<", t2.value())  # no APOP timestamp in the greeting

    def test_transactionCommandsNeedLogin(self):
        proto, t = self.connect()
        for cmd in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL"):
            self.assertTrue(self.send(proto, t, cmd).startswith(b"-ERR Log in first"))


class LoginTests(SessionTestCase):
    def test_userPass(self):
        self.store.deliver("dev", MESSAGE)
        proto, t = self.login()
        self.assertEqual(proto.user, "dev")
        self.assertEqual(self.auth.checks, [("dev", "dev")])

    def test_capaAfterLogin(self):
        proto, t = self.login()
        out = self.send(proto, t, b"CAPA")
        self.assertNotIn(b"USER", out)
        self.assertNotIn(b"SASL", out)
        self.assertIn(b"UIDL", out)

    def test_userCaseInsensitive(self):
        """DEV logs in to dev's maildrop (the store's names are lower case)."""
        self.store.deliver("dev", MESSAGE)
        proto, t = self.login(user=b"DEV")
        self.assertEqual(proto.user, "dev")
        self.assertEqual(len(proto.drop.messages), 1)

    def test_wrongPassword(self):
        proto, t = self.connect()
        out = self.send(proto, t, b"USER dev", b"PASS nope")
        self.assertTrue(out.endswith(b"-ERR [AUTH] Authentication failed.\r\n"))
        self.assertIsNone(proto.drop)

    def test_closedAfterFailuresPerSession(self):
        proto, t = self.connect()
        for _ in range(2):
            self.send(proto, t, b"USER dev", b"PASS nope")
        self.assertFalse(t.disconnecting)
        out = self.send(proto, t, b"USER dev", b"PASS nope")
        self.assertIn(b"too many failures", out)
        self.assertTrue(t.disconnecting)

    def test_authPlainInitialResponse(self):
        proto, t = self.connect()
        out = self.send(proto, t, b"AUTH PLAIN " + base64.b64encode(b"\0dev\0dev"))
        self.assertTrue(out.startswith(b"+OK Logged in"), out)

    def test_authPlainContinuation(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN"), b"+ \r\n")
        out = self.send(proto, t, base64.b64encode(b"dev\0dev\0dev"))
        self.assertTrue(out.startswith(b"+OK Logged in"), out)

    def test_authPlainCancelAndGarbage(self):
        proto, t = self.connect()
        self.send(proto, t, b"AUTH PLAIN")
        self.assertIn(b"-ERR Authentication cancelled", self.send(proto, t, b"*"))
        self.assertIn(b"-ERR [AUTH]", self.send(proto, t, b"AUTH PLAIN !!!notbase64"))
        # an authorization identity other than the user: refused without a check
        self.assertIn(b"-ERR [AUTH]", self.send(proto, t, b"AUTH PLAIN " + base64.b64encode(b"root\0dev\0dev")))
        self.assertEqual(self.auth.checks, [])
        self.assertIn(b"-ERR Unsupported", self.send(proto, t, b"AUTH CRAM-MD5"))

    def test_authListing(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH"), b"+OK Mechanisms follow.\r\nPLAIN\r\n.\r\n")

    def test_floodOfBadPasswordsLimited(self):
        """
        Failures are reserved per client IP before the check: after the burst (5)
        the answer is -ERR [SYS/TEMP] and the authenticator is not asked, from any
        new session of that address; another address is not affected.
        """
        answers = []
        for _ in range(6):  # 6 sessions x 3 attempts, from one address
            proto, t = self.connect()
            for _ in range(3):
                answers.append(self.send(proto, t, b"USER dev", b"PASS wrong"))
                if t.disconnecting:
                    break
        self.assertEqual(len(self.auth.checks), 5)
        self.assertTrue(any(b"-ERR [SYS/TEMP] Too many failed logins" in a for a in answers))
        proto, t = self.connect(host="10.0.0.2")
        self.send(proto, t, b"USER dev", b"PASS dev")
        self.assertIsNotNone(proto.drop)
        self.assertGreater(self.failures.refusedRate.value, 0)

    def test_rightPasswordRefunds(self):
        """A right password gives its reservation back: logins never use up the allowance."""
        for _ in range(20):
            proto, t = self.login()
        self.assertTrue(self.failures.perClient.allow("10.0.0.1"))

    def test_busyPool(self):
        """A check the hashing pool refused (busy): -ERR [SYS/TEMP], not a failure."""
        self.auth.check = lambda u, p, c=None: defer.succeed(Refused("busy"))
        proto, t = self.connect()
        out = self.send(proto, t, b"USER dev", b"PASS dev")
        self.assertIn(b"-ERR [SYS/TEMP] Temporary authentication failure", out)
        self.assertEqual(proto.failures, 0)

    def test_inputHeldDuringCheck(self):
        """Commands pipelined behind PASS wait for the check and are answered in order."""
        pending = defer.Deferred()
        self.auth.check = lambda u, p, c=None: pending
        self.store.deliver("dev", MESSAGE)
        proto, t = self.connect()
        out = self.send(proto, t, b"USER dev", b"PASS dev", b"STAT", b"QUIT")
        self.assertEqual(out, b"+OK Send PASS.\r\n")
        t.clear()
        pending.callback(True)
        self.assertEqual(t.value(), b"+OK Logged in; 1 messages (%d octets).\r\n+OK 1 %d\r\n+OK Logging out.\r\n"
                         % (len(MESSAGE), len(MESSAGE)))


class TransactionTests(SessionTestCase):
    def setUp(self):
        super().setUp()
        self.store.deliver("dev", MESSAGE)
        self.store.deliver("dev", b"Subject: two\r\n\r\nsecond\r\n")
        self.proto, self.t = self.login()

    def cmd(self, *lines):
        return self.send(self.proto, self.t, *lines)

    def test_stat(self):
        self.assertEqual(self.cmd(b"STAT"), b"+OK 2 %d\r\n" % (len(MESSAGE) + 24))

    def test_list(self):
        self.assertEqual(self.cmd(b"LIST"), b"+OK 2 messages\r\n1 %d\r\n2 24\r\n.\r\n" % len(MESSAGE))
        self.assertEqual(self.cmd(b"LIST 2"), b"+OK 2 24\r\n")
        self.assertTrue(self.cmd(b"LIST 3").startswith(b"-ERR There is no message 3"))
        self.assertTrue(self.cmd(b"LIST x").startswith(b"-ERR Bad message number"))

    def test_uidlStable(self):
        """UIDL: the store's UID and UIDVALIDITY, the same in the next session."""
        out = self.cmd(b"UIDL")
        folder = self.store.inbox("dev")
        uids = [m.uid for m in folder.messages()]
        expected = b"".join(b"%d %08x%08x\r\n" % (n, uid, folder.uidvalidity) for n, uid in enumerate(uids, 1))
        self.assertEqual(out, b"+OK 2 messages\r\n" + expected + b".\r\n")
        proto, t = self.login()
        self.assertEqual(self.send(proto, t, b"UIDL"), out)

    def test_retr(self):
        out = self.cmd(b"RETR 1")
        self.assertEqual(out, b"+OK %d octets\r\n" % len(MESSAGE) + toWire(MESSAGE))
        self.assertIn(b"\r\n..starts with a dot\r\n...two dots\r\n..\r\nlast\r\n.\r\n", out)

    def test_top(self):
        out = self.cmd(b"TOP 1 1")
        self.assertEqual(out, b"+OK Top of message follows.\r\n" + topLines(MESSAGE, 1))
        self.assertTrue(self.cmd(b"TOP 1").startswith(b"-ERR Syntax"))

    def test_deleAtQuitOnly(self):
        """DELE marks; the message goes only at QUIT."""
        self.assertEqual(self.cmd(b"DELE 1"), b"+OK Marked to be deleted.\r\n")
        self.assertTrue(self.cmd(b"RETR 1").startswith(b"-ERR Message 1 is deleted"))
        self.assertEqual(self.cmd(b"STAT"), b"+OK 1 24\r\n")
        self.assertEqual(self.cmd(b"LIST"), b"+OK 1 messages\r\n2 24\r\n.\r\n")
        self.assertEqual(len(self.store.inbox("dev").messages()), 2)
        self.assertEqual(self.cmd(b"QUIT"), b"+OK Logging out, messages deleted.\r\n")
        self.assertTrue(self.t.disconnecting)
        left = self.store.inbox("dev").messages()
        self.assertEqual([self.store.inbox("dev").read(m.uid) for m in left], [b"Subject: two\r\n\r\nsecond\r\n"])

    def test_droppedConnectionDeletesNothing(self):
        self.cmd(b"DELE 1", b"DELE 2")
        self.proto.connectionLost(None)
        self.assertEqual(len(self.store.inbox("dev").messages()), 2)

    def test_timeoutDeletesNothing(self):
        self.cmd(b"DELE 1")
        self.proto.timedOut()
        self.assertIn(b"-ERR Disconnected for inactivity", self.t.value())
        self.assertTrue(self.t.disconnecting)
        self.assertEqual(len(self.store.inbox("dev").messages()), 2)

    def test_rset(self):
        self.cmd(b"DELE 1", b"DELE 2")
        self.assertEqual(self.cmd(b"RSET"), b"+OK\r\n")
        self.assertEqual(self.cmd(b"STAT"), b"+OK 2 %d\r\n" % (len(MESSAGE) + 24))
        self.cmd(b"QUIT")
        self.assertEqual(len(self.store.inbox("dev").messages()), 2)

    def test_goneMessage(self):
        """A message another session removed meanwhile: -ERR, the session goes on."""
        folder = self.store.inbox("dev")
        folder.remove([folder.messages()[0].uid])
        self.assertTrue(self.cmd(b"RETR 1").startswith(b"-ERR Message 1 was removed by another session"))
        self.assertTrue(self.cmd(b"RETR 2").startswith(b"+OK"))

    def test_loginAgainRefused(self):
        self.assertTrue(self.cmd(b"USER dev").startswith(b"-ERR Already logged in"))

    def test_neverReadingClientBounded(self):
        """
        RETR of a big message to a transport whose buffer stays full: one chunk per
        resume, no more; pipelined input is held, then reading stops; all of it
        goes once the client reads.
        """
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2000
        self.store.deliver("dev", big)
        proto, t = self.login()
        full = FullTransport(peerAddress=t.getPeer())
        directlyProvides(full, ISSLTransport)
        proto.transport = full
        full.registerProducer(proto, True)
        proto.dataReceived(b"RETR 3\r\n")
        self.assertLessEqual(len(full.value()), CHUNK + 100)  # the +OK line and one chunk
        proto.dataReceived(b"NOOP\r\n" * 20000)  # 120 KB pipelined: held, then reading stops
        self.assertEqual(full.producerState, "paused")
        self.assertLessEqual(len(full.value()), CHUNK + 100)
        for _ in range(1000):
            before = len(full.value())
            proto.resumeProducing()
            self.assertLessEqual(len(full.value()) - before, CHUNK + 100)
            if proto._stream is None:
                break
        out = full.value()
        self.assertTrue(out.startswith(b"+OK %d octets\r\n" % len(big)))
        self.assertEqual(out[out.index(b"\r\n") + 2:out.index(b"\r\n.\r\n") + 5], toWire(big))


class JunkTests(SessionTestCase):
    def test_junkForeverClosed(self):
        """Unknown commands: -ERR each, then after junkLimit -ERR and close; the rest is ignored."""
        proto, t = self.connect()
        for i in range(100):
            proto.dataReceived(b"XYZZY %d\r\n" % i)
            if t.disconnecting:
                break
        self.assertEqual(i, 20)
        self.assertIn(b"Too many bad or idle commands", t.value())
        size = len(t.value())
        proto.dataReceived(b"XYZZY\r\n" * 100)
        self.assertEqual(len(t.value()), size)

    def test_noopForeverClosed(self):
        proto, t = self.login()
        proto.dataReceived(b"NOOP\r\n" * 100)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value().count(b"+OK\r\n"), 20)

    def test_longLine(self):
        proto, t = self.connect()
        out = self.send(proto, t, b"USER " + b"a" * 5000)
        self.assertIn(b"-ERR Line too long", out)
        self.assertEqual(out.count(b"-ERR"), 1)
        self.assertIn(b"+OK", self.send(proto, t, b"CAPA"))

    def test_endlessLineBounded(self):
        """A line that never ends: the buffer stays bounded (what was read beyond the limit is dropped)."""
        proto, t = self.connect()
        for _ in range(100):
            proto.dataReceived(b"a" * 1000)
        self.assertLessEqual(len(proto._buf), 3000)
        self.assertEqual(t.value().count(b"-ERR Line too long"), 1)

    def test_drain(self):
        proto, t = self.login()
        proto.drain()
        self.assertIn(b"-ERR [SYS/TEMP] Server shutting down", t.value())
        self.assertTrue(t.disconnecting)
