"""
Who may learn what about C{userPassword}: only its own entry, whatever the
operation -- attribute lists, compare, and filters (a filter on userPassword by
anyone else must not tell whether it matches, or the hash could be read out one
character at a time with substring filters).

And what the time of an answer tells: checking the password of a DN (or user name)
that does not exist must cost what a wrong password of an existing one costs --
the same hash scheme, with the same parameters, on the same path (at once for
salted SHA, in a thread for scrypt and crypt).
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from netsvc import auth
from netsvc.ldap import authn, directory
from tests.ldap._wire import (
    ALICE,
    BOB,
    SUFFIX,
    USERS,
    Client,
    bind,
    directoryFrom,
    dns,
    exampleDirectory,
    makeFactory,
    search,
)

#: alice's stored value in etc/ldap/example.ldif (its first characters are what a probe would guess).
ALICE_HASH = "{SSHA}4LGZEfLEQuQDLt9a+fYwnAJ6M38QsrUIn3VF4g=="

PROBES = [
    "(userPassword=*)",
    "(USERPASSWORD=*)",
    "(userPassword;binary=*)",
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


def _scryptLDIF(count: int) -> bytes:
    out = [b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n"]
    for i in range(count):
        stored = auth.hashPassword(f"pw{i}", "scrypt")
        out.append(f"dn: uid=u{i},dc=example,dc=com\nobjectClass: account\nuid: u{i}\n"
                   f"userPassword: {{SCRYPT}}{stored}\n".encode())
    return b"\n".join(out) + b"\n"


class TimingTests(unittest.TestCase):
    """Which work a check does, recorded (the time itself is not asserted: the machine is shared)."""

    def setUp(self):
        self.verified: list[str] = []
        real = auth.verifyPassword

        def recording(password, stored, plain=False):
            self.verified.append(directory.costClass(stored))
            return real(password, stored, plain)

        self.patch(auth, "verifyPassword", recording)

    @defer.inlineCallbacks
    def work(self, check, *args):
        """(whether the check answered at once, its answer, the cost classes of the hashes it verified)."""
        self.verified.clear()
        d = check(*args)
        now = d.called
        ok = yield d
        return now, ok, list(self.verified)

    @defer.inlineCallbacks
    def assertSameWork(self, check, known: tuple, unknown: tuple):
        knownWork = yield self.work(check, *known)
        unknownWork = yield self.work(check, *unknown)
        self.assertEqual(knownWork, unknownWork)
        self.assertEqual(len(knownWork[2]), 1)
        return unknownWork

    @defer.inlineCallbacks
    def test_unknownDNCostsASaltedSHA(self):
        """The example directory is mostly {SSHA}: an unknown DN is checked at once, against an {SSHA} value."""
        d = exampleDirectory()
        work = yield self.assertSameWork(d.checkPassword, (ALICE, "wrong"), ("uid=nobody,ou=users," + SUFFIX, "wrong"))
        self.assertEqual(work, (True, False, ["{SSHA}"]))

    def test_entryWithoutPasswordCostsTheSame(self):
        d = exampleDirectory()
        return self.assertSameWork(d.checkPassword, (ALICE, "wrong"), (USERS, "wrong"))

    @defer.inlineCallbacks
    def test_unknownDNCostsAnScrypt(self):
        """A directory of scrypt users: an unknown DN costs an scrypt with their parameters, in a thread."""
        d = directoryFrom(_scryptLDIF(2))
        work = yield self.assertSameWork(d.checkPassword, ("uid=u0," + SUFFIX, "wrong"),
                                         ("uid=nobody," + SUFFIX, "wrong"))
        self.assertEqual(work, (False, False, ["scrypt"]))

    def test_unknownDNNeverMatchesTheDummy(self):
        """The dummy is one of the directory's own values: its password still does not bind an unknown DN."""
        d = exampleDirectory()
        for password in ("alice-pw", "bob-pw"):
            self.assertFalse(self.successResultOf(d.checkPassword("uid=nobody,ou=users," + SUFFIX, password)))

    def test_localAuthenticatorUnknownUser(self):
        """users: {directory: true}: an unknown user name costs what a wrong password costs."""
        context = SimpleNamespace(reactor=Clock(), directory=exampleDirectory())
        local = authn.LocalDirectory(context)
        return self.assertSameWork(local.check, ("alice", "wrong"), ("nobody", "wrong"))
