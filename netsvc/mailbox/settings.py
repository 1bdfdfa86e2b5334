"""
C{services.mailbox} settings: IMAP and POP3 listeners over the users' Maildirs.

    services:
      mailbox:
        listen:
          - {endpoint: "tcp:1143:interface=127.0.0.1", protocol: imap}   # STARTTLS, then LOGIN/AUTHENTICATE
          - {endpoint: "tls:1993:interface=127.0.0.1", protocol: imap}   # implicit TLS
          - {endpoint: "tcp:1110:interface=127.0.0.1", protocol: pop3}   # STLS, then USER/PASS or AUTH PLAIN
          - {endpoint: "tls:1995:interface=127.0.0.1", protocol: pop3}
        users: mail-users.txt           # the same user sources as SMTP AUTH: a file, {ldap: ...}, {directory: true}
        maildir: mail                   # relative to state_dir: the folder SMTP local delivery writes
        fsync: true                     # APPEND, flag changes and deletions are durable before the answer
        max_message_size: 25MB          # IMAP APPEND larger than this: refused with the protocol's error
        auth_failures: {per_session: 3, rate: 0.1, burst: 10}
        junk_command_limit: 100         # NOOP/RSET/USER/CAPA and errors per session, then -ERR/BYE and close
        imap_idle_timeout: 30m          # one IMAP IDLE lasts at most this long (RFC 2177: clients renew by 29m)
        limits: {max_connections: 1024, max_connections_per_ip: 32, idle_timeout: 30m}

Passwords are accepted only under TLS: on a plain listener after STARTTLS
(IMAP) or STLS (POP3), on a C{tls:} listener at once.  The idle timeout is at
least what the RFCs ask of a server (POP3 10 minutes, IMAP 30 minutes) by
default; a shorter one is allowed.
"""

from __future__ import annotations

from typing import Literal

from netsvc import endpoints
from netsvc.auth import UserSource
from netsvc.config import Duration, Limits, Listener, ServiceSettings, Size, field, frozen

#: The default listeners: both protocols, plain (STARTTLS/STLS) and implicit TLS, on loopback.
DEFAULT_LISTEN = (("tcp:1143:interface=127.0.0.1", "imap"), ("tls:1993:interface=127.0.0.1", "imap"),
                  ("tcp:1110:interface=127.0.0.1", "pop3"), ("tls:1995:interface=127.0.0.1", "pop3"))


@frozen
class MailboxListener(Listener):
    """One C{listen:} entry: an endpoint and the protocol spoken there."""

    protocol: Literal["imap", "pop3"] = field()


@frozen
class AuthFailures:
    """Failed logins: per session, then per client IP (reserved before the password is checked)."""

    #: Failures in one session before it is closed.
    per_session: int = field(3, min=1, max=100)
    #: Failures allowed per client IP: C{burst} at once, then C{rate} per second (0: no per-IP limit).
    rate: float = field(0.1, min=0)
    burst: int = field(10, min=1, max=100_000)


@frozen
class Settings(ServiceSettings):
    listen: list[MailboxListener] = field(factory=lambda: [MailboxListener(endpoint=e, protocol=p)
                                                           for e, p in DEFAULT_LISTEN])
    #: Who may log in (required): the same kinds of source as C{services.smtp.users}.
    users: UserSource | None = field(None)
    #: The users' Maildirs, C{<maildir>/<user>/}, relative to state_dir.
    maildir: str = field("mail")
    #: fsync what changes a mailbox (APPEND, flags, expunge, POP3 deletions) before answering.
    fsync: bool = field(True)
    #: The largest message IMAP APPEND takes (the literal is refused before it is read).
    max_message_size: Size = field(Size(25 * 10**6), min=1024, max=1 << 31)
    auth_failures: AuthFailures = field(factory=AuthFailures)
    #: Junk per session (POP3: NOOP, RSET, USER, CAPA and commands answered -ERR); then the session is closed.
    junk_command_limit: int = field(100, min=1, max=1_000_000)
    #: The longest one IMAP IDLE may last before the server ends it (RFC 2177).
    imap_idle_timeout: Duration = field(Duration(1800), min=1, max=86400)
    #: idle_timeout: RFC 1939 asks at least 10 minutes of POP3, RFC 3501 30 minutes of IMAP (authenticated).
    #: max_message is unused: command lines are bounded by each protocol (POP3 2 KiB, IMAP its MAX_LENGTH),
    #: APPEND by max_message_size.
    limits: Limits = field(factory=lambda: Limits(
        max_connections=1024, max_connections_per_ip=32, idle_timeout=Duration(1800), max_message=Size(65536)))

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        if not self.listen:
            problems.append(("listen", "needs at least one listener"))
        for i, listener in enumerate(self.listen):
            if endpoints.isDatagram(listener.endpoint):
                problems.append((f"listen[{i}]", f"{listener.protocol.upper()} does not run over UDP"))
        if self.users is None:
            problems.append(("users", "required: who may log in (a users file, {ldap: ...} or "
                                      "{directory: true}, as services.smtp.users)"))
        if not self.maildir or self.maildir.strip() != self.maildir:
            problems.append(("maildir", f"expected a folder name, got {self.maildir!r}"))
        return problems
