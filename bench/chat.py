"""Chat benchmark: netsvc chat side by side with a minimal asyncio broadcast chat server.

Run from the repository root (Linux, needs gcc):

    .venv/bin/python bench/chat.py [--runs 3] [--clients 1000] [--idle 5000]

The two servers run at the same time on 127.0.0.1, each in its own process:

* netsvc: ``twistd -n --pidfile= netsvc --config <tmp yaml>`` with only the chat service (line
  framing, history 0, limits high enough for the load), PYTHONPATH set to this source tree;
* asyncio: bench/chat_asyncio.py, each line broadcast with one ``writer.write`` per client.

Both are driven by bench/chatload.c (compiled here with ``gcc -O2``, one thread, epoll). Each run
and server, it connects --clients clients to the one room (everyone starts in netsvc's #lobby),
waits until all of them receive a message (a barrier), then:

* deliveries/s: --senders of the clients send as fast as the room takes it, each with at most
  --window messages not yet received by every client (so the rate is sustained, not buffer
  filling); messages received, summed over all clients, in --duration s after a --warmup s warm-up.
* latency: --rate messages/s in all (20) for --latency-duration s; each message carries its
  CLOCK_MONOTONIC send time and every client's receipt gives one latency; p50 and p99 of all.
* KB per client: growth of the server's VmRSS from before the first connect to after the barrier,
  divided by --clients, measured on a freshly started server (run 1); then, with --idle > 0, both
  servers are restarted and the same is done with --idle clients that only connect.

netsvc gathers what each client is sent in one reactor turn into one write, so its deliveries/s
grows with the messages in flight (--senders x --window, 128 by default); the baseline's, one send
per message and client, does not. netsvc's flood limit (rate: 1000 in the config) allows each sender
1,000 messages/s: more shows up below the table as kicks.

Runs are repeated --runs times with the servers interleaved; medians are reported. With two or
more CPUs the servers share one CPU and the load generator gets another. Between two loads the
script waits until the previous server has closed every connection and gone quiet.

Prints one markdown table on stdout (progress goes to stderr), then the targets and what was
seen (server CPU, clients the server closed, missing messages, netsvc's kick/drop counters). If a
server cannot be started its column says n/a and a line gives the reason. Every process started is
killed at the end, also on Ctrl-C.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from _common import ServerProcess, Unavailable, cpu_seconds, fd_count, free_port, log, prepare, stop, wait_for

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv's bin: python and twistd
TARGETS = ("targets: netsvc >= 1x the asyncio baseline's deliveries/s; p99 < 100 ms at 20 msg/s into a "
           "1,000-client room; memory per client reported")

NETSVC_CONFIG = """\
state_dir: {state_dir}
log: {{level: warn}}
metrics: {{listen: ["tcp:{metrics_port}:interface=127.0.0.1"]}}
services:
  chat:
    listen: ["tcp:{port}:interface=127.0.0.1"]
    limits: {{max_connections: {max_conn}, max_connections_per_ip: {max_conn},
              rate: 1000, burst: 1000, idle_timeout: 1h}}
    history: 0
"""


@dataclass
class Server(ServerProcess):
    env: dict | None = None
    metrics_port: int | None = None
    base_fds: int = 0
    runs: list[dict] = field(default_factory=list)  # loadgen results, one per run
    idle: dict | None = None  # loadgen result of the idle-clients measurement


def says_back(port, timeout=2.0):
    """Connect, say a line, and read until it comes back as a room message."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"ping\n")
        got, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline and len(got) < 65536:
            chunk = s.recv(65536)
            if not chunk:
                return False
            got += chunk
            if any(line.startswith(b"<") and line.endswith(b"> ping") for line in got.split(b"\n")):
                return True
    return False


def start(server, cpus):
    stop(server)
    with server.log.open("ab") as out:
        server.proc = subprocess.Popen(server.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       cwd=HERE.parent, env=server.env,
                                       preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def answering():
        try:
            return says_back(server.port)
        except OSError:
            return False

    wait_for(server, answering, 30, f"did not answer a chat line on port {server.port}")
    time.sleep(0.3)  # let the check connection close
    server.base_fds = fd_count(server.proc.pid)




def quiesce(server, timeout=120):
    """Wait until the server has closed the last load's connections and uses (almost) no CPU."""
    pid = server.proc.pid
    wait_for(server, lambda: fd_count(pid) <= server.base_fds, timeout,
             "did not close the clients' connections")
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        before = cpu_seconds(pid)
        time.sleep(0.3)
        if cpu_seconds(pid) - before <= 0.03:
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"still busy {timeout} s after its clients left")


def run_load(server, loadgen, args, cpus, clients, senders):
    """One chatload run against server; its key=value line as a dict."""
    tput, lat = (args.duration, args.latency_duration) if senders else (0, 0)
    argv = [loadgen, "127.0.0.1", str(server.port), str(server.proc.pid), str(clients), str(senders),
            str(args.window), str(tput), str(args.warmup), str(args.rate), str(lat)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=240 + clients / 50 + args.warmup + tput + lat,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    except subprocess.TimeoutExpired:
        raise Unavailable("load generator timed out") from None
    for line in done.stderr.strip().splitlines():
        log(f"  {server.name:>8}: {line}")
    if done.returncode != 0:
        server.check_alive()
        raise Unavailable(done.stderr.strip() or f"load generator exited {done.returncode}")
    result = {k: float(v) for k, v in (item.split("=") for item in done.stdout.split())}
    result["kb_per_client"] = (result["rss_after_kb"] - result["rss_before_kb"]) / clients
    return result


def measure_run(server, loadgen, args, cpus):
    r = run_load(server, loadgen, args, cpus, args.clients, args.senders)
    server.runs.append(r)
    log(f"  {server.name:>8}: {r['deliveries_per_s']:,.0f} deliveries/s "
        f"(server CPU {r['server_cpu_pct']:.0f}%, load generator {r['gen_cpu_pct']:.0f}%); "
        f"at {args.rate:g} msg/s p50 {r['p50_ms']:.2f} ms, "
        f"p99 {r['p99_ms']:.2f} ms, {r['lat_got']:.0f}/{r['lat_expected']:.0f} delivered; "
        f"RSS {r['rss_before_kb']:.0f} -> {r['rss_after_kb']:.0f} KB; connect {r['connect_s']:.1f} s; "
        f"closed {r['closed']:.0f}, gaps {r['gaps']:.0f}")


def measure_idle(server, loadgen, args, cpus):
    r = run_load(server, loadgen, args, cpus, args.idle, 0)
    server.idle = r
    log(f"  {server.name:>8}: RSS {r['rss_before_kb']:.0f} -> {r['rss_after_kb']:.0f} KB with {args.idle} "
        f"idle clients, {r['kb_per_client']:.2f} KB each (connect + barrier {r['connect_s']:.1f} s)")


def netsvc_counters(server):
    """netsvc's chat kick and drop counters (from its /metrics), as {'name{labels}': value}."""
    if server.metrics_port is None or server.proc is None or server.proc.poll() is not None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    pattern = re.compile(r"^(netsvc_chat_(?:kicks|dropped)_total\{[^}]*\}|netsvc_limit\S*) (\S+)$", re.M)
    return {m[1]: float(m[2]) for m in pattern.finditer(text) if float(m[2])}


def table(servers, args):
    def median(server, key):
        return statistics.median(r[key] for r in server.runs) if server.runs and not server.error else None

    def first(server, key):
        return server.runs[0][key] if server.runs and not server.error else None

    rows = [(f"deliveries/s, {args.clients:,} clients, {args.senders} senders x {args.window} in flight "
             f"(median of {args.runs})", lambda s: median(s, "deliveries_per_s"), "{:,.0f}"),
            (f"p50 latency ms at {args.rate:g} msg/s", lambda s: median(s, "p50_ms"), "{:.2f}"),
            (f"p99 latency ms at {args.rate:g} msg/s", lambda s: median(s, "p99_ms"), "{:.2f}"),
            (f"KB per client ({args.clients:,} in the room, fresh server)",
             lambda s: first(s, "kb_per_client"), "{:.2f}")]
    if args.idle:
        rows.append((f"KB per idle client ({args.idle:,}, fresh server)",
                     lambda s: s.idle["kb_per_client"] if s.idle and not s.error else None, "{:.2f}"))
    lines = ["| workload | asyncio baseline | netsvc | netsvc/asyncio |", "|---|--:|--:|--:|"]
    for label, get, fmt in rows:
        a, n = values = [get(s) for s in servers]
        cells = [fmt.format(v) if v is not None else "n/a" for v in values]
        cells.append(f"{n / a:.2f}x" if n is not None and a else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", TARGETS]
    asy, net = servers
    d_a, d_n, p99 = median(asy, "deliveries_per_s"), median(net, "deliveries_per_s"), median(net, "p99_ms")
    verdict = []
    if d_n is not None and d_a:
        verdict.append(f"deliveries/s {d_n / d_a:.2f}x asyncio: {'met' if d_n >= d_a else 'NOT met'}")
    if p99 is not None:
        if args.clients >= 1000 and args.rate >= 20:
            verdict.append(f"p99 {p99:.1f} ms: {'met' if p99 < 100 else 'NOT met'}")
        else:
            verdict.append(f"p99 {p99:.1f} ms, not the target's load "
                           f"({args.clients} clients, {args.rate:g} msg/s)")
    if verdict:
        lines.append("netsvc: " + "; ".join(verdict))
    lines.append("")
    for s in servers:
        if s.error:
            lines.append(f"{s.name}: not available: {s.error}")
            continue
        if not s.runs:
            continue
        cpu = ", ".join(f"{r['server_cpu_pct']:.0f}%" for r in s.runs)
        gen = ", ".join(f"{r['gen_cpu_pct']:.0f}%" for r in s.runs)
        keys = ("closed", "gaps", "dups", "kick_notices", "tput_left")
        trouble = {k: sum(r[k] for r in s.runs) for k in keys}
        missing = sum(r["lat_expected"] - r["lat_got"] for r in s.runs)
        lines.append(f"{s.name}: server CPU during the deliveries/s runs {cpu} (load generator {gen}); "
                     f"clients closed by the server {trouble['closed']:.0f}, messages missing "
                     f"{trouble['gaps'] + missing:.0f}, duplicated {trouble['dups']:.0f}, kick notices "
                     f"{trouble['kick_notices']:.0f}, undelivered after the throughput drain "
                     f"{trouble['tput_left']:.0f}")
    counters = getattr(servers[1], "counters", None)
    if counters is not None:
        lines.append("netsvc kick/drop counters: " +
                     (", ".join(f"{k} {v:.0f}" for k, v in counters.items()) if counters else "none"))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per server (default 3)")
    parser.add_argument("--clients", type=int, default=1000, help="clients in the room (default 1000)")
    parser.add_argument("--senders", type=int, default=8,
                        help="clients sending in the throughput run (default 8)")
    parser.add_argument("--window", type=int, default=16,
                        help="messages per sender not yet received by every client (default 16)")
    parser.add_argument("--duration", type=float, default=5, help="seconds of the throughput run (default 5)")
    parser.add_argument("--warmup", type=float, default=1, help="seconds before it is measured (default 1)")
    parser.add_argument("--rate", type=float, default=20, help="messages/s of the latency run (default 20)")
    parser.add_argument("--latency-duration", type=float, default=5,
                        help="seconds of the latency run (default 5)")
    parser.add_argument("--idle", type=int, default=5000,
                        help="idle clients for memory, 0 to skip (default 5000)")
    args = parser.parse_args()
    if not (1 <= args.senders <= args.clients and args.window >= 1 and args.runs >= 1 and args.rate > 0
            and 0 < args.duration <= 600 and 0 < args.latency_duration <= 600 and args.idle >= 0):
        parser.error("bad arguments")

    # the load generator's and the servers' sockets
    server_cpus, load_cpus = prepare(parser, 2 * max(args.clients, args.idle) + 200)

    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        tmp = Path(tmp)
        loadgen = str(tmp / "chatload")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", loadgen, str(HERE / "chatload.c")], check=True)
        (tmp / "state").mkdir()
        ports = [free_port() for _ in range(3)]
        config = tmp / "netsvc.yaml"
        config.write_text(NETSVC_CONFIG.format(state_dir=tmp / "state", port=ports[1], metrics_port=ports[2],
                                               max_conn=max(5000, args.clients, args.idle) + 16))
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        servers = [
            Server("asyncio", [sys.executable, str(HERE / "chat_asyncio.py"), str(ports[0])], ports[0],
                   tmp / "asyncio.log"),
            Server("netsvc", [str(BIN / "twistd"), "-n", "--pidfile=", "netsvc", "--config", str(config)],
                   ports[1], tmp / "netsvc.log", env=env, metrics_port=ports[2]),
        ]

        try:
            log(f"starting servers on ports {ports[:2]}")
            for server in servers:
                server.attempt(start, server_cpus)
            for run in range(args.runs):
                log(f"{args.clients} clients, run {run + 1}/{args.runs}")
                for server in servers[run % 2:] + servers[:run % 2]:
                    for other in servers:  # the last load's departures must be over on the shared CPU
                        other.attempt(quiesce)
                    server.attempt(measure_run, loadgen, args, load_cpus)
            for server in servers:
                server.attempt(quiesce)
            servers[1].counters = netsvc_counters(servers[1]) if not servers[1].error else None
            if args.idle:
                log(f"idle memory, {args.idle} clients, fresh servers")
                for server in servers:
                    stop(server)
                for server in servers:
                    server.attempt(start, server_cpus)
                    server.attempt(quiesce)
                    server.attempt(measure_idle, loadgen, args, load_cpus)
                    stop(server)  # its clients' departure must not load the other's measurement
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            for server in servers:
                stop(server)
        print(table(servers, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
