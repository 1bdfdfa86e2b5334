"""
C{services.smtp}: settings -> the SMTP relay (see netsvc.smtp.settings for the schema).

One L{netsvc.runtime.ServerService} holding: a Guard-wrapped L{SMTPFactory} per
listener (submission or relay), the message store -- the capture store
(C{state_dir/captured/}) in capture mode, else the durable queue with the
delivery service (netsvc.smtp.delivery) as a child, kicked after each commit.
The store recovers (tmp/ emptied, unacknowledged files removed) when the
service starts, before any connection is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.service import IService

from netsvc.auth import authenticatorFor
from netsvc.config import Problem
from netsvc.policies import RateLimiter
from netsvc.runtime import StartupError
from netsvc.smtp.capture import CaptureStore
from netsvc.smtp.protocol import ServerConfig, SMTPFactory, SMTPMetrics
from netsvc.smtp.queue import Queue
from netsvc.smtp.settings import Settings

__all__ = ["Settings", "makeService"]


class _Recovery(service.Service):
    """Runs the store's start-up recovery when the daemon starts (not when it is merely built)."""

    def __init__(self, store: Queue) -> None:
        self.store = store

    def startService(self) -> None:
        self.store.recover()
        service.Service.startService(self)


def makeService(settings: Settings, context: Any) -> IService:
    svc = context.serverService("smtp", settings)
    stateDir = Path(context.stateDir)
    reactor = context.reactor
    capture: CaptureStore | None = None
    queue: Queue | None = None
    onAccepted = None
    if settings.relay.mode == "capture":
        capture = CaptureStore(stateDir / "captured", keep=settings.relay.keep,
                               fsync=settings.queue.fsync, reactor=reactor)
        store: Queue = capture
    else:
        store = queue = Queue(stateDir / settings.queue.dir, fsync=settings.queue.fsync, reactor=reactor)
    # First child: recovery runs before delivery starts reading the queue.
    _Recovery(store).setServiceParent(svc)
    if queue is not None:
        try:
            from netsvc.smtp.delivery import makeDelivery
        except ImportError as e:  # pragma: no cover - only while delivery is being written
            raise StartupError([Problem(context.configFile, "services.smtp.relay",
                                        f"delivery is not available ({e}); use relay: {{capture: true}}")]) from None
        delivery = makeDelivery(settings, queue, context)
        delivery.setServiceParent(svc)
        onAccepted = delivery.kick
    svc.capture = capture
    svc.queue = queue

    authenticator = authenticatorFor(settings.users, context, "services.smtp.users") if settings.users else None
    metrics = SMTPMetrics(context.metrics)
    limits = settings.limits
    shared = dict(
        hostname=settings.hostname, queue=store, metrics=metrics, clock=reactor,
        mynetworks=settings.mynetworks, authenticator=authenticator,
        maxSize=settings.max_message_size, maxRecipients=settings.max_recipients,
        maxMessages=settings.max_messages_per_session, maxLine=settings.max_line_length,
        authPerSession=settings.auth_failures.per_session,
        authFailures=RateLimiter(settings.auth_failures.rate, settings.auth_failures.burst, reactor),
        messageRate=RateLimiter(*limits.bucket(), reactor) if limits.rate else None,
        onAccepted=onAccepted,
    )
    for i, listener in enumerate(settings.listen):
        config = ServerConfig(tlsOptions=_starttls(context), submission=listener.submission, **shared)
        svc.listen(i, listener, svc.guard.wrap(SMTPFactory(config)))
    return svc


def _starttls(context: Any) -> Any:
    """The STARTTLS context: the shared certificate's current options (made on first use)."""
    return lambda: context.certificate.options()
