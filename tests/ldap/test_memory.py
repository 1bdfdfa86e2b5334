"""
Bounded memory under hostile input: what the server remembers between requests
(the DN normalization cache, the attribute selection cache) keeps only small keys,
so a client sending many large, distinct DNs or attribute lists (each up to
max_message) cannot make the process grow without bound.
"""

from __future__ import annotations

from twisted.trial import unittest

from netsvc.ldap import answer, dn, searching
from netsvc.ldap.schema import MAX_UNKNOWN as SCHEMA_BOUND
from netsvc.ldap.schema import SCHEMA, Schema
from tests.ldap._wire import SUFFIX, Client, cookieOf, dns, makeFactory, pagedControl, search

#: Names and OIDs of the built-in attribute types.
KNOWN = len(Schema()._attrs)


class CacheTests(unittest.TestCase):
    def test_longDNsAreNotRemembered(self):
        before = dn._cachedDN.cache_info().currsize
        for i in range(50):
            dn.normalizeDN(f"cn={i}{'x' * 10_000},dc=example,dc=com")
        self.assertEqual(dn._cachedDN.cache_info().currsize, before)
        self.assertEqual(dn.normalizeDN("CN=Short, DC=Example,DC=com"), dn.normalizeDN("cn=short,dc=example,dc=com"))
        self.assertLessEqual(dn._cachedDN.cache_info().maxsize, 16384)

    def test_searchBasesOverTheWire(self):
        client = Client(makeFactory())
        before = dn._cachedDN.cache_info().currsize
        for i in range(20):
            self.assertEqual(dns(client.send(search(i + 2, f"cn={i}{'y' * 50_000},dc=example,dc=com"))), [])
        self.assertEqual(dn._cachedDN.cache_info().currsize, before)

    def test_longAttributeListsAreNotRemembered(self):
        before = len(answer._SELECTIONS)
        for i in range(50):
            answer.Selection.parse([f"a{i}x{n}" for n in range(200)])
        self.assertEqual(len(answer._SELECTIONS), before)
        self.assertIs(answer.Selection.parse(["cn", "sn"]), answer.Selection.parse(["cn", "sn"]))

    def test_unknownAttributeNamesAreBounded(self):
        """Attribute names the schema does not know (any filter or attribute list can hold them) are bounded."""
        client = Client(makeFactory())
        for i in range(300):
            name = f"x{i}" + "z" * 2_000
            self.assertEqual(dns(client.send(search(i + 2, flt=f"({name}=1)", attributes=(name + "q",)))), [])
        for i in range(SCHEMA_BOUND + 100):
            SCHEMA.attribute(f"u{i}")
        self.assertLessEqual(len(SCHEMA._attrs) + len(SCHEMA._unknown), KNOWN + SCHEMA_BOUND)
        self.assertEqual(SCHEMA.canonical("Unknown-Attr"), "unknown-attr")


class PagedSearchMemoryTests(unittest.TestCase):
    """
    An open paged search keeps its compiled filter until the next page: 8 per connection with filters
    of 25,000 assertions held 260 MB per connection.  Large ones are bounded across all connections.
    """

    def setUp(self):
        self.patch(searching, "PAGED_WEIGHT", 1200)
        self.factory = makeFactory()

    def page(self, client, msgid, assertions: int, cookie=b""):
        flt = "(|" + "".join(f"(description=*q{n}*)" for n in range(assertions - 1)) + "(objectClass=*))"
        out = client.send(search(msgid, SUFFIX, flt, controls=[pagedControl(2, cookie)]))
        return out[-1].value.resultCode, cookieOf(out[-1]), dns(out)

    def test_largePagedSearchesAreBounded(self):
        one, two = Client(self.factory), Client(self.factory)
        code, first, found = self.page(one, 1, 500)
        self.assertEqual((code, len(found)), (0, 2))
        self.assertTrue(first)
        self.assertEqual(self.page(two, 1, 500)[0], 0)
        # a third would hold more than PAGED_WEIGHT assertions: its first page, then adminLimitExceeded
        code, cookie, found = self.page(two, 2, 500)
        self.assertEqual((code, cookie, len(found)), (11, b"", 2))
        # small filters are not counted
        self.assertEqual(self.page(two, 3, 3)[:2][0], 0)
        self.assertTrue(self.page(two, 4, 3)[1])
        # the first one goes on, and once done, its weight is free again
        while first:
            code, first, _ = self.page(one, 9, 500, first)
            self.assertEqual(code, 0)
        self.assertTrue(self.page(two, 5, 500)[1])

    def test_aClosedConnectionFreesItsWeight(self):
        one, two = Client(self.factory), Client(self.factory)
        self.assertTrue(self.page(one, 1, 500)[1])
        self.assertTrue(self.page(one, 2, 500)[1])
        self.assertEqual(self.page(two, 1, 500)[0], 11)
        one.protocol.connectionLost(None)
        self.assertTrue(self.page(two, 2, 500)[1])
