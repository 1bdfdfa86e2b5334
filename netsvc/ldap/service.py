"""
C{services.ldap}: an LDAP directory served from LDIF files (settings in
L{netsvc.ldap.settings}).

makeService loads the directory (already loaded when the settings were read),
publishes it as C{context.directory} (the Directory API other services use, see
L{netsvc.ldap.directory}), and listens with one L{LDAPServerFactory} on every
C{listen:} endpoint (C{tls:PORT} is LDAPS with the shared certificate; StartTLS on
plain listeners uses the same certificate).

With C{writable: true}, add/modify/delete/modify DN requests from C{writers}
are saved to the (one) LDIF file before they are answered (L{netsvc.ldap.writes}).

SIGHUP (L{LDAPService.reconfigure}): the LDIF files are read again and swapped in
at once (the same Directory object, so holders see the new entries); a file with
problems is logged and the running directory kept.  Limits apply to new requests;
listeners need a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger

from netsvc.ldap.directory import LoadError
from netsvc.ldap.server import LDAPLimits, LDAPMetrics, LDAPServerFactory
from netsvc.ldap.settings import Settings
from netsvc.ldap.writes import LDIFStore
from netsvc.runtime import ServerService, StartupError
from netsvc.schema import Problem

log = Logger()

__all__ = ["Settings", "makeService"]


def limitsFrom(settings: Settings) -> LDAPLimits:
    return LDAPLimits(anonymous=settings.anonymous, sizeLimit=settings.size_limit, timeLimit=settings.time_limit,
                      maxScan=settings.max_scan, maxRequest=settings.limits.max_message,
                      failedBindRate=settings.failed_binds.rate, failedBindBurst=settings.failed_binds.burst,
                      writers=list(settings.writers))


def storeFor(settings: Settings, directory: Any, context: Any, previous: LDIFStore | None = None) -> LDIFStore | None:
    """
    Where writes go (the one ldif file) when writable; None: read-only.  A reload
    keeps the C{previous} store (its queue and its thread: writes stay serialized).
    """
    if not settings.writable:
        return None
    path = context.settings.path(settings.ldif[0])
    if previous is not None:
        previous.path = Path(path)
        return previous
    return LDIFStore(directory, path, reactor=context.reactor)


class LDAPService(ServerService):
    factory: LDAPServerFactory

    def reconfigure(self, settings: Settings) -> None:
        super().reconfigure(settings)
        directory = settings.loaded
        if directory is None:
            try:
                directory = settings.load(self.context.settings.path)
            except LoadError as e:
                log.error("ldap: reload failed, keeping the running directory: {error}", error=str(e))
                return
        self.factory.directory.replace(directory)
        self.factory.store = storeFor(settings, self.factory.directory, self.context, self.factory.store)
        self.factory.reconfigure(limitsFrom(settings))
        log.info("ldap: reloaded {count} entries under {suffix}", count=len(directory), suffix=directory.suffix)


def makeService(settings: Settings, context: Any) -> IService:
    directory = settings.loaded
    if directory is None:
        try:
            directory = settings.load(context.settings.path)
        except LoadError as e:
            raise StartupError([Problem(context.configFile, "services.ldap.ldif", str(e))]) from None
    svc = LDAPService("ldap", settings, context)
    metrics = LDAPMetrics(context.metrics)
    certificate = context.certificate  # made now: a bad certificate fails the start, not the first StartTLS
    svc.factory = LDAPServerFactory(directory, limitsFrom(settings), metrics, context.reactor,
                                    tlsOptions=certificate.options, store=storeFor(settings, directory, context))
    context.directory = directory
    wrapped = svc.guard.wrap(svc.factory)
    for i, listener in enumerate(settings.listen):
        svc.listen(i, listener, wrapped)
    log.info("ldap: {count} entries under {suffix}", count=len(directory), suffix=directory.suffix)
    return svc
