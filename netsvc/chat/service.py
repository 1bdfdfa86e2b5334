"""
C{services.chat}: settings -> one hub, one factory per listener framing.

    services:
      chat:
        listen:
          - "tcp:4041:interface=127.0.0.1"                           # line framing
          - {endpoint: "tcp:4040:interface=127.0.0.1", framing: nul}  # the books' protocol
"""

from __future__ import annotations

from typing import Any, Literal

from twisted.application.service import IService

from netsvc.auth import UserSource, authenticatorFor, hashPool
from netsvc.chat.auth import PasswordFile, limited
from netsvc.chat.hub import Hub
from netsvc.chat.protocol import FRAMINGS, ChatFactory, ChatLimits, ChatMetrics, ChatShared, Flusher
from netsvc.config import Duration, Limits, Listener, Problem, ServiceSettings, Size, field, frozen
from netsvc.runtime import StartupError


@frozen
class ChatListener(Listener):
    #: C{line}: text lines (nc, socat); C{nul}: NUL-terminated messages (the books' protocol).
    framing: Literal["line", "nul"] = field("line")


@frozen
class AuthSettings:
    #: Reserved nicknames and their scrypt hashes (see netsvc.chat.auth); off when unset.
    password_file: str | None = field(None)
    #: Or reserved nicknames from a users source: a users file, {ldap: URL, base: ...} or {directory: true}.
    users: UserSource | None = field(None)

    def check(self) -> list[tuple[str, str]]:
        if self.password_file and self.users is not None:
            return [("users", "give password_file or users, not both")]
        return []


@frozen
class FanOutSettings:
    """C{fanout:}: share rooms with other processes and hosts through Redis (see netsvc.chat.redis)."""

    #: Client endpoint of the Redis server, e.g. tcp:host=127.0.0.1:port=6379 (or tls:, unix:).
    redis: str = field()
    #: Key and channel prefix: several chats may share one Redis.
    prefix: str = field("netsvc:chat:")
    #: How long a dead node keeps its nicknames and presence.
    nick_ttl: Duration = field(Duration(30), min=3, max=3600)
    #: How long one Redis command may take.
    timeout: Duration = field(Duration(5), min=0.1, max=300)
    #: A file holding the Redis password (AUTH; requirepass or an ACL user's); none: no AUTH.
    password_file: str | None = field(None)
    #: The ACL user (Redis 6+) the password is for; none: the default user.
    username: str | None = field(None)

    def check(self) -> list[tuple[str, str]]:
        from netsvc.endpoints import EndpointError, parseClient

        try:
            if parseClient(self.redis).kind == "udp":
                return [("redis", "Redis is reached over a stream: tcp:, tls: or unix:")]
        except EndpointError as e:
            return [("redis", str(e))]
        return []


@frozen
class Settings(ServiceSettings):
    listen: list[ChatListener] = field(factory=lambda: [ChatListener(endpoint="tcp:4041:interface=127.0.0.1")])
    #: max_message bounds a line; rate/burst are messages per second per client (flood control).
    limits: Limits = field(factory=lambda: Limits(
        max_connections=1024, max_connections_per_ip=128, idle_timeout=Duration(3600),
        max_message=Size(4096), rate=5, burst=10))
    #: Messages kept per room and replayed to who joins.
    history: int = field(50, min=0, max=1000)
    max_rooms: int = field(1000, min=1, max=100_000)
    #: Rooms with more members than this do not announce joins and leaves (0: never announce).
    presence_limit: int = field(500, min=0)
    #: Output waiting for a client that does not read; past it, the client is disconnected.
    max_output: Size = field(Size(256 * 1024), min=1024)
    #: Flood warnings before a disconnect (within flood_window).
    flood_strikes: int = field(3, min=1)
    flood_window: Duration = field(Duration(30), min=1)
    auth: AuthSettings = field(factory=AuthSettings)
    #: Rooms shared through Redis; needed with workers > 1.  None: this process is the whole chat.
    fanout: FanOutSettings | None = field(None)


def makeService(settings: Settings, context: Any) -> IService:
    svc = context.serverService("chat", settings)
    authority = None
    if settings.auth.password_file:
        path = context.settings.path(settings.auth.password_file)
        if not path.is_file():
            raise StartupError([Problem(context.configFile, "services.chat.auth.password_file",
                                        f"cannot read {path}")])
        authority = PasswordFile(path)
        hashPool(context.reactor).countInto(context.metrics)
    elif settings.auth.users is not None:
        authority = authenticatorFor(settings.auth.users, context, "services.chat.auth.users")
    if authority is not None:
        # Wrong passwords: 5 per client address, then one per 10 s, reserved before hashing.
        authority = limited(authority, context.reactor, context.metrics)
    metrics = ChatMetrics(context.metrics)
    fanOut = _redisFanOut(settings, context) if settings.fanout is not None else None
    hub = Hub(settings.history, settings.max_rooms, authority, onEvent=metrics.onHubEvent,
              presenceLimit=settings.presence_limit, fanOut=fanOut)
    if fanOut is not None:
        fanOut.setServiceParent(svc)
    limits = ChatLimits(
        maxLine=settings.limits.max_message, maxOutput=settings.max_output,
        rate=settings.limits.rate, burst=float(settings.limits.burst or max(1, int(settings.limits.rate))),
        strikes=settings.flood_strikes, strikeWindow=settings.flood_window)
    shared = ChatShared(hub, Flusher(context.reactor), limits, context.reactor, metrics)
    factories = {name: svc.guard.wrap(ChatFactory(shared, framing)) for name, framing in FRAMINGS.items()}
    for i, listener in enumerate(settings.listen):
        svc.listen(i, listener, factories[listener.framing])
    svc.hub = hub
    svc.shared = shared  # for the browser chat (netsvc.chat.web)
    return svc


def _redisFanOut(settings: Settings, context: Any) -> Any:
    from netsvc.chat.redis import RedisFanOut, RedisMetrics
    from netsvc.endpoints import clientFromString, parseClient

    fanout = settings.fanout
    assert fanout is not None
    spec = parseClient(fanout.redis)
    password = None
    if fanout.password_file:
        path = context.settings.path(fanout.password_file)
        try:
            password = path.read_text().strip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise StartupError([Problem(context.configFile, "services.chat.fanout.password_file",
                                        f"cannot read {path}: {getattr(e, 'strerror', None) or e}")]) from None
    return RedisFanOut(clientFromString(context.reactor, spec, timeout=fanout.timeout), str(spec),
                       RedisMetrics(context.metrics), context.reactor, prefix=fanout.prefix,
                       nickTTL=fanout.nick_ttl, timeout=fanout.timeout, historySize=settings.history,
                       password=password, username=fanout.username)
