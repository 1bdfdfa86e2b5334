"""
Requests from C{netsvc mail queue} to the running daemon: files in C{<queue>/ctl/}.

    request(queue.ctl, "retry-all")          # the CLI: an empty file, created atomically
    for action, id in takeRequests(queue.ctl):   # the daemon, every second: read and removed
        ...

Names: C{retry-ID}, C{retry-all}, C{delete-ID}.  The daemon owns the envelopes
(one writer), so the CLI never rewrites them while it runs; it asks.  A request
that is already waiting is as good as a new one.
"""

from __future__ import annotations

import os
from pathlib import Path

ACTIONS = ("retry", "delete")


def request(ctl: Path, name: str) -> None:
    """Drop request C{name} into the folder C{ctl} (atomic create)."""
    try:
        fd = os.open(Path(ctl) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def takeRequests(ctl: Path) -> list[tuple[str, str]]:
    """The waiting requests as (action, id or "all"), oldest name first; each file removed as read."""
    try:
        names = sorted(os.listdir(ctl))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            os.unlink(Path(ctl) / name)
        except FileNotFoundError:
            continue  # taken by someone else
        action, _, id = name.partition("-")
        out.append((action, id))
    return out
