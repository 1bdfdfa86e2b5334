"""
Distinguished names (RFC 4514): parse, and normalize for comparison.

    parseDN("CN=Ann  Lee+uid=ann, ou=Users,dc=Example") -> [[("CN", "Ann  Lee"), ("uid", "ann")], ...]
    normalizeDN("CN=Ann  Lee, ou=Users,dc=Example")     -> "cn=ann lee,ou=users,dc=example"

The normalized form is what the directory keys entries by: attribute types by
their canonical schema name, values by their equality rule (case-insensitive for
cn, ou, dc, uid...), multi-valued RDNs sorted, special characters re-escaped.
ldaptor's C{DistinguishedName} compares values case-sensitively as strings, which
is why this lives here.
"""

from __future__ import annotations

from functools import lru_cache


class DNError(ValueError):
    """Not a valid DN (the message says why)."""


_SPECIAL = set(',+"\\<>;=')


def parseDN(text: str) -> list[list[tuple[str, str]]]:
    """RFC 4514 string -> RDNs (leftmost first), each a list of (type, value).  "" is the root (no RDNs)."""
    rdns: list[list[tuple[str, str]]] = []
    if not text.strip():
        return rdns
    i, n = 0, len(text)
    rdn: list[tuple[str, str]] = []
    while True:
        while i < n and text[i] == " ":
            i += 1
        start = i
        while i < n and text[i] != "=":
            if text[i] in ",+":
                raise DNError(f"missing '=' in {text!r}")
            i += 1
        if i >= n:
            raise DNError(f"missing '=' in {text!r}")
        attr = text[start:i].strip()
        if not attr or not (attr[0].isalpha() or attr[0].isdigit()) or any(
                not (c.isalnum() or c in "-.") for c in attr):
            raise DNError(f"bad attribute type {attr!r} in {text!r}")
        i += 1
        value, i = _value(text, i)
        rdn.append((attr, value))
        if i >= n:
            rdns.append(rdn)
            return rdns
        if text[i] == "+":
            i += 1
            continue
        if text[i] in ",;":
            rdns.append(rdn)
            rdn = []
            i += 1
            continue
        raise DNError(f"unexpected {text[i]!r} in {text!r}")


def _value(text: str, i: int) -> tuple[str, int]:
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i < n and text[i] == "#":  # hex-encoded BER value: kept as written
        j = i + 1
        while j < n and text[j] not in ",+;":
            j += 1
        return text[i:j].strip(), j
    if i < n and text[i] == '"':  # RFC 2253 quoted value
        j = i + 1
        out = []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                j += 1
            out.append(text[j])
            j += 1
        if j >= n:
            raise DNError(f"unterminated quote in {text!r}")
        j += 1
        while j < n and text[j] == " ":
            j += 1
        return "".join(out), j
    raw = bytearray()
    trailing = 0  # unescaped trailing spaces are not part of the value
    while i < n and text[i] not in ",+;":
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                raise DNError(f"dangling backslash in {text!r}")
            pair = text[i + 1:i + 3]
            if len(pair) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in pair):
                raw.append(int(pair, 16))
                i += 3
            else:
                raw.extend(text[i + 1].encode("utf-8"))
                i += 2
            trailing = 0
            continue
        if c in '"<>=' :
            raise DNError(f"unescaped {c!r} in {text!r}")
        raw.extend(c.encode("utf-8"))
        trailing = trailing + 1 if c == " " else 0
        i += 1
    if trailing:
        del raw[-trailing:]
    try:
        return raw.decode("utf-8"), i
    except UnicodeDecodeError:
        raise DNError(f"not UTF-8 in {text!r}") from None


def escapeValue(value: str) -> str:
    """An attribute value escaped for a DN string."""
    out = []
    for k, c in enumerate(value):
        if c in _SPECIAL or (c == " " and (k == 0 or k == len(value) - 1)) or (c == "#" and k == 0):
            out.append("\\" + c)
        elif c == "\0":
            out.append("\\00")
        else:
            out.append(c)
    return "".join(out)


#: DNs up to this many characters are remembered once normalized (at most L{_CACHED} of them): clients
#: repeat their bases and bind DNs; a long one (a request may hold a megabyte) would pin its size in memory.
MAX_CACHED_DN = 512
_CACHED = 16384


def normalizeDN(text: str) -> str:
    """
    The canonical form of a DN (see the module docstring).

    @raise DNError: C{text} is not a DN.
    """
    if len(text) > MAX_CACHED_DN:
        return _normalizeDN(text)
    return _cachedDN(text)


def _normalizeDN(text: str) -> str:
    from netsvc.ldap.schema import SCHEMA, normalize

    out = []
    for rdn in parseDN(text):
        avas = []
        for attr, value in rdn:
            at = SCHEMA.attribute(attr)
            kind = at.kind if at.kind != "dn" else "ci"
            norm = normalize(kind, value.encode("utf-8")).decode("utf-8", "replace")
            avas.append(f"{at.name.lower()}={escapeValue(norm)}")
        out.append("+".join(sorted(avas)))
    return ",".join(out)


_cachedDN = lru_cache(maxsize=_CACHED)(_normalizeDN)


def parentDN(ndn: str) -> str | None:
    """The parent of a normalized DN ("" for a top-level entry, None for the root)."""
    if not ndn:
        return None
    rdns = splitNormalized(ndn)
    return ",".join(rdns[1:])


def splitNormalized(ndn: str) -> list[str]:
    """The RDNs of a normalized DN (commas escaped inside values are kept)."""
    out, start, i = [], 0, 0
    while i < len(ndn):
        if ndn[i] == "\\":
            i += 2
            continue
        if ndn[i] == ",":
            out.append(ndn[start:i])
            start = i + 1
        i += 1
    out.append(ndn[start:])
    return out if ndn else []


def isWithin(ndn: str, base: str) -> bool:
    """Whether normalized C{ndn} is C{base} or below it."""
    if not base:
        return True
    if ndn == base:
        return True
    return ndn.endswith("," + base) and not ndn.endswith("\\," + base)
