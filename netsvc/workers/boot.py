"""
C{python -m netsvc.workers.boot TWISTD-ARGS...}: how the supervisor starts a
worker.  Before running twistd it asks Linux to send it SIGTERM when the parent
dies (so an orphaned worker drains and exits rather than serving on alone),
pins itself to its CPUs (C{cpu_affinity: auto}: before any thread starts),
and leaves the terminal's process group (Ctrl-C reaches the parent, which
stops the workers in order).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    parent = int(os.environ.get("NETSVC_WORKER_PARENT", "0"))
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the parent's SIGTERM is all there is
        pass
    if parent and os.getppid() != parent:
        sys.exit(0)  # the parent died before we could ask to be told
    try:
        os.setpgrp()
    except OSError:
        pass
    cpus = os.environ.get("NETSVC_WORKER_CPUS")  # netsvc.workers.ENV_CPUS, without importing the package
    if cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        except (AttributeError, ValueError, OSError) as e:  # a CPU taken away since: run unpinned
            print(f"netsvc worker: cannot pin to CPUs {cpus}: {e}", file=sys.stderr)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
