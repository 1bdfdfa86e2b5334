"""
Upstream servers: C{udp://}, C{tcp://} and C{tls://} (DNS over TLS, RFC 7858),
health tracking, and the policies that pick among them.

    Upstream.fromURL("tls://9.9.9.9:853?name=dns.quad9.net")
    group = UpstreamGroup([...], policy="sequential", clock=reactor, reactor=reactor)
    group.query(b"\\x07example\\x03com\\x00", 1, 1) -> Deferred[(bytes, offsets)]

A query fails over to the next upstream on a timeout, a connection failure, a
malformed or mismatched answer, or SERVFAIL/REFUSED/NOTIMP/FORMERR.  An
upstream that fails C{FAILURES_BEFORE_DOWN} times in a row is skipped for a
while (longer each time, at most C{MAX_DOWN}); a smoothed round-trip time
orders the healthy ones for C{random} and C{race}.  How a query travels (a UDP
socket per query, a pipelined TCP/TLS connection) is L{netsvc.dns.transports}.
"""

from __future__ import annotations

import random
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns

from netsvc.dns import wire
from netsvc.dns.transports import (  # noqa: F401 (re-exported)
    STREAM_IDLE,
    STREAM_MAX_PENDING,
    StreamPool,
    UDPAttempt,
    UpstreamError,
    checkResponse,
)

log = Logger()

FAILURES_BEFORE_DOWN = 3
FIRST_DOWN = 5.0
MAX_DOWN = 300.0
DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853}


class AllUpstreamsFailed(Exception):
    """Every upstream tried failed; C{errors} lists why."""


def parseURL(url: str) -> dict[str, Any]:
    """
    C{udp://HOST[:PORT]}, C{tcp://...}, C{tls://HOST[:PORT][?name=SNI][&cafile=PEM]};
    an IPv6 address in brackets.  A bare address means udp.

    @raise ValueError: saying what is wrong.
    """
    if "://" not in url:
        url = "udp://" + url
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"scheme must be udp://, tcp:// or tls://, got {scheme + '://'!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError(f"the upstream host must be an IP address (no resolver to find it), "
                         f"got {host!r}") from None
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    allowed = {"name", "cafile"} if scheme == "tls" else set()
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} in {url!r}"
                         + (" (tls:// takes name= and cafile=)" if scheme == "tls" else ""))
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r} in {url!r}")
    return {"scheme": scheme, "host": host, "port": port, "name": options.get("name"),
            "cafile": options.get("cafile")}


def makeQuery(qname: bytes, qtype: int, qclass: int) -> tuple[int, bytes]:
    """A recursive query with a random ID and our EDNS payload size: (id, bytes)."""
    qid = secrets.randbits(16)
    return qid, (struct.pack("!HHHHHH", qid, wire.RD, 1, 0, 0, 1) + qname
                 + struct.pack("!HH", qtype, qclass) + wire.OPT_RECORD)


def decode(data: bytes) -> dns.Message:
    """Decode an upstream response with twisted.names (bounded: it detects compression loops)."""
    m = dns.Message()
    try:
        m.fromStr(data)
    except Exception as e:  # twisted.names raises anything from struct.error to EOFError
        raise UpstreamError("malformed", str(e)) from None
    return m


# -- one upstream ---------------------------------------------------------------------


class Upstream:
    """One server: how to reach it, and how it has been doing."""

    def __init__(self, url: str, reactor: Any, clock: Any = None, tlsCreatorFor: Any = None) -> None:
        parsed = parseURL(url)
        self.url = url
        self.scheme = parsed["scheme"]
        self.host = parsed["host"]
        self.port = parsed["port"]
        self.reactor = reactor
        self.clock = clock or reactor
        self.srtt = 0.05  # seconds; an unknown upstream is assumed fair
        self.failures = 0
        self.downUntil = 0.0
        self._tcp: StreamPool | None = None
        if self.scheme == "tls":
            from netsvc.tls import clientCreator

            name = parsed["name"] or self.host
            creator = (tlsCreatorFor or clientCreator)(name, cafile=parsed["cafile"],
                                                       acceptableProtocols=[b"dot"])
            self._stream = StreamPool(reactor, self.host, self.port, creator)
        elif self.scheme == "tcp":
            self._stream = StreamPool(reactor, self.host, self.port)

    def __repr__(self) -> str:
        return f"<Upstream {self.url}>"

    def isUp(self, now: float) -> bool:
        return now >= self.downUntil

    def succeeded(self, rtt: float) -> None:
        self.srtt = 0.7 * self.srtt + 0.3 * rtt
        self.failures = 0
        self.downUntil = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        self.srtt = min(self.srtt * 1.5 + 0.1, 10.0)
        if self.failures >= FAILURES_BEFORE_DOWN:
            self.downUntil = now + min(MAX_DOWN, FIRST_DOWN * 2 ** (self.failures - FAILURES_BEFORE_DOWN))

    def exchange(self, qname: bytes, qtype: int, qclass: int, timeout: float) -> defer.Deferred:
        """
        One query: fires with the raw response bytes (TC from UDP retried over
        TCP), or fails with L{UpstreamError}.
        """
        qid, data = makeQuery(qname, qtype, qclass)
        if self.scheme == "udp":
            d = self._udp(qid, data, qname, qtype, qclass)

            def maybeTruncated(response: bytes) -> Any:
                if struct.unpack_from("!H", response, 2)[0] & wire.TC:
                    return self._tcpPool().query(qid, data, qname, qtype, qclass)
                return response

            d.addCallback(maybeTruncated)
        else:
            d = self._stream.query(qid, data, qname, qtype, qclass)
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=_timedOut)
        return d

    def _tcpPool(self) -> StreamPool:
        if self._tcp is None:
            self._tcp = StreamPool(self.reactor, self.host, self.port)
        return self._tcp

    def _udp(self, qid: int, data: bytes, qname: bytes, qtype: int, qclass: int) -> defer.Deferred:
        try:
            attempt = UDPAttempt(self.reactor, self.host, self.port, data, qid, qname, qtype, qclass)
        except OSError as e:
            return defer.fail(UpstreamError("send", str(e)))
        return attempt.done

    def close(self) -> None:
        for pool in (getattr(self, "_stream", None), self._tcp):
            if pool is not None:
                pool.close()


def _timedOut(result: Any, timeout: float) -> Any:
    if isinstance(getattr(result, "value", None), defer.CancelledError):
        raise UpstreamError("timeout", f"no answer in {timeout:g}s")
    return result


# -- the policies ---------------------------------------------------------------------

#: Upstream rcodes that mean "ask someone else".
FAILOVER_RCODES = {wire.SERVFAIL, wire.REFUSED, wire.NOTIMP, wire.FORMERR}


class UpstreamGroup:
    """
    Upstreams queried under one policy: C{sequential} (in the configured order,
    down ones last), C{random} (healthy ones shuffled, faster ones more likely
    first), C{race} (the C{fanout} best at once, first good answer wins).
    """

    def __init__(self, upstreams: Sequence[Upstream], policy: str = "sequential", clock: Any = None,
                 timeout: float = 2.0, fanout: int = 2, metrics: Any = None,
                 rng: random.Random | None = None) -> None:
        if not upstreams:
            raise ValueError("no upstreams")
        self.upstreams = list(upstreams)
        self.policy = policy
        self.clock = clock or upstreams[0].clock
        self.timeout = timeout
        self.fanout = max(2, fanout)
        self.metrics = metrics
        self.rng = rng or random.Random()

    def order(self) -> list[Upstream]:
        """The upstreams in the order to try them now."""
        now = self.clock.seconds()
        if self.policy == "sequential" and len(self.upstreams) > 1 and all(
                now >= u.downUntil for u in self.upstreams):
            return self.upstreams
        up = [u for u in self.upstreams if u.isUp(now)]
        down = sorted((u for u in self.upstreams if not u.isUp(now)), key=lambda u: u.downUntil)
        if self.policy == "random":
            # A weighted shuffle (Efraimidis-Spirakis): every healthy upstream gets
            # queries, faster ones more (weight 1/(srtt + 50 ms)).
            up.sort(key=lambda u: self.rng.random() ** (u.srtt + 0.05), reverse=True)
        elif self.policy == "race":
            up.sort(key=lambda u: u.srtt)
        order = up + down
        if len(order) == 1:
            order = order * 2  # one upstream: one retry
        return order

    def query(self, qname: bytes, qtype: int, qclass: int) -> defer.Deferred:
        """
        Fires with C{(responseBytes, recordOffsets)} from the first upstream with a
        usable answer (structurally checked, rcode not one to fail over on), or
        fails with L{AllUpstreamsFailed}.
        """
        order = self.order()
        if self.policy == "race":
            return self._race(order[:self.fanout], order[self.fanout:], qname, qtype, qclass)
        return self._sequential(order, qname, qtype, qclass, [])

    def _attempt(self, upstream: Upstream, qname: bytes, qtype: int, qclass: int) -> defer.Deferred:
        started = time.monotonic()
        d = defer.maybeDeferred(upstream.exchange, qname, qtype, qclass, self.timeout)

        def got(data: bytes) -> tuple[bytes, Any]:
            try:
                parsed = wire.checkMessage(data)  # well-formed, no compression loops, or no answer
            except ValueError as e:
                raise UpstreamError("malformed", str(e)) from None
            rcode = data[3] & 0xF
            if rcode in FAILOVER_RCODES:
                raise UpstreamError(wire.RCODE_NAMES.get(rcode, "rcode").lower())
            rtt = time.monotonic() - started
            upstream.succeeded(rtt)
            if self.metrics is not None:
                self.metrics.upstreamAnswered(upstream.url, rtt)
            return data, parsed

        def failed(f: Any) -> Any:
            if f.check(defer.CancelledError) and not f.check(UpstreamError):
                return f  # a race we lost: not the upstream's fault
            reason = f.value.reason if f.check(UpstreamError) else type(f.value).__name__
            upstream.failed(self.clock.seconds())
            if self.metrics is not None:
                self.metrics.upstreamFailed(upstream.url, reason)
            log.debug("upstream {upstream} failed: {error}", upstream=upstream.url, error=str(f.value))
            raise UpstreamError(reason, f"{upstream.url}: {f.value}")

        return d.addCallback(got).addErrback(failed)

    def _sequential(self, order: list[Upstream], qname: bytes, qtype: int, qclass: int,
                    errors: list[str]) -> defer.Deferred:
        if not order:
            return defer.fail(AllUpstreamsFailed("; ".join(errors) or "no upstream"))
        d = self._attempt(order[0], qname, qtype, qclass)

        def next_(f: Any) -> Any:
            if f.check(defer.CancelledError):
                return f
            errors.append(str(f.value))
            return self._sequential(order[1:], qname, qtype, qclass, errors)

        return d.addErrback(next_)

    def _race(self, racers: list[Upstream], rest: list[Upstream], qname: bytes, qtype: int,
              qclass: int) -> defer.Deferred:
        result: defer.Deferred = defer.Deferred()
        attempts = [self._attempt(u, qname, qtype, qclass) for u in racers]
        errors: list[str] = []
        left = [len(attempts)]

        def won(value: Any) -> None:
            if not result.called:
                result.callback(value)
                for other in attempts:
                    if not other.called:
                        other.cancel()

        def lost(f: Any) -> None:
            left[0] -= 1
            if not f.check(defer.CancelledError) or f.check(UpstreamError):
                errors.append(str(f.value))
            if left[0] == 0 and not result.called:
                self._sequential(rest, qname, qtype, qclass, errors).chainDeferred(result)

        for a in attempts:
            a.addCallbacks(won, lost)
        return result

    def close(self) -> None:
        for u in self.upstreams:
            u.close()


def systemUpstreams(resolvConf: str = "/etc/resolv.conf") -> list[str]:
    """C{udp://} URLs of the nameservers in resolv.conf (127.0.0.1 if there are none)."""
    servers = []
    try:
        with open(resolvConf) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    host = parts[1].split("%", 1)[0]
                    servers.append(f"udp://[{host}]:53" if ":" in host else f"udp://{host}:53")
    except OSError:
        pass
    return servers or ["udp://127.0.0.1:53"]
