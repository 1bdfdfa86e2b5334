#!/usr/bin/env python3
"""
Scaling benchmark: the same netsvc daemon with `workers: 1` and `workers: 2`, in one run.

Run from the repository root (Linux; needs gcc, wrk, dnsperf, dnsmasq, redis-server):

    .venv/bin/python bench/scale.py [--runs 3] [--seconds 5] [--clients 1000]

Five daemons run side by side (those not being measured are idle), each serving
echo (tcp), dns (udp, answers from its cache; upstream: a dnsmasq authoritative
for bench.test), web (a 1 KB file over TLS) and forward (to forwardload's
backend): one with `workers: 1`; one with `workers: 2` and `cpu_affinity: auto`
(workers pinned, connections steered to the worker on their CPU); one with
`workers: 2` and `cpu_affinity: off` (the default: hashed by address); and the
control -- two separate `workers: 1` daemons with the load split between them,
which is what two processes get from this machine with nothing shared.  A
caching dnsmasq forwarding to the same upstream is measured in the same runs.
The load generators are C programs (bench/echoload.c, bench/forwardload.c, wrk,
dnsperf), two processes per run each with half the concurrency, so that the
daemon, not one client thread, runs out of CPU first -- but on a 2-core machine
they share the cores with the daemon.

  echo     round trips/s, 100 connections each with 32 bytes in flight (echoload)
  dns      queries/s from the cache (dnsperf, 200 outstanding from 8 sockets, 202 names)
  web      requests/s, 1 KB over HTTPS keep-alive (wrk, 50 connections)
  forward  new connections/s (forwardload, 8 threads: connect, 1 byte, read to EOF)
  CPU/req  the daemon's CPU (parent + workers, user + system) per request, in microseconds,
           and the load generators' (the forward backend's is not counted)
  ceiling  2d / (d + c): with d and c the daemon's and the load generators' CPU per
           request (workers: 1), the ratio two workers would reach if they and the
           load generators used both cores fully and nothing else cost more -- a
           second worker cannot add more than the client leaves it.

Chat: deliveries/s and p99 latency (bench/chatload.c) with 1,000 clients in one
room: one process (`workers: 1`, no fan-out) against two processes over Redis
(`workers: 2`, fanout: redis; the kernel splits the clients between them).
Redis's own CPU is reported beside.

Runs are interleaved (w1, w2, w2 off, control, w1 ...); medians of --runs are reported with the
median of the per-run ratios.  The machine's load average is printed with the
table: on a shared machine the ratios are what was seen, not what the code can do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
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
cpu_affinity: {affinity}
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


class Group:
    """One or more daemons measured together: CPU summed, each worker (or daemon) a share."""

    def __init__(self, daemons: list[Daemon]) -> None:
        self.daemons = daemons

    def cpu(self) -> float:
        return sum(d.cpu() for d in self.daemons)

    def workerCPU(self) -> list[float]:
        return [c for d in self.daemons for c in d.workerCPU()]

    def quiet(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu()
            time.sleep(0.5)
            if self.cpu() - before < 0.03 * len(self.daemons):
                return

    def stop(self) -> None:
        for d in self.daemons:
            d.proc.terminate()
        for d in self.daemons:
            d.proc.wait(30)


def clientCPU() -> float:
    """CPU seconds (user + system) of the load generators run so far (waited-for children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(daemon: Daemon | Group | None, pid: int | None, fn) -> tuple[float, float, float, float]:
    """
    (requests/s, CPU microseconds per request, the busiest worker's share of the
    workers' CPU, the load generator's CPU microseconds per request) of fn() -> (requests, seconds).
    """
    before = daemon.cpu() if daemon else cpu_seconds(pid)
    split = daemon.workerCPU() if daemon else []
    client = clientCPU()
    count, seconds = fn()
    used = (daemon.cpu() if daemon else cpu_seconds(pid)) - before
    client = clientCPU() - client
    shares = [after - b for after, b in zip(daemon.workerCPU(), split)] if daemon else []
    busiest = max(shares) / sum(shares) if shares and sum(shares) > 0 else 1.0
    per = (lambda seconds: seconds / count * 1e6) if count else (lambda seconds: float("nan"))
    return count / seconds, per(used), busiest, per(client)


class Load:
    """
    One workload's load generator, run as C{CLIENTS} processes at once, each with
    its share of the concurrency: (argv for one process, parser of its output
    -> (requests, seconds)).  Several processes so that the client is never one
    thread pinned to one core while the daemon has two, and so that the control
    (two separate daemons) can get one process each.
    """

    def __init__(self, argv, parse) -> None:
        self.argv = argv
        self.parse = parse

    def __call__(self, ports: list[int], seconds: float) -> tuple[float, float]:
        procs = [subprocess.Popen(self.argv(port, seconds), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for port in ports]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 60)
            results.append(self.parse(out, err))
        return sum(r[0] for r in results), max(r[1] for r in results)


#: Client processes per workload; each gets 1/CLIENTS of the concurrency below.
CLIENTS = 2


def loads(tools: dict[str, str], queries: Path) -> dict[str, Load]:
    def echo(out, err):
        m = re.search(r"roundtrips=(\d+) seconds=([\d.]+)", out)
        if not m:
            raise RuntimeError(f"echoload: {out} {err}")
        return float(m.group(1)), float(m.group(2))

    def dnsperf(out, err):
        completed = re.search(r"Queries completed:\s+(\d+)", out)
        elapsed = re.search(r"Run time \(s\):\s+([\d.]+)", out)
        if not completed or not elapsed:
            raise RuntimeError(f"dnsperf: {out} {err}")
        return float(completed.group(1)), float(elapsed.group(1))

    def wrk(out, err):
        m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
        if not m or "Non-2xx" in out:
            raise RuntimeError(f"wrk: {out} {err}")
        return float(m.group(1)), float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)

    def forward(out, err):
        fields = out.split()
        return float(fields[0]), float(fields[2])

    n = CLIENTS
    return {
        "echo": Load(lambda port, sec: [tools["echoload"], "127.0.0.1", str(port), str(100 // n), str(sec), "1"], echo),
        "dns": Load(lambda port, sec: ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-q",
                                       str(200 // n), "-t", "3", "-c", str(8 // n), "-l", str(sec)], dnsperf),
        "web": Load(lambda port, sec: ["wrk", "-t1", f"-c{50 // n}", f"-d{int(sec)}s",
                                       f"https://127.0.0.1:{port}/1k.txt"], wrk),
        "forward": Load(lambda port, sec: [tools["forwardload"], "127.0.0.1", str(port), str(8 // n), str(int(sec))],
                        forward),
    }


def chat(loadgen: str, port: int, daemon: Daemon, clients: int, seconds: float) -> dict[str, float]:
    pids = ",".join(str(p) for p in daemon.workers)
    argv = [loadgen, "127.0.0.1", str(port), pids, str(clients), "8", "16", str(seconds), "1", "20", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400 + seconds * 2)
    if done.returncode != 0:
        raise RuntimeError(f"chatload: {done.stderr.strip()[-500:]}")
    return {k: float(v) for k, v in (item.split("=") for item in done.stdout.split())}


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
        # Four setups: workers: 1; workers: 2 with cpu_affinity: auto; workers: 2 with
        # cpu_affinity: off (the default); and the control -- two separate workers: 1 daemons with the load split
        # between them: what two processes get from this machine with nothing shared.
        setups: dict[str, Group] = {}
        ports: dict[str, dict[str, list[int]]] = {}
        for setup, workers, count, pinned in (("w1", 1, 1, "off"), ("w2", 2, 1, "auto"), ("w2 off", 2, 1, "off"),
                                              ("control", 1, 2, "off")):
            group = []
            for i in range(count):
                own = {"echo": free_port(), "dns": free_udp_tcp_port(), "web": free_port(), "forward": free_port()}
                state = work / f"state-{setup}-{i}"
                config = work / f"{setup}-{i}.yaml"
                config.write_text(DAEMON.format(state=state, workers=workers, affinity=pinned, cert=cert, key=key,
                                                root=root, upstream=upstream, backend=backend, **own))
                group.append((Daemon(children, f"netsvc-{setup}-{i}", config, state), own))
            setups[setup] = Group([d for d, _ in group])
            # the CLIENTS load generator processes: all on one daemon, or one on each of the control's
            ports[setup] = {name: [group[i % count][1][name] for i in range(CLIENTS)] for name in group[0][1]}
        dnsPorts = [p for per in ports.values() for p in per["dns"]] + [cacheport]
        for port in dnsPorts:
            deadline = time.monotonic() + 20
            while not dns_answers(port) and time.monotonic() < deadline:
                time.sleep(0.2)
        queries = work / "queries.txt"
        queries.write_text("".join(f"h{i}.bench.test A\n" for i in range(202)))
        workloads = loads(tools, queries)
        for port in set(dnsPorts):  # warm the caches
            workloads["dns"]([port], 1)

        log(f"load average before: {loadavg()}")
        rows: dict[str, dict[str, list]] = {"echo": {}, "dns": {}, "web": {}, "forward": {}}
        dnsmasqRuns: list[tuple[float, float, float]] = []
        for run in range(args.runs if args.only != "chat" else 0):
            for setup, group in setups.items():
                for name, load in workloads.items():
                    group.quiet()
                    rate, cpu, busiest, client = measured(
                        group, None, lambda load=load, at=ports[setup][name]: load(at, args.seconds))
                    rows[name].setdefault(setup, []).append((rate, cpu, busiest, client))
                    log(f"run {run + 1} {setup} {name}: {rate:,.0f}/s, {cpu:.1f} us CPU per request, "
                        f"busiest process {busiest:.0%} of the daemon's CPU, load generators {client:.1f} us "
                        f"per request (load {loadavg()})")
            rate, cpu, _, client = measured(None, cache.pid,
                                            lambda: workloads["dns"]([cacheport] * CLIENTS, args.seconds))
            dnsmasqRuns.append((rate, cpu, client))
            log(f"run {run + 1} dnsmasq: {rate:,.0f}/s, {cpu:.1f} us CPU per query, dnsperf {client:.1f} us")
        after = loadavg()
        for group in setups.values():
            group.stop()

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
                    Group([d]).quiet()
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


#: The fields of one measurement (see L{measured}).
RATE, CPU, BUSIEST, LOAD = range(4)


def _median(runs: list[tuple], field: int) -> float:
    return statistics.median(r[field] for r in runs)


def _ratio(base: list[tuple], runs: list[tuple], field: int = RATE) -> float:
    """The median of the per-run ratios of C{runs} to C{base} (runs interleaved: same-run pairs)."""
    return statistics.median(b[field] / a[field] for a, b in zip(base, runs))


def report(rows, dnsmasqRuns, chatRows, redisCPU, args, after) -> None:
    med = statistics.median
    print(f"\nworkers: 1 vs workers: 2 (cpu_affinity: auto, and off) vs two separate workers: 1 daemons (control), "
          f"medians of {args.runs} runs of {args.seconds:g} s, runs interleaved; {CLIENTS} load generator processes "
          f"per run; {os.cpu_count()} CPUs shared with the load generators (load average at the end {after})\n")
    print("| workload | workers: 1 | workers: 2, cpu_affinity: auto | **ratio** | workers: 2, off (ratio) "
          "| control: 2 x workers: 1 (ratio) | CPU/req w1, w2, w2 off, control (us) | CPU ratio w2/w1 "
          "| load generators' CPU/req (us) | ceiling | w2: busiest worker's share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    units = {"echo": "round trips/s (100 conns)", "dns": "cached queries/s", "web": "HTTPS 1 KB req/s (wrk, 50 conns)",
             "forward": "new connections/s (8 threads)"}
    for name, per in rows.items():
        if not per:
            continue
        one = per["w1"]
        daemonCPU, loadCPU = _median(one, CPU), _median(one, LOAD)
        # Two cores shared by the daemon and its load generators: at best 2 / (d + c)
        # requests/s, against 1 / d for one process on a core of its own.
        ceiling = 2 * daemonCPU / (daemonCPU + loadCPU)
        print(f"| {name}: {units[name]} | {_median(one, RATE):,.0f} | {_median(per['w2'], RATE):,.0f} | "
              f"**{_ratio(one, per['w2']):.2f}x** | {_median(per['w2 off'], RATE):,.0f} "
              f"({_ratio(one, per['w2 off']):.2f}x) | {_median(per['control'], RATE):,.0f} "
              f"({_ratio(one, per['control']):.2f}x) | "
              f"{', '.join(f'{_median(per[s], CPU):.1f}' for s in ('w1', 'w2', 'w2 off', 'control'))} | "
              f"{_ratio(one, per['w2'], CPU):.2f} | {loadCPU:.1f} | {ceiling:.2f}x | "
              f"{_median(per['w2'], BUSIEST):.0%} |")
    if dnsmasqRuns and rows["dns"]:
        d = med(r[0] for r in dnsmasqRuns)
        print(f"| dnsmasq (cache), same runs | {d:,.0f} | | | | | {med(r[1] for r in dnsmasqRuns):.1f} | | "
              f"{med(r[2] for r in dnsmasqRuns):.1f} | | |")
        print(f"\nDNS against dnsmasq (same runs): workers: 1 {med(r[0] for r in rows['dns']['w1']) / d:.2f}x, "
              f"workers: 2 {med(r[0] for r in rows['dns']['w2']) / d:.2f}x")
    print("\nceiling: 2d / (d + c) with d, c the daemon's and the load generators' CPU per request with "
          "workers: 1 -- what two workers would reach if they and the load generators used both cores fully.")
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
