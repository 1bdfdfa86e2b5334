"""
A fast path for the most common request there is: HTTP/1.1 GET or HEAD of a
small static file, answered from the file cache with precomputed header bytes,
without building a twisted.web Request.

L{FastHTTPChannel} reads request heads itself.  A request it fully
understands -- HTTP/1.1, GET/HEAD, no body, no Range, at most If-None-Match /
If-Modified-Since (-> 304) and Accept-Encoding, routed to static files whose
entry is cached -- is answered at once (pipelined ones too).  At the first
request it does not take, or when ALPN chose h2, it hands the connection, with
the bytes not yet consumed, to twisted.web's own channel (HTTP/1.1 or HTTP/2)
for the rest of its life.  Both paths produce the same responses; the tests run
the same requests through each.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol

from netsvc.web.files import FileEntry
from netsvc.web.negotiate import acceptsGzip, etagMatches, parseHTTPDate
from netsvc.web.static import StaticResource

#: A request head longer than this goes to twisted.web (which answers 431 or 400).
MAX_HEAD = 16384

#: A request head that has started must be complete within this long (a slow-loris client keeps
#: the idle timeout at bay with a byte now and then; nginx's client_header_timeout is 60 s).
HEAD_TIMEOUT = 30.0

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

#: Headers the fast path understands; any other one (a conditional, framing ...) goes to twisted.web.
_IGNORED = frozenset(
    [
        b"host",
        b"user-agent",
        b"accept",
        b"accept-language",
        b"connection",
        b"referer",
        b"cache-control",
        b"pragma",
        b"sec-fetch-site",
        b"sec-fetch-mode",
        b"sec-fetch-dest",
        b"sec-fetch-user",
        b"upgrade-insecure-requests",
        b"dnt",
        b"cookie",
        b"priority",
        b"sec-ch-ua",
        b"sec-ch-ua-mobile",
        b"sec-ch-ua-platform",
        b"x-forwarded-for",
        b"accept-encoding",
        b"if-none-match",
        b"if-modified-since",
        b"content-length",
    ]
)


class _Record:
    """What the access log and metrics read of a request answered here (a small Request look-alike)."""

    __slots__ = ("method", "uri", "clientproto", "code", "sentLength", "_started", "_headers", "_peer")

    def __init__(
        self, method: bytes, uri: bytes, headers: dict[bytes, bytes], peer: Any, started: float
    ) -> None:
        self.method = method
        self.uri = uri
        self.clientproto = b"HTTP/1.1"
        self._headers = headers
        self._peer = peer
        self._started = started
        self.code = 200
        self.sentLength = 0

    @property
    def requestHeaders(self) -> _Record:
        return self

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self._headers

    def getHeader(self, name: bytes) -> bytes | None:
        return self._headers.get(name.lower())

    def getClientAddress(self) -> Any:
        return self._peer

    def getUser(self) -> bytes:
        return b""


class FastHTTPFactory(Factory):
    """Builds L{FastHTTPChannel}s for C{site} (a L{netsvc.web.site.WebSite})."""

    def __init__(self, site: Any) -> None:
        self.site = site

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def logPrefix(self) -> str:
        return self.site.logPrefix()

    def buildProtocol(self, addr: Any) -> FastHTTPChannel:
        return FastHTTPChannel(self.site, addr)


class FastHTTPChannel(Protocol):
    """One connection: cache hits answered here, everything else by twisted.web (see the module docstring)."""

    delegate: Protocol | None = None
    _secure = False
    _headTimer: Any = None

    def __init__(self, site: Any, addr: Any) -> None:
        self.site = site
        self.addr = addr
        self._buffer = b""
        self._first = True

    def connectionMade(self) -> None:
        # HTTP/2 writes a response as several frames: without TCP_NODELAY, Nagle's algorithm holds
        # the last one back until the client's delayed ACK (~40 ms per round trip).
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except (OSError, AttributeError):
                pass

    # -- handing over

    def _handOver(self, data: bytes) -> None:
        self._headDone()
        delegate = self.site.buildProtocol(self.addr)
        self.delegate = delegate
        delegate.makeConnection(self.transport)
        if data:
            delegate.dataReceived(data)

    def timedOut(self) -> None:
        self.transport.loseConnection()

    def drain(self) -> None:
        """Shutdown: a keep-alive connection between requests is closed now (one with twisted.web
        waits for the drain timeout)."""
        if self.delegate is None and not self._buffer:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self._headDone()
        if self.delegate is not None:
            self.delegate.connectionLost(reason)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self.delegate is not None:
            self.delegate.dataReceived(data)
            return
        if self._first:
            self._first = False
            self._secure = ISSLTransport.providedBy(self.transport)
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                self._handOver(data)
                return
        buf = self._buffer + data if self._buffer else data
        out = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    break  # handed over below
                if out:
                    self.transport.write(b"".join(out))
                self._buffer = buf
                self._headStarted()
                return
            answer = self.answer(buf[:end])
            if answer is None:
                break
            response, close = answer
            out.append(response)
            buf = buf[end + 4 :]
            if close or not buf:
                break
        if out:
            self.transport.write(b"".join(out))
        self._buffer = b""
        self._headDone()
        if close:
            self.transport.loseConnection()
        elif buf:
            self._handOver(buf)

    # -- the head timeout

    def _headStarted(self) -> None:
        if self._headTimer is None and self._buffer:
            from twisted.internet import reactor

            clock = getattr(self.site, "reactor", None) or reactor
            self._headTimer = clock.callLater(HEAD_TIMEOUT, self._headTimedOut)

    def _headDone(self) -> None:
        if self._headTimer is not None:
            if self._headTimer.active():
                self._headTimer.cancel()
            self._headTimer = None

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if self.delegate is None:
            self.transport.write(_REQUEST_TIMEOUT)
            self.transport.loseConnection()

    def answer(self, head: bytes) -> tuple[bytes, bool] | None:
        """The response bytes and whether to close after them, or None (not for the fast path)."""
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ")
        except ValueError:
            return None
        if version != b"HTTP/1.1" or (method != b"GET" and method != b"HEAD") or target[:1] != b"/":
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            name = name.lower()
            if not sep or name not in _IGNORED or name in headers or name != name.strip():
                return None
            headers[name] = value.strip()
        if headers.get(b"content-length", b"0") != b"0" or b"host" not in headers:
            return None
        site = self.site
        path = target.split(b"?", 1)[0]
        resource = site.hostFor(_HostOnly(headers.get(b"host"))).route(path)
        if type(resource) is not StaticResource:
            return None
        entry = resource.tree.lookup(path)
        if type(entry) is not FileEntry or entry.body is None:
            return None
        started = time.monotonic()
        useGzip = entry.gzBody is not None and acceptsGzip(headers.get(b"accept-encoding"))
        etag = entry.gzEtag if useGzip else entry.etag
        inm = headers.get(b"if-none-match")
        notModified = False
        if inm is not None:
            notModified = etagMatches(inm, etag)
        else:
            since = parseHTTPDate(headers.get(b"if-modified-since"))
            notModified = since is not None and entry.mtime <= since
        connection = headers.get(b"connection", b"").lower()
        close = b"close" in connection
        prefix = site.fastPrefix(self._secure)
        if notModified:
            code = 304
            block = [
                b"HTTP/1.1 304 Not Modified\r\n",
                prefix,
                b"ETag: ",
                etag,
                b"\r\nLast-Modified: ",
                entry.lastModified,
                b"\r\n",
            ]
            if entry.compressible or entry.hasGzip:
                block.append(b"Vary: Accept-Encoding\r\n")
            body = b""
        else:
            code = 200
            block = [b"HTTP/1.1 200 OK\r\n", prefix, _headerBlock(entry, useGzip)]
            body = (entry.gzBody if useGzip else entry.body) if method == b"GET" else b""
        if close:
            block.append(b"Connection: close\r\n")
        block.append(b"\r\n")
        block.append(body)
        onRequest = site.onRequest
        if onRequest is not None:
            record = _Record(method, target, headers, self.transport.getPeer(), started)
            record.code = code
            record.sentLength = len(body)
            onRequest(record)
        return b"".join(block), close


class _HostOnly:
    """Enough of a request for L{WebSite.hostFor}."""

    __slots__ = ("host",)

    def __init__(self, host: bytes | None) -> None:
        self.host = host or b""

    def getRequestHostname(self) -> bytes:
        host = self.host
        if host.startswith(b"["):
            return host.split(b"]", 1)[0] + b"]"
        return host.split(b":", 1)[0]


def _headerBlock(entry: FileEntry, gzip: bool) -> bytes:
    """An entry's 200 header lines, joined once and kept on the entry."""
    cache = entry.fastBlocks
    if cache is None:
        cache = entry.fastBlocks = (
            b"".join(n + b": " + v + b"\r\n" for n, v in entry.headers),
            b"".join(n + b": " + v + b"\r\n" for n, v in entry.gzHeaders),
        )
    return cache[1] if gzip else cache[0]
