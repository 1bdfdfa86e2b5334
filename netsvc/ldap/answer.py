"""
What a search returns of an entry: attribute selection (C{*}, C{+}, C{1.1}, names),
operational attributes, the root DSE and the subschema entry, encoded as
SearchResultEntry messages.

    selection = Selection.parse(["cn", "+"])
    answer(msgid, entry, directory, selection, self=False)  -> bytes (one LDAPMessage)

C{userPassword} is left out unless the entry is the bound identity's own (C{self}).
"""

from __future__ import annotations

from netsvc import __version__ as VERSION
from netsvc.ldap import codec
from netsvc.ldap.entry import SECRET, Entry
from netsvc.ldap.schema import SCHEMA

SUBSCHEMA_DN = "cn=Subschema"
NSUBSCHEMA = "cn=subschema"

OID_STARTTLS = "1.3.6.1.4.1.1466.20037"
OID_WHOAMI = "1.3.6.1.4.1.4203.1.11.3"
OID_PASSWORD_MODIFY = "1.3.6.1.4.1.4203.1.11.1"
OID_PAGED = "1.2.840.113556.1.4.319"
#: ManageDsaIT (RFC 3296): "treat referrals as entries"; there are no referral objects, so it changes nothing.
OID_MANAGE_DSA_IT = "2.16.840.1.113730.3.4.2"
OID_ALL_OPERATIONAL = "1.3.6.1.4.1.4203.1.5.1"  # the "+" feature (RFC 3673)

#: Operational attributes every entry has (computed), in the order they are returned.
OPERATIONAL = ("structuralobjectclass", "entrydn", "subschemasubentry", "hassubordinates")


class Selection:
    """Which attributes a search asked for (RFC 4511 4.5.1.8)."""

    __slots__ = ("allUser", "allOperational", "names", "none", "typesOnly")

    def __init__(self, allUser: bool, allOperational: bool, names: frozenset[str], typesOnly: bool = False) -> None:
        self.allUser = allUser
        self.allOperational = allOperational
        self.names = names  # canonical names asked for by name
        self.none = not allUser and not allOperational and not names
        self.typesOnly = typesOnly

    @classmethod
    def parse(cls, attributes: list[str], typesOnly: bool = False) -> Selection:
        """The selection for a request's attribute list (remembered, if short: clients repeat theirs)."""
        if len(attributes) > 32 or sum(map(len, attributes)) > 1024:  # a long one would pin its size in memory
            return cls._parse(attributes, typesOnly)
        key = (tuple(attributes), typesOnly)
        found = _SELECTIONS.get(key)
        if found is None:
            if len(_SELECTIONS) >= 1024:
                _SELECTIONS.clear()
            found = _SELECTIONS[key] = cls._parse(attributes, typesOnly)
        return found

    @classmethod
    def _parse(cls, attributes: list[str], typesOnly: bool) -> Selection:
        names = set()
        allUser = not attributes
        allOperational = False
        only11 = True
        for a in attributes:
            if a == "*":
                allUser, only11 = True, False
            elif a == "+":
                allOperational, only11 = True, False
            elif a == "1.1":
                continue
            else:
                names.add(SCHEMA.canonical(a.split(";", 1)[0]))
                only11 = False
        if attributes and only11:  # "1.1" alone: no attributes
            allUser = False
        return cls(allUser, allOperational, frozenset(names), typesOnly)

    def wants(self, canon: str) -> bool:
        return canon in self.names or (self.allOperational and SCHEMA.attribute(canon).operational)


_SELECTIONS: dict[tuple, Selection] = {}


def answer(msgid: int, entry: Entry, directory: object, sel: Selection, self: bool = False) -> bytes:
    """The SearchResultEntry message for C{entry} under selection C{sel}."""
    dn = entry.dn.encode("utf-8")
    if sel.none:
        return codec.entry(msgid, dn, b"")
    if sel.typesOnly:
        parts = [codec.attribute(entry.names[c].encode(), []) for c in entry.attrs
                 if (sel.allUser or c in sel.names) and (c != SECRET or self)]
        return codec.entry(msgid, dn, b"".join(parts))
    if sel.allUser and not sel.names and not sel.allOperational:
        body = b"".join(entry.encoded.values()) if self else entry.publicEncoded
        return codec.entry(msgid, dn, body)
    if sel.allUser:
        body = b"".join(entry.encoded.values()) if self else entry.publicEncoded
    else:
        encoded = entry.encoded
        body = b"".join([encoded[c] for c in sel.names if c in encoded and (c != SECRET or self)])
    if sel.allOperational or sel.names:
        body += operational(entry, directory, sel)
    return codec.entry(msgid, dn, body)


def operational(entry: Entry, directory: object, sel: Selection) -> bytes:
    out = []
    for canon in OPERATIONAL:
        if not (sel.allOperational or canon in sel.names):
            continue
        if canon == "entrydn":
            values = [entry.dn.encode()]
        elif canon == "subschemasubentry":
            values = [SUBSCHEMA_DN.encode()]
        elif canon == "hassubordinates":
            values = [b"TRUE" if directory.hasChildren(entry) else b"FALSE"]  # type: ignore[attr-defined]
        else:
            structural = structuralClass(entry)
            if structural is None:
                continue
            values = [structural.encode()]
        out.append(codec.attribute(SCHEMA.attribute(canon).name.encode(), values))
    return b"".join(out)


def structuralClass(entry: Entry) -> str | None:
    """The most specific structural object class of C{entry} (the one with most ancestors)."""
    best, depth = None, -1
    for value in entry.attrs.get("objectclass", ()):
        name = value.decode("utf-8", "replace").strip()
        oc = SCHEMA.objectClass(name)
        if oc is None or oc.kind != "STRUCTURAL":
            continue
        d = len(SCHEMA.superclasses(name))
        if d > depth:
            best, depth = oc.name, d
    return best


# -- special entries --------------------------------------------------------------


class SpecialEntry(Entry):
    """The root DSE and the subschema entry: all their attributes count as requested by C{*} or C{+}."""

    __slots__ = ("strict",)


def rootDSE(suffix: str, startTLS: bool, writable: bool = False) -> SpecialEntry:
    extensions = [OID_WHOAMI] + ([OID_STARTTLS] if startTLS else []) + ([OID_PASSWORD_MODIFY] if writable else [])
    attrs = [("objectClass", b"top"), ("objectClass", b"extensibleObject"),
             ("namingContexts", suffix.encode()), ("subschemaSubentry", SUBSCHEMA_DN.encode()),
             ("supportedLDAPVersion", b"3")]
    attrs += [("supportedExtension", oid.encode()) for oid in extensions]
    attrs += [("supportedControl", OID_PAGED.encode()), ("supportedControl", OID_MANAGE_DSA_IT.encode()),
              ("supportedFeatures", OID_ALL_OPERATIONAL.encode()),
              ("vendorName", b"netsvc"), ("vendorVersion", f"netsvc {VERSION}".encode())]
    e = SpecialEntry("", "", None, attrs)
    e.strict = False
    return e


def subschemaEntry() -> SpecialEntry:
    attrs = [("objectClass", b"top"), ("objectClass", b"subentry"), ("objectClass", b"subschema"),
             ("objectClass", b"extensibleObject"), ("cn", b"Subschema")]
    for name, values in SCHEMA.subschemaValues().items():
        attrs += [(name, v) for v in values]
    e = SpecialEntry(SUBSCHEMA_DN, NSUBSCHEMA, None, attrs)
    e.strict = True
    return e


def answerSpecial(msgid: int, entry: SpecialEntry, sel: Selection) -> bytes:
    """
    The root DSE answers C{*} (or no list) with everything it has, to be helpful
    to C{ldapsearch -b "" -s base}; the subschema entry keeps its big description
    attributes for C{+} or explicit names, as RFC 4512 has it.
    """
    dn = entry.dn.encode("utf-8")
    if sel.none:
        return codec.entry(msgid, dn, b"")
    parts = []
    for canon, enc in entry.encoded.items():
        operational = SCHEMA.attribute(canon).operational
        wanted = canon in sel.names or (sel.allOperational and operational) or (
            sel.allUser and (not operational or not entry.strict))
        if wanted:
            parts.append(codec.attribute(entry.names[canon].encode(), []) if sel.typesOnly else enc)
    return codec.entry(msgid, dn, b"".join(parts))
