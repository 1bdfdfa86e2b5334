"""
What the SMTP client session (L{netsvc.smtp.sender.SMTPSender}) deals in,
apart from the session itself: the messages it is handed (L{Outgoing}, each
with its L{Recipient}s and their DSN parameters), the server's answers
(L{Reply}), and how a session ends when it cannot go on (L{SessionError}).

Plain values, no I/O: the delivery engine (L{netsvc.smtp.delivery}), the
session opener (L{netsvc.smtp.outbound}) and C{netsvc mail send}
(L{netsvc.smtp.client}) build and read them; the session's two modules share them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Reply:
    """An SMTP reply: C{code} (int) and C{text} (its lines joined by spaces)."""

    __slots__ = ("code", "text")

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.text!r})"


class SessionError(Exception):
    """
    The session could not go on.  C{reply}: the server's reply that ended it
    (None: a local reason -- connection lost, timeout, TLS).  C{current}: the
    message in flight with no final answer.
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply
        self.current: Any = None
        #: The session ended during the STARTTLS handshake (an opportunistic client may go on without TLS).
        self.tlsFailed = False

    @property
    def permanent(self) -> bool:
        return self.reply is not None and self.reply.permanent


class Recipient:
    """One RCPT: the address and its DSN parameters (RFC 3461), as given by the client."""

    __slots__ = ("address", "notify", "orcpt")

    def __init__(self, address: str, notify: str | None = None, orcpt: str | None = None) -> None:
        self.address = address
        self.notify = notify
        self.orcpt = orcpt

    def __repr__(self) -> str:
        return f"Recipient({self.address!r})"


class Outgoing:
    """
    One message to send.  C{openData()} returns a binary file of the message with
    CRLF line ends (not dot-stuffed); C{size} its length in bytes.
    """

    def __init__(self, sender: str, recipients: list[Recipient], openData: Callable[[], Any], size: int,
                 ret: str | None = None, envid: str | None = None, eightBit: bool = True,
                 key: Any = None) -> None:
        self.sender = sender
        self.recipients = recipients
        self.openData = openData
        self.size = size
        self.ret = ret
        self.envid = envid
        self.eightBit = eightBit
        self.key = key  # the caller's (e.g. the queue id)

    def needsUTF8(self) -> bool:
        return not all(a.isascii() for a in [self.sender] + [r.address for r in self.recipients])
