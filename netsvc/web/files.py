"""
The files under a root: URL path -> file, safely, with an in-memory cache.

L{FileTree.lookup} maps a request path (percent-encoded bytes, as sent) to a
L{FileEntry}, a L{Redirect} (a folder asked for without its slash), a
L{Listing} (a folder without index file, when listings are on) or None (404).

Safety: the decoded path is split on C{/}; a C{..} segment, a NUL byte or a
hidden segment (C{.name}, except C{.well-known}) is refused (None), and the real
path (symlinks resolved) must lie inside the real root.

Speed: entries are cached by canonical URL path (percent-decoding, C{//} and dot segments
undone, then encoded the one way: see L{FileTree.canonical}), so that other spellings of a
path neither rebuild an entry nor evict one.  A small file's entry holds its bytes,
its gzip form (precompressed C{.gz} sidecar, or compressed once here) and its
headers, computed once; an entry is re-checked against the file system (one
C{stat}) at most every C{revalidate} seconds, and rebuilt when the file's
(mtime, size, inode) changed.  Larger files keep only their metadata.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import os
import stat
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from netsvc.web.negotiate import httpDate

_TYPES = mimetypes.MimeTypes()
_EXTRA_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".md": "text/markdown",
    ".txt": "text/plain",
    ".css": "text/css",
    ".html": "text/html",
    ".htm": "text/html",
    ".xml": "application/xml",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".webmanifest": "application/manifest+json",
    ".map": "application/json",
    ".yaml": "text/yaml",
    ".yml": "text/yaml",
    ".csv": "text/csv",
    ".pem": "application/x-pem-file",
}
for _ext, _type in _EXTRA_TYPES.items():
    _TYPES.add_type(_type, _ext)

#: Types compressed on the fly and given a charset (besides text/*).
_TEXTUAL = {
    "application/javascript",
    "application/json",
    "application/xml",
    "image/svg+xml",
    "application/manifest+json",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/x-pem-file",
}

#: Characters a canonical cache key leaves unencoded in a segment (RFC 3986 pchar, less
#: C{%}, which is always an escape).
_SAFE = "!$&'()*+,;=:@-._~"

#: Compressing less than this is not worth the bytes of the gzip header.
MIN_GZIP = 256


def contentType(name: str) -> tuple[bytes, bool]:
    """
    The Content-Type for a file name (with C{charset=utf-8} for text) and whether
    the type is worth compressing.
    """
    kind, encoding = _TYPES.guess_type(name, strict=False)
    if encoding is not None:  # foo.tar.gz: the bytes are gzip, served as such
        return {
            "gzip": b"application/gzip",
            "bzip2": b"application/x-bzip2",
            "xz": b"application/x-xz",
            "br": b"application/octet-stream",
        }.get(encoding, b"application/octet-stream"), False
    if kind is None:
        return b"application/octet-stream", False
    textual = kind.startswith("text/") or kind in _TEXTUAL
    if textual:
        return f"{kind}; charset=utf-8".encode(), True
    return kind.encode(), False


class FileEntry:
    """One servable file: metadata, validators, and (when small) its bytes."""

    __slots__ = (
        "path",
        "size",
        "signature",
        "mtime",
        "etag",
        "lastModified",
        "contentType",
        "compressible",
        "body",
        "gzBody",
        "gzPath",
        "gzSize",
        "gzEtag",
        "checked",
        "cost",
        "headers",
        "gzHeaders",
        "fastBlocks",
        "h2Headers",
    )

    def __init__(self, path: str, st: os.stat_result, now: float) -> None:
        self.path = path
        self.size = st.st_size
        self.signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        self.mtime = int(st.st_mtime)
        self.lastModified = httpDate(self.mtime)
        self.contentType, self.compressible = contentType(path)
        # Strong: a new mtime, size or inode is a new tag.  Small files get a content hash below.
        self.etag = b'"%x-%x-%x"' % (st.st_mtime_ns, st.st_size, st.st_ino)
        self.body: bytes | None = None
        self.gzBody: bytes | None = None
        self.gzPath: str | None = None
        self.gzSize = 0
        self.gzEtag = b""
        self.checked = now
        self.cost = 0
        #: Precomputed 200 headers (name, value), identity and gzip.
        self.headers: list[tuple[bytes, bytes]] = []
        self.gzHeaders: list[tuple[bytes, bytes]] = []
        #: The same as header bytes, made by netsvc.web.fast on first use.
        self.fastBlocks: tuple[bytes, bytes] | None = None
        #: The same as HTTP/2 header fields (lower case), made by netsvc.web.http2 on first use.
        self.h2Headers: tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]] | None = None

    @property
    def hasGzip(self) -> bool:
        return self.gzBody is not None or self.gzPath is not None

    def finishHeaders(self) -> None:
        vary = [(b"Vary", b"Accept-Encoding")] if (self.compressible or self.hasGzip) else []
        common = [
            (b"Last-Modified", self.lastModified),
            (b"Content-Type", self.contentType),
            (b"Accept-Ranges", b"bytes"),
        ] + vary
        self.headers = common + [(b"ETag", self.etag), (b"Content-Length", b"%d" % self.size)]
        if self.hasGzip:
            self.gzEtag = self.etag[:-1] + b'-gz"'
            self.gzHeaders = common + [
                (b"ETag", self.gzEtag),
                (b"Content-Encoding", b"gzip"),
                (b"Content-Length", b"%d" % self.gzSize),
            ]


class Redirect:
    """A folder was asked for without its trailing slash."""

    __slots__ = ("location",)

    def __init__(self, location: bytes) -> None:
        self.location = location


class Listing:
    """A folder without an index file, listings on: its entries (name, is folder, size, mtime)."""

    __slots__ = ("urlPath", "entries")

    def __init__(self, urlPath: str, entries: list[tuple[str, bool, int, float]]) -> None:
        self.urlPath = urlPath
        self.entries = entries


class FileTree:
    """
    The files under C{root}.

    @param onTheFlyGzip: precompute the gzip form of small compressible files.
    """

    def __init__(
        self,
        root: str,
        index: list[str] | tuple[str, ...] = ("index.html",),
        listing: bool = False,
        onTheFlyGzip: bool = True,
        maxFileSize: int = 256 * 1024,
        maxTotal: int = 64 << 20,
        revalidate: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        maxEntries: int = 10000,
    ) -> None:
        self.root = os.path.realpath(root)
        self.index = list(index)
        self.listing = listing
        self.onTheFlyGzip = onTheFlyGzip
        self.maxFileSize = maxFileSize
        self.maxTotal = maxTotal
        self.revalidate = revalidate
        self.clock = clock
        self.maxEntries = maxEntries
        self._cache: dict[bytes, FileEntry] = {}
        self.cached = 0  # bytes held

    # -- the hot path

    def lookup(self, rawPath: bytes) -> FileEntry | Redirect | Listing | None:
        """What C{rawPath} (the request path, percent-encoded, no query) names."""
        key = rawPath
        entry = self._cache.get(rawPath)  # a canonical spelling (the usual one) hits at once
        canon = None
        if entry is None:
            canon = self.canonical(rawPath)
            if canon is None:
                return None
            key = canon[0]
            if key != rawPath:
                entry = self._cache.get(key)
        if entry is not None:
            now = self.clock()
            if now - entry.checked < self.revalidate:
                return entry
            try:
                st = os.stat(entry.path)
            except OSError:
                st = None
            if st is not None and (st.st_mtime_ns, st.st_size, st.st_ino) == entry.signature:
                entry.checked = now
                return entry
            self._forget(key)
            if canon is None:
                canon = self.canonical(rawPath)
                if canon is None:
                    return None
        assert canon is not None
        return self._resolve(rawPath, canon)

    # -- resolution

    def segments(self, rawPath: bytes) -> list[str] | None:
        """The decoded, checked path segments, or None when the path is refused."""
        canon = self.canonical(rawPath)
        return None if canon is None else canon[1]

    def canonical(self, rawPath: bytes) -> tuple[bytes, list[str], bool] | None:
        """
        The cache key of C{rawPath}, its decoded and checked segments, and whether it names a
        folder (ends with C{/}, or C{/.}); None when the path is refused.

        Every spelling of one path (percent-encoded or not, C{//}, C{/./}, a backslash) has one
        key, itself a spelling of that path: percent-encoded the one way, so that the key sent as
        a path means the same thing (and hits at once).
        """
        if b"\\" in rawPath:
            rawPath = rawPath.replace(b"\\", b"/")
        try:
            decoded = unquote_to_bytes(rawPath).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in decoded or "\\" in decoded:
            return None
        out = []
        for seg in decoded.split("/"):
            if seg in ("", "."):
                continue
            if seg == ".." or (seg.startswith(".") and seg != ".well-known"):
                return None
            out.append(seg)
        folder = not out or decoded.endswith("/") or decoded.endswith("/.")
        key = "/" + "/".join(quote(seg, safe=_SAFE) for seg in out)
        if folder and out:
            key += "/"
        return key.encode("ascii"), out, folder

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.root or real.startswith(self.root + os.sep)

    def _resolve(
        self, rawPath: bytes, canon: tuple[bytes, list[str], bool]
    ) -> FileEntry | Redirect | Listing | None:
        key, segs, folder = canon
        path = os.path.join(self.root, *segs)
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        if not self._inside(path):
            return None  # refused, never cached
        if stat.S_ISDIR(st.st_mode):
            if not folder:
                # the canonical path: the raw one could start with // (a protocol-relative Location)
                return Redirect(key + b"/")
            for name in self.index:
                candidate = os.path.join(path, name)
                try:
                    ist = os.stat(candidate)
                except OSError:
                    continue
                if stat.S_ISREG(ist.st_mode) and self._inside(candidate):
                    return self._remember(key, candidate, ist)
            if self.listing:
                return Listing("/" + "/".join(segs) + ("/" if segs else ""), self._list(path))
            return None
        if not stat.S_ISREG(st.st_mode) or folder:
            return None  # a file asked for as a folder (/a.txt/) is not found, as nginx does
        return self._remember(key, path, st)

    def _list(self, folder: str) -> list[tuple[str, bool, int, float]]:
        out = []
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return out
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if not self._inside(full):
                continue
            out.append((name, stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime))
        return out

    def _remember(self, key: bytes, path: str, st: os.stat_result) -> FileEntry:
        entry = self.build(path, st)
        if entry.cost > self.maxTotal:
            return entry
        if len(self._cache) >= self.maxEntries:
            self._forget(next(iter(self._cache)))
        while self.cached + entry.cost > self.maxTotal and self._cache:
            self._forget(next(iter(self._cache)))  # the oldest first
        self._cache[key] = entry
        self.cached += entry.cost
        return entry

    def _forget(self, key: bytes) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self.cached -= entry.cost

    def build(self, path: str, st: os.stat_result) -> FileEntry:
        """A new entry for the regular file at C{path}, with its bytes when small."""
        entry = FileEntry(path, st, self.clock())
        sidecar = path + ".gz"
        try:
            gst = os.stat(sidecar)
            if stat.S_ISREG(gst.st_mode) and self._inside(sidecar):
                entry.gzPath, entry.gzSize = sidecar, gst.st_size
        except OSError:
            pass
        if st.st_size <= self.maxFileSize:
            try:
                with open(path, "rb") as f:
                    body = f.read(self.maxFileSize + 1)
            except OSError:
                body = None
            if body is not None and len(body) == st.st_size:
                entry.body = body
                entry.etag = b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'
                entry.cost = len(body) + 512
                if entry.gzPath is not None and entry.gzSize <= self.maxFileSize:
                    try:
                        with open(entry.gzPath, "rb") as f:
                            entry.gzBody = f.read()
                        entry.gzSize = len(entry.gzBody)
                        entry.gzPath = None
                    except OSError:
                        entry.gzPath = None
                elif (
                    entry.gzPath is None
                    and entry.compressible
                    and self.onTheFlyGzip
                    and len(body) >= MIN_GZIP
                ):
                    packed = gzip.compress(body, compresslevel=6, mtime=0)
                    if len(packed) < len(body):
                        entry.gzBody, entry.gzSize = packed, len(packed)
                if entry.gzBody is not None:
                    entry.cost += len(entry.gzBody)
        entry.finishHeaders()
        return entry

    def clear(self) -> None:
        """Forget every cached file (the next request of each reads it again)."""
        self._cache.clear()
        self.cached = 0

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._cache), "bytes": self.cached}
