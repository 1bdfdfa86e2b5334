"""
Isolation in the chat fan-out (issue 18): a kick, a slow reader or a member's
exception inside a delivery never re-enters the delivery loop, never stops the
delivery to the others, and a kicked member is really gone (connection closed,
nickname free).
"""

from twisted.trial import unittest

from netsvc.chat.hub import notice
from netsvc.chat.protocol import ChatLimits
from tests.chat.test_protocol import Room


class Broken:
    """A member whose deliver raises (a bug in one bridge must not reach the others)."""

    address = "broken:1"

    def __init__(self):
        self.nick = None
        self.room = None
        self.calls = 0
        self.broken = False

    def deliver(self, event):
        self.calls += 1
        if self.broken:
            raise ValueError("broken member")


class FanOutReentrancyTests(unittest.TestCase):
    def test_kickingManySlowReadersDoesNotRecurse(self):
        """
        ~200 members near max_output, all paused: one message kicks each of them,
        each kick announces a leave to the rest.  Before, each leave notice was
        published from inside the delivery that kicked (RecursionError, the
        sender's connection lost, nicknames kept, connections left open).
        """
        limits = ChatLimits(maxLine=100, maxOutput=2000, rate=1000, burst=1000)
        room = Room(limits)
        members = []
        for i in range(200):
            proto, transport = room.connect()
            room.hub.setNick(proto, f"slow{i}")
            members.append((proto, transport))
        room.flush()
        for proto, _ in members:
            proto.pauseProducing()  # the client stopped reading
            proto.deliver(notice("x" * (limits.maxOutput - 100)))  # near its bound
        talker, tt = room.connect()
        tt.clear()
        talker.dataReceived(b"y" * 90 + b"\n")  # raised RecursionError before
        room.flush()
        for i, (proto, transport) in enumerate(members):
            self.assertTrue(proto.gone)
            self.assertTrue(getattr(transport, "aborted", False), f"slow{i} was not disconnected")
            self.assertNotIn(f"slow{i}", room.hub.nicks)
            self.assertIsNone(proto.room)
        self.assertEqual(room.metrics.kick("too_slow_to_read").value, 200)
        self.assertFalse(talker.gone)
        self.assertEqual(list(room.hub.rooms["#lobby"].members), [talker])
        out = tt.value()
        self.assertIn(b"y" * 90, out)
        self.assertEqual(out.count(b"left (kicked: too slow to read)"), 200)
        tt.clear()
        self.assertEqual(room.send(talker, tt, b"/nick slow7\n"),  # the nickname is free again
                         b"*** 127.0.0.1:40201 is now known as slow7\n")

    def test_leaveNoticeComesAfterTheMessage(self):
        """A leave caused by a delivery is published once that delivery is over, to everyone left."""
        limits = ChatLimits(maxLine=100, maxOutput=500, rate=1000, burst=1000)
        room = Room(limits)
        first, ft = room.connect()
        slow, st = room.connect()
        last, lt = room.connect()
        for t in (ft, lt):
            t.clear()
        slow.pauseProducing()
        slow.deliver(notice("z" * 480))
        first.dataReceived(b"hello\n")
        room.flush()
        for t in (ft, lt):
            self.assertEqual(t.value(),
                             b"<127.0.0.1:40001> hello\n*** 127.0.0.1:40002 left (kicked: too slow to read)\n")
        self.assertTrue(st.aborted)

    def test_raisingMemberDoesNotStopTheOthers(self):
        room = Room()
        a, at = room.connect()
        broken = Broken()
        room.hub.connect(broken)
        b, bt = room.connect()
        broken.broken = True
        at.clear()
        bt.clear()
        a.dataReceived(b"still here\n")
        room.flush()
        self.assertEqual(bt.value(), b"<127.0.0.1:40001> still here\n*** broken:1 left (delivery failed)\n")
        self.assertEqual(at.value(), bt.value())
        self.assertFalse(a.gone)
        self.assertIsNone(broken.room)  # dropped: not delivered to again
        calls = broken.calls
        room.send(a, at, b"again\n")
        self.assertEqual(broken.calls, calls)
        self.assertEqual(room.metrics.deliveryFailures.value, 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # logged once, with the failure

    def test_raisingPrivateTargetDoesNotHurtTheSender(self):
        room = Room()
        a, at = room.connect()
        broken = Broken()
        room.hub.connect(broken)
        room.hub.setNick(broken, "bug")
        broken.broken = True
        room.flush()
        at.clear()
        out = room.send(a, at, b"/msg bug hi\n")
        self.assertFalse(a.gone)
        self.assertNotIn("bug", room.hub.nicks)
        self.assertIn(b"bug left (delivery failed)", out)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_flusherWriteFailureDoesNotStallOthers(self):
        """One client's transport raising in write must not leave the others' output unsent."""
        room = Room()
        a, at = room.connect()
        b, bt = room.connect()
        c, ct = room.connect()

        def boom(data):
            raise RuntimeError("write failed")

        bt.write = boom
        at.clear()
        ct.clear()
        a.dataReceived(b"hi\n")
        room.flush()
        self.assertIn(b"<127.0.0.1:40001> hi\n", ct.value())
        self.assertTrue(b.gone)
        self.assertTrue(getattr(bt, "aborted", False))
        self.assertIn(b"127.0.0.1:40002 left (kicked: delivery failed)", ct.value())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(room.metrics.deliveryFailures.value, 1)
        ct.clear()
        a.dataReceived(b"later\n")
        room.flush()
        self.assertEqual(ct.value(), b"<127.0.0.1:40001> later\n")
