"""
What the SMTP sessions of a listener share (L{ServerConfig}: the store, the
authenticator, the TLS context, the limits), the SMTP counters, and the reply
format (with enhanced status codes, RFC 2034/3463).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from netsvc.metrics import Registry
from netsvc.policies import AccessList, RateLimiter


class SMTPMetrics:
    """The SMTP-specific counters (connections and bytes are the Guard's)."""

    def __init__(self, registry: Registry, service: str = "smtp") -> None:
        s = {"service": service}
        self.service = service
        self.sessions = registry.counter("netsvc_smtp_sessions_total", "SMTP sessions started.",
                                         ["service"]).labels(**s)
        self.accepted = registry.counter("netsvc_smtp_messages_accepted_total",
                                         "Messages accepted (durably queued, 250 sent).", ["service"]).labels(**s)
        self.bytes = registry.counter("netsvc_smtp_message_bytes_total", "Bytes of accepted messages.",
                                      ["service"]).labels(**s)
        self._rejects = registry.counter("netsvc_smtp_rejects_total", "Commands or messages refused, by reason.",
                                         ["service", "reason"])
        self._auth = registry.counter("netsvc_smtp_auth_total", "AUTH attempts, by result.", ["service", "result"])

    def reject(self, reason: str) -> None:
        self._rejects.labels(service=self.service, reason=reason).inc()

    def auth(self, result: str) -> None:
        self._auth.labels(service=self.service, result=result).inc()


@attrs.define
class ServerConfig:
    """What sessions of one listener share."""

    hostname: str
    #: Has C{newMessage()} -> an object with write/commit(envelope)/abort (L{netsvc.smtp.queue.Queue}).
    queue: Any
    metrics: SMTPMetrics
    clock: Any
    mynetworks: list[str] = attrs.field(factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: A L{netsvc.auth.Authenticator}, or None: no AUTH.
    authenticator: Any = None
    #: Returns the TLS context factory for STARTTLS; None: no STARTTLS.
    tlsOptions: Callable[[], Any] | None = None
    submission: bool = False
    maxSize: int = 25_000_000
    maxRecipients: int = 100
    maxMessages: int = 100
    maxLine: int = 1000
    authPerSession: int = 3
    #: NOOP/RSET/VRFY/EXPN/HELP per session (again from 0 after each accepted message); then 421.
    junkLimit: int = 100
    #: Failed AUTH per client IP, and MAIL transactions per client IP (token buckets).
    authFailures: RateLimiter | None = None
    messageRate: RateLimiter | None = None
    #: Called with each accepted message's queue id.
    onAccepted: Callable[[str], None] | None = None
    #: A L{netsvc.smtp.local.LocalDelivery} (its C{router} decides at RCPT); None: no local domains.
    local: Any = None
    trusted: AccessList | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.trusted = AccessList(self.mynetworks) if self.mynetworks else None

    def isTrusted(self, host: str) -> bool:
        return self.trusted is not None and self.trusted.permits(host)


def reply(code: int, status: str | None, text: str) -> bytes:
    """One reply; C{text} may hold several lines (a multi-line reply)."""
    lines = text.split("\n")
    prefix = f"{code} {status} " if status else f"{code} "
    dash = f"{code}-{status} " if status else f"{code}-"
    out = [(dash if i < len(lines) - 1 else prefix) + line for i, line in enumerate(lines)]
    return ("\r\n".join(out) + "\r\n").encode("utf-8")
