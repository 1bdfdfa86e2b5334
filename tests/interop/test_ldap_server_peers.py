"""
The LDAP directory service, run as the real daemon (C{twistd -n netsvc --config
...}) with the example directory (etc/ldap/example.ldif), exercised by clients
nobody here wrote: OpenLDAP's ldapsearch, ldapwhoami and ldapcompare (Debian
ldap-utils) and the Python ldap3 library.

Each test starts its own daemon (LDAP and LDAPS on port 0) and reads the ports
from status.json; the generated certificate (for 127.0.0.1) is the CA clients trust.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from tests.interop._daemon import IO_TIMEOUT, REPO, decoded, requirePeer, runToCompletion, startNetsvc

EXAMPLE = REPO / "etc" / "ldap" / "example.ldif"
USERS = "ou=users,dc=example,dc=com"
ALICE = "uid=alice,ou=users,dc=example,dc=com"
CAROL = "uid=carol,ou=users,dc=example,dc=com"


def startLDAP(testCase, extra: str = "") -> tuple:
    """The daemon with a copy of the example directory: (daemon, ldif path, ldap URL, ldaps URL)."""
    requirePeer("ldapsearch", "ldap-utils")
    base = Path(testCase.mktemp()).resolve()
    base.mkdir(parents=True)
    ldif = base / "example.ldif"
    shutil.copy(EXAMPLE, ldif)
    config = base / "netsvc.yaml"
    config.write_text(
        "state_dir: state\ndrain_timeout: 1s\nservices:\n  ldap:\n"
        "    listen: ['tcp:0:interface=127.0.0.1', 'tls:0:interface=127.0.0.1']\n"
        "    suffix: dc=example,dc=com\n    ldif: [example.ldif]\n"
        "    failed_binds: {rate: 0.1, burst: 3}\n" + extra)
    daemon = startNetsvc(testCase, config, base / "state")
    return (daemon, ldif, f"ldap://127.0.0.1:{daemon.port('services.ldap.listen[0]')}",
            f"ldaps://127.0.0.1:{daemon.port('services.ldap.listen[1]')}")


class LDAPDaemonTestCase(unittest.TestCase):
    """
    Each test gets its own daemon, stopped by its cleanup.  (Not one per class: trial
    26 never calls setUpClass/tearDownClass -- its TestSuite.run does not run class
    fixtures -- so a class-wide daemon would outlive its class; and tests sharing one
    would share its failed-bind counters.)
    """

    def setUp(self) -> None:
        self.daemon, self.ldif, self.url, self.ldapsURL = startLDAP(self)

    def tool(self, *command: str, cacert: bool = True):
        """Run an ldap-utils command (trusting the daemon's certificate); (exit status, output)."""
        env = ["env", f"LDAPTLS_CACERT={self.daemon.cafile}" if cacert else "LDAPTLS_CACERT=",
               "LDAPTLS_REQCERT=demand"]
        result = runToCompletion(self, [*env, *command, "-o", "nettimeout=10"], timeout=IO_TIMEOUT + 5)
        return result.returncode, decoded(result)


class OpenLDAPToolsTests(LDAPDaemonTestCase):
    def test_readmeSearch(self):
        """The README's command: the users with their sn."""
        status, out = self.tool("ldapsearch", "-x", "-LLL", "-H", self.url, "-b", USERS, "(objectclass=person)", "sn")
        self.assertEqual(status, 0, out)
        self.assertIn(f"dn: {ALICE}\nsn: Liddell\n", out)
        self.assertEqual(out.count("sn: "), 4)
        self.assertNotIn("userPassword", out)

    def test_childrenScopeAndPasswordProbes(self):
        """
        -s children (slapd's subordinate scope) from ldapsearch and netsvc ldap; a filter on
        userPassword finds nothing for anyone but the entry itself (the hash cannot be probed).
        """
        search = ["-H", self.url, "-s", "children", "-b", "dc=example,dc=com", "(objectClass=organizationalUnit)",
                  "1.1"]
        status, out = self.tool("ldapsearch", "-x", "-LLL", *search)
        self.assertEqual((status, out.split()), (0, ["dn:", USERS, "dn:", "ou=groups,dc=example,dc=com"]))
        result = runToCompletion(self, [sys.executable, "-m", "netsvc", "ldap", "search", *search])
        self.assertEqual((result.returncode, result.stdout.decode().split()),
                         (0, ["dn:", USERS, "dn:", "ou=groups,dc=example,dc=com"]), decoded(result))
        probe = ["ldapsearch", "-x", "-LLL", "-H", self.url, "-b", USERS, "(userPassword={SSHA}4*)", "1.1"]
        self.assertEqual(self.tool(*probe), (0, ""))
        status, out = self.tool(*probe[:5], "-D", ALICE, "-w", "alice-pw", *probe[5:])
        self.assertEqual((status, out.strip()), (0, f"dn: {ALICE}"))

    def test_netsvcLDIFIsLdapsearchs(self):
        """
        netsvc ldap search prints what ldapsearch -LLL prints, byte for byte: folding at the
        same width (and -o ldif-wrap=N), userPassword in base64, the subschema's long values.
        """
        searches = [["-D", ALICE, "-w", "alice-pw", "-b", "dc=example,dc=com", "(objectClass=*)", "*", "+"],
                    ["-b", "cn=subschema", "-s", "base", "(objectClass=*)", "+"],
                    ["-o", "ldif-wrap=40", "-b", "cn=subschema", "-s", "base", "(objectClass=*)", "+"],
                    ["-o", "ldif-wrap=no", "-b", "", "-s", "base", "(objectClass=*)", "*", "+"]]
        for search in searches:
            theirs = runToCompletion(self, ["ldapsearch", "-x", "-LLL", "-H", self.url, *search])
            ours = runToCompletion(self, [sys.executable, "-m", "netsvc", "ldap", "search", "-H", self.url, *search])
            self.assertEqual((theirs.returncode, ours.returncode), (0, 0), decoded(ours))
            self.assertGreater(len(theirs.stdout), 300)
            self.assertEqual(ours.stdout.decode(), theirs.stdout.decode(), search)

    def test_binds(self):
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url, "-D", ALICE, "-w", "alice-pw")
        self.assertEqual((status, out.strip()), (0, f"dn:{ALICE}"))
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url)
        self.assertEqual((status, out.strip()), (0, "anonymous"))
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url, "-D", ALICE, "-w", "wrong")
        self.assertEqual(status, 49, out)
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url, "-D", ALICE, "-w", "")
        self.assertEqual(status, 53, out)
        self.assertIn("unauthenticated bind", out)
        # her own userPassword, only when bound as her
        status, out = self.tool("ldapsearch", "-x", "-LLL", "-H", self.url, "-D", ALICE, "-w", "alice-pw",
                                "-b", USERS, "(uid=*)", "userPassword")
        self.assertEqual(status, 0, out)
        self.assertEqual(out.count("userPassword::"), 1, out)

    def test_startTLSAndLDAPS(self):
        """-ZZ (StartTLS required) and ldaps://, verified against the daemon's certificate; crypt and scrypt."""
        status, out = self.tool("ldapwhoami", "-x", "-ZZ", "-H", self.url, "-D", CAROL, "-w", "carol-pw")
        self.assertEqual((status, out.strip()), (0, f"dn:{CAROL}"))
        status, out = self.tool("ldapsearch", "-x", "-LLL", "-H", self.ldapsURL, "-D",
                                "uid=dave,ou=users,dc=example,dc=com", "-w", "dave-pw", "-b", USERS, "(uid=dave)",
                                "mail")
        self.assertEqual(status, 0, out)
        self.assertIn("mail: dave@example.com", out)
        # without the CA, verification fails: no connection
        status, out = self.tool("ldapwhoami", "-x", "-ZZ", "-H", self.url, cacert=False)
        self.assertNotEqual(status, 0, out)

    def test_pagingAndLimits(self):
        status, out = self.tool("ldapsearch", "-x", "-H", self.url, "-b", "dc=example,dc=com",
                                "-E", "pr=2/noprompt", "(objectClass=*)", "1.1")
        self.assertEqual(status, 0, out)
        self.assertEqual(out.count("\ndn: "), 10, out)
        self.assertEqual(out.count("pagedresults: cookie="), 5, out)
        status, out = self.tool("ldapsearch", "-x", "-H", self.url, "-b", "dc=example,dc=com", "-z", "3",
                                "(objectClass=*)", "1.1")
        self.assertEqual(status, 4, out)
        self.assertIn("Size limit exceeded", out)
        self.assertEqual(out.count("\ndn: "), 3)

    def test_rootDSEAndSchema(self):
        status, out = self.tool("ldapsearch", "-x", "-LLL", "-H", self.url, "-b", "", "-s", "base", "+")
        self.assertEqual(status, 0, out)
        self.assertIn("namingContexts: dc=example,dc=com", out)
        self.assertIn("supportedExtension: 1.3.6.1.4.1.1466.20037", out)
        self.assertIn("supportedControl: 1.2.840.113556.1.4.319", out)
        status, out = self.tool("ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", self.url, "-b", "cn=Subschema",
                                "-s", "base", "(objectClass=subschema)", "objectClasses", "attributeTypes")
        self.assertEqual(status, 0, out)
        self.assertIn("NAME 'inetOrgPerson' SUP organizationalPerson STRUCTURAL", out)
        status, out = self.tool("ldapcompare", "-x", "-H", self.url, "uid=bob,ou=users,dc=example,dc=com",
                                "title:OPERATOR")
        self.assertEqual((status, out.strip()), (6, "TRUE"))

    def test_badInputClosesOnlyThatConnection(self):
        host, port = "127.0.0.1", self.daemon.port("services.ldap.listen[0]")
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as bad:
            bad.sendall(b"\x30\x84\x80\x00\x00\x00\x02\x01\x01")  # a 2 GiB message, announced
            notice = bad.recv(200)
            self.assertIn(b"1.3.6.1.4.1.1466.20036", notice)  # Notice of Disconnection
            self.assertEqual(bad.recv(200), b"")  # then closed
        status, out = self.tool("ldapsearch", "-x", "-LLL", "-H", self.url, "-b", USERS, "(uid=bob)", "1.1")
        self.assertEqual((status, out.strip()), (0, "dn: uid=bob,ou=users,dc=example,dc=com"))


class ReloadTests(LDAPDaemonTestCase):
    def test_reloadOnSIGHUP(self):
        self.ldif.write_text(EXAMPLE.read_text().replace("sn: Builder", "sn: Rebuilt"))
        self.daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            status, out = self.tool("ldapsearch", "-x", "-LLL", "-H", self.url, "-b", USERS, "(uid=bob)", "sn")
            if "sn: Rebuilt" in out or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertIn("sn: Rebuilt", out)


class WritableTests(LDAPDaemonTestCase):
    def setUp(self) -> None:
        self.daemon, self.ldif, self.url, self.ldapsURL = startLDAP(
            self, "    writable: true\n    writers: ['cn=admins,ou=groups,dc=example,dc=com']\n")

    def tool(self, *command: str, input: bytes = b"", **kwargs):
        result = runToCompletion(self, [*command, "-o", "nettimeout=10"], timeout=IO_TIMEOUT + 5, input=input)
        return result.returncode, decoded(result)

    def test_ldapmodifyAndFriends(self):
        """ldapadd, ldapmodify, ldapmodrdn, ldapdelete as alice (cn=admins); saved in the file; bob may not."""
        alice = ["-x", "-H", self.url, "-D", ALICE, "-w", "alice-pw"]
        status, out = self.tool("ldapadd", *alice, input=b"dn: uid=eve,ou=users,dc=example,dc=com\n"
                                b"objectClass: inetOrgPerson\ncn: Eve\nsn: Dropper\nuserPassword: eve-pw\n")
        self.assertEqual(status, 0, out)
        status, out = self.tool("ldapmodify", *alice, input=b"dn: uid=eve,ou=users,dc=example,dc=com\n"
                                b"changetype: modify\nreplace: sn\nsn: Eavesdropper\n-\nadd: mail\n"
                                b"mail: eve@example.com\n")
        self.assertEqual(status, 0, out)
        status, out = self.tool("ldapmodrdn", *alice, "-r", "uid=eve,ou=users,dc=example,dc=com", "uid=eva")
        self.assertEqual(status, 0, out)
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url, "-D", "uid=eva,ou=users,dc=example,dc=com",
                                "-w", "eve-pw")
        self.assertEqual((status, out.strip()), (0, "dn:uid=eva,ou=users,dc=example,dc=com"))
        saved = self.ldif.read_text()
        self.assertIn("dn: uid=eva,ou=users,dc=example,dc=com\n", saved)
        self.assertIn("sn: Eavesdropper\n", saved)
        status, out = self.tool("ldapdelete", "-x", "-H", self.url, "-D", "uid=bob,ou=users,dc=example,dc=com",
                                "-w", "bob-pw", "uid=eva,ou=users,dc=example,dc=com")
        self.assertEqual(status, 50, out)
        status, out = self.tool("ldapdelete", *alice, "uid=eva,ou=users,dc=example,dc=com")
        self.assertEqual(status, 0, out)
        self.assertNotIn("eva", self.ldif.read_text())
        status, out = self.tool("ldapdelete", *alice, USERS)
        self.assertEqual(status, 66, out)

    def test_ldappasswd(self):
        """RFC 3062: bob changes his own password; alice (a writer) has one generated for carol."""
        bob = "uid=bob,ou=users,dc=example,dc=com"
        status, out = self.tool("ldappasswd", "-x", "-H", self.url, "-D", bob, "-w", "bob-pw", "-a", "bob-pw",
                                "-s", "bob-new")
        self.assertEqual(status, 0, out)
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url, "-D", bob, "-w", "bob-new")
        self.assertEqual((status, out.strip()), (0, f"dn:{bob}"))
        status, out = self.tool("ldappasswd", "-x", "-H", self.url, "-D", ALICE, "-w", "alice-pw", CAROL)
        self.assertEqual(status, 0, out)
        self.assertIn("New password: ", out)
        generated = out.split("New password: ", 1)[1].split()[0]
        status, out = self.tool("ldapwhoami", "-x", "-H", self.url, "-D", CAROL, "-w", generated)
        self.assertEqual((status, out.strip()), (0, f"dn:{CAROL}"))
        status, out = self.tool("ldappasswd", "-x", "-H", self.url, "-D", bob, "-w", "bob-new", "-s", "x", ALICE)
        self.assertEqual(status, 1, out)  # (ldappasswd exits 1, not with the result code)
        self.assertIn("Insufficient access (50)", out)


class Ldap3Tests(LDAPDaemonTestCase):
    def test_ldap3(self):
        import ssl

        import ldap3

        tls = ldap3.Tls(ca_certs_file=self.daemon.cafile, validate=ssl.CERT_REQUIRED)
        server = ldap3.Server(self.url, tls=tls, get_info=ldap3.ALL, connect_timeout=int(IO_TIMEOUT))
        conn = ldap3.Connection(server, CAROL, "carol-pw", receive_timeout=int(IO_TIMEOUT))
        try:
            self.assertTrue(conn.start_tls())
            self.assertTrue(conn.bind(), conn.result)
            self.assertEqual(conn.extend.standard.who_am_i(), f"dn:{CAROL}")
            found = conn.extend.standard.paged_search("dc=example,dc=com", "(objectClass=inetOrgPerson)",
                                                      attributes=["cn", "mail"], paged_size=2, generator=False)
            self.assertEqual(sorted(e["attributes"]["mail"][0] for e in found),
                             [f"{u}@example.com" for u in ("alice", "bob", "carol", "dave")])
            self.assertIn("inetOrgPerson", server.schema.object_classes)
            self.assertEqual(server.info.naming_contexts, ["dc=example,dc=com"])
            self.assertTrue(conn.compare("uid=bob,ou=users,dc=example,dc=com", "mail", "BOB@example.com"))
            self.assertFalse(conn.add("uid=eve,ou=users,dc=example,dc=com", "inetOrgPerson",
                                      {"cn": "Eve", "sn": "E"}))
            self.assertEqual(conn.result["result"], 53)
        finally:
            conn.unbind()


class ConfigErrorTests(unittest.TestCase):
    def test_badLDIF(self):
        """check-config and twistd report an LDIF problem with its file and line, no traceback."""
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        (base / "bad.ldif").write_text("dn: dc=example,dc=com\nobjectClass: domain\n\ndn: dc=other,dc=org\n"
                                       "objectClass: domain\n")
        config = base / "netsvc.yaml"
        config.write_text("services:\n  ldap:\n    listen: ['tcp:0:interface=127.0.0.1']\n    ldif: [bad.ldif]\n")
        expected = "line 4: entry 'dc=other,dc=org' is outside the suffix 'dc=example,dc=com'"
        import sys

        result = runToCompletion(self, [sys.executable, "-m", "netsvc", "check-config", str(config)])
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{base / 'bad.ldif'}: {expected}", decoded(result))
        twistd = str(Path(sys.executable).with_name("twistd"))
        result = runToCompletion(self, [twistd, "-n", "--pidfile=", "netsvc", "--config", str(config),
                                        "--state-dir", str(base / "state")])
        self.assertEqual(result.returncode, 1)
        self.assertIn(expected, decoded(result))
        self.assertNotIn("Traceback", decoded(result))
