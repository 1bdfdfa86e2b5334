"""
The durable mail queue: a message is acknowledged only once it is on disk.

On disk under the queue folder:
  - C{tmp/}: C{<id>.msg} and C{<id>.env} being written (C{tmp/<index>/} for worker
    C{index} of C{workers: N}: each writer has its own).
  - C{msg/<id>}: the message (RFC 5322 bytes, CRLF line ends, Received prepended).
  - C{env/<id>.json}: the envelope (L{Envelope}); its rename into C{env/} is the commit point.
  - C{ctl/}: request files from C{netsvc mail queue} (handled by the delivery side).

Commit (L{IncomingMessage.commit}): the message file and the envelope (in C{tmp/})
are fsync'd, the message is renamed into C{msg/}, C{msg/} is fsync'd, the envelope
is renamed into C{env/}, and C{env/} is fsync'd; only then does the Deferred fire.
The file work runs off the reactor in one writer thread; commits that arrive while
a batch is being written are written together as the next batch (group commit: the
file syncs of a batch run in parallel, and each folder is fsync'd once per batch).
Nothing is acknowledged before it is durable.

Removal (L{Queue.remove}): the envelope is unlinked first, then the message, at
once; the C{env/} folder is fsync'd after it in the writer thread (removals that
wait together share one sync), so a power cut cannot bring a delivered message
back for a second delivery.  (A kill -9 cannot either: the unlink is in the kernel.)

Writers.  With C{workers: 1} the daemon is the one writer.  With C{workers: N}
every worker commits into the same folders (L{Writer}: its index, the count, and
whether it is the delivery owner, worker 0); only the owner removes or rewrites.
An id ends with its writer's index (L{newId}, L{writerOf}), so ids never collide
across workers, and recovery can tell whose a file is.

Recovery (L{Queue.recover}), at start-up, before any connection: the writer's
own C{tmp/} is emptied, and a C{msg/} file without an envelope (never
acknowledged) is removed -- only if this writer wrote it: another worker may be
between its two renames at that very moment.  The owner also clears what no
running worker can own (files of a C{workers: 1} run, indexes >= N), and moves
aside an envelope without a message.  With C{workers: 1} everything is the
daemon's.

Other processes (C{netsvc mail queue}) only read, or drop files in C{ctl/}.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger()

_counter = itertools.count()
_jobs = itertools.count()


#: Length of an id without, and with, its writer's index (two hex digits: workers: N has N <= 256).
_ID_LENGTH = 22
_WRITER_ID_LENGTH = 24


def newId(writer: int | None = None) -> str:
    """
    A queue id: sortable by creation time (microseconds), unique within and across
    runs; with C{writer} (a worker's index, 0-255) it ends with that index in two hex
    digits, so two workers can never make the same id.  Always lower-case hex.
    """
    id = f"{time.time_ns() // 1000:014x}{next(_counter) % 0x10000:04x}{secrets.token_hex(2)}"
    return id if writer is None else f"{id}{writer:02x}"


def writerOf(id: str) -> int | None:
    """The worker index a L{newId} carries, or None (a C{workers: 1} id, or not an id at all)."""
    if len(id) != _WRITER_ID_LENGTH:
        return None
    try:
        return int(id[_ID_LENGTH:], 16)
    except ValueError:
        return None


@attrs.frozen
class Writer:
    """
    Who writes into a queue folder: worker C{index} (None: not a worker, the only
    writer) of C{count}; C{owner}: the one process that delivers, removes and
    rewrites (worker 0, or the only process).
    """

    index: int | None = None
    count: int = 1
    owner: bool = True

    @property
    def alone(self) -> bool:
        return self.index is None

    def owns(self, id: str) -> bool:
        """Whether recovery may treat C{id}'s unfinished files as this writer's own (see the module docstring)."""
        if self.alone:
            return True
        other = writerOf(id)
        if other == self.index:
            return True
        return self.owner and (other is None or other >= self.count)


#: The only writer (workers: 1).
ALONE = Writer()


@attrs.define
class Recipient:
    address: str
    status: str = "pending"  # pending | sent | failed
    attempts: int = 0
    last_error: str | None = None
    orcpt: str | None = None  # DSN ORCPT (as given: "rfc822;user@example")
    notify: str | None = None  # DSN NOTIFY (e.g. "SUCCESS,FAILURE" or "NEVER")

    def toJSON(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        for key in ("orcpt", "notify"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Recipient:
        return cls(**{f.name: data[f.name] for f in attrs.fields(cls) if f.name in data})


@attrs.define
class Envelope:
    """The envelope of one queued message, as stored in C{env/<id>.json}."""

    sender: str
    recipients: list[Recipient]
    id: str = ""
    created: float = attrs.field(factory=time.time)
    next_attempt: float = 0.0
    attempts: int = 0
    #: Who handed it to us: address, helo, user (None: not authenticated).
    client: dict[str, Any] = attrs.field(factory=dict)
    ret: str | None = None  # DSN RET: FULL | HDRS
    envid: str | None = None  # DSN ENVID
    warned: bool = False  # a delay warning was sent
    dsn: bool = False  # this message is itself a bounce (never bounce a bounce)

    @classmethod
    def new(cls, sender: str, recipients: list[str | Recipient], **fields: Any) -> Envelope:
        rcpts = [r if isinstance(r, Recipient) else Recipient(address=r) for r in recipients]
        return cls(sender=sender, recipients=rcpts, **fields)

    def pending(self) -> list[Recipient]:
        """The recipients still to be delivered."""
        return [r for r in self.recipients if r.status == "pending"]

    def toJSON(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["recipients"] = [r.toJSON() for r in self.recipients]
        for key in ("ret", "envid"):
            if out[key] is None:
                del out[key]
        return out

    def dumps(self) -> bytes:
        return json.dumps(self.toJSON(), separators=(",", ":")).encode()

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Envelope:
        kwargs = {f.name: data[f.name] for f in attrs.fields(cls) if f.name in data}
        kwargs["recipients"] = [Recipient.fromJSON(r) for r in data.get("recipients", [])]
        return cls(**kwargs)

    @classmethod
    def loads(cls, data: bytes | str) -> Envelope:
        return cls.fromJSON(json.loads(data))


def _fsyncDir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeFile(path: Path, data: bytes, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fdatasync(f.fileno())


class _Job:
    """
    One commit or envelope rewrite waiting for the writer thread (or, with no
    envelope, a request to fsync C{env/} after removals).
    """

    __slots__ = ("message", "envelope", "deferred", "error", "tmp")

    def __init__(self, message: IncomingMessage | None, envelope: Envelope | None, tmpDir: Path) -> None:
        self.message = message
        self.envelope = envelope
        self.deferred: defer.Deferred = defer.Deferred()
        self.error: BaseException | None = None
        # Unique per job: two rewrites of one envelope may wait in the same batch.
        self.tmp = tmpDir / f"{envelope.id}.{next(_jobs)}.env" if envelope is not None else tmpDir


class Queue:
    """
    The queue folder (see the module docstring), as written by C{writer}
    (default: the only writer).
    """

    def __init__(self, directory: Path, *, fsync: bool = True, reactor: Any = None,
                 writer: Writer = ALONE) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.directory = Path(directory)
        self.fsync = fsync
        self.writer = writer
        self.tmpRoot = self.directory / "tmp"
        self.tmp = self.tmpRoot if writer.alone else self.tmpRoot / str(writer.index)
        self.msg = self.directory / "msg"
        self.env = self.directory / "env"
        self.ctl = self.directory / "ctl"
        for d in (self.tmpRoot, self.tmp, self.msg, self.env, self.ctl):
            d.mkdir(parents=True, exist_ok=True)
        self._waiting: list[_Job] = []
        self._writing = False
        self._removals: _Job | None = None  # the waiting env/ sync for removals, if any
        self._pool: ThreadPoolExecutor | None = None
        #: Called with each committed id (the delivery side's kick); set by the service.
        self.onCommit: Callable[[str], None] | None = None

    # -- start-up

    def recover(self) -> None:
        """
        Empty this writer's tmp/; remove this writer's messages that were never
        acknowledged (no envelope).  The owner (or the only writer) also clears
        what belongs to no running writer and checks every envelope has its message.
        """
        self._emptyTmp()
        committed = {p.name[:-5] for p in self.env.iterdir() if p.name.endswith(".json")}
        for p in self.msg.iterdir():
            if p.name not in committed and self.writer.owns(p.name):
                log.info("queue: removing unacknowledged message {id}", id=p.name)
                p.unlink(missing_ok=True)
        if not self.writer.owner:
            return  # the owner removes messages: an envelope checked here could be removed meanwhile
        for id in committed:
            if not (self.msg / id).exists():  # cannot happen with the commit order; be loud if it does
                log.error("queue: envelope {id} has no message; moved aside", id=id)
                os.replace(self.env / f"{id}.json", self.directory / f"orphan-{id}.json")

    def _emptyTmp(self) -> None:
        """This writer's tmp/; for the owner, also what no running worker writes (see L{recover})."""
        w = self.writer
        for p in self.tmpRoot.iterdir():
            if p.is_dir() and not p.is_symlink():
                mine = p == self.tmp
                dead = w.alone or (w.owner and not (p.name.isdigit() and int(p.name) < w.count))
                if mine:
                    for f in p.iterdir():
                        f.unlink()
                elif dead:
                    log.info("queue: removing {path} (no such writer now)", path=str(p))
                    shutil.rmtree(p, ignore_errors=True)
            elif w.alone or w.owner:  # a file of a workers: 1 run (or, alone, of this writer)
                p.unlink()

    # -- writing

    def newMessage(self) -> IncomingMessage:
        return IncomingMessage(self, newId(self.writer.index))

    def enqueueBytes(self, sender: str, recipients: list[str | Recipient], data: bytes,
                     **envfields: Any) -> defer.Deferred:
        """Queue a whole message (bounces, tools); fires with its id once durable."""
        incoming = self.newMessage()
        incoming.write(data)
        return incoming.commit(Envelope.new(sender, recipients, **envfields))

    def update(self, envelope: Envelope) -> defer.Deferred:
        """Atomically rewrite an envelope (tmp + fsync + rename + folder fsync); fires None."""
        return self._submit(_Job(None, envelope, self.tmp)).addCallback(lambda _: None)

    def remove(self, id: str) -> defer.Deferred:
        """
        Remove a message now: envelope first (the commit point), then the data.
        The returned Deferred (callers may ignore it) fires once the removal is
        durable (C{env/} fsync'd; batched with other removals and commits).
        """
        for path in (self.env / f"{id}.json", self.msg / id):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if not self.fsync:
            return defer.succeed(None)
        job = self._removals
        if job is None:  # no sync waiting yet: one for this removal and those that follow it meanwhile
            job = self._removals = _Job(None, None, self.tmp)
            job.deferred.addErrback(
                lambda f: log.error("queue: cannot sync removals: {error}", error=f.getErrorMessage()))
            self._submit(job)  # (an idle writer takes it at once and forgets it as the waiting one)
        d: defer.Deferred = defer.Deferred()
        job.deferred.addBoth(lambda _: d.callback(None))
        return d

    def _submit(self, job: _Job) -> defer.Deferred:
        self._waiting.append(job)
        if not self._writing:
            self._writeNext()
        return job.deferred

    def _writeNext(self) -> None:
        batch, self._waiting = self._waiting, []
        self._removals = None  # removals from now on need a later sync
        if not batch:
            self._writing = False
            return
        self._writing = True
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._writeBatch, batch)
        d.addBoth(self._batchDone, batch)

    def _writeBatch(self, batch: list[_Job]) -> None:
        """
        In the writer thread.  Round 1: every message file and every envelope (in
        tmp/) is fdatasync'd, in parallel (concurrent syncs share the filesystem's
        journal commits); messages are renamed into msg/.  Round 2: msg/ is
        fsync'd; only then are envelopes renamed into env/ (never an envelope
        whose message could be lost).  Round 3: env/ is fsync'd.
        """
        sync = self.fsync
        removals = any(job.envelope is None for job in batch)
        batch = [job for job in batch if job.envelope is not None]

        def prepare(job: _Job) -> None:
            assert job.envelope is not None
            try:
                if job.message is not None:
                    job.message.finish(sync)
                _writeFile(job.tmp, job.envelope.dumps(), sync)
            except BaseException as e:
                job.error = e

        if sync and len(batch) > 1:
            list(self._syncPool().map(prepare, batch))
        else:
            for job in batch:
                prepare(job)
        moved = False
        for job in batch:
            if job.error is None and job.message is not None:
                try:
                    os.rename(job.message.tmpPath, self.msg / job.message.id)
                    moved = True
                except BaseException as e:
                    job.error = e
        if moved and sync:
            _fsyncDir(self.msg)
        wrote = removals
        for job in batch:
            assert job.envelope is not None
            if job.error is not None:
                job.tmp.unlink(missing_ok=True)
                continue
            try:
                os.rename(job.tmp, self.env / f"{job.envelope.id}.json")
                wrote = True
            except BaseException as e:
                job.error = e
                job.tmp.unlink(missing_ok=True)
        if wrote and sync:
            _fsyncDir(self.env)

    def _syncPool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="queue-fsync")
        return self._pool

    def _batchDone(self, result: Any, batch: list[_Job]) -> None:
        for job in batch:
            error = job.error if job.error is not None else (
                result.value if isinstance(result, defer.Failure) else None)
            if job.envelope is None:  # removals' sync
                job.deferred.callback(None) if error is None else job.deferred.errback(error)
                continue
            if error is not None:
                log.error("queue: cannot write {id}: {error}", id=job.envelope.id, error=repr(error))
                if job.message is not None:
                    job.message.discard()
                    try:  # renamed into msg/ before the failure: never acknowledged
                        (self.msg / job.message.id).unlink(missing_ok=True)
                    except OSError:
                        pass
                job.deferred.errback(error)
            else:
                job.deferred.callback(job.envelope.id)
                if job.message is not None and self.onCommit is not None:
                    try:
                        self.onCommit(job.envelope.id)
                    except Exception:  # a bug in the hook must not stop the writer: every session would wait
                        log.failure("queue: the commit hook failed for {id}", id=job.envelope.id)
        self._writeNext()

    # -- reading

    def ids(self) -> list[str]:
        """Committed message ids, oldest first."""
        return sorted(p.name[:-5] for p in self.env.iterdir() if p.name.endswith(".json"))

    def envelope(self, id: str) -> Envelope:
        """The stored envelope of C{id} (FileNotFoundError if there is none)."""
        return Envelope.loads((self.env / f"{id}.json").read_bytes())

    def messagePath(self, id: str) -> Path:
        return self.msg / id


class IncomingMessage:
    """
    A message being received: L{write} as data arrives (it goes to the file, not
    memory), then L{commit} or L{abort}.
    """

    def __init__(self, queue: Queue, id: str) -> None:
        self.queue = queue
        self.id = id
        self.tmpPath = queue.tmp / f"{id}.msg"
        self.size = 0
        self._file: Any = open(self.tmpPath, "wb", buffering=65536)  # noqa: SIM115 - closed by finish/abort
        self._done = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._file.write(data)

    def contents(self) -> bytes:
        """(A thread: it reads the file.)  What was written so far, read back (local delivery's copy)."""
        self._file.flush()
        return self.tmpPath.read_bytes()

    def head(self, limit: int = 1024 * 1024) -> bytes:
        """
        (A thread: it reads the file.)  The header block written so far (up to and with its
        ending blank line), at most C{limit} bytes: what a success report carries, without reading
        the whole message back.
        """
        self._file.flush()
        data = b""
        with open(self.tmpPath, "rb") as f:
            while len(data) < limit:
                chunk = f.read(65536)
                if not chunk:
                    break
                start = max(0, len(data) - 3)
                data += chunk
                end = data.find(b"\r\n\r\n", start)
                if end >= 0:
                    return data[:min(end + 4, limit)]
        return data[:limit]

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """Make it durable under this message's id; fires with the id (or errbacks, nothing kept)."""
        if self._done:
            raise RuntimeError("message already committed or aborted")
        self._done = True
        envelope.id = self.id
        return self.queue._submit(_Job(self, envelope, self.queue.tmp))

    def finish(self, sync: bool) -> None:
        """(Writer thread) flush, fsync and close the data file."""
        f = self._file
        f.flush()
        if sync:
            os.fdatasync(f.fileno())
        f.close()

    def abort(self) -> None:
        """Drop the message (client gone, rejected): nothing stays behind."""
        if self._done:
            return
        self._done = True
        self.discard()

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        try:
            self.tmpPath.unlink()
        except FileNotFoundError:
            pass
