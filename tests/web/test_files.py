"""Path resolution (no traversal), the file cache, content types."""

import gzip
import os
from pathlib import Path

from twisted.trial import unittest

from netsvc.web.files import FileEntry, FileTree, Listing, Redirect, contentType


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FileTreeTests(unittest.TestCase):
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        self.root = base / "www"
        (self.root / "sub").mkdir(parents=True)
        (self.root / "a.txt").write_text("hello\n")
        (self.root / "sub" / "index.html").write_text("<p>sub</p>")
        (self.root / ".hidden").write_text("no")
        (self.root / ".well-known").mkdir()
        (self.root / ".well-known" / "x.txt").write_text("known")
        (base / "outside.txt").write_text("secret")
        (self.root / "sub" / "café.txt").write_text("accent")
        self.base = base
        self.clock = Clock()
        self.tree = FileTree(str(self.root), clock=self.clock)

    def test_file(self):
        entry = self.tree.lookup(b"/a.txt")
        self.assertIsInstance(entry, FileEntry)
        self.assertEqual(entry.body, b"hello\n")
        self.assertEqual(entry.contentType, b"text/plain; charset=utf-8")

    def test_percentEncodedName(self):
        self.assertEqual(self.tree.lookup(b"/sub/caf%C3%A9.txt").body, b"accent")

    def test_traversalRefused(self):
        for path in [
            b"/../outside.txt",
            b"/%2e%2e/outside.txt",
            b"/%2E%2E%2Foutside.txt",
            b"/sub/../../outside.txt",
            b"/..%2foutside.txt",
            b"/sub/%2e%2e/%2e%2e/outside.txt",
            b"/..\\outside.txt",
            b"/%5c..%5coutside.txt",
            b"/a.txt%00.html",
            b"/.hidden",
            b"/sub/%2ehidden",
            b"/%ff%fe",
        ]:
            self.assertIsNone(self.tree.lookup(path), path)

    def test_wellKnownServed(self):
        self.assertEqual(self.tree.lookup(b"/.well-known/x.txt").body, b"known")

    def test_symlinkOutOfRootRefused(self):
        os.symlink(self.base / "outside.txt", self.root / "link.txt")
        os.symlink(self.base, self.root / "linkdir")
        self.assertIsNone(self.tree.lookup(b"/link.txt"))
        self.assertIsNone(self.tree.lookup(b"/linkdir/outside.txt"))

    def test_symlinkInsideServed(self):
        os.symlink(self.root / "a.txt", self.root / "alias.txt")
        self.assertEqual(self.tree.lookup(b"/alias.txt").body, b"hello\n")

    def test_folderRedirectAndIndex(self):
        found = self.tree.lookup(b"/sub")
        self.assertIsInstance(found, Redirect)
        self.assertEqual(found.location, b"/sub/")
        self.assertEqual(self.tree.lookup(b"/sub/").body, b"<p>sub</p>")

    def test_folderRedirectNeverLeavesTheSite(self):
        """
        Issue 21: C{GET //sub} answered C{Location: //sub/}, which a browser reads as another host
        (protocol-relative).  The redirect names the folder's canonical path.
        """
        for spelling in (b"//sub", b"///sub", b"/./sub", b"//s%75b", b"/\\sub"):
            found = self.tree.lookup(spelling)
            self.assertIsInstance(found, Redirect, spelling)
            self.assertEqual(found.location, b"/sub/", spelling)

    def test_listingOnlyWhenEnabled(self):
        self.assertIsNone(self.tree.lookup(b"/"))
        tree = FileTree(str(self.root), listing=True)
        found = tree.lookup(b"/")
        self.assertIsInstance(found, Listing)
        names = [e[0] for e in found.entries]
        self.assertEqual(names, ["a.txt", "sub"])  # no hidden names

    def test_cacheRevalidates(self):
        first = self.tree.lookup(b"/a.txt")
        (self.root / "a.txt").write_text("changed, longer\n")
        self.assertIs(self.tree.lookup(b"/a.txt"), first)  # within the revalidate interval
        self.clock.now += 2
        second = self.tree.lookup(b"/a.txt")
        self.assertEqual(second.body, b"changed, longer\n")
        self.assertNotEqual(second.etag, first.etag)

    def test_deletedFileGone(self):
        self.tree.lookup(b"/a.txt")
        (self.root / "a.txt").unlink()
        self.clock.now += 2
        self.assertIsNone(self.tree.lookup(b"/a.txt"))

    def test_cacheBounded(self):
        tree = FileTree(str(self.root), maxTotal=600, clock=self.clock)
        (self.root / "b.txt").write_bytes(b"b" * 100)
        tree.lookup(b"/a.txt")
        tree.lookup(b"/b.txt")
        self.assertLessEqual(tree.cached, 600)
        self.assertEqual(tree.stats()["entries"], 1)

    def test_largeFileNotInMemory(self):
        (self.root / "large.bin").write_bytes(b"x" * 5000)
        tree = FileTree(str(self.root), maxFileSize=1000)
        entry = tree.lookup(b"/large.bin")
        self.assertIsNone(entry.body)
        self.assertEqual(entry.size, 5000)

    def test_gzipPrecomputedForText(self):
        (self.root / "t.css").write_text("a { color: red }\n" * 100)
        entry = self.tree.lookup(b"/t.css")
        self.assertEqual(gzip.decompress(entry.gzBody), entry.body)
        self.assertIn((b"Vary", b"Accept-Encoding"), entry.headers)
        self.assertIn((b"Content-Encoding", b"gzip"), entry.gzHeaders)
        self.assertNotEqual(entry.gzEtag, entry.etag)

    def test_gzipSidecarPreferred(self):
        (self.root / "s.js").write_text("x = 1;\n" * 100)
        (self.root / "s.js.gz").write_bytes(b"precompressed")
        self.assertEqual(self.tree.lookup(b"/s.js").gzBody, b"precompressed")

    def test_noGzipForBinary(self):
        (self.root / "p.png").write_bytes(b"\x89PNG" + b"\0" * 1000)
        entry = self.tree.lookup(b"/p.png")
        self.assertIsNone(entry.gzBody)
        self.assertNotIn((b"Vary", b"Accept-Encoding"), entry.headers)


class ContentTypeTests(unittest.TestCase):
    def test_types(self):
        self.assertEqual(contentType("x.html"), (b"text/html; charset=utf-8", True))
        self.assertEqual(contentType("x.js"), (b"text/javascript; charset=utf-8", True))
        self.assertEqual(contentType("x.json"), (b"application/json; charset=utf-8", True))
        self.assertEqual(contentType("x.svg"), (b"image/svg+xml; charset=utf-8", True))
        self.assertEqual(contentType("x.png"), (b"image/png", False))
        self.assertEqual(contentType("x.tar.gz"), (b"application/gzip", False))
        self.assertEqual(contentType("noext"), (b"application/octet-stream", False))


class CanonicalCacheTests(unittest.TestCase):
    """Issue 18: the cache is keyed by the canonical path, not the spelling sent."""

    def setUp(self):
        base = Path(self.mktemp()).absolute()
        self.root = base / "www"
        (self.root / "sub").mkdir(parents=True)
        (self.root / "app.js").write_bytes(b"console.log(1);\n" * 500)
        (self.root / "sub" / "index.html").write_text("<p>sub</p>")
        for name in ("one.txt", "two.txt", "three.txt"):
            (self.root / name).write_text(name)
        (base / "outside.txt").write_text("secret")
        self.tree = FileTree(str(self.root), maxEntries=5, clock=Clock())
        self.built = []
        build = self.tree.build
        self.tree.build = lambda path, st: self.built.append(path) or build(path, st)

    def spellings(self, name):
        """Many spellings of /name: percent-encoded letters, doubled slashes, dot segments."""
        out = []
        for i, c in enumerate(name):
            out.append(("/" + name[:i] + "%%%02X" % ord(c) + name[i + 1 :]).encode())
            out.append(("/" + name[:i] + "%%%02x" % ord(c) + name[i + 1 :]).encode())
        out += [
            b"//" + name.encode(),
            b"///" + name.encode(),
            b"/./" + name.encode(),
            b"/sub/../" + name.encode(),  # refused (..), not a spelling that is cached
            b"/%2e/" + name.encode(),
            b"\\" + name.encode(),
            b"/sub/%2E%2E/" + name.encode(),  # refused
        ]
        return out

    def test_spellingsShareOneEntry(self):
        body = (self.root / "app.js").read_bytes()
        first = self.tree.lookup(b"/app.js")
        for spelling in self.spellings("app.js"):
            found = self.tree.lookup(spelling)
            if b".." in spelling or b"%2E%2E" in spelling:
                self.assertIsNone(found, spelling)
            else:
                self.assertIs(found, first, spelling)
                self.assertEqual(found.body, body)
        self.assertEqual(len(self.built), 1)  # read, hashed and compressed once
        self.assertEqual(self.tree.stats()["entries"], 1)

    def test_realEntriesNotEvicted(self):
        entries = {n: self.tree.lookup(b"/" + n.encode()) for n in ("one.txt", "two.txt", "three.txt")}
        for _ in range(3):
            for spelling in self.spellings("app.js"):
                self.tree.lookup(spelling)
        for name, entry in entries.items():
            self.assertIs(self.tree.lookup(b"/" + name.encode()), entry)
        self.assertEqual(len(self.built), 4)
        self.assertEqual(self.tree.stats()["entries"], 4)

    def test_folderSpellings(self):
        index = self.tree.lookup(b"/sub/")
        for spelling in (b"/sub//", b"//sub/", b"/s%75b/", b"/sub/.", b"/sub/./"):
            self.assertIs(self.tree.lookup(spelling), index, spelling)
        self.assertIsInstance(self.tree.lookup(b"/s%75b"), Redirect)
        self.assertEqual(len(self.built), 1)

    def test_canonicalKeyMeansTheSame(self):
        # A key sent as a path names what it was made from ('%' is always encoded in a key).
        (self.root / "100%.txt").write_text("percent")
        (self.root / "aA.txt").write_text("letter")
        pct = self.tree.lookup(b"/100%25.txt")
        self.assertEqual(pct.body, b"percent")
        self.assertIs(self.tree.lookup(b"/100%25.txt"), pct)
        self.assertEqual(self.tree.lookup(b"/a%41.txt").body, b"letter")
        key = self.tree.canonical(b"/100%25.txt")[0]
        self.assertIs(self.tree.lookup(key), pct)

    def test_outsideRefusedNotCached(self):
        for spelling in (b"/../outside.txt", b"/%2e%2e/outside.txt", b"/sub/..%2f..%2foutside.txt"):
            self.assertIsNone(self.tree.lookup(spelling), spelling)
        self.assertEqual(self.tree.stats()["entries"], 0)
        self.assertEqual(self.built, [])

    def test_fileAsFolderNotFound(self):
        self.assertIsNone(self.tree.lookup(b"/app.js/"))
        self.assertIsNotNone(self.tree.lookup(b"/app.js"))
