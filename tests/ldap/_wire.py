"""
Test helpers for the LDAP server: requests encoded and responses decoded by
ldaptor's pureldap (an implementation independent of netsvc.ldap.codec), and a
server protocol over a StringTransport.
"""

from __future__ import annotations

from pathlib import Path

from ldaptor import ldapfilter
from ldaptor.protocols import pureber, pureldap
from twisted.internet.testing import MemoryReactorClock, StringTransport

from netsvc.ldap.directory import Directory
from netsvc.ldap.ldifload import parseLDIF
from netsvc.ldap.server import LDAPLimits, LDAPMetrics, LDAPServerFactory
from netsvc.metrics import Registry

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "ldap" / "example.ldif"
SUFFIX = "dc=example,dc=com"
USERS = "ou=users,dc=example,dc=com"
ALICE = "uid=alice,ou=users,dc=example,dc=com"
BOB = "uid=bob,ou=users,dc=example,dc=com"
CAROL = "uid=carol,ou=users,dc=example,dc=com"
PAGED = "1.2.840.113556.1.4.319"

_DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext())))


def exampleDirectory() -> Directory:
    return Directory.load(SUFFIX, [EXAMPLE])


def directoryFrom(ldif: bytes, suffix: str = SUFFIX) -> Directory:
    d = Directory(suffix)
    d.add(parseLDIF(ldif, "test.ldif"))
    return d


def decodeAll(data: bytes) -> list:
    """Every LDAPMessage in C{data}, decoded by ldaptor."""
    out = []
    while data:
        message, used = pureber.berDecodeObject(_DECODER, data)
        assert message is not None and used, data[:40]
        out.append(message)
        data = data[used:]
    return out


def msg(op, msgid: int, controls=None) -> bytes:
    return pureldap.LDAPMessage(op, id=msgid, controls=controls).toWire()


def bind(msgid: int, dn: str = "", password: str = "") -> bytes:
    return msg(pureldap.LDAPBindRequest(dn=dn.encode(), auth=password.encode()), msgid)


def search(msgid: int, base: str = SUFFIX, flt: str = "(objectClass=*)", scope: int = 2,
           attributes: tuple = (), sizeLimit: int = 0, typesOnly: bool = False, controls=None) -> bytes:
    req = pureldap.LDAPSearchRequest(baseObject=base.encode(), scope=scope, filter=ldapfilter.parseFilter(flt),
                                     attributes=[a.encode() for a in attributes], sizeLimit=sizeLimit,
                                     typesOnly=typesOnly)
    return msg(req, msgid, controls)


def pagedControl(size: int, cookie: bytes = b"", critical: bool = True) -> tuple:
    value = pureber.BERSequence([pureber.BERInteger(size), pureber.BEROctetString(cookie)]).toWire()
    return (PAGED, critical, value)


def cookieOf(done) -> bytes:
    """The cookie of a SearchResultDone message's paged results control."""
    for oid, _critical, value in done.controls or ():
        if oid == PAGED.encode():
            seq = pureber.berDecodeObject(pureber.BERDecoderContext(), value)[0]
            return seq[1].value
    raise AssertionError(f"no paged results control in {done!r}")


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS."""

    tlsStarted = None

    def startTLS(self, options, normal=True):
        self.tlsStarted = (self.value(), options)


class Client:
    """A server protocol on a StringTransport; C{send} returns the decoded responses."""

    def __init__(self, factory: LDAPServerFactory, host: str = "192.0.2.7") -> None:
        self.factory = factory
        self.transport = TLSStringTransport(peerAddress=_addr(host))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def sendRaw(self, data: bytes) -> bytes:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value()

    def send(self, data: bytes) -> list:
        return decodeAll(self.sendRaw(data))

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def _addr(host: str):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, 40000)


def makeFactory(directory: Directory | None = None, tls: bool = True, **limits) -> LDAPServerFactory:
    clock = MemoryReactorClock()
    return LDAPServerFactory(directory or exampleDirectory(), LDAPLimits(**limits), LDAPMetrics(Registry()), clock,
                             tlsOptions=(lambda: "tls-options") if tls else None)


def entries(responses: list) -> list:
    return [r.value for r in responses if isinstance(r.value, pureldap.LDAPSearchResultEntry)]


def dns(responses: list) -> list[str]:
    return [e.objectName.decode() for e in entries(responses)]


def attrs(entry) -> dict[str, list[bytes]]:
    return {(n.decode() if isinstance(n, bytes) else n): [bytes(v) for v in vs] for n, vs in entry.attributes}
