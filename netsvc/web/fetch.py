"""
C{netsvc fetch}: an HTTP(S) client on treq, for people used to curl and wget.

    netsvc fetch http://localhost:8080/                     # body to standard output
    netsvc fetch https://localhost:8443/ --cacert var/tls/selfsigned.pem -o index.html
    netsvc fetch -I http://localhost:8080/big.iso            # HEAD: status line and headers
    netsvc fetch -d name=ann -d lang=fr http://localhost:8080/form    # POST, form-encoded
    netsvc fetch --json '{"n": 1}' http://localhost:8080/api           # POST, JSON
    netsvc fetch --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://localhost:8080/up
    netsvc fetch --cookie-jar cookies.txt http://localhost:8080/login  # cookies loaded and saved
    netsvc fetch -C -o big.iso http://a.test/big.iso http://b.test/big.iso  # resume; mirrors
    netsvc fetch -u admin:secret -v http://localhost:8080/status      # basic auth; headers on stderr
    netsvc fetch --retry 5 --timeout 10 -o big.iso http://a.test/big.iso

Several URLs are mirrors of one resource, tried in turn: when one fails
(connection refused, timeout, TLS failure, an HTTP error status, too many
redirects) the next one is used, resuming with a Range request what the
failed one already delivered; --retry N goes through them again after
transient failures (connection, timeout, 5xx, 408, 429).  Redirects are
followed (--max-redirects, 10 by default); after a POST only a 303 is
followed (as a GET), like curl and browsers.  Responses compressed with gzip
or deflate are decoded (--raw: not asked for, not decoded).  HTTPS
certificates are verified (system roots, or --cacert FILE) unless --insecure.

Without -o the body goes to standard output, byte for byte.  With -o the
file is only created once a successful response arrives, and a failed
transfer leaves the part received for --continue.  -i prints each response's
status line and headers to standard output (with -o too: the file gets only
the body); the body of an error response (4xx, 5xx) is shown only with -i.

Exit status: 0 on success, 1 when every URL failed (the reason of each on
standard error, e.g. "netsvc fetch: http://h/x: 404 Not Found"), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import base64
import errno
import io
import json
import os
import re
import shutil
import stat
import sys
import time
import zlib
from http.cookiejar import LoadError, MozillaCookieJar
from typing import Any, BinaryIO, TextIO
from urllib.parse import unquote, urlencode, urljoin, urlsplit

from hyperlink import EncodedURL
from twisted.internet import defer, error, task
from twisted.internet.protocol import Protocol
from twisted.web import client as webclient
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from netsvc import __version__, clients
from netsvc.tls import CertificateError, httpsPolicy

USER_AGENT = f"netsvc-fetch/{__version__}"
ACCEPT_ENCODING = "gzip, deflate"
REDIRECTS = {301, 302, 303, 307, 308}
#: Request headers that must not follow a redirect to another origin.
CREDENTIALS = {"authorization", "cookie", "proxy-authorization"}
#: Headers describing a request body, dropped when a redirect turns it into a GET.
BODY_HEADERS = {"content-type", "content-length", "content-encoding"}


class Usage(Exception):
    """Bad command line; the message says what (exit status 2)."""


class Failed(Exception):
    """One URL failed.  C{final}: no point trying the other mirrors (a local problem)."""

    quiet = False

    def __init__(self, message: str, url: str = "", final: bool = False, transient: bool = True) -> None:
        super().__init__(message)
        self.url = url
        self.final = final
        self.transient = transient and not final


# -- the wire ------------------------------------------------------------------------


@implementer(IAgent)
class _WireAgent:
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


class DecodeError(Exception):
    """The body is not valid data in its Content-Encoding."""


class _Decoder:
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


# -- where the body goes -------------------------------------------------------------


class _Sink:
    """Where the body goes.  C{present}: bytes already there that a Range request can skip."""

    present = 0
    name = "-"

    def begin(self, offset: int) -> None:
        """A body that starts at byte C{offset} of the resource is coming."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StreamSink(_Sink):
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


class _FileSink(_Sink):
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


# -- progress ------------------------------------------------------------------------


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


def _columns(stream: Any) -> int:
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


# -- receiving a body ----------------------------------------------------------------


class _BodyReceiver(Protocol):
    """
    Decodes, writes to the sink and counts; aborts when no byte arrives for
    C{timeout} seconds.  C{done} fires with None, or fails with the reason.
    """

    def __init__(self, clock: Any, timeout: float, decoder: _Decoder | None, sink: _Sink | None,
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


# -- one run -------------------------------------------------------------------------


#: twisted.web.client's exceptions that carry the real reasons in C{.reasons}.
_WRAPPERS = (webclient.ResponseFailed, webclient.ResponseNeverReceived, webclient.RequestTransmissionFailed,
             webclient.RequestGenerationFailed)


def describe(reason: BaseException, timeout: float | None = None) -> str:
    """One line for a request failure, digging into twisted.web's wrapper exceptions."""
    while isinstance(reason, _WRAPPERS) and reason.reasons:
        inner = [r.value for r in reason.reasons
                 if not isinstance(r.value, (error.ConnectionDone, webclient.ResponseDone))]
        if not inner:
            inner = [r.value for r in reason.reasons]
        if isinstance(reason, webclient.ResponseFailed) and isinstance(
                inner[0], (error.ConnectionLost, error.ConnectionDone)):
            return "connection closed before the whole body arrived"
        reason = inner[0]
    if isinstance(reason, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed by the server"
    if isinstance(reason, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, error.DNSLookupError):
        return "cannot resolve the host name"
    return clients.describe(reason, timeout)


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


class _URI(EncodedURL):
    """A URI from L{normalizeURL}, given to treq so it is not encoded again (nor IPv6 literals broken)."""

    def to_uri(self) -> _URI:
        return self


def remoteName(url: str) -> str:
    """The last path segment of C{url}, for C{-O}; raise L{Usage} when there is none."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Usage(f"{url}: no file name in the URL; use -o FILE")
    return name


def _contentRange(response: Any) -> tuple[int | None, int | None]:
    """(first byte, complete length) from C{Content-Range: bytes a-b/n} or C{bytes */n}."""
    value = (response.headers.getRawHeaders(b"content-range") or [b""])[0].decode("latin-1")
    unit, _, spec = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None
    span, _, length = spec.partition("/")
    first = span.partition("-")[0].strip()
    return (int(first) if first.isdigit() else None, int(length) if length.strip().isdigit() else None)


class CurlCookieJar(MozillaCookieJar):
    """
    A Netscape cookie file as curl writes and reads it, session cookies included:
    the standard library writes their expiry as an empty field (curl skips the
    line) and reads curl's 0 as long expired; it also drops the C{#HttpOnly_} mark.
    """

    def load(self, filename: Any = None, ignore_discard: bool = True, ignore_expires: bool = False) -> None:
        super().load(filename, ignore_discard=True, ignore_expires=True)
        now = time.time()
        for cookie in list(self):
            if cookie.expires == 0:
                cookie.expires, cookie.discard = None, True
            elif not ignore_expires and cookie.is_expired(now):
                self.clear(cookie.domain, cookie.path, cookie.name)

    def save(self, filename: Any = None, ignore_discard: bool = True, ignore_expires: bool = False) -> None:
        now = time.time()
        lines = ["# Netscape HTTP Cookie File\n# Written by netsvc fetch; curl -b/-c read it too.\n\n"]
        for c in self:
            if not ignore_expires and c.is_expired(now):
                continue
            httpOnly = any(c.has_nonstandard_attr(n) for n in ("HttpOnly", "HTTPOnly", "httponly"))
            domain = ("#HttpOnly_" if httpOnly else "") + c.domain
            name, value = (c.name, c.value) if c.value is not None else ("", c.name)
            fields = [domain, "TRUE" if c.domain.startswith(".") else "FALSE", c.path,
                      "TRUE" if c.secure else "FALSE", str(c.expires or 0), name, value]
            lines.append("\t".join(fields) + "\n")
        fd = os.open(filename or self.filename, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(lines))


class Fetcher:
    """
    One C{netsvc fetch} run: the options, the treq client, the cookie jar, and
    where the body goes.  L{run} fires with the exit status.
    """

    def __init__(self, reactor: Any, args: argparse.Namespace, pool: Any, out: BinaryIO, err: TextIO,
                 isatty: bool) -> None:
        self.reactor = reactor
        self.args = args
        self.out = out
        self.err = err
        self.urls = [normalizeURL(u) for u in args.urls]
        if args.max_redirects < 0:
            raise Usage("--max-redirects must be 0 or more")
        if not args.timeout > 0:
            raise Usage("--timeout must be more than 0 seconds")
        if args.retry < 0 or args.retry_delay < 0:
            raise Usage("--retry and --retry-delay must be 0 or more")
        self.headers: list[tuple[str, str]] = []
        removed: set[str] = set()
        for text in args.header or []:
            name, value = parseHeader(text)
            if value is None:
                removed.add(name.lower())
            else:
                self.headers.append((name, value))
        if args.user is not None:
            user, colon, password = args.user.partition(":")
            if not colon:
                raise Usage("--user wants USER:PASSWORD")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self.headers.append(("Authorization", f"Basic {token}"))
        given = {n.lower() for n, _ in self.headers} | removed
        if "user-agent" not in given:
            self.headers.append(("User-Agent", args.user_agent or USER_AGENT))
        if "accept" not in given:
            self.headers.append(("Accept", "application/json, */*" if args.json is not None else "*/*"))
        if "accept-encoding" in removed or (args.raw and "accept-encoding" not in given):
            self.acceptEncoding: str | None = None
        else:
            self.acceptEncoding = next((v for n, v in self.headers if n.lower() == "accept-encoding"),
                                       ACCEPT_ENCODING)
        self.explicitEncoding = "accept-encoding" in given
        self.headers = [(n, v) for n, v in self.headers if n.lower() != "accept-encoding"]
        self.body, self.contentType = self._requestBody()
        if args.head:
            self.method = "HEAD"
        else:
            self.method = (args.request or ("POST" if self.body is not None else "GET")).upper()
        if self.contentType and "content-type" not in given:
            self.headers.append(("Content-Type", self.contentType))

        output = args.output
        if args.remote_name:
            output = remoteName(self.urls[0])
        if args.resume and (output is None or output == "-"):
            raise Usage("--continue needs an output file (-o FILE or -O)")
        self.sink: _Sink = (_FileSink(output, args.resume) if output not in (None, "-")
                            else _StreamSink(out))
        self.toFile = isinstance(self.sink, _FileSink)
        showBar = isatty and not args.silent
        self.progress = (Progress(reactor, err, os.path.basename(output) if self.toFile else "-",
                                  bar=showBar, width=_columns(err))
                         if (self.toFile and not args.silent) or showBar else None)

        self.jarPath = args.cookie_jar
        self.jar = CurlCookieJar()
        if self.jarPath and os.path.exists(self.jarPath):
            try:
                self.jar.load(self.jarPath)
            except (LoadError, OSError) as e:
                raise Usage(f"cannot load cookie jar {self.jarPath}: {e}") from None
        try:
            policy = httpsPolicy(args.cacert, args.insecure)
        except CertificateError as e:
            raise Usage(str(e)) from None
        self.pool = pool
        self.agent = webclient.Agent(reactor, contextFactory=policy, connectTimeout=args.timeout, pool=pool)

    def _requestBody(self) -> tuple[Any, str | None]:
        """The request body (bytes, a L{_FileBody}, or None) and its default Content-Type."""
        a = self.args
        given = [x for x in (a.data, a.json, a.data_binary) if x is not None]
        if len(given) > 1:
            raise Usage("use only one of --data, --json, --data-binary")
        if a.data:
            fields = []
            for field in a.data:
                name, eq, value = field.partition("=")
                if not eq:
                    raise Usage(f"bad --data {field!r}: expected NAME=VALUE")
                fields.append((name, value))
            return urlencode(fields).encode("ascii"), "application/x-www-form-urlencoded"
        if a.json is not None:
            try:
                json.loads(a.json)
            except ValueError as e:
                raise Usage(f"--json is not valid JSON: {e}") from None
            return a.json.encode("utf-8"), "application/json"
        if a.data_binary is not None:
            if a.data_binary == "@-":
                return sys.stdin.buffer.read(), "application/octet-stream"
            if a.data_binary.startswith("@"):
                path = a.data_binary[1:]
                try:
                    with open(path, "rb"):
                        pass
                except OSError as e:
                    raise Usage(f"cannot read {path}: {e.strerror}") from None
                return _FileBody(path), "application/octet-stream"
            return a.data_binary.encode("utf-8"), "application/octet-stream"
        return None, None

    def note(self, text: str) -> None:
        if not self.args.silent:
            self.err.write(f"netsvc fetch: {text}\n")
            self.err.flush()

    async def run(self) -> int:
        status = 1
        self._interruptedAlready = False
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._interrupted)
        try:
            rounds = self.args.retry + 1
            for round_ in range(rounds):
                transient = again = False
                for i, url in enumerate(self.urls):
                    try:
                        await self._attempt(url)
                        status = 0
                        break
                    except Failed as e:
                        if self._interruptedAlready or e.quiet:
                            return 1
                        transient = transient or e.transient
                        more = i + 1 < len(self.urls) and not e.final
                        again = not more and not e.final and transient and round_ + 1 < rounds
                        delay = min(self.args.retry_delay * 2 ** round_, 60.0)
                        self.err.write(f"netsvc fetch: {e.url or url}: {e}"
                                       f"{'; trying the next mirror' if more else ''}"
                                       f"{f'; trying again in {delay:g}s' if again else ''}\n")
                        self.err.flush()
                        if not more:
                            break
                if not again:
                    break
                await task.deferLater(self.reactor, delay, lambda: None)
            if status and self.toFile and self.sink.present:
                self.note(f"{self.sink.present} bytes kept in {self.sink.name} (resume with --continue)")
        finally:
            if not self._interruptedAlready:
                self.reactor.removeSystemEventTrigger(trigger)
                try:
                    self.sink.close()
                except Failed as e:
                    self.err.write(f"netsvc fetch: {e}\n")
                    status = 1
                if self.jarPath:
                    status = self._saveJar() or status
                if self.pool is not None:
                    # A TLS close may wait for the server's close_notify: not for long.
                    closed = self.pool.closeCachedConnections().addTimeout(2, self.reactor)
                    try:
                        await closed
                    except defer.TimeoutError:
                        pass
        return status

    def _interrupted(self) -> None:
        """The reactor stops (Ctrl-C) in the middle of the run: keep what was received, and the cookies."""
        self._interruptedAlready = True
        if self.progress is not None:
            self.progress.bar = self.progress._shown = False
        try:
            self.sink.close()
        except Failed:
            pass
        if self.toFile and self.sink.present:
            self.err.write(f"\nnetsvc fetch: interrupted; {self.sink.present} bytes kept in {self.sink.name} "
                           "(resume with --continue)\n")
        if self.jarPath:
            self._saveJar()

    def _saveJar(self) -> int:
        try:
            if os.path.exists(self.jarPath) and not os.path.isfile(self.jarPath):
                # /dev/null (curl's "-c /dev/null") or a pipe: write through, never replace it.
                self.jar.save(self.jarPath)
                return 0
            tmp = self.jarPath + ".tmp"
            self.jar.save(tmp)
            os.replace(tmp, self.jarPath)
        except OSError as e:
            self.err.write(f"netsvc fetch: cannot save cookie jar {self.jarPath}: {e.strerror or e}\n")
            return 1
        return 0

    # -- one URL and its redirects

    async def _attempt(self, url: str) -> None:
        method, body = self.method, self.body
        headers = list(self.headers)
        redirects = 0
        while True:
            resumeFrom = self.sink.present if method == "GET" else 0
            response = await self._request(method, url, headers, body, resumeFrom)
            code = response.code
            location = (response.headers.getRawHeaders(b"location") or [None])[0]
            if code in REDIRECTS and location is not None and not self.args.no_follow:
                if method in ("GET", "HEAD") or code == 303:
                    await self._receive(response, url, sink=None)
                    redirects += 1
                    if redirects > self.args.max_redirects:
                        raise Failed(f"too many redirects (more than {self.args.max_redirects})", url)
                    target = urljoin(url, location.decode("latin-1").strip())
                    if urlsplit(target).scheme.lower() not in ("http", "https"):
                        raise Failed(f"redirect to unsupported URL {target}", url)
                    try:
                        target = normalizeURL(target)
                    except Usage as e:
                        raise Failed(f"bad redirect: {e}", url) from None
                    if code == 303 and method != "HEAD":
                        method, body = "GET", None
                        headers = [(n, v) for n, v in headers if n.lower() not in BODY_HEADERS]
                    if _origin(target) != _origin(url):
                        headers = [(n, v) for n, v in headers if n.lower() not in CREDENTIALS]
                    if self.args.verbose:
                        self.err.write(f"* {code}: following to {target}\n")
                    url = target
                    continue
                self.note(f"{url}: not following the {code} redirect of a {method} to "
                          f"{location.decode('latin-1')} (only 303 is followed after {method})")
            if resumeFrom and code == 416:
                await self._receive(response, url, sink=None)
                _, length = _contentRange(response)
                if length is None or length == resumeFrom:
                    self.note(f"{self.sink.name} is already complete ({resumeFrom} bytes)")
                    return
                raise Failed(f"cannot resume: {self.sink.name} has {resumeFrom} bytes, "
                             f"the server's copy has {length}", url, final=length < resumeFrom)
            if code >= 400:
                phrase = response.phrase.decode("latin-1", "replace")
                await self._receive(response, url, sink=self._errorSink())
                raise Failed(f"{code} {phrase}".strip(), url, transient=code >= 500 or code in (408, 429))
            await self._body(response, url, method, resumeFrom)
            return

    def _errorSink(self) -> _Sink | None:
        return _StreamSink(self.out) if self.args.include and not self.toFile else None

    async def _request(self, method: str, url: str, headers: list[tuple[str, str]], body: Any,
                       resumeFrom: int) -> Any:
        h = Headers()
        for name, value in headers:
            h.addRawHeader(name.encode("latin-1"), value.encode("utf-8"))
        acceptEncoding = self.acceptEncoding
        if resumeFrom:
            h.setRawHeaders(b"range", [f"bytes={resumeFrom}-".encode()])
            if not self.explicitEncoding:
                acceptEncoding = "identity"  # byte offsets of the identity representation
        wire = _WireAgent(self.agent, acceptEncoding)
        http = _treqClient(wire, self.jar)
        timer: Any = None
        producer = None
        if body is not None:
            producer = _UploadProducer(body, lambda: timer is not None and timer.active()
                                       and timer.reset(self.args.timeout))
        d = http.request(method, _URI.from_text(url), headers=h, data=producer, allow_redirects=False,
                         unbuffered=True, reactor=self.reactor)
        # Until the response headers: at most --timeout seconds without progress (of the upload too).
        timer = self.reactor.callLater(self.args.timeout, d.cancel)
        if self.args.verbose and wire.sent is not None:
            self._showRequest(method, url, wire)
        try:
            response = await d
        except defer.CancelledError:
            raise Failed(f"timed out after {self.args.timeout:g}s", url) from None
        except Exception as e:
            raise Failed(describe(e, self.args.timeout), url) from None
        finally:
            if timer.active():
                timer.cancel()
            if producer is not None:
                producer.close()
        # ContentDecoderAgent leaves an empty Content-Encoding where there was none.
        if wire.contentEncoding:
            response.headers.setRawHeaders(b"content-encoding", wire.contentEncoding)
        else:
            response.headers.removeHeader(b"content-encoding")
        self._showResponse(response)
        return response

    def _showRequest(self, method: str, url: str, wire: _WireAgent) -> None:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"> {method} {target} HTTP/1.1", f"> Host: {parts.netloc.rpartition('@')[2]}"]
        for name, values in (wire.sent.getAllRawHeaders() if wire.sent else []):
            for v in values:
                lines.append(f"> {name.decode('latin-1')}: {v.decode('latin-1')}")
        self.err.write("\n".join(lines) + "\n>\n")

    def _showResponse(self, response: Any) -> None:
        version = response.version
        status = f"{version[0].decode()}/{version[1]}.{version[2]} {response.code} " \
                 f"{response.phrase.decode('latin-1', 'replace')}"
        lines = [status] + [f"{n.decode('latin-1')}: {v.decode('latin-1')}"
                            for n, vs in response.headers.getAllRawHeaders() for v in vs]
        # twisted.web keeps the connection-control headers to itself; show the length at least.
        if isinstance(response.length, int) and not response.headers.hasHeader(b"content-length"):
            lines.append(f"Content-Length: {response.length}")
        if self.args.verbose:
            self.err.write("".join(f"< {line}\n" for line in lines) + "<\n")
        if self.args.include or self.method == "HEAD":
            try:
                self.out.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                self.out.flush()
            except OSError as e:
                raise Failed(f"cannot write output: {e.strerror or e}", final=True) from None

    async def _receive(self, response: Any, url: str, sink: _Sink | None, decoder: _Decoder | None = None,
                       progress: Progress | None = None) -> None:
        receiver = _BodyReceiver(self.reactor, self.args.timeout, decoder, sink, progress)
        response.deliverBody(receiver)
        try:
            await receiver.done
        except Failed as e:
            e.url = e.url or url
            raise
        except Exception as e:
            raise Failed(describe(e, self.args.timeout), url) from None

    async def _body(self, response: Any, url: str, method: str, resumeFrom: int) -> None:
        """A successful response: its body into the sink, resuming if the server agreed."""
        code = response.code
        encodings = [e.strip().lower() for v in response.headers.getRawHeaders(b"content-encoding", [])
                     for e in v.decode("latin-1").split(",") if e.strip()]
        unknown = [e for e in encodings if e not in _Decoder.SUPPORTED]
        decoder = None
        if self.args.raw:
            pass
        elif unknown:
            if not self.explicitEncoding:
                raise Failed(f"unsupported Content-Encoding {', '.join(unknown)}", url)
            self.note(f"{url}: Content-Encoding {', '.join(encodings)} left as it is")
        elif encodings:
            decoder = _Decoder(encodings)
        offset = 0
        if resumeFrom and code == 206:
            first, _ = _contentRange(response)
            if first != resumeFrom:
                raise Failed(f"asked for bytes from {resumeFrom}, the server sent from {first}", url)
            if decoder is not None and decoder.encodings:
                raise Failed("the server compressed a partial response; cannot resume", url)
            offset = resumeFrom
            self.note(f"resuming {self.sink.name} at byte {resumeFrom}")
        elif resumeFrom:
            self.note(f"{url}: the server ignored the range request; starting from the beginning")
        if method == "HEAD" or code in (204, 304):
            await self._receive(response, url, sink=None)
            return
        self.sink.begin(offset)
        length = response.length if isinstance(response.length, int) else None
        if self.progress is not None:
            self.progress.start(offset, length)
        try:
            await self._receive(response, url, self.sink, decoder, self.progress)
        except Failed:
            if self.progress is not None:
                self.progress.finish(self.sink.present, complete=False)
            raise
        if code == 206:
            _, total = _contentRange(response)
            if total is not None and total != self.sink.present:
                raise Failed(f"{self.sink.name} has {self.sink.present} bytes after resuming, "
                             f"the server said {total}", url)
        if self.progress is not None:
            self.progress.finish(self.sink.present, complete=self.toFile)


class _FileBody:
    """A request body read from a file, opened anew for each request (mirrors, retries)."""

    def __init__(self, path: str) -> None:
        self.path = path


@implementer(IBodyProducer)
class _UploadProducer:
    """
    A request body (bytes or a L{_FileBody}) streamed by C{FileBodyProducer};
    C{progress()} is called for every piece written, so a long upload is not a timeout.
    """

    def __init__(self, body: Any, progress: Any) -> None:
        self._file: Any = open(body.path, "rb") if isinstance(body, _FileBody) else io.BytesIO(body)
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


def _origin(url: str) -> tuple[str, str | None, int | None]:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    return scheme, p.hostname, p.port or (443 if scheme == "https" else 80)


def _treqClient(agent: IAgent, jar: Any) -> Any:
    from treq.client import HTTPClient

    return HTTPClient(agent, cookiejar=jar)


# -- the command ---------------------------------------------------------------------


def fetch(reactor: Any, args: argparse.Namespace, pool: Any = None, out: BinaryIO | None = None,
          err: TextIO | None = None, isatty: bool | None = None) -> defer.Deferred:
    """
    Run C{netsvc fetch} with parsed C{args}; fires with the exit status.  Without
    C{pool}, a persistent connection pool (redirects and mirrors on one host reuse
    a connection), closed before the Deferred fires.
    """
    err = err if err is not None else sys.stderr
    out = out if out is not None else _stdout()
    if isatty is None:
        isatty = err.isatty() and (args.output not in (None, "-") or args.remote_name
                                   or not sys.stdout.isatty())
    if pool is None:
        pool = webclient.HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
    try:
        fetcher = Fetcher(reactor, args, pool, out, err, isatty)
    except Usage as e:
        err.write(f"netsvc fetch: {e}\n")
        return defer.succeed(2)
    return defer.Deferred.fromCoroutine(fetcher.run())


def _stdout() -> BinaryIO:
    return _QuietPipe(sys.stdout.buffer)


class _QuietPipe:
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


def run(reactor: Any, args: argparse.Namespace) -> defer.Deferred:
    return fetch(reactor, args)


def addParser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("fetch", help="HTTP(S) client: GET/HEAD/POST, downloads with resume and mirrors",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="+", metavar="URL", help="the resource; more URLs are mirrors of it")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", metavar="FILE", help="write the body to FILE (- : standard output)")
    out.add_argument("-O", "--remote-name", action="store_true",
                     help="write the body to a file named like the URL's last path segment")
    out.add_argument("-C", "--continue", dest="resume", action="store_true",
                     help="resume a partial FILE with a Range request")
    out.add_argument("-i", "--include", action="store_true",
                     help="print the status line and headers (and error bodies) to standard output")
    out.add_argument("-s", "--silent", action="store_true",
                     help="no progress and no notes (errors are still reported)")
    out.add_argument("-S", "--show-error", action="store_true",
                     help="accepted for curl habits: errors are always shown")
    out.add_argument("-v", "--verbose", action="store_true", help="show the request and response headers")
    req = p.add_argument_group("request")
    req.add_argument("-X", "--request", metavar="METHOD", help="method (default GET, or POST with a body)")
    req.add_argument("-I", "--head", action="store_true", help="HEAD: show the status line and headers")
    req.add_argument("-d", "--data", action="append", metavar="NAME=VALUE",
                     help="a form field (repeatable): POST application/x-www-form-urlencoded")
    req.add_argument("--json", metavar="JSON", help="POST this JSON text (application/json)")
    req.add_argument("--data-binary", metavar="DATA|@FILE",
                     help="POST these bytes, or FILE's (@- : standard input), as they are")
    req.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'",
                     help="an extra header (repeatable); 'NAME:' removes a default one")
    req.add_argument("-u", "--user", metavar="USER:PASSWORD", help="HTTP basic authentication")
    req.add_argument("-A", "--user-agent", metavar="TEXT", help=f"User-Agent (default {USER_AGENT})")
    req.add_argument("--cookie-jar", metavar="FILE",
                     help="load cookies from FILE and save them back (Netscape/curl format)")
    req.add_argument("--max-redirects", type=int, default=10, metavar="N",
                     help="follow at most N redirects (default 10)")
    req.add_argument("--no-follow", action="store_true", help="do not follow redirects")
    req.add_argument("--raw", action="store_true",
                     help="no Accept-Encoding; the body is written as received, even if compressed")
    conn = p.add_argument_group("connection")
    conn.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in FILE (PEM)")
    conn.add_argument("-k", "--insecure", action="store_true", help="do not verify the server's certificate")
    conn.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up on a URL when nothing arrives for SECONDS (default 30)")
    conn.add_argument("--retry", type=int, default=0, metavar="N",
                      help="after a transient failure of every URL (connection, timeout, 5xx, 408, 429), "
                           "go through them again, up to N more times")
    conn.add_argument("--retry-delay", type=float, default=1.0, metavar="SECONDS",
                      help="wait before the first retry, doubled each time (default 1)")
    p.set_defaults(run=run)
    return p
