"""The built-in schema, value normalization, DNs, and filter matching on single entries."""

from __future__ import annotations

from twisted.trial import unittest

from netsvc.ldap.dn import DNError, escapeValue, isWithin, normalizeDN, parentDN, parseDN, splitNormalized
from netsvc.ldap.entry import Entry
from netsvc.ldap.match import matches
from netsvc.ldap.schema import SCHEMA, normalize


class SchemaTests(unittest.TestCase):
    def test_aliasesAndOIDs(self):
        self.assertEqual(SCHEMA.canonical("commonName"), "cn")
        self.assertEqual(SCHEMA.canonical("CN"), "cn")
        self.assertEqual(SCHEMA.canonical("2.5.4.3"), "cn")
        self.assertEqual(SCHEMA.canonical("rfc822Mailbox"), "mail")
        self.assertEqual(SCHEMA.canonical("someUnknownAttr"), "someunknownattr")

    def test_rules(self):
        self.assertEqual(SCHEMA.attribute("cn").kind, "ci")
        self.assertEqual(SCHEMA.attribute("memberUid").kind, "ce")
        self.assertEqual(SCHEMA.attribute("uidNumber").kind, "int")
        self.assertEqual(SCHEMA.attribute("member").kind, "dn")
        self.assertEqual(SCHEMA.attribute("userPassword").kind, "octet")
        self.assertEqual(SCHEMA.attribute("unknown").kind, "ci")
        self.assertTrue(SCHEMA.attribute("entryDN").operational)
        self.assertFalse(SCHEMA.attribute("mail").operational)

    def test_superclasses(self):
        self.assertEqual(SCHEMA.superclasses("inetOrgPerson"),
                         {"inetorgperson", "organizationalperson", "person", "top"})
        self.assertEqual(SCHEMA.superclasses("posixAccount"), {"posixaccount", "top"})
        self.assertEqual(SCHEMA.superclasses("madeUp"), {"madeup"})

    def test_descriptions(self):
        """Every description is RFC 4512-shaped: balanced, with an OID and a NAME."""
        values = SCHEMA.subschemaValues()
        self.assertEqual(set(values), {"ldapSyntaxes", "matchingRules", "attributeTypes", "objectClasses"})
        for name in ("matchingRules", "attributeTypes", "objectClasses"):
            for v in values[name]:
                text = v.decode()
                self.assertRegex(text, r"^\( [0-9.]+ NAME ('[A-Za-z0-9-]+'|\( ('[A-Za-z0-9-]+' )+\)) .* \)$")
                self.assertEqual(text.count("("), text.count(")"), text)
        mail = [v for v in values["attributeTypes"] if b"'mail'" in v][0]
        self.assertEqual(mail, b"( 0.9.2342.19200300.100.1.3 NAME ( 'mail' 'rfc822Mailbox' ) EQUALITY "
                               b"caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch "
                               b"SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 )")
        # every attribute a class names is defined
        names = {n.lower() for a in SCHEMA.attributes for n in a.names}
        for c in SCHEMA.objectClasses:
            for a in c.must + c.may:
                self.assertIn(a.lower(), names, (c.name, a))
            if c.sup:
                self.assertIsNotNone(SCHEMA.objectClass(c.sup))

    def test_normalize(self):
        self.assertEqual(normalize("ci", b"  Ann   LEE "), b"ann lee")
        self.assertEqual(normalize("ce", b"  Ann   LEE "), b"Ann LEE")
        self.assertEqual(normalize("tel", b"+1 555-0100"), b"+15550100")
        self.assertEqual(normalize("int", b" 007"), b"7")
        self.assertTrue(normalize("int", b"seven").startswith(b"\0"))
        self.assertEqual(normalize("dn", b"UID=Ann, OU=People"), b"uid=ann,ou=people")
        self.assertEqual(normalize("octet", b"AbC "), b"AbC ")
        self.assertTrue(normalize("ci", b"\xff").startswith(b"\0"))


class DNTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(parseDN("cn=Ann Lee+uid=ann, ou=Users ,dc=example"),
                         [[("cn", "Ann Lee"), ("uid", "ann")], [("ou", "Users")], [("dc", "example")]])
        self.assertEqual(parseDN(r"cn=Lee\, Ann,dc=x"), [[("cn", "Lee, Ann")], [("dc", "x")]])
        self.assertEqual(parseDN(r"cn=caf\C3\A9,dc=x")[0], [("cn", "café")])
        self.assertEqual(parseDN('cn="a,b",dc=x')[0], [("cn", "a,b")])
        self.assertEqual(parseDN(""), [])
        for bad in ("cn", "=x", "cn=a,dc", "cn=a\\", 'cn="open', "c n=x"):
            with self.assertRaises(DNError, msg=bad):
                parseDN(bad)

    def test_normalize(self):
        self.assertEqual(normalizeDN("CN=Ann  Lee+UID=ann, OU=Users,DC=Example"),
                         "cn=ann lee+uid=ann,ou=users,dc=example")
        self.assertEqual(normalizeDN("uid=ann+cn=Ann Lee,ou=users,dc=example"),
                         normalizeDN("cn=ann lee+uid=ann,ou=users,dc=example"))
        self.assertEqual(normalizeDN("commonName=Ann"), "cn=ann")
        self.assertEqual(normalizeDN(r"cn=Lee\, Ann,dc=x"), r"cn=lee\, ann,dc=x")
        self.assertEqual(splitNormalized(r"cn=lee\, ann,dc=x"), [r"cn=lee\, ann", "dc=x"])
        self.assertEqual(parentDN(r"cn=lee\, ann,dc=x"), "dc=x")
        self.assertEqual(parentDN("dc=x"), "")
        self.assertIsNone(parentDN(""))

    def test_within(self):
        self.assertTrue(isWithin("uid=a,dc=x", "dc=x"))
        self.assertTrue(isWithin("dc=x", "dc=x"))
        self.assertFalse(isWithin("uid=a,dc=xx", "dc=x"))
        self.assertFalse(isWithin("uid=a,dcx=x", "x=x"))
        self.assertTrue(isWithin("dc=x", ""))

    def test_escape(self):
        self.assertEqual(escapeValue(" a,b+c "), r"\ a\,b\+c\ ")
        self.assertEqual(escapeValue("#x"), r"\#x")


def entry(*pairs: tuple[str, str]) -> Entry:
    attrs = [(n, v.encode()) for n, v in pairs]
    return Entry("cn=x,dc=example", "cn=x,dc=example", "dc=example", attrs)


class MatchTests(unittest.TestCase):
    def setUp(self):
        self.e = entry(("objectClass", "inetOrgPerson"), ("cn", "Ann Lee"), ("cn", "Annie"), ("sn", "Lee"),
                       ("memberUid", "ann"), ("uidNumber", "1000"), ("description", "Pies, Cakes and more"),
                       ("telephoneNumber", "+1 555 0100"))

    def check(self, flt: tuple, expected: bool) -> None:
        self.assertEqual(matches(flt, self.e), expected, flt)

    def test_equality(self):
        self.check(("eq", "objectclass", b"PERSON"), True)
        self.check(("eq", "objectClass", b"organizationalPerson"), True)
        self.check(("eq", "objectClass", b"posixAccount"), False)
        self.check(("eq", "CN", b"ann  LEE"), True)
        self.check(("eq", "commonName", b"annie"), True)
        self.check(("eq", "memberUid", b"ann"), True)
        self.check(("eq", "memberUid", b"Ann"), False)
        self.check(("eq", "uidNumber", b"01000"), True)
        self.check(("eq", "telephoneNumber", b"+1-555-0100"), True)
        self.check(("approx", "sn", b"lee"), True)
        self.check(("eq", "mail", b"x"), False)

    def test_substrings(self):
        self.check(("sub", "cn", b"ANN", [], None), True)
        self.check(("sub", "cn", None, [], b"LEE"), True)
        self.check(("sub", "cn", b"a", [b"n l"], b"e"), True)
        self.check(("sub", "description", None, [b"cakes", b"pies"], None), False)  # order matters
        self.check(("sub", "description", b"pies", [b"cakes"], b"more"), True)
        self.check(("sub", "cn", b"annie", [], b"annie"), False)  # initial and final may not overlap
        self.check(("sub", "memberUid", b"A", [], None), False)
        self.check(("sub", "mail", b"a", [], None), False)

    def test_ordering(self):
        self.check(("ge", "uidNumber", b"999"), True)  # numerically, not as strings
        self.check(("le", "uidNumber", b"999"), False)
        self.check(("ge", "sn", b"KAY"), True)
        self.check(("le", "sn", b"kay"), False)
        self.check(("ge", "uidNumber", b"x"), False)

    def test_booleans(self):
        yes, no = ("present", "sn"), ("present", "mail")
        self.check(("and", [yes, yes]), True)
        self.check(("and", [yes, no]), False)
        self.check(("or", [no, yes]), True)
        self.check(("or", [no, no]), False)
        self.check(("not", no), True)
        self.check(("and", []), True)  # RFC 4526 absolute true
        self.check(("or", []), False)  # and absolute false

    def test_extensible(self):
        self.check(("ext", None, "cn", b"ANNIE", False), True)
        self.check(("ext", "caseExactMatch", "cn", b"ANNIE", False), False)
        self.check(("ext", "caseExactMatch", "cn", b"Annie", False), True)
        self.check(("ext", "2.5.13.2", "cn", b"ANNIE", False), True)
        self.check(("ext", "1.2.3.4", "cn", b"Annie", False), False)
