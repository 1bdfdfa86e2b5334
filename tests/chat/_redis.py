"""
A real C{redis-server} for tests: on a free loopback port, no persistence, killed
with the test (cleanup, and C{PR_SET_PDEATHSIG} if the test process dies).
Skips the test, with the install hint, when redis-server is not installed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from tests.helpers import freePort
from tests.interop._daemon import _dieWithParent, requirePeer


class RedisServer:
    """C{redis-server} on 127.0.0.1:C{port}; L{stop} and L{start} again to simulate an outage."""

    def __init__(self, testCase, *extra: str) -> None:
        self.extra = list(extra)
        self.binary = requirePeer("redis-server", "redis-server")
        self.port = freePort()
        self.process: subprocess.Popen | None = None
        testCase.addCleanup(self.stop)
        self.start()

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--loglevel", "warning", *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.command(b"PING") in (b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n"):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited with status {self.process.returncode}")
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """SIGKILL (an outage, not a clean shutdown) and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def command(self, *words: bytes) -> bytes:
        """One command over a new connection (RESP), the raw reply; b"" if Redis is not answering."""
        request = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(request)
                return s.recv(65536)
        except OSError:
            return b""
