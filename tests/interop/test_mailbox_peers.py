"""
The mailboxes (C{services.mailbox}: IMAP4rev1 and POP3) and SMTP local delivery,
run as the real daemon (C{twistd -n netsvc --config ...}), read by clients nobody
here wrote: Python's imaplib and poplib (the books' recipes), curl (C{imaps://},
C{pop3s://}, and STARTTLS/STLS on the plain ports), fetchmail (POP3 and IMAP, into
an MDA that writes files) and mbsync (isync: a two-way IMAP sync with a local
Maildir); and the end-to-end path: smtplib -> local delivery -> IMAP FETCH of the
same bytes -> POP3 DELE -> IMAP sees it gone -> restart -> the same UIDs.  Also:
C{workers: 2} sharing one mailbox, a flood of bad passwords, a client gone
mid-APPEND, and, against a private Dovecot 2.3 (tests/interop/_dovecot.py, root
only): C{netsvc mail read} as its client, and netsvc's IMAP and POP3 answers
compared with Dovecot's on the same messages (FETCH sections, BODYSTRUCTURE,
ENVELOPE, SEARCH; RETR, TOP).

Every listener is on 127.0.0.1 port 0 (the ports are read from status.json).  The
peer tests put their messages in the Maildir through the store
(L{netsvc.mailbox.maildir.Maildirs}, as delivery does, from this process while
the daemon runs), so that what they find is about IMAP/POP3 alone; the
end-to-end tests send through SMTP.  The certificate is the daemon's generated
one (C{tls.cert: auto}: localhost, 127.0.0.1, ::1) and every client verifies it.
"""

from __future__ import annotations

import getpass
import imaplib
import importlib.util
import logging
import logging.handlers
import os
import poplib
import pprint
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import BinaryIO

from twisted.trial import unittest

from netsvc import auth
from tests.helpers import loopbackAliasesWork
from tests.interop._daemon import (
    IO_TIMEOUT,
    REPO,
    childEnvironment,
    decoded,
    requirePeer,
    runToCompletion,
    startNetsvc,
)

#: the mailbox listeners: name -> (endpoint, protocol); plain ports offer STARTTLS/STLS
LISTENERS = {
    "imap": ("tcp:0:interface=127.0.0.1", "imap"),
    "imaps": ("tls:0:interface=127.0.0.1", "imap"),
    "pop3": ("tcp:0:interface=127.0.0.1", "pop3"),
    "pop3s": ("tls:0:interface=127.0.0.1", "pop3"),
}
IMAP, IMAPS, POP3, POP3S = LISTENERS
SMTP = "services.smtp.listen[0]"


def imapInBuild() -> bool:
    """Whether netsvc.mailbox.imap exists (the daemon refuses an IMAP listener without it)."""
    return importlib.util.find_spec("netsvc.mailbox.imap") is not None


MAILBOX_CONFIG = """\
state_dir: {state}
drain_timeout: 1s
services:
  mailbox:
    listen:
{listen}
    users: {users}
    maildir: {mail}
"""

SMTP_CONFIG = """\
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: mail.test
    mynetworks: [127.0.0.1/32]
    users: {users}
    local: {{domains: [lab.test, localhost], maildir: {mail}, aliases: {{postmaster: dev, root: dev}}}}
    limits: {{rate: 0}}
"""

#: IMAP capabilities the issue asks for (after TLS and login).
EXTENSIONS = ["IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "LITERAL+", "SPECIAL-USE", "ENABLE", "NAMESPACE"]


def crlf(data: bytes) -> bytes:
    """C{data} with every line ending CRLF (what IMAP and POP3 put on the wire)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def sampleMessage(subject: str, to: str = "dev@lab.test", attachment: bytes | None = None) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Sender <sender@example.test>"
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@example.test>"
    m.set_content(f"Hello,\n.a line starting with a dot\nFrom the start of a line\n\n{subject}\n")
    if attachment is not None:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="blob.bin")
    return m


def messageBytes(m: EmailMessage) -> bytes:
    return m.as_bytes(policy=policy.SMTP)  # CRLF, as an SMTP client sends it


#: an attachment with every byte value (base64 on the wire, byte-identical after decoding)
BLOB = bytes(range(256)) * 300


def fetched(data: list) -> list[tuple[bytes, bytes]]:
    """
    imaplib's FETCH answer as (items outside the literal, literal) per message: the
    items after a literal (C{BODY[...] {n}...  UID 7)}) come as the next element.
    """
    out = []
    for i, item in enumerate(data):
        if isinstance(item, tuple):
            after = data[i + 1] if i + 1 < len(data) and isinstance(data[i + 1], bytes) else b""
            out.append((item[0] + b" " + after, item[1]))
    return out


def uidOf(items: bytes) -> int:
    m = re.search(rb"\bUID (\d+)", items)
    if m is None:
        raise AssertionError(f"no UID in a UID FETCH answer: {items!r}")
    return int(m.group(1))


class MailboxDaemonTestCase(unittest.TestCase):
    """A daemon with the mailbox service (and SMTP local delivery when C{withSMTP})."""

    withSMTP = False
    workers = 1

    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.base = base
        self.users = base / "users.txt"
        auth.addUser(self.users, "dev", "devpass")
        auth.addUser(self.users, "qa", "qapass")
        self.mail = base / "mail"
        # Without IMAP in the build only the POP3 listeners are configured (the daemon would
        # refuse to start), and every IMAP test fails on its missing listener: not skipped.
        self.listeners = [name for name, (_, protocol) in LISTENERS.items() if protocol != "imap" or imapInBuild()]
        listen = "".join(f'      - {{endpoint: "{LISTENERS[name][0]}", protocol: {LISTENERS[name][1]}}}\n'
                         for name in self.listeners)
        text = MAILBOX_CONFIG.format(state=base / "state", users=self.users, mail=self.mail, listen=listen)
        if self.withSMTP:
            text += SMTP_CONFIG.format(users=self.users, mail=self.mail)
        if self.workers > 1:
            text = f"workers: {self.workers}\n" + text
        (base / "netsvc.yaml").write_text(text)
        self.start()

    def start(self) -> None:
        self.daemon = startNetsvc(self, self.base / "netsvc.yaml", self.base / "state")
        self.cafile = self.daemon.cafile

    def restart(self) -> None:
        status = self.daemon.stop()
        self.assertIn(status, (0, -signal.SIGTERM), self.daemon.output())  # twistd ends with the signal
        self.assertNotIn("Traceback", self.daemon.output())
        self.start()

    def port(self, key: str) -> int:
        """The port of a mailbox listener (C{IMAPS}...) or of C{SMTP}."""
        if key in LISTENERS:
            if key not in self.listeners:
                self.fail(f"no {key} listener: IMAP is not in this build (netsvc.mailbox.imap is missing)")
            key = f"services.mailbox.listen[{self.listeners.index(key)}]"
        return self.daemon.port(key)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)

    def store(self, user: str, data: bytes, folder: str = "INBOX") -> None:
        """Put a message in C{user}'s folder the way delivery does (the store, while the daemon runs)."""
        from netsvc.mailbox.maildir import Maildirs

        Maildirs(self.mail).deliver(user, data, folder)

    def storeSamples(self, count: int = 3, user: str = "dev") -> list[bytes]:
        """C{count} messages (the first with an attachment) in C{user}'s INBOX; their bytes."""
        out = []
        for i in range(count):
            data = messageBytes(sampleMessage(f"sample {i}", attachment=BLOB if i == 0 else None))
            self.store(user, data)
            out.append(data)
        return out

    # -- clients -------------------------------------------------------------------------

    def imaps(self, user: str = "dev", password: str = "devpass") -> imaplib.IMAP4_SSL:
        """The books' recipe: IMAP4_SSL, login, select('Inbox')."""
        c = imaplib.IMAP4_SSL("127.0.0.1", self.port(IMAPS), ssl_context=self.context(), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, c)
        c.login(user, password)
        typ, data = c.select("Inbox")
        self.assertEqual(typ, "OK", data)
        return c

    def pop3s(self, user: str = "dev", password: str = "devpass") -> poplib.POP3_SSL:
        """The books' recipe: POP3_SSL, user, pass_."""
        c = poplib.POP3_SSL("127.0.0.1", self.port(POP3S), context=self.context(), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, c)
        c.user(user)
        c.pass_(password)
        return c

    @staticmethod
    def _closeQuietly(client) -> None:
        try:
            if isinstance(client, imaplib.IMAP4):
                if client.state != "LOGOUT":
                    client.shutdown()
            else:
                client.close()
        except OSError:
            pass

    def fetchAll(self, c: imaplib.IMAP4) -> dict[int, bytes]:
        """UID -> RFC822 bytes of every message in the selected folder."""
        typ, data = c.uid("FETCH", "1:*", "(UID RFC822)")
        self.assertEqual(typ, "OK", data)
        return {uidOf(items): literal for items, literal in fetched(data)}

    def uids(self, c: imaplib.IMAP4) -> list[int]:
        typ, data = c.uid("SEARCH", None, "ALL")
        self.assertEqual(typ, "OK", data)
        return [int(u) for u in data[0].split()]


# -- Python's imaplib ------------------------------------------------------------------


class ImaplibTests(MailboxDaemonTestCase):
    def test_booksRecipe(self):
        """IMAP4_SSL, login, select('Inbox'), search ALL, fetch (RFC822): the stored messages, in order."""
        stored = self.storeSamples(3)
        c = self.imaps()
        typ, data = c.search(None, "ALL")
        self.assertEqual((typ, data), ("OK", [b"1 2 3"]))
        for num, expected in zip(data[0].split(), stored, strict=True):
            typ, msg = c.fetch(num, "(RFC822)")
            self.assertEqual(typ, "OK", msg)
            self.assertEqual(msg[0][1], crlf(expected))
        (att,) = message_from_bytes(c.fetch(b"1", "(RFC822)")[1][0][1], policy=policy.default).iter_attachments()
        self.assertEqual(att.get_payload(decode=True), BLOB)
        typ, data = c.fetch(b"2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] RFC822.SIZE FLAGS)")
        self.assertEqual(typ, "OK", data)
        self.assertIn(b"Subject: sample 1", data[0][1])
        # the items after the literal arrive as the next element
        rest = data[0][0] + b" " + b" ".join(d for d in data[1:] if isinstance(d, bytes))
        self.assertIn(f"RFC822.SIZE {len(crlf(stored[1]))}".encode(), rest)
        self.assertEqual(c.logout()[0], "BYE")

    def test_otherDeliverersOrder(self):
        """
        Messages another MDA (Dovecot's LDA, Postfix, procmail) put into new/ get
        UIDs, IMAP sequence numbers and POP3 numbers in delivery order: the time,
        then the microseconds of the name (C{time.M<usec>P<pid>...}, not zero-padded:
        M99999 came before M100000).
        """
        new = self.mail / "dev" / "new"
        for sub in ("cur", "new", "tmp"):
            (self.mail / "dev" / sub).mkdir(parents=True, exist_ok=True)
        stamps = [(1800000000, 5), (1800000000, 40), (1800000000, 99999), (1800000000, 100000),
                  (1800000000, 999999), (1800000001, 7), (1800000001, 123456)]
        subjects = []
        for n, (t, usec) in enumerate(stamps):
            data = messageBytes(sampleMessage(f"delivered {n}"))
            (new / f"{t}.M{usec}P4242Q{n}.other.test,S={len(data)}").write_bytes(data)
            subjects.append(f"delivered {n}")
        c = self.imaps()
        typ, data = c.fetch("1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        self.assertEqual(typ, "OK", data)
        got = [message_from_bytes(literal)["Subject"] for _, literal in fetched(data)]
        self.assertEqual(got, subjects)
        uids = [uidOf(items) for items, _ in fetched(data)]
        self.assertEqual(uids, sorted(uids))
        c.logout()
        p = self.pop3s()
        self.assertEqual([message_from_bytes(b"\r\n".join(p.top(n, 0)[1]))["Subject"]
                          for n in range(1, len(stamps) + 1)], subjects)
        p.quit()

    def test_starttlsThenLogin(self):
        """The plain port: STARTTLS and LOGINDISABLED before TLS, LOGIN refused; after STARTTLS it works."""
        self.storeSamples(1)
        c = imaplib.IMAP4("127.0.0.1", self.port(IMAP), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, c)
        self.assertIn("STARTTLS", c.capabilities)
        self.assertIn("LOGINDISABLED", c.capabilities)
        # imaplib refuses to send LOGIN when LOGINDISABLED is advertised; send it anyway
        try:
            typ, data = c._simple_command("LOGIN", "dev", "devpass")  # noqa: SLF001 - a raw command on purpose
        except imaplib.IMAP4.error as e:  # BAD
            typ, data = "BAD", [str(e)]
        self.assertIn(typ, ("NO", "BAD"), data)
        self.assertEqual(c.state, "NONAUTH")
        c.starttls(ssl_context=self.context())
        self.assertNotIn("LOGINDISABLED", c.capabilities)
        c.login("dev", "devpass")
        typ, data = c.capability()
        caps = data[0].upper().split()
        for ext in EXTENSIONS:
            self.assertIn(ext.encode(), caps, data)
        self.assertEqual(c.select("INBOX"), ("OK", [b"1"]))
        c.logout()

    def test_wrongPassword(self):
        c = imaplib.IMAP4_SSL("127.0.0.1", self.port(IMAPS), ssl_context=self.context(), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, c)
        with self.assertRaises(imaplib.IMAP4.error) as e:
            c.login("dev", "wrong")
        self.assertIn("AUTHENTICATIONFAILED", str(e.exception).upper())
        c.login("dev", "devpass")  # the same session may try again
        c.logout()

    def test_foldersAppendMoveExpunge(self):
        """LIST with SPECIAL-USE, APPEND (APPENDUID), UID MOVE (COPYUID), STORE \\Deleted + EXPUNGE."""
        c = self.imaps()
        typ, data = c.list()
        self.assertEqual(typ, "OK", data)
        listing = b"\n".join(data)
        for name, attr in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                           ("Archive", "\\Archive")):
            self.assertRegex(listing, re.compile(rb"\(.*" + re.escape(attr.encode()) + rb".*\) \"\.\" \"?"
                                                 + name.encode() + rb"\"?", re.I))
        draft = messageBytes(sampleMessage("a draft"))
        typ, data = c.append("Drafts", "(\\Draft \\Seen)", imaplib.Time2Internaldate(time.time()), draft)
        self.assertEqual(typ, "OK", data)
        self.assertRegex(data[0], rb"\[APPENDUID \d+ \d+\]")
        self.assertEqual(c.select("Drafts")[0], "OK")
        (uid,) = self.uids(c)
        typ, data = c.uid("FETCH", str(uid), "(FLAGS RFC822)")
        self.assertEqual(data[0][1], crlf(draft))
        self.assertIn(b"\\Draft", data[0][0])
        typ, data = c.uid("MOVE", str(uid), "Archive")
        self.assertEqual(typ, "OK", data)
        self.assertEqual(self.uids(c), [])
        self.assertEqual(c.select("Archive")[0], "OK")
        (moved,) = self.uids(c)
        self.assertEqual(c.uid("STORE", str(moved), "+FLAGS", "(\\Deleted)")[0], "OK")
        typ, data = c.expunge()
        self.assertEqual(typ, "OK", data)
        self.assertEqual(self.uids(c), [])
        # a folder of one's own, and one with a name outside ASCII (modified UTF-7 on the wire)
        self.assertEqual(c.create("Projects")[0], "OK")
        self.assertEqual(c.create("&AMk-t&AOk-")[0], "OK")  # "Été"
        names = b"\n".join(c.list()[1])
        self.assertIn(b"Projects", names)
        self.assertIn(b"&AMk-t&AOk-", names)
        c.logout()

    def rawImaps(self) -> tuple[ssl.SSLSocket, BinaryIO]:
        """A verified TLS connection to the IMAPS port, logged in as dev (tag L1), greeting read."""
        raw = socket.create_connection(("127.0.0.1", self.port(IMAPS)), timeout=IO_TIMEOUT)
        s = self.context().wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(s.close)
        f = s.makefile("rb")
        self.assertTrue(f.readline().startswith(b"* OK"))
        s.sendall(b"L1 LOGIN dev devpass\r\n")
        for _ in range(10):
            line = f.readline()
            if line.startswith(b"L1 "):
                break
        self.assertTrue(line.startswith(b"L1 OK"), line)
        self.addCleanup(f.close)
        return s, f

    def leftovers(self, folder: str = "") -> list[str]:
        """Files in the tmp/ folders of dev's INBOX (or of C{folder}, Maildir++ name like '.Drafts')."""
        tmp = self.mail / "dev" / folder / "tmp"
        return sorted(os.listdir(tmp)) if tmp.is_dir() else []

    def test_vanishedMidAppend(self):
        """A client that goes away in the middle of an APPEND literal leaves nothing behind."""
        self.storeSamples(1)
        s, f = self.rawImaps()
        s.sendall(b"A1 APPEND INBOX {200000}\r\n")
        self.assertTrue(f.readline().startswith(b"+"))
        s.sendall(b"Subject: half\r\n\r\n" + b"x" * 100000)
        time.sleep(0.2)  # let the server take some of it
        s.close()
        c = self.imaps()
        self.assertEqual(len(self.uids(c)), 1)
        c.logout()
        for _ in range(50):  # the server notices the close when it next reads
            if not self.leftovers():
                break
            time.sleep(0.1)
        self.assertEqual(self.leftovers(), [])

    def test_appendOverTheLimit(self):
        """An APPEND announcing more than APPENDLIMIT is refused before its literal is sent."""
        c = self.imaps()
        limits = [cap for cap in c.capabilities if cap.startswith("APPENDLIMIT=")]
        self.assertTrue(limits, c.capabilities)
        limit = int(limits[0].split("=", 1)[1])
        c.logout()
        s, f = self.rawImaps()
        s.sendall(b"A1 APPEND INBOX {%d}\r\n" % (limit + 1))
        line = f.readline()
        self.assertRegex(line, rb"^A1 (NO|BAD) ", line)
        self.assertIn(b"TOOBIG", line.upper())
        s.sendall(b"A2 NOOP\r\n")  # the session goes on
        self.assertTrue(f.readline().startswith(b"A2 OK"))
        # LITERAL+ (no continuation to wait for): refused too, and the bytes are not kept
        s.sendall(b"A3 APPEND INBOX {%d+}\r\n" % (limit + 1))
        line = f.readline()
        self.assertRegex(line, rb"^(A3 (NO|BAD) |\* BYE )", line)

    def test_idleSeesDeliveryAndOtherSession(self):
        """IDLE reports a message delivered meanwhile (EXISTS); NOOP reports another session's EXPUNGE."""
        self.storeSamples(1)
        c = self.imaps()
        c.send(b"X1 IDLE\r\n")
        self.assertTrue(c.readline().startswith(b"+"))
        self.store("dev", messageBytes(sampleMessage("while idling")))
        c.sock.settimeout(IO_TIMEOUT)
        self.assertEqual(c.readline().strip(), b"* 2 EXISTS")
        c.send(b"DONE\r\n")
        for _ in range(20):
            line = c.readline()
            if line.startswith(b"X1 "):
                break
        self.assertTrue(line.startswith(b"X1 OK"), line)

        other = self.imaps()
        (first, _) = self.uids(other)
        self.assertEqual(other.uid("STORE", str(first), "+FLAGS", "(\\Deleted)")[0], "OK")
        self.assertEqual(other.expunge()[0], "OK")
        other.logout()
        typ, data = c.noop()
        self.assertEqual(typ, "OK")
        self.assertIn(b"1", c.untagged_responses.get("EXPUNGE", []), c.untagged_responses)
        self.assertEqual(len(self.uids(c)), 1)
        c.logout()


# -- Python's poplib -------------------------------------------------------------------


class PoplibTests(MailboxDaemonTestCase):
    def test_booksRecipe(self):
        """POP3_SSL, user, pass_, stat, list, retr: the stored messages; uidl and top."""
        stored = self.storeSamples(3)
        c = self.pop3s()
        self.assertEqual(c.stat(), (3, sum(len(crlf(m)) for m in stored)))
        resp, listing, _ = c.list()
        self.assertTrue(resp.startswith(b"+OK"))
        self.assertEqual(listing, [f"{i + 1} {len(crlf(m))}".encode() for i, m in enumerate(stored)])
        for i, expected in enumerate(stored):
            resp, lines, octets = c.retr(i + 1)
            self.assertEqual(b"\r\n".join(lines) + b"\r\n", crlf(expected))  # poplib undoes the dot-stuffing
        resp, uidls, _ = c.uidl()
        ids = [line.split()[1] for line in uidls]
        self.assertEqual(len(set(ids)), 3)
        resp, lines, _ = c.top(2, 1)
        self.assertIn(b"Subject: sample 1", lines)
        self.assertEqual(c.quit()[:3], b"+OK")
        c2 = self.pop3s()  # the same unique ids in the next session
        self.assertEqual([line.split()[1] for line in c2.uidl()[1]], ids)
        c2.quit()

    def test_stlsThenUser(self):
        """The plain port: CAPA has STLS; USER before STLS is refused; after STLS it works."""
        self.storeSamples(1)
        c = poplib.POP3("127.0.0.1", self.port(POP3), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, c)
        self.assertIn("STLS", c.capa())
        with self.assertRaises(poplib.error_proto):
            c.user("dev")
            c.pass_("devpass")
        c.stls(context=self.context())
        c.user("dev")
        c.pass_("devpass")
        self.assertEqual(c.stat()[0], 1)
        c.quit()

    def test_wrongPassword(self):
        c = poplib.POP3_SSL("127.0.0.1", self.port(POP3S), context=self.context(), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, c)
        c.user("dev")
        with self.assertRaises(poplib.error_proto):
            c.pass_("wrong")

    def test_deleTakesEffectAtQuit(self):
        """DELE then a dropped connection: nothing deleted; DELE then QUIT: gone (IMAP agrees)."""
        stored = self.storeSamples(2)
        c = self.pop3s()
        c.dele(1)
        c.sock.close()  # no QUIT: the UPDATE state is never entered
        c = self.pop3s()
        for _ in range(50):  # the server may still be tearing the first session down
            if c.stat()[0] == 2:
                break
            c.quit()
            time.sleep(0.1)
            c = self.pop3s()
        self.assertEqual(c.stat()[0], 2)
        c.dele(1)
        self.assertEqual(c.stat()[0], 1)  # marked messages are not counted
        c.quit()
        c = self.pop3s()
        self.assertEqual(c.stat()[0], 1)
        self.assertEqual(b"\r\n".join(c.retr(1)[1]) + b"\r\n", crlf(stored[1]))
        c.quit()


# -- curl --------------------------------------------------------------------------------


class CurlTests(MailboxDaemonTestCase):
    def curl(self, *args: str, user: str = "dev:devpass") -> tuple[int, bytes, str]:
        curl = requirePeer("curl", "curl")
        result = runToCompletion(self, [curl, "-sS", "--max-time", "20", "--cacert", self.cafile,
                                        "-u", user, *args], timeout=30)
        return result.returncode, result.stdout, result.stderr.decode(errors="replace")

    def test_imaps(self):
        """imaps://: LIST of the folders, SEARCH, and one message by UID, the stored bytes."""
        stored = self.storeSamples(2)
        base = f"imaps://127.0.0.1:{self.port(IMAPS)}"
        rc, out, err = self.curl(base + "/")
        self.assertEqual(rc, 0, err)
        for name in (b"INBOX", b"Sent", b"Drafts", b"Trash", b"Archive"):
            self.assertIn(name, out)
        rc, out, err = self.curl(base + "/INBOX?ALL")
        self.assertEqual((rc, out.strip()), (0, b"* SEARCH 1 2"), err)
        rc, out, err = self.curl(base + "/INBOX;UID=2")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, crlf(stored[1]))
        rc, out, err = self.curl(base + "/INBOX;UID=1")
        (att,) = message_from_bytes(out, policy=policy.default).iter_attachments()
        self.assertEqual(att.get_payload(decode=True), BLOB)

    def test_imapStarttls(self):
        stored = self.storeSamples(1)
        rc, out, err = self.curl("--ssl-reqd", f"imap://127.0.0.1:{self.port(IMAP)}/INBOX;UID=1")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, crlf(stored[0]))

    def test_pop3s(self):
        """pop3s://: LIST, and RETR of one message, the stored bytes."""
        stored = self.storeSamples(2)
        base = f"pop3s://127.0.0.1:{self.port(POP3S)}"
        rc, out, err = self.curl(base + "/")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.split(b"\r\n")[:2], [f"{i + 1} {len(crlf(m))}".encode() for i, m in enumerate(stored)])
        rc, out, err = self.curl(base + "/2")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, crlf(stored[1]))

    def test_pop3Stls(self):
        stored = self.storeSamples(1)
        rc, out, err = self.curl("--ssl-reqd", f"pop3://127.0.0.1:{self.port(POP3)}/1")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, crlf(stored[0]))

    def test_wrongPassword(self):
        """curl's 'Login denied' (67) on both protocols; and no login in clear text without TLS."""
        self.storeSamples(1)
        rc, _, err = self.curl(f"imaps://127.0.0.1:{self.port(IMAPS)}/INBOX;UID=1", user="dev:wrong")
        self.assertEqual(rc, 67, err)
        rc, _, err = self.curl(f"pop3s://127.0.0.1:{self.port(POP3S)}/1", user="dev:wrong")
        self.assertEqual(rc, 67, err)
        rc, out, err = self.curl(f"imap://127.0.0.1:{self.port(IMAP)}/INBOX;UID=1")
        self.assertNotEqual(rc, 0, out)
        rc, out, err = self.curl(f"pop3://127.0.0.1:{self.port(POP3)}/1")
        self.assertNotEqual(rc, 0, out)


# -- fetchmail ----------------------------------------------------------------------------


class FetchmailTests(MailboxDaemonTestCase):
    def fetchmail(self, protocol: str, port: int, tls: str, keep: bool = True) -> tuple[int, str, list[bytes]]:
        """
        One fetchmail poll of C{dev}'s INBOX (C{tls}: "ssl" for implicit TLS, "starttls"
        for STARTTLS/STLS), every message piped to an MDA that writes it to its own file.
        Returns fetchmail's status, its output and the files, in delivery order.
        """
        fetchmail = requirePeer("fetchmail", "fetchmail")
        home = Path(self.mktemp()).resolve()
        out = home / "out"
        out.mkdir(parents=True)
        tlsLine = "ssl sslcertck" if tls == "ssl" else "sslproto tls1.2+ sslcertck"
        rc = home / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            "set no bouncemail\n"
            # localhost (fetchmail checks DNS names, not IP addresses, in the certificate)
            f"poll localhost service {port} protocol {protocol} auth password timeout 10\n"
            f'  user "dev" there with password "devpass" is "{getpass.getuser()}" here\n'
            f'  {tlsLine} sslcertfile "{self.cafile}"\n'
            f"  {'keep' if keep else 'nokeep'} fetchall\n"
            f"  mda \"/bin/sh -c 'cat > {out}/m.$$'\"\n")  # one shell per message
        os.chmod(rc, 0o600)
        # a lock file of its own: as root fetchmail locks /var/run/fetchmail.pid whatever FETCHMAILHOME
        # says, and another test worker's fetchmail would find it held
        result = subprocess.run([fetchmail, "-f", str(rc), "-v", "--nosyslog", "--pidfile", str(home / "pid")],
                                capture_output=True,
                                timeout=60, env=dict(os.environ, FETCHMAILHOME=str(home)))
        files = [p.read_bytes() for p in sorted(out.iterdir(), key=lambda p: p.stat().st_mtime_ns)]
        return result.returncode, decoded(result) + "\n--- the daemon said:\n" + self.daemon.output()[-3000:], files

    def assertFetched(self, files: list[bytes], stored: list[bytes], output: str) -> None:
        self.assertEqual(len(files), len(stored), output)
        for got, expected in zip(files, stored, strict=True):
            self.assertTrue(got.startswith(b"Received: "), got[:200])  # fetchmail's own
            self.assertTrue(lf(got).endswith(lf(expected)), (got[-300:], output[-2000:]))

    def test_pop3ImplicitTLS(self):
        stored = self.storeSamples(3)
        status, out, files = self.fetchmail("POP3", self.port(POP3S), "ssl")
        self.assertEqual(status, 0, out)
        self.assertFetched(files, stored, out)

    def test_pop3Stls(self):
        stored = self.storeSamples(2)
        status, out, files = self.fetchmail("POP3", self.port(POP3), "starttls")
        self.assertEqual(status, 0, out)
        self.assertIn("STLS", out)
        self.assertFetched(files, stored, out)

    def test_imapBothWaysThenPop3Deletes(self):
        """IMAP over TLS and with STARTTLS (keep), then POP3 without keep: the INBOX is empty after."""
        stored = self.storeSamples(3)
        status, out, files = self.fetchmail("IMAP", self.port(IMAPS), "ssl")
        self.assertEqual(status, 0, out)
        self.assertFetched(files, stored, out)
        status, out, files = self.fetchmail("IMAP", self.port(IMAP), "starttls")
        self.assertEqual(status, 0, out)
        self.assertIn("STARTTLS", out)
        self.assertFetched(files, stored, out)  # fetchall: the \Seen ones too
        status, out, files = self.fetchmail("POP3", self.port(POP3S), "ssl", keep=False)
        self.assertEqual(status, 0, out)
        self.assertFetched(files, stored, out)
        c = self.imaps()
        self.assertEqual(self.uids(c), [])
        c.logout()


# -- mbsync (isync) ------------------------------------------------------------------------


class MbsyncTests(MailboxDaemonTestCase):
    def mbsync(self, local: Path, starttls: bool = False) -> tuple[int, str]:
        mbsync = requirePeer("mbsync", "isync")
        home = local.parent
        rc = home / "mbsyncrc"
        rc.write_text(
            "IMAPAccount netsvc\n"
            "Host localhost\n"  # mbsync checks DNS names, not IP addresses, in the certificate
            f"Port {self.port(IMAP if starttls else IMAPS)}\n"
            "User dev\n"
            "Pass devpass\n"
            f"SSLType {'STARTTLS' if starttls else 'IMAPS'}\n"
            f"CertificateFile {self.cafile}\n"
            "\n"
            "IMAPStore remote\n"
            "Account netsvc\n"
            "\n"
            "MaildirStore local\n"
            f"Path {local}/\n"
            f"Inbox {local}/INBOX\n"
            "SubFolders Verbatim\n"
            "\n"
            "Channel everything\n"
            "Far :remote:\n"
            "Near :local:\n"
            "Patterns *\n"
            "Create Both\n"
            "Expunge Both\n"
            "SyncState *\n")
        result = subprocess.run([mbsync, "-c", str(rc), "-V", "-a"], capture_output=True, timeout=60,
                                env=dict(os.environ, HOME=str(home)))
        return result.returncode, decoded(result)

    @staticmethod
    def localMessages(folder: Path) -> list[bytes]:
        """The messages of a local Maildir folder, without the X-TUID header mbsync adds to each."""
        files = [p for sub in ("cur", "new") if (folder / sub).is_dir() for p in (folder / sub).iterdir()]
        return [re.sub(rb"(?m)^X-TUID: .*\n", b"", p.read_bytes(), count=1)
                for p in sorted(files, key=lambda p: p.name)]

    def test_twoWaySync(self):
        """Pull the INBOX and the special folders; push a local draft (APPEND) and a local flag and delete."""
        stored = self.storeSamples(3)
        home = Path(self.mktemp()).resolve()
        local = home / "Mail"
        local.mkdir(parents=True)
        status, out = self.mbsync(local)
        self.assertEqual(status, 0, out)
        got = self.localMessages(local / "INBOX")
        self.assertEqual(sorted(lf(m) for m in got), sorted(lf(m) for m in stored), out[-3000:])
        for name in ("Sent", "Drafts", "Trash", "Archive"):
            self.assertTrue((local / name / "cur").is_dir(), (name, sorted(p.name for p in local.iterdir())))

        # local changes: a new draft, the first INBOX message seen, the second deleted
        draft = messageBytes(sampleMessage("written offline"))
        (local / "Drafts" / "new" / "1800000000.1_1.offline").write_bytes(lf(draft))
        inbox = [p for sub in ("cur", "new") for p in (local / "INBOX" / sub).iterdir()]
        byName = {message_from_bytes(p.read_bytes())["Subject"]: p for p in inbox}

        def flag(path: Path, letters: str) -> None:  # as a mail reader does: into cur/ with :2,FLAGS
            path.rename(local / "INBOX" / "cur" / (path.name.split(":2,")[0] + ":2," + letters))

        flag(byName["sample 0"], "S")
        flag(byName["sample 1"], "T")
        status, out = self.mbsync(local)
        self.assertEqual(status, 0, out)

        c = self.imaps()
        typ, data = c.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        flags = {message_from_bytes(literal)["Subject"]: items for items, literal in fetched(data)}
        self.assertEqual(sorted(flags), ["sample 0", "sample 2"], data)
        self.assertIn(b"\\Seen", flags["sample 0"])
        self.assertNotIn(b"\\Seen", flags["sample 2"])
        self.assertEqual(c.select("Drafts")[0], "OK")
        # mbsync puts its X-TUID header into what it uploads (Dovecot gets the same)
        self.assertEqual([re.sub(rb"(?m)^X-TUID: .*\r\n", b"", m, count=1) for m in self.fetchAll(c).values()],
                         [crlf(draft)])
        c.logout()

        # and a server-side change comes back down
        self.store("dev", messageBytes(sampleMessage("arrived later")))
        status, out = self.mbsync(local)
        self.assertEqual(status, 0, out)
        subjects = sorted(message_from_bytes(m)["Subject"] for m in self.localMessages(local / "INBOX"))
        self.assertEqual(subjects, ["arrived later", "sample 0", "sample 2"])

    def test_starttlsAndNestedFolders(self):
        """Over STARTTLS: a server folder two levels deep comes down; a folder made locally goes up."""
        c = self.imaps()
        self.assertEqual(c.create("Projects.2026")[0], "OK")
        nested = messageBytes(sampleMessage("in a nested folder"))
        self.assertEqual(c.append("Projects.2026", None, None, nested)[0], "OK")
        c.logout()
        home = Path(self.mktemp()).resolve()
        local = home / "Mail"
        local.mkdir(parents=True)
        status, out = self.mbsync(local, starttls=True)
        self.assertEqual(status, 0, out)
        self.assertIn("STARTTLS", out.upper())
        self.assertEqual([lf(m) for m in self.localMessages(local / "Projects" / "2026")], [lf(nested)], out[-3000:])
        # a folder of one's own, made by the local mail reader
        for sub in ("cur", "new", "tmp"):
            (local / "Local" / sub).mkdir(parents=True)
        mine = messageBytes(sampleMessage("filed locally"))
        (local / "Local" / "cur" / "1800000000.2_1.offline:2,S").write_bytes(lf(mine))
        status, out = self.mbsync(local, starttls=True)
        self.assertEqual(status, 0, out)
        c = self.imaps()
        self.assertEqual(c.select("Local")[0], "OK")
        self.assertEqual([re.sub(rb"(?m)^X-TUID: .*\r\n", b"", m, count=1) for m in self.fetchAll(c).values()],
                         [crlf(mine)])
        c.logout()


# -- end to end: SMTP local delivery, IMAP, POP3, restart ------------------------------------


class EndToEndTests(MailboxDaemonTestCase):
    withSMTP = True

    def send(self, message: EmailMessage, to: list[str] | None = None) -> bytes:
        data = messageBytes(message)
        with smtplib.SMTP("127.0.0.1", self.port(SMTP), timeout=IO_TIMEOUT) as s:
            refused = s.sendmail("sender@example.test", to or [message["To"]], data)
        self.assertEqual(refused, {})
        return data

    def test_smtpToImapToPop3AndRestart(self):
        sent = self.send(sampleMessage("end to end", attachment=BLOB))
        other = self.send(sampleMessage("kept"))
        watcher = self.imaps()  # stays selected on INBOX throughout

        # IMAP FETCH: the same bytes, after the headers delivery adds
        c = self.imaps()
        messages = self.fetchAll(c)
        self.assertEqual(len(messages), 2, messages.keys())
        (uidA, fetchedA), (uidB, fetchedB) = sorted(messages.items())
        self.assertTrue(fetchedA.endswith(sent), fetchedA[:600])
        self.assertTrue(fetchedB.endswith(other), fetchedB[:600])
        head = fetchedA[: len(fetchedA) - len(sent)]
        self.assertTrue(head.startswith(b"Return-Path: <sender@example.test>\r\n"), head)
        self.assertIn(b"Delivered-To: dev@lab.test\r\n", head)
        self.assertIn(b"Received: from ", head)
        (att,) = message_from_bytes(fetchedA, policy=policy.default).iter_attachments()
        self.assertEqual((att.get_filename(), att.get_payload(decode=True)), ("blob.bin", BLOB))
        typ, data = c.status("INBOX", "(UIDVALIDITY UIDNEXT MESSAGES)")
        uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))
        c.logout()

        # POP3: the same message, found by its Message-ID; DELE, QUIT
        p = self.pop3s()
        count, _ = p.stat()
        self.assertEqual(count, 2)
        target = None
        for n in range(1, count + 1):
            _, lines, _ = p.top(n, 0)
            if b"Message-ID: <end.to.end@example.test>" in lines:
                target = n
        self.assertIsNotNone(target)
        _, lines, _ = p.retr(target)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", fetchedA)
        p.dele(target)
        p.quit()

        # IMAP sees it gone: the open session by NOOP (EXPUNGE), a new one by SEARCH
        self.assertEqual(watcher.noop()[0], "OK")
        self.assertIn(b"1", watcher.untagged_responses.get("EXPUNGE", []), watcher.untagged_responses)
        c = self.imaps()
        self.assertEqual(self.uids(c), [uidB])
        c.logout()
        watcher.logout()

        # restart: the same UIDVALIDITY and UIDs; a new message gets a higher UID
        self.restart()
        c = self.imaps()
        typ, data = c.status("INBOX", "(UIDVALIDITY)")
        self.assertEqual(int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1)), uidvalidity)
        self.assertEqual(self.fetchAll(c), {uidB: fetchedB})
        c.logout()
        self.send(sampleMessage("after restart"))
        c = self.imaps()
        uids = self.uids(c)
        self.assertEqual(len(uids), 2)
        self.assertEqual(uids[0], uidB)
        self.assertGreater(uids[1], uidA)
        c.logout()

    def test_aliasesPlusAddressesUnknownUsers(self):
        """postmaster (an alias) and dev+tag reach dev; an unknown local user is refused at RCPT (550)."""
        self.send(sampleMessage("to postmaster", to="postmaster@lab.test"))
        self.send(sampleMessage("plus address", to="dev+lists@lab.test"))
        self.send(sampleMessage("to qa", to="qa@localhost"))
        with smtplib.SMTP("127.0.0.1", self.port(SMTP), timeout=IO_TIMEOUT) as s:
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as e:
                s.sendmail("sender@example.test", ["nobody@lab.test"], b"Subject: x\r\n\r\nx\r\n")
        self.assertEqual(e.exception.recipients["nobody@lab.test"][0], 550)
        c = self.imaps()
        subjects = sorted(message_from_bytes(m)["Subject"] for m in self.fetchAll(c).values())
        self.assertEqual(subjects, ["plus address", "to postmaster"])
        c.logout()
        p = self.pop3s("qa", "qapass")
        self.assertEqual(p.stat()[0], 1)
        p.quit()

    def test_loggingHandlerToLocalhost(self):
        """The books' SMTPHandler mailing user@localhost, read back with poplib."""
        handler = logging.handlers.SMTPHandler(("127.0.0.1", self.port(SMTP)), "app@example.test",
                                               ["dev@localhost"], "an error in the app", timeout=IO_TIMEOUT)
        logger = logging.getLogger("netsvc.tests.mailbox")
        logger.propagate = False
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        logger.error("disk %s is full", "/var")
        p = self.pop3s()
        self.assertEqual(p.stat()[0], 1)
        _, lines, _ = p.retr(1)
        msg = message_from_bytes(b"\r\n".join(lines), policy=policy.default)
        self.assertEqual(msg["Subject"], "an error in the app")
        self.assertIn("disk /var is full", msg.get_content())
        p.quit()


class WorkersTests(MailboxDaemonTestCase):
    """
    C{workers: 2}: each connection goes to either process, and both deliver,
    assign UIDs and expunge in the same Maildirs (the store's flock).
    """

    withSMTP = True
    workers = 2
    MESSAGES = 40

    def sendMany(self, count: int, threads: int = 4) -> None:
        """C{count} messages to dev, one SMTP connection each, from C{threads} threads."""
        errors: list[BaseException] = []

        def sender(first: int) -> None:
            try:
                for n in range(first, count, threads):
                    with smtplib.SMTP("127.0.0.1", self.port(SMTP), timeout=IO_TIMEOUT) as s:
                        s.sendmail("sender@example.test", ["dev@lab.test"], messageBytes(sampleMessage(f"m{n:03d}")))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        # meanwhile, new IMAP sessions on either worker take new/ into cur/ and assign UIDs
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in workers) and time.monotonic() < deadline:
            c = self.imaps()
            self.uids(c)
            c.logout()
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        self.assertEqual(errors, [])

    def uidMap(self) -> dict[int, str]:
        c = self.imaps()
        typ, data = c.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        c.logout()
        self.assertEqual(typ, "OK", data)
        return {uidOf(items): message_from_bytes(literal)["Subject"] for items, literal in fetched(data)}

    def test_bothWorkersOneMailbox(self):
        """Every message once, one UID each, the same map from every session; IDLE sees the other worker's mail."""
        idler = self.imaps()
        idler.send(b"X1 IDLE\r\n")
        self.assertTrue(idler.readline().startswith(b"+"))
        self.sendMany(self.MESSAGES)

        maps = [self.uidMap() for _ in range(6)]  # six connections: both workers answer
        for m in maps[1:]:
            self.assertEqual(m, maps[0])
        self.assertEqual(sorted(maps[0].values()), [f"m{n:03d}" for n in range(self.MESSAGES)])

        idler.sock.settimeout(IO_TIMEOUT)
        seen = 0
        for _ in range(self.MESSAGES * 4):  # EXISTS lines (and keepalives), bounded
            line = idler.readline()
            m = re.match(rb"\* (\d+) EXISTS", line)
            if m:
                seen = int(m.group(1))
                if seen == self.MESSAGES:
                    break
        self.assertEqual(seen, self.MESSAGES)
        idler.send(b"DONE\r\n")

        # POP3 from either worker: the same unique ids; DELE at QUIT seen by IMAP everywhere
        p = self.pop3s()
        count, _ = p.stat()
        self.assertEqual(count, self.MESSAGES)
        ids = [line.split()[1] for line in p.uidl()[1]]
        self.assertEqual(len(set(ids)), self.MESSAGES)
        for n in range(1, 11):
            p.dele(n)
        p.quit()
        after = [self.uidMap() for _ in range(4)]
        for m in after:
            self.assertEqual(len(m), self.MESSAGES - 10)
            self.assertEqual(m, {uid: subject for uid, subject in maps[0].items() if uid in m})


# -- netsvc mail read against a real server (Dovecot) --------------------------------------


class MailReadDovecotTests(unittest.TestCase):
    """
    The client side, C{netsvc mail read}, against Dovecot 2.3 (a private instance,
    tests/interop/_dovecot.py): listing and --show over IMAPS, POP3S and both plain
    ports with STARTTLS/STLS, the certificate verified, a wrong password one line
    and status 1, and reading changes nothing on the server (no \\Seen, nothing deleted).
    """

    def setUp(self) -> None:
        from netsvc.tls.certificates import generateSelfSigned
        from tests.interop._dovecot import Dovecot

        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.cert, key = base / "cert.pem", base / "key.pem"
        generateSelfSigned(self.cert, key, ["localhost", "127.0.0.1"])
        self.dovecot = Dovecot(self, {"dev": "devpass"}, self.cert, key)
        self.stored = []
        for i in range(3):
            data = messageBytes(sampleMessage(f"dovecot {i}", attachment=BLOB if i == 0 else None))
            self.dovecot.deliver("dev", data, name=f"{1800000000 + i}.M1P1Q{i}.test")
            self.stored.append(data)

    def read(self, *args: str, password: str = "devpass") -> tuple[int, str, str]:
        result = subprocess.run([sys.executable, "-m", "netsvc", "mail", "read", "--cacert", str(self.cert),
                                 "--user", "dev", *args], capture_output=True, timeout=60,
                                cwd=str(REPO), env=dict(childEnvironment(), NETSVC_MAIL_PASSWORD=password))
        return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")

    def assertListing(self, out: str, err: str) -> None:
        lines = out.splitlines()
        self.assertEqual(len(lines), 3, (out, err, self.dovecot.output()))
        for line, i in zip(lines, range(3), strict=True):
            self.assertIn(f"dovecot {i}", line)
            self.assertIn("sender@example.test", line)

    def test_imap(self):
        for args in (["--server", f"127.0.0.1:{self.dovecot.imaps}"],
                     ["--starttls", "--server", f"127.0.0.1:{self.dovecot.imap}"]):
            status, out, err = self.read(*args)
            self.assertEqual(status, 0, (args, err, self.dovecot.output()))
            self.assertListing(out, err)
            status, out, err = self.read(*args, "--show", "1")
            self.assertEqual(status, 0, (args, err))
            self.assertEqual(out.encode(), lf(self.stored[0]))
        # EXAMINE: nothing was marked \Seen
        c = imaplib.IMAP4_SSL("127.0.0.1", self.dovecot.imaps, ssl_context=ssl.create_default_context(
            cafile=str(self.cert)), timeout=IO_TIMEOUT)
        c.login("dev", "devpass")
        c.select("INBOX", readonly=True)
        typ, data = c.fetch("1:*", "(FLAGS)")
        c.logout()
        self.assertEqual(len(data), 3, data)
        self.assertFalse(any(b"\\Seen" in d for d in data), data)

    def test_pop3(self):
        for args in (["--pop3", "--server", f"127.0.0.1:{self.dovecot.pop3s}"],
                     ["--pop3", "--starttls", "--server", f"127.0.0.1:{self.dovecot.pop3}"]):
            status, out, err = self.read(*args)
            self.assertEqual(status, 0, (args, err, self.dovecot.output()))
            self.assertListing(out, err)
            status, out, err = self.read(*args, "--show", "2")
            self.assertEqual(status, 0, (args, err))
            self.assertEqual(out.encode(), lf(self.stored[1]))
        p = poplib.POP3_SSL("127.0.0.1", self.dovecot.pop3s, context=ssl.create_default_context(
            cafile=str(self.cert)), timeout=IO_TIMEOUT)
        p.user("dev")
        p.pass_("devpass")
        self.assertEqual(p.stat()[0], 3)  # nothing deleted
        p.quit()

    def test_failures(self):
        """A wrong password, an unknown folder, a message that is not there: one line on stderr, status 1."""
        cases = [(["--server", f"127.0.0.1:{self.dovecot.imaps}"], "wrong"),
                 (["--pop3", "--server", f"127.0.0.1:{self.dovecot.pop3s}"], "wrong"),
                 (["--server", f"127.0.0.1:{self.dovecot.imaps}", "--folder", "Nope"], "devpass"),
                 (["--server", f"127.0.0.1:{self.dovecot.imaps}", "--show", "99"], "devpass")]
        for args, password in cases:
            status, out, err = self.read(*args, password=password)
            self.assertEqual(status, 1, (args, out, err))
            self.assertEqual(len(err.strip().splitlines()), 1, (args, err))
            self.assertNotIn("Traceback", err)


# -- IMAP answers compared with Dovecot's -------------------------------------------------------


def imapParse(data: bytes, pos: int = 0) -> tuple[list, int]:
    """
    IMAP response data (after C{* n FETCH }) as nested lists: atoms and strings as
    bytes, NIL as None, literals as bytes; a section (C{BODY[1.MIME]<0>}) stays one atom.
    """
    out: list = []
    n = len(data)
    while pos < n:
        ch = data[pos:pos + 1]
        if ch in (b" ", b"\r", b"\n"):
            pos += 1
        elif ch == b"(":
            inner, pos = imapParse(data, pos + 1)
            out.append(inner)
        elif ch == b")":
            return out, pos + 1
        elif ch == b'"':
            pos += 1
            buf = bytearray()
            while data[pos:pos + 1] != b'"':
                if data[pos:pos + 1] == b"\\":
                    pos += 1
                buf += data[pos:pos + 1]
                pos += 1
            out.append(bytes(buf))
            pos += 1
        elif ch == b"{":
            end = data.index(b"}", pos)
            size = int(data[pos + 1:end].rstrip(b"+"))
            start = data.index(b"\n", end) + 1
            out.append(data[start:start + size])
            pos = start + size
        else:
            start = pos
            depth = 0
            while pos < n:
                c = data[pos:pos + 1]
                if c == b"[":
                    depth += 1
                elif c == b"]":
                    depth -= 1
                elif depth == 0 and c in (b" ", b"(", b")", b"\r", b"\n"):
                    break
                pos += 1
            atom = data[start:pos]
            out.append(None if atom.upper() == b"NIL" else atom)
    return out, pos


class RawIMAP:
    """A minimal IMAP client over verified TLS that keeps the answers' bytes (literals included)."""

    def __init__(self, port: int, cafile: str, user: str, password: str) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0
        self.command(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        self.command(b"SELECT INBOX")

    def command(self, line: bytes) -> tuple[list[bytes], bytes]:
        """Send one command; (untagged answers, each with its literals inline; the tagged line)."""
        self.n += 1
        tag = b"T%d" % self.n
        self.sock.sendall(tag + b" " + line + b"\r\n")
        untagged: list[bytes] = []
        for _ in range(100000):
            piece = self.file.readline()
            if not piece:
                raise AssertionError(f"connection closed after {line!r}")
            while re.search(rb"\{\d+\+?\}\r\n$", piece):
                size = int(re.search(rb"\{(\d+)\+?\}\r\n$", piece).group(1))
                piece += self.file.read(size) + self.file.readline()
            if piece.startswith(tag + b" "):
                return untagged, piece
            untagged.append(piece)
        raise AssertionError("no tagged answer")

    def close(self) -> None:
        try:
            self.command(b"LOGOUT")
        except (OSError, AssertionError):
            pass
        self.file.close()
        self.sock.close()


def multipartSamples() -> list[bytes]:
    """Messages whose structure tests FETCH and SEARCH: plain, alternative, attachment, nested, big, many headers."""
    plain = sampleMessage("plain one")
    plain["X-Tag"] = "blue"
    plain["Date"] = "Sat, 28 Nov 2026 23:30:00 -0800"  # 29 Nov in UTC: SENT* use the header's own date

    alt = EmailMessage()
    alt["From"] = "Alice Example <alice@example.test>"
    alt["To"] = "Bob <bob@lab.test>, carol@lab.test"
    alt["Cc"] = "dave@lab.test"
    alt["Subject"] = "Café au lait"  # RFC 2047 encoded on the wire
    alt["Date"] = "Tue, 01 Dec 2026 10:00:00 +0100"
    alt["Message-ID"] = "<alt@example.test>"
    alt.set_content("The plain part with a needle in it.\n")
    alt.add_alternative("<p>The <b>HTML</b> part.</p>\n", subtype="html")

    mixed = sampleMessage("with attachment", attachment=BLOB[:3000])
    mixed["Reply-To"] = "replies@example.test"
    mixed["In-Reply-To"] = "<alt@example.test>"
    mixed["Date"] = "Thu, 03 Dec 2026 12:00:00 +0000"

    nested = EmailMessage()
    nested["From"] = "forwarder@example.test"
    nested["To"] = "dev@lab.test"
    nested["Subject"] = "Fwd: plain one"
    nested["Date"] = "Wed, 02 Dec 2026 08:00:00 +0000"
    nested.set_content("Forwarded below.\n")
    nested.add_attachment(plain)  # message/rfc822

    big = sampleMessage("big one")
    big.set_content("haystack line\n" * 5000)
    big["Date"] = "Sat, 05 Dec 2026 12:00:00 +0000"

    return [messageBytes(m) for m in (plain, alt, mixed, nested, big)]


class DovecotComparisonTests(MailboxDaemonTestCase):
    """
    The same messages in netsvc and in Dovecot 2.3 (a private instance): FETCH of
    each structure and section, and SEARCH criteria, must answer the same
    (BODYSTRUCTURE compared without regard to case; sections byte for byte).
    """

    def setUp(self) -> None:
        super().setUp()
        from tests.interop._dovecot import Dovecot

        self.messages = multipartSamples()
        # Dovecot serves the daemon's own certificate
        key = Path(self.cafile).with_name("selfsigned.key")
        self.dovecot = Dovecot(self, {"dev": "devpass"}, Path(self.cafile), key)
        for i, data in enumerate(self.messages):
            self.store("dev", data)
            self.dovecot.deliver("dev", data, name=f"{1800000000 + i}.M1P1Q{i}.test")
        self.ours = RawIMAP(self.port(IMAPS), self.cafile, "dev", "devpass")
        self.theirs = RawIMAP(self.dovecot.imaps, self.cafile, "dev", "devpass")
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)

    def assertNoMismatches(self, mismatches: list) -> None:
        def short(v: object) -> object:
            if isinstance(v, (bytes, str)) and len(v) > 400:
                return v[:200] + b"..." + v[-120:] if isinstance(v, bytes) else v[:200] + "..." + v[-120:]
            if isinstance(v, (list, tuple)):
                return type(v)(short(x) for x in v)
            return v

        if mismatches:
            self.fail(f"{len(mismatches)} answers differ from Dovecot's (netsvc first):\n"
                      + "\n".join(pprint.pformat(short(m), width=200) for m in mismatches))

    def both(self, line: bytes) -> tuple[tuple[list[bytes], bytes], tuple[list[bytes], bytes]]:
        return self.ours.command(line), self.theirs.command(line)

    def fetchItems(self, answer: list[bytes]) -> dict[int, dict[bytes, object]]:
        """Sequence number -> {item name (upper-case): value} of the FETCH answers."""
        out: dict[int, dict[bytes, object]] = {}
        for line in answer:
            m = re.match(rb"\* (\d+) FETCH ", line)
            if m is None:
                continue
            (items,), _ = imapParse(line, m.end())
            d = out.setdefault(int(m.group(1)), {})
            for name, value in zip(items[::2], items[1::2], strict=True):
                d[name.upper()] = value
        return out

    def test_fetchSections(self):
        """Sections byte for byte: the whole message, header, text, parts, MIME headers, partial ranges."""
        mismatches = []
        # (HEADER/TEXT/1 after a part number only where that part is a message/rfc822: message 4's
        # part 2; elsewhere RFC 3501 leaves it undefined and Dovecot answers "")
        for item, messages in ((b"BODY.PEEK[]", b"1:*"), (b"BODY.PEEK[HEADER]", b"1:*"),
                               (b"BODY.PEEK[TEXT]", b"1:*"), (b"BODY.PEEK[1]", b"1:*"), (b"BODY.PEEK[2]", b"1:*"),
                               (b"BODY.PEEK[1.MIME]", b"1:*"), (b"BODY.PEEK[2.MIME]", b"1:*"),
                               (b"BODY.PEEK[HEADER.FIELDS (From Subject)]", b"1:*"),
                               (b"BODY.PEEK[HEADER.FIELDS.NOT (Received Date)]", b"1:*"),
                               (b"BODY.PEEK[]<10.20>", b"1:*"), (b"RFC822.SIZE", b"1:*"), (b"RFC822.HEADER", b"1:*"),
                               (b"BODY.PEEK[2.HEADER]", b"4"), (b"BODY.PEEK[2.TEXT]", b"4"),
                               (b"BODY.PEEK[2.1]", b"4")):
            (ours, oursTag), (theirs, theirsTag) = self.both(b"FETCH " + messages + b" (" + item + b")")
            self.assertTrue(theirsTag.split()[1] == b"OK", (item, theirsTag))
            if oursTag.split()[1] != b"OK":
                mismatches.append((item, "netsvc: " + oursTag.decode(errors="replace").strip()))
                continue
            a, b = self.fetchItems(ours), self.fetchItems(theirs)
            for seq in sorted(b):
                va, vb = list(a.get(seq, {}).values()), list(b[seq].values())
                if va != vb:
                    mismatches.append((item, seq, va[:1], vb[:1]))
        self.assertNoMismatches(mismatches)

    def test_structureAndEnvelope(self):
        def folded(value: object) -> object:
            if isinstance(value, list):
                return [folded(v) for v in value]
            return value.lower() if isinstance(value, bytes) else value

        mismatches = []
        for item in (b"BODYSTRUCTURE", b"BODY", b"ENVELOPE"):
            (ours, oursTag), (theirs, _) = self.both(b"FETCH 1:* (" + item + b")")
            if oursTag.split()[1] != b"OK":
                mismatches.append((item, "netsvc: " + oursTag.decode(errors="replace").strip()))
                continue
            a, b = self.fetchItems(ours), self.fetchItems(theirs)
            for seq in sorted(b):
                va, vb = a.get(seq, {}).get(item), b[seq].get(item)
                if folded(va) != folded(vb):
                    mismatches.append((item, seq, va, vb))
        self.assertNoMismatches(mismatches)

    def test_search(self):
        """SEARCH criteria (not NEW/OLD/RECENT: \\Recent is optional in practice, and gone in IMAP4rev2)."""
        # flags and a keyword on both, the same way
        for line in (b"STORE 2 +FLAGS (\\Seen)", b"STORE 3 +FLAGS (\\Flagged $label1)", b"STORE 5 +FLAGS (\\Deleted)"):
            (_, a), (_, b) = self.both(line)
            self.assertIn(b" OK", a)
        mismatches = []
        for criteria in (b"ALL", b"SUBJECT \"plain\"", b"SUBJECT \"caf\xc3\xa9\"", b"CHARSET UTF-8 SUBJECT \"caf\"",
                         b"FROM \"alice\"", b"TO \"carol\"", b"CC \"dave\"", b"BODY \"needle\"", b"TEXT \"needle\"",
                         b"TEXT \"alice\"", b"HEADER \"X-Tag\" \"blue\"", b"HEADER \"Message-ID\" \"alt@\"",
                         b"LARGER 20000", b"SMALLER 2000", b"NOT SUBJECT \"plain\"",
                         b"OR FROM \"alice\" SUBJECT \"big\"", b"SENTSINCE 2-Dec-2026", b"SENTBEFORE 2-Dec-2026",
                         b"SENTON 1-Dec-2026", b"SENTON 28-Nov-2026", b"SENTBEFORE 29-Nov-2026",
                         b"SEEN", b"UNSEEN", b"FLAGGED", b"KEYWORD $label1",
                         b"UNKEYWORD $label1", b"DELETED", b"UNDELETED", b"2:4", b"UID 1:*",
                         b"ANSWERED", b"BCC \"nobody\"", b"HEADER \"In-Reply-To\" \"\""):
            (ours, oursTag), (theirs, theirsTag) = self.both(b"SEARCH " + criteria)
            got = [l for l in ours if l.startswith(b"* SEARCH")]
            want = [l for l in theirs if l.startswith(b"* SEARCH")]
            if theirsTag.split()[1] != b"OK":
                continue  # Dovecot refuses it too: nothing to compare
            if oursTag.split()[1] != b"OK" or [g.split() for g in got] != [w.split() for w in want]:
                mismatches.append((criteria, got or oursTag, want))
        self.assertNoMismatches(mismatches)

    def test_pop3(self):
        """POP3 on the same messages: LIST sizes, RETR and TOP n 0 / TOP n 3 line for line."""
        clients = []
        for port in (self.port(POP3S), self.dovecot.pop3s):
            p = poplib.POP3_SSL("127.0.0.1", port, context=self.context(), timeout=IO_TIMEOUT)
            self.addCleanup(self._closeQuietly, p)
            p.user("dev")
            p.pass_("devpass")
            clients.append(p)
        ours, theirs = clients
        mismatches = []
        if ours.list()[1] != theirs.list()[1]:
            mismatches.append(("LIST", ours.list()[1], theirs.list()[1]))
        for n in range(1, len(self.messages) + 1):
            for what, call in (("RETR", lambda p, n=n: p.retr(n)[1]), ("TOP 0", lambda p, n=n: p.top(n, 0)[1]),
                               ("TOP 3", lambda p, n=n: p.top(n, 3)[1])):
                a, b = call(ours), call(theirs)
                if a != b:
                    mismatches.append((what, n, b"\n".join(a), b"\n".join(b)))
        for p in clients:
            p.quit()
        self.assertNoMismatches(mismatches)


# -- a flood of bad passwords -------------------------------------------------------------------


class LoginFloodTests(MailboxDaemonTestCase):
    """
    The default limit (auth_failures: burst 10, then 0.1 a second, per client IP,
    shared by IMAP and POP3): a client guessing passwords is soon refused even the
    right one, on both protocols, while another address logs in as usual.
    """

    def login(self, password: str, source: str = "127.0.0.1") -> bytes:
        """One IMAPS connection from C{source}: LOGIN dev, the tagged answer."""
        raw = socket.create_connection(("127.0.0.1", self.port(IMAPS)), timeout=IO_TIMEOUT,
                                       source_address=(source, 0))
        with self.context().wrap_socket(raw, server_hostname="localhost") as s, s.makefile("rb") as f:
            f.readline()
            s.sendall(b"A1 LOGIN dev " + password.encode() + b"\r\n")
            for _ in range(10):
                line = f.readline()
                if line.startswith(b"A1 ") or not line:
                    return line
        raise AssertionError("no answer to LOGIN")

    def test_floodRefusesEvenTheRightPassword(self):
        answers = []
        refusedRight = None
        for attempt in range(1, 21):  # bounded: the limit is 10
            answers.append(self.login("wrong"))
            right = self.login("devpass")
            if not right.startswith(b"A1 OK"):
                refusedRight = (attempt, right)
                break
        self.assertIsNotNone(refusedRight, answers)
        attempt, right = refusedRight
        self.assertLessEqual(attempt, 11, answers)
        self.assertTrue(right.startswith(b"A1 NO"), right)
        self.assertTrue(all(a.startswith((b"A1 NO", b"")) for a in answers), answers)
        # the same address over POP3: refused too (one limit for both protocols)
        p = poplib.POP3_SSL("127.0.0.1", self.port(POP3S), context=self.context(), timeout=IO_TIMEOUT)
        self.addCleanup(self._closeQuietly, p)
        p.user("dev")
        with self.assertRaises(poplib.error_proto):
            p.pass_("devpass")
        # another address is not held up by it
        if loopbackAliasesWork():
            self.assertTrue(self.login("devpass", source="127.0.0.2").startswith(b"A1 OK"))
