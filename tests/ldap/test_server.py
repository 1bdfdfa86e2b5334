"""
The LDAP server protocol over a StringTransport, with requests encoded and
responses decoded by ldaptor (an independent implementation of the wire format).
"""

from __future__ import annotations

from ldaptor.protocols import pureber, pureldap
from twisted.internet import defer
from twisted.trial import unittest

from netsvc import auth
from netsvc.ldap import codec
from netsvc.ldap.server import LDAPServerFactory
from tests.ldap._wire import (
    ALICE,
    BOB,
    CAROL,
    SUFFIX,
    USERS,
    Client,
    attrs,
    bind,
    decodeAll,
    directoryFrom,
    dns,
    makeFactory,
    msg,
    search,
)


def done(responses: list):
    last = responses[-1].value
    assert isinstance(last, pureldap.LDAPSearchResultDone), responses
    return last


class BindTests(unittest.TestCase):
    def setUp(self):
        self.factory = makeFactory()
        self.client = Client(self.factory)

    def code(self, request: bytes) -> int:
        (response,) = self.client.send(request)
        self.assertIsInstance(response.value, pureldap.LDAPBindResponse)
        return response.value.resultCode

    def test_anonymous(self):
        self.assertEqual(self.code(bind(1)), 0)
        self.assertEqual(self.factory.metrics.bindsOk.value, 1)

    def test_anonymousRefusedWhenConfigured(self):
        self.client = Client(makeFactory(anonymous="none"))
        self.assertEqual(self.code(bind(1)), 53)

    def test_simpleBind(self):
        self.assertEqual(self.code(bind(1, ALICE, "alice-pw")), 0)
        self.assertEqual(self.client.protocol.boundName, ALICE)

    def test_dnSpelledDifferently(self):
        self.assertEqual(self.code(bind(1, "UID=Alice, OU=Users,DC=example,DC=COM", "alice-pw")), 0)

    def test_wrongPassword(self):
        self.assertEqual(self.code(bind(1, ALICE, "nope")), 49)
        self.assertEqual(self.factory.metrics.bindsFailed.value, 1)
        self.assertIsNone(self.client.protocol.boundDN)

    def test_unknownDN(self):
        """An unknown DN costs a dummy check (tests/ldap/test_access.py), then 49."""
        d = self.factory.directory.checkPassword("uid=nobody,ou=users,dc=example,dc=com", "x")
        return d.addCallback(self.assertFalse)

    def test_invalidDNSyntax(self):
        """A bind name that is no DN: invalidDNSyntax (34), as slapd answers; not a failed password."""
        self.assertEqual(self.code(bind(1, "not a dn", "x")), 34)
        self.assertEqual(self.factory.metrics.bindsFailed.value, 1)
        limits = self.factory.limits
        self.assertEqual(self.factory.failedBinds.available("192.0.2.7"), limits.failedBindBurst)

    def test_emptyPasswordIsUnwillingToPerform(self):
        """slapd's answer to an unauthenticated bind (a DN, no password): 53, not success, not 49."""
        (response,) = self.client.send(bind(1, ALICE, ""))
        self.assertEqual(response.value.resultCode, 53)
        self.assertIn(b"unauthenticated bind", response.value.errorMessage)

    def test_sasl(self):
        request = msg(pureldap.LDAPBindRequest(dn=b"", auth=(b"EXTERNAL", b""), sasl=True), 1)
        self.assertEqual(self.code(request), 7)

    def test_version2(self):
        self.assertEqual(self.code(msg(pureldap.LDAPBindRequest(version=2, dn=b"", auth=b""), 1)), 2)

    def test_failedBindsAreRateLimitedPerAddress(self):
        factory = makeFactory(failedBindRate=0.5, failedBindBurst=3)
        client = Client(factory)
        codes = [client.send(bind(i, ALICE, "wrong"))[0].value.resultCode for i in range(1, 5)]
        self.assertEqual(codes, [49, 49, 49, 49])
        # The right password is not even checked now...
        (refused,) = client.send(bind(9, ALICE, "alice-pw"))
        self.assertEqual(refused.value.resultCode, 49)
        self.assertIn(b"too many failed binds", refused.value.errorMessage)
        # ...but another address is not affected...
        (other,) = Client(factory, host="192.0.2.8").send(bind(1, ALICE, "alice-pw"))
        self.assertEqual(other.value.resultCode, 0)
        # ...and after a while the first may try again.
        factory.clock.advance(2.5)
        (later,) = client.send(bind(10, ALICE, "alice-pw"))
        self.assertEqual(later.value.resultCode, 0)

    def test_parallelBindsReserveBeforeTheCheck(self):
        """
        Binds checked in parallel (a slow scheme, in a thread) from one address: at most C{burst} reach the
        check; the rest are refused unchecked at once.  A success gives its token back.
        """
        factory = makeFactory(failedBindRate=0.5, failedBindBurst=3)
        checks = []

        def slowCheck(dn, password):
            d = defer.Deferred()
            checks.append((d, password))
            return d

        factory.directory.checkPassword = slowCheck
        clients = [Client(factory) for _ in range(10)]
        answers = [c.send(bind(1, ALICE, "wrong")) for c in clients]
        self.assertEqual(len(checks), 3)
        self.assertEqual(answers[:3], [[], [], []])  # being checked
        self.assertEqual([a[0].value.resultCode for a in answers[3:]], [49] * 7)
        self.assertEqual(factory.metrics.bindsLimited.value, 7)
        checks[0][0].callback(True)  # one succeeds: its token comes back
        checks[1][0].callback(False)
        checks[2][0].callback(False)
        self.assertEqual(factory.metrics.bindsFailed.value, 2)
        clients[5].transport.clear()
        clients[5].protocol.dataReceived(bind(2, ALICE, "wrong"))
        self.assertEqual(len(checks), 4)  # the refunded token: checked
        (refused,) = clients[6].send(bind(2, ALICE, "wrong"))
        self.assertEqual((refused.value.resultCode, len(checks)), (49, 4))

    def test_busyHashPoolAnswersBusyWithoutCharging(self):
        """
        A check the hashing pool refused (its queue is full) is answered busy (51), not invalid credentials,
        and gives its reserved token back: a busy daemon never locks a client out.
        """
        factory = makeFactory(failedBindRate=0.5, failedBindBurst=1)
        factory.directory.checkPassword = lambda dn, pw: defer.succeed(auth.Refused("busy"))
        client = Client(factory)
        codes = [client.send(bind(i, ALICE, "alice-pw"))[0].value.resultCode for i in range(1, 4)]
        self.assertEqual(codes, [51, 51, 51])
        self.assertEqual(factory.metrics.bindsFailed.value, 0)

    def test_successfulBindsAreNotLimited(self):
        factory = makeFactory(failedBindRate=0.5, failedBindBurst=2)
        client = Client(factory)
        codes = [client.send(bind(i, ALICE, "alice-pw"))[0].value.resultCode for i in range(1, 20)]
        self.assertEqual(set(codes), {0})

    def test_requestsWaitForAThreadedBind(self):
        """While a bind is checked (in a thread), later requests wait, then are answered in order."""
        pending = defer.Deferred()
        directory = self.factory.directory
        directory.checkPassword = lambda dn, pw: pending
        out = self.client.send(bind(1, CAROL, "carol-pw") + search(2, CAROL, scope=0, attributes=("userPassword",)))
        self.assertEqual(out, [])
        self.assertEqual(self.client.transport.producerState, "paused")
        self.client.transport.clear()
        pending.callback(True)
        responses = decodeAll(self.client.transport.value())
        self.assertEqual([r.id for r in responses], [1, 2, 2])
        self.assertEqual(responses[0].value.resultCode, 0)
        # bound as carol: her own userPassword is readable
        self.assertIn("userPassword", attrs(responses[1].value))
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_threadedSchemes(self):
        """{CRYPT} and {SCRYPT} values are checked in a thread (auth.verifyPassword)."""
        directory = self.factory.directory

        @defer.inlineCallbacks
        def check():
            self.assertTrue((yield directory.checkPassword(CAROL, "carol-pw")))
            self.assertFalse((yield directory.checkPassword(CAROL, "alice-pw")))
            self.assertTrue((yield directory.checkPassword("uid=dave,ou=users,dc=example,dc=com", "dave-pw")))

        return check()


class OtherOperationTests(unittest.TestCase):
    def setUp(self):
        self.factory = makeFactory()
        self.client = Client(self.factory)

    def test_whoami(self):
        whoami = msg(pureldap.LDAPExtendedRequest(requestName=b"1.3.6.1.4.1.4203.1.11.3"), 2)
        (anonymous,) = self.client.send(whoami)
        self.assertEqual((anonymous.value.resultCode, anonymous.value.response), (0, b""))
        self.client.send(bind(1, "uid=ALICE,ou=users,dc=example,dc=com", "alice-pw"))
        (me,) = self.client.send(whoami)
        self.assertEqual(me.value.response, b"dn:" + ALICE.encode())

    def test_startTLS(self):
        (response,) = self.client.send(msg(pureldap.LDAPStartTLSRequest(), 1))
        self.assertEqual(response.value.resultCode, 0)
        self.assertEqual(response.value.responseName, b"1.3.6.1.4.1.1466.20037")
        clear, options = self.client.transport.tlsStarted
        self.assertEqual(options, "tls-options")
        self.assertEqual(decodeAll(clear), [response])  # the response went out before TLS started
        (again,) = self.client.send(msg(pureldap.LDAPStartTLSRequest(), 2))
        self.assertEqual(again.value.resultCode, 1)

    def test_clearTextAfterStartTLSIsNotServed(self):
        """
        Requests sent behind the StartTLS request, before its answer (RFC 4511 4.14.1 forbids it; a
        man in the middle injecting clear text does it), are never answered inside the TLS session:
        the connection is closed with a Notice of Disconnection, in clear, and TLS is not started.
        """
        whoami = msg(pureldap.LDAPExtendedRequest(requestName=b"1.3.6.1.4.1.4203.1.11.3"), 2)
        out = self.client.send(msg(pureldap.LDAPStartTLSRequest(), 1) + whoami)
        self.assertIsNone(self.client.transport.tlsStarted)
        self.assertEqual([(r.id, r.value.resultCode) for r in out], [(0, 2)])
        self.assertTrue(self.client.closed)

    def test_startTLSUnavailable(self):
        (response,) = Client(makeFactory(tls=False)).send(msg(pureldap.LDAPStartTLSRequest(), 1))
        self.assertEqual(response.value.resultCode, 52)

    def test_unknownExtendedOperation(self):
        (response,) = self.client.send(msg(pureldap.LDAPExtendedRequest(requestName=b"1.2.3.4"), 1))
        self.assertEqual(response.value.resultCode, 2)
        self.assertFalse(self.client.closed)

    def test_compare(self):
        def compare(dn, attr, value):
            req = pureldap.LDAPCompareRequest(entry=dn.encode(), ava=pureldap.LDAPAttributeValueAssertion(
                pureber.BEROctetString(attr.encode()), pureber.BEROctetString(value.encode())))
            (r,) = self.client.send(msg(req, 1))
            return r.value.resultCode

        self.assertEqual(compare(BOB, "title", "OPERATOR"), 6)
        self.assertEqual(compare(BOB, "title", "engineer"), 5)
        self.assertEqual(compare(BOB, "roomNumber", "1"), 16)
        self.assertEqual(compare("uid=x,ou=users,dc=example,dc=com", "cn", "x"), 32)

    def test_writesRefused(self):
        requests = [
            msg(pureldap.LDAPDelRequest(entry=BOB.encode()), 1),
            msg(pureldap.LDAPAddRequest(entry=b"uid=x,ou=users,dc=example,dc=com", attributes=[
                (pureldap.LDAPAttributeDescription(b"cn"), pureber.BERSet([pureldap.LDAPAttributeValue(b"x")]))]), 2),
            msg(pureldap.LDAPModifyDNRequest(entry=BOB.encode(), newrdn=b"uid=rob", deleteoldrdn=True), 3),
        ]
        for request in requests:
            (response,) = self.client.send(request)
            self.assertEqual(response.value.resultCode, 53)
        self.assertIsNotNone(self.factory.directory.get(BOB))

    def test_abandonAndUnbind(self):
        self.assertEqual(self.client.send(msg(pureldap.LDAPAbandonRequest(id=3), 4)), [])
        self.assertFalse(self.client.closed)
        self.client.send(msg(pureldap.LDAPUnbindRequest(), 5))
        self.assertTrue(self.client.closed)


class BadInputTests(unittest.TestCase):
    """Protocol errors: a Notice of Disconnection (protocolError) and the connection closed."""

    def setUp(self):
        self.factory = makeFactory(maxRequest=4096)
        self.client = Client(self.factory)

    def assertDisconnected(self, responses):
        (notice,) = responses
        self.assertEqual(notice.id, 0)
        self.assertEqual(notice.value.resultCode, 2)
        self.assertEqual(notice.value.responseName, b"1.3.6.1.4.1.1466.20036")
        self.assertTrue(self.client.closed)
        self.assertEqual(self.factory.metrics.protocolErrors.value, 1)

    def test_notASequence(self):
        self.assertDisconnected(self.client.send(b"GET / HTTP/1.1\r\n\r\n"))

    def test_hugeLengthRefusedBeforeBuffering(self):
        """A 2^31 length prefix is refused from the header alone, nothing buffered."""
        self.assertDisconnected(self.client.send(b"\x30\x84\x80\x00\x00\x00" + b"\x02\x01\x01"))
        self.assertEqual(len(self.client.protocol.buffer), 0)

    def test_overTheRequestLimit(self):
        self.assertDisconnected(self.client.send(search(1, SUFFIX, "(cn=" + "x" * 5000 + ")")))

    def test_truncated(self):
        """A truncated message is waited for (bounded by the request limit), then completed."""
        whole = search(1, USERS, "(uid=bob)")
        self.assertEqual(self.client.sendRaw(whole[:7]), b"")
        self.assertEqual(dns(self.client.send(whole[7:])), [BOB])

    def test_truncatedInside(self):
        """A length inside the message that runs past its end: protocolError."""
        whole = bytearray(bind(1, ALICE, "alice-pw"))
        whole[6] = 0x7F  # the bind request's own length
        self.assertDisconnected(self.client.send(bytes(whole)))

    def test_indefiniteLength(self):
        self.assertDisconnected(self.client.send(b"\x30\x80\x02\x01\x01\x42\x00\x00\x00"))

    def test_unknownOperation(self):
        self.assertDisconnected(self.client.send(codec.message(1, codec.tlv(0x7F - 0x1F + 0x1E, b""))))

    def test_deepFilter(self):
        """A filter nested 10,000 deep fails its search (protocolError); the connection goes on."""
        flt = codec.tlv(0x87, b"cn")
        for _ in range(10_000):
            flt = codec.tlv(0xA2, flt)  # (!(!(!...(cn=*))))
        op = codec.tlv(codec.SEARCH_REQUEST, codec.octets(SUFFIX.encode()) + codec.integer(2, 0x0A)
                       + codec.integer(0, 0x0A) + codec.integer(0) + codec.integer(0) + codec.tlv(0x01, b"\0")
                       + flt + codec.tlv(0x30, b""))
        client = Client(makeFactory(maxRequest=1 << 20))
        (response,) = client.send(codec.message(7, op))
        self.assertEqual((response.id, response.value.resultCode), (7, 2))
        self.assertFalse(client.closed)
        self.assertEqual(dns(client.send(search(8, USERS, "(uid=bob)"))), [BOB])

    def test_otherClientsUnaffected(self):
        other = Client(self.factory)
        self.client.send(b"\x30\x03\x02\x01\x01")
        self.assertTrue(self.client.closed)
        self.assertEqual(dns(other.send(search(1, USERS, "(uid=bob)"))), [BOB])

    def test_nothingAfterClosing(self):
        self.client.send(b"\x04\x00" + search(1, USERS))
        self.assertEqual(self.client.send(search(2, USERS)), [])


class FactoryTests(unittest.TestCase):
    def test_reloadKeepsTheDirectoryObject(self):
        factory: LDAPServerFactory = makeFactory()
        directory = factory.directory
        client = Client(factory)
        smaller = directoryFrom(b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n\n"
                                b"dn: ou=users,dc=example,dc=com\nobjectClass: organizationalUnit\nou: users\n")
        directory.replace(smaller)
        self.assertIs(factory.directory, directory)
        self.assertEqual(dns(client.send(search(1, SUFFIX))), [SUFFIX, USERS])
        self.assertIsNone(directory.findUser("alice"))


class BackPressureTests(unittest.TestCase):
    def test_aClientThatDoesNotReadIsNotRead(self):
        """When the transport's buffer is full (it pauses us), requests wait, and go on when it drains."""
        client = Client(makeFactory())
        self.assertIs(client.transport.producer, client.protocol)
        client.protocol.pauseProducing()  # what the transport does when its buffer is full
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(client.send(search(1, USERS, "(uid=bob)") + search(2, USERS, "(uid=alice)")), [])
        client.transport.clear()
        client.protocol.resumeProducing()
        self.assertEqual(dns(decodeAll(client.transport.value())), [BOB, ALICE])
        self.assertEqual(client.transport.producerState, "producing")

    def test_bigBatchesAreWrittenAsTheyGrow(self):
        """Answers to many pipelined requests reach the transport in chunks, so it can push back."""
        from netsvc.ldap import server

        self.patch(server, "TURN_BUDGET", 10**6)  # all in one turn: chunked within the turn
        client = Client(makeFactory())
        writes = []
        write = client.transport.write
        client.transport.write = lambda data: (writes.append(data), write(data))
        client.protocol.dataReceived(b"".join(search(i, USERS, "(uid=bob)") for i in range(1, 400)))
        self.assertGreater(len(writes), 1)
        self.assertEqual(len(decodeAll(b"".join(writes))), 2 * 399)


class ClosingTests(unittest.TestCase):
    def test_aPeerThatDoesNotFinishTheCloseIsCutOff(self):
        """After an unbind (or a protocol error) the peer has CLOSE_GRACE seconds, then the connection is aborted."""
        from netsvc.ldap.server import CLOSE_GRACE

        factory = makeFactory()
        client = Client(factory)
        aborted = []
        client.transport.abortConnection = lambda: aborted.append(True)
        client.send(search(1, USERS, "(uid=bob)") + msg(pureldap.LDAPUnbindRequest(), 2))
        self.assertTrue(client.closed)
        factory.clock.advance(CLOSE_GRACE - 0.1)
        self.assertEqual(aborted, [])
        factory.clock.advance(0.2)
        self.assertEqual(aborted, [True])

    def test_closedInTimeNothingAborted(self):
        factory = makeFactory()
        client = Client(factory)
        client.send(msg(pureldap.LDAPUnbindRequest(), 1))
        client.protocol.connectionLost(None)
        self.assertEqual(factory.clock.getDelayedCalls(), [])

    def test_answersBeforeTheUnbindAreSent(self):
        client = Client(makeFactory())
        out = client.send(search(1, USERS, "(uid=bob)") + msg(pureldap.LDAPUnbindRequest(), 2) + search(3, USERS))
        self.assertEqual([r.id for r in out], [1, 1])


class TurnBudgetTests(unittest.TestCase):
    """
    One read holding many pipelined requests: TURN_BUDGET are handled in that reactor turn, reading
    paused; the rest in the next turns, in order.  (A read of ~1,300 pipelined searches handled at
    once kept every client of every service waiting ~0.5 s.)
    """

    def test_pipelineHandledOverSeveralTurns(self):
        from netsvc.ldap.server import TURN_BUDGET

        factory = makeFactory()
        client = Client(factory)
        count = 2 * TURN_BUDGET + 7
        first = client.send(b"".join(search(i, scope=0) for i in range(1, count + 1)))
        done = [r.id for r in first if isinstance(r.value, pureldap.LDAPSearchResultDone)]
        self.assertEqual(done, list(range(1, TURN_BUDGET + 1)))
        self.assertEqual(client.transport.producerState, "paused")
        client.transport.clear()
        for _ in range(5):
            factory.clock.advance(0)
        rest = [r.id for r in decodeAll(client.transport.value()) if isinstance(r.value, pureldap.LDAPSearchResultDone)]
        self.assertEqual(rest, list(range(TURN_BUDGET + 1, count + 1)))
        self.assertEqual(client.transport.producerState, "producing")
