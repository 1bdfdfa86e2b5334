"""The Maildir++ store: durability path, UIDs, flags, folders, names, concurrency."""

from __future__ import annotations

import os
import threading
import time
from unittest import mock

from twisted.trial import unittest

from netsvc.mailbox import maildir
from netsvc.mailbox.maildir import (
    FolderExists,
    InvalidName,
    MailboxError,
    Maildirs,
    NoSuchFolder,
    NoSuchMessage,
)


class StoreTestCase(unittest.TestCase):
    def setUp(self):
        self.root = self.mktemp()
        self.store = Maildirs(self.root, fsync=False)


class DeliverTests(StoreTestCase):
    def test_deliverLandsInNew(self):
        """deliver() leaves one file in new/, with the bytes given, and nothing in tmp/."""
        key = self.store.deliver("Bob", b"Subject: hi\r\n\r\nbody\r\n")
        base = self.store.userPath("bob")
        self.assertEqual(os.listdir(base / "new"), [key])
        self.assertEqual(os.listdir(base / "tmp"), [])
        self.assertEqual((base / "new" / key).read_bytes(), b"Subject: hi\r\n\r\nbody\r\n")
        self.assertIn(f",S={len(b'Subject: hi' + bytes(10))}", key)
        # the user's special folders exist from the start
        self.assertEqual(self.store.folders("bob"), ["INBOX", "Archive", "Drafts", "Sent", "Trash"])

    def test_deliverFsyncs(self):
        """With fsync on, the file and new/ are fsync'd before the rename is reported done."""
        store = Maildirs(self.mktemp(), fsync=True)
        calls = []
        real = os.fsync
        with mock.patch.object(maildir.os, "fsync", side_effect=lambda fd: calls.append(fd) or real(fd)):
            store.deliver("bob", b"x")
        # the message file, then new/ (the first delivery also syncs the new Maildir's folders)
        self.assertGreaterEqual(len(calls), 2)

    def test_failureLeavesNothing(self):
        """A write that fails (disk full) leaves nothing in tmp/ or new/ and raises MailboxError."""
        self.store.deliver("bob", b"first")
        base = self.store.userPath("bob")
        with mock.patch.object(maildir.os, "write", side_effect=OSError(28, "No space left on device")):
            self.assertRaises(MailboxError, self.store.deliver, "bob", b"x" * 1000)
        self.assertEqual(os.listdir(base / "tmp"), [])
        self.assertEqual(len(os.listdir(base / "new")), 1)

    def test_renameFailureLeavesNothing(self):
        """A failed rename into new/ leaves nothing in tmp/."""
        self.store.deliver("bob", b"first")
        base = self.store.userPath("bob")
        with mock.patch.object(maildir.os, "rename", side_effect=OSError(5, "I/O error")):
            self.assertRaises(MailboxError, self.store.deliver, "bob", b"x")
        self.assertEqual(os.listdir(base / "tmp"), [])
        self.assertEqual(len(os.listdir(base / "new")), 1)

    def test_staleTmpRemoved(self):
        """Listing removes what a crashed writer left in tmp/ more than 36 hours ago, and nothing newer."""
        inbox = self.store.inbox("bob")
        old, fresh = inbox.path / "tmp" / "old", inbox.path / "tmp" / "fresh"
        old.write_bytes(b"half")
        fresh.write_bytes(b"being written")
        os.utime(old, (time.time() - 37 * 3600,) * 2)
        inbox.messages()
        self.assertEqual(os.listdir(inbox.path / "tmp"), ["fresh"])

    def test_uniqueKeys(self):
        keys = {self.store.deliver("bob", b"m") for _ in range(200)}
        self.assertEqual(len(keys), 200)
        self.assertEqual(len(self.store.inbox("bob").messages()), 200)

    def test_userNames(self):
        """User names are lower-cased; path escapes and odd characters are refused."""
        self.assertEqual(self.store.userPath("Dev").name, "dev")
        for bad in ["", "..", ".hidden", "a/b", "../etc", "a\x00b", "a..b", "a b", "x" * 200, "é"]:
            self.assertRaises(InvalidName, self.store.deliver, bad, b"x")
        self.assertEqual(os.listdir(self.root) if os.path.exists(self.root) else [], [])


class UidTests(StoreTestCase):
    def test_uidsAscendAndPersist(self):
        """UIDs ascend in delivery order and stay the same for a new Maildirs over the same root."""
        for i in range(5):
            self.store.deliver("bob", b"m%d" % i)
        inbox = self.store.inbox("bob")
        first = [(m.uid, m.key) for m in inbox.messages()]
        self.assertEqual([u for u, _ in first], [1, 2, 3, 4, 5])
        validity = inbox.uidvalidity
        again = Maildirs(self.root, fsync=False).inbox("bob")
        self.assertEqual([(m.uid, m.key) for m in again.messages()], first)
        self.assertEqual(again.uidvalidity, validity)
        self.assertEqual(again.uidnext, 6)
        self.assertEqual([again.read(u) for u, _ in first], [b"m%d" % i for i in range(5)])

    def test_uidsInArrivalOrder(self):
        """New messages get UIDs in arrival order (time, then microseconds as numbers), not name order."""
        base = self.store.userPath("bob")
        self.store.inbox("bob")
        for name in ["1700000001.M99P1.h", "1700000001.M100000P1.h", "1700000000.M5P1.h", "foreign"]:
            (base / "new" / name).write_bytes(name.encode())
        inbox = self.store.inbox("bob")
        self.assertEqual([inbox.read(m.uid) for m in inbox.messages()],
                         [b"1700000000.M5P1.h", b"1700000001.M99P1.h", b"1700000001.M100000P1.h", b"foreign"])

    def test_oddFileNamesIgnored(self):
        """Files whose names could not go into the uidlist (spaces, non-ASCII) are left alone, not listed."""
        self.store.deliver("bob", b"good")
        base = self.store.userPath("bob")
        (base / "new" / "a b").write_bytes(b"x")
        (base / "cur" / "caf\u00e9:2,S").write_bytes(b"x")
        inbox = self.store.inbox("bob")
        self.assertEqual([inbox.read(m.uid) for m in inbox.messages()], [b"good"])
        self.assertEqual([m.uid for m in Maildirs(self.root, fsync=False).inbox("bob").messages()], [1])

    def test_removedUidsNotReused(self):
        for i in range(3):
            self.store.deliver("bob", b"m%d" % i)
        inbox = self.store.inbox("bob")
        inbox.messages()
        self.assertEqual(inbox.remove([3, 99]), [3])
        self.store.deliver("bob", b"new")
        again = Maildirs(self.root, fsync=False).inbox("bob")
        self.assertEqual([m.uid for m in again.messages()], [1, 2, 4])
        self.assertRaises(NoSuchMessage, again.read, 3)

    def test_corruptUidlistNewValidity(self):
        """A damaged uidlist gives a new UIDVALIDITY (clients resync) rather than wrong UIDs."""
        self.store.deliver("bob", b"m")
        inbox = self.store.inbox("bob")
        inbox.messages()
        (inbox.path / maildir.UIDLIST).write_text("garbage\n")
        with mock.patch.object(maildir.time, "time", return_value=inbox.uidvalidity + 10):
            again = Maildirs(self.root, fsync=False).inbox("bob")
            self.assertEqual([m.uid for m in again.messages()], [1])
        self.assertEqual(again.uidvalidity, inbox.uidvalidity + 10)

    def test_appendWithDateAndFlags(self):
        inbox = self.store.inbox("bob")
        uid = inbox.append(b"hello", flags=["\\Seen", "$Label1", "\\Recent"], date=1_000_000_000.0)
        (m,) = inbox.messages()
        self.assertEqual(m.uid, uid)
        self.assertEqual(m.internaldate, 1_000_000_000.0)
        self.assertEqual(m.flags, {"\\Seen", "$Label1"})
        self.assertEqual(m.size, 5)
        self.assertTrue(m.name.endswith(":2,S"))

    def test_generation(self):
        """changed() is false after a listing, true after a delivery, a flag change, a removal."""
        inbox = self.store.inbox("bob")
        other = self.store.inbox("bob")
        inbox.messages()
        self.assertFalse(inbox.changed())
        self.store.deliver("bob", b"x")
        self.assertTrue(inbox.changed())
        (m,) = inbox.messages()
        self.assertFalse(inbox.changed())
        other.setFlags(m.uid, ["\\Seen"])
        self.assertTrue(inbox.changed())
        inbox.messages()
        other.remove([m.uid])
        self.assertTrue(inbox.changed())


class FlagTests(StoreTestCase):
    def test_roundTrip(self):
        self.store.deliver("bob", b"x")
        inbox = self.store.inbox("bob")
        (m,) = inbox.messages()
        self.assertEqual(m.flags, frozenset())
        everything = {"\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "Work", "$Forwarded"}
        self.assertEqual(inbox.setFlags(m.uid, everything), everything)
        again = Maildirs(self.root, fsync=False).inbox("bob")
        (m2,) = again.messages()
        self.assertEqual(m2.flags, everything)
        self.assertTrue(m2.name.endswith(":2,DFRST"), m2.name)
        again.setFlags(m.uid, {"\\seen"})
        (m3,) = inbox.messages()
        self.assertEqual(m3.flags, {"\\Seen"})
        self.assertEqual(inbox.read(m.uid), b"x")

    def test_readAfterRenameElsewhere(self):
        """A message whose flags another session changed is still read, without listing again (no lock)."""
        self.store.deliver("bob", b"x")
        mine, other = self.store.inbox("bob"), self.store.inbox("bob")
        (m,) = mine.messages()
        other.messages()
        other.setFlags(m.uid, ["\\Seen"])
        with mock.patch.object(mine, "messages", side_effect=AssertionError("listed again")):
            self.assertEqual(mine.read(m.uid), b"x")
        other.remove([m.uid])
        with mock.patch.object(mine, "messages", side_effect=AssertionError("listed again")):
            self.assertRaises(NoSuchMessage, mine.read, m.uid)

    def test_badKeyword(self):
        self.store.deliver("bob", b"x")
        inbox = self.store.inbox("bob")
        (m,) = inbox.messages()
        for bad in ["a b", "a\nb", "(x)", "x" * 100, "a]"]:
            self.assertRaises(MailboxError, inbox.setFlags, m.uid, [bad])

    def test_keepsUnknownLetters(self):
        """Info letters we do not map (Dovecot keyword letters) survive a flag change."""
        self.store.deliver("bob", b"x")
        inbox = self.store.inbox("bob")
        (m,) = inbox.messages()
        os.rename(inbox.path / "cur" / m.name, inbox.path / "cur" / (m.key + ":2,Sa"))
        inbox.setFlags(m.uid, ["\\Flagged"])
        (m,) = inbox.messages()
        self.assertTrue(m.name.endswith(":2,Fa"), m.name)


class FolderTests(StoreTestCase):
    def test_createListDelete(self):
        self.store.createFolder("bob", "Work.Projects")
        self.store.createFolder("bob", "Über")
        self.assertIn("Work.Projects", self.store.folders("bob"))
        self.assertIn("Work", self.store.folders("bob"))  # parents are made too (RFC 3501 CREATE)
        self.assertIn("Über", self.store.folders("bob"))
        self.assertTrue((self.store.userPath("bob") / ".&ANw-ber" / "cur").is_dir())
        self.assertRaises(FolderExists, self.store.createFolder, "bob", "Work.Projects")
        self.assertRaises(FolderExists, self.store.createFolder, "bob", "inbox")
        self.store.deliver("bob", b"x", folder="Work.Projects")
        self.store.deleteFolder("bob", "Work.Projects")
        self.assertNotIn("Work.Projects", self.store.folders("bob"))
        self.assertRaises(NoSuchFolder, self.store.folder, "bob", "Work.Projects")
        self.assertRaises(MailboxError, self.store.deleteFolder, "bob", "INBOX")
        # nothing left of the deleted folder or of the creations
        self.assertEqual([n for n in os.listdir(self.store.userPath("bob")) if n.startswith(".netsvc")], [])

    def test_escapesRefused(self):
        """Folder names that could leave the user's Maildir (or confuse Maildir++) are refused."""
        for bad in ["", "../x", "a/b", "..", ".x", "x.", "a..b", "a\\b", "a\x00b", "a\nb", "x" * 300,
                    "INBOX.sub", " x", "netsvc-uidlist"]:
            self.assertRaises(InvalidName, self.store.createFolder, "bob", bad)
            self.assertRaises(InvalidName, self.store.deliver, "bob", b"x", bad)
        self.assertEqual(self.store.folders("bob"), ["INBOX", "Archive", "Drafts", "Sent", "Trash"])

    def test_renameWithChildren(self):
        self.store.createFolder("bob", "A")
        self.store.createFolder("bob", "A.B")
        self.store.deliver("bob", b"in b", folder="A.B")
        self.store.subscribe("bob", "A.B")
        self.store.renameFolder("bob", "A", "C")
        self.assertEqual([n for n in self.store.folders("bob") if n[0] in "AC"], ["Archive", "C", "C.B"])
        self.assertEqual([m.size for m in self.store.folder("bob", "C.B").messages()], [4])
        self.assertIn("C.B", self.store.subscriptions("bob"))
        self.assertRaises(InvalidName, self.store.renameFolder, "bob", "C", "C.D")
        self.assertRaises(FolderExists, self.store.renameFolder, "bob", "C", "Sent")

    def test_renameInbox(self):
        self.store.deliver("bob", b"one")
        self.store.renameFolder("bob", "INBOX", "Old")
        self.assertEqual(self.store.inbox("bob").messages(), [])
        self.assertEqual([self.store.folder("bob", "Old").read(m.uid)
                          for m in self.store.folder("bob", "Old").messages()], [b"one"])

    def test_copyMove(self):
        self.store.deliver("bob", b"one")
        self.store.deliver("bob", b"two")
        inbox = self.store.inbox("bob")
        trash = self.store.folder("bob", "Trash")
        inbox.setFlags(2, ["\\Seen", "Tag"])
        self.assertEqual(inbox.copy([2, 7], trash), [(2, 1)])
        self.assertEqual(inbox.move([1, 2], trash), [(1, 2), (2, 3)])
        self.assertEqual(inbox.messages(), [])
        got = [(m.uid, trash.read(m.uid), m.flags) for m in trash.messages()]
        self.assertEqual(got, [(1, b"two", {"\\Seen", "Tag"}), (2, b"one", frozenset()),
                               (3, b"two", {"\\Seen", "Tag"})])
        self.assertEqual(os.listdir(trash.path / "tmp"), [])


class ConcurrencyTests(StoreTestCase):
    def test_deliverWhileListing(self):
        """Deliveries in threads while another lists: every message gets one UID, none twice."""
        self.store.deliver("bob", b"seed")
        stop = threading.Event()
        errors = []

        def deliver(n):
            try:
                for i in range(60):
                    self.store.deliver("bob", b"%d-%d" % (n, i))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        def lister():
            inbox = self.store.inbox("bob")
            try:
                while not stop.is_set():
                    uids = [m.uid for m in inbox.messages()]
                    if uids != sorted(set(uids)):
                        errors.append(AssertionError(uids))
            except Exception as e:  # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=deliver, args=(n,)) for n in range(3)]
        listing = [threading.Thread(target=lister) for _ in range(2)]
        for t in threads + listing:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        for t in listing:
            t.join(60)
        self.assertEqual(errors, [])
        messages = Maildirs(self.root, fsync=False).inbox("bob").messages()
        self.assertEqual([m.uid for m in messages], list(range(1, 182)))
        self.assertEqual(len({m.key for m in messages}), 181)


class NewMailboxRaceTests(unittest.TestCase):
    """Eight threads delivering the first messages of one new user at once: each gets its message in.
    (The mailbox's subscriptions file was written through one fixed temporary name; the threads that
    lost the rename race failed with 'cannot create the mailbox: No such file or directory'.)"""

    def test_concurrentFirstDeliveries(self):
        import threading

        for _ in range(10):
            store = Maildirs(self.mktemp(), fsync=False)
            barrier = threading.Barrier(8)
            errors: list[str] = []

            def deliver(store=store, barrier=barrier, errors=errors):
                barrier.wait()
                try:
                    store.deliver("newcomer", b"Subject: x\r\n\r\nhi\r\n")
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(repr(e))

            threads = [threading.Thread(target=deliver) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            self.assertEqual(errors, [])
            self.assertEqual(len(store.inbox("newcomer").messages()), 8)


class NewMailboxDurableTests(unittest.TestCase):
    """
    A delivery into a Maildir another thread is making returns only once the Maildir's own entries
    are on disk (before: a thread that saw C{cur/} delivered at once, and its copy was acknowledged
    before the new user's folder was fsync'd in the root: lost with the folder on a power cut).
    """

    def test_noDeliveryBeforeTheFoldersAreSynced(self):
        synced: list[str] = []
        real = maildir._fsyncDir

        def tracing(path):
            real(path)
            synced.append(str(path))

        self.patch(maildir, "_fsyncDir", tracing)
        early = 0
        for _ in range(10):
            store = Maildirs(self.mktemp(), fsync=True)
            root = str(store.root)
            synced.clear()
            barrier = threading.Barrier(8)
            lock = threading.Lock()

            def deliver(store=store, barrier=barrier, lock=lock, root=root):
                nonlocal early
                barrier.wait()
                store.deliver("newcomer", b"Subject: x\r\n\r\nhi\r\n")
                with lock:
                    early += root not in synced

            threads = [threading.Thread(target=deliver) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            self.assertEqual(len(store.inbox("newcomer").messages()), 8)
        self.assertEqual(early, 0)


class ReviewFindingsTests(unittest.TestCase):
    """What the review of the store found (each seen failing before its fix)."""

    def setUp(self):
        self.store = Maildirs(self.mktemp(), fsync=True)
        self.store.deliver("bob", b"Subject: a\r\n\r\nx\r\n")

    def test_uidvalidityNewAfterDeleteAndCreate(self):
        """A folder deleted (or renamed away) and made again in the same second gets a new UIDVALIDITY:
        with the time alone it got the old one, and UID 1 named another message (RFC 3501 2.3.1.1)."""
        with mock.patch.object(maildir.time, "time", return_value=1_800_000_000.0):
            self.store.createFolder("bob", "A")
            first = self.store.folder("bob", "A")
            first.append(b"Subject: old\r\n\r\n")
            before = first.uidvalidity
            self.store.deleteFolder("bob", "A")
            self.store.createFolder("bob", "A")
            self.assertGreater(self.store.folder("bob", "A").uidvalidity, before)
            self.store.renameFolder("bob", "A", "B")
            self.store.createFolder("bob", "A")
            validities = {self.store.folder("bob", n).uidvalidity for n in ("A", "B", "INBOX")}
            self.assertEqual(len(validities), 3)

    def test_flagChangesFsynced(self):
        """A system flag lives in the file name: the rename is fsync'd before the answer."""
        inbox = self.store.inbox("bob")
        (message,) = inbox.messages()
        with mock.patch.object(maildir, "_fsyncDir") as fsynced:
            inbox.setFlags(message.uid, ["\\Seen", "\\Deleted"])
        self.assertIn(inbox.path / "cur", [c.args[0] for c in fsynced.call_args_list])

    def test_longFolderNameRefused(self):
        """120 x "é" is within the name length but 322 bytes on disk: refused, not ENAMETOOLONG."""
        self.assertRaises(InvalidName, self.store.createFolder, "bob", "\u00e9" * 120)
        self.assertRaises(InvalidName, self.store.folder, "bob", "\u00e9" * 120)
