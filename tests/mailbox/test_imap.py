"""The IMAP server over loopback: Python's imaplib (the books' recipe), STARTTLS, limits and faults."""

from __future__ import annotations

import calendar
import imaplib
import os
import re
import ssl as stdssl
import time
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import defer, reactor, ssl
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from netsvc.auth import FailureLimit
from netsvc.mailbox import imap
from netsvc.mailbox.imap import IMAPFactory
from netsvc.mailbox.maildir import Maildirs
from netsvc.tls.certificates import generateSelfSigned
from tests.helpers import Keeping, sleep, unsentBytes

PASSWORD = "secret"


class Users:
    """An authenticator: bob/secret and alice/secret; counts the checks made."""

    def __init__(self) -> None:
        self.checks = 0

    def isReserved(self, user: str) -> bool:
        return user in ("bob", "alice")

    def check(self, user: str, password: str, client=None):
        self.checks += 1
        return defer.succeed(user.lower() in ("bob", "alice") and password == PASSWORD)


class Raw(Protocol):
    """A raw client: keeps what arrives; C{expect} waits (bounded) for a pattern."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed = True
        self.lost.callback(None)

    def send(self, line: bytes) -> None:
        self.transport.write(line)

    async def expect(self, pattern: bytes, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, bytes(self.data))
            if m:
                return m
            if time.monotonic() > deadline or self.closed:
                raise AssertionError(f"{pattern!r} not seen; got {bytes(self.data)[-500:]!r}")
            await sleep(0.01)


def sample(attachment: bytes = os.urandom(30000)) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@lab.test>"
    msg["To"] = "bob@lab.test"
    msg["Subject"] = "report"
    msg["Message-ID"] = "<1@lab.test>"
    msg.set_content("Hello Bob,\nthe report is attached.\n")
    msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="r.bin")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class IMAPTestCase(unittest.TestCase):
    def setUp(self):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        generateSelfSigned(self.cert, key, ["127.0.0.1", "localhost"])
        self.options = ssl.PrivateCertificate.loadPEM(self.cert.read_text() + key.read_text()).options()
        self.store = Maildirs(folder / "mail", fsync=False)
        self.users = Users()

    def serve(self, tls: str = "implicit", **kwargs) -> int:
        """A server on 127.0.0.1: C{tls} "implicit" (TLS port), "starttls" (plain port with STARTTLS),
        "pretend" (plain TCP treated as secure: raw-socket tests)."""
        kwargs.setdefault("pollInterval", 0.05)
        factory = IMAPFactory(self.store, self.users, self.options if tls != "pretend" else None,
                              implicitTLS=tls in ("implicit", "pretend"), **kwargs)
        self.factory = factory
        self.keeping = Keeping(factory)
        if tls == "implicit":
            port = reactor.listenSSL(0, self.keeping, self.options, interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, self.keeping, interface="127.0.0.1")
        self.addCleanup(self._stop, port)
        return port.getHost().port

    async def _closedAll(self):
        deadline = time.monotonic() + 10
        while any(p.transport is not None and p.transport.connected for p in self.keeping.built):
            if time.monotonic() > deadline:
                for p in self.keeping.built:
                    if p.transport is not None and p.transport.connected:
                        p.transport.abortConnection()
                await sleep(0.1)
                break
            await sleep(0.01)

    def _stop(self, port):
        d = defer.Deferred.fromCoroutine(self._closedAll())
        return d.addCallback(lambda _: port.stopListening())

    def sslContext(self) -> stdssl.SSLContext:
        return stdssl.create_default_context(cafile=str(self.cert))

    async def raw(self, portNumber: int) -> Raw:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = Raw()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber), client)
        self.addCleanup(lambda: client.transport.abortConnection() if not client.closed else None)
        await client.expect(rb"^\* OK .*\r\n")
        return client


class BooksRecipeTests(IMAPTestCase):
    def test_imapSSLFetchSameBytes(self):
        """IMAP4_SSL login / select('Inbox') / search / fetch '(RFC822)' gives the bytes delivered."""
        data = sample()
        self.store.deliver("bob", data)
        port = self.serve("implicit")

        def client():
            with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=self.sslContext()) as m:
                m.login("bob", PASSWORD)
                typ, count = m.select("Inbox")
                typ, numbers = m.search(None, "ALL")
                out = []
                for num in numbers[0].split():
                    typ, parts = m.fetch(num, "(RFC822)")
                    out.append(parts[0][1])
                typ, flags = m.fetch(b"1", "(FLAGS)")
                m.logout()
                return count, out, flags

        def check(result):
            count, out, flags = result
            self.assertEqual(count, [b"1"])
            self.assertEqual(out, [data])
            self.assertIn(b"\\Seen", flags[0])  # RFC822 (not PEEK) sets \Seen
            self.assertEqual(self.store.inbox("bob").messages()[0].flags, {"\\Seen"})

        return deferToThread(client).addCallback(check)

    def test_manyOperations(self):
        """Folders, APPEND (APPENDUID), UID COPY/MOVE (COPYUID), STORE, EXPUNGE, partial and header fetches."""
        for i in range(3):
            self.store.deliver("bob", b"Subject: m%d\r\nFrom: a@b\r\n\r\nbody %d\r\n" % (i, i))
        port = self.serve("implicit")

        def client():
            r = {}
            with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=self.sslContext()) as m:
                m.login("bob", PASSWORD)
                r["caps"] = m.capabilities
                r["list"] = m.list()[1]
                r["create"] = m.create("Work.Projects")[0]
                r["createBad"] = m.create("../etc")[0]
                m.select("INBOX")
                r["append"] = m.append("INBOX", "(\\Flagged)", None, b"Subject: appended\r\n\r\nx\r\n")
                r["peek"] = m.uid("FETCH", "4", "(BODY.PEEK[HEADER.FIELDS (Subject)] BODY.PEEK[]<0.7> FLAGS)")
                m.uid("COPY", "1:2", "Work.Projects")
                r["copy"] = m.response("COPYUID")
                m.uid("MOVE", "3", "Archive")
                r["move"] = m.response("COPYUID")
                r["after"] = m.uid("SEARCH", None, "ALL")
                r["store"] = m.store("1", "+FLAGS", "(\\Deleted)")
                r["expunge"] = m.expunge()
                r["status"] = m.status("Work.Projects", "(MESSAGES UIDNEXT UNSEEN)")
                r["flagged"] = m.search(None, "FLAGGED")
                r["text"] = m.search(None, "BODY", "body")
                r["tocreate"] = m.append("Nope", None, None, b"x")
                r["subject"] = m.uid("SEARCH", None, "SUBJECT", "M1")
                m.store("1", "+FLAGS", "(Work)")
                r["keyword"] = m.search(None, "KEYWORD", "Work")
                r["header"] = m.search(None, "HEADER", "From", "A@B", "NOT", "KEYWORD", "Work")
                m.logout()
            return r

        def check(r):
            for cap in ("UIDPLUS", "MOVE", "IDLE", "SPECIAL-USE", "NAMESPACE", "LITERAL+", "ENABLE"):
                self.assertIn(cap, r["caps"])
            self.assertIn(b'(\\HasNoChildren \\Sent) "." "Sent"', r["list"])
            self.assertEqual(r["create"], "OK")
            self.assertEqual(r["createBad"], "NO")
            self.assertEqual(r["append"][0], "OK")
            self.assertRegex(r["append"][1][0], rb"\[APPENDUID \d+ 4\]")
            body = r["peek"][1]
            self.assertEqual(body[0][1], b"Subject: appended\r\n\r\n")
            self.assertEqual(body[1][1], b"Subject")
            self.assertIn(b"BODY[]<0>", body[1][0])
            self.assertRegex(r["copy"][1][0], rb"^\d+ 1:2 1:2$")
            self.assertRegex(r["move"][1][0], rb"^\d+ 3 1$")
            self.assertEqual(r["after"][1], [b"1 2 4"])
            self.assertEqual(r["expunge"][1], [b"3", b"1"])  # the MOVE's, then its own
            self.assertEqual(r["status"][1], [b'"Work.Projects" (MESSAGES 2 UIDNEXT 3 UNSEEN 2)'])
            self.assertEqual(r["flagged"][1], [b"2"])  # the appended one, now sequence 2
            self.assertEqual(r["text"][1], [b"1"])
            self.assertIn(b"TRYCREATE", r["tocreate"][1][0])
            self.assertEqual(r["subject"][1], [b"2"])
            self.assertEqual(r["keyword"][1], [b"1"])
            self.assertEqual(r["header"][1], [b""])  # the appended one has no From
            self.assertEqual([m.uid for m in self.store.inbox("bob").messages()], [2, 4])
            self.assertEqual(len(self.store.folder("bob", "Archive").messages()), 1)
            self.assertEqual(self.store.inbox("bob").messages()[1].flags, {"\\Flagged"})

        return deferToThread(client).addCallback(check)


class MoreTests(IMAPTestCase):
    def test_foldersAndStructure(self):
        """EXAMINE leaves \\Seen alone; modified UTF-7 names; RENAME/DELETE/LSUB; MIME parts and structure."""
        attachment = os.urandom(5000)
        data = sample(attachment)
        self.store.deliver("bob", data)
        port = self.serve("implicit")

        def client():
            r = {}
            with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=self.sslContext()) as m:
                m.login("bob", PASSWORD)
                m.select("INBOX", readonly=True)
                r["body"] = m.fetch("1", "(BODY[] ENVELOPE BODYSTRUCTURE)")
                r["part2"] = m.fetch("1", "(BODY.PEEK[2] BODY.PEEK[2.MIME])")
                r["flags"] = m.fetch("1", "(FLAGS)")
                r["store"] = m.store("1", "+FLAGS", "(\\Flagged)")[0]
                r["create"] = m.create("&ANw-ber.Sub")[0]
                r["list"] = m.list('""', "*")[1]
                r["subscribe"] = m.subscribe("&ANw-ber.Sub")[0]
                r["rename"] = m.rename("&ANw-ber", "Ueber")[0]
                r["lsub"] = m.lsub('""', "*")[1]
                r["deleteSelected"] = m.delete("INBOX")[0]
                r["delete"] = m.delete("Ueber.Sub")[0]
                r["percent"] = m.list('""', "%")[1]
                m.logout()
            return r

        def check(r):
            import base64
            import email

            self.assertEqual(r["body"][1][0][1], data)
            head = b"".join(x if isinstance(x, bytes) else x[0] for x in r["body"][1])
            self.assertIn(b'"report"', head)  # the envelope's subject
            self.assertIn(b'"APPLICATION" "OCTET-STREAM"', head.upper())
            self.assertIn(b'("attachment" ("filename" "r.bin"))', head)  # unquoted (Twisted kept the quotes)
            part = r["part2"][1][0][1]
            self.assertEqual(base64.b64decode(part), attachment)  # the attachment, byte-identical
            mime = r["part2"][1][1][1]
            self.assertIn(b"Content-Disposition: attachment", mime)
            self.assertNotIn(b"\\Seen", r["flags"][1][0])  # EXAMINE: read-only, nothing marked
            self.assertEqual(r["store"], "NO")
            self.assertEqual(r["create"], "OK")
            self.assertIn(b'(\\HasChildren) "." "&ANw-ber"', r["list"])
            self.assertIn(b'(\\HasNoChildren) "." "&ANw-ber.Sub"', r["list"])
            self.assertEqual(r["rename"], "OK")
            self.assertIn(b'(\\HasNoChildren) "." "Ueber.Sub"', r["lsub"])
            self.assertEqual(r["deleteSelected"], "NO")
            self.assertEqual(r["delete"], "OK")
            self.assertIn(b'(\\HasNoChildren) "." "Ueber"', r["percent"])
            self.assertFalse(any(b"Ueber." in line for line in r["percent"]))
            self.assertNotIn("Ueber.Sub", self.store.subscriptions("bob"))
            self.assertEqual(email.message_from_bytes(data).get_payload()[1].get_payload(decode=True), attachment)

        return deferToThread(client).addCallback(check)

    async def _simpleStructure(self):
        self.store.deliver("bob", b"Subject: s\r\nContent-Type: text/plain\r\n\r\nline one\r\nline two\r\n")
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb EXAMINE INBOX\r\nc FETCH 1 (BODYSTRUCTURE RFC822.SIZE)\r\n")
        await client.expect(rb"c OK")
        # the body is 20 bytes, 2 lines; the message 60; the encoding is never NIL (RFC 3501's grammar)
        self.assertRegex(bytes(client.data),
                         rb'BODYSTRUCTURE \("text" "plain" NIL NIL NIL "7bit" 20 2 .*RFC822.SIZE 60\)')
        client.transport.loseConnection()

    def test_singlePartStructure(self):
        """BODYSTRUCTURE of a single-part message gives the body's size and lines (Twisted gave the whole size)."""
        return defer.Deferred.fromCoroutine(self._simpleStructure())

    async def _closeUnselect(self):
        for i in range(3):
            self.store.deliver("bob", b"Subject: %d\r\n\r\n" % i)
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\nc STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\n"
                    b"d UNSELECT\r\ne SELECT INBOX\r\nf UID STORE 3 +FLAGS (\\Deleted)\r\ng CLOSE\r\n"
                    b"h FETCH 1 FLAGS\r\n")
        await client.expect(rb"h BAD .*\r\n")  # CLOSE left the selected state
        text = bytes(client.data)
        self.assertIn(b"c OK STORE completed", text)
        self.assertIn(b"* 3 EXISTS", text.split(b"e OK")[0].split(b"d OK")[1])  # UNSELECT expunged nothing
        self.assertIn(b"* 3 FETCH (FLAGS (\\Deleted) UID 3)", text)
        self.assertEqual(self.store.inbox("bob").messages(), [])  # CLOSE expunged all three
        self.assertNotIn(b"EXPUNGE", text)  # silently
        client.transport.loseConnection()

    def test_closeAndUnselect(self):
        """UNSELECT leaves \\Deleted messages; CLOSE removes them without EXPUNGE responses."""
        return defer.Deferred.fromCoroutine(self._closeUnselect())

    async def _idleTimeouts(self):
        port = self.serve("pretend", keepalive=0.2, idleTimeout=1.5)
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb IDLE\r\n")
        await client.expect(rb"\+ idling\r\n")
        await client.expect(rb"(\* OK Still here\r\n){2}")
        await client.expect(rb"\* BYE Autologout")
        await client.lost

    def test_idleKeepaliveAndTimeout(self):
        """IDLE: "* OK Still here" now and then; after the idle timeout without DONE, BYE and close."""
        return defer.Deferred.fromCoroutine(self._idleTimeouts())


INNER = (b"From: Sender <sender@example.test>\r\n"
         b"Subject: plain one\r\n"
         b"Date: Sat, 28 Nov 2026 23:30:00 -0800\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n"
         b"\r\n"
         b"Hello,\r\nplain one\r\n")
INNER_MULTI = (b"Subject: inner multi\r\n"
               b"Content-Type: multipart/alternative; boundary=in\r\n"
               b"\r\n"
               b"--in\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
               b"--in\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n"
               b"--in--\r\n")
MIME2 = b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
MIME3 = b"Content-Type: message/rfc822\r\n\r\n"
FORWARD = (b"From: forwarder@example.test\r\n"
           b"Subject: Fwd: plain one\r\n"
           b"MIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="XX"\r\n'
           b"\r\n"
           b"preamble\r\n"
           b"--XX\r\nContent-Type: text/plain\r\n\r\nForwarded below.\r\n"
           b"\r\n--XX\r\n" + MIME2 + INNER +
           b"\r\n--XX\r\n" + MIME3 + INNER_MULTI +
           b"\r\n--XX--\r\n")


class SectionAndStructureTests(IMAPTestCase):
    """Sections are the stored bytes, message/rfc822 parts described in RFC 3501's order, SENT* dates."""

    async def _fetch(self, items: bytes) -> dict[bytes, bytes]:
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb EXAMINE INBOX\r\nc FETCH 1 (" + items + b")\r\n")
        await client.expect(rb"c OK")
        client.transport.loseConnection()
        text = bytes(client.data)
        out, pos = {}, text.index(b"* 1 FETCH (") + len(b"* 1 FETCH (")
        while True:  # BODY[...] {n}\r\n<n bytes>, one after another
            m = re.compile(rb" ?(BODY\[[^\]]*\](?:<\d+>)?) \{(\d+)\}\r\n").match(text, pos)
            if not m:
                break
            out[m.group(1)] = text[m.end():m.end() + int(m.group(2))]
            pos = m.end() + int(m.group(2))
        return out, text

    async def _sections(self):
        self.store.deliver("bob", FORWARD)
        got, _ = await self._fetch(b"BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2] BODY.PEEK[2.MIME] "
                                   b"BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[2.1] "
                                   b"BODY.PEEK[2.HEADER.FIELDS (Subject)] BODY.PEEK[3.1] BODY.PEEK[3.2] "
                                   b"BODY.PEEK[3.2.MIME] BODY.PEEK[3.1.MIME] BODY.PEEK[2]<7.5>")
        head, body = INNER.split(b"\r\n\r\n", 1)
        self.assertEqual(got, {
            b"BODY[1]": b"Forwarded below.\r\n",
            b"BODY[1.MIME]": b"Content-Type: text/plain\r\n\r\n",
            b"BODY[2]": INNER,  # the encapsulated message as stored: CRLF (it was re-serialised with LF)
            b"BODY[2.MIME]": MIME2,
            b"BODY[2.HEADER]": head + b"\r\n\r\n",
            b"BODY[2.TEXT]": body,
            b"BODY[2.1]": body,
            b"BODY[2.HEADER.FIELDS (Subject)]": b"Subject: plain one\r\n\r\n",
            b"BODY[3.1]": b"plain",  # the first part of the encapsulated multipart (its CRLF: the delimiter's)
            b"BODY[3.2]": b"<p>html</p>",
            b"BODY[3.2.MIME]": b"Content-Type: text/html\r\n\r\n",
            b"BODY[3.1.MIME]": b"Content-Type: text/plain\r\n\r\n",
            b"BODY[2]<7>": INNER[7:12],
        })

    def test_sectionsAreStoredBytes(self):
        """BODY[n], [n.MIME], [n.HEADER], [n.TEXT] and parts inside a message/rfc822 part: byte ranges
        of the stored message (RFC 3501 6.4.5), CRLF as stored, not an email object re-serialised."""
        return defer.Deferred.fromCoroutine(self._sections())

    async def _rfc822Structure(self):
        self.store.deliver("bob", FORWARD)
        _, text = await self._fetch(b"BODYSTRUCTURE BODY")
        envelope = rb'\("Sat, 28 Nov 2026 23:30:00 -0800" "plain one" \(\("Sender" NIL "sender" "example.test"\)\)'
        inner = rb'\("text" "plain" \("charset" "utf-8"\) NIL NIL "7bit" 19 2%s\)'
        # type subtype params id description encoding size, envelope, body structure, lines (of the
        # encapsulated message as a whole: 7), then the extension data (RFC 3501 7.4.2)
        rfc822 = (rb'\("message" "rfc822" NIL NIL NIL "7bit" %d ' % len(INNER) + envelope + rb'[^\r]*?\) '
                  + inner + rb' 7%s\)')
        extension = rb' NIL \("attachment" NIL\) NIL NIL'  # md5 disposition language location
        self.assertRegex(text, rb"BODYSTRUCTURE \(\(.*?\) " + rfc822 % (rb" NIL NIL NIL NIL", extension))
        self.assertRegex(text, rb"BODY \(\(.*?\) " + rfc822 % (b"", b""))
        # the encapsulated multipart: its parts, its subtype; 12 lines, its size as stored
        self.assertRegex(text, rb'\("message" "rfc822" NIL NIL NIL "7bit" %d \(NIL "inner multi" [^\r]*?\) '
                         rb'\(\("text" "plain" NIL NIL NIL "7bit" 5 1\) \("text" "html" NIL NIL NIL "7bit" 11 1\) '
                         rb'"alternative"\) 12\)' % len(INNER_MULTI))

    def test_rfc822PartStructure(self):
        """BODYSTRUCTURE/BODY of a message/rfc822 part: envelope, body structure and lines before the
        extension data; size and lines of the encapsulated message as stored (CRLF, header included)."""
        return defer.Deferred.fromCoroutine(self._rfc822Structure())

    async def _searchDates(self):
        inbox = self.store.inbox("bob")
        day = 86400
        base = calendar.timegm((2026, 12, 1, 0, 0, 0))
        inbox.append(b"Date: Sat, 28 Nov 2026 23:30:00 -0800\r\nSubject: one\r\n\r\n1\r\n", date=base - 2 * day)
        inbox.append(b"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\nIn-Reply-To: <x@lab.test>\r\n\r\n2\r\n",
                     date=base + 3600)
        inbox.append(b"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\nIn-Reply-To:\r\n\r\n3\r\n", date=base + 2 * day)
        inbox.append(b"Subject: no date\r\n\r\n4\r\n", date=base + 5 * day)
        port = self.serve("pretend")
        client = await self.raw(port)
        searches = [(b"SENTSINCE 1-Dec-2026", b" 2 3"), (b"SENTBEFORE 1-Dec-2026", b" 1"),
                    (b"SENTON 28-Nov-2026", b" 1"),  # the header's own date, not UTC's 29 Nov
                    (b"SENTON 29-Nov-2026", b""), (b"SENTSINCE 4-Dec-2026", b""),
                    (b'SENTON "01-Dec-2026"', b" 2"),
                    (b"SINCE 1-Dec-2026", b" 2 3 4"), (b"BEFORE 1-Dec-2026", b" 1"), (b"ON 3-Dec-2026", b" 3"),
                    (b'HEADER "In-Reply-To" ""', b" 2 3"),  # present, even empty: RFC 3501 6.4.4
                    (b'HEADER "In-Reply-To" "x@"', b" 2"), (b'NOT HEADER "In-Reply-To" ""', b" 1 4")]
        client.send(b"a LOGIN bob secret\r\nb EXAMINE INBOX\r\n"
                    + b"".join(b"s%d SEARCH %s\r\n" % (i, q) for i, (q, _) in enumerate(searches))
                    + b"z SEARCH SENTON 32-Foo-2026\r\n")
        await client.expect(rb"z (OK|NO|BAD)[^\r]*\r\n")
        text = bytes(client.data)
        for i, (q, want) in enumerate(searches):
            self.assertIn(b"* SEARCH%s\r\ns%d OK" % (want, i), text, q)
        self.assertRegex(text, rb"z BAD ")
        client.transport.loseConnection()

    def test_searchSentDatesAndEmptyHeader(self):
        """SENTBEFORE/SENTON/SENTSINCE compare the Date header's own day (they answered BAD: a str pattern
        on bytes), BEFORE/ON/SINCE the internal date's; HEADER name "" matches messages having the field."""
        return defer.Deferred.fromCoroutine(self._searchDates())


class TLSTests(IMAPTestCase):
    def test_starttls(self):
        """Plain port: LOGINDISABLED and LOGIN refused before STARTTLS; after it, LOGIN and AUTH=PLAIN."""
        port = self.serve("starttls")

        def client():
            with imaplib.IMAP4("127.0.0.1", port) as m:
                before = m.capabilities
                try:
                    m.login("bob", PASSWORD)
                    refused = None
                except imaplib.IMAP4.error as e:
                    refused = str(e)
                m.starttls(ssl_context=self.sslContext())
                after = m.capabilities
                typ, _ = m.authenticate("PLAIN", lambda _: b"\0bob\0" + PASSWORD.encode())
                m.logout()
                return before, refused, after, typ

        def check(result):
            before, refused, after, typ = result
            self.assertIn("STARTTLS", before)
            self.assertIn("LOGINDISABLED", before)
            self.assertNotIn("AUTH=PLAIN", before)
            self.assertIn("PRIVACYREQUIRED", refused)
            self.assertNotIn("LOGINDISABLED", after)
            self.assertIn("AUTH=PLAIN", after)
            self.assertEqual(typ, "OK")
            self.assertEqual(self.users.checks, 1)  # the refused LOGIN checked nothing

        return deferToThread(client).addCallback(check)

    async def _starttlsInjection(self):
        port = self.serve("starttls")
        client = await self.raw(port)
        client.send(b"a STARTTLS\r\nb LOGIN bob secret\r\n")
        await client.expect(rb"a OK .*\r\n")
        await sleep(0.2)
        self.assertNotIn(b"b ", bytes(client.data))
        self.assertEqual(self.users.checks, 0)
        client.transport.abortConnection()

    def test_starttlsInjection(self):
        """Commands pipelined behind STARTTLS (before the handshake) are dropped, not run."""
        return defer.Deferred.fromCoroutine(self._starttlsInjection())


class LimitTests(IMAPTestCase):
    async def _flood(self):
        limit = FailureLimit(reactor, rate=0.001, burst=3, overallRate=0)
        port = self.serve("pretend", failureLimit=limit, maxAuthFailures=100)
        client = await self.raw(port)
        for i in range(10):
            client.send(b"t%d LOGIN bob wrong%d\r\n" % (i, i))
        await client.expect(rb"t9 NO .*\r\n")
        text = bytes(client.data)
        self.assertEqual(self.users.checks, 3)
        self.assertEqual(len(re.findall(rb"t\d NO \[AUTHENTICATIONFAILED\]", text)), 3)
        self.assertEqual(len(re.findall(rb"t\d NO \[UNAVAILABLE\]", text)), 7)
        # answers come in order, one command at a time
        self.assertEqual(re.findall(rb"(t\d) NO", text), [b"t%d" % i for i in range(10)])
        # the right password is refused too while the allowance is spent (nothing is checked)
        client.send(b"u LOGIN bob secret\r\n")
        await client.expect(rb"u NO \[UNAVAILABLE\].*\r\n")
        self.assertEqual(self.users.checks, 3)
        client.transport.loseConnection()

    def test_badPasswordFlood(self):
        """A flood of bad passwords: only the allowance is checked; the rest get NO [UNAVAILABLE]."""
        return defer.Deferred.fromCoroutine(self._flood())

    async def _perConnection(self):
        port = self.serve("pretend", maxAuthFailures=3)
        client = await self.raw(port)
        for i in range(5):
            client.send(b"t%d LOGIN bob wrong\r\n" % i)
        await client.lost
        self.assertEqual(self.users.checks, 3)
        self.assertIn(b"* BYE Too many authentication failures", bytes(client.data))

    def test_authFailuresClose(self):
        return defer.Deferred.fromCoroutine(self._perConnection())

    async def _junk(self):
        port = self.serve("pretend")
        client = await self.raw(port)
        start = time.monotonic()
        for i in range(200):
            if client.closed:
                break
            client.send(b"x%d FROB the knob\r\n" % i if i % 2 else b"\x00\xff junk\r\n")
            await sleep(0.001)
        await client.lost
        self.assertLess(time.monotonic() - start, 30)
        text = bytes(client.data)
        self.assertIn(b"* BYE Too many invalid commands", text)
        self.assertEqual(text.count(b"BAD"), 20)
        self.assertEqual(self.factory.counts["closed_bad_commands"], 1)

    def test_junkForever(self):
        """Junk commands get BAD, and after 20 in a row the connection is closed."""
        return defer.Deferred.fromCoroutine(self._junk())

    async def _longLine(self):
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a " + b"x" * 100_000)
        await client.lost
        self.assertIn(b"* BYE Command line too long", bytes(client.data))

    def test_longLine(self):
        """A command line longer than the limit is not buffered: BYE and close."""
        return defer.Deferred.fromCoroutine(self._longLine())

    async def _silent(self, item=b"RFC822"):
        big = os.urandom(3 * 2**20)
        for _ in range(4):
            self.store.deliver("bob", b"Subject: big\r\n\r\n" + big)
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n")
        await client.expect(rb"b OK .*\r\n")
        import socket

        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.transport.pauseProducing()
        server = self.keeping.built[0]
        self.assertTrue(server.transport.getTcpNoDelay())  # no Nagle wait on the tagged line
        server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        client.send(b"c FETCH 1:* (" + item + b")\r\n" + b"d NOOP\r\n" * 1000)
        peak = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await sleep(0.05)
            peak = max(peak, unsentBytes(server.transport))
        self.assertGreater(peak, 0)  # the kernel's buffers are full: the FETCH is waiting for us
        self.assertLessEqual(peak, imap.HIGH_WATER + imap.CHUNK + 4096)
        self.assertTrue(server.paused)  # the pipelined NOOPs stay in the kernel
        self.assertLess(len(server._buffer), 70_000)
        client.transport.resumeProducing()
        await client.expect(rb"c OK FETCH completed\r\n", timeout=30)
        await client.expect(rb"(d OK NOOP completed\r\n.*){1000}", timeout=30)
        client.transport.loseConnection()

    def test_nonReadingClientBounded(self):
        """A client that never reads during a big FETCH: the server holds at most ~HIGH_WATER unsent."""
        return defer.Deferred.fromCoroutine(self._silent())

    def test_nonReadingClientBoundedSection(self):
        """The same for a section (BODY[TEXT]: made in memory, then streamed under the same bound)."""
        return defer.Deferred.fromCoroutine(self._silent(b"BODY.PEEK[TEXT]"))


class AppendTests(IMAPTestCase):
    async def _aborted(self):
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb APPEND INBOX (\\Seen) {100000}\r\n")
        await client.expect(rb"\+ .*\r\n")
        client.send(b"x" * 50000)
        await sleep(0.1)
        client.transport.abortConnection()
        await client.lost
        await self._closedAll()
        inbox = self.store.inbox("bob")
        self.assertEqual(inbox.messages(), [])
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(os.listdir(inbox.path / sub), [])

    def test_abortedMidLiteral(self):
        """A client that vanishes mid-APPEND leaves nothing behind."""
        return defer.Deferred.fromCoroutine(self._aborted())

    async def _tooBig(self):
        port = self.serve("pretend", maxLiteral=1000)
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb APPEND INBOX {5000}\r\n")
        await client.expect(rb"b NO \[TOOBIG\].*\r\n")
        self.assertNotIn(b"\r\n+ ", bytes(client.data))  # the literal was never asked for
        client.send(b"c APPEND INBOX {5+}\r\nhello\r\n")
        await client.expect(rb"c OK \[APPENDUID \d+ 1\].*\r\n")
        client.send(b"d APPEND INBOX {5000+}\r\n" + b"y" * 5000)
        await client.lost
        self.assertIn(b"* BYE [TOOBIG]", bytes(client.data))
        self.assertEqual([m.size for m in self.store.inbox("bob").messages()], [5])

    def test_literalLimits(self):
        """A literal over the limit: NO [TOOBIG] before reading it; LITERAL+ within the limit works;
        LITERAL+ over the limit closes (its bytes are on the way)."""
        return defer.Deferred.fromCoroutine(self._tooBig())


class IdleTests(IMAPTestCase):
    async def _idle(self):
        self.store.deliver("bob", b"Subject: one\r\n\r\n1\r\n")
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\nc IDLE\r\n")
        await client.expect(rb"\+ idling\r\n")
        await deferToThread(self.store.deliver, "bob", b"Subject: two\r\n\r\n2\r\n")
        await client.expect(rb"\* 2 EXISTS\r\n")
        other = self.store.inbox("bob")
        await deferToThread(other.messages)
        await deferToThread(other.setFlags, 1, ["\\Flagged"])
        await client.expect(rb"\* 1 FETCH \(FLAGS \(\\Flagged\)\)\r\n")
        await deferToThread(other.remove, [1])
        await client.expect(rb"\* 1 EXPUNGE\r\n")
        client.send(b"DONE\r\nd UID SEARCH ALL\r\n")
        await client.expect(rb"c OK IDLE terminated\r\n")
        await client.expect(rb"\* SEARCH 2\r\nd OK")
        client.transport.loseConnection()

    async def _deleted(self):
        self.store.createFolder("bob", "Work")
        port = self.serve("pretend")
        client = await self.raw(port)
        client.send(b"a LOGIN bob secret\r\nb SELECT Work\r\nc IDLE\r\n")
        await client.expect(rb"\+ idling\r\n")
        await deferToThread(self.store.deleteFolder, "bob", "Work")
        await client.expect(rb"\* BYE Selected mailbox was deleted")
        await client.lost

    def test_selectedFolderDeletedElsewhere(self):
        """The selected folder deleted by another session: BYE (no error logged every poll)."""
        return defer.Deferred.fromCoroutine(self._deleted())

    def test_idleSeesOtherChanges(self):
        """IDLE reports a delivery, another session's flag change and removal."""
        return defer.Deferred.fromCoroutine(self._idle())

    async def _restart(self):
        for i in range(3):
            self.store.deliver("bob", b"Subject: %d\r\n\r\n" % i)
        port = self.serve("pretend")
        first = await self.raw(port)
        first.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\nc UID FETCH 1:* (UID)\r\n")
        m1 = await first.expect(rb"UIDVALIDITY (\d+)[\s\S]*c OK")
        uids1 = re.findall(rb"FETCH \(UID (\d+)\)", bytes(first.data))
        first.transport.loseConnection()
        self.store = Maildirs(self.store.root, fsync=False)  # a new store: as after a restart
        port2 = self.serve("pretend")
        second = await self.raw(port2)
        second.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\nc UID FETCH 1:* (UID)\r\n")
        m2 = await second.expect(rb"UIDVALIDITY (\d+)[\s\S]*c OK")
        self.assertEqual(m1.group(1), m2.group(1))
        self.assertEqual(re.findall(rb"FETCH \(UID (\d+)\)", bytes(second.data)), uids1)
        self.assertEqual(uids1, [b"1", b"2", b"3"])
        second.transport.loseConnection()

    def test_uidsAcrossRestart(self):
        return defer.Deferred.fromCoroutine(self._restart())


# -- sessions over a StringTransport, store calls through a run function the test controls ------------


class _Session:
    """An IMAP session over a StringTransport and a MemoryReactorClock; store calls go through C{run},
    which can hold them (C{hold = True}: each call waits in C{held} until C{release()})."""

    def __init__(self, store: Maildirs, **kwargs) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        self.hold = False
        self.held: list = []
        self.calls = 0
        self.clock = MemoryReactorClock()
        self.factory = IMAPFactory(store, Users(), implicitTLS=True, clock=self.clock, run=self.run, **kwargs)
        self.server = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        self.server.makeConnection(self.transport)

    def run(self, f, *args):
        self.calls += 1
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, f, args))
            return d
        return defer.maybeDeferred(f, *args)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, f, args in held:
            defer.maybeDeferred(f, *args).chainDeferred(d)

    def send(self, data: bytes) -> None:
        self.server.dataReceived(data)
        self.clock.advance(0)

    def until(self, pattern: bytes, turns: int = 5000) -> bytes:
        """Turn the clock until C{pattern} is in the output (taken away as it comes)."""
        for _ in range(turns):
            if re.search(pattern, self.transport.value()):
                return self.transport.value()
            self.clock.advance(0.01)
        raise AssertionError(f"{pattern!r} not seen; got {self.transport.value()[-300:]!r}")


class MemoryTests(unittest.TestCase):
    """FETCH of text sections and SEARCH TEXT/BODY hold about one message at a time, not the folder,
    and parse message contents through the store's run function (a thread), not on the reactor."""

    COUNT, SIZE = 20, 2**20

    def setUp(self):
        self.store = Maildirs(Path(self.mktemp()).absolute(), fsync=False)
        line = b"A" * 1022 + b"\r\n"
        for i in range(self.COUNT):
            self.store.deliver("bob", b"Subject: m%d\r\n\r\n" % i + line * (self.SIZE // len(line)))

    def _peak(self, command: bytes) -> tuple[int, bytes]:
        import tracemalloc

        session = _Session(self.store)
        session.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n")
        session.until(rb"b OK")
        session.transport.clear()
        written = [0]

        def write(data: bytes) -> None:  # counted, not kept
            written[0] += len(data)
            session.transport.io.seek(0)
            session.transport.io.truncate()
            session.transport.io.write(data[-200:])

        session.transport.write = write
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            session.send(b"c " + command + b"\r\n")
            tail = session.until(rb"c (OK|NO|BAD)")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertIn(b"c OK", tail)
        return peak, written[0]

    def test_textSectionsBounded(self):
        """BODY.PEEK[TEXT], RFC822.TEXT and BODY.PEEK[1] of 20 x 1 MB messages: the peak is a few MB (was
        the folder's 20 MB: every message's bytes kept until the command ended); all bytes are sent."""
        for item in (b"BODY.PEEK[TEXT]", b"RFC822.TEXT", b"BODY.PEEK[1]", b"BODY.PEEK[TEXT]<10.2000000>",
                     b"BODYSTRUCTURE BODY.PEEK[HEADER]"):
            peak, written = self._peak(b"FETCH 1:* (" + item + b")")
            self.assertLess(peak, 4 * 2**20, item)
            if b"STRUCTURE" not in item:
                self.assertGreater(written, self.COUNT * (self.SIZE - 4096), item)

    def test_searchTextBounded(self):
        """SEARCH TEXT/BODY over 20 x 1 MB messages: the peak is a few MB; matches are still found."""
        for query in (b"SEARCH TEXT zzz", b"SEARCH BODY zzz", b"SEARCH TEXT m7", b"UID SEARCH BODY aaaa"):
            peak, _ = self._peak(query)
            self.assertLess(peak, 4 * 2**20, query)

    def test_searchResults(self):
        """SEARCH TEXT/BODY across the chunks a message is read in: a match spanning two chunks is found."""
        inbox = self.store.inbox("bob")
        pad = b"x" * (imap.CHUNK - 3)
        inbox.append(b"Subject: t\r\n\r\n" + pad + b"NeedLE" + b"\r\n")
        inbox.append(b"Subject: needle\r\n\r\nnothing\r\n")
        session = _Session(self.store)
        session.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n")
        session.until(rb"b OK")
        for query, want in ((b"TEXT needle", b" 21 22"), (b"BODY needle", b" 21"), (b"TEXT m7", b" 8"),
                            (b"BODY m7", b""), (b"SUBJECT needle BODY nothing", b" 22"),
                            (b"NOT BODY needle 20:*", b" 20 22")):
            session.transport.clear()
            session.send(b"s SEARCH " + query + b"\r\n")
            self.assertIn(b"* SEARCH%s\r\ns OK" % want, session.until(rb"s OK"), query)

    def test_contentsParsedThroughRun(self):
        """SEARCH TEXT and FETCH BODYSTRUCTURE/BODY[TEXT] read contents in store calls (a thread): held
        calls hold the answer; nothing is answered on the reactor meanwhile."""
        session = _Session(self.store)
        session.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n")
        session.until(rb"b OK")
        for command, answer in ((b"SEARCH TEXT m3", rb"\* SEARCH 4\r\nc OK"),
                                (b"FETCH 2 (BODYSTRUCTURE)", rb"\* 2 FETCH \(BODYSTRUCTURE \("),
                                (b"FETCH 2 (BODY.PEEK[TEXT])", rb"\* 2 FETCH \(BODY\[TEXT\] \{")):
            session.transport.clear()
            session.hold = True
            session.send(b"c " + command + b"\r\n")
            for _ in range(10):
                session.clock.advance(0.1)
            self.assertTrue(session.held, command)
            self.assertEqual(session.transport.value(), b"", command)
            session.hold = False
            while session.held:
                session.release()
                session.clock.advance(0)
            session.until(answer)
            session.until(rb"c OK")


class IdleRaceTests(unittest.TestCase):
    def test_pollInFlightAtDone(self):
        """An IDLE poll still listing the folder when DONE arrives: its EXPUNGE comes before the tagged OK
        of IDLE, never inside the next command's FETCH answer (RFC 3501 7.4.1), and the next command
        numbers the messages as the client does."""
        store = Maildirs(Path(self.mktemp()).absolute(), fsync=False)
        for i in range(3):
            store.deliver("bob", b"Subject: m%d\r\n\r\n" % i + b"x" * 1000 + b"\r\n")
        session = _Session(store, pollInterval=1)
        session.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\nc IDLE\r\n")
        session.until(rb"\+ idling\r\n")
        session.transport.clear()
        other = store.inbox("bob")
        other.remove([other.messages()[0].uid])  # another session expunges message 1
        session.hold = True
        session.clock.advance(1)  # the poll starts listing the folder ("in a thread", still running)
        self.assertTrue(session.held)
        session.hold = False
        session.send(b"DONE\r\n")
        session.server.dataReceived(b"d FETCH 2:3 (UID)\r\ne STORE 1 +FLAGS (\\Seen)\r\n")
        session.clock.advance(0)
        self.assertNotIn(b"c OK", session.transport.value())  # the poll has not answered yet
        session.release()
        out = session.until(rb"e OK")
        lines = re.findall(rb"(?m)^(\* \d+ \w+|[a-z] OK)", out)
        self.assertEqual(lines, [b"* 1 EXPUNGE", b"c OK", b"* 2 FETCH", b"d OK", b"* 1 FETCH", b"e OK"])
        self.assertIn(b"* 2 FETCH (UID 3)", out)

    def test_pollInFlightAtBadEnd(self):
        """The same when IDLE is ended by something other than DONE: the BAD waits for the poll too."""
        store = Maildirs(Path(self.mktemp()).absolute(), fsync=False)
        for i in range(2):
            store.deliver("bob", b"Subject: m%d\r\n\r\n" % i)
        session = _Session(store, pollInterval=1)
        session.send(b"a LOGIN bob secret\r\nb SELECT INBOX\r\nc IDLE\r\n")
        session.until(rb"\+ idling\r\n")
        session.transport.clear()
        other = store.inbox("bob")
        other.remove([other.messages()[0].uid])
        session.hold = True
        session.clock.advance(1)
        session.hold = False
        session.send(b"NOPE\r\nd FETCH 1 (UID)\r\n")
        session.release()
        out = session.until(rb"d OK")
        self.assertEqual(re.findall(rb"(?m)^(\* \d+ \w+|[a-z] (?:OK|BAD))", out),
                         [b"* 1 EXPUNGE", b"c BAD", b"* 1 FETCH", b"d OK"])


# -- a session fed arbitrary input (the IMAP parser's fuzz target) ----------------------------------

_POOL = [
    b"a LOGIN bob secret", b"a LOGIN {3}", b"bob {6+}", b"secret", b"b SELECT INBOX", b"b EXAMINE \"Sent\"",
    b"c FETCH 1:* (FLAGS UID RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)",
    b"c UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (Subject From)] BODY[]<0.10> BODY[1] BODY[1.MIME] BODY[TEXT])",
    b"d STORE 1 +FLAGS (\\Seen $Label)", b"d UID STORE 2 FLAGS.SILENT (\\Deleted)", b"e EXPUNGE",
    b"e UID EXPUNGE 1:3", b"f SEARCH OR UNSEEN SUBJECT hi NOT KEYWORD x", b"f UID SEARCH 1:* TEXT hello",
    b"g APPEND INBOX (\\Flagged) \" 7-Dec-2026 05:10:54 +0100\" {5}", b"hello", b"g APPEND Sent {3+}",
    b"h COPY 1 Trash", b"h UID MOVE 1:* Archive", b"i CREATE A.B", b"i RENAME A C", b"i DELETE C.B",
    b"j LIST \"\" *", b"j LSUB \"\" %", b"j STATUS INBOX (MESSAGES UIDNEXT UNSEEN)", b"k IDLE", b"DONE",
    b"k NOOP", b"k CHECK", b"l CLOSE", b"l UNSELECT", b"m NAMESPACE", b"m ENABLE CONDSTORE",
    b"n AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=", b"n AUTHENTICATE PLAIN", b"AGJvYgBzZWNyZXQ=", b"*",
    b"o CAPABILITY", b"o STARTTLS", b"p LOGOUT", b"",
]


def imap_session(data: bytes) -> None:
    """
    An IMAP session over a StringTransport on a store with two messages: whatever the bytes, no
    error is logged (Twisted answers an exception with "* BAD Server error" and logs it), every
    answer ends with CRLF, unparsed input stays bounded, and the session's state stays consistent.
    """
    import tempfile

    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as root:  # (making and removing folders is slow on some disks)
        store = Maildirs(root, fsync=False)
        store.deliver("bob", sample(b"attached"))
        store.deliver("bob", b"Subject: hi\r\n\r\nhello\r\n")
        clock = MemoryReactorClock()
        factory = IMAPFactory(store, Users(), implicitTLS=True, maxLiteral=4096, clock=clock,
                              run=lambda f, *a: defer.maybeDeferred(f, *a))
        server = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        server.makeConnection(transport)
        for piece in _pieces(data):
            if transport.disconnecting:
                break
            server.dataReceived(piece)
            clock.advance(0.1)
            assert len(server._buffer) <= server.MAX_LENGTH + 8192, len(server._buffer)
        for _ in range(5):
            clock.advance(1)
        out = transport.value()
        assert b"Server error" not in out, out[-300:]
        assert out.endswith(b"\r\n"), out[-100:]
        assert server.state in ("unauth", "auth", "select", "logout"), server.state
        if not transport.disconnecting:  # every command got its tagged answer (none hangs)
            assert not (server._busy and server.parseState == "command"), out[-300:]
        if server.state == "select":
            assert server.mbox is not None
        server.connectionLost(None)
        clock.advance(100)


def _pieces(data: bytes) -> list[bytes]:
    """C{data} cut in a few places that depend on its bytes only."""
    import zlib

    crc = zlib.crc32(data)
    cuts = sorted({(crc >> s) % (len(data) + 1) for s in (0, 7, 13, 21)})
    out, last = [], 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return [p for p in out if p]


class SessionFuzzTests(unittest.TestCase):
    def test_seedSessions(self):
        """The pool's lines in order (a full session), and each line alone after a login."""
        imap_session(b"\r\n".join(_POOL) + b"\r\n")
        for line in _POOL:
            imap_session(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n" + line + b"\r\n")

    def test_arbitrary(self):
        """Derandomised hypothesis: lines from the pool, mutated, in any order; and arbitrary bytes."""
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        @st.composite
        def sessions(draw):
            lines = draw(st.lists(st.sampled_from(_POOL), min_size=1, max_size=12))
            data = bytearray(b"a LOGIN bob secret\r\n" if draw(st.booleans()) else b"")
            for line in lines:
                line = bytearray(line)
                if line and draw(st.integers(0, 3)) == 0:
                    pos = draw(st.integers(0, len(line) - 1))
                    line[pos:pos + draw(st.integers(0, 3))] = draw(st.binary(max_size=4))
                data += line + b"\r\n"
            return bytes(data)

        @settings(derandomize=True, max_examples=200, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(sessions(), st.binary(max_size=300)))
        def run(data):
            imap_session(data)

        run()


class DaemonTests(unittest.TestCase):
    """The IMAP listener as the daemon runs it: behind the Guard, implicit TLS, the shared certificate."""

    def test_nonReadingClientOverTLSBounded(self):
        """A TLS client that stops reading during a 12 MB FETCH: the server holds ~HIGH_WATER unsent, no more."""
        import socket
        import threading

        from netsvc import auth
        from tests.helpers import port, startDaemon

        users = Path(self.mktemp()).absolute()
        auth.addUser(users, "dev", "dev")
        daemon = startDaemon(self, f"""
services:
  mailbox:
    listen:
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: imap}}
    users: {users}
    fsync: false
""")
        svc = daemon.getServiceNamed("mailbox")
        big = os.urandom(3 * 2**20)
        for _ in range(4):
            svc.store.deliver("dev", b"Subject: big\r\n\r\n" + big)
        cafile = Path(daemon.context.stateDir) / "tls" / "selfsigned.pem"
        imaps = port(daemon, 0, "mailbox")
        ready, go = threading.Event(), threading.Event()

        def client():
            tls = stdssl.create_default_context(cafile=str(cafile))
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            raw.settimeout(30)
            raw.connect(("127.0.0.1", imaps))
            with tls.wrap_socket(raw, server_hostname="localhost") as s:
                got = b""
                s.sendall(b"a LOGIN dev dev\r\nb SELECT INBOX\r\n")
                while b"b OK" not in got:
                    got += s.recv(65536)
                ready.set()
                go.wait(30)
                s.sendall(b"c FETCH 1:* (BODY.PEEK[])\r\n")
                time.sleep(3)  # not reading
                total = 0
                tail = b""
                while not tail.endswith(b"c OK FETCH completed\r\n"):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                    tail = (tail + chunk)[-64:]
                s.sendall(b"d LOGOUT\r\n")
                return total

        async def run():
            done = deferToThread(client)
            while not ready.is_set():
                await sleep(0.01)
            (conn,) = list(svc.guard.connections)
            tcp = conn.transport.transport  # the guard's transport is TLS; under it, TCP
            tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
            go.set()
            peak = 0
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                await sleep(0.05)
                peak = max(peak, unsentBytes(tcp))
            self.assertGreater(peak, 0)
            self.assertLessEqual(peak, imap.HIGH_WATER + imap.CHUNK + 64 * 1024)  # (TLS records' overhead)
            total = await done
            self.assertGreater(total, 12 * 2**20)

        return defer.Deferred.fromCoroutine(run())
