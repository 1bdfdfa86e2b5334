"""
The C{netsvc} command: one subcommand per protocol client, plus check-config.

    netsvc echo HOST:PORT [--udp] [--tls] [MESSAGE ...]
    netsvc check-config FILE ...

Each client module provides C{addParser(subparsers)} (setting C{run} as the
parser's default: C{run(reactor, args) -> Deferred[int] | int}).  Every command
ends with the same exit statuses (L{netsvc.clients.EXIT_STATUS_HELP}); help
texts are shown without epydoc markup (L{plain}).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

CLIENTS = ["netsvc.echo.client", "netsvc.chat.client", "netsvc.dns.client", "netsvc.forward.client",
           "netsvc.fetch.cli", "netsvc.smtp.client", "netsvc.ldap.clientcli"]
#: Subcommands a module adds under another module's command (its C{addSubparsers(subparsers)}):
#: C{netsvc mail read} is the mailbox client, under the SMTP client's C{netsvc mail}.
SUBCOMMANDS = {"mail": ["netsvc.mailbox.client"]}


def checkConfig(reactor: Any, args: argparse.Namespace) -> int:
    """C{netsvc check-config FILE...} (L{netsvc.checkconfig}, imported when used)."""
    from netsvc.checkconfig import checkConfig as check

    return check(reactor, args)


_MARKUP = re.compile(r"\b[CLIBU]\{")


def plain(text: str | None) -> str | None:
    """Help text without epydoc markup: C{netsvc echo} -> netsvc echo (braces inside kept)."""
    if not text:
        return text
    out, pos = [], 0
    for m in _MARKUP.finditer(text):
        if m.start() < pos:
            continue
        depth, end = 1, m.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:  # unbalanced: leave the rest alone
            break
        out += [text[pos:m.start()], text[m.end():end - 1]]
        pos = end
    return "".join(out) + text[pos:]


def _version() -> str:
    import platform

    import twisted
    from netsvc import __version__

    return f"netsvc {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


def parser(command: str | None = None) -> argparse.ArgumentParser:
    import importlib

    from netsvc.clients import EXIT_STATUS_HELP

    top = argparse.ArgumentParser(
        prog="netsvc", description="Clients for the netsvc services, and a configuration checker.",
        epilog=f"Run 'netsvc COMMAND --help' for a command's options.\n{EXIT_STATUS_HELP}.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    check = sub.add_parser(
        "check-config", help="validate configuration files (what the daemon would refuse)",
        description="Validate netsvc configuration files without starting anything: every problem the "
                    "daemon would refuse before binding (unknown keys, bad values, missing files, unreadable "
                    "certificates) is printed as FILE: KEY: REASON, all of them in one run.",
        epilog="Exit status: 0 when every file is OK, 1 when one has a problem (or a security warning with "
               "--strict), 2 on bad usage.")
    check.add_argument("files", nargs="+", metavar="FILE", help="a YAML configuration file (e.g. etc/netsvc.yaml)")
    check.add_argument("--strict", action="store_true", help="security warnings are errors (exit status 1)")
    check.set_defaults(run=checkConfig)
    top.commands = {"check-config": check}  # type: ignore[attr-defined]
    # Only the command asked for is imported when its module is netsvc.<command>.* (start-up time).
    modules = [m for m in CLIENTS if m.split(".")[1] == command] or CLIENTS
    for module in modules:
        client = importlib.import_module(module).addParser(sub)
        top.commands[client.prog.split()[-1]] = client  # type: ignore[attr-defined]
    for name, extra in SUBCOMMANDS.items():
        parent = top.commands.get(name)  # type: ignore[attr-defined]
        if parent is None:
            continue
        (children,) = [a for a in parent._actions if isinstance(a, argparse._SubParsersAction)]
        for module in extra:
            importlib.import_module(module).addSubparsers(children)
    _plainHelp(top)
    return top


def _plainHelp(p: argparse.ArgumentParser) -> None:
    """Strip epydoc markup from every description, epilog and help text, subcommands included."""
    p.description = plain(p.description)
    p.epilog = plain(p.epilog)
    for action in p._actions:
        action.help = plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for child in set(action.choices.values()):
                _plainHelp(child)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the C{netsvc} console script; exits with the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = parser(argv[0] if argv and not argv[0].startswith("-") else None)
    if not argv:  # the command list, as `git` alone prints it
        top.print_help(sys.stderr)
        sys.exit(2)
    command = top.commands.get(argv[0]) if argv else None  # type: ignore[attr-defined]
    # Options may come after the messages (netsvc echo HOST:PORT hello --udp).
    # (argparse cannot intermix a command that has subcommands: netsvc mail send ...)
    nested = command is not None and command._subparsers is not None
    args = command.parse_intermixed_args(argv[1:]) if command and not nested else top.parse_args(argv)
    if args.run is checkConfig:
        sys.exit(checkConfig(None, args))
    from twisted.internet import defer, task

    if not getattr(args, "logsItself", False):
        from twisted.logger import globalLogBeginner

        globalLogBeginner.beginLoggingTo([_ErrorLines(argv[0])], discardBuffer=True, redirectStandardIO=False)

    def run(reactor: Any) -> defer.Deferred:
        d = defer.maybeDeferred(args.run, reactor, args)
        interrupted: list[bool] = []
        if not getattr(args, "untilInterrupted", False):  # (chat and forward: Ctrl-C is how they end)

            def onShutdown() -> None:
                if not d.called:  # Ctrl-C / SIGTERM before the command was done
                    interrupted.append(True)
                    clients.quiet = True  # what breaks now is the interruption's doing, not news

            reactor.addSystemEventTrigger("before", "shutdown", onShutdown)
        d.addErrback(_unexpected, argv[0])
        d.addCallback(lambda status: EXIT_INTERRUPTED if interrupted else status)
        return d.addCallback(_exitWith)

    from netsvc import clients

    task.react(run)


#: The status after Ctrl-C (128 + SIGINT), as shells report a command a signal ended.
EXIT_INTERRUPTED = 130


class _ErrorLines:
    """
    The log observer of a client command: nothing below error level, an error as one
    line.  (Twisted logs some failures itself, e.g. a Deferred nobody handled; without
    an observer it prints their tracebacks.)
    """

    def __init__(self, command: str) -> None:
        self.command = command

    def __call__(self, event: dict) -> None:
        import os

        from twisted.internet.error import ReactorNotRunning
        from twisted.logger import LogLevel, formatEvent

        failure = event.get("log_failure")
        if failure is None:
            if event.get("log_level", LogLevel.info) >= LogLevel.error:
                sys.stderr.write(f"netsvc {self.command}: {formatEvent(event)}\n")
            return
        if failure.check(ReactorNotRunning):  # Ctrl-C racing the command's own end
            return
        if os.environ.get("NETSVC_TRACEBACK"):
            failure.printTraceback(sys.stderr)
        sys.stderr.write(f"netsvc {self.command}: unexpected error: {failure.type.__name__}: "
                         f"{failure.getErrorMessage()} (NETSVC_TRACEBACK=1 shows where)\n")


def _unexpected(failure: Any, command: str) -> int:
    """A bug, not a user's mistake: one line (the traceback with NETSVC_TRACEBACK=1), status 1."""
    import os

    if failure.check(SystemExit):
        return failure.value.code
    if os.environ.get("NETSVC_TRACEBACK"):
        failure.printTraceback(sys.stderr)
    sys.stderr.write(f"netsvc {command}: unexpected error: {failure.type.__name__}: {failure.getErrorMessage()} "
                     "(NETSVC_TRACEBACK=1 shows where)\n")
    return 1


def _exitWith(status: int) -> None:
    if status:
        raise SystemExit(status)
