"""
The PROXY protocol (HAProxy, versions 1 and 2): building the header we send to
a backend, and reading the one a load balancer in front of us sends.

Spec: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt

Our own reader rather than L{twisted.protocols.haproxy}: that one is a protocol
wrapper (it would hide half-close from the relay), and its v2 parser raises on a
header that arrives in pieces shorter than 16 bytes.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 header, CRLF included (section 2.1).
V1_MAX = 107
#: We refuse v2 headers with more TLV data than this (HAProxy's own limit is similar).
V2_MAX = 16 + 2048

_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL
_FAMILIES = {0x11: (4, 12), 0x12: (4, 12), 0x21: (16, 36), 0x22: (16, 36)}

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The connection does not start with a valid PROXY header."""


def _pair(
    source: Address, destination: Address
) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress] | None:
    try:
        src = ipaddress.ip_address(source[0].split("%", 1)[0])
        dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    except ValueError:
        return None
    if src.version != dst.version:  # one side IPv4, the other IPv6: both as IPv6
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        if dst.version == 4:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


def v1(source: Address | None, destination: Address | None) -> bytes:
    """C{PROXY TCP4 src dst sport dport\\r\\n} (or C{PROXY UNKNOWN\\r\\n} for non-IP peers)."""
    pair = _pair(source, destination) if source and destination else None
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")  # type: ignore[index]


def v2(source: Address | None, destination: Address | None, datagram: bool = False) -> bytes:
    """
    The binary header: signature, version/command, family/transport, length,
    addresses.  Non-IP peers (unix sockets) get the PROXY command with the
    UNSPEC family and no addresses, which tells the receiver to use the real ones.
    """
    pair = _pair(source, destination) if source and destination else None
    if pair is None:
        return V2_SIGNATURE + bytes([_V2_PROXY, 0x00]) + b"\x00\x00"
    src, dst = pair
    transport = 0x02 if datagram else 0x01
    family = (0x10 if src.version == 4 else 0x20) | transport
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])  # type: ignore[index]
    return V2_SIGNATURE + bytes([_V2_PROXY, family]) + struct.pack("!H", len(body)) + body


class HeaderReader:
    """
    Reads a v1 or v2 header from the start of a stream.  L{feed} returns None
    while more bytes are needed, else C{(source, destination, rest)} where the
    addresses are C{(host, port)} or None (LOCAL, UNKNOWN, UNSPEC: use the real
    connection's) and C{rest} is what followed the header.

    @raise ProxyHeaderError: not a PROXY header, or a malformed one.
    """

    def __init__(self) -> None:
        #: At most L{V2_MAX} bytes: appended to in place (no copy of what came before per read).
        self.buffer = bytearray()

    def feed(self, data: bytes) -> tuple[Address | None, Address | None, bytes] | None:
        buf = self.buffer
        buf += data
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] == V2_SIGNATURE[:n]:
            return self._v2(buf) if n == len(V2_SIGNATURE) else None
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] == V1_PREFIX[:n]:
            return self._v1(buf) if n == len(V1_PREFIX) else None
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")

    def _v1(self, buf: bytes) -> tuple[Address | None, Address | None, bytes] | None:
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
            return None
        line, rest = bytes(buf[:end]), bytes(buf[end + 2 :])
        parts = line.split(b" ")
        if len(parts) >= 2 and parts[1] == b"UNKNOWN":
            return None, None, rest
        if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
            raise ProxyHeaderError(f"malformed PROXY v1 header {line[:V1_MAX]!r}")
        try:
            src = ipaddress.ip_address(parts[2].decode("ascii"))
            dst = ipaddress.ip_address(parts[3].decode("ascii"))
            sport, dport = int(parts[4]), int(parts[5])
        except (ValueError, UnicodeDecodeError):
            raise ProxyHeaderError(f"malformed PROXY v1 header {line!r}") from None
        want = 4 if parts[1] == b"TCP4" else 6
        if src.version != want or dst.version != want or not (0 <= sport < 65536 and 0 <= dport < 65536):
            raise ProxyHeaderError(f"malformed PROXY v1 header {line!r}")
        # An IPv4-mapped address is the IPv4 client, as in v2 (a TCP6 line from a dual-stack proxy); the
        # hex form was what v2 headers of the same connection gave as plain IPv4 (found by fuzzing).
        return (_plain(src), sport), (_plain(dst), dport), rest

    def _v2(self, buf: bytes) -> tuple[Address | None, Address | None, bytes] | None:
        if len(buf) < 16:
            return None
        verCmd, family, length = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
        if verCmd >> 4 != 2 or (verCmd & 0x0F) not in (0, 1):
            raise ProxyHeaderError(f"unsupported PROXY v2 version/command 0x{verCmd:02x}")
        if 16 + length > V2_MAX:
            raise ProxyHeaderError(f"PROXY v2 header too long ({length} bytes)")
        if len(buf) < 16 + length:
            return None
        body, rest = bytes(buf[16 : 16 + length]), bytes(buf[16 + length :])
        if verCmd == _V2_LOCAL or family not in _FAMILIES:
            return None, None, rest  # LOCAL (health checks), UNSPEC, unix: the real addresses count
        size, need = _FAMILIES[family]
        if length < need:
            raise ProxyHeaderError("PROXY v2 header too short for its address family")
        cls = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
        src, dst = cls(body[:size]), cls(body[size : 2 * size])
        sport, dport = struct.unpack("!HH", body[2 * size : 2 * size + 4])
        return (_plain(src), sport), (_plain(dst), dport), rest


def _plain(addr: ipaddress._BaseAddress) -> str:
    """IPv4-mapped IPv6 addresses as plain IPv4, for ACLs and logs."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped if mapped is not None else addr)
