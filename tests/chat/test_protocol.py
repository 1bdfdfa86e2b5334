"""Chat wire behaviour for both framings, on in-memory transports."""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from netsvc.auth import Refused
from netsvc.chat.hub import Hub
from netsvc.chat.protocol import FRAMINGS, ChatFactory, ChatLimits, ChatMetrics, ChatShared, Flusher
from netsvc.metrics import Registry


class Room:
    """A hub with factories for both framings, and clients connected over StringTransports."""

    def __init__(self, limits=None, authority=None):
        self.clock = MemoryReactorClock()
        self.registry = Registry()
        self.metrics = ChatMetrics(self.registry)
        self.hub = Hub(historySize=10, authority=authority, onEvent=self.metrics.onHubEvent)
        self.flusher = Flusher(self.clock)
        self.limits = limits or ChatLimits(maxLine=100, maxOutput=1000, rate=100, burst=100)
        self.port = 40000

    def connect(self, framing="line", host="127.0.0.1"):
        factory = self.factory(framing)
        proto = factory.buildProtocol(None)
        self.port += 1
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, self.port))
        transport.abortConnection = lambda: setattr(transport, "aborted", True)
        proto.makeConnection(transport)
        self.flush()
        transport.clear()
        return proto, transport

    def flush(self):
        self.clock.advance(0)

    def send(self, proto, transport, data):
        """Feed C{data} to C{proto}; what its client received meanwhile."""
        proto.dataReceived(data)
        self.flush()
        out = transport.value()
        transport.clear()
        return out

    def factory(self, framing):
        shared = ChatShared(self.hub, self.flusher, self.limits, self.clock, self.metrics)
        return ChatFactory(shared, FRAMINGS[framing])


class LineFramingTests(unittest.TestCase):
    def setUp(self):
        self.room = Room()
        self.proto, self.t = self.room.connect("line")

    def send(self, data):
        return self.room.send(self.proto, self.t, data)

    def test_messageEchoedToRoom(self):
        self.assertEqual(self.send(b"hello\n"), b"<127.0.0.1:40001> hello\n")

    def test_splitAndCoalesced(self):
        self.assertEqual(self.send(b"hel"), b"")
        self.assertEqual(self.send(b"lo\r\nwor"), b"<127.0.0.1:40001> hello\n")
        self.assertEqual(self.send(b"ld\nagain\n"), b"<127.0.0.1:40001> world\n<127.0.0.1:40001> again\n")

    def test_emptyLinesIgnored(self):
        self.assertEqual(self.send(b"\n\r\n   \n"), b"")

    def test_slashEscape(self):
        self.assertEqual(self.send(b"//etc/hosts is a file\n"), b"<127.0.0.1:40001> /etc/hosts is a file\n")

    def test_invalidUTF8(self):
        self.assertEqual(self.send(b"caf\xe9\n"), b"*** error: message is not valid UTF-8; dropped\n")
        self.assertEqual(self.room.metrics.drop("invalid_utf8").value, 1)
        self.assertEqual(self.send(b"caf\xc3\xa9\n"), "<127.0.0.1:40001> café\n".encode())

    def test_overlongLineInPieces(self):
        out = self.send(b"x" * 60) + self.send(b"x" * 60)
        self.assertEqual(out, b"*** error: message longer than 100 bytes; dropped\n")
        self.assertEqual(self.send(b"x" * 500), b"")  # still the same line: one notice only
        self.assertEqual(self.send(b"tail\nnext\n"), b"<127.0.0.1:40001> next\n")
        self.assertFalse(self.t.disconnecting)

    def test_overlongLineInOneChunk(self):
        out = self.send(b"y" * 150 + b"\nok\n")
        self.assertEqual(out, b"*** error: message longer than 100 bytes; dropped\n<127.0.0.1:40001> ok\n")

    def test_commands(self):
        self.assertEqual(self.send(b"/nick alice\n"), b"*** 127.0.0.1:40001 is now known as alice\n")
        self.assertEqual(self.send(b"/me waves\n"), b"* alice waves\n")
        self.assertEqual(self.send(b"/who\n"), b"*** 1 in #lobby: alice\n")
        self.assertEqual(self.send(b"/join dev\n"), b"*** alice joined #dev\n")
        self.assertEqual(self.send(b"/topic x y\n"), b"*** alice set the topic of #dev: x y\n")
        self.assertEqual(self.send(b"/rooms\n"), b"*** #dev (1): x y\n*** #lobby (0)\n")
        self.assertEqual(self.send(b"/frob\n"), b"*** error: unknown command /frob; /help lists them\n")
        self.assertEqual(self.send(b"/msg\n"), b"*** error: usage: /msg NICK text\n")
        self.assertIn(b"/nick NAME", self.send(b"/help\n"))

    def test_quit(self):
        other, ot = self.room.connect()
        self.t.clear()
        self.assertEqual(self.send(b"/quit gone fishing\n"), b"*** bye\n")
        self.assertTrue(self.t.disconnecting)
        self.room.flush()
        self.assertEqual(ot.value(), b"*** 127.0.0.1:40001 left (quit: gone fishing)\n")

    def test_halfCloseAnswersThenQuits(self):
        other, ot = self.room.connect()
        self.t.clear()
        self.proto.dataReceived(b"last words\n")
        self.proto.readConnectionLost()
        self.assertEqual(self.t.value(), b"<127.0.0.1:40001> last words\n")
        self.assertTrue(self.t.disconnecting)
        self.room.flush()
        self.assertIn(b"127.0.0.1:40001 left (disconnected)", ot.value())

    def test_abruptResetAnnounced(self):
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        other, ot = self.room.connect()
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.room.flush()
        self.assertEqual(ot.value(), b"*** 127.0.0.1:40001 left (connection reset)\n")


class NulFramingTests(unittest.TestCase):
    """The books' protocol: text\\0 in, 'name: text\\0' to everyone in the room, sender included."""

    def setUp(self):
        self.room = Room()
        self.a, self.at = self.room.connect("nul")
        self.b, self.bt = self.room.connect("nul")
        self.at.clear()

    def test_deliveredToEveryoneIncludingSender(self):
        self.a.dataReceived("héllo\0".encode())
        self.room.flush()
        expected = "127.0.0.1:40001: héllo\0".encode()
        self.assertEqual(self.at.value(), expected)
        self.assertEqual(self.bt.value(), expected)

    def test_splitCoalescedAndEmpty(self):
        self.a.dataReceived(b"on")
        self.a.dataReceived(b"e\0\0two\0")
        self.room.flush()
        self.assertEqual(self.bt.value(), b"127.0.0.1:40001: one\x00127.0.0.1:40001: two\0")

    def test_nicknameUsedOnceSet(self):
        self.a.dataReceived(b"/nick ann\0hi\0")
        self.room.flush()
        self.assertEqual(self.bt.value(), b"*** 127.0.0.1:40001 is now known as ann\0ann: hi\0")

    def test_lineAndNulClientsShareTheRoom(self):
        c, ct = self.room.connect("line")
        self.bt.clear()
        c.dataReceived(b"from line\n")
        self.a.dataReceived(b"from nul\0")
        self.room.flush()
        self.assertEqual(self.bt.value(), b"127.0.0.1:40003: from line\x00127.0.0.1:40001: from nul\0")
        self.assertEqual(ct.value(), b"<127.0.0.1:40003> from line\n<127.0.0.1:40001> from nul\n")

    def test_invalidUTF8(self):
        self.a.dataReceived(b"\xff\xfe\0")
        self.room.flush()
        self.assertEqual(self.at.value(), b"*** error: message is not valid UTF-8; dropped\0")
        self.assertEqual(self.bt.value(), b"")


class LimitTests(unittest.TestCase):
    def test_floodWarnThenKick(self):
        room = Room(ChatLimits(rate=1, burst=2, strikes=3, strikeWindow=30))
        proto, t = room.connect()
        other, ot = room.connect()
        proto.dataReceived(b"1\n2\n3\n")
        room.flush()
        self.assertIn(b"*** warning: too many messages (max 1/s)", t.value())
        self.assertFalse(t.disconnecting)
        proto.dataReceived(b"4\n5\n6\n")
        room.flush()
        self.assertTrue(t.disconnecting)
        self.assertTrue(t.value().endswith(b"*** disconnected: flooding\n"))
        self.assertIn(b"127.0.0.1:40001 left (kicked: flooding)", ot.value())
        self.assertEqual(room.metrics.kick("flooding").value, 1)
        self.assertEqual(ot.value().count(b"<127.0.0.1:40001>"), 2)  # only the burst got through

    def test_floodStrikesForgiven(self):
        room = Room(ChatLimits(rate=1, burst=1, strikes=2, strikeWindow=10))
        proto, t = room.connect()
        proto.dataReceived(b"a\nb\n")  # one strike
        room.clock.advance(20)
        proto.dataReceived(b"c\nd\n")  # a new strike, after the window: not the second
        self.assertFalse(t.disconnecting)

    def test_slowReaderDisconnectedOthersUnaffected(self):
        room = Room(ChatLimits(maxOutput=200, rate=1000, burst=1000))
        slow, st = room.connect()
        talker, tt = room.connect()
        slow.pauseProducing()  # what the transport does when the client stops reading
        for _ in range(10):
            talker.dataReceived(b"x" * 30 + b"\n")
        room.flush()
        self.assertTrue(getattr(st, "aborted", False))
        self.assertEqual(room.metrics.drop("slow_reader").value, 1)
        self.assertIn(b"left (kicked: too slow to read)", tt.value())
        self.assertEqual(tt.value().count(b"x" * 30), 10)

    def test_pausedReaderCatchesUp(self):
        room = Room()
        reader, rt = room.connect()
        talker, _ = room.connect()
        rt.clear()
        reader.pauseProducing()
        talker.dataReceived(b"while paused\n")
        room.flush()
        self.assertEqual(rt.value(), b"")
        reader.resumeProducing()
        self.assertEqual(rt.value(), b"<127.0.0.1:40002> while paused\n")

    def test_refusalSaysWhy(self):
        room = Room()
        proto = room.factory("nul").refusalProtocol("max_connections_per_ip")
        t = StringTransport()
        proto.makeConnection(t)
        self.assertEqual(t.value(), b"*** server busy (max connections per ip); try later\0")
        self.assertTrue(t.disconnecting)

    def test_idleTimeoutAndDrainSayGoodbye(self):
        room = Room()
        a, at = room.connect()
        a.timedOut()
        self.assertTrue(at.value().endswith(b"*** disconnected: idle timeout\n"))
        b, bt = room.connect()
        b.drain()
        self.assertTrue(bt.value().endswith(b"*** server shutting down\n"))
        self.assertTrue(bt.disconnecting)


class ReservedNickTests(unittest.TestCase):
    class Authority:
        def isReserved(self, nick):
            return nick.lower() == "admin"

        def __init__(self):
            self.clients = []

        def check(self, nick, password, client=None):
            self.clients.append(client)
            if password == "busy":
                return defer.succeed(Refused("busy", 1.0))
            return defer.succeed(password == "s3cret")

    def setUp(self):
        self.room = Room(authority=self.Authority())
        self.proto, self.t = self.room.connect()

    def send(self, data):
        return self.room.send(self.proto, self.t, data)

    def test_reservedNeedsPassword(self):
        self.assertEqual(self.send(b"/nick admin\n"),
                         b"*** error: nickname admin is reserved: /nick admin PASSWORD\n")
        self.assertEqual(self.send(b"/nick admin wrong\n"), b"*** error: wrong password for admin\n")
        self.assertEqual(self.send(b"/nick admin s3cret\n"), b"*** 127.0.0.1:40001 is now known as admin\n")

    def test_checkedForTheClientAddress(self):
        """The address (without port) is what failures are counted against."""
        self.send(b"/nick admin wrong\n")
        self.assertEqual(self.room.hub.authority.clients, ["127.0.0.1"])

    def test_busyHashingPool(self):
        self.assertEqual(self.send(b"/nick admin busy\n"), b"*** error: busy, try again later\n")

    def test_tooManyAttempts(self):
        """Behind chat's failure limit: five wrong passwords, then 'try again' without a check; others still pass."""
        from netsvc.chat.auth import limited

        counting = self.Authority()
        self.room.hub.authority = limited(counting, self.room.clock)
        answers = [self.send(b"/nick admin wrong\n") for _ in range(20)]
        self.assertEqual(len(counting.clients), 5)
        self.assertEqual(answers[:5], [b"*** error: wrong password for admin\n"] * 5)
        self.assertEqual(answers[5:], [b"*** error: too many attempts, try again in 10 s\n"] * 15)
        self.assertEqual(self.send(b"/nick admin s3cret\n"), b"*** error: too many attempts, try again in 10 s\n")
        other, ot = self.room.connect(host="127.0.0.2")
        self.assertEqual(self.room.send(other, ot, b"/nick admin s3cret\n"),
                         b"*** 127.0.0.2:40002 is now known as admin\n")
        self.assertEqual(len(counting.clients), 6)

    def test_freeNicksNeedNone(self):
        self.assertEqual(self.send(b"/nick guest\n"), b"*** 127.0.0.1:40001 is now known as guest\n")
