"""
The top-level C{workers:} setting and what it cannot be combined with.

    workers: 4        # or auto: one per CPU; default 1 (no worker processes)

Checked up front (C{netsvc check-config} too), each a L{Problem} naming the key:
  - chat with C{workers > 1} needs C{services.chat.fanout} (Redis): otherwise each
    worker would hold its own rooms, and users on two workers would not meet.
  - SMTP runs with C{workers > 1} (every worker accepts into the one queue folder,
    worker 0 alone delivers: L{netsvc.workers.isDeliveryOwner}); nothing to refuse.
  - A writable LDAP directory with C{workers > 1} is refused: each worker has its
    own copy of the directory.
  - A listener Twisted binds by itself in a way a worker cannot adopt
    (C{tls:DIR} SNI folders, plugin endpoints) is refused with C{workers > 1}.
"""

from __future__ import annotations

import os
from typing import Any

from netsvc.schema import Invalid

#: Upper bound: more workers than this is a typo, not a plan.
MAX_WORKERS = 256


class WorkerCount(int):
    """C{workers:} -- a number of processes (1 to 256), or C{auto} for the number of CPUs."""

    auto = False

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: object = None) -> WorkerCount:
        if value == "auto":
            n = cls(cpuCount())
            n.auto = True
            return n
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected a number of worker processes or auto, got {value!r}")
        if not 1 <= value <= MAX_WORKERS:
            raise Invalid(f"must be between 1 and {MAX_WORKERS}, got {value}")
        return cls(value)


class CPUAffinity(str):
    """
    C{cpu_affinity:} -- C{auto} (pin workers to CPUs and steer connections to the
    worker on their CPU; see L{netsvc.workers.affinity}) or C{off}, the default
    (YAML's C{off}, C{false} and C{no} are all read as false).
    """

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: object = None) -> CPUAffinity:
        if value is False or value == "off":
            return cls("off")
        if value is True or value == "auto":
            return cls("auto")
        raise Invalid(f"expected auto or off, got {value!r}")


def cpuCount() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: Endpoint types a worker can adopt from the parent (see netsvc.workers.sockets).
SHAREABLE = ("tcp", "tcp6", "ssl", "unix", "udp", "tls")


def checkWorkers(settings: Any) -> list[tuple[str, str]]:
    """Problems (key, reason) with running C{settings} as C{settings.workers} processes."""
    if int(getattr(settings, "workers", 1)) <= 1:
        return []
    from netsvc import endpoints

    problems = []
    n = int(settings.workers)
    services = settings.services
    chat = services.get("chat")
    if chat is not None and chat.enabled and getattr(chat, "fanout", None) is None:
        problems.append(("services.chat.fanout",
                         f"required with workers: {n} -- without it each worker has its own rooms and users "
                         f"on two workers never meet; add fanout: {{redis: \"tcp:host=127.0.0.1:port=6379\"}} "
                         f"or set workers: 1"))
    # services.smtp: allowed -- every worker accepts into the shared queue, worker 0 delivers (netsvc.smtp.service).
    ldap = services.get("ldap")
    if ldap is not None and ldap.enabled and getattr(ldap, "writable", False):
        problems.append(("services.ldap.writable",
                         f"not supported with workers: {n} -- each worker holds its own copy of the directory: "
                         f"a write in one would not reach the others; set writable: false or workers: 1"))
    listeners = [(f"services.{name}.listen[{i}]", l.endpoint)
                 for name, svc in services.items() if svc.enabled for i, l in enumerate(getattr(svc, "listen", []))]
    listeners += [(f"metrics.listen[{i}]", l.endpoint) for i, l in enumerate(settings.metrics.listen)]
    for key, description in listeners:
        kind, args, kwargs = endpoints.split(description)
        if kind not in SHAREABLE or (kind == "tls" and not endpoints.isSharedTLS(kind, args, kwargs)):
            problems.append((key, f"{description!r} cannot be shared by worker processes; "
                                  f"use tcp:, tcp6:, tls:PORT, ssl:, unix: or udp:, or workers: 1"))
    return problems
