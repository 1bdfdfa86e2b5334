"""services.mailbox: the settings (good and bad files), check-config, and the listeners it starts."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from netsvc import auth, config
from netsvc.checkconfig import dryRun
from netsvc.config import ConfigError
from netsvc.mailbox.settings import Settings
from netsvc.runtime import StartupError
from tests.helpers import port, startDaemon


def parse(text: str):
    return config.parse(text, "test.yaml")


def problems(text: str) -> list[str]:
    try:
        parse(text)
    except ConfigError as e:
        lines = str(e).splitlines()
        assert len(lines) == len(e.problems)  # one line each
        return lines
    raise AssertionError("no problem found")


class SettingsTests(unittest.TestCase):
    def test_issueExample(self):
        """The configuration of the issue parses as written."""
        settings = parse("""
services:
  mailbox:
    listen:
      - {endpoint: "tcp:1143:interface=127.0.0.1", protocol: imap}
      - {endpoint: "tls:1993:interface=127.0.0.1", protocol: imap}
      - {endpoint: "tcp:1110:interface=127.0.0.1", protocol: pop3}
      - {endpoint: "tls:1995:interface=127.0.0.1", protocol: pop3}
    users: mail-users.txt
    maildir: mail
""").services["mailbox"]
        self.assertEqual([l.protocol for l in settings.listen], ["imap", "imap", "pop3", "pop3"])
        self.assertEqual(settings.users.file, "mail-users.txt")
        self.assertEqual(settings.maildir, "mail")

    def test_defaults(self):
        """Limits on by default: connections, per IP, idle (>= the RFCs' minimums), failures, sizes."""
        s = Settings(users=auth.UserSource(file="u.txt"))
        self.assertEqual([(l.endpoint.split(":")[0], l.protocol) for l in s.listen],
                         [("tcp", "imap"), ("tls", "imap"), ("tcp", "pop3"), ("tls", "pop3")])
        self.assertTrue(all("interface=127.0.0.1" in l.endpoint for l in s.listen))
        self.assertGreaterEqual(s.limits.idle_timeout, 30 * 60)
        self.assertLessEqual(s.limits.max_connections_per_ip, 64)
        self.assertEqual(s.auth_failures.per_session, 3)
        self.assertGreater(s.auth_failures.rate, 0)
        self.assertEqual(s.max_message_size, 25 * 10**6)
        self.assertTrue(s.fsync)
        self.assertEqual(s.check(), [])

    def test_ldapUsers(self):
        s = parse("""
services:
  mailbox:
    users: {ldap: "ldaps://127.0.0.1:3636", base: "ou=users,dc=example,dc=com"}
""").services["mailbox"]
        self.assertEqual(s.users.kind, "ldap")

    def test_usersRequired(self):
        self.assertEqual(problems("services:\n  mailbox: {}\n"),
                         ["test.yaml: services.mailbox.users: required: who may log in (a users file, "
                          "{ldap: ...} or {directory: true}, as services.smtp.users)"])

    def test_badListeners(self):
        lines = problems("""
services:
  mailbox:
    users: u.txt
    listen:
      - "tcp:1110"
      - {endpoint: "tcp:1110", protocol: smtp}
      - {endpoint: "udp:1110", protocol: pop3}
      - {endpoint: "tcp:1110", protocl: pop3}
""")
        # (and, the bad entries being left out, "needs at least one listener")
        self.assertEqual(len(lines), 6, lines)
        self.assertIn("test.yaml: services.mailbox.listen[0].protocol: required key is missing", lines)
        self.assertTrue(any(l.startswith("test.yaml: services.mailbox.listen[1].protocol: expected one of "
                                         "'imap', 'pop3', got 'smtp'") for l in lines), lines)
        self.assertTrue(any("listen[2]" in l and "UDP" in l for l in lines), lines)
        self.assertIn("test.yaml: services.mailbox.listen[3].protocl: unknown key (did you mean 'protocol'?)",
                      lines)

    def test_badValues(self):
        lines = problems("""
services:
  mailbox:
    users: u.txt
    max_message_size: 12
    auth_failures: {per_session: 0}
    imap_idle_timeout: forever
    junk: 3
""")
        self.assertEqual(len(lines), 4, lines)
        for key in ("max_message_size", "auth_failures.per_session", "imap_idle_timeout", "junk"):
            self.assertTrue(any(l.startswith(f"test.yaml: services.mailbox.{key}: ") for l in lines), (key, lines))


    def test_badMaildir(self):
        self.assertEqual(problems('services:\n  mailbox: {users: u.txt, maildir: " "}\n'),
                         ["test.yaml: services.mailbox.maildir: expected a folder name, got ' '"])


class CheckConfigTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()

    def write(self, text: str) -> str:
        path = self.folder / "netsvc.yaml"
        path.write_text(text)
        return str(path)

    def test_goodFileBuilds(self):
        auth.addUser(self.folder / "users.txt", "dev", "dev")
        path = self.write("""
services:
  mailbox:
    listen:
      - {endpoint: "tcp:1110:interface=127.0.0.1", protocol: pop3}
      - {endpoint: "tls:1995:interface=127.0.0.1", protocol: pop3}
      - {endpoint: "tcp:1143:interface=127.0.0.1", protocol: imap}
      - {endpoint: "tls:1993:interface=127.0.0.1", protocol: imap}
    users: users.txt
""")
        self.assertEqual(dryRun(config.load(path), path), [])

    def test_missingUsersFile(self):
        """A users file that is not there: one problem naming the key, no traceback."""
        path = self.write("""
services:
  mailbox:
    listen: [{endpoint: "tcp:1110:interface=127.0.0.1", protocol: pop3}]
    users: nobody-wrote-this.txt
""")
        found = dryRun(config.load(path), path)
        self.assertEqual(len(found), 1)
        self.assertEqual(found[0].path, "services.mailbox.users")
        self.assertIn("cannot read users file", found[0].reason)


class ListenerTests(unittest.TestCase):
    def setUp(self):
        users = Path(self.mktemp()).absolute()
        auth.addUser(users, "dev", "dev")
        self.daemon = startDaemon(self, f"""
services:
  mailbox:
    listen:
      - {{endpoint: "tcp:0:interface=127.0.0.1", protocol: pop3}}
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: pop3}}
      - {{endpoint: "tcp:0:interface=127.0.0.1", protocol: imap}}
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: imap}}
    users: {users}
    fsync: false
    limits: {{max_connections_per_ip: 2}}
""")
        self.state = Path(self.daemon.context.stateDir)

    @defer.inlineCallbacks
    def test_listenersAnswer(self):
        """Each listener greets: in clear on the plain port, under verified TLS on the tls: one."""
        tls = ssl.create_default_context(cafile=str(self.state / "tls" / "selfsigned.pem"))
        plain, secure = port(self.daemon, 0, "mailbox"), port(self.daemon, 1, "mailbox")

        def greet():
            with socket.create_connection(("127.0.0.1", plain), timeout=10) as s:
                first = s.recv(100)
            with socket.create_connection(("127.0.0.1", secure), timeout=10) as raw, \
                    tls.wrap_socket(raw, server_hostname="localhost") as s:
                second = s.recv(100)
            return first, second

        first, second = yield threads.deferToThread(greet)
        self.assertEqual(first, b"+OK netsvc POP3 ready.\r\n")
        self.assertEqual(second, b"+OK netsvc POP3 ready.\r\n")
        self.assertIn('netsvc_pop3_sessions_total{service="mailbox"} 2', self.daemon.context.metrics.render())

    @defer.inlineCallbacks
    def test_imapAndPop3SeeOneStore(self):
        """
        The IMAP listeners are wired: STARTTLS on the plain one (LOGINDISABLED before
        it), implicit TLS on the other; what POP3 deletes at QUIT is gone for IMAP.
        """
        import imaplib
        import poplib

        from netsvc.mailbox.maildir import Maildirs

        Maildirs(self.state / "mail", fsync=False).deliver("dev", b"Subject: one\r\n\r\nhello\r\n")
        tls = ssl.create_default_context(cafile=str(self.state / "tls" / "selfsigned.pem"))
        pop3s, imapPlain, imaps = (port(self.daemon, i, "mailbox") for i in (1, 2, 3))

        def session():
            plain = imaplib.IMAP4("127.0.0.1", imapPlain, timeout=10)
            before = plain.capabilities
            plain.starttls(tls)
            plain.login("dev", "dev")
            plain.logout()
            m = imaplib.IMAP4_SSL("127.0.0.1", imaps, ssl_context=tls, timeout=10)
            m.login("dev", "dev")
            m.select("Inbox")
            fetched = m.fetch("1", "(RFC822)")[1][0][1]
            p = poplib.POP3_SSL("127.0.0.1", pop3s, context=tls, timeout=10)
            p.user("dev")
            p.pass_("dev")
            p.dele(1)
            p.quit()
            m.noop()
            after = m.search(None, "ALL")[1]
            m.logout()
            return before, fetched, after

        before, fetched, after = yield threads.deferToThread(session)
        self.assertIn("LOGINDISABLED", before)
        self.assertIn("STARTTLS", before)
        self.assertEqual(fetched, b"Subject: one\r\n\r\nhello\r\n")
        self.assertEqual(after, [b""])
        self.assertIn('netsvc_imap_events_total{service="mailbox",event="logins"} 2',
                      self.daemon.context.metrics.render())

    @defer.inlineCallbacks
    def test_connectionsPerIPLimited(self):
        """Over max_connections_per_ip: -ERR [SYS/TEMP] and closed, counted."""
        plain = port(self.daemon, 0, "mailbox")

        def third():
            held = [socket.create_connection(("127.0.0.1", plain), timeout=10) for _ in range(2)]
            try:
                for s in held:
                    s.recv(100)
                with socket.create_connection(("127.0.0.1", plain), timeout=10) as s:
                    data = b""
                    while True:
                        chunk = s.recv(100)
                        if not chunk:
                            return data
                        data += chunk
            finally:
                for s in held:
                    s.close()

        answer = yield threads.deferToThread(third)
        self.assertEqual(answer, b"-ERR [SYS/TEMP] Too many connections; try again later.\r\n")
        self.assertIn('reason="max_connections_per_ip"', self.daemon.context.metrics.render())


class StartupTests(unittest.TestCase):
    def test_missingUsersFileAtStart(self):
        """The daemon refuses to start with one line naming services.mailbox.users."""
        with self.assertRaises(StartupError) as caught:
            startDaemon(self, """
services:
  mailbox:
    listen: [{endpoint: "tcp:0:interface=127.0.0.1", protocol: pop3}]
    users: /nonexistent/users.txt
""")
        self.assertEqual(str(caught.exception),
                         "test.yaml: services.mailbox.users: cannot read users file /nonexistent/users.txt")
