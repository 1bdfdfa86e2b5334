"""
The README's examples, run as a user runs them against C{make run}.

The shipped C{etc/netsvc.yaml} is started as a real C{twistd -n netsvc} child
(L{tests.interop._daemon}), with its fixed ports rewritten to free ones so that
the test also runs while a C{make run} (or another test) holds them; every
command of every C{```sh} block of README.md is then run by bash, in a folder
laid out like the repository (C{etc/}, C{www/}, C{var/} = the daemon's state),
with the same port rewriting, C{netsvc} being this source tree's.  Each must exit
0 (or the status its comment announces, e.g. C{# TRUE, exit 6}).

A few commands cannot run against C{make run}; each is listed in L{NOT_RUN}
with the reason, and a command that is neither run nor listed fails the test --
a new README example is either true on the shipped configuration or says why not.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.trial import unittest

from tests.helpers import freePort
from tests.interop._daemon import REPO, _dieWithParent, ipv6LoopbackWorks, startNetsvc

#: A block that starts processes in the background or writes files with a here-document is a script
#: (a demo with daemons of its own), not a list of commands: it is returned whole, prefixed with this.
SCRIPT = "<script>\n"

#: Commands (matched by regex) that are not run, and why.
NOT_RUN = {
    r"^make (run|test)\b": "starts the daemon / the test suite (this test is the daemon's other side)",
    r"example\.test/": "needs a server of your own (the README says so: the shipped config only serves files)",
    r"^netsvc dns query example\.com\b": "asks the system's resolver, outside this machine (tests stay on loopback)",
    "^" + re.escape(SCRIPT): "a demo script that starts its own daemons (and redis-server) on fixed ports",
}

#: Commands whose documented success is another status than 0 (matched by regex), and why.
EXPECTED_STATUS = {
    r"^ldapcompare .*# TRUE": (6, "ldapcompare exits 6 (compareTrue) when the assertion holds"),
}

#: How long one example may take (the load example does 10,000 round trips).
EXAMPLE_TIMEOUT = 60.0


def readmeCommands(text: str) -> list[tuple[str, str]]:
    """(section heading, command) for every command of every ```sh block; continued lines joined."""
    out: list[tuple[str, str]] = []
    heading, block = "", None
    for line in text.splitlines():
        if block is None and line.startswith("#"):
            heading = line.lstrip("# ").strip()
        elif block is None and line.strip() == "```sh":
            block = []
        elif block is not None and line.startswith("```"):
            if any(re.search(r"&\s*(#.*)?$|<<", l) for l in block):
                out.append((heading, SCRIPT + "\n".join(block)))
            else:
                out.extend((heading, command) for command in _commands(block))
            block = None
        elif block is not None:
            block.append(line)
    return out


def _commands(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        if line.strip():
            pending += line.strip() if pending else line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip() + " "
                continue
            out.append(pending.strip())
            pending = ""
    return out


_SHIPPED_PORT = re.compile(r"((?:tcp6?|udp|tls|ssl):|port=)(\d+)")


def shippedConfig(folder: Path) -> dict[int, int]:
    """
    Lay out C{folder} like the repository for the shipped configuration: C{etc/netsvc.yaml}
    with every port rewritten to a free one, the rest of C{etc/} and C{www/} linked.
    Returns the port mapping (shipped -> this run).
    """
    text = (REPO / "etc" / "netsvc.yaml").read_text()
    if not ipv6LoopbackWorks():
        text = "\n".join(l for l in text.splitlines() if "tcp6:" not in l) + "\n"
    mapping = {int(p): freePort() for p in sorted({m.group(2) for m in _SHIPPED_PORT.finditer(text)})}
    text = _SHIPPED_PORT.sub(lambda m: m.group(1) + str(mapping[int(m.group(2))]), text)
    etc = folder / "etc"
    etc.mkdir(parents=True)
    for entry in (REPO / "etc").iterdir():
        if entry.name != "netsvc.yaml":
            (etc / entry.name).symlink_to(entry)
    (etc / "netsvc.yaml").write_text(text)
    (folder / "www").symlink_to(REPO / "www")
    return mapping


def translate(command: str, ports: dict[int, int]) -> str:
    """The README's command for this run: netsvc from this tree (C{$PY -m netsvc}), ports rewritten."""
    command = re.sub(r"(^|\|\s*)(?:\.venv/bin/)?netsvc ", r'\1"$PY" -m netsvc ', command)
    command = re.sub(r"(?<=[:=])(\d+)\b", lambda m: str(ports.get(int(m.group(1)), m.group(1))), command)
    return re.sub(r"(?<=-p )(\d+)\b", lambda m: str(ports.get(int(m.group(1)), m.group(1))), command)


def expectedStatus(command: str) -> int:
    """0, or what the command's comment announces (C{# TRUE, exit 6}), or L{EXPECTED_STATUS}."""
    m = re.search(r"#.*\bexit (\d+)", command)
    if m:
        return int(m.group(1))
    return next((status for pattern, (status, _) in EXPECTED_STATUS.items() if re.search(pattern, command)), 0)


class ReadmeExamplesTests(unittest.TestCase):
    """Every README example against the shipped configuration."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.ports = shippedConfig(self.folder)
        self.daemon = startNetsvc(self, self.folder / "etc" / "netsvc.yaml", self.folder / "var",
                                  cwd=self.folder)
        self.env = dict(os.environ, PY=sys.executable, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))

    def notRun(self, command: str) -> str | None:
        for pattern, reason in NOT_RUN.items():
            if re.search(pattern, command):
                return reason
        if "[::1]" in command and not ipv6LoopbackWorks():
            return "no IPv6 loopback on this machine"
        tool = re.sub(r"^(printf|echo) .*?\|\s*", "", command).split()[0]
        if tool != "netsvc" and not tool.startswith(".venv/") and shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-test-peers)"
        return None

    def runOne(self, command: str) -> str | None:
        """Run one example; None when it did what the README says, else what went wrong."""
        shell = translate(command, self.ports)
        if re.match(r"^netsvc forward ", command):
            return self.runForward(command, shell)
        try:
            done = subprocess.run(["bash", "-c", shell], cwd=self.folder, env=self.env, capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=EXAMPLE_TIMEOUT, preexec_fn=_dieWithParent)
        except subprocess.TimeoutExpired:
            return f"did not finish within {EXAMPLE_TIMEOUT:g}s"
        want = expectedStatus(command)
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != want:
            return f"exit status {done.returncode}, expected {want}:\n{output[-2000:]}"
        if "Traceback" in output:
            return f"printed a traceback:\n{output[-2000:]}"
        return None

    def runForward(self, command: str, shell: str) -> str | None:
        """`netsvc forward` runs until interrupted: it must say where it listens, then end 0 on SIGTERM."""
        for _ in range(3):  # a free port can be taken by someone's outgoing connection meanwhile
            problem = self._runForwardOnce(shell)
            if problem is None or "address already in use" not in problem:
                return problem
        return problem

    def _runForwardOnce(self, shell: str) -> str | None:
        listen = shell.split("-m netsvc forward ", 1)[1].split()[0]
        port = re.search(r"(\d+)(?::|$)", listen.split(":interface")[0])
        if port and int(port.group(1)) not in self.ports.values():  # a new listener: a free port for it
            shell = shell.replace(f"forward {listen}", f"forward {listen.replace(port.group(1), str(freePort()))}", 1)
        process = subprocess.Popen(["bash", "-c", "exec " + shell], cwd=self.folder, env=self.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   bufsize=0, preexec_fn=_dieWithParent)  # unbuffered: select() tells the truth
        try:
            said = ""
            deadline = time.monotonic() + EXAMPLE_TIMEOUT
            while " -> " not in said:  # e.g. "netsvc forward: tcp 127.0.0.1:8081 -> 127.0.0.1:9001"
                ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
                line = process.stdout.readline().decode(errors="replace") if ready else ""  # type: ignore[union-attr]
                if not line:
                    return f"did not say where it listens; it said: {said!r}"
                said += line
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            status = process.wait(EXAMPLE_TIMEOUT)
            return None if status == 0 else f"exit status {status} after SIGTERM, expected 0"
        except subprocess.TimeoutExpired:
            return "did not stop on SIGTERM"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()  # type: ignore[union-attr]

    def test_everyExample(self) -> None:
        commands = readmeCommands((REPO / "README.md").read_text())
        self.assertGreater(len(commands), 40, "the README's ```sh blocks were not found")
        toRun = [(h, c) for h, c in commands if self.notRun(c) is None]
        # Independent examples run side by side (a few at a time); one section's run in README order.
        sections: dict[str, list[str]] = {}
        for heading, command in toRun:
            sections.setdefault(heading, []).append(command)

        def runSection(commands: list[str]) -> list[str]:
            return [f"{c}\n  -> {problem}" for c in commands if (problem := self.runOne(c)) is not None]

        with ThreadPoolExecutor(max_workers=3) as pool:
            failures = [f for result in pool.map(runSection, sections.values()) for f in result]
        self.assertEqual(failures, [], "README examples that do not work against the shipped configuration:\n"
                         + "\n".join(failures))
        self.assertTrue(self.daemon.running(), "the daemon died during the examples:\n" + self.daemon.output())
        self.assertNotIn("Traceback", self.daemon.output())


class ParsingTests(unittest.TestCase):
    """The helpers above, on text whose answer is known."""

    def test_readmeCommands(self) -> None:
        text = "# A\n```sh\nnetsvc echo x:1 \\\n    hi  # note\n```\n## B\n```\nnot sh\n```\n```sh\ncurl y\n```\n"
        self.assertEqual(readmeCommands(text), [("A", "netsvc echo x:1 hi  # note"), ("B", "curl y")])

    def test_translate(self) -> None:
        ports = {7007: 40001, 5353: 40002}
        self.assertEqual(translate(".venv/bin/netsvc echo localhost:7007 hi", ports),
                         '"$PY" -m netsvc echo localhost:40001 hi')
        self.assertEqual(translate("printf 'a\\n' | netsvc dns query x @127.0.0.1:5353 --count 7007", ports),
                         "printf 'a\\n' | \"$PY\" -m netsvc dns query x @127.0.0.1:40002 --count 7007")
        self.assertEqual(translate("dig -p 5353 x tls:host=a:port=7007", ports),
                         "dig -p 40002 x tls:host=a:port=40001")

    def test_expectedStatus(self) -> None:
        self.assertEqual(expectedStatus("netsvc ldap compare x  # TRUE, exit 6"), 6)
        self.assertEqual(expectedStatus("ldapcompare -x uid=bob title:operator   # TRUE"), 6)
        self.assertEqual(expectedStatus("netsvc echo x"), 0)

    def test_scriptBlocksStayWhole(self) -> None:
        text = "# S\n```sh\nredis-server &\ncat > a <<'Y'\nx: 1\nY\nnetsvc chat h:1\n```\n"
        self.assertEqual(readmeCommands(text),
                         [("S", SCRIPT + "redis-server &\ncat > a <<'Y'\nx: 1\nY\nnetsvc chat h:1")])


class ConfigurationExampleTests(unittest.TestCase):
    """The README's whole-file example under "## Configuration" is a valid netsvc configuration."""

    def test_parses(self) -> None:
        from netsvc import config

        text = (REPO / "README.md").read_text()
        section = text[text.index("\n## Configuration"):]
        block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
        settings = config.parse(block, "README.md")
        self.assertEqual((int(settings.workers), settings.cpu_affinity), (1, "off"))
        self.assertIn("::1", settings.tls.names)
