"""
A worker process: the same daemon as with C{workers: 1} (L{netsvc.runtime.buildDaemon}),
then L{prepare} changes what differs:

  - every listener adopts the socket the parent bound (no bind here);
  - its status goes to C{state_dir/workers/N.json} (C{status.json} is the parent's);
  - its metrics are written for the other workers every second, and its
    C{/metrics} and C{/status} answer for the whole daemon (L{aggregate});
  - its log lines say which worker wrote them (C{[worker1/netsvc.runtime#info]}, and a
    C{worker} field in JSON);
  - once running, it tells the parent so on the readiness pipe.

It runs under C{python -m netsvc.workers.boot}, which makes it die with the
parent (SIGTERM, so it drains) and leaves terminal signals to the parent.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from netsvc.workers import WorkerInfo
from netsvc.workers.aggregate import WholeDaemon, writeSnapshot
from netsvc.workers.sockets import AdoptingEndpoint

log = Logger()

#: How often a worker publishes its metrics for the others.
SNAPSHOT_INTERVAL = 1.0


def prepare(daemon: Any, info: WorkerInfo) -> None:
    """Make C{daemon} (built, not started) worker C{info.index} of C{info.count}."""
    context = daemon.context
    reactor = context.reactor
    for listener in daemon.listeners:
        fd, family, kind = info.sockets[listener.keyPath]
        listener.endpoint = AdoptingEndpoint(reactor, listener.endpoint, fd, family, kind)
    observer = getattr(daemon, "logObserver", None)
    if observer is not None:
        daemon.logObserver = _labelled(observer, info.index)
    folder = context.stateDir / "workers"
    daemon.statusName = f"workers/{info.index}.json"
    status = daemon.status

    def workerStatus() -> dict[str, Any]:
        out = dict(status())
        out["worker"] = info.index
        try:
            parent = json.loads((context.stateDir / "status.json").read_text())
            out["workers"] = parent.get("workers", [])
            out["pid"], out["worker_pid"] = parent.get("pid", out["pid"]), out["pid"]
        except (OSError, ValueError):
            pass
        return out

    daemon.status = workerStatus
    WholeDaemon(context.metrics, folder, info.index, info.count).install()
    own = folder / f"metrics-{info.index}.json"
    publisher = task.LoopingCall(writeSnapshot, context.metrics, own)
    publisher.clock = reactor

    def started() -> None:
        publisher.start(SNAPSHOT_INTERVAL, now=True).addErrback(
            lambda f: log.failure("worker {index}: cannot write metrics", f, index=info.index))
        log.info("worker {index} of {count} running (pid {pid})", index=info.index, count=info.count,
                 pid=os.getpid())
        if info.readyFD is not None:
            try:
                os.write(info.readyFD, b"ready\n")
                os.close(info.readyFD)
            except OSError:
                pass

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: publisher.running and publisher.stop())


def _labelled(observer: Any, index: int) -> Any:
    """A log observer that passes each event on with this worker's number in its namespace and fields."""
    prefix = f"worker{index}/"

    def observe(event: dict[str, Any]) -> None:
        observer({**event, "log_namespace": prefix + str(event.get("log_namespace", "")), "worker": index})

    return observe
