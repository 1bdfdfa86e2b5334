"""The chat service over real loopback sockets."""

import socket
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import port, sleep, startDaemon, stateDir

CHAT = """
services:
  chat:
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {endpoint: "tcp:0:interface=127.0.0.1", framing: nul}
      - "tls:0:interface=127.0.0.1"
    limits: {max_connections_per_ip: 4}
    max_output: 64KiB
"""


def connect(portNumber, timeout=5.0):
    s = socket.create_connection(("127.0.0.1", portNumber), timeout=timeout)
    return s


@defer.inlineCallbacks
def readUntil(sock, marker: bytes, timeout=5.0):
    """Read (without blocking the reactor) until C{marker} has arrived; return everything read."""
    sock.setblocking(False)
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"{marker!r} not received; got {data!r}")
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        except BlockingIOError:
            yield sleep(0.01)
    return data


class ChatServiceTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startDaemon(self, CHAT)
        self.line, self.nul, self.tls = (port(self.daemon, i, "chat") for i in range(3))

    @defer.inlineCallbacks
    def test_lineAndNulClientsTalk(self):
        line = connect(self.line)
        self.addCleanup(line.close)
        yield readUntil(line, b"joined #lobby\n")
        nul = connect(self.nul)
        self.addCleanup(nul.close)
        yield readUntil(nul, b"joined #lobby\0")
        nul.sendall("grüß dich\0".encode())
        got = yield readUntil(nul, b"dich\0")
        name = "127.0.0.1:%d" % nul.getsockname()[1]
        self.assertIn(f"{name}: grüß dich\0".encode(), got)  # the sender gets its own message
        got = yield readUntil(line, b"dich\n")
        self.assertIn(f"<{name}> grüß dich\n".encode(), got)
        line.sendall(b"/nick lin\r\nhello nul\r\n")
        got = yield readUntil(nul, b"hello nul\0")
        self.assertIn(b"lin: hello nul\0", got)

    @defer.inlineCallbacks
    def test_tls(self):
        from twisted.internet import endpoints

        from netsvc.tls import clientCreator
        from tests.helpers import Collector

        creator = clientCreator("localhost", cafile=str(stateDir(self.daemon) / "tls" / "selfsigned.pem"))
        client = Collector()
        yield endpoints.connectProtocol(
            endpoints.wrapClientTLS(creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.tls)),
            client)
        client.transport.write(b"/nick secure\nover tls\n")
        deadline = time.monotonic() + 5
        while b"<secure> over tls\n" not in client.data and time.monotonic() < deadline:
            yield sleep(0.01)
        self.assertIn(b"<secure> over tls\n", client.data)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_perIPLimitRefusalIsANotice(self):
        socks = [connect(self.line) for _ in range(4)]
        for s in socks:
            self.addCleanup(s.close)
            yield readUntil(s, b"joined #lobby\n")
        extra = connect(self.nul)
        self.addCleanup(extra.close)
        got = yield readUntil(extra, b"try later\0")
        self.assertEqual(got, b"*** server busy (max connections per ip); try later\0")

    @defer.inlineCallbacks
    def test_slowReaderIsDisconnectedRoomGoesOn(self):
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", self.line))
        self.addCleanup(slow.close)
        slow.sendall(b"/nick sloth\n")
        talker = connect(self.line)
        self.addCleanup(talker.close)
        yield readUntil(talker, b"joined #lobby\n")
        talker.setblocking(True)
        line = b"x" * 1000 + b"\n"
        got = b""
        # The kernel absorbs up to a few MB (the server's send buffer grows to tcp_wmem's
        # maximum) before our bound of 64 KiB of pending output starts to count.
        for i in range(10000):
            talker.sendall(line)
            if i % 50 == 49:
                got += yield readUntil(talker, b"x\n")
                if b"sloth left (kicked: too slow to read)" in got:
                    break
        if b"sloth left (kicked: too slow to read)" not in got:
            got += yield readUntil(talker, b"sloth left (kicked: too slow to read)")
        svc = self.daemon.getServiceNamed("chat")
        self.assertEqual(len(svc.guard.connections), 1)
        talker.sendall(b"still here\n")
        yield readUntil(talker, b"still here\n")


class ChatClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_pipedInputSentThenLeaves(self):
        import argparse
        import io

        from netsvc.chat.client import chat

        daemon = startDaemon(self, CHAT)
        watcher = connect(port(daemon, 0, "chat"))
        self.addCleanup(watcher.close)
        yield readUntil(watcher, b"joined #lobby\n")
        out = io.StringIO()
        args = argparse.Namespace(host="127.0.0.1", port=port(daemon, 1, "chat"), address="x", tls=False,
                                  cacert=None, insecure=False, timeout=5, nick="bot", room=None,
                                  framing="nul", grace=0.2)

        def feed(keyboard):
            keyboard.dataReceived(b"first\nsecond")
            keyboard.connectionLost(None)  # end of input

        status = yield chat(reactor, args, stdin=feed, out=out)
        self.assertEqual(status, 0)
        seen = yield readUntil(watcher, b"bot left (quit)\n")
        self.assertIn(b"<bot> first\n<bot> second\n", seen)
        self.assertIn("bot: second\n", out.getvalue())
