"""The durable queue: commit order, recovery, envelopes, group commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from twisted.internet import defer
from twisted.trial import unittest

from netsvc.config import ConfigError, structure
from netsvc.smtp.queue import Envelope, Queue, Recipient, newId
from netsvc.smtp.settings import Settings


class QueueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.queue = Queue(self.dir)

    @defer.inlineCallbacks
    def test_commitWritesMessageAndEnvelope(self):
        m = self.queue.newMessage()
        m.write(b"Subject: hi\r\n\r\n")
        m.write(b"body\r\n")
        # nothing visible before the commit
        self.assertEqual(self.queue.ids(), [])
        env = Envelope.new("a@x", ["b@y", Recipient("c@z", notify="NEVER", orcpt="rfc822;c@z")],
                           client={"address": "127.0.0.1", "helo": "h", "user": None}, ret="HDRS")
        id = yield m.commit(env)
        self.assertEqual(self.queue.ids(), [id])
        self.assertEqual(self.queue.messagePath(id).read_bytes(), b"Subject: hi\r\n\r\nbody\r\n")
        stored = self.queue.envelope(id)
        self.assertEqual(stored.id, id)
        self.assertEqual(stored.sender, "a@x")
        self.assertEqual([r.address for r in stored.pending()], ["b@y", "c@z"])
        self.assertEqual(stored.recipients[1].notify, "NEVER")
        self.assertEqual(stored.ret, "HDRS")
        raw = json.loads((self.dir / "env" / f"{id}.json").read_text())
        self.assertEqual(raw["recipients"][0], {"address": "b@y", "status": "pending", "attempts": 0,
                                                "last_error": None})
        self.assertFalse(raw["dsn"])
        self.assertEqual(list((self.dir / "tmp").iterdir()), [])

    @defer.inlineCallbacks
    def test_concurrentCommitsAllDurableAndOrdered(self):
        ds = []
        for i in range(20):
            m = self.queue.newMessage()
            m.write(b"n%d\r\n" % i)
            ds.append(m.commit(Envelope.new("a@x", ["b@y"])))
        ids = yield defer.gatherResults(ds)
        self.assertEqual(self.queue.ids(), sorted(ids))
        self.assertEqual(ids, sorted(ids))  # creation order
        for i, id in enumerate(ids):
            self.assertEqual(self.queue.messagePath(id).read_bytes(), b"n%d\r\n" % i)

    def test_abortLeavesNothing(self):
        m = self.queue.newMessage()
        m.write(b"partial")
        m.abort()
        self.assertEqual(list((self.dir / "tmp").iterdir()), [])
        self.assertEqual(self.queue.ids(), [])

    @defer.inlineCallbacks
    def test_updateAndRemove(self):
        id = yield self.queue.enqueueBytes("a@x", ["b@y", "c@y"], b"x\r\n", dsn=True)
        env = self.queue.envelope(id)
        self.assertTrue(env.dsn)
        env.recipients[0].status = "sent"
        env.attempts = 1
        yield self.queue.update(env)
        again = self.queue.envelope(id)
        self.assertEqual([r.address for r in again.pending()], ["c@y"])
        self.assertEqual(again.attempts, 1)
        self.queue.remove(id)
        self.assertEqual(self.queue.ids(), [])
        self.assertFalse(self.queue.messagePath(id).exists())

    @defer.inlineCallbacks
    def test_recover(self):
        id = yield self.queue.enqueueBytes("a@x", ["b@y"], b"kept\r\n")
        # a crash mid-receive and mid-commit: tmp files, a message never acknowledged
        (self.dir / "tmp" / "x.msg").write_bytes(b"half")
        (self.dir / "msg" / "unacked").write_bytes(b"never acked")
        q = Queue(self.dir)
        q.recover()
        self.assertEqual(list((self.dir / "tmp").iterdir()), [])
        self.assertEqual(sorted(p.name for p in (self.dir / "msg").iterdir()), [id])
        self.assertEqual(q.ids(), [id])

    def test_failedCommitErrbacks(self):
        m = self.queue.newMessage()
        m.write(b"x")
        os.rmdir(self.dir / "msg")  # the rename cannot succeed
        (self.dir / "msg").write_bytes(b"")  # a file where the folder should be
        d = m.commit(Envelope.new("a@x", ["b@y"]))
        self.assertFailure(d, OSError)
        d.addCallback(lambda _: self.assertEqual(list((self.dir / "tmp").iterdir()), []))
        return d

    @defer.inlineCallbacks
    def test_updatesOfOneEnvelopeInOneBatch(self):
        """Two rewrites of the same envelope waiting together: both succeed, the last one is on disk, intact."""
        id = yield self.queue.enqueueBytes("a@x", ["b@y"], b"x\r\n")
        busy = self.queue.enqueueBytes("a@x", ["b@y"], b"y\r\n")  # the writer is busy: the next two wait together
        first, second = self.queue.envelope(id), self.queue.envelope(id)
        first.recipients[0].last_error = "a much longer error text than the second one has" * 4
        second.attempts = 2
        yield defer.gatherResults([busy, self.queue.update(first), self.queue.update(second)])
        self.assertEqual(self.queue.envelope(id), second)
        self.assertEqual(list((self.dir / "tmp").iterdir()), [])

    @defer.inlineCallbacks
    def test_removeIsMadeDurable(self):
        """remove() returns at once; the env/ folder is fsync'd after it (batched), so a power cut cannot revive it."""
        from netsvc.smtp import queue as queueModule

        synced = []
        real = queueModule._fsyncDir
        self.patch(queueModule, "_fsyncDir", lambda path: (synced.append(Path(path).name), real(path)))
        ids = []
        for i in range(3):
            ids.append((yield self.queue.enqueueBytes("a@x", ["b@y"], b"%d\r\n" % i)))
        del synced[:]
        ds = [self.queue.remove(id) for id in ids]
        self.assertEqual(self.queue.ids(), [])  # gone at once
        yield defer.gatherResults(ds)
        self.assertIn("env", synced)
        self.assertLessEqual(synced.count("env"), 2)  # batched, not one sync per removal

    @defer.inlineCallbacks
    def test_removeWithTheWriterIdle(self):
        """remove() called in a later reactor turn (nothing being written) -- the delivery side's case."""
        from twisted.internet import reactor, task

        id = yield self.queue.enqueueBytes("a@x", ["b@y"], b"x\r\n")
        yield task.deferLater(reactor, 0, lambda: None)  # out of the commit's callback: the writer is idle
        self.assertFalse(self.queue._writing)
        yield self.queue.remove(id)
        self.assertEqual(self.queue.ids(), [])
        yield task.deferLater(reactor, 0, lambda: None)
        yield defer.gatherResults([self.queue.remove("gone-1"), self.queue.remove("gone-2")])

    def test_failedEnvelopeRenameLeavesNoMessage(self):
        m = self.queue.newMessage()
        m.write(b"x")
        (self.dir / "env" / f"{m.id}.json").mkdir()  # the envelope's rename fails
        d = m.commit(Envelope.new("a@x", ["b@y"]))
        self.assertFailure(d, OSError)
        d.addCallback(lambda _: self.assertEqual(list((self.dir / "msg").iterdir()), []))
        return d

    @defer.inlineCallbacks
    def test_failingOnCommitDoesNotStallTheQueue(self):
        """A bug in the commit hook (delivery's kick) is logged; later commits are still written and acknowledged."""
        def broken(id):
            raise RuntimeError("kick failed")

        self.queue.onCommit = broken
        first = yield self.queue.enqueueBytes("a@x", ["b@y"], b"1\r\n")
        second = yield self.queue.enqueueBytes("a@x", ["b@y"], b"2\r\n")
        yield self.queue.update(self.queue.envelope(second))  # written after the second's hook ran
        self.assertEqual(self.queue.ids(), [first, second])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_envelopeRoundTrip(self):
        env = Envelope.new("", ["b@y"], envid="E1", warned=True)
        self.assertEqual(Envelope.loads(env.dumps()), env)

    def test_idsSortable(self):
        ids = [newId() for _ in range(100)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 100)


SUB = """
services:
  smtp:
    listen:
      - "tcp:2525:interface=127.0.0.1"
      - {endpoint: "tcp:2587:interface=127.0.0.1", submission: true}
    users: users.txt
    %s
"""


def parse(text: str) -> Settings:
    return structure(Settings, yaml.safe_load(text)["services"]["smtp"], "<string>", "services.smtp")


class SettingsTests(unittest.TestCase):
    def test_defaults(self):
        s = parse("services: {smtp: {}}")
        self.assertEqual(s.relay.mode, "capture")
        self.assertEqual(s.hostname, "localhost")
        self.assertEqual(s.mynetworks, ["127.0.0.0/8", "::1/128"])
        self.assertEqual(s.queue.retry, [300, 600, 1200, 2400, 3600])
        self.assertTrue(s.queue.fsync)
        self.assertEqual(s.max_message_size, 25_000_000)
        self.assertEqual(s.max_recipients, 100)

    def test_full(self):
        s = parse(SUB % ('relay: {smarthost: "tcp:host=smtp.example:port=587", starttls: required, '
                         'auth: {user: u, password_file: p}}\n    queue: {retry: [1m, 2m], max_age: 1d}'
                         '\n    max_message_size: 10MB'))
        self.assertEqual(s.relay.mode, "smarthost")
        self.assertEqual(s.relay.auth.user, "u")
        self.assertEqual(s.queue.retry, [60, 120])
        self.assertEqual(s.max_message_size, 10_000_000)
        self.assertTrue(s.listen[1].submission)
        mx = parse(SUB % "relay: {mx: true, port: 2500}")
        self.assertEqual((mx.relay.mode, mx.relay.port), ("mx", 2500))

    def test_errors(self):
        for bad, needle in [
            ("relay: {mx: true, capture: true}", "choose one of"),
            ("relay: {smarthost: 'bogus:x'}", "services.smtp.relay.smarthost"),
            ("relay: {starttls: maybe}", "starttls"),
            ("mynetworks: [nonsense]", "mynetworks"),
            ("queue: {retry: []}", "retry"),
            ("relays: {}", "did you mean 'relay'"),
            ("hostname: 'mail lab'", "services.smtp.hostname"),
            ("hostname: 'mail.lab.'", "services.smtp.hostname"),
        ]:
            with self.assertRaises(ConfigError) as e:
                parse(SUB % bad)
            self.assertIn(needle, str(e.exception), bad)

    def test_submissionNeedsUsers(self):
        with self.assertRaises(ConfigError) as e:
            parse("services: {smtp: {listen: [{endpoint: 'tcp:2587', submission: true}]}}")
        self.assertIn("services.smtp.users", str(e.exception))
