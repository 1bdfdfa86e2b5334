"""Port forwarding benchmark: netsvc forward side by side with socat and `twistd portforward`.

Run from the repository root (Linux; needs iperf3, socat and gcc):

    .venv/bin/python bench/forward.py [--runs 3] [--duration 3] [--threads 8] [--concurrent 1000]

Everything listens on 127.0.0.1, each forwarder in its own process, all started at once:

* netsvc: ``twistd -n --pidfile= netsvc --config <tmp yaml>`` with one forward rule (log level warn);
* socat: ``socat TCP-LISTEN:P,fork,reuseaddr TCP:127.0.0.1:BACKEND`` (a process per connection);
* twistd portforward: ``twistd -n --pidfile= portforward -p P -h 127.0.0.1 -d BACKEND``.

Workloads (each repeated --runs times, forwarders interleaved, medians reported):

* bulk: ``iperf3 -c ... -t DURATION`` to one ``iperf3 -s``, directly and through each forwarder
  (Gbit/s received);
* new connections/s: bench/forwardload.c (built here with gcc -O2), THREADS blocking clients each
  connecting, sending one byte and reading until the backend (forwardload's serve mode: blocking
  threads that echo one byte and close) closes;
* CPU per connection: the forwarder's user+system CPU time during the connections/s test divided by
  the connections made (socat: including its reaped children) -- less sensitive than rates to what
  else runs on the machine; its ratio columns are peer / netsvc (higher is better for netsvc);
* memory: VmRSS growth of netsvc and twistd portforward with --concurrent forwarded connections
  held open (socat forks a process per connection; not measured).

Prints one markdown table on stdout; progress goes to stderr.  Every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
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
TARGETS = "targets: bulk >= 1.0x socat; connections/s >= 1.5x twistd portforward"

BACKEND = """
import asyncio, sys
async def handle(reader, writer):
    data = await reader.read(1)
    if data and sys.argv[2] == "close":
        writer.write(data)
        await writer.drain()
        writer.close()
        return
    await reader.read()   # hold: until the client goes
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

procs: list[subprocess.Popen] = []


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def start(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def waitPort(port: int, timeout: float = 15) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def netsvc(port: int, backend: int, state: Path) -> subprocess.Popen:
    config = state / "forward.yaml"
    config.write_text(
        f"state_dir: {state}\nlog: {{level: warn}}\nservices:\n  forward:\n    rules:\n"
        f'      - name: bench\n        listen: ["tcp:{port}:interface=127.0.0.1:backlog=4096"]\n'
        f'        connect: ["tcp:host=127.0.0.1:port={backend}"]\n        max_connections: 100000\n'
    )
    return start([str(BIN / "twistd"), "-n", "--pidfile=", "netsvc", "--config", str(config)], env=env())


def socat(port: int, backend: int) -> subprocess.Popen:
    return start(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096", f"TCP:127.0.0.1:{backend}"]
    )


def portforward(port: int, backend: int) -> subprocess.Popen:
    return start(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "portforward",
            "-p",
            f"tcp:{port}:interface=127.0.0.1:backlog=4096",
            "-h",
            "127.0.0.1",
            "-d",
            str(backend),
        ],
        env=env(),
    )


def iperf(port: int, seconds: float, name: str = "direct") -> float:
    """iperf3's received Gbit/s; retried twice (the server takes one test at a time and may still
    be finishing the previous one)."""
    for _attempt in range(3):
        try:
            return _iperf(port, seconds)
        except RuntimeError as e:
            log(f"iperf3 via {name}: {e}; retrying")
            time.sleep(1)
    return _iperf(port, seconds)


def _iperf(port: int, seconds: float) -> float:
    time.sleep(0.3)
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(data["error"])
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def connRate(load: Path, port: int, threads: int, seconds: float) -> tuple[float, int]:
    out = subprocess.run(
        [str(load), "127.0.0.1", str(port), str(threads), str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    done, errors, elapsed = out.stdout.split()
    return int(done) / float(elapsed), int(errors)


def cpuSeconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (socat's forks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def memory(pid: int, port: int, n: int) -> float:
    """KiB of RSS growth per forwarded connection with n held open."""
    before = rss(pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.send(b"h")
            socks.append(s)
        time.sleep(1.0)
        after = rss(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=1000)
    args = ap.parse_args()

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load = Path(tempfile.mkdtemp()) / "forwardload"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(load), str(HERE / "forwardload.c")], check=True)
    state = Path(tempfile.mkdtemp())
    iperfPort, closePort, holdPort = freePort(), freePort(), freePort()
    start(["iperf3", "-s", "-p", str(iperfPort)])
    start([str(load), "serve", str(closePort), "4"])
    start([sys.executable, "-c", BACKEND, str(holdPort), "hold"])
    names = ["netsvc", "socat", "twistd portforward"]
    makers = {
        "netsvc": netsvc,
        "socat": lambda p, b, s: socat(p, b),
        "twistd portforward": lambda p, b, s: portforward(p, b),
    }
    bulk: dict[str, list[float]] = {"direct": [], **{n: [] for n in names}}
    rate: dict[str, list[float]] = {n: [] for n in names}
    ports: dict[str, dict[str, int]] = {}
    pids: dict[str, int] = {}
    closePids: dict[str, int] = {}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        ports[name] = {"iperf": freePort(), "close": freePort(), "hold": freePort()}
        for kind, backend in (("iperf", iperfPort), ("close", closePort), ("hold", holdPort)):
            sub = state / f"{name.replace(' ', '_')}_{kind}"
            sub.mkdir()
            p = makers[name](ports[name][kind], backend, sub)
            if kind == "hold":
                pids[name] = p.pid
            if kind == "close":
                closePids[name] = p.pid
    for port in [iperfPort, closePort, holdPort] + [p for d in ports.values() for p in d.values()]:
        waitPort(port)
    log("all started")
    for run in range(args.runs):
        bulk["direct"].append(iperf(iperfPort, args.duration))
        for name in names:
            bulk[name].append(iperf(ports[name]["iperf"], args.duration, name))
            before = cpuSeconds(closePids[name])
            r, errors = connRate(load, ports[name]["close"], args.threads, args.duration)
            spent = cpuSeconds(closePids[name]) - before
            rate[name].append(r)
            cpu[name].append(1e6 * spent / max(1.0, r * args.duration))
            log(f"run {run + 1}: {name}: {bulk[name][-1]:.2f} Gbit/s, {r:.0f} conn/s ({errors} errors)")
            time.sleep(0.5)
    mem = {}
    for name in ("netsvc", "twistd portforward"):
        try:
            mem[name] = memory(pids[name], ports[name]["hold"], args.concurrent)
        except OSError as e:
            log(f"memory {name}: {e}")
    med = {k: statistics.median(v) for k, v in bulk.items()}
    rmed = {k: statistics.median(v) for k, v in rate.items()}
    print(f"\n{TARGETS}; medians of {args.runs} runs, {os.cpu_count()} CPUs\n")
    print(
        "| workload | direct | socat | twistd portforward | netsvc | netsvc / socat | netsvc / portforward |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| iperf3 bulk, Gbit/s ({args.duration:g} s) | {med['direct']:.2f} | {med['socat']:.2f} | "
        f"{med['twistd portforward']:.2f} | {med['netsvc']:.2f} | {med['netsvc'] / med['socat']:.2f}x | "
        f"{med['netsvc'] / med['twistd portforward']:.2f}x |"
    )
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"| forwarder CPU per new connection, us (ratio: peer / netsvc) | - | {cmed['socat']:.0f} | "
        f"{cmed['twistd portforward']:.0f} | {cmed['netsvc']:.0f} | "
        f"{cmed['socat'] / cmed['netsvc']:.2f}x | {cmed['twistd portforward'] / cmed['netsvc']:.2f}x |"
    )
    print(
        f"| new connections/s ({args.threads} clients) | - | {rmed['socat']:.0f} | "
        f"{rmed['twistd portforward']:.0f} | {rmed['netsvc']:.0f} | {rmed['netsvc'] / rmed['socat']:.2f}x | "
        f"{rmed['netsvc'] / rmed['twistd portforward']:.2f}x |"
    )
    if mem:
        print(
            f"| KiB per forwarded connection ({args.concurrent} open) | - | n/a (a process each) | "
            f"{mem.get('twistd portforward', 0):.1f} | {mem.get('netsvc', 0):.1f} | - | "
            f"{mem.get('netsvc', 0) / max(mem.get('twistd portforward', 1), 0.01):.2f}x |"
        )


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
