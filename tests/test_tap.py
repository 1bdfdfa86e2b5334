"""twistd netsvc: options -> settings, one-line errors, and the plugin being found."""

import io
import os
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from netsvc import tap
from netsvc.config import ConfigError


def options(*argv):
    o = tap.Options()
    o.parseOptions(list(argv))
    return o


class OptionsTests(unittest.TestCase):
    def test_needsConfigOrService(self):
        self.assertRaises(usage.UsageError, options)

    def test_oneServiceNoFile(self):
        settings = tap.settingsFromOptions(options("echo", "--listen", "tcp:7007", "--listen", "udp:7007"))
        self.assertEqual([l.endpoint for l in settings.services["echo"].listen],
                         ["tcp:7007:interface=127.0.0.1", "udp:7007:interface=127.0.0.1"])  # loopback by default
        self.assertEqual(settings.base_dir, os.getcwd())

    def test_oneServiceDefaults(self):
        settings = tap.settingsFromOptions(options("echo"))
        self.assertEqual(settings.services["echo"].listen[0].endpoint, "tcp:7007:interface=127.0.0.1")

    def test_badListenOnCommandLine(self):
        e = self.assertRaises(ConfigError, tap.settingsFromOptions, options("echo", "--listen", "tcp:nope"))
        self.assertIn("command line: services.echo.listen[0]: malformed endpoint 'tcp:nope'", str(e))

    def test_configFileWithOverrides(self):
        name = self.mktemp()
        with open(name, "w") as f:
            f.write("log: {format: text}\nservices:\n  echo: {}\n")
        settings = tap.settingsFromOptions(
            options("--config", name, "--state-dir", "/tmp/st", "--log-format", "json", "--log-level", "debug"))
        self.assertEqual(str(settings.stateDir), "/tmp/st")
        self.assertEqual((settings.log.format, settings.log.level), ("json", "debug"))

    def test_badOverride(self):
        e = self.assertRaises(ConfigError, tap.settingsFromOptions, options("--log-format", "xml", "echo"))
        self.assertIn("log.format", str(e))


class ErrorOutputTests(unittest.TestCase):
    def test_configErrorsAreOneLineEach(self):
        seen = []
        hook = tap._oneLineErrors(lambda *a: seen.append(a))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        from netsvc.config import Problem

        hook(ConfigError, ConfigError([Problem("f.yaml", "a.b", "bad"), Problem("f.yaml", "c", "worse")]), None)
        self.assertEqual(err.getvalue(), "netsvc: f.yaml: a.b: bad\nnetsvc: f.yaml: c: worse\n")
        self.assertEqual(seen, [])
        hook(ValueError, ValueError("other"), None)
        self.assertEqual(len(seen), 1)  # anything else goes to the usual hook


class PluginTests(unittest.TestCase):
    def test_pluginFound(self):
        import twisted.plugins

        names = [p.tapname for p in getPlugins(IServiceMaker, twisted.plugins)]
        self.assertIn("netsvc", names)

    def test_makeServiceBuildsDaemon(self):
        daemon = tap.makeService(options("echo", "--listen", "tcp:0:interface=127.0.0.1"))
        self.assertEqual([s.name for s in daemon], ["echo"])
        self.assertIsNotNone(daemon.logObserver)
