"""
Real mail peers for interop tests and benchmarks: Postfix's C{smtp-sink} and
C{smtp-source}, and a throwaway real Postfix instance in a temporary folder.

  - L{SmtpSink}: C{smtp-sink} on a loopback port, each message dumped to its own
    file (with the envelope as C{X-Mail-Args:}/C{X-Rcpt-Args:} lines first);
    L{SmtpSink.messages} reads them back.  Extra arguments (e.g. C{-b}/C{-B} soft
    and hard bounce replies, C{-q}/C{-r}) go through.
  - L{runSmtpSource}: runs C{smtp-source} to completion (bounded by a timeout).
  - L{PostfixInstance}: C{postfix -c DIR start-fg} with its own config, queue and
    data folders under a temporary folder, listening on 127.0.0.1:PORT only;
    C{mode="mailbox"} keeps mail for C{domains} as Maildir files (L{PostfixInstance.
    messages}), C{mode="discard"} accepts and throws away (benchmarks: Postfix still
    fsyncs its queue files), C{mode="relay"} forwards everything to C{relayhost}.

Every process dies with the test (cleanup, and PR_SET_PDEATHSIG on Linux); every
wait is bounded.  A missing program skips the test with the install hint.
Usable from trial tests (pass the TestCase) and from bench scripts (pass an
object with C{mktemp()} and C{addCleanup()}, e.g. L{Scratch}).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.interop._daemon import _dieWithParent, requirePeer

START_TIMEOUT = 20.0

SBIN = "/usr/sbin"


def _which(program: str) -> str:
    """A Postfix program: on PATH, or in /usr/sbin (not on every user's PATH)."""
    found = shutil.which(program) or shutil.which(program, path=SBIN)
    if found is None:
        requirePeer(program, "postfix")  # skips with the install hint
    return found  # type: ignore[return-value]


def _preexec() -> Any:
    return _dieWithParent if sys.platform.startswith("linux") else None


def freeTCPPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForBanner(port: int, timeout: float = START_TIMEOUT, host: str = "127.0.0.1",
                  process: subprocess.Popen | None = None) -> bytes:
    """Connect until an SMTP server answers with its 220 banner; return the banner line."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return banner
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"no SMTP banner on {host}:{port} within {timeout:g}s ({last})")


class Scratch:
    """For scripts (benchmarks): C{mktemp()} and C{addCleanup()} like a TestCase; call L{cleanup}."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="netsvc-mail-"))
        os.chmod(self.dir, 0o755)  # smtp-sink (as nobody) writes below it
        self._cleanups: list[Any] = []
        self._n = 0

    def mktemp(self) -> str:
        self._n += 1
        return str(self.dir / f"t{self._n}")

    def addCleanup(self, f: Any, *args: Any) -> None:
        self._cleanups.append((f, args))

    def cleanup(self) -> None:
        while self._cleanups:
            f, args = self._cleanups.pop()
            try:
                f(*args)
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _traversable(path: Path) -> None:
    """
    Let other users (Postfix's workers, smtp-sink as nobody) reach C{path}: a test's
    temporary folder is made by mkdtemp (mode 0700).  Every folder on the way that
    lacks o+x gets it -- only inside the current folder or the system's temp folder.
    """
    path = path.absolute()
    roots = [Path.cwd().absolute(), Path(tempfile.gettempdir()).absolute()]
    for p in [path, *path.parents]:
        if not any(p != root and p.is_relative_to(root) for root in roots):
            continue
        mode = p.stat().st_mode
        if not mode & 0o001:
            os.chmod(p, mode | 0o005)


def _stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# -- smtp-sink -------------------------------------------------------------------


class SmtpSink:
    """
    C{smtp-sink} on 127.0.0.1:C{port} (0: a free one), dumping each message to a file.
    """

    def __init__(self, testCase: Any, port: int = 0, args: Sequence[str] = (), backlog: int = 256) -> None:
        program = _which("smtp-sink")
        self.port = port or freeTCPPort()
        self.dumpDir = Path(testCase.mktemp()).absolute()
        self.dumpDir.mkdir(parents=True)
        os.chmod(self.dumpDir, 0o777)  # smtp-sink runs as nobody when started by root
        _traversable(self.dumpDir.parent)
        command = [program]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # it refuses to run as root
        command += ["-d", f"{self.dumpDir}/%M.", *args, f"127.0.0.1:{self.port}", str(backlog)]
        self.log = open(Path(testCase.mktemp() + ".sink.log"), "wb")  # noqa: SIM115 - closed in cleanup
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=dict(os.environ, MAIL_CONFIG=str(self.dumpDir)),
                                        preexec_fn=_preexec())
        testCase.addCleanup(self.stop)
        waitForBanner(self.port, process=self.process)

    @property
    def endpoint(self) -> str:
        """As a netsvc client endpoint (e.g. a smarthost)."""
        return f"tcp:host=127.0.0.1:port={self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.dumpDir.iterdir() if p.is_file())

    def messages(self) -> list[bytes]:
        """Every dumped transaction: envelope lines (X-Mail-Args:, X-Rcpt-Args: ...) then the message."""
        out = []
        for p in self.files():
            try:
                out.append(p.read_bytes())
            except FileNotFoundError:
                pass
        return out

    def waitForMessages(self, count: int, timeout: float = 20.0) -> list[bytes]:
        """Wait until at least C{count} messages are dumped (or the timeout); return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.files()) < count:
            time.sleep(0.05)
        time.sleep(0.05)  # the last dump file may still be being written
        return self.messages()

    def stop(self) -> None:
        _stop(self.process)
        if not self.log.closed:
            self.log.close()


# -- smtp-source -----------------------------------------------------------------


def runSmtpSource(port: int, *, sessions: int = 1, messages: int = 1, size: int = 2048,
                  sender: str = "source@example.test", recipient: str = "sink@example.test",
                  host: str = "127.0.0.1", args: Sequence[str] = (), timeout: float = 60.0,
                  reuse: bool = True) -> subprocess.CompletedProcess:
    """
    C{smtp-source -s SESSIONS -m MESSAGES -l SIZE}; C{reuse}: several messages per
    connection (C{-d}).  Raises C{subprocess.TimeoutExpired} (after killing it) if it
    does not finish in C{timeout} seconds.  Its exit status says whether every
    transaction got its 250 (non-zero and stderr otherwise).
    """
    command = [_which("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
               "-f", sender, "-t", recipient, "-M", "source.example.test", *args]
    if reuse:
        command.append("-d")
    command.append(f"{host}:{port}")
    return subprocess.run(command, capture_output=True, timeout=timeout, preexec_fn=_preexec(),
                          env=dict(os.environ, MAIL_CONFIG=tempfile.gettempdir()))


# -- a real Postfix --------------------------------------------------------------

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixInstance:
    """
    A private Postfix (its own config, queue and data folders, nothing shared with a
    system Postfix), listening on 127.0.0.1:C{port} only.

    @param mode: C{"mailbox"}: mail for C{domains} is stored as Maildir files
        (L{messages}); C{"discard"}: everything is accepted (queued, fsync'd) and
        discarded; C{"relay"}: everything is forwarded to C{relayhost} (C{host:port}).
    @param tls: (certificate PEM, key PEM) to offer STARTTLS with.
    @param main: extra main.cf settings.
    """

    def __init__(self, testCase: Any, port: int = 0, mode: str = "mailbox",
                 domains: Sequence[str] = ("example.test",), relayhost: str | None = None,
                 tls: tuple[str, str] | None = None, main: dict[str, str] | None = None) -> None:
        self.postfix = _which("postfix")
        if os.geteuid() != 0:
            from unittest import SkipTest

            raise SkipTest("a private Postfix instance needs root (its master runs as root, workers as postfix)")
        self.port = port or freeTCPPort()
        # Not under the test's folder: Postfix's unix sockets (queue/public/...) must fit in 108 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="netsvc-pf-"))
        testCase.addCleanup(shutil.rmtree, self.base, True)
        self.config = self.base / "config"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.mail = self.base / "mail"
        for d in (self.config, self.queue, self.data, self.mail):
            d.mkdir(parents=True)
        _traversable(self.base)
        os.chown(self.data, _uid("postfix"), -1)
        os.chown(self.mail, 65534, 65534)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "command_directory": SBIN,
            "daemon_directory": "/usr/lib/postfix/sbin",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtputf8_enable": "yes",
            "in_flow_delay": "0",
            "maillog_file": str(self.base / "maillog"),
            "maillog_file_prefixes": str(self.base),
            "syslog_name": f"postfix-{self.port}",
            "biff": "no",
            "message_size_limit": "52428800",
        }
        if mode == "mailbox":
            settings.update({
                "virtual_mailbox_domains": " ".join(domains),
                "virtual_mailbox_base": str(self.mail),
                "virtual_mailbox_maps": "static:box/",
                "virtual_uid_maps": "static:65534",
                "virtual_gid_maps": "static:65534",
                "virtual_mailbox_limit": "0",
            })
        elif mode == "discard":
            settings.update({"relay_domains": " ".join(domains), "relay_transport": "discard:",
                             "default_transport": "discard:"})
        elif mode == "relay":
            if not relayhost:
                raise ValueError("mode='relay' needs relayhost='host:port'")
            host, _, rport = relayhost.rpartition(":")
            settings.update({"relayhost": f"[{host}]:{rport}", "relay_domains": " ".join(domains)})
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if tls is not None:
            settings.update({"smtpd_tls_cert_file": tls[0], "smtpd_tls_key_file": tls[1],
                             "smtpd_tls_security_level": "may"})
        settings.update(main or {})
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.config / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        env = dict(os.environ, MAIL_CONFIG=str(self.config))
        self.log = open(self.base / "postfix.out", "wb")  # noqa: SIM115 - closed in stop
        # create-missing: the queue's subfolders with Postfix's owners and modes
        subprocess.run([self.postfix, "-c", str(self.config), "check"], env=env, stdout=self.log,
                       stderr=subprocess.STDOUT, timeout=START_TIMEOUT)
        self.process = subprocess.Popen([self.postfix, "-c", str(self.config), "start-fg"], env=env,
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=_preexec())
        testCase.addCleanup(self.stop)
        try:
            waitForBanner(self.port, process=self.process)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; postfix said: {self.output()}") from None

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def output(self) -> str:
        text = ""
        for p in (self.base / "postfix.out", self.base / "maillog"):
            if p.exists():
                text += p.read_text(errors="replace")
        return text

    def files(self) -> list[Path]:
        new = self.mail / "box" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def messages(self) -> list[bytes]:
        """Messages delivered to the mailbox (mode "mailbox"), oldest first."""
        return [p.read_bytes() for p in self.files()]

    def waitForMessages(self, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.files()) < count:
            time.sleep(0.05)
        return self.messages()

    def stop(self) -> None:
        if self.process.poll() is None:
            subprocess.run([self.postfix, "-c", str(self.config), "stop"], env=dict(os.environ),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if not self.log.closed:
            self.log.close()


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
