#!/usr/bin/env python3
"""
DNS benchmark: dnsperf against netsvc, `twistd dns --cache` and dnsmasq, all
three forwarding to the same upstream data (a dnsmasq authoritative for
bench.test on 127.0.0.77:53 -- port 53 because `twistd dns` can only forward to
port 53), in one run.

  cached: every server answers the same query file from its cache (after a warm
          pass), dnsperf for --seconds per run, --runs runs, servers interleaved.
  cold:   a file of names never asked before (new names each run and server),
          each resolved once through the upstream.

Prints a markdown table of medians (queries/s, average latency) and the medians
of the per-run ratios of netsvc to each peer.  Needs dnsperf and dnsmasq (scripts/install-test-peers).

    .venv/bin/python bench/dns.py [--runs 3] [--seconds 5] [--names 200] [--cold-names 5000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import free_udp_tcp_port as freePort

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = "127.0.0.77"


def answers(host: str, port: int, name: str = "h0.bench.test") -> bool:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(query, (host, port))
            return len(s.recv(4096)) > 12
        except OSError:
            return False


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], host: str, port: int, env=None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd=self.workdir, env=env)
        self.children.append(p)
        deadline = time.monotonic() + 20
        while not answers(host, port):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{(self.workdir / f'{name}.log').read_text()}")
            time.sleep(0.2)
        return p

    def stopAll(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.children:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def dnsperf(port: int, queryFile: Path, seconds: float | None,
            once: bool = False) -> tuple[float, float, float]:
    """(queries/s, average latency in ms, lost %) from one dnsperf run."""
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queryFile), "-q", "200", "-t", "3"]
    argv += ["-n", "1"] if once else ["-l", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=(seconds or 60) + 60).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    latency = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000
    lost = float(re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out).group(1))
    return qps, latency, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--names", type=int, default=200, help="distinct names in the cached query file")
    parser.add_argument("--cold-names", type=int, default=5000, help="names per cold run")
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install with scripts/install-test-peers")

    work = Path(tempfile.mkdtemp(prefix="netsvc-bench-dns-"))
    procs = Processes(work)
    twistd = str(REPO / ".venv" / "bin" / "twistd")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    (work / "empty.conf").write_text("")
    try:
        # The upstream data: anything under bench.test is an A record; MX and TXT too.
        procs.start("upstream", ["dnsmasq", "-k", f"--conf-file={work}/empty.conf",
                                 f"--listen-address={UPSTREAM}",
                                 "--port=53", "--bind-interfaces", "--no-resolv", "--no-hosts", "--user=root",
                                 f"--pid-file={work}/upstream.pid", "--local-ttl=3600",
                                 "--address=/bench.test/192.0.2.1", "--mx-host=bench.test,mail.bench.test,10",
                                 "--txt-record=bench.test,v=spf1 -all"], UPSTREAM, 53)
        ports = {name: freePort() for name in ("netsvc", "twistd dns", "dnsmasq")}
        (work / "netsvc.yaml").write_text(f"""
state_dir: {work}/netsvc-state
log: {{level: info}}
services:
  dns:
    listen: ["udp:{ports['netsvc']}:interface=127.0.0.1", "tcp:{ports['netsvc']}:interface=127.0.0.1"]
    upstreams: ["udp://{UPSTREAM}:53"]
""")
        procs.start("netsvc", [twistd, "-n", "--pidfile=", "netsvc", "--config", str(work / "netsvc.yaml")],
                    "127.0.0.1", ports["netsvc"], env)
        (work / "resolv.conf").write_text(f"nameserver {UPSTREAM}\n")
        procs.start("twistd-dns", [twistd, "-n", "--pidfile=", "dns", "--cache", "--recursive",
                                   f"--resolv-conf={work}/resolv.conf", "-p", str(ports["twistd dns"]),
                                   "-i", "127.0.0.1"], "127.0.0.1", ports["twistd dns"], env)
        procs.start("dnsmasq", ["dnsmasq", "-k", f"--conf-file={work}/empty.conf",
                                "--listen-address=127.0.0.1", f"--port={ports['dnsmasq']}",
                                "--bind-interfaces", "--no-resolv", "--no-hosts",
                                "--user=root", f"--pid-file={work}/dnsmasq.pid", f"--server={UPSTREAM}",
                                "--cache-size=100000", "--dns-forward-max=1000"],
                    "127.0.0.1", ports["dnsmasq"])

        cached = work / "cached.txt"
        lines = [f"h{i}.bench.test A" for i in range(args.names)] + ["bench.test MX", "bench.test TXT"]
        cached.write_text("\n".join(lines) + "\n")
        results: dict[str, dict[str, list[tuple[float, float, float]]]] = {
            n: {"cached": [], "cold": []} for n in ports}
        for port in ports.values():
            dnsperf(port, cached, None, once=True)  # warm the cache
        for run in range(args.runs):
            for name, port in ports.items():
                results[name]["cached"].append(dnsperf(port, cached, args.seconds))
                cold = work / f"cold-{run}-{name.replace(' ', '')}.txt"
                cold.write_text("".join(f"r{run}-{name.replace(' ', '')}-{i}.bench.test A\n"
                                        for i in range(args.cold_names)))
                results[name]["cold"].append(dnsperf(port, cold, None, once=True))
                print(f"run {run + 1}: {name}: cached {results[name]['cached'][-1][0]:.0f} q/s, "
                      f"cold {results[name]['cold'][-1][0]:.0f} q/s", file=sys.stderr)

        def med(name: str, kind: str, i: int) -> float:
            return statistics.median(r[i] for r in results[name][kind])

        print(f"\nDNS, {args.runs} runs, medians (dnsperf, 200 queries outstanding; cached: {args.names + 2} "
              f"names for {args.seconds:g}s per run; cold: {args.cold_names} new names per run)\n")
        def ratio(kind: str, peer: str) -> float:
            """The median of the per-run ratios (each run measures all three back to back)."""
            pairs = zip(results["netsvc"][kind], results[peer][kind])
            return statistics.median(n[0] / p[0] for n, p in pairs)

        print("| workload | twistd dns --cache | dnsmasq | netsvc | netsvc / twistd | netsvc / dnsmasq |")
        print("|---|---|---|---|---|---|")
        for kind in ("cached", "cold"):
            t, d, n = (med(x, kind, 0) for x in ("twistd dns", "dnsmasq", "netsvc"))
            print(f"| {kind} queries/s | {t:,.0f} | {d:,.0f} | {n:,.0f} | {ratio(kind, 'twistd dns'):.1f}x "
                  f"| {ratio(kind, 'dnsmasq'):.2f}x |")
            t, d, n = (med(x, kind, 1) for x in ("twistd dns", "dnsmasq", "netsvc"))
            print(f"| {kind} avg latency (ms) | {t:.2f} | {d:.2f} | {n:.2f} | | |")
            t, d, n = (med(x, kind, 2) for x in ("twistd dns", "dnsmasq", "netsvc"))
            print(f"| {kind} lost (%) | {t:.2f} | {d:.2f} | {n:.2f} | | |")
    finally:
        procs.stopAll()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
