"""
Static files over real loopback sockets (TLS and plain HTTP/1.1), each check
made twice where it applies: on a fresh connection (the fast path answers) and
after a request the fast path hands over (twisted.web answers).
"""

import gzip

from twisted.internet import defer
from twisted.trial import unittest

from tests.web._support import (
    PLAIN,
    SMALL,
    TEXT,
    TLS,
    exchange,
    get,
    parseResponses,
    req,
    startWeb,
    webPort,
)

BOTH = (False, True)


class StaticTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startWeb(self)
        self.tls = webPort(self.daemon, TLS)
        self.plain = webPort(self.daemon, PLAIN)

    def get(self, path, headers=None, method="GET", slow=False, tls=True, **kw):
        port = self.tls if tls else self.plain
        return get(port, path, headers, method=method, tls=tls, cafile=self.cafile, slow=slow, **kw)

    @defer.inlineCallbacks
    def test_getSmallFile(self):
        for slow in BOTH:
            r = yield self.get("/small.bin", slow=slow)
            self.assertEqual(r.status, 200)
            self.assertEqual(r.body, SMALL)
            self.assertEqual(r.headers["content-length"], str(len(SMALL)))
            self.assertEqual(r.headers["content-type"], "application/octet-stream")
            self.assertTrue(r.headers["etag"].startswith('"'))
            self.assertIn("last-modified", r.headers)
            self.assertEqual(r.headers["accept-ranges"], "bytes")

    @defer.inlineCallbacks
    def test_sameHeadersBothPaths(self):
        fast = yield self.get("/text.txt", {"Accept-Encoding": "gzip"})
        slow = yield self.get("/text.txt", {"Accept-Encoding": "gzip"}, slow=True)
        fast.headers.pop("date")
        slow.headers.pop("date")
        self.assertEqual(fast.headers, slow.headers)
        self.assertEqual(fast.body, slow.body)

    @defer.inlineCallbacks
    def test_securityHeadersAndHSTS(self):
        for slow in BOTH:
            r = yield self.get("/small.bin", slow=slow)
            self.assertEqual(r.headers["strict-transport-security"], "max-age=31536000")
            self.assertEqual(r.headers["x-content-type-options"], "nosniff")
            self.assertEqual(r.headers["x-frame-options"], "SAMEORIGIN")
            self.assertEqual(r.headers["referrer-policy"], "strict-origin-when-cross-origin")
            self.assertEqual(r.headers["server"], "netsvc")
            plain = yield self.get("/small.bin", slow=slow, tls=False)
            self.assertNotIn("strict-transport-security", plain.headers)
            self.assertEqual(plain.headers["x-content-type-options"], "nosniff")
        missing = yield self.get("/nope")
        self.assertEqual(missing.headers["strict-transport-security"], "max-age=31536000")

    @defer.inlineCallbacks
    def test_head(self):
        for slow in BOTH:
            r = yield self.get("/text.txt", method="HEAD", slow=slow)
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers["content-length"], str(len(TEXT)))
        big = yield self.get("/big.txt", method="HEAD")
        self.assertEqual(big.headers["content-length"], str(14 * 40000))

    @defer.inlineCallbacks
    def test_headSendsNoBody(self):
        data = yield exchange(self.tls, req("HEAD", "/small.bin", close=True), cafile=self.cafile)
        self.assertTrue(data.endswith(b"\r\n\r\n"), data[-40:])

    @defer.inlineCallbacks
    def test_charset(self):
        for path, kind in [
            ("/text.txt", "text/plain; charset=utf-8"),
            ("/", "text/html; charset=utf-8"),
            ("/sub/page.css", "text/css; charset=utf-8"),
            ("/data.json", "application/json; charset=utf-8"),
        ]:
            r = yield self.get(path)
            self.assertEqual(r.headers["content-type"], kind, path)

    @defer.inlineCallbacks
    def test_ifNoneMatch304(self):
        first = yield self.get("/text.txt")
        for slow in BOTH:
            r = yield self.get("/text.txt", {"If-None-Match": first.headers["etag"]}, slow=slow)
            self.assertEqual(r.status, 304)
            self.assertEqual(r.body, b"")
            self.assertEqual(r.headers["etag"], first.headers["etag"])
            r = yield self.get(
                "/text.txt", {"If-None-Match": '"other", ' + first.headers["etag"]}, slow=slow
            )
            self.assertEqual(r.status, 304)
            r = yield self.get("/text.txt", {"If-None-Match": '"other"'}, slow=slow)
            self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_gzipETagDiffers(self):
        plain = yield self.get("/text.txt")
        packed = yield self.get("/text.txt", {"Accept-Encoding": "gzip"})
        self.assertNotEqual(plain.headers["etag"], packed.headers["etag"])
        r = yield self.get(
            "/text.txt", {"Accept-Encoding": "gzip", "If-None-Match": packed.headers["etag"]}
        )
        self.assertEqual(r.status, 304)

    @defer.inlineCallbacks
    def test_ifModifiedSince(self):
        first = yield self.get("/text.txt")
        for slow in BOTH:
            r = yield self.get(
                "/text.txt", {"If-Modified-Since": first.headers["last-modified"]}, slow=slow
            )
            self.assertEqual(r.status, 304)
            r = yield self.get(
                "/text.txt", {"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}, slow=slow
            )
            self.assertEqual(r.status, 200)
            # If-None-Match wins over If-Modified-Since
            r = yield self.get(
                "/text.txt",
                {"If-Modified-Since": first.headers["last-modified"], "If-None-Match": '"x"'},
                slow=slow,
            )
            self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_ifMatch412(self):
        r = yield self.get("/text.txt", {"If-Match": '"nope"'})
        self.assertEqual(r.status, 412)
        first = yield self.get("/text.txt")
        r = yield self.get("/text.txt", {"If-Match": first.headers["etag"]})
        self.assertEqual(r.status, 200)
        r = yield self.get("/text.txt", {"If-Unmodified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"})
        self.assertEqual(r.status, 412)

    @defer.inlineCallbacks
    def test_singleRange(self):
        for path, body in [("/small.bin", SMALL), ("/big.bin", bytes(range(256)) * 2048)]:
            r = yield self.get(path, {"Range": "bytes=10-19"})
            self.assertEqual(r.status, 206)
            self.assertEqual(r.body, body[10:20])
            self.assertEqual(r.headers["content-range"], f"bytes 10-19/{len(body)}")
            r = yield self.get(path, {"Range": "bytes=-5"})
            self.assertEqual(r.body, body[-5:])

    @defer.inlineCallbacks
    def test_multiRange(self):
        for path, body in [("/small.bin", SMALL), ("/big.bin", bytes(range(256)) * 2048)]:
            r = yield self.get(path, {"Range": "bytes=0-3,100-103,-2"})
            self.assertEqual(r.status, 206)
            kind = r.headers["content-type"]
            self.assertTrue(kind.startswith("multipart/byteranges; boundary="), kind)
            boundary = kind.split("boundary=")[1].encode()
            self.assertEqual(int(r.headers["content-length"]), len(r.body))
            parts = r.body.split(b"--" + boundary)
            self.assertEqual(parts[-1], b"--\r\n")
            got = []
            for part in parts[1:-1]:
                head, _, data = part.partition(b"\r\n\r\n")
                self.assertIn(b"Content-Range: bytes", head)
                got.append(data[:-2] if data.endswith(b"\r\n") else data)
            self.assertEqual(got, [body[0:4], body[100:104], body[-2:]])

    @defer.inlineCallbacks
    def test_unsatisfiable416(self):
        r = yield self.get("/small.bin", {"Range": "bytes=5000-6000"})
        self.assertEqual(r.status, 416)
        self.assertEqual(r.headers["content-range"], f"bytes */{len(SMALL)}")
        self.assertIn(b"416", r.body)

    @defer.inlineCallbacks
    def test_ifRange(self):
        first = yield self.get("/small.bin")
        r = yield self.get("/small.bin", {"Range": "bytes=0-1", "If-Range": first.headers["etag"]})
        self.assertEqual(r.status, 206)
        r = yield self.get("/small.bin", {"Range": "bytes=0-1", "If-Range": '"stale"'})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, SMALL)

    @defer.inlineCallbacks
    def test_gzipWhenAsked(self):
        for slow in BOTH:
            r = yield self.get("/text.txt", {"Accept-Encoding": "gzip, deflate"}, slow=slow)
            self.assertEqual(r.headers["content-encoding"], "gzip")
            self.assertEqual(r.headers["vary"], "Accept-Encoding")
            self.assertEqual(gzip.decompress(r.body), TEXT)
            r = yield self.get("/text.txt", {"Accept-Encoding": "identity"}, slow=slow)
            self.assertNotIn("content-encoding", r.headers)
            self.assertEqual(r.body, TEXT)
            self.assertEqual(r.headers["vary"], "Accept-Encoding")
            r = yield self.get("/text.txt", {"Accept-Encoding": "gzip;q=0"}, slow=slow)
            self.assertNotIn("content-encoding", r.headers)
            r = yield self.get("/text.txt", slow=slow)
            self.assertNotIn("content-encoding", r.headers)

    @defer.inlineCallbacks
    def test_gzipSidecar(self):
        r = yield self.get("/pre.js", {"Accept-Encoding": "gzip"})
        self.assertEqual(r.headers["content-encoding"], "gzip")
        self.assertEqual(r.body, (self.root / "pre.js.gz").read_bytes())
        self.assertEqual(r.headers["content-type"], "text/javascript; charset=utf-8")

    @defer.inlineCallbacks
    def test_gzipStreamedForLargeText(self):
        r = yield self.get("/big.txt", {"Accept-Encoding": "gzip"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-encoding"], "gzip")
        self.assertEqual(gzip.decompress(r.body), b"big text line\n" * 40000)
        r = yield self.get("/big.txt")
        self.assertEqual(len(r.body), 14 * 40000)

    @defer.inlineCallbacks
    def test_noGzipForBinary(self):
        r = yield self.get("/big.bin", {"Accept-Encoding": "gzip"})
        self.assertNotIn("content-encoding", r.headers)
        self.assertEqual(len(r.body), 512 * 1024)

    @defer.inlineCallbacks
    def test_index(self):
        r = yield self.get("/")
        self.assertIn(b"home page", r.body)

    @defer.inlineCallbacks
    def test_folderRedirect(self):
        r = yield self.get("/sub?x=1")
        self.assertEqual(r.status, 301)
        self.assertEqual(r.headers["location"], "/sub/?x=1")

    @defer.inlineCallbacks
    def test_noListingByDefault(self):
        r = yield self.get("/emptydir/")
        self.assertEqual(r.status, 404)

    @defer.inlineCallbacks
    def test_notFoundPage(self):
        r = yield self.get("/missing.html")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.headers["content-type"], "text/html; charset=utf-8")
        self.assertIn(b"<h1>404 Not Found</h1>", r.body)

    @defer.inlineCallbacks
    def test_methodNotAllowed(self):
        for method in ["POST", "PUT", "DELETE", "OPTIONS"]:
            r = yield self.get(
                "/small.bin", method=method, body=b"x=1" if method in ("POST", "PUT") else b""
            )
            self.assertEqual(r.status, 405, method)
            self.assertEqual(r.headers["allow"], "GET, HEAD")

    @defer.inlineCallbacks
    def test_traversal(self):
        secret = self.base / "secret.txt"
        secret.write_text("top secret")
        for path in [
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/sub/%2E%2E/%2e%2e/secret.txt",
            "/..%2fsecret.txt",
            "/%2e%2e%5csecret.txt",
            "/.secret",
            "/small.bin%00",
            "//../secret.txt",
        ]:
            for slow in BOTH:
                r = yield self.get(path, slow=slow)
                self.assertIn(r.status, (400, 404), path)
                self.assertNotIn(b"top secret", r.body)

    @defer.inlineCallbacks
    def test_pipelined(self):
        payload = (
            req("GET", "/small.bin")
            + req("HEAD", "/text.txt")
            + req("GET", "/nope")
            + req("GET", "/small.bin", close=True)
        )
        data = yield exchange(self.tls, payload, cafile=self.cafile)
        rs = parseResponses(data, ["GET", "HEAD", "GET", "GET"])
        self.assertEqual([r.status for r in rs], [200, 200, 404, 200])
        self.assertEqual(rs[3].body, SMALL)

    @defer.inlineCallbacks
    def test_fileChangeSeen(self):
        first = yield self.get("/small.bin")
        (self.root / "small.bin").write_bytes(b"new content")
        web = self.daemon.getServiceNamed("web")
        web.reconfigure(web.settings)  # what SIGHUP does; else within cache.revalidate
        r = yield self.get("/small.bin")
        self.assertEqual(r.body, b"new content")
        self.assertNotEqual(r.headers["etag"], first.headers["etag"])


class ListingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_listingWhenEnabled(self):
        daemon = startWeb(self, "    directory_listing: true\n    index: []\n")
        r = yield get(webPort(daemon, TLS), "/", cafile=self.cafile)
        self.assertEqual(r.status, 200)
        self.assertIn(b'<a href="small.bin">small.bin</a>', r.body)
        self.assertIn(b'<a href="sub/">sub/</a>', r.body)
        self.assertNotIn(b".secret", r.body)


class BodyLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tooLargeBody413(self):
        daemon = startWeb(self, "    limits: {max_message: 1KiB}\n")
        r = yield get(
            webPort(daemon, TLS), "/small.bin", method="POST", body=b"x" * 5000, cafile=self.cafile
        )
        self.assertEqual(r.status, 413)
        chunked = (
            b"POST /small.bin HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 3
            + b"0\r\n\r\n"
        )
        data = yield exchange(webPort(daemon, TLS), chunked, cafile=self.cafile)
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data[:100])
        r = yield get(
            webPort(daemon, TLS), "/small.bin", method="POST", body=b"x" * 500, cafile=self.cafile
        )
        self.assertEqual(r.status, 405)


class DrainTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_idleKeepAliveClosedAtShutdown(self):
        from twisted.internet import endpoints, reactor

        from netsvc.tls import clientCreator
        from tests.web.test_site import _KeepAlive

        daemon = startWeb(self)
        endpoint = endpoints.wrapClientTLS(
            clientCreator("localhost", cafile=self.cafile, acceptableProtocols=[b"http/1.1"]),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", webPort(daemon, TLS)))
        proto = _KeepAlive()
        yield endpoints.connectProtocol(endpoint, proto)
        yield proto.ready
        yield proto.ask(req("GET", "/small.bin"))
        lost = defer.Deferred()
        proto.connectionLost = lambda reason: lost.callback(None)
        started = reactor.seconds()
        yield daemon.stopService()
        yield lost
        self.assertLess(reactor.seconds() - started, 2.0)  # not the 5 s drain timeout
