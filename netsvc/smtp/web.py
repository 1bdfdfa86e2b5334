"""
The captured mail on the web service (capture mode), mounted at C{/mail}:

    /mail/              an HTML list of the newest messages (newest first)
    /mail/messages.json the same as JSON: [{id, sender, recipients, subject, from, to, date, size, created}]
    /mail/ID            one message: headers, text, attachments, links
    /mail/ID.json       the same as JSON (with "headers", "text", "attachments")
    /mail/ID.eml        the raw message (as stored, Received header first)

The resource is a leaf: it dispatches on C{request.postpath} (what follows the
mount prefix).  It finds the smtp service's capture store at request time.
With C{workers: N} the store is shared: the list is read from its folder, so
whichever worker answers shows the mail every worker captured.
Messages are read and parsed in a thread (a 25 MB message takes seconds to
parse, a list of 200 a noticeable fraction of one: the reactor, and so every
SMTP session, must not wait for it).  Everything taken
from a message is HTML-escaped.
"""

from __future__ import annotations

import datetime
import html
import json
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request

_ID = re.compile(r"^[0-9a-f]{16,40}$")


class MailResource(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, getStore: Callable[[], Any]) -> None:
        super().__init__()
        self.getStore = getStore

    def render_GET(self, request: Request) -> bytes | int:
        store = self.getStore()
        if store is None:
            return _text(request, 404, "no smtp service in capture mode")
        parts = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if not parts:
            if not request.path.endswith(b"/"):
                request.redirect(request.path + b"/")
                return b""
            listing = self._listing(store)
            return self._later(request, lambda: self._summaries(store, *listing()),
                               lambda rows: self._list(request, *rows))
        if parts == ["messages.json"]:
            listing = self._listing(store)
            return self._later(request, lambda: self._summaries(store, *listing()),
                               lambda rows: _json(request, rows[0]))
        if len(parts) != 1:
            return _text(request, 404, "not found")
        name = parts[0]
        base, _, ext = name.partition(".")
        if not _ID.match(base) or ext not in ("", "json", "eml"):
            return _text(request, 404, "not found")
        if ext == "eml":
            return self._later(request, lambda: store.raw(base), lambda raw: _raw(request, base, raw))
        return self._later(request, lambda: store.parsed(base),
                           lambda parsed: _json(request, parsed) if ext == "json" else self._message(request, parsed))

    def _later(self, request: Request, work: Callable[[], Any], render: Callable[[Any], bytes]) -> int:
        """Run C{work} in a thread, then answer with C{render(result)} (404 if a message is gone)."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def failed(f: Failure) -> bytes:
            if f.check(FileNotFoundError):
                return _text(request, 404, "no such message")
            self.log.failure("mail view", f)
            return _text(request, 500, "cannot read the captured mail")

        def send(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        threads.deferToThread(work).addCallback(render).addErrback(failed).addCallback(send)
        return NOT_DONE_YET

    @staticmethod
    def _listing(store: Any) -> Callable[[], tuple[list[str], int]]:
        """
        What lists the newest messages: a shared store (workers: N) reads its folder
        (in the thread); otherwise the ids are read here, in the reactor that changes them.
        """
        if getattr(store, "shared", False):
            return store.listing
        ids, count = store.latest(), store.count()
        return lambda: (ids, count)

    @staticmethod
    def _summaries(store: Any, ids: list[str], count: int) -> tuple[list[dict[str, Any]], int]:
        """(In a thread.)  The summaries of C{ids}, skipping those removed meanwhile; and C{count}."""
        out = []
        for id in ids:
            try:
                out.append(store.summary(id))
            except FileNotFoundError:
                pass
        return out, count

    def _list(self, request: Request, summaries: list[dict[str, Any]], count: int) -> bytes:
        rows = []
        for s in summaries:
            id = s["id"]
            when = datetime.datetime.fromtimestamp(s["created"]).strftime("%Y-%m-%d %H:%M:%S")
            rows.append(
                f"<tr><td>{when}</td><td>{_e(s['sender'] or '<>')}</td><td>{_e(', '.join(s['recipients']))}</td>"
                f"<td><a href=\"{id}\">{_e(s['subject'] or '(no subject)')}</a></td><td>{s['size']}</td></tr>")
        body = (f"<h1>Captured mail</h1><p>{count} message(s); newest first. "
                f"<a href=\"messages.json\">JSON</a></p>"
                "<table><tr><th>Received</th><th>From</th><th>To</th><th>Subject</th><th>Bytes</th></tr>"
                + "".join(rows) + "</table>")
        return _page(request, "Captured mail", body)

    def _message(self, request: Request, m: dict[str, Any]) -> bytes:
        headers = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in m["headers"])
        attachments = "".join(f"<li>{_e(a['filename'] or '(unnamed)')} ({_e(a['type'])}, {a['size']} bytes)</li>"
                              for a in m["attachments"])
        body = (f"<p><a href=\"./\">&larr; all mail</a> | <a href=\"{m['id']}.eml\">raw</a> | "
                f"<a href=\"{m['id']}.json\">JSON</a></p><h1>{_e(m['subject'] or '(no subject)')}</h1>"
                f"<p>Envelope: from {_e(m['sender'] or '<>')} to {_e(', '.join(m['recipients']))}</p>"
                f"<table>{headers}</table>"
                + (f"<h2>Attachments</h2><ul>{attachments}</ul>" if attachments else "")
                + f"<h2>Text</h2><pre>{_e(m['text'])}</pre>"
                + (f"<p>(cut here; the whole message: <a href=\"{m['id']}.eml\">raw</a>)</p>"
                   if m.get("truncated") else ""))
        return _page(request, m["subject"] or m["id"], body)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _page(request: Request, title: str, body: str) -> bytes:
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left;"
            "vertical-align:top}pre{white-space:pre-wrap}</style></head>"
            f"<body>{body}</body></html>").encode()


def _json(request: Request, data: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


def _raw(request: Request, id: str, raw: bytes) -> bytes:
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-disposition", f'inline; filename="{id}.eml"'.encode())
    return raw


def _text(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (text + "\n").encode()


def mailResource(context: Any) -> MailResource:
    """The C{/mail} resource for a daemon: it finds the smtp service's capture store per request."""

    def getStore() -> Any:
        daemon = context.daemon
        try:
            svc = daemon.getServiceNamed("smtp") if daemon is not None else None
        except KeyError:
            return None
        return getattr(svc, "capture", None)

    return MailResource(getStore)
