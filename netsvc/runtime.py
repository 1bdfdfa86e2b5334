"""
Composition: settings -> one running daemon.

L{buildDaemon} is the public entry point (used by the twistd plugin and by
C{etc/netsvc.tac}): it makes a L{Daemon} (a MultiService) holding one child per
enabled service.  Services are built by their own C{makeService(settings,
context)}; the L{Context} gives them what they share.

Lifecycle:
  - privilegedStartService: every listener binds; a failure (port in use, ...)
    raises L{StartupError} naming the config key, and nothing keeps running.
  - then the bound addresses are logged and written to C{state_dir/status.json}
    (with C{--uid}: in startService, after twistd has dropped root).
  - with C{twistd --uid/--gid} (run as root to bind low ports), root never
    writes in a folder the run user can write (Postfix's discipline): when the
    daemon is built, L{claimFolders} takes state_dir (and an SMTP queue folder
    outside it): one that exists must be the run user's, and what netsvc writes
    there as root (the generated certificate, the queue folders) is written as
    that user (L{asRunUser}); one that is missing is made by root and is root's
    alone until L{handOver}, before the drop, gives it and what root made in it
    to the user (L{_chownTree}: bottom-up, by descriptor, never through a link).
    The folders of log files and a writable LDAP file are checked; what cannot
    be handed over stops the start with one line naming the folder.  A daemon
    that keeps running as root with network listeners says so (L{warnIfRoot}).
  - SIGHUP: the shared certificate (and services that support it) reload.
  - stopService: all listeners close at once, then each service's open
    connections get C{drain_timeout} to finish before they are closed.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from netsvc import endpoints
from netsvc.config import ConfigError, Listener, Problem, ServiceSettings, Settings
from netsvc.metrics import Registry, ServiceMetrics
from netsvc.policies import AccessList, Guard
from netsvc.registry import serviceModule
from netsvc.tls import CertificateError, ServerCertificate
from netsvc.tls.certificates import writeAtomically

log = Logger()


#: Stopping ends at the latest this long after the guards' drain deadline (drain_timeout + abort grace).
STOP_SLACK = 1.0


class StartupError(ConfigError):
    """The configuration is valid but cannot be put to work (port in use, bad certificate)."""


class Context:
    """
    What services share: the reactor, the settings, the metrics registry, the
    state folder, and the shared TLS certificate (made on first use).
    """

    def __init__(self, settings: Settings, reactor: Any = None, configFile: str = "",
                 registry: Registry | None = None,
                 reloadSettings: Callable[[], Settings] | None = None,
                 runAs: tuple[int, int] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.settings = settings
        self.configFile = configFile
        #: Re-reads the configuration on SIGHUP (raises ConfigError); None: nothing to re-read.
        self.reloadSettings = reloadSettings
        self.metrics = registry or Registry()
        self.stateDir = settings.stateDir
        #: Whether state_dir was there before this process (else everything in it is ours).
        self.stateDirExisted = Path(self.stateDir).exists()
        #: (uid, gid) twistd switches to after binding (--uid/--gid, started as root); None: no switch.
        self.runAs = runAs
        #: Folders root made in this run (L{claimFolders}), with their (st_dev, st_ino): only these are walked
        #: and chowned by L{handOver}; until then they are root's and nobody else can write in them.
        self.madeThisRun: dict[Path, tuple[int, int]] = {}
        #: The folders netsvc owns (state_dir, an SMTP queue outside it), once L{claimFolders} has checked them.
        self.claimed: list[Path] | None = None
        self._certificate: ServerCertificate | None = None
        self.reloaders: list[Callable[[], None]] = []
        #: The L{Daemon} being built (its status(), its services), once it exists.
        self.daemon: Any = None
        #: The C{services.ldap} directory (L{netsvc.ldap.directory.Directory}) once built; None without it.
        self.directory: Any = None

    @property
    def certificate(self) -> ServerCertificate:
        """The shared server certificate (generated under state_dir with C{cert: auto})."""
        if self._certificate is None:
            generated = self.settings.tls.cert == "auto"  # written under state_dir: as the run user
            try:
                with self.writing() if generated else contextlib.nullcontext():
                    self._certificate = ServerCertificate.fromSettings(
                        self.settings.tls, self.stateDir, resolve=self.settings.path)
            except (CertificateError, OSError) as e:
                raise StartupError([Problem(self.configFile, "tls.cert", str(e))]) from None
            self.reloaders.append(self._reloadCertificate)
        return self._certificate

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """
        Around what netsvc writes in state_dir while it is still root (before
        twistd drops root for C{--uid}): as the run user (L{asRunUser}), so that
        the kernel applies that user's permissions -- a symbolic link planted in
        a folder the user owns is then no way into root's files.  Nothing to do
        without C{--uid}, once root is dropped, and while state_dir is one root
        made in this run (root's alone until L{handOver} gives it away).
        """
        if self.runAs is None or os.geteuid() != 0:
            return contextlib.nullcontext()
        if _within(Path(self.stateDir).resolve(), list(self.madeThisRun)):
            return contextlib.nullcontext()
        return asRunUser(*self.runAs)

    def _reloadCertificate(self) -> None:
        assert self._certificate is not None
        try:
            self._certificate.reload()
        except (CertificateError, OSError) as e:
            log.error("certificate reload failed, keeping the old one: {error}", error=str(e))
        else:
            log.info("certificate reloaded; valid until {notAfter}",
                     notAfter=self._certificate.notAfter.isoformat())

    def endpoint(self, description: str, acceptableProtocols: Any = None) -> Any:
        """A server endpoint for C{description}, with the shared certificate for C{tls:PORT}."""
        kind, args, kwargs = endpoints.split(description)
        needsCert = endpoints.isSharedTLS(kind, args, kwargs)
        return endpoints.serverFromString(
            self.reactor, description, self.certificate if needsCert else None, acceptableProtocols)

    def serverService(self, name: str, settings: ServiceSettings) -> ServerService:
        """The container a listening service builds on (guard, metrics, listeners)."""
        return ServerService(name, settings, self)


class ListenerService(service.Service):
    """
    Listens on one endpoint while running.  Binding happens in
    privilegedStartService and fails loudly (L{StartupError}).
    """

    port: Any = None

    def __init__(self, context: Context, description: str, keyPath: str, target: Any,
                 acceptableProtocols: Any = None) -> None:
        self.context = context
        self.description = description
        self.keyPath = keyPath
        self.target = target  # a protocol factory, or a DatagramProtocol for udp:
        # Built now (nothing binds yet), so that a bad certificate fails before twistd starts.
        self.endpoint = context.endpoint(description, acceptableProtocols)
        self.setName(keyPath)

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        results: list[Any] = []
        self.endpoint.listen(self.target).addBoth(results.append)
        if not results:  # every endpoint we allow listens synchronously
            raise StartupError([Problem(self.context.configFile, self.keyPath,
                                        f"{self.description!r} did not listen at once")])
        if isinstance(results[0], Failure):
            raise StartupError([Problem(self.context.configFile, self.keyPath,
                                        f"cannot listen on {self.description!r}: {_reason(results[0].value)}")])
        self.port = results[0]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        service.Service.startService(self)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    @property
    def address(self) -> dict[str, Any]:
        """What was bound: type, host and port (or path), for logs and status.json."""
        host = self.port.getHost()
        out = {"key": self.keyPath, "endpoint": self.description, "type": getattr(host, "type", "?")}
        if hasattr(host, "port"):
            out.update(host=host.host, port=host.port)
        elif hasattr(host, "name"):
            out.update(path=host.name.decode() if isinstance(host.name, bytes) else host.name)
        return out


def _reason(error: BaseException) -> str:
    if isinstance(error, CannotListenError) and error.socketError is not None:
        strerror = getattr(error.socketError, "strerror", None)
        return (strerror or str(error.socketError)).lower()
    return str(error) or type(error).__name__


class ServerService(service.MultiService):
    """
    One service's listeners, its L{Guard} and metrics.  Stopping it closes the
    listeners, then drains the connections for the daemon's C{drain_timeout}.
    """

    def __init__(self, name: str, settings: ServiceSettings, context: Context) -> None:
        super().__init__()
        self.setName(name)
        self.keyPath = f"services.{name}"  # where its settings are in the file, for errors
        self.settings = settings
        self.context = context
        self.metrics = ServiceMetrics(context.metrics, name)
        self.guard = Guard(settings.limits, self.metrics, context.reactor,
                           AccessList(settings.allow, settings.deny))
        self.listeners: list[ListenerService] = []

    def listen(self, index: int, listener: Listener, target: Any, acceptableProtocols: Any = None) -> None:
        """Listen on C{listener} (entry C{index} of C{listen:}) with a factory or datagram protocol."""
        svc = ListenerService(self.context, listener.endpoint, f"{self.keyPath}.listen[{index}]",
                              target, acceptableProtocols)
        svc.setServiceParent(self)
        self.listeners.append(svc)

    def reconfigure(self, settings: ServiceSettings) -> None:
        """
        SIGHUP: new limits and access lists apply to new connections (open ones
        keep going).  Listeners cannot change without a restart: that is logged.
        Services with more to reconfigure extend this.
        """
        old = [l.endpoint for l in getattr(self.settings, "listen", [])]
        new = [l.endpoint for l in getattr(settings, "listen", [])]
        if old != new:
            log.warn("{service}: listen changed; restart netsvc for that to take effect", service=self.name)
        self.guard.reconfigure(settings.limits, AccessList(settings.allow, settings.deny))
        self.settings = settings

    def stopService(self) -> defer.Deferred:
        stopped = super().stopService()
        drained = self.guard.drain(self.context.settings.drain_timeout)
        return defer.gatherResults([stopped, drained]).addCallback(lambda _: None)


class Daemon(service.MultiService):
    """The whole process: one child per enabled service."""

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context
        self.started = time.time()
        self._oldHandler: Any = None

    @property
    def listeners(self) -> list[ListenerService]:
        return [l for svc in self for l in getattr(svc, "listeners", [])]

    def setServiceParent(self, parent: Any) -> Any:
        # twistd calls this with its Application; its log observer is a component of it.
        observer = getattr(self, "logObserver", None)
        setComponent = getattr(parent, "setComponent", None)
        if observer is not None and setComponent is not None:
            from twisted.logger import ILogObserver

            if parent.getComponent(ILogObserver, None) is None:
                setComponent(ILogObserver, observer)
        return super().setServiceParent(parent)

    #: A descriptor for the terminal's stderr when twistd daemonizes (see L{netsvc.tap}): start errors go there.
    startupErrorFD: int | None = None
    #: Whether state_dir/status.json is written (and removed at the end); C{netsvc forward} runs a daemon
    #: of its own in the foreground and must not replace (then delete) the status of one running there.
    writesStatus = True

    #: (uid, gid) twistd switches to after privilegedStartService (--uid/--gid), when it runs as root.
    runAs: tuple[int, int] | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
            if self.runAs is not None:
                handOver(self.context, *self.runAs)
        except BaseException as e:
            for l in self.listeners:  # release what did bind before the failure
                if l.port is not None:
                    l.port.stopListening()
                    l.port = None
            if isinstance(e, ConfigError) and self.startupErrorFD is not None:
                text = "".join(f"netsvc: {line}\n" for line in str(e).splitlines())
                os.write(self.startupErrorFD, text.encode("utf-8", "replace"))
            raise
        if self.startupErrorFD is not None:  # started: a daemon keeps no terminal open
            os.close(self.startupErrorFD)
            self.startupErrorFD = None
        for l in self.listeners:
            a = l.address
            where = f"{a.get('host')}:{a.get('port')}" if "port" in a else a.get("path")
            log.info("{key} listening on {type} {where} ({endpoint})", key=a["key"], type=a["type"],
                     where=where, endpoint=a["endpoint"])
        from netsvc.workers import current

        if current() is None:  # workers: the parent says it, once
            logSecurityWarnings(self.context)
        if self.writesStatus and self.runAs is None:
            self.writeStatus()

    def startService(self) -> None:
        super().startService()
        if self.writesStatus and self.runAs is not None:
            # twistd has dropped root by now (privilegedStartService, the switch, then this): the run user
            # writes it, in its own folder; root never writes a file where that user could plant a link
            with self.context.writing():
                self.writeStatus()
        warnIfRoot([l.address for l in self.listeners if l.port is not None])
        if hasattr(signal, "SIGHUP"):
            try:
                self._oldHandler = signal.signal(signal.SIGHUP, self._onSIGHUP)
            except ValueError:  # not the main thread (e.g. some test runners)
                self._oldHandler = None

    def stopService(self) -> defer.Deferred:
        if self._oldHandler is not None:
            signal.signal(signal.SIGHUP, self._oldHandler)
            self._oldHandler = None
        log.info("stopping: listeners closed, draining connections for up to {timeout}s",
                 timeout=self.context.settings.drain_timeout)
        d = self._stopChildren(float(self.context.settings.drain_timeout) + Guard.abortGrace + STOP_SLACK)
        if self.writesStatus:
            d.addBoth(self._removeStatus)
        return d

    def _stopChildren(self, deadline: float) -> defer.Deferred:
        """
        C{MultiService.stopService} with a deadline: fires when every service has
        stopped, or C{deadline} seconds from now whatever is still stopping (each
        named in the log), so that twistd's reactor stops regardless.  Guards close
        and abort their connections by then (L{Guard.drain}); what a service waits
        for beyond that (a Deferred that never fires) is not worth a daemon that
        never exits.
        """
        service.Service.stopService(self)
        pending: dict[str, defer.Deferred] = {}
        done = defer.Deferred()

        def stopped(result: Any, name: str) -> None:
            pending.pop(name, None)
            if isinstance(result, Failure):
                log.failure("stopping {service} failed", result, service=name)
            if not pending and not done.called:
                done.callback(None)

        children = list(self)
        children.reverse()
        for i, svc in enumerate(children):
            name = svc.name or f"#{i}"
            pending[name] = d = defer.maybeDeferred(svc.stopService)
        for name, d in list(pending.items()):
            d.addBoth(stopped, name)
        if not pending:
            return defer.succeed(None)
        if done.called:
            return done

        def late() -> None:
            if done.called:
                return
            log.warn("stopping: still waiting for {services} after {deadline:.1f}s; stopping regardless",
                     services=", ".join(sorted(pending)), deadline=deadline)
            done.callback(None)

        timer = self.context.reactor.callLater(deadline, late)

        def cancel(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(cancel)

    def _onSIGHUP(self, signum: int, frame: Any) -> None:
        self.context.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        SIGHUP: reload the certificate, and re-read the configuration; services
        with a C{reconfigure(settings)} method get their new settings (listeners
        and services added or removed need a restart).  A file with problems is
        logged and ignored: everything keeps running as it was.
        """
        log.info("SIGHUP: reloading")
        for reloader in self.context.reloaders:
            reloader()
        if self.context.reloadSettings is None:
            return
        try:
            settings = self.context.reloadSettings()
        except ConfigError as e:
            for line in str(e).splitlines():
                log.error("reload: {problem}; keeping the running configuration", problem=line)
            return
        for svc in self:
            reconfigure = getattr(svc, "reconfigure", None)
            if reconfigure is not None and svc.name in settings.services:
                reconfigure(settings.services[svc.name])

    #: Under state_dir; a worker process (netsvc.workers) writes workers/N.json instead.
    statusName = "status.json"

    @property
    def statusPath(self) -> Path:
        return Path(self.context.stateDir) / self.statusName

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started": self.started,
            "config": self.context.configFile,
            "services": [svc.name for svc in self],
            "listeners": [l.address for l in self.listeners],
        }

    def writeStatus(self) -> None:
        """Write status.json atomically (tests and scripts read the bound ports from it)."""
        path = self.statusPath
        path.parent.mkdir(parents=True, exist_ok=True)
        writeAtomically(path, (json.dumps(self.status(), indent=2) + "\n").encode(), fsync=False)

    def _removeStatus(self, result: Any) -> Any:
        try:
            self.statusPath.unlink()
        except OSError:
            pass
        return result


def buildDaemon(settings: Settings, reactor: Any = None, configFile: str = "",
                registry: Registry | None = None,
                reloadSettings: Callable[[], Settings] | None = None,
                runAs: tuple[int, int] | None = None) -> Daemon:
    """
    Build (not start) the daemon for C{settings}: every enabled service, and the
    C{metrics:} listener if configured.  C{reloadSettings}, if given, is called
    on SIGHUP for the new settings (see L{Daemon.reload}).  C{runAs}: the
    (uid, gid) twistd will switch to (L{runAsFromTwistd}); the folders netsvc
    owns are claimed for that user first (L{claimFolders}).

    @raise StartupError: a service cannot be built (e.g. an unreadable certificate).
    """
    context = Context(settings, reactor, configFile, registry, reloadSettings, runAs)
    daemon = Daemon(context)
    daemon.runAs = runAs
    if runAs is not None:  # before any service writes in state_dir
        claimFolders(context)
    context.daemon = daemon  # for services that report on the whole process (status pages)
    for name, svcSettings in settings.services.items():
        if not svcSettings.enabled:
            continue
        serviceModule(name).makeService(svcSettings, context).setServiceParent(daemon)
    if settings.metrics.listen:
        from netsvc.status import makeMetricsService

        makeMetricsService(settings.metrics, context).setServiceParent(daemon)
    return daemon


# -- running without root ---------------------------------------------------------------


def runAsFromTwistd(options: Any) -> tuple[int, int] | None:
    """
    The (uid, gid) twistd will switch to after binding (C{--uid}/C{--gid}; the
    user's group when only C{--uid} is given), when this process is root and is
    asked to become someone else; None otherwise.
    """
    twistd = getattr(options, "parent", None)
    if not hasattr(twistd, "get") or os.geteuid() != 0:
        return None
    uid, gid = twistd.get("uid"), twistd.get("gid")
    if uid is None and gid is None:
        return None
    if uid is None:
        uid = os.geteuid()
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = os.getegid()
    if uid == 0 and gid == 0:
        return None
    return int(uid), int(gid)


def _who(uid: int, gid: int) -> tuple[str, str, set[int]]:
    """User and group names, and every group C{uid} is in (for permission checks)."""
    try:
        entry = pwd.getpwuid(uid)
        user = entry.pw_name
        groups = set(os.getgrouplist(user, gid))
    except KeyError:
        user, groups = str(uid), set()
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return user, group, groups | {gid}


def _allows(st: os.stat_result, uid: int, groups: set[int], bits: int) -> bool:
    """Whether a user (C{uid} in C{groups}) has permission C{bits} (an octal 0o7 mask) by mode bits."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid in groups:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _reachable(path: Path, uid: int, groups: set[int]) -> bool:
    """Whether every folder above C{path} can be passed through (x) by the user."""
    for parent in list(path.parents)[::-1]:
        try:
            if not _allows(os.stat(parent), uid, groups, 0o1):
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def asRunUser(uid: int, gid: int) -> Iterator[None]:
    """
    Root acting as C{uid}:C{gid} for a while (effective ids and supplementary
    groups, as twistd's switch will set them), then root again: what is written
    meanwhile is checked by the kernel against that user's permissions, and
    belongs to it.  Nothing changes when this process is not root.
    """
    if os.geteuid() != 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups(sorted(_who(uid, gid)[2]))
    try:
        os.setegid(gid)
        try:
            os.seteuid(uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(egid)
    finally:
        os.setgroups(groups)


def openingAs(runAs: tuple[int, int] | None, path: str | Path) -> contextlib.AbstractContextManager[None]:
    """
    Around root opening (or making) C{path} before twistd drops root for
    C{runAs} -- a log file: as the run user (L{asRunUser}) when that user could
    change any folder on the way to it (owns one, or may write in one), where it
    could plant a link; as root otherwise (nobody but root could have put
    anything there).  Nothing to do without C{--uid} or once root is dropped.
    """
    if runAs is None or os.geteuid() != 0:
        return contextlib.nullcontext()
    uid, gid = runAs
    if _userCanChange(Path(path), uid, _who(uid, gid)[2]):
        return asRunUser(uid, gid)
    return contextlib.nullcontext()


def _userCanChange(path: Path, uid: int, groups: set[int]) -> bool:
    """
    Whether the user could change (or could have changed) where C{path} leads:
    a folder above it, as written or with links resolved, is the user's, or is
    writable by the user (by mode bits) -- where the folder is sticky (/tmp),
    only if the entry on the way in it is the user's or missing (the user may
    make it; it cannot rename or remove anyone else's).
    """
    written = Path(os.path.abspath(path))
    for chain in (written, written.resolve()):
        steps = [chain, *chain.parents]
        for child, folder in zip(steps, steps[1:]):
            try:
                st = os.stat(folder)
            except FileNotFoundError:
                continue  # made on the way, by whoever makes it
            except OSError:
                return True
            if st.st_uid == uid:
                return True
            if not _allows(st, uid, groups, 0o2):
                continue
            if not st.st_mode & stat.S_ISVTX:
                return True
            try:
                if os.lstat(child).st_uid == uid:
                    return True
            except OSError:
                return True  # missing: the user could make it first
    return False


#: Opening a folder to walk it: never through a symbolic link.
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: Deeper than this, a tree netsvc made is not one (nothing below is given away).
_MAX_DEPTH = 32


def _chownTree(top: Path, uid: int, gid: int, identity: tuple[int, int] | None = None) -> None:
    """
    Give C{top} and everything below it that root made to C{uid}:C{gid},
    bottom-up: the entries of each folder before the folder, C{top} last, so
    that no folder is the user's while root still works in it.  Folders are
    opened without following links (C{top} too) and entries are reached
    relative to their folder's descriptor, never by path; symbolic links,
    files with more than one link (a hard link planted to a file elsewhere) and
    anything that belongs to someone other than root or the user are left alone.

    @param identity: C{(st_dev, st_ino)} of C{top} when root made it; a C{top}
        that is another folder now (swapped) is refused (L{OSError}).
    """
    fd = os.open(top, _FOLDER)
    try:
        st = os.fstat(fd)
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise OSError(errno.ESTALE, "it was replaced while netsvc started")
        _chownBelow(fd, uid, gid, 0)
        if st.st_uid in (0, uid) and (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _chownBelow(folder: int, uid: int, gid: int, depth: int) -> None:
    """The entries of the open folder C{folder}, for L{_chownTree}."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries]
    for name in names:
        try:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or st.st_uid not in (0, uid):
            continue
        if stat.S_ISDIR(st.st_mode):
            if depth >= _MAX_DEPTH:
                continue
            try:
                sub = os.open(name, _FOLDER, dir_fd=folder)
            except OSError:  # gone, or no longer a folder
                continue
            try:
                now = os.fstat(sub)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    continue
                _chownBelow(sub, uid, gid, depth + 1)
                if (now.st_uid, now.st_gid) != (uid, gid):
                    os.fchown(sub, uid, gid)
            finally:
                os.close(sub)
        elif st.st_nlink == 1 and (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(name, uid, gid, dir_fd=folder, follow_symlinks=False)


def _places(context: Context) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]], list[tuple[str, Path]]]:
    """
    What the running daemon writes and reads again, from the settings: folders
    that are netsvc's own (chowned), folders it writes files in (checked), and
    TLS keys it reads again on SIGHUP (checked).  Each with its key path.
    """
    settings = context.settings
    services = settings.services
    own: list[tuple[str, Path]] = [("state_dir", Path(context.stateDir))]
    written: list[tuple[str, Path]] = []
    keys: list[tuple[str, Path]] = []

    def enabled(name: str) -> Any:
        svc = services.get(name)
        return svc if svc is not None and getattr(svc, "enabled", True) else None

    smtp = enabled("smtp")
    if smtp is not None and getattr(getattr(smtp, "relay", None), "mode", None) != "capture":
        own.append(("services.smtp.queue.dir", Path(context.stateDir) / smtp.queue.dir))
    if smtp is not None and getattr(smtp, "local", None) is not None:
        own.append(("services.smtp.local.maildir", Path(context.stateDir) / smtp.local.maildir))
    mailbox = enabled("mailbox")
    if mailbox is not None:
        own.append(("services.mailbox.maildir", Path(context.stateDir) / mailbox.maildir))
    ldap = enabled("ldap")
    if ldap is not None and getattr(ldap, "writable", False) and ldap.ldif:
        written.append(("services.ldap.ldif[0]", settings.path(ldap.ldif[0]).parent))
    if settings.log.file:
        written.append(("log.file", settings.path(settings.log.file).parent))
    web = enabled("web")
    if web is not None:
        accessLog = getattr(web, "access_log", None)
        if accessLog is not None and accessLog.file != "-":
            written.append(("services.web.access_log.file", settings.path(accessLog.file).parent))
        for i, files in enumerate(getattr(web, "certificates", [])):
            keys.append((f"services.web.certificates[{i}].key", settings.path(files.key or files.cert)))
    if context._certificate is not None and settings.tls.cert != "auto":
        keys.append(("tls.key", settings.path(settings.tls.key or settings.tls.cert)))
    return own, written, keys


def _within(path: Path, folders: list[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def claimFolders(context: Context) -> None:
    """
    Before anything is written in them, with C{--uid} (C{context.runAs}): the
    folders that are netsvc's own (state_dir; an SMTP queue folder or Maildirs folder outside it).
    One that is missing is made now by root, and stays root's (nobody else can
    write in it) until L{handOver} gives it and what root made in it to the run
    user; one that exists must belong to the run user, and what netsvc writes in
    it is written as that user (L{Context.writing}).  Done once.

    @raise StartupError: one line per folder that belongs to someone else, or
        that the run user cannot reach, naming it.
    """
    if context.claimed is not None:
        return
    assert context.runAs is not None
    uid, gid = context.runAs
    user, group, groups = _who(uid, gid)
    own, _, _ = _places(context)
    problems: list[Problem] = []
    claimed: list[Path] = []
    for key, configured in own:
        folder = configured.resolve()
        if _within(folder, claimed):
            continue
        try:
            made = False
            if not os.path.lexists(folder):
                # root makes it only where the user can change nothing on the way (else the user could
                # choose where root makes a folder that is then given to the user): the user makes it there
                byUser = _userCanChange(configured, uid, groups)
                try:
                    with asRunUser(uid, gid) if byUser else contextlib.nullcontext():
                        folder.mkdir(parents=True)
                    made = not byUser
                except FileExistsError:  # made meanwhile: it is not ours
                    pass
            st = os.lstat(folder)
            if made:
                context.madeThisRun[folder] = (st.st_dev, st.st_ino)
            elif st.st_uid != uid or not stat.S_ISDIR(st.st_mode):
                owner = _userName(st.st_uid)
                problems.append(Problem(context.configFile, key,
                    f"{folder} belongs to {owner}, not to {user} (--uid): netsvc running as {user} could not "
                    f"write there; run chown -R {user}:{group} {folder} (or remove it: netsvc makes it)"))
                continue
            if not _reachable(folder, uid, groups):
                problems.append(Problem(context.configFile, key,
                    f"{folder} cannot be reached by {user} (--uid): a folder above it is closed to that user"))
                continue
            claimed.append(folder)
        except OSError as e:
            problems.append(Problem(context.configFile, key, f"cannot give {folder} to {user}: {e.strerror}"))
    if problems:
        raise StartupError(problems)
    context.claimed = claimed
    _prepareStore(context, user)


def _prepareStore(context: Context, user: str) -> None:
    """
    The SMTP queue (or capture) folders in a folder of the run user's: made now,
    as that user, so that the SMTP service (built by root) finds them there and
    makes nothing in a tree the user can write.
    """
    smtp = context.settings.services.get("smtp")
    if smtp is None or not getattr(smtp, "enabled", True):
        return
    capture = getattr(getattr(smtp, "relay", None), "mode", None) == "capture"
    key = "state_dir" if capture else "services.smtp.queue.dir"
    folder = (Path(context.stateDir) / ("captured" if capture else smtp.queue.dir)).resolve()
    if _within(folder, list(context.madeThisRun)):
        return  # root's until handOver
    from netsvc.smtp.queue import Queue

    try:
        with asRunUser(*context.runAs):  # type: ignore[misc]
            Queue(folder, reactor=context.reactor)
    except OSError as e:
        raise StartupError([Problem(context.configFile, key,
                                    f"{user} (--uid) cannot make the folders of {folder}: {e.strerror}")]) from None


def handOver(context: Context, uid: int, gid: int) -> None:
    """
    Before twistd drops root for C{uid}:C{gid}: make what netsvc writes the run
    user's.  The folders netsvc owns are claimed (L{claimFolders}, normally done
    when the daemon is built); the ones root made in this run are given to the
    user with what root made in them (L{_chownTree}); one that already belonged
    to the user is left as it is (what netsvc wrote there was written as the
    user).  The folders of log files and of a writable LDAP file must be
    writable by the run user.  TLS keys read again on SIGHUP that the run user
    cannot read are warned about.

    @raise StartupError: one line per folder that cannot be handed over, naming it.
    """
    if context.runAs is None:
        context.runAs = (uid, gid)
    claimFolders(context)
    user, group, groups = _who(uid, gid)
    _, written, keys = _places(context)
    problems: list[Problem] = []
    owned = list(context.claimed or [])
    for folder, identity in list(context.madeThisRun.items()):
        try:
            _chownTree(folder, uid, gid, identity)
        except OSError as e:
            problems.append(Problem(context.configFile, "state_dir",
                                    f"cannot give {folder} to {user}: {e.strerror}"))
        else:
            del context.madeThisRun[folder]  # the user's now: later writes as the user
    for key, folder in written:
        folder = folder.resolve()
        if _within(folder, owned):
            continue
        try:
            st = os.stat(folder)
        except OSError as e:
            problems.append(Problem(context.configFile, key, f"{folder}: {e.strerror}"))
            continue
        if not _allows(st, uid, groups, 0o3) or not _reachable(folder, uid, groups):
            problems.append(Problem(context.configFile, key,
                f"the folder {folder} is not writable by {user} (--uid), who netsvc runs as: "
                f"chown {user} {folder} or choose a folder {user} may write"))
    for key, path in keys:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not (_allows(st, uid, groups, 0o4) and _reachable(path, uid, groups)):
            log.warn("{key}: {path} is not readable by {user} (--uid): the certificate works now, but a "
                     "reload (SIGHUP) will fail; make it readable by group {group}", key=key, path=str(path),
                     user=user, group=group)
    if problems:
        raise StartupError(problems)
    log.info("state handed over to {user}:{group} for running without root ({folders})", user=user,
             group=group, folders=", ".join(str(f) for f in owned))


def runnableBy(context: Context, program: str, uid: int, gid: int) -> None:
    """
    C{workers: N} with C{--uid}: the workers are started after root is
    dropped, so the run user must be able to run this Python.

    @raise StartupError: it cannot (naming the program and the user).
    """
    user, _, groups = _who(uid, gid)
    path = Path(os.path.realpath(program))
    try:
        ok = _allows(os.stat(path), uid, groups, 0o5) and _reachable(path, uid, groups)
    except OSError:
        ok = False
    if not ok:
        raise StartupError([Problem(context.configFile, "workers",
            f"the workers run as {user} (--uid), who cannot run {path} (a folder above it or the file "
            f"is closed to that user): install netsvc where {user} can read it, or use workers: 1")])


def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


_NETWORK_TYPES = {"TCP", "UDP", "SSL", "TLS"}


def warnIfRoot(addresses: list[dict[str, Any]]) -> None:
    """Once running: say so when the process is still root and listens on the network."""
    if os.name != "posix" or os.geteuid() != 0:
        return
    network = [a for a in addresses if str(a.get("type", "")).upper() in _NETWORK_TYPES]
    if network:
        log.warn("running as root with network listeners ({count}): start netsvc with --uid/--gid (or the "
                 "systemd unit etc/netsvc.service) so that a flaw in it cannot act as root",
                 count=len(network))


def logSecurityWarnings(context: Context) -> None:
    """At start: the warnings of C{netsvc check-config} (L{netsvc.checkconfig.securityWarnings}), once each."""
    from netsvc.checkconfig import securityWarnings

    try:
        warnings = securityWarnings(context.settings, context.configFile)
    except Exception as e:  # a check must never stop the daemon
        log.warn("security check could not run: {error!r}", error=e)
        return
    for w in warnings:
        log.warn("security: {key}: {reason}", key=w.path, reason=w.reason)
