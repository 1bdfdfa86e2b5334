"""
The parent of C{workers: N}: one L{Supervisor} service in place of the daemon.

  - privilegedStartService: builds the daemon once (every service and
    certificate is checked here, so a bad file fails in the parent, once), then
    binds every listener (L{netsvc.workers.sockets}).  Nothing else runs here:
    the parent serves no connection.
  - startService: starts N workers (C{python -m netsvc.workers.boot twistd -n
    netsvc ...} with the same options), each given its sockets; when all have
    said they run, writes C{state_dir/status.json} (the parent's pid, the bound
    listeners, the workers).
  - a worker that dies is restarted after a backoff (0.5 s doubling to 30 s,
    back to 0.5 s once one has run for a minute); ten deaths in a row without a
    minute of running give up (exit status 2).  A worker that fails before it
    is running (its configuration or a port) stops everything (exit status 1).
  - SIGHUP is passed to every worker (each reloads; see L{netsvc.runtime.Daemon.reload}).
  - stopService (SIGTERM, SIGINT): SIGTERM to every worker, which stops
    listening and drains for C{drain_timeout}; a worker still there 5 s after
    that is killed (exit status 3).

Exit status of C{twistd -n netsvc} with workers: as twistd's when all went
well (0, or killed by the SIGTERM/SIGINT that stopped it: 143/130 from a
shell); 1 a worker could not start; 2 workers kept dying; 3 a worker had to be
killed on shutdown (these end the process right after the reactor stops,
without twistd's last clean-up: a pid file given with --pidfile stays).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from netsvc.schema import ConfigError
from netsvc.workers import ENV_CPUS, ENV_READY, ENV_SOCKETS, ENV_WORKER, affinity
from netsvc.workers.sockets import Bound, bind

log = Logger()

EXIT_OK, EXIT_STARTUP, EXIT_CRASHLOOP, EXIT_KILLED = 0, 1, 2, 3
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER, GIVE_UP_AFTER = 0.5, 30.0, 60.0, 10
#: After drain_timeout, how long a worker may take to exit before it is killed.
EXIT_GRACE = 5.0


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, slot: Slot) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.ready = False

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if b"ready" in data and not self.ready:
            self.ready = True
            self.supervisor.workerReady(self.slot)

    def processEnded(self, reason: Any) -> None:
        self.supervisor.workerEnded(self.slot, self, reason.value)


class Slot:
    """Worker C{index}: its current process, restarts and backoff."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.proto: _WorkerProcess | None = None
        self.started = 0.0
        self.restarts = 0
        self.failures = 0  # deaths in a row without a healthy run
        self.pending: Any = None  # the delayed restart

    @property
    def pid(self) -> int | None:
        return getattr(self.process, "pid", None)


class Supervisor(service.Service):
    """
    @param daemon: the daemon built from the settings (not started here:
        its listeners tell what to bind; its services are what the workers run).
    @param workerArgs: twistd arguments for a worker (after C{twistd}).
    """

    name = "workers"

    def __init__(self, daemon: Any, count: int, workerArgs: list[str], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.daemon = daemon
        self.context = daemon.context
        self.count = count
        self.workerArgs = workerArgs
        self.reactor = reactor
        self.bound: list[Bound] = []
        self.slots = [Slot(i) for i in range(count)]
        self.pinning = getattr(self.context.settings, "cpu_affinity", "off") == "auto"
        #: Each worker's CPUs (cpu_affinity: auto, when it can be right), else None.
        self.cpus = affinity.plan(count) if self.pinning else None
        self.exitStatus = EXIT_OK
        self.stopping = False
        self.started = time.time()
        self._allReady = False
        self._oldHandler: Any = None
        self._stopped: defer.Deferred | None = None

    def setServiceParent(self, parent: Any) -> Any:
        # As netsvc.runtime.Daemon: twistd's Application carries the log observer.
        observer = getattr(self.daemon, "logObserver", None)
        if observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, observer)
        return super().setServiceParent(parent)

    # -- lifecycle

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        configFile = self.context.configFile
        errorFD = getattr(self.daemon, "startupErrorFD", None)
        try:
            steering = affinity.program(self.cpus) if self.cpus is not None else None
            for l in self.daemon.listeners:
                self.bound.append(bind(l.keyPath, l.description, l.endpoint, self.count, configFile, steering))
            if steering is not None and any(len(b.sockets) > 1 and not b.steered for b in self.bound):
                # pinned workers under the address hash would be the worst of both: nothing pinned then
                log.warn("cpu_affinity: auto not applied: connections cannot be steered by CPU here; "
                         "workers are not pinned and connections are spread by address")
                self.cpus = None
            runAs = getattr(self.daemon, "runAs", None)
            if runAs is not None:  # --uid/--gid: the workers run as that user, and write state_dir
                from netsvc.runtime import handOver, runnableBy

                handOver(self.context, *runAs)
                runnableBy(self.context, sys.executable, *runAs)
        except BaseException as e:
            for b in self.bound:
                b.close()
            self.bound = []
            if isinstance(e, ConfigError) and errorFD is not None:
                os.write(errorFD, "".join(f"netsvc: {line}\n" for line in str(e).splitlines()).encode())
            raise
        if errorFD is not None:
            os.close(errorFD)
            self.daemon.startupErrorFD = None
        if self.cpus is not None:
            log.info("workers pinned to CPUs ({cpus}); each connection and datagram goes to the worker on "
                     "the CPU it arrives on", cpus=", ".join(f"worker {i}: {','.join(map(str, c))}"
                                                            for i, c in enumerate(self.cpus)))
        elif steering is None and self.pinning:
            log.warn("cpu_affinity: auto not applied ({count} workers, {cpus} CPUs usable{linux}; it needs a "
                     "CPU count that is a multiple of the workers): workers are not pinned and connections "
                     "are spread by address", count=self.count,
                     cpus=len(affinity.availableCPUs()),
                     linux="" if sys.platform.startswith("linux") else ", not Linux")
        from netsvc.runtime import logSecurityWarnings

        logSecurityWarnings(self.context)
        for b in self.bound:
            a = b.address
            where = f"{a.get('host')}:{a.get('port')}" if "port" in a else a.get("path")
            log.info("{key} listening on {type} {where} ({endpoint}), shared by {count} workers", key=a["key"],
                     type=a["type"], where=where, endpoint=a["endpoint"], count=self.count)

    def startService(self) -> None:
        if not self.bound and self.daemon.listeners:
            self.privilegedStartService()
        service.Service.startService(self)
        try:
            self._oldHandler = signal.signal(signal.SIGHUP, self._onSIGHUP)
        except ValueError:
            self._oldHandler = None
        # twistd has no exit status of its own (a signal stop ends by re-raising the signal): after the
        # reactor has stopped, a failure status ends the process here.
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exitWithStatus)
        from netsvc.runtime import warnIfRoot

        warnIfRoot([b.address for b in self.bound])
        for slot in self.slots:
            self.spawn(slot)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        self.stopping = True
        if self._oldHandler is not None:
            signal.signal(signal.SIGHUP, self._oldHandler)
            self._oldHandler = None
        timeout = float(self.context.settings.drain_timeout) + EXIT_GRACE
        log.info("stopping {count} workers: each drains for up to {drain}s", count=self.count,
                 drain=self.context.settings.drain_timeout)
        self._stopped = defer.Deferred()
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            self._signal(slot, signal.SIGTERM)
        killer = self.reactor.callLater(timeout, self._killRemaining)
        self._checkStopped()
        d = self._stopped

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            for b in self.bound:
                b.close()
            self._removeStatus()
            return result

        return d.addBoth(done)

    # -- workers

    def spawn(self, slot: Slot) -> None:
        slot.pending = None
        env = dict(os.environ)
        sockets = {}
        childFDs: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for b in self.bound:
            fd = b.socketFor(slot.index).fileno()
            childFDs[fd] = fd
            sockets[b.key] = [fd, b.family, b.kind]
        readyFD = max(childFDs) + 1
        childFDs[readyFD] = "r"
        env[ENV_WORKER] = f"{slot.index}/{self.count}"
        env[ENV_SOCKETS] = json.dumps(sockets)
        env[ENV_READY] = str(readyFD)
        env["NETSVC_WORKER_PARENT"] = str(os.getpid())
        if self.cpus is not None:
            env[ENV_CPUS] = ",".join(map(str, self.cpus[slot.index]))
        proto = _WorkerProcess(self, slot)
        args = [sys.executable, "-m", "netsvc.workers.boot", *self.workerArgs]
        slot.proto = proto
        slot.started = time.time()
        slot.process = self.reactor.spawnProcess(proto, sys.executable, args, env=env, path=os.getcwd(),
                                                 childFDs=childFDs)
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def workerReady(self, slot: Slot) -> None:
        if not self._allReady and all(s.proto is not None and s.proto.ready for s in self.slots):
            self._allReady = True
            log.info("all {count} workers running", count=self.count)
        if self._allReady:
            self.writeStatus()

    def workerEnded(self, slot: Slot, proto: _WorkerProcess, reason: Any) -> None:
        if slot.proto is not proto:
            return
        how = _how(reason)
        slot.proto = None
        slot.process = None
        if self.stopping:
            log.info("worker {index} exited ({how})", index=slot.index, how=how)
            self._checkStopped()
            return
        if not proto.ready:
            log.critical("worker {index} failed to start ({how}); stopping netsvc", index=slot.index, how=how)
            self._giveUp(EXIT_STARTUP)
            return
        healthy = time.time() - slot.started >= HEALTHY_AFTER
        slot.failures = 0 if healthy else slot.failures + 1
        if slot.failures >= GIVE_UP_AFTER:
            log.critical("worker {index} died {n} times in a row ({how}); giving up", index=slot.index,
                         n=slot.failures, how=how)
            self._giveUp(EXIT_CRASHLOOP)
            return
        delay = 0.0 if healthy else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, slot.failures - 1))
        slot.restarts += 1
        log.error("worker {index} died ({how}); restarting it in {delay}s", index=slot.index, how=how, delay=delay)
        slot.pending = self.reactor.callLater(delay, self.spawn, slot)
        self.writeStatus()

    def _giveUp(self, status: int) -> None:
        self.exitStatus = max(self.exitStatus, status)
        if not self.stopping and self.reactor.running:
            try:
                self.reactor.stop()
            except ReactorNotRunning:  # already on its way down
                pass

    def _signal(self, slot: Slot, signum: int) -> None:
        if slot.process is not None:
            try:
                slot.process.signalProcess(signum)
            except Exception:  # already gone
                pass

    def _onSIGHUP(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: passing it to {count} workers", count=self.count)
        for slot in self.slots:
            self._signal(slot, signal.SIGHUP)

    def _checkStopped(self) -> None:
        if self._stopped is not None and not self._stopped.called and all(s.process is None for s in self.slots):
            self._stopped.callback(None)

    def _killRemaining(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                log.error("worker {index} (pid {pid}) still running after drain_timeout; killing it",
                          index=slot.index, pid=slot.pid)
                self.exitStatus = max(self.exitStatus, EXIT_KILLED)
                self._signal(slot, signal.SIGKILL)

    def _exitWithStatus(self) -> None:
        if self.exitStatus:
            log.info("exit status {status}", status=self.exitStatus)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exitStatus)

    # -- status.json

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started": self.started,
            "config": self.context.configFile,
            "services": [svc.name for svc in self.daemon],
            "listeners": [b.address for b in self.bound],
            "workers": [{"index": s.index, "pid": s.pid, "started": s.started, "restarts": s.restarts,
                         "running": s.proto is not None and s.proto.ready,
                         "cpus": self.cpus[s.index] if self.cpus is not None else None} for s in self.slots],
        }

    def writeStatus(self) -> None:
        from netsvc.tls.certificates import writeAtomically

        path = self.context.stateDir / "status.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        writeAtomically(path, (json.dumps(self.status(), indent=2) + "\n").encode(), fsync=False)

    def _removeStatus(self) -> None:
        try:
            (self.context.stateDir / "status.json").unlink()
        except OSError:
            pass


def _how(reason: Any) -> str:
    signum = getattr(reason, "signal", None)
    if signum:
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return f"exit status {getattr(reason, 'exitCode', '?')}"


def forWorkers(daemon: Any, settings: Any, options: Any) -> Any:
    """
    What twistd runs: C{daemon} itself with C{workers: 1}; in a worker, C{daemon}
    prepared to adopt its sockets; otherwise a L{Supervisor} of C{settings.workers}.
    """
    from netsvc.workers import current

    info = current()
    if info is not None:
        from netsvc.workers.worker import prepare

        prepare(daemon, info)
        return daemon
    if int(settings.workers) <= 1:
        return daemon
    return Supervisor(daemon, int(settings.workers), workerArguments(options))


def workerArguments(options: Any) -> list[str]:
    """The twistd arguments that make a worker run what the parent was asked to run."""
    args = ["-n", "--pidfile="]
    twistd = getattr(options, "parent", None)
    logfile = twistd.get("logfile") if twistd is not None and hasattr(twistd, "get") else None
    if logfile is None and twistd is not None and not twistd.get("nodaemon"):
        logfile = "twistd.log"  # where the daemonized parent logs; the workers' stdout is /dev/null
    if logfile and logfile != "-":
        args.append(f"--logfile={os.path.abspath(logfile)}")
    args.append("netsvc")
    if options["config"]:
        args += ["--config", os.path.abspath(options["config"])]
    for name in ("state-dir", "log-format", "log-level"):
        if options[name]:
            args += [f"--{name}", options[name]]
    if options.subCommand:
        args.append(options.subCommand)
        for endpoint in options.subOptions["listen"]:
            args += ["--listen", endpoint]
    return args
