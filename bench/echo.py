"""Echo benchmark: netsvc echo side by side with a bare Twisted Echo and a minimal asyncio echo.

Run from the repository root (Linux, needs gcc):

    .venv/bin/python bench/echo.py [--runs 3] [--duration 5] [--connections 100] [--idle 10000]

The three servers run at the same time on 127.0.0.1, each in its own process:

* netsvc: ``twistd -n --pidfile= netsvc --config <tmp yaml>`` with only the echo service;
* twisted Echo: ``twisted.protocols.wire.Echo`` on the epoll reactor, nothing else;
* asyncio: ``asyncio.start_server`` on the default event loop, read(65536) -> write -> drain.

Workloads:

* round trips/s: bench/echoload.c (compiled here with ``gcc -O2``) keeps --connections connections,
  each sending 32 bytes and waiting for all of them to come back; --duration seconds after a 1 s
  warm-up. Repeated --runs times with the servers interleaved; medians are reported. With two or
  more CPUs the servers share one CPU and the load generator gets another.
* KB per idle connection: growth of the server's VmRSS once --idle idle connections have been
  accepted (counted in /proc/PID/fd, then checked with a round trip), divided by --idle.

Prints one markdown table on stdout (progress goes to stderr). If netsvc cannot be started its
column says n/a and a line below the table gives the reason. Every process started is killed at
the end, also on Ctrl-C.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import ServerProcess, Unavailable, fd_count, free_port, log, prepare, proc_status_kb, stop, wait_for

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv's bin: python and twistd
TARGETS = "targets: netsvc >= 0.9x twisted Echo and >= 1x asyncio round trips/s; < 20 KB per idle connection"

TWISTED_ECHO = """
import sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.wire import Echo
reactor.listenTCP(int(sys.argv[1]), Factory.forProtocol(Echo), interface="127.0.0.1")
reactor.run()
"""

ASYNCIO_ECHO = """
import asyncio, sys
async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""

NETSVC_CONFIG = """\
state_dir: {state_dir}
log: {{level: warn}}
services:
  echo:
    listen: ["tcp:{port}:interface=127.0.0.1"]
    limits: {{max_connections: 20000, max_connections_per_ip: 20000}}
"""


@dataclass
class Server(ServerProcess):
    runs: list[dict] = field(default_factory=list)  # loadgen results, one per run
    kb_per_idle: float | None = None


def round_trip(sock, payload=b"x" * 32):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise Unavailable("server closed a connection")
        got += chunk
    if got != payload:
        raise Unavailable("echo did not match what was sent")


def start(server, cpus):
    with server.log.open("wb") as out:
        server.proc = subprocess.Popen(server.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       cwd=HERE.parent, preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def accepting():
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
                round_trip(s)
            return True
        except OSError:
            return False

    wait_for(server, accepting, 20, f"did not echo on port {server.port}")




def measure_round_trips(server, loadgen, args, cpus):
    server.check_alive()
    argv = [loadgen, "127.0.0.1", str(server.port), str(args.connections), str(args.duration), "1"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    except subprocess.TimeoutExpired:
        raise Unavailable("load generator timed out") from None
    if done.returncode != 0:
        server.check_alive()
        raise Unavailable(done.stderr.strip() or f"load generator exited {done.returncode}")
    result = {k: float(v) for k, v in (item.split("=") for item in done.stdout.split())}
    server.runs.append(result)
    log(f"  {server.name:>12}: {result['rate']:,.0f} round trips/s, "
        f"p50 {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs")


def measure_idle_memory(server, count, batch=40):
    """Record the server's RSS growth per idle connection, in KB. The connections are opened in
    batches smaller than any listen backlog, each batch waited for in the server's /proc/PID/fd."""
    pid = server.proc.pid
    fds_before, rss_before = fd_count(pid), proc_status_kb(pid)
    socks = []
    try:
        while len(socks) < count:
            for _ in range(min(batch, count - len(socks))):
                socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            wait_for(server, lambda: fd_count(pid) >= fds_before + len(socks), 20,
                     f"accepted fewer than {len(socks)} idle connections")
        time.sleep(0.5)
        round_trip(socks[0])
        round_trip(socks[-1])
        rss_after = proc_status_kb(pid)
    finally:
        for s in socks:
            s.close()
    wait_for(server, lambda: fd_count(pid) <= fds_before, 30, "did not close the idle connections")
    server.kb_per_idle = (rss_after - rss_before) / count
    log(f"  {server.name:>12}: RSS {rss_before} KB -> {rss_after} KB with {count} idle connections, "
        f"{server.kb_per_idle:.2f} KB each")


def table(servers, args):
    def median(server, key):
        return statistics.median(r[key] for r in server.runs) if server.runs and not server.error else None

    rows = [(f"round trips/s, {args.connections} connections (median of {args.runs})",
             lambda s: median(s, "rate"), "{:,.0f}"),
            ("p50 latency µs", lambda s: median(s, "p50_us"), "{:.0f}"),
            ("p99 latency µs", lambda s: median(s, "p99_us"), "{:.0f}"),
            (f"KB per idle connection ({args.idle})", lambda s: None if s.error else s.kb_per_idle, "{:.2f}")]
    lines = ["| workload | asyncio | twisted Echo | netsvc | netsvc/twisted | netsvc/asyncio |",
             "|---|--:|--:|--:|--:|--:|"]
    for label, get, fmt in rows:
        values = [get(s) for s in servers]
        cells = [fmt.format(v) if v is not None else "n/a" for v in values]
        a, t, n = values
        for peer in (t, a):
            cells.append(f"{n / peer:.2f}x" if n is not None and peer else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", TARGETS]
    lines += [f"{s.name}: not available: {s.error}" for s in servers if s.error]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="round-trip runs per server (default 3)")
    parser.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    parser.add_argument("--connections", type=int, default=100, help="concurrent connections (default 100)")
    parser.add_argument("--idle", type=int, default=10000, help="idle connections (default 10000)")
    args = parser.parse_args()

    server_cpus, load_cpus = prepare(parser, args.idle + 100)

    with tempfile.TemporaryDirectory(prefix="bench-echo-") as tmp:
        tmp = Path(tmp)
        loadgen = str(tmp / "echoload")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", loadgen, str(HERE / "echoload.c")], check=True)
        (tmp / "state").mkdir()
        ports = [free_port() for _ in range(3)]
        config = tmp / "netsvc.yaml"
        config.write_text(NETSVC_CONFIG.format(state_dir=tmp / "state", port=ports[2]))
        servers = [
            Server("asyncio", [sys.executable, "-c", ASYNCIO_ECHO, str(ports[0])], ports[0],
                   tmp / "asyncio.log"),
            Server("twisted Echo", [sys.executable, "-c", TWISTED_ECHO, str(ports[1])], ports[1],
                   tmp / "twisted.log"),
            Server("netsvc", [str(BIN / "twistd"), "-n", "--pidfile=", "netsvc", "--config", str(config)],
                   ports[2], tmp / "netsvc.log"),
        ]

        try:
            log(f"starting servers on ports {ports}")
            for server in servers:
                server.attempt(start, server_cpus)
            log(f"idle memory, {args.idle} connections")
            for server in servers:
                server.attempt(measure_idle_memory, args.idle)
            for run in range(args.runs):
                log(f"round trips, run {run + 1}/{args.runs}")
                for server in servers[run % 3:] + servers[:run % 3]:
                    server.attempt(measure_round_trips, loadgen, args, load_cpus)
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
