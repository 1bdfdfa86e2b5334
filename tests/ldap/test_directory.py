"""
The directory: LDIF loading and its errors (file and line), indexes, scopes, the
Directory API (findUser, checkPassword); the settings that load it (check-config);
the service over loopback with the ldap3 library, and its SIGHUP reload.
"""

from __future__ import annotations

import base64
import sys
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from netsvc import auth, config
from netsvc.cli import checkConfig
from netsvc.ldap.directory import Directory, LoadError, ScanLimit
from netsvc.ldap.ldifload import LDIFError, parseLDIF
from netsvc.runtime import buildDaemon
from tests.helpers import startDaemon
from tests.ldap._wire import ALICE, BOB, EXAMPLE, SUFFIX, USERS, directoryFrom, exampleDirectory

TOP = b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n\n"


class LDIFTests(unittest.TestCase):
    def test_records(self):
        data = (b"version: 1\n# a comment\n#  continued\n\n"
                b"dn: cn=Ann,dc=example,dc=com\r\nobjectClass: person\ncn: Ann\nsn: Long\n  name\n"
                b"description:: " + base64.b64encode(b"caf\xc3\xa9 \x00") + b"\njpegPhoto;binary:: AAE=\n\n\n"
                b"dn:: " + base64.b64encode("cn=Zoë,dc=example,dc=com".encode()) + b"\nobjectClass: person\n")
        first, second = parseLDIF(data, "x.ldif")
        self.assertEqual(first.dn, "cn=Ann,dc=example,dc=com")
        self.assertEqual(first.line, 5)
        self.assertEqual(first.attributes, [("objectClass", b"person"), ("cn", b"Ann"), ("sn", b"Long name"),
                                            ("description", b"caf\xc3\xa9 \x00"), ("jpegPhoto", b"\x00\x01")])
        self.assertEqual((second.dn, second.line), ("cn=Zoë,dc=example,dc=com", 14))

    def test_errors(self):
        cases = {
            b"cn: x\n": (1, "must start with dn:"),
            b"dn: dc=x\nobjectClass: top\nbroken line\n": (3, "expected 'attribute: value'"),
            b"\n\ndn: dc=x\nchangetype: add\n": (4, "change records are not supported"),
            b"dn: dc=x\njpegPhoto:< file:///etc/passwd\n": (2, "URL values"),
            b"dn: dc=x\ncn:: !!!\n": (2, "bad base64"),
            b"dn: not a dn\n": (1, "bad DN"),
            b" folded\n": (1, "continuation line"),
            b"dn: dc=x\ncn: a\ndn: dc=y\n": (3, "dn: inside a record"),
            b"dn: dc=x\ncn: \xff\n": (2, "not UTF-8"),
        }
        for data, (line, reason) in cases.items():
            with self.assertRaises(LDIFError) as caught:
                list(parseLDIF(data, "bad.ldif"))
            self.assertEqual(caught.exception.line, line, data)
            self.assertIn(reason, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith(f"bad.ldif: line {line}: "))


class LoadTests(unittest.TestCase):
    def write(self, name: str, data: bytes) -> Path:
        path = Path(self.mktemp())
        path.mkdir()
        (path / name).write_bytes(data)
        return path / name

    def assertLoadError(self, data: bytes, line: int, reason: str) -> None:
        path = self.write("d.ldif", data)
        with self.assertRaises(LoadError) as caught:
            Directory.load(SUFFIX, [path])
        self.assertEqual((caught.exception.file, caught.exception.line), (str(path), line))
        self.assertIn(reason, str(caught.exception))

    def test_outsideTheSuffix(self):
        self.assertLoadError(TOP + b"dn: dc=other,dc=org\nobjectClass: domain\ndc: other\n", 5, "outside the suffix")

    def test_duplicate(self):
        self.assertLoadError(TOP + b"dn: DC=Example,DC=com\nobjectClass: domain\n", 5, "already defined at")

    def test_missingParent(self):
        self.assertLoadError(TOP + b"dn: cn=x,ou=gone,dc=example,dc=com\nobjectClass: person\n", 5,
                             "parent of 'cn=x,ou=gone,dc=example,dc=com' is not in the directory")

    def test_noObjectClass(self):
        self.assertLoadError(TOP + b"dn: cn=x,dc=example,dc=com\ncn: x\n", 5, "no objectClass")

    def test_folder(self):
        """A folder: its *.ldif files by name (parents first), other files ignored."""
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "10-top.ldif").write_bytes(TOP)
        (folder / "20-people.ldif").write_bytes(b"dn: cn=x,dc=example,dc=com\nobjectClass: person\ncn: x\nsn: y\n")
        (folder / "README").write_text("not LDIF")
        directory = Directory.load(SUFFIX, [folder])
        self.assertEqual(len(directory), 2)

    def test_unreadable(self):
        with self.assertRaises(LoadError) as caught:
            Directory.load(SUFFIX, [Path("/nonexistent/x.ldif")])
        self.assertIn("cannot read", str(caught.exception))


class DirectoryTests(unittest.TestCase):
    def setUp(self):
        self.directory = exampleDirectory()

    def test_findUser(self):
        d = self.directory
        self.assertEqual(d.findUser("ALICE").dn, ALICE)
        self.assertEqual(d.findUser("bob@EXAMPLE.com", "mail").dn, BOB)
        self.assertEqual(d.findUser("carol danvers", "cn").first("sn"), "Danvers")
        self.assertIsNone(d.findUser("nobody"))
        self.assertIsNone(d.findUser("10000", "gidNumber"))  # two entries: ambiguous, never used

    def test_entryAPI(self):
        alice = self.directory.get("uid=alice, ou=users, dc=EXAMPLE, dc=com")
        self.assertEqual(alice.dn, ALICE)
        self.assertEqual(alice.get("commonName"), ["Alice Liddell"])
        self.assertEqual(alice.get("MAIL"), ["alice@example.com"])
        self.assertEqual(alice.get("nothing"), [])
        self.assertEqual(alice.first("objectClass"), "inetOrgPerson")
        self.assertIn("userPassword", alice.attributeNames())

    def test_checkPassword(self):
        d = self.directory.checkPassword(ALICE, "alice-pw")
        self.assertTrue(self.successResultOf(d))  # {SSHA}: checked at once
        self.assertFalse(self.successResultOf(self.directory.checkPassword(ALICE, "bob-pw")))
        self.assertFalse(self.successResultOf(self.directory.checkPassword(ALICE, "")))

    def test_cleartextPassword(self):
        directory = directoryFrom(TOP + b"dn: cn=x,dc=example,dc=com\nobjectClass: person\ncn: x\nsn: x\n"
                                  b"userPassword: plain\n")
        d = directory.checkPassword("cn=x,dc=example,dc=com", "plain")
        return d.addCallback(self.assertTrue)

    def test_slowSchemesInHashPool(self):
        """A scrypt (or crypt) userPassword is checked in the hashing pool, never the reactor's default pool."""
        threads = []

        def verify(password, stored, plain=False):
            threads.append(threading.current_thread().name)
            return password == "right"

        self.patch(auth, "verifyPassword", verify)
        self.addCleanup(auth.hashPool().stop)
        directory = directoryFrom(TOP + b"dn: cn=x,dc=example,dc=com\nobjectClass: person\ncn: x\nsn: x\n"
                                  b"userPassword: scrypt:00:00\n")
        d = directory.checkPassword("cn=x,dc=example,dc=com", "right")
        d.addCallback(self.assertIs, True)
        d.addCallback(lambda _: self.assertEqual(len(threads), 1))
        d.addCallback(lambda _: self.assertIn("netsvc-hash", threads[0]))
        return d

    def test_busyPoolRefuses(self):
        """With the hashing pool's queue full, a slow check answers Refused("busy") (falsy) without hashing."""
        gate = threading.Event()
        calls = []

        def verify(password, stored, plain=False):
            calls.append(password)
            gate.wait(30)
            return False

        directory = directoryFrom(TOP + b"dn: cn=x,dc=example,dc=com\nobjectClass: person\ncn: x\nsn: x\n"
                                  b"userPassword: scrypt:00:00\n")
        directory.pool = auth.HashPool(reactor, threads=1, queue=0, verify=verify)
        self.addCleanup(directory.pool.stop)
        self.addCleanup(gate.set)
        self.patch(auth, "verifyPassword", verify)
        first = directory.checkPassword("cn=x,dc=example,dc=com", "a")
        busy = self.successResultOf(directory.checkPassword("cn=x,dc=example,dc=com", "b"))
        self.assertIsInstance(busy, auth.Refused)
        self.assertEqual(busy.reason, "busy")
        unknown = self.successResultOf(directory.checkPassword("cn=nobody,dc=example,dc=com", "c"))
        self.assertIsInstance(unknown, auth.Refused)
        gate.set()
        return first.addCallback(self.assertIs, False).addCallback(lambda _: self.assertEqual(calls, ["a"]))

    def test_indexedSearchIsNotAScan(self):
        many = directoryFrom(TOP + b"".join(
            b"dn: uid=u%d,dc=example,dc=com\nobjectClass: account\nuid: u%d\n\n" % (i, i) for i in range(3000)))
        found = list(many.search(many.nsuffix, 2, ("eq", "uid", b"U2999"), maxScan=10))
        self.assertEqual([e.dn for e in found], ["uid=u2999,dc=example,dc=com"])
        both = list(many.search(many.nsuffix, 2, ("or", [("eq", "uid", b"u7"), ("eq", "uid", b"u3")]), maxScan=10))
        self.assertEqual([e.dn for e in both], ["uid=u3,dc=example,dc=com", "uid=u7,dc=example,dc=com"])
        with self.assertRaises(ScanLimit):
            list(many.search(many.nsuffix, 2, ("present", "description"), maxScan=10))

    def test_scopeOverIndex(self):
        d = self.directory
        people = [e.dn for e in d.search("ou=groups,dc=example,dc=com", 2, ("eq", "objectClass", b"top"))]
        self.assertEqual(len(people), 4)
        self.assertEqual([e.dn for e in d.search(d.nsuffix, 1, ("eq", "objectClass", b"organizationalUnit"))],
                         [USERS, "ou=groups,dc=example,dc=com"])


class SettingsTests(unittest.TestCase):
    """The LDIF is validated with the configuration: errors name the file and line."""

    def configFile(self, ldif: bytes, extra: str = "") -> Path:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "dir.ldif").write_bytes(ldif)
        path = folder / "netsvc.yaml"
        path.write_text(f"services:\n  ldap:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
                        f"    suffix: dc=example,dc=com\n    ldif: [dir.ldif]\n{extra}")
        return path

    def test_loadedRelativeToTheFile(self):
        settings = config.load(str(self.configFile(EXAMPLE.read_bytes())))
        self.assertEqual(len(settings.services["ldap"].loaded), 10)

    def test_badLDIFIsAConfigError(self):
        path = self.configFile(TOP + b"dn: dc=elsewhere\nobjectClass: domain\n")
        with self.assertRaises(config.ConfigError) as caught:
            config.load(str(path))
        self.assertEqual(str(caught.exception),
                         f"{path}: services.ldap.ldif: {path.parent / 'dir.ldif'}: line 5: "
                         f"entry 'dc=elsewhere' is outside the suffix 'dc=example,dc=com'")

    def test_checkConfig(self):
        path = self.configFile(b"dn: dc=example,dc=com\nobjectClass domain\n")
        import argparse
        import io

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(checkConfig(None, argparse.Namespace(files=[str(path)])), 1)
        self.assertIn("dir.ldif: line 2: expected 'attribute: value'", err.getvalue())

    def test_otherProblems(self):
        path = self.configFile(TOP, "    anonymous: maybe\n")
        with self.assertRaises(config.ConfigError) as caught:
            config.load(str(path))
        self.assertIn("services.ldap.anonymous: expected one of 'read', 'none'", str(caught.exception))

    def test_settingsProblems(self):
        path = self.configFile(TOP, "    writable: true\n")
        with self.assertRaises(config.ConfigError) as caught:
            config.load(str(path))
        text = str(caught.exception)
        self.assertIn("services.ldap.writers: writable: true needs writers", text)
        path = self.configFile(TOP)
        path.write_text(path.read_text().replace("suffix: dc=example,dc=com", "suffix: 'not a dn'"))
        with self.assertRaises(config.ConfigError) as caught:
            config.load(str(path))
        self.assertIn("services.ldap.suffix: not a DN", str(caught.exception))


class ServiceTests(unittest.TestCase):
    """The service in a daemon over loopback, with the ldap3 library as the client."""

    def setUp(self):
        self.daemon = startDaemon(self, f"services:\n  ldap:\n    listen: ['tcp:0:interface=127.0.0.1', "
                                        f"'tls:0:interface=127.0.0.1']\n    ldif: ['{EXAMPLE}']\n")
        svc = self.daemon.getServiceNamed("ldap")
        self.port = svc.listeners[0].port.getHost().port
        self.tlsPort = svc.listeners[1].port.getHost().port
        self.cafile = str(self.daemon.context.stateDir / "tls" / "selfsigned.pem")

    def test_contextDirectory(self):
        self.assertEqual(self.daemon.context.directory.findUser("alice").dn, ALICE)

    def test_ldap3(self):
        import ssl

        import ldap3

        def session():
            tls = ldap3.Tls(ca_certs_file=self.cafile, validate=ssl.CERT_REQUIRED)
            server = ldap3.Server("127.0.0.1", port=self.port, tls=tls, get_info=ldap3.ALL)
            out = {}
            conn = ldap3.Connection(server, ALICE, "alice-pw", auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND,
                                    receive_timeout=10)
            try:  # (not "with": ldap3 does not unbind on exit a connection bound on entry)
                out["whoami"] = conn.extend.standard.who_am_i()
                out["naming"] = list(server.info.naming_contexts)
                conn.search(USERS, "(objectClass=person)", attributes=["sn", "userPassword"])
                out["entries"] = {e.entry_dn: (e.sn.value, e.userPassword.value if "userPassword" in e else None)
                                  for e in conn.entries}
                out["paged"] = [e["dn"] for e in conn.extend.standard.paged_search(
                    SUFFIX, "(objectClass=*)", attributes=["cn"], paged_size=3, generator=False)]
                out["schema"] = "inetOrgPerson" in server.schema.object_classes
            finally:
                conn.unbind()
            ldaps = ldap3.Server("127.0.0.1", port=self.tlsPort, use_ssl=True, tls=tls)
            conn = ldap3.Connection(ldaps, BOB, "wrong", receive_timeout=10)
            try:
                out["wrong"] = (conn.bind(), conn.result["result"])
            finally:
                conn.unbind()
            return out

        def check(out):
            self.assertEqual(out["whoami"], "dn:" + ALICE)
            self.assertEqual(out["naming"], [SUFFIX])
            self.assertEqual(out["entries"][BOB], ("Builder", None))
            self.assertEqual(out["entries"][ALICE][0], "Liddell")
            self.assertTrue(out["entries"][ALICE][1].startswith(b"{SSHA}"))
            self.assertEqual(len(out["paged"]), 10)
            self.assertTrue(out["schema"])
            self.assertEqual(out["wrong"], (False, 49))

        return deferToThread(session).addCallback(check)

    def test_reload(self):
        """SIGHUP: the LDIF is read again into the same Directory; a bad file keeps the running one."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        ldif = folder / "d.ldif"
        ldif.write_bytes(EXAMPLE.read_bytes())
        text = f"state_dir: {folder}/var\nservices:\n  ldap:\n    listen: ['tcp:0:interface=127.0.0.1']\n" \
               f"    ldif: ['{ldif}']\n"
        settings = config.parse(text, "t.yaml")
        daemon = buildDaemon(settings, reactor, "t.yaml", reloadSettings=lambda: config.parse(text, "t.yaml"))
        directory = daemon.context.directory
        ldif.write_bytes(EXAMPLE.read_bytes().replace(b"uid: bob", b"uid: robert"))
        daemon.reload()
        self.assertIs(daemon.context.directory, directory)
        self.assertIsNone(directory.findUser("bob"))
        self.assertEqual(directory.findUser("robert").dn, BOB)
        ldif.write_bytes(b"garbage\n")
        daemon.reload()
        self.assertEqual(directory.findUser("robert").dn, BOB)
        self.flushLoggedErrors()


class BackPressureTests(unittest.TestCase):
    """Over loopback: a client that sends many searches and reads nothing does not grow the server's memory."""

    def test_clientThatDoesNotRead(self):
        from twisted.internet import defer, endpoints
        from twisted.internet.protocol import Protocol

        from netsvc.ldap import codec
        from tests.helpers import sleep

        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        ldif = folder / "big.ldif"
        ldif.write_bytes(TOP + b"".join(b"dn: cn=e%d,dc=example,dc=com\nobjectClass: person\ncn: e%d\nsn: x\n"
                                        b"description: %s\n\n" % (i, i, b"d" * 300) for i in range(300)))
        daemon = startDaemon(self, f"services:\n  ldap:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
                                   f"    ldif: ['{ldif}']\n")
        svc = daemon.getServiceNamed("ldap")
        port = svc.listeners[0].port.getHost().port
        requests = 400  # each answered with 100 entries of ~350 bytes: 14 MB if nothing pushed back

        class Silent(Protocol):
            def __init__(self):
                self.received = bytearray()

            def dataReceived(self, data):
                self.received += data

        @defer.inlineCallbacks
        def run():
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
            client = yield endpoints.connectProtocol(endpoint, Silent())
            client.transport.pauseProducing()  # read nothing
            op = codec.tlv(codec.SEARCH_REQUEST, codec.octets(b"dc=example,dc=com") + codec.integer(2, 0x0A)
                           + codec.integer(0, 0x0A) + codec.integer(100) + codec.integer(0)
                           + codec.tlv(0x01, b"\0") + codec.tlv(0x87, b"cn") + codec.tlv(0x30, b""))
            client.transport.write(b"".join(codec.message(i, op) for i in range(1, requests + 1)))
            yield sleep(1.0)
            (conn,) = svc.guard.connections
            server = conn.wrappedProtocol
            self.assertTrue(server.writesPaused)
            transport = conn.transport
            pending = len(transport.dataBuffer) + transport._tempDataLen + len(server.buffer)
            self.assertLess(pending, 2 << 20)
            client.transport.resumeProducing()
            done = b"\x65\x07\x0a\x01\x04"  # searchResultDone, sizeLimitExceeded
            for _ in range(100):
                if client.received.count(done) >= requests:
                    break
                yield sleep(0.1)
            self.assertEqual(client.received.count(done), requests)
            client.transport.loseConnection()

        return run()
