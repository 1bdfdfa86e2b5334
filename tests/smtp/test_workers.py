"""
SMTP with C{workers: N}, in one process: several L{Queue} writers on one folder
(ids, recovery rules), the owner's L{QueueWatcher} (inotify and the scan),
L{Delivery.discover}, the shared capture store, and which worker runs what.
The real daemon with two workers is tests/interop/test_smtp_workers.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial import unittest

from netsvc import config
from netsvc.metrics import Registry
from netsvc.smtp import queue as queuemod
from netsvc.smtp.capture import CaptureStore
from netsvc.smtp.delivery import Delivery, DeliveryMetrics
from netsvc.smtp.queue import ALONE, Envelope, Queue, Writer, newId, writerOf
from netsvc.smtp.watch import QueueWatcher
from tests.smtp.test_delivery import MESSAGE, FakeRouter, FakeSessions, settings


def worker(index: int, count: int = 2) -> Writer:
    return Writer(index=index, count=count, owner=index == 0)


def halfCommitted(q: Queue, data: bytes = b"x\r\n") -> str:
    """
    The state a writer leaves between its two renames (what a kill at that instant
    leaves, and what another worker's recovery can see): the message in msg/, the
    envelope still in its tmp/.
    """
    m = q.newMessage()
    m.write(data)
    m.finish(False)
    os.rename(m.tmpPath, q.msg / m.id)
    (q.tmp / f"{m.id}.1.env").write_bytes(Envelope.new("a@x", ["b@y"], id=m.id).dumps())
    return m.id


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class IdTests(unittest.TestCase):
    def test_writerIndexInTheId(self):
        for index in (None, 0, 1, 17, 255):
            id = newId(index)
            self.assertEqual(writerOf(id), index)
            self.assertRegex(id, r"^[0-9a-f]{22}([0-9a-f]{2})?$")  # what /mail/ID accepts
        self.assertIsNone(writerOf("unacked"))
        self.assertIsNone(writerOf("zz" * 12))

    def test_uniqueAcrossWritersEvenWhenEverythingElseCollides(self):
        """Two workers in the same microsecond, same counter, same random bits: still two ids."""
        self.patch(queuemod.time, "time_ns", lambda: 1_700_000_000_000_000_000)
        self.patch(queuemod.secrets, "token_hex", lambda n: "ab" * n)
        self.patch(queuemod, "_counter", iter([5, 5, 5]))
        a, b, c = newId(0), newId(1), newId(None)
        self.assertEqual(len({a, b, c}), 3)
        self.assertEqual(a[:22], b[:22])  # only the writer's index differs

    def test_sortableAcrossWriters(self):
        ids = []
        for i in range(40):
            ids.append(newId(i % 3))
            time.sleep(0.0001)
        self.assertEqual(sorted(ids), ids)  # creation order, whichever worker made it


class MultiWriterQueueTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.q0 = Queue(self.dir, fsync=False, writer=worker(0))
        self.q1 = Queue(self.dir, fsync=False, writer=worker(1))

    @defer.inlineCallbacks
    def test_concurrentWritersOneFolder(self):
        ds = []
        for i in range(10):
            for q in (self.q0, self.q1):
                ds.append(q.enqueueBytes("a@x", ["b@y"], b"n%d\r\n" % i))
        ids = yield defer.gatherResults(ds)
        self.assertEqual(len(set(ids)), 20)
        self.assertEqual(sorted(writerOf(id) for id in ids), [0] * 10 + [1] * 10)
        self.assertEqual(self.q0.ids(), sorted(ids))
        self.assertEqual(self.q1.ids(), sorted(ids))
        self.assertEqual(names(self.dir / "tmp"), ["0", "1"])  # each its own, both empty
        self.assertEqual(os.listdir(self.dir / "tmp" / "0") + os.listdir(self.dir / "tmp" / "1"), [])

    @defer.inlineCallbacks
    def test_ownerRestartingNeverRemovesAnotherWorkersCommitInProgress(self):
        """Worker 0 restarts while worker 1 is between 'rename into msg/' and 'rename into env/'."""
        done = yield self.q1.enqueueBytes("a@x", ["b@y"], b"done\r\n")
        inFlight = halfCommitted(self.q1)
        (self.q1.tmp / "receiving.msg").write_bytes(b"half a DATA")
        ownOrphan = halfCommitted(self.q0)  # what worker 0's previous life left
        restarted = Queue(self.dir, fsync=False, writer=worker(0))
        restarted.recover()
        self.assertEqual(names(self.dir / "msg"), sorted([done, inFlight]))  # its own orphan gone, 1's kept
        self.assertNotIn(ownOrphan, names(self.dir / "msg"))
        self.assertEqual(len(os.listdir(self.dir / "tmp" / "1")), 2)  # worker 1's files untouched
        self.assertEqual(os.listdir(self.dir / "tmp" / "0"), [])
        # worker 1 finishes its commit: a complete message, which nothing removed
        os.rename(self.q1.tmp / f"{inFlight}.1.env", self.dir / "env" / f"{inFlight}.json")
        self.assertEqual(restarted.ids(), sorted([done, inFlight]))
        self.assertEqual(restarted.messagePath(inFlight).read_bytes(), b"x\r\n")

    def test_otherWorkerRestartingRemovesOnlyItsOwn(self):
        inFlight0 = halfCommitted(self.q0)
        own = halfCommitted(self.q1)
        (self.dir / "tmp" / "old.msg").write_bytes(b"a workers: 1 run's")
        (self.dir / "env" / "0123.json").write_bytes(b"{}")  # an envelope without message: the owner's call
        again = Queue(self.dir, fsync=False, writer=worker(1))
        again.recover()
        self.assertEqual(names(self.dir / "msg"), [inFlight0])
        self.assertEqual(os.listdir(self.dir / "tmp" / "1"), [])
        self.assertEqual(len(os.listdir(self.dir / "tmp" / "0")), 1)
        self.assertTrue((self.dir / "tmp" / "old.msg").exists())
        self.assertTrue((self.dir / "env" / "0123.json").exists())
        self.assertNotIn(own, names(self.dir / "msg"))

    def test_ownerClearsWhatNoRunningWorkerOwns(self):
        """After workers: 3 (or workers: 1), a workers: 2 owner removes index-2 and unindexed leftovers."""
        three = Queue(self.dir, fsync=False, writer=worker(2, 3))
        gone2 = halfCommitted(three)
        alone = Queue(self.dir, fsync=False)
        goneAlone = halfCommitted(alone)  # its envelope waits directly in tmp/
        kept1 = halfCommitted(self.q1)
        (self.dir / "env" / f"{newId(1)}.json").write_bytes(b"{}")  # an envelope whose message is missing
        owner = Queue(self.dir, fsync=False, writer=worker(0))
        owner.recover()
        self.assertEqual(names(self.dir / "msg"), [kept1])
        self.assertNotIn(gone2, names(self.dir / "msg"))
        self.assertNotIn(goneAlone, names(self.dir / "msg"))
        self.assertEqual(names(self.dir / "tmp"), ["0", "1"])  # tmp/2/ and the loose file gone
        self.assertEqual(len(os.listdir(self.dir / "tmp" / "1")), 1)
        self.assertEqual(os.listdir(self.dir / "env"), [])  # moved aside (the owner checks envelopes)
        self.assertEqual(len(list(self.dir.glob("orphan-*.json"))), 1)
        self.flushLoggedErrors()

    def test_aloneAgainClearsEveryWorkersLeftovers(self):
        """workers: 2 -> workers: 1: the one process owns everything."""
        a, b = halfCommitted(self.q0), halfCommitted(self.q1)
        alone = Queue(self.dir, fsync=False)
        alone.recover()
        self.assertEqual(os.listdir(self.dir / "msg"), [])
        self.assertEqual(os.listdir(self.dir / "tmp"), [])
        self.assertNotEqual(a, b)


class DiscoverTests(unittest.TestCase):
    """The owner's Delivery learns of another worker's commits (Delivery.discover)."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(time.time())
        self.folder = Path(self.mktemp())
        self.owner = Queue(self.folder, fsync=False, reactor=reactor, writer=worker(0))
        self.other = Queue(self.folder, fsync=False, reactor=reactor, writer=worker(1))
        self.sessions = FakeSessions()
        self.delivery = Delivery(settings(), self.owner, FakeRouter(), self.sessions, self.clock,
                                 DeliveryMetrics(Registry()))
        self.addCleanup(lambda: self.delivery.running and self.delivery.stopService())

    @defer.inlineCallbacks
    def settle(self, until: Any) -> Any:
        deadline = time.monotonic() + 5
        while not until():
            self.assertLess(time.monotonic(), deadline, "timed out")
            self.clock.advance(0)
            yield task.deferLater(reactor, 0.005, lambda: None)

    @defer.inlineCallbacks
    def test_discoveredOnceDeliveredOnce(self):
        self.delivery.startService()
        id = yield self.other.enqueueBytes("alice@lab", ["bob@example.org"], MESSAGE)
        self.assertEqual(self.delivery.scheduled, {})  # nobody told the owner yet
        for _ in range(3):  # inotify and the scan may both report it, more than once
            self.delivery.discover(id)
        yield self.settle(lambda: not self.owner.ids())
        self.assertEqual([r for _, r, _ in self.sessions.received], [["bob@example.org"]])
        self.delivery.discover(id)  # a late event for a message already delivered and removed
        self.clock.advance(0)
        self.assertEqual(len(self.sessions.received), 1)

    @defer.inlineCallbacks
    def test_aRetryWaitsForItsTime(self):
        self.delivery.startService()
        id = yield self.other.enqueueBytes("alice@lab", ["bob@example.org"], MESSAGE,
                                           next_attempt=self.clock.seconds() + 60)
        self.delivery.discover(id)
        self.assertEqual(self.delivery.scheduled, {id: self.clock.seconds() + 60})
        self.assertEqual(list(self.delivery.fresh), [])

    def test_unreadableSaidOnce(self):
        self.delivery.startService()
        id = newId(1)
        (self.folder / "env" / f"{id}.json").write_bytes(b"not json")
        self.delivery.discover(id)
        self.delivery.discover(id)
        self.assertEqual(len(self.flushLoggedErrors()), 0)  # logged as an error line, not a failure
        self.assertIn(id, self.delivery.unreadable)


class WatcherTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.seen: list[str] = []

    def commit(self, id: str) -> None:
        tmp = self.folder.parent / f"{id}.tmp"
        tmp.write_bytes(b"{}")
        os.rename(tmp, self.folder / f"{id}.json")

    @defer.inlineCallbacks
    def test_inotifyReportsARenameAtOnce(self):
        arrived: defer.Deferred = defer.Deferred()

        def onNew(id: str) -> None:
            self.seen.append(id)
            if not arrived.called:
                arrived.callback(time.monotonic())

        w = QueueWatcher(self.folder, onNew, reactor, ignore=lambda id: id.endswith("00"))
        w.startService()
        self.addCleanup(w.stopService)
        if w.notifier is None:
            raise unittest.SkipTest("no inotify on this system (the scan alone is tested below)")
        self.commit("a" * 22 + "00")  # the owner's own: its commit hook tells it
        self.commit("a" * 22 + "01")
        (self.folder / "x.tmp").write_bytes(b"")  # not an envelope
        started = time.monotonic()
        timeout = reactor.callLater(5, lambda: arrived.called or arrived.errback(AssertionError("no event")))
        at = yield arrived
        timeout.cancel()
        self.assertLess(at - started, 1.0)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.seen, ["a" * 22 + "01"])

    def test_scanFindsEverythingOnItsTick(self):
        clock = Clock()
        self.commit("a" * 24)  # before the watch: found by the scan at start
        w = QueueWatcher(self.folder, self.seen.append, clock, useInotify=False, interval=2)
        w.startService()
        self.addCleanup(w.stopService)
        self.assertEqual(self.seen, ["a" * 24])
        del self.seen[:]
        os.unlink(self.folder / ("a" * 24 + ".json"))
        self.commit("b" * 24)
        self.commit("c" * 22)
        clock.advance(1)
        self.assertEqual(self.seen, [])
        clock.advance(1)
        self.assertEqual(sorted(self.seen), ["b" * 24, "c" * 22])

    def test_aFailingHandlerDoesNotStopTheScan(self):
        clock = Clock()

        def onNew(id: str) -> None:
            self.seen.append(id)
            raise RuntimeError("bug")

        self.commit("d" * 24)
        self.commit("e" * 24)
        w = QueueWatcher(self.folder, onNew, clock, useInotify=False, interval=1)
        w.startService()
        self.addCleanup(w.stopService)
        clock.advance(1)
        self.assertEqual(len(self.seen), 4)  # at start and a second later, both ids each time
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)


class SharedCaptureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_everyWorkersMailListedOwnerPrunes(self):
        folder = Path(self.mktemp())
        owner = CaptureStore(folder, keep=3, fsync=False, writer=worker(0))
        other = CaptureStore(folder, keep=3, fsync=False, writer=worker(1))
        owner.recover()
        other.recover()
        ids = []
        for i in range(4):
            ids.append((yield other.enqueueBytes("a@x", ["b@y"], b"Subject: o%d\r\n\r\n" % i)))
        self.assertEqual(other.count(), 0)  # a non-owner tracks nothing (it never prunes)
        self.assertEqual(other.listing(), (list(reversed(ids)), 4))  # read from the folder
        for id in ids:
            owner.discover(id)
            owner.discover(id)  # reported twice: counted once
        mine = yield owner.enqueueBytes("a@x", ["b@y"], b"Subject: mine\r\n\r\n")
        yield task.deferLater(reactor, 0.01, lambda: None)  # the removals' writer turn
        self.assertEqual(owner.ids(), ids[2:] + [mine])  # the oldest two removed, whoever wrote them
        self.assertEqual(other.listing(), ([mine, ids[3], ids[2]], 3))
        self.assertEqual(owner.summary(ids[3])["subject"], "o3")
        owner.discover(ids[0])  # gone: not counted again
        self.assertEqual(owner.count(), 3)


class ConfigAndRolesTests(unittest.TestCase):
    def test_smtpAcceptedWithWorkers(self):
        """workers > 1 with SMTP used to be refused ("the mail queue needs one delivery owner")."""
        for relay in ("{capture: true}", '{smarthost: "tcp:host=127.0.0.1:port=2525"}'):
            settings = config.parse(f"workers: 2\nservices: {{smtp: {{relay: {relay}}}}}", "t.yaml")
            self.assertEqual(settings.workers, 2)

    def build(self, env: str | None, relay: str = '{smarthost: "tcp:host=127.0.0.1:port=9", starttls: none}'):
        from netsvc.runtime import buildDaemon
        from netsvc.workers import ENV_WORKER

        if env is None:
            self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != ENV_WORKER})
        else:
            self.patch(os, "environ", {**os.environ, ENV_WORKER: env})
        state = Path(self.mktemp()).absolute()
        settings = config.parse(f"state_dir: {state}\nservices: {{smtp: {{listen: ['tcp:0:interface=127.0.0.1'], "
                                f"relay: {relay}}}}}")
        svc = buildDaemon(settings).getServiceNamed("smtp")
        return svc, {type(s).__name__ for s in svc}

    def test_whoRunsWhat(self):
        owner, children = self.build("0/2")
        self.assertEqual(owner.queue.writer, worker(0))
        self.assertTrue({"Delivery", "QueueWatcher"} <= children)
        other, children = self.build("1/2")
        self.assertEqual(other.queue.writer, worker(1))
        self.assertNotIn("Delivery", children)  # no delivery, bounces, retries or ctl/ requests here
        self.assertNotIn("QueueWatcher", children)
        self.assertEqual(other.configs[0].onAccepted, None)
        alone, children = self.build(None)
        self.assertEqual(alone.queue.writer, ALONE)
        self.assertIn("Delivery", children)
        self.assertNotIn("QueueWatcher", children)  # one writer: its commits kick delivery directly
        capture, children = self.build("0/2", "{capture: true}")
        self.assertIn("QueueWatcher", children)
        self.assertTrue(capture.capture.shared)
