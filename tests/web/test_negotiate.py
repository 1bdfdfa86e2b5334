"""Request header parsing: Range, Accept-Encoding, entity tags, dates."""

from twisted.trial import unittest

from netsvc.web.negotiate import (
    DateCache,
    Unsatisfiable,
    acceptsGzip,
    coalesce,
    etagMatches,
    httpDate,
    parseHTTPDate,
    parseRange,
)


class RangeTests(unittest.TestCase):
    def test_single(self):
        self.assertEqual(parseRange(b"bytes=0-99", 1000), [(0, 99)])

    def test_openEndedAndClipped(self):
        self.assertEqual(parseRange(b"bytes=900-", 1000), [(900, 999)])
        self.assertEqual(parseRange(b"bytes=900-5000", 1000), [(900, 999)])

    def test_suffix(self):
        self.assertEqual(parseRange(b"bytes=-100", 1000), [(900, 999)])
        self.assertEqual(parseRange(b"bytes=-5000", 1000), [(0, 999)])

    def test_multi(self):
        self.assertEqual(parseRange(b"bytes=0-0, 10-19,-1", 1000), [(0, 0), (10, 19), (999, 999)])

    def test_unsatisfiable(self):
        self.assertRaises(Unsatisfiable, parseRange, b"bytes=1000-", 1000)
        self.assertRaises(Unsatisfiable, parseRange, b"bytes=5000-6000,2000-", 1000)
        self.assertRaises(Unsatisfiable, parseRange, b"bytes=-0", 1000)

    def test_someSatisfiable(self):
        self.assertEqual(parseRange(b"bytes=5000-6000,0-1", 1000), [(0, 1)])

    def test_malformedIgnored(self):
        for header in [
            b"bytes=abc",
            b"bytes=5-1",
            b"items=0-1",
            b"bytes=",
            b"bytes=1",
            b"bytes=--1",
            b"bytes=1-2-3",
            b"bytes= 0x1-2",
        ]:
            self.assertIsNone(parseRange(header, 1000), header)
        self.assertIsNone(parseRange(None, 1000))

    def test_tooManyIgnored(self):
        header = b"bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(100))
        self.assertIsNone(parseRange(header, 1000))

    def test_coalesce(self):
        self.assertEqual(coalesce([(10, 20), (0, 5), (6, 8), (15, 30)]), [(0, 8), (10, 30)])


class AcceptEncodingTests(unittest.TestCase):
    def test_gzip(self):
        for header in [
            b"gzip",
            b"gzip, deflate, br",
            b"deflate, gzip;q=0.5",
            b"*",
            b"br, *;q=0.1",
            b"GZIP",
        ]:
            self.assertTrue(acceptsGzip(header), header)

    def test_noGzip(self):
        for header in [None, b"", b"identity", b"gzip;q=0", b"deflate, br", b"*;q=0", b"gzip;q=0.000, *"]:
            self.assertFalse(acceptsGzip(header), header)


class ETagTests(unittest.TestCase):
    def test_weakComparison(self):
        self.assertTrue(etagMatches(b'"a", "b"', b'"b"'))
        self.assertTrue(etagMatches(b'W/"b"', b'"b"'))
        self.assertTrue(etagMatches(b"*", b'"b"'))
        self.assertFalse(etagMatches(b'"c"', b'"b"'))

    def test_strongComparison(self):
        self.assertFalse(etagMatches(b'W/"b"', b'"b"', weak=False))
        self.assertTrue(etagMatches(b'"b"', b'"b"', weak=False))


class DateTests(unittest.TestCase):
    def test_formats(self):
        for text in [
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun Nov  6 08:49:37 1994",
        ]:
            self.assertEqual(parseHTTPDate(text), 784111777, text)

    def test_bad(self):
        for text in [None, b"", b"yesterday", b"\xff\xfe"]:
            self.assertIsNone(parseHTTPDate(text))

    def test_roundTrip(self):
        self.assertEqual(httpDate(784111777), b"Sun, 06 Nov 1994 08:49:37 GMT")

    def test_dateCacheOncePerSecond(self):
        now = [100.2]
        cache = DateCache(lambda: now[0])
        first = cache.now()
        now[0] = 100.9
        self.assertIs(cache.now(), first)
        now[0] = 101.0
        self.assertEqual(cache.now(), httpDate(101))
