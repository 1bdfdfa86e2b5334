"""
Asking netsvc's own resolver from inside the daemon (the SMTP relay's MX and
address lookups), with the same local data, cache and upstreams the DNS
service answers clients from.

    resolver = resolverFor(context)          # the dns service's, or one on /etc/resolv.conf
    rcode, records = yield query(resolver, "example.org", dns.MX)

L{resolverFor} returns the C{services.dns} resolver when that service runs in
the daemon; otherwise one resolver built from the DNS defaults (upstreams:
the nameservers of /etc/resolv.conf), made once per L{Context}.  L{query}
never fails: an unreachable upstream is SERVFAIL, as for any DNS client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.names import dns

from netsvc.dns import wire
from netsvc.dns.resolver import domainToWire


def resolverFor(context: Any) -> Any:
    """The daemon's resolver (see the module docstring)."""
    daemon = getattr(context, "daemon", None)
    if daemon is not None:
        try:
            svc = daemon.getServiceNamed("dns")
        except KeyError:
            svc = None
        if svc is not None and getattr(svc, "resolver", None) is not None:
            return svc.resolver
    own = getattr(context, "_ownResolver", None)
    if own is None:
        from netsvc.dns.resolver import DNSMetrics
        from netsvc.dns.service import Settings, buildResolver

        own = buildResolver(Settings(), context, DNSMetrics(context.metrics, "resolver"))
        context._ownResolver = own
    return own


def query(resolver: Any, name: str, qtype: int) -> defer.Deferred:
    """
    Ask C{resolver} for C{name}/C{qtype} (class IN), from local data and the
    cache when they have it.  Fires with C{(rcode, answers)}: the rcode
    (C{dns.OK}, C{dns.ENAME}, C{dns.ESERVER}...) and the answer section's
    L{dns.RRHeader}s (a CNAME chain included).  A name that cannot be put on
    the wire (an empty label, too long) is NXDOMAIN.
    """
    labels = name.rstrip(".").split(".")
    try:
        qname = domainToWire(name)
    except (UnicodeError, ValueError):
        return defer.succeed((dns.ENAME, []))
    if not name.strip(".") or "" in labels or len(qname) > 255 or any(len(label) > 63 for label in labels):
        return defer.succeed((dns.ENAME, []))
    key = (qname, qtype, dns.IN)
    now = resolver.clock.seconds()
    answer = resolver.lookup(key, now)
    d = defer.succeed(answer) if answer is not None else resolver.resolve(key)
    return d.addCallback(_decode, key, resolver)


def _decode(answer: Any, key: tuple[bytes, int, int], resolver: Any) -> tuple[int, list[dns.RRHeader]]:
    q = wire.Query(0, wire.RD)
    q.qname, q.qtype, q.qclass, q.key = key[0], key[1], key[2], key
    data = answer.render(q, resolver.clock.seconds())
    message = dns.Message()
    try:
        message.fromStr(data)
    except Exception:  # twisted.names raises anything from struct.error to EOFError
        return dns.ESERVER, []
    return message.rCode, list(message.answers)
