"""
Chat wire behaviour: two framings over one hub.

  - C{line}: UTF-8 text lines ending in LF or CRLF (nc, socat, openssl s_client).
  - C{nul}: UTF-8 messages each ending in one NUL byte (the books' chat protocol:
    every message goes to everyone in the room, the sender included, prefixed
    with the sender's name).

Lines starting with C{/} are commands (C{//text} sends C{/text}).  Server notices
start with C{***}; room messages are C{<name> text} (line) or C{name: text} (nul).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from netsvc.auth import Refused
from netsvc.chat.framing import FRAMINGS, Framing, LineFraming, NulFraming  # noqa: F401 (re-exported)
from netsvc.chat.hub import LOBBY, ChatError, Event, Hub, displayName, notice
from netsvc.policies import TokenBucket

log = Logger()

HELP = [
    "commands:",
    "  /nick NAME [PASSWORD]  choose a nickname (a password for reserved ones)",
    "  /join #room            go to a room (made when first joined)",
    "  /part                  back to #lobby",
    "  /msg NICK text         private message",
    "  /me action            an action (* you wave)",
    "  /topic [text]          show or set the room's topic",
    "  /who                   who is in this room",
    "  /rooms                 all rooms",
    "  /quit [reason]         leave",
    "anything else is said to the room (//text says /text)",
]


#: What an empty message (a bare delimiter) costs in flood tokens: blank lines are
#: allowed at four times the message rate.
EMPTY_COST = 0.25


# -- output coalescing --------------------------------------------------------------


class Flusher:
    """
    Everything delivered to a client during one reactor turn goes out in one
    write: a busy room sends each member one packet per turn, not one per message.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.pending: list[ChatProtocol] = []
        self.call: Any = None

    def mark(self, proto: ChatProtocol) -> None:
        self.pending.append(proto)
        if self.call is None:
            self.call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write out everything pending now (also called at the end of each read)."""
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None
        pending, self.pending = self.pending, []
        for proto in pending:
            try:
                proto.flush()
            except Exception:  # one client's failure never leaves the others' output unsent
                proto.hub.memberFailed(proto, Failure())


# -- the protocol --------------------------------------------------------------------


@attrs.frozen
class ChatLimits:
    """Per-client limits, from the service settings."""

    maxLine: int = 4096
    maxOutput: int = 256 * 1024
    #: Flood control: messages per second, the burst allowed, warnings before a disconnect.
    rate: float = 5.0
    burst: float = 10.0
    strikes: int = 3
    strikeWindow: float = 30.0


@attrs.frozen
class ChatShared:
    """What every client of one chat service shares."""

    hub: Hub
    flusher: Flusher
    limits: ChatLimits
    clock: IReactorTime
    metrics: ChatMetrics


class ChatMetrics:
    """The chat counters (bound children of the shared registry's families)."""

    def __init__(self, registry: Any, service: str = "chat") -> None:
        s = {"service": service}
        self.messagesIn = registry.counter(
            "netsvc_chat_messages_received_total", "Messages and commands received.", ["service"]).labels(**s)
        self.deliveries = registry.counter(
            "netsvc_chat_deliveries_total", "Messages delivered to clients.", ["service"]).labels(**s)
        self._drops = registry.counter(
            "netsvc_chat_dropped_total", "Messages dropped, by reason.", ["service", "reason"])
        self._kicks = registry.counter(
            "netsvc_chat_kicks_total", "Clients disconnected by the server, by reason.", ["service", "reason"])
        self.deliveryFailures = registry.counter(
            "netsvc_chat_delivery_failures_total",
            "Deliveries or writes to a client that raised (the client was disconnected).", ["service"]).labels(**s)
        self.rooms = registry.gauge("netsvc_chat_rooms", "Rooms that exist.", ["service"]).labels(**s)
        self.service = service

    def drop(self, reason: str) -> Any:
        return self._drops.labels(service=self.service, reason=reason)

    def kick(self, reason: str) -> Any:
        return self._kicks.labels(service=self.service, reason=reason)

    def onHubEvent(self, name: str, count: int = 0) -> None:
        if name == "deliveries":
            self.deliveries.value += count
        elif name == "rooms":
            self.rooms.set(count)
        elif name == "delivery_failed":
            self.deliveryFailures.value += count


@implementer(IPushProducer, IHalfCloseableProtocol)
class ChatProtocol(Protocol):
    """
    One chat client.  It is the hub's L{netsvc.chat.hub.Member}, and the producer
    of its own output: when the transport's buffer is full (a slow reader), what
    it is sent waits here, up to C{maxOutput} bytes; past that it is disconnected.

    What a message causes is written out at the end of the read that brought it
    (one write per member per read), before anything else can happen to the
    connection: a client that sends and closes (C{printf ... | socat}, TLS
    close_notify right behind the data) still gets its answers.  A client that
    shuts down its sending side has quit.
    """

    nick: str | None = None
    room: Any = None
    address = "?"
    #: The client's address without the port: what wrong nickname passwords are counted against.
    host = "?"
    gone = False
    paused = False

    def __init__(self, shared: ChatShared, framing: Framing) -> None:
        self.hub = shared.hub
        self.flusher = shared.flusher
        self.limits = shared.limits
        self.clock = shared.clock
        self.metrics = shared.metrics
        self.framing = framing
        self.bucket = TokenBucket(self.limits.rate, self.limits.burst, self.clock)
        self._buffer = b""
        self._discarding = False
        self._held = False  # a nickname being checked or claimed: later lines wait (see _hold)
        self._readingPaused = False  # the transport is paused by us (held, or our output is backed up)
        #: Input kept unparsed while the client does not read (one read, plus a partial line).
        self._maxWaiting = 65536 + self.limits.maxLine
        self._eofWhileHeld = False
        self._out: list[bytes] = []
        self._outSize = 0
        self._strikes = 0
        self._lastStrike = 0.0

    # -- connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.host = host or "unix"
        self.address = f"[{host}]:{peer.port}" if host and ":" in host else (
            f"{host}:{peer.port}" if host else "unix")
        self.transport.registerProducer(self, True)
        # Chat is interactive and writes small messages: no Nagle delay.
        noDelay = getattr(self.transport, "setTcpNoDelay", None)
        if noDelay is not None:
            noDelay(True)
        self.deliver(notice("welcome to netsvc chat; /help for commands"))
        self.hub.connect(self)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.gone:
            self.gone = True
            why = "connection reset" if reason is not None and reason.check(ConnectionLost) else "disconnected"
            self.hub.disconnect(self, why)
        self._out = []

    # -- input

    def dataReceived(self, data: bytes) -> None:
        delimiter = self.framing.delimiter
        buffer = self._buffer + data if self._buffer else data
        start = 0
        waiting = False
        while not self.gone:
            # While a nickname is settled, or while the client does not read what it is sent, the rest
            # waits (reading is paused meanwhile; a paused TLS layer may still hand over one record).
            if self._held or (self.paused and len(buffer) - start <= self._maxWaiting):
                waiting = True
                break
            end = buffer.find(delimiter, start)
            if end < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                self.messageReceived(buffer[start:end])
            start = end + 1
        if self.gone:  # quit or kicked on the way: the rest is not read
            self._buffer = b""
            self.flusher.flush()
            return
        rest = buffer[start:] if start else buffer
        if waiting:
            self._buffer = rest
            self._updateReading()
            self.flusher.flush()
            return
        if len(rest) > self.limits.maxLine:
            if not self._discarding:
                self._discarding = True
                self.metrics.drop("too_long").inc()
                self.deliver(notice(f"error: message longer than {self.limits.maxLine} bytes; dropped"))
            # Bytes thrown away cost flood tokens too: an endless line is a flood.
            if not self.gone and not self.bucket.take(len(rest) / self.limits.maxLine):
                self._flooding()
            rest = b""
        self._buffer = rest
        self.flusher.flush()

    def readConnectionLost(self) -> None:
        if self._held and not self.gone:
            self._eofWhileHeld = True  # the lines before the end still go first
            return
        if not self.gone:
            self.gone = True
            self.hub.disconnect(self, "disconnected")
        self.flusher.flush()
        self.flush()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def messageReceived(self, raw: bytes) -> None:
        raw = self.framing.strip(raw)
        if len(raw) > self.limits.maxLine:
            self.metrics.drop("too_long").inc()
            self.deliver(notice(f"error: message longer than {self.limits.maxLine} bytes; dropped"))
            return
        if not raw.strip():
            # Empty frames say nothing but cost a loop each: a flood of them is still a flood.
            if not self.bucket.take(EMPTY_COST):
                self._flooding()
            return
        self.metrics.messagesIn.value += 1
        if not self.bucket.take():
            self._flooding()
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.metrics.drop("invalid_utf8").inc()
            self.deliver(notice("error: message is not valid UTF-8; dropped"))
            return
        try:
            if text.startswith("/") and not text.startswith("//"):
                self.command(text)
            else:
                self.hub.say(self, text[1:] if text.startswith("//") else text)
        except ChatError as e:
            self.deliver(notice(f"error: {e}"))

    def _flooding(self) -> None:
        now = self.clock.seconds()
        if now - self._lastStrike > self.limits.strikeWindow:
            self._strikes = 0
        self._strikes += 1
        self._lastStrike = now
        self.metrics.drop("flood").inc()
        if self._strikes >= self.limits.strikes:
            self.kick("flooding")
        elif self._strikes == 1:
            self.deliver(notice(f"warning: too many messages (max {self.limits.rate:g}/s); "
                                "slow down or be disconnected"))

    # -- commands

    def command(self, text: str) -> None:
        name, _, rest = text[1:].partition(" ")
        rest = rest.strip()
        handler: Callable[[str], None] | None = getattr(self, f"cmd_{name.lower()}", None)
        if handler is None:
            raise ChatError(f"unknown command /{name}; /help lists them")
        handler(rest)

    def cmd_nick(self, rest: str) -> None:
        nick, _, password = rest.partition(" ")
        if not nick:
            raise ChatError("usage: /nick NAME" + (f" (you are {self.nick})" if self.nick else ""))
        if not self.hub.isReserved(nick):
            self._hold(self.hub.setNick(self, nick))
            return
        if not password:
            raise ChatError(f"nickname {nick} is reserved: /nick {nick} PASSWORD")
        # Failures are limited per client address (netsvc.chat.auth.limited, wrapped by the service):
        # over the limit, or with the hashing pool full, the answer is a Refused, nothing hashed.
        d = defer.maybeDeferred(self.hub.authority.check, nick, password, client=self.host)  # type: ignore

        def checked(ok: Any) -> None:
            if self.gone:
                return
            if isinstance(ok, Refused):  # counted by the limit (netsvc_password_checks_refused_total)
                if ok.reason == "rate":
                    self.deliver(notice(f"error: too many attempts, try again in {ok.retryAfter:.0f} s"))
                else:
                    self.deliver(notice("error: busy, try again later"))
                return
            if not ok:
                log.info("chat: wrong password for {nick} from {client}", nick=nick, client=self.address)
                self.deliver(notice(f"error: wrong password for {nick}"))
                return
            try:
                return self.hub.setNick(self, nick)  # a Deferred while the cluster claims it
            except ChatError as e:
                self.deliver(notice(f"error: {e}"))

        d.addCallback(checked)
        d.addErrback(lambda f: log.failure("chat: password check failed", f))
        self._hold(d)

    def _hold(self, pending: Any) -> None:
        """
        Until C{pending} (a Deferred) fires, read nothing more: what the client
        sent after C{/nick} is said under the new name, as with a local hub.
        """
        if not isinstance(pending, defer.Deferred) or pending.called:
            return
        self._held = True
        self._updateReading()

        def release(result: Any) -> None:
            self._held = False
            if self.gone:
                return
            self.dataReceived(b"")
            self._updateReading()
            if self._eofWhileHeld and not self._held:
                self.readConnectionLost()

        pending.addBoth(release)

    def _updateReading(self) -> None:
        """
        Read from the client unless a nickname is being settled, or input came
        while its output is backed up (paused).  Not at the pause itself: a TLS
        layer pauses its producer until the handshake is done, which needs reading.
        """
        stop = not self.gone and (self._held or (self.paused and bool(self._buffer)))
        if stop == self._readingPaused or self.transport is None:
            return
        self._readingPaused = stop
        control = getattr(self.transport, "pauseProducing" if stop else "resumeProducing", None)
        if control is not None:
            control()

    def cmd_join(self, rest: str) -> None:
        if not rest:
            raise ChatError("usage: /join #room")
        self.hub.join(self, rest if rest.startswith("#") else "#" + rest)

    def cmd_part(self, rest: str) -> None:
        self.hub.part(self)

    def cmd_msg(self, rest: str) -> None:
        nick, _, message = rest.partition(" ")
        if not nick or not message.strip():
            raise ChatError("usage: /msg NICK text")
        self.hub.privmsg(self, nick, message)

    def cmd_me(self, rest: str) -> None:
        if not rest:
            raise ChatError("usage: /me action")
        self.hub.act(self, rest)

    def cmd_topic(self, rest: str) -> None:
        self.hub.topic(self, rest or None)

    def cmd_who(self, rest: str) -> None:
        room = self.room.name if self.room else LOBBY

        def show(members: list[str]) -> None:
            self.deliver(notice(f"{len(members)} in {room}: {', '.join(members)}"))

        self._answer(self.hub.who(self), show)

    def cmd_rooms(self, rest: str) -> None:
        def show(rooms: list[tuple[str, int, str]]) -> None:
            for name, count, topic in rooms:
                self.deliver(notice(f"{name} ({count})" + (f": {topic}" if topic else "")))

        self._answer(self.hub.roomList(), show)

    def _answer(self, result: Any, show: Callable[[Any], None]) -> None:
        """Show a hub answer now, or when it comes (a Deferred, when the hub asks other nodes)."""
        if not isinstance(result, defer.Deferred):
            show(result)
            return

        def failed(reason: Any) -> None:
            self.deliver(notice(f"error: {reason.getErrorMessage()} (chat cluster unreachable?)"))

        result.addCallbacks(show, failed)

    def cmd_help(self, rest: str) -> None:
        for line in HELP:
            self.deliver(notice(line))

    def cmd_quit(self, rest: str) -> None:
        self.deliver(notice("bye"))
        self.gone = True
        self.hub.disconnect(self, f"quit: {rest}" if rest else "quit")
        self.flush()
        self.transport.loseConnection()

    # -- output

    def deliver(self, event: Event) -> None:
        if self.gone and event.kind != "notice":
            return
        data = self.framing.render(event)
        if self.paused:
            self._outSize += len(data)
            if self._outSize > self.limits.maxOutput:
                self.metrics.drop("slow_reader").inc()
                self.kick("too slow to read", abort=True)
                return
        elif not self._out:
            self.flusher.mark(self)
        self._out.append(data)

    def flush(self) -> None:
        if self._out and not self.paused and self.transport is not None:
            data = b"".join(self._out)
            self._out = []
            self._outSize = 0
            self.transport.write(data)

    def kick(self, why: str, abort: bool = False) -> None:
        """
        Disconnect this client, telling it and its room why.  Called from inside
        a delivery (a slow reader), the room's leave notice is queued by the hub
        and delivered after it.  The connection is closed (aborted with C{abort})
        whatever the hub does.
        """
        if self.gone:
            return
        self.metrics.kick(why.replace(" ", "_")).inc()
        log.info("chat: kicked {name} ({why})", name=displayName(self), why=why)
        self.gone = True
        try:
            self.hub.disconnect(self, f"kicked: {why}")
        finally:
            if abort or self.transport is None:
                self._out = []
                self._outSize = 0
                if self.transport is not None:
                    self.transport.abortConnection()
            else:
                self._out.append(self.framing.render(notice(f"disconnected: {why}")))
                self.flush()
                self.transport.loseConnection()

    def drop(self, why: str) -> None:
        """The hub's call when delivering to this client failed: closed at once."""
        self.kick(why, abort=True)

    # -- IPushProducer: the transport tells us when the client is not reading

    def pauseProducing(self) -> None:
        """The client's socket is full: its output waits here (up to maxOutput), input that comes waits too."""
        self.paused = True

    def resumeProducing(self) -> None:
        """Drained: send what waited, go on with the input that waited, then read again."""
        self.paused = False
        self.flush()
        if self._buffer and not self.gone and not self.paused:
            self.dataReceived(b"")
        self._updateReading()

    def stopProducing(self) -> None:
        self.paused = True

    # -- hooks of netsvc.policies.Guard

    def timedOut(self) -> None:
        self.kick("idle timeout")

    def drain(self) -> None:
        if not self.gone:
            self._out.append(self.framing.render(notice("server shutting down")))
            self.gone = True
            self.hub.disconnect(self, "server shutting down")
            self.flush()
            self.transport.loseConnection()


class ChatFactory(Factory):
    """Makes L{ChatProtocol}s of one framing; all factories of a service share the hub."""

    noisy = False

    def __init__(self, shared: ChatShared, framing: Framing) -> None:
        self.shared = shared
        self.framing = framing

    def buildProtocol(self, addr: Any) -> ChatProtocol:
        proto = ChatProtocol(self.shared, self.framing)
        proto.factory = self
        return proto

    def refusalProtocol(self, reason: str) -> Protocol:
        """Over a connection limit: say so in this framing, then close."""
        return _Refusal(self.framing.render(notice(f"server busy ({reason.replace('_', ' ')}); try later")))


class _Refusal(Protocol):
    def __init__(self, message: bytes) -> None:
        self.message = message

    def connectionMade(self) -> None:
        self.transport.write(self.message)
        self.transport.loseConnection()
