"""/metrics and /status: content, and who may read them."""

import base64
import json

from twisted.internet import defer
from twisted.trial import unittest

from netsvc.chat.auth import hashPassword
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
