"""
What the C{netsvc} client commands share: HOST:PORT parsing, stream endpoints
(TLS verified by default), and one-line failure descriptions.
"""

from __future__ import annotations

import sys
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, endpoints, error

from netsvc.tls import CertificateError, clientCreator


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
    reasons = [r[2] for r in e.args[0] if isinstance(r, tuple) and len(r) == 3] if e.args else []
    return ", ".join(reasons) or str(e)


def describe(reason: BaseException, timeout: float | None = None) -> str:
    """One line for a client failure."""
    if isinstance(reason, defer.FirstError):
        reason = reason.subFailure.value
    if isinstance(reason, (defer.CancelledError, defer.TimeoutError, error.TimeoutError)):
        return f"timed out after {timeout:g}s" if timeout is not None else "timed out"
    if isinstance(reason, SSL.Error):
        return f"TLS failed: {sslReason(reason)}"
    if isinstance(reason, CertificateError):
        return str(reason)
    return str(reason) or type(reason).__name__


def checkArguments(command: str, args: Any, defaultPort: int) -> int | None:
    """
    Set C{args.host}/C{args.port} from C{args.address}; check the TLS options.
    Prints the problem and returns 2 (usage error), or returns None when all is well.
    """
    try:
        args.host, args.port = parseAddress(args.address, defaultPort)
    except ValueError as e:
        sys.stderr.write(f"netsvc {command}: {e}\n")
        return 2
    if (args.cacert or args.insecure) and not args.tls:
        sys.stderr.write(f"netsvc {command}: --cacert and --insecure go with --tls\n")
        return 2
    return None


def addConnectionOptions(p: Any) -> None:
    """The --tls/--cacert/--insecure/--timeout options every stream client has."""
    p.add_argument("--tls", action="store_true", help="TLS (certificate verified)")
    p.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in FILE")
    p.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
