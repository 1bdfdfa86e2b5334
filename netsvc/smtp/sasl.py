"""
SMTP AUTH (RFC 4954) for the server session: PLAIN (RFC 4616) and LOGIN, only
under TLS, checked by a L{netsvc.auth.Authenticator} (off the reactor).

Failures -- a wrong password or a garbage response (bad base64, no NULs, an
authzid that is not the user) -- answer 535 5.7.8, are counted in the metrics,
close the session after C{authPerSession} of them (421) and take a token from
the client IP's bucket (C{authFailures}); with the bucket empty, AUTH answers
454 4.7.0 without checking anything.  The token is reserved before the password
is checked and given back when it was right (so parallel sessions from one
address cannot all pass a bucket that none of them has emptied yet); a check the
hashing pool refused (busy, L{netsvc.auth.Refused}) gives it back too and
answers 454 4.7.0 Temporary authentication failure.

A mixin of L{netsvc.smtp.protocol.SMTPSession}: it uses the session's config,
reply queue (C{_send}, C{_error}, C{_close}) and input hold (C{_hold}, C{_release}).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from netsvc.auth import Refused

log = Logger()


class AuthCommands:
    """The AUTH command and its continuation lines."""

    config: Any
    host: str
    helo: str | None
    esmtp: bool
    secure: bool
    user: str | None
    mailFrom: str | None
    authFailures: int
    _closed: bool
    _authState: Callable[[bytes], None] | None
    _send: Callable[..., None]
    _error: Callable[..., None]
    _close: Callable[..., None]
    _hold: Callable[[], None]
    _release: Callable[[], None]

    def do_AUTH(self, rest: bytes) -> None:
        c = self.config
        if c.authenticator is None:
            self._error(502, "5.5.1", "Error: authentication not enabled", "bad_command")
            return
        if not self.secure:
            self.config.metrics.auth("no_tls")
            self._error(538, "5.7.11", "Encryption required for requested authentication mechanism", "auth_no_tls")
            return
        if self.helo is None or not self.esmtp:
            self._error(503, "5.5.1", "Error: send EHLO first", "bad_sequence")
            return
        if self.user is not None:
            self._error(503, "5.5.1", "Error: already authenticated", "bad_sequence")
            return
        if self.mailFrom is not None:
            self._error(503, "5.5.1", "Error: MAIL transaction in progress", "bad_sequence")
            return
        mechanism, _, initial = rest.partition(b" ")
        mechanism = mechanism.upper()
        if mechanism not in (b"PLAIN", b"LOGIN"):
            self._error(504, "5.5.4", "Error: unsupported authentication mechanism", "bad_syntax")
            return
        if c.authFailures is not None and c.authFailures.available(self.host) < 1:
            self._rateLimited()  # early, to spare the exchange; the token is taken before the check
            return
        initial = initial.strip()
        if mechanism == b"PLAIN":
            if initial:
                self._authPlain(initial)
            else:
                self._authState = self._authPlain
                self._send(334, None, "")
        else:
            if initial:
                self._authLoginUser(initial)
            else:
                self._authState = self._authLoginUser
                self._send(334, None, "VXNlcm5hbWU6")  # "Username:"

    def _decode(self, line: bytes) -> bytes | None:
        """A base64 AUTH response; None (and the session answered) when cancelled or garbage."""
        self._authState = None
        if line == b"*":
            self._send(501, "5.0.0", "Authentication cancelled")
            return None
        if line == b"=":
            return b""
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._authFailed("garbage")
            return None

    def _authPlain(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is None:
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._authFailed("garbage")
            return
        authzid, user, password = parts
        if authzid and authzid != user:
            self._authFailed("authzid")
            return
        self._checkPassword(user, password)

    def _authLoginUser(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is None:
            return
        if not decoded:
            self._authFailed("garbage")
            return
        self._authState = lambda l: self._authLoginPassword(decoded, l)
        self._send(334, None, "UGFzc3dvcmQ6")  # "Password:"

    def _authLoginPassword(self, user: bytes, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is not None:
            self._checkPassword(user, decoded)

    def _checkPassword(self, user: bytes, password: bytes) -> None:
        try:
            name, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            self._authFailed("garbage")
            return
        limit, host = self.config.authFailures, self.host
        if limit is not None and not limit.allow(host):  # reserve first: a failure is paid before the check
            self._rateLimited()
            return
        self._hold()
        d = defer.maybeDeferred(self.config.authenticator.check, name, secret)

        def done(ok: Any) -> None:
            if ok is True or isinstance(ok, Refused):
                if limit is not None:
                    limit.refund(host)
            if self._closed:
                return
            if ok is True:
                self.user = name
                self.config.metrics.auth("ok")
                self._send(235, "2.7.0", "Authentication successful")
                log.info("smtp: {client} authenticated as {user}", client=self.host, user=name)
            elif isinstance(ok, Refused):
                self.config.metrics.auth("busy" if ok.reason == "busy" else "rate_limited")
                self._send(454, "4.7.0", "Temporary authentication failure")
            else:
                self._authFailed("failed", reserved=True)
            self._release()

        def failed(f: Any) -> None:
            log.failure("smtp: authenticator failed", f)
            if not self._closed:
                self._send(454, "4.7.0", "Temporary authentication failure")
                self._release()

        d.addCallbacks(done, failed)

    def _rateLimited(self) -> None:
        self._authState = None
        self.config.metrics.auth("rate_limited")
        # an error like any other: a session looping on it is closed after MAX_ERRORS
        self._error(454, "4.7.0", "Too many failed authentication attempts; try again later", "auth_rate")

    def _authFailed(self, kind: str, reserved: bool = False) -> None:
        """A failed attempt; C{reserved}: its token was already taken from the client's bucket."""
        self._authState = None
        c = self.config
        c.metrics.auth("failed")
        c.metrics.reject("auth_" + kind)
        if c.authFailures is not None and not reserved:
            c.authFailures.allow(self.host)
        self.authFailures += 1
        log.info("smtp: AUTH failed from {client} ({kind})", client=self.host, kind=kind)
        if self.authFailures >= c.authPerSession:
            self._close(421, "4.7.0", f"{c.hostname} Error: too many failed authentication attempts")
        else:
            self._send(535, "5.7.8", "Authentication credentials invalid")
