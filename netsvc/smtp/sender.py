"""
The ESMTP client side: one connection that sends a series of messages, for
the delivery engine (L{netsvc.smtp.delivery}) and C{netsvc mail send}.

    sender = SMTPSender(identity="mail.lab", nextMessage=pull, onResult=record,
                        starttls="required", tlsCreator=creator, auth=("u", "pw"))
    endpoints.connectProtocol(endpoint, sender); sender.done -> Deferred[None]

The session: greeting, EHLO (HELO when EHLO is refused and nothing needs
ESMTP), STARTTLS as C{starttls} says (C{required}: fail without it;
C{opportunistic}: when offered; C{none}: never), AUTH PLAIN or LOGIN when
C{auth} is given (only over TLS, unless C{starttls="none"} was chosen), then one
transaction per message C{nextMessage()} hands out, until it returns None: QUIT.

Each transaction's outcome goes to C{onResult(message, [(recipient, Reply)])}
as soon as the server has answered the end of DATA (or refused MAIL/RCPT/DATA);
if that returns a Deferred, the next message waits for it (so a result is on
disk before more is sent).  Commands are pipelined (RFC 2920) when offered;
SIZE, BODY=8BITMIME, SMTPUTF8 and the DSN parameters (RFC 3461: RET, ENVID,
NOTIFY, ORCPT) are passed on when the server offers them.

C{done} fires with None after QUIT, or fails with L{SessionError} when the
session could not go on (refused greeting, TLS required but not offered, AUTH
refused, timeout, connection lost); C{SessionError.current} is the message that
was being sent and got no final answer, if any.

Why not C{twisted.mail.smtp.ESMTPSender}: it turns every LF into CRLF (queued
messages already have CRLF: they would go out as CR CR LF), misses the dot-
stuffing of a first line and of a line starting right at a 16 KB chunk edge,
does not pipeline, and cannot pass SIZE/BODY/DSN parameters -- things a relay
must get right.  Its reply parsing is simple enough to have here.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.protocols.basic import FileSender, LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

#: A reply longer than this many lines ends the session (a broken or hostile server).
MAX_REPLY_LINES = 100
#: Messages up to this size are read and written in one piece; larger ones are streamed.
SMALL_MESSAGE = 256 * 1024


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


class _Transaction:
    def __init__(self, message: Outgoing) -> None:
        self.message = message
        self.mail: Reply | None = None
        self.rcpts: list[Reply] = []
        self.data: Reply | None = None


class SMTPSender(LineReceiver, TimeoutMixin):
    """One client session; see the module docstring."""

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, identity: str, nextMessage: Callable[[], Outgoing | None],
                 onResult: Callable[[Outgoing, list[tuple[Recipient, Reply]]], Any],
                 starttls: str = "opportunistic", tlsCreator: Any = None,
                 auth: tuple[str, str] | None = None, timeout: float = 300.0,
                 trace: Callable[[str, str], None] | None = None) -> None:
        if starttls not in ("required", "opportunistic", "none"):
            raise ValueError(f"starttls must be required, opportunistic or none, not {starttls!r}")
        if starttls != "none" and tlsCreator is None:
            raise ValueError("STARTTLS needs a tlsCreator")
        self.identity = identity
        self.nextMessage = nextMessage
        self.onResult = onResult
        self.starttls = starttls
        self.tlsCreator = tlsCreator
        self.auth = auth
        self.timeout = timeout
        self.trace = trace
        self.done: defer.Deferred = defer.Deferred()
        self.tls = False
        self.extensions: dict[str, str] = {}
        self.sent = 0  # transactions with a final answer
        self._handlers: deque[Callable[[Reply], None]] = deque()
        self._lines: list[str] = []
        self.replyLines: list[str] = []  # the last reply's lines (EHLO's are the extensions)
        self._txn: _Transaction | None = None
        self._finished = False
        self._handshaking = False

    # -- plumbing ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        from twisted.internet.interfaces import ISSLTransport

        self.tls = ISSLTransport.providedBy(self.transport)
        # Commands and data go out as soon as they are written: with Nagle on, the end of
        # DATA waits for the ACK of the body the server delays (40 ms per message on Linux).
        noDelay = getattr(self.transport, "setTcpNoDelay", None)
        if noDelay is not None:
            try:
                noDelay(True)
            except OSError:
                pass
        self.setTimeout(self.timeout)
        self._handlers.append(self._greeting)

    def _send(self, line: str, handler: Callable[[Reply], None] | None, shown: str | None = None) -> None:
        if self.trace is not None:
            self.trace(">", shown if shown is not None else line)
        self.sendLine(line.encode("utf-8"))
        if handler is not None:
            self._handlers.append(handler)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        text = line.decode("utf-8", "replace")
        if self.trace is not None:
            self.trace("<", text)
        if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
            self._fail(SessionError(f"malformed reply {text[:80]!r}"))
            return
        self._lines.append(text[4:])
        if text[3:4] == "-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._fail(SessionError(f"reply longer than {MAX_REPLY_LINES} lines"))
            return
        reply = Reply(int(text[:3]), " ".join(s.strip() for s in self._lines).strip())
        self.replyLines, self._lines = self._lines, []
        if not self._handlers:
            self._fail(SessionError(f"unexpected reply {reply}"))
            return
        self._handlers.popleft()(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(SessionError(f"reply line longer than {self.MAX_LENGTH} bytes"))

    def timeoutConnection(self) -> None:
        self._fail(SessionError(f"no reply for {self.timeout:g}s"), abort=True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        reason = reason or Failure(ConnectionDone())
        self.setTimeout(None)
        if not self._finished:
            detail = reason.getErrorMessage() if not reason.check(ConnectionDone) else "closed by the server"
            self._fail(SessionError(f"connection lost: {detail}"), close=False)

    def _fail(self, error: SessionError, abort: bool = False, close: bool = True) -> None:
        if self._finished:
            return
        self._finished = True
        self.setTimeout(None)
        error.current = self._txn.message if self._txn is not None else None
        error.tlsFailed = self._handshaking
        self._txn = None
        self._handlers.clear()
        if close and self.transport is not None:
            if abort:
                self.transport.abortConnection()
            else:
                if error.reply is not None and error.reply.code != 421:
                    self._send("QUIT", None)
                self.transport.loseConnection()
        self.done.errback(error)

    def _refused(self, what: str, reply: Reply) -> None:
        self._fail(SessionError(f"{what}: {reply}", reply))

    # -- session setup ----------------------------------------------------------------------

    def _greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            self._refused("greeting", reply)
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self._send(f"EHLO {self.identity}", self._ehloReply)

    def _ehloReply(self, reply: Reply) -> None:
        self._handshaking = False
        if reply.code == 250:
            # The first line is the server's name; each further one an extension.
            self.extensions = {}
            for line in self.replyLines[1:]:
                keyword, _, params = line.strip().partition(" ")
                self.extensions[keyword.upper()] = params
            self._afterEhlo()
        elif reply.permanent and self.auth is None and self.starttls != "required" and not self.tls:
            self._send(f"HELO {self.identity}", self._heloReply)
        else:
            self._refused("EHLO", reply)

    def _heloReply(self, reply: Reply) -> None:
        if reply.code != 250:
            self._refused("HELO", reply)
            return
        self.extensions = {}
        self._next()

    def _afterEhlo(self) -> None:
        if not self.tls and self.starttls != "none":
            if "STARTTLS" in self.extensions:
                self._send("STARTTLS", self._starttlsReply)
                return
            if self.starttls == "required":
                self._fail(SessionError("STARTTLS required but not offered by the server"))
                return
        self._authenticate()

    def _starttlsReply(self, reply: Reply) -> None:
        if reply.code != 220:
            if self.starttls == "required":
                self._refused("STARTTLS", reply)
            else:
                self._authenticate()
            return
        self.transport.startTLS(self.tlsCreator)
        self.tls = True
        self._handshaking = True  # until the server answers the EHLO sent under TLS
        self._ehlo()

    def _authenticate(self) -> None:
        if self.auth is None:
            self._next()
            return
        if not self.tls and self.starttls != "none":
            self._fail(SessionError("not sending a password without TLS (the server offered no STARTTLS)"))
            return
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = self.auth
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
            self._send(f"AUTH PLAIN {token}", self._authReply, shown="AUTH PLAIN <credentials>")
        elif "LOGIN" in mechanisms:
            self._send("AUTH LOGIN", self._loginUser)
        else:
            self._fail(SessionError("the server offers no AUTH PLAIN or LOGIN"
                                    + (f" (it offers: {' '.join(mechanisms)})" if mechanisms else "")))

    def _loginUser(self, reply: Reply) -> None:
        if reply.code != 334:
            self._refused("AUTH LOGIN", reply)
            return
        self._send(base64.b64encode(self.auth[0].encode()).decode(), self._loginPassword, shown="<user>")

    def _loginPassword(self, reply: Reply) -> None:
        if reply.code != 334:
            self._refused("AUTH LOGIN", reply)
            return
        self._send(base64.b64encode(self.auth[1].encode()).decode(), self._authReply, shown="<password>")

    def _authReply(self, reply: Reply) -> None:
        if reply.code != 235:
            self._refused("AUTH", reply)
            return
        self._next()

    # -- transactions --------------------------------------------------------------------------

    def _next(self) -> None:
        if self._finished:
            return
        message = self.nextMessage()
        if message is None:
            self._send("QUIT", self._quitReply)
            return
        self._txn = _Transaction(message)
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

    def _quitReply(self, reply: Reply) -> None:
        self._finished = True
        self.setTimeout(None)
        self.transport.loseConnection()
        self.done.callback(None)
