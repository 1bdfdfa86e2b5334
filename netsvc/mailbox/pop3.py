"""
POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN (RFC 5034)
and the response codes [AUTH], [SYS/TEMP], [SYS/PERM] (RFC 3206), over the
INBOX of the store (L{netsvc.mailbox.maildir.Maildirs}).

Wire behaviour only: what a session decides with comes in a L{POP3Config}
(the store, the authenticator, the failure limit, the TLS context, the limits),
so tests drive it over a StringTransport.

Contract:
  - Passwords only under TLS: USER, PASS and AUTH before TLS answer
    C{-ERR [AUTH]}; CAPA shows C{STLS} before TLS and C{USER}, C{SASL PLAIN}
    after it (and nothing of either once logged in).  APOP is not offered.
  - Login failures are counted against the client's IP in the L{FailureLimit}
    before the password is checked (reserve first; the token is given back when
    it was right); the check itself runs in the authenticator's hashing pool.
    With the allowance spent, C{-ERR [SYS/TEMP]} without checking; after
    C{authPerSession} failures the session is closed.
  - The maildrop is the INBOX as it was at login (message numbers and sizes
    stay fixed for the session); UIDL gives each message's UID and the folder's
    UIDVALIDITY (C{%08x%08x}: stable across sessions and restarts, shared with
    IMAP).  DELE only marks: the messages are removed at QUIT (the UPDATE state),
    and a session that ends any other way (dropped, timed out, shut down)
    deletes nothing.
  - RETR/TOP send the message with CRLF line ends and dot-stuffing, as the
    transport takes it: the session is its transport's streaming producer and
    writes the next chunk only while not paused, so a client that never reads
    holds the transport's buffer and one message, no more.  Listings (LIST,
    UIDL) go out the same way.
  - Commands are answered in order (PIPELINING): while one waits on the store
    or the password check, later input is held; past L{MAX_HELD_INPUT} it is
    not read.  A line longer than L{MAX_LINE} is an error (the rest of it is
    skipped).  Errors and junk (NOOP, RSET, USER, CAPA) count toward
    C{junkLimit}; past it: C{-ERR} and close.  Input pipelined after STLS is
    refused and the session closed (it would be read as if it came under TLS).
  - Store work (listing, reading, removing) runs through C{config.run}
    (a thread), never on the reactor.

Why not C{twisted.mail.pop3.POP3} (read on Twisted 26.10): its AUTH state
splits the decoded response on whitespace (CRAM-MD5's form: AUTH PLAIN never
works) and an initial response raises TypeError; its error handler joins str
arguments into bytes (a TypeError, so C{DELE x} drops the connection); it
has no STLS, queues pipelined commands without bound while a RETR runs, sends
a message through a FileSender that registers itself as the transport's
producer, turns every LF into CRLF (CRLF messages go out with CR CR LF) and
misses the dot-stuffing of a line that starts a chunk or the message; QUIT
deletes synchronously on the reactor; unknown commands are logged with a
traceback each.  Only its C{IMailbox} idea (a maildrop snapshot, deletes at
sync) is kept.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from netsvc.auth import FailureLimit, Refused, limitedCheck
from netsvc.mailbox.maildir import InvalidName, NoSuchMessage
from netsvc.metrics import Registry

__all__ = ["POP3Config", "POP3Factory", "POP3Metrics", "POP3Session", "toWire", "topLines"]

log = Logger()

#: The longest command line read (RFC 2449: 255 octets; AUTH responses may be longer).
MAX_LINE = 2048
#: Input held while a command waits (pipelined commands); beyond it, stop reading.
MAX_HELD_INPUT = 64 * 1024
#: A message or listing is handed to the transport in pieces of this size (it may pause us after each).
CHUNK = 64 * 1024
#: Short answers to pipelined commands are handed to the transport once this much waits.
OUTPUT_CHUNK = 16 * 1024
#: Seconds a closing connection has to take its last answer before it is aborted.
CLOSE_GRACE = 10.0


class POP3Metrics:
    """The POP3 counters (connections and bytes are the Guard's)."""

    def __init__(self, registry: Registry, service: str = "mailbox") -> None:
        s = {"service": service}
        self.service = service
        self.sessions = registry.counter("netsvc_pop3_sessions_total", "POP3 sessions started.",
                                         ["service"]).labels(**s)
        self.retrieved = registry.counter("netsvc_pop3_messages_retrieved_total", "Messages sent by RETR.",
                                          ["service"]).labels(**s)
        self.deleted = registry.counter("netsvc_pop3_messages_deleted_total",
                                        "Messages removed at QUIT (DELE, then UPDATE).", ["service"]).labels(**s)
        self._logins = registry.counter("netsvc_pop3_logins_total", "Login attempts, by result.",
                                        ["service", "result"])
        self._rejects = registry.counter("netsvc_pop3_rejects_total", "Commands refused or sessions closed, "
                                         "by reason.", ["service", "reason"])

    def login(self, result: str) -> None:
        self._logins.labels(service=self.service, result=result).inc()

    def reject(self, reason: str) -> None:
        self._rejects.labels(service=self.service, reason=reason).inc()


def _inThread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    return threads.deferToThread(f, *args)


@attrs.define
class POP3Config:
    """What the sessions of one listener share."""

    #: The store: C{inbox(user)} -> a folder with C{messages()}, C{read(uid)}, C{remove(uids)}, C{uidvalidity}.
    store: Any
    #: A L{netsvc.auth.Authenticator} (C{check(user, password)} fires True/False/L{Refused}).
    authenticator: Any
    metrics: POP3Metrics
    clock: Any
    #: Failed logins per client IP and overall (reserve first); None: no limit.
    failures: FailureLimit | None = None
    #: Returns the TLS context factory for STLS; None: no STLS.
    tlsOptions: Callable[[], Any] | None = None
    #: Runs blocking store work: C{run(f, *args)} -> Deferred (a thread; tests run it at once).
    run: Callable[..., defer.Deferred] = _inThread
    authPerSession: int = 3
    junkLimit: int = 100
    #: The name of the maildrop of a user who logged in (users' names are case-insensitive).
    mailboxName: Callable[[str], str] = str.lower


# -- the message on the wire ---------------------------------------------------------------

_BARE_LF = re.compile(rb"(?<!\r)\n")


def _crlf(data: bytes) -> bytes:
    """C{data} with every bare LF made CRLF (CRLF and bare CR left alone)."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _BARE_LF.sub(b"\r\n", data)


def _stuffed(data: bytes) -> bytes:
    """CRLF text (not empty, ending in CRLF) dot-stuffed, with the terminating C{.} line."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def toWire(message: bytes) -> bytes:
    """
    A message as RETR sends it after the C{+OK} line: CRLF line ends, every line
    starting with C{.} stuffed, a final CRLF if the message lacked one, then C{.CRLF}.
    """
    data = _crlf(message)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _stuffed(data)


def topLines(message: bytes, lines: int) -> bytes:
    """What TOP C{lines} sends: the header, the blank line, C{lines} lines of the body; as L{toWire}."""
    data = _crlf(message)
    end = data.find(b"\r\n\r\n")
    if end < 0:  # all header (or a header without a body)
        return toWire(data)
    cut = end + 4
    for _ in range(lines):
        nl = data.find(b"\r\n", cut)
        if nl < 0:
            cut = len(data)
            break
        cut = nl + 2
    return toWire(data[:cut])


def uniqueId(uid: int, uidvalidity: int) -> str:
    """The UIDL of a message (RFC 1939: 1 to 70 characters 0x21-0x7E): Dovecot's %08Xu%08Xv, in lower case."""
    return f"{uid:08x}{uidvalidity:08x}"


# -- the session -------------------------------------------------------------------------


class _Drop:
    """The maildrop of a session: a snapshot of the INBOX at login, and the marks of DELE."""

    def __init__(self, folder: Any, messages: list[Any]) -> None:
        self.folder = folder
        self.messages = messages
        self.uidvalidity = int(folder.uidvalidity)
        self.deleted: set[int] = set()  # indexes into messages

    def live(self) -> list[tuple[int, Any]]:
        """(number from 1, message) of those not marked deleted."""
        return [(i + 1, m) for i, m in enumerate(self.messages) if i not in self.deleted]


class POP3Session(Protocol):
    """One client connection.  See the module docstring for the contract."""

    def __init__(self, config: POP3Config) -> None:
        self.config = config
        self._buf = b""
        self._pos = 0
        self._out: list[bytes] = []
        self._outSize = 0
        self._stream: memoryview | None = None  # a multi-line answer being written
        self._streamPos = 0
        self._busy = False  # an answer waits on a Deferred: hold input
        self._writesPaused = False
        self._inputHeld = False
        self._processing = False
        self._again = False
        self._closed = False
        self._skipping = False
        self._abortCall: Any = None
        self._authState: Callable[[bytes], None] | None = None
        self._drainWhenIdle = False
        self.secure = False
        self.host = ""
        self.userGiven: str | None = None  # USER, waiting for PASS
        self.user: str | None = None  # logged in as
        self.drop: _Drop | None = None
        self.failures = 0
        self.junk = 0

    # -- connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.host = getattr(peer, "host", None) or "unix"
        self.secure = ISSLTransport.providedBy(self.transport)
        self.config.metrics.sessions.inc()
        self.transport.registerProducer(self, True)
        self._send(b"+OK netsvc POP3 ready.")
        self._flush()

    def connectionLost(self, reason: Any = None) -> None:
        # (a session that ends without QUIT never reaches the UPDATE state: nothing is deleted)
        self._closed = True
        self._stream = None
        self.drop = None
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None

    def timedOut(self) -> None:
        """The Guard's idle timeout (RFC 1939: the autologout timer; no UPDATE)."""
        self.config.metrics.reject("idle_timeout")
        self._stream = None
        self._close(b"-ERR Disconnected for inactivity.")

    def drain(self) -> None:
        """Shutdown: close now when no command is under way, else after it (nothing is deleted)."""
        if not self._busy and self._stream is None:
            self._close(b"-ERR [SYS/TEMP] Server shutting down.")
        else:
            self._drainWhenIdle = True

    # -- as the transport's producer

    def pauseProducing(self) -> None:
        self._writesPaused = True

    def resumeProducing(self) -> None:
        self._writesPaused = False
        if not self._closed:
            self._process()

    def stopProducing(self) -> None:
        pass

    # -- output

    def _send(self, line: bytes) -> None:
        self._out.append(line + b"\r\n")
        self._outSize += len(line) + 2

    def _flush(self) -> None:
        if self._out and not self._closed:
            data = b"".join(self._out)
            self._out = []
            self._outSize = 0
            self.transport.write(data)

    def _startStream(self, data: bytes) -> None:
        """Send C{data} (a multi-line answer, terminator included) as the transport takes it."""
        self._flush()
        self._stream = memoryview(data)
        self._streamPos = 0

    def _writeStream(self) -> bool:
        """Write the stream while the transport is not paused; True when it is all written."""
        stream = self._stream
        assert stream is not None
        while not self._writesPaused and not self._closed:
            pos = self._streamPos
            if pos >= len(stream):
                break
            self._streamPos = pos + CHUNK
            self.transport.write(bytes(stream[pos:pos + CHUNK]))
        if self._streamPos >= len(stream):
            self._stream = None
            return True
        return False

    def _close(self, line: bytes) -> None:
        if self._closed:
            return
        self._send(line)
        self._flush()
        self._closed = True
        self._stream = None
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
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0
        self._process()

    def _pending(self) -> int:
        return len(self._buf) - self._pos

    def _process(self) -> None:
        if self._processing:  # re-entered (a check fired, the transport resumed us): once more
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
        stalled = (self._busy or self._writesPaused or self._stream is not None) and \
            self._pending() > MAX_HELD_INPUT
        if stalled != self._inputHeld and not self._closed:
            self._inputHeld = stalled
            if stalled:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _processInput(self) -> None:
        while not self._busy and not self._closed and not self._writesPaused:
            if self._stream is not None:
                if not self._writeStream():
                    break
                if self._drainWhenIdle:
                    self._close(b"-ERR [SYS/TEMP] Server shutting down.")
                    break
                continue
            if self._outSize >= OUTPUT_CHUNK:  # pipelined answers: the transport may pause us here
                self._flush()
                continue
            buf, pos = self._buf, self._pos
            if pos >= len(buf):
                break
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_LINE:
                    self._buf, self._pos = b"", 0
                    if not self._skipping:
                        self._lineTooLong()
                    self._skipping = True
                break
            line = buf[pos:nl]
            self._pos = nl + 1
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > MAX_LINE:
                self._lineTooLong()
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._authState is not None:
                state, self._authState = self._authState, None
                state(line)
            else:
                self._command(line)

    def _lineTooLong(self) -> None:
        self._authState = None
        self._error(b"-ERR Line too long.", "line_too_long")

    def _error(self, line: bytes, reason: str) -> None:
        """An error answer; it counts as junk (past the limit the session is closed instead)."""
        self.config.metrics.reject(reason)
        if not self._junk():
            self._send(line)

    def _junk(self) -> bool:
        """Count a junk command; past C{junkLimit}, close the session (True: do not answer it)."""
        self.junk += 1
        if self.junk > self.config.junkLimit:
            self.config.metrics.reject("junk_commands")
            self._close(b"-ERR Too many bad or idle commands; closing.")
            return True
        return False

    def _hold(self) -> None:
        self._busy = True

    def _release(self) -> None:
        self._busy = False
        if self._closed:
            return
        if self._drainWhenIdle and self._stream is None:
            self._close(b"-ERR [SYS/TEMP] Server shutting down.")
            return
        self._flush()
        self._process()

    def _later(self, d: defer.Deferred, done: Callable[[Any], Any], what: str) -> None:
        """
        Hold input until C{d} fires; C{done(result)} answers (unless closed), and
        when it returns a Deferred input stays held until that fires too; a failure
        is -ERR [SYS/TEMP].
        """
        self._hold()

        def ok(result: Any) -> Any:
            if not self._closed:
                return done(result)  # (a Deferred: input stays held until it fires too)
            return None

        def failed(f: Any) -> None:
            log.failure("pop3: {what} failed for {user}", f, what=what, user=self.user)
            if not self._closed:
                self.config.metrics.reject("store_error")
                self._send(b"-ERR [SYS/TEMP] " + what.encode() + b" failed; try again later.")

        d.addCallbacks(ok, failed)
        d.addErrback(lambda f: log.failure("pop3: answering after {what}", f, what=what))
        d.addBoth(lambda _: self._release())

    # -- commands

    _AUTHORIZATION = frozenset({b"CAPA", b"STLS", b"USER", b"PASS", b"AUTH", b"APOP", b"QUIT"})
    _TRANSACTION = frozenset({b"CAPA", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL",
                              b"QUIT"})

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        allowed = self._TRANSACTION if self.drop is not None else self._AUTHORIZATION
        if verb not in allowed:
            known = verb in self._TRANSACTION or verb in self._AUTHORIZATION
            if known and self.drop is None:
                self._error(b"-ERR Log in first.", "not_authenticated")
            elif known:
                self._error(b"-ERR Already logged in.", "bad_sequence")
            else:
                self._error(b"-ERR Unknown command.", "bad_command")
            return
        getattr(self, "do_" + verb.decode("ascii"))(rest.strip(b" "))

    def _number(self, arg: bytes) -> int | None:
        """A message number of the maildrop, not deleted (0-based index), or None (and -ERR sent)."""
        assert self.drop is not None
        if not arg.isdigit() or len(arg) > 9:
            self._error(b"-ERR Bad message number.", "bad_syntax")
            return None
        i = int(arg) - 1
        if not 0 <= i < len(self.drop.messages):
            self._error(b"-ERR There is no message " + arg + b".", "no_message")
            return None
        if i in self.drop.deleted:
            self._error(b"-ERR Message " + arg + b" is deleted.", "deleted")
            return None
        return i

    def capabilities(self) -> list[bytes]:
        caps = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]
        if self.drop is None:
            if self.secure:
                caps += [b"USER", b"SASL PLAIN"]
            elif self.config.tlsOptions is not None:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION netsvc")
        return caps

    def do_CAPA(self, rest: bytes) -> None:
        if self._junk():
            return
        self._send(b"+OK Capability list follows.")
        for cap in self.capabilities():
            self._send(cap)
        self._send(b".")

    def do_STLS(self, rest: bytes) -> None:
        if self.secure:
            self._error(b"-ERR TLS is already active.", "bad_sequence")
            return
        if self.config.tlsOptions is None:
            self._error(b"-ERR STLS is not available.", "bad_command")
            return
        if self._pending():  # read as if it came under TLS (CVE-2011-0411): refuse
            self.config.metrics.reject("pipelining_after_stls")
            self._close(b"-ERR Commands pipelined after STLS; closing.")
            return
        self._send(b"+OK Begin TLS negotiation.")
        self._flush()
        self.transport.startTLS(self.config.tlsOptions())
        self.secure = True
        self.userGiven = None  # RFC 2595 4: forget what was said in clear

    def _plaintext(self) -> bool:
        """Before TLS: refuse (True)."""
        if self.secure:
            return False
        self.config.metrics.login("no_tls")
        self._error(b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections; "
                    b"use STLS first.", "auth_no_tls")
        return True

    def do_USER(self, rest: bytes) -> None:
        if self._plaintext() or self._junk():
            return
        if not rest or len(rest) > 255:
            self._error(b"-ERR Syntax: USER name", "bad_syntax")
            return
        try:
            self.userGiven = rest.decode("utf-8")
        except UnicodeDecodeError:
            self._error(b"-ERR User names are UTF-8.", "bad_syntax")
            return
        self._send(b"+OK Send PASS.")

    def do_PASS(self, rest: bytes) -> None:
        if self._plaintext():
            return
        if self.userGiven is None:
            self._error(b"-ERR USER first.", "bad_sequence")
            return
        user, self.userGiven = self.userGiven, None
        self._checkPassword(user, rest)

    def do_APOP(self, rest: bytes) -> None:
        self._error(b"-ERR [AUTH] APOP is not offered; use STLS, then USER/PASS or AUTH PLAIN.", "bad_command")

    def do_AUTH(self, rest: bytes) -> None:
        if self._plaintext():
            return
        mechanism, _, initial = rest.partition(b" ")
        if not mechanism:  # the pre-RFC 5034 listing some clients ask for
            self._send(b"+OK Mechanisms follow.")
            self._send(b"PLAIN")
            self._send(b".")
            return
        if mechanism.upper() != b"PLAIN":
            self._error(b"-ERR Unsupported authentication mechanism.", "bad_syntax")
            return
        initial = initial.strip()
        if initial:
            self._authPlain(initial)
        else:
            self._authState = self._authPlain
            self._send(b"+ ")

    def _authPlain(self, line: bytes) -> None:
        if line == b"*":
            self._error(b"-ERR Authentication cancelled.", "auth_cancelled")
            return
        try:
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._loginFailed("garbage", reserved=False)
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1] or (parts[0] and parts[0] != parts[1]):
            self._loginFailed("garbage", reserved=False)
            return
        try:
            user = parts[1].decode("utf-8")
        except UnicodeDecodeError:
            self._loginFailed("garbage", reserved=False)
            return
        self._checkPassword(user, parts[2])

    def _checkPassword(self, user: str, password: bytes) -> None:
        try:
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            self._loginFailed("garbage", reserved=False)
            return
        c = self.config
        d = limitedCheck(c.failures, self.host, lambda: c.authenticator.check(user, secret, self.host))
        self._later(d, lambda ok: self._checked(user, ok), "the password check")

    def _checked(self, user: str, ok: Any) -> defer.Deferred | None:
        if isinstance(ok, Refused):
            self.config.metrics.login("rate_limited" if ok.reason == "rate" else "busy")
            if ok.reason == "rate":
                self._error(b"-ERR [SYS/TEMP] Too many failed logins; try again in %d seconds."
                            % int(ok.retryAfter), "auth_rate")
            else:
                self._send(b"-ERR [SYS/TEMP] Temporary authentication failure; try again later.")
            return None
        if ok is not True:
            self._loginFailed("failed", reserved=True)
            return None
        return self._open(user)

    def _loginFailed(self, kind: str, reserved: bool) -> None:
        """A failed login; C{reserved}: its failure was taken from the client's allowance before the check."""
        c = self.config
        c.metrics.login(kind)
        c.metrics.reject("auth_" + kind)
        if not reserved and c.failures is not None:
            c.failures.reserve(self.host)  # (garbage is a failure too; spent or not, it is counted)
        self.failures += 1
        log.info("pop3: login failed from {client} ({kind})", client=self.host, kind=kind)
        if self.failures >= c.authPerSession:
            self._close(b"-ERR [AUTH] Authentication failed; too many failures, closing.")
        else:
            self._send(b"-ERR [AUTH] Authentication failed.")

    def _open(self, user: str) -> defer.Deferred:
        """The maildrop of C{user}, opened in a thread; the answer once it is (or -ERR)."""
        c = self.config
        name = c.mailboxName(user)

        def openDrop() -> _Drop:
            folder = c.store.inbox(name)
            return _Drop(folder, list(folder.messages()))

        def opened(drop: _Drop) -> None:
            self.user = name
            self.drop = drop
            self.junk = 0
            c.metrics.login("ok")
            log.info("pop3: {client} logged in as {user}", client=self.host, user=name)
            total = sum(m.size for m in drop.messages)
            self._send(b"+OK Logged in; %d messages (%d octets)." % (len(drop.messages), total))

        def failed(f: Any) -> None:
            if f.check(InvalidName):  # a user the directory knows whose name cannot be a folder
                log.warn("pop3: {user} logged in but has no mailbox: {error}", user=name, error=str(f.value))
                if not self._closed:
                    c.metrics.reject("no_mailbox")
                    self._send(b"-ERR [SYS/PERM] There is no mailbox for this user.")
                return
            log.failure("pop3: opening the mailbox of {user} failed", f, user=name)
            if not self._closed:
                c.metrics.reject("store_error")
                self._send(b"-ERR [SYS/TEMP] Cannot open the mailbox; try again later.")

        return c.run(openDrop).addCallbacks(lambda drop: None if self._closed else opened(drop), failed)

    def do_STAT(self, rest: bytes) -> None:
        assert self.drop is not None
        live = self.drop.live()
        self._send(b"+OK %d %d" % (len(live), sum(m.size for _, m in live)))

    def do_LIST(self, rest: bytes) -> None:
        self._listing(rest, lambda n, m: b"%d %d" % (n, m.size))

    def do_UIDL(self, rest: bytes) -> None:
        assert self.drop is not None
        v = self.drop.uidvalidity
        self._listing(rest, lambda n, m: b"%d %s" % (n, uniqueId(m.uid, v).encode()))

    def _listing(self, rest: bytes, entry: Callable[[int, Any], bytes]) -> None:
        assert self.drop is not None
        if rest:
            i = self._number(rest)
            if i is not None:
                self._send(b"+OK " + entry(i + 1, self.drop.messages[i]))
            return
        live = self.drop.live()
        lines = [b"+OK %d messages" % len(live)]
        lines += [entry(n, m) for n, m in live]
        lines.append(b".\r\n")
        self._startStream(b"\r\n".join(lines))

    def do_RETR(self, rest: bytes) -> None:
        i = self._number(rest)
        if i is not None:
            self._sendMessage(i, None)

    def do_TOP(self, rest: bytes) -> None:
        number, _, count = rest.partition(b" ")
        count = count.strip(b" ")
        if not count.isdigit() or len(count) > 9:
            self._error(b"-ERR Syntax: TOP message lines", "bad_syntax")
            return
        i = self._number(number)
        if i is not None:
            self._sendMessage(i, int(count))

    def _sendMessage(self, i: int, top: int | None) -> None:
        drop = self.drop
        assert drop is not None
        message = drop.messages[i]

        def read() -> bytes | None:
            try:
                data = drop.folder.read(message.uid)
            except NoSuchMessage:
                return None
            return toWire(data) if top is None else topLines(data, top)

        def send(wire: bytes | None) -> None:
            if wire is None:
                self._error(b"-ERR Message %d was removed by another session." % (i + 1), "no_message")
                return
            if top is None:
                self.config.metrics.retrieved.inc()
                self._send(b"+OK %d octets" % message.size)
            else:
                self._send(b"+OK Top of message follows.")
            self._startStream(wire)

        self._later(self.config.run(read), send, "reading the message")

    def do_DELE(self, rest: bytes) -> None:
        i = self._number(rest)
        if i is not None:
            assert self.drop is not None
            self.drop.deleted.add(i)
            self._send(b"+OK Marked to be deleted.")

    def do_NOOP(self, rest: bytes) -> None:
        if not self._junk():
            self._send(b"+OK")

    def do_RSET(self, rest: bytes) -> None:
        if self._junk():
            return
        assert self.drop is not None
        self.drop.deleted.clear()
        self._send(b"+OK")

    def do_QUIT(self, rest: bytes) -> None:
        drop = self.drop
        if drop is None or not drop.deleted:
            self._close(b"+OK Logging out.")
            return
        uids = [drop.messages[i].uid for i in sorted(drop.deleted)]
        self._hold()

        def removed(_: Any) -> None:
            self.config.metrics.deleted.inc(len(uids))
            log.info("pop3: {user} deleted {n} messages", user=self.user, n=len(uids))
            self._close(b"+OK Logging out, messages deleted.")

        def failed(f: Any) -> None:
            log.failure("pop3: removing messages of {user} failed", f, user=self.user)
            self.config.metrics.reject("store_error")
            self._close(b"-ERR [SYS/TEMP] Some deleted messages were not removed.")

        # (the UPDATE state: from here the removal goes on even if the client goes away)
        self.config.run(drop.folder.remove, uids).addCallbacks(removed, failed)


class POP3Factory(Factory):
    """Builds sessions for one listener."""

    noisy = False

    def __init__(self, config: POP3Config) -> None:
        self.config = config

    def buildProtocol(self, addr: Any) -> POP3Session:
        return POP3Session(self.config)

    def refusalProtocol(self, reason: str) -> Protocol:
        return _Refusal(reason, self.config.clock)


class _Refusal(Protocol):
    """A connection over the Guard's limits: C{-ERR [SYS/TEMP]}, then close (aborted if it never goes)."""

    def __init__(self, reason: str, clock: Any) -> None:
        self.reason = reason
        self.clock = clock
        self._abortCall: Any = None

    def connectionMade(self) -> None:
        text = b"Server shutting down." if self.reason == "shutdown" else b"Too many connections; try again later."
        self.transport.write(b"-ERR [SYS/TEMP] " + text + b"\r\n")
        self.transport.loseConnection()
        self._abortCall = self.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason: Any = None) -> None:
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
