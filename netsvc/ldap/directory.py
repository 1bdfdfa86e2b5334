"""
The directory information tree: entries loaded from LDIF files, kept in memory,
indexed for equality lookups, searched by scope and filter.

    directory = Directory.load("dc=example,dc=com", [Path("example.ldif")])   # raises LoadError
    directory.get("uid=ann,ou=users,dc=example,dc=com")  -> Entry | None
    directory.search(base, scope, filter, maxScan, viewer)  -> iterator of Entry (LDIF order)

The Directory API other modules rely on (docs/LDAP.md, C{netsvc.ldap.authn}):
    context.directory.findUser(name, attribute="uid") -> Entry | None    sync, cheap, case-insensitive
    context.directory.checkPassword(dn, password)     -> Deferred[bool | auth.Refused]  never errbacks

L{Directory.replace} swaps in a reloaded tree in place, so that holders of the
object (authenticators, connections) see the new entries at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from netsvc import auth
from netsvc.ldap.dn import DNError, isWithin, normalizeDN, parentDN
from netsvc.ldap.entry import Entry
from netsvc.ldap.ldifload import LDIFError, parseLDIF
from netsvc.ldap.match import assertionKey, assertions, compileFilter
from netsvc.ldap.schema import SCHEMA, normalize

log = Logger()

#: Attributes with an equality index (canonical names).
INDEXED = ("objectclass", "uid", "cn", "sn", "mail", "givenname", "ou", "dc", "member", "uniquemember",
           "memberuid", "uidnumber", "gidnumber", "displayname", "employeenumber")

#: How many assertions of a filter testing one entry counts as examining one entry (max_scan).
ASSERTIONS_PER_SCAN = 8

#: userPassword schemes cheap enough (one salted SHA) to verify on the reactor thread.
_CHEAP = ("{SSHA}", "{SHA}", "{SSHA256}", "{SSHA512}")
#: What an unknown DN's password is checked against in a directory without passwords.
_DUMMY = "scrypt:" + "00" * 16 + ":" + "00" * 32


class LoadError(ValueError):
    """The LDIF cannot be served: C{.file} and C{.line} say where, C{.reason} what."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}: line {line}: {reason}" if line else f"{file}: {reason}")
        self.file, self.line, self.reason = file, line, reason


class ScanLimit(Exception):
    """A search examined more entries than its cost limit allows."""


def ldifFiles(paths: Iterable[Path]) -> list[Path]:
    """Files named, and the C{*.ldif} files of folders named (sorted by name)."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix == ".ldif" and q.is_file()))
        else:
            out.append(p)
    return out


class Directory:
    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.nsuffix = normalizeDN(suffix)
        #: Where slow password checks run (None: L{netsvc.auth.hashPool}).
        self.pool: auth.HashPool | None = None
        self._set({}, {}, {})

    def _set(self, entries: dict[str, Entry], children: dict[str, list[Entry]],
             index: dict[str, dict[bytes, list[Entry]]]) -> None:
        self.entries = entries
        self.children = children
        self.index = index
        #: Entries in LDIF order (what a subtree search of the suffix walks).
        self.ordered = list(entries.values())
        self.dummy = _dummyPassword(self.ordered)

    def __len__(self) -> int:
        return len(self.entries)

    # -- loading

    @classmethod
    def load(cls, suffix: str, paths: Iterable[Path]) -> Directory:
        """
        A directory of the entries in the LDIF files (or folders of them) C{paths}.

        @raise LoadError: a file cannot be read or parsed, an entry is outside
            C{suffix}, is there twice, or its parent is missing.
        """
        try:
            directory = cls(suffix)
        except DNError as e:
            raise LoadError("suffix", 0, f"not a DN: {e}") from None
        records = []
        for path in ldifFiles(paths):
            try:
                data = path.read_bytes()
            except OSError as e:
                raise LoadError(str(path), 0, f"cannot read: {e.strerror}") from None
            try:
                records.extend(parseLDIF(data, str(path)))
            except LDIFError as e:
                raise LoadError(e.file, e.line, e.reason) from None
        directory.add(records)
        return directory

    def add(self, records: Iterable) -> None:
        """Add parsed LDIF records (L{netsvc.ldap.ldifload.Record}); raises L{LoadError}."""
        entries = dict(self.entries)
        for r in records:
            ndn = normalizeDN(r.dn)
            if not isWithin(ndn, self.nsuffix):
                raise LoadError(r.file, r.line, f"entry {r.dn!r} is outside the suffix {self.suffix!r}")
            if ndn in entries:
                other = entries[ndn]
                raise LoadError(r.file, r.line, f"entry {r.dn!r} is already defined at {other.file}:{other.line}")
            if not any(n.lower() == "objectclass" for n, _ in r.attributes):
                raise LoadError(r.file, r.line, f"entry {r.dn!r} has no objectClass")
            parent = parentDN(ndn) if ndn != self.nsuffix else None
            entries[ndn] = Entry(r.dn, ndn, parent, r.attributes, SCHEMA, r.file, r.line)
        children: dict[str, list[Entry]] = {}
        for seq, e in enumerate(entries.values()):
            e.seq = seq
            if e.parent is None:
                continue
            if e.parent not in entries:
                raise LoadError(e.file, e.line, f"the parent of {e.dn!r} is not in the directory")
            children.setdefault(e.parent, []).append(e)
        index: dict[str, dict[bytes, list[Entry]]] = {a: {} for a in INDEXED}
        for e in entries.values():
            for attr in INDEXED:
                values = e.classes if attr == "objectclass" else e.norms.get(attr, ())
                for v in values:
                    index[attr].setdefault(v, []).append(e)
        self._set(entries, children, index)

    def replace(self, other: Directory) -> None:
        """Take C{other}'s suffix and entries (a reload), keeping this object."""
        self.suffix, self.nsuffix = other.suffix, other.nsuffix
        self._set(other.entries, other.children, other.index)

    # -- lookups

    def get(self, dn: str) -> Entry | None:
        """The entry called C{dn} (any spelling), or None (also for a DN that does not parse)."""
        try:
            return self.entries.get(normalizeDN(dn))
        except DNError:
            return None

    def hasChildren(self, entry: Entry) -> bool:
        return entry.ndn in self.children

    def findUser(self, name: str, attribute: str = "uid") -> Entry | None:
        """
        The one entry whose C{attribute} equals C{name} under the attribute's
        equality rule (case-insensitive for uid, mail, cn); None when there is
        none, or more than one (an ambiguous name never authenticates).
        """
        at = SCHEMA.attribute(attribute)
        canon = at.name.lower()
        value = normalize(at.kind, name.encode("utf-8"))
        if canon in self.index:
            found = self.index[canon].get(value, [])
        else:
            found = [e for e in self.ordered if value in e.norms.get(canon, ())]
        if len(found) == 1:
            return found[0]
        if found:
            log.warn("ldap: {count} entries have {attribute}={name}; none is used", count=len(found),
                     attribute=attribute, name=name)
        return None

    def checkPassword(self, dn: str, password: str) -> defer.Deferred:
        """
        Whether C{password} matches one of the C{userPassword} values of entry
        C{dn} (any scheme L{netsvc.auth.verifyPassword} knows; cleartext values
        too, as in LDAP).  Salted-SHA values are checked at once (microseconds);
        anything else (scrypt, crypt) in the hashing pool (L{netsvc.auth.hashPool},
        never the reactor's default pool); when its queue is full the answer is
        L{netsvc.auth.Refused}C{("busy")} (falsy), nothing hashed.  Never errbacks.

        An unknown DN (or an entry without a password) gives False after the same
        work as a wrong password: a check of one of the directory's own values of
        its most common scheme (L{_dummyPassword}), on the same path.
        """
        entry = self.get(dn)
        stored = [v.decode("utf-8", "replace") for v in entry.attrs.get("userpassword", ())] if entry else []
        if not password:
            return defer.succeed(False)
        work = stored or [self.dummy]
        if all(s[:s.find("}") + 1].upper() in _CHEAP for s in work):
            ok = _verifyAny(password, work)
            return defer.succeed(ok and bool(stored))
        d = (self.pool or auth.hashPool()).tryRun(_verifyAny, password, work)
        if not stored:
            d.addCallback(lambda ok: ok if isinstance(ok, auth.Refused) else False)
        return d

    # -- search

    def search(self, base: str, scope: int, flt: tuple, maxScan: int = 0,
               viewer: str | None = None) -> Iterator[Entry]:
        """
        The entries in scope (0 base, 1 one level, 2 subtree, 3 subtree without
        the base, of the normalized C{base}) that match C{flt} as C{viewer} (a normalized DN, None: anonymous)
        may see them (L{netsvc.ldap.match}: userPassword), in LDIF order.  Indexes
        narrow the candidates when the filter allows; at most C{maxScan} candidates
        are examined (0: no limit) before L{ScanLimit} is raised -- an entry counts
        once per L{ASSERTIONS_PER_SCAN} assertions of the filter, so that a huge
        filter cannot hold the reactor where a small one could not.
        """
        test = compileFilter(flt, viewer)
        cost = -(-assertions(flt) // ASSERTIONS_PER_SCAN)
        candidates = _candidates(self.index, flt)
        if scope == 0:
            e = self.entries.get(base)
            pool: Iterable[Entry] = [e] if e is not None else []
        elif candidates is not None:
            pool = sorted(candidates, key=_seq) if len(candidates) > 1 else candidates
        elif scope == 1:
            pool = self.children.get(base, [])
        elif base == self.nsuffix:
            pool = self.ordered
        else:
            pool = self._subtree(base)
        scanned = 0
        for e in pool:
            scanned += cost
            if maxScan and scanned > maxScan:
                raise ScanLimit(scanned)
            if scope == 1 and e.parent != base:
                continue
            if scope >= 2 and not isWithin(e.ndn, base) or scope == 3 and e.ndn == base:
                continue
            if test(e):
                yield e

    def _subtree(self, base: str) -> Iterator[Entry]:
        top = self.entries.get(base)
        if top is None:
            return
        stack = [top]
        while stack:
            e = stack.pop()
            yield e
            stack.extend(reversed(self.children.get(e.ndn, ())))


def _seq(entry: Entry) -> int:
    return entry.seq


def costClass(stored: str) -> str:
    """
    What checking a password against C{stored} costs, as a name: its scheme,
    with the parameters that set the work for crypt(3) (C{{CRYPT}$6$rounds=...}).
    """
    if stored.startswith("scrypt:"):
        return "scrypt"
    scheme, brace, rest = stored.partition("}")
    if not brace or not scheme.startswith("{"):
        return "plain"
    scheme = scheme.upper() + "}"
    if scheme == "{SCRYPT}":
        return "scrypt"
    if scheme == "{CRYPT}":
        return scheme + "$".join(rest.split("$")[:-2])
    return scheme


def _dummyPassword(entries: list[Entry]) -> str:
    """
    A userPassword value of the directory's most common cost class (the first of
    them in LDIF order): what an unknown DN's password is checked against, so that
    it costs what a wrong password costs (the result is thrown away).
    """
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for e in entries:
        for v in e.attrs.get("userpassword", ()):
            stored = v.decode("utf-8", "replace")
            cls = costClass(stored)
            first.setdefault(cls, stored)
            counts[cls] = counts.get(cls, 0) + 1
    if not counts:
        return _DUMMY
    return first[max(counts, key=lambda c: counts[c])]


def _verifyAny(password: str, stored: list[str]) -> bool:
    ok = False
    for s in stored:
        ok = auth.verifyPassword(password, s, plain=True) or ok
    return ok


def _candidates(index: dict[str, dict[bytes, list[Entry]]], flt: tuple) -> list[Entry] | set[Entry] | None:
    """Entries that may match C{flt} according to the indexes, or None (any entry may)."""
    kind = flt[0]
    if kind == "eq" or kind == "approx":
        canon, value = assertionKey(flt[1], flt[2])
        table = index.get(canon)
        if table is None:
            return None
        return table.get(value, [])
    if kind == "and":
        best = None
        for sub in flt[1]:
            c = _candidates(index, sub)
            if c is not None and (best is None or len(c) < len(best)):
                best = c
        return best
    if kind == "or":
        union: set[Entry] = set()
        for sub in flt[1]:
            c = _candidates(index, sub)
            if c is None:
                return None
            union.update(c)
        return union
    return None
