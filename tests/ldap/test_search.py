"""
Searching, over a StringTransport with requests encoded and responses decoded by
ldaptor: scopes (base, one, sub, children), schema-aware filters, attribute
selection, limits, paged results, the root DSE and the subschema entry.
"""

from __future__ import annotations

from ldaptor.protocols import pureber, pureldap
from twisted.trial import unittest

from netsvc.ldap import codec
from tests.ldap._wire import (
    ALICE,
    BOB,
    CAROL,
    SUFFIX,
    USERS,
    Client,
    attrs,
    bind,
    cookieOf,
    decodeAll,
    directoryFrom,
    dns,
    entries,
    makeFactory,
    msg,
    pagedControl,
    search,
)
from tests.ldap.test_server import done


class SearchTests(unittest.TestCase):
    def setUp(self):
        self.factory = makeFactory()
        self.client = Client(self.factory)

    def search(self, *args, **kwargs) -> list:
        return self.client.send(search(2, *args, **kwargs))

    def test_inheritanceAndCase(self):
        """(objectclass=person) matches inetOrgPerson entries (ldaptor's server compares strings)."""
        out = self.search(USERS, "(objectclass=PERSON)", attributes=("sn",))
        self.assertEqual(dns(out), [ALICE, BOB, CAROL, "uid=dave,ou=users,dc=example,dc=com"])
        self.assertEqual(attrs(entries(out)[0]), {"sn": [b"Liddell"]})
        self.assertEqual(done(out).resultCode, 0)
        self.assertEqual(self.factory.metrics.searches.value, 1)
        self.assertEqual(self.factory.metrics.entries.value, 4)

    def test_filters(self):
        cases = {
            "(cn=ALICE liddell)": [ALICE],
            "(mail=BOB@example.COM)": [BOB],
            "(cn=*a*)": [ALICE, CAROL, "uid=dave,ou=users,dc=example,dc=com",
                         "cn=staff,ou=groups,dc=example,dc=com", "cn=admins,ou=groups,dc=example,dc=com"],
            "(cn=car*ers)": [CAROL],
            "(&(objectClass=posixAccount)(uidNumber>=10002))": [BOB],
            "(uidNumber<=10001)": [ALICE],
            "(|(uid=alice)(uid=bob))": [ALICE, BOB],
            "(&(objectClass=inetOrgPerson)(!(title=engineer)))": [BOB, CAROL, "uid=dave,ou=users,dc=example,dc=com"],
            "(telephoneNumber=+15550101)": [BOB],
            "(uid~=CAROL)": [CAROL],
            "(memberUid=alice)": ["cn=users,ou=groups,dc=example,dc=com"],
            "(memberUid=ALICE)": [],  # caseExactIA5Match
            "(member=UID=Alice,OU=users,DC=example,DC=com)": ["cn=staff,ou=groups,dc=example,dc=com",
                                                               "cn=admins,ou=groups,dc=example,dc=com"],
            "(loginShell=*)": [ALICE, BOB],
            "(commonName=bob builder)": [BOB],
        }
        for flt, expected in cases.items():
            self.assertEqual(dns(self.search(SUFFIX, flt, attributes=("1.1",))), expected, flt)

    def test_scopes(self):
        self.assertEqual(dns(self.search(USERS, scope=0)), [USERS])
        self.assertEqual(dns(self.search(SUFFIX, scope=1)), ["ou=users,dc=example,dc=com",
                                                             "ou=groups,dc=example,dc=com"])
        self.assertEqual(len(dns(self.search(SUFFIX, scope=2))), 10)
        self.assertEqual(len(dns(self.search("ou=groups,dc=example,dc=com", scope=2))), 4)

    def test_childrenScope(self):
        """
        The subordinate subtree (scope 3, "-s children" in ldapsearch, which slapd
        serves): the subtree without its base; the connection goes on.
        """
        self.assertEqual(len(dns(self.search("ou=groups,dc=example,dc=com", scope=3))), 3)
        out = self.search(SUFFIX, "(objectClass=organizationalUnit)", scope=3)
        self.assertEqual(dns(out), [USERS, "ou=groups,dc=example,dc=com"])
        self.assertEqual(dns(self.search(ALICE, scope=3)), [])
        self.assertEqual(len(dns(self.search("", scope=3))), 10)  # below the root DSE: the naming context and all
        self.assertEqual(done(out).resultCode, 0)
        self.assertFalse(self.client.closed)

    def test_noSuchObject(self):
        out = self.search("ou=nobody,ou=users,dc=example,dc=com")
        self.assertEqual(done(out).resultCode, 32)
        self.assertEqual(done(out).matchedDN, USERS.encode())

    def test_unknownScope(self):
        """A scope that is not 0-3 fails that search with protocolError, as slapd answers; the connection goes on."""
        op = codec.tlv(codec.SEARCH_REQUEST, codec.octets(SUFFIX.encode()) + codec.integer(7, 0x0A)
                       + codec.integer(0, 0x0A) + codec.integer(0) + codec.integer(0) + codec.tlv(0x01, b"\0")
                       + codec.tlv(0x87, b"cn") + codec.tlv(0x30, b""))
        (response,) = self.client.send(codec.message(5, op))
        self.assertEqual((response.id, response.value.resultCode), (5, 2))
        self.assertIn(b"scope", response.value.errorMessage)
        self.assertFalse(self.client.closed)
        self.assertEqual(dns(self.search(USERS, "(uid=bob)")), [BOB])

    def test_invalidDN(self):
        self.assertEqual(done(self.search("not a dn")).resultCode, 34)

    def test_attributeSelection(self):
        alice = lambda *names: attrs(entries(self.search(ALICE, scope=0, attributes=names))[0])  # noqa: E731
        self.assertEqual(alice("1.1"), {})
        self.assertEqual(set(alice("CN", "mail")), {"cn", "mail"})
        everything = alice()
        self.assertIn("givenName", everything)
        self.assertNotIn("entryDN", everything)
        self.assertNotIn("userPassword", everything)
        operational = alice("+")
        self.assertEqual(operational["entryDN"], [ALICE.encode()])
        self.assertEqual(operational["structuralObjectClass"], [b"inetOrgPerson"])
        self.assertEqual(operational["hasSubordinates"], [b"FALSE"])
        self.assertEqual(operational["subschemaSubentry"], [b"cn=Subschema"])
        self.assertNotIn("cn", operational)
        both = alice("*", "+")
        self.assertIn("cn", both)
        self.assertIn("entryDN", both)
        self.assertEqual(alice("hasSubordinates"), {"hasSubordinates": [b"FALSE"]})

    def test_typesOnly(self):
        (entry,) = entries(self.search(ALICE, scope=0, attributes=("cn", "sn"), typesOnly=True))
        self.assertEqual(attrs(entry), {"cn": [], "sn": []})

    def test_userPasswordOnlyToItsOwnEntry(self):
        def passwords():
            found = entries(self.search(USERS, "(uid=*)", attributes=("userPassword",)))
            return {e.objectName.decode() for e in found if attrs(e)}

        self.assertEqual(passwords(), set())
        self.client.send(bind(1, ALICE, "alice-pw"))
        self.assertEqual(passwords(), {ALICE})
        self.client.send(bind(3, BOB, "bob-pw"))
        self.assertEqual(passwords(), {BOB})
        # nor can it be guessed with a compare
        compare = pureldap.LDAPCompareRequest(entry=ALICE.encode(), ava=pureldap.LDAPAttributeValueAssertion(
            pureber.BEROctetString(b"userPassword"), pureber.BEROctetString(b"x")))
        (answer,) = self.client.send(msg(compare, 4))
        self.assertEqual(answer.value.resultCode, 50)

    def test_sizeLimit(self):
        out = self.search(SUFFIX, sizeLimit=3)
        self.assertEqual(len(entries(out)), 3)
        self.assertEqual(done(out).resultCode, 4)
        # exactly as many as there are: success
        out = self.search(USERS, "(objectClass=person)", sizeLimit=4)
        self.assertEqual((len(entries(out)), done(out).resultCode), (4, 0))

    def test_serverSizeLimit(self):
        client = Client(makeFactory(sizeLimit=2))
        out = client.send(search(1, SUFFIX, sizeLimit=100))
        self.assertEqual((len(entries(out)), done(out).resultCode), (2, 4))

    def test_timeLimit(self):
        factory = makeFactory()
        ticks = iter(range(0, 10**6, 100))
        factory.now = lambda: next(ticks)
        many = directoryFrom(b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n\n" + b"".join(
            b"dn: cn=e%d,dc=example,dc=com\nobjectClass: person\ncn: e%d\nsn: x\n\n" % (i, i) for i in range(200)))
        factory.directory = many
        out = Client(factory).send(search(1, SUFFIX))
        self.assertEqual(done(out).resultCode, 3)
        self.assertLess(len(entries(out)), 200)

    def test_scanLimit(self):
        """An unindexed filter over more than max_scan entries: adminLimitExceeded; an indexed one is fine."""
        client = Client(makeFactory(maxScan=5))
        self.assertEqual(done(client.send(search(1, SUFFIX, "(description=*)"))).resultCode, 11)
        self.assertEqual(dns(client.send(search(2, SUFFIX, "(uid=bob)"))), [BOB])

    def test_scanLimitCountsTheFilter(self):
        """
        The cost of a search is entries examined times the filter's size: each entry counts once per 8
        assertions, so a huge filter (a 700 KB request of 30,000 terms kept the reactor 5 s on 1,000
        entries) is stopped at max_scan like a scan of many entries; ordinary filters count 1 per entry.
        """
        ldif = [b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n"]
        ldif += [b"dn: uid=u%d,dc=example,dc=com\nobjectClass: account\nuid: u%d\n" % (i, i) for i in range(200)]
        client = Client(makeFactory(directoryFrom(b"\n".join(ldif) + b"\n"), maxScan=1000))

        def orOf(count: int) -> str:
            return "(|" + "".join(f"(description=*d{n}*)" for n in range(count)) + ")"

        self.assertEqual(done(client.send(search(1, SUFFIX, orOf(8)))).resultCode, 0)  # 201 entries x 1
        self.assertEqual(done(client.send(search(2, SUFFIX, orOf(32)))).resultCode, 0)  # 201 x 4 <= 1000
        self.assertEqual(done(client.send(search(3, SUFFIX, orOf(400)))).resultCode, 11)  # 201 x 50
        # equality assertions on one attribute under an OR are one set lookup: they count once
        uids = "(|" + "".join(f"(uid=u{n})" for n in range(150)) + "".join(f"(cn=c{n})" for n in range(400)) + ")"
        self.assertEqual(len(dns(client.send(search(4, SUFFIX, uids)))), 150)
        self.assertEqual(dns(client.send(search(5, SUFFIX, "(|(uid=U7)(uid=nobody)(objectClass=DOMAIN))"))),
                         [SUFFIX, "uid=u7,dc=example,dc=com"])

    def test_paged(self):
        """RFC 2696: pages of 3 with cookies, then an empty cookie; all entries exactly once."""
        seen, cookie, rounds = [], b"", 0
        while True:
            rounds += 1
            out = self.client.send(search(rounds, SUFFIX, controls=[pagedControl(3, cookie)]))
            self.assertEqual(done(out).resultCode, 0)
            self.assertLessEqual(len(entries(out)), 3)
            seen += dns(out)
            cookie = cookieOf(out[-1])
            if not cookie:
                break
        self.assertEqual(rounds, 4)
        self.assertEqual(len(seen), 10)
        self.assertEqual(len(set(seen)), 10)

    def test_pagedExactMultiple(self):
        """When the last page is full, its cookie is already empty (no empty extra page)."""
        out = self.client.send(search(1, USERS, "(objectClass=person)", controls=[pagedControl(4)]))
        self.assertEqual(len(entries(out)), 4)
        self.assertEqual(cookieOf(out[-1]), b"")

    def test_pagedAbandonAndBadCookie(self):
        out = self.client.send(search(1, SUFFIX, controls=[pagedControl(2)]))
        cookie = cookieOf(out[-1])
        out = self.client.send(search(2, SUFFIX, controls=[pagedControl(0, cookie)]))
        self.assertEqual((entries(out), done(out).resultCode, cookieOf(out[-1])), ([], 0, b""))
        out = self.client.send(search(3, SUFFIX, controls=[pagedControl(2, cookie)]))
        self.assertEqual(done(out).resultCode, 53)

    def test_unknownCriticalControl(self):
        out = self.client.send(search(1, SUFFIX, controls=[("1.2.3.4.5", True, None)]))
        self.assertEqual(done(out).resultCode, 12)
        out = self.client.send(search(2, USERS, scope=0, controls=[("1.2.3.4.5", False, None)]))
        self.assertEqual((dns(out), done(out).resultCode), ([USERS], 0))
        # ManageDsaIT (Apache Directory Studio sends it): there are no referrals, so it is accepted as is
        out = self.client.send(search(3, USERS, scope=0, controls=[("2.16.840.1.113730.3.4.2", True, None)]))
        self.assertEqual((dns(out), done(out).resultCode), ([USERS], 0))

    def test_rootDSE(self):
        """Found with any matching filter (ldaptor's server needs the exact spelling (objectClass=*))."""
        for flt in ("(objectClass=*)", "(objectclass=*)", "(objectClass=top)"):
            out = self.search("", flt, scope=0)
            (entry,) = entries(out)
            values = attrs(entry)
            self.assertEqual(values["namingContexts"], [SUFFIX.encode()])
            self.assertIn(b"1.3.6.1.4.1.1466.20037", values["supportedExtension"])
            self.assertIn(b"1.3.6.1.4.1.4203.1.11.3", values["supportedExtension"])
            self.assertEqual(values["supportedControl"], [b"1.2.840.113556.1.4.319", b"2.16.840.1.113730.3.4.2"])
            self.assertEqual(values["supportedLDAPVersion"], [b"3"])
            self.assertEqual(values["subschemaSubentry"], [b"cn=Subschema"])
        self.assertEqual(entries(self.search("", "(cn=nothing)", scope=0)), [])

    def test_rootDSEWithoutTLS(self):
        out = Client(makeFactory(tls=False)).send(search(1, "", scope=0, attributes=("supportedExtension",)))
        self.assertEqual(attrs(entries(out)[0])["supportedExtension"], [b"1.3.6.1.4.1.4203.1.11.3"])

    def test_subschema(self):
        out = self.search("cn=subschema", "(objectClass=subschema)", scope=0,
                          attributes=("objectClasses", "attributeTypes"))
        values = attrs(entries(out)[0])
        self.assertTrue(any(b"NAME 'inetOrgPerson' SUP organizationalPerson STRUCTURAL" in v
                            for v in values["objectClasses"]))
        self.assertTrue(any(b"NAME ( 'cn' 'commonName' ) SUP name" in v for v in values["attributeTypes"]))
        plain = attrs(entries(self.search("cn=Subschema", scope=0))[0])
        self.assertNotIn("attributeTypes", plain)  # operational: only when asked for
        self.assertIn(b"subschema", plain["objectClass"])

    def test_anonymousNone(self):
        client = Client(makeFactory(anonymous="none"))
        self.assertEqual(done(client.send(search(1, SUFFIX))).resultCode, 50)
        self.assertEqual(len(entries(client.send(search(2, "", scope=0)))), 1)  # the root DSE stays readable
        client.send(bind(3, BOB, "bob-pw"))
        self.assertEqual(len(entries(client.send(search(4, SUFFIX)))), 10)

    def test_pipelined(self):
        """Many requests in one read: answered in order, in one write."""
        data = b"".join(search(i, USERS, f"(uid=user{i})") for i in range(1, 50)) + search(50, USERS, "(uid=bob)")
        self.client.transport.clear()
        writes = []
        write = self.client.transport.write
        self.client.transport.write = lambda data: (writes.append(len(data)), write(data))
        self.client.protocol.dataReceived(data)
        self.assertEqual(len(writes), 1)
        responses = decodeAll(self.client.transport.value())
        self.assertEqual([r.id for r in responses], list(range(1, 50)) + [50, 50])


class _FillingTransport:
    """Makes a Client's StringTransport pause its producer (the protocol) once C{limit} bytes are unread."""

    def __init__(self, client: Client, limit: int) -> None:
        self.client, self.limit = client, limit
        transport = client.transport
        original = transport.write

        def write(data):
            original(data)
            if len(transport.value()) >= self.limit and transport.producer is not None:
                transport.producer.pauseProducing()

        transport.write = write

    def drain(self) -> list:
        """The client reads everything: decoded responses; the protocol is resumed."""
        t = self.client.transport
        out = decodeAll(t.value())
        t.clear()
        t.producer.resumeProducing()
        return out


class StreamingTests(unittest.TestCase):
    """A search whose client does not read stops between two entries and goes on when it has read."""

    def setUp(self):
        top = b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n\n"
        self.factory = makeFactory(directoryFrom(top + b"".join(
            b"dn: cn=e%d,dc=example,dc=com\nobjectClass: person\ncn: e%d\nsn: %s\n\n" % (i, i, b"x" * 1000)
            for i in range(300))), sizeLimit=1000)
        self.client = Client(self.factory)
        self.fill = _FillingTransport(self.client, 20_000)

    def test_searchSuspendedAndResumed(self):
        p = self.client.protocol
        self.client.transport.clear()
        p.dataReceived(search(1, SUFFIX, "(objectClass=person)") + search(2, SUFFIX, scope=0))
        got, suspended = [], 0
        for _ in range(100):
            if p.streaming is None:
                break
            suspended += 1
            self.assertEqual(p.transport.producerState, "paused")  # nothing more is read meanwhile
            got += self.fill.drain()
        got += self.fill.drain()
        self.assertGreaterEqual(suspended, 4)  # ~300 KB, handed to the transport 64 KB at a time
        self.assertEqual(len(entries(got)), 301)
        self.assertEqual([r.id for r in got if not isinstance(r.value, pureldap.LDAPSearchResultEntry)], [1, 2])
        self.assertEqual([r.value.resultCode for r in got if isinstance(r.value, pureldap.LDAPSearchResultDone)],
                         [0, 0])
        self.assertEqual(self.factory.metrics.entries.value, 301)

    def test_pagedSearchSuspendedMidPage(self):
        p = self.client.protocol
        cookie, seen, suspended = b"", [], 0
        for rounds in range(1, 10):
            self.client.transport.clear()
            p.dataReceived(search(rounds, SUFFIX, "(objectClass=person)", controls=[pagedControl(100, cookie)]))
            out = []
            for _ in range(100):
                if p.streaming is None:
                    break
                suspended += 1
                out += self.fill.drain()
            out += self.fill.drain()
            seen += dns(out)
            cookie = cookieOf(out[-1])
            if not cookie:
                break
        self.assertEqual(rounds, 3)
        self.assertGreaterEqual(suspended, 3)  # once in each page of ~100 KB
        self.assertEqual(len(seen), 300)
        self.assertEqual(len(set(seen)), 300)
