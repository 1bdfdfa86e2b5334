"""
The Maildir++ store: the only code that touches mailbox files.

Layout (the one Dovecot and Courier use, so their tools can read it)::

    root/<user>/                      INBOX: cur/ new/ tmp/
    root/<user>/.Sent/                a folder: cur/ new/ tmp/ (+ maildirfolder)
    root/<user>/.Work.Projects/       "Work.Projects": hierarchy separator "."
    root/<user>/<folder>/netsvc-uidlist   UIDVALIDITY, UIDNEXT, uid -> key (+ keywords)
    root/<user>/subscriptions         subscribed folder names, one a line

Folder names are Unicode in this API; on disk they are IMAP modified UTF-7 (as
Dovecot stores them).  Messages are files named C{key:2,FLAGS} in cur/ (C{key} as
Dovecot makes them: C{time.M<usec>P<pid>Q<seq>.<host>,S=<size>}); the system
flags live in the name (\\Seen=S \\Answered=R \\Flagged=F \\Deleted=T \\Draft=D),
keywords in the uidlist.

Every method blocks (file system, fsync): callers run it in a thread
(C{deferToThread}), never on the reactor.  Several threads and several processes
(workers) may use one store at once: delivery is lock-free (tmp/ -> new/), UID
assignment and the uidlist are serialised by an C{flock} on C{netsvc-uidlist.lock}
plus a per-process lock.

Errors are L{MailboxError} (or a subclass): L{InvalidName}, L{NoSuchFolder},
L{FolderExists}, L{NoSuchMessage}.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)

__all__ = [
    "Maildirs", "Folder", "Message", "MailboxError", "InvalidName", "NoSuchFolder",
    "FolderExists", "NoSuchMessage", "SPECIAL_USE", "normaliseUser",
]

UIDLIST = "netsvc-uidlist"
#: In a user's mailbox: the last UIDVALIDITY given out (a new folder gets a larger one).
VALIDITY_MARK = "netsvc-uidvalidity"
LOCKFILE = "netsvc-uidlist.lock"
SUBSCRIPTIONS = "subscriptions"
SEPARATOR = "."
TMP_MAX_AGE = 36 * 3600  # seconds: a file in tmp/ older than this is a crashed writer's (the Maildir spec)

#: the folders every user gets, with their RFC 6154 attribute
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Archive": "\\Archive"}

_FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
_LETTER_FLAGS = {v: k for k, v in _FLAG_LETTERS.items()}
_SYSTEM_FLAGS = {f.lower(): f for f in _FLAG_LETTERS}
# an IMAP atom without the atom-specials, at most 64 characters
_KEYWORD = re.compile(r"[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]{1,64}")
_USER = re.compile(r"[a-z0-9_=+-][a-z0-9_.=+@-]{0,127}")
_MAX_KEYWORDS = 64
_FILE_NAME = re.compile(r"[!-~]{1,255}")  # message file names we list: printable ASCII, no space
_MAX_NAME = 200  # characters of a folder name


class MailboxError(Exception):
    """A mailbox operation failed (the message says why)."""


class InvalidName(MailboxError):
    """A user or folder name that is refused (path escapes, bad characters, too long)."""


class NoSuchFolder(MailboxError):
    """The folder does not exist."""


class FolderExists(MailboxError):
    """The folder already exists."""


class NoSuchMessage(MailboxError):
    """No message with that UID (it was removed, maybe by another session)."""


class Message:
    """One message's metadata: C{uid}, C{key}, C{size} (bytes), C{flags} (a frozenset
    of IMAP flag strings, keywords included), C{internaldate} (seconds since the epoch:
    the file's mtime, read on first use)."""

    __slots__ = ("uid", "key", "size", "flags", "_date", "name", "_dir")

    def __init__(self, uid: int, key: str, size: int, flags: frozenset[str], internaldate: float | None,
                 name: str, directory: str = "") -> None:
        self.uid = uid
        self.key = key
        self.size = size
        self.flags = flags
        self._date = internaldate
        self.name = name  # the file's name in cur/
        self._dir = directory  # cur/, for the mtime when it is asked for

    @property
    def internaldate(self) -> float:
        if self._date is None:
            try:
                self._date = os.stat(os.path.join(self._dir, self.name)).st_mtime
            except OSError:  # renamed by a flag change meanwhile: find it by its key
                self._date = 0.0
                try:
                    with os.scandir(self._dir) as it:
                        for e in it:
                            if e.name.partition(":")[0] == self.key:
                                self._date = e.stat().st_mtime
                                break
                except OSError:
                    pass
        return self._date

    def withFlags(self, flags: frozenset[str]) -> Message:
        """A copy with other flags."""
        return Message(self.uid, self.key, self.size, flags, self._date, self.name, self._dir)

    def __repr__(self) -> str:
        return f"<Message uid={self.uid} size={self.size} flags={sorted(self.flags)}>"


def normaliseUser(user: str) -> str:
    """
    C{user} as the store names it: lower-cased (as SMTP local delivery does).

    @raise InvalidName: empty, too long, a path escape (C{/}, C{..}, a leading dot)
        or characters outside C{[a-z0-9._=+@-]}.
    """
    name = user.lower()
    if not _USER.fullmatch(name) or ".." in name:
        raise InvalidName(f"invalid user name {user!r}")
    return name


def _encodeFolder(name: str) -> str:
    """The on-disk directory name of folder C{name} (not INBOX): C{.} + modified UTF-7."""
    return "." + name.encode("imap4-utf-7").decode("ascii")


def _checkFolderName(name: str) -> str:
    """
    C{name} validated: "INBOX" (any case) becomes "INBOX"; others must be
    non-empty components separated by C{.}, without C{/}, NUL, controls.

    @raise InvalidName: otherwise.
    """
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise InvalidName(f"invalid folder name {name!r}")
    if name.upper() == "INBOX":
        return "INBOX"
    if any(c in name for c in "/\\") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidName(f"invalid folder name {name!r}")
    parts = name.split(SEPARATOR)
    if any(not p or p.strip() != p for p in parts):
        raise InvalidName(f"invalid folder name {name!r}")
    if parts[0].upper() == "INBOX":
        # INBOX has no children here (Maildir++ keeps folders beside it)
        raise InvalidName(f"invalid folder name {name!r}: INBOX cannot have subfolders")
    if name.startswith("netsvc-"):
        raise InvalidName(f"invalid folder name {name!r}")
    if len(_encodeFolder(name)) > 255:  # the directory name on disk (ENAMETOOLONG was a traceback)
        raise InvalidName(f"folder name too long: {name[:40]!r}...")
    return name


def _splitName(filename: str) -> tuple[str, str]:
    """(key, info) of a file name in cur/."""
    key, sep, info = filename.partition(":")
    return key, info if sep else ""


def _flagsOf(info: str) -> set[str]:
    if not info.startswith("2,"):
        return set()
    return {_LETTER_FLAGS[c] for c in info[2:] if c in _LETTER_FLAGS}


def _infoFor(flags: Iterable[str], oldInfo: str = "") -> str:
    """The C{2,LETTERS} info for C{flags}, keeping letters we do not map (lower-case Dovecot keywords)."""
    letters = set()
    if oldInfo.startswith("2,"):
        letters = {c for c in oldInfo[2:] if c not in _LETTER_FLAGS}
    for f in flags:
        letter = _FLAG_LETTERS.get(_SYSTEM_FLAGS.get(f.lower(), ""))
        if letter:
            letters.add(letter)
    return "2," + "".join(sorted(letters))


def _splitFlags(flags: Iterable[str]) -> tuple[set[str], set[str]]:
    """(system flags, keywords) of C{flags}; \\Recent and unknown backslash flags are dropped.

    @raise MailboxError: a keyword that is not an atom, or too many."""
    system, keywords = set(), set()
    for f in flags:
        if f.startswith("\\"):
            canonical = _SYSTEM_FLAGS.get(f.lower())
            if canonical:
                system.add(canonical)
            continue
        if not _KEYWORD.fullmatch(f):
            raise MailboxError(f"invalid keyword {f!r}")
        keywords.add(f)
    if len(keywords) > _MAX_KEYWORDS:
        raise MailboxError("too many keywords")
    return system, keywords


_hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054") or "localhost"
_seqLock = threading.Lock()
_seq = 0


def _uniqueKey(size: int) -> str:
    """A new message key: C{time.M<usec>P<pid>Q<seq>.<host>,S=<size>} (Dovecot's form)."""
    global _seq
    with _seqLock:
        _seq += 1
        seq = _seq
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6):06d}P{os.getpid()}Q{seq}.{_hostname},S={size}"


_KEY_TIME = re.compile(r"(\d+)\.(?:M(\d+))?")


def _arrival(key: str) -> tuple:
    """A sort key putting keys in arrival order (seconds, microseconds from the name; then the name)."""
    m = _KEY_TIME.match(key)
    if not m:
        return (float("inf"), 0, key)
    return (int(m.group(1)), int(m.group(2) or 0), key)


def _fsyncDir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# in-process change counters, by folder path: bumped by every change this process makes
_generations: dict[str, int] = {}
_genLock = threading.Lock()
# one lock per folder path for the threads of this process (flock is per open file, not per thread)
_folderLocks: dict[str, threading.RLock] = {}
_flocks: dict[str, _Locked] = {}


def _bump(path: Path) -> None:
    with _genLock:
        _generations[str(path)] = _generations.get(str(path), 0) + 1


def _threadLock(path: Path) -> threading.RLock:
    with _genLock:
        lock = _folderLocks.get(str(path))
        if lock is None:
            lock = _folderLocks[str(path)] = threading.RLock()
        return lock


def _locked(path: Path) -> _Locked:
    """The folder's lock (one object per path, re-entrant in a thread)."""
    with _genLock:
        lock = _flocks.get(str(path))
        if lock is None:
            lock = _flocks[str(path)] = _Locked(path)
        return lock


class _Locked:
    """The folder's lock: this process's threads, then other processes (flock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.fd = -1
        self.depth = 0

    def __enter__(self) -> _Locked:
        self.lock.acquire()
        self.depth += 1
        if self.depth == 1:
            try:
                self.fd = os.open(self.path / LOCKFILE, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError as e:
                self.depth -= 1
                self.lock.release()
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1
                raise MailboxError(f"cannot lock folder: {e.strerror}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1
        self.lock.release()


class Folder:
    """
    One Maildir folder.  A Folder object is cheap; each session may hold its own
    (L{changed} compares against what I{this} object last listed).
    """

    def __init__(self, store: Maildirs, user: str, name: str, path: Path) -> None:
        self.store = store
        self.user = user
        self.name = name
        self.path = path
        self._cur = os.path.join(path, "cur")
        self._names: dict[int, str] = {}  # uid -> file name in cur/, from the last listing
        self._seen: tuple | None = None
        self._uidvalidity = 0
        self._uidnext = 1

    def __repr__(self) -> str:
        return f"<Folder {self.user}:{self.name}>"

    # -- change detection ------------------------------------------------------------------

    def generation(self) -> tuple:
        """A cheap, hashable token that differs after any change to the folder (3 stats)."""
        token = [_generations.get(str(self.path), 0)]
        for sub in ("new", "cur", UIDLIST):
            try:
                st = os.stat(self.path / sub)
                token += [st.st_mtime_ns, st.st_size, st.st_ino]
            except OSError:
                token += [0, 0, 0]
        return tuple(token)

    def changed(self) -> bool:
        """Whether the folder changed since this object last listed it (L{messages})."""
        return self._seen != self.generation()

    # -- the uidlist -------------------------------------------------------------------------

    def _readUidlist(self) -> tuple[int, int, dict[str, tuple[int, list[str]]]]:
        """(uidvalidity, uidnext, {key: (uid, keywords)}); uidvalidity 0 when missing or corrupt."""
        try:
            with open(self.path / UIDLIST, encoding="ascii") as f:
                head = f.readline().split()
                if len(head) != 4 or head[0] != UIDLIST or head[1] != "1":
                    return 0, 1, {}
                validity, uidnext = int(head[2]), int(head[3])
                entries: dict[str, tuple[int, list[str]]] = {}
                for line in f:
                    fields = line.split()
                    if len(fields) < 2:
                        continue
                    entries[fields[1]] = (int(fields[0]), fields[2:])
                return validity, uidnext, entries
        except FileNotFoundError:
            return 0, 1, {}
        except (ValueError, UnicodeDecodeError):
            return 0, 1, {}
        except OSError as e:
            raise MailboxError(f"cannot read {UIDLIST}: {e.strerror}") from None

    def _writeUidlist(self, validity: int, uidnext: int, entries: dict[str, tuple[int, list[str]]]) -> None:
        tmp = self.path / (UIDLIST + ".tmp")
        lines = [f"{UIDLIST} 1 {validity} {uidnext}\n"]
        for key, (uid, keywords) in sorted(entries.items(), key=lambda kv: kv[1][0]):
            lines.append(" ".join([str(uid), key, *keywords]) + "\n")
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.writelines(lines)
                if self.store.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path / UIDLIST)
            if self.store.fsync:
                _fsyncDir(self.path)
        except OSError as e:
            raise MailboxError(f"cannot write {UIDLIST}: {e.strerror}") from None
        _bump(self.path)

    def _newValidity(self) -> int:
        """
        A UIDVALIDITY this user's mailbox never gave out: max(now, the last one + 1), the last kept in
        C{netsvc-uidvalidity}.  (The time alone gave a folder deleted and made again -- or renamed and
        made again -- in the same second its old UIDVALIDITY: a client's cached UID 1 named another
        message; RFC 3501 2.3.1.1.)
        """
        home = self.path if self.name == "INBOX" else self.path.parent
        try:
            fd = os.open(home / VALIDITY_MARK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise MailboxError(f"cannot write {VALIDITY_MARK}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # (other folders of this user, other processes)
            try:
                last = int(os.pread(fd, 32, 0).strip() or 0)
            except ValueError:
                last = 0
            validity = max(int(time.time()), last + 1, 1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % validity, 0)
            if self.store.fsync:
                os.fsync(fd)
        except OSError as e:
            raise MailboxError(f"cannot write {VALIDITY_MARK}: {e.strerror}") from None
        finally:
            os.close(fd)
        return validity

    # -- listing -----------------------------------------------------------------------------

    def _scan(self) -> tuple[list[Message], int, int]:
        """Under the lock: new/ into cur/, UIDs for new keys, the uidlist saved when it changed."""
        generation = self.generation()
        validity, uidnext, entries = self._readUidlist()
        dirty = False
        if validity == 0:
            validity = self._newValidity()
            uidnext, entries, dirty = 1, {}, True
        cur, new = self.path / "cur", self.path / "new"
        moved = False
        try:
            with os.scandir(new) as it:
                for e in it:
                    if e.name.startswith(".") or not _FILE_NAME.fullmatch(e.name):
                        continue  # not a message name (a space or byte outside ASCII would break the uidlist)
                    key = _splitName(e.name)[0]
                    try:
                        os.rename(e.path, cur / (key + ":2,"))
                        moved = True
                    except FileNotFoundError:
                        pass  # another process took it
            names = []
            with os.scandir(cur) as it:
                for e in it:
                    if not e.name.startswith(".") and _FILE_NAME.fullmatch(e.name):
                        names.append(e.name)
        except OSError as e:
            raise MailboxError(f"cannot list folder {self.name}: {e.strerror}") from None
        if moved and self.store.fsync:
            _fsyncDir(cur)
            _fsyncDir(new)
        self._cleanTmp()
        byKey: dict[str, str] = {}
        for filename in names:
            byKey[_splitName(filename)[0]] = filename
        for key in [k for k in entries if k not in byKey]:
            del entries[key]
            dirty = True
        for key in sorted((k for k in byKey if k not in entries), key=_arrival):
            entries[key] = (uidnext, [])
            uidnext += 1
            dirty = True
        if dirty:
            self._writeUidlist(validity, uidnext, entries)
        messages = []
        curPath = self._cur
        flagCache: dict[str, frozenset[str]] = {}
        for key, (uid, keywords) in sorted(entries.items(), key=lambda kv: kv[1][0]):
            filename = byKey[key]
            info = filename[len(key) + 1:]
            size = _sizeFromKey(key)
            if size is None:  # not a name we made: ask the file
                try:
                    size = os.stat(os.path.join(curPath, filename)).st_size
                except FileNotFoundError:
                    continue  # flags changed (renamed) or removed meanwhile; the next listing has it
            flags = flagCache.get(info)
            if flags is None:
                flags = flagCache[info] = frozenset(_flagsOf(info))
            if keywords:
                flags = flags | frozenset(keywords)
            messages.append(Message(uid, key, size, flags, None, filename, curPath))
        self._uidvalidity, self._uidnext = validity, uidnext
        self._names = {m.uid: m.name for m in messages}
        self._seen = generation if not dirty and not moved else self.generation()
        return messages, validity, uidnext

    def _cleanTmp(self) -> None:
        """Remove what a crashed writer left in tmp/ (older than TMP_MAX_AGE, as the Maildir spec says)."""
        cutoff = time.time() - TMP_MAX_AGE
        try:
            with os.scandir(self.path / "tmp") as it:
                for e in it:
                    try:
                        if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(e.path)
                    except OSError:
                        continue
        except OSError:
            pass

    def messages(self) -> list[Message]:
        """
        Every message, sorted by UID (new/ is moved into cur/ first; new keys get
        the next UIDs, persisted).  Reads names and stats, never message contents.
        """
        with _locked(self.path):
            return self._scan()[0]

    @property
    def uidvalidity(self) -> int:
        """The folder's UIDVALIDITY (persisted; made when the folder is first listed)."""
        if not self._uidvalidity:
            self.messages()
        return self._uidvalidity

    @property
    def uidnext(self) -> int:
        """The UID the next message will get (as of the last listing)."""
        if not self._uidvalidity:
            self.messages()
        return self._uidnext

    # -- reading -----------------------------------------------------------------------------

    def _filename(self, uid: int) -> str:
        name = self._names.get(uid)
        if name is not None and os.path.exists(self.path / "cur" / name):
            return name
        self.messages()
        name = self._names.get(uid)
        if name is None:
            raise NoSuchMessage(f"no message with UID {uid} in {self.name}")
        return name

    def open(self, uid: int) -> BinaryIO:
        """
        The message's file, open for reading (the caller closes it).  For a UID of the last
        listing this takes no lock (it may run on a reactor): a file renamed meanwhile (flags
        changed elsewhere) is found again by its key.  @raise NoSuchMessage
        """
        name = self._names.get(uid)
        if name is not None:
            for _ in range(3):
                try:
                    return open(os.path.join(self._cur, name), "rb")
                except FileNotFoundError:
                    found = self._findKey(name.partition(":")[0])
                    if found is None:
                        raise NoSuchMessage(f"no message with UID {uid} in {self.name}") from None
                    self._names[uid] = name = found
                except OSError as e:
                    raise MailboxError(f"cannot read message {uid}: {e.strerror}") from None
        for _ in range(3):
            name = self._filename(uid)
            try:
                return open(os.path.join(self._cur, name), "rb")
            except FileNotFoundError:
                continue  # renamed by a flag change meanwhile
            except OSError as e:
                raise MailboxError(f"cannot read message {uid}: {e.strerror}") from None
        raise NoSuchMessage(f"no message with UID {uid} in {self.name}")

    def _findKey(self, key: str) -> str | None:
        """The name in cur/ of the message with C{key} now (a directory read, no lock), or None."""
        try:
            with os.scandir(self._cur) as it:
                for e in it:
                    if e.name.partition(":")[0] == key:
                        return e.name
        except OSError:
            pass
        return None

    def read(self, uid: int) -> bytes:
        """The message's bytes.  @raise NoSuchMessage"""
        with self.open(uid) as f:
            return f.read()

    # -- changing ----------------------------------------------------------------------------

    def setFlags(self, uid: int, flags: Iterable[str]) -> frozenset[str]:
        """
        Replace the message's flags with C{flags} (system flags in the file name,
        keywords in the uidlist; \\Recent ignored); returns the flags it now has.
        @raise NoSuchMessage, MailboxError
        """
        system, keywords = _splitFlags(flags)
        with _locked(self.path):
            name = self._filename(uid)
            key, info = _splitName(name)
            newName = key + ":" + _infoFor(system, info)
            if newName != name:
                try:
                    os.rename(self.path / "cur" / name, self.path / "cur" / newName)
                    if self.store.fsync:
                        _fsyncDir(self.path / "cur")  # the flags are durable before the answer
                except FileNotFoundError:
                    raise NoSuchMessage(f"no message with UID {uid} in {self.name}") from None
                except OSError as e:
                    raise MailboxError(f"cannot change the flags: {e.strerror}") from None
                self._names[uid] = newName
                _bump(self.path)
            validity, uidnext, entries = self._readUidlist()
            entry = entries.get(key)
            if entry is not None and set(entry[1]) != keywords:
                entries[key] = (entry[0], sorted(keywords))
                self._writeUidlist(validity, uidnext, entries)
        return frozenset(system | keywords)

    def remove(self, uids: Iterable[int]) -> list[int]:
        """Delete these messages for good; returns the UIDs removed (missing ones are skipped)."""
        removed = []
        with _locked(self.path):
            for uid in uids:
                try:
                    name = self._filename(uid)
                    os.unlink(self.path / "cur" / name)
                except (NoSuchMessage, FileNotFoundError):
                    continue
                except OSError as e:
                    raise MailboxError(f"cannot remove message {uid}: {e.strerror}") from None
                removed.append(uid)
            if removed:
                if self.store.fsync:
                    _fsyncDir(self.path / "cur")
                _bump(self.path)
                self._scan()
        return removed

    def append(self, data: bytes, flags: Iterable[str] = (), date: float | None = None) -> int:
        """
        Store C{data} as a new message with C{flags} and internal date C{date}
        (default now), durably; returns its UID.  @raise MailboxError
        """
        system, keywords = _splitFlags(flags)
        key = self.store._writeTmp(self.path, data, date)
        return self._adopt([(key, system, keywords)])[0]

    def _adopt(self, items: list[tuple[str, set[str], set[str]]]) -> list[int]:
        """Move tmp/<key> files into cur/ with their flags and give them UIDs (in order)."""
        uids = []
        with _locked(self.path):
            try:
                for key, system, _ in items:
                    os.rename(self.path / "tmp" / key, self.path / "cur" / (key + ":" + _infoFor(system)))
            except OSError as e:
                for key, _, _ in items:
                    _unlinkQuiet(self.path / "tmp" / key)
                raise MailboxError(f"cannot store message: {e.strerror}") from None
            if self.store.fsync:
                _fsyncDir(self.path / "cur")
            _bump(self.path)
            validity, uidnext, entries = self._readUidlist()
            if validity == 0:
                self._scan()
                validity, uidnext, entries = self._readUidlist()
            for key, _, keywords in items:
                if key in entries:  # a listing from another thread or process took it first
                    entries[key] = (entries[key][0], sorted(keywords))
                else:
                    entries[key] = (uidnext, sorted(keywords))
                    uidnext += 1
                uids.append(entries[key][0])
            self._writeUidlist(validity, uidnext, entries)
            self._scan()
        return uids

    def copy(self, uids: Iterable[int], dest: Folder) -> list[tuple[int, int]]:
        """
        Copy these messages (flags and keywords too) into C{dest}; returns
        [(source UID, new UID)] for those that still existed.  @raise MailboxError
        """
        items = []
        pairs = []
        try:
            with _locked(self.path):
                messages = {m.uid: m for m in self._scan()[0]}
                for uid in uids:
                    m = messages.get(uid)
                    if m is None:
                        continue
                    key = self.store._linkTmp(dest.path, self.path / "cur" / m.name, m.size)
                    system, keywords = _splitFlags(m.flags)
                    items.append((key, system, keywords))
                    pairs.append(uid)
        except BaseException:
            for key, _, _ in items:
                _unlinkQuiet(dest.path / "tmp" / key)
            raise
        if not items:
            return []
        return list(zip(pairs, dest._adopt(items), strict=True))

    def move(self, uids: Iterable[int], dest: Folder) -> list[tuple[int, int]]:
        """L{copy} then L{remove} of the copied ones; returns [(source UID, new UID)]."""
        pairs = self.copy(uids, dest)
        self.remove([s for s, _ in pairs])
        return pairs


def _sizeFromKey(key: str) -> int | None:
    i = key.find(",S=")
    if i < 0:
        return None
    digits = key[i + 3:].split(",", 1)[0]
    return int(digits) if digits.isdigit() else None


def _unlinkQuiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Maildirs:
    """
    Every user's Maildir++ under C{root} (C{root/<user>/}).  C{fsync=False} skips
    the fsyncs (tests only: a crash may then lose acknowledged mail).
    """

    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"<Maildirs {self.root}>"

    # -- paths -------------------------------------------------------------------------------

    def userPath(self, user: str) -> Path:
        """The user's Maildir (INBOX).  @raise InvalidName"""
        return self.root / normaliseUser(user)

    def exists(self, user: str) -> bool:
        """Whether the user's Maildir exists."""
        return (self.userPath(user) / "cur").is_dir()

    def _folderPath(self, user: str, name: str) -> tuple[str, Path]:
        name = _checkFolderName(name)
        base = self.userPath(user)
        return name, base if name == "INBOX" else base / _encodeFolder(name)

    def _makeMaildir(self, path: Path, folder: bool) -> None:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(path / sub, mode=0o700, exist_ok=True)
        if folder:
            (path / "maildirfolder").touch(mode=0o600)

    def _ensureUser(self, user: str) -> Path:
        base = self.userPath(user)
        # The subscriptions file is written last, once the folders are durable: a thread (or worker)
        # that sees it may deliver at once; one that does not makes (idempotently) and syncs them
        # itself, rather than acknowledge a copy in a Maildir whose own entry is not on disk yet.
        if (base / SUBSCRIPTIONS).exists():
            return base
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._makeMaildir(base, False)
            for name in SPECIAL_USE:
                self._makeMaildir(base / _encodeFolder(name), True)
            if self.fsync:
                _fsyncDir(base)
                _fsyncDir(self.root)
            if not (base / SUBSCRIPTIONS).exists():
                self._writeAtomic(base / SUBSCRIPTIONS, "".join(n + "\n" for n in ["INBOX", *SPECIAL_USE]))
                if self.fsync:
                    _fsyncDir(base)
        except OSError as e:
            raise MailboxError(f"cannot create the mailbox of {user}: {e.strerror}") from None
        return base

    def _writeAtomic(self, path: Path, text: str) -> None:
        # A temporary name of its own: two sessions (threads, workers) making the same new mailbox
        # shared one "NAME.tmp" and the second's rename found it gone.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- writing messages --------------------------------------------------------------------

    def _writeTmp(self, folder: Path, data: bytes, date: float | None = None) -> str:
        """C{data} into C{folder}/tmp/<new key>, fsync'd; the key.  Nothing is left on failure."""
        key = _uniqueKey(len(data))
        path = folder / "tmp" / key
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise MailboxError(f"cannot store message: {e.strerror}") from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if date is not None:
                os.utime(path, (date, date))
        except BaseException as e:
            _unlinkQuiet(path)
            if isinstance(e, OSError):
                raise MailboxError(f"cannot store message: {e.strerror}") from None
            raise
        return key

    def _linkTmp(self, folder: Path, source: Path, size: int) -> str:
        """A hard link (or a copy, across file systems) of C{source} as C{folder}/tmp/<new key>."""
        key = _uniqueKey(size)
        dest = folder / "tmp" / key
        try:
            os.link(source, dest)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise NoSuchMessage("the message was removed meanwhile") from None
            try:
                shutil.copy2(source, dest)
                if self.fsync:
                    with open(dest, "rb") as f:
                        os.fsync(f.fileno())
            except OSError as e2:
                _unlinkQuiet(dest)
                raise MailboxError(f"cannot copy message: {e2.strerror}") from None
        return key

    def deliver(self, user: str, data: bytes, folder: str = "INBOX") -> str:
        """
        Deliver C{data} to C{user}'s C{folder} (created, with the user's Maildir, when
        missing): tmp/ -> fsync -> new/ -> fsync new/.  Returns the message key once the
        message is durable.  On failure nothing is left in tmp/ and nothing appears in new/.

        @raise MailboxError: (L{InvalidName} for a bad user or folder name).
        """
        name, path = self._folderPath(user, folder)
        self._ensureUser(user)
        if name != "INBOX" and not (path / "cur").is_dir():
            self.createFolder(user, name)
        key = self._writeTmp(path, data)
        try:
            os.rename(path / "tmp" / key, path / "new" / key)
            if self.fsync:
                _fsyncDir(path / "new")
        except OSError as e:
            _unlinkQuiet(path / "tmp" / key)
            raise MailboxError(f"cannot deliver message: {e.strerror}") from None
        _bump(path)
        return key

    # -- folders -----------------------------------------------------------------------------

    def inbox(self, user: str) -> Folder:
        """C{user}'s INBOX (the Maildir is created when missing)."""
        return self.folder(user, "INBOX")

    def folder(self, user: str, name: str, create: bool = False) -> Folder:
        """
        C{user}'s folder C{name} (INBOX in any case).  @raise NoSuchFolder: it does
        not exist (and C{create} is false).  @raise InvalidName
        """
        name, path = self._folderPath(user, name)
        self._ensureUser(user)
        if not (path / "cur").is_dir():
            if not create:
                raise NoSuchFolder(f"no folder {name}")
            self.createFolder(user, name)
        return Folder(self, normaliseUser(user), name, path)

    def folders(self, user: str) -> list[str]:
        """C{user}'s folder names: "INBOX" first, then the others sorted."""
        base = self._ensureUser(user)
        names = []
        try:
            with os.scandir(base) as it:
                for e in it:
                    if e.name.startswith(".") and len(e.name) > 1 and e.is_dir() \
                            and os.path.isdir(os.path.join(e.path, "cur")):
                        try:
                            names.append(e.name[1:].encode("ascii").decode("imap4-utf-7"))
                        except (UnicodeError, ValueError):
                            continue  # not a name we made
        except OSError as e:
            raise MailboxError(f"cannot list folders: {e.strerror}") from None
        return ["INBOX", *sorted(names)]

    def createFolder(self, user: str, name: str) -> None:
        """Create folder C{name}, and its missing parents (RFC 3501).  @raise FolderExists, InvalidName, MailboxError"""
        name, path = self._folderPath(user, name)
        base = self._ensureUser(user)
        if name == "INBOX" or (path / "cur").is_dir():
            raise FolderExists(f"folder {name} exists")
        parts = name.split(SEPARATOR)
        for i in range(1, len(parts)):
            parent = SEPARATOR.join(parts[:i])
            if not (self._folderPath(user, parent)[1] / "cur").is_dir():
                try:
                    self.createFolder(user, parent)
                except FolderExists:
                    pass
        try:
            tmp = base / f".netsvc-new-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self._makeMaildir(tmp, True)
            os.rename(tmp, path)
            if self.fsync:
                _fsyncDir(base)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if (path / "cur").is_dir():
                raise FolderExists(f"folder {name} exists") from None
            raise MailboxError(f"cannot create folder {name}: {e.strerror}") from None

    def _children(self, user: str, name: str) -> list[str]:
        prefix = name + SEPARATOR
        return [n for n in self.folders(user) if n.startswith(prefix)]

    def deleteFolder(self, user: str, name: str) -> None:
        """
        Delete folder C{name} and its messages.  INBOX cannot be deleted, nor a
        folder with subfolders.  @raise NoSuchFolder, InvalidName, MailboxError
        """
        name, path = self._folderPath(user, name)
        base = self._ensureUser(user)
        if name == "INBOX":
            raise MailboxError("INBOX cannot be deleted")
        if not (path / "cur").is_dir():
            raise NoSuchFolder(f"no folder {name}")
        if self._children(user, name):
            raise MailboxError(f"folder {name} has subfolders")
        trash = base / f".netsvc-deleted-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            os.rename(path, trash)  # gone at once for everyone; the files go after
            if self.fsync:
                _fsyncDir(base)
        except OSError as e:
            raise MailboxError(f"cannot delete folder {name}: {e.strerror}") from None
        _bump(path)
        shutil.rmtree(trash, ignore_errors=True)
        self.unsubscribe(user, name)

    def renameFolder(self, user: str, old: str, new: str) -> None:
        """
        Rename folder C{old} (and its subfolders) to C{new}.  Renaming INBOX moves
        its messages into a new folder C{new} and leaves INBOX empty (RFC 3501).
        @raise NoSuchFolder, FolderExists, InvalidName, MailboxError
        """
        old, oldPath = self._folderPath(user, old)
        new, newPath = self._folderPath(user, new)
        self._ensureUser(user)
        if not (oldPath / "cur").is_dir():
            raise NoSuchFolder(f"no folder {old}")
        if new == "INBOX" or (newPath / "cur").is_dir():
            raise FolderExists(f"folder {new} exists")
        if old == "INBOX":
            self.createFolder(user, new)
            source = self.inbox(user)
            source.move([m.uid for m in source.messages()], self.folder(user, new))
            return
        if new.startswith(old + SEPARATOR):
            raise InvalidName(f"cannot move folder {old} into itself")
        renames = [(old, new)] + [(c, new + c[len(old):]) for c in self._children(user, old)]
        for _, target in renames:
            _checkFolderName(target)
            if (self._folderPath(user, target)[1] / "cur").is_dir():
                raise FolderExists(f"folder {target} exists")
        try:
            for source, target in renames:
                os.rename(self._folderPath(user, source)[1], self._folderPath(user, target)[1])
            if self.fsync:
                _fsyncDir(self.userPath(user))
        except OSError as e:
            raise MailboxError(f"cannot rename folder {old}: {e.strerror}") from None
        subscribed = self.subscriptions(user)
        changed = [new + n[len(old):] if n == old or n.startswith(old + SEPARATOR) else n for n in subscribed]
        if changed != subscribed:
            self._saveSubscriptions(user, changed)

    # -- subscriptions -----------------------------------------------------------------------

    def subscriptions(self, user: str) -> list[str]:
        """The folder names C{user} subscribed to (they may not exist)."""
        base = self._ensureUser(user)
        try:
            text = (base / SUBSCRIPTIONS).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise MailboxError(f"cannot read subscriptions: {e}") from None
        return [line for line in text.splitlines() if line]

    def _saveSubscriptions(self, user: str, names: list[str]) -> None:
        base = self._ensureUser(user)
        with _threadLock(base):
            try:
                self._writeAtomic(base / SUBSCRIPTIONS, "".join(n + "\n" for n in dict.fromkeys(names)))
            except OSError as e:
                raise MailboxError(f"cannot write subscriptions: {e.strerror}") from None

    def subscribe(self, user: str, name: str) -> None:
        """Add C{name} to C{user}'s subscriptions.  @raise InvalidName"""
        name = _checkFolderName(name)
        base = self._ensureUser(user)
        with _threadLock(base):
            names = self.subscriptions(user)
            if name not in names:
                self._saveSubscriptions(user, [*names, name])

    def unsubscribe(self, user: str, name: str) -> None:
        """Remove C{name} from C{user}'s subscriptions (no error when it was not there)."""
        name = _checkFolderName(name)
        base = self._ensureUser(user)
        with _threadLock(base):
            names = self.subscriptions(user)
            if name in names:
                self._saveSubscriptions(user, [n for n in names if n != name])
