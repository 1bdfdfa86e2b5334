"""
Search operations of the server protocol (RFC 4511 4.5): scopes and filters through
the directory, attribute selection (L{netsvc.ldap.answer}), client and server size
and time limits, the scan (cost) limit, the paged results control (RFC 2696), the
root DSE and the subschema entry.  A mixin of L{netsvc.ldap.server.LDAPServerProtocol}:
it uses C{self.factory}, C{self.write}, C{self.boundDN} and C{self._mayRead()}.
"""

from __future__ import annotations

import hashlib
from typing import Any

from netsvc.ldap import codec
from netsvc.ldap.answer import NSUBSCHEMA, OID_MANAGE_DSA_IT, OID_PAGED, Selection, answer, answerSpecial
from netsvc.ldap.codec import BERError
from netsvc.ldap.directory import ScanLimit
from netsvc.ldap.dn import DNError, normalizeDN, parentDN
from netsvc.ldap.match import assertions, matches
from netsvc.ldap.resultcodes import (
    ADMIN_LIMIT,
    INSUFFICIENT_ACCESS,
    INVALID_DN_SYNTAX,
    NO_SUCH_OBJECT,
    PROTOCOL_ERROR,
    SIZE_LIMIT,
    SUCCESS,
    TIME_LIMIT,
    UNAVAILABLE_CRITICAL_EXTENSION,
    UNWILLING,
)

#: Paged searches one connection may keep open at once (the oldest is dropped).
MAX_PAGED = 8
#: An open paged search holds its compiled filter until the next page.  Those with filters of more than
#: LIGHT_FILTER assertions may hold at most PAGED_WEIGHT assertions in all, across connections (about
#: 1.3 KB each); beyond, a new one gets its first page, then adminLimitExceeded.
LIGHT_FILTER = 64
PAGED_WEIGHT = 32768


class _Stream:
    """
    A search whose entries are being written: kept by the connection while its
    transport is paused (the client does not read), resumed when it drains.
    C{then(code, text, full, count)} ends it (writes the SearchResultDone).
    """

    __slots__ = ("msgid", "results", "sel", "sizeLimit", "deadline", "sent", "count", "pageSize", "then")

    def __init__(self, msgid: int, results: Any, sel: Selection, sizeLimit: int, deadline: float, sent: int,
                 pageSize: int, then: Any) -> None:
        self.msgid = msgid
        self.results = results
        self.sel = sel
        self.sizeLimit = sizeLimit
        self.deadline = deadline
        self.sent = sent
        self.count = 0
        self.pageSize = pageSize
        self.then = then


class _Paged:
    __slots__ = ("key", "results", "sent", "weight")

    def __init__(self, key: tuple, results: Any, weight: int = 0) -> None:
        self.key = key
        self.results = results
        self.sent = 0
        self.weight = weight if weight > LIGHT_FILTER else 0


class SearchOperations:
    factory: Any
    boundDN: str | None
    paged: dict
    _nextCookie: int
    writesPaused: bool
    #: The search being written, suspended while the transport is paused (None: none).
    streaming: _Stream | None = None

    def write(self, data: bytes) -> None:  # provided by the protocol
        raise NotImplementedError

    def _mayRead(self) -> bool:
        raise NotImplementedError

    def search(self, msg: codec.Message) -> None:
        req: codec.SearchRequest = msg.op
        factory = self.factory
        factory.metrics.searches.inc()
        done = codec.SEARCH_DONE
        paged = None
        for c in msg.controls:
            if c.oid == OID_PAGED:
                paged = c
            elif c.critical and c.oid != OID_MANAGE_DSA_IT:
                self.write(codec.result(msg.id, done, UNAVAILABLE_CRITICAL_EXTENSION,
                                        f"control {c.oid} is not supported"))
                return
        try:
            base = normalizeDN(req.base)
        except DNError as e:
            self.write(codec.result(msg.id, done, INVALID_DN_SYNTAX, str(e)))
            return
        sel = Selection.parse(req.attributes, req.typesOnly)
        if req.scope == 0 and base in ("", NSUBSCHEMA):
            special = factory.rootDSE if base == "" else factory.subschema
            if matches(req.filter, special):
                self.write(answerSpecial(msg.id, special, sel))
                factory.metrics.entries.inc()
            self.write(codec.result(msg.id, done, SUCCESS))
            return
        if not self._mayRead():
            self.write(codec.result(msg.id, done, INSUFFICIENT_ACCESS, "anonymous access is disabled; bind first"))
            return
        directory = factory.directory
        scope = req.scope
        if base == "":  # below the root: the naming context (and, for the subtrees, what is under it)
            base, scope = directory.nsuffix, {1: 0, 3: 2}.get(scope, scope)
        if base not in directory.entries:
            self.write(codec.result(msg.id, done, NO_SUCH_OBJECT, matched=self._matched(base)))
            return
        limits = factory.limits
        sizeLimit = min(req.sizeLimit or limits.sizeLimit, limits.sizeLimit)
        timeLimit = min(req.timeLimit or limits.timeLimit, limits.timeLimit)
        if paged is not None:
            self._pagedSearch(msg, paged, base, scope, sel, sizeLimit, timeLimit)
            return
        results = directory.search(base, scope, req.filter, limits.maxScan, self.boundDN)

        def then(code: int, text: str, full: bool, count: int) -> None:
            self.write(codec.result(msg.id, done, code, text))

        self._send(msg.id, results, sel, sizeLimit, timeLimit, 0, then=then)

    def _send(self, msgid: int, results: Any, sel: Selection, sizeLimit: int, timeLimit: float,
              already: int, pageSize: int = 0, then: Any = None) -> None:
        """
        Write entries from C{results} (C{already} sent on earlier pages, at most
        C{pageSize} now if not 0), then call C{then(result code, text, whether a
        full page was sent, how many were sent now)}.  When the transport pauses
        (the client does not read) the rest waits in C{self.streaming} until
        L{pumpSearch} is called again: one search never holds more than a chunk
        of its answer in memory.
        """
        stream = _Stream(msgid, results, sel, sizeLimit, self.factory.now() + timeLimit, already, pageSize, then)
        self.streaming = stream
        self.pumpSearch()

    def pumpSearch(self) -> None:
        """Write the streaming search's entries until it ends or the transport pauses."""
        stream = self.streaming
        if stream is None:
            return
        factory = self.factory
        directory = factory.directory
        boundDN = self.boundDN
        msgid, sel, sizeLimit, deadline, pageSize = (stream.msgid, stream.sel, stream.sizeLimit, stream.deadline,
                                                     stream.pageSize)
        sent, count = stream.sent, stream.count
        write = self.write
        outcome: tuple[int, str, bool] | None = None
        try:
            for entry in stream.results:
                if sent >= sizeLimit:
                    outcome = SIZE_LIMIT, "", False
                    break
                write(answer(msgid, entry, directory, sel, entry.ndn == boundDN))
                sent += 1
                count += 1
                if count & 63 == 0 and factory.now() > deadline:
                    outcome = TIME_LIMIT, "", False
                    break
                if pageSize and count >= pageSize:
                    outcome = SUCCESS, "", True
                    break
                if self.writesPaused:  # the rest when the client has read what is sent
                    factory.metrics.entries.inc(count - stream.count)
                    stream.sent, stream.count = sent, count
                    return
            else:
                outcome = SUCCESS, "", False
        except ScanLimit:
            outcome = ADMIN_LIMIT, "search examined too many entries; use an indexed filter", False
        factory.metrics.entries.inc(count - stream.count)
        self.streaming = None
        code, text, full = outcome
        stream.then(code, text, full, count)

    def _pagedSearch(self, msg: codec.Message, control: codec.Control, base: str, scope: int, sel: Selection,
                     sizeLimit: int, timeLimit: float) -> None:
        req = msg.op
        done = codec.SEARCH_DONE
        try:
            size, cookie = _pagedValue(control.value)
        except BERError as e:
            self.write(codec.result(msg.id, done, PROTOCOL_ERROR, f"bad paged results control: {e}"))
            return
        # A digest: the filter's text could be a megabyte, kept as long as the paged search.
        key = hashlib.sha256(repr((base, scope, req.filter, req.attributes)).encode()).digest()
        if cookie:
            state = self.paged.pop(cookie, None)
            if state is None or state.key != key:
                self.write(codec.result(msg.id, done, UNWILLING if state is None else PROTOCOL_ERROR,
                                        "unknown or stale paged results cookie"))
                return
        else:
            state = _Paged(key, self.factory.directory.search(base, scope, req.filter, self.factory.limits.maxScan,
                                                              self.boundDN), assertions(req.filter))
        if size <= 0:  # the client abandons the paged search
            self.write(codec.result(msg.id, done, SUCCESS, controls=_pagedControl(b"")))
            return

        def then(code: int, text: str, more: bool, count: int) -> None:
            state.sent += count
            cookie = b""
            if more and code == SUCCESS:
                if state.weight and self.factory.pagedWeight() + state.weight > PAGED_WEIGHT:
                    code, text = ADMIN_LIMIT, "too many large paged searches are open; try again later"
                else:
                    cookie = self._peekMore(state)
            self.write(codec.result(msg.id, done, code, text, controls=_pagedControl(cookie)))

        self._send(msg.id, state.results, sel, sizeLimit, timeLimit, state.sent, size, then=then)

    def _peekMore(self, state: _Paged) -> bytes:
        """A cookie for the rest of C{state}'s results, or b"" when there are none."""
        try:
            first = next(state.results)
        except StopIteration:
            return b""
        except ScanLimit:
            first = None

        def chained(first=first, rest=state.results):
            if first is None:
                raise ScanLimit()
            yield first
            yield from rest

        state.results = chained()
        self._nextCookie += 1
        cookie = self._nextCookie.to_bytes(4, "big")
        if len(self.paged) >= MAX_PAGED:
            self.paged.pop(next(iter(self.paged)))
        self.paged[cookie] = state
        return cookie

    def _matched(self, ndn: str) -> str:
        """The DN of the closest existing ancestor of C{ndn} (matchedDN)."""
        entries = self.factory.directory.entries
        parent = parentDN(ndn)
        while parent:
            e = entries.get(parent)
            if e is not None:
                return e.dn
            parent = parentDN(parent)
        return ""


def _pagedValue(value: bytes | None) -> tuple[int, bytes]:
    """(size, cookie) of a paged results control value."""
    if not value:
        raise BERError("no value")
    tag, s, e = codec.header(value, 0, len(value))
    if tag != 0x30:
        raise BERError("not a SEQUENCE")
    t, ss, se = codec.header(value, s, e)
    if t != 0x02 or se - ss > 8 or se == ss:
        raise BERError("bad size")
    size = int.from_bytes(value[ss:se], "big", signed=True)
    t, cs, ce = codec.header(value, se, e)
    if t != 0x04:
        raise BERError("bad cookie")
    return size, value[cs:ce]


def _pagedControl(cookie: bytes) -> bytes:
    return codec.controls([(OID_PAGED, codec.tlv(0x30, codec.integer(0) + codec.tlv(0x04, cookie)))])
