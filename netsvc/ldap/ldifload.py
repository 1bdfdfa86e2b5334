"""
Reading LDIF content records (RFC 2849) with the file and line of every problem.

    for record in parseLDIF(data, "example.ldif"):
        record.dn, record.attributes, record.line      # str, [(name, bytes)], int

Understood: C{version: 1}, comments, folded lines (a leading space continues the
previous line, also in comments), C{attr: value}, C{attr:: base64}, C{dn::},
attribute options (C{cn;lang-de}; C{;binary} is dropped), CRLF line ends, any
number of blank lines between records.  Refused with L{LDIFError}: change records
(C{changetype:}), C{attr:< URL} values (a directory served from files should not
read other files named inside them), malformed lines, bad base64, a DN that does
not parse.

ldaptor's LDIF reader (C{ldaptor.protocols.ldap.ldifprotocol}) is a line protocol
that reports no line numbers, needs a trailing blank line and does not fold
comments, which is why this small reader exists.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass

from netsvc.ldap.dn import DNError, parseDN


class LDIFError(ValueError):
    """An LDIF problem; C{str()} is C{"FILE: line N: reason"}."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}: line {line}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


@dataclass
class Record:
    dn: str
    attributes: list[tuple[str, bytes]]
    file: str
    line: int  # where its dn: line is


def _logicalLines(data: bytes, file: str) -> Iterator[tuple[int, bytes]]:
    """(line number, unfolded line) pairs; blank lines come as b"" (record separators)."""
    current: bytearray | None = None
    start = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.startswith(b" "):
            if current is None:
                raise LDIFError(file, number, "a continuation line (starting with a space) with nothing to continue")
            current.extend(raw[1:])
            continue
        if current is not None:
            yield start, bytes(current)
        if raw.strip() == b"":
            current = None
            yield number, b""
            continue
        current, start = bytearray(raw), number
    if current is not None:
        yield start, bytes(current)


def parseLDIF(data: bytes, file: str = "<ldif>") -> Iterator[Record]:
    """
    The content records of LDIF C{data}, in order.

    @raise LDIFError: at the first problem (file and line in the message).
    """
    record: Record | None = None
    first = True
    for number, line in _logicalLines(data, file):
        if not line:
            if record is not None:
                yield record
                record = None
            continue
        if line.startswith(b"#"):
            continue
        name, value = _attributeLine(line, file, number)
        if first and record is None and name.lower() == "version":
            first = False
            if value.strip() != b"1":
                raise LDIFError(file, number, f"unsupported LDIF version {value.decode(errors='replace')!r}")
            continue
        first = False
        if record is None:
            if name.lower() != "dn":
                raise LDIFError(file, number, f"a record must start with dn:, not {name!r}")
            try:
                dn = value.decode("utf-8")
                parseDN(dn)
            except (UnicodeDecodeError, DNError) as e:
                raise LDIFError(file, number, f"bad DN: {e}") from None
            record = Record(dn, [], file, number)
            continue
        lower = name.lower()
        if lower == "dn":
            raise LDIFError(file, number, "dn: inside a record (missing blank line between records?)")
        if lower in ("changetype", "control"):
            raise LDIFError(file, number, "change records are not supported: a directory file holds entries only")
        if lower.endswith(";binary"):
            name = name[: -len(";binary")]
        record.attributes.append((name, value))
    if record is not None:
        yield record


def _attributeLine(line: bytes, file: str, number: int) -> tuple[str, bytes]:
    colon = line.find(b":")
    if colon <= 0:
        raise LDIFError(file, number, f"expected 'attribute: value', got {line[:40].decode(errors='replace')!r}")
    try:
        name = line[:colon].decode("ascii").strip()
    except UnicodeDecodeError:
        raise LDIFError(file, number, "attribute name is not ASCII") from None
    if not name or not all(c.isalnum() or c in "-;." for c in name):
        raise LDIFError(file, number, f"bad attribute name {name!r}")
    rest = line[colon + 1:]
    if rest.startswith(b":"):
        try:
            return name, base64.b64decode(rest[1:].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise LDIFError(file, number, f"bad base64 value for {name}") from None
    if rest.startswith(b"<"):
        raise LDIFError(file, number, f"URL values (:<) are not supported ({name})")
    value = rest.lstrip(b" ")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise LDIFError(file, number, f"value of {name} is not UTF-8 (use {name}:: base64)") from None
    return name, value
