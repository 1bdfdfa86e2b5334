"""/metrics and /status: content, and who may read them."""

import base64
import json
import threading

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from netsvc import auth
from netsvc.auth import Refused
from netsvc.chat.auth import hashPassword
from netsvc.policies import AccessList
from netsvc.web.admin import AdminGate
from tests.web._support import TLS, get, startWeb, webPort


class LoopbackTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startWeb(self)
        self.port = webPort(self.daemon, TLS)

    @defer.inlineCallbacks
    def test_metrics(self):
        yield get(self.port, "/small.bin", cafile=self.cafile)
        r = yield get(self.port, "/metrics", cafile=self.cafile)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        self.assertIn(b'netsvc_http_requests_total{service="web",code="200"}', r.body)
        self.assertIn(b'netsvc_connections_accepted_total{service="web"}', r.body)
        self.assertIn(b"netsvc_http_request_duration_seconds_bucket", r.body)

    @defer.inlineCallbacks
    def test_statusJSON(self):
        for path, headers in [
            ("/status.json", {}),
            ("/status?format=json", {}),
            ("/status", {"Accept": "application/json"}),
        ]:
            r = yield get(self.port, path, headers, cafile=self.cafile)
            self.assertEqual(r.headers["content-type"], "application/json", path)
            state = json.loads(r.body)
            self.assertEqual(state["services"], ["web"])
            self.assertEqual(
                {l["key"] for l in state["listeners"]}, {"services.web.listen[0]", "services.web.listen[1]"}
            )
            self.assertGreaterEqual(state["uptime"], 0)
            self.assertIn("netsvc_connections_accepted_total", state["metrics"])

    @defer.inlineCallbacks
    def test_statusHTML(self):
        r = yield get(self.port, "/status", {"Accept": "text/html"}, cafile=self.cafile)
        self.assertEqual(r.headers["content-type"], "text/html; charset=utf-8")
        self.assertIn(b"<h1>netsvc status</h1>", r.body)
        self.assertIn(b"services.web.listen[0]", r.body)

    @defer.inlineCallbacks
    def test_postRefused(self):
        r = yield get(self.port, "/metrics", method="POST", body=b"x", cafile=self.cafile)
        self.assertEqual(r.status, 405)


class RestrictedTests(unittest.TestCase):
    """A client outside the allow list: 403, or basic auth when users are configured."""

    @defer.inlineCallbacks
    def test_forbiddenWithoutUsers(self):
        daemon = startWeb(self, "    admin: {allow: [10.0.0.0/8]}\n")
        for path in ["/metrics", "/status", "/status.json"]:
            r = yield get(webPort(daemon, TLS), path, cafile=self.cafile)
            self.assertEqual(r.status, 403, path)
            self.assertNotIn(b"netsvc_", r.body)

    @defer.inlineCallbacks
    def test_basicAuth(self):
        stored = hashPassword("s3cret")
        daemon = startWeb(self, f"    admin: {{allow: [], users: {{ops: '{stored}'}}}}\n")
        port = webPort(daemon, TLS)
        r = yield get(port, "/metrics", cafile=self.cafile)
        self.assertEqual(r.status, 401)
        self.assertIn("Basic", r.headers["www-authenticate"])
        bad = base64.b64encode(b"ops:wrong").decode()
        r = yield get(port, "/metrics", {"Authorization": f"Basic {bad}"}, cafile=self.cafile)
        self.assertEqual(r.status, 401)
        good = base64.b64encode(b"ops:s3cret").decode()
        for _ in range(2):  # the second from the remembered check
            r = yield get(port, "/metrics", {"Authorization": f"Basic {good}"}, cafile=self.cafile)
            self.assertEqual(r.status, 200)
            self.assertIn(b"netsvc_", r.body)
        r = yield get(port, "/status.json", {"Authorization": f"Basic {good}"}, cafile=self.cafile)
        self.assertEqual(r.status, 200)


    @defer.inlineCallbacks
    def test_oneAllowanceForEveryGate(self):
        """
        The gates of the site share one wrong-password allowance: guesses spread over /metrics and
        /status do not get more tries (10, then 429), and the refusals are counted in /metrics.
        """
        stored = hashPassword("s3cret")
        daemon = startWeb(self, f"    admin: {{allow: [], users: {{ops: '{stored}'}}}}\n")
        port = webPort(daemon, TLS)
        bad = {"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}
        codes = []
        for i in range(14):
            r = yield get(port, "/metrics" if i % 2 else "/status.json", bad, cafile=self.cafile)
            codes.append(r.status)
        self.assertEqual(codes, [401] * 10 + [429] * 4)
        text = daemon.context.metrics.render()
        self.assertIn('netsvc_password_checks_refused_total{service="web",reason="rate"} 4', text)


class _Request(DummyRequest):
    """A DummyRequest with what AdminGate reads: the client, basic auth credentials, _disconnected."""

    def __init__(self, host, user=b"", password=b""):
        super().__init__([b"metrics"])
        self.client = IPv4Address("TCP", host, 40000)
        self.user, self.password = user, password
        self._disconnected = False

    def getUser(self):
        return self.user

    def getPassword(self):
        return self.password


class _Target(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b"secret metrics"


class GateLimitTests(unittest.TestCase):
    """AdminGate in memory: wrong passwords limited per client, reserve-first; hashing in the hashing pool."""

    def setUp(self):
        self.now = 1000.0
        self.calls = []
        self.pending = []

    def gate(self, check=None, **kw):
        return AdminGate(_Target(), AccessList(["10.0.0.0/8"]), {"ops": "scrypt:00:00"}, clock=lambda: self.now,
                         check=check or self.slowCheck, **kw)

    def slowCheck(self, password, stored):
        self.calls.append(password)
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def render(self, gate, host="192.0.2.1", password=b"wrong"):
        request = _Request(host, b"ops", password)
        body = gate.render(request)
        if body is not server.NOT_DONE_YET:
            request.write(body)
            request.finish()
        return request

    def test_parallelWrongPasswordsLimited(self):
        """
        20 requests at once from one address with wrong passwords: only the
        burst (10) is hashed; the rest get 429 with Retry-After at once.
        """
        gate = self.gate()
        requests = [self.render(gate) for _ in range(20)]
        self.assertEqual(len(self.calls), 10)
        for r in requests[10:]:
            self.assertEqual(r.responseCode, 429)
            self.assertTrue(r.finished)
            self.assertGreaterEqual(int(r.responseHeaders.getRawHeaders(b"retry-after")[0]), 1)
        for d in self.pending:
            d.callback(False)
        self.assertEqual({r.responseCode for r in requests[:10]}, {401})
        # another address still gets its check
        self.render(gate, host="192.0.2.2")
        self.assertEqual(len(self.calls), 11)

    def test_successRefunds(self):
        gate = self.gate()
        for i in range(15):  # right passwords (each different, so none is remembered) never use up the allowance
            r = self.render(gate, password=b"right%d" % i)
            self.pending[-1].callback(True)
            self.assertEqual(r.responseCode, None)
            self.assertEqual(b"".join(r.written), b"secret metrics")
        self.assertEqual(len(self.calls), 15)

    def test_busy(self):
        gate = self.gate(check=lambda password, stored: defer.succeed(Refused("busy")))
        r = self.render(gate)
        self.assertEqual(r.responseCode, 503)
        self.assertEqual(r.responseHeaders.getRawHeaders(b"retry-after"), [b"1"])

    def test_defaultCheckInHashPool(self):
        """Without a check given, the password is hashed in the hashing pool, not the reactor's default pool."""
        threads = []

        def verify(password, stored, plain=False):
            threads.append(threading.current_thread().name)
            return False

        self.patch(auth, "verifyPassword", verify)
        self.addCleanup(auth.hashPool().stop)
        gate = AdminGate(_Target(), AccessList(["10.0.0.0/8"]), {"ops": "scrypt:00:00"})
        request = _Request("192.0.2.1", b"ops", b"wrong")
        self.assertIs(gate.render(request), server.NOT_DONE_YET)
        d = defer.Deferred()
        request.notifyFinish().addCallback(d.callback)
        d.addCallback(lambda _: self.assertEqual(request.responseCode, 401))
        d.addCallback(lambda _: self.assertEqual(len(threads), 1))
        d.addCallback(lambda _: self.assertIn("netsvc-hash", threads[0]))
        return d
