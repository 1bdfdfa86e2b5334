"""
SMTP with C{workers: 2}, as a user runs it: C{twistd -n netsvc --config FILE},
mail in with Python's smtplib (a new connection each, so the kernel spreads them
over both workers), out to Postfix's C{smtp-sink}.

  - relay: every message acknowledged with 250 reaches the sink exactly once,
    through worker 1 being SIGKILLed mid-stream and restarted, and through
    worker 0 (the delivery owner) being SIGKILLed mid-stream with mail queued and
    restarted: it resumes everything, including what worker 1 accepted while it
    was down.  Only worker 0 ever delivers.  A message whose connection the kill
    cut may or may not arrive (it was never acknowledged), but never twice.
  - capture: C{/mail/messages.json} lists every worker's mail whichever worker
    answers, and the owner prunes to C{keep} across workers.

The owner is killed while the sink is down (its deliveries are refused), so no
delivery is in flight at the kill: the one window no MTA can close (a reply on the
wire, not yet read; see test_smtp_crash.py) stays out of this test, and any
duplicate is a bug.
"""

from __future__ import annotations

import email
import json
import os
import signal
import smtplib
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, startNetsvc
from tests.interop._mailpeers import Scratch, SmtpSink, freeTCPPort
from tests.interop.test_smtp_delivery import message

#: Bounds on each wait, and on the messages one load sends.
ARRIVAL = 20.0
RESTART = 15.0
BATCH = 8
MAX_MESSAGES = 300


def writerOf(id: str) -> int:
    return int(id[22:], 16)


class Load:
    """
    One thread sending numbered messages, a new connection each, until stopped (at
    most C{MAX_MESSAGES}): a connection a kill cuts is counted, not retried.
    """

    def __init__(self, port: int, tag: str) -> None:
        self.port = port
        self.tag = tag
        self.acked: dict[str, str] = {}  # Message-ID -> queue id
        self.attempted: set[str] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        for i in range(MAX_MESSAGES):
            if self.stopping.is_set():
                return
            mid = f"{self.tag}-{i}"
            self.attempted.add(f"<{mid}@example.test>")
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=IO_TIMEOUT) as s:
                    s.ehlo("client.test")
                    s.mail("alice@example.test")
                    s.rcpt(f"bob{i}@example.test")
                    code, reply = s.data(message(mid))
                if code == 250:
                    self.acked[f"<{mid}@example.test>"] = reply.decode().rsplit(" ", 1)[-1]
            except (OSError, smtplib.SMTPException):
                pass  # the worker was killed under this connection: never acknowledged

    def waitAcked(self, count: int, testCase: unittest.TestCase) -> None:
        deadline = time.monotonic() + ARRIVAL
        while len(self.acked) < count:
            if time.monotonic() > deadline or not self.thread.is_alive():
                testCase.fail(f"only {len(self.acked)} of {count} messages acknowledged")
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(IO_TIMEOUT * 2)


class WorkersRelayTests(unittest.TestCase):
    def setUp(self) -> None:
        self.scratch = Scratch()
        self.addCleanup(self.scratch.cleanup)
        self.sinks: list[SmtpSink] = []

    def start(self, relay: str) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        config = folder / "netsvc.yaml"
        config.write_text(f"""\
state_dir: {folder}/var
workers: 2
drain_timeout: 1s
services:
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: relay.test
    relay: {relay}
    queue: {{retry: [1s]}}
""")
        self.daemon = startNetsvc(self, config, folder / "var", cwd=folder, timeout=40)
        self.port = self.daemon.port("services.smtp.listen[0]")
        self.state = folder / "var"

    def load(self, tag: str) -> Load:
        load = Load(self.port, tag)
        self.addCleanup(load.stop)
        return load

    def delivered(self) -> Counter:
        ids: Counter = Counter()
        for sink in self.sinks:
            for m in sink.messages():
                ids[email.message_from_bytes(m)["Message-ID"]] += 1
        return ids

    def waitDelivered(self, wanted: set[str]) -> Counter:
        deadline = time.monotonic() + ARRIVAL
        while not wanted <= set(self.delivered()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate would come now
        return self.delivered()

    def queued(self) -> list[Path]:
        return list((self.state / "queue" / "env").iterdir())

    def kill(self, index: int) -> None:
        """SIGKILL worker C{index} and wait until the supervisor has it running again."""
        status = json.loads((self.state / "status.json").read_text())
        old = status["workers"][index]["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + RESTART
        while time.monotonic() < deadline:
            try:
                status = json.loads((self.state / "workers" / f"{index}.json").read_text())
                if status.get("worker_pid") not in (None, old):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.fail(f"worker {index} not restarted in {RESTART:g}s:\n{self.daemon.output()[-3000:]}")

    def test_deliveredExactlyOnceThroughWorkerKills(self) -> None:
        port = freeTCPPort()
        self.sinks.append(SmtpSink(self.scratch, port=port))
        self.start(f'{{smarthost: "tcp:host=127.0.0.1:port={port}", starttls: none}}')

        # Worker 1 is killed mid-stream: worker 0 goes on accepting and delivering; the new worker 1's
        # recovery removes only what the dead one left (nothing another worker is committing).
        first = self.load("a")
        first.waitAcked(BATCH, self)
        self.kill(1)
        first.waitAcked(len(first.acked) + BATCH, self)
        first.stop()
        got = self.waitDelivered(set(first.acked))
        self.assertLessEqual(set(first.acked), set(got), self.daemon.output()[-3000:])

        # The owner is killed mid-stream with mail queued (the smarthost is down, so no delivery is in
        # flight); worker 1 accepts meanwhile; the new owner delivers everything once the smarthost is back.
        self.sinks[0].stop()
        second = self.load("b")
        second.waitAcked(BATCH, self)
        self.kill(0)
        second.waitAcked(len(second.acked) + BATCH, self)
        second.stop()
        self.assertGreaterEqual(len(self.queued()), len(second.acked))  # waiting, none lost nor sent
        self.sinks.append(SmtpSink(self.scratch, port=port))
        acked = {**first.acked, **second.acked}
        got = self.waitDelivered(set(acked))
        output = self.daemon.output()

        self.assertEqual(set(acked) - set(got), set(), output[-3000:])  # nothing acknowledged is lost
        self.assertEqual([m for m, n in got.items() if n > 1], [])  # nothing twice
        self.assertLessEqual(set(got), first.attempted | second.attempted)
        writers = Counter(writerOf(id) for id in acked.values())
        self.assertEqual(set(writers), {0, 1}, f"both workers accepted mail: {writers}")
        deadline = time.monotonic() + 5
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.queued(), [])
        self.assertEqual(list((self.state / "queue" / "msg").iterdir()), [])
        self.assertIn("[worker0/netsvc.smtp.delivery#info] delivery ", output)
        self.assertNotIn("[worker1/netsvc.smtp.delivery", output)  # only the owner delivers
        status = json.loads((self.state / "status.json").read_text())
        self.assertEqual([w["restarts"] for w in status["workers"]], [1, 1])


class WorkersCaptureTests(unittest.TestCase):
    def test_listingShowsEveryWorkersMailOwnerPrunes(self) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        (folder / "netsvc.yaml").write_text(f"""\
state_dir: {folder}/var
workers: 2
drain_timeout: 1s
services:
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    relay: {{capture: true, keep: 6}}
  web:
    listen: ["tcp:0:interface=127.0.0.1"]
""")
        daemon = startNetsvc(self, folder / "netsvc.yaml", folder / "var", cwd=folder, timeout=40)
        smtpPort = daemon.port("services.smtp.listen[0]")
        web = daemon.port("services.web.listen[0]")
        ids = []
        for i in range(10):
            with smtplib.SMTP("127.0.0.1", smtpPort, timeout=IO_TIMEOUT) as s:
                s.ehlo("client.test")
                s.mail("dev@example.test")
                s.rcpt("qa@example.test")
                code, reply = s.data(message(f"cap{i}"))
            self.assertEqual(code, 250)
            ids.append(reply.decode().rsplit(" ", 1)[-1])
        self.assertEqual({writerOf(id) for id in ids}, {0, 1}, ids)
        newest = list(reversed(ids[-6:]))
        deadline = time.monotonic() + 10
        while True:  # the owner hears of worker 1's last messages by inotify, then prunes
            listings = []
            for _ in range(6):  # a connection each: both workers answer some
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/mail/messages.json", timeout=IO_TIMEOUT) as r:
                    listings.append([m["id"] for m in json.loads(r.read())])
            if all(listing == newest for listing in listings) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(listings, [newest] * 6, daemon.output()[-3000:])
        self.assertEqual(len(list((folder / "var" / "captured" / "msg").iterdir())), 6)
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/mail/{ids[-1]}.json", timeout=IO_TIMEOUT) as r:
            self.assertEqual(json.loads(r.read())["subject"], "cap9")
