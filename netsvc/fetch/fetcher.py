"""
One C{netsvc fetch} run (L{Fetcher}): the options checked and turned into
headers, a body, a sink and a cookie jar; then each URL (mirror) tried in
turn, with redirects, resume, retries and the response shown as asked.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from http.cookiejar import LoadError
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlencode, urljoin, urlsplit

from twisted.internet import defer, task
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from netsvc import __version__
from netsvc.clients import TLSHint
from netsvc.fetch.body import BodyReceiver, Decoder, FileSink, Sink, StreamSink, contentRange
from netsvc.fetch.cookies import CurlCookieJar
from netsvc.fetch.errors import Failed, Usage, describe
from netsvc.fetch.progress import Progress, columns
from netsvc.fetch.request import URI, FileBody, UploadProducer, WireAgent, normalizeURL, origin, parseHeader, remoteName
from netsvc.tls import CertificateError, httpsPolicy

USER_AGENT = f"netsvc-fetch/{__version__}"
ACCEPT_ENCODING = "gzip, deflate"
REDIRECTS = {301, 302, 303, 307, 308}
#: Request headers that must not follow a redirect to another origin.
CREDENTIALS = {"authorization", "cookie", "proxy-authorization"}
#: Headers describing a request body, dropped when a redirect turns it into a GET.
BODY_HEADERS = {"content-type", "content-length", "content-encoding"}


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
        self.sink: Sink = (FileSink(output, args.resume) if output not in (None, "-")
                            else StreamSink(out))
        self.toFile = isinstance(self.sink, FileSink)
        showBar = isatty and not args.silent
        self.progress = (Progress(reactor, err, os.path.basename(output) if self.toFile else "-",
                                  bar=showBar, width=columns(err))
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
        """The request body (bytes, a L{FileBody}, or None) and its default Content-Type."""
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
                return FileBody(path), "application/octet-stream"
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
                        where = url if e.url in ("", url) else f"{url} (redirected to {e.url})"
                        self.err.write(f"netsvc fetch: {where}: {e}"
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
                    if origin(target) != origin(url):
                        headers = [(n, v) for n, v in headers if n.lower() not in CREDENTIALS]
                    if self.args.verbose:
                        self.err.write(f"* {code}: following to {target}\n")
                    url = target
                    continue
                self.note(f"{url}: not following the {code} redirect of a {method} to "
                          f"{location.decode('latin-1')} (only 303 is followed after {method})")
            if resumeFrom and code == 416:
                await self._receive(response, url, sink=None)
                _, length = contentRange(response)
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

    def _errorSink(self) -> Sink | None:
        return StreamSink(self.out) if self.args.include and not self.toFile else None

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
        wire = WireAgent(self.agent, acceptEncoding)
        http = _treqClient(wire, self.jar)
        timer: Any = None
        producer = None
        if body is not None:
            producer = UploadProducer(body, lambda: timer is not None and timer.active()
                                       and timer.reset(self.args.timeout))
        d = http.request(method, URI.from_text(url), headers=h, data=producer, allow_redirects=False,
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
            raise Failed(describe(e, self.args.timeout, self._tlsHint(url)), url) from None
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

    def _showRequest(self, method: str, url: str, wire: WireAgent) -> None:
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

    def _tlsHint(self, url: str) -> TLSHint | None:
        """For a verification failure: the name checked, the CA used, what to pass."""
        parts = urlsplit(url)
        return TLSHint(parts.hostname or "", self.args.cacert) if parts.scheme == "https" else None

    async def _receive(self, response: Any, url: str, sink: Sink | None, decoder: Decoder | None = None,
                       progress: Progress | None = None) -> None:
        receiver = BodyReceiver(self.reactor, self.args.timeout, decoder, sink, progress)
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
        unknown = [e for e in encodings if e not in Decoder.SUPPORTED]
        decoder = None
        if self.args.raw:
            pass
        elif unknown:
            if not self.explicitEncoding:
                raise Failed(f"unsupported Content-Encoding {', '.join(unknown)}", url)
            self.note(f"{url}: Content-Encoding {', '.join(encodings)} left as it is")
        elif encodings:
            decoder = Decoder(encodings)
        offset = 0
        if resumeFrom and code == 206:
            first, _ = contentRange(response)
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
            _, total = contentRange(response)
            if total is not None and total != self.sink.present:
                raise Failed(f"{self.sink.name} has {self.sink.present} bytes after resuming, "
                             f"the server said {total}", url)
        if self.progress is not None:
            self.progress.finish(self.sink.present, complete=self.toFile)


def _treqClient(agent: IAgent, jar: Any) -> Any:
    from treq.client import HTTPClient

    return HTTPClient(agent, cookiejar=jar)
