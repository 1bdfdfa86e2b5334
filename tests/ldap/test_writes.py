"""Writable mode: add, modify, delete, modify DN by writers, saved to the LDIF file before the answer."""

from __future__ import annotations

import shutil
from pathlib import Path

from ldaptor.protocols import pureber, pureldap
from twisted.trial import unittest

from netsvc import config
from netsvc.ldap.directory import Directory
from netsvc.ldap.writes import LDIFStore
from tests.ldap._wire import ALICE, BOB, CAROL, EXAMPLE, SUFFIX, USERS, Client, bind, dns, makeFactory, msg, search

ADMINS = "cn=admins,ou=groups,dc=example,dc=com"
EVE = "uid=eve,ou=users,dc=example,dc=com"


def add(msgid: int, dn: str, **attributes: list[str]) -> bytes:
    attrs = [(pureldap.LDAPAttributeDescription(name.encode()),
              pureber.BERSet([pureldap.LDAPAttributeValue(v.encode()) for v in values]))
             for name, values in attributes.items()]
    return msg(pureldap.LDAPAddRequest(entry=dn.encode(), attributes=attrs), msgid)


def modify(msgid: int, dn: str, *changes: tuple[int, str, list[str]]) -> bytes:
    mods = [pureber.BERSequence([pureber.BEREnumerated(op), pureber.BERSequence([
        pureldap.LDAPAttributeDescription(name.encode()),
        pureber.BERSet([pureldap.LDAPAttributeValue(v.encode()) for v in values])])]) for op, name, values in changes]
    return msg(pureldap.LDAPModifyRequest(object=dn.encode(), modification=mods), msgid)


class WriteTests(unittest.TestCase):
    def setUp(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = folder / "example.ldif"
        shutil.copy(EXAMPLE, self.path)
        directory = Directory.load(SUFFIX, [self.path])
        self.factory = makeFactory(directory, writers=[ADMINS, BOB])
        self.factory.store = LDIFStore(directory, self.path)
        self.client = Client(self.factory)
        self.assertEqual(self.code(bind(1, ALICE, "alice-pw")), 0)  # alice is in cn=admins

    def code(self, request: bytes) -> int:
        (response,) = self.client.send(request)
        return response.value.resultCode

    def saved(self) -> Directory:
        """The directory as the file now holds it."""
        return Directory.load(SUFFIX, [self.path])

    def test_add(self):
        self.assertEqual(self.code(add(2, EVE, objectClass=["inetOrgPerson"], cn=["Eve"], sn=["Dropper"])), 0)
        self.assertEqual(dns(self.client.send(search(3, USERS, "(uid=eve)"))), [EVE])  # uid from the RDN
        self.assertEqual(self.saved().findUser("eve").get("sn"), ["Dropper"])
        self.assertEqual(self.factory.metrics.writes.value, 1)

    def test_addErrors(self):
        self.assertEqual(self.code(add(2, BOB, objectClass=["person"], cn=["x"], sn=["x"])), 68)
        self.assertEqual(self.code(add(3, "uid=x,ou=nowhere,dc=example,dc=com", objectClass=["person"])), 32)
        self.assertEqual(self.code(add(4, EVE, cn=["Eve"])), 65)
        self.assertEqual(self.code(add(5, "not a dn", objectClass=["person"])), 34)
        self.assertEqual(self.code(add(6, "dc=other,dc=org", objectClass=["domain"])), 32)
        self.assertEqual(self.path.read_bytes(), EXAMPLE.read_bytes())  # nothing saved

    def test_modify(self):
        self.assertEqual(self.code(modify(2, CAROL, (2, "mail", ["carol@example.org"]), (0, "title", ["Boss"]),
                                          (1, "givenName", []))), 0)
        carol = self.saved().get(CAROL)
        self.assertEqual((carol.get("mail"), carol.get("title"), carol.get("givenName")),
                         (["carol@example.org"], ["Manager", "Boss"], []))
        self.assertTrue(self.successResultOf(self.saved().checkPassword(BOB, "bob-pw")))

    def test_modifyErrors(self):
        self.assertEqual(self.code(modify(2, CAROL, (0, "title", ["MANAGER"]))), 20)  # caseIgnore: exists
        self.assertEqual(self.code(modify(3, CAROL, (1, "roomNumber", []))), 16)
        self.assertEqual(self.code(modify(4, CAROL, (1, "title", ["Janitor"]))), 16)
        self.assertEqual(self.code(modify(5, CAROL, (1, "uid", []))), 67)
        self.assertEqual(self.code(modify(6, CAROL, (1, "objectClass", []))), 65)
        self.assertEqual(self.code(modify(7, "uid=nobody,ou=users,dc=example,dc=com", (1, "cn", []))), 32)
        self.assertEqual(self.path.read_bytes(), EXAMPLE.read_bytes())

    def test_delete(self):
        self.assertEqual(self.code(msg(pureldap.LDAPDelRequest(entry=CAROL.encode()), 2)), 0)
        self.assertIsNone(self.saved().get(CAROL))
        self.assertEqual(self.code(msg(pureldap.LDAPDelRequest(entry=USERS.encode()), 3)), 66)
        self.assertEqual(self.code(msg(pureldap.LDAPDelRequest(entry=CAROL.encode()), 4)), 32)

    def test_rename(self):
        request = pureldap.LDAPModifyDNRequest(entry=CAROL.encode(), newrdn=b"uid=kara", deleteoldrdn=True)
        self.assertEqual(self.code(msg(request, 2)), 0)
        saved = self.saved()
        self.assertIsNone(saved.get(CAROL))
        kara = saved.get("uid=kara,ou=users,dc=example,dc=com")
        self.assertEqual(kara.get("uid"), ["kara"])
        self.assertEqual(kara.get("cn"), ["Carol Danvers"])
        moved = pureldap.LDAPModifyDNRequest(entry=b"uid=kara,ou=users,dc=example,dc=com", newrdn=b"cn=Kara",
                                             deleteoldrdn=False, newSuperior=b"ou=groups,dc=example,dc=com")
        self.assertEqual(self.code(msg(moved, 3)), 0)
        self.assertEqual(self.saved().get("cn=kara,ou=groups,dc=example,dc=com").get("uid"), ["kara"])
        self.assertEqual(self.code(msg(pureldap.LDAPModifyDNRequest(entry=USERS.encode(), newrdn=b"ou=people",
                                                                    deleteoldrdn=True), 4)), 66)
        self.assertEqual(self.code(msg(pureldap.LDAPModifyDNRequest(entry=BOB.encode(), newrdn=b"uid=alice",
                                                                    deleteoldrdn=True), 5)), 68)

    def test_onlyWriters(self):
        self.factory.limits.writers = [ADMINS]  # alice is a member; bob is not
        bob = Client(self.factory)
        bob.send(bind(1, BOB, "bob-pw"))
        (response,) = bob.send(msg(pureldap.LDAPDelRequest(entry=CAROL.encode()), 2))
        self.assertEqual(response.value.resultCode, 50)
        (response,) = Client(self.factory).send(msg(pureldap.LDAPDelRequest(entry=CAROL.encode()), 2))
        self.assertEqual(response.value.resultCode, 50)  # anonymous
        self.factory.limits.writers = [ADMINS, "UID=bob,ou=users,dc=example,dc=com"]  # named by DN
        (response,) = bob.send(msg(pureldap.LDAPDelRequest(entry=CAROL.encode()), 3))
        self.assertEqual(response.value.resultCode, 0)

    def test_saveFailureChangesNothing(self):
        self.factory.store.path = Path(self.mktemp()) / "missing-folder" / "x.ldif"
        self.assertEqual(self.code(msg(pureldap.LDAPDelRequest(entry=CAROL.encode()), 2)), 80)
        self.assertIsNotNone(self.factory.directory.get(CAROL))


class WritableSettingsTests(unittest.TestCase):
    def load(self, extra: str, ldif: str = "[example.ldif]", top: str = ""):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        shutil.copy(EXAMPLE, folder / "example.ldif")
        path = folder / "netsvc.yaml"
        path.write_text(f"{top}services:\n  ldap:\n    ldif: {ldif}\n    writable: true\n{extra}")
        return config.load(str(path))

    def test_needsWriters(self):
        with self.assertRaises(config.ConfigError) as caught:
            self.load("")
        self.assertIn("services.ldap.writers: writable: true needs writers", str(caught.exception))

    def test_needsOneFile(self):
        with self.assertRaises(config.ConfigError) as caught:
            self.load("    writers: ['cn=admins,ou=groups,dc=example,dc=com']\n", "[example.ldif, example.ldif]")
        self.assertIn("needs exactly one ldif file", str(caught.exception))
        with self.assertRaises(config.ConfigError) as caught:
            self.load("    writers: ['cn=admins,ou=groups,dc=example,dc=com']\n", "['.']")
        self.assertIn("needs a file, not a folder", str(caught.exception))

    def test_writersMustBeEntries(self):
        with self.assertRaises(config.ConfigError) as caught:
            self.load("    writers: [cn=admins,ou=groups,dc=example,dc=com]\n")  # unquoted: split at commas
        self.assertIn("services.ldap.writers[0]: 'cn=admins' is not an entry of the directory", str(caught.exception))

    def test_notWithWorkers(self):
        """Each worker would have its own copy of the directory."""
        with self.assertRaises(config.ConfigError) as caught:
            self.load("    writers: ['cn=admins,ou=groups,dc=example,dc=com']\n", top="workers: 2\n")
        self.assertIn("services.ldap.writable: not supported with workers: 2", str(caught.exception))

    def test_ok(self):
        settings = self.load("    writers: ['cn=admins,ou=groups,dc=example,dc=com']\n")
        self.assertTrue(settings.services["ldap"].writable)
