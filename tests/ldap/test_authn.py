"""
netsvc.ldap.authn: users in a remote directory (ldaptor's in-memory server on
loopback, and a real slapd with StartTLS and a service account), a directory
that is down or hangs, bounded connections, the reserved-names cache, and the
local services.ldap directory.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

from ldaptor import inmemory
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from netsvc import auth
from netsvc.config import ConfigError
from netsvc.ldap import authn, client
from netsvc.ldap.ldifout import manyLDIF
from tests.ldap.test_clientcli import SUFFIX, _Factory, exampleLDIF

USERS = f"ou=users,{SUFFIX}"


def captureErrors(testCase) -> list:
    """The error events netsvc.ldap.authn logs during the test."""
    events: list = []

    def observer(event):
        if event.get("log_namespace") == "netsvc.ldap.authn" and event["log_level"].name in ("error", "critical"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def remote(url: str, testCase, **kw) -> authn.RemoteDirectory:
    kw.setdefault("timeout", 2.0)
    directory = authn.RemoteDirectory(reactor, client.parseURL(url), kw.pop("base", USERS), **kw)
    testCase.addCleanup(directory.close)
    return directory


class RemoteInMemoryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        root = yield inmemory.fromLDIFFile(io.BytesIO(exampleLDIF()))
        self.port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(_Factory(root))
        self.addCleanup(self.port.stopListening)
        self.url = f"ldap://127.0.0.1:{self.port.getHost().port}"
        self.connects = 0
        self.errors = captureErrors(self)

    def countingConnect(self, *args, **kw):
        self.connects += 1
        return client.connect(*args, **kw)

    @defer.inlineCallbacks
    def test_check(self):
        users = remote(self.url, self, connect=self.countingConnect)
        self.assertIs((yield users.check("jo", "s3cret")), True)
        self.assertIs((yield users.check("JO", "s3cret")), True)  # uid is case-insensitive
        self.assertIs((yield users.check("jo", "wrong")), False)
        self.assertIs((yield users.check("nobody", "s3cret")), False)
        self.assertIs((yield users.check("al", "anything")), False)  # no userPassword
        self.assertEqual(self.errors, [])
        self.assertLessEqual(self.connects, 2)  # one search and one bind connection, reused

    @defer.inlineCallbacks
    def test_unknownUserCostsABind(self):
        """
        An unknown user is not answered after the search alone: a bind with the password
        is made as for a known user (to a DN that does not exist), so that the answer
        takes the same round trips; the server's refusal is not logged.
        """
        binds: list[str] = []

        async def recordingConnect(*args, **kw):
            conn = await client.connect(*args, **kw)
            bind = conn.bind

            def recording(dn, password):
                binds.append(dn)
                return bind(dn, password)

            conn.bind = recording
            return conn

        users = remote(self.url, self, connect=recordingConnect)
        self.assertIs((yield users.check("jo", "wrong")), False)
        self.assertIs((yield users.check("nobody", "wrong")), False)
        self.assertIs((yield users.check("nobody", "s3cret")), False)
        self.assertEqual(len(binds), 3)
        self.assertTrue(binds[1].endswith("," + USERS), binds)
        self.assertEqual(self.errors, [])

    @defer.inlineCallbacks
    def test_emptyPasswordNeverAsksTheServer(self):
        # An empty password would make the bind anonymous, and "succeed".
        users = remote(self.url, self, connect=self.countingConnect)
        self.assertIs((yield users.check("jo", "")), False)
        self.assertEqual(self.connects, 0)

    @defer.inlineCallbacks
    def test_longNameNeverAsksTheServer(self):
        users = remote(self.url, self, connect=self.countingConnect)
        self.assertIs((yield users.check("j" * 10_000, "s3cret")), False)
        self.assertEqual(self.connects, 0)

    @defer.inlineCallbacks
    def test_filterCharactersAreLiteral(self):
        users = remote(self.url, self)
        for name in ("*", "j*", "jo)(uid=*", "jo\\2a"):
            self.assertIs((yield users.check(name, "s3cret")), False, name)

    @defer.inlineCallbacks
    def test_boundedConnections(self):
        users = remote(self.url, self, connect=self.countingConnect)
        results = yield defer.gatherResults([users.check("jo", "s3cret" if n % 2 else "bad") for n in range(24)])
        self.assertEqual(results, [bool(n % 2) for n in range(24)])
        self.assertLessEqual(self.connects, authn.SEARCH_CONNECTIONS + authn.BIND_CONNECTIONS)

    @defer.inlineCallbacks
    def test_reservedNames(self):
        users = remote(self.url, self)
        self.assertFalse(users.isReserved("jo"))  # not loaded yet: the first question starts the load
        self.assertFalse(users.namesLoaded)  # (so local delivery answers 451, not 550)
        yield users.refresh(force=False)
        self.assertTrue(users.namesLoaded)
        self.assertTrue(users.isReserved("jo"))
        self.assertTrue(users.isReserved("Al"))
        self.assertFalse(users.isReserved("nobody"))

    @defer.inlineCallbacks
    def test_reservedNamesRefreshOnlyWhenDue(self):
        users = remote(self.url, self, connect=self.countingConnect)
        yield users.refresh()
        before = self.connects
        users.isReserved("jo")
        self.assertIsNone(users._refreshing)  # fresh: no new search
        self.assertEqual(self.connects, before)
        users._nextRefresh = 0
        users.isReserved("jo")
        self.assertIsNotNone(users._refreshing)
        yield users._refreshing

    @defer.inlineCallbacks
    def test_checkedUserIsReserved(self):
        users = remote(self.url, self)
        yield users.check("jo", "s3cret")
        self.assertTrue(users.isReserved("jo"))  # before the first load
        yield users._refreshing

    @defer.inlineCallbacks
    def test_downDirectoryFailsAndLogsOnce(self):
        users = remote(self.url, self)
        self.assertIs((yield users.check("jo", "s3cret")), True)
        yield self.port.stopListening()
        users.close()
        for _ in range(3):
            self.assertIs((yield users.check("jo", "s3cret")), False)
        self.assertEqual(len(self.errors), 1, self.errors)
        self.assertIn("connection refused", self.errors[0]["problem"])
        yield users.refresh()  # fails quietly: the same problem, and it keeps the names it had
        self.assertTrue(users.isReserved("jo"))

    @defer.inlineCallbacks
    def test_wrongBaseIsLogged(self):
        users = remote(self.url, self, base=f"ou=gone,{SUFFIX}")
        self.assertIs((yield users.check("jo", "s3cret")), False)
        self.assertEqual(len(self.errors), 1)
        self.assertIn("No such object (32)", self.errors[0]["problem"])


class _FakeConnection:
    def __init__(self, name):
        self.name = name
        self.connected = True
        self.transport = SimpleNamespace(abortConnection=lambda: setattr(self, "connected", False))


class PoolTests(unittest.TestCase):
    def setUp(self):
        self.opened = []

    async def open(self):
        conn = _FakeConnection(len(self.opened))
        self.opened.append(conn)
        return conn

    @defer.inlineCallbacks
    def test_reusedConnectionClosedByServerIsRetriedOnce(self):
        from twisted.internet import error

        pool = authn.Pool(self.open, 2)
        first = yield defer.ensureDeferred(pool.run(lambda conn: defer.succeed(conn.name)))
        self.assertEqual(first, 0)

        def operation(conn):
            if conn.name == 0:  # the server closed it while idle; we learn it now
                return defer.fail(error.ConnectionLost("the server closed the connection"))
            return defer.succeed(conn.name)

        self.assertEqual((yield defer.ensureDeferred(pool.run(operation))), 1)
        self.assertEqual(len(self.opened), 2)

    @defer.inlineCallbacks
    def test_newConnectionFailureIsNotRetried(self):
        from twisted.internet import error

        pool = authn.Pool(self.open, 2)
        d = defer.ensureDeferred(pool.run(lambda conn: defer.fail(error.ConnectionLost("gone"))))
        yield self.assertFailure(d, error.ConnectionLost)
        self.assertEqual(len(self.opened), 1)

    @defer.inlineCallbacks
    def test_ldapErrorKeepsTheConnection(self):
        pool = authn.Pool(self.open, 1)
        d = defer.ensureDeferred(pool.run(lambda conn: defer.fail(client.LDAPError(49))))
        yield self.assertFailure(d, client.LDAPError)
        self.assertEqual((yield defer.ensureDeferred(pool.run(lambda conn: defer.succeed(conn.name)))), 0)
        self.assertEqual(len(self.opened), 1)

    @defer.inlineCallbacks
    def test_bounded(self):
        pool = authn.Pool(self.open, 2)
        waiting = [defer.Deferred() for _ in range(5)]
        runs = [defer.ensureDeferred(pool.run(lambda conn, w=w: w)) for w in waiting]
        self.assertEqual(len(self.opened), 2)
        for w in waiting:
            w.callback(None)
        yield defer.gatherResults(runs)
        self.assertEqual(len(self.opened), 2)


class _Silent(protocol.Protocol):
    """Accepts and never answers."""


class HangingDirectoryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_checkFailsInBoundedTime(self):
        f = protocol.ServerFactory.forProtocol(_Silent)
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(f)
        self.addCleanup(port.stopListening)
        errors = captureErrors(self)
        users = remote(f"ldap://127.0.0.1:{port.getHost().port}", self, timeout=0.3)
        started = reactor.seconds()
        self.assertIs((yield users.check("jo", "s3cret")), False)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(len(errors), 1)
        self.assertIn("timed out (no answer in 0.3s)", errors[0]["problem"])


class SlapdTests(unittest.TestCase):
    """A real slapd: StartTLS verified, a service account for the search."""

    def setUp(self):
        from tests.interop._slapd import ADMIN_DN, ADMIN_PASSWORD, startSlapd

        self.slapd = startSlapd(self)
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        (self.folder / "admin.pw").write_text(ADMIN_PASSWORD + "\n")
        self.adminDN = ADMIN_DN

    def context(self):
        return SimpleNamespace(reactor=reactor, configFile="netsvc.yaml", directory=None,
                               settings=SimpleNamespace(path=lambda p: self.folder / p))

    def source(self, **kw):
        values = {"ldap": self.slapd.url, "base": USERS, "starttls": True, "cacert": self.slapd.cafile,
                  "bind_dn": self.adminDN, "bind_password_file": "admin.pw", "timeout": 3.0} | kw
        return auth.UserSource(**values)

    @defer.inlineCallbacks
    def test_throughNetsvcAuth(self):
        users = auth.authenticatorFor(self.source(), self.context())
        self.addCleanup(users.close)
        self.assertIsInstance(users, authn.RemoteDirectory)
        self.assertIs((yield users.check("user3", "pw-user3")), True)
        self.assertIs((yield users.check("user3", "pw-user4")), False)
        self.assertIs((yield users.check("zoe", "pw-zoe")), True)
        yield users.refresh()
        self.assertTrue(users.isReserved("user12"))
        self.assertTrue(users.isReserved("zoe"))
        self.assertFalse(users.isReserved("user13"))

    @defer.inlineCallbacks
    def test_anonymousSearchAndLDAPS(self):
        source = self.source(ldap=self.slapd.ldapsURL, starttls=False, bind_dn=None, bind_password_file=None)
        users = auth.authenticatorFor(source, self.context())
        self.addCleanup(users.close)
        self.assertIs((yield users.check("user1", "pw-user1")), True)

    @defer.inlineCallbacks
    def test_wrongServiceAccountPasswordLogged(self):
        (self.folder / "admin.pw").write_text("wrong\n")
        errors = captureErrors(self)
        users = auth.authenticatorFor(self.source(), self.context())
        self.addCleanup(users.close)
        self.assertIs((yield users.check("user1", "pw-user1")), False)
        yield users.refresh()
        self.assertEqual(len(errors), 1)
        self.assertIn("Invalid credentials (49)", errors[0]["problem"])

    def test_contradictoryTLSIsAStartupError(self):
        for kw, key in (({"ldap": self.slapd.ldapsURL, "starttls": True}, "starttls"),
                        ({"starttls": False}, "cacert")):
            e = self.assertRaises(ConfigError, authn.authenticatorFor, self.source(**kw), self.context(),
                                  "services.smtp.users")
            self.assertIn(f"services.smtp.users.{key}", str(e))

    def test_missingPasswordFileIsAStartupError(self):
        e = self.assertRaises(ConfigError, auth.authenticatorFor, self.source(bind_password_file="nope.pw"),
                              self.context(), "services.smtp.users")
        self.assertIn("bind_password_file", str(e))


class LocalDirectoryTests(unittest.TestCase):
    def setUp(self):
        from netsvc.ldap.directory import Directory

        path = Path(self.mktemp())
        path.write_bytes(exampleLDIF() + manyLDIF([(f"uid=cy,{USERS}", [
            ("objectClass", [b"inetOrgPerson"]), ("uid", [b"cy"]), ("cn", [b"Cy"]), ("sn", [b"Cy"]),
            ("userPassword", [auth.hashPassword("pw-cy", "scrypt").encode()])])])[len(b"version: 1\n\n"):])
        self.directory = Directory.load(SUFFIX, [path])
        self.context = SimpleNamespace(reactor=reactor, directory=None)

    def users(self):
        return auth.authenticatorFor(auth.UserSource(directory=True), self.context)

    @defer.inlineCallbacks
    def test_check(self):
        users = self.users()
        self.context.directory = self.directory  # resolved at use: services.ldap may be built later
        self.assertIs((yield users.check("jo", "s3cret")), True)
        self.assertIs((yield users.check("Jo", "s3cret")), True)
        self.assertIs((yield users.check("jo", "wrong")), False)
        self.assertIs((yield users.check("cy", "pw-cy")), True)  # scrypt, in a thread
        self.assertIs((yield users.check("nobody", "s3cret")), False)
        self.assertIs((yield users.check("jo", "")), False)

    def test_isReserved(self):
        users = self.users()
        self.context.directory = self.directory
        self.assertTrue(users.isReserved("jo"))
        self.assertTrue(users.isReserved("AL"))
        self.assertFalse(users.isReserved("nobody"))

    def test_noLDAPServiceIsAStartupError(self):
        context = SimpleNamespace(reactor=reactor, directory=None, configFile="netsvc.yaml",
                                  settings=SimpleNamespace(services={"chat": SimpleNamespace(enabled=True)}))
        e = self.assertRaises(ConfigError, auth.authenticatorFor, auth.UserSource(directory=True), context)
        self.assertIn("needs services.ldap", str(e))
        e = self.assertRaises(ConfigError, authn.authenticatorFor, auth.UserSource(directory=True), context,
                              "services.chat.auth.users")
        self.assertIn("services.chat.auth.users", str(e))

    @defer.inlineCallbacks
    def test_noDirectory(self):
        errors = captureErrors(self)
        users = self.users()
        self.assertIs((yield users.check("jo", "s3cret")), False)
        self.assertFalse(users.isReserved("jo"))
        self.assertEqual(len(errors), 1)
        self.assertIn("no services.ldap", errors[0]["log_format"])


EXAMPLE_LDIF = Path(__file__).resolve().parents[2] / "etc" / "ldap" / "example.ldif"


class ChatReservedNicknamesTests(unittest.TestCase):
    """services.chat's reserved nicknames from services.ldap, in one daemon and through a remote URL."""

    def ldapDaemon(self):
        from tests.helpers import startDaemon

        return startDaemon(self, f"""
services:
  ldap:
    listen: ["tcp:0:interface=127.0.0.1"]
    suffix: dc=example,dc=com
    ldif: ["{EXAMPLE_LDIF}"]
""")

    @defer.inlineCallbacks
    def nickExchange(self, chatPort):
        from tests.chat.test_service import connect, readUntil

        sock = connect(chatPort)
        self.addCleanup(sock.close)
        yield readUntil(sock, b"joined #lobby\n")
        sock.sendall(b"/nick alice\n")
        yield readUntil(sock, b"nickname alice is reserved")
        sock.sendall(b"/nick alice not-her-password\n")
        yield readUntil(sock, b"wrong password for alice")
        sock.sendall(b"/nick ALICE alice-pw\n")
        got = yield readUntil(sock, b"known as ALICE")
        self.assertNotIn(b"error", got)
        sock.sendall(b"/nick zed\n")  # not in the directory: free for anyone
        got = yield readUntil(sock, b"known as zed")
        self.assertNotIn(b"error", got)

    def test_passwordFileOrUsers(self):
        from netsvc import config

        e = self.assertRaises(ConfigError, config.parse, """
services:
  chat:
    auth: {password_file: chat.pw, users: {directory: true}}
""", "netsvc.yaml")
        self.assertIn("services.chat.auth.users: give password_file or users, not both", str(e))
        e = self.assertRaises(ConfigError, config.parse, """
services:
  chat:
    auth: {users: {ldap: "http://x", base: "dc=x"}}
""", "netsvc.yaml")
        self.assertIn("services.chat.auth.users.ldap", str(e))

    @defer.inlineCallbacks
    def test_directoryInTheSameDaemon(self):
        from tests.helpers import port, startDaemon

        daemon = startDaemon(self, f"""
services:
  chat:
    listen: ["tcp:0:interface=127.0.0.1"]
    auth:
      users: {{directory: true}}
  ldap:
    listen: ["tcp:0:interface=127.0.0.1"]
    suffix: dc=example,dc=com
    ldif: ["{EXAMPLE_LDIF}"]
""")
        yield self.nickExchange(port(daemon, 0, "chat"))

    @defer.inlineCallbacks
    def test_remoteDirectory(self):
        from tests.helpers import port, startDaemon

        directory = self.ldapDaemon()
        chat = startDaemon(self, f"""
services:
  chat:
    listen: ["tcp:0:interface=127.0.0.1"]
    auth:
      users: {{ldap: "ldap://127.0.0.1:{port(directory, 0, 'ldap')}", base: "ou=users,dc=example,dc=com"}}
""")
        authority = chat.getServiceNamed("chat").hub.authority
        self.addCleanup(authority.close)
        yield authority.refresh()
        yield self.nickExchange(port(chat, 0, "chat"))


class CloseTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_closeStopsARefresh(self):
        f = protocol.ServerFactory.forProtocol(_Silent)
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(f)
        self.addCleanup(port.stopListening)
        users = remote(f"ldap://127.0.0.1:{port.getHost().port}", self, timeout=30)
        d = users.refresh()
        yield users._searches._slots.acquire()  # the refresh holds the other slot, waiting for an answer
        users._searches._slots.release()
        users.close()
        yield d  # fires at once (a refresh never fails), leaving nothing behind
        self.assertIsNone(users._refreshing)
        self.assertFalse(users.isReserved("jo"))
        self.assertIsNone(users._refreshing)  # the next try waits RETRY seconds


class AgainstServicesLDAPTests(unittest.TestCase):
    """RemoteDirectory against netsvc's own services.ldap (its failed-bind limit included)."""

    @defer.inlineCallbacks
    def test_lockOutIsReported(self):
        from tests.helpers import port, startDaemon

        daemon = startDaemon(self, f"""
services:
  ldap:
    listen: ["tcp:0:interface=127.0.0.1"]
    suffix: dc=example,dc=com
    ldif: ["{EXAMPLE_LDIF}"]
    failed_binds: {{rate: 0.01, burst: 2}}
""")
        warnings = []

        def observer(event):
            if event.get("log_namespace") == "netsvc.ldap.authn" and event["log_level"].name == "warn":
                warnings.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        users = remote(f"ldap://127.0.0.1:{port(daemon, 0, 'ldap')}", self)
        self.assertIs((yield users.check("alice", "alice-pw")), True)
        for _ in range(2):
            self.assertIs((yield users.check("bob", "wrong")), False)
        self.assertEqual(warnings, [])  # wrong passwords are not news
        for _ in range(3):
            self.assertIs((yield users.check("alice", "alice-pw")), False)  # locked out with everyone
        self.assertEqual(len(warnings), 1)
        self.assertIn("too many failed binds", warnings[0]["error"])


class SMTPAuthTests(unittest.TestCase):
    """services.smtp's AUTH with the users of services.ldap (users: {directory: true}), smtplib as the client."""

    @defer.inlineCallbacks
    def test_submissionWithDirectoryUsers(self):
        import smtplib
        import ssl

        from twisted.internet import threads

        from tests.helpers import port, startDaemon, stateDir

        daemon = startDaemon(self, f"""
services:
  smtp:
    listen:
      - {{endpoint: "tls:0:interface=127.0.0.1", submission: true}}
    hostname: mail.test
    users: {{directory: true}}
  ldap:
    listen: ["tcp:0:interface=127.0.0.1"]
    suffix: dc=example,dc=com
    ldif: ["{EXAMPLE_LDIF}"]
""")
        context = ssl.create_default_context(cafile=str(stateDir(daemon) / "tls" / "selfsigned.pem"))

        def submit():
            with smtplib.SMTP_SSL("127.0.0.1", port(daemon, 0, "smtp"), context=context, timeout=10) as c:
                with self.assertRaises(smtplib.SMTPAuthenticationError):
                    c.login("carol", "not-carol-pw")
                c.login("carol", "carol-pw")  # {CRYPT} SHA-512 in the example LDIF
                return c.sendmail("carol@example.com", ["x@example.org"], b"Subject: hi\r\n\r\nhello\r\n")

        self.assertEqual((yield threads.deferToThread(submit)), {})
        svc = daemon.getServiceNamed("smtp")
        (id,) = svc.capture.ids()
        self.assertEqual(svc.capture.envelope(id).client["user"], "carol")
