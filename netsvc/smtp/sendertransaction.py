"""
The mail transactions of the SMTP client session (RFC 5321 3.3): MAIL (SIZE,
BODY=8BITMIME, SMTPUTF8, DSN RET/ENVID), RCPT (DSN NOTIFY/ORCPT), DATA (the
message dot-stuffed on the way, L{DotStuffer}; written in one piece up to
L{SMALL_MESSAGE}, streamed beyond), and each transaction's outcome per
recipient to C{onResult} -- then the next message, or QUIT when there is none.

Commands are pipelined (RFC 2920) when the server offers PIPELINING, else sent
one by one, and the transaction stops early (RSET) once MAIL or every RCPT is
refused.  An ESMTP parameter goes out only when the server offers its extension
(a non-ASCII address without SMTPUTF8 is refused here, 553 5.6.7, without
asking the server).

A mixin of L{netsvc.smtp.sender.SMTPSender}: it uses the session's line
output and reply queue (C{_send}, C{_handlers}, C{transport}, C{trace}), its
ending (C{_fail}, C{_refused}, C{_quitReply}, C{_finished}) and state
(C{extensions}, C{nextMessage}, C{onResult}, C{sent}, C{_txn}); its own state is
C{_sequential} (the commands still to send when the server does not pipeline).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from netsvc.smtp.sendertypes import Outgoing, Recipient, Reply, SessionError

#: Messages up to this size are read and written in one piece; larger ones are streamed.
SMALL_MESSAGE = 256 * 1024


class DotStuffer:
    """
    The DATA transparency of RFC 5321 4.5.2, across chunk edges: a line that
    starts with a dot gets a second one.  Feed chunks in order; L{end} says what
    closes the data.
    """

    def __init__(self) -> None:
        self.atLineStart = True
        self.empty = True

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        out = chunk.replace(b"\n.", b"\n..")
        if self.atLineStart and chunk[:1] == b".":
            out = b"." + out
        self.atLineStart = chunk[-1:] == b"\n"
        self.empty = False
        return out

    def end(self) -> bytes:
        return b".\r\n" if self.atLineStart else b"\r\n.\r\n"


def _xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=', controls and non-ASCII as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                   for c in value)


class Transaction:
    """One message's transaction: the replies to MAIL, each RCPT and DATA so far."""

    def __init__(self, message: Outgoing) -> None:
        self.message = message
        self.mail: Reply | None = None
        self.rcpts: list[Reply] = []
        self.data: Reply | None = None


class SenderTransactions:
    """MAIL, RCPT, DATA and their outcome, for L{netsvc.smtp.sender.SMTPSender}; see the module docstring."""

    def _next(self) -> None:
        if self._finished:
            return
        message = self.nextMessage()
        if message is None:
            self._send("QUIT", self._quitReply)
            return
        self._txn = Transaction(message)
        utf8 = message.needsUTF8()
        if utf8 and "SMTPUTF8" not in self.extensions:
            self._report(Reply(553, "5.6.7 the server does not support SMTPUTF8 (non-ASCII address)"))
            return
        mail = f"MAIL FROM:<{message.sender}>"
        if "SIZE" in self.extensions:
            mail += f" SIZE={message.size}"
        if message.eightBit and "8BITMIME" in self.extensions:
            mail += " BODY=8BITMIME"
        if utf8:
            mail += " SMTPUTF8"
        dsn = "DSN" in self.extensions
        if dsn and message.ret:
            mail += f" RET={message.ret}"
        if dsn and message.envid:
            mail += f" ENVID={_xtext(message.envid)}"
        commands = [(mail, self._mailReply)]
        for r in message.recipients:
            rcpt = f"RCPT TO:<{r.address}>"
            if dsn and r.notify:
                rcpt += f" NOTIFY={r.notify}"
            if dsn and r.orcpt:
                kind, _, addr = r.orcpt.partition(";")
                rcpt += f" ORCPT={kind};{_xtext(addr)}"
            commands.append((rcpt, self._rcptReply))
        commands.append(("DATA", self._dataReply))
        if "PIPELINING" in self.extensions:
            for line, handler in commands:
                self._send(line, handler)
        else:
            self._sequential = deque(commands)
            line, handler = self._sequential.popleft()
            self._send(line, handler)

    def _sendNextInSequence(self) -> None:
        """Without PIPELINING: the next command, or the end of the transaction when it cannot go on."""
        txn = self._txn
        assert txn is not None
        if txn.mail is not None and not txn.mail.ok:
            self._abortTransaction()
            return
        if len(self._sequential) == 1 and not any(r.ok for r in txn.rcpts):  # only DATA left
            self._abortTransaction()
            return
        line, handler = self._sequential.popleft()
        self._send(line, handler)

    def _mailReply(self, reply: Reply) -> None:
        self._txn.mail = reply
        if "PIPELINING" not in self.extensions:
            self._sendNextInSequence()

    def _rcptReply(self, reply: Reply) -> None:
        self._txn.rcpts.append(reply)
        if "PIPELINING" not in self.extensions:
            self._sendNextInSequence()

    def _dataReply(self, reply: Reply) -> None:
        txn = self._txn
        if reply.code != 354:
            txn.data = reply
            self._abortTransaction()
            return
        if not txn.mail.ok or not any(r.ok for r in txn.rcpts):
            # A server that says 354 with nobody to deliver to: end the data at once.
            self._send(".", self._finalReply)
            return
        stuffer = DotStuffer()
        try:
            data = txn.message.openData()
            small = data.read(SMALL_MESSAGE) if txn.message.size <= SMALL_MESSAGE else None
        except OSError as e:
            self._fail(SessionError(f"cannot read the message: {e}"), abort=True)
            return
        if small is not None:  # the usual case: one write, body and end together
            data.close()
            self.transport.write(stuffer(small) + stuffer.end())
            if self.trace is not None:
                self.trace(">", f"<{txn.message.size} bytes of message data>")
                self.trace(">", ".")
            self._handlers.append(self._finalReply)
            return
        d = FileSender().beginFileTransfer(data, self.transport, stuffer)

        def sent(_: Any) -> None:
            data.close()
            if self._finished:
                return
            self.transport.write(stuffer.end())
            if self.trace is not None:
                self.trace(">", f"<{txn.message.size} bytes of message data>")
                self.trace(">", ".")
            self._handlers.append(self._finalReply)

        def failed(f: Failure) -> None:
            data.close()
            self._fail(SessionError(f"sending the message failed: {f.getErrorMessage()}"), abort=True)

        d.addCallbacks(sent, failed)

    def _finalReply(self, reply: Reply) -> None:
        self._txn.data = reply
        self._report(None)

    def _abortTransaction(self) -> None:
        """MAIL, every RCPT or DATA refused: RSET, then report."""
        self._send("RSET", self._rsetReply)

    def _rsetReply(self, reply: Reply) -> None:
        if not reply.ok:
            self._refused("RSET", reply)
            return
        self._report(None)

    def _report(self, every: Reply | None) -> None:
        """The transaction's outcome, per recipient, to onResult; then the next message."""
        txn = self._txn
        assert txn is not None
        results: list[tuple[Recipient, Reply]] = []
        for i, rcpt in enumerate(txn.message.recipients):
            if every is not None:
                reply = every
            elif txn.mail is not None and not txn.mail.ok:
                reply = txn.mail
            elif i < len(txn.rcpts) and not txn.rcpts[i].ok:
                reply = txn.rcpts[i]
            elif txn.data is not None:
                reply = txn.data
            else:  # not reached: every path sets data or a refusal
                reply = Reply(451, "4.3.0 no answer")
            results.append((rcpt, reply))
        self._txn = None
        self.sent += 1
        d = defer.maybeDeferred(self.onResult, txn.message, results)
        d.addCallbacks(lambda _: self._next(),
                       lambda f: self._fail(SessionError(f"recording the result failed: {f.getErrorMessage()}")))
