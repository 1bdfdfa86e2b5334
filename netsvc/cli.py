"""
The C{netsvc} command: one subcommand per protocol client, plus check-config.

    netsvc echo HOST:PORT [--udp] [--tls] [MESSAGE ...]
    netsvc check-config FILE ...

Each client module provides C{addParser(subparsers)} (setting C{run} as the
parser's default: C{run(reactor, args) -> Deferred[int] | int}).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

CLIENTS = ["netsvc.echo.client", "netsvc.chat.client", "netsvc.dns.client", "netsvc.forward.client",
           "netsvc.fetch.cli", "netsvc.smtp.client", "netsvc.ldap.clientcli"]


def checkConfig(reactor: Any, args: argparse.Namespace) -> int:
    """Validate each file (settings, endpoints, certificate files); print OK or the problems."""
    from netsvc.config import ConfigError, Problem, load
    from netsvc.tls import CertificateError, ServerCertificate

    status = 0
    for name in args.files:
        try:
            settings = load(name)
            if settings.tls.cert != "auto":
                try:
                    ServerCertificate.fromSettings(settings.tls, settings.stateDir, resolve=settings.path)
                except CertificateError as e:
                    raise ConfigError([Problem(name, "tls.cert", str(e))]) from None
        except ConfigError as e:
            for line in str(e).splitlines():
                print(line, file=sys.stderr)
            status = 1
        else:
            enabled = [n for n, s in settings.services.items() if s.enabled]
            print(f"{name}: OK ({', '.join(enabled) or 'no services'})")
    return status


def parser() -> argparse.ArgumentParser:
    import importlib

    top = argparse.ArgumentParser(prog="netsvc", description="Clients for the netsvc services.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = sub.add_parser("check-config", help="validate configuration files")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(run=checkConfig)
    top.commands = {"check-config": check}  # type: ignore[attr-defined]
    for module in CLIENTS:
        client = importlib.import_module(module).addParser(sub)
        top.commands[client.prog.split()[-1]] = client  # type: ignore[attr-defined]
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the C{netsvc} console script; exits with the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = parser()
    command = top.commands.get(argv[0]) if argv else None  # type: ignore[attr-defined]
    # Options may come after the messages (netsvc echo HOST:PORT hello --udp).
    # (argparse cannot intermix a command that has subcommands: netsvc mail send ...)
    nested = command is not None and command._subparsers is not None
    args = command.parse_intermixed_args(argv[1:]) if command and not nested else top.parse_args(argv)
    if args.run is checkConfig:
        sys.exit(checkConfig(None, args))
    from twisted.internet import defer, task

    def run(reactor: Any) -> defer.Deferred:
        return defer.maybeDeferred(args.run, reactor, args).addCallback(_exitWith)

    task.react(run)


def _exitWith(status: int) -> None:
    if status:
        raise SystemExit(status)
