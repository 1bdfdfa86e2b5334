"""
C{services.mailbox}: settings -> the IMAP and POP3 listeners over the users'
Maildirs (see netsvc.mailbox.settings for the schema).

One L{netsvc.runtime.ServerService} holding: the store
(L{netsvc.mailbox.maildir.Maildirs} under C{state_dir/<maildir>}, the folder
SMTP local delivery writes), the authenticator (the same user sources as SMTP
AUTH), one L{netsvc.auth.FailureLimit} for the logins of both protocols, and a
Guard-wrapped factory per listener: L{netsvc.mailbox.pop3.POP3Factory} or the
IMAP factory of L{netsvc.mailbox.imap}.  Plain listeners offer STARTTLS/STLS
with the shared certificate; C{tls:} listeners are TLS from the first byte.

With C{workers: N} every worker serves every listener over the same folders
(the store serialises what must be: UIDs, the uidlist, by C{flock}); the
failure limits are per worker.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.threads import deferToThreadPool

from netsvc import endpoints
from netsvc.auth import FailureLimit, authenticatorFor
from netsvc.mailbox.maildir import Maildirs
from netsvc.mailbox.pop3 import POP3Config, POP3Factory, POP3Metrics
from netsvc.mailbox.settings import Settings
from netsvc.runtime import ServerService

__all__ = ["MailboxService", "Settings", "makeService"]


class MailboxService(ServerService):
    """The listeners and what they share; SIGHUP applies new limits to new commands."""

    store: Maildirs
    failures: FailureLimit
    pop3: list[POP3Config]
    imap: list[Any]

    def reconfigure(self, settings: Settings) -> None:  # type: ignore[override]
        """
        SIGHUP: connection limits, junk and failure limits apply at once (open
        sessions included); listeners, users and the maildir need a restart.
        """
        super().reconfigure(settings)
        self.failures.perClient.rate = settings.auth_failures.rate
        self.failures.perClient.burst = settings.auth_failures.burst
        for config in self.pop3:
            config.junkLimit = settings.junk_command_limit
            config.authPerSession = settings.auth_failures.per_session
        for factory in self.imap:
            factory.maxAuthFailures = settings.auth_failures.per_session
            factory.maxLiteral = settings.max_message_size
            factory.idleTimeout = float(settings.imap_idle_timeout)


def _runner(reactor: Any) -> Any:
    """Blocking store work in the reactor's thread pool (where the SMTP queue's fsyncs go too)."""
    def run(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return run


def makeService(settings: Settings, context: Any) -> IService:
    svc = MailboxService("mailbox", settings, context)
    reactor = context.reactor
    store = Maildirs(Path(context.stateDir) / settings.maildir, fsync=settings.fsync)
    assert settings.users is not None  # (Settings.check)
    authenticator = authenticatorFor(settings.users, context, "services.mailbox.users")
    limits = settings.auth_failures
    failures = FailureLimit(reactor, rate=limits.rate, burst=limits.burst, registry=context.metrics,
                            service="mailbox")
    context.certificate  # noqa: B018 - STARTTLS/STLS need it: a bad certificate fails at start-up
    tlsOptions = _starttls(context)
    run = _runner(reactor)
    svc.store, svc.failures, svc.pop3, svc.imap = store, failures, [], []
    pop3Metrics = imapCounts = None
    for i, listener in enumerate(settings.listen):
        if listener.protocol == "pop3":
            pop3Metrics = pop3Metrics or POP3Metrics(context.metrics)
            config = POP3Config(store=store, authenticator=authenticator, metrics=pop3Metrics, clock=reactor,
                                failures=failures, tlsOptions=tlsOptions, run=run,
                                authPerSession=limits.per_session, junkLimit=settings.junk_command_limit)
            svc.pop3.append(config)
            factory: Any = POP3Factory(config)
        else:
            if imapCounts is None:  # (one for every IMAP listener; an empty Counter is falsy)
                imapCounts = _ExportedCounts(context.metrics)
            factory = _imapFactory(settings, context, listener, store=store, authenticator=authenticator,
                                   failures=failures, run=run, counts=imapCounts)
            svc.imap.append(factory)
        svc.listen(i, listener, svc.guard.wrap(factory))
    return svc


def _imapFactory(settings: Settings, context: Any, listener: Any, *, store: Maildirs, authenticator: Any,
                 failures: FailureLimit, run: Any, counts: Any) -> Any:
    """The IMAP factory of L{netsvc.mailbox.imap} for one listener."""
    try:
        from netsvc.mailbox.imap import IMAPFactory
    except ImportError:
        from netsvc.config import Problem
        from netsvc.runtime import StartupError

        raise StartupError([Problem(context.configFile, "services.mailbox.listen",
                                    "IMAP is not available in this build (netsvc.mailbox.imap)")]) from None
    kind = endpoints.split(listener.endpoint)[0]
    factory = IMAPFactory(store, authenticator, context.certificate.connectionCreator(), failureLimit=failures,
                          implicitTLS=kind in ("tls", "ssl"), maxLiteral=settings.max_message_size,
                          idleTimeout=float(settings.imap_idle_timeout),
                          maxAuthFailures=settings.auth_failures.per_session, run=run, clock=context.reactor)
    factory.counts = counts
    return factory


class _ExportedCounts(collections.Counter):
    """The IMAP factories' C{counts}, also kept as C{netsvc_imap_events_total{service, event}}."""

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self._family = registry.counter("netsvc_imap_events_total", "IMAP sessions' events (logins, failures, "
                                        "refusals, bad commands, limits), by kind.", ["service", "event"])

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        self._family.labels(service="mailbox", event=key).value = value


def _starttls(context: Any) -> Any:
    """The STARTTLS/STLS context: the shared certificate's current options (made on first use)."""
    return lambda: context.certificate.options()
