"""
The web service, run as the real daemon (C{twistd -n netsvc --config ...}),
exercised by clients nobody here wrote: curl (HTTP/1.1 and HTTP/2), nghttp and
h2load (HTTP/2), openssl s_client (ALPN, protocol versions), Python's urllib and
Chromium.  The HTTP/2 clients run against both engines (libnghttp2 and h2).

Each test class starts one daemon per test on port 0 (a TLS listener and a
plain one redirecting to it) and reads the bound ports from C{status.json}.
"""

from __future__ import annotations

import gzip
import os
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, decoded, requirePeer, runToCompletion, startNetsvc

TLS = "services.web.listen[0]"
REDIRECT = "services.web.listen[1]"

TEXT = ("netsvc says hello, grüß dich\n" * 400).encode("utf-8")
DATA = bytes(range(256)) * 64  # 16 KiB


class WebDaemonTestCase(unittest.TestCase):
    #: services.web.http2 for this class's daemon.
    http2 = "auto"

    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        www = base / "www"
        www.mkdir(parents=True)
        (www / "index.html").write_text("<!DOCTYPE html><title>netsvc</title><p>It works.</p>\n")
        (www / "text.txt").write_bytes(TEXT)
        (www / "data.bin").write_bytes(DATA)
        config = base / "netsvc.yaml"
        config.write_text(
            "state_dir: state\n"
            "drain_timeout: 1s\n"
            "services:\n"
            "  web:\n"
            "    listen:\n"
            '      - "tls:0:interface=127.0.0.1"\n'
            '      - {endpoint: "tcp:0:interface=127.0.0.1", redirect_to_https: true}\n'
            "    root: www\n"
            f"    http2: {self.http2}\n"
        )
        self.daemon = startNetsvc(self, config, base / "state", cwd=base)
        self.cafile = self.daemon.cafile
        self.port = self.daemon.port(TLS)
        self.base = f"https://localhost:{self.port}"

    def run_(self, args: list[str], input: bytes = b"") -> subprocess.CompletedProcess:
        return runToCompletion(self, args, cwd=os.getcwd(), input=input, timeout=IO_TIMEOUT)


class CurlTests(WebDaemonTestCase):
    def setUp(self) -> None:
        self.curl = requirePeer("curl", "curl")
        super().setUp()

    def curl_(self, *args: str) -> subprocess.CompletedProcess:
        result = self.run_([self.curl, "-sS", "--noproxy", "*", "--cacert", self.cafile, *args])
        self.assertEqual(result.returncode, 0, decoded(result))
        return result

    def head(self, result: subprocess.CompletedProcess) -> tuple[str, bytes]:
        """(header text, body) of C{curl -i} output."""
        raw = result.stdout
        sep = raw.index(b"\r\n\r\n")
        return raw[:sep].decode("latin-1").lower(), raw[sep + 4 :]

    def test_http11AndHttp2(self) -> None:
        for flag, version in [("--http1.1", "1.1"), ("--http2", "2")]:
            result = self.curl_(
                flag, "-o", "/dev/null", "-w", "%{http_version} %{http_code}", f"{self.base}/"
            )
            self.assertEqual(result.stdout.decode(), f"{version} 200")

    def test_http2Headers(self) -> None:
        headers, body = self.head(self.curl_("--http2", "-i", f"{self.base}/text.txt"))
        self.assertTrue(headers.startswith("http/2 200"), headers)
        self.assertIn("content-type: text/plain; charset=utf-8", headers)
        self.assertIn("strict-transport-security: max-age=31536000", headers)
        self.assertIn("etag: ", headers)
        self.assertEqual(body, TEXT)

    def test_ranges(self) -> None:
        for flag in ("--http1.1", "--http2"):
            result = self.curl_(flag, "-r", "10-19", f"{self.base}/data.bin")
            self.assertEqual(result.stdout, DATA[10:20])
            headers, body = self.head(self.curl_(flag, "-i", "-r", "0-1,100-101", f"{self.base}/data.bin"))
            self.assertIn("multipart/byteranges", headers)
            self.assertIn(b"Content-Range: bytes 100-101/16384", body)
            result = self.run_(
                [
                    self.curl,
                    "-sS",
                    "--cacert",
                    self.cafile,
                    flag,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-r",
                    "99999-",
                    f"{self.base}/data.bin",
                ]
            )
            self.assertEqual(result.stdout, b"416")

    def test_resumeWithContinueAt(self) -> None:
        out = Path(self.mktemp())
        out.write_bytes(DATA[:1000])
        self.curl_("-C", "-", "-o", str(out), f"{self.base}/data.bin")
        self.assertEqual(out.read_bytes(), DATA)

    def test_compressed(self) -> None:
        for flag in ("--http1.1", "--http2"):
            headers, _ = self.head(self.curl_(flag, "-i", "--compressed", f"{self.base}/text.txt"))
            self.assertIn("content-encoding: gzip", headers)
            result = self.curl_(flag, "--compressed", f"{self.base}/text.txt")
            self.assertEqual(result.stdout, TEXT)  # curl decoded it
            headers, _ = self.head(self.curl_(flag, "-i", f"{self.base}/text.txt"))
            self.assertNotIn("content-encoding", headers)

    def test_conditional(self) -> None:
        headers, _ = self.head(self.curl_("-i", f"{self.base}/text.txt"))
        etag = [l.split(": ", 1)[1] for l in headers.split("\r\n") if l.startswith("etag:")][0]
        for flag in ("--http1.1", "--http2"):
            result = self.curl_(
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                f"If-None-Match: {etag}",
                f"{self.base}/text.txt",
            )
            self.assertEqual(result.stdout, b"304")
        stamp = Path(self.mktemp())
        stamp.write_text("x")
        os.utime(stamp, (2_000_000_000, 2_000_000_000))  # a date after the file's
        result = self.curl_(
            "-o", "/dev/null", "-w", "%{http_code}", "-z", str(stamp), f"{self.base}/text.txt"
        )
        self.assertEqual(result.stdout, b"304")

    def test_redirectToHTTPS(self) -> None:
        plain = self.daemon.port(REDIRECT)
        result = self.curl_(
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            f"http://localhost:{plain}/text.txt?a=b",
        )
        self.assertEqual(result.stdout.decode(), f"301 https://localhost:{self.port}/text.txt?a=b")
        result = self.curl_("-L", f"http://localhost:{plain}/text.txt")
        self.assertEqual(result.stdout, TEXT)


class CurlPythonEngineTests(CurlTests):
    """The same curl tests with HTTP/2 on the fallback engine (h2)."""

    http2 = "python"


class NghttpTests(WebDaemonTestCase):
    """nghttp (nghttp2's client) and h2load: several streams on one connection, and under load."""

    def setUp(self) -> None:
        self.nghttp = requirePeer("nghttp", "nghttp2-client")
        self.h2load = requirePeer("h2load", "nghttp2-client")
        super().setUp()

    def test_streamsOnOneConnection(self) -> None:
        urls = [f"{self.base}/text.txt", f"{self.base}/data.bin", f"{self.base}/missing", f"{self.base}/"]
        result = self.run_([self.nghttp, "-n", "-s", "-v", *urls])
        out = result.stdout.decode("latin-1")
        self.assertEqual(result.returncode, 0, decoded(result))
        # One connection (one ACK of its SETTINGS from the server), four responses, each complete.
        self.assertEqual(out.count("recv SETTINGS frame <length=0, flags=0x01"), 1, out[-2000:])
        statuses = sorted(line.split(":status: ")[1] for line in out.splitlines() if ":status: " in line)
        self.assertEqual(statuses, ["200", "200", "200", "404"])
        self.assertEqual(out.count("; END_STREAM"), 4 + 4)  # our four HEADERS, their four last frames
        stats = " ".join(out.split())
        self.assertIn("200 16K /data.bin", stats)
        self.assertIn("404 169 /missing", stats)
        self.assertNotIn("PROTOCOL_ERROR", out)

    def test_bodiesMatch(self) -> None:
        out = Path(self.mktemp())
        out.mkdir()
        for name, data in (("text.txt", TEXT), ("data.bin", DATA)):
            result = self.run_([self.nghttp, f"{self.base}/{name}"])
            self.assertEqual(result.returncode, 0, decoded(result))
            self.assertEqual(result.stdout, data)

    def test_smallWindow(self) -> None:
        """A client window (2^10 bytes) much smaller than the file: flow control, not a stall."""
        result = self.run_([self.nghttp, "-w", "10", "-W", "10", f"{self.base}/text.txt"])
        self.assertEqual(result.returncode, 0, decoded(result))
        self.assertEqual(result.stdout, TEXT)

    def test_h2load(self) -> None:
        result = self.run_([self.h2load, "-n", "2000", "-c", "4", "-m", "10", "-t", "1", f"{self.base}/text.txt"])
        out = result.stdout.decode()
        self.assertIn("2000 succeeded, 0 failed, 0 errored", out, out[-1500:])
        self.assertIn("status codes: 2000 2xx", out)


class NghttpPythonEngineTests(NghttpTests):
    """The same with HTTP/2 on the fallback engine (h2)."""

    http2 = "python"


class OpenSSLTests(WebDaemonTestCase):
    def setUp(self) -> None:
        self.openssl = requirePeer("openssl", "openssl")
        super().setUp()

    def sClient(self, *options: str) -> subprocess.CompletedProcess:
        return self.run_(
            [
                self.openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{self.port}",
                "-servername",
                "localhost",
                "-CAfile",
                self.cafile,
                *options,
            ],
            input=b"",
        )

    def test_alpnH2(self) -> None:
        result = self.sClient("-alpn", "h2,http/1.1")
        self.assertIn("ALPN protocol: h2", decoded(result))
        self.assertIn("Verify return code: 0 (ok)", decoded(result))
        result = self.sClient("-alpn", "http/1.1")
        self.assertIn("ALPN protocol: http/1.1", decoded(result))

    def test_oldTLSRefused(self) -> None:
        for flag in ("-tls1", "-tls1_1"):
            result = self.sClient(flag, "-cipher", "DEFAULT@SECLEVEL=0")
            self.assertNotEqual(result.returncode, 0, decoded(result))
            self.assertIn("Cipher is (NONE)", decoded(result))
            self.assertIn("no peer certificate available", decoded(result))
        result = self.sClient("-tls1_2")
        self.assertEqual(result.returncode, 0, decoded(result))


class UrllibTests(WebDaemonTestCase):
    """Python's own HTTP client (HTTP/1.1)."""

    def open(self, path: str, method: str = "GET", headers: dict[str, str] | None = None):
        context = ssl.create_default_context(cafile=self.cafile)
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), urllib.request.ProxyHandler({})
        )
        request = urllib.request.Request(f"{self.base}{path}", method=method, headers=headers or {})
        return opener.open(request, timeout=IO_TIMEOUT)

    def test_headHasEmptyBody(self) -> None:
        with self.open("/text.txt", "HEAD") as r:
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers["Content-Length"], str(len(TEXT)))
            self.assertEqual(r.read(), b"")

    def test_identityGivesNoContentEncoding(self) -> None:
        with self.open("/text.txt", headers={"Accept-Encoding": "identity"}) as r:
            self.assertIsNone(r.headers["Content-Encoding"])
            self.assertEqual(r.read(), TEXT)

    def test_gzipWhenAsked(self) -> None:
        with self.open("/text.txt", headers={"Accept-Encoding": "gzip"}) as r:
            self.assertEqual(r.headers["Content-Encoding"], "gzip")
            self.assertEqual(gzip.decompress(r.read()), TEXT)

    def test_charset(self) -> None:
        for path, kind in [("/", "text/html; charset=utf-8"), ("/text.txt", "text/plain; charset=utf-8")]:
            with self.open(path) as r:
                self.assertEqual(r.headers["Content-Type"], kind)
                self.assertEqual(r.headers.get_content_charset(), "utf-8")


class BrowserChatOverHTTPSTests(unittest.TestCase):
    """
    Headless Chromium opens https://localhost:PORT/chat/ on the web service (the
    page, then its WebSocket over TLS, HTTP/1.1) and meets a TCP chat client.
    """

    timeout = 90

    def test_browserAndTCPClientOverTheWebService(self) -> Any:
        return self.browserChat("auto")

    def test_browserOverTheFallbackEngine(self) -> Any:
        return self.browserChat("python")

    @defer.inlineCallbacks
    def browserChat(self, http2: str) -> Any:
        from tests.interop.test_chat_browser import requireBrowser, say, waitForText

        requireBrowser()
        from tests.helpers import port
        from tests.web._support import startWeb, webPort

        daemon = startWeb(self, extra=f'    http2: {http2}\n  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        profile = Path(self.mktemp()).absolute()
        profile.mkdir(parents=True)

        def browser() -> Any:
            """test_chat_browser's headless Chromium, also trusting the self-signed test certificate."""
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service

            from tests.interop.test_chat_browser import CHROMEDRIVER, CHROMIUM

            os.environ.setdefault("SE_OFFLINE", "true")
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in (
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--ignore-certificate-errors",
                f"--user-data-dir={profile}",
            ):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
            driver.set_page_load_timeout(20)
            return driver

        driver = yield threads.deferToThread(browser)
        self.addCleanup(lambda: threads.deferToThread(driver.quit))
        yield threads.deferToThread(driver.get, f"https://localhost:{webPort(daemon, 0)}/chat/")
        yield threads.deferToThread(waitForText, driver, "welcome to netsvc chat")
        # The page came over HTTP/2 (ALPN h2); its WebSocket is HTTP/1.1 (no RFC 8441 here).
        protocol = yield threads.deferToThread(
            driver.execute_script, "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
        )
        self.assertEqual(protocol, "h2")

        from tests.chat.test_service import readUntil

        tcp = socket.create_connection(("127.0.0.1", port(daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        tcp.sendall(b"/nick terminal\nhello from a terminal\n")
        yield threads.deferToThread(waitForText, driver, "hello from a terminal")
        yield threads.deferToThread(say, driver, "/nick chromium")
        yield readUntil(tcp, b"is now known as chromium\n", timeout=10)
        yield threads.deferToThread(say, driver, "hello over https")
        got = yield readUntil(tcp, b"<chromium> hello over https\n", timeout=10)
        self.assertIn(b"<chromium> hello over https\n", got)
