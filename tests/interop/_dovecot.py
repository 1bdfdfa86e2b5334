"""
A real Dovecot 2.3 (Debian packages C{dovecot-imapd} C{dovecot-pop3d}) for tests
and benchmarks: configured in a temporary folder (its own dovecot.conf, base_dir,
state, log, a passwd-file of {SSHA} users, Maildirs), listening on free loopback
ports for IMAP and POP3 (both with STARTTLS, login only after it) and IMAPS and
POP3S, run in the foreground (C{dovecot -F -c CONF}) and stopped in cleanup.
Nothing under /etc, /var or /run is read or written (the system's dovecot.conf is
never loaded).

    server = Dovecot(testCase, {"dev": "devpass"}, cert, key)   # skips with the install hint
    server.deliver("dev", data)                                  # into new/, as an MDA does
    server.imaps, server.pop3s, server.imap, server.pop3         # ports on 127.0.0.1

Needs root: Dovecot's master switches to its C{dovecot} and C{dovenull} users,
and the mail is owned by nobody (uid 65534), the static mail user.
Usable from trial tests (pass the TestCase) and from bench scripts (an object
with C{mktemp()} and C{addCleanup()}, e.g. L{tests.interop._mailpeers.Scratch}).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest

from netsvc.auth import hashPassword
from tests.interop._daemon import _dieWithParent
from tests.interop._mailpeers import _traversable

START_TIMEOUT = 30.0
NOBODY = 65534

CONF = """\
# A private Dovecot: everything under {base}.
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
instance_name = test-{imaps}
protocols = imap pop3
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_dh = </usr/share/dovecot/dh.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
# (2 s by default: every wrong-password test waited it)
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
mail_location = maildir:{mail}/%u
namespace inbox {{
  inbox = yes
  separator = .
  mailbox Sent {{
    special_use = \\Sent
    auto = create
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = create
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
  mailbox Archive {{
    special_use = \\Archive
    auto = create
  }}
}}
passdb {{
  driver = passwd-file
  args = {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={base}/home/%u
}}
# Dovecot's high-performance mode (one login process serves many connections;
# the default forks one per connection) and imap/pop3 processes reused for later
# sessions: its fastest documented setup (benchmarks compare against it).
service imap-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
service imap {{
  service_count = 0
}}
service pop3 {{
  service_count = 0
}}
"""


def dovecotProgram() -> str:
    """The dovecot binary, or skip (raise SkipTest) with the install hint."""
    program = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/sbin")
    if program is None or not Path("/usr/lib/dovecot/imap").exists() or not Path("/usr/lib/dovecot/pop3").exists():
        raise SkipTest("Dovecot not found: install with scripts/install-test-peers "
                       "(Debian packages dovecot-imapd dovecot-pop3d)")
    if os.geteuid() != 0:
        raise SkipTest("a private Dovecot needs root (its master switches to the dovecot and dovenull users)")
    return program


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    """
    A running private Dovecot with C{users} (name -> password, {SSHA}-hashed in its
    passwd-file), serving the PEM C{cert}/C{key} (readable by root; Dovecot's
    config process reads them before dropping privileges).
    """

    def __init__(self, testCase: Any, users: dict[str, str], cert: Path, key: Path) -> None:
        program = dovecotProgram()
        # Not under the test's folder: Dovecot's unix sockets (base_dir) must fit in 108 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="netsvc-dc-"))
        testCase.addCleanup(shutil.rmtree, self.base, True)
        _traversable(self.base)  # nobody (the mail user) must reach the Maildirs
        self.mail = self.base / "mail"
        self.mail.mkdir()
        os.chown(self.mail, NOBODY, NOBODY)
        (self.base / "home").mkdir()
        for user in users:
            home = self.base / "home" / user
            home.mkdir()
            os.chown(home, NOBODY, NOBODY)
        (self.base / "passwd").write_text("".join(f"{u}:{hashPassword(p, 'ssha')}\n" for u, p in users.items()))
        self.imap, self.imaps, self.pop3, self.pop3s = (_freePort() for _ in range(4))
        self.conf = self.base / "dovecot.conf"
        self.conf.write_text(CONF.format(base=self.base, cert=cert, key=key, mail=self.mail, uid=NOBODY,
                                         imap=self.imap, imaps=self.imaps, pop3=self.pop3, pop3s=self.pop3s))
        self.outPath = self.base / "out.log"
        self._out = open(self.outPath, "wb")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen([program, "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                        stdout=self._out, stderr=subprocess.STDOUT,
                                        preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None)
        testCase.addCleanup(self.stop)
        deadline = time.monotonic() + START_TIMEOUT
        for port in (self.imap, self.imaps, self.pop3, self.pop3s):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"dovecot exited with status {self.process.returncode}: {self.output()}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"dovecot: nothing on 127.0.0.1:{port} within "
                                           f"{START_TIMEOUT:g}s: {self.output()}") from None
                    time.sleep(0.05)

    def output(self) -> str:
        """What Dovecot printed and logged so far (the end of it)."""
        text = ""
        for p in (self.outPath, self.base / "dovecot.log"):
            if p.exists():
                text += p.read_text(errors="replace")
        return text[-3000:]

    def maildir(self, user: str) -> Path:
        """C{user}'s INBOX Maildir (cur/ new/ tmp/), made (owned by nobody) when missing."""
        path = self.mail / user
        for sub in ("", "cur", "new", "tmp"):
            (path / sub).mkdir(exist_ok=True)
            os.chown(path / sub, NOBODY, NOBODY)
        return path

    def deliver(self, user: str, data: bytes, name: str | None = None) -> Path:
        """Write C{data} into C{user}'s new/ (tmp/ then rename, as an MDA does); LF line ends."""
        box = self.maildir(user)
        now = time.time()
        name = name or f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{time.monotonic_ns()}.test,S={len(data)}"
        tmp = box / "tmp" / name
        tmp.write_bytes(data.replace(b"\r\n", b"\n"))
        os.chown(tmp, NOBODY, NOBODY)
        os.rename(tmp, box / "new" / name)
        return box / "new" / name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if not self._out.closed:
            self._out.close()
