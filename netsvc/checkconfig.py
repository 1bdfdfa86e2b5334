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

Then a security check (L{securityWarnings}, in the spirit of C{postfix check}
and C{unbound-checkconf}): one line per risky setting, with its key path --
a relay or resolver reachable beyond loopback without an ACL, TLS verification
switched off, admin pages open without users, passwords accepted without TLS,
C{accept_proxy} without trusted senders, world-readable password files.
Warnings leave the exit status 0; C{--strict} makes them errors.  The daemon
logs the same warnings once at start.
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
    """
    Validate each file; print C{FILE: OK (services)} or one line per problem
    (status 1).  Security warnings are printed as C{FILE: KEY: warning: ...};
    they make the status 1 only with C{args.strict}.
    """
    status = 0
    strict = getattr(args, "strict", False)
    for name in args.files:
        try:
            settings = load(name)
        except ConfigError as e:
            problems = e.problems + _dryRunTheRest(name, e.problems)
            warnings: list[Problem] = []
        else:
            problems = dryRun(settings, name)
            warnings = securityWarnings(settings, name)
        for problem in problems:
            print(problem, file=sys.stderr)
        for warning in warnings:
            print(f"{warning.file}: {warning.path}: {'error' if strict else 'warning'}: {warning.reason}",
                  file=sys.stderr)
        if problems or (strict and warnings):
            status = 1
        else:
            enabled = [n for n, s in settings.services.items() if s.enabled]
            extra = f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
            print(f"{name}: OK ({', '.join(enabled) or 'no services'}){extra}")
    return status


# -- the security check ---------------------------------------------------------------

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def exposed(endpoint: str) -> bool:
    """Whether a listener endpoint can be reached from beyond this machine (unix: never; no interface=: yes)."""
    import ipaddress

    from netsvc.endpoints import split

    try:
        kind, args, kwargs = split(endpoint)
    except ValueError:
        return False
    if kind in ("unix", "unix6"):
        return False
    interface = kwargs.get("interface")
    if interface is None:
        return True
    interface = interface.strip("[]")
    if interface in _LOOPBACK_NAMES:
        return False
    try:
        return not ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return True


def _beyondLoopback(networks: list[str]) -> bool:
    """Whether a CIDR list admits an address outside loopback."""
    import ipaddress

    for spec in networks:
        try:
            if not ipaddress.ip_network(spec, strict=False).is_loopback:
                return True
        except ValueError:
            continue
    return False


def _everyone(networks: list[str]) -> bool:
    return any(spec.strip().endswith("/0") for spec in networks)


def _endpoints(listen: Any) -> list[str]:
    return [getattr(item, "endpoint", item) for item in (listen or [])]


def _walk(value: Any, path: str) -> Any:
    """Every (key path, value) below a settings object (attrs classes, dicts, lists)."""
    import attrs

    yield path, value
    if attrs.has(type(value)):
        for f in attrs.fields(type(value)):
            yield from _walk(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


_INSECURE = ("insecure=yes", "insecure=true", "insecure=1", "insecure=on")


def securityWarnings(settings: Settings, configFile: str) -> list[Problem]:
    """
    Settings that work but leave a door open: one L{Problem} per finding, with
    its key path (see the module docstring).  Never raises for a valid file.
    """
    out: list[Problem] = []

    def warn(key: str, reason: str) -> None:
        out.append(Problem(configFile, key, reason))

    services = {name: svc for name, svc in settings.services.items() if getattr(svc, "enabled", True)}
    # TLS verification switched off, wherever an endpoint string or a flag says so
    for key, value in _walk(settings, ""):
        leaf = key.rsplit(".", 1)[-1]
        if isinstance(value, str) and any(flag in value.lower() for flag in _INSECURE):
            warn(key, "TLS certificate verification is switched off (insecure=yes): anyone on the path can "
                      "pose as the peer")
        elif isinstance(value, bool) and ((leaf in ("insecure", "tls_insecure") and value)
                                          or (leaf in ("verify", "tls_verify", "verify_tls") and not value)):
            warn(key, "TLS certificate verification is switched off: anyone on the path can pose as the peer")
    # resolvers and relays reachable beyond loopback without an ACL
    dns = services.get("dns")
    # (without allow: the resolver answers loopback and its listeners' own networks only)
    if dns is not None and any(exposed(e) for e in _endpoints(dns.listen)) and _everyone(dns.allow):
        warn("services.dns.allow", "the resolver listens beyond loopback and answers anyone (an open resolver, "
                                   "usable for amplification): list the networks it serves")
    smtp = services.get("smtp")
    if smtp is not None and any(exposed(e) for e in _endpoints(smtp.listen)) and _everyone(smtp.mynetworks):
        warn("services.smtp.mynetworks", "an open relay: anyone reaching a listener beyond loopback may relay "
                                         "mail without AUTH")
    forward = services.get("forward")
    for i, rule in enumerate(getattr(forward, "rules", []) or []):
        if any(exposed(e) for e in _endpoints(rule.listen)) and (not rule.allow or _everyone(rule.allow)):
            warn(f"services.forward.rules[{i}].allow", "the forward listens beyond loopback and relays anyone "
                                                        "to its backends: list the networks it serves")
        # accept_proxy without trusted_proxies is a config error; trusting every address is not
        proxied = rule.accept_proxy or any(getattr(l, "accept_proxy", None) for l in rule.listen)
        if proxied and _everyone(rule.trusted_proxies):
            warn(f"services.forward.rules[{i}].trusted_proxies", "PROXY headers are believed from any address: "
                 "any client can claim any address; list only the load balancers in front")
    # admin pages without users
    web = services.get("web")
    if web is not None and any(exposed(e) for e in _endpoints(web.listen)):
        admin = web.admin
        if (admin.metrics_path or admin.status_path) and _beyondLoopback(admin.allow) and not admin.users:
            warn("services.web.admin.users", "/metrics and /status are open to admin.allow beyond loopback "
                                             "without a password: add users")
    if settings.metrics.listen and any(exposed(e) for e in _endpoints(settings.metrics.listen)) and (
            not settings.metrics.allow or _beyondLoopback(settings.metrics.allow)):
        warn("metrics.allow", "/metrics is served beyond loopback without a password")
    # passwords without TLS
    # (auth without verified TLS is a config error unless this opt-out is written)
    if smtp is not None and smtp.relay.auth is not None and \
            smtp.relay.auth.insecure_send_password_without_verified_tls:
        warn("services.smtp.relay.auth.insecure_send_password_without_verified_tls",
             "the smarthost password may go over TLS nobody verified, or in clear text: anyone on the path "
             "can read it; use starttls: required or a tls: smarthost instead")
    chat = services.get("chat")
    chatAuth = getattr(chat, "auth", None)
    if chat is not None and chatAuth is not None and (chatAuth.password_file or chatAuth.users is not None):
        for i, e in enumerate(_endpoints(chat.listen)):
            if exposed(e) and not e.startswith(("tls:", "ssl:")):
                warn(f"services.chat.listen[{i}]", "chat passwords are accepted in clear text on a listener "
                                                   "beyond loopback: use a tls: listener")
    for key, value in _walk(settings, ""):
        if type(value).__name__ == "UserSource" and getattr(value, "ldap", None):
            if str(value.ldap).startswith("ldap://") and not value.starttls:
                warn(f"{key}.ldap", "users' passwords go to the directory in clear text: use ldaps:// or "
                                    "starttls: true")
    # password files others can read
    for key, value in _walk(settings, ""):
        leaf = key.rsplit(".", 1)[-1]
        isFile = leaf in ("password_file", "bind_password_file") or (
            leaf == "file" and key.endswith("users.file")) or (leaf == "users" and isinstance(value, str))
        if isFile and isinstance(value, str) and value:
            path = settings.path(value)
            try:
                mode = path.stat().st_mode
            except OSError:
                continue
            if mode & 0o004:
                warn(key, f"{path} is readable by every user of this machine: chmod o-r {path}")
    return out


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
