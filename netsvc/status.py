"""
The top-level C{metrics:} listener: C{/metrics} in the Prometheus text format
over plain HTTP, for clients in its C{allow} list (loopback by default).
Scrapes come every few seconds: each is logged at debug level, not info.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger, LogLevel
from twisted.web import http, resource, server

from netsvc import logs
from netsvc.config import Duration, Limits, MetricsSettings, ServiceSettings
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


class ScrapeChannel(http.HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, bounded for pipelined requests answered at once.

    HTTPChannel stops reading when its transport's buffer is full only between
    requests, and a resource that renders at once is always still "being
    handled" when its own write fills the buffer: a client pipelining
    C{GET /metrics} and never reading made it answer every request it sent
    (19 MB held for one connection in a few seconds).  Here, a request that
    ends while the transport waits leaves the requests read after it unparsed
    (LineReceiver's C{paused}) and stops reading; they are answered when the
    transport resumes us.  What one connection holds: the transport's buffer,
    one answer more, and one read of unparsed requests.
    """

    def requestDone(self, request: server.Request) -> None:
        if self._waitingForTransport and self.persistent:
            self.paused = True  # pipelined requests wait, unparsed
            self._networkProducer.pauseProducing()
        else:
            self.paused = False  # (a request answered later, after a resume)
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.paused and not self._handlingRequest:
            self.paused = False
            self.dataReceived(b"")  # the pipelined requests read before the pause


class ScrapeSite(server.Site):
    """
    A Site whose access lines (one per scrape) are debug events, not twistd log
    lines; plain HTTP/1.1 channels (L{ScrapeChannel}: no HTTP/2 for a scraper).
    """

    protocol = ScrapeChannel

    def log(self, request: server.Request) -> None:
        if logs.wants(LogLevel.debug):
            log.debug("{line}", line=self._logFormatter(self._logDateTime, request))


def makeMetricsService(settings: MetricsSettings, context: Any) -> service.IService:
    """One plain-HTTP site serving /metrics on every C{metrics.listen} entry."""
    # Scrapers are few and quick: one address may not hold every connection (a slowloris from one
    # host locked out every scraper), and a connection that says nothing for 30 s is closed.
    limits = Limits(max_connections=64, max_connections_per_ip=16, idle_timeout=Duration(30))
    svc = context.serverService("metrics", ServiceSettings(limits=limits))
    svc.keyPath = "metrics"
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(context.metrics, AccessList(settings.allow)))
    site = ScrapeSite(root)
    site.displayTracebacks = False
    site.noisy = False
    for i, listener in enumerate(settings.listen):
        svc.listen(i, listener, svc.guard.wrap(site))
    return svc
