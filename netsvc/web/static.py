"""
Static files as HTTP: GET and HEAD (405 otherwise), conditional requests
(If-Match, If-Unmodified-Since -> 412; If-None-Match, If-Modified-Since -> 304),
byte ranges (one -> 206, several -> 206 multipart/byteranges, none overlapping
-> 416, honouring If-Range), gzip (precompressed C{.gz} sidecar, else compressed
on the fly for text types) when the client asks, folder redirects, listings.

Small files are answered from L{netsvc.web.files.FileTree}'s memory cache with
precomputed headers; larger ones are streamed from disk with back-pressure.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.web import resource, server, static

from netsvc.web import pages
from netsvc.web.files import FileEntry, FileTree, Listing, Redirect
from netsvc.web.negotiate import Unsatisfiable, acceptsGzip, etagMatches, parseHTTPDate, parseRange

_ALLOW = {b"Allow": b"GET, HEAD"}
_HTML = b"text/html; charset=utf-8"


class StaticResource(resource.Resource):
    """Serves the files of one L{FileTree} (the request path is looked up whole: no traversal)."""

    isLeaf = True

    def __init__(self, tree: FileTree, gzipOnTheFly: bool = True) -> None:
        super().__init__()
        self.tree = tree
        self.gzipOnTheFly = gzipOnTheFly

    def render(self, request: server.Request) -> Any:
        method = request.method
        if method != b"GET" and method != b"HEAD":
            return pages.error(request, 405, headers=_ALLOW)
        found = self.tree.lookup(request.path)
        if type(found) is FileEntry:
            return self.serveFile(request, found)
        if found is None:
            return pages.error(request, 404)
        if isinstance(found, Redirect):
            _, q, query = request.uri.partition(b"?")
            location = found.location + (b"?" + query if q else b"")
            return pages.error(request, 301, headers={b"Location": location})
        assert isinstance(found, Listing)
        body = pages.listing(found.urlPath, found.entries)
        request.setHeader(b"Content-Type", _HTML)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b"" if method == b"HEAD" else body

    def serveFile(self, request: server.Request, entry: FileEntry) -> Any:
        rangeHeader = _header(request, b"range")
        encodings = _header(request, b"accept-encoding")
        useGzip = (
            rangeHeader is None
            and encodings is not None
            and acceptsGzip(encodings)
            and (
                entry.gzBody is not None
                or entry.gzPath is not None
                or (entry.compressible and self.gzipOnTheFly and entry.body is None)
            )
        )
        etag = (entry.gzEtag or entry.etag[:-1] + b'-gz"') if useGzip else entry.etag

        # Preconditions, in RFC 9110 13.2.2 order.
        ifMatch = _header(request, b"if-match")
        if ifMatch is not None:
            if not etagMatches(ifMatch, etag, weak=False):
                return pages.error(request, 412)
        else:
            since = parseHTTPDate(_header(request, b"if-unmodified-since"))
            if since is not None and entry.mtime > since:
                return pages.error(request, 412)
        ifNoneMatch = _header(request, b"if-none-match")
        if ifNoneMatch is not None:
            if etagMatches(ifNoneMatch, etag):
                return self.notModified(request, entry, etag)
        else:
            since = parseHTTPDate(_header(request, b"if-modified-since"))
            if since is not None and entry.mtime <= since:
                return self.notModified(request, entry, etag)

        if rangeHeader is not None and request.method == b"GET" and self.rangeApplies(request, entry):
            try:
                ranges = parseRange(rangeHeader, entry.size)
            except Unsatisfiable:
                return pages.error(request, 416, headers={b"Content-Range": b"bytes */%d" % entry.size})
            if ranges is not None and sum(b - a + 1 for a, b in ranges) <= 2 * entry.size + 1024:
                return self.partial(request, entry, ranges)

        raw = request.responseHeaders._rawHeaders
        if useGzip:
            for name, value in entry.gzHeaders or _streamedGzipHeaders(entry):
                raw[name] = [value]
            if entry.gzBody is not None:
                return b"" if request.method == b"HEAD" else entry.gzBody
            if entry.gzPath is not None:
                return self.stream(request, entry.gzPath)
            return self.stream(request, entry.path, gzip=True)
        for name, value in entry.headers:
            raw[name] = [value]
        if entry.body is not None:
            return b"" if request.method == b"HEAD" else entry.body
        return self.stream(request, entry.path)

    def rangeApplies(self, request: server.Request, entry: FileEntry) -> bool:
        """If-Range: the range applies only when the validator still matches (strongly)."""
        ifRange = _header(request, b"if-range")
        if ifRange is None:
            return True
        ifRange = ifRange.strip()
        if ifRange.startswith(b'"'):
            return ifRange == entry.etag
        if ifRange.startswith(b"W/"):
            return False
        return parseHTTPDate(ifRange) == entry.mtime

    def notModified(self, request: server.Request, entry: FileEntry, etag: bytes) -> Any:
        request.setResponseCode(304)
        raw = request.responseHeaders._rawHeaders
        raw[b"ETag"] = [etag]
        raw[b"Last-Modified"] = [entry.lastModified]
        if entry.compressible or entry.hasGzip:
            raw[b"Vary"] = [b"Accept-Encoding"]
        # Finished here: a body returned from render (even b"") gets "Content-Length: 0", which a
        # 304 must not carry unless the file is empty (RFC 9110 section 8.6).
        request.finish()
        return server.NOT_DONE_YET

    def partial(self, request: server.Request, entry: FileEntry, ranges: list[tuple[int, int]]) -> Any:
        request.setResponseCode(206)
        raw = request.responseHeaders._rawHeaders
        raw[b"Last-Modified"] = [entry.lastModified]
        raw[b"ETag"] = [entry.etag]
        raw[b"Accept-Ranges"] = [b"bytes"]
        if entry.compressible or entry.hasGzip:
            raw[b"Vary"] = [b"Accept-Encoding"]
        size = entry.size
        if len(ranges) == 1:
            a, b = ranges[0]
            raw[b"Content-Type"] = [entry.contentType]
            raw[b"Content-Range"] = [b"bytes %d-%d/%d" % (a, b, size)]
            raw[b"Content-Length"] = [b"%d" % (b - a + 1)]
            if entry.body is not None:
                return entry.body[a : b + 1]
            return self.stream(request, entry.path, ranges=[(b"", a, b - a + 1)])
        boundary = os.urandom(12).hex().encode()
        parts = []
        total = 0
        for a, b in ranges:
            head = (
                b"\r\n--"
                + boundary
                + b"\r\nContent-Type: "
                + entry.contentType
                + b"\r\nContent-Range: bytes %d-%d/%d\r\n\r\n" % (a, b, size)
            )
            parts.append((head, a, b - a + 1))
            total += len(head) + b - a + 1
        tail = b"\r\n--" + boundary + b"--\r\n"
        total += len(tail)
        raw[b"Content-Type"] = [b"multipart/byteranges; boundary=" + boundary]
        raw[b"Content-Length"] = [b"%d" % total]
        if entry.body is not None:
            body = entry.body
            return b"".join(head + body[a : a + n] for head, a, n in parts) + tail
        return self.stream(request, entry.path, ranges=parts + [(tail, 0, 0)])

    def stream(
        self,
        request: server.Request,
        path: str,
        ranges: list[tuple[bytes, int, int]] | None = None,
        gzip: bool = False,
    ) -> Any:
        """Send (parts of) a file from disk with back-pressure; None for a whole file."""
        if request.method == b"HEAD":
            return b""
        try:
            f = open(path, "rb")
        except OSError:
            request.responseHeaders._rawHeaders.clear()
            return pages.error(request, 404)
        if gzip:
            from twisted.web.server import _GzipEncoder  # Twisted-private, checked on 26.10

            request.responseHeaders.removeHeader(b"Content-Length")
            request._encoder = _GzipEncoder(6, request)
        if ranges is None:
            static.NoRangeStaticProducer(request, f).start()
        elif len(ranges) == 1:
            static.SingleRangeStaticProducer(request, f, ranges[0][1], ranges[0][2]).start()
        else:
            static.MultipleRangeStaticProducer(request, f, ranges).start()
        return server.NOT_DONE_YET


def _header(request: server.Request, name: bytes) -> bytes | None:
    """The value of a request header (several lines joined with commas), or None."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


def _streamedGzipHeaders(entry: FileEntry) -> list[tuple[bytes, bytes]]:
    """Headers for a large text file compressed while it is sent (no length known in advance)."""
    return [
        (b"Last-Modified", entry.lastModified),
        (b"Content-Type", entry.contentType),
        (b"Vary", b"Accept-Encoding"),
        (b"ETag", entry.etag[:-1] + b'-gz"'),
        (b"Content-Encoding", b"gzip"),
    ]
