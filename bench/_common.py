"""What the benchmark scripts share: server processes, /proc readings, ports, waiting."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """A server could not be started, or stopped answering."""


@dataclass
class ServerProcess:
    """A server under test, run as a child process whose output goes to C{log}."""

    name: str
    argv: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    error: str | None = None  # why this server is not available

    def exit_reason(self):
        """None while the process runs; else its status and the last line it printed."""
        if self.proc is None or self.proc.poll() is None:
            return None
        lines = self.log.read_text(errors="replace").strip().splitlines() or ["no output"]
        return f"exited with status {self.proc.returncode}: {lines[-1].strip()}"

    def check_alive(self):
        if reason := self.exit_reason():
            raise Unavailable(reason)

    def attempt(self, step, *args) -> None:
        """Run C{step(self, *args)} unless this server already failed; a failure marks it unavailable."""
        if self.error is None:
            try:
                step(self, *args)
            except (Unavailable, OSError) as e:
                self.error = self.exit_reason() or str(e)  # a crash explains more
                log(f"  {self.name:>12}: not available: {self.error}")


def stop(server: ServerProcess) -> None:
    if server.proc and server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(5)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (a DNS server listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def proc_status_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise Unavailable(f"no {key} in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(server: ServerProcess, condition, timeout: float, what: str, step: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        server.check_alive()
        if time.monotonic() > deadline:
            raise Unavailable(f"{what} within {timeout} s")
        time.sleep(step)


def prepare(parser, fds: int) -> tuple[set[int], set[int]]:
    """
    Raise the open-files limit to the hard limit (children inherit it; C{fds} are
    needed), make SIGTERM run the callers' cleanup, and split the CPUs: the
    servers on the last one, the load generator on the first (CPU sets returned).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and fds > hard:
        parser.error(f"{fds} file descriptors needed, more than the hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the callers' finally clauses
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[-1]}, {cpus[0]}) if len(cpus) > 1 else (set(cpus), set(cpus))
