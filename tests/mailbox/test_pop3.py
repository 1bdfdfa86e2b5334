"""
POP3 (netsvc.mailbox.pop3): the wire behaviour over a StringTransport, then over
real loopback sockets with Python's poplib (the books' recipe), a client that
never reads, junk forever and a flood of bad passwords.
"""

from __future__ import annotations

import base64
import poplib
import socket
import ssl
from pathlib import Path

from twisted.internet import defer, endpoints, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import directlyProvides

from netsvc.auth import FailureLimit, Refused, addUser, hashPool
from netsvc.mailbox.maildir import Maildirs
from netsvc.mailbox.pop3 import CHUNK, POP3Config, POP3Factory, POP3Metrics, POP3Session, topLines, toWire
from netsvc.metrics import Registry
from tests.helpers import Keeping, port, silentClient, sleep, startDaemon, unsentBytes

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

    def test_userWithoutMailbox(self):
        """A user the authenticator accepts whose name the store refuses: -ERR [SYS/PERM], not logged in."""
        self.auth.users["../etc"] = "pw"
        proto, t = self.connect()
        out = self.send(proto, t, b"USER ../etc", b"PASS pw")
        self.assertTrue(out.endswith(b"-ERR [SYS/PERM] There is no mailbox for this user.\r\n"), out)
        self.assertIsNone(proto.drop)

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

    def test_inputHeldWhileOpening(self):
        """Commands pipelined behind PASS wait until the maildrop is open (store work in a thread)."""
        calls = []

        def later(f, *args):
            d = defer.Deferred()
            calls.append((d, f, args))
            return d

        self.config.run = later
        self.store.deliver("dev", MESSAGE)
        proto, t = self.connect()
        out = self.send(proto, t, b"USER dev", b"PASS dev", b"STAT", b"QUIT")
        self.assertEqual(out, b"+OK Send PASS.\r\n")
        d, f, args = calls.pop()
        t.clear()
        d.callback(f(*args))
        self.assertEqual(t.value(), b"+OK Logged in; 1 messages (%d octets).\r\n+OK 1 %d\r\n+OK Logging out.\r\n"
                         % (len(MESSAGE), len(MESSAGE)))

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


# -- over loopback sockets ---------------------------------------------------------------------

ATTACHMENT = bytes(range(256)) * 64


def bigMessage() -> bytes:
    import email.policy
    from email.message import EmailMessage

    m = EmailMessage(policy=email.policy.SMTP)
    m["From"], m["To"], m["Subject"] = "alice@lab.test", "dev@lab.test", "with an attachment"
    m.set_content("Hello dev,\n.a line with a dot\n\nbye\n")
    m.add_attachment(ATTACHMENT, maintype="application", subtype="octet-stream", filename="blob.bin")
    return m.as_bytes()


def inThread(f, *args):
    return threads.deferToThread(f, *args)


class LoopbackTests(unittest.TestCase):
    """A daemon with POP3 on a plain (STLS) and a tls: listener; Python's poplib as the client."""

    burst = 4

    def setUp(self):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        users = folder / "users.txt"
        addUser(users, "dev", "dev")
        self.daemon = startDaemon(self, f"""
services:
  mailbox:
    listen:
      - {{endpoint: "tcp:0:interface=127.0.0.1", protocol: pop3}}
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: pop3}}
    users: {users}
    fsync: false
    auth_failures: {{per_session: 3, rate: 0.001, burst: {self.burst}}}
""")
        state = Path(self.daemon.context.stateDir)
        self.store = Maildirs(state / "mail", fsync=False)
        self.plainPort = port(self.daemon, 0, "mailbox")
        self.tlsPort = port(self.daemon, 1, "mailbox")
        self.tls = ssl.create_default_context(cafile=str(state / "tls" / "selfsigned.pem"))

    def pop3s(self):
        return poplib.POP3_SSL("127.0.0.1", self.tlsPort, context=self.tls, timeout=10)

    @defer.inlineCallbacks
    def test_booksRecipe(self):
        """POP3_SSL user/pass_/list/retr gives the delivered bytes (the attachment byte for byte)."""
        data = bigMessage()
        self.store.deliver("dev", data)

        def recipe():
            p = self.pop3s()
            try:
                p.user("dev")
                p.pass_("dev")
                resp, listing, _ = p.list()
                resp, lines, octets = p.retr(1)
                uidl = p.uidl()
            finally:
                p.quit()
            return listing, lines, octets, uidl

        listing, lines, octets, uidl = yield inThread(recipe)
        self.assertEqual(listing, [b"1 %d" % len(data)])
        got = b"\r\n".join(lines) + b"\r\n"
        self.assertEqual(got, data.replace(b"\n", b"\r\n") if b"\r\n" not in data else data)
        import email

        attachment = [part for part in email.message_from_bytes(got).walk()
                      if part.get_filename() == "blob.bin"][0]
        self.assertEqual(attachment.get_payload(decode=True), ATTACHMENT)
        folder = self.store.inbox("dev")
        self.assertEqual(uidl[1], [b"1 %08x%08x" % (folder.messages()[0].uid, folder.uidvalidity)])

    @defer.inlineCallbacks
    def test_stls(self):
        """On the plain port: CAPA offers STLS, USER is refused before it and works after it."""
        self.store.deliver("dev", b"Subject: x\r\n\r\nhi\r\n")

        def session():
            p = poplib.POP3("127.0.0.1", self.plainPort, timeout=10)
            try:
                before = p.capa()
                try:
                    p.user("dev")
                    refused = None
                except poplib.error_proto as e:
                    refused = e.args[0]
                p.stls(self.tls)
                after = p.capa()
                p.user("dev")
                p.pass_("dev")
                stat = p.stat()
            finally:
                p.quit()
            return before, refused, after, stat

        before, refused, after, stat = yield inThread(session)
        self.assertIn("STLS", before)
        self.assertNotIn("USER", before)
        self.assertTrue(refused.startswith(b"-ERR [AUTH]"))
        self.assertIn("USER", after)
        self.assertEqual(after["SASL"], ["PLAIN"])
        self.assertEqual(stat[0], 1)

    @defer.inlineCallbacks
    def test_deleAtQuitOnly(self):
        """DELE, then the connection dropped: nothing deleted; DELE then QUIT: deleted."""
        self.store.deliver("dev", b"Subject: 1\r\n\r\none\r\n")
        self.store.deliver("dev", b"Subject: 2\r\n\r\ntwo\r\n")

        def vanish():
            p = self.pop3s()
            p.user("dev")
            p.pass_("dev")
            p.dele(1)
            p.dele(2)
            p.sock.close()  # no QUIT

        yield inThread(vanish)
        yield sleep(0.2)
        self.assertEqual(len(self.store.inbox("dev").messages()), 2)

        def quit():
            p = self.pop3s()
            p.user("dev")
            p.pass_("dev")
            p.dele(1)
            return p.quit()

        answer = yield inThread(quit)
        self.assertTrue(answer.startswith(b"+OK"))
        left = self.store.inbox("dev").messages()
        self.assertEqual([self.store.inbox("dev").read(m.uid) for m in left], [b"Subject: 2\r\n\r\ntwo\r\n"])

    @defer.inlineCallbacks
    def test_floodOfBadPasswords(self):
        """
        Sessions from one address keep guessing: after the burst the server answers
        -ERR [SYS/TEMP] without hashing anything; each session closes after 3 failures.
        """
        pool = hashPool(reactor)
        before = pool.ran.value

        def guess():
            answers = []
            for _ in range(5):
                p = self.pop3s()
                try:
                    for _ in range(3):
                        p.user("dev")
                        try:
                            p.pass_("wrong")
                        except poplib.error_proto as e:
                            answers.append(e.args[0])
                except (poplib.error_proto, OSError) as e:
                    answers.append(str(e).encode())
                finally:
                    p.close()
            return answers

        answers = yield inThread(guess)
        self.assertLessEqual(pool.ran.value - before, self.burst)
        self.assertTrue(any(a.startswith(b"-ERR [SYS/TEMP] Too many failed logins") for a in answers), answers)
        # the right password is refused too while the allowance is spent: it is not even checked
        def right():
            p = self.pop3s()
            try:
                p.user("dev")
                p.pass_("dev")
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                p.close()
        self.assertTrue((yield inThread(right)).startswith(b"-ERR [SYS/TEMP]"))

    @defer.inlineCallbacks
    def test_junkForever(self):
        """A client sending junk without end is closed after the junk limit; what it sends later is not read."""
        def junk():
            with socket.create_connection(("127.0.0.1", self.plainPort), timeout=10) as s:
                s.recv(100)
                sent = 0
                try:
                    for sent in range(1, 100_000):
                        s.sendall(b"JUNK\r\n")
                        if sent % 50 == 0:
                            s.settimeout(0.01)
                            try:
                                if s.recv(65536) == b"":
                                    return sent, b"closed"
                            except TimeoutError:
                                pass
                            s.settimeout(10)
                except OSError:
                    return sent, b"reset"
                return sent, b"open"

        sent, how = yield inThread(junk)
        self.assertIn(how, (b"closed", b"reset"))
        self.assertLess(sent, 5000)


class _TrustedSession(POP3Session):
    """As if under TLS (the back-pressure test is about TCP's buffers, not TLS)."""

    def connectionMade(self):
        POP3Session.connectionMade(self)
        self.secure = True


class _TrustedFactory(POP3Factory):
    def buildProtocol(self, addr):
        return _TrustedSession(self.config)


class NeverReadingClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_bounded(self):
        """
        A client that asks for an 8 MB message and never reads: the server holds
        its transport's buffer and the message, and stops writing; unsent output
        stays near one chunk and the transport's buffer size.
        """
        store = Maildirs(self.mktemp(), fsync=False)
        big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 8000
        store.deliver("dev", big)
        config = POP3Config(store=store, authenticator=FakeAuthenticator(), metrics=POP3Metrics(Registry()),
                            clock=reactor, run=inThread)
        factory = Keeping(_TrustedFactory(config))
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        client = silentClient()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port)
        yield endpoints.connectProtocol(endpoint, client)
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"USER dev\r\nPASS dev\r\nRETR 1\r\n")
        for _ in range(200):  # until the server is paused by its full buffer (bounded wait)
            yield sleep(0.02)
            if factory.built and factory.built[0]._stream is not None and factory.built[0]._writesPaused:
                break
        session = factory.built[0]
        self.assertTrue(session._writesPaused)
        yield sleep(0.2)
        self.assertIsNotNone(session._stream)
        self.assertLess(session._streamPos, len(big))
        self.assertLessEqual(unsentBytes(session.transport), 2 * CHUNK + 64 * 1024)


# -- the session fed arbitrary bytes (a fuzz target, run derandomised) --------------------------


class _MemoryFolder:
    uidvalidity = 1234

    def __init__(self):
        from netsvc.mailbox.maildir import Message

        self.data = {1: MESSAGE, 5: b"Subject: x\n\n.\n..\n"}
        self.list = [Message(uid, f"k{uid}", len(d), frozenset(), 0.0, f"k{uid}:2,")
                     for uid, d in self.data.items()]
        self.removed = []

    def messages(self):
        return self.list

    def read(self, uid):
        return self.data[uid]

    def remove(self, uids):
        self.removed += uids
        return uids


class _MemoryStore:
    def __init__(self):
        self.folders = []

    def inbox(self, user):
        self.folders.append(_MemoryFolder())
        return self.folders[-1]


def pop3Session(data: bytes, pieces: list[bytes] | None = None) -> tuple[bytes, bool, list]:
    """
    Feed C{data} (in C{pieces} if given) to a logged-out POP3 session under TLS, with
    an in-memory maildrop of two messages: the output, whether it closed, what was removed.
    """
    store = _MemoryStore()
    clock = Clock()
    config = POP3Config(store=store, authenticator=FakeAuthenticator(), metrics=POP3Metrics(Registry()),
                        clock=clock, failures=FailureLimit(clock, rate=0.01, burst=5), tlsOptions=lambda: "ctx",
                        run=syncRun, junkLimit=20)
    proto = POP3Session(config)
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
    directlyProvides(transport, ISSLTransport)
    proto.makeConnection(transport)
    for piece in pieces if pieces is not None else [data]:
        proto.dataReceived(piece)
    proto.connectionLost(None)
    return transport.value(), transport.disconnecting, [f.removed for f in store.folders]


class SessionFuzzTests(unittest.TestCase):
    """Arbitrary input: no exception; the same answers however the bytes are cut into reads; bounded."""

    def check(self, data: bytes) -> None:
        out, closed, removed = pop3Session(data)
        cuts = [data[i:i + 1] for i in range(len(data))] if len(data) < 400 else [data[i:i + 7]
                                                                                  for i in range(0, len(data), 7)]
        self.assertEqual(pop3Session(data, cuts), (out, closed, removed))
        answers = out.count(b"\r\n+OK") + out.count(b"\r\n-ERR") + out.count(b"\r\n+ ")
        # every line of input is answered at most once (plus listings); junk is cut off at the limit
        self.assertLessEqual(answers, data.count(b"\n") + 1)
        if removed and any(removed):
            self.assertIn(b"QUIT", data.upper())

    def test_seeds(self):
        self.check(b"USER dev\r\nPASS dev\r\nSTAT\r\nLIST\r\nUIDL\r\nTOP 1 2\r\nRETR 2\r\nDELE 1\r\nQUIT\r\n")
        self.check(b"AUTH PLAIN\r\n" + base64.b64encode(b"\0dev\0dev") + b"\r\nRETR 1\r\nDELE 2\r\nRSET\r\nQUIT\n")
        self.check(b"\r\n" * 50 + b"USER \xff\r\nPASS\r\n" + b"A" * 3000 + b"\nCAPA\r\n")

    def test_arbitrary(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        words = st.sampled_from([b"USER dev", b"PASS dev", b"PASS x", b"STAT", b"LIST", b"LIST 2", b"UIDL 1",
                                 b"RETR 1", b"RETR 9", b"TOP 2 0", b"DELE 1", b"DELE 2", b"RSET", b"NOOP",
                                 b"QUIT", b"CAPA", b"STLS", b"AUTH PLAIN", b"AUTH PLAIN AGRldgBkZXY=", b"*", b"",
                                 b"\xff\x00", b"RETR 0", b"LIST 99999999999"])
        ends = st.sampled_from([b"\r\n", b"\n", b"\r"])
        commands = st.lists(st.tuples(words, ends).map(lambda t: t[0] + t[1]), max_size=40).map(b"".join)

        @settings(derandomize=True, max_examples=300, deadline=None, database=None)
        @given(st.one_of(commands, st.binary(max_size=600)))
        def run(data):
            self.check(data)

        run()
