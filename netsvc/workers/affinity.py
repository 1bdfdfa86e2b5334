"""
C{cpu_affinity: auto}: each worker on its own CPUs, and each connection handed to
the worker on the CPU it arrived on.

Without it (C{cpu_affinity: off}), the kernel picks a worker's socket by a hash
of the client's address and the scheduler runs any worker anywhere: a connection
set up by the network stack on one CPU is often served by a worker on the other,
and every wake-up crosses CPUs.  On a 2-core machine that cost a new forwarded
connection 1.1x to 1.3x the CPU of one worker (bench/scale.py), while two
separate single-process daemons, each with its own clients, cost about the same as one.

With it, worker I is pinned to the CPUs C{c} with C{position(c) % N == I} (one CPU
each when N equals the CPU count), and a classic BPF program on each SO_REUSEPORT
group (C{SO_ATTACH_REUSEPORT_CBPF}) returns, for each incoming connection or
datagram, the index of the worker pinned to the CPU that is processing it -- the
CPU the NIC's queue interrupts (RSS) or RPS hands it to, or on loopback the sender's.  Nothing
crosses CPUs, as with nginx's C{worker_cpu_affinity auto} plus C{SO_INCOMING_CPU}
steering.  A CPU the program does not know (the affinity mask changed) falls back
to the hash (an index past the group's sockets means "hash" to the kernel).

Only when it can be right: Linux, N > 1 workers, and a CPU count (of the CPUs
this process may use) that is a multiple of N.  Otherwise nothing is pinned and
the hash spreads the load.  The workers are pinned by L{netsvc.workers.boot}
(from C{NETSVC_WORKER_CPUS}), before any thread starts.

Not the default: it is only as balanced as the CPUs the traffic arrives on.  A
NIC with several queues (RSS) spreads flows over CPUs, and local clients on
several CPUs spread themselves; but a single-queue NIC interrupts one CPU, and
every connection would go to one worker.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys

#: setsockopt option (Linux, include/uapi/asm-generic/socket.h).
SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF (include/uapi/linux/filter.h, bpf_common.h).
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_SKF_AD_CPU = (-0x1000 + 36) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_CPU: "the current CPU"
_INSN = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k
_MAX_INSNS = 4096  # BPF_MAXINSNS


def availableCPUs() -> list[int]:
    """The CPUs this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def plan(count: int, cpus: list[int] | None = None) -> list[list[int]] | None:
    """
    The CPUs of each of C{count} workers (worker I: the CPUs at positions I, I+N,
    ...), or None when workers are not to be pinned: one worker, a CPU count that
    is not a multiple of the workers (more workers than CPUs included), or not Linux.
    """
    cpus = availableCPUs() if cpus is None else sorted(cpus)
    if not sys.platform.startswith("linux") or getattr(socket, "SO_REUSEPORT", None) is None:
        return None
    if count < 2 or len(cpus) % count or 2 * len(cpus) + 2 > _MAX_INSNS:
        return None  # (with 3 CPUs and 2 workers one worker would get two CPUs' connections, and use one)
    return [cpus[i::count] for i in range(count)]


def program(cpusByWorker: list[list[int]]) -> bytes:
    """
    The steering program for a group whose socket I belongs to worker I: load
    the current CPU; for each known CPU, if equal, return its worker's index;
    otherwise return 0xFFFFFFFF (past any socket the group could have: the kernel
    falls back to its hash).
    """
    insns = [(_LD_W_ABS, 0, 0, _SKF_AD_CPU)]
    for index, cpus in enumerate(cpusByWorker):
        for cpu in cpus:
            insns.append((_JEQ_K, 0, 1, cpu))  # equal: the next instruction; else skip it
            insns.append((_RET_K, 0, 0, index))
    insns.append((_RET_K, 0, 0, 0xFFFFFFFF))
    return b"".join(_INSN.pack(*i) for i in insns)


def attach(sock: socket.socket, code: bytes) -> None:
    """Set C{code} (from L{program}) as the steering program of C{sock}'s SO_REUSEPORT group."""
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // _INSN.size, ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)

