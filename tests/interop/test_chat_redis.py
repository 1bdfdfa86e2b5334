"""
Chat across two real daemons (C{twistd -n netsvc}, two processes) sharing rooms
through a real redis-server: clients on each see one room, private messages and
nickname uniqueness hold across them, Redis dies and comes back mid-conversation,
and a node killed with SIGKILL frees its nicknames after nick_ttl.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from twisted.trial import unittest

from tests.chat._redis import RedisServer
from tests.interop._daemon import IO_TIMEOUT, startNetsvc

LINE = "services.chat.listen[0]"


class LineClient:
    """A chat user on a plain TCP socket, as nc would be."""

    def __init__(self, testCase, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        testCase.addCleanup(self.sock.close)
        self.buffer = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def expect(self, marker: str, timeout: float = IO_TIMEOUT) -> str:
        """Read until C{marker}; everything up to it (what follows stays for the next read)."""
        wanted = marker.encode()
        deadline = time.monotonic() + timeout
        while wanted not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{marker!r} not received in {timeout}s; got {self.buffer!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"closed before {marker!r}; got {self.buffer!r}")
            self.buffer += chunk
        at = self.buffer.index(wanted) + len(wanted)
        got, self.buffer = self.buffer[:at], self.buffer[at:]
        return got.decode()

    def quiet(self, seconds: float = 0.5) -> str:
        """What else arrives within C{seconds}."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            self.buffer += chunk
        got, self.buffer = self.buffer, b""
        return got.decode()


class ChatOverRedisTests(unittest.TestCase):
    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.nodes = [self.startNode(name) for name in ("a", "b")]

    def startNode(self, name: str):
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        config = base / "netsvc.yaml"
        config.write_text(
            "state_dir: state\n"
            "drain_timeout: 1s\n"
            "services:\n"
            "  chat:\n"
            '    listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'    fanout: {{redis: "{self.redis.endpoint}", nick_ttl: 3s, timeout: 2s}}\n')
        daemon = startNetsvc(self, config, base / "state", cwd=base)
        self.assertTrue(daemon.waitForOutput("chat: connected to Redis", 10), daemon.output())
        return daemon

    def user(self, node, nick: str | None) -> LineClient:
        c = LineClient(self, node.port(LINE))
        c.expect("joined #lobby\n")
        if nick:
            c.send(f"/nick {nick}")
            c.expect(f"is now known as {nick}\n")
        return c

    def test_oneRoomAcrossProcesses(self) -> None:
        a, b = self.nodes
        alice, bob = self.user(a, "alice"), self.user(b, "bob")
        alice.send("/join #ops")
        alice.expect("alice joined #ops\n")
        bob.send("/join #ops")
        alice.expect("bob joined #ops\n")
        alice.send("disk full on db1")
        bob.expect("<alice> disk full on db1\n")
        bob.send("/me looks")
        alice.expect("* bob looks\n")
        alice.send("/msg bob call me")
        bob.expect("*alice* call me\n")
        bob.send("/who")
        bob.expect("2 in #ops: alice, bob\n")
        self.assertNotIn("disk full", bob.quiet() + alice.quiet().replace("<alice> disk full on db1\n", "", 1))
        intruder = self.user(b, None)
        intruder.send("/nick ALICE")
        intruder.expect("error: nickname ALICE is taken\n")
        self.assertIn(f"{a.process.pid}", a.output())  # the log names the node's process
        self.assertEqual(self.redis.command(b"GET", b"netsvc:chat:nick:alice")[:1], b"$")

    def test_redisRestartMidConversation(self) -> None:
        a, b = self.nodes
        alice, ann, bob = self.user(a, "alice"), self.user(a, "ann"), self.user(b, "bob")
        alice.send("before")
        bob.expect("<alice> before\n")
        self.redis.stop()
        self.assertTrue(a.waitForOutput("chat: lost Redis at 127.0.0.1:", 10), a.output())
        alice.send("during")
        ann.expect("<alice> during\n")  # local delivery goes on
        self.redis.start()
        self.assertTrue(a.waitForOutput("is back; rooms are shared again", 15), a.output())
        self.assertTrue(b.waitForOutput("is back; rooms are shared again", 15), b.output())
        alice.send("after")
        got = bob.expect("<alice> after\n")
        self.assertNotIn("during", got)  # pub/sub has no replay: said during the outage stays local
        self.assertNotIn("after", bob.quiet() + ann.quiet().replace("<alice> after\n", "", 1))
        self.assertTrue(a.running() and b.running())

    def test_killedNodeFreesItsNicks(self) -> None:
        a, b = self.nodes
        self.user(a, "alice")
        other = self.user(b, None)
        a.signal(signal.SIGKILL)
        a.waitForExit(5)
        other.send("/nick alice")
        other.expect("error: nickname alice is taken\n")  # until nick_ttl (3s) passes
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.5)
            other.send("/nick alice")
            got = other.expect("\n")
            if "is now known as alice" in got:
                break
            self.assertLess(time.monotonic(), deadline, got)
        other.send("/who")
        other.expect("1 in #lobby: alice\n")
