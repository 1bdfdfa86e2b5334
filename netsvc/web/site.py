"""
The HTTP site: requests -> (virtual host, route) -> resource, with the default
response headers, and the plain-HTTP redirect site.

Routing is a table lookup, not twisted.web's child-by-child traversal: a
request's C{Host} picks a L{Host} (the default one when no virtual host
matches); the host's routes are C{(prefix, resource)} pairs tried longest
prefix first (exact C{/metrics} style mounts, proxy prefixes), then its static
files.  L{Host.mount} is the place for later routes (the browser chat's
C{/chat} page and WebSocket).

Every response gets C{Server}, C{Date}, the configured security headers and,
over TLS, C{Strict-Transport-Security}; a route's own headers override them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.protocols import basic
from twisted.python import failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers

from netsvc.web import pages
from netsvc.web.negotiate import DateCache

SERVER = b"netsvc"

#: Sent on every response unless the configuration overrides or removes them.
DEFAULT_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}


def canonicalHeaders(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs with twisted.web's canonical name case (its Headers keys)."""
    h = Headers()
    for name, value in headers.items():
        h.setRawHeaders(name, [value])
    return [(name, values[0]) for name, values in h.getAllRawHeaders()]


class ErrorResource(resource.Resource):
    """Always one error page."""

    isLeaf = True

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__()
        self.code = code
        self.detail = detail

    def render(self, request: server.Request) -> bytes:
        return pages.error(request, self.code, self.detail)


NOT_FOUND = ErrorResource(404)


class Mount(resource.Resource):
    """
    A twisted.web resource tree mounted at a prefix: requests below it are
    traversed the usual way (C{getChild} / C{putChild}), with C{prepath} the
    prefix and C{postpath} the rest (e.g. the browser chat's C{/chat/ws}).
    """

    isLeaf = True

    def __init__(self, prefix: str, target: resource.Resource) -> None:
        super().__init__()
        self.segments = [s.encode() for s in prefix.strip("/").split("/") if s]
        self.target = target

    def render(self, request: server.Request) -> Any:
        from urllib.parse import unquote_to_bytes

        parts = [unquote_to_bytes(p) for p in request.path.split(b"/")[1:]]
        request.prepath = parts[:len(self.segments)]
        request.postpath = parts[len(self.segments):]
        return resource.getChildForRequest(self.target, request).render(request)


class Host:
    """One site: prefix routes (longest first) and a fallback (static files or 404)."""

    def __init__(self, fallback: resource.Resource = NOT_FOUND) -> None:
        self.fallback = fallback
        self._routes: list[tuple[bytes, bool, resource.Resource]] = []

    def mount(self, prefix: str, target: resource.Resource, exact: bool = False) -> None:
        """
        Route requests whose path starts with C{prefix} to C{target} (with
        C{exact}: the path is C{prefix} or C{prefix/...}, e.g. C{/metrics}).
        """
        self._routes.append((prefix.encode(), exact, target))
        self._routes.sort(key=lambda r: len(r[0]), reverse=True)

    def route(self, path: bytes) -> resource.Resource:
        for prefix, exact, target in self._routes:
            if path.startswith(prefix):
                if (
                    not exact
                    or len(path) == len(prefix)
                    or path[len(prefix) : len(prefix) + 1] in (b"/", b"?")
                ):
                    return target
        return self.fallback


class WebRequest(server.Request):
    """A request of a L{WebSite}: routed by table, default headers precomputed."""

    _started = 0.0
    _bodySize = 0
    _refused = False

    # -- request bodies are bounded by the site's maxBody (limits.max_message): 413, then close

    def gotLength(self, length: int | None) -> None:
        limit = getattr(self.channel.site, "maxBody", None)
        if limit is not None and length is not None and length > limit:
            self._refuseBody()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._bodySize += len(data)
        limit = getattr(self.channel.site, "maxBody", None)
        if limit is not None and self._bodySize > limit:
            self._refuseBody()
            return
        super().handleContentChunk(data)

    def _refuseBody(self) -> None:
        if self._refused:
            return
        self._refused = True
        channel = self.channel
        if isinstance(channel, http.HTTPChannel):
            body = pages.errorBody(413)
            channel.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\n%sConnection: close\r\n"
                b"Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                % (channel.site.fastPrefix(self.isSecure()), len(body), body)
            )
            channel.loseConnection()
            # The client may go on sending its body and never read our close: cut it off.
            reactor = getattr(self.channel.site, "reactor", None)
            if reactor is not None:
                transport = channel.transport
                self._abortCall = reactor.callLater(2.0, transport.abortConnection)
        else:  # an HTTP/2 stream (netsvc.web.http2): 413, then the upload is stopped
            channel._conn.refuseBody(channel.streamID)

    _abortCall = None

    def connectionLost(self, reason: Any) -> None:
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        super().connectionLost(reason)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        site = self.channel.site
        self.site = site
        self._started = time.monotonic()
        raw = self.responseHeaders._rawHeaders  # Twisted-private (checked on 26.10): canonical-case keys
        raw[b"Server"] = [SERVER]
        raw[b"Date"] = [site.dates.now()]
        for name, value in site.secureHeaders if self.isSecure() else site.plainHeaders:
            raw[name] = [value]
        self.prepath = []
        self.postpath = []
        if self._streamGone():
            # HTTP/2: reset by the client before it was dispatched (HEADERS and RST_STREAM in one
            # read: a rapid-reset flood).  Nothing to answer; twisted.web's StreamReset handling
            # follows and cleans up.  Counted, not rendered, not logged.
            site.countReset()
            return
        try:
            self.render(site.resourceFor(self))
        except BaseException:
            self.processingFailed(failure.Failure())

    def _streamGone(self) -> bool:
        """An HTTP/2 request whose stream is already gone (the client reset it)."""
        conn = getattr(self.channel, "_conn", None)  # H2Stream -> netsvc.web.http2.H2Channel
        return conn is not None and conn.streamGone(self.channel.streamID)

    def processingFailed(self, reason: failure.Failure) -> None:
        self._log.failure("web request failed", failure=reason)
        if self.startedWriting:
            self.loseConnection()
            return None
        self.responseHeaders._rawHeaders.clear()
        body = pages.error(self, 500)
        self.write(body)
        self.finish()
        return None


#: Pipelined requests one HTTP/1.1 connection has answered through twisted.web in one reactor turn
#: before the rest waits for the next turn (the fast path's are cheap enough not to count).
TURN_BUDGET = 16


class WebChannel(http.HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, held to issue 18's rule: while the transport's write buffer
    is over its bound, no further pipelined request is taken from the input already read and
    nothing more is read.  (twisted.web's own channel pauses reading only between requests, so a
    pause that arrives while a response is being written -- every synchronous response -- was
    lost, and it answered every pipelined request it had read: a client that never reads had
    ~100 MB buffered for 2,000 pipelined 100 KB answers.)
    """

    _turnCount = 0
    _turnCall: Any = None

    def pauseProducing(self) -> None:
        self._waitingForTransport = True
        if self._requestProducer is not None:
            self._requestProducer.pauseProducing()
        self.paused = True  # LineReceiver: buffered input waits
        self._networkProducer.pauseProducing()

    def resumeProducing(self) -> None:
        self._waitingForTransport = False
        if self._requestProducer is not None:
            self._requestProducer.resumeProducing()
        if self._turnCall is not None:
            return  # this turn's share is spent: the next turn goes on (_nextTurn)
        if self.paused:
            self.paused = False
            basic.LineReceiver.dataReceived(self, b"")  # the held input; may pause us again
        if not self._waitingForTransport and not self._handlingRequest and self._turnCall is None:
            self._networkProducer.resumeProducing()

    def requestDone(self, request: Any) -> None:
        """
        At most L{TURN_BUDGET} pipelined requests are answered in one reactor turn; the rest of what
        was read waits for the next turn, reading paused meanwhile.  (One read can hold ~2,000
        pipelined requests: answered in one go through twisted.web, ~0.3 s in which no other client
        of any service was answered.)
        """
        self._turnCount += 1
        spent = self._turnCount >= TURN_BUDGET and self.persistent and self._turnCall is None
        if spent:
            self.paused = True  # LineReceiver holds the rest
        super().requestDone(request)
        if spent and self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self._networkProducer.pauseProducing()
            self._turnCall = self.callLater(0, self._nextTurn)
        elif spent:
            self.paused = False

    def _nextTurn(self) -> None:
        self._turnCall = None
        self._turnCount = 0
        if self._waitingForTransport:
            return  # resumeProducing goes on once the client reads
        if self.paused:
            self.paused = False
            basic.LineReceiver.dataReceived(self, b"")
        if not self._waitingForTransport and not self._handlingRequest and self._turnCall is None:
            self._networkProducer.resumeProducing()

    def connectionLost(self, reason: Any) -> None:
        if self._turnCall is not None and self._turnCall.active():
            self._turnCall.cancel()
        self._turnCall = None
        super().connectionLost(reason)

    def loseConnection(self) -> None:
        super().loseConnection()
        # Reading may be paused (above): TLS closes once it has read the peer's close_notify.
        self._networkProducer.resumeProducing()


def _webChannel(factory: Any) -> Any:
    """What L{WebSite} builds per connection: twisted.web's HTTP/1.1-or-HTTP/2 switch around a
    L{WebChannel} (C{_GenericHTTPChannelProtocol} is Twisted-private, checked on 26.10)."""
    return http._GenericHTTPChannelProtocol(WebChannel())


class WebSite(server.Site):
    """
    The HTTPS (or plain) site of the web service: hosts by name, default
    headers, and an access-log hook called once per finished request.
    """

    requestFactory = WebRequest
    protocol = _webChannel
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        default: Host,
        hosts: dict[str, Host] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        hsts: bytes | None = None,
        onRequest: Callable[[Any], None] | None = None,
        timeout: float | None = None,
        maxBody: int | None = None,
    ) -> None:
        super().__init__(resource.Resource(), timeout=timeout)
        self.default = default
        self.hosts = dict(hosts or {})
        self.dates = DateCache()
        self.plainHeaders = list(headers or [])
        self.secureHeaders = self.plainHeaders + ([(b"Strict-Transport-Security", hsts)] if hsts else [])
        self.onRequest = onRequest
        self._prefix: tuple[bytes, bytes, bytes] | None = None
        #: Largest request body accepted (413 past it); None: no limit.
        self.maxBody: int | None = maxBody
        self._wildcards = sorted(
            ((name[1:], host) for name, host in self.hosts.items() if name.startswith("*.")),
            key=lambda x: -len(x[0]),
        )

    #: The service's L{netsvc.metrics.ServiceMetrics} (set by the web service), or None.
    serviceMetrics: Any = None

    def countReset(self) -> None:
        """An HTTP/2 stream reset by the client before its response was written."""
        if self.serviceMetrics is not None:
            self.serviceMetrics.error("stream_reset").value += 1

    #: The HTTP/2 engine ALPN's h2 gets (netsvc.web.h2engine: "native" or "python"), or None: no HTTP/2.
    http2: str | None = None

    def h2Prefix(self, secure: bool) -> list[tuple[bytes, bytes]]:
        """C{server}, C{date} and the default headers as HTTP/2 header fields, per second."""
        date = self.dates.now()
        cached = self._h2Prefix
        if cached is None or cached[0] is not date:
            first = [(b"server", SERVER), (b"date", date)]
            cached = self._h2Prefix = (
                date,
                first + [(n.lower(), v) for n, v in self.plainHeaders],
                first + [(n.lower(), v) for n, v in self.secureHeaders],
            )
        return cached[2] if secure else cached[1]

    _h2Prefix: tuple[bytes, list, list] | None = None

    def fastPrefix(self, secure: bool) -> bytes:
        """C{Server}, C{Date} and the default headers as bytes (for L{netsvc.web.fast}), per second."""
        date = self.dates.now()
        cached = self._prefix
        if cached is None or cached[0] is not date:
            lines = [b"Server: " + SERVER + b"\r\nDate: " + date + b"\r\n"]
            plain = b"".join(lines + [n + b": " + v + b"\r\n" for n, v in self.plainHeaders])
            secure_ = b"".join(lines + [n + b": " + v + b"\r\n" for n, v in self.secureHeaders])
            cached = self._prefix = (date, plain, secure_)
        return cached[2] if secure else cached[1]

    def hostFor(self, request: server.Request) -> Host:
        if not self.hosts:
            return self.default
        name = request.getRequestHostname().decode("ascii", "replace").lower().rstrip(".")
        host = self.hosts.get(name)
        if host is not None:
            return host
        for suffix, candidate in self._wildcards:
            if name.endswith(suffix):
                return candidate
        return self.default

    def resourceFor(self, request: server.Request) -> resource.Resource:
        return self.hostFor(request).route(request.path)

    def getResourceFor(self, request: server.Request) -> resource.Resource:
        request.site = self
        return self.resourceFor(request)

    def log(self, request: Any) -> None:
        if self.onRequest is not None:
            self.onRequest(request)


class RedirectResource(resource.Resource):
    """301 to the same host and URI over HTTPS (C{port()} gives the HTTPS port; 443 is left out)."""

    isLeaf = True

    def __init__(self, port: Callable[[], int | None]) -> None:
        super().__init__()
        self.port = port

    def render(self, request: server.Request) -> bytes:
        host = request.getRequestHostname() or request.getHost().host.encode()
        if b":" in host and not host.startswith(b"["):
            host = b"[" + host + b"]"
        port = self.port()
        where = host if port in (None, 443) else host + b":%d" % port
        uri = request.uri if request.uri.startswith(b"/") else b"/"
        location = b"https://" + where + uri
        return pages.error(request, 301, headers={b"Location": location})


def redirectSite(
    port: Callable[[], int | None],
    onRequest: Callable[[Any], None] | None = None,
    timeout: float | None = None,
) -> WebSite:
    """A site that answers everything with a redirect to HTTPS."""
    host = Host(RedirectResource(port))
    return WebSite(host, onRequest=onRequest, timeout=timeout)
