"""
Endpoint strings, in one place.

Everything Twisted's L{serverFromString} knows (C{tcp:}, C{tcp6:}, C{ssl:},
C{unix:}, C{tls:DIR} for SNI over a folder of PEMs, plugins ...) plus two
netsvc forms:

  - C{udp:PORT[:interface=ADDR]} -- a datagram listener (L{UDPServerEndpoint}).
  - C{tls:PORT[:interface=ADDR][:backlog=N]} -- TLS with the shared certificate
    (a numeric first argument tells it from Twisted's own C{tls:DIR} form).

IPv6 interfaces may be written plainly (C{interface=::1}); Twisted's syntax wants
the colons escaped (C{interface=\\:\\:1}), so L{normalize} escapes them.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins

from netsvc.schema import suggest


class EndpointError(ValueError):
    """An endpoint string is malformed; the message says how."""


_PLAIN_IPV6 = re.compile(r"(interface=)((?:[0-9A-Fa-f]*:)+[0-9A-Fa-f.]*(?:%\w+)?)(?=:\w+=|$)")


def normalize(description: str) -> str:
    """Escape the colons of plainly written IPv6 C{interface=} values."""
    return _PLAIN_IPV6.sub(lambda m: m.group(1) + m.group(2).replace(":", "\\:"), description)


def split(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint string into its type, positional and keyword arguments,
    following Twisted's rules (C{:} separates, C{\\} escapes).
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(normalize(description))
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    kind, rest = parts[0], parts[1:]
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in rest:
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        else:
            args.append(part)
    return kind, args, kwargs


def _serverTypes() -> list[str]:
    plugins = [p.prefix for p in getPlugins(IStreamServerEndpointStringParser)]
    return sorted(set(plugins) | {"tcp", "ssl", "unix", "udp"})


def _params(kind: str, args: list[str], kwargs: dict[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    """Map positional and keyword arguments onto C{allowed} names; check the port."""
    if len(args) > len(allowed):
        raise EndpointError(f"too many arguments for {kind}: {':'.join(args)}")
    params = dict(zip(allowed, args))
    for key, value in kwargs.items():
        if key not in allowed:
            raise EndpointError(f"unknown option {key!r} for {kind}:{suggest(key, allowed)}")
        if key in params:
            raise EndpointError(f"{key} given twice")
        params[key] = value
    if "port" not in params:
        raise EndpointError(f"{kind}: needs a port, e.g. {kind}:7007")
    params["port"] = str(_port(params["port"]))
    return params


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise EndpointError(f"port must be a number from 0 to 65535, got {text!r}")
    return int(text)


def isSharedTLS(kind: str, args: list[str], kwargs: dict[str, str]) -> bool:
    """C{tls:PORT...} (the shared certificate) as opposed to Twisted's C{tls:DIR...}."""
    return kind == "tls" and ((bool(args) and args[0].isdigit()) or (not args and "port" in kwargs))


_TWISTED_ERRORS = [
    (re.compile(r"unexpected keyword argument '(\w+)'"), "unknown option {0!r}"),
    (re.compile(r"invalid literal for int\(\) with base 10: '(.*)'"), "expected a number, got {0!r}"),
    (re.compile(r"Unknown endpoint type: '(.*)'"), "unknown endpoint type {0!r}"),
]


def validateServer(description: str) -> str:
    """
    Check a server endpoint string without listening.

    @return: C{"udp"} for datagram endpoints, C{"stream"} otherwise.
    @raise EndpointError: naming what is wrong.
    """
    if not isinstance(description, str) or ":" not in description:
        raise EndpointError(f"malformed endpoint {description!r}: "
                            "expected TYPE:ARGS, e.g. tcp:7007:interface=127.0.0.1")
    try:
        kind, args, kwargs = split(description)
        if kind == "udp":
            _params(kind, args, kwargs, ("port", "interface"))
            return "udp"
        if isSharedTLS(kind, args, kwargs):
            _params(kind, args, kwargs, ("port", "interface", "backlog"))
            return "stream"
        types = _serverTypes()
        if kind not in types:
            raise EndpointError(f"unknown endpoint type {kind!r}{suggest(kind, types)}")
        if kind in ("tcp", "tcp6", "ssl"):
            if args:
                _port(args[0])
            elif "port" in kwargs:
                _port(kwargs["port"])
        try:
            endpoints.serverFromString(MemoryReactor(), normalize(description))
        except Exception as e:  # Twisted's parsers raise anything from ValueError to OSError
            reason = str(e) or type(e).__name__
            for pattern, phrase in _TWISTED_ERRORS:
                m = pattern.search(reason)
                if m:
                    reason = phrase.format(*m.groups())
                    break
            raise EndpointError(reason) from None
    except EndpointError as e:
        raise EndpointError(f"malformed endpoint {description!r}: {e}") from None
    return "stream"


def isDatagram(description: str) -> bool:
    return split(description)[0] == "udp"


class UDPServerEndpoint:
    """
    Listens for datagrams: C{listen(datagramProtocol)} fires with the
    L{IListeningPort}.  C{maxPacketSize} bounds what one read takes.
    """

    def __init__(self, reactor: Any, port: int, interface: str = "", maxPacketSize: int = 65535) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.maxPacketSize = maxPacketSize

    def listen(self, protocol: Any) -> defer.Deferred:
        return defer.execute(self.reactor.listenUDP, self.port, protocol, self.interface,
                             self.maxPacketSize)


def serverFromString(reactor: Any, description: str, certificate: Any = None,
                     acceptableProtocols: Any = None) -> IStreamServerEndpoint | UDPServerEndpoint:
    """
    Build a server endpoint from a (validated) endpoint string.

    @param certificate: the shared L{netsvc.tls.ServerCertificate}, used by C{tls:PORT}.
    @param acceptableProtocols: ALPN protocol names for C{tls:PORT}.
    """
    validateServer(description)
    kind, args, kwargs = split(description)
    if kind == "udp":
        p = _params(kind, args, kwargs, ("port", "interface"))
        return UDPServerEndpoint(reactor, int(p["port"]), p.get("interface", ""))
    if isSharedTLS(kind, args, kwargs):
        if certificate is None:
            raise EndpointError(f"{description!r}: no shared certificate configured")
        p = _params(kind, args, kwargs, ("port", "interface", "backlog"))
        interface = p.get("interface", "")
        tcp = endpoints.TCP6ServerEndpoint if isIPv6Address(interface) else endpoints.TCP4ServerEndpoint
        from netsvc.tls import TLSServerEndpoint

        return TLSServerEndpoint(
            certificate.connectionCreator(acceptableProtocols),
            tcp(reactor, int(p["port"]), int(p.get("backlog", 50)), interface),
        )
    return endpoints.serverFromString(reactor, normalize(description))


# -- client side ---------------------------------------------------------------
#
#   tcp:host=HOST:port=PORT[:timeout=S][:bindAddress=ADDR]   (also tcp:HOST:PORT, tcp6:)
#   tls:host=HOST:port=PORT[:sni=NAME][:cafile=PEM][:insecure=yes]
#       [:cert=PEM][:key=PEM][:alpn=h2,http/1.1][:timeout=S]   (ssl: is the same)
#   unix:path=PATH[:timeout=S]                                  (also unix:PATH)
#   udp:host=HOST:port=PORT
#
# TLS verifies the server's certificate (against cafile, else the system's roots)
# and its name (sni, else host), and sends SNI -- unless insecure=yes is written.
# Twisted's own ssl: client string does not verify without caCertsDir; ours does.
# IPv6 hosts may be written in brackets: tcp:host=[::1]:port=80.

_CLIENT_PARAMS = {
    "tcp": ("host", "port", "timeout", "bindAddress"),
    "tls": ("host", "port", "timeout", "bindAddress", "sni", "cafile", "insecure", "cert", "key", "alpn"),
    "unix": ("path", "timeout"),
    "udp": ("host", "port"),
}
_CLIENT_ALIASES = {"tcp6": "tcp", "ssl": "tls"}
_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.%\w]*)\]")
_TRUE = ("yes", "true", "1", "on")
_FALSE = ("no", "false", "0", "off")


class ClientSpec:
    """
    A parsed client endpoint string: C{kind} (tcp, tls, unix, udp), C{host},
    C{port}, C{path}, C{timeout} (None: the caller's), and the TLS options.
    C{str()} is a short label for logs and metrics (C{10.0.0.5:80}, C{tls://h:443}).
    """

    def __init__(self, description: str, kind: str, params: dict[str, str]) -> None:
        self.description = description
        self.kind = kind
        self.host: str = params.get("host", "")
        self.port: int = int(params.get("port", 0) or 0)
        self.path: str = params.get("path", "")
        self.timeout: float | None = float(params["timeout"]) if "timeout" in params else None
        bind = params.get("bindAddress")
        self.bindAddress: tuple[str, int] | None = (bind, 0) if bind else None
        self.sni: str = params.get("sni") or self.host
        self.cafile: str | None = params.get("cafile")
        self.insecure: bool = params.get("insecure", "no").lower() in _TRUE
        self.cert: str | None = params.get("cert")
        self.key: str | None = params.get("key")
        self.alpn: list[bytes] = [p.encode() for p in params.get("alpn", "").split(",") if p]

    @property
    def isIPLiteral(self) -> bool:
        from twisted.internet.abstract import isIPAddress

        return isIPAddress(self.host) or isIPv6Address(self.host)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = {"tcp": "", "tls": "tls://", "udp": "udp://"}[self.kind]
        return f"{prefix}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"ClientSpec({self.description!r})"


def parseClient(description: str) -> ClientSpec:
    """
    Parse and check a client endpoint string.

    @raise EndpointError: naming what is wrong.
    """
    if not isinstance(description, str) or ":" not in description:
        raise EndpointError(f"malformed endpoint {description!r}: expected TYPE:ARGS, "
                            f"e.g. tcp:host=127.0.0.1:port=80")
    try:
        escaped = _BRACKETED.sub(lambda m: m.group(1).replace(":", "\\:"), description)
        kind, args, kwargs = split(escaped)
        kind = _CLIENT_ALIASES.get(kind, kind)
        if kind not in _CLIENT_PARAMS:
            raise EndpointError(f"unknown client endpoint type {kind!r}{suggest(kind, _CLIENT_PARAMS)}"
                                f"; use tcp, tls, unix or udp")
        allowed = _CLIENT_PARAMS[kind]
        positional = ("path",) if kind == "unix" else ("host", "port")
        if len(args) > len(positional):
            raise EndpointError(f"too many arguments for {kind}: {':'.join(args)}")
        params = dict(zip(positional, args))
        for key, value in kwargs.items():
            if key == "caCertsDir" and kind == "tls":
                raise EndpointError("caCertsDir is not supported; give cafile=PEM")
            if key not in allowed:
                raise EndpointError(f"unknown option {key!r} for {kind}:{suggest(key, allowed)}")
            if key in params:
                raise EndpointError(f"{key} given twice")
            params[key] = value
        if kind == "unix":
            if not params.get("path"):
                raise EndpointError("unix: needs a path, e.g. unix:path=/run/app.sock")
        else:
            if not params.get("host"):
                raise EndpointError(f"{kind}: needs a host, e.g. {kind}:host=127.0.0.1:port=80")
            if "port" not in params:
                raise EndpointError(f"{kind}: needs a port, e.g. {kind}:host=127.0.0.1:port=80")
            if _port(params["port"]) == 0:
                raise EndpointError("port 0 cannot be connected to")
        if "timeout" in params:
            try:
                if float(params["timeout"]) <= 0:
                    raise ValueError
            except ValueError:
                raise EndpointError(f"timeout must be a positive number of seconds, "
                                    f"got {params['timeout']!r}") from None
        if "insecure" in params and params["insecure"].lower() not in _TRUE + _FALSE:
            raise EndpointError(f"insecure must be yes or no, got {params['insecure']!r}")
        if "key" in params and "cert" not in params:
            raise EndpointError("key= goes with cert=")
        if params.get("insecure", "no").lower() in _TRUE and "cafile" in params:
            raise EndpointError("cafile= and insecure=yes contradict each other")
    except EndpointError as e:
        raise EndpointError(f"malformed endpoint {description!r}: {e}") from None
    return ClientSpec(description, kind, params)


def validateClient(description: str) -> str:
    """
    Check a client endpoint string without connecting.

    @return: C{"udp"} for datagram endpoints, C{"stream"} otherwise.
    @raise EndpointError: naming what is wrong.
    """
    return "udp" if parseClient(description).kind == "udp" else "stream"


class UDPClientEndpoint:
    """
    Where datagrams go: C{connect(datagramProtocol)} binds an ephemeral local
    port, connects it to the (resolved) host and port, and fires with the
    L{IListeningPort}.
    """

    def __init__(self, reactor: Any, host: str, port: int, interface: str | None = None) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.interface = interface

    @defer.inlineCallbacks
    def connect(self, protocol: Any) -> Any:
        from twisted.internet.abstract import isIPAddress

        address = self.host
        if not (isIPAddress(address) or isIPv6Address(address)):
            address = yield self.reactor.resolve(address)
        interface = self.interface if self.interface is not None else ("::" if ":" in address else "")
        port = self.reactor.listenUDP(0, protocol, interface=interface)
        port.connect(address, self.port)
        return port


def tlsCreatorFor(spec: ClientSpec) -> Any:
    """
    The client TLS connection creator for a C{tls:} spec: verified (cafile or
    system roots) unless insecure, SNI from C{sni} (else host), optional client
    certificate.  @raise netsvc.tls.CertificateError: a file is unusable.
    """
    from netsvc.tls import clientCreator

    return clientCreator(spec.sni, cafile=spec.cafile, insecure=spec.insecure,
                         acceptableProtocols=spec.alpn or None, certFile=spec.cert, keyFile=spec.key)


def clientFromString(reactor: Any, description: str | ClientSpec, timeout: float = 30.0) -> Any:
    """
    Build a client endpoint: an L{IStreamClientEndpoint} for tcp/tls/unix, a
    L{UDPClientEndpoint} for udp.  C{timeout} is the connect timeout unless the
    string gives one.

    @raise EndpointError: the string is malformed.
    @raise netsvc.tls.CertificateError: a TLS file (cafile, cert) is unusable.
    """
    spec = description if isinstance(description, ClientSpec) else parseClient(description)
    timeout = spec.timeout if spec.timeout is not None else timeout
    if spec.kind == "udp":
        return UDPClientEndpoint(reactor, spec.host, spec.port)
    if spec.kind == "unix":
        return endpoints.UNIXClientEndpoint(reactor, spec.path, timeout=timeout)
    if spec.isIPLiteral:  # no resolver round trip (HostnameEndpoint would ask one)
        tcp = endpoints.TCP6ClientEndpoint if isIPv6Address(spec.host) else endpoints.TCP4ClientEndpoint
        stream: Any = tcp(reactor, spec.host, spec.port, timeout=timeout, bindAddress=spec.bindAddress)
    else:
        stream = endpoints.HostnameEndpoint(reactor, spec.host.encode("idna"), spec.port,
                                            timeout=timeout, bindAddress=spec.bindAddress)
    if spec.kind == "tls":
        stream = endpoints.wrapClientTLS(tlsCreatorFor(spec), stream)
    return stream
