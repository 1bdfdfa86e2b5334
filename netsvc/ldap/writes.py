"""
Writes to the directory (C{writable: true}): add, delete, modify and modify DN,
applied to a copy of the entries, checked as a loaded file is, saved to the LDIF
file atomically (written, fsync'd, renamed), and only then swapped in.

    store = LDIFStore(directory, path, reactor=reactor)
    d = store.submit(request)     # a codec Add/Del/Modify/ModDNRequest
    # fires (None) once the file is durable and the directory swapped; errbacks WriteError(code, text)

Writes are serialized (one at a time, in submission order: each is checked
against the directory as the previous one left it).  The check is made on the
reactor (it raises the protocol errors); rebuilding the directory, writing the
file, fsync and rename run off the reactor, by default in a thread pool of one
thread of the store's own (L{WriteRunner}) -- never the reactor's shared pool,
which carries other services' fsyncs -- so a client changing a password in a
loop delays nobody else's answers.  L{LDIFStore.apply} is the old synchronous
form (everything on the calling thread), kept for callers not yet moved.

The whole file is rewritten on every change (O(entries) per write): meant for the
directories netsvc serves -- a lab's, a course's, a few thousand entries -- not
for bulk loads.  Entries keep their order (a new entry goes last, a renamed one
stays where it was); the file keeps no comments.  Who may write is decided by
the server (L{isWriter}).
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from netsvc.ldap import ldifout
from netsvc.ldap.codec import AddRequest, DelRequest, ModDNRequest, ModifyRequest
from netsvc.ldap.directory import Directory, LoadError
from netsvc.ldap.dn import DNError, escapeValue, normalizeDN, parentDN, parseDN
from netsvc.ldap.entry import Entry
from netsvc.ldap.ldifload import Record
from netsvc.ldap.resultcodes import (
    ALREADY_EXISTS,
    ATTRIBUTE_OR_VALUE_EXISTS,
    BUSY,
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

log = Logger()


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


class WriteRunner:
    """
    Runs the stores' blocking work (rebuild, write, fsync, rename) in a pool of
    one thread of its own, started on first use and stopped when the reactor
    stops (or by L{stop}).  Called as C{runner(f, *args)} -> Deferred.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._pool: ThreadPool | None = None
        self._trigger: Any = None

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="ldap-writes")
            self._pool.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def stop(self) -> None:
        """Stop the thread (after the work queued); the next call starts one again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            if self.reactor.running and self._trigger is not None:
                self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
            pool.stop()


def writeDurably(path: Path, data: bytes) -> None:
    """Replace C{path} with C{data} atomically and durably (tmp file, fsync, rename, folder fsync); blocking."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class LDIFStore:
    """
    @param run: runs blocking work, C{run(f, *args)} -> Deferred of its result;
        default: a L{WriteRunner} of this store's (C{reactor} is then needed).
    @param write: the blocking durable write, C{write(path, data)}; default L{writeDurably}.
    """

    def __init__(self, directory: Directory, path: Path, reactor: Any = None,
                 run: Callable[..., defer.Deferred] | None = None,
                 write: Callable[[Path, bytes], None] = writeDurably) -> None:
        self.directory = directory
        self.path = Path(path)
        if run is None:
            if reactor is None:
                from twisted.internet import reactor
            run = WriteRunner(reactor)
        self.run = run
        self.write = write
        self._queue: deque[tuple[object, defer.Deferred]] = deque()
        self._busy = False  # a write is being worked out and saved
        self._starting = False  # in _next (a runner that answers at once must not recurse)

    def submit(self, request: object) -> defer.Deferred:
        """
        Queue one write.  The Deferred fires with None once the file holds it
        durably and the directory shows it (the file and the directory change
        together, or neither does); it errbacks with L{WriteError} (the request is
        wrong, or the file cannot be saved).
        """
        d: defer.Deferred = defer.Deferred()
        self._queue.append((request, d))
        if not self._busy:
            self._next()
        return d

    @property
    def pending(self) -> int:
        """Writes submitted and not yet answered."""
        return len(self._queue) + self._busy

    def _next(self) -> None:
        if self._starting:
            return
        self._starting = True
        try:
            while self._queue and not self._busy:
                request, d = self._queue.popleft()
                self._busy = True
                snapshot = copy.copy(self.directory)  # its tables are replaced on a change, never changed in place
                try:
                    done = self.run(self._applyTo, snapshot, request)
                except Exception:  # (a runner that cannot start: the reactor is stopping)
                    done = defer.fail()
                done.addCallbacks(self._saved, self._failed, callbackArgs=(d,), errbackArgs=(d,))
        finally:
            self._starting = False

    def _saved(self, fresh: Directory, d: defer.Deferred) -> None:
        self.directory.replace(fresh)
        self._finish(d, None)

    def _failed(self, f: Any, d: defer.Deferred) -> None:
        if f.check(WriteError):
            error = f.value
        else:
            log.failure("ldap: saving a write failed", f)
            error = WriteError(OTHER, f"internal error: {f.type.__name__}")
        self._finish(d, error)

    def _finish(self, d: defer.Deferred, error: WriteError | None) -> None:
        self._busy = False
        try:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)
        finally:
            self._next()

    def _applyTo(self, directory: Directory, request: object) -> Directory:
        """Off the reactor: the new directory (C{directory} changed by C{request}), saved; raises L{WriteError}."""
        fresh = _rebuild(directory.suffix, _Change(directory).records(request))
        self._save(fresh)
        return fresh

    def apply(self, request: object) -> None:
        """
        The synchronous form of L{submit}, all on the calling thread (it blocks the
        reactor for the rebuild and the fsync: prefer L{submit}).  Raises
        L{WriteError}; BUSY while submitted writes are in progress.
        """
        if self.pending:
            raise WriteError(BUSY, "another change is being saved; try again")
        fresh = _rebuild(self.directory.suffix, _Change(self.directory).records(request))
        self._save(fresh)
        self.directory.replace(fresh)

    def _save(self, directory: Directory) -> None:
        data = ldifout.manyLDIF(
            (e.dn, [(e.names[c], v) for c, v in e.attrs.items()]) for e in directory.ordered)
        try:
            self.write(self.path, data)
        except OSError as e:
            raise WriteError(OTHER, f"cannot save the directory: {e.strerror}") from None


def _rebuild(suffix: str, records: list[Record]) -> Directory:
    fresh = Directory(suffix)
    try:
        fresh.add(records)
    except LoadError as e:  # what the checks made before did not foresee
        raise WriteError(UNWILLING, e.reason) from None
    return fresh


class _Change:
    """Works out one write against C{directory} (a snapshot: safe off the reactor, nothing is changed)."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

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

    def records(self, request: object) -> list[Record]:
        """The records of the directory with C{request} applied; raises L{WriteError}."""
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

