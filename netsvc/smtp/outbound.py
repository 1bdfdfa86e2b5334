"""
Outgoing SMTP sessions for the delivery engine: an endpoint per target, the
TLS policy, the smarthost's credentials.

    openSession = SessionOpener(settings, reactor, resolvePath)
    d = openSession(target, nextMessage, onResult)   # fires when the session ends

  - a smarthost C{tls:} endpoint: implicit TLS, verified (its C{cafile=}, else
    C{relay.cacert}, else the system roots);
  - otherwise plain TCP (to the MX address found by routing, or the smarthost by
    name) with STARTTLS as C{relay.starttls} says: C{required} verifies the
    certificate against the host name (the MX name, or the smarthost's C{sni=}
    or host); C{opportunistic} encrypts when offered without checking the
    certificate (RFC 7435 -- what MTAs do by default on port 25, since most MX
    certificates do not match) and goes on in clear if the handshake fails; C{none}
    stays in plaintext.
  - AUTH (PLAIN/LOGIN) to the smarthost when C{relay.auth} is set, only over
    verified TLS: whatever C{starttls} says, a session that will send the password
    uses STARTTLS required (verified, no fall-back to clear text), and a C{tls:}
    smarthost is verified even with C{insecure=yes} -- a failed or unverified
    handshake fails the attempt (the message is deferred and retried), the
    password never leaves.  Only C{auth.insecure_send_password_without_verified_tls}
    turns that off.  The password file is read once, at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import endpoints, protocol
from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger

from netsvc.smtp.sender import SMTPSender
from netsvc.smtp.sendertypes import SessionError
from netsvc.tls import clientCreator

log = Logger()

#: Seconds to wait for a TCP connection, and for each reply.
CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 300.0


class SessionOpener:
    def __init__(self, settings: Any, reactor: Any, resolvePath: Any = Path,
                 replyTimeout: float = REPLY_TIMEOUT) -> None:
        relay = settings.relay
        self.reactor = reactor
        self.hostname = settings.hostname
        self.starttls = relay.starttls
        self.cacert = str(resolvePath(relay.cacert)) if relay.cacert else None
        if self.cacert is not None:
            clientCreator("localhost", cafile=self.cacert)  # a bad file fails at start-up, not at delivery
        self.replyTimeout = replyTimeout
        self.auth: tuple[str, str] | None = None
        #: The password may go over unverified TLS or clear text (the user's explicit choice).
        self.passwordAnyway = False
        if relay.auth is not None:
            lines = Path(resolvePath(relay.auth.password_file)).read_text().splitlines()
            self.auth = (relay.auth.user, lines[0] if lines else "")
            self.passwordAnyway = relay.auth.insecure_send_password_without_verified_tls
        self.smarthost = None
        if relay.smarthost:
            from netsvc.endpoints import parseClient

            self.smarthost = parseClient(relay.smarthost)
        #: Sessions carry the smarthost password: verified TLS only (see the module docstring).
        self.verifiedOnly = self.auth is not None and self.smarthost is not None and not self.passwordAnyway

    def endpoint(self, target: Any) -> Any:
        address = target.address
        if address is None and self.smarthost is not None:
            host = self.smarthost.host
            if self.smarthost.isIPLiteral:
                address = host
        if address is not None:
            kind = endpoints.TCP6ClientEndpoint if isIPv6Address(address) else endpoints.TCP4ClientEndpoint
            stream: Any = kind(self.reactor, address, target.port, timeout=CONNECT_TIMEOUT)
        else:
            stream = endpoints.HostnameEndpoint(self.reactor, target.host.encode("idna"), target.port,
                                                timeout=CONNECT_TIMEOUT)
        if target.tls:
            cafile = (self.smarthost.cafile if self.smarthost is not None else None) or self.cacert
            insecure = self.smarthost.insecure if self.smarthost is not None else False
            if self.verifiedOnly:
                insecure = False
            stream = endpoints.wrapClientTLS(clientCreator(target.host, cafile=cafile, insecure=insecure), stream)
        return stream

    def __call__(self, target: Any, nextMessage: Any, onResult: Any) -> Any:
        starttls = "none" if target.tls else self.starttls
        if self.verifiedOnly and not target.tls:
            starttls = "required"  # the password goes only over verified TLS, never after a fall-back
        d = self.session(target, nextMessage, onResult, starttls)
        if starttls == "opportunistic":
            def plaintext(f: Any) -> Any:
                # The STARTTLS handshake failed (before any message): as other MTAs do, try again in clear.
                if f.check(SessionError) and f.value.tlsFailed and f.value.current is None:
                    log.info("delivery: {target}: TLS handshake failed ({error}); trying without TLS",
                             target=str(target), error=str(f.value))
                    return self.session(target, nextMessage, onResult, "none")
                return f

            d.addErrback(plaintext)
        return d

    def session(self, target: Any, nextMessage: Any, onResult: Any, starttls: str) -> Any:
        """One connection and SMTP session to C{target}; fires when it ends (L{SMTPSender.done})."""
        creator = None
        if starttls == "required":
            creator = clientCreator(target.host, cafile=self.cacert)
        elif starttls == "opportunistic":
            creator = clientCreator(target.host, insecure=True)
        sender = SMTPSender(self.hostname, nextMessage, onResult, starttls=starttls, tlsCreator=creator,
                            auth=self.auth if self.smarthost is not None else None, timeout=self.replyTimeout,
                            authWithoutTLS=self.passwordAnyway)
        factory = protocol.Factory.forProtocol(lambda: sender)
        factory.noisy = False  # one log line per delivery is the delivery's own
        d = self.endpoint(target).connect(factory)
        d.addCallback(lambda _: sender.done)
        return d


def buildDelivery(settings: Any, queue: Any, context: Any) -> Any:
    """
    L{netsvc.smtp.delivery.makeDelivery}: the router (smarthost, or MX through the
    daemon's resolver, L{netsvc.dns.lookup}), this module's sessions, the metrics.
    """
    from netsvc.smtp.delivery import Delivery
    from netsvc.smtp.records import DeliveryMetrics
    from netsvc.smtp.routing import MXRouter, SmarthostRouter
    from netsvc.tls import CertificateError

    relay = settings.relay
    if relay.mode == "smarthost":
        router: Any = SmarthostRouter(relay.smarthost)
    elif relay.mode == "mx":
        from netsvc.dns.lookup import query, resolverFor

        router = MXRouter(lambda name, qtype: query(resolverFor(context), name, qtype), port=relay.port,
                          hostname=settings.hostname)
    else:
        raise ValueError("capture mode has no delivery")
    resolvePath = getattr(context.settings, "path", Path)
    try:
        opener = SessionOpener(settings, context.reactor, resolvePath)
    except (OSError, CertificateError) as e:
        from netsvc.config import Problem
        from netsvc.runtime import StartupError

        key = "relay.cacert" if isinstance(e, CertificateError) else "relay.auth.password_file"
        reason = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        raise StartupError([Problem(getattr(context, "configFile", ""), f"services.smtp.{key}", reason)]) from None
    return Delivery(settings, queue, router, opener, context.reactor, DeliveryMetrics(context.metrics, "smtp"))
