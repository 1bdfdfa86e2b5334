"""
C{netsvc check-config} as a security check (issue 21): one warning line per risky
setting, with its key path; exit status 0 unless C{--strict}; the daemon logs the
same warnings once at start.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from netsvc.checkconfig import checkConfig, exposed
from tests.helpers import startDaemon

RISKY = """\
state_dir: state
metrics:
  listen: ["tcp:9100:interface=0.0.0.0"]
  allow: [0.0.0.0/0]
services:
  dns:
    listen: ["udp:5353:interface=0.0.0.0"]
    allow: [0.0.0.0/0]
  smtp:
    listen: ["tcp:2525:interface=0.0.0.0"]
    mynetworks: [0.0.0.0/0]
    relay: {{smarthost: "tcp:host=127.0.0.1:port=2526", auth: {{user: me, password_file: {secret},
                                                                insecure_send_password_without_verified_tls: true}}}}
  forward:
    rules:
      - name: open
        listen: ["tcp:7008"]
        connect: ["tls:host=127.0.0.1:port=7443:insecure=yes"]
        accept_proxy: true
        trusted_proxies: [0.0.0.0/0]
  web:
    listen: ["tls:8443:interface=::"]
    admin: {{allow: [0.0.0.0/0]}}
"""

EXPECTED_KEYS = [
    "services.forward.rules[0].connect[0]",  # insecure=yes
    "services.dns.allow",
    "services.smtp.mynetworks",
    "services.forward.rules[0].allow",
    "services.forward.rules[0].trusted_proxies",
    "services.web.admin.users",
    "metrics.allow",
    "services.smtp.relay.auth.insecure_send_password_without_verified_tls",
    "services.smtp.relay.auth.password_file",
]

SAFE = """\
state_dir: state
services:
  dns:
    listen: ["udp:5353:interface=127.0.0.1"]
  smtp:
    listen: ["tcp:2525:interface=127.0.0.1"]
  forward:
    rules:
      - name: local
        listen: ["tcp:7008:interface=127.0.0.1"]
        connect: ["tcp:host=127.0.0.1:port=7007"]
  web:
    listen: ["tls:8443:interface=127.0.0.1"]
"""


def run(path: Path, strict: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = checkConfig(None, argparse.Namespace(files=[str(path)], strict=strict))
    return status, out.getvalue(), err.getvalue()


class SecurityCheckTests(unittest.TestCase):
    def write(self, text: str) -> Path:
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        secret = base / "smarthost-password"
        secret.write_text("hunter2\n")
        os.chmod(secret, 0o644)
        path = base / "netsvc.yaml"
        path.write_text(text.format(secret=secret))
        return path

    def test_warningsOneLineEachExitZero(self):
        path = self.write(RISKY)
        status, out, err = run(path)
        self.assertEqual(status, 0, err)
        self.assertIn("OK", out)
        lines = err.splitlines()
        keys = [line.split(": ")[1] for line in lines]
        self.assertEqual(sorted(keys), sorted(EXPECTED_KEYS), err)
        for line in lines:
            self.assertTrue(line.startswith(f"{path}: "), line)
            self.assertIn(": warning: ", line)

    def test_strictMakesThemErrors(self):
        status, out, err = run(self.write(RISKY), strict=True)
        self.assertEqual(status, 1)
        self.assertEqual(err.count(": error: "), len(EXPECTED_KEYS), err)
        self.assertNotIn("OK", out)

    def test_loopbackDefaultsAreQuiet(self):
        status, out, err = run(self.write(SAFE), strict=True)
        self.assertEqual((status, err), (0, ""))

    def test_resolverWithoutAllowIsNotOpen(self):
        """Without allow: the DNS service answers loopback and its own networks only: no warning."""
        status, out, err = run(self.write("services:\n  dns:\n    listen: ['udp:5353:interface=0.0.0.0']\n"),
                               strict=True)
        self.assertEqual((status, err), (0, ""))

    def test_shippedConfigurationIsStrictClean(self):
        """
        etc/netsvc.yaml passes --strict once its demo users file is private, as `make run` makes it
        (git keeps no mode but the executable bit: a fresh clone has it readable by everyone, which the
        check rightly reports).
        """
        import shutil

        repo, base = Path(__file__).resolve().parents[1], Path(self.mktemp()).absolute()
        etc = base / "etc"
        shutil.copytree(repo / "etc", etc)
        shutil.copytree(repo / "www", base / "www")
        os.chmod(etc / "mail-users.txt", 0o644)
        status, out, err = run(etc / "netsvc.yaml", strict=True)
        self.assertEqual(status, 1)
        self.assertIn("services.smtp.users.file: error:", err)
        os.chmod(etc / "mail-users.txt", 0o600)
        status, out, err = run(etc / "netsvc.yaml", strict=True)
        self.assertEqual((status, err), (0, ""))

    def test_exposed(self):
        for endpoint, expected in [
            ("tcp:80", True),
            ("tcp:80:interface=0.0.0.0", True),
            ("tcp6:80:interface=\\:\\:", True),
            ("tcp:80:interface=10.0.0.1", True),
            ("tcp:80:interface=127.0.0.1", False),
            ("tcp6:80:interface=\\:\\:1", False),
            ("tls:8443:interface=localhost", False),
            ("unix:/run/x.sock", False),
        ]:
            self.assertEqual(exposed(endpoint), expected, endpoint)


class LoggedAtStartTests(unittest.TestCase):
    def test_daemonLogsTheWarningsOnce(self):
        seen = []

        def observer(event):
            if event.get("log_format", "").startswith("security:"):
                seen.append(event["key"])

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        startDaemon(self, "services:\n  forward:\n    rules:\n      - name: x\n"
                          "        listen: ['tcp:0:interface=127.0.0.1']\n"
                          "        connect: ['tls:host=127.0.0.1:port=1:insecure=yes']\n")
        self.assertEqual(seen, ["services.forward.rules[0].connect[0]"])
