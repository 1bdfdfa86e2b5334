"""
C{netsvc check-config FILE...}: find every problem the daemon would refuse, in one run, binding nothing.

Two passes per file (the second on what the first left intact, when it found problems):

  1. the schema (L{netsvc.config.load}): unknown keys, types, ranges, endpoint
     strings, CIDRs -- every problem of the file at once;
  2. a dry run (L{dryRun}): every enabled service is built as C{twistd netsvc}
     builds it (C{makeService}), on a memory reactor, so what the daemon checks
     before binding -- web roots, certificate and key files, password and users
     files, LDIF data -- is checked by the same code.  Services are built one by
     one and every failure is kept, so two broken services give two lines.

The dry run has no effect on the files the configuration names: C{cert: auto}
and everything else under C{state_dir} are made in a temporary folder, and the
web access log is not opened (its folder is checked instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from netsvc.config import ConfigError, Problem, Settings, load


def checkConfig(reactor: Any, args: argparse.Namespace) -> int:
    """Validate each file; print C{FILE: OK (services)} or one line per problem (status 1)."""
    status = 0
    for name in args.files:
        try:
            settings = load(name)
        except ConfigError as e:
            problems = e.problems + _dryRunTheRest(name, e.problems)
        else:
            problems = dryRun(settings, name)
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            status = 1
        else:
            enabled = [n for n, s in settings.services.items() if s.enabled]
            print(f"{name}: OK ({', '.join(enabled) or 'no services'})")
    return status


def dryRun(settings: Settings, configFile: str) -> list[Problem]:
    """
    Build (never start) what C{settings} describes, as the daemon does before binding.

    @return: every problem found, in file order; empty when the daemon would start
        (short of a port being taken, which only binding can tell).
    """
    import attrs
    from twisted.internet.testing import MemoryReactorClock

    from netsvc.registry import serviceModule
    from netsvc.runtime import Context, Daemon
    from netsvc.tls import CertificateError, ServerCertificate

    problems: list[Problem] = []
    if settings.tls.cert != "auto":
        try:
            ServerCertificate.fromSettings(settings.tls, settings.stateDir, resolve=settings.path)
        except (CertificateError, OSError) as e:
            problems.append(Problem(configFile, "tls.cert", str(e)))
    with tempfile.TemporaryDirectory(prefix="netsvc-check-config-") as scratch:
        dry = attrs.evolve(settings, state_dir=scratch)
        context = Context(dry, MemoryReactorClock(), configFile)
        context.daemon = Daemon(context)
        for name, svc in dry.services.items():
            if not svc.enabled:
                continue
            if getattr(svc, "access_log", None) is not None:
                problems += _accessLogProblems(settings, configFile, f"services.{name}.access_log.file",
                                               svc.access_log.file)
                svc = attrs.evolve(svc, access_log=None)  # opening it would create it
            try:
                serviceModule(name).makeService(svc, context).setServiceParent(context.daemon)
            except ConfigError as e:
                problems += [p for p in e.problems if p not in problems]
        if dry.metrics.listen:
            from netsvc.status import makeMetricsService

            try:
                makeMetricsService(dry.metrics, context)
            except ConfigError as e:
                problems += [p for p in e.problems if p not in problems]
    return problems


def _dryRunTheRest(configFile: str, problems: list[Problem]) -> list[Problem]:
    """
    The file has schema problems: dry-run what they leave intact (the other services,
    the other top-level sections), so that one run reports the missing web root next
    to the misspelt key.  Returns only new problems; [] when nothing can be built.
    """
    import yaml

    from netsvc.config import parse

    try:
        with open(configFile, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    for problem in problems:
        top, _, rest = problem.path.partition(".")
        top = top.split("[")[0]
        services = data.get("services")
        if top == "services" and rest and isinstance(services, dict):
            services.pop(rest.split(".")[0].split("[")[0], None)
        else:
            data.pop(top, None)
    try:
        settings = parse(yaml.safe_dump(data, sort_keys=False), configFile,
                         os.path.dirname(os.path.abspath(configFile)))
    except ConfigError:
        return []
    return [p for p in dryRun(settings, configFile) if p not in problems]


def _accessLogProblems(settings: Settings, configFile: str, key: str, where: str) -> list[Problem]:
    """The access log file must be creatable (its folder is made, as under state_dir) and writable."""
    if where == "-":
        return []
    path = settings.path(where)
    if path.exists():
        ok = path.is_file() and os.access(path, os.W_OK)
        return [] if ok else [Problem(configFile, key, f"cannot write {path}")]
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        return []
    return [Problem(configFile, key, f"cannot create {path} (no write access to {Path(folder)})")]
