"""
The HTTP/2 engines behind L{netsvc.web.http2}: the same small, sans-I/O interface over
libnghttp2 (the C{ngh2} binding: "native") and over the pure-Python C{h2} ("python").

The protocol in L{netsvc.web.http2} only ever talks to this interface, so both engines serve
the same requests the same way; the native one is ~20x cheaper per request (HPACK, framing
and flow control in C).  Events come out as tuples C{(kind, streamID, a, b)}:

  - C{(REQUEST, sid, headers, endStream)}: a request head (pseudo-headers first, names lower case)
  - C{(DATA, sid, data, endStream)}: request body bytes (acknowledge them with L{ack} once consumed)
  - C{(END, sid, None, None)}: the request is complete (trailers, if any, are dropped)
  - C{(RESET, sid, errorCode, None)}: the client reset the stream
  - C{(CLOSED, sid, errorCode, None)}: the stream is gone (after a response, a reset, or an error)
  - C{(WINDOW, sid, None, None)}: flow-control window opened (sid 0: the connection's)
  - C{(GOAWAY, 0, lastStreamID, errorCode)}: the client is going away

A connection-level protocol violation or a flood the engine refuses raises L{EngineError}
from L{Engine.receive}; the engine has then queued its GOAWAY (write L{Engine.output}, close).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

REQUEST, DATA, END, RESET, CLOSED, WINDOW, GOAWAY = range(7)

#: Error codes (RFC 9113 section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

#: SETTINGS identifiers (RFC 9113 section 6.5.2).
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_HEADER_LIST_SIZE = 0x6

#: Header names that may not appear in an HTTP/2 message (RFC 9113 section 8.2.2); twisted.web's
#: responses may carry them (Connection: close, Transfer-Encoding: chunked).
CONNECTION_HEADERS = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"])


class EngineError(Exception):
    """The connection failed (a protocol violation, a flood); its GOAWAY is queued.
    C{kind} names it for the metrics: C{protocol} or C{flood}."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Engine:
    """What both engines provide (documentation; see L{NativeEngine} and L{PythonEngine})."""

    name = ""
    #: The engine ended the connection itself (a protocol error it answered with GOAWAY): write the
    #: output, then close.
    closed = False

    def start(self, settings: dict[int, int]) -> None: ...
    def receive(self, data: bytes) -> list[tuple[int, int, Any, Any]]: ...  # type: ignore[empty-body]
    def output(self, amount: int | None = None) -> bytes: ...  # type: ignore[empty-body]
    def respond(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None: ...
    def informational(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def send(self, sid: int, data: bytes, end: bool) -> None: ...
    def end(self, sid: int) -> None: ...
    def reset(self, sid: int, code: int) -> None: ...
    def ack(self, sid: int, amount: int) -> None: ...
    def queued(self, sid: int | None = None) -> int: ...  # type: ignore[empty-body]
    def goaway(self, code: int, lastStreamID: int | None) -> None: ...

    def takeClosed(self) -> list[int]:
        """Streams the engine closed by itself since the last call (besides the events)."""
        return []

    #: Streams whose response has started and not yet ended on the wire (closing waits for them).
    active: set[int]


try:
    import ngh2
except ImportError:  # pragma: no cover - the wheel is a dependency; "auto" then uses h2
    ngh2 = None  # type: ignore[assignment]


class NativeEngine(Engine):
    """
    libnghttp2 through C{ngh2} (pinned: alpha, one maintainer -- what netsvc relies on is listed in
    the README's HTTP/2 section and held by tests/web/test_http2.py).  libnghttp2 refuses CONTINUATION
    floods, oversized header lists, SETTINGS and PING-ack floods and malformed requests; rapid reset
    is refused by the protocol's own token bucket (libnghttp2's lets a burst of 1,000 through).
    Request bodies are flow-controlled by hand (C{auto_window_update=False}): the window reopens as
    twisted.web consumes the body, not as it arrives.
    """

    name = "native"

    def __init__(self, maxHeaderList: int = 65536) -> None:
        config = ngh2.Configuration(
            auto_window_update=False,
            max_inbound_header_list_size=maxHeaderList,
            max_inbound_header_count=256,
        )
        self.conn = conn = ngh2.Connection(ngh2.Role.SERVER, config)
        #: Streams whose response has started and not yet ended on the wire.
        self.active: set[int] = set()
        #: libnghttp2 ended the session itself (a connection error it answered with GOAWAY).
        self.closed = False
        # Bound once: this runs per request.
        self.queued = conn.queued_body_size  # type: ignore[method-assign]
        self._events: list[Any] = []
        self._closedIds: list[int] = []
        self._failed = False
        self._final = b""
        self._classes = {
            ngh2.RequestReceived: self._request,
            ngh2.DataReceived: self._data,
            ngh2.TrailersReceived: self._trailers,
            ngh2.StreamReset: self._reset,
            ngh2.StreamClosed: self._closed,
            ngh2.WindowUpdated: self._window,
            ngh2.GoAwayReceived: self._goaway,
        }

    def start(self, settings: dict[int, int]) -> None:
        self.conn.initiate_connection(settings)

    def receive(self, data: bytes) -> list[tuple[int, int, Any, Any]]:
        try:
            self.conn.receive_data(data)
        except ngh2.NGH2Error as e:
            # libnghttp2 has failed the session: nothing more comes out of it (L{goaway} writes the
            # GOAWAY by hand).
            self._fail()
            raise EngineError("flood" if isinstance(e, ngh2.DenialOfServiceError) else "protocol", str(e)) from None
        self._collect()
        events, self._events = self._events, []
        out: list[tuple[int, int, Any, Any]] = []
        classes = self._classes
        for event in events:
            handler = classes.get(type(event))
            if handler is not None:
                handler(event, out)
        return out

    def output(self, amount: int | None = None) -> bytes:
        if self._failed:
            final, self._final = self._final, b""
            return final
        out = self.conn.data_to_send(amount)
        if out:
            self._collect()  # streams closed by what was just framed (their END_STREAM)
        return out

    def _collect(self) -> None:
        events = self.conn.events()
        if events:
            self._events += events
            active = self.active
            for e in events:
                kind = type(e)
                if kind is ngh2.StreamClosed:
                    active.discard(e.stream_id)
                    self._closedIds.append(e.stream_id)
                elif kind is ngh2.ConnectionClosed:
                    # A connection error libnghttp2 handled itself (its GOAWAY is queued): nothing more
                    # will be answered; the caller writes the output and closes.
                    self.closed = True

    def takeClosed(self) -> list[int]:
        """Streams libnghttp2 has closed since the last call (some close as their frames are sent)."""
        closed, self._closedIds = self._closedIds, []
        return closed

    def _fail(self) -> None:
        self._failed = True
        self.active.clear()
        self.queued = lambda sid=None: 0  # type: ignore[method-assign]

    @staticmethod
    def _request(e: Any, out: list) -> None:
        out.append((REQUEST, e.stream_id, e.headers, e.end_stream))

    @staticmethod
    def _data(e: Any, out: list) -> None:
        out.append((DATA, e.stream_id, e.data, e.end_stream))

    @staticmethod
    def _trailers(e: Any, out: list) -> None:
        out.append((END, e.stream_id, None, None))

    @staticmethod
    def _reset(e: Any, out: list) -> None:
        out.append((RESET, e.stream_id, e.error_code, None))

    @staticmethod
    def _closed(e: Any, out: list) -> None:
        out.append((CLOSED, e.stream_id, e.error_code, None))

    @staticmethod
    def _window(e: Any, out: list) -> None:
        out.append((WINDOW, e.stream_id, None, None))

    @staticmethod
    def _goaway(e: Any, out: list) -> None:
        out.append((GOAWAY, 0, e.last_stream_id, e.error_code))

    def respond(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.conn.send_response(sid, headers, end_stream=end)
        except ngh2.NGH2Error:
            return  # reset by the client meanwhile
        self.active.add(sid)

    def informational(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn.send_informational_response(sid, headers)
        except ngh2.NGH2Error:
            pass

    def send(self, sid: int, data: bytes, end: bool) -> None:
        try:
            self.conn.send_data(sid, data, end_stream=end)
        except ngh2.NGH2Error:
            pass

    def end(self, sid: int) -> None:
        try:
            self.conn.end_stream(sid)
        except ngh2.NGH2Error:
            pass

    def reset(self, sid: int, code: int) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except ngh2.NGH2Error:
            pass

    def ack(self, sid: int, amount: int) -> None:
        if amount:
            try:
                self.conn.acknowledge_received_data(amount, sid)
            except ngh2.NGH2Error:
                pass  # the stream is gone: libnghttp2 has given the connection window back

    def goaway(self, code: int, lastStreamID: int | None) -> None:
        if self._failed:
            self._final = goawayFrame(code, lastStreamID or 0)
            return
        try:
            self.conn.send_goaway(code, last_stream_id=lastStreamID)
        except ngh2.NGH2Error:
            pass  # already going away


def goawayFrame(code: int, lastStreamID: int) -> bytes:
    """A GOAWAY frame (RFC 9113 section 6.8), for an engine that can no longer make one."""
    header = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # length 8, type GOAWAY, no flags, stream 0
    return header + (lastStreamID & 0x7FFFFFFF).to_bytes(4, "big") + code.to_bytes(4, "big")


try:
    import hpack
except ImportError:  # pragma: no cover - comes with h2
    hpack = None  # type: ignore[assignment]

#: Response header blocks encoded without a dynamic table, shared by every connection: such a block
#: depends on nothing but its headers (a cached file's are the same all second long).
_BLOCKS: dict[tuple, bytes] = {}
_MAX_BLOCKS = 1024

if hpack is not None:

    class _StatelessEncoder(hpack.Encoder):  # type: ignore[misc,valid-type]
        """
        HPACK with a dynamic table of size 0, so that a response's header block is encoded once and
        reused (pure-Python HPACK was a third of a response's cost).  An encoder may always use less
        table than the decoder allows (RFC 7541 section 4.2): the client's SETTINGS_HEADER_TABLE_SIZE
        changes nothing here.
        """

        def __init__(self) -> None:
            super().__init__()
            hpack.Encoder.header_table_size.fset(self, 0)  # announced in the first block

        @property  # type: ignore[override]
        def header_table_size(self) -> int:
            return 0

        @header_table_size.setter
        def header_table_size(self, value: int) -> None:
            pass

        def encode(self, headers: Any, huffman: bool = True) -> bytes:
            if self.table_size_changes:  # the first block says "size 0": not shareable
                return super().encode(headers, huffman)
            key = tuple(headers)
            block = _BLOCKS.get(key)
            if block is None:
                if len(_BLOCKS) >= _MAX_BLOCKS:
                    _BLOCKS.clear()
                block = _BLOCKS[key] = super().encode(key, huffman)
            return block


try:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import h2.exceptions
    import h2.settings
except ImportError:  # pragma: no cover - h2 comes with twisted[http2]
    h2 = None  # type: ignore[assignment]


class PythonEngine(Engine):
    """
    The fallback on C{h2} (where C{ngh2} cannot be imported).  h2 sends DATA only within the
    client's window and one frame size at a time, so this engine keeps each stream's unsent body
    (what libnghttp2 queues itself) and frames as much as the windows allow at every L{output}.
    Outbound headers are not re-validated (they are ours, lower case, no connection headers): h2's
    validation was a quarter of a response's cost; their HPACK blocks are made once and shared
    (L{_StatelessEncoder}).  A rapid-reset flood is refused by the protocol's
    own token bucket (L{netsvc.web.http2}), as h2 has none.
    """

    name = "python"

    def __init__(self, maxHeaderList: int = 65536) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.DEFAULT_MAX_HEADER_LIST_SIZE = maxHeaderList
        self.conn.encoder = _StatelessEncoder()
        #: Streams whose response has started and not yet ended on the wire.
        self.active: set[int] = set()
        #: A graceful GOAWAY, written by hand: h2's own stops every stream at once (it closes its state).
        self._extra = b""
        #: Per stream: unsent body chunks, and whether END_STREAM follows them.
        self._pending: dict[int, deque[bytes]] = {}
        self._ending: set[int] = set()
        self._queued: dict[int, int] = {}

    def start(self, settings: dict[int, int]) -> None:
        conn = self.conn
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={codes.MAX_HEADER_LIST_SIZE: conn.DEFAULT_MAX_HEADER_LIST_SIZE}
        )
        conn.initiate_connection()
        conn.update_settings(settings)

    def receive(self, data: bytes) -> list[tuple[int, int, Any, Any]]:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.DenialOfServiceError as e:
            self.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            raise EngineError("flood", str(e) or type(e).__name__) from None
        except h2.exceptions.ProtocolError as e:
            raise EngineError("protocol", str(e) or type(e).__name__) from None
        out: list[tuple[int, int, Any, Any]] = []
        ended: set[int] = set()  # streams whose end rode on their HEADERS or DATA (h2 also says StreamEnded)
        ev = h2.events
        for e in events:
            t = type(e)
            if t is ev.RequestReceived:
                if not _wellFormed(e.headers, e.stream_ended is not None):
                    self.reset(e.stream_id, PROTOCOL_ERROR)  # what libnghttp2 does with it
                    ended.add(e.stream_id)
                    continue
                end = e.stream_ended is not None
                if end:
                    ended.add(e.stream_id)
                out.append((REQUEST, e.stream_id, e.headers, end))
            elif t is ev.DataReceived:
                end = e.stream_ended is not None
                if end:
                    ended.add(e.stream_id)
                out.append((DATA, e.stream_id, e.data, end))
                pad = e.flow_controlled_length - len(e.data)
                if pad > 0:
                    self.ack(e.stream_id, pad)  # padding is nobody's to consume
            elif t is ev.StreamEnded:
                if e.stream_id not in ended:
                    out.append((END, e.stream_id, None, None))
            elif t is ev.StreamReset:
                self._forget(e.stream_id)
                self.active.discard(e.stream_id)
                out.append((RESET, e.stream_id, e.error_code, None))
                out.append((CLOSED, e.stream_id, e.error_code, None))
            elif t is ev.WindowUpdated:
                out.append((WINDOW, e.stream_id, None, None))
            elif t is ev.ConnectionTerminated:
                out.append((GOAWAY, 0, e.last_stream_id, e.error_code))
            elif t is ev.RemoteSettingsChanged:
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings:
                    out.append((WINDOW, 0, None, None))
        return out

    def output(self, amount: int | None = None) -> bytes:
        if self._pending:
            self._frame()
        out = self.conn.data_to_send(amount) if amount is not None else self.conn.data_to_send()
        if self._extra:
            out, self._extra = self._extra + out, b""
        return out

    def _frame(self) -> None:
        """Frame each stream's pending body as far as the windows go (what libnghttp2 does inside)."""
        conn = self.conn
        for sid in list(self._pending):
            chunks = self._pending[sid]
            try:
                while chunks:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk = chunks[0]
                    if len(chunk) > window:
                        chunks[0] = chunk[window:]
                        chunk = chunk[:window]
                    else:
                        chunks.popleft()
                    self._queued[sid] -= len(chunk)
                    last = not chunks and sid in self._ending
                    conn.send_data(sid, chunk, end_stream=last)
                    if last:
                        self.active.discard(sid)
            except h2.exceptions.ProtocolError:  # the stream was reset or closed meanwhile
                chunks.clear()
            if not chunks:
                self._forget(sid)

    def _forget(self, sid: int) -> None:
        self._pending.pop(sid, None)
        self._queued.pop(sid, None)
        self._ending.discard(sid)

    def respond(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError:
            return  # reset by the client meanwhile
        if not end:
            self.active.add(sid)

    def informational(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn.send_headers(sid, headers)
        except h2.exceptions.ProtocolError:
            pass

    def send(self, sid: int, data: bytes, end: bool) -> None:
        if data:
            self._pending.setdefault(sid, deque()).append(bytes(data))
            self._queued[sid] = self._queued.get(sid, 0) + len(data)
        if end:
            self.end(sid)

    def end(self, sid: int) -> None:
        if self._pending.get(sid):
            self._ending.add(sid)
            return
        self._forget(sid)
        self.active.discard(sid)
        try:
            self.conn.end_stream(sid)
        except h2.exceptions.ProtocolError:
            pass

    def reset(self, sid: int, code: int) -> None:
        self._forget(sid)
        self.active.discard(sid)
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            pass

    def ack(self, sid: int, amount: int) -> None:
        if amount:
            try:
                self.conn.acknowledge_received_data(amount, sid)
            except h2.exceptions.ProtocolError:
                # The stream is gone; the connection's window still needs the bytes back.
                self.conn.increment_flow_control_window(amount)

    def queued(self, sid: int | None = None) -> int:
        if sid is None:
            return sum(self._queued.values())
        return self._queued.get(sid, 0)

    def goaway(self, code: int, lastStreamID: int | None) -> None:
        if code == NO_ERROR:
            # Graceful: the streams already open are still answered, so h2 must stay open.
            self._extra += goawayFrame(code, lastStreamID or 0)
            return
        try:
            self.conn.close_connection(code, last_stream_id=lastStreamID)
        except h2.exceptions.ProtocolError:
            pass


#: What libnghttp2 accepts in :authority (nghttp2_check_authority: RFC 3986's authority characters)
#: and in :method (a token); h2 checks neither, and a Host of "a/b" would reach the routing.
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:@\[\]]*")
_TOKEN = re.compile(rb"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
#: :path: visible ASCII and obs-text, no space or control character (nghttp2_check_path).
_PATH = re.compile(rb"[\x21-\x7e\x80-\xff]+")


def _wellFormed(headers: Any, ended: bool = False) -> bool:
    """
    The request head as libnghttp2 checks it, so that both engines refuse the same: the pseudo-headers;
    an authority (C{:authority} or C{host}), neither empty; a Content-Length other than 0 on a request
    that ended with its HEADERS (RFC 9113 8.1.1).
    """
    authority = False
    for name, value in headers:
        if name[:1] != b":":
            if name == b"host":
                if not value or _AUTHORITY.fullmatch(value) is None:
                    return False
                authority = True
            elif ended and name == b"content-length" and value.strip(b" \t") != b"0":
                return False
            continue
        if name == b":authority":
            ok = _AUTHORITY.fullmatch(value) if value else None
            authority = True
        elif name == b":method":
            ok = _TOKEN.fullmatch(value)
        elif name == b":path":  # origin form, or * (OPTIONS)
            ok = _PATH.fullmatch(value) if value[:1] == b"/" or value == b"*" else None
        elif name == b":protocol":
            return False  # extended CONNECT (RFC 8441): not offered (no SETTINGS_ENABLE_CONNECT_PROTOCOL)
        else:
            continue
        if ok is None:
            return False
    return authority


def available(mode: str) -> str | None:
    """The engine C{mode} (auto, native, python) gives on this machine, or None (none can be imported)."""
    if mode in ("auto", "native") and ngh2 is not None:
        return "native"
    if mode in ("auto", "python") and h2 is not None:
        return "python"
    return None


def makeEngine(name: str, maxHeaderList: int = 65536) -> Engine:
    """A fresh engine for one connection: C{name} from L{available}."""
    if name == "native":
        return NativeEngine(maxHeaderList)
    return PythonEngine(maxHeaderList)


def describe(name: str | None) -> str:
    """What C{/status} says of the engine in use, e.g. C{native (libnghttp2 1.64.0, ngh2 0.3.0)}."""
    from importlib.metadata import PackageNotFoundError, version

    if name is None:
        return "off"
    package = "ngh2" if name == "native" else "h2"
    try:
        where = f"{package} {version(package)}"
    except PackageNotFoundError:  # pragma: no cover
        where = package
    return f"{name} ({'libnghttp2 via ' if name == 'native' else 'pure Python, '}{where})"
