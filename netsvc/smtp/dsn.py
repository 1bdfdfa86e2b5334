"""
Delivery status notifications (RFC 3464): bounces, delay warnings, and success
reports for local delivery (NOTIFY=SUCCESS).

    report = buildReport(envelope, originalBytes, [ReportItem(recipient, "5.1.1",
                         "smtp; 550 5.1.1 no such user", remoteMTA="mx.example")],
                         action="failed", hostname="mail.lab")
    if report is not None:
        queue.enqueueBytes("", [envelope.sender], report, dsn=True)

A report is a C{multipart/report; report-type=delivery-status}: a plain text
explanation, the C{message/delivery-status} part (per-message fields, then per
recipient Original-Recipient, Final-Recipient, Action, Status, Remote-MTA,
Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until), and the original message
(C{message/rfc822}) or only its headers (C{text/rfc822-headers}) -- as the
sender's RET asked (RFC 3461), headers when the message is larger than
L{FULL_LIMIT} (and always for a success report, RFC 3461 4.3).  It is sent from
the null reverse-path C{<>} to the envelope sender, marked C{Auto-Submitted:
auto-replied} and C{dsn=True} in the queue.

No report (None) for: a message that is itself a report (never bounce a bounce),
a null sender, and recipients whose NOTIFY does not ask for this kind (NEVER;
a list without FAILURE, DELAY or SUCCESS).  Without NOTIFY, failures and delays are
reported, successes are not.

The report is written by hand rather than with the C{email} package so that
the original message goes back byte for byte (the package re-serialises it).
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

#: The most of an original message a report carries in full; beyond that, its headers only.
FULL_LIMIT = 256 * 1024

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class ReportItem:
    """
    One recipient in a report: the queue's recipient record, the RFC 3463
    C{status} (e.g. C{5.1.1}), the C{diagnostic} (C{smtp; 550 5.1.1 ...}, or
    None), and the C{remoteMTA} that answered (None: none did).
    """

    __slots__ = ("recipient", "status", "diagnostic", "remoteMTA", "action")

    def __init__(self, recipient: Any, status: str, diagnostic: str | None = None,
                 remoteMTA: str | None = None, action: str | None = None) -> None:
        self.recipient = recipient
        self.status = status
        self.diagnostic = diagnostic
        self.remoteMTA = remoteMTA
        #: This recipient's Action when it differs from the report's ("expanded" in a "delivered" report).
        self.action = action


def statusOf(code: int, text: str) -> str:
    """The enhanced status of a reply: the one it gives, else X.0.0 from its code class."""
    m = _ENHANCED.match(text.strip())
    if m and m.group(1) == str(code)[0]:
        return m.group(0)
    return f"{str(code)[0]}.0.0" if code >= 400 else "4.0.0"


#: The actions of a success report (RFC 3464 2.3.3), reported only when NOTIFY asked for SUCCESS.
SUCCESS_ACTIONS = ("delivered", "expanded")
ACTIONS = ("failed", "delayed", *SUCCESS_ACTIONS)


def wantsReport(envelope: Any, recipient: Any, action: str) -> bool:
    """Whether a report of C{action} (one of L{ACTIONS}) goes out for this recipient."""
    if envelope.dsn or not envelope.sender:
        return False
    notify = (getattr(recipient, "notify", None) or "").upper()
    if not notify:
        return action not in SUCCESS_ACTIONS
    asked = {n.strip() for n in notify.split(",")}
    if "NEVER" in asked:
        return False
    return {"failed": "FAILURE", "delayed": "DELAY"}.get(action, "SUCCESS") in asked


def _date(when: float) -> str:
    return email.utils.formatdate(when, localtime=False)


def headerBlock(original: bytes) -> bytes:
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[:end + 2]


def _clean(value: str) -> str:
    """One header line: no line breaks from an envelope value."""
    return " ".join(str(value).split())


def buildReport(envelope: Any, original: bytes, items: Sequence[ReportItem], action: str, hostname: str,
                now: float | None = None, retryUntil: float | None = None) -> bytes | None:
    """
    The report as bytes (CRLF), or None when nothing is to be reported (see the
    module docstring).  C{action}: "failed" (a bounce), "delayed" (a warning;
    C{retryUntil} says until when delivery goes on), or "delivered" / "expanded"
    (success, as NOTIFY=SUCCESS asks: with the message's headers only, RFC 3461 4.3).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    items = [i for i in items if wantsReport(envelope, i.recipient, action)]
    if not items:
        return None
    now = time.time() if now is None else now
    boundary = f"=_netsvc_{secrets.token_hex(12)}"
    daemon = f"MAILER-DAEMON@{hostname}"
    if action == "failed":
        subject = "Undelivered Mail Returned to Sender"
        intro = ("This is the mail system at host {host}.\r\n\r\n"
                 "Your message could not be delivered to one or more recipients;\r\n"
                 "it has been given up on. The details follow.\r\n")
    elif action in SUCCESS_ACTIONS:
        subject = "Successful Mail Delivery Report"
        intro = ("This is the mail system at host {host}.\r\n\r\n"
                 "Your message was successfully delivered to the destination(s)\r\n"
                 "listed below.\r\n")
    else:
        subject = "Delayed Mail (still being retried)"
        intro = ("This is the mail system at host {host}.\r\n\r\n"
                 "Your message could not be delivered yet to one or more recipients.\r\n"
                 "It is still queued and delivery goes on being tried"
                 + (f" until {_date(retryUntil)}" if retryUntil else "") + ".\r\n"
                 "You do not need to send it again.\r\n")
    lines = [intro.format(host=hostname)]
    for i in items:
        lines.append(f"\r\n<{_clean(i.recipient.address)}>: {_clean(i.diagnostic or i.status)}\r\n")
    human = "".join(lines)

    fields = [f"Reporting-MTA: dns; {hostname}"]
    if getattr(envelope, "envid", None):
        fields.append(f"Original-Envelope-Id: {_clean(envelope.envid)}")
    fields.append(f"Arrival-Date: {_date(envelope.created)}")
    status = "\r\n".join(fields) + "\r\n"
    for i in items:
        r = i.recipient
        block = []
        if getattr(r, "orcpt", None):
            block.append(f"Original-Recipient: {_clean(r.orcpt)}")
        block.append(f"Final-Recipient: rfc822; {_clean(r.address)}")
        block.append(f"Action: {i.action or action}")
        block.append(f"Status: {i.status}")
        if i.remoteMTA:
            block.append(f"Remote-MTA: dns; {_clean(i.remoteMTA)}")
        if i.diagnostic:
            block.append(f"Diagnostic-Code: {_clean(i.diagnostic)}")
        block.append(f"Last-Attempt-Date: {_date(now)}")
        if action == "delayed" and retryUntil:
            block.append(f"Will-Retry-Until: {_date(retryUntil)}")
        status += "\r\n" + "\r\n".join(block) + "\r\n"

    full = ((getattr(envelope, "ret", None) or "FULL").upper() == "FULL" and len(original) <= FULL_LIMIT
            and action not in SUCCESS_ACTIONS)
    if full:
        third = b"Content-Type: message/rfc822\r\n"
        body = original if original.endswith(b"\r\n") else original + b"\r\n"
    else:
        third = b"Content-Type: text/rfc822-headers\r\n"
        body = headerBlock(original)
    eightBit = not body.isascii()
    if eightBit:
        third += b"Content-Transfer-Encoding: 8bit\r\n"
    if action in SUCCESS_ACTIONS:
        third += b"Content-Description: Delivered message headers"
    else:
        third += b"Content-Description: " + (b"Undelivered message" if full else b"Undelivered message headers")

    domain = hostname if "." in hostname else f"{hostname}.invalid"
    head = (f"From: Mail Delivery System <{daemon}>\r\n"
            f"To: <{_clean(envelope.sender)}>\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {_date(now)}\r\n"
            f"Message-ID: {email.utils.make_msgid('dsn', domain=domain)}\r\n"
            f"Auto-Submitted: auto-replied\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
            + ("Content-Transfer-Encoding: 8bit\r\n" if eightBit else "")
            + "\r\nThis is a MIME-encapsulated message.\r\n\r\n")
    out = [head.encode("utf-8"),
           f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
           f"Content-Description: Notification\r\n\r\n{human}\r\n".encode(),
           f"--{boundary}\r\nContent-Type: message/delivery-status\r\n"
           f"Content-Description: Delivery report\r\n\r\n{status}\r\n".encode(),
           f"--{boundary}\r\n".encode(), third, b"\r\n\r\n", body,
           f"\r\n--{boundary}--\r\n".encode()]
    return b"".join(out)
