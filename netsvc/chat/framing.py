"""
How chat messages are delimited and shown: C{line} (UTF-8 lines ending in LF
or CRLF) and C{nul} (each message ends in one NUL byte, the books' protocol).
A framing renders an L{Event} to bytes once and caches it on the event, so a
fan-out to a thousand members of one framing renders once.

Both are read by terminals (nc, socat, the books' client), which trust what
arrives: a message holding a line break could print a line of its own (a
forged C{*** ...} notice), a CR overwrite the line, an escape sequence clear
the screen or retitle the window, a bidi override reverse what follows.  So
every rendering goes through L{visible}: one message is one line of plain
text, whoever wrote its parts (messages, actions, topics, private messages,
nicknames and room names echoed in errors, history and events from other
nodes alike).  As IRC servers do with what they cannot carry, such characters
are replaced (U+FFFD), never passed on.  The WebSocket's JSON framing
(L{netsvc.chat.web}) keeps the text exact: there each event is an object that
says who sent it.
"""

from __future__ import annotations

import re
import time

from netsvc.chat.hub import Event

#: Characters a terminal acts on instead of showing: C0 controls (tab aside), DEL, C1 controls, the
#: Unicode line and paragraph separators, and the bidi embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_TABS = re.compile("\t")
REPLACEMENT = "\ufffd"


def visible(text: str) -> str:
    """
    C{text} with every character a terminal would act on replaced by U+FFFD (a
    tab by a space): no line break, no escape sequence, no bidi control.  The
    same string when there is nothing to replace.
    """
    if _UNSAFE.search(text) is not None:
        text = _UNSAFE.sub(REPLACEMENT, text)
    if "\t" in text:
        text = _TABS.sub(" ", text)
    return text


class Framing:
    """How messages are delimited and how events are shown."""

    name = ""
    delimiter = b""

    def render(self, event: Event) -> bytes:
        cached = event.rendered.get(self.name)
        if cached is None:
            cached = event.rendered[self.name] = self.visible(self.format(event)).encode("utf-8") + self.delimiter
        return cached

    def format(self, event: Event) -> str:
        stamp = time.strftime("[%H:%M:%S] ", time.localtime(event.time)) if event.replay else ""
        kind = event.kind
        if kind == "message":
            return stamp + self.message(event.sender, event.text)
        if kind == "action":
            return f"{stamp}* {event.sender} {event.text}"
        if kind == "private":
            return f"{stamp}*{event.sender}* {event.text}"
        if kind == "sent":
            return f"{stamp}-> *{event.target}* {event.text}"
        return f"{stamp}*** {event.text}"

    def message(self, sender: str, text: str) -> str:
        raise NotImplementedError

    def visible(self, text: str) -> str:
        """What of a formatted event may be sent: one message of plain text (see L{visible})."""
        return visible(text)

    def strip(self, message: bytes) -> bytes:
        return message


class LineFraming(Framing):
    name = "line"
    delimiter = b"\n"

    def message(self, sender: str, text: str) -> str:
        return f"<{sender}> {text}"

    def strip(self, message: bytes) -> bytes:
        return message[:-1] if message.endswith(b"\r") else message


class NulFraming(Framing):
    name = "nul"
    delimiter = b"\0"

    def message(self, sender: str, text: str) -> str:
        return f"{sender}: {text}"


FRAMINGS: dict[str, Framing] = {"line": LineFraming(), "nul": NulFraming()}
