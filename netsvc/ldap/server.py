"""
The LDAP server protocol (RFC 4511) over a L{netsvc.ldap.directory.Directory}:
wire behaviour only; the service builds the factory from settings.

Operations:
  - bind: anonymous (when allowed), simple against C{userPassword}
    (L{Directory.checkPassword}); a DN with an empty password is
    unwillingToPerform (53) as slapd answers, a name that is no DN invalidDNSyntax
    (34); wrong passwords are invalidCredentials
    (49), and a client IP that fails too often is refused without a check for a
    while (reserve first: each bind takes a token before its check, a success gives
    it back); SASL is authMethodNotSupported (7).  Requests sent while a bind is
    being checked wait for it (RFC 4511 4.2.1).
  - search: scopes, filters (L{netsvc.ldap.match}), C{*}/C{+}/C{1.1}, size, time and
    scan limits (4, 3, 11), the paged results control (RFC 2696), the root DSE and
    C{cn=Subschema} (in L{netsvc.ldap.searching}).  Results of one read are written
    in one batch (pipelining).
  - compare, whoami (RFC 4532), StartTLS (RFC 4511 4.14: success, then TLS), password
    modify (RFC 3062, writable directories: L{netsvc.ldap.passwd}).
  - add, modify, delete, modify DN: by writers only, saved before the answer
    (L{netsvc.ldap.writes}: off the reactor, one at a time; the connection's later
    requests wait for it); unwillingToPerform when the directory is read-only.
  - abandon: nothing to do (every operation finishes before the next is read).
Back-pressure: the protocol is its transport's producer.  When the client does
not read, the transport pauses it: no further request is handled (nor read),
and a search being answered stops between two entries and goes on when the
client has read (what is held: the transport's buffer and at most OUTPUT_CHUNK).
Malformed input (bad BER, unknown operations, a request over C{maxRequest}
bytes -- checked from its length header, before it is buffered) gets a Notice of
Disconnection (protocolError) and the connection is closed.  A filter nested
too deeply, or a scope that does not exist, only fails its own search (protocolError).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from netsvc import auth
from netsvc.ldap import codec
from netsvc.ldap.answer import OID_PASSWORD_MODIFY, OID_STARTTLS, OID_WHOAMI, rootDSE, subschemaEntry
from netsvc.ldap.codec import BERError, RequestRefused
from netsvc.ldap.directory import Directory
from netsvc.ldap.dn import DNError, normalizeDN
from netsvc.ldap.entry import SECRET
from netsvc.ldap.match import matches
from netsvc.ldap.passwd import PasswordOperations
from netsvc.ldap.resultcodes import (
    AUTH_METHOD_NOT_SUPPORTED,
    BUSY,
    COMPARE_FALSE,
    COMPARE_TRUE,
    INSUFFICIENT_ACCESS,
    INVALID_CREDENTIALS,
    INVALID_DN_SYNTAX,
    NO_SUCH_ATTRIBUTE,
    NO_SUCH_OBJECT,
    OPERATIONS_ERROR,
    OTHER,
    PROTOCOL_ERROR,
    SUCCESS,
    UNAVAILABLE,
    UNWILLING,
)
from netsvc.ldap.schema import SCHEMA
from netsvc.ldap.searching import SearchOperations
from netsvc.ldap.writes import WriteError, isWriter
from netsvc.policies import peerHost
from netsvc.rates import RateLimiter

log = Logger()

#: Answers are handed to the transport once this much is batched (it then pauses us when its buffer is full).
OUTPUT_CHUNK = 64 * 1024
#: After closing, how long a peer has to finish (TLS close_notify) before the connection is aborted.
CLOSE_GRACE = 5.0


class LDAPLimits:
    """What the factory enforces (from the settings; replaced on reload)."""

    def __init__(self, anonymous: str = "read", sizeLimit: int = 500, timeLimit: float = 10.0,
                 maxScan: int = 100_000, maxRequest: int = 1 << 20, failedBindRate: float = 1.0,
                 failedBindBurst: int = 10, writers: list[str] | None = None) -> None:
        self.anonymous = anonymous
        self.sizeLimit = sizeLimit
        self.timeLimit = timeLimit
        self.maxScan = maxScan
        self.maxRequest = maxRequest
        self.failedBindRate = failedBindRate
        self.failedBindBurst = failedBindBurst
        self.writers = writers or []


class LDAPMetrics:
    """The counters of the LDAP service (bound to its service label)."""

    def __init__(self, registry: Any, service: str = "ldap") -> None:
        binds = registry.counter("netsvc_ldap_binds_total",
                                 "LDAP binds, by result (ok, failed, limited: refused unchecked, too many failures).",
                                 ["service", "result"])
        self.bindsOk = binds.labels(service=service, result="ok")
        self.bindsFailed = binds.labels(service=service, result="failed")
        self.bindsLimited = binds.labels(service=service, result="limited")
        self.searches = registry.counter("netsvc_ldap_searches_total", "LDAP searches.",
                                         ["service"]).labels(service=service)
        self.entries = registry.counter("netsvc_ldap_entries_returned_total", "Entries returned by searches.",
                                        ["service"]).labels(service=service)
        self.writes = registry.counter("netsvc_ldap_writes_total", "Changes saved (add, modify, delete, rename).",
                                       ["service"]).labels(service=service)
        self.protocolErrors = registry.counter(
            "netsvc_ldap_protocol_errors_total", "Connections closed for malformed requests.",
            ["service"]).labels(service=service)


class LDAPServerFactory(Factory):
    """
    @param directory: what is served.
    @param tlsOptions: a callable giving the server's C{CertificateOptions} for
        StartTLS, or None (StartTLS is then not offered).
    @param now: the clock searches' time limits use.
    @param store: where writes go (L{netsvc.ldap.writes.LDIFStore}); None: the directory is read-only.
    """

    def __init__(self, directory: Directory, limits: LDAPLimits, metrics: LDAPMetrics, clock: Any,
                 tlsOptions: Any = None, now: Any = time.monotonic, store: Any = None) -> None:
        self.store = store
        self.directory = directory
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.tlsOptions = tlsOptions
        self.now = now
        #: Failed binds per client address (a bind is refused while its bucket is empty).
        self.failedBinds = RateLimiter(limits.failedBindRate, limits.failedBindBurst, clock)
        self.protocols: set[LDAPServerProtocol] = set()  # connected
        self.rootDSE = rootDSE(directory.suffix, tlsOptions is not None, store is not None)
        self.subschema = subschemaEntry()

    def buildProtocol(self, addr: Any) -> LDAPServerProtocol:
        p = LDAPServerProtocol(self)
        p.factory = self
        return p

    def reconfigure(self, limits: LDAPLimits) -> None:
        self.limits = limits
        self.failedBinds = RateLimiter(limits.failedBindRate, limits.failedBindBurst, self.clock)
        self.rootDSE = rootDSE(self.directory.suffix, self.tlsOptions is not None, self.store is not None)

    def pagedWeight(self) -> int:
        """The assertions held by open paged searches with large filters, on all connections."""
        return sum(state.weight for p in self.protocols for state in p.paged.values())


#: Pipelined requests one connection has handled in one reactor turn before the rest waits.
TURN_BUDGET = 64


class LDAPServerProtocol(SearchOperations, PasswordOperations, Protocol):
    def __init__(self, factory: LDAPServerFactory) -> None:
        self.factory = factory
        self.buffer = bytearray()
        self.boundDN: str | None = None  # normalized DN of the bound identity, None: anonymous
        self.boundName = ""  # its DN as written
        self.tls = False
        self.waiting = False  # a bind is being checked: requests wait
        self.writesPaused = False  # the client does not read its answers: requests wait
        self._abortCall: Any = None
        self.closing = False
        self.paged: dict = {}  # cookie -> the rest of a paged search (netsvc.ldap.searching)
        self._nextCookie = 0
        self._out: list[bytes] | None = None
        self._outSize = 0
        self.streaming = None  # a search whose entries wait for the client to read (netsvc.ldap.searching)
        self.host = "?"
        self._turnCall: Any = None  # this reactor turn's share of pipelined requests is spent

    def connectionMade(self) -> None:
        self.host = peerHost(self.transport.getPeer())
        self.factory.protocols.add(self)
        self.tls = ISSLTransport.providedBy(self.transport)
        # Responses are written whole, once per read: Nagle would only hold the last one back.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:  # not a TCP socket
                pass
        # Back-pressure: when the client does not read its answers, the transport's
        # buffer fills, it pauses us, and we stop reading requests (bounded memory).
        self.transport.registerProducer(self, True)

    # -- as a producer of answers, toward the transport

    def pauseProducing(self) -> None:
        self.writesPaused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.writesPaused = False
        if not self.waiting and not self.closing and self._turnCall is None:
            self.transport.resumeProducing()
            self.dataReceived(b"")

    def stopProducing(self) -> None:
        self.closing = True

    # -- input

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self.buffer
        buf += data
        out = self._out = []
        self._outSize = 0
        handled = 0
        try:
            if self.streaming is not None and not self.writesPaused:
                self._resumeSearch()
            while buf and not self.waiting and not self.closing and not self.writesPaused and self.streaming is None:
                if handled >= TURN_BUDGET and self._turnCall is None:
                    # This turn's share: the rest waits for the next turn, reading paused (a read of
                    # ~1,300 pipelined searches answered at once kept every other client waiting).
                    self.transport.pauseProducing()
                    self._turnCall = self.factory.clock.callLater(0, self._nextTurn)
                    break
                if self._turnCall is not None:
                    break
                handled += 1
                try:
                    head = codec.frame(buf)
                except BERError as e:
                    self.protocolError(str(e))
                    break
                if head is None:
                    break
                size = head[0] + head[1]
                if size > self.factory.limits.maxRequest:
                    self.protocolError(f"request of {size} bytes is over the limit "
                                       f"({self.factory.limits.maxRequest})")
                    break
                if len(buf) < size:
                    break
                raw = bytes(buf[:size])
                del buf[:size]
                self.handle(raw)
            if self.waiting and len(buf) > self.factory.limits.maxRequest * 4:
                self.protocolError("too much sent while a bind is checked")
        finally:
            self._out = None
            if out:
                self.transport.write(b"".join(out))

    def _nextTurn(self) -> None:
        self._turnCall = None
        if not self.waiting and not self.closing and not self.writesPaused:
            self.transport.resumeProducing()
            self.dataReceived(b"")

    def _resumeSearch(self) -> None:
        """Write more of the search that waited for the client to read (see L{SearchOperations.pumpSearch})."""
        stream = self.streaming
        try:
            self.pumpSearch()
        except Exception:
            log.failure("ldap: error answering a search from {client}", client=self.host)
            self.streaming = None
            self.write(codec.result(stream.msgid, codec.SEARCH_DONE, OTHER, "internal error"))

    def write(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(data)
            self._outSize += len(data)
            if len(out) >= 256 or self._outSize >= OUTPUT_CHUNK:  # goes now: the transport may pause us
                chunk = b"".join(out)
                out.clear()
                self._outSize = 0
                self.transport.write(chunk)
        elif not self.closing:
            self.transport.write(data)

    def protocolError(self, reason: str) -> None:
        """Malformed input: a Notice of Disconnection, then close."""
        if self.closing:
            return
        self.factory.metrics.protocolErrors.inc()
        log.info("ldap: closing {client}: {reason}", client=self.host, reason=reason)
        self.write(codec.noticeOfDisconnection(PROTOCOL_ERROR, reason))
        self.close()

    def close(self) -> None:
        """
        Send what is pending and close; a peer that does not finish the close (a TLS
        close_notify that never comes) is cut off after L{CLOSE_GRACE} seconds.
        """
        self.closing = True
        self.streaming = None
        self.buffer.clear()
        if self._out:
            chunk = b"".join(self._out)
            self._out.clear()
            self.transport.write(chunk)
        self.transport.loseConnection()
        self._abortCall = self.factory.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def handle(self, raw: bytes) -> None:
        try:
            msg = codec.decodeMessage(raw)
        except RequestRefused as e:  # only searches raise it
            self.write(codec.result(e.messageID, codec.SEARCH_DONE, PROTOCOL_ERROR, str(e)))  # type: ignore
            return
        except BERError as e:
            self.protocolError(str(e))
            return
        tag = msg.tag
        try:
            if tag == codec.SEARCH_REQUEST:
                self.search(msg)
            elif tag == codec.BIND_REQUEST:
                self.bind(msg)
            elif tag == codec.UNBIND_REQUEST:
                self.close()
            elif tag == codec.EXTENDED_REQUEST:
                self.extended(msg)
            elif tag == codec.COMPARE_REQUEST:
                self.compare(msg)
            elif tag == codec.ABANDON_REQUEST:
                pass
            else:  # add, modify, delete, modify DN
                self.change(msg)
        except Exception:
            log.failure("ldap: error handling a request from {client}", client=self.host)
            response = codec.RESPONSE_FOR.get(tag)
            if response is not None:
                self.write(codec.result(msg.id, response, OTHER, "internal error"))

    # -- bind

    def bind(self, msg: codec.Message) -> None:
        req = msg.op
        self.boundDN, self.boundName = None, ""
        self.paged.clear()
        metrics = self.factory.metrics
        if req.version != 3:
            metrics.bindsFailed.inc()
            self.write(codec.result(msg.id, codec.BIND_RESPONSE, PROTOCOL_ERROR, "only LDAPv3 is supported"))
            return
        if req.mechanism is not None:
            metrics.bindsFailed.inc()
            self.write(codec.result(msg.id, codec.BIND_RESPONSE, AUTH_METHOD_NOT_SUPPORTED,
                                    "SASL is not supported; use a simple bind (over TLS)"))
            return
        if not req.name:
            if req.simple:
                metrics.bindsFailed.inc()
                self.write(codec.result(msg.id, codec.BIND_RESPONSE, UNWILLING, "a password without a DN"))
            elif self.factory.limits.anonymous == "none":
                metrics.bindsFailed.inc()
                self.write(codec.result(msg.id, codec.BIND_RESPONSE, UNWILLING, "anonymous bind disallowed"))
            else:
                metrics.bindsOk.inc()
                self.write(codec.result(msg.id, codec.BIND_RESPONSE, SUCCESS))
            return
        if not req.simple:
            metrics.bindsFailed.inc()
            self.write(codec.result(msg.id, codec.BIND_RESPONSE, UNWILLING,
                                    "unauthenticated bind (DN with no password) disallowed"))
            return
        try:
            normalizeDN(req.name)
        except DNError as e:
            metrics.bindsFailed.inc()
            self.write(codec.result(msg.id, codec.BIND_RESPONSE, INVALID_DN_SYNTAX, str(e)))
            return
        # Reserve first: a failure is charged before the check and given back on success, so that
        # binds checked in parallel (a slow scheme) cannot all pass a bucket none of them has emptied yet.
        if not self.factory.failedBinds.allow(self.host):
            metrics.bindsLimited.inc()
            self.write(codec.result(msg.id, codec.BIND_RESPONSE, INVALID_CREDENTIALS,
                                    "too many failed binds from this address; try again later"))
            return
        try:
            password = req.simple.decode("utf-8")
        except UnicodeDecodeError:
            password = "\0invalid"
        failedBinds = self.factory.failedBinds  # (the one charged, even if a reload replaces it meanwhile)
        d = self.factory.directory.checkPassword(req.name, password)
        if not d.called:  # checked in a thread: later requests wait for the answer
            self.hold()
        d.addCallback(lambda ok: self._bound(msg.id, req.name, ok, failedBinds))

    def _bound(self, msgid: int, name: str, ok: bool, failedBinds: RateLimiter) -> None:
        metrics = self.factory.metrics
        if isinstance(ok, auth.Refused):  # not checked (the hashing pool is full): not a failure
            failedBinds.refund(self.host)
            metrics.bindsLimited.inc()
            self.write(codec.result(msgid, codec.BIND_RESPONSE, BUSY,
                                    "too many password checks in progress; try again later"))
        elif ok:
            failedBinds.refund(self.host)
            entry = self.factory.directory.get(name)
            self.boundDN, self.boundName = (entry.ndn, entry.dn) if entry else (None, "")
            metrics.bindsOk.inc()
            self.write(codec.result(msgid, codec.BIND_RESPONSE, SUCCESS))
        else:
            metrics.bindsFailed.inc()
            self.write(codec.result(msgid, codec.BIND_RESPONSE, INVALID_CREDENTIALS))
        self.release()

    def hold(self) -> None:
        """A check runs in a thread (a bind's password): later requests wait (RFC 4511 4.2.1)."""
        self.waiting = True
        self.transport.pauseProducing()

    def release(self) -> None:
        """The check is done: the requests that waited are handled now."""
        if self.waiting:
            self.waiting = False
            if not self.closing and not self.writesPaused and self._turnCall is None:
                self.transport.resumeProducing()
                self.dataReceived(b"")

    # -- writes

    def change(self, msg: codec.Message) -> None:
        response = codec.RESPONSE_FOR[msg.tag]
        factory = self.factory
        if factory.store is None:
            self.write(codec.result(msg.id, response, UNWILLING, "the directory is read-only (served from LDIF files)"))
            return
        if not isWriter(factory.directory, self.boundDN, factory.limits.writers):
            self.write(codec.result(msg.id, response, INSUFFICIENT_ACCESS, "only writers may change the directory"))
            return
        d = factory.store.submit(msg.op)
        if not d.called:  # saved off the reactor: later requests wait for the answer (answers stay in order)
            self.hold()

        def saved(_: None) -> None:
            factory.metrics.writes.inc()
            log.info("ldap: {client} ({who}) changed {dn}", client=self.host, who=self.boundName, dn=msg.op.dn)
            self.write(codec.result(msg.id, response, SUCCESS))

        def refused(f: Any) -> None:
            e = f.value if f.check(WriteError) else WriteError(OTHER, "internal error")
            if not f.check(WriteError):
                log.failure("ldap: a write from {client} failed", f, client=self.host)
            self.write(codec.result(msg.id, response, e.code, e.text, e.matched))

        d.addCallbacks(saved, refused).addBoth(lambda _: self.release())

    # -- extended operations, compare

    def extended(self, msg: codec.Message) -> None:
        name = msg.op.name
        if name == OID_WHOAMI:
            identity = f"dn:{self.boundName}" if self.boundDN is not None else ""
            self.write(codec.result(msg.id, codec.EXTENDED_RESPONSE, SUCCESS,
                                    extra=codec.tlv(0x8B, identity.encode())))
        elif name == OID_STARTTLS:
            self.startTLS(msg)
        elif name == OID_PASSWORD_MODIFY:
            self.passwordModify(msg)
        else:
            self.write(codec.result(msg.id, codec.EXTENDED_RESPONSE, PROTOCOL_ERROR,
                                    f"unsupported extended operation {name}"))

    def startTLS(self, msg: codec.Message) -> None:
        oid = codec.tlv(0x8A, OID_STARTTLS.encode())
        if self.tls:
            self.write(codec.result(msg.id, codec.EXTENDED_RESPONSE, OPERATIONS_ERROR, "TLS already started",
                                    extra=oid))
            return
        if self.factory.tlsOptions is None:
            self.write(codec.result(msg.id, codec.EXTENDED_RESPONSE, UNAVAILABLE, "TLS is not configured",
                                    extra=oid))
            return
        if self.buffer:
            # Sent behind the request, in clear (RFC 4511 4.14.1 forbids it): were it served, answers to
            # requests injected by a man in the middle would go out inside the TLS session.
            self.protocolError("requests sent after StartTLS before its response")
            return
        # The success response goes out in clear, then everything after is TLS.
        self.write(codec.result(msg.id, codec.EXTENDED_RESPONSE, SUCCESS, extra=oid))
        if self._out:
            self.transport.write(b"".join(self._out))
            self._out.clear()
        self.tls = True
        self.transport.startTLS(self.factory.tlsOptions())

    def compare(self, msg: codec.Message) -> None:
        req = msg.op
        directory = self.factory.directory
        if not self._mayRead():
            self.write(codec.result(msg.id, codec.COMPARE_RESPONSE, INSUFFICIENT_ACCESS,
                                    "anonymous access is disabled; bind first"))
            return
        entry = directory.get(req.dn)
        if entry is None:
            self.write(codec.result(msg.id, codec.COMPARE_RESPONSE, NO_SUCH_OBJECT))
            return
        canon = SCHEMA.canonical(req.attribute)
        if canon == SECRET and entry.ndn != self.boundDN:
            self.write(codec.result(msg.id, codec.COMPARE_RESPONSE, INSUFFICIENT_ACCESS))
            return
        if canon not in entry.attrs:
            self.write(codec.result(msg.id, codec.COMPARE_RESPONSE, NO_SUCH_ATTRIBUTE))
            return
        same = matches(("eq", req.attribute, req.value), entry, self.boundDN)
        self.write(codec.result(msg.id, codec.COMPARE_RESPONSE, COMPARE_TRUE if same else COMPARE_FALSE))

    def _mayRead(self) -> bool:
        return self.boundDN is not None or self.factory.limits.anonymous == "read"

    def connectionLost(self, reason: Any) -> None:
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None
        if self._turnCall is not None and self._turnCall.active():
            self._turnCall.cancel()
        self._turnCall = None
        self.closing = True
        self.streaming = None
        self.paged.clear()
        self.factory.protocols.discard(self)
        self.buffer = bytearray()
