"""
What the LDAP client deals in, apart from the connection itself: C{ldap://}
URLs, result codes and their names (L{LDAPError}), how a search ended
(L{SearchDone}), the paged-results control (RFC 2696), and one-line descriptions
of connection failures.  L{netsvc.ldap.client} re-exports all of it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from ldaptor.protocols import pureber, pureldap
from OpenSSL import SSL
from twisted.internet import error

from netsvc import clients

#: RFC 4511 derefAliases, by ldapsearch's -a names.
DEREF = {"never": 0, "search": 1, "find": 2, "always": 3}

#: ldapsearch's -s names; children is the subordinate subtree (the subtree without its base), slapd's scope 3.
SCOPES = {"base": pureldap.LDAP_SCOPE_baseObject, "one": pureldap.LDAP_SCOPE_singleLevel,
          "sub": pureldap.LDAP_SCOPE_wholeSubtree, "children": 3}

PAGED_RESULTS = b"1.2.840.113556.1.4.319"
WHOAMI = b"1.3.6.1.4.1.4203.1.11.3"
NOTICE_OF_DISCONNECTION = b"1.3.6.1.4.1.1466.20036"

#: A server message larger than this closes the connection (no unbounded buffering).
MAX_MESSAGE = 64 * 1024 * 1024

#: Result codes, named as OpenLDAP's ldap_err2string names them (what ldapsearch prints).
RESULT_NAMES = {
    0: "Success", 1: "Operations error", 2: "Protocol error", 3: "Time limit exceeded",
    4: "Size limit exceeded", 5: "Compare False", 6: "Compare True", 7: "Authentication method not supported",
    8: "Strong(er) authentication required", 10: "Referral", 11: "Administrative limit exceeded",
    12: "Critical extension is unavailable", 13: "Confidentiality required", 14: "SASL bind in progress",
    16: "No such attribute", 17: "Undefined attribute type", 18: "Inappropriate matching",
    19: "Constraint violation", 20: "Type or value exists", 21: "Invalid syntax", 32: "No such object",
    33: "Alias problem", 34: "Invalid DN syntax", 36: "Alias dereferencing problem",
    48: "Inappropriate authentication", 49: "Invalid credentials", 50: "Insufficient access",
    51: "Server is busy", 52: "Server is unavailable", 53: "Server is unwilling to perform",
    54: "Loop detected", 64: "Naming violation", 65: "Object class violation",
    66: "Operation not allowed on non-leaf", 67: "Operation not allowed on RDN", 68: "Already exists",
    69: "Cannot modify object class", 71: "Results too large", 80: "Other (e.g., implementation specific) error",
}


class LDAPError(Exception):
    """A non-success LDAP result: C{resultCode}, the server's C{message} and C{matchedDN}."""

    def __init__(self, resultCode: int, message: str = "", matchedDN: str = "") -> None:
        self.resultCode = resultCode
        self.message = message
        self.matchedDN = matchedDN
        super().__init__(resultCode, message)

    def __str__(self) -> str:
        text = f"{RESULT_NAMES.get(self.resultCode, 'Unknown result')} ({self.resultCode})"
        return f"{text}: {self.message}" if self.message else text


class StartTLSError(Exception):
    """StartTLS failed: refused by the server, or the certificate did not verify."""


@attrs.frozen
class LDAPURL:
    """C{ldap://host:port} or C{ldaps://host:port} (a DN path, if any, is kept in C{dn})."""

    tls: bool
    host: str
    port: int
    dn: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'ldaps' if self.tls else 'ldap'}://{host}:{self.port}"


#: A host name or IPv4 address as it may stand in a URL (IPv6 addresses are checked as such).
_HOST = re.compile(r"^[A-Za-z0-9_.-]+$")


def parseURL(text: str) -> LDAPURL:
    """C{ldap://host[:port][/dn]} or C{ldaps://...}; the default ports are 389 and 636. Raises ValueError."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ValueError(f"expected ldap://host:port or ldaps://host:port, got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"expected ldap://host:port (no user@ in an LDAP URL), got {text!r}")
    host = parts.hostname or "localhost"
    try:
        if ":" in host:
            ipaddress.IPv6Address(host)
        elif not _HOST.match(host):
            raise ValueError(host)
    except ValueError:
        raise ValueError(f"bad host in {text!r}") from None
    return LDAPURL(scheme == "ldaps", host, port or (636 if scheme == "ldaps" else 389),
                   unquote(parts.path.lstrip("/")))


@attrs.frozen
class SearchDone:
    """How a search ended: the final result (success or not), how many entries came, referrals."""

    resultCode: int
    message: str = ""
    matchedDN: str = ""
    entries: int = 0
    references: tuple[str, ...] = ()
    pages: int = 1

    def error(self) -> LDAPError | None:
        return LDAPError(self.resultCode, self.message, self.matchedDN) if self.resultCode else None


def pagedResultsControl(size: int, cookie: bytes = b"", critical: bool = False) -> tuple:
    """The RFC 2696 request control, as ldaptor's LDAPMessage takes controls."""
    value = pureber.BERSequence([pureber.BERInteger(size), pureber.BEROctetString(cookie)]).toWire()
    return (PAGED_RESULTS, critical, value)


def pagedResultsCookie(controls: Sequence[tuple] | None) -> bytes | None:
    """The cookie of the server's paged-results response control; None if it sent none."""
    for oid, _critical, value in controls or ():
        if oid == PAGED_RESULTS and value is not None:
            decoded, _ = pureber.berDecodeObject(pureber.BERDecoderContext(), value)
            if isinstance(decoded, pureber.BERSequence) and len(decoded.data) == 2:
                return decoded.data[1].value
            raise LDAPError(2, "malformed paged results response control")
    return None


def decodeText(value: Any) -> str:
    """Bytes from the wire as text (UTF-8, undecodable bytes replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def verificationErrors() -> tuple:
    """The exceptions of a failed certificate name check (service_identity, imported when needed)."""
    from service_identity import VerificationError

    return (VerificationError,)


def describe(reason: BaseException, host: str | None = None) -> str:
    """One line for a connection-level failure (TLS and name checks spelled out)."""
    from service_identity import VerificationError

    if isinstance(reason, VerificationError):
        return (f"the server's certificate is not valid for {host}" if host
                else "the server's certificate is for another name")
    if isinstance(reason, StartTLSError):
        return str(reason)
    if isinstance(reason, error.TimeoutError) and reason.args:
        return f"timed out ({reason.args[0]})"
    text = clients.describe(reason)
    if isinstance(reason, SSL.Error) and "certificate verify failed" in text:
        return "TLS failed: certificate verify failed (not signed by a trusted CA: see --cacert)"
    return text
