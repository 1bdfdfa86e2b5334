"""
C{netsvc mail read}: list a mailbox, or show one message, over IMAP or POP3.

    netsvc mail read --server localhost:1993 --cacert var/tls/selfsigned.pem --user dev
    netsvc mail read --server localhost:1993 --cacert var/tls/selfsigned.pem --user dev --show 3
    netsvc mail read --pop3 --server localhost:1110 --starttls --cacert var/tls/selfsigned.pem --user dev

One line per message: its number (IMAP: the UID; POP3: the message number),
date, sender, size in bytes and subject; C{--show N} prints message N whole
(LF line ends; to a terminal, control characters shown as C{?}).
TLS from the first byte by default (C{--starttls} for a plain port: STARTTLS or
STLS before the password), the certificate verified against C{--cacert FILE} or
the system's roots unless C{--insecure}; the password never goes in clear.  The
password comes from C{--password-file FILE} (its first line), else the
environment variable C{NETSVC_MAIL_PASSWORD}, else a prompt on the terminal.
Reading changes nothing: IMAP folders are opened read-only (EXAMINE; no
C{\\Seen} set), POP3 deletes nothing.

The client side is Python's C{imaplib} and C{poplib} (the books' recipes), run
in a thread.

Exit status: 0 success; 1 failure (connection, TLS, login refused, no such
message or folder); 2 bad usage.
"""

from __future__ import annotations

import argparse
import email.policy
import email.utils
import getpass
import imaplib
import os
import poplib
import re
import socket
import ssl
import sys
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from netsvc import clients

COMMAND = "mail read"
#: Where the password may come from when there is no --password-file.
PASSWORD_ENV = "NETSVC_MAIL_PASSWORD"
#: Default ports: (protocol, implicit TLS) -> port.
PORTS = {("imap", True): 993, ("imap", False): 143, ("pop3", True): 995, ("pop3", False): 110}


class UsageError(Exception):
    """Bad arguments or unreadable files: exit status 2."""


class ReadError(Exception):
    """A failure to report as C{WHAT: REASON} with exit status 1."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


# -- what is printed ---------------------------------------------------------------------

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """C{text} safe for a terminal: control characters (escape sequences, bidi overrides) become C{?}."""
    return _UNPRINTABLE.sub("?", text)


def summary(number: int, size: int, header: bytes, fallbackDate: float | None = None) -> str:
    """
    One line for a message: number, date (local time), sender, size, subject.
    C{header} is the message's header block (more is ignored); RFC 2047 words are decoded.
    """
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(header)

    def field(name: str) -> str:
        try:
            value = parsed.get(name)
        except (ValueError, TypeError, IndexError):  # a header the email package cannot parse
            value = None
        return " ".join(str(value).split()) if value is not None else ""

    when = None
    try:
        stamp = email.utils.parsedate_to_datetime(field("date")) if field("date") else None
        when = stamp.timestamp() if stamp is not None else None
    except (ValueError, TypeError, OverflowError):
        when = None
    if when is None:
        when = fallbackDate
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when is not None else "-" * 16
    sender = field("from") or "-"
    subject = field("subject") or "(no subject)"
    return printable(f"{number:>6}  {date}  {sender[:30]:<30}  {size:>9}  {subject}")


# -- the two protocols ---------------------------------------------------------------------

_FETCH_META = re.compile(rb"UID (\d+)|RFC822\.SIZE (\d+)|INTERNALDATE \"([^\"]+)\"")


def _imapMeta(envelope: bytes) -> tuple[int | None, int, float | None]:
    """UID, RFC822.SIZE and INTERNALDATE from the start of one FETCH response."""
    uid, size, date = None, 0, None
    for m in _FETCH_META.finditer(envelope):
        if m.group(1):
            uid = int(m.group(1))
        elif m.group(2):
            size = int(m.group(2))
        elif m.group(3):
            parsed = imaplib.Internaldate2tuple(b'INTERNALDATE "' + m.group(3) + b'"')
            date = time.mktime(parsed) if parsed else None
    return uid, size, date


def _imapText(e: BaseException) -> str:
    text = e.args[0] if e.args else str(e)
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


class IMAPReader:
    """Lists and shows messages of one folder over IMAP (imaplib), read-only."""

    protocol = "imap"

    def __init__(self, args: argparse.Namespace, password: str, context: ssl.SSLContext) -> None:
        self.args = args
        self.password = password
        self.context = context
        self.conn: Any = None

    def connect(self) -> None:
        a = self.args
        if a.tls:
            self.conn = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=self.context, timeout=a.timeout)
        else:
            self.conn = imaplib.IMAP4(a.host, a.port, timeout=a.timeout)
            if "STARTTLS" not in self.conn.capabilities:
                raise ReadError(clients.target(a.host, a.port, "imap"), "the server does not offer STARTTLS")
            self.conn.starttls(self.context)
        try:
            self.conn.login(a.user, self.password)
        except imaplib.IMAP4.error as e:
            raise ReadError(f"login as {a.user}", _imapText(e)) from None
        try:
            typ, data = self.conn.select(_quoted(a.folder), readonly=True)
        except imaplib.IMAP4.error as e:
            raise ReadError(f"folder {a.folder}", _imapText(e)) from None
        if typ != "OK":
            raise ReadError(f"folder {a.folder}", _imapText(imaplib.IMAP4.error(data[0] if data else typ)))

    def list(self) -> list[str]:
        typ, data = self.conn.uid("FETCH", "1:*", "(UID RFC822.SIZE INTERNALDATE "
                                                  "BODY.PEEK[HEADER.FIELDS (DATE FROM SUBJECT)])")
        if typ != "OK":
            raise ReadError(f"listing {self.args.folder}", _imapText(imaplib.IMAP4.error(data[0])))
        lines = []
        for item in data:
            if isinstance(item, tuple) and len(item) >= 2:
                uid, size, date = _imapMeta(item[0])
                if uid is not None:
                    lines.append((uid, summary(uid, size, item[1], date)))
        return [line for _, line in sorted(lines)]

    def show(self, number: int) -> bytes:
        typ, data = self.conn.uid("FETCH", str(number), "(BODY.PEEK[])")
        for item in data or []:
            if typ == "OK" and isinstance(item, tuple) and len(item) >= 2:
                return item[1]
        raise ReadError(f"message {number}", f"no message with UID {number} in {self.args.folder}")

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass


def _quoted(name: str) -> str:
    """A folder name as an IMAP quoted string (imaplib sends the argument as it is)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _popText(e: BaseException) -> str:
    text = e.args[0] if e.args else str(e)
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return text[5:] if text.startswith("-ERR ") else text


class POP3Reader:
    """Lists and shows the messages of the maildrop over POP3 (poplib); deletes nothing."""

    protocol = "pop3"

    def __init__(self, args: argparse.Namespace, password: str, context: ssl.SSLContext) -> None:
        self.args = args
        self.password = password
        self.context = context
        self.conn: Any = None

    def connect(self) -> None:
        a = self.args
        if a.tls:
            self.conn = poplib.POP3_SSL(a.host, a.port, context=self.context, timeout=a.timeout)
        else:
            self.conn = poplib.POP3(a.host, a.port, timeout=a.timeout)
            try:
                self.conn.stls(self.context)
            except poplib.error_proto as e:
                raise ReadError(clients.target(a.host, a.port, "pop3"), f"STLS refused: {_popText(e)}") from None
        try:
            self.conn.user(a.user)
            self.conn.pass_(self.password)
        except poplib.error_proto as e:
            raise ReadError(f"login as {a.user}", _popText(e)) from None

    def list(self) -> list[str]:
        _, listing, _ = self.conn.list()
        lines = []
        for entry in listing:
            number, size = (int(x) for x in entry.split()[:2])
            _, header, _ = self.conn.top(number, 0)
            lines.append(summary(number, size, b"\r\n".join(header) + b"\r\n"))
        return lines

    def show(self, number: int) -> bytes:
        try:
            _, lines, _ = self.conn.retr(number)
        except poplib.error_proto as e:
            raise ReadError(f"message {number}", _popText(e)) from None
        return b"\r\n".join(lines) + b"\r\n"

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.quit()  # (nothing was marked: QUIT deletes nothing)
            except (poplib.error_proto, OSError):
                pass


# -- the command ---------------------------------------------------------------------------


def tlsContext(args: argparse.Namespace) -> ssl.SSLContext:
    """The client TLS context: verified against --cacert or the system's roots, unless --insecure."""
    if args.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--cacert {args.cacert}: cannot use it as a CA file "
                             f"({getattr(e, 'strerror', None) or e})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def readPassword(args: argparse.Namespace, environ: Any = os.environ) -> str:
    """From --password-file (first line), the environment, or the terminal; @raise UsageError."""
    if args.password_file:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeError) as e:
            raise UsageError(f"--password-file {args.password_file}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        return lines[0] if lines else ""
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV]
    try:
        with open("/dev/tty"):
            pass
    except OSError:
        raise UsageError(f"no password: give --password-file FILE or set {PASSWORD_ENV} "
                         f"(there is no terminal to ask on)") from None
    try:
        return getpass.getpass(f"Password for {args.user}: ")
    except EOFError:
        raise UsageError("no password (end of input)") from None


def _describe(e: BaseException, args: argparse.Namespace) -> str:
    """One line for a connection or TLS failure."""
    if isinstance(e, ssl.SSLCertVerificationError):
        hint = clients.TLSHint(args.host, args.cacert)
        text = e.verify_message or e.reason or "certificate verify failed"
        if "hostname" in str(text).lower() or "ip address mismatch" in str(text).lower():
            return (f"TLS: the certificate is not valid for the name {args.host!r}: use a name it has, "
                    f"or {hint.insecureOption} to skip verification")
        return f"TLS: certificate verify failed ({text}): {hint.advice()}"
    if isinstance(e, ssl.SSLError):
        reason = e.reason or str(e)
        if reason and any(sign in reason.lower() for sign in ("wrong_version", "wrong version", "record layer")):
            return f"TLS: {reason} (the server does not speak TLS on this port? use --starttls for a plain port)"
        return f"TLS: {reason}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"timed out after {args.timeout:g}s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return "cannot resolve host name"
    if isinstance(e, (imaplib.IMAP4.abort, poplib.error_proto, EOFError)):
        return f"the server ended the session ({_imapText(e) or 'connection closed'})"
    if isinstance(e, OSError):
        return (e.strerror or str(e)).lower()
    return str(e) or type(e).__name__


_TERMINAL_UNSAFE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def _isTerminal(out: Any) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def read(args: argparse.Namespace, password: str, out: Any = None) -> int:
    """Connect, list (or show --show N), close; the exit status.  Blocking."""
    out = out or sys.stdout
    context = tlsContext(args)
    reader = (IMAPReader if args.protocol == "imap" else POP3Reader)(args, password, context)
    where = clients.target(args.host, args.port, args.protocol + ("s" if args.tls else "+starttls"))
    try:
        try:
            reader.connect()
            if args.show is not None:
                data = reader.show(args.show)
                text = data.replace(b"\r\n", b"\n")
                if _isTerminal(out):  # (a message's escape sequences do not reach a terminal; a file gets it all)
                    text = _TERMINAL_UNSAFE.sub(b"?", text)
                buffer = getattr(out, "buffer", None)
                if buffer is not None:
                    out.flush()
                    buffer.write(text)
                    buffer.flush()
                else:
                    out.write(text.decode("utf-8", "replace"))
            else:
                for line in reader.list():
                    out.write(line + "\n")
                out.flush()
        finally:
            reader.close()
    except ReadError as e:
        return clients.fail(COMMAND, e.what, e.reason)
    except (OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error, poplib.error_proto) as e:
        return clients.fail(COMMAND, where, _describe(e, args))
    return clients.EXIT_OK


def runRead(reactor: Any, args: argparse.Namespace) -> Any:
    try:
        args.protocol = "pop3" if args.pop3 else "imap"
        if args.tls and args.starttls:
            raise UsageError("--tls and --starttls exclude each other")
        args.tls = not args.starttls
        args.host, args.port = clients.parseAddress(args.server, PORTS[(args.protocol, args.tls)])
        if args.cacert and args.insecure:
            raise UsageError("--cacert and --insecure exclude each other")
        if args.show is not None and args.show < 1:
            raise UsageError("--show takes a message number from 1")
        if args.protocol == "pop3" and args.folder != "INBOX":
            raise UsageError("--folder is for IMAP (POP3 reads only the INBOX)")
        tlsContext(args)  # a bad --cacert is a usage error, before any password is asked for
        password = readPassword(args)
    except (UsageError, ValueError) as e:
        return clients.fail(COMMAND, "", str(e), clients.EXIT_USAGE)
    from twisted.internet import threads

    return threads.deferToThread(read, args, password)


def addSubparsers(commands: Any) -> None:
    """C{read} under C{netsvc mail}."""
    r = commands.add_parser(
        "read", help="list a mailbox or show a message (IMAP or POP3)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = r.add_mutually_exclusive_group()
    which.add_argument("--imap", action="store_true", help="over IMAP (the default)")
    which.add_argument("--pop3", action="store_true", help="over POP3")
    r.add_argument("--server", default="localhost", metavar="HOST[:PORT]",
                   help="the server (default localhost; port 993/995, or 143/110 with --starttls)")
    r.add_argument("--tls", action="store_true", help="TLS from the first byte (the default)")
    r.add_argument("--starttls", action="store_true", help="a plain port: STARTTLS (IMAP) or STLS (POP3) first")
    r.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in FILE (PEM)")
    r.add_argument("-k", "--insecure", action="store_true", help="do not verify the server's certificate")
    r.add_argument("--user", required=True, help="the login")
    r.add_argument("--password-file", metavar="FILE",
                   help=f"the password (first line); default: ${PASSWORD_ENV}, else a prompt")
    r.add_argument("--folder", default="INBOX", help="the IMAP folder to read (default INBOX)")
    r.add_argument("--show", type=int, metavar="N",
                   help="print message N whole (IMAP: its UID; POP3: its number), as listed")
    r.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait for the connection and each answer (default 10)")
    r.set_defaults(run=runRead)
