"""
IMAP4rev1 server (RFC 3501) over the Maildir++ store, on C{twisted.mail.imap4}.

    IMAPFactory(store, authenticator, tlsContext=None, *, failureLimit=None, implicitTLS=False,
                maxLiteral=50 * 2**20, idleTimeout=1800, preauthTimeout=60, pollInterval=2.0,
                keepalive=120, maxBadCommands=20, maxAuthFailures=5, run=None, clock=None)

  - C{store}: a L{netsvc.mailbox.maildir.Maildirs}.
  - C{authenticator}: an L{netsvc.auth.Authenticator} (C{check(user, password)} fires a bool or
    L{netsvc.auth.Refused}); C{failureLimit}: an L{netsvc.auth.FailureLimit} applied per client
    address, reserve-first (C{limitedCheck}).
  - C{tlsContext}: the server's TLS context factory (STARTTLS on a plain listener); C{implicitTLS}:
    the listener is TLS already (C{tls:} endpoint) -- LOGIN/AUTHENTICATE are allowed at once.
    Without TLS (neither), LOGIN and AUTHENTICATE are refused: C{LOGINDISABLED}.
  - C{maxLiteral}: the largest APPEND (bytes); bigger ones get C{NO [TOOBIG]} before any byte is
    read (C{APPENDLIMIT} is advertised).  C{idleTimeout}: seconds of silence after login (and the
    longest IDLE); C{preauthTimeout} before.  C{pollInterval}: how often IDLE looks at the folder
    (a few stats).  C{keepalive}: seconds between C{* OK Still here} during IDLE.
  - C{run(f, *args)}: how blocking store calls run (default C{deferToThread}); C{clock}: a reactor.
  - C{factory.counts}: a dict of counters (logins, login_failures, login_refused_rate,
    bad_commands, closed_bad_commands, literal_too_big, ...) the service can export.

Capabilities: IMAP4rev1 LITERAL+ ENABLE (enables nothing) IDLE NAMESPACE UIDPLUS MOVE SPECIAL-USE
UNSELECT CHILDREN APPENDLIMIT; before TLS STARTTLS LOGINDISABLED, after it AUTH=PLAIN SASL-IR.
Folders are the store's (C{.} separator, INBOX plus Sent/Drafts/Trash/Archive with their
special-use attributes); names are modified UTF-7 on the wire.  Not there: \\Recent (always 0),
CONDSTORE/QRESYNC, MULTIAPPEND, LIST-EXTENDED, QUOTA, ID, SEARCH literals and CHARSET other
than US-ASCII/UTF-8.

Wire behaviour: one command at a time per connection (reading pauses while a command runs; the
next command waits in the kernel), bounded command lines (C{MAX_LENGTH}) and literals, FETCH
output written only while the transport holds less than C{HIGH_WATER} unsent bytes (a client
that never reads stalls its own FETCH, nothing grows; one that takes nothing for C{idleTimeout}
is aborted), a connection sending junk gets C{BAD} and is closed after C{maxBadCommands} in a
row, C{maxAuthFailures} failed logins close it too.  Changes made elsewhere (delivery, POP3,
another session) are reported on NOOP/CHECK, during IDLE (polled every C{pollInterval}) and
after the session's own EXPUNGE/MOVE/APPEND.  TCP_NODELAY is set (a tagged line leaving a
reactor turn after its data would otherwise wait for the client's delayed ACK).  Blocking
store work runs through C{run}.  FETCH and SEARCH hold about one message at a time, not the
folder: what FETCH items need from the contents (header, BODYSTRUCTURE, a section's byte range)
is made in C{run} calls a few messages each (C{PREPARE_BUDGET}), the message's bytes dropped
there; BODY[], RFC822, TEXT and BODY[n...] sections are then streamed from the file on the
reactor (C{CHUNK}s, under the output bound); each message is let go once its answer is written.
SEARCH keys that read headers or contents run in C{run} calls, TEXT/BODY reading each message in
chunks.  An IDLE ended while a poll is listing the folder answers its tagged line after the
poll's untagged ones (never inside the next command's answer).

L{imap_session} in C{tests/mailbox/test_imap.py} is the session's fuzz target.

Twisted 26's C{IMAP4Server} is used for its parser, dispatch, FETCH item machinery and search
filters.  Replaced here because broken or missing there: LOGIN/AUTHENTICATE (any password check
without a limit, LOGIN answered C{BAD} before TLS, no C{[AUTHENTICATIONFAILED]}), STARTTLS
(input pipelined behind it was kept: injection), literals (no size limit on APPEND, no
LITERAL+), FETCH bodies (C{FileProducer} as a pull producer never resumes behind a transport
that writes eagerly; partial C{<a.b>} fetches sent the whole body; C{\\Seen} never set; header
values outside ASCII raised), BODY[n...] sections and BODY/BODYSTRUCTURE (from C{_Node}, byte
ranges of the stored message: C{email} objects re-serialised gave LF where CRLF was stored; a
message/rfc822 part had its extension data before the envelope, an LF-counted size and the
body's lines for the whole held message's), SELECT (no PERMANENTFLAGS/UIDNEXT/UNSEEN), LIST (no child or
special-use attributes, C{/} as separator), APPEND/COPY (no UIDPLUS codes), EXPUNGE/MOVE/UID
EXPUNGE/UNSELECT/ENABLE (missing), SEARCH (copies the rest of the list every five messages;
SENT*/BEFORE/ON/SINCE answered BAD; C{HEADER name ""} matched every message),
IDLE (no updates, any line ended it), commands running concurrently (answers out of order),
the FETCH loop (every message read was kept until the command ended) and SEARCH TEXT/BODY (each
message read whole on the reactor).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import copy
import email.utils
import re
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from email import message_from_bytes
from email.header import decode_header, make_header
from email.policy import compat32
from email.utils import collapse_rfc2231_value
from io import BytesIO
from typing import Any

from twisted.cred.error import UnauthorizedLogin  # noqa: F401  (documented contract of authenticators)
from twisted.internet import defer, task
from twisted.internet.interfaces import INegotiated
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.imap4 import IllegalClientResponse, IllegalMailboxEncoding, MessageSet

from netsvc.auth import Refused, limitedCheck
from netsvc.mailbox.maildir import (
    SEPARATOR,
    SPECIAL_USE,
    FolderExists,
    InvalidName,
    MailboxError,
    Maildirs,
    Message,
    NoSuchFolder,
    normaliseUser,
)

log = Logger()

__all__ = ["IMAPFactory", "IMAPServer"]

HIGH_WATER = 256 * 1024  # unsent bytes above which FETCH waits and reading pauses
LOW_WATER = 64 * 1024
CHUNK = 64 * 1024
PREPARE_BUDGET = 4 * 2**20  # bytes a FETCH/SEARCH store call reads (or keeps) before answering them
FETCH_BATCH = 256  # messages at most per such call
HEADER_LIMIT = 1024 * 1024  # a header block longer than this is cut (FETCH HEADER, ENVELOPE, SEARCH FROM ...)
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_CANONICAL = {f.lower(): f for f in SYSTEM_FLAGS}
_LITERAL_PLUS = re.compile(rb"\{(\d{1,20})\+\}$")
_TAG = re.compile(rb"[!#$&',-./0-9:;<=>?@A-Z\[^_`a-z|}~]{1,64}")  # atom chars without "+"
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


def _q(value: bytes) -> bytes:
    """An IMAP quoted string."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _mailboxName(raw: bytes | str) -> str:
    """A mailbox name from the wire (modified UTF-7).  @raise IllegalMailboxEncoding"""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("imap4-utf-7")
    except Exception:
        raise IllegalMailboxEncoding(raw) from None


def _wireName(name: str) -> bytes:
    return _q(name.encode("imap4-utf-7"))


def _uidSet(uids: list[int]) -> bytes:
    """C{1:3,7} for [1, 2, 3, 7] (in the order given, runs collapsed)."""
    out: list[bytes] = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(b"%d" % uids[i] if i == j else b"%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return b",".join(out)


def _imapDate(ts: float) -> bytes:
    t = time.gmtime(ts)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def _parseAppendDate(raw: bytes | None) -> float | None:
    """An APPEND date-time (C{" 7-Dec-2026 05:10:54 +0100"}) as seconds.  @raise IllegalClientResponse"""
    if raw is None:
        return None
    m = re.fullmatch(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", raw)
    months = [x.lower() for x in _MONTHS]
    if not m or m.group(2).decode().lower() not in months:
        raise IllegalClientResponse("Malformed date-time")
    day, mon, year, hh, mm, ss = (int(m.group(1)), months.index(m.group(2).decode().lower()) + 1,
                                  int(m.group(3)), int(m.group(4)), int(m.group(5)), int(m.group(6)))
    try:
        ts = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
        time.gmtime(ts)
    except (ValueError, OverflowError):
        raise IllegalClientResponse("Malformed date-time") from None
    offset = (int(m.group(8)) * 60 + int(m.group(9))) * 60
    return float(ts - offset if m.group(7) == b"+" else ts + offset)


def _searchDay(raw: Any) -> tuple[int, int, int]:
    """A SEARCH date (C{1-Feb-1994}) as (year, month, day).  @raise IllegalClientResponse"""
    m = re.fullmatch(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})", _bytes(raw))
    months = [x.lower() for x in _MONTHS]
    if not m or m.group(2).decode().lower() not in months:
        raise IllegalClientResponse("Malformed date")
    day, mon, year = int(m.group(1)), months.index(m.group(2).decode().lower()) + 1, int(m.group(3))
    if not 1 <= day <= calendar.monthrange(year, mon)[1]:
        raise IllegalClientResponse("Malformed date")
    return year, mon, day


def _splitMessage(raw: bytes) -> int:
    """Where the body of C{raw} starts (after the blank line; len(raw) when there is none)."""
    if raw.startswith((b"\r\n", b"\n")):
        return 2 if raw.startswith(b"\r\n") else 1
    candidates = [i + 4 for i in [raw.find(b"\r\n\r\n")] if i >= 0]
    candidates += [i + 2 for i in [raw.find(b"\n\n")] if i >= 0]
    return min(candidates) if candidates else len(raw)


def _headerFields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, raw field with its CRLF) for each field of a header block."""
    fields: list[tuple[bytes, bytes]] = []
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        m = _HEADER_NAME.match(line)
        fields.append((m.group(1).lower() if m else b"", line))
    return fields


def _filterHeader(block: bytes, names: list[bytes], negate: bool) -> bytes:
    wanted = {n.lower() for n in names}
    kept = [raw for name, raw in _headerFields(block) if (name in wanted) != negate]
    return b"".join(kept) + b"\r\n"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _disposition(value: str) -> str:
    """A Content-Disposition value as Twisted's BODYSTRUCTURE code can split it ("; " and "="):
    parameter values unquoted (it kept the quotes: ("filename" "\\"r.bin\\""))."""
    from email.message import Message as EmailMessage
    from email.utils import collapse_rfc2231_value

    m = EmailMessage()
    m["Content-Disposition"] = value
    params = m.get_params(header="content-disposition") or []
    if not params:
        return value
    out = [params[0][0].lower()]
    for k, v in params[1:]:
        v = collapse_rfc2231_value(v) if v else ""
        out.append(f"{k.lower()}={v.replace('; ', ';')}")
    return "; ".join(out)


def _ascii(value: Any) -> str:
    text = str(value)
    return text.encode("ascii", "replace").decode("ascii")


def _withEncoding(headers: dict[str, str], negate: bool, names: tuple) -> dict[str, str]:
    """C{headers} with Content-Transfer-Encoding defaulted to 7bit (BODYSTRUCTURE may not say NIL there)."""
    if not negate and "content-transfer-encoding" in [n.lower() for n in names]:
        headers.setdefault("content-transfer-encoding", "7bit")
    return headers


_MAX_DEPTH = 32  # MIME nesting described in BODYSTRUCTURE (deeper: the plain fallback structure)
_IDENTITY = ("", "7bit", "8bit", "binary")


def _bodyOffset(raw: bytes, start: int, end: int) -> int:
    """Where the body of the entity raw[start:end] starts (C{_splitMessage} without copying)."""
    if raw.startswith(b"\r\n", start, end):
        return start + 2
    if raw.startswith(b"\n", start, end):
        return start + 1
    i = raw.find(b"\r\n\r\n", start, end)
    limit = end if i < 0 else i + 4
    j = raw.find(b"\n\n", start, limit)
    candidates = [x for x in (i + 4 if i >= 0 else -1, j + 2 if j >= 0 else -1) if x >= 0]
    return min(candidates) if candidates else end


def _lines(raw: bytes, start: int, end: int) -> int:
    """Lines in raw[start:end] (a last line without its line break counts)."""
    n = raw.count(b"\n", start, end)
    return n + 1 if end > start and raw[end - 1:end] != b"\n" else n


def _headerDict(block: bytes, negate: bool, names: tuple) -> dict[str, str]:
    """Twisted's C{getHeaders}: lower-case name -> unfolded value (ASCII, "?" for other bytes), first wins."""
    wanted = {n.lower().encode("ascii", "replace") for n in names}
    out: dict[str, str] = {}
    for name, raw in _headerFields(block):
        if name and (name in wanted) != negate and name.decode("ascii", "replace") not in out:
            value = raw.split(b":", 1)[1].strip() if b":" in raw else b""
            value = re.sub(rb"\r?\n[ \t]+", b" ", value)
            text = value.decode("ascii", "replace").replace("\ufffd", "?")
            out[name.decode("ascii", "replace")] = _disposition(text) if name == b"content-disposition" else text
    return out


class _Node:
    """
    One MIME entity of a stored message as offsets into the message's bytes: its header is
    C{raw[start:bodyStart]}, its body C{raw[bodyStart:end]}.  Sections are served from these ranges,
    so they are the bytes as stored (RFC 3501 6.4.5), CRLF and all; an C{email} object re-serialised
    gave LF.  Children: the parts of a multipart (split at its boundary lines, the line break before
    a delimiter being the delimiter's, RFC 2046 5.1.1), or the encapsulated message of a
    message/rfc822.  Also Twisted's C{IMessagePart}.
    """

    def __init__(self, raw: bytes, start: int, end: int, depth: int = 0, digest: bool = False) -> None:
        self.raw, self.start, self.end, self.depth = raw, start, end, depth
        self.bodyStart = _bodyOffset(raw, start, end)
        self._head = message_from_bytes(raw[start:self.bodyStart], policy=compat32)
        if digest:
            self._head.set_default_type("message/rfc822")
        self.contentType = self._head.get_content_type()
        self._children: list[_Node] | None = None

    def header(self) -> bytes:
        return self.raw[self.start:self.bodyStart]

    def body(self) -> bytes:
        return self.raw[self.bodyStart:self.end]

    def isMultipart(self) -> bool:
        return self.contentType.startswith("multipart/")

    def children(self) -> list[_Node]:
        if self._children is None:
            self._children = []
            if self.depth < _MAX_DEPTH:
                if self.isMultipart():
                    self._children = self._parts()
                elif self.contentType == "message/rfc822" and self.getHeaders(
                        False, "content-transfer-encoding").get("content-transfer-encoding", "").lower() in _IDENTITY:
                    self._children = [_Node(self.raw, self.bodyStart, self.end, self.depth + 1)]
        return self._children

    def encapsulated(self) -> _Node | None:
        """The message a message/rfc822 entity holds (None for other types)."""
        if self.contentType != "message/rfc822":
            return None
        children = self.children()
        return children[0] if children else None

    def _parts(self) -> list[_Node]:
        boundary = self._head.get_boundary()
        if not boundary:
            return []
        try:
            delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            return []
        raw, end, digest = self.raw, self.end, self.contentType == "multipart/digest"
        spans: list[tuple[int, int]] = []
        partStart: int | None = None
        pos = self.bodyStart
        while True:
            i = raw.find(delimiter, pos, end)
            if i < 0:
                break
            lineEnd = raw.find(b"\n", i, end)
            lineEnd = end if lineEnd < 0 else lineEnd + 1
            rest = raw[i + len(delimiter):lineEnd].rstrip(b"\r\n")
            close = rest.startswith(b"--")
            if (i > self.bodyStart and raw[i - 1:i] != b"\n") or (rest[2:] if close else rest).strip(b" \t"):
                pos = i + 1  # not a delimiter line
                continue
            if partStart is not None:
                stop = i
                if stop > partStart and raw[stop - 1:stop] == b"\n":
                    stop -= 1
                    if stop > partStart and raw[stop - 1:stop] == b"\r":
                        stop -= 1
                spans.append((partStart, stop))
            if close:
                partStart = None
                break
            partStart = pos = lineEnd
        if partStart is not None:  # no close delimiter: the last part runs to the end
            spans.append((partStart, end))
        return [_Node(raw, s, e, self.depth + 1, digest) for s, e in spans]

    def params(self) -> list[str] | None:
        """The Content-Type parameters as a flat list (in their order), the default's if there is none."""
        if "content-type" not in self._head:
            return ["charset", "us-ascii"] if self.contentType == "text/plain" else None
        out: list[str] = []
        for key, value in (self._head.get_params(header="content-type") or [])[1:]:
            out += [_ascii(key), _ascii(collapse_rfc2231_value(value) if value else "")]
        return out or None

    # IMessagePart
    def getHeaders(self, negate: bool, *names: str) -> dict[str, str]:
        return _withEncoding(_headerDict(self.header(), negate, names), negate, names)

    def getBodyFile(self) -> BytesIO:
        return BytesIO(self.body())

    def getSize(self) -> int:
        return self.end - self.bodyStart

    def getSubPart(self, index: int) -> _Node:
        children = self.children() if self.isMultipart() else []
        if index >= len(children):
            raise IndexError(index)
        return children[index]


def _findPart(root: _Node, path: list[int]) -> _Node | None:
    """The entity of section part C{path} (zero-based numbers) of the message C{root}, or None.  Part 1
    of a message that is not multipart is its body (the message itself here); the numbers after a
    message/rfc822 part number the parts of the message it holds (RFC 3501 6.4.5)."""
    node = root
    for n, index in enumerate(path):
        inner = node.encapsulated() if n > 0 else None
        if node.isMultipart():
            children = node.children()
        elif inner is not None:
            children = inner.children() if inner.isMultipart() else [inner]
        else:
            children = [node]
        if index >= len(children):
            return None
        node = children[index]
    return node


def _dispositionList(value: str | None) -> list | None:
    """A (normalised, see L{_disposition}) Content-Disposition as BODYSTRUCTURE's (type (params))."""
    if not value:
        return None
    kind, *rest = value.split("; ")
    params = [x for p in rest for x in p.split("=", 1)]
    return [kind.lower(), params or None]


def _bodyStructure(node: _Node, extended: bool) -> list:
    """RFC 3501 7.4.2 BODY (C{extended}: BODYSTRUCTURE) of C{node}, as a nested list.  A message/rfc822
    part: the basic fields, its envelope, body structure and lines (the held message's, header
    included), then the extension data (Twisted put the extension data first)."""
    main, _, sub = node.contentType.partition("/")
    headers = node.getHeaders(False, "content-id", "content-description", "content-transfer-encoding",
                              "content-md5", "content-disposition", "content-language", "content-location")
    extension = [_dispositionList(headers.get("content-disposition")), headers.get("content-language"),
                 headers.get("content-location")]
    if node.isMultipart():
        if node.depth >= _MAX_DEPTH:
            raise ValueError("MIME nesting too deep")
        parts = node.children() or [_Node(node.raw, node.end, node.end, node.depth + 1)]
        out = [_bodyStructure(p, extended) for p in parts] + [sub]
        return out + [node.params()] + extension if extended else out
    out = [main, sub, node.params(), headers.get("content-id"), headers.get("content-description"),
           headers.get("content-transfer-encoding"), node.getSize()]
    inner = node.encapsulated()
    if inner is not None:
        out += [imap4.getEnvelope(inner), _bodyStructure(inner, extended), _lines(node.raw, inner.start, inner.end)]
    elif node.contentType == "message/rfc822" and node.depth >= _MAX_DEPTH:
        raise ValueError("MIME nesting too deep")
    elif main == "text":
        out.append(_lines(node.raw, node.bodyStart, node.end))
    return out + [headers.get("content-md5")] + extension if extended else out


class _Message:
    """
    One message of a selected folder, as Twisted's C{IMessage}.  Its contents are read lazily and
    kept only until L{release}: FETCH and SEARCH read them in store calls (a thread) a few messages at
    a time (L{prepare}: what the FETCH items need, sections as byte ranges of the file, then the bytes
    dropped) and let each message go once its answer is written, so a command holds about one
    message, not the folder.
    """

    def __init__(self, view: _View, meta: Message) -> None:
        self.view = view
        self.meta = meta
        self._raw: bytes | None = None
        self._tree: _Node | None = None
        self._header: bytes | None = None
        self._bodyStart: int | None = None
        self._ready: dict[Any, Any] = {}

    def release(self) -> None:
        """Let go of everything read or made from the message's contents."""
        self._raw = self._tree = self._header = None
        self._ready = {}

    def raw(self) -> bytes:
        if self._raw is None:
            try:
                self._raw = self.view.folder.read(self.meta.uid)
            except MailboxError:
                self._raw = b""  # expunged by another session meanwhile
        return self._raw

    def header(self) -> bytes:
        """The header block (with its blank line), read from the file's start only."""
        if self._header is not None:
            return self._header
        if self._raw is not None:
            self._header = self._raw[:_splitMessage(self._raw)]
            return self._header
        head = b""
        try:
            with self.view.folder.open(self.meta.uid) as f:
                while len(head) < HEADER_LIMIT:
                    chunk = f.read(16384)
                    head += chunk
                    end = _splitMessage(head)
                    if end < len(head) or not chunk:
                        break
                    if head.endswith((b"\r\n\r", b"\r", b"\n")):  # maybe cut inside the blank line
                        continue
        except MailboxError:
            pass
        self._header = head[:_splitMessage(head)]
        return self._header

    def bodyOffset(self) -> int:
        """Where the body starts in the stored message (its length if it has none): read in chunks."""
        if self._bodyStart is None:
            if self._raw is not None:
                self._bodyStart = _splitMessage(self._raw)
            else:
                try:
                    with self.view.folder.open(self.meta.uid) as f:
                        self._bodyStart = _scanBodyOffset(f)
                except MailboxError:
                    self._bodyStart = 0
        return self._bodyStart

    def body(self) -> bytes:
        raw = self.raw()
        return raw[_splitMessage(raw):]

    def contains(self, needle: bytes, body: bool) -> bool:
        """Whether the message (its body only: C{body}) holds C{needle}, ASCII letters caseless; read
        in chunks, so a big message is never held whole."""
        needle = needle.lower()
        start = self.bodyOffset() if body else 0
        try:
            f = self.view.folder.open(self.meta.uid)
        except MailboxError:
            return not needle  # expunged meanwhile: as an empty message
        with f:
            f.seek(start)
            tail = b""
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    return not needle
                window = tail + chunk.lower()
                if needle in window:
                    return True
                tail = window[len(window) - len(needle) + 1:] if len(needle) > 1 else b""

    def tree(self) -> _Node:
        """The message's MIME structure, as byte ranges of its stored bytes."""
        if self._tree is None:
            raw = self.raw()
            self._tree = _Node(raw, 0, len(raw))
        return self._tree

    # -- what FETCH items need from the contents (made in L{prepare}, kept until L{release}) --

    def structure(self, extended: bool) -> bytes:
        """BODYSTRUCTURE (C{extended}) or BODY, as bytes."""
        key = ("structure", extended)
        if key not in self._ready:
            try:
                value = imap4.collapseNestedLists([_bodyStructure(self.tree(), extended)])
            except Exception:
                body = self.body()
                value = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d)' % (
                    len(body), body.count(b"\n"))
            self._ready[key] = value
        return self._ready[key]

    def envelope(self) -> bytes:
        if "envelope" not in self._ready:
            try:
                value = imap4.collapseNestedLists([imap4.getEnvelope(self)])
            except Exception:
                value = b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
            self._ready["envelope"] = value
        return self._ready["envelope"]

    def section(self, part: Any) -> bytes | tuple[int, int | None]:
        """The section C{part} names (not BODY[] itself): its bytes (header fields), or the byte range
        (start, end; end None: the file's end) of the stored message it is."""
        key = ("section", id(part))
        if key not in self._ready:
            self._ready[key] = self._section(part)
        return self._ready[key]

    def _section(self, part: Any) -> bytes | tuple[int, int | None]:
        if not part.part:
            if part.header:
                block = self.header()
                if part.header.fields:
                    return _filterHeader(block, list(part.header.fields), bool(part.header.negate))
                return block
            return (self.bodyOffset(), None)  # TEXT
        node = _findPart(self.tree(), list(part.part))
        if node is None:
            return b""
        if part.mime:
            return (node.start, node.bodyStart)
        if part.header or part.text:  # of the message a message/rfc822 part holds
            inner = node.encapsulated() or node
            if part.text:
                return (inner.bodyStart, inner.end)
            if part.header.fields:
                return _filterHeader(inner.header(), list(part.header.fields), bool(part.header.negate))
            return (inner.start, inner.bodyStart)
        return (node.bodyStart, node.end)

    def prepare(self, query: list) -> int:
        """Make what the FETCH items C{query} need from the contents (a store call: blocking), then drop
        the message's bytes.  Returns about how many bytes that read and kept."""
        for part in query:
            if part.type == "envelope":
                self.envelope()
            elif part.type == "bodystructure":
                self.structure(True)
            elif part.type == "rfc822header":
                self.header()
            elif part.type == "rfc822text":
                self.bodyOffset()
            elif part.type == "body":
                if not (part.header or part.text or part.mime or part.empty):
                    self.structure(False)
                elif part.part or not part.empty:
                    self.section(part)
        weight = len(self._raw or b"") + len(self._header or b"") + sum(
            len(v) for v in self._ready.values() if isinstance(v, bytes))
        self._raw = self._tree = None
        return weight

    def hasHeader(self, name: str) -> bool:
        wanted = name.lower().encode("ascii", "replace")
        return any(field == wanted for field, _ in _headerFields(self.header()))

    # IMessage
    def getUID(self) -> int:
        return self.meta.uid

    def getFlags(self) -> list[str]:
        return sorted(self.meta.flags)

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.meta.internaldate, usegmt=True)

    def getSize(self) -> int:
        return self.meta.size

    def getHeaders(self, negate: bool, *names: str) -> dict[str, str]:
        return _headerDict(self.header(), negate, names)

    def headerText(self, name: str) -> str:
        """Every C{name} field's value, unfolded, RFC 2047-decoded, joined by newlines ("" if none)."""
        wanted = name.lower().encode("ascii", "replace")
        values = []
        for field, raw in _headerFields(self.header()):
            if field == wanted:
                value = re.sub(rb"\r?\n[ \t]+", b" ", raw.split(b":", 1)[1].strip())
                text = value.decode("utf-8", "replace")
                try:
                    text = str(make_header(decode_header(text)))
                except Exception:
                    pass
                values.append(text)
        return "\n".join(values)

    def getBodyFile(self) -> BytesIO:
        return BytesIO(self.body())

    def isMultipart(self) -> bool:
        return self.tree().isMultipart()

    def getSubPart(self, index: int) -> _Node:
        return self.tree().getSubPart(index)


def _scanBodyOffset(f: Any) -> int:
    """C{_splitMessage} of the file C{f}, read in chunks (a long header is never held whole)."""
    chunk = f.read(CHUNK)
    if chunk.startswith((b"\r\n", b"\n")):
        return 2 if chunk.startswith(b"\r\n") else 1
    base, tail = 0, b""
    while chunk:
        window = tail + chunk
        origin = base - len(tail)
        i, j = window.find(b"\r\n\r\n"), window.find(b"\n\n")
        ends = [origin + i + 4] if i >= 0 else []
        ends += [origin + j + 2] if j >= 0 else []
        if ends:
            return min(ends)
        base += len(chunk)
        tail = window[-3:]
        chunk = f.read(CHUNK)
    return base


def _prepareAll(messages: list[_Message], query: list) -> int:
    """L{_Message.prepare} for the first messages of C{messages}, until about C{PREPARE_BUDGET} bytes
    were read or kept (one message at least); returns how many were prepared.  A store call."""
    weight = 0
    for n, msg in enumerate(messages, 1):
        weight += msg.prepare(query)
        if weight >= PREPARE_BUDGET:
            return n
    return len(messages)


def _needsContents(query: list) -> bool:
    """Whether the FETCH items C{query} need the message's contents beyond its whole bytes streamed."""
    return any(p.type in ("envelope", "bodystructure", "rfc822header", "rfc822text")
               or (p.type == "body" and (p.part or not p.empty)) for p in query)


_CONTENT_KEYS = {b"SUBJECT", b"FROM", b"TO", b"CC", b"BCC", b"HEADER", b"SENTBEFORE", b"SENTON", b"SENTSINCE",
                 b"BODY", b"TEXT"}


def _searchWords(query: list) -> set[bytes]:
    """Every word of a parsed SEARCH query, upper-case (search keys and their arguments alike)."""
    out: set[bytes] = set()
    for item in query:
        if isinstance(item, list):
            out |= _searchWords(item)
        else:
            out.add(_bytes(item).upper())
    return out


class _View:
    """The selected folder as this session sees it: sequence numbers, cached flags."""

    def __init__(self, folder: Any, writable: bool, messages: list[Message]) -> None:
        self.folder = folder
        self.writable = writable
        self.messages = messages

    def isWriteable(self) -> bool:
        return self.writable

    def addListener(self, listener: Any) -> None:
        pass

    def removeListener(self, listener: Any) -> None:
        pass

    def getUID(self, seq: int) -> int:
        return self.messages[seq - 1].uid

    def resolve(self, messages: MessageSet, uid: bool) -> list[tuple[int, Message]]:
        """(sequence number, message) of those C{messages} names (UIDs or sequence numbers), in order."""
        count = len(self.messages)
        if not count:
            return []
        last = self.messages[-1].uid if uid else count
        keys = [m.uid for m in self.messages] if uid else None
        chosen: set[int] = set()
        for low, high in messages.ranges:
            low = last if low is None else low
            high = last if high is None else high
            if low > high:
                low, high = high, low
            if uid:
                chosen.update(range(bisect_left(keys, low), bisect_right(keys, high)))
            else:
                chosen.update(range(max(low, 1) - 1, min(high, count)))
        return [(i + 1, self.messages[i]) for i in sorted(chosen)]

    def fetch(self, messages: MessageSet, uid: bool) -> list[tuple[int, _Message]]:
        return [(i, _Message(self, m)) for i, m in self.resolve(messages, uid)]

    def replace(self, seq: int, meta: Message) -> None:
        self.messages[seq - 1] = meta


def _safe(parser: Any) -> Any:
    """Twisted's argument parser C{parser}, with its other exceptions (e.g. the FETCH attribute parser's
    bare C{Exception}) turned into C{IllegalClientResponse}: a tagged BAD, not a logged server error."""

    def parse(self: Any, line: bytes) -> Any:
        try:
            return parser(self, line)
        except (IllegalClientResponse, imap4.IllegalOperation, IllegalMailboxEncoding):
            raise
        except Exception:
            raise IllegalClientResponse("Malformed arguments") from None

    return parse


_S = imap4.IMAP4Server
_astring, _finalastring, _atom, _line = (_safe(_S.arg_astring), _safe(_S.arg_finalastring), _safe(_S.arg_atom),
                                         _safe(_S.arg_line))
_plist, _optPlist, _optDatetime, _literal = (_safe(_S.arg_plist), _safe(_S.opt_plist), _safe(_S.opt_datetime),
                                             _safe(_S.arg_literal))
_seqset, _fetchatt, _flaglist = _safe(_S.arg_seqset), _safe(_S.arg_fetchatt), _safe(_S.arg_flaglist)
_charset, _searchkeys = _safe(_S.opt_charset), _safe(_S.arg_searchkeys)


class IMAPServer(imap4.IMAP4Server):
    """One IMAP connection (see the module docstring)."""

    IDENT = b"netsvc IMAP4rev1 ready"
    MAX_LENGTH = 16384  # command line limit (bytes)
    _literalStringLimit = 4096  # literals inside a command (LOGIN names, mailbox names)

    def __init__(self, factory: IMAPFactory) -> None:
        super().__init__(contextFactory=factory.tlsContext)
        self.factory = factory
        self.store: Maildirs = factory.store
        self.timeOut = factory.preauthTimeout
        self.POSTAUTH_TIMEOUT = factory.idleTimeout
        self._scheduler = self._schedule
        self._depth = 0
        self.callLater = factory.clock.callLater  # TimeoutMixin's clock
        self.user: str | None = None
        self._busy = False
        self._tag = b""
        self._nonSync = False
        self._badRun = 0
        self._authFailures = 0
        self._resumeCall = None
        self._drainCall = None
        self._drainWaiters: list[defer.Deferred] = []
        self._stallSince: float | None = None
        self._idleLoop = None
        self._closing = False
        self._abortCall = None
        self._polling = False
        self._idleEnd: Any = None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.counts["connections"] += 1
        try:
            # a response often leaves in two writes (the data, then the tagged line a turn later):
            # with Nagle the second waits for the client's delayed ACK, ~40 ms per command
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self._closing = True
        for call in (self._resumeCall, self._drainCall, self._abortCall):
            if call is not None and call.active():
                call.cancel()
        self._resumeCall = self._drainCall = self._abortCall = None
        if self._idleLoop is not None and self._idleLoop.running:
            self._idleLoop.stop()
        self._idleLoop = None
        self._drainWaiters = []
        super().connectionLost(reason)

    def _host(self) -> str:
        peer = self.transport.getPeer()
        return getattr(peer, "host", str(peer))

    def _secure(self) -> bool:
        return bool(self.startedTLS or self.factory.implicitTLS or INegotiated.providedBy(self.transport))

    def _close(self, why: bytes) -> None:
        """Say BYE and close; abort if the client does not let the close finish."""
        if self._closing:
            return
        self._closing = True
        self.sendLine(b"* BYE " + why)
        self.setTimeout(None)
        self.transport.loseConnection()
        self._abortCall = self.factory.clock.callLater(10, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def timeoutConnection(self) -> None:
        self.factory.counts["idle_timeouts"] += 1
        self._close(b"Autologout; connection idle too long")

    def timedOut(self) -> None:  # the Guard's idle timeout
        self.timeoutConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.factory.counts["line_too_long"] += 1
        self._close(b"Command line too long")

    def capabilities(self) -> dict:
        caps: dict = {}
        if not self._secure():
            if self.ctx is not None and self.canStartTLS:
                caps[b"STARTTLS"] = None
            caps[b"LOGINDISABLED"] = None
        elif self.state == "unauth":
            caps[b"AUTH"] = [b"PLAIN"]
            caps[b"SASL-IR"] = None
        for cap in (b"LITERAL+", b"ENABLE", b"IDLE", b"NAMESPACE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE",
                    b"UNSELECT", b"CHILDREN"):
            caps[cap] = None
        caps[b"APPENDLIMIT=%d" % self.factory.maxLiteral] = None
        return caps

    # -- one command at a time, bounded output -------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if self.parseState == "command":
            tag = line.split(b" ", 1)[0]
            if not line.strip() or not _TAG.fullmatch(tag):
                self._respond(b"BAD", None, b"Invalid tag or empty line")
                self._countBad()
                return
            self._busy = True
            self._tag = tag
        m = _LITERAL_PLUS.search(line) if self.parseState in ("command", "pending") else None
        if m:
            line = line[:m.start()] + b"{" + m.group(1) + b"}"
            self._nonSync = True
        super().lineReceived(line)
        self._updateReading()

    def parse_command(self, line: bytes) -> None:
        try:
            super().parse_command(line)
        except Exception:
            log.failure("IMAP command failed")
            self.sendBadResponse(self._tag, b"[SERVERBUG] Internal error")

    def _IMAP4Server__ebDispatch(self, failure: Any, tag: bytes) -> None:
        # (Twisted's private errback of a command whose arguments came asynchronously, e.g. after a literal)
        e = failure.value
        if isinstance(e, IllegalClientResponse):
            self.sendBadResponse(tag, b"Illegal syntax: " + str(e).encode("ascii", "replace")[:200])
        elif isinstance(e, imap4.IllegalOperation):
            self.sendNegativeResponse(tag, b"Illegal operation: " + str(e).encode("ascii", "replace")[:200])
        elif isinstance(e, IllegalMailboxEncoding):
            self.sendNegativeResponse(tag, b"Illegal mailbox name")
        elif isinstance(e, MailboxError):
            self._fail(failure, tag)
        else:
            log.failure("IMAP command failed", failure)
            self.sendBadResponse(tag, b"[SERVERBUG] Internal error")

    def lookupCommand(self, cmd: bytes) -> Any:
        # Twisted decodes the command as ASCII: other bytes raised (and were logged as a server error)
        if not cmd.isalpha() or not cmd.isascii():
            return None
        return super().lookupCommand(cmd)

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | None) -> None:
        super()._respond(state, tag, message)
        if tag and tag != b"*" and state in (b"OK", b"NO", b"BAD"):
            self._busy = False
            if state == b"BAD":
                self._countBad()
            else:
                self._badRun = 0
            self._updateReading()

    def _countBad(self) -> None:
        self.factory.counts["bad_commands"] += 1
        self._badRun += 1
        if self._badRun >= self.factory.maxBadCommands:
            self.factory.counts["closed_bad_commands"] += 1
            self._close(b"Too many invalid commands")

    def _unsent(self) -> int:
        t = self.transport
        try:
            return len(t.dataBuffer) - t.offset + t._tempDataLen
        except (AttributeError, TypeError):
            return 0

    def _updateReading(self) -> None:
        if self._closing or self.transport is None:
            return
        busy = self._busy and self.parseState == "command"
        full = self._unsent() > HIGH_WATER
        if busy or full:
            if not self.paused:
                self.pauseProducing()
            if full:
                self._waitDrain()
        elif self.paused and self._resumeCall is None:
            self._resumeCall = self.factory.clock.callLater(0, self._resume)

    def _resume(self) -> None:
        self._resumeCall = None
        if self._closing or (self._busy and self.parseState == "command") or self._unsent() > LOW_WATER:
            if self._unsent() > LOW_WATER:
                self._waitDrain()
            return
        if self.paused:
            self.resumeProducing()

    def _waitDrain(self) -> defer.Deferred:
        """A Deferred fired once the unsent output is below LOW_WATER (polled); a client that
        takes nothing for C{idleTimeout} is aborted."""
        d: defer.Deferred = defer.Deferred()
        self._drainWaiters.append(d)
        if self._drainCall is None:
            self._stallSince = self.factory.clock.seconds()
            self._lastUnsent = self._unsent()
            self._drainCall = self.factory.clock.callLater(0.01, self._pollDrain)
        return d

    def _pollDrain(self) -> None:
        self._drainCall = None
        if self._closing:
            return
        unsent = self._unsent()
        now = self.factory.clock.seconds()
        if unsent < self._lastUnsent:
            self._stallSince, self._lastUnsent = now, unsent
        if unsent > LOW_WATER:
            if now - self._stallSince > self.factory.idleTimeout:
                self.factory.counts["stalled_aborts"] += 1
                self._closing = True
                self._abort()
                return
            self._drainCall = self.factory.clock.callLater(0.01, self._pollDrain)
            return
        waiters, self._drainWaiters = self._drainWaiters, []
        for d in waiters:
            d.callback(None)
        self._updateReading()

    def _schedule(self, iterator: Any) -> defer.Deferred:
        """Twisted's FETCH scheduler, replaced: steps run while the output is below HIGH_WATER;
        completion always fires in a later reactor turn (no recursion across messages)."""
        done: defer.Deferred = defer.Deferred()

        def step(_: Any = None) -> None:
            if self._closing:
                return
            try:
                for _ in range(256):
                    if self._unsent() > HIGH_WATER:
                        self._waitDrain().addCallback(step)
                        return
                    r = next(iterator)
                    if isinstance(r, defer.Deferred):
                        r.addCallbacks(step, done.errback)
                        return
            except StopIteration:
                # Twisted chains the next message on this Deferred: fired now, the next one runs on this
                # stack.  A few back to back, then a fresh stack (the next reactor turn).
                if self._depth < 16:
                    self._depth += 1
                    done.callback(None)
                else:
                    self._depth = 0
                    self.factory.clock.callLater(0, done.callback, None)
                return
            except Exception:
                done.errback()
                return
            self.factory.clock.callLater(0, step)

        step()
        return done

    def _writeLiteral(self, data: bytes, write: Any, flush: Any = None) -> defer.Deferred | None:
        """C{data} as a literal: written at once when small, else streamed under back-pressure (a Deferred)."""
        if flush is None or len(data) <= CHUNK:
            write(b"{%d}\r\n" % len(data))
            write(data)
            return None
        write(b"{%d}\r\n" % len(data))
        flush()
        return self._stream(BytesIO(data), len(data))

    # -- literals --------------------------------------------------------------------------

    def _stringLiteral(self, size: int) -> defer.Deferred:
        nonSync, self._nonSync = self._nonSync, False
        if size > self._literalStringLimit:
            if nonSync:
                self._close(b"Literal too long")
                return defer.Deferred()
            raise IllegalClientResponse("Literal too long! I accept at most %d octets" % self._literalStringLimit)
        d: defer.Deferred = defer.Deferred()
        self.parseState = "pending"
        self._pendingLiteral = imap4.LiteralString(size, d)
        if not nonSync:
            self.sendContinuationRequest(b"Ready for literal data")
        self.setRawMode()
        return d

    def _fileLiteral(self, size: int) -> defer.Deferred:
        nonSync, self._nonSync = self._nonSync, False
        if size > self.factory.maxLiteral:
            self.factory.counts["literal_too_big"] += 1
            if nonSync:
                self._close(b"[TOOBIG] Message too big")
            else:
                self.sendNegativeResponse(self._tag, b"[TOOBIG] Message too big (limit %d bytes)"
                                          % self.factory.maxLiteral)
            return defer.Deferred()  # never fires: the command ends here
        d: defer.Deferred = defer.Deferred()
        self.parseState = "pending"
        self._pendingLiteral = imap4.LiteralFile(size, d)
        if not nonSync:
            self.sendContinuationRequest(b"Ready for literal data")
        self.setRawMode()
        return d

    # -- not authenticated -------------------------------------------------------------------

    def do_STARTTLS(self, tag: bytes) -> None:
        if self._secure():
            self.sendBadResponse(tag, b"TLS already active")
        elif self.ctx is None or not self.canStartTLS:
            self.sendNegativeResponse(tag, b"TLS not available")
        else:
            self._buffer = b""  # nothing pipelined behind STARTTLS is taken (injection)
            self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
            self.transport.startTLS(self.ctx)
            self.startedTLS = True

    unauth_STARTTLS = (do_STARTTLS,)

    def do_LOGIN(self, tag: bytes, user: bytes, password: bytes) -> None:
        if not self._secure():
            self.factory.counts["login_without_tls"] += 1
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
            return
        self._checkPassword(tag, user, password)

    unauth_LOGIN = (do_LOGIN, _astring, _finalastring)

    def do_AUTHENTICATE(self, tag: bytes, line: bytes) -> None:
        mechanism, _, initial = line.strip().partition(b" ")
        if not self._secure():
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] AUTHENTICATE is disabled before STARTTLS")
            return
        if mechanism.upper() != b"PLAIN":
            self.sendNegativeResponse(tag, b"Unsupported authentication mechanism")
            return
        if initial:
            self._plainResponse(initial, tag)
            return
        self.parseState = "pending"
        self._pendingLiteral = defer.Deferred()
        self._pendingLiteral.addCallback(self._plainResponse, tag)
        self.sendContinuationRequest(b"")

    unauth_AUTHENTICATE = (do_AUTHENTICATE, _line)

    def sendContinuationRequest(self, msg: bytes = b"Ready for additional command text") -> None:
        self.sendLine(b"+ " + msg if msg else b"+ ")

    def _plainResponse(self, response: bytes, tag: bytes) -> None:
        response = response.strip()
        if response == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")
            return
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
            authz, user, password = decoded.split(b"\0")
        except (binascii.Error, ValueError):
            self.sendBadResponse(tag, b"Malformed AUTHENTICATE PLAIN response")
            return
        if authz and authz != user:
            self.sendNegativeResponse(tag, b"[AUTHORIZATIONFAILED] Cannot log in as another user")
            return
        self._checkPassword(tag, user, password)

    def _checkPassword(self, tag: bytes, rawUser: bytes, rawPassword: bytes) -> None:
        try:
            user, password = rawUser.decode("utf-8"), rawPassword.decode("utf-8")
            normaliseUser(user)
        except (UnicodeDecodeError, InvalidName):
            self._loginFailed(tag)
            return
        d = limitedCheck(self.factory.failureLimit, self._host(),
                         lambda: self.factory.authenticator.check(user, password))
        d.addCallback(self._checked, tag, user)

    def _checked(self, ok: Any, tag: bytes, user: str) -> None:
        if self._closing:
            return
        if isinstance(ok, Refused):
            self.factory.counts["login_refused_" + ok.reason] += 1
            if ok.reason == "busy":
                self.sendNegativeResponse(tag, b"[UNAVAILABLE] Busy checking passwords; try again later")
            else:
                self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins; try again in %d s"
                                          % int(ok.retryAfter))
            return
        if ok is not True:
            self._loginFailed(tag)
            return
        self.factory.counts["logins"] += 1
        self.user = normaliseUser(user)
        self.account = self.user
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self.sendPositiveResponse(tag, b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] Logged in")

    def _loginFailed(self, tag: bytes) -> None:
        self.factory.counts["login_failures"] += 1
        self._authFailures += 1
        self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        if self._authFailures >= self.factory.maxAuthFailures:
            self._close(b"Too many authentication failures")

    # -- authenticated: folders ----------------------------------------------------------------

    def _run(self, f: Any, *args: Any) -> defer.Deferred:
        return self.factory.run(f, *args)

    def _fail(self, failure: Any, tag: bytes, tryCreate: bool = False) -> None:
        if self._closing:
            return
        e = failure.value
        if isinstance(e, NoSuchFolder):
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox" if tryCreate
                                      else b"[NONEXISTENT] No such mailbox")
        elif isinstance(e, FolderExists):
            self.sendNegativeResponse(tag, b"[ALREADYEXISTS] Mailbox exists")
        elif isinstance(e, InvalidName):
            self.sendNegativeResponse(tag, b"[CANNOT] Invalid mailbox name")
        elif isinstance(e, (MailboxError, IllegalMailboxEncoding)):
            self.sendNegativeResponse(tag, str(e).encode("ascii", "replace")[:200])
        else:
            log.failure("IMAP command failed", failure)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

    def do_ENABLE(self, tag: bytes, line: bytes) -> None:
        self.sendUntaggedResponse(b"ENABLED")
        self.sendPositiveResponse(tag, b"ENABLE completed")

    auth_ENABLE = (do_ENABLE, _line)
    select_ENABLE = auth_ENABLE

    def do_NAMESPACE(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b'NAMESPACE (("" ".")) NIL NIL')
        self.sendPositiveResponse(tag, b"NAMESPACE completed")

    auth_NAMESPACE = (do_NAMESPACE,)
    select_NAMESPACE = auth_NAMESPACE

    def _folderCommand(self, tag: bytes, done: bytes, f: Any, *args: Any) -> None:
        d = self._run(f, self.user, *args)
        d.addCallbacks(lambda _: self.sendPositiveResponse(tag, done), self._fail, errbackArgs=(tag,))

    def do_CREATE(self, tag: bytes, name: bytes) -> None:
        folder = _mailboxName(name).rstrip(SEPARATOR)
        self._folderCommand(tag, b"CREATE completed", self.store.createFolder, folder)

    auth_CREATE = (do_CREATE, _finalastring)
    select_CREATE = auth_CREATE

    def do_DELETE(self, tag: bytes, name: bytes) -> None:
        folder = _mailboxName(name)
        if self.mbox is not None and folder.upper() == self.mbox.folder.name.upper():
            self.sendNegativeResponse(tag, b"[INUSE] Unselect the mailbox first")
            return
        self._folderCommand(tag, b"DELETE completed", self.store.deleteFolder, folder)

    auth_DELETE = (do_DELETE, _finalastring)
    select_DELETE = auth_DELETE

    def do_RENAME(self, tag: bytes, old: bytes, new: bytes) -> None:
        self._folderCommand(tag, b"RENAME completed", self.store.renameFolder, _mailboxName(old), _mailboxName(new))

    auth_RENAME = (do_RENAME, _astring, _finalastring)
    select_RENAME = auth_RENAME

    def do_SUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        self._folderCommand(tag, b"SUBSCRIBE completed", self.store.subscribe, _mailboxName(name))

    auth_SUBSCRIBE = (do_SUBSCRIBE, _finalastring)
    select_SUBSCRIBE = auth_SUBSCRIBE

    def do_UNSUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        self._folderCommand(tag, b"UNSUBSCRIBE completed", self.store.unsubscribe, _mailboxName(name))

    auth_UNSUBSCRIBE = (do_UNSUBSCRIBE, _finalastring)
    select_UNSUBSCRIBE = auth_UNSUBSCRIBE

    def _listWork(self, tag: bytes, ref: bytes, pattern: bytes, sub: int, cmdName: bytes) -> None:
        reference, wildcard = _mailboxName(ref), _mailboxName(pattern)
        if not wildcard and not sub:
            self.sendUntaggedResponse(b'LIST (\\Noselect) "." ""')
            self.sendPositiveResponse(tag, b"LIST completed")
            return
        pattern = imap4.wildcardToRegexp(reference + wildcard, SEPARATOR).pattern
        regex, inbox = re.compile(pattern), re.compile(pattern, re.I)

        def listed(result: tuple[list[str], list[str]]) -> None:
            names, subscribed = result
            existing = set(names)
            for name in (subscribed if sub else names):
                if not (inbox if name == "INBOX" else regex).fullmatch(name):
                    continue
                attrs = []
                if name not in existing:
                    attrs.append(b"\\NonExistent" if not sub else b"\\Noselect")
                else:
                    children = any(n.startswith(name + SEPARATOR) for n in names)
                    attrs.append(b"\\HasChildren" if children else b"\\HasNoChildren")
                    if name in SPECIAL_USE:
                        attrs.append(SPECIAL_USE[name].encode())
                self.sendUntaggedResponse(cmdName + b" (" + b" ".join(attrs) + b') "." ' + _wireName(name))
            self.sendPositiveResponse(tag, cmdName + b" completed")

        d = self._run(lambda user: (self.store.folders(user), self.store.subscriptions(user) if sub else []),
                      self.user)
        d.addCallbacks(listed, self._fail, errbackArgs=(tag,))

    auth_LIST = (_listWork, _astring, _astring, 0, b"LIST")
    select_LIST = auth_LIST
    auth_LSUB = (_listWork, _astring, _astring, 1, b"LSUB")
    select_LSUB = auth_LSUB

    def do_STATUS(self, tag: bytes, mailbox: bytes, names: list) -> None:
        name = _mailboxName(mailbox)
        wanted = [n.upper() if isinstance(n, bytes) else str(n).upper().encode() for n in names]
        known = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"SIZE"}
        if not wanted or any(w not in known for w in wanted):
            self.sendBadResponse(tag, b"Unknown STATUS item")
            return

        def status(user: str) -> dict[bytes, int]:
            folder = self.store.folder(user, name)
            messages = folder.messages()
            return {b"MESSAGES": len(messages), b"RECENT": 0, b"UIDNEXT": folder.uidnext,
                    b"UIDVALIDITY": folder.uidvalidity,
                    b"UNSEEN": sum(1 for m in messages if "\\Seen" not in m.flags),
                    b"SIZE": sum(m.size for m in messages)}

        def answer(values: dict[bytes, int]) -> None:
            items = b" ".join(b"%s %d" % (w, values[w]) for w in wanted)
            self.sendUntaggedResponse(b"STATUS " + _wireName(name) + b" (" + items + b")")
            self.sendPositiveResponse(tag, b"STATUS completed")

        self._run(status, self.user).addCallbacks(answer, self._fail, errbackArgs=(tag,))

    auth_STATUS = (do_STATUS, _astring, _plist)
    select_STATUS = auth_STATUS

    # -- selecting ---------------------------------------------------------------------------

    def _selectWork(self, tag: bytes, name: bytes, rw: int, cmdName: bytes) -> None:
        self._unselect()
        folderName = _mailboxName(name)

        def opened(result: tuple) -> None:
            folder, messages = result
            view = self.mbox = _View(folder, bool(rw), messages)
            self.state = "select"
            keywords = sorted({f for m in messages for f in m.flags if not f.startswith("\\")})
            flags = b" ".join(f.encode("ascii") for f in [*SYSTEM_FLAGS, *keywords])
            self.sendUntaggedResponse(b"FLAGS (" + flags + b")")
            permanent = flags + b" \\*" if rw else b""
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS (" + permanent + b")] Flags permitted")
            self.sendUntaggedResponse(b"%d EXISTS" % len(messages))
            self.sendUntaggedResponse(b"0 RECENT")
            for seq, m in enumerate(messages, 1):
                if "\\Seen" not in m.flags:
                    self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen" % seq)
                    break
            self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % folder.uidvalidity)
            self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % folder.uidnext)
            mode = b"[READ-WRITE]" if view.writable else b"[READ-ONLY]"
            self.sendPositiveResponse(tag, mode + b" " + cmdName + b" completed")

        def select(user: str) -> tuple:
            folder = self.store.folder(user, folderName)
            return folder, folder.messages()

        self._run(select, self.user).addCallbacks(opened, self._fail, errbackArgs=(tag,))

    auth_SELECT = (_selectWork, _astring, 1, b"SELECT")
    select_SELECT = auth_SELECT
    auth_EXAMINE = (_selectWork, _astring, 0, b"EXAMINE")
    select_EXAMINE = auth_EXAMINE

    def _unselect(self) -> None:
        self.mbox = None
        if self.state == "select":
            self.state = "auth"

    def do_UNSELECT(self, tag: bytes) -> None:
        self._unselect()
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    def do_CLOSE(self, tag: bytes) -> None:
        view = self.mbox
        deleted = [m.uid for m in view.messages if "\\Deleted" in m.flags] if view.writable else []
        self._unselect()
        if not deleted:
            self.sendPositiveResponse(tag, b"CLOSE completed")
            return
        self._run(view.folder.remove, deleted).addCallbacks(
            lambda _: self.sendPositiveResponse(tag, b"CLOSE completed"), self._fail, errbackArgs=(tag,))

    select_CLOSE = (do_CLOSE,)

    # -- changes seen by this session ----------------------------------------------------------

    def _refresh(self, force: bool = False) -> defer.Deferred:
        """Look at the selected folder again; untagged EXPUNGE / FETCH FLAGS / EXISTS for what changed."""
        view = self.mbox
        if view is None or (not force and not view.folder.changed()):
            return defer.succeed(None)
        return self._run(view.folder.messages).addCallbacks(self._report, self._unreadable, callbackArgs=(view,))

    def _unreadable(self, failure: Any) -> None:
        """The selected folder cannot be listed any more (deleted by another session): BYE, as Dovecot does."""
        failure.trap(MailboxError)
        self.factory.counts["selected_folder_gone"] += 1
        self._close(b"Selected mailbox was deleted or cannot be read")

    def _report(self, listing: list[Message], view: _View) -> None:
        if view is not self.mbox or self._closing:
            return
        current = {m.uid: m for m in listing}
        old = view.messages
        for seq in range(len(old), 0, -1):
            if old[seq - 1].uid not in current:
                del old[seq - 1]
                self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        for seq, m in enumerate(old, 1):
            new = current[m.uid]
            if new.flags != m.flags:
                self.sendUntaggedResponse(b"%d FETCH (FLAGS (%s))" % (seq, self._flagBytes(new.flags)))
            old[seq - 1] = new
        last = old[-1].uid if old else 0
        added = [m for m in listing if m.uid > last]
        if added:
            old.extend(added)
            self.sendUntaggedResponse(b"%d EXISTS" % len(old))

    def _flagBytes(self, flags: Any) -> bytes:
        return b" ".join(f.encode("ascii") for f in sorted(flags))

    def do_NOOP(self, tag: bytes) -> None:
        self._refresh().addCallbacks(lambda _: self.sendPositiveResponse(tag, b"NOOP completed"),
                                     self._fail, errbackArgs=(tag,))

    select_NOOP = (do_NOOP,)
    select_CHECK = (do_NOOP,)

    def do_IDLE(self, tag: bytes) -> None:
        self.sendContinuationRequest(b"idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"
        self._idleStarted = self.factory.clock.seconds()
        self._lastKeepalive = self._idleStarted
        self._polling = False
        self._idleEnd = None
        loop = task.LoopingCall(self._idlePoll)
        loop.clock = self.factory.clock
        self._idleLoop = loop
        loop.start(self.factory.pollInterval, now=False)

    def _idlePoll(self) -> None:
        now = self.factory.clock.seconds()
        if now - self._lastKeepalive >= self.factory.keepalive:
            self._lastKeepalive = now
            self.sendUntaggedResponse(b"OK Still here")
        if self._polling or self.mbox is None:
            return
        self._polling = True

        def done(_: Any) -> None:
            self._polling = False
            end, self._idleEnd = self._idleEnd, None
            if end is not None and not self._closing:
                end()

        self._refresh().addErrback(lambda f: log.failure("IDLE poll", f)).addBoth(done)

    def parse_idle(self, line: bytes) -> None:
        loop = self._idleLoop
        if loop is not None and loop.running:
            loop.stop()
        self._idleLoop = None
        self.parseState = self.lastState
        del self.lastState
        tag = self.parseTag
        del self.parseTag
        if line.strip().upper() == b"DONE":
            end = lambda: self.sendPositiveResponse(tag, b"IDLE terminated")  # noqa: E731
        else:
            end = lambda: self.sendBadResponse(tag, b"Expected DONE")  # noqa: E731
        if self._polling:
            # a poll is still listing the folder: its untagged answers come first, then the tagged
            # line, and only then is the next command read (an EXPUNGE inside its answer: RFC 3501 7.4.1)
            self._idleEnd = end
        else:
            end()

    auth_IDLE = (do_IDLE,)
    select_IDLE = auth_IDLE

    # -- messages ----------------------------------------------------------------------------

    def do_APPEND(self, tag: bytes, mailbox: bytes, flags: list | None, date: bytes | None, message: Any) -> None:
        name = _mailboxName(mailbox)
        when = _parseAppendDate(date)
        flagList = [f.decode("ascii", "replace") if isinstance(f, bytes) else str(f) for f in flags or []]

        def append(user: str) -> tuple[str, int, int]:
            folder = self.store.folder(user, name)
            data = message.read()
            message.close()
            uid = folder.append(data, flagList, when)
            return folder.name, folder.uidvalidity, uid

        def appended(result: tuple) -> defer.Deferred:
            folderName, validity, uid = result
            d = self._refresh(force=True) if self.mbox and self.mbox.folder.name == folderName else defer.succeed(0)
            return d.addCallback(
                lambda _: self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed" % (validity, uid)))

        self._run(append, self.user).addCallbacks(appended, self._fail, errbackArgs=(tag, True)).addErrback(
            self._fail, tag)

    auth_APPEND = (do_APPEND, _astring, _optPlist,
                   _optDatetime, _literal)
    select_APPEND = auth_APPEND

    def do_FETCH(self, tag: bytes, messages: MessageSet, query: list, uid: int = 0) -> None:
        view = self.mbox
        marks = [p for p in query if p.type in ("rfc822", "rfc822text")
                 or (p.type == "body" and not p.peek and (p.header or p.text or p.mime or p.empty))]
        targets = view.resolve(messages, bool(uid))
        unseen = [(seq, m) for seq, m in targets if "\\Seen" not in m.flags] if marks and view.writable else []
        if unseen and not any(p.type == "flags" for p in query):
            query = [*query, imap4._FetchParser.Flags()]

        def markSeen() -> list[tuple[int, Message]]:
            out = []
            for seq, m in unseen:
                try:
                    flags = view.folder.setFlags(m.uid, m.flags | {"\\Seen"})
                except MailboxError:
                    continue
                out.append((seq, m.withFlags(frozenset(flags))))
            return out

        def marked(changed: list[tuple[int, Message]]) -> None:
            if view is self.mbox:
                for seq, m in changed:
                    if seq <= len(view.messages) and view.messages[seq - 1].uid == m.uid:
                        view.replace(seq, m)
            self._fetch(tag, view, messages, query, uid)

        d = self._run(markSeen) if unseen else defer.succeed([])
        d.addCallbacks(marked, self._fail, errbackArgs=(tag,))

    select_FETCH = (do_FETCH, _seqset, _fetchatt)

    def _fetch(self, tag: bytes, view: _View, messages: MessageSet, query: list, uid: int) -> None:
        """The FETCH answers, one message after another (Twisted's loop, replaced: it kept every
        message it had read until the command ended).  What the items need from the contents is made in
        store calls (L{_prepareAll}, a few messages each); each message is let go once written."""
        if not query:
            self.sendPositiveResponse(tag, b"FETCH complete")
            return
        targets = view.resolve(messages, bool(uid))
        contents = _needsContents(query)
        oldTimeout = self.setTimeout(None)  # (the stall bound covers a client that does not read)
        failedAt: list[int] = []

        @defer.inlineCallbacks
        def answer() -> Any:
            position = 0
            while position < len(targets):
                batch = [(seq, _Message(view, m)) for seq, m in targets[position:position + FETCH_BATCH]]
                if contents:
                    count = yield self._run(_prepareAll, [msg for _, msg in batch], query)
                    del batch[count:]
                position += len(batch)
                while batch:
                    seq, msg = batch.pop(0)
                    if self._closing:
                        return
                    try:
                        yield self.spewMessage(seq, msg, query, uid)
                    except Exception:
                        failedAt.append(seq)  # inside a message's answer: nothing more can be said
                        raise
                    msg.release()
                    del msg

        def answered(_: Any) -> None:
            if self._closing:
                return
            self.setTimeout(oldTimeout)
            self.sendPositiveResponse(tag, b"FETCH completed")

        def failed(failure: Any) -> None:
            log.failure("IMAP FETCH failed", failure)
            if self._closing:
                return
            if failedAt:
                self.transport.loseConnection()
                return
            self.setTimeout(oldTimeout)
            self.sendBadResponse(tag, b"FETCH failed: " + str(failure.value).encode("ascii", "replace")[:100])

        answer().addCallbacks(answered, failed)

    def spew_internaldate(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> None:
        _w(b"INTERNALDATE " + _imapDate(msg.meta.internaldate))

    def spew_flags(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> None:
        _w(b"FLAGS (" + self._flagBytes(msg.meta.flags) + b")")

    def spew_envelope(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> None:
        _w(b"ENVELOPE " + msg.envelope())

    def spew_bodystructure(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> None:
        _w(b"BODYSTRUCTURE " + msg.structure(True))

    def spew_rfc822header(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> Any:
        _w(b"RFC822.HEADER ")
        return self._writeLiteral(msg.header(), _w, _f)

    def spew_rfc822text(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> Any:
        _w(b"RFC822.TEXT ")
        return self._sendRange(msg, msg.bodyOffset(), None, None, None, _w, _f)

    def spew_rfc822(self, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> Any:
        _w(b"RFC822 ")
        return self._sendRange(msg, 0, None, None, None, _w, _f)

    def spew_body(self, part: Any, id: int, msg: _Message, _w: Any = None, _f: Any = None) -> Any:
        if not (part.header or part.text or part.mime or part.empty):
            _w(b"BODY " + msg.structure(False))
            return None
        section = b".".join(b"%d" % (p + 1) for p in part.part)
        suffix = b""
        if part.header:
            suffix = bytes(part.header)
        elif part.text:
            suffix = b"TEXT"
        elif part.mime:
            suffix = b"MIME"
        label = b"BODY[" + b".".join(x for x in (section, suffix) if x) + b"]"
        begin, length = part.partialBegin, part.partialLength
        if begin is not None:
            label += b"<%d>" % begin
        _w(label + b" ")
        if part.empty and not part.part:
            return self._sendRange(msg, 0, None, begin, length, _w, _f)
        data = msg.section(part)
        if isinstance(data, tuple):
            return self._sendRange(msg, data[0], data[1], begin, length, _w, _f)
        if begin is not None:
            data = data[begin:begin + length]
        return self._writeLiteral(data, _w, _f)

    def _sendRange(self, msg: _Message, start: int, end: int | None, begin: int | None, length: int | None,
                   _w: Any, _f: Any) -> Any:
        """The stored message's bytes start:end (None: to the file's end), or the slice begin:begin+length
        of them, as a literal streamed from its file."""
        try:
            f = msg.view.folder.open(msg.meta.uid)
        except MailboxError:
            self._writeLiteral(b"", _w)
            return None
        try:
            size = f.seek(0, 2)
            end = size if end is None else min(end, size)
            start = min(start, end)
            if begin is not None:
                start = min(start + begin, end)
                end = min(end, start + (length if length is not None else end))
            f.seek(start)
            if end - start <= CHUNK:
                self._writeLiteral(f.read(end - start), _w)
                f.close()
                return None
        except BaseException:
            f.close()
            raise
        _w(b"{%d}\r\n" % (end - start))
        _f()
        return self._stream(f, end - start)

    def _stream(self, f: Any, remaining: int) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()

        def more(_: Any = None) -> None:
            nonlocal remaining
            if self._closing:
                f.close()
                return
            while remaining > 0:
                if self._unsent() > HIGH_WATER:
                    self._waitDrain().addCallback(more)
                    return
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:  # the file shrank: keep the literal's promised length
                    chunk = b" " * min(CHUNK, remaining)
                remaining -= len(chunk)
                self.transport.write(chunk)
            f.close()
            self.factory.clock.callLater(0, done.callback, None)

        more()
        return done

    def do_STORE(self, tag: bytes, messages: MessageSet, mode: bytes, flags: list, uid: int = 0) -> None:
        view = self.mbox
        if not view.writable:
            self.sendNegativeResponse(tag, b"Mailbox is read-only")
            return
        mode = mode.upper()
        if mode not in (
                b"FLAGS", b"+FLAGS", b"-FLAGS", b"FLAGS.SILENT", b"+FLAGS.SILENT", b"-FLAGS.SILENT"):
            self.sendBadResponse(tag, b"Unknown STORE item")
            return
        silent = mode.endswith(b".SILENT")
        given = set()
        for f in flags:
            text = f.decode("ascii", "replace") if isinstance(f, bytes) else str(f)
            if text.lower() == "\\recent":
                continue
            if text.startswith("\\"):
                if text.lower() not in _CANONICAL:
                    self.sendBadResponse(tag, b"Unknown system flag")
                    return
                text = _CANONICAL[text.lower()]
            given.add(text)
        targets = view.resolve(messages, bool(uid))

        def store() -> list[tuple[int, Message]]:
            out = []
            for seq, m in targets:
                if mode.startswith(b"+"):
                    new = m.flags | given
                elif mode.startswith(b"-"):
                    new = m.flags - given
                else:
                    new = frozenset(given)
                if new != m.flags:
                    try:
                        new = view.folder.setFlags(m.uid, new)
                    except MailboxError as e:
                        if "keyword" in str(e):
                            raise
                        continue
                out.append((seq, m.withFlags(frozenset(new))))
            return out

        def stored(changed: list[tuple[int, Message]]) -> None:
            for seq, m in changed:
                if view is self.mbox and seq <= len(view.messages) and view.messages[seq - 1].uid == m.uid:
                    view.replace(seq, m)
                if not silent:
                    extra = b" UID %d" % m.uid if uid else b""
                    self.sendUntaggedResponse(b"%d FETCH (FLAGS (%s)%s)" % (seq, self._flagBytes(m.flags), extra))
            self.sendPositiveResponse(tag, b"STORE completed")

        self._run(store).addCallbacks(stored, self._fail, errbackArgs=(tag,))

    select_STORE = (do_STORE, _seqset, _atom,
                    _flaglist)

    def do_COPY(self, tag: bytes, messages: MessageSet, mailbox: bytes, uid: int = 0, move: bool = False) -> None:
        view = self.mbox
        name = _mailboxName(mailbox)
        if move and not view.writable:
            self.sendNegativeResponse(tag, b"Mailbox is read-only")
            return
        targets = view.resolve(messages, bool(uid))

        def copy(user: str) -> tuple[int, list[tuple[int, int]]]:
            dest = self.store.folder(user, name)
            uids = [m.uid for _, m in targets]
            pairs = view.folder.move(uids, dest) if move else view.folder.copy(uids, dest)
            return dest.uidvalidity, pairs

        def copied(result: tuple[int, list[tuple[int, int]]]) -> Any:
            validity, pairs = result
            code = b""
            if pairs:
                sources, dests = _uidSet([s for s, _ in pairs]), _uidSet([d for _, d in pairs])
                code = b"[COPYUID %d %s %s] " % (validity, sources, dests)
            if not move:
                self.sendPositiveResponse(tag, code + b"COPY completed")
                return None
            if code:
                self.sendPositiveResponse(None, code.strip())
            return self._refresh(force=True).addCallback(lambda _: self.sendPositiveResponse(tag, b"MOVE completed"))

        self._run(copy, self.user).addCallbacks(copied, self._fail, errbackArgs=(tag, True)).addErrback(
            self._fail, tag)

    select_COPY = (do_COPY, _seqset, _finalastring)

    def do_MOVE(self, tag: bytes, messages: MessageSet, mailbox: bytes, uid: int = 0) -> None:
        self.do_COPY(tag, messages, mailbox, uid, move=True)

    select_MOVE = (do_MOVE, _seqset, _finalastring)

    def do_EXPUNGE(self, tag: bytes, only: MessageSet | None = None) -> None:
        view = self.mbox
        if not view.writable:
            self.sendNegativeResponse(tag, b"Mailbox is read-only")
            return
        if only is not None:
            chosen = {m.uid for _, m in view.resolve(only, True)}
        deleted = [m.uid for m in view.messages if "\\Deleted" in m.flags and (only is None or m.uid in chosen)]
        d = self._run(view.folder.remove, deleted) if deleted else defer.succeed([])
        d.addCallback(lambda _: self._refresh(force=True))
        d.addCallbacks(lambda _: self.sendPositiveResponse(tag, b"EXPUNGE completed"), self._fail,
                       errbackArgs=(tag,))

    select_EXPUNGE = (do_EXPUNGE,)

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        command = command.upper()
        if command == b"EXPUNGE":
            messages, rest = self.arg_seqset(line)
            if rest:
                raise IllegalClientResponse("Too many arguments")
            self.do_EXPUNGE(tag, messages)
            return
        if command not in (b"COPY", b"FETCH", b"STORE", b"SEARCH", b"MOVE"):
            raise IllegalClientResponse("Unknown UID command")
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = (do_UID, _atom, _line)

    def do_SEARCH(self, tag: bytes, charset: bytes | None, query: list, uid: int = 0) -> None:
        if charset is not None and charset.upper() not in (b"US-ASCII", b"UTF-8"):
            self.sendNegativeResponse(tag, b"[BADCHARSET (US-ASCII UTF-8)] Unsupported charset")
            return
        view = self.mbox
        metas = list(view.messages)
        lastSeq, lastUid = len(metas), (metas[-1].uid if metas else 0)
        words = _searchWords(query)
        contents = bool(words & _CONTENT_KEYS)  # (an argument spelt like a key only costs a store call)
        whole = bool(words & {b"BODY", b"TEXT"})

        def match(batch: list[tuple[int, Message]]) -> list[bytes]:
            found = []
            for seq, meta in batch:
                msg = _Message(view, meta)
                if self._searchFilter(copy.deepcopy(query), seq, msg, lastSeq, lastUid):
                    found.append(b"%d" % (meta.uid if uid else seq))
                msg.release()
            return found

        @defer.inlineCallbacks
        def search() -> Any:
            found: list[bytes] = []
            position = 0
            while position < len(metas):
                if self._closing:
                    return None
                end, weight = position, 0
                while end < len(metas) and end - position < 200 and weight < PREPARE_BUDGET:
                    weight += metas[end].size if whole else 0
                    end += 1
                batch = list(enumerate(metas[position:end], position + 1))
                position = end
                if contents:  # headers or contents are read: a store call (a thread), a few messages each
                    found += yield self._run(match, batch)
                else:
                    found += match(batch)
                    if position < len(metas):
                        yield task.deferLater(self.factory.clock, 0, lambda: None)
            return found

        def answer(found: list[bytes] | None) -> None:
            if found is None or self._closing:
                return
            self.sendUntaggedResponse(b"SEARCH" + b"".join(b" " + f for f in found))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        def failed(failure: Any) -> None:
            if not self._closing:
                self.sendBadResponse(tag, b"Invalid search: " + str(failure.value).encode("ascii", "replace")[:100])

        search().addCallbacks(answer, failed)

    select_SEARCH = (do_SEARCH, _charset, _searchkeys)

    # Twisted's header searches compare its bytes arguments with str headers (TypeError), KEYWORD never
    # matches and TEXT skips the header: replaced.  Header values are RFC 2047-decoded, compared caseless.

    def _headerHas(self, msg: _Message, name: Any, needle: Any) -> bool:
        return _text(needle).casefold() in msg.headerText(_text(name)).casefold()

    def search_SUBJECT(self, query: list, id: int, msg: _Message) -> bool:
        return self._headerHas(msg, "subject", query.pop(0))

    def search_FROM(self, query: list, id: int, msg: _Message) -> bool:
        return self._headerHas(msg, "from", query.pop(0))

    def search_TO(self, query: list, id: int, msg: _Message) -> bool:
        return self._headerHas(msg, "to", query.pop(0))

    def search_CC(self, query: list, id: int, msg: _Message) -> bool:
        return self._headerHas(msg, "cc", query.pop(0))

    def search_BCC(self, query: list, id: int, msg: _Message) -> bool:
        return self._headerHas(msg, "bcc", query.pop(0))

    def search_HEADER(self, query: list, id: int, msg: _Message) -> bool:
        name, needle = query.pop(0), query.pop(0)
        if not needle:  # RFC 3501 6.4.4: "" matches every message that has the field (Twisted: every message)
            return msg.hasHeader(_text(name))
        return self._headerHas(msg, name, needle)

    # Twisted's date searches run a str pattern on the bytes argument (TypeError: answered BAD), and
    # compared times of day where RFC 3501 compares days.  SENT*: the day written in the Date header
    # (its time and zone disregarded); BEFORE/ON/SINCE: the internal date's day (as shown, UTC).

    def _sentDay(self, msg: _Message) -> tuple[int, int, int] | None:
        parsed = email.utils.parsedate(msg.getHeaders(False, "date").get("date", ""))
        return tuple(parsed[:3]) if parsed else None  # type: ignore[return-value]

    def _internalDay(self, msg: _Message) -> tuple[int, int, int]:
        return tuple(time.gmtime(msg.meta.internaldate)[:3])  # type: ignore[return-value]

    def search_SENTBEFORE(self, query: list, id: int, msg: _Message) -> bool:
        day, sent = _searchDay(query.pop(0)), self._sentDay(msg)
        return sent is not None and sent < day

    def search_SENTON(self, query: list, id: int, msg: _Message) -> bool:
        day, sent = _searchDay(query.pop(0)), self._sentDay(msg)
        return sent is not None and sent == day

    def search_SENTSINCE(self, query: list, id: int, msg: _Message) -> bool:
        day, sent = _searchDay(query.pop(0)), self._sentDay(msg)
        return sent is not None and sent >= day

    def search_BEFORE(self, query: list, id: int, msg: _Message) -> bool:
        return self._internalDay(msg) < _searchDay(query.pop(0))

    def search_ON(self, query: list, id: int, msg: _Message) -> bool:
        return self._internalDay(msg) == _searchDay(query.pop(0))

    def search_SINCE(self, query: list, id: int, msg: _Message) -> bool:
        return self._internalDay(msg) >= _searchDay(query.pop(0))

    def search_KEYWORD(self, query: list, id: int, msg: _Message) -> bool:
        return _text(query.pop(0)) in msg.meta.flags

    def search_UNKEYWORD(self, query: list, id: int, msg: _Message) -> bool:
        return _text(query.pop(0)) not in msg.meta.flags

    def search_BODY(self, query: list, id: int, msg: _Message) -> bool:
        return msg.contains(_bytes(query.pop(0)), body=True)

    def search_TEXT(self, query: list, id: int, msg: _Message) -> bool:
        return msg.contains(_bytes(query.pop(0)), body=False)


class IMAPFactory(Factory):
    """Builds L{IMAPServer}s (see the module docstring for the arguments)."""

    protocol = IMAPServer  # type: ignore[assignment]

    def __init__(self, store: Maildirs, authenticator: Any, tlsContext: Any = None, *,
                 failureLimit: Any = None, implicitTLS: bool = False, maxLiteral: int = 50 * 2**20,
                 idleTimeout: float = 1800.0, preauthTimeout: float = 60.0, pollInterval: float = 2.0,
                 keepalive: float = 120.0, maxBadCommands: int = 20, maxAuthFailures: int = 5,
                 run: Any = None, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.store = store
        self.authenticator = authenticator
        self.tlsContext = tlsContext
        self.failureLimit = failureLimit
        self.implicitTLS = implicitTLS
        self.maxLiteral = maxLiteral
        self.idleTimeout = idleTimeout
        self.preauthTimeout = preauthTimeout
        self.pollInterval = pollInterval
        self.keepalive = keepalive
        self.maxBadCommands = maxBadCommands
        self.maxAuthFailures = maxAuthFailures
        self.run = run or deferToThread
        self.clock = clock
        self.counts: Counter[str] = Counter()

    def buildProtocol(self, addr: Any) -> IMAPServer:
        p = IMAPServer(self)
        p.factory = self
        return p
