"""
Fuzzing the decoder path with hypothesis (derandomized: the same examples every
run): arbitrary and mutated bytes never raise anything but BERError from the
decoder, never an exception (or a logged error) from the protocol, and never grow
its buffer past the request limit; filters encoded by ldaptor decode to the same
structure.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldaptor.protocols import pureber, pureldap
from twisted.trial import unittest

from netsvc.ldap import codec
from tests.ldap._wire import ALICE, SUFFIX, USERS, Client, bind, makeFactory, msg, pagedControl, search

FUZZ = settings(derandomize=True, max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Real requests, to mutate.
CORPUS = [
    bind(1, ALICE, "alice-pw"),
    bind(2),
    search(3, USERS, "(&(objectClass=person)(|(cn=a*b*c)(uid>=m))(!(mail=*)))", attributes=("cn", "+")),
    search(4, SUFFIX, controls=[pagedControl(2, b"\x00\x00\x00\x01")]),
    search(5, "", "(objectClass=*)", scope=0),
    msg(pureldap.LDAPExtendedRequest(requestName=b"1.3.6.1.4.1.4203.1.11.3"), 6),
    msg(pureldap.LDAPCompareRequest(entry=ALICE.encode(), ava=pureldap.LDAPAttributeValueAssertion(
        pureber.BEROctetString(b"cn"), pureber.BEROctetString(b"x"))), 7),
    msg(pureldap.LDAPDelRequest(entry=ALICE.encode()), 8),
    msg(pureldap.LDAPAbandonRequest(id=3), 9),
    msg(pureldap.LDAPAddRequest(entry=b"uid=x,ou=users,dc=example,dc=com", attributes=[
        (pureldap.LDAPAttributeDescription(b"cn"), pureber.BERSet([pureldap.LDAPAttributeValue(b"x")]))]), 10),
    msg(pureldap.LDAPModifyRequest(object=ALICE.encode(), modification=[pureber.BERSequence([
        pureber.BEREnumerated(2), pureber.BERSequence([pureldap.LDAPAttributeDescription(b"sn"),
                                                       pureber.BERSet([pureldap.LDAPAttributeValue(b"y")])])])]), 11),
    msg(pureldap.LDAPModifyDNRequest(entry=ALICE.encode(), newrdn=b"uid=al", deleteoldrdn=True,
                                     newSuperior=b"ou=groups,dc=example,dc=com"), 12),
]

MAX_REQUEST = 2048


def mutated() -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw):
        data = bytearray(draw(st.sampled_from(CORPUS)))
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "flip" and data:
                data[pos] = draw(st.integers(0, 255))
            elif kind == "cut":
                del data[pos:]
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif data:
                del data[pos:pos + draw(st.integers(1, 4))]
        return bytes(data)

    return build()


class DecoderFuzzTests(unittest.TestCase):
    @FUZZ
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, data):
        self.decodeOnlyBERErrors(data)

    @FUZZ
    @given(mutated())
    def test_mutatedRequests(self, data):
        self.decodeOnlyBERErrors(data)

    @FUZZ
    @given(st.one_of(st.binary(max_size=80), st.builds(
        lambda parts: codec.tlv(0x30, b"".join(codec.tlv(t, v) for t, v in parts)),
        st.lists(st.tuples(st.sampled_from([0x80, 0x81, 0x82, 0x83, 0x04]), st.binary(max_size=10)), max_size=4))))
    def test_passwordModifyValue(self, data):
        from netsvc.ldap.passwd import decodeValue

        try:
            user, old, new = decodeValue(data)
        except codec.BERError:
            return
        for v in (user, old, new):
            self.assertTrue(v is None or isinstance(v, str))

    def decodeOnlyBERErrors(self, data: bytes) -> None:
        try:
            head = codec.frame(data)
        except codec.BERError:
            return
        if head is None or sum(head) != len(data):
            return
        try:
            codec.decodeMessage(data)
        except codec.BERError:
            pass


class ProtocolFuzzTests(unittest.TestCase):
    @FUZZ
    @given(st.lists(st.one_of(mutated(), st.sampled_from(CORPUS), st.binary(max_size=64)), min_size=1, max_size=6),
           st.integers(1, 50))
    def test_stream(self, pieces, chunk):
        """Any stream, in any chunking: no exception, nothing logged, the buffer stays bounded."""
        client = Client(makeFactory(maxRequest=MAX_REQUEST))
        data = b"".join(pieces)
        for start in range(0, len(data), chunk):
            client.protocol.dataReceived(data[start:start + chunk])
            self.assertLessEqual(len(client.protocol.buffer), MAX_REQUEST)
            if client.closed:
                break
        self.assertEqual(self.flushLoggedErrors(), [])
        # The factory still serves others.
        other = Client(client.factory)
        self.assertEqual(len(other.send(search(1, USERS, "(uid=bob)"))), 2)


def _filters():
    """(ldaptor filter object, the tuple netsvc's decoder should give) pairs."""
    attr = st.sampled_from(["cn", "uid", "objectClass", "x-Y1"])
    value = st.binary(max_size=12)

    def ava(kind, cls):
        return st.builds(lambda a, v: (cls(attributeDesc=pureldap.LDAPAttributeDescription(a.encode()),
                                           assertionValue=pureldap.LDAPAssertionValue(v)), (kind, a, v)),
                         attr, value)

    def substrings(a, initial, middle, final):
        parts = ([pureldap.LDAPFilter_substrings_initial(initial)] if initial is not None else []) + \
            [pureldap.LDAPFilter_substrings_any(m) for m in middle] + \
            ([pureldap.LDAPFilter_substrings_final(final)] if final is not None else [])
        return (pureldap.LDAPFilter_substrings(type=a.encode(), substrings=parts), ("sub", a, initial, middle, final))

    leaves = st.one_of(
        ava("eq", pureldap.LDAPFilter_equalityMatch), ava("ge", pureldap.LDAPFilter_greaterOrEqual),
        ava("le", pureldap.LDAPFilter_lessOrEqual), ava("approx", pureldap.LDAPFilter_approxMatch),
        st.builds(lambda a: (pureldap.LDAPFilter_present(a.encode()), ("present", a)), attr),
        st.builds(substrings, attr, st.one_of(st.none(), value.filter(bool)), st.lists(value.filter(bool), max_size=3),
                  st.one_of(st.none(), value.filter(bool))).filter(lambda p: p[1][2:] != (None, [], None)))

    def extend(children):
        return st.one_of(
            st.builds(lambda fs: (pureldap.LDAPFilter_and([f for f, _ in fs]), ("and", [t for _, t in fs])),
                      st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda fs: (pureldap.LDAPFilter_or([f for f, _ in fs]), ("or", [t for _, t in fs])),
                      st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda f: (pureldap.LDAPFilter_not(f[0]), ("not", f[1])), children))

    return st.recursive(leaves, extend, max_leaves=12)


class FilterRoundTripTests(unittest.TestCase):
    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(_filters())
    def test_ldaptorEncodedFilters(self, pair):
        flt, expected = pair
        request = pureldap.LDAPSearchRequest(baseObject=SUFFIX.encode(), filter=flt, attributes=[b"cn"])
        decoded = codec.decodeMessage(msg(request, 9))
        self.assertEqual(decoded.op.filter, expected)
        self.assertEqual(decoded.op.base, SUFFIX)
