"""netsvc.ldap.ldifout: RFC 2849 safe strings, base64, folding, and round trips through ldaptor's LDIF parser."""

from __future__ import annotations

import base64

from ldaptor.protocols.ldap.ldifprotocol import LDIF
from twisted.trial import unittest

from netsvc.ldap.ldifout import WIDTH, entryLDIF, fold, isSafe, manyLDIF, valueLine


def parseLDIF(data: bytes) -> list:
    """Entries parsed by ldaptor's LDIF parser: [(dn bytes, {attr bytes: [values]})]."""
    got = []
    parser = LDIF()
    parser.gotEntry = lambda e: got.append((e.dn.getText().encode("utf-8"),
                                            {k: sorted(v) for k, v in e.items()}))
    parser.dataReceived(data)
    parser.connectionLost(None)
    return got


class SafeStringTests(unittest.TestCase):
    def test_plain(self):
        self.assertTrue(isSafe(b"Jo Smith"))
        self.assertTrue(isSafe(b""))
        self.assertEqual(valueLine("cn", b"Jo Smith"), b"cn: Jo Smith\n")

    def test_unsafeFirstCharacters(self):
        for value in (b" lead", b":colon", b"<less", b"\x00nul", b"\nlf", b"\rcr"):
            self.assertFalse(isSafe(value), value)
            self.assertEqual(valueLine("sn", value), b"sn:: " + base64.b64encode(value) + b"\n")

    def test_unsafeAnywhere(self):
        for value in (b"a\nb", b"a\rb", b"a\x00b", "Zo\u00eb".encode(), b"\xff\xd8\xff"):
            self.assertFalse(isSafe(value), value)

    def test_trailingSpaceIsBase64(self):
        # RFC 2849 note 8: readers strip it, so it is encoded.
        self.assertEqual(valueLine("sn", b"end "), b"sn:: ZW5kIA==\n")

    def test_colonAndLessInsideAreSafe(self):
        self.assertEqual(valueLine("description", b"a:b<c"), b"description: a:b<c\n")

    def test_emptyValue(self):
        self.assertEqual(valueLine("description", b""), b"description:\n")

    def test_dnBase64WhenNotAscii(self):
        out = entryLDIF("cn=\u00c4rger,dc=example,dc=com", [("cn", ["\u00c4rger".encode()])])
        self.assertTrue(out.startswith(b"dn:: " + base64.b64encode("cn=\u00c4rger,dc=example,dc=com".encode())))


class FoldTests(unittest.TestCase):
    def test_shortLineUntouched(self):
        self.assertEqual(fold(b"x" * WIDTH), b"x" * WIDTH + b"\n")

    def test_folding(self):
        line = b"description: " + b"y" * 200
        out = fold(line)
        lines = out.rstrip(b"\n").split(b"\n")
        self.assertTrue(all(len(piece) <= WIDTH for piece in lines), [len(piece) for piece in lines])
        self.assertEqual(len(lines[0]), WIDTH)
        self.assertTrue(all(piece.startswith(b" ") for piece in lines[1:]))
        self.assertEqual(lines[0] + b"".join(piece[1:] for piece in lines[1:]), line)

    def test_base64Folded(self):
        out = valueLine("jpegPhoto", bytes(range(256)) * 2)
        self.assertTrue(all(len(piece) <= WIDTH for piece in out.split(b"\n")))

    def test_widthIsLdapsearchs(self):
        """OpenLDAP's ldapsearch (2.5, libldap's LDIF_LINE_WIDTH) folds at 78 columns by default."""
        self.assertEqual(WIDTH, 78)

    def test_nameIsNeverSplit(self):
        """
        As libldap writes it: "name: " stays whole on the first line even when it is wider
        than the fold width; the value starts on the next (ldapsearch -o ldif-wrap=10).
        """
        out = valueLine("ldapSyntaxes", b"( 1.3.6.1.4.1.1466 )", width=10)
        self.assertEqual(out, b"ldapSyntaxes: \n ( 1.3.6.1\n .4.1.1466\n  )\n")
        self.assertEqual(valueLine("cn", b"abcdefghijkl", width=10), b"cn: abcdef\n ghijkl\n")
        self.assertEqual(valueLine("description", b"x", width=10), b"description: \n x\n")

    def test_userPasswordAlwaysBase64(self):
        """As ldapsearch and slapcat print it (libldap's ldif_must_b64_encode): userPassword, also by OID."""
        for name in ("userPassword", "USERPASSWORD", "userPassword;x-tag", "2.5.4.35"):
            self.assertEqual(valueLine(name, b"{SSHA}abc"), name.encode() + b":: e1NTSEF9YWJj\n", name)
        self.assertEqual(valueLine("userPasswordX", b"abc"), b"userPasswordX: abc\n")

    def test_noFolding(self):
        out = entryLDIF("dc=x", [("description", [b"z" * 300])], width=0)
        self.assertIn(b"description: " + b"z" * 300 + b"\n", out)


class RoundTripTests(unittest.TestCase):
    VALUES = [b"plain", b" leading space", b"trailing space ", b":colon first", b"<less first", b"two\nlines",
              b"cr\r", b"nul\x00inside", "\u00c4rger \u00e9t\u00e9 \u65e5\u672c".encode(), bytes(range(256)),
              b"long " * 60, b""]

    def test_everyValueSurvives(self):
        entries = [(f"cn=e{n},dc=example,dc=com", [("objectClass", [b"top"]), ("description", [value])])
                   for n, value in enumerate(self.VALUES) if value]
        parsed = parseLDIF(manyLDIF(entries))
        self.assertEqual(len(parsed), len(entries))
        for (dn, attrs), (gotDN, gotAttrs) in zip(entries, parsed):
            self.assertEqual(gotDN, dn.encode())
            self.assertEqual(gotAttrs[b"description"], attrs[1][1])

    def test_unsafeDNSurvives(self):
        dn = "cn=J\u00fcrgen M\u00fcller,ou=users,dc=example,dc=com"
        parsed = parseLDIF(entryLDIF(dn, [("cn", ["J\u00fcrgen M\u00fcller".encode()])]))
        self.assertEqual(parsed[0][0], dn.encode("utf-8"))

    def test_longDNFoldedAndSurvives(self):
        dn = ",".join(f"ou=unit{n}" for n in range(30)) + ",dc=example,dc=com"
        out = entryLDIF(dn, [("ou", [b"unit0"])])
        self.assertGreater(out.count(b"\n "), 2)
        self.assertEqual(parseLDIF(out)[0][0], dn.encode())

    def test_severalValuesInOrder(self):
        out = entryLDIF("cn=x,dc=example,dc=com", [("mail", [b"a@x", b"b@x", "\u00e9@x".encode()])])
        self.assertEqual(out.count(b"mail:"), 3)
        self.assertEqual(parseLDIF(out)[0][1][b"mail"], sorted([b"a@x", b"b@x", "\u00e9@x".encode()]))
