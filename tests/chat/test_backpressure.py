"""
Back-pressure on chat input, over real loopback sockets (issue 18): a client
that floods while never reading its own output makes the daemon hold a small,
bounded amount for it, for the line and the NUL framings.
"""

import socket
import time

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import port, sleep, startDaemon

CHAT = """
services:
  chat:
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {endpoint: "tcp:0:interface=127.0.0.1", framing: nul}
    max_output: 64KiB
    limits: {rate: %s, burst: %s, max_message: 1KiB}
"""

#: What the daemon may hold for one client: output waiting here and in the transport, unparsed input.
BOUND = 512 * 1024


def held(proto):
    """Bytes the daemon holds for one chat client."""
    tcp = proto.transport.transport  # the guard's transport: the TCP connection
    return (len(proto._buffer) + sum(map(len, proto._out)) + len(tcp.dataBuffer) + tcp._tempDataLen)


class Flooder:
    """A client that sends as fast as the daemon takes it and never reads."""

    def __init__(self, testCase, portNumber):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast: it never reads
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        self.sock.connect(("127.0.0.1", portNumber))
        self.sock.setblocking(False)
        testCase.addCleanup(self.sock.close)
        self.sent = 0
        self.error = None

    @defer.inlineCallbacks
    def flood(self, chunk, limit, seconds, check=None, stall=0.5):
        """
        Send C{chunk} again and again until C{limit} bytes, C{seconds}, an error, or
        the daemon has taken nothing for C{stall} seconds; C{check()} after each step.
        """
        deadline = time.monotonic() + seconds
        lastProgress = time.monotonic()
        pending = memoryview(chunk)
        while self.sent < limit and time.monotonic() < deadline:
            try:
                n = self.sock.send(pending)
                self.sent += n
                pending = pending[n:] if n < len(pending) else memoryview(chunk)  # whole chunks only
                lastProgress = time.monotonic()
            except BlockingIOError:
                if time.monotonic() - lastProgress > stall:
                    return "stalled"
                yield sleep(0.005)
            except OSError as e:
                self.error = e
                return "closed"
            if check is not None:
                check()
        return "limit" if self.sent >= limit else "timeout"

    def drain(self, seconds=5.0):
        """Everything the daemon sent until it closed (or C{seconds})."""
        self.sock.setblocking(True)
        self.sock.settimeout(seconds)
        data = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        return data


class InputBackPressureTests(unittest.TestCase):
    def members(self):
        return list(self.daemon.getServiceNamed("chat").hub.rooms["#lobby"].members)

    @defer.inlineCallbacks
    def assertReadingStops(self, index, delimiter):
        """Flood control off: the daemon stops reading a flooder whose output is not read."""
        self.daemon = startDaemon(self, CHAT % (100000, 100000))
        flooder = Flooder(self, port(self.daemon, index, "chat"))
        yield sleep(0.1)
        (proto,) = self.members()
        most = [0]

        def check():
            most[0] = max(most[0], held(proto))

        outcome = yield flooder.flood(b"m" * 200 + delimiter, 256 << 20, 10.0, check)
        self.assertEqual(outcome, "stalled", f"after {flooder.sent} bytes: {flooder.error}")
        self.assertFalse(proto.gone)
        self.assertTrue(proto.paused)
        self.assertLessEqual(held(proto), BOUND)
        self.assertLessEqual(most[0], BOUND)
        # Another client is still served at once.
        other = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(other.close)
        other.sendall(b"/who\n")
        other.setblocking(False)
        got = b""
        deadline = time.monotonic() + 5
        while b"2 in #lobby" not in got and time.monotonic() < deadline:
            try:
                got += other.recv(65536)
            except BlockingIOError:
                yield sleep(0.01)
        self.assertIn(b"2 in #lobby", got)

    def test_lineFlooderIsNotRead(self):
        return self.assertReadingStops(0, b"\n")

    def test_nulFlooderIsNotRead(self):
        return self.assertReadingStops(1, b"\0")

    @defer.inlineCallbacks
    def assertEmptyFloodKicked(self, index, chunk, end):
        """Bare delimiters say nothing but are a flood all the same: warned, then disconnected."""
        self.daemon = startDaemon(self, CHAT % (5, 10))
        flooder = Flooder(self, port(self.daemon, index, "chat"))
        outcome = yield flooder.flood(chunk, 16 << 20, 10.0)
        self.assertIn(outcome, ("closed", "stalled"))
        got = flooder.drain()
        self.assertTrue(got.endswith(b"*** disconnected: flooding" + end), got[-200:])
        self.assertEqual(self.members(), [])

    def test_emptyLinesFlood(self):
        return self.assertEmptyFloodKicked(0, b" \r\n" * 20000, b"\n")

    def test_emptyNulFramesFlood(self):
        return self.assertEmptyFloodKicked(1, b"\0" * 65536, b"\0")

    @defer.inlineCallbacks
    def test_endlessLineKicked(self):
        """A line that never ends is thrown away as it comes, and costs flood tokens."""
        self.daemon = startDaemon(self, CHAT % (5, 10))
        flooder = Flooder(self, port(self.daemon, 0, "chat"))
        outcome = yield flooder.flood(b"z" * 65536, 64 << 20, 10.0)
        self.assertIn(outcome, ("closed", "stalled"))
        got = flooder.drain()
        self.assertIn(b"*** error: message longer than 1024 bytes; dropped\n", got)
        self.assertTrue(got.endswith(b"*** disconnected: flooding\n"), got[-200:])
