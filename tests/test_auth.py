"""netsvc.auth: password hashes, users files, user sources in the config."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import warnings
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from netsvc import auth, config
from netsvc.runtime import Context, StartupError


def _crypt(password: str, salt: str) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    return crypt.crypt(password, salt)


class HashTests(unittest.TestCase):
    def test_scryptRoundTrip(self):
        stored = auth.hashPassword("s3cret")
        self.assertTrue(stored.startswith("scrypt:"))
        self.assertTrue(auth.verifyPassword("s3cret", stored))
        self.assertFalse(auth.verifyPassword("s3cret ", stored))
        self.assertFalse(auth.verifyPassword("", stored))

    def test_scryptSalted(self):
        """Two hashes of one password differ (random salt), both verify."""
        a, b = auth.hashPassword("pw"), auth.hashPassword("pw")
        self.assertNotEqual(a, b)
        self.assertTrue(auth.verifyPassword("pw", a) and auth.verifyPassword("pw", b))

    def test_scryptBraced(self):
        stored = auth.hashPassword("pw")
        self.assertTrue(auth.verifyPassword("pw", "{SCRYPT}" + stored))
        self.assertFalse(auth.verifyPassword("px", "{SCRYPT}" + stored))

    def test_sshaAsSlappasswdWritesIt(self):
        """{SSHA} = base64(sha1(password + salt) + salt), as slappasswd and slapd do."""
        salt = b"\x01\x02\x03\x04"
        expected = "{SSHA}" + base64.b64encode(hashlib.sha1(b"secret" + salt).digest() + salt).decode()
        self.assertEqual(auth.hashPassword("secret", "ssha", salt=salt), expected)
        self.assertTrue(auth.verifyPassword("secret", expected))
        self.assertTrue(auth.verifyPassword("secret", "{ssha}" + expected[6:]), "scheme names are case-insensitive")
        self.assertFalse(auth.verifyPassword("Secret", expected))

    def test_sha2Salted(self):
        salt = os.urandom(8)
        for scheme, fn in (("{SSHA256}", hashlib.sha256), ("{SSHA512}", hashlib.sha512)):
            stored = scheme + base64.b64encode(fn(b"pw" + salt).digest() + salt).decode()
            self.assertTrue(auth.verifyPassword("pw", stored), scheme)
            self.assertFalse(auth.verifyPassword("pX", stored), scheme)

    def test_unsaltedSHA(self):
        stored = "{SHA}" + base64.b64encode(hashlib.sha1(b"pw").digest()).decode()
        self.assertTrue(auth.verifyPassword("pw", stored))
        self.assertFalse(auth.verifyPassword("px", stored))

    def test_crypt(self):
        stored = _crypt("pw", "$6$saltsalt$")
        if stored is None:
            raise unittest.SkipTest("no crypt module on this Python (removed in 3.13)")
        self.assertTrue(auth.verifyPassword("pw", "{CRYPT}" + stored))
        self.assertFalse(auth.verifyPassword("px", "{CRYPT}" + stored))

    def test_cleartextOnlyWhenAsked(self):
        """An LDAP cleartext userPassword matches only with plain=True; a users file never has cleartext."""
        self.assertFalse(auth.verifyPassword("pw", "pw"))
        self.assertTrue(auth.verifyPassword("pw", "pw", plain=True))
        self.assertFalse(auth.verifyPassword("px", "pw", plain=True))
        self.assertTrue(auth.verifyPassword("pw", "{CLEARTEXT}pw", plain=True))
        self.assertFalse(auth.verifyPassword("pw", "{CLEARTEXT}pw"))

    def test_garbageNeverRaises(self):
        for stored in ("", "scrypt:", "scrypt:zz:zz", "scrypt:00:00:00", "{SSHA}not base64!", "{SSHA}AAAA",
                       "{MD5}abc", "{", "}", "{SHA}", "{CRYPT}"):
            self.assertFalse(auth.verifyPassword("pw", stored), stored)
        self.assertFalse(auth.verifyPassword("\ud800", auth.hashPassword("x")), "unencodable password")

    def test_unknownScheme(self):
        self.assertRaises(ValueError, auth.hashPassword, "pw", "md5")


def _sync(password, stored):
    return defer.succeed(auth.verifyPassword(password, stored))


class UsersFileTests(unittest.TestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.path.write_text(f"# comment\n\nalice:{auth.hashPassword('wonder')}\nbroken line\nBob:{{SHA}}x\n")

    def check(self, users, user, password):
        return self.successResultOf(users.check(user, password))

    def test_checkAndReserved(self):
        users = auth.UsersFile(self.path, verify=_sync)
        self.assertTrue(users.isReserved("alice"))
        self.assertTrue(users.isReserved("ALICE"), "user names are case-insensitive")
        self.assertTrue(users.isReserved("bob"))
        self.assertFalse(users.isReserved("carol"))
        self.assertTrue(self.check(users, "Alice", "wonder"))
        self.assertFalse(self.check(users, "alice", "wander"))
        self.assertFalse(self.check(users, "carol", "wonder"))
        self.assertEqual(users.users(), ["alice", "bob"])

    def test_unknownUserCostsAHash(self):
        """An unknown user is checked against a dummy hash (same work as a wrong password)."""
        seen = []
        users = auth.UsersFile(self.path, verify=lambda p, s: seen.append(s) or defer.succeed(True))
        self.assertFalse(self.check(users, "nobody", "x"), "a dummy match never admits")
        self.assertTrue(seen[0].startswith("scrypt:"))

    def test_reloadsWhenChanged(self):
        users = auth.UsersFile(self.path, verify=_sync)
        auth.addUser(self.path, "carol", "c4rol")
        self.assertTrue(self.check(users, "carol", "c4rol"))
        self.assertTrue(self.check(users, "alice", "wonder"), "other lines kept")

    def test_unreadableKeepsLastGood(self):
        users = auth.UsersFile(self.path, verify=_sync)
        self.path.unlink()
        self.assertTrue(users.isReserved("alice"))
        self.flushLoggedErrors()

    def test_verifierErrorIsFalse(self):
        users = auth.UsersFile(self.path, verify=lambda p, s: defer.fail(RuntimeError("boom")))
        self.assertFalse(self.check(users, "alice", "wonder"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_realThread(self):
        """Without a test verifier the check runs scrypt in a thread and fires on the reactor."""
        users = auth.UsersFile(self.path)
        return users.check("alice", "wonder").addCallback(self.assertTrue)


class AddUserTests(unittest.TestCase):
    def test_createsPrivateFile(self):
        path = Path(self.mktemp())
        auth.addUser(path, "alice", "pw")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        (line,) = path.read_text().splitlines()
        user, _, stored = line.partition(":")
        self.assertEqual(user, "alice")
        self.assertTrue(auth.verifyPassword("pw", stored))

    def test_replacesKeepsOthersAndComments(self):
        path = Path(self.mktemp())
        path.write_text("# users\nbob:{SHA}x\nALICE:old\n")
        auth.addUser(path, "alice", "new", scheme="ssha")
        lines = path.read_text().splitlines()
        self.assertEqual(lines[:2], ["# users", "bob:{SHA}x"])
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[2].startswith("alice:{SSHA}"))
        self.assertEqual(list(Path(path.parent).glob(f".{path.name}.*")), [], "no temporary file left")

    def test_badNames(self):
        path = Path(self.mktemp())
        for name in ("", "a:b", "a\nb", " a", "#a"):
            self.assertRaises(ValueError, auth.addUser, path, name, "pw")
        self.assertFalse(path.exists())

    def test_commandLine(self):
        """python -m netsvc.auth USER [FILE]: the password asked for on the terminal, the line printed or added."""
        self.patch(auth.getpass, "getpass", lambda prompt: "pw")
        path = Path(self.mktemp())
        self.assertEqual(auth._main(["alice", str(path)]), 0)
        self.assertTrue(auth.verifyPassword("pw", path.read_text().strip().partition(":")[2]))
        self.assertEqual(auth._main([]), 2)


@config.frozen
class _Holder:
    users: auth.UserSource | None = config.field(None)


class UserSourceTests(unittest.TestCase):
    def parse(self, value):
        return config.structure(_Holder, {"users": value}, "t.yaml").users

    def problems(self, value):
        e = self.assertRaises(config.ConfigError, self.parse, value)
        return [str(p) for p in e.problems]

    def test_stringIsAFile(self):
        source = self.parse("users.txt")
        self.assertEqual((source.kind, source.file), ("file", "users.txt"))

    def test_ldap(self):
        source = self.parse({"ldap": "ldap://127.0.0.1:3389", "base": "ou=users,dc=example,dc=com"})
        self.assertEqual((source.kind, source.attribute), ("ldap", "uid"))

    def test_directory(self):
        self.assertEqual(self.parse({"directory": True}).kind, "directory")

    def test_problems(self):
        self.assertEqual(self.problems({"file": "a", "directory": True}),
                         ["t.yaml: users: give exactly one of file:, ldap: or directory: true (got file, directory)"])
        self.assertEqual(self.problems({}), ["t.yaml: users: give exactly one of file:, ldap: or directory: true"])
        self.assertEqual(self.problems({"ldap": "http://x"}),
                         ["t.yaml: users.ldap: expected ldap://host:port or ldaps://host:port, got 'http://x'",
                          "t.yaml: users.base: required with ldap: (where the users are, e.g. "
                          "ou=users,dc=example,dc=com)"])
        self.assertEqual(self.problems({"file": "u", "base": "dc=x"}), ["t.yaml: users.base: only used with ldap:"])
        self.assertIn("t.yaml: users.fil: unknown key (did you mean 'file'?)", self.problems({"fil": "u"}))
        self.assertEqual(self.problems(3), ["t.yaml: users: expected a users file name, or a mapping with "
                                            "file:, ldap: or directory:"])


class AuthenticatorForTests(unittest.TestCase):
    def context(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        settings = config.parse(f"state_dir: {folder / 'state'}", str(folder / "netsvc.yaml"), base_dir=str(folder))
        return Context(settings, configFile="netsvc.yaml"), folder

    def test_fileRelativeToConfig(self):
        context, folder = self.context()
        auth.addUser(folder / "users.txt", "alice", "pw")
        authenticator = auth.authenticatorFor(auth.UserSource(file="users.txt"), context)
        self.assertTrue(authenticator.isReserved("alice"))

    def test_missingFile(self):
        context, folder = self.context()
        e = self.assertRaises(StartupError, auth.authenticatorFor, auth.UserSource(file="nope.txt"), context,
                              "services.smtp.users")
        self.assertEqual(str(e), f"netsvc.yaml: services.smtp.users: cannot read users file {folder / 'nope.txt'}")
