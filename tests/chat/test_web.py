"""Chat in the browser: the WebSocket bridge shares rooms with TCP clients."""

import json
import socket
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import client as webclient
from twisted.web import resource, server
from twisted.web.websocket import WebSocketClientEndpoint

from netsvc.chat.web import chatResource
from tests.chat.test_service import readUntil
from tests.helpers import port, sleep, startDaemon


class BrowserLike:
    """A WebSocket client that keeps every JSON event it receives."""

    def __init__(self):
        self.events = []
        self.closed = defer.Deferred()

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def textMessageReceived(self, message):
        self.events += [json.loads(line) for line in message.splitlines() if line]

    def bytesMessageReceived(self, data):
        raise AssertionError("the chat sends text messages only")

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        self.closed.callback(None)

    @defer.inlineCallbacks
    def waitFor(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not any(predicate(e) for e in self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"not received; got {self.events}")
            yield sleep(0.01)


class Factory:
    def __init__(self):
        self.made = []

    def buildProtocol(self, url):
        p = BrowserLike()
        self.made.append(p)
        return p


class ChatWebSocketTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startDaemon(self, 'services:\n  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        root = resource.Resource()
        root.putChild(b"chat", chatResource(self.daemon.context))
        site = server.Site(root, timeout=0.3)  # HTTP idle timeout: must not end upgraded sockets
        self.web = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.web.stopListening)
        self.base = f"http://127.0.0.1:{self.web.getHost().port}"

    @defer.inlineCallbacks
    def connectBrowser(self):
        endpoint = WebSocketClientEndpoint.new(reactor, self.base.replace("http", "ws") + "/chat/ws")
        factory = Factory()
        browser = yield defer.Deferred.fromCoroutine(endpoint.connect(factory))
        self.addCleanup(lambda: browser.transport.loseConnection() if not browser.closed.called else None)
        return browser

    @defer.inlineCallbacks
    def test_browserAndTCPClientSeeEachOther(self):
        browser = yield self.connectBrowser()
        yield browser.waitFor(lambda e: e["kind"] == "notice" and e["text"].startswith("welcome"))
        tcp = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        tcp.sendall(b"/nick terminal\nhello browser\n")
        yield browser.waitFor(lambda e: e["kind"] == "message" and e["text"] == "hello browser")
        event = [e for e in browser.events if e["kind"] == "message"][0]
        self.assertEqual((event["sender"], event["room"]), ("terminal", "#lobby"))
        browser.transport.sendTextMessage("/nick webby")
        browser.transport.sendTextMessage("hello terminal ✓")
        got = yield readUntil(tcp, "<webby> hello terminal ✓\n".encode())
        self.assertIn(b"*** 127.0.0.1:", got)  # the browser joined under its address
        self.assertIn(b"is now known as webby\n", got)

    @defer.inlineCallbacks
    def test_idleSocketOutlivesHTTPTimeout(self):
        browser = yield self.connectBrowser()
        yield sleep(0.8)
        self.assertFalse(browser.closed.called)
        browser.transport.sendTextMessage("/who")
        yield browser.waitFor(lambda e: e["text"].startswith("1 in #lobby"))

    @defer.inlineCallbacks
    def test_commandsAndLimitsApply(self):
        browser = yield self.connectBrowser()
        browser.transport.sendTextMessage("/bogus")
        yield browser.waitFor(lambda e: e["text"] == "error: unknown command /bogus; /help lists them")
        browser.transport.sendTextMessage("x" * 5000)
        yield browser.waitFor(lambda e: "longer than 4096 bytes" in e["text"])

    @defer.inlineCallbacks
    def test_hugeMessageDroppedConnectionKept(self):
        """Twisted would reassemble a message of any size; the bridge drops one past 16 lines' worth."""
        browser = yield self.connectBrowser()
        yield browser.waitFor(lambda e: e["text"].startswith("welcome"))
        browser.transport.sendTextMessage("y" * (2 << 20))
        yield browser.waitFor(lambda e: e["text"] == "error: message longer than 65536 characters; dropped")
        browser.transport.sendTextMessage("\n".join(["line"] * 3))  # a paste of several lines is fine
        browser.transport.sendTextMessage("/who")
        yield browser.waitFor(lambda e: e["text"].startswith("1 in #lobby"))
        messages = [e["text"] for e in browser.events if e["kind"] == "message"]
        self.assertEqual(messages, ["line"] * 3)

    def test_boundedBuffer(self):
        from netsvc.chat.web import _BoundedBuffer

        b = _BoundedBuffer("", 10)
        b.add("12345")
        b.add("67890")
        self.assertEqual(b.done(), "1234567890")
        for _ in range(100):
            b.add("x" * 7)
            self.assertLessEqual(len(b.data), 10)
        self.assertIsNone(b.done())
        b.add("ok")
        self.assertEqual(b.done(), "ok")

    @defer.inlineCallbacks
    def test_leavingIsAnnounced(self):
        tcp = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        yield readUntil(tcp, b"joined #lobby\n")
        browser = yield self.connectBrowser()
        browser.transport.sendTextMessage("/nick leaver")
        yield readUntil(tcp, b"is now known as leaver\n")
        browser.transport.loseConnection()
        yield readUntil(tcp, b"*** leaver left (disconnected)\n")

    @defer.inlineCallbacks
    def test_pageServed(self):
        pool = webclient.HTTPConnectionPool(reactor, persistent=False)
        agent = webclient.Agent(reactor, pool=pool)
        response = yield agent.request(b"GET", (self.base + "/chat/").encode())
        body = yield webclient.readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"new WebSocket(", body)
        redirect = yield agent.request(b"GET", (self.base + "/chat").encode())
        yield webclient.readBody(redirect)
        self.assertEqual((redirect.code, redirect.headers.getRawHeaders(b"location")), (302, [b"/chat/"]))

    @defer.inlineCallbacks
    def test_noChatServiceIs503(self):
        self.daemon.removeService(self.daemon.getServiceNamed("chat"))
        pool = webclient.HTTPConnectionPool(reactor, persistent=False)
        response = yield webclient.Agent(reactor, pool=pool).request(b"GET", (self.base + "/chat/ws").encode())
        yield webclient.readBody(response)
        self.assertEqual(response.code, 503)
