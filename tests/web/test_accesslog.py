"""Access log lines: combined format and JSON lines, from a running service."""

import json
import os
import re

from twisted.internet import defer
from twisted.trial import unittest

from netsvc.web import accesslog
from tests.web._support import TLS, get, startWeb, webPort

COMBINED = re.compile(
    r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "(?P<line>[^"]*)" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>(?:[^"\\]|\\.)*)"$'
)


class AccessLogTests(unittest.TestCase):
    @defer.inlineCallbacks
    def run_(self, fmt):
        log = self.mktemp() + ".log"
        daemon = startWeb(self, f"    access_log: {{file: {log}, format: {fmt}}}\n")
        port = webPort(daemon, TLS)
        yield get(
            port,
            "/small.bin",
            {"User-Agent": 'tester "quoted"', "Referer": "https://r.test/"},
            cafile=self.cafile,
        )
        yield get(port, "/missing", cafile=self.cafile, slow=True)
        yield daemon.getServiceNamed("web").stopService()  # flushes and closes the log
        return open(log).read().splitlines()

    @defer.inlineCallbacks
    def test_combined(self):
        lines = yield self.run_("combined")
        m = COMBINED.match(lines[0])
        self.assertIsNotNone(m, lines[0])
        self.assertEqual(m.group("line"), "GET /small.bin HTTP/1.1")
        self.assertEqual((m.group("status"), m.group("bytes")), ("200", "1024"))
        self.assertEqual(m.group("referer"), "https://r.test/")
        self.assertEqual(m.group("agent"), 'tester \\"quoted\\"')
        statuses = [COMBINED.match(l).group("status") for l in lines]
        self.assertEqual(statuses, ["200", "405", "404"])  # the slow path's OPTIONS, then the 404

    @defer.inlineCallbacks
    def test_json(self):
        lines = yield self.run_("json")
        first = json.loads(lines[0])
        self.assertEqual(first["method"], "GET")
        self.assertEqual(first["uri"], "/small.bin")
        self.assertEqual(first["status"], 200)
        self.assertEqual(first["bytes"], 1024)
        self.assertEqual(first["remote"], "127.0.0.1")
        self.assertEqual(first["agent"], 'tester "quoted"')
        self.assertIsInstance(first["duration"], float)
        self.assertEqual(json.loads(lines[-1])["status"], 404)

    def test_controlCharactersEscaped(self):
        self.assertEqual(accesslog._quoted(b'a"b\\c\n\x1b'), '"a\\"b\\\\c\\x0a\\x1b"')

    def test_missingFolderIsMade(self):
        # A fresh checkout has no var/ yet: the shipped configuration logs there.
        path = os.path.join(self.mktemp(), "var", "web-access.log")
        out = accesslog.AccessLog.open(path)
        self.addCleanup(out.out.close)
        self.assertTrue(os.path.isfile(path))
