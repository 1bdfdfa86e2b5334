"""
Running without root (issue 21): C{twistd --uid nobody --gid nogroup netsvc}
started as root binds a port below 1024, then works as nobody -- the SMTP queue,
capture, status.json, TLS reloads -- because what netsvc made as root is handed
over before twistd drops root; and the shipped systemd unit.

The daemon tests need root (they are skipped, saying so, otherwise); they run
the real daemon (L{tests.interop._daemon}).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from netsvc import auth
from netsvc.runtime import _chownTree, asRunUser
from tests.helpers import machineLock
from tests.interop._daemon import IO_TIMEOUT, REPO, runToCompletion, startNetsvc, startTwistd, twistdCommand

UNIT = REPO / "etc" / "netsvc.service"


def _needRoot() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root: twistd --uid/--gid drops root, which only root can do")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        raise unittest.SkipTest("no user 'nobody' on this machine") from None


def _lowPort(testCase: unittest.TestCase) -> int:
    """A free TCP port below 1024 on 127.0.0.1 (a bounded search), kept from other trial workers for C{testCase}."""
    machineLock(testCase, "low-ports")
    for port in list(range(587, 588)) + list(range(900, 1024)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise unittest.SkipTest("no free TCP port below 1024 on 127.0.0.1")


def _base(testCase: unittest.TestCase) -> Path:
    """A folder for the test that nobody may pass through (state_dir is made inside by netsvc)."""
    base = Path(testCase.mktemp()).absolute()
    base.mkdir(parents=True)
    for folder in [base, *base.parents]:
        if folder == Path(REPO).parent:
            break
        os.chmod(folder, os.stat(folder).st_mode | 0o011)
    return base


def _send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=IO_TIMEOUT) as client:
        client.ehlo("client.example.test")
        code, _ = client.mail("alice@example.test")
        assert code == 250, code
        code, _ = client.rcpt("bob@example.test")
        assert code == 250, code
        return client.data(b"Subject: unprivileged\r\n\r\nhello from a test\r\n")


def _owner(path: Path) -> str:
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


class UnprivilegedTests(unittest.TestCase):
    """Before: 451 4.3.0 for every message (Permission denied creating the queue file)."""

    def start(self, smtp: str, extra: str = "", uid: str = "nobody") -> tuple[object, Path, int]:
        _needRoot()
        base = _base(self)
        port = _lowPort(self)
        config = base / "netsvc.yaml"
        config.write_text(
            f"state_dir: state\n"
            f"services:\n"
            f"  smtp:\n"
            f"    listen: ['tcp:{port}:interface=127.0.0.1']\n"
            f"    relay: {smtp}\n"
            f"  web:\n"
            f"    listen: ['tls:0:interface=127.0.0.1']\n" + extra
        )
        daemon = startTwistd(
            self,
            ["--uid", uid, "--gid", "nogroup", "netsvc", "--config", str(config)],
            base / "state",
        )
        return daemon, base / "state", port

    def test_queueAsNobodyOnALowPort(self):
        daemon, state, port = self.start("{smarthost: 'tcp:127.0.0.1:1', starttls: none}")
        self.assertTrue(daemon.waitForOutput("set uid/gid", IO_TIMEOUT), daemon.output())
        code, reply = _send(port)
        self.assertEqual(code, 250, (reply, daemon.output()))
        queued = list((state / "queue" / "env").glob("*.json"))
        self.assertEqual(len(queued), 1, daemon.output())
        self.assertEqual(_owner(queued[0]), "nobody")
        self.assertEqual(_owner(state / "status.json"), "nobody")
        self.assertNotIn("Permission denied", daemon.output())
        self.assertNotIn("running as root", daemon.output())
        # the generated key is readable for a reload
        daemon.signal(signal.SIGHUP)
        self.assertTrue(daemon.waitForOutput("certificate reloaded", IO_TIMEOUT), daemon.output())
        self.assertIn(daemon.stop(), (0, -signal.SIGTERM), daemon.output())
        self.assertFalse((state / "status.json").exists())  # removed by nobody

    def test_captureAsNobody(self):
        daemon, state, port = self.start("{capture: true}")
        code, reply = _send(port)
        self.assertEqual(code, 250, (reply, daemon.output()))
        deadline = time.monotonic() + IO_TIMEOUT
        captured = []
        while not captured and time.monotonic() < deadline:
            captured = [p for p in (state / "captured").rglob("*") if p.is_file()]
            time.sleep(0.05)
        self.assertTrue(captured, daemon.output())
        self.assertTrue(all(_owner(p) == "nobody" for p in captured))

    def test_foreignStateDirRefused(self):
        """A state_dir that exists and belongs to someone else is not taken over: one line names it."""
        _needRoot()
        base = _base(self)
        (base / "state").mkdir()  # root's
        config = base / "netsvc.yaml"
        config.write_text("state_dir: state\nservices:\n  echo:\n    listen: ['tcp:0:interface=127.0.0.1']\n")
        result = runToCompletion(
            self, twistdCommand() + ["-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup", "netsvc",
                                     "--config", str(config)])
        self.assertNotEqual(result.returncode, 0)
        text = result.stdout.decode() + result.stderr.decode()
        self.assertIn(f"state_dir: {base / 'state'} belongs to root, not to nobody", text)
        self.assertNotIn("Traceback", text)
        self.assertEqual(_owner(base / "state"), "root")

    def test_workersAsNobody(self):
        """
        workers: 2 with --uid: the workers (started after the drop) queue mail as nobody -- or, when
        nobody cannot run this Python (one under /root here), the start is refused with one line.
        """
        _needRoot()
        nobody = pwd.getpwnam("nobody")
        from netsvc.runtime import _allows, _reachable

        python = Path(os.path.realpath(sys.executable))
        runnable = _allows(os.stat(python), nobody.pw_uid, {nobody.pw_gid}, 0o5) and _reachable(
            python, nobody.pw_uid, {nobody.pw_gid})
        if not runnable:
            base = _base(self)
            config = base / "netsvc.yaml"
            config.write_text("state_dir: state\nworkers: 2\nservices:\n  echo:\n"
                              "    listen: ['tcp:0:interface=127.0.0.1']\n")
            result = runToCompletion(
                self, twistdCommand() + ["-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup", "netsvc",
                                         "--config", str(config)])
            text = result.stdout.decode() + result.stderr.decode()
            self.assertNotEqual(result.returncode, 0, text)
            self.assertIn(f"workers: the workers run as nobody (--uid), who cannot run {python}", text)
            self.assertNotIn("Traceback", text)
            return
        daemon, state, port = self.start("{smarthost: 'tcp:127.0.0.1:1', starttls: none}", "workers: 2\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = json.loads((state / "status.json").read_text())
            if len(status.get("workers", [])) == 2 and all(w["running"] for w in status["workers"]):
                break
            time.sleep(0.1)
        else:
            self.fail(daemon.output())
        for _ in range(4):  # whichever worker takes it
            code, reply = _send(port)
            self.assertEqual(code, 250, (reply, daemon.output()))
        self.assertNotIn("Permission denied", daemon.output())


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _victim(base: Path, name: str) -> Path:
    """A file of root's outside state_dir, that a planted link points at."""
    victim = base / name
    victim.write_text("root's, untouched\n")
    os.chmod(victim, 0o644)
    return victim


def _usersStateDir(base: Path, *folders: str) -> Path:
    """state_dir (and C{folders} in it) as a first C{--uid nobody} run leaves it: nobody's."""
    state = base / "state"
    for folder in ("", *folders):
        (state / folder).mkdir(parents=True, exist_ok=True)
        os.chown(state / folder, *_nobody())
    return state


class RootNeverWritesForTheUserTests(unittest.TestCase):
    """
    Started as root with --uid, netsvc never writes (as root) in a folder the run user can write, and
    never walks it: a link the user planted there is no way into root's files.  Before: root wrote
    status.json.tmp and the generated TLS files through planted links and chowned status.json (through
    the link) to the user -- e.g. /etc/passwd overwritten and given to nobody -- and chowned whatever
    was root's in a state_dir of the user's.
    """

    def startAsNobody(self, base: Path, services: str) -> Any:
        config = base / "netsvc.yaml"
        config.write_text("state_dir: state\nservices:\n" + services)
        return startTwistd(self, ["--uid", "nobody", "--gid", "nogroup", "netsvc", "--config", str(config)],
                           base / "state")

    def assertUntouched(self, victim: Path) -> None:
        self.assertEqual(victim.read_text(), "root's, untouched\n")
        self.assertEqual(_owner(victim), "root")

    def test_statusLinkNotFollowed(self):
        """(a) state_dir/status.json.tmp -> a file of root's: left alone; status.json written by nobody."""
        _needRoot()
        base = _base(self)
        state = _usersStateDir(base)
        victim = _victim(base, "passwd")
        (state / "status.json.tmp").symlink_to(victim)
        daemon = self.startAsNobody(base, "  echo:\n    listen: ['tcp:0:interface=127.0.0.1']\n")
        self.assertUntouched(victim)
        status = state / "status.json"
        self.assertFalse(status.is_symlink(), daemon.output())
        self.assertEqual(_owner(status), "nobody")
        self.assertEqual(json.loads(status.read_text())["pid"], daemon.process.pid)

    def test_certificateLinksNotFollowed(self):
        """(b) The generated key and certificate are written by nobody; links planted at their names: not followed."""
        _needRoot()
        base = _base(self)
        state = _usersStateDir(base, "tls")
        victims = {}
        for name in ("selfsigned.key", "selfsigned.pem"):
            victims[name] = _victim(base, name + "-victim")
            (state / "tls" / (name + ".tmp")).symlink_to(victims[name])
        daemon = self.startAsNobody(base, "  web:\n    listen: ['tls:0:interface=127.0.0.1']\n")
        for name, victim in victims.items():
            self.assertUntouched(victim)
            made = state / "tls" / name
            self.assertFalse(made.is_symlink(), daemon.output())
            self.assertEqual(_owner(made), "nobody", daemon.output())
        self.assertEqual(os.stat(state / "tls" / "selfsigned.key").st_mode & 0o777, 0o600)

    def test_usersStateDirNotWalked(self):
        """(c) A state_dir of nobody's is not walked: what is root's there (or behind a link) stays root's."""
        _needRoot()
        base = _base(self)
        state = _usersStateDir(base, "sub")
        victim = _victim(base, "shadow")
        (state / "escape").symlink_to(victim)
        (state / "sub" / "escape").symlink_to(base)
        rootsFile = _victim(state / "sub", "roots")  # as a folder swapped in during a walk would show it
        self.startAsNobody(base, "  echo:\n    listen: ['tcp:0:interface=127.0.0.1']\n")
        self.assertUntouched(victim)
        self.assertUntouched(rootsFile)
        self.assertEqual(_owner(base), "root")

    def assertOneMessageHandedOver(self, base: Path, services: str, port: int, folder: Path, pattern: str) -> None:
        """
        Started as nobody with C{services}, one message sent to C{port}: it is the one file C{pattern}
        finds under C{folder} (made outside state_dir in this run), and it and the folders between are
        nobody's; what holds C{folder} stays root's.
        """
        daemon = self.startAsNobody(base, services)
        code, reply = _send(port)
        self.assertEqual(code, 250, (reply, daemon.output()))
        found = list(folder.glob(pattern))
        self.assertEqual(len(found), 1, daemon.output())
        self.assertEqual([_owner(p) for p in (folder, found[0].parent, found[0])], ["nobody"] * 3)
        self.assertEqual(_owner(folder.parent), "root")

    def test_queueOutsideStateDir(self):
        """(d) An SMTP queue folder outside state_dir that netsvc makes in this run is handed over too."""
        _needRoot()
        base = _base(self)
        port = _lowPort(self)
        spool = base / "spool" / "netsvc"
        self.assertOneMessageHandedOver(
            base, f"  smtp:\n    listen: ['tcp:{port}:interface=127.0.0.1']\n"
                  f"    relay: {{smarthost: 'tcp:127.0.0.1:1', starttls: none}}\n"
                  f"    queue: {{dir: '{spool}'}}\n", port, spool, "env/*.json")

    def test_maildirsOutsideStateDir(self):
        """
        (d) The Maildirs folder of local delivery, outside state_dir and made in this run, is handed over
        too.  Before: it stayed root's, and every local delivery got 451 (the run user could not write in it).
        """
        _needRoot()
        base = _base(self)
        port = _lowPort(self)
        mail = base / "var-mail" / "netsvc"
        users = base / "users.txt"
        auth.addUser(users, "bob", "bobpass")
        os.chmod(users, 0o644)
        self.assertOneMessageHandedOver(
            base, f"  smtp:\n    listen: ['tcp:{port}:interface=127.0.0.1']\n"
                  f"    relay: {{capture: true}}\n    users: {users}\n"
                  f"    local: {{domains: [example.test], maildir: '{mail}', aliases: {{postmaster: bob}}}}\n",
            port, mail, "bob/new/*")

    def test_mailboxMaildirsOutsideStateDir(self):
        """(d) So is the mailbox service's (IMAP's APPEND and flag changes write there)."""
        _needRoot()
        base = _base(self)
        mail = base / "imap-mail"
        users = base / "users.txt"
        auth.addUser(users, "bob", "bobpass")
        os.chmod(users, 0o644)
        daemon = self.startAsNobody(
            base, f"  mailbox:\n    listen: [{{endpoint: 'tcp:0:interface=127.0.0.1', protocol: imap}}]\n"
                  f"    users: {users}\n    maildir: '{mail}'\n")
        self.assertEqual(_owner(mail), "nobody", daemon.output())

    def test_queueLinkChoosesNothing(self):
        """
        A queue folder the user turned into a link to a folder that does not exist is not made by root (it
        would then be handed to the user: a folder of the user's choosing anywhere, e.g. a systemd drop-in
        folder): made as the user, refused here, nothing made.
        """
        _needRoot()
        base = _base(self)
        state = _usersStateDir(base)
        chosen = base / "etc" / "chosen.d"
        (state / "queue").symlink_to(chosen)
        config = base / "netsvc.yaml"
        config.write_text("state_dir: state\nservices:\n  smtp:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
                          "    relay: {smarthost: 'tcp:127.0.0.1:1', starttls: none}\n")
        result = runToCompletion(
            self, twistdCommand() + ["-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup", "netsvc",
                                     "--config", str(config)], timeout=30)
        text = result.stdout.decode() + result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, text)
        self.assertIn("services.smtp.queue.dir: cannot give", text)
        self.assertNotIn("Traceback", text)
        self.assertFalse(os.path.lexists(base / "etc"), text)


class LogFileAsTheUserTests(unittest.TestCase):
    """
    log.file must be in a folder the run user may write (L{handOver} checks it), so root opening it there
    before the drop would append (client-chosen text, for as long as the daemon runs) through a link the
    user planted -- e.g. to /etc/passwd.  It is opened as the run user.
    """

    def config(self, base: Path) -> Path:
        logs = base / "logs"
        logs.mkdir()
        os.chown(logs, *_nobody())
        config = base / "netsvc.yaml"
        config.write_text(f"state_dir: state\nlog: {{file: '{logs / 'netsvc.log'}'}}\n"
                          f"services:\n  echo:\n    listen: ['tcp:0:interface=127.0.0.1']\n")
        return config

    def test_plantedLinkRefused(self):
        _needRoot()
        base = _base(self)
        config = self.config(base)
        victim = _victim(base, "passwd")
        (base / "logs" / "netsvc.log").symlink_to(victim)
        result = runToCompletion(
            self, twistdCommand() + ["-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup", "netsvc",
                                     "--config", str(config)], timeout=30)
        text = result.stdout.decode() + result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, text)
        self.assertIn("log.file: cannot open", text)
        self.assertIn("as nobody (--uid)", text)
        self.assertNotIn("Traceback", text)
        self.assertEqual(victim.read_text(), "root's, untouched\n")
        self.assertEqual(_owner(victim), "root")

    def test_madeByTheUser(self):
        _needRoot()
        base = _base(self)
        daemon = startTwistd(self, ["--uid", "nobody", "--gid", "nogroup", "netsvc", "--config",
                                    str(self.config(base))], base / "state")
        log = base / "logs" / "netsvc.log"
        self.assertEqual(_owner(log), "nobody")
        daemon.stop()
        self.assertIn("listening on", log.read_text())


class AccessLogAsTheUserTests(unittest.TestCase):
    """The web access log is opened like log.file: as the run user where it could have planted a link."""

    def test_plantedLinkNotFollowedByRoot(self):
        _needRoot()
        base = _base(self)
        logs = base / "logs"
        logs.mkdir()
        os.chown(logs, *_nobody())
        (base / "www").mkdir()
        victim = _victim(base, "passwd")
        (logs / "access.log").symlink_to(victim)
        config = base / "netsvc.yaml"
        config.write_text("state_dir: state\nservices:\n  web:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
                          f"    root: {base / 'www'}\n    access_log: {{file: '{logs / 'access.log'}'}}\n")
        result = runToCompletion(
            self, twistdCommand() + ["-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup", "netsvc",
                                     "--config", str(config)], timeout=30)
        text = result.stdout.decode() + result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, text)
        self.assertIn("services.web.access_log.file: cannot open", text)
        self.assertEqual(victim.read_text(), "root's, untouched\n")
        self.assertEqual(_owner(victim), "root")


class WarnAsRootTests(unittest.TestCase):
    def test_rootWithNetworkListenersWarns(self):
        _needRoot()
        base = _base(self)
        config = base / "netsvc.yaml"
        config.write_text("state_dir: state\nservices:\n  echo:\n    listen: ['tcp:0:interface=127.0.0.1']\n")
        daemon = startNetsvc(self, config, base / "state")
        self.assertTrue(daemon.waitForOutput("running as root with network listeners", IO_TIMEOUT),
                        daemon.output())


class ChownTreeTests(unittest.TestCase):
    def test_linksLeftAlone(self):
        """Symbolic links are not followed and files with other hard links are not given away."""
        _needRoot()
        base = _base(self)
        tree = base / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "f").write_text("x")
        outside = base / "outside"
        outside.write_text("secret")
        (tree / "link").symlink_to(outside)
        os.link(outside, tree / "hard")
        nobody = pwd.getpwnam("nobody")
        _chownTree(tree, nobody.pw_uid, nobody.pw_gid)
        self.assertEqual(_owner(tree / "sub" / "f"), "nobody")
        self.assertEqual(_owner(tree / "sub"), "nobody")
        self.assertEqual(_owner(outside), "root")

    def test_topThatIsALinkNotFollowed(self):
        """
        A state_dir swapped for a link to a folder of root's (between the check and the walk) gives nothing
        away; before, the walk listed the folder behind the link and chowned its files.
        """
        _needRoot()
        base = _base(self)
        secrets = base / "etc"
        (secrets / "deeper").mkdir(parents=True)
        shadow = secrets / "shadow"
        shadow.write_text("secret")
        (secrets / "deeper" / "key").write_text("secret")
        swapped = base / "state"
        swapped.symlink_to(secrets)
        try:
            _chownTree(swapped, *_nobody())
        except OSError:
            pass  # refused: fine
        self.assertEqual({_owner(p) for p in (secrets, shadow, secrets / "deeper", secrets / "deeper" / "key")},
                         {"root"})

    def test_replacedTopRefused(self):
        """A folder that is not the one root made (another identity) is not walked."""
        _needRoot()
        base = _base(self)
        tree = base / "tree"
        tree.mkdir()
        (tree / "f").write_text("x")
        with self.assertRaises(OSError):
            _chownTree(tree, *_nobody(), identity=(0, 0))
        self.assertEqual({_owner(tree), _owner(tree / "f")}, {"root"})

    def test_bottomUp(self):
        """Everything below a fresh folder is given, the folder itself too."""
        _needRoot()
        base = _base(self)
        tree = base / "tree"
        (tree / "a" / "b").mkdir(parents=True)
        (tree / "a" / "b" / "f").write_text("x")
        (tree / "g").write_text("y")
        st = os.stat(tree)
        _chownTree(tree, *_nobody(), identity=(st.st_dev, st.st_ino))
        self.assertEqual({_owner(p) for p in (tree, tree / "a", tree / "a" / "b", tree / "a" / "b" / "f",
                                              tree / "g")}, {"nobody"})


class AsRunUserTests(unittest.TestCase):
    def test_kernelChecksTheUser(self):
        """Inside, root writes as nobody (root's files are closed to it, what it makes is nobody's); then root again."""
        _needRoot()
        base = _base(self)
        roots = _victim(base, "roots")
        open_ = base / "open"
        open_.mkdir()
        os.chmod(open_, 0o777)
        groups = os.getgroups()
        with asRunUser(*_nobody()):
            self.assertEqual((os.geteuid(), os.getegid()), _nobody())
            self.assertNotIn(0, os.getgroups())
            with self.assertRaises(PermissionError):
                roots.write_text("changed")
            (open_ / "made").write_text("x")
        self.assertEqual((os.geteuid(), os.getegid(), os.getgroups()), (0, 0, groups))
        self.assertEqual(roots.read_text(), "root's, untouched\n")
        self.assertEqual(_owner(open_ / "made"), "nobody")


class SystemdUnitTests(unittest.TestCase):
    def test_unitVerifies(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze not found: apt-get install systemd")
        text = UNIT.read_text()
        for needed in ("DynamicUser=yes", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "StateDirectory=netsvc",
                       "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes"):
            self.assertIn(needed, text)
        # verify needs the ExecStart program to exist: point it at this tree's twistd in a copy
        copy = Path(self.mktemp()).absolute()
        copy.mkdir(parents=True)
        unit = copy / "netsvc.service"
        twistd = twistdCommand()[0]
        unit.write_text(text.replace("/usr/bin/twistd", twistd))
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if "netsvc.service" in line]
        self.assertEqual((result.returncode, problems), (0, []), result.stdout + result.stderr)


class StickyFolderTests(unittest.TestCase):
    """
    A sticky world-writable folder (/tmp) on the way only counts when the entry in it is the user's or
    missing: the user cannot rename or remove root's (a clone under /tmp refused every --uid start).
    """

    def test_stickyFolderOnTheWay(self):
        from netsvc.runtime import _userCanChange

        _needRoot()
        uid, gid = _nobody()
        base = _base(self)
        sticky = base / "tmp"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        (sticky / "roots").mkdir()
        (sticky / "nobodys").mkdir()
        os.chown(sticky / "nobodys", uid, gid)
        self.assertFalse(_userCanChange(sticky / "roots" / "state", uid, {gid}))
        self.assertTrue(_userCanChange(sticky / "nobodys" / "state", uid, {gid}))
        self.assertTrue(_userCanChange(sticky / "missing" / "state", uid, {gid}))
        os.chmod(sticky, 0o777)  # not sticky: the user could rename root's entry away
        self.assertTrue(_userCanChange(sticky / "roots" / "state", uid, {gid}))
