"""
C{netsvc mail queue list|show ID|retry [ID]|delete ID} and C{netsvc mail adduser}.

The queue folder is found from the configuration (C{--config}, default
C{etc/netsvc.yaml}): C{<state_dir>/<services.smtp.queue.dir>}.  C{list} and
C{show} only read.  While the daemon runs it owns the envelopes, so C{retry}
and C{delete} leave a request in C{<queue>/ctl/} (C{retry-ID}, C{retry-all},
C{delete-ID}) that its delivery loop applies within a second or two
(L{netsvc.smtp.delivery}); with no daemon running, C{delete} acts at once and
a retry request waits for the next start.

Exit status: 0 done, 1 no such message / unreadable queue, 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from netsvc import auth
from netsvc.smtp.control import request

DEFAULT_CONFIG = "etc/netsvc.yaml"


class QueueCLIError(Exception):
    """What went wrong, as one line."""


def queueFolder(configFile: str) -> tuple[Path, Path]:
    """(the queue folder, the state folder) for a configuration file; @raise QueueCLIError."""
    from netsvc.config import ConfigError, load

    try:
        settings = load(configFile)
    except ConfigError as e:
        raise QueueCLIError(str(e).splitlines()[0]) from None
    except OSError as e:
        raise QueueCLIError(f"{configFile}: {e.strerror or e}") from None
    smtp = settings.services.get("smtp")
    if smtp is None:
        raise QueueCLIError(f"{configFile}: no services.smtp section")
    if smtp.relay.mode == "capture":
        captured = os.path.normpath(settings.stateDir / "captured")
        raise QueueCLIError(f"{configFile}: services.smtp.relay is capture: nothing is delivered, so there is "
                            f"no queue; the mail is kept under {captured} (the web service lists it at /mail/)")
    return settings.stateDir / smtp.queue.dir, settings.stateDir


def daemonRunning(stateDir: Path) -> bool:
    """Whether the daemon that wrote C{status.json} is alive."""
    try:
        pid = int(json.loads((stateDir / "status.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _openQueue(folder: Path) -> Any:
    from netsvc.smtp.queue import Queue

    if not (folder / "env").is_dir():
        raise QueueCLIError(f"no queue at {folder} (has the relay run with this configuration?)")
    return Queue(folder, fsync=False)  # reads, and a delete needs no folder fsync (it only removes)


def _checkId(queue: Any, id: str) -> None:
    if not id or "/" in id or id.startswith(".") or not (queue.env / f"{id}.json").exists():
        raise QueueCLIError(f"no message {id!r} in the queue")


def _age(seconds: float) -> str:
    """3d, 5h, 12m, 40s."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def listQueue(queue: Any, out: Any, now: float | None = None) -> int:
    now = time.time() if now is None else now
    ids = queue.ids()
    if not ids:
        out.write("the queue is empty\n")
        return 0
    out.write(f"{'ID':<28} {'AGE':>5} {'SIZE':>8} {'NEXT':>6}  SENDER -> PENDING RECIPIENTS (LAST ERROR)\n")
    for id in ids:
        try:
            env = queue.envelope(id)
            size = queue.messagePath(id).stat().st_size
        except (OSError, ValueError):
            continue  # delivered and removed while we looked
        pending = env.pending()
        nxt = _age(env.next_attempt - now) if env.next_attempt > now else "now"
        errors = sorted({r.last_error for r in pending if r.last_error})
        out.write(f"{id:<28} {_age(now - env.created):>5} {size:>8} {nxt:>6}  <{env.sender}> -> "
                  f"{', '.join(r.address for r in pending) or '(none)'}"
                  + (f" ({errors[0]})" if errors else "") + "\n")
    out.write(f"{len(ids)} message(s)\n")
    return 0


def showMessage(queue: Any, id: str, out: Any) -> int:
    _checkId(queue, id)
    env = queue.envelope(id)
    out.write(json.dumps(env.toJSON(), indent=2, sort_keys=True) + "\n")
    with open(queue.messagePath(id), "rb") as f:
        head = f.read(64 * 1024)
    headers = head.split(b"\r\n\r\n", 1)[0]
    out.write("\n" + headers.decode("utf-8", "replace").replace("\r\n", "\n") + "\n")
    return 0


def retry(queue: Any, id: str | None, running: bool, out: Any) -> int:
    if id is not None:
        _checkId(queue, id)
    request(queue.ctl, f"retry-{id}" if id else "retry-all")
    what = id or "every message"
    out.write(f"{what}: retry requested" + ("" if running else " (applied when the daemon starts)") + "\n")
    return 0


def delete(queue: Any, id: str, running: bool, out: Any) -> int:
    _checkId(queue, id)
    if running:
        request(queue.ctl, f"delete-{id}")
        out.write(f"{id}: delete requested\n")
    else:
        queue.remove(id)
        out.write(f"{id}: deleted\n")
    return 0


def runQueue(reactor: Any, args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        folder, stateDir = queueFolder(args.config)
        queue = _openQueue(folder)
        action = args.queueCommand
        if action == "list":
            return listQueue(queue, out)
        if action == "show":
            return showMessage(queue, args.id, out)
        running = daemonRunning(stateDir)
        if action == "retry":
            return retry(queue, args.id, running, out)
        return delete(queue, args.id, running, out)
    except QueueCLIError as e:
        sys.stderr.write(f"netsvc mail: queue {args.queueCommand}: {e}\n")
        return 1


def runAddUser(reactor: Any, args: argparse.Namespace) -> int:
    try:
        if args.password_file:
            lines = Path(args.password_file).read_text().splitlines()
            password = lines[0] if lines else ""
        else:
            try:
                open("/dev/tty").close()
            except OSError:
                sys.stderr.write("netsvc mail: adduser: no terminal to ask the password on; give --password-file\n")
                return 2
            password = getpass.getpass(f"Password for {args.user}: ")
            if getpass.getpass("Again: ") != password:
                sys.stderr.write("netsvc mail: adduser: the passwords differ\n")
                return 2
    except OSError as e:
        sys.stderr.write(f"netsvc mail: adduser: --password-file {args.password_file}: {e.strerror or e}\n")
        return 2
    if not password:
        sys.stderr.write("netsvc mail: adduser: empty password\n")
        return 2
    try:
        auth.addUser(args.users, args.user, password)
    except ValueError as e:
        sys.stderr.write(f"netsvc mail: adduser: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"netsvc mail: adduser: writing {args.users}: {e.strerror or e}\n")
        return 1
    sys.stdout.write(f"{args.user}: added to {args.users}\n")
    return 0


def addParsers(commands: Any) -> None:
    """C{queue} and C{adduser} under C{netsvc mail}."""
    q = commands.add_parser("queue", help="the relay's queue: list, show, retry, delete")
    q.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"the daemon's configuration (default {DEFAULT_CONFIG})")
    actions = q.add_subparsers(dest="queueCommand", metavar="ACTION", required=True)
    actions.add_parser("list", help="every queued message, oldest first")
    actions.add_parser("show", help="one message's envelope and headers").add_argument("id", metavar="ID")
    actions.add_parser("retry", help="retry now (one message, or all)").add_argument(
        "id", metavar="ID", nargs="?")
    actions.add_parser("delete", help="remove a message (no bounce)").add_argument("id", metavar="ID")
    for name in ("list", "show", "retry", "delete"):
        actions.choices[name].add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                                           help="the daemon's configuration")
    q.set_defaults(run=runQueue)
    a = commands.add_parser("adduser", help="add (or change) a relay user in a users file")
    a.add_argument("user", metavar="USER")
    a.add_argument("--users", required=True, metavar="FILE", help="the users file (services.smtp.users)")
    a.add_argument("--password-file", metavar="FILE", help="the password (first line); default: a prompt")
    a.set_defaults(run=runAddUser)
