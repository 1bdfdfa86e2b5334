"""
The ESMTP client side: one connection that sends a series of messages, for
the delivery engine (L{netsvc.smtp.delivery}) and C{netsvc mail send}.

    sender = SMTPSender(identity="mail.lab", nextMessage=pull, onResult=record,
                        starttls="required", tlsCreator=creator, auth=("u", "pw"))
    endpoints.connectProtocol(endpoint, sender); sender.done -> Deferred[None]

The session: greeting, EHLO (HELO when EHLO is refused and nothing needs
ESMTP), STARTTLS as C{starttls} says (C{required}: fail without it;
C{opportunistic}: when offered; C{none}: never), AUTH PLAIN or LOGIN when
C{auth} is given (only over TLS, unless C{authWithoutTLS} says otherwise: the
caller decides whether that TLS was verified -- its C{tlsCreator}), then one
transaction per message C{nextMessage()} hands out, until it returns None: QUIT.
This module holds the session: reply parsing, timeouts, the set-up and the
ending; the transactions are L{netsvc.smtp.sendertransaction} (a mixin), and
the values handed in and out (L{Outgoing}, L{Recipient}, L{Reply},
L{SessionError}) are L{netsvc.smtp.sendertypes}.

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
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from netsvc.smtp.sendertransaction import SenderTransactions, Transaction
from netsvc.smtp.sendertypes import Outgoing, Recipient, Reply, SessionError

#: A reply longer than this many lines ends the session (a broken or hostile server).
MAX_REPLY_LINES = 100


class SMTPSender(SenderTransactions, LineReceiver, TimeoutMixin):
    """One client session; see the module docstring."""

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, identity: str, nextMessage: Callable[[], Outgoing | None],
                 onResult: Callable[[Outgoing, list[tuple[Recipient, Reply]]], Any],
                 starttls: str = "opportunistic", tlsCreator: Any = None,
                 auth: tuple[str, str] | None = None, timeout: float = 300.0,
                 trace: Callable[[str, str], None] | None = None, authWithoutTLS: bool = False) -> None:
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
        #: Send the password on a connection without TLS (an explicit, insecure choice).
        self.authWithoutTLS = authWithoutTLS
        self.timeout = timeout
        self.trace = trace
        self.done: defer.Deferred = defer.Deferred()
        self.tls = False
        self.extensions: dict[str, str] = {}
        self.sent = 0  # transactions with a final answer
        self._handlers: deque[Callable[[Reply], None]] = deque()
        self._lines: list[str] = []
        self.replyLines: list[str] = []  # the last reply's lines (EHLO's are the extensions)
        self._txn: Transaction | None = None
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
        if not self.tls and not self.authWithoutTLS:
            self._fail(SessionError("not sending a password without TLS"
                                    + (" (the server offered no STARTTLS)" if self.starttls != "none" else "")))
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

    # -- the end ------------------------------------------------------------------------------

    def _quitReply(self, reply: Reply) -> None:
        self._finished = True
        self.setTimeout(None)
        self.transport.loseConnection()
        self.done.callback(None)
