"""Crashes the fuzz targets found in files fixed here, each held by a test (issue 22)."""

from __future__ import annotations

from twisted.trial import unittest

from netsvc.config import ConfigError, parse


class ConfigProblemsAreOneLineEach(unittest.TestCase):
    def problems(self, text: str) -> list[str]:
        e = self.assertRaises(ConfigError, parse, text, "f.yaml")
        return str(e).splitlines()

    def test_unreadableCharacter(self):
        """A NUL (YAML's ReaderError) was a four-line message with no key and no line."""
        self.assertEqual(self.problems("\x00ervices:\n"),
                         ["f.yaml: line 1: YAML syntax error: special characters are not allowed: '\\x00'"])
        self.assertEqual(self.problems("a: 1\nb: \x07\n"),
                         ["f.yaml: line 2: YAML syntax error: special characters are not allowed: '\\x07'"])

    def test_keyWithANewline(self):
        """A quoted key with a newline in it made one problem two lines."""
        lines = self.problems('services:\n  "ec\\nho": {}\n')
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("f.yaml: services.ec\\nho: "), lines)


class RedisPayloadTextIsUnicode(unittest.TestCase):
    """redis_payload: a JSON escape of a lone surrogate (\\ud800) is a str Python cannot encode."""

    def test_loneSurrogateDropped(self):
        from netsvc.chat.redis.fanout import parsePayload

        event = '{"o":"n","k":"message","x":"a\\ud800","s":"alice","r":"#dev","t":"","w":1}'
        self.assertIsNone(parsePayload(event))
        self.assertIsNone(parsePayload(event.replace('"alice"', '"\\udfff"').replace("a\\ud800", "ok")))
        self.assertIsNone(parsePayload('{"o":"n","c":"topic","r":"#dev","x":"\\udc80"}'))
        self.assertIsNone(parsePayload('{"o":"n","k":"private","to":"b\\ud800","s":"a","x":"hi","w":1}'))
        self.assertEqual(parsePayload(event.replace("a\\ud800", "\\u00e9\\ud83d\\ude00"))["x"], "\u00e9\U0001f600")

    def test_everyMemberStillReceives(self):
        """Delivered, such a text raised UnicodeEncodeError in every member's framing: all were dropped."""
        from fuzz.targets import TARGETS

        TARGETS["redis_payload"](b'\n{"o":"n","k":"message","x":"\\ud800","s":"a","r":"#dev","t":"","w":1}')


class LocalDNSNamesAnswer(unittest.TestCase):
    """dns_local_data: a record the configuration accepts answers its name."""

    def test_nonASCIINameRefused(self):
        """C{café.lab} was accepted and never answered: queries carry names as bytes (IDNs as xn--)."""
        from netsvc.dns.service import Record

        for record in (Record(name="caf\u00e9.lab", type="A", value="10.0.0.1"),
                       Record(name="www.lab", type="CNAME", value="caf\u00e9.lab")):
            problems = record.check()
            self.assertEqual(len(problems), 1, problems)
            self.assertIn("xn--", problems[0][1])
        self.assertEqual(Record(name="xn--caf-dma.lab", type="A", value="10.0.0.1").check(), [])

    def test_hostsNamesSkipped(self):
        from fuzz.targets import TARGETS

        TARGETS["dns_local_data"]("caf\u00e9.lab A 10.0.0.1\nok.lab A 10.0.0.2\n--\n"
                                  "10.0.0.3 n\u00e9.lab ok3.lab\n".encode())


class EmptyFileRanges(unittest.TestCase):
    """http_headers: a suffix range of an empty file was (0, -1): 206 with Content-Range 'bytes 0--1/0'."""

    def test_suffixOfAnEmptyFile(self):
        from netsvc.web.negotiate import Unsatisfiable, parseRange

        self.assertRaises(Unsatisfiable, parseRange, b"bytes=-5", 0)
        self.assertRaises(Unsatisfiable, parseRange, b"bytes=0-99,-5", 0)
        self.assertEqual(parseRange(b"bytes=-5", 3), [(0, 2)])


class LDAPURLHosts(unittest.TestCase):
    """ldap_url: parseURL took what follows a user@ (and brackets) as the host; its text did not parse back."""

    def test_userAndBadHostsRefused(self):
        from netsvc.ldap.clienttypes import parseURL

        for text in ("ldaps://[::]]m\x00]]]@]]]]", "ldap://user@host", "ldap://a:b@host:389",
                     "ldap://ho st", "ldap://host\x00/", "ldap://[::1"):
            self.assertRaises(ValueError, parseURL, text)
        for text in ("ldap://localhost", "ldaps://ldap.example.com:636/dc=x", "ldap://[::1]:3389",
                     "ldap://127.0.0.1", "ldap://", "ldap://my_host.lab"):
            url = parseURL(text)
            self.assertEqual(parseURL(str(url)).host, url.host)


class FastPathNonASCIITarget(unittest.TestCase):
    """http_request: a request-target with bytes twisted.web refuses (> 0xB0) was answered 200 by the fast path."""

    def test_handedToTwistedWeb(self):
        from fuzz.targets import PEER, TARGETS, _httpRun, _site

        clock, fast, site = _site()
        for target in (b"/?\xff", b"/a.txt?q=\xc3\xa9", b"/\xe2\x9c\x93"):
            out, closed = _httpRun(fast.buildProtocol(PEER), [b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
                                   clock)
            theirs, _ = _httpRun(site.buildProtocol(PEER), [b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
                                 clock)
            self.assertEqual(out.split(b"\r\n", 1)[0], theirs.split(b"\r\n", 1)[0], target)
        TARGETS["http_request"](b"GET /??\xff\xff??a.txt HTTP/1.1\r\nHost:\r\n\r\n1\r\n")


class FastPathTabInRequestLine(unittest.TestCase):
    """http_request (make fuzz, 10 minutes): a tab in the request line (HEAD /?\tA HTTP/1.1) -- twisted.web
    splits the line at any whitespace and answers 400, the fast path split at spaces and answered 200."""

    def test_handedToTwistedWeb(self):
        from fuzz.targets import PEER, _httpRun, _site

        clock, fast, site = _site()
        for line in (b"HEAD /?\t\tA HTTP/1.1", b"GET /\ta.txt HTTP/1.1", b"GET\t/ HTTP/1.1"):
            request = line + b"\r\nHost: x\r\n\r\n"
            out, closed = _httpRun(fast.buildProtocol(PEER), [request], clock)
            theirs, _ = _httpRun(site.buildProtocol(PEER), [request], clock)
            self.assertEqual(out.split(b"\r\n", 1)[0], theirs.split(b"\r\n", 1)[0], line)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:40])


class LocalDNSZoneIndex(unittest.TestCase):
    """dns_local_data: an AAAA value with a zone index (fd00::7%eth0) passed ipaddress, then raised OSError."""

    def test_refused(self):
        from netsvc.dns.service import Record

        problems = Record(name="v6.lab", type="AAAA", value="fd00::7%eth0").check()
        self.assertEqual([key for key, _ in problems], ["value"], problems)
        self.assertEqual(Record(name="v6.lab", type="AAAA", value="fd00::7").check(), [])


class LocalDNSAddressWithSpaces(unittest.TestCase):
    """
    dns_local_data (make fuzz, 10 minutes): an A value with a space after it ("10.1.1.2 ", e.g. a quoted
    YAML value) was accepted, then making its PTR raised ValueError: a traceback at start and at every
    reload.  The PTR is made from the address as the record holds it.
    """

    def test_answersAndHasItsPTR(self):
        from twisted.names import dns

        from netsvc.dns.local import LocalData

        local = LocalData([("t.lab", "A", "10.1.1.2 ", 300), ("u.lab", "AAAA", " fd00::9", 300)], [], None)
        self.assertEqual([rr.payload.dottedQuad() for rr in local.names["t.lab"]], ["10.1.1.2"])
        self.assertEqual([rr.payload.name.name for rr in local.names["2.1.1.10.in-addr.arpa"]], [b"t.lab"])
        self.assertIn("9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", local.names)
        self.assertEqual(local.names["t.lab"][0].type, dns.A)


class HTTP2EnginesRefuseTheSameHeads(unittest.TestCase):
    """
    http2_frames: a mutated :authority ("loc0/host", put in HPACK's dynamic table and reused by
    every later request) made libnghttp2 reset each stream while h2 answered them all (and routed
    by that Host).  The fallback engine now checks :authority, :method and :path as libnghttp2 does.
    """

    def test_badAuthorityResetOnBothEngines(self):
        from pathlib import Path

        from fuzz.targets import H2_PREFACE, _h2Run, chunks

        corpus = Path(__file__).resolve().parents[1] / "corpus" / "http2_frames"
        data = (corpus / "finding-authority-slash").read_bytes()
        for engine in ("native", "python"):
            frames, closed, _ = _h2Run(engine, chunks(H2_PREFACE + data))
            self.assertFalse(closed, engine)
            self.assertEqual([f[2] for f in frames if f[0] == 0x1], [], engine)  # no response head
            self.assertEqual(sorted(f[2] for f in frames if f[0] == 0x3), [1, 3, 5, 7], engine)  # RST_STREAM each

    def test_checks(self):
        from netsvc.web.h2engine import _wellFormed

        good = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=%20"), (b":authority", b"[::1]:8443")]
        self.assertTrue(_wellFormed(good))
        for name, value in ((b":authority", b"a/b"), (b":authority", b"a b"), (b":method", b"G ET"),
                            (b":path", b"/a b"), (b":path", b"/\x00")):
            bad = [(n, value if n == name else v) for n, v in good]
            self.assertFalse(_wellFormed(bad), (name, value))
        # finding-ended-with-content-length: a POST that ends with its HEADERS yet says Content-Length: 11
        withLength = [*good, (b"content-length", b"11")]
        self.assertTrue(_wellFormed(withLength))
        self.assertFalse(_wellFormed(withLength, ended=True))
        self.assertTrue(_wellFormed([*good, (b"content-length", b"0")], ended=True))
        # an authority is needed, and may not be empty (host: "" in place of :authority, found next)
        noAuthority = good[:3]
        self.assertFalse(_wellFormed(noAuthority))
        self.assertTrue(_wellFormed([*noAuthority, (b"host", b"example.test")]))
        self.assertFalse(_wellFormed([*noAuthority, (b"host", b"")]))
        self.assertFalse(_wellFormed([*good, (b"host", b"")]))
        self.assertFalse(_wellFormed([*noAuthority, (b":authority", b"")]))

    def test_contentLengthOnAnEndedRequest(self):
        from pathlib import Path

        from fuzz.targets import H2_PREFACE, _h2Run, chunks

        corpus = Path(__file__).resolve().parents[1] / "corpus" / "http2_frames"
        data = (corpus / "finding-ended-with-content-length").read_bytes()
        for engine in ("native", "python"):
            frames, closed, _ = _h2Run(engine, chunks(H2_PREFACE + data))
            self.assertEqual([f[2] for f in frames if f[0] == 0x1], [], engine)  # no response head
            self.assertEqual([f[2] for f in frames if f[0] == 0x3], [1], engine)  # RST_STREAM


class HTTP2ConnectionErrorsClose(unittest.TestCase):
    """
    http2_frames: after a request, a frame header announcing more than SETTINGS_MAX_FRAME_SIZE.
    libnghttp2 answered with GOAWAY(FRAME_SIZE_ERROR) and ended its session without raising, and the
    connection stayed open, answering nothing (its ConnectionClosed event was ignored).  Now the
    GOAWAY is written, the connection closed and the error counted.
    """

    def test_closedWithGoaway(self):
        from pathlib import Path

        from fuzz.targets import H2_PREFACE, _h2Run, chunks

        corpus = Path(__file__).resolve().parents[1] / "corpus" / "http2_frames"
        data = (corpus / "finding-frame-size-goaway").read_bytes()
        frames, closed, _ = _h2Run("native", chunks(H2_PREFACE + data))
        self.assertTrue(closed)
        self.assertEqual(frames[-1][0], 0x7)  # GOAWAY last


class ProxyV1MappedAddresses(unittest.TestCase):
    """
    proxy_header: a v2 header with an IPv4-mapped destination gave it as plain IPv4, and the same
    addresses in a v1 TCP6 line gave the hex form ('::ffff:ffff:ffff'): one client, two addresses
    for the access lists and logs depending on the header's version.
    """

    def test_mappedIsIPv4InBothVersions(self):
        from netsvc.forward.proxyheader import HeaderReader, v1, v2

        line = b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 4000 443\r\nrest"
        self.assertEqual(HeaderReader().feed(line), (("192.0.2.7", 4000), ("2001:db8::1", 443), b"rest"))
        src, dst = ("2a03:b6cc:b63b:3b3b:3b3b::", 65535), ("255.255.255.255", 65535)
        for encode in (v1, v2):
            self.assertEqual(HeaderReader().feed(encode(src, dst) + b"x"), (src, dst, b"x"), encode.__name__)


class WebSocketErrorAfterOurClose(unittest.TestCase):
    """
    ws_message: a client's protocol error (a fragmented control frame) after our own Close made
    Twisted 26's WebSocket glue send a second Close, which wsproto refuses: LocalProtocolError out of
    dataReceived, logged as a failure of the connection's protocol.  Now the connection just closes.
    """

    def test_closedQuietly(self):
        from pathlib import Path

        from fuzz.targets import TARGETS

        corpus = Path(__file__).resolve().parents[1] / "corpus" / "ws_message"
        TARGETS["ws_message"]((corpus / "finding-close-after-close").read_bytes())
