"""
An LDAP client connection on ldaptor's BER codec: simple bind, verified StartTLS,
search (with the paged-results control followed automatically), whoami (RFC 4532),
compare, with a timeout on every operation.

    conn = yield connect(reactor, parseURL("ldap://127.0.0.1:3389"), starttls=True, cacert="ca.pem")
    yield conn.bind("uid=jo,ou=users,dc=example,dc=com", "secret")        # LDAPError(49) if wrong
    done = yield conn.search("dc=example,dc=com", SCOPES["sub"], parseFilter("(uid=jo)"),
                             ["cn"], onEntry=print, pageSize=100)
    done.resultCode                                                       # 0, 4 (size limit)...
    conn.unbind()

Contract: every Deferred fires (a result, an L{LDAPError} for a non-success LDAP
result, or the connection's failure: refused, timed out -- the connection is then
aborted, TLS failed).  StartTLS always verifies the server's certificate and name
(L{netsvc.tls.clientCreator}), never ldaptor's unverified default.  Nothing here
reads ldaptor's global C{ldaptor.config}.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import attrs
from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from OpenSSL import SSL
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from netsvc import clients
from netsvc.ldap import codec
from netsvc.ldap.clienttypes import (
    DEREF,
    LDAPURL,
    MAX_MESSAGE,
    NOTICE_OF_DISCONNECTION,
    PAGED_RESULTS,
    RESULT_NAMES,
    SCOPES,
    WHOAMI,
    LDAPError,
    SearchDone,
    StartTLSError,
    decodeText,
    describe,
    pagedResultsControl,
    pagedResultsCookie,
    parseURL,
    verificationErrors,
)
from netsvc.tls import clientCreator

__all__ = ["DEREF", "MAX_MESSAGE", "NOTICE_OF_DISCONNECTION", "PAGED_RESULTS", "RESULT_NAMES", "SCOPES", "WHOAMI",
           "LDAPConnection", "LDAPError", "LDAPURL", "SearchDone", "StartTLSError", "connect", "describe",
           "pagedResultsControl", "pagedResultsCookie", "parseURL"]


@implementer(IHandshakeListener)
class LDAPConnection(LDAPClient):
    """
    One LDAP connection.  Requests may overlap (each has its message id); a
    request that gets no answer within C{timeout} seconds aborts the connection
    and fails with C{TimeoutError} (a late answer would find nothing to go to).
    """

    def __init__(self, reactor: Any, timeout: float = 10.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.timeout = timeout
        self._pending: dict[int, tuple[defer.Deferred, Callable[[Any, Any], bool] | None]] = {}
        self._tls: defer.Deferred | None = None
        self.lostReason: Any = None
        #: Bytes received after the message being handled (in the same read).
        self._unread = 0
        self.notice = ""
        #: The name the server's certificate must carry (set by L{connect}).
        self.hostname: str | None = None

    # -- transport events ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # Messages are cut by their BER length first (a length past MAX_MESSAGE is refused before
        # anything is buffered), then each is decoded by ldaptor; the buffer is trimmed once per read.
        buffer, self.buffer = (self.buffer + data if self.buffer else data), b""
        offset = 0
        try:
            while self.connected and len(buffer) - offset >= 2:
                try:
                    length, lengthLength = pureber.berDecodeLength(buffer, offset + 1)
                except pureber.BERExceptionInsufficientData:
                    break
                size = 1 + lengthLength + length
                if size > MAX_MESSAGE:
                    self._protocolError(f"server message larger than {MAX_MESSAGE} bytes")
                    return
                if len(buffer) - offset < size:
                    break
                message = buffer[offset:offset + size]
                offset += size
                self._unread = len(buffer) - offset
                self._message(message)
        finally:
            self.buffer = buffer[offset:] if self.connected else b""
            self._unread = 0

    def _message(self, data: bytes) -> None:
        if self._fastEntry(data):
            return
        try:
            # ldaptor prints unknown BER tags to stdout (where our LDIF goes), and returns None.
            with contextlib.redirect_stdout(io.StringIO()):
                message, _ = pureber.berDecodeObject(self.berdecoder, data)
        except Exception as e:
            self._protocolError(f"undecodable message from the server ({type(e).__name__})")
            return
        if not isinstance(getattr(message, "value", None), pureldap.LDAPProtocolResponse):
            self._protocolError("unexpected message from the server")
            return
        self.handle(message)

    def _fastEntry(self, data: bytes) -> bool:
        """
        A SearchResultEntry without controls, decoded with L{codec.header} (the hot path of
        big searches: ldaptor's decoder builds several objects per element, ~10x slower).
        False when the message is anything else, or malformed: ldaptor then has its say.
        """
        try:
            _, start, end = codec.header(data, 0, len(data))
            tag, s, e = codec.header(data, start, end)
            if tag != 0x02 or not 0 < e - s <= 4:
                return False
            messageId = int.from_bytes(data[s:e], "big", signed=True)
            tag, start, opEnd = codec.header(data, e, end)
            if tag != codec.SEARCH_ENTRY or opEnd != end:
                return False
            tag, s, e = codec.header(data, start, opEnd)
            if tag != 0x04:
                return False
            dn = data[s:e]
            tag, pos, listEnd = codec.header(data, e, opEnd)
            if tag != 0x30 or listEnd != opEnd:
                return False
            attributes = []
            while pos < listEnd:
                tag, s, pos = codec.header(data, pos, listEnd)
                nameTag, ns, ne = codec.header(data, s, pos)
                setTag, vs, ve = codec.header(data, ne, pos)
                if tag != 0x30 or nameTag != 0x04 or setTag != 0x31 or ve != pos:
                    return False
                values = []
                while vs < ve:
                    valueTag, s, vs = codec.header(data, vs, ve)
                    if valueTag != 0x04:
                        return False
                    values.append(data[s:vs])
                attributes.append((data[ns:ne], values))
        except codec.BERError:
            return False
        self.handle(_Message(messageId, pureldap.LDAPSearchResultEntry(dn, attributes), None))
        return True

    def _protocolError(self, why: str) -> None:
        self.lostReason = error.ConnectionLost(why)
        self.connected = 0  # nothing more is read or sent on this connection
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = 0
        if self.lostReason is None:
            if reason is not None and reason.check(SSL.Error, *verificationErrors()):
                self.lostReason = reason.value
            elif self.notice:
                self.lostReason = error.ConnectionLost(f"the server closed the connection: {self.notice}")
            else:
                self.lostReason = error.ConnectionLost("the server closed the connection")
        pending, self._pending = self._pending, {}
        for d, _ in pending.values():
            d.errback(self.lostReason)
        if self._tls is not None:
            d, self._tls = self._tls, None
            d.errback(StartTLSError(describe(self.lostReason, self.hostname)))

    def awaitHandshake(self) -> defer.Deferred:
        """Fires with self when the TLS handshake is done and verified; fails with L{StartTLSError}."""
        self._tls = d = defer.Deferred()
        timer = self.reactor.callLater(self.timeout, self._handshakeExpired, d)
        return d.addBoth(_cancelTimer, timer)

    def _handshakeExpired(self, d: defer.Deferred) -> None:
        if self._tls is d:
            self._tls = None
            self.lostReason = error.TimeoutError(string=f"no TLS handshake in {self.timeout:g}s")
            d.errback(StartTLSError(f"TLS handshake timed out after {self.timeout:g}s"))
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        # Twisted calls this even when the certificate's name did not match: the name check
        # (service_identity, at the end of the handshake) has then aborted the TLS layer, and
        # connectionLost with the reason follows.  The TLS layer is the transport (LDAPS) or,
        # after StartTLS, the TCP transport's protocol.
        layer = self.transport.protocol if getattr(self.transport, "TLS", False) else self.transport
        if getattr(layer, "disconnecting", False) or self._tls is None:
            return
        d, self._tls = self._tls, None
        d.callback(self)

    def handle(self, msg: Any) -> None:
        if msg.id == 0:  # unsolicited: the server is about to close (RFC 4511 4.4.1)
            self.notice = decodeText(getattr(msg.value, "errorMessage", "")) or "notice of disconnection"
            return
        entry = self._pending.get(msg.id)
        if entry is None:
            return  # an answer to a request that timed out
        d, handler = entry
        if handler is None or handler(msg.value, msg.controls):
            del self._pending[msg.id]
            d.callback((msg.value, msg.controls))

    # -- requests ----------------------------------------------------------------

    def request(self, op: Any, controls: Sequence[tuple] | None = None,
                handler: Callable[[Any, Any], bool] | None = None, timeout: float | None = None) -> defer.Deferred:
        """
        Send C{op}; fires with C{(response, controls)} of the answer -- with a
        C{handler} (called with each response and its controls, returning True at
        the last), of the last one.  C{timeout} bounds the wait for the last answer.
        """
        if not self.connected:
            return defer.fail(self.lostReason or error.NotConnectingError("not connected"))
        msg = pureldap.LDAPMessage(op, controls=list(controls) if controls else None)
        d: defer.Deferred = defer.Deferred()
        self._pending[msg.id] = (d, handler)
        self.transport.write(msg.toWire())
        limit = self.timeout if timeout is None else timeout
        timer = self.reactor.callLater(limit, self._expired, msg.id, limit)
        d.addBoth(_cancelTimer, timer)
        return d

    def _expired(self, messageId: int, limit: float) -> None:
        entry = self._pending.pop(messageId, None)
        if entry is not None:
            self.lostReason = error.TimeoutError(string=f"no answer in {limit:g}s")
            entry[0].errback(self.lostReason)
            self.transport.abortConnection()

    @defer.inlineCallbacks
    def _result(self, op: Any) -> Any:
        response, _ = yield self.request(op)
        if response.resultCode != 0:
            raise LDAPError(response.resultCode, decodeText(response.errorMessage), decodeText(response.matchedDN))
        return response

    def bind(self, dn: str = "", password: str | bytes = "") -> defer.Deferred:
        """Simple bind (anonymous with both empty); fails with L{LDAPError} (49: wrong password)."""
        auth = password.encode("utf-8") if isinstance(password, str) else password
        return self._result(pureldap.LDAPBindRequest(dn=dn.encode("utf-8"), auth=auth))

    def startTLS(self, creator: Any) -> defer.Deferred:  # type: ignore[override]
        """
        StartTLS (RFC 4511 4.14) with C{creator} (required: L{netsvc.tls.clientCreator});
        fires with self once the handshake is done and the certificate verified, or fails
        with L{StartTLSError}.
        """
        if creator is None:
            raise TypeError("startTLS needs a verifying connection creator (netsvc.tls.clientCreator)")
        if self._pending:
            return defer.fail(StartTLSError("requests are still outstanding"))

        def started(response: Any) -> defer.Deferred:
            if self._unread:
                # Bytes after the response came in clear text: whoever sent them is not to be believed
                # once TLS is up (the STARTTLS injection of CVE-2011-0411 and friends).
                self._protocolError("the server sent clear text after agreeing to StartTLS")
                raise StartTLSError("the server sent clear text after agreeing to StartTLS")
            waiting = self.awaitHandshake()
            self.transport.startTLS(creator)
            return waiting

        def refused(f: Any) -> Any:
            if f.check(LDAPError):
                raise StartTLSError(f"the server refused StartTLS: {f.value}")
            return f

        return self._result(pureldap.LDAPStartTLSRequest()).addCallbacks(started, refused)

    def whoami(self) -> defer.Deferred:
        """RFC 4532: fires with the authorization identity (C{"dn:..."}, C{"u:..."}, or C{""} for anonymous)."""
        d = self._result(pureldap.LDAPExtendedRequest(requestName=WHOAMI))
        return d.addCallback(lambda r: decodeText(r.response or b""))

    def compare(self, dn: str, attribute: str, value: bytes) -> defer.Deferred:
        """Fires True (compareTrue) or False (compareFalse); any other result is an L{LDAPError}."""
        ava = pureldap.LDAPAttributeValueAssertion(pureldap.LDAPAttributeDescription(attribute.encode("utf-8")),
                                                   pureldap.LDAPAssertionValue(value))
        d = self.request(pureldap.LDAPCompareRequest(entry=dn.encode("utf-8"), ava=ava))

        def answered(result: Any) -> bool:
            response, _ = result
            if response.resultCode in (5, 6):
                return response.resultCode == 6
            raise LDAPError(response.resultCode, decodeText(response.errorMessage), decodeText(response.matchedDN))

        return d.addCallback(answered)

    def searchPage(self, request: Any, onEntry: Callable[[str, list], Any],
                   controls: Sequence[tuple] | None = None, timeout: float | None = None) -> defer.Deferred:
        """
        One search request; C{onEntry(dn, [(attribute, [values])])} for each entry.
        Fires with C{(LDAPSearchResultDone, response controls, entries, references)};
        if C{onEntry} raises, the connection is aborted and this fails with that exception.
        """
        done: defer.Deferred = defer.Deferred()
        counts = {"entries": 0}
        references: list[str] = []

        def handler(response: Any, responseControls: Any) -> bool:
            if isinstance(response, pureldap.LDAPSearchResultEntry):
                counts["entries"] += 1
                attributes = [(decodeText(name), list(values)) for name, values in response.attributes]
                try:
                    onEntry(decodeText(response.objectName), attributes)
                except Exception as e:  # e.g. the output is gone: stop the search, fail with that
                    if not done.called:
                        done.errback(e)
                    self._protocolError(f"search stopped: {e}")
                    return True
                return False
            if isinstance(response, pureldap.LDAPSearchResultReference):
                references.extend(decodeText(getattr(u, "value", u)) for u in response.uris)
                return False
            done.callback((response, responseControls, counts["entries"], references))
            return True

        d = self.request(request, controls, handler, timeout)
        d.addErrback(lambda f: done.errback(f) if not done.called else None)
        return done

    @defer.inlineCallbacks
    def search(self, base: str, scope: int, filter: Any, attributes: Sequence[str] = (),
               onEntry: Callable[[str, list], Any] = lambda dn, attrs: None, sizeLimit: int = 0,
               timeLimit: int = 0, typesOnly: bool = False, pageSize: int = 0,
               criticalPaging: bool = False, derefAliases: int = 0) -> Any:
        """
        Search, following the paged-results cookie until the server says it is done
        (C{pageSize} > 0).  Fires with a L{SearchDone} whatever the result code
        (a size limit still delivers entries); fails only when the connection does.
        """
        cookie = b""
        total, pages, refs = 0, 0, []
        # The server's time limit, plus time for the answer to travel.
        wait = (timeLimit + self.timeout) if timeLimit else None
        while True:
            request = pureldap.LDAPSearchRequest(
                baseObject=base.encode("utf-8"), scope=scope, sizeLimit=sizeLimit, timeLimit=timeLimit,
                typesOnly=bool(typesOnly), filter=filter, attributes=[a.encode("utf-8") for a in attributes],
                derefAliases=derefAliases)
            controls = [pagedResultsControl(pageSize, cookie, criticalPaging)] if pageSize else None
            response, responseControls, count, references = yield self.searchPage(
                request, onEntry, controls, wait)
            total += count
            pages += 1
            refs.extend(references)
            result = SearchDone(response.resultCode, decodeText(response.errorMessage), decodeText(response.matchedDN),
                                total, tuple(refs), pages)
            if not pageSize or response.resultCode != 0:
                return result
            cookie = pagedResultsCookie(responseControls) or b""
            if not cookie:
                return result
            if sizeLimit and total >= sizeLimit:
                # Tell the server we are done with this paged search (RFC 2696: size 0).
                request = pureldap.LDAPSearchRequest(baseObject=base.encode("utf-8"), scope=scope, filter=filter,
                                                     attributes=[b"1.1"])
                yield self.searchPage(request, lambda dn, a: None, [pagedResultsControl(0, cookie)], wait)
                return attrs.evolve(result, resultCode=4, message="")

    def unbind(self) -> None:
        """Say goodbye and close (never fails)."""
        if self.connected:
            self.transport.write(pureldap.LDAPMessage(pureldap.LDAPUnbindRequest()).toWire())
            self.transport.loseConnection()


class _Message(NamedTuple):
    id: int
    value: Any
    controls: Any


def _cancelTimer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result


@defer.inlineCallbacks
def connect(reactor: Any, url: LDAPURL, starttls: bool = False, cacert: str | None = None,
            insecure: bool = False, timeout: float = 10.0) -> Any:
    """
    Connect to C{url} (LDAPS verified against C{cacert} or the system roots),
    then StartTLS if asked (verified the same way).  Fires with an L{LDAPConnection}.

    The endpoint is built as every netsvc client builds it (L{clients.streamEndpoint}),
    which is what ldaptor's C{connectToLDAPEndpoint} does from a string; a C{tls:}
    endpoint string only takes a folder of trust roots, not a CA file.
    """
    if starttls and url.tls:
        raise ValueError("StartTLS on an ldaps:// connection: choose one")
    endpoint = clients.streamEndpoint(reactor, url.host, url.port, url.tls, cacert, insecure, timeout)
    d = endpoints.connectProtocol(endpoint, LDAPConnection(reactor, timeout))
    d.addTimeout(timeout, reactor)
    connection = yield d
    connection.hostname = url.host
    try:
        if url.tls:
            yield connection.awaitHandshake()
        if starttls:
            yield connection.startTLS(clientCreator(url.host, cafile=cacert, insecure=insecure))
    except BaseException:
        if connection.connected:
            connection.transport.abortConnection()
        raise
    return connection
