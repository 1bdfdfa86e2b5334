"""Web benchmark: netsvc's web service side by side with ``twistd web`` (TLS) and nginx (1 worker).

Run from the repository root (Linux; Debian packages wrk, nghttp2-client, nginx-light -- see
scripts/install-test-peers):

    .venv/bin/python bench/web.py [--runs 3] [--duration 5] [--connections 50]

The three servers run at the same time on 127.0.0.1, each serving the same folder over TLS
(one self-signed certificate), each with access logging as shipped off:

* netsvc: ``twistd -n netsvc --config <tmp yaml>`` with only ``services.web`` (tls:PORT), HTTP/2 on
  the native engine (libnghttp2);
* netsvc h2 python: the same with ``http2: python`` (the fallback engine, h2), for the HTTP/2 10x10 rows
  (h2load -D does not finish when the first flight of 100x100 takes longer than the duration);
* netsvc workers 2: the same with ``workers: 2``, not pinned (both CPUs: the load tool shares CPU 1);
* twistd web: ``twistd -n web --path DIR --listen ssl:PORT:...`` (what ``twistd web --https`` does);
* nginx: one worker process, ``ssl http2``, sendfile, ``keepalive_requests 100000``, no access log.

Workloads, each repeated --runs times with the servers interleaved (medians reported):

* wrk (HTTP/1.1 over TLS, keep-alive, 1 thread, --connections connections): a 1 KB file and a 100 KB file;
* h2load (HTTP/2 over TLS, 1 thread): 10 connections x 10 streams for the 1 KB and the 100 KB file,
  100 connections x 100 streams for the 1 KB file.

With two or more CPUs the servers are pinned to CPU 0 and the load tools to CPU 1 (taskset).
Prints one markdown table on stdout (progress on stderr).  Every process started is killed at the
end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import free_port as freePort

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
TARGETS = (
    "targets: netsvc >= 2x twistd web and >= 0.15x nginx requests/s, 1 KB over HTTPS with keep-alive; "
    "HTTP/2 10x10 1 KB >= 0.3x nginx with one process, >= 0.5x with workers: 2"
)

NETSVC = """\
state_dir: {state}
log: {{level: warn}}
workers: {workers}
tls: {{cert: {cert}, key: {key}}}
services:
  web:
    listen: ["tls:{port}:interface=127.0.0.1"]
    root: {root}
    limits: {{max_connections: 20000, max_connections_per_ip: 20000}}
    http2: {http2}
"""

NGINX = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    types {{ text/plain txt; application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
    }}
}}
"""


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def waitForPort(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after {timeout:g}s")


def pin(cpu: int | str) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


class Server:
    def __init__(
        self, name: str, command: list[str], port: int, env: dict | None = None, cpus: str = "0", only: str = ""
    ) -> None:
        self.name = name
        self.cpus = cpus
        #: Runs only the workloads whose label contains this ("" = all).
        self.only = only
        self.command = command
        self.port = port
        self.env = env
        self.process: subprocess.Popen | None = None
        self.error = ""

    def start(self) -> None:
        try:
            self.process = subprocess.Popen(
                pin(self.cpus) + self.command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
            waitForPort(self.port, self.process)
        except (OSError, RuntimeError) as e:
            self.error = str(e)
            self.stop()

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wrk(port: int, path: str, duration: float, connections: int) -> float | None:
    out = subprocess.run(
        pin(1)
        + ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", f"https://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=duration + 30,
    )
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not m or "Non-2xx" in out.stdout:  # errors would make a fast-looking failure
        log(out.stdout[-500:], out.stderr[-500:])
        return None
    return float(m.group(1))


def h2load(port: int, path: str, duration: float, clients: int = 10, streams: int = 10) -> float | None:
    out = subprocess.run(
        pin(1)
        + [
            "h2load",
            "-D",
            str(int(duration)),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            f"https://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
    )
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out.stdout)
    ok = re.search(r"requests: .* (\d+) succeeded, (\d+) failed", out.stdout)
    if not m or not ok or int(ok.group(1)) == 0 or int(ok.group(2)) > int(ok.group(1)) // 100:
        log(out.stdout[-800:], out.stderr[-300:])
        return None
    return float(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    for tool in ("wrk", "h2load", "nginx"):
        if not shutil.which(tool) and not Path("/usr/sbin/" + tool).exists():
            log(f"{tool} not found: install with scripts/install-test-peers")

    tmp = Path(tempfile.mkdtemp(prefix="netsvc-bench-web-"))
    tmp.chmod(0o755)  # nginx's worker runs as another user and must read the files
    root = tmp / "www"
    root.mkdir()
    (root / "1k.txt").write_bytes(b"x" * 1023 + b"\n")
    (root / "100k.bin").write_bytes(os.urandom(100 * 1024))
    sys.path.insert(0, str(REPO))
    from netsvc.tls import generateSelfSigned

    cert, key = tmp / "cert.pem", tmp / "key.pem"
    generateSelfSigned(cert, key, ["localhost", "127.0.0.1"])

    env = dict(os.environ, PYTHONPATH=str(REPO))
    names = ("netsvc", "netsvc h2 python", "netsvc workers 2", "twistd web", "nginx")
    ports = {name: freePort() for name in names}
    configs = {"netsvc": ("native", 1), "netsvc h2 python": ("python", 1), "netsvc workers 2": ("native", 2)}
    for name, (engine, workers) in configs.items():
        (tmp / f"{name.replace(' ', '-')}.yaml").write_text(
            NETSVC.format(state=tmp / f"state-{name.replace(' ', '-')}", cert=cert, key=key, port=ports[name],
                          root=root, http2=engine, workers=workers)
        )
    (tmp / "nginx.conf").write_text(
        NGINX.format(tmp=tmp, port=ports["nginx"], cert=cert, key=key, root=root)
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    servers = [
        *(
            Server(
                name,
                [str(BIN / "twistd"), "-n", "--pidfile=", "netsvc", "--config",
                 str(tmp / f"{name.replace(' ', '-')}.yaml")],
                ports[name],
                env,
                cpus="0-1" if name == "netsvc workers 2" else "0",
                only="HTTP/2 10x10" if name == "netsvc h2 python" else "",
            )
            for name in configs
        ),
        Server(
            "twistd web",
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile=",
                # Its access log goes to stdout (discarded).  Not --logfile=/dev/null: twistd
                # rotates its log file every 1 MB by renaming it, which replaces /dev/null.
                "--logfile=-",
                "web",
                "--path",
                str(root),
                "--listen",
                f"ssl:{ports['twistd web']}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            ],
            ports["twistd web"],
            env,
        ),
        Server(
            "nginx",
            [nginx, "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")],
            ports["nginx"],
        ),
    ]
    workloads = [
        (
            "wrk HTTP/1.1 keep-alive, 1 KB (req/s)",
            lambda p: wrk(p, "/1k.txt", args.duration, args.connections),
        ),
        (
            "wrk HTTP/1.1 keep-alive, 100 KB (req/s)",
            lambda p: wrk(p, "/100k.bin", args.duration, args.connections),
        ),
        ("h2load HTTP/2 10x10 streams, 1 KB (req/s)", lambda p: h2load(p, "/1k.txt", args.duration)),
        ("h2load HTTP/2 10x10 streams, 100 KB (req/s)", lambda p: h2load(p, "/100k.bin", args.duration)),
        (
            "h2load HTTP/2 100x100 streams, 1 KB (req/s)",
            lambda p: h2load(p, "/1k.txt", args.duration, clients=100, streams=100),
        ),
    ]
    results: dict[tuple[str, str], list[float]] = {}
    #: Per run: {(label, server): value}, for ratios measured in the same run.
    perRun: list[dict[tuple[str, str], float]] = []
    try:
        for s in servers:
            s.start()
            log(f"{s.name}: {'listening on ' + str(s.port) if s.up else 'n/a: ' + s.error}")
        for run in range(args.runs):
            perRun.append({})
            for label, work in workloads:
                for s in servers:
                    if not s.up or s.only not in label:
                        continue
                    value = work(s.port)
                    log(f"run {run + 1} {label} {s.name}: {value}")
                    if value is not None:
                        results.setdefault((label, s.name), []).append(value)
                        perRun[-1][(label, s.name)] = value
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def median(label: str, name: str) -> float | None:
        values = results.get((label, name))
        return statistics.median(values) if values else None

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f}"

    def ratio(label: str, a: str, b: str) -> str:
        """The median over runs of the ratio measured within each run (the machine is noisy)."""
        ratios = [r[(label, a)] / r[(label, b)] for r in perRun if (label, a) in r and r.get((label, b))]
        return f"{statistics.median(ratios):.2f}x" if ratios else "n/a"

    others = [n for n in configs if n != "netsvc"]
    print(
        "| workload | twistd web | nginx (1 worker) | netsvc | netsvc / twistd web | netsvc / nginx | "
        + " | ".join(f"{n} | {n} / nginx" for n in others)
        + " |"
    )
    print("|---" * (6 + 2 * len(others)) + "|")
    for label, _ in workloads:
        t, n, s = median(label, "twistd web"), median(label, "nginx"), median(label, "netsvc")
        print(
            f"| {label} | {fmt(t)} | {fmt(n)} | {fmt(s)} | {ratio(label, 'netsvc', 'twistd web')} "
            f"| {ratio(label, 'netsvc', 'nginx')} | "
            + " | ".join(f"{fmt(median(label, o))} | {ratio(label, o, 'nginx')}" for o in others)
            + " |"
        )
    print(
        f"\nrequests/s: medians of {args.runs} runs of {args.duration:g} s "
        f"({args.connections} wrk connections); "
        f"ratios: medians of the ratios measured within each run; {TARGETS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
