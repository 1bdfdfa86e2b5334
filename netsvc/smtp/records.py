"""
What the delivery side records: its envelope rewrites and removals (a result
is on disk before the reactor reads the next reply) and its metrics
(L{DeliveryMetrics}).

L{EnvelopeWriter.write} rewrites C{env/<id>.json} at once (write to
C{tmp/<id>.dlv}, rename) in the calling reactor callback: a kill -9 after it
cannot lose the record (the page cache outlives the process).  The fsync that
makes it survive a power cut follows in a worker thread, batched: one
C{fdatasync} per file and one folder fsync per batch.

Why not L{netsvc.smtp.queue.Queue.update}: its writes wait in the queue's
writer thread behind the batch being committed, so under load a delivered
message could stay "pending" on disk for tens of milliseconds -- each of them
a duplicate after a crash.  The server side only creates envelopes and
delivery only rewrites them, so each file still has one writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger()


class EnvelopeWriter:
    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self._waiting: list[Path] = []
        self._busy = False
        self._folderOnly = False  # a removal waits for the folder's fsync
        self.synced = 0  # files fsync'd (tests)
        self.folderSyncs = 0

    def write(self, envelope: Any) -> None:
        """Rewrite C{envelope} now (write + rename); its fsync follows off the reactor when the queue fsyncs."""
        tmp = self.queue.tmp / f"{envelope.id}.dlv"
        final = self.queue.env / f"{envelope.id}.json"
        with open(tmp, "wb") as f:
            f.write(envelope.dumps())
        os.replace(tmp, final)
        if self.queue.fsync:
            self._waiting.append(final)
            if not self._busy:
                self._syncNext()

    def remove(self, id: str) -> None:
        """
        Remove a delivered (or deleted) message now: envelope first (the commit
        point), then the data; the folder's fsync (so that a power cut cannot bring
        it back) follows off the reactor, batched with the writes.
        """
        for path in (self.queue.env / f"{id}.json", self.queue.msg / id):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self.queue.fsync:
            self._folderOnly = True
            if not self._busy:
                self._syncNext()

    def _syncNext(self) -> None:
        batch, self._waiting = self._waiting, []
        folder, self._folderOnly = self._folderOnly, False
        if not batch and not folder:
            self._busy = False
            return
        self._busy = True
        d = threads.deferToThread(self._sync, batch, self.queue.env)
        d.addErrback(lambda f: log.error("queue: fsync failed: {error}", error=f.getErrorMessage()))
        d.addBoth(lambda _: self._syncNext())

    def _sync(self, paths: list[Path], folder: Path) -> None:
        """(Worker thread.)"""
        for path in set(paths):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self.synced += 1
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.folderSyncs += 1


def flushed(writer: EnvelopeWriter) -> defer.Deferred:
    """Fires once nothing waits to be fsync'd (tests, shutdown)."""
    from twisted.internet import reactor, task

    def check() -> Any:
        if writer._busy or writer._waiting:
            return task.deferLater(reactor, 0.01, check)
        return None

    return defer.maybeDeferred(check)


class DeliveryMetrics:
    def __init__(self, registry: Any, service: str = "smtp") -> None:
        s = {"service": service}
        self.delivered = registry.counter("netsvc_smtp_delivered_total", "Recipients delivered (2xx).",
                                          ["service"]).labels(**s)
        self.deferred = registry.counter("netsvc_smtp_deferred_total",
                                         "Recipient attempts that failed temporarily (retried).",
                                         ["service"]).labels(**s)
        self.bounced = registry.counter("netsvc_smtp_bounced_total",
                                        "Recipients given up on (5xx, or older than max_age).",
                                        ["service"]).labels(**s)
        self.attempts = registry.counter("netsvc_smtp_delivery_attempts_total",
                                         "Recipient delivery attempts.", ["service"]).labels(**s)
        self.reports = registry.counter("netsvc_smtp_reports_total", "Bounces and delay warnings queued.",
                                        ["service"]).labels(**s)
        self.connections = registry.gauge("netsvc_smtp_delivery_connections",
                                          "Outgoing SMTP connections open now.", ["service"]).labels(**s)
        self.queued = registry.gauge("netsvc_smtp_queue_messages", "Messages in the queue.",
                                     ["service"]).labels(**s)
