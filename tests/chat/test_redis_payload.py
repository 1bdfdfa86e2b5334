"""
Payloads arriving over Redis are checked at the boundary (issues 18, 21): a bad
one is dropped and counted, and never stops delivery to others or breaks later
joins of its room.
"""

import json

from twisted.internet import defer
from twisted.trial import unittest

from netsvc.chat.redis.fanout import MAX_TEXT, parsePayload
from tests.chat._redis import RedisServer
from tests.chat.test_redis import Client, chatConfig, waitFor
from tests.helpers import port, startDaemon

GOOD = {"o": "node1", "k": "message", "x": "hi", "s": "alice", "r": "#dev", "t": "", "w": 1700000000.5}


class ParsePayloadTests(unittest.TestCase):
    def test_goodEventsPass(self):
        self.assertEqual(parsePayload(json.dumps(GOOD)), GOOD)
        self.assertEqual(parsePayload(json.dumps(dict(GOOD, w=1700000000)))["w"], 1700000000.0)
        topic = {"o": "n", "c": "topic", "r": "#dev", "x": "lunch"}
        self.assertEqual(parsePayload(json.dumps(topic)), topic)
        private = {"o": "n", "k": "private", "to": "bob", "s": "alice", "x": "psst", "w": 1.0}
        self.assertEqual(parsePayload(json.dumps(private).encode()), private)

    def test_badPayloadsAreNone(self):
        bad = [dict(GOOD, w=w) for w in ("abc", "1700000000", None, True, [1], -1, 1e300)]
        bad += [dict(GOOD, x=x) for x in (1, None, ["a"], "x" * (MAX_TEXT + 1))]
        bad += [dict(GOOD, s=1), dict(GOOD, s="s" * 200), dict(GOOD, t=5), dict(GOOD, o=""), dict(GOOD, o=7)]
        bad += [dict(GOOD, r=r) for r in ("dev", "#", 5, None, "#a b")]
        bad += [dict(GOOD, k=k) for k in ("sent", "private", None, 3)]  # private without "to"
        bad += [{k: v for k, v in GOOD.items() if k != drop} for drop in ("o", "w", "r", "k")]
        bad += [{"o": "n", "c": "topic", "r": "nope", "x": "t"}, {"o": "n", "c": "topic", "r": "#a", "x": 5}]
        texts = [json.dumps(b) for b in bad]
        texts += ["", "{", "[1, 2]", "null", "42", '"str"', "[" * 100000, '{"o": "n", "w": NaN}',
                  json.dumps(dict(GOOD)).replace("1700000000.5", "Infinity"), b"\xff\xfe"]
        for text in texts:
            self.assertIsNone(parsePayload(text), text[:80])


class BadPayloadOverRedisTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        self.daemon = startDaemon(self, chatConfig(self.redis))
        self.fanout = self.daemon.getServiceNamed("chat").hub.fanOut
        yield waitFor(lambda: self.fanout.redis.up)

    @defer.inlineCallbacks
    def client(self, room):
        c = Client(self, port(self.daemon, 0, "chat"))
        yield c.expect(b"joined #lobby\n")
        c.send(f"/join {room}")
        yield c.expect(f"joined {room}\n".encode())
        return c

    def publish(self, room, payload, history=True):
        text = json.dumps(payload).encode()
        if history:
            self.redis.command(b"RPUSH", b"netsvc:chat:history:" + room.encode(), text)
        self.redis.command(b"PUBLISH", b"netsvc:chat:room:" + room.encode(), text)

    @defer.inlineCallbacks
    def test_nonNumericTimeBreaksNothing(self):
        """Issue 21: a non-numeric "w" made every later /join of the room fail (and history spread it)."""
        watcher = yield self.client("#dev")
        self.publish("#dev", dict(GOOD, x="bad time", w="abc"))
        self.publish("#dev", dict(GOOD, x="bad text", x2=1, s=["x"]))
        self.publish("#dev", dict(GOOD, x="after the bad ones"))
        got = yield watcher.expect(b"<alice> after the bad ones\n")
        self.assertNotIn(b"bad time", got)
        self.assertNotIn(b"bad text", got)
        late = yield self.client("#dev")  # the replay of the room's history works
        late.send("/who")
        got = yield late.expect(b"2 in #dev")
        self.assertNotIn(b"bad time", got)
        # A node that loads the room from Redis (its history has the bad entries) also works.
        other = startDaemon(self, chatConfig(self.redis))
        yield waitFor(lambda: other.getServiceNamed("chat").hub.fanOut.redis.up)
        c = Client(self, port(other, 0, "chat"))
        yield c.expect(b"joined #lobby\n")
        c.send("/join #dev")
        got = yield c.expect(b"after the bad ones\n")
        self.assertNotIn(b"bad time", got)
        self.assertGreaterEqual(self.fanout.metrics.invalid.value, 2)
        self.assertGreaterEqual(other.getServiceNamed("chat").hub.fanOut.metrics.invalid.value, 2)
