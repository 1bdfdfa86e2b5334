"""Fakes for the DNS tests: scripted upstreams, a datagram transport, wire builders."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer, task
from twisted.names import dns

from netsvc.config import Limits
from netsvc.dns import wire
from netsvc.dns.cache import Cache
from netsvc.dns.local import LocalData
from netsvc.dns.resolver import DNSMetrics, Resolver
from netsvc.dns.upstream import Upstream, UpstreamError, UpstreamGroup
from netsvc.metrics import Registry, ServiceMetrics
from netsvc.policies import AccessList, Guard


def nameWire(name: str) -> bytes:
    labels = [label for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label.encode() for label in labels) + b"\x00"


def key(name: str, qtype: int = dns.A) -> tuple[bytes, int, int]:
    return (nameWire(name).lower(), qtype, dns.IN)


def query(name: str, qtype: int = dns.A, id: int = 1234, edns: int | None = None, rd: bool = True) -> bytes:
    """A query's bytes; C{edns}: the payload size to advertise (None: no OPT record)."""
    out = struct.pack("!HHHHHH", id, wire.RD if rd else 0, 1, 0, 0, 1 if edns else 0)
    out += nameWire(name) + struct.pack("!HH", qtype, dns.IN)
    if edns:
        out += b"\x00\x00\x29" + struct.pack("!H", edns) + b"\x00\x00\x00\x00\x00\x00"
    return out


def decode(data: bytes) -> dns.Message:
    m = dns.Message()
    m.fromStr(data)
    return m


def a(name: str, address: str, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


def soa(zone: str, ttl: int = 3600, minimum: int = 300) -> dns.RRHeader:
    return dns.RRHeader(zone.encode(), dns.SOA, dns.IN, ttl, dns.Record_SOA(
        b"ns." + zone.encode(), b"admin." + zone.encode(), 1, 3600, 600, 86400, minimum, ttl=ttl))


def response(qname: bytes, qtype: int, answers=(), authority=(), additional=(), rcode: int = 0,
             id: int = 0, tc: bool = False) -> bytes:
    """An upstream's answer to the question (C{qname} as wire bytes) with the given records."""
    m = dns.Message(id=id, answer=1, recAv=1, rCode=rcode, trunc=int(tc), maxSize=65535)
    m.queries = [dns.Query(_text(qname), qtype, dns.IN)]
    m.answers, m.authority, m.additional = list(answers), list(authority), list(additional)
    return m.toStr()


def _text(qname: bytes) -> bytes:
    labels, pos = [], 0
    while qname[pos]:
        labels.append(qname[pos + 1:pos + 1 + qname[pos]])
        pos += qname[pos] + 1
    return b".".join(labels)


class FakeUpstream(Upstream):
    """
    An upstream whose answers come from C{self.zone} (name -> list of RRHeaders,
    or an rcode int, or "timeout" / "hang").  Each exchange is recorded.
    """

    def __init__(self, url: str, clock: task.Clock, zone: dict | None = None, delay: float = 0.0) -> None:
        super().__init__(url, clock, clock)
        self.zone = zone if zone is not None else {}
        self.delay = delay
        self.asked: list[tuple[bytes, int]] = []
        self.hanging: list[defer.Deferred] = []

    def exchange(self, qname: bytes, qtype: int, qclass: int, timeout: float) -> defer.Deferred:
        self.asked.append((qname, qtype))
        name = _text(qname).decode("latin-1")
        what = self.zone.get(name, self.zone.get("*"))
        if what == "timeout":
            d = task.deferLater(self.clock, timeout, lambda: None)
            return d.addCallback(lambda _: (_ for _ in ()).throw(UpstreamError("timeout", "fake")))
        if what == "hang":
            d = defer.Deferred()
            self.hanging.append(d)
            return d
        if isinstance(what, int):
            data = response(qname, qtype, rcode=what, authority=[soa(name)] if what == 3 else [])
        elif what is None:
            data = response(qname, qtype, rcode=3, authority=[soa("test")])
        else:
            records = [rr for rr in what if rr.type == qtype or rr.type == dns.CNAME]
            auth = [] if records else [soa("test")]
            data = response(qname, qtype, answers=records, authority=auth)
        if self.delay:
            return task.deferLater(self.clock, self.delay, lambda: data)
        return defer.succeed(data)


def makeGuard(clock: Any, limits: Limits | None = None, allow=(), deny=()) -> Guard:
    metrics = ServiceMetrics(Registry(), "dns")
    return Guard(limits or Limits(), metrics, clock, AccessList(allow, deny))


def makeResolver(clock: task.Clock, upstreams: list[Upstream], policy: str = "sequential",
                 local: LocalData | None = None, cache: Cache | None = None, forwards=None,
                 registry: Registry | None = None, timeout: float = 2.0) -> Resolver:
    registry = registry or Registry()
    metrics = DNSMetrics(registry)
    group = UpstreamGroup(upstreams, policy, clock, timeout, 2, metrics)
    forwardGroups = {d: UpstreamGroup(u, policy, clock, timeout, 2, metrics)
                     for d, u in (forwards or {}).items()}
    return Resolver(local if local is not None else LocalData(), cache if cache is not None else Cache(clock),
                    group, forwardGroups,
                    clock, metrics)


class FakeDatagramTransport:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written.append((data, addr))
