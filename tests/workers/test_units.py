"""workers: the setting, its checks, metric merging, and the supervisor's decisions (fake processes)."""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from netsvc import config
from netsvc.metrics import Registry
from netsvc.workers import supervisor
from netsvc.workers.aggregate import merge, snapshot
from netsvc.workers.settings import cpuCount
from netsvc.workers.sockets import bind


class SettingTests(unittest.TestCase):
    def test_defaultAndAuto(self):
        self.assertEqual(config.parse("", "t.yaml").workers, 1)
        self.assertEqual(config.parse("workers: auto", "t.yaml").workers, cpuCount())
        self.assertEqual(config.parse("workers: 3", "t.yaml").workers, 3)

    def test_badValues(self):
        for text, reason in [("workers: 0", "between 1 and 256"), ("workers: lots", "or auto"),
                             ("workers: true", "or auto"), ("workers: 1000", "between 1 and 256")]:
            with self.assertRaises(config.ConfigError) as e:
                config.parse(text, "t.yaml")
            self.assertIn("t.yaml: workers: ", str(e.exception))
            self.assertIn(reason, str(e.exception))

    def test_chatNeedsFanOut(self):
        with self.assertRaises(config.ConfigError) as e:
            config.parse("workers: 2\nservices: {chat: {}}", "t.yaml")
        self.assertIn("t.yaml: services.chat.fanout: required with workers: 2", str(e.exception))
        config.parse("workers: 1\nservices: {chat: {}}", "t.yaml")
        config.parse('workers: 2\nservices: {chat: {fanout: {redis: "tcp:host=127.0.0.1:port=6379"}}}', "t.yaml")

    def test_unshareableListener(self):
        with self.assertRaises(config.ConfigError) as e:
            config.parse('workers: 2\nservices: {echo: {listen: ["tls:certs:port=7"]}}', "t.yaml")
        self.assertIn("services.echo.listen[0]: 'tls:certs:port=7' cannot be shared", str(e.exception))


class MergeTests(unittest.TestCase):
    def registry(self, accepted, active, observed):
        r = Registry()
        r.counter("c_total", "C.", ["service"]).labels(service="echo").inc(accepted)
        r.gauge("g", "G.", ["service"]).labels(service="echo").set(active)
        h = r.histogram("h_seconds", "H.", [], buckets=(0.1, 1)).labels()
        for v in observed:
            h.observe(v)
        return r

    def test_sumAndPerWorker(self):
        families = merge({0: snapshot(self.registry(3, 2, [0.05])), 1: snapshot(self.registry(4, 1, [0.5, 2]))})
        r = Registry()
        r.families = lambda: families
        text = r.render()
        self.assertIn('c_total{service="echo",worker="0"} 3\n', text)
        self.assertIn('c_total{service="echo",worker="1"} 4\n', text)
        self.assertIn('c_total{service="echo",worker="all"} 7\n', text)
        self.assertIn('g{service="echo",worker="all"} 3\n', text)
        self.assertIn('h_seconds_bucket{worker="all",le="0.1"} 1\n', text)
        self.assertIn('h_seconds_bucket{worker="all",le="1"} 2\n', text)
        self.assertIn('h_seconds_count{worker="all"} 3\n', text)
        self.assertIn("# TYPE c_total counter", text)
        self.assertIn("# TYPE h_seconds histogram", text)


class BindTests(unittest.TestCase):
    def test_reusePortGroupOnOnePort(self):
        from twisted.internet import endpoints, reactor

        bound = bind("k", "tcp:0:interface=127.0.0.1",
                     endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), 3)
        self.addCleanup(bound.close)
        ports = {s.getsockname()[1] for s in bound.sockets}
        self.assertEqual(len(ports), 1)
        self.assertEqual(len(bound.sockets), 3 if hasattr(socket, "SO_REUSEPORT") else 1)

    def test_ipv6OnlyAsTheSystemSays(self):
        """A tcp6: listener on :: is dual-stack or not as with workers: 1 (Twisted leaves IPV6_V6ONLY alone)."""
        from pathlib import Path

        from twisted.internet import endpoints, reactor

        setting = Path("/proc/sys/net/ipv6/bindv6only")
        if not socket.has_ipv6 or not setting.exists():
            raise unittest.SkipTest("no IPv6 here")
        try:
            bound = bind("k", "tcp6:0", endpoints.TCP6ServerEndpoint(reactor, 0), 2)
        except config.ConfigError as e:
            raise unittest.SkipTest(f"cannot bind [::]: {e}") from None
        self.addCleanup(bound.close)
        system = int(setting.read_text())
        self.assertEqual([s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) for s in bound.sockets],
                         [system] * len(bound.sockets))

    def test_portInUseNamesTheKey(self):
        from twisted.internet import endpoints, reactor

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with self.assertRaises(config.ConfigError) as e:
            bind("services.echo.listen[0]", f"tcp:{port}:interface=127.0.0.1",
                 endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), 2, "f.yaml")
        self.assertIn("f.yaml: services.echo.listen[0]: cannot listen on", str(e.exception))
        self.assertIn("address already in use", str(e.exception))


class _FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, signum):
        self.signals.append(signum)


class _Ended(Exception):
    def __init__(self, exitCode=None, signal=None):
        self.exitCode = exitCode
        self.signal = signal


class _FakeDaemon:
    listeners: list = []

    def __init__(self, stateDir):
        class Settings:
            drain_timeout = 1.0

        class Context:
            configFile = "t.yaml"
            settings = Settings()

        Context.stateDir = stateDir
        self.context = Context()

    def __iter__(self):
        return iter([])


class _Reactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.spawned = []
        self.stopped = False

    def spawnProcess(self, proto, executable, args, env=None, path=None, childFDs=None, **kw):
        process = _FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, env, childFDs))
        return process

    def stop(self):
        self.stopped = True


class SupervisorTests(unittest.TestCase):
    def setUp(self):
        from pathlib import Path

        self.reactor = _Reactor()
        self.reactor.running = True
        self.sup = supervisor.Supervisor(_FakeDaemon(Path(self.mktemp())), 2, ["-n", "netsvc"], self.reactor)
        self.sup.startService()
        self.addCleanup(lambda: None)

    def ready(self, n):
        proto = self.reactor.spawned[n][0]
        proto.childDataReceived(9, b"ready\n")
        return proto

    def end(self, proto, **how):
        proto.processEnded(Failure(_Ended(**how)))

    def test_restartWithBackoff(self):
        self.assertEqual(self.reactor.spawned[0][1]["NETSVC_WORKER"], "0/2")
        self.assertEqual(self.reactor.spawned[1][1]["NETSVC_WORKER"], "1/2")
        first = self.ready(0)
        self.ready(1)
        self.assertTrue(self.sup.status()["workers"][0]["running"])
        self.end(first, signal=9)
        self.assertEqual(len(self.reactor.spawned), 2)  # not at once: backoff
        self.reactor.advance(supervisor.BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 3)
        again = self.ready(2)
        self.end(again, exitCode=1)
        self.reactor.advance(supervisor.BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 3)  # the second death in a row waits longer
        self.reactor.advance(supervisor.BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(self.sup.slots[0].restarts, 2)
        self.assertEqual(self.sup.exitStatus, 0)

    def test_crashLoopGivesUp(self):
        self.ready(0)
        self.ready(1)
        for _ in range(supervisor.GIVE_UP_AFTER):
            proto = self.reactor.spawned[-1][0] if self.reactor.spawned[-1][0].slot.index == 0 else \
                self.reactor.spawned[0][0]
            proto.ready = True
            self.end(proto, signal=11)
            self.reactor.advance(supervisor.BACKOFF_MAX)
        self.assertEqual(self.sup.exitStatus, supervisor.EXIT_CRASHLOOP)
        self.assertTrue(self.reactor.stopped)

    def test_startupFailureStopsAll(self):
        self.ready(1)
        self.end(self.reactor.spawned[0][0], exitCode=1)
        self.assertEqual(self.sup.exitStatus, supervisor.EXIT_STARTUP)
        self.assertTrue(self.reactor.stopped)

    def test_sighupPassedOn(self):
        self.ready(0)
        self.ready(1)
        self.sup.reload()
        import signal

        self.assertEqual([s.process.signals for s in self.sup.slots], [[signal.SIGHUP], [signal.SIGHUP]])

    def test_stopDrainsThenKills(self):
        import signal

        self.ready(0)
        self.ready(1)
        procs = [s.process for s in self.sup.slots]
        d = self.sup.stopService()
        self.assertEqual([p.signals for p in procs], [[signal.SIGTERM], [signal.SIGTERM]])
        self.end(self.reactor.spawned[0][0], signal=15)
        self.assertNoResult(d)
        self.reactor.advance(1.0 + supervisor.EXIT_GRACE)
        self.assertEqual(procs[1].signals[-1], signal.SIGKILL)
        self.assertEqual(self.sup.exitStatus, supervisor.EXIT_KILLED)
        self.end(self.reactor.spawned[1][0], signal=9)
        self.successResultOf(d)


class AffinityTests(unittest.TestCase):
    """cpu_affinity in the supervisor: each worker's CPUs in its environment and status, or a warning."""

    def start(self, count, affinity):
        from pathlib import Path

        from twisted.logger import globalLogPublisher

        daemon = _FakeDaemon(Path(self.mktemp()))
        daemon.context.settings.cpu_affinity = affinity
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = _Reactor()
        reactor.running = True
        sup = supervisor.Supervisor(daemon, count, ["-n", "netsvc"], reactor)
        sup.privilegedStartService()  # as twistd does, before startService
        sup.startService()
        return sup, reactor, [e.get("log_format", "") for e in events]

    def test_pinnedWhenItCanBe(self):
        import os

        if len(os.sched_getaffinity(0)) < 2:
            raise unittest.SkipTest("needs 2 CPUs this process may use")
        sup, reactor, logged = self.start(2, "auto")
        cpus = [env.get("NETSVC_WORKER_CPUS") for _, env, _ in reactor.spawned]
        self.assertTrue(all(cpus), cpus)
        self.assertEqual([w["cpus"] for w in sup.status()["workers"]], [list(map(int, c.split(","))) for c in cpus])
        self.assertTrue(any("workers pinned to CPUs" in f for f in logged))

    def test_warnsWhenItCannotApply(self):
        import os

        sup, reactor, logged = self.start(len(os.sched_getaffinity(0)) + 1, "auto")
        self.assertEqual([env.get("NETSVC_WORKER_CPUS") for _, env, _ in reactor.spawned], [None] * sup.count)
        self.assertTrue(any("cpu_affinity: auto not applied" in f for f in logged), logged)

    def test_notPinnedWhenSteeringFails(self):
        import errno
        import os

        from twisted.internet import endpoints
        from twisted.internet import reactor as real

        from netsvc.workers import affinity

        if len(os.sched_getaffinity(0)) < 2:
            raise unittest.SkipTest("needs 2 CPUs this process may use")

        def refused(sock, code):
            raise OSError(errno.EPERM, "Operation not permitted")

        self.patch(affinity, "attach", refused)

        class Listener:
            keyPath = "services.echo.listen[0]"
            description = "tcp:0:interface=127.0.0.1"
            endpoint = endpoints.TCP4ServerEndpoint(real, 0, interface="127.0.0.1")

        self.patch(_FakeDaemon, "listeners", [Listener()])
        sup, reactor, logged = self.start(2, "auto")
        self.addCleanup(lambda: [b.close() for b in sup.bound])
        self.assertEqual([b.steered for b in sup.bound], [False])
        self.assertEqual([env.get("NETSVC_WORKER_CPUS") for _, env, _ in reactor.spawned], [None, None])
        self.assertTrue(any("cannot be steered by CPU here" in f for f in logged), logged)
        self.assertFalse(any("workers pinned" in f for f in logged))

    def test_offPinsNothing(self):
        sup, reactor, logged = self.start(2, "off")
        self.assertEqual([env.get("NETSVC_WORKER_CPUS") for _, env, _ in reactor.spawned], [None, None])
        self.assertFalse(any("cpu_affinity" in f or "pinned" in f for f in logged))
