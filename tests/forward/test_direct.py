"""The direct relay's own parts: which listeners and rules get it, and its connect deadlines."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from netsvc.forward.direct import Deadlines, DirectRelay
from tests.forward._util import Client, connect, echoBackend, fport, startForwarder
from tests.forward.test_stream import rule, tcp


class EligibilityTests(unittest.TestCase):
    """Plain TCP listeners of rules with address backends get it; everything else keeps the Relay."""

    def test_whichListenersAndRules(self):
        port = echoBackend(self)
        path = self.mktemp() + ".sock"
        daemon, svc = startForwarder(
            self,
            f'      - name: plain\n        listen: ["tcp:0:interface=127.0.0.1", "unix:{path}"]\n'
            f'        connect: ["{tcp(port)}"]\n'
            + rule([tcp(port)], "accept_proxy: true", "proxied")
            + rule([f"tcp:host=localhost:port={port}"], name="named")
            + rule([tcp(port)], "bandwidth: {per_rule: 1MiB}", "paced")
            + rule([tcp(port), f"tls:host=127.0.0.1:port={port}"], name="mixed"),
        )
        plain = svc.ruleListeners["plain"].targets
        self.assertEqual([f.direct for f in plain], [True, False])  # the unix listener keeps the Relay
        self.assertTrue(svc.rules["plain"].direct)
        for name in ("named", "paced", "mixed"):
            self.assertFalse(svc.rules[name].direct, name)

    @defer.inlineCallbacks
    def test_acceptProxyListenerBuildsRelays(self):
        daemon, svc = startForwarder(self, rule([tcp(echoBackend(self))], "accept_proxy: true"))
        client = yield connect(fport(daemon), Client())
        client.transport.write(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhi")
        yield client.waitFor(2)
        self.assertNotIsInstance(next(iter(svc.rules["r"].connections)), DirectRelay)
        client.transport.loseConnection()
        yield client.closed


class _Attempt:
    """What Deadlines looks at in a relay: its current attempt, whether it connected."""

    def __init__(self) -> None:
        self.server: object | None = object()
        self.connected = False
        self._finished = False
        self.timedOut = 0

    def connectTimedOut(self) -> None:
        self.timedOut += 1


class DeadlinesTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.deadlines = Deadlines(self.clock)

    def test_expiresInOrderSkippingConnected(self):
        a, b, c = _Attempt(), _Attempt(), _Attempt()
        self.deadlines.add(a, 5)
        self.clock.advance(1)
        self.deadlines.add(b, 5)
        self.deadlines.add(c, 5)
        b.connected = True
        self.clock.advance(4)
        self.assertEqual((a.timedOut, b.timedOut, c.timedOut), (1, 0, 0))
        self.clock.advance(0.5)
        self.assertEqual(c.timedOut, 0)
        self.clock.advance(0.5)
        self.assertEqual((a.timedOut, b.timedOut, c.timedOut), (1, 0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_newAttemptOfTheSameRelay(self):
        """A relay that failed over is timed on its new attempt, not the old one."""
        a = _Attempt()
        self.deadlines.add(a, 5)
        self.clock.advance(3)
        a.server = object()  # the next backend
        self.deadlines.add(a, 5)
        self.clock.advance(2)
        self.assertEqual(a.timedOut, 0)
        self.clock.advance(3)
        self.assertEqual(a.timedOut, 1)

    def test_shorterTimeoutInsertedInOrder(self):
        """A backend with its own shorter timeout= does not wait behind the rule's."""
        slow, fast = _Attempt(), _Attempt()
        self.deadlines.add(slow, 10)
        self.deadlines.add(fast, 1)
        self.clock.advance(1)
        self.assertEqual((slow.timedOut, fast.timedOut), (0, 1))
        self.clock.advance(9)
        self.assertEqual(slow.timedOut, 1)

    def test_connectedFrontEntriesAreDropped(self):
        """The queue does not keep connected attempts (nor their relays) alive."""
        attempts = [_Attempt() for _ in range(100)]
        for a in attempts:
            self.deadlines.add(a, 5)
            a.connected = True
        self.assertEqual(len(self.deadlines.queue), 1)

    def test_stopWaitsForAttemptsInFlight(self):
        a = _Attempt()
        self.deadlines.add(a, 5)
        self.deadlines.stop()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # a still times out
        a.connected = True
        self.deadlines.settle()
        self.assertEqual(self.clock.getDelayedCalls(), [])
