"""
netsvc.ldap.client: the connection over a StringTransport and a memory clock
(requests on the wire, paging, timeouts, disconnection notices, StartTLS
refusal), and the filter parser.
"""

from __future__ import annotations

import io

from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from netsvc.ldap import client
from netsvc.ldap.filtertext import FilterError, parseFilter


def decode(data: bytes) -> list:
    """The LDAP messages in C{data} (what the client wrote)."""
    messages = []
    while data:
        message, used = pureber.berDecodeObject(LDAPClient.berdecoder, data)
        messages.append(message)
        data = data[used:]
    return messages


class Wire:
    """A client connection on a StringTransport: read what it sent, answer as a server."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.clock = MemoryReactorClock()
        self.transport = StringTransport()
        self.conn = client.LDAPConnection(self.clock, timeout)
        self.conn.makeConnection(self.transport)

    def sent(self) -> list:
        messages = decode(self.transport.value())
        self.transport.clear()
        return messages

    def answer(self, messageId: int, op, controls=None) -> None:
        self.conn.dataReceived(pureldap.LDAPMessage(op, id=messageId, controls=controls).toWire())


def entry(dn: str, **attributes) -> pureldap.LDAPSearchResultEntry:
    return pureldap.LDAPSearchResultEntry(dn.encode(), [(k.encode(), v) for k, v in attributes.items()])


def pagedResponse(cookie: bytes) -> list:
    value = pureber.BERSequence([pureber.BERInteger(0), pureber.BEROctetString(cookie)]).toWire()
    return [(client.PAGED_RESULTS, None, value)]


class URLTests(unittest.TestCase):
    def test_defaults(self):
        self.assertEqual(client.parseURL("ldap://example.com"), client.LDAPURL(False, "example.com", 389))
        self.assertEqual(client.parseURL("LDAPS://example.com"), client.LDAPURL(True, "example.com", 636))

    def test_portAndDN(self):
        url = client.parseURL("ldap://127.0.0.1:3389/dc=example,dc=com")
        self.assertEqual((url.host, url.port, url.dn), ("127.0.0.1", 3389, "dc=example,dc=com"))
        self.assertEqual(str(url), "ldap://127.0.0.1:3389")

    def test_ipv6(self):
        url = client.parseURL("ldap://[::1]:3389")
        self.assertEqual((url.host, url.port, str(url)), ("::1", 3389, "ldap://[::1]:3389"))

    def test_bad(self):
        for text in ("http://x", "x:389", "ldap://x:99999", "ldap://x:port"):
            self.assertRaises(ValueError, client.parseURL, text)


class RequestTests(unittest.TestCase):
    def test_bindSuccess(self):
        wire = Wire()
        d = wire.conn.bind("uid=jo,dc=example,dc=com", "s3cret")
        [message] = wire.sent()
        self.assertIsInstance(message.value, pureldap.LDAPBindRequest)
        self.assertEqual((message.value.dn, message.value.auth), (b"uid=jo,dc=example,dc=com", b"s3cret"))
        wire.answer(message.id, pureldap.LDAPBindResponse(resultCode=0))
        self.successResultOf(d)

    def test_bindInvalidCredentials(self):
        wire = Wire()
        d = wire.conn.bind("uid=jo,dc=example,dc=com", "wrong")
        [message] = wire.sent()
        wire.answer(message.id, pureldap.LDAPBindResponse(resultCode=49, errorMessage=b"bad"))
        e = self.failureResultOf(d, client.LDAPError).value
        self.assertEqual(e.resultCode, 49)
        self.assertEqual(str(e), "Invalid credentials (49): bad")

    def test_searchRequestOnTheWire(self):
        wire = Wire()
        seen = []
        d = wire.conn.search("dc=example,dc=com", client.SCOPES["one"], parseFilter("(uid=jo)"), ["cn", "+"],
                             onEntry=lambda dn, attrs: seen.append((dn, attrs)), sizeLimit=7, timeLimit=3,
                             typesOnly=True, derefAliases=client.DEREF["always"])
        [message] = wire.sent()
        request = message.value
        self.assertEqual(request.derefAliases, 3)
        self.assertEqual((request.baseObject, request.scope, request.sizeLimit, request.timeLimit, request.typesOnly),
                         (b"dc=example,dc=com", 1, 7, 3, 255))  # BER TRUE
        self.assertEqual(request.attributes, [b"cn", b"+"])
        self.assertIsNone(message.controls)
        wire.answer(message.id, entry("uid=jo,dc=example,dc=com", cn=[b"Jo"]))
        wire.answer(message.id, pureldap.LDAPSearchResultDone(resultCode=0))
        done = self.successResultOf(d)
        self.assertEqual((done.resultCode, done.entries, done.pages), (0, 1, 1))
        self.assertEqual(seen, [("uid=jo,dc=example,dc=com", [("cn", [b"Jo"])])])

    def test_searchSizeLimitExceededStillDelivers(self):
        wire = Wire()
        seen = []
        d = wire.conn.search("", 2, parseFilter("(cn=*)"), onEntry=lambda dn, attrs: seen.append(dn), sizeLimit=1)
        [message] = wire.sent()
        wire.answer(message.id, entry("cn=a"))
        wire.answer(message.id, pureldap.LDAPSearchResultDone(resultCode=4))
        done = self.successResultOf(d)
        self.assertEqual((done.resultCode, seen), (4, ["cn=a"]))
        self.assertEqual(done.error().resultCode, 4)

    def test_pagedSearchFollowsCookies(self):
        wire = Wire()
        seen = []
        d = wire.conn.search("dc=x", 2, parseFilter("(cn=*)"), onEntry=lambda dn, attrs: seen.append(dn),
                             pageSize=2)
        cookies = [b"one", b"two", b""]
        sentCookies = []
        for n, cookie in enumerate(cookies):
            [message] = wire.sent()
            [(oid, critical, value)] = message.controls
            self.assertEqual((oid, critical), (client.PAGED_RESULTS, False))
            decoded, _ = pureber.berDecodeObject(pureber.BERDecoderContext(), value)
            self.assertEqual(decoded.data[0].value, 2)
            sentCookies.append(decoded.data[1].value)
            wire.answer(message.id, entry(f"cn=e{n}a"))
            wire.answer(message.id, entry(f"cn=e{n}b"))
            wire.answer(message.id, pureldap.LDAPSearchResultDone(resultCode=0), pagedResponse(cookie))
        done = self.successResultOf(d)
        self.assertEqual(sentCookies, [b"", b"one", b"two"])
        self.assertEqual((done.entries, done.pages, len(seen)), (6, 3, 6))

    def test_pagedSearchIgnoredByServer(self):
        # A server without paging support answers everything at once, without the control.
        wire = Wire()
        d = wire.conn.search("dc=x", 2, parseFilter("(cn=*)"), pageSize=2)
        [message] = wire.sent()
        for n in range(5):
            wire.answer(message.id, entry(f"cn=e{n}"))
        wire.answer(message.id, pureldap.LDAPSearchResultDone(resultCode=0))
        done = self.successResultOf(d)
        self.assertEqual((done.entries, done.pages), (5, 1))
        self.assertEqual(wire.sent(), [])

    def test_pagedSearchStopsAtSizeLimit(self):
        wire = Wire()
        d = wire.conn.search("dc=x", 2, parseFilter("(cn=*)"), pageSize=2, sizeLimit=2)
        [message] = wire.sent()
        wire.answer(message.id, entry("cn=a"))
        wire.answer(message.id, entry("cn=b"))
        wire.answer(message.id, pureldap.LDAPSearchResultDone(resultCode=0), pagedResponse(b"more"))
        [abandon] = wire.sent()  # RFC 2696: a page size of 0 with the cookie ends the search
        decoded, _ = pureber.berDecodeObject(pureber.BERDecoderContext(), abandon.controls[0][2])
        self.assertEqual((decoded.data[0].value, decoded.data[1].value), (0, b"more"))
        wire.answer(abandon.id, pureldap.LDAPSearchResultDone(resultCode=0), pagedResponse(b""))
        done = self.successResultOf(d)
        self.assertEqual((done.resultCode, done.entries), (4, 2))

    def test_malformedPagedControl(self):
        self.assertRaises(client.LDAPError, client.pagedResultsCookie,
                          [(client.PAGED_RESULTS, None, pureber.BERInteger(3).toWire())])

    def test_whoami(self):
        wire = Wire()
        d = wire.conn.whoami()
        [message] = wire.sent()
        self.assertEqual(message.value.requestName, client.WHOAMI)
        wire.answer(message.id, pureldap.LDAPExtendedResponse(resultCode=0, response=b"dn:uid=jo,dc=x"))
        self.assertEqual(self.successResultOf(d), "dn:uid=jo,dc=x")

    def test_whoamiAnonymous(self):
        wire = Wire()
        d = wire.conn.whoami()
        [message] = wire.sent()
        wire.answer(message.id, pureldap.LDAPExtendedResponse(resultCode=0))
        self.assertEqual(self.successResultOf(d), "")

    def test_compare(self):
        for code, expected in ((6, True), (5, False)):
            wire = Wire()
            d = wire.conn.compare("uid=jo,dc=x", "sn", b"Smith")
            [message] = wire.sent()
            self.assertEqual(message.value.ava.assertionValue.value, b"Smith")
            wire.answer(message.id, pureldap.LDAPCompareResponse(resultCode=code))
            self.assertIs(self.successResultOf(d), expected)

    def test_compareNoSuchObject(self):
        wire = Wire()
        d = wire.conn.compare("uid=nobody,dc=x", "sn", b"x")
        [message] = wire.sent()
        wire.answer(message.id, pureldap.LDAPCompareResponse(resultCode=32))
        self.assertEqual(self.failureResultOf(d, client.LDAPError).value.resultCode, 32)


class ConnectionFailureTests(unittest.TestCase):
    def test_timeoutAbortsTheConnection(self):
        wire = Wire(timeout=3)
        d = wire.conn.bind("", "")
        wire.clock.advance(2.9)
        self.assertNoResult(d)
        wire.clock.advance(0.2)
        self.failureResultOf(d, error.TimeoutError)
        self.assertTrue(wire.transport.disconnecting)

    def test_lateAnswerIgnored(self):
        wire = Wire(timeout=1)
        d = wire.conn.bind("", "")
        [message] = wire.sent()
        wire.clock.advance(1)
        self.failureResultOf(d, error.TimeoutError)
        wire.answer(message.id, pureldap.LDAPBindResponse(resultCode=0))  # nothing to go to, no error

    def test_searchTimeLimitWaitsLonger(self):
        # -l 30: the server has 30 s; the client waits that plus its own timeout.
        wire = Wire(timeout=2)
        d = wire.conn.search("", 0, parseFilter("(objectClass=*)"), timeLimit=30)
        wire.clock.advance(31)
        self.assertNoResult(d)
        wire.clock.advance(1.1)
        self.failureResultOf(d, error.TimeoutError)

    def test_connectionLostFailsPending(self):
        wire = Wire()
        d1 = wire.conn.bind("", "")
        d2 = wire.conn.whoami()
        wire.conn.connectionLost(None)
        for d in (d1, d2):
            self.assertIn("closed the connection", str(self.failureResultOf(d, error.ConnectionLost).value))
        self.failureResultOf(wire.conn.bind("", ""), error.ConnectionLost)

    def test_noticeOfDisconnection(self):
        wire = Wire()
        d = wire.conn.bind("", "")
        notice = pureldap.LDAPExtendedResponse(resultCode=52, errorMessage=b"shutting down",
                                               responseName=client.NOTICE_OF_DISCONNECTION)
        wire.answer(0, notice)
        wire.conn.connectionLost(None)
        self.assertIn("shutting down", str(self.failureResultOf(d, error.ConnectionLost).value))

    def test_oversizedMessage(self):
        self.patch(client, "MAX_MESSAGE", 100)
        wire = Wire()
        d = wire.conn.bind("", "")
        wire.conn.dataReceived(b"\x30\x84\x00\x01\x00\x00" + b"\x00" * 120)
        self.assertTrue(wire.transport.disconnecting)
        wire.conn.connectionLost(None)
        self.assertIn("larger than 100", str(self.failureResultOf(d, error.ConnectionLost).value))

    def test_startTLSNeedsACreator(self):
        self.assertRaises(TypeError, Wire().conn.startTLS, None)

    def test_startTLSRefused(self):
        wire = Wire()
        d = wire.conn.startTLS(object())
        [message] = wire.sent()
        self.assertEqual(message.value.requestName, pureldap.LDAPStartTLSRequest.oid)
        wire.answer(message.id, pureldap.LDAPExtendedResponse(resultCode=53, errorMessage=b"no TLS here"))
        e = self.failureResultOf(d, client.StartTLSError).value
        self.assertIn("refused StartTLS", str(e))
        self.assertIn("no TLS here", str(e))

    def test_clearTextAfterStartTLSResponse(self):
        # A man in the middle appends a forged answer to the server's "go ahead".
        wire = Wire()
        d = wire.conn.startTLS(object())  # never used: no TLS is started
        [message] = wire.sent()
        ok = pureldap.LDAPMessage(pureldap.LDAPExtendedResponse(resultCode=0), id=message.id).toWire()
        forged = pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=message.id + 1).toWire()
        wire.conn.dataReceived(ok + forged)
        self.assertIn("clear text after agreeing to StartTLS", str(self.failureResultOf(d, client.StartTLSError).value))
        self.assertTrue(wire.transport.disconnecting)

    def test_startTLSResponseInPieces(self):
        wire = Wire()
        started = []
        wire.transport.startTLS = started.append
        d = wire.conn.startTLS("creator")
        [message] = wire.sent()
        data = pureldap.LDAPMessage(pureldap.LDAPExtendedResponse(resultCode=0), id=message.id).toWire()
        for b in range(len(data)):
            wire.conn.dataReceived(data[b:b + 1])
        self.assertEqual(started, ["creator"])
        self.assertNoResult(d)  # now waiting for the handshake
        wire.conn.handshakeCompleted()
        self.assertIs(self.successResultOf(d), wire.conn)

    def test_handshakeTimeout(self):
        wire = Wire(timeout=2)
        d = wire.conn.awaitHandshake()
        wire.clock.advance(2)
        self.failureResultOf(d, client.StartTLSError)
        self.assertTrue(wire.transport.disconnecting)

    def test_describeNameMismatch(self):
        from service_identity import VerificationError

        self.assertEqual(client.describe(VerificationError([]), "127.0.0.1"),
                         "the server's certificate is not valid for 127.0.0.1")


class FilterTests(unittest.TestCase):
    def wire(self, text):
        return parseFilter(text).toWire()

    def test_sameAsLdaptorForPlainFilters(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from ldaptor.ldapfilter import parseFilter as ldaptorParse
        for text in ("(uid=jo)", "(&(objectClass=person)(|(cn=J*n)(sn~=x)))", "(!(a>=3))", "(cn=*)",
                     "(cn=a*b*c)", "(cn=*end)", "(age<=4)", "(cn=\\2a)"):
            self.assertEqual(self.wire(text), ldaptorParse(text).toWire(), text)

    def test_utf8Escapes(self):
        # RFC 4515: \XX is one byte; ldaptor makes it a character (and sends U+00C3 U+00A4).
        self.assertEqual(parseFilter("(cn=\\c3\\a4)").assertionValue.value, "\u00e4".encode())
        self.assertEqual(parseFilter("(cn=\u00e4)").assertionValue.value, "\u00e4".encode())

    def test_withoutParentheses(self):
        self.assertEqual(self.wire("uid=jo"), self.wire("(uid=jo)"))

    def test_extensibleDN(self):
        f = parseFilter("(ou:dn:=users)")
        self.assertIsInstance(f, pureldap.LDAPFilter_extensibleMatch)
        self.assertTrue(f.dnAttributes.value)
        self.assertIsNone(f.matchingRule)
        f = parseFilter("(:1.2.3:=x)")
        self.assertIsNone(f.type)

    def test_errors(self):
        for text in ("", "(uid=jo", "(uid=jo))", "((uid=jo))", "(cn=a(b)", "(cn=\\4)", "(cn=\\zz)",
                     "(cn=a**b)", "(=x)", "(:=x)", "(cn:=x"):
            self.assertRaises(FilterError, parseFilter, text)

    def test_depthBounded(self):
        self.assertRaises(FilterError, parseFilter, "(!" * 200 + "(a=b)" + ")" * 200)
        parseFilter("(!" * 30 + "(a=b)" + ")" * 30)


class OutputFailureTests(unittest.TestCase):
    def test_onEntryFailureStopsTheSearch(self):
        wire = Wire()

        def broken(dn, attrs):
            raise BrokenPipeError(32, "Broken pipe")

        d = wire.conn.search("dc=x", 2, parseFilter("(cn=*)"), onEntry=broken)
        [message] = wire.sent()
        wire.answer(message.id, entry("cn=a"))
        self.failureResultOf(d, BrokenPipeError)
        self.assertTrue(wire.transport.disconnecting)
        wire.answer(message.id, entry("cn=b"))  # more entries on the way: nothing to go to, no error
        wire.conn.connectionLost(None)


class BadServerTests(unittest.TestCase):
    def assertClosedWith(self, wire, d, text):
        self.assertTrue(wire.transport.disconnecting)
        wire.conn.connectionLost(None)
        self.assertIn(text, str(self.failureResultOf(d, error.ConnectionLost).value))

    def test_partialMessageWaits(self):
        wire = Wire()
        d = wire.conn.bind("", "")
        [message] = wire.sent()
        data = pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=message.id).toWire()
        for b in range(len(data)):
            wire.conn.dataReceived(data[b:b + 1])
        self.successResultOf(d)

    def test_notAnLDAPMessage(self):
        wire = Wire()
        d = wire.conn.bind("", "")
        wire.conn.dataReceived(b"\x04\x03abc")
        self.assertClosedWith(wire, d, "unexpected message from the server")

    def test_requestInsteadOfResponse(self):
        wire = Wire()
        d = wire.conn.bind("", "")
        wire.conn.dataReceived(pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=b"x", auth=b"y"), id=1).toWire())
        self.assertClosedWith(wire, d, "unexpected message from the server")

    def test_unknownOperationIsQuiet(self):
        import sys

        wire = Wire()
        d = wire.conn.bind("", "")
        printed = io.StringIO()
        self.patch(sys, "stdout", printed)
        # An LDAPMessage holding APPLICATION 25 (IntermediateResponse), which ldaptor does not know.
        body = pureber.BERInteger(1).toWire() + b"\x79\x00"
        wire.conn.dataReceived(b"\x30" + bytes([len(body)]) + body)
        self.assertEqual(printed.getvalue(), "")
        self.assertClosedWith(wire, d, "from the server")


class FastEntryTests(unittest.TestCase):
    """Search entries decoded without ldaptor give what ldaptor's decoder gives."""

    ENTRIES = [
        entry("cn=a,dc=x", cn=[b"a"], description=[b"", b"\x00\xff" * 300, "\u00e9t\u00e9".encode()]),
        entry("cn=b,dc=x"),
        entry("", objectClass=[b"top"], namingContexts=[b"dc=x"]),
        entry("cn=long,dc=x", jpegPhoto=[bytes(range(256)) * 400]),  # lengths of 3 octets
    ]

    def collect(self, fast: bool, controls=None) -> list:
        wire = Wire()
        if not fast:
            self.patch(wire.conn, "_fastEntry", lambda data: False)
        seen = []
        d = wire.conn.search("dc=x", 2, parseFilter("(cn=*)"), onEntry=lambda dn, attrs: seen.append((dn, attrs)))
        [message] = wire.sent()
        for op in self.ENTRIES:
            wire.answer(message.id, op, controls)
        wire.answer(message.id, pureldap.LDAPSearchResultDone(resultCode=0))
        self.assertEqual(self.successResultOf(d).entries, len(self.ENTRIES))
        return seen

    def test_sameAsLdaptor(self):
        self.assertEqual(self.collect(fast=True), self.collect(fast=False))

    def test_entryWithControlsGoesToLdaptor(self):
        self.assertEqual(self.collect(fast=True, controls=[(b"1.2.3", None, b"v")]), self.collect(fast=False))

    def test_notAnEntry(self):
        wire = Wire()
        self.assertFalse(wire.conn._fastEntry(
            pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=1).toWire()))
        self.assertFalse(wire.conn._fastEntry(b"\x30\x03\x02\x01"))  # truncated: ldaptor decides
