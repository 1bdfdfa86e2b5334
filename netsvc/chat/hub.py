"""
The chat hub: rooms, nicknames, presence, history and fan-out.  No transport
code here: members are anything with the L{Member} shape (the protocol, a
WebSocket bridge later), and every room's traffic goes through L{Hub.publish}
and its L{FanOut}, the one piece a multi-node (Redis pub/sub) version replaces.

Each member is in exactly one room at a time; everyone starts in C{#lobby}.

A distributed fan-out (L{Cluster}: C{netsvc.chat.redis.RedisFanOut}) is also
told of presence, nicknames, topics and private messages, and answers C{/who},
C{/rooms}, nickname claims and private messages to remote nicks asynchronously:
those hub methods then return a Deferred (or deliver an error notice later).
With L{LocalFanOut} every path is the synchronous one it always was.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

LOBBY = "#lobby"
NICK = re.compile(r"^[A-Za-z][A-Za-z0-9_\-\[\]\\^{}|`]{0,29}$")
ROOM = re.compile(r"^#[A-Za-z0-9_\-.]{1,32}$")


class ChatError(Exception):
    """A command cannot be done; the message is shown to the member as an error notice."""


class Event:
    """
    Something that happened, to be shown to members.  C{kind} is one of
    C{message}, C{action}, C{notice}, C{private}, C{sent} (a private message's
    copy for its sender).  Renderings are cached per framing, so a fan-out to a
    thousand members renders once.
    """

    __slots__ = ("kind", "sender", "text", "room", "target", "time", "rendered", "replay")

    def __init__(self, kind: str, text: str, sender: str = "", room: str = "", target: str = "",
                 when: float | None = None, replay: bool = False) -> None:
        self.kind = kind
        self.text = text
        self.sender = sender
        self.room = room
        self.target = target
        self.time = time.time() if when is None else when
        self.replay = replay
        self.rendered: dict[Any, bytes] = {}

    def replayed(self) -> Event:
        """A copy marked as history (shown with its time)."""
        return Event(self.kind, self.text, self.sender, self.room, self.target, self.time, replay=True)

    def __repr__(self) -> str:
        return f"<Event {self.kind} {self.room} {self.sender!r}: {self.text!r}>"


def notice(text: str) -> Event:
    return Event("notice", text)


class Member(Protocol):
    """What the hub needs of a connected client."""

    nick: str | None
    address: str
    room: Room | None

    def deliver(self, event: Event) -> None:
        """
        Queue C{event} for this member: never block, never deliver to anyone else
        from here.  Should it raise, the hub logs the failure once, counts it and
        drops the member (its C{drop(why)} if it has one, else it is disconnected).
        """


def displayName(member: Member) -> str:
    """A member's name as others see it: its nickname, or its address when it has none."""
    return member.nick or member.address


class Room:
    """A room: its members, its topic, and its last messages."""

    def __init__(self, name: str, historySize: int) -> None:
        self.name = name
        self.topic = ""
        self.members: dict[Member, None] = {}  # ordered, O(1) removal
        self.history: deque[Event] = deque(maxlen=historySize)


class FanOut(Protocol):
    """
    Delivers a room's events to its members.  L{LocalFanOut} serves the members
    of this process; one over Redis pub/sub (members on several nodes) would
    publish to the room's channel and deliver what arrives to the local members.
    """

    def publish(self, room: Room, event: Event, exclude: Member | None = None) -> int:
        """Deliver C{event} to C{room}'s members (but C{exclude}); the count delivered here."""


class Cluster(FanOut, Protocol):
    """
    A fan-out whose members are on several nodes (processes or hosts).  The hub
    does everything locally first (local members never wait for the cluster),
    then tells it; what needs the other nodes returns a Deferred.
    """

    distributed: bool  # True

    def attach(self, hub: Hub) -> None:
        """The hub this fan-out serves (events from other nodes go to its rooms)."""

    def entered(self, member: Member, room: Room) -> bool:
        """
        C{member} joined C{room}; True if the room is being subscribed and loaded here: the
        cluster then calls C{hub.settled(member, room)} (or the member has left meanwhile).
        """

    def left(self, member: Member, room: Room) -> None:
        """C{member} left C{room} (C{room.members} may now be empty)."""

    def claimNick(self, member: Member, nick: str) -> defer.Deferred:
        """Claim C{nick} on every node: fires True (claimed), False (taken), or fails (cluster down)."""

    def renamed(self, member: Member, old: str | None) -> None:
        """C{member.nick} changed from C{old}: release C{old} and update presence."""

    def privmsg(self, member: Member, nick: str, text: str) -> defer.Deferred:
        """Send to C{nick} on another node: fires with its spelling, or None if no node has it."""

    def setTopic(self, room: Room, text: str) -> None:
        """C{room}'s topic changed here."""

    def who(self, room: Room) -> defer.Deferred:
        """Fires with the display names in C{room} on every node."""

    def roomList(self) -> defer.Deferred:
        """Fires with (name, members, topic) for every room on every node."""


class LocalFanOut:
    """Every member is in this process: deliver directly."""

    def __init__(self, failed: Callable[[Member, Failure], None] | None = None) -> None:
        #: Called with a member whose deliver raised (the hub sets its L{Hub.memberFailed}).
        self.failed = failed or _logOnly

    def publish(self, room: Room, event: Event, exclude: Member | None = None) -> int:
        return deliverEach(room.members, event, exclude, self.failed)


def deliverEach(members: dict[Member, None], event: Event, exclude: Member | None,
                failed: Callable[[Member, Failure], None]) -> int:
    """
    Deliver C{event} to each of C{members} (but C{exclude}); the count delivered.
    Iterates over a snapshot and skips whoever left meanwhile; a member whose
    deliver raises is handed to C{failed} and the others still get the event.
    """
    n = 0
    for member in list(members):
        if member is exclude or member not in members:
            continue
        try:
            member.deliver(event)
        except Exception:
            failed(member, Failure())
        else:
            n += 1
    return n


def _logOnly(member: Member, failure: Failure) -> None:
    log.failure("chat: delivery to {name} failed", failure, name=displayName(member))


class NickAuthority(Protocol):
    """
    Reserves nicknames: C{isReserved(nick)}, and C{check(nick, password, client)
    -> Deferred[bool]} (C{client}: the address failures are counted against; the
    answer may be a falsy L{netsvc.auth.Refused} when the check was not made).
    """

    def isReserved(self, nick: str) -> bool: ...

    def check(self, nick: str, password: str, client: Any = None) -> Any: ...


class Hub:
    """
    All rooms and nicknames of one chat service.

    @param historySize: messages kept per room and replayed on join.
    @param maxRooms: rooms that may exist at once (the lobby always does).
    @param onEvent: called with (name, **fields) for metrics; optional.
    @param fanOut: how room events reach members (default: L{LocalFanOut}).
    @param presenceLimit: rooms with more members than this do not announce
        joins and leaves (N members arriving would cost N^2/2 notices); the
        member itself is still told, and C{/who} lists everyone.  None: always.
    """

    def __init__(self, historySize: int = 50, maxRooms: int = 1000,
                 authority: NickAuthority | None = None,
                 onEvent: Callable[..., None] | None = None,
                 fanOut: FanOut | None = None, presenceLimit: int | None = None) -> None:
        self.fanOut = fanOut or LocalFanOut()
        if isinstance(self.fanOut, LocalFanOut):
            self.fanOut.failed = self.memberFailed
        # Room events waiting to be delivered: what a delivery causes (a kicked slow reader's
        # leave notice) is queued here and delivered after it, never from inside it.
        self._outbox: deque[tuple[Room, Event, Member | None]] = deque()
        self._delivering = False
        #: The fan-out when it spans nodes (None: this process is the whole chat).
        self.cluster: Cluster | None = fanOut if getattr(fanOut, "distributed", False) else None  # type: ignore
        #: Nicknames being claimed on the cluster (folded -> member), held here meanwhile.
        self.claiming: dict[str, Member] = {}
        self.presenceLimit = presenceLimit
        self.historySize = historySize
        self.maxRooms = maxRooms
        self.authority = authority
        self.onEvent = onEvent or (lambda name, **kw: None)
        self.rooms: dict[str, Room] = {}  # by folded name
        self.nicks: dict[str, Member] = {}  # by folded nick
        self._room(LOBBY)
        if self.cluster is not None:
            self.cluster.attach(self)

    # -- the one place room traffic goes through

    def publish(self, room: Room, event: Event, exclude: Member | None = None) -> int:
        """
        Deliver C{event} to every member of C{room} (but C{exclude}); the count
        delivered by this call.  Called while a delivery is under way (from a
        member's deliver: a kick, a leave), the event is queued and delivered by
        the outer call once the current delivery is over (then 0 is returned):
        deliveries never nest, however many members a delivery kicks.
        """
        self._outbox.append((room, event, exclude))
        if self._delivering:
            return 0
        self._delivering = True
        total = 0
        try:
            while self._outbox:
                room, event, exclude = self._outbox.popleft()
                try:
                    n = self.fanOut.publish(room, event, exclude)
                except Exception:
                    log.failure("chat: publishing to {room} failed", room=room.name)
                    continue
                total += n
                self.onEvent("deliveries", count=n)
        finally:
            self._delivering = False
        return total

    def memberFailed(self, member: Member, failure: Failure) -> None:
        """
        C{member} raised while being delivered to (or written to): logged once,
        counted, and the member dropped (its connection closed, its nickname freed).
        """
        log.failure("chat: delivery to {name} failed; disconnecting it", failure, name=displayName(member))
        self.onEvent("delivery_failed", count=1)
        drop = getattr(member, "drop", None)
        try:
            if drop is not None:
                drop("delivery failed")
        except Exception:
            log.failure("chat: dropping {name} failed", name=displayName(member))
        if member.room is not None or (member.nick is not None and self.nicks.get(member.nick.lower()) is member):
            self.disconnect(member, "delivery failed")

    def deliverTo(self, member: Member, event: Event) -> bool:
        """Deliver C{event} to one C{member} (another than the caller); False if it failed (and was dropped)."""
        try:
            member.deliver(event)
        except Exception:
            self.memberFailed(member, Failure())
            return False
        return True

    # -- lifecycle

    def connect(self, member: Member) -> None:
        """A new member: it joins the lobby."""
        member.nick = None
        member.room = None
        self._enter(member, self.rooms[LOBBY.lower()])

    def disconnect(self, member: Member, why: str = "quit") -> None:
        """A member is gone (quit, reset, kicked): announced to its room."""
        room = member.room
        try:
            if room is not None:
                self._leave(member, f"{displayName(member)} left ({why})")
        finally:  # the nickname is freed whatever happened above
            if member.nick is not None and self.nicks.get(member.nick.lower()) is member:
                del self.nicks[member.nick.lower()]
                if self.cluster is not None:
                    self.cluster.renamed(member, member.nick)
        log.info("chat: {name} disconnected" + ("" if why == "disconnected" else " ({why})"),
                 name=displayName(member), why=why)

    # -- commands

    def say(self, member: Member, text: str) -> None:
        room = self._roomOf(member)
        event = Event("message", text, displayName(member), room.name)
        room.history.append(event)
        self.publish(room, event)

    def act(self, member: Member, text: str) -> None:
        room = self._roomOf(member)
        event = Event("action", text, displayName(member), room.name)
        room.history.append(event)
        self.publish(room, event)

    def privmsg(self, member: Member, nick: str, text: str) -> Any:
        target = self.nicks.get(nick.lower())
        if target is None and self.cluster is not None and NICK.match(nick):
            return self._remotePrivmsg(member, nick, text)
        if target is None:
            raise ChatError(f"no such nickname: {nick}")
        if not self.deliverTo(target, Event("private", text, displayName(member), target=target.nick or "")):
            raise ChatError(f"no such nickname: {nick}")
        member.deliver(Event("sent", text, displayName(member), target=target.nick or ""))
        self.onEvent("deliveries", count=1)

    def setNick(self, member: Member, nick: str) -> Any:
        """
        Take C{nick} (unique, case-insensitively); announced to the room.  With a
        cluster, a nick not already held here is claimed there first: the
        result (or an error notice) comes later, and a Deferred is returned.
        """
        if not NICK.match(nick):
            raise ChatError(f"invalid nickname {nick!r}: a letter, then up to 29 letters, digits or _-[]\\^{{}}|`")
        folded = nick.lower()
        holder = self.nicks.get(folded) or self.claiming.get(folded)
        if holder is not None and holder is not member:
            raise ChatError(f"nickname {nick} is taken")
        if self.cluster is not None and holder is None:
            return self._claim(member, nick)
        self._rename(member, nick)
        return None

    def _claim(self, member: Member, nick: str) -> defer.Deferred:
        folded = nick.lower()
        self.claiming[folded] = member
        assert self.cluster is not None
        cluster = self.cluster

        def claimed(ok: bool) -> None:
            del self.claiming[folded]
            if member.room is None:  # gone meanwhile
                if ok:
                    cluster.renamed(_Gone(nick), nick)
                return
            if not ok:
                member.deliver(notice(f"error: nickname {nick} is taken"))
            elif self.nicks.get(folded, member) is not member:  # cannot happen: claiming holds it
                cluster.renamed(_Gone(nick), nick)
                member.deliver(notice(f"error: nickname {nick} is taken"))
            else:
                self._rename(member, nick)

        def failed(reason: Any) -> None:
            self.claiming.pop(folded, None)
            log.info("chat: cannot claim {nick}: {why}", nick=nick, why=reason.getErrorMessage())
            if member.room is not None:
                member.deliver(notice(f"error: cannot claim {nick} now (chat cluster unreachable); try again"))

        return cluster.claimNick(member, nick).addCallbacks(claimed, failed)

    def _rename(self, member: Member, nick: str) -> None:
        old = displayName(member)
        oldNick = member.nick
        if oldNick is not None:
            self.nicks.pop(oldNick.lower(), None)
        member.nick = nick
        self.nicks[nick.lower()] = member
        if self.cluster is not None:
            self.cluster.renamed(member, oldNick if oldNick is None or oldNick.lower() != nick.lower() else None)
        if member.room is not None:
            self.publish(member.room, notice(f"{old} is now known as {nick}"))
        log.info("chat: {old} is now {nick}", old=old, nick=nick)

    def isReserved(self, nick: str) -> bool:
        return self.authority is not None and self.authority.isReserved(nick)

    def join(self, member: Member, name: str) -> None:
        if not ROOM.match(name):
            raise ChatError(f"invalid room {name!r}: # then 1 to 32 letters, digits or _-.")
        current = member.room
        if current is not None and current.name.lower() == name.lower():
            raise ChatError(f"you are already in {current.name}")
        if name.lower() not in self.rooms and len(self.rooms) >= self.maxRooms:
            raise ChatError("too many rooms; join an existing one (/rooms)")
        room = self._room(name)
        if current is not None:
            self._leave(member, f"{displayName(member)} left for {room.name}")
        self._enter(member, room)

    def part(self, member: Member) -> None:
        """Leave the current room for the lobby."""
        if member.room is None or member.room.name.lower() == LOBBY:
            raise ChatError("you are in the lobby; /join #room or /quit")
        self.join(member, LOBBY)

    def topic(self, member: Member, text: str | None) -> None:
        room = self._roomOf(member)
        if text is None:
            member.deliver(notice(f"topic of {room.name}: {room.topic}" if room.topic
                                  else f"{room.name} has no topic"))
            return
        room.topic = text
        if self.cluster is not None:
            self.cluster.setTopic(room, text)
        self.publish(room, notice(f"{displayName(member)} set the topic of {room.name}: {text}"))

    def who(self, member: Member) -> Any:
        """The names in C{member}'s room, sorted (a Deferred of them with a cluster)."""
        room = self._roomOf(member)
        if self.cluster is not None:
            return self.cluster.who(room).addCallback(sorted, key=str.lower)
        return sorted((displayName(m) for m in room.members), key=str.lower)

    def roomList(self) -> Any:
        """(name, members, topic) of every room, sorted (a Deferred of them with a cluster)."""
        if self.cluster is not None:
            return self.cluster.roomList().addCallback(sorted, key=lambda r: r[0].lower())
        return sorted(((r.name, len(r.members), r.topic) for r in self.rooms.values()),
                      key=lambda r: r[0].lower())

    def _remotePrivmsg(self, member: Member, nick: str, text: str) -> defer.Deferred:
        assert self.cluster is not None

        def sent(spelled: str | None) -> None:
            if spelled is None:
                member.deliver(notice(f"error: no such nickname: {nick}"))
                return
            member.deliver(Event("sent", text, displayName(member), target=spelled))
            self.onEvent("deliveries", count=1)

        def failed(reason: Any) -> None:
            member.deliver(notice(f"error: cannot reach {nick} now (chat cluster unreachable)"))

        return self.cluster.privmsg(member, nick, text).addCallbacks(sent, failed)

    # -- internals

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name.lower())
        if room is None:
            room = self.rooms[name.lower()] = Room(name, self.historySize)
            self.onEvent("rooms", count=len(self.rooms))
        return room

    def _roomOf(self, member: Member) -> Room:
        if member.room is None:
            raise ChatError("you are not in a room; /join #room")
        return member.room

    def _enter(self, member: Member, room: Room) -> None:
        member.room = room
        room.members[member] = None
        joined = notice(f"{displayName(member)} joined {room.name}")
        # With a cluster, a room new on this node is subscribed and loaded first: the member sees its
        # own join (then topic and history) once everything said in the room after it will reach it.
        waiting = self.cluster is not None and self.cluster.entered(member, room)
        log.info("chat: {name} joined {room}", name=displayName(member), room=room.name)
        if not waiting:
            self._announceJoin(member, room, joined)
        # Else the join is announced (to everyone, on every node) in settled(): announced before this
        # node's subscription is confirmed, someone elsewhere could answer it before the answer can
        # reach this node (the subscription and the publication travel on different connections).

    def settled(self, member: Member, room: Room) -> None:
        """The cluster has C{room} ready here: C{member}, who joined it meanwhile, is announced, then replayed."""
        if member.room is room:
            self._announceJoin(member, room, notice(f"{displayName(member)} joined {room.name}"))

    def _announceJoin(self, member: Member, room: Room, joined: Event) -> None:
        if self._announces(room):
            self.publish(room, joined)
        else:
            member.deliver(joined)
        self.replay(member, room)

    def replay(self, member: Member, room: Room) -> None:
        """Show C{member} the topic and history of C{room} (on joining it)."""
        if room.topic:
            member.deliver(notice(f"topic of {room.name}: {room.topic}"))
        for event in room.history:
            member.deliver(event.replayed())

    def _announces(self, room: Room) -> bool:
        return self.presenceLimit is None or len(room.members) <= self.presenceLimit

    def _leave(self, member: Member, announcement: str) -> None:
        room = member.room
        assert room is not None
        del room.members[member]
        member.room = None
        if self._announces(room):
            self.publish(room, notice(announcement))
        if self.cluster is not None:
            self.cluster.left(member, room)
        if not room.members and room.name.lower() != LOBBY:
            del self.rooms[room.name.lower()]
            self.onEvent("rooms", count=len(self.rooms))


class _Gone:
    """Stands for a member that left while its nickname was being claimed (to release it)."""

    room = None
    address = "?"

    def __init__(self, nick: str) -> None:
        self.nick = nick

    def deliver(self, event: Event) -> None:
        pass
