"""
cpu_affinity: auto -- the CPU plan, and the steering program run by the real
kernel: a datagram or connection sent from a thread on CPU c reaches the
socket of the worker pinned to c.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from twisted.internet import endpoints, reactor
from twisted.trial import unittest

from netsvc import config
from netsvc.endpoints import UDPServerEndpoint
from netsvc.workers import affinity
from netsvc.workers.sockets import bind

LINUX = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class PlanTests(unittest.TestCase):
    def test_oneWorkerPerCPU(self):
        if not LINUX:
            self.assertIsNone(affinity.plan(2, [0, 1]))
            return
        self.assertEqual(affinity.plan(2, [0, 1]), [[0], [1]])
        self.assertEqual(affinity.plan(2, [5, 3, 4, 2]), [[2, 4], [3, 5]])
        self.assertEqual(affinity.plan(3, [0, 1, 2, 3, 4, 5]), [[0, 3], [1, 4], [2, 5]])

    def test_notPinned(self):
        self.assertIsNone(affinity.plan(1, [0, 1]))
        self.assertIsNone(affinity.plan(3, [0, 1]))  # more workers than CPUs: the hash spreads them
        self.assertIsNone(affinity.plan(2, [0, 1, 2]))  # one worker would get two CPUs of connections

    def test_settingDefaultsToOff(self):
        self.assertEqual(config.parse("workers: 2\n").cpu_affinity, "off")
        self.assertEqual(config.parse("workers: 2\ncpu_affinity: auto\n").cpu_affinity, "auto")
        for off in ("off", "false", "no", '"off"'):  # YAML 1.1 reads off/no as false
            self.assertEqual(config.parse(f"workers: 2\ncpu_affinity: {off}\n").cpu_affinity, "off")
        with self.assertRaises(config.ConfigError) as e:
            config.parse("cpu_affinity: yes please\n", "f.yaml")
        self.assertIn("cpu_affinity", str(e.exception))


def fromCPU(cpu: int, action) -> None:
    """Run C{action()} in a thread pinned to C{cpu} (sched_setaffinity(0) pins the calling thread)."""
    errors = []

    def run():
        try:
            os.sched_setaffinity(0, {cpu})
            action()
        except BaseException as e:  # reported in the test's thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if errors:
        raise errors[0]


class SteeringTests(unittest.TestCase):
    """The program as the kernel runs it, on this machine's CPUs."""

    def setUp(self):
        if not LINUX:
            raise unittest.SkipTest("SO_REUSEPORT steering is Linux only")
        self.cpus = affinity.availableCPUs()
        if len(self.cpus) < 2:
            raise unittest.SkipTest("needs 2 CPUs to steer between (this process may use only one)")
        self.plan = affinity.plan(2, self.cpus)
        self.owner = {cpu: i for i, cpus in enumerate(self.plan) for cpu in cpus}

    def test_datagramsGoToTheWorkerOnTheirCPU(self):
        bound = bind("k", "udp:0:interface=127.0.0.1", UDPServerEndpoint(reactor, 0, interface="127.0.0.1"), 2,
                     steering=affinity.program(self.plan))
        self.addCleanup(bound.close)
        port = bound.sockets[0].getsockname()[1]
        for cpu in self.cpus:
            def send(cpu=cpu):
                for _ in range(5):  # a new source port each time: the hash alone would spread them
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.sendto(b"%d" % cpu, ("127.0.0.1", port))

            fromCPU(cpu, send)
            got = []
            for i, s in enumerate(bound.sockets):
                s.setblocking(False)
                try:
                    while True:
                        got.append((i, s.recv(100)))
                except BlockingIOError:
                    pass
            self.assertEqual(got, [(self.owner[cpu], b"%d" % cpu)] * 5)

    def test_connectionsGoToTheWorkerOnTheirCPU(self):
        bound = bind("k", "tcp:0:interface=127.0.0.1", endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                     2, steering=affinity.program(self.plan))
        self.addCleanup(bound.close)
        port = bound.sockets[0].getsockname()[1]
        for cpu in self.cpus:
            clients = []

            def connect(clients=clients):
                for _ in range(5):
                    c = socket.create_connection(("127.0.0.1", port), timeout=5)
                    clients.append(c)

            fromCPU(cpu, connect)
            accepted = []
            for i, s in enumerate(bound.sockets):
                s.setblocking(False)
                try:
                    while True:
                        conn, _ = s.accept()
                        conn.close()
                        accepted.append(i)
                except BlockingIOError:
                    pass
            for c in clients:
                c.close()
            self.assertEqual(accepted, [self.owner[cpu]] * 5)

    def test_withoutSteeringTheHashSpreads(self):
        self.spreadWith(None)

    def test_unknownCPUFallsBackToTheHash(self):
        self.spreadWith(affinity.program([[4094], [4095]]))  # CPUs this machine does not have

    def spreadWith(self, steering):
        bound = bind("k", "udp:0:interface=127.0.0.1", UDPServerEndpoint(reactor, 0, interface="127.0.0.1"), 2,
                     steering=steering)
        self.assertEqual(bound.steered, steering is not None)
        self.addCleanup(bound.close)
        port = bound.sockets[0].getsockname()[1]

        def send():
            for _ in range(64):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"x", ("127.0.0.1", port))

        fromCPU(self.cpus[0], send)
        counts = []
        for s in bound.sockets:
            s.setblocking(False)
            n = 0
            try:
                while True:
                    s.recv(10)
                    n += 1
            except BlockingIOError:
                pass
            counts.append(n)
        self.assertEqual(sum(counts), 64)
        self.assertTrue(all(counts), counts)  # 64 source ports hashed: both sockets get some
