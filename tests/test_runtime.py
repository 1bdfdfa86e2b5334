"""The daemon: binding, status.json, startup errors, drain on stop, reload, /metrics."""

import io
import json
import socket
from pathlib import Path

import treq
from cryptography import x509
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from netsvc import config, logs, tls
from netsvc.runtime import StartupError, buildDaemon
from netsvc.tls import clientCreator
from tests.helpers import Collector, connectEcho, port, sleep, startDaemon, stateDir


class LifecycleTests(unittest.TestCase):
    def test_statusFileListsBoundPorts(self):
        daemon = startDaemon(self, 'services:\n  echo:\n'
                                   '    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]\n')
        status = json.loads((stateDir(daemon) / "status.json").read_text())
        self.assertEqual(status["services"], ["echo"])
        tcp, udp = status["listeners"]
        self.assertEqual((tcp["key"], tcp["type"], tcp["host"]), ("services.echo.listen[0]", "TCP", "127.0.0.1"))
        self.assertEqual(tcp["port"], port(daemon, 0))
        self.assertEqual(udp["type"], "UDP")

    @defer.inlineCallbacks
    def test_stopRemovesStatusFile(self):
        daemon = startDaemon(self, 'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        yield daemon.stopService()
        self.assertFalse((stateDir(daemon) / "status.json").exists())

    def test_portInUse(self):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        busy = taken.getsockname()[1]
        settings = config.parse(
            f'state_dir: {self.mktemp()}\nservices:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1", '
            f'"tcp:{busy}:interface=127.0.0.1"]\n', "t.yaml")
        daemon = buildDaemon(settings, reactor, configFile="t.yaml")
        e = self.assertRaises(StartupError, daemon.privilegedStartService)
        self.assertEqual(str(e), f"t.yaml: services.echo.listen[1]: cannot listen on "
                                 f"'tcp:{busy}:interface=127.0.0.1': address already in use")
        # the listener that did bind was released
        self.assertIsNone(daemon.listeners[0].port)

    def test_unreadableCertificateFailsAtBuild(self):
        settings = config.parse(
            f'state_dir: {self.mktemp()}\ntls: {{cert: /nonexistent/cert.pem}}\n'
            'services:\n  echo:\n    listen: ["tls:0:interface=127.0.0.1"]\n', "t.yaml")
        e = self.assertRaises(StartupError, buildDaemon, settings, reactor, "t.yaml")
        self.assertEqual(str(e), "t.yaml: tls.cert: cannot read certificate /nonexistent/cert.pem: "
                                 "No such file or directory")

    def test_noCertificateMadeWithoutTLSListeners(self):
        daemon = startDaemon(self, 'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        self.assertFalse((stateDir(daemon) / "tls").exists())

    def test_disabledServiceNotStarted(self):
        daemon = startDaemon(self, 'services:\n  echo:\n    enabled: false\n')
        self.assertEqual(list(daemon), [])


class DrainTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_listenersCloseFirstThenConnectionsAfterDrainTime(self):
        daemon = startDaemon(self, 'drain_timeout: 300ms\n'
                                   'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        portNumber = port(daemon, 0)
        client = yield connectEcho("127.0.0.1", portNumber)
        collector = Collector()
        client.dataReceived = collector.dataReceived
        lost = defer.Deferred()
        client.connectionLost = lambda reason: lost.callback(reactor.seconds())
        began = reactor.seconds()
        stopped = daemon.stopService()
        yield sleep(0.05)  # Twisted closes a listening socket on the next reactor turn
        # no new connections...
        refused = socket.socket()
        self.addCleanup(refused.close)
        self.assertNotEqual(refused.connect_ex(("127.0.0.1", portNumber)), 0)
        # ...while the open one still works during the drain
        client.transport.write(b"during drain")
        closedAt = yield lost
        yield stopped
        self.assertEqual(collector.data, b"during drain")
        self.assertGreaterEqual(closedAt - began, 0.25)


class ReloadTests(unittest.TestCase):
    def tlsEchoWithOwnCertificate(self):
        """A TLS echo daemon whose certificate files (in a folder of its own) the test may replace."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        cert, key = folder / "c.pem", folder / "k.pem"
        tls.generateSelfSigned(cert, key, ["localhost"])
        daemon = startDaemon(self, f'tls: {{cert: {cert}, key: {key}}}\n'
                                   'services:\n  echo:\n    listen: ["tls:0:interface=127.0.0.1"]\n')
        return daemon, folder, cert, key

    @defer.inlineCallbacks
    def test_reloadServesNewCertificateKeepsOpenConnections(self):
        daemon, folder, cert, key = self.tlsEchoWithOwnCertificate()
        old = yield connectEcho("127.0.0.1", port(daemon), clientCreator("localhost", cafile=str(cert)))
        self.assertEqual((yield old.roundTrip(b"a")), b"a")
        oldPEM = cert.read_bytes()
        tls.generateSelfSigned(cert, key, ["localhost"])
        daemon.reload()
        # the open connection goes on
        self.assertEqual((yield old.roundTrip(b"b")), b"b")
        # new connections get the new certificate: the old one no longer verifies it
        oldCA = folder / "old.pem"
        oldCA.write_bytes(oldPEM)
        stale = yield connectEcho("127.0.0.1", port(daemon), clientCreator("localhost", cafile=str(oldCA)))
        yield self.assertFailure(stale.roundTrip(b"c"), Exception)
        new = yield connectEcho("127.0.0.1", port(daemon), clientCreator("localhost", cafile=str(cert)))
        self.assertEqual((yield new.roundTrip(b"d")), b"d")
        served = x509.load_pem_x509_certificate(cert.read_bytes())
        self.assertEqual(daemon.context.certificate.chain[0], served)
        for c in (old, new):
            c.transport.loseConnection()

    def test_badReloadKeepsServing(self):
        daemon, folder, cert, key = self.tlsEchoWithOwnCertificate()
        generation = daemon.context.certificate.generation
        errors = []
        observer = lambda e: errors.append(e) if e.get("log_level") == LogLevel.error else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        key.write_text("not a key")
        daemon.reload()
        self.assertEqual(daemon.context.certificate.generation, generation)
        self.assertEqual(len(errors), 1)
        self.assertIn("no usable PEM private key", errors[0]["error"])


class MetricsEndpointTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_metricsServed(self):
        daemon = startDaemon(self, 'metrics:\n  listen: ["tcp:0:interface=127.0.0.1"]\n'
                                   'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        client = yield connectEcho("127.0.0.1", port(daemon))
        yield client.roundTrip(b"12345")
        client.transport.loseConnection()
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = f"http://127.0.0.1:{port(daemon, service='metrics')}/metrics"
        response = yield treq.get(url, pool=pool)
        self.assertEqual(response.code, 200)
        self.assertIn(b"text/plain; version=0.0.4", response.headers.getRawHeaders(b"content-type")[0])
        text = yield response.text()
        self.assertIn('netsvc_connections_accepted_total{service="echo"} 1\n', text)
        self.assertIn('netsvc_received_bytes_total{service="echo"} 5\n', text)

    @defer.inlineCallbacks
    def test_metricsRestrictedToAllowList(self):
        daemon = startDaemon(self, 'metrics:\n  listen: ["tcp:0:interface=127.0.0.1"]\n  allow: ["10.0.0.0/8"]\n')
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port(daemon, service='metrics')}/metrics", pool=pool)
        self.assertEqual(response.code, 403)
        yield response.content()


class LogTests(unittest.TestCase):
    def test_jsonLines(self):
        out = io.StringIO()
        observer = logs.observerFor(config.LogSettings(format="json", level="info"), out)
        observer({"log_format": "accepted {client}", "client": "127.0.0.1", "log_level": LogLevel.info,
                  "log_namespace": "netsvc.test", "log_time": 0, "count": 3})
        observer({"log_format": "noise", "log_level": LogLevel.debug, "log_namespace": "x", "log_time": 0})
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["message"], "accepted 127.0.0.1")
        self.assertEqual(record["level"], "info")
        self.assertEqual((record["client"], record["count"]), ("127.0.0.1", 3))
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000+00:00")

    def test_textFiltered(self):
        out = io.StringIO()
        observer = logs.observerFor(config.LogSettings(format="text", level="warn"), out)
        observer({"log_format": "quiet", "log_level": LogLevel.info, "log_namespace": "x", "log_time": 0})
        observer({"log_format": "loud", "log_level": LogLevel.error, "log_namespace": "x", "log_time": 0})
        self.assertNotIn("quiet", out.getvalue())
        self.assertIn("loud", out.getvalue())


class ReconfigureTests(unittest.TestCase):
    def test_reloadPassesNewSettingsToServices(self):
        from twisted.application.service import Service

        from netsvc.runtime import Context, Daemon

        seen = []

        class Reconfigurable(Service):
            name = "echo"

            def reconfigure(self, settings):
                seen.append(settings)

        texts = ["services:\n  echo:\n    limits: {idle_timeout: 7s}\n", "services: [broken\n"]
        settings = config.parse("services:\n  echo: {}\n", "t.yaml")
        context = Context(settings, reactor, "t.yaml",
                          reloadSettings=lambda: config.parse(texts.pop(0), "t.yaml"))
        daemon = Daemon(context)
        Reconfigurable().setServiceParent(daemon)
        daemon.reload()
        self.assertEqual([s.limits.idle_timeout for s in seen], [7])
        errors = []
        observer = lambda e: errors.append(e) if e.get("log_level") == LogLevel.error else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        daemon.reload()  # a broken file is logged, and nothing changes
        self.assertEqual(len(seen), 1)
        self.assertIn("YAML syntax error", errors[0]["problem"])


class ServiceReconfigureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_newLimitsForNewConnections(self):
        daemon = startDaemon(self, 'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        first = yield connectEcho("127.0.0.1", port(daemon))
        svc = daemon.getServiceNamed("echo")
        svc.reconfigure(config.parse(
            'services:\n  echo:\n    listen: ["tcp:0:interface=127.0.0.1"]\n    deny: ["127.0.0.0/8"]\n',
            "t.yaml").services["echo"])
        self.assertEqual((yield first.roundTrip(b"kept")), b"kept")  # open connections go on
        refused = Collector()
        from twisted.internet import endpoints

        yield endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port(daemon)), refused)
        yield refused.closed
        self.assertEqual(svc.metrics.refused("acl").value, 1)
        first.transport.loseConnection()


class LogFileTests(unittest.TestCase):
    def test_regularFileRotates(self):
        from twisted.python.logfile import LogFile

        self.assertIsInstance(logs.openLogFile(self.mktemp()), LogFile)

    def test_devicesAreNeverRotated(self):
        # Rotating renames: for /dev/null that would leave a regular file in its place.
        import os

        from twisted.python.logfile import LogFile

        fifo = self.mktemp()
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that opening to write does not block
        self.addCleanup(os.close, fd)
        stream = logs.openLogFile(fifo)
        self.addCleanup(stream.close)
        self.assertNotIsInstance(stream, LogFile)
        stream.write("line\n")
        stream.flush()
        self.assertEqual(os.read(fd, 100), b"line\n")

    def test_missingFolderIsMade(self):
        import os

        path = os.path.join(self.mktemp(), "sub", "netsvc.log")
        stream = logs.openLogFile(path)
        self.addCleanup(stream.close)
        stream.write("x\n")
        stream.flush()
        self.assertTrue(os.path.isfile(path))
