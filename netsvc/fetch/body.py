"""
Where a response body goes in C{netsvc fetch}: L{Decoder} undoes gzip/deflate
Content-Encodings, a L{Sink} takes the bytes (L{StreamSink}: standard output,
L{FileSink}: a file, resumable), L{BodyReceiver} ties them together with a
timeout, and L{contentRange} reads a 206/416 response's Content-Range.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web import client as webclient
from twisted.web.http import PotentialDataLoss

from netsvc.fetch.errors import Failed

if TYPE_CHECKING:
    from netsvc.fetch.progress import Progress


class DecodeError(Exception):
    """The body is not valid data in its Content-Encoding."""


class Decoder:
    """
    Undo Content-Encodings (gzip/x-gzip, deflate -- zlib or raw, identity),
    applied in the order listed.  L{finish} raises L{DecodeError} when the
    compressed stream was cut short.
    """

    SUPPORTED = {"gzip", "x-gzip", "deflate", "identity"}

    def __init__(self, encodings: list[str]) -> None:
        self.encodings = [e for e in encodings if e != "identity"]
        self._stages = [self._newStage(e) for e in reversed(self.encodings)]

    @staticmethod
    def _newStage(encoding: str) -> dict:
        wbits = 31 if encoding in ("gzip", "x-gzip") else 15
        return {"encoding": encoding, "z": zlib.decompressobj(wbits), "fed": False}

    def decode(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = self._feed(stage, data)
        return data

    def _feed(self, stage: dict, data: bytes) -> bytes:
        if not data:
            return b""
        out = []
        try:
            if stage["encoding"] == "deflate" and not stage["fed"]:
                try:
                    out.append(stage["z"].decompress(data))
                    data = b""
                except zlib.error:  # raw deflate, without the zlib header (old IIS and friends)
                    stage["z"] = zlib.decompressobj(-15)
            stage["fed"] = True
            while data:
                z = stage["z"]
                out.append(z.decompress(data))
                data = z.unused_data if z.eof else b""
                if data:
                    if stage["encoding"] == "deflate":
                        break  # bytes after the end of a deflate stream: ignored
                    stage["z"] = zlib.decompressobj(31)  # concatenated gzip members
        except zlib.error as e:
            raise DecodeError(f"bad {stage['encoding']} data: {e}") from None
        return b"".join(out)

    def finish(self) -> bytes:
        """What the decompressors still hold; raise L{DecodeError} if a stream was cut short."""
        data = b""
        for stage in self._stages:
            data = self._feed(stage, data)
            z = stage["z"]
            try:
                data += z.flush()
            except zlib.error as e:
                raise DecodeError(f"bad {stage['encoding']} data: {e}") from None
            if stage["fed"] and not z.eof:  # an empty body is accepted as it is
                raise DecodeError(f"{stage['encoding']} data cut short")
        return data


class Sink:
    """Where the body goes.  C{present}: bytes already there that a Range request can skip."""

    present = 0
    name = "-"

    def begin(self, offset: int) -> None:
        """A body that starts at byte C{offset} of the resource is coming."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StreamSink(Sink):
    """Standard output: what was written cannot be taken back, so a restarted body skips it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._skip = 0

    def begin(self, offset: int) -> None:
        self._skip = self.present - offset

    def write(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not data:
                return
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError as e:
            failure = Failed(f"cannot write output: {e.strerror or e}", final=True)
            failure.quiet = e.errno == errno.EPIPE  # the reader left (| head): nothing to report
            raise failure from None
        self.present += len(data)


class FileSink(Sink):
    """
    A file opened only when a body arrives (an error leaves an existing file
    alone); C{resume}: its current content counts as already received.
    """

    def __init__(self, path: str, resume: bool) -> None:
        self.name = path
        self.file: BinaryIO | None = None
        if resume:
            try:
                self.present = os.path.getsize(path)
            except OSError:
                self.present = 0

    def begin(self, offset: int) -> None:
        try:
            if self.file is None:
                self.file = open(self.name, "r+b" if offset and os.path.exists(self.name) else "wb")
            if stat.S_ISREG(os.fstat(self.file.fileno()).st_mode):  # not /dev/null, a pipe, a tty
                self.file.seek(offset)
                self.file.truncate()
        except OSError as e:
            raise Failed(f"cannot write {self.name}: {e.strerror or e}", final=True) from None
        self.present = offset

    def write(self, data: bytes) -> None:
        if self.file is None:
            raise Failed(f"{self.name} is closed", final=True)
        try:
            self.file.write(data)
        except OSError as e:
            raise Failed(f"cannot write {self.name}: {e.strerror or e}", final=True) from None
        self.present += len(data)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                raise Failed(f"cannot write {self.name}: {e.strerror or e}", final=True) from None
            self.file = None


class BodyReceiver(Protocol):
    """
    Decodes, writes to the sink and counts; aborts when no byte arrives for
    C{timeout} seconds.  C{done} fires with None, or fails with the reason.
    """

    def __init__(self, clock: Any, timeout: float, decoder: Decoder | None, sink: Sink | None,
                 progress: Progress | None) -> None:
        self.clock = clock
        self.timeout = timeout
        self.decoder = decoder
        self.sink = sink
        self.progress = progress
        self.done: defer.Deferred = defer.Deferred()
        self._problem: BaseException | None = None
        self._timer = clock.callLater(timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._problem is not None:
            return
        self._timer.reset(self.timeout)
        if self.progress is not None:
            self.progress.update(len(data))
        try:
            if self.decoder is not None:
                data = self.decoder.decode(data)
            if self.sink is not None and data:
                self.sink.write(data)
        except (DecodeError, Failed) as e:
            self._abort(e)

    def _timedOut(self) -> None:
        self._abort(defer.TimeoutError())

    def _abort(self, problem: BaseException) -> None:
        self._problem = problem
        if self._timer.active():
            self._timer.cancel()
        self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._problem is None and reason.check(webclient.ResponseDone, PotentialDataLoss):
            try:
                if self.decoder is not None:
                    tail = self.decoder.finish()
                    if tail and self.sink is not None:
                        self.sink.write(tail)
            except (DecodeError, Failed) as e:
                self._problem = e
            else:
                self.done.callback(None)
                return
        self.done.errback(self._problem if self._problem is not None else reason)


def contentRange(response: Any) -> tuple[int | None, int | None]:
    """(first byte, complete length) from C{Content-Range: bytes a-b/n} or C{bytes */n}."""
    value = (response.headers.getRawHeaders(b"content-range") or [b""])[0].decode("latin-1")
    unit, _, spec = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None
    span, _, length = spec.partition("/")
    first = span.partition("-")[0].strip()
    return (int(first) if first.isdigit() else None, int(length) if length.strip().isdigit() else None)


def stdout() -> BinaryIO:
    return QuietPipe(sys.stdout.buffer)


class QuietPipe:
    """Standard output; when the reader went away (C{| head}), later writes are dropped silently."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except BrokenPipeError:
            # Python would complain again when flushing stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise OSError(errno.EPIPE, "the reader closed standard output") from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise OSError(errno.EPIPE, "the reader closed standard output") from None
