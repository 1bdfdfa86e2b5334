"""
The browser chat's WebSocket, served through the web service, against clients
that misbehave (issues 18 and 22): a socket that closes during the welcome, a
client that never reads.
"""

import socket
import struct
import time

from twisted.internet import defer
from twisted.trial import unittest

from tests.chat.test_backpressure import BOUND
from tests.helpers import port, sleep
from tests.web._support import PLAIN, startWeb, webPort

CHAT = ('  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n    max_output: 64KiB\n'
        '    limits: {rate: 100000, burst: 100000}\n')


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One masked client frame (RFC 6455 5.2)."""
    mask = b"\x11\x22\x33\x44"
    if len(payload) < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload))
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def handshake(portNumber: int) -> bytes:
    return (f"GET /chat/ws HTTP/1.1\r\nHost: 127.0.0.1:{portNumber}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def drain(sock):
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass


class WebSocketLimitTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startWeb(self, extra=CHAT)
        self.chat = self.daemon.getServiceNamed("chat")
        self.web = webPort(self.daemon, PLAIN)

    def members(self):
        return list(self.chat.hub.rooms["#lobby"].members)

    @defer.inlineCallbacks
    def test_writesAfterThePeerClosedAreDropped(self):
        """
        The client closes the WebSocket while output is still on its way (it reads
        slowly): what the chat sends after that is dropped quietly and counted, and
        the connection is closed (wsproto raised LocalProtocolError from the chat
        flusher: a traceback in the log, and the member stayed in its room).
        """
        ws = socket.socket()
        ws.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.connect(("127.0.0.1", self.web))
        self.addCleanup(ws.close)
        ws.sendall(handshake(self.web))
        yield sleep(0.2)
        (browser,) = self.members()
        self.smallSendBuffer(browser)
        tcp = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        tcp.setblocking(False)
        for _ in range(2000):  # until output to the browser waits in the daemon (not yet paused)
            if self.held(browser) > 16384:  # more than the kernel's buffers would still take
                break
            tcp.send(b"s" * 500 + b"\n")
            yield sleep(0.002)
            drain(tcp)
        self.assertGreater(self.held(browser), 16384)
        self.assertFalse(browser.paused)
        ws.sendall(frame(0x8, struct.pack("!H", 1000)))  # Close: answered by wsproto, then state CLOSED
        yield sleep(0.2)
        tcp.send(b"after the close\n")
        deadline = time.monotonic() + 5
        while browser in self.members() and time.monotonic() < deadline:
            yield sleep(0.01)
        self.assertNotIn(browser, self.members())
        self.assertTrue(browser.gone)
        self.assertGreaterEqual(self.chat.shared.metrics.drop("ws_closed").value, 1)
        self.assertEqual(self.chat.shared.metrics.deliveryFailures.value, 0)

    @defer.inlineCallbacks
    def test_clientThatNeverReadsIsBounded(self):
        """Room traffic to a WebSocket that does not read: max_output applies, then it is disconnected."""
        ws = socket.socket()
        ws.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.connect(("127.0.0.1", self.web))
        self.addCleanup(ws.close)
        ws.sendall(handshake(self.web))
        yield sleep(0.2)
        (browser,) = self.members()
        self.assertEqual(browser.framing.name, "json")
        self.smallSendBuffer(browser)
        tcp = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        tcp.setblocking(False)
        line = b"t" * 1000 + b"\n"
        most = 0
        deadline = time.monotonic() + 10
        while not browser.gone and time.monotonic() < deadline:
            try:
                tcp.send(line * 16)
            except BlockingIOError:
                pass
            drain(tcp)  # the talker reads its own echo
            if not browser.gone:
                most = max(most, self.held(browser))
            yield sleep(0.002)
        self.assertTrue(browser.gone)
        self.assertEqual(self.chat.shared.metrics.kick("too_slow_to_read").value, 1)
        self.assertLessEqual(most, BOUND)

    @staticmethod
    def connection(proto):
        """The daemon's TCP connection under a browser's chat protocol."""
        tcp = proto.transport.ws.transport
        return getattr(tcp, "transport", tcp)

    def smallSendBuffer(self, proto):
        """No send-buffer autotuning (up to 4 MB on loopback): what waits, waits in the daemon."""
        self.connection(proto).getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def held(self, proto):
        tcp = self.connection(proto)
        return (sum(map(len, proto._out)) + len(getattr(tcp, "dataBuffer", b""))
                + getattr(tcp, "_tempDataLen", 0))

    @defer.inlineCallbacks
    def test_pingsFromAClientThatNeverReads(self):
        """wsproto answers each ping by itself: once the answers back up, the socket is not read."""
        from tests.chat.test_backpressure import Flooder

        flooder = Flooder(self, self.web)
        flooder.sock.setblocking(True)
        flooder.sock.sendall(handshake(self.web))
        flooder.sock.setblocking(False)
        yield sleep(0.2)
        (browser,) = self.members()
        self.smallSendBuffer(browser)
        most = [0]

        def check():
            most[0] = max(most[0], self.held(browser))

        outcome = yield flooder.flood(frame(0x9, b"p" * 125) * 64, 64 << 20, 10.0, check)
        self.assertEqual(outcome, "stalled", f"after {flooder.sent} bytes")
        self.assertLessEqual(most[0], BOUND)
