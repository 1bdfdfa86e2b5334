"""
TLS: the shared server certificate (loaded from PEM files, or generated
self-signed under state_dir), server connection creators that pick up a reloaded
certificate for new connections, and client contexts that verify by default.

Server side::

    material = ServerCertificate.fromSettings(settings.tls, stateDir)
    creator = material.connectionCreator()          # IOpenSSLServerConnectionCreator
    endpoint = TLSServerEndpoint(creator, TCP4ServerEndpoint(reactor, 7443))
    material.reload()                               # SIGHUP: new connections get the new cert

Client side::

    clientCreator("localhost", cafile="var/tls/selfsigned.pem")
    clientCreator("localhost", insecure=True)       # explicit opt-out

Modules, each importing only those before it: C{certificates} (files, generation,
L{CertificateError}), C{server} (L{ServerCertificate}, creators, endpoint),
C{halfclose} (half-close for forwarding), C{client} (L{clientCreator},
L{httpsPolicy}).  Every public name is importable from here.
"""

from netsvc.tls.certificates import (
    GENERATED_LIFETIME,
    MIN_VERSION,
    CertificateError,
    certificateNames,
    generateSelfSigned,
    loadCertificates,
    readPEMs,
)
from netsvc.tls.client import clientCreator, httpsPolicy
from netsvc.tls.halfclose import HalfCloseTLSServerEndpoint, HalfCloseTLSTransport, halfClosing
from netsvc.tls.server import (
    RENEW_BEFORE,
    FlushingTLSTransport,
    ReloadingServerCreator,
    ServerCertificate,
    SNIServerCreator,
    TLSServerEndpoint,
)

__all__ = [
    "GENERATED_LIFETIME", "MIN_VERSION", "RENEW_BEFORE", "CertificateError", "FlushingTLSTransport",
    "HalfCloseTLSServerEndpoint", "HalfCloseTLSTransport", "ReloadingServerCreator", "SNIServerCreator",
    "ServerCertificate", "TLSServerEndpoint", "certificateNames", "clientCreator", "generateSelfSigned",
    "halfClosing", "httpsPolicy", "loadCertificates", "readPEMs",
]
