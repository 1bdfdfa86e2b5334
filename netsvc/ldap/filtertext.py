"""
RFC 4515 search filters, text -> ldaptor's C{pureldap} filter objects (ready to
be sent in a search request).

    parseFilter("(&(objectClass=person)(cn=J*n))")
    parseFilter("uid=jo")                    # outer parentheses optional, as ldapsearch allows
    parseFilter(r"(cn=\\c3\\a4ra)")            # \\XX escapes are bytes: this is "Ära" in UTF-8

Raises L{FilterError} (with the position) for anything RFC 4515 does not allow.

Why not C{ldaptor.ldapfilter.parseFilter}: it turns each C{\\XX} escape into one
character, so the UTF-8 escapes ldapsearch users write (C{\\c3\\a4}) go out as the
wrong bytes; it raises pyparsing 3.3 deprecation warnings; and it recurses without
a bound.  This is a small recursive-descent parser over the RFC's grammar instead.
"""

from __future__ import annotations

import re

from ldaptor.protocols import pureldap

#: Nesting deeper than this is refused (a filter is not a place for recursion bombs).
MAX_DEPTH = 64

_ATTR = re.compile(rb"[A-Za-z][A-Za-z0-9-]*(;[A-Za-z0-9-]+)*|[0-9]+(\.[0-9]+)+(;[A-Za-z0-9-]+)*")
_RULE = re.compile(rb"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)*")
_HEX = b"0123456789abcdefABCDEF"


class FilterError(ValueError):
    """Not an RFC 4515 filter; the message says where and why."""


class _Parser:
    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> FilterError:
        return FilterError(f"bad filter at character {self.pos + 1}: {why}")

    def peek(self) -> bytes:
        return self.text[self.pos:self.pos + 1]

    def expect(self, char: bytes) -> None:
        if self.peek() != char:
            found = repr(self.peek().decode("utf-8", "replace")) if self.peek() else "the end"
            raise self.fail(f"expected {char.decode()!r}, found {found}")
        self.pos += 1

    def filter(self, depth: int) -> pureldap.LDAPFilter:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} deep")
        self.expect(b"(")
        c = self.peek()
        if c in (b"&", b"|"):
            self.pos += 1
            items = []
            while self.peek() == b"(":
                items.append(self.filter(depth + 1))
            result = (pureldap.LDAPFilter_and if c == b"&" else pureldap.LDAPFilter_or)(items)
        elif c == b"!":
            self.pos += 1
            result = pureldap.LDAPFilter_not(self.filter(depth + 1))
        else:
            result = self.item()
        self.expect(b")")
        return result

    def attribute(self, required: bool = True) -> bytes | None:
        m = _ATTR.match(self.text, self.pos)
        if not m:
            if required:
                raise self.fail("expected an attribute description")
            return None
        self.pos = m.end()
        return m.group()

    def item(self) -> pureldap.LDAPFilter:
        attr = self.attribute(required=self.peek() != b":")
        if self.peek() == b":":
            return self.extensible(attr)
        op = self.text[self.pos:self.pos + 2]
        if op in (b"~=", b">=", b"<="):
            self.pos += 2
            value = self.value()
            cls = {b"~=": pureldap.LDAPFilter_approxMatch, b">=": pureldap.LDAPFilter_greaterOrEqual,
                   b"<=": pureldap.LDAPFilter_lessOrEqual}[op]
            return cls(attributeDesc=pureldap.LDAPAttributeDescription(attr),
                       assertionValue=pureldap.LDAPAssertionValue(value))
        self.expect(b"=")
        pieces = [self.value()]
        while self.peek() == b"*":
            self.pos += 1
            pieces.append(self.value())
        if len(pieces) == 1:
            return pureldap.LDAPFilter_equalityMatch(attributeDesc=pureldap.LDAPAttributeDescription(attr),
                                                     assertionValue=pureldap.LDAPAssertionValue(pieces[0]))
        if pieces == [b"", b""]:
            return pureldap.LDAPFilter_present(attr)
        substrings: list = []
        if pieces[0]:
            substrings.append(pureldap.LDAPFilter_substrings_initial(pieces[0]))
        for middle in pieces[1:-1]:
            if not middle:
                raise self.fail("two '*' in a row")
            substrings.append(pureldap.LDAPFilter_substrings_any(middle))
        if pieces[-1]:
            substrings.append(pureldap.LDAPFilter_substrings_final(pieces[-1]))
        return pureldap.LDAPFilter_substrings(type=attr, substrings=substrings)

    def extensible(self, attr: bytes | None) -> pureldap.LDAPFilter:
        dnAttributes = False
        if self.text.startswith(b":dn", self.pos) and self.text[self.pos + 3:self.pos + 4] in (b":", b""):
            # ":dn" followed by ":rule" or ":="
            dnAttributes = True
            self.pos += 3
        rule = None
        if self.text.startswith(b":=", self.pos):
            self.pos += 2
        else:
            self.expect(b":")
            m = _RULE.match(self.text, self.pos)
            if not m:
                raise self.fail("expected a matching rule")
            rule = m.group()
            self.pos = m.end()
            self.expect(b":")
            self.expect(b"=")
        if attr is None and rule is None:
            raise self.fail("an extensible match needs an attribute or a matching rule")
        return pureldap.LDAPFilter_extensibleMatch(matchingRule=rule, type=attr, matchValue=self.value(),
                                                   dnAttributes=dnAttributes or None)

    def value(self) -> bytes:
        """An assertion value up to the next C{*} or C{)}, with C{\\XX} escapes decoded to bytes."""
        out = bytearray()
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in b"*)":
                break
            if c == 0x28 or c == 0:  # "(" and NUL must be escaped
                raise self.fail("'(' in a value must be written \\28")
            if c == 0x5C:
                hexDigits = self.text[self.pos + 1:self.pos + 3]
                if len(hexDigits) != 2 or any(h not in _HEX for h in hexDigits):
                    raise self.fail("'\\' must be followed by two hex digits (\\2a for '*', \\5c for '\\')")
                out.append(int(hexDigits, 16))
                self.pos += 3
            else:
                out.append(c)
                self.pos += 1
        return bytes(out)


def parseFilter(text: str | bytes) -> pureldap.LDAPFilter:
    """
    The filter in C{text} (UTF-8 if str); without outer parentheses it is taken as
    one item, as ldapsearch does (C{uid=jo} is C{(uid=jo)}).

    @raise FilterError: not a valid filter.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    raw = raw.strip()
    if not raw:
        raise FilterError("empty filter")
    if not raw.startswith(b"("):
        raw = b"(" + raw + b")"
    parser = _Parser(raw)
    result = parser.filter(0)
    if parser.pos != len(raw):
        raise parser.fail("unexpected text after the filter")
    return result
