"""
Writes to the directory (C{writable: true}): add, delete, modify and modify DN,
applied to a copy of the entries, checked as a loaded file is, saved to the LDIF
file atomically (written, fsync'd, renamed), and only then swapped in.

    store = LDIFStore(directory, path)
    store.apply(request)          # a codec Add/Del/Modify/ModDNRequest; raises WriteError(code, text)

The whole file is rewritten on every change (O(entries) per write): meant for the
directories netsvc serves -- a lab's, a course's, a few thousand entries -- not
for bulk loads.  Entries keep their order (a new entry goes last, a renamed one
stays where it was); the file keeps no comments.  Who may write is decided by
the server (L{isWriter}).
"""

from __future__ import annotations

import os
from pathlib import Path

from netsvc.ldap import ldifout
from netsvc.ldap.codec import AddRequest, DelRequest, ModDNRequest, ModifyRequest
from netsvc.ldap.directory import Directory, LoadError
from netsvc.ldap.dn import DNError, escapeValue, normalizeDN, parentDN, parseDN
from netsvc.ldap.entry import Entry
from netsvc.ldap.ldifload import Record
from netsvc.ldap.resultcodes import (
    ALREADY_EXISTS,
    ATTRIBUTE_OR_VALUE_EXISTS,
    INVALID_DN_SYNTAX,
    NO_SUCH_ATTRIBUTE,
    NO_SUCH_OBJECT,
    NOT_ALLOWED_ON_NON_LEAF,
    NOT_ALLOWED_ON_RDN,
    OBJECT_CLASS_VIOLATION,
    OTHER,
    UNWILLING,
)
from netsvc.ldap.schema import SCHEMA, normalize


class WriteError(Exception):
    def __init__(self, code: int, text: str = "", matched: str = "") -> None:
        super().__init__(text)
        self.code, self.text, self.matched = code, text, matched


def isWriter(directory: Directory, boundDN: str | None, writers: list[str]) -> bool:
    """Whether the bound identity (normalized DN) is one of C{writers} or a member of a group among them."""
    if boundDN is None:
        return False
    for w in writers:
        try:
            nw = normalizeDN(w)
        except DNError:
            continue
        if nw == boundDN:
            return True
        group = directory.entries.get(nw)
        if group is not None:
            members = group.norms.get("member", frozenset()) | group.norms.get("uniquemember", frozenset())
            if boundDN.encode() in members:
                return True
    return False


def _attributes(entry: Entry) -> list[tuple[str, list[bytes]]]:
    return [(entry.names[c], list(v)) for c, v in entry.attrs.items()]


def _flat(dn: str, attributes: list[tuple[str, list[bytes]]], old: Entry | None = None) -> Record:
    return Record(dn, [(n, v) for n, vs in attributes for v in vs], old.file if old else "(written)",
                  old.line if old else 0)


class LDIFStore:
    def __init__(self, directory: Directory, path: Path) -> None:
        self.directory = directory
        self.path = Path(path)

    def apply(self, request: object) -> None:
        """Apply one write; the file and the directory change together, or neither does."""
        records = self._changed(request)
        fresh = Directory(self.directory.suffix)
        try:
            fresh.add(records)
        except LoadError as e:  # what the checks above did not foresee
            raise WriteError(UNWILLING, e.reason) from None
        self._save(fresh)
        self.directory.replace(fresh)

    def _entry(self, dn: str) -> tuple[str, Entry]:
        try:
            ndn = normalizeDN(dn)
        except DNError as e:
            raise WriteError(INVALID_DN_SYNTAX, str(e)) from None
        entry = self.directory.entries.get(ndn)
        if entry is None:
            raise WriteError(NO_SUCH_OBJECT, matched=self._matched(ndn))
        return ndn, entry

    def _matched(self, ndn: str) -> str:
        parent = parentDN(ndn)
        while parent:
            e = self.directory.entries.get(parent)
            if e is not None:
                return e.dn
            parent = parentDN(parent)
        return ""

    def _changed(self, request: object) -> list[Record]:
        entries = self.directory.entries
        order = [(_flat(e.dn, _attributes(e), e), e.ndn) for e in self.directory.ordered]
        if isinstance(request, AddRequest):
            try:
                ndn = normalizeDN(request.dn)
                rdn = parseDN(request.dn)[0] if request.dn.strip() else []
            except DNError as e:
                raise WriteError(INVALID_DN_SYNTAX, str(e)) from None
            if ndn in entries:
                raise WriteError(ALREADY_EXISTS)
            parent = parentDN(ndn)
            if ndn != self.directory.nsuffix and (parent is None or parent not in entries):
                raise WriteError(NO_SUCH_OBJECT, "the parent entry does not exist", self._matched(ndn))
            attributes = [(n, list(vs)) for n, vs in request.attributes]
            if not any(SCHEMA.canonical(n) == "objectclass" and vs for n, vs in attributes):
                raise WriteError(OBJECT_CLASS_VIOLATION, "no objectClass")
            for attr, value in rdn:  # the RDN's values are part of the entry
                attributes = _withValue(attributes, attr, value.encode())
            return [r for r, _ in order] + [_flat(request.dn, attributes)]
        if isinstance(request, DelRequest):
            ndn, entry = self._entry(request.dn)
            if ndn in self.directory.children:
                raise WriteError(NOT_ALLOWED_ON_NON_LEAF, "the entry has subordinates")
            return [r for r, n in order if n != ndn]
        if isinstance(request, ModifyRequest):
            ndn, entry = self._entry(request.dn)
            attributes = _modified(entry, request.changes)
            return [_flat(entry.dn, attributes, entry) if n == ndn else r for r, n in order]
        if isinstance(request, ModDNRequest):
            return self._renamed(request, order)
        raise WriteError(UNWILLING, "not a write")

    def _renamed(self, request: ModDNRequest, order: list) -> list[Record]:
        ndn, entry = self._entry(request.dn)
        if ndn in self.directory.children:
            raise WriteError(NOT_ALLOWED_ON_NON_LEAF, "renaming an entry with subordinates is not supported")
        if request.newSuperior is not None:
            superior = request.newSuperior
        else:
            parent = parentDN(ndn)
            above = self.directory.entries.get(parent) if parent else None
            superior = above.dn if above is not None else ""
        try:
            newRDN = parseDN(request.newRDN)
            nsuperior = normalizeDN(superior)
        except DNError as e:
            raise WriteError(INVALID_DN_SYNTAX, str(e)) from None
        if len(newRDN) != 1:
            raise WriteError(INVALID_DN_SYNTAX, "the new RDN must be one RDN")
        if nsuperior not in self.directory.entries:  # (the root "" is not an entry either)
            raise WriteError(NO_SUCH_OBJECT, "the new superior does not exist")
        newDN = "+".join(f"{a}={escapeValue(v)}" for a, v in newRDN[0]) + (f",{superior}" if superior else "")
        newNDN = normalizeDN(newDN)
        if newNDN in self.directory.entries and newNDN != ndn:
            raise WriteError(ALREADY_EXISTS)
        attributes = _attributes(entry)
        if request.deleteOldRDN:
            oldRDN = parseDN(entry.dn)[0]
            newKeys = {(SCHEMA.canonical(a), normalize(SCHEMA.attribute(a).kind, v.encode())) for a, v in newRDN[0]}
            for attr, value in oldRDN:
                at = SCHEMA.attribute(attr)
                if (at.name.lower(), normalize(at.kind, value.encode())) not in newKeys:
                    attributes = _withoutValue(attributes, attr, value.encode())
        for attr, value in newRDN[0]:
            attributes = _withValue(attributes, attr, value.encode())
        return [_flat(newDN, attributes, entry) if n == ndn else r for r, n in order]

    def _save(self, directory: Directory) -> None:
        data = ldifout.manyLDIF(
            (e.dn, [(e.names[c], v) for c, v in e.attrs.items()]) for e in directory.ordered)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as e:
            raise WriteError(OTHER, f"cannot save the directory: {e.strerror}") from None


def _key(attr: str, value: bytes) -> tuple[str, bytes]:
    at = SCHEMA.attribute(attr)
    return at.name.lower(), normalize("ci" if at.name.lower() == "objectclass" else at.kind, value)


def _withValue(attributes: list, attr: str, value: bytes) -> list:
    canon, norm = _key(attr, value)
    for name, values in attributes:
        if SCHEMA.canonical(name) == canon:
            if all(_key(name, v)[1] != norm for v in values):
                values.append(value)
            return attributes
    return attributes + [(attr, [value])]


def _withoutValue(attributes: list, attr: str, value: bytes) -> list:
    canon, norm = _key(attr, value)
    out = []
    for name, values in attributes:
        if SCHEMA.canonical(name) == canon:
            values = [v for v in values if _key(name, v)[1] != norm]
        if values:
            out.append((name, values))
    return out


def _modified(entry: Entry, changes: list[tuple[int, str, list[bytes]]]) -> list:
    attributes = _attributes(entry)
    for operation, attr, values in changes:
        canon = SCHEMA.canonical(attr)
        present = next((vs for n, vs in attributes if SCHEMA.canonical(n) == canon), None)
        if operation == 0:  # add
            if not values:
                raise WriteError(UNWILLING, f"add of {attr} without values")
            for v in values:
                if present is not None and any(_key(attr, p)[1] == _key(attr, v)[1] for p in present):
                    raise WriteError(ATTRIBUTE_OR_VALUE_EXISTS, f"{attr}: value exists")
                attributes = _withValue(attributes, attr, v)
                present = next((vs for n, vs in attributes if SCHEMA.canonical(n) == canon), None)
        elif operation == 1:  # delete
            if present is None:
                raise WriteError(NO_SUCH_ATTRIBUTE, f"no {attr}")
            if not values:
                attributes = [(n, vs) for n, vs in attributes if SCHEMA.canonical(n) != canon]
            for v in values:
                if not any(_key(attr, p)[1] == _key(attr, v)[1] for p in present):
                    raise WriteError(NO_SUCH_ATTRIBUTE, f"{attr}: no such value")
                attributes = _withoutValue(attributes, attr, v)
        else:  # replace
            attributes = [(n, vs) for n, vs in attributes if SCHEMA.canonical(n) != canon]
            for v in values:
                attributes = _withValue(attributes, attr, v)
    if not any(SCHEMA.canonical(n) == "objectclass" for n, _ in attributes):
        raise WriteError(OBJECT_CLASS_VIOLATION, "objectClass may not be removed")
    for attr, value in parseDN(entry.dn)[0]:
        canon, norm = _key(attr, value.encode())
        if not any(SCHEMA.canonical(n) == canon and any(_key(n, v)[1] == norm for v in vs) for n, vs in attributes):
            raise WriteError(NOT_ALLOWED_ON_RDN, f"{attr}={value} is the entry's RDN")
    return attributes

