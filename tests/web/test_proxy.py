"""The reverse proxy against local upstream servers (plain and TLS) on loopback."""

import json
from pathlib import Path

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from netsvc.tls import ServerCertificate, TLSServerEndpoint, generateSelfSigned
from tests.web._support import TLS, exchange, get, parseResponses, req, startWeb, webPort


class Upstream(resource.Resource):
    """Echoes what it got as JSON; /big streams 1 MiB in pieces; /hang never answers."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hanging = []

    def render(self, request):
        if request.path == b"/hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if request.path == b"/big":
            chunk = b"z" * 65536
            for _ in range(16):
                request.write(chunk)
            request.finish()
            return server.NOT_DONE_YET
        request.setHeader(b"X-Upstream", b"yes")
        request.setHeader(b"Keep-Alive", b"timeout=5")
        body = json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": {
                    k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
                "body": request.content.read().decode(),
            }
        ).encode()
        request.setHeader(b"Content-Type", b"application/json")
        return body


class ProxyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.upstream = Upstream()
        site = server.Site(self.upstream)
        site.noisy = False
        self.up = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.up.stopListening)
        upPort = self.up.getHost().port
        closed = server.Site(resource.Resource())
        dead = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(closed)
        deadPort = dead.getHost().port
        yield dead.stopListening()  # nothing listens there now: connection refused
        extra = (
            f"    proxy:\n"
            f"      - {{prefix: /api/, upstream: 'http://127.0.0.1:{upPort}'}}\n"
            f"      - {{prefix: /strip/, upstream: 'http://127.0.0.1:{upPort}/base', strip_prefix: true,"
            f" preserve_host: false}}\n"
            f"      - {{prefix: /slow/, upstream: 'http://127.0.0.1:{upPort}', timeout: 0.5s,"
            f" strip_prefix: true}}\n"
            f"      - {{prefix: /dead/, upstream: 'http://127.0.0.1:{deadPort}'}}\n"
        )
        self.upPort = upPort
        self.daemon = startWeb(self, extra)
        self.port = webPort(self.daemon, TLS)

    def tearDown(self):
        for request in self.upstream.hanging:
            if not request.finished and not request._disconnected:
                request.finish()

    def get(self, path, **kw):
        return get(self.port, path, cafile=self.cafile, **kw)

    @defer.inlineCallbacks
    def test_forwarded(self):
        for slow in (False, True):
            r = yield self.get("/api/thing?x=1", headers={"X-Forwarded-For": "10.1.1.1"}, slow=slow)
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers["x-upstream"], "yes")
            self.assertNotIn("keep-alive", r.headers)
            seen = json.loads(r.body)
            self.assertEqual(seen["uri"], "/api/thing?x=1")
            h = seen["headers"]
            # the client is no trusted proxy (trusted_proxies is empty): its header is replaced
            self.assertEqual(h["x-forwarded-for"], ["127.0.0.1"])
            self.assertEqual(h["x-forwarded-proto"], ["https"])
            self.assertEqual(h["host"], ["localhost"])
            self.assertEqual(h["x-forwarded-host"], ["localhost"])
            self.assertNotIn("connection", h)

    @defer.inlineCallbacks
    def test_stripPrefixAndUpstreamHost(self):
        r = yield self.get("/strip/a/b")
        seen = json.loads(r.body)
        self.assertEqual(seen["uri"], "/base/a/b")
        self.assertEqual(seen["headers"]["host"], [f"127.0.0.1:{self.upPort}"])

    @defer.inlineCallbacks
    def test_postBody(self):
        r = yield self.get(
            "/api/form",
            method="POST",
            body=b"a=1&b=2",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(r.status, 200, r)
        seen = json.loads(r.body)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["body"], "a=1&b=2")

    @defer.inlineCallbacks
    def test_largeResponseStreamed(self):
        r = yield self.get("/api/../big".replace("/api/..", "/api/x/.."))  # stays under /api/
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_bigBody(self):
        data = yield exchange(
            self.port,
            req("GET", "/api/big".replace("/api/big", "/api/big"), close=True),
            cafile=self.cafile,
        )
        # /api/big reaches the upstream as /api/big (not /big): JSON echo
        self.assertIn(b"/api/big", data)

    @defer.inlineCallbacks
    def test_unreachable502(self):
        r = yield self.get("/dead/x")
        self.assertEqual(r.status, 502)
        self.assertIn(b"502 Bad Gateway", r.body)

    @defer.inlineCallbacks
    def test_timeout504(self):
        r = yield self.get("/slow/hang")
        self.assertEqual(r.status, 504)

    @defer.inlineCallbacks
    def test_head(self):
        r = yield self.get("/api/x", method="HEAD")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")


class StreamingTests(unittest.TestCase):
    """A 1 MiB upstream body, relayed in pieces; a strip_prefix route to reach /big."""

    @defer.inlineCallbacks
    def test_bigResponse(self):
        site = server.Site(Upstream())
        up = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(up.stopListening)
        extra = (
            f"    proxy:\n      - {{prefix: /u/, upstream: 'http://127.0.0.1:{up.getHost().port}',"
            f" strip_prefix: true}}\n"
        )
        daemon = startWeb(self, extra)
        r = yield get(webPort(daemon, TLS), "/u/big", cafile=self.cafile)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"z" * (16 * 65536))


class TLSUpstreamTests(unittest.TestCase):
    """https:// upstreams are verified: with the right cafile it works, without it 502."""

    @defer.inlineCallbacks
    def test_verifiedUpstream(self):
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        cert, key = base / "up.pem", base / "up.key"
        generateSelfSigned(cert, key, ["localhost", "127.0.0.1"])
        material = ServerCertificate(cert, key)
        site = server.Site(Upstream())
        up = yield TLSServerEndpoint(
            material.connectionCreator(), endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        ).listen(site)
        self.addCleanup(up.stopListening)
        p = up.getHost().port
        extra = (
            f"    proxy:\n"
            f"      - {{prefix: /good/, upstream: 'https://localhost:{p}', cafile: {cert}}}\n"
            f"      - {{prefix: /bad/, upstream: 'https://localhost:{p}'}}\n"
        )
        daemon = startWeb(self, extra)
        r = yield get(webPort(daemon, TLS), "/good/x", cafile=self.cafile)
        self.assertEqual(r.status, 200)
        self.assertEqual(json.loads(r.body)["uri"], "/good/x")
        r = yield get(webPort(daemon, TLS), "/bad/x", cafile=self.cafile)
        self.assertEqual(r.status, 502)


class Recorder(resource.Resource):
    """An upstream that answers 200 with the request URI it was asked for, and keeps a list of them."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        self.seen.append(request.uri)
        self.seenForwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        self.seenHeaders = {k.decode().lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        return b"upstream saw " + request.uri


class MountEscapeTests(unittest.TestCase):
    """
    Issue 21: with C{{prefix: /api/, upstream: http://127.0.0.1:P/app, strip_prefix: true}},
    C{GET /api/../admin/} (and its encoded spellings) reached the upstream as
    C{/app/../admin/}; now the path is normalised first and what leaves the mount is 400.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.recorder = Recorder()
        site = server.Site(self.recorder)
        site.noisy = False
        up = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(up.stopListening)
        p = up.getHost().port
        extra = (
            f"    proxy:\n"
            f"      - {{prefix: /api/, upstream: 'http://127.0.0.1:{p}/app', strip_prefix: true}}\n"
            f"      - {{prefix: /keep/, upstream: 'http://127.0.0.1:{p}'}}\n"
        )
        daemon = startWeb(self, extra)
        self.port = webPort(daemon, TLS)

    @defer.inlineCallbacks
    def send(self, path):
        data = yield exchange(self.port, req("GET", path, close=True), cafile=self.cafile)
        return parseResponses(data, ["GET"])[0]

    @defer.inlineCallbacks
    def test_escapesRefused(self):
        spellings = [
            "/api/../admin/",
            "/api/%2e%2e/admin/",
            "/api/%2E%2E/admin/",
            "/api/.%2e/admin/",
            "/api/..%2fadmin/",
            "/api/..%2Fadmin/",
            "/api/..%5cadmin/",
            "/api/x/../../admin/",
            "/api/x/..%2f..%2fadmin/",
            "/api/..",
            "/api/../../../etc/passwd",
            "/keep/../admin/",
            "/keep/%2e%2e/admin/",
            "/api/..;/admin/",  # Tomcat, Jetty and Spring read ..;x as ..
            "/api/..;jsessionid=1/admin/",
            "/api/%2e%2e;/admin/",
            "/api/x/.;/../../admin/",
        ]
        for path in spellings:
            r = yield self.send(path)
            self.assertEqual(r.status, 400, f"{path}: {r}")
        self.assertEqual(self.recorder.seen, [])

    @defer.inlineCallbacks
    def test_normalisedInsideTheMount(self):
        cases = [
            ("/api/x/../y?q=/../z", b"/app/y?q=/../z"),  # the query is passed as sent
            ("/api/x/%2e%2e/y", b"/app/y"),
            ("/api/a/b/..%2fc", b"/app/a/c"),
            ("/api//a//b/./c", b"/app/a/b/c"),
            ("/api/a%2Fb", b"/app/a%2Fb"),  # an encoded slash that makes no dot segment is kept
            ("/api/x/..", b"/app/"),
            ("/keep/a/../b", b"/keep/b"),
        ]
        for path, expected in cases:
            r = yield self.send(path)
            self.assertEqual(r.status, 200, f"{path}: {r}")
            self.assertEqual(self.recorder.seen[-1], expected, path)


class ForwardedForTests(unittest.TestCase):
    """
    Issue 21: X-Forwarded-For from the client was kept and appended to, so any
    client could name the address the upstream logs and trusts.  Now it is kept
    only from C{trusted_proxies}; from anyone else it is replaced by the peer.
    """

    @defer.inlineCallbacks
    def proxied(self, trusted, sent, headers=None):
        from twisted.web.client import HTTPConnectionPool

        from netsvc.web.proxy import ProxyResource

        recorder = Recorder()
        upSite = server.Site(recorder)
        upSite.noisy = False
        up = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(upSite)
        self.addCleanup(up.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        proxy = ProxyResource(
            f"http://127.0.0.1:{up.getHost().port}", reactor, pool, trustedProxies=trusted
        )
        site = server.Site(proxy)
        site.noisy = False
        front = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(front.stopListening)
        headers = dict(headers or {}, **({"X-Forwarded-For": sent} if sent else {}))
        data = yield exchange(front.getHost().port, req("GET", "/x", headers, close=True), tls=False)
        self.assertEqual(parseResponses(data, ["GET"])[0].status, 200)
        self.recorded = recorder.seenHeaders
        return recorder.seenForwarded

    @defer.inlineCallbacks
    def test_untrustedReplaced(self):
        for trusted in ([], ["10.0.0.0/8", "::1/128"]):
            seen = yield self.proxied(trusted, "6.6.6.6")
            self.assertEqual(seen, [b"127.0.0.1"], trusted)

    @defer.inlineCallbacks
    def test_otherClaimsDroppedFromUntrustedPeers(self):
        """Forwarded, X-Real-IP, X-Forwarded-Host... and names with underscores (X_Forwarded_For, which
        CGI/WSGI upstreams read as X-Forwarded-For) are dropped unless the peer is a trusted proxy."""
        claims = {"Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6", "X-Forwarded-Host": "evil.example",
                  "X_Forwarded_For": "6.6.6.6", "X-Kept": "yes"}
        seen = yield self.proxied([], None, headers=claims)
        self.assertEqual(seen, [b"127.0.0.1"])
        self.assertEqual(sorted(k for k in self.recorded if k in {k2.lower() for k2 in claims}),
                         ["x-forwarded-host", "x-kept"])
        self.assertNotIn(b"evil.example", self.recorded["x-forwarded-host"])  # ours, from Host
        seen = yield self.proxied(["127.0.0.0/8"], None, headers=claims)
        self.assertIn("forwarded", self.recorded)
        self.assertIn("x-real-ip", self.recorded)
        self.assertNotIn("x_forwarded_for", self.recorded)

    @defer.inlineCallbacks
    def test_trustedAppended(self):
        seen = yield self.proxied(["127.0.0.0/8"], "203.0.113.7")
        self.assertEqual(seen, [b"203.0.113.7, 127.0.0.1"])
        seen = yield self.proxied(["127.0.0.1"], None)
        self.assertEqual(seen, [b"127.0.0.1"])

    def test_settingChecked(self):
        from netsvc.config import ConfigError, parse

        parse("services:\n  web:\n    trusted_proxies: [10.0.0.0/8, '::1']\n")
        with self.assertRaises(ConfigError) as e:
            parse("services:\n  web:\n    trusted_proxies: [10.0.0.1/8]\n")
        self.assertIn("trusted_proxies", str(e.exception))


class ConfiguredTrustTests(unittest.TestCase):
    """C{services.web.trusted_proxies} reaches the proxy routes the daemon builds, and escapes are counted."""

    @defer.inlineCallbacks
    def setUp(self):
        self.upstream = Upstream()
        site = server.Site(self.upstream)
        site.noisy = False
        up = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(up.stopListening)
        extra = (
            "    trusted_proxies: [127.0.0.0/8]\n"
            "    proxy:\n"
            f"      - {{prefix: /api/, upstream: 'http://127.0.0.1:{up.getHost().port}'}}\n"
        )
        self.daemon = startWeb(self, extra)
        self.port = webPort(self.daemon, TLS)

    @defer.inlineCallbacks
    def test_trustedProxyFromTheConfiguration(self):
        r = yield get(self.port, "/api/x", cafile=self.cafile, headers={"X-Forwarded-For": "203.0.113.7"})
        self.assertEqual(r.status, 200)
        self.assertEqual(json.loads(r.body)["headers"]["x-forwarded-for"], ["203.0.113.7, 127.0.0.1"])

    @defer.inlineCallbacks
    def test_escapeCounted(self):
        r = yield get(self.port, "/api/%2e%2e/admin/", cafile=self.cafile)
        self.assertEqual(r.status, 400)
        metrics = self.daemon.getServiceNamed("web").metrics
        self.assertEqual(metrics.refused("proxy_path").value, 1)
