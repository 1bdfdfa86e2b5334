"""
The hot path's wire format: read a query's header, question and EDNS option
without building objects, and answer from stored response bytes.

Everything else (upstream answers, local data, the client) goes through
L{twisted.names.dns}; this module is only what every query touches.

A stored answer (L{Stored}) is a whole response minus its ID, flags and
question name: the counts, the question's type and class, and the sections,
with the offsets of every TTL.  Serving it is concatenating the query's ID and
flags, the counts, the query's own name bytes (so the question comes back in
the client's case) and the sections with TTLs aged -- recomputed at most once
a second per entry.
"""

from __future__ import annotations

import struct

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
               16: "BADVERS"}

OPT = 41
#: IXFR, AXFR: a resolver does not serve them (NOTIMP).
ZONE_TRANSFERS = frozenset({251, 252})
#: The UDP payload size we advertise and send at most (DNS flag day 2020).
EDNS_PAYLOAD = 1232
#: Our OPT record: root name, type OPT, class = payload size, no extended rcode/flags, no options.
OPT_RECORD = b"\x00\x00\x29" + struct.pack("!H", EDNS_PAYLOAD) + b"\x00\x00\x00\x00\x00\x00"
#: The same, saying BADVERS (extended rcode 16 -> upper bits 1 in the TTL's first byte).
OPT_BADVERS = b"\x00\x00\x29" + struct.pack("!H", EDNS_PAYLOAD) + b"\x01\x00\x00\x00\x00\x00"

_HEADER = struct.Struct("!HHHHHH")
_IDFLAGS = struct.Struct("!HH")
_COUNTS = struct.Struct("!HHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TYPECLASS = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength


class BadQuery(Exception):
    """
    A query that gets no normal answer: C{rcode} is what to answer (None: drop
    silently); C{query} is what could be read of it (for the ID and question).
    """

    def __init__(self, rcode: int | None, query: Query | None = None, reason: str = "") -> None:
        super().__init__(reason or RCODE_NAMES.get(rcode or 0, "drop"))
        self.rcode = rcode
        self.query = query
        self.reason = reason


class Query:
    """What the hot path needs of a query.  C{qname} is the name's wire bytes as sent."""

    __slots__ = ("id", "flags", "qname", "qtype", "qclass", "key", "edns", "payload", "badvers")

    def __init__(self, id: int, flags: int) -> None:
        self.id = id
        self.flags = flags
        self.qname = b""
        self.qtype = 0
        self.qclass = 0
        self.key: tuple[bytes, int, int] = (b"", 0, 0)
        self.edns = False
        self.payload = 512
        self.badvers = False


def readQuestionName(data: bytes, pos: int) -> int:
    """
    The end of the uncompressed name starting at C{pos}.

    @raise ValueError: truncated, a compression pointer, or longer than 255 bytes.
    """
    start = pos
    n = len(data)
    while True:
        if pos >= n:
            raise ValueError("truncated name")
        length = data[pos]
        if length == 0:
            pos += 1
            if pos - start > 255:
                raise ValueError("name longer than 255 bytes")
            return pos
        if length > 63:
            raise ValueError("compressed or extended label in a question")
        pos += length + 1
        if pos - start > 255:
            raise ValueError("name longer than 255 bytes")


def skipName(data: bytes, pos: int) -> int:
    """The end of a possibly compressed name at C{pos} (pointers are not followed)."""
    n = len(data)
    count = 0
    while True:
        if pos >= n:
            raise ValueError("truncated name")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise ValueError("truncated pointer")
            return pos + 2
        if length > 63:
            raise ValueError("bad label type")
        pos += length + 1
        count += length + 1
        if count > 255:
            raise ValueError("name longer than 255 bytes")


_OPT_FIXED = struct.Struct("!HHIH")  # type, class (payload), ttl (ext rcode, version, flags), rdlength


def parseQuery(data: bytes) -> Query:
    """
    Read a query.  Work is bounded by the datagram's length: no pointer is followed.

    @raise BadQuery: saying what to answer (or to drop it).
    """
    n = len(data)
    if n < 12:
        raise BadQuery(None, reason="shorter than a header")
    id, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    query = Query(id, flags)
    if flags & 0xF800:  # QR or an opcode other than QUERY
        if flags & QR:
            raise BadQuery(None, reason="a response, not a query")
        raise BadQuery(NOTIMP, query, "opcode not supported")
    if qd != 1 or an or ns:
        raise BadQuery(FORMERR, query, "not exactly one question")
    pos = 12
    while True:  # the question name: uncompressed, at most 255 bytes
        if pos >= n:
            raise BadQuery(FORMERR, query, "truncated name")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            raise BadQuery(FORMERR, query, "compressed or extended label in a question")
        pos += length + 1
        if pos > 267:
            raise BadQuery(FORMERR, query, "name longer than 255 bytes")
    if pos + 4 > n:
        raise BadQuery(FORMERR, query, "truncated question")
    qname = query.qname = data[12:pos]
    query.qtype, query.qclass = _TYPECLASS.unpack_from(data, pos)
    query.key = (qname.lower(), query.qtype, query.qclass)
    if query.qtype in ZONE_TRANSFERS:
        raise BadQuery(NOTIMP, query, "zone transfers are not served")
    pos += 4
    if ar == 0:
        if pos != n:
            raise BadQuery(FORMERR, query, "trailing bytes")
        return query
    if ar == 1 and n >= pos + 11 and data[pos] == 0:
        # The usual case: one OPT record.
        rtype, rclass, ttl, rdlen = _OPT_FIXED.unpack_from(data, pos + 1)
        if rtype == OPT and pos + 11 + rdlen == n:
            query.edns = True
            query.payload = EDNS_PAYLOAD if rclass >= EDNS_PAYLOAD else (rclass if rclass > 512 else 512)
            if ttl & 0x00FF0000:
                raise BadQuery(BADVERS, query, "unsupported EDNS version")
            return query
    if ar > 8:
        raise BadQuery(FORMERR, query, "too many additional records")
    try:
        for _ in range(ar):
            nameStart = pos
            pos = skipName(data, pos)
            if pos + 10 > n:
                raise ValueError("truncated record")
            rtype, rclass, ttl, rdlen = _RR.unpack_from(data, pos)
            pos += 10 + rdlen
            if pos > n:
                raise ValueError("truncated rdata")
            if rtype == OPT:
                if query.edns or data[nameStart] != 0:
                    raise ValueError("bad OPT record")
                query.edns = True
                query.payload = min(max(rclass, 512), EDNS_PAYLOAD)
                if (ttl >> 16) & 0xFF:
                    query.badvers = True
    except ValueError as e:
        raise BadQuery(FORMERR, query, str(e)) from None
    if pos != n:
        raise BadQuery(FORMERR, query, "trailing bytes")
    if query.badvers:
        raise BadQuery(BADVERS, query, "unsupported EDNS version")
    return query


def responseFlags(queryFlags: int, rcode: int, aa: bool = False) -> int:
    """QR, the query's RD and CD, RA always, AA for our own data, the rcode."""
    return QR | RA | (queryFlags & (RD | CD)) | (AA if aa else 0) | (rcode & 0xF)


def errorResponse(id: int, flags: int, rcode: int, query: Query | None = None) -> bytes:
    """A response with no records: C{rcode}, and the question when it was read."""
    edns = query is not None and query.edns
    out = _IDFLAGS.pack(id, responseFlags(flags, rcode if rcode < 16 else 0))
    if query is not None and query.qname:
        out += (_COUNTS.pack(1, 0, 0, 1 if edns else 0) + query.qname
                + _TYPECLASS.pack(query.qtype, query.qclass))
    else:
        out += _COUNTS.pack(0, 0, 0, 1 if edns else 0)
    if edns:
        out += OPT_BADVERS if rcode == BADVERS else OPT_RECORD
    return out


def truncated(query: Query, rcode: int, aa: bool) -> bytes:
    """The answer that does not fit: the question alone, TC set."""
    return (_IDFLAGS.pack(query.id, responseFlags(query.flags, rcode, aa) | TC)
            + _COUNTS.pack(1, 0, 0, 1 if query.edns else 0) + query.qname
            + _TYPECLASS.pack(query.qtype, query.qclass) + (OPT_RECORD if query.edns else b""))


class Stored:
    """
    A response kept as bytes: everything but ID, flags and question name.
    C{ttls} are the (clamped) TTLs as stored, at C{ttlOffsets} into C{tail}.
    C{static}: local data, never aged.
    """

    __slots__ = ("rcode", "aa", "counts", "countsEdns", "tail", "ttlOffsets", "ttls", "stored",
                 "static", "_age", "_aged", "ancount")

    def __init__(self, rcode: int, aa: bool, counts: tuple[int, int, int, int], tail: bytes,
                 ttlOffsets: tuple[int, ...], ttls: tuple[int, ...], stored: float,
                 static: bool = False) -> None:
        self.rcode = rcode
        self.aa = aa
        self.ancount = counts[1]
        self.counts = _COUNTS.pack(*counts)
        self.countsEdns = _COUNTS.pack(counts[0], counts[1], counts[2], counts[3] + 1)
        self.tail = tail
        self.ttlOffsets = ttlOffsets
        self.ttls = ttls
        self.stored = stored
        self.static = static or not ttlOffsets
        self._age = 0
        self._aged = tail

    def agedTail(self, now: float, fixedTTL: int | None = None) -> bytes:
        """The sections with TTLs counted down to C{now} (or all set to C{fixedTTL})."""
        if fixedTTL is not None:
            return self._patched(lambda ttl: fixedTTL)
        if self.static:
            return self.tail
        age = int(now - self.stored)
        if age != self._age:
            self._aged = self._patched(lambda ttl: max(0, ttl - age))
            self._age = age
        return self._aged

    def _patched(self, ttlFor) -> bytes:
        buf = bytearray(self.tail)
        for offset, ttl in zip(self.ttlOffsets, self.ttls):
            _U32.pack_into(buf, offset, ttlFor(ttl))
        return bytes(buf)

    def render(self, query: Query, now: float, fixedTTL: int | None = None) -> bytes:
        """The response to C{query}, not yet size-checked."""
        tail = self.agedTail(now, fixedTTL)
        flags = QR | RA | (query.flags & (RD | CD)) | (AA if self.aa else 0) | self.rcode
        head = _IDFLAGS.pack(query.id, flags)
        if query.edns:
            return head + self.countsEdns + query.qname + tail + OPT_RECORD
        return head + self.counts + query.qname + tail

    def minTTL(self) -> int:
        return min(self.ttls) if self.ttls else 0


def fit(response: bytes, query: Query, limit: int, rcode: int, aa: bool) -> bytes:
    """C{response} if it fits in C{limit} bytes, else the truncated answer."""
    if len(response) <= limit:
        return response
    return truncated(query, rcode, aa)


def checkName(data: bytes, pos: int, limit: int) -> int:
    """
    Follow a (possibly compressed) name at C{pos}: every pointer must go backward
    and the expanded name must end within 255 bytes, so that no compression loop
    or overlong name reaches a client.  Returns the end of the name in place.

    @raise ValueError: the name is malformed.
    """
    end = -1
    total = 0
    hops = 0
    n = len(data)
    while True:
        if pos >= limit if end < 0 else pos >= n:
            raise ValueError("truncated name")
        length = data[pos]
        if length == 0:
            return pos + 1 if end < 0 else end
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise ValueError("truncated pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= pos:
                raise ValueError("compression pointer not backward")
            hops += 1
            if hops > 127:
                raise ValueError("too many compression pointers")
            pos = target
            continue
        if length > 63:
            raise ValueError("bad label type")
        total += length + 1
        if total > 255:
            raise ValueError("name longer than 255 bytes")
        pos += length + 1


#: Record types whose rdata holds names, and where: (offset of a name, then another after it?).
_RDATA_NAMES = {2: 0, 5: 0, 12: 0, 15: 2, 33: 6, 6: -1}  # NS, CNAME, PTR, MX, SRV; SOA: two names


def checkMessage(data: bytes) -> tuple[int, list[tuple[int, int, int, int]]]:
    """
    L{recordOffsets}, and every owner name and the names inside NS, CNAME, PTR,
    MX, SRV and SOA data checked with L{checkName}: what we store and pass on
    cannot hurt a client.  For upstream answers.

    @raise ValueError: the message is malformed.
    """
    qend, found = recordOffsets(data)
    pos = 12
    while pos < qend:
        pos = checkName(data, pos, len(data)) + 4
    for start, typePos, _ttl, end in found:
        checkName(data, start, typePos)
        rtype = (data[typePos] << 8) | data[typePos + 1]
        offset = _RDATA_NAMES.get(rtype)
        if offset is None:
            continue
        rdata = typePos + 10
        if offset >= 0:
            if checkName(data, rdata + offset, end) > end:
                raise ValueError("name past its record")
        else:
            second = checkName(data, rdata, end)
            if checkName(data, second, end) + 20 != end:
                raise ValueError("bad SOA data")
    return qend, found


def recordOffsets(wire: bytes) -> tuple[int, list[tuple[int, int, int, int]]]:
    """
    Walk a whole message: the end of its question section, and for each record of
    the answer, authority and additional sections C{(start, typeOffset, ttl, end)}.

    @raise ValueError: the message is malformed.
    """
    if len(wire) < 12:
        raise ValueError("short message")
    _, _, qd, an, ns, ar = _HEADER.unpack_from(wire)
    pos = 12
    for _ in range(qd):
        pos = skipName(wire, pos) + 4
        if pos > len(wire):
            raise ValueError("truncated question")
    qend = pos
    records = []
    for _ in range(an + ns + ar):
        start = pos
        pos = skipName(wire, pos)
        if pos + 10 > len(wire):
            raise ValueError("truncated record")
        ttl = _U32.unpack_from(wire, pos + 4)[0]
        rdlen = _U16.unpack_from(wire, pos + 8)[0]
        end = pos + 10 + rdlen
        if end > len(wire):
            raise ValueError("truncated rdata")
        records.append((start, pos, ttl, end))
        pos = end
    return qend, records


def store(wire: bytes, now: float, ttlFor, aa: bool = False, static: bool = False,
          parsed: tuple[int, list] | None = None) -> Stored:
    """
    Keep response C{wire} (one question) as a L{Stored}: OPT records dropped,
    every TTL replaced by C{ttlFor(typeCode, ttl, section)}.  C{parsed}: its
    L{recordOffsets}, if already known.

    @raise ValueError: the message is malformed.
    """
    _, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if qd != 1:
        raise ValueError("not one question")
    qend, found = parsed or recordOffsets(wire)
    nameEnd = readQuestionName(wire, 12)
    pieces = [wire[nameEnd:qend]]
    offsets = []
    ttls = []
    size = qend - nameEnd
    kept = [0, 0, 0]
    for i, (start, typePos, ttl, end) in enumerate(found):
        section = 0 if i < an else (1 if i < an + ns else 2)
        rtype = _U16.unpack_from(wire, typePos)[0]
        if rtype == OPT:
            continue
        record = bytearray(wire[start:end])
        newTTL = ttlFor(rtype, ttl, section)
        ttlAt = typePos - start + 4
        _U32.pack_into(record, ttlAt, newTTL)
        offsets.append(size + ttlAt)
        ttls.append(newTTL)
        pieces.append(bytes(record))
        size += len(record)
        kept[section] += 1
    return Stored(flags & 0xF, aa, (1, kept[0], kept[1], kept[2]), b"".join(pieces),
                  tuple(offsets), tuple(ttls), now, static)
