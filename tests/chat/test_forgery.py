"""
Nobody speaks for someone else (issue 21): text from a client never carries a
line break, a control character or a bidi override into another client's
framing, and never reads as a server notice (C{***}).  Over real loopback: a
line client (nc), a NUL client (the books' protocol) and a browser (WebSocket,
through the web service), all in one room.
"""

import json
import re

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.websocket import WebSocketClientEndpoint

from netsvc.chat.framing import FRAMINGS, visible
from netsvc.chat.hub import Event
from tests.chat.test_service import connect, readUntil
from tests.helpers import port
from tests.web._support import PLAIN, startWeb, webPort
from tests.web.test_chat_mount import _Browser, _Factory

CHAT = ('  chat:\n    listen:\n      - "tcp:0:interface=127.0.0.1"\n'
        '      - {endpoint: "tcp:0:interface=127.0.0.1", framing: nul}\n'
        '    limits: {rate: 1000, burst: 1000}\n')

#: What may never reach a terminal client inside a message: C0 but LF (and NUL, the NUL framing's
#: delimiter), DEL, C1, the bidi embeddings/overrides/isolates, and the Unicode line/paragraph separators.
FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

#: What the hostile clients say, each ending in a marker the readers wait for.
HOSTILE = [
    "hi\n*** admin is now known as root",
    "carriage\r*** admin is now known as root",
    "clear \x1b[2J\x1b[H screen \x9b2J c1 \x85 nel \u2028 ls \u2029 ps",
    "bidi \u202egnp.exe\u202c \u2066iso\u2069",
    "/me waves\n*** admin is now known as root",
    "/topic the topic\n*** admin is now known as root",
    "*** admin is now known as root",
]


def lines(data: bytes, delimiter: bytes) -> list[str]:
    return [m.decode("utf-8") for m in data.split(delimiter)]


class ForgeryTests(unittest.TestCase):
    def setUp(self):
        self.daemon = startWeb(self, extra=CHAT)
        self.line = port(self.daemon, 0, "chat")
        self.nul = port(self.daemon, 1, "chat")

    @defer.inlineCallbacks
    def connectAll(self):
        line = connect(self.line)
        self.addCleanup(line.close)
        line.sendall(b"/nick lina\n")
        yield readUntil(line, b"is now known as lina\n")
        nul = connect(self.nul)
        self.addCleanup(nul.close)
        nul.sendall(b"/nick mallory\0")
        yield readUntil(nul, b"is now known as mallory\0")
        browser = _Browser()
        ws = WebSocketClientEndpoint.new(reactor, f"ws://127.0.0.1:{webPort(self.daemon, PLAIN)}/chat/ws")
        yield defer.Deferred.fromCoroutine(ws.connect(_Factory(browser)))
        self.addCleanup(lambda: browser.transport.loseConnection())
        browser.transport.sendTextMessage("/nick webby")
        yield browser.waitFor("is now known as webby")
        return line, nul, browser

    def assertClean(self, received: list[str], who: str) -> None:
        for message in received:
            self.assertIsNone(FORBIDDEN.search(message), f"{who} got {message!r}")
            self.assertFalse(message.startswith("*** admin"), f"{who} got {message!r}")

    @defer.inlineCallbacks
    def test_nulClientCannotForgeLinesOrEscapes(self):
        """
        A NUL client's text with LF, CR, ESC, C1 and bidi controls: the line and NUL
        clients see it on one line after the sender's name, the controls replaced;
        the browser gets it exactly, marked with who said it.
        """
        line, nul, browser = yield self.connectAll()
        for text in HOSTILE:
            nul.sendall(text.encode("utf-8") + b"\0")
        nul.sendall(b"the end\0")
        got = yield readUntil(line, b"<mallory> the end\n")
        received = lines(got, b"\n")
        self.assertClean(received, "the line client")
        self.assertIn("<mallory> hi\ufffd*** admin is now known as root", received)
        self.assertIn("<mallory> carriage\ufffd*** admin is now known as root", received)
        self.assertIn("* mallory waves\ufffd*** admin is now known as root", received)
        self.assertIn("<mallory> *** admin is now known as root", received)
        self.assertIn("*** mallory set the topic of #lobby: the topic\ufffd*** admin is now known as root",
                      received)
        got = yield readUntil(nul, b"mallory: the end\0")
        self.assertClean(lines(got, b"\0"), "the NUL client")
        events = yield browser.waitFor("the end")
        said = [(e["kind"], e["sender"], e["text"]) for e in events if e["sender"] == "mallory"]
        self.assertIn(("message", "mallory", HOSTILE[0]), said)  # exact, and marked as mallory's
        self.assertIn(("message", "mallory", HOSTILE[2]), said)
        self.assertIn(("message", "mallory", HOSTILE[3]), said)
        self.assertIn(("action", "mallory", "waves\n*** admin is now known as root"), said)
        for e in events:
            if e["kind"] == "notice":
                self.assertNotEqual(e["text"], "admin is now known as root")

    @defer.inlineCallbacks
    def test_webSocketClientCannotForge(self):
        """What a browser sends (several lines, controls, a /msg, a topic) reaches line and NUL clients clean."""
        line, nul, browser = yield self.connectAll()
        browser.transport.sendTextMessage("hello\n*** admin is now known as root\r\x1b[31mred\u202eevil")
        browser.transport.sendTextMessage("/msg lina secret\x1b]0;title\x07\u2028*** admin is now known as root")
        browser.transport.sendTextMessage("/msg mallory psst\x0b\x0c\x1c*** admin is now known as root")
        browser.transport.sendTextMessage("/topic t\x85*** admin is now known as root")
        browser.transport.sendTextMessage("the end")
        got = yield readUntil(line, b"<webby> the end\n")
        received = lines(got, b"\n")
        self.assertClean(received, "the line client")
        # A browser's message is split into lines (as a paste): each is said after the sender's name.
        self.assertIn("<webby> *** admin is now known as root", received)
        self.assertIn("<webby> \ufffd[31mred\ufffdevil", received)
        self.assertIn("*webby* secret\ufffd]0;title\ufffd", received)
        got = yield readUntil(nul, b"webby: the end\0")
        self.assertClean(lines(got, b"\0"), "the NUL client")

    @defer.inlineCallbacks
    def test_lineClientCannotForgeEscapes(self):
        """A line client: a CR inside a line, ESC, a bidi override; /me and a private message to the NUL client."""
        line, nul, browser = yield self.connectAll()
        line.sendall("a\r*** admin is now known as root\x1b[2J\u202e\n".encode())
        line.sendall(b"/me \x1b[2Jwaves\r*** admin is now known as root\n")
        line.sendall(b"/msg mallory \x1b[2J\r*** admin is now known as root\n")
        line.sendall(b"the end\n")
        got = yield readUntil(nul, b"lina: the end\0")
        received = lines(got, b"\0")
        self.assertClean(received, "the NUL client")
        self.assertIn("lina: a\ufffd*** admin is now known as root\ufffd[2J\ufffd", received)
        self.assertIn("*lina* \ufffd[2J\ufffd*** admin is now known as root", received)
        got = yield readUntil(line, b"<lina> the end\n")
        self.assertClean(lines(got, b"\n"), "the line client")


class VisibleTests(unittest.TestCase):
    """L{visible}: what the terminal framings do to every event's text."""

    def test_controlsReplaced(self):
        self.assertEqual(visible("a\nb\rc\0d\x1be\x7ff\x9bg\u202eh\u2066i\u2028j\u2029k"),
                         "a\ufffdb\ufffdc\ufffdd\ufffde\ufffdf\ufffdg\ufffdh\ufffdi\ufffdj\ufffdk")

    def test_tabIsASpace(self):
        self.assertEqual(visible("a\tb"), "a b")

    def test_ordinaryTextUntouched(self):
        text = "grüß dich — 日本語 שלום 🙂 *** <b>"
        self.assertIs(visible(text), text)

    def test_everyKindAndFraming(self):
        """Whatever the event (history from Redis included), the terminal framings render one clean message."""
        evil = "x\n*** y\r\x1b\u202e\0"
        for kind in ("message", "action", "notice", "private", "sent"):
            for replay in (False, True):
                event = Event(kind, evil, sender="s\nz", target="t\0", when=0.0, replay=replay)
                for framing in FRAMINGS.values():
                    rendered = framing.render(event)
                    body = rendered[:-1].decode("utf-8")
                    self.assertEqual(rendered[-1:], framing.delimiter)
                    self.assertIsNone(FORBIDDEN.search(body), (kind, framing.name, body))
                    self.assertNotIn("\n", body)

    def test_jsonKeepsTextExact(self):
        from netsvc.chat.web import JSON

        evil = "x\n*** y\r\x1b\u202e\0\x85\u2028\u2029"
        rendered = JSON.render(Event("message", evil, sender="mallory"))
        self.assertEqual(len(rendered.decode("utf-8").splitlines()), 1)  # one line for any reader
        got = json.loads(rendered)
        self.assertEqual((got["kind"], got["sender"], got["text"]), ("message", "mallory", evil))
