"""
C{/metrics} and C{/status} on the web service, behind L{AdminGate}: clients
in the allow list (loopback by default) pass; others need HTTP basic auth with
a user of C{admin.users} (scrypt hashes, checked in L{netsvc.auth.hashPool} and
remembered for a few minutes); without users configured they get 403.  Wrong
passwords are limited per client address (a L{netsvc.auth.FailureLimit},
reserve-first): once over, the answer is 429 with C{Retry-After}, without
hashing; with the hashing pool's queue full, 503 with C{Retry-After}.

C{/status} is an HTML page, or JSON when asked (C{Accept: application/json},
C{/status.json} or C{/status?format=json}): pid, start time, uptime, config
file, services, listeners, and every counter and gauge of the process.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.web import resource, server

from netsvc.auth import FailureLimit, HashPool, Refused, hashPool, limitedCheck
from netsvc.metrics import Counter, Gauge, Registry
from netsvc.policies import AccessList
from netsvc.status import MetricsResource
from netsvc.web import pages

#: A password that checked out is not re-checked (scrypt) for this long.
AUTH_CACHE_SECONDS = 300.0


class _Seconds:
    """A C{time.monotonic}-like callable as the C{seconds()} of an IReactorTime (for L{FailureLimit})."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.seconds = clock


class AdminGate(resource.Resource):
    """
    Lets allowed clients (by address, or by password) through to C{target}.

    @param check: C{(password, stored) -> Deferred[bool | Refused]}; default: in
        C{pool} (default L{netsvc.auth.hashPool}).
    @param failures: the wrong-password limit per client address; default: a
        L{FailureLimit} of its own with the module's defaults.  Gates of one site
        should share one (and count its refusals in the registry).
    """

    isLeaf = True

    def __init__(
        self,
        target: resource.Resource,
        access: AccessList,
        users: dict[str, str],
        clock: Callable[[], float] = time.monotonic,
        check: Callable[..., Any] | None = None,
        failures: FailureLimit | None = None,
        pool: HashPool | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.access = access
        self.users = users
        self.clock = clock
        self.check = check or (lambda password, stored: (pool or hashPool()).verify(password, stored))
        self.failures = failures if failures is not None else FailureLimit(_Seconds(clock))
        self._good: dict[bytes, float] = {}

    def render(self, request: server.Request) -> Any:
        client = request.getClientAddress().host or "unix"
        if self.access.permits(client):
            return self.target.render(request)
        if not self.users:
            return pages.error(request, 403, "only for clients on the allow list")
        user = request.getUser().decode("utf-8", "replace")
        password = request.getPassword().decode("utf-8", "replace")
        stored = self.users.get(user)
        if not user or stored is None:
            return self.challenge(request)
        token = hashlib.sha256(f"{user}\0{password}\0{stored}".encode()).digest()
        expiry = self._good.get(token)
        if expiry is not None and expiry > self.clock():
            return self.target.render(request)

        def checked(ok: Any) -> None:
            if request._disconnected:
                return
            if isinstance(ok, Refused):
                body = self.refuse(request, ok)
            elif ok is True:
                if len(self._good) > 1000:
                    self._good.clear()
                self._good[token] = self.clock() + AUTH_CACHE_SECONDS
                body = self.target.render(request)
            else:
                body = self.challenge(request)
            if body is not server.NOT_DONE_YET:
                if request.method != b"HEAD":
                    request.write(body)
                request.finish()

        limitedCheck(self.failures, client, lambda: self.check(password, stored)).addCallback(checked)
        return server.NOT_DONE_YET

    def refuse(self, request: server.Request, refused: Refused) -> bytes:
        """429 (too many wrong passwords from this client) or 503 (the hashing pool is full), with Retry-After."""
        retry = {b"Retry-After": b"%d" % max(1, int(refused.retryAfter))}
        if refused.reason == "rate":
            return pages.error(request, 429, "too many wrong passwords; try again later", headers=retry)
        return pages.error(request, 503, "too many password checks waiting; try again later", headers=retry)

    def challenge(self, request: server.Request) -> bytes:
        return pages.error(
            request,
            401,
            "a user name and password are needed",
            headers={b"WWW-Authenticate": b'Basic realm="netsvc", charset="UTF-8"'},
        )


def openMetrics(registry: Registry) -> resource.Resource:
    """The shared registry as Prometheus text (access is the gate's business)."""
    metrics = MetricsResource(registry, AccessList())

    class _Metrics(resource.Resource):
        isLeaf = True

        def render(self, request: server.Request) -> Any:
            if request.method not in (b"GET", b"HEAD"):
                return pages.error(request, 405, headers={b"Allow": b"GET, HEAD"})
            request.postpath = []
            body = metrics.render_GET(request)
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b"" if request.method == b"HEAD" else body

    return _Metrics()


def snapshot(registry: Registry) -> dict[str, list[dict[str, Any]]]:
    """Every counter and gauge: name -> [{labels..., "value": v}]."""
    out: dict[str, list[dict[str, Any]]] = {}
    for family in registry.families():
        rows = []
        for key, child in sorted(family.children.items()):
            if isinstance(child, Gauge):
                value = child.read()
            elif isinstance(child, Counter):
                value = child.value
            else:
                continue
            row: dict[str, Any] = dict(zip(family.labelnames, key))
            row["value"] = value
            rows.append(row)
        if rows:
            out[family.name] = rows
    return out


class StatusResource(resource.Resource):
    """The daemon's state as HTML or JSON."""

    isLeaf = True

    def __init__(
        self,
        daemon: Callable[[], Any],
        registry: Registry,
        extra: Callable[[], dict] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.daemon = daemon
        self.registry = registry
        self.extra = extra
        self.clock = clock

    def state(self) -> dict[str, Any]:
        daemon = self.daemon()
        base: dict[str, Any] = dict(daemon.status()) if daemon is not None else {}
        started = base.get("started")
        base["uptime"] = round(self.clock() - started, 3) if started else None
        base["metrics"] = snapshot(self.registry)
        if self.extra is not None:
            base.update(self.extra())
        return base

    def wantsJSON(self, request: server.Request) -> bool:
        if request.path.endswith(b".json") or request.args.get(b"format") == [b"json"]:
            return True
        accept = request.getHeader(b"accept") or b""
        return b"application/json" in accept and b"text/html" not in accept

    def render(self, request: server.Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            return pages.error(request, 405, headers={b"Allow": b"GET, HEAD"})
        state = self.state()
        if self.wantsJSON(request):
            body = (json.dumps(state, indent=2, default=str) + "\n").encode()
            kind = b"application/json"
        else:
            body = self.html(state)
            kind = b"text/html; charset=utf-8"
        request.setHeader(b"Content-Type", kind)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    def html(self, state: dict[str, Any]) -> bytes:
        e = html.escape
        uptime = state.get("uptime") or 0
        rows = "".join(
            f"<tr><td>{e(str(l.get('key')))}</td><td>{e(str(l.get('endpoint')))}</td>"
            f"<td>{e(str(l.get('host', l.get('path', ''))))}</td><td>{e(str(l.get('port', '')))}</td></tr>"
            for l in state.get("listeners", [])
        )
        metrics = state.get("metrics", {})
        counters = "".join(
            f"<tr><td>{e(name)}</td><td>{e(_labelText(row))}</td>"
            f"<td class=n>{row['value']:g}</td></tr>"
            for name, rowsOf in metrics.items()
            for row in rowsOf
        )
        web = state.get("web") or {}
        http2 = f"<p>HTTP/2: {e(str(web['http2']))}</p>" if "http2" in web else ""
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>netsvc status</title>
<style>body{{font-family:sans-serif}} td,th{{padding:0 .8em;text-align:left}}
.n{{text-align:right}}</style></head>
<body><h1>netsvc status</h1>
<p>pid {e(str(state.get("pid")))}, up {uptime:.0f} s, config {e(str(state.get("config") or "-"))}</p>
<h2>Services</h2><p>{e(", ".join(state.get("services", [])))}</p>{http2}
<h2>Listeners</h2><table><tr><th>key</th><th>endpoint</th><th>host</th><th>port</th></tr>{rows}</table>
<h2>Counters</h2><table><tr><th>metric</th><th>labels</th><th>value</th></tr>{counters}</table>
<p><a href="?format=json">JSON</a></p>
</body></html>
"""
        return page.encode("utf-8")


def _labelText(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items() if k != "value")
