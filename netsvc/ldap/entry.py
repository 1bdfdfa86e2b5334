"""
One directory entry, in the forms the server needs it.

An L{Entry} holds its DN (as written and normalized), its attributes as written
(name as first spelled in the LDIF, values as bytes, in order), and what
matching and answering need precomputed: the normalized values of every
attribute (L{netsvc.ldap.schema.normalize}), the object classes with all their
superclasses, and the BER encoding of each attribute (a search answer is a join
of cached byte strings).

Public read API (used by C{netsvc.ldap.authn} through the Directory API):
    entry.dn                    -> str, as written in the LDIF
    entry.get("mail")           -> list[str]   (any alias or case of the name; [] if absent)
    entry.first("cn")           -> str | None
    entry.values("jpegPhoto")   -> list[bytes]
    entry.attributeNames()      -> list[str]
Entries are immutable once loaded: a reload builds new ones.
"""

from __future__ import annotations

from netsvc.ldap import codec
from netsvc.ldap.schema import SCHEMA, Schema, normalize

#: Attributes never sent to anyone but the entry itself (after a bind as that entry).
SECRET = "userpassword"


class Entry:
    __slots__ = ("dn", "ndn", "parent", "names", "attrs", "norms", "classes", "encoded", "publicEncoded",
                 "file", "line", "seq")

    def __init__(self, dn: str, ndn: str, parent: str | None, attributes: list[tuple[str, bytes]],
                 schema: Schema = SCHEMA, file: str = "", line: int = 0) -> None:
        self.dn = dn
        self.ndn = ndn
        self.parent = parent
        self.file = file
        self.line = line
        #: Its position in the directory (LDIF order), set by the directory.
        self.seq = 0
        #: canonical name -> the name as first written
        self.names: dict[str, str] = {}
        #: canonical name -> values (bytes), in order, without duplicates
        self.attrs: dict[str, list[bytes]] = {}
        for name, value in attributes:
            canon = schema.canonical(name)
            values = self.attrs.get(canon)
            if values is None:
                self.names[canon] = name
                self.attrs[canon] = [value]
            elif value not in values:
                values.append(value)
        self.norms: dict[str, frozenset[bytes]] = {}
        for canon, values in self.attrs.items():
            kind = schema.attribute(canon).kind
            self.norms[canon] = frozenset(normalize(kind, v) for v in values)
        classes: set[bytes] = set()
        for oc in self.attrs.get("objectclass", ()):
            classes.update(c.encode() for c in schema.superclasses(oc.decode("utf-8", "replace").strip()))
        self.classes = frozenset(classes)
        self.encoded: dict[str, bytes] = {
            canon: codec.attribute(self.names[canon].encode(), values) for canon, values in self.attrs.items()}
        self.publicEncoded = b"".join(v for k, v in self.encoded.items() if k != SECRET)

    def __repr__(self) -> str:
        return f"<Entry {self.dn!r}>"

    def values(self, name: str) -> list[bytes]:
        return list(self.attrs.get(SCHEMA.canonical(name), ()))

    def get(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.attrs.get(SCHEMA.canonical(name), ())]

    def first(self, name: str) -> str | None:
        values = self.attrs.get(SCHEMA.canonical(name))
        return values[0].decode("utf-8", "replace") if values else None

    def attributeNames(self) -> list[str]:
        return list(self.names.values())

    def has(self, name: str) -> bool:
        return SCHEMA.canonical(name) in self.attrs
