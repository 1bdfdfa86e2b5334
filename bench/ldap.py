"""
LDAP benchmark: simple binds per second and subtree searches per second
(C{(uid=userN)} from C{dc=example,dc=com}, N random) on a 1,000-entry directory,
against OpenLDAP's slapd (mdb, C{index uid,objectClass eq}, configured in a temp
folder with slapadd), ldaptor's stock in-memory server, and netsvc's
C{services.ldap} -- all started here, in the same run, on free loopback ports.

    .venv/bin/python bench/ldap.py [--entries 1000] [--procs 3] [--conns 4] [--depth 8] [--seconds 4] [--runs 3]

The load generator: C{--procs} processes, each with C{--conns} connections, each
keeping C{--depth} requests in flight (pipelined), pre-encoded BER over raw
sockets; a response is only framed and its result code checked.  Servers run on
the last CPU, the load on the others (as the other benchmarks do), so the figures
are per server core: slapd's worker threads share that one core too.  Each figure
is the median of C{--runs} runs, servers interleaved within a run.  Prints a
markdown table with the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ServerProcess, Unavailable, cpu_seconds, free_port, log, prepare, stop, wait_for  # noqa: E402
from netsvc.auth import hashPassword  # noqa: E402
from netsvc.ldap import codec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUFFIX = "dc=example,dc=com"

SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {folder}/slapd.pid
argsfile {folder}/slapd.args
sizelimit unlimited
access to attrs=userPassword by self read by anonymous auth by * none
access to * by * read
database mdb
maxsize 104857600
suffix "{suffix}"
directory {folder}/db
index uid,objectClass eq
"""

LDAPTOR_SERVER = """\
import sys
from twisted.internet import endpoints, reactor
from twisted.internet.protocol import ServerFactory
from twisted.python.components import registerAdapter
from ldaptor.inmemory import fromLDIFFile
from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols.ldap.ldapserver import LDAPServer

class Factory(ServerFactory):
    protocol = LDAPServer
    def __init__(self, root):
        self.root = root

registerAdapter(lambda f: f.root, Factory, IConnectedLDAPEntry)
with open(sys.argv[1], "rb") as f:
    d = fromLDIFFile(f)
d.addCallback(lambda root: endpoints.serverFromString(
    reactor, "tcp:%s:interface=127.0.0.1" % sys.argv[2]).listen(Factory(root)))
d.addErrback(lambda f: (print(f), reactor.stop()))
reactor.run()
"""


def makeLDIF(path: Path, entries: int) -> None:
    salt = b"benchslt"
    lines = [f"dn: {SUFFIX}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\n"
             f"dc: example\no: Example\n\n",
             f"dn: ou=users,{SUFFIX}\nobjectClass: organizationalUnit\nou: users\n\n"]
    for n in range(entries):
        lines.append(
            f"dn: uid=user{n},ou=users,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: user{n}\ncn: User {n}\n"
            f"sn: Number{n}\nmail: user{n}@example.com\n"
            f"userPassword: {hashPassword(f'pw-user{n}', 'ssha', salt=salt)}\n\n")
    path.write_text("".join(lines))


# -- the load generator -------------------------------------------------------------


def searchOp(n: int) -> bytes:
    flt = codec.tlv(0xA3, codec.octets(b"uid") + codec.octets(f"user{n}".encode()))
    attrs = codec.tlv(0x30, codec.octets(b"cn") + codec.octets(b"mail"))
    return codec.tlv(codec.SEARCH_REQUEST, codec.octets(SUFFIX.encode()) + codec.integer(2, 0x0A)
                     + codec.integer(0, 0x0A) + codec.integer(0) + codec.integer(0)
                     + codec.tlv(0x01, b"\x00") + flt + attrs)


def bindOp(n: int) -> bytes:
    return codec.tlv(codec.BIND_REQUEST, codec.integer(3) + codec.octets(f"uid=user{n},ou=users,{SUFFIX}".encode())
                     + codec.tlv(0x80, f"pw-user{n}".encode()))


def loadWorker(port: int, kind: str, entries: int, conns: int, depth: int, seconds: float, seed: int,
               out: multiprocessing.Queue) -> None:
    """Run one load process; put (completed operations, errors, elapsed seconds) on C{out}."""
    rng = random.Random(seed)
    ops = [(searchOp if kind == "search" else bindOp)(n) for n in range(entries)]
    doneTag = codec.SEARCH_DONE if kind == "search" else codec.BIND_RESPONSE
    sel = selectors.DefaultSelector()
    state = {}
    try:
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            state[s] = [bytearray(), 1]
            sel.register(s, selectors.EVENT_READ)
        completed = errors = 0
        start = time.monotonic()
        deadline = start + seconds

        def send(s, count):
            st = state[s]
            msgid = st[1]
            chunks = []
            for _ in range(count):
                chunks.append(codec.message(msgid, ops[rng.randrange(entries)]))
                msgid = msgid + 1 if msgid < 2**31 - 2 else 1
            st[1] = msgid
            s.setblocking(True)
            s.sendall(b"".join(chunks))
            s.setblocking(False)

        for s in state:
            send(s, depth)
        while time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                data = s.recv(262144)
                if not data:
                    raise Unavailable("server closed a connection")
                buf = state[s][0]
                buf += data
                pos, n, finished = 0, len(buf), 0
                while True:
                    if n - pos < 2:
                        break
                    first = buf[pos + 1]
                    if first < 0x80:
                        hl, cl = 2, first
                    else:
                        c = first & 0x7F
                        if n - pos < 2 + c:
                            break
                        hl, cl = 2 + c, int.from_bytes(buf[pos + 2:pos + 2 + c], "big")
                    if n - pos < hl + cl:
                        break
                    # messageID INTEGER, then the protocolOp: its tag and (for results) the code
                    idlen = buf[pos + hl + 1]
                    op = pos + hl + 2 + idlen
                    if buf[op] == doneTag:
                        finished += 1
                        oplen = buf[op + 1]
                        rc = op + (2 if oplen < 0x80 else 2 + (oplen & 0x7F))
                        if buf[rc + 2] != 0:
                            errors += 1
                    pos += hl + cl
                del buf[:pos]
                if finished:
                    completed += finished
                    send(s, finished)
        out.put((completed, errors, time.monotonic() - start))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put(e)
    finally:
        for s in state:
            s.close()


def measure(port: int, kind: str, args: argparse.Namespace, cpus: set[int]) -> tuple[float, int]:
    """(operations per second, operations) against the server on C{port} (all processes together)."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_pinned, args=(cpus, port, kind, args.entries, args.conns, args.depth,
                                                           args.seconds, seed, out))
             for seed in range(args.procs)]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 30) for _ in procs]
    for p in procs:
        p.join(10)
    for r in results:
        if isinstance(r, Exception):
            raise Unavailable(f"load generator: {r}")
    total = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    if errors:
        raise Unavailable(f"{errors} of {total} {kind} operations failed")
    return total / max(r[2] for r in results), total


def _pinned(cpus: set[int], *args) -> None:
    os.sched_setaffinity(0, cpus)
    loadWorker(*args)


# -- the servers --------------------------------------------------------------------------


def startServer(server: ServerProcess, cpus: set[int], env: dict | None = None) -> None:
    server.proc = subprocess.Popen(server.argv, stdout=open(server.log, "wb"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
                s.sendall(codec.message(1, bindOp(0)))
                return s.recv(100)[:1] == b"\x30"
        except OSError:
            return False

    wait_for(server, answers, 60, f"{server.name} answering on {server.port}", step=0.1)


def servers(folder: Path, ldif: Path, cpus: set[int]) -> list[ServerProcess]:
    out = []
    slapd, slapadd = shutil.which("slapd", path="/usr/sbin:/usr/bin"), shutil.which("slapadd", path="/usr/sbin")
    port = free_port()
    s = ServerProcess("slapd", [slapd or "slapd", "-d", "0", "-f", str(folder / "slapd.conf"),
                                "-h", f"ldap://127.0.0.1:{port}/"], port, folder / "slapd.log")
    if slapd is None or slapadd is None:
        s.error = "slapd not installed (Debian packages slapd, ldap-utils)"
    else:
        (folder / "db").mkdir()
        (folder / "slapd.conf").write_text(SLAPD_CONF.format(folder=folder, suffix=SUFFIX))
        added = subprocess.run([slapadd, "-q", "-f", str(folder / "slapd.conf"), "-l", str(ldif)],
                               capture_output=True)
        if added.returncode:
            s.error = f"slapadd: {added.stderr.decode(errors='replace').strip()[-200:]}"
    out.append(s)
    port = free_port()
    (folder / "ldaptor_server.py").write_text(LDAPTOR_SERVER)
    out.append(ServerProcess("ldaptor", [sys.executable, str(folder / "ldaptor_server.py"), str(ldif), str(port)],
                             port, folder / "ldaptor.log"))
    port = free_port()
    (folder / "netsvc.yaml").write_text(
        f"state_dir: {folder}/var\nlog: {{level: warn}}\nservices:\n  ldap:\n"
        f"    listen: [\"tcp:{port}:interface=127.0.0.1\"]\n    suffix: {SUFFIX}\n    ldif: [{ldif}]\n"
        f"    limits: {{max_connections_per_ip: 4096}}\n")
    out.append(ServerProcess("netsvc", [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
                                        "netsvc", "--config", str(folder / "netsvc.yaml")],
                             port, folder / "netsvc.log"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=3, help="load generator processes")
    parser.add_argument("--conns", type=int, default=4, help="connections per process")
    parser.add_argument("--depth", type=int, default=8, help="requests in flight per connection")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    serverCPUs, loadCPUs = prepare(parser, 1024)
    allCPUs = set(os.sched_getaffinity(0))
    if len(allCPUs) > 2:
        loadCPUs = allCPUs - serverCPUs
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results: dict[tuple[str, str], list[float]] = {}
    efficiency: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="netsvc-bench-ldap-") as tmp:
        folder = Path(tmp)
        ldif = folder / "directory.ldif"
        makeLDIF(ldif, args.entries)
        procs = servers(folder, ldif, serverCPUs)
        try:
            for server in procs:
                server.attempt(startServer, serverCPUs, env)
            for run in range(args.runs):
                for kind in ("bind", "search"):
                    for server in procs:
                        if server.error is None:
                            def step(server, kind=kind, run=run):
                                cpu = cpu_seconds(server.proc.pid)
                                rate, total = measure(server.port, kind, args, loadCPUs)
                                perCPU = total / max(1e-3, cpu_seconds(server.proc.pid) - cpu)
                                results.setdefault((server.name, kind), []).append(rate)
                                efficiency.setdefault((server.name, kind), []).append(perCPU)
                                log(f"  run {run + 1} {kind:>6} {server.name:>8}: {rate:10.0f}/s, "
                                    f"{perCPU:10.0f} per server CPU second")
                            server.attempt(step)
        finally:
            for server in procs:
                stop(server)
    names = [s.name for s in procs]
    print(f"\nLDAP, {args.entries} entries, {args.procs}x{args.conns} connections, {args.depth} in flight each; "
          f"servers on CPU {sorted(serverCPUs)}, load on {sorted(loadCPUs)}; median of {args.runs} runs "
          f"of {args.seconds:g} s (shared, noisy machine)\n")
    print("| workload | " + " | ".join(names) + " | netsvc / slapd | netsvc / ldaptor |")
    print("|---|" + "---:|" * (len(names) + 2))
    for table, unit in ((results, "/s"), (efficiency, " per server CPU-second")):
        med = {k: statistics.median(v) for k, v in table.items()}
        for kind, label in (("bind", "simple binds ({SSHA})"), ("search", "subtree searches (uid=userN)")):
            cells = [f"{med[(n, kind)]:,.0f}" if (n, kind) in med else "n/a" for n in names]
            ratios = []
            for peer in ("slapd", "ldaptor"):
                if ("netsvc", kind) in med and (peer, kind) in med:
                    ratios.append(f"{med[('netsvc', kind)] / med[(peer, kind)]:.2f}x")
                else:
                    ratios.append("n/a")
            print(f"| {label}{unit} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    for s in procs:
        if s.error:
            print(f"\n{s.name}: not measured: {s.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
