"""
C{netsvc ldap} against a real OpenLDAP slapd started here in a temporary folder
(tests/interop/_slapd.py) -- the real command, run as a user runs it, for the
main paths; the same argument parsing and code in this process for the others
(a command start costs seconds on a busy machine): anonymous and
simple-bind searches whose LDIF parses to what OpenLDAP's own ldapsearch prints,
StartTLS verified (and refused for a certificate made for another name, or not
trusted), LDAPS, paged results continued past the server's size limit, the exit
codes of ldapsearch/ldapcompare (49, 32, 4, 6, 5), whoami, --json.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.interop._daemon import REPO, decoded, runToCompletion, startNetsvc
from tests.interop._slapd import ADMIN_DN, ADMIN_PASSWORD, SUFFIX, USERS, startSlapd
from tests.ldap.test_ldifout import parseLDIF

USER1 = f"uid=user1,ou=users,{SUFFIX}"
#: Entries in the example directory: the suffix, two ous, the users, zoe, one group.
ALL = 3 + USERS + 1 + 1


def netsvcLDAP(testCase, *args: str, input: bytes = b""):
    """C{python -m netsvc ldap ARGS...} in a child process."""
    return runToCompletion(testCase, [sys.executable, "-m", "netsvc", "ldap", *args], input=input)


class Result(NamedTuple):
    returncode: int
    stdout: bytes
    stderr: bytes


@defer.inlineCallbacks
def inProcess(*args: str):
    """C{netsvc ldap ARGS...} parsed and run here (the command's code, without a process start)."""
    from netsvc import cli

    parsed = cli.parser().parse_args(["ldap", *args])
    out, err = io.BytesIO(), io.StringIO()
    status = yield parsed.run(reactor, parsed, out, err)
    return Result(status, out.getvalue(), err.getvalue().encode())


class SearchAgainstSlapdTests(unittest.TestCase):
    def setUp(self):
        self.slapd = startSlapd(self)

    def search(self, *args: str):
        return netsvcLDAP(self, "search", "-x", "-H", self.slapd.url, *args)

    def searchHere(self, *args: str):
        return inProcess("search", "-x", "-H", self.slapd.url, *args)

    def test_sameEntriesAsLdapsearch(self):
        ldapsearch = shutil.which("ldapsearch")
        if ldapsearch is None:
            raise unittest.SkipTest("ldapsearch not found: install with scripts/install-test-peers (ldap-utils)")
        mine = self.search("-D", ADMIN_DN, "-w", ADMIN_PASSWORD, "-b", SUFFIX, "(objectClass=*)")
        self.assertEqual(mine.returncode, 0, decoded(mine))
        theirs = runToCompletion(self, [ldapsearch, "-x", "-LLL", "-H", self.slapd.url, "-D", ADMIN_DN,
                                        "-w", ADMIN_PASSWORD, "-b", SUFFIX, "(objectClass=*)"])
        self.assertEqual(theirs.returncode, 0, decoded(theirs))
        self.assertEqual(len(parseLDIF(mine.stdout)), ALL)
        self.assertEqual(parseLDIF(mine.stdout), parseLDIF(theirs.stdout))
        # Values that must be base64: non-ASCII cn, a leading space; long ones folded at 78, as ldapsearch.
        self.assertIn(b"cn:: " + __import__("base64").b64encode("Zo\u00eb \u00c4rger".encode()), mine.stdout)
        self.assertIn(b"sn:: IHNwYWNlZA==", mine.stdout)
        self.assertTrue(all(len(line) <= 78 for line in mine.stdout.split(b"\n")))
        self.assertEqual(mine.stdout.decode(), theirs.stdout.decode())  # byte for byte, userPassword in base64

    @defer.inlineCallbacks
    def test_filterAndAttributes(self):
        result = yield self.searchHere("-b", f"ou=users,{SUFFIX}", "(&(objectClass=person)(uid=user1*))", "sn", "mail")
        self.assertEqual(result.returncode, 0, decoded(result))
        entries = dict(parseLDIF(result.stdout))
        self.assertEqual(sorted(entries), sorted(f"uid=user{n},ou=users,{SUFFIX}".encode()
                                                 for n in range(1, USERS + 1) if str(n).startswith("1")))
        self.assertEqual(entries[USER1.encode()], {b"sn": [b"Number1"], b"mail": [b"user1@example.com"]})

    @defer.inlineCallbacks
    def test_scopes(self):
        counts = {}
        for scope in ("base", "one", "sub"):
            result = yield self.searchHere("-D", ADMIN_DN, "-w", ADMIN_PASSWORD, "-b", f"ou=users,{SUFFIX}",
                                           "-s", scope, "1.1")
            self.assertEqual(result.returncode, 0, decoded(result))
            counts[scope] = len(parseLDIF(result.stdout))
        self.assertEqual(counts, {"base": 1, "one": USERS + 1, "sub": USERS + 2})

    @defer.inlineCallbacks
    def test_simpleBindSeesOwnPassword(self):
        # slapd's ACL: userPassword readable by self only.
        anonymous = yield self.searchHere("-b", SUFFIX, "(uid=user1)", "userPassword")
        bound = yield self.searchHere("-D", USER1, "-w", "pw-user1", "-b", SUFFIX, "(uid=user1)", "userPassword")
        self.assertEqual((anonymous.returncode, bound.returncode), (0, 0), decoded(bound))
        self.assertNotIn(b"userPassword", anonymous.stdout)
        self.assertIn(b"userPassword:: ", bound.stdout)  # always base64, as ldapsearch prints it
        ((_, attributes),) = parseLDIF(bound.stdout)
        self.assertTrue(attributes[b"userPassword"][0].startswith(b"{SSHA}"), attributes)

    def test_passwordFile(self):
        pwfile = Path(self.mktemp()).resolve()
        pwfile.write_text("pw-user1\n")
        result = netsvcLDAP(self, "whoami", "-H", self.slapd.url, "-D", USER1, "-y", str(pwfile))
        self.assertEqual((result.returncode, result.stdout), (0, f"dn:{USER1}\n".encode()), decoded(result))

    def test_badPasswordExits49(self):
        result = self.search("-D", USER1, "-w", "wrong", "-b", SUFFIX)
        self.assertEqual(result.returncode, 49)
        self.assertEqual(result.stdout, b"")
        self.assertEqual(result.stderr.decode(),
                         f"netsvc ldap: bind as {USER1} to {self.slapd.url}: Invalid credentials (49)\n")

    @defer.inlineCallbacks
    def test_noSuchObjectExits32(self):
        result = yield self.searchHere("-b", f"ou=nowhere,{SUFFIX}")
        self.assertEqual(result.returncode, 32, decoded(result))
        self.assertIn(b"No such object (32)", result.stderr)

    @defer.inlineCallbacks
    def test_sizeLimitExits4WithTheEntries(self):
        result = yield self.searchHere("-b", f"ou=users,{SUFFIX}", "-z", "3", "(uid=*)", "1.1")
        self.assertEqual(result.returncode, 4, decoded(result))
        self.assertEqual(len(parseLDIF(result.stdout)), 3)

    def test_pagingGoesPastTheServerLimit(self):
        # slapd is configured with an anonymous size limit of 10 and no limit for paged searches.
        unpaged = self.search("-b", SUFFIX, "1.1")
        self.assertEqual(unpaged.returncode, 4, decoded(unpaged))
        self.assertEqual(len(parseLDIF(unpaged.stdout)), 10)
        for paging in (["-E", "pr=4/noprompt"], ["--page-size", "3"]):
            paged = self.search("-b", SUFFIX, *paging, "1.1")
            self.assertEqual(paged.returncode, 0, decoded(paged))
            self.assertEqual(len(parseLDIF(paged.stdout)), ALL)

    @defer.inlineCallbacks
    def test_json(self):
        result = yield self.searchHere("-b", f"ou=users,{SUFFIX}", "--json", "(uid=zoe)", "cn", "sn")
        self.assertEqual(result.returncode, 0, decoded(result))
        [record] = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual(record, {"dn": f"uid=zoe,ou=users,{SUFFIX}",
                                  "attributes": {"cn": ["Zo\u00eb \u00c4rger"], "sn": [" spaced"]}})

    @defer.inlineCallbacks
    def test_compareAndWhoami(self):
        yes = yield inProcess("compare", "-H", self.slapd.url, USER1, "sn:Number1")
        no = yield inProcess("compare", "-H", self.slapd.url, USER1, "sn:Number2")
        self.assertEqual((yes.returncode, yes.stdout, no.returncode, no.stdout), (6, b"TRUE\n", 5, b"FALSE\n"))
        anonymous = yield inProcess("whoami", "-H", self.slapd.url)
        self.assertEqual((anonymous.returncode, anonymous.stdout), (0, b"anonymous\n"))

    @defer.inlineCallbacks
    def test_connectionRefusedExits1(self):
        self.slapd.stop()
        result = yield self.searchHere("-b", SUFFIX)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode(), f"netsvc ldap: connect to {self.slapd.url}: connection refused\n")


class TLSAgainstSlapdTests(unittest.TestCase):
    def test_startTLSVerified(self):
        slapd = startSlapd(self)
        result = netsvcLDAP(self, "whoami", "-H", slapd.url, "-ZZ", "--cacert", slapd.cafile, "-D", USER1,
                            "-w", "pw-user1")
        self.assertEqual((result.returncode, result.stdout), (0, f"dn:{USER1}\n".encode()), decoded(result))
        search = netsvcLDAP(self, "search", "-H", slapd.url, "-ZZ", "--cacert", slapd.cafile, "-b", SUFFIX,
                            "-E", "pr=5/noprompt", "1.1")
        self.assertEqual(search.returncode, 0, decoded(search))
        self.assertEqual(len(parseLDIF(search.stdout)), ALL)

    @defer.inlineCallbacks
    def test_ldapsVerified(self):
        slapd = startSlapd(self)
        result = yield inProcess("search", "-H", slapd.ldapsURL, "--cacert", slapd.cafile, "-b", SUFFIX,
                                 "(uid=user2)", "cn")
        self.assertEqual(result.returncode, 0, decoded(result))
        self.assertEqual(parseLDIF(result.stdout), [(f"uid=user2,ou=users,{SUFFIX}".encode(), {b"cn": [b"User 2"]})])

    def test_startTLSWrongNameRefused(self):
        slapd = startSlapd(self, names=("ldap.wrong.example",))
        result = netsvcLDAP(self, "search", "-H", slapd.url, "-ZZ", "--cacert", slapd.cafile, "-b", SUFFIX)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, b"")
        self.assertEqual(result.stderr.decode(), f"netsvc ldap: StartTLS with {slapd.url}: "
                                                 "the server's certificate is not valid for 127.0.0.1\n")

    @defer.inlineCallbacks
    def test_ldapsWrongNameRefused(self):
        slapd = startSlapd(self, names=("ldap.wrong.example",))
        result = yield inProcess("whoami", "-H", slapd.ldapsURL, "--cacert", slapd.cafile)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"not valid for 127.0.0.1", result.stderr)

    @defer.inlineCallbacks
    def test_untrustedCertificateRefused(self):
        slapd = startSlapd(self)
        result = yield inProcess("search", "-H", slapd.url, "-ZZ", "-D", USER1, "-w", "pw-user1", "-b", SUFFIX)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"certificate verify failed", result.stderr)
        self.assertEqual(result.stdout, b"")


class AgainstServicesLDAPTests(unittest.TestCase):
    """netsvc ldap against netsvc's own directory (twistd -n netsvc, etc/ldap/example.ldif)."""

    def setUp(self):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        config = folder / "netsvc.yaml"
        config.write_text(f"""
services:
  ldap:
    listen: ["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
    suffix: dc=example,dc=com
    ldif: ["{REPO / 'etc' / 'ldap' / 'example.ldif'}"]
""")
        self.daemon = startNetsvc(self, config, folder / "state")
        self.url = f"ldap://127.0.0.1:{self.daemon.port('services.ldap.listen[0]')}"
        self.ldapsURL = f"ldaps://127.0.0.1:{self.daemon.port('services.ldap.listen[1]')}"

    @defer.inlineCallbacks
    def test_commands(self):
        people = netsvcLDAP(self, "search", "-x", "-H", self.url, "-b", f"ou=users,{SUFFIX}", "(objectclass=person)",
                            "sn")
        self.assertEqual(people.returncode, 0, decoded(people))
        self.assertIn((f"uid=alice,ou=users,{SUFFIX}".encode(), {b"sn": [b"Liddell"]}), parseLDIF(people.stdout))
        everything = yield inProcess("search", "-H", self.url, "-b", SUFFIX, "1.1")
        paged = yield inProcess("search", "-H", self.url, "-ZZ", "--cacert", self.daemon.cafile, "-D",
                                f"uid=alice,ou=users,{SUFFIX}", "-w", "alice-pw", "-b", SUFFIX, "-E", "pr=2/noprompt",
                                "1.1")
        self.assertEqual((everything.returncode, paged.returncode), (0, 0), decoded(paged))
        self.assertGreater(len(parseLDIF(paged.stdout)), 2)
        self.assertEqual(parseLDIF(paged.stdout), parseLDIF(everything.stdout))
        # One daemon start is slow on a shared machine: the other commands go on against it here.
        me = yield inProcess("whoami", "-H", self.ldapsURL, "--cacert", self.daemon.cafile, "-D",
                             f"uid=bob,ou=users,{SUFFIX}", "-w", "bob-pw")
        self.assertEqual((me.returncode, me.stdout), (0, f"dn:uid=bob,ou=users,{SUFFIX}\n".encode()), decoded(me))
        bad = yield inProcess("whoami", "-H", self.url, "-D", f"uid=bob,ou=users,{SUFFIX}", "-w", "wrong")
        self.assertEqual(bad.returncode, 49, decoded(bad))
        yes = yield inProcess("compare", "-H", self.url, f"uid=alice,ou=users,{SUFFIX}", "sn:liddell")
        self.assertEqual((yes.returncode, yes.stdout), (6, b"TRUE\n"), decoded(yes))
        limited = yield inProcess("search", "-H", self.url, "-b", SUFFIX, "-z", "2", "1.1")
        self.assertEqual(limited.returncode, 4, decoded(limited))
        self.assertEqual(len(parseLDIF(limited.stdout)), 2)
