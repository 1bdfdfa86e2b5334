"""
The progress of a C{netsvc fetch} download: a bar redrawn on a terminal, or
only a final line (L{Progress}), and L{humanSize} (C{1536} -> C{'1.5 KiB'}).
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any, TextIO


def humanSize(n: float) -> str:
    """C{1536} -> C{'1.5 KiB'}."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """
    A progress bar on a terminal (redrawn at most 10 times a second), or nothing
    but a final line (C{bar=False}).  Counts bytes received from the network
    against C{total} (the Content-Length), starting at C{offset} when resuming.
    """

    def __init__(self, clock: Any, err: TextIO, name: str, bar: bool, width: int = 80) -> None:
        self.clock = clock
        self.err = err
        self.name = name
        self.bar = bar
        self.width = width
        self.total: int | None = None
        self.offset = 0
        self.received = 0
        self._started = clock.seconds()
        self._drawn = 0.0
        self._shown = False

    def start(self, offset: int, length: int | None) -> None:
        self.offset, self.received = offset, 0
        self.total = offset + length if length is not None else None
        self._started = self.clock.seconds()
        self.draw(force=True)

    def update(self, n: int) -> None:
        self.received += n
        self.draw()

    def draw(self, force: bool = False) -> None:
        now = self.clock.seconds()
        if not self.bar or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        self.err.write("\r" + self.line(now))
        self.err.flush()
        self._shown = True

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-6)
        rate = self.received / elapsed
        done = self.offset + self.received
        name = self.name if len(self.name) <= 24 else "..." + self.name[-21:]
        if self.total:
            fraction = min(done / self.total, 1.0)
            eta = (self.total - done) / rate if rate > 0 else None
            tail = (f" {fraction * 100:3.0f}% {humanSize(done):>10} {humanSize(rate):>10}/s"
                    f" eta {_duration(eta) if eta is not None else '--':>5}")
            room = max(self.width - len(name) - len(tail) - 4, 10)
            filled = int(room * fraction)
            bar = "=" * filled + (">" if filled < room else "") + " " * (room - filled - 1)
            return f"{name} [{bar[:room]}]{tail}"
        return f"{name} {humanSize(done):>10} {humanSize(rate):>10}/s {_duration(elapsed):>5}"

    def finish(self, saved: int, complete: bool) -> None:
        now = self.clock.seconds()
        elapsed = max(now - self._started, 1e-6)
        if self._shown:
            self.draw(force=True)
            self.err.write("\n")
        if complete:
            rate = self.received / elapsed
            self.err.write(f"{self.name}: saved {humanSize(saved)} ({saved} bytes) in "
                           f"{_duration(elapsed)}, {humanSize(rate)}/s\n")
        self.err.flush()
        self._shown = False


def columns(stream: Any) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        columns = 0
    return int(os.environ.get("COLUMNS", 0) or 0) or columns or shutil.get_terminal_size().columns


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
