"""The browser chat mounted on the web service: the page, and the WebSocket over TLS into the hub."""

import json
import socket

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.websocket import WebSocketClientEndpoint

from netsvc.web.proxy import VerifyingPolicy
from tests.chat.test_service import readUntil
from tests.helpers import port
from tests.web._support import TLS, get, startWeb, webPort

CHAT = '  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n'


class _Browser:
    """A WebSocket client collecting the JSON events the bridge sends."""

    def __init__(self):
        self.events = []
        self.waiting = []
        self.transport = None

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def textMessageReceived(self, message):
        for line in message.splitlines():
            self.events.append(json.loads(line))
        for text, d in list(self.waiting):
            if any(text in e["text"] for e in self.events):
                self.waiting.remove((text, d))
                d.callback(self.events)

    def bytesMessageReceived(self, data):
        pass

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        pass

    def waitFor(self, text):
        if any(text in e["text"] for e in self.events):
            return defer.succeed(self.events)
        d = defer.Deferred()
        self.waiting.append((text, d))
        return d.addTimeout(10, reactor)


class _Factory:
    def __init__(self, protocol):
        self.protocol = protocol

    def buildProtocol(self, url):
        return self.protocol


class NoChatServiceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_notMountedWithoutChat(self):
        daemon = startWeb(self)
        r = yield get(webPort(daemon, TLS), "/chat/", cafile=self.cafile)
        self.assertEqual(r.status, 404)


class ChatMountTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startWeb(self, extra=CHAT)  # the chat service's block follows the web one

    @defer.inlineCallbacks
    def test_pageAndRedirect(self):
        p = webPort(self.daemon, TLS)
        r = yield get(p, "/chat", cafile=self.cafile)
        self.assertEqual(r.status, 302)
        self.assertTrue(r.headers["location"].endswith("/chat/"))
        r = yield get(p, "/chat/", cafile=self.cafile)
        self.assertEqual(r.status, 200)
        self.assertIn(b"WebSocket", r.body)

    @defer.inlineCallbacks
    def test_websocketOverTLSMeetsTCPClient(self):
        p = webPort(self.daemon, TLS)
        browser = _Browser()
        ws = WebSocketClientEndpoint.new(reactor, f"wss://localhost:{p}/chat/ws",
                                         tlsPolicy=VerifyingPolicy(self.cafile))
        yield defer.Deferred.fromCoroutine(ws.connect(_Factory(browser)))
        self.addCleanup(lambda: browser.transport.loseConnection())
        yield browser.waitFor("welcome to netsvc chat")
        tcp = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        tcp.sendall(b"/nick terminal\nhello from a terminal\n")
        yield browser.waitFor("hello from a terminal")
        browser.transport.sendTextMessage("/nick web\nhi from the web")
        got = yield readUntil(tcp, b"<web> hi from the web\n", timeout=10)
        self.assertIn(b"<web> hi from the web\n", got)
