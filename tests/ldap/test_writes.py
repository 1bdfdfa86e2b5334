"""Writable mode: add, modify, delete, modify DN by writers, saved to the LDIF file before the answer."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from ldaptor.protocols import pureber, pureldap
from twisted.internet import defer
from twisted.trial import unittest

from netsvc import config
from netsvc.ldap.codec import ModifyRequest
from netsvc.ldap.directory import Directory
from netsvc.ldap.writes import LDIFStore, WriteError, writeDurably
from tests.ldap._wire import (
    ALICE,
    BOB,
    CAROL,
    EXAMPLE,
    SUFFIX,
    USERS,
    Client,
    bind,
    decodeAll,
    dns,
    entries,
    makeFactory,
    msg,
    search,
)

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


def _now(f, *args):
    """A store runner that works at once, on this thread (the tests below read answers synchronously)."""
    return defer.maybeDeferred(f, *args)


class WritableCase(unittest.TestCase):
    """A writable copy of the example directory; the client is bound as alice (a member of cn=admins)."""

    def setUp(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = folder / "example.ldif"
        shutil.copy(EXAMPLE, self.path)
        directory = Directory.load(SUFFIX, [self.path])
        self.factory = makeFactory(directory, writers=[ADMINS, BOB])
        self.factory.store = LDIFStore(directory, self.path, run=_now)
        self.factory.reconfigure(self.factory.limits)  # the root DSE now offers password modify
        self.client = Client(self.factory)
        self.assertEqual(self.code(bind(1, ALICE, "alice-pw")), 0)  # alice is in cn=admins

    def code(self, request: bytes) -> int:
        (response,) = self.client.send(request)
        return response.value.resultCode

    def saved(self) -> Directory:
        """The directory as the file now holds it."""
        return Directory.load(SUFFIX, [self.path])


class WriteTests(WritableCase):
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


class OffTheReactorTests(WritableCase):
    """A write is worked out and saved (rebuild, write, fsync, rename) off the reactor; others answered meanwhile."""

    def setUp(self):
        super().setUp()
        self.jobs = []
        self.events = []
        store = self.factory.store
        store.run = self.later
        store.write = self.recordingWrite

    def later(self, f, *args):
        """A runner whose work waits until the test lets it go (L{finish})."""
        d = defer.Deferred()
        self.jobs.append((d, f, args))
        return d

    def finish(self):
        d, f, args = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def recordingWrite(self, path, data):
        self.events.append(("durable", self.client.transport.value()))
        writeDurably(path, data)

    def test_othersAnsweredWhileAWriteIsSaved(self):
        self.client.transport.clear()
        self.client.protocol.dataReceived(modify(2, BOB, (2, "sn", ["Saved"])) + search(3, USERS, "(uid=bob)"))
        self.assertEqual(self.client.transport.value(), b"")  # no answer before the file is durable
        self.assertEqual(len(self.jobs), 1)
        other = Client(self.factory, host="192.0.2.8")
        found = other.send(search(1, USERS, "(uid=bob)", attributes=("sn",)))  # the reactor answers meanwhile
        self.assertEqual([e.attributes for e in entries(found)], [[(b"sn", [b"Builder"])]])
        self.assertEqual(self.path.read_bytes(), EXAMPLE.read_bytes())
        self.finish()
        self.assertEqual(self.events, [("durable", b"")])  # saved before anything was answered
        responses = decodeAll(self.client.transport.value())
        self.assertEqual([r.id for r in responses], [2, 3, 3])  # the search behind the write saw it
        self.assertEqual(responses[0].value.resultCode, 0)
        self.assertEqual(self.saved().get(BOB).get("sn"), ["Saved"])
        self.assertEqual(self.factory.directory.get(BOB).get("sn"), ["Saved"])

    def test_writesSerializedInOrder(self):
        """Two writers: the second is worked out against what the first left, after the first is saved."""
        bob = Client(self.factory, host="192.0.2.9")
        self.assertEqual(bob.send(bind(1, BOB, "bob-pw"))[0].value.resultCode, 0)
        self.client.transport.clear()
        self.client.protocol.dataReceived(modify(2, CAROL, (0, "title", ["One"])))
        bob.transport.clear()
        bob.protocol.dataReceived(modify(2, CAROL, (0, "title", ["One"])))  # exists once the first is saved
        self.assertEqual(len(self.jobs), 1)  # the second waits for the first
        self.finish()
        self.assertEqual(decodeAll(self.client.transport.value())[0].value.resultCode, 0)
        self.assertEqual(len(self.jobs), 1)
        self.finish()
        self.assertEqual(decodeAll(bob.transport.value())[0].value.resultCode, 20)  # attributeOrValueExists
        self.assertEqual(self.saved().get(CAROL).get("title"), ["Manager", "One"])

    def test_synchronousApplyRefusedWhileAWriteIsSaved(self):
        """The old synchronous form (password modify still uses it) cannot overtake a queued write (BUSY)."""
        self.client.protocol.dataReceived(modify(2, CAROL, (0, "title", ["One"])))
        with self.assertRaises(WriteError) as caught:
            self.factory.store.apply(ModifyRequest(CAROL, [(0, "title", [b"Two"])]))
        self.assertEqual(caught.exception.code, 51)
        self.finish()
        self.factory.store.apply(ModifyRequest(CAROL, [(0, "title", [b"Two"])]))
        self.assertEqual(self.saved().get(CAROL).get("title"), ["Manager", "One", "Two"])

    def test_failedSaveAnswersAndTheNextGoesOn(self):
        self.factory.store.path = Path(self.mktemp()) / "missing-folder" / "x.ldif"
        self.client.transport.clear()
        self.client.protocol.dataReceived(modify(2, CAROL, (0, "title", ["One"])) + search(3, USERS, "(uid=carol)"))
        self.finish()
        responses = decodeAll(self.client.transport.value())
        self.assertEqual([(r.id, r.value.__class__.__name__) for r in responses][0], (2, "LDAPModifyResponse"))
        self.assertEqual(responses[0].value.resultCode, 80)
        self.assertEqual(self.factory.directory.get(CAROL).get("title"), ["Manager"])  # unchanged
        self.assertEqual(len(responses), 3)  # the search behind it was answered


class WriteThreadTests(unittest.TestCase):
    """With the store's own thread: a blocking fsync does not block the reactor."""

    @defer.inlineCallbacks
    def test_blockedFsyncDoesNotBlockTheReactor(self):
        from twisted.internet import reactor

        from tests.helpers import sleep

        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "example.ldif"
        shutil.copy(EXAMPLE, path)
        directory = Directory.load(SUFFIX, [path])
        factory = makeFactory(directory, writers=[ADMINS])
        gate = threading.Event()
        threads = []

        def blockingWrite(p, data):
            threads.append(threading.current_thread().name)
            gate.wait(10)  # an fsync that takes its time (bounded: the test never hangs)
            writeDurably(p, data)

        factory.store = LDIFStore(directory, path, reactor=reactor, write=blockingWrite)
        self.addCleanup(factory.store.run.stop)
        alice = Client(factory)
        self.assertEqual(alice.send(bind(1, ALICE, "alice-pw"))[0].value.resultCode, 0)
        alice.transport.clear()
        alice.protocol.dataReceived(modify(2, BOB, (2, "sn", ["Threaded"])))
        self.assertEqual(alice.transport.value(), b"")
        ticks = []
        reactor.callLater(0, ticks.append, 1)
        for _ in range(100):  # the reactor turns while the write is blocked (at most 5 s)
            yield sleep(0.05)
            if ticks and threads:
                break
        self.assertEqual((ticks, threads), ([1], ["PoolThread-ldap-writes-0"]))
        other = Client(factory, host="192.0.2.8")
        self.assertEqual(dns(other.send(search(1, USERS, "(uid=bob)"))), [BOB])
        self.assertEqual(alice.transport.value(), b"")  # not durable yet: not answered
        gate.set()
        for _ in range(200):  # at most 10 s
            if alice.transport.value():
                break
            yield sleep(0.05)
        (response,) = decodeAll(alice.transport.value())
        self.assertEqual(response.value.resultCode, 0)
        self.assertEqual(Directory.load(SUFFIX, [path]).get(BOB).get("sn"), ["Threaded"])


def passwd(msgid: int, user: str | None = None, old: str | None = None, new: str | None = None) -> bytes:
    return msg(pureldap.LDAPPasswordModifyRequest(
        userIdentity=user.encode() if user else None, oldPasswd=old.encode() if old else None,
        newPasswd=new.encode() if new else None), msgid)


class PasswordModifyTests(WritableCase):
    """RFC 3062 (ldappasswd): users change their own password, writers anyone's."""

    def binds(self, dn: str, password: str) -> bool:
        (response,) = Client(self.factory).send(bind(1, dn, password))
        return response.value.resultCode == 0

    def test_ownPassword(self):
        bob = Client(self.factory)
        bob.send(bind(1, BOB, "bob-pw"))
        (response,) = bob.send(passwd(2, old="bob-pw", new="new-bob"))
        self.assertEqual(response.value.resultCode, 0)
        self.assertTrue(self.binds(BOB, "new-bob"))
        self.assertFalse(self.binds(BOB, "bob-pw"))
        self.assertTrue(self.saved().get(BOB).first("userPassword").startswith("{SSHA}"))
        (wrong,) = bob.send(passwd(3, old="bob-pw", new="x"))
        self.assertEqual(wrong.value.resultCode, 49)

    def test_generated(self):
        (response,) = self.client.send(passwd(2))  # alice, her own, the server makes one
        self.assertEqual(response.value.resultCode, 0)
        raw = response.value.response  # SEQUENCE { genPasswd [0] }
        self.assertEqual(raw[0], 0x30)
        self.assertEqual(raw[2], 0x80)
        generated = raw[4:4 + raw[3]].decode()
        self.assertGreaterEqual(len(generated), 12)
        self.assertTrue(self.binds(ALICE, generated))

    def test_othersOnlyByWriters(self):
        self.factory.limits.writers = [ADMINS]
        bob = Client(self.factory)
        bob.send(bind(1, BOB, "bob-pw"))
        (response,) = bob.send(passwd(2, user=ALICE, new="x"))
        self.assertEqual(response.value.resultCode, 50)
        (response,) = self.client.send(passwd(3, user=BOB, new="set-by-alice"))  # alice is in cn=admins
        self.assertEqual(response.value.resultCode, 0)
        self.assertTrue(self.binds(BOB, "set-by-alice"))

    def test_refusals(self):
        (anonymous,) = Client(self.factory).send(passwd(1, new="x"))
        self.assertEqual(anonymous.value.resultCode, 53)
        (unknown,) = self.client.send(passwd(2, user="uid=nobody,ou=users,dc=example,dc=com", new="x"))
        self.assertEqual(unknown.value.resultCode, 32)
        readOnly = Client(makeFactory())
        readOnly.send(bind(1, ALICE, "alice-pw"))
        (response,) = readOnly.send(passwd(2, new="x"))
        self.assertEqual(response.value.resultCode, 53)

    def test_oldPasswordCheckedInAThread(self):
        """While the old password is checked (a slow scheme), later requests wait."""
        pending = defer.Deferred()
        self.factory.directory.checkPassword = lambda dn, pw: pending
        out = self.client.send(passwd(2, old="whatever", new="n") + search(3, USERS, "(uid=bob)"))
        self.assertEqual(out, [])
        self.client.transport.clear()
        pending.callback(True)
        responses = decodeAll(self.client.transport.value())
        self.assertEqual([r.id for r in responses], [2, 3, 3])
        self.assertEqual(responses[0].value.resultCode, 0)

    def test_advertised(self):
        (entry, _) = self.client.send(search(9, "", scope=0, attributes=("supportedExtension",)))
        self.assertIn((b"supportedExtension", [b"1.3.6.1.4.1.4203.1.11.3", b"1.3.6.1.4.1.1466.20037",
                                               b"1.3.6.1.4.1.4203.1.11.1"]),
                      [(n, [bytes(v) for v in vs]) for n, vs in entry.value.attributes])
