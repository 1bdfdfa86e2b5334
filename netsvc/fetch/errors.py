"""
What goes wrong in C{netsvc fetch}: L{Usage} (a bad command line, exit status 2),
L{Failed} (one URL failed; the run may go on with the next mirror), and
L{describe}, one line for a twisted.web request failure.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.web import client as webclient

from netsvc import clients


class Usage(Exception):
    """Bad command line; the message says what (exit status 2)."""


class Failed(Exception):
    """One URL failed.  C{final}: no point trying the other mirrors (a local problem)."""

    quiet = False

    def __init__(self, message: str, url: str = "", final: bool = False, transient: bool = True) -> None:
        super().__init__(message)
        self.url = url
        self.final = final
        self.transient = transient and not final


#: twisted.web.client's exceptions that carry the real reasons in C{.reasons}.
_WRAPPERS = (webclient.ResponseFailed, webclient.ResponseNeverReceived, webclient.RequestTransmissionFailed,
             webclient.RequestGenerationFailed)


def describe(reason: BaseException, timeout: float | None = None, tls: clients.TLSHint | None = None) -> str:
    """One line for a request failure, digging into twisted.web's wrapper exceptions."""
    while isinstance(reason, _WRAPPERS) and reason.reasons:
        inner = [r.value for r in reason.reasons
                 if not isinstance(r.value, (error.ConnectionDone, webclient.ResponseDone))]
        if not inner:
            inner = [r.value for r in reason.reasons]
        if isinstance(reason, webclient.ResponseFailed) and isinstance(
                inner[0], (error.ConnectionLost, error.ConnectionDone)):
            return "connection closed before the whole body arrived"
        reason = inner[0]
    if isinstance(reason, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed by the server"
    if isinstance(reason, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, error.DNSLookupError):
        return "cannot resolve host name"
    return clients.describe(reason, timeout, tls)
