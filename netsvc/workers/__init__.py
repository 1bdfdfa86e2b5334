"""
C{workers: N}: one netsvc daemon as N worker processes sharing the listeners.

  - L{settings}: the C{workers:} value (C{auto} = the CPU count) and the checks
    of what cannot run as several workers (chat without a fan-out, a writable LDAP).
  - L{sockets}: the parent binds every listener once (or once per worker, with
    SO_REUSEPORT); a worker adopts what it is given instead of binding.
  - L{supervisor}: the parent: starts the workers, restarts the ones that die
    (with backoff), passes SIGHUP on, drains them on SIGTERM, and exits with a
    status that says what failed.
  - L{worker}: what a worker does differently (adopted listeners, its status
    file, metrics of the whole daemon on C{/metrics} and C{/status}).
  - L{aggregate}: merging the workers' metrics.
  - L{affinity}: C{cpu_affinity: auto}: workers pinned to CPUs, connections steered
    to the worker on their CPU.

This module imports nothing heavy: L{current} is safe to call from any service
(e.g. C{if not workers.isDeliveryOwner(): ...} for a single-owner loop).
"""

from __future__ import annotations

import json
import os

import attrs

#: Set in a worker's environment: "INDEX/COUNT".
ENV_WORKER = "NETSVC_WORKER"
#: Set in a worker's environment: JSON {listener key: [fd, family, type]}, and the readiness pipe's fd.
ENV_SOCKETS = "NETSVC_WORKER_SOCKETS"
ENV_READY = "NETSVC_WORKER_READY_FD"
#: Set in a worker's environment with cpu_affinity: the CPUs it runs on ("0,2").
ENV_CPUS = "NETSVC_WORKER_CPUS"


@attrs.frozen
class WorkerInfo:
    """This process is worker C{index} (from 0) of C{count}; C{sockets}: key -> (fd, family, type)."""

    index: int
    count: int
    sockets: dict[str, tuple[int, int, str]]
    readyFD: int | None


def current() -> WorkerInfo | None:
    """This process's place among the workers, or None when it is not a worker (workers: 1)."""
    raw = os.environ.get(ENV_WORKER)
    if not raw:
        return None
    index, _, count = raw.partition("/")
    sockets = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in json.loads(os.environ.get(ENV_SOCKETS, "{}")).items()}
    ready = os.environ.get(ENV_READY)
    return WorkerInfo(int(index), int(count), sockets, int(ready) if ready else None)


def isDeliveryOwner() -> bool:
    """Whether this process runs single-owner loops (a mail queue's delivery): not a worker, or worker 0."""
    info = current()
    return info is None or info.index == 0
