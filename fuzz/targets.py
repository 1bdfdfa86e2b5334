"""
The fuzz targets: one function from bytes per parser that reads a stranger's
bytes, each checking invariants stronger than "no exception".

A target returns None when its input is handled correctly; it raises
L{AssertionError} when an invariant is broken and lets any other exception out
(a crash).  Expected refusals (the parser's own error: C{DNError},
C{ConfigError} ...) are handled inside the target.

Chunking (how a stream arrives in reads) comes from the input itself (L{chunks}:
split points from a CRC of the bytes), so that one input is one reproducible
case for the coverage-guided runner and for hypothesis alike.

The targets are run derandomised by C{tests/fuzz} and coverage-guided by
C{fuzz/run.py} (see L{fuzz}).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

#: name -> target
TARGETS: dict[str, Callable[[bytes], None]] = {}


def target(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
    TARGETS[fn.__name__] = fn
    return fn


def chunks(data: bytes, most: int = 12) -> list[bytes]:
    """C{data} cut at up to C{most} points chosen from its own CRC (the same cut for the same bytes)."""
    if len(data) < 2:
        return [data]
    rng = random.Random(zlib.crc32(data))
    points = sorted(set(rng.randrange(1, len(data)) for _ in range(rng.randint(0, most))))
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


PEER = IPv4Address("TCP", "127.0.0.1", 40000)


# -- LDAP ---------------------------------------------------------------------------


@target
def ldap_dn(data: bytes) -> None:
    """parseDN / normalizeDN: DNError or a DN whose normal form is stable and parses to as many RDNs."""
    from netsvc.ldap.dn import DNError, escapeValue, normalizeDN, parseDN

    s = text(data)
    if s is None:
        return
    try:
        rdns = parseDN(s)
    except DNError:
        try:
            normalizeDN(s)
        except DNError:
            return
        raise AssertionError(f"normalizeDN accepts what parseDN refuses: {s!r}") from None
    norm = normalizeDN(s)
    assert normalizeDN(norm) == norm, (s, norm)
    assert len(parseDN(norm)) == len(rdns), (s, norm)
    for rdn in rdns:
        for kind, value in rdn:
            again = parseDN(f"{kind}={escapeValue(value)}")
            assert again == [[(kind, value)]], (kind, value, again)


def _esc(value: Any) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return "".join(f"\\{b:02x}" if b in b"*()\\\x00" or b > 0x7E or b < 0x20 else chr(b) for b in raw)


def _name(value: Any) -> str:
    value = getattr(value, "value", value)
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _filterText(f: Any) -> str:
    """RFC 4515 text of a decoded filter (ldaptor's own asText mixes bytes and str)."""
    from ldaptor.protocols import pureldap as p

    if isinstance(f, (p.LDAPFilter_and, p.LDAPFilter_or)):
        return ("(&" if isinstance(f, p.LDAPFilter_and) else "(|") + "".join(_filterText(x) for x in f) + ")"
    if isinstance(f, p.LDAPFilter_not):
        return "(!" + _filterText(f.value) + ")"
    if isinstance(f, p.LDAPFilter_present):
        return f"({_name(f.value)}=*)"
    if isinstance(f, p.LDAPFilter_substrings):
        parts = {type(x): x.value for x in f.substrings}
        initial = parts.get(p.LDAPFilter_substrings_initial)
        final = parts.get(p.LDAPFilter_substrings_final)
        middle = [_esc(x.value) for x in f.substrings if isinstance(x, p.LDAPFilter_substrings_any)]
        text = "*".join([_esc(initial) if initial is not None else ""] + middle
                        + [_esc(final) if final is not None else ""])
        return f"({_name(f.type)}={text})"
    if isinstance(f, p.LDAPFilter_extensibleMatch):
        out = _name(f.type) if f.type is not None else ""
        if f.dnAttributes is not None and getattr(f.dnAttributes, "value", f.dnAttributes):
            out += ":dn"
        if f.matchingRule is not None:
            out += ":" + _name(f.matchingRule)
        return f"({out}:={_esc(f.matchValue.value)})"
    ops = {p.LDAPFilter_equalityMatch: "=", p.LDAPFilter_greaterOrEqual: ">=",
           p.LDAPFilter_lessOrEqual: "<=", p.LDAPFilter_approxMatch: "~="}
    return f"({_name(f.attributeDesc)}{ops[type(f)]}{_esc(f.assertionValue.value)})"


def _ldaptorFilter(text: str) -> Any:
    """ldaptor's own text parser (None where it refuses)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ldaptor import ldapfilter
    try:
        return ldapfilter.parseFilter(text)
    except Exception:  # its pyparsing errors, and more
        return None


@target
def ldap_filter_text(data: bytes) -> None:
    """
    Text filter -> BER -> decoded -> text -> BER gives the same bytes; where
    ldaptor's own parser accepts the text too, it encodes it the same.
    """
    from ldaptor.protocols import pureber, pureldap

    from netsvc.ldap.filtertext import FilterError, parseFilter

    try:
        parsed = parseFilter(data)
    except FilterError:
        return
    ber = parsed.toWire()
    context = pureldap.LDAPBERDecoderContext_Filter(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()))
    decoded, used = pureber.berDecodeObject(context, ber)
    assert used == len(ber), (data, ber)
    assert decoded.toWire() == ber, (data, ber)
    rendered = _filterText(decoded)
    assert parseFilter(rendered).toWire() == ber, (data, rendered)
    s = text(data)
    # ldaptor reads an escaped byte >= 0x80 as a character and encodes it in UTF-8 (RFC 4515: the
    # byte itself), and its pyparsing grammar skips control whitespace (tab ...), so only
    # filters without either are compared.
    if s is not None and s.strip().startswith("(") and not re.search(r"\\[89a-fA-F][0-9a-fA-F]|[\x00-\x1f]", s):
        theirs = _ldaptorFilter(s.strip())
        if theirs is not None and theirs.toWire() != ber:
            # ldaptor encodes an extensible match's dnAttributes FALSE, a default value RFC 4511 5.1 says
            # MUST be absent (netsvc leaves it out): the two must still be the same filter.
            again, used = pureber.berDecodeObject(context, theirs.toWire())
            assert used == len(theirs.toWire()) and _filterText(again) == rendered, \
                ("ldaptor encodes it differently", data, _filterText(again), rendered)


@target
def ldap_url(data: bytes) -> None:
    """parseURL: ValueError or a URL whose text form parses back to the same scheme, host and port."""
    from netsvc.ldap.clienttypes import parseURL

    s = text(data)
    if s is None:
        return
    try:
        url = parseURL(s)
    except ValueError:
        return
    assert 0 < url.port < 65536 or url.port == 0, url
    again = parseURL(str(url))
    assert (again.tls, again.host, again.port) == (url.tls, url.host, url.port), (s, str(url), again)


@target
def ldif(data: bytes) -> None:
    """parseLDIF: LDIFError or records; what ldifout writes of them parses back to the same records."""
    from netsvc.ldap.ldifload import LDIFError, parseLDIF
    from netsvc.ldap.ldifout import entryLDIF

    try:
        records = list(parseLDIF(data))
    except LDIFError:
        return
    out = b"".join(entryLDIF(r.dn, [(name, [value]) for name, value in r.attributes]) for r in records)
    again = list(parseLDIF(out))
    assert [(r.dn, r.attributes) for r in again] == [(r.dn, r.attributes) for r in records], (data, out)


# -- configuration -------------------------------------------------------------------

#: A Problem line: FILE: KEY: REASON (the key may be empty for the whole file).
_PROBLEM = re.compile(r"^fuzz\.yaml: [^\n]*$")


@target
def config_yaml(data: bytes) -> None:
    """Any text gives a ConfigError (one line per problem, naming the file) or settings; never a traceback."""
    from netsvc.config import ConfigError, parse

    s = text(data)
    if s is None:
        return
    try:
        parse(s, "fuzz.yaml", base_dir="/nonexistent-fuzz")
    except ConfigError as e:
        lines = str(e).splitlines()
        assert lines, "a ConfigError without a problem"
        for line in lines:
            assert _PROBLEM.match(line), line


@target
def endpoint(data: bytes) -> None:
    """Server and client endpoint strings: EndpointError or a kind ("udp"/"stream"), the same once normalised."""
    s = text(data)
    if s is None:
        return
    # Twisted's own tls:FOLDER server endpoint reads every PEM file of the folder it names, relative
    # to the working directory (in the whole suite, trial's folder of test certificates: gigabytes and
    # minutes): parsed from an empty folder, it reads nothing.
    here = os.getcwd()
    os.chdir(_emptyFolder())
    try:
        _endpointChecks(s)
    finally:
        os.chdir(here)


def _emptyFolder() -> str:
    if "empty" not in _scratch:
        _scratch["empty"] = tempfile.mkdtemp(prefix="netsvc-fuzz-empty-")
    return _scratch["empty"]


_scratch: dict[str, str] = {}


def _endpointChecks(s: str) -> None:
    from netsvc.endpoints import EndpointError, normalize, parseClient, split, validateClient, validateServer

    for validate in (validateServer, validateClient):
        try:
            kind = validate(s)
        except EndpointError:
            continue
        assert kind in ("udp", "stream"), kind
        assert validate(normalize(s)) == kind, (s, normalize(s))
        if validate is validateServer:
            split(s)
        else:
            spec = parseClient(s)
            assert spec.kind, spec


# -- PROXY headers ------------------------------------------------------------------


@target
def proxy_header(data: bytes) -> None:
    """HeaderReader fed in pieces gives what it gives fed at once; the addresses it returns re-encode and re-parse."""
    from netsvc.forward.proxyheader import HeaderReader, ProxyHeaderError, v1, v2

    def read(pieces: list[bytes]) -> Any:
        reader = HeaderReader()
        for i, piece in enumerate(pieces):
            try:
                result = reader.feed(piece)
            except ProxyHeaderError:
                return "error"
            if result is not None:
                src, dst, rest = result
                return src, dst, rest + b"".join(pieces[i + 1:])
            assert len(reader.buffer) <= 536, len(reader.buffer)  # V2_MAX
        return None

    whole = read([data])
    split = read(chunks(data))
    assert whole == split, (whole, split)
    if isinstance(whole, tuple):
        src, dst, rest = whole
        assert data.endswith(rest), (data, rest)
        if src is not None and dst is not None:
            for encode in (v1, v2):
                again = HeaderReader().feed(encode(src, dst) + b"x")
                assert again == (src, dst, b"x"), (encode.__name__, src, dst, again)


# -- SMTP -----------------------------------------------------------------------------


@target
def smtp_address(data: bytes) -> None:
    """MAIL/RCPT arguments: SyntaxProblem (a 5xx reply) or a path; a checked mailbox checks again the same."""
    from netsvc.smtp.syntax import SyntaxProblem, checkMailbox, decodeXtext, parsePathArgument

    for keyword in ("FROM", "TO"):
        try:
            path, params, _ = parsePathArgument(data, keyword)
        except SyntaxProblem as e:
            assert 500 <= e.reply[0] < 600, e.reply
            continue
        for value in params.values():
            if value is not None:
                try:
                    decodeXtext(value)
                except SyntaxProblem:
                    pass
        try:
            checked = checkMailbox(path, keyword == "FROM")
        except SyntaxProblem as e:
            assert 500 <= e.reply[0] < 600, e.reply
            continue
        assert checkMailbox(checked, keyword == "FROM") == checked, (path, checked)


@target
def smtp_data(data: bytes) -> None:
    """DataReader: the stored message, the end and the problem do not depend on how the bytes were chunked."""
    from netsvc.smtp.data import DataReader

    def read(pieces: list[bytes]) -> tuple[bytes | None, bool, str | None, int]:
        sink = _Sink()
        reader = DataReader(sink, 4096, 200, lambda seen: b"Received: by fuzz\r\n")
        held = b""
        most = 0
        for piece in pieces:
            buf = held + piece
            pos = reader.feed(buf)
            assert 0 <= pos <= len(buf), (pos, len(buf))
            held = buf[pos:]
            most = max(most, len(held))
            if reader.done or reader.problem == "barelf":
                break
        # an aborted message is not stored, whatever was written before the abort
        return None if sink.aborted else bytes(sink.data), reader.done, reader.problem, most

    whole = read([data])
    split = read(chunks(data))
    # (which problem is reported first may depend on chunking: NUL vs bare CR; both abort)
    assert (whole[0], whole[2] is None) == (split[0], split[2] is None), (whole[:3], split[:3])
    if whole[2] is None:
        assert whole[1] == split[1], (whole[:3], split[:3])
    # what is held unparsed is at most one line (the reader drops the rest of an over-long line)
    assert split[3] <= 200 + max(len(c) for c in chunks(data)) + 2, split[3]
    assert whole[0] is None or len(whole[0]) <= 4096 + 4096, len(whole[0])
    assert (whole[2] is None) == (whole[0] is not None), ("a problem must abort the message", whole[:3])


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.aborted, "written after abort"
        self.data += data

    def abort(self) -> None:
        self.aborted = True


class _Message:
    def __init__(self, queue: _Queue) -> None:
        self.queue = queue
        self.id = "fuzz"
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        pass

    def commit(self, envelope: Any) -> Any:
        from twisted.internet import defer

        envelope.id = "fuzz"
        self.queue.committed.append(self.data)
        return defer.succeed("fuzz")


class _Queue:
    def __init__(self) -> None:
        self.committed: list[bytes] = []

    def newMessage(self) -> _Message:
        return _Message(self)


class _Auth:
    def check(self, user: str, password: str, client: Any = None) -> Any:
        from twisted.internet import defer

        return defer.succeed(user == "alice" and password == "s3cret")


_REPLY = re.compile(rb"^[2-5][0-9][0-9][ -][^\r\n]*$")


def _smtpRun(pieces: list[bytes]) -> tuple[list[bytes], list[bytes], bool, int]:
    from netsvc.metrics import Registry
    from netsvc.policies import RateLimiter
    from netsvc.smtp.protocol import ServerConfig, SMTPFactory, SMTPMetrics

    clock = MemoryReactorClock()
    queue = _Queue()
    config = ServerConfig(hostname="mx.test", queue=queue, metrics=SMTPMetrics(Registry()), clock=clock,
                          authenticator=_Auth(), tlsOptions=None, maxSize=4096,
                          authFailures=RateLimiter(0.1, 5, clock), messageRate=RateLimiter(0, 0, clock))
    proto = SMTPFactory(config).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    held = 0
    for piece in pieces:
        if transport.disconnecting:
            break
        proto.dataReceived(piece)
        clock.advance(0)
        held = max(held, len(getattr(proto, "_buffer", b"")) - getattr(proto, "_offset", 0))
    out = transport.value()
    closed = transport.disconnecting
    proto.connectionLost(None)
    clock.advance(3600)
    return out.split(b"\r\n"), queue.committed, closed, held


_RFC5322_DATE = re.compile(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")


def _undated(message: Any) -> Any:
    return _RFC5322_DATE.sub(b"DATE", message) if isinstance(message, bytes) else message


@target
def smtp_session(data: bytes) -> None:
    """
    An SMTP session: every reply line well formed; the replies (codes), what is
    queued and whether the session closed do not depend on chunking; input held
    unparsed stays bounded.
    """
    # Pipelining after EHLO/HELO/DATA in the same read is refused (554, as Postfix does), so
    # what depends on read boundaries is compared between a client sending one line per read
    # and the same lines cut further; the whole input at once is checked for well-formedness.
    lines = data.splitlines(keepends=True)
    whole = _smtpRun(lines)
    split = _smtpRun([piece for line in lines for piece in chunks(line, 3)])
    once = _smtpRun([data])
    for out in (whole[0], split[0], once[0]):
        assert out[-1] == b"", out[-1][:80]  # every reply ends with CRLF
        for line in out[:-1]:
            assert _REPLY.match(line), line[:120]
    codes = [line[:4] for line in whole[0]]
    assert codes == [line[:4] for line in split[0]], (codes, [line[:4] for line in split[0]])
    # The Received line and an added Date: carry the wall-clock time: two runs a second apart differ
    # there (a false finding of a 10-minute run), so the time is left out of the comparison.
    assert [_undated(m) for m in whole[1]] == [_undated(m) for m in split[1]], "queued messages differ with chunking"
    assert whole[2] == split[2], "closed differs with chunking"
    assert max(whole[3], split[3], once[3]) <= 64 * 1024, (whole[3], split[3], once[3])


# -- DNS --------------------------------------------------------------------------------


@target
def dns_response(data: bytes) -> None:
    """An upstream answer: checkMessage refuses it or store() keeps it, and what it renders parses back."""
    from twisted.names import dns

    from netsvc.dns import wire

    try:
        parsed = wire.checkMessage(data)
        stored = wire.store(data, 1000.0, lambda rtype, ttl, section: min(ttl, 3600), parsed=parsed)
    except ValueError:
        return
    try:
        query = wire.parseQuery(data[:12] + data[12:wire.readQuestionName(data, 12) + 4])
    except (wire.BadQuery, ValueError, IndexError):
        return
    for now in (1000.0, 1100.0):
        out = stored.render(query, now)
        m = dns.Message()
        m.fromStr(out)
        assert len(m.queries) == 1, m
        assert m.answers is not None
        assert len(m.answers) == stored.ancount, (len(m.answers), stored.ancount)


def _dnsSetup() -> tuple[Any, Any, Any]:
    from netsvc.dns.protocol import DNSStreamProtocol
    from netsvc.dns.resolver import DNSMetrics
    from tests.dns._fakes import FakeUpstream, LocalData, a, makeGuard, makeResolver

    clock = MemoryReactorClock()
    upstream = FakeUpstream("udp://192.0.2.1:53", clock, {
        "www.test": [a("www.test", "192.0.2.80")], "slow.test": "hang",
        "big.test": [a("big.test", f"192.0.2.{i}") for i in range(40)]})
    resolver = makeResolver(clock, [upstream], local=LocalData([("printer.lab", "A", "10.0.0.7", 300)]))
    guard = makeGuard(clock)
    proto = DNSStreamProtocol(resolver, guard, DNSMetrics(guard.metrics.registry))
    return clock, proto, upstream


def _frames(out: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos + 2 <= len(out):
        n = int.from_bytes(out[pos:pos + 2], "big")
        assert pos + 2 + n <= len(out), "a torn answer frame"
        frames.append(out[pos + 2:pos + 2 + n])
        pos += 2 + n
    assert pos == len(out), "bytes after the last frame"
    return frames


def _dnsRun(pieces: list[bytes]) -> tuple[list[bytes], bool]:
    clock, proto, _ = _dnsSetup()
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:
            break
        proto.dataReceived(piece)
        clock.advance(0)
    clock.advance(10)
    out, closed = transport.value(), transport.disconnecting
    proto.connectionLost(None)
    return sorted(_frames(out)), closed


@target
def dns_stream(data: bytes) -> None:
    """DNS over TCP: whole frames out, each a DNS message; the answers and the close do not depend on chunking."""
    from twisted.names import dns

    whole = _dnsRun([data])
    split = _dnsRun(chunks(data))
    assert whole == split, (len(whole[0]), len(split[0]), whole[1], split[1])
    for frame in whole[0]:
        m = dns.Message()
        m.fromStr(frame)
        assert m.answer, frame[:40]
    # one answer per query framed, at most
    assert len(whole[0]) <= len(data) // 2 + 1


# -- HTTP -------------------------------------------------------------------------------

_web: dict[str, Any] = {}


def _site() -> tuple[Any, Any, Any]:
    """(clock, fast factory, site): the web service of a real configuration, on a memory reactor."""
    if not _web:
        from netsvc import config
        from netsvc.runtime import buildDaemon

        base = Path(tempfile.mkdtemp(prefix="netsvc-fuzz-"))
        root = base / "www"
        (root / "sub").mkdir(parents=True)
        (root / "index.html").write_bytes(b"<h1>netsvc</h1>\n")
        (root / "a.txt").write_bytes(b"hello\n" * 50)
        (root / "sub" / "b.css").write_bytes(b"body {}\n" * 30)
        clock = MemoryReactorClock()
        settings = config.parse(f"state_dir: {base / 'state'}\nservices:\n  web:\n"
                                f"    listen: ['tcp:0:interface=127.0.0.1']\n    root: {root}\n", "fuzz.yaml")
        web = buildDaemon(settings, clock).getServiceNamed("web")
        fast = web.listeners[0].target.wrappedFactory
        fast.site.reactor = clock
        _web.update(clock=clock, fast=fast, site=fast.site)
    return _web["clock"], _web["fast"], _web["site"]


class _LenientTransport(StringTransport):
    """Like TCP: resuming a closing transport is a no-op (StringTransport raises; netsvc/web/site.py's
    channel resumes reading in loseConnection so that TLS can read the close_notify)."""

    def resumeProducing(self) -> None:
        if not self.disconnecting:
            super().resumeProducing()


def _httpRun(protocol: Any, pieces: list[bytes], clock: Any) -> tuple[bytes, bool]:
    transport = _LenientTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:
            break
        protocol.dataReceived(piece)
        _nextTurns(clock)
    out, closed = transport.value(), transport.disconnecting
    protocol.connectionLost(None)
    return out, closed


def _nextTurns(clock: Any, most: int = 1000) -> None:
    """Run what waits for the next reactor turn (twisted.web answers 16 pipelined requests a turn, then
    goes on in the next: without the turns, a long pipeline looked half answered -- a false finding)."""
    for _ in range(most):
        due = [c for c in clock.getDelayedCalls() if c.active() and c.getTime() <= clock.seconds()]
        if not due:
            return
        clock.advance(0)


_STATUS = re.compile(rb"^HTTP/1\.[01] [1-5][0-9][0-9] ")


@target
def http_request(data: bytes) -> None:
    """
    The same bytes into the fast path (in pieces) and into twisted.web's own
    channel (at once): the same first status line and the same decision to
    close; responses are well formed and no more than the requests sent.
    """
    clock, fast, site = _site()
    a = _httpRun(fast.buildProtocol(PEER), chunks(data), clock)
    b = _httpRun(site.buildProtocol(PEER), [data], clock)
    for c in clock.getDelayedCalls():
        if c.active():
            c.cancel()
    for out, _ in (a, b):
        if out:
            assert _STATUS.match(out), out[:80]
    if not a[0] and not a[1] and b"\r\n\r\n" not in data:
        # The fast path waits for a whole head (CRLF CRLF) before it answers or hands over;
        # twisted.web may answer at once what the fast path hands it only later.  Nothing to compare yet.
        return
    first = [out.split(b"\r\n", 1)[0] for out, _ in (a, b)]
    assert first[0] == first[1], (first, a[1], b[1])
    # The close decision, once every head is complete: twisted.web checks a head line by line as it
    # comes (a header line without a colon is 400 as soon as the next line arrives); the fast path
    # takes a head whole (bad request lines, control characters and bare LFs it hands over at once),
    # so an unfinished head may still be waiting there -- bounded by MAX_HEAD and the head timeout.
    if data.endswith(b"\r\n\r\n"):
        assert a[1] == b[1], ("close", first, a[1], b[1])
    heads = data.count(b"\n\r\n") + data.count(b"\n\n") + 1
    assert a[0].count(b"HTTP/1.") <= max(heads, 1) * 2 or len(a[0]) < 100000, "more responses than requests"


# -- chat -------------------------------------------------------------------------------

#: What may never reach a terminal client inside one message: C0 controls but tab (LF and NUL
#: included: each framing's delimiter), DEL, C1, the bidi embeddings, overrides and isolates, and
#: the Unicode line and paragraph separators (tests/chat/test_forgery.py).
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class _Recording:
    """A framing that remembers what it rendered, and for which kinds of event."""

    def __init__(self) -> None:
        self.seen: dict[bytes, set[str]] = {}

    def render(self, event: Any) -> bytes:
        out = super().render(event)  # type: ignore[misc]
        self.seen.setdefault(out, set()).add(event.kind)
        return out


def _recording(framing: Any) -> Any:
    return type(f"Recording{type(framing).__name__}", (_Recording, type(framing)), {})()


class _Authority:
    """Reserves C{admin} (password C{pw}); the answer comes on the next reactor turn, as from the hash pool."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock

    def isReserved(self, nick: str) -> bool:
        return nick.lower() == "admin"

    def check(self, nick: str, password: str, client: Any = None) -> Any:
        from twisted.internet import task

        return task.deferLater(self.clock, 0, lambda: password == "pw")


class _FakeWebSocket:
    """The L{twisted.web.websocket.WebSocketTransport} a L{ChatWebSocket} writes to: text messages kept."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.transport = StringTransport(peerAddress=PEER)
        self.code: int | None = None

    def sendTextMessage(self, text: str) -> None:
        from wsproto.utilities import LocalProtocolError

        if self.code is not None:
            raise LocalProtocolError("Connection cannot send data: closed")  # as wsproto does
        self.messages.append(text)

    def loseConnection(self, code: int = 1000) -> None:
        self.code = code
        self.transport.loseConnection()

    def attachProducer(self, producer: Any) -> None:
        self.transport.registerProducer(producer, True)

    def detachProducer(self) -> None:
        self.transport.unregisterProducer()


def _chatShared(clock: Any, fanOut: Any = None, maxOutput: int = 16384) -> Any:
    from netsvc.chat.hub import Hub
    from netsvc.chat.protocol import ChatLimits, ChatMetrics, ChatShared, Flusher
    from netsvc.metrics import Registry

    metrics = ChatMetrics(Registry())
    hub = Hub(historySize=5, maxRooms=20, authority=_Authority(clock), onEvent=metrics.onHubEvent, fanOut=fanOut)
    limits = ChatLimits(maxLine=512, maxOutput=maxOutput, rate=50.0, burst=50.0)
    return ChatShared(hub, Flusher(clock), limits, clock, metrics)


class _ChatClient:
    """A client of one framing over a StringTransport (C{json}: the browser bridge over a fake WebSocket)."""

    def __init__(self, shared: Any, framing: str, port: int) -> None:
        from netsvc.chat.framing import FRAMINGS
        from netsvc.chat.web import JSON, ChatWebSocket

        peer = IPv4Address("TCP", "127.0.0.1", port)
        self.kind = framing
        if framing == "json":
            self.framing = _recording(JSON)
            self.ws: Any = ChatWebSocket(shared, peer)
            self.ws.chat.framing = self.framing
            self.socket = _FakeWebSocket()
            self.ws.negotiationStarted(self.socket)
            self.ws.negotiationFinished()
            self.proto = self.ws.chat
        else:
            from netsvc.chat.protocol import ChatProtocol

            self.framing = _recording(FRAMINGS[framing])
            self.proto = ChatProtocol(shared, self.framing)
            self.transport = StringTransport(peerAddress=peer)
            self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        if self.kind == "json":
            self.ws.textMessageReceived(data.decode("utf-8", "replace"))
        else:
            self.proto.dataReceived(data)

    def messages(self) -> list[bytes]:
        """What this client was sent, one rendered event each (with its delimiter)."""
        if self.kind == "json":
            out = "".join(self.socket.messages).encode("utf-8")
        else:
            out = self.transport.value()
        delimiter = self.framing.delimiter
        assert out == b"" or out.endswith(delimiter), ("output ends inside a message", self.kind, out[-80:])
        return [m + delimiter for m in out.split(delimiter)[:-1]]

    def check(self) -> None:
        """Each message is one event as its framing renders it; only a server notice reads as one."""
        import json

        for m in self.messages():
            kinds = self.framing.seen.get(m)
            assert kinds, ("a message that is no rendered event (a delimiter inside one?)", self.kind, m[:120])
            text = m[:-1].decode("utf-8")
            if self.kind == "json":
                event = json.loads(text)
                assert event["kind"] in kinds, (event, kinds)
                assert len(text.splitlines()) == 1, ("a line break a reader would split on", text[:120])
                continue
            assert _FORBIDDEN.search(text) is None, ("a control character reached a terminal", self.kind, text[:120])
            if _STAMP.sub("", text).startswith("***"):
                assert kinds == {"notice"}, ("client text reads as a server notice", self.kind, text[:120], kinds)
            else:
                assert "notice" not in kinds, (self.kind, text[:120], kinds)


def _chatRun(data: bytes, framing: str) -> None:
    clock = MemoryReactorClock()
    shared = _chatShared(clock)
    observers = [_ChatClient(shared, kind, 40001 + i) for i, kind in enumerate(("line", "nul", "json"))]
    for client, nick in zip(observers, ("lina", "nully", "webby")):
        client.send(nick.join(("/nick ", "\n" if client.kind == "line" else "\0")).encode()
                    if client.kind != "json" else f"/nick {nick}".encode())
    # One client that never reads: what waits for it stays bounded (else it is disconnected).
    stalled = _ChatClient(shared, "line", 40009)
    stalled.proto.pauseProducing()
    attacker = _ChatClient(shared, framing, 40010)
    clock.advance(0)
    limits = shared.limits
    for piece in chunks(data):
        if attacker.transport.disconnecting:
            break
        clock.advance(0)
        if attacker.transport.producerState == "paused":  # holding input while a nickname is checked
            clock.advance(0)
            if attacker.transport.producerState == "paused":
                break
        attacker.send(piece)
        assert len(attacker.proto._buffer) <= attacker.proto._maxWaiting + len(piece), len(attacker.proto._buffer)
        if not attacker.proto.paused:
            assert len(attacker.proto._buffer) <= limits.maxLine + len(piece), len(attacker.proto._buffer)
        held = sum(len(m) for m in stalled.proto._out)
        assert held <= limits.maxOutput + 2 * limits.maxLine + 256, ("output held for a stalled reader", held)
    clock.advance(0)
    if not attacker.transport.disconnecting:
        attacker.proto.readConnectionLost()
    attacker.proto.connectionLost(None)
    clock.advance(0)
    for client in observers + [attacker]:
        client.check()
    assert not stalled.proto.gone or stalled.transport.disconnecting


@target
def chat_stream(data: bytes) -> None:
    """
    Bytes from a chat client, as a line client and as a NUL client, into a hub
    where a line, a NUL and a browser (JSON) client listen: each sees whole
    events of its own framing, no control character or line break inside one,
    and nothing a client wrote reads as a server notice (C{***}); input held
    and output held for a client that does not read stay bounded.
    """
    for framing in ("line", "nul"):
        _chatRun(data, framing)


_chatWeb: dict[str, Any] = {}


def _chatSite() -> tuple[Any, Any, Any]:
    """(clock, fast factory, chat service): a daemon with web and chat, on a memory reactor."""
    if not _chatWeb:
        from netsvc import config
        from netsvc.runtime import buildDaemon

        base = Path(tempfile.mkdtemp(prefix="netsvc-fuzz-chat-"))
        (base / "www").mkdir()
        clock = MemoryReactorClock()
        settings = config.parse(
            f"state_dir: {base / 'state'}\nservices:\n  web:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
            f"    root: {base / 'www'}\n  chat:\n    listen: ['tcp:0:interface=127.0.0.1']\n"
            "    limits: {rate: 50, burst: 50, max_message: 512}\n", "fuzz.yaml")
        daemon = buildDaemon(settings, clock)
        fast = daemon.getServiceNamed("web").listeners[0].target.wrappedFactory
        fast.site.reactor = clock
        _chatWeb.update(clock=clock, fast=fast, chat=daemon.getServiceNamed("chat"))
    return _chatWeb["clock"], _chatWeb["fast"], _chatWeb["chat"]


_HANDSHAKE = (b"GET /chat/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
_MASK = b"\x37\xfa\x21\x3d"


def _wsFrame(head: int, payload: bytes, masked: bool = True) -> bytes:
    """One client frame: C{head} is the first byte as sent (FIN, RSV bits, opcode), any of them."""
    n = len(payload)
    size = bytes([n]) if n < 126 else (b"\x7e" + n.to_bytes(2, "big") if n < 65536 else b"\x7f" + n.to_bytes(8, "big"))
    if not masked:
        return bytes([head]) + size + payload
    size = bytes([size[0] | 0x80]) + size[1:]
    return bytes([head]) + size + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))


def _wsFrames(data: bytes) -> bytes:
    """
    The client's bytes after the handshake.  C{data[0]} odd: the rest as sent;
    even: frames, each C{head, length, payload} (masked unless the length byte has
    its high bit set), so that mutations stay mostly frames.
    """
    if not data:
        return b""
    if data[0] & 1:
        return data[1:]
    out, pos = [], 1
    while pos + 2 <= len(data):
        head, length = data[pos], data[pos + 1]
        payload = data[pos + 2:pos + 2 + (length & 0x7F)]
        pos += 2 + (length & 0x7F)
        out.append(_wsFrame(head, payload, masked=not length & 0x80))
    return b"".join(out)


def _atFrameBoundary(stream: bytes) -> bool:
    """Whether C{stream} (client frames) ends between frames (else a frame is still arriving)."""
    pos = 0
    while pos < len(stream):
        if pos + 2 > len(stream):
            return False
        masked, n = stream[pos + 1] & 0x80, stream[pos + 1] & 0x7F
        pos += 2
        if n >= 126:
            width = 2 if n == 126 else 8
            if pos + width > len(stream):
                return False
            n = int.from_bytes(stream[pos:pos + width], "big")
            pos += width
        pos += (4 if masked else 0) + n
    return pos == len(stream)


def _serverFrames(out: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each frame the server sent: unmasked, whole, final (wsproto never fragments)."""
    frames, pos = [], 0
    while pos < len(out):
        assert pos + 2 <= len(out), ("a torn frame header", out[pos:])
        head, size = out[pos], out[pos + 1]
        assert head & 0xF0 == 0x80 and not size & 0x80, ("a server frame fragmented, masked or with RSV",
                                                          out[pos:pos + 2])
        n, pos = size & 0x7F, pos + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            n, pos = int.from_bytes(out[pos:pos + width], "big"), pos + width
        assert pos + n <= len(out), ("a torn frame", n, len(out) - pos)
        frames.append((head & 0x0F, out[pos:pos + n]))
        pos += n
    return frames


@target
def ws_message(data: bytes) -> None:
    """
    The browser chat's WebSocket (through the fast path, twisted.web and the
    upgrade): after a good handshake, any frames or bytes.  Nothing raises, nothing
    is logged as a failure; the server's frames are whole, its text JSON events;
    the connection ends with a Close frame (and a code), or it still answers.
    """
    import json

    import attrs
    from twisted.logger import globalLogPublisher

    from netsvc.chat.hub import Hub
    from netsvc.chat.protocol import Flusher

    clock, fast, chat = _chatSite()
    shared = chat.shared = attrs.evolve(chat.shared, hub=Hub(5, 20), flusher=Flusher(clock))
    failures: list[Any] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        protocol = fast.buildProtocol(PEER)
        transport = _LenientTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        # The handshake first (in pieces), as a client waits for the 101 before it sends frames:
        # bytes sent in the read that completes the head stay in twisted.web's channel (pipelining).
        for piece in chunks(_HANDSHAKE, 3):
            protocol.dataReceived(piece)
        if zlib.crc32(data) & 1:  # else the first frames come while the welcome still waits to be sent
            clock.advance(0)
        assert transport.value().startswith(b"HTTP/1.1 101 "), transport.value()[:80]
        for piece in chunks(_wsFrames(data)):
            if transport.disconnecting:
                break
            protocol.dataReceived(piece)
            clock.advance(0)
        if not transport.disconnecting and _atFrameBoundary(_wsFrames(data)):
            before = len(transport.value().partition(b"\r\n\r\n")[2])
            protocol.dataReceived(_wsFrame(0x81, b"/who"))
            clock.advance(0)
            answer = _serverFrames(transport.value().partition(b"\r\n\r\n")[2][before:])
            assert any(op == 1 and re.search(rb'"text": "[0-9]+ in #', p) for op, p in answer) \
                or any(op == 8 for op, p in answer), ("the connection neither answers nor closes", answer)
        frames = _serverFrames(transport.value().partition(b"\r\n\r\n")[2])
        closes = [i for i, (op, _) in enumerate(frames) if op == 8]
        for op, payload in frames[:closes[0] if closes else None]:
            assert op in (1, 9, 10), ("unexpected frame before a close", op)
            if op == 1:
                for line in payload.decode("utf-8").splitlines():
                    assert "kind" in json.loads(line), line
        if closes:
            assert closes[0] == len(frames) - 1, "frames after the close"
            payload = frames[-1][1]  # empty only in answer to a Close without a code (RFC 6455 5.5.1)
            assert not payload or len(payload) >= 2 and 1000 <= int.from_bytes(payload[:2], "big") < 5000, payload
        if transport.disconnecting:
            assert closes or not transport.value().partition(b"\r\n\r\n")[2], "closed without a Close frame"
        protocol.connectionLost(None)
        clock.advance(0)
        assert not shared.hub.rooms["#lobby"].members, "the member outlived its connection"
    finally:
        globalLogPublisher.removeObserver(observe)
        for c in clock.getDelayedCalls():
            if c.active():
                c.cancel()
    assert not failures, [e.get("log_format") for e in failures]


class _FakeRedis:
    """The fan-out's view of Redis (L{netsvc.chat.redis.connection.Connections}), answered here."""

    up = True

    def __init__(self, history: list[Any]) -> None:
        from twisted.internet import defer

        self.history = history
        self.published: list[str] = []
        self.succeed = defer.succeed

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        from netsvc.chat.redis import scripts

        if script == scripts.LOAD:  # (topic, *history) of #dev; nothing stored for other rooms
            return self.succeed(self.history if keys[0].endswith("#dev") else [None])
        if script == scripts.PUBLISH:
            self.published.append(args[1])
        return self.succeed({scripts.CLAIM: 1, scripts.WHO: [], scripts.ROOMS: []}.get(script))

    def execute(self, *command: Any) -> Any:
        if command[0] == "PUBLISH":
            self.published.append(command[2])
        return self.succeed(None)

    def subscribe(self, channel: str) -> Any:
        return self.succeed(None)

    def unsubscribe(self, channel: str) -> None:
        pass


def _fromRedis(raw: bytes) -> str | bytes:
    """A reply as txredisapi hands it over: text when it is UTF-8, else bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


@target
def redis_payload(data: bytes) -> None:
    """
    Payloads from Redis (lines: a topic and room history until an empty line, then
    live events): parsePayload gives None or a well-typed event that re-encodes to
    itself; the room's history keeps only events that replay, and a member joining
    after them is shown each (whole events, no controls, no forged notice); what
    this node publishes, the others accept.
    """
    import json

    from netsvc.chat.redis.fanout import MAX_NAME, MAX_TEXT, RedisFanOut, RedisMetrics, parsePayload
    from netsvc.metrics import Registry

    lines = data.split(b"\n")
    cut = lines.index(b"") if b"" in lines else len(lines)
    stored, live = [_fromRedis(x) for x in lines[:cut]], [_fromRedis(x) for x in lines[cut + 1:]]
    for raw in stored + live:
        parsed = parsePayload(raw)
        if parsed is None:
            continue
        assert isinstance(parsed["o"], str) and 0 < len(parsed["o"]) <= MAX_NAME, parsed
        assert isinstance(parsed["x"], str) and len(parsed["x"]) <= MAX_TEXT, parsed
        assert parsePayload(json.dumps(parsed)) == parsed, parsed

    clock = MemoryReactorClock()
    fan = RedisFanOut(None, "fuzz", RedisMetrics(Registry()), clock, historySize=5)
    fan.node, fan.mine = "node0", "node0|"
    fan.redis = redis = _FakeRedis(stored or [""])  # LOAD gives the topic ('' when none) first
    shared = _chatShared(clock, fanOut=fan)
    clients = [_ChatClient(shared, kind, 40001 + i) for i, kind in enumerate(("line", "nul", "json"))]
    for client, nick in zip(clients, ("lina", "nully", "webby")):
        for command in (f"/nick {nick}", "/join #dev"):
            client.send(command.encode() + (b"" if client.kind == "json" else client.framing.delimiter))
    clock.advance(0)
    room = shared.hub.rooms["#dev"]
    for raw in live:
        fan.messageReceived("netsvc:chat:room:#dev", raw)  # type: ignore[arg-type]
    clients[0].send(b"said here\n/me acts here\n/topic set here\n")
    clock.advance(0)
    assert len(room.history) <= 5 and all(e.kind in ("message", "action") for e in room.history), room.history
    late = _ChatClient(shared, "line", 40009)
    late.send(b"/join #dev\n")
    clock.advance(0)
    assert not late.proto.gone, "joining after the history failed"
    replayed = [m for m in late.messages() if _STAMP.match(m.decode("utf-8"))]
    assert len(replayed) == len(room.history), (replayed, room.history)
    for client in clients + [late]:
        assert not client.proto.gone, ("a member was dropped", client.kind)
        client.check()
    for payload in redis.published:
        assert parsePayload(payload) is not None, ("another node would drop what this one published", payload)
    for c in clock.getDelayedCalls():
        if c.active():
            c.cancel()


# -- DNS local data -------------------------------------------------------------------

_localFiles: dict[str, Path] = {}


def _wireName(name: str) -> bytes:
    """C{name} as a client asks for it (wire labels); AssertionError if no client could."""
    raw = name.encode("utf-8")
    labels = raw.split(b".") if raw else []
    assert all(0 < len(label) <= 63 for label in labels), ("a name no query can hold", name)
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    assert len(wire) <= 255, ("a name no query can hold", name)
    return wire


def _ask(local: Any, name: str, qtype: int) -> Any:
    """What the local data answers to a query for C{name}: the parsed message, or None (not local)."""
    import struct

    from twisted.names import dns

    from netsvc.dns import wire

    query = wire.parseQuery(struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + _wireName(name) + struct.pack("!HH", qtype, 1))
    stored = local.lookup(query.key, 1000.0)
    if stored is None:
        return None
    m = dns.Message()
    m.fromStr(stored.render(query, 1000.0))
    assert m.id == 7 and len(m.queries) == 1, m
    return m


@target
def dns_local_data(data: bytes) -> None:
    """
    Local DNS data (records, a hosts file, a blocklist: sections split by a
    C{--} line): a record is refused with a clear problem (one line) or it
    answers its name and type; a hosts line's valid names answer their address;
    a blocked domain and names under it are NXDOMAIN; never a traceback.
    """
    from twisted.names import dns

    from netsvc.dns.local import TYPES, LocalData, normalName, ownerName, parseBlocklist, parseHosts
    from netsvc.dns.service import Record

    text = data.decode("utf-8", "replace")
    sections = (text.split("\n--\n") + ["", ""])[:3]
    if not _localFiles:
        folder = Path(tempfile.mkdtemp(prefix="netsvc-fuzz-dns-"))
        _localFiles.update(hosts=folder / "hosts", blocklist=folder / "blocked.txt")
    _localFiles["hosts"].write_text(sections[1], encoding="utf-8", errors="surrogateescape")
    _localFiles["blocklist"].write_text(sections[2], encoding="utf-8", errors="surrogateescape")
    records = []
    for line in sections[0].splitlines():
        words = line.split(None, 2)
        if len(words) < 3 or words[1].upper() not in TYPES:
            continue  # (the configuration's schema refuses other types)
        record = Record(name=words[0], type=words[1].upper(), value=words[2], ttl=300)
        problems = record.check()
        for key, message in problems:
            assert key in ("name", "value") and message and "\n" not in message and "Traceback" not in message, \
                (key, message)
        if not problems:
            records.append((record.name, record.type, record.value, record.ttl))
    local = LocalData(records, [str(_localFiles["hosts"])], str(_localFiles["blocklist"]))
    blocked = parseBlocklist(sections[2])
    for name, rtype, _, _ in records:
        owner = ownerName(name, rtype)
        m = _ask(local, owner, TYPES[rtype])
        assert m is not None, ("a record that does not answer", name, rtype)
        if local.isBlocked(owner):
            assert m.rCode == dns.ENAME, (name, m.rCode)
        else:
            assert m.rCode == dns.OK and any(rr.type == TYPES[rtype] for rr in m.answers), (name, rtype, m.answers)
    for address, names in parseHosts(sections[1]):
        qtype = dns.AAAA if ":" in address else dns.A
        for name in names:
            owner = normalName(name)
            if not name.isascii() or any(not 0 < len(label) <= 63 for label in owner.split(".")) \
                    or len(owner) > 253:
                continue  # (skipped as a hosts file line)
            m = _ask(local, owner, qtype)
            assert m is not None, ("a hosts name that does not answer", name, address)
            if not local.isBlocked(owner):
                assert m.rCode == dns.OK and m.answers, (name, address, m.rCode)
    for name in blocked:
        if not name.isascii() or len(name) > 240 or any(not 0 < len(label) <= 63 for label in name.split(".")):
            continue
        for asked in (name, "www." + name):
            m = _ask(local, asked, dns.A)
            assert m is not None and m.rCode == dns.ENAME, ("a blocked name answered", asked)


_tree: dict[str, Any] = {}


def _fileTree() -> Any:
    """A FileTree over a small root: files, a folder, a hidden file, and symlinks pointing out of it."""
    if not _tree:
        import os

        from netsvc.web.files import FileTree

        base = Path(tempfile.mkdtemp(prefix="netsvc-fuzz-files-"))
        root = base / "www"
        (root / "sub" / "deeper").mkdir(parents=True)
        (root / ".well-known").mkdir()
        (base / "secret.txt").write_bytes(b"outside\n")
        (root / "index.html").write_bytes(b"<h1>netsvc</h1>\n")
        (root / "a.txt").write_bytes(b"hello\n" * 50)
        (root / "empty.txt").write_bytes(b"")
        (root / ".hidden").write_bytes(b"hidden\n")
        (root / "sub" / "b.css").write_bytes(b"body {}\n")
        (root / "sub" / "deeper" / "caf\u00e9 %.txt").write_bytes(b"x\n")
        (root / ".well-known" / "security.txt").write_bytes(b"Contact: x\n")
        os.symlink(base / "secret.txt", root / "escape.txt")
        os.symlink(base, root / "up")
        os.symlink("sub", root / "inside")
        _tree.update(tree=FileTree(str(root), listing=True), root=os.path.realpath(root))
    return _tree["tree"]


@target
def http_headers(data: bytes) -> None:
    """
    Request header values and paths for static files (lines: Range,
    Accept-Encoding, If-None-Match, If-Modified-Since, a path): ranges lie inside
    the file and coalesce to the same bytes; Accept-Encoding is read without regard
    to case and an explicit refusal wins; an ETag listed matches; a date parsed
    formats back to itself; a path resolves to a file under the root or to
    nothing, and its canonical spelling resolves the same.
    """
    import os

    from netsvc.web.files import FileEntry, Listing, Redirect
    from netsvc.web.negotiate import (
        MAX_RANGES,
        Unsatisfiable,
        acceptsGzip,
        coalesce,
        etagMatches,
        httpDate,
        parseHTTPDate,
        parseRange,
    )

    fields = (data.split(b"\n") + [b""] * 5)[:5]
    rangeHeader, encodings, inm, since, path = fields
    for size in (0, 1, 300, 100000):
        try:
            ranges = parseRange(rangeHeader, size)
        except Unsatisfiable:
            continue
        if ranges is None:
            continue
        assert 0 < len(ranges) <= MAX_RANGES, ranges
        for a, b in ranges:
            assert 0 <= a <= b < size, (rangeHeader, size, ranges)
        merged = coalesce(ranges)
        assert all(merged[i][1] + 1 < merged[i + 1][0] for i in range(len(merged) - 1)), merged
        covered = {i for a, b in ranges for i in range(a, min(b, a + 1000) + 1)}
        assert covered <= {i for a, b in merged for i in range(a, b + 1)}, (ranges, merged)

    gzip = acceptsGzip(encodings)
    assert gzip == acceptsGzip(encodings.swapcase()), encodings
    assert not acceptsGzip(b"gzip;q=0, " + encodings), encodings
    if encodings.strip():
        assert acceptsGzip(b"gzip, " + encodings)

    etag = b'"5f-1a2b"'
    assert etagMatches(inm + b", " + etag, etag) and etagMatches(b"W/" + etag + b"," + inm, etag)
    assert not etagMatches(b"W/" + etag, etag, weak=False) or inm.strip() == b"*"
    if etagMatches(inm, etag, weak=False):
        assert etagMatches(inm, etag), inm

    seconds = parseHTTPDate(since)
    if seconds is not None and 0 <= seconds < 253402300800:
        assert parseHTTPDate(httpDate(seconds)) == seconds, (since, seconds)

    tree = _fileTree()
    root = _tree["root"]
    canon = tree.canonical(path)
    found = tree.lookup(path)
    if canon is None:
        assert found is None, (path, found)
        return
    key, segments, folder = canon
    assert key.startswith(b"/") and tree.canonical(key) == canon, (path, canon, tree.canonical(key))
    for seg in segments:
        assert seg not in ("", ".", "..") and "/" not in seg and "\x00" not in seg, segments
    joined = os.path.normpath(os.path.join(root, *segments))
    assert joined == root or joined.startswith(root + os.sep), (path, joined)
    if isinstance(found, FileEntry):
        real = os.path.realpath(found.path)
        assert real.startswith(root + os.sep), ("a file outside the root", path, real)
    elif isinstance(found, Redirect):
        assert found.location.startswith(b"/") and not found.location.startswith(b"//"), found.location
        assert tree.canonical(found.location)[0] == found.location, found.location
    else:
        assert found is None or isinstance(found, Listing), found
    again = tree.lookup(key)
    assert type(again) is type(found) and getattr(again, "path", None) == getattr(found, "path", None), \
        (path, key, found, again)


# -- HTTP/2 ---------------------------------------------------------------------------

#: What every client sends first (RFC 9113 section 3.4): the fuzzed bytes follow it.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2Frames(out: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream) of each frame in C{out}; asserts the frames are whole."""
    frames, pos = [], 0
    while pos < len(out):
        assert pos + 9 <= len(out), ("a partial frame header", out[pos:pos + 9])
        length = int.from_bytes(out[pos:pos + 3], "big")
        kind, flags = out[pos + 3], out[pos + 4]
        stream = int.from_bytes(out[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        assert length <= 16384, ("a frame over the default SETTINGS_MAX_FRAME_SIZE", length)
        pos += 9 + length
        assert pos <= len(out), "a partial frame"
        frames.append((kind, flags, stream))
    return frames


def _h2Run(engine: str, pieces: list[bytes]) -> tuple[list[tuple[int, int, int]], bool, int]:
    from netsvc.web.http2 import MAX_STREAMS, H2Channel

    clock, _, site = _site()
    channel = H2Channel(site, engine)
    transport = _LenientTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    most = 0
    for piece in pieces:
        if transport.disconnecting:
            break
        channel.dataReceived(piece)
        most = max(most, len(channel.streams))
    out, closed = transport.value(), transport.disconnecting
    channel.connectionLost(None)
    for c in clock.getDelayedCalls():
        if c.active():
            c.cancel()
    assert most <= MAX_STREAMS, ("more streams open than announced", most)
    return _h2Frames(out), closed, most


@target
def http2_frames(data: bytes) -> None:
    """
    Frames after the client preface into the HTTP/2 protocol on each engine (libnghttp2 and h2):
    no exception, whole frames out (none over the default frame size), never more streams open
    than announced; a GOAWAY is the last thing sent when the connection is closed for a fault,
    and both engines answer the same streams with HEADERS.
    """
    from netsvc.web import h2engine

    pieces = chunks(H2_PREFACE + data)
    results = {}
    for engine in ("native", "python"):
        if h2engine.available(engine) != engine:
            continue
        frames, closed, _ = _h2Run(engine, pieces)
        goaways = [i for i, f in enumerate(frames) if f[0] == 0x7]
        if closed and goaways:
            assert all(f[0] in (0x7, 0x4, 0x6, 0x8) or f[2] for f in frames[goaways[0]:]), frames
        # Streams answered with a response head (HEADERS on a client-initiated stream).
        results[engine] = (closed, sorted({f[2] for f in frames if f[0] == 0x1 and f[2] % 2 == 1}))
    if len(results) == 2 and not any(closed for closed, _ in results.values()):
        # Engines differ in what they tolerate (a fault may end one's connection and not the other's);
        # where both go on, they answered the same streams.
        assert results["native"][1] == results["python"][1], results


# -- POP3 ---------------------------------------------------------------------------


@target
def pop3_session(data: bytes) -> None:
    """
    A logged-out POP3 session under TLS over an in-memory maildrop: the same answers, close and
    removals however the bytes are cut into reads; no more answers than lines; nothing removed
    without QUIT.
    """
    from tests.mailbox.test_pop3 import pop3Session

    out, closed, removed = pop3Session(data)
    assert pop3Session(data, chunks(data, 40)) == (out, closed, removed)
    answers = out.count(b"\r\n+OK") + out.count(b"\r\n-ERR") + out.count(b"\r\n+ ")
    assert answers <= data.count(b"\n") + 1, (answers, data.count(b"\n"))
    if b"QUIT" not in data.upper():
        assert not any(removed), removed


# -- IMAP ---------------------------------------------------------------------------


@target
def imap_session(data: bytes) -> None:
    """
    An IMAP session over a StringTransport on a store with two messages: no error logged, every
    answer ends with CRLF, unparsed input bounded, the session's state consistent
    (tests/mailbox/test_imap.py's own fuzz test).
    """
    from tests.mailbox.test_imap import imap_session as run

    run(data)
