"""
Schema-aware filter evaluation (RFC 4511 section 4.5.1.7, RFC 4515 filters
decoded by L{netsvc.ldap.codec}).

    test = compileFilter(filter)     # once per search: assertion values normalized once
    test(entry) -> bool
    matches(filter, entry) -> bool   # the same, for one entry

How values compare is decided by each attribute's equality rule in the schema:
C{(cn=ANN lee)} matches C{cn: Ann Lee}; C{(memberUid=Ann)} does not match
C{memberUid: ann} (caseExactIA5Match); C{(uidNumber>=1000)} compares integers;
C{(member=UID=ann,OU=users,dc=example,dc=com)} compares DNs; C{(objectClass=person)}
matches an C{inetOrgPerson} (superclasses are part of an entry's classes).
Approximate match is equality.  An extensible match with a known matching rule
uses that rule; with an unknown one it matches nothing.  Filters on attributes
the entry does not have are false (also under C{not}: two-valued logic, which
only differs from RFC 4511's three values for attributes the schema does not know).

C{userPassword} is readable only by its own entry, and so is what a filter says about
it: an assertion on it is false for every entry but the C{viewer}'s (the bound DN,
normalized), whatever the stored value -- else C{(userPassword={SSHA}a*)} would read
the hash out one character at a time.  Under C{not} it is then true for all of them
alike, which tells nothing either.
"""

from __future__ import annotations

from collections.abc import Callable

from netsvc.ldap.entry import SECRET, Entry
from netsvc.ldap.schema import RULES, SCHEMA, normalize

Test = Callable[[Entry], bool]


def matches(flt: tuple, entry: Entry, viewer: str | None = None) -> bool:
    return compileFilter(flt, viewer)(entry)


def compileFilter(flt: tuple, viewer: str | None = None) -> Test:
    """
    A function telling whether an entry matches C{flt} (a decoded filter tuple),
    as seen by C{viewer} (the normalized DN of the bound identity, None: anonymous).
    """
    kind = flt[0]
    if kind in ("and", "or", "not"):
        return _compileSet(flt, viewer)
    test = _compileItem(flt)
    attr = flt[2] if kind == "ext" else flt[1]
    if attr is not None and SCHEMA.canonical(attr) == SECRET:
        return lambda e: e.ndn == viewer and test(e)
    return test


def assertions(flt: tuple) -> int:
    """
    How many attribute assertions testing C{flt} against one entry may cost (the
    equality assertions on one attribute under an OR count once: one set lookup).
    """
    kind = flt[0]
    if kind == "and":
        return sum(assertions(f) for f in flt[1])
    if kind == "or":
        groups, rest = _equalityGroups(flt[1])
        return len(groups) + sum(assertions(f) for f in rest)
    if kind == "not":
        return assertions(flt[1])
    return 1


def _equalityGroups(subs: list) -> tuple[dict[str, set[bytes]], list]:
    """The equality assertions of an OR by attribute ({canonical: normalized values}), and the other parts."""
    groups: dict[str, set[bytes]] = {}
    rest = []
    for f in subs:
        if f[0] in ("eq", "approx"):
            canon, norm = assertionKey(f[1], f[2])
            if canon != SECRET:
                groups.setdefault(canon, set()).add(norm)
                continue
        rest.append(f)
    return groups, rest


def _anyOf(canon: str, values: set[bytes]) -> Test:
    if canon == "objectclass":
        return lambda e: not values.isdisjoint(e.classes)

    def test(e: Entry) -> bool:
        norms = e.norms.get(canon)
        return norms is not None and not values.isdisjoint(norms)

    return test


def _compileSet(flt: tuple, viewer: str | None) -> Test:
    kind = flt[0]
    if kind == "and":
        subs = [compileFilter(f, viewer) for f in flt[1]]
        if len(subs) == 1:
            return subs[0]
        return lambda e: all(t(e) for t in subs)
    if kind == "or":
        # (|(uid=a)(uid=b)...): the equality assertions on one attribute are one set lookup.
        groups, rest = _equalityGroups(flt[1])
        subs = [_anyOf(canon, values) for canon, values in groups.items()]
        subs += [compileFilter(f, viewer) for f in rest]
        if len(subs) == 1:
            return subs[0]
        return lambda e: any(t(e) for t in subs)
    sub = compileFilter(flt[1], viewer)
    return lambda e: not sub(e)


def _compileItem(flt: tuple) -> Test:
    kind = flt[0]
    if kind == "eq" or kind == "approx":
        return _equal(flt[1], flt[2])
    if kind == "present":
        canon = SCHEMA.canonical(flt[1])
        return lambda e: canon in e.attrs
    if kind == "sub":
        return _substrings(flt)
    if kind == "ge" or kind == "le":
        return _ordering(kind, flt[1], flt[2])
    if kind == "ext":
        return _extensible(flt)
    return lambda e: False


def assertionKey(attr: str, value: bytes) -> tuple[str, bytes]:
    """(canonical attribute, normalized value) of an equality assertion: what indexes are keyed by."""
    at = SCHEMA.attribute(attr)
    canon = at.name.lower()
    return canon, normalize("ci" if canon == "objectclass" else at.kind, value)


def _equal(attr: str, value: bytes) -> Test:
    canon, norm = assertionKey(attr, value)
    if canon == "objectclass":
        return lambda e: norm in e.classes

    def test(e: Entry) -> bool:
        norms = e.norms.get(canon)
        return norms is not None and norm in norms

    return test


def _substrings(flt: tuple) -> Test:
    _, attr, initial, middle, final = flt
    at = SCHEMA.attribute(attr)
    canon = at.name.lower()
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
    start = len(ini) if ini is not None else 0
    tail = len(fin) if fin is not None else 0

    def one(value: bytes) -> bool:
        if ini is not None and not value.startswith(ini):
            return False
        pos, end = start, len(value) - tail
        if end < pos:
            return False
        for m in mids:
            found = value.find(m, pos, end)
            if found < 0:
                return False
            pos = found + len(m)
        return fin is None or value.endswith(fin)

    def test(e: Entry) -> bool:
        norms = e.norms.get(canon)
        return bool(norms) and any(one(v) for v in norms)

    return test


def _ordering(kind: str, attr: str, value: bytes) -> Test:
    at = SCHEMA.attribute(attr)
    canon = at.name.lower()
    assertion = normalize(at.kind, value)
    if at.kind == "int":
        if assertion.startswith(b"\0"):
            return lambda e: False
        a = int(assertion)

        def numbers(e: Entry) -> list[int]:
            return [int(v) for v in e.norms.get(canon, ()) if not v.startswith(b"\0")]

        if kind == "ge":
            return lambda e: any(v >= a for v in numbers(e))
        return lambda e: any(v <= a for v in numbers(e))
    if kind == "ge":
        return lambda e: any(v >= assertion for v in e.norms.get(canon, ()))
    return lambda e: any(v <= assertion for v in e.norms.get(canon, ()))


def _extensible(flt: tuple) -> Test:
    _, rule, attr, value, _dnAttrs = flt
    if attr is None:
        return lambda e: False
    if rule is None:
        return _equal(attr, value)
    kind = None
    for name, (oid, _syntax, k) in RULES.items():
        if rule.lower() in (name.lower(), oid):
            kind = k
    if kind is None:
        return lambda e: False
    canon = SCHEMA.canonical(attr)
    assertion = normalize(kind, value)
    return lambda e: any(normalize(kind, v) == assertion for v in e.attrs.get(canon, ()))
