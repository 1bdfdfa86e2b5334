"""
The hub's cluster paths (netsvc.chat.hub.Cluster) with a fake cluster whose
answers the test gives: nickname claims in flight, failures, members leaving
meanwhile, remote private messages, /who and /rooms -- no Redis needed.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from netsvc.chat.hub import Event, Hub, LocalFanOut


class Member:
    def __init__(self, address="10.0.0.1:1"):
        self.nick = None
        self.room = None
        self.address = address
        self.got = []

    def deliver(self, event):
        self.got.append((event.kind, event.text))

    def notices(self):
        return [t for k, t in self.got if k == "notice"]


class FakeCluster(LocalFanOut):
    distributed = True

    def __init__(self):
        self.claims = {}
        self.released = []
        self.entered_ = []
        self.sent = []
        self.topics = []
        self.published = []  # (room, text) of every event that would go to the other nodes

    def publish(self, room, event, exclude=None):
        self.published.append((room.name, event.text))
        return super().publish(room, event, exclude)

    def attach(self, hub):
        self.hub = hub

    loadingRooms = ()

    def entered(self, member, room):
        self.entered_.append((member, room.name))
        return room.name in self.loadingRooms

    def left(self, member, room):
        pass

    def claimNick(self, member, nick):
        d = self.claims[nick] = defer.Deferred()
        return d

    def renamed(self, member, old):
        if old is not None:
            self.released.append(old)

    def privmsg(self, member, nick, text):
        d = defer.Deferred()
        self.sent.append((nick, text, d))
        return d

    def setTopic(self, room, text):
        self.topics.append((room.name, text))

    def who(self, room):
        return defer.succeed(["zed", "Amy", "bob"])

    def roomList(self):
        return defer.succeed([("#b", 1, ""), ("#lobby", 3, "")])


class ClusterHubTests(unittest.TestCase):
    def setUp(self):
        self.cluster = FakeCluster()
        self.hub = Hub(fanOut=self.cluster)
        self.a, self.b = Member(), Member("10.0.0.2:2")
        self.hub.connect(self.a)
        self.hub.connect(self.b)

    def test_nickHeldWhileClaimed(self):
        self.hub.setNick(self.a, "alice")
        self.assertIsNone(self.a.nick)
        with self.assertRaisesRegex(Exception, "nickname Alice is taken"):
            self.hub.setNick(self.b, "Alice")  # held here while the cluster decides
        self.cluster.claims["alice"].callback(True)
        self.assertEqual(self.a.nick, "alice")
        self.assertIn("10.0.0.1:1 is now known as alice", self.b.notices())

    def test_claimRefusedElsewhere(self):
        self.hub.setNick(self.a, "alice")
        self.cluster.claims["alice"].callback(False)
        self.assertIsNone(self.a.nick)
        self.assertIn("error: nickname alice is taken", self.a.notices())
        self.hub.setNick(self.b, "alice")  # free here again: another claim goes out
        self.assertIn("alice", self.cluster.claims)

    def test_clusterUnreachable(self):
        self.hub.setNick(self.a, "alice")
        self.cluster.claims["alice"].errback(ConnectionError("Redis unreachable"))
        self.assertIsNone(self.a.nick)
        self.assertIn("error: cannot claim alice now (chat cluster unreachable); try again", self.a.notices())
        self.assertNotIn("alice", self.hub.claiming)

    def test_leftWhileClaimingReleases(self):
        self.hub.setNick(self.a, "alice")
        self.hub.disconnect(self.a)
        self.cluster.claims["alice"].callback(True)
        self.assertEqual(self.cluster.released, ["alice"])
        self.assertNotIn("alice", self.hub.nicks)

    def test_renameReleasesOld(self):
        self.hub.setNick(self.a, "alice")
        self.cluster.claims["alice"].callback(True)
        self.hub.setNick(self.a, "alicia")
        self.cluster.claims["alicia"].callback(True)
        self.assertEqual(self.cluster.released, ["alice"])
        self.hub.setNick(self.a, "Alicia")  # case only: already ours, no claim, nothing released
        self.assertEqual(self.a.nick, "Alicia")
        self.assertEqual(self.cluster.released, ["alice"])
        self.hub.disconnect(self.a)
        self.assertEqual(self.cluster.released, ["alice", "Alicia"])

    def test_remotePrivateMessage(self):
        self.hub.privmsg(self.a, "carol", "hi")
        nick, text, d = self.cluster.sent[0]
        self.assertEqual((nick, text), ("carol", "hi"))
        d.callback("Carol")
        self.assertIn(("sent", "hi"), self.a.got)
        self.hub.privmsg(self.a, "nobody", "hi")
        self.cluster.sent[1][2].callback(None)
        self.assertIn("error: no such nickname: nobody", self.a.notices())

    def test_localPrivateMessageStaysLocal(self):
        self.hub.setNick(self.b, "bob")
        self.cluster.claims["bob"].callback(True)
        self.hub.privmsg(self.a, "BOB", "psst")
        self.assertEqual(self.cluster.sent, [])
        self.assertIn(("private", "psst"), self.b.got)

    def test_whoAndRoomsFromTheCluster(self):
        self.assertEqual(self.successResultOf(self.hub.who(self.a)), ["Amy", "bob", "zed"])
        self.assertEqual([r[0] for r in self.successResultOf(self.hub.roomList())], ["#b", "#lobby"])

    def test_topicTold(self):
        self.hub.topic(self.a, "hello")
        self.assertEqual(self.cluster.topics, [("#lobby", "hello")])


    def test_joinShownOnceTheRoomIsReadyHere(self):
        self.cluster.loadingRooms = ("#new",)
        self.hub.join(self.b, "#new")
        self.hub.join(self.a, "#new")
        self.assertNotIn("10.0.0.1:1 joined #new", self.a.notices())  # not before it is subscribed here
        # Nor to the others (here or on other nodes): an answer to it could not reach this node yet.
        self.assertNotIn("10.0.0.1:1 joined #new", self.b.notices())
        self.assertNotIn(("#new", "10.0.0.1:1 joined #new"), self.cluster.published)
        self.hub.rooms["#new"].history.append(Event("message", "old", "x"))
        self.hub.settled(self.a, self.hub.rooms["#new"])
        self.assertEqual(self.a.got[-2:], [("notice", "10.0.0.1:1 joined #new"), ("message", "old")])
        self.assertIn("10.0.0.1:1 joined #new", self.b.notices())  # everyone is told once it is ready
        self.assertIn(("#new", "10.0.0.1:1 joined #new"), self.cluster.published)
        self.hub.join(self.a, "#other")
        before = list(self.a.got)
        self.hub.settled(self.a, self.hub.rooms["#new"])  # moved on meanwhile: nothing
        self.assertEqual(self.a.got, before)


class LocalHubUnchangedTests(unittest.TestCase):
    def test_synchronousAnswers(self):
        hub = Hub()
        self.assertIsNone(hub.cluster)
        a = Member()
        hub.connect(a)
        self.assertIsNone(hub.setNick(a, "alice"))
        self.assertEqual(a.nick, "alice")
        self.assertEqual(hub.who(a), ["alice"])
        self.assertEqual(hub.roomList(), [("#lobby", 1, "")])
