"""
C{services.forward} settings: a list of rules, each listeners -> backends.

    services:
      forward:
        rules:
          - name: web
            listen: ["tcp:8080:interface=127.0.0.1"]
            connect: ["tcp:host=10.0.0.5:port=80", "tcp:host=10.0.0.6:port=80"]
            balance: roundrobin          # first | leastconn | random
            connect_timeout: 5s
            idle_timeout: 10m
            max_connections: 4096
            allow: [10.0.0.0/8]
            bandwidth: {per_connection: 1MiB, per_rule: 10MiB}   # bytes/s each way
            send_proxy: v2               # or v1
            accept_proxy: false          # true: a PROXY header comes first, and only from...
            trusted_proxies: []          # ...these senders (CIDRs, like nginx's set_real_ip_from)
            health: {interval: 2s, fall: 3, rise: 2}
          - name: dns-udp
            listen: ["udp:5300:interface=127.0.0.1"]
            connect: ["udp:host=10.0.0.53:port=53"]
            udp: {idle_timeout: 30s, max_associations: 4096, responses: 1}
"""

from __future__ import annotations

from typing import Literal

from netsvc import endpoints
from netsvc.config import DatagramListener, Duration, Limits, ServiceSettings, Size, field, frozen
from netsvc.policies import networkProblems


@frozen
class ForwardListener(DatagramListener):
    """A listener of a rule; the mapping form may set C{accept_proxy} for it alone."""

    accept_proxy: bool | None = field(None)


@frozen
class Health:
    """Active health checks: a connect (and optional send/expect) every C{interval}."""

    interval: Duration = field(Duration(2), min=0.05, max=86400)
    #: How long one check may take (default: the rule's connect_timeout).
    timeout: Duration | None = field(None)
    #: Consecutive failures that mark a backend down, successes that mark it up again.
    fall: int = field(3, min=1, max=1000)
    rise: int = field(2, min=1, max=1000)
    #: Optional: bytes to send once connected (escapes: \r \n \t \\ \xNN)...
    send: str | None = field(None)
    #: ...and text the answer must contain (checked within the timeout).
    expect: str | None = field(None)


@frozen
class BandwidthSettings:
    """Bytes per second, each direction counted separately; 0: unlimited."""

    per_connection: Size = field(Size(0), min=0)
    per_rule: Size = field(Size(0), min=0)


@frozen
class UDPSettings:
    """UDP rules: one backend association (its own socket) per client address."""

    idle_timeout: Duration = field(Duration(60), min=0.01)
    max_associations: int = field(4096, min=1, max=1_000_000)
    #: Close an association after this many answers (DNS: 1); 0: only on idle.
    responses: int = field(0, min=0)


@frozen
class Rule:
    name: str = field()
    listen: list[ForwardListener] = field()
    connect: list[str] = field()
    balance: Literal["roundrobin", "first", "leastconn", "random"] = field("roundrobin")
    connect_timeout: Duration = field(Duration(5), min=0.01, max=3600)
    #: Close a connection with no traffic either way for this long (0: never).
    idle_timeout: Duration = field(Duration(600), min=0)
    max_connections: int = field(4096, min=1, max=1_000_000)
    allow: list[str] = field(factory=list)
    deny: list[str] = field(factory=list)
    bandwidth: BandwidthSettings = field(factory=BandwidthSettings)
    send_proxy: Literal["v1", "v2"] | None = field(None)
    accept_proxy: bool = field(False)
    #: Who may send a PROXY header (CIDRs; nginx's C{set_real_ip_from}).  Required with
    #: C{accept_proxy}: no sender is trusted unless listed; anyone else is refused.
    trusted_proxies: list[str] = field(factory=list)
    health: Health | None = field(None)
    udp: UDPSettings = field(factory=UDPSettings)

    @property
    def datagram(self) -> bool:
        return bool(self.listen) and endpoints.isDatagram(self.listen[0].endpoint)

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            problems.append(("name", f"use letters, digits, '-', '_' or '.', got {self.name!r}"))
        if not self.listen:
            problems.append(("listen", "at least one listener is needed"))
        if not self.connect:
            problems.append(("connect", "at least one backend is needed"))
        kinds = set()
        for i, description in enumerate(self.connect):
            try:
                kinds.add(endpoints.validateClient(description))
            except endpoints.EndpointError as e:
                problems.append((f"connect[{i}]", str(e)))
        listenKinds = {"udp" if endpoints.isDatagram(l.endpoint) else "stream" for l in self.listen}
        if len(listenKinds) > 1:
            problems.append(("listen", "a rule listens on UDP or on streams, not both; make two rules"))
        elif listenKinds and kinds and kinds != listenKinds:
            want = "udp:host=..:port=.." if listenKinds == {"udp"} else "tcp:, tls: or unix:"
            problems.append(("connect", f"backends must match the listeners: use {want} endpoints"))
        if listenKinds == {"udp"}:
            for key, value in (("send_proxy", self.send_proxy), ("health", self.health)):
                if value is not None:
                    problems.append((key, "not supported on UDP rules"))
            if self.accept_proxy or any(l.accept_proxy for l in self.listen):
                problems.append(("accept_proxy", "not supported on UDP rules"))
        for i, l in enumerate(self.listen):
            acceptProxy = self.accept_proxy if l.accept_proxy is None else l.accept_proxy
            if acceptProxy and endpoints.split(l.endpoint)[0] in ("tls", "ssl"):
                problems.append(
                    (
                        f"listen[{i}]",
                        "accept_proxy needs a plain listener: the PROXY header "
                        "comes before the TLS handshake (terminate TLS behind the header "
                        "is not supported yet)",
                    )
                )
        problems += networkProblems(self, "allow", "deny", "trusted_proxies")
        if listenKinds != {"udp"}:
            proxied = self.accept_proxy or any(l.accept_proxy for l in self.listen)
            if proxied and not self.trusted_proxies:
                problems.append(("trusted_proxies", "accept_proxy needs the list of senders allowed to speak "
                                 "PROXY (e.g. [10.0.0.2/32], the load balancer's address): without it any client "
                                 "could claim any address"))
            elif self.trusted_proxies and not proxied:
                problems.append(("trusted_proxies", "only used with accept_proxy: true"))
        if self.health is not None:
            for key in ("send", "expect"):
                value = getattr(self.health, key)
                if value is not None:
                    try:
                        unescape(value)
                    except ValueError as e:
                        problems.append((f"health.{key}", str(e)))
            if self.health.expect is not None and not self.health.expect:
                problems.append(("health.expect", "must not be empty"))
        return problems


def unescape(text: str) -> bytes:
    """C{"PING\\r\\n"} -> C{b"PING\\r\\n"} (Python-style escapes); raises ValueError."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise ValueError(f"bad escape in {text!r}: {e.reason}") from None


@frozen
class Settings(ServiceSettings):
    rules: list[Rule] = field(factory=list)
    #: Service-wide limits (per-rule ones are on each rule).  Rules have their own
    #: idle_timeout (it sees both directions); this one is off by default.
    limits: Limits = field(
        factory=lambda: Limits(max_connections=65536, max_connections_per_ip=65536, idle_timeout=Duration(0))
    )

    def check(self) -> list[tuple[str, str]]:
        problems = ServiceSettings.check(self)
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                problems.append((f"rules[{i}].name", f"{rule.name!r} is also rules[{seen[rule.name]}]"))
            seen.setdefault(rule.name, i)
        return problems


__all__ = ["Settings", "Rule", "Health", "UDPSettings", "BandwidthSettings", "ForwardListener", "unescape"]
