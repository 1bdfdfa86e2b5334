"""
Configuration: YAML -> settings, and every problem reported as one line naming
the file, the key path and the reason.
"""

from twisted.trial import unittest

from netsvc import config
from netsvc.config import ConfigError, Duration, Size


def problems(text: str) -> list[str]:
    try:
        config.parse(text, "f.yaml")
    except ConfigError as e:
        return str(e).splitlines()
    raise AssertionError("expected a ConfigError")


class ParseTests(unittest.TestCase):
    def test_emptyFileIsValid(self):
        settings = config.parse("", "f.yaml")
        self.assertEqual(dict(settings.services), {})
        self.assertEqual(settings.log.format, "text")
        self.assertEqual(settings.tls.cert, "auto")

    def test_echoListeners(self):
        settings = config.parse(
            'services:\n  echo:\n    listen: ["tcp:7007:interface=127.0.0.1", "udp:7007"]\n', "f.yaml")
        echo = settings.services["echo"]
        self.assertEqual([l.endpoint for l in echo.listen], ["tcp:7007:interface=127.0.0.1", "udp:7007"])
        self.assertTrue(echo.enabled)

    def test_listenerAsMapping(self):
        settings = config.parse(
            'services:\n  echo:\n    listen: [{endpoint: "tcp:7007"}]\n', "f.yaml")
        self.assertEqual(settings.services["echo"].listen[0].endpoint, "tcp:7007")

    def test_stateDirRelativeToFile(self):
        settings = config.parse("state_dir: var\n", "f.yaml", base_dir="/srv/netsvc/etc")
        self.assertEqual(str(settings.stateDir), "/srv/netsvc/etc/var")
        absolute = config.parse("state_dir: /var/lib/netsvc\n", "f.yaml", base_dir="/srv")
        self.assertEqual(str(absolute.stateDir), "/var/lib/netsvc")

    def test_durationsAndSizes(self):
        settings = config.parse(
            "drain_timeout: 250ms\nservices:\n  echo:\n    limits: {idle_timeout: 5m, max_message: 64KiB}\n",
            "f.yaml")
        self.assertEqual(settings.drain_timeout, 0.25)
        limits = settings.services["echo"].limits
        self.assertEqual(limits.idle_timeout, 300)
        self.assertEqual(limits.max_message, 65536)

    def test_durationSyntax(self):
        self.assertEqual(Duration.fromConfig("2h", ""), 7200)
        self.assertEqual(Duration.fromConfig(1.5, ""), 1.5)
        self.assertRaises(config.Invalid, Duration.fromConfig, "soon", "")
        self.assertRaises(config.Invalid, Duration.fromConfig, True, "")

    def test_sizeSyntax(self):
        self.assertEqual(Size.fromConfig("1MB", ""), 10**6)
        self.assertEqual(Size.fromConfig("1M", ""), 1 << 20)
        self.assertEqual(Size.fromConfig("4096", ""), 4096)
        self.assertRaises(config.Invalid, Size.fromConfig, "lots", "")

    def test_loadReadsFileAndResolvesAgainstItsFolder(self):
        path = self.mktemp()
        import os

        os.makedirs(path)
        name = os.path.join(path, "n.yaml")
        with open(name, "w") as f:
            f.write("state_dir: st\n")
        self.assertEqual(str(config.load(name).stateDir), os.path.join(os.path.abspath(path), "st"))


class ProblemTests(unittest.TestCase):
    def test_unknownKeySuggests(self):
        self.assertEqual(problems("servces: {}\n"), ["f.yaml: servces: unknown key (did you mean 'services'?)"])

    def test_unknownNestedKey(self):
        self.assertEqual(problems("log: {levle: info}\n"),
                         ["f.yaml: log.levle: unknown key (did you mean 'level'?)"])

    def test_unknownService(self):
        (line,) = problems("services:\n  ecoh: {}\n")
        self.assertIn("f.yaml: services.ecoh: unknown service (did you mean 'echo'?)", line)

    def test_wrongTypes(self):
        self.assertEqual(problems("services:\n  echo:\n    listen: 'tcp:7007'\n"),
                         ["f.yaml: services.echo.listen: expected a list, got the string 'tcp:7007'"])
        self.assertEqual(problems("services:\n  echo:\n    enabled: maybe\n"),
                         ["f.yaml: services.echo.enabled: expected true or false, got 'maybe'"])
        self.assertEqual(problems("services:\n  echo:\n    limits: {max_connections: lots}\n"),
                         ["f.yaml: services.echo.limits.max_connections: expected a whole number, got 'lots'"])

    def test_choices(self):
        self.assertEqual(problems("log: {format: jsn}\n"),
                         ["f.yaml: log.format: expected one of 'text', 'json', got 'jsn' (did you mean 'json'?)"])

    def test_bounds(self):
        self.assertEqual(problems("services:\n  echo:\n    limits: {max_connections: 0}\n"),
                         ["f.yaml: services.echo.limits.max_connections: must be at least 1, got 0"])

    def test_malformedEndpoints(self):
        lines = problems(
            'services:\n  echo:\n    listen: ["tcpp:7007", "tcp:99999", "tcp:7007:foo=1", "nocolon", 42]\n')
        self.assertEqual(len(lines), 5)
        self.assertIn("services.echo.listen[0]: malformed endpoint 'tcpp:7007': unknown endpoint type "
                      "'tcpp' (did you mean 'tcp'?)", lines[0])
        self.assertIn("listen[1]: malformed endpoint 'tcp:99999': port must be a number from 0 to 65535", lines[1])
        self.assertIn("listen[2]: malformed endpoint 'tcp:7007:foo=1': unknown option 'foo'", lines[2])
        self.assertIn("listen[3]: malformed endpoint 'nocolon'", lines[3])
        self.assertIn("listen[4]: expected an endpoint string", lines[4])

    def test_allProblemsReported(self):
        lines = problems("log: {format: xml}\ndrain_timeout: 5x\nfoo: 1\n")
        self.assertEqual(len(lines), 3)
        self.assertTrue(all(l.startswith("f.yaml: ") for l in lines))

    def test_yamlSyntaxError(self):
        (line,) = problems("services: [\n")
        self.assertRegex(line, r"^f\.yaml: line \d+, column \d+: YAML syntax error")

    def test_topLevelNotAMapping(self):
        self.assertEqual(problems("- a\n"), ["f.yaml: expected a mapping at the top level, got a list"])

    def test_badNetworks(self):
        self.assertEqual(problems("services:\n  echo:\n    allow: ['10.0.0.0/33']\n"),
                         ["f.yaml: services.echo.allow: not an address or CIDR network: '10.0.0.0/33'"])

    def test_unreadableFile(self):
        e = self.assertRaises(ConfigError, config.load, "/nonexistent/netsvc.yaml")
        self.assertEqual(str(e), "/nonexistent/netsvc.yaml: cannot read: No such file or directory")

    def test_keyWithAutoCert(self):
        self.assertEqual(problems("tls: {key: k.pem}\n"),
                         ["f.yaml: tls.key: only used with a certificate file (cert is auto)"])

    def test_udpRefusedWhereUnsupported(self):
        lines = problems('metrics:\n  listen: ["udp:9100"]\n')
        self.assertEqual(lines, ["f.yaml: metrics.listen[0]: this service does not listen on UDP: 'udp:9100'"])
