"""
Composition: settings -> one running daemon.

L{buildDaemon} is the public entry point (used by the twistd plugin and by
C{etc/netsvc.tac}): it makes a L{Daemon} (a MultiService) holding one child per
enabled service.  Services are built by their own C{makeService(settings,
context)}; the L{Context} gives them what they share.

Lifecycle:
  - privilegedStartService: every listener binds; a failure (port in use, ...)
    raises L{StartupError} naming the config key, and nothing keeps running.
  - then the bound addresses are logged and written to C{state_dir/status.json}.
  - SIGHUP: the shared certificate (and services that support it) reload.
  - stopService: all listeners close at once, then each service's open
    connections get C{drain_timeout} to finish before they are closed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
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

log = Logger()


class StartupError(ConfigError):
    """The configuration is valid but cannot be put to work (port in use, bad certificate)."""


class Context:
    """
    What services share: the reactor, the settings, the metrics registry, the
    state folder, and the shared TLS certificate (made on first use).
    """

    def __init__(self, settings: Settings, reactor: Any = None, configFile: str = "",
                 registry: Registry | None = None,
                 reloadSettings: Callable[[], Settings] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.settings = settings
        self.configFile = configFile
        #: Re-reads the configuration on SIGHUP (raises ConfigError); None: nothing to re-read.
        self.reloadSettings = reloadSettings
        self.metrics = registry or Registry()
        self.stateDir = settings.stateDir
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
            try:
                self._certificate = ServerCertificate.fromSettings(
                    self.settings.tls, self.stateDir, resolve=self.settings.path)
            except (CertificateError, OSError) as e:
                raise StartupError([Problem(self.configFile, "tls.cert", str(e))]) from None
            self.reloaders.append(self._reloadCertificate)
        return self._certificate

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

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
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
        if self.writesStatus:
            self.writeStatus()

    def startService(self) -> None:
        super().startService()
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
        d = defer.maybeDeferred(super().stopService)
        if self.writesStatus:
            d.addBoth(self._removeStatus)
        return d

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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.status(), indent=2) + "\n")
        os.replace(tmp, path)

    def _removeStatus(self, result: Any) -> Any:
        try:
            self.statusPath.unlink()
        except OSError:
            pass
        return result


def buildDaemon(settings: Settings, reactor: Any = None, configFile: str = "",
                registry: Registry | None = None,
                reloadSettings: Callable[[], Settings] | None = None) -> Daemon:
    """
    Build (not start) the daemon for C{settings}: every enabled service, and the
    C{metrics:} listener if configured.  C{reloadSettings}, if given, is called
    on SIGHUP for the new settings (see L{Daemon.reload}).

    @raise StartupError: a service cannot be built (e.g. an unreadable certificate).
    """
    context = Context(settings, reactor, configFile, registry, reloadSettings)
    daemon = Daemon(context)
    context.daemon = daemon  # for services that report on the whole process (status pages)
    for name, svcSettings in settings.services.items():
        if not svcSettings.enabled:
            continue
        serviceModule(name).makeService(svcSettings, context).setServiceParent(daemon)
    if settings.metrics.listen:
        from netsvc.status import makeMetricsService

        makeMetricsService(settings.metrics, context).setServiceParent(daemon)
    return daemon
