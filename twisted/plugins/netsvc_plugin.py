"""twistd plugin: C{twistd netsvc --config FILE} (see L{netsvc.tap})."""

from twisted.application.service import ServiceMaker

netsvc = ServiceMaker(
    "netsvc",
    "netsvc.tap",
    "echo, chat, forwarding, SMTP, HTTPS, DNS and LDAP services from one YAML file",
    "netsvc",
)
