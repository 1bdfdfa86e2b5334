"""
C{netsvc check-config --strict}: the security warnings of L{netsvc.checkconfig}
become errors (exit status 1); without the flag they leave the status 0.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from twisted.trial import unittest

from netsvc import cli

#: One risky setting: TLS verification switched off on a forward rule's connection.
RISKY = """\
state_dir: state
services:
  forward:
    rules:
      - name: open
        listen: ["tcp:7008:interface=127.0.0.1"]
        connect: ["tls:host=127.0.0.1:port=7443:insecure=yes"]
"""
KEY = "services.forward.rules[0].connect[0]"

SAFE = """\
state_dir: state
services:
  dns:
    listen: ["udp:5353:interface=127.0.0.1"]
"""


class StrictTests(unittest.TestCase):
    def write(self, text: str) -> Path:
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        path = base / "netsvc.yaml"
        path.write_text(text)
        return path

    def run_(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            e = self.assertRaises(SystemExit, cli.main, ["check-config", *argv])
        return e.code, out.getvalue(), err.getvalue()

    def test_warningsWithoutStrict(self):
        status, out, err = self.run_(str(self.write(RISKY)))
        self.assertEqual(status, 0, err)
        self.assertIn(f"{KEY}: warning:", err)

    def test_strictMakesWarningsErrors(self):
        path = self.write(RISKY)
        status, out, err = self.run_("--strict", str(path))
        self.assertEqual(status, 1, err)
        self.assertIn(f"{path}: {KEY}: error:", err)
        self.assertNotIn("OK", out)

    def test_strictAfterTheFile(self):
        status, out, err = self.run_(str(self.write(RISKY)), "--strict")
        self.assertEqual(status, 1, err)

    def test_strictSafeFileIsOK(self):
        path = self.write(SAFE)
        status, out, err = self.run_("--strict", str(path))
        self.assertEqual(status, 0, err)
        self.assertEqual(err, "")
        self.assertIn(f"{path}: OK (dns)", out)

    def test_helpNamesStrict(self):
        self.assertIn("--strict", cli.parser("check-config").commands["check-config"].format_help())
