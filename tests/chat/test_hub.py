"""The hub: rooms, nicknames, private messages, topics, history, presence."""

from twisted.trial import unittest

from netsvc.chat.hub import LOBBY, ChatError, Hub


class FakeMember:
    def __init__(self, address):
        self.address = address
        self.nick = None
        self.room = None
        self.events = []

    def deliver(self, event):
        self.events.append(event)

    def texts(self, kind=None):
        return [e.text for e in self.events if kind is None or e.kind == kind]

    def clear(self):
        self.events = []


class HubTests(unittest.TestCase):
    def setUp(self):
        self.hub = Hub(historySize=3)
        self.a, self.b, self.c = FakeMember("10.0.0.1:1"), FakeMember("10.0.0.2:2"), FakeMember("10.0.0.3:3")
        for m in (self.a, self.b, self.c):
            self.hub.connect(m)

    def test_everyoneStartsInTheLobby(self):
        self.assertEqual(self.a.room.name, LOBBY)
        self.assertEqual(self.a.texts("notice"), ["10.0.0.1:1 joined #lobby", "10.0.0.2:2 joined #lobby",
                                                  "10.0.0.3:3 joined #lobby"])

    def test_sayReachesTheRoomIncludingTheSender(self):
        self.hub.say(self.a, "hello")
        for m in (self.a, self.b, self.c):
            (event,) = [e for e in m.events if e.kind == "message"]
            self.assertEqual((event.sender, event.text), ("10.0.0.1:1", "hello"))

    def test_roomsAreSeparate(self):
        self.hub.join(self.a, "#dev")
        self.hub.join(self.b, "#DEV")  # names are case-insensitive
        self.c.clear()
        self.hub.say(self.a, "in dev")
        self.assertIn("in dev", self.b.texts("message"))
        self.assertEqual(self.c.texts("message"), [])
        self.assertEqual([r[0] for r in self.hub.roomList()], ["#dev", "#lobby"])

    def test_presence(self):
        self.hub.setNick(self.a, "alice")
        self.hub.join(self.a, "#dev")
        self.hub.disconnect(self.a, "connection reset")
        self.assertIn("10.0.0.1:1 is now known as alice", self.b.texts())
        self.assertIn("alice left for #dev", self.b.texts())
        self.assertNotIn("alice left (connection reset)", self.b.texts())  # b is not in #dev
        self.hub.join(self.b, "#dev")
        self.hub.join(self.c, "#dev")
        self.hub.disconnect(self.c, "connection reset")
        self.assertIn("10.0.0.3:3 left (connection reset)", self.b.texts())

    def test_presenceLimitQuietsBigRooms(self):
        """Past presenceLimit members, joins and leaves are not announced (but the member is told)."""
        hub = Hub(presenceLimit=2)
        a, b, c = FakeMember("10.0.0.1:1"), FakeMember("10.0.0.2:2"), FakeMember("10.0.0.3:3")
        for m in (a, b, c):
            hub.connect(m)
        self.assertEqual(a.texts("notice"), ["10.0.0.1:1 joined #lobby", "10.0.0.2:2 joined #lobby"])
        self.assertEqual(c.texts("notice"), ["10.0.0.3:3 joined #lobby"])  # its own join only
        a.clear()
        hub.disconnect(c, "quit")  # back to 2 members: announced again
        self.assertEqual(a.texts("notice"), ["10.0.0.3:3 left (quit)"])
        self.assertEqual(len(hub.who(a)), 2)
        quiet = Hub(presenceLimit=0)
        d, e = FakeMember("10.0.0.4:4"), FakeMember("10.0.0.5:5")
        quiet.connect(d)
        quiet.connect(e)
        self.assertEqual(d.texts("notice"), ["10.0.0.4:4 joined #lobby"])

    def test_emptyRoomsVanishTheLobbyStays(self):
        self.hub.join(self.a, "#tmp")
        self.hub.part(self.a)
        self.assertEqual([r[0] for r in self.hub.roomList()], ["#lobby"])
        self.assertRaises(ChatError, self.hub.part, self.a)

    def test_nicknamesUniqueAndValid(self):
        self.hub.setNick(self.a, "alice")
        e = self.assertRaises(ChatError, self.hub.setNick, self.b, "ALICE")
        self.assertEqual(str(e), "nickname ALICE is taken")
        for bad in ("1abc", "a b", "", "x" * 31, "al\x00ice", "#room"):
            self.assertRaises(ChatError, self.hub.setNick, self.b, bad)
        self.hub.setNick(self.a, "Alice2")  # the old one is free again
        self.hub.setNick(self.b, "alice")
        self.hub.disconnect(self.b)
        self.hub.setNick(self.c, "alice")  # and freed at disconnect

    def test_privateMessages(self):
        self.hub.setNick(self.b, "bob")
        self.hub.privmsg(self.a, "BOB", "psst")
        self.assertEqual(self.b.events[-1].kind, "private")
        self.assertEqual((self.b.events[-1].sender, self.b.events[-1].text), ("10.0.0.1:1", "psst"))
        self.assertEqual(self.a.events[-1].kind, "sent")
        self.assertEqual(self.c.texts("private"), [])
        self.assertRaises(ChatError, self.hub.privmsg, self.a, "nobody", "x")

    def test_topic(self):
        self.hub.topic(self.a, "lunch at noon")
        self.assertIn("10.0.0.1:1 set the topic of #lobby: lunch at noon", self.b.texts())
        late = FakeMember("10.0.0.9:9")
        self.hub.connect(late)
        self.assertIn("topic of #lobby: lunch at noon", late.texts())

    def test_historyReplayedAndBounded(self):
        for i in range(5):
            self.hub.say(self.a, f"m{i}")
        self.hub.act(self.a, "waves")
        late = FakeMember("10.0.0.9:9")
        self.hub.connect(late)
        replayed = [e for e in late.events if e.replay]
        self.assertEqual([e.text for e in replayed], ["m3", "m4", "waves"])
        self.assertEqual(replayed[-1].kind, "action")

    def test_who(self):
        self.hub.setNick(self.b, "bob")
        self.assertEqual(self.hub.who(self.a), ["10.0.0.1:1", "10.0.0.3:3", "bob"])

    def test_badRoomNames(self):
        for bad in ("dev", "#", "#" + "x" * 33, "#a b"):
            self.assertRaises(ChatError, self.hub.join, self.a, bad)
        self.assertRaises(ChatError, self.hub.join, self.a, "#lobby")  # already there

    def test_maxRooms(self):
        hub = Hub(maxRooms=2)
        m = FakeMember("x:1")
        hub.connect(m)
        hub.join(m, "#one")
        other = FakeMember("y:2")
        hub.connect(other)
        e = self.assertRaises(ChatError, hub.join, other, "#two")
        self.assertIn("too many rooms", str(e))
        hub.join(other, "#one")  # existing rooms are fine
