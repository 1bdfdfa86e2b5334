"""
What a delivery attempt's answers do to a queued message: recorded, bounced,
warned about, or retried later -- the outcome side of L{netsvc.smtp.delivery}.

    flight = Flight(id, envelope, path, size, eightBit)   # one message being attempted
    flight.groups = len(jobs)                             # one Job per domain group
    outcomes = Outcomes(settings, queue, writer, metrics, clock, schedule=..., kick=..., finished=...)
    outcomes.answered(job, [(recipient, Reply)], target)  # a transaction's replies
    outcomes.groupAnswered(job, [(index, "defer", (status, reason))])   # no transaction (no route ...)

An outcome is C{(recipient index, kind, detail)}: C{"sent"} (detail: the reply
text), C{"fail"} (C{(status, diagnostic, remote MTA or None)}) or C{"defer"}
(C{(status, reason)}).  Each job is answered exactly once; when the last job of
a flight has answered, the message is finished.

Outcomes, per recipient:
  - 2xx: recorded at once, in the reactor callback that read the reply: the
    envelope is rewritten (write + rename, fsync'd off the reactor right after),
    or the message removed when nobody is left.  So a kill -9 can only repeat a
    delivery whose reply was on the wire but not yet read -- the window no MTA
    can close.
  - 5xx (or a permanent routing failure): bounced when the attempt ends (an
    RFC 3464 report from <> to the sender, L{netsvc.smtp.dsn}; never for a
    bounce), then marked failed.  Until then the recipient stays pending on disk:
    a crash means another try (and another 5xx), never a lost bounce.
  - 4xx, connection and TLS failures: retried after C{queue.retry[n]} (the last
    wait repeats); a delay warning once the message is older than
    C{queue.delay_warning}; a bounce (status 4.4.7) once it is older than
    C{queue.max_age}.
A report that cannot be queued (disk full ...) marks nothing: the message is
tried again after C{queue.retry[0]}.

Envelopes are rewritten and removed through L{netsvc.smtp.records.EnvelopeWriter}
(not through L{Queue.update}/L{Queue.remove}, whose work is batched in a
thread) so that the "delivered" record is on disk before the reactor reads
anything else; the server side only ever creates envelopes, so there is still
one writer per file.

The scheduler is told what to do next through three callbacks: C{schedule(id,
when)} (the next attempt), C{kick(id)} (a report was queued: send it soon) and
C{finished(id)} (the flight is over, whatever happened; called last).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from netsvc.smtp.dsn import FULL_LIMIT, ReportItem, buildReport, statusOf
from netsvc.smtp.records import DeliveryMetrics, EnvelopeWriter

# The delivery's log lines keep the one namespace operators filter on, whichever module writes them.
log = Logger(namespace="netsvc.smtp.delivery")


class Flight:
    """One message being attempted: its envelope, and what its groups have answered so far."""

    def __init__(self, id: str, envelope: Any, path: Path, size: int, eightBit: bool) -> None:
        self.id = id
        self.envelope = envelope
        self.path = path
        self.size = size
        self.eightBit = eightBit
        self.groups = 0  # domain groups not yet answered
        self.failed: list[ReportItem] = []
        self.deferred: dict[int, tuple[str, str]] = {}  # recipient index -> (status, reason)
        self.deleteRequested = False


class Job:
    """A message's recipients in one domain."""

    __slots__ = ("flight", "indexes", "domain")

    def __init__(self, flight: Flight, indexes: list[int], domain: str) -> None:
        self.flight = flight
        self.indexes = indexes
        self.domain = domain


class Outcomes:
    """
    @param schedule: C{(id, when)}: attempt C{id} again at C{when}.
    @param kick: C{(id)}: a report was queued as C{id}: attempt it as soon as there is room.
    @param finished: C{(id)}: the flight C{id} is over (called last, whatever happened).
    """

    def __init__(self, settings: Any, queue: Any, writer: EnvelopeWriter, metrics: DeliveryMetrics, clock: Any,
                 schedule: Callable[[str, float], None], kick: Callable[[str], None],
                 finished: Callable[[str], None]) -> None:
        self.settings = settings
        self.queue = queue
        self.writer = writer
        self.metrics = metrics
        self.clock = clock
        self.hostname = settings.hostname
        self.schedule = schedule
        self.kick = kick
        self.finished = finished

    def answered(self, job: Job, results: list[Any], target: Any) -> None:
        """One transaction's replies (in the reactor callback that read them)."""
        outcomes = []
        for i, (_, reply) in zip(job.indexes, results):
            if reply.ok:
                outcomes.append((i, "sent", str(reply)))
            elif reply.permanent:
                outcomes.append((i, "fail", (statusOf(reply.code, reply.text), f"smtp; {reply}", target.host)))
            else:
                outcomes.append((i, "defer", (statusOf(reply.code, reply.text), f"{target}: {reply}")))
            log.info("delivery {id}: <{rcpt}> via {target}: {reply}", id=job.flight.id,
                     rcpt=job.flight.envelope.recipients[i].address, target=str(target), reply=str(reply))
        self.groupAnswered(job, outcomes)

    def groupAnswered(self, job: Job, outcomes: list[tuple[int, str, Any]]) -> None:
        """C{job}'s answer: deliveries recorded now; the message finished once its last job has answered."""
        flight = job.flight
        env = flight.envelope
        sent = False
        for i, outcome, detail in outcomes:
            r = env.recipients[i]
            self.metrics.attempts.inc()
            if outcome == "sent":
                r.status, r.last_error = "sent", None
                r.attempts += 1
                sent = True
                self.metrics.delivered.inc()
            elif outcome == "fail":
                status, diagnostic, remote = detail
                flight.failed.append(ReportItem(r, status, diagnostic, remote))
            else:
                flight.deferred[i] = detail
        if sent:
            if all(x.status == "sent" for x in env.recipients):
                self.writer.remove(flight.id)
            else:
                self.writer.write(env)
        flight.groups -= 1
        if flight.groups == 0:
            self._finish(flight).addErrback(lambda f: log.failure("finishing {id}", f, id=flight.id))

    @defer.inlineCallbacks
    def _finish(self, flight: Flight) -> Any:
        """Every group has answered: bounce, warn, schedule the next attempt, or remove."""
        env = flight.envelope
        now = self.clock.seconds()
        q = self.settings.queue
        try:
            if all(r.status == "sent" for r in env.recipients):
                return  # removed when the last one was recorded
            if flight.deleteRequested:
                self.writer.remove(flight.id)
                return
            expired = now >= env.created + float(q.max_age)
            failed = list(flight.failed)
            for item in failed:
                item.recipient.attempts += 1
                item.recipient.last_error = item.diagnostic
            for i, (_, reason) in flight.deferred.items():
                r = env.recipients[i]
                r.attempts += 1
                r.last_error = reason
                if expired:
                    failed.append(ReportItem(r, "4.4.7", f"X-netsvc; delivery time expired; last error: {reason}"))
                else:
                    self.metrics.deferred.inc()
            if failed:
                yield self._report(env, flight, failed, "failed")
                for item in failed:
                    item.recipient.status = "failed"
                    self.metrics.bounced.inc()
                    log.info("delivery {id}: <{rcpt}> failed: {status} {why}", id=flight.id,
                             rcpt=item.recipient.address, status=item.status, why=item.diagnostic)
            if not env.pending():
                self.writer.remove(flight.id)
                return
            env.attempts += 1
            waits = q.retry
            env.next_attempt = now + float(waits[min(env.attempts - 1, len(waits) - 1)])
            if (float(q.delay_warning) > 0 and not env.warned and not env.dsn
                    and now - env.created >= float(q.delay_warning)):
                items = [ReportItem(env.recipients[i], status, f"X-netsvc; {reason}")
                         for i, (status, reason) in flight.deferred.items()]
                yield self._report(env, flight, items, "delayed", retryUntil=env.created + float(q.max_age))
                env.warned = True
            self.writer.write(env)
            self.schedule(flight.id, env.next_attempt)
        except Exception as e:
            # The report could not be queued (disk full ...): nothing is marked; try again later.
            log.error("delivery {id}: {error}; retrying later", id=flight.id, error=str(e))
            for r in env.recipients:
                if r.status == "failed":
                    r.status = "pending"
            self.schedule(flight.id, now + float(q.retry[0]))
        finally:
            self.finished(flight.id)

    def _report(self, env: Any, flight: Flight, items: list[ReportItem], action: str,
                retryUntil: float | None = None) -> defer.Deferred:
        """Queue a bounce or a warning (fires once it is durable; nothing when none is due)."""
        with open(flight.path, "rb") as f:
            original = f.read(FULL_LIMIT + 1)
        data = buildReport(env, original, items, action, self.hostname, now=self.clock.seconds(),
                           retryUntil=retryUntil)
        if data is None:
            return defer.succeed(None)
        self.metrics.reports.inc()
        d = self.queue.enqueueBytes("", [env.sender], data, dsn=True)

        def queued(id: str) -> None:
            log.info("delivery {id}: {kind} to <{sender}> queued as {report}", id=flight.id,
                     kind="bounce" if action == "failed" else "delay warning", sender=env.sender, report=id)
            self.kick(id)

        return d.addCallback(queued)
