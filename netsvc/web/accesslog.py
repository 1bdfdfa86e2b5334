"""
Access log lines, one per finished request: the combined log format (Apache,
nginx) or JSON lines, appended to a file (buffered, flushed every second and at
shutdown) or sent to the daemon's log (C{file: "-"}).

Combined::

    127.0.0.1 - alice [21/Nov/2026:10:42:13 +0000] "GET /a.txt HTTP/1.1" 200 1024 "-" "curl/7.88.1"

JSON (one object per line)::

    {"time": "2026-11-21T10:42:13.123Z", "remote": "127.0.0.1", "user": null, "method": "GET",
     "uri": "/a.txt", "proto": "HTTP/1.1", "status": 200, "bytes": 1024, "referer": null,
     "agent": "curl/7.88.1", "host": "localhost", "duration": 0.0004}
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, TextIO

from twisted.logger import Logger

log = Logger(namespace="netsvc.web.access")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _quoted(value: bytes | None) -> str:
    """A request-supplied value inside double quotes, escaped so a line cannot be forged."""
    if value is None:
        return '"-"'
    text = value.decode("latin-1")
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    text = "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in text)
    return f'"{text}"'


def _clean(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def fields(request: Any, now: float) -> dict[str, Any]:
    """The facts of a finished request, as the JSON format writes them."""
    started = getattr(request, "_started", 0.0)
    user = request.getUser() if request.requestHeaders.hasHeader(b"authorization") else b""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "remote": request.getClientAddress().host or "unix",
        "user": _clean(user) or None,
        "method": _clean(request.method),
        "uri": _clean(request.uri),
        "proto": _clean(request.clientproto),
        "status": request.code,
        "bytes": request.sentLength,
        "referer": _clean(request.getHeader(b"referer")),
        "agent": _clean(request.getHeader(b"user-agent")),
        "host": _clean(request.getHeader(b"host")),
        "duration": round(time.monotonic() - started, 6) if started else None,
    }


def combined(request: Any, now: float) -> str:
    """One line in the combined log format."""
    t = time.gmtime(now)
    day = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}"
    stamp = f"{day}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    user = request.getUser() if request.requestHeaders.hasHeader(b"authorization") else b""
    userText = _quoted(user)[1:-1] if user else "-"
    line = b" ".join([request.method, request.uri, request.clientproto])
    return (
        f"{request.getClientAddress().host or 'unix'} - {userText} [{stamp}] {_quoted(line)} "
        f"{request.code} {request.sentLength or '-'} {_quoted(request.getHeader(b'referer'))} "
        f"{_quoted(request.getHeader(b'user-agent'))}"
    )


def jsonLine(request: Any, now: float) -> str:
    return json.dumps(fields(request, now), separators=(", ", ": "))


FORMATS: dict[str, Callable[[Any, float], str]] = {"combined": combined, "json": jsonLine}


class AccessLog:
    """
    Writes one line per request to C{out} (a text file; None: the daemon's
    log).  Call L{flush} periodically and L{close} at shutdown.
    """

    def __init__(
        self, format: str = "combined", out: TextIO | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.formatter = FORMATS[format]
        self.out = out
        self.clock = clock

    @classmethod
    def open(cls, path: str, format: str = "combined") -> AccessLog:
        """Append to the file at C{path} (C{-}: the daemon's log)."""
        if path == "-":
            return cls(format)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as state_dir is made
        return cls(format, open(path, "a", encoding="utf-8", buffering=1 << 16))

    def __call__(self, request: Any) -> None:
        line = self.formatter(request, self.clock())
        if self.out is None:
            log.info("{line}", line=line)
        else:
            self.out.write(line + "\n")

    def flush(self) -> None:
        if self.out is not None and not self.out.closed:
            self.out.flush()

    def close(self) -> None:
        if self.out is not None and not self.out.closed:
            self.out.close()
