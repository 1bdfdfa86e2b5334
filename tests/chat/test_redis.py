"""
Chat over Redis, in process: two chat services (two hubs, as two nodes would
have) on one real redis-server, with real TCP clients on each.
"""

import socket

from twisted.internet import defer
from twisted.trial import unittest

from tests.chat._redis import RedisServer
from tests.chat.test_service import connect, readUntil
from tests.helpers import port, sleep, startDaemon


def chatConfig(redis: RedisServer, nickTTL: str = "30s") -> str:
    return f"""
services:
  chat:
    listen: ["tcp:0:interface=127.0.0.1"]
    fanout: {{redis: "{redis.endpoint}", nick_ttl: {nickTTL}, timeout: 2s}}
"""


@defer.inlineCallbacks
def waitFor(predicate, timeout=10.0, step=0.05):
    """Wait (without blocking the reactor) until C{predicate()} is true."""
    for _ in range(int(timeout / step)):
        if predicate():
            return
        yield sleep(step)
    raise AssertionError(f"not true within {timeout}s: {predicate}")


class Client:
    """A line-framing chat client over a blocking socket read without blocking the reactor."""

    def __init__(self, testCase, portNumber):
        self.sock = connect(portNumber)
        testCase.addCleanup(self.sock.close)
        self.seen = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    @defer.inlineCallbacks
    def expect(self, marker: bytes, timeout=5.0):
        """Read until C{marker}; returns the text up to and including it (kept: later reads go on from there)."""
        while marker not in self.seen:
            chunk = yield readUntil(self.sock, b"\n", timeout)
            if not chunk:
                raise AssertionError(f"connection closed before {marker!r}; got {self.seen!r}")
            self.seen += chunk
        at = self.seen.index(marker) + len(marker)
        got, self.seen = self.seen[:at], self.seen[at:]
        return got

    @defer.inlineCallbacks
    def drain(self, seconds=0.3):
        """Everything that arrives within C{seconds}."""
        yield sleep(seconds)
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.seen += chunk
        except BlockingIOError:
            pass
        out, self.seen = self.seen, b""
        return out


class TwoNodesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        self.a = startDaemon(self, chatConfig(self.redis))
        self.b = startDaemon(self, chatConfig(self.redis))
        yield waitFor(lambda: self.fanout(self.a).redis.up and self.fanout(self.b).redis.up)

    def fanout(self, daemon):
        return daemon.getServiceNamed("chat").hub.fanOut

    @defer.inlineCallbacks
    def client(self, daemon, nick):
        c = Client(self, port(daemon, 0, "chat"))
        yield c.expect(b"joined #lobby\n")
        if nick:
            c.send(f"/nick {nick}")
            yield c.expect(f"is now known as {nick}\n".encode())
        return c

    @defer.inlineCallbacks
    def test_oneRoomAcrossNodes(self):
        alice = yield self.client(self.a, "alice")
        bob = yield self.client(self.b, "bob")
        alice.send("/join #dev")
        bob.send("/join #dev")
        yield alice.expect(b"bob joined #dev\n")
        alice.send("hello from A")
        seenByBob = yield bob.expect(b"<alice> hello from A\n")
        bob.send("hi from B")
        seenByAlice = yield alice.expect(b"<bob> hi from B\n")
        seenByAlice += yield alice.drain()
        seenByBob += yield bob.drain()
        for transcript in (seenByAlice, seenByBob):  # each once, the sender's own copy included
            self.assertEqual(transcript.count(b"<alice> hello from A\n"), 1, transcript)
            self.assertEqual(transcript.count(b"<bob> hi from B\n"), 1, transcript)
        alice.send("/who")
        yield alice.expect(b"2 in #dev: alice, bob\n")
        bob.send("/rooms")
        yield bob.expect(b"#dev (2)\n")

    @defer.inlineCallbacks
    def test_historyAndTopicFromTheOtherNode(self):
        alice = yield self.client(self.a, "alice")
        alice.send("/join #dev")
        yield alice.expect(b"joined #dev\n")
        alice.send("/topic release on friday")
        alice.send("remember the tests")
        yield alice.expect(b"<alice> remember the tests\n")
        carol = yield self.client(self.b, "carol")
        carol.send("/join #dev")
        got = yield carol.expect(b"remember the tests\n")
        self.assertIn(b"topic of #dev: release on friday\n", got)
        self.assertRegex(got, rb"\[\d\d:\d\d:\d\d\] <alice> remember the tests\n")

    @defer.inlineCallbacks
    def test_privateMessagesAcrossNodes(self):
        alice = yield self.client(self.a, "alice")
        yield self.client(self.b, "bob")
        bob = yield self.client(self.b, "bobby")
        alice.send("/msg BOBBY psst")
        yield bob.expect(b"*alice* psst\n")
        yield alice.expect(b"-> *bobby* psst\n")
        alice.send("/msg nobody hello?")
        yield alice.expect(b"error: no such nickname: nobody\n")

    @defer.inlineCallbacks
    def test_nickUniqueAcrossNodes(self):
        alice = yield self.client(self.a, "alice")
        other = yield self.client(self.b, None)
        other.send("/nick Alice")
        yield other.expect(b"error: nickname Alice is taken\n")
        alice.send("/quit")
        yield alice.expect(b"bye\n")
        yield sleep(0.2)  # the release reaches Redis
        other.send("/nick Alice")
        yield other.expect(b"is now known as Alice\n")

    @defer.inlineCallbacks
    def test_linesAfterNickWaitForTheClaim(self):
        bob = yield self.client(self.b, "bob")
        scripted = Client(self, port(self.a, 0, "chat"))
        yield scripted.expect(b"joined #lobby\n")
        scripted.sock.sendall(b"/nick carl\nfirst\nsecond\n")  # one write, as `printf ... | nc` does
        scripted.sock.shutdown(socket.SHUT_WR)
        got = yield bob.expect(b"<carl> second\n")
        self.assertIn(b"is now known as carl\n<carl> first\n<carl> second\n", got)
        yield bob.expect(b"carl left")

    @defer.inlineCallbacks
    def test_simultaneousClaimsOneWinner(self):
        one = yield self.client(self.a, None)
        two = yield self.client(self.b, None)
        one.send("/nick zed")
        two.send("/nick zed")
        got = (yield one.drain(0.5)) + (yield two.drain(0.1))
        self.assertEqual(got.count(b"is now known as zed"), 2, got)  # each node announces the winner's rename
        self.assertEqual(got.count(b"error: nickname zed is taken"), 1, got)

    @defer.inlineCallbacks
    def test_redisOutageAndBack(self):
        alice = yield self.client(self.a, "alice")
        ann = yield self.client(self.a, "ann")
        bob = yield self.client(self.b, "bob")
        fa, fb = self.fanout(self.a), self.fanout(self.b)
        self.redis.stop()
        yield waitFor(lambda: not fa.redis.up and not fb.redis.up)
        self.assertEqual(fa.metrics.up.value, 0)
        self.assertEqual(fa.metrics.disconnects.value, 1)
        alice.send("while down")
        yield ann.expect(b"<alice> while down\n")  # local delivery goes on
        self.assertGreaterEqual(fa.metrics.skipped.value, 1)
        other = yield self.client(self.a, None)
        other.send("/nick newbie")
        yield other.expect(b"error: cannot claim newbie now (chat cluster unreachable); try again\n")
        other.send("/who")
        yield other.expect(b"chat cluster unreachable")
        self.redis.start()
        yield waitFor(lambda: fa.redis.up and fb.redis.up, timeout=15)
        self.assertEqual(fa.metrics.up.value, 1)
        alice.send("after")
        yield bob.expect(b"<alice> after\n")
        yield ann.expect(b"<alice> after\n")
        rest = (yield bob.drain()) + (yield ann.drain(0.05))
        self.assertNotIn(b"after", rest, "delivered twice after the reconnection")
        self.assertNotIn(b"while down", (yield bob.drain(0.05)))
        # nicks and presence were re-registered on the new (empty) Redis
        intruder = yield self.client(self.b, None)
        intruder.send("/nick alice")
        yield intruder.expect(b"error: nickname alice is taken\n")
        bob.send("/who")
        got = yield bob.expect(b" in #lobby: ")
        got = yield bob.expect(b"\n")
        self.assertIn(b"alice, ann, bob", got)

    @defer.inlineCallbacks
    def test_stoppedNodeReleasesItsNicks(self):
        alice = yield self.client(self.a, "alice")
        del alice
        yield self.a.stopService()
        other = yield self.client(self.b, None)
        other.send("/nick alice")
        yield other.expect(b"is now known as alice\n")
        other.send("/who")
        yield other.expect(b"1 in #lobby: alice\n")


class AuthTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_passwordFromAFile(self):
        redis = RedisServer(self, "--requirepass", "s3cret-pw")
        from pathlib import Path

        secret = Path(self.mktemp())
        secret.write_text("s3cret-pw\n")
        wrong = Path(self.mktemp())
        wrong.write_text("nope\n")
        base = f"""
services:
  chat:
    listen: ["tcp:0:interface=127.0.0.1"]
    fanout: {{redis: "{redis.endpoint}", timeout: 2s, password_file: "{{}}"}}
"""
        refused = []
        from twisted.logger import globalLogPublisher

        def watch(event):
            if "refused this node" in event.get("log_format", ""):
                refused.append(event)

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        good = startDaemon(self, base.replace("{}", str(secret.resolve())))
        bad = startDaemon(self, base.replace("{}", str(wrong.resolve())))
        fanout = good.getServiceNamed("chat").hub.fanOut
        yield waitFor(lambda: fanout.redis.up)
        self.assertEqual(fanout.metrics.up.value, 1)
        yield waitFor(lambda: refused, timeout=5)
        self.assertFalse(bad.getServiceNamed("chat").hub.fanOut.redis.up)
        lonely = Client(self, port(bad, 0, "chat"))  # the refused node still serves its own clients
        yield lonely.expect(b"joined #lobby\n")
        lonely.send("still here")
        yield lonely.expect(b"still here\n")

    def test_unreadablePasswordFile(self):
        from netsvc import config
        from netsvc.runtime import buildDaemon

        settings = config.parse('services: {chat: {fanout: {redis: "tcp:host=127.0.0.1:port=1", '
                                'password_file: /nonexistent/pw}}}', "t.yaml")
        with self.assertRaises(config.ConfigError) as e:
            buildDaemon(settings, configFile="t.yaml")
        self.assertIn("t.yaml: services.chat.fanout.password_file: cannot read /nonexistent/pw", str(e.exception))


class ConfigTests(unittest.TestCase):
    def test_badRedisEndpoint(self):
        from netsvc import config

        with self.assertRaises(config.ConfigError) as e:
            config.parse('services: {chat: {fanout: {redis: "udp:host=127.0.0.1:port=6379"}}}', "t.yaml")
        self.assertIn("services.chat.fanout.redis", str(e.exception))
        with self.assertRaises(config.ConfigError) as e:
            config.parse('services: {chat: {fanout: {redis: "tcp:127.0.0.1"}}}', "t.yaml")
        self.assertIn("needs a port", str(e.exception))

