"""
Who may learn what about C{userPassword}: only its own entry, whatever the
operation -- attribute lists, compare, and filters (a filter on userPassword by
anyone else must not tell whether it matches, or the hash could be read out one
character at a time with substring filters).
"""

from __future__ import annotations

from twisted.trial import unittest

from tests.ldap._wire import ALICE, BOB, SUFFIX, USERS, Client, bind, dns, makeFactory, search

#: alice's stored value in etc/ldap/example.ldif (its first characters are what a probe would guess).
ALICE_HASH = "{SSHA}4LGZEfLEQuQDLt9a+fYwnAJ6M38QsrUIn3VF4g=="

PROBES = [
    "(userPassword=*)",
    f"(userPassword={ALICE_HASH})",
    "(userPassword={SSHA}4*)",
    "(userPassword=*4LGZ*)",
    "(userPassword>={SSHA}4)",
    "(userPassword<={SSHA}4)",
    "(userPassword~={SSHA}4LGZEfLEQuQDLt9a+fYwnAJ6M38QsrUIn3VF4g==)",
    f"(userPassword:octetStringMatch:={ALICE_HASH})",
    f"(userPassword:={ALICE_HASH})",
    "(&(uid=alice)(userPassword={SSHA}4*))",
    "(|(uid=nobody)(userPassword={SSHA}4*))",
]


class FilterProbeTests(unittest.TestCase):
    def setUp(self):
        self.client = Client(makeFactory())

    def found(self, flt: str, base: str = USERS) -> list[str]:
        return dns(self.client.send(search(2, base, flt, attributes=("1.1",))))

    def test_anonymousLearnsNothing(self):
        for flt in PROBES:
            self.assertEqual(self.found(flt), [], flt)

    def test_negationLearnsNothing(self):
        """Under NOT, a hidden assertion gives the same answer for every entry: nothing to tell them apart."""
        right = self.found("(!(userPassword={SSHA}4*))")
        wrong = self.found("(!(userPassword={SSHA}X*))")
        self.assertEqual(right, wrong)

    def test_anotherUserLearnsNothing(self):
        self.client.send(bind(1, BOB, "bob-pw"))
        for flt in PROBES:
            self.assertNotIn(ALICE, self.found(flt), flt)
        self.assertEqual(self.found("(!(userPassword={SSHA}4*))"), self.found("(!(userPassword={SSHA}X*))"))

    def test_ownEntryMatches(self):
        """Bound as alice, her own userPassword is hers to filter on (as she may read it)."""
        self.client.send(bind(1, ALICE, "alice-pw"))
        self.assertEqual(self.found("(userPassword=*)"), [ALICE])
        self.assertEqual(self.found("(userPassword={SSHA}4*)"), [ALICE])
        self.assertEqual(self.found(f"(userPassword={ALICE_HASH})", SUFFIX), [ALICE])
        self.assertEqual(self.found("(userPassword={SSHA}X*)"), [])
