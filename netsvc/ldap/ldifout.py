"""
Writing LDIF (RFC 2849): entries as C{dn:}/C{attr:} lines, values that are not
"safe strings" base64-encoded (C{attr:: ...}), lines folded at 78 columns --
byte for byte what OpenLDAP's ldapsearch (libldap's LDIF writer) prints: its
width, C{name: } never split, C{userPassword} always base64.

    entryLDIF("uid=jo,ou=users,dc=example,dc=com", [("cn", [b"Jo"]), ("jpegPhoto", [b"\\xff..."])])
    -> b"dn: uid=jo,ou=users,dc=example,dc=com\\ncn: Jo\\njpegPhoto:: /9j/...\\n\\n"

Contract: the output parses back (RFC 2849, and ldaptor's LDIF parser) to exactly
the DN and values given -- every byte string survives, whatever it holds.  Values
are bytes (what is on the wire); DNs and attribute names may be str (UTF-8) or bytes.

ldaptor has a writer (C{ldaptor.protocols.ldap.ldif}) but it neither folds long
lines nor base64-encodes unsafe DNs, so this one is written out here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence

#: Where OpenLDAP's ldapsearch folds lines (libldap's LDIF_LINE_WIDTH; checked against ldap-utils 2.5).
WIDTH = 78

#: Attributes whose values libldap always writes in base64 (ldif_must_b64_encode), by name or OID.
_ALWAYS_BASE64 = frozenset([b"userpassword", b"2.5.4.35"])

HEADER = b"version: 1\n\n"

_UNSAFE_FIRST = frozenset(b"\x00\n\r :<")
_UNSAFE = re.compile(b"[\x00\n\r]")


def isSafe(value: bytes) -> bool:
    """
    Whether C{value} may be written as is (an RFC 2849 SAFE-STRING): ASCII, no NUL,
    CR or LF, not starting with a space, C{:} or C{<}; and (RFC 2849 note 8) not
    ending with a space, which readers would strip.
    """
    if not value:
        return True
    if value[0] in _UNSAFE_FIRST or value[-1] == 0x20:
        return False
    return value.isascii() and _UNSAFE.search(value) is None


def _bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


def fold(line: bytes, width: int = WIDTH, keep: int = 0) -> bytes:
    """
    C{line} (no newline) folded: C{width} bytes (or its first C{keep} bytes, the
    C{name: } part, if that is more), then continuation lines of a space and
    C{width - 1} bytes.
    """
    first = max(width, keep)
    if len(line) <= first:
        return line + b"\n"
    parts = [line[:first]]
    for start in range(first, len(line), width - 1):
        parts.append(b" " + line[start:start + width - 1])
    return b"\n".join(parts) + b"\n"


def valueLine(name: str | bytes, value: bytes, width: int = WIDTH) -> bytes:
    """One C{name: value} (or C{name:: base64}) line, folded, with its newline."""
    name = _bytes(name)
    value = _bytes(value)
    if isSafe(value) and name.split(b";", 1)[0].lower() not in _ALWAYS_BASE64:
        if not value:
            return name + b":\n"
        head = name + b": "
    else:
        head, value = name + b":: ", base64.b64encode(value)
    return fold(head + value, width, len(head)) if width else head + value + b"\n"


def entryLDIF(dn: str | bytes, attributes: Iterable[tuple[str | bytes, Sequence[bytes]]],
              width: int = WIDTH) -> bytes:
    """
    One entry: its C{dn:} line, one line per value, and the blank line that ends
    it.  C{width} 0 means no folding (ldapsearch C{-o ldif-wrap=no}).
    """
    lines = [valueLine(b"dn", _bytes(dn), width)]
    for name, values in attributes:
        lines.extend(valueLine(name, v, width) for v in values)
    lines.append(b"\n")
    return b"".join(lines)


def manyLDIF(entries: Iterable[tuple[str | bytes, Iterable[tuple[str | bytes, Sequence[bytes]]]]],
             width: int = WIDTH) -> bytes:
    """A whole file: C{version: 1} and each entry."""
    return HEADER + b"".join(entryLDIF(dn, attributes, width) for dn, attributes in entries)
