"""
Where mail for a domain goes: the smarthost, or the domain's MX hosts.

    router = MXRouter(lookup, port=25, hostname="mail.lab")
    targets = yield router.route("example.org")   # [Target(host, address, port)], in order to try

L{MXRouter} asks netsvc's resolver (L{netsvc.dns.lookup}): MX records, lowest
preference first, equal preferences shuffled; no MX at all means the domain's
own A/AAAA (RFC 5321 5.1); an address literal (C{[192.0.2.1]}) is used as is.
Each MX host's A (then AAAA) records give the targets, at most
C{maxAddresses} in all.  If our own name is among the MX hosts, it and every
host of equal or higher preference are dropped (RFC 5321 5.1).

Failures are L{RoutingError}s: permanent (the domain does not exist, a null MX
"." (RFC 7505), no MX and no address, the MX list leads back to us) or
temporary (a DNS failure, MX hosts without addresses).

L{SmarthostRouter} sends everything to one C{tcp:}/C{tls:} endpoint string.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.names import dns

#: Addresses tried for one domain in one attempt, at most (as Postfix's smtp_mx_address_limit).
MAX_ADDRESSES = 5


class RoutingError(Exception):
    """No route now: C{status} (RFC 3463) and C{permanent} (bounce) or not (retry)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


class Target:
    """
    One server to try: C{host} (the name certificates are checked against),
    C{address} (an IP address, or None: connect by C{host}), C{port}, C{tls}
    (implicit TLS), C{endpoint} (a smarthost's endpoint string, else None).
    """

    __slots__ = ("host", "address", "port", "tls", "endpoint")

    def __init__(self, host: str, address: str | None, port: int, tls: bool = False,
                 endpoint: str | None = None) -> None:
        self.host = host
        self.address = address
        self.port = port
        self.tls = tls
        self.endpoint = endpoint

    def __str__(self) -> str:
        if self.address and self.address != self.host:
            return f"{self.host}[{self.address}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Target({self})"


class SmarthostRouter:
    """Every domain to one endpoint (C{tcp:host=H:port=P} or C{tls:...} for implicit TLS)."""

    def __init__(self, description: str) -> None:
        from netsvc.endpoints import parseClient

        self.spec = parseClient(description)
        self.target = Target(self.spec.sni or self.spec.host, None, self.spec.port,
                             tls=self.spec.kind == "tls", endpoint=description)

    def route(self, domain: str) -> defer.Deferred:
        return defer.succeed([self.target])


def _name(value: Any) -> str:
    raw = value.name if hasattr(value, "name") else value
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    return text.rstrip(".").lower()


class MXRouter:
    """
    @param lookup: C{(name, qtype) -> Deferred[(rcode, [RRHeader])]}, e.g.
        C{lambda n, t: netsvc.dns.lookup.query(resolver, n, t)}.
    """

    def __init__(self, lookup: Callable[[str, int], defer.Deferred], port: int = 25, hostname: str = "",
                 maxAddresses: int = MAX_ADDRESSES, rng: random.Random | None = None) -> None:
        self.lookup = lookup
        self.port = port
        self.hostname = hostname.rstrip(".").lower()
        self.maxAddresses = maxAddresses
        self.rng = rng or random.Random()

    @defer.inlineCallbacks
    def route(self, domain: str) -> Any:
        domain = domain.rstrip(".").lower()
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            if isIPAddress(literal) or isIPv6Address(literal):
                return [Target(literal, literal, self.port)]
            raise RoutingError("5.1.2", f"bad address literal {domain}")
        rcode, records = yield self.lookup(domain, dns.MX)
        if rcode == dns.ENAME:
            raise RoutingError("5.1.2", f"domain {domain} not found (NXDOMAIN)")
        if rcode != dns.OK:
            raise RoutingError("4.4.3", f"MX lookup for {domain} failed (rcode {rcode})")
        mxs = [(rr.payload.preference, _name(rr.payload.name)) for rr in records if rr.type == dns.MX]
        if any(name in ("", ".") for _, name in mxs):
            if len(mxs) == 1:
                raise RoutingError("5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
            mxs = [(p, n) for p, n in mxs if n not in ("", ".")]
        implicit = not mxs
        if implicit:
            hosts = [domain]
        else:
            self.rng.shuffle(mxs)
            mxs.sort(key=lambda m: m[0])  # stable: equal preferences stay shuffled
            ours = [p for p, n in mxs if n == self.hostname]
            if ours:
                mxs = [(p, n) for p, n in mxs if p < min(ours)]
                if not mxs:
                    raise RoutingError("5.4.6", f"mail for {domain} loops back to myself ({self.hostname})")
            hosts = []
            for _, name in mxs:
                if name not in hosts:
                    hosts.append(name)
        targets: list[Target] = []
        failures = 0
        for host in hosts:
            if len(targets) >= self.maxAddresses:
                break
            results = yield defer.gatherResults([self.lookup(host, dns.A), self.lookup(host, dns.AAAA)])
            addresses = []
            for rcode, records in results:
                if rcode not in (dns.OK, dns.ENAME):
                    failures += 1
                for rr in records:
                    if rr.type == dns.A:
                        addresses.append(rr.payload.dottedQuad())
                    elif rr.type == dns.AAAA:
                        addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
            for address in addresses:
                if len(targets) < self.maxAddresses:
                    targets.append(Target(host, address, self.port))
        if not targets:
            if failures:
                raise RoutingError("4.4.3", f"address lookup for the mail hosts of {domain} failed")
            if implicit:
                raise RoutingError("5.4.4", f"{domain} has no MX and no address records")
            raise RoutingError("4.4.4", f"the MX hosts of {domain} ({', '.join(hosts)}) have no addresses")
        return targets
