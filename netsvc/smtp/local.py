"""
Local delivery: mail for the local domains goes to the users' Maildirs.

    router = LocalRouter(["lab.test"], {"postmaster": ("dev",)}, users)  # users: an Authenticator
    router.resolve("Bob+news@LAB.test")  -> Resolution(mailboxes=[Mailbox("bob", "bob+news@lab.test")], remote=[])
    router.resolve("nobody@lab.test")    -> raises UnknownRecipient (550 5.1.1 at RCPT)
    router.resolve("x@example.org")      -> None (not local: the relay's routes, as before)

    local = LocalDelivery(router, maildirs, metrics, reactor)
    d = local.deliver(incoming, sender, mailboxes)   # fires [(user, key)] once every copy is in new/

Who is local (L{LocalRouter}).  A recipient is local when its domain is one of
C{domains} (compared case-insensitively), or it is the bare C{postmaster}
(RFC 5321 4.1.1.3).  Its local part is compared case-insensitively (the users
file and LDAP names are), a quoted local part is unquoted first, and
C{bob+tag} is bob's unless a user or alias is called C{bob+tag} (Postfix's
recipient_delimiter).  A name is local when the user source (C{users:}, the
same as SMTP AUTH: L{netsvc.auth.Authenticator.isReserved}) knows it, or it is
an alias.  An alias expands to names (users or further aliases), to addresses
at a local domain (the same as their names: every local domain shares one set
of users, as Postfix's mydestination), or to other addresses, which are queued
and relayed by the relay's routes (forwarding, as /etc/aliases does).  A name
that lists itself (C{dev: [dev, dev@elsewhere.example]}) means its own mailbox.
Alias loops and expansions past L{MAX_EXPANSION} addresses are configuration
problems (L{aliasProblems}); so is a missing C{postmaster} alias (RFC 5321
4.5.1: postmaster must be deliverable; C{postmaster: postmaster} names a user
of that name).  An alias that leads to a name the user source does not know is
refused at RCPT like an unknown user (and logged: the configuration is wrong).

Each mailbox gets one copy per message however many recipients lead to it,
with C{Return-Path: <sender>} and C{Delivered-To: <address>} (the first
recipient address that led to the mailbox, domain lower-cased; as Postfix's
local(8)) before the Received header.

Durability (L{LocalDelivery.deliver}): the message the session wrote to the
queue's tmp file is read back and written to every mailbox through the store
(L{netsvc.mailbox.maildir.Maildirs.deliver}: tmp/, fsync, rename into new/,
the folder fsync'd) in the reactor's thread pool (the pool the queue's fsyncs
use), before the session answers 250.  All or nothing: if one copy fails, the
copies already written are removed again and the session answers 451 4.3.0.
The session then commits the remaining (remote) recipients to the queue; if
that fails, the local copies are removed too (local copies can be taken back, a
relayed message cannot: that is why they are written first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger()

#: Addresses one alias may expand to, at most (a configuration problem beyond it).
MAX_EXPANSION = 1000
#: Alias levels followed, at most.
MAX_DEPTH = 20
#: A mailbox name that is safe as one folder name (no path separators, no leading dot, no controls).
_SAFE_NAME = re.compile(r"^[^\s/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]{0,254}$")


@attrs.frozen
class Mailbox:
    """One local mailbox to write a copy to: C{user} (its folder's name) and the C{Delivered-To} address."""

    user: str
    address: str


@attrs.frozen
class Resolution:
    """What a local recipient leads to: mailboxes, and addresses elsewhere (alias forwarding)."""

    mailboxes: list[Mailbox]
    remote: list[str]


class UnknownRecipient(Exception):
    """No such local user (RCPT: 550 5.1.1)."""

    def __init__(self, address: str, why: str = "") -> None:
        super().__init__(why or f"{address}: no such user")
        self.address = address


class LookupPending(Exception):
    """
    The user source cannot say yet whether a name is a user (a directory whose names have not loaded
    since the start): RCPT gets 451 4.3.0, as Postfix answers a failed table lookup, so the sender tries
    again instead of bouncing mail for a user who exists.
    """


class AliasLoop(ValueError):
    """An alias leads back to itself, goes too deep, or expands too far (a configuration problem)."""

    def __init__(self, message: str, cycle: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        #: The names on the loop (empty: not a loop).
        self.cycle = cycle


def splitAddress(address: str) -> tuple[str, str]:
    """C{local@domain} -> (local part unquoted, lower-cased domain); C{postmaster} -> ("postmaster", "")."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain.lower()


class _Aliases:
    """The alias table, normalised: lower-case names -> targets (names or lower-case-domain addresses)."""

    def __init__(self, aliases: Mapping[str, Sequence[str]], domains: Iterable[str], delimiter: str) -> None:
        self.domains = {d.lower() for d in domains}
        self.delimiter = delimiter
        self.table: dict[str, list[str]] = {}
        for name, targets in aliases.items():
            self.table[name.lower()] = list(targets)

    def localName(self, target: str) -> str | None:
        """The local name C{target} means (a bare name, or an address at a local domain), else None."""
        local, domain = splitAddress(target)
        if "@" in target and domain not in self.domains:
            return None
        return local.lower()

    def expand(self, name: str, domain: str) -> tuple[list[Mailbox], list[str]]:
        """
        (mailboxes, remote addresses) that local C{name} (already lower-case, an
        alias) leads to; C{domain} makes the Delivered-To addresses.

        @raise AliasLoop: a loop, more than MAX_DEPTH levels or MAX_EXPANSION addresses.
        """
        mailboxes: dict[str, Mailbox] = {}
        remote: dict[str, None] = {}

        def walk(current: str, path: tuple[str, ...]) -> None:
            if len(path) > MAX_DEPTH:
                raise AliasLoop(f"alias {path[0]} goes deeper than {MAX_DEPTH} levels")
            for target in self.table[current]:
                if len(mailboxes) + len(remote) > MAX_EXPANSION:
                    raise AliasLoop(f"alias {path[0]} expands to more than {MAX_EXPANSION} addresses")
                local = self.localName(target)
                if local is None:
                    remote.setdefault(target, None)
                    continue
                key = self.baseName(local)
                if key == current or key not in self.table:  # itself (its own mailbox), or a user
                    mailboxes.setdefault(key, Mailbox(key, f"{local}@{domain}" if domain else local))
                elif key in path:
                    names = (*path[path.index(key):], current)
                    raise AliasLoop(f"alias loop: {' -> '.join((*names, key))}", frozenset(names))
                else:
                    walk(key, (*path, current))

        walk(name, ())
        return list(mailboxes.values()), list(remote)

    def baseName(self, local: str) -> str:
        """C{local} if it is an alias, else without its C{+tag} when that is an alias (users: L{LocalRouter})."""
        if local in self.table or not self.delimiter:
            return local
        base = local.split(self.delimiter, 1)[0]
        return base if base in self.table else local


def aliasProblems(aliases: Mapping[str, Sequence[str]], domains: Sequence[str],
                  delimiter: str = "+") -> list[tuple[str, str]]:
    """
    Configuration problems of an alias table (key path under C{local}, reason):
    bad names or targets, loops, oversized expansions, no C{postmaster}.
    """
    from netsvc.smtp.syntax import SyntaxProblem, checkMailbox

    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name, targets in aliases.items():
        key = f"aliases.{name}"
        if not _SAFE_NAME.match(name) or "@" in name or name.lower() in seen:
            problems.append((key, f"{name!r} is not an alias name (a local part without @, once)"
                             if name.lower() not in seen else f"the same name as {seen[name.lower()]!r}"))
        seen.setdefault(name.lower(), name)
        for target in targets:
            if "@" in target:
                try:
                    checkMailbox(target, sender=False)
                except SyntaxProblem:
                    problems.append((key, f"{target!r} is not an address"))
            elif not _SAFE_NAME.match(target):
                problems.append((key, f"{target!r} is not a user name or an address"))
    if problems:
        return problems
    table = _Aliases(aliases, domains, delimiter)
    loops: set[frozenset[str]] = set()
    for name in table.table:
        try:
            table.expand(name, "")
        except AliasLoop as e:
            if e.cycle and e.cycle in loops:
                continue  # said once, at its first name
            loops.add(e.cycle)
            problems.append((f"aliases.{seen[name]}", str(e)))
    if "postmaster" not in table.table:
        problems.append(("aliases", "postmaster must be deliverable (RFC 5321 4.5.1): add postmaster: <user> "
                                    "(or postmaster: postmaster for a user of that name)"))
    return problems


class LocalRouter:
    """
    Which recipients are local, and where their mail goes (see the module docstring).

    @param users: an L{netsvc.auth.Authenticator} (its C{isReserved} says who exists).
    """

    def __init__(self, domains: Sequence[str], aliases: Mapping[str, Sequence[str]], users: Any,
                 delimiter: str = "+") -> None:
        self.domains = [d.lower() for d in domains]
        self._domains = set(self.domains)
        self.aliases = _Aliases(aliases, domains, delimiter)
        self.users = users
        self.delimiter = delimiter

    def unknownTargets(self) -> list[tuple[str, str]]:
        """(alias, user) for every alias leading to a name the user source does not know now (to warn at start)."""
        out = []
        for name in sorted(self.aliases.table):
            try:
                mailboxes, _ = self.aliases.expand(name, "")
            except AliasLoop:
                continue
            out += [(name, m.user) for m in mailboxes if not self._isUser(m.user)]
        return out

    def isLocal(self, address: str) -> bool:
        _, domain = splitAddress(address)
        return domain in self._domains if "@" in address else address.lower() == "postmaster"

    def resolve(self, address: str) -> Resolution | None:
        """
        None if C{address} is not local; else where it leads.

        @raise UnknownRecipient: no user or alias of that name, or an alias that leads to an unknown user.
        @raise LookupPending: the user source has not loaded its names yet.
        """
        if not self.isLocal(address):
            return None
        local, domain = splitAddress(address)
        local = local.lower()
        domain = domain or self.domains[0]
        name = self._name(local)
        if name is None:
            raise UnknownRecipient(address)
        if name in self.aliases.table:
            try:
                mailboxes, remote = self.aliases.expand(name, domain)
            except AliasLoop as e:  # the table was checked when loaded; be safe anyway
                log.error("smtp local: {address}: {error}", address=address, error=str(e))
                raise UnknownRecipient(address, str(e)) from None
            for mailbox in mailboxes:
                if not self._isUser(mailbox.user):
                    log.error("smtp local: alias {alias} leads to {user}, which is not a user of services.smtp.users",
                              alias=name, user=mailbox.user)
                    raise UnknownRecipient(address, f"{address}: alias {name} leads to an unknown user")
            return Resolution(mailboxes, remote)
        return Resolution([Mailbox(name, f"{local}@{domain}")], [])

    def _name(self, local: str) -> str | None:
        """The alias or user C{local} (lower-case) names: itself, else without its tag; None if neither is."""
        candidates = [local]
        if self.delimiter and self.delimiter in local[1:]:
            candidates.append(local.split(self.delimiter, 1)[0])
        for name in candidates:
            if name in self.aliases.table or self._isUser(name):
                return name
        return None

    def _isUser(self, name: str) -> bool:
        """A user of the user source whose name the store takes as a mailbox name."""
        if self.users is None:
            return False
        if not self.users.isReserved(name):
            if getattr(self.users, "namesLoaded", True) is False:
                raise LookupPending(name)
            return False
        from netsvc.mailbox.maildir import InvalidName, normaliseUser

        try:
            normaliseUser(name)
        except InvalidName:
            log.warn("smtp local: user {user} cannot have a mailbox (its name is not one the store takes)", user=name)
            return False
        return True


class LocalMetrics:
    """Local delivery counters: mailbox copies by result, and their bytes."""

    def __init__(self, registry: Any, service: str = "smtp") -> None:
        family = registry.counter("netsvc_smtp_local_deliveries_total",
                                  "Copies written to local mailboxes (delivered) or not (failed).",
                                  ["service", "result"])
        self.delivered = family.labels(service=service, result="delivered")
        self.failed = family.labels(service=service, result="failed")
        self.bytes = registry.counter("netsvc_smtp_local_bytes_total", "Bytes written to local mailboxes.",
                                      ["service"]).labels(service=service)


class _FileSource:
    """A queued message's file, read (in the thread) by L{LocalDelivery._deliver}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def contents(self) -> bytes:
        return self.path.read_bytes()


def forwardedNotify(notify: str | None, resolution: Resolution) -> str | None:
    """
    The NOTIFY of the addresses an alias forwards to: the recipient's own for an alias of one; for an
    alias of several, without SUCCESS (its success is the "expanded" report, RFC 3461 6.2.7.3, as
    Postfix does), NEVER when nothing is left.
    """
    if not notify or len(resolution.mailboxes) + len(resolution.remote) <= 1:
        return notify
    kept = [n for n in (part.strip() for part in notify.split(",")) if n.upper() != "SUCCESS"]
    return ",".join(kept) if kept else "NEVER"


class _BytesSource:
    """A message in memory (a report netsvc wrote), for L{LocalDelivery.deliver}."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def contents(self) -> bytes:
        return self.data


def traceHeaders(sender: str, mailbox: Mailbox) -> bytes:
    """C{Return-Path} and C{Delivered-To} for one mailbox's copy."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {mailbox.address}\r\n".encode()


class LocalDelivery:
    """
    Writes accepted messages to local mailboxes through the store (see the
    module docstring for the all-or-nothing contract).

    @param store: a L{netsvc.mailbox.maildir.Maildirs} (C{deliver(user, data) -> key}; C{inbox(user)}
        to take a copy back: C{messages()}, C{remove(uids)}).
    """

    #: Capture mode's copy: the local user whose INBOX gets every captured message, or None.
    captured: str | None = None

    def __init__(self, router: LocalRouter, store: Any, metrics: LocalMetrics, reactor: Any,
                 run: Callable[..., defer.Deferred] | None = None) -> None:
        self.router = router
        self.store = store
        self.metrics = metrics
        self.reactor = reactor
        #: Runs the blocking store work: the reactor's thread pool (tests may run it at once).
        self._run = run or (lambda f, *args: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args))

    def deliver(self, incoming: Any, sender: str, mailboxes: Sequence[Mailbox]) -> defer.Deferred:
        """
        Write the message C{incoming} holds (an L{netsvc.smtp.queue.IncomingMessage},
        still uncommitted) to each mailbox, in a thread.  Fires with [(user, key)]
        once every copy is durable in new/; on any failure every copy written is
        removed and it fails.
        """
        d = self._run(self._deliver, incoming, sender, list(mailboxes))

        def done(result: Any) -> Any:
            if isinstance(result, tuple):
                written, size = result
                self.metrics.delivered.inc(len(written))
                self.metrics.bytes.inc(size)
                return written
            self.metrics.failed.inc(len(mailboxes))
            return result

        return d.addBoth(done)

    def _deliver(self, incoming: Any, sender: str, mailboxes: list[Mailbox]) -> tuple[list[tuple[str, str]], int]:
        """(A thread.)  See L{deliver}; returns ([(user, key)], bytes written)."""
        data = incoming.contents()
        written: list[tuple[str, str]] = []
        size = 0
        try:
            for mailbox in mailboxes:
                copy = traceHeaders(sender, mailbox) + data
                # (the store's first delivery makes the Maildir; threads and workers may race to: it is safe)
                key = self.store.deliver(mailbox.user, copy)
                written.append((mailbox.user, key))
                size += len(copy)
        except BaseException:
            self._remove(written)
            raise
        return written, size

    def deliverReport(self, data: bytes, mailboxes: Sequence[Mailbox]) -> defer.Deferred:
        """A report from C{<>} (bytes) written to C{mailboxes}, as L{deliver} writes a message."""
        return self.deliver(_BytesSource(data), "", mailboxes)

    def headers(self, incoming: Any) -> defer.Deferred:
        """The header block of the message C{incoming} holds (for a success report), read in a thread."""
        return self._run(incoming.head)

    @defer.inlineCallbacks
    def deliverQueued(self, path: Path, envelope: Any, indexes: Sequence[int], queue: Any) -> Any:
        """
        Queued mail for local recipients (bounces and delay warnings to a local
        sender, mail queued before its domain was local): recipients
        C{envelope.recipients[i]} for i in C{indexes}, the message in C{path}.
        Fires with the outcomes L{netsvc.smtp.outcomes.Outcomes.groupAnswered}
        takes: "sent" once every copy is durable (and what aliases forward is
        queued again as a new message), "fail" 5.1.1 for an unknown user,
        "defer" 4.3.0 when a mailbox cannot be written (no copy kept).
        """
        from netsvc.smtp.queue import Recipient

        outcomes: list[tuple[int, str, Any]] = []
        mailboxes: dict[str, Mailbox] = {}
        forwards: list[Any] = []
        resolved = []
        for i in indexes:
            r = envelope.recipients[i]
            try:
                resolution = self.router.resolve(r.address)
            except UnknownRecipient as e:
                outcomes.append((i, "fail", ("5.1.1", f"x-netsvc; {e}", None)))
                continue
            except LookupPending:
                outcomes.append((i, "defer", ("4.3.0", "the user source has not loaded its names yet")))
                continue
            if resolution is None:  # (grouped as local: cannot happen)
                outcomes.append((i, "defer", ("4.3.5", f"{r.address} is not local")))
                continue
            resolved.append(i)
            for mailbox in resolution.mailboxes:
                mailboxes.setdefault(mailbox.user, mailbox)
            notify = forwardedNotify(r.notify, resolution)
            forwards += [Recipient(address=a, notify=notify, orcpt=r.orcpt or f"rfc822;{r.address}")
                         for a in resolution.remote]
        if not resolved:
            return outcomes
        written: list[tuple[str, str]] = []
        try:
            written = yield self.deliver(_FileSource(path), envelope.sender, list(mailboxes.values()))
            if forwards:
                data = yield self._run(path.read_bytes)
                yield queue.enqueueBytes(envelope.sender, forwards, data, dsn=envelope.dsn)
        except Exception as e:
            log.error("smtp local: queued {id}: {error}", id=envelope.id, error=str(e))
            if written:
                yield self.undo(written)
            return outcomes + [(i, "defer", ("4.3.0", f"local delivery failed: {e}")) for i in resolved]
        log.info("delivery {id}: delivered to local mailboxes {users}", id=envelope.id,
                 users=", ".join(sorted(mailboxes)))
        return outcomes + [(i, "sent", "delivered to a local mailbox") for i in resolved]

    def undo(self, written: Sequence[tuple[str, str]]) -> defer.Deferred:
        """Remove copies L{deliver} wrote (the queue commit that should follow failed); in a thread."""
        return self._run(self._remove, list(written))

    def _remove(self, written: Sequence[tuple[str, str]]) -> None:
        for user, key in written:
            try:
                inbox = self.store.inbox(user)
                inbox.remove([m.uid for m in inbox.messages() if m.key == key])
            except Exception as e:
                log.error("smtp local: cannot take back {key} from {user}'s mailbox: {error}",
                          key=key, user=user, error=str(e))
