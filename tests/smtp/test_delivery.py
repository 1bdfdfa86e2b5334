"""
netsvc.smtp.delivery: the scheduler and its outcomes, over a real queue folder,
with a fake clock and fake SMTP sessions (scripted replies per recipient).
"""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial import unittest

from netsvc.config import Duration
from netsvc.metrics import Registry
from netsvc.smtp.delivery import Delivery, DeliveryMetrics
from netsvc.smtp.queue import Envelope, Queue
from netsvc.smtp.routing import RoutingError, Target
from netsvc.smtp.sendertypes import Reply, SessionError
from netsvc.smtp.settings import QueueSettings, RelaySettings, Settings

MESSAGE = b"From: alice@lab\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


class FakeRouter:
    def __init__(self) -> None:
        self.errors: dict[str, RoutingError] = {}
        self.targets: dict[str, list[Target]] = {}

    def route(self, domain: str) -> defer.Deferred:
        if domain in self.errors:
            return defer.fail(self.errors[domain])
        return defer.succeed(self.targets.get(domain, [Target(f"mx.{domain}", "192.0.2.1", 25)]))


class FakeSessions:
    """
    openSession: each pulled message gets, per recipient, C{script(target, address)}
    (a Reply), at once.  C{refuse}: targets (by host) whose connections fail.
    C{hold}: sessions stay open until released (concurrency tests).
    """

    def __init__(self) -> None:
        self.script = lambda target, address: Reply(250, "2.0.0 ok")
        self.refuse: set[str] = set()
        self.hold = False
        self.held: list[Held] = []
        self.sessions: list[str] = []
        self.received: list[tuple[str, list[str], bytes]] = []
        self.onRecorded = None  # called after each onResult returns

    def __call__(self, target: Target, nextMessage: Any, onResult: Any) -> defer.Deferred:
        self.sessions.append(target.host)
        if target.host in self.refuse:
            return defer.fail(ConnectionRefusedError("refused"))
        if self.hold:
            held = Held(target, nextMessage, onResult)
            self.held.append(held)
            return held.done
        self.run(target, nextMessage, onResult)
        return defer.succeed(None)

    def run(self, target: Target, nextMessage: Any, onResult: Any) -> None:
        while True:
            m = nextMessage()
            if m is None:
                return
            with m.openData() as f:
                data = f.read()
            self.received.append((m.sender, [r.address for r in m.recipients], data))
            onResult(m, [(r, self.script(target, r.address)) for r in m.recipients])
            if self.onRecorded is not None:
                self.onRecorded(m)

    def release(self) -> None:
        held, self.held = self.held, []
        for h in held:
            self.run(h.target, h.nextMessage, h.onResult)
            h.done.callback(None)


class Held:
    """A session whose first transaction has started (its message taken) and whose answers wait."""

    def __init__(self, target: Target, nextMessage: Any, onResult: Any) -> None:
        self.target, self.onResult, self._next = target, onResult, nextMessage
        self.first = nextMessage()
        self.done: defer.Deferred = defer.Deferred()

    def nextMessage(self) -> Any:
        if self.first is not None:
            m, self.first = self.first, None
            return m
        return self._next()


def settings(mode: str = "mx", **queue: Any) -> Settings:
    relay = RelaySettings(mx=True) if mode == "mx" else RelaySettings(smarthost="tcp:host=127.0.0.1:port=2525")
    q = {"retry": [Duration(60), Duration(120)], "max_age": Duration(3600), "delay_warning": Duration(0),
         "concurrency": 4, "fsync": False}
    q.update(queue)
    return Settings(hostname="mail.lab", relay=relay, queue=QueueSettings(**q))


class DeliveryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.folder = Path(self.mktemp())
        self.queue = Queue(self.folder, fsync=False, reactor=reactor)
        self.router = FakeRouter()
        self.sessions = FakeSessions()
        self.registry = Registry()

    def makeDelivery(self, mode: str = "mx", **queue: Any) -> Delivery:
        d = Delivery(settings(mode, **queue), self.queue, self.router, self.sessions, self.clock,
                     DeliveryMetrics(self.registry))
        self.addCleanup(lambda: d.running and d.stopService())
        return d

    def metric(self, name: str) -> float:
        return self.registry.get(name).labels(service="smtp").value

    @defer.inlineCallbacks
    def enqueue(self, recipients: list[str], sender: str = "alice@lab", data: bytes = MESSAGE,
                **fields: Any) -> Any:
        id = yield self.queue.enqueueBytes(sender, recipients, data, **fields)
        yield task.deferLater(reactor, 0, lambda: None)  # let the queue finish its commit (and kick)
        return id

    @defer.inlineCallbacks
    def settle(self, until: Any = None, timeout: float = 5.0) -> Any:
        """Run the fake clock's due calls and let the queue's writer thread finish."""
        deadline = time.monotonic() + timeout
        while True:
            self.clock.advance(0)
            yield task.deferLater(reactor, 0.005, lambda: None)
            self.clock.advance(0)
            if (until is None or until()) and not self.queue._writing and not self.queue._waiting:
                if until is not None or time.monotonic() > deadline - timeout + 0.05:
                    return
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the delivery to settle")

    def reports(self) -> list[Envelope]:
        return [e for e in (self.queue.envelope(i) for i in self.queue.ids()) if e.dsn]

    # -- tests ------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_deliveredAndRemoved(self) -> None:
        id = yield self.enqueue(["bob@example.org", "carol@example.org", "dave@other.example"])
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(sorted(self.sessions.sessions), ["mx.example.org", "mx.other.example"])
        grouped = sorted(tuple(r) for _, r, _ in self.sessions.received)
        self.assertEqual(grouped, [("bob@example.org", "carol@example.org"), ("dave@other.example",)])
        self.assertTrue(all(data == MESSAGE for _, _, data in self.sessions.received))
        self.assertFalse(self.queue.messagePath(id).exists())
        self.assertEqual(self.metric("netsvc_smtp_delivered_total"), 3)

    @defer.inlineCallbacks
    def test_deliveryRecordedBeforeTheNextReply(self) -> None:
        """After onResult returns, the envelope on disk already says 'sent'."""
        id = yield self.enqueue(["bob@example.org", "dave@other.example"])
        self.router.targets["other.example"] = [Target("mx.other.example", "192.0.2.2", 25)]
        self.sessions.script = lambda t, a: Reply(250, "ok") if a.startswith("bob") else Reply(451, "4.3.0 later")
        seen = []

        def check(m: Any) -> None:
            if m.recipients[0].address.startswith("bob"):
                on = Envelope.loads((self.folder / "env" / f"{id}.json").read_bytes())
                seen.append([r.status for r in on.recipients])

        self.sessions.onRecorded = check
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: id in delivery.scheduled)
        self.assertEqual(seen, [["sent", "pending"]])

    @defer.inlineCallbacks
    def test_recordsAreFsyncedWhenTheQueueSyncs(self) -> None:
        self.queue.fsync = True
        id = yield self.enqueue(["bob@example.org", "dave@other.example"])
        self.sessions.script = lambda t, a: Reply(250, "ok") if a.startswith("bob") else Reply(451, "4.3.0 later")
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: id in delivery.scheduled and delivery.writer.synced >= 2
                          and not delivery.writer._busy)
        self.assertEqual(list(self.queue.tmp.iterdir()), [])  # written by rename, nothing left behind
        folderSyncs = delivery.writer.folderSyncs
        self.sessions.script = lambda t, a: Reply(250, "ok")
        self.clock.advance(61)
        yield self.settle(lambda: not self.queue.ids() and delivery.writer.folderSyncs > folderSyncs
                          and not delivery.writer._busy)  # the removal's folder fsync too

    @defer.inlineCallbacks
    def test_temporaryFailureRetriedOnSchedule(self) -> None:
        id = yield self.enqueue(["bob@example.org"])
        self.sessions.script = lambda t, a: Reply(451, "4.7.1 greylisted")
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: id in delivery.scheduled)
        env = self.queue.envelope(id)
        self.assertEqual((env.attempts, env.recipients[0].status, env.recipients[0].attempts), (1, "pending", 1))
        self.assertIn("451 4.7.1 greylisted", env.recipients[0].last_error)
        self.assertAlmostEqual(env.next_attempt, self.clock.seconds() + 60, delta=1)
        self.clock.advance(59)
        yield self.settle()
        self.assertEqual(len(self.sessions.sessions), 1)
        self.clock.advance(1.5)
        yield self.settle(lambda: len(self.sessions.sessions) == 2 and id in delivery.scheduled)
        self.assertAlmostEqual(self.queue.envelope(id).next_attempt, self.clock.seconds() + 120, delta=1)
        self.clock.advance(121)  # the last wait repeats
        yield self.settle(lambda: len(self.sessions.sessions) == 3 and id in delivery.scheduled)
        self.assertAlmostEqual(self.queue.envelope(id).next_attempt, self.clock.seconds() + 120, delta=1)
        self.sessions.script = lambda t, a: Reply(250, "ok")
        self.clock.advance(121)
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(self.metric("netsvc_smtp_deferred_total"), 3)
        self.assertEqual(self.metric("netsvc_smtp_delivered_total"), 1)

    @defer.inlineCallbacks
    def test_permanentFailureBouncesAtOnce(self) -> None:
        id = yield self.enqueue(["bob@example.org", "carol@example.org"], envid="E1")
        self.sessions.script = (lambda t, a: Reply(550, "5.1.1 no such user") if a.startswith("bob")
                                else Reply(250, "2.0.0 ok"))
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: not self.queue.ids() and any(r[0] == "" for r in self.sessions.received))
        # The bounce itself is delivered next (to alice@lab's domain): it went out from <>.
        bounces = [r for r in self.sessions.received if r[0] == ""]
        self.assertEqual(len(bounces), 1)
        _, rcpts, data = bounces[0]
        self.assertEqual(rcpts, ["alice@lab"])
        m = email.message_from_bytes(data, policy=email.policy.default)
        perRecipient = list(m.iter_parts())[1].get_payload()[1]
        self.assertEqual(perRecipient["Final-Recipient"], "rfc822; bob@example.org")
        self.assertEqual(perRecipient["Status"], "5.1.1")
        self.assertEqual(perRecipient["Remote-MTA"], "dns; mx.example.org")
        self.assertEqual(perRecipient["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertNotIn(id, self.queue.ids())
        self.assertEqual(self.metric("netsvc_smtp_bounced_total"), 1)

    @defer.inlineCallbacks
    def test_neverBounceABounce(self) -> None:
        id = yield self.enqueue(["alice@lab"], sender="", dsn=True)
        self.sessions.script = lambda t, a: Reply(550, "5.1.1 gone")
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(len(self.sessions.received), 1)
        self.assertNotIn(id, self.queue.ids())

    @defer.inlineCallbacks
    def test_routingFailures(self) -> None:
        self.router.errors["nowhere.example"] = RoutingError("5.1.2", "domain nowhere.example not found")
        self.router.errors["flaky.example"] = RoutingError("4.4.3", "SERVFAIL")
        self.router.errors["lab"] = RoutingError("4.4.3", "keep the bounce queued")
        id = yield self.enqueue(["a@nowhere.example", "b@flaky.example"])
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: id in delivery.scheduled and self.reports())
        env = self.queue.envelope(id)
        self.assertEqual([r.status for r in env.recipients], ["failed", "pending"])
        (report,) = self.reports()
        self.assertEqual(report.sender, "")
        self.assertIn(b"Status: 5.1.2", self.queue.messagePath(report.id).read_bytes())

    @defer.inlineCallbacks
    def test_connectionFailuresTryNextTargetThenDefer(self) -> None:
        self.router.targets["example.org"] = [Target("mx1.example.org", "192.0.2.1", 25),
                                              Target("mx2.example.org", "192.0.2.2", 25)]
        self.sessions.refuse = {"mx1.example.org"}
        yield self.enqueue(["bob@example.org"])
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(self.sessions.sessions, ["mx1.example.org", "mx2.example.org"])
        self.sessions.refuse.add("mx2.example.org")
        id = yield self.enqueue(["carol@example.org"])
        yield self.settle(lambda: id in delivery.scheduled)
        self.assertIn("refused", self.queue.envelope(id).recipients[0].last_error)

    @defer.inlineCallbacks
    def test_sessionDiesMidMessageOnlyThatMessageWaits(self) -> None:
        ids = []
        for _ in range(3):
            ids.append((yield self.enqueue(["bob@example.org"])))
        calls = []

        def dying(target: Any, nextMessage: Any, onResult: Any) -> defer.Deferred:
            calls.append(target)
            if len(calls) > 1:
                return self.sessionsRun(target, nextMessage, onResult)
            m = nextMessage()
            onResult(m, [(r, Reply(250, "ok")) for r in m.recipients])
            nextMessage()
            return defer.fail(SessionError("connection lost: reset"))

        self.sessionsRun = lambda t, n, o: (self.sessions.run(t, n, o), defer.succeed(None))[1]
        delivery = Delivery(settings(concurrency=1), self.queue, self.router, dying, self.clock,
                            DeliveryMetrics(self.registry))
        self.addCleanup(delivery.stopService)
        delivery.startService()
        yield self.settle(lambda: len(self.queue.ids()) == 1 and delivery.scheduled)
        (left,) = self.queue.ids()
        self.assertEqual(left, ids[1])  # the one in flight when the connection died
        self.assertIn("connection lost", self.queue.envelope(left).recipients[0].last_error)

    @defer.inlineCallbacks
    def test_expiryBouncesWith447(self) -> None:
        id = yield self.enqueue(["bob@example.org"], created=self.clock.seconds() - 7200)
        self.sessions.script = lambda t, a: Reply(421, "4.3.2 busy")
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: id not in self.queue.ids() and self.reports())
        (report,) = self.reports()
        data = self.queue.messagePath(report.id).read_bytes()
        self.assertIn(b"Status: 4.4.7", data)
        self.assertIn(b"Action: failed", data)
        self.assertIn(b"421 4.3.2 busy", data)

    @defer.inlineCallbacks
    def test_delayWarningOnce(self) -> None:
        id = yield self.enqueue(["bob@example.org"], created=self.clock.seconds() - 600)
        self.sessions.script = lambda t, a: Reply(450, "4.2.0 mailbox busy")
        delivery = self.makeDelivery(delay_warning=Duration(300))
        self.router.errors["lab"] = RoutingError("4.4.3", "keep the warning queued")
        delivery.startService()
        yield self.settle(lambda: id in delivery.scheduled and self.reports())
        self.assertTrue(self.queue.envelope(id).warned)
        self.clock.advance(61)
        yield self.settle(lambda: len([s for s in self.sessions.sessions if s == "mx.example.org"]) == 2
                          and id in delivery.scheduled)
        (warning,) = self.reports()
        data = self.queue.messagePath(warning.id).read_bytes()
        self.assertIn(b"Action: delayed", data)
        self.assertIn(b"Will-Retry-Until:", data)

    @defer.inlineCallbacks
    def test_concurrencyBounded(self) -> None:
        for i in range(12):
            yield self.enqueue([f"user@d{i}.example"])
        self.sessions.hold = True
        delivery = self.makeDelivery(concurrency=3)
        delivery.startService()
        yield self.settle(lambda: len(self.sessions.held) == 3)
        self.assertEqual(delivery.connections, 3)
        self.assertEqual(self.registry.get("netsvc_smtp_delivery_connections").labels(service="smtp").value, 3)
        while self.queue.ids():
            self.assertLessEqual(len(self.sessions.held), 3)
            self.sessions.release()
            yield self.settle(lambda: self.sessions.held or not self.queue.ids())
        self.assertEqual(len(self.sessions.sessions), 12)

    @defer.inlineCallbacks
    def test_stopLetsTransactionsInProgressFinish(self) -> None:
        for i in range(3):
            yield self.enqueue([f"user@d{i}.example"])
        self.sessions.hold = True
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: len(self.sessions.held) == 3)
        stopped = delivery.stopService()
        self.assertFalse(stopped.called)
        self.sessions.release()  # the answers come in after the stop began: still recorded
        yield self.settle(lambda: stopped.called)
        self.assertEqual(self.queue.ids(), [])
        # Without answers, the stop gives up after the grace period.
        yield self.enqueue(["late@d9.example"])
        delivery.startService()
        yield self.settle(lambda: len(self.sessions.held) == 1)
        stopped = delivery.stopService()
        self.clock.advance(5)
        self.assertTrue(stopped.called)
        self.sessions.held.clear()

    @defer.inlineCallbacks
    def test_smarthostOneConnectionForManyDomains(self) -> None:
        for i in range(5):
            yield self.enqueue([f"user@d{i}.example", f"other@e{i}.example"])
        delivery = self.makeDelivery("smarthost", concurrency=1)
        self.router.targets["*"] = [Target("smart.example", None, 587)]
        delivery.startService()
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(self.sessions.sessions, ["smart.example"])
        self.assertEqual([len(r) for _, r, _ in self.sessions.received], [2] * 5)

    @defer.inlineCallbacks
    def test_controlRequests(self) -> None:
        keep = yield self.enqueue(["bob@example.org"])
        drop = yield self.enqueue(["carol@example.org"])
        self.sessions.script = lambda t, a: Reply(451, "4.3.0 later")
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: keep in delivery.scheduled and drop in delivery.scheduled)
        (self.folder / "ctl" / f"delete-{drop}").touch()
        (self.folder / "ctl" / f"retry-{keep}").touch()
        self.clock.advance(1)
        yield self.settle(lambda: len(self.sessions.sessions) == 2 and keep in delivery.scheduled)
        self.assertEqual(self.queue.ids(), [keep])
        self.assertEqual(list((self.folder / "ctl").iterdir()), [])
        self.sessions.script = lambda t, a: Reply(250, "ok")
        (self.folder / "ctl" / "retry-all").touch()
        self.clock.advance(1)
        yield self.settle(lambda: not self.queue.ids())

    @defer.inlineCallbacks
    def test_restartResumes(self) -> None:
        later = yield self.enqueue(["bob@example.org"], next_attempt=self.clock.seconds() + 30)
        done = yield self.enqueue(["carol@example.org"])
        env = self.queue.envelope(done)
        env.recipients[0].status = "sent"  # delivered just before a crash that kept the envelope
        yield self.queue.update(env)
        delivery = self.makeDelivery()
        delivery.startService()
        yield self.settle(lambda: done not in self.queue.ids())
        self.assertEqual(self.sessions.sessions, [])
        self.assertIn(later, delivery.scheduled)
        self.clock.advance(31)
        yield self.settle(lambda: not self.queue.ids())
        self.assertEqual(len(self.sessions.sessions), 1)
