"""
C{twistd netsvc}: options and makeService.

    twistd -n netsvc --config etc/netsvc.yaml      every service the file enables
    twistd -n netsvc echo --listen tcp:7007        one service, no file

A configuration that cannot be used ends twistd with one line naming the file,
the key and the reason, and exit status 1 -- never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from netsvc import logs
from netsvc.config import ConfigError, Settings, load, structure
from netsvc.registry import serviceNames


class ServiceOptions(usage.Options):
    """C{twistd netsvc NAME --listen ENDPOINT ...}: one service with its defaults."""

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint string to listen on (repeatable), e.g. tcp:7007:interface=127.0.0.1"""
        self["listen"].append(endpoint)

    opt_l = opt_listen


def _serviceSubCommands() -> list[tuple[str, None, type, str]]:
    return [(name, None, ServiceOptions, f"run only the {name} service (--listen ENDPOINT ...)")
            for name in serviceNames()]


class Options(usage.Options):
    synopsis = "[--config FILE] [service --listen ENDPOINT ...]"
    longdesc = ("Runs every service enabled in the YAML file given with --config, "
                "or one service given as a subcommand.")
    optParameters = [
        ["config", "c", None, "YAML configuration file"],
        ["state-dir", None, None, "override state_dir (generated certificates, status.json)"],
        ["log-format", None, None, "override log.format: text or json"],
        ["log-level", None, None, "override log.level: debug, info, warn, error"],
    ]
    subCommands = _serviceSubCommands()

    def postOptions(self) -> None:
        if self.subCommand is None and self["config"] is None:
            raise usage.UsageError("give --config FILE or a service subcommand (e.g. echo --listen tcp:7007)")


def settingsFromOptions(options: Options) -> Settings:
    """
    The settings the command line asks for: the --config file, or one service.

    @raise ConfigError: as for a file.
    """
    if options.subCommand is not None:
        svc: dict[str, Any] = {}
        if options.subOptions["listen"]:
            svc["listen"] = options.subOptions["listen"]
        data: dict[str, Any] = {"services": {options.subCommand: svc}}
        if options["config"] is None:
            settings = structure(Settings, data, "command line")
            settings = _evolve(settings, base_dir=os.getcwd())
        else:
            base = load(options["config"])
            chosen = structure(Settings, data, "command line").services
            settings = _evolve(base, services=chosen)
    else:
        settings = load(options["config"])
    overrides: dict[str, Any] = {}
    if options["state-dir"]:
        overrides["state_dir"] = os.path.abspath(options["state-dir"])
    log = {}
    if options["log-format"]:
        log["format"] = options["log-format"]
    if options["log-level"]:
        log["level"] = options["log-level"]
    if log:
        merged = {"format": settings.log.format, "level": settings.log.level, "file": settings.log.file, **log}
        from netsvc.config import LogSettings

        overrides["log"] = structure(LogSettings, merged, "command line", "log")
    return _evolve(settings, **overrides) if overrides else settings


def _evolve(settings: Settings, **changes: Any) -> Settings:
    import attrs

    return attrs.evolve(settings, **changes)


def _oneLineErrors(excepthook: Any) -> Any:
    """A sys.excepthook that prints L{ConfigError}s as their lines, no traceback."""

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if isinstance(value, ConfigError):
            for line in str(value).splitlines():
                sys.stderr.write(f"netsvc: {line}\n")
            sys.stderr.flush()
        else:
            excepthook(kind, value, tb)

    hook.netsvc = True  # type: ignore[attr-defined]
    return hook


def makeService(options: Options) -> Any:
    """
    Build the daemon for twistd.  Errors are L{ConfigError}s: twistd lets them
    propagate (after removing its pid file) and our excepthook prints them as
    one line each.
    """
    if not getattr(sys.excepthook, "netsvc", False):
        sys.excepthook = _oneLineErrors(sys.excepthook)
    from netsvc.runtime import buildDaemon

    settings = settingsFromOptions(options)
    daemon = buildDaemon(settings, configFile=options["config"] or "command line",
                         reloadSettings=lambda: settingsFromOptions(options))
    daemon.logObserver = logs.observerFor(settings.log, _twistdStream(options, settings))
    return daemon


def _twistdStream(options: Options, settings: Settings) -> Any:
    """Where log lines go under twistd: log.file, else twistd's --logfile, else stdout/twistd.log."""
    if settings.log.file:
        return None
    twistd = getattr(options, "parent", None) or {}
    logfile = twistd.get("logfile") if hasattr(twistd, "get") else None
    if logfile == "-" or (logfile is None and (not twistd or twistd.get("nodaemon"))):
        return sys.stdout
    return logs.openLogFile(logfile or "twistd.log")
