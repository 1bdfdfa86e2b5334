"""
The LDAPv3 wire format (RFC 4511) as the server needs it: BER framing of a byte
stream, decoding of requests into small Python objects, encoding of responses.

    frame(buffer)               -> (header length, content length) of the first message, or None
    decodeMessage(message)      -> Message(id, op, controls)         raises BERError / FilterTooDeep
    result(id, RESULT_TAG, code, message) -> bytes                   (an LDAPResult response)
    entry(id, dn, [attribute(name, values)...]) -> bytes            (a SearchResultEntry)

Why not ldaptor's pureber/pureldap for the server's decoder: its decoder recurses
without a bound (a filter nested 10,000 deep raises RecursionError), asserts on
malformed content, prints unknown tags to stdout, and builds several objects per
element (slow).  This decoder is bounded (L{MAX_FILTER_DEPTH}, single-byte tags,
lengths of at most 4 octets), raises only L{BERError} on any malformed input, and
returns plain tuples.  Responses are encoded by hand for the same speed reason;
the tests check both directions against ldaptor's encoder and decoder and against
OpenLDAP's tools.

Filters decode to tuples:
    ("and", [f...]) ("or", [f...]) ("not", f) ("eq"|"ge"|"le"|"approx", attr, value)
    ("sub", attr, initial|None, [any...], final|None) ("present", attr) ("ext", rule, attr, value, dnAttrs)
(attribute names are str, values bytes.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

#: Filters nested deeper than this are refused (slapd's limit is in the same range).
MAX_FILTER_DEPTH = 64

# protocolOp tags (APPLICATION class; constructed unless noted)
BIND_REQUEST, BIND_RESPONSE = 0x60, 0x61
UNBIND_REQUEST = 0x42  # primitive
SEARCH_REQUEST, SEARCH_ENTRY, SEARCH_DONE = 0x63, 0x64, 0x65
MODIFY_REQUEST, MODIFY_RESPONSE = 0x66, 0x67
ADD_REQUEST, ADD_RESPONSE = 0x68, 0x69
DEL_REQUEST, DEL_RESPONSE = 0x4A, 0x6B  # request primitive
MODDN_REQUEST, MODDN_RESPONSE = 0x6C, 0x6D
COMPARE_REQUEST, COMPARE_RESPONSE = 0x6E, 0x6F
ABANDON_REQUEST = 0x50  # primitive
EXTENDED_REQUEST, EXTENDED_RESPONSE = 0x77, 0x78

#: The response tag for each request that has one.
RESPONSE_FOR = {BIND_REQUEST: BIND_RESPONSE, SEARCH_REQUEST: SEARCH_DONE, MODIFY_REQUEST: MODIFY_RESPONSE,
                ADD_REQUEST: ADD_RESPONSE, DEL_REQUEST: DEL_RESPONSE, MODDN_REQUEST: MODDN_RESPONSE,
                COMPARE_REQUEST: COMPARE_RESPONSE, EXTENDED_REQUEST: EXTENDED_RESPONSE}

NOTICE_OF_DISCONNECTION = b"1.3.6.1.4.1.1466.20036"


class BERError(ValueError):
    """Malformed BER or LDAP: the connection cannot go on (protocolError)."""


class RequestRefused(BERError):
    """
    A well-formed message whose request cannot be served (C{.messageID} is known):
    that request fails with protocolError, the connection is kept.
    """


class FilterTooDeep(RequestRefused):
    """A search filter nested deeper than L{MAX_FILTER_DEPTH}: that request is refused, the connection kept."""


class Control(NamedTuple):
    oid: str
    critical: bool
    value: bytes | None


class Message(NamedTuple):
    id: int
    tag: int  # the protocolOp tag
    op: Any  # the decoded request (see the classes below), or None for unbind/abandon
    controls: list[Control]


class BindRequest(NamedTuple):
    version: int
    name: str
    simple: bytes | None  # the password for a simple bind; None for SASL
    mechanism: str | None


class SearchRequest(NamedTuple):
    base: str
    scope: int  # 0 base, 1 one level, 2 subtree, 3 subordinate subtree (children)
    deref: int
    sizeLimit: int
    timeLimit: int
    typesOnly: bool
    filter: tuple
    attributes: list[str]


class CompareRequest(NamedTuple):
    dn: str
    attribute: str
    value: bytes


class ExtendedRequest(NamedTuple):
    name: str
    value: bytes | None


class AddRequest(NamedTuple):
    dn: str
    attributes: list[tuple[str, list[bytes]]]


class DelRequest(NamedTuple):
    dn: str


class ModifyRequest(NamedTuple):
    dn: str
    changes: list[tuple[int, str, list[bytes]]]  # (0 add | 1 delete | 2 replace, attribute, values)


class ModDNRequest(NamedTuple):
    dn: str
    newRDN: str
    deleteOldRDN: bool
    newSuperior: str | None


# -- framing ------------------------------------------------------------------


def header(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at C{pos}; raises L{BERError}."""
    if pos + 2 > end:
        raise BERError("truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise BERError("multi-byte tags are not used by LDAP")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise BERError("indefinite lengths are not allowed in LDAP")
        if count > 4:
            raise BERError("length of more than 4 octets")
        if pos + count > end:
            raise BERError("truncated length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise BERError("element longer than its container")
    return tag, pos, pos + length


def frame(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """
    (header length, content length) of the message at the start of C{buffer}, as
    soon as its header is complete (the content may not have arrived yet: the
    caller checks the length against its limit before buffering more); None if
    the header itself is incomplete.

    @raise BERError: not an LDAPMessage (tag other than SEQUENCE, bad length form).
    """
    if len(buffer) < 2:
        return None
    if buffer[0] != 0x30:
        raise BERError(f"expected an LDAPMessage (SEQUENCE), got tag 0x{buffer[0]:02x}")
    first = buffer[1]
    if first < 0x80:
        return 2, first
    count = first & 0x7F
    if count == 0:
        raise BERError("indefinite lengths are not allowed in LDAP")
    if count > 4:
        raise BERError("length of more than 4 octets")
    if len(buffer) < 2 + count:
        return None
    return 2 + count, int.from_bytes(buffer[2:2 + count], "big")


# -- decoding -----------------------------------------------------------------


def _integer(data: bytes, start: int, end: int) -> int:
    if start == end or end - start > 8:
        raise BERError("bad INTEGER")
    return int.from_bytes(data[start:end], "big", signed=True)


def _string(data: bytes, start: int, end: int) -> str:
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise BERError("a string that is not UTF-8") from None


def _expect(data: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    t, s, e = header(data, pos, end)
    if t != tag:
        raise BERError(f"expected {what} (tag 0x{tag:02x}), got tag 0x{t:02x}")
    return s, e


def decodeMessage(data: bytes) -> Message:
    """
    Decode one complete LDAPMessage (C{data} is exactly its bytes, header included).

    @raise RequestRefused: a search filter nested too deeply (L{FilterTooDeep}) or a scope that does not
        exist; the message id is known: C{.messageID}.
    @raise BERError: anything malformed.
    """
    tag, start, end = header(data, 0, len(data))
    if tag != 0x30 or end != len(data):
        raise BERError("not one LDAPMessage")
    s, e = _expect(data, start, end, 0x02, "messageID")
    msgid = _integer(data, s, e)
    if not 0 <= msgid <= 2**31 - 1:
        raise BERError("messageID out of range")
    optag, os_, oe = header(data, e, end)
    controls: list[Control] = []
    if oe < end:
        ct, cs, ce = header(data, oe, end)
        if ct != 0xA0:
            raise BERError("expected controls")
        controls = _controls(data, cs, ce)
    try:
        op = _decodeOp(optag, data, os_, oe)
    except RequestRefused as exc:
        exc.messageID = msgid  # type: ignore[attr-defined]
        raise
    return Message(msgid, optag, op, controls)


def _controls(data: bytes, pos: int, end: int) -> list[Control]:
    out = []
    while pos < end:
        s, e = _expect(data, pos, end, 0x30, "Control")
        pos = e
        os_, oe = _expect(data, s, e, 0x04, "control type")
        oid = _string(data, os_, oe)
        critical, value = False, None
        p = oe
        if p < e and data[p] == 0x01:
            bs, be = _expect(data, p, e, 0x01, "criticality")
            critical = any(data[bs:be])
            p = be
        if p < e:
            vs, ve = _expect(data, p, e, 0x04, "control value")
            value = data[vs:ve]
        out.append(Control(oid, critical, value))
    return out


def _decodeOp(tag: int, data: bytes, start: int, end: int) -> Any:
    if tag == SEARCH_REQUEST:
        return _search(data, start, end)
    if tag == BIND_REQUEST:
        s, e = _expect(data, start, end, 0x02, "version")
        version = _integer(data, s, e)
        ns, ne = _expect(data, e, end, 0x04, "bind name")
        name = _string(data, ns, ne)
        at, as_, ae = header(data, ne, end)
        if at == 0x80:
            return BindRequest(version, name, data[as_:ae], None)
        if at == 0xA3:
            ms, me = _expect(data, as_, ae, 0x04, "SASL mechanism")
            return BindRequest(version, name, None, _string(data, ms, me))
        raise BERError(f"unknown bind authentication choice 0x{at:02x}")
    if tag in (UNBIND_REQUEST, ABANDON_REQUEST):
        return None
    if tag == COMPARE_REQUEST:
        ds, de = _expect(data, start, end, 0x04, "entry")
        vs, ve = _expect(data, de, end, 0x30, "attribute value assertion")
        as_, ae = _expect(data, vs, ve, 0x04, "attribute")
        xs, xe = _expect(data, ae, ve, 0x04, "value")
        return CompareRequest(_string(data, ds, de), _string(data, as_, ae), data[xs:xe])
    if tag == EXTENDED_REQUEST:
        ns, ne = _expect(data, start, end, 0x80, "requestName")
        value = None
        if ne < end:
            vs, ve = _expect(data, ne, end, 0x81, "requestValue")
            value = data[vs:ve]
        return ExtendedRequest(_string(data, ns, ne), value)
    if tag == DEL_REQUEST:
        return DelRequest(_string(data, start, end))
    if tag == ADD_REQUEST:
        ds, de = _expect(data, start, end, 0x04, "entry")
        ls, le = _expect(data, de, end, 0x30, "attributes")
        attributes = []
        while ls < le:
            s, e = _expect(data, ls, le, 0x30, "attribute")
            attributes.append(_attribute(data, s, e))
            ls = e
        return AddRequest(_string(data, ds, de), attributes)
    if tag == MODIFY_REQUEST:
        ds, de = _expect(data, start, end, 0x04, "object")
        cs, ce = _expect(data, de, end, 0x30, "changes")
        changes = []
        while cs < ce:
            s, e = _expect(data, cs, ce, 0x30, "change")
            os_, oe = _expect(data, s, e, 0x0A, "operation")
            operation = _integer(data, os_, oe)
            if operation not in (0, 1, 2):
                raise BERError(f"unknown modify operation {operation}")
            name, values = _attribute(data, *_expect(data, oe, e, 0x30, "modification"))
            changes.append((operation, name, values))
            cs = e
        return ModifyRequest(_string(data, ds, de), changes)
    if tag == MODDN_REQUEST:
        ds, de = _expect(data, start, end, 0x04, "entry")
        rs, re_ = _expect(data, de, end, 0x04, "newrdn")
        bs, be = _expect(data, re_, end, 0x01, "deleteoldrdn")
        superior = None
        if be < end:
            ss, se = _expect(data, be, end, 0x80, "newSuperior")
            superior = _string(data, ss, se)
        return ModDNRequest(_string(data, ds, de), _string(data, rs, re_), any(data[bs:be]), superior)
    raise BERError(f"unknown operation (tag 0x{tag:02x})")


def _attribute(data: bytes, start: int, end: int) -> tuple[str, list[bytes]]:
    """A PartialAttribute's content: (type, values)."""
    ns, ne = _expect(data, start, end, 0x04, "attribute type")
    vs, ve = _expect(data, ne, end, 0x31, "attribute values")
    values = []
    while vs < ve:
        s, e = _expect(data, vs, ve, 0x04, "attribute value")
        values.append(data[s:e])
        vs = e
    return _string(data, ns, ne), values


def _search(data: bytes, start: int, end: int) -> SearchRequest:
    s, e = _expect(data, start, end, 0x04, "baseObject")
    base = _string(data, s, e)
    fields = []
    pos = e
    for tag in (0x0A, 0x0A, 0x02, 0x02, 0x01):  # scope, derefAliases, sizeLimit, timeLimit, typesOnly
        if pos + 2 < end and data[pos] == tag and 0 < data[pos + 1] <= 8:  # the usual short form, inline
            s, pos = pos + 2, pos + 2 + data[pos + 1]
            if pos > end:
                raise BERError("truncated search request")
        else:
            s, pos = _expect(data, pos, end, tag, "search request field")
        fields.append(_integer(data, s, pos))
    ft, fs, fe = header(data, pos, end)
    flt = _filter(data, ft, fs, fe, 1)
    s, e = _expect(data, fe, end, 0x30, "attributes")
    attributes = []
    while s < e:
        as_, ae = _expect(data, s, e, 0x04, "attribute")
        attributes.append(_string(data, as_, ae))
        s = ae
    scope, deref, sizeLimit, timeLimit, typesOnly = fields
    if scope not in (0, 1, 2, 3):  # 3: subordinate subtree (draft-sermersheim-ldap-subordinate-scope, as slapd)
        raise RequestRefused(f"bad search scope {scope}")
    return SearchRequest(base, scope, deref, max(0, sizeLimit), max(0, timeLimit), bool(typesOnly), flt, attributes)


def _ava(data: bytes, start: int, end: int) -> tuple[str, bytes]:
    as_, ae = _expect(data, start, end, 0x04, "attribute")
    vs, ve = _expect(data, ae, end, 0x04, "assertion value")
    return _string(data, as_, ae), data[vs:ve]


_AVA = {0xA3: "eq", 0xA5: "ge", 0xA6: "le", 0xA8: "approx"}


def _filter(data: bytes, tag: int, start: int, end: int, depth: int) -> tuple:
    if depth > MAX_FILTER_DEPTH:
        raise FilterTooDeep(f"filter nested more than {MAX_FILTER_DEPTH} deep")
    if tag in (0xA0, 0xA1):
        subs = []
        pos = start
        while pos < end:
            t, s, e = header(data, pos, end)
            subs.append(_filter(data, t, s, e, depth + 1))
            pos = e
        return ("and" if tag == 0xA0 else "or", subs)
    if tag == 0xA2:
        t, s, e = header(data, start, end)
        if e != end:
            raise BERError("not filter with more than one element")
        return ("not", _filter(data, t, s, e, depth + 1))
    kind = _AVA.get(tag)
    if kind is not None:
        attr, value = _ava(data, start, end)
        return (kind, attr, value)
    if tag == 0x87:
        return ("present", _string(data, start, end))
    if tag == 0xA4:
        as_, ae = _expect(data, start, end, 0x04, "attribute")
        ss, se = _expect(data, ae, end, 0x30, "substrings")
        initial, final, middle = None, None, []
        pos = ss
        while pos < se:
            t, s, e = header(data, pos, se)
            if t == 0x80 and initial is None and not middle and final is None:
                initial = data[s:e]
            elif t == 0x81 and final is None:
                middle.append(data[s:e])
            elif t == 0x82 and final is None:
                final = data[s:e]
            else:
                raise BERError("bad substrings filter")
            pos = e
        return ("sub", _string(data, as_, ae), initial, middle, final)
    if tag == 0xA9:
        rule = attr = None
        value = b""
        dnAttrs = False
        pos = start
        while pos < end:
            t, s, e = header(data, pos, end)
            if t == 0x81:
                rule = _string(data, s, e)
            elif t == 0x82:
                attr = _string(data, s, e)
            elif t == 0x83:
                value = data[s:e]
            elif t == 0x84:
                dnAttrs = any(data[s:e])
            else:
                raise BERError("bad extensible match filter")
            pos = e
        return ("ext", rule, attr, value, dnAttrs)
    raise BERError(f"unknown filter choice 0x{tag:02x}")


# -- encoding -----------------------------------------------------------------


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    return bytes((tag,)) + length(n) + content


def integer(n: int, tag: int = 0x02) -> bytes:
    return tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


def octets(value: bytes, tag: int = 0x04) -> bytes:
    return tlv(tag, value)


def message(msgid: int, op: bytes, controls: bytes = b"") -> bytes:
    """An LDAPMessage around an encoded protocolOp (and encoded controls, already in their [0])."""
    return tlv(0x30, integer(msgid) + op + controls)


def resultOp(tag: int, code: int, matched: bytes = b"", text: bytes = b"", extra: bytes = b"") -> bytes:
    return tlv(tag, integer(code, 0x0A) + tlv(0x04, matched) + tlv(0x04, text) + extra)


def result(msgid: int, tag: int, code: int, text: str = "", matched: str = "", extra: bytes = b"",
           controls: bytes = b"") -> bytes:
    """A whole response message carrying an LDAPResult."""
    return message(msgid, resultOp(tag, code, matched.encode(), text.encode(), extra), controls)


def attribute(name: bytes, values: list[bytes] | tuple[bytes, ...]) -> bytes:
    """A PartialAttribute: SEQUENCE { type, SET OF value }."""
    return tlv(0x30, tlv(0x04, name) + tlv(0x31, b"".join([tlv(0x04, v) for v in values])))


def entry(msgid: int, dn: bytes, attributes: bytes) -> bytes:
    """A SearchResultEntry message (C{attributes}: concatenated L{attribute} encodings)."""
    return message(msgid, tlv(SEARCH_ENTRY, tlv(0x04, dn) + tlv(0x30, attributes)))


def controls(items: list[tuple[str, bytes | None]]) -> bytes:
    """Response controls, encoded in their [0] wrapper."""
    out = b""
    for oid, value in items:
        out += tlv(0x30, tlv(0x04, oid.encode()) + (tlv(0x04, value) if value is not None else b""))
    return tlv(0xA0, out)


def noticeOfDisconnection(code: int, text: str) -> bytes:
    """The unsolicited notification (message id 0) sent before the server closes on a protocol error."""
    return result(0, EXTENDED_RESPONSE, code, text, extra=tlv(0x8A, NOTICE_OF_DISCONNECTION))
