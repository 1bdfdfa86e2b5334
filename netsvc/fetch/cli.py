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
import sys
from typing import Any, BinaryIO, TextIO

from twisted.internet import defer
from twisted.web import client as webclient

from netsvc.fetch.body import stdout
from netsvc.fetch.errors import Usage
from netsvc.fetch.fetcher import USER_AGENT, Fetcher


def fetch(reactor: Any, args: argparse.Namespace, pool: Any = None, out: BinaryIO | None = None,
          err: TextIO | None = None, isatty: bool | None = None) -> defer.Deferred:
    """
    Run C{netsvc fetch} with parsed C{args}; fires with the exit status.  Without
    C{pool}, a persistent connection pool (redirects and mirrors on one host reuse
    a connection), closed before the Deferred fires.
    """
    err = err if err is not None else sys.stderr
    out = out if out is not None else stdout()
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
