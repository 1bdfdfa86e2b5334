"""The DATA reader alone: end marker, dot-stuffing, trace headers, size/line/NUL/bare-CR/loop checks, chunking."""

from __future__ import annotations

from twisted.trial import unittest

from netsvc.smtp.data import DataReader


class Sink:
    def __init__(self):
        self.data = b""
        self.aborted = False

    def write(self, data):
        self.data += data

    def abort(self):
        self.aborted = True


class DataReaderTests(unittest.TestCase):
    def read(self, message, chunk=None, maxSize=10_000):
        sink = Sink()
        r = DataReader(sink, maxSize, 1000, lambda names: b"X-Names: " + b",".join(sorted(names)) + b"\r\n")
        buf = b""
        pieces = [message] if chunk is None else [message[i:i + chunk] for i in range(0, len(message), chunk)]
        for piece in pieces:
            buf += piece
            buf = buf[r.feed(buf):]
            if r.done:
                break
        return r, sink, buf

    def test_chunkBoundariesDoNotMatter(self):
        msg = (b"From: a\r\nSubject: s\r\n folded\r\n\r\n..leading dot\r\nline\r\n.\r\nNEXT\r\n")
        results = {self.read(msg, chunk)[1].data for chunk in (None, 1, 2, 3, 7)}
        self.assertEqual(results, {b"X-Names: from,subject\r\nFrom: a\r\nSubject: s\r\n folded\r\n\r\n"
                                   b".leading dot\r\nline\r\n"})
        r, _, rest = self.read(msg, 1)
        self.assertTrue(r.done)
        self.assertEqual(rest, b"")  # the reader stops at the end marker; "NEXT" not consumed here
        r, _, rest = self.read(msg)
        self.assertEqual(rest, b"NEXT\r\n")

    def test_noHeaders(self):
        _, sink, _ = self.read(b"just text\r\n.\r\n")
        self.assertEqual(sink.data, b"X-Names: \r\n\r\njust text\r\n")
        _, sink, _ = self.read(b".\r\n")
        self.assertEqual(sink.data, b"X-Names: \r\n")
        _, sink, _ = self.read(b"Subject: only\r\n.\r\n")
        self.assertEqual(sink.data, b"X-Names: subject\r\nSubject: only\r\n")

    def test_sizeAndLine(self):
        r, sink, _ = self.read(b"a: b\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n", 64)
        self.assertIsNone(r.problem)
        r, sink, _ = self.read(b"a: b\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n", 64)
        self.assertEqual(r.problem, "line")
        r, sink, _ = self.read(b"a: b\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200 + b".\r\n", 500)
        self.assertEqual((r.problem, r.done, sink.aborted), ("size", True, True))


    def test_headerLinesArriveOneByOne(self):
        """A header section sent a line per packet is scanned once, not once per packet (quadratic CPU)."""
        from netsvc.smtp import data

        calls = []

        real = data._HEADER_LINE

        class Counting:
            def match(self, *a):
                calls.append(1)
                return real.match(*a)

        self.patch(data, "_HEADER_LINE", Counting())
        lines = 2000
        message = b"".join(b"X-H%d: value\r\n" % i for i in range(lines)) + b"\r\nbody\r\n.\r\n"
        r, sink, _ = self.read(message, chunk=len(b"X-H1000: value\r\n"), maxSize=10**6)
        self.assertTrue(r.done)
        self.assertTrue(sink.data.endswith(b"X-H1999: value\r\n\r\nbody\r\n"))
        self.assertLess(len(calls), 3 * lines)
