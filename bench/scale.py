#!/usr/bin/env python3
"""
Scaling benchmark: the same netsvc daemon with `workers: 1` and `workers: 2`, in one run.

Run from the repository root (Linux; needs gcc, wrk, dnsperf, dnsmasq, redis-server):

    .venv/bin/python bench/scale.py [--runs 3] [--seconds 5] [--clients 1000]

Two daemons run side by side (the one not being measured is idle): each serves
echo (tcp), dns (udp, answers from its cache; upstream: a dnsmasq authoritative
for bench.test), web (a 1 KB file over TLS) and forward (to forwardload's
backend), one with `workers: 1`, one with `workers: 2`.  A caching dnsmasq
forwarding to the same upstream is measured in the same runs.  The load
generators are C programs (bench/echoload.c, bench/forwardload.c, wrk, dnsperf)
so that the daemon, not the client, runs out of CPU first -- but on a 2-core
machine they share the cores with the daemon.  Nothing is pinned: two workers
need both cores.

  echo     round trips/s, 100 connections each with 32 bytes in flight (echoload)
  dns      queries/s from the cache (dnsperf, 200 outstanding from 8 sockets, 202 names)
  web      requests/s, 1 KB over HTTPS keep-alive (wrk -t1 -c50)
  forward  new connections/s (forwardload, 8 threads: connect, 1 byte, read to EOF)
  CPU/req  the daemon's CPU (parent + workers, user + system) per request, in microseconds

Chat: deliveries/s and p99 latency (bench/chatload.c) with 1,000 clients in one
room: one process (`workers: 1`, no fan-out) against two processes over Redis
(`workers: 2`, fanout: redis; the kernel splits the clients between them).
Redis's own CPU is reported beside.

Runs are interleaved (w1, w2, w1, w2 ...); medians of --runs are reported with the
median of the per-run ratios.  The machine's load average is printed with the
table: on a shared machine the ratios are what was seen, not what the code can do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, free_port, free_udp_tcp_port, log

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent

DAEMON = """\
state_dir: {state}
log: {{level: warn}}
workers: {workers}
drain_timeout: 1s
tls: {{cert: {cert}, key: {key}}}
services:
  echo:
    listen: ["tcp:{echo}:interface=127.0.0.1"]
    limits: {{max_connections: 20000, max_connections_per_ip: 20000}}
  dns:
    listen: ["udp:{dns}:interface=127.0.0.1"]
    upstreams: ["udp://127.0.0.1:{upstream}"]
  web:
    listen: ["tls:{web}:interface=127.0.0.1"]
    root: {root}
    limits: {{max_connections: 20000, max_connections_per_ip: 20000}}
  forward:
    rules:
      - name: bench
        listen: ["tcp:{forward}:interface=127.0.0.1:backlog=4096"]
        connect: ["tcp:host=127.0.0.1:port={backend}"]
        max_connections: 100000
"""

CHAT = """\
state_dir: {state}
log: {{level: warn}}
workers: {workers}
drain_timeout: 1s
services:
  chat:
    listen: ["tcp:{port}:interface=127.0.0.1:backlog=4096"]
    limits: {{max_connections: 20000, max_connections_per_ip: 20000, rate: 1000, burst: 1000, idle_timeout: 1h}}
    history: 0
{fanout}"""


def dns_answers(port: int) -> bool:
    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x02h0\x05bench\x04test\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(query, ("127.0.0.1", port))
            return len(s.recv(4096)) > 12
        except OSError:
            return False


class Children:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        out = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.work,
                             env=env)
        self.procs.append(p)
        return p

    def stopAll(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Daemon:
    """A netsvc started with twistd; its pids (parent + workers) from status.json."""

    def __init__(self, children: Children, name: str, config: Path, state: Path) -> None:
        self.name = name
        self.state = state
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = children.start(name, [str(BIN / "twistd"), "-n", "--pidfile=", "netsvc", "--config",
                                          str(config)], env)
        deadline = time.monotonic() + 90
        while True:
            try:
                status = json.loads((state / "status.json").read_text())
                if status["pid"] == self.proc.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{(children.work / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)
        self.workers = [w["pid"] for w in status.get("workers", [])] or [self.proc.pid]
        self.pids = [self.proc.pid] + [p for p in self.workers if p != self.proc.pid]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def workerCPU(self) -> list[float]:
        return [cpu_seconds(p) for p in self.workers]


def measured(daemon: Daemon | None, pid: int | None, fn) -> tuple[float, float, float]:
    """
    (requests/s, CPU microseconds per request, the busiest worker's share of the
    workers' CPU) of fn() -> (requests, seconds).
    """
    before = daemon.cpu() if daemon else cpu_seconds(pid)
    split = daemon.workerCPU() if daemon else []
    count, seconds = fn()
    used = (daemon.cpu() if daemon else cpu_seconds(pid)) - before
    shares = [after - b for after, b in zip(daemon.workerCPU(), split)] if daemon else []
    busiest = max(shares) / sum(shares) if shares and sum(shares) > 0 else 1.0
    return count / seconds, (used / count * 1e6) if count else float("nan"), busiest


def echo(loadgen: str, port: int, seconds: float) -> tuple[float, float]:
    out = subprocess.run([loadgen, "127.0.0.1", str(port), "100", str(seconds), "1"], capture_output=True,
                         text=True, timeout=seconds + 60).stdout
    m = re.search(r"roundtrips=(\d+) seconds=([\d.]+)", out)
    if not m:
        raise RuntimeError(f"echoload: {out}")
    return float(m.group(1)), float(m.group(2))


def dnsperf(port: int, queries: Path, seconds: float) -> tuple[float, float]:
    out = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-q", "200", "-t", "3",
                          "-c", "8", "-l", str(seconds)], capture_output=True, text=True, timeout=seconds + 60).stdout
    completed = re.search(r"Queries completed:\s+(\d+)", out)
    elapsed = re.search(r"Run time \(s\):\s+([\d.]+)", out)
    if not completed or not elapsed:
        raise RuntimeError(f"dnsperf: {out}")
    return float(completed.group(1)), float(elapsed.group(1))


def wrk(port: int, seconds: float) -> tuple[float, float]:
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{int(seconds)}s", f"https://127.0.0.1:{port}/1k.txt"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not m or "Non-2xx" in out:
        raise RuntimeError(f"wrk: {out}")
    return float(m.group(1)), float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)


def forward(loadgen: str, port: int, seconds: float) -> tuple[float, float]:
    out = subprocess.run([loadgen, "127.0.0.1", str(port), "8", str(int(seconds))], capture_output=True, text=True,
                         timeout=seconds + 60).stdout.split()
    return float(out[0]), float(out[2])


def chat(loadgen: str, port: int, daemon: Daemon, clients: int, seconds: float) -> dict[str, float]:
    pids = ",".join(str(p) for p in daemon.workers)
    argv = [loadgen, "127.0.0.1", str(port), pids, str(clients), "8", "16", str(seconds), "1", "20", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400 + seconds * 2)
    if done.returncode != 0:
        raise RuntimeError(f"chatload: {done.stderr.strip()[-500:]}")
    return {k: float(v) for k, v in (item.split("=") for item in done.stdout.split())}


def quiet(daemon: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = daemon.cpu()
        time.sleep(0.5)
        if daemon.cpu() - before < 0.03:
            return


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=1000, help="chat clients (0: skip chat)")
    parser.add_argument("--only", choices=("all", "stateless", "chat"), default="all")
    args = parser.parse_args()
    for tool in ("gcc", "wrk", "dnsperf", "dnsmasq", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install with scripts/install-test-peers")
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    work = Path(tempfile.mkdtemp(prefix="netsvc-bench-scale-"))
    children = Children(work)
    try:
        tools = {}
        for name, flags in (("echoload", []), ("forwardload", ["-pthread"]), ("chatload", [])):
            tools[name] = str(work / name)
            subprocess.run(["gcc", "-O2", *flags, "-o", tools[name], str(HERE / f"{name}.c")], check=True)
        (work / "empty.conf").write_text("")
        root = work / "www"
        root.mkdir()
        (root / "1k.txt").write_bytes(b"x" * 1023 + b"\n")
        sys.path.insert(0, str(REPO))
        from netsvc.tls import generateSelfSigned

        cert, key = work / "cert.pem", work / "key.pem"
        generateSelfSigned(cert, key, ["localhost", "127.0.0.1"])

        upstream, backend, cacheport = free_udp_tcp_port(), free_port(), free_udp_tcp_port()
        dnsmasq = ["dnsmasq", "-k", f"--conf-file={work}/empty.conf", "--listen-address=127.0.0.1",
                   "--bind-interfaces", "--no-resolv", "--no-hosts", "--user=root"]
        children.start("upstream", dnsmasq + [f"--port={upstream}", f"--pid-file={work}/up.pid",
                                              "--local-ttl=3600", "--address=/bench.test/192.0.2.1"])
        cache = children.start("dnsmasq", dnsmasq + [f"--port={cacheport}", f"--pid-file={work}/cache.pid",
                                                     f"--server=127.0.0.1#{upstream}", "--cache-size=100000",
                                                     "--dns-forward-max=1000"])
        children.start("backend", [tools["forwardload"], "serve", str(backend), "4"])
        daemons: dict[int, Daemon] = {}
        ports: dict[int, dict[str, int]] = {}
        for w in (1, 2):
            ports[w] = {"echo": free_port(), "dns": free_udp_tcp_port(), "web": free_port(), "forward": free_port()}
            state = work / f"state-w{w}"
            config = work / f"w{w}.yaml"
            config.write_text(DAEMON.format(state=state, workers=w, cert=cert, key=key, root=root,
                                            upstream=upstream, backend=backend, **ports[w]))
            daemons[w] = Daemon(children, f"netsvc-w{w}", config, state)
        for port in (ports[1]["dns"], ports[2]["dns"], cacheport):
            deadline = time.monotonic() + 20
            while not dns_answers(port) and time.monotonic() < deadline:
                time.sleep(0.2)
        queries = work / "queries.txt"
        queries.write_text("".join(f"h{i}.bench.test A\n" for i in range(202)))
        for port in (ports[1]["dns"], ports[2]["dns"], cacheport):  # warm the caches
            dnsperf(port, queries, 1)

        log(f"load average before: {loadavg()}")
        rows: dict[str, dict[int, list]] = {"echo": {}, "dns": {}, "web": {}, "forward": {}}
        dnsmasqRuns: list[float] = []
        for run in range(args.runs if args.only != "chat" else 0):
            for w in (1, 2):
                d = daemons[w]
                p = ports[w]
                for name, fn in (("echo", lambda p=p: echo(tools["echoload"], p["echo"], args.seconds)),
                                 ("dns", lambda p=p: dnsperf(p["dns"], queries, args.seconds)),
                                 ("web", lambda p=p: wrk(p["web"], args.seconds)),
                                 ("forward", lambda p=p: forward(tools["forwardload"], p["forward"], args.seconds))):
                    quiet(d)
                    rate, cpu, busiest = measured(d, None, fn)
                    rows[name].setdefault(w, []).append((rate, cpu, busiest))
                    log(f"run {run + 1} workers: {w} {name}: {rate:,.0f}/s, {cpu:.0f} us CPU per request, "
                        f"busiest worker {busiest:.0%} of the workers' CPU (load {loadavg()})")
            rate, cpu, _ = measured(None, cache.pid, lambda: dnsperf(cacheport, queries, args.seconds))
            dnsmasqRuns.append(rate)
            log(f"run {run + 1} dnsmasq: {rate:,.0f}/s, {cpu:.0f} us CPU per query")
        after = loadavg()
        for d in daemons.values():
            d.proc.terminate()
            d.proc.wait(30)

        chatRows: dict[str, list[dict[str, float]]] = {}
        redisCPU: list[float] = []
        if args.clients and args.only != "stateless":
            rport = free_port()
            redis = children.start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save",
                                             "", "--appendonly", "no", "--loglevel", "warning"])
            time.sleep(0.5)
            chats = {}
            for label, w, fanout in (("1 process", 1, ""), ("2 processes over Redis", 2,
                                     f'    fanout: {{redis: "tcp:host=127.0.0.1:port={rport}"}}\n')):
                port = free_port()
                state = work / f"chat-w{w}"
                config = work / f"chat-w{w}.yaml"
                config.write_text(CHAT.format(state=state, workers=w, port=port, fanout=fanout))
                chats[label] = (Daemon(children, f"chat-w{w}", config, state), port)
            for run in range(args.runs):
                for label, (d, port) in chats.items():
                    quiet(d)
                    r0 = cpu_seconds(redis.pid)
                    result = chat(tools["chatload"], port, d, args.clients, args.seconds)
                    if "2 processes" in label:
                        redisCPU.append((cpu_seconds(redis.pid) - r0) / (args.seconds * 2 + 1) * 100)
                    chatRows.setdefault(label, []).append(result)
                    log(f"run {run + 1} chat {label}: {result['deliveries_per_s']:,.0f} deliveries/s, "
                        f"p99 {result['p99_ms']:.1f} ms, server CPU {result['server_cpu_pct']:.0f}%, "
                        f"closed {result['closed']:.0f}")
        report(rows, dnsmasqRuns, chatRows, redisCPU, args, after)
    finally:
        children.stopAll()
        shutil.rmtree(work, ignore_errors=True)


def report(rows, dnsmasqRuns, chatRows, redisCPU, args, after) -> None:
    med = statistics.median
    print(f"\nworkers: 1 vs workers: 2, medians of {args.runs} runs of {args.seconds:g} s, runs interleaved; "
          f"{os.cpu_count()} CPUs shared with the load generators (and other users: load average at the end "
          f"{after})\n")
    print("| workload | workers: 1 | workers: 2 | ratio (2/1) | CPU/req w1 (us) | CPU/req w2 (us) | CPU ratio "
          "| w2: busiest worker's CPU share |")
    print("|---|---|---|---|---|---|---|---|")
    units = {"echo": "round trips/s (100 conns)", "dns": "cached queries/s", "web": "HTTPS 1 KB req/s (wrk -c50)",
             "forward": "new connections/s (8 threads)"}
    for name, per in rows.items():
        if not per:
            continue
        one, two = per[1], per[2]
        ratio = med(b[0] / a[0] for a, b in zip(one, two))
        cpuRatio = med(b[1] / a[1] for a, b in zip(one, two))
        print(f"| {name}: {units[name]} | {med(r[0] for r in one):,.0f} | {med(r[0] for r in two):,.0f} | "
              f"{ratio:.2f}x | {med(r[1] for r in one):.0f} | {med(r[1] for r in two):.0f} | {cpuRatio:.2f} | "
              f"{med(r[2] for r in two):.0%} |")
    if dnsmasqRuns and rows["dns"]:
        d = med(dnsmasqRuns)
        print(f"| dnsmasq (cache), same runs | {d:,.0f} | | w1 {med(r[0] for r in rows['dns'][1]) / d:.2f}x, "
              f"w2 {med(r[0] for r in rows['dns'][2]) / d:.2f}x of dnsmasq | | | | |")
    if chatRows:
        print(f"\nchat, {args.clients} clients in one room (8 senders x 16 in flight; latency at 20 msg/s), "
              f"medians of {args.runs} runs\n")
        print("| chat | deliveries/s | p50 ms | p99 ms | server CPU % | clients closed |")
        print("|---|---|---|---|---|---|")
        for label, runs in chatRows.items():
            print(f"| {label} | {med(r['deliveries_per_s'] for r in runs):,.0f} | {med(r['p50_ms'] for r in runs):.1f}"
                  f" | {med(r['p99_ms'] for r in runs):.1f} | {med(r['server_cpu_pct'] for r in runs):.0f} | "
                  f"{med(r['closed'] for r in runs):.0f} |")
        if redisCPU:
            print(f"\nredis-server CPU during the 2-process runs: {med(redisCPU):.0f}% of one core")


if __name__ == "__main__":
    main()
