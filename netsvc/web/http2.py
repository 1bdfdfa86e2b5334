"""
HTTP/2 for the web service, lean: what L{netsvc.web.fast} is for HTTP/1.1.

L{H2Channel} drives an engine from L{netsvc.web.h2engine} (libnghttp2, or h2 where it cannot be
imported).  A request for a cached static file (GET or HEAD, no body, only headers the fast path
understands) is answered on the spot from per-file precomputed header lists and the per-second
prefix the site keeps, its body on one DATA frame with END_STREAM.  Every other request is a
twisted.web request on its own stream: twisted.web's L{H2Stream} is that request's channel, with
this connection behind it (proxy routes, admin pages, C{/chat/}, listings, ranges, large files,
request bodies, errors), so HTTP/2 serves exactly what HTTP/1.1 does.

One read gives one write: all the frames the requests in a read produce (and the SETTINGS, PING
and WINDOW_UPDATE answers) go out together.  Limits (issue 18's rule): at most L{MAX_STREAMS}
streams open at once; a stream's producer (a file from disk, a proxied body) is paused once
L{STREAM_BUFFER} bytes wait for the client's flow-control window; when the transport's buffer is
full, no frame is taken from the engine, no stream produces and nothing is read (input already
read is held, at most L{MAX_HELD}); request bodies are flow-controlled by what twisted.web has
consumed.  Rapid reset is refused by a token bucket (both engines); CONTINUATION and other floods
by the engine.  Each ends the connection with GOAWAY and is counted, never logged as a traceback.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._http2 import H2Stream  # Twisted-private, checked on 26.10: a request's stream channel
from zope.interface import implementer

from netsvc.web import pages
from netsvc.web.fast import _FAST_HEADERS, _Record, cachedAnswer
from netsvc.web.h2engine import (
    CANCEL,
    CLOSED,
    CONNECTION_HEADERS,
    DATA,
    END,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_LIST_SIZE,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    REQUEST,
    RESET,
    WINDOW,
    EngineError,
    makeEngine,
)

#: Streams a client may have open at once (libnghttp2's and h2's default; nginx's is 128).  Clients
#: open this many in their first flight, before they have read our SETTINGS (curl, h2load, Go); a
#: smaller cap makes libnghttp2 refuse the rest.  A cached file's body is queued by reference (the
#: cache's own bytes), a streamed one is held to L{STREAM_BUFFER} per stream.
MAX_STREAMS = 100

#: Bytes a stream's producer (a file from disk, a proxied body) may have waiting for the client's
#: window before it is paused: 100 streams x 32 KB, ~3 MB, is the most a connection holds.
STREAM_BUFFER = 32768

#: Frames are taken from the engine this many bytes at a time, the transport asked in between.
FLUSH = 65536

#: Input held while the transport has paused us (what one read, or one TLS record batch, gave).
MAX_HELD = 4 * 65536

#: Largest request header list accepted (decoded, RFC 9113's accounting).
MAX_HEADER_LIST = 65536

#: Client stream resets: a burst, then this many a second (CVE-2023-44487, "rapid reset").
RESET_BURST = 200
RESET_RATE = 33.0

#: After the connection is closed for a fault, a client that does not read is cut off this much later.
ABORT_GRACE = 2.0


def _lower(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response headers as HTTP/2 has them: lower case, no connection-specific ones."""
    out = []
    for name, value in headers:
        name = name.lower()
        if name not in CONNECTION_HEADERS:
            out.append((name, value))
    return out


@implementer(IPushProducer)
class H2Channel(Protocol):
    """One HTTP/2 connection of a L{netsvc.web.site.WebSite} (see the module docstring)."""

    metrics: Any = None
    _paused = False
    _dispatching = False
    _closing = False
    _flushing = False
    _flushAgain = False
    #: loseConnection called (the transport goes once what is written has left).
    _closed = False
    _gone = False
    _abortCall: Any = None

    def __init__(self, site: Any, engine: str, metrics: Any = None) -> None:
        self.site = site
        self.engine = makeEngine(engine, MAX_HEADER_LIST)
        self.metrics = metrics
        #: Streams answered by twisted.web, by ID.
        self.streams: dict[int, H2Stream] = {}
        #: The stream whose twisted.web request is being built (it may be refused from its head: 413).
        self._building = 0
        self._buildingRefused = False
        #: Refused streams to reset (RST_STREAM NO_ERROR) once their whole answer has left the engine.
        self._resetAfter: set[int] = set()
        self._held: list[bytes] = []
        self._heldSize = 0
        self._lastStream = 0
        self._resetTokens = float(RESET_BURST)
        self._resetStamp = time.monotonic()
        self._secure = False

    # -- the connection

    def connectionMade(self) -> None:
        self._secure = ISSLTransport.providedBy(self.transport)
        self.engine.start({MAX_CONCURRENT_STREAMS: MAX_STREAMS, MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
        self.transport.registerProducer(self, True)
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        if self._paused:
            self._held.append(data)
            self._heldSize += len(data)
            if self._heldSize > MAX_HELD:
                self._count("limit", "max_input")
                self._abort()
            return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        engine = self.engine
        try:
            events = engine.receive(data)
        except EngineError as e:
            self._count("error", "h2_" + e.kind)
            engine.goaway(ENHANCE_YOUR_CALM if e.kind == "flood" else PROTOCOL_ERROR, self._lastStream)
            self._flush(always=True)
            self._close()
            return
        if engine.closed:  # a connection error the engine answered itself: nothing more is answered
            self._flush(always=True)  # (counts it and closes)
            return
        self._dispatching = True
        try:
            self._dispatch(events)
        finally:
            self._dispatching = False
        self._flush()

    def _dispatch(self, events: list[tuple[int, int, Any, Any]]) -> None:
        resets = None
        for kind, sid, _a, _b in events:
            if kind == RESET:
                resets = resets or set()
                resets.add(sid)
        windowed = False
        for kind, sid, a, b in events:
            if kind == REQUEST:
                if self._closing:
                    self.engine.reset(sid, REFUSED_STREAM)  # after our GOAWAY: the client may retry it
                    continue
                if sid > self._lastStream:
                    self._lastStream = sid
                if resets is not None and sid in resets:
                    self._countReset()  # reset in the same read: nothing to answer
                    continue
                self._request(sid, a, b)
            elif kind == DATA:
                stream = self.streams.get(sid)
                if stream is None:
                    self.engine.ack(sid, len(a))  # refused, reset or answered already: dropped
                else:
                    stream.receiveDataChunk(a, len(a))
                    if b:
                        stream.requestComplete()
            elif kind == END:
                stream = self.streams.get(sid)
                if stream is not None:
                    stream.requestComplete()
            elif kind == RESET:
                self._resetAfter.discard(sid)
                stream = self.streams.pop(sid, None)
                if stream is not None:
                    self._countReset()
                    stream.connectionLost(Failure(ConnectionLost("Stream reset with code %s" % a)))
                if not self._spendResetToken():
                    self._count("error", "h2_flood")
                    self.engine.goaway(ENHANCE_YOUR_CALM, self._lastStream)
                    self._flush(always=True)
                    self._close()
                    return
            elif kind == CLOSED:
                self._resetAfter.discard(sid)
                stream = self.streams.pop(sid, None)
                if stream is not None:  # the engine ended it (a body shorter than its Content-Length ...)
                    stream.connectionLost(Failure(ConnectionLost("Stream closed with code %s" % a)))
            elif kind == WINDOW:
                windowed = True
            elif kind == GOAWAY:
                self._closing = True
        if windowed:
            self._wakeProducers()

    def _request(self, sid: int, headers: Any, ended: bool) -> None:
        if ended and self._fast(sid, headers):
            return
        if headers[0] == (b":method", b"CONNECT") or (b":method", b"CONNECT") in headers:
            self._refuse(sid, 405, fresh=True)  # no tunnels here (twisted.web would fail on its missing :path)
            return
        self._building, self._buildingRefused = sid, False
        try:
            stream = H2Stream(sid, self, headers, self.site.requestFactory, self.site, self.site)
        finally:
            self._building = 0
        if self._buildingRefused:  # answered while its head was read (413 on Content-Length)
            return
        self.streams[sid] = stream
        if ended:
            stream.requestComplete()

    def _fast(self, sid: int, headers: Any) -> bool:
        """Answer a request for a cached static file here; False: twisted.web answers it."""
        method = target = None
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    fields[b"host"] = value
                elif name != b":scheme":
                    return False  # :protocol (extended CONNECT): twisted.web refuses it
            elif name in _FAST_HEADERS:
                if name in fields:
                    if name == b"cookie":
                        continue  # HTTP/2 splits cookies; the fast path does not read them
                    return False
                fields[name] = value
            else:
                return False
        if (method != b"GET" and method != b"HEAD") or target is None or target[:1] != b"/":
            return False
        if fields.get(b"content-length", b"0") != b"0" or b"host" not in fields or not target.isascii():
            return False
        started = time.monotonic()
        site = self.site
        found = cachedAnswer(site, fields, target)
        if found is None:
            return False
        entry, useGzip, etag, notModified = found
        if notModified:
            code = 304
            response = [(b":status", b"304"), *site.h2Prefix(self._secure), (b"etag", etag),
                        (b"last-modified", entry.lastModified)]
            if entry.compressible or entry.hasGzip:
                response.append((b"vary", b"Accept-Encoding"))
            body = b""
        else:
            code = 200
            response = [(b":status", b"200"), *site.h2Prefix(self._secure), *_entryHeaders(entry, useGzip)]
            body = (entry.gzBody if useGzip else entry.body) if method == b"GET" else b""
        engine = self.engine
        if body:
            engine.respond(sid, response, False)
            engine.send(sid, body, True)  # END_STREAM on the DATA frame
        else:
            engine.respond(sid, response, True)
        onRequest = site.onRequest
        if onRequest is not None:
            record = _Record(method, target, fields, self.transport.getPeer(), started)
            record.clientproto = b"HTTP/2"
            record.code = code
            record.sentLength = len(body)
            onRequest(record)
        return True

    # -- what an H2Stream (twisted.web's per-stream channel) calls

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: list, streamID: int) -> None:
        if streamID in self.streams:
            self.engine.respond(streamID, [(b":status", code), *_lower(headers)], False)
            self._flushSoon()

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        stream = self.streams.get(streamID)
        if stream is None or not data:
            return
        self.engine.send(streamID, data, False)
        self._flushSoon()
        if self.remainingOutboundWindow(streamID) <= 0:
            stream.flowControlBlocked()

    def endRequest(self, streamID: int) -> None:
        if self.streams.pop(streamID, None) is not None:
            self.engine.end(streamID)
            self._flushSoon()  # (going away: closes once this was the last)

    def abortRequest(self, streamID: int) -> None:
        if self.streams.pop(streamID, None) is not None:
            self.engine.reset(streamID, CANCEL)
            self._flushSoon()

    def remainingOutboundWindow(self, streamID: int) -> int:
        """Room before the stream's producer is paused: L{STREAM_BUFFER} less what waits in the engine."""
        return STREAM_BUFFER - self.engine.queued(streamID)

    def openStreamWindow(self, streamID: int, increment: int) -> None:
        self.engine.ack(streamID, increment)
        self._flushSoon()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def _isSecure(self) -> bool:
        return self._secure

    def _send100Continue(self, streamID: int) -> None:
        self.engine.informational(streamID, [(b":status", b"100")])
        self._flushSoon()

    def _respondToBadRequestAndDisconnect(self, streamID: int) -> None:
        """twisted.web's answer to a malformed request (an invalid Content-Length ...): 400."""
        self._refuse(streamID, 400)

    def refuseBody(self, streamID: int) -> None:
        """A request body over the site's limit: 413, and the client asked to stop sending."""
        self._refuse(streamID, 413)

    def streamGone(self, streamID: int) -> bool:
        """Whether the stream has been reset or answered already (L{netsvc.web.site.WebRequest})."""
        return streamID not in self.streams

    def _refuse(self, streamID: int, code: int, fresh: bool = False) -> None:
        """Answer C{code} at once and stop the stream (C{fresh}: one not handed to twisted.web); its
        request body, if any more comes, is dropped."""
        if streamID == self._building:
            if self._buildingRefused:
                return
            self._buildingRefused = True
        elif not fresh and streamID not in self.streams:
            return  # answered already
        stream = self.streams.pop(streamID, None)
        body = pages.errorBody(code)
        headers = [(b":status", b"%d" % code), *self.site.h2Prefix(self._secure),
                   (b"content-type", b"text/html; charset=utf-8"), (b"content-length", b"%d" % len(body))]
        engine = self.engine
        engine.respond(streamID, headers, False)
        engine.send(streamID, body, True)
        # RFC 9113 section 8.1: a complete response, then RST_STREAM(NO_ERROR) stops the upload -- once
        # the response has left whole (the client's window may hold part of it back).
        self._resetAfter.add(streamID)
        self._flushSoon()
        if stream is not None:
            stream.connectionLost(Failure(ConnectionLost("Request refused with %d" % code)))

    # -- writing

    def _flushSoon(self) -> None:
        """Frames go out at the end of the read being handled, or now when called from elsewhere
        (a producer, a proxied response arriving)."""
        if not self._dispatching:
            self._flush()

    def _flush(self, always: bool = False) -> None:
        """
        Hand the engine's frames to the transport, L{FLUSH} bytes at a time, until it pauses us; then
        let paused producers go on (what they were waiting for has left the engine) and send what
        they write.  (Woken only on WINDOW_UPDATE, a producer whose bytes were still in the engine
        then stalled for good with a client that updates its window at half of it, as curl does.)
        """
        transport = self.transport
        if transport is None or self._gone or (self._paused and not always):
            return
        if self._flushing:
            self._flushAgain = True  # a producer woken below wrote: the loop below sends it
            return
        self._flushing = True
        try:
            output = self.engine.output
            while True:
                self._flushAgain = False
                wrote = False
                while True:
                    out = output(FLUSH)
                    if not out:
                        break
                    transport.write(out)
                    wrote = True
                    if self._paused and not always:
                        break
                if wrote:
                    self._forgetClosed()
                if wrote and not self._paused:
                    if self._resetAfter:
                        self._resetAnswered()
                    self._wakeProducers()
                if not self._flushAgain or (self._paused and not always):
                    break
        finally:
            self._flushing = False
        if self._closed:
            return
        if self.engine.closed:
            self._count("error", "h2_protocol")
            self._close()
        elif self._closing and not self._dispatching:
            self._closeWhenDone()

    def _forgetClosed(self) -> None:
        """Let go of twisted.web streams the engine has closed itself (a stream error it answered with
        RST_STREAM: a body shorter than its Content-Length ...); they held their request for good."""
        for sid in self.engine.takeClosed():
            self._resetAfter.discard(sid)
            stream = self.streams.pop(sid, None)
            if stream is not None:
                stream.connectionLost(Failure(ConnectionLost("Stream closed by the HTTP/2 engine")))

    def _resetAnswered(self) -> None:
        """RST_STREAM(NO_ERROR) for refused streams whose answer has now left the engine whole."""
        engine = self.engine
        for sid in [sid for sid in self._resetAfter if not engine.queued(sid)]:
            self._resetAfter.discard(sid)
            engine.reset(sid, NO_ERROR)
            self._flushAgain = True

    def _wakeProducers(self) -> None:
        """Window opened or output drained: streams whose producer was paused may go on."""
        for stream in list(self.streams.values()):
            if stream.producer is not None and not stream._producerProducing:
                stream.windowUpdated()  # resumes it if its buffer is below STREAM_BUFFER again

    # -- as the transport's producer

    def pauseProducing(self) -> None:
        if self._paused:
            return
        self._paused = True
        for stream in list(self.streams.values()):
            stream.flowControlBlocked()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused or self._gone:
            return
        self._paused = False
        self._flush()
        while self._held and not self._paused and not self._gone:
            data = b"".join(self._held)
            self._held = []
            self._heldSize = 0
            self._receive(data)
        if not self._paused and not self._gone:
            self._wakeProducers()
            if self.transport is not None and not self._closed:
                self.transport.resumeProducing()  # (going away too: WINDOW_UPDATEs let answers finish)

    def stopProducing(self) -> None:
        self._paused = True
        self._held = []

    # -- closing

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY (streams already opened are still answered), then close."""
        if self._closing or self._gone:
            return
        self._closing = True
        self.engine.goaway(NO_ERROR, self._lastStream)
        self._flush(always=True)  # (and closes, if nothing is under way)

    def _closeWhenDone(self) -> None:
        """Going away: close once every stream is answered and every response body has left the engine
        (a body still waiting for the client's window would be cut off).  A client that never opens its
        window is aborted by the service's drain deadline or the idle timeout."""
        engine = self.engine
        if not self.streams and not engine.active and not engine.queued():
            self._close()

    def timedOut(self) -> None:
        """The idle timeout: GOAWAY and close."""
        self._closing = True
        self.engine.goaway(NO_ERROR, self._lastStream)
        self._flush(always=True)
        self._close()

    def _close(self) -> None:
        """Close after what is written; a client that does not read it is cut off later."""
        transport = self.transport
        if self._gone or transport is None or self._closed:
            return
        self._closing = self._closed = True
        transport.unregisterProducer()  # (with a paused producer registered, TCP and TLS never close)
        transport.loseConnection()
        clock = getattr(self.site, "reactor", None)
        if clock is not None:
            self._abortCall = clock.callLater(ABORT_GRACE, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        if not self._gone and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._gone:
            return
        self._gone = True
        self._paused = True
        self._held = []
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.connectionLost(reason if reason is not None else Failure(ConnectionLost()))

    # -- accounting

    def _countReset(self) -> None:
        self.site.countReset()

    def _spendResetToken(self) -> bool:
        now = time.monotonic()
        self._resetTokens = min(RESET_BURST, self._resetTokens + (now - self._resetStamp) * RESET_RATE)
        self._resetStamp = now
        if self._resetTokens < 1:
            return False
        self._resetTokens -= 1
        return True

    def _count(self, family: str, kind: str) -> None:
        metrics = self.metrics
        if metrics is not None:
            getattr(metrics, family)(kind).value += 1


def _entryHeaders(entry: Any, gzip: bool) -> list[tuple[bytes, bytes]]:
    """An entry's 200 headers as HTTP/2 has them, made once and kept on the entry."""
    cache = entry.h2Headers
    if cache is None:
        cache = entry.h2Headers = (_lower(entry.headers), _lower(entry.gzHeaders))
    return cache[1] if gzip else cache[0]
