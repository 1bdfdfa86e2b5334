"""
C{services.echo}: settings -> listeners.

    services:
      echo:
        listen: ["tcp:7007:interface=127.0.0.1", "udp:7007:interface=127.0.0.1",
                 "tls:7443:interface=127.0.0.1"]
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from netsvc.config import DatagramListener, Limits, ServiceSettings, Size, field, frozen
from netsvc.echo.protocol import DatagramEcho, EchoFactory
from netsvc.endpoints import isDatagram

#: The largest UDP payload over IPv4.
MAX_DATAGRAM = 65507


@frozen
class Settings(ServiceSettings):
    listen: list[DatagramListener] = field(
        factory=lambda: [DatagramListener(endpoint="tcp:7007:interface=127.0.0.1")])
    #: For UDP: max_message bounds a datagram; rate/burst are datagrams per second per
    #: client (echo can be abused as a reflector).  TCP echo streams bytes: no message bound.
    limits: Limits = field(factory=lambda: Limits(max_message=Size(MAX_DATAGRAM), rate=2000, burst=4000))


def makeService(settings: Settings, context: Any) -> IService:
    svc = context.serverService("echo", settings)
    streams = svc.guard.wrap(EchoFactory(svc.guard.clock))
    for i, listener in enumerate(settings.listen):
        if isDatagram(listener.endpoint):
            svc.listen(i, listener, DatagramEcho(svc.guard))
        else:
            svc.listen(i, listener, streams)
    return svc
