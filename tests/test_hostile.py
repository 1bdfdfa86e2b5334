"""
The short form of the hostile-client harness (C{bench/hostile.py}): the real daemon on a copy of
C{etc/netsvc.yaml}, each attack against each listener for a second or so, while a well-behaved client
of every service keeps making real exchanges.  For every (attack, listener) row: the daemon is alive,
logged no traceback, its RSS grew by a bounded amount, and every well-behaved exchange was answered.

The bounds are loose on purpose (a 2-core CI machine under attack): a few MB per attacking connection
where the daemon used to grow by hundreds of MB, and a probe timeout of seconds.  The long form, with
its table, is the benchmark: C{.venv/bin/python bench/hostile.py}.
"""

from __future__ import annotations

import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

REPO = Path(__file__).resolve().parents[1]
# Appended, not inserted: bench/dns.py must not shadow dnspython for the tests that run after this one.
sys.path.append(str(REPO / "bench"))

import hostile  # noqa: E402  (bench/hostile.py)

#: Each attack's duration in the short form (every attack reaches its bound well within it).
SECONDS = 0.6
#: The most one attack may grow the daemon's RSS (its peak over its start), in MB.
MAX_GROWTH_MB = 48.0

ALL = [name for name, *_ in hostile.TARGETS]


class HostileClientsTests(SynchronousTestCase):
    """Each test runs one attack against the listeners named, on a daemon of its own."""

    def check(self, attack: str, targets: list[str], seconds: float = SECONDS) -> None:
        rows = hostile.run(seconds, [attack], targets)
        table = hostile.table(rows)
        problems = []
        for row in rows:
            where = f"{row.attack} -> {row.target}"
            if not row.alive:
                problems.append(f"{where}: the daemon died")
            if row.tracebacks:
                problems.append(f"{where}: {row.tracebacks} traceback/critical lines logged")
            if row.rssPeak - row.rssBefore > MAX_GROWTH_MB:
                problems.append(f"{where}: RSS grew {row.rssPeak - row.rssBefore:.0f} MB")
            if row.failures:
                problems.append(f"{where}: {row.failures} well-behaved exchanges failed: {row.failed}")
        self.assertEqual(problems, [], "\n" + table)
        self.assertEqual(len(rows), len(hostile.plan([attack], targets)))

    def test_noread(self) -> None:
        """Pipelining clients that never read: the daemon stops reading them, stays small."""
        self.check("noread", ALL)

    def test_junk(self) -> None:
        """Random bytes on every listener: protocol errors, never a traceback."""
        self.check("junk", ALL)

    def test_slowloris(self) -> None:
        self.check("slowloris", ["web.https", "web.h2", "web.http", "dns.tcp", "smtp", "ldap", "chat.line", "imaps",
                                 "pop3s", "metrics"])

    def test_connflood(self) -> None:
        self.check("connflood", ["echo.tcp", "web.https", "dns.tcp", "smtp", "ldap", "chat.line", "imaps"])

    def test_midmessage(self) -> None:
        self.check("midmessage", ["web.https", "web.h2", "dns.tls", "smtps", "ldaps", "chat.tls", "forward", "pop3s"])

    def test_passwords(self) -> None:
        """A flood of wrong passwords on every service that takes one; mail is still accepted meanwhile."""
        self.check("passwords", hostile.PASSWORD_TARGETS, seconds=2.0)


class MutatedInputThenStopTests(SynchronousTestCase):
    """
    Issue 22: after a few thousand mutated inputs across the listeners, SIGTERM no longer stopped the
    daemon.  Mutated requests (from each listener's own and its fuzz corpus) into every listener of one
    daemon, some connections left open mid-message; every service still answers, nothing is logged as
    a traceback, and SIGTERM ends the daemon within drain_timeout (2 s here) + 3 s.
    """

    def test_mutatedInputThenSIGTERM(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="netsvc-mutated-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        daemon = hostile.Daemon(REPO, tmp)
        self.addCleanup(daemon.stop)
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        rng = random.Random(22)
        for name in ALL:
            held += hostile.sendMutated(daemon.target(name), rng, 80, moment=0.01)
        self.assertTrue(daemon.alive(), daemon.logPath.read_text()[-2000:])
        for name in hostile.PROBE_TARGETS:
            daemon.target(name).probe()
        self.assertEqual(daemon.tracebacks(0), [])
        began = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        status = daemon.proc.wait(30)
        took = time.monotonic() - began
        self.assertLess(took, 2 + 3, f"stopped after {took:.1f} s")
        # twistd ends with the signal it was stopped by (Twisted 26), or 0
        self.assertIn(status, (0, -signal.SIGTERM), daemon.logPath.read_text()[-2000:])
        self.assertIn("Server Shut Down.", daemon.logPath.read_text())
