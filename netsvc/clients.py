"""
What the C{netsvc} client commands share: HOST:PORT parsing, stream endpoints
(TLS verified by default), the exit-status table, and one voice for errors.

Every client ends with one of three statuses (L{EXIT_OK}, L{EXIT_FAILURE},
L{EXIT_USAGE}; see L{EXIT_STATUS_HELP}) and reports a failure as one line::

    netsvc <command>: <what it tried>: <reason in plain words>
    netsvc echo: localhost:7 (tcp): connection refused

L{describe} turns an exception into the reason, L{fail} writes the line.
TLS verification failures name the host name and the CA that were used and
say what to pass instead (L{TLSHint}).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import defer, endpoints, error

from netsvc.tls import CertificateError, clientCreator

#: The exit statuses of every netsvc client (curl-, dig- and socat-like tools document the same three).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

EXIT_STATUS_HELP = ("exit status (every command): 0 success; 1 failure (connection refused, TLS, "
                    "timeout, an error answer, a mismatch); 2 bad usage (options, arguments, unreadable files)")

#: A hint for a failed verification against the certificate `make run` generates.
SELF_SIGNED = "var/tls/selfsigned.pem"


def parseAddress(text: str, defaultPort: int) -> tuple[str, int]:
    """C{host:port}, C{[v6addr]:port}, C{host} (default port); raises ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port in {text!r}")
    return host, int(port) if port else defaultPort


def target(host: str, port: int, transport: str = "") -> str:
    """What a client tried, for its error lines: C{localhost:7 (tcp)}, C{[::1]:53 (udp)}."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{where} ({transport})" if transport else where


#: Set once the user has interrupted the command (Ctrl-C): failures that follow are not reported.
quiet = False


def fail(command: str, what: str, reason: str, status: int = EXIT_FAILURE) -> int:
    """Write C{netsvc COMMAND: WHAT: REASON} on stderr (unless L{quiet}); return C{status}."""
    if quiet:
        return status
    sys.stderr.write(f"netsvc {command}: {what}: {reason}\n" if what else f"netsvc {command}: {reason}\n")
    sys.stderr.flush()
    return status


@attrs.define
class TLSHint:
    """How a TLS client verified its peer: for the advice after a verification failure."""

    name: str
    cafile: str | None = None
    insecureOption: str = "-k/--insecure"

    def advice(self) -> str:
        if self.cafile:
            return (f"checked {self.name!r} against the CA file {self.cafile}; pass the CA that signed the "
                    f"server's certificate, or {self.insecureOption} to skip verification")
        return (f"checked {self.name!r} against the system CAs; pass --cacert FILE (make run's is "
                f"{SELF_SIGNED}) or {self.insecureOption} to skip verification")


def streamEndpoint(reactor: Any, host: str, port: int, tls: bool = False, cacert: str | None = None,
                   insecure: bool = False, timeout: float = 10.0) -> Any:
    """
    A client endpoint to C{host:port}: TCP (IPv4/IPv6, happy eyeballs), with TLS
    verified against C{cacert} or the system roots unless C{insecure}.

    @raise CertificateError: C{cacert} is unusable.
    """
    endpoint = endpoints.HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    if tls:
        endpoint = endpoints.wrapClientTLS(clientCreator(host, cafile=cacert, insecure=insecure), endpoint)
    return endpoint


def sslReason(e: SSL.Error) -> str:
    """The OpenSSL reason strings of an error, e.g. 'certificate verify failed'."""
    reasons = [r[2] for r in e.args[0] if isinstance(r, tuple) and len(r) == 3 and r[2]] \
        if e.args and isinstance(e.args[0], list) else []
    return ", ".join(reasons) or str(e) or "the TLS handshake failed"


def _oserror(e: BaseException) -> str | None:
    """The plain words of a socket error carried by a Twisted connection error, if any."""
    for arg in getattr(e, "args", ()):
        if isinstance(arg, OSError) and arg.strerror:
            return arg.strerror.lower()
    osError = getattr(e, "osError", None)
    if isinstance(osError, int):
        return os.strerror(osError).lower()
    return None


#: What OpenSSL says when the other side answered a ClientHello with something that is not TLS.
_NOT_TLS = ("wrong version number", "unexpected message", "packet length too long", "http request")


def describe(reason: BaseException, timeout: float | None = None, tls: TLSHint | None = None) -> str:
    """
    One line, in plain words, for a client failure: C{connection refused},
    C{timed out after 5s}, C{cannot resolve host name}, C{TLS: certificate
    verify failed (...)}.  With C{tls}, verification failures say which name
    and CA were used and what to pass.
    """
    if isinstance(reason, defer.FirstError):
        reason = reason.subFailure.value
    if isinstance(reason, (defer.CancelledError, defer.TimeoutError, error.TimeoutError)):
        return f"timed out after {timeout:g}s" if timeout is not None else "timed out"
    if isinstance(reason, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, error.DNSLookupError):
        return "cannot resolve host name"
    if isinstance(reason, error.NoRouteError):
        return "no route to host"
    if isinstance(reason, SSL.Error):
        text = sslReason(reason)
        if tls is not None and "verify failed" in text:
            return f"TLS: {text}: {tls.advice()}"
        if any(sign in text for sign in _NOT_TLS):
            return f"TLS: {text} (the server does not speak TLS on this port?)"
        return f"TLS: {text}"
    if type(reason).__name__ == "VerificationError":  # service_identity: the name is not in the certificate
        if tls is not None:
            return (f"TLS: the certificate is not valid for the name {tls.name!r}: use a name it has, "
                    f"or {tls.insecureOption} to skip verification")
        return f"TLS: the certificate does not match the host name ({reason})"
    if isinstance(reason, CertificateError):
        return str(reason)
    if isinstance(reason, error.ConnectionDone):
        return "connection closed by the server"
    if isinstance(reason, error.ConnectionLost):
        return "connection lost"
    if isinstance(reason, (error.ConnectError, error.ConnectionClosed)):
        plain = _oserror(reason)
        if plain:
            return plain
    return str(reason) or type(reason).__name__


def checkCAFile(command: str, cacert: str | None) -> int | None:
    """A C{--cacert FILE} that cannot be read is bad usage: print it, return 2 (else None)."""
    if cacert is None:
        return None
    from pathlib import Path

    from netsvc.tls import loadCertificates

    try:
        loadCertificates(Path(cacert), "CA file")
    except CertificateError as e:
        return fail(command, "", str(e), EXIT_USAGE)
    return None


def checkArguments(command: str, args: Any, defaultPort: int) -> int | None:
    """
    Set C{args.host}/C{args.port} from C{args.address}; check the TLS options.
    Prints the problem and returns 2 (usage error), or returns None when all is well.
    """
    try:
        args.host, args.port = parseAddress(args.address, defaultPort)
    except ValueError as e:
        return fail(command, "", str(e), EXIT_USAGE)
    if (args.cacert or args.insecure) and not args.tls:
        return fail(command, "", "--cacert and --insecure go with --tls", EXIT_USAGE)
    return checkCAFile(command, args.cacert)


def addConnectionOptions(p: Any) -> None:
    """The --tls/--cacert/--insecure/--timeout options every stream client has."""
    p.add_argument("--tls", action="store_true", help="TLS (certificate verified)")
    p.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in FILE (PEM)")
    p.add_argument("-k", "--insecure", action="store_true", help="do not verify the certificate")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="seconds to wait for the connection and each answer (default 5)")
