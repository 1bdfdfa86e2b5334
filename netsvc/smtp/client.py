"""
C{netsvc mail}: send a message, look after the relay's queue, add relay users.

    echo "Hello" | netsvc mail send --server localhost:2525 --from me@lab --to you@example.org -s Hi
    netsvc mail send --server localhost:2587 --starttls --cacert var/tls/selfsigned.pem \\
        --user alice --password-file pw.txt --from alice@lab --to bob@example.org \\
        --subject Report --attach report.pdf < body.txt
    netsvc mail send --server localhost:2465 --tls --cacert var/tls/selfsigned.pem ...
    netsvc mail queue list [--config etc/netsvc.yaml]
    netsvc mail queue show ID | retry [ID] | delete ID
    netsvc mail adduser alice --users etc/users.txt [--password-file FILE]

C{send} reads the body from standard input (UTF-8), builds a MIME message (a
Date, Message-ID and MIME-Version of its own; each C{--attach} with the type
its name says) and sends it; with C{-v} it prints the dialogue.  TLS
certificates are verified (C{--cacert FILE} or the system roots) unless
C{--insecure}; a password is sent only over TLS.

Exit status: 0 when every recipient was accepted, 1 on a failure (connection,
TLS, AUTH, a refused recipient or message), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import email.policy
import email.utils
import getpass
import io
import mimetypes
import os
import socket
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints

from netsvc import clients
from netsvc.smtp.sender import SMTPSender
from netsvc.smtp.sendertypes import Outgoing, Recipient, SessionError
from netsvc.tls import CertificateError, clientCreator

#: What mimetypes' "encoding" (a compressed file) means as a content type.
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
               "compress": "application/x-compress", "br": "application/x-brotli"}


class UsageError(Exception):
    """Bad arguments or unreadable input files: exit status 2."""


def fail(what: str, reason: str) -> int:
    sys.stderr.write(f"netsvc mail: {what}: {reason}\n")
    return 1


def contentType(path: str) -> tuple[str, str]:
    """(maintype, subtype) for a file name; application/octet-stream when unknown."""
    kind, encoding = mimetypes.guess_type(path, strict=False)
    if encoding:
        kind = _COMPRESSED.get(encoding, "application/octet-stream")
    maintype, _, subtype = (kind or "application/octet-stream").partition("/")
    return maintype, subtype


def composeMessage(sender: str, recipients: list[str], subject: str | None, body: str,
                   attachments: list[str] = (), date: float | None = None) -> bytes:
    """
    The message as bytes with CRLF line ends: headers (From, To, Subject, Date,
    Message-ID, MIME-Version), the body as text/plain (UTF-8 when not ASCII),
    and each attachment as a base64 part of its guessed type.

    @raise UsageError: an attachment cannot be read.
    """
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    if subject is not None:
        message["Subject"] = subject
    message["Date"] = email.utils.formatdate(date, localtime=True)
    domain = sender.rpartition("@")[2] or socket.getfqdn()
    message["Message-ID"] = email.utils.make_msgid(domain=domain.encode("idna").decode("ascii"))
    message.set_content(body)
    for path in attachments:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"--attach {path}: {e.strerror or e}") from None
        maintype, subtype = contentType(path)
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=os.path.basename(path))
    for part in message.iter_parts():
        del part["MIME-Version"]  # the email package repeats it in each part; it belongs at the top
    data = message.as_bytes()
    if "MIME-Version" not in message:
        data = b"MIME-Version: 1.0\r\n" + data
    return data


def readPassword(args: argparse.Namespace) -> str:
    """From --password-file (first line) or a prompt on the terminal; @raise UsageError."""
    if args.password_file:
        try:
            lines = Path(args.password_file).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"--password-file {args.password_file}: {e.strerror or e}") from None
        return lines[0] if lines else ""
    try:
        tty = open("/dev/tty")  # the body is on standard input: ask the terminal
        tty.close()
    except OSError:
        raise UsageError("--user needs --password-file when there is no terminal to ask on") from None
    return getpass.getpass(f"Password for {args.user}: ")


def _printTrace(out: Any) -> Any:
    def trace(direction: str, line: str) -> None:
        out.write(f"{direction} {line}\n")
        out.flush()
    return trace


@defer.inlineCallbacks
def send(reactor: Any, args: argparse.Namespace, data: bytes, password: str | None, out: Any = None) -> Any:
    """Connect, send C{data} to every --to; returns the exit status."""
    out = out or sys.stdout
    where = f"{args.host}:{args.port}"
    try:
        creator = clientCreator(args.host, cafile=args.cacert, insecure=args.insecure) \
            if (args.tls or args.starttls) else None
    except CertificateError as e:
        return fail(f"--cacert {args.cacert}", str(e))
    endpoint = clients.streamEndpoint(reactor, args.host, args.port, args.tls, args.cacert, args.insecure,
                                      args.timeout)
    message = Outgoing(args.sender, [Recipient(a) for a in args.to], lambda: io.BytesIO(data), len(data),
                       eightBit=not data.isascii())
    pending = [message]
    results: list[Any] = []

    def nextMessage() -> Outgoing | None:
        return pending.pop() if pending else None

    sender = SMTPSender(args.helo, nextMessage, lambda m, r: results.extend(r),
                        starttls="required" if args.starttls else "none",
                        tlsCreator=creator, auth=(args.user, password) if args.user else None,
                        timeout=args.timeout, trace=_printTrace(out) if args.verbose else None)
    try:
        d = endpoints.connectProtocol(endpoint, sender)
        d.addTimeout(args.timeout, reactor)
        yield d
    except Exception as e:
        return fail(f"connecting to {where}", clients.describe(e, args.timeout))
    try:
        yield sender.done
    except SessionError as e:
        if not results:  # (with results, the transaction ended and only the QUIT went wrong)
            return fail(f"sending to {where}", clients.describe(e))
    status = 0
    accepted = []
    for rcpt, reply in results:
        if reply.ok:
            accepted.append(rcpt.address)
        else:
            status = fail(f"{rcpt.address}", str(reply))
    if accepted:
        final = next(str(r) for _, r in results if r.ok)
        if not args.verbose:
            out.write(f"sent to {len(accepted)} of {len(results)} recipient(s): {final}\n")
    return status


def runSend(reactor: Any, args: argparse.Namespace) -> Any:
    try:
        args.host, args.port = clients.parseAddress(args.server, 25)
        if args.tls and args.starttls:
            raise UsageError("--tls and --starttls exclude each other")
        if (args.cacert or args.insecure) and not (args.tls or args.starttls):
            raise UsageError("--cacert and --insecure go with --tls or --starttls")
        if args.user and not (args.tls or args.starttls):
            raise UsageError("--user needs --starttls or --tls (the password would travel in clear)")
        if args.password_file and not args.user:
            raise UsageError("--password-file goes with --user")
        if not args.to:
            raise UsageError("give at least one --to ADDRESS")
        for address in [args.sender] + args.to:
            if any(c in address for c in "<> \r\n") or (address and "@" not in address):
                raise UsageError(f"not a mail address: {address!r}")
        if args.cacert:
            try:
                clientCreator(args.host, cafile=args.cacert)
            except CertificateError as e:
                raise UsageError(f"--cacert {args.cacert}: {e}") from None
        password = readPassword(args) if args.user else None
        raw = sys.stdin.buffer.read()
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the body (standard input) is not UTF-8 text") from None
        data = composeMessage(args.sender, args.to, args.subject, body, args.attach)
    except (UsageError, ValueError) as e:
        sys.stderr.write(f"netsvc mail: {e}\n")
        return 2
    return send(reactor, args, data, password)


def addParser(sub: Any) -> argparse.ArgumentParser:
    from netsvc.smtp import queuecli

    p = sub.add_parser("mail", help="send mail; the relay's queue and users",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="mailCommand", metavar="COMMAND", required=True)
    s = commands.add_parser("send", help="send a message (body from standard input)")
    s.add_argument("--server", default="localhost:25", metavar="HOST:PORT",
                   help="the SMTP server (default localhost:25)")
    s.add_argument("--starttls", action="store_true", help="STARTTLS before anything else (required)")
    s.add_argument("--tls", action="store_true", help="implicit TLS (SMTPS, e.g. port 465)")
    s.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in FILE")
    s.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    s.add_argument("--user", help="AUTH as USER (PLAIN or LOGIN; only over TLS)")
    s.add_argument("--password-file", metavar="FILE", help="the password (first line); default: a prompt")
    s.add_argument("--from", dest="sender", required=True, metavar="ADDRESS", help="the sender (MAIL FROM)")
    s.add_argument("--to", action="append", default=[], metavar="ADDRESS", help="a recipient (repeatable)")
    s.add_argument("-s", "--subject", help="the Subject header")
    s.add_argument("--attach", action="append", default=[], metavar="FILE", help="attach FILE (repeatable)")
    s.add_argument("--helo", default=socket.getfqdn() or "localhost", help="the EHLO name")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply (default 30)")
    s.add_argument("-v", "--verbose", action="store_true", help="print the SMTP dialogue")
    s.set_defaults(run=runSend)
    queuecli.addParsers(commands)
    return p
