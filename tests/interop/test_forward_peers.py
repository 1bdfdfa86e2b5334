"""
The forwarder (C{twistd -n netsvc}, a child process) with real programs:
socat and iperf3 as clients, HAProxy as the PROXY-protocol receiving backend.
Missing programs skip with the install hint (scripts/install-test-peers).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial import unittest

from netsvc.forward import proxyheader
from tests.interop._daemon import (
    IO_TIMEOUT,
    REPO,
    childEnvironment,
    requirePeer,
    runToCompletion,
    startNetsvc,
)


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _waitPort(port: int, timeout: float = IO_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port}")


class ForwardPeerTests(unittest.TestCase):
    timeout = 60

    def startForwarder(self, rules: str, echo: str = "tcp:0:interface=127.0.0.1"):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        config = folder / "netsvc.yaml"
        config.write_text(f'services:\n  echo:\n    listen: ["{echo}"]\n  forward:\n    rules:\n' + rules)
        return startNetsvc(self, config, folder / "state", cwd=REPO)

    def spawn(self, command: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=childEnvironment()
        )

        def stop() -> None:
            if p.poll() is None:
                p.kill()
            p.wait(IO_TIMEOUT)
            p.stdout.close()  # type: ignore[union-attr]

        self.addCleanup(stop)
        return p

    def test_socatThroughForwarderToEcho(self) -> None:
        """socat sends, half-closes (stdin EOF), and still reads the whole echo back."""
        socat = requirePeer("socat", "socat")
        echoPort = _freePort()  # the echo service listens here; the rule forwards to it
        dead = f"tcp:host=127.0.0.1:port={_freePort()}"
        daemon = self.startForwarder(
            "      - name: to-echo\n"
            '        listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'        connect: ["{dead}", "tcp:host=127.0.0.1:port={echoPort}"]\n',
            echo=f"tcp:{echoPort}:interface=127.0.0.1",
        )
        port = daemon.port("services.forward.rules[0].listen[0]")
        payload = b"".join(b"line %d through socat\n" % i for i in range(20000))
        result = runToCompletion(self, [socat, "-t", "5", "-", f"TCP:127.0.0.1:{port}"], input=payload)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, payload)
        self.assertTrue(daemon.waitForOutput("closed after", IO_TIMEOUT), daemon.output())
        self.assertIn(f"bytes up, {len(payload)} down", daemon.output())

    def test_socatOverTLSHalfCloses(self) -> None:
        """
        socat sends over TLS, then close_notify and FIN, and still gets the backend's
        answer: a tls: listener of a rule passes the client's close on as a half-close.
        """
        socat = requirePeer("socat", "socat")
        echoPort = _freePort()
        daemon = self.startForwarder(
            "      - name: tls-in\n"
            '        listen: ["tls:0:interface=127.0.0.1"]\n'
            f'        connect: ["tcp:host=127.0.0.1:port={echoPort}"]\n',
            echo=f"tcp:{echoPort}:interface=127.0.0.1",
        )
        port = daemon.port("services.forward.rules[0].listen[0]")
        payload = b"".join(b"tls line %d\n" % i for i in range(20000))
        target = f"OPENSSL:127.0.0.1:{port},cafile={daemon.cafile},commonname=localhost"
        result = runToCompletion(self, [socat, "-t", "5", "-", target], input=payload)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, payload)

    def test_iperf3ThroughForwarder(self) -> None:
        iperf3 = requirePeer("iperf3", "iperf3")
        serverPort = _freePort()
        self.spawn([iperf3, "-s", "-p", str(serverPort)])
        _waitPort(serverPort)
        daemon = self.startForwarder(
            "      - name: iperf\n"
            '        listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'        connect: ["tcp:host=127.0.0.1:port={serverPort}"]\n'
        )
        port = daemon.port("services.forward.rules[0].listen[0]")
        result = runToCompletion(
            self, [iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J"], timeout=30
        )
        report = json.loads(result.stdout)
        self.assertNotIn("error", report, report.get("error"))
        received = report["end"]["sum_received"]["bytes"]
        self.assertGreater(received, 1 << 20)

    def test_haproxyReceivesProxyHeaders(self) -> None:
        """
        HAProxy (accept-proxy) answers with the client address it parsed from
        our header: the real client for send_proxy v1, and for v2 the address a
        client announced to our accept_proxy listener.
        """
        haproxy = requirePeer("haproxy", "haproxy")
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        hport = _freePort()
        (folder / "haproxy.cfg").write_text(
            "global\n"
            "  log stderr format raw local0 err\n"
            "defaults\n"
            "  mode http\n"
            "  timeout connect 5s\n  timeout client 5s\n  timeout server 5s\n"
            "frontend proxied\n"
            f"  bind 127.0.0.1:{hport} accept-proxy\n"
            '  http-request return status 200 content-type text/plain lf-string "src=%[src]:%[src_port]\\n"\n'
        )
        check = runToCompletion(self, [haproxy, "-c", "-f", str(folder / "haproxy.cfg")])
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.spawn([haproxy, "-db", "-f", str(folder / "haproxy.cfg")])
        _waitPort(hport)
        daemon = self.startForwarder(
            "      - name: v1\n"
            '        listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'        connect: ["tcp:host=127.0.0.1:port={hport}"]\n'
            "        send_proxy: v1\n"
            "      - name: v2\n"
            '        listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'        connect: ["tcp:host=127.0.0.1:port={hport}"]\n'
            "        accept_proxy: true\n"
            "        trusted_proxies: [127.0.0.1/32]\n"
            "        send_proxy: v2\n"
        )
        v1 = daemon.port("services.forward.rules[0].listen[0]")
        v2 = daemon.port("services.forward.rules[1].listen[0]")

        with socket.create_connection(("127.0.0.1", v1), timeout=IO_TIMEOUT) as s:
            clientPort = s.getsockname()[1]
            s.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            answer = _readAll(s)
        self.assertIn(b"200", answer.split(b"\r\n", 1)[0])
        self.assertIn(f"src=127.0.0.1:{clientPort}\n".encode(), answer)

        with socket.create_connection(("127.0.0.1", v2), timeout=IO_TIMEOUT) as s:
            s.sendall(
                proxyheader.v1(("203.0.113.9", 1234), ("198.51.100.1", 80))
                + b"GET / HTTP/1.0\r\nHost: test\r\n\r\n"
            )
            answer = _readAll(s)
        self.assertIn(b"src=203.0.113.9:1234\n", answer)

    def test_haproxyAsTheTrustedSender(self) -> None:
        """
        HAProxy in front (send-proxy) from 127.0.0.2, in trusted_proxies: the client it
        announces is the one netsvc passes on (to HAProxy again, which answers with it).
        The same HAProxy from 127.0.0.3, not listed: refused, nothing reaches the backend.
        """
        haproxy = requirePeer("haproxy", "haproxy")
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.3", 0))
        except OSError:
            raise unittest.SkipTest("binding 127.0.0.2/3 needs Linux's 127.0.0.0/8 on lo") from None
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        trustedPort, untrustedPort, answerPort = _freePort(), _freePort(), _freePort()
        daemon = self.startForwarder(
            "      - name: behind\n"
            '        listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'        connect: ["tcp:host=127.0.0.1:port={answerPort}"]\n'
            "        accept_proxy: true\n"
            "        trusted_proxies: [127.0.0.2/32]\n"
            "        send_proxy: v1\n"
        )
        nport = daemon.port("services.forward.rules[0].listen[0]")
        (folder / "haproxy.cfg").write_text(
            "global\n"
            "  log stderr format raw local0 err\n"
            "defaults\n"
            "  mode tcp\n"
            "  timeout connect 5s\n  timeout client 5s\n  timeout server 5s\n"
            "frontend trusted\n"
            f"  bind 127.0.0.1:{trustedPort}\n"
            "  default_backend fromTrusted\n"
            "backend fromTrusted\n"
            f"  server netsvc 127.0.0.1:{nport} send-proxy source 127.0.0.2\n"
            "frontend untrusted\n"
            f"  bind 127.0.0.1:{untrustedPort}\n"
            "  default_backend fromUntrusted\n"
            "backend fromUntrusted\n"
            f"  server netsvc 127.0.0.1:{nport} send-proxy source 127.0.0.3\n"
            "frontend answer\n"
            "  mode http\n"
            f"  bind 127.0.0.1:{answerPort} accept-proxy\n"
            '  http-request return status 200 content-type text/plain lf-string "src=%[src]:%[src_port]\\n"\n'
        )
        check = runToCompletion(self, [haproxy, "-c", "-f", str(folder / "haproxy.cfg")])
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.spawn([haproxy, "-db", "-f", str(folder / "haproxy.cfg")])
        for port in (trustedPort, untrustedPort, answerPort):
            _waitPort(port)

        with socket.create_connection(("127.0.0.1", trustedPort), timeout=IO_TIMEOUT) as s:
            clientPort = s.getsockname()[1]
            s.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            answer = _readAll(s)
        # netsvc's real peer was 127.0.0.2; the client HAProxy announced went on
        self.assertIn(f"src=127.0.0.1:{clientPort}\n".encode(), answer, daemon.output()[-2000:])

        with socket.create_connection(("127.0.0.1", untrustedPort), timeout=IO_TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            answer = _readAll(s)
        self.assertEqual(answer, b"")
        deadline = time.monotonic() + IO_TIMEOUT
        while "trusted_proxies" not in daemon.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("not in trusted_proxies (latest: 127.0.0.3)", daemon.output())


def _readAll(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
