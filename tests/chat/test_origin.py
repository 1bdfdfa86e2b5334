"""
Cross-site WebSocket hijacking (issue 21): C{/chat/ws} accepts handshakes from
the site's own pages (and configured origins) and from clients that are not
browsers (no C{Origin}); a page of another site gets 403.  Real handshakes over
loopback through the web service, plain and TLS.
"""

import re

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.server import Site

from netsvc.chat.web import OriginPolicy, chatResource, parseOrigin
from netsvc.tls import clientCreator
from tests.helpers import sleep
from tests.web._support import PLAIN, TLS, startWeb, webPort

CHAT = '  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n'


class _Exchange(Protocol):
    """Sends a request; C{done} fires with what came back once a response is complete (or the connection closed)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data
        if complete(self.data) and not self.done.called:
            self.done.callback(self.data)
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.data)


@defer.inlineCallbacks
def handshake(portNumber, origins=(), host=None, cafile=None, path="/chat/ws"):
    """Send a WebSocket handshake (with these Origin headers); the status code, and the response."""
    head = (f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{portNumber}'}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
    head += "".join(f"Origin: {o}\r\n" for o in origins)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber, timeout=5)
    if cafile is not None:
        endpoint = endpoints.wrapClientTLS(clientCreator("localhost", cafile=cafile), endpoint)
    exchange = _Exchange((head + "\r\n").encode())
    yield endpoints.connectProtocol(endpoint, exchange)
    data = yield exchange.done.addTimeout(5, reactor)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data


def complete(data):
    """A whole response head (and its body, unless it switches protocols)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    if data.startswith(b"HTTP/1.1 101"):
        return True
    length = re.search(rb"(?im)^content-length: *(\d+)", data[:end])
    return length is not None and len(data) - end - 4 >= int(length.group(1))


class OriginTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startWeb(self, extra=CHAT)
        self.plain = webPort(self.daemon, PLAIN)
        self.tls = webPort(self.daemon, TLS)
        self.refused = self.daemon.getServiceNamed("chat").metrics.refused("ws_origin")

    @defer.inlineCallbacks
    def test_ownOriginAccepted(self):
        status, data = yield handshake(self.plain, [f"http://127.0.0.1:{self.plain}"])
        self.assertEqual(status, 101, data)

    @defer.inlineCallbacks
    def test_otherSiteRefused(self):
        """A page of evil.example opening the chat in its visitor's name: 403, counted, nobody joins."""
        status, data = yield handshake(self.plain, ["https://evil.example"])
        self.assertEqual(status, 403, data)
        self.assertIn(b"'https://evil.example' is not allowed", data)
        self.assertEqual(self.refused.value, 1)
        yield sleep(0.05)
        self.assertEqual(list(self.daemon.getServiceNamed("chat").hub.rooms["#lobby"].members), [])

    @defer.inlineCallbacks
    def test_noOriginAccepted(self):
        """Not a browser (browsers always send Origin): accepted."""
        status, data = yield handshake(self.plain)
        self.assertEqual(status, 101, data)
        self.assertEqual(self.refused.value, 0)

    @defer.inlineCallbacks
    def test_siteNamesOnSitePorts(self):
        """The certificate's names on the web listeners' ports are the site's; another port is not."""
        status, data = yield handshake(self.plain, [f"https://localhost:{self.tls}"])
        self.assertEqual(status, 101, data)
        status, data = yield handshake(self.plain, [f"https://LOCALHOST:{self.tls}"])
        self.assertEqual(status, 101, data)
        status, data = yield handshake(self.plain, [f"http://[::1]:{self.plain}"])
        self.assertEqual(status, 101, data)
        for origin in ("http://localhost:1", "https://localhost", "null", f"http://localhost:{self.plain}/x",
                       f"http://127.0.0.1.evil.example:{self.plain}", "file://", ""):
            status, data = yield handshake(self.plain, [origin])
            self.assertEqual(status, 403, (origin, data))

    @defer.inlineCallbacks
    def test_hostMustMatch(self):
        """Same origin means the host and port the request was sent to."""
        status, data = yield handshake(self.plain, ["http://chat.example:8080"], host="chat.example:8080")
        self.assertEqual(status, 101, data)
        status, data = yield handshake(self.plain, ["https://chat.example"], host="chat.example")
        self.assertEqual(status, 101, data)
        status, data = yield handshake(self.plain, ["http://chat.example:8081"], host="chat.example:8080")
        self.assertEqual(status, 403, data)

    @defer.inlineCallbacks
    def test_twoOriginsRefused(self):
        status, data = yield handshake(self.plain, [f"http://127.0.0.1:{self.plain}", "https://evil.example"])
        self.assertEqual(status, 403, data)

    @defer.inlineCallbacks
    def test_overTLS(self):
        status, data = yield handshake(self.tls, [f"https://localhost:{self.tls}"], host=f"localhost:{self.tls}",
                                       cafile=self.cafile)
        self.assertEqual(status, 101, data)
        status, data = yield handshake(self.tls, ["https://evil.example"], host=f"localhost:{self.tls}",
                                       cafile=self.cafile)
        self.assertEqual(status, 403, data)

    @defer.inlineCallbacks
    def test_configuredOrigins(self):
        """Origins given to chatResource (web.chat_origins) are accepted exactly: scheme, host and port."""
        resource = chatResource(self.daemon.context, origins=["https://app.example.com:8443", "http://tool.example"])
        port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(resource))
        self.addCleanup(port.stopListening)
        p = port.getHost().port
        for origin in ("https://app.example.com:8443", "https://APP.example.com:8443", "http://tool.example",
                       "http://tool.example:80"):
            status, data = yield handshake(p, [origin], path="/ws")
            self.assertEqual(status, 101, (origin, data))
        for origin in ("https://app.example.com", "http://app.example.com:8443", "https://tool.example",
                       "https://evil.example"):
            status, data = yield handshake(p, [origin], path="/ws")
            self.assertEqual(status, 403, (origin, data))


class ParseOriginTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(parseOrigin("https://Chat.Example.com"), ("https", "chat.example.com", 443))
        self.assertEqual(parseOrigin("http://[::1]:8080"), ("http", "::1", 8080))
        for bad in ("null", "chat.example.com", "https://u@chat.example", "https://x/path", "ftp://x", "http://x:99999"):
            self.assertRaises(ValueError, parseOrigin, bad)
        self.assertRaises(ValueError, OriginPolicy, allowed=["*"])
