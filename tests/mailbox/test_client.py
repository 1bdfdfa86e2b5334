"""netsvc mail read against a running daemon's IMAP and POP3 listeners."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from twisted.internet import defer, utils
from twisted.trial import unittest

from netsvc import auth, cli
from netsvc.mailbox import client
from netsvc.mailbox.maildir import Maildirs
from tests.helpers import port, startDaemon

FIRST = (b"From: Alice <alice@lab.test>\r\nDate: Mon, 07 Dec 2026 05:00:00 +0000\r\n"
         b"Subject: =?utf-8?q?caf=C3=A9?= \x1b[31mred\r\n\r\nbody\r\n.dot\r\n")
_READ = client.read
SECOND = b"From: bob@lab.test\r\nSubject: second\r\n\r\nx\r\n"


class Out(io.StringIO):
    """Standard output with a binary buffer (where --show writes), not a terminal unless told."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.buffer = io.BytesIO()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class SummaryTests(unittest.TestCase):
    def test_line(self):
        line = client.summary(7, 124, FIRST)
        self.assertTrue(line.startswith("     7  "), line)
        self.assertIn("Alice <alice@lab.test>", line)
        self.assertTrue(line.endswith("      124  café ?[31mred"), line)  # decoded; the escape made harmless

    def test_noHeaders(self):
        self.assertIn("(no subject)", client.summary(1, 0, b"\r\n"))
        self.assertIn("-" * 16, client.summary(1, 0, b"Date: never\r\n\r\n"))


class ReadTests(unittest.TestCase):
    def setUp(self):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        auth.addUser(folder / "users.txt", "dev", "dev")
        (folder / "pw").write_text("dev\n")
        (folder / "bad").write_text("nope\n")
        self.folder = folder
        self.daemon = startDaemon(self, f"""
services:
  mailbox:
    listen:
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: imap}}
      - {{endpoint: "tcp:0:interface=127.0.0.1", protocol: imap}}
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: pop3}}
      - {{endpoint: "tcp:0:interface=127.0.0.1", protocol: pop3}}
    users: {folder / "users.txt"}
    fsync: false
""")
        self.state = Path(self.daemon.context.stateDir)
        self.cacert = str(self.state / "tls" / "selfsigned.pem")
        self.store = Maildirs(self.state / "mail", fsync=False)
        self.store.deliver("dev", FIRST)
        self.store.deliver("dev", SECOND)
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)

    def port(self, i):
        return port(self.daemon, i, "mailbox")

    def args(self, *argv, password="pw"):
        base = ["mail", "read", "--user", "dev", "--cacert", self.cacert]
        if password:
            base += ["--password-file", str(self.folder / password)]
        return cli.parser("mail").parse_args(base + list(argv))

    @defer.inlineCallbacks
    def command(self, *argv, out=None, **kw):
        """The command as cli.main runs it (status, standard output)."""
        out = out or Out()
        args = self.args(*argv, **kw)
        def read(a, password, o=None):
            return _READ(a, password, out)

        self.patch(client, "read", read)
        status = yield defer.maybeDeferred(args.run, None, args)
        return status, out

    @defer.inlineCallbacks
    def test_listIMAP(self):
        status, out = yield self.command("--server", f"localhost:{self.port(0)}")
        self.assertEqual(status, 0, self.err.getvalue())
        lines = out.getvalue().splitlines()
        uids = [m.uid for m in self.store.inbox("dev").messages()]
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].lstrip().startswith(f"{uids[0]}  2026-12-07 "), lines)
        self.assertTrue(lines[0].endswith(f"{len(FIRST):>9}  café ?[31mred"), lines)
        self.assertTrue(lines[1].endswith(f"{len(SECOND):>9}  second"), lines)
        self.assertEqual(self.err.getvalue(), "")

    @defer.inlineCallbacks
    def test_showIMAPStarttlsReadOnly(self):
        """--show N over STARTTLS prints the message (LF line ends) and sets no flag."""
        uid = self.store.inbox("dev").messages()[0].uid
        status, out = yield self.command("--server", f"localhost:{self.port(1)}", "--starttls", "--show", str(uid))
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(out.buffer.getvalue(), FIRST.replace(b"\r\n", b"\n"))
        self.assertEqual([m.flags for m in self.store.inbox("dev").messages()], [frozenset(), frozenset()])

    @defer.inlineCallbacks
    def test_showToTerminal(self):
        """To a terminal, a message's control characters (escape sequences) are shown as ?."""
        uid = self.store.inbox("dev").messages()[0].uid
        status, out = yield self.command("--server", f"localhost:{self.port(0)}", "--show", str(uid), out=Out(tty=True))
        self.assertEqual(status, 0)
        self.assertIn(b"?[31mred\n", out.buffer.getvalue())
        self.assertNotIn(b"\x1b", out.buffer.getvalue())

    @defer.inlineCallbacks
    def test_pop3ListAndShowDeleteNothing(self):
        status, out = yield self.command("--pop3", "--server", f"localhost:{self.port(2)}")
        self.assertEqual(status, 0, self.err.getvalue())
        lines = out.getvalue().splitlines()
        self.assertEqual([l.split()[0] for l in lines], ["1", "2"])
        self.assertTrue(lines[1].endswith("second"))
        status, out = yield self.command("--pop3", "--server", f"localhost:{self.port(3)}", "--starttls", "--show", "2")
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(out.buffer.getvalue(), SECOND.replace(b"\r\n", b"\n"))
        self.assertEqual(len(self.store.inbox("dev").messages()), 2)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        for argv in (["--server", f"localhost:{self.port(0)}"], ["--pop3", "--server", f"localhost:{self.port(2)}"]):
            self.err.truncate(0)
            self.err.seek(0)
            status, out = yield self.command(*argv, password="bad")
            self.assertEqual(status, 1)
            self.assertEqual(out.getvalue(), "")
            lines = self.err.getvalue().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("netsvc mail read: login as dev: "), lines)
            self.assertIn("uthentication failed", lines[0])

    @defer.inlineCallbacks
    def test_failures(self):
        """Each failure is one line and status 1."""
        cases = [
            (["--server", f"localhost:{self.port(1)}"], "TLS: "),  # a plain port without --starttls
            (["--server", f"localhost:{self.port(0)}", "--show", "999"], "message 999: no message with UID 999"),
            (["--pop3", "--server", f"localhost:{self.port(2)}", "--show", "9"], "message 9: There is no message 9"),
            (["--server", f"localhost:{self.port(0)}", "--folder", "Nope"], "folder Nope: [NONEXISTENT]"),
        ]
        for argv, expected in cases:
            self.err.truncate(0)
            self.err.seek(0)
            status, _ = yield self.command(*argv)
            lines = self.err.getvalue().splitlines()
            self.assertEqual((status, len(lines)), (1, 1), (argv, lines))
            self.assertIn(expected, lines[0])

    @defer.inlineCallbacks
    def test_unverifiedCertificate(self):
        """Without --cacert the self-signed certificate is refused, with the usual advice."""
        args = cli.parser("mail").parse_args(["mail", "read", "--user", "dev", "--password-file",
                                              str(self.folder / "pw"), "--server", f"localhost:{self.port(0)}"])
        status = yield defer.maybeDeferred(args.run, None, args)
        self.assertEqual(status, 1)
        line = self.err.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("TLS: certificate verify failed", line)
        self.assertIn("--cacert FILE", line)

    @defer.inlineCallbacks
    def test_usage(self):
        cases = [["--tls", "--starttls"], ["--show", "0"], ["--pop3", "--folder", "Sent"], ["-k"]]
        for argv in cases:
            self.err.truncate(0)
            self.err.seek(0)
            status, _ = yield self.command("--server", "localhost:1", *argv)
            self.assertEqual(status, 2, argv)
            self.assertEqual(self.err.getvalue().count("\n"), 1, argv)
        args = cli.parser("mail").parse_args(["mail", "read", "--user", "dev", "--cacert", "/nonexistent.pem",
                                              "--password-file", str(self.folder / "pw")])
        self.assertEqual(args.run(None, args), 2)

    @defer.inlineCallbacks
    def test_command(self):
        """The netsvc command itself, the password from the environment."""
        env = dict(os.environ, NETSVC_MAIL_PASSWORD="dev", PYTHONPATH=str(Path(__file__).parents[2]))
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "netsvc", "mail", "read", "--user", "dev", "--cacert", self.cacert,
                             "--server", f"127.0.0.1:{self.port(0)}"], env=env)
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(len(out.splitlines()), 2)
        self.assertTrue(out.splitlines()[1].endswith(b"second"))
