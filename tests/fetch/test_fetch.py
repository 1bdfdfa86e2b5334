"""C{netsvc fetch} against a twisted.web server on 127.0.0.1 (HTTP and HTTPS) started by each test."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import zlib
from pathlib import Path

from twisted.internet import defer, reactor, utils
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server, static
from twisted.web.client import HTTPConnectionPool

from netsvc.cli import parser
from netsvc.fetch.body import DecodeError, Decoder, StreamSink
from netsvc.fetch.cli import fetch
from netsvc.fetch.errors import Failed, Usage
from netsvc.fetch.fetcher import USER_AGENT
from netsvc.fetch.progress import Progress, humanSize
from netsvc.fetch.request import normalizeURL, parseHeader, remoteName
from netsvc.tls import ServerCertificate, generateSelfSigned

DATA = os.urandom(300_000)
TEXT = b"compress me please " * 2000


class App(resource.Resource):
    """One leaf resource; the path says what to do.  C{seen}: (method, path, headers, body) of requests."""

    isLeaf = True

    def __init__(self, dataFile: str) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict, bytes]] = []
        self.file = static.File(dataFile, defaultType="application/octet-stream")
        self.hanging: list = []
        self.flaky = 0

    def render(self, request):
        path = request.path.decode()
        body = request.content.read()
        headers = {k.decode().lower(): b", ".join(v).decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.method.decode(), path, headers, body))
        parts = path.strip("/").split("/")
        if path == "/hello":
            request.setHeader(b"content-type", b"text/plain")
            return b"hello world\n"
        if path == "/echo":
            request.setHeader(b"content-type", b"application/json")
            args = {k.decode(): [x.decode() for x in v] for k, v in request.args.items()}
            return json.dumps({"method": request.method.decode(), "headers": headers,
                               "body": body.decode("latin-1"), "args": args}).encode()
        if parts[0] == "status":
            request.setResponseCode(int(parts[1]))
            return f"status {parts[1]}\n".encode()
        if parts[0] == "redirect":
            n = int(parts[1])
            if n == 0:
                return b"arrived\n"
            request.redirect(f"/redirect/{n - 1}".encode())
            return b""
        if path == "/loop":
            request.redirect(b"/loop")
            return b""
        if path == "/rel/start":
            request.setResponseCode(301)
            request.setHeader(b"location", b"../hello")
            return b"moved\n"
        if path == "/see-other":
            request.setResponseCode(303)
            request.setHeader(b"location", b"/echo")
            return b""
        if path == "/post-302":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/echo")
            return b"found\n"
        if path == "/setcookie":
            request.addCookie(b"flavour", b"oat", path=b"/")
            request.addCookie(b"secret", b"s", path=b"/", httpOnly=True, max_age=b"3600")
            return b"ok\n"
        if path == "/setcookie-redirect":
            request.addCookie(b"session", b"s1", path=b"/")
            request.redirect(b"/echo")
            return b""
        if path in ("/gzip", "/deflate", "/rawdeflate", "/gzip-cut"):
            if path.startswith("/gzip"):
                encoded, name = gzip.compress(TEXT), b"gzip"
            elif path == "/deflate":
                encoded, name = zlib.compress(TEXT), b"deflate"
            else:
                c = zlib.compressobj(wbits=-15)
                encoded, name = c.compress(TEXT) + c.flush(), b"deflate"
            if path == "/gzip-cut":
                encoded = encoded[:-30]
            request.setHeader(b"content-encoding", name)
            return encoded
        if path == "/data":
            return self.file.render(request)
        if path == "/norange":
            return DATA
        if path == "/flaky":  # 503 twice, then fine
            self.flaky += 1
            if self.flaky <= 2:
                request.setResponseCode(503)
                return b"try later\n"
            return b"third time lucky\n"
        if path == "/to-localhost":
            request.redirect(f"http://localhost:{request.getHost().port}/echo".encode())
            return b""
        if path == "/hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if path == "/stall":
            request.setHeader(b"content-length", str(len(DATA)).encode())
            request.write(DATA[:100_000])
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"no such thing\n"


class TrackingSite(server.Site):
    """A Site whose connections can all be closed, and waited for, at the end of a test."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.open: list = []

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        lost: defer.Deferred = defer.Deferred()
        original = p.connectionLost

        def connectionLost(reason):
            try:
                original(reason)
            finally:
                self.open.remove((p, lost))
                lost.callback(None)

        p.connectionLost = connectionLost
        self.open.append((p, lost))
        return p

    def closeAll(self) -> defer.Deferred:
        waiting = [lost for _, lost in self.open]
        for p, _ in list(self.open):
            p._channel.transport.abortConnection()  # p is twisted.web's protocol-switching wrapper
        return defer.gatherResults(waiting)


class FetchTestCase(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(self.mktemp()).absolute()
        self.tmp.mkdir(parents=True)
        dataFile = self.tmp / "data.bin"
        dataFile.write_bytes(DATA)
        self.app = App(str(dataFile))
        self.site = TrackingSite(self.app)
        self.site.noisy = False
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self._stop, self.port)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def _stop(self, port):
        yield self.site.closeAll()
        yield port.stopListening()

    def fetch(self, *argv, isatty=False, pool="nonpersistent"):
        args = parser().commands["fetch"].parse_intermixed_args(list(argv))
        self.out, self.err = io.BytesIO(), io.StringIO()
        if pool == "nonpersistent":
            pool = HTTPConnectionPool(reactor, persistent=False)
        return fetch(reactor, args, pool=pool, out=self.out, err=self.err, isatty=isatty)

    def echoed(self) -> dict:
        return json.loads(self.out.getvalue())

    def freePort(self) -> int:
        from socket import socket

        s = socket()
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
        s.close()
        return free


class BasicTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_getToStdout(self):
        status = yield self.fetch(f"{self.base}/hello")
        self.assertEqual((status, self.out.getvalue(), self.err.getvalue()), (0, b"hello world\n", ""))

    @defer.inlineCallbacks
    def test_binaryToStdout(self):
        status = yield self.fetch(f"{self.base}/data")
        self.assertEqual(status, 0)
        self.assertEqual(self.out.getvalue(), DATA)

    @defer.inlineCallbacks
    def test_getToFile(self):
        target = self.tmp / "out.bin"
        status = yield self.fetch(f"{self.base}/data", "-o", str(target))
        self.assertEqual(status, 0)
        self.assertEqual(target.read_bytes(), DATA)
        self.assertEqual(self.out.getvalue(), b"")
        self.assertRegex(self.err.getvalue(), r"^out\.bin: saved 293\.0 KiB \(300000 bytes\) in .*/s\n$")

    @defer.inlineCallbacks
    def test_silentFile(self):
        target = self.tmp / "out.bin"
        status = yield self.fetch(f"{self.base}/data", "-s", "-o", str(target))
        self.assertEqual((status, self.err.getvalue()), (0, ""))

    @defer.inlineCallbacks
    def test_progressBarOnTerminal(self):
        target = self.tmp / "out.bin"
        status = yield self.fetch(f"{self.base}/data", "-o", str(target), isatty=True)
        self.assertEqual(status, 0)
        err = self.err.getvalue()
        self.assertIn("\rout.bin [", err)
        self.assertIn("100%", err)
        self.assertTrue(err.endswith("/s\n"))

    @defer.inlineCallbacks
    def test_remoteName(self):
        here = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, here)
        status = yield self.fetch(f"{self.base}/hello", "-O", "-s")
        self.assertEqual(status, 0)
        self.assertEqual((self.tmp / "hello").read_bytes(), b"hello world\n")

    @defer.inlineCallbacks
    def test_head(self):
        status = yield self.fetch("-I", f"{self.base}/hello")
        self.assertEqual(status, 0)
        out = self.out.getvalue()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"\r\nContent-Length: 12\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\n"))
        self.assertNotIn(b"hello world", out)
        self.assertEqual(self.app.seen[-1][0], "HEAD")

    @defer.inlineCallbacks
    def test_include(self):
        status = yield self.fetch("-i", f"{self.base}/hello")
        self.assertEqual(status, 0)
        head, _, body = self.out.getvalue().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: text/plain", head)
        self.assertIn(b"Content-Length: 12", head)
        self.assertEqual(body, b"hello world\n")

    @defer.inlineCallbacks
    def test_includeWithOutputFile(self):
        target = self.tmp / "body.txt"
        status = yield self.fetch("-i", "-s", f"{self.base}/hello", "-o", str(target))
        self.assertEqual(status, 0)
        self.assertTrue(self.out.getvalue().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(self.out.getvalue().endswith(b"\r\n\r\n"))
        self.assertEqual(target.read_bytes(), b"hello world\n")

    @defer.inlineCallbacks
    def test_ipv6Literal(self):
        # hyperlink's to_uri() would IDNA-encode "::1" (hyperlink#68); fetch passes treq a finished URI.
        try:
            port6 = reactor.listenTCP(0, self.site, interface="::1")
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from None
        self.addCleanup(port6.stopListening)
        status = yield self.fetch(f"http://[::1]:{port6.getHost().port}/hello")
        self.assertEqual((status, self.out.getvalue()), (0, b"hello world\n"))

    @defer.inlineCallbacks
    def test_postForm(self):
        status = yield self.fetch(f"{self.base}/echo", "-d", "name=Ann Lee", "-d", "x=1&2")
        self.assertEqual(status, 0)
        got = self.echoed()
        self.assertEqual(got["method"], "POST")
        self.assertEqual(got["headers"]["content-type"], "application/x-www-form-urlencoded")
        self.assertEqual(got["args"], {"name": ["Ann Lee"], "x": ["1&2"]})

    @defer.inlineCallbacks
    def test_postJSON(self):
        status = yield self.fetch(f"{self.base}/echo", "--json", '{"n": [1, 2], "s": "é"}')
        self.assertEqual(status, 0)
        got = self.echoed()
        self.assertEqual(got["method"], "POST")
        self.assertEqual(got["headers"]["content-type"], "application/json")
        self.assertEqual(json.loads(got["body"].encode("latin-1")), {"n": [1, 2], "s": "é"})

    @defer.inlineCallbacks
    def test_postBinaryFile(self):
        source = self.tmp / "up.bin"
        source.write_bytes(b"\x00\xff" * 300_000)  # streamed in pieces
        status = yield self.fetch(f"{self.base}/echo", "--data-binary", f"@{source}", "-X", "PUT")
        self.assertEqual(status, 0)
        got = self.echoed()
        self.assertEqual((got["method"], got["body"].encode("latin-1")), ("PUT", b"\x00\xff" * 300_000))

    @defer.inlineCallbacks
    def test_headersAndUserAgent(self):
        status = yield self.fetch(f"{self.base}/echo", "-H", "X-Trace: abc 123", "-H", "Accept:",
                                  "-A", "tester/2.0")
        self.assertEqual(status, 0)
        headers = self.echoed()["headers"]
        self.assertEqual(headers["x-trace"], "abc 123")
        self.assertEqual(headers["user-agent"], "tester/2.0")
        self.assertNotIn("accept", headers)
        self.assertEqual(headers["accept-encoding"], "gzip, deflate")

    @defer.inlineCallbacks
    def test_defaultUserAgent(self):
        yield self.fetch(f"{self.base}/echo")
        self.assertEqual(self.echoed()["headers"]["user-agent"], USER_AGENT)

    @defer.inlineCallbacks
    def test_httpError(self):
        url = f"{self.base}/status/404"
        status = yield self.fetch(url)
        self.assertEqual(status, 1)
        self.assertEqual(self.err.getvalue(), f"netsvc fetch: {url}: 404 Not Found\n")
        self.assertEqual(self.out.getvalue(), b"")

    @defer.inlineCallbacks
    def test_httpErrorBodyWithInclude(self):
        status = yield self.fetch("-i", f"{self.base}/status/503")
        self.assertEqual(status, 1)
        self.assertTrue(self.out.getvalue().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertTrue(self.out.getvalue().endswith(b"\r\n\r\nstatus 503\n"))

    @defer.inlineCallbacks
    def test_httpErrorLeavesFileAlone(self):
        target = self.tmp / "keep.txt"
        target.write_bytes(b"precious")
        status = yield self.fetch(f"{self.base}/status/500", "-o", str(target))
        self.assertEqual(status, 1)
        self.assertEqual(target.read_bytes(), b"precious")

    @defer.inlineCallbacks
    def test_timeoutWaitingForHeaders(self):
        url = f"{self.base}/hang"
        status = yield self.fetch(url, "--timeout", "0.3")
        self.assertEqual(status, 1)
        self.assertEqual(self.err.getvalue(), f"netsvc fetch: {url}: timed out after 0.3s\n")

    @defer.inlineCallbacks
    def test_timeoutInBodyKeepsPart(self):
        target = self.tmp / "part.bin"
        status = yield self.fetch(f"{self.base}/stall", "--timeout", "0.8", "-o", str(target))
        self.assertEqual(status, 1)
        self.assertIn("timed out after 0.8s", self.err.getvalue())
        self.assertIn("100000 bytes kept in", self.err.getvalue())
        self.assertEqual(target.read_bytes(), DATA[:100_000])

    @defer.inlineCallbacks
    def test_refused(self):
        url = f"http://127.0.0.1:{self.freePort()}/x"
        status = yield self.fetch(url)
        self.assertEqual((status, self.err.getvalue()), (1, f"netsvc fetch: {url}: connection refused\n"))

    @defer.inlineCallbacks
    def test_defaultPersistentPoolIsClosed(self):
        # Without a pool argument, a persistent pool: redirects on one host reuse it; closed at the end.
        status = yield self.fetch(f"{self.base}/redirect/3", pool=None)
        self.assertEqual((status, self.out.getvalue()), (0, b"arrived\n"))

    @defer.inlineCallbacks
    def test_verbose(self):
        status = yield self.fetch("-v", f"{self.base}/hello", "-H", "X-Trace: 1")
        self.assertEqual(status, 0)
        err = self.err.getvalue()
        self.assertIn("> GET /hello HTTP/1.1\n> Host: 127.0.0.1:", err)
        self.assertIn("> X-Trace: 1\n", err)
        self.assertIn("< HTTP/1.1 200 OK\n", err)
        self.assertEqual(self.out.getvalue(), b"hello world\n")

    @defer.inlineCallbacks
    def test_unwritableOutputIsNotAMirrorProblem(self):
        target = self.tmp / "no" / "such" / "dir" / "f"
        status = yield self.fetch(f"{self.base}/hello", f"{self.base}/hello", "-o", str(target))
        self.assertEqual(status, 1)
        self.assertEqual(self.err.getvalue(), f"netsvc fetch: {self.base}/hello: "
                                              f"cannot write {target}: No such file or directory\n")
        self.assertEqual(len(self.app.seen), 1)

    def test_readerGoneIsQuiet(self):
        class Gone(io.BytesIO):
            def write(self, data):
                raise BrokenPipeError(32, "Broken pipe")

        sink = StreamSink(Gone())
        e = self.assertRaises(Failed, sink.write, b"x")
        self.assertTrue(e.quiet and e.final)

    def test_usageErrors(self):
        for argv in (["http://h/", "-H", "no colon"], ["http://h/", "-C"], ["ftp://h/x"],
                     ["http://h/", "--json", "{bad"], ["http://h/", "-d", "a=1", "--json", "{}"],
                     ["http://h/", "-d", "novalue"], ["http://h/", "--cacert", "/nonexistent.pem"],
                     ["http://h/", "-O"]):
            self.assertEqual(self.successResultOf(self.fetch(*argv)), 2, argv)
            self.assertTrue(self.err.getvalue().startswith("netsvc fetch: "), argv)

    def test_listedInCLI(self):
        self.assertIn("fetch", parser().commands)


class RedirectTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_followed(self):
        status = yield self.fetch(f"{self.base}/redirect/3")
        self.assertEqual((status, self.out.getvalue()), (0, b"arrived\n"))
        self.assertEqual([s[1] for s in self.app.seen],
                         ["/redirect/3", "/redirect/2", "/redirect/1", "/redirect/0"])

    @defer.inlineCallbacks
    def test_limitExceeded(self):
        url = f"{self.base}/redirect/3"
        status = yield self.fetch(url, "--max-redirects", "2")
        self.assertEqual(status, 1)
        self.assertEqual(self.err.getvalue(),
                         f"netsvc fetch: {url} (redirected to {self.base}/redirect/1): "
                         "too many redirects (more than 2)\n")

    @defer.inlineCallbacks
    def test_loop(self):
        status = yield self.fetch(f"{self.base}/loop")
        self.assertEqual(status, 1)
        self.assertIn("too many redirects (more than 10)", self.err.getvalue())
        self.assertEqual(len(self.app.seen), 11)

    @defer.inlineCallbacks
    def test_relativeLocation(self):
        status = yield self.fetch(f"{self.base}/rel/start")
        self.assertEqual((status, self.out.getvalue()), (0, b"hello world\n"))

    @defer.inlineCallbacks
    def test_noFollow(self):
        status = yield self.fetch("-i", "--no-follow", f"{self.base}/redirect/1")
        self.assertEqual(status, 0)
        self.assertTrue(self.out.getvalue().startswith(b"HTTP/1.1 302 Found\r\n"))
        self.assertIn(b"Location: /redirect/0", self.out.getvalue())

    @defer.inlineCallbacks
    def test_includeShowsEveryHop(self):
        status = yield self.fetch("-i", f"{self.base}/redirect/1")
        self.assertEqual(status, 0)
        out = self.out.getvalue()
        self.assertTrue(out.startswith(b"HTTP/1.1 302 Found\r\n"))
        self.assertIn(b"\r\n\r\nHTTP/1.1 200 OK\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\narrived\n"))

    @defer.inlineCallbacks
    def test_postSeeOtherBecomesGet(self):
        status = yield self.fetch(f"{self.base}/see-other", "-d", "a=1")
        self.assertEqual(status, 0)
        got = self.echoed()
        self.assertEqual((got["method"], got["body"]), ("GET", ""))
        self.assertNotIn("content-type", got["headers"])

    @defer.inlineCallbacks
    def test_postFoundNotFollowed(self):
        status = yield self.fetch(f"{self.base}/post-302", "-d", "a=1")
        self.assertEqual((status, self.out.getvalue()), (0, b"found\n"))
        self.assertIn("not following the 302 redirect of a POST", self.err.getvalue())
        self.assertEqual([s[1] for s in self.app.seen], ["/post-302"])


class RetryAndAuthTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_retryTransient(self):
        url = f"{self.base}/flaky"
        status = yield self.fetch(url, "--retry", "3", "--retry-delay", "0.05")
        self.assertEqual((status, self.out.getvalue()), (0, b"third time lucky\n"))
        self.assertEqual(self.err.getvalue().splitlines(), [
            f"netsvc fetch: {url}: 503 Service Unavailable; trying again in 0.05s",
            f"netsvc fetch: {url}: 503 Service Unavailable; trying again in 0.1s"])

    @defer.inlineCallbacks
    def test_noRetryByDefault(self):
        status = yield self.fetch(f"{self.base}/flaky")
        self.assertEqual(status, 1)
        self.assertEqual(self.app.flaky, 1)

    @defer.inlineCallbacks
    def test_clientErrorNotRetried(self):
        status = yield self.fetch(f"{self.base}/status/404", "--retry", "3", "--retry-delay", "0.05")
        self.assertEqual(status, 1)
        self.assertEqual(len(self.app.seen), 1)

    @defer.inlineCallbacks
    def test_basicAuth(self):
        status = yield self.fetch(f"{self.base}/echo", "-u", "ann:s3cr:et")
        self.assertEqual(status, 0)
        self.assertEqual(self.echoed()["headers"]["authorization"], "Basic YW5uOnMzY3I6ZXQ=")

    @defer.inlineCallbacks
    def test_credentialsNotSentToAnotherOrigin(self):
        status = yield self.fetch(f"{self.base}/to-localhost", "-u", "ann:pw", "-H", "Cookie: a=b",
                                  "-H", "X-Keep: yes")
        self.assertEqual(status, 0)
        headers = self.echoed()["headers"]
        self.assertNotIn("authorization", headers)
        self.assertNotIn("cookie", headers)
        self.assertEqual(headers["x-keep"], "yes")
        self.assertEqual(self.app.seen[0][2]["authorization"], "Basic YW5uOnB3")


class CookieTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_jarSavedAndSentBack(self):
        jar = self.tmp / "cookies.txt"
        status = yield self.fetch(f"{self.base}/setcookie", "--cookie-jar", str(jar))
        self.assertEqual(status, 0)
        text = jar.read_text()
        self.assertIn("# Netscape HTTP Cookie File", text)
        self.assertIn("\t0\tflavour\toat\n", text)  # a session cookie, written as curl does
        self.assertRegex(text, r"\n#HttpOnly_127\.0\.0\.1\tFALSE\t/\tFALSE\t\d{10}\tsecret\ts\n")
        status = yield self.fetch(f"{self.base}/echo", "--cookie-jar", str(jar))
        self.assertEqual(status, 0)
        self.assertEqual(sorted(self.echoed()["headers"]["cookie"].split("; ")), ["flavour=oat", "secret=s"])

    @defer.inlineCallbacks
    def test_cookieKeptAcrossRedirect(self):
        status = yield self.fetch(f"{self.base}/setcookie-redirect")
        self.assertEqual(status, 0)
        self.assertEqual(self.echoed()["headers"]["cookie"], "session=s1")

    @defer.inlineCallbacks
    def test_badJar(self):
        jar = self.tmp / "cookies.txt"
        jar.write_text("this is not a cookie file\n")
        status = yield self.fetch(f"{self.base}/echo", "--cookie-jar", str(jar))
        self.assertEqual(status, 2)
        self.assertIn("cannot load cookie jar", self.err.getvalue())


class EncodingTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_gzip(self):
        status = yield self.fetch(f"{self.base}/gzip")
        self.assertEqual((status, self.out.getvalue() == TEXT), (0, True))
        self.assertEqual(self.app.seen[-1][2]["accept-encoding"], "gzip, deflate")

    @defer.inlineCallbacks
    def test_gzipHeadersShownAsSent(self):
        status = yield self.fetch("-i", f"{self.base}/gzip")
        self.assertEqual(status, 0)
        head, _, body = self.out.getvalue().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Encoding: gzip", head)
        self.assertEqual(body, TEXT)

    @defer.inlineCallbacks
    def test_rawKeepsEncoding(self):
        status = yield self.fetch("--raw", f"{self.base}/gzip")
        self.assertEqual(status, 0)
        self.assertEqual(gzip.decompress(self.out.getvalue()), TEXT)
        self.assertNotIn("accept-encoding", self.app.seen[-1][2])

    @defer.inlineCallbacks
    def test_deflateZlibAndRaw(self):
        for path in ("/deflate", "/rawdeflate"):
            status = yield self.fetch(f"{self.base}{path}")
            self.assertEqual((path, status, self.out.getvalue() == TEXT), (path, 0, True))

    @defer.inlineCallbacks
    def test_truncatedGzip(self):
        target = self.tmp / "t.txt"
        status = yield self.fetch(f"{self.base}/gzip-cut", "-o", str(target))
        self.assertEqual(status, 1)
        self.assertIn("gzip data cut short", self.err.getvalue())

    def test_decoderUnit(self):
        d = Decoder(["gzip"])
        packed = gzip.compress(b"one") + gzip.compress(b"two")  # two members
        self.assertEqual(b"".join(d.decode(packed[i:i + 3]) for i in range(0, len(packed), 3)) + d.finish(),
                         b"onetwo")
        d = Decoder(["deflate", "gzip"])  # deflate applied first, then gzip
        self.assertEqual(d.decode(gzip.compress(zlib.compress(b"layers"))) + d.finish(), b"layers")
        self.assertRaises(DecodeError, Decoder(["gzip"]).decode, b"not gzip at all")
        self.assertEqual(Decoder(["gzip"]).finish(), b"")  # an empty body, "encoded"
        d = Decoder(["gzip"])
        d.decode(gzip.compress(b"cut")[:-4])
        self.assertRaises(DecodeError, d.finish)
        d = Decoder(["deflate"])  # raw deflate, in pieces
        c = zlib.compressobj(wbits=-15)
        raw = c.compress(TEXT) + c.flush()
        pieces = [d.decode(raw[i:i + 1000]) for i in range(0, len(raw), 1000)]
        self.assertEqual(b"".join(pieces) + d.finish(), TEXT)


class ResumeTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_resumeWithRange(self):
        target = self.tmp / "big.bin"
        target.write_bytes(DATA[:123_456])
        status = yield self.fetch(f"{self.base}/data", "-C", "-o", str(target))
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(target.read_bytes(), DATA)
        headers = self.app.seen[-1][2]
        self.assertEqual(headers["range"], "bytes=123456-")
        self.assertEqual(headers["accept-encoding"], "identity")
        self.assertIn(f"resuming {target} at byte 123456", self.err.getvalue())

    @defer.inlineCallbacks
    def test_serverIgnoresRange(self):
        target = self.tmp / "big.bin"
        target.write_bytes(b"x" * 1000)  # even a wrong prefix is replaced
        status = yield self.fetch(f"{self.base}/norange", "-C", "-o", str(target))
        self.assertEqual(status, 0)
        self.assertEqual(target.read_bytes(), DATA)
        self.assertIn("ignored the range request", self.err.getvalue())

    @defer.inlineCallbacks
    def test_alreadyComplete(self):
        target = self.tmp / "big.bin"
        target.write_bytes(DATA)
        status = yield self.fetch(f"{self.base}/data", "-C", "-o", str(target))
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(target.read_bytes(), DATA)
        self.assertIn("already complete (300000 bytes)", self.err.getvalue())

    @defer.inlineCallbacks
    def test_withoutContinueOverwrites(self):
        target = self.tmp / "big.bin"
        target.write_bytes(b"y" * 500_000)
        status = yield self.fetch(f"{self.base}/data", "-o", str(target))
        self.assertEqual(status, 0)
        self.assertEqual(target.read_bytes(), DATA)
        self.assertNotIn("range", self.app.seen[-1][2])


class MirrorTests(FetchTestCase):
    @defer.inlineCallbacks
    def test_refusedThenNext(self):
        dead = f"http://127.0.0.1:{self.freePort()}/hello"
        status = yield self.fetch(dead, f"{self.base}/hello")
        self.assertEqual((status, self.out.getvalue()), (0, b"hello world\n"))
        self.assertEqual(self.err.getvalue(),
                         f"netsvc fetch: {dead}: connection refused; trying the next mirror\n")

    @defer.inlineCallbacks
    def test_serverErrorThenNext(self):
        status = yield self.fetch(f"{self.base}/status/500", f"{self.base}/hello")
        self.assertEqual((status, self.out.getvalue()), (0, b"hello world\n"))
        self.assertIn("500 Internal Server Error; trying the next mirror", self.err.getvalue())

    @defer.inlineCallbacks
    def test_allFail(self):
        status = yield self.fetch(f"{self.base}/status/500", f"{self.base}/status/502")
        self.assertEqual(status, 1)
        self.assertEqual(self.err.getvalue().splitlines(), [
            f"netsvc fetch: {self.base}/status/500: 500 Internal Server Error; trying the next mirror",
            f"netsvc fetch: {self.base}/status/502: 502 Bad Gateway"])

    @defer.inlineCallbacks
    def test_stalledMirrorResumedFromNext(self):
        target = self.tmp / "big.bin"
        status = yield self.fetch(f"{self.base}/stall", f"{self.base}/data", "--timeout", "0.8",
                                  "-o", str(target))
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(target.read_bytes(), DATA)
        self.assertEqual(self.app.seen[-1][2]["range"], "bytes=100000-")
        self.assertIn("timed out after 0.8s; trying the next mirror", self.err.getvalue())

    @defer.inlineCallbacks
    def test_stalledMirrorToStdoutSkipsWhatWasWritten(self):
        # The second mirror ignores Range: what stdout already has is skipped, not written twice.
        status = yield self.fetch(f"{self.base}/stall", f"{self.base}/norange", "--timeout", "0.8")
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(self.out.getvalue(), DATA)


class HTTPSTests(FetchTestCase):
    def setUp(self):
        super().setUp()
        self.cert, key = self.tmp / "cert.pem", self.tmp / "key.pem"
        generateSelfSigned(self.cert, key, ["localhost", "127.0.0.1"])
        options = ServerCertificate(self.cert, key).options()
        tlsPort = reactor.listenSSL(0, self.site, options, interface="127.0.0.1")
        self.addCleanup(self._stop, tlsPort)
        self.https = f"https://127.0.0.1:{tlsPort.getHost().port}"

    @defer.inlineCallbacks
    def test_verifiedWithCacert(self):
        status = yield self.fetch(f"{self.https}/hello", "--cacert", str(self.cert))
        self.assertEqual((status, self.out.getvalue(), self.err.getvalue()), (0, b"hello world\n", ""))

    @defer.inlineCallbacks
    def test_unverifiedFails(self):
        status = yield self.fetch(f"{self.https}/hello")
        self.assertEqual(status, 1)
        self.assertIn("certificate verify failed", self.err.getvalue())
        self.assertEqual(self.out.getvalue(), b"")

    @defer.inlineCallbacks
    def test_insecure(self):
        status = yield self.fetch(f"{self.https}/hello", "--insecure")
        self.assertEqual((status, self.out.getvalue()), (0, b"hello world\n"))

    @defer.inlineCallbacks
    def test_resumeOverHTTPS(self):
        target = self.tmp / "big.bin"
        target.write_bytes(DATA[:1000])
        status = yield self.fetch(f"{self.https}/data", "--cacert", str(self.cert), "-C", "-o", str(target))
        self.assertEqual(status, 0, self.err.getvalue())
        self.assertEqual(target.read_bytes(), DATA)


class CurlComparisonTests(FetchTestCase):
    """The same answers as curl, and cookie jars that each can read."""

    def setUp(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed: apt-get install curl")
        super().setUp()

    def curl(self, *argv) -> defer.Deferred:
        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            return out

        return utils.getProcessOutputAndValue("curl", ["-sS", *argv], env=os.environ).addCallback(check)

    @defer.inlineCallbacks
    def test_sameBodies(self):
        for path in ("/data", "/gzip", "/deflate", "/redirect/2", "/rel/start"):
            expected = yield self.curl("-L", "--compressed", f"{self.base}{path}")
            status = yield self.fetch(f"{self.base}{path}")
            self.assertEqual((path, status, self.out.getvalue() == expected), (path, 0, True))

    @defer.inlineCallbacks
    def test_cookieJarsInteroperate(self):
        ours, theirs = self.tmp / "ours.txt", self.tmp / "theirs.txt"
        yield self.fetch(f"{self.base}/setcookie", "--cookie-jar", str(ours))
        echoed = yield self.curl("-b", str(ours), f"{self.base}/echo")
        self.assertEqual(sorted(json.loads(echoed)["headers"]["cookie"].split("; ")),
                         ["flavour=oat", "secret=s"])
        yield self.curl("-L", "-c", str(theirs), f"{self.base}/setcookie-redirect")
        status = yield self.fetch(f"{self.base}/echo", "--cookie-jar", str(theirs))
        self.assertEqual(status, 0)
        self.assertEqual(self.echoed()["headers"]["cookie"], "session=s1")


class UnitTests(unittest.TestCase):
    def test_parseHeader(self):
        self.assertEqual(parseHeader("X-A: b c "), ("X-A", "b c"))
        self.assertEqual(parseHeader("Accept:"), ("Accept", None))
        self.assertEqual(parseHeader("X-Empty;"), ("X-Empty", ""))
        for bad in ("nocolon", ": v", "Bad Name: v", "Ünï: v", "X: a\r\nY: b"):
            self.assertRaises(Usage, parseHeader, bad)

    def test_normalizeURL(self):
        self.assertEqual(normalizeURL("localhost:8080/a b"), "http://localhost:8080/a%20b")
        self.assertEqual(normalizeURL("https://[::1]:8443/x?q=%41"), "https://[::1]:8443/x?q=%41")
        self.assertEqual(normalizeURL("HTTP://Bücher.example/ä"), "http://xn--bcher-kva.example/%C3%A4")
        for bad in ("ftp://h/", "http://", "http://h:99999/"):
            self.assertRaises(Usage, normalizeURL, bad)

    def test_remoteName(self):
        self.assertEqual(remoteName("http://h/a/file%20name.iso?x=1"), "file name.iso")
        self.assertRaises(Usage, remoteName, "http://h/dir/")

    def test_humanSize(self):
        self.assertEqual([humanSize(n) for n in (0, 1023, 1536, 5 * 2**30)],
                         ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"])

    def test_progressLine(self):
        clock = Clock()
        err = io.StringIO()
        p = Progress(clock, err, "file.iso", bar=True, width=70)
        p.start(0, 1000)
        clock.advance(1)
        p.update(500)
        line = p.line(clock.seconds())
        self.assertTrue(line.startswith("file.iso ["), line)
        self.assertIn(" 50% ", line)
        self.assertIn("500 B/s", line)
        self.assertLessEqual(len(line), 70)
        p.finish(1000, complete=True)
        self.assertTrue(err.getvalue().endswith("file.iso: saved 1000 B (1000 bytes) in 1.0s, 500 B/s\n"))
