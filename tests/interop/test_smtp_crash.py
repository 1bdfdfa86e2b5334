"""
The kill -9 test: a relay under load is killed mid-stream and restarted; every
message it acknowledged with 250 must reach the smarthost (Postfix's
smtp-sink) exactly once.

Clients (smtplib, a few threads) send numbered messages and record which got
their 250 after DATA.  Meanwhile the relay delivers to smtp-sink.  After
C{KILL_AFTER} acknowledgements the daemon gets SIGKILL; the clients see their
connections die and stop.  The daemon is started again on the same state
folder and the test waits for its queue to empty.  Then, per Message-ID:

  - every acknowledged message was delivered (nothing lost);
  - a message delivered twice is allowed only if it is a delivery that was in
    flight at the kill: its first copy was at the sink when the daemon died,
    the second came after the restart.  That is the one window no SMTP client
    can close (RFC 1047): the sink has the message, its 250 is on the wire,
    and the process dies before reading it.  The relay records each result in
    the callback that reads the reply, so nothing else can repeat; there are
    at most C{concurrency} such deliveries at any instant.
  - messages delivered without an acknowledgement (the kill came between the
    end of DATA and the 250) are allowed and counted.
"""

from __future__ import annotations

import email
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, startNetsvc
from tests.interop._mailpeers import Scratch, SmtpSink

CLIENTS = 4
#: The relay's delivery connections (the most deliveries that can be in flight at the kill).
CONCURRENCY = 8
#: At most this many messages in all (the kill comes well before).
MAX_MESSAGES = 1200
KILL_AFTER = 300
#: Bounds on the load phase and on the drain after the restart.
LOAD_TIMEOUT = 60.0
DRAIN_TIMEOUT = 90.0


class Load:
    """C{CLIENTS} threads sending numbered messages until stopped or a connection fails."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[str] = set()
        self.attempted = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    def nextNumber(self) -> int | None:
        with self.lock:
            if self.attempted >= MAX_MESSAGES or self.stop.is_set():
                return None
            self.attempted += 1
            return self.attempted

    def client(self, n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=IO_TIMEOUT) as s:
                while True:
                    number = self.nextNumber()
                    if number is None:
                        return
                    mid = f"<crash-{number}@load.test>"
                    body = (f"From: load{n}@load.test\r\nTo: sink@sink.test\r\nSubject: crash {number}\r\n"
                            f"Message-ID: {mid}\r\n\r\n" + "line of load text\r\n" * 60).encode()
                    s.sendmail(f"load{n}@load.test", ["sink@sink.test"], body)
                    with self.lock:
                        self.acked.add(mid)  # the 250 after DATA came back
        except (OSError, smtplib.SMTPException) as e:
            self.errors.append(f"client {n}: {e!r}")


class CrashTests(unittest.TestCase):
    def test_kill9MidStreamEveryAckedMessageDeliveredOnce(self) -> None:
        scratch = Scratch()
        self.addCleanup(scratch.cleanup)
        sink = SmtpSink(scratch, backlog=512)
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        config = folder / "netsvc.yaml"
        config.write_text(f"""\
state_dir: {folder}/var
services:
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: relay.test
    relay: {{smarthost: "{sink.endpoint}", starttls: none}}
    queue: {{retry: [1s], fsync: true, concurrency: {CONCURRENCY}}}
    max_messages_per_session: 100000
    limits: {{rate: 0}}
""")
        daemon = startNetsvc(self, config, folder / "var")
        load = Load(daemon.port("services.smtp.listen[0]"))
        load.start()
        deadline = time.monotonic() + LOAD_TIMEOUT
        while len(load.acked) < KILL_AFTER and time.monotonic() < deadline and any(
                t.is_alive() for t in load.threads):
            time.sleep(0.005)
        self.assertGreaterEqual(len(load.acked), KILL_AFTER, f"load stalled: {load.errors}\n"
                                + daemon.output()[-3000:])
        daemon.kill()  # SIGKILL, mid-stream
        load.stop.set()
        load.join(IO_TIMEOUT + 5)
        atKill = Counter(self.messageIds(sink))

        restarted = startNetsvc(self, config, folder / "var")
        envDir = folder / "var" / "queue" / "env"
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while any(envDir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(list(envDir.iterdir()), [], restarted.output()[-3000:])
        time.sleep(0.3)  # the last dump file may still be being written

        delivered = Counter(self.messageIds(sink))
        acked = load.acked
        lost = sorted(acked - set(delivered))
        duplicates = {m: c for m, c in delivered.items() if c > 1}
        unacked = set(delivered) - acked
        print(f"\nkill -9 test: attempted {load.attempted}, acked {len(acked)}, delivered "
              f"{len(acked & set(delivered))} of the acked (+{len(unacked)} not acked, allowed), "
              f"duplicates {len(duplicates)} (in flight at the kill); {sum(atKill.values())} at the sink "
              f"when killed")
        self.assertEqual(lost, [], f"acknowledged but never delivered: {lost[:10]}")
        for mid, count in duplicates.items():
            self.assertEqual((count, atKill[mid]), (2, 1), f"{mid}: not a delivery in flight at the kill")
        self.assertLessEqual(len(duplicates), CONCURRENCY)

    @staticmethod
    def messageIds(sink: SmtpSink) -> list[str]:
        return [email.message_from_bytes(raw).get("Message-ID") for raw in sink.messages()]
