"""
Capture mode (Mailpit-like): accepted messages are kept under
C{<state_dir>/captured/} instead of being delivered.

The store is a L{netsvc.smtp.queue.Queue} (same layout, same durability: the
250 comes after fsync + rename), plus what the web listing needs: summaries
(sender, recipients, subject, date, size) and a parsed view of one message.
It keeps at most C{keep} messages; past that the oldest are removed.
"""

from __future__ import annotations

import email.policy
from collections import deque
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from twisted.python.failure import Failure

from netsvc.smtp.queue import Queue

#: Bytes read from a message for its summary (the header section).
SUMMARY_BYTES = 16384


class CaptureStore(Queue):
    """Captured messages, newest last; see the module docstring."""

    def __init__(self, directory: Path, *, keep: int = 10000, fsync: bool = True, reactor: Any = None) -> None:
        super().__init__(directory, fsync=fsync, reactor=reactor)
        self.keep = keep
        self._ids: deque[str] = deque()

    def recover(self) -> None:
        super().recover()
        self._ids = deque(self.ids())
        self._prune()

    def _batchDone(self, result: Any, batch: list[Any]) -> None:
        for job in batch:
            if job.message is not None and job.error is None and not isinstance(result, Failure):
                self._ids.append(job.envelope.id)
        self._prune()
        super()._batchDone(result, batch)

    def _prune(self) -> None:
        while len(self._ids) > self.keep:
            self.remove(self._ids.popleft())

    def count(self) -> int:
        return len(self._ids)

    def latest(self, limit: int = 200) -> list[str]:
        """The ids of the newest C{limit} messages, newest first."""
        return list(reversed(list(self._ids)[-limit:]))

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
            "subject": str(headers.get("subject", "")),
            "from": str(headers.get("from", "")),
            "to": str(headers.get("to", "")),
            "date": str(headers.get("date", "")),
        }

    def raw(self, id: str) -> bytes:
        return self.messagePath(id).read_bytes()

    def parsed(self, id: str) -> dict[str, Any]:
        """The summary, all headers, the first text part, and the attachments (name, type, size)."""
        out = self.summary(id)
        msg = BytesParser(policy=email.policy.default).parsebytes(self.raw(id))
        out["headers"] = [[k, str(v)] for k, v in msg.items()]
        body = msg.get_body(preferencelist=("plain", "html"))
        try:
            out["text"] = body.get_content() if body is not None else ""
        except (LookupError, ValueError):
            out["text"] = body.get_payload() if body is not None else ""
        out["text"] = out["text"].replace("\r\n", "\n")
        out["attachments"] = [
            {"filename": part.get_filename() or "", "type": part.get_content_type(),
             "size": len(part.get_payload(decode=True) or b"")}
            for part in msg.iter_attachments()]
        return out
