"""
C{services.web}: settings -> sites, listeners, access log, metrics.

    services:
      web:
        listen:
          - "tls:8443:interface=127.0.0.1"
          - {endpoint: "tcp:8080:interface=127.0.0.1", redirect_to_https: true}
        root: www

(every option: L{netsvc.web.settings}).  TLS listeners offer HTTP/2 and
HTTP/1.1 by ALPN; with C{certificates:} they pick a certificate by SNI (the
shared one otherwise), and SIGHUP reloads them all.  The built service keeps
its default L{Host} as C{defaultHost}: later routes (the browser chat) mount
there.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from twisted.application import service
from twisted.application.service import IService
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from netsvc.auth import FailureLimit, hashPool
from netsvc.config import Problem
from netsvc.endpoints import isSharedTLS, split
from netsvc.policies import AccessList
from netsvc.runtime import StartupError, openingAs
from netsvc.tls import CertificateError, ServerCertificate, SNIServerCreator
from netsvc.web import h2engine
from netsvc.web.accesslog import AccessLog
from netsvc.web.admin import AdminGate, StatusResource, openMetrics
from netsvc.web.fast import FastHTTPFactory
from netsvc.web.files import FileTree
from netsvc.web.proxy import ProxyResource
from netsvc.web.settings import ProxyRoute, Settings, VirtualHost, WebListener  # noqa: F401 (Settings is the registry's)
from netsvc.web.site import (
    DEFAULT_SECURITY_HEADERS,
    NOT_FOUND,
    Host,
    Mount,
    WebSite,
    canonicalHeaders,
    redirectSite,
)
from netsvc.web.static import StaticResource

log = Logger()

ALPN = [b"h2", b"http/1.1"]

__all__ = ["Settings", "WebListener", "makeService"]


class WebMetrics:
    """Requests by status code and their durations, for the web service."""

    def __init__(self, registry: Any, service: str = "web") -> None:
        self.service = service
        self._requests = registry.counter(
            "netsvc_http_requests_total", "HTTP requests answered, by status code.", ["service", "code"]
        )
        self._byCode: dict[int, Any] = {}
        self.duration = registry.histogram(
            "netsvc_http_request_duration_seconds",
            "Time from a request's arrival to its response's end.",
            ["service"],
        ).labels(service=service)

    def observe(self, code: int, seconds: float | None) -> None:
        counter = self._byCode.get(code)
        if counter is None:
            counter = self._byCode[code] = self._requests.labels(service=self.service, code=str(code))
        counter.value += 1
        if seconds is not None:
            self.duration.observe(seconds)


class _Housekeeping(service.Service):
    """Flushes the access log every second; at stop, closes upstream connections and the log."""

    def __init__(self, reactor: Any, pools: list[HTTPConnectionPool], accessLog: AccessLog | None) -> None:
        self.reactor = reactor
        self.pools = pools
        self.accessLog = accessLog
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.accessLog is not None:
            self._loop = task.LoopingCall(self.accessLog.flush)
            self._loop.clock = self.reactor
            self._loop.start(1.0, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.accessLog is not None:
            self.accessLog.close()
        return defer.gatherResults([p.closeCachedConnections() for p in self.pools]).addCallback(
            lambda _: None
        )


def _tree(
    context: Any, key: str, root: str, index: list[str], listing: bool, settings: Settings
) -> FileTree:
    path = context.settings.path(root)
    if not path.is_dir():
        raise StartupError([Problem(context.configFile, key, f"{path} is not a folder")])
    c = settings.cache
    return FileTree(
        str(path),
        index=index,
        listing=listing,
        onTheFlyGzip=settings.gzip,
        maxFileSize=c.max_file_size,
        maxTotal=c.max_total,
        revalidate=c.revalidate,
    )


def _host(
    context: Any,
    key: str,
    root: str | None,
    index: list[str],
    listing: bool,
    routes: list[ProxyRoute],
    settings: Settings,
    pools: list[HTTPConnectionPool],
    trees: list[FileTree],
    metrics: Any = None,
) -> Host:
    fallback = NOT_FOUND
    if root is not None:
        tree = _tree(context, f"{key}root", root, index, listing, settings)
        trees.append(tree)
        fallback = StaticResource(tree, settings.gzip)
    host = Host(fallback)
    for route in routes:
        cafile = str(context.settings.path(route.cafile)) if route.cafile else None
        # A pool per route: persistent connections are keyed by host and port only, and a
        # connection verified against one route's cafile must not serve another route.
        routePool = HTTPConnectionPool(context.reactor, persistent=True)
        routePool.maxPersistentPerHost = 16
        pools.append(routePool)
        host.mount(
            route.prefix,
            ProxyResource(
                route.upstream,
                context.reactor,
                routePool,
                prefix=route.prefix,
                stripPrefix=route.strip_prefix,
                preserveHost=route.preserve_host,
                connectTimeout=route.connect_timeout,
                timeout=route.timeout,
                cafile=cafile,
                metrics=metrics,
                trustedProxies=settings.trusted_proxies,
            ),
        )
    return host


def _extraCertificates(context: Any, settings: Settings) -> list[ServerCertificate]:
    out = []
    for i, files in enumerate(settings.certificates):
        cert = context.settings.path(files.cert)
        key = context.settings.path(files.key) if files.key else cert
        try:
            out.append(ServerCertificate(cert, key, context.settings.tls.min_version))
        except (CertificateError, OSError) as e:
            raise StartupError(
                [Problem(context.configFile, f"services.web.certificates[{i}]", str(e))]
            ) from None

    def reload() -> None:
        for certificate in out:
            try:
                certificate.reload()
            except (CertificateError, OSError) as e:
                log.error(
                    "web: reloading {cert} failed, keeping the old one: {error}",
                    cert=str(certificate.certPath),
                    error=str(e),
                )

    if out:
        context.reloaders.append(reload)
    return out


def makeService(settings: Settings, context: Any) -> IService:
    svc = context.serverService("web", settings)
    metrics = WebMetrics(context.metrics)
    accessLog = None
    if settings.access_log is not None:
        where = settings.access_log.file
        path = where if where == "-" else str(context.settings.path(where))
        try:
            # as the run user where it could have planted a link there (twistd --uid: still root here)
            with openingAs(getattr(context, "runAs", None), path) if where != "-" else contextlib.nullcontext():
                accessLog = AccessLog.open(path, settings.access_log.format)
        except OSError as e:
            raise StartupError(
                [
                    Problem(
                        context.configFile,
                        "services.web.access_log.file",
                        f"cannot open {path}: {e.strerror}",
                    )
                ]
            ) from None

    def onRequest(request: Any) -> None:
        started = getattr(request, "_started", 0.0)
        metrics.observe(request.code, time.monotonic() - started if started else None)
        if accessLog is not None:
            accessLog(request)

    pools: list[HTTPConnectionPool] = []
    trees: list[FileTree] = []
    default = _host(
        context,
        "services.web.",
        settings.root,
        settings.index,
        settings.directory_listing,
        settings.proxy,
        settings,
        pools,
        trees,
        svc.metrics,
    )
    admin = settings.admin
    # One wrong-password allowance for every gate of the site (per client address and overall), counted
    # in /metrics: a client cannot get more guesses by spreading them over /metrics, /status and /mail.
    failures = FailureLimit(context.reactor, registry=context.metrics, service="web")
    hashPool(context.reactor).countInto(context.metrics)
    # An empty allow list admits nobody by address (only users with a password).
    access = AccessList(admin.allow) if admin.allow else AccessList(deny=["0.0.0.0/0", "::/0"])
    if admin.metrics_path:
        metricsGate = AdminGate(openMetrics(context.metrics), access, admin.users, failures=failures)
        default.mount(admin.metrics_path, metricsGate, exact=True)
    http2 = _http2Engine(context, settings)
    if admin.status_path:
        status = AdminGate(
            StatusResource(
                lambda: context.daemon,
                context.metrics,
                lambda: {"web": {"http2": h2engine.describe(http2), "cache": [t.stats() for t in trees]}},
            ),
            access,
            admin.users,
            failures=failures,
        )
        default.mount(admin.status_path, status, exact=True)
        default.mount(admin.status_path + ".json", status, exact=True)
    chat = context.settings.services.get("chat")
    if settings.chat_path and chat is not None and chat.enabled:
        from netsvc.chat.web import chatResource

        default.mount(settings.chat_path, Mount(settings.chat_path, chatResource(context)), exact=True)
    smtp = context.settings.services.get("smtp")
    if settings.mail_path and smtp is not None and smtp.enabled and smtp.relay.mode == "capture":
        from netsvc.smtp.web import mailResource

        gate = AdminGate(mailResource(context), access, admin.users, failures=failures)
        default.mount(settings.mail_path, Mount(settings.mail_path, gate), exact=True)
    hosts = {}
    for name, vhost in settings.vhosts.items():
        hosts[_asciiHost(name)] = _host(
            context,
            f"services.web.vhosts.{name}.",
            vhost.root,
            vhost.index,
            vhost.directory_listing,
            vhost.proxy,
            settings,
            pools,
            trees,
            svc.metrics,
        )

    merged = dict(DEFAULT_SECURITY_HEADERS)
    lowered = {k.lower(): k for k in merged}
    for name, value in settings.headers.items():
        merged.pop(lowered.get(name.lower(), name), None)
        if value != "":
            merged[name] = value
    hsts = None
    if settings.hsts_max_age > 0:
        hsts = b"max-age=%d" % int(settings.hsts_max_age)
        if settings.hsts_include_subdomains:
            hsts += b"; includeSubDomains"
    timeout = settings.limits.idle_timeout or None
    site = WebSite(
        default,
        hosts,
        canonicalHeaders(merged),
        hsts,
        onRequest,
        timeout=timeout,
        maxBody=settings.limits.max_message,
    )

    site.serviceMetrics = svc.metrics
    site.http2 = http2
    alpn = ALPN if site.http2 else [b"http/1.1"]

    def httpsPort() -> int | None:
        if settings.https_port:
            return settings.https_port
        for listener in svc.listeners:
            if _isTLS(listener.description) and listener.port is not None:
                return listener.port.getHost().port
        return None

    redirect = redirectSite(httpsPort, onRequest, timeout=timeout)
    extra = _extraCertificates(context, settings)
    secure, plain = svc.guard.wrap(FastHTTPFactory(site, svc.metrics)), svc.guard.wrap(redirect)
    for i, listener in enumerate(settings.listen):
        svc.listen(i, listener, plain if listener.redirect_to_https else secure, alpn)
        if extra and isSharedTLS(*split(listener.endpoint)):
            svc.listeners[-1].endpoint.creator = SNIServerCreator(context.certificate, extra, alpn)
    _Housekeeping(context.reactor, pools, accessLog).setServiceParent(svc)

    serverReconfigure = svc.reconfigure

    def reconfigure(newSettings: Settings) -> None:
        """SIGHUP: new limits and access lists (ServerService), and cached files forgotten
        (listeners, roots, routes and headers need a restart)."""
        serverReconfigure(newSettings)
        for tree in trees:
            tree.clear()

    svc.reconfigure = reconfigure
    svc.site = site
    svc.defaultHost = default
    svc.trees = trees
    return svc


def _http2Engine(context: Any, settings: Settings) -> str | None:
    """The HTTP/2 engine C{services.web.http2} asks for (None: off); a problem if it cannot be had."""
    if settings.http2 == "off":
        return None
    engine = h2engine.available(settings.http2)
    if engine is None:
        wanted = {"native": "the ngh2 package (libnghttp2)", "python": "the h2 package"}.get(
            settings.http2, "ngh2 or h2"
        )
        raise StartupError([Problem(context.configFile, "services.web.http2",
                                    f"{settings.http2!r} needs {wanted}, which cannot be imported")])
    if engine != "native" and settings.http2 == "auto":
        log.warn("HTTP/2 on the pure-Python h2 engine: ngh2 (libnghttp2) cannot be imported")
    return engine


def _isTLS(description: str) -> bool:
    kind, args, kwargs = split(description)
    return isSharedTLS(kind, args, kwargs) or kind in ("ssl", "tls")


def _asciiHost(name: str) -> str:
    """A configured host name as it arrives in Host and SNI (IDNA A-labels, lower case)."""
    name = name.lower().rstrip(".")
    prefix = "*." if name.startswith("*.") else ""
    try:
        return prefix + name[len(prefix) :].encode("idna").decode("ascii")
    except UnicodeError:
        return name
