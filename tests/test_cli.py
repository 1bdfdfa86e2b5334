"""
The netsvc command as a new user meets it (issue 14): the command list, --version, help without markup, one
exit-status table (0 ok, 1 failure, 2 usage) and one voice for errors
(C{netsvc <cmd>: <what it tried>: <reason>}), no tracebacks; twistd netsvc's own front (loopback by default,
subcommands that work, a daemonized start that cannot bind); the log lines; check-config finding what the
daemon would refuse.  Each test asserts the text a user reads and the exit status.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from netsvc import cli, clients
from tests.helpers import freePort, port, startDaemon, stateDir
from tests.interop._daemon import REPO, runToCompletion, twistdCommand

TLS_ADVICE = ("checked 'localhost' against the system CAs; pass --cacert FILE (make run's is "
              "var/tls/selfsigned.pem) or -k/--insecure to skip verification")


def closedPort() -> int:
    """A TCP and UDP port on 127.0.0.1 where nothing listens (now)."""
    return freePort()


class Captured(unittest.TestCase):
    """Runs one client command in process, its stdout and stderr captured."""

    def setUp(self) -> None:
        self.outBytes, self.err = io.BytesIO(), io.StringIO()
        self.out = io.TextIOWrapper(self.outBytes, write_through=True)  # fetch writes bytes to stdout.buffer
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def run_(self, command: str, *argv: str) -> defer.Deferred:
        top = cli.parser(command)
        args = top.commands[command].parse_intermixed_args(list(argv))
        return defer.maybeDeferred(args.run, reactor, args)

    def stdout(self) -> str:
        return self.outBytes.getvalue().decode()

    def events(self) -> list[dict]:
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        return seen


class TopLevelTests(Captured):
    def test_aloneListsTheCommands(self) -> None:
        e = self.assertRaises(SystemExit, cli.main, [])
        self.assertEqual(e.code, 2)
        text = self.err.getvalue()
        for command in ("check-config", "echo", "chat", "dns", "forward", "fetch"):
            self.assertRegex(text, rf"\n    {command}\b")
        self.assertIn("exit status (every command): 0 success; 1 failure", text)

    def test_version(self) -> None:
        e = self.assertRaises(SystemExit, cli.main, ["--version"])
        self.assertEqual(e.code, 0)
        self.assertRegex(self.stdout(), r"^netsvc \d+\.\d+\.\d+ \(Twisted [\d.]+\w*, Python [\d.]+\)\n$")

    def test_helpWithoutMarkupAndEveryOptionHelped(self) -> None:
        top = cli.parser()
        parsers = [(name, top.commands[name]) for name in ("check-config", "echo", "chat", "dns", "forward", "fetch")]
        ldap = top.commands["ldap"]
        for action in ldap._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"ldap {sub}", p) for sub, p in action.choices.items()]
        self.assertEqual([name for name, _ in parsers[6:]], ["ldap search", "ldap whoami", "ldap compare", "ldap hash"])
        for name, p in parsers:
            text = p.format_help()
            self.assertNotRegex(text, r"\b[CLIBU]\{", f"epydoc markup in netsvc {name} --help")
            self.assertTrue(p.description, f"netsvc {name} --help has no description")
            for action in p._actions:
                if not isinstance(action, argparse._HelpAction):
                    self.assertTrue(action.help, f"netsvc {name}: {action.option_strings or action.dest} has no help")
        self.assertNotIn("action", top.commands["dns"].format_usage())

    def test_plain(self) -> None:
        self.assertEqual(cli.plain('see C{netsvc echo}, L{x.y} and C{{"a": {"b": 1}}}'),
                         'see netsvc echo, x.y and {"a": {"b": 1}}')

    def test_dnsWithoutQuery(self) -> None:
        status = self.successResultOf(self.run_("dns", "printer.lab"))
        self.assertEqual((status, self.err.getvalue()),
                         (2, "netsvc dns: unknown action 'printer.lab': netsvc dns query NAME [TYPE] "
                             "[@SERVER[:PORT]]\n"))

    def test_aBugIsOneLine(self) -> None:
        status = cli._unexpected(Failure(ValueError("boom")), "echo")
        self.assertEqual((status, self.err.getvalue()),
                         (1, "netsvc echo: unexpected error: ValueError: boom (NETSVC_TRACEBACK=1 shows where)\n"))

    def test_missingCACertIsUsageEverywhere(self) -> None:
        """The same mistake, the same status (2) and the same words, from every client."""
        missing = str(Path(self.mktemp()) / "ca.pem")
        reason = f"cannot read CA file {missing}: No such file or directory"
        for command, argv in [("echo", ["localhost:7", "--tls", "--cacert", missing, "x"]),
                              ("chat", ["localhost:4041", "--tls", "--cacert", missing]),
                              ("dns", ["query", "x.lab", "@127.0.0.1:53", "--tls", "--cacert", missing]),
                              ("fetch", ["https://localhost:1/", "--cacert", missing])]:
            self.err.truncate(0)
            self.err.seek(0)
            status = self.successResultOf(self.run_(command, *argv))
            self.assertEqual((command, status, self.err.getvalue()), (command, 2, f"netsvc {command}: {reason}\n"))


class ConnectionErrorTests(Captured):
    """Refused, unresolvable, TLS: one line each, status 1."""

    @defer.inlineCallbacks
    def test_echoRefusedTCP(self):
        p = closedPort()
        status = yield self.run_("echo", f"127.0.0.1:{p}", "x")
        self.assertEqual((status, self.err.getvalue()), (1, f"netsvc echo: 127.0.0.1:{p} (tcp): connection refused\n"))

    @defer.inlineCallbacks
    def test_echoRefusedUDP(self):
        """ICMP port unreachable is 'connection refused', at once -- not a traceback, not a timeout."""
        p = closedPort()
        status = yield self.run_("echo", f"127.0.0.1:{p}", "--udp", "--timeout", "3", "x")
        self.assertEqual((status, self.err.getvalue()), (1, f"netsvc echo: 127.0.0.1:{p} (udp): connection refused\n"))

    @defer.inlineCallbacks
    def test_chatRefused(self):
        p = closedPort()
        status = yield self.run_("chat", f"127.0.0.1:{p}", "--nick", "a")
        self.assertEqual((status, self.err.getvalue()), (1, f"netsvc chat: 127.0.0.1:{p} (tcp): connection refused\n"))

    @defer.inlineCallbacks
    def test_dnsRefused(self):
        p = closedPort()
        status = yield self.run_("dns", "query", "printer.lab", f"@127.0.0.1:{p}")
        self.assertEqual((status, self.err.getvalue()), (1, f"netsvc dns: 127.0.0.1:{p} (udp): connection refused\n"))

    def test_plainWords(self):
        from twisted.internet import error

        self.assertEqual(clients.describe(error.DNSLookupError("no results for hostname lookup: x")),
                         "cannot resolve host name")
        self.assertEqual(clients.describe(error.ConnectionRefusedError("111: Connection refused")),
                         "connection refused")
        self.assertEqual(clients.describe(defer.TimeoutError(), 5), "timed out after 5s")
        self.assertEqual(clients.target("::1", 53, "udp"), "[::1]:53 (udp)")


class TLSErrorTests(Captured):
    """A certificate nobody trusts: the name and CA checked, and what to pass."""

    def setUp(self) -> None:
        super().setUp()
        self.daemon = startDaemon(self, 'services:\n  echo: {listen: ["tls:0:interface=127.0.0.1"]}\n  dns:\n'
                                        '    listen: ["udp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]\n'
                                        '    upstreams: ["udp://127.0.0.1:9"]\n'
                                        '    records: [{name: printer.lab, type: A, value: 10.0.0.7}]\n')

    @defer.inlineCallbacks
    def test_echo(self):
        p = port(self.daemon, 0)
        status = yield self.run_("echo", f"localhost:{p}", "--tls", "x")
        self.assertEqual((status, self.err.getvalue()),
                         (1, f"netsvc echo: localhost:{p} (tls): TLS: certificate verify failed: {TLS_ADVICE}\n"))

    @defer.inlineCallbacks
    def test_dnsOverTLS(self):
        p = port(self.daemon, 1, "dns")
        status = yield self.run_("dns", "query", "printer.lab", f"@localhost:{p}", "--tls")
        self.assertEqual(status, 1)
        self.assertIn(f"(tls): TLS: certificate verify failed: {TLS_ADVICE}\n", self.err.getvalue())
        self.assertNotIn("Traceback", self.err.getvalue())

    @defer.inlineCallbacks
    def test_dnsServerByName(self):
        """@localhost is resolved (as dig does), the answer comes from one of its addresses."""
        status = yield self.run_("dns", "query", "printer.lab", f"@localhost:{port(self.daemon, 0, 'dns')}",
                                 "--short")
        self.assertEqual((status, self.stdout()), (0, "10.0.0.7\n"))

    @defer.inlineCallbacks
    def test_wrongName(self):
        cafile = str(stateDir(self.daemon) / "tls" / "selfsigned.pem")
        status = yield self.run_("dns", "query", "printer.lab", f"@127.0.0.1:{port(self.daemon, 1, 'dns')}",
                                 "--tls", "--cacert", cafile, "--tls-name", "other.example")
        self.assertEqual(status, 1)
        self.assertIn("TLS: the certificate is not valid for the name 'other.example': use a name it has, "
                      "or -k/--insecure to skip verification\n", self.err.getvalue())


class WrongServerTests(Captured):
    """A client pointed at the wrong kind of server says so."""

    def setUp(self) -> None:
        super().setUp()
        self.daemon = startDaemon(self, 'services:\n  echo: {listen: ["tcp:0:interface=127.0.0.1", '
                                        '"udp:0:interface=127.0.0.1"]}\n')

    @defer.inlineCallbacks
    def test_tlsToAPlainPort(self):
        p = port(self.daemon, 0)
        status = yield self.run_("echo", f"localhost:{p}", "--tls", "x")
        self.assertEqual(status, 1)
        self.assertRegex(self.err.getvalue(), rf"^netsvc echo: localhost:{p} \(tls\): TLS: .+ \(the server does not "
                                              r"speak TLS on this port\?\)\n$")

    @defer.inlineCallbacks
    def test_dnsToAnEchoServer(self):
        """The echo comes back with the query's ID: it is still not an answer (QR is not set)."""
        for index, transport in ((1, "udp"), (0, "tcp")):
            self.err.truncate(0)
            self.err.seek(0)
            p = port(self.daemon, index)
            status = yield self.run_("dns", "query", "printer.lab", f"@127.0.0.1:{p}", f"--{transport}"
                                     if transport == "tcp" else "--short")
            self.assertEqual((status, self.err.getvalue()),
                             (1, f"netsvc dns: 127.0.0.1:{p} ({transport}): the reply is not a DNS answer "
                                 "(no QR flag)\n"))


class FetchRedirectTests(Captured):
    @defer.inlineCallbacks
    def test_redirectThenTLSNamesTheURLTyped(self):
        root = Path(self.mktemp())
        root.mkdir()
        https = freePort()
        daemon = startDaemon(self, "services:\n  web:\n    listen:\n"
                                   f'      - "tls:{https}:interface=127.0.0.1"\n'
                                   '      - {endpoint: "tcp:0:interface=127.0.0.1", redirect_to_https: true}\n'
                                   f"    root: {root.absolute()}\n    access_log: null\n")
        http = port(daemon, 1, "web")
        status = yield self.run_("fetch", f"http://localhost:{http}/")
        self.assertEqual((status, self.err.getvalue()),
                         (1, f"netsvc fetch: http://localhost:{http}/ (redirected to https://localhost:{https}/): "
                             f"TLS: certificate verify failed: {TLS_ADVICE}\n"))


class TwistdTests(unittest.TestCase):
    def test_loopbackByDefault(self) -> None:
        from netsvc.tap import loopbackByDefault

        for given, wanted in [("tcp:7007", "tcp:7007:interface=127.0.0.1"),
                              ("udp:7007", "udp:7007:interface=127.0.0.1"),
                              ("tls:7443", "tls:7443:interface=127.0.0.1"),
                              ("tcp6:7007", "tcp6:7007:interface=::1"),
                              ("tcp:7007:interface=0.0.0.0", "tcp:7007:interface=0.0.0.0"),
                              ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
                              ("tcp:nope", "tcp:nope")]:
            self.assertEqual(loopbackByDefault(given), wanted)

    def test_helpListsWhatWorks(self) -> None:
        from netsvc.tap import Options

        text = str(Options())
        self.assertRegex(text, r"\n +echo +run only the echo service")
        self.assertNotRegex(text, r"\n +forward +run only")  # rules, not listen: it would fail

    def test_daemonizedStartThatCannotBind(self) -> None:
        """Without -n: the StartupError's line on stderr, status 1 -- not twistd's truncated bytes repr."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "busy.yaml").write_text(
            f"state_dir: {folder}\nservices:\n  echo: {{listen: ['tcp:{taken}:interface=127.0.0.1']}}\n")
        done = runToCompletion(self, twistdCommand() + [f"--pidfile={folder}/pid", f"--logfile={folder}/log",
                                                        "netsvc", "--config", "busy.yaml"], cwd=folder)
        self.assertEqual((done.returncode, done.stderr.decode()),
                         (1, f"netsvc: busy.yaml: services.echo.listen[0]: cannot listen on "
                             f"'tcp:{taken}:interface=127.0.0.1': address already in use\n"))
        self.assertFalse((folder / "pid").exists())

    def test_forwardCannotListen(self) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        done = runToCompletion(self, [sys.executable, "-m", "netsvc", "forward", str(taken), "127.0.0.1:9"],
                               cwd=REPO)
        self.assertEqual((done.returncode, done.stderr.decode()),
                         (1, f"netsvc forward: listen[0]: cannot listen on 'tcp:{taken}:interface=127.0.0.1': "
                             "address already in use\n"))


class LogTests(Captured):
    def observer(self, level: str = "info") -> io.StringIO:
        from netsvc import logs
        from netsvc.config import LogSettings

        stream = io.StringIO()
        self.addCleanup(setattr, logs, "_lowest", logs._lowest)  # observerFor sets the process-wide level
        observer = logs.observerFor(LogSettings(level=level), stream)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return stream

    @defer.inlineCallbacks
    def test_oneLinePerListener(self):
        from twisted.internet.protocol import Factory, Protocol
        from twisted.python import log as legacy

        stream = self.observer()
        factory = Factory.forProtocol(Protocol)  # noisy: "Starting factory <...>" too
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        yield listening.stopListening()
        legacy.msg("a line of someone else's")
        self.assertEqual([l.split("] ", 1)[1] for l in stream.getvalue().splitlines()],
                         ["a line of someone else's"])

    @defer.inlineCallbacks
    def test_metricsScrapesAtDebug(self):
        import treq
        from twisted.web.client import HTTPConnectionPool

        stream = self.observer("info")
        daemon = startDaemon(self, 'metrics: {listen: ["tcp:0:interface=127.0.0.1"]}\nservices: {}\n')
        pool = HTTPConnectionPool(reactor, persistent=False)
        where = daemon.getServiceNamed("metrics").listeners[0].port.getHost().port
        response = yield treq.get(f"http://127.0.0.1:{where}/metrics", pool=pool)
        yield response.content()
        self.assertEqual(response.code, 200)
        self.assertNotIn("GET /metrics", stream.getvalue())
        debug = self.observer("debug")
        response = yield treq.get(f"http://127.0.0.1:{where}/metrics", pool=pool)
        yield response.content()
        self.assertIn("[netsvc.status#debug]", debug.getvalue())
        self.assertIn('"GET /metrics HTTP/1.1" 200', debug.getvalue())

    def test_webSocketOverHTTP2(self):
        from twisted.web.test.requesthelper import DummyRequest

        from netsvc.chat.web import ChatWebSocketFactory, _Socket

        events = self.events()
        resource = _Socket(ChatWebSocketFactory(lambda: object()))
        request = DummyRequest([b"ws"])
        request.clientproto = b"HTTP/2"
        body = resource.render_GET(request)
        self.assertEqual((request.responseCode, body), (400, b"not a WebSocket handshake: WebSocket needs HTTP/1.1 "
                                                              b"(RFC 6455)\n"))
        (event,) = [e for e in events if e.get("log_namespace") == "netsvc.chat.web"]
        self.assertEqual(event["log_level"], LogLevel.info)
        from twisted.logger import formatEvent

        self.assertNotIn("<", formatEvent(event))  # no object repr
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_chatDisconnectedOnce(self):
        from twisted.logger import formatEvent

        from netsvc.chat.hub import Hub
        from tests.chat.test_hub import FakeMember

        events = self.events()
        hub = Hub()
        member = FakeMember("10.0.0.1:1")
        hub.connect(member)
        hub.disconnect(member, "disconnected")
        other = FakeMember("10.0.0.2:2")
        hub.connect(other)
        hub.disconnect(other, "connection reset")
        lines = [formatEvent(e) for e in events if "disconnected" in formatEvent(e)]
        self.assertEqual(lines, ["chat: 10.0.0.1:1 disconnected", "chat: 10.0.0.2:2 disconnected (connection reset)"])


class CheckConfigTests(Captured):
    def check(self, yaml: str) -> tuple[int, list[str], str]:
        name = self.mktemp()
        Path(name).write_text(yaml)
        status = cli.checkConfig(None, argparse.Namespace(files=[name]))
        return status, [l.removeprefix(f"{name}: ") for l in self.err.getvalue().splitlines()], name

    def test_everyProblemAtOnce(self):
        status, lines, _ = self.check("servces: {}\nlog: {levle: info}\nservices:\n  echo: {deny: [1.2.3.4/8]}\n"
                                      "  chat: {limts: {}}\n")
        self.assertEqual(status, 1)
        self.assertEqual(lines, ["servces: unknown key (did you mean 'services'?)",
                                 "log.levle: unknown key (did you mean 'level'?)",
                                 "services.echo.deny: '1.2.3.4/8' has host bits set: the network is 1.0.0.0/8 "
                                 "(or write the address alone for just 1.2.3.4)",
                                 "services.chat.limts: unknown key (did you mean 'limits'?)"])

    def test_whatTheDaemonWouldRefuse(self):
        """Missing web root and password file: found by building the services, both reported."""
        state = Path(self.mktemp()).absolute()
        status, lines, _ = self.check(f"state_dir: {state}\nservices:\n"
                                      '  web: {root: /nonexistent/www, listen: ["tls:0:interface=127.0.0.1"]}\n'
                                      "  chat: {auth: {password_file: /nonexistent/pw}}\n")
        self.assertEqual(status, 1)
        self.assertEqual(lines, ["services.web.root: /nonexistent/www is not a folder",
                                 "services.chat.auth.password_file: cannot read /nonexistent/pw"])
        self.assertFalse(state.exists(), "check-config wrote into state_dir")

    def test_schemaAndDryRunProblemsTogether(self):
        """A misspelt key does not hide a missing web root: what the schema leaves intact is dry-run too."""
        status, lines, _ = self.check("servces: {}\nservices:\n  echo: {listen: [tcpp:7]}\n"
                                      '  web: {root: /nonexistent/www, listen: ["tcp:0:interface=127.0.0.1"]}\n'
                                      "  chat: {auth: {password_file: /nonexistent/pw}}\n")
        self.assertEqual(status, 1)
        self.assertEqual(lines, ["servces: unknown key (did you mean 'services'?)",
                                 "services.echo.listen[0]: malformed endpoint 'tcpp:7': unknown endpoint type "
                                 "'tcpp' (did you mean 'tcp'?)",
                                 "services.web.root: /nonexistent/www is not a folder",
                                 "services.chat.auth.password_file: cannot read /nonexistent/pw"])

    def test_shippedConfigIsOK(self):
        status = cli.checkConfig(None, argparse.Namespace(files=[str(REPO / "etc" / "netsvc.yaml")]))
        self.assertEqual(status, 0)
        self.assertRegex(self.stdout(), r"netsvc\.yaml: OK \(echo, forward, chat, web, dns")


class RunAsAUserTests(unittest.TestCase):
    """Two commands as a user types them (a new process): no traceback, the right status."""

    def test_udpEchoToAClosedPort(self):
        p = closedPort()
        done = subprocess.run([sys.executable, "-m", "netsvc", "echo", f"127.0.0.1:{p}", "--udp", "hello"],
                              capture_output=True, cwd=REPO, timeout=60)
        self.assertEqual((done.returncode, done.stdout, done.stderr.decode()),
                         (1, b"", f"netsvc echo: 127.0.0.1:{p} (udp): connection refused\n"))

    def test_dnsServerGivenByName(self):
        p = closedPort()
        done = subprocess.run([sys.executable, "-m", "netsvc", "dns", "query", "printer.lab", f"@localhost:{p}"],
                              capture_output=True, cwd=REPO, timeout=60)
        self.assertEqual(done.returncode, 1)
        err = done.stderr.decode()
        self.assertRegex(err, rf"^(netsvc dns: (127\.0\.0\.1|\[::1\]):{p} \(udp\): connection refused\n)+$")

    def test_chatLeavesOnCtrlC(self):
        """Ctrl-C is how one leaves an interactive chat: status 0, nothing on stderr."""
        import signal
        import time

        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        process = subprocess.Popen([sys.executable, "-m", "netsvc", "chat", f"127.0.0.1:{server.getsockname()[1]}"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        connection, _ = server.accept()
        self.addCleanup(connection.close)
        connection.sendall(b"*** welcome\n")
        self.assertEqual(process.stdout.readline(), b"*** welcome\n")  # it is running and printing
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        self.assertEqual((process.returncode, out, err), (0, b"", b""))

    def test_forwardLeavesMakeRunsStatusAlone(self):
        """netsvc forward (state_dir var/ by default) neither replaces nor deletes var/status.json."""
        import os
        import signal

        folder = Path(self.mktemp()).absolute()
        (folder / "var").mkdir(parents=True)
        (folder / "var" / "status.json").write_text('{"pid": 1}\n')
        env = dict(os.environ, PYTHONPATH=str(REPO))
        process = subprocess.Popen([sys.executable, "-m", "netsvc", "forward", str(freePort()), "127.0.0.1:9"],
                                   cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        said = b""
        while b" -> " not in said:
            line = process.stderr.readline()
            self.assertTrue(line, f"netsvc forward ended: {said!r}")
            said += line
        self.assertEqual((folder / "var" / "status.json").read_text(), '{"pid": 1}\n')
        import time

        time.sleep(0.3)  # the reactor's signal handlers are installed just after start-up
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), 0)
        process.stderr.close()
        self.assertEqual((folder / "var" / "status.json").read_text(), '{"pid": 1}\n')

    def test_ctrlCIsQuiet(self):
        """Ctrl-C while waiting for an answer: status 130 (128 + SIGINT) and nothing on stderr."""
        import signal
        import time

        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        process = subprocess.Popen([sys.executable, "-m", "netsvc", "dns", "query", "x.lab",
                                    f"@127.0.0.1:{server.getsockname()[1]}", "--tcp", "--timeout", "30"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        connection, _ = server.accept()  # connected: the query is waiting for its answer
        self.addCleanup(connection.close)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        self.assertEqual((process.returncode, out, err), (130, b"", b""))
