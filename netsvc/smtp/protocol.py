"""
The ESMTP server session (RFC 5321) with PIPELINING (2920), SIZE (1870),
8BITMIME (6152), SMTPUTF8 (6531), ENHANCEDSTATUSCODES (2034/3463), STARTTLS
(3207), AUTH PLAIN/LOGIN (4954, only under TLS) and DSN parameters (3461).

Wire behaviour only: everything it decides with comes in a L{ServerConfig}
(netsvc.smtp.policy: the queue, the authenticator, the limits, the TLS context),
so tests drive it over a StringTransport.  This module holds the connection:
input framing, pipelining and back-pressure, replies, EHLO/HELO, STARTTLS and
the small commands.  MAIL/RCPT/DATA and the commit are in
netsvc.smtp.transaction, AUTH in netsvc.smtp.sasl, the DATA reader in
netsvc.smtp.data, the command syntax in netsvc.smtp.syntax.

Contract:
  - Replies are sent in command order, one write per pipelined group; while a
    reply waits on a Deferred (AUTH check, queue commit) input is held, not read.
  - Back-pressure: the session is its transport's producer; a client that does
    not read its replies is not answered, then (past 256 KB waiting) not read.
    Replies are handed to the transport at least every OUTPUT_CHUNK bytes, so a
    long pipelined group stops as soon as the transport's buffer is full.
  - Input is parsed from an offset into the buffer (each line is looked at once,
    the rest is never re-sliced per line).
  - Junk (NOOP, RSET, VRFY, EXPN, HELP): at most C{junkLimit} per session, counted
    again from 0 after each accepted message (Postfix's smtpd_junk_command_limit);
    then 421 4.7.0 and close.  Errors: at most MAX_ERRORS (smtpd_hard_error_limit).
  - A closing connection (QUIT, 421, 521, 554) that does not take its last reply
    within CLOSE_GRACE -- a TLS client that never did the handshake, a client
    that stopped reading -- is aborted; so is a refused one (over the limits).
  - Relay: a RCPT is accepted only from C{mynetworks} or an authenticated session,
    otherwise 554 5.7.1 -- except for a local user (C{config.local}: anyone may
    send to one; an unknown local user is 550 5.1.1).  Submission listeners need
    AUTH (after STARTTLS on plain TCP).
  - 250 after DATA only once the queue's commit has fired (durable).
  - Bad input: over-long command or text line 500 5.5.2 (the transaction, not the
    session, ends); over size 552 5.3.4 (SIZE= at MAIL, running total in DATA);
    NUL or bare CR 554 5.6.0; bare LF, data pipelined after DATA/EHLO: 521/554 and close;
    a client that vanishes mid-DATA leaves nothing (the tmp file is removed).
  - Failed AUTH (wrong or garbage) 535 5.7.8, counted; limited per session
    (then 421) and per client IP (token bucket; then 454 4.7.0 without checking).

Why not C{twisted.mail.smtp.ESMTP}: it processes pipelined commands without
waiting for asynchronous replies (a QUIT pipelined after the final "." is
answered before the 250), so a durable commit cannot hold the session; it has no
SIZE, line-length, NUL or bare-LF handling, no enhanced status codes, no
"authentication required", advertises AUTH before TLS, and spends several calls
per DATA line.  Its xtext codec is used (netsvc.smtp.syntax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol

from netsvc.smtp.data import DataReader
from netsvc.smtp.policy import ServerConfig, SMTPMetrics, reply
from netsvc.smtp.sasl import AuthCommands
from netsvc.smtp.transaction import TransactionCommands

__all__ = ["MAX_COMMAND_LINE", "SMTPFactory", "SMTPMetrics", "SMTPSession", "ServerConfig", "reply"]

#: Longest command line we read (RFC 5321 says 512; extensions and AUTH need more; Postfix allows 2048).
MAX_COMMAND_LINE = 4096
#: Errors (bad commands) in one session before it is closed (Postfix's smtpd_hard_error_limit).
MAX_ERRORS = 20
#: Input held while a reply waits (pipelined commands); beyond it, stop reading.
MAX_HELD_INPUT = 256 * 1024
#: Replies are written to the transport once this much is waiting (the transport may then pause us).
OUTPUT_CHUNK = 16 * 1024
#: Seconds a closing connection has to take its last reply before it is aborted: a TLS close
#: waits for the peer (for ever if it never did the handshake), and so does a full write buffer.
CLOSE_GRACE = 10.0


class SMTPSession(TransactionCommands, AuthCommands, Protocol):
    """One client connection.  See the module docstring for the contract."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._buf = b""
        self._pos = 0  # where the unparsed input starts in _buf
        self._out: list[bytes] = []
        self._outSize = 0
        self._busy = False  # a reply waits on a Deferred: hold input
        self._writesPaused = False  # the transport's write buffer is full: commands wait
        self._inputHeld = False  # much input waits: the transport is not read
        self._processing = False
        self._again = False
        self._abortCall: Any = None
        self._closed = False
        self._skipping = False  # dropping the rest of an over-long command line
        self._reader: DataReader | None = None
        self._incoming: Any = None
        self._authState: Callable[[bytes], None] | None = None
        self._drainWhenIdle = False
        self.secure = False
        self.helo: str | None = None
        self.esmtp = False
        self.user: str | None = None
        self.host = ""
        self.errors = 0
        self.junk = 0  # junk commands since the session began or the last accepted message
        self.authFailures = 0
        self.messages = 0
        self._resetTransaction()

    # -- connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.host = getattr(peer, "host", None) or "unix"
        self.secure = ISSLTransport.providedBy(self.transport)
        self.config.metrics.sessions.inc()
        # Back-pressure: a client that does not read its replies fills the transport's
        # buffer; the transport pauses us and we stop answering its commands, then
        # reading them (bounded memory; see _process).
        self.transport.registerProducer(self, True)
        self._send(220, None, f"{self.config.hostname} ESMTP netsvc")
        self._flush()

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None
        if self._incoming is not None:  # vanished mid-DATA: nothing is kept
            self.config.metrics.reject("lost_in_data")
            self._incoming.abort()
            self._incoming = None
            self._reader = None

    def timedOut(self) -> None:
        """The Guard's idle timeout (RFC 5321 4.5.3.2: at least 5 minutes)."""
        self._abortData()
        self._close(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")

    def drain(self) -> None:
        """Shutdown: close now if idle between transactions, else after the current one."""
        if self._incoming is None and not self._busy and self.mailFrom is None:
            self._close(421, "4.3.2", f"{self.config.hostname} Service shutting down")
        else:
            self._drainWhenIdle = True

    # -- as the transport's producer (of replies)

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full (or, under TLS, waits for the handshake):
        stop answering.  Input is then only buffered, and the transport is paused
        once that passes MAX_HELD_INPUT -- not at once, or a TLS handshake that
        holds our banner back would never be read.
        """
        self._writesPaused = True

    def resumeProducing(self) -> None:
        self._writesPaused = False
        if not self._closed:
            self._process()

    def stopProducing(self) -> None:
        pass

    # -- output

    def _send(self, code: int, status: str | None, text: str) -> None:
        data = reply(code, status, text)
        self._out.append(data)
        self._outSize += len(data)

    def _flush(self) -> None:
        if self._out and not self._closed:
            data = b"".join(self._out)
            self._out = []
            self._outSize = 0
            self.transport.write(data)

    def _close(self, code: int, status: str, text: str) -> None:
        if self._closed:
            return
        self._send(code, status, text)
        self._flush()
        self._closed = True
        self._buf, self._pos = b"", 0
        self.transport.loseConnection()
        self._abortCall = self.config.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    # -- input

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._pos >= len(self._buf):
            self._buf = data
        else:  # (at most MAX_HELD_INPUT and a read are kept: see _process)
            self._buf = self._buf[self._pos:] + data
        self._pos = 0
        self._process()

    def _pending(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._buf) - self._pos

    def _process(self) -> None:
        if self._processing:  # re-entered (a commit fired, the transport resumed us): once more
            self._again = True
            return
        self._processing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._processInput()
                self._flush()
        finally:
            self._processing = False
        if self._pos and self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        stalled = (self._busy or self._writesPaused) and self._pending() > MAX_HELD_INPUT
        if stalled != self._inputHeld and not self._closed:
            self._inputHeld = stalled
            if stalled:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _processInput(self) -> None:
        while self._pos < len(self._buf) and not self._busy and not self._closed and not self._writesPaused:
            if self._reader is not None:
                if not self._readData():
                    break
                continue
            if self._outSize >= OUTPUT_CHUNK:  # the transport may pause us (pauseProducing) here
                self._flush()
                continue
            buf, pos = self._buf, self._pos
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_COMMAND_LINE:
                    self._buf, self._pos = b"", 0
                    if not self._skipping:
                        self._lineTooLong()
                    self._skipping = True
                break
            line = buf[pos:nl + 1]
            self._pos = nl + 1
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self._lineTooLong()
                continue
            if line[-2:-1] != b"\r":
                self.config.metrics.reject("bare_lf")
                self._close(521, "5.5.2", f"{self.config.hostname} Error: bare <LF> received")
                break
            line = line[:-2]
            if b"\0" in line or b"\r" in line:
                self._error(500, "5.5.2", "Error: NUL or bare <CR> in command", "bad_command")
                continue
            if self._authState is not None:
                self._authState(line)
            else:
                self._command(line)

    def _lineTooLong(self) -> None:
        self._authState = None
        self._error(500, "5.5.2", "Error: line too long", "line_too_long")

    def _error(self, code: int, status: str, text: str, reason: str) -> None:
        self.config.metrics.reject(reason)
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self._close(421, "4.7.0", f"{self.config.hostname} Error: too many errors")
        else:
            self._send(code, status, text)

    def _junk(self) -> bool:
        """Count a junk command; past C{junkLimit}, close the session (True: do not answer it)."""
        self.junk += 1
        if self.junk > self.config.junkLimit:
            self.config.metrics.reject("junk_commands")
            self._close(421, "4.7.0", f"{self.config.hostname} Error: too many junk commands")
            return True
        return False

    def _hold(self) -> None:
        self._busy = True

    def _release(self) -> None:
        self._busy = False
        if self._drainWhenIdle and self._incoming is None and self.mailFrom is None:
            self._close(421, "4.3.2", f"{self.config.hostname} Service shutting down")
            return
        self._flush()
        self._process()

    # -- commands

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        handler = getattr(self, "do_" + verb.decode("ascii", "replace").upper(), None)
        if handler is None or not verb.isalpha():
            self._error(500, "5.5.2", "Error: command not recognized", "bad_command")
            return
        handler(rest.strip())

    def _needsSync(self, what: str) -> bool:
        """RFC 2920: nothing may follow EHLO/HELO/DATA/STARTTLS in the same group."""
        if self._pending():
            self.config.metrics.reject("pipelining")
            self._close(554, "5.5.0", f"Error: SMTP protocol synchronization (data sent after {what})")
            return True
        return False

    def do_EHLO(self, rest: bytes, esmtp: bool = True) -> None:
        if not rest:
            self._error(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname", "bad_syntax")
            return
        if self._needsSync("EHLO" if esmtp else "HELO"):
            return
        self.helo = rest.decode("utf-8", "replace")
        self.esmtp = esmtp
        self._resetTransaction()
        c = self.config
        if not esmtp:
            self._send(250, None, c.hostname)
            return
        lines = [c.hostname, "PIPELINING", f"SIZE {c.maxSize}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "DSN"]
        if c.tlsOptions is not None and not self.secure:
            lines.append("STARTTLS")
        if c.authenticator is not None and self.secure and self.user is None:
            lines.append("AUTH PLAIN LOGIN")
        self._send(250, None, "\n".join(lines))

    def do_HELO(self, rest: bytes) -> None:
        self.do_EHLO(rest, esmtp=False)

    def do_NOOP(self, rest: bytes) -> None:
        if self._junk():
            return
        self._send(250, "2.0.0", "Ok")

    def do_RSET(self, rest: bytes) -> None:
        if self._junk():
            return
        self._resetTransaction()
        self._send(250, "2.0.0", "Ok")

    def do_QUIT(self, rest: bytes) -> None:
        self._close(221, "2.0.0", "Bye")

    def do_VRFY(self, rest: bytes) -> None:
        if self._junk():
            return
        self._send(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, rest: bytes) -> None:
        if self._junk():
            return
        self._send(502, "5.5.1", "Error: EXPN not supported")

    def do_HELP(self, rest: bytes) -> None:
        if self._junk():
            return
        self._send(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY STARTTLS AUTH")

    def do_STARTTLS(self, rest: bytes) -> None:
        c = self.config
        if c.tlsOptions is None:
            self._error(502, "5.5.1", "Error: STARTTLS not available", "bad_command")
            return
        if self.secure:
            self._error(503, "5.5.1", "Error: TLS already active", "bad_sequence")
            return
        if rest:
            self._error(501, "5.5.4", "Syntax: STARTTLS", "bad_syntax")
            return
        # Anything pipelined after STARTTLS would be read as if it came under TLS
        # (CVE-2011-0411): refuse it.
        if self._needsSync("STARTTLS"):
            return
        self._send(220, "2.0.0", "Ready to start TLS")
        self._flush()
        self.transport.startTLS(c.tlsOptions())
        self.secure = True
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.helo = None
        self.esmtp = False
        self._resetTransaction()


class SMTPFactory(Factory):
    """Builds sessions for one listener."""

    noisy = False  # no "Starting factory" lines in the log

    def __init__(self, config: ServerConfig) -> None:
        self.config = config

    def buildProtocol(self, addr: Any) -> SMTPSession:
        return SMTPSession(self.config)

    def refusalProtocol(self, reason: str) -> Protocol:
        return _Refusal(self.config.hostname, reason, self.config.clock)


class _Refusal(Protocol):
    """
    A connection over the Guard's limits: 421, then close (RFC 5321 3.1).  Under
    TLS the 421 waits for the handshake: a client that never does it is aborted
    after CLOSE_GRACE (it is not counted by the Guard, so nothing else would).
    """

    def __init__(self, hostname: str, reason: str, clock: Any) -> None:
        self.hostname = hostname
        self.reason = reason
        self.clock = clock
        self._abortCall: Any = None

    def connectionMade(self) -> None:
        text = "Service shutting down" if self.reason == "shutdown" else "Too many connections; try again later"
        self.transport.write(reply(421, "4.7.0", f"{self.hostname} {text}"))
        self.transport.loseConnection()
        self._abortCall = self.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason: Any = None) -> None:
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
