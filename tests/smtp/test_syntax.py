"""Envelope address syntax: source routes, percent hack, quoted local parts, literals, domains."""

from __future__ import annotations

from twisted.trial import unittest


class AddressSyntaxTests(unittest.TestCase):
    """What a trusted client may queue: the tricks are normalised or refused, never passed to delivery as garbage."""

    def check(self, path, sender=False):
        from netsvc.smtp.syntax import checkMailbox

        return checkMailbox(path, sender=sender)

    def test_accepted(self):
        cases = {
            "@relay.test,@other.test:user@example.test": "user@example.test",  # source route dropped
            "user%other@example.test": "user%other@example.test",  # percent hack: only a local part here
            '"quoted local"@example.test': '"quoted local"@example.test',
            "USER@EXAMPLE.TEST": "USER@EXAMPLE.TEST",
            "x@[192.0.2.1]": "x@[192.0.2.1]",
            "x@[IPv6:2001:db8::1]": "x@[IPv6:2001:db8::1]",
            "x@b_c.example": "x@b_c.example",
            "x@xn--bcher-kva.example": "x@xn--bcher-kva.example",
            "é@bücher.example": "é@bücher.example",
            "x@localhost": "x@localhost",
        }
        for path, expected in cases.items():
            self.assertEqual(self.check(path), expected, path)

    def test_refused(self):
        from netsvc.smtp.syntax import SyntaxProblem

        for path in ["x@example.test.", "x@.example.test", "x@exa..mple", "x@-bad.example", "x@bad-.example",
                     "x@exa%mple.test", "x@a!b.test", "x@a/b.test", "x@[garbage]", "x@[1.2.3]",
                     "x@[IPv6:1.2.3.4]", "x@[IPv6:zz::1]", "x@[::1]", "x@[tag:whatever]", "x@" + "a" * 64 + ".test",
                     "@a:b@c@d"]:
            with self.assertRaises(SyntaxProblem, msg=path) as e:
                self.check(path)
            self.assertEqual(e.exception.reply[:2], (501, "5.1.3"), path)


class XtextTests(unittest.TestCase):
    def test_decoded(self):
        from netsvc.smtp.syntax import decodeXtext

        self.assertEqual(decodeXtext("a+2Bb+3Dc"), "a+b=c")

    def test_malformedIs501(self):
        """A '+' not followed by two hex digits (found by fuzz/smtp_address) is 501, not a TypeError."""
        from netsvc.smtp.syntax import SyntaxProblem, decodeXtext, parseDSNMail

        for bad in ("x+2\x13", "x+", "+zz"):
            with self.assertRaises(SyntaxProblem) as e:
                decodeXtext(bad)
            self.assertEqual(e.exception.reply[0], 501)
        with self.assertRaises(SyntaxProblem):
            parseDSNMail({"ENVID": "x+2\x13"})
