"""Over real loopback sockets: a client that pipelines thousands of commands and never reads is not read either."""

from __future__ import annotations

import socket

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from netsvc.metrics import Registry
from netsvc.smtp.protocol import MAX_HELD_INPUT, OUTPUT_CHUNK, ServerConfig, SMTPFactory, SMTPMetrics
from tests.helpers import Keeping, silentClient, sleep, unsentBytes
from tests.smtp.test_protocol import FakeQueue

COMMANDS = 200_000  # 1.2 MB of NOOPs, 2.8 MB of replies if nothing pushed back
SMALL = 16 * 1024  # socket buffers, so that the kernel cannot absorb the test


class NonReadingClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_pipeliningClientThatNeverReadsIsNotRead(self):
        config = ServerConfig(hostname="mx.test", queue=FakeQueue(), metrics=SMTPMetrics(Registry()), clock=reactor,
                              junkLimit=10**9)  # NOOPs as plain commands here: back-pressure, not the junk limit
        sessions = Keeping(SMTPFactory(config))
        port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(sessions)
        self.addCleanup(port.stopListening)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield endpoints.connectProtocol(endpoint, silentClient(SMALL))
        self.addCleanup(lambda: client.transport.abortConnection())
        (session,) = sessions.built
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            session.transport.getHandle().setsockopt(socket.SOL_SOCKET, option, SMALL)
        client.transport.write(b"EHLO x\r\n")
        yield sleep(0.05)
        client.transport.write(b"NOOP\r\n" * COMMANDS)
        held = []
        for _ in range(200):  # at most 10 s: wait until the session stops reading
            yield sleep(0.05)
            held.append((unsentBytes(session.transport), session._pending()))
            if session._inputHeld and len(held) > 4 and held[-1] == held[-4]:
                break
        self.assertTrue(session._inputHeld, held[-1])
        self.assertTrue(session.transport.producerPaused if hasattr(session.transport, "producerPaused")
                        else session._writesPaused)
        unsent, pending = held[-1]
        # what the daemon holds: the transport's buffer (64 KB) and one chunk of replies; the input held
        self.assertLessEqual(unsent, 64 * 1024 + OUTPUT_CHUNK + 1024, held[-1])
        self.assertLessEqual(pending, MAX_HELD_INPUT + 256 * 1024, held[-1])
        self.assertLess(session.junk, COMMANDS // 2)  # most NOOPs are still unread, in the kernel or the client
        # the client reads again: everything is answered
        client.transport.resumeProducing()
        for _ in range(400):  # at most 20 s
            if client.received.count(b"250 2.0.0 Ok\r\n") >= COMMANDS:
                break
            yield sleep(0.05)
        self.assertEqual(client.received.count(b"250 2.0.0 Ok\r\n"), COMMANDS)
