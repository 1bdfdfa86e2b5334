"""
SMTP benchmark: how fast messages are accepted (250 after DATA, durably queued)
by netsvc's C{services.smtp} and by a real Postfix, with Postfix's own load
generator C{smtp-source} (8 sessions, 2 KB messages), in the same run; and, when
netsvc's delivery is available, how fast both relay to C{smtp-sink}.

    .venv/bin/python bench/smtp.py [--messages 2000] [--sessions 8] [--size 2048] [--runs 5]

Same fsync discipline on both sides: netsvc fsyncs the message, the envelope and
both folders before its 250 (C{queue.fsync: true}, group commit), Postfix's
cleanup fsyncs its queue file before its 250 (the default).  netsvc runs in
capture mode for the accept figures (messages are kept, not sent), Postfix
discards after queueing (its queue manager still runs).  Workloads: one message
per connection (smtp-source's default) and many messages per connection (C{-d}).

For delivery, netsvc relays to an smtp-sink smarthost and Postfix relays to
another; the figure is messages per second from the first connection of
smtp-source until the sink has them all (accept + queue + deliver).

Servers run on the last CPU, smtp-source on the first (as the other benchmarks
do).  Each figure is the median of C{--runs} runs, servers interleaved within a
run.  Prints one markdown table with the ratios measured in the same run.  Needs
root (a private Postfix instance) and Debian's postfix package.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import log, prepare  # noqa: E402
from tests.interop._mailpeers import PostfixInstance, Scratch, SmtpSink, runSmtpSource, waitForBanner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
state_dir: {state}
log: {{level: warn}}
services:
  smtp:
    listen: ["tcp:{port}:interface=127.0.0.1"]
    hostname: bench.test
    relay: {relay}
    queue: {{fsync: true, retry: [5s]}}
    max_messages_per_session: 100000
    limits: {{max_connections_per_ip: 1024, rate: 0}}
"""


def startNetsvc(scratch: Scratch, relay: str) -> tuple[subprocess.Popen, int]:
    from tests.interop._mailpeers import freeTCPPort

    port = freeTCPPort()
    base = Path(scratch.mktemp())
    base.mkdir()
    (base / "netsvc.yaml").write_text(CONFIG.format(state=base / "state", port=port, relay=relay))
    out = open(base / "out.log", "wb")  # noqa: SIM115 - closed at the end of the process
    proc = subprocess.Popen([str(REPO / ".venv/bin/twistd"), "-n", "--pidfile=", "netsvc", "--config",
                             str(base / "netsvc.yaml")], cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    scratch.addCleanup(stop)
    try:
        waitForBanner(port, process=proc)
    except RuntimeError as e:
        raise RuntimeError(f"netsvc: {e}: {(base / 'out.log').read_text()[-2000:]}") from None
    return proc, port


def acceptRate(port: int, args: argparse.Namespace, reuse: bool) -> float:
    started = time.monotonic()
    result = runSmtpSource(port, sessions=args.sessions, messages=args.messages, size=args.size,
                           recipient="sink@example.test", reuse=reuse, timeout=300)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.decode(errors='replace')[-300:]}")
    return args.messages / elapsed


def deliveryRate(port: int, sink: SmtpSink, args: argparse.Namespace) -> float:
    before = len(sink.files())
    started = time.monotonic()
    result = runSmtpSource(port, sessions=args.sessions, messages=args.messages, size=args.size,
                           recipient="sink@example.test", reuse=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.decode(errors='replace')[-300:]}")
    deadline = time.monotonic() + 300
    while len(sink.files()) < before + args.messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(sink.files()) - before} of {args.messages} delivered")
        time.sleep(0.01)
    return args.messages / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-delivery", action="store_true")
    args = parser.parse_args()
    serverCPUs, loadCPUs = prepare(parser, 4096)
    if os.geteuid() != 0:
        log("bench/smtp.py needs root (a private Postfix instance)")
        return 1
    scratch = Scratch()
    try:
        os.sched_setaffinity(0, serverCPUs)  # the servers (and their children) inherit this
        _, netsvcPort = startNetsvc(scratch, "{capture: true, keep: 1000000}")
        postfix = PostfixInstance(scratch, mode="discard")
        delivery = None
        if not args.no_delivery:
            try:
                import netsvc.smtp.delivery  # noqa: F401

                sinkA = SmtpSink(scratch)
                sinkB = SmtpSink(scratch)
                _, relayPort = startNetsvc(scratch, f'{{smarthost: "{sinkA.endpoint}", starttls: none}}')
                postfixRelay = PostfixInstance(scratch, mode="relay", relayhost=f"127.0.0.1:{sinkB.port}")
                delivery = (relayPort, sinkA, postfixRelay.port, sinkB)
            except ImportError as e:
                log(f"no delivery figures: {e}")
        os.sched_setaffinity(0, loadCPUs)

        rows: dict[str, dict[str, list[float]]] = {}
        workloads = [("accept, 1 message per connection", False), ("accept, many messages per connection", True)]
        for run in range(args.runs):
            for name, reuse in workloads:
                for server, port in (("postfix", postfix.port), ("netsvc", netsvcPort)):
                    rate = acceptRate(port, args, reuse)
                    rows.setdefault(name, {}).setdefault(server, []).append(rate)
                    log(f"run {run + 1}: {name}: {server} {rate:.0f} msg/s")
            if delivery is not None:
                relayPort, sinkA, postfixPort, sinkB = delivery
                name = "accept + deliver to smtp-sink"
                for server, port, sink in (("postfix", postfixPort, sinkB), ("netsvc", relayPort, sinkA)):
                    rate = deliveryRate(port, sink, args)
                    rows.setdefault(name, {}).setdefault(server, []).append(rate)
                    log(f"run {run + 1}: {name}: {server} {rate:.0f} msg/s")

        cpus = os.cpu_count()
        print(f"\nSMTP, smtp-source -s {args.sessions} -l {args.size}, {args.messages} messages per figure, "
              f"median of {args.runs} runs, fsync on both; servers on 1 CPU of {cpus} (shared machine)\n")
        print("| workload | Postfix 3.7 (msg/s) | netsvc (msg/s) | netsvc / Postfix |")
        print("|---|---:|---:|---:|")
        for name, figures in rows.items():
            p, n = statistics.median(figures["postfix"]), statistics.median(figures["netsvc"])
            print(f"| {name} | {p:.0f} | {n:.0f} | {n / p:.2f}x |")
        return 0
    finally:
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
