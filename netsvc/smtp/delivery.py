"""
Delivery: queued messages to their next hop, with retries, bounces and warnings.

    svc = makeDelivery(settings, queue, context)   # an IService; svc.kick(id) after each commit

The scheduler (L{Delivery}) keeps every queued id with its next attempt time.
A due message is loaded and its pending recipients are grouped by domain (one
group for a smarthost); each group joins its domain's outbox.  Connections
(C{queue.concurrency} in all, L{PER_DOMAIN} per MX domain) take messages from
their outbox one after the other (at most L{MESSAGES_PER_CONNECTION} each);
the route comes from L{netsvc.smtp.routing} and the session is
L{netsvc.smtp.sender.SMTPSender} (STARTTLS as configured, AUTH to a smarthost).

What each answer does to the message (recorded at once, bounced, warned
about, retried after C{queue.retry[n]}) is L{netsvc.smtp.outcomes}; it tells
the scheduler the next attempt, and kicks the bounces and warnings it queues.
Messages are removed here directly too (L{netsvc.smtp.records}: a finished
message found at load, a deletion request), never through the queue's thread.

Control requests from C{netsvc mail queue} (files in C{<queue>/ctl/}:
C{retry-ID}, C{retry-all}, C{delete-ID}) are applied every L{TICK} seconds.
At start-up every queued message is scheduled again (a restart resumes).

With local delivery (C{local}, a L{netsvc.smtp.local.LocalDelivery}, set by the
service) recipients at a local domain -- bounces and delay warnings to a local
sender, mostly -- are grouped apart (L{LOCAL}) and written to their mailboxes
instead of being routed.

With C{workers: N} this runs in the delivery owner (worker 0) only; mail the
other workers commit reaches it through L{Delivery.discover}
(L{netsvc.smtp.watch}: inotify, and a periodic scan).
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from netsvc.smtp.control import takeRequests
from netsvc.smtp.outcomes import Flight, Job, Outcomes
from netsvc.smtp.records import DeliveryMetrics, EnvelopeWriter
from netsvc.smtp.routing import RoutingError
from netsvc.smtp.sendertypes import Outgoing, Recipient

log = Logger()

#: Seconds between scans for due retries and control requests.
TICK = 1.0
#: Connections to one MX domain at once (a smarthost gets queue.concurrency).
PER_DOMAIN = 10
#: Messages sent over one connection before it is closed and a fresh one opened.
MESSAGES_PER_CONNECTION = 100
#: Messages loaded for sending at once, per unit of concurrency.
LOADED_PER_CONNECTION = 20
#: At shutdown, how long transactions in progress get to finish.
STOP_GRACE = 5.0
#: The outbox of the recipients delivered locally (never a domain name).
LOCAL = "\0local"


def _hasEightBit(path: Path) -> bool:
    """Whether the file has a byte over 127 (then it goes out with BODY=8BITMIME)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if not chunk.isascii():
                return True
    return False


def _describe(error: BaseException) -> str:
    from netsvc.clients import describe

    return describe(error)


class Delivery(service.Service):
    """
    @param router: C{route(domain) -> Deferred[list[Target]]} (L{netsvc.smtp.routing}).
    @param openSession: C{(target, nextMessage, onResult) -> Deferred} that runs one
        SMTP session (L{SMTPSender}'s contract) and fires when it ends.
    """

    def __init__(self, settings: Any, queue: Any, router: Any, openSession: Callable[..., defer.Deferred],
                 clock: Any, metrics: DeliveryMetrics, perDomain: int | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.router = router
        self.openSession = openSession
        self.clock = clock
        self.metrics = metrics
        self.hostname = settings.hostname
        self.smarthost = settings.relay.mode == "smarthost"
        self.concurrency = settings.queue.concurrency
        self.perDomain = perDomain or (self.concurrency if self.smarthost else min(PER_DOMAIN, self.concurrency))
        self.maxLoaded = self.concurrency * LOADED_PER_CONNECTION
        self.scheduled: dict[str, float] = {}  # id -> next attempt
        self._heap: list[tuple[float, str]] = []
        self.fresh: deque[str] = deque()  # kicked: attempt as soon as there is room
        self._freshIds: set[str] = set()
        self.unreadable: set[str] = set()  # envelopes that could not be read (reported once)
        self.flights: dict[str, Flight] = {}
        self.outbox: dict[str, deque[Job]] = defaultdict(deque)
        self.active: dict[str, int] = defaultdict(int)  # connections per domain
        self.starting: dict[str, int] = defaultdict(int)  # connections not yet sending
        self.connections = 0
        self._pumpCall: Any = None
        self._loop: task.LoopingCall | None = None
        self._stopped: defer.Deferred | None = None
        self.writer = EnvelopeWriter(queue)
        #: Local delivery (L{netsvc.smtp.local.LocalDelivery}) for recipients at a local domain; None: none.
        self.local: Any = None
        self.outcomes = Outcomes(settings, queue, self.writer, metrics, clock, schedule=self._schedule,
                                 kick=self.kick, finished=self._finished)
        metrics.queued.setFunction(lambda: len(self.scheduled) + len(self.flights))

    # -- life cycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        if getattr(self.queue, "onCommit", None) is None:
            self.queue.onCommit = self.kick
        for id in self.queue.ids():
            try:
                env = self.queue.envelope(id)
            except (OSError, ValueError) as e:
                self.unreadable.add(id)
                log.error("queue: unreadable envelope {id}: {error}", id=id, error=str(e))
                continue
            self._schedule(id, env.next_attempt)
        if self.scheduled:
            log.info("delivery: {n} queued message(s) resumed", n=len(self.scheduled))
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(TICK, now=True)

    def stopService(self) -> Any:
        """
        Connections take no new message; the transactions in progress get up to
        L{STOP_GRACE} seconds to be answered (and recorded), so that a restart does
        not send them again.
        """
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pumpCall is not None and self._pumpCall.active():
            self._pumpCall.cancel()
        if not self.connections:
            return None
        self._stopped = defer.Deferred()
        timer = self.clock.callLater(STOP_GRACE, self._allStopped)
        self._stopped.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return self._stopped

    def _allStopped(self) -> None:
        d, self._stopped = self._stopped, None
        if d is not None:
            if self.connections:
                log.info("delivery: stopping with {n} connection(s) still open", n=self.connections)
            d.callback(None)

    def discover(self, id: str) -> None:
        """
        C{id} is in the queue, maybe committed by another worker (workers: N; see
        L{netsvc.smtp.watch}): schedule it unless it is known already -- as a due
        new message is kicked.  Idempotent; an id gone meanwhile is ignored.
        """
        if id in self.flights or id in self._freshIds or id in self.scheduled or id in self.unreadable:
            return
        try:
            env = self.queue.envelope(id)
        except FileNotFoundError:
            return  # delivered and removed meanwhile
        except (OSError, ValueError) as e:
            self.unreadable.add(id)  # said once: the scan would find it again every few seconds
            log.error("queue: unreadable envelope {id}: {error}", id=id, error=str(e))
            return
        if env.next_attempt <= self.clock.seconds():
            self.kick(id)
        else:
            self._schedule(id, env.next_attempt)

    def kick(self, id: str) -> None:
        """A new message was committed: attempt it as soon as there is room."""
        if id in self.flights or id in self._freshIds:
            return
        self.scheduled.pop(id, None)
        self.fresh.append(id)
        self._freshIds.add(id)
        self._wake()

    # -- scheduling ---------------------------------------------------------------------------

    def _schedule(self, id: str, when: float) -> None:
        self.scheduled[id] = when
        heapq.heappush(self._heap, (when, id))

    def _finished(self, id: str) -> None:
        """L{Outcomes}: the attempt of C{id} is over (rescheduled, or gone): room for another."""
        self.flights.pop(id, None)
        self._wake()

    def _wake(self) -> None:
        if self.running and (self._pumpCall is None or not self._pumpCall.active()):
            self._pumpCall = self.clock.callLater(0, self._pump)

    def _tick(self) -> None:
        self._applyRequests()
        self._pump()

    def _due(self, now: float) -> str | None:
        if self.fresh:
            id = self.fresh.popleft()
            self._freshIds.discard(id)
            return id
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, id = heapq.heappop(heap)
            if self.scheduled.get(id) == when:
                del self.scheduled[id]
                return id
        return None

    def _pump(self) -> None:
        if not self.running:
            return
        now = self.clock.seconds()
        while len(self.flights) < self.maxLoaded:
            id = self._due(now)
            if id is None:
                break
            self._load(id, now)
        for domain, box in list(self.outbox.items()):
            while (box and self.connections < self.concurrency and self.active[domain] < self.perDomain
                   and self.starting[domain] < len(box)):
                self._startConnection(domain)
            if not box and not self.active[domain]:
                del self.outbox[domain]

    def _load(self, id: str, now: float) -> None:
        if id in self.flights:
            return
        try:
            env = self.queue.envelope(id)
            path = self.queue.messagePath(id)
            size = path.stat().st_size
            eightBit = _hasEightBit(path)
        except FileNotFoundError:
            return  # deleted meanwhile
        except (OSError, ValueError) as e:
            self.unreadable.add(id)
            log.error("queue: cannot read {id}: {error}; left in place", id=id, error=str(e))
            return
        flight = Flight(id, env, path, size, eightBit)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(env.recipients):
            if r.status != "pending":
                continue
            if self.local is not None and self.local.router.isLocal(r.address):
                groups[LOCAL].append(i)
            else:
                groups["*" if self.smarthost else r.address.rpartition("@")[2].lower()].append(i)
        if not groups:
            self.writer.remove(id)  # finished before a crash that kept the envelope
            return
        self.flights[id] = flight
        flight.groups = len(groups)
        for domain, indexes in groups.items():
            self.outbox[domain].append(Job(flight, indexes, domain))

    # -- connections --------------------------------------------------------------------------

    def _startConnection(self, domain: str) -> None:
        self.connections += 1
        self.active[domain] += 1
        self.starting[domain] += 1
        self.metrics.connections.inc()
        d = self._connection(domain)
        d.addErrback(lambda f: log.failure("delivery to {domain}", f, domain=domain))

        def done(_: Any) -> None:
            self.connections -= 1
            self.active[domain] -= 1
            if not self.active[domain]:  # one entry per domain ever seen would grow without end
                del self.active[domain]
                self.starting.pop(domain, None)
            self.metrics.connections.dec()
            if not self.connections and self._stopped is not None:
                self._allStopped()
            self._wake()

        d.addBoth(done)

    @defer.inlineCallbacks
    def _connection(self, domain: str) -> Any:
        state = {"starting": True, "count": 0, "job": None, "target": None}

        def started() -> None:
            if state["starting"]:
                state["starting"] = False
                self.starting[domain] -= 1

        try:
            if domain == LOCAL:
                started()
                box = self.outbox.get(domain)
                while box and self.running:
                    job = box.popleft()
                    try:
                        outcomes = yield self.local.deliverQueued(job.flight.path, job.flight.envelope, job.indexes,
                                                                  self.queue)
                    except Exception:  # a bug: logged, and the job answered (retried), never left in flight
                        log.failure("delivery {id}: local delivery", id=job.flight.id)
                        outcomes = [(i, "defer", ("4.3.0", "local delivery failed")) for i in job.indexes]
                    self.outcomes.groupAnswered(job, outcomes)
                return
            try:
                targets = yield self.router.route(domain)
            except RoutingError as e:
                self._answerQueued(domain, e.status, str(e), e.permanent)
                return
            except Exception as e:  # a bug or an unexpected resolver error: retry later
                self._answerQueued(domain, "4.4.3", f"routing failed: {e}", False)
                return
            lastError = None
            for target in targets:
                if not self.outbox.get(domain) or not self.running:
                    return
                state["target"] = target

                def nextMessage() -> Outgoing | None:
                    started()
                    box = self.outbox.get(domain)
                    if not self.running or not box or state["count"] >= MESSAGES_PER_CONNECTION:
                        return None
                    job = box.popleft()
                    state["count"] += 1
                    state["job"] = job
                    return self._outgoing(job)

                def onResult(message: Outgoing, results: list[Any], target: Any = target) -> None:
                    state["job"] = None
                    self.outcomes.answered(message.key, results, target)

                try:
                    yield self.openSession(target, nextMessage, onResult)
                    return
                except Exception as e:
                    lastError = e
                    job = state["job"]
                    if job is not None:  # died in the middle of this message: only it waits
                        state["job"] = None
                        reason = f"{target}: {_describe(e)}"
                        self.outcomes.groupAnswered(job, [(i, "defer", ("4.4.2", reason)) for i in job.indexes])
                    if state["count"]:
                        return  # it did deliver: the destination works; the rest of the outbox goes on
                    log.info("delivery: {target}: {error}", target=str(target), error=_describe(e))
            if lastError is not None:
                what = f"{state['target']}: {_describe(lastError)}"
                self._answerQueued(domain, "4.4.1", what, False)
        finally:
            started()

    def _outgoing(self, job: Job) -> Outgoing:
        f = job.flight
        env = f.envelope
        rcpts = [Recipient(env.recipients[i].address, env.recipients[i].notify, env.recipients[i].orcpt)
                 for i in job.indexes]
        return Outgoing(env.sender, rcpts, lambda: open(f.path, "rb"), f.size, ret=env.ret, envid=env.envid,
                        eightBit=f.eightBit, key=job)

    def _answerQueued(self, domain: str, status: str, reason: str, permanent: bool) -> None:
        """Every job waiting for C{domain} gets the same answer (no route, destination down)."""
        box = self.outbox.get(domain)
        while box:
            job = box.popleft()
            if permanent:
                outcomes = [(i, "fail", (status, f"X-netsvc; {reason}", None)) for i in job.indexes]
            else:
                outcomes = [(i, "defer", (status, reason)) for i in job.indexes]
            self.outcomes.groupAnswered(job, outcomes)

    # -- control requests -----------------------------------------------------------------------

    def _applyRequests(self) -> None:
        now = self.clock.seconds()
        for action, id in takeRequests(self.queue.ctl):
            if action == "retry" and id == "all":
                for other in list(self.scheduled):
                    self._schedule(other, now)
                log.info("queue: retry of every message requested")
            elif action == "retry" and id in self.scheduled:
                self._schedule(id, now)
                log.info("queue: retry of {id} requested", id=id)
            elif action == "retry":
                log.info("queue: retry of {id} requested: already being attempted (or gone)", id=id)
            elif action == "delete":
                if id in self.flights:
                    self.flights[id].deleteRequested = True
                else:
                    self.scheduled.pop(id, None)
                    self.writer.remove(id)
                log.info("queue: {id} deleted on request", id=id)
            else:
                log.info("queue: ignoring control request {action}-{id}", action=action, id=id)


def makeDelivery(settings: Any, queue: Any, context: Any) -> Delivery:
    """
    The delivery service for C{settings} (C{relay.mode} smarthost or mx) over
    C{queue}: routes, sessions and credentials from L{netsvc.smtp.outbound}.

    @raise netsvc.runtime.StartupError: the relay's cacert or password file is unusable.
    """
    from netsvc.smtp.outbound import buildDelivery

    return buildDelivery(settings, queue, context)
