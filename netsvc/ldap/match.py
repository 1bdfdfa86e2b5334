"""
Schema-aware filter evaluation (RFC 4511 section 4.5.1.7, RFC 4515 filters
decoded by L{netsvc.ldap.codec}).

    matches(filter, entry) -> bool

How values compare is decided by each attribute's equality rule in the schema:
C{(cn=ANN lee)} matches C{cn: Ann Lee}; C{(memberUid=Ann)} does not match
C{memberUid: ann} (caseExactIA5Match); C{(uidNumber>=1000)} compares integers;
C{(member=UID=ann,OU=users,dc=example,dc=com)} compares DNs; C{(objectClass=person)}
matches an C{inetOrgPerson} (superclasses are part of an entry's classes).
Approximate match is equality.  An extensible match with a known matching rule
uses that rule; with an unknown one it matches nothing.  Filters on attributes
the entry does not have are false (also under C{not}: two-valued logic, which
only differs from RFC 4511's three values for attributes the schema does not know).
"""

from __future__ import annotations

from netsvc.ldap.entry import Entry
from netsvc.ldap.schema import RULES, SCHEMA, normalize


def matches(flt: tuple, entry: Entry) -> bool:
    kind = flt[0]
    if kind == "eq" or kind == "approx":
        return _equal(flt[1], flt[2], entry)
    if kind == "and":
        for sub in flt[1]:
            if not matches(sub, entry):
                return False
        return True
    if kind == "or":
        for sub in flt[1]:
            if matches(sub, entry):
                return True
        return False
    if kind == "not":
        return not matches(flt[1], entry)
    if kind == "present":
        canon = SCHEMA.canonical(flt[1])
        return canon in entry.attrs
    if kind == "sub":
        return _substrings(flt, entry)
    if kind == "ge" or kind == "le":
        return _ordering(kind, flt[1], flt[2], entry)
    if kind == "ext":
        return _extensible(flt, entry)
    return False


def _equal(attr: str, value: bytes, entry: Entry) -> bool:
    at = SCHEMA.attribute(attr)
    canon = at.name.lower()
    if canon == "objectclass":
        return normalize("ci", value) in entry.classes
    norms = entry.norms.get(canon)
    return norms is not None and normalize(at.kind, value) in norms


def _substrings(flt: tuple, entry: Entry) -> bool:
    _, attr, initial, middle, final = flt
    at = SCHEMA.attribute(attr)
    norms = entry.norms.get(at.name.lower())
    if not norms:
        return False
    kind = at.kind
    if kind not in ("ci", "ce", "tel", "octet"):
        kind = "ci" if kind in ("oid", "dn") else "octet"

    def piece(p: bytes) -> bytes:
        if kind == "ci":
            return p.decode("utf-8", "replace").casefold().encode()
        if kind == "tel":
            return normalize("tel", p)
        return p

    ini = piece(initial) if initial is not None else None
    fin = piece(final) if final is not None else None
    mids = [piece(m) for m in middle]
    for value in norms:
        if ini is not None and not value.startswith(ini):
            continue
        pos = len(ini) if ini is not None else 0
        end = len(value) - (len(fin) if fin is not None else 0)
        if end < pos:
            continue
        ok = True
        for m in mids:
            found = value.find(m, pos, end)
            if found < 0:
                ok = False
                break
            pos = found + len(m)
        if ok and (fin is None or value.endswith(fin)):
            return True
    return False


def _ordering(kind: str, attr: str, value: bytes, entry: Entry) -> bool:
    at = SCHEMA.attribute(attr)
    norms = entry.norms.get(at.name.lower())
    if not norms:
        return False
    assertion = normalize(at.kind, value)
    if at.kind == "int":
        if assertion.startswith(b"\0"):
            return False
        a = int(assertion)
        vals = [int(v) for v in norms if not v.startswith(b"\0")]
        return any(v >= a for v in vals) if kind == "ge" else any(v <= a for v in vals)
    return any(v >= assertion for v in norms) if kind == "ge" else any(v <= assertion for v in norms)


def _extensible(flt: tuple, entry: Entry) -> bool:
    _, rule, attr, value, _dnAttrs = flt
    if attr is None:
        return False
    if rule is None:
        return _equal(attr, value, entry)
    kind = None
    for name, (oid, _syntax, k) in RULES.items():
        if rule.lower() in (name.lower(), oid):
            kind = k
    if kind is None:
        return False
    norms = entry.attrs.get(SCHEMA.canonical(attr))
    if not norms:
        return False
    assertion = normalize(kind, value)
    return any(normalize(kind, v) == assertion for v in norms)
