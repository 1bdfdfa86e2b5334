"""
What C{netsvc fetch} sends: URLs (L{normalizeURL}, L{remoteName}), C{-H} headers
(L{parseHeader}), request bodies streamed from memory or a file
(L{UploadProducer}), and L{WireAgent}, the agent that keeps the request and
response headers on the wire what fetch decides.
"""

from __future__ import annotations

import io
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from hyperlink import EncodedURL
from twisted.internet import defer
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from netsvc.fetch.errors import Usage


@implementer(IAgent)
class WireAgent:
    """
    The agent beneath treq's fixed stack, so the request and response on the wire
    are what fetch decides.  treq always adds C{ContentDecoderAgent(gzip)}: it
    appends C{Accept-Encoding: gzip} to every request (Range requests included,
    where a compressed partial body could not be appended to the file) and decodes
    gzip without noticing truncation, nor deflate at all.  This agent sets
    Accept-Encoding to C{acceptEncoding} (None: no header) and hides
    Content-Encoding from the layers above; L{Fetcher} puts it back and decodes.
    """

    def __init__(self, agent: IAgent, acceptEncoding: str | None) -> None:
        self.agent = agent
        self.acceptEncoding = acceptEncoding
        self.sent: Headers | None = None
        self.contentEncoding: list[bytes] | None = None

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> defer.Deferred:
        headers = headers.copy() if headers is not None else Headers()
        if self.acceptEncoding is None:
            headers.removeHeader(b"accept-encoding")
        else:
            headers.setRawHeaders(b"accept-encoding", [self.acceptEncoding.encode("latin-1")])
        self.sent = headers

        def hide(response: Any) -> Any:
            self.contentEncoding = response.headers.getRawHeaders(b"content-encoding")
            response.headers.removeHeader(b"content-encoding")
            return response

        return self.agent.request(method, uri, headers, bodyProducer).addCallback(hide)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parseHeader(text: str) -> tuple[str, str | None]:
    """C{'Name: value'} -> (name, value); C{'Name:'} -> (name, None): remove it; C{'Name;'}: empty."""
    if text.endswith(";") and ":" not in text:
        return text[:-1].strip(), ""
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not _TOKEN.fullmatch(name) or "\n" in value or "\r" in value:
        raise Usage(f"bad header {text!r}: expected 'Name: value'")
    value = value.strip()
    return name, (value if value else None)


def normalizeURL(text: str) -> str:
    """
    The URI (ASCII: IDNA host, percent-escaped path and query) of C{text},
    C{http://} added when there is no scheme; raise L{Usage} unless http(s) with a host.
    """
    if "://" not in text:
        text = "http://" + text
    try:
        url = EncodedURL.from_text(text)
        if url.scheme.lower() not in ("http", "https"):
            raise Usage(f"{text}: only http:// and https:// URLs are supported")
        if not url.host or (url.port is not None and not 0 < url.port < 65536):
            raise ValueError("bad host or port")
        try:
            if ":" in url.host:  # IPv6 literal: hyperlink would IDNA-encode it (hyperlink#68)
                raise ValueError
            uri = url.to_uri()
        except ValueError:
            if not url.host.isascii():
                raise
            uri = url.replace(host="placeholder.invalid").to_uri().replace(host=url.host.lower())
    except ValueError as e:
        raise Usage(f"{text}: bad URL ({e})" if str(e) else f"{text}: bad URL") from None
    return uri.replace(scheme=uri.scheme.lower()).to_text()


class URI(EncodedURL):
    """A URI from L{normalizeURL}, given to treq so it is not encoded again (nor IPv6 literals broken)."""

    def to_uri(self) -> URI:
        return self


def remoteName(url: str) -> str:
    """The last path segment of C{url}, for C{-O}; raise L{Usage} when there is none."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Usage(f"{url}: no file name in the URL; use -o FILE")
    return name


class FileBody:
    """A request body read from a file, opened anew for each request (mirrors, retries)."""

    def __init__(self, path: str) -> None:
        self.path = path


@implementer(IBodyProducer)
class UploadProducer:
    """
    A request body (bytes or a L{FileBody}) streamed by C{FileBodyProducer};
    C{progress()} is called for every piece written, so a long upload is not a timeout.
    """

    def __init__(self, body: Any, progress: Any) -> None:
        self._file: Any = open(body.path, "rb") if isinstance(body, FileBody) else io.BytesIO(body)
        self._producer = webclient.FileBodyProducer(self._file)
        self.length = self._producer.length
        self._progress = progress

    def startProducing(self, consumer: Any) -> defer.Deferred:
        progress = self._progress

        class Counting:
            def write(self, data: bytes) -> None:
                progress()
                consumer.write(data)

        return self._producer.startProducing(Counting())

    def pauseProducing(self) -> None:
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()

    def close(self) -> None:
        self._file.close()


def origin(url: str) -> tuple[str, str | None, int | None]:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    return scheme, p.hostname, p.port or (443 if scheme == "https" else 80)


def _treqClient(agent: IAgent, jar: Any) -> Any:
    from treq.client import HTTPClient

    return HTTPClient(agent, cookiejar=jar)
