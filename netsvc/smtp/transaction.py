"""
The mail transaction of the server session (RFC 5321 3.3): MAIL (SIZE, BODY,
SMTPUTF8, DSN RET/ENVID), RCPT (the relay check, the recipient limit, DSN
NOTIFY/ORCPT), DATA (read by L{netsvc.smtp.data.DataReader}) and the durable
commit: the 250 is sent only once the queue's commit has fired; the trace
headers (Received, and Message-ID/Date when missing) are written first.  A
recipient given twice is kept once; a message with more than 100 Received
headers is a loop (554 5.4.6).

Local delivery (C{config.local}, L{netsvc.smtp.local}): a recipient at a local
domain is resolved at RCPT (an unknown user: 550 5.1.1; anyone may send to a
local user, as to Postfix's mydestination, without the relay check); at the
end of data the local mailboxes are written first, then the other recipients
(and addresses aliases forward to) are committed to the queue, then the one
250.  Any failure: 451 4.3.0 and no copy kept anywhere.

A mixin of L{netsvc.smtp.protocol.SMTPSession}: it uses the session's config,
reply queue (C{_send}, C{_error}, C{_close}, C{_needsSync}), input hold
(C{_hold}, C{_release}) and state (C{helo}, C{esmtp}, C{user}, C{secure}, C{host}).
"""

from __future__ import annotations

import email.utils
import errno
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from netsvc.mailbox.maildir import MailboxError
from netsvc.smtp.data import DataReader
from netsvc.smtp.dsn import ReportItem, buildReport
from netsvc.smtp.local import LookupPending, Mailbox, UnknownRecipient, forwardedNotify
from netsvc.smtp.queue import Envelope, Recipient
from netsvc.smtp.syntax import SyntaxProblem, checkMailbox, parseDSNMail, parseDSNRcpt, parsePathArgument

log = Logger()


class LocalDeliveryError(Exception):
    """A local mailbox could not be written (C{failure}: why)."""

    def __init__(self, failure: Any) -> None:
        super().__init__(failure.getErrorMessage())
        self.failure = failure


class TransactionCommands:
    """MAIL, RCPT, DATA and the commit."""

    config: Any
    host: str
    helo: str | None
    esmtp: bool
    secure: bool
    user: str | None
    messages: int
    _buf: bytes
    _pos: int
    junk: int
    _closed: bool
    _reader: DataReader | None
    _incoming: Any
    _send: Callable[..., None]
    _error: Callable[..., None]
    _close: Callable[..., None]
    _needsSync: Callable[[str], bool]
    _hold: Callable[[], None]
    _release: Callable[[], None]

    def _resetTransaction(self) -> None:
        self.mailFrom: str | None = None
        self.recipients: list[Recipient] = []
        self._rcptKeys: set[str] = set()
        #: Local delivery: the mailboxes to write (by user), and the recipients to queue.
        self._mailboxes: dict[str, Mailbox] = {}
        self._queued: list[Recipient] = []
        self._queuedKeys: set[str] = set()
        #: Local recipients whose NOTIFY asked for SUCCESS: reported once their copies are written.
        self._successes: list[ReportItem] = []
        self.ret: str | None = None
        self.envid: str | None = None
        self.smtputf8 = False
        self.declaredSize = 0

    def do_MAIL(self, rest: bytes) -> None:
        c = self.config
        if self.helo is None:
            self._error(503, "5.5.1", "Error: send HELO/EHLO first", "bad_sequence")
            return
        if self.mailFrom is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command", "bad_sequence")
            return
        if c.submission and self.user is None:
            if not self.secure and c.tlsOptions is not None:
                self._error(530, "5.7.0", "Must issue a STARTTLS command first", "auth_required")
            else:
                self._error(530, "5.7.0", "Authentication required", "auth_required")
            return
        if self.messages >= c.maxMessages:
            self.config.metrics.reject("messages_per_session")
            self._close(421, "4.7.0", f"{c.hostname} Error: too many messages in this session")
            return
        try:
            path, params, ascii = parsePathArgument(rest, "FROM")
            sender = checkMailbox(path, sender=True)
            self.smtputf8 = "SMTPUTF8" in params
            if not ascii and not self.smtputf8:
                raise SyntaxProblem(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            size = params.get("SIZE")
            if "SIZE" in params:
                if not size or not size.isdigit():
                    raise SyntaxProblem(501, "5.5.4", "Bad SIZE parameter")
                if int(size) > c.maxSize:
                    raise SyntaxProblem(552, "5.3.4", "Message size exceeds fixed maximum message size")
            body = (params.get("BODY") or "7BIT").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise SyntaxProblem(555, "5.5.4", "Unsupported BODY type")
            ret, envid = parseDSNMail(params)
            unknown = set(params) - {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"}
            if unknown:
                raise SyntaxProblem(555, "5.5.4", f"Unsupported parameter {sorted(unknown)[0]}")
        except SyntaxProblem as e:
            code, status, text = e.reply
            self._error(code, status, text, "size" if code == 552 else "bad_sender")
            return
        if c.messageRate is not None and not c.messageRate.allow(self.host):
            self._error(450, "4.7.1", "Error: too many messages from your address; try again later", "rate")
            return
        self.mailFrom = sender
        self.ret, self.envid = ret, envid
        self.declaredSize = int(size) if size else 0
        self._send(250, "2.1.0", "Ok")

    def do_RCPT(self, rest: bytes) -> None:
        c = self.config
        if self.mailFrom is None:
            self._error(503, "5.5.1", "Error: need MAIL command", "bad_sequence")
            return
        try:
            path, params, ascii = parsePathArgument(rest, "TO")
            address = checkMailbox(path, sender=False)
            if not ascii and not self.smtputf8:
                raise SyntaxProblem(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            notify, orcpt = parseDSNRcpt(params)
            unknown = set(params) - {"NOTIFY", "ORCPT"}
            if unknown:
                raise SyntaxProblem(555, "5.5.4", f"Unsupported parameter {sorted(unknown)[0]}")
        except SyntaxProblem as e:
            self._error(*e.reply, "bad_recipient")
            return
        resolution = None
        if c.local is not None:
            try:
                resolution = c.local.router.resolve(address)
            except UnknownRecipient:
                self._error(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown in local "
                                          f"recipient table", "unknown_user")
                return
            except LookupPending:  # the directory's names are not loaded yet: try again later (as Postfix)
                self._error(451, "4.3.0", f"<{address}>: Temporary lookup failure", "user_lookup")
                return
        if resolution is None and self.user is None and not c.isTrusted(self.host):
            self._error(554, "5.7.1", f"<{address}>: Relay access denied", "relay_denied")
            return
        if len(self.recipients) >= c.maxRecipients:
            self.config.metrics.reject("too_many_recipients")
            self._send(452, "4.5.3", "Error: too many recipients")
            return
        # the local part is case-sensitive, except for local users
        key = _key(address) if resolution is None else address.lower()
        if key not in self._rcptKeys:  # a duplicate is acknowledged, not delivered twice (as Postfix)
            self._rcptKeys.add(key)
            recipient = Recipient(address=address, notify=notify, orcpt=orcpt)
            self.recipients.append(recipient)
            if resolution is None:
                self._queue(key, recipient)
                if c.local is not None and c.local.captured is not None:
                    # capture mode: one copy of the captured message in the chosen user's INBOX too
                    self._mailboxes.setdefault(c.local.captured, Mailbox(c.local.captured, address))
            else:
                for mailbox in resolution.mailboxes:  # one copy per mailbox
                    self._mailboxes.setdefault(mailbox.user, mailbox)
                expanded = len(resolution.mailboxes) + len(resolution.remote) > 1  # an alias of several
                # Only for a client we know (mynetworks, AUTH): a report to the unverified sender of an
                # outsider would be backscatter, one report to any address of its choosing per message.
                known = self.user is not None or c.isTrusted(self.host)
                if known and (resolution.mailboxes or expanded) and "SUCCESS" in (notify or "").upper():
                    self._successes.append(ReportItem(
                        recipient, "2.0.0", "x-netsvc; " + ("expanded to several destinations (an alias)"
                                                            if expanded else "delivered to mailbox"),
                        action="expanded" if expanded else None))
                forwarded = forwardedNotify(notify, resolution)
                for forward in resolution.remote:  # an alias forwards elsewhere
                    self._queue(_key(forward), Recipient(address=forward, notify=forwarded,
                                                         orcpt=orcpt or f"rfc822;{address}"))
        self._send(250, "2.1.5", "Ok")

    def _queue(self, key: str, recipient: Recipient) -> None:
        if key not in self._queuedKeys:
            self._queuedKeys.add(key)
            self._queued.append(recipient)

    def do_DATA(self, rest: bytes) -> None:
        c = self.config
        if self.mailFrom is None:
            self._error(503, "5.5.1", "Error: need MAIL command", "bad_sequence")
            return
        if not self.recipients:
            self._error(554, "5.5.1", "Error: no valid recipients", "bad_sequence")
            return
        if rest:
            self._error(501, "5.5.4", "Syntax: DATA", "bad_syntax")
            return
        if self._needsSync("DATA"):
            return
        try:
            self._incoming = c.queue.newMessage()
        except OSError as e:
            log.error("smtp: cannot create a queue file: {error}", error=str(e))
            self._send(451, "4.3.0", "Error: local error in processing; try again later")
            self._resetTransaction()
            return
        self.messages += 1
        self._reader = DataReader(self._incoming, c.maxSize, c.maxLine, self._traceHeaders)
        self._send(354, None, "End data with <CR><LF>.<CR><LF>")

    def _readData(self) -> bool:
        """Feed the buffer to the DATA reader; False when it needs more input."""
        reader = self._reader
        assert reader is not None
        self._pos = reader.feed(self._buf, self._pos)
        if reader.problem == "barelf":
            self._abortData()
            self.config.metrics.reject("bare_lf")
            self._close(521, "5.5.2", f"{self.config.hostname} Error: bare <LF> received")
            return False
        if not reader.done:
            return False
        self._reader = None
        incoming, self._incoming = self._incoming, None
        problem = reader.problem
        if problem is not None:
            self._resetTransaction()
            self.config.metrics.reject({"size": "size", "line": "line_too_long", "nul": "nul",
                                        "barecr": "bare_cr", "hops": "loop", "io": "queue_error"}[problem])
            if problem == "size":
                self._send(552, "5.3.4", "Error: message too big for system")
            elif problem == "line":
                self._send(500, "5.5.2", "Error: line too long")
            elif problem == "io":
                log.error("smtp: cannot write a queue file: {error}", error=str(reader.ioError))
                if reader.ioError is not None and reader.ioError.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._send(452, "4.3.1", "Error: insufficient system storage")
                else:
                    self._send(451, "4.3.0", "Error: local error in processing; try again later")
            elif problem == "hops":
                self._send(554, "5.4.6", "Error: too many hops (a mail loop?)")
            elif problem == "barecr":
                self._send(554, "5.6.0", "Error: message contains bare <CR> characters")
            else:
                self._send(554, "5.6.0", "Error: message contains NUL characters")
            return True
        self._commit(incoming, reader.size)
        return True

    def _commit(self, incoming: Any, size: int) -> None:
        envelope = Envelope.new(self.mailFrom or "", self._queued, ret=self.ret, envid=self.envid,
                                client={"address": self.host, "helo": self.helo, "user": self.user})
        mailboxes = list(self._mailboxes.values())
        successes, headers = self._successes if envelope.sender else [], []
        self._resetTransaction()
        self._hold()
        queued = bool(envelope.recipients)
        d: Any = defer.succeed(None)
        if successes:  # the headers for the success report, read back before the tmp file goes

            def unread(f: Any) -> None:  # the report is lost, not the message
                log.error("smtp: cannot read the message back for its success report: {error}",
                          error=f.getErrorMessage())

            d = self.config.local.headers(incoming).addCallbacks(headers.append, unread)
        d.addCallback(lambda _: incoming.commit(envelope) if not mailboxes
                      else self._deliverLocally(incoming, envelope, mailboxes))

        def committed(id: str) -> None:
            c = self.config
            self.junk = 0  # as Postfix: junk is counted again after each message delivered
            c.metrics.accepted.inc()
            c.metrics.bytes.inc(size)
            log.debug("smtp: accepted {id} from {client}", id=id, client=self.host)
            if c.onAccepted is not None and queued:
                try:
                    c.onAccepted(id)
                except Exception:  # the message is durable: the client gets its 250 regardless
                    log.failure("smtp: the accept hook failed for {id}", id=id)
            if not self._closed:
                self._send(250, "2.0.0", f"Ok: queued as {id}")
                self._release()
            if headers:
                self._reportSuccess(id, envelope, headers[0], successes)

        def failed(f: Any) -> None:
            if f.check(LocalDeliveryError):
                cause = f.value.failure
                if cause.check(MailboxError, OSError):  # the store's own words (permissions, disk full): one line
                    log.error("smtp: local delivery failed: {error}", error=str(cause.value))
                else:
                    log.failure("smtp: local delivery failed", cause)
                self.config.metrics.reject("local_delivery_error")
            else:
                log.failure("smtp: queue commit failed", f)
                self.config.metrics.reject("queue_error")
            if not self._closed:
                self._send(451, "4.3.0", "Error: local error in processing; message not accepted")
                self._release()

        d.addCallbacks(committed, failed)

    def _deliverLocally(self, incoming: Any, envelope: Envelope, mailboxes: list[Mailbox]) -> Any:
        """
        Every local copy first (in a thread), then the queue for the other recipients;
        fires with the message id once both are durable.  On a failure nothing is
        kept: the tmp file is dropped, local copies written are removed.
        """
        local = self.config.local

        def delivered(written: list[tuple[str, str]]) -> Any:
            if not envelope.recipients:  # nothing to relay: the queue's tmp file is not needed
                incoming.abort()
                return incoming.id
            d = incoming.commit(envelope)

            def undo(f: Any) -> Any:
                return local.undo(written).addBoth(lambda _: f)

            return d.addErrback(undo)

        def notDelivered(f: Any) -> Any:
            incoming.abort()
            raise LocalDeliveryError(f)

        return local.deliver(incoming, envelope.sender, mailboxes).addCallbacks(delivered, notDelivered)

    def _reportSuccess(self, id: str, envelope: Envelope, headers: bytes, items: list[ReportItem]) -> None:
        """
        Queue a success report (RFC 3464, Action delivered/expanded) to the sender, for the local
        recipients whose NOTIFY asked for SUCCESS, as Postfix's local(8) does; the message is already
        acknowledged, so a report that cannot be queued is logged, not answered.
        """
        c = self.config
        report = buildReport(envelope, headers, items, "delivered", c.hostname)
        if report is None:
            return
        try:  # a local sender's report goes to its mailbox (in capture mode too), not through the queue
            sender = c.local.router.resolve(envelope.sender)
        except (UnknownRecipient, LookupPending):
            sender = None

        def sent(result: Any) -> None:
            if isinstance(result, str):  # queued
                log.info("smtp: {id}: success report {report} queued to <{sender}>", id=id, report=result,
                         sender=envelope.sender)
                if c.onAccepted is not None:
                    try:
                        c.onAccepted(result)
                    except Exception:  # the report is durable: delivery finds it at its next scan
                        log.failure("smtp: the accept hook failed for {id}", id=result)
            else:
                log.info("smtp: {id}: success report delivered to <{sender}>", id=id, sender=envelope.sender)

        if sender is not None and sender.mailboxes and not sender.remote:
            d = c.local.deliverReport(report, sender.mailboxes)
        else:  # (opening the queue file may raise at once: disk full, no file descriptors)
            d = defer.maybeDeferred(c.queue.enqueueBytes, "", [envelope.sender], report, dsn=True)
            if c.local.captured is not None:  # capture mode: captured, and a copy in the chosen INBOX
                d.addCallback(lambda queued: c.local.deliverReport(
                    report, [Mailbox(c.local.captured, envelope.sender)]).addCallback(lambda _: queued))
        d.addCallbacks(sent, lambda f: log.error("smtp: cannot send a success report to <{sender}>: {error}",
                                                 sender=envelope.sender, error=f.getErrorMessage()))

    def _abortData(self) -> None:
        if self._incoming is not None:
            self._incoming.abort()
            self._incoming = None
        self._reader = None

    def _traceHeaders(self, names: set[bytes]) -> bytes:
        """Received (RFC 5321 4.4, RFC 3848 protocol names), and Message-ID/Date when missing."""
        c = self.config
        proto = "UTF8SMTP" if self.smtputf8 else "ESMTP" if self.esmtp else "SMTP"
        if self.esmtp or self.smtputf8:
            proto += ("S" if self.secure else "") + ("A" if self.user else "")
        id = self._incoming.id if self._incoming is not None else ""
        rcpt = f"\r\n\tfor <{self.recipients[0].address}>" if len(self.recipients) == 1 else ""
        date = email.utils.formatdate(localtime=True)
        literal = f"IPv6:{self.host}" if ":" in self.host else self.host  # RFC 5321 4.1.3 address literal
        out = (f"Received: from {_clean(self.helo or '')} ([{literal}])\r\n\tby {c.hostname} (netsvc) "
               f"with {proto} id {id}{rcpt}; {date}\r\n")
        if b"message-id" not in names:
            out += f"Message-ID: <{id}@{c.hostname}>\r\n"
        if b"date" not in names:
            out += f"Date: {date}\r\n"
        return out.encode("utf-8")


def _key(address: str) -> str:
    """A recipient's identity: the domain is compared case-insensitively, the local part is not (RFC 5321 2.4)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address.lower()


def _clean(helo: str) -> str:
    """A HELO argument made safe for a header comment (no parentheses, controls or excess)."""
    return "".join(ch for ch in helo if ch.isprintable() and ch not in "()\\")[:255] or "unknown"
