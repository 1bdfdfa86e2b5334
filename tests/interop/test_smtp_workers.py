"""
SMTP with C{workers: 2}, as a user runs it: C{twistd -n netsvc --config FILE},
mail in with Python's smtplib (a new connection each, so the kernel spreads them
over both workers), out to Postfix's C{smtp-sink}.

  - relay: every message acknowledged with 250 reaches the sink exactly once,
    through worker 1 being SIGKILLed and restarted, and through worker 0 (the
    delivery owner) being SIGKILLed with mail queued and restarted: it resumes
    everything, including what worker 1 accepted while it was down.  Only
    worker 0 ever delivers.
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
import time
import urllib.request
from collections import Counter
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, startNetsvc
from tests.interop._mailpeers import Scratch, SmtpSink, freeTCPPort
from tests.interop.test_smtp_delivery import message

#: Bounds on each wait.
ARRIVAL = 20.0
RESTART = 15.0
BATCH = 8


def writerOf(id: str) -> int:
    return int(id[22:], 16)


class WorkersRelayTests(unittest.TestCase):
    def setUp(self) -> None:
        self.scratch = Scratch()
        self.addCleanup(self.scratch.cleanup)
        self.acked: dict[str, str] = {}  # Message-ID -> queue id
        self.sinks: list[SmtpSink] = []

    def start(self, relay: str, extra: str = "") -> None:
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
{extra}""")
        self.daemon = startNetsvc(self, config, folder / "var", cwd=folder, timeout=40)
        self.port = self.daemon.port("services.smtp.listen[0]")
        self.state = folder / "var"

    def send(self, tag: str, count: int = BATCH) -> None:
        """C{count} messages, one connection each; each 250's queue id is recorded."""
        for i in range(count):
            mid = f"{tag}-{i}"
            with smtplib.SMTP("127.0.0.1", self.port, timeout=IO_TIMEOUT) as s:
                s.ehlo("client.test")
                s.mail("alice@example.test")
                s.rcpt(f"bob{i}@example.test")
                code, reply = s.data(message(mid))
            self.assertEqual(code, 250, reply)
            self.acked[f"<{mid}@example.test>"] = reply.decode().rsplit(" ", 1)[-1]

    def delivered(self) -> Counter:
        ids: Counter = Counter()
        for sink in self.sinks:
            for m in sink.messages():
                ids[email.message_from_bytes(m)["Message-ID"]] += 1
        return ids

    def waitDelivered(self, count: int) -> Counter:
        deadline = time.monotonic() + ARRIVAL
        while sum(self.delivered().values()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate would come now
        return self.delivered()

    def workerPids(self) -> list[int]:
        status = json.loads((self.state / "status.json").read_text())
        return [w["pid"] for w in status["workers"]]

    def kill(self, index: int) -> None:
        """SIGKILL worker C{index} and wait until the supervisor has it running again."""
        old = self.workerPids()[index]
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
        self.send("a")
        self.kill(1)  # a non-owner dies: the other accepts meanwhile, its restart recovers only its own files
        self.send("b")
        got = self.waitDelivered(2 * BATCH)
        self.assertEqual(sum(got.values()), 2 * BATCH, self.daemon.output()[-3000:])
        self.sinks[0].stop()  # the smarthost goes away: what comes in now waits in the queue
        self.send("c")
        self.kill(0)  # the owner dies with mail queued ...
        self.send("d")  # ... and worker 1 (and the new worker 0) accept more
        queued = list((self.state / "queue" / "env").iterdir())
        self.assertEqual(len(queued), 2 * BATCH, "nothing delivered (or lost) while the smarthost is down")
        self.sinks.append(SmtpSink(self.scratch, port=port))  # back: the new owner delivers everything
        got = self.waitDelivered(len(self.acked))
        output = self.daemon.output()

        self.assertEqual(set(got), set(self.acked), output[-3000:])  # nothing lost
        self.assertEqual([m for m, n in got.items() if n > 1], [])  # nothing twice
        writers = Counter(writerOf(id) for id in self.acked.values())
        self.assertEqual(set(writers), {0, 1}, f"both workers accepted mail: {writers}")
        deadline = time.monotonic() + 5
        while list((self.state / "queue" / "env").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(list((self.state / "queue" / "env").iterdir()), [])
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
