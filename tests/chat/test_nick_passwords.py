"""
Wrong passwords for reserved nicknames are limited per client address (issue
18): five are checked, then the client is told to try later without any
hashing; another address is not affected.  Over real loopback sockets against
the chat service built from its settings.
"""

import os
import socket
import threading

from twisted.internet import defer
from twisted.trial import unittest

import netsvc.auth
from netsvc.auth import hashPassword
from tests.chat.test_service import readUntil
from tests.helpers import port, startDaemon


class NickPasswordLimitTests(unittest.TestCase):
    def setUp(self):
        folder = self.mktemp()
        os.makedirs(folder)
        users = os.path.abspath(os.path.join(folder, "nicks.txt"))
        with open(users, "w") as f:
            f.write(f"root:{hashPassword('right')}\n")
        self.checks = []
        lock = threading.Lock()
        real = netsvc.auth.verifyPassword

        def counting(password, stored, plain=False):  # runs in the hashing pool's threads
            with lock:
                self.checks.append(password)
            return real(password, stored, plain)

        self.patch(netsvc.auth, "verifyPassword", counting)
        self.daemon = startDaemon(self, (
            "services:\n  chat:\n    listen: [\"tcp:0:interface=127.0.0.1\"]\n"
            "    limits: {rate: 1000, burst: 1000}\n"
            f"    auth: {{password_file: {users}}}\n"))
        self.port = port(self.daemon, 0, "chat")

    def connect(self, source):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        return sock

    @defer.inlineCallbacks
    def test_twentyWrongPasswords(self):
        hostile = self.connect("127.0.0.1")
        yield readUntil(hostile, b"joined #lobby\n")
        hostile.sendall(b"/nick root wrong\n" * 20 + b"done\n")
        got = yield readUntil(hostile, b"> done\n", timeout=30)
        wrong = got.count(b"*** error: wrong password for root\n")
        limited = got.count(b"*** error: too many attempts, try again in 10 s\n")
        self.assertEqual(wrong + limited, 20, got)
        self.assertLessEqual(len(self.checks), 5)
        self.assertEqual(wrong, len(self.checks))
        self.assertGreaterEqual(limited, 15)
        hostile.sendall(b"/nick root right\n")  # even the right one: this address must wait
        yield readUntil(hostile, b"*** error: too many attempts", timeout=10)
        self.assertLessEqual(len(self.checks), 5)

        other = self.connect("127.0.0.2")
        yield readUntil(other, b"joined #lobby\n")
        other.sendall(b"/nick root right\n")
        got = yield readUntil(other, b"is now known as root\n", timeout=10)
        self.assertIn(b"127.0.0.2:", got)
        self.assertEqual(self.checks[-1], "right")
        refused = self.daemon.context.metrics.get("netsvc_password_checks_refused_total")
        self.assertGreaterEqual(refused.labels(service="chat", reason="rate").value, 16)
