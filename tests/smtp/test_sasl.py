"""AUTH PLAIN/LOGIN in the session: only under TLS, failures counted and limited, submission requires it."""

from __future__ import annotations

import base64

from twisted.internet import defer

from netsvc.auth import Refused
from netsvc.policies import RateLimiter
from tests.smtp.test_protocol import SessionCase, plain


class AuthTests(SessionCase):
    def test_authenticatedRelay(self):
        p, t = self.connect(peer="192.0.2.7", secure=True)
        self.send(p, t, b"EHLO outsider\r\n")
        self.assertEqual(self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")
        out = self.transaction(p, t)
        self.assertTrue(out.endswith(b"250 2.0.0 Ok: queued as id0\r\n"), out)
        env = self.queue.committed()[0].envelope
        self.assertEqual(env.client["user"], "alice")
        self.assertIn(b"with ESMTPSA id", self.queue.committed()[0].data)
        self.assertEqual(self.metric("netsvc_smtp_auth_total", result="ok"), 1)

    def test_authLogin(self):
        p, t = self.connect(peer="192.0.2.7", secure=True)
        self.send(p, t, b"EHLO x\r\n")
        self.assertEqual(self.send(p, t, b"auth login\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.send(p, t, base64.b64encode(b"alice") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.send(p, t, base64.b64encode(b"s3cret") + b"\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.send(p, t, b"AUTH PLAIN x\r\n"), b"503 5.5.1 Error: already authenticated\r\n")

    def test_authRefusedWithoutTLS(self):
        p, t = self.connect()
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n")
        self.assertTrue(out.startswith(b"538 5.7.11"), out)
        self.assertEqual(self.auth.calls, [])

    def test_garbageAuthCountedAndLimited(self):
        p, t = self.connect(peer="192.0.2.9", secure=True)
        self.send(p, t, b"EHLO x\r\n")
        self.assertEqual(self.send(p, t, b"AUTH PLAIN !!!notbase64\r\n"),
                         b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.send(p, t, b"AUTH PLAIN " + base64.b64encode(b"no-nuls") + b"\r\n"),
                         b"535 5.7.8 Authentication credentials invalid\r\n")
        out = self.send(p, t, b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")
        self.assertTrue(out.startswith(b"421 4.7.0"), out)  # third failure in the session
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.metric("netsvc_smtp_auth_total", result="failed"), 3)
        # the same IP, new sessions: two more failures use up the burst of 5, then 454 without checking
        for _ in range(2):
            p, t = self.connect(peer="192.0.2.9", secure=True)
            self.send(p, t, b"EHLO x\r\n")
            self.send(p, t, b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")
        calls = len(self.auth.calls)
        p, t = self.connect(peer="192.0.2.9", secure=True)
        self.send(p, t, b"EHLO x\r\n")
        out = self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n")
        self.assertTrue(out.startswith(b"454 4.7.0"), out)
        self.assertEqual(len(self.auth.calls), calls)
        self.assertEqual(self.metric("netsvc_smtp_auth_total", result="rate_limited"), 1)
        # another client is not affected; and the bucket refills with time
        p2, t2 = self.connect(peer="192.0.2.10", secure=True)
        self.send(p2, t2, b"EHLO x\r\n")
        self.assertTrue(self.send(p2, t2, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n").startswith(b"235"))
        self.clock.advance(10)
        self.assertTrue(self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n").startswith(b"235"))

    def test_submissionRequiresAuth(self):
        config = self.makeConfig(submission=True)
        p, t = self.connect(config=config)
        self.send(p, t, b"EHLO x\r\n")
        self.assertEqual(self.send(p, t, b"MAIL FROM:<a@b.test>\r\n"),
                         b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        p, t = self.connect(config=config, secure=True)
        self.send(p, t, b"EHLO x\r\n")
        self.assertEqual(self.send(p, t, b"MAIL FROM:<a@b.test>\r\n"), b"530 5.7.0 Authentication required\r\n")
        self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n")
        self.assertEqual(self.send(p, t, b"MAIL FROM:<a@b.test>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_rateLimitedAuthCountsAsAnError(self):
        """With the client IP's AUTH budget spent, a session looping on AUTH (454 each) is still closed in the end."""
        config = self.makeConfig(authFailures=RateLimiter(0.1, 1, self.clock))
        p, t = self.connect(peer="192.0.2.11", secure=True, config=config)
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")
        out = self.send(p, t, (b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n") * 30)
        self.assertTrue(out.startswith(b"454 4.7.0"), out)
        self.assertTrue(out.endswith(b"421 4.7.0 mx.test Error: too many errors\r\n"), out)
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(self.auth.calls), 1)


class SlowAuth:
    """An authenticator whose answers come when the test says (a password check in a thread)."""

    def __init__(self):
        self.calls = []

    def check(self, user, password):
        d = defer.Deferred()
        self.calls.append(d)
        return d


class ReserveFirstTests(SessionCase):
    """The client IP's failure bucket is charged before the check, not after it failed."""

    def test_parallelSessionsReserveFirst(self):
        """10 sessions from one address AUTH at once against a slow check: only the burst (3) reach it."""
        auth = SlowAuth()
        config = self.makeConfig(authenticator=auth, authFailures=RateLimiter(0.1, 3, self.clock))
        sessions = []
        for _ in range(10):
            p, t = self.connect(peer="192.0.2.20", secure=True, config=config)
            self.send(p, t, b"EHLO x\r\n")
            sessions.append((p, t, self.send(p, t, b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")))
        self.assertEqual(len(auth.calls), 3)
        self.assertEqual([out for _, _, out in sessions[:3]], [b""] * 3)  # waiting for their check
        for _, _, out in sessions[3:]:
            self.assertTrue(out.startswith(b"454 4.7.0"), out)
        self.assertEqual(self.metric("netsvc_smtp_auth_total", result="rate_limited"), 7)
        for d in auth.calls:
            d.callback(False)
        for _, t, _ in sessions[:3]:
            self.assertEqual(t.value(), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(config.authFailures.available("192.0.2.20"), 0)  # charged once each, not twice

    def test_successRefunds(self):
        auth = SlowAuth()
        config = self.makeConfig(authenticator=auth, authFailures=RateLimiter(0.1, 3, self.clock))
        for _ in range(5):
            p, t = self.connect(peer="192.0.2.21", secure=True, config=config)
            self.send(p, t, b"EHLO x\r\n")
            self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n")
            auth.calls[-1].callback(True)
            self.assertEqual(t.value(), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(config.authFailures.available("192.0.2.21"), 3)

    def test_busyIsTemporaryAndRefunded(self):
        """A check the hashing pool refused (queue full): 454 4.7.0, not a failure, the token given back."""
        auth = SlowAuth()
        config = self.makeConfig(authenticator=auth, authFailures=RateLimiter(0.1, 3, self.clock))
        p, t = self.connect(peer="192.0.2.22", secure=True, config=config)
        self.send(p, t, b"EHLO x\r\n")
        self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n")
        auth.calls[-1].callback(Refused("busy"))
        self.assertEqual(t.value(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(config.authFailures.available("192.0.2.22"), 3)
        self.assertEqual(p.authFailures, 0)
        self.assertEqual(self.metric("netsvc_smtp_auth_total", result="busy"), 1)
        # the session may try again
        t.clear()
        self.send(p, t, b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n")
        auth.calls[-1].callback(True)
        self.assertEqual(t.value(), b"235 2.7.0 Authentication successful\r\n")
