"""
Local data, answered authoritatively (AA): static records from the
configuration, hosts files (re-read when they change, with automatic PTR
records), and a blocklist answered with NXDOMAIN.

Only names that have local data are answered here; any other name goes on to
the cache and the upstreams.  A name under a blocked domain is blocked too.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.names import dns

from netsvc.dns import wire

log = Logger()

#: LocalData generations, unique in the process (see LocalData.generation).
_generations = itertools.count(1)

TYPES = {"A": dns.A, "AAAA": dns.AAAA, "CNAME": dns.CNAME, "MX": dns.MX, "TXT": dns.TXT,
         "PTR": dns.PTR, "SRV": dns.SRV}
#: How long clients may cache a local negative answer (NODATA, blocked names).
NEGATIVE_TTL = 60
#: Bound on memoized answers (local answers and "not local" verdicts), cleared when full.
MEMO_MAX = 65536
#: CNAME chains followed inside local data.
MAX_CHAIN = 8


def normalName(name: str) -> str:
    """Lowercase, no trailing dot."""
    return name.strip().rstrip(".").lower()


def reverseName(address: str) -> str:
    """C{10.0.0.7} -> C{7.0.0.10.in-addr.arpa} (and ip6.arpa for IPv6)."""
    return ipaddress.ip_address(address).reverse_pointer


def makePayload(rtype: str, value: str, ttl: int) -> Any:
    """
    The twisted.names record for a configured value (C{"10 mail.lab"} for MX,
    C{"0 5 5060 sip.lab"} for SRV).

    @raise ValueError: saying what is wrong with C{value}.
    """
    value = str(value).strip()
    if rtype == "A":
        ipaddress.IPv4Address(value)
        return dns.Record_A(value, ttl)
    if rtype == "AAAA":
        if ipaddress.IPv6Address(value).scope_id is not None:
            raise ValueError(f"an AAAA record holds no zone index (%...): {value!r}")
        return dns.Record_AAAA(value, ttl)
    if rtype in ("CNAME", "PTR"):
        _checkName(value)
        return (dns.Record_CNAME if rtype == "CNAME" else dns.Record_PTR)(normalName(value).encode(), ttl)
    if rtype == "MX":
        parts = value.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) > 65535:
            raise ValueError(f"MX value must be 'PREFERENCE EXCHANGE' like '10 mail.lab', got {value!r}")
        _checkName(parts[1])
        return dns.Record_MX(int(parts[0]), normalName(parts[1]).encode(), ttl)
    if rtype == "SRV":
        parts = value.split()
        if len(parts) != 4 or not all(p.isdigit() and int(p) <= 65535 for p in parts[:3]):
            raise ValueError("SRV value must be 'PRIORITY WEIGHT PORT TARGET' like '0 5 5060 sip.lab', "
                             f"got {value!r}")
        _checkName(parts[3])
        return dns.Record_SRV(int(parts[0]), int(parts[1]), int(parts[2]), normalName(parts[3]).encode(), ttl)
    if rtype == "TXT":
        data = value.encode("utf-8")
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        return dns.Record_TXT(*chunks, ttl=ttl)
    raise ValueError(f"unsupported type {rtype!r}")


def _checkName(name: str) -> None:
    n = normalName(name)
    if not n:
        raise ValueError("empty name")
    if not n.isascii():
        # Queries carry names as bytes, internationalised ones in their ASCII form: this one would never match.
        raise ValueError(f"not a valid domain name: {name!r} (write an internationalised name in its ASCII form, "
                         "xn--...)")
    if len(n) > 253 or any(not 0 < len(label) <= 63 for label in n.split(".")):
        raise ValueError(f"not a valid domain name: {name!r}")


def ownerName(name: str, rtype: str) -> str:
    """The owner of a configured record: a PTR record's name may be an address."""
    if rtype == "PTR":
        try:
            return reverseName(name)
        except ValueError:
            pass
    _checkName(name)
    return normalName(name)


def parseHosts(text: str) -> list[tuple[str, list[str]]]:
    """(address, names) per line of a hosts file; bad lines are skipped."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].split()
        if len(line) < 2:
            continue
        address = line[0].split("%", 1)[0]
        try:
            ipaddress.ip_address(address)
        except ValueError:
            continue
        out.append((address, line[1:]))
    return out


def parseBlocklist(text: str) -> set[str]:
    """Domains, one a line; hosts-file style lines (C{0.0.0.0 ads.example}) and C{#} comments too."""
    out = set()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name = words[1] if len(words) >= 2 and _isAddress(words[0]) else words[0]
        name = normalName(name)
        if name and name not in ("localhost",):
            out.add(name)
    return out


def _isAddress(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def wireToText(qname: bytes) -> str | None:
    """
    Wire-format (uncompressed, lowercased) name -> C{a.b.c} (no trailing dot);
    None for a name with a dot inside a label, which no local name can be.
    """
    labels = []
    pos = 0
    while qname[pos]:
        n = qname[pos]
        label = qname[pos + 1:pos + 1 + n]
        if b"." in label:
            return None
        labels.append(label.decode("latin-1"))
        pos += n + 1
    return ".".join(labels)


class _Watched:
    """A file and the (mtime, size, inode) it had when last read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: tuple | None = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
            stamp: tuple | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        return True

    def read(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError as e:
            log.warn("cannot read {path}: {error}", path=self.path, error=e.strerror)
            return ""


class LocalData:
    """
    @param records: C{(name, type, value, ttl)} tuples (already validated).
    @param hostsFiles: paths of hosts files.
    @param blocklist: path of a blocklist file, or None.
    """

    def __init__(self, records: Sequence[tuple[str, str, str, int]] = (), hostsFiles: Iterable[str] = (),
                 blocklist: str | None = None, hostsTTL: int = 60) -> None:
        self.records = list(records)
        self.hosts = [_Watched(p) for p in hostsFiles]
        self.blocklistFile = _Watched(blocklist) if blocklist else None
        self.hostsTTL = hostsTTL
        self.names: dict[str, list[dns.RRHeader]] = {}
        self.blocked: set[str] = set()
        self.memo: dict[Any, wire.Stored | None] = {}
        #: Changes (to a number no LocalData had before) whenever the data is rebuilt.
        self.generation = 0
        self.reloadIfChanged(force=True)

    @property
    def empty(self) -> bool:
        return not self.names and not self.blocked

    def reloadIfChanged(self, force: bool = False) -> bool:
        """Re-read hosts files and the blocklist if any changed; True if data was rebuilt."""
        changed = [w.changed() for w in self.hosts]
        blockChanged = self.blocklistFile.changed() if self.blocklistFile else False
        if not (force or any(changed) or blockChanged):
            return False
        self._build()
        return True

    def _build(self) -> None:
        names: dict[str, list[dns.RRHeader]] = {}
        explicitPTR: set[str] = set()

        def add(owner: str, payload: Any) -> None:
            rr = dns.RRHeader(owner.encode(), payload.TYPE, dns.IN, payload.ttl, payload, auth=True)
            names.setdefault(owner, []).append(rr)

        autoPTR: list[tuple[str, str, int]] = []
        seenAddresses: set[tuple[str, str]] = set()
        for name, rtype, value, ttl in self.records:
            owner = ownerName(name, rtype)
            add(owner, makePayload(rtype, value, ttl))
            if rtype == "PTR":
                explicitPTR.add(owner)
            elif rtype in ("A", "AAAA"):
                # as makePayload reads it: around spaces (a value "10.1.1.2 " raised ValueError here at
                # start and at every reload -- found by fuzzing dns_local_data)
                autoPTR.append((str(value).strip(), owner, ttl))
        for watched in self.hosts:
            for address, hostNames in parseHosts(watched.read()):
                kind = "AAAA" if ":" in address else "A"
                for i, hostName in enumerate(hostNames):
                    try:
                        _checkName(hostName)
                    except ValueError:
                        continue
                    owner = normalName(hostName)
                    if (owner, address) in seenAddresses:
                        continue
                    seenAddresses.add((owner, address))
                    add(owner, makePayload(kind, address, self.hostsTTL))
                    if i == 0:
                        autoPTR.append((address, owner, self.hostsTTL))
        for address, owner, ttl in autoPTR:
            rev = reverseName(address)
            if rev in explicitPTR or any(rr.type == dns.PTR for rr in names.get(rev, [])):
                continue  # the first name of an address wins
            add(rev, dns.Record_PTR(owner.encode(), ttl))
        self.names = names
        self.blocked = parseBlocklist(self.blocklistFile.read()) if self.blocklistFile else set()
        self.memo = {}
        self.generation = next(_generations)
        log.info("dns local data: {names} names, {blocked} blocked domains",
                 names=len(names), blocked=len(self.blocked))

    # -- answering

    def lookup(self, key: tuple[bytes, int, int], now: float) -> wire.Stored | None:
        """The local answer for C{key} (name wire bytes lowercased, qtype, qclass), or None."""
        memo = self.memo
        if key in memo:
            return memo[key]
        if self.empty:
            return None
        answer = self._answer(key, now)
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = answer
        return answer

    def isBlocked(self, name: str) -> bool:
        if not self.blocked:
            return False
        labels = name.split(".")
        return any(".".join(labels[i:]) in self.blocked for i in range(len(labels)))

    def _answer(self, key: tuple[bytes, int, int], now: float) -> wire.Stored | None:
        qname, qtype, qclass = key
        name = wireToText(qname)
        if qclass != dns.IN or name is None:
            return None
        if self.isBlocked(name):
            return self._negative(qname, qtype, name, dns.ENAME)
        records = self.names.get(name)
        if records is None:
            return None
        answers: list[dns.RRHeader] = []
        seen = set()
        current = name
        for _ in range(MAX_CHAIN):
            seen.add(current)
            rrs = self.names.get(current, [])
            matching = [rr for rr in rrs if qtype in (rr.type, dns.ALL_RECORDS)]
            if matching:
                answers.extend(matching)
                break
            cnames = [rr for rr in rrs if rr.type == dns.CNAME]
            if not cnames:
                break
            answers.append(cnames[0])
            current = normalName(cnames[0].payload.name.name.decode())
            if current in seen or current not in self.names:
                break
        if not answers:
            return self._negative(qname, qtype, name, dns.OK)
        additional = self._additional(answers)
        return self._stored(qname, qtype, dns.OK, answers, [], additional)

    def _additional(self, answers: list[dns.RRHeader]) -> list[dns.RRHeader]:
        """Addresses of local MX exchanges and SRV targets."""
        out = []
        for rr in answers:
            target = None
            if rr.type in (dns.MX, dns.SRV):
                name = rr.payload.name if rr.type == dns.MX else rr.payload.target
                target = normalName(name.name.decode())
            if target:
                out.extend(r for r in self.names.get(target, []) if r.type in (dns.A, dns.AAAA))
        return out

    def _negative(self, qname: bytes, qtype: int, name: str, rcode: int) -> wire.Stored:
        soa = dns.RRHeader(name.encode(), dns.SOA, dns.IN, NEGATIVE_TTL, dns.Record_SOA(
            mname=b"localhost", rname=b"hostmaster.localhost", serial=1, refresh=3600, retry=600,
            expire=86400, minimum=NEGATIVE_TTL, ttl=NEGATIVE_TTL), auth=True)
        return self._stored(qname, qtype, rcode, [], [soa], [])

    def _stored(self, qname: bytes, qtype: int, rcode: int, answers: list, authority: list,
                additional: list) -> wire.Stored:
        m = dns.Message(rCode=rcode, auth=1, answer=1, maxSize=65535)
        m.queries = [dns.Query((wireToText(qname) or "").encode(), qtype, dns.IN)]
        m.answers, m.authority, m.additional = answers, authority, additional
        return wire.store(m.toStr(), 0.0, lambda rtype, ttl, section: ttl, aa=True, static=True)
