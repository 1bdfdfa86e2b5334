"""
C{netsvc ldap} commands: argument parsing, usage errors (exit 2), hashing, and
search/compare/whoami against an in-process directory (ldaptor's in-memory
server on loopback) with the exit codes ldapsearch uses.
"""

from __future__ import annotations

import io
import json

from ldaptor import inmemory
from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import ServerFactory
from twisted.python.components import registerAdapter
from twisted.trial import unittest

from netsvc import cli
from netsvc.auth import hashPassword, verifyPassword
from netsvc.ldap import clientcli
from netsvc.ldap.ldifout import manyLDIF
from tests.ldap.test_ldifout import parseLDIF

SUFFIX = "dc=example,dc=com"
JO = f"uid=jo,ou=users,{SUFFIX}"


class _Factory(ServerFactory):
    protocol = LDAPServer

    def __init__(self, root):
        self.root = root


registerAdapter(lambda factory: factory.root, _Factory, IConnectedLDAPEntry)


def exampleLDIF() -> bytes:
    return manyLDIF([
        (SUFFIX, [("objectClass", [b"dcObject", b"organization"]), ("dc", [b"example"]), ("o", [b"Example"])]),
        (f"ou=users,{SUFFIX}", [("objectClass", [b"organizationalUnit"]), ("ou", [b"users"])]),
        (JO, [("objectClass", [b"inetOrgPerson"]), ("uid", [b"jo"]), ("cn", [b"Jo Smith"]), ("sn", [b"Smith"]),
              ("description", ["d\u00e9j\u00e0 vu ".encode()]),
              ("userPassword", [hashPassword("s3cret", "ssha").encode()])]),
        (f"uid=al,ou=users,{SUFFIX}", [("objectClass", [b"inetOrgPerson"]), ("uid", [b"al"]), ("cn", [b"Al"]),
                                       ("sn", [b"Bo"])]),
    ])


def args(*argv: str):
    return cli.parser().parse_args(["ldap", *argv])


class ParsingTests(unittest.TestCase):
    def test_searchOptions(self):
        a = args("search", "-x", "-H", "ldaps://h:1636", "-D", "cn=x", "-w", "pw", "-b", SUFFIX, "-s", "one",
                 "-z", "5", "-l", "3", "-E", "pr=10/noprompt", "(uid=x)", "cn", "sn")
        self.assertEqual((a.url, a.binddn, a.password, a.base, a.scope, a.sizeLimit, a.timeLimit),
                         ("ldaps://h:1636", "cn=x", "pw", SUFFIX, "one", 5, 3))
        self.assertEqual((a.filter, a.attributes, a.extensions), ("(uid=x)", ["cn", "sn"], ["pr=10/noprompt"]))
        self.assertIs(a.run, clientcli.search)

    def test_optionsAfterFilter(self):
        a = args("search", "-H", "ldap://h", "(uid=x)", "cn", "-b", SUFFIX, "-ZZ")
        self.assertEqual((a.filter, a.attributes, a.base, a.starttls), ("(uid=x)", ["cn"], SUFFIX, 2))

    def test_ldapsearchDefaults(self):
        a = args("search", "-H", "ldap://h", "1.1")
        clientcli._checkSearch(a)
        self.assertEqual((a.filter, a.attributes, a.scope, a.base), ("(objectClass=*)", ["1.1"], "sub", ""))

    def test_extensions(self):
        self.assertEqual(clientcli.parseExtensions(["pr=50/noprompt"]), (50, False))
        self.assertEqual(clientcli.parseExtensions(["!pr=7"]), (7, True))
        for bad in (["pr=0"], ["pr=x"], ["sss=cn"], ["pr=5/maybe"]):
            self.assertRaises(clientcli.UsageError, clientcli.parseExtensions, bad)

    def test_wrap(self):
        self.assertEqual(clientcli.parseWrap([]), 78)  # ldapsearch's default
        self.assertEqual(clientcli.parseWrap(["ldif-wrap=no"]), 0)
        self.assertEqual(clientcli.parseWrap(["ldif-wrap=120"]), 120)
        self.assertRaises(clientcli.UsageError, clientcli.parseWrap, ["ldif-wrap=yes"])

    def test_assertion(self):
        self.assertEqual(clientcli.parseAssertion("sn:Smith"), ("sn", b"Smith"))
        self.assertEqual(clientcli.parseAssertion("cn::SsOk"), ("cn", "J\u00e4".encode()))
        self.assertEqual(clientcli.parseAssertion("description:a:b"), ("description", b"a:b"))
        self.assertRaises(clientcli.UsageError, clientcli.parseAssertion, "nocolon")
        self.assertRaises(clientcli.UsageError, clientcli.parseAssertion, "cn::not base64!")


class UsageTests(unittest.TestCase):
    """Bad usage: one line, exit 2, no connection attempted."""

    def usage(self, *argv: str) -> str:
        a = args(*argv)
        err = io.StringIO()
        status = self.successResultOf(a.run(reactor, a, io.BytesIO(), err))
        self.assertEqual(status, 2, err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertTrue(err.getvalue().startswith("netsvc ldap: "), err.getvalue())
        return err.getvalue()

    def test_errors(self):
        self.assertIn("expected ldap://", self.usage("search", "-H", "http://x"))
        self.assertIn("-Z (StartTLS) goes with ldap://", self.usage("search", "-H", "ldaps://x", "-ZZ"))
        self.assertIn("needs -D", self.usage("search", "-H", "ldap://x", "-w", "pw"))
        self.assertIn("-D needs a password", self.usage("whoami", "-H", "ldap://x", "-D", "cn=x"))
        self.assertIn("-D needs a password", self.usage("whoami", "-H", "ldap://x", "-D", "cn=x", "-w", ""))
        self.assertIn("one way", self.usage("whoami", "-H", "ldap://x", "-D", "cn=x", "-w", "a", "-y", "f"))
        self.assertIn("cannot read password file", self.usage("whoami", "-D", "cn=x", "-y", "/nonexistent/pw"))
        self.assertIn("bad filter", self.usage("search", "-H", "ldap://x", "(uid=x"))
        self.assertIn("--cacert and --insecure go with", self.usage("search", "--cacert", "ca.pem"))
        self.assertIn("only pr=", self.usage("search", "-E", "vlv=1"))
        self.assertIn("attr:value", self.usage("compare", "cn=x", "novalue"))


class HashTests(unittest.TestCase):
    def hash(self, stdin: str, *argv: str) -> str:
        a = args("hash", *argv)
        out = io.BytesIO()
        status = self.successResultOf(clientcli._hash(None, a, out, io.StringIO(), stdin=io.StringIO(stdin)))
        self.assertEqual(status, 0)
        return out.getvalue().decode()

    def test_sshaByDefault(self):
        line = self.hash("s3cret\n")
        self.assertTrue(line.startswith("{SSHA}") and line.endswith("\n"))
        self.assertTrue(verifyPassword("s3cret", line.strip()))
        self.assertFalse(verifyPassword("s3cret\n", line.strip()))

    def test_scrypt(self):
        line = self.hash("s3cret", "--scheme", "scrypt").strip()
        self.assertTrue(line.startswith("scrypt:"))
        self.assertTrue(verifyPassword("s3cret", line))

    def test_emptyRefused(self):
        a = args("hash")
        self.assertRaises(clientcli.UsageError, clientcli._hash, None, a, io.BytesIO(), io.StringIO(),
                          stdin=io.StringIO("\n"))


class AgainstInMemoryServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        root = yield inmemory.fromLDIFFile(io.BytesIO(exampleLDIF()))
        self.port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(_Factory(root))
        self.addCleanup(self.port.stopListening)
        self.url = f"ldap://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def run_(self, *argv: str):
        a = args(*argv)
        out, err = io.BytesIO(), io.StringIO()
        status = yield a.run(reactor, a, out, err)
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_searchLDIF(self):
        status, out, err = yield self.run_("search", "-x", "-H", self.url, "-b", f"ou=users,{SUFFIX}",
                                           "(uid=jo)", "cn", "description")
        self.assertEqual((status, err), (0, ""))
        self.assertIn(b"description:: ", out)  # non-ASCII and a trailing space
        self.assertEqual(parseLDIF(out), [(JO.encode(), {b"cn": [b"Jo Smith"],
                                                         b"description": ["d\u00e9j\u00e0 vu ".encode()]})])

    @defer.inlineCallbacks
    def test_searchJSON(self):
        status, out, err = yield self.run_("search", "-H", self.url, "-b", SUFFIX, "--json", "(cn=*)", "cn")
        self.assertEqual(status, 0, err)
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(sorted(r["attributes"]["cn"][0] for r in records), ["Al", "Jo Smith"])

    @defer.inlineCallbacks
    def test_bindAndBadPassword(self):
        status, out, err = yield self.run_("search", "-H", self.url, "-D", JO, "-w", "s3cret", "-b", JO, "-s",
                                           "base", "1.1")
        self.assertEqual((status, parseLDIF(out)), (0, [(JO.encode(), {})]), err)
        status, out, err = yield self.run_("search", "-H", self.url, "-D", JO, "-w", "nope", "-b", JO)
        self.assertEqual((status, out), (49, b""))
        self.assertEqual(err, f"netsvc ldap: bind as {JO} to {self.url}: Invalid credentials (49)\n")

    @defer.inlineCallbacks
    def test_noSuchObject(self):
        status, out, err = yield self.run_("search", "-H", self.url, "-b", f"ou=gone,{SUFFIX}")
        self.assertEqual(status, 32)
        self.assertTrue(err.startswith(f"netsvc ldap: search ou=gone,{SUFFIX} at {self.url}: No such object (32)"))

    @defer.inlineCallbacks
    def test_compare(self):
        status, out, _ = yield self.run_("compare", "-H", self.url, JO, "sn:Smith")
        self.assertEqual((status, out), (6, b"TRUE\n"))
        status, out, _ = yield self.run_("compare", "-H", self.url, JO, "sn:Jones")
        self.assertEqual((status, out), (5, b"FALSE\n"))

    @defer.inlineCallbacks
    def test_whoamiUnsupported(self):
        # ldaptor's server does not know RFC 4532: its protocolError (2) is the exit status.
        status, out, err = yield self.run_("whoami", "-H", self.url)
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith(f"netsvc ldap: whoami at {self.url}: Protocol error (2)"), err)

    @defer.inlineCallbacks
    def test_startTLSRefused(self):
        # ldaptor's server answers StartTLS with an error: never a fallback to clear text.
        status, out, err = yield self.run_("search", "-H", self.url, "-ZZ", "-b", SUFFIX)
        self.assertEqual((status, out), (1, b""))
        self.assertIn("the server refused StartTLS", err)

    @defer.inlineCallbacks
    def test_connectionRefused(self):
        yield self.port.stopListening()
        status, out, err = yield self.run_("search", "-H", self.url)
        self.assertEqual(status, 1)
        self.assertEqual(err, f"netsvc ldap: connect to {self.url}: connection refused\n")


class AgainstServicesLDAPTests(unittest.TestCase):
    """The commands against services.ldap (netsvc.ldap.server) in this process."""

    def daemon(self, tls: str = ""):
        from pathlib import Path

        from tests.helpers import port, startDaemon, stateDir

        example = Path(__file__).resolve().parents[2] / "etc" / "ldap" / "example.ldif"
        daemon = startDaemon(self, f"""{tls}
services:
  ldap:
    listen: ["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    suffix: {SUFFIX}
    ldif: ["{example}"]
""")
        self.url = f"ldap://127.0.0.1:{port(daemon, 0, 'ldap')}"
        self.ldapsURL = f"ldaps://127.0.0.1:{port(daemon, 1, 'ldap')}"
        self.cafile = str(stateDir(daemon) / "tls" / "selfsigned.pem")

    run_ = AgainstInMemoryServerTests.run_

    @defer.inlineCallbacks
    def test_pagedSearchOverStartTLS(self):
        self.daemon()
        status, everything, err = yield self.run_("search", "-H", self.url, "-b", SUFFIX, "1.1")
        self.assertEqual(status, 0, err)
        status, paged, err = yield self.run_("search", "-H", self.url, "-ZZ", "--cacert", self.cafile, "-b", SUFFIX,
                                             "-E", "pr=2/noprompt", "1.1")
        self.assertEqual(status, 0, err)
        self.assertGreater(len(parseLDIF(paged)), 4)
        self.assertEqual(parseLDIF(paged), parseLDIF(everything))

    @defer.inlineCallbacks
    def test_cacertFromTheEnvironment(self):
        self.daemon()
        self.patch(clientcli.os, "environ", {"LDAPTLS_CACERT": self.cafile})
        status, out, err = yield self.run_("whoami", "-H", self.url, "-ZZ")
        self.assertEqual((status, out), (0, b"anonymous\n"), err)
        status, out, err = yield self.run_("whoami", "-H", self.url)  # not used without TLS
        self.assertEqual(status, 0, err)

    @defer.inlineCallbacks
    def test_whoamiOverLDAPS(self):
        self.daemon()
        status, out, err = yield self.run_("whoami", "-H", self.ldapsURL, "--cacert", self.cafile, "-D",
                                           f"uid=alice,ou=users,{SUFFIX}", "-w", "alice-pw")
        self.assertEqual((status, out), (0, f"dn:uid=alice,ou=users,{SUFFIX}\n".encode()), err)

    @defer.inlineCallbacks
    def test_wrongNameRefused(self):
        self.daemon(tls='tls: {names: ["ldap.wrong.example"]}')
        for argv in (["search", "-H", self.url, "-ZZ"], ["whoami", "-H", self.ldapsURL]):
            status, out, err = yield self.run_(*argv, "--cacert", self.cafile)
            self.assertEqual((status, out), (1, b""), err)
            self.assertIn("the server's certificate is not valid for 127.0.0.1", err)
            self.assertEqual(err.count("\n"), 1)
