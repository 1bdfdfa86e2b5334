"""
Chat in the browser: a page and a WebSocket endpoint bridged into the chat hub,
so browser users and TCP clients share rooms.  The web service mounts
L{chatResource} at C{/chat} (the page at C{/chat/}, the socket at C{/chat/ws}).

Over the socket, each text message from the browser is one chat line (commands
included); the server sends JSON lines, one object per event:
C{{"kind": "message", "sender": "alice", "text": "hi", "room": "#lobby",
"time": 1700000000.0, "replay": false}} -- kinds as in L{netsvc.chat.hub.Event}.

The browser client is a L{netsvc.chat.protocol.ChatProtocol} like any other
(same commands, flood control, length limit and slow-reader bound), over a
small adapter that makes the WebSocket look like a transport.

A WebSocket is not bound by the same-origin policy: any page a user visits
could open one to the chat in their name (cross-site WebSocket hijacking).
So a handshake is accepted only from the site's own pages (L{OriginPolicy}:
the origin the request was addressed to, or one of the site's names on one
of its ports) and from the origins configured (C{web.chat_origins}); others
get 403.  A handshake without C{Origin} (not a browser: browsers always send
it) is accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import Request
from twisted.web.websocket import WebSocketResource, WebSocketTransport
from wsproto.utilities import LocalProtocolError

from netsvc.chat.hub import Event, notice
from netsvc.chat.protocol import ChatProtocol, ChatShared, Framing
from netsvc.metrics import Counter

_log = Logger()


_RAW_BREAKS = re.compile("[\x7f-\x9f\u2028\u2029]")


class JSONFraming(Framing):
    """
    Events as JSON lines (the browser splits on newlines).  The text is kept
    exact (JSON escapes line breaks and controls; the page shows it as text,
    never as markup): each event says its kind and who sent it.
    """

    name = "json"
    delimiter = b"\n"

    def visible(self, text: str) -> str:
        return text

    def format(self, event: Event) -> str:
        text = json.dumps({
            "kind": event.kind, "sender": event.sender, "text": event.text, "room": event.room,
            "target": event.target, "time": round(event.time, 3), "replay": event.replay,
        }, ensure_ascii=False)
        # JSON allows DEL, C1 controls and U+2028/U+2029 raw in strings, but NEL and the separators
        # end a line for many readers (Python's splitlines, JavaScript before ES2019): escaped, each
        # event is one line for any reader, and the text the same once parsed.
        if _RAW_BREAKS.search(text) is not None:
            text = _RAW_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        return text


JSON = JSONFraming()


class _WebSocketAsTransport:
    """
    What L{ChatProtocol} needs of a transport, over a WebSocket.  Writes once
    the WebSocket is closed or closing (the peer's Close was answered, or we
    closed it) are dropped quietly and counted (C{dropped}): wsproto would raise.
    """

    connected = True
    disconnecting = False

    def __init__(self, ws: WebSocketTransport, peer: Any, dropped: Callable[[], None] = lambda: None) -> None:
        self.ws = ws
        self.peer = peer
        self.dropped = dropped

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            self.dropped()
            return
        try:
            self.ws.sendTextMessage(data.decode("utf-8"))
        except LocalProtocolError:
            # The peer closed the WebSocket: nothing more can be sent on it, and it is not
            # waited for (a peer that closed but does not read would hold the socket open).
            self.dropped()
            self.abortConnection()

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            try:
                self.ws.loseConnection()
            except LocalProtocolError:  # already closed by the peer
                self._socket().abortConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._socket().abortConnection()

    def _socket(self) -> Any:
        return self.ws.transport  # type: ignore[attr-defined]

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        # After the upgrade, Twisted 26 leaves the HTTPChannel registered as the
        # connection's producer; take its place, or attachProducer raises.
        consumer = getattr(self.ws, "transport", None)
        if getattr(consumer, "producer", None) is not None:
            consumer.unregisterProducer()
        self.ws.attachProducer(_ReadingFollowsWriting(producer, consumer))

    def unregisterProducer(self) -> None:
        self.ws.detachProducer()


class _ReadingFollowsWriting:
    """
    The chat as the producer of a WebSocket's connection: while its output is
    backed up the socket is not read either (wsproto answers pings by itself,
    so a client pinging without reading would otherwise grow the output).
    """

    def __init__(self, chat: Any, connection: Any) -> None:
        self.chat = chat
        self.connection = connection

    def pauseProducing(self) -> None:
        self.chat.pauseProducing()
        pause = getattr(self.connection, "pauseProducing", None)
        if pause is not None:
            pause()

    def resumeProducing(self) -> None:
        resume = getattr(self.connection, "resumeProducing", None)
        if resume is not None and not self.chat.gone:
            resume()
        self.chat.resumeProducing()

    def stopProducing(self) -> None:
        self.chat.stopProducing()


#: A browser message may hold several lines (a paste), each then checked against the line limit.
LINES_PER_MESSAGE = 16


class _BoundedBuffer:
    """
    Twisted 26 reassembles a WebSocket message in an unbounded buffer
    (C{_WebSocketWireProtocol._textBuffer}/C{_bytesBuffer}), so one client could
    make the daemon hold any amount of memory.  This replacement keeps at most
    C{limit} characters: a longer message is dropped as it arrives, and
    C{done()} returns None for it (the chat answers with an error notice).
    """

    def __init__(self, empty: Any, limit: int) -> None:
        self.data = empty
        self.limit = limit
        self.over = False

    def add(self, new: Any) -> None:
        if self.over:
            return
        if len(self.data) + len(new) > self.limit:
            self.over = True
            self.data = self.data[0:0]
            return
        self.data += new

    def done(self) -> Any:
        result, self.data = self.data, self.data[0:0]
        if self.over:
            self.over = False
            return None
        return result


class ChatWebSocket:
    """One browser: a L{twisted.web.websocket.WebSocketProtocol} driving a L{ChatProtocol}."""

    def __init__(self, shared: ChatShared, peer: Any) -> None:
        self.chat = ChatProtocol(shared, JSON)
        self.peer = peer
        self.ws: WebSocketTransport | None = None

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        self.ws = transport
        limit = self.chat.limits.maxLine * LINES_PER_MESSAGE
        for name, empty in (("_textBuffer", ""), ("_bytesBuffer", b"")):
            if not hasattr(transport, name):  # tests/chat/test_web.py notices if Twisted changes this
                continue
            setattr(transport, name, _BoundedBuffer(empty, limit))

    def negotiationFinished(self) -> None:
        assert self.ws is not None
        dropped = self.chat.metrics.drop("ws_closed")
        self.chat.makeConnection(_WebSocketAsTransport(self.ws, self.peer, dropped.inc))

    def textMessageReceived(self, message: str | None) -> None:
        if message is None:  # over the bound (see _BoundedBuffer)
            limit = self.chat.limits.maxLine * LINES_PER_MESSAGE
            self.chat.metrics.drop("too_long").inc()
            self.chat.deliver(notice(f"error: message longer than {limit} characters; dropped"))
            self.chat.flusher.flush()
            return
        for line in message.splitlines() or [""]:
            if self.chat.gone:
                break
            self.chat.messageReceived(line.encode("utf-8"))
        self.chat.flusher.flush()

    def bytesMessageReceived(self, data: bytes | bytearray | None) -> None:
        self.textMessageReceived(None if data is None else bytes(data).decode("utf-8", "replace"))

    def pongReceived(self, payload: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if self.chat.transport is not None:
            self.chat.transport.connected = False
            self.chat.connectionLost(reason if reason is not None else Failure(ConnectionDone()))


class ChatWebSocketFactory:
    def __init__(self, getShared: Callable[[], ChatShared | None]) -> None:
        self.getShared = getShared

    def buildProtocol(self, request: Request) -> ChatWebSocket:
        shared = self.getShared()
        assert shared is not None  # the resource answers 503 first
        return ChatWebSocket(shared, request.getClientAddress())


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parseOrigin(text: str) -> tuple[str, str, int]:
    """
    An origin (RFC 6454: C{scheme://host[:port]}, as browsers send it and as
    C{chat_origins} lists them) as (scheme, host, port): lower case, the port
    made explicit.

    @raise ValueError: not an http(s) origin (a path, a user, C{null}...).
    """
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"expected an origin like https://chat.example.com:8443, got {text!r}")
    port = parts.port  # raises ValueError when out of range
    return scheme, parts.hostname.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS[scheme]


class OriginPolicy:
    """
    Which pages may open the chat's WebSocket, by the handshake's C{Origin}:

      - none (not a browser): allowed;
      - the origin the request was addressed to (its C{Host}, same host and port);
      - one of the site's own names (C{names()}: the certificate's, the
        virtual hosts') on one of its ports (C{ports()}: the web listeners');
      - one of C{allowed} (origins, exactly).

    Everything else, C{null} (a sandboxed or local page) included, is refused.
    """

    def __init__(self, names: Callable[[], Iterable[str]] = tuple, ports: Callable[[], Iterable[int]] = tuple,
                 allowed: Iterable[str] = ()) -> None:
        self.names = names
        self.ports = ports
        self.allowed = {parseOrigin(o) for o in allowed}

    def refusal(self, request: Request) -> str | None:
        """Why C{request}'s origin may not open the WebSocket, or None when it may."""
        values = request.requestHeaders.getRawHeaders(b"origin")
        if not values:
            return None
        if len(values) > 1:
            return "more than one Origin"
        text = values[0].decode("latin-1")
        try:
            scheme, host, port = parseOrigin(text)
        except ValueError:
            return f"origin {text!r} is not allowed"
        if (scheme, host, port) in self.allowed or self._sameOrigin(request, scheme, host, port):
            return None
        if host in {_asciiName(n) for n in self.names()} and port in self._sitePorts(request):
            return None
        return f"origin {text!r} is not allowed"

    @staticmethod
    def _sameOrigin(request: Request, scheme: str, host: str, port: int) -> bool:
        value = request.getHeader(b"host")
        if not value:
            return False
        try:
            target = urlsplit("//" + value.decode("latin-1"))
            targetPort = target.port
        except ValueError:
            return False
        if targetPort is None:
            targetPort = _DEFAULT_PORTS[scheme]
        return (target.hostname or "").rstrip(".") == host and targetPort == port

    def _sitePorts(self, request: Request) -> set[int]:
        ports = set(self.ports())
        here = getattr(request.getHost(), "port", None)
        if here is not None:
            ports.add(here)
        return ports


def _asciiName(name: str) -> str:
    """A host name as browsers put it in an Origin (IDNA A-labels, lower case)."""
    name = name.lower().rstrip(".")
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


class _Socket(WebSocketResource):
    def __init__(self, factory: Any, origins: OriginPolicy | None = None,
                 refused: Callable[[], Counter | None] = lambda: None) -> None:
        super().__init__(factory)
        self.origins = origins or OriginPolicy()
        self.refused = refused

    def render_GET(self, request: Request) -> bytes | int:
        if self.factory.getShared() is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"the chat service is not running\n"
        refusal = self.origins.refusal(request)
        if refusal is not None:  # another site's page (cross-site WebSocket hijacking)
            counter = self.refused()
            if counter is not None:
                counter.inc()
            client = request.getClientAddress()
            _log.info("chat: WebSocket refused for {client}: {reason}",
                      client=getattr(client, "host", None) or "a client", reason=refusal)
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"forbidden: {refusal}\n".encode()
        refusal = _notAWebSocketHandshake(request)
        if refusal is not None:  # Twisted would log it at error level, with the request's repr
            client = request.getClientAddress()
            _log.info("chat: WebSocket refused for {client} over {proto}: {reason}",
                      client=getattr(client, "host", None) or "a client", proto=request.clientproto.decode(),
                      reason=refusal)
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"not a WebSocket handshake: {refusal}\n".encode()
        return super().render_GET(request)


def _notAWebSocketHandshake(request: Request) -> str | None:
    """Why C{request} cannot become a WebSocket (HTTP/2, missing Upgrade...), or None."""
    from wsproto import ConnectionType
    from wsproto.handshake import H11Handshake
    from wsproto.utilities import RemoteProtocolError

    if request.clientproto != b"HTTP/1.1":
        return "WebSocket needs HTTP/1.1 (RFC 6455)"
    headers = [(k, v) for k, values in request.requestHeaders.getAllRawHeaders() for v in values]
    try:
        H11Handshake(ConnectionType.SERVER).initiate_upgrade_connection(headers, request.path)
    except RemoteProtocolError as e:
        return str(e)
    return None


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.html = resources.files("netsvc.chat").joinpath("www/chat.html").read_bytes()

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return self.html

    render_HEAD = render_GET


class ChatResource(resource.Resource):
    """
    C{/chat}: redirects to C{/chat/}, the page; C{/chat/ws}: the WebSocket, for
    the origins C{origins} allows (default: only same-origin pages and clients
    that are not browsers).  C{refused} gives the counter of refused handshakes.
    """

    def __init__(self, getShared: Callable[[], ChatShared | None], origins: OriginPolicy | None = None,
                 refused: Callable[[], Counter | None] = lambda: None) -> None:
        super().__init__()
        self.page = _Page()
        self.putChild(b"", self.page)
        self.putChild(b"ws", _Socket(ChatWebSocketFactory(getShared), origins, refused))

    def render_GET(self, request: Request) -> bytes:
        request.redirect(request.uri.split(b"?")[0] + b"/")
        return b""


def chatResource(context: Any, origins: Iterable[str] | None = None) -> ChatResource:
    """
    The C{/chat} resource for a daemon: it finds the chat service when a browser
    connects.  Its WebSocket accepts the site's own origins -- the names of the
    shared certificate (and C{tls.names}), the virtual hosts', on the web
    listeners' ports -- and C{origins} (default: the web settings'
    C{chat_origins}, when they have it).

    @raise ValueError: an entry of C{origins} is not an origin.
    """
    web = context.settings.services.get("web")
    if origins is None:
        origins = getattr(web, "chat_origins", None) or ()

    def getService(name: str) -> Any:
        daemon = context.daemon
        try:
            return daemon.getServiceNamed(name) if daemon is not None else None
        except KeyError:
            return None

    def getShared() -> ChatShared | None:
        return getattr(getService("chat"), "shared", None)

    def names() -> list[str]:
        found = list(getattr(getattr(context.settings, "tls", None), "names", None) or ())
        found += list(getattr(web, "vhosts", None) or ())
        certificate = getattr(context, "_certificate", None)  # only when loaded: never made for this
        if certificate is not None and certificate.chain:
            found += _certificateNames(certificate.chain[0])
        return found

    def ports() -> list[int]:
        found = []
        for listener in getattr(getService("web"), "listeners", None) or ():
            port = getattr(listener, "port", None)
            if port is not None:
                found.append(port.getHost().port)
        return found

    def refused() -> Counter | None:
        svc = getService("chat")
        metrics = getattr(svc, "metrics", None)
        return metrics.refused("ws_origin") if metrics is not None else None

    return ChatResource(getShared, OriginPolicy(names, ports, origins), refused)


def _certificateNames(cert: Any) -> list[str]:
    """The DNS names and IP addresses a certificate is for."""
    from cryptography import x509

    from netsvc.tls.certificates import certificateNames

    found = certificateNames(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return found
    return found + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
