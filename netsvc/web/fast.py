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

import re
import time
from typing import Any

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.web.http import _parseRequestLine
from zope.interface import implementer

try:  # WebSocket support (twisted[websocket])
    from wsproto.utilities import LocalProtocolError as _WSLocalProtocolError

    _WS_LOCAL_ERRORS: tuple[type[Exception], ...] = (_WSLocalProtocolError,)
except ImportError:  # pragma: no cover
    _WS_LOCAL_ERRORS = ()

from netsvc.web.files import FileEntry
from netsvc.web.negotiate import acceptsGzip, etagMatches, parseHTTPDate
from netsvc.web.static import StaticResource

#: A request head longer than this goes to twisted.web (which answers 431 or 400).
MAX_HEAD = 16384

#: A request head that has started must be complete within this long (a slow-loris client keeps
#: the idle timeout at bay with a byte now and then; nginx's client_header_timeout is 60 s).
HEAD_TIMEOUT = 30.0

#: Control characters (tab aside).  Once a head's CRLFs are taken out, one of these is what twisted.web
#: refuses and the fast path must not take: a control character, a CR without its LF, or a bare LF
#: (the fast path would read one header where twisted.web reads two).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _notFast(head: bytes) -> bool:
    """Whether C{head} has what twisted.web refuses (a character class over the head without its
    CRLFs: ~0.8 us, where one pattern with look-arounds cost ~3 us a request)."""
    return _CONTROL.search(head.replace(b"\r\n", b"")) is not None

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

#: The same for HTTP/2 requests (which also say C{te: trailers}).
_FAST_HEADERS = _IGNORED | {b"te"}


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
    """Builds L{FastHTTPChannel}s for C{site} (a L{netsvc.web.site.WebSite}); C{metrics}: the
    service's L{netsvc.metrics.ServiceMetrics} (limits counted there), or None."""

    def __init__(self, site: Any, metrics: Any = None) -> None:
        self.site = site
        self.metrics = metrics

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def logPrefix(self) -> str:
        return self.site.logPrefix()

    def buildProtocol(self, addr: Any) -> FastHTTPChannel:
        channel = FastHTTPChannel(self.site, addr)
        channel.metrics = self.metrics
        return channel


#: Responses are written in batches of about this many bytes (fewer writes for small files; the
#: transport is asked after each batch whether it wants more).
FLUSH = 65536

#: Unparsed input held while the transport has paused us (a pipeline we stopped answering).
#: Reading stops at the pause, so only what one read (or one TLS record batch) delivered can
#: arrive; a transport that goes on delivering past this is cut off.
MAX_HELD = MAX_HEAD + 4 * 65536


@implementer(IPushProducer)
class FastHTTPChannel(Protocol):
    """
    One connection: cache hits answered here, everything else by twisted.web (see the module
    docstring).

    Back-pressure: the channel is its transport's streaming producer.  When the transport's
    write buffer passes its bound it calls L{pauseProducing}: no further buffered request is
    answered and the transport stops reading; L{resumeProducing} answers what is buffered, then
    reads again.  Unsent output is thus at most one batch past the transport's bound, and
    unparsed input at most what had already arrived (L{MAX_HELD}).
    """

    delegate: Protocol | None = None
    metrics: Any = None
    _secure = False
    _headTimer: Any = None
    #: The transport asked us to stop producing (its write buffer is full), or the connection is gone.
    _paused = False
    #: We stopped the transport reading (while paused).
    _readingPaused = False
    _registered = False
    _closing = False
    _h2 = False
    #: The delegate's producer registration was taken off the transport (it is closing).
    _released = False

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
        self.transport.registerProducer(self, True)
        self._registered = True

    # -- as the transport's producer

    def pauseProducing(self) -> None:
        if self.delegate is not None:
            return
        self._paused = True
        self._headDone()  # waiting for the client to read, not for its head
        if not self._readingPaused:
            self._readingPaused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.delegate is not None or not self._paused:
            return
        self._paused = False
        self._serve(b"")
        if not self._paused and self.delegate is None and self._readingPaused:
            self._readingPaused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self._paused = True
        self._buffer = b""

    # -- handing over

    def _letGo(self) -> None:
        """No longer the transport's producer, and reading again (for a delegate, or for TLS to read the
        peer's close_notify while closing)."""
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        if self._readingPaused:
            self._readingPaused = False
            self.transport.resumeProducing()

    def _handOver(self, data: bytes) -> None:
        self._headDone()
        self._buffer = b""
        self._letGo()  # twisted.web's channel registers itself as the transport's producer
        if self._h2:
            from netsvc.web.http2 import H2Channel  # (http2 uses this module's pieces)

            delegate = self.delegate = H2Channel(self.site, self.site.http2, self.metrics)
        else:
            delegate = self.delegate = self.site.buildProtocol(self.addr)
        delegate.makeConnection(self.transport)
        if data:
            self._feed(delegate, data)

    def _feed(self, delegate: Protocol, data: bytes) -> None:
        try:
            delegate.dataReceived(data)
        except _WS_LOCAL_ERRORS:
            # Twisted 26's WebSocket glue (twisted.web._websocket_impl._handle_closeConnection) answers a
            # client's protocol error that arrives after our own Close with a second Close, which wsproto
            # refuses (LocalProtocolError) before the connection is closed: it was closing anyway
            # (found by fuzzing ws_message; a traceback in the log before).
            self.transport.loseConnection()

    def _close(self) -> None:
        """Close after what is written (a transport with a producer registered would wait for it)."""
        self._paused = self._closing = True
        self._buffer = b""
        self._headDone()
        self._letGo()  # (input is dropped meanwhile)
        self.transport.loseConnection()

    def _release(self) -> None:
        """
        The delegate is closing: take its producer registration off the transport.  twisted.web's
        H2Connection calls loseConnection (GOAWAY after a rapid-reset flood, a protocol error)
        still registered, and TLS and TCP wait for the producer before they close: the
        connection stayed open, reading, until a timeout.
        """
        if not self._released:
            self._released = True
            self.transport.unregisterProducer()

    def timedOut(self) -> None:
        timedOut = getattr(self.delegate, "timedOut", None)
        if timedOut is not None:
            timedOut()  # HTTP/2: GOAWAY, then close
        elif self.delegate is not None:
            self._release()
            self.transport.loseConnection()
        elif self._paused:
            # A client that does not read would keep a graceful close waiting forever.
            self.transport.abortConnection()
        else:
            self._close()

    def drain(self) -> None:
        """Shutdown: a keep-alive connection between requests is closed now (one with twisted.web
        waits for the drain timeout); HTTP/2 says GOAWAY and closes once its streams are answered."""
        drain = getattr(self.delegate, "drain", None)
        if drain is not None:
            drain()
        elif self.delegate is None and not self._buffer:
            self._close()

    def connectionLost(self, reason: Any) -> None:
        self._headDone()
        self._paused = True
        self._buffer = b""
        if self.delegate is not None:
            self.delegate.connectionLost(reason)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        delegate = self.delegate
        if delegate is not None:
            if not self._h2 and getattr(self.transport, "disconnecting", False):
                # twisted.web's HTTP/1.1 channel has answered (e.g. 400) and is closing; TLS goes on
                # reading until close_notify, and a line fed to it now would be parsed as the rest
                # of the refused head (AttributeError: '_version').
                return
            self._feed(delegate, data)
            return
        if self._closing:
            return
        if self._first:
            self._first = False
            self._secure = ISSLTransport.providedBy(self.transport)
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2" and self.site.http2:
                self._h2 = True
                self._handOver(data)
                return
        self._serve(data)

    def _serve(self, data: bytes) -> None:
        """Answer the complete requests held (and in C{data}) until paused, handed over or closed."""
        buf = self._buffer + data if self._buffer else data
        if self._paused:
            self._buffer = buf
            if len(buf) > MAX_HELD:
                self._overflow()
            return
        pos = 0
        out: list[bytes] = []
        size = 0
        write = self.transport.write
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_HEAD or (len(buf) > pos and self._refusedAlready(buf, pos)):
                    break  # handed over below: twisted.web answers (or refuses) it now
                if out:
                    write(b"".join(out))
                self._buffer = buf[pos:] if pos else buf
                if pos or self._paused:
                    self._headDone()  # a new head (if any) started in this read
                if not self._paused:
                    self._headStarted()
                return
            answer = self.answer(buf[pos:end])
            if answer is None:
                break
            response, close = answer
            out.append(response)
            size += len(response)
            pos = end + 4
            if close:
                write(b"".join(out))
                self._close()
                return
            if size >= FLUSH:
                write(b"".join(out))  # may pause us
                out = []
                size = 0
                if self._paused:
                    self._buffer = buf[pos:]
                    self._headDone()
                    return
        if out:
            write(b"".join(out))
        self._handOver(buf[pos:])

    @staticmethod
    def _refusedAlready(buf: bytes, pos: int) -> bool:
        """
        Whether the incomplete head at C{pos} is one twisted.web would refuse already (a malformed
        request line, control characters, a bare LF): it answers 400 as soon as it sees
        it, where the fast path would wait for the end of a head that may never come.
        """
        line = buf.find(b"\r\n", pos)
        if line >= 0:
            try:  # twisted.web's own check of the request line (private; checked on Twisted 26.10)
                _parseRequestLine(buf[pos:line])
            except ValueError:
                return True
        end = len(buf) - 1 if buf.endswith(b"\r") else len(buf)  # its LF may be in the next read
        return _notFast(buf[pos:end])

    def _overflow(self) -> None:
        """Input kept arriving while paused: the transport ignores pauseProducing.  Cut off."""
        self._buffer = b""
        if self.metrics is not None:
            self.metrics.limit("max_input").value += 1
        self.transport.abortConnection()

    # -- the head timeout

    def _headStarted(self) -> None:
        if self._headTimer is None and self._buffer:
            from twisted.internet import reactor

            clock = getattr(self.site, "reactor", None) or reactor
            self._headTimer = clock.callLater(HEAD_TIMEOUT, self._headTimedOut)
        elif not self._buffer:
            self._headDone()

    def _headDone(self) -> None:
        if self._headTimer is not None:
            if self._headTimer.active():
                self._headTimer.cancel()
            self._headTimer = None

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if self.delegate is None:
            self.transport.write(_REQUEST_TIMEOUT)
            self._close()

    def answer(self, head: bytes) -> tuple[bytes, bool] | None:
        """The response bytes and whether to close after them, or None (not for the fast path)."""
        if _notFast(head):
            return None  # twisted.web's 400
        lines = head.split(b"\r\n")
        if b"\t" in lines[0]:
            return None  # twisted.web splits the request line at any whitespace: a tab makes it 400
        try:
            method, target, version = lines[0].split(b" ")
        except ValueError:
            return None
        if version != b"HTTP/1.1" or (method != b"GET" and method != b"HEAD") or target[:1] != b"/":
            return None
        if not target.isascii():
            return None  # twisted.web refuses some such bytes (> 0xB0), answers others: it decides
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
        found = cachedAnswer(site, headers, target)
        if found is None:
            return None
        started = time.monotonic()
        entry, useGzip, etag, notModified = found
        # twisted.web's reading of Connection: tokens between spaces (a token, not a substring)
        close = b"close" in headers.get(b"connection", b"").lower().split(b" ")
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


def cachedAnswer(site: Any, headers: dict[bytes, bytes], target: bytes) -> tuple[FileEntry, bool, bytes, bool] | None:
    """
    For a GET or HEAD of C{target} with C{headers} (lower-case names, C{host} among them): the
    cached file entry that answers it, whether gzip, the ETag, and whether 304 -- or None when
    the request is not for a cached static file (HTTP/1.1 and HTTP/2 fast paths alike).
    """
    path = target.split(b"?", 1)[0]
    resource = site.hostFor(_HostOnly(headers.get(b"host"))).route(path)
    if type(resource) is not StaticResource:
        return None
    entry = resource.tree.lookup(path)
    if type(entry) is not FileEntry or entry.body is None:
        return None
    useGzip = entry.gzBody is not None and acceptsGzip(headers.get(b"accept-encoding"))
    etag = entry.gzEtag if useGzip else entry.etag
    inm = headers.get(b"if-none-match")
    if inm is not None:
        notModified = etagMatches(inm, etag)
    else:
        since = parseHTTPDate(headers.get(b"if-modified-since"))
        notModified = since is not None and entry.mtime <= since
    return entry, useGzip, etag, notModified


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
