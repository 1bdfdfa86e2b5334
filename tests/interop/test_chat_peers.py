"""
The chat service, run as the real daemon, with clients nobody here wrote:
socat as a line client (TCP and TLS), and the books' NUL-framed client as a plain
Python socket program (persistent connection, sends C{text\\0}, prints every
C{\\0}-terminated message).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, requirePeer, startNetsvc

LINE = "services.chat.listen[0]"
NUL = "services.chat.listen[1]"
TLS = "services.chat.listen[2]"


def bookClient(port: int, messages: list[str], expect: int) -> list[str]:
    """
    The books' chat client, as such a client is written: one persistent TCP
    connection, each message sent as UTF-8 + NUL, every NUL-terminated message
    received collected (until C{expect} of them, or the time limit).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    received: list[str] = []
    buffer = b""
    try:
        for m in messages:
            sock.sendall(m.encode("utf-8") + b"\0")
        deadline = time.monotonic() + IO_TIMEOUT
        while len(received) < expect and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buffer += chunk
            *done, buffer = buffer.split(b"\0")
            received += [d.decode("utf-8") for d in done]
    finally:
        sock.close()
    return received


class ChatPeersTests(unittest.TestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        config = base / "netsvc.yaml"
        config.write_text(
            "state_dir: state\n"
            "drain_timeout: 1s\n"
            "services:\n"
            "  chat:\n"
            "    listen:\n"
            '      - "tcp:0:interface=127.0.0.1"\n'
            '      - {endpoint: "tcp:0:interface=127.0.0.1", framing: nul}\n'
            '      - "tls:0:interface=127.0.0.1"\n'
        )
        self.daemon = startNetsvc(self, config, base / "state")

    def socat(self, address: str, script: str, timeout: float = IO_TIMEOUT) -> str:
        requirePeer("socat", "socat")
        # -t: after the end of input, wait this long for the server's answers.
        result = subprocess.run(["socat", "-t", "1", "-", address], input=script.encode(),
                                capture_output=True, timeout=timeout)
        return result.stdout.decode("utf-8")

    def test_bookClientGetsItsOwnMessagesBack(self):
        got = bookClient(self.daemon.port(NUL), ["hello, world", "grüße"], expect=4)
        messages = [m for m in got if not m.startswith("***")]
        self.assertEqual(len(messages), 2, got)
        self.assertTrue(messages[0].endswith(": hello, world"), got)
        self.assertTrue(messages[1].endswith(": grüße"), got)
        self.assertRegex(messages[0], r"^127\.0\.0\.1:\d+: ")  # no nickname: the address

    def test_socatLineClientAndBookClientShareTheLobby(self):
        requirePeer("socat", "socat")
        listener = socket.create_connection(("127.0.0.1", self.daemon.port(NUL)), timeout=IO_TIMEOUT)
        self.addCleanup(listener.close)
        out = self.socat(f"TCP:127.0.0.1:{self.daemon.port(LINE)}",
                         "/nick sock\r\nhi from socat\r\n/who\r\n")
        self.assertIn("<sock> hi from socat\n", out)
        self.assertRegex(out, r"\*\*\* 2 in #lobby: 127\.0\.0\.1:\d+, sock\n")
        data, deadline = b"", time.monotonic() + IO_TIMEOUT
        while b"sock left" not in data and time.monotonic() < deadline:
            data += listener.recv(4096)
        self.assertIn(b"sock: hi from socat\0", data)
        self.assertIn(b"*** sock left (disconnected)\0", data)

    def test_socatOverTLS(self):
        out = self.socat(f"OPENSSL:localhost:{self.daemon.port(TLS)},cafile={self.daemon.cafile}",
                         "/nick sealed\nsecret\n")
        self.assertIn("<sealed> secret\n", out)

    def test_badInputAnsweredOthersUnaffected(self):
        out = self.socat(f"TCP:127.0.0.1:{self.daemon.port(LINE)}",
                         "/nick bad\n" + "x" * 5000 + "\n\xff\n/bogus\nfine\n")
        self.assertIn("*** error: message longer than 4096 bytes; dropped\n", out)
        self.assertIn("*** error: unknown command /bogus; /help lists them\n", out)
        self.assertIn("<bad> fine\n", out)
        self.assertIn("<bad> \xff\n", out)  # U+00FF sent by socat as valid UTF-8: delivered
