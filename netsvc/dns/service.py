"""
C{services.dns}: a caching, forwarding DNS resolver with local data.

    services:
      dns:
        listen: ["udp:5353:interface=127.0.0.1", "tcp:5353:interface=127.0.0.1",
                 "tls:8853:interface=127.0.0.1"]
        upstreams: ["udp://127.0.0.2:53", "tls://9.9.9.9:853?name=dns.quad9.net"]
        policy: sequential            # random, race
        hosts: ["/etc/hosts"]
        records:
          - {name: printer.lab, type: A, value: 10.0.0.7, ttl: 300}
          - {name: lab, type: MX, value: "10 mail.lab"}
        blocklist: blocked.txt
        forward: {corp.example: ["udp://10.0.0.53"]}
        allow: [10.0.0.0/8]           # default: loopback and the listeners' own networks (REFUSED otherwise)
        cache: {max_entries: 100000, min_ttl: 0, max_ttl: 1d, negative_ttl_max: 1h,
                servfail_ttl: 5s, stale_ttl: 1d, prefetch: true}
"""

from __future__ import annotations

from typing import Any, Literal

from twisted.application import internet
from twisted.application.service import IService
from twisted.logger import Logger

from netsvc.config import DatagramListener, Duration, Invalid, Limits, ServiceSettings, Size, field, frozen
from netsvc.dns.access import defaultAllow
from netsvc.dns.cache import Cache
from netsvc.dns.local import LocalData, makePayload, ownerName
from netsvc.dns.protocol import DNSDatagramProtocol, DNSStreamFactory
from netsvc.dns.resolver import DNSMetrics, Resolver
from netsvc.dns.upstream import Upstream, UpstreamGroup, parseURL, systemUpstreams
from netsvc.endpoints import isDatagram, split
from netsvc.policies import AccessList

log = Logger()

#: How often hosts files and the blocklist are checked for changes.
RELOAD_INTERVAL = 2.0


class UpstreamURL(str):
    """C{udp://ADDR[:PORT]}, C{tcp://...}, C{tls://ADDR[:PORT]?name=SNI[&cafile=PEM]}."""

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: object = None) -> UpstreamURL:
        if not isinstance(value, str):
            raise Invalid(f"expected an upstream URL like udp://192.0.2.53:53, got {value!r}")
        try:
            parseURL(value)
        except ValueError as e:
            raise Invalid(str(e)) from None
        return cls(value)


@frozen
class Record:
    """One static record: C{{name: printer.lab, type: A, value: 10.0.0.7, ttl: 300}}."""

    name: str = field()
    type: Literal["A", "AAAA", "CNAME", "MX", "TXT", "PTR", "SRV"] = field()
    value: str = field()
    ttl: int = field(300, min=0, max=2**31 - 1)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        try:
            ownerName(self.name, self.type)
        except ValueError as e:
            problems.append(("name", str(e)))
        try:
            makePayload(self.type, self.value, self.ttl)
        except ValueError as e:
            problems.append(("value", f"not a valid {self.type} value: {e}"))
        return problems


@frozen
class CacheSettings:
    #: Answers kept at most (least recently stored go first); 0 turns the cache off.
    max_entries: int = field(100_000, min=0, max=10_000_000)
    #: Clamps on how long positive answers are kept (and the TTLs clients see).
    min_ttl: Duration = field(Duration(0), min=0, max=86400)
    max_ttl: Duration = field(Duration(86400), min=0, max=7 * 86400)
    #: Cap on NXDOMAIN/NODATA lifetimes (otherwise the SOA minimum, RFC 2308).
    negative_ttl_max: Duration = field(Duration(3600), min=0, max=86400)
    #: How long "no upstream could answer" is remembered.
    servfail_ttl: Duration = field(Duration(5), min=0, max=300)
    #: How long past expiry an answer may still be served when every upstream fails (RFC 8767; 0: never).
    stale_ttl: Duration = field(Duration(86400), min=0, max=30 * 86400)
    #: Refresh popular answers in the last 10% of their TTL.
    prefetch: bool = field(True)

    def check(self) -> list[tuple[str, str]]:
        if self.min_ttl > self.max_ttl:
            return [("min_ttl", f"is more than max_ttl ({self.max_ttl:g}s)")]
        return []


@frozen
class Settings(ServiceSettings):
    listen: list[DatagramListener] = field(factory=lambda: [
        DatagramListener(endpoint="udp:5353:interface=127.0.0.1"),
        DatagramListener(endpoint="tcp:5353:interface=127.0.0.1")])
    #: Where questions go; empty: the nameservers of /etc/resolv.conf.
    upstreams: list[UpstreamURL] = field(factory=list)
    policy: Literal["sequential", "random", "race"] = field("sequential")
    #: How many upstreams a race asks at once.
    race_fanout: int = field(2, min=2, max=8)
    #: How long one upstream gets to answer before the next is asked.
    timeout: Duration = field(Duration(2), min=0.05, max=60)
    #: Per-domain upstreams: names under the domain go there (longest domain wins).
    forward: dict[str, list[UpstreamURL]] = field(factory=dict)
    hosts: list[str] = field(factory=list)
    hosts_ttl: int = field(60, min=0, max=86400)
    records: list[Record] = field(factory=list)
    blocklist: str | None = field(None)
    cache: CacheSettings = field(factory=CacheSettings)
    #: max_message bounds a query; rate/burst (queries per second per client IP, 0: off) answer REFUSED.
    limits: Limits = field(factory=lambda: Limits(max_message=Size(65535), idle_timeout=Duration(30)))

    def check(self) -> list[tuple[str, str]]:
        problems = ServiceSettings.check(self)
        for domain, urls in self.forward.items():
            if not urls:
                problems.append((f"forward.{domain}", "needs at least one upstream URL"))
        for i, listener in enumerate(self.listen):
            kind, args, kwargs = split(listener.endpoint)
            if kind in ("unix",):
                problems.append((f"listen[{i}]", "DNS listens on udp:, tcp: or tls: endpoints"))
        return problems


def makeUpstreamGroup(urls: list[str], settings: Settings, context: Any, metrics: DNSMetrics,
                      resolve: Any) -> UpstreamGroup:
    upstreams = []
    for url in urls:
        parsed = parseURL(url)
        if parsed["cafile"]:
            url = url.replace(f"cafile={parsed['cafile']}", f"cafile={resolve(parsed['cafile'])}")
        upstreams.append(Upstream(url, context.reactor))
    return UpstreamGroup(upstreams, settings.policy, context.reactor, float(settings.timeout),
                         settings.race_fanout, metrics)


def buildResolver(settings: Settings, context: Any, metrics: DNSMetrics) -> Resolver:
    resolve = context.settings.path if hasattr(context.settings, "path") else (lambda p: p)
    c = settings.cache
    cache = Cache(context.reactor, c.max_entries, int(c.min_ttl), int(c.max_ttl), int(c.negative_ttl_max),
                  int(c.servfail_ttl), int(c.stale_ttl), c.prefetch)
    local = LocalData([(r.name, r.type, r.value, r.ttl) for r in settings.records],
                      [str(resolve(h)) for h in settings.hosts],
                      str(resolve(settings.blocklist)) if settings.blocklist else None, settings.hosts_ttl)
    upstreams = makeUpstreamGroup(list(settings.upstreams) or systemUpstreams(), settings, context, metrics,
                                  resolve)
    forwards = {d: makeUpstreamGroup(list(urls), settings, context, metrics, resolve)
                for d, urls in settings.forward.items()}
    return Resolver(local, cache, upstreams, forwards, context.reactor, metrics)


def accessList(settings: Settings) -> AccessList:
    """
    Who is answered: C{allow}/C{deny} as written; without C{allow}, loopback and the
    listeners' own networks (L{netsvc.dns.access}), never everyone that can reach us.
    """
    if settings.allow:
        return AccessList(settings.allow, settings.deny)
    return AccessList(defaultAllow(settings.listen), settings.deny)


def makeService(settings: Settings, context: Any) -> IService:
    svc = context.serverService("dns", settings)
    svc.guard.access = accessList(settings)
    if not settings.allow:
        log.info("dns: no allow: list, answering {networks} only (REFUSED otherwise)",
                 networks=", ".join(defaultAllow(settings.listen)))
    metrics = DNSMetrics(context.metrics, "dns")
    resolver = buildResolver(settings, context, metrics)
    queryLog = getattr(getattr(context.settings, "log", None), "level", "info") == "debug"
    for i, listener in enumerate(settings.listen):
        if isDatagram(listener.endpoint):
            svc.listen(i, listener, DNSDatagramProtocol(resolver, svc.guard, metrics, queryLog))
        else:
            kind, args, _ = split(listener.endpoint)
            name = "tls" if kind in ("tls", "ssl") else "tcp"
            # RFC 7858 has no ALPN, but dig (BIND 9.18) insists on "dot" being selected.
            factory = DNSStreamFactory(resolver, svc.guard, metrics, queryLog, name)
            svc.listen(i, listener, svc.guard.wrap(factory),
                       acceptableProtocols=[b"dot"] if name == "tls" else None)
    internet.TimerService(RELOAD_INTERVAL, lambda: resolver.local.reloadIfChanged()).setServiceParent(svc)
    svc.resolver = resolver
    current = [settings]

    stop = svc.stopService

    def stopService() -> Any:
        resolver.close()
        return stop()

    svc.stopService = stopService

    baseReconfigure = svc.reconfigure  # limits and access lists (ServerService)

    def reconfigure(new: Settings) -> None:
        """SIGHUP: new limits, access lists, local data, cache and upstream settings (not listeners)."""
        baseReconfigure(new)
        svc.guard.access = accessList(new)
        try:
            fresh = buildResolver(new, context, metrics)
        except Exception as e:  # validated settings; a file may have gone
            log.error("dns reload failed, keeping the old settings: {error}", error=str(e))
            return
        old = (resolver.upstreams, dict(resolver.forwards))
        resolver.local, resolver.upstreams, resolver.forwards = fresh.local, fresh.upstreams, fresh.forwards
        if new.cache != current[0].cache:
            resolver.cache = fresh.cache
        else:
            resolver.cache.clear()  # local data may now hide or reveal names
        current[0] = new
        old[0].close()
        for g in old[1].values():
            g.close()
        log.info("dns: settings reloaded")

    svc.reconfigure = reconfigure
    return svc
