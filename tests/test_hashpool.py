"""
netsvc.auth's hashing pool and failure limits: hashing never waits in (or
holds) the reactor's default thread pool, a full queue refuses without
hashing, failures are reserved before the check and refunded on success.
"""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from netsvc import auth
from netsvc.metrics import Registry


class Gate:
    """A fake C{verifyPassword} that blocks its thread until L{open}; counts calls and finishes."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.started = 0
        self.finished = 0
        self.threads: set[str] = set()

    def __call__(self, password: str, stored: str, plain: bool = False) -> bool:
        with self.lock:
            self.started += 1
            self.threads.add(threading.current_thread().name)
        self.event.wait(30)  # bounded: a test that never opens the gate still ends
        with self.lock:
            self.finished += 1
        return False

    def open(self) -> None:
        self.event.set()


def gatedUsers(test: unittest.TestCase) -> tuple[auth.UsersFile, Gate]:
    """A users file whose checks go through the process's hashing pool, hashing with a L{Gate}."""
    path = test.mktemp()
    with open(path, "w") as f:
        f.write("ann:" + "scrypt:" + "11" * 16 + ":" + "22" * 32 + "\n")
    gate = Gate()
    test.patch(auth, "verifyPassword", gate)
    test.addCleanup(auth.hashPool().stop)
    test.addCleanup(gate.open)  # runs first: the threads are free before the pool is stopped
    return auth.UsersFile(path), gate


class DefaultPoolTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_floodDoesNotDelayDefaultPool(self):
        """
        50 wrong passwords at once, then a job on the reactor's default pool (where
        the SMTP queue's fsyncs run): the job completes while every hash is still
        blocked -- hashing has a pool of its own.
        """
        users, gate = gatedUsers(self)
        checks = [users.check("ann", f"wrong{i}") for i in range(50)]
        safety = reactor.callLater(10, gate.open)  # only if the default pool is blocked (the bug)
        hashesDoneWhenJobRan = yield deferToThread(lambda: gate.finished)
        if safety.active():
            safety.cancel()
        self.assertEqual(hashesDoneWhenJobRan, 0)
        gate.open()
        results = yield defer.gatherResults(checks)
        pool = auth.hashPool()
        hashed = [r for r in results if not isinstance(r, auth.Refused)]
        self.assertEqual(set(hashed), {False})
        self.assertEqual(len(hashed), pool.threads + pool.queue)
        self.assertEqual(gate.started, len(hashed))
        self.assertTrue(all(r.reason == "busy" for r in results if isinstance(r, auth.Refused)))
        self.assertTrue(all("netsvc-hash" in name for name in gate.threads), gate.threads)


class HashPoolTests(unittest.TestCase):
    def setUp(self):
        self.gate = Gate()
        self.pool = auth.HashPool(reactor, threads=1, queue=2, verify=self.gate)
        self.addCleanup(self.pool.stop)
        self.addCleanup(self.gate.open)

    @defer.inlineCallbacks
    def test_fullQueueRefusesWithoutHashing(self):
        accepted = [self.pool.verify("pw", "x") for _ in range(3)]
        refused = self.pool.verify("pw", "x")
        self.assertTrue(refused.called)
        answer = self.successResultOf(refused)
        self.assertIsInstance(answer, auth.Refused)
        self.assertFalse(answer)
        self.assertEqual(answer.reason, "busy")
        self.assertEqual(self.pool.refusedBusy.value, 1)
        self.failureResultOf(self.pool.run(self.gate, "pw", "x"), auth.PoolBusy)
        self.gate.open()
        self.assertEqual((yield defer.gatherResults(accepted)), [False, False, False])
        self.assertEqual(self.gate.started, 3)  # the refused ones never reached the hash
        self.assertEqual(self.pool.pending, 0)
        # room again once the queue drained
        self.assertEqual((yield self.pool.verify("pw", "x")), False)
        self.assertEqual(self.gate.started, 4)

    @defer.inlineCallbacks
    def test_usersFileAnswersBusy(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("ann:scrypt:00:00\n")
        users = auth.UsersFile(path, pool=self.pool)
        pending = [users.check("ann", "pw") for _ in range(3)]
        answer = self.successResultOf(users.check("ann", "pw"))
        self.assertIsInstance(answer, auth.Refused)
        self.gate.open()
        self.assertEqual((yield defer.gatherResults(pending)), [False, False, False])

    @defer.inlineCallbacks
    def test_realHash(self):
        pool = auth.HashPool(reactor)
        self.addCleanup(pool.stop)
        stored = auth.hashPassword("s3cret")
        self.assertIs((yield pool.verify("s3cret", stored)), True)
        self.assertIs((yield pool.verify("nope", stored)), False)

    def test_stopWithoutStart(self):
        auth.HashPool(reactor).stop()


class SlowAuthenticator:
    """Checks that answer only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, defer.Deferred]] = []

    def isReserved(self, user: str) -> bool:
        return user == "ann"

    def check(self, user: str, password: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((user, password, d))
        return d


class FailureLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.registry = Registry()
        self.limit = auth.FailureLimit(self.clock, rate=0.1, burst=3, overallRate=0,
                                       registry=self.registry, service="test")
        self.inner = SlowAuthenticator()
        self.users = auth.Limited(self.inner, self.limit)

    def refused(self, reason):
        return self.registry.get("netsvc_password_checks_refused_total").labels(service="test", reason=reason).value

    def test_parallelAttemptsReserveFirst(self):
        """10 checks at once from one address against a slow check: only the burst (3) is checked."""
        pending = [self.users.check("ann", "wrong", client="192.0.2.1") for _ in range(10)]
        self.assertEqual(len(self.inner.calls), 3)
        refused = [self.successResultOf(d) for d in pending[3:]]
        self.assertTrue(all(isinstance(r, auth.Refused) and r.reason == "rate" for r in refused))
        self.assertGreaterEqual(refused[0].retryAfter, 1)
        self.assertEqual(self.refused("rate"), 7)
        for _, _, d in self.inner.calls:
            d.callback(False)
        self.assertEqual([self.successResultOf(d) for d in pending[:3]], [False] * 3)
        # still spent after the failures; another address is not affected
        self.assertIsInstance(self.successResultOf(self.users.check("ann", "x", client="192.0.2.1")), auth.Refused)
        self.users.check("ann", "x", client="192.0.2.2")
        self.assertEqual(len(self.inner.calls), 4)
        # and it refills with time
        self.clock.advance(10)
        self.users.check("ann", "x", client="192.0.2.1")
        self.assertEqual(len(self.inner.calls), 5)

    def test_successRefunds(self):
        for _ in range(5):
            d = self.users.check("ann", "right", client="192.0.2.1")
            self.inner.calls[-1][2].callback(True)
            self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.limit.perClient.available("192.0.2.1"), 3)
        for _ in range(3):  # the whole burst is still there for failures
            self.users.check("ann", "wrong", client="192.0.2.1")
        self.assertEqual(len(self.inner.calls), 8)
        self.assertIsInstance(self.successResultOf(self.users.check("ann", "x", client="192.0.2.1")), auth.Refused)

    def test_busyRefundsAndIsCounted(self):
        d = self.users.check("ann", "pw", client="192.0.2.1")
        self.inner.calls[-1][2].callback(auth.Refused("busy"))
        self.assertEqual(self.successResultOf(d).reason, "busy")
        self.assertEqual(self.limit.perClient.available("192.0.2.1"), 3)
        self.assertEqual(self.refused("busy"), 1)

    def test_errorIsAFailure(self):
        d = self.users.check("ann", "pw", client="192.0.2.1")
        self.inner.calls[-1][2].errback(RuntimeError("boom"))
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.limit.perClient.available("192.0.2.1"), 2)

    def test_overallLimit(self):
        limit = auth.FailureLimit(self.clock, rate=0.1, burst=3, overallRate=1, overallBurst=4)
        users = auth.Limited(self.inner, limit)
        for i in range(6):
            users.check("ann", "wrong", client=f"192.0.2.{i}")
        self.assertEqual(len(self.inner.calls), 4)
        # a client refused by the overall limit keeps its own allowance
        self.assertEqual(limit.perClient.available("192.0.2.5"), 3)
        self.assertTrue(users.isReserved("ann"))


class ChatAuthorityTests(unittest.TestCase):
    def test_limitedNickPasswords(self):
        """chat.auth.limited: FAILURE_BURST wrong nickname passwords per address are hashed, then Refused("rate")."""
        from netsvc.chat import auth as chatauth

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("ann:scrypt:00:00\n")
        calls = []

        def verify(password, stored):
            calls.append(password)
            return defer.succeed(False)

        registry = Registry()
        authority = chatauth.limited(chatauth.PasswordFile(path, verify=verify), Clock(), registry)
        self.assertTrue(authority.isReserved("ANN"))
        answers = [self.successResultOf(authority.check("ann", "wrong", client="192.0.2.1")) for _ in range(8)]
        self.assertEqual(len(calls), chatauth.FAILURE_BURST)
        self.assertEqual(answers[:chatauth.FAILURE_BURST], [False] * chatauth.FAILURE_BURST)
        self.assertTrue(all(isinstance(a, auth.Refused) for a in answers[chatauth.FAILURE_BURST:]))
        self.assertEqual(registry.get("netsvc_password_checks_refused_total")
                         .labels(service="chat", reason="rate").value, 3)
        self.assertIs(self.successResultOf(authority.check("ann", "wrong", client="192.0.2.2")), False)


class PoolMetricsTests(unittest.TestCase):
    def test_countInto(self):
        gate = Gate()
        pool = auth.HashPool(reactor, threads=1, queue=0, verify=gate)
        self.addCleanup(pool.stop)
        self.addCleanup(gate.open)
        pool.verify("a", "x")
        pool.verify("b", "x")  # busy
        registry = Registry()
        pool.countInto(registry)
        pool.countInto(registry)
        pool.verify("c", "x")  # busy
        text = registry.render()
        self.assertIn("netsvc_password_hashes_total 1", text)
        self.assertIn("netsvc_password_hash_busy_total 2", text)
        self.assertIn("netsvc_password_hash_pending 1", text)
