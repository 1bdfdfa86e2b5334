"""
The DATA phase of one transaction, read in bulk rather than line by line.

L{DataReader.feed} takes whatever bytes the session has buffered and consumes
complete lines: it finds the end marker (C{CRLF . CRLF}; only CRLF ends a line,
so C{LF . LF} never ends a message -- no SMTP smuggling), removes dot-stuffing,
checks the size (running total, nothing buffered past the header section), the
line length, the hop count (Received headers: a loop), NUL bytes, bare CR (relayed, C{CR . CR} ends the data for some
receivers) and bare LF, and writes the message to its sink (a queue
L{netsvc.smtp.queue.IncomingMessage}).  The header section is held until it is
complete so that the trace headers can be written first: C{prefix(names)}
returns them (Received, and Message-ID/Date when C{names} -- the lower-cased
header names present -- lacks them).

Why not C{twisted.mail.smtp.SMTP.dataLineReceived}: it costs several method
calls per line and has no size, line-length, NUL or bare-LF checks; here a 2 KB
message is handled in a handful of C-level bytes operations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: Hold at most this much of a header section before writing it out anyway.
MAX_HEADER_HOLD = 256 * 1024
#: More Received headers than this is a mail loop (RFC 5321 6.3: "at least 100"; Postfix: 50).
MAX_HOPS = 100

_HEADER_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:")


class DataReader:
    """
    Reads one message.  After each L{feed}: C{done} (the end marker was seen) and
    C{problem} (None, or "size", "line", "nul", "barecr", "hops", "io" (the sink could not write:
    C{ioError}), "barelf" -- the message must not be
    accepted; "barelf" means the session must end at once).
    """

    def __init__(self, sink: Any, maxSize: int, maxLine: int, prefix: Callable[[set[bytes]], bytes]) -> None:
        self.sink = sink
        self.maxSize = maxSize
        self.maxLine = maxLine
        self.prefix = prefix
        self.size = 0
        self.done = False
        self.problem: str | None = None
        self.ioError: OSError | None = None
        self._midLine = False  # dropping the rest of an over-long line
        self._head: bytearray | None = bytearray()  # the header section while held; None once written
        self._scanned = 0  # lines of _head before this offset are known to be header lines

    def feed(self, buf: bytes, start: int = 0) -> int:
        """
        Consume complete lines of C{buf} from offset C{start} (and all of an
        over-long line); return the offset reached (what is before it is consumed).
        """
        pos = start
        if self._midLine:
            nl = buf.find(b"\n")
            if nl < 0:
                return len(buf)
            pos = nl + 1
            self._midLine = False
        if buf.startswith(b".\r\n", pos):
            end = pos
        else:
            end = buf.find(b"\r\n.\r\n", pos)
            if end >= 0:
                end += 2
        if end >= 0:
            self._take(buf[pos:end])
            self._finish()
            return end + 3
        last = buf.rfind(b"\n", pos)
        if last >= 0:
            self._take(buf[pos:last + 1])
            pos = last + 1
        if len(buf) - pos > self.maxLine:
            self._fail("line")
            self._midLine = True
            return len(buf)
        return pos

    def _fail(self, problem: str) -> None:
        if self.problem is None or problem == "barelf":
            self.problem = problem
        self._head = None
        self.sink.abort()

    def _take(self, body: bytes) -> None:
        if not body:
            return
        if body.count(b"\n") != body.count(b"\r\n"):
            self._fail("barelf")
            return
        if self.problem is not None:
            self.size += len(body)
            return
        if b"\0" in body:
            self._fail("nul")
            return
        if body.count(b"\r") != body.count(b"\r\n"):
            self._fail("barecr")
            return
        if len(body) > self.maxLine and max(map(len, body.split(b"\n"))) >= self.maxLine:
            self._fail("line")
            return
        if body[:1] == b".":
            body = body[1:]
        body = body.replace(b"\r\n.", b"\r\n")
        self.size += len(body)
        if self.size > self.maxSize:
            self._fail("size")
            return
        if self._head is None:
            self._write(body)
            return
        head = self._head
        head += body
        split, self._scanned = _headerEnd(head, self._scanned)
        if split is None and len(head) < MAX_HEADER_HOLD:
            return
        self._writeHead(bytes(head), split)

    def _writeHead(self, head: bytes, split: tuple[int, bool] | None) -> None:
        self._head = None
        end, needsBlank = split if split is not None else (len(head), False)
        found = [m.group(1).lower() for m in map(_HEADER_LINE.match, head[:end].split(b"\r\n")) if m]
        if found.count(b"received") > MAX_HOPS:
            self._fail("hops")
            return
        names = set(found)
        self._write(self.prefix(names) + head[:end] + (b"\r\n" if needsBlank else b"") + head[end:])

    def _write(self, data: bytes) -> None:
        try:
            self.sink.write(data)
        except OSError as e:  # disk full, I/O error: this message cannot be kept
            self.ioError = e
            self._fail("io")

    def _finish(self) -> None:
        self.done = True
        if self.problem is None and self._head is not None:
            self._writeHead(bytes(self._head), _headerEnd(self._head, self._scanned)[0])


def _headerEnd(head: bytes | bytearray, pos: int = 0) -> tuple[tuple[int, bool] | None, int]:
    """
    Where the header section of C{head} ends: (offset of the blank line or of the
    first line that is not a header, whether a blank line must be inserted there),
    or None if every complete line so far is a header; and the offset where the
    scan stopped (pass it back as C{pos} once more has arrived: each line is looked
    at once however the section is split into packets).
    """
    while True:
        nl = head.find(b"\r\n", pos)
        if nl < 0:
            return None, pos
        if nl == pos:
            return (pos, False), pos
        first = head[pos:pos + 1]
        if not ((pos > 0 and first in (b" ", b"\t")) or _HEADER_LINE.match(head, pos)):
            return (pos, True), pos
        pos = nl + 2
