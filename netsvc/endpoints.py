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

from netsvc.config import suggest


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
        raise EndpointError(f"malformed endpoint {description!r}: expected TYPE:ARGS, e.g. tcp:7007:interface=127.0.0.1")
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
