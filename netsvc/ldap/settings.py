"""
C{services.ldap} settings.

    services:
      ldap:
        listen: ["tcp:3389:interface=127.0.0.1", "tls:3636:interface=127.0.0.1"]
        suffix: dc=example,dc=com
        ldif: [ldap/example.ldif]       # files or folders (their *.ldif, by name); relative to the config file
        anonymous: read                 # read | none
        writable: false                 # true: add/modify/delete/modrdn by `writers`, saved to the (one) ldif file
        writers: []                     # DNs, or groups (groupOfNames) whose members, may write
        size_limit: 500                 # entries one search returns at most (sizeLimitExceeded)
        time_limit: 10s                 # how long one search may run (timeLimitExceeded)
        max_scan: 100000                # entries one search may examine (adminLimitExceeded)
        failed_binds: {rate: 1, burst: 10}   # wrong passwords per second per client IP
        limits: {max_connections: 1024, max_message: 1MiB, idle_timeout: 15m}

The LDIF is loaded when the settings are read (by the daemon, by C{netsvc
check-config} and on SIGHUP), so that a file that does not parse, or an entry
outside the suffix, is a configuration problem naming the file and line.  The
loaded directory travels with the settings (L{Settings.loaded}) to C{makeService}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import attrs

from netsvc.config import Duration, Limits, Listener, ServiceSettings, Size, field, frozen
from netsvc.ldap.directory import Directory, LoadError
from netsvc.ldap.dn import DNError, normalizeDN


@frozen
class FailedBinds:
    #: Wrong passwords allowed per second per client IP once the burst is spent (0: no limit).
    rate: float = field(1.0, min=0)
    burst: int = field(10, min=1, max=100_000)


@frozen
class Settings(ServiceSettings):
    listen: list[Listener] = field(factory=lambda: [Listener(endpoint="tcp:3389:interface=127.0.0.1")])
    suffix: str = field("dc=example,dc=com")
    ldif: list[str] = field(factory=list)
    anonymous: Literal["read", "none"] = field("read")
    writable: bool = field(False)
    #: Who may write when writable: entry DNs, or group entries (member/uniqueMember) whose members may.
    writers: list[str] = field(factory=list)
    size_limit: int = field(500, min=1, max=10_000_000)
    time_limit: Duration = field(Duration(10), min=0.01, max=3600)
    max_scan: int = field(100_000, min=1, max=100_000_000)
    failed_binds: FailedBinds = field(factory=FailedBinds)
    #: max_message bounds one request (checked from its BER length, before it is buffered).
    limits: Limits = field(factory=lambda: Limits(max_connections=1024, max_connections_per_ip=256,
                                                  idle_timeout=Duration(900), max_message=Size(1 << 20)))
    #: The directory loaded from C{ldif} when the settings were read (not a YAML key).
    loaded: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        try:
            normalizeDN(self.suffix)
        except DNError as e:
            problems.append(("suffix", f"not a DN: {e}"))
        if not self.suffix.strip():
            problems.append(("suffix", "must not be empty"))
        for i, w in enumerate(self.writers):
            try:
                normalizeDN(w)
            except DNError as e:
                problems.append((f"writers[{i}]", f"not a DN: {e}"))
        if self.writable and len(self.ldif) != 1:
            problems.append(("ldif", "writable: true needs exactly one ldif file (writes are saved to it)"))
        if self.writable and not self.writers:
            problems.append(("writers", "writable: true needs writers: the DNs (or groups) that may write"))
        return problems

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: Any) -> Any:
        before = len(walker.problems)
        instance = walker.structureClass(cls, value, path)
        if instance is attrs.NOTHING or len(walker.problems) > before:
            return instance
        base = _baseDir(walker.file)
        resolve = lambda p: Path(base, os.path.expanduser(p))  # noqa: E731
        if instance.writable and resolve(instance.ldif[0]).is_dir():
            walker.problem(f"{path}.ldif[0]", "writable: true needs a file, not a folder (writes are saved to it)")
            return attrs.NOTHING
        try:
            directory = instance.load(resolve)
        except LoadError as e:
            walker.problem(f"{path}.ldif" if path else "ldif", str(e))
            return attrs.NOTHING
        for i, writer in enumerate(instance.writers):
            if directory.get(writer) is None:  # (an unquoted DN in a YAML [list] is split at its commas)
                walker.problem(f"{path}.writers[{i}]", f"{writer!r} is not an entry of the directory")
        if len(walker.problems) > before:
            return attrs.NOTHING
        object.__setattr__(instance, "loaded", directory)
        return instance

    def load(self, resolve: Any = Path) -> Directory:
        """The directory of the C{ldif} files (paths resolved with C{resolve}); raises L{LoadError}."""
        return Directory.load(self.suffix, [resolve(p) for p in self.ldif])


def _baseDir(file: str) -> str:
    """Where relative paths in config file C{file} resolve (its folder; the current one for text)."""
    return os.path.dirname(os.path.abspath(file)) if file and os.path.isfile(file) else os.getcwd()
