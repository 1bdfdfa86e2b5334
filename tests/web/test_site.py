"""Redirects, virtual hosts, default headers, SNI certificate selection and reload."""

from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from netsvc.tls import clientCreator, generateSelfSigned
from tests.web._support import PLAIN, TLS, get, parseResponses, req, startWeb, webPort


class RedirectTests(unittest.TestCase):
    def setUp(self):
        listen = (
            '      - "tls:0:interface=127.0.0.1"\n'
            '      - {endpoint: "tcp:0:interface=127.0.0.1", redirect_to_https: true}\n'
        )
        self.daemon = startWeb(self, listen=listen)

    @defer.inlineCallbacks
    def test_redirectToTLSListener(self):
        tlsPort = webPort(self.daemon, TLS)
        r = yield get(webPort(self.daemon, PLAIN), "/a/b?c=d", tls=False, host="example.test:8080")
        self.assertEqual(r.status, 301)
        self.assertEqual(r.headers["location"], f"https://example.test:{tlsPort}/a/b?c=d")
        self.assertNotIn("strict-transport-security", r.headers)

    @defer.inlineCallbacks
    def test_redirectPOSTToo(self):
        r = yield get(webPort(self.daemon, PLAIN), "/form", method="POST", body=b"a=1", tls=False)
        self.assertEqual(r.status, 301)


class ExplicitPortRedirectTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_port443Omitted(self):
        listen = '      - {endpoint: "tcp:0:interface=127.0.0.1", redirect_to_https: true}\n'
        daemon = startWeb(self, "    https_port: 443\n", listen=listen)
        r = yield get(webPort(daemon, 0), "/x", tls=False, host="example.test")
        self.assertEqual(r.headers["location"], "https://example.test/x")


class HeaderSettingsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_overrideAndRemove(self):
        extra = (
            "    headers: {X-Frame-Options: DENY, referrer-policy: '',"
            " Content-Security-Policy: \"default-src 'self'\"}\n"
            "    hsts_max_age: 1d\n    hsts_include_subdomains: true\n"
        )
        daemon = startWeb(self, extra)
        for slow in (False, True):
            r = yield get(webPort(daemon, TLS), "/small.bin", cafile=self.cafile, slow=slow)
            self.assertEqual(r.headers["x-frame-options"], "DENY")
            self.assertNotIn("referrer-policy", r.headers)
            self.assertEqual(r.headers["content-security-policy"], "default-src 'self'")
            self.assertEqual(r.headers["strict-transport-security"], "max-age=86400; includeSubDomains")

    @defer.inlineCallbacks
    def test_hstsOff(self):
        daemon = startWeb(self, "    hsts_max_age: 0\n")
        r = yield get(webPort(daemon, TLS), "/small.bin", cafile=self.cafile)
        self.assertNotIn("strict-transport-security", r.headers)


class VirtualHostTests(unittest.TestCase):
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        (base / "docs").mkdir(parents=True)
        (base / "docs" / "index.html").write_text("<p>docs site</p>")
        (base / "wild").mkdir()
        (base / "wild" / "index.html").write_text("<p>wildcard site</p>")
        extra = (
            f"    vhosts:\n"
            f"      docs.example.test: {{root: {base / 'docs'}}}\n"
            f"      '*.wild.test': {{root: {base / 'wild'}}}\n"
        )
        self.daemon = startWeb(self, extra)
        self.port = webPort(self.daemon, TLS)

    @defer.inlineCallbacks
    def test_hostsHaveTheirRoot(self):
        for slow in (False, True):
            r = yield get(self.port, "/", cafile=self.cafile, host="docs.example.test", slow=slow)
            self.assertEqual(r.body, b"<p>docs site</p>")
            r = yield get(self.port, "/", cafile=self.cafile, host="DOCS.example.test:443", slow=slow)
            self.assertEqual(r.body, b"<p>docs site</p>")
            r = yield get(self.port, "/", cafile=self.cafile, host="a.wild.test", slow=slow)
            self.assertEqual(r.body, b"<p>wildcard site</p>")
            r = yield get(self.port, "/", cafile=self.cafile, host="other.test", slow=slow)
            self.assertIn(b"home page", r.body)

    @defer.inlineCallbacks
    def test_vhostDoesNotSeeDefaultFiles(self):
        r = yield get(self.port, "/small.bin", cafile=self.cafile, host="docs.example.test")
        self.assertEqual(r.status, 404)

    @defer.inlineCallbacks
    def test_adminOnlyOnDefaultHost(self):
        r = yield get(self.port, "/metrics", cafile=self.cafile, host="docs.example.test")
        self.assertEqual(r.status, 404)
        r = yield get(self.port, "/metrics", cafile=self.cafile)
        self.assertEqual(r.status, 200)


class _KeepAlive(Protocol):
    """Sends requests one at a time on one connection; C{ask()} fires with the raw response."""

    def __init__(self):
        self.buffer = b""
        self.waiting = None
        self.ready = defer.Deferred()

    def connectionMade(self):
        self.ready.callback(self)

    def ask(self, payload):
        self.buffer = b""
        self.waiting = defer.Deferred()
        self.transport.write(payload)
        return self.waiting

    def dataReceived(self, data):
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.waiting is not None:
            head = self.buffer.split(b"\r\n\r\n", 1)[0].lower()
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(self.buffer.split(b"\r\n\r\n", 1)[1]) >= length:
                d, self.waiting = self.waiting, None
                d.callback(self.buffer)

    def connectionLost(self, reason):
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.errback(reason)


class SNITests(unittest.TestCase):
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        self.other = base / "other.pem"
        self.otherKey = base / "other.key"
        generateSelfSigned(self.other, self.otherKey, ["other.test", "*.other.test"])
        extra = f"    certificates:\n      - {{cert: {self.other}, key: {self.otherKey}}}\n"
        self.daemon = startWeb(self, extra)
        self.port = webPort(self.daemon, TLS)

    def connect(self, name, cafile):
        endpoint = endpoints.wrapClientTLS(
            clientCreator(name, cafile=cafile, acceptableProtocols=[b"http/1.1"]),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        proto = _KeepAlive()
        return endpoints.connectProtocol(endpoint, proto).addCallback(lambda _: proto.ready)

    @defer.inlineCallbacks
    def fetch(self, name, cafile):
        proto = yield self.connect(name, cafile)
        try:
            data = yield proto.ask(req("GET", "/small.bin", host=name))
        finally:
            proto.transport.loseConnection()
        return parseResponses(data, ["GET"])[0]

    @defer.inlineCallbacks
    def test_certificateBySNI(self):
        r = yield self.fetch("other.test", str(self.other))
        self.assertEqual(r.status, 200)
        r = yield self.fetch("www.other.test", str(self.other))
        self.assertEqual(r.status, 200)
        r = yield self.fetch("localhost", self.cafile)  # the shared certificate by default
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_wrongCertificateRejected(self):
        # localhost is not in the other certificate: verification against it fails.
        with self.assertRaises(SSL.Error):
            yield self.fetch("localhost", str(self.other))

    @defer.inlineCallbacks
    def test_reloadKeepsOpenConnections(self):
        old = self.other.read_bytes()
        proto = yield self.connect("other.test", str(self.other))
        self.addCleanup(proto.transport.loseConnection)
        first = yield proto.ask(req("GET", "/small.bin", host="other.test"))
        self.assertIn(b" 200 ", first.split(b"\r\n")[0])
        oldCopy = self.other.with_name("old.pem")
        oldCopy.write_bytes(old)
        generateSelfSigned(self.other, self.otherKey, ["other.test"])
        self.daemon.reload()  # what SIGHUP does
        again = yield proto.ask(
            req("GET", "/small.bin", host="other.test")
        )  # same connection, still served
        self.assertIn(b" 200 ", again.split(b"\r\n")[0])
        r = yield self.fetch("other.test", str(self.other))  # new connections get the new certificate
        self.assertEqual(r.status, 200)
        with self.assertRaises(SSL.Error):
            yield self.fetch("other.test", str(oldCopy))


class HeadTimeoutTests(unittest.TestCase):
    """A request head that never completes (slow loris) gets 408 and the connection closes."""

    @defer.inlineCallbacks
    def test_incompleteHeadTimesOut(self):
        from netsvc.web import fast
        from tests.web._support import exchange

        self.patch(fast, "HEAD_TIMEOUT", 0.3)
        daemon = startWeb(self)
        got = yield exchange(webPort(daemon, PLAIN), b"GET /index.html HTTP/1.1\r\nHost: localh",
                             tls=False, timeout=5)
        self.assertEqual(got, fast._REQUEST_TIMEOUT)

    @defer.inlineCallbacks
    def test_idleKeepAliveIsNotAHead(self):
        from netsvc.web import fast
        from tests.helpers import sleep
        from tests.web._support import parseResponses

        self.patch(fast, "HEAD_TIMEOUT", 0.2)
        daemon = startWeb(self)
        import socket

        s = socket.create_connection(("127.0.0.1", webPort(daemon, PLAIN)), timeout=5)
        self.addCleanup(s.close)
        s.setblocking(False)
        s.send(req("GET", "/index.html"))
        yield sleep(0.5)  # longer than HEAD_TIMEOUT, with no request in progress
        s.send(req("GET", "/index.html", close=True))
        data = b""
        for _ in range(200):
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                yield sleep(0.01)
                continue
            if not chunk:
                break
            data += chunk
        codes = [r.status for r in parseResponses(data, ["GET", "GET"])]
        self.assertEqual(codes, [200, 200])


class TurnBudgetTests(unittest.TestCase):
    """
    One read holding many pipelined requests for twisted.web: at most TURN_BUDGET are answered in
    that reactor turn, reading paused; the rest in the next turns, in order, every one of them.
    (Answered in one go, ~2,000 of them kept every other client of every service waiting ~0.3 s.)
    """

    def test_pipelineAnsweredOverSeveralTurns(self):
        from fuzz.targets import PEER, _LenientTransport, _site
        from netsvc.web.site import TURN_BUDGET

        clock, _, site = _site()
        channel = site.buildProtocol(PEER)
        transport = _LenientTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        count = 3 * TURN_BUDGET + 5
        channel.dataReceived(b"GET /a.txt HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-2\r\n\r\n" * count)
        self.assertEqual(transport.value().count(b"HTTP/1.1 206 "), TURN_BUDGET)
        self.assertEqual(transport.producerState, "paused")
        for _ in range(10):
            clock.advance(0)
        self.assertEqual(transport.value().count(b"HTTP/1.1 206 "), count)
        self.assertEqual(transport.producerState, "producing")
        channel.connectionLost(None)
