"""
C{services.web} settings: HTTPS (HTTP/2 and HTTP/1.1) static files, virtual
hosts, reverse proxy, redirect listeners, access log, /metrics and /status.

    services:
      web:
        listen:
          - "tls:8443:interface=127.0.0.1"
          - {endpoint: "tcp:8080:interface=127.0.0.1", redirect_to_https: true}
        root: www
        directory_listing: false
        gzip: true                       # compress text types on the fly when asked
        hsts_max_age: 365d               # 0: no Strict-Transport-Security
        headers: {X-Frame-Options: DENY} # added to / override the default security headers ("" removes)
        access_log: {file: web-access.log, format: combined}   # or json
        certificates:                    # more certificates, chosen by SNI (tls: listeners)
          - {cert: example.pem, key: example.key}
        proxy:
          - {prefix: /api/, upstream: "http://127.0.0.1:9000", timeout: 30s}
        vhosts:
          docs.example.test: {root: docs}
          app.example.test: {proxy: [{prefix: /, upstream: "https://10.0.0.5:443"}]}
        trusted_proxies: [10.0.0.0/8]    # proxies in front whose X-Forwarded-For is kept (default: none)
        chat_origins: ["https://app.example.test"]   # other pages that may open /chat/ws (default: none)
        admin:                           # /metrics and /status
          allow: [127.0.0.0/8, ::1/128]
          users: {ops: "scrypt:<salt>:<key>"}   # python -m netsvc.chat.auth ops
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from netsvc.config import Duration, Limits, Listener, ServiceSettings, Size, field, frozen


@frozen
class WebListener(Listener):
    """A web listener; plain-HTTP ones may answer everything with a 301 to HTTPS."""

    redirect_to_https: bool = field(False)


@frozen
class ProxyRoute:
    """Requests under C{prefix} go to C{upstream} (C{http://host:port[/path]} or C{https://...})."""

    prefix: str = field("/")
    upstream: str = field()
    #: Remove the prefix before forwarding (C{/api/x} -> C{upstream/x}).
    strip_prefix: bool = field(False)
    #: Send the client's Host header (True) or the upstream's (False).
    preserve_host: bool = field(True)
    connect_timeout: Duration = field(Duration(5), min=0.001)
    #: Until the upstream's response headers arrive.
    timeout: Duration = field(Duration(60), min=0.001)
    #: For https upstreams: the CAs to verify against (default: the system's).
    cafile: str | None = field(None)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.prefix.startswith("/"):
            problems.append(("prefix", f"must start with /, got {self.prefix!r}"))
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                ("upstream", f"expected http://HOST[:PORT] or https://HOST[:PORT], got {self.upstream!r}")
            )
        elif parts.query or parts.fragment:
            problems.append(("upstream", "must not have a query or fragment"))
        if self.cafile and parts.scheme != "https":
            problems.append(("cafile", "only used with https:// upstreams"))
        return problems


@frozen
class VirtualHost:
    """A host name's own site: a root, proxy routes, or both (proxy routes first)."""

    root: str | None = field(None)
    index: list[str] = field(factory=lambda: ["index.html"])
    directory_listing: bool = field(False)
    proxy: list[ProxyRoute] = field(factory=list)

    def check(self) -> list[tuple[str, str]]:
        if self.root is None and not self.proxy:
            return [("root", "a virtual host needs a root or proxy routes")]
        return []


@frozen
class AccessLogSettings:
    #: A file to append to (relative to the config file's folder); C{-}: the daemon's log.
    file: str = field()
    format: Literal["combined", "json"] = field("combined")


@frozen
class CertificateFiles:
    cert: str = field()
    #: Defaults to the C{cert} file (a combined PEM).
    key: str | None = field(None)


@frozen
class AdminSettings:
    """Who may read C{/metrics} and C{/status}: clients in C{allow}, or with a password."""

    allow: list[str] = field(factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: user -> C{scrypt:<salt>:<key>} (C{python -m netsvc.chat.auth USER}); HTTP basic auth.
    users: dict[str, str] = field(factory=dict)
    #: Where they are mounted; "" turns one off.
    metrics_path: str = field("/metrics")
    status_path: str = field("/status")

    def check(self) -> list[tuple[str, str]]:
        from netsvc.policies import parseNetworks

        problems = []
        try:
            parseNetworks(self.allow)
        except ValueError as e:
            problems.append(("allow", str(e)))
        for key in ("metrics_path", "status_path"):
            value = getattr(self, key)
            if value and (not value.startswith("/") or value == "/"):
                problems.append((key, f"must be a path like /metrics, got {value!r}"))
        for user, stored in self.users.items():
            if not stored.startswith("scrypt:") or stored.count(":") != 2:
                problems.append(
                    (f"users.{user}", "expected scrypt:<salt>:<key> (python -m netsvc.chat.auth USER)")
                )
        return problems


@frozen
class CacheSettings:
    """Small files are kept in memory (with their headers and gzip form), re-checked every C{revalidate}."""

    max_file_size: Size = field(Size(256 * 1024), min=0)
    max_total: Size = field(Size(64 << 20), min=0)
    revalidate: Duration = field(Duration(1), min=0)


@frozen
class Settings(ServiceSettings):
    listen: list[WebListener] = field(
        factory=lambda: [WebListener(endpoint="tls:8443:interface=127.0.0.1")]
    )
    limits: Limits = field(factory=lambda: Limits(idle_timeout=Duration(120), max_message=Size(10 << 20)))
    #: The folder served (relative to the config file's folder); None: nothing but proxy/admin routes.
    root: str | None = field(None)
    index: list[str] = field(factory=lambda: ["index.html"])
    directory_listing: bool = field(False)
    #: Compress text types on the fly for clients that ask (C{.gz} sidecars are always used).
    gzip: bool = field(True)
    hsts_max_age: Duration = field(Duration(365 * 86400), min=0)
    hsts_include_subdomains: bool = field(False)
    #: Response headers added to the defaults (nosniff, frame options, referrer policy); "" removes one.
    headers: dict[str, str] = field(factory=dict)
    #: For redirects to HTTPS: the port in the Location (default: the first tls: listener's).
    https_port: int | None = field(None, min=1, max=65535)
    access_log: AccessLogSettings | None = field(None)
    certificates: list[CertificateFiles] = field(factory=list)
    proxy: list[ProxyRoute] = field(factory=list)
    vhosts: dict[str, VirtualHost] = field(factory=dict)
    admin: AdminSettings = field(factory=AdminSettings)
    cache: CacheSettings = field(factory=CacheSettings)
    #: Peers (CIDR) whose C{X-Forwarded-For} the reverse proxy keeps and appends to, like nginx's
    #: C{set_real_ip_from}; from anyone else it is replaced by the peer's address.  Default: nobody.
    trusted_proxies: list[str] = field(factory=list)
    #: Where the browser chat is mounted (the page, and its WebSocket at PATH/ws) when the chat
    #: service runs in the same daemon; "" turns it off.
    chat_path: str = field("/chat")
    #: Pages of other sites allowed to open the chat's WebSocket (origins, C{https://app.example:8443}),
    #: besides this site's own names and ports.  Handshakes without an Origin (not a browser) are allowed.
    chat_origins: list[str] = field(factory=list)
    #: HTTP/2 (ALPN h2) on libnghttp2 ("native"), on the pure-Python h2 ("python"), the native one
    #: where it can be imported and else h2 ("auto"), or not at all ("off": HTTP/1.1 only).
    http2: Literal["auto", "native", "python", "off"] = field("auto")
    #: Where captured mail is listed (the smtp service in capture mode; admin.allow/users apply); "" off.
    mail_path: str = field("/mail")

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        from netsvc.policies import networkProblems

        problems += networkProblems(self, "trusted_proxies")
        if self.chat_path and (not self.chat_path.startswith("/") or self.chat_path.rstrip("/") == ""):
            problems.append(("chat_path", f"must be a path like /chat, got {self.chat_path!r}"))
        from netsvc.chat.web import parseOrigin

        for i, origin in enumerate(self.chat_origins):
            try:
                parseOrigin(origin)
            except ValueError as e:
                problems.append((f"chat_origins[{i}]", str(e)))
        if self.mail_path and (not self.mail_path.startswith("/") or self.mail_path.rstrip("/") == ""):
            problems.append(("mail_path", f"must be a path like /mail, got {self.mail_path!r}"))
        for name, value in self.headers.items():
            if not name or any(c in name for c in " :\r\n") or any(c in value for c in "\r\n"):
                problems.append((f"headers.{name}", "not a valid header name or value"))
        return problems
