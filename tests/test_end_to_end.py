"""
End to end: the commands a user types, run as child processes.

    twistd -n netsvc --config etc/netsvc.yaml      (the shipped file, its fixed ports)
    twistd -ny etc/netsvc.tac
    netsvc check-config etc/netsvc.yaml

The shipped file listens on fixed ports (7007, 7443, 9100, ...); when one of them
is taken on this machine (say by `make run`), those tests are skipped, saying which.
"""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
import sys
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from tests.helpers import machineLock
from tests.interop._daemon import (
    IO_TIMEOUT,
    REPO,
    decoded,
    ipv6LoopbackWorks,
    runToCompletion,
    startNetsvc,
    startTwistd,
    tcpEcho,
    tlsContext,
    tlsEcho,
    twistdCommand,
    udpEcho,
)

CONFIG = "etc/netsvc.yaml"
TAC = "etc/netsvc.tac"

def shippedListeners() -> list[tuple[str, str, str, int]]:
    """Every listener of etc/netsvc.yaml as (key, type, host, port), read from the file itself."""
    from netsvc.config import load
    from netsvc.endpoints import split

    settings = load(str(REPO / CONFIG))
    entries = [(f"metrics.listen[{i}]", l.endpoint) for i, l in enumerate(settings.metrics.listen)]
    for name, svc in settings.services.items():
        if name == "forward":  # listeners per rule
            entries += [(f"services.forward.rules[{r}].listen[{i}]", l.endpoint)
                        for r, rule in enumerate(svc.rules) for i, l in enumerate(rule.listen)]
            continue
        entries += [(f"services.{name}.listen[{i}]", l.endpoint) for i, l in enumerate(svc.listen)]
    out = []
    for key, endpoint in entries:
        kind, args, kwargs = split(endpoint)
        port = int(args[0] if args else kwargs["port"])
        out.append((key, "UDP" if kind == "udp" else "TCP", kwargs.get("interface", ""), port))
    return out


#: What etc/netsvc.yaml (and etc/netsvc.tac) bind: (family, type, host, port).
FIXED_PORTS = [
    (socket.AF_INET6 if ":" in host else socket.AF_INET,
     socket.SOCK_DGRAM if kind == "UDP" else socket.SOCK_STREAM, host, port)
    for _, kind, host, port in shippedListeners()
]

#: drain_timeout in etc/netsvc.yaml, plus the guard's abort grace (2 s) and slack for a slow machine.
DRAIN_BOUND = 5 + 2 + 5

#: How twistd ends after a clean shutdown on SIGTERM: Twisted re-raises the signal
#: that stopped it (twisted.scripts.twistd.runApp -> app._exitWithSignal), so the
#: parent sees "killed by SIGTERM" (a shell shows 143), which supervisors such as
#: systemd count as a clean stop.  Exit status 0 is accepted too.
CLEAN_SIGTERM_EXITS = (0, -signal.SIGTERM)


def assertStoppedCleanly(testCase: unittest.TestCase, status: int | None, output: str) -> None:
    """twistd ran its whole shutdown (no SIGKILL, no traceback) and exited as after SIGTERM."""
    testCase.assertIn(status, CLEAN_SIGTERM_EXITS, f"exit status {status} (None: still running):\n{output}")
    testCase.assertIn("Server Shut Down.", output)
    testCase.assertNotIn("Traceback", output)


def skipUnlessFixedPortsFree(testCase: unittest.TestCase) -> None:
    """
    Skip when a port the shipped configuration needs is in use (bound as twistd would); else keep
    them for C{testCase} (from other trial workers) until its cleanups have run.
    """
    machineLock(testCase, "fixed-ports")
    if not ipv6LoopbackWorks():
        raise unittest.SkipTest("the shipped configuration listens on ::1; this machine has no IPv6 loopback")
    for family, kind, host, port in FIXED_PORTS:
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:  # as twistd's listenTCP: TIME_WAIT leftovers are no conflict
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
                raise unittest.SkipTest(
                    f"{host} port {port}/{proto} is already in use ({e.strerror}); this test runs the "
                    f"shipped {CONFIG} with its fixed ports (is `make run` running?)") from None


def fetchMetrics() -> str:
    """GET http://127.0.0.1:9100/metrics, ignoring any proxy settings."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open("http://127.0.0.1:9100/metrics", timeout=IO_TIMEOUT) as response:
        return response.read().decode("utf-8")


def metricValue(text: str, series: str) -> float:
    """The value of one series (name with labels, as written) in Prometheus text."""
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    if m is None:
        raise AssertionError(f"{series} not in /metrics:\n{text}")
    return float(m.group(1))


class ShippedConfigurationTests(unittest.TestCase):
    """C{twistd -n netsvc --config etc/netsvc.yaml --state-dir TMP}."""

    def setUp(self) -> None:
        skipUnlessFixedPortsFree(self)
        self.stateDir = Path(self.mktemp()).resolve()
        self.daemon = startNetsvc(self, CONFIG, self.stateDir, cwd=REPO)
        self.cafile = self.daemon.cafile

    def test_reportsEveryListener(self) -> None:
        listeners = {(l["key"], l["type"], l["host"], l["port"]) for l in self.daemon.status["listeners"]}
        self.assertEqual(listeners, set(shippedListeners()))
        self.assertLessEqual({
            ("services.echo.listen[0]", "TCP", "127.0.0.1", 7007),
            ("services.echo.listen[1]", "UDP", "127.0.0.1", 7007),
            ("services.echo.listen[2]", "TCP", "127.0.0.1", 7443),
            ("services.echo.listen[3]", "TCP", "::1", 7007),
            ("services.forward.rules[0].listen[0]", "TCP", "127.0.0.1", 7008),
            ("services.forward.rules[1].listen[0]", "UDP", "127.0.0.1", 7008),
            ("services.chat.listen[0]", "TCP", "127.0.0.1", 4041),
            ("services.chat.listen[1]", "TCP", "127.0.0.1", 4040),
            ("metrics.listen[0]", "TCP", "127.0.0.1", 9100),
            ("services.dns.listen[0]", "UDP", "127.0.0.1", 5353),
            ("services.dns.listen[1]", "TCP", "127.0.0.1", 5353),
            ("services.dns.listen[2]", "TCP", "127.0.0.1", 8853),
        }, listeners)

    def test_dnsAnswersLocalRecordsOverUdpTcpAndTls(self) -> None:
        """The shipped records (no upstream traffic): UDP, TCP and verified DNS over TLS."""
        import struct

        query = struct.pack("!HHHHHH", 77, 0x0100, 1, 0, 0, 0) + b"\x07printer\x03lab\x00\x00\x01\x00\x01"
        address = bytes([10, 0, 0, 7])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(IO_TIMEOUT)
            udp.sendto(query, ("127.0.0.1", 5353))
            answer = udp.recv(4096)
        self.assertEqual((answer[:2], answer[3] & 0xF), (b"\x00\x4d", 0))
        self.assertTrue(answer.endswith(address), answer)
        framed = struct.pack("!H", len(query)) + query
        with socket.create_connection(("127.0.0.1", 5353), timeout=IO_TIMEOUT) as tcp:
            tcp.sendall(framed)
            self.assertTrue(tcp.recv(4096).endswith(address))
        with socket.create_connection(("127.0.0.1", 8853), timeout=IO_TIMEOUT) as raw:
            with tlsContext(self.cafile).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(framed)
                self.assertTrue(tls.recv(4096).endswith(address))
        text = fetchMetrics()
        self.assertGreaterEqual(
            metricValue(text, 'netsvc_dns_queries_total{service="dns",qtype="A",rcode="NOERROR"}'), 3)

    def test_chatLineAndNulClientsMeet(self) -> None:
        nul = socket.create_connection(("127.0.0.1", 4040), timeout=IO_TIMEOUT)
        self.addCleanup(nul.close)
        line = socket.create_connection(("127.0.0.1", 4041), timeout=IO_TIMEOUT)
        self.addCleanup(line.close)
        line.sendall(b"/nick e2e\nhello from the line client\n")
        data = b""
        while b"e2e: hello from the line client\0" not in data:
            chunk = nul.recv(4096)
            self.assertTrue(chunk, f"chat closed the connection; got {data!r}")
            data += chunk

    def test_echoOverEveryTransportAndCountedInMetrics(self) -> None:
        self.assertEqual(tcpEcho("127.0.0.1", 7007, b"over tcp"), b"over tcp")
        self.assertEqual(udpEcho("127.0.0.1", 7007, b"over udp"), b"over udp")
        self.assertEqual(tlsEcho("127.0.0.1", 7443, b"over tls", self.cafile), b"over tls")
        self.assertEqual(tcpEcho("::1", 7007, b"over tcp6"), b"over tcp6")
        streamConnections = 3  # tcp, tls, tcp6

        text = fetchMetrics()
        accepted = metricValue(text, 'netsvc_connections_accepted_total{service="echo"}')
        self.assertGreaterEqual(accepted, streamConnections)

    def test_forwardToEchoOverTcpAndUdp(self) -> None:
        """The shipped forward rules: 127.0.0.1:7008 (TCP and UDP) reach the echo service on 7007."""
        self.assertEqual(tcpEcho("127.0.0.1", 7008, b"forwarded"), b"forwarded")
        self.assertEqual(udpEcho("127.0.0.1", 7008, b"forwarded datagram"), b"forwarded datagram")
        text = fetchMetrics()
        self.assertGreaterEqual(metricValue(text, 'netsvc_forward_connections_total{rule="echo"}'), 1)
        self.assertGreaterEqual(metricValue(text, 'netsvc_forward_bytes_total{rule="echo",direction="down"}'), 9)

    def test_webServesHTTPSAndRedirects(self) -> None:
        """GET https://localhost:8443/ (the shipped www/index.html); http://...:8080/ redirects there."""
        context = tlsContext(self.cafile)
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                             urllib.request.ProxyHandler({}))
        with opener.open("https://localhost:8443/", timeout=IO_TIMEOUT) as response:
            self.assertEqual(response.headers["Content-Type"], "text/html; charset=utf-8")
            self.assertIn("max-age=", response.headers["Strict-Transport-Security"])
            self.assertIn(b"netsvc", response.read())
        with opener.open("http://localhost:8080/", timeout=IO_TIMEOUT) as response:  # follows the 301
            self.assertEqual(response.url, "https://localhost:8443/")
        with opener.open("https://localhost:8443/chat/", timeout=IO_TIMEOUT) as response:  # the browser chat
            self.assertIn(b"WebSocket", response.read())

    def test_sighupReloadsAndKeepsServing(self) -> None:
        self.daemon.signal(signal.SIGHUP)
        self.assertTrue(self.daemon.waitForOutput("SIGHUP: reloading", IO_TIMEOUT), self.daemon.output())
        self.assertTrue(self.daemon.running(), self.daemon.output())
        self.assertEqual(tlsEcho("127.0.0.1", 7443, b"after reload", self.cafile), b"after reload")
        self.assertEqual(tlsEcho("127.0.0.1", 7443, b"by address", self.cafile, "127.0.0.1"), b"by address")

    def test_sigtermDrainsThenExitsCleanly(self) -> None:
        """
        SIGTERM with a TLS client still connected and silent: the daemon closes
        it once drain_timeout is up (it does not wait for the client's
        close_notify forever), exits with status 0, and removes status.json.
        """
        raw = socket.create_connection(("127.0.0.1", 7443), timeout=IO_TIMEOUT)
        self.addCleanup(raw.close)
        client = tlsContext(self.cafile).wrap_socket(raw, server_hostname="localhost")
        client.sendall(b"still here")
        self.assertEqual(client.recv(100), b"still here")
        self.assertTrue(self.daemon.statusPath.exists())

        self.daemon.signal(signal.SIGTERM)
        status = self.daemon.waitForExit(DRAIN_BOUND)
        assertStoppedCleanly(self, status, self.daemon.output())
        self.assertFalse(self.daemon.statusPath.exists(), "status.json left behind")
        self.assertEqual(_readUntilClosed(client), b"")


def _readUntilClosed(client: ssl.SSLSocket) -> bytes:
    """What arrives before the server closes (b"" for a clean close; a reset counts as closed)."""
    try:
        return client.recv(100)
    except (ssl.SSLError, ConnectionError):
        return b""


class StartupFailureTests(unittest.TestCase):
    """A configuration that cannot be used: non-zero exit, one clear line, never a traceback."""

    def twistd(self, config: Path) -> tuple[int, str]:
        command = twistdCommand() + ["-n", "--pidfile=", "netsvc", "--config", str(config)]
        result = runToCompletion(self, command)
        return result.returncode, decoded(result)

    def writeConfig(self, text: str) -> Path:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        config = folder / "netsvc.yaml"
        config.write_text(f"state_dir: {folder / 'state'}\n{text}")
        return config

    def test_unknownKeyNamesFileAndKey(self) -> None:
        config = self.writeConfig(
            "services:\n"
            "  echo:\n"
            '    listen: ["tcp:0:interface=127.0.0.1"]\n'
            "    limits:\n"
            "      max_conections: 5\n")
        status, output = self.twistd(config)
        self.assertNotEqual(status, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "services.echo.limits.max_conections" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(str(config), lines[0])
        self.assertIn("did you mean 'max_connections'", lines[0])

    def test_portInUseNamesTheListener(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            config = self.writeConfig(
                "services:\n"
                "  echo:\n"
                f'    listen: ["tcp:{port}:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]\n')
            status, output = self.twistd(config)
        self.assertNotEqual(status, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "services.echo.listen[0]" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(str(config), lines[0])
        self.assertIn("address already in use", lines[0])
        self.assertFalse((config.parent / "state" / "status.json").exists())


class CheckConfigTests(unittest.TestCase):
    def test_shippedConfigurationIsOK(self) -> None:
        result = runToCompletion(self, [sys.executable, "-m", "netsvc", "check-config", CONFIG])
        self.assertEqual(result.returncode, 0, decoded(result))
        self.assertIn(f"{CONFIG}: OK", result.stdout.decode())


class TacTests(unittest.TestCase):
    """C{twistd -ny etc/netsvc.tac}, from the repository root (its state goes to var/)."""

    def test_tacServesEchoSMTPAndLDAP(self) -> None:
        skipUnlessFixedPortsFree(self)
        daemon = startTwistd(self, ["-y", TAC], stateDir=REPO / "var", cwd=REPO)
        self.assertEqual(tcpEcho("127.0.0.1", 7007, b"from the tac"), b"from the tac")
        self.assertEqual(udpEcho("127.0.0.1", 7007, b"udp too"), b"udp too")
        self.assertEqual(tlsEcho("127.0.0.1", 7443, b"tls too", daemon.cafile), b"tls too")
        # The tac composes the SMTP relay and the LDAP directory as the YAML file does.
        with smtplib.SMTP("127.0.0.1", 2525, timeout=IO_TIMEOUT) as smtp:
            code, features = smtp.ehlo("tac.test")
            self.assertEqual(code, 250)
            self.assertIn(b"STARTTLS", features)
        with socket.create_connection(("127.0.0.1", 3389), timeout=IO_TIMEOUT) as ldap:
            ldap.sendall(ANONYMOUS_BIND)
            reply = ldap.recv(64)
        self.assertEqual(reply[:2], b"\x30\x0c", reply)  # a BindResponse...
        self.assertEqual(reply[7:10], b"\x0a\x01\x00", reply)  # ...resultCode success
        assertStoppedCleanly(self, daemon.stop(DRAIN_BOUND), daemon.output())
        self.assertFalse(daemon.statusPath.exists(), "status.json left behind")


#: LDAPMessage(1, BindRequest(version 3, name "", simple "")) in BER.
ANONYMOUS_BIND = bytes.fromhex("300c020101600702010304008000")
