"""
C{netsvc dns query NAME [TYPE] [@SERVER[:PORT]] [--tcp | --tls] [-x ADDRESS]}

Asks one server one question and prints the answer the way dig does: header,
question, answer, authority and additional sections with TTLs, the rcode, the
query time.  Over UDP a truncated (TC) answer is asked again over TCP.  The
server defaults to the first nameserver of /etc/resolv.conf; a server given by
name (@localhost) is resolved and each of its addresses tried in turn, as dig
does.

Exit status: 0 for an answer (NOERROR, even with no records); 1 for an error
rcode (NXDOMAIN, SERVFAIL, REFUSED...) or when no answer came (timeout,
connection refused, TLS); 2 for bad usage -- the table of every netsvc command.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import struct
import sys
import time
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.internet import defer, endpoints, error
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.basic import Int16StringReceiver

from netsvc import clients
from netsvc.dns import wire
from netsvc.dns.upstream import parseURL, systemUpstreams

#: The table every netsvc client uses (netsvc.clients): no reply is a failure like an error rcode.
EXIT_ANSWER, EXIT_RCODE, EXIT_USAGE, EXIT_NO_REPLY = clients.EXIT_OK, clients.EXIT_FAILURE, clients.EXIT_USAGE, \
    clients.EXIT_FAILURE


def encodeName(name: str) -> bytes:
    """C{www.example.com} -> wire bytes (IDNA for non-ASCII names)."""
    name = name.rstrip(".")
    if not name:
        return b"\x00"
    out = b""
    for label in name.split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if not 0 < len(raw) <= 63:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    if len(out) + 1 > 255:
        raise ValueError(f"name too long: {name!r}")
    return out + b"\x00"


def buildQuery(name: str, qtype: int, recurse: bool = True, edns: bool = True) -> tuple[int, bytes]:
    qid = secrets.randbits(16)
    flags = wire.RD if recurse else 0
    return qid, (struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0) + encodeName(name)
                 + struct.pack("!HH", qtype, 1) + (wire.OPT_RECORD if edns else b""))


class _UDPQuery(DatagramProtocol):
    def __init__(self, reactor: Any, data: bytes, qid: int, timeout: float, tries: int) -> None:
        self.reactor = reactor
        self.data = data
        self.qid = qid
        self.timeout = timeout
        self.tries = tries
        self.done: defer.Deferred = defer.Deferred()
        self.timer: Any = None

    def start(self) -> None:
        self._send(self.tries)

    def _send(self, left: int) -> None:
        self.timer = self.reactor.callLater(self.timeout / self.tries, self._expire, left - 1)
        self.transport.write(self.data)  # may call connectionRefused at once

    def _expire(self, left: int) -> None:
        if self.done.called or self.transport is None:
            return
        if left > 0:
            self._send(left)
        elif not self.done.called:
            self.done.errback(error.TimeoutError(f"no answer after {self.tries} tries"))

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if len(data) >= 2 and struct.unpack_from("!H", data)[0] == self.qid and not self.done.called:
            self.timer.cancel()
            self.done.callback(data)

    def stopProtocol(self) -> None:
        # An ICMP error on a connected socket makes the reactor close the port (EPOLLERR).
        self.connectionRefused()

    def connectionRefused(self) -> None:
        if not self.done.called:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.done.errback(error.ConnectionRefusedError("port unreachable"))


class _StreamQuery(Int16StringReceiver):
    MAX_LENGTH = 65535

    def __init__(self, data: bytes, qid: int) -> None:
        self.data = data
        self.qid = qid
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendString(self.data)

    def stringReceived(self, data: bytes) -> None:
        if len(data) >= 2 and struct.unpack_from("!H", data)[0] == self.qid and not self.done.called:
            self.done.callback(data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(reason)


@defer.inlineCallbacks
def exchange(reactor: Any, host: str, port: int, data: bytes, qid: int, transport: str = "udp",
             timeout: float = 5.0, tlsCreator: Any = None) -> Any:
    """Send a query, fire with the answer bytes (over TCP again if UDP says TC)."""
    if transport == "udp":
        proto = _UDPQuery(reactor, data, qid, timeout, 3)
        port_ = reactor.listenUDP(0, proto, interface="::" if ":" in host else "")
        port_.connect(host, port)
        proto.start()
        try:
            answer = yield proto.done
        finally:
            if proto.timer is not None and proto.timer.active():
                proto.timer.cancel()
            port_.stopListening()
        if struct.unpack_from("!H", answer, 2)[0] & wire.TC:
            answer = yield exchange(reactor, host, port, data, qid, "tcp", timeout)
        return answer
    cls = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
    endpoint = cls(reactor, host, port, timeout=timeout)
    if transport == "tls":
        endpoint = endpoints.wrapClientTLS(tlsCreator, endpoint)
    proto = _StreamQuery(data, qid)
    d = endpoints.connectProtocol(endpoint, proto)
    d.addTimeout(timeout, reactor)
    yield d
    answer = yield proto.done.addTimeout(timeout, reactor)
    return answer


def parseServer(text: str, defaultPort: int) -> tuple[str, int]:
    """C{ADDR}, C{ADDR:PORT}, C{[V6ADDR]:PORT}; raises ValueError."""
    if text.count(":") > 1 and not text.startswith("["):
        return text, defaultPort  # a bare IPv6 address
    return clients.parseAddress(text, defaultPort)


def defaultServer() -> str:
    host = parseURL(systemUpstreams()[0])["host"]
    return f"[{host}]" if ":" in host else host


class _Addresses:
    """An IResolutionReceiver collecting a host name's addresses (IPv4 and IPv6), in order."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: defer.Deferred = defer.Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


def serverAddresses(reactor: Any, host: str) -> defer.Deferred:
    """
    The addresses to try for C{@host}: the address itself, or every address a
    host name resolves to (like dig).  Fails with DNSLookupError when there is none.
    """
    if _isAddress(host):
        return defer.succeed([host])
    from twisted.internet.interfaces import IResolutionReceiver
    from zope.interface import directlyProvides

    receiver = _Addresses()
    directlyProvides(receiver, IResolutionReceiver)
    reactor.nameResolver.resolveHostName(receiver, host, 0)

    def check(addresses: list[str]) -> list[str]:
        if not addresses:
            raise error.DNSLookupError(host)
        return addresses

    return receiver.done.addCallback(check)


def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def format(message: dns.message.Message, server: str, port: int, transport: str, elapsed: float,
           size: int) -> str:
    """dig's layout."""
    out = []
    flags = dns.flags.to_text(message.flags).lower()
    rcode = dns.rcode.to_text(message.rcode())
    out.append(f";; ->>HEADER<<- opcode: {dns.opcode.to_text(message.opcode())}, status: {rcode}, "
               f"id: {message.id}")
    counts = (len(message.question), sum(len(r) for r in message.answer),
              sum(len(r) for r in message.authority),
              sum(len(r) for r in message.additional) + (1 if message.edns >= 0 else 0))
    out.append(f";; flags: {flags}; QUERY: {counts[0]}, ANSWER: {counts[1]}, AUTHORITY: {counts[2]}, "
               f"ADDITIONAL: {counts[3]}")
    if message.edns >= 0:
        out += ["", ";; OPT PSEUDOSECTION:",
                f"; EDNS: version: {message.edns}, flags:; udp: {message.payload}"]
    out += ["", ";; QUESTION SECTION:"]
    for q in message.question:
        out.append(f";{q.name}\t\t\t{dns.rdataclass.to_text(q.rdclass)}\t{dns.rdatatype.to_text(q.rdtype)}")
    for title, section in (("ANSWER", message.answer), ("AUTHORITY", message.authority),
                           ("ADDITIONAL", message.additional)):
        if section:
            out += ["", f";; {title} SECTION:"]
            for rrset in section:
                out.extend(_rrsetLines(rrset))
    out += ["", f";; Query time: {elapsed * 1000:.0f} msec",
            f";; SERVER: {server}#{port}({server}) ({transport.upper()})",
            f";; WHEN: {time.strftime('%a %b %d %H:%M:%S %Z %Y')}", f";; MSG SIZE  rcvd: {size}", ""]
    return "\n".join(out)


def _rrsetLines(rrset: dns.rrset.RRset) -> list[str]:
    rdatas = list(rrset)
    if rrset.rdtype == dns.rdatatype.MX:
        rdatas.sort(key=lambda r: (r.preference, str(r.exchange)))
    return [f"{rrset.name}\t\t{rrset.ttl}\t{dns.rdataclass.to_text(rrset.rdclass)}\t"
            f"{dns.rdatatype.to_text(rrset.rdtype)}\t{r.to_text()}" for r in rdatas]


def shortLines(message: dns.message.Message) -> list[str]:
    lines = []
    for rrset in message.answer:
        rdatas = list(rrset)
        if rrset.rdtype == dns.rdatatype.MX:
            rdatas.sort(key=lambda r: (r.preference, str(r.exchange)))
        lines.extend(r.to_text() for r in rdatas)
    return lines


@defer.inlineCallbacks
def query(reactor: Any, args: argparse.Namespace, out: Any = None) -> Any:
    out = out or sys.stdout
    name, qtype = args.name, args.qtype
    if args.reverse:
        name = ipaddress.ip_address(args.reverse).reverse_pointer
        qtype = "PTR"
    transport = "tls" if args.tls else ("tcp" if args.tcp else "udp")
    server, port = parseServer(args.server or defaultServer(), 853 if args.tls else 53)
    tlsCreator = hint = None
    if args.tls:
        from netsvc.tls import clientCreator

        tlsName = args.tls_name or server
        tlsCreator = clientCreator(tlsName, cafile=args.cacert, insecure=args.insecure,
                                   acceptableProtocols=[b"dot"])
        hint = clients.TLSHint(tlsName, args.cacert)
    try:
        addresses = yield serverAddresses(reactor, server)
    except error.DNSLookupError:
        return clients.fail("dns", f"@{server}", "cannot resolve host name")
    qid, data = buildQuery(name, dns.rdatatype.from_text(qtype), not args.norecurse)
    for host in addresses:
        started = time.perf_counter()
        try:
            answer = yield exchange(reactor, host, port, data, qid, transport, args.timeout, tlsCreator)
        except Exception as e:  # each address in turn, as dig does; every failure said
            clients.fail("dns", clients.target(host, port, transport), clients.describe(e, args.timeout, hint))
            continue
        break
    else:
        return EXIT_NO_REPLY
    elapsed = time.perf_counter() - started
    try:
        message = dns.message.from_wire(answer)
    except dns.exception.DNSException as e:
        return clients.fail("dns", clients.target(host, port, transport), f"malformed answer: {e}")
    if not message.flags & dns.flags.QR:  # e.g. an echo server sent the query back
        return clients.fail("dns", clients.target(host, port, transport), "the reply is not a DNS answer (no QR flag)")
    if args.short:
        for line in shortLines(message):
            out.write(line + "\n")
    else:
        out.write(format(message, host, port, transport, elapsed, len(answer)) + "\n")
    out.flush()
    rcode = message.rcode()
    if rcode != dns.rcode.NOERROR:
        if args.short:
            clients.fail("dns", f"{name} {qtype}", dns.rcode.to_text(rcode))
        return EXIT_RCODE
    return EXIT_ANSWER


def _usage(message: str) -> defer.Deferred:
    return defer.succeed(clients.fail("dns", "", message, EXIT_USAGE))


def run(reactor: Any, args: argparse.Namespace) -> defer.Deferred:
    if args.action != "query":
        return _usage(f"unknown action {args.action!r}: netsvc dns query NAME [TYPE] [@SERVER[:PORT]]")
    # dig style: NAME, TYPE and @SERVER in any order.
    positional = list(args.words)
    args.server = None
    args.name = None
    args.qtype = "A"
    for word in positional:
        if word.startswith("@"):
            args.server = word[1:]
        elif args.name is None and not _isType(word):
            args.name = word
        elif _isType(word):
            args.qtype = word.upper()
        elif args.name is not None:
            return _usage(f"unexpected argument {word!r}")
    if args.name is None and not args.reverse:
        return _usage("give a NAME (or -x ADDRESS): netsvc dns query NAME [TYPE] [@SERVER[:PORT]]")
    if args.reverse:
        try:
            ipaddress.ip_address(args.reverse)
        except ValueError:
            return _usage(f"-x needs an IP address, got {args.reverse!r}")
    if args.tcp and args.tls:
        return _usage("--tcp or --tls, not both")
    if (args.cacert or args.insecure or args.tls_name) and not args.tls:
        return _usage("--cacert, --insecure and --tls-name go with --tls")
    try:
        if args.server:
            parseServer(args.server, 53)
        if args.name:
            encodeName(args.name)
    except ValueError as e:
        return _usage(str(e))
    status = clients.checkCAFile("dns", args.cacert)
    if status is not None:
        return defer.succeed(status)
    d = query(reactor, args)

    def failed(f: Any) -> int:
        return clients.fail("dns", f"@{args.server or defaultServer()}", clients.describe(f.value, args.timeout))

    return d.addErrback(failed)


def _isType(word: str) -> bool:
    if word.isdigit() or "." in word:
        return False
    try:
        dns.rdatatype.from_text(word.upper())
        return True
    except dns.rdatatype.UnknownRdatatype:
        return False


def addParser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("dns", help="ask a DNS server one question (dig-like)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", metavar="query", help="what to do (query is the one action)")
    p.add_argument("words", nargs="*", metavar="NAME [TYPE] [@SERVER[:PORT]]",
                   help="in any order, as with dig: the name, the record type (default A), the server "
                        "(default: /etc/resolv.conf's first; a host name is resolved, each address tried)")
    p.add_argument("-x", dest="reverse", metavar="ADDRESS", help="reverse lookup (PTR) of an address")
    p.add_argument("--tcp", action="store_true", help="over TCP")
    p.add_argument("--tls", action="store_true",
                   help="over TLS (DNS over TLS, port 853; certificate verified)")
    p.add_argument("--tls-name", metavar="NAME", help="the name to verify the TLS certificate against")
    p.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in FILE")
    p.add_argument("-k", "--insecure", action="store_true", help="do not verify the TLS certificate")
    p.add_argument("--short", action="store_true", help="only the answer's values (dig +short)")
    p.add_argument("--norecurse", action="store_true", help="do not ask for recursion (RD=0)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="seconds to wait for an answer from each address (default 5)")
    p.set_defaults(run=run)
    return p
