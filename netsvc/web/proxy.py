"""
Reverse proxy: a path prefix (or a whole virtual host) forwarded to an
upstream C{http://} or C{https://} server (certificate verified, against the
route's C{cafile} or the system's roots).

  - Path: normalised before it goes anywhere (L{normalisePath}: percent-encoded
    dots and slashes decoded where they make a dot segment, RFC 3986
    remove_dot_segments, repeated slashes merged), as nginx and Caddy do; a
    path that then leaves the route's prefix (C{/api/../admin/},
    C{/api/%2e%2e/admin/}, C{/api/..%2fadmin/}) or climbs above C{/} is
    answered 400 and never sent upstream.
  - Request: method, normalised path (+ query, as sent), headers minus
    hop-by-hop ones, plus C{X-Forwarded-For}, C{X-Forwarded-Proto},
    C{X-Forwarded-Host}.  C{X-Forwarded-For} from the client is kept (and the
    peer appended) only when the peer is one of C{trusted_proxies}; from anyone
    else it is replaced by the peer's address (nginx's C{set_real_ip_from}).
    The body is sent from what twisted.web has received (it spools request
    bodies to a temporary file before a resource sees them, like nginx's
    default C{proxy_request_buffering on}), streamed with back-pressure.
  - Response: status, headers minus hop-by-hop ones, the body streamed to the
    client as it arrives; a slow client pauses the upstream connection.
  - Errors: 502 when the upstream cannot be reached or fails, 504 when its
    response headers do not arrive within the route's C{timeout}; a body cut
    short upstream cuts the client's response short (connection closed / stream
    reset), never a silent truncation.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IPolicyForHTTPS
from twisted.web.resource import Resource
from zope.interface import implementer

from netsvc.web import pages

log = Logger()

#: Never forwarded either way (RFC 9110 7.6.1), plus the ones named in Connection.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ]
)


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """TLS to upstreams: verified against C{cafile} (PEM) or the system's roots, SNI sent."""

    def __init__(self, cafile: str | None = None) -> None:
        self.cafile = cafile

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from netsvc.tls import clientCreator

        return clientCreator(hostname.decode("idna"), cafile=self.cafile)


class PathEscapes(ValueError):
    """A request path that climbs above C{/} once its dot segments are removed."""


#: A slash or backslash hidden in a segment (encoded), or a backslash some upstreams split at.
_ENCODED_SEPARATOR = re.compile(rb"%(?:2[fF]|5[cC])|\\")
#: Re-encoding a decoded piece: what may stay literal in a path segment (RFC 3986 pchar).
_PCHAR = b"!$&'()*+,;=:@-._~"


def normalisePath(path: bytes) -> bytes:
    """
    C{path} (no query) with its dot segments removed and repeated slashes
    merged, as a server must see it before matching a route.

    A segment is a dot segment when it decodes to C{.} or C{..} (C{%2e%2e},
    C{.%2E}); a segment whose decoded C{/} or C{\\} (C{..%2f}, C{..%5c})
    would make one is split there too, and its pieces re-encoded, so an
    upstream that decodes C{%2f} cannot be walked out of its folder either.
    Other segments (C{b%2Fc} included) are kept exactly as sent.  A trailing slash (or a last dot
    segment) keeps the path ending in C{/}.

    @raise PathEscapes: the path climbs above C{/} (C{/..}, C{/a/../..}).
    """
    if not path.startswith(b"/"):
        path = b"/" + path
    pieces: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if b"%" not in segment and b"\\" not in segment and b";" not in segment:
            pieces.append(segment)
            continue
        decoded = unquote_to_bytes(segment)
        if decoded.split(b";", 1)[0] in (b".", b"..") and b";" in decoded:
            raise PathEscapes(path)  # ..;x is .. to Tomcat, Jetty and Spring upstreams
        if decoded in (b".", b".."):
            pieces.append(decoded)
            continue
        split = re.split(rb"[/\\]", decoded) if _ENCODED_SEPARATOR.search(segment) else []
        if any(p in (b".", b"..") for p in split):
            pieces.extend(p if p in (b".", b"..") else quote_from_bytes(p, safe=_PCHAR).encode() for p in split)
        else:
            pieces.append(segment)
    out: list[bytes] = []
    for piece in pieces:
        if piece == b"..":
            if not out:
                raise PathEscapes(path)
            out.pop()
        elif piece not in (b".", b""):
            out.append(piece)
    trailing = bool(out) and pieces[-1] in (b"", b".", b"..")
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


#: Headers by which a proxy tells the upstream who the client is: kept only from trusted_proxies.
_CLIENT_CLAIMS = frozenset([b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-port",
                            b"x-forwarded-proto", b"x-forwarded-for", b"x-client-ip", b"true-client-ip"])


def _hopHeaders(headers: Headers) -> set[bytes]:
    named = set(HOP_BY_HOP)
    for value in headers.getRawHeaders(b"connection", []):
        named.update(v.strip().lower() for v in value.split(b",") if v.strip())
    return named


class ProxyResource(Resource):
    """Forwards every request it is given to one upstream."""

    isLeaf = True

    def __init__(
        self,
        upstream: str,
        reactor: Any,
        pool: HTTPConnectionPool,
        prefix: str = "/",
        stripPrefix: bool = False,
        preserveHost: bool = True,
        connectTimeout: float = 5.0,
        timeout: float = 60.0,
        cafile: str | None = None,
        metrics: Any = None,
        trustedProxies: Iterable[str] = (),
    ) -> None:
        """
        @param trustedProxies: CIDR networks (C{trusted_proxies}) whose
            C{X-Forwarded-For} is kept and appended to; from any other peer it
            is replaced.
        """
        super().__init__()
        from netsvc.policies import parseNetworks

        self.trustedProxies = parseNetworks(trustedProxies)
        parts = urlsplit(upstream)
        self.scheme = parts.scheme.encode()
        self.netloc = parts.netloc.encode()
        self.basePath = parts.path.rstrip("/").encode()
        self.prefix = prefix.encode()
        self.stripPrefix = stripPrefix
        self.preserveHost = preserveHost
        self.timeout = timeout
        self.reactor = reactor
        self.metrics = metrics
        self.agent = Agent(
            reactor, contextFactory=VerifyingPolicy(cafile), connectTimeout=connectTimeout, pool=pool
        )

    def upstreamURL(self, uri: bytes) -> bytes:
        """
        The upstream URL for request URI C{uri}: its path normalised
        (L{normalisePath}), the prefix stripped if asked, the query as sent.

        @raise PathEscapes: the normalised path is not under this route's prefix.
        """
        path, sep, query = uri.partition(b"?")
        path = normalisePath(path)
        if not path.startswith(self.prefix):
            raise PathEscapes(uri)
        if self.stripPrefix and self.prefix != b"/":
            path = path[len(self.prefix.rstrip(b"/")) :]
            if not path.startswith(b"/"):
                path = b"/" + path
        return self.scheme + b"://" + self.netloc + self.basePath + path + sep + query

    def trusts(self, peer: str | None) -> bool:
        """Whether C{peer} is one of the trusted proxies (whose X-Forwarded-For is kept)."""
        if not peer or not self.trustedProxies:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return any(address in n or (mapped is not None and mapped in n) for n in self.trustedProxies)

    def forwardHeaders(self, request: server.Request) -> Headers:
        incoming = request.requestHeaders
        drop = _hopHeaders(incoming)
        peer = getattr(request.getClientAddress(), "host", None)
        trusted = self.trusts(peer)
        out = Headers()
        for name, values in incoming.getAllRawHeaders():
            lower = name.lower()
            if (
                lower in drop or lower.startswith(b":") or lower == b"content-length"
            ):  # the Agent frames the body
                continue
            if b"_" in lower or (not trusted and lower in _CLIENT_CLAIMS):
                # what only a proxy may say about the client, from someone else; and names with an
                # underscore, which CGI/WSGI upstreams read as their dash spelling (nginx drops them)
                continue
            if lower == b"host" and not self.preserveHost:
                continue
            out.setRawHeaders(name, list(values))
        host = request.getHeader(b"host")
        client = (peer or "unix").encode()
        prior = incoming.getRawHeaders(b"x-forwarded-for") if trusted else None
        out.setRawHeaders(b"X-Forwarded-For", [b", ".join(list(prior or []) + [client])])
        out.setRawHeaders(b"X-Forwarded-Proto", [b"https" if request.isSecure() else b"http"])
        if host is not None:
            out.setRawHeaders(b"X-Forwarded-Host", [host])
            if self.preserveHost:
                out.setRawHeaders(b"Host", [host])
        if not self.preserveHost:
            out.setRawHeaders(b"Host", [self.netloc])
        return out

    def render(self, request: server.Request) -> Any:
        try:
            url = self.upstreamURL(request.uri)
        except PathEscapes:
            if self.metrics is not None:
                self.metrics.refused("proxy_path").inc()
            return pages.error(request, 400, "the path leaves this proxy route")
        headers = self.forwardHeaders(request)
        body = None
        content = request.content
        if content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
            if length or request.method in (b"POST", b"PUT", b"PATCH"):
                body = FileBodyProducer(content)
        d = self.agent.request(request.method, url, headers, body)
        exchange = _Exchange(request, self)
        timer = self.reactor.callLater(self.timeout, exchange.timeUp, d)

        def stopTimer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stopTimer)
        d.addCallbacks(exchange.respond, exchange.failed)
        d.addErrback(lambda f: log.failure("proxy error", failure=f))
        request.notifyFinish().addErrback(lambda _: exchange.clientGone(d))
        return server.NOT_DONE_YET


class _Exchange:
    """One proxied request: the upstream response, relayed to the client."""

    def __init__(self, request: server.Request, resource: ProxyResource) -> None:
        self.request = request
        self.resource = resource
        self.relay: _Relay | None = None
        self.gone = False
        self.timedOut = False

    def timeUp(self, d: defer.Deferred) -> None:
        """The response headers did not arrive in time: give up on the upstream (504)."""
        self.timedOut = True
        d.cancel()

    def respond(self, response: Any) -> None:
        request = self.request
        if self.gone:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase or None)
        drop = _hopHeaders(response.headers) | {b"content-length"}
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in drop:
                request.responseHeaders.setRawHeaders(name, list(values))
        if response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"Content-Length", b"%d" % response.length)
        if request.method == b"HEAD" or response.code in (204, 304) or response.length == 0:
            response.deliverBody(_Discard())
            request.finish()
            return
        self.relay = _Relay(request)
        response.deliverBody(self.relay)

    def failed(self, reason: Failure) -> None:
        if self.gone:
            return
        if self.timedOut:
            code, detail = 504, "the upstream server did not answer in time"
        else:
            code, detail = 502, "the upstream server could not be reached or failed"
        log.warn(
            "proxy to {upstream}: {error}",
            upstream=self.resource.netloc.decode(),
            error=reason.getErrorMessage() or reason.type.__name__,
        )
        body = pages.error(self.request, code, detail)
        self.request.write(body)
        self.request.finish()

    def clientGone(self, d: defer.Deferred) -> None:
        self.gone = True
        if self.relay is not None:
            self.relay.stop()
        elif not d.called:
            d.cancel()


class _Relay(Protocol):
    """Writes the upstream body to the client; the client's back-pressure pauses the upstream."""

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.done = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)

    def stop(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self.done:
            return
        self.done = True
        request = self.request
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:
            log.warn("proxy: upstream body cut short: {error}", error=reason.getErrorMessage())
            request.loseConnection()


class _Discard(Protocol):
    def connectionLost(self, reason: Failure) -> None:
        pass
