"""
Over real loopback sockets: a client that does not read its answers does not
make the server hold them -- neither the answers to many pipelined searches nor
one search with a big result set (it stops between two entries and goes on when
the client reads).
"""

from __future__ import annotations

import socket

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from netsvc.ldap import codec
from netsvc.ldap.server import OUTPUT_CHUNK, LDAPLimits, LDAPMetrics, LDAPServerFactory
from netsvc.metrics import Registry
from tests.helpers import Keeping, silentClient, sleep, unsentBytes
from tests.ldap._wire import SUFFIX, directoryFrom

ENTRIES = 2000
MARK = b"MARK-"
SMALL = 16 * 1024  # socket buffers, so that the kernel cannot absorb the test
TRANSPORT_BUFFER = 64 * 1024  # abstract.FileDescriptor.bufferSize: past it the transport pauses its producer


def _directory():
    top = b"dn: dc=example,dc=com\nobjectClass: domain\ndc: example\n\n"
    return directoryFrom(top + b"".join(
        b"dn: cn=e%d,dc=example,dc=com\nobjectClass: person\ncn: e%d\nsn: x\ndescription: %s%s\n\n"
        % (i, i, MARK, b"d" * 2000) for i in range(ENTRIES)))


def _search(msgid: int, sizeLimit: int = 0) -> bytes:
    op = codec.tlv(codec.SEARCH_REQUEST, codec.octets(SUFFIX.encode()) + codec.integer(2, 0x0A)
                   + codec.integer(0, 0x0A) + codec.integer(sizeLimit) + codec.integer(0)
                   + codec.tlv(0x01, b"\0") + codec.tlv(0x87, b"objectClass") + codec.tlv(0x30, b""))
    return codec.message(msgid, op)


class NonReadingClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connect(self):
        self.factory = LDAPServerFactory(_directory(), LDAPLimits(sizeLimit=10 * ENTRIES, timeLimit=60),
                                         LDAPMetrics(Registry()), reactor)
        servers = Keeping(self.factory)
        port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(servers)
        self.addCleanup(port.stopListening)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield endpoints.connectProtocol(endpoint, silentClient(SMALL))
        self.addCleanup(lambda: client.transport.abortConnection())
        for _ in range(100):
            if servers.built:
                break
            yield sleep(0.01)
        (server,) = servers.built
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            server.transport.getHandle().setsockopt(socket.SOL_SOCKET, option, SMALL)
        return client, server

    @defer.inlineCallbacks
    def waitUntilStill(self, server, progress):
        """Poll (at most 10 s) until the server is paused and C{progress()} stops changing; the last sample."""
        seen = []
        for _ in range(200):
            yield sleep(0.05)
            seen.append((progress(), unsentBytes(server.transport)))
            if server.writesPaused and len(seen) > 4 and seen[-1] == seen[-4]:
                break
        return seen[-1]

    @defer.inlineCallbacks
    def readAll(self, client, marker: bytes, count: int):
        client.transport.resumeProducing()
        for _ in range(400):  # at most 20 s
            if client.received.count(marker) >= count:
                break
            yield sleep(0.05)
        self.assertEqual(client.received.count(marker), count)

    @defer.inlineCallbacks
    def test_oneBigSearchIsWrittenAsTheClientReads(self):
        """2,000 entries of 2 KB (4 MB) for one search: the server holds a chunk, not the answer."""
        client, server = yield self.connect()
        client.transport.write(_search(1))
        sent, unsent = yield self.waitUntilStill(server, lambda: self.factory.metrics.entries.value)
        self.assertTrue(server.writesPaused)
        self.assertLessEqual(unsent, TRANSPORT_BUFFER + OUTPUT_CHUNK + 4096)
        self.assertLess(sent, ENTRIES // 2)
        self.assertIsNotNone(server.streaming)  # suspended between two entries
        yield self.readAll(client, MARK, ENTRIES)
        done = b"\x65\x07\x0a\x01\x00"  # searchResultDone, success
        for _ in range(100):
            if done in client.received:
                break
            yield sleep(0.05)
        self.assertTrue(client.received.endswith(done + b"\x04\x00\x04\x00"), client.received[-20:])
        self.assertIsNone(server.streaming)

    @defer.inlineCallbacks
    def test_manySearchesNotHandledWhilePaused(self):
        """400 pipelined searches of 20 entries each (17 MB): handling stops (and reading) while paused."""
        client, server = yield self.connect()
        requests = 400
        client.transport.write(b"".join(_search(i, sizeLimit=20) for i in range(1, requests + 1)))
        (handled, unsent) = yield self.waitUntilStill(server, lambda: self.factory.metrics.searches.value)
        self.assertTrue(server.writesPaused)
        self.assertLess(handled, requests // 2)
        self.assertLessEqual(unsent, TRANSPORT_BUFFER + OUTPUT_CHUNK + 4096)
        self.assertLessEqual(len(server.buffer), 64 * 1024 + 20 * len(_search(1)))  # one read's worth at most
        yield self.readAll(client, b"\x65\x07\x0a\x01\x04", requests)  # each: sizeLimitExceeded
