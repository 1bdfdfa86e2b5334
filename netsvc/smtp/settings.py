"""
C{services.smtp} settings: listeners, relay policy, the queue and the limits.

    services:
      smtp:
        listen:
          - "tcp:2525:interface=127.0.0.1"                                 # relay port: mynetworks or AUTH
          - {endpoint: "tcp:2587:interface=127.0.0.1", submission: true}   # STARTTLS, then AUTH required
          - {endpoint: "tls:2465:interface=127.0.0.1", submission: true}   # implicit TLS
        hostname: mail.lab
        mynetworks: ["127.0.0.0/8", "::1/128"]
        users: users.txt                # a netsvc.auth user source
        relay: {capture: true}          # or {smarthost: ..., starttls: required, auth: {...}} or {mx: true}
                                        # (auth needs verified TLS: starttls required or a tls: smarthost)
        queue: {dir: queue, max_age: 5d, retry: [5m, 10m, 20m, 40m, 1h], delay_warning: 4h,
                concurrency: 20, fsync: true}
        max_message_size: 25MB
        max_recipients: 100
        max_messages_per_session: 100
        junk_command_limit: 100         # NOOP/RSET/VRFY/EXPN/HELP per session (per message), then 421
        local:                          # mail for these domains goes to the users' Maildirs (netsvc.smtp.local)
          domains: [lab.test, localhost]
          maildir: mail                 # relative to state_dir (like queue.dir): mail/<user>/{cur,new,tmp}
          aliases: {postmaster: dev, root: dev, team: [alice, bob], ops: oncall@example.org}

The Python shape (C{Settings.relay.mode}, C{Settings.queue.retry}, ...) is the
contract the delivery side relies on (see the team's SMTP.md).
"""

from __future__ import annotations

from typing import Any, Literal

from netsvc import endpoints
from netsvc.auth import UserSource
from netsvc.config import Duration, Limits, Listener, ServiceSettings, Size, field, frozen


@frozen
class SMTPListener(Listener):
    #: A submission port (587/465 style): AUTH is required (after STARTTLS on plain TCP).
    submission: bool = field(False)


@frozen
class RelayAuth:
    """Credentials for the smarthost (the password is read from a file, never the config)."""

    user: str = field()
    password_file: str = field()
    #: The password goes only over verified TLS (STARTTLS required, or a tls:
    #: smarthost, with the certificate checked).  Set to send it anyway -- after an
    #: unchecked STARTTLS, or in clear text (starttls: opportunistic or none,
    #: insecure=yes): anyone on the path can then read it.
    insecure_send_password_without_verified_tls: bool = field(False)


@frozen
class RelaySettings:
    """Where accepted mail goes: kept (capture), to one smarthost, or by MX.  Exactly one."""

    #: Keep every message under state_dir/captured/ (nothing leaves the machine).
    capture: bool = field(False)
    #: Capture mode keeps at most this many messages (the oldest are removed first).
    keep: int = field(10000, min=1, max=10_000_000)
    #: A client endpoint, e.g. C{tcp:host=smtp.example:port=587} or C{tls:host=smtp.example:port=465}.
    smarthost: str | None = field(None)
    #: Deliver by MX lookup (through netsvc's resolver).
    mx: bool = field(False)
    #: The port for MX delivery (settable so tests can use a high port).
    port: int = field(25, min=1, max=65535)
    starttls: Literal["required", "opportunistic", "none"] = field("opportunistic")
    #: PEM CA bundle to verify the peer with (default: the system's trust store).
    cacert: str | None = field(None)
    auth: RelayAuth | None = field(None)

    @property
    def mode(self) -> Literal["capture", "smarthost", "mx"]:
        if self.smarthost is not None:
            return "smarthost"
        if self.mx:
            return "mx"
        return "capture"

    def check(self) -> list[tuple[str, str]]:
        chosen = [k for k, on in (("capture", self.capture), ("smarthost", self.smarthost is not None),
                                  ("mx", self.mx)) if on]
        problems = []
        if len(chosen) > 1:
            problems.append(("", f"choose one of capture, smarthost, mx (got {', '.join(chosen)})"))
        if self.smarthost is not None:
            try:
                endpoints.validateClient(self.smarthost)
            except endpoints.EndpointError as e:
                problems.append(("smarthost", str(e)))
        if self.auth is not None and self.smarthost is None:
            problems.append(("auth", "only used with a smarthost"))
        elif self.auth is not None and not self.auth.insecure_send_password_without_verified_tls:
            problems += self._passwordProblems()
        return problems

    @property
    def implicitTLS(self) -> bool:
        """A C{tls:}/C{ssl:} smarthost (TLS from the first byte)."""
        if self.smarthost is None:
            return False
        try:
            return endpoints.parseClient(self.smarthost).kind == "tls"
        except endpoints.EndpointError:
            return False

    def _passwordProblems(self) -> list[tuple[str, str]]:
        """With auth: the password goes only over TLS whose certificate is checked."""
        optOut = "auth: {..., insecure_send_password_without_verified_tls: true}"
        try:
            if self.implicitTLS:
                if endpoints.parseClient(self.smarthost).insecure:  # type: ignore[arg-type]
                    return [("smarthost", f"insecure=yes would send the smarthost password to whoever answers "
                                          f"(the certificate is not checked): give cafile= instead, or write "
                                          f"{optOut}")]
                return []
        except (endpoints.EndpointError, ValueError):
            return []  # reported above
        if self.starttls != "required":
            what = ("encrypts without checking the certificate and falls back to clear text"
                    if self.starttls == "opportunistic" else "sends it in clear text")
            return [("starttls", f"with auth the smarthost password goes only over verified TLS: starttls "
                                 f"{self.starttls} {what}; set starttls: required (with cacert: for a private CA) "
                                 f"or use a tls: smarthost, or write {optOut}")]
        return []


@frozen
class QueueSettings:
    #: Relative to state_dir.
    dir: str = field("queue")
    #: After this long undelivered, a message bounces to its sender.
    max_age: Duration = field(Duration(5 * 86400), min=1)
    #: Waits between attempts; the last one repeats.
    retry: list[Duration] = field(factory=lambda: [Duration(s) for s in (300, 600, 1200, 2400, 3600)])
    #: Warn the sender once a message has waited this long (0: never).
    delay_warning: Duration = field(Duration(4 * 3600), min=0)
    #: Deliveries in progress at once.
    concurrency: int = field(20, min=1, max=1000)
    #: fsync message, envelope and folder before the 250 (turn off only for throwaway tests).
    fsync: bool = field(True)

    def check(self) -> list[tuple[str, str]]:
        if not self.retry:
            return [("retry", "needs at least one wait")]
        if any(r <= 0 for r in self.retry):
            return [("retry", "waits must be positive")]
        return []


class AliasTargets(tuple):
    """
    What one alias expands to: a name (a local user or another alias), a full
    address (at a local domain: the same as its name; elsewhere: relayed by the
    routes of C{relay}), or a list of them (a string with commas is split, as in
    /etc/aliases).
    """

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: Any) -> Any:
        from netsvc.config import Invalid

        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if not isinstance(item, str):
                raise Invalid("expected a name, an address or a list of them")
            out += [part.strip() for part in item.split(",") if part.strip()]
        if not out:
            raise Invalid("expected at least one name or address")
        return cls(out)


@frozen
class LocalSettings:
    """
    Local delivery (C{services.smtp.local}): mail for C{domains} is written to
    the users' Maildirs under C{state_dir/maildir} before the 250; see
    L{netsvc.smtp.local}.  The local users are the names of C{users:} plus the
    alias names; C{postmaster} must be an alias (RFC 5321 4.5.1), or
    C{postmaster: postmaster} for a user of that name.
    """

    domains: list[str] = field()
    #: Relative to state_dir, like queue.dir.
    maildir: str = field("mail")
    #: name -> targets (see L{AliasTargets}); names are compared case-insensitively.
    aliases: dict[str, AliasTargets] = field(factory=dict)
    #: C{bob+tag@} is delivered to bob (Postfix's recipient_delimiter); "" turns it off.
    recipient_delimiter: str = field("+")
    #: In capture mode: a local user whose INBOX also gets a copy of every captured message (mail for
    #: other domains), so that it can be read over IMAP and POP3 as well as at /mail/.  None: nobody.
    captured: str | None = field(None)

    def check(self) -> list[tuple[str, str]]:
        from netsvc.smtp.local import aliasProblems
        from netsvc.smtp.syntax import validDomain

        problems = []
        if not self.domains:
            problems.append(("domains", "needs at least one domain"))
        for i, domain in enumerate(self.domains):
            if domain.startswith("[") or not validDomain(domain):
                problems.append((f"domains[{i}]", f"{domain!r} is not a domain name"))
        if len(self.recipient_delimiter) > 1 or self.recipient_delimiter in ("@", "."):
            problems.append(("recipient_delimiter", "one character (not @ or .), or \"\" for none"))
        if not self.maildir:
            problems.append(("maildir", "needs a folder"))
        if self.captured is not None:
            from netsvc.mailbox.maildir import InvalidName, normaliseUser

            try:
                normaliseUser(self.captured)
            except InvalidName as e:
                problems.append(("captured", f"{e}: a user name of services.smtp.users"))
        problems += aliasProblems(self.aliases, self.domains, self.recipient_delimiter)
        return problems


@frozen
class AuthLimits:
    """Failed AUTH attempts: per session, then per client IP (a token bucket)."""

    #: Failures in one session before it is closed (421).
    per_session: int = field(3, min=1, max=100)
    #: Failures allowed per client IP: C{burst} at once, then C{rate} per second.
    rate: float = field(0.1, min=0)
    burst: int = field(10, min=1)


@frozen
class Settings(ServiceSettings):
    listen: list[SMTPListener] = field(factory=lambda: [SMTPListener(endpoint="tcp:2525:interface=127.0.0.1")])
    #: Banner, EHLO and Received name.
    hostname: str = field("localhost")
    #: Clients in these networks may relay without AUTH.
    mynetworks: list[str] = field(factory=lambda: ["127.0.0.0/8", "::1/128"])
    users: UserSource | None = field(None)
    relay: RelaySettings = field(factory=lambda: RelaySettings(capture=True))
    #: Local delivery to Maildirs (None: every domain takes the relay's routes).
    local: LocalSettings | None = field(None)
    queue: QueueSettings = field(factory=QueueSettings)
    max_message_size: Size = field(Size(25 * 10**6), min=1024, max=1 << 31)
    #: Recipients per message (RFC 5321 4.5.3.1.8: at least 100 must be accepted).
    max_recipients: int = field(100, min=1, max=100_000)
    max_messages_per_session: int = field(100, min=1, max=100_000)
    #: Longest text line in DATA including CRLF (RFC 5321 4.5.3.1.6: 1000).
    max_line_length: int = field(1000, min=1000, max=1 << 20)
    auth_failures: AuthLimits = field(factory=AuthLimits)
    #: NOOP, RSET, VRFY, EXPN and HELP allowed per session, counted again after each accepted message
    #: (Postfix's smtpd_junk_command_limit); the next one is answered 421 and the session closed.
    junk_command_limit: int = field(100, min=1, max=1_000_000)
    #: rate/burst: messages per second per client IP; max_message is unused (see max_message_size).
    limits: Limits = field(factory=lambda: Limits(
        max_connections=1024, max_connections_per_ip=64, idle_timeout=Duration(300), rate=50, burst=200))

    def check(self) -> list[tuple[str, str]]:
        from netsvc.policies import parseNetworks
        from netsvc.smtp.syntax import validDomain

        problems = super().check()
        try:
            parseNetworks(self.mynetworks)
        except ValueError as e:
            problems.append(("mynetworks", str(e)))
        if not self.listen:
            problems.append(("listen", "needs at least one listener"))
        if self.hostname.startswith("[") or not validDomain(self.hostname):
            problems.append(("hostname", f"{self.hostname!r} is not a host name (banner, EHLO, Received, Message-ID)"))
        for i, listener in enumerate(self.listen):
            if endpoints.isDatagram(listener.endpoint):
                problems.append((f"listen[{i}]", "SMTP does not run over UDP"))
        if any(l.submission for l in self.listen) and self.users is None:
            problems.append(("users", "submission listeners require AUTH: set users"))
        if self.local is not None and self.users is None:
            problems.append(("local", "local delivery needs users (the local users are its names)"))
        if self.local is not None and self.local.captured is not None and self.relay.mode != "capture":
            problems.append(("local.captured", "only in capture mode (relay: {capture: true}): nothing is "
                                               "captured otherwise"))
        return problems
