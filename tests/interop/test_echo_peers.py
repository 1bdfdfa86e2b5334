"""
The echo service, run as the real daemon (C{twistd -n netsvc --config ...}),
exercised by clients nobody here wrote: socat, openssl s_client, Python's own
C{ssl} module, and the echo clients from the books people learn from.

Each test starts its own daemon on port 0 (TCP, UDP, TLS and TCP over ::1) and
reads the bound ports from C{status.json}.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import ssl
import subprocess
import time
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import (
    IO_TIMEOUT,
    decoded,
    ipv6LoopbackWorks,
    recvExactly,
    requirePeer,
    runToCompletion,
    startNetsvc,
    tlsContext,
    tlsEcho,
)

TCP = "services.echo.listen[0]"
UDP = "services.echo.listen[1]"
TLS = "services.echo.listen[2]"
TCP6 = "services.echo.listen[3]"


class EchoDaemonTestCase(unittest.TestCase):
    """Starts netsvc echo on 127.0.0.1 (tcp, udp, tls) and ::1 (tcp6), all on port 0."""

    def setUp(self) -> None:
        self.ipv6 = ipv6LoopbackWorks()
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        listen = ['"tcp:0:interface=127.0.0.1"', '"udp:0:interface=127.0.0.1"', '"tls:0:interface=127.0.0.1"']
        if self.ipv6:
            listen.append('"tcp6:0:interface=::1"')
        config = base / "netsvc.yaml"
        config.write_text(
            "state_dir: state\n"
            "drain_timeout: 1s\n"
            "services:\n"
            "  echo:\n"
            "    listen:\n" + "".join(f"      - {entry}\n" for entry in listen)
        )
        self.daemon = startNetsvc(self, config, base / "state")
        self.cafile = self.daemon.cafile

    def port(self, key: str) -> int:
        return self.daemon.port(key)

    def requireIPv6(self) -> None:
        if not self.ipv6:
            raise unittest.SkipTest("this machine cannot bind ::1 (no IPv6 loopback)")

    def runPeer(self, args: list[str], input: bytes = b"") -> subprocess.CompletedProcess:
        """Run a peer program to completion (bounded), with C{input} on its stdin."""
        return runToCompletion(self, args, cwd=os.getcwd(), input=input, timeout=IO_TIMEOUT)


class SocatTests(EchoDaemonTestCase):
    """C{socat}: the tool people reach for to poke at a port."""

    def setUp(self) -> None:
        self.socat = requirePeer("socat", "socat")
        super().setUp()

    def test_halfCloseStillGetsTheEcho(self) -> None:
        """
        C{printf hello | socat - TCP:127.0.0.1:PORT}: socat sends, hits EOF on
        stdin and shuts down its sending side at once; the echo still arrives.
        """
        result = self.runPeer([self.socat, "-", f"TCP:127.0.0.1:{self.port(TCP)}"], input=b"hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello"), decoded(result))

    def test_nulTerminatedMessageIsByteExact(self) -> None:
        """Echo does no framing: a NUL byte comes back like any other."""
        result = self.runPeer([self.socat, "-", f"TCP:127.0.0.1:{self.port(TCP)}"], input=b"hi\0")
        self.assertEqual((result.returncode, result.stdout), (0, b"hi\0"), decoded(result))

    def test_ipv6Loopback(self) -> None:
        self.requireIPv6()
        result = self.runPeer([self.socat, "-", f"TCP6:[::1]:{self.port(TCP6)}"], input=b"over v6")
        self.assertEqual((result.returncode, result.stdout), (0, b"over v6"), decoded(result))

    def test_udpDatagram(self) -> None:
        """C{socat - UDP:127.0.0.1:PORT}: one datagram out, the same one back."""
        result = self.runPeer([self.socat, "-", f"UDP:127.0.0.1:{self.port(UDP)}"], input=b"ping")
        self.assertEqual((result.returncode, result.stdout), (0, b"ping"), decoded(result))

    def test_tlsVerifiedAgainstTheGeneratedCertificate(self) -> None:
        """socat verifies the certificate (and the name localhost) with cafile= the generated PEM."""
        result = self.runPeer(
            [self.socat, "-", f"OPENSSL:localhost:{self.port(TLS)},cafile={self.cafile}"], input=b"hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello"), decoded(result))

    def test_tlsWithTheWrongCAFails(self) -> None:
        """The same command trusting another CA is refused: verification really happens."""
        requirePeer("openssl", "openssl")
        wrongCA = self.makeOtherCA()
        result = self.runPeer(
            [self.socat, "-", f"OPENSSL:localhost:{self.port(TLS)},cafile={wrongCA}"], input=b"hello")
        self.assertNotEqual(result.returncode, 0, decoded(result))
        self.assertEqual(result.stdout, b"")
        self.assertIn("certificate verify failed", decoded(result))

    def makeOtherCA(self) -> str:
        """A self-signed certificate for localhost that has nothing to do with the daemon's."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        cert, key = folder / "other.pem", folder / "other.key"
        made = self.runPeer([
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-days", "1",
            "-keyout", str(key), "-out", str(cert)])
        self.assertEqual(made.returncode, 0, decoded(made))
        return str(cert)


class OpenSSLClientTests(EchoDaemonTestCase):
    """C{openssl s_client} and C{openssl x509}: the TLS policy as OpenSSL's own tools see it."""

    def setUp(self) -> None:
        self.openssl = requirePeer("openssl", "openssl")
        super().setUp()

    def sClient(self, *options: str) -> subprocess.CompletedProcess:
        """C{openssl s_client -connect 127.0.0.1:PORT OPTIONS}, stdin at EOF: handshake, then quit."""
        return self.runPeer([self.openssl, "s_client", "-connect", f"127.0.0.1:{self.port(TLS)}", *options])

    def test_tls12HandshakeVerifies(self) -> None:
        result = self.sClient("-tls1_2", "-CAfile", self.cafile, "-verify_return_error",
                              "-servername", "localhost", "-verify_hostname", "localhost")
        output = decoded(result)
        self.assertEqual(result.returncode, 0, output)
        self.assertIn("Protocol  : TLSv1.2", output)
        self.assertIn("Verify return code: 0 (ok)", output)

    def test_tls11IsRefusedByTheServer(self) -> None:
        """
        TLS 1.2 is the minimum.  SECLEVEL=0 lets this OpenSSL offer TLS 1.1 at
        all; the refusal must then be the server's alert, not a local error.
        """
        result = self.sClient("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        output = decoded(result)
        if "no protocols available" in output:
            raise unittest.SkipTest("this openssl build cannot offer TLS 1.1 at all")
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn("alert protocol version", output)
        self.assertIn("Cipher is (NONE)", output)  # no session was established

    def test_echoThroughSClient(self) -> None:
        """An interactive s_client session (-quiet): a line typed comes back."""
        proc = subprocess.Popen(
            [self.openssl, "s_client", "-quiet", "-no_ign_eof", "-connect", f"127.0.0.1:{self.port(TLS)}",
             "-tls1_2", "-CAfile", self.cafile, "-verify_return_error", "-servername", "localhost",
             "-verify_hostname", "localhost"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(_reap, proc)
        message = "héllo through openssl\n".encode()
        proc.stdin.write(message)
        proc.stdin.flush()
        got = _readFor(proc.stdout, len(message), IO_TIMEOUT)
        proc.stdin.close()
        self.assertEqual(got, message)
        self.assertEqual(proc.wait(IO_TIMEOUT), 0)

    def test_certificateNamesLocalhostAndBothLoopbacks(self) -> None:
        result = self.runPeer([self.openssl, "x509", "-noout", "-ext", "subjectAltName", "-in", self.cafile])
        output = decoded(result)
        self.assertEqual(result.returncode, 0, output)
        for name in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1"):
            self.assertIn(name, output)


def _readFor(pipe, count: int, timeout: float) -> bytes:
    """Read from a pipe until C{count} bytes, EOF or C{timeout} seconds."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
            break
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            break
        got += chunk
    return got


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None and not pipe.closed:
            pipe.close()


class PythonSSLClientTests(EchoDaemonTestCase):
    """Python's C{ssl} module with its default, verifying context."""

    def test_verifiedByName(self) -> None:
        self.assertEqual(tlsEcho("127.0.0.1", self.port(TLS), b"hello", self.cafile, "localhost"), b"hello")

    def test_verifiedByIPAddress(self) -> None:
        """Connecting to 127.0.0.1 and checking that address against the certificate."""
        self.assertEqual(tlsEcho("127.0.0.1", self.port(TLS), b"hello", self.cafile, "127.0.0.1"), b"hello")

    def test_servedCertificateNames(self) -> None:
        """What the server presents (not only the file on disk) carries all three names."""
        with socket.create_connection(("127.0.0.1", self.port(TLS)), timeout=IO_TIMEOUT) as raw:
            with tlsContext(self.cafile).wrap_socket(raw, server_hostname="localhost") as s:
                names = s.getpeercert()["subjectAltName"]
                version = s.version()
        dns = {value for kind, value in names if kind == "DNS"}
        ips = {ipaddress.ip_address(value.strip()) for kind, value in names if kind == "IP Address"}
        self.assertEqual(dns, {"localhost"})
        self.assertEqual(ips, {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    def test_otherNameIsRejected(self) -> None:
        """The client's name check works against this certificate: example.com is not in it."""
        with socket.create_connection(("127.0.0.1", self.port(TLS)), timeout=IO_TIMEOUT) as raw:
            with self.assertRaises(ssl.SSLCertVerificationError):
                tlsContext(self.cafile).wrap_socket(raw, server_hostname="example.com")


# The books' clients, as printed: nothing in them knows about netsvc.

COOKBOOK_MESSAGE = b"Hello, world. This is a message."  # 32 bytes ...
COOKBOOK_MESSAGE += b"!"                                # ... and one more: 33, no newline
assert len(COOKBOOK_MESSAGE) == 33 and b"\n" not in COOKBOOK_MESSAGE


def cookbookClient(host: str, port: int) -> bytes:
    """Sends exactly 33 bytes, no newline, and reads until 33 bytes are back."""
    s = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    s.sendall(COOKBOOK_MESSAGE)
    data = b""
    while len(data) < len(COOKBOOK_MESSAGE):
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


NUL_MESSAGE = "héllo wörld\0".encode()


def nulTerminatedClient(host: str, port: int) -> bytes:
    """Sends one UTF-8 message ending in NUL, waits for the same bytes back, closes."""
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as s:
        s.sendall(NUL_MESSAGE)
        return recvExactly(s, len(NUL_MESSAGE))


class BookClientTests(EchoDaemonTestCase):
    """The clients people copy from books work unchanged, over IPv4 and IPv6."""

    def test_cookbookClient(self) -> None:
        self.assertEqual(cookbookClient("127.0.0.1", self.port(TCP)), COOKBOOK_MESSAGE)

    def test_cookbookClientIPv6(self) -> None:
        self.requireIPv6()
        self.assertEqual(cookbookClient("::1", self.port(TCP6)), COOKBOOK_MESSAGE)

    def test_nulTerminatedClient(self) -> None:
        self.assertEqual(nulTerminatedClient("127.0.0.1", self.port(TCP)), NUL_MESSAGE)

    def test_nulTerminatedClientIPv6(self) -> None:
        self.requireIPv6()
        self.assertEqual(nulTerminatedClient("::1", self.port(TCP6)), NUL_MESSAGE)


class HalfCloseTests(EchoDaemonTestCase):
    """What socat relies on, checked precisely with a plain socket."""

    def test_serverClosesAfterEchoingAHalfClosedStream(self) -> None:
        """
        After the client's FIN, every byte sent comes back and then the server
        closes its side too (the client sees EOF, not a hang).
        """
        payload = bytes(range(256)) * 256  # 64 KiB: more than one read
        with socket.create_connection(("127.0.0.1", self.port(TCP)), timeout=IO_TIMEOUT) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            received = recvExactly(s, len(payload) + 1)  # +1: only EOF ends this read
        self.assertEqual(len(received), len(payload))
        self.assertEqual(received, payload)
