"""
Who the DNS service answers when C{allow:} is not set (issue 21): loopback and
the networks of the interface addresses it listens on -- as Unbound refuses all
but localhost until C{access-control} says otherwise, and dnsmasq answers only
its interfaces' subnets (C{--local-service}).  A wildcard bind (no
C{interface=}, C{0.0.0.0}, C{::}) adds nothing: loopback only, until C{allow:}
says more.  Everyone else gets REFUSED (counted as C{refused{reason=acl}}).

    defaultAllow(settings.listen) -> ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]

Interface networks come from C{getifaddrs(3)} (through ctypes: the standard
library has no netmask lookup); where it is unavailable, the bound address
alone (/32 or /128) is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import socket
import sys
from collections.abc import Iterable
from typing import Any

from netsvc.endpoints import split

#: Always answered (the machine itself).
LOOPBACK = ["127.0.0.0/8", "::1/128"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def defaultAllow(listeners: Iterable[Any]) -> list[str]:
    """
    The C{allow:} list a DNS service without one uses: L{LOOPBACK} plus, for each
    listener bound to a specific non-loopback address, the networks that address
    is configured with (see the module docstring).  Never raises.
    """
    out = list(LOOPBACK)
    for listener in listeners:
        for network in ownNetworks(getattr(listener, "endpoint", listener)):
            if network not in out:
                out.append(network)
    return out


def ownNetworks(endpoint: str) -> list[str]:
    """The networks of the address C{endpoint} binds to; [] for wildcard, loopback, unix and names."""
    try:
        kind, args, kwargs = split(endpoint)
    except ValueError:
        return []
    if kind in ("unix", "unix6"):
        return []
    interface = str(kwargs.get("interface", "")).strip("[]").replace("\\:", ":")
    try:
        address = ipaddress.ip_address(interface.split("%", 1)[0])
    except ValueError:
        return []  # no interface= (every address), or a name: loopback only unless allow says more
    if address.is_unspecified or address.is_loopback:
        return []
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    found = [str(net) for addr, net in interfaceAddresses() if addr == address]
    return found or [str(ipaddress.ip_network(address))]


# -- getifaddrs(3) ----------------------------------------------------------------------


class _SockAddr(ctypes.Structure):
    _fields_ = [("head", ctypes.c_ubyte * 2), ("data", ctypes.c_ubyte * 26)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("dstaddr", ctypes.POINTER(_SockAddr)),
    ("data", ctypes.c_void_p),
]


def _family(sa: _SockAddr) -> int:
    if sys.platform.startswith("linux"):
        return sa.head[0] | (sa.head[1] << 8) if sys.byteorder == "little" else (sa.head[0] << 8) | sa.head[1]
    return sa.head[1]  # BSD, macOS: sa_len, then sa_family


def _ip(sa: _SockAddr, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes(sa.data)
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[2:6])  # port, then the address
    return ipaddress.IPv6Address(raw[6:22])  # port, flow info, then the address


def interfaceAddresses() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]]:
    """C{(address, network)} for every IPv4/IPv6 address of this machine's interfaces; [] when unknown."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        getifaddrs, freeifaddrs = libc.getifaddrs, libc.freeifaddrs
    except (OSError, AttributeError):
        return []
    head = ctypes.POINTER(_IfAddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        return []
    out = []
    try:
        node = head
        while node:
            entry = node.contents
            if entry.addr and entry.netmask:
                family = _family(entry.addr.contents)
                if family in (socket.AF_INET, socket.AF_INET6):
                    try:
                        addr = _ip(entry.addr.contents, family)
                        mask = _ip(entry.netmask.contents, family)
                        prefix = bin(int(mask)).count("1")
                        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
                        out.append((addr, str(net)))
                    except ValueError:
                        pass
            node = entry.next
    finally:
        freeifaddrs(head)
    return out
