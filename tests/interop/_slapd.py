"""
A real OpenLDAP slapd (Debian package C{slapd}) for tests: configured in a
temporary folder (slapd.conf, an mdb database filled with slapadd), listening on
a free loopback port for ldap:// and another for ldaps://, with a certificate made
for 127.0.0.1 (or whatever names the test asks for), killed in cleanup.

    server = startSlapd(testCase)                   # skips with the install hint without slapd
    server.url, server.ldapsURL, server.cafile, server.users   # {"uid": "password"}

The directory: dc=example,dc=com, ou=users with C{USERS} inetOrgPersons ({SSHA}
passwords), ou=groups with one groupOfNames, the admin cn=admin,dc=example,dc=com
(password C{ADMIN_PASSWORD}).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from unittest import SkipTest

from netsvc.auth import hashPassword
from netsvc.ldap.ldifout import entryLDIF
from netsvc.tls import generateSelfSigned
from tests.helpers import freePort
from tests.interop._daemon import IO_TIMEOUT, _dieWithParent

SUFFIX = "dc=example,dc=com"
ADMIN_DN = "cn=admin,dc=example,dc=com"
ADMIN_PASSWORD = "admin-secret"
#: How many users ou=users has (user1 .. userN, password "pw-userN").
USERS = 12

CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {folder}/slapd.pid
argsfile {folder}/slapd.args
TLSCertificateFile {folder}/cert.pem
TLSCertificateKeyFile {folder}/key.pem
sizelimit size.soft=10 size.hard=10 size.prtotal=unlimited
access to attrs=userPassword by self read by anonymous auth by * none
access to * by * read
database mdb
maxsize 33554432
suffix "{suffix}"
rootdn "{admin}"
rootpw {adminHash}
directory {folder}/db
index uid eq
"""


def requireSlapd() -> tuple[str, str]:
    slapd, slapadd = shutil.which("slapd", path="/usr/sbin:/usr/bin"), shutil.which("slapadd", path="/usr/sbin")
    if slapd is None or slapadd is None or not Path("/usr/lib/ldap/back_mdb.so").exists() and not list(
            Path("/usr/lib/ldap").glob("back_mdb*")):
        raise SkipTest("slapd not found: install with scripts/install-test-peers (Debian packages slapd, ldap-utils)")
    return slapd, slapadd


def exampleEntries(users: int = USERS) -> list[tuple[str, list]]:
    entries = [
        (SUFFIX, [("objectClass", [b"top", b"dcObject", b"organization"]), ("dc", [b"example"]),
                  ("o", [b"Example"])]),
        (f"ou=users,{SUFFIX}", [("objectClass", [b"organizationalUnit"]), ("ou", [b"users"])]),
        (f"ou=groups,{SUFFIX}", [("objectClass", [b"organizationalUnit"]), ("ou", [b"groups"])]),
    ]
    for n in range(1, users + 1):
        entries.append((f"uid=user{n},ou=users,{SUFFIX}", [
            ("objectClass", [b"inetOrgPerson"]), ("uid", [f"user{n}".encode()]),
            ("cn", [f"User {n}".encode()]), ("sn", [f"Number{n}".encode()]),
            ("mail", [f"user{n}@example.com".encode()]),
            ("userPassword", [hashPassword(f"pw-user{n}", "ssha").encode()])]))
    # Values that LDIF must base64: non-ASCII, a leading space, binary.
    entries.append((f"uid=zoe,ou=users,{SUFFIX}", [
        ("objectClass", [b"inetOrgPerson"]), ("uid", [b"zoe"]), ("cn", ["Zo\u00eb \u00c4rger".encode()]),
        ("sn", [b" spaced"]), ("description", [b"x" * 150]),
        ("userPassword", [hashPassword("pw-zoe", "ssha").encode()])]))
    entries.append((f"cn=staff,ou=groups,{SUFFIX}", [
        ("objectClass", [b"groupOfNames"]), ("cn", [b"staff"]),
        ("member", [f"uid=user1,ou=users,{SUFFIX}".encode(), f"uid=user2,ou=users,{SUFFIX}".encode()])]))
    return entries


class Slapd:
    def __init__(self, process: subprocess.Popen, folder: Path, port: int, ldapsPort: int) -> None:
        self.process = process
        self.folder = folder
        self.port = port
        self.ldapsPort = ldapsPort
        self.url = f"ldap://127.0.0.1:{port}"
        self.ldapsURL = f"ldaps://127.0.0.1:{ldapsPort}"
        self.cafile = str(folder / "cert.pem")
        self.users = {f"user{n}": f"pw-user{n}" for n in range(1, USERS + 1)} | {"zoe": "pw-zoe"}

    def log(self) -> str:
        return (self.folder / "slapd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def startSlapd(testCase, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Slapd:
    """slapd with the example directory, its certificate made for C{names}; stopped after the test."""
    slapd, slapadd = requireSlapd()
    folder = Path(testCase.mktemp()).resolve()
    (folder / "db").mkdir(parents=True)
    generateSelfSigned(folder / "cert.pem", folder / "key.pem", list(names))
    conf = folder / "slapd.conf"
    conf.write_text(CONF.format(folder=folder, suffix=SUFFIX, admin=ADMIN_DN,
                                adminHash=hashPassword(ADMIN_PASSWORD, "ssha")))
    ldif = folder / "data.ldif"
    ldif.write_bytes(b"".join(entryLDIF(dn, attrs) for dn, attrs in exampleEntries()))
    added = subprocess.run([slapadd, "-q", "-f", str(conf), "-l", str(ldif)], capture_output=True, timeout=IO_TIMEOUT)
    if added.returncode != 0:
        raise testCase.failureException(f"slapadd failed: {added.stderr.decode(errors='replace')}")
    for _ in range(3):  # a free port may be taken by someone else before slapd binds it
        server = _start(testCase, slapd, folder, conf)
        if server is not None:
            return server
    raise testCase.failureException(f"slapd did not start: {(folder / 'slapd.log').read_text(errors='replace')}")


def _start(testCase, slapd: str, folder: Path, conf: Path) -> Slapd | None:
    port, ldapsPort = freePort(), freePort()
    log = open(folder / "slapd.log", "wb")
    # -d 0: stay in the foreground (and so die with SIGTERM here); as root no -u/-g is needed.
    process = subprocess.Popen(
        [slapd, "-d", "0", "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{ldapsPort}/"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_dieWithParent)
    server = Slapd(process, folder, port, ldapsPort)
    testCase.addCleanup(log.close)
    testCase.addCleanup(server.stop)
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1), \
                    socket.create_connection(("127.0.0.1", ldapsPort), timeout=1):
                return server
        except OSError:
            if process.poll() is not None:
                return None
            if time.monotonic() > deadline:
                server.stop()
                return None
            time.sleep(0.05)
