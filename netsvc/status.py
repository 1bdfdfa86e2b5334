"""
The top-level C{metrics:} listener: C{/metrics} in the Prometheus text format
over plain HTTP, for clients in its C{allow} list (loopback by default).
Scrapes come every few seconds: each is logged at debug level, not info.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger, LogLevel
from twisted.web import resource, server

from netsvc import logs
from netsvc.config import Limits, MetricsSettings, ServiceSettings
from netsvc.metrics import CONTENT_TYPE, Registry
from netsvc.policies import AccessList


class MetricsResource(resource.Resource):
    """C{GET /metrics}: the registry rendered; 403 for clients outside C{access}."""

    isLeaf = True

    def __init__(self, registry: Registry, access: AccessList) -> None:
        super().__init__()
        self.registry = registry
        self.access = access

    def render_GET(self, request: server.Request) -> bytes:
        if not self.access.permits(request.getClientAddress().host or "unix"):
            request.setResponseCode(403)
            return b"forbidden\n"
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self.registry.render().encode()

    render_HEAD = render_GET


log = Logger()


class ScrapeSite(server.Site):
    """A Site whose access lines (one per scrape) are debug events, not twistd log lines."""

    def log(self, request: server.Request) -> None:
        if logs.wants(LogLevel.debug):
            log.debug("{line}", line=self._logFormatter(self._logDateTime, request))


def makeMetricsService(settings: MetricsSettings, context: Any) -> service.IService:
    """One plain-HTTP site serving /metrics on every C{metrics.listen} entry."""
    svc = context.serverService("metrics", ServiceSettings(limits=Limits(max_connections=64)))
    svc.keyPath = "metrics"
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(context.metrics, AccessList(settings.allow)))
    site = ScrapeSite(root)
    site.displayTracebacks = False
    site.noisy = False
    for i, listener in enumerate(settings.listen):
        svc.listen(i, listener, svc.guard.wrap(site))
    return svc
