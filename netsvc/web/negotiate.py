"""
Request header parsing for static responses: C{Range}, C{Accept-Encoding},
entity-tag lists and HTTP dates (RFC 9110).  Pure functions over bytes.
"""

from __future__ import annotations

import email.utils
import time

#: More ranges than this in one request are answered with the whole file (a cheap DoS guard).
MAX_RANGES = 32


class Unsatisfiable(Exception):
    """A syntactically valid byte range set of which no range overlaps the file (416)."""


def parseRange(header: bytes | None, size: int) -> list[tuple[int, int]] | None:
    """
    The byte ranges of a C{Range} header as C{(first, last)} pairs (inclusive),
    clipped to C{size}, in the order asked.

    @return: None when the header is absent, not a bytes range, malformed, or asks
        for too many ranges (the whole representation is sent: RFC 9110 14.2 lets a
        server ignore Range).
    @raise Unsatisfiable: no range overlaps the representation.
    """
    if not header:
        return None
    unit, sep, spec = header.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes":
        return None
    ranges = []
    parts = [p.strip() for p in spec.split(b",")]
    parts = [p for p in parts if p]
    if not parts or len(parts) > MAX_RANGES:
        return None
    for part in parts:
        first, dash, last = part.partition(b"-")
        if not dash:
            return None
        first, last = first.strip(), last.strip()
        try:
            if not first:  # suffix: the last N bytes
                n = _digits(last)
                if n == 0 or size == 0:  # no byte to send (an empty file has no last byte)
                    continue
                ranges.append((max(0, size - n), size - 1))
                continue
            a = _digits(first)
            b = _digits(last) if last else None
        except ValueError:
            return None
        if b is not None and b < a:
            return None
        if a >= size:
            continue
        if b is None:
            b = size - 1
        ranges.append((a, min(b, size - 1)))
    if not ranges:
        raise Unsatisfiable()
    return ranges


def _digits(text: bytes) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or adjacent ranges merged, sorted (used when a client asks for many)."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def acceptsGzip(header: bytes | None) -> bool:
    """
    Whether C{Accept-Encoding} admits gzip: listed (or C{*}) with a non-zero
    q-value, and not refused explicitly.
    """
    if not header:
        return False
    if header == b"gzip" or header.startswith(b"gzip, "):  # the common case, fast
        return True
    star = None
    for item in header.lower().split(b","):
        name, _, params = item.partition(b";")
        name = name.strip()
        q = 1.0
        for param in params.split(b";"):
            key, _, value = param.partition(b"=")
            if key.strip() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if name in (b"gzip", b"x-gzip"):
            return q > 0
        if name == b"*":
            star = q > 0
    return bool(star)


def etagMatches(header: bytes, etag: bytes, weak: bool = True) -> bool:
    """
    Whether an C{If-None-Match} (C{weak}: weak comparison) or C{If-Match}
    (strong) list names C{etag}; C{*} matches any.
    """
    header = header.strip()
    if header == b"*":
        return True
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if candidate.startswith(b"W/"):
            if not weak:
                continue
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def parseHTTPDate(value: bytes | None) -> int | None:
    """Seconds since the epoch of an HTTP date (any of the three RFC formats), or None."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    if parsed is None:
        return None
    try:
        return int(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def httpDate(seconds: float) -> bytes:
    """An IMF-fixdate (C{Sun, 06 Nov 1994 08:49:37 GMT})."""
    return email.utils.formatdate(seconds, usegmt=True).encode("ascii")


class DateCache:
    """C{Date:} header values, formatted once per second."""

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._value = httpDate(second)
        return self._value


__all__ = [
    "Unsatisfiable",
    "parseRange",
    "coalesce",
    "acceptsGzip",
    "etagMatches",
    "parseHTTPDate",
    "httpDate",
    "DateCache",
]
