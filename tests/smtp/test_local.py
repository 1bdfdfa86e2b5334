"""
Local delivery (netsvc.smtp.local): who is local (domains, aliases, plus-addressing),
the configuration checks, the session's decisions over a StringTransport (550 at
RCPT, no relay check for local users, mixed local and remote recipients, all or
nothing), and the daemon over loopback with smtplib and swaks (the copy is in new/
before the 250, a failing store gives 451 and leaves nothing).
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import time
from email import message_from_bytes
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from netsvc import auth, config
from netsvc.mailbox.maildir import MailboxError, Maildirs
from netsvc.metrics import Registry
from netsvc.policies import AccessList, RateLimiter
from netsvc.smtp.delivery import Delivery, DeliveryMetrics
from netsvc.smtp.local import (
    LocalDelivery,
    LocalMetrics,
    LocalRouter,
    LookupPending,
    Mailbox,
    Resolution,
    UnknownRecipient,
    aliasProblems,
)
from netsvc.smtp.protocol import ServerConfig, SMTPFactory, SMTPMetrics
from netsvc.smtp.settings import Settings
from tests.helpers import port, startDaemon
from tests.smtp.test_delivery import settings as deliverySettings


class Users:
    """An authenticator that only answers who exists."""

    def __init__(self, *names):
        self.names = {n.lower() for n in names}

    def isReserved(self, user):
        return user.lower() in self.names


ALIASES = {"postmaster": ["dev"], "root": ["postmaster"], "team": ["alice", "bob@lab.test", "carol@LOCALHOST"],
           "ops": ["oncall@example.org", "dev"], "keep": ["keep", "keep@elsewhere.example"],
           "ghost": ["nobody"]}


def router(aliases=ALIASES, delimiter="+"):
    return LocalRouter(["Lab.Test", "localhost"], aliases, Users("dev", "alice", "bob", "carol", "keep", "bob+x"),
                       delimiter=delimiter)


class RouterTests(unittest.TestCase):
    def test_notLocal(self):
        self.assertIsNone(router().resolve("bob@example.org"))
        self.assertIsNone(router().resolve("bob@lab.test.example.org"))

    def test_userAnyCaseDomainAnyCase(self):
        r = router()
        self.assertEqual(r.resolve("bob@lab.test"), Resolution([Mailbox("bob", "bob@lab.test")], []))
        self.assertEqual(r.resolve("BoB@LAB.TEST"), Resolution([Mailbox("bob", "bob@lab.test")], []))
        self.assertEqual(r.resolve("bob@LocalHost").mailboxes, [Mailbox("bob", "bob@localhost")])

    def test_quotedLocalPart(self):
        self.assertEqual(router().resolve('"bob"@lab.test').mailboxes, [Mailbox("bob", "bob@lab.test")])

    def test_plusAddressing(self):
        r = router()
        self.assertEqual(r.resolve("Bob+News@lab.test").mailboxes, [Mailbox("bob", "bob+news@lab.test")])
        # a user really called bob+x is bob+x's
        self.assertEqual(r.resolve("bob+x@lab.test").mailboxes, [Mailbox("bob+x", "bob+x@lab.test")])
        # plus-addressing off: bob+news is nobody
        self.assertRaises(UnknownRecipient, router(delimiter="").resolve, "bob+news@lab.test")
        # "+x" alone is not bob's
        self.assertRaises(UnknownRecipient, r.resolve, "+x@lab.test")

    def test_unknownUser(self):
        self.assertRaises(UnknownRecipient, router().resolve, "nobody@lab.test")
        self.assertRaises(UnknownRecipient, router().resolve, "nobody+bob@lab.test")

    def test_namesNotLoadedYet(self):
        """A user source that has not loaded its names (a directory just started) cannot say no: pending."""
        r = router()
        r.users.namesLoaded = False
        self.assertEqual(r.resolve("bob@lab.test").mailboxes, [Mailbox("bob", "bob@lab.test")])
        self.assertEqual(r.resolve("postmaster@lab.test").mailboxes, [Mailbox("dev", "dev@lab.test")])
        self.assertRaises(LookupPending, r.resolve, "nobody@lab.test")
        r.users.namesLoaded = True
        self.assertRaises(UnknownRecipient, r.resolve, "nobody@lab.test")

    def test_aliases(self):
        r = router()
        self.assertEqual(r.resolve("postmaster@lab.test"), Resolution([Mailbox("dev", "dev@lab.test")], []))
        self.assertEqual(r.resolve("Postmaster"), Resolution([Mailbox("dev", "dev@lab.test")], []))  # bare
        self.assertEqual(r.resolve("root@localhost"), Resolution([Mailbox("dev", "dev@localhost")], []))
        self.assertEqual(r.resolve("root+cron@lab.test").mailboxes, [Mailbox("dev", "dev@lab.test")])
        self.assertEqual(r.resolve("team@lab.test").mailboxes,
                         [Mailbox("alice", "alice@lab.test"), Mailbox("bob", "bob@lab.test"),
                          Mailbox("carol", "carol@lab.test")])
        self.assertEqual(r.resolve("ops@lab.test"),
                         Resolution([Mailbox("dev", "dev@lab.test")], ["oncall@example.org"]))
        # a name listing itself is its own mailbox, plus a forward
        self.assertEqual(r.resolve("keep@lab.test"),
                         Resolution([Mailbox("keep", "keep@lab.test")], ["keep@elsewhere.example"]))

    def test_aliasToUnknownUserIsUnknown(self):
        self.assertRaises(UnknownRecipient, router().resolve, "ghost@lab.test")
        self.assertEqual(router().unknownTargets(), [("ghost", "nobody")])

    def test_pathNamesNeverMailboxes(self):
        r = LocalRouter(["lab.test"], {"postmaster": ["dev"]}, Users("dev", "../dev", "a/b", ".hidden"))
        for address in ("../dev@lab.test", "a/b@lab.test", ".hidden@lab.test"):
            self.assertRaises(UnknownRecipient, r.resolve, address)


class AliasProblemTests(unittest.TestCase):
    def problems(self, aliases, domains=("lab.test",)):
        return aliasProblems(aliases, list(domains))

    def test_good(self):
        self.assertEqual(self.problems(ALIASES, ["lab.test", "localhost"]), [])

    def test_loops(self):
        found = self.problems({"postmaster": ["a"], "a": ["b"], "b": ["a@lab.test"]})
        self.assertEqual(found, [("aliases.postmaster", "alias loop: a -> b -> a")])  # once, at its first name
        # a plus-addressed way back is a loop too
        self.assertTrue(self.problems({"postmaster": ["a"], "a": ["b"], "b": ["a+x"]}))
        # the same name at another (non-local) domain is a forward, not a loop
        self.assertEqual(self.problems({"postmaster": ["a"], "a": ["a@example.org", "b"]}), [])

    def test_tooDeep(self):
        chain = {f"a{i}": [f"a{i + 1}"] for i in range(30)}
        chain["postmaster"] = ["a0"]
        self.assertTrue(any("deeper" in reason for _, reason in self.problems(chain)))

    def test_postmasterRequired(self):
        found = self.problems({"root": ["dev"]})
        self.assertEqual([key for key, _ in found], ["aliases"])
        self.assertIn("postmaster", found[0][1])
        self.assertEqual(self.problems({"PostMaster": ["postmaster"]}), [])

    def test_badNamesAndTargets(self):
        self.assertTrue(self.problems({"postmaster": ["dev"], "x@y": ["dev"]}))
        self.assertTrue(self.problems({"postmaster": ["../etc"]}))
        self.assertTrue(self.problems({"postmaster": ["bad address@x"]}))
        self.assertTrue(self.problems({"postmaster": ["dev"], "Dev": ["a"], "dev": ["b"]}))

    def test_settings(self):
        def parse(local, users="users: users.txt\n"):
            return config.structure(Settings, config.yaml.safe_load(
                f"listen: ['tcp:0:interface=127.0.0.1']\n{users}local: {local}"), "t.yaml", "services.smtp")

        s = parse("{domains: [Lab.test], aliases: {postmaster: dev, root: 'dev, ops@example.org'}}")
        self.assertEqual(s.local.maildir, "mail")
        self.assertEqual(list(s.local.aliases["root"]), ["dev", "ops@example.org"])
        with self.assertRaises(config.ConfigError) as e:
            parse("{domains: [lab.test], aliases: {postmaster: a, a: [b], b: a}}")
        self.assertIn("services.smtp.local.aliases", str(e.exception))
        with self.assertRaises(config.ConfigError) as e:
            parse("{domains: [lab.test], aliases: {postmaster: dev}}", users="")
        self.assertIn("local delivery needs users", str(e.exception))
        with self.assertRaises(config.ConfigError) as e:
            parse("{domains: ['[127.0.0.1]'], aliases: {postmaster: dev}}")
        self.assertIn("domains[0]", str(e.exception))


# -- the session over a StringTransport ---------------------------------------------------------


class Incoming:
    def __init__(self, queue, id):
        self.queue, self.id = queue, id
        self.data = b""
        self.aborted = False
        self.envelope = None

    def write(self, data):
        self.data += data

    def contents(self):
        return self.data

    def abort(self):
        self.aborted = True

    def commit(self, envelope):
        envelope.id = self.id
        if self.queue.fail:
            return defer.fail(OSError("disk on fire"))
        self.envelope = envelope
        return defer.succeed(self.id)


class Queue:
    def __init__(self):
        self.messages = []
        self.fail = False

    def newMessage(self):
        m = Incoming(self, f"id{len(self.messages)}")
        self.messages.append(m)
        return m

    def committed(self):
        return [m for m in self.messages if m.envelope is not None]


class FailingStore(Maildirs):
    """A store whose C{failAt}-th delivery (from 1) fails."""

    failAt = 0

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.count = 0

    def deliver(self, user, data, folder="INBOX"):
        self.count += 1
        if self.count == self.failAt:
            raise MailboxError("cannot store message: no space left")
        return super().deliver(user, data, folder)


def newFiles(root, user):
    folder = Path(root) / user / "new"
    return sorted(folder.iterdir()) if folder.exists() else []


class SessionTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.queue = Queue()
        self.registry = Registry()
        self.accepted = []
        self.root = Path(self.mktemp())
        self.store = FailingStore(self.root, fsync=False)
        self.local = LocalDelivery(router(), self.store, LocalMetrics(self.registry), self.clock,
                                   run=lambda f, *a: defer.maybeDeferred(f, *a))
        self.config = ServerConfig(
            hostname="mx.test", queue=self.queue, metrics=SMTPMetrics(self.registry), clock=self.clock,
            maxSize=100_000, messageRate=RateLimiter(0, 0, self.clock), onAccepted=self.accepted.append,
            local=self.local)

    def connect(self, peer="127.0.0.1"):
        p = SMTPFactory(self.config).buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        p.makeConnection(t)
        p.dataReceived(b"EHLO client.test\r\n")
        t.clear()
        return p, t

    def send(self, p, t, data):
        t.clear()
        p.dataReceived(data)
        return t.value().decode()

    def transaction(self, p, t, *rcpts, sender=b"s@example.test", body=b"Subject: hi\r\n\r\nhello\r\n"):
        out = self.send(p, t, b"MAIL FROM:<" + sender + b">\r\n")
        for r in rcpts:
            out += self.send(p, t, b"RCPT TO:<" + r + b">\r\n")
        out += self.send(p, t, b"DATA\r\n")
        return out + self.send(p, t, body + b".\r\n")

    def metric(self, name, **labels):
        return self.registry.get(name).labels(service="smtp", **labels).value

    def test_unknownLocalUser550AtRcpt(self):
        p, t = self.connect()
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        out = self.send(p, t, b"RCPT TO:<nobody@lab.test>\r\n")
        self.assertTrue(out.startswith("550 5.1.1 <nobody@lab.test>: Recipient address rejected"), out)
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="unknown_user"), 1)
        self.assertTrue(self.send(p, t, b"RCPT TO:<ghost@LAB.test>\r\n").startswith("550 5.1.1"))

    def test_namesNotLoaded451AtRcpt(self):
        """Before the directory's names have loaded, an unknown name is 451 4.3.0 (the sender retries), not 550."""
        self.local.router.users.namesLoaded = False
        p, t = self.connect()
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        out = self.send(p, t, b"RCPT TO:<carl@lab.test>\r\n")
        self.assertEqual(out, "451 4.3.0 <carl@lab.test>: Temporary lookup failure\r\n")
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="user_lookup"), 1)
        self.assertTrue(self.send(p, t, b"RCPT TO:<bob@lab.test>\r\n").startswith("250 2.1.5"))

    def test_guessingUsersEndsTheSession(self):
        """A dictionary attack gets 20 answers per connection (the session's error limit), then 421."""
        p, t = self.connect(peer="192.0.2.7")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        out = self.send(p, t, b"".join(b"RCPT TO:<guess%d@lab.test>\r\n" % i for i in range(50)))
        self.assertEqual(out.count("550 5.1.1"), 19)
        self.assertTrue(out.endswith("421 4.7.0 mx.test Error: too many errors\r\n"), out[-200:])
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="unknown_user"), 20)

    def test_outsiderMaySendToLocalUsersOnly(self):
        p, t = self.connect(peer="192.0.2.7")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        self.assertEqual(self.send(p, t, b"RCPT TO:<bob@lab.test>\r\n"), "250 2.1.5 Ok\r\n")
        self.assertTrue(self.send(p, t, b"RCPT TO:<x@example.org>\r\n").startswith("554 5.7.1"))
        self.assertTrue(self.send(p, t, b"RCPT TO:<nobody@lab.test>\r\n").startswith("550 5.1.1"))
        self.assertTrue(self.send(p, t, b"DATA\r\n").startswith("354"))
        out = self.send(p, t, b"Subject: in\r\n\r\nhi\r\n.\r\n")
        self.assertTrue(out.startswith("250 2.0.0 Ok: queued as id0"), out)
        self.assertEqual(len(newFiles(self.root, "bob")), 1)

    def test_localOnly(self):
        p, t = self.connect()
        out = self.transaction(p, t, b"Bob+tag@LAB.test", sender=b"S@Example.test")
        self.assertTrue(out.endswith("250 2.0.0 Ok: queued as id0\r\n"), out)
        (path,) = newFiles(self.root, "bob")
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <S@Example.test>\r\nDelivered-To: bob+tag@lab.test\r\n"
                                        b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (netsvc) with "
                                        b"ESMTP id id0\r\n\tfor <Bob+tag@LAB.test>; "), data)
        self.assertTrue(data.endswith(b"Subject: hi\r\n\r\nhello\r\n"))
        # nothing queued; the queue's tmp file dropped; the delivery side not kicked
        self.assertEqual(self.queue.committed(), [])
        self.assertTrue(self.queue.messages[0].aborted)
        self.assertEqual(self.accepted, [])
        self.assertEqual(self.metric("netsvc_smtp_messages_accepted_total"), 1)
        self.assertEqual(self.metric("netsvc_smtp_local_deliveries_total", result="delivered"), 1)
        self.assertEqual(self.metric("netsvc_smtp_local_bytes_total"), len(data))

    def test_nullSender(self):
        p, t = self.connect()
        self.transaction(p, t, b"bob@lab.test", sender=b"")
        (path,) = newFiles(self.root, "bob")
        self.assertTrue(path.read_bytes().startswith(b"Return-Path: <>\r\n"))

    def test_mixedLocalAndRemoteOne250(self):
        p, t = self.connect()
        out = self.transaction(p, t, b"bob@lab.test", b"x@example.org", b"alice@localhost", b"ops@lab.test")
        self.assertEqual(out.count("250 2.0.0"), 1)
        self.assertTrue(out.endswith("250 2.0.0 Ok: queued as id0\r\n"), out)
        for user in ("bob", "alice", "dev"):
            self.assertEqual(len(newFiles(self.root, user)), 1, user)
        (m,) = self.queue.committed()
        # only the remote recipients are queued: the one given and the one the alias forwards to
        self.assertEqual([(r.address, r.orcpt) for r in m.envelope.recipients],
                         [("x@example.org", None), ("oncall@example.org", "rfc822;ops@lab.test")])
        self.assertEqual(self.accepted, ["id0"])
        self.assertIn(b"Delivered-To: dev@lab.test\r\n", newFiles(self.root, "dev")[0].read_bytes())

    def test_oneCopyPerMailbox(self):
        p, t = self.connect()
        out = self.transaction(p, t, b"bob@lab.test", b"BOB@lab.test", b"bob+a@lab.test", b"team@lab.test",
                               b"postmaster", b"root@lab.test")
        self.assertTrue(out.endswith("250 2.0.0 Ok: queued as id0\r\n"), out)
        self.assertEqual(len(newFiles(self.root, "bob")), 1)
        self.assertEqual(len(newFiles(self.root, "dev")), 1)
        self.assertEqual(len(newFiles(self.root, "alice")), 1)
        self.assertEqual(self.metric("netsvc_smtp_local_deliveries_total", result="delivered"), 4)

    def test_storeFailsNothingKept(self):
        self.store.failAt = 3  # bob, alice written; carol fails
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        p, t = self.connect()
        out = self.transaction(p, t, b"team@lab.test", b"x@example.org")
        self.assertTrue(out.endswith("451 4.3.0 Error: local error in processing; message not accepted\r\n"), out)
        for user in ("alice", "bob", "carol"):
            self.assertEqual(newFiles(self.root, user), [], user)
            self.assertEqual(self.store.inbox(user).messages(), [], user)
        self.assertEqual(self.queue.committed(), [])
        self.assertTrue(self.queue.messages[0].aborted)
        self.assertEqual(self.accepted, [])
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="local_delivery_error"), 1)
        self.assertEqual(self.metric("netsvc_smtp_local_deliveries_total", result="failed"), 3)
        self.assertEqual(self.metric("netsvc_smtp_messages_accepted_total"), 0)
        # the store's own words, on one line: not a traceback (that is for bugs)
        self.assertEqual(self.flushLoggedErrors(), [])
        lines = [formatEvent(e) for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertTrue(any(line.startswith("smtp: local delivery failed: ") for line in lines), lines)
        # the session goes on: the next message is delivered
        out = self.transaction(p, t, b"bob@lab.test")
        self.assertTrue(out.endswith("250 2.0.0 Ok: queued as id1\r\n"), out)
        self.assertEqual(len(newFiles(self.root, "bob")), 1)

    def test_queueFailsLocalCopiesTakenBack(self):
        self.queue.fail = True
        p, t = self.connect()
        out = self.transaction(p, t, b"bob@lab.test", b"x@example.org")
        self.assertTrue(out.endswith("451 4.3.0 Error: local error in processing; message not accepted\r\n"), out)
        self.assertEqual(newFiles(self.root, "bob"), [])
        self.assertEqual(self.store.inbox("bob").messages(), [])
        self.assertEqual(self.metric("netsvc_smtp_rejects_total", reason="queue_error"), 1)
        self.flushLoggedErrors(OSError)

    def test_withoutLocalEverythingAsBefore(self):
        self.config.local = None
        p, t = self.connect(peer="192.0.2.7")
        self.send(p, t, b"MAIL FROM:<s@example.test>\r\n")
        self.assertTrue(self.send(p, t, b"RCPT TO:<bob@lab.test>\r\n").startswith("554 5.7.1"))
        p, t = self.connect()
        self.transaction(p, t, b"bob@lab.test")
        self.assertEqual([r.address for r in self.queue.committed()[0].envelope.recipients], ["bob@lab.test"])
        self.assertFalse(self.root.exists())


class ThreadedDeliveryTests(unittest.TestCase):
    """LocalDelivery in the reactor's thread pool, with the real store."""

    @defer.inlineCallbacks
    def test_concurrentFirstDeliveries(self):
        from twisted.internet import reactor

        root = Path(self.mktemp())
        registry = Registry()
        local = LocalDelivery(router(), Maildirs(root, fsync=True), LocalMetrics(registry), reactor)
        queue = Queue()
        for round in range(5):  # a fresh user each round: several threads make its Maildir at once
            user = f"u{round}"
            incoming = []
            for i in range(8):
                m = queue.newMessage()
                m.write(b"Subject: %d\r\n\r\nhi\r\n" % i)
                incoming.append(m)
            results = yield defer.DeferredList(
                [local.deliver(m, "s@example.org", [Mailbox(user, f"{user}@lab.test")]) for m in incoming],
                consumeErrors=True)
            self.assertEqual([ok for ok, _ in results], [True] * 8, [r for ok, r in results if not ok])
            self.assertEqual(len(newFiles(root, user)), 8)


class QueuedLocalTests(unittest.TestCase):
    """The delivery side: queued mail for local recipients (bounces to a local sender) goes to mailboxes."""

    def setUp(self):
        from twisted.internet import reactor
        from twisted.internet.task import Clock

        from netsvc.smtp.queue import Queue as RealQueue
        from tests.smtp.test_delivery import FakeRouter, FakeSessions

        self.clock = Clock()
        self.clock.advance(time.time())
        self.queue = RealQueue(Path(self.mktemp()), fsync=False, reactor=reactor)
        self.sessions = FakeSessions()
        self.registry = Registry()
        self.root = Path(self.mktemp())
        self.store = FailingStore(self.root, fsync=False)
        self.delivery = Delivery(deliverySettings("smarthost"), self.queue, FakeRouter(), self.sessions, self.clock,
                                 DeliveryMetrics(self.registry))
        self.delivery.local = LocalDelivery(router(), self.store, LocalMetrics(self.registry), reactor)
        self.addCleanup(lambda: self.delivery.running and self.delivery.stopService())

    @defer.inlineCallbacks
    def settle(self, until):
        deadline = time.monotonic() + 10
        while not until():
            self.clock.advance(0)
            yield task.deferLater(reactor, 0.005, lambda: None)
            if time.monotonic() > deadline:
                raise AssertionError("timed out")

    @defer.inlineCallbacks
    def test_bounceToLocalSenderDeliveredLocally(self):
        from netsvc.smtp.sendertypes import Reply
        from tests.smtp.test_delivery import MESSAGE as QUEUED

        self.sessions.script = lambda target, address: Reply(550, "5.1.1 no such user")
        yield self.queue.enqueueBytes("alice@lab.test", ["x@example.org"], QUEUED)
        self.delivery.startService()
        yield self.settle(lambda: not self.queue.ids() and newFiles(self.root, "alice"))
        # the bounce never went to the smarthost: only the original message did
        self.assertEqual([sender for sender, _, _ in self.sessions.received], ["alice@lab.test"])
        (path,) = newFiles(self.root, "alice")
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <>\r\nDelivered-To: alice@lab.test\r\n"), data[:100])
        self.assertIn(b"x@example.org", data)
        self.assertEqual(self.registry.get("netsvc_smtp_delivered_total").labels(service="smtp").value, 1)

    @defer.inlineCallbacks
    def test_aliasForwardQueuedAgainUnknownBounced(self):
        from tests.smtp.test_delivery import MESSAGE as QUEUED

        yield self.queue.enqueueBytes("s@example.org", ["ops@lab.test", "nobody@lab.test"], QUEUED)
        self.delivery.startService()
        # dev's copy; the forward to oncall@example.org sent as a new message; nobody bounced to s@example.org
        yield self.settle(lambda: not self.queue.ids() and len(self.sessions.received) == 2)
        self.assertEqual(len(newFiles(self.root, "dev")), 1)
        received = sorted((sender, rcpts) for sender, rcpts, _ in self.sessions.received)
        self.assertEqual(received, [("", ["s@example.org"]), ("s@example.org", ["oncall@example.org"])])
        bounce = [data for sender, _, data in self.sessions.received if sender == ""][0]
        self.assertIn(b"nobody@lab.test", bounce)

    @defer.inlineCallbacks
    def test_namesNotLoadedDeferred(self):
        """
        Queued mail for a local name while the user source has not loaded its names: deferred and
        retried (before: LookupPending escaped, logged as a traceback, and the message stayed in
        flight for ever).
        """
        from tests.smtp.test_delivery import MESSAGE as QUEUED

        self.delivery.local.router.users.namesLoaded = False
        id = yield self.queue.enqueueBytes("s@example.org", ["carl@lab.test"], QUEUED)
        self.delivery.startService()
        yield self.settle(lambda: id in self.delivery.scheduled)
        self.assertEqual(self.queue.envelope(id).recipients[0].status, "pending")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.delivery.local.router.users.names.add("carl")
        self.delivery.local.router.users.namesLoaded = True
        self.clock.advance(61)
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(len(newFiles(self.root, "carl")), 1)

    @defer.inlineCallbacks
    def test_aBugRetriedNotStuck(self):
        """An unexpected error in local delivery is logged and the message retried, not left in flight."""
        from tests.smtp.test_delivery import MESSAGE as QUEUED

        router = self.delivery.local.router
        self.patch(router, "resolve", lambda address: 1 / 0)
        id = yield self.queue.enqueueBytes("s@example.org", ["bob@lab.test"], QUEUED)
        self.delivery.startService()
        yield self.settle(lambda: id in self.delivery.scheduled)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.queue.envelope(id).recipients[0].status, "pending")
        del router.resolve
        self.clock.advance(61)
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(len(newFiles(self.root, "bob")), 1)

    @defer.inlineCallbacks
    def test_storeFailureRetried(self):
        from tests.smtp.test_delivery import MESSAGE as QUEUED

        self.store.failAt = 1
        id = yield self.queue.enqueueBytes("s@example.org", ["bob@lab.test"], QUEUED)
        self.delivery.startService()
        yield self.settle(lambda: id in self.delivery.scheduled)
        self.assertEqual(newFiles(self.root, "bob"), [])
        self.assertEqual(self.queue.envelope(id).recipients[0].status, "pending")
        self.clock.advance(61)
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(len(newFiles(self.root, "bob")), 1)


# -- the daemon over loopback ------------------------------------------------------------------


def daemonConfig(users, mynetworks, captured=""):
    captured = f", captured: {captured}" if captured else ""
    return f"""
services:
  smtp:
    listen:
      - "tcp:0:interface=127.0.0.1"
    hostname: mail.test
    mynetworks: {mynetworks}
    users: {users}
    relay: {{capture: true}}
    queue: {{fsync: true}}
    local: {{domains: [lab.test, localhost], aliases: {{postmaster: dev, root: dev, ops: [dev, oncall@example.org],
             lists: [a@example.org, b@example.org]}}{captured}}}
    limits: {{rate: 0}}
"""


MESSAGE = (b"From: sender@example.org\r\nTo: dev@lab.test\r\nSubject: attachment\r\n\r\n"
           + b"".join(b"line %d of the message\r\n" % i for i in range(2000)))


class LoopbackCase(unittest.TestCase):
    """The daemon with local delivery and capture; clients from C{mynetworks} may relay (no tests here)."""

    mynetworks = "[]"
    #: services.smtp.local.captured
    captured = ""

    def setUp(self):
        users = Path(self.mktemp()).absolute()
        auth.addUser(users, "dev", "devpass")
        self.daemon = startDaemon(self, daemonConfig(users, self.mynetworks, self.captured))
        self.svc = self.daemon.getServiceNamed("smtp")
        self.state = Path(self.daemon.context.stateDir)
        self.mail = self.state / "mail"
        self.port = port(self.daemon, 0, "smtp")

    def send(self, rcpts, data=MESSAGE):
        """smtplib: the refused recipients, and what dev's new/ holds as soon as the 250 came."""

        def run():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                refused = c.sendmail("sender@example.org", rcpts, data)
                return refused, newFiles(self.mail, "dev")

        return threads.deferToThread(run)


class LoopbackTests(LoopbackCase):
    """From outside mynetworks, without AUTH."""

    @defer.inlineCallbacks
    def test_deliveredBeforeThe250(self):
        # an outsider (mynetworks is empty, no AUTH) may deliver to local users
        refused, files = yield self.send(["Dev+Tests@LAB.test", "root@localhost"])
        self.assertEqual(refused, {})
        (path,) = files  # in new/ when the 250 arrived; one copy for both
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <sender@example.org>\r\nDelivered-To: dev+tests@lab.test\r\n"
                                        b"Received: from "), data[:200])
        self.assertTrue(data.endswith(MESSAGE), "the message's bytes, unchanged")
        msg = message_from_bytes(data)
        self.assertEqual(msg["Subject"], "attachment")
        # the store reads it (UIDs, size)
        messages = yield threads.deferToThread(lambda: self.svc.local.store.inbox("dev").messages())
        self.assertEqual([m.size for m in messages], [len(data)])
        self.assertEqual(self.svc.capture.ids(), [])  # nothing captured: all of it was local
        text = self.daemon.context.metrics.render()
        self.assertIn('netsvc_smtp_local_deliveries_total{service="smtp",result="delivered"} 1', text)

    @defer.inlineCallbacks
    def test_unknownUserAndRelayRefused(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo()
                c.mail("sender@example.org")
                return c.rcpt("nobody@lab.test"), c.rcpt("x@example.org")

        unknown, relay = yield threads.deferToThread(run)
        self.assertEqual(unknown[0], 550)
        self.assertIn(b"5.1.1", unknown[1])
        self.assertEqual(relay[0], 554)

    @defer.inlineCallbacks
    def test_failingStore451NothingInNew(self):
        # the user's mailbox cannot be made: its place is taken by a file
        self.mail.mkdir(parents=True, exist_ok=True)
        (self.mail / "dev").write_bytes(b"not a folder")

        def run():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                try:
                    c.sendmail("sender@example.org", ["dev@lab.test"], MESSAGE)
                except smtplib.SMTPDataError as e:
                    return e.smtp_code, e.smtp_error
                return None

        code, text = yield threads.deferToThread(run)
        self.assertEqual(code, 451)
        self.assertIn(b"4.3.0", text)
        self.assertEqual((self.mail / "dev").read_bytes(), b"not a folder")
        self.assertEqual(self.svc.capture.ids(), [])
        self.assertEqual(list((self.state / "captured" / "tmp").iterdir()), [])  # the session's tmp file dropped
        self.flushLoggedErrors(MailboxError)
        # fixed: the client's retry is delivered
        (self.mail / "dev").unlink()
        refused, files = yield self.send(["dev@lab.test"])
        self.assertEqual((refused, len(files)), ({}, 1))

    @defer.inlineCallbacks
    def test_swaks(self):
        swaks = shutil.which("swaks")
        if swaks is None:
            raise unittest.SkipTest("swaks is not installed: run scripts/install-test-peers (Debian: swaks)")

        def run():
            return subprocess.run(
                [swaks, "--server", "127.0.0.1", "--port", str(self.port), "--from", "s@example.org",
                 "--to", "postmaster@lab.test", "--header", "Subject: from swaks", "--body", "hello from swaks",
                 "--pipeline"], capture_output=True, timeout=30, text=True)

        result = yield threads.deferToThread(run)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("<-  250 2.0.0 Ok: queued as", result.stdout)
        (path,) = newFiles(self.mail, "dev")
        data = path.read_bytes()
        self.assertIn(b"Delivered-To: dev@lab.test\r\n", data)
        self.assertIn(b"Subject: from swaks\r\n", data)


class SuccessReportTests(LoopbackCase):
    """
    NOTIFY=SUCCESS for a local recipient, from a client of mynetworks: a "delivered" report (RFC 3464) to
    the sender, as Postfix's local(8).
    """

    mynetworks = "[127.0.0.0/8]"

    def transaction(self, sender, rcpts):
        """One message; C{rcpts}: [(address, RCPT options)]."""

        def run():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo("client.test")
                c.mail(sender)
                for address, options in rcpts:
                    self.assertEqual(c.rcpt(address, options)[0], 250)
                return c.data(MESSAGE)

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def waitFor(self, until):
        for _ in range(400):
            if until():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("not before 4 s")

    def report(self, data):
        msg = message_from_bytes(data)
        status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
        return msg, status.get_payload()[1:]

    @defer.inlineCallbacks
    def test_reportToARemoteSenderIsQueued(self):
        code, _ = yield self.transaction("sender@example.org", [("dev@lab.test", ["NOTIFY=SUCCESS"]),
                                                                ("root@localhost", [])])
        self.assertEqual(code, 250)
        yield self.waitFor(lambda: self.svc.capture.ids())  # capture mode: the report is captured
        (id,) = self.svc.capture.ids()
        envelope = self.svc.capture.envelope(id)
        self.assertEqual((envelope.sender, [r.address for r in envelope.recipients]), ("", ["sender@example.org"]))
        msg, recipients = self.report(self.svc.capture.raw(id))
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        self.assertEqual([(r["Final-Recipient"], r["Action"], r["Status"]) for r in recipients],
                         [("rfc822; dev@lab.test", "delivered", "2.0.0")])  # root@ did not ask
        self.assertNotIn(b"line 1999 of the message", self.svc.capture.raw(id))  # the headers only

    @defer.inlineCallbacks
    def test_reportToALocalSenderInItsMailbox(self):
        code, _ = yield self.transaction("dev@lab.test", [("root@lab.test", ["NOTIFY=SUCCESS,FAILURE"])])
        self.assertEqual(code, 250)
        yield self.waitFor(lambda: len(newFiles(self.mail, "dev")) == 2)
        reports = [p.read_bytes() for p in newFiles(self.mail, "dev") if b"Return-Path: <>" in p.read_bytes()]
        self.assertEqual(len(reports), 1)
        msg, recipients = self.report(reports[0])
        self.assertEqual(msg["Delivered-To"], "dev@lab.test")
        self.assertEqual([(r["Final-Recipient"], r["Action"]) for r in recipients],
                         [("rfc822; root@lab.test", "delivered")])
        self.assertEqual(self.svc.capture.ids(), [])

    @defer.inlineCallbacks
    def test_noReportUnlessAsked(self):
        code, _ = yield self.transaction("sender@example.org", [("dev@lab.test", ["NOTIFY=FAILURE"]),
                                                                ("root@lab.test", [])])
        self.assertEqual(code, 250)
        # a second message that asks: its report is the only one (the first's would have come before it)
        code, _ = yield self.transaction("later@example.org", [("dev@lab.test", ["NOTIFY=SUCCESS"])])
        self.assertEqual(code, 250)
        yield self.waitFor(lambda: self.svc.capture.ids())
        yield task.deferLater(reactor, 0.1, lambda: None)
        (id,) = self.svc.capture.ids()
        self.assertEqual([r.address for r in self.svc.capture.envelope(id).recipients], ["later@example.org"])
        self.assertEqual(len(newFiles(self.mail, "dev")), 2)

    @defer.inlineCallbacks
    def test_aliasOfSeveralExpanded(self):
        """
        An alias of several: one "expanded" report, and its forwards lose SUCCESS (NEVER when it was
        all), as Postfix: the sender is not told again by the servers downstream.
        """
        code, _ = yield self.transaction("sender@example.org", [("ops@lab.test", ["NOTIFY=SUCCESS"]),
                                                                ("lists@lab.test", ["NOTIFY=SUCCESS,FAILURE"])])
        self.assertEqual(code, 250)
        yield self.waitFor(lambda: len(self.svc.capture.ids()) == 2)
        envelopes = {id: self.svc.capture.envelope(id) for id in self.svc.capture.ids()}
        (reportId,) = [id for id, e in envelopes.items() if e.sender == ""]
        (forwarded,) = [e for e in envelopes.values() if e.sender]
        self.assertEqual(sorted((r.address, r.notify, r.orcpt) for r in forwarded.recipients),
                         [("a@example.org", "FAILURE", "rfc822;lists@lab.test"),
                          ("b@example.org", "FAILURE", "rfc822;lists@lab.test"),
                          ("oncall@example.org", "NEVER", "rfc822;ops@lab.test")])
        _, recipients = self.report(self.svc.capture.raw(reportId))
        self.assertEqual([(r["Final-Recipient"], r["Action"]) for r in recipients],
                         [("rfc822; ops@lab.test", "expanded"), ("rfc822; lists@lab.test", "expanded")])
        self.assertEqual(len(newFiles(self.mail, "dev")), 1)  # ops's local copy

    @defer.inlineCallbacks
    def test_notForAnOutsider(self):
        """
        From outside mynetworks without AUTH, SUCCESS is not honoured: a report to the unverified
        sender would be backscatter (one message to any address of the outsider's choosing per message).
        """
        self.svc.configs[0].trusted = None  # the same daemon, now from outside mynetworks
        code, _ = yield self.transaction("victim@example.org", [("dev@lab.test", ["NOTIFY=SUCCESS"])])
        self.assertEqual(code, 250)
        self.assertEqual(len(newFiles(self.mail, "dev")), 1)
        self.svc.configs[0].trusted = AccessList(["127.0.0.0/8"])
        code, _ = yield self.transaction("sender@example.org", [("dev@lab.test", ["NOTIFY=SUCCESS"])])
        self.assertEqual(code, 250)
        yield self.waitFor(lambda: self.svc.capture.ids())
        yield task.deferLater(reactor, 0.1, lambda: None)
        (id,) = self.svc.capture.ids()  # the trusted client's only: none went to victim@
        self.assertEqual([r.address for r in self.svc.capture.envelope(id).recipients], ["sender@example.org"])

    def test_headOnly(self):
        """A success report reads back the header block only, wherever the reads cut it."""
        from netsvc.smtp.queue import Queue as RealQueue

        queue = RealQueue(Path(self.mktemp()), fsync=False, reactor=reactor)
        head = b"Subject: x\r\n" + b"X-Long: " + b"y" * 70000 + b"\r\n\r\n"
        for body in (b"", b"body\r\n" * 50000):
            incoming = queue.newMessage()
            incoming.write(head + body)
            self.assertEqual(incoming.head(), head)
            self.assertEqual(incoming.head(limit=100), head[:100])
            incoming.abort()


class TrustedLoopbackTests(LoopbackCase):
    """From mynetworks: mail for elsewhere is relayed (captured)."""

    mynetworks = "[127.0.0.0/8]"

    @defer.inlineCallbacks
    def test_mixedLocalAndCaptured(self):
        refused, files = yield self.send(["dev@lab.test", "someone@example.org"])
        self.assertEqual((refused, len(files)), ({}, 1))
        (id,) = self.svc.capture.ids()
        self.assertEqual([r.address for r in self.svc.capture.envelope(id).recipients], ["someone@example.org"])
        self.assertNotIn(b"Delivered-To", self.svc.capture.raw(id))


class CapturedMailboxTests(LoopbackCase):
    """Capture mode with C{local.captured: dev}: captured mail is listed at /mail/ and is in dev's INBOX too."""

    mynetworks = "[127.0.0.0/8]"
    captured = "Dev"

    @defer.inlineCallbacks
    def test_capturedCopyInTheInbox(self):
        refused, files = yield self.send(["someone@example.org", "other@example.net"])
        self.assertEqual(refused, {})
        (path,) = files  # one copy however many captured recipients, in new/ before the 250
        self.assertTrue(path.read_bytes().startswith(b"Return-Path: <sender@example.org>\r\n"
                                                     b"Delivered-To: someone@example.org\r\n"))
        (id,) = self.svc.capture.ids()  # and captured as before
        self.assertEqual([r.address for r in self.svc.capture.envelope(id).recipients],
                         ["someone@example.org", "other@example.net"])
        self.assertTrue(path.read_bytes().endswith(MESSAGE))

    @defer.inlineCallbacks
    def test_successReportCapturedAndInTheInbox(self):
        """A success report captured in capture mode is a captured message: in dev's INBOX too."""

        def run():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo("client.test")
                c.mail("sender@example.org")
                c.rcpt("root@lab.test", ["NOTIFY=SUCCESS"])
                return c.data(MESSAGE)[0]

        self.assertEqual((yield threads.deferToThread(run)), 250)
        for _ in range(400):
            if len(newFiles(self.mail, "dev")) == 2 and self.svc.capture.ids():
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        (id,) = self.svc.capture.ids()
        self.assertIn(b"Successful Mail Delivery Report", self.svc.capture.raw(id))
        copies = [p.read_bytes() for p in newFiles(self.mail, "dev")]
        self.assertEqual(sum(b"Successful Mail Delivery Report" in c for c in copies), 1)

    @defer.inlineCallbacks
    def test_localMailNotCopiedTwice(self):
        refused, files = yield self.send(["dev@lab.test", "someone@example.org"])
        self.assertEqual((refused, len(files)), ({}, 1))  # dev's own copy is the one copy
        refused, files = yield self.send(["root@lab.test"])
        self.assertEqual(len(files), 2)
        self.assertEqual(len(self.svc.capture.ids()), 1)  # only the first had a recipient elsewhere

    def test_onlyInCaptureMode(self):
        from netsvc.config import ConfigError, parse

        text = daemonConfig("users.txt", "[]", "dev").replace("relay: {capture: true}",
                                                               'relay: {smarthost: "tcp:host=127.0.0.1:port=25"}')
        e = self.assertRaises(ConfigError, parse, "state_dir: s\n" + text, "f.yaml")
        self.assertIn("services.smtp.local.captured: only in capture mode", str(e))
        # a name that cannot be a mailbox is a configuration problem (it was 451 for every captured message)
        bad = daemonConfig("users.txt", "[]", '"Dev Team"')
        e = self.assertRaises(ConfigError, parse, "state_dir: s\n" + bad, "f.yaml")
        self.assertIn("services.smtp.local.captured: invalid user name 'Dev Team'", str(e))
