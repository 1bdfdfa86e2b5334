"""
C{twistd netsvc}: options and makeService.

    twistd -n netsvc --config etc/netsvc.yaml      every service the file enables
    twistd -n netsvc echo --listen tcp:7007        one service, no file

A configuration that cannot be used ends twistd with one line naming the file,
the key and the reason, and exit status 1 -- never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from twisted.python import usage

from netsvc import logs
from netsvc.config import ConfigError, Problem, Settings, load, structure
from netsvc.registry import serviceNames

#: Endpoint types that bind an address; without interface= a command line binds loopback.
_LOOPBACK = {"tcp": "127.0.0.1", "udp": "127.0.0.1", "tls": "127.0.0.1", "ssl": "127.0.0.1", "tcp6": "::1"}


def loopbackByDefault(endpoint: str) -> str:
    """
    C{tcp:7007} -> C{tcp:7007:interface=127.0.0.1} (C{tcp6:} gets C{::1}): on the
    command line, as in every default, binding all interfaces must be written
    (C{interface=0.0.0.0} or C{interface=::}).  Anything else is returned as is.
    """
    from netsvc.endpoints import split

    try:
        kind, args, kwargs = split(endpoint)
    except ValueError:
        return endpoint  # validation reports it
    numbered = (bool(args) and args[0].isdigit()) or "port" in kwargs  # else: left for validation to report
    if kind in _LOOPBACK and "interface" not in kwargs and numbered:
        return f"{endpoint}:interface={_LOOPBACK[kind]}"
    return endpoint


class ServiceOptions(usage.Options):
    """C{twistd netsvc NAME --listen ENDPOINT ...}: one service with its defaults."""

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to listen on (repeatable), e.g. tcp:7007; loopback unless interface= says otherwise"""
        self["listen"].append(loopbackByDefault(endpoint))

    opt_l = opt_listen


def _serviceSubCommands() -> list[tuple[str, None, type, str]]:
    """One subcommand per service that has a top-level C{listen:} (forward has rules: use --config)."""
    import attrs

    from netsvc.registry import settingsClass

    def listens(name: str) -> bool:
        try:
            return "listen" in attrs.fields_dict(settingsClass(name))
        except Exception:  # a service that cannot even be imported says so when it is used, not here
            return True

    return [(name, None, ServiceOptions, f"run only the {name} service (--listen ENDPOINT ...)")
            for name in serviceNames() if listens(name)]


class Options(usage.Options):
    synopsis = "[--config FILE] [service --listen ENDPOINT ...]"
    longdesc = ("Runs every service enabled in the YAML file given with --config, "
                "or one service given as a subcommand (its defaults, loopback addresses). "
                "Port forwarding has rules, not listeners: use --config, or `netsvc forward` for one rule.")
    optParameters = [
        ["config", "c", None, "YAML configuration file"],
        ["state-dir", None, None, "override state_dir (generated certificates, status.json)"],
        ["log-format", None, None, "override log.format: text or json"],
        ["log-level", None, None, "override log.level: debug, info, warn, error"],
    ]

    @property
    def subCommands(self) -> list[tuple[str, None, type, str]]:  # type: ignore[override]
        """Computed when twistd asks (parsing, --help): importing netsvc.tap imports no service."""
        return _serviceSubCommands()

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
    from netsvc.runtime import buildDaemon, runAsFromTwistd

    settings = settingsFromOptions(options)
    # --uid/--gid: state_dir is claimed for that user before anything is written in it, and what root
    # writes there before the drop is written as that user (netsvc.runtime.claimFolders, handOver)
    runAs = runAsFromTwistd(options)
    daemon = buildDaemon(settings, configFile=options["config"] or "command line",
                         reloadSettings=lambda: settingsFromOptions(options), runAs=runAs)
    daemon.logObserver = _observer(options, settings, runAs)
    daemon.startupErrorFD = _daemonizedStartupErrors(options)
    from netsvc.workers.supervisor import forWorkers

    return forWorkers(daemon, settings, options)  # the daemon itself unless workers: N > 1


def _observer(options: Options, settings: Settings, runAs: tuple[int, int] | None) -> Any:
    """
    The daemon's log observer.  With C{--uid}, a log file in a folder the run
    user could change is opened as that user (L{netsvc.runtime.openingAs}): root
    never appends through a link planted there.

    @raise StartupError: it cannot be opened (naming the file).
    """
    from netsvc.runtime import StartupError, openingAs

    twistdLog = None if settings.log.file else _twistdLogFile(options)
    path = settings.log.file or twistdLog  # as logs.observerFor opens it
    try:
        with openingAs(runAs, path) if path else contextlib.nullcontext():
            return logs.observerFor(settings.log, _twistdStream(options, settings))
    except OSError as e:
        key = "log.file" if settings.log.file else "--logfile"
        user = runAs and _userName(runAs[0])
        who = f" as {user} (--uid), who netsvc runs as" if user else ""
        raise StartupError([Problem(options["config"] or "command line", key,
                                    f"cannot open {e.filename or path}{who}: {e.strerror}")]) from None


def _userName(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


#: What a netsvc start failure looks like on twistd's status pipe (the exception's qualified name).
_OUR_ERRORS = (b"1 netsvc.runtime.StartupError", b"1 netsvc.config.ConfigError", b"1 netsvc.schema.ConfigError")


def _daemonizedStartupErrors(options: Options) -> int | None:
    """
    Without C{-n}, twistd binds after forking, in a child whose stderr is
    /dev/null, and the parent prints only the first 100 bytes of the error as
    a bytes repr (C{An error has occurred: b"netsvc.runtime.StartupError: ...}).
    So: keep a copy of the terminal's stderr for the child (L{Daemon} writes its
    StartupError lines there), and let the parent stay quiet about our own errors
    (twistd has no hook for this; its C{_waitForStart} is wrapped, everything
    else it reports is reported as before).  Returns the saved descriptor, or
    None when twistd does not daemonize.
    """
    twistd = getattr(options, "parent", None)
    if not hasattr(twistd, "get") or twistd.get("nodaemon") or os.name != "posix":
        return None
    from twisted.scripts import _twistd_unix

    runner = _twistd_unix.UnixApplicationRunner
    original = runner._waitForStart
    if not getattr(original, "netsvc", False):

        def _waitForStart(self: Any, readPipe: int) -> int:
            from twisted.python.util import untilConcludes

            data = untilConcludes(os.read, readPipe, 100)
            if data.startswith(_OUR_ERRORS):
                return 1  # the child has printed the whole message
            replay, feed = os.pipe()  # anything else: twistd's own report, unchanged
            os.write(feed, data)
            os.close(feed)
            try:
                return original(self, replay)
            finally:
                os.close(replay)

        _waitForStart.netsvc = True  # type: ignore[attr-defined]
        runner._waitForStart = _waitForStart  # type: ignore[method-assign]
    return os.dup(2)


def _twistdLogFile(options: Options) -> str | None:
    """The file twistd's log goes to (--logfile, or twistd.log when daemonized); None: standard output."""
    twistd = getattr(options, "parent", None) or {}
    logfile = twistd.get("logfile") if hasattr(twistd, "get") else None
    if logfile == "-" or (logfile is None and (not twistd or twistd.get("nodaemon"))):
        return None
    return logfile or "twistd.log"


def _twistdStream(options: Options, settings: Settings) -> Any:
    """Where log lines go under twistd: log.file, else twistd's --logfile, else stdout/twistd.log."""
    if settings.log.file:
        return None
    logfile = _twistdLogFile(options)
    return sys.stdout if logfile is None else logs.openLogFile(logfile)
