"""
The services netsvc knows, by name.  Adding a service is adding its folder and
one line here; its C{service} module provides C{Settings} (an attrs settings
class) and C{makeService(settings, context) -> IService}.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SERVICES: dict[str, str] = {
    "echo": "netsvc.echo.service",
    "forward": "netsvc.forward.service",
    "dns": "netsvc.dns.service",
    "chat": "netsvc.chat.service",
    "web": "netsvc.web.service",
    "ldap": "netsvc.ldap.service",
    "smtp": "netsvc.smtp.service",
    "mailbox": "netsvc.mailbox.service",
}


def serviceNames() -> list[str]:
    return list(SERVICES)


def serviceModule(name: str) -> ModuleType:
    """The C{service} module of service C{name} (KeyError if unknown)."""
    return importlib.import_module(SERVICES[name])


def settingsClass(name: str) -> type:
    return serviceModule(name).Settings
