"""
Mailbox benchmark: reading 1,000 small messages over IMAP and POP3 from netsvc's
C{services.mailbox} and from a real Dovecot, in the same run; and how fast
netsvc's SMTP local delivery accepts mail (250 after the Maildir fsync) compared
with its relay (250 after the queue fsync) and with Postfix delivering to a
Maildir.

    .venv/bin/python bench/mailbox.py [--messages 1000] [--size 1500] [--runs 5] [--no-smtp]

Both servers read the same messages: the same files are written into both
Maildirs' new/ before either starts, and one warm-up session per server moves
them to cur/ and assigns the UIDs (Dovecot builds its index, netsvc its UID list)
before anything is timed.  Dovecot 2.3 runs from its own dovecot.conf in a
temporary folder (tests/interop/_dovecot.py, C{dovecot -F -c CONF}: base_dir,
state, logs and mail there, a passwd-file user, free loopback ports, its
high-performance login mode; nothing under /etc or /var is touched).
Both serve implicit TLS with the same certificate (netsvc allows LOGIN only
after TLS; so Dovecot gets C{ssl = required} too) and the same {SSHA} password
hash.

Workloads, each in a fresh session (connect, TLS, login, SELECT/STAT not timed):
  - IMAP C{UID FETCH 1:* (RFC822)}: one command answered with every message;
  - IMAP C{UID FETCH <uid> (RFC822)}, one command per message (a round trip each);
  - POP3 C{RETR n}, one command per message;
  - logins: connect, TLS, LOGIN, SELECT INBOX, LOGOUT (IMAP), timed whole.
The client is Python's imaplib/poplib (what the books teach) on another CPU
than the servers; the log line of each figure says how busy that client was
(its CPU time / wall time): near 100 % means the client, not the server, set
the pace, and the ratio understates the faster server.  Every fetched message
is compared with what was written (line endings aside) in the first run.

SMTP (needs root and Debian's postfix for smtp-source): smtp-source (8 sessions,
many messages per connection, as bench/smtp.py) to netsvc with a local
recipient, to netsvc with a remote recipient (capture mode: the relay's accept
path), and to a private Postfix delivering to a Maildir (virtual(8)), counted
until the last message is in new/.

Each figure is the median of C{--runs} runs, servers interleaved within a run.
Prints one markdown table with the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import imaplib
import importlib.util
import json
import os
import poplib
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import SkipTest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import log, prepare  # noqa: E402
from netsvc import auth  # noqa: E402
from netsvc.tls.certificates import generateSelfSigned  # noqa: E402
from tests.interop._daemon import _dieWithParent  # noqa: E402
from tests.interop._dovecot import NOBODY, Dovecot  # noqa: E402
from tests.interop._mailpeers import Scratch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
USER = "bench"
PASSWORD = "bench-password"
#: the SMTP figures deliver to this user, so that USER's INBOX keeps its messages count
LOAD_USER = "load"
START_TIMEOUT = 30.0
IO_TIMEOUT = 60.0


# -- the messages -----------------------------------------------------------------


def makeMessages(count: int, size: int) -> list[bytes]:
    """C{count} distinct small messages of about C{size} bytes, LF line endings (as Maildir files are)."""
    out = []
    for i in range(count):
        head = (f"Return-Path: <source@example.test>\n"
                f"From: Source <source@example.test>\n"
                f"To: {USER}@bench.test\n"
                f"Subject: bench message {i}\n"
                f"Date: Mon, 07 Dec 2026 05:00:00 +0000\n"
                f"Message-ID: <{i}.bench@example.test>\n\n").encode()
        line = f"line of message {i} ".ljust(71, "x").encode() + b"\n"
        body = line * max(1, (size - len(head)) // len(line))
        out.append(head + body)
    return out


def fillMaildir(maildir: Path, messages: list[bytes], owner: int | None = None) -> None:
    """A Maildir (cur/new/tmp) at C{maildir} with C{messages} in new/, oldest first by name."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    base = 1_800_000_000
    for i, data in enumerate(messages):
        (maildir / "new" / f"{base + i}.M{i:06d}P1.bench.test,S={len(data)}").write_bytes(data)
    if owner is not None:
        for dirpath, _dirs, files in os.walk(maildir.parent):
            os.chown(dirpath, owner, owner)
            for f in files:
                os.chown(os.path.join(dirpath, f), owner, owner)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# -- the servers ------------------------------------------------------------------


def stopProcess(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Server:
    """A server under test: its name, the IMAPS and POP3S ports, its main process."""

    def __init__(self, name: str, imaps: int, pop3s: int, process: subprocess.Popen, logPath: Path) -> None:
        self.name, self.imaps, self.pop3s, self.process, self.logPath = name, imaps, pop3s, process, logPath

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.process.returncode}: "
                               f"{self.logPath.read_text(errors='replace')[-2000:]}")


def startDovecot(scratch: Scratch, messages: list[bytes], cert: Path, key: Path) -> Server:
    """A private Dovecot (tests/interop/_dovecot.py) with C{messages} in the user's INBOX."""
    try:
        dovecot = Dovecot(scratch, {USER: PASSWORD}, cert, key)
    except SkipTest as e:
        raise RuntimeError(str(e)) from None
    fillMaildir(dovecot.maildir(USER), messages, owner=NOBODY)
    return Server("Dovecot", dovecot.imaps, dovecot.pop3s, dovecot.process, dovecot.base / "dovecot.log")


NETSVC_CONFIG = """\
state_dir: {state}
log: {{level: warn}}
tls: {{cert: {cert}, key: {key}}}
services:
  smtp:
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: bench.test
    relay: {{capture: true, keep: 1000000}}
    users: {users}
    local: {{domains: [bench.test], maildir: {mail}, aliases: {{postmaster: bench}}}}
    queue: {{fsync: true, retry: [5s]}}
    max_messages_per_session: 100000
    limits: {{max_connections_per_ip: 1024, rate: 0}}
  mailbox:
    listen:
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: imap}}
      - {{endpoint: "tls:0:interface=127.0.0.1", protocol: pop3}}
    users: {users}
    maildir: {mail}
"""


class Netsvc(Server):
    smtp: int


def startNetsvc(scratch: Scratch, messages: list[bytes], cert: Path, key: Path) -> Netsvc:
    """C{twistd -n netsvc --config} with the mailbox service and SMTP local delivery; C{messages} in the INBOX."""
    base = Path(scratch.mktemp())
    base.mkdir()
    mail = base / "mail"
    fillMaildir(mail / USER, messages)
    users = base / "users.txt"
    auth.addUser(users, USER, PASSWORD, scheme="ssha")
    auth.addUser(users, LOAD_USER, PASSWORD, scheme="ssha")
    state = base / "state"
    (base / "netsvc.yaml").write_text(NETSVC_CONFIG.format(state=state, cert=cert, key=key, mail=mail, users=users))
    logPath = base / "out.log"
    out = open(logPath, "wb")  # noqa: SIM115 - closed with the scratch folder
    twistd = Path(sys.executable).with_name("twistd")
    process = subprocess.Popen([str(twistd), "-n", "--pidfile=", "netsvc", "--config", str(base / "netsvc.yaml")],
                               cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), preexec_fn=_dieWithParent)
    scratch.addCleanup(stopProcess, process)
    scratch.addCleanup(out.close)
    deadline = time.monotonic() + START_TIMEOUT
    status = None
    while status is None or status.get("pid") != process.pid:
        if process.poll() is not None or time.monotonic() > deadline:
            stopProcess(process)
            raise RuntimeError(f"netsvc did not start: {logPath.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
        try:
            status = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            status = None
    ports = {entry["key"]: int(entry["port"]) for entry in status["listeners"]}
    server = Netsvc("netsvc", ports["services.mailbox.listen[0]"], ports["services.mailbox.listen[1]"],
                    process, logPath)
    server.smtp = ports["services.smtp.listen[0]"]
    server.mail = mail  # type: ignore[attr-defined]
    return server


# -- the clients ------------------------------------------------------------------


class Measure:
    """Wall time and the client's own CPU time of one timed block."""

    def __enter__(self) -> Measure:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    @property
    def busy(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0


def imapSession(server: Server, context: ssl.SSLContext) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=context, timeout=IO_TIMEOUT)
    client.login(USER, PASSWORD)
    typ, data = client.select("INBOX")
    if typ != "OK":
        raise RuntimeError(f"{server.name}: SELECT INBOX: {typ} {data}")
    return client


def abandon(client: imaplib.IMAP4) -> None:
    """Close a session after a failure (logout() closes it otherwise)."""
    try:
        client.shutdown()
    except OSError:
        pass


def checkFetched(server: Server, got: list[bytes], expected: list[bytes] | None, what: str, count: int) -> None:
    """Every run: C{count} messages came; with C{expected}, each is what was stored (line endings aside)."""
    if len(got) != count:
        raise RuntimeError(f"{server.name}: {what}: {len(got)} messages, expected {count}")
    if expected is not None:
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            if crlf(g) != crlf(e):
                raise RuntimeError(f"{server.name}: {what}: message {i + 1} differs from what was stored "
                                   f"({len(g)} bytes, expected {len(crlf(e))})")


def imapFetchAll(server: Server, context: ssl.SSLContext, expected: list[bytes] | None,
                 count: int) -> tuple[float, Measure]:
    client = imapSession(server, context)
    try:
        with Measure() as m:
            typ, data = client.uid("FETCH", "1:*", "(RFC822)")
        if typ != "OK":
            raise RuntimeError(f"{server.name}: UID FETCH 1:*: {typ} {data[:1]}")
        got = [item[1] for item in data if isinstance(item, tuple)]
        checkFetched(server, got, expected, "UID FETCH 1:* (RFC822)", count)
        client.logout()
    except BaseException:
        abandon(client)
        raise
    return count / m.wall, m


def imapFetchEach(server: Server, context: ssl.SSLContext, expected: list[bytes] | None,
                  count: int) -> tuple[float, Measure]:
    client = imapSession(server, context)
    try:
        typ, data = client.uid("SEARCH", None, "ALL")
        uids = data[0].split()
        got = []
        with Measure() as m:
            for uid in uids:
                typ, data = client.uid("FETCH", uid, "(RFC822)")
                if typ != "OK":
                    raise RuntimeError(f"{server.name}: UID FETCH {uid!r}: {typ} {data[:1]}")
                got.append(data[0][1])
        checkFetched(server, got, expected, "UID FETCH <uid> (RFC822)", count)
        client.logout()
    except BaseException:
        abandon(client)
        raise
    return count / m.wall, m


def popRetrEach(server: Server, context: ssl.SSLContext, expected: list[bytes] | None,
                count: int) -> tuple[float, Measure]:
    client = poplib.POP3_SSL("127.0.0.1", server.pop3s, context=context, timeout=IO_TIMEOUT)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        n, _ = client.stat()
        got = []
        with Measure() as m:
            for i in range(1, n + 1):
                _, lines, _ = client.retr(i)
                got.append(b"\r\n".join(lines) + b"\r\n")
        checkFetched(server, got, expected, "RETR", count)
        client.quit()  # nothing deleted: the mailbox stays as it was
    finally:
        client.close()
    return n / m.wall, m


def imapLogins(server: Server, context: ssl.SSLContext, expected: list[bytes] | None,
               count: int) -> tuple[float, Measure]:
    logins = max(1, count // 5)
    with Measure() as m:
        for _ in range(logins):
            client = imapSession(server, context)
            client.logout()
    return logins / m.wall, m


WORKLOADS: list[tuple[str, str, Callable]] = [
    ("IMAP UID FETCH 1:* (RFC822), one command", "msg/s", imapFetchAll),
    ("IMAP UID FETCH uid (RFC822), one command per message", "msg/s", imapFetchEach),
    ("POP3 RETR, one command per message", "msg/s", popRetrEach),
    ("IMAP connect + TLS + LOGIN + SELECT + LOGOUT", "sessions/s", imapLogins),
]


def warmUp(server: Server, context: ssl.SSLContext, count: int) -> None:
    """One session that SELECTs (new/ -> cur/, UIDs) and checks the count; then POP3 STAT."""
    client = imapSession(server, context)
    typ, data = client.uid("SEARCH", None, "ALL")
    found = len(data[0].split()) if typ == "OK" else -1
    client.logout()
    if found != count:
        raise RuntimeError(f"{server.name}: INBOX has {found} messages, expected {count}")
    pop = poplib.POP3_SSL("127.0.0.1", server.pop3s, context=context, timeout=IO_TIMEOUT)
    pop.user(USER)
    pop.pass_(PASSWORD)
    n, _ = pop.stat()
    pop.quit()
    if n != count:
        raise RuntimeError(f"{server.name}: POP3 STAT says {n} messages, expected {count}")


# -- SMTP: local delivery vs the relay ---------------------------------------------


def smtpRates(daemon: Netsvc, scratch: Scratch, args: argparse.Namespace,
              rows: dict[str, dict[str, list[float]]]) -> Callable[[int], None] | None:
    """The SMTP figures' run function (one call per run), or None when smtp-source/Postfix are missing."""
    from tests.interop._mailpeers import PostfixInstance, runSmtpSource

    try:
        postfix = PostfixInstance(scratch, mode="mailbox", domains=("bench.test",))
    except Exception as e:  # noqa: BLE001 - a missing peer only drops its column
        log(f"no Postfix for the SMTP figures: {e}")
        postfix = None

    def send(port: int, recipient: str) -> float:
        started = time.monotonic()
        result = runSmtpSource(port, sessions=8, messages=args.smtp_messages, size=args.size,
                               recipient=recipient, reuse=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {result.stderr.decode(errors='replace')[-300:]}")
        return time.monotonic() - started

    def inbox() -> int:
        box = daemon.mail / LOAD_USER  # type: ignore[attr-defined]
        return sum(len(os.listdir(box / sub)) for sub in ("new", "cur") if (box / sub).is_dir())

    def run(n: int) -> None:
        name = "SMTP accept (smtp-source -s 8 -d), 250 after fsync"
        before = inbox()
        elapsed = send(daemon.smtp, f"{LOAD_USER}@bench.test")
        if inbox() - before != args.smtp_messages:
            raise RuntimeError(f"netsvc local delivery: {inbox() - before} of {args.smtp_messages} in the Maildir")
        rows.setdefault(name + ": local delivery to Maildir", {}).setdefault("netsvc", []).append(
            args.smtp_messages / elapsed)
        elapsed = send(daemon.smtp, "sink@example.test")
        rows.setdefault(name + ": relay queue (capture)", {}).setdefault("netsvc", []).append(
            args.smtp_messages / elapsed)
        if postfix is not None:
            before = len(postfix.files())
            started = time.monotonic()
            send(postfix.port, "box@bench.test")
            deadline = time.monotonic() + 300
            while len(postfix.files()) < before + args.smtp_messages:
                if time.monotonic() > deadline:
                    raise RuntimeError("Postfix did not deliver every message within 300 s")
                time.sleep(0.005)
            rows[name + ": local delivery to Maildir"].setdefault("Dovecot", []).append(
                args.smtp_messages / (time.monotonic() - started))
        figures = {k: v for k, v in rows.items() if k.startswith("SMTP")}
        log(f"run {n}: " + "; ".join(f"{k[len(name) + 2:]}: " + ", ".join(f"{s} {v[-1]:.0f}" for s, v in f.items())
                                     for k, f in figures.items()))

    if importlib.util.find_spec("netsvc.smtp.local") is None:
        log("no SMTP local delivery figures: netsvc.smtp.local is missing")
        return None
    return run


# -- main -------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages in the INBOX (default 1000)")
    parser.add_argument("--size", type=int, default=1500, help="bytes per message (about; default 1500)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smtp-messages", type=int, default=2000)
    parser.add_argument("--no-smtp", action="store_true", help="only the IMAP and POP3 figures")
    parser.add_argument("--only", choices=["dovecot", "netsvc"], help="one server alone (to try the script)")
    args = parser.parse_args()
    serverCPUs, loadCPUs = prepare(parser, 4096)
    messages = makeMessages(args.messages, args.size)
    scratch = Scratch()
    try:
        base = Path(scratch.mktemp())
        cert, key = base / "cert.pem", base / "key.pem"
        generateSelfSigned(cert, key, ["localhost", "127.0.0.1"])
        os.chmod(base, 0o755)
        os.chmod(key, 0o644)  # Dovecot's config parser runs as root, but keep it readable for either server
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False  # connecting to 127.0.0.1; the certificate is still verified

        os.sched_setaffinity(0, serverCPUs)  # the servers (and their children) inherit this
        servers: list[Server] = []
        netsvc: Netsvc | None = None
        if args.only != "netsvc":
            servers.append(startDovecot(scratch, messages, cert, key))
        if args.only != "dovecot":
            netsvc = startNetsvc(scratch, messages, cert, key)
            servers.append(netsvc)
        os.sched_setaffinity(0, loadCPUs)
        for server in servers:
            warmUp(server, context, args.messages)
        smtpRun = None
        rows: dict[str, dict[str, list[float]]] = {}
        if netsvc is not None and not args.no_smtp:
            smtpRun = smtpRates(netsvc, scratch, args, rows)

        for run in range(1, args.runs + 1):
            for name, unit, workload in WORKLOADS:
                for server in servers:
                    server.check()
                    rate, m = workload(server, context, messages if run == 1 else None, args.messages)
                    rows.setdefault(name, {}).setdefault(server.name, []).append(rate)
                    log(f"run {run}: {name}: {server.name} {rate:.0f} {unit} (client busy {m.busy:.0%})")
            if smtpRun is not None:
                smtpRun(run)

        print(f"\nMailbox, {args.messages} messages of ~{args.size} bytes, Python imaplib/poplib over TLS, "
              f"median of {args.runs} runs; servers on 1 CPU of {os.cpu_count()} (shared machine)\n")
        print("| workload | peer | peer figure | netsvc | netsvc / peer |")
        print("|---|---|---:|---:|---:|")
        for name, figures in rows.items():
            unit = next((u for n, u, _ in WORKLOADS if n == name), "msg/s")
            peer = "Postfix 3.7 virtual(8)" if name.startswith("SMTP") else "Dovecot 2.3"
            d = statistics.median(figures["Dovecot"]) if "Dovecot" in figures else None
            n = statistics.median(figures["netsvc"]) if "netsvc" in figures else None
            print(f"| {name} | {peer if d else '-'} | {f'{d:.0f} {unit}' if d else '-'} | "
                  f"{f'{n:.0f} {unit}' if n else '-'} | {f'{n / d:.2f}x' if d and n else '-'} |")
        return 0
    finally:
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
