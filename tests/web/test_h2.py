"""
HTTP/2 over loopback TLS (issue 18): streams the client resets are cheap and silent (counted,
not logged as failures); a client that does not read is held by flow control.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from tests.helpers import sleep
from tests.web._support import TLS, startWeb, webPort


def _h2Socket(portNumber: int, cafile: str) -> Any:
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", portNumber), timeout=5)
    s = context.wrap_socket(raw, server_hostname="localhost")
    assert s.selected_alpn_protocol() == "h2"
    return s


def _headers(path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "localhost")]


def _rapidReset(portNumber: int, cafile: str, streams: int, path: str) -> tuple[list[Any], bool]:
    """(In a thread.)  HEADERS then RST_STREAM for C{streams} streams in one write; the events
    received until the server closes (or 5 s), and whether it closed."""
    import h2.config
    import h2.connection
    import h2.exceptions

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for i in range(streams):
        sid = 1 + 2 * i
        conn.send_headers(sid, _headers(path), end_stream=True)
        conn.reset_stream(sid)
    events: list[Any] = []
    closed = False
    with _h2Socket(portNumber, cafile) as s:
        s.sendall(conn.data_to_send())
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    closed = True
                    break
                events += conn.receive_data(data)
                out = conn.data_to_send()
                if out:
                    s.sendall(out)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
    return events, closed


class RapidResetTests(unittest.TestCase):
    def setUp(self) -> None:
        self.daemon = startWeb(self)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_resetStreamsSilent(self) -> Any:
        return self.flood()

    def test_resetWhileWritingSilent(self) -> Any:
        """The same when the reset is only seen as the response is written (h2's errors)."""
        from netsvc.web.site import WebRequest

        self.patch(WebRequest, "_streamGone", lambda request: False)
        return self.flood()

    @defer.inlineCallbacks
    def flood(self) -> Any:
        import h2.events

        web = self.daemon.getServiceNamed("web")
        resets = web.metrics.error("stream_reset")
        events, closed = yield threads.deferToThread(
            _rapidReset, webPort(self.daemon, TLS), self.cafile, 1200, "/small.bin"
        )
        yield sleep(0.1)
        failures = [e for e in self.events if "log_failure" in e or e.get("log_level") is LogLevel.critical]
        self.assertEqual(failures, [])
        self.assertGreater(resets.value, 0)
        # Twisted's own rapid-reset limit ends the connection (GOAWAY), and it does close.
        self.assertTrue(any(isinstance(e, h2.events.ConnectionTerminated) for e in events))
        self.assertTrue(closed)
