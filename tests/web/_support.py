"""
Helpers for the web tests: a daemon with a web service on loopback port 0
(one TLS and one plain listener, a root folder made per test), raw HTTP/1.1
exchanges over real sockets, and a small response parser.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol

from netsvc.tls import clientCreator
from tests.helpers import startDaemon, stateDir

TLS, PLAIN = 0, 1

SMALL = b"0123456789abcdef" * 64  # 1 KiB
TEXT = ("Grüße, netsvc!\n" * 2000).encode("utf-8")  # ~32 KiB of compressible text


def makeRoot(base: Path) -> Path:
    """A folder of files the tests ask for."""
    root = base / "www"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_bytes(b"<!DOCTYPE html><title>home</title><p>home page</p>\n" * 10)
    (root / "small.bin").write_bytes(SMALL)
    (root / "text.txt").write_bytes(TEXT)
    (root / "big.txt").write_bytes(b"big text line\n" * 40000)  # 560 KB: over the cache limit
    (root / "big.bin").write_bytes(bytes(range(256)) * 2048)  # 512 KiB
    (root / "sub" / "page.css").write_bytes(b"body { color: #333 }\n" * 100)
    (root / "pre.js").write_bytes(b"console.log('netsvc');\n" * 50)
    import gzip

    (root / "pre.js.gz").write_bytes(gzip.compress((root / "pre.js").read_bytes(), mtime=0))
    (root / ".secret").write_bytes(b"hidden")
    (root / "emptydir").mkdir()
    (root / "data.json").write_bytes(b'{"a": 1}\n')
    return root


def startWeb(testCase: Any, extra: str = "", listen: str | None = None) -> Any:
    """A daemon serving L{makeRoot} on tls:0 (listen[0]) and tcp:0 (listen[1], no redirect)."""
    base = Path(testCase.mktemp()).absolute()
    base.mkdir(parents=True)
    testCase.root = makeRoot(base)
    testCase.base = base
    listen = listen or ('      - "tls:0:interface=127.0.0.1"\n      - "tcp:0:interface=127.0.0.1"\n')
    yaml = (
        f"services:\n  web:\n    listen:\n{listen}"
        f"    root: {testCase.root}\n"
        f"    cache: {{max_file_size: 128KiB}}\n" + extra
    )
    daemon = startDaemon(testCase, yaml)
    testCase.cafile = str(stateDir(daemon) / "tls" / "selfsigned.pem")
    return daemon


def webPort(daemon: Any, index: int) -> int:
    return daemon.getServiceNamed("web").listeners[index].port.getHost().port


class _Collect(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


def exchange(
    portNumber: int,
    payload: bytes,
    tls: bool = True,
    cafile: str | None = None,
    serverName: str = "localhost",
    timeout: float = 10.0,
) -> defer.Deferred:
    """
    Send C{payload} (one or more raw requests, the last with C{Connection:
    close}) and fire with everything received until the server closes.
    """
    endpoint: Any = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber)
    if tls:
        endpoint = endpoints.wrapClientTLS(
            clientCreator(serverName, cafile=cafile, acceptableProtocols=[b"http/1.1"]), endpoint
        )
    proto = _Collect(payload)
    d = endpoints.connectProtocol(endpoint, proto)
    d.addCallback(lambda _: proto.done)
    d.addTimeout(timeout, reactor)
    return d


def req(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    close: bool = False,
    host: str = "localhost",
    body: bytes = b"",
) -> bytes:
    """One raw HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, rawHead: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.rawHead = rawHead

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} {self.body[:60]!r}>"


def parseResponses(data: bytes, methods: list[str]) -> list[Response]:
    """Split a stream of HTTP/1.1 responses (Content-Length or chunked framing) into L{Response}s."""
    out = []
    pos = 0  # an offset: slicing the rest for each response is quadratic on long pipelines
    for method in methods:
        end = data.index(b"\r\n\r\n", pos)
        head, pos = data[pos:end], end + 4
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = (headers[key] + ", " if key in headers else "") + value.strip()
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body, pos = data[pos : pos + n], pos + n
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                lineEnd = data.index(b"\r\n", pos)
                size = int(data[pos:lineEnd].split(b";")[0], 16)
                pos = lineEnd + 2
                if size == 0:
                    pos = data.index(b"\r\n", pos) + 2
                    break
                parts.append(data[pos : pos + size])
                pos += size + 2
            body = b"".join(parts)
        else:
            body, pos = data[pos:], len(data)
        out.append(Response(status, headers, body, head))
    return out


@defer.inlineCallbacks
def get(
    portNumber: int,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    tls: bool = True,
    cafile: str | None = None,
    host: str = "localhost",
    slow: bool = False,
    body: bytes = b"",
) -> Any:
    """
    One request on a new connection; C{slow}: after a first request the fast
    path does not take (so twisted.web answers this one).
    """
    payload = req(method, path, headers, close=True, host=host, body=body)
    methods = [method]
    if slow:
        payload = req("OPTIONS", "/", host=host) + payload
        methods = ["OPTIONS", method]
    data = yield exchange(portNumber, payload, tls=tls, cafile=cafile)
    return parseResponses(data, methods)[-1]


def touch(path: Path, seconds: float) -> None:
    os.utime(path, (seconds, seconds))
