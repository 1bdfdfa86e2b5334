"""
Run the real daemon (C{twistd -n netsvc ...}) as a child process, and talk to it
with plain blocking sockets.

The daemon is the source tree's: the child's C{PYTHONPATH} starts with the
repository root, so C{netsvc} and C{twisted/plugins/netsvc_plugin.py} come from
here, not from whatever is installed.  It reports the ports it bound in
C{<state_dir>/status.json}, so tests listen on port 0 and read the ports back.

Every wait here is bounded.  The child never outlives the test: L{startTwistd}
registers a cleanup that kills it, and on Linux the kernel kills it too if the
test process itself dies (C{PR_SET_PDEATHSIG}).

Blocking calls are fine in these tests (plain synchronous test methods): the
child is a separate process, and trial's reactor is not involved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import SkipTest

#: The repository root (this file is tests/interop/_daemon.py).
REPO = Path(__file__).resolve().parents[2]

#: How long the daemon may take to bind and write status.json, and to exit after SIGTERM.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
#: Any one client exchange (connect, send, receive) with the daemon or a peer program.
IO_TIMEOUT = 10.0


# -- the child process -----------------------------------------------------------


def twistdCommand() -> list[str]:
    """The twistd of the Python running the tests (the C{twistd} script next to it)."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def childEnvironment() -> dict[str, str]:
    """The environment for a child: the source tree first on its path, unbuffered output."""
    env = dict(os.environ)
    paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _dieWithParent() -> None:
    """In the child, before exec: ask Linux to SIGKILL us when the test process dies."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux: the addCleanup kill is all there is
        pass


class Daemon:
    """
    A running C{twistd} child.  C{status} is its parsed C{status.json}; all its
    output (stdout and stderr) goes to a file, read with L{output}.
    """

    def __init__(self, process: subprocess.Popen, stateDir: Path, logPath: Path, logFile: Any) -> None:
        self.process = process
        self.stateDir = Path(stateDir)
        self.logPath = logPath
        self._logFile = logFile
        self.status: dict[str, Any] = {}

    @property
    def statusPath(self) -> Path:
        return self.stateDir / "status.json"

    @property
    def cafile(self) -> str:
        """The generated self-signed certificate (C{tls.cert: auto}): what clients trust."""
        return str(self.stateDir / "tls" / "selfsigned.pem")

    def output(self) -> str:
        """Everything the child has printed so far."""
        return self.logPath.read_text(errors="replace")

    def listener(self, key: str) -> dict[str, Any]:
        """The status entry for config key C{key} (e.g. C{services.echo.listen[0]})."""
        for entry in self.status.get("listeners", []):
            if entry["key"] == key:
                return entry
        raise AssertionError(f"no listener {key!r} in status.json: {self.status!r}")

    def port(self, key: str) -> int:
        return int(self.listener(key)["port"])

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            self.process.send_signal(signum)

    def waitForExit(self, timeout: float) -> int | None:
        """The exit status, or None if still running after C{timeout} seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def waitForOutput(self, text: str, timeout: float) -> bool:
        """Whether C{text} appears in the output within C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if not self.running():
                return text in self.output()
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """
        SIGTERM, and wait up to C{timeout} seconds; SIGKILL if it is still running.

        @return: the exit status (negative: killed by that signal).
        """
        self.signal(signal.SIGTERM)
        status = self.waitForExit(timeout)
        if status is None:
            self.kill()
            status = self.process.returncode
        return status

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def cleanup(self) -> None:
        """After the test: make sure the child is gone (SIGTERM, then SIGKILL); never raises."""
        try:
            if self.running():
                self.stop(timeout=5)
        finally:
            self.kill()
            if not self._logFile.closed:
                self._logFile.close()


def startTwistd(testCase: Any, twistdArgs: Sequence[str], stateDir: str | Path,
                cwd: str | Path | None = None, timeout: float = START_TIMEOUT) -> Daemon:
    """
    Start C{twistd -n --pidfile= TWISTDARGS...} (in C{cwd}, default the
    repository root) and wait until it has written C{stateDir/status.json}
    (all its listeners bound); a relative C{stateDir} is relative to C{cwd}.

    @raise testCase.failureException: the daemon exited, or did not report in
        C{timeout} seconds (its output is in the message).
    """
    logPath = Path(testCase.mktemp() + ".log")
    logFile = open(logPath, "wb")
    command = twistdCommand() + ["-n", "--pidfile=", *twistdArgs]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=logFile, stderr=subprocess.STDOUT,
        cwd=str(cwd or REPO), env=childEnvironment(),
        preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None)
    daemon = Daemon(process, Path(cwd or REPO, stateDir), logPath, logFile)
    testCase.addCleanup(daemon.cleanup)

    deadline = time.monotonic() + timeout
    while True:
        status = _readStatus(daemon.statusPath)
        # A status.json left by another (killed) daemon names another pid.
        if status is not None and status.get("pid") == process.pid:
            daemon.status = status
            return daemon
        if process.poll() is not None:
            raise testCase.failureException(
                f"{' '.join(command)} exited with status {process.returncode} before reporting "
                f"its listeners; output:\n{daemon.output()}")
        if time.monotonic() > deadline:
            daemon.kill()
            raise testCase.failureException(
                f"{' '.join(command)} wrote no {daemon.statusPath} in {timeout:g}s; "
                f"output:\n{daemon.output()}")
        time.sleep(0.05)


def startNetsvc(testCase: Any, config: str | Path, stateDir: str | Path, cwd: str | Path | None = None,
                timeout: float = START_TIMEOUT) -> Daemon:
    """
    C{twistd -n netsvc --config CONFIG --state-dir STATEDIR}, started and
    reporting (L{startTwistd}).  Relative paths are relative to C{cwd} (the
    repository root by default): resolve C{mktemp()} paths first.
    """
    return startTwistd(testCase, ["netsvc", "--config", str(config), "--state-dir", str(stateDir)],
                       stateDir, cwd=cwd, timeout=timeout)


def _readStatus(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return None


def runToCompletion(testCase: Any, command: Sequence[str], cwd: str | Path | None = None,
                    timeout: float = START_TIMEOUT, input: bytes = b"") -> subprocess.CompletedProcess:
    """
    Run a command that is expected to exit by itself (e.g. twistd with a bad
    configuration) in the tests' environment; fail the test if it takes longer
    than C{timeout}.  Output is text; stdout and stderr are kept apart.
    """
    try:
        return subprocess.run(list(command), input=input, capture_output=True, cwd=str(cwd or REPO),
                              env=childEnvironment(), timeout=timeout,
                              preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        raise testCase.failureException(
            f"{' '.join(command)} did not exit within {timeout:g}s; output:\n"
            f"{_text(e.stdout)}{_text(e.stderr)}") from None


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def decoded(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished command, as one text."""
    return _text(result.stdout) + _text(result.stderr)


# -- peers -----------------------------------------------------------------------


def requirePeer(program: str, package: str) -> str:
    """The path of C{program}, or skip the test with the install hint."""
    path = shutil.which(program)
    if path is None:
        raise SkipTest(f"{program} not found: install with scripts/install-test-peers "
                       f"(Debian package {package})")
    return path


def ipv6LoopbackWorks() -> bool:
    """Whether this machine can bind ::1 (some containers have no IPv6)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- plain blocking clients --------------------------------------------------------


def recvExactly(sock: socket.socket, count: int) -> bytes:
    """Read until C{count} bytes have arrived (fewer only if the peer closes first)."""
    chunks: list[bytes] = []
    got = 0
    while got < count:
        chunk = sock.recv(count - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def tcpEcho(host: str, port: int, message: bytes) -> bytes:
    """One round trip over a new TCP connection (IPv4 or IPv6 from C{host})."""
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as s:
        s.sendall(message)
        return recvExactly(s, len(message))


def udpEcho(host: str, port: int, message: bytes, tries: int = 3) -> bytes:
    """One datagram round trip; re-sent (C{tries} times in all) if the answer is lost."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(IO_TIMEOUT / tries)
        s.connect((host, port))
        for _ in range(tries):
            s.send(message)
            try:
                return s.recv(65535)
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP echo from {host}:{port} after {tries} tries")


def tlsContext(cafile: str) -> ssl.SSLContext:
    """A client context that trusts only C{cafile} and checks the server's name."""
    return ssl.create_default_context(cafile=cafile)


def tlsEcho(host: str, port: int, message: bytes, cafile: str, serverHostname: str = "localhost") -> bytes:
    """One round trip over a new, verified TLS connection."""
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as raw:
        with tlsContext(cafile).wrap_socket(raw, server_hostname=serverHostname) as s:
            s.sendall(message)
            return recvExactly(s, len(message))
