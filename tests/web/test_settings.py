"""services.web configuration: the issue's shape, and clear errors."""

from twisted.trial import unittest

from netsvc import config


def parse(text):
    return config.parse(text, "t.yaml")


class SettingsTests(unittest.TestCase):
    def test_issueShape(self):
        s = parse("""
services:
  web:
    listen:
      - "tls:8443:interface=127.0.0.1"
      - {endpoint: "tcp:8080:interface=127.0.0.1", redirect_to_https: true}
    root: www
""").services["web"]
        self.assertEqual([l.redirect_to_https for l in s.listen], [False, True])
        self.assertEqual(s.root, "www")

    def test_everything(self):
        s = parse("""
services:
  web:
    root: www
    access_log: {file: a.log, format: json}
    proxy: [{prefix: /api/, upstream: "https://10.0.0.5:8443", cafile: ca.pem, timeout: 5s}]
    vhosts: {docs.test: {root: docs}, app.test: {proxy: [{upstream: "http://127.0.0.1:9000"}]}}
    admin: {allow: [127.0.0.1], users: {ops: "scrypt:00:11"}}
    certificates: [{cert: a.pem}]
    headers: {X-Frame-Options: DENY}
""").services["web"]
        self.assertEqual(s.proxy[0].timeout, 5)
        self.assertEqual(s.vhosts["app.test"].proxy[0].prefix, "/")

    def test_errors(self):
        with self.assertRaises(config.ConfigError) as e:
            parse("""
services:
  web:
    listen: [{endpoint: "tcp:8080", redirect_to_http: true}]
    proxy: [{prefix: api, upstream: "ftp://x"}]
    vhosts: {a.test: {}}
    admin: {users: {ops: plain}, metrics_path: metrics}
    access_log: {file: x, format: apache}
""")
        text = str(e.exception)
        for expected in [
            "services.web.listen[0].redirect_to_http: unknown key (did you mean 'redirect_to_https'?)",
            "services.web.proxy[0].prefix: must start with /",
            "services.web.proxy[0].upstream: expected http://HOST[:PORT]",
            "services.web.vhosts.a.test.root: a virtual host needs a root or proxy routes",
            "services.web.admin.users.ops: expected scrypt:<salt>:<key>",
            "services.web.admin.metrics_path: must be a path like /metrics",
            "services.web.access_log.format: expected one of 'combined', 'json'",
        ]:
            self.assertIn(expected, text)

    def test_chatOrigins(self):
        s = parse("""
services:
  web:
    chat_origins: ["https://app.example.test", "http://127.0.0.1:8080"]
""").services["web"]
        self.assertEqual(s.chat_origins, ["https://app.example.test", "http://127.0.0.1:8080"])
        with self.assertRaises(config.ConfigError) as e:
            parse("""
services:
  web:
    chat_origins: ["https://app.example.test/chat", "null"]
""")
        self.assertIn("services.web.chat_origins[0]: expected an origin like https://", str(e.exception))
        self.assertIn("services.web.chat_origins[1]: expected an origin like https://", str(e.exception))
