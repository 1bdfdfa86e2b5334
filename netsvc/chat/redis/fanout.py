"""
L{RedisFanOut}: the chat hub's fan-out over Redis pub/sub, so that members on
several processes and hosts share rooms (see L{netsvc.chat.hub.Cluster}).

Contract:
  - Local first: an event is delivered to this node's members at once, then
    published for the other nodes; a node skips its own events when they come
    back, so nothing is delivered twice.  While Redis is unreachable, rooms are
    local to each node: delivery here goes on, events are not sent to other
    nodes (counted in C{netsvc_chat_redis_skipped_total}), nickname claims are
    refused (uniqueness cannot be checked), C{/who} and C{/rooms} say so.  Pub/sub
    has no replay: what was said during the outage does not reach other nodes.
  - Reconnection is txredisapi's (exponential backoff from 0.5 s to 10 s, with
    jitter); on every reconnection this node re-subscribes and re-registers
    its liveness, presence and nicknames.  A nickname another node took
    meanwhile is dropped here (its holder is told).
  - A node that dies stops refreshing its C{alive} key and nicknames: they
    expire after C{nick_ttl}, which frees the nicks and hides its members.
  - Events on the wire: JSON objects; C{o} origin node, C{k} kind, C{x} text,
    C{s} sender, C{r} room name, C{t} target nick, C{w} time; C{c: "topic"}
    marks a topic change instead of an event.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import uuid
from collections import deque
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from netsvc.chat.hub import LOBBY, ROOM, Event, Hub, LocalFanOut, Member, Room, deliverEach, displayName, notice
from netsvc.chat.redis import scripts
from netsvc.chat.redis.connection import Connections

log = Logger()

_HISTORIC = frozenset(("message", "action"))
_ROOM_KINDS = _HISTORIC | {"notice"}
#: Bounds on what a payload from Redis may carry (a chat line is at most a few KB).
MAX_TEXT = 64 * 1024
MAX_NAME = 128
#: Times after this (the year 9999) cannot be shown.
_LAST_TIME = 253402300799.0


def parsePayload(message: str | bytes) -> dict[str, Any] | None:
    """
    A payload from Redis (a room event, a topic change or a private message),
    checked at the boundary: a dict whose fields have their types and sizes
    (names and text are str -- Unicode text: no lone surrogate, which a JSON
    escape can give and no member could be sent --, C{w} a finite time, the room
    a valid room name, the kind one this node shows), or None.  Never raises.
    """
    try:
        data = json.loads(message)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    origin, text = data.get("o"), data.get("x", "")
    if not _name(origin) or not isinstance(text, str) or len(text) > MAX_TEXT or not _unicode(text):
        return None
    if data.get("c") == "topic":
        room = data.get("r")
        return {"o": origin, "c": "topic", "r": room, "x": text} if _room(room) else None
    kind, sender, when = data.get("k"), data.get("s", ""), data.get("w")
    if not (_name(sender, empty=True) and isinstance(when, (int, float)) and not isinstance(when, bool)
            and math.isfinite(when) and 0 <= when <= _LAST_TIME):
        return None
    event = {"o": origin, "k": kind, "x": text, "s": sender, "w": float(when)}
    if kind == "private":
        to = data.get("to")
        return dict(event, to=to) if _name(to) else None
    room, target = data.get("r"), data.get("t", "")
    if kind not in _ROOM_KINDS or not _room(room) or not _name(target, empty=True):
        return None
    return dict(event, r=room, t=target)


def _name(value: Any, empty: bool = False) -> bool:
    return isinstance(value, str) and (empty or value != "") and len(value) <= MAX_NAME and _unicode(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> bool:
    """Whether C{text} can be encoded (a JSON escape like C{\\ud800} decodes to a lone surrogate)."""
    return text.isascii() or _SURROGATE.search(text) is None


def _room(value: Any) -> bool:
    return isinstance(value, str) and ROOM.match(value) is not None


class RedisMetrics:
    """The fan-out's counters, bound to the service label."""

    def __init__(self, registry: Any, service: str = "chat") -> None:
        s = {"service": service}
        self.up = registry.gauge("netsvc_chat_redis_up", "1 while connected to Redis (chat fan-out).",
                                 ["service"]).labels(**s)
        self.disconnects = registry.counter(
            "netsvc_chat_redis_disconnects_total", "Times the Redis connection was lost.", ["service"]).labels(**s)
        self.published = registry.counter(
            "netsvc_chat_redis_published_total", "Events published to other nodes.", ["service"]).labels(**s)
        self.received = registry.counter(
            "netsvc_chat_redis_received_total", "Events received from other nodes.", ["service"]).labels(**s)
        self.skipped = registry.counter(
            "netsvc_chat_redis_skipped_total", "Events not sent to other nodes: Redis was unreachable.",
            ["service"]).labels(**s)
        self.errors = registry.counter(
            "netsvc_chat_redis_errors_total", "Redis commands that failed or timed out.", ["service"]).labels(**s)
        self.invalid = registry.counter(
            "netsvc_chat_redis_invalid_total", "Payloads from Redis dropped as malformed (events and history).",
            ["service"]).labels(**s)


class RedisFanOut(service.Service):
    """
    The hub's fan-out and cluster view over one Redis.  A service: it connects
    when started, and on stopping releases this node's nicknames and presence
    at once (instead of letting them expire) and disconnects.

    @param endpoint: a client endpoint to Redis (tcp:, tls:, unix:).
    @param where: how to name Redis in log lines.
    @param prefix: the key and channel prefix (several chats may share one Redis).
    @param nickTTL: seconds a dead node keeps its nicknames and presence.
    @param timeout: seconds a Redis command may take.
    """

    distributed = True

    def __init__(self, endpoint: Any, where: str, metrics: RedisMetrics, clock: Any, prefix: str = "netsvc:chat:",
                 nickTTL: float = 30.0, timeout: float = 5.0, historySize: int = 50,
                 backoff: tuple[float, float] = (0.5, 10.0), password: str | None = None,
                 username: str | None = None) -> None:
        self.where = where
        self.metrics = metrics
        self.clock = clock
        self.prefix = prefix
        self.nickTTL = max(3, int(nickTTL))
        self.historySize = historySize
        self.node = f"{uuid.uuid4().hex[:12]}"
        self.mine = self.node + "|"
        self.redis = Connections(self, endpoint, timeout, backoff, password, username)
        self.hub: Hub | None = None
        self.serials: dict[Member, str] = {}  # member -> its presence field
        self._serial = itertools.count(1)
        self.loaded: set[str] = set()  # rooms whose topic and history came from Redis
        self.loading: dict[str, list[Member]] = {}  # rooms being loaded -> who waits for the replay
        self.everConnected = False
        self.heartbeat = task.LoopingCall(self._heartbeat)
        self.heartbeat.clock = clock
        self._local = LocalFanOut()

    # -- the service

    def startService(self) -> None:
        super().startService()
        log.info("chat: connecting to Redis at {where} (node {node}, pid {pid})", where=self.where,
                 node=self.node, pid=os.getpid())
        self.redis.subscribe(self._nodeChannel(self.node))
        for folded in self.hub.rooms if self.hub else ():
            self.redis.subscribe(self._key("room:", folded))
        self.redis.start()
        self.heartbeat.start(self.nickTTL / 3, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self.heartbeat.running:
            self.heartbeat.stop()
        d = self._leaveCluster() if self.redis.up else defer.succeed(None)
        d.addErrback(lambda f: None)
        d.addCallback(lambda _: self.redis.stop())
        return d

    # -- Cluster: the hub's calls

    def attach(self, hub: Hub) -> None:
        self.hub = hub
        self._local.failed = hub.memberFailed

    def publish(self, room: Room, event: Event, exclude: Member | None = None) -> int:
        n = self._local.publish(room, event, exclude)  # this node's members first, then the other nodes
        if not self.redis.up:
            self.metrics.skipped.value += 1
            return n
        folded = room.name.lower()
        payload = json.dumps({"o": self.node, "k": event.kind, "x": event.text, "s": event.sender,
                              "r": room.name, "t": event.target, "w": round(event.time, 3)},
                             ensure_ascii=False, separators=(",", ":"))
        channel = self._key("room:", folded)
        if event.kind in _HISTORIC and self.historySize:
            d = self.redis.eval(scripts.PUBLISH, [self._key("history:", folded)],
                                [channel, payload, self.historySize])
        else:
            d = self.redis.execute("PUBLISH", channel, payload)
        d.addErrback(self._failed, "publish")
        self.metrics.published.value += 1
        return n

    def entered(self, member: Member, room: Room) -> bool:
        folded = room.name.lower()
        serial = self.serials.get(member)
        if serial is None:
            serial = self.serials[member] = f"{self.mine}{next(self._serial)}"
        channel = self._key("room:", folded)
        if self.redis.up:
            self.redis.execute("HSET", self._key("who:", folded), serial, displayName(member)).addErrback(
                self._failed, "presence")
            self.redis.execute("HSET", self._key("rooms"), folded, room.name).addErrback(self._failed, "presence")
        if folded in self.loaded:
            return False
        waiting = self.loading.get(folded)
        if waiting is not None:
            waiting.append(member)
            return True
        if not self.redis.up:
            self.redis.subscribe(channel)  # done on reconnection
            return False
        self.loading[folded] = [member]
        subscribed = self.redis.subscribe(channel)
        load = self.redis.eval(scripts.LOAD, [self._key("topic:", folded), self._key("history:", folded)], [])
        d = defer.gatherResults([subscribed, load], consumeErrors=True).addCallback(lambda results: results[1])
        d.addCallbacks(self._loaded, self._loadFailed, (room,), None, (room,))
        return True

    def left(self, member: Member, room: Room) -> None:
        folded = room.name.lower()
        serial = self.serials.get(member)
        if serial is not None and self.redis.up:
            self.redis.execute("HDEL", self._key("who:", folded), serial).addErrback(self._failed, "presence")
        if not room.members and folded != LOBBY:
            self.redis.unsubscribe(self._key("room:", folded))
            self.loaded.discard(folded)
        # Leaving is also the first half of moving to another room (same member, same presence field):
        # the field is forgotten only if the member is still in no room a moment later (disconnected).
        self.clock.callLater(0, self._forget, member)

    def _forget(self, member: Member) -> None:
        if member.room is None:
            self.serials.pop(member, None)

    def claimNick(self, member: Member, nick: str) -> defer.Deferred:
        d = self.redis.eval(scripts.CLAIM, [self._key("nick:", nick.lower())],
                            [self.mine + nick, self.nickTTL, self.mine])
        d.addErrback(self._failed, "claim", reraise=True)
        return d.addCallback(lambda n: n == 1)

    def renamed(self, member: Member, old: str | None) -> None:
        if not self.redis.up:
            return
        if old is not None:
            self.redis.eval(scripts.RELEASE, [self._key("nick:", old.lower())], [self.mine]).addErrback(
                self._failed, "release")
        serial = self.serials.get(member)
        room = member.room
        if room is not None and serial is not None:
            self.redis.execute("HSET", self._key("who:", room.name.lower()), serial, displayName(member)).addErrback(
                self._failed, "presence")

    def privmsg(self, member: Member, nick: str, text: str) -> defer.Deferred:
        payload = json.dumps({"o": self.node, "k": "private", "to": nick.lower(), "s": displayName(member),
                              "x": text, "w": round(self.clock.seconds(), 3)}, ensure_ascii=False)
        d = self.redis.eval(scripts.PRIVMSG, [self._key("nick:", nick.lower())],
                            [self._key("node:"), payload, self.node])
        return d.addErrback(self._failed, "privmsg", reraise=True)

    def setTopic(self, room: Room, text: str) -> None:
        if not self.redis.up:
            return
        folded = room.name.lower()
        payload = json.dumps({"o": self.node, "c": "topic", "r": room.name, "x": text}, ensure_ascii=False)
        self.redis.execute("SET", self._key("topic:", folded), text).addErrback(self._failed, "topic")
        self.redis.execute("PUBLISH", self._key("room:", folded), payload).addErrback(self._failed, "topic")

    def who(self, room: Room) -> defer.Deferred:
        d = self.redis.eval(scripts.WHO, [self._key("who:", room.name.lower())], [self._key("alive:")])
        return d.addErrback(self._failed, "who", reraise=True)

    def roomList(self) -> defer.Deferred:
        d = self.redis.eval(scripts.ROOMS, [self._key("rooms")], [self.prefix, LOBBY])

        def rows(flat: list[Any]) -> list[tuple[str, int, str]]:
            return [(str(flat[i]), int(flat[i + 1]), str(flat[i + 2] or "")) for i in range(0, len(flat), 3)]

        return d.addCallback(rows).addErrback(self._failed, "rooms", reraise=True)

    # -- from Redis

    def messageReceived(self, channel: str, message: str) -> None:
        hub = self.hub
        data = parsePayload(message)
        if data is None:
            self._invalid("message on Redis channel " + channel)
            return
        if data["o"] == self.node or hub is None:
            return  # our own event coming back: already delivered here
        self.metrics.received.value += 1
        if data.get("k") == "private":
            target = hub.nicks.get(data["to"].lower())
            if target is not None and hub.deliverTo(
                    target, Event("private", data["x"], data["s"], target=target.nick or "", when=data["w"])):
                hub.onEvent("deliveries", count=1)
            return
        room = hub.rooms.get(data["r"].lower())
        if room is None:
            return
        if data.get("c") == "topic":
            room.topic = data["x"]
            return
        event = Event(data["k"], data["x"], data["s"], room.name, data["t"], when=data["w"])
        if event.kind in _HISTORIC:
            room.history.append(event)
        hub.onEvent("deliveries", count=deliverEach(room.members, event, None, hub.memberFailed))

    def _invalid(self, what: str) -> None:
        """A malformed payload: dropped and counted; logged the first time (a bad publisher could fill the log)."""
        self.metrics.invalid.value += 1
        if self.metrics.invalid.value == 1:
            log.warn("chat: dropped a malformed {what} (counted in netsvc_chat_redis_invalid_total; "
                     "not logged again)", what=what)

    # -- connection events (from Connections)

    def connected(self) -> None:
        self.metrics.up.set(1)
        if self.everConnected:
            log.info("chat: Redis at {where} is back; rooms are shared again (node {node})",
                     where=self.where, node=self.node)
        else:
            log.info("chat: connected to Redis at {where}; rooms are shared (node {node})",
                     where=self.where, node=self.node)
        self.everConnected = True
        self._register()

    def disconnected(self, which: str, reason: Any, wasUp: bool) -> None:
        if not wasUp:
            return
        self.metrics.up.set(0)
        self.metrics.disconnects.value += 1
        if not self.running:
            return
        log.error("chat: lost Redis at {where} ({why}); rooms are local to this process until it is back "
                  "(reconnecting with backoff)", where=self.where, why=reason.getErrorMessage())

    # -- internals

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{name}"

    def _nodeChannel(self, node: str) -> str:
        return self._key("node:", node)

    def _failed(self, reason: Any, op: str, reraise: bool = False) -> Any:
        self.metrics.errors.value += 1
        log.debug("chat: Redis {op} failed: {why}", op=op, why=reason.getErrorMessage())
        return reason if reraise else None

    def _loaded(self, result: list[Any], room: Room) -> None:
        folded = room.name.lower()
        waiting = self.loading.pop(folded, [])
        if self.hub is None or self.hub.rooms.get(folded) is not room:
            return  # the room emptied meanwhile
        self.loaded.add(folded)
        topic, events = (result[0] or ""), result[1:]
        if topic and not room.topic:
            room.topic = str(topic)
        history: deque[Event] = deque(maxlen=room.history.maxlen)
        for raw in events:
            data = parsePayload(raw) if isinstance(raw, (str, bytes)) else None
            if data is None or data.get("k") not in _HISTORIC:
                self._invalid(f"history entry of {room.name}")
                continue
            history.append(Event(data["k"], data["x"], data["s"], room.name, data["t"], when=data["w"]))
        if history:
            room.history = history
        for member in waiting:
            self.hub.settled(member, room)

    def _loadFailed(self, reason: Any, room: Room) -> None:
        self._failed(reason, "load")
        waiting = self.loading.pop(room.name.lower(), [])
        for member in waiting:
            if self.hub is not None:
                self.hub.settled(member, room)

    def _members(self) -> list[Member]:
        return [m for room in (self.hub.rooms.values() if self.hub else ()) for m in room.members]

    def _heartbeat(self) -> defer.Deferred | None:
        if not self.redis.up or self.hub is None:
            return None
        held = [(folded, m) for folded, m in self.hub.nicks.items() if m.nick]
        keys = [self._key("alive:", self.node)] + [self._key("nick:", folded) for folded, _ in held]
        args = [self.mine, self.nickTTL] + [self.mine + (m.nick or "") for _, m in held]
        d = self.redis.eval(scripts.HEARTBEAT, keys, args)

        def lost(indexes: list[int]) -> None:
            for i in indexes or ():
                folded, member = held[int(i) - 1]
                if self.hub is not None and self.hub.nicks.get(folded) is member:
                    del self.hub.nicks[folded]
                    old, member.nick = member.nick, None
                    member.deliver(notice(f"your nickname {old} was taken on another node while this one "
                                          f"could not reach the others; you are now {displayName(member)}"))
                    log.warn("chat: nickname {nick} lost to another node", nick=old)

        return d.addCallbacks(lost, self._failed, errbackArgs=("heartbeat",))

    def _register(self) -> None:
        """After (re)connecting: liveness and nicknames, then presence of every local member."""
        self._heartbeat()
        hub = self.hub
        if hub is None:
            return
        for room in hub.rooms.values():
            folded = room.name.lower()
            fields: list[str] = []
            for member in room.members:
                serial = self.serials.setdefault(member, f"{self.mine}{next(self._serial)}")
                fields += [serial, displayName(member)]
            if fields:
                self.redis.execute("HSET", self._key("who:", folded), *fields).addErrback(self._failed, "presence")
                self.redis.execute("HSET", self._key("rooms"), folded, room.name).addErrback(self._failed, "presence")

    def _leaveCluster(self) -> defer.Deferred:
        hub = self.hub
        nicks = list(hub.nicks) if hub else []
        keys = [self._key("alive:", self.node)] + [self._key("nick:", n) for n in nicks]
        args: list[Any] = [self.mine]
        for member, serial in self.serials.items():
            if member.room is not None:
                args += [self._key("who:", member.room.name.lower()), serial]
        return self.redis.eval(scripts.LEAVE, keys, args)
