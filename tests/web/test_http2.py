"""
HTTP/2 on the lean path (issue 19), over loopback TLS, on both engines (native: libnghttp2 via
ngh2; python: h2): one request table through every path (HTTP/1.1 fast, HTTP/1.1 twisted.web,
HTTP/2 native, HTTP/2 python) with the same status, body and user-visible headers; flow control
with a client window smaller than the file; rapid-reset and CONTINUATION floods end the connection
quietly and are counted; graceful shutdown sends GOAWAY; WebSocket over HTTP/2 is refused cleanly;
the access log and the metrics see HTTP/2 requests.

The HTTP/2 clients are blocking h2 (or hand-made hyperframe) clients over ssl sockets, run in a
thread (the pattern of tests/web/test_h2.py); every loop is bounded by a deadline.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, reactor, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server

from tests.helpers import sleep, startDaemon, stateDir
from tests.web._support import SMALL, TEXT, TLS, get, makeRoot, webPort

#: The headers a user sees that must agree between every path.
COMPARED = (
    "content-type",
    "content-length",
    "etag",
    "last-modified",
    "content-encoding",
    "content-range",
    "vary",
    "location",
    "allow",
    "cache-control",
    "x-content-type-options",
    "strict-transport-security",
)

#: The request body limit of the table's daemons (limits.max_message), and a body over it.
MAX_BODY = 4096
OVER = b"b" * (2 * MAX_BODY)

ENGINES = ("native", "python")


# -- the daemons


class Echo(resource.Resource):
    """The proxy's upstream: answers C{<method> <uri>\\n<body>} as text/plain."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Cache-Control", b"no-store")
        return request.method + b" " + request.uri + b"\n" + request.content.read()


@defer.inlineCallbacks
def startUpstream(testCase: Any) -> Any:
    site = server.Site(Echo())
    site.noisy = False
    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


def startSite(testCase: Any, engine: str, extra: str = "", top: str = "", root: Path | None = None) -> Any:
    """
    A daemon serving C{root} (made by L{makeRoot} when None) over tls:0 and tcp:0, HTTP/2 on
    C{engine}; C{extra}: more lines under services.web, C{top}: lines before C{services:}.
    Sets C{daemon.root}, C{daemon.port} (TLS) and C{daemon.cafile}.
    """
    if root is None:
        base = Path(testCase.mktemp()).absolute()
        base.mkdir(parents=True)
        root = makeRoot(base)
    yaml = (
        top + "services:\n  web:\n    listen:\n"
        '      - "tls:0:interface=127.0.0.1"\n      - "tcp:0:interface=127.0.0.1"\n'
        f"    root: {root}\n    cache: {{max_file_size: 128KiB}}\n    http2: {engine}\n" + extra
    )
    daemon = startDaemon(testCase, yaml)
    daemon.root = root
    daemon.port = webPort(daemon, TLS)
    daemon.cafile = str(stateDir(daemon) / "tls" / "selfsigned.pem")
    return daemon


def errorsLogged(events: list[dict[str, Any]]) -> list[str]:
    """Log events at error or critical level, or carrying a failure (a traceback)."""
    bad = []
    for e in events:
        level = e.get("log_level")
        if "log_failure" in e or level in (LogLevel.error, LogLevel.critical):
            failure = e.get("log_failure")
            bad.append(f"{e.get('log_namespace')}: {e.get('log_format')!r} {failure and failure.getTraceback()}")
    return bad


def observeLog(testCase: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def counterValue(daemon: Any, name: str, **labels: str) -> float:
    """A counter's value in the daemon's registry (as /metrics renders it); 0 when absent."""
    total = 0.0
    for line in daemon.context.metrics.render().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def h2ErrorCounts(daemon: Any) -> dict[str, float]:
    """netsvc_errors_total of the web service, kinds h2_* and stream_reset."""
    out: dict[str, float] = {}
    for line in daemon.context.metrics.render().splitlines():
        if line.startswith("netsvc_errors_total{") and 'service="web"' in line:
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            if kind.startswith("h2_") or kind == "stream_reset":
                out[kind] = float(line.rsplit(" ", 1)[1])
    return out


# -- an HTTP/2 client (run in a thread)


def h2Socket(portNumber: int, cafile: str, timeout: float = 1.0) -> Any:
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", portNumber), timeout=5)
    s = context.wrap_socket(raw, server_hostname="localhost")
    if s.selected_alpn_protocol() != "h2":
        s.close()
        raise AssertionError(f"ALPN chose {s.selected_alpn_protocol()!r}, not h2")
    s.settimeout(timeout)
    return s


class Result:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False
        self.reset: int | None = None

    def __repr__(self) -> str:
        return f"<h2 {self.status} ended={self.ended} reset={self.reset} {bytes(self.body[:60])!r}>"


class H2Client:
    """
    A blocking h2 client on one TLS connection.  C{window}: the SETTINGS_INITIAL_WINDOW_SIZE it
    announces (and, when larger than the default, the connection window it opens);
    C{ackDelay}: seconds it waits before acknowledging each DATA frame (a slow reader).
    """

    def __init__(
        self, portNumber: int, cafile: str, window: int = 1 << 24, ackDelay: float = 0.0, validate: bool = True
    ) -> None:
        import h2.config
        import h2.connection
        import h2.settings

        self.conn = conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=validate)
        )
        # h2 treats a received GOAWAY as the end of everything and refuses the frames that follow it,
        # while RFC 9113 (section 6.8) lets streams up to its last stream ID go on: this client goes on.
        machine = conn.state_machine
        process = machine.process_input

        def processInput(input_: Any) -> Any:
            if input_ is h2.connection.ConnectionInputs.RECV_GOAWAY:
                return []
            return process(input_)

        machine.process_input = processInput
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        if window > 65535:
            conn.increment_flow_control_window(min(window * 8, 2**31 - 1) - 65535)
        self.ackDelay = ackDelay
        self.results: dict[int, Result] = {}
        self.goaway: Any = None
        self.closed = False
        self.gotSettings = False
        #: What happened, in order (event class names, "EOF", a socket error).
        self.log: list[str] = []
        self.sock = h2Socket(portNumber, cafile)
        self.sock.sendall(conn.data_to_send())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
             pseudo: list[tuple[str, str]] | None = None, endStream: bool | None = None) -> int:
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        if pseudo is None:
            pseudo = [(":method", method), (":path", path), (":scheme", "https"), (":authority", "localhost")]
        fields = [(k.encode(), v.encode()) for k, v in pseudo]
        fields += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        end = (not body) if endStream is None else endStream
        conn.send_headers(sid, fields, end_stream=end)
        if body:
            size = conn.max_outbound_frame_size
            for i in range(0, len(body), size):
                conn.send_data(sid, body[i : i + size], end_stream=i + size >= len(body))
        self.results[sid] = Result()
        self.sock.sendall(conn.data_to_send())
        return sid

    def pump(self, until: Any, timeout: float = 30.0) -> None:
        """Read and answer until C{until()} is true, the connection ends, or C{timeout}."""
        import h2.events
        import h2.exceptions

        conn = self.conn
        deadline = time.monotonic() + timeout
        while not until() and not self.closed and time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError) as e:
                self.closed = True
                self.log.append(repr(e))
                break
            if not data:
                self.closed = True
                self.log.append("EOF")
                break
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                raise AssertionError(f"the server's frames broke HTTP/2: {e!r}") from None
            for e in events:
                self.log.append(type(e).__name__)
                r = self.results.get(getattr(e, "stream_id", 0) or 0)
                if isinstance(e, h2.events.ResponseReceived):
                    r.status = int(dict(e.headers)[b":status"])
                    for name, value in e.headers:
                        if not name.startswith(b":"):
                            key = name.decode("latin-1")
                            old = r.headers.get(key)
                            r.headers[key] = value.decode("latin-1") if old is None else old + ", " + value.decode()
                elif isinstance(e, h2.events.DataReceived):
                    r.body += e.data
                    if self.ackDelay:
                        time.sleep(self.ackDelay)
                    try:
                        conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    except h2.exceptions.StreamClosedError:
                        pass
                elif isinstance(e, h2.events.StreamEnded):
                    r.ended = True
                elif isinstance(e, h2.events.StreamReset):
                    if r is not None:
                        r.reset = e.error_code
                elif isinstance(e, h2.events.ConnectionTerminated):
                    self.goaway = e
                elif isinstance(e, h2.events.RemoteSettingsChanged):
                    self.gotSettings = True
            out = conn.data_to_send()
            if out:
                try:
                    self.sock.sendall(out)
                except OSError:
                    self.closed = True

    def done(self, sid: int) -> bool:
        r = self.results[sid]
        return r.ended or r.reset is not None

    def allDone(self) -> bool:
        return all(r.ended or r.reset is not None for r in self.results.values())

    def settled(self) -> None:
        """Until the server's SETTINGS have been read (and acknowledged)."""
        self.pump(lambda: self.gotSettings or self.goaway is not None, 10)


def h2Table(portNumber: int, cafile: str, rows: list[Any], concurrent: bool) -> list[Result]:
    """(In a thread.)  The table's requests on one connection: all at once, or one at a time."""
    client = H2Client(portNumber, cafile)
    try:
        sids = []
        if concurrent:
            for row in rows:
                sids.append(client.send(row.method, row.path, row.headers, row.body))
            client.pump(client.allDone, 60)
        else:
            for row in rows:
                sid = client.send(row.method, row.path, row.headers, row.body)
                sids.append(sid)
                client.pump(lambda sid=sid: client.done(sid), 30)
        return [client.results[sid] for sid in sids]
    finally:
        client.close()


# -- 1. one request table through every path


class Row:
    def __init__(self, name: str, method: str, path: str, status: int, headers: dict[str, str] | None = None,
                 body: bytes = b"", bodyCheck: Any = True, compare: tuple[str, ...] = COMPARED) -> None:
        self.name = name
        self.method = method
        self.path = path
        self.status = status
        self.headers = headers or {}
        self.body = body
        #: True: bodies must be equal; False: not compared; bytes: the body expected; callable: a check.
        self.bodyCheck = bodyCheck
        self.compare = compare


def tableRows(etag: str, lastModified: str, root: Path) -> list[Row]:
    preGz = (root / "pre.js.gz").read_bytes()
    big = (root / "big.bin").read_bytes()
    return [
        Row("index", "GET", "/", 200),
        Row("small", "GET", "/small.bin", 200, bodyCheck=SMALL),
        Row("text", "GET", "/text.txt", 200, bodyCheck=TEXT),
        Row("head", "HEAD", "/text.txt", 200, bodyCheck=b""),
        Row("gzip text", "GET", "/text.txt", 200, {"Accept-Encoding": "gzip"},
            bodyCheck=lambda body: gzip.decompress(body) == TEXT),
        Row("gzip sidecar", "GET", "/pre.js", 200, {"Accept-Encoding": "gzip"}, bodyCheck=preGz),
        Row("304 etag", "GET", "/small.bin", 304, {"If-None-Match": etag}, bodyCheck=b""),
        Row("304 since", "GET", "/small.bin", 304, {"If-Modified-Since": lastModified}, bodyCheck=b""),
        Row("206", "GET", "/small.bin", 206, {"Range": "bytes=10-19"}, bodyCheck=SMALL[10:20]),
        Row("416", "GET", "/small.bin", 416, {"Range": "bytes=5000-6000"}),
        Row("404", "GET", "/nothing-here", 404),
        Row("405", "POST", "/small.bin", 405, body=b"x=1"),
        Row("301", "GET", "/sub", 301),
        Row("big", "GET", "/big.bin", 200, bodyCheck=big),
        Row("413", "POST", "/small.bin", 413, body=OVER),
        Row("proxy get", "GET", "/api/hello?x=1", 200, bodyCheck=b"GET /api/hello?x=1\n"),
        Row("proxy post", "POST", "/api/echo", 200, body=b"ping from the client",
            bodyCheck=b"POST /api/echo\nping from the client"),
        Row("metrics", "GET", "/metrics", 200, bodyCheck=lambda body: b"netsvc_http_requests_total" in body,
            compare=("content-type", "x-content-type-options", "strict-transport-security", "cache-control")),
    ]


def view(row: Row, status: int | None, headers: dict[str, str]) -> dict[str, Any]:
    return {"status": status, **{k: headers.get(k) for k in row.compare}}


class TableTests(unittest.TestCase):
    """The same requests through the four paths: status, body and the headers a user sees agree."""

    timeout = 240

    @defer.inlineCallbacks
    def test_everyPathAgrees(self) -> Any:
        events = observeLog(self)
        upstream = yield startUpstream(self)
        extra = (
            f"    limits: {{max_message: {MAX_BODY}}}\n"
            f"    proxy:\n      - {{prefix: /api/, upstream: 'http://127.0.0.1:{upstream}'}}\n"
        )
        native = startSite(self, "native", extra)
        python = startSite(self, "python", extra, root=native.root)  # the same files: same ETags
        ref = yield get(native.port, "/small.bin", cafile=native.cafile)
        rows = tableRows(ref.headers["etag"], ref.headers["last-modified"], native.root)

        results: dict[str, list[tuple[int | None, dict[str, str], bytes, str]]] = {}
        for label, slow in (("HTTP/1.1 fast", False), ("HTTP/1.1 twisted.web", True)):
            out = []
            for row in rows:
                r = yield get(native.port, row.path, row.headers, method=row.method, cafile=native.cafile,
                              slow=slow, body=row.body)
                out.append((r.status, r.headers, r.body, ""))
            results[label] = out
        for daemon, engine in ((native, "native"), (python, "python")):
            for label, concurrent in (("concurrent", True), ("one at a time", False)):
                got = yield threads.deferToThread(h2Table, daemon.port, daemon.cafile, rows, concurrent)
                results[f"HTTP/2 {engine} {label}"] = [
                    (r.status, r.headers, bytes(r.body), "" if r.ended else f"not ended (reset {r.reset})")
                    for r in got
                ]

        problems = []
        reference = results["HTTP/1.1 fast"]
        for label, out in results.items():
            for row, (status, headers, body, note) in zip(rows, out):
                where = f"{label} / {row.name} ({row.method} {row.path})"
                if note and row.status != 413:
                    problems.append(f"{where}: {note}")
                if status != row.status:
                    problems.append(f"{where}: status {status}, expected {row.status}")
                mine = view(row, status, headers)
                theirs = view(row, reference[rows.index(row)][0], reference[rows.index(row)][1])
                if mine != theirs:
                    diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
                    problems.append(f"{where}: differs from HTTP/1.1 fast (got, fast): {diff}")
                check = row.bodyCheck
                if check is True:
                    if body != reference[rows.index(row)][2]:
                        problems.append(f"{where}: body differs from HTTP/1.1 fast ({len(body)} bytes)")
                elif isinstance(check, bytes):
                    if body != check:
                        problems.append(f"{where}: body {body[:80]!r} ({len(body)} bytes), expected "
                                        f"{check[:80]!r} ({len(check)} bytes)")
                elif callable(check) and not check(body):
                    problems.append(f"{where}: body {body[:80]!r} fails its check")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))
        self.assertEqual(errorsLogged(events), [])

    @defer.inlineCallbacks
    def test_bodyOverTheLimitWithoutContentLength(self) -> Any:
        """An HTTP/2 upload without Content-Length (the body in DATA frames only) gets the 413 too,
        and the connection goes on."""
        events = observeLog(self)
        for engine in ENGINES:
            daemon = startSite(self, engine, f"    limits: {{max_message: {MAX_BODY}}}\n")

            def run(daemon: Any = daemon) -> tuple[Result, Result]:
                client = H2Client(daemon.port, daemon.cafile)
                try:
                    sid = client.send("POST", "/upload", body=OVER * 4)
                    client.pump(lambda: client.done(sid))
                    after = client.send("GET", "/small.bin")
                    client.pump(lambda: client.done(after))
                    return client.results[sid], client.results[after]
                finally:
                    client.close()

            refused, after = yield threads.deferToThread(run)
            self.assertEqual(refused.status, 413, (engine, refused))
            self.assertEqual((after.status, bytes(after.body)), (200, SMALL), engine)
        self.assertEqual(errorsLogged(events), [])


# -- 2. flow control


def slowFetch(portNumber: int, cafile: str, paths: list[str], window: int, ackDelay: float,
              concurrent: bool = False) -> list[Result]:
    """(In a thread.)  C{paths} with a small stream window and slow acknowledgements."""
    client = H2Client(portNumber, cafile, window=window, ackDelay=ackDelay)
    try:
        client.settled()
        sids = []
        for path in paths:
            sids.append(client.send("GET", path))
            if not concurrent:
                client.pump(lambda sid=sids[-1]: client.done(sid), 60)
        client.pump(client.allDone, 60)
        return [client.results[sid] for sid in sids]
    finally:
        client.close()


class EngineMixin:
    engine = ""
    timeout = 120

    def spyFastPath(self) -> list[bytes]:
        """The targets the HTTP/2 fast path answered (cached files), recorded."""
        from netsvc.web import http2

        answered: list[bytes] = []
        real = http2.cachedAnswer

        def spy(site: Any, headers: Any, target: bytes) -> Any:
            found = real(site, headers, target)
            if found is not None:
                answered.append(target)
            return found

        self.patch(http2, "cachedAnswer", spy)  # type: ignore[attr-defined]
        return answered


class FlowControlMixin(EngineMixin):
    @defer.inlineCallbacks
    def test_windowSmallerThanTheFile(self) -> Any:
        """A 1,000-byte stream window acknowledged slowly: the cached /text.txt (32 KB) and the
        streamed /big.bin (512 KiB) arrive complete and identical, one after the other and together."""
        events = observeLog(self)
        fast = self.spyFastPath()
        daemon = startSite(self, self.engine)
        warm = yield get(daemon.port, "/text.txt", cafile=daemon.cafile)  # now in the cache
        self.assertEqual(warm.body, TEXT)
        big = (daemon.root / "big.bin").read_bytes()
        for concurrent in (False, True):
            got = yield threads.deferToThread(
                slowFetch, daemon.port, daemon.cafile, ["/text.txt", "/big.bin"], 1000, 0.0005, concurrent
            )
            text, bigResult = got
            self.assertEqual((text.status, text.ended, len(text.body)), (200, True, len(TEXT)))
            self.assertEqual(bytes(text.body), TEXT)
            self.assertEqual((bigResult.status, bigResult.ended, len(bigResult.body)), (200, True, len(big)))
            self.assertEqual(bytes(bigResult.body), big)
        self.assertIn(b"/text.txt", fast, "the cached file was not answered by the HTTP/2 fast path")
        self.assertNotIn(b"/big.bin", fast)
        self.assertEqual(errorsLogged(events), [])


# -- 3. floods


def rapidReset(portNumber: int, cafile: str, streams: int) -> H2Client:
    """(In a thread.)  HEADERS then RST_STREAM for C{streams} streams in one write; read until the
    server closes (or 15 s)."""
    client = H2Client(portNumber, cafile)
    conn = client.conn
    for i in range(streams):
        sid = 1 + 2 * i
        conn.send_headers(sid, [(b":method", b"GET"), (b":path", b"/small.bin"), (b":scheme", b"https"),
                                (b":authority", b"localhost")], end_stream=True)
        conn.reset_stream(sid)
    try:
        client.sock.sendall(conn.data_to_send())
        client.pump(lambda: False, 15)
    except AssertionError:
        client.closed = True  # frames for streams h2 forgot: the point is whether the server hangs up
    finally:
        client.close()
    return client


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def rawFrames(data: bytes) -> list[Any]:
    """The frames in C{data} (whole ones), parsed by hyperframe."""
    from hyperframe.frame import Frame

    frames, pos = [], 0
    while len(data) - pos >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        if len(data) - pos - 9 < length:
            break
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames


def continuationFlood(portNumber: int, cafile: str, frames: int, empty: bool) -> tuple[list[str], bool, bool]:
    """
    (In a thread.)  HEADERS without END_HEADERS on stream 1, then C{frames} CONTINUATION frames,
    never END_HEADERS (fragments of a header block of thousands of fields, or empty ones).
    Returns the frame types the server sent, whether the connection ended (EOF or reset), and
    whether our sending was cut off.
    """
    import hpack
    from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

    fields = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "localhost")]
    fields += [(f"x-flood-{i}", "v" * 24) for i in range(frames)]
    block = hpack.Encoder().encode(fields)
    piece = 0 if empty else max(1, len(block) // frames)
    out = [PREFACE, SettingsFrame(0).serialize(), HeadersFrame(1, data=block[:64], flags=["END_STREAM"]).serialize()]
    for i in range(frames):
        data = b"" if empty else block[64 + i * piece : 64 + (i + 1) * piece]
        out.append(ContinuationFrame(1, data=data).serialize())
    payload = b"".join(out)
    received = b""
    ended = cut = False
    s = h2Socket(portNumber, cafile, timeout=0.5)
    try:
        try:
            for i in range(0, len(payload), 16384):
                s.sendall(payload[i : i + 16384])
        except (OSError, ssl.SSLError):
            cut = True
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                ended = True
                break
            if not data:
                ended = True
                break
            received += data
    finally:
        s.close()
    return [type(f).__name__ for f in rawFrames(received)], ended, cut


class FloodMixin(EngineMixin):
    @defer.inlineCallbacks
    def test_rapidReset(self) -> Any:
        """1,000 x (HEADERS + RST_STREAM) in one write: GOAWAY and close, counted, nothing logged as an error."""
        events = observeLog(self)
        daemon = startSite(self, self.engine)
        before = h2ErrorCounts(daemon)
        client = yield threads.deferToThread(rapidReset, daemon.port, daemon.cafile, 1000)
        yield sleep(0.1)
        after = h2ErrorCounts(daemon)
        self.assertTrue(client.closed, f"{self.engine}: the connection stayed open after a rapid-reset flood")
        self.assertIsNotNone(client.goaway, f"{self.engine}: no GOAWAY before the close")
        self.assertGreater(after.get("h2_flood", 0) + after.get("stream_reset", 0),
                           before.get("h2_flood", 0) + before.get("stream_reset", 0), after)
        self.assertEqual(errorsLogged(events), [])
        yield self.stillServes(daemon)

    @defer.inlineCallbacks
    def stillServes(self, daemon: Any) -> Any:
        r = yield get(daemon.port, "/small.bin", cafile=daemon.cafile)
        self.assertEqual((r.status, r.body), (200, SMALL))

    @defer.inlineCallbacks
    def continuation(self, frames: int, empty: bool) -> Any:
        events = observeLog(self)
        daemon = startSite(self, self.engine)
        before = h2ErrorCounts(daemon)
        kinds, ended, cut = yield threads.deferToThread(continuationFlood, daemon.port, daemon.cafile, frames, empty)
        yield sleep(0.1)
        after = h2ErrorCounts(daemon)
        self.assertTrue(ended, f"{self.engine}: a CONTINUATION flood did not end the connection "
                               f"(server sent {kinds}, our sending cut off: {cut})")
        grown = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        self.assertTrue(any(k.startswith("h2_") for k in grown),
                        f"{self.engine}: the CONTINUATION flood was not counted (errors grown: {grown})")
        self.assertNotIn("HeadersFrame", kinds, "the server answered a request it never finished reading")
        self.assertEqual(errorsLogged(events), [], f"{self.engine}: counted {grown}, the server sent {kinds}")
        yield self.stillServes(daemon)

    def test_continuationFlood(self) -> Any:
        """HEADERS without END_HEADERS, then 5,000 CONTINUATION frames carrying thousands of fields."""
        return self.continuation(5000, empty=False)

    def test_emptyContinuationFlood(self) -> Any:
        """The same with 5,000 empty CONTINUATION frames (CPU, not memory)."""
        return self.continuation(5000, empty=True)


# -- 4. graceful shutdown


def idleThenRead(portNumber: int, cafile: str, ready: threading.Event) -> tuple[list[str], bool]:
    """(In a thread.)  An idle HTTP/2 connection (settings exchanged, one request answered); after
    C{ready} is set by us, read until EOF: the frame types seen in order (and "EOF")."""
    import h2.events

    client = H2Client(portNumber, cafile)
    order: list[str] = []
    try:
        sid = client.send("GET", "/small.bin")
        client.pump(lambda: client.done(sid))
        assert client.results[sid].status == 200
        ready.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                data = client.sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                order.append("reset")
                break
            if not data:
                order.append("EOF")
                break
            for e in client.conn.receive_data(data):
                order.append(type(e).__name__)
                if isinstance(e, h2.events.ConnectionTerminated):
                    order.append(f"code={e.error_code}")
    finally:
        client.close()
    return order, True


def slowBigRead(portNumber: int, cafile: str, started: threading.Event, window: int = 8192,
                ackDelay: float = 0.004) -> H2Client:
    """(In a thread.)  /big.bin read slowly (a small stream window, each DATA acknowledged late);
    C{started} is set once some of it has arrived; read until the stream ends or the connection does."""
    client = H2Client(portNumber, cafile, window=window, ackDelay=ackDelay)
    try:
        sid = client.send("GET", "/big.bin")
        client.pump(lambda: len(client.results[sid].body) > 0)
        started.set()
        client.pump(lambda: client.done(sid) and client.goaway is not None, 30)
        if client.done(sid) and client.goaway is not None:
            client.pump(lambda: False, 10)  # then EOF
    finally:
        client.close()
    return client


class ShutdownMixin(EngineMixin):
    @defer.inlineCallbacks
    def test_gracefulShutdownSendsGoaway(self) -> Any:
        """Stopping the daemon: an idle connection gets GOAWAY then EOF; a response being streamed
        to a slow reader completes, or the connection ends within the drain timeout."""
        from netsvc.policies import Guard
        from netsvc.runtime import STOP_SLACK

        drain = 2.0
        events = observeLog(self)
        daemon = startSite(self, self.engine, top=f"drain_timeout: {int(drain * 1000)}ms\n")
        big = (daemon.root / "big.bin").read_bytes()
        ready, started = threading.Event(), threading.Event()
        idle = threads.deferToThread(idleThenRead, daemon.port, daemon.cafile, ready)
        slow = threads.deferToThread(slowBigRead, daemon.port, daemon.cafile, started)
        for _ in range(200):
            if ready.is_set() and started.is_set():
                break
            yield sleep(0.05)
        self.assertTrue(ready.is_set() and started.is_set())
        yield daemon.stopService().addTimeout(drain + Guard.abortGrace + STOP_SLACK + 5, reactor)
        order, _ = yield idle
        client = yield slow
        self.assertIn("ConnectionTerminated", order, f"{self.engine}: no GOAWAY at shutdown: {order}")
        self.assertIn("code=0", order)  # NO_ERROR
        self.assertEqual(order[-1], "EOF", order)
        self.assertLess(order.index("ConnectionTerminated"), order.index("EOF"))
        (result,) = client.results.values()
        self.assertIsNotNone(client.goaway, f"{self.engine}: the slow reader got no GOAWAY")
        if result.ended:
            self.assertEqual(bytes(result.body), big)
        else:
            self.assertTrue(client.closed, f"{self.engine}: neither completed nor closed: {result!r}")
        self.assertEqual(errorsLogged(events), [])


    @defer.inlineCallbacks
    def test_inFlightResponseFinishedAfterGoaway(self) -> Any:
        """
        What H2Channel.drain promises: streams already opened are still answered.  A /big.bin
        (512 KiB, streamed from disk) being read at a pace that ends well within the drain timeout
        (16 KB window, a 2 ms pause per DATA frame: under a second) when the daemon stops: GOAWAY
        first, then the whole body, then EOF.
        """
        drain = 10.0
        events = observeLog(self)
        daemon = startSite(self, self.engine, top=f"drain_timeout: {int(drain * 1000)}ms\n")
        big = (daemon.root / "big.bin").read_bytes()
        started = threading.Event()
        slow = threads.deferToThread(slowBigRead, daemon.port, daemon.cafile, started, 16384, 0.002)
        for _ in range(200):
            if started.is_set():
                break
            yield sleep(0.05)
        self.assertTrue(started.is_set())
        yield daemon.stopService().addTimeout(drain + 10, reactor)
        client = yield slow
        (result,) = client.results.values()
        self.assertIsNotNone(client.goaway, f"{self.engine}: no GOAWAY")
        self.assertEqual((result.ended, result.reset, len(result.body)), (True, None, len(big)),
                         f"{self.engine}: the response in flight at GOAWAY was not finished: {squeeze(client.log)}")
        self.assertEqual(bytes(result.body), big)
        self.assertEqual(errorsLogged(events), [])


def squeeze(log: list[str]) -> list[str]:
    """C{log} with runs of the same entry as C{name x n}."""
    out: list[str] = []
    for name in log:
        if out and out[-1].split(" x ")[0] == name:
            head, _, n = out[-1].partition(" x ")
            out[-1] = f"{head} x {int(n or 1) + 1}"
        else:
            out.append(name)
    return out


# -- 5. WebSocket over HTTP/2


def connectThenGet(portNumber: int, cafile: str, pseudo: list[tuple[str, str]], headers: dict[str, str],
                   endStream: bool) -> tuple[Result, Result | None, Any, list[str]]:
    """(In a thread.)  A CONNECT request (the stream left open, as a tunnel leaves it, or ended), up to
    5 s for its answer, then a GET on the same connection."""
    client = H2Client(portNumber, cafile, validate=False)
    try:
        client.settled()
        sid = client.send("CONNECT", "", headers, pseudo=pseudo, endStream=endStream)
        client.pump(lambda: client.done(sid) or client.results[sid].status is not None, 5)
        after = None
        if not client.closed and client.goaway is None:
            a = client.send("GET", "/small.bin")
            client.pump(lambda: client.done(a), 10)
            after = client.results[a]
        return client.results[sid], after, client.goaway, squeeze(client.log)
    finally:
        client.close()


class WebSocketMixin(EngineMixin):
    @defer.inlineCallbacks
    def test_connectRefused(self) -> Any:
        """
        Extended CONNECT (:protocol websocket to the chat's /chat/ws; we never sent
        SETTINGS_ENABLE_CONNECT_PROTOCOL) and a plain CONNECT, each with the stream left open (what a
        tunnel does) and with END_STREAM: a stream reset, a 4xx or 501, within 5 s; nothing logged as
        an error; the connection still answers a GET.
        """
        events = observeLog(self)
        daemon = startSite(self, self.engine, '  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        extended = (
            [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
             (":path", "/chat/ws"), (":authority", "localhost")],
            {"sec-websocket-version": "13", "origin": "https://localhost"},
        )
        plain = ([(":method", "CONNECT"), (":authority", "localhost:443")], {})
        cases = {
            "extended CONNECT, stream open": (*extended, False),
            "extended CONNECT, END_STREAM": (*extended, True),
            "CONNECT, stream open": (*plain, False),
            "CONNECT, END_STREAM": (*plain, True),
        }
        problems = []
        for name, (pseudo, headers, end) in cases.items():
            refused, after, goaway, log = yield threads.deferToThread(
                connectThenGet, daemon.port, daemon.cafile, pseudo, headers, end
            )
            status = refused.status
            if not (refused.reset is not None or (status is not None and (400 <= status < 500 or status == 501))):
                problems.append(f"{name}: neither a reset nor a 4xx/501 in 5 s: {refused!r} {log}")
            if goaway is not None:
                problems.append(f"{name}: the connection was ended (GOAWAY {goaway})")
            if after is None or (after.status, bytes(after.body)) != (200, SMALL):
                problems.append(f"{name}: the GET after it: {after!r} {log}")
        bad = errorsLogged(events)
        if bad:
            problems.append(f"logged: {bad}")
        self.assertEqual(problems, [], f"{self.engine}:\n" + "\n".join(problems))


# -- 6. access log and metrics


def twoRequests(portNumber: int, cafile: str) -> list[Result]:
    client = H2Client(portNumber, cafile)
    try:
        a = client.send("GET", "/small.bin")  # cached: the HTTP/2 fast path
        client.pump(lambda: client.done(a))
        b = client.send("GET", "/small.bin", {"x-not-fast": "1"})  # a header the fast path does not read
        client.pump(lambda: client.done(b))
        c = client.send("GET", "/nothing-here")  # 404 from twisted.web
        client.pump(lambda: client.done(c))
        return [client.results[a], client.results[b], client.results[c]]
    finally:
        client.close()


class AccessLogMixin(EngineMixin):
    @defer.inlineCallbacks
    def test_accessLogAndMetrics(self) -> Any:
        """A fast-path HTTP/2 request and twisted.web ones each give one JSON access-log line with
        proto HTTP/2 and their status, and netsvc_http_requests_total counts them."""
        fast = self.spyFastPath()
        logFile = Path(self.mktemp()).absolute()  # type: ignore[attr-defined]
        daemon = startSite(self, self.engine, f"    access_log: {{file: {logFile}, format: json}}\n")
        warm = yield get(daemon.port, "/small.bin", cafile=daemon.cafile)  # HTTP/1.1: fills the cache
        self.assertEqual(warm.status, 200)
        ok = counterValue(daemon, "netsvc_http_requests_total", service="web", code="200")
        missing = counterValue(daemon, "netsvc_http_requests_total", service="web", code="404")
        fast.clear()
        got = yield threads.deferToThread(twoRequests, daemon.port, daemon.cafile)
        self.assertEqual([(r.status, r.ended) for r in got], [(200, True), (200, True), (404, True)])
        self.assertEqual(bytes(got[0].body), SMALL)
        self.assertEqual(bytes(got[1].body), SMALL)
        self.assertEqual(fast, [b"/small.bin"], "exactly the first request should take the HTTP/2 fast path")
        lines: list[dict[str, Any]] = []
        for _ in range(60):  # the log is flushed every second
            if logFile.exists():
                lines = [json.loads(x) for x in logFile.read_text().splitlines() if x.strip()]
                if len([x for x in lines if x["proto"] == "HTTP/2"]) >= 3:
                    break
            yield sleep(0.1)
        h2lines = [(x["proto"], x["method"], x["uri"], x["status"]) for x in lines if x["proto"] != "HTTP/1.1"]
        self.assertEqual(h2lines, [("HTTP/2", "GET", "/small.bin", 200), ("HTTP/2", "GET", "/small.bin", 200),
                                   ("HTTP/2", "GET", "/nothing-here", 404)], lines)
        for line in lines:
            if line["proto"] == "HTTP/2" and line["status"] == 200:
                self.assertEqual(line["bytes"], len(SMALL), line)
        self.assertEqual(counterValue(daemon, "netsvc_http_requests_total", service="web", code="200") - ok, 2)
        self.assertEqual(counterValue(daemon, "netsvc_http_requests_total", service="web", code="404") - missing, 1)


# -- the engines


class NativeTests(FlowControlMixin, FloodMixin, ShutdownMixin, WebSocketMixin, AccessLogMixin, unittest.TestCase):
    engine = "native"


class PythonTests(FlowControlMixin, FloodMixin, ShutdownMixin, WebSocketMixin, AccessLogMixin, unittest.TestCase):
    engine = "python"
