"""
C{workers: 2} as a user runs it: C{twistd -n netsvc --config FILE}, real
processes, real clients (socat where it helps), every listener type.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from tests.chat._redis import RedisServer
from tests.interop._daemon import (
    ipv6LoopbackWorks,
    startNetsvc,
    tcpEcho,
    tlsEcho,
    udpEcho,
)
from tests.interop.test_chat_redis import LineClient
from tests.workers.test_affinity import fromCPU

ECHO = """\
state_dir: state
workers: 2
drain_timeout: 1s
metrics:
  listen: ["tcp:0:interface=127.0.0.1"]
services:
  echo:
    listen:
      - "tcp:0:interface=127.0.0.1"
      - "udp:0:interface=127.0.0.1"
      - "tls:0:interface=127.0.0.1"
      - "unix:{sock}"
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class WorkersTests(unittest.TestCase):
    def start(self, text: str):
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.base = base
        config = base / "netsvc.yaml"
        short = Path(tempfile.mkdtemp(prefix="nsw"))  # unix socket paths are limited to ~100 bytes
        self.addCleanup(shutil.rmtree, short, True)
        config.write_text(text.replace("{sock}", str(short / "echo.sock")))
        (base / "www").mkdir()
        (base / "www" / "hello.txt").write_text("hello\n")
        return startNetsvc(self, config, base / "state", cwd=base, timeout=40)

    def metrics(self, daemon) -> str:
        port = daemon.port("metrics.listen[0]")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, text: str, series: str) -> float:
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def test_everyListenerAndTheWholeDaemonMetrics(self):
        # cpu_affinity: off (the default) -- spread by the hash of the client's address
        daemon = self.start(ECHO + ('      - "tcp6:0:interface=::1"\n' if ipv6LoopbackWorks() else ""))
        self.assertEqual([w["cpus"] for w in daemon.status["workers"]], [None, None])
        workers = daemon.status["workers"]
        self.assertEqual([w["index"] for w in workers], [0, 1])
        self.assertTrue(all(w["running"] and w["pid"] != daemon.process.pid for w in workers))
        self.assertEqual(tcpEcho("127.0.0.1", daemon.port("services.echo.listen[0]"), b"tcp\n"), b"tcp\n")
        self.assertEqual(udpEcho("127.0.0.1", daemon.port("services.echo.listen[1]"), b"udp"), b"udp")
        self.assertEqual(tlsEcho("127.0.0.1", daemon.port("services.echo.listen[2]"), b"tls\n", daemon.cafile),
                         b"tls\n")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(daemon.listener("services.echo.listen[3]")["path"])
            s.sendall(b"unix\n")
            self.assertEqual(s.recv(100), b"unix\n")
        if ipv6LoopbackWorks():
            self.assertEqual(tcpEcho("::1", daemon.port("services.echo.listen[4]"), b"six\n"), b"six\n")
        port = daemon.port("services.echo.listen[0]")
        for i in range(40):
            self.assertEqual(tcpEcho("127.0.0.1", port, b"%d\n" % i), b"%d\n" % i)
        deadline = time.monotonic() + 10
        while True:  # other workers' figures are up to a second old
            text = self.metrics(daemon)
            perWorker = [self.metric(text, f'netsvc_connections_accepted_total{{service="echo",worker="{i}"}}')
                         for i in range(2)]
            total = self.metric(text, 'netsvc_connections_accepted_total{service="echo",worker="all"}')
            if total >= 44 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        self.assertGreaterEqual(total, 44, text)
        self.assertEqual(total, sum(perWorker))
        self.assertTrue(all(n > 0 for n in perWorker), f"SO_REUSEPORT spreads connections: {perWorker}")

    def test_pinnedWorkersServeTheirCPUs(self):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise unittest.SkipTest("cpu_affinity needs 2 CPUs (this process may use only one)")
        daemon = self.start(ECHO.replace("workers: 2\n", "workers: 2\ncpu_affinity: auto\n"))
        workers = daemon.status["workers"]
        plan = [w["cpus"] for w in workers]
        self.assertEqual(sorted(c for cs in plan for c in cs), cpus)
        for w in workers:
            self.assertEqual(sorted(os.sched_getaffinity(w["pid"])), w["cpus"])
        port = daemon.port("services.echo.listen[0]")
        expected = [0, 0]
        for n, cpu in zip((2, 14), cpus[:2]):  # uneven: the hash would match [2, 14] about 1 time in 550
            owner = next(i for i, cs in enumerate(plan) if cpu in cs)
            expected[owner] += n
            fromCPU(cpu, lambda n=n: [tcpEcho("127.0.0.1", port, b"pinned\n") for _ in range(n)])
        deadline = time.monotonic() + 10
        while True:  # other workers' figures are up to a second old
            text = self.metrics(daemon)
            perWorker = [self.metric(text, f'netsvc_connections_accepted_total{{service="echo",worker="{i}"}}')
                         for i in range(2)]
            if perWorker == expected or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        self.assertEqual(perWorker, expected, "each connection served by the worker on the client's CPU")
        self.assertIn("workers pinned to CPUs", daemon.output())

    def test_deadWorkerRestartedHupAndTerm(self):
        daemon = self.start(ECHO)
        victim = daemon.status["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        self.assertTrue(daemon.waitForOutput("worker 0 died (killed by SIGKILL); restarting it in", 10),
                        daemon.output())
        deadline = time.monotonic() + 30
        while True:
            status = json.loads(daemon.statusPath.read_text())
            w = status["workers"][0]
            if w["running"] and w["pid"] != victim:
                break
            self.assertLess(time.monotonic(), deadline, status)
            time.sleep(0.2)
        self.assertEqual(w["restarts"], 1)
        port = daemon.port("services.echo.listen[0]")
        for _ in range(10):
            self.assertEqual(tcpEcho("127.0.0.1", port, b"again\n"), b"again\n")
        daemon.signal(signal.SIGHUP)
        self.assertTrue(daemon.waitForOutput("SIGHUP: passing it to 2 workers", 10))
        deadline = time.monotonic() + 10
        while daemon.output().count("SIGHUP: reloading") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(daemon.output().count("SIGHUP: reloading"), 2, daemon.output())
        pids = [w["pid"] for w in json.loads(daemon.statusPath.read_text())["workers"]]
        held = socket.create_connection(("127.0.0.1", port), timeout=10)  # drained on SIGTERM
        self.addCleanup(held.close)
        held.sendall(b"x\n")
        self.assertEqual(held.recv(10), b"x\n")
        status = daemon.stop()
        self.assertEqual(status, -signal.SIGTERM, daemon.output())  # as twistd with workers: 1
        self.assertFalse(any(alive(p) for p in pids))
        self.assertEqual(daemon.output().count("draining connections for up to 1.0s"), 2)
        self.assertFalse(daemon.statusPath.exists())

    def test_chatAcrossWorkersOverRedis(self):
        redis = RedisServer(self)
        daemon = self.start(
            "state_dir: state\nworkers: 2\ndrain_timeout: 1s\nservices:\n  chat:\n"
            '    listen: ["tcp:0:interface=127.0.0.1"]\n'
            f'    fanout: {{redis: "{redis.endpoint}"}}\n')
        deadline = time.monotonic() + 15
        while daemon.output().count("rooms are shared") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        port = daemon.port("services.chat.listen[0]")
        users = []
        for i in range(6):  # spread over both workers by the kernel
            c = LineClient(self, port)
            c.expect("joined #lobby\n")
            c.send(f"/nick user{i}")
            c.expect(f"is now known as user{i}\n")
            users.append(c)
        users[0].expect("is now known as user5\n")  # presence is written before the rename is published
        users[0].send("/who")
        users[0].expect("6 in #lobby: user0, user1, user2, user3, user4, user5\n")
        users[5].send("hello all")
        for c in users:
            c.expect("<user5> hello all\n")

    def test_webStatusShowsTheWholeDaemon(self):
        import ssl

        daemon = self.start(
            "state_dir: state\nworkers: 2\ndrain_timeout: 1s\nservices:\n  web:\n"
            '    listen: ["tls:0:interface=127.0.0.1"]\n    root: www\n')
        port = daemon.port("services.web.listen[0]")
        context = ssl.create_default_context(cafile=daemon.cafile)
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            with urllib.request.urlopen(f"https://localhost:{port}/hello.txt", context=context, timeout=10) as r:
                self.assertEqual(r.read(), b"hello\n")
        time.sleep(1.5)  # the other worker's snapshot
        with urllib.request.urlopen(f"https://localhost:{port}/status.json", context=context, timeout=10) as r:
            state = json.loads(r.read())
        self.assertEqual(state["pid"], daemon.process.pid)
        self.assertIn(state["worker"], (0, 1))
        self.assertEqual([w["index"] for w in state["workers"]], [0, 1])
        rows = state["metrics"]["netsvc_connections_accepted_total"]
        web = {r["worker"]: r["value"] for r in rows if r["service"] == "web"}
        self.assertEqual(set(web), {"0", "1", "all"})
        self.assertEqual(web["all"], web["0"] + web["1"])
        self.assertGreaterEqual(web["all"], 6)

    def test_refusedWithoutFanOut(self):
        from tests.interop._daemon import runToCompletion, twistdCommand

        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        (base / "c.yaml").write_text("workers: 2\nservices:\n  chat: {}\n")
        result = runToCompletion(self, twistdCommand() + ["-n", "--pidfile=", "netsvc", "--config", "c.yaml"],
                                 cwd=base)
        self.assertEqual(result.returncode, 1)
        self.assertIn("netsvc: c.yaml: services.chat.fanout: required with workers: 2", result.stderr.decode())
        self.assertNotIn("Traceback", result.stderr.decode())
