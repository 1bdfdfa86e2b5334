"""
How chat messages are delimited and shown: C{line} (UTF-8 lines ending in LF
or CRLF) and C{nul} (each message ends in one NUL byte, the books' protocol).
A framing renders an L{Event} to bytes once and caches it on the event, so a
fan-out to a thousand members of one framing renders once.
"""

from __future__ import annotations

import time

from netsvc.chat.hub import Event


class Framing:
    """How messages are delimited and how events are shown."""

    name = ""
    delimiter = b""

    def render(self, event: Event) -> bytes:
        cached = event.rendered.get(self.name)
        if cached is None:
            cached = event.rendered[self.name] = self.format(event).encode("utf-8") + self.delimiter
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

    def format(self, event: Event) -> str:
        # A NUL inside a message would split it for the reader.
        return super().format(event).replace("\0", "")


FRAMINGS: dict[str, Framing] = {"line": LineFraming(), "nul": NulFraming()}
