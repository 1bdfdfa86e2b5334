"""
Capture mode (Mailpit-like): accepted messages are kept under
C{<state_dir>/captured/} instead of being delivered.

The store is a L{netsvc.smtp.queue.Queue} (same layout, same durability: the
250 comes after fsync + rename), plus what the web listing needs: summaries
(sender, recipients, subject, date, size) and a parsed view of one message.
It keeps at most C{keep} messages; past that the oldest are removed.

With C{workers: N} every worker captures into the same folders (ids carry the
worker's index, so names never collide).  The owner (worker 0) alone prunes: it
learns of the other workers' messages through L{discover} (called by
L{netsvc.smtp.watch.QueueWatcher}); another worker does not track ids at all.
L{listing} then reads the folder (in a thread: any worker's web page shows
every worker's mail).

Whatever a client sent, the views do not fail: the email package raises on some
malformed headers (C{From: a@[1.2.3}, some RFC 2047 words), so every header and
the body are read one by one with the raw value as the fallback, undecodable
bytes become U+FFFD, and the text shown is cut at L{MAX_TEXT} characters
(C{truncated}; the raw message has everything).
"""

from __future__ import annotations

import email.policy
from collections import deque
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from netsvc.smtp.queue import ALONE, Queue, Writer

log = Logger()

#: Bytes read from a message for its summary (the header section).
SUMMARY_BYTES = 16384
#: Characters of a message's text in the parsed view.
MAX_TEXT = 1_000_000


class CaptureStore(Queue):
    """Captured messages, newest last; see the module docstring."""

    def __init__(self, directory: Path, *, keep: int = 10000, fsync: bool = True, reactor: Any = None,
                 writer: Writer = ALONE) -> None:
        super().__init__(directory, fsync=fsync, reactor=reactor, writer=writer)
        self.keep = keep
        #: Other processes write here too: the listing is read from the folder.
        self.shared = not writer.alone
        self._ids: deque[str] = deque()  # the owner's: every message, oldest first
        self._known: set[str] = set()

    def recover(self) -> None:
        super().recover()
        if self.writer.owner:
            self._ids = deque(self.ids())
            self._known = set(self._ids)
            self._prune()

    def _batchDone(self, result: Any, batch: list[Any]) -> None:
        if self.writer.owner:
            for job in batch:
                if job.message is not None and job.error is None and not isinstance(result, Failure):
                    self._add(job.envelope.id)
            self._prune()
        super()._batchDone(result, batch)

    def discover(self, id: str) -> None:
        """(The owner.)  C{id} was committed, maybe by another worker: count it (once) and prune."""
        if id in self._known or not (self.env / f"{id}.json").exists():
            return  # known, or already gone
        self._add(id)
        self._prune()

    def _add(self, id: str) -> None:
        if id not in self._known:
            self._known.add(id)
            self._ids.append(id)

    def _prune(self) -> None:
        while len(self._ids) > self.keep:
            id = self._ids.popleft()
            self._known.discard(id)
            try:
                self.remove(id)
            except OSError as e:  # never stop the writer (every session waits on it) for one old message
                log.error("capture: cannot remove {id}: {error}", id=id, error=str(e))

    def count(self) -> int:
        """Messages kept (the owner's count; see L{listing} for a shared store)."""
        return len(self._ids)

    def latest(self, limit: int = 200) -> list[str]:
        """The ids of the newest C{limit} messages, newest first (the owner's view; see L{listing})."""
        return list(reversed(list(self._ids)[-limit:]))

    def listing(self, limit: int = 200) -> tuple[list[str], int]:
        """
        (The newest C{limit} ids, newest first; how many there are.)  A shared store
        reads the folder -- every worker's mail; call it in a thread.  Otherwise the
        ids kept in memory: call it in the reactor.
        """
        if not self.shared:
            return self.latest(limit), self.count()
        ids = self.ids()
        return list(reversed(ids[-limit:])), len(ids)

    def summary(self, id: str) -> dict[str, Any]:
        """Envelope and main headers of one message (FileNotFoundError if it is gone)."""
        env = self.envelope(id)
        path = self.messagePath(id)
        with open(path, "rb") as f:
            head = f.read(SUMMARY_BYTES)
        end = head.find(b"\r\n\r\n")
        headers = BytesParser(policy=email.policy.default).parsebytes(
            head[:end + 4] if end >= 0 else head, headersonly=True)
        return {
            "id": id,
            "sender": env.sender,
            "recipients": [r.address for r in env.recipients],
            "client": env.client,
            "created": env.created,
            "size": path.stat().st_size,
            "subject": _header(headers, "subject"),
            "from": _header(headers, "from"),
            "to": _header(headers, "to"),
            "date": _header(headers, "date"),
        }

    def raw(self, id: str) -> bytes:
        return self.messagePath(id).read_bytes()

    def parsed(self, id: str) -> dict[str, Any]:
        """The summary, all headers, the first text part, and the attachments (name, type, size)."""
        out = self.summary(id)
        msg = BytesParser(policy=email.policy.default).parsebytes(self.raw(id))
        out["headers"] = [[k, _parsed(msg, k, v)] for k, v in msg.raw_items()]
        text = _text(msg).replace("\r\n", "\n")
        out["truncated"] = len(text) > MAX_TEXT
        out["text"] = text[:MAX_TEXT]
        attachments = []
        try:
            for part in msg.iter_attachments():
                try:
                    name = _safe(part.get_filename() or "")
                except Exception:  # noqa: BLE001 - a malformed Content-Disposition
                    name = ""
                attachments.append({"filename": name, "type": part.get_content_type(),
                                    "size": len(part.get_payload(decode=True) or b"")})
        except Exception:  # noqa: BLE001 - a malformed structure: what was listed so far
            pass
        out["attachments"] = attachments
        return out


def _safe(text: str) -> str:
    """Text as it can be shown and encoded: undecodable bytes (lone surrogates) become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _parsed(msg: Any, name: str, raw: str) -> str:
    """One header's decoded value (RFC 2047 words), or its raw unfolded value where the parser fails."""
    try:
        return _safe(str(msg.policy.header_fetch_parse(name, raw)))
    except Exception:  # noqa: BLE001 - the email package raises on some malformed headers
        return _safe(raw.replace("\r\n", "").replace("\n", ""))


def _header(msg: Any, name: str) -> str:
    """The first C{name} header, decoded, or ""."""
    for key, raw in msg.raw_items():
        if key.lower() == name:
            return _parsed(msg, key, raw)
    return ""


def _text(msg: Any) -> str:
    """The first text part (plain preferred), decoded as well as it can be."""
    try:
        body = msg.get_body(preferencelist=("plain", "html"))
    except Exception:  # noqa: BLE001
        body = None
    if body is None:
        return ""
    try:
        return _safe(body.get_content())
    except Exception:  # noqa: BLE001 - unknown charset, bad transfer encoding
        payload = body.get_payload(decode=True) or b""
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else _safe(str(payload))
