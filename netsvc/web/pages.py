"""
Small HTML pages: errors (404, 405, 416 ...) and folder listings.
"""

from __future__ import annotations

import html
import time
from typing import Any
from urllib.parse import quote

from twisted.web import http

_HTML = b"text/html; charset=utf-8"


def errorBody(code: int, detail: str = "") -> bytes:
    reason = http.RESPONSES.get(code, b"Error").decode("latin-1")
    extra = f"<p>{html.escape(detail)}</p>\n" if detail else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{code} {reason}</title>'
        f"</head>\n<body><h1>{code} {reason}</h1>\n{extra}<hr><address>netsvc</address></body></html>\n"
    ).encode()


def error(request: Any, code: int, detail: str = "", headers: dict[bytes, bytes] | None = None) -> bytes:
    """Set up C{request} for an error response and return its body (empty for HEAD)."""
    body = errorBody(code, detail)
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", _HTML)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return b"" if request.method == b"HEAD" else body


def listing(urlPath: str, entries: list[tuple[str, bool, int, float]]) -> bytes:
    """An HTML index of a folder: name, size, modification time."""
    title = html.escape(f"Index of {urlPath}")
    rows = []
    if urlPath != "/":
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for name, isDir, size, mtime in entries:
        shown = name + ("/" if isDir else "")
        href = quote(name) + ("/" if isDir else "")
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(mtime))
        rows.append(
            f'<tr><td><a href="{html.escape(href)}">{html.escape(shown)}</a></td>'
            f'<td class="n">{"-" if isDir else size}</td><td>{when}</td></tr>'
        )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>td{{padding:0 1em}} .n{{text-align:right}}</style></head>\n<body><h1>{title}</h1>\n"
        f"<table>\n<tr><th>Name</th><th>Size</th><th>Modified (UTC)</th></tr>\n"
        + "\n".join(rows)
        + "\n</table><hr><address>netsvc</address></body></html>\n"
    ).encode("utf-8")
