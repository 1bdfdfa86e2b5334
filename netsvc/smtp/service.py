"""
C{services.smtp}: settings -> the SMTP relay (see netsvc.smtp.settings for the schema).

One L{netsvc.runtime.ServerService} holding: a Guard-wrapped L{SMTPFactory} per
listener (submission or relay), the message store -- the capture store
(C{state_dir/captured/}) in capture mode, else the durable queue with the
delivery service (netsvc.smtp.delivery) as a child, kicked after each commit.
The store recovers (tmp/ emptied, unacknowledged files removed) when the
service starts, before any connection is accepted.

With C{workers: N} every worker runs the listeners and commits into the same
folder (L{netsvc.smtp.queue.Writer}); only the delivery owner
(L{netsvc.workers.isDeliveryOwner}, worker 0) runs delivery (retries, bounces,
C{ctl/} requests) or capture pruning, and a L{QueueWatcher} tells it of the
other workers' commits.

With C{local:} (netsvc.smtp.local) the sessions also write mail for the local
domains to the users' Maildirs under C{state_dir/<local.maildir>} (every
worker delivers itself: Maildir delivery needs no lock), through the mailbox
store (L{netsvc.mailbox.maildir.Maildirs}, with the queue's fsync setting).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.service import IService
from twisted.logger import Logger

from netsvc import workers
from netsvc.auth import authenticatorFor
from netsvc.policies import RateLimiter
from netsvc.runtime import ServerService
from netsvc.smtp.capture import CaptureStore
from netsvc.smtp.delivery import makeDelivery
from netsvc.smtp.local import LocalDelivery, LocalMetrics, LocalRouter
from netsvc.smtp.protocol import ServerConfig, SMTPFactory, SMTPMetrics
from netsvc.smtp.queue import ALONE, Queue, Writer, writerOf
from netsvc.smtp.settings import Settings
from netsvc.smtp.watch import QueueWatcher

__all__ = ["SMTPService", "Settings", "makeService"]

log = Logger()


class _Recovery(service.Service):
    """Runs the store's start-up recovery when the daemon starts (not when it is merely built)."""

    def __init__(self, store: Queue) -> None:
        self.store = store

    def startService(self) -> None:
        self.store.recover()
        service.Service.startService(self)


class SMTPService(ServerService):
    """The listeners, the store and (unless capturing) delivery; SIGHUP applies new limits."""

    capture: CaptureStore | None = None
    queue: Queue | None = None
    #: Local delivery (None without services.smtp.local).
    local: LocalDelivery | None = None
    configs: list[ServerConfig]

    def reconfigure(self, settings: Settings) -> None:  # type: ignore[override]
        """
        SIGHUP: hostname, mynetworks, sizes, counts and rates apply to new commands
        at once (open sessions included); listeners, users, relay and queue need a restart.
        """
        super().reconfigure(settings)
        values = _limits(settings, self.context.reactor)  # rate limiters shared by the listeners
        for config in self.configs:
            for name, value in values.items():
                setattr(config, name, value)
            config.__attrs_post_init__()


def _writer() -> Writer:
    """This process's place among the queue's writers (L{netsvc.workers.current})."""
    info = workers.current()
    if info is None:
        return ALONE
    return Writer(index=info.index, count=info.count, owner=workers.isDeliveryOwner())


def _limits(settings: Settings, reactor: Any) -> dict[str, Any]:
    limits = settings.limits
    return dict(
        hostname=settings.hostname, mynetworks=settings.mynetworks,
        maxSize=settings.max_message_size, maxRecipients=settings.max_recipients,
        maxMessages=settings.max_messages_per_session, maxLine=settings.max_line_length,
        authPerSession=settings.auth_failures.per_session,
        junkLimit=settings.junk_command_limit,
        authFailures=RateLimiter(settings.auth_failures.rate, settings.auth_failures.burst, reactor),
        messageRate=RateLimiter(*limits.bucket(), reactor) if limits.rate else None,
    )


def makeService(settings: Settings, context: Any) -> IService:
    svc = SMTPService("smtp", settings, context)
    stateDir = Path(context.stateDir)
    reactor = context.reactor
    capture: CaptureStore | None = None
    queue: Queue | None = None
    onAccepted = None
    writer = _writer()
    # Its folders are made as the run user where state_dir is already that user's (twistd --uid).
    writing = getattr(context, "writing", contextlib.nullcontext)
    with writing():
        if settings.relay.mode == "capture":
            capture = CaptureStore(stateDir / "captured", keep=settings.relay.keep,
                                   fsync=settings.queue.fsync, reactor=reactor, writer=writer)
            store: Queue = capture
        else:
            store = queue = Queue(stateDir / settings.queue.dir, fsync=settings.queue.fsync, reactor=reactor,
                                  writer=writer)
    # First child: recovery runs before delivery starts reading the queue.
    _Recovery(store).setServiceParent(svc)
    onNew = capture.discover if capture is not None else None
    authenticator = authenticatorFor(settings.users, context, "services.smtp.users") if settings.users else None
    svc.local = _local(settings, context, authenticator)
    if queue is not None and writer.owner:
        delivery = makeDelivery(settings, queue, context)
        delivery.local = svc.local
        delivery.setServiceParent(svc)
        onAccepted = delivery.kick
        onNew = delivery.discover
    if writer.owner and not writer.alone and onNew is not None:  # workers: N: the others' commits
        own = writer.index
        QueueWatcher(store.env, onNew, reactor, ignore=lambda id: writerOf(id) == own).setServiceParent(svc)
    svc.capture = capture
    svc.queue = queue

    metrics = SMTPMetrics(context.metrics)
    shared = dict(queue=store, metrics=metrics, clock=reactor, authenticator=authenticator,
                  onAccepted=onAccepted, local=svc.local, **_limits(settings, reactor))
    context.certificate  # noqa: B018 - STARTTLS needs it: a bad certificate fails at start-up, not mid-session
    svc.configs = []
    for i, listener in enumerate(settings.listen):
        config = ServerConfig(tlsOptions=_starttls(context), submission=listener.submission, **shared)
        svc.configs.append(config)
        svc.listen(i, listener, svc.guard.wrap(SMTPFactory(config)))
    return svc


def _local(settings: Settings, context: Any, users: Any) -> LocalDelivery | None:
    """Local delivery for C{settings.local} (None without it); the store's folder is made when first written."""
    local = settings.local
    if local is None:
        return None
    from netsvc.mailbox.maildir import Maildirs

    router = LocalRouter(local.domains, local.aliases, users, delimiter=local.recipient_delimiter)
    if settings.users is not None and settings.users.kind == "file":  # (an LDAP source's names load later)
        for alias, user in router.unknownTargets():
            log.warn("services.smtp.local.aliases.{alias}: {user} is not a user of services.smtp.users: mail to "
                     "{alias} is refused (550 5.1.1) until it is", alias=alias, user=user)
    store = Maildirs(Path(context.stateDir) / local.maildir, fsync=settings.queue.fsync)
    delivery = LocalDelivery(router, store, LocalMetrics(context.metrics), context.reactor)
    if local.captured is not None and settings.relay.mode == "capture":
        delivery.captured = local.captured.lower()
        if settings.users is not None and settings.users.kind == "file" and not users.isReserved(delivery.captured):
            log.warn("services.smtp.local.captured: {user} is not a user of services.smtp.users: it cannot log in "
                     "to read the captured mail", user=local.captured)
    return delivery


def _starttls(context: Any) -> Any:
    """The STARTTLS context: the shared certificate's current options (made on first use)."""
    return lambda: context.certificate.options()
